//! The reference pages in `docs/` are kept equal to the code:
//!
//! - `docs/configuration.md` is rendered here from the clap definitions of every binary (flags,
//!   environment variables, defaults, accepted values, help text); the test fails when the file
//!   differs, and `UPDATE_DOCS=1` rewrites it.
//! - `docs/metrics.md` names exactly the metrics the services register.
//! - No tracked file points at documents outside the repository: what users and maintainers need
//!   lives in `docs/`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command as Process,
};

use clap::{Arg, Command, CommandFactory};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// One table cell: clap's help text on one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn flag(arg: &Arg) -> String {
    if arg.is_positional() {
        let name = arg
            .get_value_names()
            .and_then(|names| names.first().map(|n| n.to_string()))
            .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
        return format!("`{name}`");
    }
    let mut forms = Vec::new();
    if let Some(short) = arg.get_short() {
        forms.push(format!("`-{short}`"));
    }
    if let Some(long) = arg.get_long() {
        let value = if arg.get_action().takes_values() {
            let name = arg
                .get_value_names()
                .and_then(|names| names.first().map(|n| n.to_string()))
                .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
            format!(" <{name}>")
        } else {
            String::new()
        };
        forms.push(format!("`--{long}{value}`"));
    }
    forms.join(", ")
}

fn default_of(arg: &Arg) -> String {
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if defaults.is_empty() {
        "—".to_owned()
    } else {
        format!("`{}`", defaults.join(","))
    }
}

fn meaning(arg: &Arg) -> String {
    let help = arg
        .get_long_help()
        .or_else(|| arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let mut text = cell(&help);
    if !text.is_empty() && !text.ends_with(['.', '!', '?']) {
        text.push('.');
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    // Booleans list `true`/`false`; that says nothing a reader needs.
    if !values.is_empty() && values != ["`true`", "`false`"] {
        let _ = write!(text, " One of: {}.", values.join(", "));
    }
    if arg.is_required_set() {
        text.push_str(" Required.");
    }
    text
}

fn arguments_table(out: &mut String, command: &Command) {
    let args: Vec<&Arg> = command
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    if args.is_empty() {
        out.push_str("No options of its own.\n\n");
        return;
    }
    out.push_str("| flag | environment | default | meaning |\n|---|---|---|---|\n");
    for arg in args {
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "—".to_owned());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            flag(arg),
            env,
            default_of(arg),
            meaning(arg)
        );
    }
    out.push('\n');
}

fn about(command: &Command) -> String {
    command
        .get_about()
        .map(|a| cell(&a.to_string()))
        .unwrap_or_default()
}

/// A service binary: its options in one table.
fn service(out: &mut String, command: Command) {
    let name = command.get_name().to_owned();
    let _ = writeln!(out, "## {name}\n\n{}\n", about(&command));
    arguments_table(out, &command);
}

/// `prebuildsctl` and every subcommand, depth first, in definition order.
fn subcommands(out: &mut String, command: &Command, path: &str) {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let path = format!("{path} {}", sub.get_name());
        let _ = writeln!(out, "### `{path}`\n\n{}\n", about(sub));
        if sub.has_subcommands() {
            arguments_table_if_any(out, sub);
            subcommands(out, sub, &path);
        } else {
            arguments_table(out, sub);
        }
    }
}

fn arguments_table_if_any(out: &mut String, command: &Command) {
    if command
        .get_arguments()
        .any(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
    {
        arguments_table(out, command);
    }
}

fn render() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the command-line definitions of every binary by \
         `tests/tests/docs_reference.rs`; do not edit by hand. After changing a flag, run \
         `UPDATE_DOCS=1 cargo nextest run -p prebuilds-tests --test docs_reference` and commit \
         the result.\n\n\
         Every option can be given as a flag or through its environment variable (the flag wins). \
         Durations are written like `500ms`, `30s`, `10m`, `2h`, `7d`. A variable and its `_FILE` \
         twin (the value read from a file, trailing newline stripped) must not both be set. \
         Connection strings and secrets are never printed: not in logs, errors, `--help` or \
         metrics.\n\n\
         Binaries: [prebuilds-worker](#prebuilds-worker), \
         [prebuilds-scheduler](#prebuilds-scheduler), \
         [prebuilds-provisioner](#prebuilds-provisioner), \
         [prebuilds-notifier](#prebuilds-notifier), [prebuilds-api](#prebuilds-api), \
         [prebuildsctl](#prebuildsctl).\n\n",
    );
    service(&mut out, prebuilds_worker::config::WorkerArgs::command());
    service(&mut out, prebuilds_scheduler::config::Config::command());
    service(&mut out, prebuilds_provisioner::config::Cli::command());
    service(
        &mut out,
        prebuilds_notifier::config::NotifierArgs::command(),
    );
    service(&mut out, prebuilds_api::config::ApiArgs::command());

    let ctl = prebuildsctl::args::Cli::command();
    let _ = writeln!(
        out,
        "## prebuildsctl\n\n{}\n\nOptions of every subcommand:\n",
        about(&ctl)
    );
    arguments_table(&mut out, &ctl);
    subcommands(&mut out, &ctl, "prebuildsctl");
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[test]
fn the_configuration_reference_is_generated_from_the_code() {
    let path = repository().join("docs/configuration.md");
    let rendered = render();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered).expect("write docs/configuration.md");
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    if stored != rendered {
        let first = stored
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| stored.lines().count().min(rendered.lines().count()));
        panic!(
            "docs/configuration.md differs from the flags in the code (first at line {}):\n  \
             stored:    {:?}\n  generated: {:?}\n\
             Run `UPDATE_DOCS=1 cargo nextest run -p prebuilds-tests --test docs_reference` and \
             commit the result.",
            first + 1,
            stored.lines().nth(first).unwrap_or("<end of file>"),
            rendered.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn every_service_option_has_an_environment_variable_and_an_explanation() {
    for command in [
        prebuilds_worker::config::WorkerArgs::command(),
        prebuilds_scheduler::config::Config::command(),
        prebuilds_provisioner::config::Cli::command(),
        prebuilds_notifier::config::NotifierArgs::command(),
        prebuilds_api::config::ApiArgs::command(),
    ] {
        for arg in command
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_positional())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        {
            let name = format!("{} --{}", command.get_name(), arg.get_id());
            assert!(
                arg.get_env().is_some(),
                "{name} has no environment variable"
            );
            assert!(!meaning(arg).is_empty(), "{name} has no help text");
        }
    }
}

/// Tracked files of the repository (what a fresh clone has).
fn tracked_files() -> Vec<PathBuf> {
    let root = repository();
    let output = Process::new("git")
        .arg("-C")
        .arg(&root)
        .args(["ls-files", "-z"])
        .output()
        .expect("run git ls-files");
    assert!(output.status.success(), "git ls-files failed");
    output
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
        .collect()
}

/// Metric names (`prebuilds_…`, `coderd_…`) in the string literals of the services' metric
/// definitions.
fn metric_names_in_code() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for path in tracked_files() {
        let rel = path.strip_prefix(repository()).unwrap().to_string_lossy();
        let is_metrics_source = rel.ends_with("metrics.rs") || rel == "api/src/app.rs";
        if !is_metrics_source || rel.starts_with("tests/") || rel.starts_with("bench/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Only the definitions, not the unit tests below them.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        // String literals of the code lines (comments may quote anything).
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for literal in code.split('"').skip(1).step_by(2) {
            let is_name = (literal.starts_with("prebuilds_") || literal.starts_with("coderd_"))
                && literal
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if is_name {
                names.insert(literal.to_owned());
            }
        }
    }
    names
}

fn metric_names_in_docs() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repository().join("docs/metrics.md")).unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("prebuilds_") || name.starts_with("coderd_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_metrics_page_names_exactly_the_metrics_of_the_code() {
    let code = metric_names_in_code();
    let docs = metric_names_in_docs();
    assert!(
        code.len() > 40,
        "found only {} metric names: {code:?}",
        code.len()
    );
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let stale: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/metrics.md is out of date: not documented {undocumented:?}; documented but not in \
         the code {stale:?}"
    );
}

#[test]
fn no_file_points_at_documents_outside_the_repository() {
    // Assembled so that this file does not match itself.
    let outside = [
        ["SPEC", ".md"].concat(),
        ["SCENARIOS", ".md"].concat(),
        ["ENGINEERING", ".md"].concat(),
        ["../", "shared"].concat(),
        ["coder-prebuilds", ".md"].concat(),
    ];
    // Migrations are immutable once released: the runner refuses a database whose applied
    // migrations differ from the embedded ones (`set_abort_divergent`), so the comments of these
    // two keep their original wording; docs/database.md is what they refer to.
    let released = [
        "schemas/migrations/V1__initial.sql",
        "schemas/migrations/V5__trust.sql",
    ];
    let mut found = Vec::new();
    for path in tracked_files() {
        let rel = path
            .strip_prefix(repository())
            .unwrap()
            .display()
            .to_string();
        if released.contains(&rel.as_str()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // binary files
        };
        for (n, line) in text.lines().enumerate() {
            if outside.iter().any(|o| line.contains(o.as_str())) {
                found.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} line(s) cite documents that are not in the repository (point them at docs/):\n{}",
        found.len(),
        found.join("\n")
    );
}
