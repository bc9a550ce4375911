//! The tracker tasks of the driver side (not part of any core): the sync loop, and the catch-up
//! poller.
//!
//! The sync loop reads a tracker's groups and members now, every `sync_interval`, and whenever it is
//! woken ("Resync now", a membership webhook), and hands the result to the bridge as [`super::Synced`].
//!
//! The catch-up poller: Redmine's webhooks are never retried,
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
    leadership: crate::store::Leadership,
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
        if !leadership.is_leader() {
            continue; // the leader polls
        }
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
                body_hash: None,
                packed: None,
                doc: None,
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

/// The sync loop of one tracker (see the module doc); ends when the bridge is gone.
pub async fn sync(
    name: String,
    client: std::sync::Arc<crate::tracker::AnyTracker>,
    every: std::time::Duration,
    wake: std::sync::Arc<tokio::sync::Notify>,
    tx: tokio::sync::mpsc::UnboundedSender<super::Synced>,
    hook: Option<crate::tracker::HookSpec>,
    leadership: crate::store::Leadership,
) {
    use crate::tracker::Tracker;
    loop {
        // Only the leader syncs (several instances on PostgreSQL); it may change at any time.
        while !leadership.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = wake.notified() => {}
            }
        }
        let groups = client.groups().await.map_err(|e| e.to_string());
        match &groups {
            Ok(g) => tracing::info!(tracker = %name, groups = g.len(), "synced groups and members"),
            Err(e) => {
                tracing::warn!(tracker = %name, error = %e, "sync failed; rooms keep their last state")
            }
        }
        // `manage_webhooks`: each synced repository's webhook created or repaired, one at a time.
        let mut hooks = Vec::new();
        if let (Some(spec), Ok(groups)) = (&hook, &groups) {
            for g in groups {
                let r = client.ensure_hook(&g.id, spec).await;
                match &r {
                    Ok(r) if r.action != crate::tracker::HookAction::Unchanged => {
                        tracing::info!(tracker = %name, group = %g.id, action = ?r.action, "webhook set up")
                    }
                    Err(e) => {
                        tracing::warn!(tracker = %name, group = %g.id, error = %e, "could not set up the webhook")
                    }
                    _ => {}
                }
                hooks.push((g.id.clone(), r.map_err(|e| e.to_string())));
            }
        }
        let synced = super::Synced {
            tracker: name.clone(),
            groups,
            hooks,
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
}
