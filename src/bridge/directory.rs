//! Which source each room belongs to, and which room a tracker's event goes to (pure, no IO).
//!
//! A room belongs to exactly one source: the configuration (a static `[[room]]`) or one group of one
//! tracker. Membership, owners and the tracker that chat commands talk to all follow that source, so
//! a room must never change hands because a *name* matched: on Gitea or GitLab anyone can create a
//! repository whose slug equals an existing room (`acme/web` and `acme-web/…` both slug to
//! `acme-web…`). A sync that derives a room name already owned by another source is refused and
//! reported (log, the "Status" command); only an operator's explicit `[tracker.rooms]` mapping may
//! point a group at a room it does not own yet (a static room the operator wants to follow the
//! tracker).
//!
//! Routing follows the same rule: an event goes to the room the operator mapped its project to, else
//! to the room synced from exactly that group, else — for signed senders only — to a static room named
//! like the project's full path (`acme/web` → `acme-web`; never just the last segment). Unsigned
//! senders (URL token) reach only rooms of their own tracker.

use std::collections::{BTreeMap, HashMap};

/// Who a room belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A static `[[room]]` in the configuration.
    Config,
    /// A group of a tracker, by the tracker's group id (`acme/web`, a Redmine identifier, …). An
    /// empty group is a claim restored from an older store that did not record the group: the first
    /// group of that tracker to sync into the room completes it.
    Tracker {
        /// Tracker name.
        tracker: String,
        /// Group id.
        group: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Config => f.write_str("the configuration ([[room]])"),
            Source::Tracker { tracker, group } if group.is_empty() => {
                write!(f, "tracker {tracker}")
            }
            Source::Tracker { tracker, group } => write!(f, "{tracker} group {group}"),
        }
    }
}

/// A refused claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// The room.
    pub room: String,
    /// Its owner, who keeps it.
    pub owner: Source,
    /// Who was refused.
    pub refused: Source,
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "room {} belongs to {}; {} was not synced into it (map it to another room in [tracker.rooms])",
            self.room, self.owner, self.refused
        )
    }
}

/// How an event's sender authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A signature (or GitLab token) over the delivery.
    Signed,
    /// Only the URL token (`allow_unsigned`).
    Unsigned,
}

/// The room directory.
#[derive(Debug, Default)]
pub struct Directory {
    owners: HashMap<String, Source>,
    collisions: BTreeMap<String, Collision>,
}

/// A project or group name as a room localpart: `acme/web` → `acme-web`.
pub fn slug(project: &str) -> String {
    project
        .trim()
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
}

impl Directory {
    /// A directory with the configuration's static rooms.
    pub fn new<'a>(static_rooms: impl IntoIterator<Item = &'a str>) -> Directory {
        let mut d = Directory::default();
        for r in static_rooms {
            d.owners.insert(r.to_lowercase(), Source::Config);
        }
        d
    }

    /// Restore a tracker's rooms from the store (room → group; an empty group if unrecorded).
    pub fn restore(&mut self, tracker: &str, rooms: &BTreeMap<String, String>) {
        for (room, group) in rooms {
            self.owners
                .entry(room.clone())
                .or_insert_with(|| Source::Tracker {
                    tracker: tracker.to_owned(),
                    group: group.clone(),
                });
        }
    }

    /// May `tracker`'s `group` be mirrored into `room`? `explicit`: the operator mapped it there.
    /// Claims the room when it is free (or restored without a group).
    pub fn claim(
        &mut self,
        room: &str,
        tracker: &str,
        group: &str,
        explicit: bool,
    ) -> Result<(), Collision> {
        let wanted = Source::Tracker {
            tracker: tracker.to_owned(),
            group: group.to_owned(),
        };
        let ok = match self.owners.get(room) {
            None => true,
            Some(owner) if *owner == wanted => true,
            // Restored from an older store: the tracker's first group into the room completes it.
            Some(Source::Tracker {
                tracker: t,
                group: g,
            }) if t == tracker && g.is_empty() => true,
            // The operator pointed this group at the room; their config is the authority.
            Some(Source::Config) if explicit => true,
            Some(_) => false,
        };
        if ok {
            self.owners.insert(room.to_owned(), wanted);
            self.collisions.remove(room);
            return Ok(());
        }
        let c = Collision {
            room: room.to_owned(),
            owner: self.owners.get(room).cloned().unwrap_or(Source::Config),
            refused: wanted,
        };
        self.collisions.insert(room.to_owned(), c.clone());
        Err(c)
    }

    /// The owner of a room, if known.
    pub fn owner(&self, room: &str) -> Option<&Source> {
        self.owners.get(room)
    }

    /// Claims refused since start (the owner kept the room), by room.
    pub fn collisions(&self) -> impl Iterator<Item = &Collision> {
        self.collisions.values()
    }

    /// The room a tracker's event about `group` goes to, if any. `explicit` is the tracker's
    /// `[tracker.rooms]`; `open_audience`: the sender names rooms itself (Activity Streams `to`/`cc`),
    /// so a signed one may post into any existing room by name; `exists` asks the MUC core.
    pub fn route(
        &self,
        tracker: &str,
        sender: Sender,
        open_audience: bool,
        explicit: &BTreeMap<String, String>,
        group: &str,
        exists: impl Fn(&str) -> bool,
    ) -> Option<String> {
        if let Some((_, room)) = explicit.iter().find(|(k, _)| k.eq_ignore_ascii_case(group)) {
            let room = room.to_lowercase();
            return exists(&room).then_some(room);
        }
        let name = slug(group);
        if name.is_empty() || !exists(&name) {
            return None;
        }
        let mine = matches!(self.owners.get(&name),
            Some(Source::Tracker { tracker: t, group: g })
                if t == tracker && (g.eq_ignore_ascii_case(group) || g.is_empty()));
        if mine {
            return Some(name);
        }
        if sender == Sender::Unsigned {
            return None;
        }
        match self.owners.get(&name) {
            // Another tracker's or group's room: only a sender that addresses rooms itself.
            Some(Source::Tracker { .. }) => open_audience.then_some(name),
            Some(Source::Config) => Some(name),
            // A room of no known source (left in the store by an older configuration).
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_derived_name_cannot_take_a_static_or_foreign_room() {
        let mut d = Directory::new(["webteam"]);
        assert!(d.claim("acme-web", "gitea", "acme/web", false).is_ok());
        // Anyone on the instance can create acme-web/… or a repo named webteam.
        let c = d
            .claim("acme-web", "gitea", "acme-web", false)
            .expect_err("another group");
        assert_eq!(
            c.owner,
            Source::Tracker {
                tracker: "gitea".into(),
                group: "acme/web".into()
            }
        );
        assert!(d.claim("webteam", "gitea", "eve/webteam", false).is_err());
        assert!(d.claim("acme-web", "gitlab", "acme/web", false).is_err());
        assert_eq!(d.collisions().count(), 2);
        assert!(d.collisions().any(|c| c.to_string().contains("belongs to")));
        // The owner syncing again is fine.
        assert!(d.claim("acme-web", "gitea", "acme/web", false).is_ok());
        // An operator's explicit mapping may hand a static room to a group.
        assert!(d.claim("webteam", "gitea", "acme/site", true).is_ok());
        assert!(d.collisions().all(|c| c.room != "webteam"));
    }

    #[test]
    fn restored_claims_without_a_group_are_completed_by_their_tracker() {
        let mut d = Directory::new([]);
        d.restore(
            "redmine",
            &[("webteam".to_string(), String::new())]
                .into_iter()
                .collect(),
        );
        assert!(d.claim("webteam", "gitea", "webteam", false).is_err());
        assert!(d.claim("webteam", "redmine", "webteam", false).is_ok());
        assert!(d.claim("webteam", "redmine", "other", false).is_err());
    }

    #[test]
    fn routing_is_exact_and_unsigned_senders_stay_home() {
        let mut d = Directory::new(["ops", "web"]);
        d.claim("acme-web", "gitea", "acme/web", false)
            .expect("claim");
        d.claim("acme-api", "redmine", "acme-api", false)
            .expect("claim");
        let all = |r: &str| ["ops", "web", "acme-web", "acme-api", "evil-web"].contains(&r);
        let none = BTreeMap::new();
        let route = |t, s, open, g| d.route(t, s, open, &none, g, all);
        assert_eq!(
            route("gitea", Sender::Signed, false, "acme/web").as_deref(),
            Some("acme-web")
        );
        // Never by the last path segment: evil/web does not reach the static room "web".
        assert_eq!(route("gitea", Sender::Signed, false, "evil/web"), None);
        // Another group whose slug collides does not reach the owner's room.
        assert_eq!(route("gitea", Sender::Signed, false, "acme-web"), None);
        assert_eq!(route("gitlab", Sender::Signed, false, "acme/web"), None);
        // A signed sender reaches a static room named like the project.
        assert_eq!(
            route("jira", Sender::Signed, false, "ops").as_deref(),
            Some("ops")
        );
        // An unsigned one only its own rooms, or what the operator mapped.
        assert_eq!(route("redmine", Sender::Unsigned, false, "ops"), None);
        assert_eq!(
            route("redmine", Sender::Unsigned, false, "acme-api").as_deref(),
            Some("acme-api")
        );
        let mapped = explicit(&[("OPS", "ops")]);
        assert_eq!(
            d.route("redmine", Sender::Unsigned, false, &mapped, "ops", all)
                .as_deref(),
            Some("ops")
        );
        // Activity Streams senders name rooms themselves; signed, they may post into any room.
        assert_eq!(
            route("as2", Sender::Signed, true, "acme-api").as_deref(),
            Some("acme-api")
        );
        assert_eq!(route("as2", Sender::Unsigned, true, "acme-api"), None);
        // Nothing is routed to a room that does not exist.
        assert_eq!(
            d.route("gitea", Sender::Signed, false, &none, "acme/web", |_| false),
            None
        );
    }
}
