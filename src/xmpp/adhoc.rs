//! XEP-0050 Ad-Hoc Commands, typed (xmpp-parsers has no module for it): the requester's `<command/>`
//! ([`Request`]), the responder's ([`Response`]), and the command-specific error conditions (§4.6).
//! Payloads are XEP-0004 data forms (xmpp-parsers' `DataForm`).

use minidom::Element;
use xmpp_parsers::data_forms::{DataForm, DataFormType};
use xmpp_parsers::ns;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use super::outbound::set;

/// `http://jabber.org/protocol/commands`.
pub const NS: &str = "http://jabber.org/protocol/commands";

/// What the requester asks for (§4.2 "action"). `execute` is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run, or go on (for a single-stage command: equal to `complete`).
    Execute,
    /// Stop the session.
    Cancel,
    /// Back one stage.
    Prev,
    /// Forward one stage.
    Next,
    /// Finish with what was given.
    Complete,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "execute" => Action::Execute,
            "cancel" => Action::Cancel,
            "prev" => Action::Prev,
            "next" => Action::Next,
            "complete" => Action::Complete,
            _ => return None,
        })
    }

    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Execute => "execute",
            Action::Cancel => "cancel",
            Action::Prev => "prev",
            Action::Next => "next",
            Action::Complete => "complete",
        }
    }
}

/// Where a session stands (responder's "status").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A form is waiting to be filled.
    Executing,
    /// Done; the session is over (check the notes for failure, §3.5).
    Completed,
    /// Cancelled; the session is over.
    Canceled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Executing => "executing",
            Status::Completed => "completed",
            Status::Canceled => "canceled",
        }
    }
}

/// Severity of a note (§4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteType {
    /// Informational.
    Info,
    /// Something was guessed or corrected.
    Warn,
    /// The command failed; the text says why.
    Error,
}

/// A human-readable note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Severity.
    pub type_: NoteType,
    /// Text.
    pub text: String,
}

impl Note {
    /// An info note.
    pub fn info(text: impl Into<String>) -> Note {
        Note {
            type_: NoteType::Info,
            text: text.into(),
        }
    }
    /// A warning note.
    pub fn warn(text: impl Into<String>) -> Note {
        Note {
            type_: NoteType::Warn,
            text: text.into(),
        }
    }
    /// An error note (the command completed but failed).
    pub fn error(text: impl Into<String>) -> Note {
        Note {
            type_: NoteType::Error,
            text: text.into(),
        }
    }
}

/// A requester's `<command/>`.
#[derive(Debug, Clone)]
pub struct Request {
    /// The command node.
    pub node: String,
    /// The session, from the second stage on.
    pub sessionid: Option<String>,
    /// What to do.
    pub action: Action,
    /// A submitted form (type `cancel` is read as `submit`, §3.4.1).
    pub form: Option<DataForm>,
}

/// Why a `<command/>` could not be read; each maps to the §4.6 error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No `node` attribute.
    #[error("the command has no node attribute")]
    NoNode,
    /// An action that is not one of the five.
    #[error("unknown action {0:?}; use execute, next, prev, complete or cancel")]
    MalformedAction(String),
    /// A `jabber:x:data` child that is not a valid form.
    #[error("the form could not be read: {0}")]
    BadPayload(String),
}

impl RequestError {
    /// The error stanza for it (§4.6).
    pub fn to_stanza_error(&self) -> StanzaError {
        match self {
            RequestError::NoNode => error(DefinedCondition::BadRequest, None, &self.to_string()),
            RequestError::MalformedAction(_) => error(
                DefinedCondition::BadRequest,
                Some(Specific::MalformedAction),
                &self.to_string(),
            ),
            RequestError::BadPayload(_) => error(
                DefinedCondition::BadRequest,
                Some(Specific::BadPayload),
                &self.to_string(),
            ),
        }
    }
}

impl TryFrom<&Element> for Request {
    type Error = RequestError;

    fn try_from(el: &Element) -> Result<Request, RequestError> {
        let node = el
            .attr("node")
            .filter(|n| !n.is_empty())
            .ok_or(RequestError::NoNode)?
            .to_owned();
        let action = match el.attr("action") {
            None => Action::Execute,
            Some(a) => {
                Action::parse(a).ok_or_else(|| RequestError::MalformedAction(a.to_owned()))?
            }
        };
        let form = match el.get_child("x", ns::DATA_FORMS) {
            None => None,
            Some(x) => {
                let mut f = DataForm::try_from(x.clone())
                    .map_err(|e| RequestError::BadPayload(e.to_string()))?;
                if f.type_ == DataFormType::Cancel {
                    f.type_ = DataFormType::Submit;
                }
                Some(f)
            }
        };
        Ok(Request {
            node,
            sessionid: el
                .attr("sessionid")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            action,
            form,
        })
    }
}

/// A responder's `<command/>`.
#[derive(Debug, Clone)]
pub struct Response {
    /// The command node.
    pub node: String,
    /// The session.
    pub sessionid: String,
    /// Where it stands.
    pub status: Status,
    /// Allowed actions while executing, with the default first; empty: single-stage (§3.4).
    pub actions: Vec<Action>,
    /// Notes.
    pub notes: Vec<Note>,
    /// A form to fill (executing) or a result form (completed).
    pub form: Option<DataForm>,
}

impl Response {
    /// A form to fill, finished with "complete" (a single-stage dialog).
    pub fn form(node: &str, sessionid: &str, form: DataForm) -> Response {
        Response {
            node: node.to_owned(),
            sessionid: sessionid.to_owned(),
            status: Status::Executing,
            actions: vec![Action::Complete],
            notes: vec![],
            form: Some(form),
        }
    }

    /// Done, with notes (an `error` note when it failed) and maybe a result form.
    pub fn completed(node: &str, sessionid: &str, notes: Vec<Note>) -> Response {
        Response {
            node: node.to_owned(),
            sessionid: sessionid.to_owned(),
            status: Status::Completed,
            actions: vec![],
            notes,
            form: None,
        }
    }

    /// Cancelled.
    pub fn canceled(node: &str, sessionid: &str) -> Response {
        Response {
            node: node.to_owned(),
            sessionid: sessionid.to_owned(),
            status: Status::Canceled,
            actions: vec![],
            notes: vec![],
            form: None,
        }
    }
}

impl From<Response> for Element {
    fn from(r: Response) -> Element {
        let mut el = Element::builder("command", NS)
            .attr(super::outbound::name("node"), r.node)
            .attr(super::outbound::name("sessionid"), r.sessionid)
            .attr(super::outbound::name("status"), r.status.as_str())
            .build();
        if let Some(default) = r.actions.first() {
            // §4.3: "execute" names the default, and must be among the allowed actions.
            let mut actions = Element::builder("actions", NS).build();
            set(&mut actions, "execute", default.as_str());
            for a in &r.actions {
                actions.append_child(Element::builder(a.as_str(), NS).build());
            }
            el.append_child(actions);
        }
        for n in r.notes {
            let mut note = Element::builder("note", NS).append(n.text).build();
            set(
                &mut note,
                "type",
                match n.type_ {
                    NoteType::Info => "info",
                    NoteType::Warn => "warn",
                    NoteType::Error => "error",
                },
            );
            el.append_child(note);
        }
        if let Some(f) = r.form {
            el.append_child(f.into());
        }
        el
    }
}

/// The command-specific error conditions of §4.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specific {
    /// The action is not one of the five.
    MalformedAction,
    /// The action is not allowed at this stage.
    BadAction,
    /// The form lacks what the command needs.
    BadPayload,
    /// No such session.
    BadSessionid,
    /// The session ended or timed out.
    SessionExpired,
}

impl Specific {
    fn as_str(self) -> &'static str {
        match self {
            Specific::MalformedAction => "malformed-action",
            Specific::BadAction => "bad-action",
            Specific::BadPayload => "bad-payload",
            Specific::BadSessionid => "bad-sessionid",
            Specific::SessionExpired => "session-expired",
        }
    }
}

/// A command error: the general condition, the §4.6 specific one, and a human text.
pub fn error(cond: DefinedCondition, specific: Option<Specific>, text: &str) -> StanzaError {
    let type_ = match cond {
        DefinedCondition::BadRequest => ErrorType::Modify,
        DefinedCondition::Forbidden => ErrorType::Auth,
        _ => ErrorType::Cancel,
    };
    let mut e = StanzaError::new(type_, cond, "en", text);
    e.other = specific.map(|s| Element::builder(s.as_str(), NS).build());
    e
}

/// A submitted form's values by field var (the first value for single fields).
pub fn values<'a>(form: Option<&'a DataForm>, var: &str) -> Vec<&'a str> {
    form.and_then(|f| f.fields.iter().find(|x| x.var.as_deref() == Some(var)))
        .map(|x| x.values.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

/// A submitted form's single value, trimmed; `None` when missing or blank.
pub fn value<'a>(form: Option<&'a DataForm>, var: &str) -> Option<&'a str> {
    values(form, var)
        .into_iter()
        .map(str::trim)
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<Request, RequestError> {
        let el: Element = xml.parse().expect("test XML");
        Request::try_from(&el)
    }

    #[test]
    fn reads_requests() {
        let r = parse("<command xmlns='http://jabber.org/protocol/commands' node='new-case'/>")
            .expect("valid");
        assert_eq!(r.node, "new-case");
        assert_eq!(r.action, Action::Execute);
        assert!(r.sessionid.is_none() && r.form.is_none());

        let r = parse(
            "<command xmlns='http://jabber.org/protocol/commands' node='n' sessionid='s1' action='complete'>\
             <x xmlns='jabber:x:data' type='submit'><field var='title'><value>Login broken</value></field>\
             <field var='labels'><value>bug</value><value>ui</value></field></x></command>",
        )
        .expect("valid");
        assert_eq!(r.sessionid.as_deref(), Some("s1"));
        assert_eq!(r.action, Action::Complete);
        assert_eq!(value(r.form.as_ref(), "title"), Some("Login broken"));
        assert_eq!(values(r.form.as_ref(), "labels"), vec!["bug", "ui"]);
        assert_eq!(value(r.form.as_ref(), "missing"), None);
    }

    #[test]
    fn rejects_bad_requests_with_the_specific_condition() {
        let e =
            parse("<command xmlns='http://jabber.org/protocol/commands' node='n' action='jump'/>")
                .expect_err("bad action");
        assert_eq!(e, RequestError::MalformedAction("jump".into()));
        let s = e.to_stanza_error();
        assert_eq!(s.defined_condition, DefinedCondition::BadRequest);
        assert!(s
            .other
            .as_ref()
            .is_some_and(|o| o.is("malformed-action", NS)));
        assert_eq!(
            parse("<command xmlns='http://jabber.org/protocol/commands'/>").expect_err("no node"),
            RequestError::NoNode
        );
    }

    #[test]
    fn writes_responses() {
        let form = DataForm::new(DataFormType::Form, "urn:example", vec![]);
        let el: Element = Response::form("new-case", "s1", form).into();
        assert_eq!(el.attr("status"), Some("executing"));
        assert_eq!(el.attr("sessionid"), Some("s1"));
        let actions = el.get_child("actions", NS).expect("actions");
        assert_eq!(actions.attr("execute"), Some("complete"));
        assert!(actions.has_child("complete", NS));
        assert!(el.has_child("x", ns::DATA_FORMS));

        let el: Element =
            Response::completed("n", "s1", vec![Note::error("could not: down")]).into();
        assert_eq!(el.attr("status"), Some("completed"));
        assert!(el.get_child("actions", NS).is_none());
        let note = el.get_child("note", NS).expect("note");
        assert_eq!(note.attr("type"), Some("error"));
        assert_eq!(note.text(), "could not: down");
    }
}
