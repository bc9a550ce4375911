//! Chat commands typed in a room (`!new`, `!comment`, `!close`, …): the grammar, pure.
//!
//! Forgiving by design: command words are case-insensitive, `#42`, `42` and `42:` all name case 42, a
//! misspelt command gets "did you mean", and a `!new` without a title takes the first description line.
//! The case number may be left out where the context supplies it (a case's thread, a reply to an event):
//! the parser leaves it `None` and the bridge fills it in.

pub mod forms;
pub mod run;

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `!new Title #label @assignee !priority` + description lines.
    New {
        /// Title (the first line without tokens; else the first description line).
        title: String,
        /// Description (the lines after the first).
        description: String,
        /// `#label` tokens.
        labels: Vec<String>,
        /// `@person` token.
        assignee: Option<String>,
        /// `!priority` token.
        priority: Option<String>,
    },
    /// `!comment N text`.
    Comment {
        /// Case number.
        case: Option<u64>,
        /// Text.
        text: String,
    },
    /// `!close N [text]`.
    Close {
        /// Case number.
        case: Option<u64>,
        /// Closing note.
        text: Option<String>,
    },
    /// `!reopen N`.
    Reopen {
        /// Case number.
        case: Option<u64>,
    },
    /// `!assign N @person`.
    Assign {
        /// Case number.
        case: Option<u64>,
        /// Who (as typed, without @).
        person: String,
    },
    /// `!show N`.
    Show {
        /// Case number.
        case: Option<u64>,
    },
    /// `!find words`.
    Find {
        /// Search words.
        words: String,
    },
    /// `!mine`.
    Mine,
    /// `!help [command]`.
    Help {
        /// ChatCommand asked about.
        topic: Option<String>,
    },
}

/// A command that could not be understood: what went wrong and how to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// What was wrong.
    pub message: String,
    /// The usage line of the command (or the command list).
    pub usage: String,
}

/// Every command with its usage, for `!help` and errors.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "new",
        "!new Title #label @assignee !priority (description on the next lines)",
        "create a case as you",
    ),
    (
        "comment",
        "!comment 42 text",
        "comment on case 42 (the number may be left out inside its thread)",
    ),
    ("close", "!close 42 [closing note]", "close case 42"),
    ("reopen", "!reopen 42", "reopen case 42"),
    ("assign", "!assign 42 @person", "assign case 42"),
    ("show", "!show 42", "show case 42"),
    ("find", "!find words", "search cases"),
    (
        "search",
        "!search words",
        "search this room's history (answered to you alone)",
    ),
    (
        "mine",
        "!mine",
        "list this project's open cases assigned to you",
    ),
    (
        "mute",
        "!mute ci succeeded",
        "hide such tracker events for you in this room (event, verb, #label, field=value)",
    ),
    ("unmute", "!unmute", "see every event again"),
    ("filters", "!filters", "what you have hidden"),
    ("help", "!help [command]", "this help"),
];

/// The usage line of one command (or the overview).
pub fn usage(cmd: &str, prefix: &str) -> String {
    COMMANDS
        .iter()
        .find(|(n, _, _)| *n == cmd)
        .map(|(_, u, _)| u.replacen('!', prefix, 1))
        .unwrap_or_else(|| overview(prefix))
}

/// The list of commands.
pub fn overview(prefix: &str) -> String {
    COMMANDS
        .iter()
        .map(|(_, u, what)| format!("{} — {what}", u.replacen('!', prefix, 1)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rest of the first line and the following lines, as one text.
fn join_lines(first: &str, more: &str) -> String {
    [first.trim(), more.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

/// A case number token: `42`, `#42`, `42:`, `#42,`.
fn case_number(tok: &str) -> Option<u64> {
    tok.trim_start_matches('#')
        .trim_end_matches([':', ',', '.'])
        .parse()
        .ok()
}

/// Split off a leading case number.
fn take_case(rest: &str) -> (Option<u64>, &str) {
    let rest = rest.trim_start();
    let (first, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    match case_number(first) {
        Some(n) => (Some(n), tail.trim()),
        None => (None, rest.trim()),
    }
}

/// Parse a message body. `None`: not a command (no prefix); `Some(Err)`: a command that could not be
/// understood, with usage.
// Long by design: one arm per chat command's grammar, so the whole language reads in one place.
pub fn parse(prefix: &str, body: &str) -> Option<Result<ChatCommand, ParseError>> {
    let body = body.trim_start();
    let rest = body.strip_prefix(prefix)?;
    let (first_line, more) = rest.split_once('\n').unwrap_or((rest, ""));
    let (word, args) = first_line
        .split_once(char::is_whitespace)
        .unwrap_or((first_line, ""));
    let word = word.to_lowercase();
    if word.is_empty() || !word.chars().all(|c| c.is_ascii_alphabetic()) {
        return None; // "!!!" or "! hi": punctuation, not a command
    }
    let err = |message: String, cmd: &str| {
        Some(Err(ParseError {
            message,
            usage: usage(cmd, prefix),
        }))
    };
    let args = args.trim();
    let cmd = match word.as_str() {
        "new" | "create" | "open" => {
            let mut labels = Vec::new();
            let mut assignee = None;
            let mut priority = None;
            let mut title = Vec::new();
            for tok in args.split_whitespace() {
                if let Some(l) = tok.strip_prefix('#').filter(|l| !l.is_empty()) {
                    labels.push(l.to_owned());
                } else if let Some(a) = tok.strip_prefix('@').filter(|a| !a.is_empty()) {
                    assignee = Some(a.to_owned());
                } else if let Some(p) = tok
                    .strip_prefix(prefix)
                    .filter(|p| !p.is_empty() && p.chars().all(char::is_alphanumeric))
                {
                    priority = Some(p.to_lowercase());
                } else {
                    title.push(tok);
                }
            }
            let mut title = title.join(" ");
            let mut description = more.trim().to_owned();
            if title.is_empty() {
                // Forgiving: the first description line becomes the title.
                let (t, d) = description.split_once('\n').unwrap_or((&description, ""));
                title = t.trim().to_owned();
                description = d.trim().to_owned();
            }
            if title.is_empty() {
                return err("a new case needs a title".into(), "new");
            }
            ChatCommand::New {
                title,
                description,
                labels,
                assignee,
                priority,
            }
        }
        "comment" | "note" | "reply" => {
            let (case, text) = take_case(args);
            let text = join_lines(text, more);
            if text.is_empty() {
                return err("a comment needs text".into(), "comment");
            }
            ChatCommand::Comment { case, text }
        }
        "close" | "resolve" | "done" | "fix" | "fixed" => {
            let (case, text) = take_case(args);
            let text = join_lines(text, more);
            ChatCommand::Close {
                case,
                text: (!text.is_empty()).then_some(text),
            }
        }
        "reopen" => ChatCommand::Reopen {
            case: take_case(args).0,
        },
        "assign" => {
            let (case, rest) = take_case(args);
            let person = rest
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_start_matches('@')
                .to_owned();
            if person.is_empty() {
                return err("say whom to assign: @person".into(), "assign");
            }
            ChatCommand::Assign { case, person }
        }
        "show" | "view" => ChatCommand::Show {
            case: take_case(args).0,
        },
        "find" => {
            if args.is_empty() {
                return err("say what to search for".into(), "find");
            }
            ChatCommand::Find {
                words: args.to_owned(),
            }
        }
        "mine" | "my" => ChatCommand::Mine,
        "help" | "h" | "commands" => ChatCommand::Help {
            topic: args
                .split_whitespace()
                .next()
                .map(|t| t.trim_start_matches(prefix).to_lowercase()),
        },
        other => {
            let best = COMMANDS
                .iter()
                .map(|(n, _, _)| (*n, strsim::levenshtein(other, n)))
                .min_by_key(|(_, d)| *d);
            let hint = match best {
                Some((n, d)) if d <= 2 => {
                    format!("unknown command {prefix}{other}: did you mean {prefix}{n}?")
                }
                _ => format!("unknown command {prefix}{other}"),
            };
            return Some(Err(ParseError {
                message: hint,
                usage: match best {
                    Some((n, d)) if d <= 2 => usage(n, prefix),
                    _ => overview(prefix),
                },
            }));
        }
    };
    Some(Ok(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ChatCommand {
        parse("!", s).expect("a command").expect("parses")
    }

    fn bad(s: &str) -> ParseError {
        parse("!", s).expect("a command").expect_err("fails")
    }

    #[test]
    fn new_with_tokens_and_description() {
        assert_eq!(
            ok("!new Login broken on Safari #bug #ui @bob !high\nSteps:\n1. open the page"),
            ChatCommand::New {
                title: "Login broken on Safari".into(),
                description: "Steps:\n1. open the page".into(),
                labels: vec!["bug".into(), "ui".into()],
                assignee: Some("bob".into()),
                priority: Some("high".into()),
            }
        );
    }

    #[test]
    fn new_without_title_takes_the_first_description_line() {
        match ok("!NEW #bug\nThe export times out\nfor large projects") {
            ChatCommand::New {
                title, description, ..
            } => {
                assert_eq!(title, "The export times out");
                assert_eq!(description, "for large projects");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(bad("!new").message, "a new case needs a title");
    }

    #[test]
    fn case_numbers_are_forgiving_and_optional() {
        assert_eq!(
            ok("!comment #42 looks good"),
            ChatCommand::Comment {
                case: Some(42),
                text: "looks good".into()
            }
        );
        assert_eq!(
            ok("!comment 42: looks good"),
            ChatCommand::Comment {
                case: Some(42),
                text: "looks good".into()
            }
        );
        assert_eq!(
            ok("!comment looks good"),
            ChatCommand::Comment {
                case: None,
                text: "looks good".into()
            }
        );
        assert_eq!(
            ok("!close 7 fixed in 1.2"),
            ChatCommand::Close {
                case: Some(7),
                text: Some("fixed in 1.2".into())
            }
        );
        assert_eq!(
            ok("!close"),
            ChatCommand::Close {
                case: None,
                text: None
            }
        );
        assert_eq!(ok("!reopen #7"), ChatCommand::Reopen { case: Some(7) });
        assert_eq!(
            ok("!assign 7 @Bob"),
            ChatCommand::Assign {
                case: Some(7),
                person: "Bob".into()
            }
        );
        assert_eq!(ok("!show 7"), ChatCommand::Show { case: Some(7) });
    }

    #[test]
    fn errors_say_how_to_fix() {
        let e = bad("!clsoe 4");
        assert_eq!(e.message, "unknown command !clsoe: did you mean !close?");
        assert!(e.usage.starts_with("!close 42"));
        assert_eq!(bad("!assign 4").usage, "!assign 42 @person");
        assert!(bad("!frobnicate").usage.contains("!new Title"));
        assert!(bad("!comment 5").message.contains("needs text"));
    }

    #[test]
    fn not_commands() {
        assert_eq!(parse("!", "hello !new"), None);
        assert_eq!(parse("!", "!!!"), None);
        assert_eq!(parse("!", "! wow"), None);
        assert_eq!(
            parse(".", ".find login timeout"),
            Some(Ok(ChatCommand::Find {
                words: "login timeout".into()
            }))
        );
        assert_eq!(
            ok("!help close"),
            ChatCommand::Help {
                topic: Some("close".into())
            }
        );
    }
}
