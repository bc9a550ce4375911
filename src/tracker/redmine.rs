//! Redmine's REST API (facts in ../shared/notes/redmine.md): `X-Redmine-API-Key`, and with an admin key
//! `X-Redmine-Switch-User: <login>` to act as a person (unknown or locked login → 412). `PUT` answers
//! 204 without a body, so changes are read back. Idempotent reads are retried with backoff.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use tokio::sync::Mutex;

use super::rest;
use super::{Actor, Case, Group, Member, NewCase, Tracker, TrackerError, Vocabulary};
use crate::webhook::{at, text};

/// Redmine's error bodies: 422 carries `{"errors": [..]}`; other errors carry no message we show.
const REDMINE_ERRORS: rest::Errors = rest::Errors {
    rejected: &[],
    message: redmine_errors,
};

fn redmine_errors(v: &Value) -> Option<String> {
    let errors: Vec<&str> = v
        .get("errors")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

const REDMINE_AUTH: rest::Auth = rest::Auth {
    header: "X-Redmine-API-Key",
    scheme: "",
    switch: "X-Redmine-Switch-User",
};
/// A Redmine instance.
pub struct Redmine {
    base: String,
    key: String,
    http: rest::Http,
    /// Cached lookups: status ids, tracker ids, priority ids, user ids by login.
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    users: HashMap<String, u64>,
    statuses: Vec<(u64, String, bool)>,
    trackers: Vec<(u64, String)>,
    priorities: Vec<(u64, String)>,
}

impl Redmine {
    /// A client for `base` (e.g. `http://127.0.0.1:3100`) with an (admin) API key.
    pub fn new(base: &str, key: &str) -> Result<Redmine, TrackerError> {
        let http = rest::http_client()?;
        Ok(Redmine {
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            http,
            cache: Mutex::new(Cache::default()),
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
        let headers = REDMINE_AUTH.headers(&self.key, who);
        let url = format!("{}{path}", self.base);
        let reply = rest::send(&self.http, method, &url, &headers, body.as_ref()).await?;
        if reply.status.is_success() {
            return reply.json();
        }
        if reply.status == StatusCode::PRECONDITION_FAILED {
            return Err(TrackerError::Denied(format!(
                "Redmine does not know the user {:?} or the user is locked",
                who.map(|a| a.login.as_str()).unwrap_or("")
            )));
        }
        Err(rest::error_for(&reply, path, &REDMINE_ERRORS))
    }

    async fn get_json(&self, path: &str, who: Option<&Actor>) -> Result<Value, TrackerError> {
        rest::needed(self.call(Method::GET, path, who, None).await?, path)
    }

    /// All pages of a list endpoint.
    async fn list(&self, path: &str, key: &str) -> Result<Vec<Value>, TrackerError> {
        let mut out = Vec::new();
        let sep = if path.contains('?') { '&' } else { '?' };
        loop {
            let page = self
                .get_json(&format!("{path}{sep}limit=100&offset={}", out.len()), None)
                .await?;
            let items = page
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = page.get("total_count").and_then(Value::as_u64).unwrap_or(0) as usize;
            let n = items.len();
            out.extend(items);
            if n == 0 || out.len() >= total {
                return Ok(out);
            }
        }
    }

    async fn load_cache(&self) -> Result<(), TrackerError> {
        let mut c = self.cache.lock().await;
        if !c.statuses.is_empty() {
            return Ok(());
        }
        let s = self.get_json("/issue_statuses.json", None).await?;
        c.statuses = at(&s, "issue_statuses")
            .and_then(Value::as_array)
            .map(|a| statuses_of(a))
            .unwrap_or_default();
        let t = self.get_json("/trackers.json", None).await?;
        c.trackers = id_names(&t, "trackers");
        let p = self
            .get_json("/enumerations/issue_priorities.json", None)
            .await?;
        c.priorities = id_names(&p, "issue_priorities");
        Ok(())
    }

    async fn user_id(&self, login: &str) -> Result<u64, TrackerError> {
        if let Some(id) = self.cache.lock().await.users.get(login) {
            return Ok(*id);
        }
        let users = self.list("/users.json?status=1", "users").await?;
        let mut c = self.cache.lock().await;
        for u in &users {
            if let (Some(id), Some(l)) = (u.get("id").and_then(Value::as_u64), text(u, "login")) {
                c.users.insert(l, id);
            }
        }
        c.users
            .get(login)
            .copied()
            .ok_or_else(|| TrackerError::NotFound(format!("Redmine user {login:?}")))
    }

    fn case_from(&self, v: &Value) -> Result<Case, TrackerError> {
        let issue = v.get("issue").unwrap_or(v);
        let number = issue
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| TrackerError::Protocol("issue without id".into()))?;
        Ok(Case {
            number,
            title: text(issue, "subject").unwrap_or_default(),
            status: text(issue, "status.name").unwrap_or_default(),
            // `closed_on` stays set when an issue is reopened: only a status without `is_closed`
            // (older Redmine) falls back to it.
            closed: at(issue, "status.is_closed")
                .and_then(Value::as_bool)
                .unwrap_or_else(|| at(issue, "closed_on").is_some_and(|c| !c.is_null())),
            assignee: text(issue, "assigned_to.name"),
            author: text(issue, "author.name").unwrap_or_default(),
            url: format!("{}/issues/{number}", self.base),
            private: at(issue, "is_private").and_then(Value::as_bool) == Some(true),
        })
    }

    /// Case `number` of project `group` as `who` sees it. Redmine numbers issues across all projects, so
    /// the project is part of the query (its subprojects excluded: they have rooms of their own): a
    /// command typed in one project's room never reads, changes or echoes into that room a case of
    /// another project, which the room's other members may not be allowed to see.
    async fn find_in(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        let v = self
            .get_json(
                &format!(
                    "/issues.json?issue_id={number}&project_id={}&subproject_id=!*&status_id=*",
                    rest::encode(group)
                ),
                Some(who),
            )
            .await?;
        match at(&v, "issues")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            Some(issue) => self.case_from(issue),
            None => Err(TrackerError::NotFound(format!(
                "#{number} in project {group}"
            ))),
        }
    }

    /// Change case `number` of `group` as `who`, after checking it belongs to `group`.
    async fn update(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        fields: Value,
    ) -> Result<Case, TrackerError> {
        self.find_in(who, group, number).await?;
        self.put(who, group, number, fields).await
    }

    /// Change a case already checked to belong to `group`; its state afterwards.
    async fn put(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        fields: Value,
    ) -> Result<Case, TrackerError> {
        self.call(
            Method::PUT,
            &format!("/issues/{number}.json"),
            Some(who),
            Some(json!({ "issue": fields })),
        )
        .await?;
        self.find_in(who, group, number).await
    }
}

impl Redmine {
    /// Where a first catch-up starts: the newest `updated_on` Redmine has (its own clock, so a skewed
    /// clock here cannot open a gap), or `None` when it has no issue yet.
    pub async fn latest_change(&self) -> Result<Option<String>, TrackerError> {
        let page = self
            .get_json(
                "/issues.json?status_id=*&sort=updated_on:desc&limit=1",
                None,
            )
            .await?;
        Ok(page
            .get("issues")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|i| text(i, "updated_on")))
    }

    /// Catch-up: every issue creation and journal since `since` (ISO 8601, UTC), as deliveries in the
    /// caseroom plugin's format with the same delivery ids (`redmine:issue:<id>:created`,
    /// `redmine:journal:<id>`), so the inbox keeps each change once, whichever path brought it first.
    /// Returns the deliveries and the new cursor (the latest `updated_on` seen). Redmine's `updated_on`
    /// has 1-second resolution, so the query uses `>=` and relies on the delivery ids to deduplicate.
    pub async fn changes_since(
        &self,
        since: &str,
    ) -> Result<(Vec<(String, Vec<u8>)>, String), TrackerError> {
        let issues = self
            .list(
                &format!("/issues.json?updated_on=%3E%3D{since}&status_id=*&sort=updated_on"),
                "issues",
            )
            .await?;
        let mut out = Vec::new();
        let mut cursor = since.to_owned();
        let mut identifiers: HashMap<u64, String> = HashMap::new();
        for brief in issues {
            let Some(id) = brief.get("id").and_then(Value::as_u64) else {
                continue;
            };
            let full = self
                .get_json(&format!("/issues/{id}.json?include=journals"), None)
                .await?;
            let Some(mut issue) = full.get("issue").cloned() else {
                continue;
            };
            if let Some(u) = text(&issue, "updated_on") {
                if u > cursor {
                    cursor = u;
                }
            }
            // The REST API names the project without its identifier; rooms are keyed by it.
            if let Some(pid) = at(&issue, "project.id").and_then(Value::as_u64) {
                let identifier = match identifiers.get(&pid) {
                    Some(i) => i.clone(),
                    None => {
                        let p = self
                            .get_json(&format!("/projects/{pid}.json"), None)
                            .await?;
                        let i = text(&p, "project.identifier").unwrap_or_default();
                        identifiers.insert(pid, i.clone());
                        i
                    }
                };
                issue["project"]["identifier"] = json!(identifier);
            }
            issue["url"] = json!(format!("{}/issues/{id}", self.base));
            let journals = issue
                .as_object_mut()
                .and_then(|o| o.remove("journals"))
                .unwrap_or(Value::Null);
            if text(&issue, "created_on").is_some_and(|c| c.as_str() >= since) {
                let body = json!({ "type": "issue.created", "timestamp": text(&issue, "created_on"), "data": { "issue": issue } });
                out.push((
                    format!("redmine:issue:{id}:created"),
                    body.to_string().into_bytes(),
                ));
            }
            for j in journals.as_array().into_iter().flatten() {
                let (Some(jid), Some(created)) =
                    (j.get("id").and_then(Value::as_u64), text(j, "created_on"))
                else {
                    continue;
                };
                if created.as_str() < since {
                    continue;
                }
                // The API's journal details say name/new_value; the webhook format says prop_key/value.
                let details: Vec<Value> = j
                    .get("details")
                    .and_then(Value::as_array)
                    .map(|d| {
                        d.iter()
                            .map(|x| json!({ "property": x.get("property"), "prop_key": x.get("name"), "old_value": x.get("old_value"), "value": x.get("new_value") }))
                            .collect()
                    })
                    .unwrap_or_default();
                let journal = json!({ "id": jid, "notes": j.get("notes"), "private_notes": j.get("private_notes"), "created_on": created, "user": j.get("user"), "details": details });
                let body = json!({ "type": "issue.updated", "timestamp": created, "data": { "issue": issue, "journal": journal } });
                out.push((
                    format!("redmine:journal:{jid}"),
                    body.to_string().into_bytes(),
                ));
            }
        }
        Ok((out, cursor))
    }
}

/// (id, name, is_closed) of Redmine issue statuses.
fn statuses_of(a: &[Value]) -> Vec<(u64, String, bool)> {
    a.iter()
        .filter_map(|x| {
            Some((
                x.get("id")?.as_u64()?,
                text(x, "name")?,
                x.get("is_closed").and_then(Value::as_bool).unwrap_or(false),
            ))
        })
        .collect()
}

fn id_names(v: &Value, key: &str) -> Vec<(u64, String)> {
    at(v, key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x.get("id")?.as_u64()?, text(x, "name")?)))
                .collect()
        })
        .unwrap_or_default()
}

impl Tracker for Redmine {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        let projects = self.list("/projects.json", "projects").await?;
        let mut logins: HashMap<u64, String> = HashMap::new();
        for u in self.list("/users.json?status=1", "users").await? {
            if let (Some(id), Some(l)) = (u.get("id").and_then(Value::as_u64), text(&u, "login")) {
                logins.insert(id, l.clone());
                self.cache.lock().await.users.insert(l, id);
            }
        }
        let mut out = Vec::new();
        for p in projects {
            let Some(identifier) = text(&p, "identifier") else {
                continue;
            };
            let mut members = Vec::new();
            for m in self
                .list(
                    &format!("/projects/{identifier}/memberships.json"),
                    "memberships",
                )
                .await?
            {
                // A group's membership (`group`, no `user`) is skipped: Redmine lists each user of
                // the group as a membership of its own with the roles marked `inherited` (checked on
                // Redmine 5), so group members arrive here as users.
                let Some(uid) = at(&m, "user.id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(login) = logins.get(&uid) else {
                    continue;
                }; // locked users are not listed
                members.push(Member {
                    login: login.clone(),
                    name: text(&m, "user.name").unwrap_or_else(|| login.clone()),
                    roles: crate::webhook::names(&m, "roles", "name"),
                });
            }
            out.push(Group {
                id: identifier,
                name: text(&p, "name").unwrap_or_default(),
                description: text(&p, "description").unwrap_or_default(),
                members,
            });
        }
        Ok(out)
    }

    /// Types are the project's enabled trackers (another tracker would be refused: "Tracker is not
    /// included in the list"), in Redmine's order; priorities are global.
    async fn vocabulary(&self, group: &str) -> Result<Vocabulary, TrackerError> {
        self.load_cache().await?;
        let p = self
            .get_json(
                &format!("/projects/{}.json?include=trackers", rest::encode(group)),
                None,
            )
            .await?;
        let enabled = id_names(&p, "project.trackers");
        let c = self.cache.lock().await;
        Ok(Vocabulary {
            kinds: if enabled.is_empty() {
                c.trackers.iter().map(|(_, n)| n.clone()).collect()
            } else {
                enabled.into_iter().map(|(_, n)| n).collect()
            },
            priorities: c.priorities.iter().map(|(_, n)| n.clone()).collect(),
        })
    }

    async fn whoami(&self, token: &str) -> Result<String, TrackerError> {
        let who = Actor {
            login: String::new(),
            token: Some(token.to_owned()),
        };
        let v = self.get_json("/users/current.json", Some(&who)).await?;
        text(&v, "user.login")
            .ok_or_else(|| TrackerError::Protocol("no user.login in /users/current.json".into()))
    }

    async fn create(&self, who: &Actor, case: &NewCase) -> Result<Case, TrackerError> {
        self.load_cache().await?;
        let mut fields = json!({
            "project_id": case.group,
            "subject": case.title,
            "description": case.description,
        });
        if let Some(a) = &case.assignee {
            fields["assigned_to_id"] = json!(self.user_id(a).await?);
        }
        {
            let c = self.cache.lock().await;
            if let Some(k) = &case.kind {
                if let Some((id, _)) = c.trackers.iter().find(|(_, n)| n == k) {
                    fields["tracker_id"] = json!(id);
                }
            }
            if let Some(p) = &case.priority {
                if let Some((id, _)) = c.priorities.iter().find(|(_, n)| n == p) {
                    fields["priority_id"] = json!(id);
                }
            }
        }
        let v = self
            .call(
                Method::POST,
                "/issues.json",
                Some(who),
                Some(json!({ "issue": fields })),
            )
            .await?
            .ok_or_else(|| TrackerError::Protocol("no issue in the answer".into()))?;
        self.case_from(&v)
    }

    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text_: &str,
    ) -> Result<Case, TrackerError> {
        self.update(who, group, number, json!({ "notes": text_ }))
            .await
    }

    async fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> Result<Case, TrackerError> {
        let current = self.find_in(who, group, number).await?;
        if current.closed == closed {
            // Already so: nothing to change, but a note is still a note.
            return match note {
                Some(n) => self.put(who, group, number, json!({ "notes": n })).await,
                None => Ok(current),
            };
        }
        // Redmine's workflow decides which statuses this person may set on this issue, and a status
        // it does not allow is ignored with a 204 all the same. So pick among the allowed ones
        // (`include=allowed_statuses`, Redmine ≥ 5.0; all statuses on older versions) and check after.
        let v = self
            .get_json(
                &format!("/issues/{number}.json?include=allowed_statuses"),
                Some(who),
            )
            .await?;
        let allowed = match at(&v, "issue.allowed_statuses").and_then(Value::as_array) {
            Some(a) => statuses_of(a),
            None => {
                self.load_cache().await?;
                self.cache.lock().await.statuses.clone()
            }
        };
        let (verb, prefer) = if closed {
            ("close", "Closed")
        } else {
            ("reopen", "New")
        };
        let status = allowed
            .iter()
            .filter(|(_, _, cl)| *cl == closed)
            .min_by_key(|(_, n, _)| usize::from(!n.eq_ignore_ascii_case(prefer)))
            .map(|(id, _, _)| *id)
            .ok_or_else(|| {
                TrackerError::Denied(format!(
                    "Redmine's workflow does not let {} {verb} #{number} (status {})",
                    who.login, current.status
                ))
            })?;
        let mut fields = json!({ "status_id": status });
        if let Some(n) = note {
            fields["notes"] = json!(n);
        }
        let after = self.put(who, group, number, fields).await?;
        if after.closed != closed {
            return Err(TrackerError::Rejected(format!(
                "Redmine kept #{number} as {} (its workflow decides who may {verb} it)",
                after.status
            )));
        }
        Ok(after)
    }

    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> Result<Case, TrackerError> {
        let id = self.user_id(assignee_login).await?;
        self.update(who, group, number, json!({ "assigned_to_id": id }))
            .await
    }

    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        self.find_in(who, group, number).await
    }

    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        let q: String = words
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { ' ' })
            .collect();
        let q = q.split_whitespace().collect::<Vec<_>>().join("+");
        let v = self
            .get_json(&format!("/issues.json?project_id={}&subproject_id=!*&status_id=*&subject=~{q}&limit=5&sort=updated_on:desc", rest::encode(group)), Some(who))
            .await?;
        at(&v, "issues")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|i| self.case_from(i)).collect())
            .unwrap_or(Ok(vec![]))
    }

    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        let v = self
            .get_json(
                &format!(
                    "/issues.json?project_id={}&subproject_id=!*&assigned_to_id=me&status_id=open&limit=10&sort=updated_on:desc",
                    rest::encode(group)
                ),
                Some(who),
            )
            .await?;
        at(&v, "issues")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|i| self.case_from(i)).collect())
            .unwrap_or(Ok(vec![]))
    }
}
