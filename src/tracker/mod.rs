//! Tracker clients behind one trait: list groups and members, create and change cases as a person.
//!
//! Only this module (and its children) talk HTTP to trackers (reqwest). Redmine is implemented;
//! Gitea/Forgejo and GitLab are the next clients.

pub mod redmine;

use std::future::Future;

/// Errors from a tracker, saying what it answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrackerError {
    /// Could not reach it (connection refused, timeout, DNS).
    #[error("the tracker is unreachable: {0}")]
    Unreachable(String),
    /// It refused: not allowed for this person (403), or the acting user is unknown/locked (412).
    #[error("the tracker refused: {0}")]
    Denied(String),
    /// No such case/project.
    #[error("not found: {0}")]
    NotFound(String),
    /// It rejected the data (422), with its reasons.
    #[error("the tracker rejected it: {0}")]
    Rejected(String),
    /// Anything else it answered.
    #[error("the tracker answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// An answer we could not read.
    #[error("unexpected answer from the tracker: {0}")]
    Protocol(String),
}

/// A project / group: becomes a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Stable identifier (Redmine project identifier): the room localpart.
    pub id: String,
    /// Display name: the room title.
    pub name: String,
    /// Description.
    pub description: String,
    /// Members with their roles.
    pub members: Vec<Member>,
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Login.
    pub login: String,
    /// Display name.
    pub name: String,
    /// Role names.
    pub roles: Vec<String>,
}

/// A case as the tracker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Number.
    pub number: u64,
    /// Title.
    pub title: String,
    /// Status name.
    pub status: String,
    /// Closed?
    pub closed: bool,
    /// Assignee display name.
    pub assignee: Option<String>,
    /// Author display name.
    pub author: String,
    /// Web link.
    pub url: String,
}

/// What `!new` asks for, after guessing.
#[derive(Debug, Clone, Default)]
pub struct NewCase {
    /// Group id.
    pub group: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Assignee login (already resolved).
    pub assignee: Option<String>,
    /// Case type / label (Redmine tracker name), already resolved.
    pub kind: Option<String>,
    /// Priority name, already resolved.
    pub priority: Option<String>,
}

/// The operations caseroom needs from a tracker. `as_login` is the person acting.
pub trait Tracker: Send + Sync {
    /// Every group with its members.
    fn groups(&self) -> impl Future<Output = Result<Vec<Group>, TrackerError>> + Send;
    /// Labels/types and priorities a group offers (for forgiving guesses).
    fn vocabulary(&self) -> impl Future<Output = Result<Vocabulary, TrackerError>> + Send;
    /// Create a case as `as_login`.
    fn create(
        &self,
        as_login: &str,
        case: &NewCase,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Comment as `as_login`.
    fn comment(
        &self,
        as_login: &str,
        number: u64,
        text: &str,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Close (or reopen) as `as_login`, with an optional note.
    fn set_closed(
        &self,
        as_login: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Assign to `assignee_login` as `as_login`.
    fn assign(
        &self,
        as_login: &str,
        number: u64,
        assignee_login: &str,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Read a case as `as_login`.
    fn get(
        &self,
        as_login: &str,
        number: u64,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Search open and closed cases of a group as `as_login`.
    fn search(
        &self,
        as_login: &str,
        group: &str,
        words: &str,
    ) -> impl Future<Output = Result<Vec<Case>, TrackerError>> + Send;
    /// Open cases assigned to `as_login`.
    fn mine(&self, as_login: &str) -> impl Future<Output = Result<Vec<Case>, TrackerError>> + Send;
}

/// Names a tracker offers for guesses.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    /// Case types (Redmine trackers: Bug, Feature, Support).
    pub kinds: Vec<String>,
    /// Priorities (Low, Normal, High, Urgent, Immediate).
    pub priorities: Vec<String>,
}

/// Closest candidate to what someone typed: exact (case-insensitive), then prefix, then substring, then
/// smallest edit distance within a third of the length. Returns the candidate.
pub fn nearest<'a>(typed: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let t = typed.to_lowercase();
    let cands: Vec<&str> = candidates.into_iter().collect();
    if let Some(c) = cands.iter().find(|c| c.to_lowercase() == t) {
        return Some(c);
    }
    if let Some(c) = cands.iter().find(|c| c.to_lowercase().starts_with(&t)) {
        return Some(c);
    }
    if let Some(c) = cands.iter().find(|c| c.to_lowercase().contains(&t)) {
        return Some(c);
    }
    cands
        .iter()
        .map(|c| (c, crate::commands::edit_distance(&t, &c.to_lowercase())))
        .filter(|(_, d)| *d <= (t.chars().count() / 3).max(2))
        .min_by_key(|(_, d)| *d)
        .map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn nearest_guesses() {
        let people = ["alice", "bob", "Bob Smith", "carol"];
        assert_eq!(nearest("Bob", people), Some("bob"));
        assert_eq!(nearest("ali", people), Some("alice"));
        assert_eq!(nearest("smith", people), Some("Bob Smith"));
        assert_eq!(nearest("carl", people), Some("carol"));
        assert_eq!(nearest("zed", people), None);
        assert_eq!(nearest("bgu", ["Bug", "Feature", "Support"]), Some("Bug"));
    }
}
