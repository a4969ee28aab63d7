//! The task lifecycle against real PostgreSQL: conditional updates with their audit rows, no
//! lost updates under concurrency, and a trigger that refuses any other status change.
#![allow(clippy::unwrap_used, missing_docs)]

use mahavishnu::devstack::postgres::TestDatabase;
use mahavishnu::task::lifecycle::{self, Transition, TransitionError};
use mahavishnu::task::Status;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const ALL: [Status; 7] = [
    Status::Pending,
    Status::Queued,
    Status::Running,
    Status::Completed,
    Status::Failed,
    Status::Cancelled,
    Status::Blocked,
];

async fn task_in(pool: &PgPool, status: Status) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, title, repository, created_by, submitted_by, message_key, status)
         VALUES ($1, 't', 'r', '00000000-0000-0000-0000-000000000001', 'test', $2, $3)",
    )
    .bind(id)
    .bind(format!("test:{id}"))
    .bind(status.as_str())
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn status_of(pool: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_trigger_and_the_code_allow_exactly_the_same_changes() {
    let db = TestDatabase::create().await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    for from in ALL {
        for to in ALL {
            if from == to {
                continue;
            }
            let id = task_in(&pool, from).await;
            let r = sqlx::query("UPDATE tasks SET status = $2 WHERE id = $1")
                .bind(id)
                .bind(to.as_str())
                .execute(&pool)
                .await;
            let expected = lifecycle::allowed(from, to);
            match r {
                Ok(_) => assert!(expected, "the database allowed {from:?} -> {to:?}"),
                Err(sqlx::Error::Database(e)) => {
                    assert!(!expected, "the database refused {from:?} -> {to:?}: {e}");
                    assert_eq!(e.code().as_deref(), Some("23514"));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[tokio::test]
async fn transitions_are_conditional_and_audited() {
    let db = TestDatabase::create().await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let id = task_in(&pool, Status::Queued).await;
    let mut conn = pool.acquire().await.unwrap();
    let prev = lifecycle::apply(
        &mut conn,
        id,
        Transition::Start,
        "worker-1",
        json!({"attempt": 1}),
    )
    .await
    .unwrap();
    assert_eq!(prev, Status::Queued);
    // Starting again, or cancelling a completed task, is a conflict that names the current
    // status; nothing changes.
    let current = |r: Result<Status, TransitionError>| match r {
        Err(TransitionError::Conflict { current, .. }) => current,
        other => panic!("{other:?}"),
    };
    let r = lifecycle::apply(&mut conn, id, Transition::Start, "worker-2", json!({})).await;
    assert_eq!(current(r), Status::Running);
    lifecycle::apply(
        &mut conn,
        id,
        Transition::Complete,
        "worker-1",
        json!({"exit_code": 0}),
    )
    .await
    .unwrap();
    let r = lifecycle::apply(&mut conn, id, Transition::Cancel, "user", json!({})).await;
    assert_eq!(current(r), Status::Completed);
    assert!(matches!(
        lifecycle::assign(&mut conn, id, None, "user").await,
        Err(TransitionError::Conflict { .. })
    ));
    assert!(matches!(
        lifecycle::apply(&mut conn, Uuid::now_v7(), Transition::Start, "w", json!({})).await,
        Err(TransitionError::NotFound)
    ));
    let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT event, actor, details FROM task_audit_log WHERE task_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "only the changes made are audited: {rows:?}");
    assert_eq!(rows[0].0, "task_started");
    assert_eq!(rows[0].1, "worker-1");
    assert_eq!(
        rows[0].2,
        json!({"from": "queued", "to": "running", "attempt": 1})
    );
    assert_eq!(rows[1].0, "task_completed");
    assert_eq!(rows[1].2["exit_code"], 0);

    // Block, unblock, assign.
    let id = task_in(&pool, Status::Pending).await;
    lifecycle::apply(
        &mut conn,
        id,
        Transition::Block,
        "user",
        json!({"reason": "waiting"}),
    )
    .await
    .unwrap();
    lifecycle::apply(&mut conn, id, Transition::Unblock, "user", json!({}))
        .await
        .unwrap();
    lifecycle::assign(&mut conn, id, Some(mahavishnu::db::SYSTEM_USER_ID), "user")
        .await
        .unwrap();
    assert_eq!(status_of(&pool, id).await, "queued");
    let events: Vec<String> =
        sqlx::query_scalar("SELECT event FROM task_audit_log WHERE task_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(events, ["task_blocked", "task_unblocked", "task_assigned"]);
}

#[tokio::test]
async fn of_many_workers_starting_one_task_exactly_one_wins() {
    let db = TestDatabase::create().await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let id = task_in(&pool, Status::Queued).await;
    let mut racers = Vec::new();
    for w in 0..16 {
        let pool = pool.clone();
        racers.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let r = lifecycle::apply(
                &mut tx,
                id,
                Transition::Start,
                &format!("worker-{w}"),
                json!({}),
            )
            .await;
            tx.commit().await.unwrap();
            r.is_ok()
        }));
    }
    let mut winners = 0;
    for r in racers {
        winners += usize::from(r.await.unwrap());
    }
    assert_eq!(winners, 1);
    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_audit_log WHERE task_id = $1 AND event = 'task_started'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(started, 1);
}
