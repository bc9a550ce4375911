//! One room: occupants, nicks, roles and affiliations, presence and message fan-out (XEP-0045 §7).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use minidom::Element;
use sha2::{Digest, Sha256};
use xmpp_parsers::{
    delay::Delay,
    jid::{BareJid, FullJid, Jid},
    message::{Message, MessageType},
    muc::user::{Affiliation, Role},
    ns,
    occupant_id::OccupantId,
    presence::Presence,
    stanza_error::DefinedCondition,
};

use super::{ArchivedMessage, Effect, Prepared, RoomInfo};
use crate::xmpp::outbound::{self, UserItem};
use crate::xmpp::wire::Template;

/// How many archived messages each room keeps in memory for join history.
pub const HISTORY_CACHE: usize = 200;

/// One occupant: a nick held by one bare JID, possibly from several sessions (§7.2.x multi-session).
#[derive(Debug, Clone)]
pub struct Occupant {
    /// The nick.
    pub nick: String,
    /// The real bare JID.
    pub bare: BareJid,
    /// Joined sessions and the presence each last sent.
    pub sessions: Sessions,
    /// Role in the room.
    pub role: Role,
    /// XEP-0421 occupant id.
    pub occupant_id: String,
}

/// An occupant's joined sessions and the presence each last sent, in JID order. Almost always one
/// or two, so a vector of exactly that many: a `BTreeMap` allocates a node for eleven (≈ 2 KB) per
/// occupant, most of an idle occupant's memory (BENCHMARKS.md, scale).
#[derive(Debug, Clone, Default)]
pub struct Sessions(Vec<(FullJid, Presence)>);

impl Sessions {
    fn find(&self, session: &FullJid) -> Result<usize, usize> {
        self.0.binary_search_by(|(s, _)| s.cmp(session))
    }

    /// Is this session joined?
    pub fn contains_key(&self, session: &FullJid) -> bool {
        self.find(session).is_ok()
    }

    /// The presence a session last sent.
    pub fn get(&self, session: &FullJid) -> Option<&Presence> {
        self.find(session).ok().map(|i| &self.0[i].1)
    }

    /// Add a session or replace its presence.
    pub fn insert(&mut self, session: FullJid, p: Presence) {
        match self.find(&session) {
            Ok(i) => self.0[i].1 = p,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (session, p));
            }
        }
    }

    /// Remove a session.
    pub fn remove(&mut self, session: &FullJid) -> Option<Presence> {
        let i = self.find(session).ok()?;
        let (_, p) = self.0.remove(i);
        self.0.shrink_to_fit();
        Some(p)
    }

    /// The joined sessions, in JID order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &FullJid> {
        self.0.iter().map(|(s, _)| s)
    }

    /// Sessions and their presences, in JID order.
    pub fn iter(&self) -> impl Iterator<Item = (&FullJid, &Presence)> {
        self.0.iter().map(|(s, p)| (s, p))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None joined?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What is kept of a session's presence for relaying it (§7.2.3, §7.7): its show, status, priority and
/// the client's own extensions; not the MUC join element (never relayed), nor the addressing and id (each
/// copy gets its own). Kept for every joined session, so it is kept small.
fn kept(mut p: Presence) -> Presence {
    p.payloads
        .retain(|e| !(e.ns() == ns::MUC || e.ns() == ns::MUC_USER || e.ns() == ns::OID));
    p.payloads.shrink_to_fit();
    p.from = None;
    p.to = None;
    p.id = None;
    p
}

/// A joined session as the store keeps it (several instances), so that the instance taking a room
/// over knows who is in it: the session, its nick and role, and the presence it last sent (XML).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    /// The occupant's full JID.
    pub session: FullJid,
    /// Its nick.
    pub nick: String,
    /// Its role.
    pub role: Role,
    /// The presence it last sent, as kept for relaying (serialised).
    pub presence: String,
}

/// A room.
#[derive(Debug)]
pub struct Room {
    /// Persistent description.
    pub info: RoomInfo,
    /// Room bare JID.
    pub jid: BareJid,
    occupants: Occupants,
    history: VecDeque<ArchivedMessage>,
    /// Has `history` been read from the store? A room starts without it (start-up does not read
    /// every room's archive) and the service loads it when the room is first used.
    history_loaded: bool,
    subject_from: Option<String>,
    /// Per-person filters (`!mute`): tracker events these people do not want to see here.
    mutes: std::collections::HashMap<BareJid, Vec<crate::config::FilterConfig>>,
    /// Occupants' presences serialised for joiners' answers; `None` when the room is quiet.
    prepared: Option<Box<PreparedPresences>>,
}

/// Each occupant's available presence as a joiner sees it, serialised once and copied to every
/// joiner with only `to` added. A join answers with every occupant's presence (§7.2.3), so a burst
/// of n joins would otherwise build and serialise about n²/2 presences, each as a tree (most of
/// caseroom's CPU in a join storm). An entry is dropped whenever what it was made from changes
/// ([`Room::forget_prepared`]: the occupant's sessions, presence or role; the affiliation is
/// checked on use, as it lives in the public [`RoomInfo`]), and the whole cache on every tick
/// ([`Room::drop_prepared`]), so an idle room holds none of it (occupant memory, BENCHMARKS §8).
#[derive(Debug, Default)]
struct PreparedPresences {
    /// By nick: `[0]` as seen without the real JID, `[1]` with it (§7.2.3, §7.2.4).
    views: [HashMap<String, (Affiliation, Arc<Template>)>; 2],
}

/// The occupants by nick, and every joined session of theirs as one shared list, the recipients of
/// each room message: built on the first broadcast after a change and shared by every broadcast
/// until the next, so a message to n sessions clones no JID (BENCHMARKS.md §2, stop 27). Reads go
/// through `Deref`; every change goes through a method here, which drops the list, so it cannot
/// outlive the occupancy it was made from.
#[derive(Debug, Default)]
struct Occupants {
    by_nick: BTreeMap<String, Occupant>,
    everyone: std::cell::OnceCell<Arc<[FullJid]>>,
}

impl std::ops::Deref for Occupants {
    type Target = BTreeMap<String, Occupant>;
    fn deref(&self) -> &Self::Target {
        &self.by_nick
    }
}

impl Occupants {
    fn changed(&mut self) -> &mut BTreeMap<String, Occupant> {
        self.everyone.take();
        &mut self.by_nick
    }
    fn get_mut(&mut self, nick: &str) -> Option<&mut Occupant> {
        self.changed().get_mut(nick)
    }
    fn entry(&mut self, nick: String) -> std::collections::btree_map::Entry<'_, String, Occupant> {
        self.changed().entry(nick)
    }
    fn insert(&mut self, nick: String, o: Occupant) -> Option<Occupant> {
        self.changed().insert(nick, o)
    }
    fn remove(&mut self, nick: &str) -> Option<Occupant> {
        self.changed().remove(nick)
    }
    fn clear(&mut self) {
        self.changed().clear()
    }
    /// Every joined session, in nick order.
    fn everyone(&self) -> Arc<[FullJid]> {
        self.everyone
            .get_or_init(|| {
                self.by_nick
                    .values()
                    .flat_map(|o| o.sessions.keys().cloned())
                    .collect()
            })
            .clone()
    }
}

impl Room {
    /// A room with no occupants.
    pub fn new(info: RoomInfo, jid: BareJid) -> Room {
        Room {
            info,
            jid,
            occupants: Occupants::default(),
            history: VecDeque::new(),
            history_loaded: true,
            subject_from: None,
            mutes: Default::default(),
            prepared: None,
        }
    }

    /// Forget `nick`'s serialised presences (its sessions, presence or role changed, or it left).
    fn forget_prepared(&mut self, nick: &str) {
        if let Some(p) = self.prepared.as_mut() {
            for view in &mut p.views {
                view.remove(nick);
            }
        }
    }

    /// Forget every serialised presence and the recipient list (on each tick: these caches only
    /// serve bursts, so an idle room holds neither).
    pub fn drop_prepared(&mut self) {
        self.prepared = None;
        self.occupants.everyone.take();
    }

    /// Affiliation of a bare JID.
    pub fn affiliation(&self, jid: &BareJid) -> Affiliation {
        self.info
            .affiliations
            .get(jid)
            .cloned()
            .unwrap_or(Affiliation::None)
    }

    /// Members, admins and owners may see a (members-only, hidden) room.
    pub fn may_see(&self, jid: &BareJid) -> bool {
        matches!(
            self.affiliation(jid),
            Affiliation::Owner | Affiliation::Admin | Affiliation::Member
        )
    }

    /// Only members (and above) read the archive.
    pub fn may_read_archive(&self, jid: &BareJid) -> bool {
        self.may_see(jid)
    }

    /// Nick of a joined session.
    pub fn nick_of(&self, session: &FullJid) -> Option<&str> {
        self.occupants
            .values()
            .find(|o| o.sessions.contains_key(session))
            .map(|o| o.nick.as_str())
    }

    /// An occupant by nick.
    pub fn occupant(&self, nick: &str) -> Option<&Occupant> {
        self.occupants.get(nick)
    }

    /// All occupants.
    pub fn occupants(&self) -> impl Iterator<Item = &Occupant> {
        self.occupants.values()
    }

    /// Recent archived messages kept for join history.
    pub fn history(&self) -> impl Iterator<Item = &ArchivedMessage> {
        self.history.iter()
    }

    /// Keep a committed message for join history. Messages arrive in archive order; one already
    /// kept (read with the room's history while its commit was being reported) is not kept twice.
    pub fn remember(&mut self, m: ArchivedMessage) {
        if !self.is_new(&m) {
            return;
        }
        if self.history.len() == HISTORY_CACHE {
            self.history.pop_front();
        }
        self.history.push_back(m);
    }

    /// Is `m` newer than every message kept? Always, but for a commit reported after the
    /// history read that already held it.
    pub fn is_new(&self, m: &ArchivedMessage) -> bool {
        self.history.back().is_none_or(|last| last.seq < m.seq)
    }

    /// Replace a kept message by its tombstone (a moderator retracted it).
    pub(super) fn retract_in_history(&mut self, m: &super::moderation::Moderation) {
        for kept in self.history.iter_mut().filter(|k| k.id == m.id) {
            *kept = super::moderation::tombstone(kept, m);
        }
    }

    /// Forget kept messages older than `before` (retention deleted them from the archive).
    pub(super) fn forget_before(&mut self, before: chrono::DateTime<chrono::Utc>) {
        self.history.retain(|m| m.ts >= before);
    }

    /// Is the join history still to be read from the store?
    pub fn history_pending(&self) -> bool {
        !self.history_loaded
    }

    /// Forget the history until it is loaded (a room opened from the store).
    pub(super) fn unload_history(&mut self) {
        self.history.clear();
        self.history_loaded = false;
    }

    /// The store's newest messages of the room (oldest first), merged with those committed since
    /// the read began (already remembered, possibly newer than anything read).
    pub(super) fn history_read(&mut self, stored: Vec<ArchivedMessage>) {
        let since = std::mem::take(&mut self.history);
        let by = Jid::from(self.jid.clone());
        let ours = by.to_string();
        self.history = stored
            .into_iter()
            .map(|mut m| {
                // The store keeps messages as MAM serves them, without the room's own stanza-id
                // (XEP-0359): a history message carries it again, as it did live.
                let has = |p: &Element| p.is("stanza-id", ns::SID) && p.attr("by") == Some(&ours);
                if !m.message.payloads.iter().any(has) {
                    let id = xmpp_parsers::stanza_id::StanzaId {
                        id: m.id.clone(),
                        by: by.clone(),
                    };
                    m.message.payloads.push(id.into());
                }
                m
            })
            .collect();
        // Oldest first, as the store returns them (`remember` relies on the order).
        while self.history.len() > HISTORY_CACHE {
            self.history.pop_front();
        }
        for m in since {
            self.remember(m);
        }
        self.history_loaded = true;
    }

    pub(super) fn occupant_jid(&self, nick: &str) -> Jid {
        self.jid
            .with_resource_str(nick)
            .map(Jid::from)
            .unwrap_or_else(|_| Jid::from(self.jid.clone()))
    }

    fn role_for(aff: &Affiliation) -> Role {
        match aff {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            Affiliation::Member | Affiliation::None => Role::Participant,
            Affiliation::Outcast => Role::None,
        }
    }

    /// XEP-0421 §3: stable per room and real bare JID, opaque to others.
    pub fn occupant_id_for(&self, bare: &BareJid, salt: &str) -> String {
        let mut h = Sha256::new();
        h.update(salt.as_bytes());
        h.update([0]);
        h.update(self.info.name.as_bytes());
        h.update([0]);
        h.update(bare.as_str().as_bytes());
        let d = h.finalize();
        hex::encode(&d[..16])
    }

    /// May `viewer` see real JIDs? Non-anonymous rooms: everyone; semi-anonymous: moderators.
    fn shows_jids_to(&self, viewer: &Occupant) -> bool {
        !self.info.anonymous || viewer.role == Role::Moderator
    }

    /// Presence of occupant `o` (as last sent by `session`) as seen by `viewer`.
    fn presence_of(
        &self,
        o: &Occupant,
        session: &FullJid,
        viewer: &Occupant,
        to: &FullJid,
        statuses: &[u16],
        unavailable: bool,
    ) -> Presence {
        let source = o.sessions.get(session);
        let mut p = if unavailable {
            Presence::unavailable()
        } else {
            Presence::available()
        };
        if let Some(src) = source {
            if !unavailable {
                p.show = src.show.clone();
                p.priority = src.priority.clone();
                // The client's own extensions (caps, avatars, …): `kept` dropped its MUC elements.
                p.payloads = src.payloads.clone();
            }
            p.statuses = src.statuses.clone();
        }
        p.from = Some(self.occupant_jid(&o.nick));
        p.to = Some(Jid::from(to.clone()));
        let item = UserItem {
            affiliation: self.affiliation(&o.bare),
            role: Some(if unavailable {
                Role::None
            } else {
                o.role.clone()
            }),
            jid: self
                .shows_jids_to(viewer)
                .then(|| Jid::from(session.clone())),
            nick: None,
            reason: None,
        };
        p.payloads.push(outbound::muc_user(&[item], statuses));
        p.payloads.push(
            OccupantId {
                id: o.occupant_id.clone(),
            }
            .into(),
        );
        p
    }

    fn send_presence_everywhere(
        &self,
        o: &Occupant,
        session: &FullJid,
        unavailable: bool,
        extra_statuses: &[u16],
        out: &mut Vec<Effect>,
    ) {
        let mut others = Vec::new();
        for viewer in self.occupants.values() {
            for to in viewer.sessions.keys() {
                if to == session || (viewer.bare == o.bare && viewer.nick == o.nick) {
                    let mut statuses: Vec<u16> = extra_statuses.to_vec();
                    statuses.insert(0, 110);
                    out.push(Effect::Send(
                        self.presence_of(o, session, viewer, to, &statuses, unavailable)
                            .into(),
                    ));
                } else {
                    others.push((viewer, to));
                }
            }
        }
        self.broadcast_presence(o, session, others, extra_statuses, unavailable, out);
    }

    /// `o`'s presence (as last sent by `session`) to many sessions: one broadcast per view (with
    /// or without the real JID, §7.2.3/§7.2.4), serialised once by the link, not once per copy.
    fn broadcast_presence(
        &self,
        o: &Occupant,
        session: &FullJid,
        to: Vec<(&Occupant, &FullJid)>,
        statuses: &[u16],
        unavailable: bool,
        out: &mut Vec<Effect>,
    ) {
        let (with_jid, without): (Vec<_>, Vec<_>) =
            to.into_iter().partition(|(v, _)| self.shows_jids_to(v));
        for group in [with_jid, without] {
            let Some((viewer, first)) = group.first() else {
                continue;
            };
            let mut p = self.presence_of(o, session, viewer, first, statuses, unavailable);
            p.to = None;
            out.push(Effect::Broadcast(super::Broadcast {
                what: super::Shared::Stanza(p.into()),
                to: group.into_iter().map(|(_, s)| s.clone()).collect(),
            }));
        }
    }

    fn error_presence(
        &self,
        from: Jid,
        to: &FullJid,
        id: Option<String>,
        cond: DefinedCondition,
        text: &str,
    ) -> Effect {
        Effect::Send(outbound::presence_error(from, Jid::from(to.clone()), id, cond, text).into())
    }

    /// Available presence to room/nick: join, nick change or presence update.
    #[allow(clippy::too_many_arguments)]
    pub fn available(
        &mut self,
        session: FullJid,
        nick: &str,
        p: Presence,
        now: DateTime<Utc>,
        default_history: usize,
        salt: &str,
        out: &mut Vec<Effect>,
    ) {
        let to_jid = self.occupant_jid(nick);
        let bare = session.to_bare();
        let aff = self.affiliation(&bare);
        let current = self.nick_of(&session).map(str::to_owned);
        if nick.trim().is_empty() {
            out.push(self.error_presence(
                to_jid,
                &session,
                p.id.clone(),
                DefinedCondition::JidMalformed,
                "the nickname must not be empty",
            ));
            return;
        }
        match current {
            Some(cur) if cur == nick => {
                // §7.7 presence update: store and broadcast.
                self.update_presence(&session, p);
                self.announce_presence(&session, out);
            }
            Some(cur) => self.change_nick(session, &cur, nick, p, out),
            None => {
                // §7.2.6 banned; §7.2.7 members-only.
                if aff == Affiliation::Outcast {
                    out.push(self.error_presence(
                        to_jid,
                        &session,
                        p.id.clone(),
                        DefinedCondition::Forbidden,
                        "you are banned from this room",
                    ));
                    return;
                }
                if !self.may_see(&bare) {
                    out.push(self.error_presence(to_jid, &session, p.id.clone(), DefinedCondition::RegistrationRequired,
                        "this room is members-only: ask a project manager in the tracker to add you"));
                    return;
                }
                // §7.2.9 nick conflict, unless the same bare JID (multi-session).
                if let Some(o) = self.occupants.get(nick) {
                    if o.bare != bare {
                        out.push(self.error_presence(
                            to_jid,
                            &session,
                            p.id.clone(),
                            DefinedCondition::Conflict,
                            "that nickname is in use by another person: pick another",
                        ));
                        return;
                    }
                }
                let history_req = p
                    .payloads
                    .iter()
                    .find(|e| e.is("x", ns::MUC))
                    .and_then(|e| xmpp_parsers::muc::Muc::try_from(e.clone()).ok())
                    .and_then(|m| m.history);
                self.join(session, nick, p, aff, salt, out);
                self.send_history(nick, history_req, now, default_history, out);
            }
        }
    }

    fn join(
        &mut self,
        session: FullJid,
        nick: &str,
        p: Presence,
        aff: Affiliation,
        salt: &str,
        out: &mut Vec<Effect>,
    ) {
        let bare = session.to_bare();
        let occupant_id = self.occupant_id_for(&bare, salt);
        let existing = self.occupants.contains_key(nick);
        let o = self
            .occupants
            .entry(nick.to_owned())
            .or_insert_with(|| Occupant {
                nick: nick.to_owned(),
                bare: bare.clone(),
                sessions: Sessions::default(),
                role: Self::role_for(&aff),
                occupant_id,
            });
        o.sessions.insert(session.clone(), kept(p));
        self.forget_prepared(nick);
        let me = self.occupants[nick].clone();
        // §7.2.3: first the presence of existing occupants to the new session…
        self.answer_with_occupants(&me, &session, out);
        // …then the new occupant's presence to everyone, self-presence last with 110 (§7.2.3),
        // 100 for non-anonymous rooms (§7.2.4) and 170 because the room is archived (§7.2.12).
        let mut self_codes = vec![110];
        if !self.info.anonymous {
            self_codes.push(100);
        }
        self_codes.push(170);
        let mut others = Vec::new();
        for viewer in self.occupants.values() {
            if existing && viewer.nick == nick {
                continue; // other sessions of a multi-session occupant already know it
            }
            others.extend(
                viewer
                    .sessions
                    .keys()
                    .filter(|to| **to != session)
                    .map(|to| (viewer, to)),
            );
        }
        self.broadcast_presence(&me, &session, others, &[], false, out);
        out.push(Effect::Reply(
            self.presence_of(&me, &session, &me, &session, &self_codes, false)
                .into(),
        ));
    }

    /// Every other occupant's presence to `session`, which `me` just joined from (§7.2.3): each
    /// serialised once while the room is busy ([`PreparedPresences`]) and copied with only `to` set.
    fn answer_with_occupants(&mut self, me: &Occupant, session: &FullJid, out: &mut Vec<Effect>) {
        let view = usize::from(self.shows_jids_to(me));
        let cache = self.prepared.as_deref().map(|p| &p.views[view]);
        let mut made = Vec::new();
        for other in self.occupants.values() {
            let Some((s, _)) = other.sessions.iter().next() else {
                continue;
            };
            if other.nick == me.nick {
                continue;
            }
            let aff = self.affiliation(&other.bare);
            let cached = cache
                .and_then(|c| c.get(&other.nick))
                .filter(|(a, _)| *a == aff)
                .map(|(_, t)| Arc::clone(t));
            let fresh =
                || Template::new(&self.presence_of(other, s, me, session, &[], false).into());
            let template = match cached {
                Some(t) => {
                    // Every debug build (all Rust tests, the fuzzer) checks that no entry is stale.
                    debug_assert_eq!(
                        fresh().ok().as_ref(),
                        Some(&*t),
                        "stale presence of {}",
                        other.nick
                    );
                    t
                }
                None => match fresh() {
                    Ok(t) => {
                        let t = Arc::new(t);
                        made.push((other.nick.clone(), aff, Arc::clone(&t)));
                        t
                    }
                    // Not serialisable: the link counts and logs it as for any stanza.
                    Err(_) => {
                        let p = self.presence_of(other, s, me, session, &[], false);
                        out.push(Effect::Reply(p.into()));
                        continue;
                    }
                },
            };
            out.push(Effect::ReplyPrepared(Prepared {
                template,
                to: session.clone(),
            }));
        }
        if !made.is_empty() {
            let views = &mut self.prepared.get_or_insert_with(Default::default).views[view];
            for (nick, aff, t) in made {
                views.insert(nick, (aff, t));
            }
        }
    }

    /// §7.2.15 history on join, then the subject (§7.2.16; always sent, clients wait for it).
    fn send_history(
        &self,
        nick: &str,
        req: Option<xmpp_parsers::muc::muc::History>,
        now: DateTime<Utc>,
        default_history: usize,
        out: &mut Vec<Effect>,
    ) {
        let Some(o) = self.occupants.get(nick) else {
            return;
        };
        let Some(session) = o.sessions.keys().next_back().cloned() else {
            return;
        };
        let req = req.unwrap_or_default();
        let maxstanzas = req
            .maxstanzas
            .map(|n| n as usize)
            .unwrap_or(default_history);
        let since = match (req.since, req.seconds) {
            (Some(s), Some(secs)) => Some(
                s.0.with_timezone(&Utc)
                    .max(now - Duration::seconds(secs.into())),
            ),
            (Some(s), None) => Some(s.0.with_timezone(&Utc)),
            (None, Some(secs)) => Some(now - Duration::seconds(secs.into())),
            (None, None) => None,
        };
        let mut picked: Vec<Element> = Vec::new();
        let mut chars = 0usize;
        for m in self.history.iter().rev() {
            if picked.len() >= maxstanzas {
                break;
            }
            if since.is_some_and(|s| m.ts < s) {
                break;
            }
            let mut msg = m.message.clone();
            msg.to = Some(Jid::from(session.clone()));
            msg.payloads.push(
                Delay {
                    from: Some(Jid::from(self.jid.clone())),
                    stamp: super::mam::stamp(m.ts),
                    data: None,
                }
                .into(),
            );
            let el = Element::from(msg);
            if let Some(max) = req.maxchars {
                // maxchars counts the characters of the complete stanzas.
                chars += String::from(&el).chars().count();
                if chars > max as usize {
                    break;
                }
            }
            picked.push(el);
        }
        for el in picked.into_iter().rev() {
            if let Ok(m) = Message::try_from(el) {
                out.push(Effect::Reply(m.into()));
            }
        }
        let mut subject = Message::groupchat(Some(Jid::from(session.clone())));
        subject.from = Some(match &self.subject_from {
            Some(n) => self.occupant_jid(n),
            None => Jid::from(self.jid.clone()),
        });
        subject
            .subjects
            .insert(Default::default(), self.info.subject.clone());
        out.push(Effect::Reply(subject.into()));
    }

    fn change_nick(
        &mut self,
        session: FullJid,
        old: &str,
        new: &str,
        p: Presence,
        out: &mut Vec<Effect>,
    ) {
        let bare = session.to_bare();
        if let Some(o) = self.occupants.get(new) {
            if o.bare != bare {
                let to_jid = self.occupant_jid(new);
                out.push(self.error_presence(
                    to_jid,
                    &session,
                    p.id.clone(),
                    DefinedCondition::Conflict,
                    "that nickname is in use by another person: pick another",
                ));
                return;
            }
            // Same person already under the new nick from another session: move this session over.
        }
        let Some(mut o) = self.occupants.remove(old) else {
            return;
        };
        self.forget_prepared(old);
        self.forget_prepared(new);
        // §7.6: unavailable with 303 and the new nick, from the old occupant JID…
        for viewer in self.occupants.values().chain(std::iter::once(&o)) {
            for to in viewer.sessions.keys() {
                let mut statuses = vec![303];
                if viewer.bare == o.bare {
                    statuses.insert(0, 110);
                }
                let mut pres = self.presence_of(&o, &session, viewer, to, &[], true);
                // Rebuild the muc#user element with the new nick and the status codes.
                pres.payloads.retain(|e| !e.is("x", ns::MUC_USER));
                pres.payloads.push(outbound::muc_user(
                    &[UserItem {
                        affiliation: self.affiliation(&o.bare),
                        role: Some(o.role.clone()),
                        jid: self
                            .shows_jids_to(viewer)
                            .then(|| Jid::from(session.clone())),
                        nick: Some(new.to_owned()),
                        reason: None,
                    }],
                    &statuses,
                ));
                out.push(Effect::Send(pres.into()));
            }
        }
        o.nick = new.to_owned();
        o.sessions.insert(session.clone(), kept(p));
        self.occupants.insert(new.to_owned(), o);
        // …then available from the new nick.
        if let Some(o) = self.occupants.get(new) {
            self.send_presence_everywhere(o, &session, false, &[], out);
        }
    }

    /// Keep an occupant session's new presence (§7.7) without telling anyone yet: a joiner sees
    /// it at once, the room when [`Room::announce_presence`] is called (the service holds updates
    /// back beyond `muc.presence_changes_per_minute`).
    pub fn update_presence(&mut self, session: &FullJid, p: Presence) {
        let Some(nick) = self.nick_of(session).map(str::to_owned) else {
            return;
        };
        if let Some(o) = self.occupants.get_mut(&nick) {
            o.sessions.insert(session.clone(), kept(p));
        }
        self.forget_prepared(&nick);
    }

    /// Send an occupant session's presence, as it now is, to everyone in the room (§7.7).
    pub fn announce_presence(&self, session: &FullJid, out: &mut Vec<Effect>) {
        if let Some(o) = self.nick_of(session).and_then(|n| self.occupants.get(n)) {
            self.send_presence_everywhere(o, session, false, &[], out);
        }
    }

    /// Unavailable presence (or a bounce) from a session.
    pub fn leave(&mut self, session: &FullJid, p: Presence, out: &mut Vec<Effect>) {
        let Some(nick) = self.nick_of(session).map(str::to_owned) else {
            return;
        };
        let Some(o) = self.occupants.get_mut(&nick) else {
            return;
        };
        o.sessions.insert(session.clone(), kept(p));
        let o = o.clone();
        self.forget_prepared(&nick);
        // The session is told it left, as an answer to its own leave (§7.14)…
        out.push(Effect::Departed {
            room: self.jid.clone(),
            session: session.clone(),
        });
        out.push(Effect::Reply(
            self.presence_of(&o, session, &o, session, &[110], true)
                .into(),
        ));
        if o.sessions.len() > 1 {
            // …and only it: the occupant's other sessions stay.
            if let Some(o) = self.occupants.get_mut(&nick) {
                o.sessions.remove(session);
            }
            return;
        }
        // …and, its last session gone, everyone else in broadcast order.
        self.occupants.remove(&nick);
        let others = self
            .occupants
            .values()
            .flat_map(|v| v.sessions.keys().map(move |s| (v, s)))
            .collect();
        self.broadcast_presence(&o, session, others, &[], true, out);
    }

    /// Every joined session, for the store (several instances).
    pub fn session_rows(&self) -> Vec<SessionRow> {
        let mut rows = Vec::new();
        for o in self.occupants.values() {
            for (session, p) in o.sessions.iter() {
                rows.push(SessionRow {
                    session: session.clone(),
                    nick: o.nick.clone(),
                    role: o.role.clone(),
                    presence: String::from(&Element::from(p.clone())),
                });
            }
        }
        rows
    }

    /// Who is in the room, as the store had it (this instance takes the room over): the occupants
    /// kept in memory are replaced. Rows that cannot be read are left out.
    pub fn restore_sessions(&mut self, rows: Vec<SessionRow>, salt: &str) {
        self.occupants.clear();
        for row in rows {
            let Ok(p) = row
                .presence
                .parse::<Element>()
                .map_err(|e| e.to_string())
                .and_then(|el| Presence::try_from(el).map_err(|e| e.to_string()))
            else {
                continue;
            };
            let bare = row.session.to_bare();
            let occupant_id = self.occupant_id_for(&bare, salt);
            let o = self
                .occupants
                .entry(row.nick.clone())
                .or_insert_with(|| Occupant {
                    nick: row.nick.clone(),
                    bare,
                    sessions: Sessions::default(),
                    role: row.role.clone(),
                    occupant_id,
                });
            o.sessions.insert(row.session, p);
        }
        self.drop_prepared();
    }

    /// Forget who is in the room without telling anyone (several instances: another may serve it
    /// now; the store has them).
    pub(super) fn forget_occupants(&mut self) {
        self.occupants.clear();
        self.drop_prepared();
    }

    /// Evict everyone with one status (332 shutdown, 321 membership lost, 301 banned).
    pub fn evict_all(&mut self, status: u16, out: &mut Vec<Effect>) {
        let nicks: Vec<String> = self.occupants.keys().cloned().collect();
        for nick in nicks {
            self.evict(&nick, status, out);
        }
    }

    /// Remove one occupant (all sessions) with a status code; everyone is told.
    pub fn evict(&mut self, nick: &str, status: u16, out: &mut Vec<Effect>) {
        let Some(o) = self.occupants.get(nick).cloned() else {
            return;
        };
        // One unavailable per occupant and viewer session, whatever the number of own sessions.
        if let Some(session) = o.sessions.keys().next() {
            self.send_presence_everywhere(&o, session, true, &[status], out);
        }
        self.occupants.remove(nick);
        self.forget_prepared(nick);
    }

    /// An affiliation changed (§9): update the role of a present occupant or remove them.
    pub fn affiliation_changed(&mut self, jid: &BareJid, out: &mut Vec<Effect>) {
        let aff = self.affiliation(jid);
        let nicks: Vec<String> = self
            .occupants
            .values()
            .filter(|o| &o.bare == jid)
            .map(|o| o.nick.clone())
            .collect();
        for nick in nicks {
            match aff {
                Affiliation::Outcast => self.evict(&nick, 301, out),
                Affiliation::None => self.evict(&nick, 321, out), // members-only: §9.5
                _ => {
                    let role = Self::role_for(&aff);
                    if let Some(o) = self.occupants.get_mut(&nick) {
                        o.role = role;
                    }
                    self.forget_prepared(&nick);
                    if let Some(o) = self.occupants.get(&nick).cloned() {
                        if let Some(s) = o.sessions.keys().next() {
                            self.send_presence_everywhere(&o, s, false, &[], out);
                        }
                    }
                }
            }
        }
    }

    /// The message as the room reflects it: from room/nick, client-forged stanza-id (by this room)
    /// and occupant-id removed (XEP-0359 §3.1, XEP-0421 §3), ours added.
    pub fn reflect(&self, mut m: Message, nick: &str, sender: &BareJid, salt: &str) -> Message {
        let room_jid = self.jid.as_str().to_owned();
        m.payloads.retain(|e| {
            !(e.is("occupant-id", ns::OID)
                || (e.is("stanza-id", ns::SID) && e.attr("by") == Some(room_jid.as_str())))
        });
        m.payloads.push(
            OccupantId {
                id: self.occupant_id_for(sender, salt),
            }
            .into(),
        );
        m.from = Some(self.occupant_jid(nick));
        m.to = None;
        m
    }

    /// Send a reflected message to every session of every occupant.
    pub fn broadcast_message(&self, m: &Message, out: &mut Vec<Effect>) {
        // A tracker event carries its Activity (XEP-0335); people may have muted some kinds of them.
        let activity: Option<serde_json::Value> = if self.mutes.is_empty() {
            None
        } else {
            m.payloads
                .iter()
                .find(|p| p.is("json", crate::xmpp::json::NS))
                .and_then(|p| crate::xmpp::json::JsonContainer::try_from(p.clone()).ok())
                .map(|j| j.0)
        };
        let to: Arc<[FullJid]> = match activity.as_ref().map(crate::filter::Facts::of_json) {
            // Nobody can have muted it: the shared list of everyone.
            None => self.occupants.everyone(),
            Some(f) => self
                .occupants
                .values()
                .filter(|o| {
                    self.mutes
                        .get(&o.bare)
                        .is_none_or(|rules| !rules.iter().any(|r| crate::filter::matches(r, &f)))
                })
                .flat_map(|o| o.sessions.keys().cloned())
                .collect(),
        };
        if to.is_empty() {
            return;
        }
        let what = match Template::of_message(m) {
            Ok(t) => super::Shared::Message {
                template: Arc::new(t),
                room: self.jid.clone(),
            },
            // Not serialisable: the link counts and logs it, as for any stanza.
            Err(_) => super::Shared::Stanza(m.clone().into()),
        };
        out.push(Effect::Broadcast(super::Broadcast { what, to }));
    }

    /// §7.5: a private message to the occupant `target`; false if there is none.
    pub fn deliver_private(
        &self,
        from_nick: &str,
        target: &str,
        mut m: Message,
        out: &mut Vec<Effect>,
    ) -> bool {
        let Some(t) = self.occupants.get(target) else {
            return false;
        };
        m.from = Some(self.occupant_jid(from_nick));
        m.payloads.retain(|e| !e.is("x", ns::MUC_USER));
        m.payloads.push(Element::builder("x", ns::MUC_USER).build());
        if m.type_ == MessageType::Error {
            return true;
        }
        for s in t.sessions.keys() {
            let mut c = m.clone();
            c.to = Some(Jid::from(s.clone()));
            out.push(Effect::Send(c.into()));
        }
        true
    }

    /// §8.1: a moderator changes the subject; everyone gets it.
    pub fn set_subject(&mut self, nick: &str, subject: String, out: &mut Vec<Effect>) {
        self.info.subject = subject.clone();
        self.subject_from = Some(nick.to_owned());
        let mut m = Message::groupchat(None);
        m.from = Some(self.occupant_jid(nick));
        m.subjects.insert(Default::default(), subject);
        self.broadcast_message(&m, out);
    }

    /// Replace one person's filters.
    pub fn set_mutes(&mut self, who: BareJid, rules: Vec<crate::config::FilterConfig>) {
        if rules.is_empty() {
            self.mutes.remove(&who);
        } else {
            self.mutes.insert(who, rules);
        }
    }

    /// One person's filters.
    pub fn mutes_of(&self, who: &BareJid) -> &[crate::config::FilterConfig] {
        self.mutes.get(who).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Sessions joined under a bare JID (for tests and status).
    pub fn sessions_of(&self, bare: &BareJid) -> Vec<FullJid> {
        self.occupants
            .values()
            .filter(|o| &o.bare == bare)
            .flat_map(|o| o.sessions.keys().cloned())
            .collect()
    }
}
