//! Leases between replicas on PostgreSQL: a row per live replica, an assignment per agent. All
//! time arithmetic is done by the database's clock (`now()`), never a replica's.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Error;
use super::Result;
use crate::domain::Id;

/// The lease operations of one incarnation.
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// Registers a new incarnation with a lease of `ttl`, reachable by the other replicas at
    /// `private_api_url`.
    async fn join(
        &self,
        incarnation: &str,
        replica_id: &str,
        private_api_url: Option<&str>,
        ttl: Duration,
    ) -> Result<()>;
    /// Extends the lease; false when it had expired or is gone (the others may have taken the
    /// agents: the incarnation is over).
    async fn renew(&self, incarnation: &str, ttl: Duration) -> Result<bool>;
    /// Releases `release` (agents whose sessions this replica has already hung up), claims
    /// up to `claim` free agents, and says which agents it holds, with their epochs.
    async fn balance(
        &self,
        incarnation: &str,
        release: &[Id],
        claim: i64,
    ) -> Result<BTreeMap<Id, i64>>;
    /// Counts live replicas and configured agents, for the fair share.
    async fn census(&self) -> Result<(i64, i64)>;
    /// Releases every assignment and the lease (on shutdown, after hanging up).
    async fn leave(&self, incarnation: &str) -> Result<()>;
    /// Tells every replica that something changed (a configuration, an agent, a token, a
    /// release), so that they look now rather than at their next round.
    async fn announce(&self) -> Result<()>;
    /// Wakes every `wake` whenever a replica announces a change, until `shutdown`; once more
    /// after each reconnection, since announcements may have been missed meanwhile.
    fn follow(&self, wake: Vec<Arc<Notify>>, shutdown: CancellationToken);
}

/// Listens for announcements and wakes `wake` on each, and once at the start and after each
/// reconnection (announcements may have been missed then); returns only on an error.
async fn listen(
    pool: &PgPool,
    wake: &[Arc<Notify>],
) -> std::result::Result<std::convert::Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    loop {
        wake.iter().for_each(|w| w.notify_one());
        // `None`: the connection was lost and is being re-established.
        listener.try_recv().await?;
    }
}

/// The channel replicas announce changes on.
const CHANNEL: &str = "kas_gateway_changes";

/// [`LeaseStore`] on PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgLeases {
    pool: PgPool,
}

impl PgLeases {
    /// Leases in the database behind `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn seconds(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

#[async_trait]
impl LeaseStore for PgLeases {
    async fn join(
        &self,
        incarnation: &str,
        replica_id: &str,
        private_api_url: Option<&str>,
        ttl: Duration,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO replicas (incarnation, replica_id, private_api_url, started_at, \
             expires_at) VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))",
        )
        .bind(incarnation)
        .bind(replica_id)
        .bind(private_api_url)
        .bind(seconds(ttl))
        .execute(&self.pool)
        .await
        .map_err(Error::from)?;
        Ok(())
    }

    async fn renew(&self, incarnation: &str, ttl: Duration) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE replicas SET expires_at = now() + make_interval(secs => $2) \
             WHERE incarnation = $1 AND expires_at > now()",
        )
        .bind(incarnation)
        .bind(seconds(ttl))
        .execute(&self.pool)
        .await
        .map_err(Error::from)?
        .rows_affected();
        // Rows of incarnations dead for a while are of no use to anyone.
        sqlx::query(
            "DELETE FROM replicas WHERE expires_at < now() - make_interval(secs => $1 * 10)",
        )
        .bind(seconds(ttl))
        .execute(&self.pool)
        .await
        .map_err(Error::from)?;
        Ok(renewed == 1)
    }

    async fn census(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM replicas WHERE expires_at > now()), \
                    (SELECT count(*) FROM agent_url_configurations)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::from)?)
    }

    async fn balance(
        &self,
        incarnation: &str,
        release: &[Id],
        claim: i64,
    ) -> Result<BTreeMap<Id, i64>> {
        // Each statement on its own (no transaction): short row locks, and the claim's
        // SKIP LOCKED keeps replicas from waiting on each other. (The assignments follow the
        // configurations by a trigger, not here.)
        if !release.is_empty() {
            sqlx::query(
                "UPDATE agent_assignments SET holder = NULL \
                 WHERE holder = $1 AND agent_id = ANY($2)",
            )
            .bind(incarnation)
            .bind(release)
            .execute(&self.pool)
            .await
            .map_err(Error::from)?;
            self.announce().await?;
        }
        if claim > 0 {
            // Free: no holder, or a holder whose lease has expired by the database's clock.
            // SKIP LOCKED: replicas claiming at once never wait for each other.
            // Each claimed row says whether it had a holder: one whose lease had expired.
            let claimed: Vec<(bool,)> = sqlx::query_as(
                "UPDATE agent_assignments a SET holder = $1, epoch = a.epoch + 1 \
                 FROM (SELECT f.agent_id, f.holder FROM agent_assignments f \
                       WHERE f.holder IS NULL OR NOT EXISTS \
                         (SELECT 1 FROM replicas r \
                          WHERE r.incarnation = f.holder AND r.expires_at > now()) \
                       ORDER BY f.agent_id LIMIT $2 FOR UPDATE SKIP LOCKED) free \
                 WHERE a.agent_id = free.agent_id \
                 RETURNING free.holder IS NOT NULL",
            )
            .bind(incarnation)
            .bind(claim)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
            let taken_over = claimed.iter().filter(|(had_holder,)| *had_holder).count();
            crate::metrics::takeovers(u64::try_from(taken_over).unwrap_or(u64::MAX));
        }
        let held: Vec<(Id, i64)> =
            sqlx::query_as("SELECT agent_id, epoch FROM agent_assignments WHERE holder = $1")
                .bind(incarnation)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::from)?;
        Ok(held.into_iter().collect())
    }

    async fn leave(&self, incarnation: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        sqlx::query("UPDATE agent_assignments SET holder = NULL WHERE holder = $1")
            .bind(incarnation)
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        sqlx::query("DELETE FROM replicas WHERE incarnation = $1")
            .bind(incarnation)
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        // Delivered at commit.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await
            .map_err(Error::from)?;
        tx.commit().await.map_err(Error::from)?;
        Ok(())
    }

    async fn announce(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    fn follow(&self, wake: Vec<Arc<Notify>>, shutdown: CancellationToken) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    Err(error) = listen(&pool, &wake) => {
                        tracing::debug!(%error, "listening for the replicas' announcements failed; retrying");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
}
