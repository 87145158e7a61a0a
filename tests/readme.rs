//! The README's walkthrough, run as a script exactly as written (only the two ports are
//! swapped for free ones), on a data directory that already has projects and agents, twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::binary::{BIN, Gateway, command, send};
use reqwest::Method;
use serde_json::json;

/// The code block that follows the marker comment in the README.
fn walkthrough() -> String {
    let readme = include_str!("../README.md");
    let marker = "<!-- tests/readme.rs runs this block as a script -->";
    let after = &readme[readme
        .find(marker)
        .expect("the README marks its walkthrough")..];
    let start = after.find("```sh\n").unwrap() + "```sh\n".len();
    let end = after[start..].find("```").unwrap();
    after[start..start + end].to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_works_as_written_on_a_used_data_directory() {
    if Command::new("jq").arg("--version").output().is_err()
        || Command::new("curl").arg("--version").output().is_err()
    {
        panic!("the walkthrough needs jq and curl (.ci/run installs them)");
    }
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    // `cargo run --release -- serve` from the repository root: ./data, on the README's port.
    let mut gateway = command(&work.path().join("data"));
    gateway
        .current_dir(work.path())
        .env("KAS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("KAS_GATEWAY_LOG_LEVEL", "info");
    let gateway = Gateway::start(gateway);
    let root = std::fs::read_to_string(work.path().join("data/root-token")).unwrap();
    let root = root.trim();
    // Earlier use: agents 1 to 3 in another project, and the demo project already there, so
    // that an id or a name the script assumed would not be the one it creates.
    for name in ["earlier", "demo"] {
        let (status, _) = send(
            Method::POST,
            &gateway.url("/api/v4/projects"),
            root,
            Some(json!({ "name": name })),
        )
        .await;
        assert_eq!(status, 201);
    }
    for name in ["old-1", "old-2", "old-3"] {
        let (status, _) = send(
            Method::POST,
            &gateway.url("/api/v4/projects/root%2Fearlier/cluster_agents"),
            root,
            Some(json!({ "name": name })),
        )
        .await;
        assert_eq!(status, 201);
    }

    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    for run in 1..=2 {
        let agent_port = free_port();
        let script = walkthrough()
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("localhost:4242", &format!("localhost:{agent_port}"))
            .replace("127.0.0.1:4242", &format!("127.0.0.1:{agent_port}"));
        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(work.path())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "run {run} of the walkthrough failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- gateway\n{}",
            gateway.log_text()
        );
        assert!(
            stdout.contains(r#""state":"connected""#),
            "run {run}: the agent was not connected\n{stdout}\n{stderr}"
        );
    }
}
