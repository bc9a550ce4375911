//! The bridge's driver: the only part of the bridge that does IO. It moves inputs from the shells
//! (link, store thread, sync tasks, finished tracker jobs, a one-second tick, shutdown) into the pure
//! core ([`Bridge::handle`], with the time) and performs the actions that come out: stanzas to the
//! link, commands to the store thread, tracker jobs on tokio tasks (with their time limits), sync
//! wake-ups. It decides nothing itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;

use super::{adhoc, Action, Bridge, CommandDone, Input, Job, Stopped, Synced};
use crate::commands::run::Reply;
use crate::muc::Shared;
use crate::store::worker::{StoreEvent, StoreOp};
use crate::store::InboxRow;
use crate::tracker::oauth::DeviceFlow;
use crate::tracker::{AnyTracker, Tracker, TrackerError};
use crate::xmpp::link::{Inbound, LinkHandle};

/// What the driver needs besides the core.
pub struct Shells {
    /// The component link.
    pub link: LinkHandle,
    /// The store thread.
    pub store: std::sync::mpsc::Sender<StoreOp>,
    /// Tracker clients by tracker name.
    pub clients: HashMap<String, Arc<AnyTracker>>,
    /// Wakes each tracker's sync task.
    pub resync: HashMap<String, Arc<tokio::sync::Notify>>,
    /// Where account links are written.
    pub links: LinksShell,
    /// Where jobs, archive queries and room counts are measured for `/metrics`.
    pub metrics: crate::metrics::Labelled,
    /// Several instances share the store: while this one leads, it replays the deliveries left
    /// pending for [`STALE`] (accepted by an instance that died before posting them).
    pub sweep: Option<crate::store::Leadership>,
}

/// Where account links are written: the 0600 file (SQLite), or the table every instance reads
/// (PostgreSQL, [`crate::store::pg_links`]).
pub enum LinksShell {
    /// The tokens file.
    File(crate::links::LinksFile),
    /// The shared store, at this URL (its threads start with the driver, [`run`]).
    Shared(String),
    /// The shared store's writer and listener, started.
    Running(crate::store::pg_links::SharedLinks),
}

/// A pending delivery this old is no longer in the hands of the instance that accepted it.
const STALE: Duration = Duration::from_secs(30);
/// How often (in ticks of a second) the leader looks for them.
const SWEEP_EVERY: u64 = 10;

/// How long a chat command may wait for its tracker.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// Run until `shutdown` resolves or a shell the bridge cannot live without goes away.
pub async fn run(
    mut core: Bridge,
    mut shells: Shells,
    replay: Vec<InboxRow>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut store_events: mpsc::UnboundedReceiver<StoreEvent>,
    mut synced: mpsc::UnboundedReceiver<Synced>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Stopped {
    tokio::pin!(shutdown);
    let (done_tx, mut done) = mpsc::unbounded_channel::<Input>();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    let watch = shells.sweep.clone();
    let mut leading = true;
    // Links shared by the instances: written on a thread of their own, and read again whenever
    // any instance changes one.
    if let LinksShell::Shared(url) = &shells.links {
        let tx = done_tx.clone();
        let running = crate::store::pg_links::SharedLinks::start(url, move |l| {
            let _ = tx.send(Input::LinksLoaded(l));
        });
        shells.links = LinksShell::Running(running);
    }
    if !replay.is_empty() {
        // Deliveries accepted before a crash or stop: handled before anything new.
        tracing::info!(
            count = replay.len(),
            "replaying webhook deliveries accepted earlier"
        );
        perform(
            &shells,
            &done_tx,
            core.handle(Input::Replay(replay), Utc::now()),
        );
    }
    let stopped = loop {
        let input = tokio::select! {
            s = inbound.recv() => match s {
                None => break Stopped::LinkGone,
                Some(Inbound::Stanza(s)) => Input::Stanza(s),
                Some(Inbound::Relinked) => Input::Relinked,
            },
            ev = store_events.recv() => match ev {
                None => {
                    tracing::error!("the store thread has stopped; caseroom cannot go on");
                    break Stopped::StoreGone;
                }
                Some(ev) => {
                    if let StoreEvent::Mam(answer) = &ev {
                        shells.metrics.mam_query(answer.2);
                    }
                    Input::Store(ev)
                }
            },
            Some(s) = synced.recv() => Input::Synced(s),
            // Each wake follows at least one change not yet handled (several coalesce into one).
            () = epoch_changed(watch.as_ref()) => Input::Epoch,
            Some(i) = done.recv() => i,
            _ = tick.tick() => {
                let (rooms, occupants) = core.population();
                shells.metrics.population(rooms, occupants);
                ticks += 1;
                if ticks.is_multiple_of(SWEEP_EVERY) && shells.sweep.as_ref().is_some_and(|l| l.is_leader()) {
                    let before = Utc::now().timestamp_micros() - STALE.as_micros() as i64;
                    let _ = shells.store.send(StoreOp::ReplayStale(before));
                }
                let leads = shells.sweep.as_ref().is_none_or(|l| l.is_leader());
                if leads != leading {
                    leading = leads;
                    perform(&shells, &done_tx, core.handle(Input::Leading(leads), Utc::now()));
                }
                Input::Tick
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down: telling occupants (status 332)");
                perform(&shells, &done_tx, core.handle(Input::Shutdown, Utc::now()));
                break Stopped::Shutdown;
            }
        };
        perform(&shells, &done_tx, core.handle(input, Utc::now()));
    };
    shells.link.close().await;
    stopped
}

/// Resolves when the set of linked instances changes; never with a store of one instance.
async fn epoch_changed(watch: Option<&crate::store::Leadership>) {
    match watch {
        Some(l) => l.changed().await,
        None => std::future::pending().await,
    }
}

fn perform(shells: &Shells, done: &mpsc::UnboundedSender<Input>, actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::Send(s) => shells.link.send(s),
            Action::Broadcast(b) => match b.what {
                Shared::Stanza(s) => shells.link.broadcast(s, b.to),
                Shared::Message { template, room } => {
                    shells.link.broadcast_serialised(template, Some(room), b.to)
                }
            },
            Action::SendRaw { to, bytes } => shells.link.send_raw(&to, bytes),
            Action::Reply(s) => shells.link.reply(s),
            Action::ReplyPrepared(p) => shells.link.reply_raw(&p.to, p.bytes()),
            Action::Departed { room, session } => shells.link.departed(room, session),
            Action::Store(cmd) => {
                if shells.store.send(cmd).is_err() {
                    tracing::error!("the store thread has stopped; a change was not written");
                }
            }
            Action::Resync(tracker) => {
                if let Some(n) = shells.resync.get(&tracker) {
                    n.notify_one();
                }
            }
            Action::Job(job) => spawn_job(shells, done.clone(), job),
            Action::SaveLinks {
                contents,
                change,
                ticket,
            } => match &shells.links {
                LinksShell::Running(shared) => {
                    let done = done.clone();
                    shared.write(change, move |result| {
                        let _ = done.send(Input::LinksSaved { ticket, result });
                    });
                }
                LinksShell::Shared(_) => {
                    let result = Err("the shared links are not started".to_owned());
                    let _ = done.send(Input::LinksSaved { ticket, result });
                }
                LinksShell::File(file) => {
                    // Written here, in order: a small file, changed only when someone links or
                    // unlinks an account, so the short blocking write (one fsync) is cheaper than
                    // ordering writes across a thread.
                    let result = file.write(&contents).map_err(|e| e.to_string());
                    let _ = done.send(Input::LinksSaved { ticket, result });
                }
            },
        }
    }
}

/// Run a tracker job off the loop, with its time limit; its result comes back as an input.
fn spawn_job(shells: &Shells, done: mpsc::UnboundedSender<Input>, job: Job) {
    let Some(client) = shells.clients.get(job.tracker()).cloned() else {
        // The core only asks for trackers that have a client; nothing to run otherwise.
        tracing::error!(tracker = %job.tracker(), "a job for a tracker without a REST client");
        return;
    };
    let metrics = shells.metrics.clone();
    tokio::spawn(async move {
        let (tracker, kind) = (job.tracker().to_owned(), job.kind());
        let t = std::time::Instant::now();
        let (input, outcome) = run_job_measured(client.as_ref(), job).await;
        metrics.job(&tracker, kind, outcome, t.elapsed().as_secs_f64());
        let _ = done.send(input);
    });
}

/// Run one job against `client` (any [`Tracker`]: the scenario tests use a fake) and turn its result
/// into the core's input.
pub async fn run_job<T: Tracker>(client: &T, job: Job) -> Input {
    run_job_measured(client, job).await.0
}

/// [`run_job`], also saying how it went: ok, failed (the tracker refused or erred; the person is
/// told why) or timeout.
// Long by design: one arm per job kind, each a tracker call with its time limit and its answer.
async fn run_job_measured<T: Tracker>(client: &T, job: Job) -> (Input, &'static str) {
    match job {
        Job::Command {
            tracker,
            cmd,
            ctx,
            room,
            sender,
            private,
        } => {
            let (reply, outcome) = match tokio::time::timeout(
                COMMAND_LIMIT,
                crate::commands::run::try_execute(client, cmd, &ctx),
            )
            .await
            {
                Ok(Ok(r)) => (r, "ok"),
                Ok(Err(r)) => (r, "failed"),
                Err(_) => (
                    Reply {
                        text: format!(
                            "{}: the tracker did not answer within 30 s; try again later",
                            ctx.nick
                        ),
                        case: ctx.thread_case,
                    },
                    "timeout",
                ),
            };
            let done = Input::CommandDone(CommandDone {
                room,
                tracker,
                sender,
                private,
                reply,
            });
            (done, outcome)
        }
        Job::Vocabulary {
            tracker,
            group,
            members,
            to,
        } => {
            let vocab =
                tokio::time::timeout(Duration::from_secs(10), client.vocabulary(&group)).await;
            let (vocab, outcome) = match vocab {
                Ok(Ok(v)) => (Ok(v), "ok"),
                Ok(Err(e)) => (
                    Err(format!("{tracker} did not list its types ({e})")),
                    "failed",
                ),
                Err(_) => (
                    Err(format!("{tracker} did not answer within 10 s")),
                    "timeout",
                ),
            };
            let done = adhoc::vocabulary_done(to, &tracker, &members, vocab);
            (Input::AdhocDone(done), outcome)
        }
        Job::Create {
            tracker,
            cmd,
            ctx,
            to,
            room,
            login,
        } => {
            let reply = match tokio::time::timeout(
                COMMAND_LIMIT,
                crate::commands::run::try_execute(client, cmd, &ctx),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Reply {
                    text: "the tracker did not answer within 30 s; nothing may have been created — check before trying again".into(),
                    case: None,
                }),
            };
            let outcome = if reply.is_ok() { "ok" } else { "failed" };
            (
                Input::AdhocDone(adhoc::created(to, room, tracker, reply, login)),
                outcome,
            )
        }
        Job::Refer {
            tracker,
            room,
            group,
            numbers,
            actor,
            sender,
            thread,
        } => {
            let mut cases = Vec::new();
            let mut outcome = "ok";
            for n in numbers {
                match tokio::time::timeout(Duration::from_secs(10), client.get(&actor, &group, n))
                    .await
                {
                    Ok(Ok(c)) => cases.push(c),
                    Ok(Err(_)) => outcome = "failed",
                    Err(_) => outcome = "timeout",
                }
            }
            let done = Input::Referred(super::Referred {
                tracker,
                room,
                group,
                sender,
                thread,
                cases,
            });
            (done, outcome)
        }
        Job::DeviceStart {
            tracker,
            flow,
            to,
            jid,
        } => {
            let code = match device_flow(&flow) {
                Ok(f) => f.start(&flow.scope).await,
                Err(e) => Err(e),
            };
            let outcome = if code.is_ok() { "ok" } else { "failed" };
            (
                Input::AdhocDone(adhoc::device_code(to, tracker, flow, jid, code)),
                outcome,
            )
        }
        Job::DevicePoll {
            tracker,
            flow,
            code,
            jid,
            tell,
        } => {
            let grant = match device_flow(&flow) {
                Ok(f) => f.wait(&code, DEVICE_LIMIT).await,
                Err(e) => Err(e.to_string()),
            };
            let link = link_of(client, &tracker, grant).await;
            let outcome = if link.is_ok() { "ok" } else { "failed" };
            (
                Input::AdhocDone(adhoc::device_done(tracker, jid, tell, link)),
                outcome,
            )
        }
        Job::Refresh {
            tracker,
            flow,
            jid,
            refresh_token,
        } => {
            let grant = match device_flow(&flow) {
                Ok(f) => f.refresh(&refresh_token).await,
                Err(e) => Err(e),
            };
            let link = link_of(client, &tracker, grant.map_err(|e| e.to_string())).await;
            let outcome = if link.is_ok() { "ok" } else { "failed" };
            (
                Input::AdhocDone(adhoc::refreshed(tracker, jid, link)),
                outcome,
            )
        }
        Job::WhoAmI {
            tracker,
            token,
            to,
            jid,
        } => {
            let who: Result<String, Option<TrackerError>> =
                match tokio::time::timeout(Duration::from_secs(15), client.whoami(&token)).await {
                    Ok(Ok(login)) => Ok(login),
                    Ok(Err(e)) => Err(Some(e)),
                    Err(_) => Err(None),
                };
            let outcome = match &who {
                Ok(_) => "ok",
                Err(Some(_)) => "failed",
                Err(None) => "timeout",
            };
            (
                Input::AdhocDone(adhoc::whoami_done(to, tracker, jid, token, who)),
                outcome,
            )
        }
    }
}

/// How long a device code is waited for at most (trackers give 15 minutes).
const DEVICE_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The client of a tracker's device flow.
fn device_flow(flow: &super::DeviceFlowConfig) -> Result<DeviceFlow, TrackerError> {
    DeviceFlow::new(flow.endpoints.clone(), &flow.client_id)
}

/// The link for a granted token (or why there is none): whose it is (the tracker says), and when
/// it expires.
async fn link_of<T: Tracker>(
    client: &T,
    tracker: &str,
    grant: Result<crate::tracker::oauth::Grant, String>,
) -> Result<crate::links::Link, String> {
    let grant = grant?;
    let login = tokio::time::timeout(Duration::from_secs(15), client.whoami(&grant.access_token))
        .await
        .map_err(|_| format!("{tracker} did not say whose the new token is within 15 s"))?
        .map_err(|e| format!("{tracker} did not accept the new token ({e})"))?;
    let expires_at = grant
        .expires_in
        .and_then(|s| i64::try_from(s).ok())
        .map(|s| chrono::Utc::now().timestamp() + s);
    Ok(crate::links::Link {
        login,
        token: grant.access_token,
        refresh_token: grant.refresh_token,
        expires_at,
    })
}
