//! The sans-IO MUC service (XEP-0045) with MAM (XEP-0313) query planning.
//!
//! Contract: [`Service::handle`] takes one inbound stanza and the current time and returns
//! [`Effect`]s; it never touches a socket, a clock, a database or a random source of its own.
//! The driver (`bridge`) performs the effects and reports completions back:
//! an [`Effect::Archive`] is written to the store and then passed to [`Service::archived`], which
//! produces the broadcast — so nothing is broadcast that was not archived (XEP-0313 §3: the archive id
//! is the XEP-0359 stanza-id). An [`Effect::Mam`] is run by the store and answered with
//! [`mam::results`].

pub mod admin;
pub mod disco;
pub mod limits;
pub mod mam;
pub mod moderation;
pub mod room;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use chrono::{DateTime, Utc};
use minidom::Element;
use xmpp_parsers::{
    iq::Iq,
    jid::{BareJid, FullJid, Jid},
    message::{Message, MessageType},
    muc::user::Affiliation,
    ns,
    presence::{Presence, Type as PresenceType},
    stanza::Stanza,
    stanza_error::DefinedCondition,
};

use crate::xmpp::outbound;
pub use room::{Occupant, Room, Sessions};

/// Static settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The component domain.
    pub domain: BareJid,
    /// Name shown in disco.
    pub name: String,
    /// Largest MAM page.
    pub mam_max_page: usize,
    /// History stanzas on join by default.
    pub default_history: usize,
    /// Secret salt for XEP-0421 occupant ids (kept in the store, stable across restarts).
    pub occupant_salt: String,
    /// Nicks that only the service posts under (the trackers' bot nicks), compared case-insensitively:
    /// nobody may join or rename themselves to one, so an event's sender cannot be imitated.
    pub reserved_nicks: Vec<String>,
    /// Messages with a body (groupchat or private) per person.
    pub message_rate: limits::Rate,
    /// MAM queries per person.
    pub query_rate: limits::Rate,
    /// Joins per person and room (a leave is never refused).
    pub join_rate: limits::Rate,
    /// Presence changes (updates and nick changes) per person and room.
    pub presence_rate: limits::Rate,
    /// Stanzas to one room kept while its history is read (`muc.waiting_per_room`).
    pub waiting_per_room: usize,
}

impl ServiceConfig {
    /// Is `nick` reserved for the service?
    pub fn is_reserved(&self, nick: &str) -> bool {
        let nick = nick.trim();
        self.reserved_nicks
            .iter()
            .any(|r| r.trim().eq_ignore_ascii_case(nick))
    }
}

/// A room's persistent description (from config, tracker sync or the store).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomInfo {
    /// Localpart of the room JID (lower case).
    pub name: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Semi-anonymous if true.
    pub anonymous: bool,
    /// Current subject.
    pub subject: String,
    /// Affiliations by bare JID.
    pub affiliations: BTreeMap<BareJid, Affiliation>,
}

/// A message as archived and broadcast (without `to`).
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedMessage {
    /// Archive order (monotonic).
    pub seq: u64,
    /// The XEP-0359 stanza-id / MAM archive id.
    pub id: String,
    /// Room localpart.
    pub room: String,
    /// When the room received it.
    pub ts: DateTime<Utc>,
    /// Sender's nick.
    pub nick: String,
    /// Sender's real bare JID.
    pub sender: BareJid,
    /// The message as broadcast, `from` = room/nick, no `to`.
    pub message: Message,
    /// Where it came from, when not from an occupant (`inbox:{id}:{room}`): archived at most once.
    pub origin: Option<String>,
    /// The webhook delivery this message completes: its inbox row is marked done in the same
    /// transaction (once every room of the delivery has its message, [`Completes`]).
    pub completes_inbox: Option<Completes>,
}

/// The webhook delivery a message completes. A delivery posted in several rooms by one instance
/// completes with its last room's message (`rooms` empty: the store thread commits in order).
/// With several instances each room's message is posted by the room's own instance, in no order
/// between them, so every one carries the delivery and all its rooms, and the message whose
/// transaction finds every room's message archived (by origin, [`inbox_origin`]) marks it done: an
/// instance dying before posting its room's message leaves the delivery pending, to be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completes {
    /// The inbox row.
    pub inbox: i64,
    /// Every room whose message it takes; empty: this message is enough.
    pub rooms: Vec<String>,
}

impl Completes {
    /// Done with this message.
    pub fn one(inbox: i64) -> Completes {
        Completes {
            inbox,
            rooms: Vec::new(),
        }
    }

    /// The origins of the messages it takes (none: this message is enough).
    pub fn origins(&self) -> Vec<String> {
        self.rooms
            .iter()
            .map(|r| inbox_origin(self.inbox, r))
            .collect()
    }
}

/// The origin of delivery `inbox`'s message in `room`: the archive keeps one message per origin.
pub fn inbox_origin(inbox: i64, room: &str) -> String {
    format!("inbox:{inbox}:{room}")
}

impl ArchivedMessage {
    /// Posted by the service itself (tracker events, command answers): its sender is a bot JID on
    /// the service's own domain, which no occupant can have.
    pub fn is_from_service(&self, service: &BareJid) -> bool {
        self.sender.domain() == service.domain()
    }
}

/// Changes the store must persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// Set (or with `None`, clear) an affiliation.
    Affiliation {
        /// Room localpart.
        room: String,
        /// Bare JID.
        jid: BareJid,
        /// New affiliation.
        affiliation: Affiliation,
    },
    /// New subject.
    Subject {
        /// Room localpart.
        room: String,
        /// The subject text.
        subject: String,
    },
    /// A room mirrored from a tracker: its description and exactly these affiliations.
    Room(RoomInfo),
    /// Several instances: who is in a room now (every joined session), so that another instance
    /// can take the room over.
    Occupants {
        /// Room localpart.
        room: String,
        /// Every joined session.
        rows: Vec<room::SessionRow>,
    },
    /// One person's filters in a room (empty: none).
    Mutes {
        /// Room localpart.
        room: String,
        /// The person.
        jid: BareJid,
        /// Their rules.
        rules: Vec<crate::config::FilterConfig>,
    },
}

/// A message the service posts into a room (see [`Service::post`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    /// Room localpart.
    pub room: String,
    /// Occupant nick it comes from (not joined).
    pub nick: String,
    /// Body text.
    pub body: String,
    /// Extra payloads.
    pub payloads: Vec<Element>,
    /// XEP-0201 thread id.
    pub thread: Option<String>,
    /// Origin for exactly-once archiving.
    pub origin: Option<String>,
    /// The delivery this post completes.
    pub completes_inbox: Option<Completes>,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Effect {
    /// Send a stanza on the link.
    Send(Stanza),
    /// Send one stanza to several sessions, identical but for `to` (the link serialises it once).
    Broadcast(Broadcast),
    /// Send a stanza that answers the session whose own presence caused it: on a join the
    /// occupants' presences, its self-presence, history and subject (§7.2.3), on a leave its
    /// unavailable self-presence. Emitted in protocol order like [`Effect::Send`]; the link may send
    /// answers ahead of broadcasts it has not written yet, so that under a burst a joiner is in the
    /// room as soon as its own answer is out (the others learn of it in broadcast order).
    Reply(Stanza),
    /// An [`Effect::Reply`] the core serialised already: an occupant's presence in a joiner's
    /// answer, the same bytes for every joiner with the same view (the link copies them).
    ReplyPrepared(Prepared),
    /// `session` left `room`: the room's messages and presences to it that the link has queued and
    /// not written yet are not sent (they would reach someone no longer in the room, and could
    /// otherwise arrive after the [`Effect::Reply`] that told it so).
    Departed {
        /// The room's bare JID.
        room: BareJid,
        /// The session that left.
        session: FullJid,
    },
    /// Append to the archive, then call [`Service::archived`].
    Archive(ArchivedMessage),
    /// Persist a change (write-behind, in order).
    Persist(Persist),
    /// Run an archive query, then answer with [`mam::results`].
    Mam(mam::MamRequest),
    /// Read the room's newest [`room::HISTORY_CACHE`] archived messages, then call
    /// [`Service::history_read`] (stanzas to the room wait until then).
    LoadHistory(String),
    /// Replace an archived message by its tombstone, then call [`Service::moderated`].
    Moderate(moderation::Moderation),
}

/// A stanza serialised once ([`crate::xmpp::wire::Template`]) and its copy's recipient.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The stanza without its `to`, shared by every copy.
    pub template: std::sync::Arc<crate::xmpp::wire::Template>,
    /// Who gets this copy.
    pub to: FullJid,
}

impl Prepared {
    /// The bytes of this copy as they go on the stream.
    pub fn bytes(&self) -> Vec<u8> {
        self.template.copy_for(self.to.as_str())
    }

    /// This copy parsed back into a stanza (for tests and diagnostics).
    pub fn stanza(&self) -> Result<Stanza, String> {
        let el = crate::xmpp::wire::parse(&self.bytes())?;
        Stanza::try_from(el).map_err(|e| e.to_string())
    }
}

/// One stanza for several recipients: a room message to its occupants.
#[derive(Debug)]
pub struct Broadcast {
    /// What every copy is.
    pub what: Shared,
    /// Who gets a copy (a room message: the room's shared list of everyone, most often).
    pub to: Arc<[FullJid]>,
}

/// The stanza of a [`Broadcast`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // moved once from the core to the link, never stored
pub enum Shared {
    /// A stanza for the link to serialise once; its `to` is ignored.
    Stanza(Stanza),
    /// A room message serialised already, from the message itself ([`Template::of_message`]):
    /// no copy of it and no element tree on its way to the link.
    ///
    /// [`Template::of_message`]: crate::xmpp::wire::Template::of_message
    Message {
        /// The message without `to`.
        template: Arc<crate::xmpp::wire::Template>,
        /// The room it comes from (the link drops copies to sessions that left it meanwhile).
        room: BareJid,
    },
}

impl Broadcast {
    /// Each recipient's copy as a stanza of its own (for tests and for shells that cannot copy
    /// serialised text). A serialised message that does not parse back is left out.
    pub fn copies(&self) -> impl Iterator<Item = Stanza> + '_ {
        self.to.iter().filter_map(|to| {
            let mut s = match &self.what {
                Shared::Message { template, .. } => {
                    let el = crate::xmpp::wire::parse(&template.copy_for(to.as_str())).ok()?;
                    return Stanza::try_from(el).ok();
                }
                Shared::Stanza(Stanza::Iq(i)) => Stanza::Iq(i.clone()),
                Shared::Stanza(Stanza::Message(m)) => Stanza::Message(m.clone()),
                Shared::Stanza(Stanza::Presence(p)) => Stanza::Presence(p.clone()),
            };
            let to = Some(Jid::from(to.clone()));
            match &mut s {
                Stanza::Iq(Iq::Get { to: t, .. })
                | Stanza::Iq(Iq::Set { to: t, .. })
                | Stanza::Iq(Iq::Result { to: t, .. })
                | Stanza::Iq(Iq::Error { to: t, .. }) => *t = to,
                Stanza::Message(m) => m.to = to,
                Stanza::Presence(p) => p.to = to,
            }
            Some(s)
        })
    }
}

/// The MUC service state.
pub struct Service {
    cfg: ServiceConfig,
    rooms: HashMap<String, Room>,
    last_seq: u64,
    /// This instance's slot among `slots` (see [`Service::set_instance`]).
    slot: u64,
    slots: u64,
    /// See [`Service::set_takeover`].
    takeover: bool,
    rng: u64,
    messages: limits::Limiter,
    queries: limits::Limiter,
    /// Joins by (room, person): a member looping leave and join costs everyone presences, and each
    /// join's answer goes ahead of the room's queued broadcasts.
    joins: limits::Limiter<(String, BareJid)>,
    /// Presence changes by (room, person): each costs a presence to every occupant.
    presences: limits::Limiter<(String, BareJid)>,
    /// Sessions whose latest presence update was kept but not announced yet (rate limit):
    /// announced by [`Service::tick`] when their owner has a token again.
    held: std::collections::BTreeSet<(String, FullJid)>,
    /// Stanzas to rooms whose history is being read, in arrival order, with their arrival time.
    waiting: HashMap<String, Vec<(Stanza, DateTime<Utc>)>>,
    /// Several instances: messages committed after their room went cold (the running instances
    /// changed while the commit was under way), to broadcast once the room has read who is in it.
    unsent: HashMap<String, Vec<ArchivedMessage>>,
    /// Rooms whose read ([`Effect::LoadHistory`]) is under way: one read per room at a time,
    /// whoever asks for it (a member's stanza, a commit to a cold room, another instance's ask).
    loading: std::collections::HashSet<String>,
}

impl Service {
    /// A service with no rooms. `seed` feeds the unpredictable part of stanza ids.
    pub fn new(cfg: ServiceConfig, seed: u64) -> Service {
        Service {
            messages: limits::Limiter::new(cfg.message_rate),
            queries: limits::Limiter::new(cfg.query_rate),
            joins: limits::Limiter::new(cfg.join_rate),
            presences: limits::Limiter::new(cfg.presence_rate),
            held: Default::default(),
            cfg,
            rooms: HashMap::new(),
            last_seq: 0,
            slot: 0,
            slots: 1,
            takeover: false,
            rng: seed | 1,
            waiting: HashMap::new(),
            unsent: HashMap::new(),
            loading: Default::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    /// Several instances share the archive: this one is `slot` of `slots`, the low part of every
    /// sequence number it assigns (`seq = time × slots + slot`), so none assigns another's.
    pub fn set_instance(&mut self, slot: u64, slots: u64) {
        self.slots = slots.max(1);
        self.slot = slot % self.slots;
    }

    /// The last archive sequence number in use (from the store at start).
    pub fn set_last_seq(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// Add or update a room; occupants of an existing room stay.
    pub fn upsert_room(&mut self, info: RoomInfo, recent: Vec<ArchivedMessage>) {
        let jid = self.room_jid(&info.name);
        match self.rooms.get_mut(&info.name) {
            Some(room) => room.info = info,
            None => {
                let mut room = Room::new(info, jid);
                for m in recent {
                    room.remember(m);
                }
                self.rooms.insert(room.info.name.clone(), room);
            }
        }
    }

    /// A room from the store at start: like [`Service::upsert_room`], but its history is read
    /// from the store only when the room is first used ([`Effect::LoadHistory`]), so that start-up
    /// costs the same with a million archived messages as with none.
    pub fn restore_room(&mut self, info: RoomInfo) {
        if !self.rooms.contains_key(&info.name) {
            let jid = self.room_jid(&info.name);
            let mut room = Room::new(info, jid);
            room.unload_history();
            self.rooms.insert(room.info.name.clone(), room);
        }
    }

    /// The store replaced a message by its tombstone (`Ok(Some)`), found none with that id
    /// (`Ok(None)`) or failed: answer the moderator, and on success tell every occupant and keep the
    /// tombstone in join history.
    pub fn moderated(
        &mut self,
        m: moderation::Moderation,
        result: Result<Vec<ArchivedMessage>, String>,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if let (Ok(stones), Some(room)) = (&result, self.rooms.get_mut(&m.room)) {
            let room_jid = Jid::from(room.jid.clone());
            for stone in stones {
                // A tracker's retraction names the object; each message found is announced by its id.
                let one = moderation::Moderation {
                    id: stone.id.clone(),
                    ..m.clone()
                };
                room.retract_in_history(&one);
                let note = moderation::announcement(
                    &one,
                    room_jid.clone(),
                    format!("retraction-{}", stone.id),
                );
                room.broadcast_message(&note, &mut out);
            }
        }
        let Some((from, to, id)) = m.iq.clone() else {
            return out; // a tracker's: nobody waits for an answer
        };
        let asked = Asked { from, to, id };
        out.push(match result {
            Ok(stones) if !stones.is_empty() => asked.result(None),
            Ok(_) => asked.error(
                DefinedCondition::ItemNotFound,
                "no message with that stanza-id in this room's archive",
            ),
            Err(e) => asked.error(
                DefinedCondition::InternalServerError,
                &format!("the archive could not be changed ({e}); try again"),
            ),
        });
        out
    }

    /// A tracker says the object `refers` (a comment's URL) was deleted: retract every message of
    /// `room` that showed it, in the name of the room's bot `nick`, completing the delivery.
    pub fn tracker_retraction(
        &self,
        room: &str,
        refers: &str,
        nick: &str,
        reason: String,
        completes_inbox: Option<i64>,
        now: DateTime<Utc>,
    ) -> Option<Effect> {
        let r = self.rooms.get(room)?;
        let by = r.jid.with_resource_str(nick).ok()?;
        Some(Effect::Moderate(moderation::Moderation {
            room: room.to_owned(),
            id: String::new(),
            refers: Some(refers.to_owned()),
            by: Jid::from(by),
            by_occupant_id: r.occupant_id_for(&self.bot_jid(nick), &self.cfg.occupant_salt),
            reason: Some(reason),
            at: now,
            iq: None,
            completes_inbox,
        }))
    }

    /// Retention deleted `room`'s messages older than `before`: join history forgets them too.
    pub fn forget_before(&mut self, room: &str, before: DateTime<Utc>) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.forget_before(before);
        }
    }

    /// The store read a room's history (`Err`: it could not; the room goes on with what it has,
    /// logged by the shell): the stanzas that waited for it are handled now, in order.
    pub fn history_read(&mut self, room: &str, stored: Vec<ArchivedMessage>) -> Vec<Effect> {
        self.loading.remove(room);
        let mut out = Vec::new();
        if let Some(r) = self.rooms.get_mut(room) {
            r.history_read(stored);
            // Read from the store with the rest (they were committed first): only the live copy
            // to the occupants just read is owed.
            for m in self.unsent.remove(room).unwrap_or_default() {
                r.broadcast_message(&m.message, &mut out);
            }
        }
        for (stanza, at) in self.waiting.remove(room).unwrap_or_default() {
            out.extend(self.handle(stanza, at));
        }
        out
    }

    /// Mirror a tracker group (XEP-0045 §9 semantics for the changes): the room gets the tracker's title,
    /// description and exactly its affiliations. Occupants who lost membership are removed with status
    /// 321; role changes are broadcast. Returns the effects and the bare JIDs that newly became members
    /// (to be invited, XEP-0249).
    pub fn sync_room(&mut self, info: RoomInfo) -> (Vec<Effect>, Vec<BareJid>) {
        let mut out = Vec::new();
        let jid = self.room_jid(&info.name);
        let name = info.name.clone();
        let room = self.rooms.entry(name.clone()).or_insert_with(|| {
            let mut fresh = info.clone();
            fresh.affiliations.clear();
            Room::new(fresh, jid)
        });
        let before = room.info.affiliations.clone();
        let subject = std::mem::take(&mut room.info.subject);
        room.info = RoomInfo {
            subject,
            ..info.clone()
        };
        let mut added = Vec::new();
        let changed: Vec<BareJid> = before
            .keys()
            .chain(room.info.affiliations.keys())
            .filter(|j| before.get(*j) != room.info.affiliations.get(*j))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for j in changed {
            if !before.contains_key(&j) {
                added.push(j.clone());
            }
            room.affiliation_changed(&j, &mut out);
        }
        out.push(Effect::Persist(Persist::Room(info)));
        self.snapshot(&name, &mut out);
        (out, added)
    }

    /// A room by localpart.
    pub fn room(&self, name: &str) -> Option<&Room> {
        self.rooms.get(name)
    }

    /// All rooms.
    pub fn rooms(&self) -> impl Iterator<Item = &Room> {
        self.rooms.values()
    }

    fn room_jid(&self, name: &str) -> BareJid {
        BareJid::new(&format!("{name}@{}", self.cfg.domain))
            .unwrap_or_else(|_| self.cfg.domain.clone())
    }

    /// The service's own JID.
    pub fn domain_jid(&self) -> Jid {
        Jid::from(self.cfg.domain.clone())
    }

    /// Handle one inbound stanza.
    pub fn handle(&mut self, stanza: Stanza, now: DateTime<Utc>) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(stanza) = self.wait_for_history(stanza, now, &mut out) else {
            return out;
        };
        match stanza {
            Stanza::Iq(iq) => self.handle_iq(iq, now, &mut out),
            Stanza::Message(m) => self.handle_message(m, now, &mut out),
            Stanza::Presence(p) => {
                let room =
                    p.to.as_ref()
                        .and_then(|t| t.node())
                        .map(|n| n.as_str().to_lowercase());
                self.handle_presence(p, now, &mut out);
                if let Some(room) = room {
                    self.snapshot(&room, &mut out);
                }
            }
        }
        out
    }

    /// Several instances with standbys (`store.instances`): who is in each room is kept in the
    /// store, rooms go cold when the running instances change, and a graceful stop tells nobody
    /// (another instance takes the rooms over, occupants included).
    pub fn set_takeover(&mut self, on: bool) {
        self.takeover = on;
    }

    /// Several instances: who is in `room` now, for the store. Only from a room read from the store
    /// since the instances last changed (warm): a cold room's empty memory says nothing about who is
    /// in it, and must not overwrite what its owner wrote.
    fn snapshot(&self, room: &str, out: &mut Vec<Effect>) {
        let warm = |r: &&Room| !r.history_pending();
        if let Some(r) = self.rooms.get(room).filter(|_| self.takeover).filter(warm) {
            out.push(Effect::Persist(Persist::Occupants {
                room: room.to_owned(),
                rows: r.session_rows(),
            }));
        }
    }

    /// Several instances: the set of running instances changed, so the server may now route any
    /// room elsewhere, or here. Every room forgets its occupants and history without telling
    /// anyone, and reads both from the store when it is next used (the store has them: every
    /// instance writes who is in its rooms).
    pub fn go_cold(&mut self) {
        if !self.takeover {
            return;
        }
        for r in self.rooms.values_mut() {
            r.forget_occupants();
            r.unload_history();
        }
    }

    /// Once a second: rooms drop the presences they serialised for a burst of joins (an idle
    /// room keeps none, see `room::PreparedPresences`), and presence updates held back by the
    /// rate limit are announced, the latest of each session, as their owners get tokens again.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Effect> {
        for r in self.rooms.values_mut() {
            r.drop_prepared();
        }
        // Buckets of people gone quiet, even when nobody takes a token any more.
        self.messages.sweep(now);
        self.queries.sweep(now);
        self.joins.sweep(now);
        self.presences.sweep(now);
        let mut out = Vec::new();
        for (room_name, session) in std::mem::take(&mut self.held) {
            let Some(room) = self.rooms.get(&room_name) else {
                continue;
            };
            let key = (room_name, session.to_bare());
            if self.presences.take(&key, now).is_ok() {
                room.announce_presence(&session, &mut out);
            } else {
                self.held.insert((key.0, session));
            }
        }
        out
    }

    /// Rate-limit buckets held (people who sent, asked, joined or changed presence lately).
    pub fn rate_buckets(&self) -> usize {
        self.messages.tracked()
            + self.queries.tracked()
            + self.joins.tracked()
            + self.presences.tracked()
    }

    /// Several instances: who is in `room`, as the store had it (read with its history).
    pub fn restore_sessions(&mut self, room: &str, rows: Vec<room::SessionRow>) {
        let salt = self.cfg.occupant_salt.clone();
        // Only a cold room takes them: a room already read knows who is in it now, and rows read
        // before its latest joins would forget those.
        if let Some(r) = self.rooms.get_mut(room).filter(|r| r.history_pending()) {
            r.restore_sessions(rows, &salt);
        }
    }

    /// Read a cold room from the store (history, and with several instances who is in it) unless
    /// a read is under way: another instance's ask for it waits for that read (the bridge holds
    /// it until [`Service::history_read`]). Nothing for a room that is not cold.
    pub fn read_room(&mut self, room: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.is_cold(room) {
            self.load(room, &mut out);
        }
        out
    }

    /// Ask the store for a room's read, once per read.
    fn load(&mut self, room: &str, out: &mut Vec<Effect>) {
        if self.loading.insert(room.to_owned()) {
            out.push(Effect::LoadHistory(room.to_owned()));
        }
    }

    /// Is `room` still to be read from the store (history, and with several instances its
    /// occupants)?
    pub fn is_cold(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.history_pending())
    }

    /// A join by someone the room admits, to a room whose history is not read yet, waits for it
    /// (and asks the store), so the join gets its history; so does every later stanza to that room
    /// until the read is in, to keep their order (an occupant's message, where a resent command is
    /// recognised in the history, comes after its join). Only a would-be member starts a read: a
    /// stranger cannot make caseroom load every room's history. Per room at most
    /// `waiting_per_room` wait; the rest are answered with `resource-constraint` (wait). Returns the
    /// stanza if it need not wait.
    fn wait_for_history(
        &mut self,
        stanza: Stanza,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) -> Option<Stanza> {
        let (to, from) = match &stanza {
            Stanza::Message(m) => (m.to.as_ref(), m.from.as_ref()),
            Stanza::Presence(p) => (p.to.as_ref(), p.from.as_ref()),
            Stanza::Iq(Iq::Get { to, from, .. } | Iq::Set { to, from, .. }) => {
                (to.as_ref(), from.as_ref())
            }
            Stanza::Iq(_) => (None, None), // answers to our pings
        };
        let name = match to.and_then(|j| j.node()) {
            Some(node) => node.as_str().to_lowercase(),
            None => return Some(stanza), // to the service itself
        };
        let Some(room) = self.rooms.get(&name).filter(|r| r.history_pending()) else {
            return Some(stanza);
        };
        let loading = self.loading.contains(&name);
        // With several instances any member's stanza reads it: its occupants may be in the store
        // (another instance served the room), and the message must reach them.
        let member_joins = (self.takeover
            || matches!(&stanza, Stanza::Presence(p) if p.type_ == PresenceType::None))
            && from.is_some_and(|f| room.may_see(&f.to_bare()));
        if !loading && !member_joins {
            return Some(stanza);
        }
        self.load(&name, out);
        let waiting = self.waiting.entry(name).or_default();
        if waiting.len() < self.cfg.waiting_per_room {
            waiting.push((stanza, now));
        } else {
            let text = "this room is opening; send it again in a moment";
            // RFC 6120 §8.3.3.18: the service lacks the resources to take it now.
            let err = outbound::error_for(&stanza, DefinedCondition::ResourceConstraint, text);
            out.extend(err.map(Effect::Send));
        }
        None
    }

    /// The archive committed `msg`: remember it for join history and broadcast it.
    pub fn archived(&mut self, msg: ArchivedMessage) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.takeover && self.is_cold(&msg.room) {
            // Several instances: the room went cold while this was committed (go_cold), so it no
            // longer knows who is in it. Read them (with the history) and broadcast then; without
            // this the occupants would miss it live (MAM has it).
            self.load(&msg.room, &mut out);
            let unsent = self.unsent.entry(msg.room.clone()).or_default();
            // Bounded like the stanzas waiting for a read; beyond, a message is in the archive
            // only (occupants catch up through MAM).
            if unsent.len() < self.cfg.waiting_per_room {
                unsent.push(msg);
            }
            return out;
        }
        // A message the room's history read already held was sent to everyone present as history
        // (nobody is present before that read): not again.
        if let Some(room) = self.rooms.get_mut(&msg.room).filter(|r| r.is_new(&msg)) {
            room.broadcast_message(&msg.message, &mut out);
            room.remember(msg);
        }
        out
    }

    /// The archive could not take `msg` (disk full, read-only file system): it was not broadcast
    /// (nothing is shown that is not archived). An occupant's message is answered with an error to
    /// every session of its sender in the room, so nobody believes it was delivered; the service's own
    /// posts are retried by their driver instead.
    pub fn not_archived(&self, msg: &ArchivedMessage, reason: &str) -> Vec<Effect> {
        if msg.is_from_service(&self.cfg.domain) {
            return vec![];
        }
        let Some(room) = self.rooms.get(&msg.room) else {
            return vec![];
        };
        let id = msg.message.id.as_ref().map(|i| i.0.clone());
        let text = format!(
            "your message could not be stored ({reason}), so nobody received it; send it again later"
        );
        room.sessions_of(&msg.sender)
            .into_iter()
            .map(|s| {
                Effect::Send(
                    outbound::message_error(
                        Jid::from(room.jid.clone()),
                        Jid::from(s),
                        id.clone(),
                        // RFC 6120 §8.3.3.18: the server lacks the resources to process it.
                        DefinedCondition::ResourceConstraint,
                        &text,
                    )
                    .into(),
                )
            })
            .collect()
    }

    /// A message from the service itself into a room (tracker events), under `nick`, with extra
    /// payloads (XEP-0335 JSON) and a thread. Archived first like any groupchat message; `None` if the
    /// room does not exist.
    pub fn post(&mut self, post: Post, now: DateTime<Utc>) -> Option<Effect> {
        let room = self.rooms.get(&post.room)?;
        let bot = self.bot_jid(&post.nick);
        let mut m = Message::groupchat(None);
        m.bodies.insert(Default::default(), post.body);
        if let Some(t) = post.thread {
            m.thread = Some(xmpp_parsers::message::Thread {
                parent: None,
                id: t,
            });
        }
        m.payloads = post.payloads;
        let mut msg = room.reflect(m, &post.nick, &bot, &self.cfg.occupant_salt);
        let room_jid = Jid::from(room.jid.clone());
        let (seq, id) = self.next_id(now);
        msg.payloads.push(
            xmpp_parsers::stanza_id::StanzaId {
                id: id.clone(),
                by: room_jid,
            }
            .into(),
        );
        Some(Effect::Archive(ArchivedMessage {
            seq,
            id,
            room: post.room,
            ts: now,
            nick: post.nick,
            sender: bot,
            message: msg,
            origin: post.origin,
            completes_inbox: post.completes_inbox,
        }))
    }

    /// The bare JID a bot posting as `nick` archives under: on the service's own domain, which no
    /// occupant can have.
    fn bot_jid(&self, nick: &str) -> BareJid {
        BareJid::new(&format!(
            "{}@{}",
            nick.to_lowercase().replace([' ', '@', '/'], "-"),
            self.cfg.domain
        ))
        .unwrap_or_else(|_| self.cfg.domain.clone())
    }

    /// A private message (XEP-0045 §7.5 shape) from `from_nick` to every session of `to` in the room.
    pub fn private_to(&self, room: &str, from_nick: &str, to: &BareJid, body: &str) -> Vec<Effect> {
        self.private_with(room, from_nick, to, body, None)
    }

    /// [`Service::private_to`] with one more payload (e.g. a JSON container).
    pub fn private_with(
        &self,
        room: &str,
        from_nick: &str,
        to: &BareJid,
        body: &str,
        payload: Option<Element>,
    ) -> Vec<Effect> {
        let Some(r) = self.rooms.get(room) else {
            return vec![];
        };
        let Ok(from) = r.jid.with_resource_str(from_nick) else {
            return vec![];
        };
        r.sessions_of(to)
            .into_iter()
            .map(|s| {
                let mut m = Message::chat(Some(Jid::from(s)));
                m.from = Some(Jid::from(from.clone()));
                m.bodies.insert(Default::default(), body.to_owned());
                m.payloads.push(Element::builder("x", ns::MUC_USER).build());
                m.payloads.extend(payload.clone());
                Effect::Send(m.into())
            })
            .collect()
    }

    /// May `who` search `room`'s history now (a `!search`)? The same rules as a MAM query: the
    /// archive must be open to them, and it counts against their `muc.queries_per_minute`.
    /// `Err`: why not, to tell them.
    pub fn may_search(
        &mut self,
        room: &str,
        who: &BareJid,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        if !self
            .rooms
            .get(room)
            .is_some_and(|r| r.may_read_archive(who))
        {
            return Err("this room's history is for its members only".into());
        }
        self.queries.take(who, now).map_err(|wait| {
            format!(
                "too many history searches and queries: at most {} a minute; try again in {wait} s",
                self.cfg.query_rate.per_minute
            )
        })
    }

    /// Replace a person's filters in a room (`!mute` / `!unmute`); persisted.
    pub fn set_mutes(
        &mut self,
        room: &str,
        who: &BareJid,
        rules: Vec<crate::config::FilterConfig>,
    ) -> Vec<Effect> {
        let Some(r) = self.rooms.get_mut(room) else {
            return vec![];
        };
        r.set_mutes(who.clone(), rules.clone());
        vec![Effect::Persist(Persist::Mutes {
            room: room.to_owned(),
            jid: who.clone(),
            rules,
        })]
    }

    /// Does a room exist?
    pub fn has_room(&self, name: &str) -> bool {
        self.rooms.contains_key(name)
    }

    /// Graceful shutdown: every occupant gets unavailable presence with status 332 (XEP-0045 §7.2.x
    /// "service shutdown").
    pub fn shutdown(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.takeover {
            // Another instance takes the rooms over with their occupants (from the store).
            return out;
        }
        for room in self.rooms.values_mut() {
            room.evict_all(332, &mut out);
        }
        out
    }

    /// The component link was lost and is back. Stanzas to and from occupants were bounced in
    /// between, and the server told them nothing; their sessions may be gone or may rejoin from the
    /// same full JID. Every occupant is sent unavailable with status 332 (the service went away;
    /// XEP-0045 §7.2.x) and forgotten, so that a rejoin is a join, with history and subject.
    pub fn link_lost(&mut self) -> Vec<Effect> {
        // Stanzas waiting for a room's history came over the lost link: their senders resend
        // or rejoin. A read still under way completes (it does not depend on the link).
        self.waiting.values_mut().for_each(Vec::clear);
        let mut out = Vec::new();
        for room in self.rooms.values_mut() {
            room.evict_all(332, &mut out);
        }
        let names: Vec<String> = self.rooms.keys().cloned().collect();
        for name in names {
            self.snapshot(&name, &mut out);
        }
        out
    }

    fn next_id(&mut self, now: DateTime<Utc>) -> (u64, String) {
        let micros = u64::try_from(now.timestamp_micros()).unwrap_or(0);
        // One instance: the time in µs, or the next number if the clock has not moved on.
        // Several (`set_instance`): the same in units of `slots`, plus this instance's slot.
        let step = micros.max(self.last_seq / self.slots + 1);
        self.last_seq = step * self.slots + self.slot;
        // xorshift64*: the unpredictable tail that XEP-0313 §3 asks of archive UIDs.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let tail = (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32;
        // 56 bits of the sequence (microseconds: enough until the year 4253) and 32 random bits,
        // as 15 URL-safe base64 characters: every copy of a message and every MAM result carries
        // this id, so it is kept short (ids of the earlier 24-hex-digit form stay valid: lookups
        // are by the whole string, order is by `seq`).
        let mut raw = [0u8; 11];
        raw[..7].copy_from_slice(&self.last_seq.to_be_bytes()[1..]);
        raw[7..].copy_from_slice(&tail.to_be_bytes());
        (self.last_seq, URL_SAFE_NO_PAD.encode(raw))
    }

    // ---------------------------------------------------------------- presence

    /// The per-room, per-person limits on an available presence from `session` to `nick` in
    /// `room_name`: a join against `muc.joins_per_minute`, a nick change or update against
    /// `muc.presence_changes_per_minute`. `Ok(Some)`: go on with it; `Ok(None)`: an update held
    /// back for [`Service::tick`]; `Err`: refuse with `policy-violation` and this text.
    fn limit_presence(
        &mut self,
        room_name: &str,
        session: &FullJid,
        nick: &str,
        p: Presence,
        now: DateTime<Utc>,
    ) -> Result<Option<Presence>, String> {
        let Some(room) = self.rooms.get_mut(room_name) else {
            return Ok(Some(p));
        };
        let key = (room_name.to_owned(), session.to_bare());
        match room.nick_of(session).map(|n| n == nick) {
            None => match self.joins.take(&key, now) {
                Ok(()) => Ok(Some(p)),
                Err(wait) => Err(format!(
                    "too many joins of this room: at most {} a minute; join again in {wait} s",
                    self.cfg.join_rate.per_minute
                )),
            },
            Some(same_nick) => match self.presences.take(&key, now) {
                Ok(()) => {
                    if same_nick {
                        self.held.remove(&(key.0, session.clone()));
                    }
                    Ok(Some(p))
                }
                // An update is kept, not refused: the room learns the latest one later.
                Err(_) if same_nick => {
                    room.update_presence(session, p);
                    self.held.insert((key.0, session.clone()));
                    Ok(None)
                }
                Err(wait) => Err(format!(
                    "too many presence changes in this room: at most {} a minute; change your nickname again in {wait} s",
                    self.cfg.presence_rate.per_minute
                )),
            },
        }
    }

    fn handle_presence(&mut self, p: Presence, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let (Some(from), Some(to)) = (p.from.clone(), p.to.clone()) else {
            return; // the server always stamps both; nothing to answer to
        };
        let id = p.id.clone();
        let refuse = |cond: DefinedCondition, text: &str| {
            Effect::Send(
                outbound::presence_error(to.clone(), from.clone(), id.clone(), cond, text).into(),
            )
        };
        let Ok(from_full) = from.clone().try_into_full() else {
            if p.type_ != PresenceType::Error {
                out.push(refuse(
                    DefinedCondition::BadRequest,
                    "presence must come from a full JID",
                ));
            }
            return;
        };
        let Some(node) = to.node() else {
            return; // presence to the service itself: nothing to do
        };
        let room_name = node.as_str().to_lowercase();
        let nick = to.resource().map(|r| r.as_str().to_owned());
        match p.type_ {
            PresenceType::None => {
                let Some(nick) = nick else {
                    // §7.2.1: a join without a nick.
                    out.push(refuse(
                        DefinedCondition::JidMalformed,
                        "join with a nickname: room@service/nick",
                    ));
                    return;
                };
                if self.cfg.is_reserved(&nick) {
                    // Bot nicks are the service's own (tracker events and command answers come from
                    // them); §7.2.9 conflict, with a reason.
                    out.push(refuse(
                        DefinedCondition::Conflict,
                        "that nickname is reserved for the tracker's events: pick another",
                    ));
                    return;
                }
                let default_history = self.cfg.default_history;
                let salt = self.cfg.occupant_salt.clone();
                if !self.rooms.contains_key(&room_name) {
                    out.push(refuse(DefinedCondition::ItemNotFound, "no such room: rooms are created from the tracker or caseroom's configuration"));
                    return;
                }
                let p = match self.limit_presence(&room_name, &from_full, &nick, p, now) {
                    Ok(Some(p)) => p,
                    Ok(None) => return,
                    Err(text) => {
                        out.push(refuse(DefinedCondition::PolicyViolation, &text));
                        return;
                    }
                };
                let Some(room) = self.rooms.get_mut(&room_name) else {
                    return;
                };
                room.available(from_full, &nick, p, now, default_history, &salt, out);
            }
            PresenceType::Unavailable => {
                if let Some(room) = self.rooms.get_mut(&room_name) {
                    room.leave(&from_full, p, out);
                }
            }
            PresenceType::Error => {
                // The occupant's server bounced something: the session is gone (a ghost).
                if let Some(room) = self.rooms.get_mut(&room_name) {
                    room.leave(&from_full, Presence::unavailable(), out);
                }
            }
            _ => {
                // Subscriptions and probes are not meaningful for rooms.
                if p.type_ != PresenceType::Probe {
                    out.push(refuse(
                        DefinedCondition::BadRequest,
                        "rooms do not accept presence subscriptions",
                    ));
                }
            }
        }
    }

    // ---------------------------------------------------------------- message

    // Long by design: XEP-0045 §7.4–§8.1 checks in the order the XEP gives them, each with its own error text.
    fn handle_message(&mut self, m: Message, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let (Some(from), Some(to)) = (m.from.clone(), m.to.clone()) else {
            return;
        };
        if m.type_ == MessageType::Error {
            self.forget_bounced(&from, &to, out);
            return;
        }
        let msg_id = m.id.as_ref().map(|i| i.0.clone());
        let bounce = |cond: DefinedCondition, text: &str| {
            Effect::Send(
                outbound::message_error(to.clone(), from.clone(), msg_id.clone(), cond, text)
                    .into(),
            )
        };
        let (room_name, from_full, nick) = match self.occupant_sending(&from, &to) {
            Ok(found) => found,
            Err((cond, text)) => {
                out.push(bounce(cond, text));
                return;
            }
        };
        // A tracker event is a message from a bot nick carrying its Activity as XEP-0335 JSON; an
        // occupant's message must never look like one, so JSON containers are removed from what
        // people send (as forged stanza-ids and occupant-ids are in `reflect`).
        let mut m = m;
        m.payloads.retain(|e| !e.is("json", crate::xmpp::json::NS));
        // Each message with content is an archive write and a fan-out: per person, bounded.
        if !m.bodies.is_empty() {
            if let Err(wait) = self.messages.take(&from_full.to_bare(), now) {
                out.push(bounce(
                    DefinedCondition::PolicyViolation,
                    &format!(
                        "too many messages: at most {} a minute; this one was not delivered, send it again in {wait} s",
                        self.cfg.message_rate.per_minute
                    ),
                ));
                return;
            }
        }
        if let Some(target) = to.resource() {
            // §7.5 private messages.
            if m.type_ == MessageType::Groupchat {
                out.push(bounce(
                    DefinedCondition::BadRequest,
                    "groupchat messages go to the room's bare JID",
                ));
            } else if !self.rooms[&room_name].deliver_private(&nick, target.as_str(), m, out) {
                out.push(bounce(
                    DefinedCondition::ItemNotFound,
                    "no occupant with that nickname",
                ));
            }
            return;
        }
        if m.type_ != MessageType::Groupchat {
            out.push(bounce(DefinedCondition::FeatureNotImplemented,
                "send type='groupchat' to the room; invitations and voice requests are managed by the tracker"));
            return;
        }
        let role = self.rooms[&room_name]
            .occupant(&nick)
            .map(|o| o.role.clone());
        if role == Some(xmpp_parsers::muc::user::Role::Visitor) {
            out.push(bounce(
                DefinedCondition::Forbidden,
                "visitors may not speak in this room",
            ));
            return;
        }
        if !m.subjects.is_empty() && m.bodies.is_empty() {
            // §8.1 subject change: moderators (owners and admins) only.
            if role != Some(xmpp_parsers::muc::user::Role::Moderator) {
                out.push(bounce(
                    DefinedCondition::Forbidden,
                    "only owners and admins may change the subject",
                ));
                return;
            }
            let subject = m.subjects.values().next().cloned().unwrap_or_default();
            if let Some(room) = self.rooms.get_mut(&room_name) {
                room.set_subject(&nick, subject.clone(), out);
            }
            out.push(Effect::Persist(Persist::Subject {
                room: room_name,
                subject,
            }));
            return;
        }
        self.speak(room_name, m, nick, from_full.to_bare(), now, out);
    }

    /// A bounce of something we sent to an occupant: that session is gone (a ghost), remove it.
    fn forget_bounced(&mut self, from: &Jid, to: &Jid, out: &mut Vec<Effect>) {
        if let (Some(node), Ok(full)) = (to.node(), from.clone().try_into_full()) {
            let name = node.as_str().to_lowercase();
            if let Some(room) = self.rooms.get_mut(&name) {
                room.leave(&full, Presence::unavailable(), out);
            }
        }
    }

    /// The room, full JID and nickname of a message's sender, or why the message is refused.
    fn occupant_sending(
        &self,
        from: &Jid,
        to: &Jid,
    ) -> Result<(String, FullJid, String), (DefinedCondition, &'static str)> {
        let Some(node) = to.node() else {
            return Err((
                DefinedCondition::ServiceUnavailable,
                "this is a MUC service: send messages to a room",
            ));
        };
        let room_name = node.as_str().to_lowercase();
        let Ok(from_full) = from.clone().try_into_full() else {
            return Err((
                DefinedCondition::BadRequest,
                "messages must come from a full JID",
            ));
        };
        let Some(room) = self.rooms.get(&room_name) else {
            return Err((DefinedCondition::ItemNotFound, "no such room"));
        };
        // §7.4: only occupants may send to the room or to occupants.
        let Some(nick) = room.nick_of(&from_full).map(str::to_owned) else {
            return Err((
                DefinedCondition::NotAcceptable,
                "join the room before sending to it",
            ));
        };
        Ok((room_name, from_full, nick))
    }

    /// An occupant's groupchat message, accepted: relayed to everyone, and archived (with its
    /// stanza-id, XEP-0359) when it has content; the archive write is what broadcasts it.
    fn speak(
        &mut self,
        room_name: String,
        m: Message,
        nick: String,
        sender: BareJid,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(room) = self.rooms.get(&room_name) else {
            return;
        };
        let has_body = !m.bodies.is_empty();
        let mut msg = room.reflect(m, &nick, &sender, &self.cfg.occupant_salt);
        if !has_body {
            // Chat states, markers, receipts: relayed, not archived (XEP-0313 archives messages
            // with content; these carry none).
            room.broadcast_message(&msg, out);
            return;
        }
        let room_jid = Jid::from(room.jid.clone());
        let (seq, id) = self.next_id(now);
        msg.payloads.push(
            xmpp_parsers::stanza_id::StanzaId {
                id: id.clone(),
                by: room_jid,
            }
            .into(),
        );
        out.push(Effect::Archive(ArchivedMessage {
            seq,
            id,
            room: room_name,
            ts: now,
            nick,
            sender,
            message: msg,
            origin: None,
            completes_inbox: None,
        }));
    }

    // ---------------------------------------------------------------- iq

    fn handle_iq(&mut self, iq: Iq, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let (from, to, id, payload, is_get) = match iq {
            Iq::Get {
                from,
                to,
                id,
                payload,
            } => (from, to, id, payload, true),
            Iq::Set {
                from,
                to,
                id,
                payload,
            } => (from, to, id, payload, false),
            Iq::Result { .. } | Iq::Error { .. } => return, // answers to our pings
        };
        let (Some(from), Some(to)) = (from, to) else {
            return;
        };
        let asked = Asked { from, to, id };
        let Some(node) = asked.to.node() else {
            out.push(self.service_iq(&asked, &payload, is_get));
            return;
        };
        let room_name = node.as_str().to_lowercase();
        let Some(room) = self.rooms.get(&room_name) else {
            out.push(asked.error(DefinedCondition::ItemNotFound, "no such room"));
            return;
        };
        // XEP-0199 ping: answered by the service and by each room; XEP-0410 at occupant JIDs.
        let is_ping = is_get && payload.is("ping", ns::PING);
        if asked.to.resource().is_some() {
            out.push(occupant_iq(room, &asked, is_ping));
        } else if is_ping {
            out.push(asked.result(None));
        } else {
            self.room_iq(&room_name, &asked, &payload, is_get, now, out);
        }
    }

    /// An IQ to the service's own JID.
    fn service_iq(&self, asked: &Asked, payload: &Element, is_get: bool) -> Effect {
        match (payload.ns().as_str(), payload.name(), is_get) {
            (ns::PING, "ping", true) => asked.result(None),
            (ns::DISCO_INFO, "query", true) => {
                asked.result(Some(disco::service_info(&self.cfg, payload)))
            }
            (ns::DISCO_ITEMS, "query", true) => {
                asked.result(Some(disco::service_items(self, &asked.from.to_bare())))
            }
            (ns::VERSION, "query", true) => asked.result(Some(
                xmpp_parsers::version::VersionResult {
                    name: "caseroom".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    os: None,
                }
                .into(),
            )),
            _ => asked.error(
                DefinedCondition::ServiceUnavailable,
                "not supported by this service",
            ),
        }
    }

    /// An IQ to a room's bare JID (not a ping): disco, MAM, muc#admin, muc#owner.
    fn room_iq(
        &mut self,
        room_name: &str,
        asked: &Asked,
        payload: &Element,
        is_get: bool,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(room) = self.rooms.get(room_name) else {
            return;
        };
        let requester = asked.from.to_bare();
        let affiliation = room.affiliation(&requester);
        let pns = payload.ns();
        // XEP-0313 §4 leaves access to the archive to the service; ours: members only.
        let archive_closed = || {
            asked.error(
                DefinedCondition::Forbidden,
                "only members of this room may read its history",
            )
        };
        let reply = match (pns.as_str(), payload.name(), is_get) {
            // Members-only rooms stay hidden from outsiders (no title or subject leak).
            (ns::DISCO_INFO | ns::DISCO_ITEMS, "query", true) if !room.may_see(&requester) => {
                asked.error(DefinedCondition::ItemNotFound, "no such room")
            }
            (ns::DISCO_INFO, "query", true) => asked.result(Some(disco::room_info(room, payload))),
            (ns::DISCO_ITEMS, "query", true) => asked.result(Some(disco::room_items(payload))),
            (ns::MAM, _, _) if !room.may_read_archive(&requester) => archive_closed(),
            (ns::MAM, "query", false) => match self.queries.take(&requester, now) {
                Err(wait) => asked.error(
                    DefinedCondition::PolicyViolation,
                    &format!(
                        "too many history queries: at most {} a minute; try again in {wait} s",
                        self.cfg.query_rate.per_minute
                    ),
                ),
                Ok(()) => match mam::plan(room_name, payload, self.cfg.mam_max_page) {
                    Ok(query) => asked.mam(payload.attr("queryid"), query),
                    Err((cond, text)) => asked.error(cond, &text),
                },
            },
            (ns::MAM, "query", true) => asked.result(Some(mam::query_form())),
            (ns::MAM, "metadata", true) => asked.mam(None, mam::ArchiveQuery::metadata(room_name)),
            // XEP-0425: the store replaces the message, then `moderated` answers.
            (moderation::NS_MODERATE, "moderate", false) => moderation_request(
                room,
                asked,
                affiliation,
                payload,
                &self.cfg.occupant_salt,
                now,
            ),
            (admin::NS_ADMIN, "query", _) => {
                let Some(room) = self.rooms.get_mut(room_name) else {
                    return;
                };
                match admin::handle(room, &requester, affiliation, payload, is_get, out) {
                    Ok(payload) => asked.result(payload),
                    Err((cond, text)) => asked.error(cond, &text),
                }
            }
            (admin::NS_OWNER, "query", _) => {
                match admin::owner(room, affiliation, payload, is_get) {
                    Ok(payload) => asked.result(payload),
                    Err((cond, text)) => asked.error(cond, &text),
                }
            }
            _ => {
                let cond = if is_get || pns.starts_with("http://jabber.org/protocol/muc") {
                    DefinedCondition::FeatureNotImplemented
                } else {
                    DefinedCondition::ServiceUnavailable
                };
                asked.error(cond, "not supported by this room")
            }
        };
        out.push(reply);
    }
}

/// Who asked what: the addressing an IQ's answer reverses.
struct Asked {
    from: Jid,
    to: Jid,
    id: String,
}

impl Asked {
    fn error(&self, cond: DefinedCondition, text: &str) -> Effect {
        Effect::Send(
            outbound::iq_error(self.to.clone(), self.from.clone(), &self.id, cond, text).into(),
        )
    }

    fn result(&self, payload: Option<Element>) -> Effect {
        Effect::Send(
            outbound::iq_result(self.to.clone(), self.from.clone(), &self.id, payload).into(),
        )
    }

    /// A MAM query for the store to answer.
    fn mam(&self, queryid: Option<&str>, query: mam::ArchiveQuery) -> Effect {
        Effect::Mam(mam::MamRequest {
            requester: self.from.clone(),
            room_jid: self.to.clone(),
            iq_id: self.id.clone(),
            queryid: queryid.map(str::to_owned),
            query,
        })
    }
}

/// XEP-0425: the room's owners and admins (its moderators; they need not be joined) retract a
/// message for everyone. The answer is an error, or the store's work ([`Effect::Moderate`]).
fn moderation_request(
    room: &Room,
    asked: &Asked,
    affiliation: Affiliation,
    payload: &Element,
    salt: &str,
    now: DateTime<Utc>,
) -> Effect {
    if !matches!(affiliation, Affiliation::Owner | Affiliation::Admin) {
        return asked.error(
            DefinedCondition::Forbidden,
            "only the room's owners and admins may retract others' messages",
        );
    }
    let (id, reason) = match moderation::parse(payload) {
        Ok(r) => r,
        Err((cond, text)) => return asked.error(cond, &text),
    };
    // The tombstone names the moderator by their occupant JID when joined, else by the room.
    let by = asked
        .from
        .clone()
        .try_into_full()
        .ok()
        .and_then(|f| room.nick_of(&f).map(|n| room.occupant_jid(n)))
        .unwrap_or_else(|| asked.to.clone());
    Effect::Moderate(moderation::Moderation {
        room: room.info.name.clone(),
        id,
        refers: None,
        by,
        by_occupant_id: room.occupant_id_for(&asked.from.to_bare(), salt),
        reason,
        at: now,
        iq: Some((asked.from.clone(), asked.to.clone(), asked.id.clone())),
        completes_inbox: None,
    })
}

/// An IQ to an occupant JID: only XEP-0410 self-ping is answered (any joined occupant learns the
/// room is alive, §3); nothing is relayed to occupants.
fn occupant_iq(room: &Room, asked: &Asked, is_ping: bool) -> Effect {
    if !is_ping {
        return asked.error(
            DefinedCondition::ServiceUnavailable,
            "IQs to occupants are not relayed by this service",
        );
    }
    let joined = asked
        .from
        .clone()
        .try_into_full()
        .ok()
        .is_some_and(|f| room.nick_of(&f).is_some());
    if joined {
        asked.result(None)
    } else {
        asked.error(
            DefinedCondition::NotAcceptable,
            "you are not joined to this room",
        )
    }
}

/// Parse a bare JID from user input (admin lists).
pub fn parse_bare(s: &str) -> Option<BareJid> {
    s.parse::<Jid>().ok().map(|j| j.to_bare())
}
