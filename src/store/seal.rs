//! Encryption at rest of the upstream device tokens (`appservice_login`): a copied SQLite file
//! or Redis dump must not hand out homeserver sessions.
//!
//! Tokens are sealed with AES-256-GCM (aws-lc-rs, the crypto backend the build already has)
//! under `store.encryption_key`, with a fresh random 96-bit nonce each time and the row's
//! `(user, device)` as associated data, so a sealed token copied onto another row does not
//! open. The stored form is `mog1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`; the key id
//! (8 hex digits of a SHA-256 over the key) says which key sealed it, so rotation can keep
//! reading tokens sealed under `store.previous_encryption_key` while sealing new ones under
//! the current key. A stored value without the prefix is a token from before encryption.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of a sealed value (format version 1).
const PREFIX: &str = "mog1:";

/// One 256-bit key and its id.
struct Key {
    id: String,
    aead: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8; 32]) -> Result<Key, SealError> {
        let mut h = Sha256::new();
        h.update(b"matrix-oidc-gateway store key id\0");
        h.update(bytes);
        let id = hex::encode(&h.finalize()[..4]);
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SealError::Crypto)?;
        Ok(Key {
            id,
            aead: LessSafeKey::new(unbound),
        })
    }
}

/// Why a stored value did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Sealed under a key that is neither the current nor the previous one.
    #[error("sealed with key {0}, which is neither store.encryption_key nor store.previous_encryption_key")]
    UnknownKey(String),
    /// The key id matches but the value does not authenticate (tampered, or moved to another row).
    #[error("does not authenticate under key {0} (tampered or copied from another row)")]
    Corrupt(String),
    /// The crypto library refused the operation (cannot happen with 32-byte keys and tokens).
    #[error("the AEAD refused the operation")]
    Crypto,
}

/// What opening a stored value gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The token.
    pub plaintext: String,
    /// Not sealed under the current key (the previous key, or plaintext from before
    /// encryption): the caller should seal it again.
    pub stale: bool,
}

/// Seals and opens stored secrets.
pub struct Sealer {
    current: Key,
    previous: Option<Key>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("current", &self.current.id)
            .field("previous", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

impl Sealer {
    /// A sealer with the current key and, during a rotation, the previous one.
    pub fn new(current: &[u8; 32], previous: Option<&[u8; 32]>) -> Result<Sealer, SealError> {
        Ok(Sealer {
            current: Key::new(current)?,
            previous: previous.map(Key::new).transpose()?,
        })
    }

    /// The current key's id (logs and error messages; not secret).
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `plaintext` bound to `context` (the row it is stored in).
    pub fn seal(&self, plaintext: &str, context: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut buf = plaintext.as_bytes().to_vec();
        self.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buf,
            )
            .map_err(|_| SealError::Crypto)?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(format!(
            "{PREFIX}{}:{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(out)
        ))
    }

    /// Opens a stored value sealed for `context`; a value without the prefix is plaintext
    /// from before encryption (returned as stale).
    pub fn open(&self, stored: &str, context: &[u8]) -> Result<Opened, SealError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(Opened {
                plaintext: stored.to_owned(),
                stale: true,
            });
        };
        let (id, body) = rest.split_once(':').unwrap_or((rest, ""));
        let (key, stale) = if id == self.current.id {
            (&self.current, false)
        } else {
            match &self.previous {
                Some(k) if k.id == id => (k, true),
                _ => return Err(SealError::UnknownKey(id.to_owned())),
            }
        };
        let corrupt = || SealError::Corrupt(id.to_owned());
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| corrupt())?;
        if raw.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| corrupt())?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buf,
            )
            .map_err(|_| corrupt())?;
        let plaintext = String::from_utf8(plain.to_vec()).map_err(|_| corrupt())?;
        Ok(Opened { plaintext, stale })
    }
}

/// Parses a configured key: 64 hex digits, or base64 (standard or URL-safe, padded or not)
/// of exactly 32 bytes.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(text).ok())?
    };
    let key: [u8; 32] = bytes.try_into().ok()?;
    // A key of one repeated byte (all zeros, a placeholder) is no secret.
    key.iter().any(|&b| b != key[0]).then_some(key)
}

/// The associated data binding a device token to its row.
pub fn device_context(user_id: &str, device_id: &str) -> Vec<u8> {
    let mut c = Vec::with_capacity(user_id.len() + device_id.len() + 8);
    c.extend_from_slice(b"device\0");
    c.extend_from_slice(user_id.as_bytes());
    c.push(0);
    c.extend_from_slice(device_id.as_bytes());
    c
}

/// The value stored to check, at start-up, that the configured key is the one the store's
/// secrets were sealed with.
pub const KEY_CHECK_CONTEXT: &[u8] = b"key-check\0";
/// The plaintext of that check value.
pub const KEY_CHECK_PLAINTEXT: &str = "matrix-oidc-gateway";

/// What the start-up check did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Device tokens sealed again under the current key (rotation, or plaintext from before
    /// encryption).
    pub resealed: usize,
}

/// Why the store's secrets do not fit the configured key.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] super::StoreError),
    /// The store was sealed under another key.
    #[error(
        "the state store's secrets were sealed with key {stored} but store.encryption_key is key {configured}{previous}: \
         configure the key the store was written with (during a rotation: the new one as store.encryption_key, \
         the old one as store.previous_encryption_key)"
    )]
    WrongKey {
        /// Key id the store was sealed with.
        stored: String,
        /// Key id of `store.encryption_key`.
        configured: String,
        /// `" (previous: …)"` when a previous key is configured.
        previous: String,
    },
}

/// At start-up: checks that the configured key opens the store's key-check value (writing it
/// on first use), then seals again every device token not sealed under the current key. A
/// token that opens under no configured key is left alone: it is replaced by a fresh
/// appservice login when its device is next used.
pub async fn check_key_and_reseal(
    store: &dyn super::Store,
    sealer: &Sealer,
) -> Result<Resealed, KeyCheckError> {
    const NAME: &str = "encryption_key_check";
    // Written once, atomically: two replicas starting together agree on one check value.
    let stored = store.init_meta(NAME, &seal_check(sealer)?).await?;
    match sealer.open(&stored, KEY_CHECK_CONTEXT) {
        Ok(o) if o.plaintext == KEY_CHECK_PLAINTEXT && !o.stale && is_sealed(&stored) => {}
        Ok(o) if o.plaintext == KEY_CHECK_PLAINTEXT && is_sealed(&stored) => {
            store.put_meta(NAME, &seal_check(sealer)?).await?;
        }
        Ok(_) | Err(SealError::UnknownKey(_) | SealError::Corrupt(_) | SealError::Crypto) => {
            let id = stored
                .strip_prefix(PREFIX)
                .and_then(|r| r.split(':').next())
                .unwrap_or("(unsealed)")
                .to_owned();
            return Err(KeyCheckError::WrongKey {
                stored: id,
                configured: sealer.current.id.clone(),
                previous: sealer
                    .previous
                    .as_ref()
                    .map(|k| format!(" (previous: {})", k.id))
                    .unwrap_or_default(),
            });
        }
    }
    // Tokens stored in the clear by a version before encryption are sealed once, by the first
    // start-up with a key; after that an unsealed value is not trusted (a store writer could
    // plant one) and its device logs in again on next use.
    const MIGRATED: &str = "device_tokens_sealed";
    let migrating = store.meta(MIGRATED).await?.is_none();
    let mut out = Resealed::default();
    for (user, device, record) in store.device_records().await? {
        let Some(stored) = record.upstream_token else {
            continue;
        };
        if !is_sealed(&stored) && !migrating {
            tracing::warn!(user = %user, device = %device, "an unsealed device token in the store is ignored; the device logs in again on next use");
            continue;
        }
        let context = device_context(&user, &device);
        match sealer.open(&stored, &context) {
            Ok(o) if o.stale => {
                put_sealed(store, sealer, &user, &device, &o.plaintext, None).await?;
                out.resealed += 1;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(user = %user, device = %device, error = %e, "a device token does not open with the configured keys");
            }
        }
    }
    if migrating {
        store.put_meta(MIGRATED, "1").await?;
    }
    Ok(out)
}

/// Seals `token` for the row (user, device) and stores it there: the one way a device token
/// reaches the store. Under a provisioning lock the write is fenced ([`super::Fence`]):
/// `Ok(false)` when the lock moved on and nothing was written.
pub async fn put_sealed(
    store: &dyn super::Store,
    sealer: &Sealer,
    user_id: &str,
    device_id: &str,
    token: &str,
    fence: Option<&super::Fence>,
) -> Result<bool, super::StoreError> {
    let sealed = sealer
        .seal(token, &device_context(user_id, device_id))
        .map_err(|e| super::StoreError(e.to_string()))?;
    let record = super::DeviceRecord {
        upstream_token: Some(sealed),
    };
    match fence {
        Some(f) => {
            store
                .put_device_fenced(user_id, device_id, &record, f)
                .await
        }
        None => store
            .put_device(user_id, device_id, &record)
            .await
            .map(|_| true),
    }
}

/// Whether a stored value is sealed (as opposed to a plaintext token from before encryption).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

fn seal_check(sealer: &Sealer) -> Result<String, super::StoreError> {
    sealer
        .seal(KEY_CHECK_PLAINTEXT, KEY_CHECK_CONTEXT)
        .map_err(|e| super::StoreError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];

    #[test]
    fn sealed_tokens_round_trip_and_hide_the_token() {
        let s = Sealer::new(&K1, None).unwrap();
        let ctx = device_context("@a:s", "D");
        let sealed = s.seal("syt_secret_token", &ctx).unwrap();
        assert!(sealed.starts_with(&format!("mog1:{}:", s.key_id())));
        assert!(!sealed.contains("syt_secret_token"));
        assert_ne!(
            sealed,
            s.seal("syt_secret_token", &ctx).unwrap(),
            "nonces must differ"
        );
        assert_eq!(
            s.open(&sealed, &ctx),
            Ok(Opened {
                plaintext: "syt_secret_token".into(),
                stale: false
            })
        );
    }

    #[test]
    fn a_token_moved_to_another_row_or_tampered_does_not_open() {
        let s = Sealer::new(&K1, None).unwrap();
        let sealed = s.seal("t", &device_context("@a:s", "D")).unwrap();
        assert!(matches!(
            s.open(&sealed, &device_context("@b:s", "D")),
            Err(SealError::Corrupt(_))
        ));
        let mut tampered = sealed.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(
            s.open(&tampered, &device_context("@a:s", "D")),
            Err(SealError::Corrupt(_))
        ));
    }

    #[test]
    fn rotation_reads_the_previous_key_and_flags_it_stale() {
        let ctx = device_context("@a:s", "D");
        let old = Sealer::new(&K1, None).unwrap().seal("t", &ctx).unwrap();
        let rotating = Sealer::new(&K2, Some(&K1)).unwrap();
        assert_eq!(
            rotating.open(&old, &ctx),
            Ok(Opened {
                plaintext: "t".into(),
                stale: true
            })
        );
        let after = Sealer::new(&K2, None).unwrap();
        assert_eq!(
            after.open(&old, &ctx),
            Err(SealError::UnknownKey(
                Sealer::new(&K1, None).unwrap().key_id().to_owned()
            ))
        );
    }

    #[test]
    fn plaintext_from_before_encryption_is_stale() {
        let s = Sealer::new(&K1, None).unwrap();
        assert_eq!(
            s.open("syt_old", b""),
            Ok(Opened {
                plaintext: "syt_old".into(),
                stale: true
            })
        );
    }

    #[test]
    fn keys_parse_from_hex_or_base64_of_32_bytes() {
        let mut k = [0xab; 32];
        k[31] = 0xcd;
        assert_eq!(parse_key(&format!("{}cd", "ab".repeat(31))), Some(k));
        assert_eq!(parse_key(&"00".repeat(32)), None, "a placeholder key");
        use base64::engine::general_purpose::STANDARD;
        let mut seven = [7u8; 32];
        seven[0] = 8;
        assert_eq!(parse_key(&STANDARD.encode(seven)), Some(seven));
        assert_eq!(parse_key(&URL_SAFE_NO_PAD.encode(seven)), Some(seven));
        assert_eq!(parse_key("too short"), None);
        assert_eq!(parse_key(&"ab".repeat(31)), None);
        assert_eq!(parse_key(&STANDARD.encode([7u8; 31])), None);
    }
}
