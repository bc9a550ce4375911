//! GitLab: `X-Gitlab-Event` names the hook; `object_kind` and `object_attributes.action` say what happened.
//! Confidential issues and notes are marked private and never posted.

use serde_json::Value;

use super::{at, first_line, first_text, names, text, DialectError, Headers, Normalized};
use crate::activity::{Activity, Actor, EventKind, Object, Verb};

fn actor(v: &Value) -> Actor {
    let login = first_text(v, &["user.username", "user_username"]);
    Actor {
        name: first_text(v, &["user.name", "user_name"])
            .or_else(|| login.clone())
            .unwrap_or_else(|| "someone".into()),
        login,
        url: None,
    }
}

fn project(v: &Value) -> Result<String, DialectError> {
    first_text(v, &["project.path_with_namespace"])
        .ok_or(DialectError::Missing("project.path_with_namespace"))
}

/// Normalise a GitLab delivery.
// Long by design: one arm per GitLab hook kind, each a few field lookups.
pub fn normalize(h: &Headers, v: &Value) -> Result<Normalized, DialectError> {
    let hook = h.get("X-Gitlab-Event").unwrap_or("");
    let kind = text(v, "object_kind").unwrap_or_default();
    let action = text(v, "object_attributes.action").unwrap_or_default();
    let confidential = hook.starts_with("Confidential")
        || at(v, "object_attributes.confidential").and_then(Value::as_bool) == Some(true)
        || at(v, "issue.confidential").and_then(Value::as_bool) == Some(true);
    let unknown = || Ok(Normalized::Unknown(format!("{kind}.{action}")));
    let mut a = match kind.as_str() {
        "issue" | "work_item" | "merge_request" => {
            let is_mr = kind == "merge_request";
            let mut verb = match action.as_str() {
                "open" => Verb::Opened,
                "close" => Verb::Closed,
                "reopen" => Verb::Reopened,
                "merge" => Verb::Merged,
                "update" => Verb::Edited,
                _ => return unknown(),
            };
            if verb == Verb::Edited {
                if at(v, "changes.labels").is_some() {
                    verb = Verb::Labeled;
                } else if at(v, "changes.assignees").is_some() {
                    verb = Verb::Assigned;
                }
            }
            let project = project(v)?;
            let iid = text(v, "object_attributes.iid")
                .ok_or(DialectError::Missing("object_attributes.iid"))?;
            let sigil = if is_mr { "!" } else { "#" };
            let object = Object {
                kind: "Page".into(),
                reference: Some(format!("{sigil}{iid}")),
                name: text(v, "object_attributes.title"),
                url: text(v, "object_attributes.url"),
                content: None,
            };
            let mut a = Activity::new(
                verb,
                if is_mr {
                    EventKind::PullRequest
                } else {
                    EventKind::Issue
                },
                &action,
                actor(v),
                object,
                &project,
            );
            a.case = Some(format!("{project}{sigil}{iid}"));
            a.labels = names(v, "labels", "title");
            a.assignees = names(v, "assignees", "username");
            a.published = text(v, "object_attributes.updated_at");
            if is_mr {
                a.branch = text(v, "object_attributes.target_branch");
            }
            a
        }
        "note" => {
            let project = project(v)?;
            let (case, reference, title) =
                match text(v, "object_attributes.noteable_type").as_deref() {
                    Some("Issue") => {
                        let iid = text(v, "issue.iid").ok_or(DialectError::Missing("issue.iid"))?;
                        (
                            Some(format!("{project}#{iid}")),
                            Some(format!("#{iid}")),
                            text(v, "issue.title"),
                        )
                    }
                    Some("MergeRequest") => {
                        let iid = text(v, "merge_request.iid")
                            .ok_or(DialectError::Missing("merge_request.iid"))?;
                        (
                            Some(format!("{project}!{iid}")),
                            Some(format!("!{iid}")),
                            text(v, "merge_request.title"),
                        )
                    }
                    Some("Commit") => (
                        None,
                        text(v, "commit.id").map(|c| c.chars().take(8).collect()),
                        text(v, "commit.message").map(|m| first_line(&m, 80)),
                    ),
                    _ => (None, None, None),
                };
            let object = Object {
                kind: "Note".into(),
                reference,
                name: title,
                url: text(v, "object_attributes.url"),
                content: text(v, "object_attributes.note").map(|n| super::clip(n.trim(), 500)),
            };
            let mut a = Activity::new(
                Verb::Commented,
                EventKind::Comment,
                if action.is_empty() { "create" } else { &action },
                actor(v),
                object,
                &project,
            );
            a.case = case;
            a.labels = names(v, "issue.labels", "title");
            a.published = text(v, "object_attributes.created_at");
            a
        }
        "push" | "tag_push" => {
            let project = project(v)?;
            let reference = text(v, "ref").ok_or(DialectError::Missing("ref"))?;
            let branch = super::branch_of(&reference);
            let after = text(v, "after").unwrap_or_default();
            let commits = at(v, "commits").and_then(Value::as_array);
            let head = commits
                .and_then(|c| {
                    c.iter()
                        .find(|c| text(c, "id").as_deref() == Some(after.as_str()))
                        .or_else(|| c.last())
                })
                .and_then(|c| text(c, "message"));
            let total = at(v, "total_commits_count")
                .and_then(Value::as_u64)
                .unwrap_or(commits.map(|c| c.len() as u64).unwrap_or(0));
            let web = text(v, "project.web_url");
            let before = text(v, "before").unwrap_or_default();
            let object = Object {
                kind: "Collection".into(),
                reference: None,
                name: None,
                url: web
                    .as_ref()
                    .map(|w| format!("{w}/-/compare/{before}...{after}")),
                content: head.map(|m| first_line(&m, 120)),
            };
            let mut a = Activity::new(
                Verb::Pushed,
                EventKind::Push,
                if kind == "tag_push" { "tag" } else { "branch" },
                actor(v),
                object,
                &project,
            );
            a.project_url = web;
            a.branch = Some(branch);
            a.commits = Some(total);
            a
        }
        "pipeline" => {
            let status = text(v, "object_attributes.status").unwrap_or_default();
            let verb = match status.as_str() {
                "success" => Verb::Succeeded,
                "failed" => Verb::Failed,
                _ => return unknown(),
            };
            let project = project(v)?;
            let id = text(v, "object_attributes.id");
            let object = Object {
                kind: "Object".into(),
                reference: id.as_ref().map(|i| format!("pipeline {i}")),
                name: Some(
                    first_text(v, &["object_attributes.name"]).unwrap_or_else(|| "pipeline".into()),
                ),
                url: text(v, "object_attributes.url").or_else(|| {
                    text(v, "project.web_url")
                        .and_then(|w| id.map(|i| format!("{w}/-/pipelines/{i}")))
                }),
                content: text(v, "commit.message").map(|m| first_line(&m, 120)),
            };
            let mut a = Activity::new(verb, EventKind::Ci, &status, actor(v), object, &project);
            a.branch = text(v, "object_attributes.ref");
            a
        }
        "release" => {
            if !matches!(action.as_str(), "create" | "update") || action == "update" {
                return unknown();
            }
            let project = project(v)?;
            let object = Object {
                kind: "Document".into(),
                reference: text(v, "tag"),
                name: first_text(v, &["name", "tag"]),
                url: text(v, "url"),
                content: text(v, "description").map(|d| first_line(&d, 200)),
            };
            Activity::new(
                Verb::Released,
                EventKind::Release,
                &action,
                actor(v),
                object,
                &project,
            )
        }
        _ => return unknown(),
    };
    a.project_url = a.project_url.take().or_else(|| text(v, "project.web_url"));
    a.private = confidential;
    Ok(Normalized::Activity(Box::new(a)))
}
