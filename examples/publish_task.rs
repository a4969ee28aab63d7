//! Publishes one task straight to the `mhv.tasks.create` subject, as an outside producer would,
//! and waits for JetStream's acknowledgement. See docs/producers.md.
//!
//! ```sh
//! cargo run --example publish_task -- --nats-url nats://127.0.0.1:4222 \
//!     --msg-id nightly-1 --title "Nightly build" --repository core
//! ```

use clap::Parser;

/// Publish one task to Mahavishnu over NATS.
#[derive(Parser, Debug)]
struct Args {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// `Nats-Msg-Id`: the same id is one task, however often it is published.
    #[arg(long)]
    msg_id: String,
    /// Task title.
    #[arg(long)]
    title: String,
    /// Repository name.
    #[arg(long)]
    repository: String,
    /// Send MessagePack instead of JSON.
    #[arg(long)]
    msgpack: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let task = mahavishnu::task::TaskRequest {
        title: Some(args.title),
        repository: Some(args.repository),
        ..Default::default()
    };
    let (content_type, body) = if args.msgpack {
        ("application/msgpack", rmp_serde::to_vec_named(&task)?)
    } else {
        ("application/json", serde_json::to_vec(&task)?)
    };
    let client = async_nats::connect(&args.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", args.msg_id.as_str());
    headers.insert("Content-Type", content_type);
    headers.insert("Mhv-Producer", "publish_task-example");
    let ack = js
        .publish_with_headers(
            mahavishnu::topology::SUBJECT_TASKS_CREATE,
            headers,
            body.into(),
        )
        .await?
        .await?;
    let task_id = mahavishnu::envelope::task_id_for(&format!("nats:{}", args.msg_id));
    println!(
        "queued: stream {} seq {} duplicate {} → task id {task_id}",
        ack.stream, ack.sequence, ack.duplicate
    );
    Ok(())
}
