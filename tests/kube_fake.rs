//! The fake Kubernetes API server (`common::kube`) driven by the real kubectl, directly:
//! what kubectl asks of an upstream, checked before the gateway is put between them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::kube::{
    FakeKube, TOKEN_USER, have_kubectl, kubeconfig, kubectl, kubectl_version, spawn_kubectl,
    spawn_kubectl_env,
};
use rstest::rstest;
use serde_json::{Value, json};

const TOKEN: &str = "agent-upstream-token";
/// Reached only when something is broken; generous for a busy machine.
const WAIT: Duration = Duration::from_secs(20);

/// A fake and a kubeconfig that reaches it with the right token; `None` (the test skips)
/// when kubectl is missing outside CI.
async fn fake() -> Option<(FakeKube, tempfile::NamedTempFile)> {
    if !have_kubectl() {
        return None;
    }
    let fake = FakeKube::start(TOKEN).await;
    let config = kubeconfig(&fake.url, Some(&fake.ca_pem), TOKEN);
    Some((fake, config))
}

macro_rules! fake {
    () => {
        match fake().await {
            Some(started) => started,
            None => return,
        }
    };
}

/// Runs kubectl, which must succeed without a word on stderr; returns its stdout.
async fn run(config: &tempfile::NamedTempFile, args: &[&str]) -> String {
    let output = kubectl(config.path(), args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.is_empty(),
        "kubectl {args:?}: {}\n{stderr}",
        String::from_utf8_lossy(&output.stdout),
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs kubectl, which must fail; returns its stderr.
async fn fail(config: &tempfile::NamedTempFile, args: &[&str]) -> String {
    let output = kubectl(config.path(), args).await;
    assert!(!output.status.success(), "kubectl {args:?} succeeded");
    String::from_utf8(output.stderr).unwrap()
}

/// The requests past discovery and OpenAPI, as "METHOD path" without the query; forgets
/// them.
fn calls(fake: &FakeKube) -> Vec<String> {
    let calls = fake
        .requests()
        .iter()
        .map(|r| (r.method.as_str(), r.path.split('?').next().unwrap()))
        .filter(|(_, path)| {
            !matches!(*path, "/version" | "/api" | "/apis" | "/api/v1")
                && !path.starts_with("/apis/authentication.k8s.io/v1")
                && !path.starts_with("/openapi/")
        })
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    fake.clear_requests();
    calls
}

/// The words of each line of a table.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn get_shows_tables_lists_and_objects() {
    let (fake, config) = fake!();
    fake.put_configmap("settings", &[("colour", "blue"), ("size", "3")]);
    fake.put_pod("web-1");

    // The columns come from the fake's Table: kubectl has none of its own for ConfigMaps.
    let table = rows(&run(&config, &["get", "configmaps"]).await);
    assert_eq!(table[0], ["NAME", "DATA", "AGE"]);
    assert_eq!(table[1][..2], ["settings", "2"]);
    let pods = rows(&run(&config, &["get", "pods"]).await);
    assert_eq!(pods[0], ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert_eq!(pods[1][..4], ["web-1", "1/1", "Running", "0"]);
    let table_request = fake
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/api/v1/namespaces/default/configmaps?"))
        .unwrap();
    assert!(
        table_request
            .accept
            .unwrap()
            .starts_with("application/json;as=Table;v=v1;g=meta.k8s.io")
    );

    let list: Value =
        serde_json::from_str(&run(&config, &["get", "pods", "-o", "json"]).await).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "web-1");
    assert_eq!(list["items"][0]["status"]["phase"], "Running");

    let yaml = run(&config, &["get", "configmap", "settings", "-o", "yaml"]).await;
    for expected in [
        "kind: ConfigMap",
        "  colour: blue",
        "  name: settings",
        "  uid: ",
        "  resourceVersion: \"2\"",
    ] {
        assert!(
            yaml.contains(expected),
            "{expected:?} is missing from:\n{yaml}"
        );
    }

    let missing = fail(&config, &["get", "configmap", "nothing"]).await;
    assert!(
        missing.contains("Error from server (NotFound): configmaps \"nothing\" not found"),
        "{missing}"
    );

    let seen = fake.requests();
    assert!(seen.iter().all(|r| r.token.as_deref() == Some(TOKEN)));
    assert!(
        seen.iter()
            .all(|r| r.impersonate_user.is_none() && r.impersonate_groups.is_empty())
    );
}

#[tokio::test]
async fn watch_prints_changes_as_they_happen() {
    let (fake, config) = fake!();
    fake.put_configmap("settings", &[("colour", "blue")]);

    let mut watch = spawn_kubectl(config.path(), &["get", "configmaps", "--watch"]);
    let listed = watch.line_containing("settings", WAIT).await;
    assert_eq!(listed.split_whitespace().nth(1), Some("1"), "{listed}");
    fake.wait_streams(WAIT, |s| s.open() == 1).await;

    // Changes made after the watch started are printed as they happen.
    fake.put_configmap("later", &[("a", "1"), ("b", "2")]);
    let added = watch.line_containing("later", WAIT).await;
    assert_eq!(added.split_whitespace().nth(1), Some("2"), "{added}");
    fake.put_configmap("settings", &[("colour", "red"), ("size", "3"), ("x", "y")]);
    let modified = watch.line_containing("settings", WAIT).await;
    assert_eq!(modified.split_whitespace().nth(1), Some("3"), "{modified}");

    // A list, then a watch from the list's resource version.
    let watch_request = fake
        .requests()
        .into_iter()
        .find(|r| r.path.contains("watch=true"))
        .unwrap();
    assert!(
        watch_request.path.contains("resourceVersion=2"),
        "{watch_request:?}"
    );
    assert_eq!(
        calls(&fake),
        [
            "GET /api/v1/namespaces/default/configmaps",
            "GET /api/v1/namespaces/default/configmaps",
        ]
    );
}

/// Cancellation reaches the upstream: when kubectl dies, its watch ends on the server, over
/// HTTP/2 (kubectl's default) and over HTTP/1.1.
#[rstest]
#[case::http2(&[], "HTTP/2.0")]
#[case::http1(&[("DISABLE_HTTP2", "1")], "HTTP/1.1")]
#[tokio::test]
async fn killing_a_watch_closes_its_stream(#[case] env: &[(&str, &str)], #[case] protocol: &str) {
    let (fake, config) = fake!();
    fake.put_configmap("settings", &[("colour", "blue")]);
    let mut watch = spawn_kubectl_env(config.path(), env, &["get", "configmaps", "--watch"]);
    watch.line_containing("settings", WAIT).await;
    fake.wait_streams(WAIT, |s| s.open() == 1).await;
    let watching = fake
        .requests()
        .into_iter()
        .find(|r| r.path.contains("watch=true"))
        .unwrap();
    assert_eq!(watching.version, protocol);

    watch.kill();
    let streams = fake
        .wait_streams(Duration::from_secs(2), |s| s.closed == 1)
        .await;
    assert_eq!(streams.open(), 0);
}

#[tokio::test]
async fn apply_creates_then_updates() {
    let (fake, config) = fake!();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("app.yaml");
    let path = manifest.to_str().unwrap();
    let write = |data: &str| {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  annotations:\n    team: blue\ndata:\n{data}"
        );
        std::fs::write(&manifest, yaml).unwrap();
    };

    write("  mode: fast\n  level: \"1\"\n");
    assert_eq!(
        run(&config, &["apply", "-f", path]).await,
        "configmap/app created\n"
    );
    assert_eq!(
        calls(&fake),
        [
            "GET /api/v1/namespaces/default/configmaps/app",
            "POST /api/v1/namespaces/default/configmaps",
        ]
    );
    let created = fake.configmap("app").unwrap();
    assert_eq!(created["data"], json!({"mode": "fast", "level": "1"}));
    assert_eq!(created["metadata"]["annotations"]["team"], "blue");

    // kubectl computes a three-way patch from the last applied configuration: `level` goes.
    write("  mode: slow\n");
    assert_eq!(
        run(&config, &["apply", "-f", path]).await,
        "configmap/app configured\n"
    );
    let patch = fake
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(
        calls(&fake),
        [
            "GET /api/v1/namespaces/default/configmaps/app",
            "PATCH /api/v1/namespaces/default/configmaps/app",
        ]
    );
    let updated = fake.configmap("app").unwrap();
    assert_eq!(updated["data"], json!({"mode": "slow"}));
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    assert_ne!(
        updated["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );

    assert_eq!(
        run(&config, &["apply", "-f", path]).await,
        "configmap/app unchanged\n"
    );
    assert_eq!(
        calls(&fake),
        ["GET /api/v1/namespaces/default/configmaps/app"]
    );
}

#[tokio::test]
async fn delete_removes_the_object() {
    let (fake, config) = fake!();
    fake.put_configmap("old", &[("a", "1")]);
    assert_eq!(
        run(&config, &["delete", "configmap", "old"]).await,
        "configmap \"old\" deleted\n"
    );
    assert!(fake.configmap("old").is_none());
    // Then kubectl waits for the object to be gone: a GET (1.32) or a list by name (1.20).
    assert_eq!(
        calls(&fake)[0],
        "DELETE /api/v1/namespaces/default/configmaps/old"
    );

    let again = fail(&config, &["delete", "configmap", "old"]).await;
    assert!(again.contains("configmaps \"old\" not found"), "{again}");
}

#[tokio::test]
async fn logs_follow_prints_lines_as_they_are_logged() {
    let (fake, config) = fake!();
    fake.put_pod("web-1");
    fake.log_line("web-1", "starting");
    assert_eq!(run(&config, &["logs", "web-1"]).await, "starting\n");

    let mut logs = spawn_kubectl(config.path(), &["logs", "-f", "web-1"]);
    assert_eq!(logs.line_containing("starting", WAIT).await, "starting");
    fake.wait_streams(WAIT, |s| s.open() == 1).await;
    fake.log_line("web-1", "serving on :8080");
    assert_eq!(
        logs.line_containing("serving", WAIT).await,
        "serving on :8080"
    );
    let follow = fake
        .requests()
        .into_iter()
        .find(|r| r.path.contains("follow=true"))
        .unwrap();
    assert!(
        follow
            .path
            .starts_with("/api/v1/namespaces/default/pods/web-1/log?")
    );

    logs.kill();
    fake.wait_streams(WAIT, |s| s.closed == 1).await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized() {
    let (fake, _) = fake!();
    let wrong = kubeconfig(&fake.url, Some(&fake.ca_pem), "not-the-token");
    let stderr = fail(&wrong, &["get", "configmaps"]).await;
    // kubectl's words for a 401 (whose Status says "Unauthorized").
    assert!(
        stderr.contains("error: You must be logged in to the server"),
        "{stderr}"
    );
    let seen = fake.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|r| r.token.as_deref() == Some("not-the-token"))
    );
}

#[tokio::test]
async fn impersonation_is_seen() {
    let (fake, config) = fake!();
    fake.put_configmap("settings", &[]);
    let impersonate = ["--as", "alice", "--as-group", "devs", "--as-group", "ops"];
    run(
        &config,
        &[&["get", "configmaps"][..], &impersonate].concat(),
    )
    .await;
    let seen = fake.requests();
    assert!(
        seen.iter()
            .all(|r| r.impersonate_user.as_deref() == Some("alice"))
    );
    assert!(seen.iter().all(|r| r.impersonate_groups == ["devs", "ops"]));

    // `kubectl auth whoami` (1.27 and later) shows who the fake takes the caller for.
    if kubectl_version() < (1, 27) {
        return;
    }
    let whoami = |extra: &'static [&'static str]| {
        let config = &config;
        async move {
            let args = [&["auth", "whoami", "-o", "json"][..], extra].concat();
            let review: Value = serde_json::from_str(&run(config, &args).await).unwrap();
            review["status"]["userInfo"].clone()
        }
    };
    assert_eq!(whoami(&[]).await["username"], TOKEN_USER);
    assert_eq!(
        whoami(&["--as", "alice", "--as-group", "devs", "--as-group", "ops"]).await,
        json!({"username": "alice", "groups": ["devs", "ops"]})
    );
}

#[tokio::test]
async fn exec_and_port_forward_are_refused() {
    let (fake, config) = fake!();
    fake.put_pod("web-1");
    let exec = fail(&config, &["exec", "web-1", "--", "true"]).await;
    assert!(exec.contains("not supported by this fake"), "{exec}");
    let upgrades: Vec<String> = fake
        .requests()
        .into_iter()
        .filter_map(|r| r.upgrade)
        .collect();
    assert!(!upgrades.is_empty());

    let forward = fail(&config, &["port-forward", "pod/web-1", "18080:80"]).await;
    assert!(forward.contains("not supported by this fake"), "{forward}");
}
