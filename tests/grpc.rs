//! The gRPC API over loopback with a tonic client: every RPC, authentication, error codes,
//! health, reflection, and REST and gRPC seeing each other's changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Backend, Gateway, ROOT_TOKEN, START};
use kas_gateway::agent_sim::AgentSim;
use kas_gateway::crypto::{SecretBytes, jwt};
use kas_gateway::proto::agent::v1::AgentMetadata;
use kas_gateway::proto::v1 as pb;
use pb::agents_client::AgentsClient;
use pb::sessions_client::SessionsClient;
use pb::url_configurations_client::UrlConfigurationsClient;
use rstest::rstest;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const SECRET: [u8; 32] = [42; 32];

/// One metadata entry, or none.
type Metadata = Option<(&'static str, String)>;

async fn gateway(backend: Backend) -> Option<Gateway> {
    Gateway::start_with(backend, |config| {
        config.gitlab_secret = Some(SecretBytes::new(zeroize::Zeroizing::new(SECRET.to_vec())));
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.backoff.max = Duration::from_millis(300);
        config.dialer.heartbeat_interval = Duration::from_millis(200);
    })
    .await
}

async fn channel(gw: &Gateway) -> Channel {
    Channel::from_shared(gw.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn gitlab_jwt(claims: serde_json::Value, secret: &[u8]) -> String {
    format!("Bearer {}", jwt::sign_hs256(secret, &claims))
}

fn good_claims() -> serde_json::Value {
    let iat = START.as_secs();
    json!({"iss": "gitlab", "aud": "gitlab-kas", "iat": iat, "exp": iat + 60})
}

/// A request carrying GitLab's JWT.
fn signed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        gitlab_jwt(good_claims(), &SECRET).parse().unwrap(),
    );
    request
}

async fn project_and_agent(gw: &Gateway) -> (i64, i64, String) {
    let project = gw.project(ROOT_TOKEN, "p").await;
    let agent = gw.agent(project, "agent").await;
    let (_, token) = gw.agent_token(project, agent, "t").await;
    (project, agent, token)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = gateway(backend).await else {
        return;
    };
    let (_, agent, _) = project_and_agent(&gw).await;
    let (_, user_token) = gw.user("alice").await;
    let mut client = AgentsClient::new(channel(&gw).await);
    let call = |metadata: Metadata| {
        let mut request = tonic::Request::new(pb::GetAgentRequest { agent_id: agent });
        if let Some((key, value)) = metadata {
            request.metadata_mut().insert(key, value.parse().unwrap());
        }
        request
    };
    let iat = START.as_secs();
    let cases: Vec<(&str, Metadata, Code)> = vec![
        (
            "good JWT",
            Some(("authorization", gitlab_jwt(good_claims(), &SECRET))),
            Code::Ok,
        ),
        (
            "expired JWT",
            Some((
                "authorization",
                gitlab_jwt(
                    json!({"iss": "gitlab", "aud": "gitlab-kas", "exp": iat - 1}),
                    &SECRET,
                ),
            )),
            Code::Unauthenticated,
        ),
        (
            "wrong audience",
            Some((
                "authorization",
                gitlab_jwt(
                    json!({"iss": "gitlab", "aud": "gitlab", "exp": iat + 60}),
                    &SECRET,
                ),
            )),
            Code::Unauthenticated,
        ),
        (
            "wrong secret",
            Some(("authorization", gitlab_jwt(good_claims(), &[1; 32]))),
            Code::Unauthenticated,
        ),
        (
            "lifetime too long",
            Some((
                "authorization",
                gitlab_jwt(
                    json!({"iss": "gitlab", "aud": "gitlab-kas", "exp": iat + 3600}),
                    &SECRET,
                ),
            )),
            Code::Unauthenticated,
        ),
        (
            "admin token",
            Some(("private-token", ROOT_TOKEN.to_owned())),
            Code::Ok,
        ),
        (
            "non-admin token",
            Some(("private-token", user_token.clone())),
            Code::Unauthenticated,
        ),
        (
            "unknown token",
            Some(("private-token", "glpat-nope-nope-nope-nope".to_owned())),
            Code::Unauthenticated,
        ),
        ("nothing", None, Code::Unauthenticated),
    ];
    for (name, metadata, expected) in cases {
        let code = match client.get_agent(call(metadata)).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        assert_eq!(code, expected, "{name}");
    }

    // Health answers without credentials.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&gw).await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        serving.get_ref().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// What reflection lists: the services the gateway answers, and nothing it only calls.
const SERVED: [&str; 6] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "kas_gateway.v1.Agents",
    "kas_gateway.v1.Sessions",
    "kas_gateway.v1.UrlConfigurations",
];

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_what_is_served_in_both_versions(
    #[values(Backend::Sqlite)] backend: Backend,
) {
    let Some(gw) = gateway(backend).await else {
        return;
    };
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let request = |message| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        };
        let mut client = ServerReflectionClient::new(channel(&gw).await);
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([
                request(MessageRequest::ListServices(String::new())),
                request(MessageRequest::FileContainingSymbol(
                    "kas_gateway.v1.Sessions".into(),
                )),
                request(MessageRequest::FileContainingSymbol(
                    "kas_gateway.agent.v1.ReceptiveAgent".into(),
                )),
            ]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.next().await.unwrap().unwrap().message_response
        else {
            panic!("v1: a list of services");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, SERVED, "v1");
        let served = stream.next().await.unwrap().unwrap().message_response;
        assert!(
            matches!(served, Some(MessageResponse::FileDescriptorResponse(_))),
            "v1 does not describe Sessions: {served:?}"
        );
        let unserved = stream.next().await.unwrap().unwrap_err();
        assert_eq!(
            unserved.code(),
            Code::NotFound,
            "v1 describes ReceptiveAgent"
        );
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(&gw).await);
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.next().await.unwrap().unwrap().message_response
        else {
            panic!("v1alpha: a list of services");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, SERVED, "v1alpha");
    }
}

/// A call signed exactly as GitLab's KAS client signs it (`Gitlab::Kas::Client#metadata` and
/// `JSONWebToken::HMACToken`): `authorization: bearer …`, header `{"typ":"JWT","alg":"HS256"}`,
/// `iss` the host name, `jti`, `nbf` five seconds back, a minute's lifetime.
fn as_gitlab_signs(issuer: &str) -> tonic::Request<pb::ListUrlConfigurationsRequest> {
    let iat = START.as_secs();
    let claims = json!({
        "jti": "0b6f1c52-3f0e-4d55-8a53-7d1c9e2a4b10",
        "aud": "gitlab-kas",
        "iss": issuer,
        "iat": iat,
        "nbf": iat - 5,
        "exp": iat + 60,
    });
    let token = jwt::sign_hs256(&SECRET, &claims);
    let header = token.split('.').next().unwrap();
    assert_eq!(header, "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9");
    let mut request = tonic::Request::new(pb::ListUrlConfigurationsRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("bearer {token}").parse().unwrap());
    request
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_signed_as_gitlab_signs_them(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    // By default any host name is GitLab's.
    let Some(gw) = gateway(backend).await else {
        return;
    };
    let mut client = UrlConfigurationsClient::new(channel(&gw).await);
    client
        .list_url_configurations(as_gitlab_signs("gitlab.example.com"))
        .await
        .unwrap();
    let refused = client
        .list_url_configurations(as_gitlab_signs(""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    drop(gw);

    // With KAS_GATEWAY_GITLAB_ISSUER, exactly that one.
    let Some(gw) = Gateway::start_with(backend, |config| {
        config.gitlab_secret = Some(SecretBytes::new(zeroize::Zeroizing::new(SECRET.to_vec())));
        config.gitlab_issuer = Some("gitlab.example.com".into());
    })
    .await
    else {
        return;
    };
    let mut client = UrlConfigurationsClient::new(channel(&gw).await);
    client
        .list_url_configurations(as_gitlab_signs("gitlab.example.com"))
        .await
        .unwrap();
    let refused = client
        .list_url_configurations(as_gitlab_signs("gitlab.example.org"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_configurations_and_agents(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(gw) = gateway(backend).await else {
        return;
    };
    let (project, agent, _) = project_and_agent(&gw).await;
    let mut configs = UrlConfigurationsClient::new(channel(&gw).await);

    // Validation with the REST API's messages.
    let invalid = configs
        .create_url_configuration(signed(pb::CreateUrlConfigurationRequest {
            agent_id: agent,
            url: "http://nope".into(),
            tls_host: Some("bad host".into()),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(
        invalid.message(),
        "Url is not a valid URL, Tls host must be a valid hostname!"
    );
    let missing = configs
        .create_url_configuration(signed(pb::CreateUrlConfigurationRequest {
            agent_id: 999,
            url: "grpcs://a:1".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let created = configs
        .create_url_configuration(signed(pb::CreateUrlConfigurationRequest {
            agent_id: agent,
            url: "grpcs://agent.example.com:443".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.public_key.as_deref().map(str::len), Some(44));
    assert_eq!((created.agent_id, created.project_id), (agent, project));
    let limit = configs
        .create_url_configuration(signed(pb::CreateUrlConfigurationRequest {
            agent_id: agent,
            url: "grpcs://b:1".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(limit.code(), Code::FailedPrecondition);
    assert_eq!(
        limit.message(),
        "URL configuration already exists for this agent"
    );

    // Visible over REST, and the other way round.
    let rest = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
        )
        .await;
    assert_eq!(
        rest.expect_status(200)[0]["public_key"],
        json!(created.public_key)
    );
    let other = gw.agent(project, "other").await;
    let via_rest = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{other}/url_configurations"),
            json!({"url": "grpc://10.0.0.1:80"}),
        )
        .await;
    let via_rest_id = via_rest.expect_status(201)["id"].as_i64().unwrap();
    let fetched = configs
        .get_url_configuration(signed(pb::GetUrlConfigurationRequest { id: via_rest_id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.url, "grpc://10.0.0.1:80");

    // Lists, paginated and filtered.
    let all = configs
        .list_url_configurations(signed(pb::ListUrlConfigurationsRequest {
            per_page: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (all.total, all.url_configurations.len(), all.next_page),
        (2, 1, 2)
    );
    let of_agent = configs
        .list_url_configurations(signed(pb::ListUrlConfigurationsRequest {
            agent_id: Some(other),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        of_agent
            .url_configurations
            .iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        [via_rest_id]
    );
    let of_nothing = configs
        .list_url_configurations(signed(pb::ListUrlConfigurationsRequest {
            project_id: Some(999),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_nothing.total, 0);
    // A page far past the end has no next page (and the arithmetic does not overflow).
    let far = configs
        .list_url_configurations(signed(pb::ListUrlConfigurationsRequest {
            page: i64::MAX,
            per_page: 100,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (far.total, far.url_configurations.len(), far.next_page),
        (2, 0, 0)
    );

    // The agent with its tokens' metadata, never a secret.
    let mut agents = AgentsClient::new(channel(&gw).await);
    let described = agents
        .get_agent(signed(pb::GetAgentRequest { agent_id: agent }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        described
            .agent
            .as_ref()
            .unwrap()
            .project_path_with_namespace,
        "root/p"
    );
    assert!(described.agent.as_ref().unwrap().is_receptive);
    assert_eq!(described.tokens.len(), 1);
    assert_eq!(described.tokens[0].status, "active");

    // Deleted over gRPC: gone over REST.
    configs
        .delete_url_configuration(signed(pb::DeleteUrlConfigurationRequest { id: created.id }))
        .await
        .unwrap();
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
    )
    .await
    .expect(200, json!([]));
    let gone = configs
        .delete_url_configuration(signed(pb::DeleteUrlConfigurationRequest { id: created.id }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(gw) = gateway(backend).await else {
        return;
    };
    let (_, agent, token) = project_and_agent(&gw).await;
    let mut sessions = SessionsClient::new(channel(&gw).await);
    let mut watch = sessions
        .watch_sessions(signed(pb::WatchSessionsRequest {}))
        .await
        .unwrap()
        .into_inner();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut configs = UrlConfigurationsClient::new(channel(&gw).await);
    configs
        .create_url_configuration(signed(pb::CreateUrlConfigurationRequest {
            agent_id: agent,
            url: format!("grpc://127.0.0.1:{port}"),
            ..Default::default()
        }))
        .await
        .unwrap();
    let sim = AgentSim::start(
        kas_gateway::agent_sim::AgentSimConfig {
            token,
            tls: None,
            client_ca: None,
            jwt_public_key: None,
            jwt_audience: jwt::AUDIENCE.into(),
            metadata: AgentMetadata {
                version: "v18.0.0".into(),
                ..Default::default()
            },
            clock: gw.clock.clone(),
        },
        listener,
    )
    .unwrap();

    // The watch sees it come up.
    let up = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let s = watch.next().await.unwrap().unwrap();
            if s.agent_id == agent && s.state() == pb::SessionState::Connected {
                return s;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(up.agent.unwrap().version, "v18.0.0");

    let got = sessions
        .get_session(signed(pb::GetSessionRequest { agent_id: agent }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::SessionState::Connected);
    let listed = sessions
        .list_sessions(signed(pb::ListSessionsRequest {
            state: pb::SessionState::Connected.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .sessions
            .iter()
            .map(|s| s.agent_id)
            .collect::<Vec<_>>(),
        [agent]
    );
    let none = sessions
        .list_sessions(signed(pb::ListSessionsRequest {
            state: pb::SessionState::Failed.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(none.sessions.is_empty());

    let ping = sessions
        .ping_agent(signed(pb::PingAgentRequest {
            agent_id: agent,
            payload: b"hi".to_vec(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ping.payload, b"hi");
    assert!(ping.round_trip_us > 0);
    let dialled = sessions
        .dial_now(signed(pb::DialNowRequest {
            agent_id: agent,
            deadline_ms: 2000,
        }))
        .await
        .unwrap();
    assert_eq!(dialled.get_ref().state(), pb::SessionState::Connected);

    // The agent goes away: the watch sees it go down; ping is refused.
    sim.stop().await;
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let s = watch.next().await.unwrap().unwrap();
            if s.agent_id == agent && s.state() != pb::SessionState::Connected {
                return;
            }
        }
    })
    .await
    .unwrap();
    let refused = sessions
        .ping_agent(signed(pb::PingAgentRequest {
            agent_id: agent,
            payload: vec![],
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // DialNow while the agent is down returns the attempt's outcome within the deadline.
    let after = sessions
        .dial_now(signed(pb::DialNowRequest {
            agent_id: agent,
            deadline_ms: 3000,
        }))
        .await
        .unwrap();
    assert_ne!(after.get_ref().state(), pb::SessionState::Connected);
    assert!(
        after
            .get_ref()
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("connection refused"),
        "{:?}",
        after.get_ref()
    );

    let unknown = sessions
        .get_session(signed(pb::GetSessionRequest { agent_id: 999 }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// The gateway's own listener over TLS, its certificate replaced without a restart.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_with_certificate_reload(#[values(Backend::Sqlite)] backend: Backend) {
    use kas_gateway::certs::DevCa;
    use tonic::transport::{Certificate, ClientTlsConfig};
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (
        certs.path().join("tls.pem"),
        certs.path().join("tls-key.pem"),
    );
    // TLS clients check certificates against the real clock: make them valid now.
    #[allow(clippy::disallowed_methods)]
    let real_now = time::OffsetDateTime::now_utc();
    let first_ca = DevCa::new("first", real_now).unwrap();
    let first = first_ca.server(&["localhost"], real_now).unwrap();
    std::fs::write(&cert_path, &first.cert).unwrap();
    std::fs::write(&key_path, &first.key).unwrap();
    let Some(gw) = Gateway::start_with(backend, |config| {
        config.tls = Some((cert_path.clone(), key_path.clone()));
    })
    .await
    else {
        return;
    };
    let port = gw.base.rsplit(':').next().unwrap().to_owned();
    let connect = |ca: String| {
        let url = format!("https://127.0.0.1:{port}");
        async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
        }
    };
    let list = |channel: Channel| async move {
        let mut request = tonic::Request::new(pb::ListSessionsRequest::default());
        request
            .metadata_mut()
            .insert("private-token", ROOT_TOKEN.parse().unwrap());
        SessionsClient::new(channel).list_sessions(request).await
    };
    let channel = connect(first_ca.pair().cert).await.unwrap();
    assert!(list(channel).await.is_ok());

    // Renewed under another CA: new connections get the new certificate.
    let second_ca = DevCa::new("second", real_now).unwrap();
    let second = second_ca.server(&["localhost"], real_now).unwrap();
    std::fs::write(&key_path, &second.key).unwrap();
    std::fs::write(&cert_path, &second.cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(channel) = connect(second_ca.pair().cert).await
            && list(channel).await.is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_trust = match connect(first_ca.pair().cert).await {
        Ok(channel) => list(channel).await.is_ok(),
        Err(_) => false,
    };
    assert!(!old_trust, "the old certificate is no longer served");

    // A broken pair is ignored: the service keeps its certificate.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let channel = connect(second_ca.pair().cert).await.unwrap();
    assert!(list(channel).await.is_ok());
}

/// The database gone: calls answer UNAVAILABLE and health turns NOT_SERVING.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_store(#[values(Backend::Postgres)] backend: Backend) {
    let Some(mut gw) = gateway(backend).await else {
        return;
    };
    drop(gw.pg.take()); // DROP DATABASE … WITH (FORCE)
    let mut agents = AgentsClient::new(channel(&gw).await);
    let error = agents
        .get_agent(signed(pb::GetAgentRequest { agent_id: 1 }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&gw).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        if status.get_ref().status()
            == tonic_health::pb::health_check_response::ServingStatus::NotServing
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health still SERVING");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
