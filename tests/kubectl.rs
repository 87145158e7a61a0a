//! The whole chain as people run it, every part a real process or server: kubectl with a
//! kubeconfig pointing at the gateway's `/k8s-proxy`, the gateway, `kas-gateway agent` dialled
//! over grpcs:// (JWT or mTLS) or grpc://, and an HTTPS Kubernetes API (`common::kube`) that
//! checks the agent's bearer token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::{BIN, Gateway, send, with_token};
use common::kube::{FakeKube, have_kubectl, kubeconfig, kubectl, spawn_kubectl};
use kas_gateway::certs::DevCa;
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};

const ROOT: &str = "glpat-kubectl-test-root-token-000";
const UPSTREAM_TOKEN: &str = "agent-service-account-token";
const WAIT: Duration = Duration::from_secs(20);

/// How the gateway and the agent authenticate each other.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// grpcs://, the gateway's JWT.
    JwtTls,
    /// grpcs://, the gateway's client certificate.
    Mtls,
    /// grpc://, the gateway's JWT.
    JwtCleartext,
}

/// A `kas-gateway agent` process, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything set up: the gateway, the agent, the upstream, and a user's kubeconfig.
struct Chain {
    gateway: Gateway,
    ingress: Ingress,
    /// Further replicas on the same PostgreSQL database, each behind its own ingress.
    replicas: Vec<(Gateway, Ingress)>,
    _database: Option<common::PgDatabase>,
    agent: Option<Agent>,
    agent_id: i64,
    fake: FakeKube,
    /// A Developer's token with the `k8s_proxy` scope.
    token: String,
    project: i64,
    _dir: tempfile::TempDir,
}

impl Chain {
    fn kubeconfig(&self, token: &str) -> tempfile::NamedTempFile {
        self.kubeconfig_for(self.agent_id, token)
    }

    fn kubeconfig_for(&self, agent_id: i64, token: &str) -> tempfile::NamedTempFile {
        kubeconfig(
            &format!("{}/k8s-proxy", self.ingress.url),
            Some(&self.ingress.ca_pem),
            &format!("pat:{agent_id}:{token}"),
        )
    }
}

/// HTTPS in front of the gateway, as an ingress or load balancer puts it: kubectl sends its
/// bearer token over TLS only. Bytes pass through as they are (HTTP/2 or HTTP/1.1, as
/// negotiated).
struct Ingress {
    url: String,
    ca_pem: String,
}

async fn ingress(backend: &str) -> Ingress {
    use rustls_pki_types::pem::PemObject;
    #[allow(clippy::disallowed_methods)] // kubectl checks the certificate against its clock
    let now = time::OffsetDateTime::now_utc();
    let ca = DevCa::new("ingress CA", now).unwrap();
    let pair = ca.server(&["localhost", "127.0.0.1"], now).unwrap();
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let backend = backend.to_owned();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut server) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    Ingress {
        url,
        ca_pem: ca.pair().cert,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The replicas' shared secret for the private API.
const PRIVATE_API_SECRET: &str = "cHJpdmF0ZS1hcGktc2VjcmV0LWZvci10ZXN0cy0wMDA=";

/// A gateway replica on `database`, with the private API.
fn replica(dir: &Path, database: &str, name: &str) -> Gateway {
    std::fs::create_dir_all(dir).unwrap();
    let secret = write(dir, "private-api-secret", PRIVATE_API_SECRET);
    let mut command = with_token(&dir.join("data"), ROOT);
    command
        .env("KAS_GATEWAY_PRIVATE_API_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_PRIVATE_API_SECRET_FILE", &secret)
        .env("KAS_GATEWAY_DATABASE_URL", database)
        .env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS)
        .env("KAS_GATEWAY_REPLICA_ID", name)
        .env("KAS_GATEWAY_LEASE_TTL_SECONDS", "6");
    Gateway::start(command)
}

async fn chain(mode: Mode) -> Chain {
    chain_of(mode, 1, "agent").await
}

/// The chain with `replicas` gateways: one on SQLite, or several on one PostgreSQL database.
async fn chain_of(mode: Mode, replicas: usize, access_as: &str) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start(UPSTREAM_TOKEN).await;
    let (gateway, others, database) = if replicas == 1 {
        (
            Gateway::start(with_token(&dir.path().join("gateway"), ROOT)),
            Vec::new(),
            None,
        )
    } else {
        let database = common::PgDatabase::create().await;
        let mut all: Vec<Gateway> = (0..replicas)
            .map(|i| {
                replica(
                    &dir.path().join(format!("gw-{i}")),
                    &database.url,
                    &format!("gw-{i}"),
                )
            })
            .collect();
        let first = all.remove(0);
        (first, all, Some(database))
    };
    let post = |path: &str, body: Value| {
        let url = gateway.url(path);
        async move {
            let (status, body) = send(Method::POST, &url, ROOT, Some(body)).await;
            assert!(status < 300, "{status} {body}");
            body
        }
    };
    let project = post("/api/v4/projects", json!({"name": "platform"})).await["id"]
        .as_i64()
        .unwrap();
    let agents = format!("/api/v4/projects/{project}/cluster_agents");
    let agent_id = post(&agents, json!({"name": "prod"})).await["id"]
        .as_i64()
        .unwrap();
    let agent_token =
        post(&format!("{agents}/{agent_id}/tokens"), json!({"name": "t"})).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
    let user = post(
        "/api/v4/users",
        json!({"username": "dev", "name": "Dev", "email": "dev@example.com"}),
    )
    .await["id"]
        .as_i64()
        .unwrap();
    let token = post(
        &format!("/api/v4/users/{user}/personal_access_tokens"),
        json!({"name": "kubectl", "scopes": ["k8s_proxy"]}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    post(
        &format!("/api/v4/projects/{project}/members"),
        json!({"user_id": user, "access_level": 30}),
    )
    .await;

    #[allow(clippy::disallowed_methods)] // certificates are checked against the wall clock
    let now = time::OffsetDateTime::now_utc();
    let ca = DevCa::new("agent CA", now).unwrap();
    let server = ca.server(&["localhost", "127.0.0.1"], now).unwrap();
    let client = ca.client("kas-gateway", now).unwrap();
    let port = free_port();
    let mut configuration = match mode {
        Mode::JwtTls | Mode::Mtls => json!({
            "url": format!("grpcs://127.0.0.1:{port}"),
            "ca_cert": ca.pair().cert,
        }),
        Mode::JwtCleartext => json!({"url": format!("grpc://127.0.0.1:{port}")}),
    };
    if let Mode::Mtls = mode {
        configuration["client_cert"] = json!(client.cert);
        configuration["client_key"] = json!(client.key);
    }
    let configuration = post(
        &format!("{agents}/{agent_id}/url_configurations"),
        configuration,
    )
    .await;

    let files = dir.path();
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("agent")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(write(files, "agent-token", &agent_token))
        .args(["--upstream-url", &fake.url])
        .arg("--upstream-ca-file")
        .arg(write(files, "upstream-ca.pem", &fake.ca_pem))
        .arg("--upstream-token-file")
        .arg(write(files, "upstream-token", UPSTREAM_TOKEN))
        .args(["--log-format", "json"])
        .args(["--access-as", access_as])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !matches!(mode, Mode::JwtCleartext) {
        command
            .arg("--tls-cert-file")
            .arg(write(files, "agent.pem", &server.cert))
            .arg("--tls-key-file")
            .arg(write(files, "agent-key.pem", &server.key));
    }
    match mode {
        Mode::Mtls => {
            command
                .arg("--client-ca-file")
                .arg(write(files, "client-ca.pem", &ca.pair().cert));
        }
        Mode::JwtTls | Mode::JwtCleartext => {
            command.args([
                "--jwt-public-key",
                configuration["public_key"].as_str().unwrap(),
            ]);
        }
    }
    let agent = Agent(command.spawn().unwrap());
    let mut replicas = Vec::new();
    for other in others {
        let ingress = ingress(&other.addr).await;
        replicas.push((other, ingress));
    }
    let chain = Chain {
        ingress: ingress(&gateway.addr).await,
        gateway,
        replicas,
        _database: database,
        agent: Some(agent),
        agent_id,
        fake,
        token,
        project,
        _dir: dir,
    };
    wait_for_state(&chain, "connected").await;
    chain
}

async fn wait_for_state(chain: &Chain, state: &str) {
    let url = chain.gateway.url(&format!(
        "/api/v4/projects/{}/cluster_agents/{}/connection",
        chain.project, chain.agent_id
    ));
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, connection) = send(Method::GET, &url, ROOT, None).await;
        if connection["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "not {state}: {connection}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs kubectl, which must succeed; its output.
async fn run(config: &tempfile::NamedTempFile, args: &[&str]) -> String {
    let output = kubectl(config.path(), args).await;
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs kubectl, which must fail; its error output.
async fn fail(config: &tempfile::NamedTempFile, args: &[&str]) -> String {
    let output = kubectl(config.path(), args).await;
    assert!(!output.status.success(), "kubectl {args:?} succeeded");
    String::from_utf8(output.stderr).unwrap()
}

#[rstest]
#[case::jwt_over_grpcs(Mode::JwtTls)]
#[case::mtls(Mode::Mtls)]
#[case::jwt_over_grpc(Mode::JwtCleartext)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reaches_the_cluster_through_the_gateway(#[case] mode: Mode) {
    if !have_kubectl() {
        return;
    }
    let chain = chain(mode).await;
    let config = chain.kubeconfig(&chain.token);
    chain
        .fake
        .put_configmap("settings", &[("colour", "blue"), ("size", "3")]);
    chain.fake.put_pod("web-1");

    // get: the upstream's table, through the agent with the agent's token.
    let table = run(&config, &["get", "configmaps"]).await;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("settings"), "{table}");
    let yaml = run(&config, &["get", "configmap", "settings", "-o", "yaml"]).await;
    assert!(yaml.contains("colour: blue"), "{yaml}");
    let seen = chain.fake.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|r| r.token.as_deref() == Some(UPSTREAM_TOKEN)),
        "the upstream saw another token than the agent's"
    );

    // get --watch: a change upstream arrives as it happens.
    let mut watch = spawn_kubectl(config.path(), &["get", "configmaps", "--watch"]);
    watch.line_containing("settings", WAIT).await;
    chain.fake.wait_streams(WAIT, |s| s.open() == 1).await;
    chain.fake.put_configmap("later", &[("a", "1")]);
    watch.line_containing("later", WAIT).await;

    // A client that goes away mid-watch cancels the upstream request.
    let closed_before = chain.fake.streams().closed;
    watch.kill();
    chain
        .fake
        .wait_streams(WAIT, |s| s.open() == 0 && s.closed > closed_before)
        .await;

    // apply (create, then update) and delete.
    let manifest = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let write_manifest = |colour: &str| {
        std::fs::write(
            manifest.path(),
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: default\n\
                 data:\n  colour: {colour}\n"
            ),
        )
        .unwrap();
    };
    write_manifest("green");
    let path = manifest.path().to_str().unwrap();
    let created = run(&config, &["apply", "-f", path]).await;
    assert!(created.contains("configmap/app created"), "{created}");
    write_manifest("yellow");
    let configured = run(&config, &["apply", "-f", path]).await;
    assert!(
        configured.contains("configmap/app configured"),
        "{configured}"
    );
    assert_eq!(
        chain.fake.configmap("app").unwrap()["data"]["colour"],
        "yellow"
    );
    let deleted = run(&config, &["delete", "configmap", "app"]).await;
    assert!(deleted.contains("\"app\" deleted"), "{deleted}");
    assert!(chain.fake.configmap("app").is_none());

    // logs -f: lines arrive as the pod writes them.
    let mut logs = spawn_kubectl(config.path(), &["logs", "-f", "web-1"]);
    chain.fake.wait_streams(WAIT, |s| s.open() == 1).await;
    chain.fake.log_line("web-1", "first line");
    logs.line_containing("first line", WAIT).await;
    chain.fake.log_line("web-1", "second line");
    logs.line_containing("second line", WAIT).await;
    logs.kill();

    // exec needs an upgrade, which the gateway refuses in words.
    let exec = fail(&config, &["exec", "web-1", "--", "true"]).await;
    assert!(
        exec.contains("do not pass through the gateway") || exec.contains("NotImplemented"),
        "{exec}"
    );

    // One audit line per proxied request, with the bytes each way; never a token or a body.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = chain.gateway.log_text();
    let audit: Vec<Value> = chain
        .gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "proxied")
        .collect();
    let get = audit
        .iter()
        .find(|l| {
            l["method"] == "GET"
                && l["path"] == "/api/v1/namespaces/default/configmaps/settings"
                && l["status"] == 200
        })
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(get["user"], "dev");
    assert_eq!(get["agent_id"], chain.agent_id);
    assert_eq!(get["ended"], "complete");
    assert!(get["bytes_received"].as_u64().unwrap() > 100, "{get}");
    assert!(
        audit
            .iter()
            .any(|l| l["path"].as_str().unwrap().ends_with("/configmaps")
                && l["ended"] == "client went away"),
        "the killed watch: {audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l["method"] == "POST" && l["bytes_sent"].as_u64().unwrap() > 0),
        "the apply's body: {audit:?}"
    );
    for secret in [chain.token.as_str(), UPSTREAM_TOKEN, "yellow"] {
        assert!(!log.contains(secret), "{secret} reached the log");
    }
}

/// A request without discovery first: kubectl shows the refusal's message as it is (its
/// discovery client shows only the reason). `--raw` takes the path from the server's root.
const RAW: &[&str] = &[
    "get",
    "--raw",
    "/k8s-proxy/api/v1/namespaces/default/configmaps",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_is_refused_in_words() {
    if !have_kubectl() {
        return;
    }
    let mut chain = chain(Mode::JwtTls).await;
    // The agent read the cluster's version as it started.
    assert!(chain.fake.requests().iter().any(|r| r.path == "/version"));
    chain.fake.clear_requests();
    // Wrong scope: `api` is not enough.
    let (_, user) = send(
        Method::POST,
        &chain.gateway.url("/api/v4/users"),
        ROOT,
        Some(json!({"username": "ops", "name": "Ops", "email": "ops@example.com"})),
    )
    .await;
    let (_, api_token) = send(
        Method::POST,
        &chain.gateway.url(&format!(
            "/api/v4/users/{}/personal_access_tokens",
            user["id"]
        )),
        ROOT,
        Some(json!({"name": "api", "scopes": ["api"]})),
    )
    .await;
    send(
        Method::POST,
        &chain
            .gateway
            .url(&format!("/api/v4/projects/{}/members", chain.project)),
        ROOT,
        Some(json!({"user_id": user["id"], "access_level": 40})),
    )
    .await;
    let scoped = fail(&chain.kubeconfig(api_token["token"].as_str().unwrap()), RAW).await;
    assert!(scoped.contains("k8s_proxy"), "{scoped}");
    // Wrong role: a Reporter.
    send(
        Method::DELETE,
        &chain.gateway.url(&format!(
            "/api/v4/projects/{}/members/{}",
            chain.project, user["id"]
        )),
        ROOT,
        None,
    )
    .await;
    send(
        Method::POST,
        &chain
            .gateway
            .url(&format!("/api/v4/projects/{}/members", chain.project)),
        ROOT,
        Some(json!({"user_id": user["id"], "access_level": 20})),
    )
    .await;
    let (_, reporter_token) = send(
        Method::POST,
        &chain.gateway.url(&format!(
            "/api/v4/users/{}/personal_access_tokens",
            user["id"]
        )),
        ROOT,
        Some(json!({"name": "k8s", "scopes": ["k8s_proxy"]})),
    )
    .await;
    let role = fail(
        &chain.kubeconfig(reporter_token["token"].as_str().unwrap()),
        RAW,
    )
    .await;
    assert!(role.contains("Developer"), "{role}");
    // Unknown agent.
    let unknown = chain.kubeconfig_for(999, &chain.token);
    let missing = fail(&unknown, RAW).await;
    assert!(missing.contains("agent not found"), "{missing}");
    // The agent disconnected.
    drop(chain.agent.take());
    wait_for_state(&chain, "backing_off").await;
    let down = fail(&chain.kubeconfig(&chain.token), RAW).await;
    // Discovery fails too, and says so.
    let discovery = fail(&chain.kubeconfig(&chain.token), &["get", "configmaps"]).await;
    assert!(discovery.contains("ServiceUnavailable"), "{discovery}");
    assert!(down.contains("not connected"), "{down}");
    assert!(
        chain.fake.requests().is_empty(),
        "a refused request reached the upstream"
    );
}

/// Two replicas on PostgreSQL: whichever one kubectl reaches, its requests get to the agent,
/// through the replica that holds the session when it is the other one; a watch through the
/// other replica, cancelled, ends upstream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_through_either_replica() {
    if !have_kubectl() || common::postgres_skipped() {
        return;
    }
    let chain = chain_of(Mode::JwtTls, 2, "agent").await;
    chain.fake.put_configmap("settings", &[("colour", "blue")]);
    let (_, other_ingress) = &chain.replicas[0];
    let through_other = kubeconfig(
        &format!("{}/k8s-proxy", other_ingress.url),
        Some(&other_ingress.ca_pem),
        &format!("pat:{}:{}", chain.agent_id, chain.token),
    );
    for config in [&chain.kubeconfig(&chain.token), &through_other] {
        let table = run(config, &["get", "configmaps"]).await;
        assert!(table.contains("settings"), "{table}");
    }
    // Which replica holds the agent: the other one forwards to it.
    let (_, connection) = send(
        Method::GET,
        &chain.gateway.url(&format!(
            "/api/v4/projects/{}/cluster_agents/{}/connection",
            chain.project, chain.agent_id
        )),
        ROOT,
        None,
    )
    .await;
    eprintln!("the agent is held by {}", connection["replica"]);
    let non_holder = if connection["replica"] == "gw-0" {
        &through_other
    } else {
        &chain.kubeconfig(&chain.token)
    };
    let mut watch = spawn_kubectl(non_holder.path(), &["get", "configmaps", "--watch"]);
    watch.line_containing("settings", WAIT).await;
    chain.fake.wait_streams(WAIT, |s| s.open() == 1).await;
    chain.fake.put_configmap("later", &[("a", "1")]);
    watch.line_containing("later", WAIT).await;
    let closed_before = chain.fake.streams().closed;
    watch.kill();
    chain
        .fake
        .wait_streams(WAIT, |s| s.open() == 0 && s.closed > closed_before)
        .await;
}

/// `--access-as user`: the agent impersonates the GitLab user, whatever the kubeconfig asks
/// (kubectl's own `--as` never reaches the cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_can_act_as_the_gitlab_user() {
    if !have_kubectl() || common::kube::kubectl_version() < (1, 27) {
        return;
    }
    let chain = chain_of(Mode::JwtTls, 1, "user").await;
    let config = chain.kubeconfig(&chain.token);
    for extra in [
        &[][..],
        &["--as", "system:admin", "--as-group", "system:masters"][..],
    ] {
        let args = [&["auth", "whoami", "-o", "json"][..], extra].concat();
        let review: Value = serde_json::from_str(&run(&config, &args).await).unwrap();
        assert_eq!(
            review["status"]["userInfo"],
            json!({
                "username": "gitlab:user:dev",
                "groups": ["gitlab:user", format!("gitlab:project_role:{}:developer", chain.project)],
            }),
            "{extra:?}"
        );
    }
    // Still with the agent's own token.
    assert!(
        chain
            .fake
            .requests()
            .iter()
            .all(|r| r.token.as_deref() == Some(UPSTREAM_TOKEN))
    );
}

/// Over plain HTTP (HTTP/1.1, which kubectl speaks to an `http://` server), a response with a
/// `Content-Length` is over with its last byte: the audit line says `complete`, and the
/// agent's stream is read to its end rather than reset as for a client that went away (under
/// load, those resets made h2 close the agent's whole session after 1,024). A client that
/// leaves a watch is still told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_responses_are_audited_as_complete() {
    let chain = chain(Mode::JwtCleartext).await;
    chain.fake.put_configmap("settings", &[("colour", "blue")]);
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let get = |path: &str| {
        client
            .get(chain.gateway.url(&format!("/k8s-proxy{path}")))
            .bearer_auth(format!("pat:{}:{}", chain.agent_id, chain.token))
            .send()
    };
    let object = "/api/v1/namespaces/default/configmaps/settings";
    for _ in 0..3 {
        let response = get(object).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.content_length().is_some());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["data"]["colour"], "blue");
    }
    let watch = get("/api/v1/namespaces/default/configmaps?watch=true")
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    chain.fake.wait_streams(WAIT, |s| s.open() == 1).await;
    drop(watch);
    chain.fake.wait_streams(WAIT, |s| s.open() == 0).await;

    let deadline = Instant::now() + WAIT;
    let audit = loop {
        let lines: Vec<Value> = chain
            .gateway
            .log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| event["message"] == "proxied")
            .collect();
        if lines.len() >= 4 {
            break lines;
        }
        assert!(Instant::now() < deadline, "audit lines: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ended = |path: &str| -> Vec<String> {
        audit
            .iter()
            .filter(|event| event["path"] == path)
            .map(|event| event["ended"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ended(object), ["complete", "complete", "complete"]);
    assert_eq!(
        ended("/api/v1/namespaces/default/configmaps"),
        ["client went away"]
    );
}
