//! The Activity: one tracker event, normalised to an Activity Streams 2.0 subset.
//!
//! Every dialect (`webhook::*`) produces one of these; `render` turns it into a message body and the
//! XEP-0335 JSON payload. AS2 has no "close" or "merge", so the AS2 `type` is the nearest core type
//! (Create, Update, Add, Announce, …) and caseroom's own `verb` says exactly what happened.

use serde_json::{json, Map, Value};

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
        let mut obj = Map::new();
        obj.insert("type".into(), json!(self.object.kind));
        put(&mut obj, "name", &self.object.name);
        put(&mut obj, "url", &self.object.url);
        put(&mut obj, "content", &self.object.content);
        if let Some(r) = &self.object.reference {
            obj.insert("caseroom:reference".into(), json!(r));
        }
        let mut actor = Map::new();
        actor.insert("type".into(), json!("Person"));
        actor.insert("name".into(), json!(self.actor.name));
        put(&mut actor, "preferredUsername", &self.actor.login);
        put(&mut actor, "url", &self.actor.url);
        let mut target = Map::new();
        target.insert("type".into(), json!("Group"));
        target.insert("name".into(), json!(self.project));
        put(&mut target, "url", &self.project_url);
        let mut out = Map::new();
        out.insert(
            "@context".into(),
            json!(["https://www.w3.org/ns/activitystreams", {"caseroom": "urn:caseroom:"}]),
        );
        out.insert("type".into(), json!(self.verb.as2_type()));
        out.insert("summary".into(), json!(self.summary()));
        out.insert("actor".into(), Value::Object(actor));
        out.insert("object".into(), Value::Object(obj));
        out.insert("target".into(), Value::Object(target));
        put(&mut out, "url", &self.object.url);
        put(&mut out, "published", &self.published);
        if !self.to.is_empty() {
            out.insert("to".into(), json!(self.to));
        }
        if !self.cc.is_empty() {
            out.insert("cc".into(), json!(self.cc));
        }
        out.insert("caseroom:tracker".into(), json!(tracker));
        out.insert("caseroom:verb".into(), json!(self.verb.as_str()));
        out.insert("caseroom:event".into(), json!(self.event.as_str()));
        out.insert("caseroom:action".into(), json!(self.action));
        put(&mut out, "caseroom:case", &self.case);
        put(&mut out, "caseroom:branch", &self.branch);
        if !self.labels.is_empty() {
            out.insert("caseroom:labels".into(), json!(self.labels));
        }
        if !self.reviewers.is_empty() {
            out.insert("caseroom:reviewers".into(), json!(self.reviewers));
        }
        if !self.assignees.is_empty() {
            out.insert("caseroom:assignees".into(), json!(self.assignees));
        }
        if let Some(n) = self.commits {
            out.insert("caseroom:commits".into(), json!(n));
        }
        Value::Object(out)
    }
}

fn put(map: &mut Map<String, Value>, key: &str, v: &Option<String>) {
    if let Some(v) = v {
        map.insert(key.into(), json!(v));
    }
}
