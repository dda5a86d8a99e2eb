//! `prebuildsctl migrate` is idempotent and safe when two run at once.

use prebuilds_tests::{db::server_url, process::binary};

async fn empty_database() -> (String, String) {
    let name = format!("prebuilds_mig_{}", uuid::Uuid::new_v4().simple());
    // Not created: `migrate` creates it.
    (name.clone(), format!("{}/{}", server_url(), name))
}

async fn drop_database(name: &str) {
    let admin = prebuilds_runtime::db::connect_dedicated(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

fn migrate(url: &str) -> std::process::Output {
    std::process::Command::new(binary("prebuildsctl"))
        .args(["migrate", "--json"])
        .env("DATABASE_URL", url)
        .output()
        .expect("run prebuildsctl migrate")
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_concurrent_runs_both_succeed() {
    let (name, url) = empty_database().await;

    // Two at once against a database that does not exist yet.
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking({
            let url = url.clone();
            move || migrate(&url)
        }),
        tokio::task::spawn_blocking({
            let url = url.clone();
            move || migrate(&url)
        })
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.status.success(),
        "first: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert!(
        b.status.success(),
        "second: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    let applied = |o: &std::process::Output| -> usize {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["applied"].as_array().unwrap().len()
    };
    let expected = prebuilds_schemas::migrations::embedded_names().len();
    assert_eq!(
        applied(&a) + applied(&b),
        expected,
        "each migration applied exactly once"
    );

    // A third run changes nothing.
    let c = migrate(&url);
    assert!(c.status.success());
    assert_eq!(applied(&c), 0);

    // The seed rows exist exactly once.
    let client = prebuilds_runtime::db::connect_dedicated(&url)
        .await
        .unwrap();
    let users: i64 = client
        .query_one(
            "SELECT count(*) FROM users WHERE id = $1",
            &[&prebuilds_schemas::PREBUILDS_USER_ID],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1);
    let templates: i64 = client
        .query_one(
            "SELECT count(*) FROM notification_templates WHERE id = $1",
            &[&prebuilds_schemas::RESOURCE_REPLACED_TEMPLATE_ID],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(templates, 1);
    drop(client);
    drop_database(&name).await;
}

#[tokio::test]
async fn migrate_reports_an_unreachable_database_clearly() {
    let out = std::process::Command::new(binary("prebuildsctl"))
        .args(["migrate"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error:"), "{stderr}");
}
