//! Sudo, the personal access token API (list, show, revoke, rotate, `/self`) and the user
//! list, with GitLab's exact bodies, on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, Gateway, ROOT_TOKEN, Reply};
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};

/// A request with a `Sudo` header.
async fn as_user(gw: &Gateway, method: Method, token: &str, sudo: &str, path: &str) -> Reply {
    let request = gw
        .client
        .request(method, format!("{}{path}", gw.base))
        .header("Private-Token", token)
        .header("Sudo", sudo);
    common::read(request.send().await.unwrap()).await
}

fn ids(reply: &Reply) -> Vec<i64> {
    reply
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

#[rstest]
#[tokio::test]
async fn sudo_as_gitlab_does(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let (maintainer_id, maintainer) = gw.user("maintainer").await;
    let (developer_id, _) = gw.user("developer").await;
    let project = gw.project(&maintainer, "p").await;
    gw.add_member(project, developer_id, 30).await;
    let admin_sudo = gw.token_for(1, &["api", "sudo"], None).await;
    let agents = format!("/api/v4/projects/{project}/cluster_agents");

    // A maintainer's Sudo is refused, not ignored.
    as_user(&gw, Method::GET, &maintainer, "developer", "/api/v4/user")
        .await
        .expect(
            403,
            json!({"message": "403 Forbidden - Must be admin to use sudo"}),
        );
    // An administrator's token without the sudo scope.
    as_user(&gw, Method::GET, ROOT_TOKEN, "developer", "/api/v4/user")
        .await
        .expect(
            403,
            json!({
                "error": "insufficient_scope",
                "error_description": "The request requires higher privileges than provided by the access token.",
                "scope": "sudo",
            }),
        );
    // An unknown user, by name and by id.
    as_user(&gw, Method::GET, &admin_sudo, "nobody", "/api/v4/user")
        .await
        .expect(
            404,
            json!({"message": "404 User with ID or username 'nobody' Not Found"}),
        );
    as_user(&gw, Method::GET, &admin_sudo, "99999", "/api/v4/user")
        .await
        .expect(
            404,
            json!({"message": "404 User with ID or username '99999' Not Found"}),
        );
    // By username (any case) and by id: the request runs as that user.
    let me = as_user(&gw, Method::GET, &admin_sudo, "DEVELOPER", "/api/v4/user").await;
    assert_eq!(me.expect_status(200)["id"], developer_id);
    let me = gw
        .get(&admin_sudo, &format!("/api/v4/user?sudo={maintainer_id}"))
        .await;
    assert_eq!(me.expect_status(200)["username"], "maintainer");
    // ...with that user's role: a Developer cannot register an agent, a Maintainer can.
    let request = |sudo: &str| {
        gw.client
            .post(format!("{}{agents}", gw.base))
            .header("Private-Token", &admin_sudo)
            .header("Sudo", sudo)
            .json(&json!({"name": "by-sudo"}))
    };
    common::read(request("developer").send().await.unwrap())
        .await
        .expect(403, json!({"message": "403 Forbidden"}));
    let created = common::read(request("maintainer").send().await.unwrap()).await;
    assert_eq!(
        created.expect_status(201)["created_by_user_id"],
        maintainer_id
    );
    // The query string wins over the header, as in GitLab.
    let request = gw
        .client
        .get(format!("{}/api/v4/user?sudo=developer", gw.base))
        .header("Private-Token", &admin_sudo)
        .header("Sudo", "maintainer");
    let me = common::read(request.send().await.unwrap()).await;
    assert_eq!(me.expect_status(200)["username"], "developer");
    // In a body it would come too late to decide who is calling: refused, never ignored.
    gw.post(&admin_sudo, &agents, json!({"name": "x", "sudo": "developer"}))
        .await
        .expect(
            400,
            json!({"message": "400 Bad request - sudo must be given in the Sudo header or the query string, not in the body"}),
        );
    // Without Sudo, an administrator's token acts as the administrator.
    let me = gw.get(&admin_sudo, "/api/v4/user").await;
    assert_eq!(me.expect_status(200)["username"], "root");
}

#[rstest]
#[tokio::test]
async fn personal_tokens_listed_shown_revoked_and_rotated(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let (alice_id, alice) = gw.user("alice").await;
    let (bob_id, bob) = gw.user("bob").await;
    let alice_read = gw.token_for(alice_id, &["read_api"], None).await;
    let alice_expired = gw.token_for(alice_id, &["api"], Some("2026-01-01")).await;
    let _ = alice_expired;

    // Alice sees her own three tokens, by id; someone else's user_id is 401.
    let mine = gw.get(&alice, "/api/v4/personal_access_tokens").await;
    let alice_tokens = ids(&mine);
    assert_eq!(alice_tokens.len(), 3, "{:?}", mine.body);
    assert!(alice_tokens.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(mine.header("x-total"), Some("3"));
    let first = &mine.body[0];
    // GitLab's fields, in GitLab's order (read from the text: the parsed map is sorted).
    let order = [
        "id",
        "name",
        "revoked",
        "created_at",
        "description",
        "scopes",
        "user_id",
        "last_used_at",
        "active",
        "expires_at",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|key| mine.text.find(&format!("\"{key}\":")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{}", mine.text);
    assert_eq!(first.as_object().unwrap().len(), order.len());
    assert!(first.get("token").is_none());
    gw.get(
        &alice,
        &format!("/api/v4/personal_access_tokens?user_id={bob_id}"),
    )
    .await
    .expect(401, json!({"message": "401 Unauthorized"}));
    let own = gw
        .get(
            &alice,
            &format!("/api/v4/personal_access_tokens?user_id={alice_id}"),
        )
        .await;
    assert_eq!(ids(&own), alice_tokens);
    // Filters: state, revoked, search.
    let active = gw
        .get(&alice, "/api/v4/personal_access_tokens?state=active")
        .await;
    assert_eq!(ids(&active).len(), 2, "the expired one is inactive");
    let inactive = gw
        .get(&alice, "/api/v4/personal_access_tokens?state=inactive")
        .await;
    assert_eq!(inactive.body[0]["active"], false);
    assert_eq!(inactive.body[0]["expires_at"], "2026-01-01");
    gw.get(&alice, "/api/v4/personal_access_tokens?state=gone")
        .await
        .expect(400, json!({"error": "state does not have a valid value"}));
    let searched = gw
        .get(&alice, "/api/v4/personal_access_tokens?search=TES")
        .await;
    assert_eq!(ids(&searched).len(), 3);
    let searched = gw
        .get(&alice, "/api/v4/personal_access_tokens?search=%25")
        .await;
    assert_eq!(
        ids(&searched).len(),
        0,
        "LIKE wildcards are matched literally"
    );
    // An administrator sees everyone's, and may filter by user.
    let all = gw.get(ROOT_TOKEN, "/api/v4/personal_access_tokens").await;
    assert_eq!(all.header("x-total"), Some("5"), "root 1, alice 3, bob 1");
    let bobs = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/personal_access_tokens?user_id={bob_id}"),
        )
        .await;
    assert_eq!(bobs.body.as_array().unwrap().len(), 1);
    gw.get(ROOT_TOKEN, "/api/v4/personal_access_tokens?user_id=9999")
        .await
        .expect(404, json!({"message": "404 Not Found"}));

    // Show: one's own; someone else's is 401 for users and fine for administrators; a
    // missing one is 401 for users and 404 for administrators.
    let bob_token = bobs.body[0]["id"].as_i64().unwrap();
    let shown = gw
        .get(
            &alice,
            &format!("/api/v4/personal_access_tokens/{}", alice_tokens[0]),
        )
        .await;
    assert_eq!(shown.expect_status(200)["user_id"], alice_id);
    for missing in [bob_token, 9999] {
        gw.get(&alice, &format!("/api/v4/personal_access_tokens/{missing}"))
            .await
            .expect(401, json!({"message": "401 Unauthorized"}));
    }
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/personal_access_tokens/{bob_token}"),
    )
    .await
    .expect_status(200);
    gw.get(ROOT_TOKEN, "/api/v4/personal_access_tokens/9999")
        .await
        .expect(404, json!({"message": "404 Not Found"}));
    // /self: the token the request came with, whatever its scope.
    let this = gw
        .get(&alice_read, "/api/v4/personal_access_tokens/self")
        .await;
    assert_eq!(this.expect_status(200)["scopes"], json!(["read_api"]));

    // Revoke: not someone else's; a missing one is 404; one's own works, and works again.
    gw.delete(
        &alice,
        &format!("/api/v4/personal_access_tokens/{bob_token}"),
    )
    .await
    .expect(
        400,
        json!({"message": "400 Bad request - Not permitted to revoke"}),
    );
    gw.delete(&alice, "/api/v4/personal_access_tokens/9999")
        .await
        .expect(404, json!({"message": "404 Not found"}));
    let read_id = this.body["id"].as_i64().unwrap();
    gw.delete(&alice, &format!("/api/v4/personal_access_tokens/{read_id}"))
        .await
        .expect_status(204);
    gw.get(&alice_read, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/personal_access_tokens/{read_id}"),
    )
    .await
    .expect_status(204);
    let revoked = gw
        .get(&alice, "/api/v4/personal_access_tokens?revoked=true")
        .await;
    assert_eq!(ids(&revoked), [read_id]);

    // Rotate: 200 with the new secret, same name and scopes, a week by default; the old
    // token stops working; rotating it again is refused.
    let alice_api_id = alice_tokens[0];
    let rotated = gw
        .post(
            &alice,
            &format!("/api/v4/personal_access_tokens/{alice_api_id}/rotate"),
            json!({}),
        )
        .await;
    let rotated = rotated.expect_status(200).clone();
    assert_eq!(rotated["scopes"], json!(["api"]));
    assert_eq!(rotated["expires_at"], "2026-01-08");
    assert_eq!(rotated["active"], true);
    assert_ne!(rotated["id"], alice_api_id);
    let new_secret = rotated["token"].as_str().unwrap().to_owned();
    gw.get(&alice, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
    assert_eq!(
        gw.get(&new_secret, "/api/v4/user").await.expect_status(200)["id"],
        alice_id
    );
    gw.post(
        &new_secret,
        &format!("/api/v4/personal_access_tokens/{alice_api_id}/rotate"),
        json!({}),
    )
    .await
    .expect(
        400,
        json!({"message": "400 Bad request - Token already revoked"}),
    );
    gw.post(
        &new_secret,
        &format!("/api/v4/personal_access_tokens/{bob_token}/rotate"),
        json!({}),
    )
    .await
    .expect(401, json!({"message": "401 Unauthorized"}));
    gw.post(
        &new_secret,
        &format!("/api/v4/personal_access_tokens/{}/rotate", rotated["id"]),
        json!({"expires_at": "2025-12-31"}),
    )
    .await
    .expect(
        400,
        json!({"message": "400 Bad request - Expires at cannot be in the past"}),
    );
    // An administrator rotates anyone's, with a chosen expiry.
    let bobs_new = gw
        .post(
            ROOT_TOKEN,
            &format!("/api/v4/personal_access_tokens/{bob_token}/rotate"),
            json!({"expires_at": "2026-03-01"}),
        )
        .await;
    assert_eq!(bobs_new.expect_status(200)["expires_at"], "2026-03-01");
    assert_eq!(bobs_new.body["user_id"], bob_id);
    gw.get(&bob, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));

    // /self/rotate and DELETE /self.
    let self_rotated = gw
        .post(
            &new_secret,
            "/api/v4/personal_access_tokens/self/rotate",
            json!({}),
        )
        .await;
    let newest = self_rotated.expect_status(200)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.get(&new_secret, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
    gw.delete(&newest, "/api/v4/personal_access_tokens/self")
        .await
        .expect_status(204);
    gw.get(&newest, "/api/v4/user")
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
}

#[rstest]
#[tokio::test]
async fn users_are_listed_as_gitlab_lists_them(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let gw = gateway!(backend);
    let (_, alice) = gw.user("alice").await;
    gw.user("bob").await;
    gw.user("carol").await;
    // Administrators: every field, newest first by default.
    let all = gw.get(ROOT_TOKEN, "/api/v4/users").await;
    let names: Vec<&str> = all
        .expect_status(200)
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["carol", "bob", "alice", "root"]);
    assert_eq!(all.body[0]["email"], "carol@example.com");
    assert_eq!(all.header("x-total"), Some("4"));
    let sorted = gw
        .get(
            ROOT_TOKEN,
            "/api/v4/users?order_by=username&sort=asc&per_page=2",
        )
        .await;
    let names: Vec<&str> = sorted
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(sorted.header("link").unwrap().contains("rel=\"next\""));
    let admins = gw.get(ROOT_TOKEN, "/api/v4/users?admins=true").await;
    assert_eq!(admins.body.as_array().unwrap().len(), 1);
    let found = gw.get(ROOT_TOKEN, "/api/v4/users?username=BOB").await;
    assert_eq!(found.body[0]["username"], "bob");
    let searched = gw.get(ROOT_TOKEN, "/api/v4/users?search=car").await;
    assert_eq!(searched.body.as_array().unwrap().len(), 1);
    gw.get(ROOT_TOKEN, "/api/v4/users?order_by=email")
        .await
        .expect(
            400,
            json!({"error": "order_by does not have a valid value"}),
        );
    // Others: the public fields only, and no filtering on administrators.
    let public = gw.get(&alice, "/api/v4/users").await;
    let first: &Value = &public.expect_status(200)[0];
    assert!(first.get("email").is_none(), "{first}");
    assert!(first.get("is_admin").is_none(), "{first}");
    let admins = gw.get(&alice, "/api/v4/users?admins=true").await;
    assert_eq!(admins.body.as_array().unwrap().len(), 4);
    gw.call(Method::GET, None, "/api/v4/users", None)
        .await
        .expect(401, json!({"message": "401 Unauthorized"}));
}
