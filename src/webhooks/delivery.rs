//! One delivery from its HTTP request to the message the workers read: header checks per
//! scheme, the verdict of verification, and the identities that make it take effect once.
//!
//! Identities (see docs/webhooks.md):
//! - JetStream `Nats-Msg-Id`: `wh:{source}:{delivery_id}:{generation}` ([`msg_id`]): the short
//!   first line of defence.
//! - The ledger (PostgreSQL `webhook_deliveries`, and its fast front in a JetStream KV bucket):
//!   unique on `(source, delivery_id)` with the body's SHA-256; for GitHub, whose delivery id is
//!   not signed, also unique on `(source, body_sha256)`.

use super::verify::{self, Secret, VerifyError};
use crate::config::{ConfigError, WebhookScheme, WebhookSource};
use crate::error::ErrorCode;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// Longest delivery id accepted.
pub const DELIVERY_ID_MAX: usize = 256;
/// Longest delivery id the ledger stores (a GitLab per-event id plus `:` and 16 hex characters
/// fits).
pub const LEDGER_ID_MAX: usize = 300;
/// Longest event name accepted.
pub const EVENT_MAX: usize = 100;

/// Headers of the internal delivery message (`mhv.webhooks.deliver`).
pub mod headers {
    /// Source name.
    pub const SOURCE: &str = "Mhv-Webhook-Source";
    /// The sender's delivery id.
    pub const DELIVERY: &str = "Mhv-Webhook-Delivery";
    /// Event name from the sender's header (empty for Standard Webhooks: it is in the body).
    pub const EVENT: &str = "Mhv-Webhook-Event";
    /// Id of the secret that verified the delivery.
    pub const SECRET_ID: &str = "Mhv-Webhook-Secret-Id";
    /// When the gateway received it (RFC 3339).
    pub const RECEIVED_AT: &str = "Mhv-Webhook-Received-At";
    /// Hex SHA-256 of the raw body.
    pub const BODY_SHA256: &str = "Mhv-Webhook-Body-Sha256";
    /// Body length in bytes.
    pub const BODY_SIZE: &str = "Mhv-Webhook-Body-Size";
    /// The request's Content-Type.
    pub const CONTENT_TYPE: &str = "Mhv-Webhook-Content-Type";
    /// Object name in the body bucket when the body was too large for a message.
    pub const CLAIM_CHECK: &str = "Mhv-Claim-Check";
    /// Tamper reports: hex SHA-256 of the body the ledger already holds for this id.
    pub const FIRST_SHA256: &str = "Mhv-Webhook-First-Sha256";
}

/// A source ready to verify: secrets resolved and decoded.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    /// Source name.
    pub name: String,
    /// Scheme.
    pub scheme: WebhookScheme,
    /// Secrets.
    pub secrets: Vec<Secret>,
    /// Body limit.
    pub body_limit_bytes: usize,
    /// Standard Webhooks timestamp tolerance.
    pub tolerance_secs: i64,
}

impl ResolvedSource {
    /// Resolves a configured source (reads `env` secrets).
    pub fn resolve(name: &str, src: &WebhookSource) -> Result<Self, ConfigError> {
        let mut secrets = Vec::with_capacity(src.secrets.len());
        for s in &src.secrets {
            let value = s.value()?;
            let secret = match src.scheme {
                WebhookScheme::Standard => Secret::standard(&s.id, &value, s.expires_at)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "webhooks.sources.{name}.secrets {:?}: a Standard Webhooks secret is whsec_ followed by base64",
                            s.id
                        ))
                    })?,
                WebhookScheme::Github | WebhookScheme::Gitlab => Secret {
                    id: s.id.clone(),
                    key: value.into_bytes(),
                    expires_at: s.expires_at,
                },
            };
            secrets.push(secret);
        }
        Ok(Self {
            name: name.to_owned(),
            scheme: src.scheme,
            secrets,
            body_limit_bytes: src.body_limit_bytes,
            tolerance_secs: i64::try_from(src.tolerance_secs).unwrap_or(i64::MAX),
        })
    }

    /// True when the ledger also deduplicates on the body hash (the delivery id is unsigned).
    pub fn dedup_by_body(&self) -> bool {
        dedup_by_body(self.scheme)
    }
}

/// GitHub signs only the body: the same signed body under a new delivery id is a replay.
pub const fn dedup_by_body(scheme: WebhookScheme) -> bool {
    matches!(scheme, WebhookScheme::Github)
}

/// A delivery that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The sender's delivery id.
    pub delivery_id: String,
    /// The event name from the headers (empty for Standard Webhooks).
    pub event: String,
    /// Which secret matched.
    pub secret_id: String,
    /// True when the id names an event rather than one delivery (GitLab before 17.4 sends no
    /// `Idempotency-Key`; its `X-Gitlab-Event-UUID` is shared by hooks the event triggers), so
    /// the endpoint qualifies it with the body's hash ([`Verified::qualify`]).
    pub per_event_id: bool,
}

impl Verified {
    /// Makes a per-event id a per-delivery one: `{id}:{first 16 hex of the body's SHA-256}`.
    pub fn qualify(&mut self, body_sha256_hex: &str) {
        if self.per_event_id {
            self.delivery_id = format!(
                "{}:{}",
                self.delivery_id,
                body_sha256_hex.get(..16).unwrap_or(body_sha256_hex)
            );
            self.per_event_id = false;
        }
    }
}

/// Why a delivery was refused: an error code and a message safe to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// MHV-300, MHV-304 or MHV-306.
    pub code: ErrorCode,
    /// For the sender.
    pub message: String,
    /// Metric label.
    pub outcome: &'static str,
}

impl Rejection {
    fn header(message: String) -> Self {
        Self {
            code: ErrorCode::WebhookHeaderInvalid,
            message,
            outcome: "bad_header",
        }
    }
}

/// Checks the headers a scheme requires and verifies the signature over the raw body, before
/// any parsing. `get` reads a request header (case-insensitive; `None` when absent or not
/// visible ASCII).
pub fn check<'h>(
    src: &ResolvedSource,
    get: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Verified, Rejection> {
    // GitLab 17.4+ sends `Idempotency-Key`, the same across retries of one delivery.
    let gitlab_id = if get("Idempotency-Key").is_some() {
        "Idempotency-Key"
    } else {
        "X-Gitlab-Event-UUID"
    };
    let (id_header, event_header) = match src.scheme {
        WebhookScheme::Github => ("X-GitHub-Delivery", Some("X-GitHub-Event")),
        WebhookScheme::Gitlab => (gitlab_id, Some("X-Gitlab-Event")),
        WebhookScheme::Standard => ("webhook-id", None),
    };
    // The signature first: an unsigned request learns nothing about the other headers.
    let secret_id = match src.scheme {
        WebhookScheme::Github => {
            verify::verify_github(&src.secrets, get("X-Hub-Signature-256"), body, now)
        }
        WebhookScheme::Gitlab => verify::verify_gitlab(&src.secrets, get("X-Gitlab-Token"), now),
        WebhookScheme::Standard => verify::verify_standard(
            &src.secrets,
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
            body,
            src.tolerance_secs,
            now,
        ),
    }
    .map_err(|e| rejection(src, e))?;
    let delivery_id = get(id_header).unwrap_or_default();
    if delivery_id.is_empty()
        || delivery_id.len() > DELIVERY_ID_MAX
        || !delivery_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Rejection::header(format!(
            "{id_header} must be 1 to {DELIVERY_ID_MAX} visible ASCII characters"
        )));
    }
    let event = match event_header {
        None => String::new(),
        Some(h) => {
            let e = get(h).unwrap_or_default().trim();
            if e.is_empty()
                || e.len() > EVENT_MAX
                || !e.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            {
                return Err(Rejection::header(format!(
                    "{h} must be 1 to {EVENT_MAX} printable ASCII characters"
                )));
            }
            e.to_owned()
        }
    };
    Ok(Verified {
        delivery_id: delivery_id.to_owned(),
        event,
        secret_id,
        per_event_id: id_header == "X-Gitlab-Event-UUID",
    })
}

fn rejection(src: &ResolvedSource, e: VerifyError) -> Rejection {
    match e {
        VerifyError::TimestampOutOfTolerance {
            skew_secs,
            tolerance_secs,
        } => Rejection {
            code: ErrorCode::WebhookTimestampOutOfTolerance,
            message: format!(
                "webhook-timestamp is {skew_secs} s from the receiver's clock; at most {tolerance_secs} s either way is accepted"
            ),
            outcome: "bad_timestamp",
        },
        // A timestamp that is not a number is a malformed header, not a bad signature.
        VerifyError::MalformedHeader(h @ ("webhook-timestamp" | "webhook-id")) => {
            Rejection::header(format!("{h} is malformed"))
        }
        VerifyError::MissingHeader(h @ ("webhook-timestamp" | "webhook-id")) => {
            Rejection::header(format!("{h} is missing"))
        }
        VerifyError::NoActiveSecret => {
            tracing::error!(source = %src.name, "every secret of this webhook source has expired; refusing all deliveries");
            Rejection {
                code: ErrorCode::WebhookSignatureInvalid,
                message: "the signature does not match an active secret of this source".into(),
                outcome: "bad_signature",
            }
        }
        VerifyError::MissingHeader(h) => Rejection {
            code: ErrorCode::WebhookSignatureInvalid,
            message: format!("the signature header {h} is missing"),
            outcome: "bad_signature",
        },
        VerifyError::MalformedHeader(h) => Rejection {
            code: ErrorCode::WebhookSignatureInvalid,
            message: format!("the signature header {h} is malformed"),
            outcome: "bad_signature",
        },
        VerifyError::BadSignature => Rejection {
            code: ErrorCode::WebhookSignatureInvalid,
            message: "the signature does not match an active secret of this source".into(),
            outcome: "bad_signature",
        },
    }
}

/// The body of a forced redelivery request (`mhv webhooks redeliver`), JSON on
/// `mhv.webhooks.redeliver`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RedeliverRequest {
    /// Source name.
    pub source: String,
    /// Delivery id of the stored delivery.
    pub delivery_id: String,
    /// Unique per request: a request handled twice has one effect.
    pub redelivery_id: uuid::Uuid,
    /// Who asked (audited).
    pub actor: String,
    /// Why (audited).
    pub reason: String,
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// JetStream `Nats-Msg-Id` of a delivery: `wh:{source}:{delivery_id}:{generation}`, the
/// generation being the revision of the delivery id's key in the ledger front. Copies of one
/// delivery share it; a delivery the front forgot after a dead letter gets a new one, so that
/// JetStream's duplicate window does not swallow its redelivery. Without a known generation
/// (the front entry expired mid-request) it is `wh:{source}:{delivery_id}`.
pub fn msg_id(source: &str, delivery_id: &str, generation: Option<u64>) -> String {
    match generation {
        Some(g) => format!("wh:{source}:{delivery_id}:{g}"),
        None => format!("wh:{source}:{delivery_id}"),
    }
}

/// Ledger key of the task a delivery makes (the `inbox` key; the task id derives from it).
pub fn task_key(source: &str, delivery_id: &str) -> String {
    format!("wh:{source}:{delivery_id}")
}

/// KV key guarding a delivery id (ids may hold characters KV keys cannot, so they are hashed).
pub fn kv_id_key(source: &str, delivery_id: &str) -> String {
    format!("{source}.id.{}", sha256_hex(delivery_id.as_bytes()))
}

/// KV key guarding a body (sources that deduplicate on the body).
pub fn kv_body_key(source: &str, body_sha256_hex: &str) -> String {
    format!("{source}.body.{body_sha256_hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn source(scheme: WebhookScheme) -> ResolvedSource {
        let secrets = match scheme {
            WebhookScheme::Standard => {
                vec![
                    Secret::standard("s1", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", None).unwrap(),
                ]
            }
            _ => vec![Secret {
                id: "s1".into(),
                key: b"It's a Secret to Everybody".to_vec(),
                expires_at: None,
            }],
        };
        ResolvedSource {
            name: "src".into(),
            scheme,
            secrets,
            body_limit_bytes: 1 << 20,
            tolerance_secs: 300,
        }
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
    }

    #[test]
    fn github_needs_signature_then_delivery_and_event() {
        let src = source(WebhookScheme::Github);
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let ok = check(
            &src,
            headers(&[
                ("X-Hub-Signature-256", sig),
                ("X-GitHub-Delivery", "d-1"),
                ("X-GitHub-Event", "issues"),
            ]),
            b"Hello, World!",
            Utc::now(),
        )
        .unwrap();
        assert_eq!(
            (ok.delivery_id.as_str(), ok.secret_id.as_str()),
            ("d-1", "s1")
        );
        let missing_sig = check(
            &src,
            headers(&[("X-GitHub-Delivery", "d-1")]),
            b"x",
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(missing_sig.code, ErrorCode::WebhookSignatureInvalid);
        let no_delivery = check(
            &src,
            headers(&[("X-Hub-Signature-256", sig), ("X-GitHub-Event", "issues")]),
            b"Hello, World!",
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(no_delivery.code, ErrorCode::WebhookHeaderInvalid);
    }

    #[test]
    fn standard_timestamp_problems_have_their_own_codes() {
        let src = source(WebhookScheme::Standard);
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let h = [
            ("webhook-id", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
            ("webhook-timestamp", "1649367553"),
            (
                "webhook-signature",
                "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            ),
        ];
        let at = DateTime::from_timestamp(1_649_367_553 + 301, 0).unwrap();
        assert_eq!(
            check(&src, headers(&h), body, at).unwrap_err().code,
            ErrorCode::WebhookTimestampOutOfTolerance
        );
        let at = DateTime::from_timestamp(1_649_367_553 + 300, 0).unwrap();
        assert_eq!(check(&src, headers(&h), body, at).unwrap().event, "");
        let bad_ts = [h[0], ("webhook-timestamp", "soon"), h[2]];
        assert_eq!(
            check(&src, headers(&bad_ts), body, at).unwrap_err().code,
            ErrorCode::WebhookHeaderInvalid
        );
    }

    #[test]
    fn gitlab_prefers_the_idempotency_key_and_qualifies_the_event_uuid() {
        let src = ResolvedSource {
            secrets: vec![Secret {
                id: "gl".into(),
                key: b"tok".to_vec(),
                expires_at: None,
            }],
            ..source(WebhookScheme::Gitlab)
        };
        let base = [
            ("X-Gitlab-Token", "tok"),
            ("X-Gitlab-Event-UUID", "ev-1"),
            ("X-Gitlab-Event", "Push Hook"),
        ];
        let mut v = check(&src, headers(&base), b"", Utc::now()).unwrap();
        assert!(v.per_event_id);
        v.qualify("0123456789abcdef0123");
        assert_eq!(v.delivery_id, "ev-1:0123456789abcdef");
        let with_key = [base[0], base[1], base[2], ("Idempotency-Key", "idem-9")];
        let mut v = check(&src, headers(&with_key), b"", Utc::now()).unwrap();
        v.qualify("0123456789abcdef0123");
        assert_eq!(v.delivery_id, "idem-9", "the retry-stable id is used as is");
        let wrong = [("X-Gitlab-Token", "nope"), base[1], base[2]];
        assert_eq!(
            check(&src, headers(&wrong), b"", Utc::now())
                .unwrap_err()
                .code,
            ErrorCode::WebhookSignatureInvalid
        );
    }

    proptest! {
        #[test]
        fn header_checks_never_panic(
            sig in ".{0,80}", id in ".{0,220}", ev in ".{0,120}", ts in ".{0,24}",
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            for scheme in [WebhookScheme::Github, WebhookScheme::Gitlab, WebhookScheme::Standard] {
                let src = source(scheme);
                let h = [
                    ("X-Hub-Signature-256", sig.as_str()), ("X-GitHub-Delivery", id.as_str()),
                    ("X-GitHub-Event", ev.as_str()), ("X-Gitlab-Token", sig.as_str()),
                    ("X-Gitlab-Event-UUID", id.as_str()), ("X-Gitlab-Event", ev.as_str()),
                    ("webhook-id", id.as_str()), ("webhook-timestamp", ts.as_str()),
                    ("webhook-signature", sig.as_str()),
                ];
                let r = check(&src, headers(&h), &body, Utc::now());
                // Random input never verifies (the GitLab token is the secret itself).
                prop_assert!(r.is_err() || sig == "It's a Secret to Everybody");
            }
        }
    }
}
