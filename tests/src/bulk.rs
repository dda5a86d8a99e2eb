//! Bulk worlds for benchmarks and the reliability suite, written with set-based SQL (seconds for
//! tens of thousands of rows).

use uuid::Uuid;

/// Inserts `presets` templates, each with one active version and one preset desiring `desired`,
/// and `running` ready prebuilds per preset. Returns the preset ids.
pub async fn world(
    client: &tokio_postgres::Client,
    presets: usize,
    desired: usize,
    running: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let org = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO organizations (id, name) VALUES ($1, $2)",
            &[&org, &format!("bench-{}", org.simple())],
        )
        .await?;
    let sql = format!(
        "
        INSERT INTO templates (id, organization_id, name)
          SELECT md5('{o}t' || i)::uuid, '{o}', 'bench-' || i FROM generate_series(1, {n}) i;
        INSERT INTO template_versions (id, template_id, name)
          SELECT md5('{o}v' || i)::uuid, md5('{o}t' || i)::uuid, 'v1' FROM generate_series(1, {n}) i;
        UPDATE templates t SET active_version_id = v.id FROM template_versions v
          WHERE v.template_id = t.id AND t.organization_id = '{o}';
        INSERT INTO template_version_presets (id, template_version_id, name, desired_instances)
          SELECT md5('{o}p' || i)::uuid, md5('{o}v' || i)::uuid, 'default', {d} FROM generate_series(1, {n}) i;
        INSERT INTO workspaces (id, owner_id, organization_id, template_id, name, created_at)
          SELECT md5('{o}w' || i || '-' || k)::uuid, 'c42fdf75-3097-471c-8c33-fb52454d81c0', '{o}',
                 md5('{o}t' || i)::uuid, 'prebuild-' || substr(md5('{o}w' || i || '-' || k), 1, 15), now()
          FROM generate_series(1, {n}) i, generate_series(1, {r}) k;
        INSERT INTO provisioner_jobs (id, initiator_id, job_status, started_at, completed_at)
          SELECT md5('{o}j' || i || '-' || k)::uuid, 'c42fdf75-3097-471c-8c33-fb52454d81c0', 'succeeded', now(), now()
          FROM generate_series(1, {n}) i, generate_series(1, {r}) k;
        INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition,
                                      initiator_id, job_id, template_version_preset_id, stage)
          SELECT md5('{o}b' || i || '-' || k)::uuid, md5('{o}w' || i || '-' || k)::uuid, md5('{o}v' || i)::uuid,
                 1, 'start', 'c42fdf75-3097-471c-8c33-fb52454d81c0', md5('{o}j' || i || '-' || k)::uuid,
                 md5('{o}p' || i)::uuid, 'create'
          FROM generate_series(1, {n}) i, generate_series(1, {r}) k;
        INSERT INTO workspace_agents (id, job_id, name, lifecycle_state)
          SELECT md5('{o}a' || i || '-' || k)::uuid, md5('{o}j' || i || '-' || k)::uuid, 'main', 'ready'
          FROM generate_series(1, {n}) i, generate_series(1, {r}) k;
        ANALYZE;
        ",
        o = org,
        n = presets,
        d = desired,
        r = running
    );
    client.batch_execute(&sql).await?;
    let ids = client
        .query(
            "SELECT p.id FROM template_version_presets p JOIN template_versions v ON v.id = p.template_version_id
             JOIN templates t ON t.id = v.template_id WHERE t.organization_id = $1",
            &[&org],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(ids)
}

/// Users `bench-user-<i>` for claim clients, members of every organization that exists now
/// (claims need membership of the template's organization).
pub async fn users(client: &tokio_postgres::Client, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let rows = client
        .query(
            &format!(
                "WITH u AS (
                     INSERT INTO users (id, username) SELECT gen_random_uuid(), 'bench-user-' || i || '-' || substr(md5(random()::text), 1, 6)
                     FROM generate_series(1, {n}) i RETURNING id
                 ), m AS (
                     INSERT INTO organization_members (user_id, organization_id)
                     SELECT u.id, o.id FROM u CROSS JOIN organizations o
                 )
                 SELECT id FROM u"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
