//! The eight agent and agent-token endpoints, over loopback, on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, EXTERNAL_URL, ROOT_TOKEN, START};
use rstest::rstest;
use serde_json::{Value, json};

fn config_project(id: i64, name: &str, created_at: &str) -> Value {
    json!({
        "id": id,
        "description": "",
        "name": name,
        "name_with_namespace": format!("Administrator / {name}"),
        "path": name,
        "path_with_namespace": format!("root/{name}"),
        "created_at": created_at,
    })
}

#[rstest]
#[tokio::test]
async fn register_get_list_delete(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let created_at = START.to_iso8601();

    let agent = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents"),
            json!({"name": "agent-1"}),
        )
        .await;
    let expected = json!({
        "id": agent.body["id"],
        "name": "agent-1",
        "config_project": config_project(project, "test", &created_at),
        "created_at": created_at,
        "created_by_user_id": 1,
        "is_receptive": false,
    });
    agent.expect(201, expected.clone());
    assert_eq!(agent.header("content-type"), Some("application/json"));
    let id = agent.body["id"].as_i64().unwrap();

    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{id}"),
    )
    .await
    .expect(200, expected.clone());
    // By URL-encoded path, too.
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/root%2Ftest/cluster_agents/{id}"),
    )
    .await
    .expect(200, expected.clone());
    gw.get(ROOT_TOKEN, "/api/v4/projects/root%2Ftest/cluster_agents")
        .await
        .expect(200, json!([expected]));

    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{id}"),
    )
    .await
    .expect_status(204);
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{id}"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{id}"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
    gw.get(ROOT_TOKEN, "/api/v4/projects/root%2Ftest/cluster_agents")
        .await
        .expect(200, json!([]));
}

#[rstest]
#[tokio::test]
async fn agent_name_validation(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let path = format!("/api/v4/projects/{project}/cluster_agents");
    let format_message = "Name can contain only lowercase letters, digits, and '-', but cannot start or end with '-'";
    let bad_request = |messages: &[&str]| {
        let list = messages
            .iter()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect::<Vec<_>>()
            .join(", ");
        json!({"message": format!("400 Bad request - [{list}]")})
    };

    gw.post(ROOT_TOKEN, &path, json!({}))
        .await
        .expect(400, json!({"error": "name is missing"}));
    gw.post(ROOT_TOKEN, &path, json!({"name": ["a"]}))
        .await
        .expect(400, json!({"error": "name is invalid"}));
    gw.post(ROOT_TOKEN, &path, json!({"name": ""}))
        .await
        .expect(400, bad_request(&["Name can't be blank", format_message]));
    gw.post(ROOT_TOKEN, &path, json!({"name": "-bad"}))
        .await
        .expect(400, bad_request(&[format_message]));
    gw.post(ROOT_TOKEN, &path, json!({"name": "Bad"}))
        .await
        .expect(400, bad_request(&[format_message]));
    gw.post(ROOT_TOKEN, &path, json!({"name": "a".repeat(64)}))
        .await
        .expect(
            400,
            bad_request(&["Name is too long (maximum is 63 characters)"]),
        );
    gw.post(ROOT_TOKEN, &path, json!({"name": "a".repeat(63)}))
        .await
        .expect_status(201);
    gw.post(ROOT_TOKEN, &path, json!({"name": "agent"}))
        .await
        .expect_status(201);
    gw.post(ROOT_TOKEN, &path, json!({"name": "agent"}))
        .await
        .expect(400, bad_request(&["Name has already been taken"]));
    // The same name in another project is fine.
    let other = gw.project(ROOT_TOKEN, "other").await;
    gw.post(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{other}/cluster_agents"),
        json!({"name": "agent"}),
    )
    .await
    .expect_status(201);
}

#[rstest]
#[tokio::test]
async fn unknown_projects_and_ids(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let not_project = json!({"message": "404 Project Not Found"});
    for id in [
        "999",
        "root%2Fnope",
        "test",
        "nobody%2Ftest",
        "root%2Ftest%2Fx",
    ] {
        gw.get(ROOT_TOKEN, &format!("/api/v4/projects/{id}/cluster_agents"))
            .await
            .expect(404, not_project.clone());
    }
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/abc"),
    )
    .await
    .expect(400, json!({"error": "agent_id is invalid"}));
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/1/tokens/x"),
    )
    .await
    .expect(400, json!({"error": "token_id is invalid"}));
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/77/tokens"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
    // An agent of another project is not found through this one.
    let other = gw.project(ROOT_TOKEN, "other").await;
    let agent = gw.agent(other, "agent").await;
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
}

#[rstest]
#[tokio::test]
async fn paths_with_dots_and_encoding(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let created = gw
        .post(
            ROOT_TOKEN,
            "/api/v4/projects",
            json!({"name": "My Project", "path": "my.project"}),
        )
        .await;
    let id = created.expect_status(201)["id"].as_i64().unwrap();
    let agent = gw.agent(id, "a").await;
    for encoded in [
        "root%2Fmy.project",
        "root%2Fmy%2Eproject",
        "ROOT%2FMy.Project",
    ] {
        let reply = gw
            .get(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{encoded}/cluster_agents/{agent}"),
            )
            .await;
        assert_eq!(
            reply.expect_status(200)["config_project"]["path_with_namespace"],
            "root/my.project"
        );
        assert_eq!(
            reply.body["config_project"]["name_with_namespace"],
            "Administrator / My Project"
        );
    }
}

#[rstest]
#[tokio::test]
async fn pagination_headers_and_links(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    // Registered out of order; listed by name (bytewise, '-' before digits and letters).
    for name in ["b", "a-1", "c", "a", "a1"] {
        gw.agent(project, name).await;
    }
    let names = |reply: &common::Reply| {
        reply
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let all = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents"),
        )
        .await;
    all.expect_status(200);
    assert_eq!(names(&all), ["a", "a-1", "a1", "b", "c"]);
    assert_eq!(all.header("x-total"), Some("5"));
    assert_eq!(all.header("x-total-pages"), Some("1"));
    assert_eq!(all.header("x-per-page"), Some("20"));
    assert_eq!(all.header("x-page"), Some("1"));
    assert_eq!(all.header("x-next-page"), Some(""));
    assert_eq!(all.header("x-prev-page"), Some(""));

    let page2 = gw
        .get(ROOT_TOKEN, "/api/v4/projects/root%2Ftest/cluster_agents?per_page=2&page=2&pagination=keyset&foo=x,y")
        .await;
    page2.expect_status(200);
    assert_eq!(names(&page2), ["a1", "b"]);
    assert_eq!(page2.header("x-total"), Some("5"));
    assert_eq!(page2.header("x-total-pages"), Some("3"));
    assert_eq!(page2.header("x-next-page"), Some("3"));
    assert_eq!(page2.header("x-prev-page"), Some("1"));
    // Unknown query parameters are ignored, and left out of Link.
    let base = format!("{EXTERNAL_URL}/api/v4/projects/root%2Ftest/cluster_agents?");
    assert_eq!(
        page2.header("link").unwrap(),
        format!(
            "<{base}page=1&per_page=2>; rel=\"prev\", <{base}page=3&per_page=2>; rel=\"next\", \
             <{base}page=1&per_page=2>; rel=\"first\", <{base}page=3&per_page=2>; rel=\"last\""
        )
    );

    let last = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents?per_page=2&page=3"),
        )
        .await;
    assert_eq!(names(&last), ["c"]);
    assert_eq!(last.header("x-next-page"), Some(""));
    assert!(!last.header("link").unwrap().contains("rel=\"next\""));

    let beyond = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents?per_page=2&page=9"),
        )
        .await;
    beyond.expect(200, json!([]));
    assert_eq!(beyond.header("x-next-page"), Some(""));

    let capped = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents?per_page=1000"),
        )
        .await;
    assert_eq!(capped.header("x-per-page"), Some("100"));
    for bad in ["0", "-1"] {
        gw.get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents?per_page={bad}"),
        )
        .await
        .expect(
            400,
            json!({"error": "per_page does not have a valid value"}),
        );
    }
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents?page=x"),
    )
    .await
    .expect(400, json!({"error": "page is invalid"}));
    // The token in the query string never appears in a Link.
    let with_token = gw
        .client
        .get(format!(
            "{}/api/v4/projects/{project}/cluster_agents?private_token={ROOT_TOKEN}",
            gw.base
        ))
        .send()
        .await
        .unwrap();
    let with_token = common::read(with_token).await;
    with_token.expect_status(200);
    assert!(!with_token.header("link").unwrap().contains(ROOT_TOKEN));
}

#[rstest]
#[tokio::test]
async fn token_lifecycle(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let tokens = format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens");
    let created_at = START.to_iso8601();

    let created = gw
        .post(
            ROOT_TOKEN,
            &tokens,
            json!({"name": "abcd", "description": "Some token"}),
        )
        .await;
    let body = created.expect_status(201).clone();
    let secret = body["token"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("glagent-") && secret.len() == 58,
        "{secret}"
    );
    let id = body["id"].as_i64().unwrap();
    assert_eq!(
        body,
        json!({
            "id": id, "name": "abcd", "description": "Some token", "agent_id": agent,
            "status": "active", "created_at": created_at, "created_by_user_id": 1,
            "last_used_at": null, "token": secret,
        })
    );
    // Key order as the document shows it.
    assert_eq!(
        common::keys_in_order(&created.text),
        [
            "id",
            "name",
            "description",
            "agent_id",
            "status",
            "created_at",
            "created_by_user_id",
            "last_used_at",
            "token"
        ]
    );

    let single = json!({
        "id": id, "name": "abcd", "description": "Some token", "agent_id": agent,
        "status": "active", "created_at": created_at, "created_by_user_id": 1, "last_used_at": null,
    });
    gw.get(ROOT_TOKEN, &format!("{tokens}/{id}"))
        .await
        .expect(200, single);
    let second = gw
        .post(ROOT_TOKEN, &tokens, json!({"name": "foobar"}))
        .await;
    let second_id = second.expect_status(201)["id"].as_i64().unwrap();
    assert_ne!(second.body["token"], json!(secret), "every token is new");

    let list = gw.get(ROOT_TOKEN, &tokens).await;
    list.expect(
        200,
        json!([
            {"id": id, "name": "abcd", "description": "Some token", "agent_id": agent, "status": "active", "created_at": created_at, "created_by_user_id": 1},
            {"id": second_id, "name": "foobar", "description": null, "agent_id": agent, "status": "active", "created_at": created_at, "created_by_user_id": 1},
        ]),
    );
    assert_eq!(list.header("x-total"), Some("2"));

    // The third active token is refused.
    gw.post(ROOT_TOKEN, &tokens, json!({"name": "third"}))
        .await
        .expect(400, json!({"message": "400 Bad request - An agent can have only two active tokens at a time"}));

    // Revoke: 204, twice; gone from list and get; a new one may then be created.
    gw.delete(ROOT_TOKEN, &format!("{tokens}/{id}"))
        .await
        .expect_status(204);
    gw.delete(ROOT_TOKEN, &format!("{tokens}/{id}"))
        .await
        .expect_status(204);
    gw.get(ROOT_TOKEN, &format!("{tokens}/{id}"))
        .await
        .expect(404, json!({"message": "404 Not found"}));
    let list = gw.get(ROOT_TOKEN, &tokens).await;
    assert_eq!(list.expect_status(200).as_array().unwrap().len(), 1);
    assert_eq!(list.header("x-total"), Some("1"));
    gw.post(ROOT_TOKEN, &tokens, json!({"name": "third"}))
        .await
        .expect_status(201);
    gw.delete(ROOT_TOKEN, &format!("{tokens}/9999"))
        .await
        .expect(404, json!({"message": "404 Not found"}));
}

#[rstest]
#[tokio::test]
async fn token_validation(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let tokens = format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens");
    gw.post(ROOT_TOKEN, &tokens, json!({"description": "x"}))
        .await
        .expect(400, json!({"error": "name is missing"}));
    gw.post(
        ROOT_TOKEN,
        &tokens,
        json!({"name": {"a": 1}, "description": [1]}),
    )
    .await
    .expect(
        400,
        json!({"error": "name is invalid, description is invalid"}),
    );
    gw.post(ROOT_TOKEN, &tokens, json!({"name": "n".repeat(256), "description": "d".repeat(1025)}))
        .await
        .expect(
            400,
            json!({"message": "400 Bad request - [\"Name is too long (maximum is 255 characters)\", \"Description is too long (maximum is 1024 characters)\"]"}),
        );
    gw.post(ROOT_TOKEN, &tokens, json!({"name": " "}))
        .await
        .expect(
            400,
            json!({"message": "400 Bad request - [\"Name can't be blank\"]"}),
        );
    gw.post(
        ROOT_TOKEN,
        &tokens,
        json!({"name": "n".repeat(255), "description": "d".repeat(1024)}),
    )
    .await
    .expect_status(201);
    // Nothing half-written: exactly the one valid token exists.
    let list = gw.get(ROOT_TOKEN, &tokens).await;
    assert_eq!(list.expect_status(200).as_array().unwrap().len(), 1);
}

#[rstest]
#[tokio::test]
async fn deleting_an_agent_removes_its_tokens(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let (token, _) = gw.agent_token(project, agent, "t").await;
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}"),
    )
    .await
    .expect_status(204);
    // A new agent with the same name does not inherit anything.
    let again = gw.agent(project, "agent").await;
    assert_ne!(again, agent);
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{again}/tokens"),
    )
    .await
    .expect(200, json!([]));
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens/{token}"),
    )
    .await
    .expect(404, json!({"message": "404 Not found"}));
    let remaining: i64 = match &gw.pg {
        Some(pg) => {
            let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
            sqlx::query_scalar("SELECT COUNT(*) FROM cluster_agent_tokens")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
        None => {
            let url = format!(
                "sqlite://{}",
                gw.data_dir.path().join("kas-gateway.db").display()
            );
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            sqlx::query_scalar("SELECT COUNT(*) FROM cluster_agent_tokens")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(remaining, 0, "the tokens rows are deleted with the agent");
}

#[rstest]
#[tokio::test]
async fn if_unmodified_since(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    gw.clock.advance_millis(10_500);
    let agent = gw.agent(project, "agent").await; // updated at START + 10.5 s
    let path = format!(
        "{}/api/v4/projects/{project}/cluster_agents/{agent}",
        gw.base
    );
    let send = |date: &'static str| {
        let request = gw
            .client
            .delete(&path)
            .header("Private-Token", ROOT_TOKEN)
            .header("If-Unmodified-Since", date);
        async move { common::read(request.send().await.unwrap()).await }
    };
    // START is Thu, 01 Jan 2026 00:00:00 GMT.
    send("Thu, 01 Jan 2026 00:00:09 GMT")
        .await
        .expect(412, json!({"message": "412 Precondition Failed"}));
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}"),
    )
    .await
    .expect_status(200);
    send("Thu, 01 Jan 2026 00:00:10 GMT")
        .await
        .expect_status(204);
    // A date that does not parse is ignored, as GitLab ignores it.
    let agent = gw.agent(project, "agent2").await;
    let request = gw
        .client
        .delete(format!(
            "{}/api/v4/projects/{project}/cluster_agents/{agent}",
            gw.base
        ))
        .header("Private-Token", ROOT_TOKEN)
        .header("If-Unmodified-Since", "not a date");
    common::read(request.send().await.unwrap())
        .await
        .expect_status(204);
}

/// 50 concurrent creates leave exactly two active tokens.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_token_creation_respects_the_limit(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let url = format!(
        "{}/api/v4/projects/{project}/cluster_agents/{agent}/tokens",
        gw.base
    );
    let requests = (0..50).map(|i| {
        let request = gw
            .client
            .post(&url)
            .header("Private-Token", ROOT_TOKEN)
            .json(&json!({"name": format!("t{i}")}));
        async move { common::read(request.send().await.unwrap()).await }
    });
    let replies = futures::future::join_all(requests).await;
    let created = replies.iter().filter(|r| r.status.as_u16() == 201).count();
    let refused: Vec<_> = replies
        .iter()
        .filter(|r| r.status.as_u16() != 201)
        .collect();
    assert_eq!(created, 2, "exactly two creates succeed");
    for reply in refused {
        reply.expect(400, json!({"message": "400 Bad request - An agent can have only two active tokens at a time"}));
    }
    let list = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens"),
        )
        .await;
    assert_eq!(list.expect_status(200).as_array().unwrap().len(), 2);
}

/// Tokens are stored only as digests: the secret appears nowhere in the database.
#[rstest]
#[tokio::test]
async fn tokens_are_stored_as_digests(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let mut gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let agent = gw.agent(project, "agent").await;
    let (_, agent_secret) = gw.agent_token(project, agent, "t").await;
    let (_, user_secret) = gw.user("alice").await;
    let secrets = [
        agent_secret.as_str(),
        user_secret.as_str(),
        common::ROOT_TOKEN,
    ];
    match &gw.pg {
        Some(pg) => {
            let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
            for table in ["cluster_agent_tokens", "personal_access_tokens", "users"] {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT t::text FROM {table} t"
                )))
                .fetch_all(&pool)
                .await
                .unwrap();
                assert!(!rows.is_empty());
                for row in rows {
                    for secret in secrets {
                        assert!(
                            !row.contains(secret),
                            "{table} holds a secret in plain text"
                        );
                    }
                }
            }
        }
        None => {
            gw.stop().await; // checkpoint and close, so the file holds everything
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(gw.data_dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.to_string_lossy().contains("kas-gateway.db") {
                    bytes.extend(std::fs::read(path).unwrap());
                }
            }
            assert!(
                bytes.windows(4).any(|w| w == b"root"),
                "the database was read"
            );
            for secret in secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "the database file holds a secret in plain text"
                );
            }
        }
    }
}
