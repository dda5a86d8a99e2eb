//! Build-parameter validation for prebuild creates (docs/reconciliation.md "Backoff and hard limit"): a preset can
//! only produce a valid build when every required template parameter without a default gets a
//! value from the preset, and the preset sets no parameter the template does not declare. Either
//! problem is permanent for the preset (it becomes `validation_failed`); retrying cannot help.

use std::collections::BTreeMap;

/// A parameter declared by a template version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateParameter {
    pub name: String,
    pub required: bool,
    pub default_value: Option<String>,
}

/// Why a preset cannot produce a valid build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterProblem {
    #[error("required parameter {0:?} has no default and the preset sets no value for it")]
    MissingRequired(String),
    #[error("the preset sets parameter {0:?}, which the template version does not declare")]
    Unknown(String),
}

/// The parameter values of a prebuild's create build: exactly the preset's values, after checking
/// they make a valid build. Problems are reported in a stable order (missing first, by name).
pub fn build_parameters(
    template: &[TemplateParameter],
    preset: &[(String, String)],
) -> Result<Vec<(String, String)>, ParameterProblem> {
    let values: BTreeMap<&str, &str> = preset
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut declared: Vec<&TemplateParameter> = template.iter().collect();
    declared.sort_by(|a, b| a.name.cmp(&b.name));
    for p in &declared {
        if p.required && p.default_value.is_none() && !values.contains_key(p.name.as_str()) {
            return Err(ParameterProblem::MissingRequired(p.name.clone()));
        }
    }
    for name in values.keys() {
        if !declared.iter().any(|p| p.name == *name) {
            return Err(ParameterProblem::Unknown((*name).to_owned()));
        }
    }
    Ok(values
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, required: bool, default: Option<&str>) -> TemplateParameter {
        TemplateParameter {
            name: name.into(),
            required,
            default_value: default.map(Into::into),
        }
    }

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn preset_values_satisfying_the_template_are_the_build_parameters() {
        let template = [
            param("cpus", true, None),
            param("region", false, Some("eu")),
        ];
        let got = build_parameters(&template, &set(&[("region", "us"), ("cpus", "8")])).unwrap();
        assert_eq!(got, set(&[("cpus", "8"), ("region", "us")]));
    }

    #[test]
    fn a_required_parameter_with_a_default_needs_no_preset_value() {
        let template = [param("cpus", true, Some("2"))];
        assert_eq!(build_parameters(&template, &[]).unwrap(), vec![]);
    }

    #[test]
    fn a_missing_required_parameter_is_a_problem() {
        let template = [param("cpus", true, None), param("disk", true, None)];
        assert_eq!(
            build_parameters(&template, &set(&[("disk", "10")])),
            Err(ParameterProblem::MissingRequired("cpus".into()))
        );
    }

    #[test]
    fn an_unknown_preset_parameter_is_a_problem() {
        let template = [param("cpus", false, None)];
        let err = build_parameters(&template, &set(&[("gpus", "1")])).unwrap_err();
        assert_eq!(err, ParameterProblem::Unknown("gpus".into()));
        assert!(err.to_string().contains("does not declare"));
    }
}
