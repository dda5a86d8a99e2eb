//! `prebuildsctl pause|resume [--template NAME | --preset ID]`: reconciliation pause, globally
//! (`prebuilds_settings.reconciliation_paused`), per template (`templates.paused`) or per preset
//! (`template_version_presets.paused`). A paused scope gets no creates, deletes or cancels; claims
//! continue. `resume` writes `settings_changed` reconcile jobs for the affected presets in the same
//! transaction, so pools catch up at once instead of at the next tick.

use prebuilds_schemas::ReconcileReason;
use uuid::Uuid;

use deadpool_postgres::Transaction;

use crate::context::{
    apply_change, resolve_template, template_presets, Applied, Change, Ctx, NotFound,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    prebuildsctl pause                          # everything\n  \
    prebuildsctl pause --template python-dev\n  \
    prebuildsctl resume --preset 0b6c…          # a preset id from `prebuildsctl status`")]
pub struct Args {
    /// Only this template.
    #[arg(long, conflicts_with = "preset")]
    template: Option<String>,
    /// Organization of --template (needed when the name is not unique).
    #[arg(long, requires = "template")]
    organization: Option<String>,
    /// Only this preset (its id, as `prebuildsctl status` shows it).
    #[arg(long)]
    preset: Option<Uuid>,
}

/// What a pause or resume applies to.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Every preset (`prebuilds_settings.reconciliation_paused`).
    Global,
    /// One template, by name (and organization when the name is not unique).
    Template {
        name: String,
        organization: Option<String>,
    },
    /// One preset, by id.
    Preset(Uuid),
}

impl Args {
    fn scope(&self) -> Scope {
        match (&self.template, self.preset) {
            (Some(name), _) => Scope::Template {
                name: name.clone(),
                organization: self.organization.clone(),
            },
            (None, Some(preset)) => Scope::Preset(preset),
            (None, None) => Scope::Global,
        }
    }
}

/// Pauses (or resumes) `scope` in `tx`: the outcome is the scope as people read it and whether
/// anything changed; a resume that changed something asks for a reconcile of the affected presets.
/// Errors: the template or preset does not exist ([`crate::context::NotFound`]).
pub async fn set_paused(
    tx: &Transaction<'_>,
    scope: &Scope,
    pause: bool,
) -> anyhow::Result<Change<(String, bool)>> {
    let (scope, changed, affected) = match scope {
        Scope::Template { name, organization } => {
            let template = resolve_template(tx, name, organization.as_deref(), true).await?;
            let changed = tx
                .execute(
                    "UPDATE templates SET paused = $2, updated_at = now()
                     WHERE id = $1 AND paused IS DISTINCT FROM $2",
                    &[&template.id, &pause],
                )
                .await?
                > 0;
            let affected = template_presets(tx, template.id).await?;
            (
                format!("template {}/{}", template.organization_name, template.name),
                changed,
                affected,
            )
        }
        Scope::Preset(preset) => {
            let preset = *preset;
            let Some(row) = tx
                .query_opt(
                    "SELECT p.paused, p.name FROM template_version_presets p WHERE p.id = $1 FOR UPDATE",
                    &[&preset],
                )
                .await?
            else {
                return Err(NotFound(format!(
                    "preset {preset} not found (`prebuildsctl status` lists preset ids)"
                ))
                .into());
            };
            let was: bool = row.get(0);
            let name: String = row.get(1);
            if was != pause {
                tx.execute(
                    "UPDATE template_version_presets SET paused = $2 WHERE id = $1",
                    &[&preset, &pause],
                )
                .await?;
            }
            (
                format!("preset {name} ({preset})"),
                was != pause,
                vec![preset],
            )
        }
        Scope::Global => {
            let changed = prebuilds_store::settings::set_reconciliation_paused(tx, pause).await?;
            let affected = prebuilds_store::attention::presets_needing_attention(tx).await?;
            ("reconciliation (global)".to_owned(), changed, affected)
        }
    };
    // A pause needs no reconcile (a paused preset does nothing); a resume catches up at once.
    let reconcile = if pause || !changed {
        Vec::new()
    } else {
        affected
    };
    Ok(Change {
        outcome: (scope, changed),
        reconcile,
        reason: ReconcileReason::SettingsChanged,
    })
}

pub async fn run(connection: &Ctx, args: Args, pause: bool) -> anyhow::Result<()> {
    let verb = if pause { "paused" } else { "resumed" };
    let scope = args.scope();
    let Applied {
        outcome: (scope, changed),
        requested,
        published,
    } = apply_change(connection, async |tx| set_paused(tx, &scope, pause).await).await?;
    if !changed {
        println!("{scope} was already {verb}; nothing changed");
        return Ok(());
    }
    if pause {
        println!("{verb} {scope}");
    } else {
        println!(
            "{verb} {scope}; requested a reconcile of {requested} preset(s); published {published}"
        );
    }
    Ok(())
}
