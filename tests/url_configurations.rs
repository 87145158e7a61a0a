//! Receptive-agent URL configurations: both modes, every validation, roles, the gate, the
//! one-per-agent limit under concurrency, and what is (not) stored in plain text.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{Backend, Gateway, ROOT_TOKEN, START};
use kas_gateway::certs::{DevCa, Pair};
use kas_gateway::domain::DialCredentials;
use rcgen::ExtendedKeyUsagePurpose;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rstest::rstest;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

fn start_time() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(START.as_secs()).unwrap()
}

struct Certs {
    ca: Pair,
    client: Pair,
    other_client: Pair,
    expired: Pair,
}

fn certs() -> Certs {
    let ca = DevCa::new("test CA", start_time()).unwrap();
    let client = ca.client("gateway", start_time()).unwrap();
    let other_client = ca.client("other", start_time()).unwrap();
    let expired = ca
        .leaf(
            &["old"],
            ExtendedKeyUsagePurpose::ClientAuth,
            start_time() - Duration::days(400),
            start_time() - Duration::days(1),
        )
        .unwrap();
    Certs {
        ca: ca.pair(),
        client,
        other_client,
        expired,
    }
}

fn bad(messages: &[&str]) -> Value {
    let list = messages
        .iter()
        .map(|m| serde_json::to_string(m).unwrap())
        .collect::<Vec<_>>()
        .join(", ");
    json!({"message": format!("400 Bad request - [{list}]")})
}

async fn setup(gw: &Gateway) -> (i64, i64, String) {
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let path = format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations");
    (project, agent, path)
}

#[rstest]
#[tokio::test]
async fn jwt_mode(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (project, agent, path) = setup(&gw).await;
    let created = gw
        .post(
            ROOT_TOKEN,
            &path,
            json!({"url": "grpcs://agent.example.com:4242"}),
        )
        .await;
    let body = created.expect_status(201).clone();
    let id = body["id"].as_i64().unwrap();
    let public_key = body["public_key"].as_str().unwrap().to_owned();
    assert_eq!(public_key.len(), 44);
    assert_eq!(STANDARD.decode(&public_key).unwrap().len(), 32);
    let expected = json!({
        "id": id, "agent_id": agent, "url": "grpcs://agent.example.com:4242",
        "public_key": public_key, "client_cert": null, "ca_cert": null, "tls_host": null,
    });
    assert_eq!(body, expected);
    assert_eq!(
        common::keys_in_order(&created.text),
        [
            "id",
            "agent_id",
            "url",
            "public_key",
            "client_cert",
            "ca_cert",
            "tls_host"
        ]
    );
    gw.get(ROOT_TOKEN, &format!("{path}/{id}"))
        .await
        .expect(200, expected.clone());
    gw.get(ROOT_TOKEN, &path)
        .await
        .expect(200, json!([expected]));
    let agent_path = format!("/api/v4/projects/{project}/cluster_agents/{agent}");
    assert_eq!(
        gw.get(ROOT_TOKEN, &agent_path).await.body["is_receptive"],
        true
    );

    // The public key verifies what the stored private key signs (decrypted by the service).
    let DialCredentials::Jwt { pkcs8 } = gw.service().dial_credentials(id).await.unwrap() else {
        panic!("JWT credentials expected");
    };
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).unwrap();
    let message = b"header.claims";
    let signature = pair.sign(message);
    let verifier = UnparsedPublicKey::new(&ED25519, STANDARD.decode(&public_key).unwrap());
    verifier.verify(message, signature.as_ref()).unwrap();
    assert_eq!(STANDARD.encode(pair.public_key().as_ref()), public_key);

    // One per agent.
    gw.post(ROOT_TOKEN, &path, json!({"url": "grpcs://other:1"}))
        .await
        .expect(
            400,
            json!({"message": "400 Bad request - URL configuration already exists for this agent"}),
        );

    gw.delete(ROOT_TOKEN, &format!("{path}/{id}"))
        .await
        .expect_status(204);
    gw.get(ROOT_TOKEN, &format!("{path}/{id}"))
        .await
        .expect(404, json!({"message": "404 Not Found"}));
    gw.delete(ROOT_TOKEN, &format!("{path}/{id}"))
        .await
        .expect(404, json!({"message": "404 Not Found"}));
    gw.get(ROOT_TOKEN, &path).await.expect(200, json!([]));
    assert_eq!(
        gw.get(ROOT_TOKEN, &agent_path).await.body["is_receptive"],
        false
    );
    // grpc:// is fine without a client certificate.
    gw.post(
        ROOT_TOKEN,
        &path,
        json!({"url": "grpc://10.0.0.1:8080", "tls_host": "agent.internal"}),
    )
    .await
    .expect_status(201);
}

#[rstest]
#[tokio::test]
async fn mtls_mode_with_pem_and_base64(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let certs = certs();
    let (project, _, path) = setup(&gw).await;
    let created = gw
        .post(
            ROOT_TOKEN,
            &path,
            json!({
                "url": "grpcs://agent.example.com:4242",
                "client_cert": certs.client.cert, "client_key": certs.client.key,
                "ca_cert": certs.ca.cert, "tls_host": "agent.example.com",
            }),
        )
        .await;
    let body = created.expect_status(201);
    assert_eq!(body["public_key"], Value::Null);
    assert_eq!(body["client_cert"], json!(certs.client.cert));
    assert_eq!(body["ca_cert"], json!(certs.ca.cert));
    assert_eq!(body["tls_host"], "agent.example.com");
    assert!(
        !created.text.contains("PRIVATE KEY"),
        "the client key is never returned"
    );
    let id = body["id"].as_i64().unwrap();
    let DialCredentials::Mtls { client_key } = gw.service().dial_credentials(id).await.unwrap()
    else {
        panic!("mTLS credentials expected");
    };
    assert_eq!(
        String::from_utf8(client_key.to_vec()).unwrap(),
        certs.client.key
    );

    // Base64 of PEM, as GitLab's own code sends it: stored and returned as PEM.
    let agent2 = gw.agent(project, "agent2").await;
    let encoded = |pem: &str| STANDARD.encode(pem.as_bytes());
    let created = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent2}/url_configurations"),
            json!({
                "url": "grpcs://agent2.example.com",
                "client_cert": encoded(&certs.client.cert), "client_key": encoded(&certs.client.key),
                "ca_cert": encoded(&certs.ca.cert),
            }),
        )
        .await;
    let body = created.expect_status(201);
    assert_eq!(body["client_cert"], json!(certs.client.cert));
    assert_eq!(body["ca_cert"], json!(certs.ca.cert));
}

#[rstest]
#[tokio::test]
async fn every_validation_message(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let c = certs();
    let (_, _, path) = setup(&gw).await;
    let url = "grpcs://agent.example.com:4242";
    let garbage = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n";
    let truncated = &c.client.cert[..c.client.cert.len() / 2];
    let cases: Vec<(Value, Value)> = vec![
        (json!({}), json!({"error": "url is missing"})),
        (json!({"url": ["x"]}), json!({"error": "url is invalid"})),
        (
            json!({"url": "http://agent:1"}),
            bad(&["Url is not a valid URL"]),
        ),
        (json!({"url": "grpcs://"}), bad(&["Url is not a valid URL"])),
        (
            json!({"url": "not a url"}),
            bad(&["Url is not a valid URL"]),
        ),
        (
            json!({"url": url, "ca_cert": "hello"}),
            bad(&["Ca cert must be a valid PEM certificate"]),
        ),
        (
            json!({"url": url, "ca_cert": c.client.key}),
            bad(&["Ca cert must be a valid PEM certificate"]),
        ),
        (
            json!({"url": url, "tls_host": "not a host!"}),
            bad(&["Tls host must be a valid hostname!"]),
        ),
        (
            json!({"url": url, "client_cert": garbage, "client_key": c.client.key}),
            bad(&["Client cert must be a valid PEM certificate"]),
        ),
        (
            json!({"url": url, "client_cert": truncated, "client_key": c.client.key}),
            bad(&["Client cert must be a valid PEM certificate"]),
        ),
        (
            json!({"url": url, "client_cert": c.client.cert, "client_key": "garbage"}),
            bad(&["Client key must be a valid PEM private key"]),
        ),
        (
            json!({"url": url, "client_cert": c.client.cert, "client_key": &c.client.key[..40]}),
            bad(&["Client key must be a valid PEM private key"]),
        ),
        (
            json!({"url": url, "client_cert": c.client.cert, "client_key": c.client.cert}),
            bad(&["Client key must be a valid PEM private key"]),
        ),
        (
            json!({"url": url, "client_cert": c.client.cert}),
            bad(&["Client key can't be blank when a client cert is given"]),
        ),
        (
            json!({"url": url, "client_key": c.client.key}),
            bad(&["Client cert can't be blank when a client key is given"]),
        ),
        (
            json!({"url": url, "client_cert": c.client.cert, "client_key": c.other_client.key}),
            bad(&["Client key does not belong to the client cert"]),
        ),
        (
            json!({"url": url, "client_cert": c.expired.cert, "client_key": c.expired.key}),
            bad(&["Client cert has expired"]),
        ),
        (
            json!({"url": "grpc://agent:1", "client_cert": c.client.cert, "client_key": c.client.key}),
            bad(&["Url must use grpcs:// when a client cert is given"]),
        ),
        (
            json!({"url": url, "ca_cert": "x".repeat(64 * 1024 + 1)}),
            bad(&["Ca cert is too long (maximum is 65536 characters)"]),
        ),
        (
            json!({"url": format!("grpcs://{}", "a".repeat(3000))}),
            bad(&["Url is too long (maximum is 2048 characters)"]),
        ),
        (
            json!({"url": "ftp://x", "ca_cert": "x", "tls_host": "-", "client_cert": "y"}),
            bad(&[
                "Url is not a valid URL",
                "Ca cert must be a valid PEM certificate",
                "Tls host must be a valid hostname!",
                "Client cert must be a valid PEM certificate",
                "Client key can't be blank when a client cert is given",
            ]),
        ),
    ];
    for (body, expected) in cases {
        let reply = gw.post(ROOT_TOKEN, &path, body.clone()).await;
        assert_eq!(
            (reply.status.as_u16(), &reply.body),
            (400, &expected),
            "for {body}"
        );
    }
    // A body over the size limit: 413, not a 500.
    let huge = json!({"url": url, "client_cert": "x".repeat(2 * 1024 * 1024)});
    gw.post(ROOT_TOKEN, &path, huge).await.expect_status(413);
    // Nothing was written.
    gw.get(ROOT_TOKEN, &path).await.expect(200, json!([]));
}

#[rstest]
#[tokio::test]
async fn roles(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (project, agent, path) = setup(&gw).await;
    let existing = gw
        .post(ROOT_TOKEN, &path, json!({"url": "grpcs://a:1"}))
        .await;
    let id = existing.expect_status(201)["id"].as_i64().unwrap();
    let forbidden = json!({"message": "403 Forbidden"});
    let mut tokens = Vec::new();
    for (name, level) in [
        ("reporter", Some(20)),
        ("developer", Some(30)),
        ("maintainer", Some(40)),
        ("stranger", None),
    ] {
        let (user, token) = gw.user(name).await;
        if let Some(level) = level {
            gw.add_member(project, user, level).await;
        }
        tokens.push((name, token));
    }
    let token = |name: &str| tokens.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    // Reads: Developer.
    gw.get(&token("reporter"), &path)
        .await
        .expect(403, forbidden.clone());
    gw.get(&token("reporter"), &format!("{path}/{id}"))
        .await
        .expect(403, forbidden.clone());
    gw.get(&token("developer"), &path).await.expect_status(200);
    gw.get(&token("developer"), &format!("{path}/{id}"))
        .await
        .expect_status(200);
    gw.get(&token("stranger"), &path)
        .await
        .expect(404, json!({"message": "404 Project Not Found"}));
    // Writes: Maintainer.
    gw.post(&token("developer"), &path, json!({"url": "grpcs://a:1"}))
        .await
        .expect(403, forbidden.clone());
    gw.delete(&token("developer"), &format!("{path}/{id}"))
        .await
        .expect(403, forbidden);
    gw.delete(&token("maintainer"), &format!("{path}/{id}"))
        .await
        .expect_status(204);
    gw.post(&token("maintainer"), &path, json!({"url": "grpcs://a:1"}))
        .await
        .expect_status(201);
    // Unknown agent and another agent's configuration.
    let other = gw.agent(project, "other").await;
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/999/url_configurations"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{other}/url_configurations/{id}"),
    )
    .await
    .expect(404, json!({"message": "404 Not Found"}));
    gw.get(ROOT_TOKEN, &format!("{path}/x"))
        .await
        .expect(400, json!({"error": "url_configuration_id is invalid"}));
    let _ = agent;
}

#[rstest]
#[tokio::test]
async fn the_gate_turns_the_feature_off(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = Gateway::start_with(backend, |c| c.receptive_agents = false).await else {
        return;
    };
    let (_, _, path) = setup(&gw).await;
    let not_found = json!({"message": "404 Not Found"});
    gw.get(ROOT_TOKEN, &path)
        .await
        .expect(404, not_found.clone());
    gw.get(ROOT_TOKEN, &format!("{path}/1"))
        .await
        .expect(404, not_found.clone());
    gw.post(ROOT_TOKEN, &path, json!({"url": "grpcs://a:1"}))
        .await
        .expect(404, not_found.clone());
    gw.delete(ROOT_TOKEN, &format!("{path}/1"))
        .await
        .expect(404, not_found);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_configuration_per_agent_under_concurrency(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let (_, _, path) = setup(&gw).await;
    let url = format!("{}{path}", gw.base);
    let requests = (0..50).map(|i| {
        let request = gw
            .client
            .post(&url)
            .header("Private-Token", ROOT_TOKEN)
            .json(&json!({"url": format!("grpcs://agent-{i}.example.com:443")}));
        async move { common::read(request.send().await.unwrap()).await }
    });
    let replies = futures::future::join_all(requests).await;
    assert_eq!(
        replies.iter().filter(|r| r.status.as_u16() == 201).count(),
        1
    );
    for reply in replies.iter().filter(|r| r.status.as_u16() != 201) {
        reply.expect(
            400,
            json!({"message": "400 Bad request - URL configuration already exists for this agent"}),
        );
    }
    let listed = gw.get(ROOT_TOKEN, &path).await;
    assert_eq!(listed.expect_status(200).as_array().unwrap().len(), 1);
}

#[rstest]
#[tokio::test]
async fn deleting_the_agent_deletes_its_configuration(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let (project, agent, path) = setup(&gw).await;
    let id = gw
        .post(ROOT_TOKEN, &path, json!({"url": "grpcs://a:1"}))
        .await
        .expect_status(201)["id"]
        .as_i64()
        .unwrap();
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}"),
    )
    .await
    .expect_status(204);
    assert!(
        gw.service().dial_credentials(id).await.is_err(),
        "the configuration row is gone"
    );
}

/// Neither a private key nor a client key nor an agent token is stored in plain text.
#[rstest]
#[tokio::test]
async fn no_secret_in_plain_text(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let mut gw = gateway!(backend);
    let c = certs();
    let (project, agent, path) = setup(&gw).await;
    let jwt = gw
        .post(ROOT_TOKEN, &path, json!({"url": "grpcs://a:1"}))
        .await;
    let jwt_id = jwt.expect_status(201)["id"].as_i64().unwrap();
    let agent2 = gw.agent(project, "mtls").await;
    let mtls = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent2}/url_configurations"),
            json!({"url": "grpcs://b:1", "client_cert": c.client.cert, "client_key": c.client.key}),
        )
        .await;
    mtls.expect_status(201);
    let (_, agent_token) = gw.agent_token(project, agent, "t").await;
    let DialCredentials::Jwt { pkcs8 } = gw.service().dial_credentials(jwt_id).await.unwrap()
    else {
        panic!("JWT credentials expected");
    };
    // The 32-byte private key inside the PKCS#8 document: OCTET STRING { OCTET STRING (32) }.
    let at = pkcs8
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .unwrap()
        + 4;
    let seed = pkcs8[at..at + 32].to_vec();
    use rustls_pki_types::pem::PemObject;
    let client_key_der =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(c.client.key.as_bytes()).unwrap();
    let client_key_body = c.client.key.lines().nth(1).unwrap().to_owned();

    gw.stop().await;
    let bytes = gw.database_bytes().await;
    assert!(
        common::contains(&bytes, b"grpcs://b:1"),
        "the database was read"
    );
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("private key (PKCS#8)", pkcs8.to_vec()),
        ("private key seed", seed),
        ("client key (DER)", client_key_der.secret_der().to_vec()),
        ("client key (PEM)", client_key_body.into_bytes()),
        ("agent token", agent_token.into_bytes()),
    ];
    for (what, needle) in needles {
        assert!(!common::contains(&bytes, &needle), "{what} in plain text");
        assert!(
            !common::contains(&bytes, common::hex(&needle).as_bytes()),
            "{what} in hex"
        );
    }
}

/// Rotation: a new active key, every secret re-encrypted, a running gateway keeps decrypting.
/// With the generated key file: on PostgreSQL the keys are always configured (replicas share
/// them) and the operator rotates them, as the README describes.
#[rstest]
#[tokio::test]
async fn key_rotation(#[values(Backend::Sqlite)] backend: Backend) {
    let gw = gateway!(backend);
    let (project, _, path) = setup(&gw).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let agent = gw.agent(project, &format!("r{i}")).await;
        let created = gw
            .post(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
                json!({"url": "grpcs://a:1"}),
            )
            .await;
        ids.push(created.expect_status(201)["id"].as_i64().unwrap());
    }
    let _ = path;
    let running = gw.service();
    assert_eq!(running.active_encryption_key(), "k1");
    // What `kas-gateway admin rotate-encryption-key` does, from another process's service.
    let (_, operator) = kas_gateway::server::open_service(&gw.config, gw.clock.clone())
        .await
        .unwrap();
    assert_eq!(
        operator.add_encryption_key().unwrap().as_deref(),
        Some("k2")
    );
    assert_eq!(operator.reencrypt_secrets().await.unwrap(), (3, 0));
    assert_eq!(operator.reencrypt_secrets().await.unwrap(), (0, 3));
    // The running gateway has never seen k2: it reads the key file again and opens them.
    for id in ids {
        assert!(matches!(
            running.dial_credentials(id).await.unwrap(),
            DialCredentials::Jwt { .. }
        ));
    }
    assert_eq!(running.active_encryption_key(), "k2");
}
