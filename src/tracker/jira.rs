//! Jira Cloud's REST API, version 3 (`<url>/rest/api/3`, described in Atlassian's
//! swagger-v3.v3.json).
//!
//! - Authentication: the configured key and linked tokens are `email:API token` (HTTP Basic, as
//!   Atlassian documents for scripts), or a bare bearer token (an OAuth 2.0 access token, or a Data
//!   Center personal access token). **Jira cannot impersonate**: the key is used for the sync only;
//!   every command runs with the person's own linked token, and a person who linked none is told how.
//! - Groups are the projects the key sees (`GET /project/search`, 50 a page); the group id is the
//!   project key (`ED`), as webhooks carry it; cases are numbered within it (`ED-24` is case 24).
//! - Members come from project roles (`GET /project/{key}/role`, then each role): user actors with
//!   the role's name (map roles with `[tracker.roles]`), and the members of group actors
//!   (`GET /group/member`, paged). A member's login is their `accountId` (Jira Cloud shows no user
//!   names or, usually, emails): map them to JIDs in `[tracker.identity.map]`, or let people link.
//! - Vocabulary: the project's issue types (`GET /issue/createmeta?projectKeys=`) and the site's
//!   priorities (`GET /priority`). A new case without a type gets "Task" if the project has it,
//!   else its first type that is not a sub-task (Jira requires one).
//! - Close and reopen are workflow transitions: close takes the first transition into a status whose
//!   category is `done` (or, failing that, named Done/Closed/Resolved); reopen the first into any
//!   other status. A workflow without one is answered with the transitions it offers.
//! - Text (descriptions, comments) is sent as Atlassian Document Format: one paragraph per block of
//!   lines, lines joined by hard breaks.
//! - Errors: `{"errorMessages": [...], "errors": {field: message}}`; 400 is `Rejected` with them.

use reqwest::Method;
use serde_json::{json, Value};

use super::rest;
use super::{Actor, Case, Group, Member, NewCase, Tracker, TrackerError, Vocabulary};
use crate::webhook::{at, text};

/// Page size of project and group member lists (Jira Cloud's default maximum).
const PAGE: usize = 50;

/// Statuses that mean closed when a status has no category (older servers' payloads).
const CLOSED_NAMES: &[&str] = &["done", "closed", "resolved"];

/// The fields a case is read with.
const CASE_FIELDS: &str = "summary,status,assignee,reporter,security";

const JIRA_ERRORS: rest::Errors = rest::Errors {
    rejected: &[400],
    message: error_message,
};

/// `errorMessages` and `errors` of a Jira error body, as one line.
fn error_message(v: &Value) -> Option<String> {
    let mut parts: Vec<String> = v
        .get("errorMessages")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if let Some(errors) = v.get("errors").and_then(Value::as_object) {
        for (field, m) in errors {
            if let Some(m) = m.as_str() {
                parts.push(format!("{field}: {m}"));
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// A Jira Cloud site.
pub struct Jira {
    base: String,
    key: String,
    http: rest::Http,
}

impl Jira {
    /// A client for the site at `base` (`https://your-domain.atlassian.net`), with `key` (see the
    /// module's notes) that sees the projects to mirror and their roles.
    pub fn new(base: &str, key: &str) -> Result<Jira, TrackerError> {
        Ok(Jira {
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            http: rest::http_client()?,
        })
    }

    /// Refuse answers larger than `n` bytes (`[[tracker]] max_response_bytes`).
    pub fn set_max_response(&mut self, n: usize) {
        self.http.max_response = n;
    }

    fn headers(&self, who: Option<&Actor>) -> Result<Vec<(&'static str, String)>, TrackerError> {
        use base64::Engine as _;
        let token = match who {
            None => self.key.as_str(),
            Some(Actor { token: Some(t), .. }) => t.as_str(),
            Some(a) => return Err(TrackerError::NotLinked(format!(
                "Jira cannot act for {}: link your Jira account first (ad-hoc command \"Link my tracker account\", with your-email:API-token — make a token at id.atlassian.com, Security, API tokens), then send the command again",
                a.login
            ))),
        };
        let auth = if token.contains(':') {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(token)
            )
        } else {
            format!("Bearer {token}")
        };
        Ok(vec![
            ("Authorization", auth),
            ("Accept", "application/json".to_owned()),
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
        let api = format!("{}/rest/api/3", self.base);
        let to = (api.as_str(), path);
        rest::call_json(
            &self.http,
            method,
            to,
            &headers,
            body.as_ref(),
            &JIRA_ERRORS,
        )
        .await
    }

    async fn get_json(&self, path: &str, who: Option<&Actor>) -> Result<Value, TrackerError> {
        rest::needed(self.call(Method::GET, path, who, None).await?, path)
    }

    /// Every page of a `{values, isLast}` list, with the configured key.
    async fn pages(&self, path: &str) -> Result<Vec<Value>, TrackerError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut out = Vec::new();
        for _ in 0..1000 {
            let v = self
                .get_json(
                    &format!("{path}{sep}startAt={}&maxResults={PAGE}", out.len()),
                    None,
                )
                .await?;
            let values = v.get("values").and_then(Value::as_array).ok_or_else(|| {
                TrackerError::Protocol(format!("no values in the answer to {path}"))
            })?;
            let asked = out.len() as u64;
            let n = values.len() as u64;
            let start = v.get("startAt").and_then(Value::as_u64).unwrap_or(asked);
            if start < asked {
                // A page we had already: the tracker ignores startAt. Stop rather than loop.
                tracing::warn!(
                    path,
                    asked,
                    start,
                    "Jira answered an earlier page again; the list ends here"
                );
                break;
            }
            out.extend(values.iter().cloned());
            let total = v.get("total").and_then(Value::as_u64);
            if n == 0
                || v.get("isLast").and_then(Value::as_bool) != Some(false)
                || total.is_some_and(|t| start + n >= t)
            {
                break;
            }
        }
        Ok(out)
    }

    /// A project's members with their role names, from its roles' actors.
    async fn members(&self, project: &str) -> Result<Vec<Member>, TrackerError> {
        let key = rest::encode(project);
        let roles = self.get_json(&format!("/project/{key}/role"), None).await?;
        let roles = roles
            .as_object()
            .ok_or_else(|| TrackerError::Protocol("project roles are not a map".into()))?;
        let mut found: std::collections::BTreeMap<String, Member> = Default::default();
        let mut groups: std::collections::HashMap<String, Vec<(String, String)>> =
            Default::default();
        for (role, url) in roles {
            let Some(id) = url
                .as_str()
                .and_then(|u| u.rsplit('/').next())
                .and_then(|id| id.parse::<u64>().ok())
            else {
                continue;
            };
            let r = self
                .get_json(&format!("/project/{key}/role/{id}"), None)
                .await?;
            let actors = r.get("actors").and_then(Value::as_array).cloned();
            for actor in actors.unwrap_or_default() {
                let people = match text(&actor, "type").as_deref() {
                    Some("atlassian-user-role-actor") => user_login(&actor, "actorUser")
                        .map(|login| vec![(login, text(&actor, "displayName").unwrap_or_default())])
                        .unwrap_or_default(),
                    Some("atlassian-group-role-actor") => {
                        let Some(gid) = text(&actor, "actorGroup.groupId") else {
                            continue;
                        };
                        if !groups.contains_key(&gid) {
                            let list = self.group_members(&gid).await?;
                            groups.insert(gid.clone(), list);
                        }
                        groups.get(&gid).cloned().unwrap_or_default()
                    }
                    _ => vec![],
                };
                for (login, name) in people {
                    let m = found.entry(login.clone()).or_insert_with(|| Member {
                        login,
                        name,
                        roles: vec![],
                    });
                    if !m.roles.contains(role) {
                        m.roles.push(role.clone());
                    }
                }
            }
        }
        Ok(found.into_values().collect())
    }

    /// The active members of a Jira group: (login, display name).
    async fn group_members(&self, group_id: &str) -> Result<Vec<(String, String)>, TrackerError> {
        Ok(self
            .pages(&format!("/group/member?groupId={}", rest::encode(group_id)))
            .await?
            .iter()
            .filter(|u| u.get("active").and_then(Value::as_bool) != Some(false))
            .filter_map(|u| {
                let login = user_login(u, "")?;
                Some((login, text(u, "displayName").unwrap_or_default()))
            })
            .collect())
    }

    /// A case, read as `who`.
    async fn read(&self, who: &Actor, issue_key: &str) -> Result<Case, TrackerError> {
        let v = self
            .get_json(
                &format!("/issue/{}?fields={CASE_FIELDS}", rest::encode(issue_key)),
                Some(who),
            )
            .await?;
        self.case_from(&v)
    }

    fn case_from(&self, v: &Value) -> Result<Case, TrackerError> {
        let key =
            text(v, "key").ok_or_else(|| TrackerError::Protocol("issue without key".into()))?;
        let number = key
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| TrackerError::Protocol(format!("issue key {key:?} has no number")))?;
        let status = text(v, "fields.status.name").unwrap_or_default();
        let closed = match text(v, "fields.status.statusCategory.key") {
            Some(k) => k == "done",
            None => CLOSED_NAMES.contains(&status.to_lowercase().as_str()),
        };
        Ok(Case {
            number,
            title: text(v, "fields.summary").unwrap_or_default(),
            status,
            closed,
            assignee: text(v, "fields.assignee.displayName"),
            author: text(v, "fields.reporter.displayName").unwrap_or_default(),
            url: format!("{}/browse/{key}", self.base),
            // An issue security level: only some of the project may see it.
            private: at(v, "fields.security").is_some_and(|s| !s.is_null()),
        })
    }

    async fn find(&self, who: &Actor, jql: &str) -> Result<Vec<Case>, TrackerError> {
        let v = self
            .get_json(
                &format!(
                    "/search?jql={}&maxResults=5&fields={CASE_FIELDS}",
                    rest::encode(jql)
                ),
                Some(who),
            )
            .await?;
        v.get("issues")
            .and_then(Value::as_array)
            .ok_or_else(|| TrackerError::Protocol("no issues in the search answer".into()))?
            .iter()
            .map(|i| self.case_from(i))
            .collect()
    }

    async fn post_comment(&self, who: &Actor, key: &str, body: &str) -> Result<(), TrackerError> {
        self.call(
            Method::POST,
            &format!("/issue/{}/comment", rest::encode(key)),
            Some(who),
            Some(json!({ "body": adf(body) })),
        )
        .await?;
        Ok(())
    }

    /// The issue type a new case gets when none was asked for.
    async fn default_type(&self, project: &str) -> Result<String, TrackerError> {
        let kinds = self.issue_types(project).await?;
        kinds
            .iter()
            .find(|k| k.eq_ignore_ascii_case("task"))
            .or_else(|| kinds.first())
            .cloned()
            .ok_or_else(|| {
                TrackerError::Rejected(format!("project {project} offers no issue type"))
            })
    }

    /// The project's issue types that are not sub-tasks.
    async fn issue_types(&self, project: &str) -> Result<Vec<String>, TrackerError> {
        let v = self
            .get_json(
                &format!("/issue/createmeta?projectKeys={}", rest::encode(project)),
                None,
            )
            .await?;
        Ok(at(&v, "projects.0.issuetypes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|t| t.get("subtask").and_then(Value::as_bool) != Some(true))
                    .filter_map(|t| text(t, "name"))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A user's login: `accountId` on Jira Cloud (`name` where a server still has user names), under
/// `prefix` (`actorUser`) or at the top when `prefix` is empty.
fn user_login(v: &Value, prefix: &str) -> Option<String> {
    let path = |f: &str| {
        if prefix.is_empty() {
            f.to_owned()
        } else {
            format!("{prefix}.{f}")
        }
    };
    text(v, &path("name"))
        .filter(|n| !n.is_empty())
        .or_else(|| text(v, &path("accountId")))
}

/// Plain text as an Atlassian Document Format document: a paragraph per block of lines (blank
/// lines separate blocks), lines within a block joined by hard breaks.
pub fn adf(text: &str) -> Value {
    let paragraphs: Vec<Value> = text
        .split("\n\n")
        .map(|block| block.trim_matches('\n'))
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut content = Vec::new();
            for (i, line) in block.lines().enumerate() {
                if i > 0 {
                    content.push(json!({ "type": "hardBreak" }));
                }
                // ADF refuses empty text nodes.
                if !line.is_empty() {
                    content.push(json!({ "type": "text", "text": line }));
                }
            }
            json!({ "type": "paragraph", "content": content })
        })
        .collect();
    json!({ "type": "doc", "version": 1, "content": paragraphs })
}

/// JQL string literal: quoted, with `"` and `\` escaped.
fn jql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `PROJECT-N`.
fn issue_key(group: &str, number: u64) -> String {
    format!("{group}-{number}")
}

/// The transition to take: into a done status to close, into any other to reopen.
fn pick_transition(transitions: &Value, close: bool) -> Result<String, TrackerError> {
    let list = transitions
        .get("transitions")
        .and_then(Value::as_array)
        .ok_or_else(|| TrackerError::Protocol("no transitions in the answer".into()))?;
    let done = |t: &Value| match text(t, "to.statusCategory.key") {
        Some(k) if k == "done" => true,
        _ => text(t, "to.name").is_some_and(|n| CLOSED_NAMES.contains(&n.to_lowercase().as_str())),
    };
    list.iter()
        .find(|t| done(t) == close)
        .and_then(|t| text(t, "id"))
        .ok_or_else(|| {
            let offered: Vec<String> = list
                .iter()
                .filter_map(|t| Some(format!("{} → {}", text(t, "name")?, text(t, "to.name")?)))
                .collect();
            TrackerError::Rejected(format!(
                "the workflow offers no transition {} here (offered: {})",
                if close {
                    "into a done status"
                } else {
                    "out of the done statuses"
                },
                if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join(", ")
                }
            ))
        })
}

impl Tracker for Jira {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        let mut out = Vec::new();
        for p in self.pages("/project/search").await? {
            let Some(key) = text(&p, "key") else {
                continue;
            };
            let members = self.members(&key).await?;
            out.push(Group {
                name: text(&p, "name").unwrap_or_else(|| key.clone()),
                description: text(&p, "description").unwrap_or_default(),
                id: key,
                members,
            });
        }
        Ok(out)
    }

    async fn vocabulary(&self, group: &str) -> Result<Vocabulary, TrackerError> {
        let kinds = self.issue_types(group).await?;
        let priorities = self
            .get_json("/priority", None)
            .await?
            .as_array()
            .map(|a| a.iter().filter_map(|p| text(p, "name")).collect())
            .unwrap_or_default();
        Ok(Vocabulary { kinds, priorities })
    }

    async fn whoami(&self, token: &str) -> Result<String, TrackerError> {
        let who = Actor {
            login: String::new(),
            token: Some(token.to_owned()),
        };
        let v = self.get_json("/myself", Some(&who)).await?;
        user_login(&v, "").ok_or_else(|| TrackerError::Protocol("no accountId in /myself".into()))
    }

    async fn create(&self, who: &Actor, case: &NewCase) -> Result<Case, TrackerError> {
        self.headers(Some(who))?; // not linked: say so before reading anything
        let kind = match &case.kind {
            Some(k) => k.clone(),
            None => self.default_type(&case.group).await?,
        };
        let mut fields = json!({
            "project": { "key": case.group },
            "summary": case.title,
            "issuetype": { "name": kind },
        });
        if !case.description.trim().is_empty() {
            fields["description"] = adf(&case.description);
        }
        if let Some(p) = &case.priority {
            fields["priority"] = json!({ "name": p });
        }
        if let Some(a) = &case.assignee {
            fields["assignee"] = json!({ "accountId": a });
        }
        let made = self
            .call(
                Method::POST,
                "/issue",
                Some(who),
                Some(json!({ "fields": fields })),
            )
            .await?
            .ok_or_else(|| TrackerError::Protocol("no issue in the answer".into()))?;
        let key = text(&made, "key")
            .ok_or_else(|| TrackerError::Protocol("no key in the created issue".into()))?;
        self.read(who, &key).await
    }

    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text_: &str,
    ) -> Result<Case, TrackerError> {
        let key = issue_key(group, number);
        self.post_comment(who, &key, text_).await?;
        self.read(who, &key).await
    }

    async fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        note: Option<&str>,
    ) -> Result<Case, TrackerError> {
        let key = issue_key(group, number);
        let path = format!("/issue/{}/transitions", rest::encode(&key));
        let offered = self.get_json(&path, Some(who)).await?;
        let id = pick_transition(&offered, closed)?;
        if let Some(n) = note {
            self.post_comment(who, &key, n).await?;
        }
        self.call(
            Method::POST,
            &path,
            Some(who),
            Some(json!({ "transition": { "id": id } })),
        )
        .await?;
        self.read(who, &key).await
    }

    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        assignee_login: &str,
    ) -> Result<Case, TrackerError> {
        let key = issue_key(group, number);
        self.call(
            Method::PUT,
            &format!("/issue/{}/assignee", rest::encode(&key)),
            Some(who),
            Some(json!({ "accountId": assignee_login })),
        )
        .await?;
        self.read(who, &key).await
    }

    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        self.read(who, &issue_key(group, number)).await
    }

    /// Jira's text search (summary, description, comments) within the project, newest first.
    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        let jql = format!(
            "project = {} AND text ~ {} ORDER BY updated DESC",
            jql_string(group),
            jql_string(words.trim())
        );
        self.find(who, &jql).await
    }

    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        let jql = format!(
            "project = {} AND assignee = currentUser() AND statusCategory != Done ORDER BY updated DESC",
            jql_string(group)
        );
        self.find(who, &jql).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_paragraphs_with_hard_breaks() {
        assert_eq!(
            adf("Steps:\nopen the page\n\nThen it fails"),
            json!({"type": "doc", "version": 1, "content": [
                {"type": "paragraph", "content": [
                    {"type": "text", "text": "Steps:"}, {"type": "hardBreak"},
                    {"type": "text", "text": "open the page"}]},
                {"type": "paragraph", "content": [{"type": "text", "text": "Then it fails"}]},
            ]})
        );
        assert_eq!(
            adf("\n\n \n"),
            json!({"type": "doc", "version": 1, "content": []})
        );
    }

    #[test]
    fn a_workflow_without_a_way_to_close_says_what_it_offers() {
        let mut offered: Value = serde_json::from_str(include_str!(
            "../../fixtures/trackers/jira/transitions.get.json"
        ))
        .expect("fixture");
        assert_eq!(pick_transition(&offered, true).expect("close"), "711");
        assert_eq!(pick_transition(&offered, false).expect("reopen"), "2");
        // Without "QA Review" (into Closed), nothing closes: the answer names what there is.
        offered["transitions"]
            .as_array_mut()
            .expect("list")
            .retain(|t| t["id"] != "711");
        match pick_transition(&offered, true) {
            Err(TrackerError::Rejected(m)) => assert_eq!(
                m,
                "the workflow offers no transition into a done status here (offered: Close Issue → In Progress)"
            ),
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[test]
    fn jql_strings_cannot_break_out() {
        assert_eq!(
            jql_string(r#"a" OR project = "X\"#),
            r#""a\" OR project = \"X\\""#
        );
    }
}
