//! The HTTP listener: `GET /healthz` (200 when the component link is up, 503 otherwise).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::json;

use crate::xmpp::link::LinkState;

/// Build the router.
pub fn router(link: Arc<LinkState>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .with_state(link)
}

async fn health(State(link): State<Arc<LinkState>>) -> (StatusCode, Json<serde_json::Value>) {
    let up = link.up.load(Ordering::SeqCst);
    let body = json!({
        "link": if up { "up" } else { "down" },
        "queued": link.queued.load(Ordering::Relaxed),
        "dropped": link.dropped.load(Ordering::Relaxed),
        "relinks": link.relinks.load(Ordering::Relaxed),
        "malformed": link.malformed.load(Ordering::Relaxed),
    });
    let code = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
