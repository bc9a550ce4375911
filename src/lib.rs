//! caseroom: a project tracker as live group chat. An XEP-0114 component that is a persistent,
//! members-only MUC service (XEP-0045) with its own archive (XEP-0313).
//!
//! # Layout
//! - [`config`]: one typed configuration (TOML + `CASEROOM_*` overrides), validated by key.
//! - [`muc`]: the sans-IO MUC/MAM core: stanza in, effects out; no sockets, clock or SQL.
//! - [`bridge`]: the second sans-IO core (webhooks → rooms, commands → trackers, sync → rooms):
//!   `Bridge::handle(Input, now) -> Vec<Action>`; [`bridge::driver`] is the tokio loop that moves
//!   inputs and actions between the cores and the shells; [`bridge::directory`] owns room ownership
//!   and routing; [`bridge::tasks`] the tracker sync loop and catch-up poller.
//! - [`xmpp::link`]: the component connection (handshake, reconnect, bounded queues, keepalive,
//!   write timeout); [`xmpp::link::guard`] bounds each inbound stanza while it is parsed.
//! - [`xmpp::outbound`]: typed builders for the stanzas we send.
//! - [`store`]: SQLite (rooms, affiliations, archive, inbox) on its own thread, with group commit.
//! - [`tracker`]: the `Tracker` trait and the Redmine, Gitea/Forgejo and GitLab clients.
//! - [`links`]: self-service account links (tokens, a 0600 file).
//! - [`http`]: the HTTP listener (`/healthz`, `POST /hooks/{tracker}`).
//! - [`webhook`]: signature checks and one dialect per tracker → [`activity::Activity`].
//! - [`activity`]: the normalised event (Activity Streams 2.0 subset).
//! - [`render`]: Activity → message body (XEP-0393) + JSON payload (XEP-0335) + thread (XEP-0201).
//! - [`filter`]: per-room event filters.
//! - [`commands`]: the chat command grammar (`!new`, `!close`, …), pure.

pub mod activity;
pub mod bridge;
pub mod commands;
pub mod config;
pub mod filter;
pub mod http;
pub mod links;
pub mod metrics;
pub mod muc;
pub mod render;
pub mod store;
pub mod tracker;
pub mod webhook;
pub mod xmpp;

use std::future::Future;

use tokio::sync::mpsc;

use config::Config;
use muc::{Service, ServiceConfig};
use store::Store;
use xmpp::link::{self, LinkConfig};

/// Errors that stop caseroom.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// The first component handshake failed.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// The HTTP listener failed.
    #[error("http listener: {0}")]
    Http(std::io::Error),
    /// The linked-tokens file could not be read.
    #[error("{0}")]
    Links(String),
    /// A tracker client could not be set up.
    #[error("tracker {0}: {1}")]
    Tracker(String, tracker::TrackerError),
    /// A part caseroom cannot run without stopped while running (exit non-zero, so that a
    /// supervisor restarts it).
    #[error("stopped: {0}")]
    Stopped(String),
}

/// Sockets handed in by the caller, bound (so a taken port fails at once) but not yet listening.
pub struct Listeners {
    /// For `[http]`. It starts listening only once this instance serves: a standby (several
    /// instances, `store.instances`) keeps the port bound and refuses connections, so a load
    /// balancer's connection attempt fails at once and moves on to an active instance, where a
    /// listening socket nobody accepts on would hold each request until the balancer's timeout.
    pub http: tokio::net::TcpSocket,
}

/// Connections the kernel holds for the HTTP listener before caseroom accepts them.
const HTTP_BACKLOG: u32 = 1024;

/// Run caseroom until `shutdown` resolves. Only wiring: each step is a function below.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if let Some(url) = cfg.store.url.clone() {
        store::pg_tls::set_ca_file(cfg.store.ca_file.as_deref())?;
        // The synchronous PostgreSQL client drives a runtime of its own: it is opened and read
        // off this one, on a thread, and lives on the store's threads after that.
        let cfg2 = cfg.clone();
        let opened = std::thread::spawn(move || -> Result<_, RunError> {
            if let Some(n) = cfg2.store.instances {
                store::pg::become_active(&url, n)?;
            }
            let mut store = store::pg::PgStore::open(&url)?;
            let slot = store.claim_slot()?;
            let (mut service, mut saved) = load(&cfg2, &mut store)?;
            service.set_instance(slot, store::pg::SLOTS);
            service.set_takeover(cfg2.store.instances.is_some());
            // Deliveries left pending by an instance no longer running (this slot's last holder,
            // or a free slot's) are replayed now; another instance's are its own, and the leader's
            // should it die (`Shells::sweep`).
            saved.replay = store::Backend::orphaned_inbox(&store, i64::MIN)?;
            Ok((store, slot, (service, saved)))
        })
        .join()
        .map_err(|_| {
            RunError::Store(store::StoreError::Refused(
                "opening PostgreSQL panicked".into(),
            ))
        })??;
        let (store, slot, loaded) = opened;
        tracing::info!(slot, "store: PostgreSQL (instance slot {slot})");
        let leadership = store::pg::contend(cfg.store.url.as_deref().unwrap_or_default(), slot);
        return serve(cfg, listeners, shutdown, (store, leadership, true), loaded).await;
    }
    // One caseroom per database: a second one (or a restore) would interleave writes.
    let _lock = store::ops::InstanceLock::acquire(&cfg.store.path)?;
    let mut store = Store::open(&cfg.store.path)?;
    store.set_fsync_messages(cfg.store.fsync_messages);
    store.set_wal_limit(cfg.store.wal_limit_mb << 20)?;
    let mut loaded = load(&cfg, &mut store)?;
    loaded.1.replay = store.pending_inbox()?;
    let alone = store::Leadership::always();
    serve(cfg, listeners, shutdown, (store, alone, false), loaded).await
}

/// Run on an open store until `shutdown` resolves.
// Long by design: the wiring of every part, in start-up order, with nothing to factor out.
async fn serve<S: store::Backend + 'static>(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    (store, leadership, shared): (S, store::Leadership, bool),
    (service, saved): (Service, Saved),
) -> Result<(), RunError> {
    let secret = cfg.secret()?;

    // Link: the first handshake must work (fail fast on bad config).
    xmpp::link::guard::set_limits(
        cfg.component.max_stanza_depth,
        cfg.component.max_stanza_bytes,
    );
    let link_cfg = LinkConfig {
        domain: cfg.component.jid.clone(),
        server: cfg.component.server.clone(),
        secret,
        queue_limit: cfg.component.queue_limit,
        ping_interval: std::time::Duration::from_secs(cfg.component.ping_interval_secs.max(1)),
        write_timeout: cfg.component.write_timeout,
        outgoing_limit: cfg.component.outgoing_limit,
        send_buffer: cfg.component.send_buffer_bytes,
    };
    let conns = link::connect_all(&link_cfg, cfg.component.connections).await?;
    tracing::info!(domain = %cfg.component.jid, server = %cfg.component.server, connections = conns.len(), "linked to the XMPP server");
    leadership.set_linked();
    let (in_tx, in_rx) = mpsc::channel(link::INBOUND_LIMIT);
    let link = link::spawn(link_cfg, conns, in_tx);

    let (store_tx, store_rx) = std::sync::mpsc::channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let store_thread = std::thread::Builder::new()
        .name("caseroom-store".into())
        .spawn(move || store::worker::run(store, store_rx, ev_tx))
        .map_err(RunError::Http)?;

    let counters = std::sync::Arc::new(http::HookCounters::default());
    let app = http::router(std::sync::Arc::new(http::HttpState {
        link: link.state.clone(),
        hooks: counters.clone(),
        trackers: hook_trackers(&cfg)?,
        max_body: cfg.http.max_body_bytes,
        body_timeout: cfg.http.body_timeout,
        store: store_tx.clone(),
        pack_bodies: S::PACKS_BODIES,
        metrics: std::sync::Arc::new(metrics::Metrics::new(link.state.clone(), counters.clone())),
        probed: Default::default(),
    }));
    let http_limits = http::Limits {
        max_connections: cfg.http.max_connections,
        header_timeout: cfg.http.header_timeout,
    };
    let http_thread = spawn_http(listeners.http, app, http_limits, counters.clone()).await?;

    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
    let mut commands = commands_from(&cfg, saved.synced, saved.links)?;
    for (room, v) in &saved.bookmarked {
        commands.bookmarks.restore(room, v);
    }
    let mut trackers = start_trackers(
        &cfg,
        &mut commands,
        &store_tx,
        &sync_tx,
        saved.poll_cursors,
        &leadership,
    )?;
    trackers.tasks.push(tokio::spawn(retention(
        cfg.store.clone(),
        store_tx.clone(),
        leadership.clone(),
    )));
    let mut core = bridge::Bridge::new(
        service,
        link.state.clone(),
        bridge::Hooks::from_config(&cfg, counters.clone()),
        commands,
        seed(),
    );
    core.set_cluster(shared);
    let shells = bridge::driver::Shells {
        link,
        store: store_tx,
        clients: trackers.clients,
        resync: trackers.resync,
        links: match &cfg.store.url {
            Some(url) => bridge::driver::LinksShell::Shared(url.clone()),
            None => {
                bridge::driver::LinksShell::File(links::LinksFile::new(&cfg.store.tokens_path()))
            }
        },
        metrics: counters.labelled.clone(),
        sweep: shared.then_some(leadership),
    };
    let stopped =
        bridge::driver::run(core, shells, saved.replay, in_rx, ev_rx, sync_rx, shutdown).await;
    // The HTTP connections, sync and poll tasks hold senders to the store thread: stop them so it
    // can finish.
    http_thread.stop().await;
    for task in trackers.tasks {
        task.abort();
        let _ = task.await;
    }
    // Dropping the bridge closed the store channel: let the thread finish its last commit.
    let store_end = tokio::task::spawn_blocking(move || store_thread.join()).await;
    exit_status(stopped, store_end)
}

/// The HTTP listener on a thread of its own, with a single-threaded runtime of its own.
///
/// Webhook intake (reading the body, its HMAC and hash, the JSON check, the 202) then runs beside
/// the link and the bridge instead of between their stanzas, while a stanza still crosses no thread
/// on its way through (`runtime.worker_threads = 1`). Nothing more crosses threads than before: a
/// delivery went to the store thread and its 202 came back from there already. A webhook burst no
/// longer delays room traffic, and intake rose by 15–33 % on a 2-core machine (BENCHMARKS.md §5).
///
/// Returns once the socket listens (a failure is the caller's, at start); the thread runs until
/// [`HttpThread::stop`].
async fn spawn_http(
    socket: tokio::net::TcpSocket,
    app: axum::Router,
    limits: http::Limits,
    counters: std::sync::Arc<http::HookCounters>,
) -> Result<HttpThread, RunError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("caseroom-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                // The listener belongs to this thread's runtime: made here.
                let listener = match socket.listen(HTTP_BACKLOG) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    served = http::serve(listener, app, limits, counters) => {
                        if let Err(e) = served {
                            tracing::error!(error = %e, "http server stopped");
                        }
                    }
                    _ = stopped => {}
                }
            });
        })
        .map_err(RunError::Http)?;
    match ready.await {
        Ok(Ok(())) => Ok(HttpThread { stop, thread }),
        Ok(Err(e)) => Err(RunError::Http(e)),
        Err(_) => Err(RunError::Stopped("the HTTP thread ended at start".into())),
    }
}

/// The running HTTP thread ([`spawn_http`]).
struct HttpThread {
    /// Dropping it ends the thread's runtime, and every connection with it.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl HttpThread {
    /// Stop serving, and wait until the thread has ended.
    async fn stop(self) {
        drop(self.stop);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Apply retention (`store.retention`, `store.room_retention`, `store.inbox_keep`) a minute after
/// start, then daily; the store thread deletes in small batches between its other work.
async fn retention(
    cfg: config::StoreConfig,
    store: std::sync::mpsc::Sender<store::worker::StoreOp>,
    leadership: store::Leadership,
) {
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    loop {
        if !leadership.is_leader() {
            // Another instance applies it; look again in a minute (it may die).
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            continue;
        }
        let plan = cfg.prune_plan(chrono::Utc::now().timestamp_micros());
        if store.send(store::worker::StoreOp::Prune(plan)).is_err() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(86_400)).await;
    }
}

/// 64 bits from the OS (mixed with the clock should it have none), for the cores' seeded sequences.
fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b) ^ chrono::Utc::now().timestamp_micros() as u64
}

/// What the store remembers for the bridge and the driver.
struct Saved {
    /// Per tracker, the catch-up poller's position.
    poll_cursors: std::collections::HashMap<String, String>,
    /// Per tracker, the rooms its last sync mirrored (a group gone since then closes its room).
    synced: std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
    /// Deliveries accepted but not yet posted.
    replay: Vec<store::InboxRow>,
    /// Per room, the members given its bookmark (stored JSON).
    bookmarked: Vec<(String, String)>,
    /// Account links (the tokens file, or the shared table).
    links: links::Links,
}

/// Open the state: static rooms into the store, then the MUC core from the store (rooms, recent
/// history, mutes, the archive sequence), and what the bridge needs back. Blocking is fine here: the
/// loop has not started.
fn load<S: store::Startup>(cfg: &Config, store: &mut S) -> Result<(Service, Saved), RunError> {
    let domain: xmpp_parsers::jid::BareJid = cfg
        .component
        .jid
        .parse()
        .map_err(|_| link::LinkError::BadJid(cfg.component.jid.clone()))?;
    store.upsert_rooms(&bridge::config_rooms(cfg))?;
    let rate = |per_minute, burst| muc::limits::Rate { per_minute, burst };
    let mut service = Service::new(
        ServiceConfig {
            domain,
            name: cfg.muc.name.clone(),
            mam_max_page: cfg.muc.mam_max_page,
            default_history: cfg.muc.default_history,
            occupant_salt: store.occupant_salt()?,
            reserved_nicks: cfg.trackers.iter().map(|t| t.nick().to_owned()).collect(),
            message_rate: rate(cfg.muc.messages_per_minute, cfg.muc.message_burst),
            query_rate: rate(cfg.muc.queries_per_minute, cfg.muc.query_burst),
            join_rate: rate(cfg.muc.joins_per_minute, cfg.muc.join_burst),
            presence_rate: rate(
                cfg.muc.presence_changes_per_minute,
                cfg.muc.presence_change_burst,
            ),
            waiting_per_room: cfg.muc.waiting_per_room,
        },
        seed(),
    );
    service.set_last_seq(store.last_seq()?);
    // A room's join history (also where a chat command resent across a restart is recognised) is
    // read when the room is first used, not here: start-up does not grow with the archive.
    let mut bookmarked = Vec::new();
    for info in store.rooms()? {
        if let Some(v) = store.meta(&bridge::bookmarks::meta_key(&info.name))? {
            bookmarked.push((info.name.clone(), v));
        }
        service.restore_room(info);
    }
    for (room, jid, rules) in store.mutes()? {
        let _ = service.set_mutes(&room, &jid, rules); // already stored: the Persist effect is dropped
    }
    let mut saved = Saved {
        poll_cursors: Default::default(),
        synced: Default::default(),
        // Which deliveries to replay depends on the store: every pending one (SQLite, one
        // instance) or those of instances no longer running (PostgreSQL); the caller reads them.
        replay: Vec::new(),
        bookmarked,
        links: store
            .links(&links::LinksFile::new(&cfg.store.tokens_path()))
            .map_err(|e| RunError::Links(e.to_string()))?,
    };
    for t in &cfg.trackers {
        if let Some(v) = store.meta(&bridge::tasks::poll_key(&t.name))? {
            saved.poll_cursors.insert(t.name.clone(), v);
        }
        let key = bridge::synced_key(&t.name);
        if let Some(v) = store.meta(&key)? {
            match bridge::parse_synced(&v) {
                Some(rooms) => {
                    saved.synced.insert(t.name.clone(), rooms);
                }
                None => tracing::warn!(tracker = %t.name, "ignoring an unreadable {key}"),
            }
        }
    }
    Ok((service, saved))
}

/// The trackers as the HTTP side needs them.
fn hook_trackers(
    cfg: &Config,
) -> Result<std::collections::HashMap<String, http::HookTracker>, RunError> {
    let mut trackers = std::collections::HashMap::new();
    for t in &cfg.trackers {
        trackers.insert(
            t.name.clone(),
            http::HookTracker {
                kind: t.kind,
                secret: t.secret_bytes()?.unwrap_or_default(),
                unsigned: t.allow_unsigned,
            },
        );
    }
    Ok(trackers)
}

/// The bridge's command state from the config and the store.
fn commands_from(
    cfg: &Config,
    synced: std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
    links: links::Links,
) -> Result<bridge::Commands, RunError> {
    let mut commands = bridge::Commands::default();
    commands.directory =
        bridge::directory::Directory::new(cfg.rooms.iter().map(|r| r.name.as_str()));
    commands.restore(synced);
    commands.limits = bridge::CommandLimits {
        per_person: cfg.muc.commands_in_flight_per_person,
        total: cfg.muc.commands_in_flight,
        max_mutes: cfg.muc.max_mutes,
        search_hits: cfg.muc.search_hits,
    };
    commands.links = Some(links);
    // Validated already: every operator is a bare JID.
    commands.operators = cfg
        .muc
        .operators
        .iter()
        .filter_map(|j| j.parse().ok())
        .collect();
    Ok(commands)
}

/// The tracker clients and their background tasks.
struct Trackers {
    clients: std::collections::HashMap<String, std::sync::Arc<tracker::AnyTracker>>,
    resync: std::collections::HashMap<String, std::sync::Arc<tokio::sync::Notify>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// For each tracker with a REST URL: its client, its sync task (now, every `sync_interval`, and when
/// woken) and, with `poll_interval`, its catch-up poller.
fn start_trackers(
    cfg: &Config,
    commands: &mut bridge::Commands,
    store_tx: &std::sync::mpsc::Sender<store::worker::StoreOp>,
    sync_tx: &mpsc::UnboundedSender<bridge::Synced>,
    mut poll_cursors: std::collections::HashMap<String, String>,
    leadership: &store::Leadership,
) -> Result<Trackers, RunError> {
    let mut out = Trackers {
        clients: Default::default(),
        resync: Default::default(),
        tasks: vec![],
    };
    for t in &cfg.trackers {
        let (Some(url), Some(key)) = (&t.url, t.api_key()?) else {
            continue;
        };
        let mut client = tracker::AnyTracker::connect(t.kind, url, &key)
            .map_err(|e| RunError::Tracker(t.name.clone(), e))?;
        client.set_max_response(t.max_response_bytes);
        let client = std::sync::Arc::new(client);
        commands.clients.insert(t.name.clone());
        out.clients.insert(t.name.clone(), client.clone());
        if let Some(every) = t.poll_interval {
            // Catch-up poller: what the webhook missed (Redmine's deliveries are never retried).
            out.tasks.push(tokio::spawn(bridge::tasks::poll(
                t.name.clone(),
                client.clone(),
                store_tx.clone(),
                bridge::tasks::poll_key(&t.name),
                poll_cursors.remove(&t.name),
                every,
                leadership.clone(),
            )));
        }
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        commands.resync.insert(t.name.clone());
        out.resync.insert(t.name.clone(), wake.clone());
        let hook = match (&t.webhook_url, t.manage_webhooks) {
            (Some(url), true) => t
                .secret_bytes()?
                .map(|s| String::from_utf8_lossy(&s).into_owned())
                .map(|secret| tracker::HookSpec {
                    url: url.clone(),
                    secret,
                }),
            _ => None,
        };
        out.tasks.push(tokio::spawn(bridge::tasks::sync(
            t.name.clone(),
            client,
            t.sync_interval,
            wake,
            sync_tx.clone(),
            hook,
            leadership.clone(),
        )));
    }
    Ok(out)
}

/// The process's outcome: a dead store or link task, or room changes left unwritten, are errors
/// (exit non-zero, so a supervisor restarts caseroom).
fn exit_status(
    stopped: bridge::Stopped,
    store_end: Result<std::thread::Result<Vec<muc::Persist>>, tokio::task::JoinError>,
) -> Result<(), RunError> {
    match (stopped, store_end) {
        (_, Ok(Err(_))) | (bridge::Stopped::StoreGone, _) => Err(RunError::Stopped(
            "the store thread died (see the log above); acknowledged deliveries are safe in the inbox".into(),
        )),
        (_, Ok(Ok(unwritten))) if !unwritten.is_empty() => Err(RunError::Stopped(format!(
            "{} room change(s) could not be written before stopping",
            unwritten.len()
        ))),
        (bridge::Stopped::LinkGone, _) => Err(RunError::Stopped(
            "the component link task stopped".into(),
        )),
        _ => Ok(()),
    }
}
