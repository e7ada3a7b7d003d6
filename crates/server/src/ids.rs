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
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The part of a key shown in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(14).collect()
}

/// Hex SHA-256 of arbitrary bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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
}
