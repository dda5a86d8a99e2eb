//! The one definition of every exchange, queue and binding (docs/messages.md), and the two ways a process
//! relies on it:
//!
//! - **declare** (the default, `PREBUILDS_DECLARE_TOPOLOGY=true`): every process declares the whole
//!   topology with exactly these arguments at start-up and after each reconnect, so any process can
//!   start first and none ever hits a 406 PRECONDITION_FAILED from mismatched arguments. Needs the
//!   RabbitMQ *configure* permission on every name.
//! - **check** (`PREBUILDS_DECLARE_TOPOLOGY=false`, least privilege): `prebuildsctl migrate` declared
//!   it once; a process only checks, with passive declares, that the [`Entity`]s it uses exist, and
//!   names the first one missing. Passive declares need no permission at all, so a service's broker
//!   user keeps only what it publishes to and consumes from (README "Least privilege").
//!
//! Both walk [`Entity::ALL`] and the same names, arguments and bindings: there is no second list.
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, ShortString},
    Channel, Connection, ExchangeKind,
};
use serde::Serialize;

/// Deliveries a message may fail (reject with requeue) before the broker dead-letters it. Set
/// explicitly: RabbitMQ 3.x has no default and 4.x defaults to 20.
pub const DELIVERY_LIMIT: i64 = 5;

/// Most messages `<prefix>.notifications` holds (`x-max-length`). Past it the broker drops the
/// oldest (`x-overflow: drop-head`) and, because every work queue has the dead-letter exchange,
/// dead-letters it to `<prefix>.dead` with `x-death` reason `maxlen`, where `prebuildsctl
/// dead-letters list` shows it and `replay` brings it back. Notifications are the one queue
/// whose producer (a drift on every claim) does not wait for its consumer, so without a limit a
/// stopped notifier would let it grow until the broker's memory alarm blocks every publisher.
pub const NOTIFICATIONS_MAX_LENGTH: i64 = 100_000;

/// The work queues (docs/messages.md "Topology").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Reconcile,
    Claims,
    /// Prebuild fill and drain builds (the prebuild lane).
    ProvisionerJobs,
    /// Builds a user waits for (the user lane, docs/messages.md).
    ProvisionerJobsUser,
    ProvisionerEvents,
    Notifications,
}

impl QueueKind {
    pub const ALL: [QueueKind; 6] = [
        QueueKind::Reconcile,
        QueueKind::Claims,
        QueueKind::ProvisionerJobs,
        QueueKind::ProvisionerJobsUser,
        QueueKind::ProvisionerEvents,
        QueueKind::Notifications,
    ];

    /// Queue name without the prefix; also the `queue` label of metrics.
    pub fn suffix(self) -> &'static str {
        match self {
            QueueKind::Reconcile => "reconcile",
            QueueKind::Claims => "claims",
            QueueKind::ProvisionerJobs => "provisioner-jobs",
            QueueKind::ProvisionerJobsUser => "provisioner-jobs-user",
            QueueKind::ProvisionerEvents => "provisioner-events",
            QueueKind::Notifications => "notifications",
        }
    }

    /// The queue of a provisioner lane.
    pub fn provisioner_jobs(lane: prebuilds_schemas::Lane) -> QueueKind {
        match lane {
            prebuilds_schemas::Lane::User => QueueKind::ProvisionerJobsUser,
            prebuilds_schemas::Lane::Prebuild => QueueKind::ProvisionerJobs,
        }
    }

    /// Binding keys on the topic exchange.
    pub fn binding_keys(self) -> &'static [&'static str] {
        match self {
            QueueKind::Reconcile => &["reconcile.preset"],
            QueueKind::Claims => &["claim.request"],
            // A topic `*` is exactly one word: `provisioner.job.user.start` (the user lane) does
            // not match the prebuild lane's key.
            QueueKind::ProvisionerJobs => &["provisioner.job.*"],
            QueueKind::ProvisionerJobsUser => &["provisioner.job.user.*"],
            QueueKind::ProvisionerEvents => &["provisioner.event.*"],
            QueueKind::Notifications => &["notification.*"],
        }
    }
}

/// One exchange or queue of the topology. Processes name the ones they use with these, so that in
/// check mode they verify exactly those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    /// The durable topic exchange every message is published to (`<prefix>`).
    Exchange,
    /// The fanout dead-letter exchange (`<prefix>.dlx`).
    DeadLetterExchange,
    /// The dead-letter queue (`<prefix>.dead`), bound to the dead-letter exchange.
    DeadQueue,
    /// A work queue (`<prefix>.<suffix>`), bound to the topic exchange.
    Queue(QueueKind),
}

impl Entity {
    /// Every entity in declaration order: exchanges before the queues bound to them.
    pub const ALL: [Entity; 9] = [
        Entity::Exchange,
        Entity::DeadLetterExchange,
        Entity::DeadQueue,
        Entity::Queue(QueueKind::Reconcile),
        Entity::Queue(QueueKind::Claims),
        Entity::Queue(QueueKind::ProvisionerJobs),
        Entity::Queue(QueueKind::ProvisionerJobsUser),
        Entity::Queue(QueueKind::ProvisionerEvents),
        Entity::Queue(QueueKind::Notifications),
    ];

    pub fn is_exchange(self) -> bool {
        matches!(self, Entity::Exchange | Entity::DeadLetterExchange)
    }

    /// `"exchange"` or `"queue"`, for messages.
    pub fn what(self) -> &'static str {
        if self.is_exchange() {
            "exchange"
        } else {
            "queue"
        }
    }
}

/// What a process does with the topology when it connects (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// Declare everything (needs the configure permission).
    Declare,
    /// Only check, passively, that what the process uses exists.
    Check,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

/// What [`Topology::declare`] declared, by name (`prebuildsctl migrate --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Declared {
    pub prefix: String,
    pub exchanges: Vec<String>,
    pub queues: Vec<String>,
    pub bindings: Vec<Binding>,
    /// Queues that exist with the arguments of an older version and were left as they are (see
    /// [`Topology::declare`]), each with what to do.
    pub warnings: Vec<String>,
}

/// Why a process cannot rely on the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A passive declare answered 404 NOT_FOUND.
    #[error(
        "{what} '{name}' does not exist on the broker; this process only checks the topology \
         (PREBUILDS_DECLARE_TOPOLOGY=false): run `prebuildsctl migrate` with a RabbitMQ user allowed \
         to configure '{prefix}' to declare it"
    )]
    Missing {
        what: &'static str,
        name: String,
        prefix: String,
    },
    /// A passive declare failed otherwise (connection lost, …).
    #[error("checking that {what} '{name}' exists failed: {source}")]
    Check {
        what: &'static str,
        name: String,
        source: lapin::Error,
    },
    /// Declaring failed; `hint` says what to do when the user may not configure.
    #[error("declaring the topology under prefix '{prefix}' failed: {source}{hint}")]
    Declare {
        prefix: String,
        source: lapin::Error,
        hint: &'static str,
    },
    /// No channel to declare or check on.
    #[error("opening a channel to declare or check the topology: {0}")]
    Channel(lapin::Error),
}

impl TopologyError {
    /// The missing exchange or queue, when that is what went wrong.
    pub fn missing(&self) -> Option<&str> {
        match self {
            TopologyError::Missing { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Names derived from the prefix, and whether this process declares them or only checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    mode: TopologyMode,
    notifications_max_length: i64,
    quorum_initial_group_size: Option<u16>,
}

impl Topology {
    /// The topology under `prefix`, declared on connect ([`TopologyMode::Declare`]).
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
            mode: TopologyMode::Declare,
            notifications_max_length: NOTIFICATIONS_MAX_LENGTH,
            quorum_initial_group_size: None,
        }
    }

    /// The same names with quorum queues created on `size` nodes (`x-quorum-initial-group-size`;
    /// `PREBUILDS_QUORUM_INITIAL_GROUP_SIZE`), or the broker's default with `None`.
    pub fn with_quorum_initial_group_size(self, size: Option<u16>) -> Self {
        Topology {
            quorum_initial_group_size: size,
            ..self
        }
    }

    /// The queue type, and the replica count when one is configured, of every queue.
    fn quorum_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(size) = self.quorum_initial_group_size {
            args.insert(
                ShortString::from("x-quorum-initial-group-size"),
                AMQPValue::LongLongInt(size.into()),
            );
        }
        args
    }

    /// The same names with another length limit of the notifications queue. Only for tests that
    /// overflow it on a prefix of their own: every process of one prefix must declare the same
    /// arguments ([`NOTIFICATIONS_MAX_LENGTH`]) or the second one gets 406 PRECONDITION_FAILED.
    pub fn with_notifications_max_length(self, max_length: i64) -> Self {
        Topology {
            notifications_max_length: max_length,
            ..self
        }
    }

    /// The same names with another mode (`PREBUILDS_DECLARE_TOPOLOGY`).
    pub fn with_mode(self, mode: TopologyMode) -> Self {
        Topology { mode, ..self }
    }

    pub fn mode(&self) -> TopologyMode {
        self.mode
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The durable topic exchange every message is published to.
    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    /// Dead-letter exchange (fanout): every rejected or poisoned message ends in [`Self::dead_queue`].
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn queue(&self, kind: QueueKind) -> String {
        format!("{}.{}", self.prefix, kind.suffix())
    }

    /// Full queue name for a queue label (its suffix).
    pub fn queue_name_for_label(&self, suffix: &str) -> String {
        format!("{}.{}", self.prefix, suffix)
    }

    /// The arguments of every work queue. Changing them is a breaking change for running brokers.
    pub fn work_queue_arguments(&self) -> FieldTable {
        let mut args = self.quorum_arguments();
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        args
    }

    /// The notifications queue: a work queue with a length limit whose overflow dead-letters the
    /// oldest message ([`NOTIFICATIONS_MAX_LENGTH`]).
    pub fn notifications_queue_arguments(&self) -> FieldTable {
        let mut args = self.work_queue_arguments();
        args.insert(
            ShortString::from("x-max-length"),
            AMQPValue::LongLongInt(self.notifications_max_length),
        );
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString("drop-head".into()),
        );
        args
    }

    fn dead_queue_arguments(&self) -> FieldTable {
        self.quorum_arguments()
    }

    /// The name of `entity` under this prefix.
    pub fn name(&self, entity: Entity) -> String {
        match entity {
            Entity::Exchange => self.exchange(),
            Entity::DeadLetterExchange => self.dead_letter_exchange(),
            Entity::DeadQueue => self.dead_queue(),
            Entity::Queue(kind) => self.queue(kind),
        }
    }

    /// The bindings of a queue (`(exchange, routing key)`); none for an exchange.
    pub fn bindings(&self, entity: Entity) -> Vec<Binding> {
        let (exchange, keys): (String, &[&str]) = match entity {
            Entity::Exchange | Entity::DeadLetterExchange => return Vec::new(),
            // Fanout: the key is ignored.
            Entity::DeadQueue => (self.dead_letter_exchange(), &[""]),
            Entity::Queue(kind) => (self.exchange(), kind.binding_keys()),
        };
        keys.iter()
            .map(|key| Binding {
                queue: self.name(entity),
                exchange: exchange.clone(),
                routing_key: (*key).to_owned(),
            })
            .collect()
    }

    fn exchange_kind(entity: Entity) -> ExchangeKind {
        match entity {
            Entity::DeadLetterExchange => ExchangeKind::Fanout,
            _ => ExchangeKind::Topic,
        }
    }

    fn queue_arguments(&self, entity: Entity) -> FieldTable {
        match entity {
            Entity::DeadQueue => self.dead_queue_arguments(),
            Entity::Queue(QueueKind::Notifications) => self.notifications_queue_arguments(),
            _ => self.work_queue_arguments(),
        }
    }

    /// Declares every exchange, queue and binding ([`Entity::ALL`]). Idempotent; safe to run
    /// concurrently. Needs the configure permission on every name, write on the queues and read on
    /// the exchanges (the bindings).
    pub async fn declare(&self, channel: &Channel) -> Result<Declared, lapin::Error> {
        let mut declared = Declared {
            prefix: self.prefix.clone(),
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
            warnings: Vec::new(),
        };
        for entity in Entity::ALL {
            let name = self.name(entity);
            if entity.is_exchange() {
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        Self::exchange_kind(entity),
                        durable,
                        FieldTable::default(),
                    )
                    .await?;
                declared.exchanges.push(name);
                continue;
            }
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let outcome = channel
                .queue_declare(name.as_str().into(), durable, self.queue_arguments(entity))
                .await;
            if let Err(e) = outcome {
                // A broker of a version before the notifications queue had its length limit has
                // the queue without it; RabbitMQ refuses a re-declare with other arguments (406,
                // closing the channel). It is the last entity, so nothing else is left undeclared:
                // keep the queue (and its messages) and say how to bound it with a policy.
                if entity == Entity::Queue(QueueKind::Notifications) && is_precondition_failed(&e) {
                    let warning = format!(
                        "queue '{name}' exists without its length limit (declared by an older \
                         version); it is kept as it is: bound it with `rabbitmqctl set_policy \
                         --apply-to queues {name}-limit '^{}$' \
                         '{{\"max-length\":{},\"overflow\":\"drop-head\"}}'` (README \
                         \"Notifications\")",
                        name.replace('.', "\\."),
                        self.notifications_max_length
                    );
                    tracing::warn!("{warning}");
                    declared.warnings.push(warning);
                    continue;
                }
                return Err(e);
            }
            for binding in self.bindings(entity) {
                channel
                    .queue_bind(
                        binding.queue.as_str().into(),
                        binding.exchange.as_str().into(),
                        binding.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                declared.bindings.push(binding);
            }
            declared.queues.push(name);
        }
        Ok(declared)
    }

    /// Checks with passive declares that every entity of `uses` exists, in the order given, and
    /// reports the first missing one by name. Bindings are not checked (a passive declare cannot
    /// see them): a message published to a queue's routing key whose binding is missing still
    /// comes back as unroutable, and that error names exchange and key.
    ///
    /// Runs on a channel of its own: a 404 closes the channel it happened on, and the caller's
    /// channels must survive the check.
    pub async fn check(
        &self,
        connection: &Connection,
        uses: &[Entity],
    ) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(TopologyError::Channel)?;
        for &entity in uses {
            let name = self.name(entity);
            let outcome = if entity.is_exchange() {
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        Self::exchange_kind(entity),
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            } else {
                channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(|_| ())
            };
            if let Err(source) = outcome {
                // The channel is closed by the broker after a failed passive declare: stop here.
                return Err(if is_not_found(&source) {
                    TopologyError::Missing {
                        what: entity.what(),
                        name,
                        prefix: self.prefix.clone(),
                    }
                } else {
                    TopologyError::Check {
                        what: entity.what(),
                        name,
                        source,
                    }
                });
            }
        }
        let _ = channel.close(200, "topology checked".into()).await;
        Ok(())
    }

    /// What a process does on every (re)connect: declares everything in
    /// [`TopologyMode::Declare`], or checks `uses` in [`TopologyMode::Check`].
    pub async fn prepare(
        &self,
        connection: &Connection,
        uses: &[Entity],
    ) -> Result<(), TopologyError> {
        match self.mode {
            TopologyMode::Check => self.check(connection, uses).await,
            TopologyMode::Declare => {
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(TopologyError::Channel)?;
                match self.declare(&channel).await {
                    Ok(_) => {
                        let _ = channel.close(200, "topology declared".into()).await;
                        Ok(())
                    }
                    Err(source) => Err(TopologyError::Declare {
                        prefix: self.prefix.clone(),
                        hint: if is_access_refused(&source) {
                            " (this RabbitMQ user may not configure it: run `prebuildsctl migrate` \
                             as an operator once and start this process with \
                             PREBUILDS_DECLARE_TOPOLOGY=false)"
                        } else {
                            ""
                        },
                        source,
                    }),
                }
            }
        }
    }
}

fn soft_error(e: &lapin::Error) -> Option<&AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(soft_error(e), Some(AMQPSoftError::NOTFOUND))
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(soft_error(e), Some(AMQPSoftError::PRECONDITIONFAILED))
}

fn is_access_refused(e: &lapin::Error) -> bool {
    matches!(soft_error(e), Some(AMQPSoftError::ACCESSREFUSED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_is_declared_after_the_exchange_it_is_bound_to() {
        let topology = Topology::new("p");
        let position = |name: &str| {
            Entity::ALL
                .iter()
                .position(|e| topology.name(*e) == name)
                .unwrap()
        };
        for entity in Entity::ALL {
            for binding in topology.bindings(entity) {
                assert!(
                    position(&binding.exchange) < position(&binding.queue),
                    "{binding:?}"
                );
            }
        }
        for kind in QueueKind::ALL {
            assert!(
                Entity::ALL.contains(&Entity::Queue(kind)),
                "{kind:?} is declared"
            );
        }
        // `declare` keeps an older notifications queue after its 406, which closes the channel:
        // only safe while nothing is declared after it.
        assert_eq!(
            Entity::ALL.last(),
            Some(&Entity::Queue(QueueKind::Notifications))
        );
    }

    #[test]
    fn only_the_notifications_queue_has_a_length_limit_that_dead_letters() {
        let topology = Topology::new("p");
        let args = topology.queue_arguments(Entity::Queue(QueueKind::Notifications));
        let inner = args.inner();
        assert_eq!(
            inner.get("x-max-length"),
            Some(&AMQPValue::LongLongInt(NOTIFICATIONS_MAX_LENGTH))
        );
        assert_eq!(
            inner.get("x-overflow"),
            Some(&AMQPValue::LongString("drop-head".into()))
        );
        assert!(inner.contains_key("x-dead-letter-exchange"));
        let reconcile = topology.queue_arguments(Entity::Queue(QueueKind::Reconcile));
        assert!(!reconcile.inner().contains_key("x-max-length"));
    }

    /// A job's routing key reaches exactly the queue of its lane (topic `*` is one word).
    #[test]
    fn each_lane_routes_to_its_own_queue_only() {
        use prebuilds_schemas::{BuildStage, Lane, Payload, ProvisionerJob};
        let matches = |pattern: &str, key: &str| {
            let p: Vec<&str> = pattern.split('.').collect();
            let k: Vec<&str> = key.split('.').collect();
            p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
        };
        let mut job = ProvisionerJob::example();
        for (stage, owner, lane) in [
            (
                BuildStage::Create,
                prebuilds_schemas::PREBUILDS_USER_ID,
                Lane::Prebuild,
            ),
            (
                BuildStage::None,
                prebuilds_schemas::PREBUILDS_USER_ID,
                Lane::Prebuild,
            ),
            (BuildStage::Claim, uuid::Uuid::from_u128(7), Lane::User),
            (BuildStage::None, uuid::Uuid::from_u128(7), Lane::User),
        ] {
            job.stage = stage;
            job.owner_id = owner;
            assert_eq!(job.lane(), lane, "{stage:?} owned by {owner}");
            let key = job.routing_key();
            let routed: Vec<QueueKind> = QueueKind::ALL
                .into_iter()
                .filter(|q| q.binding_keys().iter().any(|b| matches(b, &key)))
                .collect();
            assert_eq!(routed, [QueueKind::provisioner_jobs(lane)], "{key}");
        }
    }

    #[test]
    fn names_follow_the_prefix() {
        let topology = Topology::new("p.x");
        let names: Vec<String> = Entity::ALL.iter().map(|e| topology.name(*e)).collect();
        assert_eq!(
            names,
            [
                "p.x",
                "p.x.dlx",
                "p.x.dead",
                "p.x.reconcile",
                "p.x.claims",
                "p.x.provisioner-jobs",
                "p.x.provisioner-jobs-user",
                "p.x.provisioner-events",
                "p.x.notifications"
            ]
        );
        assert_eq!(
            topology.bindings(Entity::DeadQueue),
            [Binding {
                queue: "p.x.dead".into(),
                exchange: "p.x.dlx".into(),
                routing_key: "".into()
            }]
        );
    }
}
