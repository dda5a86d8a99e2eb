//! `prebuildsctl template push|activate|invalidate|deprecate|delete`. Each change is one
//! transaction that also writes `reconcile.preset` jobs for every preset whose pool it affects;
//! the jobs are published right after the commit.

pub mod file;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use prebuilds_schemas::ReconcileReason;
use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{
        apply_change, begin_write, connect_db, explain_lock_timeout, relay_outbox,
        request_reconciles, resolve_template, template_presets, version_presets, waited_for,
        Applied, Change, Conflict, Ctx, TemplateRef,
    },
    output,
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create or update a template from a YAML file: a new version with its parameters and
    /// presets (and their prebuilds), activated when the file says `activate: true`.
    #[command(after_help = "The file (docs/template-file.md):\n\n\
        organization: acme\n\
        template: python-dev\n\
        version: v2\n\
        activate: true\n\
        source: ./main.tf            # optional, relative to this file; stored with the version\n\
        parameters:\n  \
          - {name: cpus, required: true}\n  \
          - {name: region, default: eu}\n\
        presets:\n  \
          - name: large\n    \
            parameters: {cpus: \"8\", region: eu}\n    \
            prebuilds:\n      \
              instances: 3\n      \
              expiration_policy: {ttl: 86400}\n      \
              scheduling:\n        \
                timezone: Europe/Berlin\n        \
                schedule:\n          \
                  - {cron: \"* 8-18 * * 1-5\", instances: 5}\n\n\
        Everything is validated first (every problem is reported with its field path), including \
        the bounds on input: at most PREBUILDS_MAX_PRESETS_PER_TEMPLATE presets, and at most \
        PREBUILDS_MAX_INSTANCES_PER_PRESET prebuilds per preset in `instances` and in every \
        schedule. Then the version is written in one transaction, which waits at most \
        PREBUILDS_CLI_LOCK_TIMEOUT for a lock held by another writer. Example:\n  \
        prebuildsctl template push examples/python-dev.yaml")]
    Push {
        /// The template file.
        file: PathBuf,
        #[command(flatten)]
        limits: file::Limits,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make VERSION the template's active version (its presets' pools fill, the old ones drain).
    #[command(after_help = "Example:\n  prebuildsctl template activate python-dev v1")]
    Activate {
        /// Template name.
        name: String,
        /// Version name.
        version: String,
        #[command(flatten)]
        scope: OrganizationArg,
    },
    /// Expire every prebuild of the active version now; the pools are refilled with new ones.
    #[command(after_help = "Example:\n  prebuildsctl template invalidate python-dev")]
    Invalidate {
        /// Template name.
        name: String,
        #[command(flatten)]
        scope: OrganizationArg,
    },
    /// Deprecate a template: its presets become inactive and their prebuilds are deleted.
    #[command(after_help = "Examples:\n  \
        prebuildsctl template deprecate python-dev --message \"use python-dev-2\"\n  \
        prebuildsctl template deprecate python-dev --undo")]
    Deprecate {
        /// Template name.
        name: String,
        /// Message shown to users.
        #[arg(long, default_value = "deprecated", conflicts_with = "undo")]
        message: String,
        /// Remove the deprecation.
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        scope: OrganizationArg,
    },
    /// Delete a template (soft delete): its prebuilds are deleted, its name is free again.
    #[command(after_help = "Example:\n  prebuildsctl template delete python-dev")]
    Delete {
        /// Template name.
        name: String,
        #[command(flatten)]
        scope: OrganizationArg,
    },
}

/// `--organization`, needed when a template name exists in several organizations.
#[derive(Debug, Clone, clap::Args)]
pub struct OrganizationArg {
    /// Organization of the template (needed when the name is not unique across organizations).
    #[arg(long)]
    pub organization: Option<String>,
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Push { file, limits, json } => push(connection, file, &limits, json).await,
        Command::Activate {
            name,
            version,
            scope,
        } => activate(connection, &name, &version, scope.organization.as_deref()).await,
        Command::Invalidate { name, scope } => {
            invalidate(connection, &name, scope.organization.as_deref()).await
        }
        Command::Deprecate {
            name,
            message,
            undo,
            scope,
        } => {
            let message = if undo { String::new() } else { message };
            deprecate(connection, &name, &message, scope.organization.as_deref()).await
        }
        Command::Delete { name, scope } => {
            delete(connection, &name, scope.organization.as_deref()).await
        }
    }
}

#[derive(Debug, Serialize)]
struct Pushed {
    organization: String,
    template: String,
    template_id: Uuid,
    template_created: bool,
    version: String,
    version_id: Uuid,
    activated: bool,
    presets: Vec<PushedPreset>,
    reconciles_requested: usize,
    published: usize,
}

#[derive(Debug, Serialize)]
struct PushedPreset {
    name: String,
    id: Uuid,
    desired_instances: Option<i32>,
}

async fn push(
    connection: &Ctx,
    path: PathBuf,
    limits: &file::Limits,
    json: bool,
) -> anyhow::Result<()> {
    let shown = path.display().to_string();
    // 1. Validate everything before touching the database.
    let checked = match file::load(&path, limits) {
        Ok(checked) => checked,
        Err(problems) => {
            for problem in &problems {
                eprintln!("error: {shown}: {problem}");
            }
            bail!(
                "{shown}: {} problem(s) found; nothing was written — fix the file and push again",
                problems.len()
            );
        }
    };
    for warning in &checked.warnings {
        eprintln!("warning: {shown}: {warning}");
    }
    let f = &checked.file;

    // 2. One transaction: template (if new), version, parameters, presets, schedules, activation,
    //    reconcile jobs.
    let pool = connect_db(connection).await?;
    let mut client = pool.get().await?;
    let written = async {
        let tx = begin_write(&mut client, connection).await?;
        let organization_id: Uuid = tx
            .query_opt(
                "SELECT id FROM organizations WHERE name = $1",
                &[&f.organization],
            )
            .await?
            .ok_or_else(|| {
                anyhow!(
                    "{shown}: organization: organization '{org}' does not exist; create it with \
                 `prebuildsctl org create {org}`; nothing was written",
                    org = f.organization
                )
            })?
            .get(0);
        let new_template_id = Uuid::new_v4();
        tx.execute(
            "INSERT INTO templates (id, organization_id, name) VALUES ($1, $2, $3)
         ON CONFLICT (organization_id, name) WHERE NOT deleted DO NOTHING",
            &[&new_template_id, &organization_id, &f.template],
        )
        .await
        .map_err(waited_for(|| {
            format!(
                "template name '{}' (another push is creating it)",
                f.template
            )
        }))
        .context("creating the template")?;
        let row = tx
            .query_one(
                "SELECT id, active_version_id FROM templates
             WHERE organization_id = $1 AND name = $2 AND NOT deleted
             FOR UPDATE",
                &[&organization_id, &f.template],
            )
            .await
            .map_err(waited_for(|| {
                format!("a lock on template '{}'", f.template)
            }))?;
        let template_id: Uuid = row.get("id");
        let previous_active: Option<Uuid> = row.get("active_version_id");
        let template_created = template_id == new_template_id;

        let exists = tx
            .query_opt(
                "SELECT 1 FROM template_versions WHERE template_id = $1 AND name = $2",
                &[&template_id, &f.version],
            )
            .await?
            .is_some();
        if exists {
            bail!(
            "{shown}: version: template '{t}' already has a version '{v}'; versions are immutable, \
             so push under a new version name (to make the existing one active: \
             `prebuildsctl template activate {t} {v}`); nothing was written",
            t = f.template,
            v = f.version
        );
        }
        let version_id = Uuid::new_v4();
        tx.execute(
            "INSERT INTO template_versions (id, template_id, name, source) VALUES ($1, $2, $3, $4)",
            &[&version_id, &template_id, &f.version, &checked.source],
        )
        .await
        .context("creating the template version")?;
        for parameter in &f.parameters {
            let default = parameter.default.as_ref().map(|d| d.0.clone());
            tx.execute(
                "INSERT INTO template_version_parameters
                 (template_version_id, name, required, default_value)
             VALUES ($1, $2, $3, $4)",
                &[&version_id, &parameter.name, &parameter.required, &default],
            )
            .await
            .context("creating the template parameters")?;
        }
        let mut presets = Vec::with_capacity(f.presets.len());
        for preset in &f.presets {
            let id = Uuid::new_v4();
            // Validation guarantees these fit in i32.
            let desired = preset.prebuilds.as_ref().map(|p| p.instances as i32);
            let ttl = preset
                .prebuilds
                .as_ref()
                .and_then(|p| p.expiration_policy.as_ref())
                .map(|e| e.ttl as i32);
            let scheduling = preset
                .prebuilds
                .as_ref()
                .and_then(|p| p.scheduling.as_ref());
            let timezone = scheduling
                .map(|s| s.timezone.trim().to_owned())
                .unwrap_or_default();
            let autoscaling = preset
                .prebuilds
                .as_ref()
                .and_then(|p| p.autoscaling.as_ref());
            // Validation guarantees 0 <= min <= max <= i32::MAX.
            let auto_min = autoscaling.map(|a| a.min as i32);
            let auto_max = autoscaling.map(|a| a.max as i32);
            let auto_expression = autoscaling.and_then(|a| a.expression.clone());
            tx.execute(
                "INSERT INTO template_version_presets
                 (id, template_version_id, name, desired_instances, invalidate_after_secs,
                  scheduling_timezone, autoscaling_min, autoscaling_max, autoscaling_expression,
                  is_default)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    &id,
                    &version_id,
                    &preset.name,
                    &desired,
                    &ttl,
                    &timezone,
                    &auto_min,
                    &auto_max,
                    &auto_expression,
                    &preset.default,
                ],
            )
            .await
            .context("creating the presets")?;
            for (name, value) in &preset.parameters {
                tx.execute(
                    "INSERT INTO template_version_preset_parameters
                     (template_version_preset_id, name, value)
                 VALUES ($1, $2, $3)",
                    &[&id, name, &value.0],
                )
                .await
                .context("creating the preset parameters")?;
            }
            for (position, schedule) in scheduling
                .map(|s| s.schedule.as_slice())
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                tx.execute(
                    "INSERT INTO template_version_preset_prebuild_schedules
                     (id, preset_id, position, cron_expression, desired_instances)
                 VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &Uuid::new_v4(),
                        &id,
                        &(position as i32),
                        &schedule.cron.trim(),
                        &(schedule.instances as i32),
                    ],
                )
                .await
                .context("creating the prebuild schedules")?;
            }
            presets.push(PushedPreset {
                name: preset.name.clone(),
                id,
                desired_instances: desired,
            });
        }

        // 3. Activation: the new presets become active, the superseded version's presets inactive;
        //    both pools change.
        let affected = if f.activate {
            activate_version(&tx, template_id, version_id, previous_active).await?
        } else {
            Vec::new()
        };
        let requested =
            request_reconciles(&tx, &affected, ReconcileReason::TemplateChanged).await?;
        tx.commit()
            .await
            .context("committing the template version")?;
        anyhow::Ok((
            template_id,
            template_created,
            version_id,
            presets,
            requested,
        ))
    }
    .await;
    let (template_id, template_created, version_id, presets, requested) =
        written.map_err(|e| explain_lock_timeout(e, connection.lock_timeout))?;
    drop(client);

    // 4. Publish the reconcile jobs.
    let published = relay_outbox(&pool, connection, requested).await;
    let result = Pushed {
        organization: f.organization.clone(),
        template: f.template.clone(),
        template_id,
        template_created,
        version: f.version.clone(),
        version_id,
        activated: f.activate,
        presets,
        reconciles_requested: requested,
        published,
    };
    if json {
        output::print_json(&[result])?;
    } else {
        println!(
            "pushed {}/{} version {}{}{}: {} preset(s)",
            result.organization,
            result.template,
            result.version,
            if template_created {
                " (new template)"
            } else {
                ""
            },
            if result.activated {
                ", activated"
            } else {
                ", not activated (activate with `prebuildsctl template activate`)"
            },
            result.presets.len()
        );
        for preset in &result.presets {
            let desired = preset
                .desired_instances
                .map(|d| format!("{d} prebuild(s)"))
                .unwrap_or_else(|| "no prebuilds".to_owned());
            println!("  preset {} ({}): {desired}", preset.name, preset.id);
        }
        if requested > 0 {
            println!("requested a reconcile of {requested} preset(s); published {published}");
        }
    }
    Ok(())
}

/// Makes `version_id` the active version of template `template_id`, in the caller's transaction
/// (`template push` with activation and `template activate` both go through here). Returns the
/// presets whose pools change: the new version's, which become active, and the superseded
/// version's (`previous`), which become inactive.
async fn activate_version<C: deadpool_postgres::GenericClient>(
    tx: &C,
    template_id: Uuid,
    version_id: Uuid,
    previous: Option<Uuid>,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    tx.execute(
        "UPDATE templates SET active_version_id = $1, updated_at = now() WHERE id = $2",
        &[&version_id, &template_id],
    )
    .await?;
    let mut affected = version_presets(tx, version_id).await?;
    if let Some(previous) = previous {
        affected.extend(version_presets(tx, previous).await?);
    }
    Ok(affected)
}

async fn activate(
    connection: &Ctx,
    name: &str,
    version: &str,
    organization: Option<&str>,
) -> anyhow::Result<()> {
    let applied = apply_change(connection, async |tx| {
        let template = resolve_template(tx, name, organization, true).await?;
        let Some(row) = tx
            .query_opt(
                "SELECT id FROM template_versions WHERE template_id = $1 AND name = $2",
                &[&template.id, &version],
            )
            .await?
        else {
            let versions: Vec<String> = tx
                .query(
                    "SELECT name FROM template_versions WHERE template_id = $1 ORDER BY created_at",
                    &[&template.id],
                )
                .await?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            bail!(
                "template '{name}' has no version '{version}' (versions: {})",
                if versions.is_empty() {
                    "none".to_owned()
                } else {
                    versions.join(", ")
                }
            );
        };
        let version_id: Uuid = row.get(0);
        if template.active_version_id == Some(version_id) {
            // Nothing written, so committing is as good as rolling back.
            return Ok(Change {
                outcome: None,
                reconcile: Vec::new(),
                reason: ReconcileReason::TemplateChanged,
            });
        }
        let affected =
            activate_version(tx, template.id, version_id, template.active_version_id).await?;
        Ok(Change {
            outcome: Some(template),
            reconcile: affected,
            reason: ReconcileReason::TemplateChanged,
        })
    })
    .await?;
    let Applied {
        outcome: Some(template),
        requested,
        published,
    } = applied
    else {
        println!("version {version} of template {name} is already active; nothing to do");
        return Ok(());
    };
    println!(
        "activated version {version} of template {}/{name}; requested a reconcile of {requested} \
         preset(s); published {published}",
        template.organization_name
    );
    Ok(())
}

/// Invalidates the prebuilds of template `name` in `tx`: every preset of its active version gets
/// `last_invalidated_at = now()`, so its prebuilds count as expired and are replaced. The outcome is
/// the template and how many presets were invalidated. Errors: no such template
/// ([`crate::context::NotFound`]); no active version ([`Conflict`]).
pub async fn invalidate_change(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
    organization: Option<&str>,
) -> anyhow::Result<Change<(TemplateRef, usize)>> {
    let template = resolve_template(tx, name, organization, true).await?;
    let Some(active) = template.active_version_id else {
        return Err(Conflict(format!(
            "template '{name}' has no active version, so there is nothing to invalidate \
             (activate one with `prebuildsctl template activate {name} VERSION`)"
        ))
        .into());
    };
    // Prebuilds created before this instant are expired from now on (the snapshot's rule).
    let presets: Vec<Uuid> = tx
        .query(
            "UPDATE template_version_presets SET last_invalidated_at = now()
             WHERE template_version_id = $1
             RETURNING id",
            &[&active],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Change {
        outcome: (template, presets.len()),
        reconcile: presets,
        reason: ReconcileReason::Manual,
    })
}

async fn invalidate(
    connection: &Ctx,
    name: &str,
    organization: Option<&str>,
) -> anyhow::Result<()> {
    let Applied {
        outcome: (template, invalidated),
        requested,
        published,
    } = apply_change(connection, async |tx| {
        invalidate_change(tx, name, organization).await
    })
    .await?;
    println!(
        "invalidated the prebuilds of {invalidated} preset(s) of template {}/{name}; they are \
         replaced with new ones (requested {requested} reconcile(s); published {published})",
        template.organization_name
    );
    Ok(())
}

async fn deprecate(
    connection: &Ctx,
    name: &str,
    message: &str,
    organization: Option<&str>,
) -> anyhow::Result<()> {
    let Applied {
        outcome: template,
        requested,
        published,
    } = apply_change(connection, async |tx| {
        let template = resolve_template(tx, name, organization, true).await?;
        // Deprecating takes presets out of the ones needing attention, undoing puts them back:
        // both sides are affected.
        let mut affected = template_presets(tx, template.id).await?;
        tx.execute(
            "UPDATE templates SET deprecated = $2, updated_at = now() WHERE id = $1",
            &[&template.id, &message],
        )
        .await?;
        affected.extend(template_presets(tx, template.id).await?);
        Ok(Change {
            outcome: template,
            reconcile: affected,
            reason: ReconcileReason::TemplateChanged,
        })
    })
    .await?;
    if message.is_empty() {
        println!(
            "template {}/{name} is no longer deprecated; requested a reconcile of {requested} \
             preset(s); published {published}",
            template.organization_name
        );
    } else {
        println!(
            "deprecated template {}/{name} ({message:?}); its prebuilds are deleted; requested a \
             reconcile of {requested} preset(s); published {published}",
            template.organization_name
        );
    }
    Ok(())
}

async fn delete(connection: &Ctx, name: &str, organization: Option<&str>) -> anyhow::Result<()> {
    let Applied {
        outcome: (template, user_workspaces),
        requested,
        published,
    } = apply_change(connection, async |tx| {
        let template = resolve_template(tx, name, organization, true).await?;
        let affected = template_presets(tx, template.id).await?;
        tx.execute(
            "UPDATE templates SET deleted = true, updated_at = now() WHERE id = $1",
            &[&template.id],
        )
        .await?;
        let user_workspaces: i64 = tx
            .query_one(
                "SELECT count(*) FROM workspaces
                 WHERE template_id = $1 AND NOT deleted AND owner_id <> $2",
                &[&template.id, &prebuilds_schemas::PREBUILDS_USER_ID],
            )
            .await?
            .get(0);
        Ok(Change {
            outcome: (template, user_workspaces),
            reconcile: affected,
            reason: ReconcileReason::TemplateChanged,
        })
    })
    .await?;
    println!(
        "deleted template {}/{name}; its prebuilds are deleted; requested a reconcile of \
         {requested} preset(s); published {published}",
        template.organization_name
    );
    if user_workspaces > 0 {
        eprintln!(
            "warning: {user_workspaces} user workspace(s) of this template still exist; they are \
             not touched"
        );
    }
    Ok(())
}
