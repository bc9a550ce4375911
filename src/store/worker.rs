//! The store's own thread. Commands arrive in order; consecutive archive appends are committed in
//! one transaction (group commit) and reported back as one [`StoreEvent::Archived`] batch.

use std::sync::mpsc;

use tokio::sync::mpsc::UnboundedSender;

use super::{Accepted, Appended, Backend, InboxItem, InboxRow};
use crate::muc::mam::{MamPage, MamRequest, QueryError};
use crate::muc::{ArchivedMessage, Persist};

/// A MAM query, its page (or why there is none), and how long the store took.
pub type MamAnswer = (MamRequest, Result<MamPage, QueryError>, std::time::Duration);

/// Work for the store thread.
pub enum StoreOp {
    /// Append to the archive; answered with [`StoreEvent::Archived`].
    Append(Appended),
    /// Persist a change (no answer; failures are logged).
    Persist(Persist),
    /// Run a MAM query; answered with [`StoreEvent::Mam`].
    Query(MamRequest),
    /// Read a room's join history; answered with [`StoreEvent::History`].
    History(String),
    /// Search a room's history for a `!search`; answered with [`StoreEvent::Searched`].
    Search(Box<crate::muc::mam::HistorySearch>),
    /// Keep a webhook delivery; the answer goes to the HTTP handler, new rows to the bridge as
    /// [`StoreEvent::Inbox`].
    Accept(
        InboxItem,
        tokio::sync::oneshot::Sender<Result<Accepted, String>>,
    ),
    /// Remember a value (e.g. a poller's cursor).
    SetMeta(String, String),
    /// Read a room's description and affiliations; answered with [`StoreEvent::RoomLoaded`].
    LoadRoom(String),
    /// Answer [`StoreEvent::Notified`] once every change sent before this one is written (several
    /// instances: the room's owner is told to reload it only then).
    Notify(String),
    /// Hand every still-pending inbox row to the bridge again (after an archive append failed;
    /// appends are idempotent on the delivery, so a row in flight twice is archived once).
    ReplayPending,
    /// Hand the bridge the pending inbox rows received before this time (µs since the epoch):
    /// the leader's sweep for deliveries another instance accepted and then died with, old enough
    /// not to be still in that instance's hands.
    ReplayStale(i64),
    /// Several instances: hand the bridge again the pending deliveries this instance accepted (and
    /// those of instances no longer running). Sent when the linked instances change: a relay to a
    /// room's owner that died with it is lost (the server had routed it there), and only the
    /// accepting instance knows to ask again; the archive takes each room's message once.
    ReplayOwn,
    /// Check that the store takes writes (a small committed write) and read the inbox backlog; for
    /// `/healthz` and `/metrics`.
    Probe(tokio::sync::oneshot::Sender<Probe>),
    /// Apply retention: delete what the plan says, a batch at a time between other work.
    Prune(super::prune::PrunePlan),
    /// Replace a message by its tombstone; answered with [`StoreEvent::Moderated`].
    Moderate(crate::muc::moderation::Moderation),
    /// Close a delivery that produced no room message.
    FinishInbox {
        /// Row.
        id: i64,
        /// ignored | unknown | failed | done.
        state: &'static str,
        /// Why.
        note: String,
    },
}

/// What a [`StoreOp::Probe`] found.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The probe write committed, or why not.
    pub writable: Result<(), String>,
    /// Deliveries waiting and the oldest one's arrival (µs since the epoch), or why unknown.
    pub backlog: Result<(u64, Option<i64>), String>,
}

/// Answers from the store thread.
pub enum StoreEvent {
    /// These messages are durably archived, in order.
    Archived(Vec<ArchivedMessage>),
    /// Appending failed; these messages were not archived and must not be broadcast.
    ArchiveFailed(Vec<ArchivedMessage>, String),
    /// Deliveries accepted (or pending at start) that the bridge must turn into room messages.
    Inbox(Vec<InboxRow>),
    /// A query finished, and how long it took on the store's side (for `/metrics`).
    Mam(Box<MamAnswer>),
    /// A room's newest messages (oldest first), or why they could not be read.
    History(String, Result<Vec<ArchivedMessage>, String>),
    /// A `!search` found these messages (a page, oldest first), or could not run.
    Searched(Box<(crate::muc::mam::HistorySearch, Result<MamPage, QueryError>)>),
    /// A moderation was carried out (the tombstones; none: no such message), or failed.
    Moderated(
        Box<(
            crate::muc::moderation::Moderation,
            Result<Vec<ArchivedMessage>, String>,
        )>,
    ),
    /// Retention deleted these rooms' messages older than these times (µs since the epoch): join
    /// history kept in memory must forget them too.
    Pruned(Vec<(String, i64)>),
    /// A room as the store has it (None: no such room, or it could not be read).
    RoomLoaded(String, Option<crate::muc::RoomInfo>),
    /// The changes sent before [`StoreOp::Notify`] for this room are written.
    Notified(String),
    /// Several instances: who is in a room as the store has it (sent just before its history).
    Sessions(String, Vec<crate::muc::room::SessionRow>),
}

/// Reads for the reader thread.
enum Read {
    Mam(Box<MamRequest>),
    History(String),
    Search(Box<crate::muc::mam::HistorySearch>),
}

impl Read {
    /// Run it on `store` and tell the bridge; false once the bridge is gone.
    fn answer<B: Backend>(self, store: &B, events: &UnboundedSender<StoreEvent>) -> bool {
        let ev = match self {
            Read::Mam(req) => {
                let t = std::time::Instant::now();
                let page = store.query(&req.query);
                StoreEvent::Mam(Box::new((*req, page, t.elapsed())))
            }
            Read::History(room) => {
                // Several instances: who is in the room first, then its history (in this order).
                match store.sessions(&room) {
                    Ok(Some(rows)) => {
                        let _ = events.send(StoreEvent::Sessions(room.clone(), rows));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, %room, "cannot read who is in a room"),
                }
                let recent = store
                    .recent(&room, crate::muc::room::HISTORY_CACHE)
                    .map_err(|e| e.to_string());
                StoreEvent::History(room, recent)
            }
            Read::Search(s) => {
                let page = store.query(&s.query);
                StoreEvent::Searched(Box::new((*s, page)))
            }
        };
        events.send(ev).is_ok()
    }
}

/// Largest batch committed at once.
const MAX_BATCH: usize = 1024;

/// Run the store loop until every sender is dropped.
///
/// A change that cannot be written (disk full, read-only file system) is kept and retried, in
/// order, before every later change and every few seconds, so memory and disk agree again as soon as
/// the disk takes writes; returns the changes still unwritten at the end (the caller exits non-zero).
pub fn run<B: Backend + 'static>(
    mut store: B,
    rx: mpsc::Receiver<StoreOp>,
    events: UnboundedSender<StoreEvent>,
) -> Vec<Persist> {
    let mut batch: Vec<Appended> = Vec::new();
    let mut accepts: Vec<(InboxItem, AcceptReply)> = Vec::new();
    // Several instances: who is in each room, the latest snapshot per room gathered with the batch
    // (a join storm of n people writes n snapshots of up to n rows; only the last one matters).
    let mut snapshots: Snapshots = Default::default();
    let mut unwritten: std::collections::VecDeque<Persist> = Default::default();
    let panic_on_accept = std::env::var("CASEROOM_FAULT").is_ok_and(|v| v == "store-panic");
    let mut chores = Chores::default();
    let queries = spawn_reader(&store, &events, chores.wal.clone());
    let mut syncer = Syncer::start(&mut store, &events);
    // Relaxed commits (store.fsync_messages = false) are synced once the thread has been idle this
    // long: under load a later synced commit covers them anyway.
    let mut unsynced = false;
    // The last commit's failure, until one succeeds (for the health probe).
    let mut failed: Option<String> = None;
    loop {
        // An idle sync also indexes what waits for the search index, so wait no longer than that.
        let wait = chores.wait(if unsynced { SYNC_AFTER } else { RETRY_EVERY });
        let wait = store.index_due_in().map_or(wait, |due| wait.min(due));
        let first = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                chores.run(&mut store, &events);
                retry_unwritten(&mut store, &mut unwritten);
                unsynced = store.sync().unwrap_or_else(|e| {
                    tracing::error!(error = %e, "could not sync the archive to disk");
                    true
                });
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut next = Some(first);
        let mut ops = 0;
        while let Some(cmd) = next.take() {
            ops += 1;
            // Test-only fault injection: the store thread dies on the first delivery, whether it
            // opens a batch or joins one behind other work; the process must exit non-zero.
            if panic_on_accept && matches!(cmd, StoreOp::Accept(..)) {
                panic!("CASEROOM_FAULT=store-panic: the store thread dies on purpose");
            }
            match cmd {
                StoreOp::Append(m) => batch.push(m),
                StoreOp::Accept(item, reply) => accepts.push((item, reply)),
                StoreOp::Prune(plan) => chores.prune(plan, None),
                StoreOp::Persist(Persist::Occupants { room, rows }) => {
                    snapshots.insert(room, rows);
                }
                other => {
                    if let Some(r) =
                        flush(&mut store, &mut batch, &mut accepts, &events, &mut syncer)
                    {
                        failed = r.err();
                    }
                    settle(&mut store, &mut snapshots, &mut unwritten);
                    one_op(
                        &mut store,
                        other,
                        &mut unwritten,
                        &queries,
                        &events,
                        &failed,
                    );
                }
            }
            if batch.len() + accepts.len() + snapshots.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Some(r) = flush(&mut store, &mut batch, &mut accepts, &events, &mut syncer) {
            failed = r.err();
        }
        settle(&mut store, &mut snapshots, &mut unwritten);
        chores.wal.wrote(ops, store.synced_commits());
        index(&mut store, false);
        unsynced = true;
        chores.run(&mut store, &events);
    }
    // Every delivery accepted is answered before the thread ends.
    syncer.stop();
    if let Err(e) = store.sync() {
        tracing::error!(error = %e, "could not sync the archive to disk at exit");
    }
    retry_unwritten(&mut store, &mut unwritten);
    if !unwritten.is_empty() {
        tracing::error!(
            count = unwritten.len(),
            changes = ?unwritten,
            "stopping with room changes that could not be written; the next tracker sync restores affiliations"
        );
    }
    unwritten.into()
}

/// Every op but appends and accepts (which are batched), once the batch before it is committed.
fn one_op<B: Backend>(
    store: &mut B,
    op: StoreOp,
    unwritten: &mut std::collections::VecDeque<Persist>,
    queries: &Option<mpsc::Sender<Read>>,
    events: &UnboundedSender<StoreEvent>,
    failed: &Option<String>,
) {
    match op {
        StoreOp::Persist(p) => {
            unwritten.push_back(p);
            retry_unwritten(store, unwritten);
        }
        StoreOp::ReplayPending => replay_pending(store, events, i64::MAX),
        StoreOp::ReplayStale(before) => replay_pending(store, events, before),
        StoreOp::ReplayOwn => replay_pending(store, events, i64::MIN),
        StoreOp::Query(req) => {
            // A full-text query sees every message committed before it.
            if req.query.fulltext.is_some() {
                index(store, true);
            }
            read(store, queries, Read::Mam(Box::new(req)), events)
        }
        StoreOp::History(room) => read(store, queries, Read::History(room), events),
        StoreOp::Search(s) => {
            index(store, true);
            read(store, queries, Read::Search(s), events)
        }
        StoreOp::SetMeta(key, value) => {
            if let Err(e) = store.set_meta(&key, &value) {
                tracing::error!(error = %e, %key, "could not save a setting");
            }
        }
        StoreOp::LoadRoom(room) => {
            let info = store.room_info(&room).unwrap_or_else(|e| {
                tracing::error!(error = %e, %room, "cannot read a room");
                None
            });
            let _ = events.send(StoreEvent::RoomLoaded(room, info));
        }
        StoreOp::Notify(room) => {
            let _ = events.send(StoreEvent::Notified(room));
        }
        StoreOp::Probe(reply) => {
            // A small write can succeed on a full disk (into free pages) while deliveries fail: the
            // last real commit's failure and room changes waiting to be written count too.
            let writable = store
                .set_meta("probe", &chrono::Utc::now().to_rfc3339())
                .map_err(|e| e.to_string())
                .and_then(|()| match failed {
                    Some(e) => Err(format!("the last commit failed: {e}")),
                    None if !unwritten.is_empty() => Err(format!(
                        "{} room changes wait to be written",
                        unwritten.len()
                    )),
                    None => Ok(()),
                });
            let backlog = store.inbox_backlog().map_err(|e| e.to_string());
            let _ = reply.send(Probe { writable, backlog });
        }
        StoreOp::Moderate(m) => {
            let result = store.moderate(&m).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, room = %m.room, "could not retract a message");
            }
            let _ = events.send(StoreEvent::Moderated(Box::new((m, result))));
        }
        StoreOp::FinishInbox { id, state, note } => {
            if let Err(e) = store.finish_inbox(id, state, &note) {
                tracing::error!(error = %e, id, "could not close an inbox row");
            }
        }
        StoreOp::Append(_) | StoreOp::Accept(..) | StoreOp::Prune(_) => {
            unreachable!("handled by the caller")
        }
    }
}

/// Work the writer does between commits: the WAL catch-up the reader asks for, and retention jobs
/// (one batch at a time, at most every [`PRUNE_PAUSE`] while other work keeps coming).
#[derive(Default)]
struct Chores {
    /// What the writer tells the reader about the WAL, and the reader the writer.
    wal: std::sync::Arc<WalTally>,
    prunes: std::collections::VecDeque<super::prune::PruneJob>,
    last_step: Option<std::time::Instant>,
    last_request_check: Option<std::time::Instant>,
    /// The full-text index of an archive kept before it existed is complete (or cannot be made).
    indexed: bool,
}

/// Time between two retention (or full-text backfill) batches while other work keeps coming.
const PRUNE_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the writer looks for a `caseroom prune` request.
const REQUEST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Chores {
    fn prune(&mut self, plan: super::prune::PrunePlan, request: Option<String>) {
        self.prunes
            .push_back(super::prune::PruneJob::new(plan, request));
    }

    /// How long the loop may wait for work: short while a retention job or a request check is due.
    fn wait(&self, idle: std::time::Duration) -> std::time::Duration {
        if self.prunes.is_empty() && self.indexed {
            idle.min(REQUEST_EVERY)
        } else {
            PRUNE_PAUSE
        }
    }

    fn run<B: Backend>(&mut self, store: &mut B, events: &UnboundedSender<StoreEvent>) {
        if self
            .wal
            .catch_up
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            catch_up_wal(store);
        }
        if self
            .last_request_check
            .is_none_or(|t| t.elapsed() >= REQUEST_EVERY)
        {
            self.last_request_check = Some(std::time::Instant::now());
            if let Some(req) = take_request(store) {
                tracing::info!(id = %req.id, plan = ?req.plan, "caseroom prune asked for a prune");
                self.prune(req.plan, Some(req.id));
            }
        }
        if self.last_step.is_some_and(|t| t.elapsed() < PRUNE_PAUSE) {
            return;
        }
        if self.prunes.is_empty() {
            if !self.indexed {
                self.last_step = Some(std::time::Instant::now());
                self.indexed = !store.fts_backfill_step().unwrap_or_else(|e| {
                    tracing::error!(error = %e, "full-text indexing of the archive failed; retried at the next start");
                    false
                });
            }
            return;
        }
        self.last_step = Some(std::time::Instant::now());
        let Some(job) = self.prunes.front_mut() else {
            return;
        };
        let more = store.prune_step(job);
        if matches!(more, Ok(true)) {
            return;
        }
        let Some(job) = self.prunes.pop_front() else {
            return;
        };
        let answer = match &more {
            Ok(_) => {
                tracing::info!(deleted = %job.tally, "retention: pruned");
                serde_json::json!({ "ok": job.tally })
            }
            Err(e) => {
                tracing::error!(error = %e, "retention: prune failed; retried with the next run");
                serde_json::json!({ "error": e.to_string(), "partial": job.tally })
            }
        };
        if let Some(id) = &job.request {
            let key = super::prune::result_key(id);
            if let Err(e) = store.set_meta(&key, &answer.to_string()) {
                tracing::warn!(error = %e, "could not answer caseroom prune");
            }
        }
        let pruned: Vec<(String, i64)> = job
            .tally
            .messages
            .keys()
            .filter_map(|r| job.plan.cutoff(r).map(|c| (r.clone(), c)))
            .collect();
        if !pruned.is_empty() {
            let _ = events.send(StoreEvent::Pruned(pruned));
        }
    }
}

/// A `caseroom prune` request waiting in `meta`, taken (cleared) so it runs once.
fn take_request<B: Backend>(store: &B) -> Option<super::prune::PruneRequest> {
    let text = store.meta(super::prune::REQUEST_KEY).ok().flatten()?;
    if text.is_empty() {
        return None;
    }
    if let Err(e) = store.set_meta(super::prune::REQUEST_KEY, "") {
        tracing::warn!(error = %e, "could not take a caseroom prune request");
        return None;
    }
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed caseroom prune request");
            None
        }
    }
}

/// The writer's own checkpoint, between two commits, so that its next commit restarts the WAL (see
/// `spawn_reader`).
fn catch_up_wal<B: Backend>(store: &B) {
    let t = std::time::Instant::now();
    match store.checkpoint() {
        Ok(frames) => {
            tracing::debug!(
                frames,
                ms = t.elapsed().as_millis(),
                "WAL caught up by the writer"
            )
        }
        Err(e) => tracing::warn!(error = %e, "WAL catch-up checkpoint failed"),
    }
    slow("WAL catch-up checkpoint", t);
}

/// A read goes to the reader thread; it runs here only if there is none (or it is gone).
fn read<B: Backend>(
    store: &B,
    reader: &Option<mpsc::Sender<Read>>,
    r: Read,
    events: &UnboundedSender<StoreEvent>,
) {
    let unsent = match reader {
        Some(q) => q.send(r).err().map(|mpsc::SendError(r)| r),
        None => Some(r),
    };
    if let Some(r) = unsent {
        r.answer(store, events);
    }
}

/// How often unwritten changes are retried when nothing else happens.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Archive queries and history reads run on their own thread and connection: a page is read beside the writes (WAL),
/// so MAM never delays a webhook's 202 or an archive append, and a write never delays a page.
/// Without a reader (it could not be opened) queries run on the store thread, in order.
fn spawn_reader<B: Backend + 'static>(
    store: &B,
    events: &UnboundedSender<StoreEvent>,
    wal: std::sync::Arc<WalTally>,
) -> Option<mpsc::Sender<Read>> {
    let reader = match store.reader() {
        Ok(r) => r,
        Err(e) => {
            no_reader(store, &e);
            return None;
        }
    };
    let (tx, rx) = mpsc::channel::<Read>();
    let events = events.clone();
    let mut reader = reader;
    let spawned = std::thread::Builder::new()
        .name("caseroom-reader".into())
        .spawn(move || {
            // Besides queries, the reader checkpoints the WAL (when `CheckpointPace` says), off the
            // writer's path, and syncs the database file after it (SQLite syncs it only when a checkpoint copies
            // the *whole* WAL, which one beside commits never does: small syncs often, rather than one
            // large one that would delay the commits' WAL syncs behind it).
            //
            // The WAL starts over from its beginning only when a writer begins after a checkpoint copied
            // every frame; beside steady commits a frame is always newer, so the WAL grew without end
            // (1.4 GB in `cargo bench --bench webhooks`), every commit extending the file (the kernel
            // zeroing each new block took a fifth of the store thread). Past `store.wal_limit_mb` the
            // reader asks the writer to checkpoint once itself between two commits: only the frames
            // since the reader's checkpoint are left to copy (1-3 ms at 1,000 deliveries/s), and the
            // writer's next commit restarts the WAL.
            //
            // Below the limit the WAL does not start over at all: the reader holds a read snapshot
            // (`Store::hold_wal`), since every restart costs the commit that does it an fsync.
            let limit = reader.wal_limit_frames();
            let mut pace = CheckpointPace::new(std::time::Instant::now());
            let mut hold = false;
            // The writer's operation count when the snapshot was last taken.
            let mut held_at = 0;
            loop {
                match rx.recv_timeout(CHECKPOINT_EVERY) {
                    Ok(r) => {
                        if !r.answer(&reader, &events) {
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                // The snapshot moves forward at every look after a write, checkpoint or not. It
                // must be taken before anyone copies the new frames: a snapshot of a WAL copied
                // whole does not keep the WAL from starting over, and the idle writer's sync
                // copies it whole half a second after its last commit (SYNC_AFTER).
                let (ops, synced) = wal.counts();
                let fresh = hold && ops != held_at;
                if pace.due(std::time::Instant::now(), ops, synced) {
                    let seen = checkpoint_beside(&mut reader, fresh, limit, &wal.catch_up);
                    if let Some((below, _)) = seen {
                        hold = below;
                    }
                    pace.done(std::time::Instant::now(), ops, synced, seen.map(|s| s.1));
                } else if fresh {
                    hold_wal(&mut reader);
                }
                if fresh {
                    held_at = ops;
                }
            }
        });
    if let Err(e) = spawned {
        no_reader(store, &e);
        return None;
    }
    Some(tx)
}

/// Take a new read snapshot on the reader's holding connection (see `Store::hold_wal`).
fn hold_wal<B: Backend>(reader: &mut B) {
    if let Err(e) = reader.hold_wal() {
        tracing::warn!(error = %e, "could not hold a WAL snapshot; the WAL may start over");
    }
}

/// The reader's checkpoint: when something was committed since the last one, take a new snapshot
/// (if `snapshot`), copy the WAL into the database up to the snapshot held and sync the database.
/// Past `limit` frames it lets go and asks the writer to catch up, so that the WAL starts over.
/// None when nothing changed or the checkpoint failed; else whether to hold a snapshot from now
/// on (only once a checkpoint left the WAL below the limit, since the writer's restart must find
/// no reader on the WAL) and the frames the WAL holds.
fn checkpoint_beside<B: Backend>(
    reader: &mut B,
    snapshot: bool,
    limit: u64,
    catch_up: &std::sync::atomic::AtomicBool,
) -> Option<(bool, u64)> {
    match reader.wal_changed() {
        Ok(false) => return None,
        Ok(true) => {}
        Err(e) => tracing::warn!(error = %e, "could not tell whether the WAL changed"),
    }
    if snapshot {
        hold_wal(reader);
    }
    let t = std::time::Instant::now();
    let seen = match reader.checkpoint() {
        Ok(frames) => {
            tracing::trace!(frames, us = t.elapsed().as_micros(), "WAL checkpoint");
            if frames > 0 {
                if let Err(e) = reader.flush_database() {
                    tracing::warn!(error = %e, "could not sync the database file");
                }
                tracing::trace!(us = t.elapsed().as_micros(), "database synced");
            }
            let below = frames < limit;
            if !below {
                if let Err(e) = reader.release_wal() {
                    tracing::warn!(error = %e, "could not let go of the WAL snapshot");
                }
                catch_up.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            Some((below, frames))
        }
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint failed; retried shortly");
            None
        }
    };
    slow("WAL checkpoint", t);
    seen
}

/// What the writer and the reader thread share about the WAL.
#[derive(Default)]
struct WalTally {
    /// Set by the reader when the WAL should start over: the writer checkpoints once itself.
    catch_up: std::sync::atomic::AtomicBool,
    /// Operations the writer has taken (nearly all of them writes), for [`CheckpointPace`].
    ops: std::sync::atomic::AtomicU64,
    /// Commits the writer fsynced ([`Backend::synced_commits`]), for [`CheckpointPace`].
    synced: std::sync::atomic::AtomicU64,
}

impl WalTally {
    /// The writer took `ops` more operations; `synced` commits fsynced so far.
    fn wrote(&self, ops: u64, synced: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.ops.fetch_add(ops, Relaxed);
        self.synced.store(synced, Relaxed);
    }

    /// Operations taken and commits fsynced so far, for [`CheckpointPace`].
    fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ops.load(Relaxed), self.synced.load(Relaxed))
    }
}

/// When the reader's next checkpoint is due, never sooner than [`CHECKPOINT_EVERY`] after the
/// last one:
/// - after any fsynced commit (a webhook's 202 waits for it): small and often, so that no sync
///   of the database grows large enough to stall the next deliveries' WAL syncs behind it;
/// - else, once about [`CHECKPOINT_FRAMES`] new WAL frames are expected (estimated from the
///   writer's operations since the last checkpoint and the frames per operation checkpoints
///   have seen), and at the latest after [`CHECKPOINT_IDLE`].
///
/// Each checkpoint costs two fsyncs (the WAL's before it copies, the database's after) whatever
/// it copies. At a fixed 100 ms, a room chatting at 100 messages a second (commits not fsynced)
/// paid ten of them a second: a quarter of caseroom's CPU (BENCHMARKS.md §2, stop 26). Where a
/// 202 waits on the WAL's fsync, a database sync of 1 MiB once a second (pacing by frames alone)
/// risks stalling it; 100 ms keeps each sync small, as before.
#[derive(Debug, Clone)]
struct CheckpointPace {
    last: std::time::Instant,
    ops_at: u64,
    synced_at: u64,
    frames_at: u64,
    per_op: f64,
}

impl CheckpointPace {
    fn new(now: std::time::Instant) -> CheckpointPace {
        CheckpointPace {
            last: now,
            ops_at: 0,
            synced_at: 0,
            frames_at: 0,
            // A commit of one small message writes about four pages (table, indexes).
            per_op: 4.0,
        }
    }

    /// Is a checkpoint due, the writer having taken `ops` operations and fsynced `synced`
    /// commits in all?
    fn due(&self, now: std::time::Instant, ops: u64, synced: u64) -> bool {
        let since = now.saturating_duration_since(self.last);
        let expected = ops.saturating_sub(self.ops_at) as f64 * self.per_op;
        since >= CHECKPOINT_EVERY
            && (synced != self.synced_at
                || since >= CHECKPOINT_IDLE
                || expected >= CHECKPOINT_FRAMES as f64)
    }

    /// A checkpoint ran (or found nothing to do: `frames` None) at `ops` and `synced`.
    fn done(&mut self, now: std::time::Instant, ops: u64, synced: u64, frames: Option<u64>) {
        if let Some(frames) = frames {
            // The WAL's frames count from its last restart.
            let new = frames.checked_sub(self.frames_at).unwrap_or(frames);
            let taken = ops.saturating_sub(self.ops_at);
            if taken > 0 {
                let seen = new as f64 / taken as f64;
                self.per_op = ((self.per_op + seen) / 2.0).clamp(0.5, 1024.0);
            }
            self.frames_at = frames;
        }
        self.last = now;
        self.ops_at = ops;
        self.synced_at = synced;
    }
}

/// Without a reader, queries run on the store thread and nobody else checkpoints: SQLite does it
/// inside commits again.
fn no_reader<B: Backend>(store: &B, why: &dyn std::fmt::Display) {
    tracing::warn!(error = %why, "no separate reader for archive queries; they wait behind writes");
    if let Err(e) = store.checkpoint_in_commits() {
        tracing::error!(error = %e, "cannot re-enable WAL checkpoints; the WAL will grow");
    }
}

/// Log a store step that took long enough for people to notice (a stalled disk shows here first).
fn slow(what: &str, since: std::time::Instant) {
    let ms = since.elapsed().as_millis();
    if ms >= SLOW_MS {
        tracing::warn!(ms, "slow {what} (the disk is busy or slow)");
    }
}

/// A store step taking this long (ms) is logged.
const SLOW_MS: u128 = 100;

/// How often at most the reader thread checkpoints the WAL (and looks whether it should). Small
/// and often under load: a checkpoint's fsync of the database competes with the commits' fsyncs
/// of the WAL, and at once a second (after a burst of webhooks) it stalled commits for 100-200 ms
/// (`cargo bench --bench webhooks`, paced phase: POST → 202 p99 168-188 ms at 1 s, 11.6 ms at
/// 200 ms).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// New WAL frames (4 KiB pages) that make a checkpoint due: 1 MiB to copy and sync.
const CHECKPOINT_FRAMES: u64 = 256;
/// How long at most a change waits for the reader's checkpoint (and with it the WAL's fsync).
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How soon an idle store thread syncs relaxed commits.
const SYNC_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// The latest occupant snapshot of each room, not yet written.
type Snapshots = std::collections::HashMap<String, Vec<crate::muc::room::SessionRow>>;

/// Index the committed messages for search if due (or now, when `force`); a failure is logged
/// and the messages wait for the next try.
fn index(store: &mut impl Backend, force: bool) {
    if let Err(e) = store.index_pending(force) {
        tracing::error!(error = %e, "could not index messages for search; retried shortly");
    }
}

/// Write the gathered occupant snapshots, in order behind any room change still unwritten.
fn settle(
    store: &mut impl Backend,
    snapshots: &mut Snapshots,
    unwritten: &mut std::collections::VecDeque<Persist>,
) {
    if snapshots.is_empty() {
        return;
    }
    unwritten.extend(
        snapshots
            .drain()
            .map(|(room, rows)| Persist::Occupants { room, rows }),
    );
    retry_unwritten(store, unwritten);
}

/// Write the unwritten changes in order; stop at the first that still fails.
fn retry_unwritten(store: &mut impl Backend, unwritten: &mut std::collections::VecDeque<Persist>) {
    while let Some(p) = unwritten.front() {
        match store.persist(p) {
            Ok(()) => {
                unwritten.pop_front();
            }
            Err(e) => {
                tracing::error!(error = %e, change = ?p, waiting = unwritten.len(),
                    "could not write a room change; kept in memory and retried");
                return;
            }
        }
    }
}

type AcceptReply = tokio::sync::oneshot::Sender<Result<Accepted, String>>;

/// Commit the waiting deliveries and archive appends in one transaction (one fsync), then answer each
/// HTTP request, hand the new inbox rows to the bridge and report the appends. A delivery is
/// acknowledged only after its commit; nothing is broadcast that was not archived. Returns how the
/// commit went (`None`: there was nothing to commit).
fn flush(
    store: &mut impl Backend,
    batch: &mut Vec<Appended>,
    accepts: &mut Vec<(InboxItem, AcceptReply)>,
    events: &UnboundedSender<StoreEvent>,
    syncer: &mut Syncer,
) -> Option<Result<(), String>> {
    if batch.is_empty() && accepts.is_empty() {
        return None;
    }
    let (items, replies): (Vec<InboxItem>, Vec<AcceptReply>) =
        std::mem::take(accepts).into_iter().unzip();
    let msgs = std::mem::take(batch);
    let t = std::time::Instant::now();
    let committed = store.commit(&items, &msgs);
    tracing::trace!(
        deliveries = items.len(),
        messages = msgs.len(),
        us = t.elapsed().as_micros(),
        "commit"
    );
    slow("commit", t);
    match committed {
        Ok((results, written)) => {
            let mut durable = Durable::default();
            for ((item, reply), result) in items.into_iter().zip(replies).zip(results) {
                if let Accepted::New(id) = result {
                    // The packed copy was for the insert; the bridge reads the body (or the
                    // document parsed from it).
                    let item = InboxItem {
                        packed: None,
                        ..item
                    };
                    durable.rows.push(InboxRow { id, item });
                }
                durable.replies.push((reply, result));
            }
            syncer.after_sync(durable, events);
            // A message already archived (same origin: a replayed delivery) is not broadcast again.
            let fresh: Vec<ArchivedMessage> = msgs
                .into_iter()
                .zip(written)
                .filter_map(|(a, w)| w.then_some(a.message))
                .collect();
            if !fresh.is_empty() {
                let _ = events.send(StoreEvent::Archived(fresh));
            }
            Some(Ok(()))
        }
        Err(e) => {
            tracing::error!(error = %e, deliveries = replies.len(), messages = msgs.len(),
                "could not commit webhook deliveries and archive appends");
            for reply in replies {
                let _ = reply.send(Err(e.to_string()));
            }
            if !msgs.is_empty() {
                let msgs = msgs.into_iter().map(|a| a.message).collect();
                let _ = events.send(StoreEvent::ArchiveFailed(msgs, e.to_string()));
            }
            Some(Err(e.to_string()))
        }
    }
}

/// What waits for a commit to be durable: the answers to its deliveries (a 202 says the delivery is
/// on disk) and its new inbox rows for the bridge (nothing is posted that a power loss could take
/// back and the tracker would then not retry).
#[derive(Default)]
struct Durable {
    replies: Vec<(AcceptReply, Accepted)>,
    rows: Vec<InboxRow>,
}

impl Durable {
    fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.rows.is_empty()
    }

    /// The commit is durable (or the sync failed: every delivery gets the error, and the tracker
    /// sends it again, found a duplicate once a sync succeeds). The rows go to the bridge either
    /// way: they are committed, and a room message for them is archived behind them in the WAL.
    fn release(self, synced: &std::io::Result<()>, events: &UnboundedSender<StoreEvent>) {
        for (reply, result) in self.replies {
            let _ = reply.send(match synced {
                Ok(()) => Ok(result),
                Err(e) => Err(format!("could not sync the store to disk: {e}")),
            });
        }
        if !self.rows.is_empty() {
            let _ = events.send(StoreEvent::Inbox(self.rows));
        }
    }
}

/// The file a backend's commits are made durable by fsyncing ([`Backend::sync_accepts_elsewhere`]),
/// opened again if it was replaced.
struct SyncFile {
    path: std::path::PathBuf,
    open: Option<(std::fs::File, u64)>,
}

impl SyncFile {
    fn at(path: std::path::PathBuf) -> SyncFile {
        SyncFile { path, open: None }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        // An fsync reaches the pages of one inode: the one at the path now, where the commit was
        // written (SQLite keeps its WAL file while a connection is open; checked anyway).
        let ino = std::fs::metadata(&self.path)?.ino();
        if self.open.as_ref().is_none_or(|(_, i)| *i != ino) {
            let f = std::fs::File::open(&self.path)?;
            let i = f.metadata()?.ino();
            self.open = Some((f, i));
        }
        match &self.open {
            Some((f, _)) => f.sync_data(),
            None => Err(std::io::Error::other("no file to sync")),
        }
    }
}

/// The store's syncer thread: with SQLite, a commit that accepts deliveries is written without an
/// fsync, and this thread fdatasyncs the WAL while the store thread writes the next commit; only
/// then are its deliveries answered. One fsync covers every commit handed over before it began (the
/// WAL is written in order), so it groups them as the store thread groups deliveries into commits.
/// Before, the store thread waited for each commit's fsync (2.5–3 ms here) before it could write
/// the next one (BENCHMARKS.md §5, stop 30). Without a syncer (PostgreSQL, or the thread could
/// not start, or it died) every commit is synced before it is answered, as before.
#[derive(Default)]
struct Syncer {
    tx: Option<mpsc::Sender<Durable>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where to sync in place if the thread is gone.
    file: Option<SyncFile>,
}

impl Syncer {
    fn start<B: Backend>(store: &mut B, events: &UnboundedSender<StoreEvent>) -> Syncer {
        let Some(path) = store.sync_accepts_elsewhere(true) else {
            return Syncer::default();
        };
        let mut file = SyncFile::at(path.clone());
        let in_place = Some(SyncFile::at(path));
        Syncer::spawn(move || file.sync(), events.clone(), in_place).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no syncer thread; each commit that accepts deliveries is synced in turn");
            store.sync_accepts_elsewhere(false);
            Syncer::default()
        })
    }

    /// The thread: sync once for everything handed over so far, then release it. `in_place`:
    /// what to sync on the store thread if this thread is gone.
    fn spawn(
        mut sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
        events: UnboundedSender<StoreEvent>,
        in_place: Option<SyncFile>,
    ) -> std::io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<Durable>();
        let thread = std::thread::Builder::new()
            .name("caseroom-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let waiting: Vec<Durable> =
                        std::iter::once(first).chain(rx.try_iter()).collect();
                    let t = std::time::Instant::now();
                    let synced = sync();
                    slow("WAL sync", t);
                    if let Err(e) = &synced {
                        tracing::error!(error = %e, "could not sync accepted deliveries to disk");
                    }
                    for d in waiting {
                        d.release(&synced, &events);
                    }
                }
            })?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
            file: in_place,
        })
    }

    /// Release `d` once the commit it came from is durable: at once if the commit was synced
    /// itself, else after the syncer's next fsync.
    fn after_sync(&mut self, d: Durable, events: &UnboundedSender<StoreEvent>) {
        if d.is_empty() {
            return;
        }
        let d = match &self.tx {
            Some(tx) => match tx.send(d) {
                Ok(()) => return,
                Err(mpsc::SendError(d)) => {
                    tracing::error!(
                        "the syncer thread is gone; syncing accepted deliveries in turn"
                    );
                    self.tx = None;
                    d
                }
            },
            None => d,
        };
        let synced = match &mut self.file {
            Some(f) => f.sync(),
            None => Ok(()),
        };
        d.release(&synced, events);
    }

    /// Release everything handed over (the thread syncs it first) and end the thread.
    fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hand the bridge the pending inbox rows nobody handles (see [`Backend::orphaned_inbox`]), if any.
fn replay_pending<B: Backend>(store: &B, events: &UnboundedSender<StoreEvent>, before: i64) {
    match store.orphaned_inbox(before) {
        Ok(rows) if !rows.is_empty() => {
            let _ = events.send(StoreEvent::Inbox(rows));
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot read pending deliveries"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    type Running = (
        mpsc::Sender<StoreOp>,
        tokio::sync::mpsc::UnboundedReceiver<StoreEvent>,
        std::thread::JoinHandle<Vec<Persist>>,
    );

    /// The store thread over `store`: its ops, its events, and the thread.
    fn running(store: Store) -> Running {
        let (tx, rx) = mpsc::channel();
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, ev_rx, std::thread::spawn(move || run(store, rx, ev_tx)))
    }

    /// Stop the store thread; it ends with nothing left unwritten.
    fn stop(tx: mpsc::Sender<StoreOp>, writer: std::thread::JoinHandle<Vec<Persist>>) {
        drop(tx);
        assert!(writer.join().expect("store thread").is_empty());
    }

    /// The store thread indexes messages for search in batches, yet a search (MAM full-text or
    /// `!search`) sent right after a message finds it.
    #[test]
    fn a_search_sent_right_after_a_message_finds_it() {
        use crate::muc::mam::{ArchiveQuery, HistorySearch, MamRequest};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        let (tx, mut ev_rx, writer) = running(store);
        let mut q = ArchiveQuery::metadata("team");
        q.metadata = false;
        q.max = 10;
        q.fulltext = Some(vec!["quince".into()]);
        for seq in 1..=3 {
            let body = if seq == 2 { "quince jam" } else { "toast" };
            let sent = tx.send(StoreOp::Append(
                crate::store::tests::message(seq, body).into(),
            ));
            sent.expect("store thread");
        }
        let sent = tx.send(StoreOp::Query(MamRequest {
            requester: "alice@example.org/pc".parse().expect("jid"),
            room_jid: "team@rooms.example.org".parse().expect("jid"),
            iq_id: "q1".into(),
            queryid: None,
            query: q.clone(),
        }));
        sent.expect("store thread");
        let sent = tx.send(StoreOp::Search(Box::new(HistorySearch {
            query: q,
            asker: "alice@example.org".parse().expect("jid"),
            answer_as: "bot".into(),
            prefix: "!".into(),
        })));
        sent.expect("store thread");
        let (mut mam, mut searched) = (None, None);
        while mam.is_none() || searched.is_none() {
            match ev_rx.blocking_recv().expect("an event") {
                StoreEvent::Mam(m) => mam = Some(m.1.expect("page")),
                StoreEvent::Searched(s) => searched = Some(s.1.expect("page")),
                _ => {}
            }
        }
        for page in [mam, searched].into_iter().flatten() {
            let ids: Vec<&str> = page.items.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, vec!["id2"]);
        }
        stop(tx, writer);
    }

    /// Checkpoints come every 100 ms under many writes, every second under a few, and the pace
    /// follows the frames the checkpoints find.
    #[test]
    fn checkpoints_come_often_under_many_writes_and_seldom_under_few() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let mut pace = CheckpointPace::new(t0);
        // A few writes: not due before a second, whatever the time since the last checkpoint.
        assert!(!pace.due(at(50), 1_000, 0), "sooner than CHECKPOINT_EVERY");
        assert!(!pace.due(at(500), 3, 0));
        assert!(pace.due(at(1_000), 3, 0));
        // Nothing changed: the pace does not learn from it.
        pace.done(at(1_000), 3, 0, None);
        assert!(!pace.due(at(1_500), 10, 0));
        // A burst: due at CHECKPOINT_EVERY once about CHECKPOINT_FRAMES frames are expected.
        assert!(
            pace.due(at(1_100), 3 + 64, 0),
            "4 frames per write by default"
        );
        assert!(!pace.due(at(1_100), 3 + 32, 0));
        // One fsynced commit (a webhook accepted): due at CHECKPOINT_EVERY.
        assert!(!pace.due(at(1_050), 4, 1));
        assert!(pace.due(at(1_100), 4, 1));
        // Checkpoints that find 16 frames per write (large deliveries) make it due sooner.
        pace.done(at(1_100), 103, 0, Some(16 * 100));
        pace.done(at(1_200), 203, 0, Some(16 * 200));
        pace.done(at(1_300), 303, 0, Some(16 * 300));
        assert!(pace.due(at(1_400), 303 + 20, 0), "{pace:?}");
        // A WAL that started over counts its frames from zero.
        pace.done(at(1_400), 323, 0, Some(40));
        assert!(pace.per_op > 1.0 && pace.per_op < 16.0, "{pace:?}");
    }

    /// A few commits at a time (a team chatting) do not make the WAL start over after each of the
    /// reader's checkpoints: every restart costs the commit doing it an fsync of the WAL header.
    #[test]
    fn a_few_commits_at_a_time_do_not_start_the_wal_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        let (tx, mut ev_rx, writer) = running(store);
        // The WAL header's checkpoint sequence number (bytes 12-15) counts its restarts.
        let restarts = || {
            let wal = std::fs::read(dir.path().join("db-wal")).expect("a WAL");
            u32::from_be_bytes([wal[12], wal[13], wal[14], wal[15]])
        };
        let mut archive = |seq: u64| {
            let m = crate::store::tests::message(seq, "hello");
            tx.send(StoreOp::Append(m.into())).expect("store thread");
            loop {
                if let StoreEvent::Archived(_) = ev_rx.blocking_recv().expect("an event") {
                    break;
                }
            }
            // The reader checkpoints in between (a few writes: after CHECKPOINT_IDLE).
            std::thread::sleep(CHECKPOINT_IDLE + CHECKPOINT_EVERY * 3);
        };
        archive(1);
        archive(2);
        let before = restarts();
        for seq in 3..=5 {
            archive(seq);
        }
        assert_eq!(restarts(), before, "the WAL started over");
        stop(tx, writer);
    }

    /// Under writes that never pause the WAL must still start over: past `store.wal_limit_mb` the
    /// writer checkpoints once itself. Without that it grew by every byte written.
    #[test]
    fn the_wal_starts_over_under_steady_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut store = Store::open(&path).expect("open");
        store.set_wal_limit(1 << 20).expect("limit");
        let (tx, _ev_rx, writer) = running(store);
        let wal = dir.path().join("db-wal");
        let filler = vec![b'x'; 14_000];
        let (start, mut sent, mut largest) = (std::time::Instant::now(), 0usize, 0u64);
        while sent < 1_500 || start.elapsed() < std::time::Duration::from_millis(1_500) {
            let mut answers = Vec::new();
            for _ in 0..20 {
                sent += 1;
                let mut body = format!("{sent:08}").into_bytes();
                body.extend_from_slice(&filler);
                let item = InboxItem {
                    tracker: "forge".into(),
                    delivery: Some(format!("d-{sent}")),
                    received: 1,
                    content_type: None,
                    headers: vec![],
                    body,
                    body_hash: None,
                    packed: None,
                    doc: None,
                };
                let (otx, orx) = tokio::sync::oneshot::channel();
                tx.send(StoreOp::Accept(item, otx)).expect("store thread");
                answers.push(orx);
            }
            for a in answers {
                let got = a.blocking_recv().expect("answered").expect("accepted");
                assert!(matches!(got, Accepted::New(_)), "{got:?}");
            }
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        stop(tx, writer);
        let written = (sent * 14_008) as u64;
        assert!(written > 20 << 20, "{written} bytes is not enough to tell");
        // Soft: the reader looks every CHECKPOINT_EVERY, so the WAL may pass the limit by what the
        // writer writes meanwhile (28 MB at 110 MB/s in a release build); without the writer's
        // checkpoint it holds every byte written and more.
        assert!(
            largest * 4 < written,
            "the WAL reached {largest} bytes after {written} bytes of deliveries (limit 1 MiB)"
        );
    }

    fn delivery(n: usize) -> InboxItem {
        crate::store::tests::item(Some(&format!("d-{n}")), format!("{{\"n\":{n}}}").as_bytes())
    }

    /// A commit's deliveries are answered, and its rows handed to the bridge, only once the
    /// syncer's fsync after it has returned; one fsync answers everything handed over before it.
    #[test]
    fn no_delivery_is_answered_before_the_sync_after_its_commit() {
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let syncs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = syncs.clone();
        let mut syncer = Syncer::spawn(
            move || {
                gate_rx.recv().map_err(std::io::Error::other)?;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            },
            ev_tx.clone(),
            None,
        )
        .expect("syncer");
        let mut answers = Vec::new();
        for n in 1..=3 {
            let (otx, orx) = tokio::sync::oneshot::channel();
            let d = Durable {
                replies: vec![(otx, Accepted::New(n))],
                rows: vec![InboxRow {
                    id: n,
                    item: delivery(n as usize),
                }],
            };
            syncer.after_sync(d, &ev_tx);
            answers.push(orx);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        for a in &mut answers {
            assert!(a.try_recv().is_err(), "answered before the sync");
        }
        assert!(
            ev_rx.try_recv().is_err(),
            "a row reached the bridge before the sync"
        );
        // Two fsyncs at most: the first delivery's, then one for the two that came during it.
        gate_tx.send(()).expect("gate");
        gate_tx.send(()).expect("gate");
        for (n, a) in answers.into_iter().enumerate() {
            let got = a.blocking_recv().expect("answered").expect("accepted");
            assert_eq!(got, Accepted::New(n as i64 + 1));
        }
        let mut rows = Vec::new();
        while rows.len() < 3 {
            match ev_rx.blocking_recv().expect("an event") {
                StoreEvent::Inbox(r) => rows.extend(r.into_iter().map(|r| r.id)),
                _ => panic!("not an inbox event"),
            }
        }
        assert_eq!(rows, vec![1, 2, 3]);
        drop(gate_tx);
        syncer.stop();
        assert!(syncs.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    }

    /// A failed fsync answers each delivery with the reason (the tracker sends it again), and the
    /// rows, committed, still reach the bridge.
    #[test]
    fn a_failed_sync_answers_every_delivery_with_the_reason() {
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut syncer = Syncer::spawn(
            || Err(std::io::Error::other("the disk is gone")),
            ev_tx.clone(),
            None,
        )
        .expect("syncer");
        let (otx, orx) = tokio::sync::oneshot::channel();
        syncer.after_sync(
            Durable {
                replies: vec![(otx, Accepted::New(7))],
                rows: vec![InboxRow {
                    id: 7,
                    item: delivery(7),
                }],
            },
            &ev_tx,
        );
        let got = orx.blocking_recv().expect("answered");
        let e = got.expect_err("a failed sync is not a 202");
        assert!(e.contains("the disk is gone"), "{e}");
        assert!(matches!(ev_rx.blocking_recv(), Some(StoreEvent::Inbox(r)) if r[0].id == 7));
        syncer.stop();
    }

    /// The syncer's file is opened again when the path names another file than the one it has
    /// open; a path with no file is an error, not a sync of nothing.
    #[test]
    fn the_sync_file_follows_a_replaced_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db-wal");
        let mut f = SyncFile::at(path.clone());
        assert!(f.sync().is_err(), "no file yet");
        std::fs::write(&path, b"one").expect("write");
        f.sync().expect("sync");
        let first = f.open.as_ref().map(|(_, i)| *i);
        let other = dir.path().join("other");
        std::fs::write(&other, b"two").expect("write");
        std::fs::rename(&other, &path).expect("rename");
        f.sync().expect("sync");
        let now = std::fs::metadata(&path).expect("meta").ino();
        assert_eq!(f.open.as_ref().map(|(_, i)| *i), Some(now));
        assert_ne!(first, Some(now));
    }

    /// Through the store thread on SQLite: accepted deliveries are answered, written, and the
    /// commits that accepted them counted as synced (the reader's checkpoint pace depends on it).
    #[test]
    fn deliveries_synced_by_the_syncer_are_answered_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = Store::open(&path).expect("open");
        let (tx, mut ev_rx, writer) = running(store);
        let mut answers = Vec::new();
        for n in 1..=50 {
            let (otx, orx) = tokio::sync::oneshot::channel();
            tx.send(StoreOp::Accept(delivery(n), otx))
                .expect("store thread");
            answers.push(orx);
        }
        // The same delivery again: a duplicate, answered after a sync too.
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(StoreOp::Accept(delivery(1), otx))
            .expect("store thread");
        for a in answers {
            let got = a.blocking_recv().expect("answered").expect("accepted");
            assert!(matches!(got, Accepted::New(_)), "{got:?}");
        }
        assert_eq!(
            orx.blocking_recv().expect("answered").expect("accepted"),
            Accepted::Duplicate
        );
        let mut rows = 0;
        while rows < 50 {
            if let StoreEvent::Inbox(r) = ev_rx.blocking_recv().expect("an event") {
                rows += r.len();
            }
        }
        stop(tx, writer);
        let reopened = Store::open(&path).expect("open");
        assert_eq!(reopened.pending_inbox().expect("pending").len(), 50);
    }
}
