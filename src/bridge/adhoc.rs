//! XEP-0050 ad-hoc commands, answered by the bridge because most of them call a tracker.
//!
//! On a room (members only, like the room itself): "New case", "My filters", "Link my tracker
//! account". On the service (operators from `[muc] operators`): "Resync now", "Status". Each is a
//! single-stage dialog (§3.4: `<actions execute='complete'><complete/></actions>`): execute → form,
//! complete → done with notes. Tracker calls run off the read loop and come back as [`AdhocDone`].
//!
//! Errors follow §4.6: unknown node → item-not-found (also for a room the requester may not see,
//! as disco hides it); not an operator → forbidden; unknown session → bad-request/bad-sessionid;
//! prev/next → bad-request/bad-action; completing without a form → bad-request/bad-payload. A command
//! that ran but failed completes with an error note saying why and what to do (§3.5).
//!
//! The linking form carries a secret: neither the form nor the token is ever logged.

use chrono::{DateTime, Utc};
use minidom::Element;
use xmpp_parsers::data_forms::DataForm;
use xmpp_parsers::disco::{DiscoInfoResult, DiscoItemsResult, Identity, Item};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::ns;
use xmpp_parsers::stanza::Stanza;
use xmpp_parsers::stanza_error::{DefinedCondition, StanzaError};

use super::Bridge;
use crate::commands::forms::{self, LinkAsk};
use crate::commands::run::Reply;
use crate::links::Link;
use crate::tracker::TrackerError;
use crate::xmpp::adhoc::{self, Action, Note, Request, Response, Specific};
use crate::xmpp::outbound::iq_result;

/// Sessions left open longer than this (seconds) are forgotten.
const SESSION_TTL_SECS: i64 = 15 * 60;
/// Open sessions kept per person; starting one more forgets their oldest (bounds memory).
const SESSIONS_PER_PERSON: usize = 8;

/// What a command is run on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A room (localpart).
    Room(String),
    /// The service itself.
    Service,
}

/// An open session (§3.4.2): one requester, one target, one command.
#[derive(Debug)]
pub(super) struct Session {
    node: &'static str,
    requester: Jid,
    target: Target,
    started: DateTime<Utc>,
}

/// Where an IQ reply goes.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    requester: Jid,
    target: Jid,
    id: String,
    node: &'static str,
    sessionid: String,
}

/// A command's work that ran off the loop, to finish on it.
pub struct AdhocDone {
    /// The session to answer (none for the end of a device flow or a refresh).
    to: Option<ReplyTo>,
    outcome: Outcome,
}

/// The "New case" form, with the tracker's vocabulary or why it is missing.
pub(super) fn vocabulary_done(
    to: ReplyTo,
    tracker: &str,
    members: &[crate::tracker::Member],
    vocab: Result<crate::tracker::Vocabulary, String>,
) -> AdhocDone {
    let form = match vocab {
        Ok(v) => forms::new_case_form(tracker, Some(&v), members, None),
        Err(why) => forms::new_case_form(tracker, None, members, Some(&why)),
    };
    AdhocDone {
        to: Some(to),
        outcome: Outcome::Form(form),
    }
}

/// A case created (or not) from the "New case" form.
pub(super) fn created(
    to: ReplyTo,
    room: String,
    tracker: String,
    reply: Result<Reply, Reply>,
    login: String,
) -> AdhocDone {
    AdhocDone {
        to: Some(to),
        outcome: Outcome::Ran {
            room,
            tracker,
            reply,
            login,
        },
    }
}

/// Whose token it was (`Err(None)`: no answer in time).
pub(super) fn whoami_done(
    to: ReplyTo,
    tracker: String,
    jid: BareJid,
    token: String,
    who: Result<String, Option<TrackerError>>,
) -> AdhocDone {
    let outcome = match who {
        Ok(login) => Outcome::Linked { tracker, jid, link: Link::token(login, token) },
        Err(Some(TrackerError::Denied(_) | TrackerError::NotFound(_))) => Outcome::Done(vec![Note::error(format!("{tracker} did not accept this token; copy it again from your account settings (see the form's help)"))]),
        Err(Some(e)) => Outcome::Done(vec![note_for(&e, "check the token")]),
        Err(None) => Outcome::Done(vec![Note::error(format!("{tracker} did not answer within 15 s; try again later"))]),
    };
    AdhocDone {
        to: Some(to),
        outcome,
    }
}

/// A change of someone's link waiting for the file write.
pub(super) struct PendingWrite {
    to: Tell,
    saved: String,
    failed: String,
}

/// Who hears how a links change went.
pub(super) enum Tell {
    /// The ad-hoc session that asked.
    Form(ReplyTo),
    /// A chat message to this session (the device flow's session ended long ago).
    Chat(Jid),
    /// Nobody (a token refreshed by caseroom itself).
    Nobody,
}

/// The device flow's answers, made off the loop.
pub(super) fn device_code(
    to: ReplyTo,
    tracker: String,
    flow: super::DeviceFlowConfig,
    jid: BareJid,
    code: Result<crate::tracker::oauth::DeviceCode, TrackerError>,
) -> AdhocDone {
    let outcome = match code {
        Ok(code) => Outcome::DeviceCode {
            tracker,
            flow,
            code,
            jid,
        },
        Err(e) => Outcome::Done(vec![note_for(&e, "start linking in the browser")]),
    };
    AdhocDone {
        to: Some(to),
        outcome,
    }
}

/// The end of a device flow (`link`: the new link, or why not).
pub(super) fn device_done(
    tracker: String,
    jid: BareJid,
    tell: Jid,
    link: Result<Link, String>,
) -> AdhocDone {
    AdhocDone {
        to: None,
        outcome: Outcome::DeviceDone {
            tracker,
            jid,
            tell,
            link,
        },
    }
}

/// A refreshed token (or why not).
pub(super) fn refreshed(tracker: String, jid: BareJid, link: Result<Link, String>) -> AdhocDone {
    AdhocDone {
        to: None,
        outcome: Outcome::Refreshed { tracker, jid, link },
    }
}

enum Outcome {
    /// Show this form (the session goes on).
    Form(DataForm),
    /// Done with these notes.
    Done(Vec<Note>),
    /// The token belongs to this login: store the link, then say so.
    Linked {
        tracker: String,
        jid: BareJid,
        link: Link,
    },
    /// The tracker gave a device code: show it, and wait for the person's approval.
    DeviceCode {
        tracker: String,
        flow: super::DeviceFlowConfig,
        code: crate::tracker::oauth::DeviceCode,
        jid: BareJid,
    },
    /// The person approved in the browser (or not): tell them by a chat message.
    DeviceDone {
        tracker: String,
        jid: BareJid,
        tell: Jid,
        link: Result<Link, String>,
    },
    /// An expiring token was refreshed (or could not be).
    Refreshed {
        tracker: String,
        jid: BareJid,
        link: Result<Link, String>,
    },
    /// A case command ran; answer in the room too when it worked.
    Ran {
        room: String,
        tracker: String,
        reply: Result<Reply, Reply>,
        login: String,
    },
}

fn note_for(e: &TrackerError, what: &str) -> Note {
    Note::error(match e {
        TrackerError::Unreachable(_) => {
            format!("could not {what}: the tracker is unreachable ({e}); try again in a minute")
        }
        _ => format!("could not {what}: {e}"),
    })
}

impl Bridge {
    /// Take the IQs that are ad-hoc commands (or their disco) and answer them; give back the rest.
    pub(super) fn adhoc_intercept(&mut self, s: Stanza) -> Option<Stanza> {
        let Stanza::Iq(iq) = s else {
            return Some(s);
        };
        match &iq {
            Iq::Set {
                from: Some(from),
                to: Some(to),
                id,
                payload,
            } if payload.is("command", adhoc::NS) => {
                let (from, to, id, payload) =
                    (from.clone(), to.clone(), id.clone(), payload.clone());
                self.command(from, to, id, &payload);
                None
            }
            Iq::Get {
                from: Some(from),
                to: Some(to),
                id,
                payload,
            } if payload.is("query", ns::DISCO_ITEMS)
                && payload.attr("node") == Some(adhoc::NS)
                && to.resource().is_none() =>
            {
                let items = self.command_items(from, to);
                self.send(iq_result(to.clone(), from.clone(), id, Some(items)).into());
                None
            }
            Iq::Get {
                from: Some(from),
                to: Some(to),
                id,
                payload,
            } if payload.is("query", ns::DISCO_INFO) && to.resource().is_none() => {
                // §2.3: info about a command node: automation/command-node identity. Any other
                // disco#info goes to the core.
                let Some(info) = self.command_node_info(from, to, payload.attr("node")) else {
                    return Some(Stanza::Iq(iq));
                };
                self.send(iq_result(to.clone(), from.clone(), id, Some(info)).into());
                None
            }
            _ => Some(Stanza::Iq(iq)),
        }
    }

    fn command_node_info(&self, from: &Jid, to: &Jid, node: Option<&str>) -> Option<Element> {
        let node = node?;
        let (_, name) = forms::ROOM_COMMANDS
            .iter()
            .chain(forms::SERVICE_COMMANDS)
            .find(|(n, _)| *n == node)?;
        let target = Self::target_of(to)?;
        self.allowed(&target, node, &from.to_bare()).ok()?;
        Some(
            DiscoInfoResult {
                node: Some(node.to_owned()),
                identities: vec![Identity::new("automation", "command-node", "en", *name)],
                features: [adhoc::NS.to_owned(), ns::DATA_FORMS.to_owned()].into(),
                extensions: vec![],
            }
            .into(),
        )
    }

    fn target_of(to: &Jid) -> Option<Target> {
        if to.resource().is_some() {
            return None;
        }
        Some(match to.node() {
            None => Target::Service,
            Some(n) => Target::Room(n.as_str().to_lowercase()),
        })
    }

    /// May `who` run `node` on `target`? Err: the error condition to answer with.
    fn allowed(
        &self,
        target: &Target,
        node: &str,
        who: &BareJid,
    ) -> Result<&'static str, DefinedCondition> {
        match target {
            Target::Service => {
                let (n, _) = forms::SERVICE_COMMANDS
                    .iter()
                    .find(|(n, _)| *n == node)
                    .ok_or(DefinedCondition::ItemNotFound)?;
                if self.commands.operators.contains(who) {
                    Ok(n)
                } else {
                    Err(DefinedCondition::Forbidden)
                }
            }
            Target::Room(room) => {
                // A room the person may not see does not exist for them (as in disco).
                let visible = self.service.room(room).is_some_and(|r| r.may_see(who));
                let tracked = self.commands.rooms.contains_key(room);
                forms::ROOM_COMMANDS
                    .iter()
                    .find(|(n, _)| *n == node && (tracked || *n == forms::MY_FILTERS))
                    .filter(|_| visible)
                    .map(|(n, _)| *n)
                    .ok_or(DefinedCondition::ItemNotFound)
            }
        }
    }

    /// §2.2: the commands this requester may run here.
    fn command_items(&self, from: &Jid, to: &Jid) -> Element {
        let who = from.to_bare();
        let items = match Self::target_of(to) {
            Some(target) => {
                let all = match target {
                    Target::Service => forms::SERVICE_COMMANDS,
                    Target::Room(_) => forms::ROOM_COMMANDS,
                };
                all.iter()
                    .filter(|(n, _)| self.allowed(&target, n, &who).is_ok())
                    .map(|(n, name)| Item {
                        jid: to.clone(),
                        node: Some((*n).to_owned()),
                        name: Some((*name).to_owned()),
                    })
                    .collect()
            }
            None => vec![],
        };
        DiscoItemsResult {
            node: Some(adhoc::NS.to_owned()),
            items,
            rsm: None,
        }
        .into()
    }

    fn command_error(
        &self,
        from: Jid,
        to: Jid,
        id: String,
        cond: DefinedCondition,
        specific: Option<Specific>,
        text: &str,
    ) {
        self.send_error(from, to, id, adhoc::error(cond, specific, text));
    }

    fn send_error(&self, from: Jid, to: Jid, id: String, error: StanzaError) {
        self.send(
            Iq::Error {
                from: Some(to),
                to: Some(from),
                id,
                error,
                payload: None,
            }
            .into(),
        );
    }

    fn respond(&mut self, to: &ReplyTo, r: Response) {
        if r.status != adhoc::Status::Executing {
            self.commands.sessions.remove(&to.sessionid);
        }
        self.send(
            iq_result(
                to.target.clone(),
                to.requester.clone(),
                &to.id,
                Some(r.into()),
            )
            .into(),
        );
    }

    fn command(&mut self, from: Jid, to: Jid, id: String, payload: &Element) {
        let req = match Request::try_from(payload) {
            Ok(r) => r,
            Err(e) => return self.send_error(from, to, id, e.to_stanza_error()),
        };
        let Some(target) = Self::target_of(&to) else {
            return self.command_error(
                from,
                to,
                id,
                DefinedCondition::ItemNotFound,
                None,
                "commands run on a room or on the service, not on an occupant",
            );
        };
        let who = from.to_bare();
        let node = match self.allowed(&target, &req.node, &who) {
            Ok(n) => n,
            Err(cond) => {
                let text = match cond {
                    DefinedCondition::Forbidden => {
                        "only the operators in [muc] operators may run this command"
                    }
                    _ => "no such command here",
                };
                return self.command_error(from, to, id, cond, None, text);
            }
        };
        let Some(sessionid) = self.session_for(&req, &from, &to, &id, node, &target) else {
            return; // answered already
        };
        let reply_to = ReplyTo {
            requester: from.clone(),
            target: to.clone(),
            id: id.clone(),
            node,
            sessionid: sessionid.clone(),
        };
        match req.action {
            Action::Cancel => return self.respond(&reply_to, Response::canceled(node, &sessionid)),
            Action::Prev | Action::Next => {
                self.commands.sessions.remove(&sessionid);
                return self.command_error(
                    from,
                    to,
                    id,
                    DefinedCondition::BadRequest,
                    Some(Specific::BadAction),
                    "this command has a single step: complete it or cancel it",
                );
            }
            Action::Execute | Action::Complete => {}
        }
        // First stage (no session yet and no form): show the form. A form sent right away, or on
        // the second stage, is the submission.
        let submitted = req
            .form
            .as_ref()
            .filter(|f| f.type_ == xmpp_parsers::data_forms::DataFormType::Submit);
        if req.sessionid.is_some()
            && submitted.is_none()
            && node != forms::RESYNC
            && node != forms::STATUS
        {
            self.commands.sessions.remove(&sessionid);
            return self.command_error(
                from,
                to,
                id,
                DefinedCondition::BadRequest,
                Some(Specific::BadPayload),
                "complete the command with the filled-in form",
            );
        }
        self.run_command(reply_to, &target, who, submitted.cloned(), (from, to, id));
    }

    /// The session a request belongs to (§3.4): a new one (the person's oldest forgotten beyond
    /// `SESSIONS_PER_PERSON`; sessions older than `SESSION_TTL_SECS` expire), or the one it names,
    /// which must be theirs, on this target and command. `None`: answered already (error or cancel).
    fn session_for(
        &mut self,
        req: &Request,
        from: &Jid,
        to: &Jid,
        id: &str,
        node: &'static str,
        target: &Target,
    ) -> Option<String> {
        let now = self.now;
        self.commands
            .sessions
            .retain(|_, s| (now - s.started).num_seconds() < SESSION_TTL_SECS);
        let sessionid = match &req.sessionid {
            None => {
                let mine: Vec<(DateTime<Utc>, String)> = self
                    .commands
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.requester.to_bare() == from.to_bare())
                    .map(|(id, s)| (s.started, id.clone()))
                    .collect();
                if mine.len() >= SESSIONS_PER_PERSON {
                    if let Some((_, oldest)) = mine.into_iter().min() {
                        self.commands.sessions.remove(&oldest);
                    }
                }
                let sid = format!("{:016x}{:08x}", self.random(), self.random() >> 32);
                self.commands.sessions.insert(
                    sid.clone(),
                    Session {
                        node,
                        requester: from.clone(),
                        target: target.clone(),
                        started: now,
                    },
                );
                sid
            }
            Some(sid) => {
                let ok =
                    self.commands.sessions.get(sid).is_some_and(|s| {
                        s.requester == *from && s.target == *target && s.node == node
                    });
                if !ok {
                    if req.action == Action::Cancel {
                        // Cancelling what is already gone: nothing to undo.
                        let to = ReplyTo {
                            requester: from.clone(),
                            target: to.clone(),
                            id: id.to_owned(),
                            node,
                            sessionid: sid.clone(),
                        };
                        self.respond(&to, Response::canceled(node, sid));
                        return None;
                    }
                    self.command_error(from.clone(), to.clone(), id.to_owned(), DefinedCondition::BadRequest, Some(Specific::BadSessionid), "no such session (it ended, timed out after 15 minutes, or belongs to someone else); start the command again");
                    return None;
                }
                sid.clone()
            }
        };
        Some(sessionid)
    }

    /// Run command `reply_to.node` on `target` for `who`, with the submitted form if any. `iq` is the
    /// request's (from, to, id), for an error answer.
    fn run_command(
        &mut self,
        reply_to: ReplyTo,
        target: &Target,
        who: BareJid,
        submitted: Option<DataForm>,
        iq: (Jid, Jid, String),
    ) {
        let (node, sessionid) = (reply_to.node, reply_to.sessionid.clone());
        match (node, target) {
            (forms::STATUS, _) => {
                let form = forms::status_form(&self.status_lines());
                let mut r = Response::completed(node, &sessionid, vec![]);
                r.form = Some(form);
                self.respond(&reply_to, r)
            }
            (forms::RESYNC, _) => {
                let names: Vec<String> = self.commands.resync.iter().cloned().collect();
                for n in &names {
                    self.emit(super::Action::Resync(n.clone()));
                }
                let note = if names.is_empty() {
                    Note::warn("no tracker has a url and api_key, so there is nothing to sync")
                } else {
                    Note::info(format!(
                        "syncing groups and members of {} now; rooms follow within seconds (see Status)",
                        names.join(", ")
                    ))
                };
                self.respond(&reply_to, Response::completed(node, &sessionid, vec![note]))
            }
            (forms::MY_FILTERS, Target::Room(room)) => {
                self.my_filters(reply_to, room.clone(), who, submitted)
            }
            (forms::NEW_CASE, Target::Room(room)) => {
                self.new_case(reply_to, room.clone(), who, submitted)
            }
            (forms::LINK_ACCOUNT, Target::Room(room)) => {
                self.link_account(reply_to, room.clone(), who, submitted)
            }
            _ => {
                let (from, to, id) = iq;
                self.command_error(
                    from,
                    to,
                    id,
                    DefinedCondition::ItemNotFound,
                    None,
                    "no such command here",
                )
            }
        }
    }

    /// "My filters": show the person's rules for the room, or replace them with the submitted ones.
    fn my_filters(&mut self, to: ReplyTo, room: String, who: BareJid, submitted: Option<DataForm>) {
        let (node, sessionid) = (to.node, to.sessionid.clone());
        let Some(f) = submitted else {
            let current = self
                .service
                .room(&room)
                .map(|r| r.mutes_of(&who).to_vec())
                .unwrap_or_default();
            return self.respond(
                &to,
                Response::form(node, &sessionid, forms::filters_form(&current)),
            );
        };
        let (rules, problems) = forms::filters_from(Some(&f));
        let mut notes = vec![Note::info(if rules.is_empty() {
            "you see every event in this room".to_owned()
        } else {
            format!(
                "hidden for you in this room: {}",
                rules
                    .iter()
                    .map(crate::filter::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })];
        notes.extend(problems.into_iter().map(Note::warn));
        let effects = self.service.set_mutes(&room, &who, rules);
        self.perform(effects);
        self.respond(&to, Response::completed(node, &sessionid, notes))
    }

    fn new_case(&mut self, to: ReplyTo, room: String, who: BareJid, submitted: Option<DataForm>) {
        let Some((tracker, group)) = self.commands.rooms.get(&room).cloned() else {
            return self.respond(
                &to,
                Response::completed(
                    to.node,
                    &to.sessionid,
                    vec![Note::error("this room is not linked to a tracker project")],
                ),
            );
        };
        if !self.commands.clients.contains(&tracker) {
            return self.respond(
                &to,
                Response::completed(
                    to.node,
                    &to.sessionid,
                    vec![Note::error(format!(
                        "cases need [[tracker]] url and api_key for {tracker} in caseroom's config"
                    ))],
                ),
            );
        }
        let members = self
            .commands
            .members
            .get(&(tracker.clone(), group.clone()))
            .cloned()
            .unwrap_or_default();
        let Some(form) = submitted else {
            // The form lists the tracker's types and priorities: ask it, off the loop.
            self.emit(super::Action::Job(super::Job::Vocabulary {
                tracker,
                group,
                members,
                to,
            }));
            return;
        };
        let cmd = match forms::new_case_from(Some(&form)) {
            Ok(c) => c,
            Err(e) => {
                return self.respond(
                    &to,
                    Response::completed(
                        to.node,
                        &to.sessionid,
                        vec![Note::error(format!("nothing created: {e}"))],
                    ),
                )
            }
        };
        let Some(t) = self.hooks.trackers.get(&tracker).cloned() else {
            return;
        };
        let Some(actor) = self.actor_for(&t, &who) else {
            return self.respond(
                &to,
                Response::completed(
                    to.node,
                    &to.sessionid,
                    vec![Note::error(super::unknown_person(&tracker, &who))],
                ),
            );
        };
        let login = actor.login.clone();
        let ctx = crate::commands::run::Context {
            actor,
            nick: login.clone(),
            group,
            members,
            thread_case: None,
            prefix: t.command_prefix.clone(),
        };
        self.emit(super::Action::Job(super::Job::Create {
            tracker,
            cmd,
            ctx,
            to,
            room,
            login,
        }));
    }

    fn link_account(
        &mut self,
        to: ReplyTo,
        room: String,
        who: BareJid,
        submitted: Option<DataForm>,
    ) {
        let Some((tracker, _)) = self.commands.rooms.get(&room).cloned() else {
            return self.respond(
                &to,
                Response::completed(
                    to.node,
                    &to.sessionid,
                    vec![Note::error("this room is not linked to a tracker project")],
                ),
            );
        };
        let (Some(t), true) = (
            self.hooks.trackers.get(&tracker).cloned(),
            self.commands.clients.contains(&tracker),
        ) else {
            return self.respond(&to, Response::completed(to.node, &to.sessionid, vec![Note::error(format!("linking needs [[tracker]] url and api_key for {tracker} in caseroom's config"))]));
        };
        let linked = self
            .commands
            .links
            .as_ref()
            .and_then(|l| l.get(&tracker, who.as_str()))
            .map(|l| l.login.clone());
        let Some(form) = submitted else {
            let form = forms::link_form(
                &tracker,
                t.kind,
                t.url.as_deref().unwrap_or(""),
                linked.as_deref(),
                super::DeviceFlowConfig::of(&t).is_some(),
            );
            return self.respond(&to, Response::form(to.node, &to.sessionid, form));
        };
        let flow = super::DeviceFlowConfig::of(&t);
        match forms::link_from(Some(&form), flow.is_some()) {
            Err(e) => self.respond(
                &to,
                Response::completed(
                    to.node,
                    &to.sessionid,
                    vec![Note::error(format!("not linked: {e}"))],
                ),
            ),
            Ok(LinkAsk::Unlink) => {
                let Some(links) = self.commands.links.as_mut() else {
                    let note = Note::error("account linking is not available on this server");
                    return self
                        .respond(&to, Response::completed(to.node, &to.sessionid, vec![note]));
                };
                if !links.remove(&tracker, who.as_str()) {
                    let note = Note::info("you had no linked account");
                    return self
                        .respond(&to, Response::completed(to.node, &to.sessionid, vec![note]));
                }
                tracing::info!(tracker = %tracker, jid = %who, "account unlinked");
                self.save_links(
                    (&tracker, who.as_str()),
                    Tell::Form(to),
                    format!("unlinked: caseroom no longer uses your {tracker} token"),
                    format!("unlinked until caseroom restarts: the server could not write the change, so after a restart caseroom would use your token again. Revoke the token in {tracker}, and tell an operator"),
                );
            }
            Ok(LinkAsk::Device) => {
                if let Some(flow) = flow {
                    self.emit(super::Action::Job(super::Job::DeviceStart {
                        tracker,
                        flow,
                        to,
                        jid: who,
                    }));
                }
            }
            Ok(LinkAsk::Token(token)) => {
                self.emit(super::Action::Job(super::Job::WhoAmI {
                    tracker,
                    token,
                    to,
                    jid: who,
                }));
            }
        }
    }

    /// Ask the driver to write the change of `(tracker, jid)`'s link (the links file, or the shared
    /// table), answering `to` once it is written (or not).
    fn save_links(
        &mut self,
        (tracker, jid): (&str, &str),
        to: Tell,
        saved: String,
        failed: String,
    ) {
        let Some(links) = self.commands.links.as_ref() else {
            return;
        };
        let change = crate::links::LinkChange {
            tracker: tracker.to_owned(),
            jid: jid.to_owned(),
            link: links.get(tracker, jid).cloned(),
        };
        let contents = links.contents();
        self.commands.link_writes += 1;
        let ticket = self.commands.link_writes;
        self.commands
            .pending_link_writes
            .insert(ticket, PendingWrite { to, saved, failed });
        self.emit(super::Action::SaveLinks {
            contents,
            change,
            ticket,
        });
    }

    /// The links file was written (or not): answer the person who changed their link.
    pub(super) fn links_saved(&mut self, ticket: u64, result: Result<(), String>) {
        let Some(PendingWrite { to, saved, failed }) =
            self.commands.pending_link_writes.remove(&ticket)
        else {
            return;
        };
        let (ok, text) = match result {
            Ok(()) => (true, saved),
            Err(e) => {
                // Memory keeps the change (the person asked for it); disk has the one before.
                tracing::error!(error = %e, "could not save account links");
                (false, failed)
            }
        };
        match to {
            Tell::Form(to) => {
                let note = if ok {
                    Note::info(text)
                } else {
                    Note::error(text)
                };
                self.respond(&to, Response::completed(to.node, &to.sessionid, vec![note]));
            }
            Tell::Chat(jid) => self.tell(jid, &text),
            Tell::Nobody => {}
        }
    }

    /// A chat message from the service itself.
    fn tell(&self, to: Jid, text: &str) {
        let mut m = xmpp_parsers::message::Message::chat(Some(to));
        m.from = Some(self.service.domain_jid());
        m.bodies.insert(Default::default(), text.to_owned());
        self.send(m.into());
    }

    /// Finish work that ran off the loop.
    pub(super) fn adhoc_done(&mut self, d: AdhocDone) {
        let AdhocDone { to, outcome } = d;
        let to = match outcome {
            Outcome::DeviceDone {
                tracker,
                jid,
                tell,
                link,
            } => return self.device_linked(tracker, jid, tell, link),
            Outcome::Refreshed { tracker, jid, link } => {
                return self.token_refreshed(tracker, jid, link)
            }
            _ => match to {
                Some(to) => to,
                None => return,
            },
        };
        let r = match outcome {
            Outcome::Form(f) => Response::form(to.node, &to.sessionid, f),
            Outcome::Done(notes) => Response::completed(to.node, &to.sessionid, notes),
            Outcome::Linked { tracker, jid, link } => {
                let Some(links) = self.commands.links.as_mut() else {
                    let note = Note::error("account linking is not available on this server");
                    return self
                        .respond(&to, Response::completed(to.node, &to.sessionid, vec![note]));
                };
                let login = link.login.clone();
                links.set(&tracker, jid.as_str(), link);
                tracing::info!(tracker = %tracker, jid = %jid, login = %login, "account linked");
                return self.save_links(
                    (&tracker, jid.as_str()),
                    Tell::Form(to),
                    format!("linked: you act as {login} in {tracker} from now on, with your own token"),
                    "linked until caseroom restarts: the token is valid but the server could not save it; link again later, or tell an operator".to_owned(),
                );
            }
            Outcome::DeviceCode {
                tracker,
                flow,
                code,
                jid,
            } => {
                let minutes = code.expires_in.div_ceil(60);
                let go = code
                    .verification_uri_complete
                    .clone()
                    .unwrap_or_else(|| code.verification_uri.clone());
                let note = Note::info(format!(
                    "Open {go} and enter the code {} within {minutes} minutes to let caseroom act as you in {tracker}. caseroom tells you in a chat message when you are linked.",
                    code.user_code
                ));
                self.emit(super::Action::Job(super::Job::DevicePoll {
                    tracker,
                    flow,
                    code,
                    jid,
                    // Their bare JID: they may close this client while approving in the browser,
                    // and the server then delivers to another one or keeps it offline.
                    tell: Jid::from(to.requester.to_bare()),
                }));
                Response::completed(to.node, &to.sessionid, vec![note])
            }
            Outcome::DeviceDone { .. } | Outcome::Refreshed { .. } => return,
            Outcome::Ran {
                room,
                tracker,
                reply,
                login,
            } => {
                let note = match reply {
                    Ok(r) => {
                        let note = Note::info(r.text.clone());
                        self.answer(
                            &room,
                            &tracker,
                            Reply {
                                text: format!("{login} (form): {}", r.text),
                                case: r.case,
                            },
                        );
                        note
                    }
                    Err(r) => Note::error(r.text),
                };
                Response::completed(to.node, &to.sessionid, vec![note])
            }
        };
        self.respond(&to, r);
    }

    /// The device flow ended: keep the link and say so in a chat message, or say why not.
    fn device_linked(
        &mut self,
        tracker: String,
        jid: BareJid,
        tell: Jid,
        link: Result<Link, String>,
    ) {
        let link = match link {
            Ok(l) => l,
            Err(why) => return self.tell(tell, &format!("not linked to {tracker}: {why}. Run \"Link my tracker account\" again to retry.")),
        };
        let Some(links) = self.commands.links.as_mut() else {
            return self.tell(tell, "account linking is not available on this server");
        };
        let login = link.login.clone();
        links.set(&tracker, jid.as_str(), link);
        tracing::info!(tracker = %tracker, jid = %jid, login = %login, "account linked in the browser");
        self.save_links(
            (&tracker, jid.as_str()),
            Tell::Chat(tell),
            format!("linked: you act as {login} in {tracker} from now on (authorized in the browser)"),
            format!("linked to {tracker} as {login} until caseroom restarts: the server could not save it; link again later, or tell an operator"),
        );
    }

    /// A token refresh ended: keep the new token, or leave the link until it fails (the person is
    /// told to link again by the tracker's refusal then).
    fn token_refreshed(&mut self, tracker: String, jid: BareJid, link: Result<Link, String>) {
        self.commands
            .refreshing
            .remove(&(tracker.clone(), jid.to_string()));
        match link {
            Ok(link) => {
                if let Some(links) = self.commands.links.as_mut() {
                    links.set(&tracker, jid.as_str(), link);
                    self.save_links(
                        (&tracker, jid.as_str()),
                        Tell::Nobody,
                        String::new(),
                        String::new(),
                    );
                }
            }
            Err(why) => {
                // Tried again in ten minutes (a dead refresh token must not cost a call a minute).
                tracing::warn!(tracker = %tracker, jid = %jid, %why, "could not refresh a linked token; trying again in 10 minutes");
                self.commands.refresh_after.insert(
                    (tracker, jid.to_string()),
                    self.now + chrono::Duration::minutes(10),
                );
            }
        }
    }

    /// Ask for new tokens for links that expire within five minutes (checked once a minute).
    pub(super) fn refresh_expiring(&mut self) {
        let soon = self.now.timestamp() + 300;
        let due = self
            .commands
            .links
            .as_ref()
            .map(|l| l.expiring(soon))
            .unwrap_or_default();
        for (tracker, jid, refresh_token) in due {
            let key = (tracker.clone(), jid.clone());
            let (Some(flow), Ok(bare)) = (
                self.hooks
                    .trackers
                    .get(&tracker)
                    .and_then(|t| super::DeviceFlowConfig::of(t)),
                jid.parse::<BareJid>(),
            ) else {
                continue;
            };
            let waiting = self
                .commands
                .refresh_after
                .get(&key)
                .is_some_and(|t| *t > self.now);
            if waiting
                || !self.commands.clients.contains(&tracker)
                || !self.commands.refreshing.insert(key)
            {
                continue;
            }
            self.emit(super::Action::Job(super::Job::Refresh {
                tracker,
                flow,
                jid: bare,
                refresh_token,
            }));
        }
    }

    /// What "Status" shows.
    fn status_lines(&self) -> Vec<(String, String)> {
        use std::sync::atomic::Ordering::Relaxed;
        let l = &self.link_state;
        let h = &self.hooks.counters;
        let rooms = self.service.rooms().count();
        let occupants: usize = self.service.rooms().map(|r| r.occupants().count()).sum();
        // Rooms nobody may enter: most often a project the tracker no longer lists.
        let closed: Vec<&str> = self
            .service
            .rooms()
            .filter(|r| r.info.affiliations.is_empty())
            .map(|r| r.info.name.as_str())
            .collect();
        let closed = if closed.is_empty() {
            String::new()
        } else {
            format!("; closed (no one may enter): {}", closed.join(", "))
        };
        let mut lines: Vec<(String, String)> = vec![
            ("Version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            (
                "Uptime".to_owned(),
                format!(
                    "{} s",
                    self.started
                        .map_or(0, |t| (self.now - t).num_seconds().max(0))
                ),
            ),
            (
                "XMPP link".to_owned(),
                format!(
                    "{}; {} relinks, {} queued, {} dropped, {} malformed stanzas answered",
                    if l.is_up() { "up" } else { "DOWN" },
                    l.relinks.load(Relaxed),
                    l.queued.load(Relaxed),
                    l.dropped.load(Relaxed),
                    l.malformed.load(Relaxed)
                ),
            ),
            (
                "Rooms".to_owned(),
                format!("{rooms} rooms, {occupants} occupants{closed}"),
            ),
            (
                "Webhooks".to_owned(),
                format!(
                    "{} accepted, {} duplicates, {} bad signatures, {} malformed, {} unknown events, {} posted, {} not posted",
                    h.accepted.load(Relaxed),
                    h.duplicates.load(Relaxed),
                    h.unauthorized.load(Relaxed),
                    h.rejected.load(Relaxed),
                    h.unknown.load(Relaxed),
                    h.posted.load(Relaxed),
                    h.ignored.load(Relaxed)
                ),
            ),
        ];
        let mut names: Vec<&String> = self.hooks.trackers.keys().collect();
        names.sort();
        for n in names {
            let sync = self.commands.last_sync.get(n).cloned().unwrap_or_else(|| {
                if self.commands.clients.contains(n) {
                    "not synced yet".into()
                } else {
                    "webhooks only (no url)".into()
                }
            });
            let linked = self.commands.links.as_ref().map_or(0, |l| l.count(n));
            lines.push((
                format!("Tracker {n}"),
                format!("last sync {sync}; {linked} linked accounts"),
            ));
            if let Some(hooks) = self.commands.hook_status.get(n) {
                lines.push((format!("Webhooks of {n}"), hooks.clone()));
            }
        }
        let collisions: Vec<String> = self
            .commands
            .directory
            .collisions()
            .map(|c| c.to_string())
            .collect();
        if !collisions.is_empty() {
            lines.push(("Room collisions".to_owned(), collisions.join("; ")));
        }
        lines
    }
}
