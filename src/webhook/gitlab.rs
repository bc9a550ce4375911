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
            let mut reviewers = vec![];
            if verb == Verb::Edited {
                let draft =
                    |when: &str| at(v, &format!("changes.draft.{when}")).and_then(Value::as_bool);
                let added = added_reviewers(v);
                if is_mr && draft("previous") == Some(true) && draft("current") == Some(false) {
                    verb = Verb::ReadyForReview;
                } else if is_mr
                    && draft("previous") == Some(false)
                    && draft("current") == Some(true)
                {
                    verb = Verb::ConvertedToDraft;
                } else if is_mr && !added.is_empty() {
                    verb = Verb::ReviewRequested;
                    reviewers = added;
                } else if at(v, "changes.labels").is_some() {
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
            a.reviewers = reviewers;
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

/// Reviewers a merge request update added (`changes.reviewers`: current but not previous), by
/// username.
fn added_reviewers(v: &Value) -> Vec<String> {
    let list = |when: &str| -> Vec<String> {
        at(v, &format!("changes.reviewers.{when}"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|r| text(r, "username")).collect())
            .unwrap_or_default()
    };
    let before = list("previous");
    list("current")
        .into_iter()
        .filter(|r| !before.contains(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitLab's documented merge request payload (`fixtures/gitlab/merge_request.json`, an `open`
    /// whose `changes` hold a draft flip and labels), sent as the `update` GitLab sends for such
    /// changes: the same shape, `action` and `changes` as the docs describe them.
    fn update(changes: serde_json::Value) -> Activity {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/gitlab/merge_request.json"
        ))
        .expect("fixture");
        let mut v: Value = serde_json::from_str(&text).expect("JSON");
        v["object_attributes"]["action"] = "update".into();
        v["changes"] = changes;
        let h = Headers(vec![("X-Gitlab-Event".into(), "Merge Request Hook".into())]);
        match normalize(&h, &v).expect("normalises") {
            Normalized::Activity(a) => *a,
            other => panic!("not posted: {other:?}"),
        }
    }

    #[test]
    fn merge_request_updates_say_ready_draft_and_review_requests() {
        let draft = |p: bool, c: bool| serde_json::json!({"draft": {"previous": p, "current": c}});
        assert_eq!(update(draft(true, false)).verb, Verb::ReadyForReview);
        assert_eq!(update(draft(false, true)).verb, Verb::ConvertedToDraft);
        let user = |u: &str| serde_json::json!({"id": 1, "name": u, "username": u});
        let a = update(serde_json::json!({"reviewers": {
            "previous": [user("user1")],
            "current": [user("user1"), user("root")]
        }}));
        assert_eq!(
            (a.verb, a.reviewers),
            (Verb::ReviewRequested, vec!["root".to_owned()])
        );
        // The fixture's own labels change, as an update: labels.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/gitlab/merge_request.json"
        ))
        .expect("fixture");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        let labels = serde_json::json!({"labels": v["changes"]["labels"].clone()});
        assert_eq!(update(labels).verb, Verb::Labeled);
    }
}
