//! Resource replacements from a Terraform plan (`terraform show -json`), shared by every
//! provisioner that reports `plan_result` events: the rule that turns a plan into the
//! `resource_replacements` of the message lives next to the message. Tested on plans produced by
//! the real `terraform` (`schemas/testdata/make-fixtures.sh` regenerates them).

use crate::ResourceReplacement;

/// Resource replacements of a `terraform show -json` plan, as Coder computes them: for each entry of
/// `resource_changes` whose actions are not a no-op and which has `change.replace_paths`, skipping
/// resource types starting with `coder_`, the resource `address` with each replace path rendered as
/// its segments joined by `.` (numbers written as numbers). Entries keep the plan's order.
pub fn replacements_from_plan(plan: &serde_json::Value) -> Vec<ResourceReplacement> {
    let Some(changes) = plan.get("resource_changes").and_then(|c| c.as_array()) else {
        return Vec::new();
    };
    let mut replacements: Vec<ResourceReplacement> = Vec::new();
    for rc in changes {
        let Some(change) = rc.get("change") else {
            continue;
        };
        let actions: Vec<&str> = change
            .get("actions")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if actions.is_empty() || actions == ["no-op"] {
            continue;
        }
        let Some(paths) = change
            .get("replace_paths")
            .and_then(|p| p.as_array())
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let resource_type = rc.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        if resource_type.starts_with("coder_") {
            continue;
        }
        let Some(address) = rc.get("address").and_then(|a| a.as_str()) else {
            continue;
        };
        let rendered: Vec<String> = paths.iter().map(render_path).collect();
        match replacements.iter_mut().find(|r| r.resource == address) {
            Some(existing) => existing.paths.extend(rendered),
            None => replacements.push(ResourceReplacement {
                resource: address.to_owned(),
                paths: rendered,
            }),
        }
    }
    replacements
}

fn render_path(path: &serde_json::Value) -> String {
    match path {
        serde_json::Value::Array(segments) => segments
            .iter()
            .map(render_segment)
            .collect::<Vec<_>>()
            .join("."),
        other => render_segment(other),
    }
}

fn render_segment(segment: &serde_json::Value) -> String {
    match segment {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fixture(name: &str) -> serde_json::Value {
        let text = match name {
            "create" => include_str!("../testdata/plan-create.json"),
            "replace" => include_str!("../testdata/plan-replace.json"),
            _ => unreachable!("unknown fixture"),
        };
        serde_json::from_str(text).expect("fixture is JSON")
    }

    /// Fixtures made by `testdata/make-fixtures.sh` with the real terraform.
    #[test]
    fn a_first_build_replaces_nothing() {
        assert!(replacements_from_plan(&fixture("create")).is_empty());
    }

    #[test]
    fn replaced_resources_are_listed_with_their_paths_and_updates_are_not() {
        let got = replacements_from_plan(&fixture("replace"));
        assert_eq!(
            got,
            vec![
                ResourceReplacement {
                    resource: "terraform_data.home".into(),
                    paths: vec!["triggers_replace".into()],
                },
                ResourceReplacement {
                    resource: "terraform_data.workspace[0]".into(),
                    paths: vec!["triggers_replace".into()],
                },
            ]
        );
    }

    #[test]
    fn coder_resources_no_ops_and_missing_paths_are_ignored_and_segments_are_joined() {
        let plan = json!({
            "resource_changes": [
                {"address": "coder_agent.main", "type": "coder_agent",
                 "change": {"actions": ["delete", "create"], "replace_paths": [["token"]]}},
                {"address": "docker_container.workspace[0]", "type": "docker_container",
                 "change": {"actions": ["delete", "create"],
                            "replace_paths": [["env"], ["image"], ["ports", 0, "internal"]]}},
                {"address": "docker_volume.home", "type": "docker_volume",
                 "change": {"actions": ["no-op"], "replace_paths": [["name"]]}},
                {"address": "docker_image.main", "type": "docker_image",
                 "change": {"actions": ["update"]}},
                {"address": "docker_network.n", "type": "docker_network",
                 "change": {"actions": ["create", "delete"], "replace_paths": []}},
                {"address": "odd.shape", "type": "odd",
                 "change": {"actions": ["delete", "create"], "replace_paths": ["flat"]}}
            ]
        });
        assert_eq!(
            replacements_from_plan(&plan),
            vec![
                ResourceReplacement {
                    resource: "docker_container.workspace[0]".into(),
                    paths: vec!["env".into(), "image".into(), "ports.0.internal".into()],
                },
                ResourceReplacement {
                    resource: "odd.shape".into(),
                    paths: vec!["flat".into()],
                },
            ]
        );
        assert!(replacements_from_plan(&json!({})).is_empty());
        assert!(replacements_from_plan(&json!({"resource_changes": null})).is_empty());
    }
}
