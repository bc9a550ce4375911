//! Linked personal tokens in PostgreSQL, shared by every instance on the store.
//!
//! With one instance the tokens live in their own 0600 file ([`crate::links::LinksFile`]). With
//! several, a person links their account through whichever instance answered the ad-hoc command,
//! and then types `!new` in a room that another instance may serve: the token must be where every
//! instance reads it. So on PostgreSQL they are rows of the table `linked_tokens` (one per tracker
//! and person), and a change is announced with `NOTIFY caseroom_links` in the transaction that
//! writes it; each instance listens and reads the table again, so a link made on one instance is
//! used by the others within milliseconds.
//!
//! Tokens are secrets: a dump of the database holds them. `pg_dump --exclude-table-data=linked_tokens`
//! leaves them out (README, "The store: SQLite or PostgreSQL"); nothing here logs a token.
//!
//! Writes run in order on a thread of their own (the synchronous client cannot run on the async
//! runtime); the listener has its own connection and thread, and reads everything again after a
//! reconnection, so a change missed while it was away is not missed for long.

use std::sync::mpsc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::StoreError;
use crate::links::{Link, LinkChange, Links, LinksFile};

/// The channel changes are announced on.
const CHANNEL: &str = "caseroom_links";
/// How long to wait before connecting again after PostgreSQL went away.
const RECONNECT: Duration = Duration::from_secs(1);

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Every link in the table.
fn read_all(c: &mut Client) -> Result<Links, StoreError> {
    let mut links = Links::default();
    for r in c.query("SELECT tracker, jid, link FROM linked_tokens", &[])? {
        let (tracker, jid, json): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        match serde_json::from_str::<Link>(&json) {
            Ok(l) => links.set(&tracker, &jid, l),
            // A row another version wrote, or damaged by hand: that person links again.
            Err(e) => {
                tracing::warn!(%tracker, %jid, error = %e, "ignoring an unreadable linked token")
            }
        }
    }
    Ok(links)
}

/// Write one change and announce it, in one transaction (the notification goes out at commit).
fn write(c: &mut Client, change: &LinkChange) -> Result<(), StoreError> {
    let mut tx = c.transaction()?;
    match &change.link {
        Some(link) => {
            let json =
                serde_json::to_string(link).map_err(|e| StoreError::Refused(e.to_string()))?;
            tx.execute(
                "INSERT INTO linked_tokens (tracker, jid, link) VALUES ($1, $2, $3)
                 ON CONFLICT (tracker, jid) DO UPDATE SET link = EXCLUDED.link",
                &[&change.tracker, &change.jid, &json],
            )?;
        }
        None => {
            tx.execute(
                "DELETE FROM linked_tokens WHERE tracker = $1 AND jid = $2",
                &[&change.tracker, &change.jid],
            )?;
        }
    }
    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])?;
    tx.commit()?;
    Ok(())
}

/// The links at start-up. The first start on the database copies in the links of the local
/// tokens file, if it has any (moving from SQLite to PostgreSQL keeps everyone linked); that is
/// recorded (meta `links_imported`), so the file is never read again: links removed since stay
/// removed.
pub fn load(c: &mut Client, file: &LinksFile) -> Result<Links, StoreError> {
    let mut tx = c.transaction()?;
    let imported = tx
        .query_opt("SELECT 1 FROM meta WHERE key = 'links_imported'", &[])?
        .is_some();
    if !imported {
        let local = file
            .load()
            .map_err(|e| StoreError::Refused(e.to_string()))?;
        let all = local.all();
        for (tracker, jid, link) in &all {
            let json =
                serde_json::to_string(link).map_err(|e| StoreError::Refused(e.to_string()))?;
            tx.execute(
                "INSERT INTO linked_tokens (tracker, jid, link) VALUES ($1, $2, $3)
                 ON CONFLICT (tracker, jid) DO NOTHING",
                &[tracker, jid, &json],
            )?;
        }
        let from = file.path().display().to_string();
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('links_imported', $1) ON CONFLICT (key) DO NOTHING",
            &[&from],
        )?;
        if !all.is_empty() {
            tracing::info!(
                count = all.len(),
                file = %from,
                "linked tokens copied from the local tokens file into PostgreSQL (the file is not read again)"
            );
        }
    }
    tx.commit()?;
    read_all(c)
}

/// The writer and listener of the shared links.
pub struct SharedLinks {
    writes: mpsc::Sender<(LinkChange, Reply)>,
}

impl SharedLinks {
    /// Start both threads. `changed` gets every link as the table holds it, after each change any
    /// instance (this one too) made, and after each reconnection of the listener.
    pub fn start(url: &str, changed: impl Fn(Links) + Send + 'static) -> SharedLinks {
        let (writes, rx) = mpsc::channel::<(LinkChange, Reply)>();
        let writer_url = url.to_owned();
        let spawned = std::thread::Builder::new()
            .name("caseroom-links-write".into())
            .spawn(move || {
                let mut conn: Option<Client> = None;
                for (change, reply) in rx {
                    if conn.as_ref().is_none_or(Client::is_closed) {
                        conn = super::pg_tls::connect(&writer_url).ok();
                    }
                    let result = match conn.as_mut() {
                        Some(c) => write(c, &change).map_err(|e| e.to_string()),
                        None => Err("PostgreSQL cannot be reached".to_owned()),
                    };
                    if result.is_err() {
                        conn = None;
                    }
                    reply(result);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the linked-tokens writer: links are not saved");
        }
        let listen_url = url.to_owned();
        let spawned = std::thread::Builder::new()
            .name("caseroom-links-listen".into())
            .spawn(move || loop {
                if let Err(e) = listen(&listen_url, &changed) {
                    tracing::warn!(error = %e, "linked tokens: lost PostgreSQL; listening again");
                }
                std::thread::sleep(RECONNECT);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the linked-tokens listener: links made on other instances are not seen");
        }
        SharedLinks { writes }
    }

    /// Write a change, in order with earlier ones; `reply` gets the outcome once committed.
    pub fn write(
        &self,
        change: LinkChange,
        reply: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        if let Err(mpsc::SendError((_, reply))) = self.writes.send((change, Box::new(reply))) {
            reply(Err("the linked-tokens writer has stopped".into()));
        }
    }
}

/// Listen until the connection fails: everything once, then again after each batch of
/// notifications (a burst of changes is read once).
fn listen(url: &str, changed: &impl Fn(Links)) -> Result<(), StoreError> {
    let mut c = super::pg_tls::connect(url)?;
    c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    changed(read_all(&mut c)?);
    loop {
        {
            let mut n = c.notifications();
            // Blocks until a notification comes; ends when the connection does.
            if n.blocking_iter().next()?.is_none() {
                return Err(StoreError::Refused("the connection closed".into()));
            }
            // The rest of a burst, without waiting.
            let mut now = n.iter();
            while now.next()?.is_some() {}
        }
        changed(read_all(&mut c)?);
    }
}
