//! What a receptive agent's URL may be, on the real binary: forged log lines, credentials and
//! anything that would not be dialled as it reads are refused with GitLab's 400 (over REST)
//! or INVALID_ARGUMENT (over gRPC), nothing is stored, and accepted URLs are stored
//! normalised. The text log never lets a value start a line of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Backend;
use common::binary::{Gateway, on_backend, project_and_agent, send, with_token};
use kas_gateway::proto::v1 as pb;
use pb::url_configurations_client::UrlConfigurationsClient;
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};

const TOKEN: &str = "glpat-url-rules-test-token-00000";
const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO kas_gateway: FORGED root token glpat-x";

fn bad(message: &str) -> Value {
    json!({"message": format!("400 Bad request - [{}]", serde_json::to_string(message).unwrap())})
}

async fn start(backend: Backend, dir: &Path) -> Option<(Gateway, Option<common::PgDatabase>)> {
    let (command, pg) = on_backend(with_token(dir, TOKEN), backend).await?;
    Some((Gateway::start(command), pg))
}

#[rstest]
#[tokio::test]
async fn refused_urls_get_gitlab_messages_and_nothing_is_stored(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some((gateway, _pg)) = start(backend, dir.path()).await else {
        return;
    };
    let (agents, agent) = project_and_agent(&gateway, TOKEN).await;
    let configs = gateway.url(&format!("{agents}/{}/url_configurations", agent["id"]));
    let invalid = "Url is not a valid URL";
    let credentials = "Url must not contain a user name or password";
    let cases = [
        (format!("grpc://127.0.0.1:9/\n{FORGED}"), invalid),
        ("grpc://127.0.0.1:9\r\n".to_owned(), invalid),
        (" grpcs://agent.example.com".to_owned(), invalid),
        (
            "grpcs://agent.example.com:4242\u{1b}[2J".to_owned(),
            invalid,
        ),
        ("grpcs://agent\u{85}.example.com".to_owned(), invalid),
        ("grpcs://agent%0a.example.com".to_owned(), invalid),
        (
            "grpcs://user:s3cret@agent.example.com".to_owned(),
            credentials,
        ),
        ("grpcs://s3cret@agent.example.com".to_owned(), credentials),
        ("grpcs://agent.example.com/agent".to_owned(), invalid),
        ("grpcs://agent.example.com?token=s3cret".to_owned(), invalid),
        ("grpcs://agent.example.com#s3cret".to_owned(), invalid),
        ("grpcs://agent.example.com:0".to_owned(), invalid),
        ("grpcs://agent..example.com".to_owned(), invalid),
        ("grpcs://agent$.example.com".to_owned(), invalid),
        ("grpcs://[fe80::1%25eth0]:4242".to_owned(), invalid),
    ];
    for (url, message) in &cases {
        let (status, body) = send(Method::POST, &configs, TOKEN, Some(json!({ "url": url }))).await;
        assert_eq!((status, &body), (400, &bad(message)), "for {url:?}");
    }
    let (status, listed) = send(Method::GET, &configs, TOKEN, None).await;
    assert_eq!((status, listed), (200, json!([])));
    // Refusals say nothing of the secret, and it never reaches the log.
    assert!(!gateway.log_text().contains("s3cret"));
}

#[rstest]
#[tokio::test]
async fn urls_are_stored_and_shown_normalised(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some((gateway, _pg)) = start(backend, dir.path()).await else {
        return;
    };
    let (agents, _) = project_and_agent(&gateway, TOKEN).await;
    let cases = [
        (
            "GRPCS://Bücher.Example:4242/",
            "grpcs://xn--bcher-kva.example:4242",
        ),
        ("grpc://[0:0:0:0:0:0:0:1]:04242", "grpc://[::1]:4242"),
        ("grpc://10.0.0.1/", "grpc://10.0.0.1"),
    ];
    for (i, (given, stored)) in cases.iter().enumerate() {
        let (_, agent) = send(
            Method::POST,
            &gateway.url(&agents),
            TOKEN,
            Some(json!({"name": format!("agent-{i}")})),
        )
        .await;
        let configs = gateway.url(&format!("{agents}/{}/url_configurations", agent["id"]));
        let (status, created) =
            send(Method::POST, &configs, TOKEN, Some(json!({ "url": given }))).await;
        assert_eq!((status, &created["url"]), (201, &json!(stored)), "{given}");
        let (_, listed) = send(Method::GET, &configs, TOKEN, None).await;
        assert_eq!(listed[0]["url"], json!(stored));
        let (_, connection) = send(
            Method::GET,
            &gateway.url(&format!("{agents}/{}/connection", agent["id"])),
            TOKEN,
            None,
        )
        .await;
        assert_eq!(connection["url"], json!(stored));
    }
}

#[rstest]
#[tokio::test]
async fn grpc_creates_follow_the_same_rules(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some((gateway, _pg)) = start(backend, dir.path()).await else {
        return;
    };
    let (_, agent) = project_and_agent(&gateway, TOKEN).await;
    let agent_id = agent["id"].as_i64().unwrap();
    let channel = tonic::transport::Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UrlConfigurationsClient::new(channel);
    let create = |url: &str| {
        let mut request = tonic::Request::new(pb::CreateUrlConfigurationRequest {
            agent_id,
            url: url.to_owned(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("private-token", TOKEN.parse().unwrap());
        request
    };
    for (url, message) in [
        (
            format!("grpc://127.0.0.1:9/\n{FORGED}"),
            "Url is not a valid URL",
        ),
        ("grpc://127.0.0.1:9\0".to_owned(), "Url is not a valid URL"),
        (
            "grpcs://user:s3cret@agent.example.com".to_owned(),
            "Url must not contain a user name or password",
        ),
    ] {
        let status = client
            .create_url_configuration(create(&url))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::InvalidArgument, message),
            "for {url:?}"
        );
    }
    let created = client
        .create_url_configuration(create("GRPCS://Agent.Example.com:4242/"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.url, "grpcs://agent.example.com:4242");
}

/// `kas-gateway serve` with text logs, which the shared harness does not read.
struct TextGateway {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl TextGateway {
    fn start(dir: &Path) -> Self {
        // The database elsewhere: the test is about the log, not about a newline in a
        // database URL.
        let database = dir.parent().unwrap().join("kas-gateway.db");
        let mut child = common::binary::command(dir)
            .env(
                "KAS_GATEWAY_DATABASE_URL",
                format!("sqlite://{}", database.display()),
            )
            .env("KAS_GATEWAY_LOG_FORMAT", "text")
            .env("KAS_GATEWAY_LOG_LEVEL", "info")
            .arg("serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let found = log.lock().unwrap().iter().find_map(|line| {
                line.contains(" listening ")
                    .then(|| line.split_once(" addr=")?.1.split(' ').next())
                    .flatten()
                    .map(str::to_owned)
            });
            if let Some(addr) = found {
                break addr;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not start: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, addr, log }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TextGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A newline in a logged value (here the data directory's name, which the first start logs
/// as the root token's file) and a refused URL with a forged line in it: every line of the
/// text log is still one of the gateway's own.
#[tokio::test]
async fn text_log_values_never_start_a_line() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join(format!("data\n{FORGED}"));
    let gateway = TextGateway::start(&dir);
    let token = std::fs::read_to_string(dir.join("root-token")).unwrap();
    let token = token.trim();
    let base = format!("http://{}", gateway.addr);
    let (_, project) = send(
        Method::POST,
        &format!("{base}/api/v4/projects"),
        token,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents = format!("{base}/api/v4/projects/{}/cluster_agents", project["id"]);
    let (_, agent) = send(Method::POST, &agents, token, Some(json!({"name": "a"}))).await;
    let (status, _) = send(
        Method::POST,
        &format!("{agents}/{}/url_configurations", agent["id"]),
        token,
        Some(json!({"url": format!("grpc://127.0.0.1:9/\n{FORGED}")})),
    )
    .await;
    assert_eq!(status, 400);

    // The request's own log line comes after the response: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway
        .lines()
        .iter()
        .any(|l| l.contains("url_configurations") && l.contains("status=400"))
    {
        assert!(Instant::now() < deadline, "{:?}", gateway.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = gateway.lines();
    let escaped = format!(r"data\n{FORGED}");
    assert!(
        lines.iter().any(|l| l.contains(&escaped)),
        "the directory is logged, escaped: {lines:#?}"
    );
    for line in &lines {
        assert!(!line.starts_with(FORGED), "forged line: {lines:#?}");
        // Every line is the gateway's: a timestamp of now, then a level.
        let (stamp, rest) = line.split_once(' ').unwrap();
        assert!(
            stamp.len() == 27 && stamp.ends_with('Z') && !stamp.starts_with("2026-01-01T00:00:00"),
            "{line}"
        );
        assert!(
            ["INFO ", "WARN ", "ERROR ", "DEBUG ", "TRACE "]
                .iter()
                .any(|level| rest.trim_start().starts_with(level)),
            "{line}"
        );
    }
}
