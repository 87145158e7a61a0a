//! The store contract: the same cases against SQLite and PostgreSQL, through the trait.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Backend, PgDatabase, START};
use kas_gateway::crypto::TokenDigest;
use kas_gateway::domain::{AccessLevel, PageRequest, Scope, Timestamp};
use kas_gateway::store::{
    self, AgentDeleted, MemberRemoved, NewAgentToken, NewPersonalToken, NewProject, NewUser,
    SharedStore, TokenCreated,
};
use rstest::rstest;

struct Subject {
    store: SharedStore,
    _dir: tempfile::TempDir,
    pg: Option<PgDatabase>,
}

async fn subject(backend: Backend) -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let (url, pg) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", dir.path().join("t.db").display()),
            None,
        ),
        Backend::Postgres if common::postgres_skipped() => return None,
        Backend::Postgres => {
            let pg = PgDatabase::create().await;
            (pg.url.clone(), Some(pg))
        }
    };
    let store = store::connect(&url, 8).await.unwrap();
    store.migrate().await.unwrap();
    // Migrations run twice are a no-op.
    store.migrate().await.unwrap();
    Some(Subject {
        store,
        _dir: dir,
        pg,
    })
}

macro_rules! subject {
    ($backend:expr) => {
        match subject($backend).await {
            Some(subject) => subject,
            None => return,
        }
    };
}

fn user(name: &str) -> NewUser {
    NewUser {
        username: name.into(),
        name: name.into(),
        email: format!("{name}@example.com"),
        is_admin: false,
        created_at: START,
    }
}

fn pat(secret: &str) -> NewPersonalToken {
    NewPersonalToken {
        name: "t".into(),
        digest: TokenDigest::of(secret),
        scopes: vec![Scope::Api, Scope::ReadApi],
        expires_at: None,
        created_at: START,
    }
}

fn agent_token(secret: &str) -> NewAgentToken {
    NewAgentToken {
        name: "t".into(),
        description: None,
        digest: TokenDigest::of(secret),
        created_by_user_id: 1,
        created_at: START,
    }
}

async fn project_with_agent(store: &SharedStore) -> (i64, i64) {
    let owner = store.create_user(user("owner")).await.unwrap();
    let project = store
        .create_project(NewProject {
            creator_id: owner.id,
            name: "P".into(),
            path: "p".into(),
            description: String::new(),
            created_at: START,
        })
        .await
        .unwrap()
        .unwrap();
    let agent = store
        .register_agent(project.id, "a", owner.id, START)
        .await
        .unwrap();
    (project.id, agent.id)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_happens_once(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let s = subject!(backend);
    let attempts = (0..8).map(|i| {
        let store = Arc::clone(&s.store);
        tokio::spawn(async move {
            let mut admin = user("root");
            admin.is_admin = true;
            store
                .bootstrap_admin(admin, pat(&format!("secret-{i}")))
                .await
                .unwrap()
        })
    });
    let created: Vec<bool> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    let root = s.store.user_by_username("ROOT").await.unwrap().unwrap();
    assert!(root.is_admin);
}

#[rstest]
#[tokio::test]
async fn users_and_personal_tokens(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let s = subject!(backend);
    let alice = s.store.create_user(user("alice")).await.unwrap();
    assert!(matches!(
        s.store.create_user(user("Alice")).await,
        Err(store::Error::Conflict(_))
    ));
    assert_eq!(
        s.store.user_taken("ALICE", "x@y").await.unwrap(),
        (true, false)
    );
    assert_eq!(
        s.store.user_taken("x", "ALICE@example.com").await.unwrap(),
        (false, true)
    );
    let token = s
        .store
        .create_personal_token(alice.id, pat("secret"))
        .await
        .unwrap();
    let (found, owner) = s
        .store
        .personal_token(&TokenDigest::of("secret"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, token);
    assert_eq!(owner, alice);
    assert!(
        s.store
            .personal_token(&TokenDigest::of("other"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        s.store.create_personal_token(alice.id, pat("secret")).await,
        Err(store::Error::Conflict(_))
    ));
    let later = Timestamp::from_millis(START.as_millis() + 5_000);
    s.store.touch_personal_token(token.id, later).await.unwrap();
    let (found, _) = s
        .store
        .personal_token(&TokenDigest::of("secret"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.last_used_at, Some(later));
}

#[rstest]
#[tokio::test]
async fn projects_and_members(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let s = subject!(backend);
    let alice = s.store.create_user(user("alice")).await.unwrap();
    let bob = s.store.create_user(user("bob")).await.unwrap();
    let new = |name: &str, path: &str| NewProject {
        creator_id: alice.id,
        name: name.into(),
        path: path.into(),
        description: String::new(),
        created_at: START,
    };
    let project = s
        .store
        .create_project(new("App", "app"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(project.path_with_namespace(), "alice/app");
    let taken = s
        .store
        .create_project(new("App", "APP"))
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(taken.name && taken.path);
    let taken = s
        .store
        .create_project(new("Other", "App"))
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(!taken.name && taken.path);
    assert_eq!(
        s.store.project_by_path("ALICE", "App").await.unwrap(),
        Some(project.clone())
    );
    assert_eq!(
        s.store.access_level(project.id, alice.id).await.unwrap(),
        Some(AccessLevel::Owner)
    );

    s.store
        .add_member(project.id, bob.id, AccessLevel::Owner, START)
        .await
        .unwrap();
    assert!(matches!(
        s.store
            .add_member(project.id, bob.id, AccessLevel::Guest, START)
            .await,
        Err(store::Error::Conflict(_))
    ));
    let page = s
        .store
        .list_members(
            project.id,
            PageRequest {
                page: 1,
                per_page: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!((page.total, page.items.len()), (2, 1));
    assert_eq!(
        s.store
            .list_projects(Some(bob.id), PageRequest::default())
            .await
            .unwrap()
            .total,
        1
    );
    assert_eq!(
        s.store.remove_member(project.id, bob.id).await.unwrap(),
        MemberRemoved::Removed
    );
    assert_eq!(
        s.store.remove_member(project.id, bob.id).await.unwrap(),
        MemberRemoved::NotMember
    );
    assert_eq!(
        s.store.remove_member(project.id, alice.id).await.unwrap(),
        MemberRemoved::LastOwner
    );
}

#[rstest]
#[tokio::test]
async fn agents(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let s = subject!(backend);
    let (project, agent) = project_with_agent(&s.store).await;
    assert!(matches!(
        s.store.register_agent(project, "a", 1, START).await,
        Err(store::Error::Conflict(_))
    ));
    let fetched = s.store.agent(project, agent).await.unwrap().unwrap();
    assert_eq!((fetched.name.as_str(), fetched.is_receptive), ("a", false));
    assert!(s.store.agent(project + 1, agent).await.unwrap().is_none());
    // Unmodified since a second before its creation: refused; since its creation: deleted.
    let earlier = Timestamp::from_millis(START.as_millis() - 1000);
    assert_eq!(
        s.store
            .delete_agent(project, agent, Some(earlier))
            .await
            .unwrap(),
        AgentDeleted::Modified
    );
    assert_eq!(
        s.store
            .delete_agent(project, agent, Some(START))
            .await
            .unwrap(),
        AgentDeleted::Deleted
    );
    assert!(matches!(
        s.store.delete_agent(project, agent, None).await,
        Err(store::Error::NotFound)
    ));
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limit_under_concurrency(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let creates = (0..30).map(|i| {
        let store = Arc::clone(&s.store);
        tokio::spawn(async move {
            store
                .create_agent_token(agent, agent_token(&format!("s{i}")), 2)
                .await
        })
    });
    let outcomes: Vec<_> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, TokenCreated::Created(_)))
        .count();
    assert_eq!(created, 2);
    assert_eq!(
        s.store
            .list_agent_tokens(agent, PageRequest::default())
            .await
            .unwrap()
            .total,
        2
    );
    assert!(matches!(
        s.store
            .create_agent_token(agent + 100, agent_token("x"), 2)
            .await,
        Err(store::Error::NotFound)
    ));
}

#[rstest]
#[tokio::test]
async fn tokens_order_and_revocation(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        match s
            .store
            .create_agent_token(agent, agent_token(&format!("s{i}")), 10)
            .await
            .unwrap()
        {
            TokenCreated::Created(token) => ids.push(token.id),
            TokenCreated::LimitReached => panic!("limit"),
        }
    }
    // last_used_at: ids[1] most recent, ids[3] older, the others never used.
    let used = [(ids[1], 2_000), (ids[3], 1_000)];
    for (id, at) in used {
        let sql = "UPDATE cluster_agent_tokens SET last_used_at = $1 WHERE id = $2";
        match &s.pg {
            Some(pg) => {
                let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
                sqlx::query(sql)
                    .bind(at)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            None => {
                let url = format!("sqlite://{}", s._dir.path().join("t.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                sqlx::query(sql)
                    .bind(at)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }
    let listed: Vec<i64> = s
        .store
        .list_agent_tokens(agent, PageRequest::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, [ids[1], ids[3], ids[0], ids[2]]);

    assert!(s.store.revoke_agent_token(agent, ids[1]).await.unwrap());
    assert!(
        s.store.revoke_agent_token(agent, ids[1]).await.unwrap(),
        "revoking twice"
    );
    assert!(!s.store.revoke_agent_token(agent, 9999).await.unwrap());
    assert!(s.store.agent_token(agent, ids[1]).await.unwrap().is_none());
    assert_eq!(
        s.store
            .list_agent_tokens(agent, PageRequest::default())
            .await
            .unwrap()
            .total,
        3
    );
}

/// `count` agent tokens of `agent`, named `{prefix}0`, `{prefix}1`, …; their ids.
async fn agent_tokens(store: &SharedStore, agent: i64, prefix: &str, count: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..count {
        match store
            .create_agent_token(agent, agent_token(&format!("{prefix}{i}")), 10)
            .await
            .unwrap()
        {
            TokenCreated::Created(token) => ids.push(token.id),
            TokenCreated::LimitReached => panic!("limit"),
        }
    }
    ids
}

/// When agent token `id` was last used, as the store has it.
async fn last_used(store: &SharedStore, agent: i64, id: i64) -> Option<Timestamp> {
    store
        .agent_token(agent, id)
        .await
        .unwrap()
        .unwrap()
        .last_used_at
}

/// Uses of many agent tokens land in one write; a use within a minute of the recorded one
/// changes nothing (one write per token per minute), a later one moves it forward.
#[rstest]
#[tokio::test]
async fn agent_token_uses_in_one_batch(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let ids = agent_tokens(&s.store, agent, "u", 3).await;
    let at = |millis: i64| Timestamp::from_millis(START.as_millis() + millis);
    let last_used = |id: i64| last_used(&s.store, agent, id);
    s.store
        .touch_agent_tokens(&[(ids[0], at(1_000)), (ids[1], at(2_000))])
        .await
        .unwrap();
    assert_eq!(last_used(ids[0]).await, Some(at(1_000)));
    assert_eq!(last_used(ids[1]).await, Some(at(2_000)));
    assert_eq!(last_used(ids[2]).await, None);
    s.store
        .touch_agent_tokens(&[(ids[0], at(30_000)), (ids[1], at(62_000)), (9_999, at(0))])
        .await
        .unwrap();
    assert_eq!(last_used(ids[0]).await, Some(at(1_000)));
    assert_eq!(last_used(ids[1]).await, Some(at(62_000)));
    s.store.touch_agent_tokens(&[]).await.unwrap();
}

/// The batcher behind agent token uses: the latest use of each token is written by itself
/// within about a second, and whatever is pending is written on `flush` (at shutdown).
#[rstest]
#[tokio::test]
async fn agent_token_use_batcher(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    use kas_gateway::domain::last_used::LastUsed;
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let ids = agent_tokens(&s.store, agent, "b", 2).await;
    let at = |millis: i64| Timestamp::from_millis(START.as_millis() + millis);
    let last_used = |id: i64| last_used(&s.store, agent, id);
    let batcher = LastUsed::new(Arc::clone(&s.store));
    batcher.record(ids[0], at(2_000));
    batcher.record(ids[0], at(1_000));
    let waited = std::time::Instant::now();
    while last_used(ids[0]).await.is_none() {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last_used(ids[0]).await, Some(at(2_000)));
    batcher.record(ids[1], at(3_000));
    batcher.flush().await;
    assert_eq!(last_used(ids[1]).await, Some(at(3_000)));
}

/// Agent tokens come back by digest, many in one read, whatever their status; digests of no
/// token are left out.
#[rstest]
#[tokio::test]
async fn agent_tokens_by_digests_in_one_read(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let ids = agent_tokens(&s.store, agent, "d", 2).await;
    assert!(s.store.revoke_agent_token(agent, ids[1]).await.unwrap());
    let digests = [
        TokenDigest::of("d0"),
        TokenDigest::of("nobody's"),
        TokenDigest::of("d1"),
    ];
    let mut found = s.store.agent_tokens_by_digests(&digests).await.unwrap();
    found.sort_by_key(|(_, token)| token.id);
    let found: Vec<(TokenDigest, i64, bool)> = found
        .into_iter()
        .map(|(digest, token)| {
            (
                digest,
                token.id,
                token.status == kas_gateway::domain::TokenStatus::Active,
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (TokenDigest::of("d0"), ids[0], true),
            (TokenDigest::of("d1"), ids[1], false),
        ]
    );
    assert!(
        s.store
            .agent_tokens_by_digests(&[])
            .await
            .unwrap()
            .is_empty()
    );
}

/// Token lookups that arrive together are read together: 500 at once (found, missing, and
/// the same token twice) take one statement, and each gets its own answer; a lone lookup
/// later is read at once, by itself.
#[rstest]
#[tokio::test]
async fn token_lookups_read_together(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    use kas_gateway::domain::token_lookups::TokenLookups;
    let s = subject!(backend);
    let (_, agent) = project_with_agent(&s.store).await;
    let ids = agent_tokens(&s.store, agent, "l", 2).await;
    let lookups = TokenLookups::new(Arc::clone(&s.store));
    let secrets: Vec<String> = (0..500)
        .map(|i| match i % 5 {
            0 | 1 => "l0".to_owned(),
            2 => "l1".to_owned(),
            _ => format!("missing {i}"),
        })
        .collect();
    let answers = futures::future::join_all(secrets.iter().map(|secret| {
        let lookups = lookups.clone();
        async move { lookups.by_digest(TokenDigest::of(secret)).await.unwrap() }
    }))
    .await;
    for (secret, answer) in secrets.iter().zip(&answers) {
        let expected = match secret.as_str() {
            "l0" => Some(ids[0]),
            "l1" => Some(ids[1]),
            _ => None,
        };
        assert_eq!(answer.as_ref().map(|t| t.id), expected, "{secret}");
    }
    assert_eq!(lookups.reads(), 1);
    let one = lookups.by_digest(TokenDigest::of("l1")).await.unwrap();
    assert_eq!(one.map(|t| t.id), Some(ids[1]));
    assert_eq!(lookups.reads(), 2);
}

/// When the store cannot answer, every check of the batch gets the error (the database's
/// absence, never a refusal of the token) and none waits for ever.
#[rstest]
#[tokio::test]
async fn token_lookups_answer_every_check_when_the_store_fails(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    use kas_gateway::domain::token_lookups::TokenLookups;
    let s = subject!(backend);
    let lookups = TokenLookups::new(Arc::clone(&s.store));
    s.store.close().await;
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        futures::future::join_all((0..50).map(|i| {
            let lookups = lookups.clone();
            async move { lookups.by_digest(TokenDigest::of(&format!("t{i}"))).await }
        })),
    )
    .await
    .expect("every check answered");
    for answer in answers {
        assert!(
            matches!(answer, Err(kas_gateway::domain::Error::Unavailable(_))),
            "{answer:?}"
        );
    }
    assert_eq!(lookups.reads(), 1);
}

/// The sealed secrets of many URL configurations come back in one read, each from its own
/// column and row; ids without a configuration are left out.
#[rstest]
#[tokio::test]
async fn url_configuration_secrets_in_one_read(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    use kas_gateway::domain::SecretColumn;
    use kas_gateway::store::NewUrlConfiguration;
    let s = subject!(backend);
    let (project, first) = project_with_agent(&s.store).await;
    let second = s
        .store
        .register_agent(project, "b", 1, START)
        .await
        .unwrap()
        .id;
    let mut configs = Vec::new();
    for (agent, column, public_key, client_cert) in [
        (first, SecretColumn::PrivateKey, Some("public key"), None),
        (second, SecretColumn::ClientKey, None, Some("client cert")),
    ] {
        let config = s
            .store
            .create_url_configuration(
                NewUrlConfiguration {
                    agent_id: agent,
                    project_id: project,
                    url: "grpcs://agent.example.com".into(),
                    public_key: public_key.map(String::from),
                    client_cert: client_cert.map(String::from),
                    ca_cert: None,
                    tls_host: None,
                    secret_column: column,
                    created_by_user_id: 1,
                    created_at: START,
                },
                &|row| Ok(format!("sealed {row}").into_bytes()),
            )
            .await
            .unwrap();
        configs.push((config.id, column));
    }
    let ids: Vec<i64> = configs.iter().map(|(id, _)| *id).chain([9_999]).collect();
    let mut secrets = s.store.url_configuration_secrets(&ids).await.unwrap();
    secrets.sort_by_key(|secret| secret.row);
    let found: Vec<(i64, SecretColumn, Vec<u8>)> = secrets
        .into_iter()
        .map(|secret| (secret.row, secret.column, secret.envelope))
        .collect();
    let expected: Vec<(i64, SecretColumn, Vec<u8>)> = configs
        .iter()
        .map(|(id, column)| (*id, *column, format!("sealed {id}").into_bytes()))
        .collect();
    assert_eq!(found, expected);
    assert!(
        s.store
            .url_configuration_secrets(&[])
            .await
            .unwrap()
            .is_empty()
    );
}
