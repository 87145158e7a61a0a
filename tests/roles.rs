//! Who may do what: the role matrix of BEHAVIOR.md §1–2 for the eight agent endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, Gateway, ROOT_TOKEN};
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Guest,
    Planner,
    Reporter,
    Developer,
    Maintainer,
    Owner,
    Admin,
    NonMember,
    BadToken,
    ExpiredToken,
    /// A Maintainer whose token has only `read_api`.
    ReadApiMaintainer,
}

const EVERYONE: [Who; 11] = [
    Who::Guest,
    Who::Planner,
    Who::Reporter,
    Who::Developer,
    Who::Maintainer,
    Who::Owner,
    Who::Admin,
    Who::NonMember,
    Who::BadToken,
    Who::ExpiredToken,
    Who::ReadApiMaintainer,
];

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    ListAgents,
    GetAgent,
    RegisterAgent,
    DeleteAgent,
    ListTokens,
    GetToken,
    CreateToken,
    RevokeToken,
}

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::ListAgents,
    Endpoint::GetAgent,
    Endpoint::RegisterAgent,
    Endpoint::DeleteAgent,
    Endpoint::ListTokens,
    Endpoint::GetToken,
    Endpoint::CreateToken,
    Endpoint::RevokeToken,
];

fn level(who: Who) -> Option<i64> {
    match who {
        Who::Guest => Some(10),
        Who::Planner => Some(15),
        Who::Reporter => Some(20),
        Who::Developer => Some(30),
        Who::Maintainer | Who::ReadApiMaintainer | Who::ExpiredToken => Some(40),
        Who::Owner => Some(50),
        Who::Admin | Who::NonMember | Who::BadToken => None,
    }
}

/// The status and body BEHAVIOR.md prescribes.
fn expected(endpoint: Endpoint, who: Who) -> (u16, Option<Value>) {
    let writes = matches!(
        endpoint,
        Endpoint::RegisterAgent
            | Endpoint::DeleteAgent
            | Endpoint::CreateToken
            | Endpoint::RevokeToken
    );
    match who {
        Who::BadToken | Who::ExpiredToken => {
            return (401, Some(json!({"message": "401 Unauthorized"})));
        }
        Who::ReadApiMaintainer if writes => {
            return (
                403,
                Some(json!({
                    "error": "insufficient_scope",
                    "error_description": "The request requires higher privileges than provided by the access token.",
                    "scope": "api",
                })),
            );
        }
        Who::NonMember => return (404, Some(json!({"message": "404 Project Not Found"}))),
        _ => {}
    }
    let success = match endpoint {
        Endpoint::ListAgents | Endpoint::GetAgent | Endpoint::ListTokens | Endpoint::GetToken => {
            200
        }
        Endpoint::RegisterAgent | Endpoint::CreateToken => 201,
        Endpoint::DeleteAgent | Endpoint::RevokeToken => 204,
    };
    let need = if writes { 40 } else { 30 };
    let allowed = who == Who::Admin || level(who).is_some_and(|l| l >= need);
    if allowed {
        return (success, None);
    }
    let below = match endpoint {
        Endpoint::ListAgents => json!({"message": "404 ClusterAgents Not Found"}),
        Endpoint::GetAgent | Endpoint::ListTokens | Endpoint::GetToken => {
            json!({"message": "404 Not found"})
        }
        _ => json!({"message": "403 Forbidden"}),
    };
    let status = if writes { 403 } else { 404 };
    (status, Some(below))
}

async fn token_of(gw: &Gateway, project: i64, who: Who, n: usize) -> String {
    let username = format!("user-{n}");
    match who {
        Who::BadToken => "glpat-this-token-does-not-exist".to_owned(),
        Who::Admin => {
            let created = gw
                .post(
                    ROOT_TOKEN,
                    "/api/v4/users",
                    json!({"username": username, "name": "Admin", "email": format!("{username}@example.com"), "admin": true}),
                )
                .await;
            let id = created.expect_status(201)["id"].as_i64().unwrap();
            gw.token_for(id, &["api"], None).await
        }
        Who::ReadApiMaintainer => {
            let (id, _) = gw.user(&username).await;
            gw.add_member(project, id, 40).await;
            gw.token_for(id, &["read_api"], None).await
        }
        Who::ExpiredToken => {
            let (id, _) = gw.user(&username).await;
            gw.add_member(project, id, 40).await;
            // The test clock stands at 2026-01-01: this token expired at midnight.
            gw.token_for(id, &["api"], Some("2026-01-01")).await
        }
        _ => {
            let (id, token) = gw.user(&username).await;
            if let Some(level) = level(who) {
                gw.add_member(project, id, level).await;
            }
            token
        }
    }
}

#[rstest]
#[tokio::test]
async fn role_matrix(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let mut counter = 0;
    for (n, who) in EVERYONE.into_iter().enumerate() {
        let token = token_of(&gw, project, who, n).await;
        for endpoint in ENDPOINTS {
            // Fresh targets for every call, so that a success never changes another case.
            counter += 1;
            let agent = gw.agent(project, &format!("agent-{counter}")).await;
            let (token_id, _) = gw.agent_token(project, agent, "t").await;
            let base = format!("/api/v4/projects/{project}/cluster_agents");
            let (method, path, body) = match endpoint {
                Endpoint::ListAgents => (Method::GET, base.clone(), None),
                Endpoint::GetAgent => (Method::GET, format!("{base}/{agent}"), None),
                Endpoint::RegisterAgent => (
                    Method::POST,
                    base.clone(),
                    Some(json!({"name": format!("new-{counter}")})),
                ),
                Endpoint::DeleteAgent => (Method::DELETE, format!("{base}/{agent}"), None),
                Endpoint::ListTokens => (Method::GET, format!("{base}/{agent}/tokens"), None),
                Endpoint::GetToken => (
                    Method::GET,
                    format!("{base}/{agent}/tokens/{token_id}"),
                    None,
                ),
                Endpoint::CreateToken => (
                    Method::POST,
                    format!("{base}/{agent}/tokens"),
                    Some(json!({"name": "x"})),
                ),
                Endpoint::RevokeToken => (
                    Method::DELETE,
                    format!("{base}/{agent}/tokens/{token_id}"),
                    None,
                ),
            };
            let reply = gw.call(method, Some(&token), &path, body).await;
            let (status, body) = expected(endpoint, who);
            assert_eq!(
                reply.status.as_u16(),
                status,
                "{who:?} {endpoint:?}: {}",
                reply.text
            );
            if let Some(body) = body {
                assert_eq!(reply.body, body, "{who:?} {endpoint:?}");
            }
        }
    }
}

/// Every way of presenting a token works; anything else is 401.
#[rstest]
#[tokio::test]
async fn token_transports(#[values(Backend::Sqlite)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let url = format!("{}/api/v4/projects/{project}/cluster_agents", gw.base);
    let ok = [
        gw.client.get(&url).header("Private-Token", ROOT_TOKEN),
        gw.client
            .get(&url)
            .header("Authorization", format!("Bearer {ROOT_TOKEN}")),
        gw.client.get(format!("{url}?private_token={ROOT_TOKEN}")),
    ];
    for request in ok {
        common::read(request.send().await.unwrap())
            .await
            .expect_status(200);
    }
    let unauthorized = [
        gw.client.get(&url),
        gw.client.get(&url).header("Private-Token", ""),
        gw.client
            .get(&url)
            .header("Authorization", format!("Basic {ROOT_TOKEN}")),
        gw.client
            .get(&url)
            .header("Private-Token", format!("{ROOT_TOKEN}x")),
    ];
    for request in unauthorized {
        common::read(request.send().await.unwrap())
            .await
            .expect(401, json!({"message": "401 Unauthorized"}));
    }
}

/// A token stops working at midnight UTC of its expiry date.
#[rstest]
#[tokio::test]
async fn tokens_expire_at_midnight(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (id, _) = gw.user("alice").await;
    let token = gw.token_for(id, &["api"], Some("2026-01-02")).await;
    gw.get(&token, "/api/v4/user").await.expect_status(200);
    gw.clock.advance_millis(24 * 3600 * 1000 - 1);
    gw.get(&token, "/api/v4/user").await.expect_status(200);
    gw.clock.advance_millis(1);
    gw.get(&token, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
}
