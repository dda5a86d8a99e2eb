//! `prebuildsctl preset reset ID`: clears a preset's `hard_limited` or `validation_failed` status at
//! once, instead of waiting for the hard-limit probe (or a new template version).
//!
//! In one transaction under the preset's lock (so no reconcile interleaves): status `healthy`, the
//! hard-limit record cleared, and `failures_reset_at = now()` so the failures that caused the limit
//! no longer count toward backoff or the hard limit; a `manual` reconcile of the preset goes to the
//! outbox and is relayed right after the commit. A preset that still cannot build is marked again by
//! the reconciler on its next failures.

use anyhow::bail;

use prebuilds_schemas::ReconcileReason;
use uuid::Uuid;

use crate::context::{apply_change, Applied, Change, Ctx};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Clear `hard_limited` / `validation_failed` now and reconcile the preset.
    #[command(after_help = "Examples:\n  \
        prebuildsctl preset reset 0b6c…          # a preset id from `prebuildsctl status`")]
    Reset {
        /// The preset's id, as `prebuildsctl status` shows it.
        id: Uuid,
    },
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    let Command::Reset { id } = command;
    let Applied {
        outcome: (name, was),
        published,
        ..
    } = apply_change(connection, async |tx| {
        prebuilds_store::lock::lock_preset(tx, id).await?;
        let Some(row) = tx
            .query_opt(
                "SELECT name, prebuild_status FROM template_version_presets WHERE id = $1",
                &[&id],
            )
            .await?
        else {
            bail!("preset {id} not found (`prebuildsctl status` lists preset ids)");
        };
        let name: String = row.get(0);
        let was: String = row.get(1);
        tx.execute(
            "UPDATE template_version_presets
             SET prebuild_status = 'healthy', hard_limited_at = NULL, hard_limit_probe_at = NULL,
                 hard_limit_cooldown_secs = NULL, failures_reset_at = now()
             WHERE id = $1",
            &[&id],
        )
        .await?;
        Ok(Change {
            outcome: (name, was),
            reconcile: vec![id],
            reason: ReconcileReason::Manual,
        })
    })
    .await?;
    println!(
        "reset preset {name} ({id}) from {was} to healthy; requested a reconcile; published {published}"
    );
    Ok(())
}
