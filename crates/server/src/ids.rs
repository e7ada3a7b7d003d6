//! Identifiers and secrets: Brevo-like ids, API keys and their hashes.

use rand::Rng;
use sha2::{Digest, Sha256};

/// Meteor's "unmistakable" alphabet, which Brevo's ids use (no 0 1 I O U V l).
pub const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz";

/// A random id of `len` characters from [`ALPHABET`].
pub fn random_id(len: usize) -> String {
    let mut id = String::with_capacity(len);
    push_random(&mut id, len);
    id
}

/// Appends `len` random characters of [`ALPHABET`].
fn push_random(out: &mut String, len: usize) {
    let mut rng = rand::rng();
    out.extend((0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char));
}

/// Appends the last `width` base-54 digits of `value` in [`ALPHABET`], most significant
/// first (so that, at a fixed width, ids sort as their values do).
fn push_base54(out: &mut String, mut value: u64, width: usize) {
    let base = ALPHABET.len() as u64;
    let mut digits = [0u8; 16];
    let digits = &mut digits[..width];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(value % base) as usize];
        value /= base;
    }
    out.extend(digits.iter().map(|&b| b as char));
}

/// A 17-character id, like Brevo's message, agent, group and conversation ids.
///
/// The first 7 characters encode the time in milliseconds (base 54, good until the year
/// 2380) and the other 10 are random (54^10 ≈ 2·10^17 per millisecond), so new ids sort after
/// old ones: inserts land at the end of the id index instead of on random pages, which keeps
/// each group commit's WAL writes small. (Messages on SQLite get [`SeqIds`] ids instead,
/// which need no index at all.)
pub fn new_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    id_at(ms)
}

/// A [`new_id`] for the given time (milliseconds since the epoch).
pub fn id_at(ms: u64) -> String {
    let mut id = String::with_capacity(17);
    push_base54(&mut id, ms, 7);
    push_random(&mut id, 10);
    id
}

/// Message ids that carry their message's feed position (`seq`), so that the embedded store
/// finds a message by id through its primary key and keeps no index on ids: that index was
/// a B-tree search, a uniqueness probe and about three WAL pages per group commit.
///
/// An id is 17 characters of [`ALPHABET`]: the first 12 encode the position passed through
/// a keyed permutation of 64-bit numbers (a four-round Feistel network; the key is drawn
/// per database), the last 5 are random. Without the key, ids show neither the order nor
/// the number of messages. The permutation is not a cipher to rely on for secrecy: ids are
/// not secrets, every read is still scoped to the caller's account and checks the whole id.
#[derive(Clone, Copy, Debug)]
pub struct SeqIds {
    keys: [u32; 4],
}

/// Characters of a [`SeqIds`] id that carry the position (54^12 > 2^64).
const SEQ_CHARS: usize = 12;

impl SeqIds {
    /// The codec for a database's key.
    pub fn new(key: i64) -> Self {
        let k = key as u64;
        let (hi, lo) = ((k >> 32) as u32, k as u32);
        Self {
            keys: [
                lo,
                hi,
                lo.rotate_left(16) ^ 0x9E37_79B9,
                hi.rotate_left(16) ^ 0x7F4A_7C15,
            ],
        }
    }

    fn round(r: u32, k: u32) -> u32 {
        let x = (r ^ k).wrapping_mul(0x9E37_79B1);
        (x ^ (x >> 15)).wrapping_mul(0x85EB_CA77) ^ (x >> 13)
    }

    fn permute(&self, v: u64) -> u64 {
        let (mut l, mut r) = ((v >> 32) as u32, v as u32);
        for k in self.keys {
            (l, r) = (r, l ^ Self::round(r, k));
        }
        (u64::from(l) << 32) | u64::from(r)
    }

    fn unpermute(&self, v: u64) -> u64 {
        let (mut l, mut r) = ((v >> 32) as u32, v as u32);
        for k in self.keys.iter().rev() {
            (l, r) = (r ^ Self::round(l, *k), l);
        }
        (u64::from(l) << 32) | u64::from(r)
    }

    /// The id of the message at `seq` (positive), with a random tail.
    pub fn encode(&self, seq: i64) -> String {
        let mut id = String::with_capacity(17);
        push_base54(&mut id, self.permute(seq as u64), SEQ_CHARS);
        push_random(&mut id, 17 - SEQ_CHARS);
        id
    }

    /// The position an id of this codec names, if `id` can be one: 17 characters of the
    /// alphabet whose head decodes to a positive position. Other ids (older ones, or ones
    /// chosen before the position was known) are found another way by the store.
    pub fn decode(&self, id: &str) -> Option<i64> {
        let bytes = id.as_bytes();
        if bytes.len() != 17 {
            return None;
        }
        let mut v: u128 = 0;
        for &b in &bytes[..SEQ_CHARS] {
            let digit = ALPHABET.iter().position(|&a| a == b)?;
            v = v * ALPHABET.len() as u128 + digit as u128;
        }
        if !bytes[SEQ_CHARS..].iter().all(|b| ALPHABET.contains(b)) {
            return None;
        }
        let seq = self.unpermute(u64::try_from(v).ok()?);
        i64::try_from(seq).ok().filter(|&s| s > 0)
    }
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

    #[test]
    fn seq_ids_round_trip_and_look_like_brevo_ids() {
        let codec = SeqIds::new(0x1234_5678_9abc_def0_u64 as i64);
        for seq in [1, 2, 3, 54, 1_000, 65_535, 1 << 32, (1 << 40) + 7, i64::MAX] {
            let id = codec.encode(seq);
            assert_eq!(id.len(), 17, "{id}");
            assert!(id.bytes().all(|b| ALPHABET.contains(&b)), "{id}");
            assert_eq!(codec.decode(&id), Some(seq), "{id}");
        }
        // Neighbouring positions give unrelated heads, and the tail is random.
        let (a, b) = (codec.encode(41), codec.encode(42));
        assert_ne!(a[..12], b[..12]);
        assert_ne!(codec.encode(41), codec.encode(41));
    }

    #[test]
    fn seq_ids_depend_on_the_key_and_reject_what_they_did_not_make() {
        let one = SeqIds::new(1);
        let other = SeqIds::new(2);
        let id = one.encode(77);
        assert_ne!(other.decode(&id), Some(77));
        assert_eq!(one.decode(&id[..16]), None, "too short");
        assert_eq!(one.decode(&format!("{id}2")), None, "too long");
        let mut bad = id.clone();
        bad.replace_range(16..17, "0");
        assert_eq!(one.decode(&bad), None, "0 is not in the alphabet");
        assert_eq!(one.decode("zzzzzzzzzzzzzzzzz"), None, "head above 2^64");
        assert_eq!(one.decode("éééééééé2"), None, "17 bytes, not the alphabet");
    }
}
