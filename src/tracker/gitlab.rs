//! GitLab's REST API (`/api/v4`; GitLab docs `doc/api/issues.md`, `members.md`, `projects.md`,
//! `notes.md`, `users.md`, `labels.md`, `rest/authentication.md`).
//!
//! - Authentication: `PRIVATE-TOKEN: <key>`. A person who linked their own token acts with it;
//!   otherwise the admin key acts as them with the `Sudo: <user id>` header (the id looked up for
//!   the exact username, never the login itself: GitLab reads an all-digit `Sudo` as an id), which needs an
//!   administrator's token with the `sudo` scope (403 otherwise).
//! - Groups are the projects the admin key sees (`GET /projects`, paged with `page`/`per_page`,
//!   following `X-Next-Page`); the group id is `path_with_namespace` (`group/sub/project`), as
//!   webhooks carry it, and is sent URL-encoded as the project `:id`. The room title is
//!   `name_with_namespace`. Case numbers are issue `iid`s (per project).
//! - Members: `GET /projects/:id/members/all` (inherited members included, each with their highest
//!   level); blocked or otherwise inactive users are left out. Role names (map them with
//!   `[tracker.roles]`) are the access level names: `Guest` (10), `Planner` (15), `Reporter` (20),
//!   `Developer` (30), `Maintainer` (40), `Owner` (50); also `Minimal access` (5); another level
//!   appears as its number.
//! - Vocabulary: the project's labels (group labels included, as GitLab lists them) are the kinds;
//!   labels whose name starts with "priority" (`priority::high`) are the priorities. Labels are sent
//!   by name; an assignee login becomes a user id through `GET /users?username=`.
//! - Errors: GitLab answers `{"message": "..."}`, `{"message": {"field": ["..."]}}` or
//!   `{"error": "..."}`; 422 and the documented validation answers 400 and 409 are `Rejected` with
//!   that message.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::rest;
use super::{
    Actor, Case, Group, HookAction, HookReport, HookSpec, Member, NewCase, Tracker, TrackerError,
    Vocabulary,
};
use crate::webhook::{at, text};

/// The project hook events caseroom posts.
const HOOK_EVENTS: &[&str] = &[
    "issues_events",
    "merge_requests_events",
    "note_events",
    "pipeline_events",
    "push_events",
    "releases_events",
    "tag_push_events",
];

const GITLAB_ERRORS: rest::Errors = rest::Errors {
    rejected: &[400, 409],
    message: gitlab_message,
};

/// The message of a GitLab error body.
fn gitlab_message(v: &Value) -> Option<String> {
    match v.get("message") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(fields)) => Some(
            fields
                .iter()
                .map(|(k, v)| {
                    let msgs: Vec<String> = match v {
                        Value::Array(a) => a
                            .iter()
                            .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                            .collect(),
                        other => vec![other.to_string()],
                    };
                    format!("{k} {}", msgs.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => match (text(v, "error"), text(v, "error_description")) {
            (Some(e), Some(d)) => Some(format!("{e}: {d}")),
            (e, d) => e.or(d),
        },
    }
}

/// The name of a GitLab access level.
pub fn access_level_name(level: u64) -> String {
    match level {
        5 => "Minimal access".into(),
        10 => "Guest".into(),
        15 => "Planner".into(),
        20 => "Reporter".into(),
        30 => "Developer".into(),
        40 => "Maintainer".into(),
        50 => "Owner".into(),
        n => n.to_string(),
    }
}

const GITLAB_AUTH: rest::Auth = rest::Auth {
    header: "PRIVATE-TOKEN",
    scheme: "",
    switch: "Sudo",
};
/// A GitLab instance.
pub struct Gitlab {
    api: String,
    key: String,
    http: rest::Http,
    /// User ids by username.
    users: Mutex<HashMap<String, u64>>,
}

impl Gitlab {
    /// A client for the instance at `base` (e.g. `https://gitlab.example.com`) with an
    /// administrator's token (scopes `api` and `sudo`).
    pub fn new(base: &str, key: &str) -> Result<Gitlab, TrackerError> {
        Ok(Gitlab {
            api: format!("{}/api/v4", base.trim_end_matches('/')),
            key: key.to_owned(),
            http: rest::http_client()?,
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Refuse answers larger than `n` bytes (`[[tracker]] max_response_bytes`).
    pub fn set_max_response(&mut self, n: usize) {
        self.http.max_response = n;
    }

    /// Create caseroom's webhook on project `group` (the one whose `url` is `spec.url`) if it is
    /// missing, or turn on the events it lacks (GitLab docs, project webhooks API); report it when
    /// GitLab disabled it after failed deliveries (`alert_status` other than `executable`).
    pub async fn ensure_hook(
        &self,
        group: &str,
        spec: &HookSpec,
    ) -> Result<HookReport, TrackerError> {
        let path = format!("/projects/{}/hooks", rest::encode(group));
        let hooks = self.list(&path).await?;
        let mut fields = json!({
            "url": spec.url,
            "token": spec.secret,
            "enable_ssl_verification": true,
        });
        for flag in HOOK_EVENTS {
            fields[*flag] = json!(true);
        }
        let Some(hook) = hooks
            .iter()
            .find(|h| text(h, "url").as_deref() == Some(spec.url.as_str()))
        else {
            self.call(Method::POST, &path, None, Some(fields)).await?;
            return Ok(HookReport {
                action: HookAction::Created,
                failing: None,
            });
        };
        let failing = text(hook, "alert_status")
            .filter(|s| s != "executable")
            .map(|s| match text(hook, "disabled_until") {
                Some(until) => {
                    format!("GitLab disabled it after failed deliveries ({s} until {until})")
                }
                None => format!("GitLab disabled it after failed deliveries ({s})"),
            });
        let complete = HOOK_EVENTS
            .iter()
            .all(|f| hook.get(*f).and_then(Value::as_bool) == Some(true));
        if complete {
            return Ok(HookReport {
                action: HookAction::Unchanged,
                failing,
            });
        }
        let id = hook
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| TrackerError::Protocol("a hook without id".into()))?;
        self.call(Method::PUT, &format!("{path}/{id}"), None, Some(fields))
            .await?;
        Ok(HookReport {
            action: HookAction::Repaired,
            failing,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        who: Option<&Actor>,
        body: Option<Value>,
    ) -> Result<rest::Reply, TrackerError> {
        // `Sudo` takes a username *or* a numeric id, so a person whose login is `1` would act as user
        // 1 (usually the administrator). Impersonate by the id we looked up for the exact username.
        let by_id;
        let who = match who {
            Some(a) if a.token.is_none() => {
                by_id = Actor::login(&self.user_id(&a.login).await?.to_string());
                Some(&by_id)
            }
            other => other,
        };
        self.send(method, path, who, body).await
    }

    /// One request with the headers for `who` as given (no username → id resolution).
    async fn send(
        &self,
        method: Method,
        path: &str,
        who: Option<&Actor>,
        body: Option<Value>,
    ) -> Result<rest::Reply, TrackerError> {
        let headers = GITLAB_AUTH.headers(&self.key, who);
        let what = format!("{method} {path}");
        let url = format!("{}{path}", self.api);
        let reply = rest::send(&self.http, method, &url, &headers, body.as_ref()).await?;
        if reply.status.is_success() {
            return Ok(reply);
        }
        Err(rest::error_for(&reply, &what, &GITLAB_ERRORS))
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        who: Option<&Actor>,
        body: Option<Value>,
    ) -> Result<Value, TrackerError> {
        self.call(method, path, who, body)
            .await?
            .json()?
            .ok_or_else(|| TrackerError::Protocol(format!("empty answer for {path}")))
    }

    /// Every page of a list, following `X-Next-Page`.
    async fn list(&self, path: &str) -> Result<Vec<Value>, TrackerError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        let mut page = 1u64;
        for _ in 0..1000 {
            let reply = self
                .call(
                    Method::GET,
                    &format!("{path}{sep}per_page=100&page={page}"),
                    None,
                    None,
                )
                .await?;
            let items = reply
                .json()?
                .as_ref()
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| {
                    TrackerError::Protocol(format!("no list in the answer to {path}"))
                })?;
            out.extend(items);
            match reply
                .header("X-Next-Page")
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                Some(next) if next > page => page = next,
                _ => break,
            }
        }
        Ok(out)
    }

    fn case_from(v: &Value) -> Result<Case, TrackerError> {
        let number = v
            .get("iid")
            .and_then(Value::as_u64)
            .ok_or_else(|| TrackerError::Protocol("issue without iid".into()))?;
        let state = text(v, "state").unwrap_or_default();
        Ok(Case {
            number,
            title: text(v, "title").unwrap_or_default(),
            closed: state == "closed",
            status: state,
            assignee: at(v, "assignees.0")
                .or_else(|| at(v, "assignee"))
                .and_then(display_name),
            author: at(v, "author").and_then(display_name).unwrap_or_default(),
            url: text(v, "web_url").unwrap_or_default(),
            private: at(v, "confidential").and_then(Value::as_bool) == Some(true),
        })
    }

    fn cases_from(v: &Value) -> Result<Vec<Case>, TrackerError> {
        v.as_array()
            .ok_or_else(|| TrackerError::Protocol("expected a list of issues".into()))?
            .iter()
            .map(Gitlab::case_from)
            .collect()
    }

    async fn user_id(&self, login: &str) -> Result<u64, TrackerError> {
        if let Some(id) = self.users.lock().await.get(login) {
            return Ok(*id);
        }
        // As the admin key itself (never Sudo: this lookup is what makes Sudo safe).
        let path = format!("/users?username={}", rest::encode(login));
        let v = self
            .send(Method::GET, &path, None, None)
            .await?
            .json()?
            .ok_or_else(|| TrackerError::Protocol(format!("empty answer for {path}")))?;
        let id = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| text(u, "username").is_some_and(|u| u.eq_ignore_ascii_case(login)))
            .and_then(|u| u.get("id").and_then(Value::as_u64))
            .ok_or_else(|| TrackerError::NotFound(format!("GitLab user {login:?}")))?;
        self.users.lock().await.insert(login.to_owned(), id);
        Ok(id)
    }

    async fn edit(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        fields: Value,
    ) -> Result<Case, TrackerError> {
        let v = self
            .json(
                Method::PUT,
                &format!("/projects/{}/issues/{number}", rest::encode(group)),
                Some(who),
                Some(fields),
            )
            .await?;
        Gitlab::case_from(&v)
    }

    async fn note(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        body: &str,
    ) -> Result<(), TrackerError> {
        self.call(
            Method::POST,
            &format!("/projects/{}/issues/{number}/notes", rest::encode(group)),
            Some(who),
            Some(json!({ "body": body })),
        )
        .await?;
        Ok(())
    }
}

/// A user's name, else username.
fn display_name(u: &Value) -> Option<String> {
    text(u, "name").or_else(|| text(u, "username"))
}

impl Tracker for Gitlab {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        let mut out = Vec::new();
        for p in self.list("/projects").await? {
            let Some(path) = text(&p, "path_with_namespace") else {
                continue;
            };
            let mut members = Vec::new();
            for m in self
                .list(&format!("/projects/{}/members/all", rest::encode(&path)))
                .await?
            {
                let Some(login) = text(&m, "username") else {
                    continue;
                };
                if text(&m, "state").is_some_and(|s| s != "active") {
                    continue;
                }
                let roles = m
                    .get("access_level")
                    .and_then(Value::as_u64)
                    .map(|l| vec![access_level_name(l)])
                    .unwrap_or_default();
                members.push(Member {
                    name: text(&m, "name").unwrap_or_else(|| login.clone()),
                    login,
                    roles,
                });
            }
            out.push(Group {
                name: text(&p, "name_with_namespace").unwrap_or_else(|| path.clone()),
                id: path,
                description: text(&p, "description").unwrap_or_default(),
                members,
            });
        }
        Ok(out)
    }

    async fn vocabulary(&self, group: &str) -> Result<Vocabulary, TrackerError> {
        let kinds: Vec<String> = self
            .list(&format!("/projects/{}/labels", rest::encode(group)))
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
        let v = self.json(Method::GET, "/user", Some(&who), None).await?;
        text(&v, "username").ok_or_else(|| TrackerError::Protocol("no username in /user".into()))
    }

    async fn create(&self, who: &Actor, case: &NewCase) -> Result<Case, TrackerError> {
        let mut fields = json!({ "title": case.title, "description": case.description });
        let labels: Vec<&str> = case
            .kind
            .iter()
            .chain(case.priority.iter())
            .map(String::as_str)
            .collect();
        if !labels.is_empty() {
            fields["labels"] = json!(labels.join(","));
        }
        if let Some(a) = &case.assignee {
            fields["assignee_ids"] = json!([self.user_id(a).await?]);
        }
        let v = self
            .json(
                Method::POST,
                &format!("/projects/{}/issues", rest::encode(&case.group)),
                Some(who),
                Some(fields),
            )
            .await?;
        Gitlab::case_from(&v)
    }

    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text_: &str,
    ) -> Result<Case, TrackerError> {
        self.note(who, group, number, text_).await?;
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
            self.note(who, group, number, n).await?;
        }
        let event = if closed { "close" } else { "reopen" };
        self.edit(who, group, number, json!({ "state_event": event }))
            .await
    }

    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> Result<Case, TrackerError> {
        let id = self.user_id(assignee_login).await?;
        self.edit(who, group, number, json!({ "assignee_ids": [id] }))
            .await
    }

    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        let v = self
            .json(
                Method::GET,
                &format!("/projects/{}/issues/{number}", rest::encode(group)),
                Some(who),
                None,
            )
            .await?;
        Gitlab::case_from(&v)
    }

    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        let v = self
            .json(
                Method::GET,
                &format!(
                    "/projects/{}/issues?search={}&per_page=5",
                    rest::encode(group),
                    rest::encode(words.trim())
                ),
                Some(who),
                None,
            )
            .await?;
        Gitlab::cases_from(&v)
    }

    /// `assignee_username` on the project's issue list: documented for every supported GitLab, and
    /// the same with Sudo or the person's own token.
    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        let v = self
            .json(
                Method::GET,
                &format!(
                    "/projects/{}/issues?assignee_username={}&state=opened&per_page=10",
                    rest::encode(group),
                    rest::encode(&who.login)
                ),
                Some(who),
                None,
            )
            .await?;
        Gitlab::cases_from(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::gitlab_message;
    use serde_json::json;

    #[test]
    fn reads_gitlab_error_bodies() {
        // Shapes from GitLab's REST API docs (status code 400, sudo errors).
        assert_eq!(
            gitlab_message(&json!({"message": "400 (Bad request) \"title\" not given"})).as_deref(),
            Some("400 (Bad request) \"title\" not given")
        );
        assert_eq!(
            gitlab_message(
                &json!({"message": {"bio": ["is too long (maximum is 255 characters)"]}})
            )
            .as_deref(),
            Some("bio is too long (maximum is 255 characters)")
        );
        assert_eq!(
            gitlab_message(&json!({"error": "insufficient_scope", "error_description": "The request requires higher privileges than provided by the access token.", "scope": "sudo"})).as_deref(),
            Some("insufficient_scope: The request requires higher privileges than provided by the access token.")
        );
    }
}
