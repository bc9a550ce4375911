//! Carrying out a chat command against a tracker, as the speaking person, with forgiving guesses.
//! Returns the text to answer in the room; never panics on tracker answers.

use super::{overview, usage, ChatCommand, COMMANDS};
use crate::tracker::{nearest, Actor, Case, Member, NewCase, Tracker, TrackerError};

/// Everything a command needs besides the tracker.
#[derive(Debug, Clone)]
pub struct Context {
    /// The speaker as the tracker knows them (login, and personal token if linked).
    pub actor: Actor,
    /// The speaker's nick, for addressing replies.
    pub nick: String,
    /// The group (project) the room mirrors.
    pub group: String,
    /// Members of the group, for guesses.
    pub members: Vec<Member>,
    /// The case of the thread (or replied-to event) the command was typed in.
    pub thread_case: Option<u64>,
    /// ChatCommand prefix.
    pub prefix: String,
}

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Text for the room.
    pub text: String,
    /// The case it concerns (to thread the reply).
    pub case: Option<u64>,
}

/// One line about a case: number, title, state, assignee, link (number and link only when private).
pub fn line(c: &Case) -> String {
    if c.private {
        return format!(
            "#{} (private: open it in the tracker) — {}",
            c.number, c.url
        );
    }
    let who = c
        .assignee
        .as_deref()
        .map(|a| format!(", assigned to {a}"))
        .unwrap_or_default();
    format!(
        "#{} *{}* ({}{who}) — {}",
        c.number, c.title, c.status, c.url
    )
}

fn explain(e: &TrackerError, what: &str, ctx: &Context) -> String {
    match e {
        TrackerError::Unreachable(_) => format!("could not {what}: the tracker is unreachable right now ({e}); try again in a minute"),
        TrackerError::Denied(_) => format!(
            "could not {what}: {e}. Check that your account {:?} is a member of {:?} with permission to do this",
            ctx.actor.login, ctx.group
        ),
        TrackerError::NotFound(_) => format!(
            "could not {what}: {} has no such case, or you may not see it",
            ctx.group
        ),
        TrackerError::Rejected(r) => format!("could not {what}: the tracker rejected it: {r}"),
        TrackerError::NotLinked(m) => format!("could not {what}: {m}"),
        _ => format!("could not {what}: {e}"),
    }
}

/// A person as typed (`@bob`, `Bob Smith`, `smi`) → (login, display name), among the group's members.
fn guess_member<'a>(typed: &str, members: &'a [Member]) -> Option<&'a Member> {
    let logins: Vec<&str> = members.iter().map(|m| m.login.as_str()).collect();
    if let Some(l) = nearest(typed, logins.iter().copied()) {
        return members.iter().find(|m| m.login == l);
    }
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    nearest(typed, names.iter().copied()).and_then(|n| members.iter().find(|m| m.name == n))
}

fn need_case(case: Option<u64>, ctx: &Context, cmd: &str) -> Result<u64, Reply> {
    case.or(ctx.thread_case).ok_or_else(|| Reply {
        text: format!(
            "which case? Give its number, e.g. {} — or type the command in the case's thread",
            usage(cmd, &ctx.prefix)
        ),
        case: None,
    })
}

/// Carry out `cmd` as `ctx.login`.
pub async fn execute<T: Tracker>(t: &T, cmd: ChatCommand, ctx: &Context) -> Reply {
    match try_execute(t, cmd, ctx).await {
        Ok(r) | Err(r) => r,
    }
}

/// Carry out `cmd` as `ctx.actor`; `Err` when it could not be done (the reply says why).
// Long by design: one short arm per chat command (a tracker call and its reply); the table reads best whole.
pub async fn try_execute<T: Tracker>(
    t: &T,
    cmd: ChatCommand,
    ctx: &Context,
) -> Result<Reply, Reply> {
    let fail = |e: TrackerError, what: &str, case: Option<u64>| Reply {
        text: explain(&e, what, ctx),
        case,
    };
    match cmd {
        ChatCommand::Help { topic } => Ok(Reply {
            text: match topic
                .as_deref()
                .and_then(|tp| COMMANDS.iter().find(|(n, _, _)| *n == tp))
            {
                Some((_, u, what)) => format!("{} — {what}", u.replacen('!', &ctx.prefix, 1)),
                None => overview(&ctx.prefix),
            },
            case: None,
        }),
        ChatCommand::New {
            title,
            description,
            labels,
            assignee,
            priority,
        } => {
            let vocab = t
                .vocabulary(&ctx.group)
                .await
                .map_err(|e| fail(e, "create the case", None))?;
            let (case, notes) = draft(
                ctx,
                &vocab,
                title,
                description,
                &labels,
                assignee.as_deref(),
                priority.as_deref(),
            );
            let created = t
                .create(&ctx.actor, &case)
                .await
                .map_err(|e| fail(e, "create the case", None))?;
            let extra = if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            };
            Ok(Reply {
                text: if created.private {
                    format!("created {}{extra}", line(&created))
                } else {
                    format!(
                        "created #{} *{}*{extra} — {}",
                        created.number, created.title, created.url
                    )
                },
                case: Some(created.number),
            })
        }
        ChatCommand::Comment { case, text } => {
            let n = need_case(case, ctx, "comment")?;
            let c = t
                .comment(&ctx.actor, &ctx.group, n, &text)
                .await
                .map_err(|e| fail(e, &format!("comment on #{n}"), Some(n)))?;
            Ok(Reply {
                text: format!("commented on {}", line(&c)),
                case: Some(n),
            })
        }
        ChatCommand::Close { case, text } => {
            let n = need_case(case, ctx, "close")?;
            let c = t
                .set_closed(&ctx.actor, &ctx.group, n, true, text.as_deref())
                .await
                .map_err(|e| fail(e, &format!("close #{n}"), Some(n)))?;
            Ok(Reply {
                text: format!("closed {}", line(&c)),
                case: Some(n),
            })
        }
        ChatCommand::Reopen { case } => {
            let n = need_case(case, ctx, "reopen")?;
            let c = t
                .set_closed(&ctx.actor, &ctx.group, n, false, None)
                .await
                .map_err(|e| fail(e, &format!("reopen #{n}"), Some(n)))?;
            Ok(Reply {
                text: format!("reopened {}", line(&c)),
                case: Some(n),
            })
        }
        ChatCommand::Assign { case, person } => {
            let n = need_case(case, ctx, "assign")?;
            assign(t, n, &person, ctx).await
        }
        ChatCommand::Show { case } => {
            let n = need_case(case, ctx, "show")?;
            let c = t
                .get(&ctx.actor, &ctx.group, n)
                .await
                .map_err(|e| fail(e, &format!("show #{n}"), Some(n)))?;
            Ok(Reply {
                text: if c.private {
                    line(&c)
                } else {
                    format!("{} — opened by {}", line(&c), c.author)
                },
                case: Some(n),
            })
        }
        ChatCommand::Find { words } => {
            let found = t
                .search(&ctx.actor, &ctx.group, &words)
                .await
                .map_err(|e| fail(e, "search", None))?;
            let text = if found.is_empty() {
                format!("nothing in {} matches {words:?}", ctx.group)
            } else {
                found.iter().map(line).collect::<Vec<_>>().join("\n")
            };
            Ok(Reply { text, case: None })
        }
        ChatCommand::Mine => {
            let found = t
                .mine(&ctx.actor, &ctx.group)
                .await
                .map_err(|e| fail(e, "list your cases", None))?;
            let text = if found.is_empty() {
                format!(
                    "{}: nothing open in {} is assigned to you",
                    ctx.nick, ctx.group
                )
            } else {
                found.iter().map(line).collect::<Vec<_>>().join("\n")
            };
            Ok(Reply { text, case: None })
        }
    }
}

/// `!assign`: to the member who best matches what was typed, saying so when it was a guess.
async fn assign<T: Tracker>(t: &T, n: u64, person: &str, ctx: &Context) -> Result<Reply, Reply> {
    let m = guess_member(person, &ctx.members).ok_or_else(|| Reply {
        text: format!(
            "no member of {} matches @{person}; members: {}",
            ctx.group,
            ctx.members
                .iter()
                .map(|m| m.login.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        case: Some(n),
    })?;
    let c = t
        .assign(&ctx.actor, &ctx.group, n, &m.login)
        .await
        .map_err(|e| Reply {
            text: explain(&e, &format!("assign #{n}"), ctx),
            case: Some(n),
        })?;
    let guessed = if m.login.eq_ignore_ascii_case(person) {
        String::new()
    } else {
        format!(" (you wrote @{person})")
    };
    Ok(Reply {
        text: format!("assigned {}{guessed}", line(&c)),
        case: Some(n),
    })
}

/// The case `!new` asks for, corrected to what the tracker knows: the nearest member, type and
/// priority; what was guessed or dropped is said in the notes, nothing is refused.
fn draft(
    ctx: &Context,
    vocab: &crate::tracker::Vocabulary,
    title: String,
    description: String,
    labels: &[String],
    assignee: Option<&str>,
    priority: Option<&str>,
) -> (NewCase, Vec<String>) {
    let mut notes = Vec::new();
    let mut case = NewCase {
        group: ctx.group.clone(),
        title,
        description,
        ..NewCase::default()
    };
    if let Some(a) = assignee {
        match guess_member(a, &ctx.members) {
            Some(m) => {
                if !m.login.eq_ignore_ascii_case(a) {
                    notes.push(format!("assigned to {} (you wrote @{a})", m.name));
                } else {
                    notes.push(format!("assigned to {}", m.name));
                }
                case.assignee = Some(m.login.clone());
            }
            None => notes.push(format!(
                "not assigned: no member of {} matches @{a}",
                ctx.group
            )),
        }
    }
    for l in labels {
        match nearest(l, vocab.kinds.iter().map(String::as_str)) {
            Some(k) if case.kind.is_none() => {
                notes.push(if k.eq_ignore_ascii_case(l) {
                    format!("type {k}")
                } else {
                    format!("type {k} (you wrote #{l})")
                });
                case.kind = Some(k.to_owned());
            }
            _ => notes.push(format!(
                "dropped #{l} (no such type here: {})",
                vocab.kinds.join(", ")
            )),
        }
    }
    if let Some(p) = priority {
        match nearest(p, vocab.priorities.iter().map(String::as_str)) {
            Some(k) => {
                notes.push(if k.eq_ignore_ascii_case(p) {
                    format!("priority {k}")
                } else {
                    format!("priority {k} (you wrote {}{p})", ctx.prefix)
                });
                case.priority = Some(k.to_owned());
            }
            None => notes.push(format!(
                "priority left as default (no priority like {p:?}: {})",
                vocab.priorities.join(", ")
            )),
        }
    }
    (case, notes)
}
