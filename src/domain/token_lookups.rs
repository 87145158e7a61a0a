//! Agent token lookups, read together.
//!
//! Every session start looks up the token its agent presented in the hello. At a cold start
//! of thousands of agents these lookups arrive hundreds at a time, and one statement each
//! would have them queue for the pool's connections (on SQLite, each a hand-over to a
//! connection's thread and back; on PostgreSQL, a round trip and a statement each). Here a
//! lookup that arrives while no read is running starts one at once, so a lone lookup waits
//! for nothing; lookups that arrive while a read runs wait for it to end and then go
//! together in the next one, at most [`MAX_BATCH`] digests to a statement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::error::{Error, Result};
use super::last_used::lock;
use super::model::AgentToken;
use crate::crypto::TokenDigest;
use crate::store::SharedStore;

/// At most this many digests go into one statement.
pub const MAX_BATCH: usize = 1000;

/// Looks agent tokens up by digest, many in one read. Cloning shares the queue.
#[derive(Clone)]
pub struct TokenLookups {
    inner: Arc<Inner>,
}

struct Inner {
    store: SharedStore,
    queue: Mutex<Queue>,
    /// Statements run so far.
    reads: AtomicU64,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    /// Whether a reader task is running (it ends when it finds nobody waiting).
    reading: bool,
}

struct Waiter {
    digest: TokenDigest,
    answer: oneshot::Sender<Result<Option<AgentToken>>>,
}

impl std::fmt::Debug for TokenLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLookups").finish_non_exhaustive()
    }
}

impl TokenLookups {
    /// Lookups in `store`.
    pub fn new(store: SharedStore) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                queue: Mutex::new(Queue::default()),
                reads: AtomicU64::new(0),
            }),
        }
    }

    /// How many statements the lookups took so far.
    pub fn reads(&self) -> u64 {
        self.inner.reads.load(Ordering::Relaxed)
    }

    /// The token with `digest`, whatever its status. Call from a Tokio runtime; dropping the
    /// future only drops its answer, never another lookup's.
    pub async fn by_digest(&self, digest: TokenDigest) -> Result<Option<AgentToken>> {
        let (answer, answered) = oneshot::channel();
        let start_reader = {
            let mut queue = lock(&self.inner.queue);
            queue.waiting.push(Waiter { digest, answer });
            !std::mem::replace(&mut queue.reading, true)
        };
        if start_reader {
            // A task of its own: the reads go on whichever lookups are dropped meanwhile.
            tokio::spawn(read(Arc::clone(&self.inner)));
        }
        answered
            .await
            .map_err(|_| Error::Internal("the token lookup ended without an answer".into()))?
    }
}

/// Reads while lookups wait, a batch at a time.
async fn read(inner: Arc<Inner>) {
    // Should this task end early (a panic below), the waiting lookups get an error instead of
    // waiting for ever, and the next lookup starts a reader again.
    let mut reading = Reading {
        inner: &inner,
        done: false,
    };
    loop {
        let batch: Vec<Waiter> = {
            let mut queue = lock(&inner.queue);
            if queue.waiting.is_empty() {
                queue.reading = false;
                reading.done = true;
                return;
            }
            let n = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..n).collect()
        };
        let digests: Vec<TokenDigest> = batch.iter().map(|w| w.digest.clone()).collect();
        inner.reads.fetch_add(1, Ordering::Relaxed);
        match inner.store.agent_tokens_by_digests(&digests).await {
            Ok(found) => {
                let found: HashMap<TokenDigest, AgentToken> = found.into_iter().collect();
                for waiter in batch {
                    // Cloned: one token can be in two hellos of a batch.
                    let _ = waiter.answer.send(Ok(found.get(&waiter.digest).cloned()));
                }
            }
            Err(error) => {
                let error = Error::from(error);
                for waiter in batch {
                    let _ = waiter.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Resets the queue if a reader ends without finishing.
struct Reading<'a> {
    inner: &'a Inner,
    done: bool,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = lock(&self.inner.queue);
            queue.reading = false;
            queue.waiting.clear();
        }
    }
}
