//! # Mahavishnu core
//!
//! What the gateway, the workers and the `mhv` CLI share:
//! - [`task`]: the task model and its validation;
//! - [`error`]: the `MHV-xxx` error catalog and its policy;
//! - [`config`]: layered, validated settings;
//! - [`envelope`]: what travels on NATS and how a message's identity is derived;
//! - [`topology`]: subject, stream and consumer names and their idempotent set-up;
//! - [`db`]: the PostgreSQL pool, migrator and cancellation rule;
//! - [`read_api`]: the request/reply contract of reads (gateway → workers over NATS);
//! - [`registry`]: the repository registry (what tasks may run) and execution settings;
//! - [`devstack`]: starting a local nats-server or PostgreSQL (for `mhv up` and tests);
//! - [`telemetry`]: tracing set-up;
//! - [`webhooks`]: signature verification for GitHub, GitLab and Standard Webhooks senders.
//!
//! The core does no HTTP serving and holds no long-running loops: those live in the gateway and
//! worker crates.

pub mod cli;
pub mod config;
pub mod db;
pub mod devstack;
pub mod envelope;
pub mod error;
pub mod read_api;
pub mod registry;
pub mod task;
pub mod telemetry;
pub mod topology;
pub mod webhooks;

pub use error::{ErrorBody, ErrorCode};
