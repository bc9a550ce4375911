//! The XEP-0050 ad-hoc commands' XEP-0004 forms: building them and reading what people submit.
//! Pure: the bridge decides who may run what and does the tracker calls; a submitted "New case" form
//! becomes the same [`ChatCommand::New`] as `!new`, so both get the same forgiving guesses and reply.

use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};

use super::ChatCommand;
use crate::config::FilterConfig;
use crate::tracker::{Member, Vocabulary};
use crate::webhook::TrackerKind;
use crate::xmpp::adhoc::{value, values};

/// Room command: create a case as the person.
pub const NEW_CASE: &str = "new-case";
/// Room command: the person's event filters in this room.
pub const MY_FILTERS: &str = "my-filters";
/// Room command: link the person's tracker account with a personal API token.
pub const LINK_ACCOUNT: &str = "link-account";
/// Service command (operators): sync every tracker's groups and members now.
pub const RESYNC: &str = "resync";
/// Service command (operators): link, webhooks, rooms, trackers at a glance.
pub const STATUS: &str = "status";

/// Room commands: (node, name).
pub const ROOM_COMMANDS: &[(&str, &str)] = &[
    (NEW_CASE, "New case"),
    (MY_FILTERS, "My filters"),
    (LINK_ACCOUNT, "Link my tracker account"),
];
/// Service commands: (node, name).
pub const SERVICE_COMMANDS: &[(&str, &str)] = &[(RESYNC, "Resync now"), (STATUS, "Status")];

const FORM_NEW_CASE: &str = "urn:caseroom:new-case";
const FORM_FILTERS: &str = "urn:caseroom:filters";
const FORM_LINK: &str = "urn:caseroom:link-account";
const FORM_STATUS: &str = "urn:caseroom:status";

fn field(var: &str, type_: FieldType, label: &str) -> Field {
    let mut f = Field::new(var, type_);
    f.label = Some(label.to_owned());
    f
}

fn list(var: &str, label: &str, options: impl IntoIterator<Item = (String, String)>) -> Field {
    let mut f = field(var, FieldType::ListSingle, label);
    f.options = options
        .into_iter()
        .map(|(label, value)| Option_ {
            label: Some(label),
            value,
        })
        .collect();
    f
}

/// "New case": title, description, type, priority, assignee (the group's members), labels. Without a
/// vocabulary (the tracker did not answer), type and priority are free text and guessed on submit.
pub fn new_case_form(
    tracker: &str,
    vocab: Option<&Vocabulary>,
    members: &[Member],
    trouble: Option<&str>,
) -> DataForm {
    let mut title = field("title", FieldType::TextSingle, "Title");
    title.required = true;
    let mut fields = vec![
        title,
        field("description", FieldType::TextMulti, "Description"),
    ];
    let choices = |var: &str, label: &str, names: Option<&Vec<String>>| match names {
        Some(n) if !n.is_empty() => list(var, label, n.iter().map(|k| (k.clone(), k.clone()))),
        _ => field(var, FieldType::TextSingle, label),
    };
    fields.push(choices("type", "Type", vocab.map(|v| &v.kinds)));
    fields.push(choices(
        "priority",
        "Priority",
        vocab.map(|v| &v.priorities),
    ));
    let mut people: Vec<&Member> = members.iter().collect();
    people.sort_by(|a, b| a.name.cmp(&b.name));
    fields.push(list(
        "assignee",
        "Assignee",
        people
            .into_iter()
            .map(|m| (format!("{} ({})", m.name, m.login), m.login.clone())),
    ));
    fields.push(field(
        "labels",
        FieldType::TextSingle,
        "More labels (space or comma separated)",
    ));
    let mut form = DataForm::new(DataFormType::Form, FORM_NEW_CASE, fields);
    form.title = Some("New case".into());
    form.instructions = Some(match trouble {
        None => format!("caseroom creates the case in {tracker} as you and says what it guessed."),
        Some(t) => format!("caseroom creates the case in {tracker} as you. {t}; type and priority are free text and will be matched to the nearest ones."),
    });
    form
}

/// A submitted "New case" → the `!new` command. Missing title: the description's first line.
pub fn new_case_from(form: Option<&DataForm>) -> Result<ChatCommand, String> {
    let description = values(form, "description").join("\n").trim().to_owned();
    let title = value(form, "title")
        .map(str::to_owned)
        .or_else(|| {
            description
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .ok_or("give the case a title (or at least a description)")?;
    let mut labels: Vec<String> = value(form, "type").map(str::to_owned).into_iter().collect();
    for l in values(form, "labels") {
        labels.extend(
            l.split(|c: char| c == ',' || c.is_whitespace())
                .map(|w| w.trim_start_matches('#'))
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(ChatCommand::New {
        title,
        description,
        labels,
        assignee: value(form, "assignee").map(|a| a.trim_start_matches('@').to_owned()),
        priority: value(form, "priority").map(str::to_owned),
    })
}

/// "My filters": the person's rules in this room, one per line, as `!mute` takes them.
pub fn filters_form(current: &[FilterConfig]) -> DataForm {
    let mut rules = field(
        "rules",
        FieldType::TextMulti,
        "Hide events matching (one rule per line)",
    );
    rules.values = current.iter().map(crate::filter::describe).collect();
    let mut form = DataForm::new(DataFormType::Form, FORM_FILTERS, vec![rules]);
    form.title = Some("My filters".into());
    form.instructions = Some(
        "Events matching a rule are not shown to you in this room (the archive keeps them). \
         Examples: `ci succeeded`, `event=push branch=!main`, `#wontfix`, `verb=closed`. \
         Empty: see everything."
            .into(),
    );
    form
}

/// A submitted "My filters" → the new rules, and the lines that could not be read (with why).
pub fn filters_from(form: Option<&DataForm>) -> (Vec<FilterConfig>, Vec<String>) {
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for line in values(form, "rules")
        .into_iter()
        .flat_map(str::lines)
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        match crate::filter::parse_mute(line) {
            Ok(r) if !rules.contains(&r) => rules.push(r),
            Ok(_) => {}
            Err(e) => problems.push(format!("dropped {line:?}: {e}")),
        }
    }
    (rules, problems)
}

/// Where a person finds a personal API token on a tracker.
fn token_help(kind: TrackerKind, url: &str) -> String {
    let url = url.trim_end_matches('/');
    match kind {
        TrackerKind::Redmine => format!("In Redmine, open {url}/my/account and copy your API access key (\"Show\" in the sidebar)."),
        TrackerKind::Gitea | TrackerKind::Forgejo => format!("Create a token at {url}/user/settings/applications with the scopes read:user, read:repository and write:issue."),
        TrackerKind::Gitlab => format!("Create a personal access token at {url}/-/user_settings/personal_access_tokens with the scope api."),
        TrackerKind::Github => "Create a personal access token at https://github.com/settings/tokens (on GitHub Enterprise Server: your server's Settings, Developer settings) allowed to read and write issues of the repositories.".into(),
        TrackerKind::Jira => "Create an API token at https://id.atlassian.com/manage-profile/security/api-tokens and enter it as your-email:token (the email of your Atlassian account, a colon, the token).".into(),
        _ => "Create a personal API token in your tracker's settings.".into(),
    }
}

/// "Link my tracker account": paste a token (validated against the tracker), or unlink.
pub fn link_form(
    tracker: &str,
    kind: TrackerKind,
    url: &str,
    linked: Option<&str>,
    device: bool,
) -> DataForm {
    let mut help = field("help", FieldType::Fixed, "");
    help.label = None;
    help.values = vec![if device {
        format!("Leave the token empty to link in your browser: caseroom gives you an address and a code to enter there, and tells you here when you are linked. Or: {}", token_help(kind, url))
    } else {
        token_help(kind, url)
    }];
    let mut token = field(
        "token",
        FieldType::TextPrivate,
        if device {
            "Personal API token (empty: link in the browser)"
        } else {
            "Personal API token"
        },
    );
    token.desc = Some("Kept in a private file on the caseroom server, never logged.".into());
    let mut fields = vec![help, token];
    if linked.is_some() {
        fields.push(field("unlink", FieldType::Boolean, "Unlink instead"));
    }
    let mut form = DataForm::new(DataFormType::Form, FORM_LINK, fields);
    form.title = Some(format!("Link your {tracker} account"));
    form.instructions = Some(match linked {
        Some(login) => format!("You are linked to {tracker} user {login}. Paste a new token to re-link, or tick Unlink."),
        None => format!("caseroom then acts in {tracker} with your own token and permissions."),
    });
    form
}

/// What a submitted link form asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkAsk {
    /// Link this token.
    Token(String),
    /// Link through the browser (device flow).
    Device,
    /// Forget the link.
    Unlink,
}

/// A submitted "Link my tracker account"; `device`: the tracker offers linking in the browser.
pub fn link_from(form: Option<&DataForm>, device: bool) -> Result<LinkAsk, String> {
    if matches!(value(form, "unlink"), Some("1" | "true")) {
        return Ok(LinkAsk::Unlink);
    }
    match value(form, "token") {
        Some(t) if t.chars().any(char::is_whitespace) => {
            Err("the token contains spaces; paste it exactly as the tracker shows it".into())
        }
        Some(t) => Ok(LinkAsk::Token(t.to_owned())),
        None if device => Ok(LinkAsk::Device),
        None => Err("paste your personal API token in the token field".into()),
    }
}

/// "Status": a result form, one read-only field per line.
pub fn status_form(lines: &[(String, String)]) -> DataForm {
    let fields = lines
        .iter()
        .map(|(label, v)| {
            let mut f = field(
                &label.to_lowercase().replace(' ', "-"),
                FieldType::TextSingle,
                label,
            );
            f.values = vec![v.clone()];
            f
        })
        .collect();
    let mut form = DataForm::new(DataFormType::Result_, FORM_STATUS, fields);
    form.title = Some("caseroom status".into());
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(fields: &[(&str, &[&str])]) -> DataForm {
        DataForm::new(
            DataFormType::Submit,
            "",
            fields
                .iter()
                .map(|(var, vals)| {
                    let mut f = Field::new(var, FieldType::TextSingle);
                    f.values = vals.iter().map(|v| v.to_string()).collect();
                    f
                })
                .collect(),
        )
    }

    #[test]
    fn new_case_form_offers_types_priorities_and_members() {
        let vocab = Vocabulary {
            kinds: vec!["Bug".into(), "Feature".into()],
            priorities: vec!["Normal".into(), "High".into()],
        };
        let members = vec![Member {
            login: "bob".into(),
            name: "Bob Smith".into(),
            roles: vec![],
        }];
        let f = new_case_form("redmine", Some(&vocab), &members, None);
        let get = |v: &str| {
            f.fields
                .iter()
                .find(|x| x.var.as_deref() == Some(v))
                .expect(v)
        };
        assert!(get("title").required);
        assert_eq!(get("type").type_, FieldType::ListSingle);
        assert_eq!(get("type").options.len(), 2);
        assert_eq!(get("assignee").options[0].value, "bob");
        assert_eq!(
            get("assignee").options[0].label.as_deref(),
            Some("Bob Smith (bob)")
        );
        // Tracker down: still a form, with free-text type.
        let f = new_case_form("redmine", None, &[], Some("redmine did not answer"));
        let t = f
            .fields
            .iter()
            .find(|x| x.var.as_deref() == Some("type"))
            .expect("type");
        assert_eq!(t.type_, FieldType::TextSingle);
        assert!(f
            .instructions
            .as_deref()
            .is_some_and(|i| i.contains("did not answer")));
    }

    #[test]
    fn a_submitted_case_becomes_new() {
        let f = submit(&[
            ("title", &[""]),
            ("description", &["Login broken", "on Safari"]),
            ("type", &["bgu"]),
            ("labels", &["#ui, safari"]),
            ("assignee", &["bob"]),
            ("priority", &["High"]),
        ]);
        match new_case_from(Some(&f)).expect("a case") {
            ChatCommand::New {
                title,
                description,
                labels,
                assignee,
                priority,
            } => {
                assert_eq!(title, "Login broken");
                assert_eq!(description, "Login broken\non Safari");
                assert_eq!(labels, vec!["bgu", "ui", "safari"]);
                assert_eq!(assignee.as_deref(), Some("bob"));
                assert_eq!(priority.as_deref(), Some("High"));
            }
            other => panic!("not a new case: {other:?}"),
        }
        assert!(new_case_from(Some(&submit(&[("title", &["  "])]))).is_err());
        assert!(new_case_from(None).is_err());
    }

    #[test]
    fn filters_round_trip_and_bad_lines_are_reported() {
        let (rules, problems) = filters_from(Some(&submit(&[(
            "rules",
            &[
                "ci succeeded",
                "event=push branch=!main",
                "bogus words",
                "ci succeeded",
            ],
        )])));
        assert_eq!(rules.len(), 2);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("bogus"));
        let form = filters_form(&rules);
        let shown = &form
            .fields
            .iter()
            .find(|f| f.var.as_deref() == Some("rules"))
            .expect("rules")
            .values;
        assert_eq!(
            shown,
            &vec![
                "event=ci verb=succeeded".to_owned(),
                "event=push branch=!main".to_owned()
            ]
        );
        let (again, _) = filters_from(Some(&submit(&[(
            "rules",
            &shown.iter().map(String::as_str).collect::<Vec<_>>(),
        )])));
        assert_eq!(again, rules);
    }

    #[test]
    fn link_submissions() {
        assert_eq!(
            link_from(Some(&submit(&[("token", &[" abc123 "])])), false),
            Ok(LinkAsk::Token("abc123".into()))
        );
        assert_eq!(
            link_from(
                Some(&submit(&[("token", &[""]), ("unlink", &["1"])])),
                false
            ),
            Ok(LinkAsk::Unlink)
        );
        assert!(link_from(Some(&submit(&[("token", &["ab c"])])), false).is_err());
        assert!(link_from(None, false).is_err());
        // Where the tracker offers the device flow, an empty token means "in the browser".
        assert_eq!(
            link_from(Some(&submit(&[("token", &[""])])), true),
            Ok(LinkAsk::Device)
        );
        let f = link_form(
            "redmine",
            TrackerKind::Redmine,
            "http://r.example/",
            None,
            false,
        );
        assert!(f.fields.iter().any(|x| x
            .values
            .iter()
            .any(|v| v.contains("http://r.example/my/account"))));
        assert!(f.fields.iter().all(|x| x.var.as_deref() != Some("unlink")));
        let f = link_form("hub", TrackerKind::Github, "https://github.com", None, true);
        assert!(f
            .fields
            .iter()
            .any(|x| x.values.iter().any(|v| v.contains("link in your browser"))));
    }
}
