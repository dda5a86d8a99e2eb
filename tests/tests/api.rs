//! `prebuilds-api` on the real services: every endpoint with each role (401 without a valid token,
//! 403 for a role that may not, RFC 9457 problems), with the API running as its least-privilege
//! database role from `deploy/postgres/roles.sql`; idempotent claims over HTTP through a real
//! worker; revoked tokens; body size, request time and claim time limits; the audit log of changes
//! and claims made over HTTP.

use std::time::Duration;

use chrono::Utc;
use prebuilds_tests::{
    api::{self, call, ApiRole},
    fixtures::{self, PrebuildSpec, PresetFixture},
    stack::{self, http_get},
    Service, TestBroker, TestDb,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// A database with a pool of `eligible` ready prebuilds, a member user, three tokens, a worker
/// (claims) and the API as its own database role.
struct World {
    db: TestDb,
    _broker: TestBroker,
    _role: ApiRole,
    _worker: Service,
    _api: Service,
    port: u16,
    fx: PresetFixture,
    template: String,
    user: Uuid,
    admin: String,
    claimer: String,
    viewer: String,
}

async fn world(eligible: usize) -> World {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let template = format!("tpl-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let fx = fixtures::template_with_preset(&c, org, &template, Some(eligible as i32)).await;
    for _ in 0..eligible {
        fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    }
    let user = fixtures::user(&c, "alice", false).await;
    drop(c);
    let admin = api::token(&db, &broker, "ops", "admin");
    let claimer = api::token(&db, &broker, "portal", "claimer");
    let viewer = api::token(&db, &broker, "dashboard", "viewer");
    let (worker, metrics) = stack::start("prebuilds-worker", &db, &broker, &[]);
    stack::wait_for(
        Duration::from_secs(30),
        "the worker to be ready",
        || async { matches!(http_get(metrics, "/readyz").await, Some((200, _))) },
    )
    .await;
    let role = ApiRole::grant(&db);
    let (api, port) = api::start(&role.url, &db, &broker, &[]).await;
    World {
        db,
        _broker: broker,
        _role: role,
        _worker: worker,
        _api: api,
        port,
        fx,
        template,
        user,
        admin,
        claimer,
        viewer,
    }
}

/// (method, path, body, the least role that may, the one role that calls when only one may).
type Case<'a> = (&'a str, String, Option<String>, &'a str, Option<&'a str>);

fn claim_body(user: Uuid, preset: Uuid, name: &str) -> String {
    json!({"user_id": user, "workspace_name": name, "preset_id": preset}).to_string()
}

/// Workspaces of the fixture's template that `user` owns (claimed ones).
async fn claimed(db: &TestDb, fx: &PresetFixture, user: Uuid) -> i64 {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM workspaces WHERE template_id = $1 AND owner_id = $2 AND NOT deleted",
        &[&fx.template_id, &user],
    )
    .await
    .unwrap()
    .get(0)
}

async fn audit_actions(db: &TestDb, actor: &str) -> Vec<String> {
    let c = db.pool.get().await.unwrap();
    c.query(
        "SELECT action FROM audit_log WHERE actor = $1 ORDER BY id",
        &[&actor],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_each_role_and_changes_are_audited() {
    let w = world(3).await;
    let tpl = &w.template;
    let preset = w.fx.preset_id;
    // (method, path, body, the least role that may, the one allowed role that makes the call when
    // it may only be made once: a claim takes a prebuild)
    let mut cases: Vec<Case> = vec![
        ("GET", "/api/v1/presets".into(), None, "viewer", None),
        (
            "GET",
            format!("/api/v1/presets?template={tpl}"),
            None,
            "viewer",
            None,
        ),
        ("GET", "/api/v1/templates".into(), None, "viewer", None),
        ("GET", "/api/v1/jobs?limit=5".into(), None, "viewer", None),
    ];
    for (name, by) in [("ws-by-claimer", "claimer"), ("ws-by-admin", "admin")] {
        let body = claim_body(w.user, preset, name);
        cases.push((
            "POST",
            "/api/v1/claims".into(),
            Some(body),
            "claimer",
            Some(by),
        ));
    }
    cases.extend([
        (
            "PUT",
            "/api/v1/settings".into(),
            Some(r#"{"reconciliation_paused":true}"#.into()),
            "admin",
            None,
        ),
        (
            "PUT",
            "/api/v1/settings".into(),
            Some(r#"{"reconciliation_paused":false}"#.into()),
            "admin",
            None,
        ),
        (
            "POST",
            format!("/api/v1/templates/{tpl}/prebuilds/invalidate"),
            None,
            "admin",
            None,
        ),
        (
            "POST",
            format!("/api/v1/templates/{tpl}/pause"),
            None,
            "admin",
            None,
        ),
        (
            "POST",
            format!("/api/v1/templates/{tpl}/resume"),
            None,
            "admin",
            None,
        ),
        (
            "POST",
            format!("/api/v1/presets/{preset}/pause"),
            None,
            "admin",
            None,
        ),
        (
            "POST",
            format!("/api/v1/presets/{preset}/resume"),
            None,
            "admin",
            None,
        ),
    ]);
    let rank = |r: &str| {
        ["viewer", "claimer", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    let tokens = [
        ("viewer", &w.viewer),
        ("claimer", &w.claimer),
        ("admin", &w.admin),
    ];
    let mut claims = 0;
    for (method, path, body, least, only) in &cases {
        let body = body.as_deref();
        // No token, a malformed header, a token that does not exist: 401 problems.
        let none = call(w.port, method, path, None, body).await;
        none.problem(401);
        assert_eq!(
            none.header("www-authenticate"),
            Some("Bearer"),
            "{method} {path}"
        );
        call(w.port, method, path, Some("pbt_notatoken"), body)
            .await
            .problem(401);
        let basic = api::request(
            w.port,
            method,
            path,
            &[
                ("Authorization", "Basic YTpi"),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .await;
        basic.problem(401);
        for (role, token) in tokens {
            let allowed = rank(role) >= rank(least);
            if allowed && only.is_some_and(|o| o != role) {
                continue;
            }
            let answer = call(w.port, method, path, Some(token), body).await;
            if !allowed {
                let problem = answer.problem(403);
                assert_eq!(problem["code"], "forbidden", "{method} {path} as {role}");
                continue;
            }
            assert_eq!(
                answer.status, 200,
                "{method} {path} as {role}: {}",
                answer.body
            );
            assert_eq!(answer.header("content-type"), Some("application/json"));
            if path.ends_with("/claims") {
                assert_eq!(answer.json()["outcome"], "claimed", "{}", answer.body);
                claims += 1;
            }
        }
    }
    assert_eq!(claims, 2, "one claim by the claimer, one by the admin");

    // What the reads say.
    let presets = call(
        w.port,
        "GET",
        &format!("/api/v1/presets?template={tpl}"),
        Some(&w.viewer),
        None,
    )
    .await
    .json();
    assert_eq!(presets.as_array().unwrap().len(), 1);
    assert_eq!(presets[0]["preset_id"], json!(preset));
    assert_eq!(presets[0]["paused"], false, "resumed at the end");
    let templates = call(w.port, "GET", "/api/v1/templates", Some(&w.viewer), None)
        .await
        .json();
    assert_eq!(templates[0]["name"], json!(tpl));
    assert_eq!(templates[0]["active_version"], "v1");
    let unknown = call(
        w.port,
        "GET",
        "/api/v1/presets?template=nope",
        Some(&w.viewer),
        None,
    )
    .await;
    assert_eq!(unknown.problem(404)["code"], "not_found");
    let bad = call(
        w.port,
        "POST",
        "/api/v1/presets/not-a-uuid/pause",
        Some(&w.admin),
        None,
    )
    .await;
    bad.problem(400);
    let missing = call(
        w.port,
        "POST",
        &format!("/api/v1/presets/{}/pause", Uuid::new_v4()),
        Some(&w.admin),
        None,
    )
    .await;
    missing.problem(404);
    call(
        w.port,
        "GET",
        "/api/v1/jobs?status=bogus",
        Some(&w.viewer),
        None,
    )
    .await
    .problem(400);
    call(w.port, "GET", "/api/v1/jobs?limit=0", Some(&w.viewer), None)
        .await
        .problem(400);
    // The OpenAPI document needs no token.
    let doc = call(w.port, "GET", "/openapi.json", None, None).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json()["openapi"], "3.1.0");

    // Every change and claim is in the audit log under the token's name; reads leave nothing.
    assert_eq!(
        audit_actions(&w.db, "ops").await,
        [
            "claim",
            "pause",
            "resume",
            "template invalidate",
            "pause",
            "resume",
            "pause",
            "resume"
        ]
    );
    assert_eq!(audit_actions(&w.db, "portal").await, ["claim"]);
    assert!(audit_actions(&w.db, "dashboard").await.is_empty());
    let c = w.db.pool.get().await.unwrap();
    let arguments: Value = c
        .query_one(
            "SELECT arguments FROM audit_log WHERE actor = 'ops' AND action = 'template invalidate'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(arguments["name"], json!(tpl));
    assert_eq!(arguments["via"], "api");
    assert_eq!(
        claimed(&w.db, &w.fx, w.user).await,
        2,
        "two prebuilds claimed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_over_http_are_idempotent() {
    let w = world(2).await;
    let body = claim_body(w.user, w.fx.preset_id, "alice-dev");
    let send = |key: &'static str, body: String| {
        let token = w.claimer.clone();
        let port = w.port;
        async move {
            let auth = format!("Bearer {token}");
            api::request(
                port,
                "POST",
                "/api/v1/claims",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", key),
                ],
                Some(&body),
            )
            .await
        }
    };
    let first = send("order-42", body.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first_reply = first.json();
    assert_eq!(first_reply["outcome"], "claimed");
    let request_id = first.header("x-request-id").unwrap().to_owned();
    // The same key and body: the first outcome again, and nothing more is claimed.
    let again = send("order-42", body.clone()).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json(), first_reply);
    assert_eq!(again.header("x-request-id"), Some(request_id.as_str()));
    assert_eq!(
        claimed(&w.db, &w.fx, w.user).await,
        1,
        "one claim for two requests"
    );
    // The same key with another body: refused, nothing taken.
    let other = send("order-42", claim_body(w.user, w.fx.preset_id, "other-name")).await;
    let problem = other.problem(409);
    assert_eq!(problem["code"], "request_conflict");
    assert_eq!(problem["reply"]["outcome"], "rejected");
    assert_eq!(claimed(&w.db, &w.fx, w.user).await, 1);
    // A UUID key is the request id itself: the worker recorded the claim under it.
    let key = Uuid::new_v4().to_string();
    let key: &'static str = Box::leak(key.into_boxed_str());
    let by_uuid = send(key, claim_body(w.user, w.fx.preset_id, "alice-two")).await;
    assert_eq!(by_uuid.status, 200, "{}", by_uuid.body);
    assert_eq!(by_uuid.header("x-request-id"), Some(key));
    let c = w.db.pool.get().await.unwrap();
    let recorded: i64 = c
        .query_one(
            "SELECT count(*) FROM claim_requests WHERE request_id = $1",
            &[&Uuid::parse_str(key).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    // The pool is empty now: a miss is an answer, with its reason.
    let miss = send(
        "order-43",
        claim_body(w.user, w.fx.preset_id, "alice-three"),
    )
    .await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.json()["outcome"], "no_eligible_prebuild");
    assert_eq!(miss.json()["reason"], "pool_empty");
    // A user outside the organization: the worker's refusal, as a 403 problem with the reply.
    let outsider = fixtures::outsider(&c, "mallory", false).await;
    let refused = send("order-44", claim_body(outsider, w.fx.preset_id, "m-dev")).await;
    assert_eq!(refused.problem(403)["reply"]["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_names_are_never_reused() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let token = api::token(&db, &broker, "kiosk", "viewer");
    let (_api, port) = api::start(&db.url, &db, &broker, &[]).await;
    assert_eq!(
        call(port, "GET", "/api/v1/templates", Some(&token), None)
            .await
            .status,
        200
    );
    // The secret is stored only as its hash.
    let c = db.pool.get().await.unwrap();
    let stored: i64 = c
        .query_one(
            "SELECT count(*) FROM api_tokens WHERE secret_hash = sha256(convert_to($1, 'UTF8'))
               AND position(convert_to($1, 'UTF8') in secret_hash) = 0",
            &[&token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);

    let out = api::ctl(&db, &broker, &["token", "revoke", "--name", "kiosk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = call(port, "GET", "/api/v1/templates", Some(&token), None).await;
    assert!(refused.problem(401)["detail"]
        .as_str()
        .unwrap()
        .contains("revoked"));

    let again = api::ctl(&db, &broker, &["token", "revoke", "--name", "kiosk"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already revoked"));
    let unknown = api::ctl(&db, &broker, &["token", "revoke", "--name", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    let reused = api::ctl(
        &db,
        &broker,
        &["token", "create", "--name", "kiosk", "--role", "admin"],
    );
    assert_eq!(reused.status.code(), Some(2), "a revoked name stays taken");
    let listed = api::ctl(&db, &broker, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "kiosk");
    assert!(listed[0]["revoked_at"].is_string());
    assert!(listed[0].get("secret_hash").is_none() && listed[0].get("token").is_none());
    // create and revoke are audited (once each: the second revoke changed nothing).
    let actions: Vec<String> = c
        .query("SELECT action FROM audit_log ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actions, ["token create", "token revoke"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_malformed_requests_are_problems() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let admin = api::token(&db, &broker, "ops", "admin");
    // No worker: claims get no reply.
    let (_api, port) = api::start(
        &db.url,
        &db,
        &broker,
        &[
            ("PREBUILDS_API_MAX_BODY_BYTES", "1024"),
            ("PREBUILDS_API_CLAIM_TIMEOUT", "300ms"),
            ("PREBUILDS_API_REQUEST_TIMEOUT", "2s"),
        ],
    )
    .await;
    let big = json!({"user_id": Uuid::new_v4(), "workspace_name": "x".repeat(2000)}).to_string();
    let answer = call(port, "POST", "/api/v1/claims", Some(&admin), Some(&big)).await;
    assert_eq!(answer.problem(413)["code"], "body_too_large");
    let auth = format!("Bearer {admin}");
    let plain = api::request(
        port,
        "PUT",
        "/api/v1/settings",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        Some("x"),
    )
    .await;
    plain.problem(415);
    call(
        port,
        "PUT",
        "/api/v1/settings",
        Some(&admin),
        Some("{not json"),
    )
    .await
    .problem(400);
    call(
        port,
        "PUT",
        "/api/v1/settings",
        Some(&admin),
        Some(r#"{"reconciliation_paused":true,"x":1}"#),
    )
    .await
    .problem(422);
    call(port, "GET", "/api/v1/nothing", Some(&admin), None)
        .await
        .problem(404);
    let wrong = call(port, "DELETE", "/api/v1/presets", Some(&admin), None).await;
    wrong.problem(405);
    assert_eq!(wrong.header("allow"), Some("GET,HEAD"));
    // No reply within the claim timeout: 504 with the request id to retry with.
    let claim = claim_body(Uuid::new_v4(), Uuid::new_v4(), "ws");
    let timeout = call(port, "POST", "/api/v1/claims", Some(&admin), Some(&claim)).await;
    let problem = timeout.problem(504);
    assert_eq!(problem["code"], "claim_timeout");
    assert!(problem["request_id"].is_string());
    // A body that never completes: cut off at the request time limit.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "PUT /api/v1/settings HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"rec"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.contains("application/problem+json"), "{raw}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// schemathesis (from PyPI) in a virtual environment under the target directory, installed on
/// first use with the ordinary pip client.
fn schemathesis() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let bin = dir.join("venv/bin/schemathesis");
    if bin.exists() {
        return bin;
    }
    let venv = dir.join("venv");
    let status = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 must be installed");
    assert!(status.success(), "python3 -m venv failed");
    let out = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "schemathesis==4.*"])
        .output()
        .expect("run pip");
    assert!(
        out.status.success(),
        "pip install schemathesis failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// The OpenAPI document, checked against the live API by a property-based tester: schemathesis
/// generates valid and invalid requests for every operation (parameters, headers, bodies, with and
/// without the token) and checks every answer against the document — status codes, content types,
/// headers, response schemas, no server errors, invalid input refused, no access without the
/// token. `positive_data_acceptance` is left out: a schema-valid claim for a user or preset that
/// does not exist is rightly refused by the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_holds_against_the_live_api() {
    let w = world(2).await;
    let bin = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let url = format!("http://127.0.0.1:{}/openapi.json", w.port);
    let auth = format!("Authorization: Bearer {}", w.admin);
    // schemathesis itself sometimes fails inside Hypothesis (Python's `ast` module under threads:
    // "AST constructor recursion depth mismatch"), reported under Errors, never under Failures:
    // such a run says nothing about the API and is run again, at most twice.
    let mut attempts = 0;
    let (out, stdout) = loop {
        attempts += 1;
        let out = tokio::process::Command::new(&bin)
            .args(["run", &url, "-H", &auth, "--checks", "all"])
            .args(["--exclude-checks", "positive_data_acceptance"])
            .args([
                "--max-examples",
                "15",
                "--workers",
                "1",
                "--request-timeout",
                "20",
            ])
            // No colours, no telemetry: plain text for the test's output.
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .current_dir(bin.parent().unwrap())
            .output()
            .await
            .expect("run schemathesis");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let tool_error_only = !out.status.success()
            && !stdout.contains("Failures:")
            && stdout.contains("Runtime Error");
        if !tool_error_only || attempts == 3 {
            break (out, stdout);
        }
        eprintln!("schemathesis failed internally (not the API); running it again");
    };
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really ran: every operation was tested.
    assert!(stdout.contains("Tested: 10"), "{stdout}");
}
