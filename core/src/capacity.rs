//! Capacity-aware refill: how many of a preset's planned creates may start now, given caps on
//! in-flight prebuild create jobs (`PREBUILDS_MAX_INFLIGHT_JOBS` globally,
//! `PREBUILDS_MAX_INFLIGHT_PER_PRESET` per preset).
//!
//! Only creates are limited: deletes, cancels and claim builds never wait for capacity.
//!
//! **Fairness rule.** When the global cap binds, the remaining capacity is shared among the presets
//! that want it: a preset may start at most `max(1, remaining / (others_waiting + 1))` creates in
//! one cycle, where `others_waiting` counts the *other* presets recorded as held back. A held-back
//! preset is recorded and re-queued (round-robin, oldest wait first) as capacity frees, so every
//! preset makes progress and no single large preset can take the whole budget while others wait.
//!
//! **Bounded transactions.** Independently of in-flight jobs, one reconcile transaction makes at
//! most `PREBUILDS_MAX_CREATES_PER_PASS` creates over all the presets it covers ([`CreateBudget`]),
//! so a pool of hundreds never fills in one long transaction holding its preset's lock. A preset
//! left with creates to make asks for a follow-up pass at once; each pass sees the previous one's
//! creates as starting, so the pool fills in steps of at most the budget.

use serde::{Deserialize, Serialize};

/// What the shell counted, under the global capacity lock, for one preset's creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// Global cap (0 = unlimited).
    pub max_inflight: u32,
    /// In-flight prebuild create jobs across all presets.
    pub inflight: u32,
    /// Per-preset cap (0 = unlimited).
    pub max_per_preset: u32,
    /// This preset's in-flight prebuild create jobs.
    pub preset_inflight: u32,
    /// Other presets currently held back for capacity.
    pub others_waiting: u32,
}

/// How many of `requested` creates may start now (see the module doc):
/// 1. per-preset room: `max_per_preset − preset_inflight` (when capped);
/// 2. global room: `max_inflight − inflight` (when capped); none → 0;
/// 3. fair share of the global room: `max(1, room / (others_waiting + 1))`.
pub fn creates_allowed(requested: u32, c: &Capacity) -> u32 {
    let mut allowed = requested;
    if c.max_per_preset > 0 {
        allowed = allowed.min(c.max_per_preset.saturating_sub(c.preset_inflight));
    }
    if c.max_inflight > 0 {
        let room = c.max_inflight.saturating_sub(c.inflight);
        let share = (room / c.others_waiting.saturating_add(1)).max(1).min(room);
        allowed = allowed.min(share);
    }
    allowed
}

/// The creates one reconcile transaction may still make (`PREBUILDS_MAX_CREATES_PER_PASS`; see
/// the module doc). Presets take from it in the order the transaction plans them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateBudget {
    /// `None` = unlimited.
    remaining: Option<u32>,
}

impl CreateBudget {
    /// A fresh budget for one transaction; `max_per_pass` 0 means unlimited.
    pub fn new(max_per_pass: u32) -> Self {
        CreateBudget {
            remaining: (max_per_pass > 0).then_some(max_per_pass),
        }
    }

    /// Takes up to `wanted` creates: returns how many may be made in this transaction. When it is
    /// fewer than `wanted`, the caller leaves the rest to a follow-up pass.
    pub fn take(&mut self, wanted: u32) -> u32 {
        match &mut self.remaining {
            None => wanted,
            Some(remaining) => {
                let granted = wanted.min(*remaining);
                *remaining -= granted;
                granted
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_shared_by_the_presets_of_one_transaction() {
        // (max per pass, wanted by each preset in order, granted to each).
        let cases: [(u32, &[u32], &[u32]); 5] = [
            (0, &[500, 7], &[500, 7]),
            (50, &[7], &[7]),
            (50, &[120], &[50]),
            (50, &[30, 30, 30], &[30, 20, 0]),
            (1, &[0, 3, 1], &[0, 1, 0]),
        ];
        for (max, wanted, want) in cases {
            let mut budget = CreateBudget::new(max);
            let granted: Vec<u32> = wanted.iter().map(|w| budget.take(*w)).collect();
            assert_eq!(granted, want, "max {max}, wanted {wanted:?}");
        }
    }

    #[test]
    fn unlimited_by_default_and_capped_when_set() {
        assert_eq!(creates_allowed(7, &Capacity::default()), 7);
        let c = Capacity {
            max_inflight: 5,
            inflight: 3,
            ..Capacity::default()
        };
        assert_eq!(creates_allowed(7, &c), 2);
        assert_eq!(creates_allowed(7, &Capacity { inflight: 5, ..c }), 0);
        // Shared with 3 other waiting presets: 2 / 4 → at least 1.
        assert_eq!(
            creates_allowed(
                7,
                &Capacity {
                    others_waiting: 3,
                    ..c
                }
            ),
            1
        );
        // 20 free, 3 others waiting: 20 / 4 = 5.
        let big = Capacity {
            max_inflight: 30,
            inflight: 10,
            others_waiting: 3,
            ..Capacity::default()
        };
        assert_eq!(creates_allowed(7, &big), 5);
        let per = Capacity {
            max_per_preset: 2,
            preset_inflight: 1,
            ..Capacity::default()
        };
        assert_eq!(creates_allowed(7, &per), 1);
    }
}
