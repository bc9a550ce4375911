//! A generic Activity Streams 2.0 document, for anything that can POST JSON.
//!
//! `to`/`cc` pick the audience: a group or project name (mapped to rooms like any project) or a
//! person (`xmpp:alice@example.org`, `acct:alice@example.org` or a bare JID), who then gets a direct
//! message. Without an audience, `target` names the project.

use serde_json::Value;

use super::{at, first_text, text, DialectError, Normalized};
use crate::activity::{Activity, Actor, EventKind, Object, Verb};

fn name_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        o @ Value::Object(_) => first_text(o, &["name", "preferredUsername", "id", "url"]),
        _ => None,
    }
}

fn audience(v: &Value, key: &str) -> Vec<String> {
    match at(v, key) {
        Some(Value::Array(a)) => a.iter().filter_map(|x| name_of(Some(x))).collect(),
        Some(x) => name_of(Some(x)).into_iter().collect(),
        None => vec![],
    }
}

/// Normalise a generic AS2 activity.
pub fn normalize(v: &Value) -> Result<Normalized, DialectError> {
    let kind = text(v, "type").ok_or(DialectError::Missing("type"))?;
    let object_v = at(v, "object");
    let object_type = object_v
        .and_then(|o| text(o, "type"))
        .unwrap_or_else(|| "Object".into());
    let verb = match (kind.as_str(), object_type.as_str()) {
        ("Create", "Note") => Verb::Commented,
        ("Create", _) => Verb::Opened,
        ("Update", _) => Verb::Edited,
        ("Delete", _) => Verb::Deleted,
        ("Add", _) => Verb::Pushed,
        ("Announce", _) => Verb::Other,
        _ => Verb::Other,
    };
    let event = if verb == Verb::Commented {
        EventKind::Comment
    } else {
        EventKind::Other
    };
    let actor_v = at(v, "actor");
    let actor = Actor {
        name: name_of(actor_v).unwrap_or_else(|| "someone".into()),
        login: actor_v.and_then(|a| text(a, "preferredUsername")),
        url: actor_v.and_then(|a| text(a, "url")),
    };
    let object = Object {
        kind: object_type,
        reference: object_v.and_then(|o| text(o, "caseroom:reference")),
        name: object_v
            .and_then(|o| first_text(o, &["name", "summary"]))
            .or_else(|| text(v, "summary")),
        url: object_v
            .and_then(|o| first_text(o, &["url", "id"]))
            .or_else(|| text(v, "url")),
        content: object_v
            .and_then(|o| text(o, "content"))
            .map(|c| super::clip(c.trim(), 500)),
    };
    let to = audience(v, "to");
    let cc = audience(v, "cc");
    let project = name_of(at(v, "target"))
        .or_else(|| to.iter().chain(cc.iter()).find(|a| !is_person(a)).cloned())
        .unwrap_or_default();
    let mut a = Activity::new(verb, event, &kind, actor, object, &project);
    a.case = object_v.and_then(|o| first_text(o, &["caseroom:case", "context", "inReplyTo"]));
    a.published = text(v, "published");
    a.to = to;
    a.cc = cc;
    Ok(Normalized::Activity(Box::new(a)))
}

/// An audience entry naming a person (who gets a direct message) rather than a group.
pub fn is_person(entry: &str) -> bool {
    person_jid(entry).is_some()
}

/// The bare JID of a person audience entry: `xmpp:a@b`, `acct:a@b`, `mailto:`-less `a@b`.
pub fn person_jid(entry: &str) -> Option<String> {
    let e = entry
        .strip_prefix("xmpp:")
        .or_else(|| entry.strip_prefix("acct:"))
        .unwrap_or(entry);
    if e.contains("://") || !e.contains('@') {
        return None;
    }
    e.parse::<xmpp_parsers::jid::BareJid>()
        .ok()
        .map(|j| j.to_string())
}
