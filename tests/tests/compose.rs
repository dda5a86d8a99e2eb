//! Fast static checks of `docker-compose.yml` and the `Dockerfile` (scripts/compose-check runs the
//! stack for real): every service command names a real binary of this workspace with flags and
//! subcommands that binary accepts, every environment variable is one a binary reads, every file
//! mounted from the repository exists, `depends_on` only names defined services, and the
//! Dockerfile's dependency layer copies every workspace member and loads from exactly that.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use prebuilds_tests::process::binary;
use serde_yaml::Value;

const BINARIES: [&str; 6] = [
    "prebuilds-scheduler",
    "prebuilds-worker",
    "prebuilds-provisioner",
    "prebuilds-notifier",
    "prebuilds-api",
    "prebuildsctl",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_yaml::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    // Merge keys nested in services (`<<: *prebuilds` inside a service's mapping) need a pass each.
    if let Some(services) = value.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, service) in services.iter_mut() {
            service.apply_merge().unwrap();
            for key in ["environment", "depends_on"] {
                if let Some(v) = service.get_mut(key) {
                    v.apply_merge().unwrap();
                }
            }
        }
    }
    value
}

fn help(args: &[&str]) -> String {
    let (bin, rest) = args.split_first().unwrap();
    let out = Command::new(binary(bin))
        .args(rest)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{} --help` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    }
}

/// The prebuildsctl command lines of a seed script: its `once "<exists message>" ARGS…` lines.
fn script_commands(path: &std::path::Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let commands: Vec<Vec<String>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("once \""))
        .map(|rest| {
            let args = rest.split_once('"').expect("closing quote").1;
            std::iter::once("prebuildsctl".to_owned())
                .chain(args.split_whitespace().map(str::to_owned))
                .collect()
        })
        .collect();
    assert!(
        !commands.is_empty(),
        "{} runs no prebuildsctl command",
        path.display()
    );
    commands
}

/// Checks one command line: binary, subcommands and long flags.
fn check_command(words: &[String], service: &str) {
    let Some(bin) = words.first() else { return };
    assert!(
        BINARIES.contains(&bin.as_str()),
        "service {service}: {bin} is not one of our binaries"
    );
    // Subcommands are the leading words before the first flag or argument value.
    let mut path = vec![bin.as_str()];
    for w in &words[1..] {
        if w.starts_with('-') {
            break;
        }
        let text = help(&path);
        if text.contains("Commands:")
            && text
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{w} ")) || l.trim() == w)
        {
            path.push(w);
        } else {
            break;
        }
    }
    let text = help(&path);
    for w in words.iter().filter(|w| w.starts_with("--")) {
        let flag = w.split('=').next().unwrap();
        assert!(
            text.contains(flag),
            "service {service}: `{}` does not accept {flag}",
            path.join(" ")
        );
    }
}

#[test]
fn every_service_runs_a_real_binary_with_real_flags_and_known_environment() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<String> = services
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let all_help: String = BINARIES.iter().map(|b| help(&[b])).collect();
    let mut checked = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let entrypoint = strings(&service["entrypoint"]);
        let command = strings(&service["command"]);
        if let Some(script) = command
            .first()
            .and_then(|c| c.strip_prefix("/opt/prebuilds/examples/"))
        {
            // A script of examples/ (copied into the image): check each prebuildsctl line.
            for words in script_commands(&repo().join("examples").join(script)) {
                check_command(&words, name);
                checked += 1;
            }
        } else if entrypoint.first().map(String::as_str) == Some("/bin/sh") {
            // A shell script: check each `prebuildsctl …;` statement.
            let script = command.join(" ");
            for statement in script.split(';') {
                let words: Vec<String> = statement
                    .split("||")
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if !words.is_empty() {
                    check_command(&words, name);
                    checked += 1;
                }
            }
        } else if let Some(first) = entrypoint.first().or(command.first()) {
            if BINARIES.contains(&first.as_str()) || !service["build"].is_null() {
                let mut words = entrypoint.clone();
                words.extend(command.clone());
                check_command(&words, name);
                checked += 1;
            }
        }
        if let Some(env) = service["environment"].as_mapping() {
            if !service["build"].is_null() {
                for key in env.keys().filter_map(|k| k.as_str()) {
                    assert!(
                        all_help.contains(key),
                        "service {name}: no binary reads {key}"
                    );
                }
            }
        }
        if let Some(deps) = service["depends_on"].as_mapping() {
            for dep in deps.keys().filter_map(|k| k.as_str()) {
                assert!(
                    names.contains(dep),
                    "service {name} depends on unknown service {dep}"
                );
            }
        }
        for volume in service["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
        {
            if let Some(path) = volume.strip_prefix("./") {
                let local = path.split(':').next().unwrap();
                assert!(
                    repo().join(local).exists(),
                    "service {name} mounts missing {local}"
                );
            }
        }
    }
    assert!(checked >= 12, "checked only {checked} commands");
    for required in [
        "postgres",
        "rabbitmq",
        "migrate",
        "scheduler-1",
        "scheduler-2",
        "worker-1",
        "worker-2",
        "worker-3",
        "provisioner",
        "seed",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(required), "missing service {required}");
    }
}

#[test]
fn prometheus_scrapes_every_process_and_grafana_has_the_dashboard() {
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    for target in [
        "scheduler-1:9464",
        "scheduler-2:9464",
        "worker-1:9464",
        "worker-2:9464",
        "worker-3:9464",
        "provisioner:9464",
    ] {
        assert!(
            prometheus.contains(target),
            "prometheus does not scrape {target}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/prebuilds.json")).unwrap(),
    )
    .unwrap();
    let exprs: String = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_owned())
        })
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "coderd_prebuilt_workspaces_desired",
        "coderd_prebuilt_workspaces_running",
        "coderd_prebuilt_workspaces_eligible",
        "prebuilds_claims_total",
        "coderd_prebuilt_workspace_claim_duration_seconds_bucket",
        "prebuilds_replenish_latency_seconds_bucket",
        "coderd_prebuilt_workspaces_preset_hard_limited",
        "prebuilds_dead_lettered_total",
        "prebuilds_outbox_lag_seconds",
    ] {
        assert!(exprs.contains(metric), "dashboard lacks {metric}");
    }
}

/// Every metric a dashboard panel queries is registered somewhere in the services' code, so a
/// renamed metric cannot leave an empty panel behind.
#[test]
fn the_dashboard_only_queries_metrics_the_code_registers() {
    let mut sources = String::new();
    for dir in [
        "worker/src",
        "scheduler/src",
        "runtime/src",
        "provisioner/src",
        "notifier/src",
    ] {
        collect_rust(&repo().join(dir), &mut sources);
    }
    let dashboard =
        std::fs::read_to_string(repo().join("deploy/grafana/dashboards/prebuilds.json")).unwrap();
    let mut checked = 0;
    for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !(word.starts_with("coderd_") || word.starts_with("prebuilds_")) {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .unwrap_or(word);
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "the dashboard queries {word}, which no service registers"
        );
        checked += 1;
    }
    assert!(checked >= 10, "checked only {checked} metric references");
}

/// Prometheus scrapes each service on the port its `PREBUILDS_METRICS_ADDR` listens on.
#[test]
fn scraped_ports_match_the_services_metrics_address() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let Some(addr) = service["environment"]["PREBUILDS_METRICS_ADDR"].as_str() else {
            continue;
        };
        let port = addr.rsplit(':').next().unwrap();
        if prometheus.contains(&format!("\"{name}:")) {
            assert!(
                prometheus.contains(&format!("\"{name}:{port}\"")),
                "{name} listens on {port} but is scraped elsewhere"
            );
        }
    }
}

fn collect_rust(dir: &std::path::Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rust(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The workspace members, from the root manifest.
fn workspace_members() -> BTreeSet<String> {
    // `members = [ "a", "b", … ]`, one name per line or several: the quoted words of the array.
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let array = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("a workspace members array")
        .0;
    let members: BTreeSet<String> = array
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.len() >= 10, "read only {members:?}");
    members
}

/// The `COPY SRC… DEST` lines of the Dockerfile's `build` stage before its `COPY . .`: what the
/// dependency layer is built from.
fn dependency_layer_copies() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stage = dockerfile
        .split("\nFROM ")
        .find(|s| s.contains(" AS build\n"))
        .expect("a build stage");
    let layer = stage.split("\nCOPY . .").next().unwrap();
    layer
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_dockerfile_dependency_layer_copies_every_workspace_member() {
    let copied: BTreeSet<String> = dependency_layer_copies()
        .iter()
        .filter_map(|path| path.strip_suffix("/Cargo.toml").map(str::to_owned))
        .collect();
    assert_eq!(
        copied,
        workspace_members(),
        "the Dockerfile's dependency layer must copy the manifest of every workspace member"
    );
}

/// A tree holding only what the dependency layer copies, with the stub sources the Dockerfile
/// writes, is a workspace Cargo loads, with the same packages as the real one.
#[test]
fn the_workspace_loads_from_exactly_what_the_dependency_layer_copies() {
    let dir = std::env::temp_dir().join(format!("prebuilds-docker-layer-{}", uuid::Uuid::new_v4()));
    for path in dependency_layer_copies() {
        let to = dir.join(&path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo().join(&path), &to).unwrap();
    }
    let stub = Command::new(dir.join("scripts/docker-stub-sources"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        stub.status.success(),
        "{}",
        String::from_utf8_lossy(&stub.stderr)
    );
    let packages = |root: &std::path::Path| -> BTreeSet<String> {
        let out = Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo metadata in {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        metadata["workspace_members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| {
                let id = id.as_str().unwrap();
                id.rsplit(['#', '/'])
                    .next()
                    .unwrap()
                    .split('@')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let (layer, real) = (packages(&dir), packages(&repo()));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(layer, real);
}

/// The build context leaves out the build output (gigabytes) and the git history.
#[test]
fn the_build_context_leaves_out_target_and_git() {
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let lines: BTreeSet<&str> = ignore.lines().map(str::trim).collect();
    for required in ["/target", "/.git"] {
        assert!(lines.contains(required), ".dockerignore lacks {required}");
    }
}
