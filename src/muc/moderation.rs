//! XEP-0425 (0.3.0) moderated retraction, with XEP-0424's vocabulary: an owner or admin retracts a
//! message for everyone. Pure: the request, the tombstone the archive keeps in the message's place
//! (§ Tombstones), and the announcement every occupant gets (§ Success case).

use chrono::{DateTime, Utc};
use minidom::Element;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::stanza_error::DefinedCondition;

use super::ArchivedMessage;
use crate::xmpp::outbound::name;

/// XEP-0425's namespace (request, `<moderated/>`, disco feature).
pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
/// XEP-0424's namespace (`<retract/>`, `<retracted/>`).
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
const NS_OID: &str = "urn:xmpp:occupant-id:0";
const NS_FALLBACK: &str = "urn:xmpp:fallback:0";
/// A reason is at most this long (it is kept in the archive and sent to everyone).
pub const MAX_REASON: usize = 1024;

/// A retraction asked for by a moderator (or by a tracker, whose comment was deleted), on its way
/// to the store and back.
#[derive(Debug, Clone, PartialEq)]
pub struct Moderation {
    /// Room localpart.
    pub room: String,
    /// The room's stanza-id (= archive id) of the message; empty when `refers` names it instead.
    pub id: String,
    /// The tracker object (a comment's URL) whose messages are retracted, when a tracker said it
    /// was deleted: the store finds them (`archive_ref`).
    pub refers: Option<String>,
    /// Who moderates, as the tombstone names them: their occupant JID (room/nick) when joined, else
    /// the room's JID.
    pub by: Jid,
    /// The moderator's XEP-0421 occupant id.
    pub by_occupant_id: String,
    /// Why, if they said.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
    /// The IQ to answer: (asker, room JID, id); `None` when a tracker asked.
    pub iq: Option<(Jid, Jid, String)>,
    /// The webhook delivery this retraction completes: marked done in the same transaction.
    pub completes_inbox: Option<i64>,
}

/// The message id and the reason from a `<moderate/>` request.
pub fn parse(payload: &Element) -> Result<(String, Option<String>), (DefinedCondition, String)> {
    let bad = |t: &str| (DefinedCondition::BadRequest, t.to_owned());
    let id = payload
        .attr("id")
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("<moderate/> needs the message's stanza-id in 'id'"))?;
    if payload.get_child("retract", NS_RETRACT).is_none() {
        return Err((
            DefinedCondition::FeatureNotImplemented,
            "only retraction (<retract xmlns='urn:xmpp:message-retract:1'/>) is supported".into(),
        ));
    }
    let reason = payload
        .get_child("reason", NS_MODERATE)
        .map(|r| r.text())
        .filter(|r| !r.trim().is_empty());
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err((
            DefinedCondition::PolicyViolation,
            format!("a reason is at most {MAX_REASON} bytes"),
        ));
    }
    Ok((id.to_owned(), reason))
}

fn moderated(m: &Moderation) -> Element {
    Element::builder("moderated", NS_MODERATE)
        .attr(name("by"), m.by.to_string())
        .append(
            Element::builder("occupant-id", NS_OID)
                .attr(name("id"), m.by_occupant_id.clone())
                .build(),
        )
        .build()
}

fn reason(m: &Moderation) -> Option<Element> {
    m.reason.as_ref().map(|r| {
        Element::builder("reason", NS_MODERATE)
            .append(r.as_str())
            .build()
    })
}

/// The archived message as the archive keeps it once retracted: same place, sender, id and
/// occupant id; no body or other content, a `<retracted/>` saying by whom, when and why.
pub fn tombstone(original: &ArchivedMessage, m: &Moderation) -> ArchivedMessage {
    let mut msg = Message::new(None);
    msg.type_ = original.message.type_.clone();
    msg.id = original.message.id.clone();
    msg.from = original.message.from.clone();
    // Kept: who sent it (occupant id) and the room's own stanza-id (join history shows it there).
    msg.payloads = original
        .message
        .payloads
        .iter()
        .filter(|p| p.is("occupant-id", NS_OID) || p.is("stanza-id", "urn:xmpp:sid:0"))
        .cloned()
        .collect();
    let mut retracted = Element::builder("retracted", NS_RETRACT)
        .attr(
            name("stamp"),
            m.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
        .append(moderated(m))
        .build();
    if let Some(r) = reason(m) {
        retracted.append_child(r);
    }
    msg.payloads.push(retracted);
    ArchivedMessage {
        message: msg,
        ..original.clone()
    }
}

/// What every occupant gets (from the room itself, the only legitimate sender, § Business Rules),
/// with a plain-text fallback for clients without XEP-0424.
pub fn announcement(m: &Moderation, room: Jid, id: String) -> Message {
    let mut msg = Message::new(None);
    msg.type_ = MessageType::Groupchat;
    msg.from = Some(room);
    msg.id = Some(xmpp_parsers::message::Id(id));
    let mut retract = Element::builder("retract", NS_RETRACT)
        .attr(name("id"), m.id.clone())
        .append(moderated(m))
        .build();
    if let Some(r) = reason(m) {
        retract.append_child(r);
    }
    msg.payloads.push(retract);
    msg.payloads.push(
        Element::builder("fallback", NS_FALLBACK)
            .attr(name("for"), NS_RETRACT)
            .build(),
    );
    let text = match &m.reason {
        Some(r) => format!("A moderator retracted a message: {r}"),
        None => "A moderator retracted a message.".to_owned(),
    };
    msg.bodies.insert(Default::default(), text);
    msg
}
