//! The store's own thread. Commands arrive in order; consecutive archive appends are committed in
//! one transaction (group commit) and reported back as one [`StoreEvent::Archived`] batch.

use std::sync::mpsc;

use tokio::sync::mpsc::UnboundedSender;

use super::{Accepted, InboxItem, InboxRow, Store};
use crate::muc::mam::{MamPage, MamRequest, QueryError};
use crate::muc::{ArchivedMessage, Persist};

/// Work for the store thread.
pub enum Command {
    /// Append to the archive; answered with [`StoreEvent::Archived`].
    Append(ArchivedMessage),
    /// Persist a change (no answer; failures are logged).
    Persist(Persist),
    /// Run a MAM query; answered with [`StoreEvent::Mam`].
    Query(MamRequest),
    /// Keep a webhook delivery; the answer goes to the HTTP handler, new rows to the bridge as
    /// [`StoreEvent::Inbox`].
    Accept(
        InboxItem,
        tokio::sync::oneshot::Sender<Result<Accepted, String>>,
    ),
    /// Remember a value (e.g. a poller's cursor).
    SetMeta(String, String),
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

/// Answers from the store thread.
pub enum StoreEvent {
    /// These messages are durably archived, in order.
    Archived(Vec<ArchivedMessage>),
    /// Appending failed; these messages were not archived and must not be broadcast.
    ArchiveFailed(Vec<ArchivedMessage>, String),
    /// Deliveries accepted (or pending at start) that the bridge must turn into room messages.
    Inbox(Vec<InboxRow>),
    /// A query finished.
    Mam(Box<(MamRequest, Result<MamPage, QueryError>)>),
}

/// Largest batch committed at once.
const MAX_BATCH: usize = 1024;

/// Run the store loop until every sender is dropped.
pub fn run(mut store: Store, rx: mpsc::Receiver<Command>, events: UnboundedSender<StoreEvent>) {
    let mut batch: Vec<ArchivedMessage> = Vec::new();
    let mut accepts: Vec<(InboxItem, AcceptReply)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Append(m) => batch.push(m),
                Command::Accept(item, reply) => accepts.push((item, reply)),
                other => {
                    flush(&mut store, &mut batch, &events);
                    flush_accepts(&mut store, &mut accepts, &events);
                    match other {
                        Command::Persist(p) => {
                            if let Err(e) = store.persist(&p) {
                                tracing::error!(error = %e, change = ?p, "could not persist a room change");
                            }
                        }
                        Command::Query(req) => {
                            let page = store.query(&req.query);
                            let _ = events.send(StoreEvent::Mam(Box::new((req, page))));
                        }
                        Command::SetMeta(key, value) => {
                            if let Err(e) = store.set_meta(&key, &value) {
                                tracing::error!(error = %e, %key, "could not save a setting");
                            }
                        }
                        Command::FinishInbox { id, state, note } => {
                            if let Err(e) = store.finish_inbox(id, state, &note) {
                                tracing::error!(error = %e, id, "could not close an inbox row");
                            }
                        }
                        Command::Append(_) | Command::Accept(..) => unreachable!("handled above"),
                    }
                }
            }
            if batch.len() + accepts.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        flush(&mut store, &mut batch, &events);
        flush_accepts(&mut store, &mut accepts, &events);
    }
}

type AcceptReply = tokio::sync::oneshot::Sender<Result<Accepted, String>>;

/// Commit the waiting deliveries in one transaction, then answer each HTTP request and hand the new
/// rows to the bridge. A delivery is acknowledged only after its commit.
fn flush_accepts(
    store: &mut Store,
    accepts: &mut Vec<(InboxItem, AcceptReply)>,
    events: &UnboundedSender<StoreEvent>,
) {
    if accepts.is_empty() {
        return;
    }
    let waiting = std::mem::take(accepts);
    let items: Vec<InboxItem> = waiting.iter().map(|(i, _)| i.clone()).collect();
    match store.accept(&items) {
        Ok(results) => {
            let mut rows = Vec::new();
            for ((item, reply), result) in waiting.into_iter().zip(results) {
                if let Accepted::New(id) = result {
                    rows.push(InboxRow { id, item });
                }
                let _ = reply.send(Ok(result));
            }
            if !rows.is_empty() {
                let _ = events.send(StoreEvent::Inbox(rows));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, count = waiting.len(), "could not store webhook deliveries");
            for (_, reply) in waiting {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}

fn flush(
    store: &mut Store,
    batch: &mut Vec<ArchivedMessage>,
    events: &UnboundedSender<StoreEvent>,
) {
    if batch.is_empty() {
        return;
    }
    let msgs = std::mem::take(batch);
    match store.append(&msgs) {
        Ok(written) => {
            // A message already archived (same origin: a replayed delivery) is not broadcast again.
            let fresh: Vec<ArchivedMessage> = msgs
                .into_iter()
                .zip(written)
                .filter_map(|(m, w)| w.then_some(m))
                .collect();
            if !fresh.is_empty() {
                let _ = events.send(StoreEvent::Archived(fresh));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, count = msgs.len(), "archive append failed");
            let _ = events.send(StoreEvent::ArchiveFailed(msgs, e.to_string()));
        }
    }
}
