//! Subject, stream, consumer and service names, and the idempotent set-up of JetStream.
//!
//! Every process calls [`ensure`] at start-up; whichever starts first creates the stream and
//! the consumer, later ones update them to the configured settings (create-or-update is
//! idempotent on the server).

use crate::config::NatsSettings;
use async_nats::jetstream::{self, consumer, stream};
use std::time::Duration;

/// Subject for direct producers: a bare task as JSON or MessagePack.
pub const SUBJECT_TASKS_CREATE: &str = "mhv.tasks.create";
/// Subject for the gateway's envelopes. Separate from [`SUBJECT_TASKS_CREATE`] so that NATS
/// permissions can let only the gateway publish here: the envelope names the principal, and
/// whoever can publish an envelope can claim any principal.
pub const SUBJECT_TASKS_SUBMIT: &str = "mhv.tasks.submit";
/// Subject for verified webhook deliveries (gateway only: the headers name the source and the
/// secret that verified it).
pub const SUBJECT_WEBHOOK_DELIVER: &str = "mhv.webhooks.deliver";
/// Subject for the gateway's reports of refused, tampered deliveries (audited by workers).
pub const SUBJECT_WEBHOOK_TAMPERED: &str = "mhv.webhooks.tampered";
/// Subject for operator-forced redeliveries of a stored delivery (`mhv webhooks redeliver`).
pub const SUBJECT_WEBHOOK_REDELIVER: &str = "mhv.webhooks.redeliver";
/// Subjects the task stream captures: exactly those its consumer reads. A wildcard would store
/// stray publishes (`mhv.tasks.typo`) in a work-queue stream that nothing ever drains.
pub const STREAM_SUBJECTS: [&str; 5] = [
    SUBJECT_TASKS_CREATE,
    SUBJECT_TASKS_SUBMIT,
    SUBJECT_WEBHOOK_DELIVER,
    SUBJECT_WEBHOOK_TAMPERED,
    SUBJECT_WEBHOOK_REDELIVER,
];
/// Name of the NATS service (micro) the workers expose for reads.
pub const READ_SERVICE_NAME: &str = "mhv-tasks";
/// Queue group of the read service: every worker replica joins it.
pub const READ_QUEUE_GROUP: &str = "mhv-workers";
/// Request subject: get one task by id (payload: the id as text).
pub const SUBJECT_READ_TASK: &str = "mhv.api.tasks.get";
/// Request subject: execution attempts of one task (payload: the id as text).
pub const SUBJECT_READ_RUNS: &str = "mhv.api.tasks.runs";
/// Request subject: audit log of one task (payload: the id as text).
pub const SUBJECT_READ_AUDIT: &str = "mhv.api.tasks.audit";

/// Execution requests: `mhv.exec.{repository}`, payload [`ExecRequest`] as JSON.
pub const SUBJECT_EXEC_PREFIX: &str = "mhv.exec";
/// Cancellation broadcasts (core NATS, not stored): `mhv.control.cancel.{task id}`. Every worker
/// listens; the one running the task stops it.
pub const SUBJECT_CANCEL_PREFIX: &str = "mhv.control.cancel";
/// Request subject: cancel a task (payload [`crate::read_api::CancelRequest`]); answered by a
/// worker (queue group [`READ_QUEUE_GROUP`]).
pub const SUBJECT_TASK_CANCEL: &str = "mhv.api.tasks.cancel";

/// An execution request: run this task (what it runs is read from the database and the
/// registry, never from the message).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// The task.
    pub task_id: uuid::Uuid,
}

/// The subject of a repository's execution requests.
pub fn exec_subject(repository: &str) -> String {
    format!("{SUBJECT_EXEC_PREFIX}.{repository}")
}

/// The execution stream: a work queue of [`ExecRequest`]s.
pub fn exec_stream_config(
    n: &NatsSettings,
    e: &crate::registry::ExecutionSettings,
) -> stream::Config {
    stream::Config {
        name: e.stream.clone(),
        description: Some("Mahavishnu execution requests (one per task run)".into()),
        subjects: vec![format!("{SUBJECT_EXEC_PREFIX}.*")],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_bytes: n.stream.max_bytes,
        max_message_size: 4096,
        num_replicas: n.stream.replicas,
        duplicate_window: Duration::from_secs(n.stream.duplicate_window_secs),
        ..Default::default()
    }
}

/// The executors' durable pull consumer. Attempts are counted in PostgreSQL (`task_runs`), not
/// by JetStream deliveries: waiting for a repository slot or for a paused owner NAKs the request
/// without spending an attempt, so deliveries are unlimited.
pub fn exec_consumer_config(e: &crate::registry::ExecutionSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(e.consumer.clone()),
        description: Some("Mahavishnu workers: execute tasks".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(e.ack_wait_secs),
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Creates the execution stream if it is missing, touching nothing else (the CLI: an operator's
/// settings must not overwrite the workers' stream or consumer).
pub async fn ensure_exec_stream_exists(
    js: &jetstream::Context,
    s: &crate::config::Settings,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if js.get_stream(&s.execution.stream).await.is_ok() {
        return Ok(());
    }
    js.get_or_create_stream(exec_stream_config(&s.nats, &s.execution))
        .await
        .with_context(|| format!("creating stream {}", s.execution.stream))?;
    Ok(())
}

/// Creates or updates the execution stream and its consumer.
pub async fn ensure_exec(
    js: &jetstream::Context,
    s: &crate::config::Settings,
) -> anyhow::Result<consumer::PullConsumer> {
    use anyhow::Context as _;
    let e = &s.execution;
    js.create_or_update_stream(exec_stream_config(&s.nats, e))
        .await
        .with_context(|| format!("creating or updating stream {}", e.stream))?;
    js.create_consumer_on_stream(exec_consumer_config(e), &e.stream)
        .await
        .with_context(|| format!("creating or updating consumer {}", e.consumer))
}

/// The stream that captures JetStream's MAX_DELIVERIES advisories for the task stream's
/// consumer (advisories are fire-and-forget: without a stream capturing them they are lost).
pub fn advisory_stream_config(n: &NatsSettings) -> stream::Config {
    stream::Config {
        name: format!("{}_ADVISORIES", n.stream.name),
        description: Some("MAX_DELIVERIES advisories of the Mahavishnu task consumer".into()),
        subjects: vec![format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            n.stream.name, n.consumer.durable_name
        )],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: n.stream.replicas,
        max_age: Duration::from_secs(30 * 86_400),
        ..Default::default()
    }
}

/// A MAX_DELIVERIES advisory (the fields Mahavishnu reads).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MaxDeliveriesAdvisory {
    /// Stream of the message.
    pub stream: String,
    /// Consumer that gave up.
    pub consumer: String,
    /// Sequence of the message in the stream.
    pub stream_seq: u64,
    /// Deliveries made.
    pub deliveries: u64,
}

/// Stream configuration from settings.
pub fn stream_config(n: &NatsSettings) -> stream::Config {
    stream::Config {
        name: n.stream.name.clone(),
        description: Some("Mahavishnu tasks awaiting persistence and execution".into()),
        subjects: STREAM_SUBJECTS.iter().map(|s| (*s).to_owned()).collect(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Refuse new messages when full (the gateway answers 503) instead of discarding old,
        // unprocessed tasks.
        discard: stream::DiscardPolicy::New,
        max_bytes: n.stream.max_bytes,
        max_message_size: n.stream.max_message_bytes,
        num_replicas: n.stream.replicas,
        duplicate_window: Duration::from_secs(n.stream.duplicate_window_secs),
        ..Default::default()
    }
}

/// The workers' durable pull consumer configuration.
pub fn consumer_config(n: &NatsSettings) -> consumer::pull::Config {
    let c = &n.consumer;
    consumer::pull::Config {
        durable_name: Some(c.durable_name.clone()),
        description: Some("Mahavishnu workers: persist and audit tasks".into()),
        filter_subjects: STREAM_SUBJECTS.iter().map(|s| (*s).to_owned()).collect(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(c.ack_wait_secs),
        max_deliver: c.max_deliver,
        backoff: c
            .backoff_secs
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        max_ack_pending: c.max_ack_pending,
        ..Default::default()
    }
}

/// Creates or updates the stream only. The gateway calls this: it must not overwrite the
/// consumer settings the workers are tuned with.
pub async fn ensure_stream(js: &jetstream::Context, n: &NatsSettings) -> anyhow::Result<()> {
    use anyhow::Context as _;
    js.create_or_update_stream(stream_config(n))
        .await
        .with_context(|| format!("creating or updating stream {}", n.stream.name))?;
    Ok(())
}

/// Creates or updates the stream and the consumer (workers). Safe to call from every process
/// at once.
pub async fn ensure(
    js: &jetstream::Context,
    n: &NatsSettings,
) -> anyhow::Result<consumer::PullConsumer> {
    use anyhow::Context as _;
    js.create_or_update_stream(stream_config(n))
        .await
        .with_context(|| format!("creating or updating stream {}", n.stream.name))?;
    let consumer = js
        .create_consumer_on_stream(consumer_config(n), &n.stream.name)
        .await
        .with_context(|| format!("creating or updating consumer {}", n.consumer.durable_name))?;
    Ok(consumer)
}

/// The webhook stores: the ledger's KV front and the claim-check body bucket. Opened if they
/// exist, created otherwise; safe to call from every process at once.
pub async fn webhook_stores(
    js: &jetstream::Context,
    s: &crate::config::Settings,
) -> anyhow::Result<(jetstream::kv::Store, jetstream::object_store::ObjectStore)> {
    use anyhow::Context as _;
    let w = &s.webhooks;
    // Create-or-update: a changed retention reaches an existing bucket.
    let kv = js
        .create_or_update_key_value(jetstream::kv::Config {
            bucket: w.ledger_bucket.clone(),
            description: "Mahavishnu webhook ledger front: delivery id -> body hash".into(),
            history: 1,
            max_age: Duration::from_secs(u64::from(w.ledger_retention_days) * 86_400),
            num_replicas: s.nats.stream.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating or updating KV bucket {}", w.ledger_bucket))?;
    let objects = match js.get_object_store(&w.body_bucket).await {
        Ok(o) => o,
        Err(_) => match js
            .create_object_store(jetstream::object_store::Config {
                bucket: w.body_bucket.clone(),
                description: Some("Mahavishnu claim-checked webhook bodies".into()),
                max_age: Duration::from_secs(w.claim_check_max_age_hours * 3_600),
                max_bytes: w.body_bucket_max_bytes,
                num_replicas: s.nats.stream.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(o) => o,
            // Another process created it between our get and create.
            Err(e) => js
                .get_object_store(&w.body_bucket)
                .await
                .map_err(|_| e)
                .with_context(|| format!("creating object store {}", w.body_bucket))?,
        },
    };
    // The object store has no update call: bring its stream's limits up to the settings.
    let max_age = Duration::from_secs(w.claim_check_max_age_hours * 3_600);
    let mut obj_stream = js
        .get_stream(format!("OBJ_{}", w.body_bucket))
        .await
        .with_context(|| format!("reading object store {}", w.body_bucket))?;
    let mut config = obj_stream.info().await?.config.clone();
    if config.max_age != max_age || config.max_bytes != w.body_bucket_max_bytes {
        config.max_age = max_age;
        config.max_bytes = w.body_bucket_max_bytes;
        js.update_stream(config)
            .await
            .with_context(|| format!("updating object store {}", w.body_bucket))?;
    }
    Ok((kv, objects))
}

/// Names of the streams behind the webhook buckets (to check that they still exist).
pub fn webhook_store_streams(s: &crate::config::Settings) -> [String; 2] {
    [
        format!("KV_{}", s.webhooks.ledger_bucket),
        format!("OBJ_{}", s.webhooks.body_bucket),
    ]
}

/// Connects to NATS with the options every Mahavishnu process uses: a name, retries on the
/// initial connect and unlimited reconnects.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    use anyhow::Context as _;
    let addrs = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("nats.url {url:?} is not a comma-separated list of NATS URLs"))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None)
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to NATS at {}", crate::config::redact_url(url)))
}
