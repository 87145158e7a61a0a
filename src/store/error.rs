//! The store's own errors: what went wrong with the database, classified once here. The domain
//! words them for clients in one place, `impl From<store::Error> for domain::Error`.

/// Any error kept as the cause of [`Error::Other`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in a store operation. Messages carry the database's words
/// (constraint and column names), never a statement's parameters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The row asked for, or a row a write refers to, does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write.
    #[error("conflict: {0}")]
    Conflict(#[source] sqlx::Error),
    /// The database cannot serve now (unreachable, refusing, overloaded, locked): an
    /// operator's matter, never a failed operation.
    #[error("unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a statement the database rejected, a row this code cannot read, a
    /// failed migration, or the error of a step the caller runs inside a transaction.
    #[error(transparent)]
    Other(BoxError),
}

/// Shorthand for store results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with no more specific kind, from a message or another error.
    pub fn other(cause: impl Into<BoxError>) -> Self {
        Self::Other(cause.into())
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(ref db) if db.is_unique_violation() => Self::Conflict(error),
            // The row a write refers to is gone (deleted meanwhile).
            sqlx::Error::Database(ref db) if db.is_foreign_key_violation() => Self::NotFound,
            sqlx::Error::Database(ref db) if database_unavailable(db.as_ref()) => {
                Self::Unavailable(error)
            }
            // A connection the pool opens on demand fails with these too: the configuration
            // names a TLS or authentication mode the server refuses, or the worker thread of a
            // SQLite connection died.
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Configuration(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            other => Self::Other(Box::new(other)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Other(Box::new(error))
    }
}

/// Whether a database error means the database cannot serve now, rather than a bad statement.
/// The pool opens connections on demand, so connect-time refusals arrive here as they are.
fn database_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = pg.code();
        // 08: connection exceptions. 53: insufficient resources (53300 too many connections,
        // 53100 disk full). 55000: the database is not accepting connections (`ALLOW_CONNECTIONS
        // false`; this store never uses the other causes of 55000). 57P0x: shutdown, crash,
        // starting up, database dropped. 3D000: no such database. 28: authentication failed.
        return code.starts_with("08")
            || code.starts_with("53")
            || code == "55000"
            || code.starts_with("57P0")
            || code == "3D000"
            || code.starts_with("28");
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Primary result codes (the low byte of an extended one): BUSY and LOCKED once the
        // busy timeout has run out, IOERR, FULL (disk full), CANTOPEN.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6 | 10 | 13 | 14));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, SqliteConnection};

    async fn sqlite_file(dir: &tempfile::TempDir) -> (String, SqliteConnection) {
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let conn =
            SqliteConnection::connect_with(&options.create_if_missing(true).foreign_keys(true))
                .await
                .unwrap();
        (url, conn)
    }

    #[tokio::test]
    async fn real_sqlite_errors_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut conn) = sqlite_file(&dir).await;
        sqlx::query(
            "CREATE TABLE parents (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE); \
             CREATE TABLE children (id INTEGER PRIMARY KEY, \
             parent_id INTEGER NOT NULL REFERENCES parents (id))",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("INSERT INTO parents (name) VALUES ('a')")
            .execute(&mut conn)
            .await
            .unwrap();

        let duplicate = sqlx::query("INSERT INTO parents (name) VALUES ('a')")
            .execute(&mut conn)
            .await
            .unwrap_err();
        let conflict = Error::from(duplicate);
        assert!(matches!(conflict, Error::Conflict(_)), "{conflict:?}");
        assert!(std::error::Error::source(&conflict).is_some());

        let orphan = sqlx::query("INSERT INTO children (parent_id) VALUES (42)")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(Error::from(orphan), Error::NotFound));

        let missing = sqlx::query("SELECT id FROM parents WHERE name = 'b'")
            .fetch_one(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(Error::from(missing), Error::NotFound));

        let syntax = sqlx::query("SELEC 1").execute(&mut conn).await.unwrap_err();
        assert!(matches!(Error::from(syntax), Error::Other(_)));
    }

    #[tokio::test]
    async fn a_busy_sqlite_database_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let (url, mut conn) = sqlite_file(&dir).await;
        // A second connection that wants the write lock another holds, with no busy timeout.
        let mut other = SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(&mut other)
            .await
            .unwrap();
        let busy = sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap_err();
        let busy = Error::from(busy);
        assert!(
            matches!(busy, Error::Unavailable(_)),
            "SQLITE_BUSY: {busy:?}"
        );
        assert!(std::error::Error::source(&busy).is_some());
    }

    #[tokio::test]
    async fn a_pool_that_times_out_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_millis(50))
            .connect_with(options.create_if_missing(true))
            .await
            .unwrap();
        let held = pool.acquire().await.unwrap();
        let timed_out = pool.acquire().await.unwrap_err();
        assert!(matches!(timed_out, sqlx::Error::PoolTimedOut));
        assert!(matches!(Error::from(timed_out), Error::Unavailable(_)));
        // Closing waits for every connection to come back.
        drop(held);
        pool.close().await;
        let closed = pool.acquire().await.unwrap_err();
        assert!(matches!(Error::from(closed), Error::Unavailable(_)));
    }

    /// The PostgreSQL server the test suites use (`KAS_TEST_POSTGRES_URL`), unless switched off.
    fn postgres_url() -> Option<String> {
        if std::env::var("KAS_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
            return None;
        }
        Some(
            std::env::var("KAS_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        )
    }

    #[tokio::test]
    async fn real_postgres_errors_are_classified() {
        let Some(url) = postgres_url() else { return };
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TEMPORARY TABLE names (name TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .unwrap();
        let insert = "INSERT INTO names (name) VALUES ('a')";
        sqlx::query(insert).execute(&mut conn).await.unwrap();
        let duplicate = sqlx::query(insert).execute(&mut conn).await.unwrap_err();
        assert!(matches!(Error::from(duplicate), Error::Conflict(_)));

        // 57P01: the server ends the session (as on an administrator's shutdown).
        let terminated = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
            .execute(&mut conn)
            .await
            .unwrap_err();
        let terminated = Error::from(terminated);
        assert!(
            matches!(terminated, Error::Unavailable(_)),
            "{terminated:?}"
        );

        // 3D000: the configured database does not exist.
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let missing = sqlx::PgConnection::connect_with(&options.database("kas_no_such_database"))
            .await
            .unwrap_err();
        assert!(matches!(Error::from(missing), Error::Unavailable(_)));
    }

    #[test]
    fn connection_failures_are_unavailable_and_bugs_are_other() {
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
            sqlx::Error::Configuration("server does not support TLS".into()),
            sqlx::Error::Protocol("unexpected message".into()),
        ] {
            assert!(matches!(Error::from(error), Error::Unavailable(_)));
        }
        assert!(matches!(
            Error::from(sqlx::Error::RowNotFound),
            Error::NotFound
        ));
        assert!(matches!(
            Error::from(sqlx::Error::ColumnNotFound("x".into())),
            Error::Other(_)
        ));
    }
}
