//! Scenario tests: play the XMPP server. Each test sends literal stanzas (as the server would
//! deliver them on the component stream) into the real MUC core and a real SQLite store, and
//! asserts on the stanzas caseroom sends back. No sockets, no clock: time is stepped by hand.

use std::collections::BTreeMap;

mod common;

use caseroom::muc::{mam, Effect, Post, RoomInfo, Service};
use caseroom::store::Store;
use chrono::{DateTime, Duration, TimeZone, Utc};
use minidom::Element;
use xmpp_parsers::{jid::BareJid, muc::user::Affiliation, stanza::Stanza};

const ROOM: &str = "team@rooms.example.org";
const NS: &str = "jabber:component:accept";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const MAM: &str = "urn:xmpp:mam:2";
const RSM: &str = "http://jabber.org/protocol/rsm";

struct Server {
    svc: Service,
    store: Store,
    now: DateTime<Utc>,
    out: common::Outbox,
    /// Rooms whose history the core asked to read ([`Server::finish_loads`] answers).
    loads: Vec<String>,
    /// The last occupants the core asked to keep (several instances).
    sessions: Vec<caseroom::muc::room::SessionRow>,
    /// How each stanza was handed to the link, in order: `reply <to>` (answer lane),
    /// `send <to>` / `broadcast <to>` (broadcast lane), `departed <room> <session>`.
    lanes: Vec<String>,
    _dir: tempfile::TempDir,
}

fn bare(s: &str) -> BareJid {
    s.parse().expect("test JID")
}

impl Server {
    fn new() -> Server {
        Self::with_room(false)
    }

    fn with_room(anonymous: bool) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("t.db")).expect("store");
        let mut affiliations = BTreeMap::new();
        affiliations.insert(bare("alice@example.org"), Affiliation::Owner);
        affiliations.insert(bare("adam@example.org"), Affiliation::Admin);
        affiliations.insert(bare("bob@example.org"), Affiliation::Member);
        affiliations.insert(bare("carol@example.org"), Affiliation::Member);
        affiliations.insert(bare("mallory@example.org"), Affiliation::Outcast);
        let info = RoomInfo {
            name: "team".into(),
            title: "The team".into(),
            description: "Where the team talks".into(),
            anonymous,
            subject: "Welcome".into(),
            affiliations,
        };
        store.upsert_room(&info).expect("room");
        store
            .persist(&caseroom::muc::Persist::Subject {
                room: "team".into(),
                subject: "Welcome".into(),
            })
            .expect("subject");
        let mut svc = Service::new(common::service_config(60, 10), 42);
        for r in store.rooms().expect("rooms") {
            svc.upsert_room(r, vec![]);
        }
        Server {
            svc,
            store,
            now: Utc
                .with_ymd_and_hms(2026, 11, 1, 12, 0, 0)
                .single()
                .expect("date"),
            out: common::Outbox::default(),
            loads: vec![],
            sessions: vec![],
            lanes: vec![],
            _dir: dir,
        }
    }

    /// Deliver one stanza (written without the stream namespace) and perform all effects.
    fn send(&mut self, xml: &str) {
        let at = xml.find([' ', '>', '/']).expect("a tag");
        let xml = format!("{} xmlns='{NS}'{}", &xml[..at], &xml[at..]);
        let el: Element = xml.parse().expect("valid XML literal");
        let stanza = Stanza::try_from(el).expect("a stanza");
        self.now += Duration::seconds(1);
        let effects = self.svc.handle(stanza, self.now);
        self.perform(effects);
    }

    /// One second passes: the service's tick.
    fn tick(&mut self) {
        self.now += Duration::seconds(1);
        let effects = self.svc.tick(self.now);
        self.perform(effects);
    }

    /// Deliver a stanza without advancing the clock.
    fn send_at_same_time(&mut self, xml: &str) {
        self.now -= Duration::seconds(1);
        self.send(xml);
    }

    /// A stanza handed to the link on `lane`.
    fn sent(&mut self, lane: &str, s: Stanza) {
        let el = Element::from(s);
        self.lanes
            .push(format!("{lane} {}", el.attr("to").unwrap_or("")));
        self.out.push_back(el);
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(s) => self.sent("send", s),
                Effect::Reply(s) => self.sent("reply", s),
                Effect::ReplyPrepared(p) => {
                    let s = p.stanza().expect("a prepared copy parses back");
                    self.sent("reply", s)
                }
                Effect::Broadcast(b) => {
                    for to in b.to.iter() {
                        self.lanes.push(format!("broadcast {to}"));
                    }
                    self.out.extend(b.copies().map(Element::from));
                }
                Effect::Departed { room, session } => {
                    self.lanes.push(format!("departed {room} {session}"));
                }
                Effect::Archive(m) => {
                    self.store.append(std::slice::from_ref(&m)).expect("append");
                    let more = self.svc.archived(m);
                    self.perform(more);
                }
                Effect::Persist(p) => {
                    if let caseroom::muc::Persist::Occupants { rows, .. } = &p {
                        self.sessions = rows.clone();
                    }
                    self.store.persist(&p).expect("persist")
                }
                Effect::LoadHistory(room) => self.loads.push(room),
                Effect::Mam(req) => {
                    let page = self.store.query(&req.query);
                    for out in mam::results(&req, page) {
                        self.out.push_back(common::element(out));
                    }
                }
                Effect::Moderate(m) => {
                    let result = self.store.moderate(&m).map_err(|e| e.to_string());
                    let more = self.svc.moderated(m, result);
                    self.perform(more);
                }
            }
        }
    }

    /// A new service from the same store, as `caseroom run` opens it after a restart.
    fn restart(&mut self) {
        self.svc = Service::new(common::service_config(60, 10), 43);
        self.svc
            .set_last_seq(self.store.last_seq().expect("last seq"));
        for r in self.store.rooms().expect("rooms") {
            self.svc.restore_room(r);
        }
        self.out.clear();
    }

    /// Answer the history reads asked for so far, from the store as it is now.
    fn finish_loads(&mut self) {
        for room in std::mem::take(&mut self.loads) {
            let stored = self
                .store
                .recent(&room, caseroom::muc::room::HISTORY_CACHE)
                .expect("recent");
            let effects = self.svc.history_read(&room, stored);
            self.perform(effects);
        }
    }

    /// Take the first sent stanza matching `pred`, or fail listing what was sent.
    fn expect(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        self.out.take(what, pred)
    }

    fn none(&self, what: &str, pred: impl Fn(&Element) -> bool) {
        self.out.none(what, pred)
    }

    fn clear(&mut self) {
        self.out.clear();
    }

    fn join(&mut self, full: &str, nick: &str) {
        self.send(&format!(
            "<presence from='{full}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
        ));
        let to = full.to_owned();
        self.expect("self-presence", |e| {
            is_presence_to(e, &to) && statuses(e).contains(&110)
        });
        self.clear();
    }

    /// `full` leaves the room (it was `nick` there); what is sent in answer stays to be looked at.
    fn leave(&mut self, full: &str, nick: &str) {
        self.send(&format!(
            "<presence from='{full}' to='{ROOM}/{nick}' type='unavailable'/>"
        ));
    }

    fn say(&mut self, full: &str, text: &str) {
        self.send(&format!("<message from='{full}' to='{ROOM}' type='groupchat' id='{text}'><body>{text}</body></message>"));
    }

    fn iq(&mut self, from: &str, id: &str, inner: &str, to: &str, kind: &str) -> Element {
        self.send(&format!(
            "<iq from='{from}' to='{to}' id='{id}' type='{kind}'>{inner}</iq>"
        ));
        let id = id.to_owned();
        self.expect("iq answer", |e| {
            e.name() == "iq" && e.attr("id") == Some(id.as_str())
        })
    }
}

fn is_presence_to(e: &Element, to: &str) -> bool {
    e.name() == "presence" && e.attr("to") == Some(to)
}

fn statuses(e: &Element) -> Vec<u16> {
    e.get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.is("status", MUC_USER))
                .filter_map(|c| c.attr("code").and_then(|v| v.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn item(e: &Element) -> Element {
    e.get_child("x", MUC_USER)
        .and_then(|x| x.get_child("item", MUC_USER))
        .cloned()
        .unwrap_or_else(|| panic!("no muc#user item in {}", String::from(e)))
}

fn condition(e: &Element) -> String {
    let err = e
        .get_child("error", NS)
        .unwrap_or_else(|| panic!("not an error: {}", String::from(e)));
    assert_eq!(e.attr("type"), Some("error"));
    err.children()
        .find(|c| c.ns() == STANZAS && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_default()
}

fn body(e: &Element) -> Option<String> {
    e.get_child("body", NS).map(|b| b.text())
}

fn mam_iq(form: &str, rsm: &str) -> String {
    let form = if form.is_empty() {
        String::new()
    } else {
        format!("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>{form}</x>")
    };
    format!("<query xmlns='{MAM}' queryid='q'>{form}<set xmlns='{RSM}'>{rsm}</set></query>")
}

/// Run a MAM query as alice; returns (bodies, fin).
fn mam_query(s: &mut Server, form: &str, rsm: &str) -> (Vec<String>, Element) {
    s.clear();
    let fin = s.iq(
        "alice@example.org/phone",
        "mq",
        &mam_iq(form, rsm),
        ROOM,
        "set",
    );
    assert_eq!(fin.attr("type"), Some("result"), "{}", String::from(&fin));
    let bodies = s
        .out
        .drain(..)
        .filter_map(|m| {
            let fwd = m
                .get_child("result", MAM)?
                .get_child("forwarded", "urn:xmpp:forward:0")?;
            let inner = fwd.get_child("message", "jabber:client")?;
            inner.get_child("body", "jabber:client").map(|b| b.text())
        })
        .collect();
    let fin = fin.get_child("fin", MAM).cloned().expect("fin");
    (bodies, fin)
}

fn rsm_text(fin: &Element, name: &str) -> Option<String> {
    fin.get_child("set", RSM)?
        .get_child(name, RSM)
        .map(|e| e.text())
}

// ---------------------------------------------------------------- joining

#[test]
fn join_sends_occupants_then_self_presence_then_subject() {
    let mut s = Server::new();
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!("<presence from='alice@example.org/phone' to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let names: Vec<String> = s
        .out
        .iter()
        .filter(|e| e.attr("to") == Some("alice@example.org/phone"))
        .map(|e| format!("{}:{}", e.name(), e.attr("from").unwrap_or("")))
        .collect();
    assert_eq!(
        names,
        vec![
            format!("presence:{ROOM}/Bob"),
            format!("presence:{ROOM}/Alice"),
            format!("message:{ROOM}"),
        ],
        "occupants, then self-presence, then subject (XEP-0045 §7.2.3, §7.2.16)"
    );
    let me = s.expect("self-presence", |e| {
        is_presence_to(e, "alice@example.org/phone") && statuses(e).contains(&110)
    });
    assert_eq!(statuses(&me), vec![110, 100, 170]);
    let it = item(&me);
    assert_eq!(it.attr("affiliation"), Some("owner"));
    assert_eq!(it.attr("role"), Some("moderator"));
    assert!(me
        .get_child("occupant-id", "urn:xmpp:occupant-id:0")
        .is_some());
    let subject = s.expect("subject", |e| {
        e.name() == "message" && e.attr("to") == Some("alice@example.org/phone")
    });
    assert_eq!(
        subject.get_child("subject", NS).map(|e| e.text()),
        Some("Welcome".into())
    );
    // Bob is told Alice arrived, with her real JID (non-anonymous room).
    let seen = s.expect("Alice's presence to Bob", |e| {
        is_presence_to(e, "bob@example.org/laptop")
    });
    assert_eq!(item(&seen).attr("jid"), Some("alice@example.org/phone"));
}

#[test]
fn a_join_is_answered_ahead_of_broadcasts_and_a_leave_cancels_what_is_queued() {
    let mut s = Server::new();
    s.join("bob@example.org/laptop", "Bob");
    s.lanes.clear();
    s.send(&format!("<presence from='alice@example.org/phone' to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    // Everything to the joiner is an answer (occupants, self-presence, subject: §7.2.3); only
    // Bob's copy of her arrival waits in broadcast order.
    assert_eq!(
        s.lanes,
        vec![
            "reply alice@example.org/phone",
            "broadcast bob@example.org/laptop",
            "reply alice@example.org/phone",
            "reply alice@example.org/phone",
        ]
    );
    s.lanes.clear();
    s.leave("alice@example.org/phone", "Alice");
    // Her departure comes first, so that copies queued for her before it are not sent after
    // the answer that tells her she left.
    assert_eq!(
        s.lanes,
        vec![
            format!("departed {ROOM} alice@example.org/phone"),
            "reply alice@example.org/phone".into(),
            "broadcast bob@example.org/laptop".into(),
        ]
    );
    // A presence update is not an answer: it keeps broadcast order for everyone.
    s.lanes.clear();
    s.send(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Bob'><show>away</show></presence>"
    ));
    assert_eq!(s.lanes, vec!["send bob@example.org/laptop"]);
}

#[test]
fn non_members_and_outcasts_are_refused() {
    let mut s = Server::new();
    s.send(&format!("<presence from='eve@example.org/x' to='{ROOM}/Eve'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let e = s.expect("error", |e| is_presence_to(e, "eve@example.org/x"));
    assert_eq!(condition(&e), "registration-required");
    s.send(&format!("<presence from='mallory@example.org/x' to='{ROOM}/M'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let e = s.expect("error", |e| is_presence_to(e, "mallory@example.org/x"));
    assert_eq!(condition(&e), "forbidden");
    s.send("<presence from='bob@example.org/x' to='nosuch@rooms.example.org/Bob'/>");
    let e = s.expect("error", |e| is_presence_to(e, "bob@example.org/x"));
    assert_eq!(condition(&e), "item-not-found");
    s.send(&format!("<presence from='bob@example.org/x' to='{ROOM}'/>"));
    let e = s.expect("error", |e| is_presence_to(e, "bob@example.org/x"));
    assert_eq!(condition(&e), "jid-malformed");
}

#[test]
fn nick_conflict_but_one_person_may_use_several_sessions() {
    let mut s = Server::new();
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!(
        "<presence from='carol@example.org/x' to='{ROOM}/Bob'/>"
    ));
    let e = s.expect("conflict", |e| is_presence_to(e, "carol@example.org/x"));
    assert_eq!(condition(&e), "conflict");
    s.join("bob@example.org/phone", "Bob");
    s.say("carol@example.org/x", "not joined");
    let e = s.expect("error", |e| e.attr("to") == Some("carol@example.org/x"));
    assert_eq!(condition(&e), "not-acceptable");
    s.join("carol@example.org/x", "Carol");
    s.say("carol@example.org/x", "hi bob");
    for session in [
        "bob@example.org/laptop",
        "bob@example.org/phone",
        "carol@example.org/x",
    ] {
        s.expect(session, |e| {
            e.attr("to") == Some(session) && body(e).as_deref() == Some("hi bob")
        });
    }
}

#[test]
fn history_on_join_follows_the_request() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    for i in 0..25 {
        s.say("alice@example.org/phone", &format!("m{i}"));
    }
    let t_last = s.now; // m24 was received at t_last, m23 a second earlier, …
    let hist = |s: &mut Server, who: &str, x: &str| -> Vec<String> {
        s.clear();
        s.send(&format!("<presence from='{who}' to='{ROOM}/{}'><x xmlns='http://jabber.org/protocol/muc'>{x}</x></presence>", who.split('@').next().unwrap_or("x")));
        let got = bodies_to(s, who);
        s.send(&format!(
            "<presence from='{who}' to='{ROOM}/x' type='unavailable'/>"
        ));
        got
    };
    let default = hist(&mut s, "bob@example.org/a", "");
    assert_eq!(default.len(), 20, "default history is 20");
    assert_eq!(default.first().map(String::as_str), Some("m5"));
    assert_eq!(
        hist(&mut s, "bob@example.org/a", "<history maxstanzas='3'/>"),
        vec!["m22", "m23", "m24"]
    );
    assert!(hist(&mut s, "bob@example.org/a", "<history maxstanzas='0'/>").is_empty());
    assert!(hist(&mut s, "bob@example.org/a", "<history maxchars='0'/>").is_empty());
    // Messages were received one per second; the join is handled one second after s.now.
    let secs = (s.now + Duration::seconds(1) - t_last).num_seconds() + 2;
    let recent = hist(
        &mut s,
        "bob@example.org/a",
        &format!("<history seconds='{secs}'/>"),
    );
    assert_eq!(recent, vec!["m22", "m23", "m24"]);
    let since = (t_last - Duration::seconds(1)).to_rfc3339();
    let got = hist(
        &mut s,
        "bob@example.org/a",
        &format!("<history since='{since}'/>"),
    );
    assert_eq!(got, vec!["m23", "m24"]);
    // A history message carries a delay from the room.
    s.clear();
    s.send(&format!("<presence from='carol@example.org/a' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='1'/></x></presence>"));
    let m = s.expect("history", |e| body(e).is_some());
    let delay = m.get_child("delay", "urn:xmpp:delay").expect("delay");
    assert_eq!(delay.attr("from"), Some(ROOM));
}

/// A post from the tracker's bot, as the bridge makes one for an event.
fn bot_post(body: &str) -> Post {
    Post {
        room: "team".into(),
        nick: "Forge".into(),
        body: body.into(),
        payloads: vec![],
        thread: None,
        origin: None,
        completes_inbox: None,
    }
}

/// The bodies `to` was sent, in order.
fn bodies_to(s: &Server, to: &str) -> Vec<String> {
    s.out
        .iter()
        .filter(|e| e.attr("to") == Some(to))
        .filter_map(body)
        .collect()
}

#[test]
fn after_a_restart_a_room_reads_its_history_when_first_used() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    for i in 0..25 {
        s.say("alice@example.org/phone", &format!("m{i}"));
    }
    s.restart();
    assert!(s.loads.is_empty(), "nothing is read at start");
    // An event posted before anyone is back is archived and joins the history read later.
    let now = s.now;
    let e = s.svc.post(bot_post("event"), now).expect("room exists");
    s.perform(vec![e]);
    // The first join asks for the room's history and waits for it; so does the next one.
    s.send(&format!("<presence from='bob@example.org/a' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    s.send(&format!("<presence from='carol@example.org/a' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    assert_eq!(s.loads, vec!["team".to_owned()], "one read for the room");
    s.none("an answer before the history is read", |_| true);
    s.finish_loads();
    for who in ["bob@example.org/a", "carol@example.org/a"] {
        let got = bodies_to(&s, who);
        assert_eq!(got.len(), 20, "default history for {who}: {got:?}");
        assert_eq!(got.first().map(String::as_str), Some("m6"));
        assert_eq!(got.last().map(String::as_str), Some("event"));
    }
    // History read from the store carries the room's stanza-id, as the live message did.
    let event = s.expect("the event as history", |e| {
        e.attr("to") == Some("bob@example.org/a") && body(e).as_deref() == Some("event")
    });
    let sid = event
        .get_child("stanza-id", "urn:xmpp:sid:0")
        .expect("a stanza-id");
    assert_eq!(sid.attr("by"), Some(ROOM));
    assert!(sid.attr("id").is_some_and(|i| !i.is_empty()));
    // Handled in arrival order: Bob was present when Carol joined.
    s.expect("Bob is told Carol joined", |e| {
        is_presence_to(e, "bob@example.org/a") && e.attr("from") == Some(&*format!("{ROOM}/Carol"))
    });
    // Later joins do not read again.
    s.send(&format!("<presence from='alice@example.org/x' to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    assert!(s.loads.is_empty());
    assert_eq!(bodies_to(&s, "alice@example.org/x").len(), 20);
}

#[test]
fn a_commit_reported_after_the_history_read_is_not_sent_twice() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.say("alice@example.org/phone", "before");
    s.restart();
    // The event is committed, but the store has not reported it yet when Bob's join reads the
    // history (the store thread and the reader run side by side).
    let now = s.now;
    let Some(Effect::Archive(m)) = s.svc.post(bot_post("event"), now) else {
        panic!("an archive effect")
    };
    s.store.append(std::slice::from_ref(&m)).expect("append");
    s.send(&format!("<presence from='bob@example.org/a' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    s.finish_loads();
    assert_eq!(bodies_to(&s, "bob@example.org/a"), vec!["before", "event"]);
    s.clear();
    let late = s.svc.archived(m);
    s.perform(late);
    s.none("the event again", |e| body(e).is_some());
    s.send(&format!("<presence from='carol@example.org/a' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    assert_eq!(
        bodies_to(&s, "carol@example.org/a"),
        vec!["before", "event"]
    );
}

#[test]
fn only_a_members_join_makes_a_room_read_its_history() {
    let mut s = Server::new();
    s.restart();
    // A stranger's join, message and archive query: answered at once, nothing read.
    s.send(&format!("<presence from='eve@evil.example/x' to='{ROOM}/Eve'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let refused = s.expect("the stranger is refused", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    });
    assert_eq!(condition(&refused), "registration-required");
    s.send(&format!(
        "<message from='eve@evil.example/x' to='{ROOM}' type='groupchat' id='e1'><body>hi</body></message>"
    ));
    s.expect("the stranger's message is refused", |e| {
        e.attr("type") == Some("error") && e.attr("id") == Some("e1")
    });
    assert!(s.loads.is_empty(), "no history read for a stranger");
    // A member's join starts the read.
    s.send(&format!("<presence from='bob@example.org/a' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    assert_eq!(s.loads, vec!["team".to_owned()]);
}

#[test]
fn stanzas_waiting_for_a_room_history_are_bounded() {
    let mut s = Server::new();
    s.restart();
    // The tests' service keeps 4 stanzas a room while its history is read (muc.waiting_per_room).
    for i in 0..4 {
        s.send(&format!("<presence from='bob@example.org/r{i}' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    }
    s.none("an answer while waiting", |_| true);
    s.send(&format!(
        "<message from='bob@example.org/r0' to='{ROOM}' type='groupchat' id='late'><body>hi</body></message>"
    ));
    let err = s.expect("the fifth is refused for now", |e| {
        e.attr("type") == Some("error") && e.attr("id") == Some("late")
    });
    assert_eq!(condition(&err), "resource-constraint");
    assert_eq!(
        err.get_child("error", NS).and_then(|e| e.attr("type")),
        Some("wait")
    );
    // Stanzas to the service itself and to other rooms do not wait.
    let disco = s.iq(
        "bob@example.org/r0",
        "d1",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        "rooms.example.org",
        "get",
    );
    assert_eq!(disco.attr("type"), Some("result"));
    // Once read, the four that waited are handled: four sessions of Bob, each with its self-presence.
    s.finish_loads();
    for i in 0..4 {
        let to = format!("bob@example.org/r{i}");
        s.expect("self-presence", |e| {
            is_presence_to(e, &to) && statuses(e).contains(&110)
        });
    }
}

// ---------------------------------------------------------------- presence changes

#[test]
fn leave_nick_change_and_presence_update_are_broadcast() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Bob'><show>away</show></presence>"
    ));
    let upd = s.expect("update", |e| is_presence_to(e, "alice@example.org/phone"));
    assert_eq!(
        upd.get_child("show", NS).map(|e| e.text()),
        Some("away".into())
    );
    s.clear();
    s.send(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Robert'/>"
    ));
    let gone = s.expect("303", |e| {
        is_presence_to(e, "alice@example.org/phone") && e.attr("type") == Some("unavailable")
    });
    assert_eq!(statuses(&gone), vec![303]);
    assert_eq!(item(&gone).attr("nick"), Some("Robert"));
    let own = s.expect("own 303", |e| {
        is_presence_to(e, "bob@example.org/laptop") && e.attr("type") == Some("unavailable")
    });
    assert_eq!(statuses(&own), vec![110, 303]);
    s.expect("new nick", |e| {
        is_presence_to(e, "alice@example.org/phone")
            && e.attr("from") == Some(&format!("{ROOM}/Robert"))
    });
    s.clear();
    s.leave("bob@example.org/laptop", "Robert");
    let left = s.expect("leave", |e| is_presence_to(e, "alice@example.org/phone"));
    assert_eq!(left.attr("type"), Some("unavailable"));
    assert_eq!(
        item(&left).attr("role"),
        Some("none"),
        "role='none' must be written"
    );
    let own = s.expect("own leave", |e| is_presence_to(e, "bob@example.org/laptop"));
    assert!(statuses(&own).contains(&110));
}

/// A room keeps its list of recipients between messages (rebuilt only when who is in it changes):
/// each message still reaches exactly the sessions present when it is sent, through joins, second
/// sessions, a nick change, a leave and a removal, with no tick in between to drop the list.
#[test]
fn each_message_reaches_exactly_who_is_in_the_room_when_it_is_sent() {
    let mut s = Server::new();
    let (alice, bob, phone, carol) = (
        "alice@example.org/phone",
        "bob@example.org/laptop",
        "bob@example.org/phone",
        "carol@example.org/x",
    );
    // Who got `text` (sessions in JID order); what was sent so far is cleared.
    let said = |s: &mut Server, from: &str, text: &str| -> Vec<String> {
        s.clear();
        s.say(from, text);
        let mut to: Vec<String> = s
            .out
            .iter()
            .filter(|e| body(e).as_deref() == Some(text))
            .filter_map(|e| e.attr("to").map(str::to_owned))
            .collect();
        to.sort();
        s.clear();
        to
    };
    s.join(alice, "Alice");
    assert_eq!(said(&mut s, alice, "m1"), [alice]);
    s.join(bob, "Bob");
    assert_eq!(said(&mut s, alice, "m2"), [alice, bob]);
    s.join(phone, "Bob");
    assert_eq!(said(&mut s, bob, "m3"), [alice, bob, phone]);
    s.join(carol, "Carol");
    s.send(&format!("<presence from='{carol}' to='{ROOM}/Caroline'/>"));
    assert_eq!(said(&mut s, alice, "m4"), [alice, bob, phone, carol]);
    s.leave(phone, "Bob");
    assert_eq!(said(&mut s, carol, "m5"), [alice, bob, carol]);
    s.iq(
        alice,
        "rm",
        "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='none' jid='carol@example.org'/></query>",
        ROOM,
        "set",
    );
    assert_eq!(said(&mut s, alice, "m6"), [alice, bob]);
    s.leave(bob, "Bob");
    assert_eq!(said(&mut s, alice, "m7"), [alice]);
}

/// The rate limits' buckets go once their owners have been quiet long enough for them to refill,
/// at the service's tick, even when nobody sends anything any more.
#[test]
fn rate_buckets_of_people_gone_quiet_are_forgotten_at_a_tick() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.say("bob@example.org/laptop", "hello");
    assert!(s.svc.rate_buckets() >= 3, "joins and a message");
    s.tick();
    assert!(s.svc.rate_buckets() >= 3, "a second later they are kept");
    s.now += Duration::seconds(120);
    s.tick();
    assert_eq!(s.svc.rate_buckets(), 0);
}

/// Occupants' presences are serialised once per burst of joins and reused for later joiners;
/// whatever changed in between (presence, nick, role) is what a later joiner sees.
#[test]
fn a_later_joiner_sees_each_occupant_as_it_is_now() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.join("carol@example.org/x", "Carol");
    s.send(&format!(
        "<presence from='alice@example.org/phone' to='{ROOM}/Alice'><show>away</show></presence>"
    ));
    s.send(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Robert'/>"
    ));
    s.iq(
        "alice@example.org/phone",
        "a",
        "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='admin' jid='carol@example.org'/></query>",
        ROOM,
        "set",
    );
    s.clear();
    s.send(&format!("<presence from='adam@example.org/x' to='{ROOM}/Adam'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let from = |nick: &str| {
        let nick = format!("{ROOM}/{nick}");
        move |e: &Element| is_presence_to(e, "adam@example.org/x") && e.attr("from") == Some(&nick)
    };
    let alice = s.expect("Alice", from("Alice"));
    assert_eq!(
        alice.get_child("show", NS).map(|e| e.text()),
        Some("away".into())
    );
    s.expect("Robert", from("Robert"));
    s.none("the old nick", from("Bob"));
    let carol = s.expect("Carol", from("Carol"));
    assert_eq!(item(&carol).attr("role"), Some("moderator"));
    assert_eq!(item(&carol).attr("affiliation"), Some("admin"));
    assert_eq!(item(&carol).attr("jid"), Some("carol@example.org/x"));
}

#[test]
fn a_bounce_from_an_occupant_removes_the_ghost() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!("<message from='bob@example.org/laptop' to='{ROOM}/Alice' type='error'><error type='cancel'><recipient-unavailable xmlns='{STANZAS}'/></error></message>"));
    let left = s.expect("ghost leaves", |e| {
        is_presence_to(e, "alice@example.org/phone")
    });
    assert_eq!(left.attr("type"), Some("unavailable"));
}

#[test]
fn semi_anonymous_rooms_show_jids_to_moderators_only() {
    let mut s = Server::with_room(true);
    s.join("bob@example.org/laptop", "Bob");
    s.join("alice@example.org/phone", "Alice");
    s.send(&format!(
        "<presence from='carol@example.org/x' to='{ROOM}/Carol'/>"
    ));
    let to_bob = s.expect("to bob", |e| is_presence_to(e, "bob@example.org/laptop"));
    assert_eq!(item(&to_bob).attr("jid"), None);
    let to_alice = s.expect("to alice", |e| is_presence_to(e, "alice@example.org/phone"));
    assert_eq!(item(&to_alice).attr("jid"), Some("carol@example.org/x"));
}

#[test]
fn bot_nicks_are_reserved_for_joins_and_nick_changes() {
    let mut s = Server::new();
    for nick in ["Forge", "forge", " FORGE"] {
        s.send(&format!(
            "<presence from='bob@example.org/laptop' to='{ROOM}/{nick}' id='j'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ));
        let err = s.expect("conflict", |e| is_presence_to(e, "bob@example.org/laptop"));
        assert_eq!(err.attr("type"), Some("error"));
        assert!(
            String::from(&err).contains("<conflict"),
            "{}",
            String::from(&err)
        );
        assert!(String::from(&err).contains("reserved for the tracker"));
        s.clear();
    }
    // Joined under another nick, renaming to the bot's is refused too; the occupant keeps their nick.
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Forge'/>"
    ));
    let err = s.expect("conflict", |e| is_presence_to(e, "bob@example.org/laptop"));
    assert_eq!(err.attr("type"), Some("error"));
    s.send(&format!(
        "<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='b1'><body>still Bob</body></message>"
    ));
    let m = s.expect("reflection", |e| body(e).as_deref() == Some("still Bob"));
    assert_eq!(m.attr("from"), Some(&*format!("{ROOM}/Bob")));
}

#[test]
fn event_payloads_from_occupants_are_stripped() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!(
        "<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='f1'><body>[acme/web] alice closed #42</body>\
         <thread>forge:acme/web#42</thread>\
         <json xmlns='urn:xmpp:json:0'>{{\"type\":\"Update\",\"caseroom:case\":\"acme/web#42\"}}</json></message>"
    ));
    let m = s.expect("reflection", |e| {
        e.attr("to") == Some("alice@example.org/phone") && body(e).is_some()
    });
    assert!(
        !m.children().any(|c| c.is("json", "urn:xmpp:json:0")),
        "{}",
        String::from(&m)
    );
    // The thread stays: people reply in a case's thread on purpose.
    assert!(m.children().any(|c| c.name() == "thread"));
    // Nor is it archived with the payload.
    let stored = s.store.recent("team", 1).expect("recent");
    assert!(!stored[0]
        .message
        .payloads
        .iter()
        .any(|c| c.is("json", "urn:xmpp:json:0")));
}

#[test]
fn after_a_link_loss_a_rejoin_from_the_same_session_is_a_join() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    let effects = s.svc.link_lost();
    s.perform(effects);
    // Everyone is told the room went away (332) …
    for to in ["alice@example.org/phone", "bob@example.org/laptop"] {
        let p = s.expect("unavailable", |e| {
            is_presence_to(e, to) && statuses(e).contains(&332) && statuses(e).contains(&110)
        });
        assert_eq!(p.attr("type"), Some("unavailable"));
    }
    s.clear();
    // … and a presence from the very same full JID is a join again: self-presence, history, subject.
    s.send(&format!(
        "<presence from='alice@example.org/phone' to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ));
    s.expect("self-presence", |e| {
        is_presence_to(e, "alice@example.org/phone") && statuses(e).contains(&110)
    });
    s.expect("subject", |e| {
        e.name() == "message" && e.get_child("subject", NS).is_some()
    });
    // Bob is not listed as present any more.
    s.none("a stale occupant", |e| {
        e.attr("from") == Some(&*format!("{ROOM}/Bob"))
    });
}

#[test]
fn a_flooding_member_is_slowed_down_and_others_are_not() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    // The burst (10) goes through at once; the eleventh message in the same second does not.
    for i in 0..10 {
        s.send_at_same_time(&format!(
            "<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='f{i}'><body>flood {i}</body></message>"
        ));
    }
    s.send_at_same_time(&format!(
        "<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='f10'><body>flood 10</body></message>"
    ));
    let err = s.expect("policy-violation", |e| {
        e.attr("id") == Some("f10") && e.attr("type") == Some("error")
    });
    assert!(String::from(&err).contains("policy-violation"));
    assert!(String::from(&err).contains("at most 60 a minute"));
    s.none("the refused message", |e| {
        body(e).as_deref() == Some("flood 10")
    });
    // Alice is not affected.
    s.send_at_same_time(&format!(
        "<message from='alice@example.org/phone' to='{ROOM}' type='groupchat' id='a1'><body>still here</body></message>"
    ));
    s.expect("alice's message", |e| {
        body(e).as_deref() == Some("still here")
    });
    // A second later Bob may speak again.
    s.send(&format!(
        "<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='f11'><body>calm now</body></message>"
    ));
    s.expect("bob again", |e| body(e).as_deref() == Some("calm now"));
}

/// A client flooding presence changes costs the room at most one presence a second after its
/// burst: updates beyond it are kept, and the latest is announced when a token is back; a
/// nickname change beyond it is refused with a reason.
#[test]
fn a_presence_flood_is_held_back_and_the_latest_update_arrives() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    let update = |n: usize| {
        format!("<presence from='bob@example.org/laptop' to='{ROOM}/Bob'><status>s{n}</status></presence>")
    };
    // Bob's statuses in what Alice was sent (taken out of the outbox).
    let status_to_alice = |out: &mut common::Outbox| {
        let (to_alice, rest): (Vec<Element>, Vec<Element>) = out
            .drain(..)
            .partition(|e| is_presence_to(e, "alice@example.org/phone"));
        out.extend(rest);
        to_alice
            .iter()
            .filter_map(|e| e.get_child("status", NS).map(|st| st.text()))
            .collect::<Vec<_>>()
    };
    for n in 0..50 {
        s.send_at_same_time(&update(n));
    }
    // The burst (10) is announced at once; the other 40 are not.
    let seen = status_to_alice(&mut s.out);
    assert_eq!(seen, (0..10).map(|n| format!("s{n}")).collect::<Vec<_>>());
    // A nickname change now is refused, with a reason.
    s.send_at_same_time(&format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Robert'/>"
    ));
    let err = s.expect("policy-violation", |e| {
        is_presence_to(e, "bob@example.org/laptop") && e.attr("type") == Some("error")
    });
    assert_eq!(condition(&err), "policy-violation");
    assert!(String::from(&err).contains("change your nickname again in"));
    // A newcomer already sees the latest status…
    s.clear();
    s.join("carol@example.org/x", "Carol");
    // …and at the next tick everyone is told it, once.
    s.clear();
    s.tick();
    assert_eq!(status_to_alice(&mut s.out), vec!["s49".to_string()]);
    s.tick();
    assert!(status_to_alice(&mut s.out).is_empty(), "announced once");
    // Another person is not slowed down.
    s.send(&format!(
        "<presence from='alice@example.org/phone' to='{ROOM}/Alice'><show>away</show></presence>"
    ));
    s.expect("Alice's update reaches Bob", |e| {
        is_presence_to(e, "bob@example.org/laptop")
            && e.attr("from") == Some(&format!("{ROOM}/Alice"))
    });
}

#[test]
fn a_join_and_leave_loop_is_slowed_down_and_a_leave_always_works() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    let join = format!(
        "<presence from='bob@example.org/laptop' to='{ROOM}/Bob' id='j'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
    );
    let leave =
        format!("<presence from='bob@example.org/laptop' to='{ROOM}/Bob' type='unavailable'/>");
    // The burst (20 joins of this room) goes through in the same second, each leave too.
    for _ in 0..20 {
        s.send_at_same_time(&join);
        s.expect("Bob's self-presence", |e| {
            is_presence_to(e, "bob@example.org/laptop") && statuses(e).contains(&110)
        });
        s.send_at_same_time(&leave);
        s.expect("Bob's leave", |e| {
            is_presence_to(e, "bob@example.org/laptop") && e.attr("type") == Some("unavailable")
        });
        s.clear();
    }
    s.send_at_same_time(&join);
    let err = s.expect("policy-violation", |e| {
        is_presence_to(e, "bob@example.org/laptop") && e.attr("type") == Some("error")
    });
    assert_eq!(condition(&err), "policy-violation");
    assert!(
        String::from(&err).contains("at most 60 a minute"),
        "{}",
        String::from(&err)
    );
    s.none("Bob's arrival told to Alice", |e| {
        is_presence_to(e, "alice@example.org/phone")
    });
    // Another person is not affected, and an occupant's presence update is not a join.
    s.send_at_same_time(&format!(
        "<presence from='carol@example.org/desk' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ));
    s.expect("Carol's self-presence", |e| {
        is_presence_to(e, "carol@example.org/desk") && statuses(e).contains(&110)
    });
    s.send_at_same_time(&format!(
        "<presence from='alice@example.org/phone' to='{ROOM}/Alice'><show>away</show></presence>"
    ));
    s.expect("Alice's update reflected", |e| {
        is_presence_to(e, "alice@example.org/phone") && e.attr("type").is_none()
    });
    // A second later (one token a second) Bob may join again.
    s.clear();
    s.send(&join);
    s.expect("Bob's self-presence", |e| {
        is_presence_to(e, "bob@example.org/laptop") && statuses(e).contains(&110)
    });
}

// ---------------------------------------------------------------- messages

#[test]
fn groupchat_is_archived_then_reflected_with_ids_forged_ones_stripped() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!(
        "<message from='alice@example.org/phone' to='{ROOM}' type='groupchat' id='x1'><body>hello</body>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='forged'/><occupant-id xmlns='urn:xmpp:occupant-id:0' id='forged'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='other.example' id='kept'/></message>"
    ));
    let mut ids = Vec::new();
    for to in ["alice@example.org/phone", "bob@example.org/laptop"] {
        let m = s.expect(to, |e| {
            e.attr("to") == Some(to) && body(e).as_deref() == Some("hello")
        });
        assert_eq!(m.attr("from"), Some(&*format!("{ROOM}/Alice")));
        assert_eq!(m.attr("id"), Some("x1"));
        let ours: Vec<&Element> = m
            .children()
            .filter(|c| c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("by") == Some(ROOM))
            .collect();
        assert_eq!(ours.len(), 1);
        assert_ne!(ours[0].attr("id"), Some("forged"));
        ids.push(ours[0].attr("id").unwrap_or_default().to_owned());
        assert!(m
            .children()
            .any(|c| c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("id") == Some("kept")));
        let oids: Vec<&Element> = m
            .children()
            .filter(|c| c.is("occupant-id", "urn:xmpp:occupant-id:0"))
            .collect();
        assert_eq!(oids.len(), 1);
        assert_ne!(oids[0].attr("id"), Some("forged"));
    }
    assert_eq!(ids[0], ids[1]);
    // The archive has it under the same id.
    let (bodies, fin) = mam_query(&mut s, "", "");
    assert_eq!(bodies, vec!["hello"]);
    assert_eq!(rsm_text(&fin, "first"), Some(ids[0].clone()));
}

#[test]
fn private_messages_are_delivered_not_archived() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!("<message from='bob@example.org/laptop' to='{ROOM}/Alice' type='chat' id='p'><body>psst</body></message>"));
    let pm = s.expect("pm", |e| e.attr("to") == Some("alice@example.org/phone"));
    s.none("a copy of the PM to anyone else", |e| {
        body(e).as_deref() == Some("psst")
    });
    assert_eq!(pm.attr("from"), Some(&*format!("{ROOM}/Bob")));
    assert!(pm.get_child("x", MUC_USER).is_some());
    s.send(&format!("<message from='bob@example.org/laptop' to='{ROOM}/Nobody' type='chat' id='p2'><body>?</body></message>"));
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("p2"))),
        "item-not-found"
    );
    s.send(&format!("<message from='bob@example.org/laptop' to='{ROOM}/Alice' type='groupchat' id='p3'><body>?</body></message>"));
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("p3"))),
        "bad-request"
    );
    let (bodies, _) = mam_query(&mut s, "", "");
    assert!(bodies.is_empty(), "PMs are not archived: {bodies:?}");
}

#[test]
fn subject_changes_by_moderators_only() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.send(&format!("<message from='bob@example.org/laptop' to='{ROOM}' type='groupchat' id='s1'><subject>mine</subject></message>"));
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("s1"))),
        "forbidden"
    );
    s.send(&format!("<message from='alice@example.org/phone' to='{ROOM}' type='groupchat' id='s2'><subject>Sprint 12</subject></message>"));
    let m = s.expect("subject", |e| {
        e.attr("to") == Some("bob@example.org/laptop")
    });
    assert_eq!(
        m.get_child("subject", NS).map(|e| e.text()),
        Some("Sprint 12".into())
    );
    assert_eq!(
        s.store.rooms().expect("rooms")[0].subject,
        "Sprint 12",
        "persisted"
    );
}

#[test]
fn messages_to_wrong_places_get_errors() {
    let mut s = Server::new();
    s.send("<message from='bob@example.org/x' to='nosuch@rooms.example.org' type='groupchat' id='a'><body>x</body></message>");
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("a"))),
        "item-not-found"
    );
    s.join("bob@example.org/x", "Bob");
    s.send(&format!(
        "<message from='bob@example.org/x' to='{ROOM}' type='chat' id='b'><body>x</body></message>"
    ));
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("b"))),
        "feature-not-implemented"
    );
    s.send(
        "<message from='bob@example.org/x' to='rooms.example.org' id='c'><body>x</body></message>",
    );
    assert_eq!(
        condition(&s.expect("error", |e| e.attr("id") == Some("c"))),
        "service-unavailable"
    );
}

// ---------------------------------------------------------------- IQs

#[test]
fn disco_of_service_and_room() {
    let mut s = Server::new();
    let info = s.iq(
        "bob@example.org/x",
        "d1",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        "rooms.example.org",
        "get",
    );
    let q = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .expect("query");
    let id = q
        .get_child("identity", "http://jabber.org/protocol/disco#info")
        .expect("identity");
    assert_eq!(
        (id.attr("category"), id.attr("type")),
        (Some("conference"), Some("text"))
    );
    let info = s.iq(
        "bob@example.org/x",
        "d2",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        ROOM,
        "get",
    );
    let feats: Vec<String> = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .expect("query")
        .children()
        .filter_map(|c| c.attr("var").map(str::to_owned))
        .collect();
    for f in [
        "http://jabber.org/protocol/muc",
        "muc_persistent",
        "muc_membersonly",
        "muc_nonanonymous",
        "urn:xmpp:mam:2",
        "urn:xmpp:mam:2#extended",
        "urn:xmpp:sid:0",
        "urn:xmpp:occupant-id:0",
    ] {
        assert!(
            feats.iter().any(|v| v == f),
            "room feature {f} missing: {feats:?}"
        );
    }
    assert!(String::from(&info).contains("muc#roominfo"));
    // Outsiders see neither the room in the list nor its info.
    let items = s.iq(
        "eve@example.org/x",
        "d3",
        "<query xmlns='http://jabber.org/protocol/disco#items'/>",
        "rooms.example.org",
        "get",
    );
    assert!(!String::from(&items).contains(ROOM));
    let items = s.iq(
        "bob@example.org/x",
        "d4",
        "<query xmlns='http://jabber.org/protocol/disco#items'/>",
        "rooms.example.org",
        "get",
    );
    assert!(String::from(&items).contains(ROOM));
    let hidden = s.iq(
        "eve@example.org/x",
        "d5",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        ROOM,
        "get",
    );
    assert_eq!(condition(&hidden), "item-not-found");
}

#[test]
fn every_iq_gets_an_answer() {
    let mut s = Server::new();
    let v = s.iq(
        "bob@example.org/x",
        "v",
        "<query xmlns='jabber:iq:version'/>",
        "rooms.example.org",
        "get",
    );
    assert!(String::from(&v).contains("caseroom"));
    let p = s.iq(
        "bob@example.org/x",
        "p",
        "<ping xmlns='urn:xmpp:ping'/>",
        "rooms.example.org",
        "get",
    );
    assert_eq!(p.attr("type"), Some("result"));
    let p = s.iq(
        "bob@example.org/x",
        "p2",
        "<ping xmlns='urn:xmpp:ping'/>",
        ROOM,
        "get",
    );
    assert_eq!(p.attr("type"), Some("result"));
    let u = s.iq(
        "bob@example.org/x",
        "u",
        "<query xmlns='urn:example:unknown'/>",
        "rooms.example.org",
        "get",
    );
    assert_eq!(condition(&u), "service-unavailable");
    let u = s.iq(
        "bob@example.org/x",
        "u2",
        "<query xmlns='urn:example:unknown'/>",
        ROOM,
        "set",
    );
    assert_eq!(condition(&u), "service-unavailable");
    let u = s.iq(
        "bob@example.org/x",
        "u3",
        "<vCard xmlns='vcard-temp'/>",
        &format!("{ROOM}/Alice"),
        "get",
    );
    assert_eq!(condition(&u), "service-unavailable");
    // XEP-0410 self-ping: not joined → not-acceptable; joined → result.
    let sp = s.iq(
        "bob@example.org/x",
        "sp",
        "<ping xmlns='urn:xmpp:ping'/>",
        &format!("{ROOM}/Bob"),
        "get",
    );
    assert_eq!(condition(&sp), "not-acceptable");
    s.join("bob@example.org/x", "Bob");
    let sp = s.iq(
        "bob@example.org/x",
        "sp2",
        "<ping xmlns='urn:xmpp:ping'/>",
        &format!("{ROOM}/Bob"),
        "get",
    );
    assert_eq!(sp.attr("type"), Some("result"));
    // Results and errors are never answered.
    s.clear();
    s.send("<iq from='example.org' to='rooms.example.org' id='k' type='result'/>");
    assert!(s.out.is_empty());
}

#[test]
fn admin_lists_and_changes() {
    let mut s = Server::new();
    let admin = "http://jabber.org/protocol/muc#admin";
    let list = s.iq(
        "adam@example.org/x",
        "l",
        &format!("<query xmlns='{admin}'><item affiliation='member'/></query>"),
        ROOM,
        "get",
    );
    let jids: Vec<&str> = list
        .get_child("query", admin)
        .expect("q")
        .children()
        .filter_map(|c| c.attr("jid"))
        .collect();
    assert_eq!(jids, vec!["bob@example.org", "carol@example.org"]);
    let denied = s.iq(
        "bob@example.org/x",
        "l2",
        &format!("<query xmlns='{admin}'><item affiliation='member'/></query>"),
        ROOM,
        "get",
    );
    assert_eq!(condition(&denied), "forbidden");
    let denied = s.iq(
        "adam@example.org/x",
        "l3",
        &format!(
            "<query xmlns='{admin}'><item affiliation='owner' jid='adam@example.org'/></query>"
        ),
        ROOM,
        "set",
    );
    assert_eq!(condition(&denied), "not-allowed");
    // Removing a present member kicks them with 321.
    s.join("carol@example.org/x", "Carol");
    s.join("bob@example.org/x", "Bob");
    let ok = s.iq(
        "adam@example.org/x",
        "r",
        &format!(
            "<query xmlns='{admin}'><item affiliation='none' jid='carol@example.org'/></query>"
        ),
        ROOM,
        "set",
    );
    assert_eq!(ok.attr("type"), Some("result"));
    let kicked = s.expect("321", |e| {
        is_presence_to(e, "bob@example.org/x") && e.attr("type") == Some("unavailable")
    });
    assert_eq!(statuses(&kicked), vec![321]);
    // Granting membership lets Eve in, persistently.
    s.iq(
        "alice@example.org/x",
        "g",
        &format!(
            "<query xmlns='{admin}'><item affiliation='member' jid='eve@example.org'/></query>"
        ),
        ROOM,
        "set",
    );
    s.join("eve@example.org/x", "Eve");
    let stored = &s.store.rooms().expect("rooms")[0];
    assert_eq!(
        stored.affiliations.get(&bare("eve@example.org")),
        Some(&Affiliation::Member)
    );
    assert_eq!(stored.affiliations.get(&bare("carol@example.org")), None);
    // The last owner stays.
    let c = s.iq(
        "alice@example.org/x",
        "o",
        &format!(
            "<query xmlns='{admin}'><item affiliation='member' jid='alice@example.org'/></query>"
        ),
        ROOM,
        "set",
    );
    assert_eq!(condition(&c), "conflict");
}

#[test]
fn owner_config_form_is_read_only() {
    let mut s = Server::new();
    let owner = "http://jabber.org/protocol/muc#owner";
    let form = s.iq(
        "alice@example.org/x",
        "c",
        &format!("<query xmlns='{owner}'/>"),
        ROOM,
        "get",
    );
    let text = String::from(&form);
    assert!(
        text.contains("muc#roomconfig_membersonly")
            && text.contains("muc#roomconfig_persistentroom"),
        "{text}"
    );
    let set = s.iq(
        "alice@example.org/x",
        "c2",
        &format!("<query xmlns='{owner}'><x xmlns='jabber:x:data' type='submit'/></query>"),
        ROOM,
        "set",
    );
    assert_eq!(condition(&set), "not-allowed");
    let denied = s.iq(
        "bob@example.org/x",
        "c3",
        &format!("<query xmlns='{owner}'/>"),
        ROOM,
        "get",
    );
    assert_eq!(condition(&denied), "forbidden");
}

// ---------------------------------------------------------------- MAM

fn fill(s: &mut Server, n: usize) -> Vec<String> {
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    for i in 0..n {
        let who = if i % 2 == 0 {
            "alice@example.org/phone"
        } else {
            "bob@example.org/laptop"
        };
        s.say(who, &format!("m{i}"));
    }
    s.clear();
    (0..n).map(|i| format!("m{i}")).collect()
}

#[test]
fn mam_is_for_members_only() {
    let mut s = Server::new();
    fill(&mut s, 3);
    let e = s.iq("eve@example.org/x", "m", &mam_iq("", ""), ROOM, "set");
    assert_eq!(condition(&e), "forbidden");
    let form = s.iq(
        "bob@example.org/x",
        "f",
        &format!("<query xmlns='{MAM}'/>"),
        ROOM,
        "get",
    );
    assert!(String::from(&form).contains("before-id"));
}

#[test]
fn mam_rsm_paging_both_ways_and_flip() {
    let mut s = Server::new();
    let all = fill(&mut s, 30);
    let (page, fin) = mam_query(&mut s, "", "<max>10</max>");
    assert_eq!(page, all[..10]);
    assert_ne!(fin.attr("complete"), Some("true"));
    assert_eq!(rsm_text(&fin, "count").as_deref(), Some("30"));
    let last = rsm_text(&fin, "last").expect("last");
    let (page, _) = mam_query(&mut s, "", &format!("<max>10</max><after>{last}</after>"));
    assert_eq!(page, all[10..20]);
    let (page, fin) = mam_query(&mut s, "", "<max>10</max><before/>");
    assert_eq!(page, all[20..]);
    let first = rsm_text(&fin, "first").expect("first");
    let (page, _) = mam_query(
        &mut s,
        "",
        &format!("<max>25</max><before>{first}</before>"),
    );
    assert_eq!(page, all[..20]);
    let (_, fin) = mam_query(
        &mut s,
        "",
        &format!("<max>25</max><before>{first}</before>"),
    );
    assert_eq!(fin.attr("complete"), Some("true"), "reached the start");
    s.clear();
    let fin = s.iq("alice@example.org/phone", "fl", &format!("<query xmlns='{MAM}'><set xmlns='{RSM}'><max>3</max><before/></set><flip-page/></query>"), ROOM, "set");
    assert_eq!(fin.attr("type"), Some("result"));
    let got: Vec<String> = s
        .out
        .drain(..)
        .filter_map(|m| {
            let inner = m
                .get_child("result", MAM)?
                .get_child("forwarded", "urn:xmpp:forward:0")?
                .get_child("message", "jabber:client")?;
            inner.get_child("body", "jabber:client").map(|b| b.text())
        })
        .collect();
    assert_eq!(got, vec!["m29", "m28", "m27"]);
}

#[test]
fn mam_form_filters() {
    let mut s = Server::new();
    let all = fill(&mut s, 10);
    let t_last = s.now;
    let (bobs, _) = mam_query(
        &mut s,
        &format!("<field var='with'><value>{ROOM}/Bob</value></field>"),
        "",
    );
    assert_eq!(bobs, vec!["m1", "m3", "m5", "m7", "m9"]);
    let (alices, _) = mam_query(
        &mut s,
        "<field var='with'><value>alice@example.org</value></field>",
        "",
    );
    assert_eq!(alices, vec!["m0", "m2", "m4", "m6", "m8"]);
    // ids of everything, for before-id/after-id/ids.
    let (_, fin) = mam_query(&mut s, "", "<max>3</max>");
    let third = rsm_text(&fin, "last").expect("last");
    let first = rsm_text(&fin, "first").expect("first");
    let (after, _) = mam_query(
        &mut s,
        &format!("<field var='after-id'><value>{third}</value></field>"),
        "",
    );
    assert_eq!(after, all[3..]);
    let (before, _) = mam_query(
        &mut s,
        &format!("<field var='before-id'><value>{third}</value></field>"),
        "",
    );
    assert_eq!(before, all[..2]);
    let (ids, _) = mam_query(
        &mut s,
        &format!("<field var='ids'><value>{first}</value><value>{third}</value></field>"),
        "",
    );
    assert_eq!(ids, vec!["m0", "m2"]);
    // Time window: the scenario clock steps one second per stanza.
    let start = (t_last - Duration::seconds(2)).to_rfc3339();
    let (recent, _) = mam_query(
        &mut s,
        &format!("<field var='start'><value>{start}</value></field>"),
        "",
    );
    assert_eq!(recent, all[7..]);
    let end = (t_last - Duration::seconds(8)).to_rfc3339();
    let (early, _) = mam_query(
        &mut s,
        &format!("<field var='end'><value>{end}</value></field>"),
        "",
    );
    assert_eq!(early, all[..2]);
    let (none, _) = mam_query(
        &mut s,
        "<field var='end'><value>2000-01-01T00:00:00Z</value></field>",
        "",
    );
    assert!(none.is_empty());
}

#[test]
fn mam_errors() {
    let mut s = Server::new();
    fill(&mut s, 3);
    for (form, rsm, cond) in [
        ("", "<after>nope</after>", "item-not-found"),
        (
            "<field var='after-id'><value>nope</value></field>",
            "",
            "item-not-found",
        ),
        (
            "<field var='ids'><value>nope</value></field>",
            "",
            "item-not-found",
        ),
        (
            "<field var='colour'><value>red</value></field>",
            "",
            "feature-not-implemented",
        ),
        (
            "<field var='start'><value>soon</value></field>",
            "",
            "bad-request",
        ),
    ] {
        let e = s.iq(
            "alice@example.org/phone",
            "e",
            &mam_iq(form, rsm),
            ROOM,
            "set",
        );
        assert_eq!(condition(&e), cond, "{form}{rsm}");
    }
}

#[test]
fn mam_page_size_is_capped_and_metadata_answers() {
    let mut s = Server::new();
    fill(&mut s, 120);
    let (page, fin) = mam_query(&mut s, "", "<max>1000</max>");
    assert_eq!(page.len(), 100);
    assert_ne!(fin.attr("complete"), Some("true"));
    let md = s.iq(
        "bob@example.org/x",
        "md",
        &format!("<metadata xmlns='{MAM}'/>"),
        ROOM,
        "get",
    );
    let md = md.get_child("metadata", MAM).expect("metadata");
    assert!(md.get_child("start", MAM).is_some() && md.get_child("end", MAM).is_some());
}

#[test]
fn shutdown_tells_everyone_332() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    let effects = s.svc.shutdown();
    s.perform(effects);
    for to in ["alice@example.org/phone", "bob@example.org/laptop"] {
        let p = s.expect("332", |e| {
            is_presence_to(e, to)
                && e.attr("type") == Some("unavailable")
                && statuses(e).contains(&110)
        });
        assert!(statuses(&p).contains(&332));
    }
}

#[test]
fn archive_and_rooms_survive_a_restart() {
    let mut s = Server::new();
    fill(&mut s, 5);
    s.iq("alice@example.org/x", "g", "<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='eve@example.org'/></query>", ROOM, "set");
    // A new core over the same store, as after a restart.
    let mut svc = Service::new(s.svc.config().clone(), 7);
    svc.set_last_seq(s.store.last_seq().expect("seq"));
    for r in s.store.rooms().expect("rooms") {
        let recent = s.store.recent(&r.name, 200).expect("recent");
        svc.upsert_room(r, recent);
    }
    s.svc = svc;
    s.join("eve@example.org/x", "Eve");
    s.join("alice@example.org/x", "Alice");
    let (bodies, _) = mam_query(&mut s, "", "");
    assert_eq!(bodies, vec!["m0", "m1", "m2", "m3", "m4"]);
    s.say("alice@example.org/x", "after");
    let (bodies, _) = mam_query(&mut s, "", "<max>1</max><before/>");
    assert_eq!(bodies, vec!["after"], "new ids sort after the old ones");
}

#[test]
fn a_person_can_mute_kinds_of_tracker_events_for_themselves() {
    use caseroom::webhook::{self, Headers, Normalized, TrackerKind};
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    let rule = caseroom::filter::parse_mute("ci succeeded").expect("spec");
    let effects = s
        .svc
        .set_mutes("team", &bare("bob@example.org"), vec![rule]);
    s.perform(effects);
    // A real GitHub workflow_run (success) as the bridge would post it.
    let payload = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/github/workflow_run.completed.json"
    ))
    .expect("fixture");
    let doc = webhook::parse_body(None, &payload).expect("json");
    let Normalized::Activity(a) = webhook::normalize(
        TrackerKind::Github,
        &Headers::from_pairs(&[("X-GitHub-Event", "workflow_run")]),
        &doc,
    )
    .expect("ok") else {
        panic!("an activity")
    };
    let post = |a: &caseroom::activity::Activity| {
        let r = caseroom::render::render("forge", a);
        Post {
            room: "team".into(),
            nick: "Forge".into(),
            body: r.body,
            payloads: vec![caseroom::xmpp::json::element_of_text(r.json)],
            thread: r.thread,
            origin: None,
            completes_inbox: None,
        }
    };
    let now = s.now;
    let e = s.svc.post(post(&a), now).expect("room exists");
    s.perform(vec![e]);
    s.expect("alice sees the CI success", |e| {
        e.attr("to") == Some("alice@example.org/phone")
            && body(e).is_some_and(|b| b.contains("succeeded"))
    });
    s.none("bob muted CI successes", |e| {
        e.attr("to") == Some("bob@example.org/laptop") && body(e).is_some()
    });
    let mut failed = (*a).clone();
    failed.verb = caseroom::activity::Verb::Failed;
    let e = s.svc.post(post(&failed), now).expect("room exists");
    s.perform(vec![e]);
    s.expect("bob still sees failures", |e| {
        e.attr("to") == Some("bob@example.org/laptop")
            && body(e).is_some_and(|b| b.contains("failed"))
    });
    // Kept in the store; everything stays in the archive.
    let stored = s.store.mutes().expect("mutes");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].2[0].verb.as_deref(), Some("succeeded"));
    let (bodies, _) = mam_query(&mut s, "", "");
    assert_eq!(bodies.len(), 2, "the archive keeps everything: {bodies:?}");
}

/// The archive id (stanza-id) the room gave a message, from its reflection in MAM.
fn archive_id_of(s: &mut Server, text: &str) -> String {
    s.send(&format!(
        "<iq from='bob@example.org/laptop' to='{ROOM}' id='find' type='set'>{}</iq>",
        mam_iq("", "<max>50</max>")
    ));
    let r = s.expect("the result", |e| {
        e.name() == "message" && String::from(e).contains(&format!(">{text}<"))
    });
    s.clear();
    r.get_child("result", MAM)
        .and_then(|r| r.attr("id"))
        .expect("result id")
        .to_owned()
}

#[test]
fn an_owner_retracts_a_message_for_everyone_and_mam_keeps_a_tombstone() {
    let mut s = Server::new();
    s.join("alice@example.org/phone", "Alice");
    s.join("bob@example.org/laptop", "Bob");
    s.say("bob@example.org/laptop", "my password is hunter2");
    s.say("bob@example.org/laptop", "oops");
    s.clear();
    let id = archive_id_of(&mut s, "my password is hunter2");
    let moderate = |id: &str| {
        format!(
            "<moderate xmlns='urn:xmpp:message-moderate:1' id='{id}'>\
             <retract xmlns='urn:xmpp:message-retract:1'/><reason>a secret</reason></moderate>"
        )
    };
    // A member may not (XEP-0425: only moderators).
    let refused = s.iq("bob@example.org/laptop", "m1", &moderate(&id), ROOM, "set");
    assert_eq!(condition(&refused), "forbidden");
    // An owner may: everyone is told, from the room itself.
    let done = s.iq("alice@example.org/phone", "m2", &moderate(&id), ROOM, "set");
    assert_eq!(done.attr("type"), Some("result"));
    for to in ["alice@example.org/phone", "bob@example.org/laptop"] {
        let note = s.expect("the retraction", |e| {
            e.name() == "message"
                && e.attr("to") == Some(to)
                && e.get_child("retract", "urn:xmpp:message-retract:1")
                    .is_some()
        });
        assert_eq!(note.attr("from"), Some(ROOM));
        let retract = note
            .get_child("retract", "urn:xmpp:message-retract:1")
            .expect("retract");
        assert_eq!(retract.attr("id"), Some(id.as_str()));
        let by = retract
            .get_child("moderated", "urn:xmpp:message-moderate:1")
            .expect("moderated");
        assert_eq!(by.attr("by"), Some(format!("{ROOM}/Alice").as_str()));
        assert_eq!(
            retract
                .get_child("reason", "urn:xmpp:message-moderate:1")
                .map(|r| r.text())
                .as_deref(),
            Some("a secret")
        );
    }
    // MAM serves a tombstone in its place: no body, who and why.
    s.send(&format!(
        "<iq from='carol@example.org/x' to='{ROOM}' id='q' type='set'><query xmlns='{MAM}'/></iq>"
    ));
    let stone = s.expect("the tombstone", |e| String::from(e).contains("retracted"));
    let text = String::from(&stone);
    // (The scenario's message ids are their texts; a real client's id is opaque and kept, as in
    // XEP-0425's example.)
    assert!(
        !text.contains("<body") && !text.contains(">my password is hunter2<"),
        "{text}"
    );
    assert!(
        text.contains("urn:xmpp:message-moderate:1") && text.contains("a secret"),
        "{text}"
    );
    let next = s.expect("the next message", |e| String::from(e).contains(">oops<"));
    assert!(next.get_child("result", MAM).is_some());
    // Join history shows the tombstone too.
    s.clear();
    s.send(&format!("<presence from='carol@example.org/x' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    // Join history holds the tombstone in its place.
    s.expect("the tombstone in join history", |e| {
        e.attr("to") == Some("carol@example.org/x")
            && e.get_child("retracted", "urn:xmpp:message-retract:1")
                .is_some()
    });
    s.none("the secret in join history", |e| {
        String::from(e).contains(">my password is hunter2<")
    });
    // An unknown id: item-not-found; no retract element: feature-not-implemented.
    let missing = s.iq(
        "alice@example.org/phone",
        "m3",
        &moderate("nope"),
        ROOM,
        "set",
    );
    assert_eq!(condition(&missing), "item-not-found");
    let other = s.iq(
        "alice@example.org/phone",
        "m4",
        &format!("<moderate xmlns='urn:xmpp:message-moderate:1' id='{id}'/>"),
        ROOM,
        "set",
    );
    assert_eq!(condition(&other), "feature-not-implemented");
}

/// Several instances on one archive (PostgreSQL): each assigns sequence numbers in its own slot, so
/// two posting in the same microsecond never collide, and each stays above what the archive held.
#[test]
fn instances_assign_sequence_numbers_in_their_own_slots() {
    let info = RoomInfo {
        name: "team".into(),
        title: "Team".into(),
        description: String::new(),
        anonymous: false,
        subject: String::new(),
        affiliations: BTreeMap::new(),
    };
    let now = Utc.timestamp_opt(1_700_000_000, 0).single().expect("time");
    let mut seqs = Vec::new();
    for slot in [0, 1] {
        let mut svc = Service::new(common::service_config(60, 10), 9 + slot);
        svc.set_instance(slot, 8);
        // The archive's newest message is far ahead of this clock (another instance's skewed one).
        svc.set_last_seq(now.timestamp_micros() as u64 * 8 + 5_000 * 8 + 3);
        svc.upsert_room(info.clone(), vec![]);
        let mut mine = Vec::new();
        for _ in 0..3 {
            let Some(Effect::Archive(m)) = svc.post(bot_post("x"), now) else {
                panic!("a post is archived")
            };
            mine.push(m.seq);
        }
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        assert!(mine.iter().all(|s| s % 8 == slot), "slot {slot}: {mine:?}");
        assert!(mine[0] > now.timestamp_micros() as u64 * 8 + 5_000 * 8 + 3);
        seqs.extend(mine);
    }
    let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seqs.len(),
        "no two instances share a number: {seqs:?}"
    );
}

/// Instance 0 of several, serving the room with Alice and Bob in it; who is in it, as it wrote
/// that to the store.
fn serving_alice_and_bob_as_one_of_several() -> (Server, Vec<caseroom::muc::room::SessionRow>) {
    let mut s = Server::new();
    s.svc.set_instance(0, 8);
    s.svc.set_takeover(true);
    s.join("alice@example.org/a", "Alice");
    s.join("bob@example.org/b", "Bob");
    let rows = s.sessions.clone();
    (s, rows)
}

/// Several instances, serving Alice and Bob: the bot posts "event", and the running instances change
/// (the room goes cold) before the commit comes back.
fn an_event_committed_as_its_room_goes_cold() -> (Server, Vec<caseroom::muc::room::SessionRow>) {
    let (mut s, rows) = serving_alice_and_bob_as_one_of_several();
    let now = s.now;
    let Some(Effect::Archive(m)) = s.svc.post(bot_post("event"), now) else {
        panic!("an archive effect")
    };
    s.store.append(std::slice::from_ref(&m)).expect("append");
    s.svc.go_cold();
    s.clear();
    let effects = s.svc.archived(m);
    s.perform(effects);
    (s, rows)
}

/// Several instances: the one serving a room keeps who is in it in the store; a graceful stop tells
/// nobody (another instance takes over); the instance taking the room over reads its occupants
/// with its history, and an occupant's message reaches the others, none of whom rejoined.
#[test]
fn with_several_instances_another_takes_a_room_over_with_its_occupants() {
    let (mut s, rows) = serving_alice_and_bob_as_one_of_several();
    assert_eq!(
        rows.iter().map(|r| r.nick.as_str()).collect::<Vec<_>>(),
        ["Alice", "Bob"]
    );
    assert!(
        s.svc.shutdown().is_empty(),
        "no 332: another instance takes over"
    );
    // Another instance (slot 1) over the same store: the room is cold there.
    s.restart();
    s.svc.set_instance(1, 8);
    s.svc.set_takeover(true);
    s.say("alice@example.org/a", "still-here");
    assert_eq!(s.loads, ["team"], "a member's message reads the room first");
    s.none("anything before the read", |_| true);
    s.svc.restore_sessions("team", rows);
    s.finish_loads();
    s.expect("bob receives it, without rejoining", |e| {
        e.attr("to") == Some("bob@example.org/b") && body(e).as_deref() == Some("still-here")
    });
    // The instances change again: the room forgets silently and reads itself again when used.
    s.clear();
    s.svc.go_cold();
    s.none("anything said on going cold", |_| true);
    assert!(s.svc.is_cold("team"));
}

/// Several instances: the running instances change while an event's commit is under way, so the
/// room has gone cold when the commit comes back. It reads who is in it, and they get the event
/// live, once (it used to reach nobody: MAM had it, the occupants did not see it).
#[test]
fn an_event_committed_while_its_room_goes_cold_still_reaches_the_occupants() {
    let (mut s, rows) = an_event_committed_as_its_room_goes_cold();
    assert_eq!(s.loads, ["team"], "the room reads who is in it");
    s.none("the event before the read", |e| body(e).is_some());
    s.svc.restore_sessions("team", rows);
    s.finish_loads();
    assert_eq!(bodies_to(&s, "bob@example.org/b"), vec!["event"]);
    assert_eq!(bodies_to(&s, "alice@example.org/a"), vec!["event"]);
}

/// Several instances: a cold room's read is under way (a commit came back after the room went
/// cold) when a member joins and another instance asks for the room. Nobody starts a second read,
/// and occupants read before the join cannot replace the room's own afterwards: the joiner stays
/// in (a second read used to restore the occupants without her, and she missed every message).
#[test]
fn a_cold_room_is_read_once_and_who_joins_meanwhile_stays_in_it() {
    let (mut s, rows) = an_event_committed_as_its_room_goes_cold();
    s.send(&format!(
        "<presence from='carol@example.org/c' to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ));
    assert!(
        s.svc.read_room("team").is_empty(),
        "another instance's ask waits for the read under way"
    );
    assert_eq!(s.loads, ["team"], "one read");
    s.svc.restore_sessions("team", rows.clone());
    s.finish_loads();
    s.expect("carol joins once the room is read", |e| {
        is_presence_to(e, "carol@example.org/c") && statuses(e).contains(&110)
    });
    // Occupants as the store held them before carol joined change nothing any more.
    s.svc.restore_sessions("team", rows);
    s.clear();
    s.say("alice@example.org/a", "welcome");
    s.expect("carol receives it", |e| {
        e.attr("to") == Some("carol@example.org/c") && body(e).as_deref() == Some("welcome")
    });
}
