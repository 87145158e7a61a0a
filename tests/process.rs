//! The `kas-gateway` binary as an operator runs it: first start, crash, signals, logs, CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::binary::*;

#[tokio::test]
async fn first_start_writes_the_root_token_to_a_private_file() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let gateway = Gateway::start(command(&dir));
    let file = dir.join("root-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert!(token.starts_with("glpat-"));
    let (status, user) = send(
        reqwest::Method::GET,
        &gateway.url("/api/v4/user"),
        &token,
        None,
    )
    .await;
    assert_eq!((status, &user["username"]), (200, &json!("root")));
    assert_eq!(user["name"], "Administrator");
    let log = gateway.log_text();
    assert!(
        log.contains(&file.display().to_string()),
        "the log names the file"
    );
    assert!(!log.contains(&token), "the log never holds the token");
    let db_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(db_mode & 0o777, 0o700, "the data directory is private");
}

#[tokio::test]
async fn acknowledged_writes_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let token = "glpat-crash-test-token-000000000";
    let mut first = Gateway::start(with_token(dir.path(), token));
    let (status, project) = send(
        reqwest::Method::POST,
        &first.url("/api/v4/projects"),
        token,
        Some(json!({"name": "p"})),
    )
    .await;
    assert_eq!(status, 201);
    let agents = format!("/api/v4/projects/{}/cluster_agents", project["id"]);
    for i in 0..20 {
        let (status, _) = send(
            reqwest::Method::POST,
            &first.url(&agents),
            token,
            Some(json!({"name": format!("agent-{i}")})),
        )
        .await;
        assert_eq!(status, 201);
    }
    first.signal("KILL");
    first.wait();

    let second = Gateway::start(command(dir.path()));
    let (status, listed) = send(
        reqwest::Method::GET,
        &second.url(&format!("{agents}?per_page=100")),
        token,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        listed.as_array().unwrap().len(),
        20,
        "every acknowledged agent is there"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let token = "glpat-sigterm-test-token-0000000";
    let mut gateway = Gateway::start(with_token(dir.path(), token));
    // Start a request and send only half of its body.
    let body = br#"{"name":"in-flight"}"#;
    let mut stream = TcpStream::connect(&gateway.addr).unwrap();
    write!(
        stream,
        "POST /api/v4/projects HTTP/1.1\r\nHost: x\r\nPrivate-Token: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    gateway.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    stream.write_all(&body[5..]).unwrap();
    let mut response = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert_eq!(gateway.wait(), Some(0));
    let log = gateway.log_text();
    assert!(log.contains("shutting down"));
    assert!(log.contains("\"message\":\"stopped\""));
    // New connections are refused once it is gone.
    assert!(TcpStream::connect(&gateway.addr).is_err());
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let root = "glpat-log-test-root-token-000000";
    let mut gateway = Gateway::start(with_token(dir.path(), root));
    let (agents, agent) = project_and_agent(&gateway, root).await;
    let (_, token) = send(
        reqwest::Method::POST,
        &gateway.url(&format!("{agents}/{}/tokens", agent["id"])),
        root,
        Some(json!({"name": "t"})),
    )
    .await;
    let agent_secret = token["token"].as_str().unwrap().to_owned();
    // A token in the query string, and a wrong one.
    let client = reqwest::Client::new();
    let url = gateway.url(&format!("{agents}?private_token={root}"));
    assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    let (status, _) = send(
        reqwest::Method::GET,
        &gateway.url(&agents),
        "glpat-wrong-secret-value",
        None,
    )
    .await;
    assert_eq!(status, 401);
    gateway.signal("TERM");
    gateway.wait();
    let log = gateway.log_text();
    assert!(
        log.contains("/api/v4/projects/{id}/cluster_agents"),
        "requests are logged by route"
    );
    for secret in [root, agent_secret.as_str(), "glpat-wrong-secret-value"] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
    let line = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("\"status\":401"))
        .cloned()
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["method"], "GET");
    assert_eq!(event["route"], "/api/v4/projects/{id}/cluster_agents");
    assert!(event["duration_us"].is_u64());
}

#[test]
fn configuration_mistakes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = command(dir.path())
        .env("KAS_GATEWAY_LISTN", "x")
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("KAS_GATEWAY_LISTN"));

    let file = dir.path().join("config.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nbogus = 1\n").unwrap();
    let output = command(dir.path())
        .env("KAS_GATEWAY_CONFIG", &file)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bogus"));

    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, "glpat-from-a-file-0000000000000\n").unwrap();
    std::fs::write(
        &file,
        format!(
            "bootstrap_token_file = {:?}\n",
            secret_file.display().to_string()
        ),
    )
    .unwrap();
    let output = command(dir.path())
        .env("KAS_GATEWAY_CONFIG", &file)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Malformed encryption keys stop `serve` before the database is touched: no file on SQLite,
/// no table on PostgreSQL.
#[rstest::rstest]
#[tokio::test]
async fn bad_encryption_keys_are_refused_before_migrations(
    #[values(common::Backend::Sqlite, common::Backend::Postgres)] backend: common::Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut command, pg)) = on_backend(command(dir.path()), backend).await else {
        return;
    };
    let output = command
        .env("KAS_GATEWAY_ENCRYPTION_KEYS", "k1=not-base64!")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("encryption keys"), "{stderr}");
    assert!(!dir.path().join("kas-gateway.db").exists());
    if let Some(pg) = pg {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url)
            .await
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(tables, 0, "no migration ran");
    }
}

#[tokio::test]
async fn the_admin_cli_sets_a_gateway_up() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = command(dir.path())
            .arg("admin")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    run(&[
        "create-user",
        "--username",
        "alice",
        "--name",
        "Alice",
        "--email",
        "alice@example.com",
    ]);
    run(&[
        "create-user",
        "--username",
        "bob",
        "--name",
        "Bob",
        "--email",
        "bob@example.com",
    ]);
    let alice = run(&[
        "create-token",
        "--user",
        "alice",
        "--name",
        "cli",
        "--scopes",
        "api",
    ])
    .trim()
    .to_owned();
    let bob = run(&[
        "create-token",
        "--user",
        "bob",
        "--name",
        "cli",
        "--scopes",
        "read_api",
    ])
    .trim()
    .to_owned();
    run(&["create-project", "--owner", "alice", "--name", "Infra"]);
    run(&[
        "add-member",
        "--project",
        "alice/infra",
        "--user",
        "bob",
        "--access-level",
        "developer",
    ]);
    let refused = command(dir.path())
        .args([
            "admin",
            "add-member",
            "--project",
            "alice/infra",
            "--user",
            "bob",
            "--access-level",
            "developer",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Member already exists"));

    let gateway = Gateway::start(command(dir.path()));
    let (status, _) = send(
        reqwest::Method::POST,
        &gateway.url("/api/v4/projects/alice%2Finfra/cluster_agents"),
        &alice,
        Some(json!({"name": "prod"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, agents) = send(
        reqwest::Method::GET,
        &gateway.url("/api/v4/projects/alice%2Finfra/cluster_agents"),
        &bob,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(agents[0]["name"], "prod");
    assert_eq!(
        agents[0]["config_project"]["name_with_namespace"],
        "Alice / Infra"
    );

    // Tokens: listed (never their secrets) and revoked from the command line, with JSON
    // output for scripts.
    let carol: serde_json::Value = serde_json::from_str(&run(&[
        "create-user",
        "--username",
        "carol",
        "--name",
        "Carol",
        "--email",
        "carol@example.com",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(carol["username"], "carol");
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["list-tokens", "--user", "bob", "--output", "json"])).unwrap();
    let bob_token = &listed.as_array().unwrap()[0];
    assert_eq!(bob_token["scopes"], json!(["read_api"]));
    assert!(bob_token.get("token").is_none());
    assert!(!run(&["list-tokens", "--output", "json"]).contains("glpat-"));
    let id = bob_token["id"].as_i64().unwrap().to_string();
    let revoked: serde_json::Value =
        serde_json::from_str(&run(&["revoke-token", "--id", &id, "--output", "json"])).unwrap();
    assert_eq!(revoked, json!({"id": bob_token["id"], "revoked": true}));
    let (status, _) = send(
        reqwest::Method::GET,
        &gateway.url("/api/v4/user"),
        &bob,
        None,
    )
    .await;
    assert_eq!(status, 401, "a revoked token still works");
    let table = run(&["list-tokens", "--user", "bob"]);
    assert!(!table.contains("revoked"), "{table}");
    let table = run(&["list-tokens", "--user", "bob", "--all"]);
    assert!(table.contains("revoked"), "{table}");
}

#[test]
fn certs_dev_writes_a_ca_a_server_and_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = Command::new(BIN)
        .args(["certs", "dev", "--out"])
        .arg(&out)
        .args(["--host", "agent.test"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (name, mode) in [
        ("ca.pem", 0o644),
        ("ca-key.pem", 0o600),
        ("server.pem", 0o644),
        ("server-key.pem", 0o600),
        ("client.pem", 0o644),
        ("client-key.pem", 0o600),
    ] {
        let meta = std::fs::metadata(out.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    let server = std::fs::read(out.join("server.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&server).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        names.contains("agent.test") && names.contains("localhost"),
        "{names}"
    );
}

#[tokio::test]
async fn rotate_encryption_key_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let token = "glpat-rotation-test-token-000000";
    let mut gateway = Gateway::start(with_token(dir.path(), token));
    let (agents, agent) = project_and_agent(&gateway, token).await;
    let (status, _) = send(
        reqwest::Method::POST,
        &gateway.url(&format!("{agents}/{}/url_configurations", agent["id"])),
        token,
        Some(json!({"url": "grpcs://agent:443"})),
    )
    .await;
    assert_eq!(status, 201);
    let output = command(dir.path())
        .args(["admin", "rotate-encryption-key"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("added encryption key k2"), "{stdout}");
    assert!(
        stdout.contains("re-encrypted 1 secret(s) under key k2"),
        "{stdout}"
    );
    let keys = std::fs::read_to_string(dir.path().join("encryption-keys")).unwrap();
    let ids: Vec<&str> = keys
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('=').next())
        .collect();
    assert_eq!(ids, ["k2", "k1"]);
    gateway.signal("TERM");
    assert_eq!(gateway.wait(), Some(0));
    assert!(
        !gateway
            .log_text()
            .contains(keys.lines().nth(1).unwrap().split_once('=').unwrap().1)
    );
}

/// What the README tells an operator to try: `certs dev`, the gateway, `agent-sim`.
#[tokio::test]
async fn certs_dev_and_agent_sim_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let status = Command::new(BIN)
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(status.success());
    let token = "glpat-agent-sim-test-token-00000";
    let gateway = Gateway::start({
        let mut c = command(&dir.path().join("data"));
        c.env("KAS_GATEWAY_BOOTSTRAP_TOKEN", token);
        c
    });
    let api = |path: &str| gateway.url(&format!("/api/v4{path}"));
    let (_, project) = send(
        reqwest::Method::POST,
        &api("/projects"),
        token,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents = format!("/projects/{}/cluster_agents", project["id"]);
    let (_, agent) = send(
        reqwest::Method::POST,
        &api(&agents),
        token,
        Some(json!({"name": "a"})),
    )
    .await;
    let agent_path = format!("{agents}/{}", agent["id"]);
    let (_, agent_token) = send(
        reqwest::Method::POST,
        &api(&format!("{agent_path}/tokens")),
        token,
        Some(json!({"name": "t"})),
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let (status, config) = send(
        reqwest::Method::POST,
        &api(&format!("{agent_path}/url_configurations")),
        token,
        Some(json!({"url": format!("grpcs://localhost:{port}"), "ca_cert": ca})),
    )
    .await;
    assert_eq!(status, 201);
    let mut sim = Command::new(BIN)
        .arg("agent-sim")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--token", agent_token["token"].as_str().unwrap()])
        .args(["--jwt-public-key", config["public_key"].as_str().unwrap()])
        .arg("--tls-cert")
        .arg(certs.join("server.pem"))
        .arg("--tls-key")
        .arg(certs.join("server-key.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let state = loop {
        let (_, state) = send(
            reqwest::Method::GET,
            &api(&format!("{agent_path}/connection")),
            token,
            None,
        )
        .await;
        if state["state"] == "connected" || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = sim.kill();
    let _ = sim.wait();
    assert_eq!(state["state"], "connected", "{state}");
    assert!(
        state["agent"]["version"]
            .as_str()
            .unwrap()
            .starts_with("agent-sim")
    );
}

/// A gateway whose log reader went away (stderr a closed pipe) still stops on SIGTERM.
#[test]
fn sigterm_works_with_a_closed_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(dir.path())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway ignored SIGTERM once its stderr was closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
}

/// `serve` run to its end, for a start that must fail: exit status and standard error.
fn serve_output(mut command: Command) -> (bool, String) {
    let output = command.arg("serve").output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// On PostgreSQL the replicas share their encryption keys: none configured, or a key that
/// differs from the one the database has seen for its id, stops the gateway with a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_must_share_their_keys() {
    if common::postgres_skipped() {
        return;
    }
    let token = "glpat-shared-keys-test-token-0000";
    let pg = common::PgDatabase::create().await;
    let on_pg = |dir: &Path| {
        let mut command = with_token(dir, token);
        command.env("KAS_GATEWAY_DATABASE_URL", &pg.url);
        command
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();

    let (started, stderr) = serve_output(on_pg(dirs[0].path()));
    assert!(!started);
    assert!(stderr.contains("KAS_GATEWAY_ENCRYPTION_KEYS"), "{stderr}");

    let mut first = on_pg(dirs[1].path());
    first.env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS);
    let first = Gateway::start(first);

    let mut other_key = on_pg(dirs[2].path());
    other_key.env(
        "KAS_GATEWAY_ENCRYPTION_KEYS",
        "k1=ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICA=",
    );
    let (started, stderr) = serve_output(other_key);
    assert!(!started);
    assert!(
        stderr.contains("the encryption key with id \"k1\" differs"),
        "{stderr}"
    );

    let mut same_key = on_pg(dirs[3].path());
    same_key.env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS);
    let second = Gateway::start(same_key);
    for gateway in [&first, &second] {
        let (status, _) = send(
            reqwest::Method::GET,
            &gateway.url("/api/v4/user"),
            token,
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
}

/// SQLite is one gateway's database: a second `serve` on the same data directory refuses to
/// start while the first runs, and a lost key file is noticed instead of replaced silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_serve_per_sqlite_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let token = "glpat-one-serve-test-token-000000";
    let mut first = Gateway::start(with_token(dir.path(), token));
    let (started, stderr) = serve_output(with_token(dir.path(), token));
    assert!(!started);
    assert!(
        stderr.contains("another kas-gateway is serving the data directory"),
        "{stderr}"
    );
    let (status, _) = send(
        reqwest::Method::GET,
        &first.url("/api/v4/user"),
        token,
        None,
    )
    .await;
    assert_eq!(status, 200, "the first one still serves");
    first.signal("TERM");
    assert_eq!(first.wait(), Some(0));
    let second = Gateway::start(with_token(dir.path(), token));
    drop(second);

    std::fs::remove_file(dir.path().join("encryption-keys")).unwrap();
    let (started, stderr) = serve_output(with_token(dir.path(), token));
    assert!(!started, "a new key under the old id would open nothing");
    assert!(
        stderr.contains("the encryption key with id \"k1\" differs"),
        "{stderr}"
    );
}

/// `agent-sim` refuses a token or a key that cannot be valid, such as the `null` that `jq -r`
/// prints for a missing field, instead of serving an agent that every gateway refuses.
#[test]
fn agent_sim_refuses_impossible_credentials() {
    let token = "glagent-0123456789abcdefghijklmnopqrstuvwxyz";
    for (args, says) in [
        (vec!["--token", "null"], "not one"),
        (vec!["--token", "glagent-"], "not one"),
        (
            vec!["--token", token, "--jwt-public-key", "null"],
            "public_key",
        ),
        (
            vec!["--token", token, "--jwt-public-key", "AAAA"],
            "public_key",
        ),
    ] {
        let output = Command::new(BIN)
            .args(["agent-sim", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("glagent-0123"),
            "the token was echoed: {stderr}"
        );
    }
}

/// Start-up mistakes read as one clear line naming the cause, even with `RUST_BACKTRACE` set:
/// PostgreSQL refusing the connection, a database that does not exist, a bad setting.
#[test]
fn start_up_errors_are_one_line_naming_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!("postgres://postgres@127.0.0.1:{port}/kas"),
            "refused",
        ),
        (
            "postgres://postgres@127.0.0.1:5432/kas_gateway_no_such_database".to_owned(),
            "kas_gateway_no_such_database",
        ),
    ];
    for (url, says) in cases {
        if url.contains(":5432/") && common::postgres_skipped() {
            continue;
        }
        let output = command(dir.path())
            .env("RUST_BACKTRACE", "1")
            .env("KAS_GATEWAY_DATABASE_URL", &url)
            .env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS)
            .arg("serve")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{stderr}");
        assert!(
            last.to_lowercase().contains(says),
            "{says:?} not in {last:?}"
        );
        assert!(!stderr.contains("backtrace"), "{stderr}");
        assert!(!stderr.contains("pool timed out"), "{stderr}");
    }
    let output = command(dir.path())
        .env("RUST_BACKTRACE", "1")
        .env("KAS_GATEWAY_LEASE_TTL_SECONDS", "2")
        .arg("serve")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("lease TTL must be at least"), "{stderr}");
}

/// The start is logged with the version and the effective configuration, secrets redacted;
/// SIGHUP is logged and survived (it would end the process silently otherwise).
#[test]
fn the_start_is_logged_and_sighup_survived() {
    let dir = tempfile::tempdir().unwrap();
    let token = "glpat-sighup-test-token-000000000";
    let mut gateway = Gateway::start(with_token(dir.path(), token));
    let log = gateway.log_text();
    let start = log
        .lines()
        .find(|l| l.contains("starting kas-gateway"))
        .expect("no start line");
    assert!(start.contains(env!("CARGO_PKG_VERSION")), "{start}");
    assert!(start.contains("REDACTED"), "{start}");
    assert!(!log.contains(token), "a secret in the log");
    gateway.signal("HUP");
    assert_eq!(
        gateway.wait_within(std::time::Duration::from_secs(1)),
        None,
        "SIGHUP ended the gateway"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gateway.log_text().contains("SIGHUP") {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP was not logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    gateway.signal("TERM");
    assert_eq!(gateway.wait(), Some(0));
}
