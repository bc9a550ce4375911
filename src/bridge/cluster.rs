//! Several caseroom instances behind one component domain (ejabberd, `domain_balancing` by bare
//! destination, a shared PostgreSQL store): what one instance asks of the instance serving a room.
//!
//! The XMPP server routes every stanza for a room to one instance, the room's **owner** for as
//! long as the set of connected instances stays the same; only the owner knows who is in the
//! room. Work that starts elsewhere and changes the room goes to the owner the same way, as a
//! message from the service's own domain to the room's JID, which the server routes to whichever
//! instance serves the room:
//!
//! - `<relay/>`: post this message in the room (a tracker event accepted by another instance); the
//!   owner archives it (once: its `origin`) and broadcasts it to the occupants it knows.
//! - `<reload/>`: the room's affiliations changed in the store (the leader's tracker sync): read
//!   them and apply them (members who lost access are removed, 321).
//! - `<retract/>`: a comment was deleted in the tracker (an event accepted by another instance):
//!   retract the room's messages that showed it; the owner writes the tombstones and announces
//!   the retraction (XEP-0425) to the occupants it knows.
//!
//! Only the component itself can send from the service's bare domain (the server checks a
//! component's `from`, and no other server may claim a local domain), so a message from there is
//! trusted; from anyone else these elements are ordinary payloads of an ordinary message.
//! Pure: stanzas in, stanzas out.

use minidom::Element;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::message::{Message, MessageType};

use crate::muc::Post;
use crate::xmpp::outbound::name;

/// caseroom's own namespace for what instances ask of each other.
pub const NS: &str = "urn:xmpp:caseroom:cluster:0";

/// What another instance asked of this room's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// Post this.
    Relay(Post),
    /// Read the room's affiliations from the store and apply them.
    Reload(String),
    /// Retract what showed a deleted tracker comment.
    Retract(Retraction),
}

/// A tracker's retraction of what showed one of its objects, in one room.
#[derive(Debug, Clone, PartialEq)]
pub struct Retraction {
    /// The room.
    pub room: String,
    /// The deleted object (a comment's URL): every message that showed it is retracted.
    pub refers: String,
    /// The tracker's bot nick, who retracts.
    pub nick: String,
    /// Why, as the tombstone says it.
    pub reason: String,
    /// The inbox row this completes (the delivery's last room).
    pub completes_inbox: Option<i64>,
}

impl Ask {
    /// The room asked about.
    pub fn room(&self) -> &str {
        match self {
            Ask::Relay(p) => &p.room,
            Ask::Reload(room) => room,
            Ask::Retract(r) => &r.room,
        }
    }
}

/// The message asking the owner of `r.room` to retract.
pub fn retract(service: &BareJid, r: &Retraction) -> Option<Message> {
    let to: BareJid = format!("{}@{service}", r.room).parse().ok()?;
    let mut el = Element::builder("retract", NS)
        .attr(name("refers"), r.refers.as_str())
        .attr(name("nick"), r.nick.as_str())
        .append(Element::builder("reason", NS).append(r.reason.as_str()))
        .build();
    if let Some(id) = r.completes_inbox {
        crate::xmpp::outbound::set(&mut el, "completes", id.to_string());
    }
    Some(ask(service, to, el))
}

/// The message asking the owner of `post.room` to post it.
pub fn relay(service: &BareJid, post: &Post) -> Option<Message> {
    let to: BareJid = format!("{}@{service}", post.room).parse().ok()?;
    let mut relay = Element::builder("relay", NS)
        .attr(name("nick"), post.nick.as_str())
        .append(Element::builder("body", NS).append(post.body.as_str()))
        .build();
    if let Some(origin) = &post.origin {
        crate::xmpp::outbound::set(&mut relay, "origin", origin.as_str());
    }
    if let Some(c) = &post.completes_inbox {
        crate::xmpp::outbound::set(&mut relay, "completes", c.inbox.to_string());
        for r in &c.rooms {
            relay.append_child(Element::builder("room", NS).append(r.as_str()).build());
        }
    }
    if let Some(t) = &post.thread {
        crate::xmpp::outbound::set(&mut relay, "thread", t.as_str());
    }
    for p in &post.payloads {
        relay.append_child(p.clone());
    }
    Some(ask(service, to, relay))
}

/// The message asking the owner of `room` to reload its affiliations.
pub fn reload(service: &BareJid, room: &str) -> Option<Message> {
    let to: BareJid = format!("{room}@{service}").parse().ok()?;
    Some(ask(service, to, Element::builder("reload", NS).build()))
}

fn ask(service: &BareJid, to: BareJid, el: Element) -> Message {
    let mut m = Message::new(Some(Jid::from(to)));
    m.type_ = MessageType::Normal;
    m.from = Some(Jid::from(service.clone()));
    m.payloads.push(el);
    m
}

/// What `m` asks, when it is an instance's request: from the service's bare domain itself, to a
/// room of it. None for anything else (which then goes where it would have gone).
pub fn asked(m: &Message, service: &BareJid) -> Option<Ask> {
    let from = m.from.as_ref()?;
    if from.node().is_some() || from.resource().is_some() || from.domain() != service.domain() {
        return None;
    }
    let to = m.to.as_ref()?;
    let room = to.node()?.as_str().to_owned();
    if to.domain() != service.domain() || to.resource().is_some() {
        return None;
    }
    let el = m.payloads.iter().find(|p| p.ns() == NS)?;
    match el.name() {
        "reload" => Some(Ask::Reload(room)),
        "retract" => Some(Ask::Retract(Retraction {
            room,
            refers: el.attr("refers")?.to_owned(),
            nick: el.attr("nick")?.to_owned(),
            reason: el
                .get_child("reason", NS)
                .map(Element::text)
                .unwrap_or_default(),
            completes_inbox: el.attr("completes").and_then(|c| c.parse().ok()),
        })),
        "relay" => {
            let body = el
                .get_child("body", NS)
                .map(Element::text)
                .unwrap_or_default();
            Some(Ask::Relay(Post {
                room,
                nick: el.attr("nick")?.to_owned(),
                body,
                payloads: el.children().filter(|c| c.ns() != NS).cloned().collect(),
                thread: el.attr("thread").map(str::to_owned),
                origin: el.attr("origin").map(str::to_owned),
                completes_inbox: el
                    .attr("completes")
                    .and_then(|c| c.parse().ok())
                    .map(|inbox| crate::muc::Completes {
                        inbox,
                        rooms: el
                            .children()
                            .filter(|c| c.is("room", NS))
                            .map(Element::text)
                            .collect(),
                    }),
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> BareJid {
        "rooms.example.org".parse().unwrap()
    }

    #[test]
    fn a_relayed_post_arrives_whole_and_only_from_the_service_itself() {
        let json: Element = "<json xmlns='urn:xmpp:json:0'>{\"a\":1}</json>"
            .parse()
            .unwrap();
        let post = Post {
            room: "web".into(),
            nick: "Forge".into(),
            body: "alice opened #1 <b>".into(),
            payloads: vec![json],
            thread: Some("t-1".into()),
            origin: Some("inbox:7:web".into()),
            completes_inbox: Some(crate::muc::Completes {
                inbox: 7,
                rooms: vec!["web".into(), "ops".into()],
            }),
        };
        let m = relay(&service(), &post).unwrap();
        // Over the wire and back.
        let el = Element::from(m);
        let xml = String::from(&el);
        let back = Message::try_from(xml.parse::<Element>().unwrap()).unwrap();
        assert_eq!(asked(&back, &service()), Some(Ask::Relay(post.clone())));
        // The same element from a user, a room occupant or another domain asks nothing.
        for from in [
            "alice@example.org",
            "rooms.example.org/x",
            "evil.example",
            "web@rooms.example.org/Forge",
        ] {
            let mut forged = back.clone();
            forged.from = Some(from.parse().unwrap());
            assert_eq!(asked(&forged, &service()), None, "{from}");
        }
        let r = reload(&service(), "web").unwrap();
        assert_eq!(asked(&r, &service()), Some(Ask::Reload("web".into())));
    }
}
