//! A fake Kubernetes API server, and helpers to run the real `kubectl` against it.
//!
//! The fake answers what `kubectl` asks for `get` (tables, `-o json|yaml`, `--watch`),
//! `apply`, `delete`, `logs -f` and `auth whoami`, the way the real API server does: legacy
//! discovery, `Table` rendering, `Status` errors, watch events as JSON lines, log lines as
//! text, all over HTTPS with a bearer token. It keeps ConfigMaps, Pods and Namespaces in
//! memory, records every request it sees, and counts the streams (watches, followed logs)
//! that are open and those that the client closed.
//!
//! It serves on the caller's runtime, so `kubectl` must never block it: [`kubectl`] waits
//! for the process on a blocking thread.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use kas_gateway::certs::DevCa;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// The version the fake claims to be.
pub const SERVER_VERSION: &str = "v1.32.0-fake";
/// The user a valid token authenticates as (what `kubectl auth whoami` shows without
/// impersonation).
pub const TOKEN_USER: &str = "system:serviceaccount:gitlab-agent:agent";

/// A running fake API server; stops when dropped.
pub struct FakeKube {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The certificate authority of the server's certificate, PEM.
    pub ca_pem: String,
    state: Arc<State>,
    shutdown: CancellationToken,
}

/// A request as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub accept: Option<String>,
    pub content_type: Option<String>,
    /// `Upgrade` (kubectl's exec and port-forward ask for `websocket` or `SPDY/3.1`).
    pub upgrade: Option<String>,
    /// The bearer token, when the request had one.
    pub token: Option<String>,
    pub impersonate_user: Option<String>,
    /// Every `Impersonate-Group` header, in order.
    pub impersonate_groups: Vec<String>,
}

/// Streaming responses (watches, followed logs): how many started, and how many ended. The
/// fake ends none itself while it runs: each one closed is a client that went away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    pub opened: usize,
    pub closed: usize,
}

impl Streams {
    /// Streams still open.
    pub fn open(&self) -> usize {
        self.opened - self.closed
    }
}

/// What the fake keeps; one lock for objects, history and logs so that a watch or a followed
/// log can take a snapshot and subscribe to what follows without missing anything between.
struct State {
    token: String,
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    logs: broadcast::Sender<LogLine>,
    streams: watch::Sender<Streams>,
    requests: Mutex<Vec<SeenRequest>>,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Store {
    /// The last resource version given out; every change takes the next one.
    revision: u64,
    /// (resource, namespace or "", name) to the object as served.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change, for watches that start from a resource version.
    history: Vec<Event>,
    /// (namespace, pod) to the lines it logged.
    logs: HashMap<(String, String), Vec<String>>,
}

/// A change to an object, as a watch reports it.
#[derive(Clone, Debug)]
struct Event {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    change: &'static str,
    resource: String,
    namespace: String,
    revision: u64,
    object: Value,
}

#[derive(Clone, Debug)]
struct LogLine {
    namespace: String,
    pod: String,
    line: String,
}

/// The resources the fake serves, all in the core group (`/api/v1`).
struct Resource {
    name: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
}

const RESOURCES: &[Resource] = &[
    Resource {
        name: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
    },
    Resource {
        name: "namespaces",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
    },
    Resource {
        name: "pods",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
    },
];

fn resource_named(name: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.name == name)
}

impl FakeKube {
    /// Starts a fake on a loopback port that accepts `Authorization: Bearer <token>`, with
    /// the namespace `default`.
    pub async fn start(token: &str) -> Self {
        #[allow(clippy::disallowed_methods)] // kubectl checks the certificate against its clock
        let now = time::OffsetDateTime::now_utc();
        let ca = DevCa::new("fake Kubernetes CA", now).unwrap();
        let pair = ca.server(&["localhost", "127.0.0.1"], now).unwrap();
        let chain = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        // As the real API server: HTTP/2 when the client offers it (kubectl does).
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let shutdown = CancellationToken::new();
        let state = Arc::new(State {
            token: token.to_owned(),
            store: Mutex::new(Store::default()),
            events: broadcast::channel(1024).0,
            logs: broadcast::channel(1024).0,
            streams: watch::channel(Streams::default()).0,
            requests: Mutex::new(Vec::new()),
            shutdown: shutdown.clone(),
        });
        state.put("namespaces", "", json!({"metadata": {"name": "default"}}));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            router(Arc::clone(&state)),
            shutdown.clone(),
        ));
        Self {
            url,
            ca_pem: ca.pair().cert,
            state,
            shutdown,
        }
    }

    /// Creates or replaces ConfigMap `name` in `default` with `data`; watches see it.
    pub fn put_configmap(&self, name: &str, data: &[(&str, &str)]) -> Value {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        self.state.put(
            "configmaps",
            "default",
            json!({"metadata": {"name": name}, "data": data}),
        )
    }

    /// Creates a running Pod `name` in `default` with one container, `main`.
    pub fn put_pod(&self, name: &str) -> Value {
        self.state.put(
            "pods",
            "default",
            json!({
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "main", "image": "registry.example/app:1"}]},
                "status": {
                    "phase": "Running",
                    "containerStatuses": [{
                        "name": "main", "ready": true, "restartCount": 0,
                        "image": "registry.example/app:1", "imageID": "",
                        "state": {"running": {}}
                    }]
                }
            }),
        )
    }

    /// ConfigMap `name` in `default`, as served.
    pub fn configmap(&self, name: &str) -> Option<Value> {
        let store = self.state.store.lock().unwrap();
        store
            .objects
            .get(&key("configmaps", "default", name))
            .cloned()
    }

    /// Pod `name` in `default` logs `line`; followers see it at once.
    pub fn log_line(&self, pod: &str, line: &str) {
        let mut store = self.state.store.lock().unwrap();
        store
            .logs
            .entry(("default".to_owned(), pod.to_owned()))
            .or_default()
            .push(line.to_owned());
        let _ = self.state.logs.send(LogLine {
            namespace: "default".to_owned(),
            pod: pod.to_owned(),
            line: line.to_owned(),
        });
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// The streaming responses so far.
    pub fn streams(&self) -> Streams {
        *self.state.streams.borrow()
    }

    /// Streaming responses still open.
    pub fn open_streams(&self) -> usize {
        self.streams().open()
    }

    /// Waits until `done` holds for the streams; panics after `timeout`.
    pub async fn wait_streams(
        &self,
        timeout: Duration,
        done: impl Fn(&Streams) -> bool,
    ) -> Streams {
        let mut streams = self.state.streams.subscribe();
        match tokio::time::timeout(timeout, streams.wait_for(|s| done(s))).await {
            Ok(Ok(streams)) => *streams,
            _ => panic!(
                "the streams did not reach the expected state within {timeout:?}: {:?}",
                self.streams()
            ),
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn key(resource: &str, namespace: &str, name: &str) -> (String, String, String) {
    (resource.to_owned(), namespace.to_owned(), name.to_owned())
}

impl State {
    /// Creates or replaces an object, stamping it as the API server does; returns it.
    fn put(&self, resource: &str, namespace: &str, object: Value) -> Value {
        let mut store = self.store.lock().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let existing = store.objects.get(&key(resource, namespace, &name)).cloned();
        self.commit(&mut store, resource, namespace, object, existing.as_ref())
    }

    /// Stores `object` (new, or replacing `existing`), with the next resource version, and
    /// tells the watches. Callers hold the lock.
    fn commit(
        &self,
        store: &mut Store,
        resource: &str,
        namespace: &str,
        mut object: Value,
        existing: Option<&Value>,
    ) -> Value {
        let kind = resource_named(resource).unwrap().kind;
        store.revision += 1;
        let revision = store.revision;
        object["apiVersion"] = json!("v1");
        object["kind"] = json!(kind);
        let metadata = &mut object["metadata"];
        if !namespace.is_empty() {
            metadata["namespace"] = json!(namespace);
        }
        metadata["resourceVersion"] = json!(revision.to_string());
        match existing {
            Some(old) => {
                metadata["uid"] = old["metadata"]["uid"].clone();
                metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
            None => {
                metadata["uid"] = json!(format!("00000000-0000-4000-8000-{revision:012x}"));
                metadata["creationTimestamp"] = json!(timestamp_now());
            }
        }
        if resource == "namespaces" && object["status"].is_null() {
            object["status"] = json!({"phase": "Active"});
        }
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        store
            .objects
            .insert(key(resource, namespace, &name), object.clone());
        let change = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record_event(store, change, resource, namespace, &object);
        object
    }

    fn record_event(
        &self,
        store: &mut Store,
        change: &'static str,
        resource: &str,
        namespace: &str,
        object: &Value,
    ) {
        let event = Event {
            change,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            revision: store.revision,
            object: object.clone(),
        };
        store.history.push(event.clone());
        let _ = self.events.send(event);
    }

    fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.send_modify(|s| s.opened += 1);
        StreamGuard(Arc::clone(self))
    }
}

/// Held by a streaming response body: hyper drops the body when the client goes away (the
/// connection closes, or the HTTP/2 stream is reset), and the drop counts the stream closed.
struct StreamGuard(Arc<State>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.send_modify(|s| s.closed += 1);
    }
}

/// A streaming response body of `items`, counted open until hyper drops it (see
/// [`StreamGuard`]); it ends when the fake stops.
fn streaming_body<S>(state: &Arc<State>, items: S) -> Body
where
    S: Stream<Item = String> + Send + 'static,
{
    let guard = state.open_stream();
    let stopped = state.shutdown.clone().cancelled_owned();
    Body::from_stream(items.take_until(stopped).map(move |item| {
        let _held = &guard;
        Ok::<_, std::convert::Infallible>(Bytes::from(item))
    }))
}

/// Now, as Kubernetes writes timestamps (RFC 3339, seconds, UTC).
fn timestamp_now() -> String {
    // Objects are stamped by the wall clock: kubectl shows their age against its own.
    #[allow(clippy::disallowed_methods)]
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// How long ago `timestamp` was, as the AGE column shows it.
fn age(timestamp: &Value) -> String {
    let Some(then) = timestamp.as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    }) else {
        return "<unknown>".to_owned();
    };
    #[allow(clippy::disallowed_methods)] // ages are relative to the wall clock
    let seconds = (time::OffsetDateTime::now_utc() - then)
        .whole_seconds()
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

// ---------------------------------------------------------------------------------------
// Serving

/// Serves HTTPS connections until `shutdown`; open connections end with it.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
    // Dropping the set aborts the connections still open, and with them their streams.
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/api/v1", get(core_resources))
        .route("/apis", get(api_groups))
        .route(
            "/apis/authentication.k8s.io/v1",
            get(authentication_resources),
        )
        .route(
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            post(self_subject_review),
        )
        .route("/openapi/v2", get(openapi_v2))
        .route("/openapi/v3", get(openapi_paths))
        .route("/openapi/v3/api/v1", get(openapi_core))
        .route("/api/v1/{*path}", any(objects))
        .fallback(|| async { no_such_path() })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            record_and_authenticate,
        ))
        .with_state(state)
}

/// Records the request, then lets it through only with the right bearer token.
async fn record_and_authenticate(
    Shared(state): Shared<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let token = text("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
    let seen = SeenRequest {
        version: format!("{:?}", request.version()),
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_owned(), |p| p.to_string()),
        accept: text("accept"),
        content_type: text("content-type"),
        upgrade: text("upgrade"),
        token: token.clone(),
        impersonate_user: text("impersonate-user"),
        impersonate_groups: headers
            .get_all("impersonate-group")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect(),
    };
    state.requests.lock().unwrap().push(seen);
    if token.as_deref() != Some(state.token.as_str()) {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized").into_response();
    }
    next.run(request).await
}

/// A failure, answered with a `Status` object as the API server reports them.
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

type Answer = Result<Response, Failure>;

fn failure(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        reason,
        message: message.into(),
        details: None,
    }
}

impl Failure {
    /// With `details`: the name and kind (the resource) of the object concerned.
    fn about(mut self, resource: &str, name: &str) -> Self {
        self.details = Some(json!({"name": name, "kind": resource}));
        self
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
        });
        if let Some(details) = self.details {
            body["details"] = details;
        }
        (self.code, axum::Json(body)).into_response()
    }
}

fn not_found(target: &Target) -> Failure {
    let (resource, name) = (
        target.resource.name,
        target.name.as_deref().unwrap_or_default(),
    );
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
    )
    .about(resource, name)
}

/// What the real server answers for a path it does not serve.
fn no_such_path() -> Failure {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn bad_request(message: impl Into<String>) -> Failure {
    failure(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, axum::Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------
// Discovery. kubectl first asks `/api` and `/apis` for aggregated discovery
// (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`, with plain
// `application/json` last); a plain `application/json` answer makes it fall back to the
// legacy documents, one per group version.

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": "1", "minor": "32", "gitVersion": SERVER_VERSION,
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0",
            "compiler": "gc", "platform": "linux/amd64",
        }),
    )
}

async fn api_versions() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}],
        }),
    )
}

async fn api_groups() -> Response {
    let version = json!({"groupVersion": "authentication.k8s.io/v1", "version": "v1"});
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{"name": "authentication.k8s.io", "versions": [version], "preferredVersion": version}],
        }),
    )
}

async fn core_resources() -> Response {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let mut resources: Vec<Value> = RESOURCES
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs, "shortNames": r.short_names,
            })
        })
        .collect();
    for (name, kind, verbs) in [
        ("pods/log", "Pod", json!(["get"])),
        ("pods/exec", "PodExecOptions", json!(["create", "get"])),
        (
            "pods/portforward",
            "PodPortForwardOptions",
            json!(["create", "get"]),
        ),
    ] {
        resources.push(json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs}));
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}),
    )
}

// OpenAPI. Before `apply` (and `create`, `replace`) sends an object, kubectl validates it.
// A recent kubectl (1.32) first reads the OpenAPI v3 document of the object's group version:
// when the kind's PATCH operation takes the `fieldValidation` parameter, it sends
// `?fieldValidation=Strict` and leaves validation to the server. Otherwise, and always in
// older ones (1.20), it validates client-side against the OpenAPI v2 document, read as
// protobuf only; a kind that document does not define is not checked. Without either
// document `kubectl apply` fails ("failed to download openapi") unless run with
// `--validate=false`. `apply` also reads v2 for its patch and falls back to the types it was
// built with when v2 does not describe the kind. So the fake serves a v3 document with
// `fieldValidation` on every PATCH, and an empty v2 document.

/// The smallest OpenAPI v2 document, as gnostic's `openapi.v2.Document` in protobuf:
/// `swagger` (field 1) and `info` (field 2: `title` 1, `version` 2), no definitions.
fn openapi_v2_protobuf() -> Vec<u8> {
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }
    let info = [field(1, b"Kubernetes"), field(2, SERVER_VERSION.as_bytes())].concat();
    [field(1, b"2.0"), field(2, &info)].concat()
}

/// Asked for as `application/com.github.proto-openapi.spec.v2@v1.0+protobuf`, answered as
/// `application/octet-stream` as the real server does: Go cannot parse the `@` media type.
async fn openapi_v2() -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        openapi_v2_protobuf(),
    )
        .into_response()
}

async fn openapi_paths() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=fake"}}}),
    )
}

async fn openapi_core() -> Response {
    let mut paths = serde_json::Map::new();
    for resource in RESOURCES {
        let path = if resource.namespaced {
            format!(
                "/api/v1/namespaces/{{namespace}}/{}/{{name}}",
                resource.name
            )
        } else {
            format!("/api/v1/{}/{{name}}", resource.name)
        };
        let operation = json!({
            "operationId": format!("patch{}", resource.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": resource.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(path, json!({"patch": operation}));
    }
    json_response(
        StatusCode::OK,
        &json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION}, "paths": paths}),
    )
}

async fn authentication_resources() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authentication.k8s.io/v1",
            "resources": [{
                "name": "selfsubjectreviews", "singularName": "selfsubjectreview",
                "namespaced": false, "kind": "SelfSubjectReview", "verbs": ["create"],
            }],
        }),
    )
}

/// `kubectl auth whoami`: who the request acts as, impersonation included. kubectl sends the
/// review as protobuf and takes JSON back; its body says nothing the headers do not.
async fn self_subject_review(headers: HeaderMap) -> Response {
    let user = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(TOKEN_USER);
    let mut groups: Vec<&str> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if groups.is_empty() && !headers.contains_key("impersonate-user") {
        groups = vec!["system:serviceaccounts", "system:authenticated"];
    }
    json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "status": {"userInfo": {"username": user, "groups": groups}},
        }),
    )
}

// ---------------------------------------------------------------------------------------
// Objects

/// Where a request under `/api/v1` points.
struct Target {
    resource: &'static Resource,
    /// "" for cluster-wide resources, and for lists over every namespace.
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    /// `{resource}`, `{resource}/{name}` (cluster-wide resources),
    /// `namespaces/{namespace}/{resource}[/{name}[/{subresource}]]`.
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.split('/').collect();
        let (namespace, rest) = match segments.as_slice() {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => (*namespace, rest),
            rest => ("", rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(*name), None),
            [resource, name, subresource] if !namespace.is_empty() => {
                (*resource, Some(*name), Some(*subresource))
            }
            _ => return None,
        };
        let resource = resource_named(resource)?;
        // A namespaced object is named inside its namespace (its kind may be listed over
        // all of them); a cluster-wide one lives outside any.
        let fits = if resource.namespaced {
            name.is_none() || !namespace.is_empty()
        } else {
            namespace.is_empty()
        };
        if !fits {
            return None;
        }
        Some(Self {
            resource,
            namespace: namespace.to_owned(),
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }

    fn key(&self) -> (String, String, String) {
        key(
            self.resource.name,
            &self.namespace,
            self.name.as_deref().unwrap_or_default(),
        )
    }

    /// Whether `(resource, namespace)` of a stored object is in this collection.
    fn holds(&self, resource: &str, namespace: &str) -> bool {
        resource == self.resource.name && (self.namespace.is_empty() || namespace == self.namespace)
    }
}

type QueryMap = HashMap<String, String>;

/// Every request under `/api/v1`, by method and by what its path points at.
async fn objects(
    Shared(state): Shared<Arc<State>>,
    method: Method,
    UrlPath(path): UrlPath<String>,
    Query(query): Query<QueryMap>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let target = Target::parse(&path).ok_or_else(no_such_path)?;
    if query.contains_key("dryRun") && method != Method::GET {
        return Err(bad_request("dryRun is not supported by this fake"));
    }
    let collection = target.name.is_none();
    match (&method, target.subresource.is_some()) {
        (_, true) => subresource(&state, &target, &query, &method),
        (&Method::GET, _) if collection => list_or_watch(&state, &target, &query, &headers),
        (&Method::POST, _) if collection => create(&state, &target, &body),
        (&Method::GET, _) => read(&state, &target, &query, &headers),
        (&Method::PUT, _) if !collection => replace(&state, &target, &body),
        (&Method::PATCH, _) if !collection => patch(&state, &target, &headers, &body),
        (&Method::DELETE, _) if !collection => delete(&state, &target),
        _ => Err(failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// Whether the client asked for a `Table` (kubectl does for its human-readable output).
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(|accept| accept.split(',').next())
        .is_some_and(|first| first.contains("as=Table"))
}

/// The `fieldSelector` (`metadata.name`, `metadata.namespace`) and `labelSelector`
/// (`k=v`, `k==v`, `k!=v`, comma-separated) of a list or watch.
struct Selector {
    fields: Vec<(String, String)>,
    labels: Vec<(String, String, bool)>,
}

impl Selector {
    fn parse(query: &QueryMap) -> Result<Self, Failure> {
        let mut fields = Vec::new();
        for term in query.get("fieldSelector").iter().flat_map(|s| s.split(',')) {
            match term.split_once('=') {
                Some((field @ ("metadata.name" | "metadata.namespace"), value)) => {
                    fields.push((field.to_owned(), value.trim_start_matches('=').to_owned()));
                }
                _ => return Err(bad_request(format!("unsupported field selector: {term}"))),
            }
        }
        let mut labels = Vec::new();
        for term in query.get("labelSelector").iter().flat_map(|s| s.split(',')) {
            if let Some((label, value)) = term.split_once("!=") {
                labels.push((label.to_owned(), value.to_owned(), false));
            } else if let Some((label, value)) = term.split_once('=') {
                labels.push((
                    label.to_owned(),
                    value.trim_start_matches('=').to_owned(),
                    true,
                ));
            } else {
                return Err(bad_request(format!("unsupported label selector: {term}")));
            }
        }
        Ok(Self { fields, labels })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        self.fields.iter().all(|(field, value)| {
            let field = field.trim_start_matches("metadata.");
            metadata[field].as_str().unwrap_or("") == value
        }) && self.labels.iter().all(|(label, value, equal)| {
            (metadata["labels"][label].as_str() == Some(value.as_str())) == *equal
        })
    }
}

/// `GET` on a collection: a list, or a watch with `?watch=true`.
fn list_or_watch(
    state: &Arc<State>,
    target: &Target,
    query: &QueryMap,
    headers: &HeaderMap,
) -> Answer {
    let selector = Selector::parse(query)?;
    let table = wants_table(headers);
    if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        return Ok(watch_objects(state, target, selector, query, table));
    }
    let (items, revision) = {
        let store = state.store.lock().unwrap();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((resource, namespace, _), _)| target.holds(resource, namespace))
            .map(|(_, object)| object.clone())
            .filter(|object| selector.matches(object))
            .collect();
        (items, store.revision)
    };
    if table {
        let mut table = render_table(target.resource, &items, query, true);
        table["metadata"] = json!({"resourceVersion": revision.to_string()});
        return Ok(table_response(&table));
    }
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            // Items of a list carry no kind of their own, as the real server sends them.
            let object = item.as_object_mut().unwrap();
            object.remove("kind");
            object.remove("apiVersion");
            item
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.resource.kind), "apiVersion": "v1",
            "metadata": {"resourceVersion": revision.to_string()}, "items": items,
        }),
    ))
}

fn table_response(table: &Value) -> Response {
    let mut response = json_response(StatusCode::OK, table);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(TABLE_MEDIA_TYPE),
    );
    response
}

/// The media type of a `Table` answer.
const TABLE_MEDIA_TYPE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// A `Table` of `items` with the columns the real server shows for the resource; each row
/// carries the object's metadata (or the object, or nothing, as `includeObject` asks).
fn render_table(
    resource: &Resource,
    items: &[Value],
    query: &QueryMap,
    with_columns: bool,
) -> Value {
    let column = |name: &str, kind: &str, format: &str| json!({"name": name, "type": kind, "format": format, "description": "", "priority": 0});
    let columns = match resource.name {
        "configmaps" => vec![
            column("Name", "string", "name"),
            column("Data", "integer", ""),
            column("Age", "string", ""),
        ],
        "pods" => vec![
            column("Name", "string", "name"),
            column("Ready", "string", ""),
            column("Status", "string", ""),
            column("Restarts", "string", ""),
            column("Age", "string", ""),
        ],
        _ => vec![
            column("Name", "string", "name"),
            column("Status", "string", ""),
            column("Age", "string", ""),
        ],
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|object| {
            let metadata = &object["metadata"];
            let age = age(&metadata["creationTimestamp"]);
            let cells = match resource.name {
                "configmaps" => {
                    let count = |field: &str| object[field].as_object().map_or(0, |m| m.len());
                    json!([metadata["name"], count("data") + count("binaryData"), age])
                }
                "pods" => {
                    let statuses = object["status"]["containerStatuses"].as_array();
                    let ready =
                        statuses.map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
                    let total = object["spec"]["containers"].as_array().map_or(0, Vec::len);
                    let restarts: u64 = statuses.map_or(0, |s| {
                        s.iter().filter_map(|c| c["restartCount"].as_u64()).sum()
                    });
                    json!([
                        metadata["name"],
                        format!("{ready}/{total}"),
                        object["status"]["phase"],
                        restarts.to_string(),
                        age
                    ])
                }
                _ => json!([metadata["name"], object["status"]["phase"], age]),
            };
            let mut row = json!({"cells": cells});
            match query
                .get("includeObject")
                .map_or("Metadata", String::as_str)
            {
                "None" => {}
                "Object" => row["object"] = object.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": metadata,
                    });
                }
            }
            row
        })
        .collect();
    let mut table =
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "rows": rows});
    if with_columns {
        table["columnDefinitions"] = json!(columns);
    }
    table
}

/// A watch: first the changes after `resourceVersion` (or, without one, every matching
/// object as `ADDED`), then each change as it happens, one JSON event per line, until the
/// client goes away.
fn watch_objects(
    state: &Arc<State>,
    target: &Target,
    selector: Selector,
    query: &QueryMap,
    table: bool,
) -> Response {
    let since: Option<u64> = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let (first, live) = {
        let store = state.store.lock().unwrap();
        let first: Vec<Event> = match since {
            Some(since) => store
                .history
                .iter()
                .filter(|e| e.revision > since)
                .cloned()
                .collect(),
            None => store
                .objects
                .iter()
                .map(|((resource, namespace, _), object)| Event {
                    change: "ADDED",
                    resource: resource.clone(),
                    namespace: namespace.clone(),
                    revision: store.revision,
                    object: object.clone(),
                })
                .collect(),
        };
        // Subscribed under the lock: no change falls between the snapshot and the stream.
        (first, state.events.subscribe())
    };
    let (resource, namespace, query) = (target.resource, target.namespace.clone(), query.clone());
    let wanted = move |event: &Event| {
        event.resource == resource.name
            && (namespace.is_empty() || event.namespace == namespace)
            && selector.matches(&event.object)
    };
    // As the real server: a table watch sends the column definitions with its first event.
    let mut columns_sent = false;
    let lines = futures::stream::iter(first)
        .chain(received(live))
        .filter(move |event| std::future::ready(wanted(event)))
        .map(move |event| {
            let object = if table {
                let row = render_table(
                    resource,
                    std::slice::from_ref(&event.object),
                    &query,
                    !columns_sent,
                );
                columns_sent = true;
                row
            } else {
                event.object
            };
            format!("{}\n", json!({"type": event.change, "object": object}))
        });
    let mut response = Response::new(streaming_body(state, lines));
    let content_type = if table {
        TABLE_MEDIA_TYPE
    } else {
        "application/json"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn read(state: &Arc<State>, target: &Target, query: &QueryMap, headers: &HeaderMap) -> Answer {
    let object = state
        .store
        .lock()
        .unwrap()
        .objects
        .get(&target.key())
        .cloned();
    let object = object.ok_or_else(|| not_found(target))?;
    Ok(if wants_table(headers) {
        table_response(&render_table(target.resource, &[object], query, true))
    } else {
        json_response(StatusCode::OK, &object)
    })
}

/// Parses a request body as a JSON object, or answers 400 as the real server does.
fn object_body(body: &Bytes) -> Result<Value, Failure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if value.is_object() => Ok(value),
        _ => Err(bad_request("the request body is not a JSON object")),
    }
}

/// `POST` on a collection: creates the object in the path's namespace.
fn create(state: &Arc<State>, target: &Target, body: &Bytes) -> Answer {
    let object = object_body(body)?;
    let (kind, resource, namespace) = (
        target.resource.kind,
        target.resource.name,
        &target.namespace,
    );
    if target.resource.namespaced && namespace.is_empty() {
        return Err(failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "create needs a namespace",
        ));
    }
    if object["kind"] != kind {
        return Err(bad_request(format!(
            "a {} cannot be created as {resource}",
            object["kind"]
        )));
    }
    let body_namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    if !body_namespace.is_empty() && body_namespace != namespace {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match object["metadata"]["name"].as_str() {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => {
            return Err(failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            ));
        }
    };
    let mut store = state.store.lock().unwrap();
    if !namespace.is_empty()
        && !store
            .objects
            .contains_key(&key("namespaces", "", namespace))
    {
        return Err(failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
        )
        .about("namespaces", namespace));
    }
    if store.objects.contains_key(&key(resource, namespace, &name)) {
        return Err(failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
        .about(resource, &name));
    }
    let created = state.commit(&mut store, resource, namespace, object, None);
    Ok(json_response(StatusCode::CREATED, &created))
}

/// `PUT`: replaces the object.
fn replace(state: &Arc<State>, target: &Target, body: &Bytes) -> Answer {
    let object = object_body(body)?;
    if object["metadata"]["name"].as_str() != target.name.as_deref() {
        return Err(bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    update(state, target, |_| Ok(object))
}

/// Applies `change` to the stored object and stores the result; a `resourceVersion` in the
/// result must be the stored one (optimistic concurrency, as `kubectl replace` and `edit` use).
fn update(
    state: &State,
    target: &Target,
    change: impl FnOnce(&Value) -> Result<Value, Failure>,
) -> Answer {
    let mut store = state.store.lock().unwrap();
    let existing = store
        .objects
        .get(&target.key())
        .cloned()
        .ok_or_else(|| not_found(target))?;
    let updated = change(&existing)?;
    let expected = &updated["metadata"]["resourceVersion"];
    if !expected.is_null() && *expected != existing["metadata"]["resourceVersion"] {
        let (resource, name) = (
            target.resource.name,
            target.name.as_deref().unwrap_or_default(),
        );
        return Err(failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        )
        .about(resource, name));
    }
    let stored = state.commit(
        &mut store,
        target.resource.name,
        &target.namespace,
        updated,
        Some(&existing),
    );
    Ok(json_response(StatusCode::OK, &stored))
}

/// `PATCH` with a JSON merge patch or a strategic merge patch. kubectl's client-side apply
/// sends a strategic merge patch; for ConfigMaps (maps only, no lists) that is a merge patch,
/// so the fake skips the `$`-directives and merges.
fn patch(state: &Arc<State>, target: &Target, headers: &HeaderMap, body: &Bytes) -> Answer {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .trim();
    if !matches!(
        content_type,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (not {content_type:?})"
            ),
        ));
    }
    let patch = object_body(body)?;
    update(state, target, |existing| {
        let mut patched = existing.clone();
        // The stored version is a precondition only when the patch names one.
        patched["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        merge_patch(&mut patched, &patch);
        if patched["metadata"]["name"].as_str() != target.name.as_deref() {
            return Err(bad_request("a patch cannot change the name"));
        }
        Ok(patched)
    })
}

/// RFC 7386 JSON merge patch; keys starting with `$` (strategic merge directives) are skipped.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// `DELETE`: removes the object at once (no finalizers, no grace period) and answers a
/// success `Status`, as the real server does for objects deleted immediately.
fn delete(state: &Arc<State>, target: &Target) -> Answer {
    let mut store = state.store.lock().unwrap();
    let mut object = store
        .objects
        .remove(&target.key())
        .ok_or_else(|| not_found(target))?;
    store.revision += 1;
    object["metadata"]["resourceVersion"] = json!(store.revision.to_string());
    state.record_event(
        &mut store,
        "DELETED",
        target.resource.name,
        &target.namespace,
        &object,
    );
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": target.name, "kind": target.resource.name, "uid": object["metadata"]["uid"]},
        }),
    ))
}

/// Pod subresources: `log` (followed with `?follow=true`); `exec`, `attach` and
/// `portforward` are connection upgrades, which the fake refuses.
fn subresource(state: &Arc<State>, target: &Target, query: &QueryMap, method: &Method) -> Answer {
    match (target.resource.name, target.subresource.as_deref()) {
        ("pods", Some("log")) if *method == Method::GET => pod_log(state, target, query),
        ("pods", Some("exec" | "attach" | "portforward")) => Err(bad_request(
            "upgrade requests (exec, attach, port-forward) are not supported by this fake",
        )),
        _ => Err(no_such_path()),
    }
}

/// A pod's log as plain text: what it logged so far, then, with `follow`, each new line as
/// it is logged, until the client goes away.
fn pod_log(state: &Arc<State>, target: &Target, query: &QueryMap) -> Answer {
    let (namespace, pod) = (
        target.namespace.clone(),
        target.name.clone().unwrap_or_default(),
    );
    let (mut lines, live) = {
        let store = state.store.lock().unwrap();
        if !store.objects.contains_key(&target.key()) {
            return Err(not_found(target));
        }
        let lines = store
            .logs
            .get(&(namespace.clone(), pod.clone()))
            .cloned()
            .unwrap_or_default();
        // Subscribed under the lock: no line falls between the past ones and the stream.
        (lines, state.logs.subscribe())
    };
    if let Some(tail) = query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        lines.drain(..lines.len().saturating_sub(tail));
    }
    let text = |line: String| format!("{line}\n");
    let mut response = if matches!(query.get("follow").map(String::as_str), Some("true" | "1")) {
        let live = received(live)
            .filter(move |l| std::future::ready(l.namespace == namespace && l.pod == pod))
            .map(|l| l.line);
        Response::new(streaming_body(
            state,
            futures::stream::iter(lines).chain(live).map(text),
        ))
    } else {
        Response::new(Body::from(lines.into_iter().map(text).collect::<String>()))
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

/// What `receiver` receives from now on, as a stream (a slow reader skips what it missed).
fn received<T: Clone + Send + 'static>(
    receiver: broadcast::Receiver<T>,
) -> impl Stream<Item = T> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(item) => return Some((item, receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Running kubectl

/// The kubectl to run: `KAS_TEST_KUBECTL`, else `kubectl` on `PATH`.
pub fn kubectl_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("KAS_TEST_KUBECTL") {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("kubectl"))
        .find(|path| path.is_file())
}

/// Whether kubectl is here; without it a test skips, except in CI where that is a failure.
pub fn have_kubectl() -> bool {
    if kubectl_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kubectl is required in CI (.ci/run installs it)"
    );
    eprintln!("kubectl is not installed: skipping");
    false
}

/// kubectl's version as (major, minor), e.g. (1, 32).
pub fn kubectl_version() -> (u32, u32) {
    let output = Command::new(kubectl_binary().expect("kubectl is installed"))
        .args(["version", "--client", "-o", "json"])
        .env_clear()
        .output()
        .unwrap();
    let version: Value = serde_json::from_slice(&output.stdout).unwrap();
    let number = |field: &str| -> u32 {
        let text = version["clientVersion"][field].as_str().unwrap_or_default();
        let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    (number("major"), number("minor"))
}

/// A kubeconfig for `server` with a bearer `token`, trusting `ca_pem` when given (the
/// system's roots otherwise).
pub fn kubeconfig(server: &str, ca_pem: Option<&str>, token: &str) -> tempfile::NamedTempFile {
    use base64::Engine as _;
    let mut cluster = json!({"server": server});
    if let Some(ca) = ca_pem {
        cluster["certificate-authority-data"] =
            json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    // JSON is YAML: kubectl reads it as is.
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
        "current-context": "test",
    });
    let file = tempfile::Builder::new()
        .prefix("kubeconfig-")
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    std::fs::write(file.path(), config.to_string()).unwrap();
    file
}

/// How long one kubectl command may take.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);

/// kubectl with `kubeconfig`, a fresh home and discovery cache in `home`, `env`, and nothing
/// else from the test's environment (no proxies, no user kubeconfig).
fn command(kubeconfig: &Path, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let binary = kubectl_binary().expect("kubectl is installed");
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .envs(env.iter().copied())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(home.join("cache"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs kubectl to the end (at most [`KUBECTL_TIMEOUT`]) on a blocking thread, so that the
/// servers on the test's runtime keep serving it.
pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    let kubeconfig = kubeconfig.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = command(&kubeconfig, home.path(), &[], &args)
            .spawn()
            .unwrap();
        let read_all = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = read_all(Box::new(child.stdout.take().unwrap()));
        let stderr = read_all(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + KUBECTL_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kubectl {args:?} took longer than {KUBECTL_TIMEOUT:?}; it printed:\n{}",
                    String::from_utf8_lossy(&stderr.join().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    })
    .await
    .unwrap()
}

/// A kubectl that keeps running (`get --watch`, `logs -f`): its output arrives line by line;
/// it is killed when dropped.
pub struct KubectlProcess {
    child: Child,
    stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    _home: tempfile::TempDir,
}

/// Starts kubectl without waiting for it.
pub fn spawn_kubectl(kubeconfig: &Path, args: &[&str]) -> KubectlProcess {
    spawn_kubectl_env(kubeconfig, &[], args)
}

/// Starts kubectl with `env` (`DISABLE_HTTP2=1` keeps client-go on HTTP/1.1).
pub fn spawn_kubectl_env(kubeconfig: &Path, env: &[(&str, &str)], args: &[&str]) -> KubectlProcess {
    let home = tempfile::tempdir().unwrap();
    let mut child = command(kubeconfig, home.path(), env, args).spawn().unwrap();
    let (lines, stdout) = tokio::sync::mpsc::unbounded_channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let err = child.stderr.take().unwrap();
    let collected = Arc::clone(&stderr);
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let mut collected = collected.lock().unwrap();
            collected.push_str(&line);
            collected.push('\n');
        }
    });
    KubectlProcess {
        child,
        stdout,
        stderr,
        _home: home,
    }
}

impl KubectlProcess {
    /// The next line of output; `None` when kubectl ended it or after `timeout`.
    pub async fn next_line(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.stdout.recv())
            .await
            .ok()
            .flatten()
    }

    /// Reads lines until one contains `text`, and returns it; panics after `timeout`.
    pub async fn line_containing(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await {
                Some(line) if line.contains(text) => return line,
                Some(line) => seen.push(line),
                None => panic!(
                    "kubectl printed no line containing {text:?} within {timeout:?}; it printed {seen:#?}, and on stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// What kubectl printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Kills kubectl (SIGKILL: it closes nothing itself, the kernel closes its sockets).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KubectlProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
