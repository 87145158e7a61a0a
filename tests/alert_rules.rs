//! The sample Prometheus alerting rules: valid, firing where they should (`promtool test
//! rules`), and naming only metrics a real gateway exposes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::binary::{Gateway, with_token};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/prometheus/kas-gateway.rules.yml"
);

/// Every `kas_gateway_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kas_gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI"
        );
        eprintln!("no promtool: skipping");
        return;
    }
    let dir = Path::new(RULES).parent().unwrap();
    for args in [
        &["check", "rules", "kas-gateway.rules.yml"][..],
        &["test", "rules", "kas-gateway.rules.test.yml"][..],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_name_metrics_the_gateway_exposes() {
    let rules = std::fs::read_to_string(RULES).unwrap();
    let wanted = metric_names(&rules);
    assert!(wanted.len() >= 6, "{wanted:?}");
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(with_token(dir.path(), "glpat-alert-rules-test-token-000"));
    // A request and a gRPC call, so that their metrics exist.
    reqwest::get(gateway.url("/api/v4/version")).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let exposed: BTreeSet<String> = gateway
        .metrics()
        .await
        .into_iter()
        .map(|((name, _), _)| name)
        .collect();
    for name in &wanted {
        assert!(
            exposed.contains(name),
            "the rules use {name}, which the gateway does not expose"
        );
    }
}
