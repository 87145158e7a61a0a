//! Users, personal access tokens, projects and members: GitLab's own endpoints and shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, EXTERNAL_URL, ROOT_TOKEN, START};
use rstest::rstest;
use serde_json::json;

#[rstest]
#[tokio::test]
async fn current_user_and_users(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let created_at = START.to_iso8601();
    gw.get(ROOT_TOKEN, "/api/v4/user").await.expect(
        200,
        json!({
            "id": 1, "username": "root", "name": "Administrator", "state": "active", "locked": false,
            "avatar_url": null, "web_url": format!("{EXTERNAL_URL}/root"), "created_at": created_at,
            "email": "admin@example.com", "is_admin": true, "bot": false,
        }),
    );
    let alice = gw
        .post(
            ROOT_TOKEN,
            "/api/v4/users",
            json!({"username": "alice", "name": "Alice", "email": "alice@example.com", "password": "ignored-secret"}),
        )
        .await;
    let alice_id = alice.expect_status(201)["id"].as_i64().unwrap();
    assert_eq!(alice.body["is_admin"], false);
    assert!(!alice.text.contains("ignored-secret"));

    let (_, bob_token) = gw.user("bob").await;
    // Any authenticated user sees public fields; private ones are for self and admins.
    let public = gw
        .get(&bob_token, &format!("/api/v4/users/{alice_id}"))
        .await;
    public.expect(
        200,
        json!({
            "id": alice_id, "username": "alice", "name": "Alice", "state": "active", "locked": false,
            "avatar_url": null, "web_url": format!("{EXTERNAL_URL}/alice"), "created_at": created_at,
        }),
    );
    let private = gw
        .get(ROOT_TOKEN, &format!("/api/v4/users/{alice_id}"))
        .await;
    assert_eq!(private.expect_status(200)["email"], "alice@example.com");
    gw.get(&bob_token, "/api/v4/users/999")
        .await
        .expect(404, json!({"message": "404 User Not Found"}));
    gw.get(&bob_token, "/api/v4/users/x")
        .await
        .expect(400, json!({"error": "user_id is invalid"}));

    // Only administrators create users and tokens.
    gw.post(
        &bob_token,
        "/api/v4/users",
        json!({"username": "eve", "name": "Eve", "email": "eve@example.com"}),
    )
    .await
    .expect(403, json!({"message": "403 Forbidden"}));
    gw.post(
        &bob_token,
        &format!("/api/v4/users/{alice_id}/personal_access_tokens"),
        json!({"name": "t", "scopes": ["api"]}),
    )
    .await
    .expect(403, json!({"message": "403 Forbidden"}));

    // Taken, missing and malformed.
    gw.post(
        ROOT_TOKEN,
        "/api/v4/users",
        json!({"username": "ALICE", "name": "A", "email": "other@example.com"}),
    )
    .await
    .expect(409, json!({"message": "Username has already been taken"}));
    gw.post(
        ROOT_TOKEN,
        "/api/v4/users",
        json!({"username": "alice2", "name": "A", "email": "Alice@Example.com"}),
    )
    .await
    .expect(409, json!({"message": "Email has already been taken"}));
    gw.post(ROOT_TOKEN, "/api/v4/users", json!({"name": "A"}))
        .await
        .expect(
            400,
            json!({"error": "email is missing, username is missing"}),
        );
    gw.post(ROOT_TOKEN, "/api/v4/users", json!({"username": "-x", "name": "A", "email": "nope"}))
        .await
        .expect(
            400,
            json!({"message": {
                "email": ["is invalid"],
                "username": ["can contain only letters, digits, '_', '-' and '.'. Cannot start with '-' or end in '.', '.git' or '.atom'."],
            }}),
        );
}

#[rstest]
#[tokio::test]
async fn personal_access_tokens(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (alice, _) = gw.user("alice").await;
    let path = format!("/api/v4/users/{alice}/personal_access_tokens");
    let created = gw
        .post(
            ROOT_TOKEN,
            &path,
            json!({"name": "ci", "scopes": ["api", "read_api"], "expires_at": "2026-06-30"}),
        )
        .await;
    let body = created.expect_status(201).clone();
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("glpat-"));
    assert_eq!(
        body,
        json!({
            "id": body["id"], "name": "ci", "revoked": false, "created_at": START.to_iso8601(),
            "description": null, "scopes": ["api", "read_api"], "user_id": alice, "last_used_at": null,
            "active": true, "expires_at": "2026-06-30", "token": token,
        })
    );
    assert_eq!(
        gw.get(&token, "/api/v4/user").await.expect_status(200)["username"],
        "alice"
    );

    // Form-encoded scopes[] as curl users send them.
    let form = gw
        .client
        .post(format!("{}{path}", gw.base))
        .header("Private-Token", ROOT_TOKEN)
        .body("name=form&scopes[]=read_api")
        .header("Content-Type", "application/x-www-form-urlencoded");
    let form = common::read(form.send().await.unwrap()).await;
    assert_eq!(form.expect_status(201)["scopes"], json!(["read_api"]));

    gw.post(
        ROOT_TOKEN,
        &path,
        json!({"name": "x", "scopes": ["not_a_scope"]}),
    )
    .await
    .expect(400, json!({"error": "scopes does not have a valid value"}));
    // `sudo` is a scope (of use to administrators' tokens only).
    let sudo = gw
        .post(
            ROOT_TOKEN,
            &path,
            json!({"name": "s", "scopes": ["api", "sudo"]}),
        )
        .await;
    assert_eq!(sudo.expect_status(201)["scopes"], json!(["api", "sudo"]));
    gw.post(ROOT_TOKEN, &path, json!({"name": "x"}))
        .await
        .expect(400, json!({"error": "scopes is missing"}));
    gw.post(
        ROOT_TOKEN,
        &path,
        json!({"name": "x", "scopes": ["api"], "expires_at": "June"}),
    )
    .await
    .expect(400, json!({"error": "expires_at is invalid"}));
    gw.post(
        ROOT_TOKEN,
        "/api/v4/users/999/personal_access_tokens",
        json!({"name": "x", "scopes": ["api"]}),
    )
    .await
    .expect(404, json!({"message": "404 User Not Found"}));
}

#[rstest]
#[tokio::test]
async fn projects(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (alice, alice_token) = gw.user("alice").await;
    let created = gw
        .post(
            &alice_token,
            "/api/v4/projects",
            json!({"name": "My App", "description": "demo"}),
        )
        .await;
    let project = created.expect_status(201).clone();
    let id = project["id"].as_i64().unwrap();
    assert_eq!(project["path"], "my-app");
    assert_eq!(project["path_with_namespace"], "alice/my-app");
    assert_eq!(project["name_with_namespace"], "alice / My App");
    assert_eq!(project["namespace"]["id"], alice);
    assert_eq!(project["web_url"], format!("{EXTERNAL_URL}/alice/my-app"));

    // The creator is Owner.
    let member = gw
        .get(
            &alice_token,
            &format!("/api/v4/projects/{id}/members/{alice}"),
        )
        .await;
    assert_eq!(member.expect_status(200)["access_level"], 50);

    gw.get(&alice_token, "/api/v4/projects/alice%2Fmy-app")
        .await
        .expect(200, project.clone());
    let listed = gw.get(&alice_token, "/api/v4/projects").await;
    listed.expect(200, json!([project]));
    assert_eq!(listed.header("x-total"), Some("1"));

    // Private: others do not see it; root does.
    let (_, bob_token) = gw.user("bob").await;
    gw.get(&bob_token, &format!("/api/v4/projects/{id}"))
        .await
        .expect(404, json!({"message": "404 Project Not Found"}));
    gw.get(&bob_token, "/api/v4/projects")
        .await
        .expect(200, json!([]));
    gw.get(ROOT_TOKEN, &format!("/api/v4/projects/{id}"))
        .await
        .expect_status(200);

    gw.post(&alice_token, "/api/v4/projects", json!({"name": "My App"}))
        .await
        .expect(400, json!({"message": {"name": ["has already been taken"], "path": ["has already been taken"]}}));
    gw.post(&alice_token, "/api/v4/projects", json!({}))
        .await
        .expect(
            400,
            json!({"error": "name, path are missing, at least one parameter must be provided"}),
        );
    gw.post(&alice_token, "/api/v4/projects", json!({"name": "ok", "path": "-bad"}))
        .await
        .expect(
            400,
            json!({"message": {"path": ["can contain only letters, digits, '_', '-' and '.'. Cannot start with '-', end in '.git' or end in '.atom'"]}}),
        );
    // Admins may create in another user's namespace; others may not.
    let in_bob = gw
        .post(
            ROOT_TOKEN,
            "/api/v4/projects",
            json!({"path": "tools", "namespace_id": alice}),
        )
        .await;
    assert_eq!(
        in_bob.expect_status(201)["path_with_namespace"],
        "alice/tools"
    );
    gw.post(
        &bob_token,
        "/api/v4/projects",
        json!({"path": "x", "namespace_id": alice}),
    )
    .await
    .expect(404, json!({"message": "404 Not Found"}));
}

#[rstest]
#[tokio::test]
async fn members(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (alice, alice_token) = gw.user("alice").await;
    let (bob, bob_token) = gw.user("bob").await;
    let (carol, _) = gw.user("carol").await;
    let project = gw.project(&alice_token, "app").await;
    let members = format!("/api/v4/projects/{project}/members");

    let added = gw
        .post(
            &alice_token,
            &members,
            json!({"user_id": bob, "access_level": 40}),
        )
        .await;
    added.expect(
        201,
        json!({
            "id": bob, "username": "bob", "name": "bob", "state": "active", "locked": false,
            "avatar_url": null, "web_url": format!("{EXTERNAL_URL}/bob"), "access_level": 40,
            "created_at": START.to_iso8601(), "expires_at": null, "membership_state": "active",
        }),
    );
    gw.post(
        &alice_token,
        &members,
        json!({"user_id": bob, "access_level": 30}),
    )
    .await
    .expect(409, json!({"message": "Member already exists"}));
    gw.post(
        &alice_token,
        &members,
        json!({"user_id": carol, "access_level": 35}),
    )
    .await
    .expect(
        400,
        json!({"error": "access_level does not have a valid value"}),
    );
    gw.post(
        &alice_token,
        &members,
        json!({"user_id": 999, "access_level": 30}),
    )
    .await
    .expect(404, json!({"message": "404 User Not Found"}));
    gw.post(&alice_token, &members, json!({})).await.expect(
        400,
        json!({"error": "user_id is missing, access_level is missing"}),
    );
    // A Maintainer cannot make an Owner.
    gw.post(
        &bob_token,
        &members,
        json!({"user_id": carol, "access_level": 50}),
    )
    .await
    .expect(403, json!({"message": "403 Forbidden"}));
    gw.post(
        &bob_token,
        &members,
        json!({"user_id": carol, "access_level": 10}),
    )
    .await
    .expect_status(201);

    let list = gw.get(&bob_token, &members).await;
    let ids: Vec<i64> = list
        .expect_status(200)
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [alice, bob, carol]);
    assert_eq!(list.header("x-total"), Some("3"));

    // A Maintainer cannot remove the Owner; the last Owner cannot leave.
    gw.delete(&bob_token, &format!("{members}/{alice}"))
        .await
        .expect(403, json!({"message": "403 Forbidden"}));
    gw.delete(&alice_token, &format!("{members}/{alice}"))
        .await
        .expect(403, json!({"message": "403 Forbidden"}));
    gw.delete(&bob_token, &format!("{members}/{carol}"))
        .await
        .expect_status(204);
    gw.get(&bob_token, &format!("{members}/{carol}"))
        .await
        .expect(404, json!({"message": "404 Member Not Found"}));
    gw.delete(&bob_token, &format!("{members}/{carol}"))
        .await
        .expect(404, json!({"message": "404 Member Not Found"}));
    // Members may leave.
    gw.delete(&bob_token, &format!("{members}/{bob}"))
        .await
        .expect_status(204);
    gw.get(&bob_token, &members)
        .await
        .expect(404, json!({"message": "404 Project Not Found"}));
}
