//! `mhv webhooks`: list sources, show recent deliveries and their verdicts, and force a
//! redelivery of a stored delivery.

use crate::config::{Settings, WebhookScheme};
use crate::webhooks::delivery::RedeliverRequest;
use crate::{db, topology};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use std::time::Duration;

/// `mhv webhooks …`.
#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// List configured sources: scheme, endpoint, limits, secrets (ids, expiry) and rules.
    List,
    /// Show recent deliveries with their verdicts, and recent refused or repeated attempts.
    Deliveries {
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// How many rows of each kind.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Route a stored delivery again with the current rules, bypassing the duplicate check
    /// (audited as `webhook_redelivered`). Each run makes at most one new task.
    Redeliver {
        /// Source name.
        source: String,
        /// The sender's delivery id.
        delivery_id: String,
        /// Required: redelivery deliberately bypasses replay protection.
        #[arg(long)]
        force: bool,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Seconds to wait for a worker to process it.
        #[arg(long, default_value_t = 15)]
        wait_secs: u64,
    },
}

/// Runs a `mhv webhooks` command.
pub async fn run(s: Settings, cmd: WebhooksCommand) -> anyhow::Result<()> {
    if let WebhooksCommand::Deliveries { limit, .. } = &cmd {
        if !(1..=10_000).contains(limit) {
            anyhow::bail!("MHV-003: --limit must be within 1..=10000");
        }
    }
    match cmd {
        WebhooksCommand::List => {
            list(&s);
            Ok(())
        }
        WebhooksCommand::Deliveries { source, limit } => deliveries(&s, source, limit).await,
        WebhooksCommand::Redeliver {
            source,
            delivery_id,
            force,
            reason,
            wait_secs,
        } => {
            if !force {
                anyhow::bail!("MHV-003: redelivery bypasses the duplicate check and can create a second task; pass --force to confirm");
            }
            redeliver(&s, source, delivery_id, reason, wait_secs).await
        }
    }
}

fn list(s: &Settings) {
    if s.webhooks.sources.is_empty() {
        println!("no webhook sources configured (webhooks.sources; see docs/webhooks.md)");
        return;
    }
    let now = Utc::now();
    for (name, src) in &s.webhooks.sources {
        println!("{name}");
        println!("  endpoint:   POST /v1/webhooks/{name}");
        println!("  scheme:     {}", src.scheme.as_str());
        println!("  body limit: {} bytes", src.body_limit_bytes);
        if src.scheme == WebhookScheme::Standard {
            println!("  tolerance:  {} s", src.tolerance_secs);
        }
        for sec in &src.secrets {
            let origin = match (&sec.secret, &sec.env) {
                (Some(_), _) => "inline".to_owned(),
                (_, Some(var)) => format!(
                    "env {var} ({})",
                    if std::env::var(var).is_ok_and(|v| !v.is_empty()) {
                        "set"
                    } else {
                        "NOT SET"
                    }
                ),
                _ => "missing".to_owned(),
            };
            let expiry = match sec.expires_at {
                None => "no expiry".to_owned(),
                Some(t) if t <= now => format!("EXPIRED {}", t.to_rfc3339()),
                Some(t) => format!("expires {}", t.to_rfc3339()),
            };
            println!("  secret:     {} [{origin}, {expiry}]", sec.id);
        }
        if src.rules.is_empty() {
            println!("  rules:      none (deliveries are recorded, no tasks)");
        }
        for r in &src.rules {
            let mut filters = vec![format!("event={}", r.event)];
            for (k, v) in [
                ("action", &r.actions),
                ("label", &r.labels),
                ("branch", &r.branches),
            ] {
                if !v.is_empty() {
                    filters.push(format!("{k}={}", v.join("|")));
                }
            }
            println!(
                "  rule:       {} [{}] -> repository {:?}, title {:?}",
                r.name,
                filters.join(" "),
                r.task.repository,
                r.task.title
            );
        }
    }
}

type DeliveryRow = (
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<uuid::Uuid>,
    Option<String>,
    i32,
);

async fn deliveries(s: &Settings, source: Option<String>, limit: i64) -> anyhow::Result<()> {
    let pool = db::pool(&s.database)?;
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT received_at, source, delivery_id, event, verdict, rule, task_id, reason, length(body)
         FROM webhook_deliveries WHERE $1::text IS NULL OR source = $1
         ORDER BY received_at DESC, id DESC LIMIT $2",
    )
    .bind(&source)
    .bind(limit)
    .fetch_all(&pool)
    .await
    .context("MHV-002: reading webhook_deliveries")?;
    println!("RECEIVED                  SOURCE      DELIVERY                               EVENT              VERDICT       RULE / TASK / REASON");
    for (at, src, id, event, verdict, rule, task, reason, size) in rows {
        let detail = match (rule, task, reason) {
            (r, Some(t), _) => format!("{} -> task {t}", r.unwrap_or_default()),
            (r, None, Some(why)) => format!("{} {why}", r.unwrap_or_default()),
            _ => String::new(),
        };
        println!(
            "{:<25} {:<11} {:<38} {:<18} {:<13} {} ({size} bytes)",
            at.format("%Y-%m-%d %H:%M:%S%.3f"),
            src,
            printable(&id),
            printable(&event),
            verdict,
            printable(detail.trim())
        );
    }
    let attempts: Vec<(DateTime<Utc>, String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT created_at, source, delivery_id, event, details FROM webhook_audit_log
         WHERE event <> 'webhook_received' AND ($1::text IS NULL OR source = $1)
         ORDER BY id DESC LIMIT $2",
    )
    .bind(&source)
    .bind(limit)
    .fetch_all(&pool)
    .await?;
    if !attempts.is_empty() {
        println!("\nREPEATED, REFUSED AND FORCED ATTEMPTS");
        for (at, src, id, event, details) in attempts {
            println!(
                "{:<25} {:<11} {:<38} {:<20} {}",
                at.format("%Y-%m-%d %H:%M:%S%.3f"),
                src,
                printable(&id),
                event,
                printable(&details.to_string())
            );
        }
    }
    Ok(())
}

/// Sender-controlled text without control characters (no terminal escape sequences).
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

async fn redeliver(
    s: &Settings,
    source: String,
    delivery_id: String,
    reason: String,
    wait_secs: u64,
) -> anyhow::Result<()> {
    let pool = db::pool(&s.database)?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE source = $1 AND delivery_id = $2)",
    )
    .bind(&source)
    .bind(&delivery_id)
    .fetch_one(&pool)
    .await
    .context("MHV-002: reading webhook_deliveries")?;
    if !exists {
        anyhow::bail!("MHV-100: no stored delivery {delivery_id:?} of source {source:?} (see `mhv webhooks deliveries`; rows older than webhooks.ledger_retention_days are pruned)");
    }
    let req = RedeliverRequest {
        source,
        delivery_id,
        redelivery_id: uuid::Uuid::now_v7(),
        actor: format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        ),
        reason,
    };
    let nats = topology::connect(&s.nats.url, "mhv-cli").await?;
    let js = async_nats::jetstream::new(nats.clone());
    topology::ensure_stream(&js, &s.nats).await?;
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&req)?.into())
        .message_id(format!("whr:{}", req.redelivery_id))
        .expected_stream(&s.nats.stream.name);
    js.send_publish(topology::SUBJECT_WEBHOOK_REDELIVER, msg)
        .await?
        .await
        .context("MHV-007: JetStream did not acknowledge the redelivery request")?;
    println!("redelivery {} queued", req.redelivery_id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let done: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT details FROM webhook_audit_log WHERE event_key = $1")
                .bind(format!("redeliver:{}", req.redelivery_id))
                .fetch_optional(&pool)
                .await?;
        if let Some(d) = done {
            println!(
                "processed: verdict {}, task {}",
                d["verdict"].as_str().unwrap_or("?"),
                d["task_id"].as_str().unwrap_or("none")
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            println!("not processed yet (are workers running?); it stays queued");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
