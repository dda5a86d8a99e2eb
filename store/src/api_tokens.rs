//! API tokens (`api_tokens`): made and revoked by `prebuildsctl token …`, checked by
//! `prebuilds-api` on every request. The secret is shown once at creation and never stored: the
//! table keeps its SHA-256, and a request's bearer token is looked up by the hash of what it
//! presents. A revoked token is kept (its name stays the actor of its audit rows) and refused.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use prebuilds_core::ApiRole;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Every secret starts with this, so a leaked one is recognisable (secret scanners, logs).
pub const SECRET_PREFIX: &str = "pbt_";

/// One token as listed (never with its secret).
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A live token presented to the API: who is calling, with which role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: ApiRole,
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a token named '{0}' already exists (names are never reused, also after a revoke); choose another name")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// A new secret: the prefix and 256 random bits in lowercase base32 (no padding).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let encoded = data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase();
    format!("{SECRET_PREFIX}{encoded}")
}

/// What `api_tokens.secret_hash` holds for `secret`.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates a token and returns it with its secret (the only time the secret exists in full).
pub async fn create<C: GenericClient>(
    c: &C,
    name: &str,
    role: ApiRole,
) -> Result<(Token, String), CreateError> {
    let secret = new_secret();
    let row = c
        .query_one(
            include_str!("sql/api_token_create.sql"),
            &[
                &Uuid::new_v4(),
                &name,
                &role.as_str(),
                &secret_hash(&secret),
            ],
        )
        .await;
    match row {
        Ok(row) => Ok((from_row(&row), secret)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Err(CreateError::NameTaken(name.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Every token, oldest first.
pub async fn list<C: GenericClient>(c: &C) -> Result<Vec<Token>, tokio_postgres::Error> {
    Ok(c.query(include_str!("sql/api_token_list.sql"), &[])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Revokes the token `name`: `None` when there is none, `Some(false)` when it was already revoked.
pub async fn revoke<C: GenericClient>(
    c: &C,
    name: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let revoked = c
        .execute(include_str!("sql/api_token_revoke.sql"), &[&name])
        .await?;
    if revoked > 0 {
        return Ok(Some(true));
    }
    let exists = c
        .query_opt(include_str!("sql/api_token_exists.sql"), &[&name])
        .await?
        .is_some();
    Ok(exists.then_some(false))
}

/// The live (not revoked) token whose secret is `secret`, if any.
pub async fn authenticate<C: GenericClient>(
    c: &C,
    secret: &str,
) -> Result<Option<Caller>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            include_str!("sql/api_token_authenticate.sql"),
            &[&secret_hash(secret)],
        )
        .await?;
    Ok(row.and_then(|r| {
        let role: String = r.get("role");
        Some(Caller {
            name: r.get("name"),
            // The table's CHECK admits only the three roles; an unknown one authenticates nobody.
            role: role.parse().ok()?,
        })
    }))
}

fn from_row(r: &tokio_postgres::Row) -> Token {
    Token {
        id: r.get("id"),
        name: r.get("name"),
        role: r.get("role"),
        created_at: r.get("created_at"),
        revoked_at: r.get("revoked_at"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_prefixed_and_hashed_to_32_bytes() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert_eq!(a.len(), SECRET_PREFIX.len() + 52);
        assert_eq!(secret_hash(&a).len(), 32);
        assert_eq!(secret_hash(&a), secret_hash(&a));
        assert_ne!(secret_hash(&a), secret_hash(&b));
    }
}
