//! Who may do what through the HTTP API: the three token roles and the one rule that says which
//! role may perform which kind of request ([`ApiRole::may`]), plus how an `Idempotency-Key`
//! becomes a claim request id ([`request_id_for_key`]). Pure, so the API and its tests share one
//! definition.

use std::{fmt, str::FromStr};

use uuid::Uuid;

/// The role of an API token (stored in `api_tokens.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiRole {
    /// Everything: reads, claims and changes (pause, resume, invalidate, settings).
    Admin,
    /// Reads and claims: what a platform front end needs.
    Claimer,
    /// Reads only: dashboards, portals.
    Viewer,
}

/// What a request does, as far as permissions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAction {
    /// Reads state (presets, templates, jobs).
    Read,
    /// Claims a prebuild for a user.
    Claim,
    /// Changes how the system runs (pause, resume, invalidate, settings).
    Administer,
}

impl ApiRole {
    pub const ALL: [ApiRole; 3] = [ApiRole::Admin, ApiRole::Claimer, ApiRole::Viewer];

    /// Whether a token of this role may perform `action`. Roles are nested: viewer ⊂ claimer ⊂
    /// admin, so a claimer never administers and a viewer never changes anything.
    pub fn may(self, action: ApiAction) -> bool {
        match action {
            ApiAction::Read => true,
            ApiAction::Claim => matches!(self, ApiRole::Admin | ApiRole::Claimer),
            ApiAction::Administer => self == ApiRole::Admin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Admin => "admin",
            ApiRole::Claimer => "claimer",
            ApiRole::Viewer => "viewer",
        }
    }
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `admin`, `claimer`, `viewer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role '{0}' (expected admin, claimer or viewer)")]
pub struct UnknownRole(pub String);

impl FromStr for ApiRole {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ApiRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// Namespace of the request ids made from keys that are not UUIDs (a fixed, random UUID).
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_3c2e_9a4d_4e57_8d0b_2f6a_71c4_e953);

/// The claim request id of an `Idempotency-Key`: the key itself when it is a UUID (so a client may
/// use the ids it already has, and a retry through the AMQP RPC with that id meets the same
/// claim), else a name-based UUID of the key — the same key always gives the same id.
pub fn request_id_for_key(key: &str) -> Uuid {
    Uuid::parse_str(key).unwrap_or_else(|_| Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_nested() {
        let table = [
            (ApiRole::Admin, [true, true, true]),
            (ApiRole::Claimer, [true, true, false]),
            (ApiRole::Viewer, [true, false, false]),
        ];
        for (role, allowed) in table {
            let actions = [ApiAction::Read, ApiAction::Claim, ApiAction::Administer];
            for (action, expected) in actions.into_iter().zip(allowed) {
                assert_eq!(role.may(action), expected, "{role} {action:?}");
            }
        }
    }

    #[test]
    fn roles_round_trip_and_unknown_is_refused() {
        for role in ApiRole::ALL {
            assert_eq!(role.as_str().parse::<ApiRole>(), Ok(role));
        }
        assert!("root".parse::<ApiRole>().is_err());
        assert!("Admin".parse::<ApiRole>().is_err());
    }

    #[test]
    fn idempotency_keys() {
        let id = Uuid::new_v4();
        assert_eq!(request_id_for_key(&id.to_string()), id);
        assert_eq!(
            request_id_for_key("order-42"),
            request_id_for_key("order-42")
        );
        assert_ne!(
            request_id_for_key("order-42"),
            request_id_for_key("order-43")
        );
    }
}
