//! Full-text search of room history (XEP-0431 through MAM) on SQLite FTS5.
//!
//! `archive_fts` is a contentless FTS5 table (the words are indexed, the text is not stored twice)
//! whose rowid is the archive's `seq`; a message is indexed in the same transaction as its archive
//! row, and deleted with it (retention, `contentless_delete`). An archive from before the index
//! existed is indexed by the store thread a batch at a time, newest first, between its other work
//! (`meta['fts_backfill_below']`: every message below that seq still has to be indexed).

use rusqlite::params;

use super::{decode, page_row, Store, StoreError};
use crate::muc::ArchivedMessage;

/// Messages indexed per backfill transaction.
const BACKFILL_BATCH: i64 = 250;
/// At most this much of one message is indexed.
const MAX_TEXT: usize = 16 * 1024;
/// `meta` key: messages with a lower seq are not indexed yet.
pub const BACKFILL_KEY: &str = "fts_backfill_below";

/// What is searchable in a message: its body, and the readable strings of its JSON payload (an
/// event's case title, labels, people), not its URLs, ids, types or dates.
pub fn search_text(m: &ArchivedMessage) -> String {
    let mut text = String::new();
    for b in m.message.bodies.values() {
        text.push_str(b);
        text.push('\n');
    }
    for p in &m.message.payloads {
        if p.is("json", "urn:xmpp:json:0") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&p.text()) {
                readable_strings(&v, "", &mut text);
            }
        }
    }
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn readable_strings(v: &serde_json::Value, key: &str, out: &mut String) {
    const SKIP: &[&str] = &[
        "id",
        "type",
        "@context",
        "url",
        "href",
        "published",
        "updated",
        "mediaType",
    ];
    match v {
        serde_json::Value::String(s)
            if !SKIP.contains(&key) && !s.starts_with("http") && out.len() < MAX_TEXT =>
        {
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| readable_strings(x, key, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| readable_strings(x, k, out)),
        _ => {}
    }
}

/// The FTS5 query for a search's words: each a quoted string (no operator can be smuggled in),
/// all required.
pub fn match_expr(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Store {
    /// Index one batch of the archive kept before the index existed; false once all is indexed.
    pub fn fts_backfill_step(&mut self) -> Result<bool, StoreError> {
        let below: i64 = match self.meta(BACKFILL_KEY)? {
            Some(v) => v.parse().unwrap_or(0),
            None => 0,
        };
        if below <= 1 {
            return Ok(false);
        }
        let tx = self.conn.transaction()?;
        let rows: Vec<ArchivedMessage> = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, room, ts, nick, sender, stanza, origin, forwarded FROM archive
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![below, BACKFILL_BATCH], page_row)?;
            rows.map(|r| r.map_err(StoreError::from).and_then(decode))
                .collect::<Result<_, _>>()?
        };
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO archive_fts(rowid, text) VALUES (?1, ?2)")?;
            for m in &rows {
                insert.execute(params![m.seq as i64, search_text(m)])?;
            }
        }
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
