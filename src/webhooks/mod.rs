//! Webhook signature verification for the three sender schemes: GitHub, GitLab and Standard
//! Webhooks. Pure functions over the raw bytes and headers, run before any parsing, comparing in
//! constant time. They hold no state and do no I/O: replay protection (the delivery ledger) and
//! routing live with the endpoint that calls them.
//!
//! Every verifier takes the list of a source's active secrets and returns the id of the secret
//! that matched, so operators can see when an old secret stops being used during rotation.

pub mod verify;

pub use verify::{verify_github, verify_gitlab, verify_standard, Secret, VerifyError};
