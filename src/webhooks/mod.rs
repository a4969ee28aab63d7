//! Webhook ingestion for the three sender schemes: GitHub, GitLab and Standard Webhooks.
//!
//! - [`verify`]: signature verification, pure functions over the raw bytes and headers, run
//!   before any parsing, comparing in constant time. Every verifier takes the source's active
//!   secrets and returns the id of the one that matched, so operators see when an old secret
//!   stops being used during a rotation.
//! - [`delivery`]: per-scheme header checks, and the identities (message id, ledger keys) that
//!   make a delivery take effect once.
//! - [`route`]: routing rules from (event, action, label, branch) to a task template.
//!
//! The gateway's endpoint and the workers' ledger use these; docs/webhooks.md describes the whole.

pub mod delivery;
pub mod route;
pub mod verify;

pub use delivery::{check, ResolvedSource, Verified};
pub use verify::{verify_github, verify_gitlab, verify_standard, Secret, VerifyError};
