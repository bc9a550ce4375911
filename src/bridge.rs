//! The one place that knows both sides: drives the sans-IO MUC core with stanzas from the link,
//! performs its effects on the store and the link, and feeds completions back.

use std::sync::mpsc as std_mpsc;

use chrono::Utc;
use tokio::sync::mpsc;
use xmpp_parsers::{jid::BareJid, muc::user::Affiliation, stanza::Stanza};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::activity::Activity;
use crate::config::{Config, FilterConfig, RoomConfig, TrackerConfig};
use crate::http::HookCounters;
use crate::muc::{mam, Effect, Post, RoomInfo, Service};
use crate::store::worker::{Command, StoreEvent};
use crate::store::InboxRow;
use crate::webhook::{self, activitystreams, Headers, Normalized};
use crate::xmpp::json::JsonContainer;
use crate::xmpp::link::LinkHandle;

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
    /// Trackers by name.
    pub trackers: HashMap<String, TrackerConfig>,
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
                .map(|t| (t.name.clone(), t.clone()))
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

/// Room localparts a project name may map to, best first: `acme/web` → `acme-web`, `web`.
pub fn room_candidates(project: &str) -> Vec<String> {
    let slug = |s: &str| -> String {
        s.trim()
            .to_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let mut out = vec![slug(project)];
    if let Some(last) = project.rsplit('/').next() {
        let l = slug(last);
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The running bridge.
pub struct Bridge {
    service: Service,
    link: LinkHandle,
    store: std_mpsc::Sender<Command>,
    hooks: Hooks,
}

impl Bridge {
    /// Assemble.
    pub fn new(
        service: Service,
        link: LinkHandle,
        store: std_mpsc::Sender<Command>,
        hooks: Hooks,
    ) -> Bridge {
        Bridge {
            service,
            link,
            store,
            hooks,
        }
    }

    fn finish(&self, id: i64, state: &'static str, note: String) {
        tracing::debug!(id, state, %note, "webhook delivery closed without a room message");
        self.to_store(Command::FinishInbox { id, state, note });
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
        let mut rooms: Vec<String> = Vec::new();
        for g in groups {
            let explicit = t
                .rooms
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&g))
                .map(|(_, r)| vec![r.to_lowercase()]);
            let candidates = explicit.unwrap_or_else(|| room_candidates(&g));
            if let Some(r) = candidates.into_iter().find(|r| self.service.has_room(r)) {
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
        let headers = Headers(row.item.headers.clone());
        let doc = match webhook::parse_body(row.item.content_type.as_deref(), &row.item.body) {
            Ok(d) => d,
            Err(e) => return self.finish(id, "failed", e.to_string()),
        };
        let counters = self.hooks.counters.clone();
        let a = match webhook::normalize(t.kind, &headers, &doc) {
            Ok(Normalized::Activity(a)) => a,
            Ok(Normalized::Ping) => return self.finish(id, "ignored", "ping".into()),
            Ok(Normalized::Unknown(ev)) => {
                counters.unknown.fetch_add(1, Ordering::Relaxed);
                tracing::info!(tracker = %t.name, event = %ev, "recorded an event caseroom does not post");
                return self.finish(id, "unknown", ev);
            }
            Err(e) => {
                tracing::warn!(tracker = %t.name, error = %e, "could not understand a delivery");
                return self.finish(id, "failed", e.to_string());
            }
        };
        if a.private {
            // Private issues, private notes, confidential issues: never in a room.
            counters.ignored.fetch_add(1, Ordering::Relaxed);
            return self.finish(id, "ignored", "private".into());
        }
        let rendered = crate::render::render(&t.name, &a);
        let (rooms, persons) = self.route(&t, &a);
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
        let now = Utc::now();
        let last = rooms.len() - 1;
        for (i, room) in rooms.into_iter().enumerate() {
            let post = Post {
                origin: Some(format!("inbox:{id}:{room}")),
                room,
                nick: t.nick().to_owned(),
                body: rendered.body.clone(),
                payloads: vec![JsonContainer(rendered.json.clone()).into()],
                thread: rendered.thread.clone(),
                // The inbox row is done with its last room message, in the same transaction.
                completes_inbox: (i == last).then_some(id),
            };
            if let Some(effect) = self.service.post(post, now) {
                counters.posted.fetch_add(1, Ordering::Relaxed);
                self.perform(vec![effect]);
            }
        }
    }

    /// An event addressed to a person (AS2 `to`): a direct chat message from the service.
    fn direct_message(&self, to: &str, r: &crate::render::Rendered) {
        let Ok(to) = to.parse::<xmpp_parsers::jid::Jid>() else {
            return;
        };
        let mut m = xmpp_parsers::message::Message::chat(Some(to));
        m.from = Some(self.service.domain_jid());
        m.bodies.insert(Default::default(), r.body.clone());
        m.payloads.push(JsonContainer(r.json.clone()).into());
        if let Some(t) = &r.thread {
            m.thread = Some(xmpp_parsers::message::Thread {
                parent: None,
                id: t.clone(),
            });
        }
        self.link.send(m.into());
    }

    fn to_store(&self, cmd: Command) {
        if self.store.send(cmd).is_err() {
            tracing::error!("the store thread has stopped; a change was not written");
        }
    }

    fn perform(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(s) => self.link.send(s),
                Effect::Archive(m) => self.to_store(Command::Append(m)),
                Effect::Persist(p) => self.to_store(Command::Persist(p)),
                Effect::Mam(req) => self.to_store(Command::Query(req)),
            }
        }
    }

    fn on_store(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Inbox(rows) => {
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
                for m in batch {
                    let effects = self.service.archived(m);
                    self.perform(effects);
                }
            }
            StoreEvent::ArchiveFailed(batch, reason) => {
                tracing::error!(count = batch.len(), %reason, "messages not archived, so not broadcast");
            }
            StoreEvent::Mam(answer) => {
                let (req, page) = *answer;
                for s in mam::results(&req, page) {
                    self.link.send(s);
                }
            }
        }
    }

    /// Run until `shutdown` resolves or the link's inbound side closes.
    pub async fn run(
        mut self,
        replay: Vec<InboxRow>,
        mut inbound: mpsc::UnboundedReceiver<Stanza>,
        mut store_events: mpsc::UnboundedReceiver<StoreEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        if !replay.is_empty() {
            // Deliveries accepted before a crash or stop: handled before anything new.
            tracing::info!(
                count = replay.len(),
                "replaying webhook deliveries accepted earlier"
            );
            self.on_store(StoreEvent::Inbox(replay));
        }
        loop {
            tokio::select! {
                s = inbound.recv() => {
                    let Some(s) = s else { break };
                    let effects = self.service.handle(s, Utc::now());
                    self.perform(effects);
                }
                ev = store_events.recv() => {
                    let Some(ev) = ev else { break };
                    self.on_store(ev);
                }
                _ = &mut shutdown => {
                    tracing::info!("shutting down: telling occupants (status 332)");
                    let effects = self.service.shutdown();
                    self.perform(effects);
                    break;
                }
            }
        }
        self.link.close().await;
    }
}

/// Room descriptions from the config.
pub fn config_rooms(cfg: &Config) -> Vec<RoomInfo> {
    cfg.rooms.iter().map(room_from_config).collect()
}
