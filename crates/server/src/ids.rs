//! Identifiers and secrets: Brevo-like ids, API keys and their hashes.

use rand::Rng;
use sha2::{Digest, Sha256};

/// Meteor's "unmistakable" alphabet, which Brevo's ids use (no 0 1 I O U V l).
pub const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz";

/// A random id of `len` characters from [`ALPHABET`].
pub fn random_id(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A 17-character id, like Brevo's message, agent, group and conversation ids.
///
/// The first 7 characters encode the time in milliseconds (base 54, good until the year
/// 2380) and the other 10 are random (54^10 ≈ 2·10^17 per millisecond), so new ids sort after
/// old ones: inserts land at the end of the id index instead of on random pages, which keeps
/// each group commit's WAL writes small.
pub fn new_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    id_at(ms)
}

/// A [`new_id`] for the given time (milliseconds since the epoch).
pub fn id_at(ms: u64) -> String {
    let base = ALPHABET.len() as u64;
    let mut prefix = [0u8; 7];
    let mut rest = ms;
    for slot in prefix.iter_mut().rev() {
        *slot = ALPHABET[(rest % base) as usize];
        rest /= base;
    }
    let mut id = String::with_capacity(17);
    id.extend(prefix.iter().map(|&b| b as char));
    id.push_str(&random_id(10));
    id
}

/// A new API key shaped like Brevo's: `xkeysib-<64 hex>-<16 alphanumerics>`.
pub fn new_api_key() -> String {
    let mut rng = rand::rng();
    let secret: [u8; 32] = rng.random();
    format!("xkeysib-{}-{}", hex::encode(secret), random_id(16))
}

/// The stored form of an API key: hex SHA-256. Keys are 256-bit random, so a fast hash is
/// enough; no password hashing is needed.
pub fn hash_key(key: &str) -> String {
    hex::encode(key_digest(key))
}

/// The SHA-256 of an API key, before [`hash_key`] hex-encodes it: what the per-request
/// key cache is keyed by, so a cache hit costs no hex encoding.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The part of a key shown in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(14).collect()
}

/// Hex SHA-256 of arbitrary bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A public widget id: 24 lowercase hex characters, like Brevo's `BrevoConversationsID`.
pub fn new_widget_id() -> String {
    let bytes: [u8; 12] = rand::rng().random();
    hex::encode(bytes)
}

/// A secret identity key (64 hex characters) that signs visitor tokens and identity hashes.
pub fn new_identity_key() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// A webhook signing secret: `whsec_` and 32 random bytes in base64 (the Standard
/// Webhooks form).
pub fn new_webhook_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A new visitor's id: 32 random alphanumerics (190 bits), unguessable.
pub fn new_visitor_id() -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
        .collect()
}

fn hmac_sha256(key: &str, parts: &[&[u8]]) -> hmac::Hmac<Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// The identity hash a site sends to bind its own user id: lowercase hex
/// HMAC-SHA256(identity key, visitor id).
pub fn identity_hash(identity_key: &str, visitor_id: &str) -> String {
    use hmac::Mac;
    hex::encode(
        hmac_sha256(identity_key, &[visitor_id.as_bytes()])
            .finalize()
            .into_bytes(),
    )
}

/// Whether `hash` is the identity hash of `visitor_id` (constant time).
pub fn verify_identity_hash(identity_key: &str, visitor_id: &str, hash: &str) -> bool {
    use hmac::Mac;
    match hex::decode(hash.trim()) {
        Ok(bytes) => hmac_sha256(identity_key, &[visitor_id.as_bytes()])
            .verify_slice(&bytes)
            .is_ok(),
        Err(_) => false,
    }
}

const TOKEN_CONTEXT: &[u8] = b"switchboard visitor token v1\0";

/// A visitor token: `v1.<hex visitor id>.<hex MAC>`, signed with the account's identity
/// key over the account id too, so a token of one account is worthless in another.
pub fn visitor_token(identity_key: &str, account_id: &str, visitor_id: &str) -> String {
    use hmac::Mac;
    let mac = hmac_sha256(
        identity_key,
        &[
            TOKEN_CONTEXT,
            account_id.as_bytes(),
            b"\0",
            visitor_id.as_bytes(),
        ],
    );
    format!(
        "v1.{}.{}",
        hex::encode(visitor_id.as_bytes()),
        hex::encode(mac.finalize().into_bytes())
    )
}

/// The visitor id of a valid token of this account.
pub fn verify_visitor_token(identity_key: &str, account_id: &str, token: &str) -> Option<String> {
    use hmac::Mac;
    let mut parts = token.trim().split('.');
    let (Some("v1"), Some(visitor), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let visitor = String::from_utf8(hex::decode(visitor).ok()?).ok()?;
    let mac = hex::decode(mac).ok()?;
    hmac_sha256(
        identity_key,
        &[
            TOKEN_CONTEXT,
            account_id.as_bytes(),
            b"\0",
            visitor.as_bytes(),
        ],
    )
    .verify_slice(&mac)
    .ok()?;
    Some(visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_use_the_brevo_alphabet() {
        for _ in 0..100 {
            let id = new_id();
            assert_eq!(id.len(), 17);
            assert!(id.bytes().all(|b| ALPHABET.contains(&b)), "{id}");
        }
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let times = [
            0,
            1,
            53,
            54,
            1_795_449_291_503,
            1_795_449_291_504,
            54u64.pow(7) - 1,
        ];
        let ids: Vec<String> = times.iter().map(|&t| id_at(t)).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
        }
        assert!(ids.iter().all(|id| id.len() == 17));
        assert_ne!(id_at(5), id_at(5), "the random part differs");
    }

    #[test]
    fn api_keys_look_like_brevo_keys_and_hash_stably() {
        let k = new_api_key();
        assert!(k.starts_with("xkeysib-"));
        assert_eq!(k.len(), 8 + 64 + 1 + 16);
        assert_eq!(hash_key(&k), hash_key(&k));
        assert_ne!(hash_key(&k), hash_key(&new_api_key()));
        assert_eq!(hash_key(&k).len(), 64);
    }

    #[test]
    fn tokens_verify_only_for_their_account_and_key() {
        let t = visitor_token("k1", "acc", "visitor 1");
        assert_eq!(
            verify_visitor_token("k1", "acc", &t).as_deref(),
            Some("visitor 1")
        );
        assert_eq!(verify_visitor_token("k1", "other", &t), None);
        assert_eq!(verify_visitor_token("k2", "acc", &t), None);
        let forged = t.replace(&hex::encode("visitor 1"), &hex::encode("visitor 2"));
        assert_eq!(verify_visitor_token("k1", "acc", &forged), None);
        assert_eq!(verify_visitor_token("k1", "acc", "garbage"), None);
    }

    #[test]
    fn identity_hashes_bind_one_id() {
        let h = identity_hash("secret", "user-42");
        assert_eq!(h.len(), 64);
        assert!(verify_identity_hash("secret", "user-42", &h));
        assert!(!verify_identity_hash("secret", "user-43", &h));
        assert!(!verify_identity_hash("other", "user-42", &h));
        assert!(!verify_identity_hash("secret", "user-42", "zz"));
        assert_eq!(new_visitor_id().len(), 32);
        assert_eq!(new_widget_id().len(), 24);
    }
}
