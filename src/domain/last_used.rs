//! Agent tokens' `last_used_at`, written in batches.
//!
//! Every session start authenticates an agent token; one write per session would make a cold
//! start of thousands of agents queue on the database's writer (SQLite has exactly one). The
//! uses are kept in memory instead (the latest time per token) and written in one statement
//! about once a second, sooner when many are pending, and on shutdown. GitLab too records
//! `last_used_at` lazily, so the API shows a use about a second after it happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::model::{Id, Timestamp};
use crate::store::SharedStore;

/// How long a use waits for others to share its write.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// This many pending uses are written at once, without waiting for the interval.
const FLUSH_AT: usize = 1024;
/// At most this many pending uses are held (while the database is slow or away); further
/// tokens' uses are not recorded until a write succeeds.
const MAX_PENDING: usize = 16 * 1024;

/// Collects agent token uses and writes them in batches. Cloning shares the batch.
#[derive(Clone)]
pub struct LastUsed {
    inner: Arc<Inner>,
}

struct Inner {
    store: SharedStore,
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    latest: HashMap<Id, Timestamp>,
    /// Whether a writer task is running (it ends when it finds nothing to write).
    writing: bool,
    /// Uses not recorded because `latest` was full.
    dropped: u64,
}

impl std::fmt::Debug for LastUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastUsed").finish_non_exhaustive()
    }
}

impl LastUsed {
    /// A batcher writing to `store`.
    pub fn new(store: SharedStore) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                pending: Mutex::new(Pending::default()),
                wake: Notify::new(),
            }),
        }
    }

    /// Records that `token_id` was used at `at`. Never waits: the write happens in the
    /// background (a task that runs only while uses are pending). Call from a Tokio runtime.
    pub fn record(&self, token_id: Id, at: Timestamp) {
        let (start_writer, flush_now) = {
            let mut pending = lock(&self.inner.pending);
            let full = pending.latest.len() >= MAX_PENDING;
            match pending.latest.get_mut(&token_id) {
                Some(latest) => *latest = (*latest).max(at),
                None if full => {
                    pending.dropped += 1;
                }
                None => {
                    pending.latest.insert(token_id, at);
                }
            }
            let start_writer = !pending.writing;
            pending.writing = true;
            (start_writer, pending.latest.len() >= FLUSH_AT)
        };
        if start_writer {
            tokio::spawn(write_loop(Arc::clone(&self.inner)));
        }
        if flush_now {
            self.inner.wake.notify_one();
        }
    }

    /// Writes every pending use now (at shutdown, before the database closes).
    pub async fn flush(&self) {
        let batch = take(&self.inner, false);
        write(&self.inner, batch).await;
    }
}

/// Locks `mutex`, also after a panic elsewhere poisoned it (what it guards stays usable:
/// every change to it is complete before the lock is released).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes every pending use; with `last`, also marks the writer as ended when there is none.
fn take(inner: &Inner, last: bool) -> Vec<(Id, Timestamp)> {
    let mut pending = lock(&inner.pending);
    if pending.dropped > 0 {
        tracing::warn!(
            dropped = pending.dropped,
            "agent token uses were not recorded: too many were waiting for the database"
        );
        pending.dropped = 0;
    }
    if last && pending.latest.is_empty() {
        // Decided under the lock, so a use recorded from now on starts a new writer.
        pending.writing = false;
    }
    pending.latest.drain().collect()
}

/// Writes a batch per interval (or sooner when woken) until nothing is pending.
async fn write_loop(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            () = inner.wake.notified() => {}
        }
        let batch = take(&inner, true);
        if batch.is_empty() {
            return;
        }
        write(&inner, batch).await;
    }
}

async fn write(inner: &Inner, batch: Vec<(Id, Timestamp)>) {
    if batch.is_empty() {
        return;
    }
    if let Err(error) = inner.store.touch_agent_tokens(&batch).await {
        tracing::warn!(%error, uses = batch.len(), "could not record agent token uses; retrying");
        // Kept for the next write unless newer uses arrived meanwhile or there is no room.
        let mut pending = lock(&inner.pending);
        for (token_id, at) in batch {
            if pending.latest.len() >= MAX_PENDING {
                break;
            }
            let latest = pending.latest.entry(token_id).or_insert(at);
            *latest = (*latest).max(at);
        }
    }
}
