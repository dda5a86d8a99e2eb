//! Preset matching for claim requests that name a template but no preset.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A preset of the template's active version with its parameter values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetCandidate {
    pub id: Uuid,
    pub parameters: Vec<(String, String)>,
}

/// The preset a claim request without `preset_id` asks for.
///
/// 1. Read the request as a map; a name given twice takes its last value (as form values do).
/// 2. A candidate matches when every one of its parameters is present in the request with an
///    equal value (a preset without parameters matches any request).
/// 3. The match with the most parameters wins; ties go to the smallest id, so the answer does not
///    depend on candidate order (Coder leaves ties arbitrary).
pub fn match_preset(
    candidates: &[PresetCandidate],
    requested: &[(String, String)],
) -> Option<Uuid> {
    let requested: HashMap<&str, &str> = requested
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    candidates
        .iter()
        .filter(|c| {
            c.parameters
                .iter()
                .all(|(name, value)| requested.get(name.as_str()) == Some(&value.as_str()))
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
            parameters: params(p),
        }
    }

    /// (name, candidates, request, expected id).
    type Row = (
        &'static str,
        Vec<PresetCandidate>,
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

        let cases: Vec<Row> = vec![
            (
                "exact two-parameter match",
                all.clone(),
                params(&[("cpus", "8"), ("region", "eu")]),
                Some(2),
            ),
            (
                "extra request parameters are fine",
                all.clone(),
                params(&[("cpus", "2"), ("disk", "10")]),
                Some(3),
            ),
            (
                "value mismatch falls back to the parameterless preset",
                all.clone(),
                params(&[("cpus", "4")]),
                Some(9),
            ),
            (
                "missing parameter does not match",
                vec![large.clone()],
                params(&[("cpus", "8")]),
                None,
            ),
            ("no candidates", vec![], params(&[("cpus", "8")]), None),
            (
                "empty request only matches parameterless",
                vec![small.clone(), any.clone()],
                vec![],
                Some(9),
            ),
            (
                "last duplicate wins",
                vec![small.clone()],
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
                params(&[("a", "1"), ("b", "2")]),
                Some(5),
            ),
        ];
        for (name, candidates, request, want) in cases {
            assert_eq!(
                match_preset(&candidates, &request),
                want.map(Uuid::from_u128),
                "{name}"
            );
            let mut reversed = candidates.clone();
            reversed.reverse();
            assert_eq!(
                match_preset(&reversed, &request),
                want.map(Uuid::from_u128),
                "{name} (reversed)"
            );
        }
    }
}
