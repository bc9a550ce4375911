//! GitHub, Gitea and Forgejo: the same payload family, different headers and action names.
//!
//! Gitea/Forgejo differ from GitHub in: event headers (`X-Gitea-Event`, `X-Forgejo-Event`), label actions
//! (`label_updated`/`label_cleared` instead of `labeled`/`unlabeled`), user objects (`username` beside
//! `login`), older payloads without `issue.html_url`, and `compare_url` instead of `compare` on pushes.

use serde_json::Value;

use super::{
    at, first_line, first_text, names, text, DialectError, Headers, Normalized, TrackerKind,
};
use crate::activity::{Activity, Actor, EventKind, Object, Verb};

fn actor(v: &Value) -> Actor {
    let login = first_text(
        v,
        &[
            "sender.login",
            "sender.username",
            "pusher.login",
            "pusher.username",
            "pusher.name",
        ],
    );
    let name = first_text(v, &["sender.full_name"])
        .or_else(|| login.clone())
        .unwrap_or_else(|| "someone".into());
    Actor {
        name,
        login,
        url: first_text(v, &["sender.html_url"]),
    }
}

fn repo(v: &Value) -> Result<String, DialectError> {
    first_text(v, &["repository.full_name"]).ok_or(DialectError::Missing("repository.full_name"))
}

fn issue_verb(action: &str) -> Option<Verb> {
    Some(match action {
        "opened" => Verb::Opened,
        "closed" => Verb::Closed,
        "reopened" => Verb::Reopened,
        "edited" | "synchronized" | "synchronize" | "milestoned" | "demilestoned"
        | "transferred" => Verb::Edited,
        "assigned" | "unassigned" => Verb::Assigned,
        "labeled" | "unlabeled" | "label_updated" | "label_cleared" => Verb::Labeled,
        "deleted" => Verb::Deleted,
        "ready_for_review" => Verb::ReadyForReview,
        "converted_to_draft" => Verb::ConvertedToDraft,
        "review_requested" => Verb::ReviewRequested,
        "review_request_removed" => Verb::ReviewRequestRemoved,
        _ => return None,
    })
}

/// Normalise a GitHub, Gitea or Forgejo delivery.
// Long by design: one arm per event type of the GitHub/Gitea/Forgejo dialect, each a few field lookups.
pub fn normalize(kind: TrackerKind, h: &Headers, v: &Value) -> Result<Normalized, DialectError> {
    let event = super::event_name(kind, h, v);
    let action = text(v, "action").unwrap_or_default();
    let unknown = || {
        Ok(Normalized::Unknown(if action.is_empty() {
            event.clone()
        } else {
            format!("{event}.{action}")
        }))
    };
    match event.as_str() {
        "ping" => Ok(Normalized::Ping),
        "issues" | "pull_request" => {
            let is_pr = event == "pull_request";
            let item = if is_pr { "pull_request" } else { "issue" };
            let Some(mut verb) = issue_verb(&action) else {
                return unknown();
            };
            if is_pr
                && action == "closed"
                && at(v, "pull_request.merged").and_then(Value::as_bool) == Some(true)
            {
                verb = Verb::Merged;
            }
            let repo = repo(v)?;
            let number = first_text(v, &[&format!("{item}.number"), "number"])
                .ok_or(DialectError::Missing("number"))?;
            let repo_url = text(v, "repository.html_url");
            let url = text(v, &format!("{item}.html_url")).or_else(|| {
                repo_url
                    .as_ref()
                    .map(|r| format!("{r}/{}/{number}", if is_pr { "pulls" } else { "issues" }))
            });
            let object = Object {
                kind: "Page".into(),
                reference: Some(format!("#{number}")),
                name: text(v, &format!("{item}.title")),
                url,
                content: None,
            };
            let mut a = Activity::new(
                verb,
                if is_pr {
                    EventKind::PullRequest
                } else {
                    EventKind::Issue
                },
                &action,
                actor(v),
                object,
                &repo,
            );
            a.project_url = repo_url;
            a.case = Some(format!("{repo}#{number}"));
            a.labels = names(v, &format!("{item}.labels"), "name");
            if action == "labeled" {
                if let Some(l) = text(v, "label.name") {
                    if !a.labels.contains(&l) {
                        a.labels.push(l);
                    }
                }
            }
            a.assignees = names(v, &format!("{item}.assignees"), "login");
            if a.assignees.is_empty() {
                a.assignees = first_text(v, &[&format!("{item}.assignee.login")])
                    .into_iter()
                    .collect();
            }
            a.published = first_text(
                v,
                &[&format!("{item}.updated_at"), &format!("{item}.created_at")],
            );
            if is_pr {
                a.branch = text(v, "pull_request.base.ref");
                // A person (`requested_reviewer`) or a team (`requested_team`).
                a.reviewers = first_text(v, &["requested_reviewer.login", "requested_team.name"])
                    .into_iter()
                    .collect();
            }
            Ok(Normalized::Activity(Box::new(a)))
        }
        "issue_comment" => {
            let verb = match action.as_str() {
                "created" => Verb::Commented,
                "edited" => Verb::Edited,
                "deleted" => Verb::Deleted,
                _ => return unknown(),
            };
            let repo = repo(v)?;
            let number = text(v, "issue.number").ok_or(DialectError::Missing("issue.number"))?;
            let is_pr = at(v, "issue.pull_request").is_some()
                || at(v, "is_pull").and_then(Value::as_bool) == Some(true);
            let body = text(v, "comment.body").unwrap_or_default();
            let object = Object {
                kind: "Note".into(),
                reference: Some(format!("#{number}")),
                name: text(v, "issue.title"),
                url: text(v, "comment.html_url"),
                // A deleted comment's text is not repeated anywhere (it may be why it was deleted).
                content: (verb != Verb::Deleted).then(|| super::clip(body.trim(), 500)),
            };
            let mut a = Activity::new(verb, EventKind::Comment, &action, actor(v), object, &repo);
            a.project_url = text(v, "repository.html_url");
            a.case = Some(format!("{repo}#{number}"));
            a.labels = names(v, "issue.labels", "name");
            a.published = first_text(v, &["comment.updated_at", "comment.created_at"]);
            if is_pr {
                a.action = format!("{action}_on_pull_request");
            }
            Ok(Normalized::Activity(Box::new(a)))
        }
        "push" => {
            let repo = repo(v)?;
            let reference = text(v, "ref").ok_or(DialectError::Missing("ref"))?;
            let branch = super::branch_of(&reference);
            let commits = at(v, "commits")
                .and_then(Value::as_array)
                .map(|c| c.len() as u64)
                .unwrap_or(0);
            let total = at(v, "total_commits")
                .and_then(Value::as_u64)
                .unwrap_or(commits);
            let head = first_text(v, &["head_commit.message"]).or_else(|| {
                at(v, "commits")
                    .and_then(Value::as_array)
                    .and_then(|c| c.last())
                    .and_then(|c| text(c, "message"))
            });
            let object = Object {
                kind: "Collection".into(),
                reference: None,
                name: None,
                url: first_text(v, &["compare", "compare_url"]),
                content: head.map(|m| first_line(&m, 120)),
            };
            let mut a = Activity::new(
                Verb::Pushed,
                EventKind::Push,
                if reference.starts_with("refs/tags/") {
                    "tag"
                } else {
                    "branch"
                },
                actor(v),
                object,
                &repo,
            );
            a.project_url = text(v, "repository.html_url");
            a.branch = Some(branch);
            a.commits = Some(total);
            a.published = first_text(v, &["head_commit.timestamp"]);
            Ok(Normalized::Activity(Box::new(a)))
        }
        "release" => {
            // GitHub sends `created`, `published` and `released` when a release is published, and
            // `created`, `published` and `prereleased` for a pre-release; `released` alone when a
            // pre-release becomes a release. So `released` and `prereleased` are posted, one message
            // a release, and the others recorded. Gitea and Forgejo send `published` alone.
            let gitea = kind != TrackerKind::Github;
            let prerelease = at(v, "release.prerelease").and_then(Value::as_bool) == Some(true);
            let verb = match action.as_str() {
                "released" if !gitea => Verb::Released,
                "prereleased" if !gitea => Verb::Prereleased,
                "published" if gitea && prerelease => Verb::Prereleased,
                "published" if gitea => Verb::Released,
                "edited" | "updated" => Verb::Edited, // Gitea/Forgejo say `updated`
                "created" | "published" => {
                    return Ok(Normalized::Unknown(format!(
                    "release.{action} (the same release's `released` or `prereleased` is posted)"
                )))
                }
                _ => return unknown(),
            };
            let repo = repo(v)?;
            let tag = text(v, "release.tag_name");
            let object = Object {
                kind: "Document".into(),
                reference: tag.clone(),
                name: first_text(v, &["release.name"]).or(tag),
                url: text(v, "release.html_url"),
                content: text(v, "release.body").map(|b| first_line(&b, 200)),
            };
            let mut a = Activity::new(verb, EventKind::Release, &action, actor(v), object, &repo);
            a.project_url = text(v, "repository.html_url");
            a.published = text(v, "release.published_at");
            Ok(Normalized::Activity(Box::new(a)))
        }
        "workflow_run" => {
            if action != "completed" {
                return unknown();
            }
            let verb = match text(v, "workflow_run.conclusion").as_deref() {
                Some("success") => Verb::Succeeded,
                Some("failure") | Some("timed_out") | Some("startup_failure") => Verb::Failed,
                _ => return unknown(), // cancelled, skipped, neutral: nothing to report
            };
            let repo = repo(v)?;
            let name = first_text(v, &["workflow_run.name", "workflow.name"])
                .unwrap_or_else(|| "workflow".into());
            let object = Object {
                kind: "Object".into(),
                reference: text(v, "workflow_run.run_number").map(|n| format!("run {n}")),
                name: Some(name),
                url: text(v, "workflow_run.html_url"),
                content: text(v, "workflow_run.display_title").map(|t| first_line(&t, 120)),
            };
            let mut a = Activity::new(
                verb,
                EventKind::Ci,
                text(v, "workflow_run.conclusion").as_deref().unwrap_or(""),
                actor(v),
                object,
                &repo,
            );
            a.project_url = text(v, "repository.html_url");
            a.branch = text(v, "workflow_run.head_branch");
            a.published = text(v, "workflow_run.updated_at");
            Ok(Normalized::Activity(Box::new(a)))
        }
        _ => unknown(),
    }
}
