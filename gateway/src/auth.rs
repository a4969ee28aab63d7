//! API-key authentication. Configuration holds only SHA-256 hashes of keys; a presented key is
//! hashed and looked up. Looking up a hash leaks nothing useful about the key, so no
//! constant-time comparison is needed past the hash.

use crate::error::ApiError;
use axum::http::HeaderMap;
use mahavishnu::config::ApiKeySettings;
use mahavishnu::ErrorCode;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// Known keys, by hash.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], String>,
}

impl ApiKeys {
    /// Builds the table; the settings were validated at start-up.
    pub fn new(keys: &[ApiKeySettings]) -> Self {
        let by_hash = keys
            .iter()
            .filter_map(|k| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&k.sha256, &mut h).ok()?;
                Some((h, k.name.clone()))
            })
            .collect();
        Self { by_hash }
    }

    /// Authenticates `Authorization: Bearer <key>`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Authentication, "missing Authorization header")
            })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Authentication,
                    "Authorization must be `Bearer <api key>`",
                )
            })?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash
            .get(&hash)
            .map(|name| Principal(name.clone()))
            .ok_or_else(|| ApiError::new(ErrorCode::Authentication, "unknown API key"))
    }
}

pub use mahavishnu::config::hash_api_key as hash_key;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_keys_are_checked_by_hash() {
        let keys = ApiKeys::new(&[ApiKeySettings {
            name: "ci".into(),
            sha256: hash_key("s3cret"),
        }]);
        let mut h = HeaderMap::new();
        assert_eq!(keys.authenticate(&h).unwrap_err().code(), "MHV-004");
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        assert_eq!(keys.authenticate(&h).unwrap(), Principal("ci".into()));
        h.insert("authorization", HeaderValue::from_static("bearer s3cret"));
        assert!(keys.authenticate(&h).is_ok());
        for bad in ["Bearer s3cre", "Basic s3cret", "Bearer ", "s3cret"] {
            h.insert("authorization", HeaderValue::from_static(bad));
            assert_eq!(
                keys.authenticate(&h).unwrap_err().code(),
                "MHV-004",
                "{bad}"
            );
        }
    }
}
