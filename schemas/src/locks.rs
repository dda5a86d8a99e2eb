//! Every PostgreSQL advisory-lock key the system takes, named in one place.
//!
//! Advisory locks share one key space per database (bigint keys): two uses that picked the same
//! key by accident would serialise each other (the per-entity keys) or, worse, let one process
//! think it holds a lock another holds for something else (the fixed keys). So every key is
//! declared here and every user takes it from here; `tests` below checks the fixed keys are
//! distinct and keep their values (a changed value would let an old and a new binary both hold
//! "the" lock during a rolling upgrade).
//!
//! Two kinds:
//! - fixed keys ([`Fixed`]): one lock for one purpose, ASCII bytes of a short name so they are
//!   recognisable in `pg_locks` (`classid`/`objid` are its high and low halves);
//! - per-entity keys ([`entity`]): a UUID folded to 64 bits, for presets (the reconcile lock) and
//!   claim requests (a request's deliveries run one at a time). A fold may collide with another
//!   entity's or, with negligible probability, a fixed key: that only serialises the two holders
//!   needlessly, never lets two holders of one lock in — every entity lock is transaction-level.
//!
//! The terraform state backend's locks are keyed in SQL by `hashtext` of the state's name
//! ([`TERRAFORM_STATE_KEY_SQL`]): values in the 32-bit range, so they never equal a fixed key.

use uuid::Uuid;

/// The fixed advisory-lock keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    /// Serialises migration runs (session-level, on the migrating connection): "prebmigr".
    Migrations,
    /// The scheduler's leader election (session-level, held while leading); the default of
    /// `PREBUILDS_LEADER_LOCK_KEY`: "prbsched".
    SchedulerLeader,
    /// The global in-flight capacity of creates (transaction-level): "prebuild".
    Capacity,
    /// Serialises creating the migrated template database of the test suite (session-level, on
    /// the test server's `postgres` database): "testtmpl".
    TestTemplate,
}

impl Fixed {
    /// Every fixed key, for the distinctness check.
    pub const ALL: [Fixed; 4] = [
        Fixed::Migrations,
        Fixed::SchedulerLeader,
        Fixed::Capacity,
        Fixed::TestTemplate,
    ];

    /// The key passed to `pg_advisory_*`.
    pub const fn key(self) -> i64 {
        match self {
            Fixed::Migrations => 0x7072_6562_6d69_6772,
            Fixed::SchedulerLeader => 0x7072_6273_6368_6564,
            Fixed::Capacity => 0x7072_6562_7569_6c64,
            Fixed::TestTemplate => 0x7465_7374_746d_706c,
        }
    }
}

/// The transaction-level lock key of an entity (a preset, a claim request): its UUID folded to
/// 64 bits.
pub fn entity(id: Uuid) -> i64 {
    let (hi, lo) = id.as_u64_pair();
    (hi ^ lo) as i64
}

/// The SQL expression of a terraform state's lock key; `$1` is the state's name.
pub const TERRAFORM_STATE_KEY_SQL: &str = "hashtext('prebuilds terraform state ' || $1::text)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_keys_are_distinct_and_outside_the_terraform_state_range() {
        for (i, a) in Fixed::ALL.iter().enumerate() {
            for b in &Fixed::ALL[i + 1..] {
                assert_ne!(a.key(), b.key(), "{a:?} and {b:?} share a key");
            }
            // hashtext answers an int4: a fixed key above that range never meets a state lock.
            assert!(i64::from(i32::MAX) < a.key(), "{a:?}");
        }
    }

    /// Every advisory-lock call in the workspace's Rust and SQL takes its key from outside the
    /// statement (a bind parameter, a key column, or this module's expression): a literal key
    /// written into a statement would bypass the registry.
    #[test]
    fn every_advisory_lock_call_takes_its_key_from_the_registry() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if !name.starts_with('.') && name != "target" {
                        dirs.push(path);
                    }
                } else if name.ends_with(".rs") || name.ends_with(".sql") {
                    files.push(path);
                }
            }
        }
        let this = std::path::Path::new(file!()).file_name().unwrap();
        let mut calls = 0;
        let mut bad = Vec::new();
        for file in files.iter().filter(|f| f.file_name() != Some(this)) {
            let text = std::fs::read_to_string(file).unwrap();
            for (at, _) in text.match_indices("pg_") {
                let rest = &text[at..];
                let Some(open) = rest.find('(') else { continue };
                let function = &rest[..open];
                if !function.contains("advisory_") || function.contains(char::is_whitespace) {
                    continue;
                }
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line = text[line_start..at].trim_start();
                if line.starts_with("//") || line.starts_with("--") {
                    continue; // prose about a lock, not a call
                }
                calls += 1;
                let argument = rest[open + 1..].trim_start();
                let from_outside = argument.starts_with('$')
                    || argument.starts_with("($")
                    || argument.starts_with("{}")
                    || argument.starts_with("b.lock_key");
                if !from_outside {
                    bad.push(format!(
                        "{}: {}",
                        file.display(),
                        &rest[..open + 20.min(rest.len() - open)]
                    ));
                }
            }
        }
        assert!(
            calls >= 8,
            "found only {calls} advisory-lock calls: is the scan broken?"
        );
        assert!(
            bad.is_empty(),
            "advisory locks with keys written in place: {bad:#?}"
        );
    }

    #[test]
    fn keys_keep_their_values_across_releases() {
        // Changing one lets an old and a new binary both hold "the" lock during an upgrade.
        let names: Vec<(Fixed, &[u8; 8])> = vec![
            (Fixed::Migrations, b"prebmigr"),
            (Fixed::SchedulerLeader, b"prbsched"),
            (Fixed::Capacity, b"prebuild"),
            (Fixed::TestTemplate, b"testtmpl"),
        ];
        for (fixed, name) in names {
            assert_eq!(fixed.key(), i64::from_be_bytes(*name), "{fixed:?}");
        }
        let id = Uuid::from_u64_pair(0x0123_4567_89ab_cdef, 0x1111_2222_3333_4444);
        assert_eq!(
            entity(id),
            (0x0123_4567_89ab_cdef_u64 ^ 0x1111_2222_3333_4444) as i64
        );
    }
}
