//! Rooms that appear in members' clients by themselves: as an XEP-0356 privileged entity, caseroom
//! adds each synced room to its members' XEP-0402 bookmarks (autojoin) and takes it away when they
//! lose access. Pure: stanzas in, stanzas out; the bridge calls it from its sync.
//!
//! Rules (see `xep-notes/xep-0356.md`):
//! - A server says what it grants right after the component's handshake (XEP-0356 §7.2, the
//!   `<privilege/>` message from the server's domain). Only `urn:xmpp:privilege:2` with an IQ
//!   permission of type `set` (or `both`) for the pubsub namespace lets us write bookmarks; the
//!   grant covers that domain's users only, and is forgotten whenever the link is lost (the next
//!   handshake says it again, or not).
//! - A forged advertisement (any server may send a message from its own domain) can only concern the
//!   forger's own users: it stops their invitations and sends them privileged IQs their own server
//!   answers. Nobody else's users are touched.
//! - A member's bookmark is added once per membership: who has been given one is remembered (in the
//!   store, per room), so a member who deleted it by hand is not given it again until they lose
//!   access and regain it. A member whose bookmark could not be written is invited (XEP-0249)
//!   instead, once.
//! - Members on a server without the grant get the XEP-0249 invitation, as before.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::xmpp::outbound::name;
use minidom::Element;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::message::Message;

/// XEP-0356 version 0.4 (IQ permission).
pub const NS_PRIVILEGE: &str = "urn:xmpp:privilege:2";
/// XEP-0356 before 0.4 (roster, message and presence only: no bookmarks).
pub const NS_PRIVILEGE_OLD: &str = "urn:xmpp:privilege:1";
/// XEP-0402 PEP native bookmarks.
pub const NS_BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DATA: &str = "jabber:x:data";

/// Our IQs waiting for an answer at most; beyond, the oldest is forgotten (its answer, if it comes,
/// is then ignored). A sync of 10,000 members' bookmarks fits.
const MAX_PENDING: usize = 10_000;

/// The store's meta key holding the members of `room` given its bookmark (a JSON array of JIDs).
pub fn meta_key(room: &str) -> String {
    format!("bookmarked:{room}")
}

/// What one of our privileged IQs did.
#[derive(Debug, Clone)]
struct Pending {
    room: String,
    member: BareJid,
    publish: bool,
}

/// What a failed bookmark asks the bridge to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The room.
    pub room: String,
    /// Whom to invite (XEP-0249), since their bookmark could not be written.
    pub member: BareJid,
}

/// What bringing a room's bookmarks in line asks for.
#[derive(Debug, Default)]
pub struct Plan {
    /// Privileged IQs to send.
    pub iqs: Vec<Iq>,
    /// New members to invite the old way (their server grants no bookmarks).
    pub invite: Vec<BareJid>,
    /// The room's record changed: persist [`Bookmarks::record`].
    pub changed: bool,
}

/// Bookmark state of the whole service.
#[derive(Debug, Default)]
pub struct Bookmarks {
    /// Server domains that let us write their users' pubsub (bookmarks) nodes.
    granted: BTreeSet<String>,
    /// Room → members given its bookmark.
    given: HashMap<String, BTreeSet<BareJid>>,
    /// Our IQs waiting for their answer, by number (id `bm-N`).
    pending: BTreeMap<u64, Pending>,
    next: u64,
}

impl Bookmarks {
    /// What the store remembered for a room (see [`meta_key`]); unreadable values are ignored
    /// (the next sync gives those members their bookmark again, which is harmless).
    pub fn restore(&mut self, room: &str, stored: &str) {
        let Ok(jids) = serde_json::from_str::<Vec<String>>(stored) else {
            tracing::warn!(room, "ignoring an unreadable {}", meta_key(room));
            return;
        };
        let set: BTreeSet<BareJid> = jids.iter().filter_map(|j| j.parse().ok()).collect();
        if !set.is_empty() {
            self.given.insert(room.to_owned(), set);
        }
    }

    /// The room's record as stored (a JSON array, sorted).
    pub fn record(&self, room: &str) -> String {
        let jids: Vec<String> = self
            .given
            .get(room)
            .map(|s| s.iter().map(BareJid::to_string).collect())
            .unwrap_or_default();
        serde_json::to_string(&jids).unwrap_or_else(|_| "[]".into())
    }

    /// Whether bookmarks can be written for this member now.
    pub fn writable(&self, member: &BareJid) -> bool {
        self.granted.contains(member.domain().as_str())
    }

    /// The link was lost: grants are said again on the next handshake (or not), and answers to the
    /// IQs sent before will not come.
    pub fn relinked(&mut self) {
        self.granted.clear();
        self.pending.clear();
    }

    /// A `<privilege/>` advertisement (XEP-0356 §7.2) from a server domain to the service, or None
    /// when `m` is not one. Some(true) when it newly lets us write bookmarks (the bridge then
    /// brings every room in line).
    pub fn advertisement(&mut self, m: &Message, service: &BareJid) -> Option<bool> {
        let from = m.from.as_ref()?;
        let to = m.to.as_ref()?;
        if from.node().is_some() || from.resource().is_some() || to.to_bare() != *service {
            return None;
        }
        let p = m
            .payloads
            .iter()
            .find(|p| p.is("privilege", NS_PRIVILEGE) || p.is("privilege", NS_PRIVILEGE_OLD))?;
        let domain = from.domain().as_str().to_owned();
        let grants = p.is("privilege", NS_PRIVILEGE)
            && p.children()
                .filter(|perm| perm.name() == "perm" && perm.attr("access") == Some("iq"))
                .flat_map(|perm| perm.children())
                .any(|ns| {
                    ns.name() == "namespace"
                        && ns.attr("ns") == Some(NS_PUBSUB)
                        && matches!(ns.attr("type"), Some("set" | "both"))
                });
        if grants {
            tracing::info!(%domain, "the server lets caseroom write its users' bookmarks (XEP-0356)");
            Some(self.granted.insert(domain))
        } else {
            tracing::info!(
                %domain,
                "the server grants no pubsub IQ privilege: members are invited (XEP-0249), not bookmarked"
            );
            self.granted.remove(&domain);
            Some(false)
        }
    }

    /// Bring `room`'s bookmarks in line with its members: a bookmark for each member of a granting
    /// server not given one yet, a retraction for each member given one who is a member no more.
    /// `joined` are the members the sync has just affiliated: those of other servers are invited.
    pub fn reconcile(
        &mut self,
        service: &BareJid,
        room: &str,
        title: &str,
        members: &BTreeSet<BareJid>,
        joined: &[BareJid],
    ) -> Plan {
        let mut plan = Plan::default();
        let given = self.given.remove(room).unwrap_or_default();
        let mut kept = BTreeSet::new();
        for m in &given {
            if members.contains(m) {
                kept.insert(m.clone());
            } else {
                plan.changed = true;
                if self.writable(m) {
                    plan.iqs.push(self.iq(service, room, m, None));
                }
            }
        }
        for m in members {
            if kept.contains(m) {
                continue;
            }
            if self.writable(m) {
                plan.iqs.push(self.iq(service, room, m, Some(title)));
                kept.insert(m.clone());
                plan.changed = true;
            } else if joined.contains(m) {
                plan.invite.push(m.clone());
            }
        }
        if !kept.is_empty() {
            self.given.insert(room.to_owned(), kept);
        }
        plan
    }

    /// An IQ result or error addressed to the service: Some when it answers one of ours (then it is
    /// consumed), with the invitation to send instead if a bookmark could not be written.
    pub fn answer(&mut self, iq: &Iq) -> Option<Option<Fallback>> {
        let (from, id) = match iq {
            Iq::Result { from, id, .. } | Iq::Error { from, id, .. } => (from, id),
            _ => return None,
        };
        let n: u64 = id.strip_prefix("bm-")?.parse().ok()?;
        let (ok, why) = match iq {
            Iq::Error { error, .. } => (false, Some(format!("{:?}", error.defined_condition))),
            Iq::Result { payload, .. } => {
                // The server's answer wraps the user's server's answer (§7.3): an error inside a
                // result is still an error.
                let inner_error = payload
                    .as_ref()
                    .and_then(|p| p.get_child("forwarded", NS_FORWARD))
                    .and_then(|f| f.children().find(|c| c.name() == "iq"))
                    .filter(|i| i.attr("type") == Some("error"));
                let why = inner_error
                    .and_then(|i| i.children().find(|c| c.name() == "error"))
                    .and_then(|e| e.children().next())
                    .map(|c| c.name().to_owned());
                (inner_error.is_none(), why)
            }
            _ => return None,
        };
        let p = self.pending.get(&n)?;
        if from.as_ref().map(Jid::to_bare).as_ref() != Some(&p.member) {
            return None; // not from whom we asked: not our answer
        }
        let p = self.pending.remove(&n)?;
        if ok {
            tracing::debug!(room = %p.room, member = %p.member, publish = p.publish, "bookmark written");
            return Some(None);
        }
        let why = why.unwrap_or_else(|| "no reason given".into());
        if !p.publish {
            // Gone already (deleted by hand: item-not-found) or not ours to touch any more.
            tracing::debug!(room = %p.room, member = %p.member, %why, "bookmark not retracted");
            return Some(None);
        }
        tracing::warn!(room = %p.room, member = %p.member, %why, "could not add the room to the member's bookmarks: inviting instead");
        Some(Some(Fallback {
            room: p.room,
            member: p.member,
        }))
    }

    /// A privileged IQ (§7.3) setting (with a title) or retracting `room`'s bookmark for `member`.
    fn iq(&mut self, service: &BareJid, room: &str, member: &BareJid, title: Option<&str>) -> Iq {
        self.next += 1;
        let id = format!("bm-{}", self.next);
        self.pending.insert(
            self.next,
            Pending {
                room: room.to_owned(),
                member: member.clone(),
                publish: title.is_some(),
            },
        );
        while self.pending.len() > MAX_PENDING {
            self.pending.pop_first();
        }
        let item_id = format!("{room}@{service}");
        let pubsub = match title {
            Some(title) => publish(&item_id, title),
            None => Element::builder("pubsub", NS_PUBSUB)
                .append(
                    Element::builder("retract", NS_PUBSUB)
                        .attr(name("node"), NS_BOOKMARKS)
                        .attr(name("notify"), "true")
                        .append(Element::builder("item", NS_PUBSUB).attr(name("id"), item_id)),
                )
                .build(),
        };
        let wrapped = Element::builder("iq", "jabber:client")
            .attr(name("type"), "set")
            .attr(name("id"), id.clone())
            .attr(name("to"), member.as_str())
            .append(pubsub)
            .build();
        Iq::Set {
            from: Some(Jid::from(service.clone())),
            to: Some(Jid::from(member.clone())),
            id,
            payload: Element::builder("privileged_iq", NS_PRIVILEGE)
                .append(wrapped)
                .build(),
        }
    }
}

/// XEP-0402 §3.2: the bookmark, published with the node options every client uses (private,
/// persistent, as many items as there are bookmarks).
fn publish(item_id: &str, title: &str) -> Element {
    let field = |var: &str, value: &str| {
        Element::builder("field", NS_DATA)
            .attr(name("var"), var)
            .append(Element::builder("value", NS_DATA).append(value))
    };
    let options = Element::builder("x", NS_DATA)
        .attr(name("type"), "submit")
        .append(
            field(
                "FORM_TYPE",
                "http://jabber.org/protocol/pubsub#publish-options",
            )
            .attr(name("type"), "hidden"),
        )
        .append(field("pubsub#persist_items", "true"))
        .append(field("pubsub#max_items", "max"))
        .append(field("pubsub#send_last_published_item", "never"))
        .append(field("pubsub#access_model", "whitelist"));
    Element::builder("pubsub", NS_PUBSUB)
        .append(
            Element::builder("publish", NS_PUBSUB)
                .attr(name("node"), NS_BOOKMARKS)
                .append(
                    Element::builder("item", NS_PUBSUB)
                        .attr(name("id"), item_id)
                        .append(
                            Element::builder("conference", NS_BOOKMARKS)
                                .attr(name("name"), title)
                                .attr(name("autojoin"), "true"),
                        ),
                ),
        )
        .append(Element::builder("publish-options", NS_PUBSUB).append(options))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> BareJid {
        s.parse().unwrap()
    }

    fn advert(from: &str, xml: &str) -> Message {
        let el: Element = format!(
            "<message xmlns='jabber:component:accept' from='{from}' to='rooms.localhost'>{xml}</message>"
        )
        .parse()
        .unwrap();
        Message::try_from(el).unwrap()
    }

    /// What Prosody's mod_privilege sent on these machines (see xep-notes/xep-0356.md).
    const PROSODY: &str = "<privilege xmlns='urn:xmpp:privilege:2'><perm access='iq'><namespace type='set' ns='http://jabber.org/protocol/pubsub'/></perm></privilege>";
    /// What ejabberd 23.01's mod_privilege sent.
    const EJABBERD: &str = "<privilege xmlns='urn:xmpp:privilege:1'><perm type='outgoing' access='message'/><perm type='both' access='roster'/><perm type='none' access='presence'/></privilege>";

    #[test]
    fn only_an_iq_pubsub_set_grant_of_the_domain_itself_counts() {
        let svc = jid("rooms.localhost");
        let mut b = Bookmarks::default();
        assert_eq!(
            b.advertisement(&advert("localhost", EJABBERD), &svc),
            Some(false)
        );
        assert!(!b.writable(&jid("alice@localhost")));
        // From a user, not a server: not an advertisement at all.
        assert_eq!(
            b.advertisement(&advert("mallory@localhost", PROSODY), &svc),
            None
        );
        assert_eq!(
            b.advertisement(&advert("localhost", PROSODY), &svc),
            Some(true)
        );
        assert_eq!(
            b.advertisement(&advert("localhost", PROSODY), &svc),
            Some(false)
        );
        assert!(b.writable(&jid("alice@localhost")));
        // Another server's grant concerns its own users only.
        assert!(!b.writable(&jid("eve@evil.example")));
        b.relinked();
        assert!(!b.writable(&jid("alice@localhost")));
    }

    #[test]
    fn members_are_bookmarked_once_and_unbookmarked_when_they_leave() {
        let svc = jid("rooms.localhost");
        let mut b = Bookmarks::default();
        b.advertisement(&advert("localhost", PROSODY), &svc);
        let members: BTreeSet<BareJid> = [jid("alice@localhost"), jid("bob@remote.example")].into();
        let plan = b.reconcile(&svc, "web", "Web", &members, &[jid("bob@remote.example")]);
        assert_eq!(plan.iqs.len(), 1, "alice bookmarked");
        assert_eq!(plan.invite, vec![jid("bob@remote.example")], "bob invited");
        assert!(plan.changed);
        assert_eq!(b.record("web"), r#"["alice@localhost"]"#);
        // Next sync: nothing again (alice may have removed it by hand).
        let plan = b.reconcile(&svc, "web", "Web", &members, &[]);
        assert!(plan.iqs.is_empty() && plan.invite.is_empty() && !plan.changed);
        // Alice leaves: retracted, forgotten; she comes back: bookmarked again.
        let only_bob: BTreeSet<BareJid> = [jid("bob@remote.example")].into();
        let plan = b.reconcile(&svc, "web", "Web", &only_bob, &[]);
        let xml = String::from(&Element::from(plan.iqs[0].clone()));
        assert!(
            xml.contains("<retract") && xml.contains("web@rooms.localhost"),
            "{xml}"
        );
        assert_eq!(b.record("web"), "[]");
        let plan = b.reconcile(&svc, "web", "Web", &members, &[jid("alice@localhost")]);
        assert_eq!(plan.iqs.len(), 1);
        assert!(plan.invite.is_empty(), "bookmarked, not invited");
    }

    #[test]
    fn a_refused_bookmark_falls_back_to_an_invitation_once() {
        let svc = jid("rooms.localhost");
        let mut b = Bookmarks::default();
        b.advertisement(&advert("localhost", PROSODY), &svc);
        let members: BTreeSet<BareJid> = [jid("zed@localhost")].into();
        let plan = b.reconcile(&svc, "web", "Web", &members, &[]);
        let Iq::Set { id, .. } = &plan.iqs[0] else {
            panic!("a set")
        };
        // Prosody's answer for a JID with no account there.
        let err: Element = format!("<iq xmlns='jabber:component:accept' to='rooms.localhost' id='{id}' type='error' from='zed@localhost'><error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>").parse().unwrap();
        let err = Iq::try_from(err).unwrap();
        // A forged answer from someone else is not taken.
        let mut forged = err.clone();
        if let Iq::Error { from, .. } = &mut forged {
            *from = Some("mallory@localhost".parse().unwrap());
        }
        assert_eq!(b.answer(&forged), None);
        assert_eq!(
            b.answer(&err),
            Some(Some(Fallback {
                room: "web".into(),
                member: jid("zed@localhost")
            }))
        );
        assert_eq!(b.answer(&err), None, "answered once");
        assert!(b
            .reconcile(&svc, "web", "Web", &members, &[])
            .iqs
            .is_empty());
    }

    #[test]
    fn an_error_inside_a_result_is_an_error_and_a_retraction_of_nothing_is_fine() {
        let svc = jid("rooms.localhost");
        let mut b = Bookmarks::default();
        b.advertisement(&advert("localhost", PROSODY), &svc);
        let alice: BTreeSet<BareJid> = [jid("alice@localhost")].into();
        b.reconcile(&svc, "web", "Web", &alice, &[]);
        let plan = b.reconcile(&svc, "web", "Web", &BTreeSet::new(), &[]);
        let Iq::Set { id, .. } = &plan.iqs[0] else {
            panic!("a set")
        };
        // Prosody's answer when alice had deleted the bookmark herself.
        let res: Element = format!("<iq xmlns='jabber:component:accept' to='rooms.localhost' id='{id}' type='result' from='alice@localhost'><privilege xmlns='urn:xmpp:privilege:2'><forwarded xmlns='urn:xmpp:forward:0'><iq to='alice@localhost' id='{id}' xmlns='jabber:client' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq></forwarded></privilege></iq>").parse().unwrap();
        assert_eq!(b.answer(&Iq::try_from(res).unwrap()), Some(None));
        // The same wrapped error for a publish means no bookmark: invite instead.
        let plan = b.reconcile(&svc, "web", "Web", &alice, &[]);
        let Iq::Set { id, .. } = &plan.iqs[0] else {
            panic!("a set")
        };
        let res: Element = format!("<iq xmlns='jabber:component:accept' to='rooms.localhost' id='{id}' type='result' from='alice@localhost'><privilege xmlns='urn:xmpp:privilege:2'><forwarded xmlns='urn:xmpp:forward:0'><iq to='alice@localhost' id='{id}' xmlns='jabber:client' type='error'><error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq></forwarded></privilege></iq>").parse().unwrap();
        assert!(matches!(
            b.answer(&Iq::try_from(res).unwrap()),
            Some(Some(_))
        ));
    }
}
