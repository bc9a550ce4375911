//! Tracker clients behind one trait: list groups and members, create and change cases as a person.
//!
//! Only this module (and its children) talk HTTP to trackers (reqwest). [`AnyTracker`] is the one
//! type the rest of caseroom holds: an enum over the clients, because the trait's methods return
//! `impl Future` (no `dyn`).

pub mod gitea;
pub mod github;
pub mod gitlab;
pub mod jira;
pub mod oauth;
pub mod redmine;
pub(crate) mod rest;

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
    /// The tracker cannot act for this person until they link their own account (GitHub: no
    /// impersonation); the text says how.
    #[error("{0}")]
    NotLinked(String),
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
    /// Stable identifier, as webhooks carry it: Redmine project identifier, Gitea/Forgejo
    /// `owner/repo`, GitLab `group/sub/project`.
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
    /// Visible to only some of the group (Redmine private issue, GitLab confidential issue): answers
    /// in the room then show its number and link, not its title, people or status — as webhook
    /// events of such cases never reach the room at all.
    pub private: bool,
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

/// The person a call acts as: their tracker login, and their own API token when they linked one
/// (then the token is used instead of the admin key's impersonation). `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Actor {
    /// Tracker login.
    pub login: String,
    /// Personal API token, if the person linked one.
    pub token: Option<String>,
}

impl Actor {
    /// Acting through the admin key's impersonation.
    pub fn login(login: &str) -> Actor {
        Actor {
            login: login.to_owned(),
            token: None,
        }
    }
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("login", &self.login)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The operations caseroom needs from a tracker. `who` is the person acting; `group` is the group
/// (project, repository) the room mirrors: case numbers are per repository on Gitea and GitLab.
pub trait Tracker: Send + Sync {
    /// Every group with its members.
    fn groups(&self) -> impl Future<Output = Result<Vec<Group>, TrackerError>> + Send;
    /// Labels/types and priorities a group offers (for forgiving guesses).
    fn vocabulary(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vocabulary, TrackerError>> + Send;
    /// The login a personal API token belongs to (validates a token someone wants to link).
    fn whoami(&self, token: &str) -> impl Future<Output = Result<String, TrackerError>> + Send;
    /// Create a case as `who`.
    fn create(
        &self,
        who: &Actor,
        case: &NewCase,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Comment as `who`.
    fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text: &str,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Close (or reopen) as `who`, with an optional note.
    fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Assign to `assignee_login` as `who`.
    fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Read a case as `who`.
    fn get(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
    ) -> impl Future<Output = Result<Case, TrackerError>> + Send;
    /// Search open and closed cases of a group as `who`.
    fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> impl Future<Output = Result<Vec<Case>, TrackerError>> + Send;
    /// Open cases of a group assigned to `who`. Only that group's: the answer is posted in its room,
    /// whose members may not see the person's other projects.
    fn mine(
        &self,
        who: &Actor,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Case>, TrackerError>> + Send;
}

/// The webhook caseroom keeps on a repository (`manage_webhooks`).
#[derive(Clone)]
pub struct HookSpec {
    /// Where the tracker delivers (caseroom's `/hooks/<name>`, as the tracker reaches it).
    pub url: String,
    /// The signing secret (the tracker's `secret`).
    pub secret: String,
}

/// What keeping a repository's webhook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// It was there, as it should be.
    Unchanged,
    /// There was none: created.
    Created,
    /// It was there but inactive or missing events: repaired.
    Repaired,
}

/// A repository's webhook after caseroom looked after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookReport {
    /// What was done.
    pub action: HookAction,
    /// How its last delivery failed, if it did (the tracker's own record).
    pub failing: Option<String>,
}

/// Every tracker client caseroom has; what the bridge holds.
pub enum AnyTracker {
    /// Redmine.
    Redmine(redmine::Redmine),
    /// GitHub and GitHub Enterprise Server.
    Github(github::Github),
    /// Gitea, and Forgejo (whose API is Gitea's).
    Gitea(gitea::Gitea),
    /// GitLab.
    Gitlab(gitlab::Gitlab),
    /// Jira Cloud.
    Jira(jira::Jira),
}

impl AnyTracker {
    /// Create or repair caseroom's webhook on `group` (GitHub, GitLab, Gitea, Forgejo; see `manage_webhooks`).
    pub async fn ensure_hook(
        &self,
        group: &str,
        spec: &HookSpec,
    ) -> Result<HookReport, TrackerError> {
        match self {
            AnyTracker::Github(g) => g.ensure_hook(group, spec).await,
            AnyTracker::Gitlab(g) => g.ensure_hook(group, spec).await,
            AnyTracker::Gitea(g) => g.ensure_hook(group, spec).await,
            _ => Err(TrackerError::Protocol(
                "caseroom manages webhooks on GitHub, GitLab, Gitea and Forgejo only".into(),
            )),
        }
    }

    /// Refuse tracker answers larger than `n` bytes.
    pub fn set_max_response(&mut self, n: usize) {
        match self {
            AnyTracker::Redmine(c) => c.set_max_response(n),
            AnyTracker::Gitea(c) => c.set_max_response(n),
            AnyTracker::Github(c) => c.set_max_response(n),
            AnyTracker::Gitlab(c) => c.set_max_response(n),
            AnyTracker::Jira(c) => c.set_max_response(n),
        }
    }

    /// The client for a `[[tracker]]` of `kind` at `url`, with its admin/bot key.
    pub fn connect(
        kind: crate::webhook::TrackerKind,
        url: &str,
        key: &str,
    ) -> Result<AnyTracker, TrackerError> {
        use crate::webhook::TrackerKind as K;
        match kind {
            K::Redmine => Ok(AnyTracker::Redmine(redmine::Redmine::new(url, key)?)),
            K::Gitea | K::Forgejo => Ok(AnyTracker::Gitea(gitea::Gitea::new(url, key)?)),
            K::Gitlab => Ok(AnyTracker::Gitlab(gitlab::Gitlab::new(url, key)?)),
            K::Github => Ok(AnyTracker::Github(github::Github::new(url, key)?)),
            K::Jira => Ok(AnyTracker::Jira(jira::Jira::new(url, key)?)),
            other => Err(TrackerError::Protocol(format!(
                "no REST client for kind {other:?}"
            ))),
        }
    }

    /// The Redmine client, for what only Redmine needs (the catch-up poller).
    pub fn as_redmine(&self) -> Option<&redmine::Redmine> {
        match self {
            AnyTracker::Redmine(r) => Some(r),
            AnyTracker::Gitea(_)
            | AnyTracker::Gitlab(_)
            | AnyTracker::Github(_)
            | AnyTracker::Jira(_) => None,
        }
    }
}

macro_rules! each_client {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            AnyTracker::Redmine($c) => $e,
            AnyTracker::Gitea($c) => $e,
            AnyTracker::Github($c) => $e,
            AnyTracker::Gitlab($c) => $e,
            AnyTracker::Jira($c) => $e,
        }
    };
}

impl Tracker for AnyTracker {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        each_client!(self, c => c.groups().await)
    }
    async fn vocabulary(&self, group: &str) -> Result<Vocabulary, TrackerError> {
        each_client!(self, c => c.vocabulary(group).await)
    }
    async fn whoami(&self, token: &str) -> Result<String, TrackerError> {
        each_client!(self, c => c.whoami(token).await)
    }
    async fn create(&self, who: &Actor, case: &NewCase) -> Result<Case, TrackerError> {
        each_client!(self, c => c.create(who, case).await)
    }
    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text: &str,
    ) -> Result<Case, TrackerError> {
        each_client!(self, c => c.comment(who, group, number, text).await)
    }
    async fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> Result<Case, TrackerError> {
        each_client!(self, c => c.set_closed(who, group, number, closed, note).await)
    }
    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> Result<Case, TrackerError> {
        each_client!(self, c => c.assign(who, group, number, assignee_login).await)
    }
    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        each_client!(self, c => c.get(who, group, number).await)
    }
    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        each_client!(self, c => c.search(who, group, words).await)
    }
    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        each_client!(self, c => c.mine(who, group).await)
    }
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
        .map(|c| (c, strsim::levenshtein(&t, &c.to_lowercase())))
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
