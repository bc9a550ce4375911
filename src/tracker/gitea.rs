//! Gitea's REST API (`/api/v1`, swagger in go-gitea/gitea `templates/swagger/v1_json.tmpl`); Forgejo
//! serves the same API, so `kind = "forgejo"` uses this client too.
//!
//! - Authentication: `Authorization: token <key>`. A person who linked their own token acts with it;
//!   otherwise the admin key acts as them with the `Sudo: <login>` header (Gitea's API usage docs).
//! - Groups are the repositories the admin key sees (`GET /repos/search`, paged with `page`/`limit`,
//!   at most 50 a page); the group id is `full_name` (`owner/repo`), as webhooks carry it, and the
//!   room title is `full_name` too. Case numbers are issue `number`s (per repository).
//! - Members and their role names (map them with `[tracker.roles]`), from what the API documents:
//!   - collaborators (`GET /repos/{owner}/{repo}/collaborators`), each with the permission
//!     `GET …/collaborators/{login}/permission` answers: `read`, `write`, `admin` (or `owner`);
//!   - for a repository owned by an organisation, its teams (`GET /repos/{owner}/{repo}/teams`)
//!     with their members (`GET /teams/{id}/members`, fetched once per team per sync); the role is
//!     the team's `permission`: `read`, `write`, `admin`, or `owner` (the Owners team);
//!   - for a repository owned by a user (Gitea answers the teams request with 405), that user with
//!     the role `owner`.
//!
//!   A person can hold several roles (collaborator and team member); caseroom takes the highest
//!   mapped one. Calls per sync: one repository listing, then per repository 2 + one per
//!   collaborator, plus one per distinct team.
//! - Vocabulary: the repository's labels are the kinds; labels whose name starts with "priority"
//!   (`priority/high`, `Priority: High`) are the priorities. A kind or priority becomes a label id
//!   on the new issue. Organisation-wide labels are not listed.
//! - Errors: Gitea's error bodies are `{"message", "url"}`; 422 and the validation answers 400, 409,
//!   412 (e.g. closing an issue with open dependencies) and 423 (archived repository) are `Rejected`
//!   with that message.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::rest;
use super::{Actor, Case, Group, Member, NewCase, Tracker, TrackerError, Vocabulary};
use crate::webhook::{at, text};

/// Page size for lists (Gitea's default `MAX_RESPONSE_ITEMS` is 50).
const PAGE: usize = 50;

const GITEA_ERRORS: rest::Errors = rest::Errors {
    rejected: &[400, 409, 412, 423],
    message: |v| text(v, "message"),
};

const GITEA_AUTH: rest::Auth = rest::Auth {
    header: "Authorization",
    scheme: "token ",
    switch: "Sudo",
};
/// A Gitea or Forgejo instance.
pub struct Gitea {
    api: String,
    key: String,
    http: rest::Http,
    /// Label ids by name, per repository.
    labels: Mutex<HashMap<String, Vec<(u64, String)>>>,
}

impl Gitea {
    /// A client for the instance at `base` (e.g. `https://codeberg.org`) with an admin token
    /// (scopes to read and write repositories, issues, organisations and users; Sudo needs a site admin).
    pub fn new(base: &str, key: &str) -> Result<Gitea, TrackerError> {
        Ok(Gitea {
            api: format!("{}/api/v1", base.trim_end_matches('/')),
            key: key.to_owned(),
            http: rest::http_client()?,
            labels: Mutex::new(HashMap::new()),
        })
    }

    /// Refuse answers larger than `n` bytes (`[[tracker]] max_response_bytes`).
    pub fn set_max_response(&mut self, n: usize) {
        self.http.max_response = n;
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        who: Option<&Actor>,
        body: Option<Value>,
    ) -> Result<Option<Value>, TrackerError> {
        let headers = GITEA_AUTH.headers(&self.key, who);
        let to = (self.api.as_str(), path);
        rest::call_json(
            &self.http,
            method,
            to,
            &headers,
            body.as_ref(),
            &GITEA_ERRORS,
        )
        .await
    }

    async fn get_json(&self, path: &str, who: Option<&Actor>) -> Result<Value, TrackerError> {
        rest::needed(self.call(Method::GET, path, who, None).await?, path)
    }

    /// Every page of a list (an array, or `{"data": [...]}` for `/repos/search`).
    async fn list(&self, path: &str) -> Result<Vec<Value>, TrackerError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        for page in 1..=1000 {
            let v = self
                .get_json(&format!("{path}{sep}page={page}&limit={PAGE}"), None)
                .await?;
            let items = v
                .as_array()
                .or_else(|| v.get("data").and_then(Value::as_array))
                .cloned()
                .ok_or_else(|| {
                    TrackerError::Protocol(format!("no list in the answer to {path}"))
                })?;
            let n = items.len();
            out.extend(items);
            if n < PAGE {
                break;
            }
        }
        Ok(out)
    }

    fn case_from(v: &Value) -> Result<Case, TrackerError> {
        rest::issue_case(v, web_url(v), display_name)
    }

    fn cases_from(v: &Value) -> Result<Vec<Case>, TrackerError> {
        v.as_array()
            .ok_or_else(|| TrackerError::Protocol("expected a list of issues".into()))?
            .iter()
            .map(Gitea::case_from)
            .collect()
    }

    /// Label ids and names of a repository (cached).
    async fn labels(&self, group: &str) -> Result<Vec<(u64, String)>, TrackerError> {
        if let Some(l) = self.labels.lock().await.get(group) {
            return Ok(l.clone());
        }
        let repo = rest::repo_path(group)?;
        let labels: Vec<(u64, String)> = self
            .list(&format!("/repos/{repo}/labels"))
            .await?
            .iter()
            .filter_map(|l| Some((l.get("id")?.as_u64()?, text(l, "name")?)))
            .collect();
        self.labels
            .lock()
            .await
            .insert(group.to_owned(), labels.clone());
        Ok(labels)
    }

    async fn edit(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        fields: Value,
    ) -> Result<Case, TrackerError> {
        let repo = rest::repo_path(group)?;
        let v = self
            .call(
                Method::PATCH,
                &format!("/repos/{repo}/issues/{number}"),
                Some(who),
                Some(fields),
            )
            .await?;
        match v {
            Some(issue) => Gitea::case_from(&issue),
            None => self.get(who, group, number).await,
        }
    }

    async fn post_comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        body: &str,
    ) -> Result<(), TrackerError> {
        let repo = rest::repo_path(group)?;
        self.call(
            Method::POST,
            &format!("/repos/{repo}/issues/{number}/comments"),
            Some(who),
            Some(json!({ "body": body })),
        )
        .await?;
        Ok(())
    }
}

/// An issue's web address: `html_url`, or for Gitea versions whose issues lack it (the 2019
/// try.gitea.io answers) the API address in `url` turned into the web one
/// (`https://host/api/v1/repos/o/r/issues/3` → `https://host/o/r/issues/3`).
fn web_url(issue: &Value) -> Option<String> {
    text(issue, "html_url").or_else(|| {
        let api = text(issue, "url")?;
        let (base, path) = api.split_once("/api/v1/repos/")?;
        Some(format!("{base}/{path}"))
    })
}

/// A user's full name, else login.
fn display_name(u: &Value) -> Option<String> {
    text(u, "full_name").or_else(|| text(u, "login"))
}

/// Add `role` to `login` in an ordered member list.
fn add_role(members: &mut Vec<Member>, user: &Value, role: &str) {
    let Some(login) = text(user, "login") else {
        return;
    };
    match members.iter_mut().find(|m| m.login == login) {
        Some(m) => {
            if !m.roles.iter().any(|r| r == role) {
                m.roles.push(role.to_owned());
            }
        }
        None => members.push(Member {
            name: display_name(user).unwrap_or_else(|| login.clone()),
            login,
            roles: vec![role.to_owned()],
        }),
    }
}

/// The events caseroom's webhook asks Gitea/Forgejo for: what it posts (`issues` and
/// `pull_request` turn on their whole families: assignments, labels, milestones, reviews), and
/// `repository`, which wakes the sync.
pub const HOOK_EVENTS: &[&str] = &[
    "create",
    "delete",
    "issue_comment",
    "issues",
    "pull_request",
    "push",
    "release",
    "repository",
];

impl Gitea {
    /// Create caseroom's webhook on `group` (the one whose `config.url` is `spec.url`) if it is
    /// missing, or repair it if it is inactive or lacks events. Type `gitea`, which Forgejo accepts
    /// as well. Gitea shows neither a hook's secret nor how its deliveries went, so a secret changed
    /// elsewhere is not noticed (delete the hook: the next sync recreates it) and failing deliveries
    /// are not reported.
    pub async fn ensure_hook(
        &self,
        group: &str,
        spec: &super::HookSpec,
    ) -> Result<super::HookReport, TrackerError> {
        use super::{HookAction, HookReport};
        let repo = rest::repo_path(group)?;
        let hooks = self.list(&format!("/repos/{repo}/hooks")).await?;
        let config = json!({ "url": spec.url, "content_type": "json", "secret": spec.secret });
        // Every PATCH replaces events, branch filter and authorization header: send them all.
        let body = json!({
            "active": true,
            "events": HOOK_EVENTS,
            "branch_filter": "",
            "authorization_header": "",
            "config": config,
        });
        let Some(hook) = rest::hook_at(&hooks, &spec.url) else {
            let mut create = body;
            create["type"] = json!("gitea");
            self.call(
                Method::POST,
                &format!("/repos/{repo}/hooks"),
                None,
                Some(create),
            )
            .await?;
            return Ok(HookReport {
                action: HookAction::Created,
                failing: None,
            });
        };
        if rest::hook_complete(hook, HOOK_EVENTS) {
            return Ok(HookReport {
                action: HookAction::Unchanged,
                failing: None,
            });
        }
        let id = hook
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| TrackerError::Protocol("a hook without id".into()))?;
        self.call(
            Method::PATCH,
            &format!("/repos/{repo}/hooks/{id}"),
            None,
            Some(body),
        )
        .await?;
        Ok(HookReport {
            action: HookAction::Repaired,
            failing: None,
        })
    }
}

impl Tracker for Gitea {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        let repos = self.list("/repos/search").await?;
        let mut team_members: HashMap<u64, Vec<Value>> = HashMap::new();
        let mut out = Vec::new();
        for r in repos {
            let Some(full_name) = text(&r, "full_name") else {
                continue;
            };
            let repo = rest::repo_path(&full_name)?;
            let mut members = Vec::new();
            for c in self.list(&format!("/repos/{repo}/collaborators")).await? {
                let Some(login) = text(&c, "login") else {
                    continue;
                };
                let p = self
                    .get_json(
                        &format!(
                            "/repos/{repo}/collaborators/{}/permission",
                            rest::encode(&login)
                        ),
                        None,
                    )
                    .await?;
                if let Some(perm) = text(&p, "permission").filter(|p| p != "none") {
                    add_role(&mut members, &c, &perm);
                }
            }
            match self.get_json(&format!("/repos/{repo}/teams"), None).await {
                Ok(teams) => {
                    for t in teams.as_array().into_iter().flatten() {
                        let (Some(id), Some(perm)) =
                            (t.get("id").and_then(Value::as_u64), text(t, "permission"))
                        else {
                            continue;
                        };
                        if perm == "none" {
                            continue;
                        }
                        let users = match team_members.get(&id) {
                            Some(users) => users.clone(),
                            None => {
                                let users = self.list(&format!("/teams/{id}/members")).await?;
                                team_members.insert(id, users.clone());
                                users
                            }
                        };
                        for u in &users {
                            add_role(&mut members, u, &perm);
                        }
                    }
                }
                // Not owned by an organisation: the owning user owns it.
                Err(TrackerError::Status { status: 405, .. }) => {
                    if let Some(owner) = at(&r, "owner") {
                        add_role(&mut members, owner, "owner");
                    }
                }
                Err(e) => return Err(e),
            }
            out.push(Group {
                id: full_name.clone(),
                name: full_name,
                description: text(&r, "description").unwrap_or_default(),
                members,
            });
        }
        Ok(out)
    }

    async fn vocabulary(&self, group: &str) -> Result<Vocabulary, TrackerError> {
        let kinds: Vec<String> = self
            .labels(group)
            .await?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        Ok(Vocabulary {
            priorities: rest::priority_labels(&kinds),
            kinds,
        })
    }

    async fn whoami(&self, token: &str) -> Result<String, TrackerError> {
        let who = Actor {
            login: String::new(),
            token: Some(token.to_owned()),
        };
        let v = self.get_json("/user", Some(&who)).await?;
        text(&v, "login").ok_or_else(|| TrackerError::Protocol("no login in /user".into()))
    }

    async fn create(&self, who: &Actor, case: &NewCase) -> Result<Case, TrackerError> {
        let repo = rest::repo_path(&case.group)?;
        let mut fields = json!({ "title": case.title, "body": case.description });
        if let Some(a) = &case.assignee {
            fields["assignees"] = json!([a]);
        }
        let wanted: Vec<&String> = case.kind.iter().chain(case.priority.iter()).collect();
        if !wanted.is_empty() {
            let labels = self.labels(&case.group).await?;
            let ids: Vec<u64> = wanted
                .iter()
                .filter_map(|w| labels.iter().find(|(_, n)| n == *w).map(|(id, _)| *id))
                .collect();
            if !ids.is_empty() {
                fields["labels"] = json!(ids);
            }
        }
        let v = self
            .call(
                Method::POST,
                &format!("/repos/{repo}/issues"),
                Some(who),
                Some(fields),
            )
            .await?
            .ok_or_else(|| TrackerError::Protocol("no issue in the answer".into()))?;
        Gitea::case_from(&v)
    }

    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text_: &str,
    ) -> Result<Case, TrackerError> {
        self.post_comment(who, group, number, text_).await?;
        self.get(who, group, number).await
    }

    async fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> Result<Case, TrackerError> {
        if let Some(n) = note {
            self.post_comment(who, group, number, n).await?;
        }
        let state = if closed { "closed" } else { "open" };
        self.edit(who, group, number, json!({ "state": state }))
            .await
    }

    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> Result<Case, TrackerError> {
        self.edit(who, group, number, json!({ "assignees": [assignee_login] }))
            .await
    }

    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        let repo = rest::repo_path(group)?;
        let v = self
            .get_json(&format!("/repos/{repo}/issues/{number}"), Some(who))
            .await?;
        Gitea::case_from(&v)
    }

    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        let repo = rest::repo_path(group)?;
        let v = self
            .get_json(
                &format!(
                    "/repos/{repo}/issues?type=issues&state=all&q={}&limit=5",
                    rest::encode(words.trim())
                ),
                Some(who),
            )
            .await?;
        Gitea::cases_from(&v)
    }

    /// `assigned_by` (a username) filters the repository's issue list since Gitea 1.15.
    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        let repo = rest::repo_path(group)?;
        let v = self
            .get_json(
                &format!(
                    "/repos/{repo}/issues?type=issues&state=open&assigned_by={}&limit=10",
                    rest::encode(&who.login)
                ),
                Some(who),
            )
            .await?;
        Gitea::cases_from(&v)
    }
}
