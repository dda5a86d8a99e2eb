//! Bearer tokens: every `/api/v1` request names its token in `Authorization: Bearer <secret>`;
//! the token is looked up by the SHA-256 of the secret on each request (the API keeps no state, so
//! a revoke takes effect on the next request on every replica). No or an unknown or revoked token
//! is a 401; a token whose role may not do what the request does is a 403 ([`Caller::require`],
//! the rule being `prebuilds_core::ApiRole::may`).

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};
use prebuilds_core::{ApiAction, ApiRole};
use prebuilds_store::api_tokens;

use crate::{app::AppState, problem::Problem};

/// Who is calling: the token's name (the audit log's actor) and role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: ApiRole,
}

impl Caller {
    /// A 403 unless the caller's role may perform `action`.
    pub fn require(&self, action: ApiAction) -> Result<(), Problem> {
        if self.role.may(action) {
            return Ok(());
        }
        let needed = match action {
            ApiAction::Read => "any role",
            ApiAction::Claim => "role claimer or admin",
            ApiAction::Administer => "role admin",
        };
        Err(Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token '{}' has role {}; this request needs {needed}",
                self.name, self.role
            ),
        ))
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(Problem::unauthorized(
                "no token: send `Authorization: Bearer <token>` (made with `prebuildsctl token create`)",
            ));
        };
        let secret = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header is not `Bearer <token>`")
            })?;
        let client = state.client().await?;
        let caller = api_tokens::authenticate(&client, secret)
            .await
            .map_err(|e| state.database_problem(e))?;
        match caller {
            Some(c) => Ok(Caller {
                name: c.name,
                role: c.role,
            }),
            // The same answer for unknown and revoked tokens: it tells a guesser nothing.
            None => Err(Problem::unauthorized("the token is unknown or revoked")),
        }
    }
}
