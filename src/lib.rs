//! caseroom: a project tracker as live group chat. An XEP-0114 component that is a persistent,
//! members-only MUC service (XEP-0045) with its own archive (XEP-0313).
//!
//! # Layout
//! - [`config`]: one typed configuration (TOML + `CASEROOM_*` overrides), validated by key.
//! - [`muc`]: the sans-IO MUC/MAM core: stanza in, effects out; no sockets, clock or SQL.
//! - [`xmpp::link`]: the component connection (handshake, reconnect, queue, keepalive).
//! - [`xmpp::outbound`]: typed builders for the stanzas we send.
//! - [`store`]: SQLite (rooms, affiliations, archive) on its own thread, with group commit.
//! - [`bridge`]: drives the core, performs its effects, feeds completions back.
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
pub mod muc;
pub mod render;
pub mod store;
pub mod tracker;
pub mod webhook;
pub mod xmpp;

use std::future::Future;

use tokio::net::TcpListener;
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

/// Sockets handed in by the caller (tests bind port 0).
pub struct Listeners {
    /// For `[http]`.
    pub http: TcpListener,
}

/// Run caseroom until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let secret = cfg.secret()?;
    let domain: xmpp_parsers::jid::BareJid = cfg
        .component
        .jid
        .parse()
        .map_err(|_| link::LinkError::BadJid(cfg.component.jid.clone()))?;

    // Store: open, apply static rooms, load state. Done before the loop starts, so blocking is fine.
    let mut store = Store::open(&cfg.store.path)?;
    for room in bridge::config_rooms(&cfg) {
        store.upsert_room(&room)?;
    }
    let salt = store.occupant_salt()?;
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let mut service = Service::new(
        ServiceConfig {
            domain,
            name: cfg.muc.name.clone(),
            mam_max_page: cfg.muc.mam_max_page,
            default_history: cfg.muc.default_history,
            occupant_salt: salt,
            reserved_nicks: cfg.trackers.iter().map(|t| t.nick().to_owned()).collect(),
            message_rate: muc::limits::Rate {
                per_minute: cfg.muc.messages_per_minute,
                burst: cfg.muc.message_burst,
            },
            query_rate: muc::limits::Rate {
                per_minute: cfg.muc.queries_per_minute,
                burst: cfg.muc.query_burst,
            },
        },
        u64::from_le_bytes(seed) ^ chrono::Utc::now().timestamp_micros() as u64,
    );
    service.set_last_seq(store.last_seq()?);
    // Per tracker, from the store: the catch-up position, and the rooms the last sync mirrored (a
    // group gone since then closes its room).
    let mut poll_cursors = std::collections::HashMap::new();
    let mut synced = std::collections::HashMap::new();
    for t in &cfg.trackers {
        if let Some(v) = store.meta(&bridge::poller::poll_key(&t.name))? {
            poll_cursors.insert(t.name.clone(), v);
        }
        let key = bridge::synced_key(&t.name);
        if let Some(v) = store.meta(&key)? {
            match bridge::parse_synced(&v) {
                Some(rooms) => {
                    synced.insert(t.name.clone(), rooms);
                }
                None => tracing::warn!(tracker = %t.name, "ignoring an unreadable {key}"),
            }
        }
    }
    let replay = store.pending_inbox()?;
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
    for info in store.rooms()? {
        let recent = store.recent(&info.name, muc::room::HISTORY_CACHE)?;
        service.upsert_room(info, recent);
    }
    for (room, jid, rules) in store.mutes()? {
        let _ = service.set_mutes(&room, &jid, rules); // already stored: the Persist effect is dropped
    }

    // Link: the first handshake must work (fail fast on bad config).
    xmpp::guard::set_limits(
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
    };
    let conn = link::connect(&link_cfg).await?;
    tracing::info!(domain = %cfg.component.jid, server = %cfg.component.server, "linked to the XMPP server");
    let (in_tx, in_rx) = mpsc::channel(link::INBOUND_LIMIT);
    let link = link::spawn(link_cfg, conn, in_tx);

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
        trackers,
        max_body: cfg.http.max_body_bytes,
        body_timeout: cfg.http.body_timeout,
        store: store_tx.clone(),
    }));
    let counters_http = counters.clone();
    let hooks = bridge::Hooks::from_config(&cfg, counters);
    // Trackers with a REST URL: sync their groups into rooms now and every sync_interval.
    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
    let mut commands = bridge::Commands::default();
    commands.directory =
        bridge::directory::Directory::new(cfg.rooms.iter().map(|r| r.name.as_str()));
    for (tracker, rooms) in &synced {
        commands.directory.restore(tracker, rooms);
    }
    commands.synced = synced;
    commands.limits = bridge::CommandLimits {
        per_person: cfg.muc.commands_in_flight_per_person,
        total: cfg.muc.commands_in_flight,
        max_mutes: cfg.muc.max_mutes,
    };
    let tokens = cfg.store.tokens_path();
    commands.links = Some(links::Links::open(&tokens).map_err(|e| RunError::Links(e.to_string()))?);
    commands.operators = cfg
        .muc
        .operators
        .iter()
        .filter_map(|j| j.parse().ok())
        .collect();
    let mut background: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut clients = std::collections::HashMap::new();
    let mut resync = std::collections::HashMap::new();
    for t in &cfg.trackers {
        let (Some(url), Some(key)) = (&t.url, t.api_key()?) else {
            continue;
        };
        let mut client = tracker::AnyTracker::connect(t.kind, url, &key)
            .map_err(|e| RunError::Tracker(t.name.clone(), e))?;
        client.set_max_response(t.max_response_bytes);
        let client = std::sync::Arc::new(client);
        commands.clients.insert(t.name.clone());
        clients.insert(t.name.clone(), client.clone());
        if let Some(every) = t.poll_interval {
            // Catch-up poller: what the webhook missed (Redmine's deliveries are never retried).
            background.push(tokio::spawn(bridge::poller::poll(
                t.name.clone(),
                client.clone(),
                store_tx.clone(),
                bridge::poller::poll_key(&t.name),
                poll_cursors.remove(&t.name),
                every,
            )));
        }
        let every = t.sync_interval;
        let (name, tx) = (t.name.clone(), sync_tx.clone());
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        commands.resync.insert(t.name.clone());
        resync.insert(t.name.clone(), wake.clone());
        background.push(tokio::spawn(async move {
            use tracker::Tracker;
            loop {
                let groups = client.groups().await.map_err(|e| e.to_string());
                match &groups {
                    Ok(g) => {
                        tracing::info!(tracker = %name, groups = g.len(), "synced groups and members")
                    }
                    Err(e) => {
                        tracing::warn!(tracker = %name, error = %e, "sync failed; rooms keep their last state")
                    }
                }
                let synced = bridge::Synced {
                    tracker: name.clone(),
                    groups,
                };
                if tx.send(synced).is_err() {
                    return;
                }
                // Every sync_interval, or sooner when asked ("Resync now", a membership webhook).
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = wake.notified() => {}
                }
            }
        }));
    }
    let http_limits = http::Limits {
        max_connections: cfg.http.max_connections,
        header_timeout: cfg.http.header_timeout,
    };
    let http_task = tokio::spawn(async move {
        if let Err(e) = http::serve(listeners.http, app, http_limits, counters_http).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });

    let mut bridge_seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut bridge_seed);
    let core = bridge::Bridge::new(
        service,
        link.state.clone(),
        hooks,
        commands,
        u64::from_le_bytes(bridge_seed) ^ chrono::Utc::now().timestamp_micros() as u64,
    );
    let shells = bridge::driver::Shells {
        link,
        store: store_tx,
        clients,
        resync,
    };
    let stopped = bridge::driver::run(core, shells, replay, in_rx, ev_rx, sync_rx, shutdown).await;
    http_task.abort();
    // Sync and poll tasks hold senders to the store thread: stop them so it can finish.
    for task in background {
        task.abort();
        let _ = task.await;
    }
    let _ = http_task.await;
    // Dropping the bridge closed the store channel: let the thread finish its last commit.
    let store_end = tokio::task::spawn_blocking(move || store_thread.join()).await;
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
