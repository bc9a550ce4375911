//! Full-text search of room history (XEP-0431 through MAM) on SQLite FTS5.
//!
//! `archive_fts` is a contentless FTS5 table (the words are indexed, the text is not stored twice)
//! whose rowid is the archive's `seq`. A message is deleted from it with its archive row
//! (retention, retraction: `contentless_delete`).
//!
//! Messages are indexed in batches after their commit ([`Store::index_pending`]): at most
//! [`INDEX_BATCH`] messages or [`INDEX_DELAY`] after the first, whichever comes first, and always
//! before a search, a retraction, a prune or an idle sync. Indexing each message in its own commit
//! wrote 5-7 more pages per commit (a new FTS5 segment each time); at 1,000 webhook deliveries a
//! second that was a fifth of the store thread's CPU and of what it wrote. The batch and
//! `meta['fts_indexed_through']` (every message up to that seq is indexed) are committed together,
//! so a crash loses both, and the next start indexes what the archive holds above it
//! ([`Store::recover_index`]).
//!
//! An archive from before the index existed is indexed by the store thread a batch at a time,
//! newest first, between its other work (`meta['fts_backfill_below']`: every message below that
//! seq still has to be indexed).

use rusqlite::params;

use super::{decode, page_row, Store, StoreError, PAGE_COLUMNS};
use crate::muc::ArchivedMessage;

/// Messages indexed per backfill transaction.
const BACKFILL_BATCH: i64 = 250;
/// At most this much of one message is indexed.
const MAX_TEXT: usize = 16 * 1024;
/// `meta` key: messages with a lower seq are not indexed yet.
pub const BACKFILL_KEY: &str = "fts_backfill_below";
/// `meta` key: every message up to this seq is indexed.
pub const THROUGH_KEY: &str = "fts_indexed_through";
/// Messages indexed together at most.
pub const INDEX_BATCH: usize = 256;
/// Longest a committed message waits to be indexed while the store thread is busy.
pub const INDEX_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// A committed message's full-text entry, waiting for [`Store::index_pending`].
#[derive(Debug)]
pub struct Entry {
    /// The archive row (the index's rowid).
    pub seq: i64,
    /// [`room_token`] of its room.
    pub room: String,
    /// [`search_text`].
    pub text: String,
}

impl Entry {
    /// `m`'s entry, its searchable text already read (see [`index_entries`]).
    pub fn new(m: &ArchivedMessage, text: String) -> Entry {
        Entry {
            seq: m.seq as i64,
            room: room_token(&m.room),
            text,
        }
    }

    /// `m`'s entry.
    pub fn of(m: &ArchivedMessage) -> Entry {
        Entry::new(m, search_text(m))
    }
}

/// Messages committed but not yet indexed, in seq order, since when the first of them waits.
#[derive(Debug)]
pub struct Unindexed {
    since: std::time::Instant,
    entries: Vec<Entry>,
}

impl Unindexed {
    /// Add to what waits (or start waiting, from now).
    pub fn add(waiting: &mut Option<Unindexed>, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        waiting
            .get_or_insert_with(|| Unindexed {
                since: std::time::Instant::now(),
                entries: Vec::new(),
            })
            .entries
            .extend(entries);
    }
}

/// What is searchable in a message: its body, and the readable strings of its JSON payload (an
/// event's case title, labels, people), not its URLs, ids, types or dates.
pub fn search_text(m: &ArchivedMessage) -> String {
    index_entries(m).0
}

/// What a message adds to the indexes, from one reading of its JSON payload: its searchable text,
/// and the tracker object it shows if the tracker may delete it later (a comment's URL, for
/// `archive_ref`; the activity's `object.url` of a comment created or edited).
pub fn index_entries(m: &ArchivedMessage) -> (String, Option<String>) {
    let mut text = String::new();
    let mut refers = None;
    for b in m.message.bodies.values() {
        text.push_str(b);
        text.push('\n');
    }
    for p in &m.message.payloads {
        if p.is("json", "urn:xmpp:json:0") {
            let url = super::readable::read_into(&text_of(p), &mut text, MAX_TEXT);
            refers = refers.or(url);
        }
    }
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    (text, refers)
}

/// An element's text, borrowed when it is one node, as a JSON container's is (`Element::text`
/// copies it).
fn text_of(e: &minidom::Element) -> std::borrow::Cow<'_, str> {
    let mut texts = e.texts();
    match (texts.next(), texts.next()) {
        (Some(t), None) => std::borrow::Cow::Borrowed(t),
        (None, _) => std::borrow::Cow::Borrowed(""),
        _ => std::borrow::Cow::Owned(e.text()),
    }
}

/// Text as the indexes compare it: lower case, accents and other combining marks removed (what
/// SQLite's `unicode61 remove_diacritics 2` does; the PostgreSQL store folds in Rust the same way).
pub fn fold(text: &str) -> String {
    use unicode_normalization::char::is_combining_mark;
    use unicode_normalization::UnicodeNormalization;
    text.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The room as one token of the index's `room` column: `r` and the name in hex, so that no room's
/// token is a part of another's (the tokenizer would split `web-team` into `web` and `team`).
pub fn room_token(room: &str) -> String {
    format!("r{}", hex::encode(room))
}

/// The FTS5 query for a search's words in `room`: each word a quoted string in the `text` column (no
/// operator can be smuggled in), all required, and the room's token.
pub fn match_expr(room: &str, words: &[String]) -> String {
    let mut expr = format!("room : {}", room_token(room));
    for w in words {
        expr.push_str(&format!(" AND text : \"{}\"", w.replace('"', "\"\"")));
    }
    expr
}

/// Counted exactly up to this many hits; beyond, the answer has no RSM `<count/>` (XEP-0059 makes
/// it optional), so that a search for a word in every other message stays fast.
pub const COUNT_UP_TO: i64 = 10_000;

impl Store {
    /// A search with no other filter than RSM paging, planned from the index: its matches come in
    /// rowid (= seq) order straight from FTS5, so a page costs the same whether a word is in ten
    /// messages or in half a million; the count stops at [`COUNT_UP_TO`].
    pub(super) fn search_page(
        &self,
        q: &crate::muc::mam::ArchiveQuery,
        words: &[String],
    ) -> Result<crate::muc::mam::MamPage, crate::muc::mam::QueryError> {
        use crate::muc::mam::{MamPage, Page, QueryError};
        let serr = |e: rusqlite::Error| QueryError::Store(e.to_string());
        let expr = match_expr(&q.room, words);
        let (bound, order) = match &q.page {
            Page::Forward(Some(id)) => (Some(("rowid > ?", self.seq_of(&q.room, id)?)), "ASC"),
            Page::Forward(None) => (None, "ASC"),
            Page::Backward(Some(id)) => (Some(("rowid < ?", self.seq_of(&q.room, id)?)), "DESC"),
            Page::Backward(None) => (None, "DESC"),
        };
        let mut vals: Vec<rusqlite::types::Value> = vec![expr.clone().into()];
        let mut filter = "archive_fts MATCH ?".to_owned();
        if let Some((cond, seq)) = bound {
            filter = format!("{filter} AND {cond}");
            vals.push(seq.into());
        }
        vals.push(((q.max + 1) as i64).into());
        let seqs: Vec<i64> = self
            .conn
            .prepare_cached(&format!(
                "SELECT rowid FROM archive_fts WHERE {filter} ORDER BY rowid {order} LIMIT ?"
            ))
            .and_then(|mut s| {
                s.query_map(rusqlite::params_from_iter(vals.iter()), |r| r.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(serr)?;
        let complete = seqs.len() <= q.max;
        let mut items = Vec::with_capacity(q.max);
        {
            let mut row = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {PAGE_COLUMNS} FROM archive
                     WHERE seq = ?1"
                ))
                .map_err(serr)?;
            for seq in seqs.iter().take(q.max) {
                let found = row
                    .query_row([seq], super::page_row)
                    .map_err(serr)
                    .and_then(|r| {
                        super::page_item(r).map_err(|e| QueryError::Store(e.to_string()))
                    })?;
                items.push(found);
            }
        }
        if order == "DESC" {
            items.reverse();
        }
        let count: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM archive_fts WHERE archive_fts MATCH ?1 LIMIT ?2)",
            )
            .and_then(|mut s| s.query_row(params![expr, COUNT_UP_TO + 1], |r| r.get(0)))
            .map_err(serr)?;
        let count = (count <= COUNT_UP_TO).then_some(count as usize);
        let first_index = match (&q.page, items.is_empty(), count) {
            (_, true, _) => None,
            (Page::Forward(None), _, _) => Some(0),
            (Page::Backward(None), _, Some(n)) => Some(n.saturating_sub(items.len())),
            _ => None,
        };
        Ok(MamPage {
            items,
            complete,
            count,
            first_index,
        })
    }

    /// How long until the waiting messages are due to be indexed (zero: now); `None`: none wait.
    pub fn index_due_in(&self) -> Option<std::time::Duration> {
        let waiting = self.unindexed.as_ref()?;
        Some(if waiting.entries.len() >= INDEX_BATCH {
            std::time::Duration::ZERO
        } else {
            INDEX_DELAY.saturating_sub(waiting.since.elapsed())
        })
    }

    /// Index the messages committed since the last call, in one transaction, if they are due (or
    /// whatever waits when `force`). Not fsynced: the entries and the watermark are lost together
    /// or kept together, and [`Store::recover_index`] redoes what a crash lost. On failure the
    /// entries are kept and tried again next time.
    pub fn index_pending(&mut self, force: bool) -> Result<(), StoreError> {
        match self.index_due_in() {
            None => return Ok(()),
            Some(d) if !force && !d.is_zero() => return Ok(()),
            Some(_) => {}
        }
        let Some(waiting) = &self.unindexed else {
            return Ok(());
        };
        super::relaxed(&mut self.conn, &self.normal, |conn| {
            index_entries_in(conn, &waiting.entries)
        })?;
        self.unindexed = None;
        self.unsynced = true;
        Ok(())
    }

    /// At start: index what the archive holds above the watermark (committed, then lost to a crash
    /// before its batch was indexed), a batch at a time.
    pub(super) fn recover_index(&mut self) -> Result<(), StoreError> {
        let mut through: i64 = match self.meta(THROUGH_KEY)? {
            Some(v) => v.parse().unwrap_or(0),
            None => return Ok(()),
        };
        let mut recovered = 0usize;
        loop {
            let rows = batch_of(&self.conn, "seq > ?1 ORDER BY seq", through)?;
            let Some(last) = rows.last() else {
                break;
            };
            through = last.seq as i64;
            recovered += rows.len();
            let entries: Vec<Entry> = rows.iter().map(Entry::of).collect();
            index_entries_in(&mut self.conn, &entries)?;
        }
        if recovered > 0 {
            tracing::info!(
                messages = recovered,
                "indexed for search the messages a stop left unindexed"
            );
        }
        Ok(())
    }

    /// Index one batch of the archive kept before the index existed; false once all is indexed.
    pub fn fts_backfill_step(&mut self) -> Result<bool, StoreError> {
        let below: i64 = match self.meta(BACKFILL_KEY)? {
            Some(v) => v.parse().unwrap_or(0),
            None => 0,
        };
        if below <= 1 {
            return Ok(false);
        }
        self.synced()?;
        let tx = self.conn.transaction()?;
        let rows = batch_of(&tx, "seq < ?1 ORDER BY seq DESC", below)?;
        insert_entries(&tx, rows.iter().map(Entry::of))?;
        let next = if (rows.len() as i64) < BACKFILL_BATCH {
            0
        } else {
            rows.last().map_or(0, |m| m.seq as i64)
        };
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = ?2",
            params![next.to_string(), BACKFILL_KEY],
        )?;
        tx.commit()?;
        if next == 0 {
            tracing::info!("full-text index of the archive complete");
        }
        Ok(next > 1)
    }
}

/// Add `entries` (in seq order) to the index and move the watermark to the last, in one transaction.
fn index_entries_in(conn: &mut rusqlite::Connection, entries: &[Entry]) -> Result<(), StoreError> {
    let Some(last) = entries.last() else {
        return Ok(());
    };
    let tx = conn.transaction()?;
    insert_entries(&tx, entries)?;
    tx.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![THROUGH_KEY, last.seq.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

/// Add entries to the index (in the caller's transaction).
fn insert_entries<E: std::borrow::Borrow<Entry>>(
    conn: &rusqlite::Connection,
    entries: impl IntoIterator<Item = E>,
) -> Result<(), StoreError> {
    let mut insert =
        conn.prepare_cached("INSERT INTO archive_fts(rowid, room, text) VALUES (?1, ?2, ?3)")?;
    for e in entries {
        let e = e.borrow();
        insert.execute(params![e.seq, e.room, e.text])?;
    }
    Ok(())
}

/// Up to [`BACKFILL_BATCH`] archived messages matching `filter` (SQL over `seq`, with its order;
/// `?1` is `bound`), decoded.
fn batch_of(
    conn: &rusqlite::Connection,
    filter: &str,
    bound: i64,
) -> Result<Vec<ArchivedMessage>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PAGE_COLUMNS} FROM archive WHERE {filter} LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![bound, BACKFILL_BATCH], page_row)?;
    rows.map(|r| r.map_err(StoreError::from).and_then(decode))
        .collect()
}
