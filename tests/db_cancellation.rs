//! sqlx#4393: a cancelled `BEGIN` can leave a pooled connection inside a transaction. Our rule is
//! that transactional work runs in `db::detached`, so cancelling the caller cannot cancel it.
//! This proves the pool stays clean when callers are cancelled mid-transaction.
#![allow(clippy::unwrap_used, missing_docs)]

use mahavishnu::db;
use mahavishnu::devstack::postgres::TestDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn cancelled_callers_leave_no_open_transaction_on_pooled_connections() {
    let db = TestDatabase::create().await.unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE probe (n int)")
        .execute(&pool)
        .await
        .unwrap();

    // Widen the BEGIN round trip to 200 ms so that cancelling the caller after 50 ms lands
    // inside it every time: exactly the window of sqlx#4393.
    for _ in 0..3 {
        let p = pool.clone();
        let work = db::detached(async move {
            let mut tx = p.begin_with("BEGIN; SELECT pg_sleep(0.2)").await?;
            sqlx::query("SELECT 1").execute(&mut *tx).await?;
            tx.commit().await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), work)
                .await
                .is_err(),
            "caller was cancelled"
        );
    }
    // Whatever the pool hands out next must not be inside a transaction: a plain insert must be
    // visible to another session at once.
    sqlx::query("INSERT INTO probe VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(n, 1, "the insert ran inside a leaked transaction");
    // SAVEPOINT is refused outside a transaction block (25P01) and accepted inside one.
    let err = sqlx::raw_sql("SAVEPOINT probe")
        .execute(&pool)
        .await
        .unwrap_err();
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    assert_eq!(
        code.as_deref(),
        Some("25P01"),
        "pooled connection is inside a transaction: {err}"
    );
}
