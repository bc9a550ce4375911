//! GitHub's REST API (`https://api.github.com`, or `<url>/api/v3` for GitHub Enterprise Server;
//! described in github/rest-api-description, version 2022-11-28).
//!
//! - Authentication: `Authorization: Bearer <token>`, with the `Accept`, `X-GitHub-Api-Version` and
//!   `User-Agent` headers GitHub asks for. **GitHub cannot impersonate**: the configured key (a token
//!   of an account or app that sees the repositories) is used for the sync only; every command runs
//!   with the person's own linked token, and a person who linked none is told how to link one.
//! - Groups are the repositories the key sees (`GET /user/repos`, 100 a page; narrow them with
//!   `include`/`exclude`); the group id is `full_name` (`owner/repo`), as webhooks carry it.
//! - Members: `GET /repos/{owner}/{repo}/collaborators?affiliation=all` (direct, organisation and team
//!   access alike), each with its `role_name`: `admin`, `maintain`, `write`, `triage`, `read` (map
//!   them with `[tracker.roles]`). One call per repository (and page).
//! - Vocabulary: the repository's labels are the kinds; labels named `priority…` the priorities;
//!   new issues get labels by name.
//! - Errors: `{"message", "documentation_url"}` (validation errors add `errors`); 422 and 410
//!   (issues disabled) are `Rejected` with the message.

use reqwest::Method;
use serde_json::{json, Value};

use super::rest;
use super::{
    Actor, Case, Group, HookAction, HookReport, HookSpec, Member, NewCase, Tracker, TrackerError,
    Vocabulary,
};
use crate::webhook::{at, text};

/// Page size (GitHub's maximum).
const PAGE: usize = 100;

const GITHUB_ERRORS: rest::Errors = rest::Errors {
    rejected: &[400, 409, 410],
    message: |v| text(v, "message"),
};

/// A GitHub (or GitHub Enterprise Server) instance.
pub struct Github {
    api: String,
    key: String,
    http: rest::Http,
}

impl Github {
    /// A client for `base`: `https://github.com` (or `https://api.github.com`) means GitHub itself,
    /// anything else a GitHub Enterprise Server at `<base>/api/v3`; `key` is a token that sees the
    /// repositories to mirror (read access to metadata and collaborators is enough).
    pub fn new(base: &str, key: &str) -> Result<Github, TrackerError> {
        let base = base.trim_end_matches('/');
        let api = match base {
            "https://github.com" | "https://www.github.com" | "https://api.github.com" => {
                "https://api.github.com".to_owned()
            }
            other if other.ends_with("/api/v3") => other.to_owned(),
            other => format!("{other}/api/v3"),
        };
        Ok(Github {
            api,
            key: key.to_owned(),
            http: rest::http_client()?,
        })
    }

    /// Refuse answers larger than `n` bytes (`[[tracker]] max_response_bytes`).
    pub fn set_max_response(&mut self, n: usize) {
        self.http.max_response = n;
    }

    /// The headers of a call: the configured key (`who` = None), or the person's linked token.
    fn headers(&self, who: Option<&Actor>) -> Result<Vec<(&'static str, String)>, TrackerError> {
        let token = match who {
            None => self.key.as_str(),
            Some(Actor { token: Some(t), .. }) => t.as_str(),
            Some(a) => return Err(TrackerError::NotLinked(format!(
                "GitHub cannot act for {}: link your GitHub account first (ad-hoc command \"Link my tracker account\", with a personal access token that may write issues), then send the command again",
                a.login
            ))),
        };
        Ok(vec![
            ("Authorization", format!("Bearer {token}")),
            ("Accept", "application/vnd.github+json".to_owned()),
            ("X-GitHub-Api-Version", "2022-11-28".to_owned()),
            (
                "User-Agent",
                concat!("caseroom/", env!("CARGO_PKG_VERSION")).to_owned(),
            ),
        ])
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        who: Option<&Actor>,
        body: Option<Value>,
    ) -> Result<Option<Value>, TrackerError> {
        let headers = self.headers(who)?;
        let to = (self.api.as_str(), path);
        rest::call_json(
            &self.http,
            method,
            to,
            &headers,
            body.as_ref(),
            &GITHUB_ERRORS,
        )
        .await
    }

    async fn get_json(&self, path: &str, who: Option<&Actor>) -> Result<Value, TrackerError> {
        rest::needed(self.call(Method::GET, path, who, None).await?, path)
    }

    /// Every page of a list, with the configured key.
    async fn list(&self, path: &str) -> Result<Vec<Value>, TrackerError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        for page in 1..=1000 {
            let v = self
                .get_json(&format!("{path}{sep}per_page={PAGE}&page={page}"), None)
                .await?;
            let items = v.as_array().cloned().ok_or_else(|| {
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
        rest::issue_case(v, text(v, "html_url"), display_name)
    }

    fn cases_from(list: &[Value]) -> Result<Vec<Case>, TrackerError> {
        list.iter().map(Github::case_from).collect()
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
            .await?
            .ok_or_else(|| TrackerError::Protocol("no issue in the answer".into()))?;
        Github::case_from(&v)
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

/// The events caseroom posts (and `member`, which wakes the sync).
pub const HOOK_EVENTS: &[&str] = &[
    "issue_comment",
    "issues",
    "member",
    "pull_request",
    "push",
    "release",
    "workflow_run",
];

impl Github {
    /// Create caseroom's webhook on `group` (the one whose `config.url` is `spec.url`) if it is
    /// missing, or repair it if it is inactive or lacks events; say how its last delivery went.
    /// GitHub never shows a hook's secret, so a secret changed elsewhere is not noticed: set it
    /// again by removing the hook (caseroom recreates it at the next sync).
    pub async fn ensure_hook(
        &self,
        group: &str,
        spec: &HookSpec,
    ) -> Result<HookReport, TrackerError> {
        let repo = rest::repo_path(group)?;
        let hooks = self.list(&format!("/repos/{repo}/hooks")).await?;
        let ours = rest::hook_at(&hooks, &spec.url);
        let config = json!({
            "url": spec.url,
            "content_type": "json",
            "secret": spec.secret,
            "insecure_ssl": "0",
        });
        let Some(hook) = ours else {
            self.call(
                Method::POST,
                &format!("/repos/{repo}/hooks"),
                None,
                Some(json!({ "name": "web", "active": true, "events": HOOK_EVENTS, "config": config })),
            )
            .await?;
            return Ok(HookReport {
                action: HookAction::Created,
                failing: None,
            });
        };
        let failing = last_failure(hook);
        if rest::hook_complete(hook, HOOK_EVENTS) {
            return Ok(HookReport {
                action: HookAction::Unchanged,
                failing,
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
            Some(json!({ "active": true, "events": HOOK_EVENTS, "config": config })),
        )
        .await?;
        Ok(HookReport {
            action: HookAction::Repaired,
            failing,
        })
    }
}

/// A hook's last delivery, when it failed (`last_response`: status "active" and "unused" are fine).
fn last_failure(hook: &Value) -> Option<String> {
    let status = text(hook, "last_response.status")?;
    if matches!(status.as_str(), "active" | "unused") {
        return None;
    }
    let code = at(hook, "last_response.code")
        .and_then(Value::as_u64)
        .map(|c| format!("HTTP {c}"));
    let message = text(hook, "last_response.message");
    Some(
        [Some(status), code, message]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// A user's name when the object has one, else login.
fn display_name(u: &Value) -> Option<String> {
    text(u, "name").or_else(|| text(u, "login"))
}

/// A collaborator's role: `role_name`, else the highest of its `permissions`.
fn role_of(c: &Value) -> Option<String> {
    text(c, "role_name").or_else(|| {
        ["admin", "maintain", "push", "triage", "pull"]
            .into_iter()
            .find(|p| at(c, &format!("permissions.{p}")).and_then(Value::as_bool) == Some(true))
            .map(|p| match p {
                "push" => "write".to_owned(),
                "pull" => "read".to_owned(),
                other => other.to_owned(),
            })
    })
}

impl Tracker for Github {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        let mut out = Vec::new();
        for r in self.list("/user/repos").await? {
            let Some(full_name) = text(&r, "full_name") else {
                continue;
            };
            let repo = rest::repo_path(&full_name)?;
            let members = self
                .list(&format!("/repos/{repo}/collaborators?affiliation=all"))
                .await?
                .iter()
                .filter_map(|c| {
                    Some(Member {
                        login: text(c, "login")?,
                        name: display_name(c)?,
                        roles: vec![role_of(c)?],
                    })
                })
                .collect();
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
        let repo = rest::repo_path(group)?;
        let kinds: Vec<String> = self
            .list(&format!("/repos/{repo}/labels"))
            .await?
            .iter()
            .filter_map(|l| text(l, "name"))
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
        let labels: Vec<&String> = case.kind.iter().chain(case.priority.iter()).collect();
        if !labels.is_empty() {
            fields["labels"] = json!(labels);
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
        Github::case_from(&v)
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
        Github::case_from(&v)
    }

    /// GitHub's issue search, limited to the repository (issues and pull requests, open or closed).
    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        rest::repo_path(group)?;
        let q = format!("{} repo:{group}", words.trim());
        let v = self
            .get_json(
                &format!("/search/issues?q={}&per_page=5", rest::encode(&q)),
                Some(who),
            )
            .await?;
        let items = v
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| TrackerError::Protocol("no items in the search answer".into()))?;
        Github::cases_from(items)
    }

    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        let repo = rest::repo_path(group)?;
        let v = self
            .get_json(
                &format!(
                    "/repos/{repo}/issues?state=open&assignee={}&per_page=10",
                    rest::encode(&who.login)
                ),
                Some(who),
            )
            .await?;
        let list = v
            .as_array()
            .ok_or_else(|| TrackerError::Protocol("expected a list of issues".into()))?;
        Github::cases_from(list)
    }
}
