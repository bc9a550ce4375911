//! The Activity: one tracker event, normalised to an Activity Streams 2.0 subset.
//!
//! Every dialect (`webhook::*`) produces one of these; `render` turns it into a message body and the
//! XEP-0335 JSON payload. AS2 has no "close" or "merge", so the AS2 `type` is the nearest core type
//! (Create, Update, Add, Announce, …) and caseroom's own `verb` says exactly what happened.

use serde_json::Value;

/// What happened, precisely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// A case (issue, pull/merge request) was opened.
    Opened,
    /// Closed (not merged).
    Closed,
    /// Reopened.
    Reopened,
    /// Edited (title, description, fields, status change).
    Edited,
    /// Assigned to someone.
    Assigned,
    /// Labels changed.
    Labeled,
    /// A comment was added.
    Commented,
    /// Commits were pushed.
    Pushed,
    /// A pull/merge request was merged.
    Merged,
    /// A release was published.
    Released,
    /// A CI run finished successfully.
    Succeeded,
    /// A CI run failed.
    Failed,
    /// Deleted.
    Deleted,
    /// A draft pull/merge request was marked ready for review.
    ReadyForReview,
    /// A pull/merge request was turned (back) into a draft.
    ConvertedToDraft,
    /// Someone was asked to review (see [`Activity::reviewers`]).
    ReviewRequested,
    /// A review request was withdrawn.
    ReviewRequestRemoved,
    /// A pre-release was published.
    Prereleased,
    /// Anything else the dialect understood but has no verb for.
    Other,
}

impl Verb {
    /// The word used in bodies and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Opened => "opened",
            Verb::Closed => "closed",
            Verb::Reopened => "reopened",
            Verb::Edited => "edited",
            Verb::Assigned => "assigned",
            Verb::Labeled => "labeled",
            Verb::Commented => "commented on",
            Verb::Pushed => "pushed",
            Verb::Merged => "merged",
            Verb::Released => "released",
            Verb::Succeeded => "succeeded",
            Verb::Failed => "failed",
            Verb::Deleted => "deleted",
            Verb::ReadyForReview => "marked as ready for review",
            Verb::ConvertedToDraft => "converted to draft",
            Verb::ReviewRequested => "requested a review of",
            Verb::ReviewRequestRemoved => "withdrew the review request for",
            Verb::Prereleased => "pre-released",
            Verb::Other => "updated",
        }
    }

    /// The AS2 activity type.
    pub fn as2_type(self) -> &'static str {
        match self {
            Verb::Opened | Verb::Commented | Verb::Released | Verb::Prereleased => "Create",
            Verb::Pushed => "Add",
            Verb::Succeeded | Verb::Failed => "Announce",
            Verb::Deleted => "Delete",
            _ => "Update",
        }
    }
}

/// The kind of event, for filters (`event = "push"` in a room filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Issues and tickets.
    Issue,
    /// Comments on issues or pull requests.
    Comment,
    /// Pushes.
    Push,
    /// Pull or merge requests.
    PullRequest,
    /// Releases.
    Release,
    /// CI pipelines / workflow runs.
    Ci,
    /// Anything else (wiki, news, …).
    Other,
}

impl EventKind {
    /// Filter name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Issue => "issue",
            EventKind::Comment => "comment",
            EventKind::Push => "push",
            EventKind::PullRequest => "pull_request",
            EventKind::Release => "release",
            EventKind::Ci => "ci",
            EventKind::Other => "other",
        }
    }

    /// Parse a filter name.
    pub fn parse(s: &str) -> Option<EventKind> {
        Some(match s {
            "issue" | "issues" => EventKind::Issue,
            "comment" | "comments" => EventKind::Comment,
            "push" => EventKind::Push,
            "pull_request" | "merge_request" | "pr" | "mr" => EventKind::PullRequest,
            "release" => EventKind::Release,
            "ci" | "pipeline" | "workflow_run" => EventKind::Ci,
            "other" => EventKind::Other,
            _ => return None,
        })
    }
}

/// Who did it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Actor {
    /// Display name (or login when there is none).
    pub name: String,
    /// Login / username, when the tracker gives one.
    pub login: Option<String>,
    /// Profile URL.
    pub url: Option<String>,
}

/// What it happened to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object {
    /// AS2 object type: Page (issue), Note (comment), Commit, Release, Application (pipeline), …
    pub kind: String,
    /// Human reference: "#42", "BUG-15", "!7".
    pub reference: Option<String>,
    /// Title / summary.
    pub name: Option<String>,
    /// Link.
    pub url: Option<String>,
    /// Text content (comment body, commit message), trimmed.
    pub content: Option<String>,
}

/// One normalised event.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    /// Precise verb.
    pub verb: Verb,
    /// Event kind (for filters).
    pub event: EventKind,
    /// The tracker's own action word (e.g. GitHub `labeled`, GitLab `open`), for filters.
    pub action: String,
    /// Who.
    pub actor: Actor,
    /// What.
    pub object: Object,
    /// Where: the project / repository full name (`acme/web`, `BUG`, `test`).
    pub project: String,
    /// Project URL.
    pub project_url: Option<String>,
    /// The case this belongs to (for threads): "acme/web#42"; none for pushes and CI.
    pub case: Option<String>,
    /// Branch (pushes, CI).
    pub branch: Option<String>,
    /// Labels of the case.
    pub labels: Vec<String>,
    /// Who it is assigned to (names).
    pub assignees: Vec<String>,
    /// Who is asked to review, or no longer (logins, or team names): named in the message so
    /// that their client highlights it.
    pub reviewers: Vec<String>,
    /// Number of commits (pushes).
    pub commits: Option<u64>,
    /// When, as given by the tracker (ISO 8601), if it says.
    pub published: Option<String>,
    /// Private/confidential content: never posted to rooms.
    pub private: bool,
    /// AS2 audience (generic AS2 input): groups, projects, persons.
    pub to: Vec<String>,
    /// AS2 secondary audience.
    pub cc: Vec<String>,
}

impl Activity {
    /// A new activity with the required parts; the rest empty.
    pub fn new(
        verb: Verb,
        event: EventKind,
        action: &str,
        actor: Actor,
        object: Object,
        project: &str,
    ) -> Activity {
        Activity {
            verb,
            event,
            action: action.to_owned(),
            actor,
            object,
            project: project.to_owned(),
            project_url: None,
            case: None,
            branch: None,
            labels: vec![],
            assignees: vec![],
            reviewers: vec![],
            commits: None,
            published: None,
            private: false,
            to: vec![],
            cc: vec![],
        }
    }

    /// What the actor did, as the summary and the room message say it: a comment edited or
    /// deleted says so ("deleted a comment on #1"), not "deleted #1".
    pub fn verb_phrase(&self) -> &'static str {
        match (self.event, self.verb) {
            (EventKind::Comment, Verb::Edited) => "edited a comment on",
            (EventKind::Comment, Verb::Deleted) => "deleted a comment on",
            (EventKind::Release, Verb::Edited) => "edited the release",
            (EventKind::Release, Verb::Deleted) => "deleted the release",
            (_, v) => v.as_str(),
        }
    }

    /// One-line plain summary (also the AS2 `summary`).
    pub fn summary(&self) -> String {
        let mut s = format!("{} {}", self.actor.name, self.verb_phrase());
        match self.event {
            EventKind::Push => {
                let n = self.commits.unwrap_or(0);
                s.push_str(&format!(" {n} commit{}", if n == 1 { "" } else { "s" }));
                if let Some(b) = &self.branch {
                    s.push_str(&format!(" to {b}"));
                }
            }
            EventKind::Ci => {
                s = format!(
                    "{} {}{}",
                    self.object.name.as_deref().unwrap_or("CI"),
                    self.verb.as_str(),
                    self.branch
                        .as_deref()
                        .map(|b| format!(" on {b}"))
                        .unwrap_or_default()
                );
            }
            _ => {
                if let Some(r) = &self.object.reference {
                    s.push(' ');
                    s.push_str(r);
                }
                if let Some(n) = &self.object.name {
                    s.push_str(&format!(" \"{n}\""));
                }
            }
        }
        s
    }

    /// The Activity as AS2 JSON-LD.
    pub fn to_json(&self, tracker: &str) -> Value {
        serde_json::to_value(self.as2(tracker)).unwrap_or(Value::Null)
    }

    /// The Activity as AS2 JSON-LD text, written straight from the Activity (no [`Value`] built
    /// and dropped for every event): the same text as `to_json(tracker).to_string()`.
    pub fn to_json_text(&self, tracker: &str) -> String {
        // Serialising borrowed strings into a `Vec` cannot fail.
        serde_json::to_string(&self.as2(tracker)).unwrap_or_default()
    }

    fn as2<'a>(&'a self, tracker: &'a str) -> As2<'a> {
        let o = &self.object;
        let s = |v: &'a Option<String>| v.as_deref();
        As2 {
            context: (
                AS2_CONTEXT,
                Prefixes {
                    caseroom: "urn:caseroom:",
                },
            ),
            actor: As2Party {
                name: &self.actor.name,
                preferred_username: s(&self.actor.login),
                kind: "Person",
                url: s(&self.actor.url),
            },
            action: &self.action,
            assignees: &self.assignees,
            branch: s(&self.branch),
            case: s(&self.case),
            commits: self.commits,
            event: self.event.as_str(),
            labels: &self.labels,
            reviewers: &self.reviewers,
            tracker,
            verb: self.verb.as_str(),
            cc: &self.cc,
            object: As2Object {
                reference: s(&o.reference),
                content: s(&o.content),
                name: s(&o.name),
                kind: &o.kind,
                url: s(&o.url),
            },
            published: s(&self.published),
            summary: self.summary(),
            target: As2Party {
                name: &self.project,
                preferred_username: None,
                kind: "Group",
                url: s(&self.project_url),
            },
            to: &self.to,
            kind: self.verb.as2_type(),
            url: s(&o.url),
        }
    }
}

const AS2_CONTEXT: &str = "https://www.w3.org/ns/activitystreams";

// The AS2 document. Fields are declared in the byte order of their keys, the order in which
// serde_json's `Map` (a `BTreeMap`) holds them, so that the text written straight from these is
// the text of `to_json`'s `Value` (`as2_text_is_the_value_text` holds them to it).
#[derive(serde::Serialize)]
struct As2<'a> {
    #[serde(rename = "@context")]
    context: (&'static str, Prefixes),
    actor: As2Party<'a>,
    #[serde(rename = "caseroom:action")]
    action: &'a str,
    #[serde(rename = "caseroom:assignees", skip_serializing_if = "<[_]>::is_empty")]
    assignees: &'a [String],
    #[serde(rename = "caseroom:branch", skip_serializing_if = "Option::is_none")]
    branch: Option<&'a str>,
    #[serde(rename = "caseroom:case", skip_serializing_if = "Option::is_none")]
    case: Option<&'a str>,
    #[serde(rename = "caseroom:commits", skip_serializing_if = "Option::is_none")]
    commits: Option<u64>,
    #[serde(rename = "caseroom:event")]
    event: &'static str,
    #[serde(rename = "caseroom:labels", skip_serializing_if = "<[_]>::is_empty")]
    labels: &'a [String],
    #[serde(rename = "caseroom:reviewers", skip_serializing_if = "<[_]>::is_empty")]
    reviewers: &'a [String],
    #[serde(rename = "caseroom:tracker")]
    tracker: &'a str,
    #[serde(rename = "caseroom:verb")]
    verb: &'static str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    cc: &'a [String],
    object: As2Object<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    published: Option<&'a str>,
    summary: String,
    target: As2Party<'a>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    to: &'a [String],
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct Prefixes {
    caseroom: &'static str,
}

/// The actor (a Person) or the target (a Group, without a username).
#[derive(serde::Serialize)]
struct As2Party<'a> {
    name: &'a str,
    #[serde(rename = "preferredUsername", skip_serializing_if = "Option::is_none")]
    preferred_username: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct As2Object<'a> {
    #[serde(rename = "caseroom:reference", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    /// The AS2 document built key by key into a `Value`, as `to_json` did before it was written
    /// from [`As2`]: the reference both are held to.
    fn by_hand(a: &Activity, tracker: &str) -> Value {
        let put = |map: &mut Map<String, Value>, key: &str, v: &Option<String>| {
            if let Some(v) = v {
                map.insert(key.into(), json!(v));
            }
        };
        let mut obj = Map::new();
        obj.insert("type".into(), json!(a.object.kind));
        put(&mut obj, "name", &a.object.name);
        put(&mut obj, "url", &a.object.url);
        put(&mut obj, "content", &a.object.content);
        put(&mut obj, "caseroom:reference", &a.object.reference);
        let mut actor = Map::new();
        actor.insert("type".into(), json!("Person"));
        actor.insert("name".into(), json!(a.actor.name));
        put(&mut actor, "preferredUsername", &a.actor.login);
        put(&mut actor, "url", &a.actor.url);
        let mut target = Map::new();
        target.insert("type".into(), json!("Group"));
        target.insert("name".into(), json!(a.project));
        put(&mut target, "url", &a.project_url);
        let mut out = Map::new();
        out.insert(
            "@context".into(),
            json!(["https://www.w3.org/ns/activitystreams", {"caseroom": "urn:caseroom:"}]),
        );
        out.insert("type".into(), json!(a.verb.as2_type()));
        out.insert("summary".into(), json!(a.summary()));
        out.insert("actor".into(), Value::Object(actor));
        out.insert("object".into(), Value::Object(obj));
        out.insert("target".into(), Value::Object(target));
        put(&mut out, "url", &a.object.url);
        put(&mut out, "published", &a.published);
        for (key, list) in [
            ("to", &a.to),
            ("cc", &a.cc),
            ("caseroom:labels", &a.labels),
            ("caseroom:reviewers", &a.reviewers),
            ("caseroom:assignees", &a.assignees),
        ] {
            if !list.is_empty() {
                out.insert(key.into(), json!(list));
            }
        }
        out.insert("caseroom:tracker".into(), json!(tracker));
        out.insert("caseroom:verb".into(), json!(a.verb.as_str()));
        out.insert("caseroom:event".into(), json!(a.event.as_str()));
        out.insert("caseroom:action".into(), json!(a.action));
        put(&mut out, "caseroom:case", &a.case);
        put(&mut out, "caseroom:branch", &a.branch);
        if let Some(n) = a.commits {
            out.insert("caseroom:commits".into(), json!(n));
        }
        Value::Object(out)
    }

    fn bare() -> Activity {
        Activity::new(
            Verb::Pushed,
            EventKind::Push,
            "push",
            Actor {
                name: "Ann \"the\" <Dev>".into(),
                login: None,
                url: None,
            },
            Object {
                kind: "Collection".into(),
                reference: None,
                name: None,
                url: None,
                content: None,
            },
            "acme/web",
        )
    }

    #[test]
    fn as2_text_is_the_value_text_with_every_part_and_with_none() {
        let mut full = bare();
        full.verb = Verb::Opened;
        full.event = EventKind::Issue;
        full.actor.login = Some("ann".into());
        full.actor.url = Some("https://forge/ann".into());
        full.object = Object {
            kind: "Page".into(),
            reference: Some("#7".into()),
            name: Some("Crash on \u{2028} and \\ \"quotes\"".into()),
            url: Some("https://forge/acme/web/issues/7".into()),
            content: Some("line\nnext\ttab".into()),
        };
        full.project_url = Some("https://forge/acme/web".into());
        full.case = Some("acme/web#7".into());
        full.branch = Some("main".into());
        full.labels = vec!["bug".into(), "ünïcode".into()];
        full.assignees = vec!["Bo".into()];
        full.reviewers = vec!["cy".into(), "team/x".into()];
        full.commits = Some(3);
        full.published = Some("2026-12-07T20:00:00Z".into());
        full.to = vec!["https://forge/acme".into()];
        full.cc = vec!["https://forge/ann/followers".into()];
        for a in [bare(), full] {
            let want = by_hand(&a, "forge");
            assert_eq!(a.to_json("forge"), want);
            assert_eq!(a.to_json_text("forge"), want.to_string());
        }
    }
}
