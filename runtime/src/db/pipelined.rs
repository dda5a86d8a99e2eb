//! A transaction whose `BEGIN` travels with its first statements and whose `COMMIT` travels with
//! its last ones: two round trips of latency fewer than tokio-postgres's `Transaction`, which
//! awaits each of them alone. The claim RPC is the user: its latency is mostly round trips.
//!
//! Statements go out in the order they are given, on one connection, and PostgreSQL runs them in
//! that order. Only prepared [`Statement`]s are accepted: a statement given as SQL text would need
//! a parse round trip first, and the `COMMIT` behind it would overtake it.
//!
//! A transaction that may still be open when this value is dropped (an error before the end, or
//! the caller's future cancelled mid-flight) takes its connection out of the pool and closes it:
//! PostgreSQL then rolls it back, and no later user of the pool inherits an open transaction.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use deadpool_postgres::{Client, Object};
use futures::future::{join, join_all, try_join_all};
use tokio_postgres::{types::ToSql, Row, Statement};

use super::DbError;

/// One statement with its parameters.
pub type Step<'a> = (&'a Statement, &'a [&'a (dyn ToSql + Sync)]);

/// See the module documentation.
#[derive(Debug)]
pub struct PipelinedTransaction {
    client: Option<Client>,
    /// `BEGIN` may have been sent and no `COMMIT`/`ROLLBACK` is known to have finished.
    open: AtomicBool,
}

impl PipelinedTransaction {
    /// Wraps a pooled connection; nothing is sent yet.
    pub fn new(client: Client) -> Self {
        Self {
            client: Some(client),
            open: AtomicBool::new(false),
        }
    }

    /// The connection, for statements in between (prepare them with `prepare_cached`).
    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client is only taken on drop")
    }

    /// Sends `BEGIN` and `first` in one round trip and returns each statement's rows.
    pub async fn begin_with(&self, first: &[Step<'_>]) -> Result<Vec<Vec<Row>>, DbError> {
        check_encodable(first)?;
        // Open from the moment BEGIN may have been sent: a failure or cancellation from here on
        // leaves the server's state unknown.
        self.open.store(true, Ordering::Relaxed);
        let client = self.client();
        let begin = client.batch_execute("BEGIN");
        let statements = try_join_all(first.iter().map(|(s, p)| client.query(*s, p)));
        let ((), rows) = futures::try_join!(begin, statements)?;
        Ok(rows)
    }

    /// Sends `last` and `COMMIT` in one round trip; returns each statement's row count.
    ///
    /// If a statement fails on the server, PostgreSQL turns the `COMMIT` behind it into a
    /// rollback: the error is returned and nothing was written. Failures on this side (parameters
    /// that don't encode) would let the statements after them commit without them, so every
    /// step is checked before anything is sent.
    pub async fn commit_with(&self, last: &[Step<'_>]) -> Result<Vec<u64>, DbError> {
        check_encodable(last)?;
        let client = self.client();
        // `join`, not `try_join`: the COMMIT's own answer says whether the block is over, so it
        // is awaited even when a statement before it has already failed.
        let (counts, commit) = join(
            join_all(last.iter().map(|(s, p)| client.execute(*s, p))),
            client.batch_execute("COMMIT"),
        )
        .await;
        // An answer from the server, success or error, means it ended the block.
        if commit
            .as_ref()
            .map_or_else(|e| e.as_db_error().is_some(), |()| true)
        {
            self.open.store(false, Ordering::Relaxed);
        }
        let counts = counts.into_iter().collect::<Result<Vec<_>, _>>()?;
        commit?;
        Ok(counts)
    }

    /// Ends the transaction without writing anything (nothing to do when no block is open).
    pub async fn rollback(&self) -> Result<(), DbError> {
        if self.open.load(Ordering::Relaxed) {
            self.client().batch_execute("ROLLBACK").await?;
            self.open.store(false, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Encodes every step's parameters the way tokio-postgres will (count, then each value for its
/// declared type), so that no step can fail on this side once the first one is sent.
fn check_encodable(steps: &[Step<'_>]) -> Result<(), DbError> {
    let mut scratch = BytesMut::new();
    for (n, (statement, params)) in steps.iter().enumerate() {
        let types = statement.params();
        if types.len() != params.len() {
            return Err(DbError::Unexpected(format!(
                "step {n} of a pipelined transaction has {} parameters; its statement takes {}",
                params.len(),
                types.len()
            )));
        }
        for (param, ty) in params.iter().zip(types) {
            scratch.clear();
            param.to_sql_checked(ty, &mut scratch).map_err(|e| {
                DbError::Unexpected(format!(
                    "step {n} of a pipelined transaction: a parameter does not encode as {ty}: {e}"
                ))
            })?;
        }
    }
    Ok(())
}

impl Drop for PipelinedTransaction {
    fn drop(&mut self) {
        if *self.open.get_mut() {
            if let Some(client) = self.client.take() {
                // Out of the pool. Dropping it closes the connection once the requests already
                // sent are answered, and the server rolls the transaction back; a statement still
                // running (say, waiting on a lock) finishes first, bounded by the server's
                // `statement_timeout` if one is set.
                drop(Object::take(client));
            }
        }
    }
}
