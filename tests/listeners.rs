//! The listeners against hostile clients, on the real binary over loopback: unauthenticated
//! gRPC bodies, connection and stream caps, slow and silent clients (cleartext and TLS), file
//! descriptor exhaustion, and a shutdown that ends within its drain time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::binary::{BIN, Gateway, with_token};
use kas_gateway::certs::DevCa;
use kas_gateway::proto::v1 as pb;
use pb::sessions_client::SessionsClient;
use pb::url_configurations_client::UrlConfigurationsClient;
use rstest::rstest;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;

const TOKEN: &str = "glpat-listener-test-token-000000";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A gateway with these extra environment variables, and TLS when `tls` holds the CA's
/// directory.
fn gateway(dir: &Path, env: &[(&str, &str)], tls: Option<&Path>) -> Gateway {
    let mut command = with_token(dir, TOKEN);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(certs) = tls {
        command
            .env("KAS_GATEWAY_TLS_CERT_FILE", certs.join("server.pem"))
            .env("KAS_GATEWAY_TLS_KEY_FILE", certs.join("server-key.pem"));
    }
    Gateway::start(command)
}

/// A CA and a server certificate for `localhost`, written to a new directory; returns the
/// directory and a client configuration that trusts the CA.
fn tls_files() -> (tempfile::TempDir, Arc<rustls::ClientConfig>) {
    #[allow(clippy::disallowed_methods)]
    let now = time::OffsetDateTime::now_utc();
    let ca = DevCa::new("listener test", now).unwrap();
    let server = ca.server(&["localhost"], now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &server.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pair().cert.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (dir, Arc::new(config))
}

/// A connection to the gateway, through TLS when a client configuration is given.
async fn connect(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Box<dyn Io> {
    try_connect(addr, tls)
        .await
        .expect("the gateway refused the connection or its handshake")
}

/// [`connect`], or `None` when the gateway closed the connection during the handshake.
async fn try_connect(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    match tls {
        None => Some(Box::new(tcp)),
        Some(config) => {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
            let stream = connector.connect(name, tcp).await.ok()?;
            Some(Box::new(stream))
        }
    }
}

/// Reads until the gateway closes the connection; returns what it sent, or `None` if the
/// connection is still open after `limit`.
async fn closed_within(io: &mut (dyn Io + '_), limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    outcome
        .ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

async fn grpc_channel(gateway: &Gateway) -> Channel {
    Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_token_metadata<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("private-token", TOKEN.parse().unwrap());
    request
}

/// 100 calls of 4 MB each on one HTTP/2 connection, without credentials: every one is refused
/// from its headers, and the gateway's memory does not grow with what the client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_grpc_bodies_are_never_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), &[], None);
    let channel = grpc_channel(&gateway).await;
    let (rss_before, _) = gateway.memory_kib();
    let big = "x".repeat(4 * 1024 * 1024);
    let calls = (0..100).map(|_| {
        let mut client = UrlConfigurationsClient::new(channel.clone());
        let request = pb::CreateUrlConfigurationRequest {
            agent_id: 1,
            url: "grpc://127.0.0.1:1".into(),
            client_cert: Some(big.clone()),
            ..Default::default()
        };
        async move { client.create_url_configuration(request).await }
    });
    let outcomes = futures::future::join_all(calls).await;
    for outcome in &outcomes {
        let code = outcome.as_ref().map_err(tonic::Status::code).unwrap_err();
        assert_eq!(code, Code::Unauthenticated, "{outcome:?}");
    }
    let (_, peak) = gateway.memory_kib();
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 64,
        "the gateway's peak memory grew by {grown_mib} MiB for 400 MB of unauthenticated calls"
    );

    // Authenticated, a message over the API's largest request is refused unread...
    let mut client = UrlConfigurationsClient::new(channel.clone());
    let oversized = client
        .create_url_configuration(with_token_metadata(pb::CreateUrlConfigurationRequest {
            agent_id: 1,
            url: "grpc://127.0.0.1:1".into(),
            client_cert: Some(big.clone()),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");
    // ...while the largest legitimate one (three PEM fields of 64 KiB) is read and judged.
    let pem = "p".repeat(64 * 1024);
    let largest = client
        .create_url_configuration(with_token_metadata(pb::CreateUrlConfigurationRequest {
            agent_id: 999,
            url: "grpcs://127.0.0.1:1".into(),
            client_cert: Some(pem.clone()),
            client_key: Some(pem.clone()),
            ca_cert: Some(pem),
            tls_host: Some("localhost".into()),
        }))
        .await
        .unwrap_err();
    assert_eq!(largest.code(), Code::NotFound, "{largest:?}");
}

/// The gateway announces its cap on concurrent streams, and the connection cap makes clients
/// over it wait until another leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(
        dir.path(),
        &[
            ("KAS_GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS", "7"),
            ("KAS_GATEWAY_HTTP_MAX_CONNECTIONS", "3"),
        ],
        None,
    );

    let tcp = TcpStream::connect(&gateway.addr).await.unwrap();
    let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let request = http::Request::get(gateway.url("/-/liveness"))
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        _ = &mut connection => panic!("the connection ended"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(connection.max_concurrent_send_streams(), 7);

    // The HTTP/2 connection is one of three; two more fill the budget.
    let mut second = TcpStream::connect(&gateway.addr).await.unwrap();
    let _third = TcpStream::connect(&gateway.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut waiting = TcpStream::connect(&gateway.addr).await.unwrap();
    waiting
        .write_all(b"GET /-/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(1), waiting.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a fourth connection was served over the cap"
    );
    second.shutdown().await.unwrap();
    drop(second);
    let answer = closed_within(&mut waiting, Duration::from_secs(5))
        .await
        .expect("the waiting client was not served once a connection closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(connection);
}

/// Header tricklers, silent connections, slow bodies and idle HTTP/2 connections are all
/// closed within their timeouts, on the cleartext and on the TLS listener.
#[rstest]
#[case::cleartext(false)]
#[case::tls(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off(#[case] use_tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (certs, client_tls) = tls_files();
    let gateway = gateway(
        dir.path(),
        &[
            ("KAS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS", "2"),
            ("KAS_GATEWAY_HTTP_BODY_TIMEOUT_SECONDS", "3"),
            ("KAS_GATEWAY_HTTP_IDLE_TIMEOUT_SECONDS", "2"),
        ],
        use_tls.then(|| certs.path()),
    );
    let tls = use_tls.then_some(&client_tls);

    // Slow bodies first, on their own (their heads must beat the header timeout even on a
    // loaded machine): a complete, authenticated head, then 10 of 100 announced bytes.
    let slow_bodies = (0..10).map(|_| async {
        let mut io = connect(&gateway.addr, tls).await;
        let head = format!(
            "POST /api/v4/projects HTTP/1.1\r\nHost: x\r\nPrivate-Token: {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":\"x"
        );
        io.write_all(head.as_bytes()).await.unwrap();
        closed_within(&mut *io, Duration::from_secs(8)).await
    });
    for answer in futures::future::join_all(slow_bodies).await {
        let answer = answer.expect("a slow body was not cut off");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "a slow body gets 408: {answer}"
        );
    }

    // Then together: header tricklers, one byte every 300 ms, never a complete head...
    let started = Instant::now();
    let tricklers = (0..50).map(|_| async {
        // A handshake cut off by the header timeout is a closed connection too.
        let Some(mut io) = try_connect(&gateway.addr, tls).await else {
            return true;
        };
        let head =
            b"GET /api/v4/user HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head {
            if io.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if started.elapsed() > Duration::from_secs(10) {
                return false;
            }
        }
        false
    });
    // ...and silent clients: a TCP connection (with TLS: a finished handshake), not one byte.
    let silent = (0..if use_tls { 50 } else { 200 }).map(|_| async {
        let Some(mut io) = try_connect(&gateway.addr, tls).await else {
            return true;
        };
        closed_within(&mut *io, Duration::from_secs(8))
            .await
            .is_some()
    });
    let (tricklers, silent) = tokio::join!(
        futures::future::join_all(tricklers),
        futures::future::join_all(silent),
    );
    assert!(
        tricklers.iter().all(|closed| *closed),
        "header tricklers still open: {tricklers:?}"
    );
    assert!(
        silent.iter().all(|closed| *closed),
        "silent connections still open: {silent:?}"
    );

    // HTTP/2 (cleartext only here): after one request, an idle connection is closed.
    if !use_tls {
        let tcp = TcpStream::connect(&gateway.addr).await.unwrap();
        let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let request = http::Request::get(gateway.url("/-/liveness"))
            .body(())
            .unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        tokio::select! {
            response = response => assert_eq!(response.unwrap().status(), 200),
            _ = &mut connection => panic!("the connection ended early"),
        }
        let idle_since = Instant::now();
        tokio::time::timeout(Duration::from_secs(6), connection)
            .await
            .expect("an idle HTTP/2 connection stayed open")
            .ok();
        assert!(idle_since.elapsed() >= Duration::from_millis(1500));
    }

    // Meanwhile, a well-behaved client is served as usual.
    let mut io = connect(&gateway.addr, tls).await;
    io.write_all(b"GET /-/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut *io, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Out of file descriptors, the TLS listener pauses accepting instead of spinning, logs the
/// condition a bounded number of times, and serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_listener_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, client_tls) = tls_files();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAS_GATEWAY_DATA_DIR", dir.path())
        .env("KAS_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_LOG_FORMAT", "json")
        .env("KAS_GATEWAY_LOG_LEVEL", "info")
        .env("KAS_GATEWAY_BOOTSTRAP_TOKEN", TOKEN)
        .env("KAS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS", "30")
        .env("KAS_GATEWAY_TLS_CERT_FILE", certs.path().join("server.pem"))
        .env(
            "KAS_GATEWAY_TLS_KEY_FILE",
            certs.path().join("server-key.pem"),
        );
    let gateway = Gateway::start(command);

    let mut held = Vec::new();
    for _ in 0..90 {
        held.push(TcpStream::connect(&gateway.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = gateway.cpu_time();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = gateway.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(500),
        "the gateway used {cpu:?} of CPU in 3 s while out of file descriptors"
    );
    let failures = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("accepting connections failed"))
        .count();
    assert!(
        (1..=2).contains(&failures),
        "{failures} log lines about failed accepts in 3.5 s"
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut io = connect(&gateway.addr, Some(&client_tls)).await;
        io.write_all(b"GET /-/liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_within(&mut *io, Duration::from_secs(2)).await;
        if answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(Instant::now() < deadline, "the listener did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM with a half-sent request (cleartext and TLS) and an open `WatchSessions` stream:
/// the stream ends with `UNAVAILABLE` at once, and the process exits within the drain time.
#[rstest]
#[case::cleartext(false)]
#[case::tls(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_drain_time(#[case] use_tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (certs, client_tls) = tls_files();
    let mut gateway = gateway(
        dir.path(),
        &[
            ("KAS_GATEWAY_SHUTDOWN_DRAIN_SECONDS", "2"),
            ("KAS_GATEWAY_GRPC_LISTEN", "127.0.0.1:0"),
        ],
        use_tls.then(|| certs.path()),
    );
    let tls = use_tls.then_some(&client_tls);
    let mut half_sent = connect(&gateway.addr, tls).await;
    half_sent
        .write_all(
            format!(
                "POST /api/v4/projects HTTP/1.1\r\nHost: x\r\nPrivate-Token: {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na"
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    let watch = if use_tls {
        None
    } else {
        let mut sessions = SessionsClient::new(grpc_channel(&gateway).await);
        let stream = sessions
            .watch_sessions(with_token_metadata(pb::WatchSessionsRequest {}))
            .await
            .unwrap()
            .into_inner();
        Some(stream)
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    gateway.signal("TERM");
    if let Some(mut stream) = watch {
        let ended = tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .expect("the watch stream did not end");
        let status = ended.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(signalled.elapsed() < Duration::from_secs(2));
    }
    let code = gateway
        .wait_within(Duration::from_secs(8))
        .expect("the gateway did not exit within the drain time and a margin");
    assert_eq!(code, Some(0));
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "exit took {took:?} with a drain time of 2 s"
    );
    assert!(
        closed_within(&mut *half_sent, Duration::from_secs(1))
            .await
            .is_some()
    );
    let log = gateway.log_text();
    assert!(log.contains("the drain time is over"), "{log}");
    assert!(log.contains("\"message\":\"stopped\""));
}

/// With a blackout time, readiness fails at SIGTERM while requests are still served; then the
/// listeners close and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_first_during_the_blackout() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = gateway(
        dir.path(),
        &[("KAS_GATEWAY_SHUTDOWN_BLACKOUT_SECONDS", "2")],
        None,
    );
    let client = reqwest::Client::new();
    let ready = client
        .get(gateway.url("/-/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let signalled = Instant::now();
    gateway.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = client
        .get(gateway.url("/-/readiness"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    let user = client
        .get(gateway.url("/api/v4/user"))
        .header("Private-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 200, "requests are still served");
    let code = gateway.wait_within(Duration::from_secs(8)).unwrap();
    assert_eq!(code, Some(0));
    assert!(signalled.elapsed() >= Duration::from_secs(2));
    assert!(TcpStream::connect(&gateway.addr).await.is_err());
}

/// `CreateUrlConfigurationRequest` with `url` as raw bytes, to send what a string cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateRequest {
    #[prost(int64, tag = "1")]
    agent_id: i64,
    #[prost(bytes = "vec", tag = "2")]
    url: Vec<u8>,
}

/// A message that does not decode (invalid UTF-8 in a string field) is the client's mistake:
/// `INVALID_ARGUMENT`, never `INTERNAL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_grpc_messages_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(dir.path(), &[], None);
    let mut grpc = tonic::client::Grpc::new(grpc_channel(&gateway).await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawCreateRequest, pb::UrlConfiguration>::default();
    let path = http::uri::PathAndQuery::from_static(
        "/kas_gateway.v1.UrlConfigurations/CreateUrlConfiguration",
    );
    let status = grpc
        .unary(
            with_token_metadata(RawCreateRequest {
                agent_id: 1,
                url: b"grpc://\xff\xfe/".to_vec(),
            }),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
