//! Tracker webhooks: authenticity, delivery ids, and one dialect module per tracker → [`Activity`].
//!
//! Pure: the HTTP side (`crate::http`) hands in raw bytes and headers; nothing here does IO.

pub mod activitystreams;
pub mod github;
pub mod gitlab;
pub mod jira;
pub mod redmine;
pub mod verify;

use serde::Deserialize;
use serde_json::Value;

use crate::activity::Activity;

/// Which dialect a tracker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackerKind {
    /// GitHub (and GitHub Enterprise).
    Github,
    /// Gitea.
    Gitea,
    /// Forgejo.
    Forgejo,
    /// GitLab.
    Gitlab,
    /// Jira (Cloud or Server).
    Jira,
    /// Redmine ≥ 7 native webhooks, caseroom's Redmine plugin, or the redmine_webhook plugin.
    Redmine,
    /// A generic Activity Streams 2.0 document.
    Activitystreams,
}

impl TrackerKind {
    /// Name as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackerKind::Github => "github",
            TrackerKind::Gitea => "gitea",
            TrackerKind::Forgejo => "forgejo",
            TrackerKind::Gitlab => "gitlab",
            TrackerKind::Jira => "jira",
            TrackerKind::Redmine => "redmine",
            TrackerKind::Activitystreams => "activitystreams",
        }
    }
}

/// Request headers, looked up case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// First value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Build from pairs (tests, fixtures).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Headers {
        Headers(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

/// What a delivery turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    /// An event to post.
    Activity(Box<Activity>),
    /// A liveness check (GitHub `ping`): answered, not posted.
    Ping,
    /// An event we accept and record but do not post; the string names it.
    Unknown(String),
}

/// Why a body could not be understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DialectError {
    /// Not JSON (or not a form with a `payload` field).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// JSON, but a field every event of this kind has is missing.
    #[error("missing field {0}")]
    Missing(&'static str),
}

/// The JSON document of a delivery (the body itself, or the `payload=` field of a form post), with
/// only the object keys dialects read ([`KEYS_READ`]).
pub fn parse_body(content_type: Option<&str>, body: &[u8]) -> Result<Value, DialectError> {
    let is_form = content_type.is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        std::str::from_utf8(body)
            .map_err(|e| DialectError::Json(format!("form body is not UTF-8: {e}")))?;
        let (_, json) = form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .ok_or_else(|| DialectError::Json("form body has no payload= field".into()))?;
        read_doc(&mut serde_json::Deserializer::from_str(&json))
    } else {
        read_doc(&mut serde_json::Deserializer::from_slice(body))
    }
}

/// Every object key a dialect reads (through [`at`] and the helpers over it), by length, then
/// bytewise for the reader (the lookup is a hash set, [`key_read`]). A delivery's document is built
/// with these keys only ([`parse_body`], by the HTTP handler); every other key's value is checked for syntax and skipped. A 13.5 KB GitHub
/// delivery has 249 keys, 105 of them URLs no dialect shows: building them all into a `Value` of
/// B-tree maps was most of the runtime thread's work per delivery (BENCHMARKS.md §5, stop 28).
///
/// A key missing here reads as absent. The guard is `tests/webhooks.rs`: every fixture must
/// normalise the same from the whole document as from the kept one, so a dialect reading a new
/// key fails it until the key is added. A few entries are read only in shapes no fixture has;
/// keeping an unneeded key costs little.
pub const KEYS_READ: &[&str] = &[
    "cc",
    "id",
    "to",
    "iid",
    "key",
    "ref",
    "tag",
    "url",
    "base",
    "body",
    "data",
    "name",
    "note",
    "push",
    "self",
    "team",
    "type",
    "user",
    "actor",
    "after",
    "draft",
    "field",
    "issue",
    "items",
    "label",
    "login",
    "notes",
    "title",
    "action",
    "author",
    "before",
    "branch",
    "commit",
    "fields",
    "issues",
    "labels",
    "member",
    "merged",
    "number",
    "object",
    "pusher",
    "sender",
    "status",
    "target",
    "update",
    "changes",
    "comment",
    "commits",
    "compare",
    "content",
    "context",
    "created",
    "current",
    "deleted",
    "details",
    "is_pull",
    "journal",
    "message",
    "payload",
    "project",
    "release",
    "subject",
    "summary",
    "tracker",
    "updated",
    "web_url",
    "assignee",
    "html_url",
    "lastname",
    "pipeline",
    "previous",
    "prop_key",
    "security",
    "tag_name",
    "toString",
    "username",
    "workflow",
    "accountId",
    "assignees",
    "changelog",
    "firstname",
    "full_name",
    "inReplyTo",
    "is_closed",
    "jsdPublic",
    "published",
    "reviewers",
    "status_id",
    "timestamp",
    "user_name",
    "work_item",
    "conclusion",
    "created_at",
    "created_on",
    "event_name",
    "fromString",
    "identifier",
    "is_private",
    "membership",
    "prerelease",
    "repository",
    "run_number",
    "updated_at",
    "updated_on",
    "visibility",
    "assigned_to",
    "compare_url",
    "description",
    "displayName",
    "head_branch",
    "head_commit",
    "object_kind",
    "confidential",
    "organization",
    "published_at",
    "pull_request",
    "updateAuthor",
    "webhookEvent",
    "workflow_run",
    "caseroom:case",
    "display_title",
    "merge_request",
    "noteable_type",
    "private_notes",
    "target_branch",
    "total_commits",
    "user_username",
    "assigned_to_id",
    "requested_team",
    "object_attributes",
    "preferredUsername",
    "caseroom:reference",
    "requested_reviewer",
    "path_with_namespace",
    "total_commits_count",
    "issue_event_type_name",
];

/// Does a dialect read this key? A hash set with rustc's hasher: one hash of a short key and one
/// comparison. The binary search over [`KEYS_READ`] before it made about eight comparisons for each
/// of a delivery's keys, a third of the document's parse (BENCHMARKS.md §5, stop 29).
fn key_read(k: &str) -> bool {
    static SET: std::sync::LazyLock<rustc_hash::FxHashSet<&'static str>> =
        std::sync::LazyLock::new(|| KEYS_READ.iter().copied().collect());
    SET.contains(k)
}

/// A JSON document with only [`KEYS_READ`] kept in its objects (arrays whole), from `de`, which
/// must hold nothing after it.
fn read_doc<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
) -> Result<Value, DialectError> {
    let fail = |e: serde_json::Error| DialectError::Json(e.to_string());
    let v = serde::de::DeserializeSeed::deserialize(ReadKeys, &mut *de).map_err(fail)?;
    de.end().map_err(fail)?;
    Ok(v)
}

/// Deserialises a [`Value`] keeping only the keys dialects read.
#[derive(Clone, Copy)]
struct ReadKeys;

impl<'de> serde::de::DeserializeSeed<'de> for ReadKeys {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ReadKeys {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(n.into())
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(n.into())
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: a number JSON cannot hold (it never parses one) is null.
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key_read(&key.0) {
                let v = map.next_value_seed(self)?;
                out.insert(key.0.into_owned(), v);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }
}

/// An object key, borrowed from the body when it has no escapes (most are skipped: no copy).
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(s.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(s.to_owned().into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(s.into()))
            }
        }
        d.deserialize_str(V)
    }
}

/// Is this delivery a liveness ping (answered, never stored)? Only GitHub sends them, by header.
pub fn is_ping(kind: TrackerKind, h: &Headers) -> bool {
    kind == TrackerKind::Github && h.get("X-GitHub-Event") == Some("ping")
}

/// The delivery id used to deduplicate, or `None` (then only the body deduplicates).
///
/// Headers are not covered by any tracker's signature, so an id taken from a header only tells
/// retries of one delivery apart; replaying a captured body under a fresh id is caught by the body
/// hash (see `Store::accept`). Redmine's ids are shared with the catch-up poller, so they must not be
/// claimable from outside: they are derived from the (signed) body — the journal or issue it is
/// about — never from `X-Caseroom-Delivery`.
pub fn delivery_id(kind: TrackerKind, h: &Headers, body: &[u8]) -> Option<String> {
    let v = match kind {
        TrackerKind::Github => h.get("X-GitHub-Delivery"),
        TrackerKind::Gitea => h
            .get("X-Gitea-Delivery")
            .or_else(|| h.get("X-GitHub-Delivery")),
        TrackerKind::Forgejo => h
            .get("X-Forgejo-Delivery")
            .or_else(|| h.get("X-Gitea-Delivery")),
        // Idempotency-Key is stable across retries (GitLab 17.4+); the event UUID before that.
        TrackerKind::Gitlab => h
            .get("Idempotency-Key")
            .or_else(|| h.get("X-Gitlab-Event-UUID")),
        TrackerKind::Jira => h.get("X-Atlassian-Webhook-Identifier"),
        TrackerKind::Redmine => return redmine_delivery_id(body),
        TrackerKind::Activitystreams => h.get("X-Caseroom-Delivery"),
    };
    v.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(200).collect())
}

/// `redmine:journal:<id>` or `redmine:issue:<id>:created`, from any of Redmine's three shapes.
fn redmine_delivery_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Change {
        action: Option<String>,
        issue: Option<Id>,
        journal: Option<Id>,
    }
    #[derive(serde::Deserialize)]
    struct Delivery {
        #[serde(rename = "type")]
        kind: Option<String>,
        data: Option<Change>,
        payload: Option<Change>,
    }
    let d: Delivery = serde_json::from_slice(body).ok()?;
    let (created, change) = match (d.data, d.payload) {
        (Some(c), _) => (d.kind.as_deref() == Some("issue.created"), c),
        (None, Some(c)) => (c.action.as_deref() == Some("opened"), c),
        (None, None) => return None,
    };
    if let Some(j) = change.journal.and_then(|j| j.id) {
        return Some(format!("redmine:journal:{j}"));
    }
    let issue = change.issue.and_then(|i| i.id)?;
    created.then(|| format!("redmine:issue:{issue}:created"))
}

/// The event name, for logs and for recording unknown events.
pub fn event_name(kind: TrackerKind, h: &Headers, body: &Value) -> String {
    let header = match kind {
        TrackerKind::Github => h.get("X-GitHub-Event"),
        TrackerKind::Gitea => h.get("X-Gitea-Event"),
        TrackerKind::Forgejo => h.get("X-Forgejo-Event").or_else(|| h.get("X-Gitea-Event")),
        TrackerKind::Gitlab => h.get("X-Gitlab-Event"),
        _ => None,
    };
    if let Some(e) = header {
        return e.to_owned();
    }
    for path in ["webhookEvent", "type", "payload.action", "object_kind"] {
        if let Some(s) = text(body, path) {
            return s;
        }
    }
    "unknown".into()
}

/// Does this delivery say that a project's members (or the projects themselves) changed? Then the
/// tracker's groups are synced at once. GitHub/Gitea/Forgejo: `member`, `membership`, `team`,
/// `team_add`, `organization`, `repository` events; GitLab: group/project member events and the
/// system hooks' `user_*_team`, `user_*_group` and `project_*` events (by `event_name`).
pub fn changes_membership(kind: TrackerKind, h: &Headers, body: &Value) -> bool {
    match kind {
        TrackerKind::Github | TrackerKind::Gitea | TrackerKind::Forgejo => matches!(
            event_name(kind, h, body).as_str(),
            "member" | "membership" | "team" | "team_add" | "organization" | "repository"
        ),
        TrackerKind::Gitlab => {
            let ev = text(body, "event_name").unwrap_or_default();
            h.get("X-Gitlab-Event") == Some("Member Hook")
                || [
                    "user_add_to_",
                    "user_remove_from_",
                    "user_update_for_",
                    "project_",
                ]
                .iter()
                .any(|p| ev.starts_with(p))
                    && !ev.starts_with("project_update") // not a membership change
        }
        _ => false,
    }
}

/// Normalise one delivery.
pub fn normalize(kind: TrackerKind, h: &Headers, body: &Value) -> Result<Normalized, DialectError> {
    match kind {
        TrackerKind::Github | TrackerKind::Gitea | TrackerKind::Forgejo => {
            github::normalize(kind, h, body)
        }
        TrackerKind::Gitlab => gitlab::normalize(h, body),
        TrackerKind::Jira => jira::normalize(body),
        TrackerKind::Redmine => redmine::normalize(body),
        TrackerKind::Activitystreams => activitystreams::normalize(body),
    }
}

/// A value at a dotted path (`issue.user.login`; numeric parts index arrays).
pub fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => cur.get(i)?,
            Err(_) => cur.get(part)?,
        };
    }
    if cur.is_null() {
        None
    } else {
        Some(cur)
    }
}

/// A string (or number, as text) at a path; empty strings count as absent.
pub fn text(v: &Value, path: &str) -> Option<String> {
    match at(v, path)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first of several paths that has text.
pub fn first_text(v: &Value, paths: &[&str]) -> Option<String> {
    paths.iter().find_map(|p| text(v, p))
}

/// `names` of an array of objects at `path` (labels, assignees).
pub fn names(v: &Value, path: &str, field: &str) -> Vec<String> {
    at(v, path)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| text(x, field)).collect())
        .unwrap_or_default()
}

/// The branch or tag of a git ref (`refs/heads/main` → `main`, `refs/tags/v1` → `v1`).
pub fn branch_of(reference: &str) -> String {
    reference
        .strip_prefix("refs/heads/")
        .or_else(|| reference.strip_prefix("refs/tags/"))
        .unwrap_or(reference)
        .to_owned()
}

/// First line of a text, at most `max` characters, for bodies.
pub fn first_line(s: &str, max: usize) -> String {
    let line = s
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    clip(line, max)
}

/// At most `max` characters, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jira_restricted_comments_and_secured_issues_are_private() {
        let real = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/jira/comment_created.json"
        ))
        .expect("fixture");
        let base: Value = serde_json::from_slice(&real).expect("json");
        let private_of = |v: &Value| match jira::normalize(v) {
            Ok(Normalized::Activity(a)) => a.private,
            other => panic!("expected an activity, got {other:?}"),
        };
        assert!(!private_of(&base), "the fixture as published is public");
        let mut restricted = base.clone();
        restricted["comment"]["visibility"] =
            serde_json::json!({"type": "role", "value": "Administrators"});
        assert!(private_of(&restricted));
        let mut internal = base.clone();
        internal["comment"]["jsdPublic"] = Value::Bool(false);
        assert!(private_of(&internal));
        let mut secured = base;
        secured["issue"]["fields"]["security"] =
            serde_json::json!({"id": "10000", "name": "Staff only"});
        assert!(private_of(&secured));
    }

    #[test]
    fn redmine_delivery_ids_come_from_the_body_not_the_header() {
        let forged = Headers(vec![(
            "x-caseroom-delivery".into(),
            "redmine:journal:999".into(),
        )]);
        let native = br#"{"type":"issue.updated","data":{"issue":{"id":7},"journal":{"id":42}}}"#;
        assert_eq!(
            delivery_id(TrackerKind::Redmine, &forged, native).as_deref(),
            Some("redmine:journal:42")
        );
        let created = br#"{"type":"issue.created","data":{"issue":{"id":7}}}"#;
        assert_eq!(
            delivery_id(TrackerKind::Redmine, &forged, created).as_deref(),
            Some("redmine:issue:7:created")
        );
        // The redmine_webhook plugin's real payload (fixtures/redmine): an opened issue.
        let plugin = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/redmine/webhook-plugin.issue_opened.json"
        ))
        .expect("fixture");
        let id = delivery_id(TrackerKind::Redmine, &forged, &plugin).expect("an id");
        assert!(
            id.starts_with("redmine:issue:") && id.ends_with(":created"),
            "{id}"
        );
        // Nothing to go by: no id (the body hash still deduplicates).
        let other = br#"{"type":"issue.deleted","data":{"issue":{"id":7}}}"#;
        assert_eq!(delivery_id(TrackerKind::Redmine, &forged, other), None);
    }

    use super::*;

    #[test]
    fn membership_events_are_recognised() {
        let h = |k: &str, v: &str| Headers(vec![(k.to_owned(), v.to_owned())]);
        let none = serde_json::json!({});
        let team_add = serde_json::json!({"event_name": "user_add_to_team"});
        // A real issue event (fixture) is not one.
        let issue: Value = serde_json::from_str(include_str!("../../fixtures/gitlab/issue.json"))
            .expect("fixture");
        let cases = [
            (TrackerKind::Github, "X-GitHub-Event", "member", &none, true),
            (
                TrackerKind::Gitea,
                "X-Gitea-Event",
                "repository",
                &none,
                true,
            ),
            (TrackerKind::Gitea, "X-Gitea-Event", "issues", &none, false),
            (
                TrackerKind::Gitlab,
                "X-Gitlab-Event",
                "System Hook",
                &team_add,
                true,
            ),
            (
                TrackerKind::Gitlab,
                "X-Gitlab-Event",
                "Member Hook",
                &none,
                true,
            ),
            (
                TrackerKind::Gitlab,
                "X-Gitlab-Event",
                "Issue Hook",
                &issue,
                false,
            ),
            (
                TrackerKind::Redmine,
                "X-GitHub-Event",
                "member",
                &none,
                false,
            ),
        ];
        for (kind, header, event, body, expected) in cases {
            assert_eq!(
                changes_membership(kind, &h(header, event), body),
                expected,
                "{kind:?} {header}: {event}"
            );
        }
    }

    #[test]
    fn keys_read_are_listed_once_in_order_and_each_is_found() {
        assert!(
            KEYS_READ
                .windows(2)
                .all(|w| (w[0].len(), w[0]) < (w[1].len(), w[1])),
            "by length then bytes, no repeats"
        );
        assert!(KEYS_READ.iter().all(|k| key_read(k)));
        assert!(!key_read("node_id") && !key_read("comments_url"));
    }

    #[test]
    fn form_payload_is_decoded() {
        // (`action`: the document keeps only keys dialects read, KEYS_READ.)
        let v = parse_body(
            Some("application/x-www-form-urlencoded"),
            b"payload=%7B%22action%22%3A+%22b+c%22%7D",
        )
        .expect("form");
        assert_eq!(v["action"], "b c");
        assert!(parse_body(Some("application/x-www-form-urlencoded"), b"x=1").is_err());
        assert!(parse_body(Some("application/json"), b"{not json").is_err());
        // A malformed escape is not a byte: `%+5` is `%` and a space (WHATWG), not 0x05.
        let v = parse_body(
            Some("application/x-www-form-urlencoded"),
            b"other=1&payload=%7B%22action%22%3A%22x%+5y%22%7D&payload=%7B%7D",
        )
        .expect("form");
        assert_eq!(
            v["action"], "x% 5y",
            "the first payload field; + is a space, a bad escape stays"
        );
    }

    #[test]
    fn paths() {
        let v: Value = serde_json::json!({"a": {"b": [{"c": "x"}, {"c": 3}]}, "e": ""});
        assert_eq!(text(&v, "a.b.0.c").as_deref(), Some("x"));
        assert_eq!(text(&v, "a.b.1.c").as_deref(), Some("3"));
        assert_eq!(text(&v, "e"), None);
        assert_eq!(names(&v, "a.b", "c"), vec!["x", "3"]);
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}
