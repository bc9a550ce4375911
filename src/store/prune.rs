//! Retention: deleting archived messages and handled webhook deliveries older than a cutoff, in
//! small transactions so that a live service's commits never wait long behind it.
//!
//! Used three ways: the running service applies `store.retention` daily ([`super::worker`] runs a
//! job a batch at a time between other work); `caseroom prune` hands a one-off job to a running
//! service through the `meta` table (the service owns the in-memory counts and join history), or,
//! when no caseroom runs on the database, runs it itself.

use std::collections::BTreeMap;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// Rows deleted per transaction.
pub const BATCH: usize = 2000;

/// What to delete. Times are µs since the epoch; everything strictly older goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrunePlan {
    /// Messages older than this in every room without its own rule (`None`: kept).
    pub messages_before: Option<i64>,
    /// Rooms with their own rule (`None`: kept forever).
    pub rooms: BTreeMap<String, Option<i64>>,
    /// Only this room.
    pub only_room: Option<String>,
    /// Handled (not pending) webhook deliveries older than this (`None`: kept).
    pub deliveries_before: Option<i64>,
}

impl PrunePlan {
    /// The cutoff for `room`, if its messages are pruned at all.
    pub fn cutoff(&self, room: &str) -> Option<i64> {
        if self.only_room.as_deref().is_some_and(|r| r != room) {
            return None;
        }
        match self.rooms.get(room) {
            Some(rule) => *rule,
            None => self.messages_before,
        }
    }
}

/// What a job deleted (or, for a dry run, would delete).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneTally {
    /// Messages by room.
    pub messages: BTreeMap<String, u64>,
    /// Webhook deliveries.
    pub deliveries: u64,
}

impl std::fmt::Display for PruneTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.messages.values().sum();
        write!(
            f,
            "{total} messages in {} rooms, {} handled webhook deliveries",
            self.messages.values().filter(|n| **n > 0).count(),
            self.deliveries
        )?;
        for (room, n) in self.messages.iter().filter(|(_, n)| **n > 0) {
            write!(f, "\n  {room}: {n}")?;
        }
        Ok(())
    }
}

/// A job under way.
#[derive(Debug, Clone)]
pub struct PruneJob {
    /// What it deletes.
    pub plan: PrunePlan,
    /// Rooms still to do (`None`: not listed yet).
    pub(super) rooms: Option<Vec<String>>,
    /// Handled deliveries deleted (or not to be).
    pub(super) deliveries_done: bool,
    /// Deleted so far.
    pub tally: PruneTally,
    /// The `caseroom prune` request it answers, if any.
    pub request: Option<String>,
}

impl PruneJob {
    /// A job for `plan`.
    pub fn new(plan: PrunePlan, request: Option<String>) -> PruneJob {
        PruneJob {
            plan,
            rooms: None,
            deliveries_done: false,
            tally: PruneTally::default(),
            request,
        }
    }
}

/// A `caseroom prune` request left for the running service in `meta`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneRequest {
    /// Its id (the answer is `meta['prune_result:<id>']`).
    pub id: String,
    /// What to delete.
    pub plan: PrunePlan,
}

/// `meta` key of a waiting request.
pub const REQUEST_KEY: &str = "prune_request";

/// `meta` key of a request's answer.
pub fn result_key(id: &str) -> String {
    format!("prune_result:{id}")
}

impl Store {
    /// Delete one batch of `job`; false once it is done.
    pub fn prune_step(&mut self, job: &mut PruneJob) -> Result<bool, StoreError> {
        // Pruned messages leave the index: they must be in it first.
        self.index_pending(true)?;
        self.synced()?;
        if job.rooms.is_none() {
            job.rooms = Some(
                self.archive_rooms()?
                    .into_iter()
                    .filter(|r| job.plan.cutoff(r).is_some())
                    .rev()
                    .collect(),
            );
        }
        if let Some(room) = job.rooms.as_mut().and_then(|r| r.last().cloned()) {
            let before = job.plan.cutoff(&room).unwrap_or(i64::MIN);
            let tx = self.conn.transaction()?;
            let pick = "SELECT seq FROM archive WHERE room = ?1 AND ts < ?2 ORDER BY ts LIMIT ?3";
            // Out of the search index first (it is keyed by seq, and the rows are still there).
            tx.execute(
                &format!("DELETE FROM archive_fts WHERE rowid IN ({pick})"),
                params![room, before, BATCH as i64],
            )?;
            tx.execute(
                &format!("DELETE FROM archive_ref WHERE seq IN ({pick})"),
                params![room, before, BATCH as i64],
            )?;
            let n = tx.execute(
                &format!("DELETE FROM archive WHERE seq IN ({pick})"),
                params![room, before, BATCH as i64],
            )?;
            tx.commit()?;
            if n > 0 {
                if let Ok(mut c) = self.counts.lock() {
                    if let Some(count) = c.get_mut(&room) {
                        *count = count.saturating_sub(n);
                    }
                }
                *job.tally.messages.entry(room.clone()).or_insert(0) += n as u64;
            }
            if n < BATCH {
                job.rooms.as_mut().map(Vec::pop);
            }
            self.give_back_space()?;
            return Ok(true);
        }
        if let (Some(before), false) = (job.plan.deliveries_before, job.deliveries_done) {
            if job.plan.only_room.is_none() {
                let tx = self.conn.transaction()?;
                let pick = "SELECT id FROM inbox WHERE state != 'pending' AND received < ?1
                            ORDER BY id LIMIT ?2";
                tx.execute(
                    &format!("DELETE FROM inbox_body WHERE id IN ({pick})"),
                    params![before, BATCH as i64],
                )?;
                let n = tx.execute(
                    &format!("DELETE FROM inbox WHERE id IN ({pick})"),
                    params![before, BATCH as i64],
                )?;
                tx.commit()?;
                job.tally.deliveries += n as u64;
                self.give_back_space()?;
                if n == BATCH {
                    return Ok(true);
                }
            }
            job.deliveries_done = true;
        }
        Ok(false)
    }

    /// Run `job` to its end (for `caseroom prune` when no caseroom runs on the database).
    pub fn prune_all(&mut self, job: &mut PruneJob) -> Result<(), StoreError> {
        while self.prune_step(job)? {}
        Ok(())
    }

    /// What `plan` would delete, without deleting (reads only; fine beside a running caseroom).
    pub fn prune_preview(&self, plan: &PrunePlan) -> Result<PruneTally, StoreError> {
        let mut tally = PruneTally::default();
        for room in self.archive_rooms()? {
            if let Some(before) = plan.cutoff(&room) {
                let n: i64 = self.conn.query_row(
                    "SELECT COUNT(*) FROM archive WHERE room = ?1 AND ts < ?2",
                    params![room, before],
                    |r| r.get(0),
                )?;
                if n > 0 {
                    tally.messages.insert(room, n as u64);
                }
            }
        }
        if let (Some(before), None) = (plan.deliveries_before, &plan.only_room) {
            let n: i64 = self.conn.query_row(
                "SELECT COUNT(*) FROM inbox WHERE state != 'pending' AND received < ?1",
                [before],
                |r| r.get(0),
            )?;
            tally.deliveries = n as u64;
        }
        Ok(tally)
    }

    /// Rooms that have archived messages.
    fn archive_rooms(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT DISTINCT room FROM archive")?;
        let rooms = stmt.query_map([], |r| r.get(0))?;
        Ok(rooms.collect::<Result<_, _>>()?)
    }

    /// Hand freed pages back to the file system a few at a time (databases created with
    /// `auto_vacuum = INCREMENTAL`; older ones reuse the pages for new rows instead).
    fn give_back_space(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("PRAGMA incremental_vacuum(2000)")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    }
}

/// Who did what `caseroom prune` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrunedBy {
    /// Nothing was deleted: the counts of what would be.
    DryRun,
    /// No caseroom ran on the database: this process deleted.
    ThisProcess,
    /// The running caseroom deleted, asked through `meta`.
    RunningService,
}

/// How long `caseroom prune` waits for a running caseroom to finish a request.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// `caseroom prune`: a dry run counts; otherwise the job runs here when no caseroom holds the
/// database, or is handed to the running one (which owns the in-memory counts and join history)
/// and waited for.
pub fn prune_cli(
    db: &std::path::Path,
    plan: PrunePlan,
    dry_run: bool,
) -> Result<(PruneTally, PrunedBy), StoreError> {
    if !db.exists() {
        return Err(StoreError::Refused(format!(
            "{} does not exist",
            db.display()
        )));
    }
    if dry_run {
        return Ok((Store::open(db)?.prune_preview(&plan)?, PrunedBy::DryRun));
    }
    match super::ops::InstanceLock::acquire(db) {
        Ok(_lock) => {
            let mut store = Store::open(db)?;
            let mut job = PruneJob::new(plan, None);
            store.prune_all(&mut job)?;
            Ok((job.tally, PrunedBy::ThisProcess))
        }
        Err(StoreError::InUse { .. }) => ask_the_service(db, plan),
        Err(e) => Err(e),
    }
}

fn ask_the_service(
    db: &std::path::Path,
    plan: PrunePlan,
) -> Result<(PruneTally, PrunedBy), StoreError> {
    // Opened like any store (the running caseroom has migrated it already): its meta calls, waiting
    // up to the usual busy timeout for the service's commits.
    let store = Store::open(db)?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let request = PruneRequest {
        id: id.clone(),
        plan,
    };
    let text = serde_json::to_string(&request)
        .map_err(|e| StoreError::Refused(format!("cannot write the request: {e}")))?;
    store.set_meta(REQUEST_KEY, &text)?;
    let key = result_key(&id);
    let started = std::time::Instant::now();
    while started.elapsed() < REQUEST_WAIT {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Some(answer) = store.meta(&key)? else {
            continue;
        };
        store
            .conn
            .execute("DELETE FROM meta WHERE key = ?1", [&key])?;
        let v: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|e| StoreError::Refused(format!("unreadable answer from caseroom: {e}")))?;
        if let Some(e) = v.get("error") {
            return Err(StoreError::Refused(format!(
                "the running caseroom failed: {e}"
            )));
        }
        let tally = serde_json::from_value(v["ok"].clone())
            .map_err(|e| StoreError::Refused(format!("unreadable answer from caseroom: {e}")))?;
        return Ok((tally, PrunedBy::RunningService));
    }
    Err(StoreError::Refused(format!(
        "the running caseroom did not take the request within {} s; it keeps it and runs it \
         later (see its log)",
        REQUEST_WAIT.as_secs()
    )))
}
