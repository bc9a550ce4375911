//! Redmine, three shapes:
//! * native webhooks (Redmine ≥ 7): `{"type":"issue.created|issue.updated|…","timestamp",…,"data":{"issue",…,"journal"?}}`;
//!   caseroom's plugin for Redmine 5/6 (`deploy/redmine/`) sends the same shape;
//! * the third-party redmine_webhook plugin: `{"payload":{"action":"opened|updated","issue",…,"journal"?,"url"}}`.
//!
//! Private issues (`is_private`) and private notes (`private_notes`) are marked private: never posted.

use serde_json::Value;

use super::{at, first_text, text, DialectError, Normalized};
use crate::activity::{Activity, Actor, EventKind, Object, Verb};

fn person(v: Option<&Value>) -> Actor {
    let Some(v) = v else {
        return Actor {
            name: "someone".into(),
            login: None,
            url: None,
        };
    };
    let full = match (text(v, "firstname"), text(v, "lastname")) {
        (Some(f), Some(l)) => Some(format!("{f} {l}")),
        (Some(f), None) => Some(f),
        _ => None,
    };
    let login = text(v, "login");
    Actor {
        name: first_text(v, &["name"])
            .or(full)
            .or_else(|| login.clone())
            .unwrap_or_else(|| "someone".into()),
        login,
        url: None,
    }
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::String(s)) => s == "1" || s == "true",
        _ => false,
    }
}

/// Normalise a Redmine delivery (native, caseroom plugin, or redmine_webhook plugin).
pub fn normalize(v: &Value) -> Result<Normalized, DialectError> {
    if let Some(payload) = at(v, "payload") {
        return plugin(payload);
    }
    let kind = text(v, "type").ok_or(DialectError::Missing("type"))?;
    let Some(issue) = at(v, "data.issue") else {
        return Ok(Normalized::Unknown(kind)); // news, time entries, wiki pages, versions
    };
    let journal = at(v, "data.journal");
    let created = kind == "issue.created";
    let verb = match kind.as_str() {
        "issue.created" => Verb::Opened,
        "issue.deleted" => Verb::Deleted,
        "issue.updated" => journal_verb(issue, journal),
        _ => return Ok(Normalized::Unknown(kind)),
    };
    let actor = if created {
        person(at(issue, "author"))
    } else {
        person(journal.and_then(|j| at(j, "user")))
    };
    let base = text(v, "data.url").or_else(|| text(v, "url"));
    let mut a = build(issue, journal, verb, &kind, actor, base)?;
    a.published = text(v, "timestamp");
    Ok(Normalized::Activity(Box::new(a)))
}

fn journal_verb(issue: &Value, journal: Option<&Value>) -> Verb {
    let details = journal
        .and_then(|j| at(j, "details"))
        .and_then(Value::as_array);
    let changed = |key: &str| {
        details.is_some_and(|d| {
            d.iter().any(|x| {
                text(x, "prop_key").as_deref() == Some(key)
                    || text(x, "name").as_deref() == Some(key)
            })
        })
    };
    let notes = journal.and_then(|j| text(j, "notes")).is_some();
    if changed("status_id") {
        let closed_now = truthy(at(issue, "status.is_closed"));
        return if closed_now {
            Verb::Closed
        } else {
            Verb::Reopened
        };
    }
    if notes {
        return Verb::Commented;
    }
    if changed("assigned_to_id") {
        return Verb::Assigned;
    }
    Verb::Edited
}

fn build(
    issue: &Value,
    journal: Option<&Value>,
    verb: Verb,
    action: &str,
    actor: Actor,
    base: Option<String>,
) -> Result<Activity, DialectError> {
    let id = text(issue, "id").ok_or(DialectError::Missing("issue.id"))?;
    let project = first_text(issue, &["project.identifier", "project.name"])
        .ok_or(DialectError::Missing("issue.project"))?;
    let notes = journal.and_then(|j| text(j, "notes"));
    let is_comment = verb == Verb::Commented;
    let url = first_text(issue, &["url"])
        .or_else(|| base.map(|b| format!("{}/issues/{id}", b.trim_end_matches('/'))));
    let object = Object {
        kind: if is_comment { "Note" } else { "Page" }.into(),
        reference: Some(format!("#{id}")),
        name: text(issue, "subject"),
        url,
        content: if is_comment {
            notes.map(|n| super::clip(n.trim(), 500))
        } else {
            None
        },
    };
    let mut a = Activity::new(
        verb,
        if is_comment {
            EventKind::Comment
        } else {
            EventKind::Issue
        },
        action,
        actor,
        object,
        &project,
    );
    a.case = Some(format!("{project}#{id}"));
    a.assignees = first_text(issue, &["assigned_to.name", "assignee.login"])
        .into_iter()
        .collect();
    a.labels = first_text(issue, &["tracker.name"]).into_iter().collect();
    a.private =
        truthy(at(issue, "is_private")) || journal.is_some_and(|j| truthy(at(j, "private_notes")));
    Ok(a)
}

fn plugin(p: &Value) -> Result<Normalized, DialectError> {
    let action = text(p, "action").ok_or(DialectError::Missing("payload.action"))?;
    let issue = at(p, "issue").ok_or(DialectError::Missing("payload.issue"))?;
    let journal = at(p, "journal");
    let (verb, actor) = match action.as_str() {
        "opened" => (Verb::Opened, person(at(issue, "author"))),
        "updated" => (
            journal_verb(issue, journal),
            person(journal.and_then(|j| at(j, "author"))),
        ),
        _ => return Ok(Normalized::Unknown(format!("payload.{action}"))),
    };
    let mut a = build(issue, journal, verb, &action, actor, None)?;
    if a.object.url.is_none() {
        a.object.url = text(p, "url");
    }
    a.published = first_text(issue, &["updated_on", "created_on"]);
    Ok(Normalized::Activity(Box::new(a)))
}
