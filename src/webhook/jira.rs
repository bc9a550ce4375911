//! Jira: no event header; the body's `webhookEvent` (and `issue_event_type_name`) says what happened.
//! Comments arrive either as `comment_created` or (older) as `jira:issue_updated` with a top-level
//! `comment`. Status changes are read from the changelog. Restricted comments and issues under a
//! security level are marked private (never posted).

use serde_json::Value;

use super::{at, first_text, text, DialectError, Normalized};
use crate::activity::{Activity, Actor, EventKind, Object, Verb};

fn browse_url(v: &Value, key: &str) -> Option<String> {
    // issue.self = https://host/rest/api/2/issue/10400 → https://host/browse/KEY-1
    let api = text(v, "issue.self")?;
    let base = api.split("/rest/api/").next()?;
    Some(format!("{base}/browse/{key}"))
}

const CLOSED: &[&str] = &["done", "closed", "resolved"];

/// Normalise a Jira delivery.
// Long by design: one arm per Jira event, each a few field lookups.
pub fn normalize(v: &Value) -> Result<Normalized, DialectError> {
    let event = text(v, "webhookEvent").ok_or(DialectError::Missing("webhookEvent"))?;
    let sub = text(v, "issue_event_type_name").unwrap_or_default();
    let key = match text(v, "issue.key") {
        Some(k) => k,
        None => return Ok(Normalized::Unknown(event)),
    };
    let project = first_text(v, &["issue.fields.project.key"])
        .unwrap_or_else(|| key.split('-').next().unwrap_or(&key).to_owned());
    let comment = text(v, "comment.body");
    let (verb, kind, actor_path) = match (event.as_str(), sub.as_str()) {
        ("jira:issue_created", _) => (Verb::Opened, EventKind::Issue, "user"),
        ("jira:issue_deleted", _) => (Verb::Deleted, EventKind::Issue, "user"),
        ("comment_created", _) => (Verb::Commented, EventKind::Comment, "comment.author"),
        ("comment_updated", _) => (Verb::Edited, EventKind::Comment, "comment.updateAuthor"),
        ("jira:issue_updated", "issue_commented") if comment.is_some() => {
            (Verb::Commented, EventKind::Comment, "user")
        }
        ("jira:issue_updated", "issue_assigned") => (Verb::Assigned, EventKind::Issue, "user"),
        ("jira:issue_updated", "issue_resolved" | "issue_closed") => {
            (Verb::Closed, EventKind::Issue, "user")
        }
        ("jira:issue_updated", "issue_reopened") => (Verb::Reopened, EventKind::Issue, "user"),
        ("jira:issue_updated", _) => {
            let status = at(v, "changelog.items")
                .and_then(Value::as_array)
                .and_then(|items| {
                    items
                        .iter()
                        .find(|i| text(i, "field").as_deref() == Some("status"))
                });
            let verb = match status.and_then(|s| text(s, "toString")) {
                Some(to) if CLOSED.contains(&to.to_lowercase().as_str()) => Verb::Closed,
                Some(_)
                    if status
                        .and_then(|s| text(s, "fromString"))
                        .is_some_and(|f| CLOSED.contains(&f.to_lowercase().as_str())) =>
                {
                    Verb::Reopened
                }
                _ => Verb::Edited,
            };
            (verb, EventKind::Issue, "user")
        }
        _ => return Ok(Normalized::Unknown(format!("{event}.{sub}"))),
    };
    let actor_name = first_text(
        v,
        &[
            &format!("{actor_path}.displayName"),
            &format!("{actor_path}.name"),
            "user.displayName",
        ],
    )
    .unwrap_or_else(|| "someone".into());
    let login = first_text(
        v,
        &[
            &format!("{actor_path}.name"),
            &format!("{actor_path}.accountId"),
        ],
    );
    let url = browse_url(v, &key);
    let object = Object {
        kind: if kind == EventKind::Comment {
            "Note"
        } else {
            "Page"
        }
        .into(),
        reference: Some(key.clone()),
        name: text(v, "issue.fields.summary"),
        url: url.clone(),
        content: if kind == EventKind::Comment {
            comment.map(|c| super::clip(c.trim(), 500))
        } else {
            None
        },
    };
    let action = if sub.is_empty() { event.clone() } else { sub };
    let mut a = Activity::new(
        verb,
        kind,
        &action,
        Actor {
            name: actor_name,
            login,
            url: None,
        },
        object,
        &project,
    );
    a.project_url = url
        .as_ref()
        .and_then(|u| u.split("/browse/").next())
        .map(|b| format!("{b}/browse/{project}"));
    a.case = Some(key);
    // Never posted: a comment restricted to a role or group (`visibility`), an internal Service
    // Management comment (`jsdPublic: false`), and any event of an issue under a security level —
    // the room's members may not be the people Jira lets read them.
    a.private = at(v, "comment.visibility").is_some()
        || at(v, "comment.jsdPublic").and_then(Value::as_bool) == Some(false)
        || at(v, "issue.fields.security").is_some();
    a.labels = at(v, "issue.fields.labels")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    a.assignees = first_text(v, &["issue.fields.assignee.displayName"])
        .into_iter()
        .collect();
    a.published = at(v, "timestamp")
        .and_then(Value::as_i64)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    Ok(Normalized::Activity(Box::new(a)))
}
