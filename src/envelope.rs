//! What travels on the task subject, and how a message's identity is derived.
//!
//! - The gateway publishes an [`Envelope`] in MessagePack
//!   (`Content-Type: application/vnd.mahavishnu.envelope+msgpack`) on `mhv.tasks.submit`.
//! - Outside producers publish a bare [`TaskRequest`] as JSON (`application/json`, the default)
//!   or MessagePack (`application/msgpack`) on `mhv.tasks.create`, where envelopes are refused.
//!   See docs/producers.md.
//!
//! Identity: every message has a *ledger key*, from which the task id is derived
//! (`task_id = UUIDv5(namespace, key)`). The gateway computes the same id before publishing, so
//! it can answer `202` with a `Location` that holds, and a retried request gets the same id.
//! The ledger key is unique in PostgreSQL; that, not JetStream's short dedup window, is what
//! makes a message take effect once.

use crate::task::{NewTask, TaskRequest};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Media type of the internal envelope.
pub const CONTENT_TYPE_ENVELOPE: &str = "application/vnd.mahavishnu.envelope+msgpack";
/// Media type of a JSON task from an outside producer (also the default when absent).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Media type of a MessagePack task from an outside producer.
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";

/// Header names.
pub mod headers {
    /// JetStream's dedup id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Refuse the publish unless it lands in this stream.
    pub const EXPECTED_STREAM: &str = "Nats-Expected-Stream";
    /// Media type of the body.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Optional producer name for direct publishers (audited as `nats:<name>`).
    pub const PRODUCER: &str = "Mhv-Producer";
}

/// Namespace for task ids derived from ledger keys. Never change it: ids would change.
pub const TASK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d68_765f_7461_736b_8000_0000_0000_0001);

/// The internal message: who submitted what, and when the gateway accepted it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    /// Format version.
    pub v: u8,
    /// Authenticated principal (API key name).
    pub principal: String,
    /// When the gateway accepted the request; deadlines are validated against it.
    pub accepted_at: DateTime<Utc>,
    /// The request as the client sent it; workers validate it again.
    pub request: TaskRequest,
}

/// A decoded task message, whichever way it was published.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// Ledger key (unique in PostgreSQL).
    pub key: String,
    /// Who submitted it.
    pub principal: String,
    /// When it was accepted (gateway clock, or JetStream's store time for direct producers).
    pub accepted_at: DateTime<Utc>,
    /// The request.
    pub request: TaskRequest,
}

/// Why a message could not be decoded. Always permanent: the bytes will not change on redelivery.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The media type is not one we accept.
    #[error("unsupported Content-Type {0:?}; use application/json or application/msgpack")]
    UnsupportedMediaType(String),
    /// The bytes are not a valid body of that media type.
    #[error("malformed {kind} body: {detail}")]
    Malformed {
        /// json, msgpack or envelope.
        kind: &'static str,
        /// Decoder message (no payload bytes).
        detail: String,
    },
    /// The envelope has a version we do not understand.
    #[error("unsupported envelope version {0}")]
    Version(u8),
    /// `Nats-Msg-Id` is longer than [`MSG_ID_MAX`] bytes or holds control characters.
    #[error("Nats-Msg-Id must be 1 to 512 bytes without control characters")]
    BadMessageId,
    /// An envelope on the producers' subject, or a bare task on the gateway's.
    #[error("{0}")]
    WrongSubject(&'static str),
}

impl DecodeError {
    /// The catalog code for this failure.
    pub fn code(&self) -> crate::error::ErrorCode {
        match self {
            Self::UnsupportedMediaType(_) | Self::WrongSubject(_) => {
                crate::error::ErrorCode::UnsupportedMediaType
            }
            Self::Malformed { .. } | Self::Version(_) => crate::error::ErrorCode::MalformedBody,
            Self::BadMessageId => crate::error::ErrorCode::Validation,
        }
    }
}

/// Longest `Nats-Msg-Id` accepted from producers, in bytes.
pub const MSG_ID_MAX: usize = 512;

/// True for a `Nats-Msg-Id` we can key on: 1 to [`MSG_ID_MAX`] bytes, no control characters
/// (NUL cannot be stored in PostgreSQL text).
pub fn valid_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MSG_ID_MAX && !id.chars().any(char::is_control)
}

/// Ledger key of a direct producer's message:
/// - `nats:<Nats-Msg-Id>` when the id is valid;
/// - `badid:<sha256 of the id>` when it is not (the message is then dead-lettered, and a
///   redelivery still finds the same key);
/// - `seq:<stream>:<sequence>:<stored-at ns>` without an id. The store time makes the key
///   unique across a re-created stream, whose sequences start again at 1; redeliveries of one
///   stored message share it.
pub fn producer_key(
    msg_id: Option<&str>,
    (stream, seq): (&str, u64),
    stored_at: DateTime<Utc>,
) -> String {
    match msg_id.filter(|m| !m.is_empty()) {
        Some(id) if valid_msg_id(id) => format!("nats:{id}"),
        Some(id) => format!("badid:{}", hex::encode(Sha256::digest(id.as_bytes()))),
        None => format!(
            "seq:{stream}:{seq}:{}",
            stored_at.timestamp_nanos_opt().unwrap_or_default()
        ),
    }
}

/// Ledger key of a gateway submission: scoped to the caller, so two clients' keys cannot collide.
pub fn api_key_for(principal: &str, idempotency_key: &str) -> String {
    format!("api:{principal}:{idempotency_key}")
}

/// Task id for a ledger key.
pub fn task_id_for(key: &str) -> Uuid {
    Uuid::new_v5(&TASK_ID_NAMESPACE, key.as_bytes())
}

/// SHA-256 of the canonical form of a validated task, to tell a true retry from a reused key.
/// Canonical: MessagePack of the validated task (title sanitised, priority normalised, deadline
/// parsed, metadata keys sorted), so `"HIGH"` and `"high"` are the same request.
pub fn fingerprint(task: &NewTask) -> [u8; 32] {
    let bytes = rmp_serde::to_vec_named(task).unwrap_or_default();
    Sha256::digest(&bytes).into()
}

/// Encodes an envelope.
pub fn encode_envelope(env: &Envelope) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(env)
}

/// Decodes a message from one of the task subjects.
///
/// - `subject`: where it was published; envelopes are accepted only on `mhv.tasks.submit`.
/// - `content_type`: the `Content-Type` header, if any.
/// - `msg_id`: the `Nats-Msg-Id` header, if any.
/// - `producer`: the `Mhv-Producer` header, if any.
/// - `stream_ref`: `(stream, sequence)` of the message, the key of last resort.
/// - `stored_at`: when JetStream stored it.
pub fn decode(
    subject: &str,
    content_type: Option<&str>,
    msg_id: Option<&str>,
    producer: Option<&str>,
    stream_ref: (&str, u64),
    stored_at: DateTime<Utc>,
    body: &[u8],
) -> Result<Incoming, DecodeError> {
    let media = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned());
    let key = producer_key(msg_id, stream_ref, stored_at);
    let external_principal = || {
        let p: String = producer
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        if p.is_empty() {
            "nats".to_owned()
        } else {
            format!("nats:{p}")
        }
    };
    // A bare task from a producer, whichever format it came in.
    let external = |request: Result<TaskRequest, DecodeError>| {
        let request = request?;
        if msg_id.is_some_and(|m| !m.is_empty() && !valid_msg_id(m)) {
            return Err(DecodeError::BadMessageId);
        }
        Ok(Incoming {
            key: key.clone(),
            principal: external_principal(),
            accepted_at: stored_at,
            request,
        })
    };
    let on_submit = subject == crate::topology::SUBJECT_TASKS_SUBMIT;
    if on_submit != (media == CONTENT_TYPE_ENVELOPE) {
        return Err(DecodeError::WrongSubject(if on_submit {
            "mhv.tasks.submit accepts only the gateway's envelope; producers publish to mhv.tasks.create"
        } else {
            "the envelope media type is accepted only on mhv.tasks.submit; send application/json or application/msgpack"
        }));
    }
    match media.as_str() {
        CONTENT_TYPE_ENVELOPE => {
            let env: Envelope =
                rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed {
                    kind: "envelope",
                    detail: e.to_string(),
                })?;
            if env.v != 1 {
                return Err(DecodeError::Version(env.v));
            }
            // The gateway always sets Nats-Msg-Id to the ledger key; without it, fall back to
            // the stream position so that redeliveries still share a key.
            let key = match msg_id {
                Some(m) if m.starts_with("api:") && valid_msg_id(m) => m.to_owned(),
                _ => key,
            };
            Ok(Incoming {
                key,
                principal: env.principal,
                accepted_at: env.accepted_at,
                request: env.request,
            })
        }
        CONTENT_TYPE_JSON | "text/json" => {
            external(
                serde_json::from_slice(body).map_err(|e| DecodeError::Malformed {
                    kind: "json",
                    detail: e.to_string(),
                }),
            )
        }
        CONTENT_TYPE_MSGPACK | "application/x-msgpack" | "application/vnd.msgpack" => external(
            rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed {
                kind: "msgpack",
                detail: e.to_string(),
            }),
        ),
        other => Err(DecodeError::UnsupportedMediaType(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{SUBJECT_TASKS_CREATE as CREATE, SUBJECT_TASKS_SUBMIT as SUBMIT};
    use proptest::prelude::*;

    fn req() -> TaskRequest {
        TaskRequest {
            title: Some("t".into()),
            repository: Some("r".into()),
            ..Default::default()
        }
    }

    #[test]
    fn envelope_round_trips_and_keeps_the_gateway_key() {
        let env = Envelope {
            v: 1,
            principal: "ci".into(),
            accepted_at: Utc::now(),
            request: req(),
        };
        let bytes = encode_envelope(&env).unwrap();
        let key = api_key_for("ci", "k1");
        let inc = decode(
            SUBMIT,
            Some(CONTENT_TYPE_ENVELOPE),
            Some(&key),
            None,
            ("S", 9),
            Utc::now(),
            &bytes,
        )
        .unwrap();
        assert_eq!(inc.key, "api:ci:k1");
        assert_eq!(inc.principal, "ci");
        assert_eq!(inc.request, req());
        assert_eq!(task_id_for(&inc.key), task_id_for("api:ci:k1"));
    }

    #[test]
    fn external_producers_are_scoped_and_fall_back_to_stream_position() {
        let json = serde_json::to_vec(&req()).unwrap();
        let a = decode(
            CREATE,
            None,
            Some("x"),
            Some("etl"),
            ("S", 1),
            Utc::now(),
            &json,
        )
        .unwrap();
        assert_eq!(a.key, "nats:x");
        assert_eq!(a.principal, "nats:etl");
        let mp = rmp_serde::to_vec_named(&req()).unwrap();
        let stored = Utc::now();
        let b = decode(
            CREATE,
            Some("application/msgpack"),
            None,
            None,
            ("S", 7),
            stored,
            &mp,
        )
        .unwrap();
        assert!(b.key.starts_with("seq:S:7:"), "{}", b.key);
        let again = decode(
            CREATE,
            Some("application/msgpack"),
            None,
            None,
            ("S", 7),
            stored,
            &mp,
        )
        .unwrap();
        assert_eq!(b.key, again.key, "a redelivery shares the key");
        let recreated = decode(
            CREATE,
            Some("application/msgpack"),
            None,
            None,
            ("S", 7),
            stored + chrono::Duration::nanoseconds(1),
            &mp,
        )
        .unwrap();
        assert_ne!(
            b.key, recreated.key,
            "a re-created stream's seq 7 is another message"
        );
        // Ids that cannot be stored are refused, under a stable hashed key.
        for bad in ["a\0b", "tab\there", &"x".repeat(513)] {
            assert_eq!(
                decode(CREATE, None, Some(bad), None, ("S", 1), stored, &json),
                Err(DecodeError::BadMessageId)
            );
            assert!(producer_key(Some(bad), ("S", 1), stored).starts_with("badid:"));
        }
        // An outside producer cannot claim a gateway key.
        let c = decode(
            CREATE,
            None,
            Some("api:ci:k1"),
            None,
            ("S", 1),
            Utc::now(),
            &json,
        )
        .unwrap();
        assert_eq!(c.key, "nats:api:ci:k1");
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        assert!(matches!(
            decode(
                CREATE,
                Some("text/plain"),
                None,
                None,
                ("S", 1),
                Utc::now(),
                b"x"
            ),
            Err(DecodeError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            decode(CREATE, None, None, None, ("S", 1), Utc::now(), b"{"),
            Err(DecodeError::Malformed { kind: "json", .. })
        ));
        assert!(matches!(
            decode(
                CREATE,
                None,
                None,
                None,
                ("S", 1),
                Utc::now(),
                br#"{"titel":"x"}"#
            ),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn fingerprint_is_over_the_validated_task() {
        let limits = crate::task::Limits::default();
        let v = |r: &TaskRequest| crate::task::validate(r, &limits, Utc::now()).unwrap();
        let mut upper = req();
        upper.priority = Some("MEDIUM".into());
        assert_eq!(
            fingerprint(&v(&req())),
            fingerprint(&v(&upper)),
            "same request, other spelling"
        );
        let mut other = req();
        other.title = Some("u".into());
        assert_ne!(fingerprint(&v(&req())), fingerprint(&v(&other)));
    }

    #[test]
    fn envelopes_only_on_submit_and_bare_tasks_only_on_create() {
        let env = encode_envelope(&Envelope {
            v: 1,
            principal: "x".into(),
            accepted_at: Utc::now(),
            request: req(),
        })
        .unwrap();
        let forged = decode(
            CREATE,
            Some(CONTENT_TYPE_ENVELOPE),
            Some("api:admin:1"),
            None,
            ("S", 1),
            Utc::now(),
            &env,
        );
        assert!(
            matches!(forged, Err(DecodeError::WrongSubject(_))),
            "a producer cannot claim a principal"
        );
        let json = serde_json::to_vec(&req()).unwrap();
        assert!(matches!(
            decode(SUBMIT, None, None, None, ("S", 1), Utc::now(), &json),
            Err(DecodeError::WrongSubject(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(ct in proptest::option::of("[a-z/+.;= -]{0,40}"), body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(CREATE, ct.as_deref(), None, None, ("S", 1), Utc::now(), &body);
            let _ = decode(SUBMIT, Some(CONTENT_TYPE_ENVELOPE), Some("api:a:b"), None, ("S", 1), Utc::now(), &body);
            let _ = decode(CREATE, Some(CONTENT_TYPE_MSGPACK), None, None, ("S", 1), Utc::now(), &body);
        }
    }
}
