//! The Kubernetes API proxy end to end over loopback: a client with `pat:<agent>:<token>`, the
//! gateway, a live session with a simulated agent, the agent's upstream (an HTTP server in the
//! test). Requests and responses stream through; a client that goes away cancels upstream,
//! and one that stops reading holds up no one else; the caller's credentials never reach the
//! agent; refusals are Kubernetes `Status` objects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::routing::{any, get};
use bytes::Bytes;
use common::{Backend, Gateway, ROOT_TOKEN};
use kas_gateway::agent::{AccessAs, Upstream};
use kas_gateway::agent_sim::{AgentSim, AgentSimConfig};
use kas_gateway::crypto::Secret;
use kas_gateway::proto::agent::v1 as pb;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const UPSTREAM_TOKEN: &str = "upstream-service-account-token";

/// What the upstream saw and can be made to send.
#[derive(Default)]
struct Seen {
    headers: Mutex<Vec<http::HeaderMap>>,
    /// Every watch's event feed, oldest first (kept, so that each stays open).
    watch: Mutex<Vec<mpsc::Sender<Bytes>>>,
    watch_dropped: AtomicBool,
    /// Bytes the large responses produced so far.
    produced: std::sync::atomic::AtomicU64,
}

/// Sets a flag when the watch's response body is dropped (the connection went away).
struct DropFlag(Arc<Seen>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.watch_dropped.store(true, Ordering::SeqCst);
    }
}

/// An HTTP server standing in for the Kubernetes API.
async fn upstream() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let router = axum::Router::new()
        .route(
            "/api/v1/namespaces/default/configmaps",
            get({
                let seen = Arc::clone(&seen);
                move |request: Request| async move {
                    seen.headers.lock().unwrap().push(request.headers().clone());
                    if request.headers()["authorization"] != format!("Bearer {UPSTREAM_TOKEN}") {
                        return http::Response::builder()
                            .status(401)
                            .body(Body::from("{}"))
                            .unwrap();
                    }
                    http::Response::builder()
                        .header("content-type", "application/json")
                        .header("x-upstream", "yes")
                        .body(Body::from(
                            json!({"kind": "ConfigMapList", "items": []}).to_string(),
                        ))
                        .unwrap()
                }
            }),
        )
        .route(
            "/api/v1/pods",
            get({
                let seen = Arc::clone(&seen);
                move || async move {
                    let (tx, rx) = mpsc::channel::<Bytes>(8);
                    seen.watch.lock().unwrap().push(tx);
                    let flag = DropFlag(Arc::clone(&seen));
                    let stream = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                        move |chunk| {
                            let _alive = &flag;
                            Ok::<_, std::io::Error>(chunk)
                        },
                    );
                    http::Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from_stream(stream))
                        .unwrap()
                }
            }),
        )
        .route(
            "/api/v1/namespaces/default/pods/big/log",
            get({
                let seen = Arc::clone(&seen);
                // 64 MiB, generated as it is read.
                move || async move {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let stream = futures::stream::unfold(1024, move |left| {
                        let (chunk, seen) = (chunk.clone(), Arc::clone(&seen));
                        async move {
                            (left > 0).then(|| {
                                seen.produced
                                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                                (Ok::<_, std::io::Error>(chunk), left - 1)
                            })
                        }
                    });
                    http::Response::builder()
                        .header("content-type", "text/plain")
                        .body(Body::from_stream(stream))
                        .unwrap()
                }
            }),
        )
        .route(
            "/echo",
            any(|request: Request| async move {
                let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .unwrap();
                http::Response::builder()
                    .status(201)
                    .body(Body::from(body))
                    .unwrap()
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

/// A gateway, a project with an agent served by a simulated agent whose upstream is `url`;
/// returns the gateway, the project and the agent.
async fn connected_agent(upstream_url: &str, access_as: AccessAs) -> (Gateway, i64, i64, AgentSim) {
    connected_agent_with(upstream_url, access_as, |_| {}).await
}

async fn connected_agent_with(
    upstream_url: &str,
    access_as: AccessAs,
    adjust: impl FnOnce(&mut kas_gateway::config::Config),
) -> (Gateway, i64, i64, AgentSim) {
    let gw = Gateway::start_with(Backend::Sqlite, |config| {
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.backoff.max = Duration::from_millis(500);
        adjust(config);
    })
    .await
    .unwrap();
    let project = gw.project(ROOT_TOKEN, "p").await;
    let agent = gw.agent(project, "a").await;
    let (_, token) = gw.agent_token(project, agent, "t").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
            json!({"url": format!("grpc://127.0.0.1:{port}")}),
        )
        .await
        .expect_status(201)
        .clone();
    let upstream = Upstream::new(
        upstream_url,
        None,
        Some(Secret::new(UPSTREAM_TOKEN)),
        access_as,
    )
    .unwrap();
    let sim = AgentSim::start_with_upstream(
        AgentSimConfig {
            token,
            tls: None,
            client_ca: None,
            jwt_public_key: Some(config["public_key"].as_str().unwrap().to_owned()),
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: pb::AgentMetadata::default(),
            clock: gw.clock.clone(),
        },
        Some(Arc::new(upstream)),
        listener,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = gw
            .get(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{project}/cluster_agents/{agent}/connection"),
            )
            .await;
        if state.body["state"] == "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", state.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (gw, project, agent, sim)
}

/// A user with a `k8s_proxy` token, a member of `project` at `level`.
async fn proxy_user(gw: &Gateway, project: i64, name: &str, level: i64, scopes: &[&str]) -> String {
    let (id, token) = gw.user_with_scopes(name, scopes).await;
    gw.add_member(project, id, level).await;
    token
}

fn proxy_request(
    gw: &Gateway,
    method: reqwest::Method,
    agent: i64,
    token: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    gw.client
        .request(method, format!("{}/k8s-proxy{path}", gw.base))
        .header("Authorization", format!("Bearer pat:{agent}:{token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stream_through_the_session() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, _sim) = connected_agent(&url, AccessAs::Agent).await;
    let token = proxy_user(&gw, project, "dev", 30, &["k8s_proxy"]).await;

    // An ordinary request: the upstream's answer, headers included.
    let response = proxy_request(
        &gw,
        reqwest::Method::GET,
        agent,
        &token,
        "/api/v1/namespaces/default/configmaps",
    )
    .header("X-Custom", "kept")
    .header("Cookie", "session=secret")
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream"], "yes");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["kind"], "ConfigMapList");
    let headers = seen.headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(headers["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    assert_eq!(headers["x-custom"], "kept");
    assert!(
        headers.get("cookie").is_none(),
        "a cookie reached the upstream"
    );
    assert!(
        !format!("{headers:?}").contains(&token),
        "the caller's token reached the upstream"
    );
    assert!(headers.get("impersonate-user").is_none());

    // A body both ways, larger than one chunk.
    let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = proxy_request(&gw, reqwest::Method::POST, agent, &token, "/echo")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.bytes().await.unwrap().as_ref(), payload.as_slice());

    // A watch: events arrive as the upstream sends them, and leaving cancels it upstream.
    let mut watch = proxy_request(
        &gw,
        reqwest::Method::GET,
        agent,
        &token,
        "/api/v1/pods?watch=true",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(watch.status(), 200);
    let events = seen.watch.lock().unwrap().last().cloned().unwrap();
    for n in 0..3 {
        let event = format!("{{\"type\":\"ADDED\",\"n\":{n}}}\n");
        events.send(Bytes::from(event.clone())).await.unwrap();
        let chunk = tokio::time::timeout(Duration::from_secs(5), watch.chunk())
            .await
            .expect("the event did not arrive")
            .unwrap()
            .unwrap();
        assert_eq!(chunk, event.as_bytes());
    }
    assert!(!seen.watch_dropped.load(Ordering::SeqCst));
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.watch_dropped.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the upstream watch outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_checked_before_anything_reaches_the_agent() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, sim) = connected_agent(&url, AccessAs::Agent).await;
    let developer = proxy_user(&gw, project, "dev", 30, &["k8s_proxy"]).await;
    let api_only = proxy_user(&gw, project, "apionly", 40, &["api"]).await;
    let reporter = proxy_user(&gw, project, "rep", 20, &["k8s_proxy"]).await;
    let (_, outsider) = gw.user_with_scopes("outsider", &["k8s_proxy"]).await;
    let path = "/api/v1/namespaces/default/configmaps";
    let status = |response: reqwest::Response| async move {
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["kind"], "Status", "{body}");
        assert_eq!(body["code"], code, "{body}");
        (code, body["message"].as_str().unwrap().to_owned())
    };
    // No credentials, or not in the pat:<agent>:<token> form.
    let (code, _) = status(
        gw.client
            .get(format!("{}/k8s-proxy{path}", gw.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = status(
        gw.client
            .get(format!("{}/k8s-proxy{path}", gw.base))
            .bearer_auth(&developer)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = status(
        proxy_request(&gw, reqwest::Method::GET, agent, "glpat-wrong", path)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401);
    // `api` is not enough.
    let (code, message) = status(
        proxy_request(&gw, reqwest::Method::GET, agent, &api_only, path)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 403);
    assert!(message.contains("k8s_proxy"), "{message}");
    // Below Developer, or not a member.
    for token in [&reporter, &outsider] {
        let (code, _) = status(
            proxy_request(&gw, reqwest::Method::GET, agent, token, path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, 403);
    }
    // No such agent.
    let (code, _) = status(
        proxy_request(&gw, reqwest::Method::GET, 9999, &developer, path)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 404);
    assert!(
        seen.headers.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
    // The allowed request gets through; with the agent gone, a 503 that says why.
    let ok = proxy_request(&gw, reqwest::Method::GET, agent, &developer, path)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    sim.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = proxy_request(&gw, reqwest::Method::GET, agent, &developer, path)
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            let (_, message) = status(response).await;
            assert!(message.contains("not connected"), "{message}");
            break;
        }
        assert!(Instant::now() < deadline, "still {}", response.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_can_impersonate_the_gitlab_user() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, _sim) = connected_agent(&url, AccessAs::User).await;
    let token = proxy_user(&gw, project, "maintainer", 40, &["k8s_proxy"]).await;
    // The client cannot choose whom to impersonate.
    let response = proxy_request(
        &gw,
        reqwest::Method::GET,
        agent,
        &token,
        "/api/v1/namespaces/default/configmaps",
    )
    .header("Impersonate-User", "system:admin")
    .send()
    .await
    .unwrap();
    let code = response.status();
    assert_eq!(code, 200, "{}", response.text().await.unwrap());
    let headers = seen.headers.lock().unwrap().last().cloned().unwrap();
    let users: Vec<&str> = headers
        .get_all("impersonate-user")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(users, ["gitlab:user:maintainer"]);
    let groups: Vec<&str> = headers
        .get_all("impersonate-group")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        groups,
        [
            "gitlab:user".to_owned(),
            format!("gitlab:project_role:{project}:maintainer")
        ]
    );
    assert_eq!(headers["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_and_every_request_is_counted() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, _sim) = connected_agent_with(&url, AccessAs::Agent, |config| {
        config.k8s_proxy.max_requests_per_user = 2;
        config.k8s_proxy.max_body_bytes = 1024;
        config.k8s_proxy.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let token = proxy_user(&gw, project, "dev", 30, &["k8s_proxy"]).await;
    let watch = || {
        proxy_request(
            &gw,
            reqwest::Method::GET,
            agent,
            &token,
            "/api/v1/pods?watch=true",
        )
        .send()
    };
    // Two open requests per user: the third waits for none, it is refused.
    let first = watch().await.unwrap();
    let second = watch().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = watch().await.unwrap();
    assert_eq!(third.status(), 429);
    // A quiet watch ends after the idle timeout, and its turn comes back.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), first.bytes()).await;
    assert!(ended.is_ok(), "the idle watch was not ended");
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(second);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(watch().await.unwrap().status(), 200);
    // Bodies past the limit: announced, refused at once; streamed, cut off.
    let announced = proxy_request(&gw, reqwest::Method::POST, agent, &token, "/echo")
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(announced.status(), 413);
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 512]))),
    );
    let streamed = proxy_request(&gw, reqwest::Method::POST, agent, &token, "/echo")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    let echoed = match streamed {
        Ok(response) if response.status() == 201 => response.bytes().await.ok().map(|b| b.len()),
        _ => None,
    };
    assert_ne!(
        echoed,
        Some(2048),
        "a body past the limit went through whole"
    );
    let _ = seen;
    // Every request counted, by method and status.
    let text = kas_gateway::metrics::handle().unwrap().render();
    assert!(
        text.contains("kas_gateway_k8s_proxy_requests_total{method=\"GET\",code=\"429\"} 1"),
        "{text}"
    );
    // Announced and streamed.
    assert!(
        text.contains("kas_gateway_k8s_proxy_requests_total{method=\"POST\",code=\"413\"} 2"),
        "{text}"
    );
}

/// The agent going away in the middle of a watch ends the client's response (cut short, not
/// complete), promptly rather than never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_its_agent_goes_away() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, sim) = connected_agent(&url, AccessAs::Agent).await;
    let token = proxy_user(&gw, project, "dev", 30, &["k8s_proxy"]).await;
    let mut watch = proxy_request(
        &gw,
        reqwest::Method::GET,
        agent,
        &token,
        "/api/v1/pods?watch=true",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(watch.status(), 200);
    let events = seen.watch.lock().unwrap().last().cloned().unwrap();
    events
        .send(Bytes::from_static(b"{\"type\":\"ADDED\"}\n"))
        .await
        .unwrap();
    assert!(watch.chunk().await.unwrap().is_some());
    sim.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return "complete",
                Err(_) => return "cut short",
            }
        }
    })
    .await
    .expect("the watch outlived its agent");
    assert_eq!(ended, "cut short");
}

/// A stream's unread data holds the agent connection's HTTP/2 window as well as its own: with
/// a window for two streams, two paused `kubectl logs -f` blocked every other request through
/// the agent, and its heartbeats, until the session was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_hold_up_no_one_else() {
    let (url, seen) = upstream().await;
    let (gw, project, agent, _sim) = connected_agent(&url, AccessAs::Agent).await;
    let token = proxy_user(&gw, project, "dev", 30, &["k8s_proxy"]).await;
    // Two clients ask for a large log and stop reading it: everything on the way fills up
    // (sockets, the gateway's buffers, each stream's HTTP/2 window) and upstream stalls.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let response = proxy_request(
            &gw,
            reqwest::Method::GET,
            agent,
            &token,
            "/api/v1/namespaces/default/pods/big/log",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        stalled.push(response);
    }
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let produced = seen.produced.load(Ordering::SeqCst);
        if produced == last {
            break;
        }
        last = produced;
    }
    assert!(last < 2 * 64 * 1024 * 1024, "nothing stalled: {last} bytes");
    // Someone else's request through the same agent still gets its answer.
    let other = proxy_user(&gw, project, "other", 30, &["k8s_proxy"]).await;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        proxy_request(
            &gw,
            reqwest::Method::GET,
            agent,
            &other,
            "/api/v1/namespaces/default/configmaps",
        )
        .send(),
    )
    .await
    .expect("a request behind two stalled readers got no answer")
    .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.bytes())
        .await
        .expect("a request behind two stalled readers got no body")
        .unwrap();
    assert!(body.starts_with(b"{"));
    drop(stalled);
}
