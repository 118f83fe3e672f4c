//! Persistent gateway state behind the [`Store`] trait: upstream bindings per (user, device),
//! registered users, and the `sub` → user-ID pins. The embedded SQLite store ([`sqlite`]) is the
//! default; a shared backend (Redis) implements the same trait.
//!
//! The request path never calls a store directly: `binding::Binder` keeps hot entries in memory
//! and only reads the store on a miss.

pub mod redis;
pub mod seal;
pub mod sqlite;

use async_trait::async_trait;

/// A device the gateway provisioned upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The upstream access token (appservice_login); `None` when the device was created through
    /// the appservice API (appservice_masquerade).
    pub upstream_token: Option<String>,
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field(
                "upstream_token",
                &self.upstream_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The result of pinning a subject to a user ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// First sighting: `sub` now owns the user ID.
    New,
    /// `sub` already owns it.
    Matches,
    /// Another subject owns it.
    Conflict {
        /// The subject that owns the user ID.
        owner: String,
    },
}

/// Proof of holding a cross-replica provisioning lock: the lock's name and the fencing token
/// it was taken with. A write made under a fence lands only while that token still holds the
/// lock, so a holder whose lock expired or vanished cannot overwrite its successor's work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lock's name.
    pub lock: String,
    /// The fencing token it was taken with.
    pub token: String,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Persistent state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The provisioned device, if any.
    async fn device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRecord>, StoreError>;
    /// Records (or replaces) a provisioned device.
    async fn put_device(
        &self,
        user_id: &str,
        device_id: &str,
        record: &DeviceRecord,
    ) -> Result<(), StoreError>;
    /// Like [`Store::put_device`], but only while `fence` still holds its lock: `Ok(false)`, and
    /// nothing written, when it does not. A store that is not shared between replicas has no
    /// such locks and writes unconditionally.
    async fn put_device_fenced(
        &self,
        user_id: &str,
        device_id: &str,
        record: &DeviceRecord,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let _ = fence;
        self.put_device(user_id, device_id, record).await?;
        Ok(true)
    }
    /// Every provisioned device (start-up re-sealing of device tokens after a key rotation).
    async fn device_records(&self) -> Result<Vec<(String, String, DeviceRecord)>, StoreError>;
    /// A gateway metadata value (e.g. the encryption key check).
    async fn meta(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Sets a gateway metadata value.
    async fn put_meta(&self, name: &str, value: &str) -> Result<(), StoreError>;
    /// Sets a metadata value unless one is set (atomically), and returns the value in force.
    async fn init_meta(&self, name: &str, value: &str) -> Result<String, StoreError>;
    /// Forgets a device.
    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), StoreError>;
    /// Device IDs provisioned for a user.
    async fn devices_of(&self, user_id: &str) -> Result<Vec<String>, StoreError>;
    /// Whether the user was registered upstream.
    async fn user_registered(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Records that the user exists upstream.
    async fn mark_user_registered(&self, user_id: &str) -> Result<(), StoreError>;
    /// Pins `sub` to `user_id` on first sight; reports a conflict otherwise.
    async fn pin_subject(&self, user_id: &str, sub: &str) -> Result<Pin, StoreError>;
    /// Moves the pin of `user_id` to `sub` (operator action).
    async fn repin_subject(&self, user_id: &str, sub: &str) -> Result<(), StoreError>;
    /// Lets `user_id` replace their cross-signing keys once before `until_ms` (Unix ms).
    async fn approve_cross_signing_reset(
        &self,
        user_id: &str,
        until_ms: u64,
    ) -> Result<(), StoreError>;
    /// Consumes an unexpired approval; `true` when there was one.
    async fn take_cross_signing_reset(
        &self,
        user_id: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Records that `user_id`'s cross-signing keys are (being) set up through the gateway's
    /// password stage; `true` when this call recorded it, `false` when it was already there.
    /// Atomic: of two concurrent first uploads, one gets `true`.
    async fn claim_cross_signing(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Removes that record (a first upload that did not land).
    async fn release_cross_signing(&self, user_id: &str) -> Result<(), StoreError>;
    /// The user ID pinned to `sub`, if any.
    async fn user_of_subject(&self, sub: &str) -> Result<Option<String>, StoreError>;
    /// Marks a user deactivated: never provisioned again until the tombstone is lifted.
    async fn tombstone(&self, user_id: &str) -> Result<(), StoreError>;
    /// Lifts a tombstone; `true` when there was one.
    async fn lift_tombstone(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Whether the user is tombstoned.
    async fn is_tombstoned(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Remembers that OP session `sid` is bound to (user, device).
    async fn record_session(
        &self,
        sid: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), StoreError>;
    /// The (user, device) pairs bound to OP session `sid`.
    async fn session_devices(&self, sid: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// Records a revocation (`key` from `auth::revocations::Selector::key`).
    async fn put_revocation(&self, key: &str, at_ms: u64, until_ms: u64) -> Result<(), StoreError>;
    /// Revocations still in force at `now_ms`: `(key, at_ms, until_ms)`.
    async fn revocations(&self, now_ms: u64) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Remembers a logout token's `jti` until `until_ms`; `false` when it was already seen
    /// (a replay).
    async fn remember_jti(&self, jti: &str, until_ms: u64, now_ms: u64)
        -> Result<bool, StoreError>;
    /// Forgets a remembered `jti` (its logout could not be carried out: the OP's retry must
    /// not count as a replay).
    async fn forget_jti(&self, jti: &str) -> Result<(), StoreError>;
    /// Stores `value` under (`space`, `key`) until `until_ms`, replacing what was there.
    async fn put_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
    ) -> Result<(), StoreError>;
    /// The value under (`space`, `key`), unless it expired by `now_ms`.
    async fn get_expiring(
        &self,
        space: Space,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError>;
    /// Removes and returns the value, atomically: of two callers at most one gets it (a
    /// single-use value, such as a login token).
    async fn take_expiring(
        &self,
        space: Space,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError>;
    /// Stores `value` under (`space`, `key`) until `until_ms` only when nothing live is there
    /// (at `now_ms`): `true` when this caller claimed it. Of two callers at most one claims a
    /// key (a lease, such as the one a compat session's grant check holds).
    async fn claim_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Removes the value, if any.
    async fn delete_expiring(&self, space: Space, key: &str) -> Result<(), StoreError>;
    /// Removes the value only while it is `value` (a lease's holder letting it go, never
    /// another holder's).
    async fn delete_expiring_if(
        &self,
        space: Space,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError>;
    /// Adds `member` to the set (`space`, `set`) until `until_ms` (adding it again sets its
    /// expiry anew). Sets index short-lived values (a user's compat sessions).
    async fn add_member(
        &self,
        space: Space,
        set: &str,
        member: &str,
        until_ms: u64,
    ) -> Result<(), StoreError>;
    /// The members of the set not expired by `now_ms`.
    async fn members(
        &self,
        space: Space,
        set: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError>;
    /// Removes `member` from the set, if there.
    async fn remove_member(&self, space: Space, set: &str, member: &str) -> Result<(), StoreError>;
}

/// The namespaces of short-lived values ([`Store::put_expiring`]): each is its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// A browser's pending single sign-on (state → PKCE verifier, nonce, redirect URL).
    SsoState,
    /// A single-use login token (hash → the compat session it starts).
    LoginToken,
    /// A compat access token (hash → session ID).
    CompatAccess,
    /// A compat refresh token (hash → session ID).
    CompatRefresh,
    /// A compat session (ID → its record).
    CompatSession,
    /// A user's compat sessions (set: user ID → session IDs), for `/logout/all`.
    CompatUserSessions,
    /// A compat session's OP grant (session ID → its sealed refresh token, last check).
    CompatGrant,
    /// The lease of a compat session's grant check (session ID → holder).
    CompatGrantLease,
    /// An OP session's compat sessions (set: issuer-scoped `sid` → session IDs).
    CompatOpSessions,
    /// A compat session that was ended (session ID → marker), so that a `/refresh` racing
    /// the end does not bring it back.
    CompatEnded,
}

impl Space {
    /// The stored name (SQLite column value, Redis key part).
    pub fn name(self) -> &'static str {
        match self {
            Space::SsoState => "sso",
            Space::LoginToken => "login",
            Space::CompatAccess => "cat",
            Space::CompatRefresh => "crt",
            Space::CompatSession => "cs",
            Space::CompatUserSessions => "cus",
            Space::CompatGrant => "cg",
            Space::CompatGrantLease => "cgl",
            Space::CompatOpSessions => "cos",
            Space::CompatEnded => "cend",
        }
    }
}
