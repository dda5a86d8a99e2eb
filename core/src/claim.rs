//! Preset matching for claim requests that name a template but no preset.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A preset of the template's active version with its parameter values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetCandidate {
    pub id: Uuid,
    /// The preset's name (for telling a user what could have matched).
    pub name: String,
    pub parameters: Vec<(String, String)>,
    /// Marked `default: true` in the template file (at most one per version).
    #[serde(default)]
    pub is_default: bool,
}

/// The preset a claim request without `preset_id` asks for.
///
/// 0. A request with no parameters at all gets the version's default preset, when it has one
///    (the template says which preset a plain "give me one" means). Otherwise, or with any
///    parameter given, matching proceeds:
/// 1. Read the request as a map over the template parameters' `defaults`: a parameter the request
///    leaves out takes its default; a name given twice takes its last value (as form values do).
/// 2. A candidate matches when every one of its parameters is present in that map with an equal
///    value (a preset without parameters matches any request).
/// 3. The match with the most parameters wins; ties go to the smallest id, so the answer does not
///    depend on candidate order (Coder leaves ties arbitrary).
///
/// `None` means no preset matches (the claim's miss reason `no_matching_preset`).
pub fn match_preset(
    candidates: &[PresetCandidate],
    defaults: &[(String, String)],
    requested: &[(String, String)],
) -> Option<Uuid> {
    if requested.is_empty() {
        if let Some(default) = candidates.iter().find(|c| c.is_default) {
            return Some(default.id);
        }
    }
    let values: HashMap<&str, &str> = defaults
        .iter()
        .chain(requested)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    candidates
        .iter()
        .filter(|c| {
            c.parameters
                .iter()
                .all(|(name, value)| values.get(name.as_str()) == Some(&value.as_str()))
        })
        .max_by(|a, b| {
            a.parameters
                .len()
                .cmp(&b.parameters.len())
                // Reversed so that, among equals, the smallest id is the maximum.
                .then_with(|| b.id.cmp(&a.id))
        })
        .map(|c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cand(id: u128, p: &[(&str, &str)]) -> PresetCandidate {
        PresetCandidate {
            id: Uuid::from_u128(id),
            name: format!("p{id}"),
            parameters: params(p),
            is_default: false,
        }
    }

    /// (name, candidates, template defaults, request, expected id).
    type Row = (
        &'static str,
        Vec<PresetCandidate>,
        Vec<(String, String)>,
        Vec<(String, String)>,
        Option<u128>,
    );

    #[test]
    fn matching() {
        let small = cand(3, &[("cpus", "2")]);
        let large = cand(2, &[("cpus", "8"), ("region", "eu")]);
        let large_us = cand(4, &[("cpus", "8"), ("region", "us")]);
        let any = cand(9, &[]);
        let all = vec![small.clone(), large.clone(), large_us.clone(), any.clone()];
        let no_defaults = vec![];
        let region_eu = params(&[("region", "eu")]);

        let cases: Vec<Row> = vec![
            (
                "exact two-parameter match",
                all.clone(),
                no_defaults.clone(),
                params(&[("cpus", "8"), ("region", "eu")]),
                Some(2),
            ),
            (
                "extra request parameters are fine",
                all.clone(),
                no_defaults.clone(),
                params(&[("cpus", "2"), ("disk", "10")]),
                Some(3),
            ),
            (
                "value mismatch falls back to the parameterless preset",
                all.clone(),
                no_defaults.clone(),
                params(&[("cpus", "4")]),
                Some(9),
            ),
            (
                "missing parameter without a default does not match",
                vec![large.clone()],
                no_defaults.clone(),
                params(&[("cpus", "8")]),
                None,
            ),
            (
                "a missing parameter takes its default",
                vec![large.clone(), large_us.clone()],
                region_eu.clone(),
                params(&[("cpus", "8")]),
                Some(2),
            ),
            (
                "a given value overrides the default",
                vec![large.clone(), large_us.clone()],
                region_eu.clone(),
                params(&[("cpus", "8"), ("region", "us")]),
                Some(4),
            ),
            (
                "an overridden default no preset has does not match",
                vec![large.clone()],
                region_eu.clone(),
                params(&[("cpus", "8"), ("region", "ap")]),
                None,
            ),
            (
                "defaults alone can match",
                vec![large.clone()],
                params(&[("cpus", "8"), ("region", "eu")]),
                vec![],
                Some(2),
            ),
            (
                "a default makes the more specific preset win",
                vec![small.clone(), cand(1, &[("cpus", "2"), ("region", "eu")])],
                region_eu.clone(),
                params(&[("cpus", "2")]),
                Some(1),
            ),
            (
                "no candidates",
                vec![],
                region_eu.clone(),
                params(&[("cpus", "8")]),
                None,
            ),
            (
                "empty request only matches parameterless",
                vec![small.clone(), any.clone()],
                no_defaults.clone(),
                vec![],
                Some(9),
            ),
            (
                "last duplicate wins",
                vec![small.clone()],
                no_defaults.clone(),
                params(&[("cpus", "2"), ("cpus", "4")]),
                None,
            ),
            (
                "tie goes to the smallest id",
                vec![
                    cand(7, &[("a", "1")]),
                    cand(5, &[("b", "2")]),
                    cand(6, &[("a", "1")]),
                ],
                no_defaults.clone(),
                params(&[("a", "1"), ("b", "2")]),
                Some(5),
            ),
        ];
        for (name, candidates, defaults, request, want) in cases {
            assert_eq!(
                match_preset(&candidates, &defaults, &request),
                want.map(Uuid::from_u128),
                "{name}"
            );
            let mut reversed = candidates.clone();
            reversed.reverse();
            assert_eq!(
                match_preset(&reversed, &defaults, &request),
                want.map(Uuid::from_u128),
                "{name} (reversed)"
            );
        }
    }

    #[test]
    fn a_request_without_parameters_gets_the_default_preset() {
        let mut fixed = cand(1, &[("cpus", "8")]);
        let mut other = cand(2, &[("cpus", "2")]);
        let defaults = params(&[("cpus", "2")]);
        // No default: ordinary matching (the parameter's default picks preset 2).
        assert_eq!(
            match_preset(&[fixed.clone(), other.clone()], &defaults, &[]),
            Some(Uuid::from_u128(2))
        );
        fixed.is_default = true;
        let both = [fixed.clone(), other.clone()];
        assert_eq!(
            match_preset(&both, &defaults, &[]),
            Some(Uuid::from_u128(1))
        );
        // Any parameter given: matching, not the default.
        assert_eq!(
            match_preset(&both, &defaults, &params(&[("cpus", "2")])),
            Some(Uuid::from_u128(2))
        );
        // No default and nothing matches: still no match.
        other.parameters = params(&[("cpus", "4")]);
        fixed.is_default = false;
        assert_eq!(match_preset(&[fixed, other], &[], &[]), None);
    }
}
