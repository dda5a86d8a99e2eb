//! The template file of `prebuildsctl template push` (docs/template-file.md), mirroring Coder's
//! `coder_parameter` and `coder_workspace_preset` (with its `prebuilds` block): typed structs that
//! refuse unknown fields, and a validation pass that reports every problem with its field path
//! before anything touches the database. Bounded input: [`check_limits`] refuses a file that asks
//! for more presets or prebuilds than the operator allows ([`Limits`]).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use prebuilds_core::{validate_schedules, Expression, Schedule, ScheduleError};
use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// Existing organization (`prebuildsctl org create`).
    pub organization: String,
    /// Template name; created on first push.
    pub template: String,
    /// Version name, unique per template (versions are immutable).
    pub version: String,
    /// Make this version the template's active version.
    #[serde(default)]
    pub activate: bool,
    /// Path of the source file (relative to the template file), stored with the version.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub parameters: Vec<ParameterSpec>,
    #[serde(default)]
    pub presets: Vec<PresetSpec>,
}

/// A template parameter (`coder_parameter`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterSpec {
    pub name: String,
    /// A build must supply a value (from the preset or the user) unless there is a default.
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<Scalar>,
}

/// A preset (`coder_workspace_preset`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetSpec {
    pub name: String,
    /// Fixed parameter values; keys must be declared under `parameters`.
    #[serde(default)]
    pub parameters: BTreeMap<String, Scalar>,
    /// Absent = no prebuilds for this preset (`desired_instances` NULL).
    #[serde(default)]
    pub prebuilds: Option<PrebuildsSpec>,
    /// The preset a claim naming the template and no parameters gets (at most one per version).
    #[serde(default)]
    pub default: bool,
}

/// The preset's `prebuilds` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrebuildsSpec {
    /// Base pool size (0 is valid).
    pub instances: i64,
    #[serde(default)]
    pub expiration_policy: Option<ExpirationPolicy>,
    #[serde(default)]
    pub scheduling: Option<Scheduling>,
    /// Size the pool from demand within `[min, max]` (README "Pools that follow demand").
    #[serde(default)]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// The `prebuilds.autoscaling` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingSpec {
    pub min: i64,
    pub max: i64,
    /// Sizing expression; absent = the built-in demand policy.
    #[serde(default)]
    pub expression: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpirationPolicy {
    /// Seconds an unclaimed prebuild lives before it is replaced; 0 = never.
    pub ttl: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduling {
    /// IANA timezone the crons are read in.
    #[serde(default)]
    pub timezone: String,
    #[serde(default)]
    pub schedule: Vec<ScheduleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// 5-field cron, minute `*`, read as a time range.
    pub cron: String,
    pub instances: i64,
}

/// A YAML scalar kept as text: `cpus: 8` and `cpus: "8"` both mean the value `8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_yaml::Value::deserialize(deserializer)? {
            serde_yaml::Value::String(s) => Ok(Scalar(s)),
            serde_yaml::Value::Number(n) => Ok(Scalar(n.to_string())),
            serde_yaml::Value::Bool(b) => Ok(Scalar(b.to_string())),
            serde_yaml::Value::Null => Err(D::Error::custom(
                "a value is required here (write \"\" for an empty string)",
            )),
            _ => Err(D::Error::custom(
                "expected a string, number or boolean, not a list or mapping",
            )),
        }
    }
}

/// One problem: where (the field path inside the file) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `presets[0].prebuilds.scheduling.schedule[1].cron`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A file that passed validation, ready to be written.
#[derive(Debug, Clone)]
pub struct Checked {
    pub file: TemplateFile,
    /// Contents of `source`, when given.
    pub source: Option<String>,
    /// Things worth knowing that do not stop the push.
    pub warnings: Vec<Problem>,
}

/// How much one template file may ask for (docs/template-file.md "Validation"). Defaults: Coder's clamp of
/// 100 prebuilds per preset, and 100 presets per template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Most prebuilds a preset may ask for, in its `instances` or in any schedule's; a file over
    /// it is refused.
    #[arg(
        long,
        env = "PREBUILDS_MAX_INSTANCES_PER_PRESET",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_instances_per_preset: u32,
    /// Most presets one template version may have; a file over it is refused.
    #[arg(
        long,
        env = "PREBUILDS_MAX_PRESETS_PER_TEMPLATE",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_presets_per_template: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances_per_preset: 100,
            max_presets_per_template: 100,
        }
    }
}

/// Reads, parses and validates `path`, within `limits`. On failure returns every problem found.
pub fn load(path: &Path, limits: &Limits) -> Result<Checked, Vec<Problem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![Problem::new("", format!("cannot read the file: {e}"))])?;
    let file: TemplateFile = serde_yaml::from_str(&text).map_err(|e| vec![yaml_problem(&e)])?;
    let (mut problems, warnings) = validate(&file);
    problems.extend(check_limits(&file, limits));
    let source = match &file.source {
        None => None,
        Some(relative) => match read_source(path, relative) {
            Ok(contents) => Some(contents),
            Err(message) => {
                problems.push(Problem::new("source", message));
                None
            }
        },
    };
    if problems.is_empty() {
        Ok(Checked {
            file,
            source,
            warnings,
        })
    } else {
        Err(problems)
    }
}

/// serde_yaml's message already starts with the field path (`presets[0].prebuilds: …`); keep it.
fn yaml_problem(e: &serde_yaml::Error) -> Problem {
    Problem::new("", format!("invalid template file: {e}"))
}

/// The source file, relative to the template file's directory.
fn read_source(template_path: &Path, relative: &str) -> Result<String, String> {
    if relative.trim().is_empty() {
        return Err("must name a file (or remove the field)".into());
    }
    let base = template_path.parent().unwrap_or_else(|| Path::new("."));
    let resolved: PathBuf = base.join(relative);
    if resolved.is_dir() {
        return Err(format!(
            "'{relative}' (resolved to {}) is a directory; point source at a file",
            resolved.display()
        ));
    }
    std::fs::read_to_string(&resolved).map_err(|e| {
        format!(
            "cannot read '{relative}' (resolved to {}): {e}; paths are relative to the template file",
            resolved.display()
        )
    })
}

/// Checks everything that does not need the database. Returns (errors, warnings).
///
/// 1. Names: organization, template and version are non-empty single words.
/// 2. Parameters: non-empty, unique names.
/// 3. Presets: non-empty, unique names; values only for declared parameters.
/// 4. Prebuilds: instances and TTL in 0..=i32::MAX; the timezone is a known IANA name (required when
///    there are schedules); every cron parses (5 fields, minute `*`); schedule instances ≥ 0; no two
///    schedules overlap.
/// 5. Autoscaling: `0 <= min <= max`; the expression parses and type-checks (the message names
///    the column of the fault).
/// 6. At most one preset has `default: true`.
/// 7. Warnings: a preset with prebuilds that does not set a required parameter without default
///    (its prebuilds would be rejected as `validation_failed`).
pub fn validate(file: &TemplateFile) -> (Vec<Problem>, Vec<Problem>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    for (field, value) in [
        ("organization", &file.organization),
        ("template", &file.template),
        ("version", &file.version),
    ] {
        if let Err(message) = check_name(value) {
            errors.push(Problem::new(field, message));
        }
    }

    let mut parameter_index: HashMap<&str, usize> = HashMap::new();
    for (i, parameter) in file.parameters.iter().enumerate() {
        let path = format!("parameters[{i}].name");
        if parameter.name.trim().is_empty() {
            errors.push(Problem::new(path, "must not be empty"));
        } else if let Some(first) = parameter_index.insert(&parameter.name, i) {
            // Keep the first definition as the reference.
            parameter_index.insert(&file.parameters[first].name, first);
            errors.push(Problem::new(
                path,
                format!(
                    "duplicate parameter name '{}' (first defined at parameters[{first}])",
                    parameter.name
                ),
            ));
        }
    }

    let mut preset_index: HashMap<&str, usize> = HashMap::new();
    let mut first_default: Option<usize> = None;
    for (i, preset) in file.presets.iter().enumerate() {
        let base = format!("presets[{i}]");
        if preset.default {
            match first_default {
                Some(first) => errors.push(Problem::new(
                    format!("{base}.default"),
                    format!(
                        "preset '{}' is marked default, but presets[{first}] ('{}') already is; \
                         a template version has at most one default preset",
                        preset.name, file.presets[first].name
                    ),
                )),
                None => first_default = Some(i),
            }
        }
        if preset.name.trim().is_empty() {
            errors.push(Problem::new(format!("{base}.name"), "must not be empty"));
        } else if let Some(&first) = preset_index.get(preset.name.as_str()) {
            errors.push(Problem::new(
                format!("{base}.name"),
                format!(
                    "duplicate preset name '{}' (first defined at presets[{first}])",
                    preset.name
                ),
            ));
        } else {
            preset_index.insert(&preset.name, i);
        }
        for name in preset.parameters.keys() {
            if !parameter_index.contains_key(name.as_str()) {
                let declared: Vec<&str> = file.parameters.iter().map(|p| p.name.as_str()).collect();
                errors.push(Problem::new(
                    format!("{base}.parameters.{name}"),
                    format!(
                        "unknown parameter '{name}'; declare it under `parameters` or remove it \
                         (declared: {})",
                        if declared.is_empty() {
                            "none".to_owned()
                        } else {
                            declared.join(", ")
                        }
                    ),
                ));
            }
        }
        if let Some(prebuilds) = &preset.prebuilds {
            validate_prebuilds(&format!("{base}.prebuilds"), prebuilds, &mut errors);
            for parameter in &file.parameters {
                if parameter.required
                    && parameter.default.is_none()
                    && !preset.parameters.contains_key(&parameter.name)
                {
                    warnings.push(Problem::new(
                        format!("{base}.parameters"),
                        format!(
                            "preset '{}' does not set required parameter '{}', which has no \
                             default; its prebuilds will be rejected (status validation_failed)",
                            preset.name, parameter.name
                        ),
                    ));
                }
            }
        }
    }
    (errors, warnings)
}

/// The file's requests over `limits`, each naming the template or preset, the limit and the
/// variable that raises it:
/// 1. more presets than `max_presets_per_template`;
/// 2. a preset whose `instances`, any schedule's `instances` or `autoscaling.max` is above
///    `max_instances_per_preset` (values [`validate`] already refuses as out of range are left to
///    it).
pub fn check_limits(file: &TemplateFile, limits: &Limits) -> Vec<Problem> {
    let mut problems = Vec::new();
    let presets = file.presets.len();
    if presets > limits.max_presets_per_template as usize {
        problems.push(Problem::new(
            "presets",
            format!(
                "template '{}' has {presets} presets, more than the limit of {} per template; \
                 split it, or raise the limit with PREBUILDS_MAX_PRESETS_PER_TEMPLATE \
                 (--max-presets-per-template)",
                file.template, limits.max_presets_per_template
            ),
        ));
    }
    let max = i64::from(limits.max_instances_per_preset);
    let over = |n: i64| n > max && n <= i64::from(i32::MAX);
    for (i, preset) in file.presets.iter().enumerate() {
        let Some(prebuilds) = &preset.prebuilds else {
            continue;
        };
        let base = format!("presets[{i}].prebuilds");
        let too_many = |what: String, n: i64| {
            format!(
                "preset '{}' asks for {n} prebuilds{what}, more than the limit of {max} per \
                 preset; lower it, or raise the limit with PREBUILDS_MAX_INSTANCES_PER_PRESET \
                 (--max-instances-per-preset)",
                preset.name
            )
        };
        if over(prebuilds.instances) {
            problems.push(Problem::new(
                format!("{base}.instances"),
                too_many(String::new(), prebuilds.instances),
            ));
        }
        if let Some(auto) = &prebuilds.autoscaling {
            if over(auto.max) {
                problems.push(Problem::new(
                    format!("{base}.autoscaling.max"),
                    too_many(" at most (autoscaling.max)".into(), auto.max),
                ));
            }
        }
        let schedules = prebuilds
            .scheduling
            .as_ref()
            .map(|s| s.schedule.as_slice())
            .unwrap_or_default();
        for (k, schedule) in schedules.iter().enumerate() {
            if over(schedule.instances) {
                problems.push(Problem::new(
                    format!("{base}.scheduling.schedule[{k}].instances"),
                    too_many(format!(" at '{}'", schedule.cron), schedule.instances),
                ));
            }
        }
    }
    problems
}

fn check_name(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if value.chars().any(char::is_whitespace) {
        return Err(format!("'{value}' must not contain whitespace"));
    }
    if value.chars().count() > 64 {
        return Err(format!("'{value}' is longer than 64 characters"));
    }
    Ok(())
}

fn validate_prebuilds(base: &str, prebuilds: &PrebuildsSpec, errors: &mut Vec<Problem>) {
    if let Err(message) = count(prebuilds.instances, "instances") {
        errors.push(Problem::new(format!("{base}.instances"), message));
    }
    if let Some(auto) = &prebuilds.autoscaling {
        validate_autoscaling(&format!("{base}.autoscaling"), auto, errors);
    }
    if let Some(policy) = &prebuilds.expiration_policy {
        if policy.ttl < 0 {
            errors.push(Problem::new(
                format!("{base}.expiration_policy.ttl"),
                format!(
                    "must be 0 (never expire) or a number of seconds, not {}",
                    policy.ttl
                ),
            ));
        } else if policy.ttl > i64::from(i32::MAX) {
            errors.push(Problem::new(
                format!("{base}.expiration_policy.ttl"),
                format!("{} seconds is too large", policy.ttl),
            ));
        }
    }
    let Some(scheduling) = &prebuilds.scheduling else {
        return;
    };
    let base = format!("{base}.scheduling");
    let timezone = scheduling.timezone.trim();
    if timezone.is_empty() {
        if !scheduling.schedule.is_empty() {
            errors.push(Problem::new(
                format!("{base}.timezone"),
                "is required when schedules are defined; use an IANA name such as 'UTC' or \
                 'Europe/Berlin'",
            ));
        }
    } else if let Err(e) = validate_schedules(timezone, &[]) {
        errors.push(Problem::new(format!("{base}.timezone"), e.to_string()));
    }
    // Each schedule on its own first, so every bad cron is named by its index; overlap only when
    // each one is valid (and independent of the timezone: all share it).
    let mut all_valid = true;
    for (k, schedule) in scheduling.schedule.iter().enumerate() {
        let path = format!("{base}.schedule[{k}]");
        if let Err(message) = count(schedule.instances, "instances") {
            all_valid = false;
            errors.push(Problem::new(format!("{path}.instances"), message));
        }
        let single = [Schedule {
            cron_expression: schedule.cron.clone(),
            desired_instances: 0,
        }];
        if let Err(e) = validate_schedules("UTC", &single) {
            all_valid = false;
            errors.push(Problem::new(format!("{path}.cron"), e.to_string()));
        }
    }
    if all_valid && scheduling.schedule.len() > 1 {
        let set: Vec<Schedule> = scheduling
            .schedule
            .iter()
            .map(|s| Schedule {
                cron_expression: s.cron.clone(),
                desired_instances: 0,
            })
            .collect();
        if let Err(e) = validate_schedules("UTC", &set) {
            let path = match &e {
                ScheduleError::Overlap { first, second, .. } => {
                    overlapping_index(&scheduling.schedule, first, second)
                        .map(|j| format!("{base}.schedule[{j}].cron"))
                        .unwrap_or_else(|| format!("{base}.schedule"))
                }
                _ => format!("{base}.schedule"),
            };
            errors.push(Problem::new(path, e.to_string()));
        }
    }
}

fn validate_autoscaling(base: &str, auto: &AutoscalingSpec, errors: &mut Vec<Problem>) {
    let min_ok =
        count(auto.min, "min").map_err(|m| errors.push(Problem::new(format!("{base}.min"), m)));
    let max_ok =
        count(auto.max, "max").map_err(|m| errors.push(Problem::new(format!("{base}.max"), m)));
    if min_ok.is_ok() && max_ok.is_ok() && auto.min > auto.max {
        errors.push(Problem::new(
            format!("{base}.min"),
            format!(
                "min {} is above max {}; the pool is kept within [min, max]",
                auto.min, auto.max
            ),
        ));
    }
    if let Some(expression) = &auto.expression {
        if let Err(e) = Expression::parse(expression) {
            errors.push(Problem::new(
                format!("{base}.expression"),
                format!("'{expression}' is not a valid sizing expression: {e}"),
            ));
        }
    }
}

/// Index of the later schedule of an overlapping pair (the one to change).
fn overlapping_index(schedules: &[ScheduleSpec], first: &str, second: &str) -> Option<usize> {
    let i = schedules.iter().position(|s| s.cron == first)?;
    schedules
        .iter()
        .enumerate()
        .skip(i + 1)
        .find(|(_, s)| s.cron == second)
        .map(|(j, _)| j)
}

fn count(n: i64, what: &str) -> Result<(), String> {
    if n < 0 {
        Err(format!("{what} must be 0 or more, not {n}"))
    } else if n > i64::from(i32::MAX) {
        Err(format!("{what} {n} is too large"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> TemplateFile {
        serde_yaml::from_str(yaml).expect("valid yaml")
    }

    const VALID: &str = r#"
organization: acme
template: python-dev
version: v2
activate: true
parameters:
  - {name: cpus, required: true}
  - {name: region, default: eu}
presets:
  - name: large
    parameters: {cpus: 8, region: eu}
    prebuilds:
      instances: 3
      expiration_policy: {ttl: 86400}
      scheduling:
        timezone: Europe/Berlin
        schedule:
          - {cron: "* 8-18 * * 1-5", instances: 5}
  - name: small
    parameters: {cpus: "2"}
"#;

    #[test]
    fn the_spec_example_is_valid() {
        let file = parse(VALID);
        let (errors, warnings) = validate(&file);
        assert_eq!(errors, vec![]);
        assert_eq!(warnings, vec![]);
        assert_eq!(file.presets[0].parameters["cpus"], Scalar("8".into()));
        assert_eq!(
            file.parameters[1].default,
            Some(Scalar("eu".into())),
            "defaults are scalars"
        );
    }

    fn errors_of(yaml: &str) -> Vec<String> {
        validate(&parse(yaml))
            .0
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let yaml = r#"
organization: acme
template: t
version: v1
parameters: [{name: cpus}]
presets:
  - name: a
    parameters: {gpu: "1"}
    prebuilds:
      instances: -1
      expiration_policy: {ttl: -5}
      scheduling:
        timezone: Mars/Olympus
        schedule:
          - {cron: "30 8 * * *", instances: 1}
          - {cron: "* 8 * 13 *", instances: -2}
  - name: a
    prebuilds:
      instances: 1
      scheduling:
        timezone: UTC
        schedule:
          - {cron: "* 8-18 * * 1-5", instances: 1}
          - {cron: "* 18-20 * * 5", instances: 1}
"#;
        let errors = errors_of(yaml);
        let want = [
            "presets[0].parameters.gpu: unknown parameter 'gpu'",
            "presets[0].prebuilds.instances: instances must be 0 or more, not -1",
            "presets[0].prebuilds.expiration_policy.ttl: must be 0",
            "presets[0].prebuilds.scheduling.timezone: unknown scheduling timezone 'Mars/Olympus'",
            "presets[0].prebuilds.scheduling.schedule[0].cron: cron expression '30 8 * * *': minute field is '30' but must be '*'",
            "presets[0].prebuilds.scheduling.schedule[1].instances: instances must be 0 or more, not -2",
            "presets[0].prebuilds.scheduling.schedule[1].cron: cron expression '* 8 * 13 *': month field '13' is invalid",
            "presets[1].name: duplicate preset name 'a' (first defined at presets[0])",
            "presets[1].prebuilds.scheduling.schedule[1].cron: schedules '* 8-18 * * 1-5' and '* 18-20 * * 5' overlap",
        ];
        for w in want {
            assert!(
                errors.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
    }

    #[test]
    fn a_required_parameter_no_preset_sets_is_a_warning() {
        let yaml = r#"
organization: acme
template: t
version: v1
parameters: [{name: cpus, required: true}, {name: mem, required: true, default: "4"}]
presets:
  - {name: a, prebuilds: {instances: 1}}
  - {name: b}
"#;
        let (errors, warnings) = validate(&parse(yaml));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].to_string().starts_with(
            "presets[0].parameters: preset 'a' does not set required parameter 'cpus'"
        ));
    }

    #[test]
    fn schedules_without_timezone_and_empty_names_are_errors() {
        let yaml = r#"
organization: ""
template: t
version: v1
presets:
  - name: a
    prebuilds:
      instances: 0
      scheduling:
        schedule: [{cron: "* 9 * * *", instances: 1}]
"#;
        let errors = errors_of(yaml);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("organization: must not be empty"));
        assert!(errors[1].starts_with("presets[0].prebuilds.scheduling.timezone: is required"));
    }

    /// A file with `presets` presets, the first asking for `instances` and a schedule of
    /// `scheduled`.
    fn sized(presets: usize, instances: i64, scheduled: i64) -> TemplateFile {
        let mut yaml = "organization: acme\ntemplate: big\nversion: v1\npresets:\n".to_owned();
        yaml.push_str(&format!(
            "  - name: p0\n    prebuilds:\n      instances: {instances}\n      scheduling:\n        \
             timezone: UTC\n        schedule: [{{cron: \"* 8-18 * * *\", instances: {scheduled}}}]\n"
        ));
        for i in 1..presets {
            yaml.push_str(&format!(
                "  - {{name: p{i}, prebuilds: {{instances: 1}}}}\n"
            ));
        }
        parse(&yaml)
    }

    #[test]
    fn limits_refuse_too_many_presets_or_prebuilds_and_say_how_to_raise_them() {
        let limits = Limits {
            max_instances_per_preset: 10,
            max_presets_per_template: 3,
        };
        // (what, presets, instances, scheduled instances, expected problems as prefixes).
        let cases: [(&str, usize, i64, i64, &[&str]); 6] = [
            ("at every limit", 3, 10, 10, &[]),
            (
                "one preset too many",
                4,
                1,
                1,
                &["presets: template 'big' has 4 presets, more than the limit of 3 per template; \
                   split it, or raise the limit with PREBUILDS_MAX_PRESETS_PER_TEMPLATE"],
            ),
            (
                "base count over",
                1,
                11,
                0,
                &["presets[0].prebuilds.instances: preset 'p0' asks for 11 prebuilds, more than \
                   the limit of 10 per preset; lower it, or raise the limit with \
                   PREBUILDS_MAX_INSTANCES_PER_PRESET"],
            ),
            (
                "schedule over",
                1,
                2,
                500,
                &["presets[0].prebuilds.scheduling.schedule[0].instances: preset 'p0' asks for \
                   500 prebuilds at '* 8-18 * * *', more than the limit of 10 per preset"],
            ),
            (
                "all at once",
                5,
                11,
                12,
                &[
                    "presets: template 'big' has 5 presets",
                    "presets[0].prebuilds.instances: preset 'p0' asks for 11",
                    "presets[0].prebuilds.scheduling.schedule[0].instances: preset 'p0' asks for 12",
                ],
            ),
            // Out of range entirely: validate's own error, not a second one here.
            ("too large for the database", 1, 1 << 40, 0, &[]),
        ];
        for (what, presets, instances, scheduled, want) in cases {
            let got: Vec<String> = check_limits(&sized(presets, instances, scheduled), &limits)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got.len(), want.len(), "{what}: {got:#?}");
            for (g, w) in got.iter().zip(want) {
                assert!(g.starts_with(w), "{what}: {g:?} does not start with {w:?}");
            }
        }
        // The defaults are Coder's: 100 and 100.
        assert!(check_limits(&sized(100, 100, 100), &Limits::default()).is_empty());
        assert_eq!(
            check_limits(&sized(101, 101, 0), &Limits::default()).len(),
            2
        );
    }

    #[test]
    fn autoscaling_and_default_presets_are_validated() {
        let yaml = r#"
organization: acme
template: t
version: v1
presets:
  - name: a
    default: true
    prebuilds:
      instances: 1
      autoscaling: {min: 0, max: 20, expression: "max(scheduled_target, claims_30m / 3 + misses_30m)"}
  - name: b
    default: true
    prebuilds:
      instances: 1
      autoscaling: {min: 5, max: 2}
  - name: c
    prebuilds:
      instances: 1
      autoscaling: {min: -1, max: 3, expression: "misses_5m * "}
  - name: d
    prebuilds:
      instances: 1
      autoscaling: {min: 0, max: 3, expression: "if(misses_5m, 1, 0)"}
"#;
        let errors = errors_of(yaml);
        let want = [
            "presets[1].default: preset 'b' is marked default, but presets[0] ('a') already is; \
             a template version has at most one default preset",
            "presets[1].prebuilds.autoscaling.min: min 5 is above max 2",
            "presets[2].prebuilds.autoscaling.min: min must be 0 or more, not -1",
            "presets[2].prebuilds.autoscaling.expression: 'misses_5m * ' is not a valid sizing \
             expression: at column 13: expected a number, a variable, a function or '(', found \
             the end of the expression",
            "presets[3].prebuilds.autoscaling.expression: 'if(misses_5m, 1, 0)' is not a valid \
             sizing expression: at column 4: the condition of if(…) must be a truth value",
        ];
        for w in want {
            assert!(
                errors.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");

        // autoscaling.max counts against the per-preset limit.
        let file = parse(
            "organization: a\ntemplate: t\nversion: v\npresets:\n  - name: p\n    prebuilds: \
             {instances: 1, autoscaling: {min: 0, max: 500}}\n",
        );
        let got: Vec<String> = check_limits(&file, &Limits::default())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with(
            "presets[0].prebuilds.autoscaling.max: preset 'p' asks for 500 prebuilds at most"
        ));
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let yaml = "organization: a\ntemplate: t\nversion: v\npresets:\n  - name: p\n    prebuilds: {instance: 1}\n";
        let e = serde_yaml::from_str::<TemplateFile>(yaml).unwrap_err();
        let text = yaml_problem(&e).to_string();
        assert!(
            text.contains("presets[0].prebuilds: unknown field `instance`"),
            "{text}"
        );
    }
}
