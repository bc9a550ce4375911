//! The store's own thread. Commands arrive in order; consecutive archive appends are committed in
//! one transaction (group commit) and reported back as one [`StoreEvent::Archived`] batch.

use std::sync::mpsc;

use tokio::sync::mpsc::UnboundedSender;

use super::Store;
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
}

/// Answers from the store thread.
pub enum StoreEvent {
    /// These messages are durably archived, in order.
    Archived(Vec<ArchivedMessage>),
    /// Appending failed; these messages were not archived and must not be broadcast.
    ArchiveFailed(Vec<ArchivedMessage>, String),
    /// A query finished.
    Mam(Box<(MamRequest, Result<MamPage, QueryError>)>),
}

/// Largest batch committed at once.
const MAX_BATCH: usize = 1024;

/// Run the store loop until every sender is dropped.
pub fn run(mut store: Store, rx: mpsc::Receiver<Command>, events: UnboundedSender<StoreEvent>) {
    let mut batch: Vec<ArchivedMessage> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Append(m) => batch.push(m),
                other => {
                    flush(&mut store, &mut batch, &events);
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
                        Command::Append(_) => unreachable!("handled above"),
                    }
                }
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        flush(&mut store, &mut batch, &events);
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
        Ok(()) => {
            let _ = events.send(StoreEvent::Archived(msgs));
        }
        Err(e) => {
            tracing::error!(error = %e, count = msgs.len(), "archive append failed");
            let _ = events.send(StoreEvent::ArchiveFailed(msgs, e.to_string()));
        }
    }
}
