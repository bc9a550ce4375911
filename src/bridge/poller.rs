//! The catch-up poller (a driver task, not part of any core): Redmine's webhooks are never retried,
//! so every `poll_interval` the changes since a stored cursor are read through the REST API and handed
//! to the inbox exactly like webhook deliveries, under the same delivery ids (derived from the journal
//! or issue), so each change is posted once, whichever path brought it first.

/// The store's meta key holding a tracker's catch-up position.
pub fn poll_key(tracker: &str) -> String {
    format!("poll_cursor:{tracker}")
}

/// A first start's catch-up position: the tracker's newest change, stored at once — had we waited for
/// the first change to store it, a restart before that change would start again from "now" and lose
/// whatever happened while caseroom was down. Retried until the tracker answers; `None` once the store
/// has stopped.
async fn first_cursor(
    name: &str,
    redmine: &crate::tracker::redmine::Redmine,
    store: &std::sync::mpsc::Sender<crate::store::worker::StoreOp>,
    key: &str,
    every: std::time::Duration,
) -> Option<String> {
    loop {
        match redmine.latest_change().await {
            Ok(latest) => {
                let c = latest.unwrap_or_else(|| {
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                });
                store
                    .send(crate::store::worker::StoreOp::SetMeta(
                        key.to_owned(),
                        c.clone(),
                    ))
                    .ok()?;
                tracing::info!(tracker = %name, since = %c, "catch-up poller starts");
                return Some(c);
            }
            Err(e) => {
                tracing::warn!(tracker = %name, error = %e, "catch-up poller cannot read its starting point; will retry");
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// The catch-up poller of one tracker: every `every`, fetch what changed since the cursor and hand it to
/// the inbox like a webhook delivery (same delivery ids as the Redmine plugin, so nothing is posted twice).
pub async fn poll(
    name: String,
    client: std::sync::Arc<crate::tracker::AnyTracker>,
    store: std::sync::mpsc::Sender<crate::store::worker::StoreOp>,
    key: String,
    cursor: Option<String>,
    every: std::time::Duration,
) {
    let Some(redmine) = client.as_redmine() else {
        return; // only Redmine's webhooks go unretried; the others retry themselves
    };
    let mut cursor = match cursor {
        Some(c) => c,
        None => match first_cursor(&name, redmine, &store, &key, every).await {
            Some(c) => c,
            None => return,
        },
    };
    loop {
        tokio::time::sleep(every).await;
        let (changes, next) = match redmine.changes_since(&cursor).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(tracker = %name, error = %e, "catch-up poll failed; will retry");
                continue;
            }
        };
        let mut ok = true;
        for (delivery, body) in changes {
            let item = crate::store::InboxItem {
                tracker: name.clone(),
                delivery: Some(delivery.clone()),
                received: chrono::Utc::now().timestamp_micros(),
                content_type: Some("application/json".into()),
                headers: vec![("x-caseroom-delivery".into(), delivery)],
                body,
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            if store
                .send(crate::store::worker::StoreOp::Accept(item, tx))
                .is_err()
            {
                return;
            }
            match rx.await {
                Ok(Ok(crate::store::Accepted::New(id))) => {
                    tracing::info!(tracker = %name, id, "catch-up poll found a change the webhook missed")
                }
                Ok(Ok(crate::store::Accepted::Duplicate)) => {}
                _ => ok = false,
            }
        }
        if ok && next != cursor {
            cursor = next;
            let _ = store.send(crate::store::worker::StoreOp::SetMeta(
                key.clone(),
                cursor.clone(),
            ));
        }
    }
}
