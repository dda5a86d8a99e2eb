//! Publisher allow-lists (docs/messages.md "Trust"): which broker users may publish a kind of message.
//!
//! RabbitMQ validates the AMQP `user_id` property: a publish whose `user_id` differs from the
//! connection's authenticated user is refused by the broker (`PRECONDITION_FAILED`). A consumer can
//! therefore trust a `user_id` it receives, and an allow-list of broker user names decides who may
//! send claim requests (`PREBUILDS_CLAIM_PUBLISHERS`) and provisioner events
//! (`PREBUILDS_PROVISIONER_PUBLISHERS`). A message without the property cannot be attributed and is
//! refused too. Our own publishers always set it ([`super::Broker::user`]).

use std::{collections::BTreeSet, fmt};

use super::consumer::Incoming;

/// Metric and dead-letter class of a message refused by an allow-list.
pub const FORBIDDEN_PUBLISHER: &str = "forbidden_publisher";

/// The broker users allowed to publish one kind of message; empty = anyone (the list is not set).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Publishers {
    allowed: BTreeSet<String>,
    /// The variable that set the list, for error messages.
    variable: &'static str,
}

impl fmt::Debug for Publishers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.allowed).finish()
    }
}

impl Publishers {
    /// Parses a comma-separated list of broker user names (blanks ignored); `variable` names its
    /// setting in refusals. An empty list allows anyone.
    pub fn parse(list: &str, variable: &'static str) -> Publishers {
        Publishers {
            allowed: list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            variable,
        }
    }

    /// Whether a list is set (otherwise every publisher is accepted).
    pub fn is_enforced(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// `Ok` when `message` may be accepted; otherwise why not, in a sentence that says what to do.
    pub fn check(&self, message: &Incoming) -> Result<(), String> {
        if !self.is_enforced() {
            return Ok(());
        }
        match message.user_id.as_deref() {
            Some(user) if self.allowed.contains(user) => Ok(()),
            Some(user) => Err(format!(
                "broker user {user:?} may not publish this message: it is not in {} ({}); add it \
                 there if it should",
                self.variable,
                self.names()
            )),
            None => Err(format!(
                "the message has no user_id property, so its publisher cannot be checked against {} \
                 ({}); publish with user_id set to the connection's broker user",
                self.variable,
                self.names()
            )),
        }
    }

    fn names(&self) -> String {
        self.allowed.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(user: Option<&str>) -> Incoming {
        Incoming {
            body: vec![],
            routing_key: String::new(),
            redelivered: false,
            message_id: None,
            reply_to: None,
            correlation_id: None,
            content_type: None,
            user_id: user.map(str::to_owned),
            delivery_count: 0,
        }
    }

    #[test]
    fn an_unset_list_accepts_anyone() {
        let open = Publishers::parse(" , ", "PREBUILDS_CLAIM_PUBLISHERS");
        assert!(!open.is_enforced());
        assert!(open.check(&from(None)).is_ok());
        assert!(open.check(&from(Some("anyone"))).is_ok());
    }

    #[test]
    fn a_set_list_accepts_only_its_users() {
        let list = Publishers::parse("prebuilds-claims, api", "PREBUILDS_CLAIM_PUBLISHERS");
        assert!(list.check(&from(Some("prebuilds-claims"))).is_ok());
        assert!(list.check(&from(Some("api"))).is_ok());
        let refused = list.check(&from(Some("mallory"))).unwrap_err();
        assert!(refused.contains("\"mallory\"") && refused.contains("PREBUILDS_CLAIM_PUBLISHERS"));
        let anonymous = list.check(&from(None)).unwrap_err();
        assert!(anonymous.contains("no user_id"), "{anonymous}");
    }
}
