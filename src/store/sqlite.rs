//! The embedded store: one SQLite file (mode 0600, WAL), accessed on the blocking thread pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{DeviceRecord, Pin, Space, Store, StoreError};

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

/// The schema's history: migration `i` takes a file from `PRAGMA user_version` `i` to `i + 1`,
/// in one transaction. Append to the list; never edit an entry that has shipped. Version 1 is
/// the schema of every file written before versioning began (its statements are idempotent, so
/// such a file, at version 0, passes through it unchanged).
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

/// Version 3: short-lived values (single sign-on state, login tokens, compat sessions).
const SCHEMA_V3: &str = "
CREATE TABLE expiring (
    space TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (space, key)
);
CREATE INDEX expiring_until ON expiring (until_ms);
";

/// Version 2: users whose cross-signing keys the gateway's password stage let up (Dendrite).
const SCHEMA_V2: &str = "
CREATE TABLE cross_signing_claims (
    user_id TEXT PRIMARY KEY
);
";

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    upstream_token TEXT,
    created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')),
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    user_id TEXT PRIMARY KEY,
    at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT NOT NULL,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (sid, user_id, device_id)
);
CREATE TABLE IF NOT EXISTS revocations (
    key TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS logout_jtis (
    jti TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cross_signing_resets (
    user_id TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    subject TEXT,
    registered INTEGER NOT NULL DEFAULT 0,
    pinned_at INTEGER
);
";

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Brings the file to [`SCHEMA_VERSION`]; refuses a file a newer gateway wrote (its schema may
/// mean things this build does not know).
fn migrate(conn: &mut Connection) -> Result<(), String> {
    let found: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|_| "negative schema version".to_owned())?;
    if found > SCHEMA_VERSION {
        return Err(format!(
            "the state store has schema version {found}, newer than this gateway's \
             {SCHEMA_VERSION}: run the newer gateway, or restore a backup"
        ));
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(found) {
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        tx.execute_batch(step)
            .and_then(|_| tx.pragma_update(None, "user_version", (from + 1) as i64))
            .and_then(|_| tx.commit())
            .map_err(|e| format!("migration to schema version {}: {e}", from + 1))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, readable by the owner only.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        restrict_permissions(path)?;
        // During a graceful upgrade two processes share the file for a few seconds: wait for
        // the other's write instead of failing with SQLITE_BUSY.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| StoreError(e.to_string()))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
            .map_err(|e| StoreError(e.to_string()))?;
        migrate(&mut conn).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn
                .lock()
                .map_err(|_| StoreError("store lock poisoned".into()))?;
            f(&guard).map_err(|e| StoreError(e.to_string()))
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError(format!("cannot chmod {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn device_records(&self) -> Result<Vec<(String, String, DeviceRecord)>, StoreError> {
        self.run(|c| {
            let mut stmt = c.prepare("SELECT user_id, device_id, upstream_token FROM devices")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    DeviceRecord {
                        upstream_token: r.get(2)?,
                    },
                ))
            })?;
            rows.collect()
        })
        .await
    }

    async fn meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT value FROM meta WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn init_meta(&self, name: &str, value: &str) -> Result<String, StoreError> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?1, ?2)",
                params![name, value],
            )?;
            c.query_row(
                "SELECT value FROM meta WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn put_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2) \
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )
            .map(|_| ())
        })
        .await
    }

    async fn device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.run(move |c| {
            c.query_row(
                "SELECT upstream_token FROM devices WHERE user_id = ?1 AND device_id = ?2",
                params![u, d],
                |r| {
                    Ok(DeviceRecord {
                        upstream_token: r.get(0)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn put_device(
        &self,
        user_id: &str,
        device_id: &str,
        record: &DeviceRecord,
    ) -> Result<(), StoreError> {
        let (u, d, t) = (
            user_id.to_owned(),
            device_id.to_owned(),
            record.upstream_token.clone(),
        );
        self.run(move |c| {
            c.execute(
                "INSERT INTO devices (user_id, device_id, upstream_token) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET upstream_token = excluded.upstream_token",
                params![u, d, t],
            )
            .map(|_| ())
        })
        .await
    }

    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), StoreError> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.run(move |c| {
            c.execute(
                "DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2",
                params![u, d],
            )
            .map(|_| ())
        })
        .await
    }

    async fn devices_of(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            let mut stmt =
                c.prepare("SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id")?;
            let rows = stmt.query_map(params![u], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn user_registered(&self, user_id: &str) -> Result<bool, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT registered FROM users WHERE user_id = ?1",
                params![u],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v == Some(1))
        })
        .await
    }

    async fn mark_user_registered(&self, user_id: &str) -> Result<(), StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT INTO users (user_id, registered) VALUES (?1, 1)
                 ON CONFLICT (user_id) DO UPDATE SET registered = 1",
                params![u],
            )
            .map(|_| ())
        })
        .await
    }

    async fn pin_subject(&self, user_id: &str, sub: &str) -> Result<Pin, StoreError> {
        let (u, s) = (user_id.to_owned(), sub.to_owned());
        self.run(move |c| {
            let existing: Option<Option<String>> = c
                .query_row("SELECT subject FROM users WHERE user_id = ?1", params![u], |r| r.get(0))
                .optional()?;
            match existing.flatten() {
                Some(owner) if owner == s => Ok(Pin::Matches),
                Some(owner) => Ok(Pin::Conflict { owner }),
                None => {
                    c.execute(
                        "INSERT INTO users (user_id, subject, pinned_at) VALUES (?1, ?2, strftime('%s','now'))
                         ON CONFLICT (user_id) DO UPDATE SET subject = excluded.subject,
                             pinned_at = excluded.pinned_at
                         WHERE users.subject IS NULL",
                        params![u, s],
                    )?;
                    Ok(Pin::New)
                }
            }
        })
        .await
    }

    async fn approve_cross_signing_reset(
        &self,
        user_id: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT INTO cross_signing_resets (user_id, until_ms) VALUES (?1, ?2)
                 ON CONFLICT (user_id) DO UPDATE SET until_ms = excluded.until_ms",
                params![u, until_ms as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn take_cross_signing_reset(
        &self,
        user_id: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            let until: Option<i64> = c
                .query_row(
                    "DELETE FROM cross_signing_resets WHERE user_id = ?1 RETURNING until_ms",
                    params![u],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(until.is_some_and(|t| t as u64 > now_ms))
        })
        .await
    }

    async fn claim_cross_signing(&self, user_id: &str) -> Result<bool, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT INTO cross_signing_claims (user_id) VALUES (?1) ON CONFLICT DO NOTHING",
                params![u],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn release_cross_signing(&self, user_id: &str) -> Result<(), StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute(
                "DELETE FROM cross_signing_claims WHERE user_id = ?1",
                params![u],
            )
            .map(|_| ())
        })
        .await
    }

    async fn user_of_subject(&self, sub: &str) -> Result<Option<String>, StoreError> {
        let s = sub.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT user_id FROM users WHERE subject = ?1 LIMIT 1",
                params![s],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn tombstone(&self, user_id: &str) -> Result<(), StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO tombstones (user_id) VALUES (?1)",
                params![u],
            )
            .map(|_| ())
        })
        .await
    }

    async fn lift_tombstone(&self, user_id: &str) -> Result<bool, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.execute("DELETE FROM tombstones WHERE user_id = ?1", params![u])
                .map(|n| n > 0)
        })
        .await
    }

    async fn is_tombstoned(&self, user_id: &str) -> Result<bool, StoreError> {
        let u = user_id.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT 1 FROM tombstones WHERE user_id = ?1",
                params![u],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
        })
        .await
    }

    async fn record_session(
        &self,
        sid: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), StoreError> {
        let (s, u, d) = (sid.to_owned(), user_id.to_owned(), device_id.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO sessions (sid, user_id, device_id) VALUES (?1, ?2, ?3)",
                params![s, u, d],
            )
            .map(|_| ())
        })
        .await
    }

    async fn session_devices(&self, sid: &str) -> Result<Vec<(String, String)>, StoreError> {
        let s = sid.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare("SELECT user_id, device_id FROM sessions WHERE sid = ?1")?;
            let rows = stmt.query_map(params![s], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn put_revocation(&self, key: &str, at_ms: u64, until_ms: u64) -> Result<(), StoreError> {
        let k = key.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT INTO revocations (key, at_ms, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET at_ms = excluded.at_ms, until_ms = excluded.until_ms",
                params![k, at_ms as i64, until_ms as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn revocations(&self, now_ms: u64) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.run(move |c| {
            c.execute(
                "DELETE FROM revocations WHERE until_ms <= ?1",
                params![now_ms as i64],
            )?;
            let mut stmt = c.prepare("SELECT key, at_ms, until_ms FROM revocations")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            rows.collect()
        })
        .await
    }

    async fn forget_jti(&self, jti: &str) -> Result<(), StoreError> {
        let j = jti.to_owned();
        self.run(move |c| {
            c.execute("DELETE FROM logout_jtis WHERE jti = ?1", params![j])
                .map(|_| ())
        })
        .await
    }

    async fn remember_jti(
        &self,
        jti: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let j = jti.to_owned();
        self.run(move |c| {
            c.execute(
                "DELETE FROM logout_jtis WHERE until_ms <= ?1",
                params![now_ms as i64],
            )?;
            c.execute(
                "INSERT OR IGNORE INTO logout_jtis (jti, until_ms) VALUES (?1, ?2)",
                params![j, until_ms as i64],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn repin_subject(&self, user_id: &str, sub: &str) -> Result<(), StoreError> {
        let (u, s) = (user_id.to_owned(), sub.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO users (user_id, subject, pinned_at) VALUES (?1, ?2, strftime('%s','now'))
                 ON CONFLICT (user_id) DO UPDATE SET subject = excluded.subject, pinned_at = excluded.pinned_at",
                params![u, s],
            )
            .map(|_| ())
        })
        .await
    }

    async fn put_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO expiring (space, key, value, until_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (space, key) DO UPDATE SET value = ?3, until_ms = ?4",
                params![space.name(), k, v, until_ms as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn get_expiring(
        &self,
        space: Space,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let k = key.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT value FROM expiring WHERE space = ?1 AND key = ?2 AND until_ms > ?3",
                params![space.name(), k, now_ms as i64],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn take_expiring(
        &self,
        space: Space,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let k = key.to_owned();
        self.run(move |c| {
            // Expired values are cleared whenever one is taken (indexed, so cheap).
            c.execute(
                "DELETE FROM expiring WHERE until_ms <= ?1",
                params![now_ms as i64],
            )?;
            // One statement: of two takers, the second finds nothing to delete.
            let taken: Option<(String, i64)> = c
                .query_row(
                    "DELETE FROM expiring WHERE space = ?1 AND key = ?2 RETURNING value, until_ms",
                    params![space.name(), k],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(taken
                .filter(|(_, until)| *until as u64 > now_ms)
                .map(|(v, _)| v))
        })
        .await
    }

    async fn claim_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.run(move |c| {
            // One statement: a live value stays, an expired one is replaced.
            c.execute(
                "INSERT INTO expiring (space, key, value, until_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (space, key) DO UPDATE SET value = ?3, until_ms = ?4
                 WHERE expiring.until_ms <= ?5",
                params![space.name(), k, v, until_ms as i64, now_ms as i64],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn delete_expiring_if(
        &self,
        space: Space,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.run(move |c| {
            c.execute(
                "DELETE FROM expiring WHERE space = ?1 AND key = ?2 AND value = ?3",
                params![space.name(), k, v],
            )
            .map(|_| ())
        })
        .await
    }

    async fn delete_expiring(&self, space: Space, key: &str) -> Result<(), StoreError> {
        let k = key.to_owned();
        self.run(move |c| {
            c.execute(
                "DELETE FROM expiring WHERE space = ?1 AND key = ?2",
                params![space.name(), k],
            )
            .map(|_| ())
        })
        .await
    }

    // A set's members are short-lived values of their own, keyed `<set> US <member>`: a set is
    // the key range from `<set> US` (inclusive) to `<set> SP` (exclusive), on the primary key.
    async fn add_member(
        &self,
        space: Space,
        set: &str,
        member: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        self.put_expiring(space, &member_key(set, member), "", until_ms)
            .await
    }

    async fn members(
        &self,
        space: Space,
        set: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let (from, to) = (format!("{set}{MEMBER_SEP}"), format!("{set}\u{20}"));
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT key FROM expiring
                 WHERE space = ?1 AND key >= ?2 AND key < ?3 AND until_ms > ?4",
            )?;
            let keys = stmt
                .query_map(params![space.name(), from, to, now_ms as i64], |r| {
                    r.get::<_, String>(0)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(keys
                .into_iter()
                .filter_map(|k| k.strip_prefix(from.as_str()).map(str::to_owned))
                .collect())
        })
        .await
    }

    async fn remove_member(&self, space: Space, set: &str, member: &str) -> Result<(), StoreError> {
        self.delete_expiring(space, &member_key(set, member)).await
    }
}

/// Separates a set from a member in the key of a set member (a control character no user ID or
/// session ID contains; the next character, a space, ends the set's key range).
const MEMBER_SEP: char = '\u{1f}';

fn member_key(set: &str, member: &str) -> String {
    format!("{set}{MEMBER_SEP}{member}")
}

#[cfg(test)]
mod notification_state_tests {
    use super::*;

    #[tokio::test]
    async fn tombstones_sessions_revocations_and_jtis() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        assert!(!s.is_tombstoned("@a:x").await.unwrap());
        s.tombstone("@a:x").await.unwrap();
        assert!(s.is_tombstoned("@a:x").await.unwrap());
        assert!(s.lift_tombstone("@a:x").await.unwrap());
        assert!(!s.lift_tombstone("@a:x").await.unwrap());
        s.record_session("sid-1", "@a:x", "D1").await.unwrap();
        s.record_session("sid-1", "@a:x", "D1").await.unwrap();
        assert_eq!(
            s.session_devices("sid-1").await.unwrap(),
            vec![("@a:x".to_owned(), "D1".to_owned())]
        );
        s.pin_subject("@a:x", "sub-a").await.unwrap();
        assert_eq!(
            s.user_of_subject("sub-a").await.unwrap().as_deref(),
            Some("@a:x")
        );
        s.put_revocation("sid:sid-1", 10, 100).await.unwrap();
        assert_eq!(
            s.revocations(50).await.unwrap(),
            vec![("sid:sid-1".to_owned(), 10, 100)]
        );
        assert!(s.revocations(100).await.unwrap().is_empty());
        assert!(s.remember_jti("j1", 100, 10).await.unwrap());
        assert!(
            !s.remember_jti("j1", 100, 20).await.unwrap(),
            "a replay must be detected"
        );
        assert!(
            s.remember_jti("j1", 300, 150).await.unwrap(),
            "an expired jti is forgotten"
        );
    }
}

#[cfg(test)]
mod approval_tests {
    use super::*;

    #[tokio::test]
    async fn approvals_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        assert!(!s.take_cross_signing_reset("@a:x", 1_000).await.unwrap());
        s.approve_cross_signing_reset("@a:x", 2_000).await.unwrap();
        assert!(s.take_cross_signing_reset("@a:x", 1_000).await.unwrap());
        assert!(!s.take_cross_signing_reset("@a:x", 1_000).await.unwrap());
        s.approve_cross_signing_reset("@a:x", 2_000).await.unwrap();
        assert!(!s.take_cross_signing_reset("@a:x", 3_000).await.unwrap());
        assert!(s.claim_cross_signing("@a:x").await.unwrap());
        assert!(!s.claim_cross_signing("@a:x").await.unwrap());
        s.release_cross_signing("@a:x").await.unwrap();
        assert!(s.claim_cross_signing("@a:x").await.unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expiring_values_expire_are_taken_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.put_expiring(Space::LoginToken, "k", "v1", 1_000)
                .await
                .unwrap();
            s.put_expiring(Space::LoginToken, "old", "x", 500)
                .await
                .unwrap();
            // Spaces are apart.
            s.put_expiring(Space::SsoState, "k", "other", 1_000)
                .await
                .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let get = |space, k: &'static str, now| {
            let s = &s;
            async move { s.get_expiring(space, k, now).await.unwrap() }
        };
        assert_eq!(
            get(Space::LoginToken, "k", 999).await.as_deref(),
            Some("v1")
        );
        assert_eq!(get(Space::LoginToken, "k", 1_000).await, None, "expired");
        assert_eq!(get(Space::SsoState, "k", 0).await.as_deref(), Some("other"));
        // Replacing updates value and expiry.
        s.put_expiring(Space::LoginToken, "k", "v2", 2_000)
            .await
            .unwrap();
        assert_eq!(
            get(Space::LoginToken, "k", 1_500).await.as_deref(),
            Some("v2")
        );
        // Taken once.
        let take = |k: &'static str, now| {
            let s = &s;
            async move { s.take_expiring(Space::LoginToken, k, now).await.unwrap() }
        };
        assert_eq!(take("k", 1_500).await.as_deref(), Some("v2"));
        assert_eq!(take("k", 1_500).await, None);
        // An expired value is not handed out by take either, and is cleared.
        assert_eq!(take("old", 600).await, None);
        assert_eq!(get(Space::LoginToken, "old", 0).await, None);
        s.delete_expiring(Space::SsoState, "k").await.unwrap();
        assert_eq!(get(Space::SsoState, "k", 0).await, None);
    }

    #[tokio::test]
    async fn set_members_expire_are_removed_and_stay_in_their_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("state.sqlite3")).unwrap();
        let sp = Space::CompatUserSessions;
        s.add_member(sp, "@a:x", "s1", 1_000).await.unwrap();
        s.add_member(sp, "@a:x", "s2", 2_000).await.unwrap();
        // A set whose name extends another's is a set of its own.
        s.add_member(sp, "@a:xy", "s3", 2_000).await.unwrap();
        s.add_member(sp, "@a", "s4", 2_000).await.unwrap();
        // Values of the same space under other keys are not members.
        s.put_expiring(sp, "@a:x", "not a member", 2_000)
            .await
            .unwrap();
        let mut m = s.members(sp, "@a:x", 500).await.unwrap();
        m.sort();
        assert_eq!(m, ["s1", "s2"]);
        assert_eq!(
            s.members(sp, "@a:x", 1_000).await.unwrap(),
            ["s2"],
            "s1 expired"
        );
        // Adding again sets the expiry anew.
        s.add_member(sp, "@a:x", "s1", 3_000).await.unwrap();
        s.remove_member(sp, "@a:x", "s2").await.unwrap();
        assert_eq!(s.members(sp, "@a:x", 1_500).await.unwrap(), ["s1"]);
        assert_eq!(s.members(sp, "@a:xy", 0).await.unwrap(), ["s3"]);
        assert!(s
            .members(Space::SsoState, "@a:x", 0)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_claim_holds_until_it_expires_and_one_of_many_claimers_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStore::open(&dir.path().join("state.sqlite3")).unwrap());
        let sp = Space::CompatGrantLease;
        let claims = futures_util::future::join_all((0..8).map(|i| {
            let s = s.clone();
            async move {
                s.claim_expiring(sp, "sess", &format!("c{i}"), 1_000, 0)
                    .await
            }
        }))
        .await;
        assert_eq!(claims.iter().filter(|c| *c.as_ref().unwrap()).count(), 1);
        assert!(!s
            .claim_expiring(sp, "sess", "late", 2_000, 999)
            .await
            .unwrap());
        // Expired: claimable again.
        assert!(s
            .claim_expiring(sp, "sess", "next", 2_000, 1_000)
            .await
            .unwrap());
        assert_eq!(
            s.get_expiring(sp, "sess", 1_500).await.unwrap().as_deref(),
            Some("next")
        );
        // Another key, another claim.
        assert!(s
            .claim_expiring(sp, "other", "x", 2_000, 1_000)
            .await
            .unwrap());
        // Let go only by its holder.
        s.delete_expiring_if(sp, "sess", "someone-else")
            .await
            .unwrap();
        assert!(!s
            .claim_expiring(sp, "sess", "late", 3_000, 1_500)
            .await
            .unwrap());
        s.delete_expiring_if(sp, "sess", "next").await.unwrap();
        assert!(s
            .claim_expiring(sp, "sess", "late", 3_000, 1_500)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn state_survives_reopening_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.sqlite3");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.put_device(
                "@a:x",
                "D1",
                &DeviceRecord {
                    upstream_token: Some("tok".into()),
                },
            )
            .await
            .unwrap();
            s.put_device(
                "@a:x",
                "D2",
                &DeviceRecord {
                    upstream_token: None,
                },
            )
            .await
            .unwrap();
            s.mark_user_registered("@a:x").await.unwrap();
            assert_eq!(s.pin_subject("@a:x", "sub-a").await.unwrap(), Pin::New);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.device("@a:x", "D1").await.unwrap(),
            Some(DeviceRecord {
                upstream_token: Some("tok".into())
            })
        );
        assert_eq!(s.devices_of("@a:x").await.unwrap(), vec!["D1", "D2"]);
        assert!(s.user_registered("@a:x").await.unwrap());
        assert!(!s.user_registered("@b:x").await.unwrap());
        assert_eq!(s.pin_subject("@a:x", "sub-a").await.unwrap(), Pin::Matches);
        assert_eq!(
            s.pin_subject("@a:x", "sub-b").await.unwrap(),
            Pin::Conflict {
                owner: "sub-a".into()
            }
        );
        s.repin_subject("@a:x", "sub-b").await.unwrap();
        assert_eq!(s.pin_subject("@a:x", "sub-b").await.unwrap(), Pin::Matches);
        s.delete_device("@a:x", "D1").await.unwrap();
        assert_eq!(s.device("@a:x", "D1").await.unwrap(), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[tokio::test]
    async fn registration_flag_and_pin_share_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        s.mark_user_registered("@a:x").await.unwrap();
        assert_eq!(s.pin_subject("@a:x", "sub").await.unwrap(), Pin::New);
        assert!(s.user_registered("@a:x").await.unwrap());
        assert_eq!(
            s.pin_subject("@a:x", "other").await.unwrap(),
            Pin::Conflict {
                owner: "sub".into()
            }
        );
    }
}

#[cfg(test)]
mod schema_version_tests {
    use super::*;

    fn version(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_new_file_is_written_at_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        SqliteStore::open(&path).unwrap();
        assert_eq!(version(&path), SCHEMA_VERSION as i64);
    }

    #[tokio::test]
    async fn a_file_from_before_versioning_keeps_its_data() {
        // What every release before schema versions wrote: the version-1 tables, user_version 0.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute(
                "INSERT INTO tombstones (user_id) VALUES (?1)",
                params!["@gone:x"],
            )
            .unwrap();
        }
        assert_eq!(version(&path), 0);
        let s = SqliteStore::open(&path).unwrap();
        assert!(s.is_tombstoned("@gone:x").await.unwrap());
        drop(s);
        assert_eq!(version(&path), SCHEMA_VERSION as i64);
    }

    #[test]
    fn a_file_from_a_newer_gateway_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&path).err().expect("refused").0;
        assert!(err.contains("schema version 99"), "{err}");
    }
}
