//! banger's state in SQLite: VMs, images, kernels and long operations.
//!
//! The database runs in WAL mode with foreign keys on; its schema is
//! versioned with `PRAGMA user_version` through `rusqlite_migration`, each
//! pending migration applied in one transaction when the store opens.

mod images;
mod operations;
mod templates;
mod vms;

pub use operations::{Operation, OperationState};

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Errors of the store. Messages name the VM, image or kernel involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such record; the message says what was looked for.
    #[error("{0}")]
    NotFound(String),
    #[error("VM ref '{reference}' is ambiguous: it matches {}; use the name or a longer id prefix", .matches.join(", "))]
    Ambiguous {
        reference: String,
        matches: Vec<String>,
    },
    #[error("a VM named {0} already exists: pick another name or delete that VM")]
    NameTaken(String),
    #[error("address {0} is already given to another VM")]
    AddressTaken(String),
    /// A record others depend on, e.g. an image VMs boot from.
    #[error("{what} is in use by {}", .users.join(", "))]
    InUse { what: String, users: Vec<String> },
    #[error("operation {0} has already finished")]
    AlreadyFinished(i64),
    #[error("creating {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "database {path} cannot use WAL journaling (it stays in {mode:?} mode): put it on a local file system"
    )]
    NoWal { path: PathBuf, mode: String },
    #[error(
        "the database schema is version {found}, newer than this banger knows ({known}): upgrade banger"
    )]
    TooNew { found: usize, known: usize },
    #[error("migrating the database schema")]
    Migrate(#[source] rusqlite_migration::Error),
    #[error("{0} is not valid UTF-8, which the database cannot store")]
    NonUtf8Path(PathBuf),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("database query failed")]
    Sql(#[from] rusqlite::Error),
}

/// The schema, one entry per version; never edit a released entry, append.
const MIGRATIONS: &[M<'static>] = &[
    M::up(
        "CREATE TABLE kernels (
        name TEXT PRIMARY KEY NOT NULL,
        kernel TEXT NOT NULL,
        initrd TEXT,
        vmlinux TEXT,
        release TEXT,
        created_at TEXT NOT NULL
    ) STRICT;
    CREATE TABLE images (
        name TEXT PRIMARY KEY NOT NULL,
        rootfs TEXT NOT NULL,
        kernel TEXT NOT NULL REFERENCES kernels(name),
        managed INTEGER NOT NULL CHECK (managed IN (0, 1)),
        size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
        created_at TEXT NOT NULL
    ) STRICT;
    CREATE INDEX images_kernel ON images(kernel);
    CREATE TABLE vms (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL REFERENCES images(name),
        state TEXT NOT NULL,
        backend TEXT NOT NULL,
        spec TEXT NOT NULL,
        dir TEXT NOT NULL,
        pid INTEGER,
        created_at TEXT NOT NULL,
        last_error TEXT
    ) STRICT;
    CREATE INDEX vms_image ON vms(image);
    CREATE TABLE operations (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        message TEXT,
        error TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT
    ) STRICT;",
    ),
    M::up(
        "ALTER TABLE images ADD COLUMN work_seed TEXT;
    ALTER TABLE vms ADD COLUMN nat INTEGER NOT NULL DEFAULT 0 CHECK (nat IN (0, 1));",
    ),
    M::up(
        "ALTER TABLE vms ADD COLUMN ip TEXT;
    ALTER TABLE vms ADD COLUMN tap TEXT;
    ALTER TABLE vms ADD COLUMN ssh_port INTEGER;
    CREATE UNIQUE INDEX vms_ip ON vms(ip);",
    ),
    M::up("ALTER TABLE kernels ADD COLUMN dir TEXT;"),
    M::up(
        "ALTER TABLE kernels ADD COLUMN banger_initramfs TEXT;
    ALTER TABLE vms ADD COLUMN initramfs TEXT NOT NULL DEFAULT 'auto'
        CHECK (initramfs IN ('auto', 'banger', 'distro'));",
    ),
    M::up(
        "CREATE TABLE templates (
        id TEXT PRIMARY KEY NOT NULL,
        image TEXT NOT NULL REFERENCES images(name),
        backend TEXT NOT NULL,
        vcpu INTEGER NOT NULL CHECK (vcpu > 0),
        memory_mib INTEGER NOT NULL CHECK (memory_mib > 0),
        disk_bytes INTEGER NOT NULL CHECK (disk_bytes > 0),
        key TEXT NOT NULL,
        dir TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('building', 'ready')),
        size_bytes INTEGER NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
        build_ms INTEGER,
        created_at TEXT NOT NULL,
        last_used_at TEXT,
        uses INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX templates_image ON templates(image);
    ALTER TABLE vms ADD COLUMN start_kind TEXT NOT NULL DEFAULT 'cold'
        CHECK (start_kind IN ('cold', 'warm'));
    ALTER TABLE vms ADD COLUMN start_template TEXT;
    ALTER TABLE vms ADD COLUMN start_note TEXT;
    ALTER TABLE vms ADD COLUMN start_restore_ms INTEGER;",
    ),
];

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle to the database; cheap to clone, `Send + Sync`.
///
/// One connection behind a std mutex serves every task: statements are
/// short, so holding the lock briefly from async code is fine.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating it and its directory, mode 0700, if needed) the
    /// database at `path` and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        // FULL: a committed VM record survives power loss too, so a disk on
        // the host is never left without the record that owns it.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests, dry runs).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (each statement is atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v: i64 = self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// The schema version this build creates.
    pub fn latest_schema_version() -> usize {
        MIGRATIONS.len()
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len();
    match usize::try_from(found) {
        Ok(v) if v <= known => {}
        _ => {
            return Err(StoreError::TooNew {
                found: usize::try_from(found).unwrap_or(usize::MAX),
                known,
            });
        }
    }
    Migrations::from_slice(MIGRATIONS)
        .to_latest(conn)
        .map_err(StoreError::Migrate)
}

/// A path as database text; refusing what would not read back the same.
fn path_text(p: &Path) -> Result<&str, StoreError> {
    p.to_str()
        .ok_or_else(|| StoreError::NonUtf8Path(p.to_path_buf()))
}

/// Whether `e` is SQLite's `extended` constraint failure (its message, e.g.
/// "UNIQUE constraint failed: vms.name", contains `detail`).
fn is_constraint(e: &rusqlite::Error, extended: std::ffi::c_int, detail: &str) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            f.extended_code == extended && msg.as_deref().is_none_or(|m| m.contains(detail))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        Migrations::from_slice(MIGRATIONS)
            .validate()
            .expect("valid migrations");
    }

    #[test]
    fn store_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<Store>();
    }

    #[test]
    fn open_migrates_an_empty_file_in_wal_mode() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("sub/dir/banger.db");
        let s = Store::open(&p).expect("open");
        assert_eq!(
            s.schema_version().expect("v"),
            Store::latest_schema_version()
        );
        let conn = s.conn();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 1);
        let busy: i64 = conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .expect("busy");
        assert_eq!(busy, 5000);
        let mut tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        tables.retain(|t| !t.starts_with("sqlite_"));
        assert_eq!(
            tables,
            ["images", "kernels", "operations", "templates", "vms"]
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("banger.db");
        Connection::open(&p)
            .expect("c")
            .pragma_update(None, "user_version", 99)
            .expect("set");
        let e = Store::open(&p).expect_err("too new");
        assert!(
            matches!(
                e,
                StoreError::TooNew {
                    found: 99,
                    known
                } if known == MIGRATIONS.len()
            ),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade banger"), "{e}");
    }

    #[test]
    fn open_fails_with_the_path() {
        let t = tempfile::tempdir().expect("tmp");
        let file = t.path().join("file");
        std::fs::write(&file, b"").expect("file");
        let e = Store::open(&file.join("banger.db")).expect_err("parent is a file");
        assert!(
            matches!(e, StoreError::CreateDir { ref path, .. } if path == &file),
            "{e}"
        );
        std::fs::write(
            t.path().join("junk.db"),
            b"this is not a database, just sixteen+ bytes of text",
        )
        .expect("junk");
        let e = Store::open(&t.path().join("junk.db")).expect_err("not a db");
        assert!(e.to_string().contains("junk.db"), "{e}");
    }
}
