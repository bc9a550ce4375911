//! Golden tests: every real tracker payload in `fixtures/` (see fixtures/SOURCES.md), with the headers
//! its sender uses, must normalise to the committed Activity JSON and body
//! (`fixtures/<tracker>/<file>.expected.json`). Set `CASEROOM_UPDATE_GOLDEN=1` to rewrite them after a
//! deliberate change, then review the diff.

use std::path::Path;

use caseroom::render::render;
use caseroom::webhook::{self, Headers, Normalized, TrackerKind};
use serde_json::{json, Value};

fn event_of(file: &str) -> String {
    file.split('.').next().unwrap_or("").to_owned()
}

/// A fixture path, the dialect, and the headers its sender sets.
type Case = (String, TrackerKind, Vec<(String, String)>);

/// Every fixture.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for dir in ["github", "gitea", "forgejo", "gitlab", "jira", "redmine"] {
        let mut files: Vec<String> = std::fs::read_dir(root.join(dir))
            .expect("fixture dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|f| {
                f.ends_with(".json") && !f.ends_with(".expected.json") && !f.starts_with("rest.")
            })
            .collect();
        files.sort();
        for f in files {
            let ev = event_of(&f);
            let (kind, headers): (TrackerKind, Vec<(&str, String)>) = match dir {
                "github" => (
                    TrackerKind::Github,
                    vec![
                        ("X-GitHub-Event", ev.clone()),
                        ("X-GitHub-Delivery", format!("gh-{f}")),
                    ],
                ),
                "gitea" => (
                    TrackerKind::Gitea,
                    vec![
                        ("X-Gitea-Event", ev.clone()),
                        ("X-Gitea-Delivery", format!("gt-{f}")),
                    ],
                ),
                "forgejo" => (
                    TrackerKind::Forgejo,
                    vec![
                        ("X-Forgejo-Event", ev.clone()),
                        ("X-Gitea-Event", ev.clone()),
                        ("X-Forgejo-Delivery", format!("fj-{f}")),
                    ],
                ),
                "gitlab" => {
                    let hook = match ev.as_str() {
                        "issue" => "Issue Hook",
                        "note" => "Note Hook",
                        "push" => "Push Hook",
                        "merge_request" => "Merge Request Hook",
                        other => panic!("no GitLab hook name for {other}"),
                    };
                    (
                        TrackerKind::Gitlab,
                        vec![("X-Gitlab-Event", hook.to_owned())],
                    )
                }
                "jira" => (TrackerKind::Jira, vec![]),
                _ => (TrackerKind::Redmine, vec![]),
            };
            out.push((
                format!("{dir}/{f}"),
                kind,
                headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            ));
        }
    }
    out
}

fn outcome(kind: TrackerKind, headers: &Headers, body: &[u8]) -> Value {
    let doc = webhook::parse_body(Some("application/json"), body).expect("fixture is JSON");
    outcome_of(kind, headers, &doc)
}

fn outcome_of(kind: TrackerKind, headers: &Headers, doc: &Value) -> Value {
    match webhook::normalize(kind, headers, doc).expect("fixture normalises") {
        Normalized::Activity(a) => {
            let r = render("forge", &a);
            // The text written straight from the Activity is the text of its `Value`, key order
            // included (the stanza carries the text).
            assert_eq!(r.json, a.to_json("forge").to_string());
            let activity: Value = serde_json::from_str(&r.json).expect("the activity is JSON");
            json!({ "body": r.body, "thread": r.thread, "private": a.private, "activity": activity })
        }
        Normalized::Ping => json!({ "ping": true }),
        Normalized::Unknown(e) => json!({ "unknown": e }),
    }
}

#[test]
fn every_fixture_matches_its_golden_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let update = std::env::var("CASEROOM_UPDATE_GOLDEN").is_ok();
    let mut failures = Vec::new();
    let cases = cases();
    assert!(
        cases.len() >= 25,
        "all fixtures are covered ({})",
        cases.len()
    );
    for (file, kind, headers) in cases {
        let body = std::fs::read(root.join(&file)).expect("fixture");
        let got = outcome(kind, &Headers(headers), &body);
        let golden = root.join(format!("{}.expected.json", file.trim_end_matches(".json")));
        if update {
            std::fs::write(
                &golden,
                serde_json::to_string_pretty(&got).expect("json") + "\n",
            )
            .expect("write golden");
            continue;
        }
        let want: Value = match std::fs::read(&golden) {
            Ok(b) => serde_json::from_slice(&b).expect("golden is JSON"),
            Err(_) => {
                failures.push(format!("{file}: no golden file {}", golden.display()));
                continue;
            }
        };
        if got != want {
            failures.push(format!(
                "{file}:\n  want {}\n  got  {}",
                serde_json::to_string(&want).unwrap_or_default(),
                serde_json::to_string(&got).unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The bridge builds a delivery's document with only the keys dialects read
/// (`webhook::KEYS_READ`). Every fixture must come out the same as from the whole document: a
/// dialect reading a key the list lacks would see it absent (and a golden file rewritten after
/// such a change would hide it; this test does not).
#[test]
fn a_document_kept_to_the_keys_dialects_read_normalises_as_the_whole_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut failures = Vec::new();
    for (file, kind, headers) in cases() {
        let body = std::fs::read(root.join(&file)).expect("fixture");
        let headers = Headers(headers);
        let whole: Value = serde_json::from_slice(&body).expect("fixture is JSON");
        let kept = webhook::parse_body(Some("application/json"), &body).expect("parses");
        assert!(
            serde_json::to_string(&kept).expect("json").len()
                <= serde_json::to_string(&whole).expect("json").len()
        );
        let (a, b) = (
            outcome_of(kind, &headers, &whole),
            outcome(kind, &headers, &body),
        );
        let membership = |d: &Value| webhook::changes_membership(kind, &headers, d);
        if a != b || membership(&whole) != membership(&kept) {
            failures.push(format!("{file}:\n  whole {a}\n  kept  {b}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The large GitHub delivery keeps a small part of itself.
    let body = std::fs::read(root.join("github/issues.opened.json")).expect("fixture");
    let kept = webhook::parse_body(Some("application/json"), &body).expect("parses");
    let len = serde_json::to_string(&kept).expect("json").len();
    assert!(len * 2 < body.len(), "{len} of {} bytes kept", body.len());
}

/// Syntax is still checked in full, skipped values included.
#[test]
fn a_malformed_value_under_a_skipped_key_is_still_refused() {
    for bad in [
        &br#"{"action":"opened","node_id":[1,}"#[..],
        br#"{"node_id":"\x"}"#,
        br#"{"node_id":1} trailing"#,
        br#"{"node_id":01}"#,
    ] {
        assert!(
            webhook::parse_body(Some("application/json"), bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // Deep nesting: skipped without recursion under a key no dialect reads, refused past
    // serde_json's depth limit under one they read (the HTTP handler parses every body with
    // `parse_body` and answers 400 with this reason: tests/e2e/test_webhooks.py); never a stack
    // overflow.
    let nest = |key: &str| format!("{{\"{key}\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(webhook::parse_body(Some("application/json"), nest("node_id").as_bytes()).is_ok());
    let e = webhook::parse_body(Some("application/json"), nest("labels").as_bytes());
    assert!(format!("{e:?}").contains("recursion limit"), "{e:?}");
}

#[test]
fn comments_and_changes_of_one_case_share_a_thread() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let thread = |file: &str, kind, event: &str| {
        let body = std::fs::read(root.join(file)).expect("fixture");
        let h = Headers::from_pairs(&[("X-GitHub-Event", event), ("X-Gitea-Event", event)]);
        outcome(kind, &h, &body)["thread"].clone()
    };
    // Gitea issue #1 of gogits/hello-world: opened, then commented.
    let opened = thread("gitea/issues.opened.json", TrackerKind::Gitea, "issues");
    let comment = thread(
        "gitea/issue_comment.created.json",
        TrackerKind::Gitea,
        "issue_comment",
    );
    assert!(opened.is_string());
    assert_eq!(opened, comment);
    // GitHub Hello-World #1 comment vs #1 issue? The fixtures are different issues: different threads.
    let gh_issue = thread("github/issues.opened.json", TrackerKind::Github, "issues");
    let gh_comment = thread(
        "github/issue_comment.created.json",
        TrackerKind::Github,
        "issue_comment",
    );
    assert_eq!(
        gh_issue, gh_comment,
        "both fixtures are Codertocat/Hello-World#1"
    );
    let push = thread("github/push.new-branch.json", TrackerKind::Github, "push");
    assert!(push.is_null(), "pushes belong to no case");
}

#[test]
fn ping_and_unknown_events() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let ping = std::fs::read(root.join("github/ping.json")).expect("fixture");
    let h = Headers::from_pairs(&[("X-GitHub-Event", "ping")]);
    assert_eq!(
        outcome(TrackerKind::Github, &h, &ping),
        json!({"ping": true})
    );
    // A real payload under an event caseroom does not post (a star) is recorded as unknown.
    let issue = std::fs::read(root.join("github/issues.opened.json")).expect("fixture");
    let h = Headers::from_pairs(&[("X-GitHub-Event", "watch")]);
    assert_eq!(
        outcome(TrackerKind::Github, &h, &issue),
        json!({"unknown": "watch.opened"})
    );
}
