//! The one place that knows both sides, as a second sans-IO core (like `muc`): [`Bridge::handle`]
//! takes an [`Input`] (a stanza, a store event, a sync result, a finished tracker job, a tick) and the
//! time, and returns [`Action`]s (stanzas to send, store commands, tracker jobs to run, syncs to wake).
//! It owns the MUC core and the bridge's own state (rooms ↔ tracker groups, members, threads → cases,
//! ad-hoc sessions); it has no sockets, no clock, no random source and spawns nothing. The tokio side
//! is [`driver`], which only moves inputs and actions between this core and the shells.

use chrono::{DateTime, Utc};
use xmpp_parsers::{
    jid::{BareJid, FullJid},
    muc::user::Affiliation,
    stanza::Stanza,
};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::activity::Activity;
use crate::config::{Config, FilterConfig, RoomConfig, TrackerConfig};
use crate::http::HookCounters;
use crate::muc::{mam, Effect, Post, RoomInfo, Service};
use crate::store::worker::{MamAnswer, StoreEvent, StoreOp};
use crate::store::InboxRow;
use crate::webhook::{self, activitystreams, Headers, Normalized};
use crate::xmpp::json::element_of_text;
use crate::xmpp::link::LinkState;
use crate::xmpp::wire::Out;

mod adhoc;
pub mod bookmarks;
pub mod cluster;
pub mod directory;
pub mod driver;
pub mod refs;
pub mod search;
pub mod tasks;

/// What the core is told.
#[allow(clippy::large_enum_variant)] // stanzas are the hot path
pub enum Input {
    /// A stanza from the link.
    Stanza(Stanza),
    /// The link was lost and is back.
    Relinked,
    /// The store thread reports.
    Store(StoreEvent),
    /// Deliveries accepted earlier (a crash or stop), handled before anything new.
    Replay(Vec<InboxRow>),
    /// A tracker sync finished.
    Synced(Synced),
    /// A chat command's tracker job finished.
    CommandDone(CommandDone),
    /// The cases a message referred to were read ([`Job::Refer`]).
    Referred(Referred),
    /// An ad-hoc command's tracker job finished.
    AdhocDone(adhoc::AdhocDone),
    /// The links file was written ([`Action::SaveLinks`]), or why not.
    LinksSaved {
        /// Which write.
        ticket: u64,
        /// Written, or the error.
        result: Result<(), String>,
    },
    /// Several instances: the links as the shared store holds them now (another instance, or
    /// this one, changed one).
    LinksLoaded(crate::links::Links),
    /// Several instances: this one leads now (true) or no longer (false). Token refreshes run
    /// on the leader only, so two instances never spend one refresh token twice.
    Leading(bool),
    /// Time passes (once a second): retries that wait.
    Tick,
    /// Several instances: the set of running instances changed, so rooms may have moved.
    Epoch,
    /// Stopping: tell occupants.
    Shutdown,
}

/// What the core asks the driver to do.
#[allow(clippy::large_enum_variant)] // stanzas are the hot path
pub enum Action {
    /// Send a stanza on the link.
    Send(Stanza),
    /// Send one stanza to several sessions (serialised once by the link).
    Broadcast(crate::muc::Broadcast),
    /// Send a stanza that answers its recipient's own join or leave, ahead of queued broadcasts
    /// ([`crate::muc::Effect::Reply`]).
    Reply(Stanza),
    /// [`Action::Reply`] serialised already ([`crate::muc::Effect::ReplyPrepared`]).
    ReplyPrepared(crate::muc::Prepared),
    /// A session left a room: drop what is queued for it from that room
    /// ([`crate::muc::Effect::Departed`]).
    Departed {
        /// The room's bare JID.
        room: BareJid,
        /// The session that left.
        session: FullJid,
    },
    /// Send a stanza serialised already (MAM results around stored messages) to `to`.
    SendRaw {
        /// The recipient (the link keeps each recipient's stanzas on one connection).
        to: xmpp_parsers::jid::Jid,
        /// The stanza.
        bytes: Vec<u8>,
    },
    /// Hand a command to the store thread.
    Store(StoreOp),
    /// Run a tracker call off the loop; its result comes back as an [`Input`].
    Job(Job),
    /// Wake a tracker's sync task now.
    Resync(String),
    /// Replace the links file with these contents, in order with earlier writes; answered with
    /// [`Input::LinksSaved`].
    SaveLinks {
        /// The whole file.
        contents: Vec<u8>,
        /// What changed (where links are rows: PostgreSQL).
        change: crate::links::LinkChange,
        /// Which write.
        ticket: u64,
    },
}

/// A tracker call to run off the loop (the driver applies its time limit).
pub enum Job {
    /// A chat command, answered with [`Input::CommandDone`].
    Command {
        /// Tracker name.
        tracker: String,
        /// The command.
        cmd: crate::commands::ChatCommand,
        /// Who, where, which case.
        ctx: crate::commands::run::Context,
        /// Room it was typed in.
        room: String,
        /// Its sender.
        sender: BareJid,
        /// Answer the sender only.
        private: bool,
    },
    /// The "New case" form's types and priorities.
    Vocabulary {
        /// Tracker name.
        tracker: String,
        /// The room's group.
        group: String,
        /// The group's members (assignee choices).
        members: Vec<crate::tracker::Member>,
        /// Where the form goes.
        to: adhoc::ReplyTo,
    },
    /// The "New case" form submitted.
    Create {
        /// Tracker name.
        tracker: String,
        /// The case to create.
        cmd: crate::commands::ChatCommand,
        /// As whom.
        ctx: crate::commands::run::Context,
        /// Where the answer goes.
        to: adhoc::ReplyTo,
        /// Room to announce it in.
        room: String,
        /// The creator's login.
        login: String,
    },
    /// Read the cases a message referred to, as its sender, to summarise them.
    Refer {
        /// Tracker name.
        tracker: String,
        /// The room it was said in.
        room: String,
        /// The room's group.
        group: String,
        /// Case numbers.
        numbers: Vec<u64>,
        /// As whom.
        actor: crate::tracker::Actor,
        /// Who wrote it (their tracker calls in flight count it).
        sender: BareJid,
        /// The message's thread, if it had one.
        thread: Option<String>,
    },
    /// Start linking in the browser: ask the tracker for a device code (RFC 8628).
    DeviceStart {
        /// Tracker name.
        tracker: String,
        /// The device flow.
        flow: DeviceFlowConfig,
        /// Where the answer goes (the code to enter).
        to: adhoc::ReplyTo,
        /// The person linking.
        jid: BareJid,
    },
    /// Wait for the person to approve the device code, then link.
    DevicePoll {
        /// Tracker name.
        tracker: String,
        /// The device flow.
        flow: DeviceFlowConfig,
        /// The code shown.
        code: crate::tracker::oauth::DeviceCode,
        /// The person linking, told by a chat message.
        jid: BareJid,
        /// The session they asked from.
        tell: xmpp_parsers::jid::Jid,
    },
    /// Refresh an expiring linked token.
    Refresh {
        /// Tracker name.
        tracker: String,
        /// The device flow.
        flow: DeviceFlowConfig,
        /// Whose.
        jid: BareJid,
        /// The refresh token (never logged).
        refresh_token: String,
    },
    /// Whose token is this ("Link my tracker account").
    WhoAmI {
        /// Tracker name.
        tracker: String,
        /// The pasted token (never logged).
        token: String,
        /// Where the answer goes.
        to: adhoc::ReplyTo,
        /// The person linking.
        jid: BareJid,
    },
}

impl Job {
    /// The tracker whose client runs it.
    pub fn tracker(&self) -> &str {
        match self {
            Job::Command { tracker, .. }
            | Job::Vocabulary { tracker, .. }
            | Job::Create { tracker, .. }
            | Job::Refer { tracker, .. }
            | Job::DeviceStart { tracker, .. }
            | Job::DevicePoll { tracker, .. }
            | Job::Refresh { tracker, .. }
            | Job::WhoAmI { tracker, .. } => tracker,
        }
    }

    /// Its kind, as `/metrics` labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Command { .. } => "command",
            Job::Vocabulary { .. } => "vocabulary",
            Job::Create { .. } => "create",
            Job::WhoAmI { .. } => "whoami",
            Job::Refer { .. } => "refer",
            Job::DeviceStart { .. } => "device_start",
            Job::DevicePoll { .. } => "device_poll",
            Job::Refresh { .. } => "refresh",
        }
    }
}

/// A tracker's device flow (RFC 8628): where, and the operator's OAuth application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlowConfig {
    /// Endpoints.
    pub endpoints: crate::tracker::oauth::Endpoints,
    /// OAuth client id.
    pub client_id: String,
    /// Scopes asked for.
    pub scope: String,
}

impl DeviceFlowConfig {
    /// The device flow of a tracker, if it offers one and an OAuth application is configured.
    pub fn of(t: &TrackerConfig) -> Option<DeviceFlowConfig> {
        Some(DeviceFlowConfig {
            endpoints: crate::tracker::oauth::endpoints(t.kind, t.url.as_deref()?)?,
            client_id: t.oauth_client_id.clone()?,
            scope: crate::tracker::oauth::scope(t.kind).to_owned(),
        })
    }
}

/// The cases a message referred to, read from the tracker ([`Job::Refer`]).
pub struct Referred {
    /// Tracker name.
    pub tracker: String,
    /// The room.
    pub room: String,
    /// The room's group.
    pub group: String,
    /// Who wrote the message.
    pub sender: BareJid,
    /// The message's thread, if it had one.
    pub thread: Option<String>,
    /// The cases found (those that could not be read are left out: a mistyped number says nothing).
    pub cases: Vec<crate::tracker::Case>,
}

/// Turn a static `[[room]]` into a room description.
pub fn room_from_config(r: &RoomConfig) -> RoomInfo {
    let mut affiliations = std::collections::BTreeMap::new();
    for (list, aff) in [
        (&r.members, Affiliation::Member),
        (&r.admins, Affiliation::Admin),
        (&r.owners, Affiliation::Owner),
    ] {
        for j in list {
            if let Ok(j) = j.parse::<BareJid>() {
                affiliations.insert(j, aff.clone());
            }
        }
    }
    RoomInfo {
        name: r.name.to_lowercase(),
        title: r.title.clone(),
        description: r.description.clone(),
        anonymous: r.anonymous,
        subject: String::new(),
        affiliations,
    }
}

/// What the bridge needs to turn webhook deliveries into room messages.
#[derive(Default)]
pub struct Hooks {
    /// Trackers by name (shared: a delivery's handling holds its tracker without copying it).
    pub trackers: HashMap<String, Arc<TrackerConfig>>,
    /// Filters by room.
    pub filters: HashMap<String, Vec<FilterConfig>>,
    /// Counters shared with `/healthz`.
    pub counters: Arc<HookCounters>,
    /// Test-only fault injection (`CASEROOM_FAULT=stall-inbox`): accepted deliveries are left pending,
    /// as if the process died between the 202 and the broadcast.
    pub stall_inbox: bool,
}

impl Hooks {
    /// From the config.
    pub fn from_config(cfg: &Config, counters: Arc<HookCounters>) -> Hooks {
        Hooks {
            trackers: cfg
                .trackers
                .iter()
                .map(|t| (t.name.clone(), Arc::new(t.clone())))
                .collect(),
            filters: cfg
                .rooms
                .iter()
                .map(|r| (r.name.to_lowercase(), r.filters.clone()))
                .collect(),
            counters,
            stall_inbox: std::env::var("CASEROOM_FAULT").is_ok_and(|v| v == "stall-inbox"),
        }
    }
}

/// What someone caseroom cannot map to a tracker account is told (privately).
fn unknown_person(tracker: &str, jid: &BareJid) -> String {
    format!(
        "I don't know your {tracker} account, so I can't act as you. Link it yourself: run the room's command \"Link my tracker account\" (ad-hoc commands, in your client's room menu) and paste a personal API token. Or ask an admin to map {jid} to your {tracker} login in [tracker.identity] in caseroom's config."
    )
}

/// A tracker's groups, from a sync run.
pub struct Synced {
    /// Tracker name.
    pub tracker: String,
    /// Its groups, or why the sync failed (rooms then keep their last state).
    pub groups: Result<Vec<crate::tracker::Group>, String>,
    /// With `manage_webhooks`: each group's webhook after the sync looked after it, or why not.
    pub hooks: Vec<(String, Result<crate::tracker::HookReport, String>)>,
}

/// A finished chat command, to answer in the room.
pub struct CommandDone {
    /// Room it was typed in.
    pub room: String,
    /// Tracker name.
    pub tracker: String,
    /// Its sender.
    pub sender: BareJid,
    /// Answer the sender only (reading commands where the room may not see what the sender sees).
    pub private: bool,
    /// The answer.
    pub reply: crate::commands::run::Reply,
}

/// Bounds on what chat commands may cost (see SECURITY.md).
#[derive(Debug, Clone)]
pub struct CommandLimits {
    /// Tracker calls one person may have waiting at once.
    pub per_person: usize,
    /// Tracker calls waiting at once, everyone together.
    pub total: usize,
    /// `!mute` rules one person may keep per room.
    pub max_mutes: usize,
    /// Messages one `!search` answers with.
    pub search_hits: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            per_person: 2,
            total: 16,
            max_mutes: 50,
            search_hits: 10,
        }
    }
}

/// What chat commands need: tracker clients, which room mirrors which group, members, threads.
#[derive(Default)]
pub struct Commands {
    /// Trackers with a REST client (the clients themselves live in the driver).
    pub clients: std::collections::HashSet<String>,
    /// Room → (tracker, group).
    rooms: HashMap<String, (String, String)>,
    /// (tracker, group) → members.
    members: HashMap<(String, String), Vec<crate::tracker::Member>>,
    /// Thread id → case number.
    threads: HashMap<String, u64>,
    /// Cases summarised lately, by room (case references).
    recent_refs: refs::Recent,
    /// Linked tokens being refreshed now, by (tracker, bare JID).
    refreshing: std::collections::HashSet<(String, String)>,
    /// Linked tokens whose refresh failed: not tried again before then.
    refresh_after: HashMap<(String, String), DateTime<Utc>>,
    /// When expiring tokens were last looked for.
    refresh_checked: Option<DateTime<Utc>>,
    /// Several instances, and another one leads: it refreshes the shared tokens, not this one.
    refresh_elsewhere: bool,
    /// (sender, message id, body) of commands already run: the same message twice runs once.
    seen: std::collections::VecDeque<(String, String, String)>,
    /// Trackers with a sync task ("Resync now", membership webhooks wake it).
    pub resync: std::collections::BTreeSet<String>,
    /// Self-service account links (None: not loaded, linking unavailable).
    pub links: Option<crate::links::Links>,
    /// Writes of the links file asked for, so far.
    link_writes: u64,
    /// Link changes waiting for their write, by ticket.
    pending_link_writes: HashMap<u64, adhoc::PendingWrite>,
    /// Bare JIDs allowed to run the service's operator commands.
    pub operators: Vec<BareJid>,
    /// Tracker → when the last sync ended and how.
    last_sync: HashMap<String, String>,
    /// Tracker → what the last sync did to the webhooks it manages, for Status.
    hook_status: HashMap<String, String>,
    /// Open XEP-0050 sessions by id.
    sessions: HashMap<String, adhoc::Session>,
    /// Tracker → the rooms its last successful sync mirrored, with their groups. Kept in the store
    /// (see [`synced_key`]), so a group that disappears while caseroom is down is still noticed at
    /// the next sync, and the rooms keep their owners across restarts.
    pub synced: HashMap<String, std::collections::BTreeMap<String, String>>,
    /// Which source owns each room; routing.
    pub directory: directory::Directory,
    /// Bounds on commands.
    pub limits: CommandLimits,
    /// Tracker calls waiting, by person.
    in_flight: HashMap<BareJid, usize>,
    /// Synced rooms in members' bookmarks (XEP-0356 + XEP-0402).
    pub bookmarks: bookmarks::Bookmarks,
}

impl Commands {
    /// What the last syncs mirrored, as read from the store at start: room ownership survives the
    /// restart, and those rooms take commands at once, not only after the first sync has finished.
    pub fn restore(&mut self, synced: HashMap<String, std::collections::BTreeMap<String, String>>) {
        for (tracker, rooms) in &synced {
            self.directory.restore(tracker, rooms);
            for (room, group) in rooms.iter().filter(|(_, g)| !g.is_empty()) {
                self.rooms
                    .insert(room.clone(), (tracker.clone(), group.clone()));
            }
        }
        self.synced = synced;
    }
}

/// Read a stored [`synced_key`] value: `{"room": "group", …}`, or the older `["room", …]` (groups
/// unknown until the next sync).
pub fn parse_synced(v: &str) -> Option<std::collections::BTreeMap<String, String>> {
    serde_json::from_str(v).ok().or_else(|| {
        serde_json::from_str::<Vec<String>>(v)
            .ok()
            .map(|rooms| rooms.into_iter().map(|r| (r, String::new())).collect())
    })
}

/// The store's meta key holding the rooms a tracker's last sync mirrored (a JSON array).
pub fn synced_key(tracker: &str) -> String {
    format!("synced_rooms:{tracker}")
}

/// Affiliation for a member's roles through the tracker's role map (unlisted roles: member).
pub fn affiliation_for(
    roles: &[String],
    map: &std::collections::BTreeMap<String, crate::config::Grant>,
) -> xmpp_parsers::muc::user::Affiliation {
    use crate::config::Grant;
    use xmpp_parsers::muc::user::Affiliation as A;
    let best = roles
        .iter()
        .map(|r| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(r))
                .map_or(Grant::Member, |(_, g)| *g)
        })
        .max()
        .unwrap_or(Grant::Member);
    match best {
        Grant::Owner => A::Owner,
        Grant::Admin => A::Admin,
        Grant::Member => A::Member,
    }
}

/// The bridge core.
pub struct Bridge {
    service: Service,
    /// Link counters, read for the operators' Status (the link itself is the driver's).
    link_state: Arc<LinkState>,
    hooks: Hooks,
    commands: Commands,
    /// The time of the input being handled.
    now: DateTime<Utc>,
    started: Option<DateTime<Utc>>,
    /// xorshift64* state for ad-hoc session ids (seeded by the caller).
    rng: u64,
    /// When to hand pending inbox rows to the bridge again (after a failed archive append).
    replay_due: Option<DateTime<Utc>>,
    /// Several instances share the store (PostgreSQL): tracker events go to the room's owner
    /// ([`cluster`]) instead of being posted here.
    cluster: bool,
    /// Events relayed here for rooms being read from the store, by room.
    deferred: HashMap<String, Vec<cluster::Ask>>,
    /// Label changes held for a moment, by tracker and case, so that a burst is one message.
    held_labels: std::collections::BTreeMap<(String, String), HeldLabels>,
    /// Actions produced while handling one input.
    out: std::cell::RefCell<Vec<Action>>,
}

/// Relayed events held per room while it is read from the store; beyond, posted at once.
const MAX_DEFERRED: usize = 256;

/// Wait before retrying deliveries whose archive append failed.
const REPLAY_AFTER_SECS: i64 = 5;

/// Cases whose label changes are held at once; beyond, a change is posted at once (a flood of
/// signed label events cannot grow memory without bound).
const MAX_HELD_LABELS: usize = 1000;

/// Where a live occupant message was said: (tracker, group, the tracker's configuration, body).
type SpokenIn = (String, String, Arc<TrackerConfig>, String);

/// A case's label changes waiting to be posted as one message (`label_burst`).
struct HeldLabels {
    /// Post then, unless another change comes first (never later than `latest`).
    due: DateTime<Utc>,
    /// A burst is posted by then at the latest, however long it goes on.
    latest: DateTime<Utc>,
    /// The last change: its labels are the case's labels after the burst.
    activity: Box<Activity>,
    /// The deliveries of the burst, oldest first: the message completes the last one, the others
    /// are closed after it.
    rows: Vec<i64>,
}

/// Why [`driver::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to (shutdown signal).
    Shutdown,
    /// The store thread is gone: nothing can be archived or accepted any more.
    StoreGone,
    /// The link task is gone.
    LinkGone,
}

impl Bridge {
    /// Rooms, and occupants (nicks) in all of them, for `/metrics`.
    pub fn population(&self) -> (usize, usize) {
        let mut rooms = 0;
        let mut occupants = 0;
        for r in self.service.rooms() {
            rooms += 1;
            occupants += r.occupants().count();
        }
        (rooms, occupants)
    }

    /// Assemble. `seed` feeds the ad-hoc session ids (the core has no random source of its own).
    pub fn new(
        service: Service,
        link_state: Arc<LinkState>,
        hooks: Hooks,
        commands: Commands,
        seed: u64,
    ) -> Bridge {
        let mut b = Bridge {
            service,
            link_state,
            hooks,
            commands,
            now: DateTime::<Utc>::UNIX_EPOCH,
            started: None,
            rng: seed | 1,
            replay_due: None,
            held_labels: Default::default(),
            cluster: false,
            deferred: HashMap::new(),
            out: Default::default(),
        };
        // Static rooms mapped from a tracker's projects can run commands too.
        for t in b.hooks.trackers.values() {
            for (project, room) in &t.rooms {
                b.commands
                    .rooms
                    .insert(room.to_lowercase(), (t.name.clone(), project.clone()));
            }
        }
        b
    }

    /// Mirror a tracker's groups as rooms with their members' affiliations.
    fn apply_sync(&mut self, s: Synced) {
        let Some(t) = self.hooks.trackers.get(&s.tracker).cloned() else {
            return;
        };
        if !s.hooks.is_empty() {
            self.commands
                .hook_status
                .insert(t.name.clone(), hook_summary(&s.hooks));
        }
        let groups = match s.groups {
            Ok(g) => {
                self.commands.last_sync.insert(
                    t.name.clone(),
                    format!(
                        "{}: {} groups",
                        self.now.format("%Y-%m-%d %H:%M:%SZ"),
                        g.len()
                    ),
                );
                g
            }
            Err(e) => {
                self.commands.last_sync.insert(
                    t.name.clone(),
                    format!("{}: failed: {e}", self.now.format("%Y-%m-%d %H:%M:%SZ")),
                );
                return;
            }
        };
        let mut mirrored = std::collections::BTreeMap::new();
        for g in groups.into_iter().filter(|g| t.shows_group(&g.id)) {
            if let Some((room, group)) = self.sync_group(&t, g) {
                mirrored.insert(room, group);
            }
        }
        let before = self
            .commands
            .synced
            .insert(t.name.clone(), mirrored.clone())
            .unwrap_or_default();
        for room in before.keys().filter(|r| !mirrored.contains_key(*r)) {
            self.close_vanished(&t.name, room);
        }
        if before != mirrored {
            match serde_json::to_string(&mirrored) {
                Ok(v) => self.to_store(StoreOp::SetMeta(synced_key(&t.name), v)),
                Err(e) => tracing::error!(error = %e, "cannot record the synced rooms"),
            }
        }
    }

    /// Mirror one group: its room (unless another source owns that name), affiliations from its
    /// members' roles, invitations to new members. The (room, group) it mirrored, if any.
    fn sync_group(
        &mut self,
        t: &TrackerConfig,
        g: crate::tracker::Group,
    ) -> Option<(String, String)> {
        // The room the webhooks of this group are routed to: the configured one, else the slug
        // (`acme/web` → `acme-web`: a localpart may not contain '/').
        let explicit = t.rooms.get(&g.id).map(|r| r.to_lowercase());
        let room = explicit.clone().unwrap_or_else(|| directory::slug(&g.id));
        if room.is_empty() {
            return None;
        }
        if let Err(c) = self
            .commands
            .directory
            .claim(&room, &t.name, &g.id, explicit.is_some())
        {
            tracing::warn!(tracker = %t.name, group = %g.id, "refused: {c}");
            return None;
        }
        let mut affiliations = std::collections::BTreeMap::new();
        for m in &g.members {
            let Some(jid) = t
                .identity
                .jid_of(&m.login)
                .and_then(|j| j.parse::<xmpp_parsers::jid::BareJid>().ok())
            else {
                continue;
            };
            affiliations.insert(jid, affiliation_for(&m.roles, &t.roles));
        }
        let info = RoomInfo {
            name: room.clone(),
            title: g.name.clone(),
            description: g.description.clone(),
            anonymous: false,
            subject: String::new(),
            affiliations,
        };
        let before = self
            .service
            .room(&room)
            .map(|r| r.info.affiliations.clone());
        let (effects, added) = self.service.sync_room(info);
        self.perform(effects);
        self.bookmark_room(&room, &added);
        self.announce_change(&room, before);
        self.commands
            .rooms
            .insert(room.clone(), (t.name.clone(), g.id.clone()));
        self.commands
            .members
            .insert((t.name.clone(), g.id.clone()), g.members);
        Some((room, g.id))
    }

    /// A group the tracker no longer lists — deleted, archived, or out of sight of caseroom's key. Its
    /// room and archive stay (persistent room; the group may come back), but every affiliation goes:
    /// present occupants are removed (status 321) and nobody may enter or read the history, since the
    /// tracker no longer says who may see that project. The next sync that lists it again restores them.
    fn close_vanished(&mut self, tracker: &str, room: &str) {
        if let Some((_, group)) = self.commands.rooms.remove(room) {
            self.commands.members.remove(&(tracker.to_owned(), group));
        }
        let Some(info) = self.service.room(room).map(|r| r.info.clone()) else {
            return;
        };
        if info.affiliations.is_empty() {
            return;
        }
        tracing::warn!(
            tracker,
            room,
            "the tracker no longer lists this room's group: its members lose access (the archive is kept)"
        );
        let before = Some(info.affiliations.clone());
        let (effects, _) = self.service.sync_room(RoomInfo {
            affiliations: Default::default(),
            ..info
        });
        self.perform(effects);
        self.bookmark_room(room, &[]);
        self.announce_change(room, before);
    }

    /// Several instances: when a sync changed a room's affiliations, its owner is told to reload
    /// them once they are written (the store answers [`StoreOp::Notify`] after the change).
    fn announce_change(
        &mut self,
        room: &str,
        before: Option<std::collections::BTreeMap<BareJid, xmpp_parsers::muc::user::Affiliation>>,
    ) {
        let after = self.service.room(room).map(|r| &r.info.affiliations);
        if self.cluster && before.as_ref() != after {
            self.to_store(StoreOp::Notify(room.to_owned()));
        }
    }

    /// Bring a room's bookmarks in line with its affiliations (members, admins, owners): added for
    /// members whose server lets caseroom write them, taken back from those who left; `joined`
    /// (just affiliated) on other servers are invited (XEP-0249).
    fn bookmark_room(&mut self, room: &str, joined: &[BareJid]) {
        use xmpp_parsers::muc::user::Affiliation as A;
        let Some(info) = self.service.room(room).map(|r| &r.info) else {
            return;
        };
        let members: std::collections::BTreeSet<BareJid> = info
            .affiliations
            .iter()
            .filter(|(_, a)| matches!(a, A::Owner | A::Admin | A::Member))
            .map(|(j, _)| j.clone())
            .collect();
        let title = if info.title.is_empty() {
            room.to_owned()
        } else {
            info.title.clone()
        };
        let service = self.service.config().domain.clone();
        let plan = self
            .commands
            .bookmarks
            .reconcile(&service, room, &title, &members, joined);
        for iq in plan.iqs {
            self.send(iq.into());
        }
        for jid in plan.invite {
            self.invite(room, &jid, &title);
        }
        if plan.changed {
            let record = self.commands.bookmarks.record(room);
            self.to_store(StoreOp::SetMeta(bookmarks::meta_key(room), record));
        }
    }

    /// Events and retractions relayed while `room` was being read from the store: carried out
    /// now, for its occupants.
    fn post_deferred(&mut self, room: &str) {
        for ask in self.deferred.remove(room).unwrap_or_default() {
            self.carry_out(ask);
        }
    }

    /// Do what another instance asked of this room's owner.
    fn carry_out(&mut self, ask: cluster::Ask) {
        match ask {
            cluster::Ask::Relay(post) => {
                if let Some(e) = self.service.post(post, self.now) {
                    self.perform(vec![e]);
                }
            }
            cluster::Ask::Retract(r) => {
                let effect = self.service.tracker_retraction(
                    &r.room,
                    &r.refers,
                    &r.nick,
                    r.reason,
                    r.completes_inbox,
                    self.now,
                );
                match effect {
                    Some(e) => self.perform(vec![e]),
                    None => {
                        if let Some(id) = r.completes_inbox {
                            self.finish(id, "done", "retracted where rooms remain".into());
                        }
                    }
                }
            }
            cluster::Ask::Reload(room) => self.to_store(StoreOp::LoadRoom(room)),
        }
    }

    /// Another instance's sync changed a room this one serves: apply it (who lost access leaves,
    /// 321). Invitations and bookmarks are that instance's to send.
    fn room_reloaded(&mut self, room: &str, info: Option<RoomInfo>) {
        match info {
            Some(info) => {
                let (effects, _) = self.service.sync_room(info);
                self.perform(effects);
            }
            None => tracing::warn!(%room, "asked to reload a room the store does not have"),
        }
    }

    /// What another instance asks of this room's owner ([`cluster`]); anything else goes on.
    fn cluster_intercept(&mut self, s: Stanza) -> Option<Stanza> {
        let Stanza::Message(m) = &s else {
            return Some(s);
        };
        let Some(ask) = cluster::asked(m, &self.service.config().domain) else {
            return Some(s);
        };
        let room = ask.room().to_owned();
        if matches!(ask, cluster::Ask::Reload(_)) || !self.service.is_cold(&room) {
            self.carry_out(ask);
            return None;
        }
        // This instance has just been given the room: who is in it comes from the store first,
        // or they would not see the event (or the retraction).
        // Through the core, which reads a room once at a time: a member's stanza may have started
        // the read already, and a second read's occupants would be older than the first's.
        let effects = self.service.read_room(&room);
        self.perform(effects);
        let held = self.deferred.get(&room).map_or(0, Vec::len);
        if held < MAX_DEFERRED {
            self.deferred.entry(room).or_default().push(ask);
        } else {
            self.carry_out(ask); // archived at least; MAM has it
        }
        None
    }

    /// The server's privilege advertisement and the answers to our privileged IQs; anything else
    /// goes on. A new grant brings every tracker room's bookmarks in line.
    fn bookmark_intercept(&mut self, s: Stanza) -> Option<Stanza> {
        match &s {
            Stanza::Message(m) => {
                let service = &self.service.config().domain;
                let Some(granted) = self.commands.bookmarks.advertisement(m, service) else {
                    return Some(s);
                };
                if granted {
                    let rooms: Vec<String> = self.commands.rooms.keys().cloned().collect();
                    for room in rooms {
                        self.bookmark_room(&room, &[]);
                    }
                }
                None
            }
            Stanza::Iq(iq) => match self.commands.bookmarks.answer(iq) {
                None => Some(s),
                Some(Some(f)) => {
                    let title = self
                        .service
                        .room(&f.room)
                        .map(|r| r.info.title.clone())
                        .unwrap_or_default();
                    self.invite(&f.room, &f.member, &title);
                    None
                }
                Some(None) => None,
            },
            Stanza::Presence(_) => Some(s),
        }
    }

    /// The case of a thread the map does not know (after a restart): from the newest event of that
    /// thread in the room's recent history, whose JSON payload names the case (`caseroom:case`).
    /// Only caseroom's own posts count (their sender is a bot JID on the component's domain, which
    /// no occupant can have): a member's message in the thread names no case, whatever it carries.
    fn case_in_history(&self, room: &str, thread: &str) -> Option<u64> {
        let r = self.service.room(room)?;
        let ours = &self.service.config().domain;
        let events: Vec<_> = r
            .history()
            .filter(|m| m.is_from_service(ours))
            .filter(|m| m.message.thread.as_ref().is_some_and(|t| t.id == thread))
            .collect();
        events.into_iter().rev().find_map(|m| {
            let json = m
                .message
                .payloads
                .iter()
                .find(|p| p.is("json", crate::xmpp::json::NS))?;
            let v: serde_json::Value = serde_json::from_str(&json.text()).ok()?;
            v.get("caseroom:case")?
                .as_str()?
                .rsplit(['#', '!'])
                .next()?
                .parse()
                .ok()
        })
    }

    /// Who a JID is on a tracker: a self-service link (acting with the person's own token) first,
    /// then the config's explicit map, then the domain rule (acting through the admin key).
    fn actor_for(&self, t: &TrackerConfig, jid: &BareJid) -> Option<crate::tracker::Actor> {
        if let Some(l) = self
            .commands
            .links
            .as_ref()
            .and_then(|l| l.get(&t.name, jid.as_str()))
        {
            return Some(crate::tracker::Actor {
                login: l.login.clone(),
                token: Some(l.token.clone()),
            });
        }
        t.identity
            .login_of(jid.as_str())
            .map(|l| crate::tracker::Actor::login(&l))
    }

    /// XEP-0249 direct invitation to a new member.
    fn invite(&self, room: &str, to: &xmpp_parsers::jid::BareJid, title: &str) {
        let Ok(room_jid) = format!("{room}@{}", self.service.config().domain)
            .parse::<xmpp_parsers::jid::BareJid>()
        else {
            return;
        };
        let mut m =
            xmpp_parsers::message::Message::normal(Some(xmpp_parsers::jid::Jid::from(to.clone())));
        m.from = Some(xmpp_parsers::jid::Jid::from(room_jid.clone()));
        let mut x = minidom::Element::builder("x", "jabber:x:conference").build();
        crate::xmpp::outbound::set(&mut x, "jid", room_jid.to_string());
        crate::xmpp::outbound::set(
            &mut x,
            "reason",
            format!("You are a member of {title} in the tracker"),
        );
        m.payloads.push(x);
        self.send(m.into());
    }

    /// Commands about the room itself, in any room, answered privately: `!mute <filter>`, `!unmute`,
    /// `!filters` (per-person filters) and `!search words` (the room's history). True if handled.
    fn maybe_room_command(&mut self, msg: &crate::muc::ArchivedMessage) -> bool {
        if msg.origin.is_some() {
            return false;
        }
        let tracker = self
            .commands
            .rooms
            .get(&msg.room)
            .and_then(|(t, _)| self.hooks.trackers.get(t))
            .cloned();
        let prefix = tracker
            .as_ref()
            .map(|t| t.command_prefix.clone())
            .unwrap_or_else(|| "!".into());
        let Some(body) = msg.message.bodies.values().next() else {
            return false;
        };
        let Some(rest) = body.trim().strip_prefix(prefix.as_str()) else {
            return false;
        };
        let (word, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let current: Vec<FilterConfig> = self
            .service
            .room(&msg.room)
            .map(|r| r.mutes_of(&msg.sender).to_vec())
            .unwrap_or_default();
        let nick = tracker
            .as_ref()
            .map(|t| t.nick().to_owned())
            .unwrap_or_else(|| "caseroom".into());
        let (rules, text) = match word.to_lowercase().as_str() {
            "search" => {
                self.search_history(msg, args, &nick, &prefix);
                return true;
            }
            "mute" => match crate::filter::parse_mute(args) {
                Ok(_) if current.len() >= self.commands.limits.max_mutes => (
                    None,
                    format!(
                        "could not mute: you already hide {} kinds of events here (at most {}); \
                         see them with !filters, or start again with !unmute",
                        current.len(),
                        self.commands.limits.max_mutes
                    ),
                ),
                Ok(rule) => {
                    let text = format!(
                        "hidden for you in this room from now on: {}",
                        crate::filter::describe(&rule)
                    );
                    let mut rules = current;
                    rules.push(rule);
                    (Some(rules), text)
                }
                Err(e) => (None, format!("could not mute: {e}")),
            },
            "unmute" => (
                Some(vec![]),
                "you see every event in this room again".to_owned(),
            ),
            "filters" => (
                None,
                if current.is_empty() {
                    format!("you see every event in this room; hide some with {prefix}mute, e.g. {prefix}mute ci succeeded")
                } else {
                    format!(
                        "hidden for you: {}",
                        current
                            .iter()
                            .map(crate::filter::describe)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                },
            ),
            _ => return false,
        };
        if let Some(rules) = rules {
            let effects = self.service.set_mutes(&msg.room, &msg.sender, rules);
            self.perform(effects);
        }
        let effects = self
            .service
            .private_to(&msg.room, &nick, &msg.sender, &text);
        self.perform(effects);
        true
    }

    /// `!search words`: the room's history before the question, answered privately once the store's
    /// reader has it ([`StoreEvent::Searched`]); a search counts as a history query.
    fn search_history(
        &mut self,
        msg: &crate::muc::ArchivedMessage,
        args: &str,
        nick: &str,
        prefix: &str,
    ) {
        let words = match crate::muc::mam::fulltext_words(args) {
            Ok(Some(words)) => Ok(words),
            Ok(None) => Err(format!(
                "say what to look for: {prefix}search words (every word must occur)"
            )),
            Err((_, why)) => Err(format!("could not search: {why}")),
        }
        .and_then(|w| {
            self.service
                .may_search(&msg.room, &msg.sender, self.now)
                .map(|()| w)
        });
        match words {
            Ok(words) => {
                let req = search::request(
                    &msg.room,
                    words,
                    &msg.id,
                    self.commands.limits.search_hits,
                    msg.sender.clone(),
                    nick,
                    prefix,
                );
                self.to_store(StoreOp::Search(Box::new(req)));
            }
            Err(text) => {
                let effects = self.service.private_to(&msg.room, nick, &msg.sender, &text);
                self.perform(effects);
            }
        }
    }

    /// The same message twice (a client resending after a reconnect, a server retrying) is the same
    /// sender, id and text. The text is part of it because some clients number their messages per
    /// session, so an id alone comes back on a different message. Checked against the commands run
    /// since start and, for one resent across a restart, the room's recent history. Remembers `msg`.
    fn seen_before(&mut self, msg: &crate::muc::ArchivedMessage, body: &str) -> bool {
        let client_id = msg.message.id.as_ref().map(|i| i.0.clone());
        let key = (
            msg.sender.to_string(),
            client_id.clone().unwrap_or_else(|| msg.id.clone()),
            body.to_owned(),
        );
        let resent = |m: &crate::muc::ArchivedMessage| {
            m.id != msg.id
                && m.sender == msg.sender
                && m.message.id.as_ref().map(|i| &i.0) == client_id.as_ref()
                && m.message.bodies.values().next().map(String::as_str) == Some(body)
        };
        if self.commands.seen.contains(&key)
            || (client_id.is_some()
                && self
                    .service
                    .room(&msg.room)
                    .is_some_and(|r| r.history().any(resent)))
        {
            return true;
        }
        self.commands.seen.push_back(key);
        if self.commands.seen.len() > 1000 {
            self.commands.seen.pop_front();
        }
        false
    }

    /// The case a message is about: from its thread, or from the event it replies to (XEP-0461 §3:
    /// the reply's id is the replied-to message's stanza-id in a groupchat).
    fn case_of(&self, msg: &crate::muc::ArchivedMessage) -> Option<u64> {
        let replied_thread = msg
            .message
            .payloads
            .iter()
            .find(|p| p.is("reply", "urn:xmpp:reply:0"))
            .and_then(|r| r.attr("id"))
            .and_then(|id| {
                self.service
                    .room(&msg.room)?
                    .history()
                    .find(|m| m.id == id)
                    .and_then(|m| m.message.thread.as_ref().map(|t| t.id.clone()))
            });
        msg.message
            .thread
            .as_ref()
            .map(|th| th.id.clone())
            .or(replied_thread)
            .and_then(|th| {
                self.commands
                    .threads
                    .get(&th)
                    .copied()
                    .or_else(|| self.case_in_history(&msg.room, &th))
            })
    }

    /// The tracker, group, tracker config and body of a live occupant message in a tracker room, if
    /// it may be a command: never our own posts, the bot's nick, or delayed (replayed) messages.
    fn command_room(&self, msg: &crate::muc::ArchivedMessage) -> Option<SpokenIn> {
        if msg.origin.is_some() || msg.sender.node().is_none() {
            return None; // our own posts
        }
        let (tracker, group) = self.commands.rooms.get(&msg.room).cloned()?;
        let t = self.hooks.trackers.get(&tracker).cloned()?;
        if msg.nick == t.nick() {
            return None;
        }
        let body = msg.message.bodies.values().next().cloned()?;
        let delayed = msg
            .message
            .payloads
            .iter()
            .any(|p| p.is("delay", "urn:xmpp:delay"));
        (!delayed).then_some((tracker, group, t, body))
    }

    /// Why a command may not run now, if so. Bounded: a person's (and everyone's) tracker calls
    /// waiting at once. Each command is several calls made with the admin key on the person's behalf;
    /// a flood must not queue them up.
    fn busy(&self, msg: &crate::muc::ArchivedMessage, tracker: &str) -> Option<String> {
        let mine = self
            .commands
            .in_flight
            .get(&msg.sender)
            .copied()
            .unwrap_or(0);
        let total: usize = self.commands.in_flight.values().sum();
        if mine >= self.commands.limits.per_person {
            Some(format!(
                "{}: you have {mine} commands waiting for {tracker} already; this one was not run. Send it again once they are answered.",
                msg.nick
            ))
        } else if total >= self.commands.limits.total {
            Some(format!(
                "{}: caseroom is waiting for {total} answers from the trackers; this command was not run. Send it again in a minute.",
                msg.nick
            ))
        } else {
            None
        }
    }

    /// A live groupchat message from an occupant of a tracker room (`room`, from
    /// [`Bridge::command_room`]): run it if it is a chat command. The room back if it was none.
    fn maybe_command(
        &mut self,
        msg: &crate::muc::ArchivedMessage,
        room: SpokenIn,
    ) -> Option<SpokenIn> {
        let parsed = match crate::commands::parse(&room.2.command_prefix, &room.3) {
            Some(p) => p,
            // "!!!" or "! hi" is punctuation, not a command, and not a reference either.
            None if room.3.trim_start().starts_with(&room.2.command_prefix) => return None,
            None => return Some(room),
        };
        let (tracker, group, t, body) = room;
        if !self.seen_before(msg, &body) {
            self.chat_command(msg, tracker, group, &t, parsed);
        }
        None
    }

    /// Run a parsed chat command (or say why not).
    fn chat_command(
        &mut self,
        msg: &crate::muc::ArchivedMessage,
        tracker: String,
        group: String,
        t: &TrackerConfig,
        parsed: Result<crate::commands::ChatCommand, crate::commands::ParseError>,
    ) {
        let thread_case = self.case_of(msg);
        let reply_to = |text: String| crate::commands::run::Reply {
            text,
            case: thread_case,
        };
        let cmd = match parsed {
            Ok(c) => c,
            Err(e) => {
                return self.answer(
                    &msg.room,
                    &tracker,
                    reply_to(format!("{}: {}\nusage: {}", msg.nick, e.message, e.usage)),
                );
            }
        };
        let Some(actor) = self.actor_for(t, &msg.sender) else {
            // Only the person concerned needs to read this: a private message, not a room message.
            let text = unknown_person(&tracker, &msg.sender);
            let effects = self
                .service
                .private_to(&msg.room, t.nick(), &msg.sender, &text);
            return self.perform(effects);
        };
        if !self.commands.clients.contains(&tracker) {
            return self.answer(
                &msg.room,
                &tracker,
                reply_to(format!(
                    "{}: commands need [[tracker]] url and api_key for {tracker}",
                    msg.nick
                )),
            );
        }
        let ctx = crate::commands::run::Context {
            actor,
            nick: msg.nick.clone(),
            group: group.clone(),
            members: self
                .commands
                .members
                .get(&(tracker.clone(), group))
                .cloned()
                .unwrap_or_default(),
            thread_case,
            prefix: t.command_prefix.clone(),
        };
        if let Some(text) = self.busy(msg, &tracker) {
            let effects = self
                .service
                .private_to(&msg.room, t.nick(), &msg.sender, &text);
            return self.perform(effects);
        }
        *self
            .commands
            .in_flight
            .entry(msg.sender.clone())
            .or_default() += 1;
        let sender = msg.sender.clone();
        let private = self.answers_privately(&cmd, &tracker, &msg.room);
        // Off the read loop (the driver runs it, with a time limit): the room goes on.
        tracing::debug!(room = %msg.room, sender = %msg.sender, private, "running a chat command");
        self.emit(Action::Job(Job::Command {
            tracker,
            cmd,
            ctx,
            room: msg.room.clone(),
            sender,
            private,
        }));
    }

    /// Case references in a live message of a tracker room whose members all see the project's
    /// cases: read them as the sender, then summarise them ([`Bridge::referred`]).
    fn maybe_references(&mut self, msg: &crate::muc::ArchivedMessage, room: SpokenIn) {
        let (tracker, group, t, body) = room;
        if t.references == 0
            || !self.every_member_sees_cases(&tracker, &msg.room)
            || !self.commands.clients.contains(&tracker)
        {
            return;
        }
        let numbers = refs::referenced(&body, &case_url_prefixes(&t, &group), t.references);
        if numbers.is_empty() || self.busy(msg, &tracker).is_some() {
            return;
        }
        let Some(actor) = self.actor_for(&t, &msg.sender) else {
            return;
        };
        let quiet = chrono::Duration::from_std(t.reference_quiet)
            .unwrap_or_else(|_| chrono::Duration::minutes(30));
        let numbers = self
            .commands
            .recent_refs
            .take(&msg.room, numbers, self.now, quiet);
        if numbers.is_empty() {
            return;
        }
        // Counted like a command's calls: a flood of references waits for the tracker too.
        *self
            .commands
            .in_flight
            .entry(msg.sender.clone())
            .or_default() += 1;
        self.emit(Action::Job(Job::Refer {
            tracker,
            room: msg.room.clone(),
            group,
            numbers,
            actor,
            sender: msg.sender.clone(),
            thread: msg.message.thread.as_ref().map(|th| th.id.clone()),
        }));
    }

    /// Summarise the cases a message referred to, in its thread (else the case's), in one message.
    fn referred(&mut self, r: Referred) {
        self.call_answered(&r.sender);
        let shown: Vec<&crate::tracker::Case> = r.cases.iter().filter(|c| !c.private).collect();
        let (Some(first), Some(t)) = (shown.first(), self.hooks.trackers.get(&r.tracker).cloned())
        else {
            return;
        };
        let thread = r.thread.clone().or_else(|| {
            (shown.len() == 1).then(|| {
                crate::render::thread_id(&r.tracker, &format!("{}#{}", r.group, first.number))
            })
        });
        let post = Post {
            room: r.room.clone(),
            nick: t.nick().to_owned(),
            body: shown
                .iter()
                .map(|c| crate::commands::run::line(c))
                .collect::<Vec<_>>()
                .join("\n"),
            payloads: vec![],
            thread,
            origin: None,
            completes_inbox: None,
        };
        if let Some(e) = self.service.post(post, self.now) {
            self.perform(vec![e]);
        }
    }

    /// Does every member of `room` see every non-private case of its group? Only for a room synced
    /// from a Gitea, Forgejo or GitLab project, whose members all read its issues. Redmine roles may
    /// be limited to their own issues, and a static room's members are not the project's.
    fn every_member_sees_cases(&self, tracker: &str, room: &str) -> bool {
        use crate::webhook::TrackerKind as K;
        let synced = self
            .commands
            .synced
            .get(tracker)
            .is_some_and(|rooms| rooms.contains_key(room));
        let uniform = self
            .hooks
            .trackers
            .get(tracker)
            .is_some_and(|t| matches!(t.kind, K::Gitea | K::Forgejo | K::Gitlab | K::Github));
        synced && uniform
    }

    /// Is a command's answer for the speaker only? Reading commands (`!show`, `!find`, `!mine`) answer
    /// with what the *speaker* may see, which the room may not: they are posted in the room only when
    /// every member of it may see every non-private case of its group — a room synced from a Gitea,
    /// Forgejo or GitLab project, whose members all read its issues (private and confidential cases
    /// are shown by number and link only anyway). Redmine roles may be limited to their own issues,
    /// and a static room's members are not the project's: there the answer goes to the speaker alone.
    fn answers_privately(
        &self,
        cmd: &crate::commands::ChatCommand,
        tracker: &str,
        room: &str,
    ) -> bool {
        use crate::commands::ChatCommand as C;
        if !matches!(cmd, C::Show { .. } | C::Find { .. } | C::Mine) {
            return false;
        }
        !self.every_member_sees_cases(tracker, room)
    }

    /// Post a command's answer in the room, threaded with its case.
    fn answer(&mut self, room: &str, tracker: &str, reply: crate::commands::run::Reply) {
        let Some(t) = self.hooks.trackers.get(tracker).cloned() else {
            return;
        };
        let group = self
            .commands
            .rooms
            .get(room)
            .map(|(_, g)| g.clone())
            .unwrap_or_default();
        let thread = reply
            .case
            .map(|n| crate::render::thread_id(tracker, &format!("{group}#{n}")));
        if let (Some(th), Some(n)) = (&thread, reply.case) {
            self.commands.threads.insert(th.clone(), n);
        }
        let post = Post {
            room: room.to_owned(),
            nick: t.nick().to_owned(),
            body: reply.text,
            payloads: vec![],
            thread,
            origin: None,
            completes_inbox: None,
        };
        if let Some(e) = self.service.post(post, self.now) {
            self.perform(vec![e]);
        }
    }

    fn finish(&self, id: i64, state: &'static str, note: String) {
        tracing::debug!(id, state, %note, "webhook delivery closed without a room message");
        self.to_store(StoreOp::FinishInbox { id, state, note });
    }

    /// Rooms (existing) and persons an activity goes to.
    fn route(&self, t: &TrackerConfig, a: &Activity) -> (Vec<String>, Vec<String>) {
        let audience: Vec<&String> = a.to.iter().chain(a.cc.iter()).collect();
        let persons: Vec<String> = audience
            .iter()
            .filter_map(|e| activitystreams::person_jid(e))
            .collect();
        let groups: Vec<String> = if audience.is_empty() {
            vec![a.project.clone()]
        } else {
            audience
                .iter()
                .filter(|e| !activitystreams::is_person(e))
                .map(|e| e.to_string())
                .collect()
        };
        // `include` / `exclude`: a group left out has no events posted either.
        let groups: Vec<String> = groups.into_iter().filter(|g| t.shows_group(g)).collect();
        let sender = if t.allow_unsigned {
            directory::Sender::Unsigned
        } else {
            directory::Sender::Signed
        };
        let open_audience = t.kind == crate::webhook::TrackerKind::Activitystreams;
        let mut rooms: Vec<String> = Vec::new();
        for g in groups {
            let routed =
                self.commands
                    .directory
                    .route(&t.name, sender, open_audience, &t.rooms, &g, |r| {
                        self.service.has_room(r)
                    });
            if let Some(r) = routed {
                if !rooms.contains(&r) {
                    rooms.push(r);
                }
            }
        }
        (rooms, persons)
    }

    /// Turn one accepted delivery into room messages (or close it with a reason).
    fn deliver(&mut self, row: InboxRow) {
        let id = row.id;
        let Some(t) = self.hooks.trackers.get(&row.item.tracker).cloned() else {
            return self.finish(
                id,
                "failed",
                format!("tracker {:?} is no longer configured", row.item.tracker),
            );
        };
        let headers = Headers(row.item.headers);
        // The receiver's parse when it came over HTTP just now; else (a replay, the poller) the body's.
        let parsed = match row.item.doc {
            Some(doc) => Ok(doc),
            None => webhook::parse_body(row.item.content_type.as_deref(), &row.item.body),
        };
        let doc = match parsed {
            Ok(d) => d,
            Err(e) => {
                self.hooks.counters.labelled.event(&t.name, "failed");
                return self.finish(id, "failed", e.to_string());
            }
        };
        if webhook::changes_membership(t.kind, &headers, &doc) {
            // Someone joined or left a project: sync now rather than at the next interval.
            if self.commands.resync.contains(&t.name) {
                tracing::info!(tracker = %t.name, "membership webhook: syncing groups and members now");
                self.emit(Action::Resync(t.name.clone()));
            }
        }
        let Some(a) = self.activity_of(id, &t, &headers, &doc) else {
            return;
        };
        if let Some(case) = a.case.clone() {
            let key = (t.name.clone(), case);
            let room_to_hold =
                self.held_labels.len() < MAX_HELD_LABELS || self.held_labels.contains_key(&key);
            if a.verb == crate::activity::Verb::Labeled && !t.label_burst.is_zero() && room_to_hold
            {
                return self.hold_labels(key, id, &t, a);
            }
            // Anything else about the case comes after its held label changes.
            self.flush_labels(&key);
        }
        self.publish(id, t, a);
    }

    /// Hold a label change of a case until `label_burst` passes without another.
    fn hold_labels(&mut self, key: (String, String), id: i64, t: &TrackerConfig, a: Box<Activity>) {
        let window = chrono::Duration::from_std(t.label_burst)
            .unwrap_or_else(|_| chrono::Duration::seconds(5));
        let now = self.now;
        let held = self.held_labels.entry(key).or_insert_with(|| HeldLabels {
            due: now,
            latest: now + window * 4,
            activity: a.clone(),
            rows: vec![],
        });
        held.due = (now + window).min(held.latest);
        held.activity = a;
        if !held.rows.contains(&id) {
            held.rows.push(id);
        }
    }

    /// Post a case's held label changes as one message, if any.
    fn flush_labels(&mut self, key: &(String, String)) {
        let Some(held) = self.held_labels.remove(key) else {
            return;
        };
        let Some(t) = self.hooks.trackers.get(&key.0).cloned() else {
            return;
        };
        let Some((&last, earlier)) = held.rows.split_last() else {
            return;
        };
        self.publish(last, t, held.activity);
        // After the message's commit (the store runs its work in order). A crash in between leaves
        // these pending: posted again after the restart, never lost.
        for &id in earlier {
            self.finish(
                id,
                "done",
                format!("one message with delivery {last}'s labels"),
            );
        }
    }

    /// Post the label bursts whose time has come.
    fn flush_due_labels(&mut self) {
        let due: Vec<(String, String)> = self
            .held_labels
            .iter()
            .filter(|(_, h)| h.due <= self.now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.flush_labels(&key);
        }
    }

    /// Post an activity in the rooms it routes to (or retract, or close the delivery with a reason).
    fn publish(&mut self, id: i64, t: Arc<TrackerConfig>, a: Box<Activity>) {
        let counters = self.hooks.counters.clone();
        let rendered = crate::render::render(&t.name, &a);
        // Remember thread → case number, so commands typed in the thread know their case.
        if let (Some(th), Some(num)) = (
            &rendered.thread,
            a.case
                .as_deref()
                .and_then(|c| c.rsplit(['#', '!']).next())
                .and_then(|n| n.parse::<u64>().ok()),
        ) {
            self.commands.threads.insert(th.clone(), num);
        }
        let (rooms, persons) = self.route(&t, &a);
        if let Some(url) = retracts(&a) {
            // A comment deleted in the tracker: its messages are retracted, not a new one posted
            // (its text may be why it was deleted). Room filters do not apply: they choose what is
            // posted, not what is taken back.
            return self.retract(id, &t, &a, url, rooms);
        }
        for p in &persons {
            self.direct_message(p, &rendered);
        }
        let rooms: Vec<String> = rooms
            .into_iter()
            .filter(|r| {
                crate::filter::allows(
                    self.hooks.filters.get(r).map(Vec::as_slice).unwrap_or(&[]),
                    &t.name,
                    &a,
                )
            })
            .collect();
        if rooms.is_empty() {
            counters.ignored.fetch_add(1, Ordering::Relaxed);
            let outcome = if persons.is_empty() {
                "ignored"
            } else {
                "direct"
            };
            counters.labelled.event(&t.name, outcome);
            let (state, why) = if persons.is_empty() {
                (
                    "ignored",
                    format!("no room shows {} (no mapping, or filtered)", a.project),
                )
            } else {
                ("done", "sent to persons only".to_owned())
            };
            return self.finish(id, state, why);
        }
        let now = self.now;
        let last = rooms.len() - 1;
        // With several instances, every room's message names them all (`muc::Completes`).
        let all = if self.cluster && rooms.len() > 1 {
            rooms.clone()
        } else {
            Vec::new()
        };
        counters.labelled.event(&t.name, "posted");
        for (i, room) in rooms.into_iter().enumerate() {
            let (body, references) = self.with_mentions(&t, &a, &room, &rendered.body);
            let mut payloads: Vec<minidom::Element> = vec![element_of_text(rendered.json.clone())];
            payloads.extend(references);
            let post = Post {
                origin: Some(crate::muc::inbox_origin(id, &room)),
                room,
                nick: t.nick().to_owned(),
                body,
                payloads,
                thread: rendered.thread.clone(),
                // The inbox row is done with its last room message, in the same transaction;
                // with several instances, with whichever room's message is archived last.
                completes_inbox: if !all.is_empty() {
                    Some(crate::muc::Completes {
                        inbox: id,
                        rooms: all.clone(),
                    })
                } else {
                    (i == last).then_some(crate::muc::Completes::one(id))
                },
            };
            if self.cluster {
                // The room's owner posts it: it knows the occupants ([`cluster`]).
                if let Some(m) = cluster::relay(&self.service.config().domain, &post) {
                    counters.posted.fetch_add(1, Ordering::Relaxed);
                    self.send(m.into());
                }
            } else if let Some(effect) = self.service.post(post, now) {
                counters.posted.fetch_add(1, Ordering::Relaxed);
                self.perform(vec![effect]);
            }
        }
    }

    /// Name an event's reviewers so that their clients highlight it: a reviewer present in `room` is
    /// named by their nick there (clients highlight their own nick), and each reviewer whose JID is
    /// known gets an XEP-0372 mention reference (`begin`/`end`: code points, end exclusive).
    fn with_mentions(
        &self,
        t: &TrackerConfig,
        a: &Activity,
        room: &str,
        body: &str,
    ) -> (String, Vec<minidom::Element>) {
        let segment = format!(" from {}", a.reviewers.join(", "));
        let (Some(start), Some(r)) = (
            (!a.reviewers.is_empty())
                .then(|| body.find(&segment))
                .flatten(),
            self.service.room(room),
        ) else {
            return (body.to_owned(), vec![]);
        };
        let mut named = String::from(" from ");
        let mut references = vec![];
        let before = body[..start].chars().count();
        for (i, login) in a.reviewers.iter().enumerate() {
            if i > 0 {
                named.push_str(", ");
            }
            let jid = t
                .identity
                .jid_of(login)
                .and_then(|j| j.parse::<xmpp_parsers::jid::BareJid>().ok());
            let shown = jid
                .as_ref()
                .and_then(|j| r.occupants().find(|o| &o.bare == j))
                .map_or_else(|| login.clone(), |o| o.nick.clone());
            let begin = before + named.chars().count();
            named.push_str(&shown);
            if let Some(jid) = jid {
                references.push(
                    minidom::Element::builder("reference", "urn:xmpp:reference:0")
                        .attr(crate::xmpp::outbound::name("type"), "mention")
                        .attr(crate::xmpp::outbound::name("uri"), format!("xmpp:{jid}"))
                        .attr(crate::xmpp::outbound::name("begin"), begin.to_string())
                        .attr(
                            crate::xmpp::outbound::name("end"),
                            (begin + shown.chars().count()).to_string(),
                        )
                        .build(),
                );
            }
        }
        let mut out = body.to_owned();
        out.replace_range(start..start + segment.len(), &named);
        (out, references)
    }

    /// Retract, in each of `rooms`, the messages that showed the deleted comment `url`; the last
    /// room's retraction completes the delivery (in the store's transaction).
    fn retract(
        &mut self,
        id: i64,
        t: &TrackerConfig,
        a: &Activity,
        url: String,
        rooms: Vec<String>,
    ) {
        self.hooks.counters.labelled.event(&t.name, "retracted");
        let reason = format!("the comment was deleted in {} by {}", t.name, a.actor.name);
        if self.cluster {
            // Each room's owner retracts: it knows the occupants to announce it to ([`cluster`]).
            let rooms: Vec<String> = rooms
                .into_iter()
                .filter(|r| self.service.has_room(r))
                .collect();
            if rooms.is_empty() {
                return self.finish(id, "ignored", format!("no room shows {}", a.project));
            }
            let domain = self.service.config().domain.clone();
            for (i, room) in rooms.iter().enumerate() {
                let r = cluster::Retraction {
                    room: room.clone(),
                    refers: url.clone(),
                    nick: t.nick().to_owned(),
                    reason: reason.clone(),
                    completes_inbox: (i + 1 == rooms.len()).then_some(id),
                };
                if let Some(m) = cluster::retract(&domain, &r) {
                    self.send(m.into());
                }
            }
            return;
        }
        let effects: Vec<Effect> = rooms
            .iter()
            .enumerate()
            .filter_map(|(i, room)| {
                self.service.tracker_retraction(
                    room,
                    &url,
                    t.nick(),
                    reason.clone(),
                    (i + 1 == rooms.len()).then_some(id),
                    self.now,
                )
            })
            .collect();
        if effects.is_empty() {
            return self.finish(id, "ignored", format!("no room shows {}", a.project));
        }
        if effects.len() < rooms.len() {
            // The last room vanished between routing and now: close the delivery after the others.
            self.finish(id, "done", "retracted where rooms remain".into());
        }
        self.perform(effects);
    }

    /// The activity a delivery describes, if it is one to post; otherwise the inbox row is closed
    /// with the reason (a ping, an event caseroom does not know, a malformed one, a private one).
    fn activity_of(
        &mut self,
        id: i64,
        t: &TrackerConfig,
        headers: &Headers,
        doc: &serde_json::Value,
    ) -> Option<Box<Activity>> {
        let counters = self.hooks.counters.clone();
        let a = match webhook::normalize(t.kind, headers, doc) {
            Ok(Normalized::Activity(a)) => a,
            Ok(Normalized::Ping) => {
                counters.labelled.event(&t.name, "ping");
                self.finish(id, "ignored", "ping".into());
                return None;
            }
            Ok(Normalized::Unknown(ev)) => {
                counters.unknown.fetch_add(1, Ordering::Relaxed);
                counters.labelled.event(&t.name, "unknown");
                tracing::info!(tracker = %t.name, event = %ev, "recorded an event caseroom does not post");
                self.finish(id, "unknown", ev);
                return None;
            }
            Err(e) => {
                counters.labelled.event(&t.name, "failed");
                tracing::warn!(tracker = %t.name, error = %e, "could not understand a delivery");
                self.finish(id, "failed", e.to_string());
                return None;
            }
        };
        if a.private {
            // Private issues, private notes, confidential issues: never in a room.
            counters.ignored.fetch_add(1, Ordering::Relaxed);
            counters.labelled.event(&t.name, "private");
            self.finish(id, "ignored", "private".into());
            return None;
        }
        Some(a)
    }

    /// An event addressed to a person (AS2 `to`): a direct chat message from the service.
    fn direct_message(&self, to: &str, r: &crate::render::Rendered) {
        let Ok(to) = to.parse::<xmpp_parsers::jid::Jid>() else {
            return;
        };
        let mut m = xmpp_parsers::message::Message::chat(Some(to));
        m.from = Some(self.service.domain_jid());
        m.bodies.insert(Default::default(), r.body.clone());
        m.payloads.push(element_of_text(r.json.clone()));
        if let Some(t) = &r.thread {
            m.thread = Some(xmpp_parsers::message::Thread {
                parent: None,
                id: t.clone(),
            });
        }
        self.send(m.into());
    }

    fn emit(&self, a: Action) {
        self.out.borrow_mut().push(a);
    }

    fn send(&self, s: Stanza) {
        self.emit(Action::Send(s));
    }

    fn to_store(&self, cmd: StoreOp) {
        self.emit(Action::Store(cmd));
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(s) => self.send(s),
                Effect::Broadcast(b) => self.emit(Action::Broadcast(b)),
                Effect::Reply(s) => self.emit(Action::Reply(s)),
                Effect::ReplyPrepared(p) => self.emit(Action::ReplyPrepared(p)),
                Effect::Departed { room, session } => self.emit(Action::Departed { room, session }),
                // Serialised and read for search here, off the store's serial thread.
                Effect::Archive(m) => {
                    self.to_store(StoreOp::Append(crate::store::Appended::prepared(m)))
                }
                Effect::Persist(p) => self.to_store(StoreOp::Persist(p)),
                Effect::Mam(req) => self.to_store(StoreOp::Query(req)),
                Effect::LoadHistory(room) => self.to_store(StoreOp::History(room)),
                Effect::Moderate(m) => self.to_store(StoreOp::Moderate(m)),
            }
        }
    }

    fn on_store(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Inbox(rows) => {
                tracing::trace!(count = rows.len(), "deliveries to post");
                if self.hooks.stall_inbox {
                    tracing::warn!(
                        count = rows.len(),
                        "CASEROOM_FAULT=stall-inbox: leaving deliveries pending"
                    );
                    return;
                }
                for row in rows {
                    self.deliver(row);
                }
            }
            StoreEvent::Archived(batch) => {
                tracing::trace!(count = batch.len(), "archived; broadcasting");
                for m in &batch {
                    if self.maybe_room_command(m) {
                        continue;
                    }
                    // Looked up once per message: it clones the tracker's configuration.
                    if let Some(room) = self.command_room(m).and_then(|r| self.maybe_command(m, r))
                    {
                        self.maybe_references(m, room);
                    }
                }
                for m in batch {
                    let effects = self.service.archived(m);
                    self.perform(effects);
                }
            }
            StoreEvent::ArchiveFailed(batch, reason) => {
                tracing::error!(count = batch.len(), %reason, "messages not archived, so not broadcast");
                for m in &batch {
                    let effects = self.service.not_archived(m, &reason);
                    self.perform(effects);
                }
                if batch.iter().any(|m| m.completes_inbox.is_some()) {
                    // The deliveries stay pending in the inbox: try them again shortly.
                    self.replay_due = Some(self.now + chrono::Duration::seconds(REPLAY_AFTER_SECS));
                }
            }
            StoreEvent::History(room, read) => {
                let stored = read.unwrap_or_else(|e| {
                    // The room goes on without its older history rather than not at all.
                    tracing::error!(%room, error = %e, "could not read a room's history");
                    vec![]
                });
                let effects = self.service.history_read(&room, stored);
                self.perform(effects);
                self.post_deferred(&room);
            }
            StoreEvent::Sessions(room, rows) => self.service.restore_sessions(&room, rows),
            StoreEvent::Searched(done) => {
                let (req, page) = *done;
                let (text, payload) = search::answer(&req, page, self.commands.limits.search_hits);
                let effects = self.service.private_with(
                    &req.query.room,
                    &req.answer_as,
                    &req.asker,
                    &text,
                    payload,
                );
                self.perform(effects);
            }
            StoreEvent::Moderated(done) => {
                let (m, result) = *done;
                if result.is_err() && m.completes_inbox.is_some() {
                    // The tracker's deletion stays pending in the inbox: try it again shortly.
                    self.replay_due = Some(self.now + chrono::Duration::seconds(REPLAY_AFTER_SECS));
                }
                let effects = self.service.moderated(m, result);
                self.perform(effects);
            }
            StoreEvent::RoomLoaded(room, info) => self.room_reloaded(&room, info),
            StoreEvent::Notified(room) => {
                if let Some(m) = cluster::reload(&self.service.config().domain, &room) {
                    self.send(m.into());
                }
            }
            StoreEvent::Pruned(rooms) => {
                for (room, before) in rooms {
                    if let Some(before) = DateTime::<Utc>::from_timestamp_micros(before) {
                        self.service.forget_before(&room, before);
                    }
                }
            }
            StoreEvent::Mam(answer) => self.mam_answer(*answer),
        }
    }

    /// A MAM page read: its results, then the final answer, all to the querier.
    fn mam_answer(&mut self, (req, page, _took): MamAnswer) {
        for out in mam::results(&req, page) {
            match out {
                Out::Stanza(s) => self.send(s),
                Out::Raw(bytes) => self.emit(Action::SendRaw {
                    to: req.requester.clone(),
                    bytes,
                }),
            }
        }
    }

    /// Handle one input at time `now`; the actions to perform, in order.
    pub fn handle(&mut self, input: Input, now: DateTime<Utc>) -> Vec<Action> {
        self.now = now;
        self.started.get_or_insert(now);
        match input {
            Input::Stanza(s) => {
                if let Some(s) = self
                    .cluster_intercept(s)
                    .and_then(|s| self.bookmark_intercept(s))
                    .and_then(|s| self.adhoc_intercept(s))
                {
                    let effects = self.service.handle(s, now);
                    self.perform(effects);
                }
            }
            Input::Relinked => {
                self.commands.bookmarks.relinked();
                // Everyone left while the link was down, as far as anyone can know: tell them
                // (332, so clients rejoin) and forget them, so a rejoin is a join.
                let effects = self.service.link_lost();
                tracing::info!(sessions = effects.len(), "relinked: occupants must rejoin");
                self.perform(effects);
            }
            Input::Store(ev) => self.on_store(ev),
            Input::Replay(rows) => self.on_store(StoreEvent::Inbox(rows)),
            Input::Synced(s) => {
                let outcome = if s.groups.is_ok() { "ok" } else { "failed" };
                self.hooks.counters.labelled.sync(&s.tracker, outcome);
                self.apply_sync(s)
            }
            Input::CommandDone(d) => self.command_done(d),
            Input::Referred(r) => self.referred(r),
            Input::AdhocDone(d) => self.adhoc_done(d),
            Input::LinksSaved { ticket, result } => self.links_saved(ticket, result),
            Input::LinksLoaded(links) => {
                if self.commands.links.is_some() {
                    self.commands.links = Some(links);
                }
            }
            Input::Leading(on) => self.commands.refresh_elsewhere = !on,
            Input::Tick => {
                let effects = self.service.tick(now);
                self.perform(effects);
                self.flush_due_labels();
                if self
                    .commands
                    .refresh_checked
                    .is_none_or(|t| now - t >= chrono::Duration::seconds(60))
                {
                    self.commands.refresh_checked = Some(now);
                    if !self.commands.refresh_elsewhere {
                        self.refresh_expiring();
                    }
                }
                if self.replay_due.is_some_and(|t| t <= now) {
                    self.replay_due = None;
                    self.to_store(StoreOp::ReplayPending);
                }
            }
            Input::Epoch => {
                if self.cluster {
                    tracing::info!("the running instances changed: rooms are read again from the store when next used; deliveries still pending are relayed again");
                    self.service.go_cold();
                    // What this instance relayed to an owner that has just died went with it.
                    self.to_store(StoreOp::ReplayOwn);
                }
            }
            Input::Shutdown => {
                let effects = self.service.shutdown();
                self.perform(effects);
            }
        }
        self.out.take()
    }

    /// Several instances share the store: tracker events are relayed to each room's owner, and a
    /// sync's changes to a room are announced to it ([`cluster`]).
    pub fn set_cluster(&mut self, on: bool) {
        self.cluster = on;
    }

    /// One of `sender`'s tracker calls was answered.
    fn call_answered(&mut self, sender: &BareJid) {
        if let Some(n) = self.commands.in_flight.get_mut(sender) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.commands.in_flight.remove(sender);
            }
        }
    }

    fn command_done(&mut self, d: CommandDone) {
        tracing::debug!(room = %d.room, sender = %d.sender, private = d.private, "chat command answered");
        self.call_answered(&d.sender);
        if d.private {
            let nick = self
                .hooks
                .trackers
                .get(&d.tracker)
                .map(|t| t.nick().to_owned())
                .unwrap_or_default();
            let effects = self
                .service
                .private_to(&d.room, &nick, &d.sender, &d.reply.text);
            self.perform(effects);
        } else {
            self.answer(&d.room, &d.tracker, d.reply)
        }
    }

    /// The next pseudo-random 64 bits (xorshift64*), for ad-hoc session ids.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One line for Status: how many webhooks were fine, created, repaired, and which fail and why.
fn hook_summary(hooks: &[(String, Result<crate::tracker::HookReport, String>)]) -> String {
    use crate::tracker::HookAction as A;
    let count = |a: A| {
        hooks
            .iter()
            .filter(|(_, r)| r.as_ref().is_ok_and(|r| r.action == a))
            .count()
    };
    let mut line = format!(
        "{} fine, {} created, {} repaired",
        count(A::Unchanged),
        count(A::Created),
        count(A::Repaired)
    );
    let trouble: Vec<String> = hooks
        .iter()
        .filter_map(|(g, r)| match r {
            Ok(r) => r
                .failing
                .as_ref()
                .map(|f| format!("{g}: last delivery failed ({f})")),
            Err(e) => Some(format!("{g}: not managed ({e})")),
        })
        .collect();
    if !trouble.is_empty() {
        line.push_str("; ");
        line.push_str(&trouble.join("; "));
    }
    line
}

/// How links to a group's cases start, per tracker kind (a case reference may be such a link).
/// GitLab merge requests are numbered apart from issues: only issue links count there.
fn case_url_prefixes(t: &TrackerConfig, group: &str) -> Vec<String> {
    use crate::webhook::TrackerKind as K;
    let Some(url) = t.url.as_deref().map(|u| u.trim_end_matches('/')) else {
        return vec![];
    };
    match t.kind {
        K::Gitea | K::Forgejo => vec![
            format!("{url}/{group}/issues/"),
            format!("{url}/{group}/pulls/"),
        ],
        K::Gitlab => vec![format!("{url}/{group}/-/issues/")],
        K::Github => vec![
            format!("{url}/{group}/issues/"),
            format!("{url}/{group}/pull/"),
        ],
        K::Redmine => vec![format!("{url}/issues/")],
        _ => vec![],
    }
}

/// The comment whose messages an activity takes back: a comment deleted in the tracker.
fn retracts(a: &Activity) -> Option<String> {
    (a.verb == crate::activity::Verb::Deleted && a.event == crate::activity::EventKind::Comment)
        .then(|| a.object.url.clone())
        .flatten()
}

/// Room descriptions from the config.
pub fn config_rooms(cfg: &Config) -> Vec<RoomInfo> {
    cfg.rooms.iter().map(room_from_config).collect()
}
