//! Rendering a notification's title and body from its template (`notification_templates`, Coder's
//! Go-template text) and the message's labels and data. The subset of Go's `text/template` those
//! templates use, and nothing more, so a template that needs more fails loudly instead of sending
//! garbled text:
//!
//! - `{{.Labels.NAME}}` — a label (empty when the notification has none of that name, as Go
//!   renders a missing key of a string map);
//! - `{{.Data.A.B}}` — a value inside the data (strings as they are, other JSON compactly);
//! - `{{range $key, $value := .Data.A}} … {{end}}` over an object (keys in order, as Go ranges
//!   over a map) or an array (`$key` is the index), also `{{range $value := …}}` and
//!   `{{range .Data.A}} … {{.}} … {{end}}`;
//! - `{{ $key }}`, `{{ $value }}` inside the range.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// Why a template cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Value(String),
    Range {
        key: Option<String>,
        value: Option<String>,
        path: String,
        body: Vec<Node>,
    },
}

/// Renders `template` with `labels` and `data`.
pub fn render(
    template: &str,
    labels: &BTreeMap<String, String>,
    data: &Value,
) -> Result<String, RenderError> {
    let nodes = parse(template)?;
    let mut out = String::new();
    let scope = Scope {
        labels,
        data,
        vars: HashMap::new(),
        dot: None,
    };
    emit(&nodes, &scope, &mut out)?;
    Ok(out)
}

struct Scope<'a> {
    labels: &'a BTreeMap<String, String>,
    data: &'a Value,
    vars: HashMap<String, Value>,
    dot: Option<Value>,
}

fn parse(template: &str) -> Result<Vec<Node>, RenderError> {
    // A stack of open ranges with the nodes before each.
    let mut stack: Vec<(RangeSpec, Vec<Node>)> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let Some(start) = rest.find("{{") else {
            nodes.push(Node::Text(rest.to_owned()));
            break;
        };
        if start > 0 {
            nodes.push(Node::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| RenderError("an action '{{' is never closed with '}}'".into()))?;
        let action = after[..end].trim();
        rest = &after[end + 2..];
        if action == "end" {
            let ((key, value, path), outer) = stack
                .pop()
                .ok_or_else(|| RenderError("{{end}} without a {{range}}".into()))?;
            let body = std::mem::replace(&mut nodes, outer);
            nodes.push(Node::Range {
                key,
                value,
                path,
                body,
            });
        } else if let Some(spec) = action.strip_prefix("range ") {
            stack.push((parse_range(spec.trim())?, std::mem::take(&mut nodes)));
        } else if action.starts_with('.') || action.starts_with('$') {
            if action.contains(char::is_whitespace) {
                return Err(unsupported(action));
            }
            nodes.push(Node::Value(action.to_owned()));
        } else {
            return Err(unsupported(action));
        }
    }
    if !stack.is_empty() {
        return Err(RenderError(
            "a {{range}} is never closed with {{end}}".into(),
        ));
    }
    Ok(nodes)
}

fn unsupported(action: &str) -> RenderError {
    RenderError(format!(
        "the template action {{{{{action}}}}} is not supported (only .Labels.X, .Data.X, \
         range … := .Data.X and end)"
    ))
}

type RangeSpec = (Option<String>, Option<String>, String);

fn parse_range(spec: &str) -> Result<RangeSpec, RenderError> {
    let Some((vars, path)) = spec.split_once(":=") else {
        return Ok((None, None, spec.to_owned()));
    };
    let path = path.trim().to_owned();
    let vars: Vec<&str> = vars.split(',').map(str::trim).collect();
    let valid = |v: &str| v.len() > 1 && v.starts_with('$') && !v.contains(char::is_whitespace);
    match vars.as_slice() {
        [value] if valid(value) => Ok((None, Some((*value).to_owned()), path)),
        [key, value] if valid(key) && valid(value) => {
            Ok((Some((*key).to_owned()), Some((*value).to_owned()), path))
        }
        _ => Err(RenderError(format!(
            "{{{{range {spec}}}}}: write range $key, $value := .Data.X"
        ))),
    }
}

fn resolve(path: &str, scope: &Scope<'_>) -> Result<Value, RenderError> {
    if path == "." {
        return Ok(scope.dot.clone().unwrap_or(Value::Null));
    }
    if path.starts_with('$') {
        return scope
            .vars
            .get(path)
            .cloned()
            .ok_or_else(|| RenderError(format!("undefined variable {path}")));
    }
    let mut parts = path.trim_start_matches('.').split('.');
    match parts.next() {
        Some("Labels") => {
            let name = parts.next().ok_or_else(|| unsupported(path))?;
            if parts.next().is_some() {
                return Err(unsupported(path));
            }
            Ok(scope
                .labels
                .get(name)
                .map(|v| Value::String(v.clone()))
                .unwrap_or(Value::Null))
        }
        Some("Data") => {
            let mut value = scope.data;
            for part in parts {
                value = match value {
                    Value::Object(map) => map.get(part).unwrap_or(&Value::Null),
                    _ => &Value::Null,
                };
            }
            Ok(value.clone())
        }
        _ => Err(unsupported(path)),
    }
}

fn display(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn emit(nodes: &[Node], scope: &Scope<'_>, out: &mut String) -> Result<(), RenderError> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Value(path) => out.push_str(&display(&resolve(path, scope)?)),
            Node::Range {
                key,
                value,
                path,
                body,
            } => {
                let items: Vec<(Value, Value)> = match resolve(path, scope)? {
                    // serde_json's map is ordered by key: Go ranges over a map in key order too.
                    Value::Object(map) => map
                        .into_iter()
                        .map(|(k, v)| (Value::String(k), v))
                        .collect(),
                    Value::Array(items) => items
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| (Value::from(i), v))
                        .collect(),
                    Value::Null => Vec::new(),
                    other => {
                        return Err(RenderError(format!(
                            "{{{{range}}}} over {path}, which is {other} and not a list or object"
                        )))
                    }
                };
                for (k, v) in items {
                    let mut inner = Scope {
                        labels: scope.labels,
                        data: scope.data,
                        vars: scope.vars.clone(),
                        dot: Some(v.clone()),
                    };
                    if let Some(key) = key {
                        inner.vars.insert(key.clone(), k);
                    }
                    if let Some(value) = value {
                        inner.vars.insert(value.clone(), v);
                    }
                    emit(body, &inner, out)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> BTreeMap<String, String> {
        [
            ("workspace", "alice-ws"),
            ("claimant", "alice"),
            ("template", "python-dev"),
            ("template_version", "v2"),
            ("preset", "large"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The body of Coder's "Prebuilt Workspace Resource Replaced" as migration V1 stores it.
    #[test]
    fn the_drift_body_names_workspace_owner_resources_template_and_preset() {
        let template = "Workspace **{{.Labels.workspace}}** was claimed from a prebuilt workspace by **{{.Labels.claimant}}**.\n\n\
            {{range $resource, $paths := .Data.replacements}}- _{{ $resource }}_ was replaced due to changes to _{{ $paths }}_\n{{end}}\n\
            Template: {{.Labels.template}} / {{.Labels.template_version}}, preset {{.Labels.preset}}.";
        let data = serde_json::json!({"replacements": {
            "docker_container.workspace[0]": "env,image",
            "aws_instance.dev": "ami",
        }});
        let body = render(template, &labels(), &data).unwrap();
        assert_eq!(
            body,
            "Workspace **alice-ws** was claimed from a prebuilt workspace by **alice**.\n\n\
             - _aws_instance.dev_ was replaced due to changes to _ami_\n\
             - _docker_container.workspace[0]_ was replaced due to changes to _env,image_\n\n\
             Template: python-dev / v2, preset large."
        );
    }

    #[test]
    fn missing_values_render_empty_and_lists_range_by_index() {
        let data = serde_json::json!({"items": ["a", "b"], "n": 3});
        let out = render(
            "[{{.Labels.nope}}]{{range $i, $v := .Data.items}}{{$i}}={{$v}};{{end}}{{range .Data.items}}<{{.}}>{{end}}{{.Data.n}}{{range $x := .Data.none}}x{{end}}",
            &labels(),
            &data,
        )
        .unwrap();
        assert_eq!(out, "[]0=a;1=b;<a><b>3");
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for bad in [
            "{{if .Labels.x}}y{{end}}",
            "{{.Labels.x | upper}}",
            "{{range .Data.x}}",
            "{{end}}",
            "{{.Labels",
            "{{.Other.x}}",
            "{{range $a $b := .Data.x}}{{end}}",
        ] {
            assert!(
                render(bad, &labels(), &Value::Null).is_err(),
                "{bad} must be refused"
            );
        }
    }
}
