//! The agent's upstream: the Kubernetes API its tunnelled requests go to, with the agent's own
//! credentials, as itself or impersonating the GitLab user.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use tokio_stream::Stream;

use crate::crypto::Secret;
use crate::proto::agent::v1 as pb;

/// Where the in-cluster service account's token and CA are.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long connecting to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom the agent acts as upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessAs {
    /// The agent's own identity (its token) for every request.
    #[default]
    Agent,
    /// The GitLab user: `Impersonate-User: gitlab:user:<username>` and groups for their
    /// role, as GitLab's agent does for `access_as: user` (the agent's identity needs the
    /// `impersonate` permission).
    User,
}

/// The Kubernetes API and how to reach it.
pub struct Upstream {
    base: Uri,
    token: Option<Secret>,
    access_as: AccessAs,
    client: Client<HttpsConnector<HttpConnector>, axum::body::Body>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("access_as", &self.access_as)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// An upstream at `url` (`https://…`, or `http://…`), trusting `ca_pem` (else the
    /// system's CAs), presenting `token` as a bearer token.
    pub fn new(
        url: &str,
        ca_pem: Option<&str>,
        token: Option<Secret>,
        access_as: AccessAs,
    ) -> anyhow::Result<Self> {
        let base: Uri = url
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("the upstream URL {url:?} is not a URL"))?;
        if !matches!(base.scheme_str(), Some("https" | "http")) || base.authority().is_none() {
            anyhow::bail!("the upstream URL must be https://host[:port] (or http://)");
        }
        let roots = match ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots
                        .add(cert.context("the upstream CA is not PEM")?)
                        .context("the upstream CA is unusable")?;
                }
                if roots.is_empty() {
                    anyhow::bail!("the upstream CA file holds no certificate");
                }
                roots
            }
            None => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
                roots
            }
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Self {
            base,
            token,
            access_as,
            client,
        })
    }

    /// The Kubernetes API of the cluster the agent runs in: `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, with the pod's service account token and CA.
    pub fn in_cluster(access_as: AccessAs) -> anyhow::Result<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set: not in a pod? Give --upstream-url")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SERVICE_ACCOUNT);
        let ca = std::fs::read_to_string(dir.join("ca.crt"))
            .with_context(|| format!("reading {}", dir.join("ca.crt").display()))?;
        let token = token_from_file(&dir.join("token"))?;
        Self::new(
            &format!("https://{host}:{port}"),
            Some(&ca),
            Some(token),
            access_as,
        )
    }

    /// The Kubernetes version upstream (`gitVersion` of `/version`), for the agent's hello.
    pub async fn version(&self) -> anyhow::Result<String> {
        let head = pb::RequestHead {
            method: "GET".into(),
            path: "/version".into(),
            ..pb::RequestHead::default()
        };
        let (head, body) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.forward(head, tokio_stream::empty()))
                .await
                .context("no answer in time")??;
        let body = tokio::time::timeout(
            CONNECT_TIMEOUT,
            axum::body::to_bytes(axum::body::Body::new(body), 64 * 1024),
        )
        .await
        .context("no answer in time")??;
        if head.status != 200 {
            anyhow::bail!("/version answered {}", head.status);
        }
        let version: serde_json::Value = serde_json::from_slice(&body)?;
        Ok(version["gitVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Sends a tunnelled request upstream; its response head and body.
    pub async fn forward(
        &self,
        head: pb::RequestHead,
        body: impl Stream<Item = Result<Bytes, tonic::Status>> + Send + 'static,
    ) -> Result<(pb::ResponseHead, hyper::body::Incoming), tonic::Status> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| tonic::Status::invalid_argument("invalid method"))?;
        if !head.path.starts_with('/') {
            return Err(tonic::Status::invalid_argument(
                "the path must start with /",
            ));
        }
        let base = self.base.to_string();
        let uri: Uri = format!("{}{}", base.trim_end_matches('/'), head.path)
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("invalid path"))?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::from_stream(body))
            .map_err(|e| tonic::Status::invalid_argument(format!("invalid request: {e}")))?;
        let headers = request.headers_mut();
        for header in &head.headers {
            let Ok(name) = HeaderName::from_bytes(header.name.as_bytes()) else {
                continue;
            };
            if !passes(&name) {
                continue;
            }
            for value in &header.values {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    headers.append(name.clone(), value);
                }
            }
        }
        self.credentials(headers, head.user.as_ref())?;
        let response = self.client.request(request).await.map_err(|e| {
            tonic::Status::unavailable(format!("the Kubernetes API did not answer: {e}"))
        })?;
        let (parts, body) = response.into_parts();
        let head = pb::ResponseHead {
            status: u32::from(parts.status.as_u16()),
            headers: to_headers(&parts.headers),
        };
        Ok((head, body))
    }

    /// The agent's token, and the impersonation of the GitLab user when so configured.
    fn credentials(
        &self,
        headers: &mut HeaderMap,
        user: Option<&pb::GitLabUser>,
    ) -> Result<(), tonic::Status> {
        if let Some(token) = &self.token {
            let value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| tonic::Status::internal("the upstream token is not a header value"))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        if self.access_as == AccessAs::User {
            let user = user
                .ok_or_else(|| tonic::Status::permission_denied("no GitLab user to impersonate"))?;
            for (name, value) in impersonation(user) {
                let value = HeaderValue::try_from(value)
                    .map_err(|_| tonic::Status::invalid_argument("invalid user name"))?;
                headers.append(name, value);
            }
        }
        Ok(())
    }
}

/// The impersonation headers for a GitLab user, as GitLab's agent sends them for
/// `access_as: user`: the user, the group of every GitLab user, and one for their role on the
/// agent's project.
pub fn impersonation(user: &pb::GitLabUser) -> Vec<(HeaderName, String)> {
    let user_header = HeaderName::from_static("impersonate-user");
    let group = HeaderName::from_static("impersonate-group");
    let mut headers = vec![
        (user_header, format!("gitlab:user:{}", user.username)),
        (group.clone(), "gitlab:user".to_owned()),
    ];
    if let Some(role) = role_name(user.access_level) {
        headers.push((
            group,
            format!("gitlab:project_role:{}:{role}", user.project_id),
        ));
    }
    headers
}

fn role_name(access_level: i32) -> Option<&'static str> {
    match access_level {
        30 => Some("developer"),
        40 => Some("maintainer"),
        50 => Some("owner"),
        _ => None,
    }
}

/// Headers that never cross the tunnel: the connection's own (hop-by-hop), credentials, and
/// impersonation, which only the agent decides.
fn passes(name: &HeaderName) -> bool {
    !(is_hop_by_hop(name)
        || name == header::AUTHORIZATION
        || name == header::PROXY_AUTHORIZATION
        || name == header::COOKIE
        || name.as_str().starts_with("impersonate-"))
}

/// The connection's own headers, which a proxy does not forward (RFC 9110, 7.6.1), and
/// `host`, which is the next hop's.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

/// A header map as tunnel headers, without the hop-by-hop ones.
pub fn to_headers(headers: &HeaderMap) -> Vec<pb::Header> {
    let mut out: Vec<pb::Header> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            continue;
        }
        out.push(pb::Header {
            name: name.as_str().to_owned(),
            values: headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
        });
    }
    out
}

/// A token file's token, without the line end (`--upstream-token-file`, the service account's).
pub fn token_from_file(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}
