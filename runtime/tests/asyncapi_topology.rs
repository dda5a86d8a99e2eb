//! The AsyncAPI document (`schemas/asyncapi.yaml`) against the code's own topology, not a list
//! typed into a test: every queue the topology declares is a documented queue channel, every
//! documented queue channel is declared, and every binding key is documented.

use std::collections::BTreeSet;

use prebuilds_runtime::amqp::{Entity, Topology};

fn document() -> (String, serde_yaml::Value) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/asyncapi.yaml"
    ))
    .expect("schemas/asyncapi.yaml is readable");
    let doc = serde_yaml::from_str(&text).expect("asyncapi.yaml is YAML");
    (text, doc)
}

#[test]
fn the_documented_queues_are_exactly_the_declared_ones() {
    let (_, doc) = document();
    let documented: BTreeSet<String> = doc["channels"]
        .as_mapping()
        .expect("channels")
        .values()
        .filter(|channel| channel["bindings"]["amqp"]["is"].as_str() == Some("queue"))
        .map(|channel| {
            let queue = &channel["bindings"]["amqp"]["queue"];
            assert_eq!(queue["durable"].as_bool(), Some(true), "{queue:?}");
            queue["name"].as_str().expect("a queue name").to_owned()
        })
        .collect();
    let topology = Topology::new("{prefix}".to_owned());
    let declared: BTreeSet<String> = Entity::ALL
        .iter()
        .filter(|e| !e.is_exchange())
        .map(|e| topology.name(*e))
        .collect();
    assert_eq!(documented, declared);
}

#[test]
fn every_binding_key_is_documented() {
    let (text, _) = document();
    let topology = Topology::new("{prefix}".to_owned());
    for entity in Entity::ALL {
        for binding in topology.bindings(entity) {
            // `provisioner.job.user.*` is written `provisioner.job.user.<transition>`.
            let key = binding.routing_key.trim_end_matches('*');
            assert!(
                text.contains(key),
                "asyncapi.yaml does not document the binding key {} of {}",
                binding.routing_key,
                binding.queue
            );
        }
    }
}
