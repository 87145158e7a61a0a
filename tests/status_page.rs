//! The status page in a real browser: headless Chromium, driven over the DevTools protocol,
//! shows agents in each state and follows one as it connects, without a reload. Screenshots
//! before and after are kept as test artifacts (`status-page-*.png` in the target directory's
//! `tmp`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::{Gateway, jwt_sim, receptive_agent, send, with_token};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "glpat-status-page-test-token-000";

/// A headless Chromium with its DevTools endpoint, killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    /// `None` when no Chromium is installed and the test may skip (never in CI).
    fn start() -> Option<Self> {
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())?;
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,720",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    let port: u16 = url.split('/').next().unwrap().parse().unwrap();
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Chromium did not start its DevTools endpoint");
        Some(Self {
            child,
            _profile: profile,
            port,
        })
    }

    /// The page's DevTools session.
    async fn page(&self) -> Page {
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let target = targets.iter().find(|t| t["type"] == "page").unwrap();
        let url = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Page { socket, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page, spoken to with DevTools commands.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("no answer from the browser")
                .unwrap()
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    async fn wait_for(&mut self, expression: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.eval(expression).await != json!(true) {
            assert!(Instant::now() < deadline, "never true: {expression}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the page, written to the target directory's `tmp` as `name`.
    async fn screenshot(&mut self, name: &str) {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_every_state_and_follows_a_connecting_agent() {
    let Some(browser) = Browser::start() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is required in CI"
        );
        eprintln!("no Chromium: skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // First without denied networks, so that a link-local URL can be configured; the gateway
    // the page is read from refuses it (the default list), which leaves that agent failed.
    let mut command = with_token(dir.path(), TOKEN);
    command.env("KAS_GATEWAY_DIALER_DENIED_NETWORKS", "");
    let mut gateway = Gateway::start(command);
    let (_, project) = send(
        Method::POST,
        &gateway.url("/api/v4/projects"),
        TOKEN,
        Some(json!({"name": "platform"})),
    )
    .await;
    let agents = format!("/api/v4/projects/{}/cluster_agents", project["id"]);

    // Connected: an agent that answers.
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    let (token, config) = receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "prod-eu",
        &format!("grpc://127.0.0.1:{up_port}"),
    )
    .await;
    let _up = jwt_sim(token, &config, up);
    // Backing off: nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "staging",
        &format!("grpc://127.0.0.1:{closed_port}"),
    )
    .await;
    // Failed (once restarted): a link-local address, which the default denied networks refuse.
    receptive_agent(&gateway, TOKEN, &agents, "lab", "grpc://169.254.10.10:4242").await;
    // Connecting: the port takes connections into its backlog, and nobody answers yet.
    let late = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let late_port = late.local_addr().unwrap().port();
    let (late_token, late_config) = receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "edge",
        &format!("grpc://127.0.0.1:{late_port}"),
    )
    .await;
    let late_id = late_config["agent_id"].as_i64().unwrap();
    gateway.signal("TERM");
    gateway.wait();
    let mut command = with_token(dir.path(), TOKEN);
    // The late agent stays "connecting" (its HTTP/2 start waits) for the whole test.
    command.env("KAS_GATEWAY_DIALER_CONNECT_TIMEOUT_SECONDS", "60");
    let gateway = Gateway::start(command);

    let mut page = browser.page().await;
    page.call("Page.enable", json!({})).await;
    page.call("Page.navigate", json!({"url": gateway.ops_url("/")}))
        .await;
    page.wait_for(
        "document.getElementById('live') && document.getElementById('live').className === 'on'",
        Duration::from_secs(20),
    )
    .await;
    // Every state on the page, counted and coloured.
    let counts = "JSON.stringify(['connected','connecting','backing_off','failed','pending']\
                  .map(s => document.getElementById('count-' + s).textContent))";
    page.wait_for(
        &format!("{counts} === JSON.stringify(['1','1','1','1','0'])"),
        Duration::from_secs(20),
    )
    .await;
    let rows = page
        .eval(
            "Array.from(document.querySelectorAll('#agents tbody tr')).map(r => ({\
               project: r.cells[0].textContent, agent: r.cells[1].textContent, \
               state: r.dataset.state, colour: getComputedStyle(r.cells[3].firstElementChild).backgroundColor, \
               error: r.cells[4].textContent, since: r.cells[5].textContent, replica: r.cells[6].textContent}))",
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["agent"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
    };
    assert_eq!(row("prod-eu")["state"], "connected");
    assert!(row("prod-eu")["since"].as_str().unwrap().ends_with("UTC"));
    assert_eq!(row("staging")["state"], "backing_off");
    assert!(
        row("staging")["error"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    assert_eq!(row("lab")["state"], "failed");
    assert!(
        row("lab")["error"]
            .as_str()
            .unwrap()
            .contains("refused destination")
    );
    assert_eq!(row("edge")["state"], "connecting");
    assert_eq!(row("prod-eu")["project"], "root/platform");
    let colours: std::collections::HashSet<&str> =
        rows.iter().map(|r| r["colour"].as_str().unwrap()).collect();
    assert_eq!(colours.len(), 4, "one colour per state: {rows:?}");
    page.screenshot("status-page-before.png").await;

    // The late agent answers: its row turns connected without a reload.
    page.eval("window.notReloaded = true").await;
    let _late = jwt_sim(late_token, &late_config, late);
    page.wait_for(
        &format!(
            "document.getElementById('agent-{late_id}').dataset.state === 'connected' \
             && window.notReloaded === true"
        ),
        Duration::from_secs(20),
    )
    .await;
    page.wait_for(
        &format!("{counts} === JSON.stringify(['2','0','1','1','0'])"),
        Duration::from_secs(5),
    )
    .await;
    page.screenshot("status-page-after.png").await;

    // Filtered by state, and the same page without JavaScript: complete HTML from the server.
    let response = reqwest::get(gateway.ops_url("/?state=failed"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    let html = response.text().await.unwrap();
    assert!(html.contains("lab"));
    assert!(!html.contains("prod-eu"));
    assert!(html.contains("<b id=\"count-connected\">2</b>"), "{html}");
    // No secret on it: no token, no key.
    let all = reqwest::get(gateway.ops_url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(all.contains("edge"));
    for secret in [
        TOKEN,
        "glagent-",
        "PRIVATE KEY",
        late_config["public_key"].as_str().unwrap(),
    ] {
        assert!(!all.contains(secret), "{secret} on the status page");
    }
    let unknown = reqwest::get(gateway.ops_url("/?state=sleeping"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
}
