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

use deadpool_postgres::{Client, Object};
use futures::future::{join, join_all, try_join_all};
use tokio_postgres::{types::ToSql, Row, Statement};

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
    pub async fn begin_with(
        &self,
        first: &[Step<'_>],
    ) -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
        // Open from the moment BEGIN may have been sent: a failure or cancellation from here on
        // leaves the server's state unknown.
        self.open.store(true, Ordering::Relaxed);
        let client = self.client();
        let begin = client.batch_execute("BEGIN");
        let statements = try_join_all(first.iter().map(|(s, p)| client.query(*s, p)));
        let (begun, rows) = futures::try_join!(begin, statements)?;
        let () = begun;
        Ok(rows)
    }

    /// Sends `last` and `COMMIT` in one round trip; returns each statement's row count.
    ///
    /// If a statement fails, PostgreSQL turns the `COMMIT` behind it into a rollback: the error is
    /// returned and nothing was written.
    pub async fn commit_with(&self, last: &[Step<'_>]) -> Result<Vec<u64>, tokio_postgres::Error> {
        let client = self.client();
        // `join`, not `try_join`: the COMMIT's own answer says whether the block is over, so it
        // is awaited even when a statement before it has already failed.
        let (counts, commit) = join(
            join_all(last.iter().map(|(s, p)| client.execute(*s, p))),
            client.batch_execute("COMMIT"),
        )
        .await;
        if commit.is_ok() {
            self.open.store(false, Ordering::Relaxed);
        }
        let counts = counts.into_iter().collect::<Result<Vec<_>, _>>()?;
        commit?;
        Ok(counts)
    }

    /// Ends the transaction without writing anything.
    pub async fn rollback(&self) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute("ROLLBACK").await?;
        self.open.store(false, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for PipelinedTransaction {
    fn drop(&mut self) {
        if *self.open.get_mut() {
            if let Some(client) = self.client.take() {
                // Out of the pool; dropping the connection closes it and the server rolls back.
                drop(Object::take(client));
            }
        }
    }
}
