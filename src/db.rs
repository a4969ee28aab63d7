//! PostgreSQL: the pool, the migrator shared by binaries and tests, and the rule that keeps
//! transactions from being cancelled half-way.
//!
//! # Cancellation
//! sqlx (0.8.6 and 0.9.0 alike, sqlx#4393) can return a pooled connection that is still inside
//! a transaction when the future running `BEGIN` is dropped mid-flight; the next borrower's
//! statements then run inside that stale transaction. We never let a transaction be cancelled:
//! every unit of transactional work runs through [`detached`], a spawned task that finishes even
//! if its caller is dropped. `tests/db_cancellation.rs` proves the pool stays clean.

use crate::config::DatabaseSettings;
use anyhow::Context as _;
use secrecy::ExposeSecret;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

/// The migrator over `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Id of the seeded system user that owns tasks submitted without a user account.
pub const SYSTEM_USER_ID: uuid::Uuid = uuid::Uuid::from_u128(1);

/// Connection options with server-side timeouts set at connect time (no extra round trip).
pub fn connect_options(s: &DatabaseSettings) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(s.url.expose_secret())
        .context("database.url is not a valid PostgreSQL URL")?
        .application_name("mahavishnu")
        .options([
            ("statement_timeout", format!("{}ms", s.statement_timeout_ms)),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", s.idle_in_transaction_timeout_ms),
            ),
            // 0 would mean "no lock timeout at all".
            (
                "lock_timeout",
                format!("{}ms", (s.statement_timeout_ms / 2).max(1)),
            ),
        ]))
}

/// A lazily connecting pool: processes start while the database is down and recover when it
/// comes back.
pub fn pool(s: &DatabaseSettings) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(s.max_connections)
        .acquire_timeout(Duration::from_millis(s.acquire_timeout_ms))
        .connect_lazy_with(connect_options(s)?))
}

/// The executors' lock pool: one connection per task a worker may run at once (plus one
/// spare), each holding a task's advisory locks in an open transaction for a whole attempt.
/// Idle-in-transaction is allowed (the attempt may run for hours), and TCP keepalives let the
/// server notice a lost worker host within about a minute, which frees its locks.
pub fn lock_pool(s: &DatabaseSettings, slots: usize) -> anyhow::Result<PgPool> {
    let options = connect_options(s)?.options([
        ("idle_in_transaction_session_timeout", "0".to_owned()),
        ("tcp_keepalives_idle", "15".to_owned()),
        ("tcp_keepalives_interval", "5".to_owned()),
        ("tcp_keepalives_count", "4".to_owned()),
        ("tcp_user_timeout", "35000".to_owned()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(u32::try_from(slots + 1).unwrap_or(u32::MAX))
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// Creates the database named in the URL if it does not exist.
pub async fn ensure_database(s: &DatabaseSettings) -> anyhow::Result<()> {
    let url = s.url.expose_secret();
    if !Postgres::database_exists(url)
        .await
        .context("checking whether the database exists")?
    {
        Postgres::create_database(url)
            .await
            .context("creating the database")?;
    }
    Ok(())
}

/// Creates the database if needed and applies every pending migration.
pub async fn migrate(s: &DatabaseSettings) -> anyhow::Result<()> {
    ensure_database(s).await?;
    let pool = pool(s)?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    pool.close().await;
    Ok(())
}

/// Why a detached unit of database work failed.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The database or the driver said no.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// Our own code panicked inside the unit: it will panic again on a retry.
    #[error("database task panicked")]
    Panicked,
    /// The runtime is shutting down.
    #[error("database task aborted")]
    Aborted,
}

impl TxError {
    /// True when retrying later can succeed (see [`is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(e) => is_transient(e),
            Self::Panicked => false,
            Self::Aborted => true,
        }
    }
}

/// Runs transactional work to completion even if the caller is dropped. See the module docs.
pub async fn detached<F, T>(work: F) -> Result<T, TxError>
where
    F: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(r) => r.map_err(TxError::Db),
        Err(e) if e.is_panic() => {
            tracing::error!(error = %e, "database task panicked");
            Err(TxError::Panicked)
        }
        Err(_) => Err(TxError::Aborted),
    }
}

/// True for errors worth retrying: everything except failures the *message's data* caused.
///
/// A message may be dead-lettered only when retrying it can never succeed, so the test is
/// inverted: permanent are data exceptions (SQLSTATE class 22, e.g. a string too long) and
/// integrity violations (class 23, e.g. a check constraint) — except foreign-key violations
/// (23503), which our writes can only cause when seed data such as the system user is missing —
/// plus driver-side encoding and decoding failures. Everything else — lost connections, pool
/// timeouts, a database refusing connections (55000), operator intervention (57xxx), lack of
/// resources (53xxx), timeouts, deadlocks, serialization failures — is the infrastructure's
/// and passes.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => !db
            .code()
            .is_some_and(|c| (c.starts_with("22") || c.starts_with("23")) && c != "23503"),
        sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => false,
        _ => true,
    }
}
