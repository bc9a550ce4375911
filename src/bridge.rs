//! The one place that knows both sides: drives the sans-IO MUC core with stanzas from the link,
//! performs its effects on the store and the link, and feeds completions back.

use std::sync::mpsc as std_mpsc;

use chrono::Utc;
use tokio::sync::mpsc;
use xmpp_parsers::{jid::BareJid, muc::user::Affiliation, stanza::Stanza};

use crate::config::{Config, RoomConfig};
use crate::muc::{mam, Effect, RoomInfo, Service};
use crate::store::worker::{Command, StoreEvent};
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

/// The running bridge.
pub struct Bridge {
    service: Service,
    link: LinkHandle,
    store: std_mpsc::Sender<Command>,
}

impl Bridge {
    /// Assemble.
    pub fn new(service: Service, link: LinkHandle, store: std_mpsc::Sender<Command>) -> Bridge {
        Bridge {
            service,
            link,
            store,
        }
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
        mut inbound: mpsc::UnboundedReceiver<Stanza>,
        mut store_events: mpsc::UnboundedReceiver<StoreEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
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
