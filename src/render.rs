//! Activity → message: a readable body (XEP-0393 styling) and the XEP-0335 JSON payload, plus the
//! XEP-0201 thread shared by every event of one case.

use sha2::{Digest, Sha256};

use crate::activity::{Activity, EventKind, Verb};

/// What a room message is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The body, one or two lines.
    pub body: String,
    /// The Activity as AS2 JSON-LD text ([`Activity::to_json_text`]).
    pub json: String,
    /// Thread id for the case, if the event belongs to one.
    pub thread: Option<String>,
}

/// XEP-0201 thread id for a case: stable, opaque, the same for every event of the case.
pub fn thread_id(tracker: &str, case: &str) -> String {
    let mut h = Sha256::new();
    h.update(tracker.as_bytes());
    h.update([0]);
    h.update(case.as_bytes());
    let d = h.finalize();
    let hex = hex::encode(&d[..12]);
    format!("caseroom-{hex}")
}

fn link(a: &Activity) -> String {
    a.object
        .url
        .as_deref()
        .map(|u| format!(" — {u}"))
        .unwrap_or_default()
}

fn titled(a: &Activity) -> String {
    let mut s = String::new();
    if let Some(r) = &a.object.reference {
        s.push(' ');
        s.push_str(r);
    }
    if let Some(n) = &a.object.name {
        s.push_str(&format!(" *{}*", n.replace('*', "∗")));
    }
    s
}

/// Render an activity from `tracker`.
// Long by design: one arm per activity verb, each one line of text.
pub fn render(tracker: &str, a: &Activity) -> Rendered {
    let who = &a.actor.name;
    let project = if a.project.is_empty() {
        String::new()
    } else {
        format!("[{}] ", a.project)
    };
    let mut second: Option<String> = None;
    let first = match a.event {
        EventKind::Push => {
            let n = a.commits.unwrap_or(0);
            let to = a
                .branch
                .as_deref()
                .map(|b| format!(" to `{b}`"))
                .unwrap_or_default();
            if n == 0 {
                format!("{project}{who} pushed{to}{}", link(a))
            } else {
                if let Some(c) = &a.object.content {
                    let more = if n > 1 {
                        format!(" (+{} more)", n - 1)
                    } else {
                        String::new()
                    };
                    second = Some(format!("> {c}{more}"));
                }
                format!(
                    "{project}{who} pushed {n} commit{}{to}{}",
                    if n == 1 { "" } else { "s" },
                    link(a)
                )
            }
        }
        EventKind::Ci => {
            let mark = if a.verb == Verb::Failed { "❌" } else { "✅" };
            let on = a
                .branch
                .as_deref()
                .map(|b| format!(" on `{b}`"))
                .unwrap_or_default();
            let name = a.object.name.as_deref().unwrap_or("CI");
            if let Some(c) = &a.object.content {
                second = Some(format!("> {c}"));
            }
            format!(
                "{project}{mark} *{name}* {}{on}{}",
                a.verb.as_str(),
                link(a)
            )
        }
        EventKind::Release => format!("{project}{who} {}{}{}", a.verb_phrase(), titled(a), link(a)),
        EventKind::Comment => {
            if let Some(c) = &a.object.content {
                second = Some(format!("> {}", crate::webhook::first_line(c, 200)));
            }
            format!("{project}{who} {}{}{}", a.verb_phrase(), titled(a), link(a))
        }
        _ => {
            let extra = match a.verb {
                Verb::Assigned if !a.assignees.is_empty() => {
                    format!(" to {}", a.assignees.join(", "))
                }
                Verb::Labeled if !a.labels.is_empty() => format!(" ({})", a.labels.join(", ")),
                Verb::ReviewRequested | Verb::ReviewRequestRemoved if !a.reviewers.is_empty() => {
                    format!(" from {}", a.reviewers.join(", "))
                }
                _ => String::new(),
            };
            let content = a
                .object
                .content
                .as_deref()
                .map(|c| crate::webhook::first_line(c, 200));
            if let Some(c) = content {
                second = Some(format!("> {c}"));
            }
            format!(
                "{project}{who} {}{}{extra}{}",
                a.verb.as_str(),
                titled(a),
                link(a)
            )
        }
    };
    let body = match second {
        Some(s) => format!("{first}\n{s}"),
        None => first,
    };
    Rendered {
        body,
        json: a.to_json_text(tracker),
        thread: a.case.as_deref().map(|c| thread_id(tracker, c)),
    }
}
