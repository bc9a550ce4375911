//! The SQLite store: rooms, affiliations, the room archive (MAM), service metadata.
//!
//! One [`Store`] is owned by one worker thread ([`worker`]); the async side talks to it over
//! channels, so no SQLite call ever runs on the XMPP read loop. WAL mode; archive appends that
//! queue up while a transaction commits are written together in the next one (group commit).

pub mod body;
pub mod ops;
pub mod pg;
pub mod pg_links;
pub mod pg_tls;
pub mod prune;
mod readable;
pub mod search;
pub mod worker;

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use minidom::Element;
use rusqlite::{params, Connection, OptionalExtension};
use xmpp_parsers::{jid::BareJid, message::Message, muc::user::Affiliation};

use crate::muc::mam::{ArchiveQuery, MamPage, PageItem, QueryError, With};
use crate::muc::{ArchivedMessage, Persist, RoomInfo};
use crate::xmpp::outbound::{affiliation_str, parse_affiliation};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("PostgreSQL: {}", with_causes(.0))]
    Postgres(#[from] postgres::Error),
    /// The database directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// Directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Another process (a running caseroom) holds the database's lock.
    #[error("the database is in use: another caseroom holds {lock} (stop it first)")]
    InUse {
        /// The lock file.
        lock: std::path::PathBuf,
    },
    /// An operator task was refused, with the reason.
    #[error("{0}")]
    Refused(String),
    /// A file operation failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The database was written by a newer caseroom, whose rows this one may misread (say, packed
    /// webhook bodies taken for JSON): it does not touch it.
    #[error(
        "the store has schema version {found}, this caseroom knows up to {known}: \
         it was written by a newer caseroom; run that one (or restore a backup taken before the upgrade)"
    )]
    NewerSchema {
        /// The store's version.
        found: usize,
        /// The newest this build knows.
        known: usize,
    },
    /// A stored row could not be decoded.
    #[error("corrupt archive row {id}: {reason}")]
    Corrupt {
        /// Archive id.
        id: String,
        /// What failed.
        reason: String,
    },
}

/// Refuse a store whose schema is newer than the `known` migrations.
pub(crate) fn newer_schema(found: usize, known: usize) -> Result<(), StoreError> {
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    Ok(())
}

/// An error and its causes, "a: b: c": the PostgreSQL client's own message names only the kind
/// ("db error", "error performing TLS handshake"), the server's words or the TLS reason are its
/// cause.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: rooms, affiliations, archive, meta
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        anonymous INTEGER NOT NULL DEFAULT 0,
        subject TEXT NOT NULL DEFAULT '');
     CREATE TABLE affiliations (
        room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
        jid TEXT NOT NULL,
        affiliation TEXT NOT NULL,
        PRIMARY KEY (room, jid));
     CREATE TABLE archive (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        room TEXT NOT NULL,
        ts INTEGER NOT NULL,
        nick TEXT NOT NULL,
        sender TEXT NOT NULL,
        stanza TEXT NOT NULL);
     CREATE INDEX archive_room_seq ON archive(room, seq);
     CREATE INDEX archive_room_ts ON archive(room, ts);",
    // 2: the webhook inbox; archive rows remember which delivery they came from (exactly once).
    "CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        tracker TEXT NOT NULL,
        delivery TEXT,
        body_hash TEXT NOT NULL,
        received INTEGER NOT NULL,
        content_type TEXT,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        note TEXT,
        UNIQUE (tracker, delivery));
     CREATE INDEX inbox_hash ON inbox(tracker, body_hash, received);
     CREATE INDEX inbox_pending ON inbox(state) WHERE state = 'pending';
     ALTER TABLE archive ADD COLUMN origin TEXT;
     CREATE UNIQUE INDEX archive_origin ON archive(origin) WHERE origin IS NOT NULL;",
    // 3: per-person filters.
    "CREATE TABLE mutes (
        room TEXT NOT NULL,
        jid TEXT NOT NULL,
        rules TEXT NOT NULL,
        PRIMARY KEY (room, jid));",
    // 4: each message also as MAM serves it (inside <forwarded/>), so queries parse nothing. Rows
    // archived before have NULL and are serialised when read. Since then `stanza` is written
    // empty: a message is kept once, as `forwarded`, and decoded from it when read for join
    // history (no schema change: rows of either kind read the same).
    "ALTER TABLE archive ADD COLUMN forwarded BLOB;",
    // 5: a delivery's body in a table of its own. SQLite rewrites a whole row, overflow pages
    // included, on any UPDATE that changes its size: marking a 13.5 KB delivery `done` wrote its
    // body to the WAL a second time. New rows keep `inbox.body` empty (x'') and the body here under
    // the same id; rows accepted before read as before (`COALESCE`).
    "CREATE TABLE inbox_body (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
    // 6: full-text search (XEP-0431), see `search`. Messages already archived are indexed after
    // the upgrade by the store thread, newest first, a batch at a time.
    "CREATE VIRTUAL TABLE archive_fts USING fts5(room, text, content='', contentless_delete=1,
        tokenize='unicode61 remove_diacritics 2');
     INSERT INTO meta(key, value)
        VALUES ('fts_backfill_below', (SELECT COALESCE(MAX(seq), 0) + 1 FROM archive))
        ON CONFLICT(key) DO UPDATE SET value = excluded.value;",
    // 7: which archived messages showed which tracker object (a comment's URL), so that the
    // tracker's "comment deleted" retracts them (XEP-0425 tombstones). Only messages archived
    // from now on are known; an older comment's deletion finds nothing to retract.
    "CREATE TABLE archive_ref (
        room TEXT NOT NULL,
        ref TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (room, ref, seq)) WITHOUT ROWID;
     CREATE INDEX archive_ref_seq ON archive_ref(seq);",
    // 8: messages are indexed for search in batches after their commit (`Store::index_pending`);
    // every message up to this seq is in the index. Until now each was indexed in its own commit.
    "INSERT INTO meta(key, value)
        VALUES ('fts_indexed_through', (SELECT COALESCE(MAX(seq), 0) FROM archive))
        ON CONFLICT(key) DO UPDATE SET value = excluded.value;",
    // 9: bodies packed with LZ4 when that makes them smaller (`body`): a 13.5 KB delivery was a leaf
    // and four overflow pages written twice (WAL, then database). Rows before keep 0, as they are.
    "ALTER TABLE inbox_body ADD COLUMN packed INTEGER NOT NULL DEFAULT 0;",
];

/// A webhook delivery to keep.
#[derive(Debug, Clone)]
pub struct InboxItem {
    /// Tracker name.
    pub tracker: String,
    /// The tracker's delivery id, if it sends one.
    pub delivery: Option<String>,
    /// When it arrived (µs since the epoch).
    pub received: i64,
    /// Content-Type.
    pub content_type: Option<String>,
    /// Headers the dialects need, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Vec<u8>,
    /// Hex SHA-256 of `body` (the duplicate check's key) when the receiver computed it while the
    /// body was in its cache; `None`: the store computes it.
    pub body_hash: Option<String>,
    /// How SQLite keeps `body` ([`body::pack`]) when the receiver packed it off the store's
    /// thread; `None`: the store packs it.
    pub packed: Option<body::Packed>,
    /// The document the receiver parsed from `body` ([`crate::webhook::parse_body`]) while checking
    /// it, handed to the bridge with the row and never stored; `None`: the bridge parses the body
    /// (replays, the catch-up poller, another instance's rows).
    pub doc: Option<serde_json::Value>,
}

/// A message for the archive, with what the store writes of it when that was worked out before
/// the store thread ([`Appended::prepared`], which the bridge calls): the store thread is serial,
/// and serialising a message and reading its search text were a fifth of its work per webhook
/// delivery (BENCHMARKS.md §5, stop 29).
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The message.
    pub message: ArchivedMessage,
    /// Its bytes and search entries; `None`: the store works them out.
    pub prepared: Option<Prepared>,
}

/// What the store writes of a message besides its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The message as MAM serves it ([`crate::muc::mam::forwarded`]).
    forwarded: Vec<u8>,
    /// Its searchable text and the tracker object it shows ([`search::index_entries`]).
    text: String,
    refers: Option<String>,
}

impl Prepared {
    fn of(m: &ArchivedMessage) -> Result<Prepared, StoreError> {
        Ok(Prepared::around(forwarded_of(m)?, m))
    }

    /// `m`'s parts, its MAM bytes given.
    fn around(forwarded: Vec<u8>, m: &ArchivedMessage) -> Prepared {
        let (text, refers) = search::index_entries(m);
        Prepared {
            forwarded,
            text,
            refers,
        }
    }
}

impl Appended {
    /// `message` with its bytes and search entries worked out here. A message that cannot be
    /// serialised is left to the store, which refuses it with the reason.
    pub fn prepared(mut message: ArchivedMessage) -> Appended {
        // Serialised from the message itself, not a copy of it (`mam::forwarded_owned`).
        let prepared = crate::muc::mam::forwarded_owned(&mut message)
            .map(|forwarded| Prepared::around(forwarded, &message));
        Appended { message, prepared }
    }

    /// The prepared parts, worked out now when they were not.
    fn parts(&self) -> Result<std::borrow::Cow<'_, Prepared>, StoreError> {
        Prepared::or_of(self.prepared.as_ref(), &self.message)
    }
}

impl Prepared {
    /// `p`, or `m`'s parts worked out now.
    fn or_of<'a>(
        p: Option<&'a Prepared>,
        m: &ArchivedMessage,
    ) -> Result<std::borrow::Cow<'a, Prepared>, StoreError> {
        Ok(match p {
            Some(p) => std::borrow::Cow::Borrowed(p),
            None => std::borrow::Cow::Owned(Prepared::of(m)?),
        })
    }
}

/// A message to append and its prepared parts, if any (borrowed: [`Store::commit`] copies nothing).
type ToAppend<'a> = (&'a ArchivedMessage, Option<&'a Prepared>);

impl From<ArchivedMessage> for Appended {
    fn from(message: ArchivedMessage) -> Appended {
        Appended {
            message,
            prepared: None,
        }
    }
}

/// A stored delivery.
#[derive(Debug, Clone)]
pub struct InboxRow {
    /// Row id.
    pub id: i64,
    /// The delivery.
    pub item: InboxItem,
}

/// Outcome of accepting a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored under this id.
    New(i64),
    /// Seen before: nothing stored.
    Duplicate,
}

/// The duplicate check's key for a body: hex SHA-256.
pub fn body_hash(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(body))
}

/// What the store thread needs from a backend while caseroom runs. [`Store`] (SQLite) is the only one
/// today; a second backend (PostgreSQL, for several instances behind one domain) implements this
/// without touching the cores, which never see the store: they emit [`worker::StoreOp`]s and get
/// [`worker::StoreEvent`]s back. Start-up reads (rooms, recent history, meta) stay on [`Store`] until
/// then. Every method keeps the promise its doc states (commit = one transaction).
pub trait Backend: Send {
    /// Bodies are kept LZ4-packed ([`body`]): the HTTP handler packs them before they reach the
    /// store thread. PostgreSQL keeps them as they came (it compresses large values itself).
    const PACKS_BODIES: bool = false;
    /// Accept deliveries and append messages in one transaction (see [`Store::commit`]).
    fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[Appended],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError>;
    /// Persist a room change.
    fn persist(&mut self, p: &Persist) -> Result<(), StoreError>;
    /// Run an archive query.
    fn query(&self, q: &ArchiveQuery) -> Result<MamPage, QueryError>;
    /// The newest `n` messages of a room, oldest first.
    fn recent(&self, room: &str, n: usize) -> Result<Vec<ArchivedMessage>, StoreError>;
    /// Remember a value.
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// A remembered value.
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Delete one batch of a retention job; false once it is done.
    fn prune_step(&mut self, job: &mut prune::PruneJob) -> Result<bool, StoreError>;
    /// Index one batch of messages archived before the full-text index existed; false when done.
    fn fts_backfill_step(&mut self) -> Result<bool, StoreError>;
    /// Index for search the messages committed since the last call, if they are due (everything,
    /// when `force`). A backend that indexes inside its commits has nothing to do.
    fn index_pending(&mut self, _force: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// How long until the messages waiting for the index are due; `None`: none wait.
    fn index_due_in(&self) -> Option<std::time::Duration> {
        None
    }
    /// Replace a message (or every message showing a tracker object) by its tombstone (XEP-0425)
    /// and take it out of search; the tombstones, none when there was no such message.
    fn moderate(
        &mut self,
        m: &crate::muc::moderation::Moderation,
    ) -> Result<Vec<ArchivedMessage>, StoreError>;
    /// Deliveries not yet handled, oldest first.
    fn pending_inbox(&self) -> Result<Vec<InboxRow>, StoreError>;
    /// Pending deliveries nobody is handling: received before `before` (µs since the epoch), or
    /// (several instances) accepted by an instance no longer running.
    fn orphaned_inbox(&self, before: i64) -> Result<Vec<InboxRow>, StoreError> {
        Ok(self
            .pending_inbox()?
            .into_iter()
            .filter(|r| r.item.received < before)
            .collect())
    }
    /// How many deliveries wait, and since when (µs since the epoch).
    fn inbox_backlog(&self) -> Result<(u64, Option<i64>), StoreError>;
    /// Close a delivery that produced no room message.
    fn finish_inbox(&mut self, id: i64, state: &str, note: &str) -> Result<(), StoreError>;
    /// Make commits that were not synced durable (called when the store thread is idle); true if
    /// something remains to sync.
    fn sync(&mut self) -> Result<bool, StoreError>;
    /// A connection for archive queries beside this one's writes.
    fn reader(&self) -> Result<Self, StoreError>
    where
        Self: Sized;
    /// Move what the write-ahead log holds into the database without blocking writes; returns the
    /// frames the log holds after it.
    fn checkpoint(&self) -> Result<u64, StoreError>;
    /// Has anyone committed since the last call? (Nothing to checkpoint otherwise.)
    fn wal_changed(&mut self) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Keep the WAL from starting over (see [`Store::hold_wal`]); nothing for a backend without one.
    fn hold_wal(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Let the WAL start over.
    fn release_wal(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// fsync the database file, off the writer's path, before the writer's own checkpoint (see
    /// `store.wal_limit_mb`), so that checkpoint's sync has only its own pages left to write.
    fn flush_database(&self) -> Result<(), StoreError>;
    /// WAL frames at which the writer checkpoints once itself so the WAL starts over.
    fn wal_limit_frames(&self) -> u64;
    /// Commits so far that were fsynced (webhook accepts; every commit with
    /// `store.fsync_messages`): the reader then checkpoints small and often.
    fn synced_commits(&self) -> u64 {
        0
    }
    /// Checkpoint inside commits again (when no reader thread can do it).
    fn checkpoint_in_commits(&self) -> Result<(), StoreError>;
    /// The file whose fdatasync makes a commit durable, for a backend whose commits that accept
    /// deliveries can be written without an fsync of their own and synced by another thread
    /// (`worker`'s syncer) while the next commit is written. `on` asks it to write them so (the
    /// syncer is running) or to fsync them itself again. None: this backend cannot (PostgreSQL's
    /// server syncs its own commits).
    fn sync_accepts_elsewhere(&mut self, _on: bool) -> Option<std::path::PathBuf> {
        None
    }
    /// One room's description and affiliations.
    fn room_info(&self, name: &str) -> Result<Option<RoomInfo>, StoreError>;
    /// Who is in a room as the store keeps it (several instances); None: this store keeps no
    /// occupants (one instance).
    fn sessions(
        &self,
        _room: &str,
    ) -> Result<Option<Vec<crate::muc::room::SessionRow>>, StoreError> {
        Ok(None)
    }
}

/// Whether this instance does the work only one instance may do at a time: tracker syncs, catch-up
/// polls, retention, replaying deliveries another instance accepted and then died with. Always with
/// SQLite (one instance per database); with PostgreSQL, the holder of an advisory lock
/// ([`pg::contend`]).
/// It also counts the changes of the set of running instances (epochs): rooms may move then.
#[derive(Clone, Debug, Default)]
pub struct Leadership(std::sync::Arc<LeadershipState>);

#[derive(Debug, Default)]
struct LeadershipState {
    leader: std::sync::atomic::AtomicBool,
    epoch: std::sync::atomic::AtomicU64,
    linked: std::sync::atomic::AtomicBool,
    /// The thread that watches the store for this (PostgreSQL), woken when the link comes up.
    watcher: std::sync::OnceLock<std::thread::Thread>,
    /// Wakes the driver when the epoch changes ([`Leadership::changed`]).
    changed: tokio::sync::Notify,
}

impl Leadership {
    /// The only instance: always the leader.
    pub fn always() -> Leadership {
        let l = Leadership::follower();
        l.set(true);
        l
    }

    /// Not (yet) the leader; [`Leadership::set`] changes it.
    pub fn follower() -> Leadership {
        Leadership::default()
    }

    /// Is this instance the leader now?
    pub fn is_leader(&self) -> bool {
        self.0.leader.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Become (or stop being) the leader.
    pub fn set(&self, on: bool) {
        self.0
            .leader
            .store(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times the set of running instances changed.
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This instance's link to the XMPP server is up: the server may route rooms to it, and the
    /// other instances are told ([`pg::contend`]).
    pub fn set_linked(&self) {
        self.0
            .linked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.0.watcher.get() {
            t.unpark();
        }
    }

    /// `thread` tells the others when this instance is linked ([`pg::contend`]).
    pub fn watched_by(&self, thread: std::thread::Thread) {
        let _ = self.0.watcher.set(thread);
    }

    /// Has this instance's link been up?
    pub fn is_linked(&self) -> bool {
        self.0.linked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The set of running instances changed.
    pub fn next_epoch(&self) {
        self.0
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A permit is kept when nobody waits: the next `changed` returns at once.
        self.0.changed.notify_one();
    }

    /// Resolves after the epoch changed (at once if it changed since the last call returned), so
    /// that rooms go cold and pending deliveries are relayed again without waiting for a tick.
    pub async fn changed(&self) {
        self.0.changed.notified().await
    }
}

/// What start-up reads from a store before its thread takes it over (both backends).
pub trait Startup: Backend {
    /// Every stored room with its affiliations.
    fn rooms(&self) -> Result<Vec<RoomInfo>, StoreError>;
    /// Create or update rooms, applying their affiliations over the stored ones.
    fn upsert_rooms(&mut self, rooms: &[RoomInfo]) -> Result<(), StoreError>;
    /// Every per-person filter: (room, person, rules).
    #[allow(clippy::type_complexity)]
    fn mutes(&self)
        -> Result<Vec<(String, BareJid, Vec<crate::config::FilterConfig>)>, StoreError>;
    /// The highest archive sequence number.
    fn last_seq(&self) -> Result<u64, StoreError>;
    /// The occupant-id salt, created on first use.
    fn occupant_salt(&self) -> Result<String, StoreError>;
    /// The account links: the tokens file beside an SQLite store; the shared table on
    /// PostgreSQL (filled from the file the first time, [`pg_links::load`]).
    fn links(&mut self, file: &crate::links::LinksFile) -> Result<crate::links::Links, StoreError>;
}

impl Startup for Store {
    fn rooms(&self) -> Result<Vec<RoomInfo>, StoreError> {
        Store::rooms(self)
    }
    fn upsert_rooms(&mut self, rooms: &[RoomInfo]) -> Result<(), StoreError> {
        Store::upsert_rooms(self, rooms)
    }
    fn mutes(
        &self,
    ) -> Result<Vec<(String, BareJid, Vec<crate::config::FilterConfig>)>, StoreError> {
        Store::mutes(self)
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        Store::last_seq(self)
    }
    fn occupant_salt(&self) -> Result<String, StoreError> {
        Store::occupant_salt(self)
    }
    fn links(&mut self, file: &crate::links::LinksFile) -> Result<crate::links::Links, StoreError> {
        file.load().map_err(|e| StoreError::Refused(e.to_string()))
    }
}

impl Startup for pg::PgStore {
    fn rooms(&self) -> Result<Vec<RoomInfo>, StoreError> {
        pg::PgStore::rooms(self)
    }
    fn upsert_rooms(&mut self, rooms: &[RoomInfo]) -> Result<(), StoreError> {
        pg::PgStore::upsert_rooms(self, rooms)
    }
    fn mutes(
        &self,
    ) -> Result<Vec<(String, BareJid, Vec<crate::config::FilterConfig>)>, StoreError> {
        pg::PgStore::mutes(self)
    }
    fn last_seq(&self) -> Result<u64, StoreError> {
        pg::PgStore::last_seq(self)
    }
    fn occupant_salt(&self) -> Result<String, StoreError> {
        pg::PgStore::occupant_salt(self)
    }
    fn links(&mut self, file: &crate::links::LinksFile) -> Result<crate::links::Links, StoreError> {
        pg::PgStore::links(self, file)
    }
}

impl Backend for Store {
    const PACKS_BODIES: bool = true;
    fn room_info(&self, name: &str) -> Result<Option<RoomInfo>, StoreError> {
        Ok(self.rooms_named(Some(name))?.pop())
    }
    fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[Appended],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError> {
        Store::commit_appended(self, items, msgs)
    }
    fn persist(&mut self, p: &Persist) -> Result<(), StoreError> {
        Store::persist(self, p)
    }
    fn query(&self, q: &ArchiveQuery) -> Result<MamPage, QueryError> {
        Store::query(self, q)
    }
    fn recent(&self, room: &str, n: usize) -> Result<Vec<ArchivedMessage>, StoreError> {
        Store::recent(self, room, n)
    }
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        Store::set_meta(self, key, value)
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Store::meta(self, key)
    }
    fn prune_step(&mut self, job: &mut prune::PruneJob) -> Result<bool, StoreError> {
        Store::prune_step(self, job)
    }
    fn fts_backfill_step(&mut self) -> Result<bool, StoreError> {
        Store::fts_backfill_step(self)
    }
    fn index_pending(&mut self, force: bool) -> Result<(), StoreError> {
        Store::index_pending(self, force)
    }
    fn index_due_in(&self) -> Option<std::time::Duration> {
        Store::index_due_in(self)
    }
    fn moderate(
        &mut self,
        m: &crate::muc::moderation::Moderation,
    ) -> Result<Vec<ArchivedMessage>, StoreError> {
        Store::moderate(self, m)
    }
    fn pending_inbox(&self) -> Result<Vec<InboxRow>, StoreError> {
        Store::pending_inbox(self)
    }
    fn inbox_backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (n, oldest): (i64, Option<i64>) = self.conn.query_row(
            "SELECT COUNT(*), MIN(received) FROM inbox WHERE state = 'pending'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, oldest))
    }
    fn finish_inbox(&mut self, id: i64, state: &str, note: &str) -> Result<(), StoreError> {
        Store::finish_inbox(self, id, state, note)
    }
    fn sync(&mut self) -> Result<bool, StoreError> {
        Store::sync(self)
    }
    fn reader(&self) -> Result<Self, StoreError> {
        Store::reader(self)
    }
    fn checkpoint(&self) -> Result<u64, StoreError> {
        Store::checkpoint(self)
    }
    fn wal_changed(&mut self) -> Result<bool, StoreError> {
        Store::wal_changed(self)
    }
    fn hold_wal(&mut self) -> Result<(), StoreError> {
        Store::hold_wal(self)
    }
    fn release_wal(&mut self) -> Result<(), StoreError> {
        Store::release_wal(self)
    }
    fn flush_database(&self) -> Result<(), StoreError> {
        // SQLite syncs the database file only when a checkpoint copies the *whole* WAL; the
        // reader's checkpoints beside commits never do, so the writer's would sync all their pages.
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_data())
            .map_err(|source| StoreError::Io {
                what: "sync the database file",
                source,
            })
    }
    fn synced_commits(&self) -> u64 {
        self.synced_commits
    }
    fn wal_limit_frames(&self) -> u64 {
        let page: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap_or(4096);
        // A frame is a page and a 24-byte header.
        (self.wal_limit / (page.max(512) as u64 + 24)).max(1)
    }
    fn checkpoint_in_commits(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
        Ok(())
    }
    fn sync_accepts_elsewhere(&mut self, on: bool) -> Option<std::path::PathBuf> {
        // In WAL mode a commit is durable once the WAL file is: SQLite's own FULL commit is an
        // fsync of that file after the commit is written (sqlite.org/pragma.html#pragma_synchronous,
        // "FULL": in WAL mode the WAL is synced after each commit).
        self.accepts_synced_elsewhere = on;
        Some(ops::sibling(&self.path, "-wal"))
    }
}

/// Default WAL size at which the writer checkpoints so the WAL starts over (`store.wal_limit_mb`).
const DEFAULT_WAL_LIMIT: u64 = 64 << 20;

/// Messages per room, shared by the writer (which counts its appends) and the reader.
type Counts = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// The open database.
pub struct Store {
    conn: Connection,
    /// Messages per room, so unfiltered MAM queries need no COUNT over the whole archive. Loaded on
    /// first use per room, kept exact on append (only this store writes the archive).
    counts: Counts,
    /// Also fsync commits that only archive room messages (see [`Store::set_fsync_messages`]).
    fsync_messages: bool,
    /// A commit since the last fsync was not synced.
    unsynced: bool,
    /// Commits that accept deliveries are written without an fsync, which the store thread's syncer
    /// does beside the next commit before anyone is answered ([`Backend::sync_accepts_elsewhere`]).
    accepts_synced_elsewhere: bool,
    /// The connection is at `synchronous=NORMAL`: a relaxed write left it there, and every other
    /// write sets FULL again first ([`Store::synced`]). Switching costs a parse of the PRAGMA, so
    /// a run of relaxed commits (room chat) switches once, not twice per commit.
    normal: std::cell::Cell<bool>,
    /// Commits so far that were fsynced ([`Backend::synced_commits`]).
    synced_commits: u64,
    /// The database file.
    path: std::path::PathBuf,
    /// WAL bytes at which the writer checkpoints so the WAL starts over (`store.wal_limit_mb`).
    wal_limit: u64,
    /// Messages committed but not yet in the full-text index (see [`Store::index_pending`]).
    unindexed: Option<search::Unindexed>,
    /// The reader's: a connection holding a read snapshot so that the WAL does not start over
    /// (see [`Store::hold_wal`]), and the `data_version` it last saw.
    wal_hold: Option<Connection>,
    seen_version: Option<i64>,
}

impl Store {
    /// Set `synchronous=FULL` again if a relaxed write left the connection at NORMAL: every write
    /// but the relaxed ones (room messages, the search index) calls this first, so it is fsynced
    /// at its commit as it always was.
    fn synced(&self) -> Result<(), StoreError> {
        if self.normal.get() {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            self.normal.set(false);
        }
        Ok(())
    }

    /// Replace the message `m.id` of `m.room` by its tombstone (XEP-0425 § Tombstones: MAM serves the
    /// tombstone in its place) and take it out of the search index, in one transaction.
    pub fn moderate(
        &mut self,
        m: &crate::muc::moderation::Moderation,
    ) -> Result<Vec<ArchivedMessage>, StoreError> {
        // A retracted message leaves the index: it must be in it first.
        self.index_pending(true)?;
        self.synced()?;
        let tx = self.conn.transaction()?;
        let seqs: Vec<i64> = match &m.refers {
            Some(r) => tx
                .prepare_cached("SELECT seq FROM archive_ref WHERE room = ?1 AND ref = ?2")?
                .query_map(params![m.room, r], |row| row.get(0))?
                .collect::<Result<_, _>>()?,
            None => tx
                .query_row(
                    "SELECT seq FROM archive WHERE room = ?1 AND id = ?2",
                    params![m.room, m.id],
                    |row| row.get(0),
                )
                .optional()?
                .into_iter()
                .collect(),
        };
        let mut stones = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let row = tx
                .query_row(
                    &format!("SELECT {PAGE_COLUMNS} FROM archive WHERE seq = ?1"),
                    [seq],
                    page_row,
                )
                .optional()?;
            let Some(row) = row else {
                continue; // pruned meanwhile
            };
            let original = decode(row)?;
            let stone = crate::muc::moderation::tombstone(&original, m);
            let bytes = forwarded_of(&stone)?;
            tx.execute(
                "UPDATE archive SET forwarded = ?1, stanza = '' WHERE seq = ?2",
                params![bytes, seq],
            )?;
            tx.execute("DELETE FROM archive_fts WHERE rowid = ?1", [seq])?;
            // Retracted once: a tracker repeating the deletion finds nothing more to do.
            tx.execute("DELETE FROM archive_ref WHERE seq = ?1", [seq])?;
            stones.push(stone);
        }
        if let Some(id) = m.completes_inbox {
            let note = format!("retracted {} message(s)", stones.len());
            tx.execute(
                "UPDATE inbox SET state = 'done', note = ?2 WHERE id = ?1",
                params![id, note],
            )?;
        }
        tx.commit()?;
        Ok(stones)
    }

    /// Whether commits that only archive room messages are fsynced too (`store.fsync_messages`;
    /// a newly opened store does, the config's default is not to).
    pub fn set_fsync_messages(&mut self, on: bool) {
        self.fsync_messages = on;
    }

    /// Set the WAL size at which the writer checkpoints it so that it starts over (see
    /// `worker::run`); a WAL file grown beyond twice this in a burst is cut back when it restarts.
    pub fn set_wal_limit(&mut self, bytes: u64) -> Result<(), StoreError> {
        self.wal_limit = bytes.max(4096);
        let keep = i64::try_from(self.wal_limit.saturating_mul(2)).unwrap_or(i64::MAX);
        self.conn.pragma_update(None, "journal_size_limit", keep)?;
        Ok(())
    }

    /// Copy what the WAL holds into the database file without blocking the writer (PASSIVE); run by
    /// the reader thread beside the writes, and by the writer when the WAL did not restart (see
    /// `store.wal_limit_mb`). Returns the frames in the WAL (0 when it is not in WAL mode).
    pub fn checkpoint(&self) -> Result<u64, StoreError> {
        let frames: i64 = self
            .conn
            .prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")?
            .query_row([], |r| r.get(1))?;
        Ok(frames.max(0) as u64)
    }

    /// Has anyone committed since the last call (`PRAGMA data_version`)? True the first time.
    pub fn wal_changed(&mut self) -> Result<bool, StoreError> {
        let now: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        Ok(self.seen_version.replace(now) != Some(now))
    }

    /// Hold a read snapshot of everything committed so far on a connection of its own (the one held
    /// before is let go), so that the WAL does not start over at the next commit.
    ///
    /// SQLite restarts the WAL from its beginning at the first write after a checkpoint that copied
    /// every frame, and then syncs the WAL's new header, even in a commit that is not synced
    /// (`synchronous=NORMAL`). The reader's checkpoints (and the idle writer's sync) copy every
    /// frame when the writes are few, so at 10 messages a second every message paid an fsync
    /// (≈ 1.2 ms here, on the path to its broadcast). A restart needs every reader to be off the
    /// WAL; the held snapshot keeps one on it, and the checkpoint still copies everything up to
    /// the snapshot. The snapshot must be taken while its newest frames are not copied yet: one
    /// taken on a WAL copied whole does not count as being on it (the reader re-takes it at every
    /// look after a write, `worker::spawn_reader`).
    /// The WAL then grows to `store.wal_limit_mb`, where [`Store::release_wal`] lets it start over.
    pub fn hold_wal(&mut self) -> Result<(), StoreError> {
        let hold = match &mut self.wal_hold {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path)?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                self.wal_hold.insert(c)
            }
        };
        if !hold.is_autocommit() {
            hold.prepare_cached("COMMIT")?.execute([])?;
        }
        // The read inside the transaction takes the snapshot and keeps it until the next COMMIT.
        hold.prepare_cached("BEGIN")?.execute([])?;
        hold.prepare_cached("SELECT COUNT(*) FROM meta")?
            .query_row([], |r| r.get::<_, i64>(0))?;
        Ok(())
    }

    /// Let go of the snapshot [`Store::hold_wal`] holds: the WAL may start over.
    pub fn release_wal(&mut self) -> Result<(), StoreError> {
        if let Some(hold) = self.wal_hold.as_mut().filter(|c| !c.is_autocommit()) {
            hold.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    /// fsync what relaxed commits left unsynced: a passive checkpoint syncs the WAL, then copies
    /// what it can into the database file. Returns whether anything remains unsynced.
    pub fn sync(&mut self) -> Result<bool, StoreError> {
        self.index_pending(true)?;
        if self.unsynced {
            self.checkpoint()?;
            self.unsynced = false;
        }
        Ok(self.unsynced)
    }

    /// Open (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        if pages == 0 {
            // A new database: pages freed by retention can be given back to the file system
            // (`PRAGMA incremental_vacuum`, see `prune`). Only possible before the first table.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before it returns, so a 202 (or an archived message) survives a
        // power loss, not only a process crash as with NORMAL. Group commit (one transaction per
        // batch, see `worker`) keeps the fsyncs few.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // No checkpoint inside a commit (SQLite's default every 1,000 WAL pages delayed about one
        // message in a hundred by milliseconds): the reader thread checkpoints beside the writes
        // every 100 ms to 1 s (`worker::CheckpointPace`), and an idle writer syncs with one
        // (`Store::sync`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store {
            conn,
            counts: Default::default(),
            fsync_messages: true,
            unsynced: false,
            accepts_synced_elsewhere: false,
            normal: Default::default(),
            synced_commits: 0,
            path: path.to_owned(),
            wal_limit: 0,
            unindexed: None,
            wal_hold: None,
            seen_version: None,
        };
        store.set_wal_limit(DEFAULT_WAL_LIMIT)?;
        store.migrate()?;
        store.recover_index()?;
        // Every room's count once (the archive index makes this one pass); appends keep it exact.
        let counts: Vec<(String, i64)> = store
            .conn
            .prepare("SELECT room, COUNT(*) FROM archive GROUP BY room")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if let Ok(mut c) = store.counts.lock() {
            c.extend(counts.into_iter().map(|(room, n)| (room, n as usize)));
        }
        Ok(store)
    }

    /// A second connection to the same database for archive queries, so that they run beside
    /// writes (WAL lets readers and a writer work at once) instead of waiting behind them.
    pub fn reader(&self) -> Result<Store, StoreError> {
        // Read-write only so that it can checkpoint; it runs queries and checkpoints, nothing else.
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Store {
            conn,
            counts: self.counts.clone(),
            fsync_messages: self.fsync_messages,
            unsynced: false,
            accepts_synced_elsewhere: false,
            normal: Default::default(),
            synced_commits: 0,
            path: self.path.clone(),
            wal_limit: self.wal_limit,
            unindexed: None,
            wal_hold: None,
            seen_version: None,
        })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: usize = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        newer_schema(version, MIGRATIONS.len())?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Set a metadata value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.synced()?;
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }

    /// The occupant-id salt, created on first use.
    pub fn occupant_salt(&self) -> Result<String, StoreError> {
        if let Some(s) = self.meta("occupant_salt")? {
            return Ok(s);
        }
        let mut buf = [0u8; 16];
        // Without an OS random source, fall back to the clock: still unique per installation.
        if getrandom::getrandom(&mut buf).is_err() {
            let t = Utc::now().timestamp_nanos_opt().unwrap_or_default();
            buf[..8].copy_from_slice(&t.to_le_bytes());
        }
        let salt = hex::encode(buf);
        self.synced()?;
        self.conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('occupant_salt', ?1)",
            [&salt],
        )?;
        Ok(self.meta("occupant_salt")?.unwrap_or(salt))
    }

    /// Create or update a room's description and apply the given affiliations over the stored ones.
    pub fn upsert_room(&mut self, info: &RoomInfo) -> Result<(), StoreError> {
        self.upsert_rooms(std::slice::from_ref(info))
    }

    /// Create or update many rooms in one transaction (one fsync: 10,000 configured rooms used to
    /// cost 10,000 commits at every start).
    pub fn upsert_rooms(&mut self, rooms: &[RoomInfo]) -> Result<(), StoreError> {
        self.synced()?;
        let tx = self.conn.transaction()?;
        {
            let mut room = tx.prepare_cached(
                "INSERT INTO rooms(name, title, description, anonymous) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET title = ?2, description = ?3, anonymous = ?4",
            )?;
            for info in rooms {
                room.execute(params![
                    info.name,
                    info.title,
                    info.description,
                    info.anonymous
                ])?;
                for (jid, aff) in &info.affiliations {
                    set_affiliation(&tx, &info.name, jid, aff)?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every stored room with its affiliations.
    pub fn rooms(&self) -> Result<Vec<RoomInfo>, StoreError> {
        self.rooms_named(None)
    }

    /// Every stored room, or only the one named, with its affiliations.
    fn rooms_named(&self, only: Option<&str>) -> Result<Vec<RoomInfo>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, title, description, anonymous, subject FROM rooms
             WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
        )?;
        let mut rooms: Vec<RoomInfo> = stmt
            .query_map([only], |r| {
                Ok(RoomInfo {
                    name: r.get(0)?,
                    title: r.get(1)?,
                    description: r.get(2)?,
                    anonymous: r.get(3)?,
                    subject: r.get(4)?,
                    affiliations: BTreeMap::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT room, jid, affiliation FROM affiliations WHERE ?1 IS NULL OR room = ?1",
        )?;
        let rows = stmt.query_map([only], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (room, jid, aff) = row?;
            let (Ok(jid), Some(aff)) = (jid.parse::<BareJid>(), parse_affiliation(&aff)) else {
                continue;
            };
            // Sorted by name (SQLite's binary collation is Rust's byte order): no scan per row,
            // which was quadratic (3 s at 10,000 rooms).
            if let Ok(i) = rooms.binary_search_by(|r| r.name.as_str().cmp(room.as_str())) {
                rooms[i].affiliations.insert(jid, aff);
            }
        }
        Ok(rooms)
    }

    /// Apply one persisted change.
    pub fn persist(&mut self, p: &Persist) -> Result<(), StoreError> {
        self.synced()?;
        match p {
            Persist::Affiliation {
                room,
                jid,
                affiliation,
            } => {
                if *affiliation == Affiliation::None {
                    self.conn.execute(
                        "DELETE FROM affiliations WHERE room = ?1 AND jid = ?2",
                        params![room, jid.as_str()],
                    )?;
                } else {
                    set_affiliation(&self.conn, room, jid, affiliation)?;
                }
            }
            Persist::Room(info) => {
                self.upsert_room(info)?;
                let keep: Vec<&str> = info.affiliations.keys().map(|j| j.as_str()).collect();
                let stored: Vec<String> = self
                    .conn
                    .prepare("SELECT jid FROM affiliations WHERE room = ?1")?
                    .query_map([&info.name], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for jid in stored.iter().filter(|j| !keep.contains(&j.as_str())) {
                    self.conn.execute(
                        "DELETE FROM affiliations WHERE room = ?1 AND jid = ?2",
                        params![info.name, jid],
                    )?;
                }
            }
            Persist::Mutes { room, jid, rules } => {
                if rules.is_empty() {
                    self.conn.execute(
                        "DELETE FROM mutes WHERE room = ?1 AND jid = ?2",
                        params![room, jid.as_str()],
                    )?;
                } else {
                    let json = serde_json::to_string(rules).unwrap_or_else(|_| "[]".into());
                    self.conn.execute(
                        "INSERT INTO mutes(room, jid, rules) VALUES (?1, ?2, ?3)
                         ON CONFLICT(room, jid) DO UPDATE SET rules = ?3",
                        params![room, jid.as_str(), json],
                    )?;
                }
            }
            Persist::Subject { room, subject } => {
                self.conn.execute(
                    "UPDATE rooms SET subject = ?2 WHERE name = ?1",
                    params![room, subject],
                )?;
            }
            // One instance: nobody takes its rooms over, occupants are not kept.
            Persist::Occupants { .. } => {}
        }
        Ok(())
    }

    /// Append messages in one transaction, marking the inbox rows they complete as done in the same
    /// transaction. A message whose id or origin is already archived is skipped (idempotent); the
    /// result says, per message, whether it was written.
    /// Unlike the store thread's commits, the messages are searchable when it returns.
    pub fn append(&mut self, msgs: &[ArchivedMessage]) -> Result<Vec<bool>, StoreError> {
        let written = self.commit(&[], msgs)?.1;
        self.index_pending(true)?;
        Ok(written)
    }

    /// Store deliveries in one transaction (group commit), deduplicating on the delivery id and on the
    /// body (the same body twice is one event, whatever delivery id each copy carries).
    pub fn accept(&mut self, items: &[InboxItem]) -> Result<Vec<Accepted>, StoreError> {
        self.commit(items, &[]).map(|(a, _)| a)
    }

    /// Accept deliveries and append messages in **one** transaction: with `synchronous=FULL` every
    /// commit is an fsync, so the store thread commits whatever is waiting together (group commit).
    /// Either everything is written or nothing is.
    pub fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[ArchivedMessage],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError> {
        let msgs: Vec<ToAppend> = msgs.iter().map(|m| (m, None)).collect();
        self.commit_in(items, &msgs)
    }

    /// [`Store::commit`] of messages as the store thread gets them.
    pub fn commit_appended(
        &mut self,
        items: &[InboxItem],
        msgs: &[Appended],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError> {
        let msgs: Vec<ToAppend> = msgs
            .iter()
            .map(|a| (&a.message, a.prepared.as_ref()))
            .collect();
        self.commit_in(items, &msgs)
    }

    fn commit_in(
        &mut self,
        items: &[InboxItem],
        msgs: &[ToAppend],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError> {
        // A commit that accepts webhook deliveries is always fsynced: its 202s depend on it. One that
        // only archives room messages need not be (store.fsync_messages): it is on disk against a
        // crash of caseroom either way, and a later fsync (any accept, a checkpoint) covers it too,
        // the WAL being written in order. A tracker event's inbox row is marked done in the same
        // transaction as its message, so a power loss takes both back and the event is replayed.
        //
        // With a syncer (`Backend::sync_accepts_elsewhere`), a commit that accepts deliveries is
        // written like a relaxed one and the syncer fsyncs the WAL before the 202s go out: the same
        // durability, with the fsync beside the next commit instead of in front of it.
        let elsewhere = self.accepts_synced_elsewhere && !items.is_empty();
        let relax = (items.is_empty() || elsewhere) && (msgs.is_empty() || !self.fsync_messages);
        let write = |conn: &mut Connection| {
            let tx = conn.transaction()?;
            let accepted = accept_in(&tx, items)?;
            let (written, entries) = append_in(&tx, msgs)?;
            tx.commit()?;
            Ok((accepted, written, entries))
        };
        let (accepted, written, entries) = if relax {
            relaxed(&mut self.conn, &self.normal, write)?
        } else {
            self.synced()?;
            write(&mut self.conn)?
        };
        search::Unindexed::add(&mut self.unindexed, entries);
        // A synced commit syncs the WAL up to here, earlier relaxed commits included; so does the
        // syncer's fsync after one it is given.
        self.unsynced = relax && !elsewhere;
        self.synced_commits += u64::from(!relax || elsewhere);
        for ((m, _), w) in msgs.iter().zip(&written) {
            if *w {
                if let Ok(mut c) = self.counts.lock() {
                    *c.entry(m.room.clone()).or_insert(0) += 1;
                }
            }
        }
        Ok((accepted, written))
    }

    /// Deliveries not yet handled (replayed at start), oldest first.
    pub fn pending_inbox(&self) -> Result<Vec<InboxRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT i.id, i.tracker, i.delivery, i.received, i.content_type, i.headers,
                    COALESCE(b.body, i.body), i.body_hash, COALESCE(b.packed, 0)
             FROM inbox i LEFT JOIN inbox_body b ON b.id = i.id
             WHERE i.state = 'pending' ORDER BY i.id",
        )?;
        let rows = stmt.query_map([], |r| {
            let headers: String = r.get(5)?;
            let id = r.get(0)?;
            // A damaged body fails that delivery (the bridge closes it `failed`: not JSON), not the
            // start: every other pending delivery is still handled.
            let body = body::unpack(r.get(6)?, r.get(8)?).unwrap_or_else(|e| {
                tracing::error!(inbox = id, error = %e, "a pending delivery's stored body is damaged");
                Vec::new()
            });
            Ok(InboxRow {
                id,
                item: InboxItem {
                    tracker: r.get(1)?,
                    delivery: r.get(2)?,
                    received: r.get(3)?,
                    content_type: r.get(4)?,
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    body,
                    body_hash: r.get(7)?,
                    packed: None,
                    doc: None,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Close a delivery that produced no archived message (ignored, unknown, filtered, failed).
    pub fn finish_inbox(&mut self, id: i64, state: &str, note: &str) -> Result<(), StoreError> {
        self.synced()?;
        self.conn.execute(
            "UPDATE inbox SET state = ?2, note = ?3 WHERE id = ?1",
            params![id, state, note],
        )?;
        Ok(())
    }

    /// Count deliveries by state (for status and tests).
    pub fn inbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM inbox GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of archived messages in a room.
    /// Messages in a room (counted at open, kept by the writer; a reader may see a just-committed
    /// message one moment before it is counted).
    fn room_count(&self, room: &str) -> rusqlite::Result<usize> {
        if let Ok(c) = self.counts.lock() {
            return Ok(c.get(room).copied().unwrap_or(0));
        }
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM archive WHERE room = ?1",
            [room],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// Every stored per-person filter: (room, person, rules).
    pub fn mutes(
        &self,
    ) -> Result<Vec<(String, BareJid, Vec<crate::config::FilterConfig>)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT room, jid, rules FROM mutes")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (room, jid, rules) = row?;
            if let (Ok(jid), Ok(rules)) = (jid.parse::<BareJid>(), serde_json::from_str(&rules)) {
                out.push((room, jid, rules));
            }
        }
        Ok(out)
    }

    /// The highest archive sequence number.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MAX(seq) FROM archive", [], |r| r.get(0))?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// The newest `n` messages of a room, oldest first.
    pub fn recent(&self, room: &str, n: usize) -> Result<Vec<ArchivedMessage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PAGE_COLUMNS} FROM archive
             WHERE room = ?1 ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![room, n as i64], page_row)?;
        let mut out = rows
            .map(|r| r.map_err(StoreError::from).and_then(decode))
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn seq_of(&self, room: &str, id: &str) -> Result<i64, QueryError> {
        self.conn
            .query_row(
                "SELECT seq FROM archive WHERE room = ?1 AND id = ?2",
                params![room, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| QueryError::Store(e.to_string()))?
            .ok_or_else(|| QueryError::UnknownId(id.to_owned()))
    }

    /// Run an archive query (XEP-0313 §4, RSM XEP-0059 §2).
    pub fn query(&self, q: &ArchiveQuery) -> Result<MamPage, QueryError> {
        let serr = |e: rusqlite::Error| QueryError::Store(e.to_string());
        if q.metadata {
            let first = self.edge(&q.room, "ASC").map_err(serr)?;
            let last = self.edge(&q.room, "DESC").map_err(serr)?;
            return Ok(MamPage::edges(first, last));
        }
        if let Some(words) = &q.fulltext {
            if q.start.is_none()
                && q.end.is_none()
                && q.with.is_none()
                && q.ids.is_none()
                && q.after_id.is_none()
                && q.before_id.is_none()
            {
                return self.search_page(q, words);
            }
        }
        let (conds, vals) = self.filter_of(q)?;
        let filter = conds.join(" AND ");
        let count: i64 = if conds.len() == 1 {
            self.room_count(&q.room).map_err(serr)? as i64
        } else {
            self.conn
                .prepare_cached(&format!("SELECT COUNT(*) FROM archive WHERE {filter}"))
                .and_then(|mut s| {
                    s.query_row(rusqlite::params_from_iter(vals.iter()), |r| r.get(0))
                })
                .map_err(serr)?
        };
        let (from, backward) = q.page.from();
        let (cond, order) = if backward {
            ("seq < ?", "DESC")
        } else {
            ("seq > ?", "ASC")
        };
        let mut page_vals = vals.clone();
        let mut page_filter = filter.clone();
        if let Some(id) = from {
            page_filter = format!("{page_filter} AND {cond}");
            page_vals.push(self.seq_of(&q.room, id)?.into());
        }
        page_vals.push(((q.max + 1) as i64).into());
        let sql = format!(
            "SELECT {PAGE_COLUMNS} FROM archive WHERE {page_filter}
             ORDER BY seq {order} LIMIT ?"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(serr)?;
        let items = stmt
            .query_map(rusqlite::params_from_iter(page_vals.iter()), page_row)
            .map_err(serr)?
            .map(|r| r.map_err(StoreError::from).and_then(page_item))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueryError::Store(e.to_string()))?;
        Ok(MamPage::from_rows(q, items, count.max(0) as usize))
    }

    /// A query's filter (XEP-0313 §4.1.1 fields and ids), as SQL conditions with positional values;
    /// the first is always the room.
    fn filter_of(
        &self,
        q: &ArchiveQuery,
    ) -> Result<(Vec<String>, Vec<rusqlite::types::Value>), QueryError> {
        let mut conds = vec!["room = ?".to_string()];
        let mut vals: Vec<rusqlite::types::Value> = vec![q.room.clone().into()];
        if let Some(s) = q.start {
            conds.push("ts >= ?".into());
            vals.push(s.timestamp_micros().into());
        }
        if let Some(e) = q.end {
            conds.push("ts <= ?".into());
            vals.push(e.timestamp_micros().into());
        }
        match &q.with {
            Some(With::Nick(n)) => {
                conds.push("nick = ?".into());
                vals.push(n.clone().into());
            }
            Some(With::Bare(b)) => {
                conds.push("sender = ?".into());
                vals.push(b.clone().into());
            }
            None => {}
        }
        if let Some(id) = &q.after_id {
            conds.push("seq > ?".into());
            vals.push(self.seq_of(&q.room, id)?.into());
        }
        if let Some(id) = &q.before_id {
            conds.push("seq < ?".into());
            vals.push(self.seq_of(&q.room, id)?.into());
        }
        if let Some(words) = &q.fulltext {
            conds.push("seq IN (SELECT rowid FROM archive_fts WHERE archive_fts MATCH ?)".into());
            vals.push(search::match_expr(&q.room, words).into());
        }
        if let Some(ids) = &q.ids {
            let mut seqs = Vec::new();
            for id in ids {
                seqs.push(self.seq_of(&q.room, id)?.to_string());
            }
            conds.push(format!(
                "seq IN ({})",
                if seqs.is_empty() {
                    "NULL".into()
                } else {
                    seqs.join(",")
                }
            ));
        }
        Ok((conds, vals))
    }

    fn edge(&self, room: &str, order: &str) -> Result<Option<PageItem>, rusqlite::Error> {
        let sql = format!(
            "SELECT {PAGE_COLUMNS} FROM archive WHERE room = ?1 ORDER BY seq {order} LIMIT 1"
        );
        let row = self.conn.query_row(&sql, [room], page_row).optional()?;
        Ok(row.and_then(|r| page_item(r).ok()))
    }
}

/// Insert or update one affiliation.
fn set_affiliation(
    conn: &Connection,
    room: &str,
    jid: &BareJid,
    aff: &Affiliation,
) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO affiliations(room, jid, affiliation) VALUES (?1, ?2, ?3)
         ON CONFLICT(room, jid) DO UPDATE SET affiliation = ?3",
        params![room, jid.as_str(), affiliation_str(aff)],
    )
}

/// A page row: the archive row and the serialised message MAM serves, if stored.
type PageRow = (RawRow, Option<Vec<u8>>);

/// The archive columns [`page_row`] reads, in its order.
const PAGE_COLUMNS: &str = "seq, id, room, ts, nick, sender, stanza, origin, forwarded";

fn page_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PageRow> {
    Ok((raw_row(r)?, r.get(8)?))
}

/// A page item from its row; rows archived before the `forwarded` column are parsed and serialised.
fn page_item((row, forwarded): PageRow) -> Result<PageItem, StoreError> {
    let (_, id, _, ts, ..) = &row;
    if let (Some(bytes), Some(ts)) = (forwarded, DateTime::<Utc>::from_timestamp_micros(*ts)) {
        return Ok(PageItem {
            id: id.clone(),
            ts,
            forwarded: bytes,
        });
    }
    let m = decode((row, None))?;
    let forwarded = forwarded_of(&m)?;
    Ok(PageItem {
        id: m.id,
        ts: m.ts,
        forwarded,
    })
}

type RawRow = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

/// A message as MAM serves it ([`crate::muc::mam::forwarded`]), or why it cannot be.
fn forwarded_of(m: &ArchivedMessage) -> Result<Vec<u8>, StoreError> {
    crate::muc::mam::forwarded(m).ok_or_else(|| StoreError::Corrupt {
        id: m.id.clone(),
        reason: "cannot be serialised".into(),
    })
}

/// A message from its row: from `stanza` (rows before migration 4's change), else from the
/// `forwarded` bytes, which lack the room's own stanza-id (the MUC core adds it back for history).
fn decode(
    ((seq, id, room, ts, nick, sender, xml, origin), forwarded): PageRow,
) -> Result<ArchivedMessage, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let el: Element = match forwarded {
        Some(bytes) if xml.is_empty() => crate::xmpp::outbound::component_ns(
            &crate::xmpp::wire::parse(&bytes).map_err(|e| corrupt(e.to_string()))?,
        ),
        _ => xml.parse().map_err(|e| corrupt(format!("{e}")))?,
    };
    let message = Message::try_from(el).map_err(|e| corrupt(format!("{e}")))?;
    let ts = DateTime::<Utc>::from_timestamp_micros(ts)
        .ok_or_else(|| corrupt("bad timestamp".into()))?;
    let sender = sender
        .parse::<BareJid>()
        .map_err(|e| corrupt(format!("{e}")))?;
    Ok(ArchivedMessage {
        seq: seq as u64,
        id,
        room,
        ts,
        nick,
        sender,
        message,
        origin,
        completes_inbox: None,
    })
}

/// Run `write` (one transaction) with `synchronous=NORMAL`: its commit is not fsynced, a later synced
/// commit or checkpoint covers it (the WAL is written in order).
/// The connection stays at NORMAL afterwards (`normal`): the next write that is not relaxed sets
/// FULL again ([`Store::synced`]).
fn relaxed<T>(
    conn: &mut Connection,
    normal: &std::cell::Cell<bool>,
    write: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if !normal.get() {
        // Not a cached statement: SQLite applies `PRAGMA synchronous` when it prepares it, not
        // when it runs, so a statement prepared once would set it once.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        normal.set(true);
    }
    write(conn)
}

/// Write the messages (skipping any already archived); per message whether it was written, and the
/// full-text entries of those written, for [`Store::index_pending`].
fn append_in(
    tx: &rusqlite::Transaction<'_>,
    msgs: &[ToAppend],
) -> Result<(Vec<bool>, Vec<search::Entry>), StoreError> {
    let mut written = Vec::with_capacity(msgs.len());
    let mut entries = Vec::with_capacity(msgs.len());
    if msgs.is_empty() {
        return Ok((written, entries));
    }
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO archive(seq, id, room, ts, nick, sender, stanza, origin, forwarded)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut done = tx.prepare_cached("UPDATE inbox SET state = 'done' WHERE id = ?1")?;
    // A delivery in several rooms: done once each room's message is in (`muc::Completes`).
    let mut has_origin = tx.prepare_cached("SELECT 1 FROM archive WHERE origin = ?1")?;
    let mut refer =
        tx.prepare_cached("INSERT OR IGNORE INTO archive_ref(room, ref, seq) VALUES (?1, ?2, ?3)")?;
    for &(m, p) in msgs {
        let p = Prepared::or_of(p, m)?;
        // Kept once, as MAM serves it; `stanza` stays empty (see migration 4).
        let inserted = stmt.execute(params![
            m.seq as i64,
            m.id,
            m.room,
            m.ts.timestamp_micros(),
            m.nick,
            m.sender.as_str(),
            "",
            m.origin,
            p.forwarded
        ])?;
        if inserted > 0 {
            entries.push(search::Entry::new(m, p.text.clone()));
            if let Some(r) = &p.refers {
                refer.execute(params![m.room, r, m.seq as i64])?;
            }
        }
        if let Some(c) = &m.completes_inbox {
            let mut all_in = true;
            for origin in c.origins() {
                all_in &= has_origin.exists([&origin])?;
            }
            if all_in {
                done.execute([c.inbox])?;
            }
        }
        written.push(inserted > 0);
    }
    Ok((written, entries))
}

fn accept_in(
    tx: &rusqlite::Transaction<'_>,
    items: &[InboxItem],
) -> Result<Vec<Accepted>, StoreError> {
    let mut out = Vec::with_capacity(items.len());
    if items.is_empty() {
        return Ok(out);
    }
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO inbox(tracker, delivery, body_hash, received, content_type, headers, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, x'')",
    )?;
    let mut insert_body =
        tx.prepare_cached("INSERT INTO inbox_body(id, body, packed) VALUES (?1, ?2, ?3)")?;
    let mut seen_body =
        tx.prepare_cached("SELECT 1 FROM inbox WHERE tracker = ?1 AND body_hash = ?2 LIMIT 1")?;
    for it in items {
        let computed;
        let hash = match &it.body_hash {
            Some(h) => h,
            None => {
                computed = body_hash(&it.body);
                &computed
            }
        };
        // The body is what the tracker signed; the delivery id is an unsigned header. A body seen
        // before is the same event, whatever id it comes with now (a replay).
        if seen_body.exists(params![it.tracker, hash])? {
            out.push(Accepted::Duplicate);
            continue;
        }
        let headers = serde_json::to_string(&it.headers).unwrap_or_else(|_| "[]".into());
        let n = insert.execute(params![
            it.tracker,
            it.delivery,
            hash,
            it.received,
            it.content_type,
            headers,
        ])?;
        out.push(if n == 0 {
            Accepted::Duplicate
        } else {
            let id = tx.last_insert_rowid();
            let fresh;
            let packed = match &it.packed {
                Some(p) => p,
                None => {
                    fresh = body::pack(&it.body);
                    &fresh
                }
            };
            insert_body.execute(params![id, packed.bytes(&it.body), packed.code()])?;
            Accepted::New(id)
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn item(delivery: Option<&str>, body: &[u8]) -> InboxItem {
        InboxItem {
            tracker: "forge".into(),
            delivery: delivery.map(str::to_owned),
            received: 1,
            content_type: Some("application/json".into()),
            headers: vec![],
            body: body.to_vec(),
            body_hash: None,
            packed: None,
            doc: None,
        }
    }

    /// Room messages (and the search index) commit at `synchronous=NORMAL` and leave the
    /// connection there, so a run of them switches once; every other write, a delivery's accept
    /// first of all (its 202 waits for the fsync), sets FULL again before it writes.
    #[test]
    fn only_room_messages_commit_unsynced_and_every_other_write_is_synced_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("t.db")).expect("open");
        store.set_fsync_messages(false);
        let mode = |s: &Store| -> i64 {
            s.conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("pragma")
        };
        let (normal, full) = (1, 2);
        assert_eq!(mode(&store), full, "a new store");
        let mut seq = 0;
        let mut chat = |store: &mut Store| {
            for _ in 0..3 {
                seq += 1;
                store.commit(&[], &[message(seq, "hi")]).expect("append");
                assert_eq!(mode(store), normal, "room messages are relaxed");
            }
        };
        chat(&mut store);
        let accepted = store.accept(&[item(Some("d1"), b"{}")]).expect("accept");
        assert_eq!(mode(&store), full, "an accept");
        chat(&mut store);
        store.set_meta("k", "v").expect("meta");
        assert_eq!(mode(&store), full, "a setting");
        chat(&mut store);
        store
            .persist(&Persist::Subject {
                room: "team".into(),
                subject: "s".into(),
            })
            .expect("persist");
        assert_eq!(mode(&store), full, "a room change");
        chat(&mut store);
        let Accepted::New(id) = accepted[0] else {
            panic!("a new delivery: {accepted:?}")
        };
        store.finish_inbox(id, "ignored", "n").expect("finish");
        assert_eq!(mode(&store), full, "a delivery closed");
        chat(&mut store);
        store.index_pending(true).expect("index");
        assert_eq!(mode(&store), normal, "the search index is relaxed too");
        store.set_fsync_messages(true);
        store.commit(&[], &[message(99, "hi")]).expect("append");
        assert_eq!(mode(&store), full, "store.fsync_messages = true");
    }

    pub(super) fn message(seq: u64, body: &str) -> ArchivedMessage {
        let mut m = Message::groupchat(None);
        m.from = Some("team@rooms.example.org/alice".parse().expect("jid"));
        m.bodies.insert(Default::default(), body.into());
        m.payloads.push(
            xmpp_parsers::stanza_id::StanzaId {
                id: format!("id{seq}"),
                by: "team@rooms.example.org".parse().expect("jid"),
            }
            .into(),
        );
        ArchivedMessage {
            seq,
            id: format!("id{seq}"),
            room: "team".into(),
            ts: DateTime::<Utc>::from_timestamp_micros(seq as i64).expect("ts"),
            nick: "alice".into(),
            sender: "alice@example.org".parse().expect("jid"),
            message: m,
            origin: None,
            completes_inbox: None,
        }
    }

    #[test]
    fn a_message_prepared_off_the_store_thread_is_stored_as_one_the_store_prepares() {
        let comment = |seq| {
            let mut m = message(seq, "alice commented on #7");
            m.message.payloads.push(
                crate::xmpp::json::JsonContainer(serde_json::json!({
                    "type": "Create", "caseroom:event": "comment",
                    "object": {"url": "https://forge.example/t/7#c1", "content": "kumquat"},
                }))
                .into(),
            );
            m
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = |name: &str, prepared: bool| {
            let mut store = Store::open(&dir.path().join(name)).expect("open");
            let a = if prepared {
                Appended::prepared(comment(1))
            } else {
                Appended::from(comment(1))
            };
            assert_eq!(a.prepared.is_some(), prepared);
            store.commit_appended(&[], &[a]).expect("commit");
            store.index_pending(true).expect("index");
            let one =
                |sql: &str| -> Vec<u8> { store.conn.query_row(sql, [], |r| r.get(0)).expect(sql) };
            (
                one("SELECT forwarded FROM archive"),
                one("SELECT CAST(ref AS BLOB) FROM archive_ref WHERE seq = 1"),
                one(
                    "SELECT CAST(rowid AS BLOB) FROM archive_fts WHERE archive_fts MATCH 'kumquat'",
                ),
            )
        };
        let (on, off) = (rows("store-prepares", false), rows("bridge-prepares", true));
        assert_eq!(on, off);
        assert_eq!(on.1, b"https://forge.example/t/7#c1");
    }

    #[test]
    fn pages_serve_stored_bytes_and_serialise_rows_archived_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        store
            .append(&[message(1, "one <&> 'two'"), message(2, "three")])
            .expect("append");
        let mut q = ArchiveQuery::metadata("team");
        q.metadata = false;
        q.max = 10;
        let stored = store.query(&q).expect("query");
        // Kept once: the message as MAM serves it, no second serialisation.
        let empty: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM archive WHERE stanza = ''", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(empty, 2);
        // Read back for join history from those bytes: the same message.
        let recent = store.recent("team", 10).expect("recent");
        assert_eq!(
            recent[0].message.bodies.values().next().map(String::as_str),
            Some("one <&> 'two'")
        );
        assert_eq!(
            recent[0].message.from.as_ref().map(|j| j.to_string()),
            Some("team@rooms.example.org/alice".to_owned())
        );
        // As if archived by a version without the column (the whole stanza in `stanza`).
        let old_xml = String::from(&Element::from(message(1, "one <&> 'two'").message));
        store
            .conn
            .execute(
                "UPDATE archive SET forwarded = NULL, stanza = ?1 WHERE seq = 1",
                [old_xml],
            )
            .expect("update");
        let old_recent = store.recent("team", 10).expect("recent");
        assert_eq!(
            old_recent[0].message.bodies.values().next(),
            recent[0].message.bodies.values().next()
        );
        let old = store.query(&q).expect("query");
        assert_eq!(stored.items.len(), 2);
        for (a, b) in stored.items.iter().zip(&old.items) {
            assert_eq!((&a.id, a.ts), (&b.id, b.ts));
            assert_eq!(a.forwarded, b.forwarded, "the same bytes either way");
        }
        let first = crate::xmpp::wire::parse(&stored.items[0].forwarded).expect("well-formed");
        assert_eq!(first.ns(), "jabber:client");
        assert_eq!(
            first.get_child("body", "jabber:client").map(|b| b.text()),
            Some("one <&> 'two'".to_owned())
        );
        assert!(
            first.get_child("stanza-id", "urn:xmpp:sid:0").is_none(),
            "the room's own stanza-id is the result's id, not repeated inside"
        );
    }

    #[test]
    fn a_replayed_body_is_a_duplicate_whatever_its_delivery_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let got = store
            .accept(&[
                item(Some("d-1"), b"{\"n\":1}"),
                item(Some("d-1"), b"{\"n\":1}"),
                item(Some("d-2-fresh"), b"{\"n\":1}"),
                item(None, b"{\"n\":1}"),
                item(Some("d-1"), b"{\"n\":2}"),
                item(Some("d-3"), b"{\"n\":3}"),
            ])
            .expect("accept");
        assert!(matches!(got[0], Accepted::New(_)));
        assert!(
            got[1..5].iter().all(|a| *a == Accepted::Duplicate),
            "{got:?}"
        );
        assert!(matches!(got[5], Accepted::New(_)));
        // Also across transactions.
        let again = store
            .accept(&[item(Some("d-4"), b"{\"n\":3}")])
            .expect("accept");
        assert_eq!(again, vec![Accepted::Duplicate]);
    }

    #[test]
    fn a_body_is_kept_apart_from_its_row_and_rows_kept_before_replay_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let mut hashed = item(Some("d-1"), b"{\"n\":1}");
        hashed.body_hash = Some(body_hash(&hashed.body));
        let got = store.accept(&[hashed]).expect("accept");
        assert!(matches!(got[0], Accepted::New(_)));
        // A hash handed in by the receiver and one the store computes are the same key.
        let again = store
            .accept(&[item(Some("d-2"), b"{\"n\":1}")])
            .expect("accept");
        assert_eq!(again, vec![Accepted::Duplicate]);
        let (inline, apart): (Vec<u8>, Vec<u8>) = store
            .conn
            .query_row(
                "SELECT i.body, b.body FROM inbox i JOIN inbox_body b ON b.id = i.id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row");
        assert!(
            inline.is_empty(),
            "marking the row done must not rewrite the body"
        );
        assert_eq!(apart, b"{\"n\":1}");
        // As if accepted by a version that kept the body in the row (before migration 5).
        store
            .conn
            .execute(
                "INSERT INTO inbox(tracker, delivery, body_hash, received, headers, body)
                 VALUES ('forge', 'old', 'h-old', 1, '[]', x'7b7d')",
                [],
            )
            .expect("old row");
        let pending = store.pending_inbox().expect("pending");
        let bodies: Vec<&[u8]> = pending.iter().map(|r| r.item.body.as_slice()).collect();
        assert_eq!(bodies, vec![&b"{\"n\":1}"[..], &b"{}"[..]]);
        assert_eq!(pending[1].item.body_hash.as_deref(), Some("h-old"));
    }

    /// A real delivery is stored packed (one page instead of five) and replays byte for byte after
    /// a restart; a damaged stored body fails only its own delivery.
    #[test]
    fn a_delivery_is_stored_packed_and_replays_the_same_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let github = include_bytes!("../../fixtures/github/issues.opened.json");
        {
            let mut store = Store::open(&path).expect("open");
            let got = store
                .accept(&[
                    item(Some("big"), github),
                    item(Some("damaged"), &[b'x'; 3000]),
                    item(Some("small"), b"{\"n\":1}"),
                ])
                .expect("accept");
            assert!(got.iter().all(|a| matches!(a, Accepted::New(_))));
            let rows: Vec<(i64, usize)> = store
                .conn
                .prepare("SELECT packed, length(body) FROM inbox_body ORDER BY id")
                .expect("prepare")
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert_eq!(rows[0].0, body::LZ4);
            assert!(rows[0].1 < 4000, "{} bytes stored", rows[0].1);
            assert_eq!(rows[2], (body::RAW, 7), "a tiny body is kept as it came");
            // Damage the second body's block as a failing disk might.
            store
                .conn
                .execute(
                    "UPDATE inbox_body SET body = substr(body, 1, 8) WHERE id = ?1",
                    [match got[1] {
                        Accepted::New(id) => id,
                        _ => unreachable!("checked above"),
                    }],
                )
                .expect("damage");
        }
        let store = Store::open(&path).expect("reopen");
        let pending = store.pending_inbox().expect("pending");
        let bodies: Vec<&[u8]> = pending.iter().map(|r| r.item.body.as_slice()).collect();
        assert_eq!(bodies, vec![&github[..], &b""[..], &b"{\"n\":1}"[..]]);
        // The duplicate check still sees the packed body's hash.
        let mut store = store;
        assert_eq!(
            store
                .accept(&[item(Some("again"), github)])
                .expect("accept"),
            vec![Accepted::Duplicate]
        );
    }

    /// A store written by a newer caseroom (a schema this build does not know) is not opened:
    /// this build could misread its rows, and its own writes could damage them.
    #[test]
    fn a_store_from_a_newer_caseroom_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        drop(Store::open(&path).expect("open"));
        Connection::open(&path)
            .expect("raw")
            .pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .expect("version");
        let e = Store::open(&path).err().expect("refused");
        assert!(
            matches!(e, StoreError::NewerSchema { found, known } if found == known + 1),
            "{e}"
        );
        assert!(e.to_string().contains("newer caseroom"), "{e}");
    }

    /// A database written by the previous release (schema 4: bodies inside inbox rows) opens with
    /// every kind of row intact and is migrated to the current schema.
    #[test]
    fn a_database_of_the_previous_schema_upgrades_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "journal_mode", "WAL")
                .expect("wal");
            for (i, sql) in MIGRATIONS[..4].iter().enumerate() {
                conn.execute_batch(sql).expect("old migration");
                conn.pragma_update(None, "user_version", i + 1)
                    .expect("version");
            }
            // As the previous release wrote them.
            let forwarded = forwarded_of(&message(7, "kept across the upgrade")).expect("bytes");
            conn.execute_batch(
                "INSERT INTO rooms(name, title, description, anonymous, subject)
                     VALUES ('team', 'Team', 'd', 0, 'the subject');
                 INSERT INTO affiliations VALUES ('team', 'alice@example.org', 'owner');
                 INSERT INTO meta VALUES ('occupant_salt', 'salt-1');
                 INSERT INTO mutes VALUES ('team', 'alice@example.org', '[]');
                 INSERT INTO inbox(tracker, delivery, body_hash, received, headers, body, state)
                     VALUES ('forge', 'old-done', 'h1', 1, '[]', x'7b7d', 'done');
                 INSERT INTO inbox(tracker, delivery, body_hash, received, headers, body)
                     VALUES ('forge', 'old-pending', 'h2', 2, '[[\"x-gitea-event\",\"push\"]]',
                             x'7b226e223a327d');",
            )
            .expect("old rows");
            conn.execute(
                "INSERT INTO archive(seq, id, room, ts, nick, sender, stanza, forwarded)
                 VALUES (7, 'id-7', 'team', 1700000000000000, 'alice', 'alice@example.org', '', ?1)",
                [forwarded],
            )
            .expect("old message");
        }
        let mut store = Store::open(&path).expect("opens and migrates");
        let version: usize = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len());
        let rooms = store.rooms().expect("rooms");
        assert_eq!(
            (rooms[0].name.as_str(), rooms[0].subject.as_str()),
            ("team", "the subject")
        );
        assert_eq!(rooms[0].affiliations.len(), 1);
        assert_eq!(store.occupant_salt().expect("salt"), "salt-1");
        assert_eq!(store.mutes().expect("mutes").len(), 1);
        assert_eq!(store.last_seq().expect("seq"), 7);
        let recent = store.recent("team", 10).expect("recent");
        assert_eq!(
            recent[0].message.bodies.values().next().map(String::as_str),
            Some("kept across the upgrade")
        );
        let pending = store.pending_inbox().expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].item.body, b"{\"n\":2}");
        assert_eq!(
            pending[0].item.headers,
            vec![("x-gitea-event".to_owned(), "push".to_owned())]
        );
        // And the old duplicate keys still catch replays.
        let mut replay = item(Some("fresh-id"), b"{}");
        replay.body_hash = Some("h1".into());
        assert_eq!(
            store.accept(&[replay]).expect("accept"),
            vec![Accepted::Duplicate]
        );
    }

    #[test]
    fn retention_deletes_by_room_rule_keeps_pending_deliveries_and_counts_stay_exact() {
        use prune::{PruneJob, PrunePlan};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let mut msgs = Vec::new();
        for seq in 1..=5000u64 {
            let mut m = message(seq, "m");
            m.room = ["team", "ops", "legal"][seq as usize % 3].into();
            m.id = format!("id{seq}");
            msgs.push(m);
        }
        store.append(&msgs).expect("append");
        // Two handled deliveries and a pending one, all old.
        store
            .accept(&[
                item(Some("a"), b"{\"a\":1}"),
                item(Some("b"), b"{\"b\":1}"),
                item(Some("c"), b"{\"c\":1}"),
            ])
            .expect("accept");
        store.finish_inbox(1, "done", "").expect("done");
        store.finish_inbox(2, "ignored", "").expect("ignored");
        let plan = PrunePlan {
            messages_before: Some(4001),
            rooms: [("legal".to_owned(), None), ("ops".to_owned(), Some(2001))].into(),
            only_room: None,
            deliveries_before: Some(2),
        };
        let preview = store.prune_preview(&plan).expect("preview");
        let mut job = PruneJob::new(plan.clone(), None);
        let mut steps = 0;
        while store.prune_step(&mut job).expect("step") {
            steps += 1;
        }
        assert_eq!(
            job.tally, preview,
            "the dry run counts what the run deletes"
        );
        // team: seq ≡ 0 mod 3 below 4001 → 1333; ops: ≡ 1 below 2001 → 667; legal: kept forever.
        assert_eq!(job.tally.messages.get("team"), Some(&1333));
        assert_eq!(job.tally.messages.get("ops"), Some(&667));
        assert_eq!(job.tally.messages.get("legal"), None);
        assert_eq!(job.tally.deliveries, 2, "handled ones only");
        assert!(steps >= 2, "in batches of {}", prune::BATCH);
        // MAM counts follow (they are kept in memory, not recounted).
        let mut q = ArchiveQuery::metadata("team");
        q.metadata = false;
        q.max = 1;
        let page = store.query(&q).expect("query");
        assert_eq!(page.count, Some(1666 - 1333));
        let pending = store.pending_inbox().expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].item.body, b"{\"c\":1}");
        let bodies: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM inbox_body", [], |r| r.get(0))
            .expect("bodies");
        assert_eq!(bodies, 1, "the deleted deliveries' bodies went with them");
        // Only one room, when asked.
        let mut one = PruneJob::new(
            PrunePlan {
                messages_before: Some(i64::MAX),
                only_room: Some("legal".into()),
                ..PrunePlan::default()
            },
            None,
        );
        store.prune_all(&mut one).expect("prune");
        assert_eq!(one.tally.messages.keys().collect::<Vec<_>>(), vec!["legal"]);
        // A new database gives freed pages back to the file system.
        let auto: i64 = store
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(auto, 2, "INCREMENTAL");
    }

    /// How many archived messages of room "team" hold every one of `words`.
    fn hits(store: &Store, words: &[&str]) -> usize {
        let mut q = ArchiveQuery::metadata("team");
        q.metadata = false;
        q.max = 10;
        q.fulltext = Some(words.iter().map(|w| w.to_string()).collect());
        store.query(&q).expect("query").count.expect("counted")
    }

    /// The store thread indexes its commits for search in batches; what a crash leaves unindexed
    /// is indexed at the next start, once.
    #[test]
    fn messages_committed_but_not_indexed_before_a_crash_are_searchable_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut store = Store::open(&path).expect("open");
        store.append(&[message(1, "kiwi one")]).expect("append");
        store
            .commit(&[], &[message(2, "kiwi two"), message(3, "kiwi three")])
            .expect("commit");
        assert_eq!(
            hits(&store, &["kiwi"]),
            1,
            "the last two wait for their batch"
        );
        assert!(store
            .index_due_in()
            .is_some_and(|d| d <= search::INDEX_DELAY));
        // The process dies: nothing more is indexed, nothing synced.
        drop(store);
        let mut store = Store::open(&path).expect("reopen");
        assert_eq!(hits(&store, &["kiwi"]), 3);
        assert_eq!(hits(&store, &["three"]), 1);
        assert_eq!(
            store.meta(search::THROUGH_KEY).expect("meta"),
            Some("3".into())
        );
        // And once only: a later batch adds only what is new.
        store
            .commit(&[], &[message(4, "kiwi four")])
            .expect("commit");
        store.index_pending(true).expect("index");
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(hits(&store, &["kiwi"]), 4);
    }

    /// A batch is due when it is full, or old enough; not before.
    #[test]
    fn a_batch_of_unindexed_messages_is_due_when_full_or_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        assert_eq!(store.index_due_in(), None);
        store.commit(&[], &[message(1, "fig")]).expect("commit");
        store.index_pending(false).expect("not due yet");
        assert_eq!(hits(&store, &["fig"]), 0);
        std::thread::sleep(search::INDEX_DELAY);
        assert_eq!(store.index_due_in(), Some(std::time::Duration::ZERO));
        store.index_pending(false).expect("due");
        assert_eq!(hits(&store, &["fig"]), 1);
        assert_eq!(store.index_due_in(), None);
        let full: Vec<ArchivedMessage> = (2..2 + search::INDEX_BATCH as u64)
            .map(|seq| message(seq, "fig"))
            .collect();
        store.commit(&[], &full).expect("commit");
        assert_eq!(store.index_due_in(), Some(std::time::Duration::ZERO));
        store.index_pending(false).expect("full");
        assert_eq!(hits(&store, &["fig"]), 1 + search::INDEX_BATCH);
    }

    /// Retraction and retention take a message out of search even before its batch was indexed.
    #[test]
    fn a_message_retracted_or_pruned_before_its_batch_is_indexed_stays_out_of_search() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        store
            .commit(&[], &[message(1, "secret plum"), message(2, "old plum")])
            .expect("commit");
        let stones = store
            .moderate(&crate::muc::moderation::Moderation {
                room: "team".into(),
                id: "id1".into(),
                refers: None,
                by: "team@rooms.example.org".parse().expect("jid"),
                by_occupant_id: "mod".into(),
                reason: None,
                at: Utc::now(),
                iq: None,
                completes_inbox: None,
            })
            .expect("moderate");
        assert_eq!(stones.len(), 1);
        store.index_pending(true).expect("index");
        assert_eq!(hits(&store, &["secret"]), 0);
        assert_eq!(hits(&store, &["plum"]), 1);
        store
            .commit(&[], &[message(3, "new plum")])
            .expect("commit");
        let mut job = prune::PruneJob::new(
            prune::PrunePlan {
                messages_before: Some(3),
                ..prune::PrunePlan::default()
            },
            None,
        );
        store.prune_all(&mut job).expect("prune");
        store.index_pending(true).expect("index");
        assert_eq!(hits(&store, &["plum"]), 1, "only the message kept");
    }

    /// A database from before batched indexing (every message indexed in its own commit) is not
    /// indexed a second time.
    #[test]
    fn an_archive_indexed_message_by_message_is_not_indexed_again_on_upgrade() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut store = Store::open(&path).expect("open");
        store
            .append(&(1..=10u64).map(|s| message(s, "pear")).collect::<Vec<_>>())
            .expect("append");
        store
            .conn
            .execute_batch(
                "DELETE FROM meta WHERE key = 'fts_indexed_through';
                 ALTER TABLE inbox_body DROP COLUMN packed; PRAGMA user_version = 7;",
            )
            .expect("as schema 7 left it");
        drop(store);
        let store = Store::open(&path).expect("upgrade");
        assert_eq!(
            store.meta(search::THROUGH_KEY).expect("meta"),
            Some("10".into())
        );
        assert_eq!(hits(&store, &["pear"]), 10);
    }

    #[test]
    fn search_finds_every_word_follows_retention_and_indexes_an_older_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let mut msgs: Vec<ArchivedMessage> = (1..=300u64)
            .map(|seq| message(seq, &format!("routine note {seq}")))
            .collect();
        msgs.push(message(301, "Déploiement of the Billing service"));
        let mut event = message(302, "[shop] alice opened #7");
        event.message.payloads.push(
            crate::xmpp::json::JsonContainer(serde_json::json!({
                "type": "Create",
                "object": { "name": "Checkout times out", "tag": [{ "name": "regression" }] },
                "id": "https://tracker.example.org/7"
            }))
            .into(),
        );
        msgs.push(event);
        store.append(&msgs).expect("append");
        let search = |store: &Store, words: &[&str]| {
            let mut q = ArchiveQuery::metadata("team");
            q.metadata = false;
            q.max = 10;
            q.fulltext = Some(words.iter().map(|w| w.to_string()).collect());
            let page = store.query(&q).expect("query");
            let ids: Vec<String> = page.items.iter().map(|i| i.id.clone()).collect();
            (ids, page.count.expect("counted"))
        };
        assert_eq!(
            search(&store, &["deploiement", "billing"]),
            (vec!["id301".into()], 1)
        );
        // The event's readable JSON (title, labels) is searchable, its URLs and types are not.
        assert_eq!(search(&store, &["regression"]).0, vec!["id302".to_owned()]);
        assert_eq!(
            search(&store, &["checkout", "times"]).0,
            vec!["id302".to_owned()]
        );
        assert_eq!(search(&store, &["tracker"]).1, 0);
        assert_eq!(search(&store, &["create"]).1, 0);
        // A page of a large result, with the full count.
        assert_eq!(search(&store, &["routine"]).1, 300);
        // Retention takes messages out of the index too.
        let mut job = prune::PruneJob::new(
            prune::PrunePlan {
                messages_before: Some(302),
                ..prune::PrunePlan::default()
            },
            None,
        );
        store.prune_all(&mut job).expect("prune");
        assert_eq!(search(&store, &["billing"]).1, 0);
        assert_eq!(search(&store, &["regression"]).1, 1);
        // An archive from before the index: indexed by the backfill, newest first, in batches.
        store
            .append(
                &(400..=1000u64)
                    .map(|s| message(s, "legacy words"))
                    .collect::<Vec<_>>(),
            )
            .expect("append");
        store
            .conn
            .execute_batch(
                "DELETE FROM archive_fts WHERE rowid >= 400;
                 UPDATE meta SET value = '1001' WHERE key = 'fts_backfill_below';",
            )
            .expect("as if upgraded");
        assert_eq!(search(&store, &["legacy"]).1, 0);
        let mut steps = 0;
        while store.fts_backfill_step().expect("step") {
            steps += 1;
        }
        assert!(steps >= 2, "in batches");
        assert_eq!(search(&store, &["legacy"]).1, 601);
        assert_eq!(
            search(&store, &["regression"]).1,
            1,
            "nothing indexed twice"
        );
    }

    #[test]
    fn a_search_with_very_many_hits_is_answered_without_a_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let n = search::COUNT_UP_TO as u64 + 1;
        let msgs: Vec<ArchivedMessage> = (1..=n).map(|s| message(s, "common word")).collect();
        store.append(&msgs).expect("append");
        let mut q = ArchiveQuery::metadata("team");
        q.metadata = false;
        q.max = 5;
        q.page = crate::muc::mam::Page::Backward(None);
        q.fulltext = Some(vec!["common".into()]);
        let page = store.query(&q).expect("query");
        assert_eq!(
            page.count, None,
            "RSM count is optional; not counted past the cap"
        );
        assert_eq!(page.first_index, None);
        assert_eq!(
            page.items.last().map(|i| i.id.clone()),
            Some(format!("id{n}"))
        );
        assert!(!page.complete);
    }

    #[test]
    fn search_stays_in_its_room_and_pages_in_archive_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("db")).expect("open");
        let msgs: Vec<ArchivedMessage> = (1..=300u64)
            .map(|seq| message(seq, &format!("routine note {seq}")))
            .collect();
        store.append(&msgs).expect("append");
        let count = |store: &Store, word: &str| {
            let mut q = ArchiveQuery::metadata("team");
            q.metadata = false;
            q.max = 10;
            q.fulltext = Some(vec![word.to_owned()]);
            store.query(&q).expect("query").count.expect("counted")
        };
        // Another room whose name shares a word finds nothing of this one's, nor this one of its.
        let mut other = message(303, "routine in the other room");
        other.room = "web-team".into();
        other.id = "id303".into();
        store.append(&[other]).expect("append");
        assert_eq!(count(&store, "routine"), 300);
        let mut web = ArchiveQuery::metadata("web-team");
        web.metadata = false;
        web.max = 10;
        web.fulltext = Some(vec!["routine".into()]);
        assert_eq!(store.query(&web).expect("query").count, Some(1));
        // Paging through the index, both ways, gives the archive's order.
        let mut page = ArchiveQuery::metadata("team");
        page.metadata = false;
        page.max = 7;
        page.fulltext = Some(vec!["routine".into()]);
        page.page = crate::muc::mam::Page::Forward(Some("id7".into()));
        let ids: Vec<String> = store
            .query(&page)
            .expect("q")
            .items
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, (8..=14).map(|s| format!("id{s}")).collect::<Vec<_>>());
        page.page = crate::muc::mam::Page::Backward(Some("id8".into()));
        let back = store.query(&page).expect("q");
        let ids: Vec<String> = back.items.into_iter().map(|i| i.id).collect();
        assert_eq!(ids, (1..=7).map(|s| format!("id{s}")).collect::<Vec<_>>());
        assert!(back.complete);
    }
}
