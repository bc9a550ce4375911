//! Typed builders for the stanzas caseroom sends (pure, no IO).
//!
//! Two wire pitfalls are handled here once, for every caller:
//! * attributes equal to their default are not serialised by xmpp-parsers, but XEP-0045 §7.2.x requires
//!   `role='none'`/`affiliation='none'` on items, so the muc#user `<x/>` is built by [`muc_user`];
//! * the `component` feature makes `jabber:component:accept` the default namespace crate-wide, including
//!   for messages nested in a MAM `<forwarded/>`; [`client_ns`] rewrites those to `jabber:client`.

use minidom::rxml::{Namespace, NcName};
use minidom::Element;
use xmpp_parsers::{
    iq::Iq,
    jid::Jid,
    message::{Message, MessageType},
    muc::user::{Affiliation, Role},
    ns,
    presence::Presence,
    stanza::Stanza,
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
};

/// An attribute name from a literal (all callers pass static, valid names).
pub fn name(n: &'static str) -> NcName {
    NcName::try_from(n).unwrap_or_else(|_| panic!("invalid static attribute name {n:?}"))
}

/// Set an un-namespaced attribute.
pub fn set(el: &mut Element, n: &'static str, value: impl Into<String>) {
    el.set_attr(Namespace::NONE, name(n), value.into());
}

/// An `<item/>` of a muc#user `<x/>`.
#[derive(Debug, Clone)]
pub struct UserItem {
    /// The occupant's affiliation.
    pub affiliation: Affiliation,
    /// The occupant's role (`None`: not written, as in muc#admin lists).
    pub role: Option<Role>,
    /// The real JID, when the receiver may see it.
    pub jid: Option<Jid>,
    /// New nick (status 303) or nick of an affiliation list entry.
    pub nick: Option<String>,
    /// Why (kicks, removals).
    pub reason: Option<String>,
}

/// Attribute value of an affiliation (always written, even `none`).
pub fn affiliation_str(a: &Affiliation) -> &'static str {
    match a {
        Affiliation::Owner => "owner",
        Affiliation::Admin => "admin",
        Affiliation::Member => "member",
        Affiliation::Outcast => "outcast",
        Affiliation::None => "none",
    }
}

/// Attribute value of a role (always written, even `none`).
pub fn role_str(r: &Role) -> &'static str {
    match r {
        Role::Moderator => "moderator",
        Role::Participant => "participant",
        Role::Visitor => "visitor",
        Role::None => "none",
    }
}

/// Parse a role attribute (the inverse of [`role_str`]).
pub fn parse_role(s: &str) -> Option<Role> {
    Some(match s {
        "moderator" => Role::Moderator,
        "participant" => Role::Participant,
        "visitor" => Role::Visitor,
        "none" => Role::None,
        _ => return None,
    })
}

/// Parse an affiliation attribute.
pub fn parse_affiliation(s: &str) -> Option<Affiliation> {
    Some(match s {
        "owner" => Affiliation::Owner,
        "admin" => Affiliation::Admin,
        "member" => Affiliation::Member,
        "outcast" => Affiliation::Outcast,
        "none" => Affiliation::None,
        _ => return None,
    })
}

/// `<x xmlns='http://jabber.org/protocol/muc#user'>` with items and status codes.
pub fn muc_user(items: &[UserItem], statuses: &[u16]) -> Element {
    let mut x = Element::builder("x", ns::MUC_USER).build();
    for item in items {
        x.append_child(item_element(ns::MUC_USER, item));
    }
    for code in statuses {
        x.append_child(
            Element::builder("status", ns::MUC_USER)
                .attr(name("code"), code.to_string())
                .build(),
        );
    }
    x
}

/// One `<item/>` in the given namespace (muc#user or muc#admin).
pub fn item_element(namespace: &str, item: &UserItem) -> Element {
    let mut el = Element::builder("item", namespace)
        .attr(name("affiliation"), affiliation_str(&item.affiliation))
        .build();
    if let Some(role) = &item.role {
        set(&mut el, "role", role_str(role));
    }
    if let Some(jid) = &item.jid {
        set(&mut el, "jid", jid.to_string());
    }
    if let Some(nick) = &item.nick {
        set(&mut el, "nick", nick.clone());
    }
    if let Some(reason) = &item.reason {
        el.append_child(
            Element::builder("reason", namespace)
                .append(reason.clone())
                .build(),
        );
    }
    el
}

/// A stanza error with a human text.
pub fn error(type_: ErrorType, cond: DefinedCondition, text: &str, by: Option<Jid>) -> StanzaError {
    let mut e = StanzaError::new(type_, cond, "en", text);
    e.by = by;
    e
}

/// The conventional error type for a condition (RFC 6120 §8.3.3).
pub fn error_type_for(cond: &DefinedCondition) -> ErrorType {
    match cond {
        DefinedCondition::BadRequest
        | DefinedCondition::JidMalformed
        | DefinedCondition::NotAcceptable
        | DefinedCondition::FeatureNotImplemented
        | DefinedCondition::UnexpectedRequest => ErrorType::Modify,
        DefinedCondition::Conflict
        | DefinedCondition::ItemNotFound
        | DefinedCondition::ServiceUnavailable
        | DefinedCondition::NotAllowed
        | DefinedCondition::RemoteServerTimeout => ErrorType::Cancel,
        DefinedCondition::Forbidden
        | DefinedCondition::RegistrationRequired
        | DefinedCondition::NotAuthorized => ErrorType::Auth,
        DefinedCondition::InternalServerError | DefinedCondition::ResourceConstraint => {
            ErrorType::Wait
        }
        _ => ErrorType::Cancel,
    }
}

/// An IQ error reply to a request.
pub fn iq_error(from: Jid, to: Jid, id: &str, cond: DefinedCondition, text: &str) -> Iq {
    let e = error(error_type_for(&cond), cond, text, None);
    Iq::Error {
        from: Some(from),
        to: Some(to),
        id: id.to_owned(),
        error: e,
        payload: None,
    }
}

/// An IQ result.
pub fn iq_result(from: Jid, to: Jid, id: &str, payload: Option<Element>) -> Iq {
    Iq::Result {
        from: Some(from),
        to: Some(to),
        id: id.to_owned(),
        payload,
    }
}

/// A message error bounce.
pub fn message_error(
    from: Jid,
    to: Jid,
    id: Option<String>,
    cond: DefinedCondition,
    text: &str,
) -> Message {
    let mut m = Message::error(Some(to));
    m.from = Some(from);
    m.id = id.map(xmpp_parsers::message::Id);
    m.payloads
        .push(error(error_type_for(&cond), cond, text, None).into());
    m
}

/// A presence error bounce.
pub fn presence_error(
    from: Jid,
    to: Jid,
    id: Option<String>,
    cond: DefinedCondition,
    text: &str,
) -> Presence {
    let mut p = Presence::error().with_from(from).with_to(to);
    p.id = id;
    p.payloads
        .push(error(error_type_for(&cond), cond, text, None).into());
    p
}

/// Rewrite an element (and children in the same namespace) from the component namespace to
/// `jabber:client`, for stanzas nested inside `<forwarded/>` (pitfall: component default namespace).
pub fn client_ns(el: &Element) -> Element {
    rewrite_ns(el, ns::COMPONENT_ACCEPT, ns::JABBER_CLIENT)
}

/// The reverse of [`client_ns`]: a stored `jabber:client` message back in the component namespace,
/// as xmpp-parsers (with the `component` feature) parses stanzas.
pub fn component_ns(el: &Element) -> Element {
    rewrite_ns(el, ns::JABBER_CLIENT, ns::COMPONENT_ACCEPT)
}

fn rewrite_ns(el: &Element, from: &str, to: &str) -> Element {
    let namespace = if el.ns() == from {
        to.to_owned()
    } else {
        el.ns()
    };
    let mut out = Element::builder(el.name(), namespace).build();
    *out.attrs_mut() = el.attrs().clone();
    for node in el.nodes() {
        match node {
            minidom::Node::Element(child) => {
                out.append_child(rewrite_ns(child, from, to));
            }
            minidom::Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

/// The error reply to a whole stanza (addressed back to its sender, from where it was sent).
/// Never to an error, a result or a stanza without both addresses (RFC 6120 §8.3.1).
pub fn error_for(stanza: &Stanza, cond: DefinedCondition, text: &str) -> Option<Stanza> {
    Some(match stanza {
        Stanza::Iq(Iq::Get { from, to, id, .. } | Iq::Set { from, to, id, .. }) => {
            iq_error(to.clone()?, from.clone()?, id, cond, text).into()
        }
        Stanza::Iq(_) => return None,
        Stanza::Message(m) if m.type_ != MessageType::Error => {
            let id = m.id.as_ref().map(|i| i.0.clone());
            message_error(m.to.clone()?, m.from.clone()?, id, cond, text).into()
        }
        Stanza::Presence(p) if p.type_ != xmpp_parsers::presence::Type::Error => {
            presence_error(p.to.clone()?, p.from.clone()?, p.id.clone(), cond, text).into()
        }
        Stanza::Message(_) | Stanza::Presence(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muc_user_keeps_none_attributes() {
        let x = muc_user(
            &[UserItem {
                affiliation: Affiliation::Member,
                role: Some(Role::None),
                jid: None,
                nick: None,
                reason: None,
            }],
            &[110],
        );
        let s = String::from(&x);
        assert!(
            s.contains("role=\"none\"") || s.contains("role='none'"),
            "{s}"
        );
        assert!(
            s.contains("code=\"110\"") || s.contains("code='110'"),
            "{s}"
        );
    }

    #[test]
    fn nested_message_gets_client_namespace() {
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat'><body>hi</body><stanza-id xmlns='urn:xmpp:sid:0' id='1' by='r@x'/></message>"
            .parse()
            .expect("literal");
        let out = client_ns(&el);
        assert_eq!(out.ns(), ns::JABBER_CLIENT);
        assert_eq!(
            out.get_child("body", ns::JABBER_CLIENT).map(|b| b.text()),
            Some("hi".into())
        );
        assert!(out.get_child("stanza-id", ns::SID).is_some());
        assert!(out.get_child("body", ns::COMPONENT_ACCEPT).is_none());
    }
}
