//! The verifiers. Protocol facts are in docs/webhooks.md; the official test
//! vectors in the tests below.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// One active secret of a source.
#[derive(Clone)]
pub struct Secret {
    /// Operator-chosen id, reported on success (never the secret itself).
    pub id: String,
    /// The secret bytes. For Standard Webhooks, the base64-decoded key after `whsec_`.
    pub key: Vec<u8>,
    /// After this instant the secret no longer verifies anything.
    pub expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("id", &self.id)
            .field("key", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Secret {
    /// A Standard Webhooks secret from its `whsec_<base64>` form.
    pub fn standard(id: &str, whsec: &str, expires_at: Option<DateTime<Utc>>) -> Option<Self> {
        let b64 = whsec.strip_prefix("whsec_").unwrap_or(whsec);
        let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        (!key.is_empty()).then(|| Self {
            id: id.to_owned(),
            key,
            expires_at,
        })
    }

    fn active(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }
}

/// Why a delivery failed verification. Each maps to a distinct answer at the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but malformed.
    #[error("malformed header {0}")]
    MalformedHeader(&'static str),
    /// No active secret produced a matching signature.
    #[error("signature does not match any active secret")]
    BadSignature,
    /// The timestamp is outside the tolerance, in either direction.
    #[error("timestamp is {skew_secs} s away from now; the tolerance is {tolerance_secs} s")]
    TimestampOutOfTolerance {
        /// Signed distance from now (positive: in the future).
        skew_secs: i64,
        /// The configured tolerance.
        tolerance_secs: i64,
    },
    /// The source has no active secret at all.
    #[error("the source has no active secret")]
    NoActiveSecret,
}

fn active(secrets: &[Secret], now: DateTime<Utc>) -> Result<Vec<&Secret>, VerifyError> {
    let v: Vec<&Secret> = secrets.iter().filter(|s| s.active(now)).collect();
    if v.is_empty() {
        Err(VerifyError::NoActiveSecret)
    } else {
        Ok(v)
    }
}

/// GitHub: `X-Hub-Signature-256: sha256=<hex>` is HMAC-SHA256 of the raw body only.
/// Returns the id of the matching secret.
pub fn verify_github(
    secrets: &[Secret],
    signature_header: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<String, VerifyError> {
    const H: &str = "X-Hub-Signature-256";
    let header = signature_header.ok_or(VerifyError::MissingHeader(H))?;
    let hex_sig = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(VerifyError::MalformedHeader(H))?;
    let mut sig = [0u8; 32];
    hex::decode_to_slice(hex_sig, &mut sig).map_err(|_| VerifyError::MalformedHeader(H))?;
    for s in active(secrets, now)? {
        let Ok(mut mac) = HmacSha256::new_from_slice(&s.key) else {
            continue;
        };
        mac.update(body);
        // verify_slice compares in constant time and checks the length.
        if mac.verify_slice(&sig).is_ok() {
            return Ok(s.id.clone());
        }
    }
    Err(VerifyError::BadSignature)
}

/// GitLab: `X-Gitlab-Token` is the shared secret itself, compared in constant time.
pub fn verify_gitlab(
    secrets: &[Secret],
    token_header: Option<&str>,
    now: DateTime<Utc>,
) -> Result<String, VerifyError> {
    let token = token_header.ok_or(VerifyError::MissingHeader("X-Gitlab-Token"))?;
    let mut found = None;
    // Check every secret, so timing does not reveal which one matched.
    for s in active(secrets, now)? {
        if bool::from(s.key.as_slice().ct_eq(token.as_bytes())) && found.is_none() {
            found = Some(s.id.clone());
        }
    }
    found.ok_or(VerifyError::BadSignature)
}

/// Standard Webhooks: signed content `{id}.{timestamp}.{body}`, HMAC-SHA256, base64; the
/// `webhook-signature` header is a space-separated list of `v1,<sig>` entries, any one of which
/// may match. `v1a,` (ed25519) entries are ignored. The timestamp must lie within
/// `tolerance_secs` of `now`, in both directions (inclusive).
pub fn verify_standard(
    secrets: &[Secret],
    id: Option<&str>,
    timestamp: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    tolerance_secs: i64,
    now: DateTime<Utc>,
) -> Result<String, VerifyError> {
    let id = id.ok_or(VerifyError::MissingHeader("webhook-id"))?;
    let ts_raw = timestamp.ok_or(VerifyError::MissingHeader("webhook-timestamp"))?;
    let header = signature_header.ok_or(VerifyError::MissingHeader("webhook-signature"))?;
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(VerifyError::MalformedHeader("webhook-id"));
    }
    let ts: i64 = ts_raw
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedHeader("webhook-timestamp"))?;
    let skew = ts.saturating_sub(now.timestamp());
    if skew.unsigned_abs() > tolerance_secs.unsigned_abs() {
        return Err(VerifyError::TimestampOutOfTolerance {
            skew_secs: skew,
            tolerance_secs,
        });
    }
    // Decode every v1 signature; an entry that is not valid base64 of 32 bytes can never match.
    let candidates: Vec<[u8; 32]> = header
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .filter_map(|raw| <[u8; 32]>::try_from(raw.as_slice()).ok())
        .collect();
    if candidates.is_empty() {
        // Includes the bare `v1,` that once bypassed a reference verifier.
        return Err(VerifyError::BadSignature);
    }
    for s in active(secrets, now)? {
        let Ok(mut mac) = HmacSha256::new_from_slice(&s.key) else {
            continue;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts_raw.trim().as_bytes());
        mac.update(b".");
        mac.update(body);
        let expected = mac.finalize().into_bytes();
        if candidates
            .iter()
            .any(|c| bool::from(c.as_slice().ct_eq(expected.as_slice())))
        {
            return Ok(s.id.clone());
        }
    }
    Err(VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn github_secret() -> Vec<Secret> {
        vec![Secret {
            id: "gh-1".into(),
            key: b"It's a Secret to Everybody".to_vec(),
            expires_at: None,
        }]
    }
    const GITHUB_SIG: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn std_secret() -> Vec<Secret> {
        vec![Secret::standard("sw-1", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", None).unwrap()]
    }
    const STD_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const STD_TS: i64 = 1_649_367_553;
    const STD_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const STD_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn at(ts: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(ts, 0).unwrap()
    }

    fn flip_bit(v: &[u8], i: usize) -> Vec<u8> {
        let mut v = v.to_vec();
        let n = v.len();
        v[i % n] ^= 1;
        v
    }

    #[test]
    fn github_official_vector() {
        let now = Utc::now();
        assert_eq!(
            verify_github(&github_secret(), Some(GITHUB_SIG), b"Hello, World!", now).unwrap(),
            "gh-1"
        );
        for i in 0..13 {
            let body = flip_bit(b"Hello, World!", i);
            assert_eq!(
                verify_github(&github_secret(), Some(GITHUB_SIG), &body, now),
                Err(VerifyError::BadSignature)
            );
        }
        assert_eq!(
            verify_github(&github_secret(), None, b"x", now),
            Err(VerifyError::MissingHeader("X-Hub-Signature-256"))
        );
        for bad in ["sha1=abc", "sha256=zz", "sha256=", "sha256=757107"] {
            assert_eq!(
                verify_github(&github_secret(), Some(bad), b"Hello, World!", now),
                Err(VerifyError::MalformedHeader("X-Hub-Signature-256")),
                "{bad}"
            );
        }
    }

    #[test]
    fn standard_official_vector_and_one_bit_changes() {
        let now = at(STD_TS);
        let ts = STD_TS.to_string();
        let ok = |id: &str, ts: &str, body: &[u8], sig: &str| {
            verify_standard(&std_secret(), Some(id), Some(ts), Some(sig), body, 300, now)
        };
        assert_eq!(ok(STD_ID, &ts, STD_BODY, STD_SIG).unwrap(), "sw-1");
        // Any one match in a list passes (rotation).
        let list = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v1a,xyz {STD_SIG}");
        assert_eq!(ok(STD_ID, &ts, STD_BODY, &list).unwrap(), "sw-1");
        for i in 0..STD_BODY.len() {
            assert!(ok(STD_ID, &ts, &flip_bit(STD_BODY, i), STD_SIG).is_err());
        }
        for i in 0..STD_ID.len() {
            let id = String::from_utf8(flip_bit(STD_ID.as_bytes(), i)).unwrap();
            assert!(ok(&id, &ts, STD_BODY, STD_SIG).is_err(), "{id}");
        }
        let ts_flipped = (STD_TS ^ 1).to_string();
        assert_eq!(
            ok(STD_ID, &ts_flipped, STD_BODY, STD_SIG),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn bare_v1_prefix_is_refused() {
        let ts = STD_TS.to_string();
        for sig in ["v1,", "v1, v1,", "v1,=", "v1a,", ""] {
            assert_eq!(
                verify_standard(
                    &std_secret(),
                    Some(STD_ID),
                    Some(&ts),
                    Some(sig),
                    STD_BODY,
                    300,
                    at(STD_TS)
                ),
                Err(VerifyError::BadSignature),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn timestamp_tolerance_is_inclusive_both_ways() {
        let ts = STD_TS.to_string();
        let check = |now: i64| {
            verify_standard(
                &std_secret(),
                Some(STD_ID),
                Some(&ts),
                Some(STD_SIG),
                STD_BODY,
                300,
                at(now),
            )
        };
        assert!(check(STD_TS + 300).is_ok(), "exactly -tolerance");
        assert!(check(STD_TS - 300).is_ok(), "exactly +tolerance");
        assert_eq!(
            check(STD_TS + 301),
            Err(VerifyError::TimestampOutOfTolerance {
                skew_secs: -301,
                tolerance_secs: 300
            })
        );
        assert_eq!(
            check(STD_TS - 301),
            Err(VerifyError::TimestampOutOfTolerance {
                skew_secs: 301,
                tolerance_secs: 300
            })
        );
    }

    #[test]
    fn rotation_and_expiry() {
        let now = Utc::now();
        let old = Secret {
            id: "old".into(),
            key: b"old-secret".to_vec(),
            expires_at: Some(now + chrono::Duration::seconds(60)),
        };
        let new = Secret {
            id: "new".into(),
            key: b"new-secret".to_vec(),
            expires_at: None,
        };
        let sign = |key: &[u8]| {
            let mut m = HmacSha256::new_from_slice(key).unwrap();
            m.update(b"body");
            format!("sha256={}", hex::encode(m.finalize().into_bytes()))
        };
        let secrets = vec![old.clone(), new.clone()];
        assert_eq!(
            verify_github(&secrets, Some(&sign(b"old-secret")), b"body", now).unwrap(),
            "old"
        );
        assert_eq!(
            verify_github(&secrets, Some(&sign(b"new-secret")), b"body", now).unwrap(),
            "new"
        );
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(
            verify_github(&secrets, Some(&sign(b"old-secret")), b"body", later),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify_gitlab(&[old.clone(), new.clone()], Some("new-secret"), now).unwrap(),
            "new"
        );
        assert_eq!(
            verify_gitlab(&[old.clone(), new], Some("old-secret"), later),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify_gitlab(&[old], Some("old-secret"), later),
            Err(VerifyError::NoActiveSecret)
        );
    }

    #[test]
    fn gitlab_token_compares_whole_values() {
        let s = vec![Secret {
            id: "gl".into(),
            key: b"token-123".to_vec(),
            expires_at: None,
        }];
        let now = Utc::now();
        assert_eq!(verify_gitlab(&s, Some("token-123"), now).unwrap(), "gl");
        for bad in ["token-12", "token-1234", "", "TOKEN-123"] {
            assert_eq!(
                verify_gitlab(&s, Some(bad), now),
                Err(VerifyError::BadSignature),
                "{bad:?}"
            );
        }
        assert_eq!(
            verify_gitlab(&s, None, now),
            Err(VerifyError::MissingHeader("X-Gitlab-Token"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]
        #[test]
        fn verifiers_never_panic_and_never_accept_garbage(
            sig in ".{0,200}",
            id in proptest::option::of(".{0,80}"),
            ts in proptest::option::of("[-0-9 ]{0,25}"),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            tolerance in any::<i64>(),
        ) {
            let now = at(STD_TS);
            prop_assert!(verify_github(&github_secret(), Some(&sig), &body, now).is_err() || sig == GITHUB_SIG);
            let _ = verify_gitlab(&github_secret(), Some(&sig), now);
            let r = verify_standard(&std_secret(), id.as_deref(), ts.as_deref(), Some(&sig), &body, tolerance, now);
            prop_assert!(r.is_err() || sig.contains(STD_SIG));
        }
    }
}
