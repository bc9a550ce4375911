//! The HTTP listener: `GET /healthz` and `POST /hooks/{tracker}`.
//!
//! A webhook is read with a size cap, verified on its raw bytes, parsed (so malformed JSON is refused
//! with the reason), deduplicated and committed to the inbox by the store thread — and only then
//! answered 202. A duplicate gets 200 and is not posted again. Status codes are decided in one place,
//! [`HookError::status`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use axum::{
    body::{to_bytes, Body},
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;

use crate::store::worker::StoreOp;
use crate::store::{Accepted, InboxItem};
use crate::webhook::{self, verify, Headers, TrackerKind};
use crate::xmpp::link::LinkState;

/// Webhook counters, shown by `/healthz`.
#[derive(Debug, Default)]
pub struct HookCounters {
    /// Deliveries committed to the inbox.
    pub accepted: AtomicU64,
    /// Deliveries seen before.
    pub duplicates: AtomicU64,
    /// Refused: bad or missing signature.
    pub unauthorized: AtomicU64,
    /// Refused: malformed or oversized.
    pub rejected: AtomicU64,
    /// Accepted events no dialect understood (recorded, not posted).
    pub unknown: AtomicU64,
    /// Room messages posted from events.
    pub posted: AtomicU64,
    /// Events not posted: private, filtered out, or no room for the project.
    pub ignored: AtomicU64,
    /// Bodies not received within `http.body_timeout`.
    pub timed_out: AtomicU64,
    /// Open HTTP connections.
    pub connections: AtomicU64,
    /// Connections closed at once because `http.max_connections` were open.
    pub connections_refused: AtomicU64,
    /// By tracker and outcome, and latencies, for `/metrics`.
    pub labelled: crate::metrics::Labelled,
}

/// A tracker as the HTTP side needs it.
#[derive(Debug, Clone)]
pub struct HookTracker {
    /// Dialect.
    pub kind: TrackerKind,
    /// The HMAC key or token (never empty: config validation refuses that).
    pub secret: Vec<u8>,
    /// The sender cannot sign (`allow_unsigned`): the secret is a token it puts in the URL,
    /// `POST /hooks/{name}/{token}`, and its events reach only its own rooms.
    pub unsigned: bool,
}

/// Shared state of the HTTP side.
pub struct HttpState {
    /// Link state for `/healthz`.
    pub link: Arc<LinkState>,
    /// Webhook counters.
    pub hooks: Arc<HookCounters>,
    /// Trackers by route name.
    pub trackers: HashMap<String, HookTracker>,
    /// Body size cap.
    pub max_body: usize,
    /// Time allowed to receive a whole body once the headers are in.
    pub body_timeout: Duration,
    /// The store thread.
    pub store: std::sync::mpsc::Sender<StoreOp>,
    /// Pack each body as the store keeps it ([`InboxItem::packed`]) here rather than on the store's
    /// thread: the backend's [`crate::store::Backend::PACKS_BODIES`].
    pub pack_bodies: bool,
    /// What `/metrics` serves.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The last store probe and when it ran (see [`probe`]).
    pub probed: tokio::sync::Mutex<Option<(std::time::Instant, crate::store::worker::Probe)>>,
}

/// Build the router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/hooks/{tracker}", post(hook))
        .route("/hooks/{tracker}/{token}", post(hook_with_token))
        .with_state(state)
}

/// How long `/healthz` and `/metrics` wait for the store's probe.
const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// A probe this recent is answered again rather than run: `/healthz` is on the webhook listener,
/// which anyone may reach, and each probe is a commit with an fsync.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// The store's probe: at most one per [`PROBE_REUSE`], callers meanwhile share it (one in flight).
async fn probe(st: &HttpState) -> crate::store::worker::Probe {
    let mut last = st.probed.lock().await;
    if let Some((at, p)) = last.as_ref() {
        if at.elapsed() < PROBE_REUSE {
            return p.clone();
        }
    }
    let p = probe_now(st).await;
    *last = Some((std::time::Instant::now(), p.clone()));
    p
}

/// Ask the store thread to commit a small write and count the inbox backlog.
async fn probe_now(st: &HttpState) -> crate::store::worker::Probe {
    use crate::store::worker::Probe;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let unanswered = |why: String| Probe {
        writable: Err(why.clone()),
        backlog: Err(why),
    };
    if st.store.send(StoreOp::Probe(tx)).is_err() {
        return unanswered("the store thread has stopped".into());
    }
    match tokio::time::timeout(PROBE_LIMIT, rx).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => unanswered("the store thread has stopped".into()),
        Err(_) => unanswered(format!(
            "no answer within {} s (the disk is stalled or the store is busy)",
            PROBE_LIMIT.as_secs()
        )),
    }
}

async fn health(State(st): State<Arc<HttpState>>) -> (StatusCode, Json<serde_json::Value>) {
    let link = &st.link;
    let h = &st.hooks;
    let up = link.is_up();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let probe = probe(&st).await;
    let store_ok = probe.writable.is_ok();
    let body = json!({
        "link": if up { "up" } else { "down" },
        "store": match &probe.writable {
            Ok(()) => "writable".to_owned(),
            Err(e) => format!("not writable: {e}"),
        },
        "inbox_pending": probe.backlog.as_ref().map(|b| b.0).ok(),
        "queued": n(&link.queued),
        "dropped": n(&link.dropped),
        "relinks": n(&link.relinks),
        "malformed": n(&link.malformed),
        "refused": n(&link.refused),
        "webhooks": {
            "accepted": n(&h.accepted),
            "duplicates": n(&h.duplicates),
            "unauthorized": n(&h.unauthorized),
            "rejected": n(&h.rejected),
            "unknown": n(&h.unknown),
            "posted": n(&h.posted),
            "ignored": n(&h.ignored),
            "timed_out": n(&h.timed_out),
        },
        "http": {
            "connections": n(&h.connections),
            "connections_refused": n(&h.connections_refused),
        },
    });
    // Unhealthy when the server link is down or the store takes no writes (no webhook can be
    // accepted then).
    let code = if up && store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// `GET /metrics`: Prometheus (OpenMetrics text). The store gauges are read for each scrape.
async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let probe = probe(&st).await;
    let g = &st.metrics.store;
    g.writable.set(i64::from(probe.writable.is_ok()));
    if let Ok((pending, oldest)) = probe.backlog {
        g.pending.set(pending as i64);
        let age = oldest.map_or(0, |t| {
            (chrono::Utc::now().timestamp_micros() - t).max(0) / 1_000_000
        });
        g.oldest_pending_seconds.set(age);
    }
    match st.metrics.render() {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No tracker has that route name.
    #[error("no tracker named {0:?} is configured")]
    UnknownTracker(String),
    /// Over `http.max_body_bytes`.
    #[error("body larger than {0} bytes (http.max_body_bytes)")]
    TooLarge(usize),
    /// The body did not arrive within `http.body_timeout`.
    #[error("body not received within {0:?} (http.body_timeout)")]
    BodyTimeout(Duration),
    /// Missing or wrong signature.
    #[error("{0}")]
    Unauthorized(#[from] verify::VerifyError),
    /// Not parseable.
    #[error("{0}")]
    Malformed(#[from] webhook::DialectError),
    /// The store could not take it; the tracker should retry.
    #[error("cannot store the delivery right now ({0}); retry later")]
    Unavailable(String),
}

impl HookError {
    /// The one place HTTP statuses are chosen.
    pub fn status(&self) -> StatusCode {
        match self {
            HookError::UnknownTracker(_) => StatusCode::NOT_FOUND,
            HookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HookError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            HookError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HookError::Malformed(_) => StatusCode::BAD_REQUEST,
            HookError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// Headers worth keeping with a delivery (dialects and audits need them; cookies and auth do not).
fn kept_headers(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            (k.starts_with("x-") && k != "x-gitlab-token")
                || k == "idempotency-key"
                || k == "content-type"
                || k == "user-agent"
        })
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

async fn hook(
    State(st): State<Arc<HttpState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HookError> {
    hook_inner(st, name, None, headers, body).await
}

async fn hook_with_token(
    State(st): State<Arc<HttpState>>,
    Path((name, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HookError> {
    hook_inner(st, name, Some(token), headers, body).await
}

async fn hook_inner(
    st: Arc<HttpState>,
    name: String,
    token: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HookError> {
    let result = accept(&st, &name, token.as_deref(), &headers, body).await;
    // Labelled by tracker only for configured ones: route names come from anyone.
    let label = if st.trackers.contains_key(&name) {
        name.as_str()
    } else {
        "(unknown)"
    };
    let outcome = match &result {
        Ok((_, outcome)) => *outcome,
        Err(HookError::UnknownTracker(_)) => "unknown_tracker",
        Err(HookError::Unauthorized(_)) => "unauthorized",
        Err(HookError::TooLarge(_)) => "too_large",
        Err(HookError::Malformed(_)) => "malformed",
        Err(HookError::BodyTimeout(_)) => "timed_out",
        Err(HookError::Unavailable(_)) => "unavailable",
    };
    let result = result.map(|(response, _)| response);
    st.hooks.labelled.webhook(label, outcome);
    match &result {
        Err(HookError::Unauthorized(e)) => {
            st.hooks.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(tracker = %name, error = %e, "webhook refused");
        }
        Err(HookError::TooLarge(_) | HookError::Malformed(_)) => {
            st.hooks.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Err(HookError::BodyTimeout(_)) => {
            st.hooks.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    result
}

async fn accept(
    st: &HttpState,
    name: &str,
    token: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Response, &'static str), HookError> {
    let tracker = st
        .trackers
        .get(name)
        .ok_or_else(|| HookError::UnknownTracker(name.to_owned()))?;
    // An unsigned sender's credential is the token in its URL, checked before the body is read.
    match (tracker.unsigned, token) {
        (true, Some(t)) => verify::token(&tracker.secret, t)?,
        (true, None) => return Err(verify::VerifyError::TokenMissing.into()),
        (false, Some(_)) => return Err(HookError::UnknownTracker(format!("{name}/…"))),
        (false, None) => {}
    }
    let bytes = tokio::time::timeout(st.body_timeout, to_bytes(body, st.max_body))
        .await
        .map_err(|_| HookError::BodyTimeout(st.body_timeout))?
        .map_err(|_| HookError::TooLarge(st.max_body))?;
    let h = Headers(kept_headers(headers));
    // Authenticity first, on the raw bytes; nothing is parsed or stored before it passes.
    if !tracker.unsigned {
        verify::verify(tracker.kind, &tracker.secret, &h, &bytes)?;
    }
    let content_type = h.get("content-type").map(str::to_owned);
    // Parsed here, once: a malformed body is refused before anything is stored, and the document
    // (the keys dialects read) goes to the bridge with the row. Checking the syntax here and
    // parsing again on the bridge's thread read each body twice (BENCHMARKS.md §5, stop 29).
    let doc = webhook::parse_body(content_type.as_deref(), &bytes)?;
    if webhook::is_ping(tracker.kind, &h) {
        return Ok((
            (StatusCode::OK, Json(json!({ "pong": true }))).into_response(),
            "ping",
        ));
    }
    let item = InboxItem {
        tracker: name.to_owned(),
        delivery: webhook::delivery_id(tracker.kind, &h, &bytes),
        received: chrono::Utc::now().timestamp_micros(),
        content_type,
        headers: h.0,
        // Hashed here, while the body is in this core's cache, not on the store's thread.
        body_hash: Some(crate::store::body_hash(&bytes)),
        // Packed here too when the store is SQLite: the store thread is serial.
        packed: st.pack_bodies.then(|| crate::store::body::pack(&bytes)),
        doc: Some(doc),
        // The buffer itself when the body came in one piece (no copy of 13.5 KB per delivery).
        body: Vec::from(bytes),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    st.store
        .send(StoreOp::Accept(item, tx))
        .map_err(|_| HookError::Unavailable("store stopped".into()))?;
    match rx.await {
        Ok(Ok(Accepted::New(id))) => {
            st.hooks.accepted.fetch_add(1, Ordering::Relaxed);
            Ok((
                (StatusCode::ACCEPTED, Json(json!({ "accepted": id }))).into_response(),
                "accepted",
            ))
        }
        Ok(Ok(Accepted::Duplicate)) => {
            st.hooks.duplicates.fetch_add(1, Ordering::Relaxed);
            Ok((
                (StatusCode::OK, Json(json!({ "duplicate": true }))).into_response(),
                "duplicate",
            ))
        }
        Ok(Err(e)) => Err(HookError::Unavailable(e)),
        Err(_) => Err(HookError::Unavailable("store stopped".into())),
    }
}

/// Bounds on the listener itself, before any request is read (see SECURITY.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once; one more is closed at once (and counted).
    pub max_connections: usize,
    /// Time allowed for a request's headers, also the idle time of a kept-alive connection.
    pub header_timeout: Duration,
}

/// Serve `app` until the task is dropped. Unlike `axum::serve`, each connection runs with hyper's
/// header read timeout (slow or silent clients are closed) and the number of connections is capped,
/// so nobody can hold the listener before a signature is ever checked.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    counters: Arc<HookCounters>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin; connections close.
                tracing::warn!(error = %e, "http accept failed; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("http.max_connections reached; closing a new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let counters = counters.clone();
        let header_timeout = limits.header_timeout;
        counters.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_headers(100)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            counters.connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}
