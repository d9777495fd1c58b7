//! API keys: generation, hashing and verification. A key is 256 random bits
//! shown once; the store keeps only its SHA-256. Keys are high-entropy, so a
//! plain (unsalted) hash is enough to make a leaked database useless, and it
//! lets a key be found by an indexed lookup.

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{ApiKey, Store, StoreError};

/// Prefix that makes our keys recognisable in logs and secret scanners.
const KEY_PREFIX: &str = "osk_";

/// A freshly generated key: the secret (to show once) and its hash (to store).
pub struct GeneratedKey {
    pub secret: String,
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing x-api-key header")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("this call needs an admin API key")]
    NotAdmin,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn generate_key() -> GeneratedKey {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    let hash = hash_key(&secret);
    GeneratedKey { secret, hash }
}

pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Resolves the key presented in a request to its active record.
pub async fn authenticate(store: &Store, presented: Option<&str>) -> Result<ApiKey, AuthError> {
    let presented = presented.ok_or(AuthError::Missing)?;
    // Malformed keys are refused without touching the store.
    if !looks_like_key(presented) {
        return Err(AuthError::Invalid);
    }
    let hash = hash_key(presented);
    let (key, stored_hash) = store
        .find_key_by_hash(&hash)
        .await?
        .ok_or(AuthError::Invalid)?;
    // The lookup already matched; the constant-time comparison keeps the final
    // decision free of early exits should the lookup ever become a prefix scan.
    if bool::from(stored_hash.as_bytes().ct_eq(hash.as_bytes())) {
        Ok(key)
    } else {
        Err(AuthError::Invalid)
    }
}

fn looks_like_key(presented: &str) -> bool {
    presented
        .strip_prefix(KEY_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_and_hashed() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_key(&a.secret));
        assert_eq!(a.hash, hash_key(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(!a.hash.contains(&a.secret[4..]));
    }

    #[test]
    fn malformed_keys_are_rejected_early() {
        assert!(!looks_like_key(""));
        assert!(!looks_like_key("osk_xyz"));
        assert!(!looks_like_key(&format!("abc_{}", "0".repeat(64))));
        assert!(looks_like_key(&format!("osk_{}", "a".repeat(64))));
    }

    #[tokio::test]
    async fn authenticate_finds_active_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let admin = generate_key();
        store.insert_first_key(None, &admin.hash).await.unwrap();
        let user = generate_key();
        let record = store.insert_key(None, false, &user.hash).await.unwrap();
        assert!(
            authenticate(&store, Some(&admin.secret))
                .await
                .unwrap()
                .admin
        );
        assert!(matches!(
            authenticate(&store, None).await,
            Err(AuthError::Missing)
        ));
        let wrong = generate_key();
        assert!(matches!(
            authenticate(&store, Some(&wrong.secret)).await,
            Err(AuthError::Invalid)
        ));
        store.revoke_key(record.id).await.unwrap();
        assert!(matches!(
            authenticate(&store, Some(&user.secret)).await,
            Err(AuthError::Invalid)
        ));
    }
}
