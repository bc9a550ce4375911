//! The PostgreSQL store: the same tables and promises as the SQLite [`super::Store`], on a server
//! several caseroom instances can share (`[store] url = "postgres://…"`).
//!
//! - One transaction per [`Backend::commit`] (deliveries accepted and messages archived together,
//!   inbox rows marked done with their messages); PostgreSQL's commit is durable
//!   (`synchronous_commit`), so a 202 is answered only after it.
//! - Migrations run under a transaction-scoped advisory lock, so instances starting together
//!   migrate once; `caseroom_schema` records how many ran.
//! - Full-text search (XEP-0431): a `tsvector` column written with the row, from the same text the
//!   SQLite index gets ([`super::search::index_entries`]), folded in Rust (lower case, accents
//!   removed) and indexed with the `simple` configuration, so both backends find the same words.
//! - Counts are `COUNT(*)` on the `(room, seq)` index, not a cache: other instances write too.
//! - Not here: backup/restore (`pg_dump` is the tool), the WAL knobs (PostgreSQL's own).
//!
//! The client is the synchronous `postgres` crate: the store runs on its own thread (see
//! [`super::worker`]), like the SQLite store.

use std::cell::RefCell;
use std::collections::BTreeMap;

use postgres::types::ToSql;
use postgres::Client;
use xmpp_parsers::jid::BareJid;
use xmpp_parsers::muc::user::Affiliation;

use super::{
    body_hash, decode, forwarded_of, page_item, prune, search, Accepted, Appended, Backend,
    InboxItem, InboxRow, PageRow, StoreError,
};
use crate::muc::mam::{ArchiveQuery, MamPage, PageItem, QueryError, With};
use crate::muc::{ArchivedMessage, Persist, RoomInfo};
use crate::xmpp::outbound::{affiliation_str, parse_affiliation};

/// Advisory lock key of migrations ("caseroom" in ASCII).
const MIGRATION_LOCK: i64 = 0x6361_7365_726f_6f6d;
/// Instances that may share one database: each holds one slot (an advisory lock on its writer
/// connection, key `SLOT_LOCK + slot`) while it runs. The slot is the low bits of every archive
/// sequence number it assigns, so two instances never assign the same one.
pub const SLOTS: u64 = 8;
const SLOT_LOCK: i64 = MIGRATION_LOCK + 1;
/// Active instances' advisory locks (`ACTIVE_LOCK + k`, k < `store.instances`).
const ACTIVE_LOCK: i64 = MIGRATION_LOCK + 200;
/// How often a standby looks for a free place among the active instances.
const STANDBY_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Wait until one of the `active` places is free and take it, for as long as this process lives
/// (`store.instances`: ejabberd gives each connected instance a fixed share of the rooms, and a
/// dead instance's share is served only once another connects in its place). Returns once this
/// instance may link.
pub fn become_active(url: &str, active: u32) -> Result<(), StoreError> {
    let mut conn = super::pg_tls::connect(url)?;
    let mut told = false;
    loop {
        for k in 0..i64::from(active) {
            if try_lock(&mut conn, ACTIVE_LOCK + k)? {
                tracing::info!(place = k, "active: serving rooms");
                // The lock lives with this connection: keep it open for the life of the process.
                std::thread::Builder::new()
                    .name("caseroom-active".into())
                    .spawn(move || loop {
                        std::thread::park();
                        let _ = &conn;
                    })
                    .map_err(|e| StoreError::Io {
                        what: "start the thread holding the active place",
                        source: e,
                    })?;
                return Ok(());
            }
        }
        if !told {
            tracing::info!(
                active,
                "standby: all active places are taken; waiting for one to free"
            );
            told = true;
        }
        std::thread::sleep(STANDBY_CHECK);
    }
}

/// Take the session-level advisory lock `key` on `c` if nobody holds it; held until that session
/// ends. Every lock caseroom takes (places, slots, leadership, links) is taken this way.
fn try_lock(c: &mut Client, key: i64) -> Result<bool, postgres::Error> {
    Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
        .get(0))
}

/// The leader's advisory lock (see [`super::Leadership`]).
pub const LEADER_LOCK: i64 = MIGRATION_LOCK + 100;
/// How often a follower tries to become the leader, and the leader checks its connection.
const LEADER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The slots held by running instances, in order: their slot locks among the advisory locks
/// (a bigint key shows as `classid` = high half, `objid` = low half, `objsubid` = 1).
fn live_slots(c: &mut Client) -> Result<Vec<i16>, postgres::Error> {
    Ok(held_slots(c, SLOT_LOCK)?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// The slots `k` whose lock `base + k` some session holds, in order, with that session's
/// server process id: an instance that takes a dead one's slot holds it from another session.
fn held_slots(c: &mut Client, base: i64) -> Result<Vec<(i16, i32)>, postgres::Error> {
    let rows = c.query(
        "SELECT objid::text, pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1
         AND objsubid = 1 AND granted",
        &[&((base >> 32) as u32)],
    )?;
    let low = base as u32;
    let mut slots: Vec<(i16, i32)> = rows
        .iter()
        .filter_map(|r| {
            let slot = r
                .get::<_, String>(0)
                .parse::<u32>()
                .ok()?
                .checked_sub(low)?;
            (u64::from(slot) < SLOTS)
                .then(|| (slot as i16, r.get::<_, Option<i32>>(1).unwrap_or(0)))
        })
        .collect();
    slots.sort_unstable();
    Ok(slots)
}

/// Instances linked to the XMPP server: `LINKED_LOCK + slot`, taken by the leadership thread once
/// the instance's link is up ([`super::Leadership::set_linked`]). The epochs follow these, not
/// the slots: a slot is claimed before the link is made, and an instance that went cold between
/// a newcomer's slot and its link would serve rooms the server then moves to the newcomer, and
/// keep them warm (and stale) with no change left to tell it. Following the links, every change
/// of where the server routes comes before the epoch that makes the others read rooms again.
/// They are compared with the sessions holding them: a standby taking a dead instance's place
/// takes its slot too, often between two looks, and the same slots held anew are a change.
pub const LINKED_LOCK: i64 = MIGRATION_LOCK + 300;

/// Contend for leadership on a connection of its own, on a thread of its own: the leader holds
/// [`LEADER_LOCK`] for as long as its session lives; when the instance dies (or loses the
/// database), PostgreSQL ends the session and a follower takes the lock within [`LEADER_CHECK`].
///
/// The same thread holds this instance's [`LINKED_LOCK`] once its link is up, and counts the
/// changes of the other linked instances (epochs).
pub fn contend(url: &str, slot: u64) -> super::Leadership {
    let leadership = super::Leadership::follower();
    let flag = leadership.clone();
    let url = url.to_owned();
    let mine = LINKED_LOCK + slot as i64;
    let spawned = std::thread::Builder::new()
        .name("caseroom-leader".into())
        .spawn(move || {
            let mut conn: Option<Client> = None;
            let mut live: Option<Vec<(i16, i32)>> = None;
            // Whether `conn` holds this instance's linked lock (a new connection does not).
            let mut announced = false;
            loop {
                if let Some(c) = conn.as_mut() {
                    if !announced && flag.is_linked() {
                        announced = try_lock(c, mine).unwrap_or(false);
                    }
                    // Which other instances are linked: a change moves rooms between them. This
                    // one's own lock is left out (its link coming up changes nothing it holds).
                    if let Ok(mut now) = held_slots(c, LINKED_LOCK) {
                        now.retain(|(s, _)| *s as u64 != slot);
                        if live.as_ref().is_some_and(|l| *l != now) {
                            tracing::info!(others = now.len(), "the linked instances changed");
                            flag.next_epoch();
                        }
                        live = Some(now);
                    }
                }
                let held = match conn.as_mut() {
                    None => {
                        conn = super::pg_tls::connect(&url)
                            .map_err(|e| tracing::warn!(error = %e, "leadership: cannot reach PostgreSQL"))
                            .ok();
                        false
                    }
                    Some(c) if flag.is_leader() => c.simple_query("SELECT 1").is_ok(),
                    Some(c) => try_lock(c, LEADER_LOCK).unwrap_or(false),
                };
                if held != flag.is_leader() {
                    tracing::info!(leader = held, "leadership changed (tracker sync, polls, retention, replays)");
                    flag.set(held);
                }
                if conn.as_ref().is_some_and(|c| c.is_closed()) {
                    conn = None;
                    announced = false;
                }
                // Woken early when the link comes up ([`super::Leadership::set_linked`]).
                std::thread::park_timeout(LEADER_CHECK);
            }
        });
    match spawned {
        Ok(handle) => leadership.watched_by(handle.thread().clone()),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the leadership thread: this instance never leads")
        }
    }
    leadership
}

/// Schema migrations, in order.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        anonymous BOOLEAN NOT NULL DEFAULT FALSE,
        subject TEXT NOT NULL DEFAULT '');
     CREATE TABLE affiliations (
        room TEXT NOT NULL REFERENCES rooms(name) ON DELETE CASCADE,
        jid TEXT NOT NULL,
        affiliation TEXT NOT NULL,
        PRIMARY KEY (room, jid));
     CREATE TABLE archive (
        seq BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        room TEXT NOT NULL,
        ts BIGINT NOT NULL,
        nick TEXT NOT NULL,
        sender TEXT NOT NULL,
        origin TEXT,
        forwarded BYTEA NOT NULL,
        words TSVECTOR NOT NULL);
     CREATE INDEX archive_room_seq ON archive(room, seq);
     CREATE INDEX archive_room_ts ON archive(room, ts);
     CREATE UNIQUE INDEX archive_origin ON archive(origin) WHERE origin IS NOT NULL;
     CREATE INDEX archive_words ON archive USING GIN (words);
     CREATE TABLE archive_ref (
        room TEXT NOT NULL,
        ref TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (room, ref, seq));
     CREATE INDEX archive_ref_seq ON archive_ref(seq);
     CREATE TABLE inbox (
        id BIGSERIAL PRIMARY KEY,
        tracker TEXT NOT NULL,
        delivery TEXT,
        body_hash TEXT NOT NULL,
        received BIGINT NOT NULL,
        content_type TEXT,
        headers TEXT NOT NULL,
        body BYTEA NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        note TEXT,
        UNIQUE (tracker, delivery));
     CREATE INDEX inbox_hash ON inbox(tracker, body_hash);
     CREATE INDEX inbox_pending ON inbox(id) WHERE state = 'pending';
     CREATE TABLE mutes (
        room TEXT NOT NULL,
        jid TEXT NOT NULL,
        rules TEXT NOT NULL,
        PRIMARY KEY (room, jid));",
    // 2: which instance (slot) accepted a delivery: when that instance is gone, its pending
    // deliveries are replayed at once by the leader or by the next instance in its slot.
    "ALTER TABLE inbox ADD COLUMN slot SMALLINT;",
    // 3: who is in each room, written by the instance serving it, read by the one taking it over.
    "CREATE TABLE occupants (
        room TEXT NOT NULL,
        session TEXT NOT NULL,
        nick TEXT NOT NULL,
        role TEXT NOT NULL,
        presence TEXT NOT NULL,
        PRIMARY KEY (room, session));",
    // 4: linked personal tokens, shared by every instance (`pg_links`; JSON as in the tokens file).
    "CREATE TABLE linked_tokens (
        tracker TEXT NOT NULL,
        jid TEXT NOT NULL,
        link TEXT NOT NULL,
        PRIMARY KEY (tracker, jid));",
];

/// The archive columns [`page_row`] reads, in its order (`stanza` is always empty here: a message is
/// kept once, as MAM serves it).
const PAGE_COLUMNS: &str = "seq, id, room, ts, nick, sender, '' AS stanza, origin, forwarded";

/// A PostgreSQL store.
pub struct PgStore {
    /// Always `Some` until dropped (see `Drop`).
    client: RefCell<Option<Client>>,
    url: String,
    /// This instance's slot, once claimed ([`PgStore::claim_slot`]).
    slot: std::cell::Cell<Option<i16>>,
}

impl Drop for PgStore {
    /// The synchronous client blocks on a runtime of its own when it closes, which panics inside
    /// an async context (a start that fails after opening the store): close it on a thread then.
    fn drop(&mut self) {
        if let Some(c) = self.client.get_mut().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::spawn(move || drop(c)).join();
            }
        }
    }
}

fn page_row(r: &postgres::Row) -> Result<PageRow, postgres::Error> {
    Ok((
        (
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
            r.try_get(5)?,
            r.try_get(6)?,
            r.try_get(7)?,
        ),
        r.try_get(8)?,
    ))
}

/// Query parameters built up with their conditions.
type Params = Vec<Box<dyn ToSql + Sync>>;

fn qerr(e: impl std::fmt::Display) -> QueryError {
    QueryError::Store(e.to_string())
}

impl PgStore {
    /// Connect to `url` (`postgres://user:password@host:port/database`, or key=value form) and bring
    /// the schema up to date.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let client = super::pg_tls::connect(url)?;
        let store = PgStore {
            client: RefCell::new(Some(client)),
            url: url.to_owned(),
            slot: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The linked tokens ([`super::pg_links::load`]).
    pub fn links(&self, file: &crate::links::LinksFile) -> Result<crate::links::Links, StoreError> {
        super::pg_links::load(&mut self.db(), file)
    }

    /// The connection.
    fn db(&self) -> std::cell::RefMut<'_, Client> {
        std::cell::RefMut::map(self.client.borrow_mut(), |c| {
            c.as_mut()
                .expect("the client is only taken when the store is dropped")
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.db();
        let mut tx = c.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS caseroom_schema (version INT NOT NULL)")?;
        let version: Option<i32> = tx
            .query_opt("SELECT version FROM caseroom_schema", &[])?
            .map(|r| r.get(0));
        if version.is_none() {
            tx.execute("INSERT INTO caseroom_schema(version) VALUES (0)", &[])?;
        }
        let version = version.unwrap_or(0).max(0) as usize;
        super::newer_schema(version, MIGRATIONS.len())?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.batch_execute(sql)?;
            tx.execute(
                "UPDATE caseroom_schema SET version = $1",
                &[&((i + 1) as i32)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Claim a free instance slot (see [`SLOTS`]) for as long as this connection lives.
    pub fn claim_slot(&self) -> Result<u64, StoreError> {
        for slot in 0..SLOTS {
            if try_lock(&mut self.db(), SLOT_LOCK + slot as i64)? {
                self.slot.set(Some(slot as i16));
                return Ok(slot);
            }
        }
        Err(StoreError::Refused(format!(
            "all {SLOTS} instance slots of this database are taken: at most {SLOTS} caseroom instances may share it"
        )))
    }

    /// The slots held by running instances (this one's included).
    pub fn live_slots(&self) -> Result<Vec<i16>, StoreError> {
        Ok(live_slots(&mut self.db())?)
    }

    /// Pending deliveries nobody is handling: accepted by an instance no longer running (its slot
    /// free, or now this instance's after a restart), or before `before` (µs) whoever took them.
    fn orphans(&self, before: i64) -> Result<Vec<InboxRow>, StoreError> {
        let live = self.live_slots()?;
        let mine = self.slot.get();
        Ok(self
            .pending()?
            .into_iter()
            .filter(|(r, slot)| {
                r.item.received < before
                    || match slot {
                        None => true,
                        Some(s) => Some(*s) == mine || !live.contains(s),
                    }
            })
            .map(|(r, _)| r)
            .collect())
    }

    /// Pending deliveries, oldest first, with the slot of the instance that accepted each.
    fn pending(&self) -> Result<Vec<(InboxRow, Option<i16>)>, StoreError> {
        let rows = self.db().query(
            "SELECT id, tracker, delivery, received, content_type, headers, body, body_hash, slot
             FROM inbox WHERE state = 'pending' ORDER BY id",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                let headers: String = r.get(5);
                let row = InboxRow {
                    id: r.get(0),
                    item: InboxItem {
                        tracker: r.get(1),
                        delivery: r.get(2),
                        received: r.get(3),
                        content_type: r.get(4),
                        headers: serde_json::from_str(&headers).unwrap_or_default(),
                        body: r.get(6),
                        body_hash: r.get(7),
                        packed: None,
                        doc: None,
                    },
                };
                (row, r.get(8))
            })
            .collect())
    }

    /// Every stored room with its affiliations.
    pub fn rooms(&self) -> Result<Vec<RoomInfo>, StoreError> {
        self.rooms_named(None)
    }

    /// Every stored room, or only the one named, with its affiliations.
    fn rooms_named(&self, only: Option<&str>) -> Result<Vec<RoomInfo>, StoreError> {
        let mut c = self.db();
        let mut rooms: BTreeMap<String, RoomInfo> = BTreeMap::new();
        for r in c.query(
            "SELECT name, title, description, anonymous, subject FROM rooms
             WHERE $1::text IS NULL OR name = $1",
            &[&only],
        )? {
            let name: String = r.get(0);
            rooms.insert(
                name.clone(),
                RoomInfo {
                    name,
                    title: r.get(1),
                    description: r.get(2),
                    anonymous: r.get(3),
                    subject: r.get(4),
                    affiliations: BTreeMap::new(),
                },
            );
        }
        for r in c.query(
            "SELECT room, jid, affiliation FROM affiliations WHERE $1::text IS NULL OR room = $1",
            &[&only],
        )? {
            let (room, jid, aff): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            if let (Some(info), Ok(jid), Some(aff)) = (
                rooms.get_mut(&room),
                jid.parse::<BareJid>(),
                parse_affiliation(&aff),
            ) {
                info.affiliations.insert(jid, aff);
            }
        }
        Ok(rooms.into_values().collect())
    }

    /// Create or update rooms and apply their affiliations over the stored ones, in one transaction.
    pub fn upsert_rooms(&mut self, rooms: &[RoomInfo]) -> Result<(), StoreError> {
        let mut c = self.db();
        let mut tx = c.transaction()?;
        for info in rooms {
            upsert_room(&mut tx, info)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every stored per-person filter: (room, person, rules).
    pub fn mutes(
        &self,
    ) -> Result<Vec<(String, BareJid, Vec<crate::config::FilterConfig>)>, StoreError> {
        let rows = self.db().query("SELECT room, jid, rules FROM mutes", &[])?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let (room, jid, rules): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                Some((room, jid.parse().ok()?, serde_json::from_str(&rules).ok()?))
            })
            .collect())
    }

    /// The highest archive sequence number.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .db()
            .query_one("SELECT MAX(seq) FROM archive", &[])?
            .get(0);
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// The occupant-id salt, created on first use (the first instance's wins).
    pub fn occupant_salt(&self) -> Result<String, StoreError> {
        let mut buf = [0u8; 16];
        if getrandom::getrandom(&mut buf).is_err() {
            let t = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
            buf[..8].copy_from_slice(&t.to_le_bytes());
        }
        self.db().execute(
            "INSERT INTO meta(key, value) VALUES ('occupant_salt', $1) ON CONFLICT (key) DO NOTHING",
            &[&hex::encode(buf)],
        )?;
        Backend::meta(self, "occupant_salt")?
            .ok_or_else(|| StoreError::Refused("the occupant salt vanished".into()))
    }

    /// Deliveries by state (for status and tests).
    pub fn inbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = self.db().query(
            "SELECT state, COUNT(*) FROM inbox GROUP BY state ORDER BY state",
            &[],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn seq_of(&self, room: &str, id: &str) -> Result<i64, QueryError> {
        self.db()
            .query_opt(
                "SELECT seq FROM archive WHERE room = $1 AND id = $2",
                &[&room, &id],
            )
            .map_err(qerr)?
            .map(|r| r.get(0))
            .ok_or_else(|| QueryError::UnknownId(id.to_owned()))
    }

    /// A query's filter (XEP-0313 §4.1.1 fields, ids, XEP-0431 words) as SQL conditions with their
    /// values; `$n` placeholders are numbered from 1 in order.
    fn filter_of(&self, q: &ArchiveQuery) -> Result<(Vec<String>, Params), QueryError> {
        let mut conds: Vec<String> = Vec::new();
        let mut vals: Params = Vec::new();
        let mut push = |cond: &str, v: Box<dyn ToSql + Sync>| {
            vals.push(v);
            conds.push(cond.replace('?', &format!("${}", vals.len())));
        };
        push("room = ?", Box::new(q.room.clone()));
        if let Some(s) = q.start {
            push("ts >= ?", Box::new(s.timestamp_micros()));
        }
        if let Some(e) = q.end {
            push("ts <= ?", Box::new(e.timestamp_micros()));
        }
        match &q.with {
            Some(With::Nick(n)) => push("nick = ?", Box::new(n.clone())),
            Some(With::Bare(b)) => push("sender = ?", Box::new(b.clone())),
            None => {}
        }
        if let Some(id) = &q.after_id {
            push("seq > ?", Box::new(self.seq_of(&q.room, id)?));
        }
        if let Some(id) = &q.before_id {
            push("seq < ?", Box::new(self.seq_of(&q.room, id)?));
        }
        if let Some(words) = &q.fulltext {
            let folded: Vec<String> = words.iter().map(|w| search::fold(w)).collect();
            push(
                "words @@ plainto_tsquery('simple', ?)",
                Box::new(folded.join(" ")),
            );
        }
        if let Some(ids) = &q.ids {
            let mut seqs = Vec::new();
            for id in ids {
                seqs.push(self.seq_of(&q.room, id)?);
            }
            push("seq = ANY(?)", Box::new(seqs));
        }
        Ok((conds, vals))
    }

    fn edge(&self, room: &str, order: &str) -> Result<Option<PageItem>, StoreError> {
        let row = self.db().query_opt(
            &format!(
                "SELECT {PAGE_COLUMNS} FROM archive WHERE room = $1 ORDER BY seq {order} LIMIT 1"
            ),
            &[&room],
        )?;
        match row {
            Some(r) => Ok(page_item(page_row(&r)?).ok()),
            None => Ok(None),
        }
    }
}

fn upsert_room(tx: &mut postgres::Transaction<'_>, info: &RoomInfo) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO rooms(name, title, description, anonymous) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET title = $2, description = $3, anonymous = $4",
        &[&info.name, &info.title, &info.description, &info.anonymous],
    )?;
    for (jid, aff) in &info.affiliations {
        set_affiliation(tx, &info.name, jid, aff)?;
    }
    Ok(())
}

fn set_affiliation(
    tx: &mut postgres::Transaction<'_>,
    room: &str,
    jid: &BareJid,
    aff: &Affiliation,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO affiliations(room, jid, affiliation) VALUES ($1, $2, $3)
         ON CONFLICT (room, jid) DO UPDATE SET affiliation = $3",
        &[&room, &jid.as_str(), &affiliation_str(aff)],
    )?;
    Ok(())
}

fn accept_in(
    tx: &mut postgres::Transaction<'_>,
    items: &[InboxItem],
    slot: Option<i16>,
) -> Result<Vec<Accepted>, StoreError> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let hash = it.body_hash.clone().unwrap_or_else(|| body_hash(&it.body));
        // The body is what the tracker signed: seen before, it is the same event (a replay).
        let seen = tx
            .query_opt(
                "SELECT 1 FROM inbox WHERE tracker = $1 AND body_hash = $2 LIMIT 1",
                &[&it.tracker, &hash],
            )?
            .is_some();
        if seen {
            out.push(Accepted::Duplicate);
            continue;
        }
        let headers = serde_json::to_string(&it.headers).unwrap_or_else(|_| "[]".into());
        let row = tx.query_opt(
            "INSERT INTO inbox(tracker, delivery, body_hash, received, content_type, headers, body, slot)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tracker, delivery) DO NOTHING RETURNING id",
            &[
                &it.tracker,
                &it.delivery,
                &hash,
                &it.received,
                &it.content_type,
                &headers,
                &it.body,
                &slot,
            ],
        )?;
        out.push(match row {
            Some(r) => Accepted::New(r.get(0)),
            None => Accepted::Duplicate,
        });
    }
    Ok(out)
}

fn append_in(
    tx: &mut postgres::Transaction<'_>,
    msgs: &[Appended],
) -> Result<Vec<bool>, StoreError> {
    let mut written = Vec::with_capacity(msgs.len());
    for a in msgs {
        let m = &a.message;
        let p = a.parts()?;
        let seq = m.seq as i64;
        let n = tx.execute(
            "INSERT INTO archive(seq, id, room, ts, nick, sender, origin, forwarded, words)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_tsvector('simple', $9))
             ON CONFLICT DO NOTHING",
            &[
                &seq,
                &m.id,
                &m.room,
                &m.ts.timestamp_micros(),
                &m.nick,
                &m.sender.as_str(),
                &m.origin,
                &p.forwarded,
                &search::fold(&p.text),
            ],
        )?;
        if n > 0 {
            if let Some(r) = &p.refers {
                tx.execute(
                    "INSERT INTO archive_ref(room, ref, seq) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&m.room, r, &seq],
                )?;
            }
        }
        match &m.completes_inbox {
            Some(c) if !c.rooms.is_empty() => {
                // Instances post a delivery's rooms concurrently: the row lock orders their
                // checks, so the last of them, reading after the others committed, sees every
                // room's message (READ COMMITTED reads anew per statement).
                let origins = c.origins();
                tx.execute("SELECT 1 FROM inbox WHERE id = $1 FOR UPDATE", &[&c.inbox])?;
                tx.execute(
                    "UPDATE inbox SET state = 'done' WHERE id = $1
                     AND (SELECT count(*) FROM archive WHERE origin = ANY($2)) >= $3",
                    &[&c.inbox, &origins, &(origins.len() as i64)],
                )?;
            }
            Some(c) => {
                tx.execute("UPDATE inbox SET state = 'done' WHERE id = $1", &[&c.inbox])?;
            }
            None => {}
        }
        written.push(n > 0);
    }
    Ok(written)
}

impl Backend for PgStore {
    fn sessions(
        &self,
        room: &str,
    ) -> Result<Option<Vec<crate::muc::room::SessionRow>>, StoreError> {
        let rows = self.db().query(
            "SELECT session, nick, role, presence FROM occupants WHERE room = $1",
            &[&room],
        )?;
        Ok(Some(
            rows.iter()
                .filter_map(|r| {
                    Some(crate::muc::room::SessionRow {
                        session: r.get::<_, String>(0).parse().ok()?,
                        nick: r.get(1),
                        role: crate::xmpp::outbound::parse_role(&r.get::<_, String>(2))?,
                        presence: r.get(3),
                    })
                })
                .collect(),
        ))
    }

    fn room_info(&self, name: &str) -> Result<Option<RoomInfo>, StoreError> {
        Ok(self.rooms_named(Some(name))?.pop())
    }

    fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[Appended],
    ) -> Result<(Vec<Accepted>, Vec<bool>), StoreError> {
        let mut c = self.db();
        let mut tx = c.transaction()?;
        let accepted = accept_in(&mut tx, items, self.slot.get())?;
        let written = append_in(&mut tx, msgs)?;
        tx.commit()?;
        Ok((accepted, written))
    }

    fn persist(&mut self, p: &Persist) -> Result<(), StoreError> {
        let mut c = self.db();
        let mut tx = c.transaction()?;
        match p {
            Persist::Affiliation {
                room,
                jid,
                affiliation,
            } => {
                if *affiliation == Affiliation::None {
                    tx.execute(
                        "DELETE FROM affiliations WHERE room = $1 AND jid = $2",
                        &[room, &jid.as_str()],
                    )?;
                } else {
                    set_affiliation(&mut tx, room, jid, affiliation)?;
                }
            }
            Persist::Room(info) => {
                upsert_room(&mut tx, info)?;
                let keep: Vec<&str> = info.affiliations.keys().map(|j| j.as_str()).collect();
                tx.execute(
                    "DELETE FROM affiliations WHERE room = $1 AND NOT (jid = ANY($2))",
                    &[&info.name, &keep],
                )?;
            }
            Persist::Mutes { room, jid, rules } => {
                if rules.is_empty() {
                    tx.execute(
                        "DELETE FROM mutes WHERE room = $1 AND jid = $2",
                        &[room, &jid.as_str()],
                    )?;
                } else {
                    let json = serde_json::to_string(rules).unwrap_or_else(|_| "[]".into());
                    tx.execute(
                        "INSERT INTO mutes(room, jid, rules) VALUES ($1, $2, $3)
                         ON CONFLICT (room, jid) DO UPDATE SET rules = $3",
                        &[room, &jid.as_str(), &json],
                    )?;
                }
            }
            Persist::Subject { room, subject } => {
                tx.execute(
                    "UPDATE rooms SET subject = $2 WHERE name = $1",
                    &[room, subject],
                )?;
            }
            Persist::Occupants { room, rows } => {
                tx.execute("DELETE FROM occupants WHERE room = $1", &[room])?;
                // One statement for the whole room, however many are in it.
                let mut cols: [Vec<String>; 4] = Default::default();
                for r in rows {
                    cols[0].push(r.session.to_string());
                    cols[1].push(r.nick.clone());
                    cols[2].push(crate::xmpp::outbound::role_str(&r.role).to_owned());
                    cols[3].push(r.presence.clone());
                }
                tx.execute(
                    "INSERT INTO occupants(room, session, nick, role, presence)
                     SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])",
                    &[room, &cols[0], &cols[1], &cols[2], &cols[3]],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// XEP-0313 §4 with RSM (XEP-0059 §2); the same answers as the SQLite store's.
    fn query(&self, q: &ArchiveQuery) -> Result<MamPage, QueryError> {
        if q.metadata {
            let first = self.edge(&q.room, "ASC").map_err(qerr)?;
            let last = self.edge(&q.room, "DESC").map_err(qerr)?;
            return Ok(MamPage::edges(first, last));
        }
        let (mut conds, mut vals) = self.filter_of(q)?;
        let count: i64 = {
            let params: Vec<&(dyn ToSql + Sync)> = vals.iter().map(|v| v.as_ref()).collect();
            self.db()
                .query_one(
                    &format!("SELECT COUNT(*) FROM archive WHERE {}", conds.join(" AND ")),
                    &params,
                )
                .map_err(qerr)?
                .get(0)
        };
        let (from, backward) = q.page.from();
        let (op, order) = if backward {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some(id) = from {
            vals.push(Box::new(self.seq_of(&q.room, id)?));
            conds.push(format!("seq {op} ${}", vals.len()));
        }
        vals.push(Box::new((q.max + 1) as i64));
        let sql = format!(
            "SELECT {PAGE_COLUMNS} FROM archive WHERE {} ORDER BY seq {order} LIMIT ${}",
            conds.join(" AND "),
            vals.len()
        );
        let params: Vec<&(dyn ToSql + Sync)> = vals.iter().map(|v| v.as_ref()).collect();
        let rows = self.db().query(&sql, &params).map_err(qerr)?;
        let items = rows
            .iter()
            .map(|r| {
                page_row(r)
                    .map_err(StoreError::from)
                    .and_then(page_item)
                    .map_err(qerr)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MamPage::from_rows(q, items, count.max(0) as usize))
    }

    fn recent(&self, room: &str, n: usize) -> Result<Vec<ArchivedMessage>, StoreError> {
        let rows = self.db().query(
            &format!(
                "SELECT {PAGE_COLUMNS} FROM archive WHERE room = $1 ORDER BY seq DESC LIMIT $2"
            ),
            &[&room, &(n as i64)],
        )?;
        let mut out = rows
            .iter()
            .map(|r| page_row(r).map_err(StoreError::from).and_then(decode))
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
            &[&key, &value],
        )?;
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db()
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?
            .map(|r| r.get(0)))
    }

    fn prune_step(&mut self, job: &mut prune::PruneJob) -> Result<bool, StoreError> {
        let mut c = self.db();
        if job.rooms.is_none() {
            let rooms: Vec<String> = c
                .query("SELECT DISTINCT room FROM archive", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            job.rooms = Some(
                rooms
                    .into_iter()
                    .filter(|r| job.plan.cutoff(r).is_some())
                    .rev()
                    .collect(),
            );
        }
        let batch = prune::BATCH as i64;
        if let Some(room) = job.rooms.as_mut().and_then(|r| r.last().cloned()) {
            let before = job.plan.cutoff(&room).unwrap_or(i64::MIN);
            let mut tx = c.transaction()?;
            let seqs: Vec<i64> = tx
                .query(
                    "SELECT seq FROM archive WHERE room = $1 AND ts < $2 ORDER BY ts LIMIT $3",
                    &[&room, &before, &batch],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            tx.execute("DELETE FROM archive_ref WHERE seq = ANY($1)", &[&seqs])?;
            let n = tx.execute("DELETE FROM archive WHERE seq = ANY($1)", &[&seqs])? as usize;
            tx.commit()?;
            if n > 0 {
                *job.tally.messages.entry(room.clone()).or_insert(0) += n as u64;
            }
            if n < prune::BATCH {
                job.rooms.as_mut().map(Vec::pop);
            }
            return Ok(true);
        }
        if let (Some(before), false) = (job.plan.deliveries_before, job.deliveries_done) {
            if job.plan.only_room.is_none() {
                let n = c.execute(
                    "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox
                        WHERE state != 'pending' AND received < $1 ORDER BY id LIMIT $2)",
                    &[&before, &batch],
                )? as usize;
                job.tally.deliveries += n as u64;
                if n == prune::BATCH {
                    return Ok(true);
                }
            }
            job.deliveries_done = true;
        }
        Ok(false)
    }

    /// Nothing to backfill: every row is indexed as it is written.
    fn fts_backfill_step(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn moderate(
        &mut self,
        m: &crate::muc::moderation::Moderation,
    ) -> Result<Vec<ArchivedMessage>, StoreError> {
        let mut c = self.db();
        let mut tx = c.transaction()?;
        let seqs: Vec<i64> = match &m.refers {
            Some(r) => tx.query(
                "SELECT seq FROM archive_ref WHERE room = $1 AND ref = $2",
                &[&m.room, r],
            )?,
            None => tx.query(
                "SELECT seq FROM archive WHERE room = $1 AND id = $2",
                &[&m.room, &m.id],
            )?,
        }
        .iter()
        .map(|r| r.get(0))
        .collect();
        let mut stones = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let Some(row) = tx.query_opt(
                &format!("SELECT {PAGE_COLUMNS} FROM archive WHERE seq = $1 FOR UPDATE"),
                &[&seq],
            )?
            else {
                continue; // pruned meanwhile
            };
            let original = decode(page_row(&row)?)?;
            let stone = crate::muc::moderation::tombstone(&original, m);
            let bytes = forwarded_of(&stone)?;
            // Out of search with the words; retracted once (a repeated deletion finds nothing).
            tx.execute(
                "UPDATE archive SET forwarded = $1, words = ''::tsvector WHERE seq = $2",
                &[&bytes, &seq],
            )?;
            tx.execute("DELETE FROM archive_ref WHERE seq = $1", &[&seq])?;
            stones.push(stone);
        }
        if let Some(id) = m.completes_inbox {
            let note = format!("retracted {} message(s)", stones.len());
            tx.execute(
                "UPDATE inbox SET state = 'done', note = $2 WHERE id = $1",
                &[&id, &note],
            )?;
        }
        tx.commit()?;
        Ok(stones)
    }

    fn pending_inbox(&self) -> Result<Vec<InboxRow>, StoreError> {
        Ok(self.pending()?.into_iter().map(|(r, _)| r).collect())
    }

    fn orphaned_inbox(&self, before: i64) -> Result<Vec<InboxRow>, StoreError> {
        self.orphans(before)
    }

    fn inbox_backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        let r = self.db().query_one(
            "SELECT COUNT(*), MIN(received) FROM inbox WHERE state = 'pending'",
            &[],
        )?;
        let n: i64 = r.get(0);
        Ok((n.max(0) as u64, r.get(1)))
    }

    fn finish_inbox(&mut self, id: i64, state: &str, note: &str) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE inbox SET state = $2, note = $3 WHERE id = $1",
            &[&id, &state, &note],
        )?;
        Ok(())
    }

    /// Every commit is durable when it returns.
    fn sync(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn reader(&self) -> Result<Self, StoreError> {
        Ok(PgStore {
            client: RefCell::new(Some(super::pg_tls::connect(&self.url)?)),
            url: self.url.clone(),
            slot: self.slot.clone(),
        })
    }

    /// PostgreSQL checkpoints by itself.
    fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn flush_database(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn wal_limit_frames(&self) -> u64 {
        u64::MAX
    }

    fn checkpoint_in_commits(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
