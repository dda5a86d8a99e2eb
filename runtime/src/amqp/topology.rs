//! The one definition of every exchange, queue and binding (SPEC.md §4). Every process declares
//! the whole topology with exactly these arguments at start-up and after each reconnect, so any
//! process can start first and none ever hits a 406 PRECONDITION_FAILED from mismatched arguments.

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
    Channel, ExchangeKind,
};

/// Deliveries a message may fail (reject with requeue) before the broker dead-letters it. Set
/// explicitly: RabbitMQ 3.x has no default and 4.x defaults to 20.
pub const DELIVERY_LIMIT: i64 = 5;

/// The work queues of SPEC.md §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Reconcile,
    Claims,
    ProvisionerJobs,
    ProvisionerEvents,
    Notifications,
}

impl QueueKind {
    pub const ALL: [QueueKind; 5] = [
        QueueKind::Reconcile,
        QueueKind::Claims,
        QueueKind::ProvisionerJobs,
        QueueKind::ProvisionerEvents,
        QueueKind::Notifications,
    ];

    /// Queue name without the prefix; also the `queue` label of metrics.
    pub fn suffix(self) -> &'static str {
        match self {
            QueueKind::Reconcile => "reconcile",
            QueueKind::Claims => "claims",
            QueueKind::ProvisionerJobs => "provisioner-jobs",
            QueueKind::ProvisionerEvents => "provisioner-events",
            QueueKind::Notifications => "notifications",
        }
    }

    /// Binding keys on the topic exchange.
    pub fn binding_keys(self) -> &'static [&'static str] {
        match self {
            QueueKind::Reconcile => &["reconcile.preset"],
            QueueKind::Claims => &["claim.request"],
            QueueKind::ProvisionerJobs => &["provisioner.job.*"],
            QueueKind::ProvisionerEvents => &["provisioner.event.*"],
            QueueKind::Notifications => &["notification.*"],
        }
    }
}

/// Names derived from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The durable topic exchange every message is published to.
    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    /// Dead-letter exchange (fanout): every rejected or poisoned message ends in [`Self::dead_queue`].
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn queue(&self, kind: QueueKind) -> String {
        format!("{}.{}", self.prefix, kind.suffix())
    }

    /// Full queue name for a queue label (its suffix).
    pub fn queue_name_for_label(&self, suffix: &str) -> String {
        format!("{}.{}", self.prefix, suffix)
    }

    /// The arguments of every work queue. Changing them is a breaking change for running brokers.
    pub fn work_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        args
    }

    fn dead_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        args
    }

    /// Declares exchanges, queues and bindings. Idempotent; safe to run concurrently.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(
                self.dead_queue().into(),
                durable_queue,
                self.dead_queue_arguments(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead_queue().into(),
                self.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for kind in QueueKind::ALL {
            channel
                .queue_declare(
                    self.queue(kind).into(),
                    durable_queue,
                    self.work_queue_arguments(),
                )
                .await?;
            for key in kind.binding_keys() {
                channel
                    .queue_bind(
                        self.queue(kind).into(),
                        self.exchange().into(),
                        (*key).into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}
