//! Operator tasks on the database file: an online backup taken while caseroom runs, a restore, and
//! the lock that keeps a second caseroom process (or a restore) off a database in use.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::{StoreError, MIGRATIONS};

/// Held by a running caseroom for its database: `<database>.lock`, locked with the OS's advisory
/// file lock (released by the kernel when the process dies, even by `kill -9`).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Take the lock, or say that another process holds it.
    pub fn acquire(db: &Path) -> Result<InstanceLock, StoreError> {
        let path = sibling(db, ".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| io("open the lock file", source))?;
        match file.try_lock() {
            Ok(()) => Ok(InstanceLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse { lock: path }),
            Err(std::fs::TryLockError::Error(source)) => Err(io("lock the database", source)),
        }
    }
}

/// What a backup wrote.
#[derive(Debug)]
pub struct BackupReport {
    /// Size of the copy.
    pub bytes: u64,
    /// Archived messages in it.
    pub messages: u64,
    /// Webhook deliveries in it.
    pub deliveries: u64,
    /// Where the linked-tokens file was copied, if there was one.
    pub tokens: Option<PathBuf>,
    /// How long it took.
    pub took: Duration,
}

/// Copy the database at `db` into a new file `out` while caseroom may be writing to it: SQLite's
/// `VACUUM INTO` reads one consistent snapshot (WAL lets writers go on meanwhile; nothing waits for
/// the copy) and writes it compacted. Everything committed before it began is in the copy, which is
/// fsynced before this returns. The linked-tokens file, if any, is copied beside it as
/// `<out>.tokens.json` (mode 0600).
pub fn backup(db: &Path, tokens: &Path, out: &Path) -> Result<BackupReport, StoreError> {
    let t = Instant::now();
    if out.exists() {
        return Err(StoreError::Refused(format!(
            "{} exists; a backup never overwrites a file",
            out.display()
        )));
    }
    let target = out
        .to_str()
        .ok_or_else(|| StoreError::Refused(format!("{} is not a UTF-8 path", out.display())))?;
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute("VACUUM INTO ?1", [target])?;
    drop(conn);
    sync_file_and_dir(out)?;
    let copy = Connection::open_with_flags(out, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let count = |table: &str| -> Result<u64, StoreError> {
        let n: i64 = copy.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    };
    let (messages, deliveries) = (count("archive")?, count("inbox")?);
    let tokens = if tokens.exists() {
        let dest = crate::links::LinksFile::default_path(out);
        copy_private(tokens, &dest)?;
        Some(dest)
    } else {
        None
    };
    let bytes = std::fs::metadata(out)
        .map_err(|source| io("read the backup's size", source))?
        .len();
    Ok(BackupReport {
        bytes,
        messages,
        deliveries,
        tokens,
        took: t.elapsed(),
    })
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// Where the database that was replaced went (`None`: there was none).
    pub set_aside: Option<PathBuf>,
    /// The backup's schema version (migrated on the next start if older).
    pub schema: usize,
    /// Whether a linked-tokens file was restored too.
    pub tokens: bool,
}

/// Put the backup `from` in place of the database at `db`. Refused while caseroom runs on it (the
/// instance lock), and for a file that is not an intact caseroom database of this or an older
/// schema. The database it replaces is kept, renamed `<db>.before-restore-<unix time>`.
pub fn restore(db: &Path, tokens: &Path, from: &Path) -> Result<RestoreReport, StoreError> {
    let _lock = InstanceLock::acquire(db)?;
    let schema = check_backup(from)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = sibling(db, &format!(".before-restore-{stamp}"));
    let set_aside = if db.exists() {
        rename(db, &aside)?;
        for (ext, keep) in [("-wal", true), ("-shm", false)] {
            let f = sibling(db, ext);
            if f.exists() {
                if keep {
                    rename(&f, &sibling(&aside, ext))?;
                } else {
                    std::fs::remove_file(&f).map_err(|source| io("remove the old -shm", source))?;
                }
            }
        }
        Some(aside.clone())
    } else {
        None
    };
    let partial = sibling(db, ".restoring");
    std::fs::copy(from, &partial).map_err(|source| io("copy the backup", source))?;
    sync_file_and_dir(&partial)?;
    rename(&partial, db)?;
    sync_file_and_dir(db)?;
    let saved_tokens = crate::links::LinksFile::default_path(from);
    let restored_tokens = saved_tokens.exists();
    if restored_tokens {
        if tokens.exists() {
            rename(tokens, &crate::links::LinksFile::default_path(&aside))?;
        }
        copy_private(&saved_tokens, tokens)?;
    }
    Ok(RestoreReport {
        set_aside,
        schema,
        tokens: restored_tokens,
    })
}

/// An intact caseroom database of a schema this build can open; returns its schema version.
fn check_backup(from: &Path) -> Result<usize, StoreError> {
    let refused = |why: String| StoreError::Refused(format!("{}: {why}", from.display()));
    if !from.is_file() {
        return Err(refused("no such file".into()));
    }
    let c = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| refused(format!("cannot be opened ({e})")))?;
    let check: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| refused(format!("is not a SQLite database ({e})")))?;
    if check != "ok" {
        return Err(refused(format!("fails SQLite's integrity check: {check}")));
    }
    let version: usize = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_archive: bool = c.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'archive'",
        [],
        |r| r.get(0),
    )?;
    if version == 0 || !has_archive {
        return Err(refused("is not a caseroom database".into()));
    }
    if version > MIGRATIONS.len() {
        return Err(refused(format!(
            "was written by a newer caseroom (schema {version}, this one knows {})",
            MIGRATIONS.len()
        )));
    }
    Ok(version)
}

/// `<path><suffix>`, e.g. `caseroom.db` → `caseroom.db.lock`, or SQLite's `caseroom.db-wal`.
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io(what: &'static str, source: std::io::Error) -> StoreError {
    StoreError::Io { what, source }
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(|source| io("rename a database file", source))
}

fn sync_file_and_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| io("sync the copy to disk", source))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| io("sync the directory", source))?;
    }
    Ok(())
}

/// Copy a secret file, readable by its owner only.
fn copy_private(from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let data = std::fs::read(from).map_err(|source| io("read the tokens file", source))?;
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(to)
        .map_err(|source| io("create the tokens copy", source))?;
    f.write_all(&data)
        .and_then(|_| f.sync_all())
        .map_err(|source| io("write the tokens copy", source))
}
