//! The store's promises, kept alike by both backends: SQLite (the embedded default) and PostgreSQL
//! (several instances behind one domain), the latter a real throwaway cluster from Debian's package
//! (tests/servers/postgres.sh). Each test runs the same case against both.

use std::path::{Path, PathBuf};
use std::process::Command;

use caseroom::muc::mam::{ArchiveQuery, MamPage, Page, With};
use caseroom::muc::{ArchivedMessage, Completes, Persist, RoomInfo};
use caseroom::store::pg::PgStore;
use caseroom::store::{Accepted, Appended, Backend, InboxItem, Store};
use chrono::{DateTime, Utc};
use xmpp_parsers::message::Message;

/// A throwaway PostgreSQL cluster, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// With `tests/servers/postgres.sh`'s environment settings (`PG_TLS=1`).
    fn start_with(env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let out = Command::new(script())
            .arg(dir.path())
            .arg(port.to_string())
            .envs(env.iter().copied())
            .output()
            .expect("run postgres.sh");
        assert!(
            out.status.success(),
            "postgres.sh failed (the suite needs Debian's postgresql package; scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = std::fs::read_to_string(dir.path().join("url"))
            .expect("url")
            .trim()
            .to_owned();
        Cluster { dir, url }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("--stop")
            .arg(self.dir.path())
            .output();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/postgres.sh")
}

/// Run `case` against a new SQLite store and against a new PostgreSQL store.
fn both(case: impl Fn(&mut dyn Contract, &str)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sqlite = Store::open(&dir.path().join("db")).expect("sqlite");
    case(&mut sqlite, "sqlite");
    let cluster = Cluster::start();
    let mut pg = PgStore::open(&cluster.url).expect("postgres");
    case(&mut pg, "postgres");
}

/// What the cases use: the runtime interface and the start-up reads.
trait Contract {
    fn backend(&mut self) -> &mut dyn DynBackend;
    fn rooms(&self) -> Vec<RoomInfo>;
    fn last_seq(&self) -> u64;
    fn upsert(&mut self, rooms: &[RoomInfo]);
}

/// [`Backend`] minus `reader` (not object-safe), for `dyn` use.
trait DynBackend {
    fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[ArchivedMessage],
    ) -> (Vec<Accepted>, Vec<bool>);
    fn persist(&mut self, p: &Persist);
    fn query(&self, q: &ArchiveQuery) -> MamPage;
    fn try_query(&self, q: &ArchiveQuery) -> Result<MamPage, caseroom::muc::mam::QueryError>;
    fn recent(&self, room: &str, n: usize) -> Vec<ArchivedMessage>;
    fn pending(&self) -> Vec<i64>;
    fn moderate(&mut self, m: &caseroom::muc::moderation::Moderation) -> Vec<ArchivedMessage>;
    fn prune(
        &mut self,
        plan: caseroom::store::prune::PrunePlan,
    ) -> caseroom::store::prune::PruneTally;
    fn meta(&self, key: &str) -> Option<String>;
    fn set_meta(&self, key: &str, value: &str);
    fn reader_query(&self, q: &ArchiveQuery) -> MamPage;
    fn room_info(&self, name: &str) -> Option<RoomInfo>;
}

impl<B: Backend> DynBackend for B {
    fn commit(
        &mut self,
        items: &[InboxItem],
        msgs: &[ArchivedMessage],
    ) -> (Vec<Accepted>, Vec<bool>) {
        // As the bridge hands them to the store thread: serialised and read for search already.
        let msgs: Vec<Appended> = msgs.iter().cloned().map(Appended::prepared).collect();
        let done = Backend::commit(self, items, &msgs).expect("commit");
        // Searchable at once, as the store thread makes them before any search (SQLite indexes
        // its commits in batches, see `store::search`).
        Backend::index_pending(self, true).expect("index");
        done
    }
    fn persist(&mut self, p: &Persist) {
        Backend::persist(self, p).expect("persist")
    }
    fn query(&self, q: &ArchiveQuery) -> MamPage {
        Backend::query(self, q).expect("query")
    }
    fn try_query(&self, q: &ArchiveQuery) -> Result<MamPage, caseroom::muc::mam::QueryError> {
        Backend::query(self, q)
    }
    fn recent(&self, room: &str, n: usize) -> Vec<ArchivedMessage> {
        Backend::recent(self, room, n).expect("recent")
    }
    fn pending(&self) -> Vec<i64> {
        Backend::pending_inbox(self)
            .expect("pending")
            .into_iter()
            .map(|r| r.id)
            .collect()
    }
    fn moderate(&mut self, m: &caseroom::muc::moderation::Moderation) -> Vec<ArchivedMessage> {
        Backend::moderate(self, m).expect("moderate")
    }
    fn prune(
        &mut self,
        plan: caseroom::store::prune::PrunePlan,
    ) -> caseroom::store::prune::PruneTally {
        let mut job = caseroom::store::prune::PruneJob::new(plan, None);
        while Backend::prune_step(self, &mut job).expect("prune") {}
        job.tally
    }
    fn meta(&self, key: &str) -> Option<String> {
        Backend::meta(self, key).expect("meta")
    }
    fn set_meta(&self, key: &str, value: &str) {
        Backend::set_meta(self, key, value).expect("set meta")
    }
    fn room_info(&self, name: &str) -> Option<RoomInfo> {
        Backend::room_info(self, name).expect("room")
    }
    fn reader_query(&self, q: &ArchiveQuery) -> MamPage {
        let r = Backend::reader(self).expect("reader");
        Backend::query(&r, q).expect("reader query")
    }
}

impl Contract for Store {
    fn backend(&mut self) -> &mut dyn DynBackend {
        self
    }
    fn rooms(&self) -> Vec<RoomInfo> {
        Store::rooms(self).expect("rooms")
    }
    fn last_seq(&self) -> u64 {
        Store::last_seq(self).expect("last seq")
    }
    fn upsert(&mut self, rooms: &[RoomInfo]) {
        Store::upsert_rooms(self, rooms).expect("upsert")
    }
}

impl Contract for PgStore {
    fn backend(&mut self) -> &mut dyn DynBackend {
        self
    }
    fn rooms(&self) -> Vec<RoomInfo> {
        PgStore::rooms(self).expect("rooms")
    }
    fn last_seq(&self) -> u64 {
        PgStore::last_seq(self).expect("last seq")
    }
    fn upsert(&mut self, rooms: &[RoomInfo]) {
        PgStore::upsert_rooms(self, rooms).expect("upsert")
    }
}

fn item(delivery: Option<&str>, body: &str) -> InboxItem {
    InboxItem {
        tracker: "forge".into(),
        delivery: delivery.map(str::to_owned),
        received: 1,
        content_type: Some("application/json".into()),
        headers: vec![("X-Gitea-Event".into(), "issues".into())],
        body: body.as_bytes().to_vec(),
        body_hash: None,
        packed: None,
        doc: None,
    }
}

fn message(room: &str, seq: u64, nick: &str, body: &str) -> ArchivedMessage {
    let mut m = Message::groupchat(None);
    m.from = Some(
        format!("{room}@rooms.example.org/{nick}")
            .parse()
            .expect("jid"),
    );
    m.bodies.insert(Default::default(), body.into());
    ArchivedMessage {
        seq,
        id: format!("id{seq}"),
        room: room.into(),
        ts: DateTime::<Utc>::from_timestamp_micros(seq as i64 * 1_000_000).expect("ts"),
        nick: nick.into(),
        sender: format!("{nick}@example.org").parse().expect("jid"),
        message: m,
        origin: None,
        completes_inbox: None,
    }
}

fn query(room: &str, page: Page, max: usize) -> ArchiveQuery {
    let mut q = ArchiveQuery::metadata(room);
    q.metadata = false;
    q.page = page;
    q.max = max;
    q
}

fn ids(p: &MamPage) -> Vec<String> {
    p.items.iter().map(|i| i.id.clone()).collect()
}

#[test]
fn deliveries_are_accepted_once_and_done_with_their_message() {
    both(|s, name| {
        let b = s.backend();
        let (acc, _) = b.commit(
            &[item(Some("d1"), "{\"a\":1}"), item(Some("d2"), "{\"a\":2}")],
            &[],
        );
        let (Accepted::New(first), Accepted::New(_)) = (&acc[0], &acc[1]) else {
            panic!("{name}: {acc:?}")
        };
        // A retry (same delivery id) and a replay (same body, new id) are duplicates.
        let (again, _) = b.commit(
            &[
                item(Some("d1"), "{\"other\":1}"),
                item(Some("d9"), "{\"a\":2}"),
            ],
            &[],
        );
        assert_eq!(again, [Accepted::Duplicate, Accepted::Duplicate], "{name}");
        assert_eq!(b.pending().len(), 2, "{name}");
        // The message and the inbox row's "done" in one commit; archived once.
        let mut m = message("web", 1, "Forge", "alice opened #1");
        m.origin = Some(format!("inbox:{first}:web"));
        m.completes_inbox = Some(Completes::one(*first));
        let (_, written) = b.commit(&[], &[m.clone()]);
        assert_eq!(written, [true], "{name}");
        assert_eq!(b.pending().len(), 1, "{name}");
        let mut replayed = m.clone();
        replayed.seq = 2;
        replayed.id = "id2".into();
        assert_eq!(
            b.commit(&[], &[replayed]).1,
            [false],
            "{name}: same origin, archived once"
        );
    });
}

/// Several instances post one delivery's rooms each in their own order: the delivery is done
/// with whichever room's message is archived last, never before every room has its message (an
/// instance that died before posting its room leaves the delivery pending, to be replayed).
#[test]
fn a_delivery_in_several_rooms_is_done_only_once_every_room_has_its_message() {
    both(|s, name| {
        let b = s.backend();
        let (acc, _) = b.commit(&[item(Some("m1"), "{\"m\":1}")], &[]);
        let Accepted::New(id) = acc[0] else {
            panic!("{name}: {acc:?}")
        };
        let rooms = vec!["web".to_owned(), "ops".to_owned(), "all".to_owned()];
        let post = |room: &str, seq: u64| {
            let mut m = message(room, seq, "Forge", "alice opened #1");
            m.origin = Some(caseroom::muc::inbox_origin(id, room));
            m.completes_inbox = Some(Completes {
                inbox: id,
                rooms: rooms.clone(),
            });
            m
        };
        // The last room first, then the first: one is still missing.
        assert_eq!(b.commit(&[], &[post("all", 10)]).1, [true], "{name}");
        assert_eq!(b.commit(&[], &[post("web", 11)]).1, [true], "{name}");
        assert_eq!(b.pending().len(), 1, "{name}: ops has no message yet");
        // The same room's message again (a relay repeated) adds nothing and completes nothing.
        assert_eq!(b.commit(&[], &[post("web", 12)]).1, [false], "{name}");
        assert_eq!(b.pending().len(), 1, "{name}");
        assert_eq!(b.commit(&[], &[post("ops", 13)]).1, [true], "{name}");
        assert!(b.pending().is_empty(), "{name}: every room has it");
    });
}

#[test]
fn archive_pages_filters_and_counts_are_the_same() {
    both(|s, name| {
        let b = s.backend();
        let mut msgs: Vec<ArchivedMessage> = (1..=25)
            .map(|i| {
                message(
                    "web",
                    i,
                    if i % 5 == 0 { "bob" } else { "alice" },
                    &format!("message {i}"),
                )
            })
            .collect();
        msgs.push(message("ops", 26, "carol", "elsewhere"));
        assert!(b.commit(&[], &msgs).1.iter().all(|w| *w), "{name}");
        let first = b.query(&query("web", Page::Forward(None), 10));
        assert_eq!(
            ids(&first),
            (1..=10).map(|i| format!("id{i}")).collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(
            (first.count, first.first_index, first.complete),
            (Some(25), Some(0), false),
            "{name}"
        );
        let next = b.query(&query("web", Page::Forward(Some("id10".into())), 10));
        assert_eq!(ids(&next)[0], "id11", "{name}");
        let last = b.query(&query("web", Page::Backward(None), 10));
        assert_eq!(ids(&last)[9], "id25", "{name}");
        assert_eq!(
            (last.first_index, last.complete),
            (Some(15), false),
            "{name}"
        );
        let end = b.query(&query("web", Page::Backward(Some("id6".into())), 10));
        assert_eq!(
            (ids(&end), end.complete),
            ((1..=5).map(|i| format!("id{i}")).collect(), true),
            "{name}"
        );
        let mut by_nick = query("web", Page::Forward(None), 50);
        by_nick.with = Some(With::Nick("bob".into()));
        assert_eq!(b.query(&by_nick).count, Some(5), "{name}");
        let mut window = query("web", Page::Forward(None), 50);
        window.start = DateTime::<Utc>::from_timestamp_micros(20_000_000);
        window.after_id = Some("id21".into());
        assert_eq!(
            ids(&b.query(&window)),
            ["id22", "id23", "id24", "id25"],
            "{name}"
        );
        let mut picked = query("web", Page::Forward(None), 50);
        picked.ids = Some(vec!["id3".into(), "id7".into()]);
        assert_eq!(ids(&b.query(&picked)), ["id3", "id7"], "{name}");
        let unknown = query("web", Page::Forward(Some("id26".into())), 5);
        assert!(
            matches!(b.try_query(&unknown), Err(caseroom::muc::mam::QueryError::UnknownId(id)) if id == "id26"),
            "{name}: an id of another room is unknown here"
        );
        let meta = b.query(&ArchiveQuery::metadata("web"));
        assert_eq!(ids(&meta), ["id1", "id25"], "{name}");
        // A second connection reads what the first committed.
        assert_eq!(
            b.reader_query(&query("ops", Page::Forward(None), 5)).count,
            Some(1),
            "{name}"
        );
        let recent = b.recent("web", 3);
        assert_eq!(
            recent.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [23, 24, 25],
            "{name}"
        );
        assert_eq!(
            recent[2].message.bodies.values().next().map(String::as_str),
            Some("message 25")
        );
        assert_eq!(s.last_seq(), 26, "{name}");
    });
}

#[test]
fn search_folds_case_and_accents_and_moderation_takes_a_message_out() {
    both(|s, name| {
        let b = s.backend();
        let msgs = [
            message("web", 1, "alice", "Le café est prêt"),
            message("web", 2, "bob", "CAFE closed today"),
            message("web", 3, "bob", "nothing here"),
            message("ops", 4, "carol", "cafe in ops"),
        ];
        b.commit(&[], &msgs);
        let mut q = query("web", Page::Forward(None), 10);
        q.fulltext = Some(vec!["Café".into()]);
        assert_eq!(ids(&b.query(&q)), ["id1", "id2"], "{name}");
        q.fulltext = Some(vec!["cafe".into(), "pret".into()]);
        assert_eq!(ids(&b.query(&q)), ["id1"], "{name}: every word");
        let m = caseroom::muc::moderation::Moderation {
            room: "web".into(),
            id: "id1".into(),
            by: "web@rooms.example.org/alice".parse().expect("jid"),
            by_occupant_id: "occ-alice".into(),
            reason: Some("spam".into()),
            at: DateTime::<Utc>::from_timestamp_micros(9_000_000).expect("ts"),
            refers: None,
            iq: None,
            completes_inbox: None,
        };
        let stones = b.moderate(&m);
        assert_eq!(stones.len(), 1, "{name}");
        assert!(b.query(&q).items.is_empty(), "{name}: out of search");
        let page = b.query(&query("web", Page::Forward(None), 1));
        let xml = String::from_utf8_lossy(&page.items[0].forwarded).to_string();
        assert!(
            xml.contains("retracted") && !xml.contains("prêt"),
            "{name}: {xml}"
        );
    });
}

#[test]
fn rooms_affiliations_meta_and_retention_are_the_same() {
    both(|s, name| {
        let mut info = RoomInfo {
            name: "web".into(),
            title: "Web".into(),
            description: "the web team".into(),
            anonymous: false,
            subject: String::new(),
            affiliations: Default::default(),
        };
        info.affiliations.insert(
            "alice@example.org".parse().expect("jid"),
            xmpp_parsers::muc::user::Affiliation::Owner,
        );
        info.affiliations.insert(
            "bob@example.org".parse().expect("jid"),
            xmpp_parsers::muc::user::Affiliation::Member,
        );
        s.upsert(std::slice::from_ref(&info));
        info.affiliations.remove(
            &"bob@example.org"
                .parse::<xmpp_parsers::jid::BareJid>()
                .expect("jid"),
        );
        s.backend().persist(&Persist::Room(info.clone()));
        s.backend().persist(&Persist::Subject {
            room: "web".into(),
            subject: "Release 2".into(),
        });
        let rooms = s.rooms();
        assert_eq!(rooms.len(), 1, "{name}");
        assert_eq!(
            s.backend().room_info("web").as_ref(),
            Some(&rooms[0]),
            "{name}"
        );
        assert_eq!(s.backend().room_info("nope"), None, "{name}");
        assert_eq!(
            rooms[0].affiliations.len(),
            1,
            "{name}: bob's affiliation went"
        );
        assert_eq!(rooms[0].subject, "Release 2", "{name}");
        let b = s.backend();
        assert_eq!(b.meta("k"), None, "{name}");
        b.set_meta("k", "v1");
        b.set_meta("k", "v2");
        assert_eq!(b.meta("k").as_deref(), Some("v2"), "{name}");
        b.commit(
            &[],
            &(1..=5)
                .map(|i| message("web", i, "alice", "old and new"))
                .collect::<Vec<_>>(),
        );
        let plan = caseroom::store::prune::PrunePlan {
            messages_before: Some(3_000_000),
            ..Default::default()
        };
        let tally = b.prune(plan);
        assert_eq!(tally.messages.get("web"), Some(&2), "{name}");
        let left = b.query(&query("web", Page::Forward(None), 10));
        assert_eq!(
            (ids(&left)[0].as_str(), left.count),
            ("id3", Some(3)),
            "{name}"
        );
    });
}

#[test]
fn instances_hold_distinct_slots_and_one_leads_and_another_takes_over() {
    let cluster = Cluster::start();
    let stores: Vec<PgStore> = (0..caseroom::store::pg::SLOTS)
        .map(|_| PgStore::open(&cluster.url).expect("open"))
        .collect();
    let mut slots: Vec<u64> = stores
        .iter()
        .map(|s| s.claim_slot().expect("slot"))
        .collect();
    slots.sort();
    assert_eq!(slots, (0..caseroom::store::pg::SLOTS).collect::<Vec<_>>());
    let ninth = PgStore::open(&cluster.url).expect("open");
    let err = ninth.claim_slot().expect_err("all taken").to_string();
    assert!(err.contains("at most 8"), "{err}");
    // A slot is free again once its instance's connection ends.
    drop(stores);
    let mut slot = None;
    for _ in 0..50 {
        if let Ok(s) = ninth.claim_slot() {
            slot = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(slot.is_some(), "a freed slot is claimed again");

    let a = caseroom::store::pg::contend(&cluster.url, 0);
    let b = caseroom::store::pg::contend(&cluster.url, 1);
    let leaders = |t: f64| -> Vec<bool> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(t);
        loop {
            let l = vec![a.is_leader(), b.is_leader()];
            if l.iter().filter(|x| **x).count() == 1 || std::time::Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let first = leaders(5.0);
    assert_eq!(
        first.iter().filter(|x| **x).count(),
        1,
        "one leader: {first:?}"
    );
    // The leader's database session ends (its instance died): the other leads within seconds.
    let ended = end_sessions_holding(&cluster.url, caseroom::store::pg::LEADER_LOCK);
    assert_eq!(ended, 1, "the leader's session");
    let was_a = first[0];
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let then = leaders(5.0);
    assert_eq!(
        then,
        vec![!was_a, was_a],
        "the other instance leads (it tries every second; the old leader first reconnects)"
    );
}

/// End the database sessions holding the advisory lock `key`, as an instance's death would (a
/// bigint key shows in `pg_locks` as `classid` = high half, `objid` = low half); how many.
fn end_sessions_holding(url: &str, key: i64) -> usize {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("admin");
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = 1 AND granted",
            &[&((key >> 32) as u32), &(key as u32)],
        )
        .expect("terminate")
        .len()
}

/// Waits up to `secs` for `l`'s epoch to reach `want`; returns what it is then.
fn epoch_reaches(l: &caseroom::store::Leadership, want: u64, secs: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while l.epoch() < want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    l.epoch()
}

#[test]
fn rooms_move_only_with_the_instances_linked_to_the_server() {
    let cluster = Cluster::start();
    let a = caseroom::store::pg::contend(&cluster.url, 0);
    let b = caseroom::store::pg::contend(&cluster.url, 1);
    // Running but not linked (a slot claimed, the link still being made): the server routes
    // nothing to either, so nothing moves.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!((a.epoch(), b.epoch()), (0, 0), "no link, no epoch");
    // b's link comes up: a hears of it (its rooms may have moved to b); b's own link moves
    // nothing b holds.
    b.set_linked();
    assert_eq!(epoch_reaches(&a, 1, 5), 1, "a hears that b linked");
    a.set_linked();
    assert_eq!(epoch_reaches(&b, 1, 5), 1, "b hears that a linked");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        (a.epoch(), b.epoch()),
        (1, 1),
        "its own link is no change to itself"
    );
    // b's session ends (its instance died, or lost the database): a hears it, and b, whose link
    // is still up, says so again on its next connection, which a hears too.
    let ended = end_sessions_holding(&cluster.url, caseroom::store::pg::LINKED_LOCK + 1);
    assert_eq!(ended, 1, "b's linked lock is held by one session");
    assert!(
        epoch_reaches(&a, 2, 10) >= 2,
        "a hears b go and come back (as one change if b came back between two looks)"
    );
    assert_eq!(b.epoch(), 1, "b's own reconnection is no change to b");
}

#[test]
fn a_delivery_is_replayed_by_another_instance_only_once_its_own_is_gone() {
    let cluster = Cluster::start();
    let mut a = PgStore::open(&cluster.url).expect("open");
    let b = PgStore::open(&cluster.url).expect("open");
    let (sa, sb) = (a.claim_slot().expect("slot"), b.claim_slot().expect("slot"));
    assert_ne!(sa, sb);
    let (acc, _) = Backend::commit(&mut a, &[item(Some("d1"), "{\"n\":1}")], &[]).expect("commit");
    let Accepted::New(id) = acc[0] else {
        panic!("{acc:?}")
    };
    let orphans = |s: &PgStore, before: i64| -> Vec<i64> {
        Backend::orphaned_inbox(s, before)
            .expect("orphans")
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert!(orphans(&b, i64::MIN).is_empty(), "a's, and a runs");
    assert_eq!(
        orphans(&a, i64::MIN),
        [id],
        "its own (as after a restart into its slot)"
    );
    assert_eq!(
        orphans(&b, 2),
        [id],
        "old enough: whoever took it, it is stale"
    );
    drop(a);
    let mut freed = vec![];
    for _ in 0..50 {
        freed = orphans(&b, i64::MIN);
        if !freed.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(freed, [id], "a is gone: b replays it");
}

#[test]
fn linked_tokens_are_shared_by_the_instances_and_taken_from_the_file_once() {
    use caseroom::links::{Link, LinkChange, LinksFile};
    use caseroom::store::pg_links::SharedLinks;
    use caseroom::store::Startup;
    use std::sync::mpsc;
    use std::time::Duration;

    let cluster = Cluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // The tokens file of the SQLite store the operator moves from.
    let file = LinksFile::new(&dir.path().join("caseroom.db.tokens.json"));
    let mut old = file.load().expect("empty");
    old.set(
        "redmine",
        "alice@example.org",
        Link::token("alice".into(), "tok-a".into()),
    );
    file.write(&old.contents()).expect("write");
    let mut a = PgStore::open(&cluster.url).expect("open");
    let links = Startup::links(&mut a, &file).expect("links");
    assert_eq!(
        links
            .get("redmine", "alice@example.org")
            .map(|l| l.token.as_str()),
        Some("tok-a"),
        "the first instance takes the file's links"
    );
    // Later changes to the file are not read: the table holds the links now.
    file.write(b"{}").expect("write");
    let mut b = PgStore::open(&cluster.url).expect("open");
    assert_eq!(
        Startup::links(&mut b, &file)
            .expect("links")
            .get("redmine", "alice@example.org")
            .map(|l| l.login.clone()),
        Some("alice".into())
    );

    // Two instances: what one links, the other reads within moments; an unlink too.
    let (seen_a, on_a) = mpsc::channel();
    let (seen_b, on_b) = mpsc::channel();
    let one = SharedLinks::start(&cluster.url, move |l| {
        let _ = seen_a.send(l);
    });
    let _two = SharedLinks::start(&cluster.url, move |l| {
        let _ = seen_b.send(l);
    });
    // Each reads everything once it listens.
    for rx in [&on_a, &on_b] {
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("first read");
        assert!(first.get("redmine", "alice@example.org").is_some());
    }
    let wait_for = |rx: &mpsc::Receiver<caseroom::links::Links>,
                    ok: &dyn Fn(&caseroom::links::Links) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) if ok(&l) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("the change never arrived");
    };
    let (done_tx, done) = mpsc::channel();
    let tx = done_tx.clone();
    one.write(
        LinkChange {
            tracker: "redmine".into(),
            jid: "bob@example.org".into(),
            link: Some(Link::token("bob".into(), "tok-b".into())),
        },
        move |r| {
            let _ = tx.send(r);
        },
    );
    assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
    wait_for(&on_b, &|l| {
        l.get("redmine", "bob@example.org")
            .is_some_and(|l| l.token == "tok-b")
    });
    one.write(
        LinkChange {
            tracker: "redmine".into(),
            jid: "alice@example.org".into(),
            link: None,
        },
        move |r| {
            let _ = done_tx.send(r);
        },
    );
    assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
    wait_for(&on_b, &|l| {
        l.get("redmine", "alice@example.org").is_none()
            && l.get("redmine", "bob@example.org").is_some()
    });
    // And a restart reads the table as it is now: alice, unlinked, is not taken from the old
    // file again (it still has her).
    file.write(&old.contents()).expect("write");
    let mut c = PgStore::open(&cluster.url).expect("open");
    let now = Startup::links(&mut c, &file).expect("links");
    assert!(now.get("redmine", "alice@example.org").is_none());
    assert!(now.get("redmine", "bob@example.org").is_some());
    one.write(
        LinkChange {
            tracker: "redmine".into(),
            jid: "bob@example.org".into(),
            link: None,
        },
        |_| {},
    );
    wait_for(&on_b, &|l| l.is_empty());
    let mut d = PgStore::open(&cluster.url).expect("open");
    assert!(
        Startup::links(&mut d, &file).expect("links").is_empty(),
        "an empty table is not filled from the file again"
    );
}

/// `sslmode=require`: TLS with the server's certificate verified against the public roots and
/// `store.ca_file`, and its host name checked; a server that takes only TLS refuses plain TCP.
#[test]
fn tls_to_postgresql_is_verified_and_plain_tcp_is_refused() {
    use caseroom::store::pg_tls;
    let cluster = Cluster::start_with(&[("PG_TLS", "1")]);
    assert!(cluster.url.ends_with("?sslmode=require"), "{}", cluster.url);
    let ca = cluster.dir.path().join("tls/ca.pem");
    // The test CA is nobody's public root: not trusted without store.ca_file.
    pg_tls::set_ca_file(None).expect("no CA file");
    let err = PgStore::open(&cluster.url)
        .err()
        .expect("an unknown issuer")
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Trusted with it: the session is encrypted, as the server itself reports.
    pg_tls::set_ca_file(Some(&ca)).expect("the CA file");
    let mut store = PgStore::open(&cluster.url).expect("TLS, verified");
    let (acc, _) =
        Backend::commit(&mut store, &[item(Some("t1"), "{\"tls\":1}")], &[]).expect("commit");
    assert!(matches!(acc[0], Accepted::New(_)), "{acc:?}");
    let mut c = pg_tls::connect(&cluster.url).expect("connect");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the server sees a TLS session");
    // The host name is checked: the same server under a name its certificate does not carry.
    let port = cluster
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .expect("port");
    let misnamed = format!(
        "postgres://caseroom@db.example.invalid:{port}/caseroom?sslmode=require&hostaddr=127.0.0.1"
    );
    let err = PgStore::open(&misnamed)
        .err()
        .expect("a wrong name")
        .to_string();
    assert!(err.contains("not valid for name"), "{err}");
    // Plain TCP: refused by the server (hostnossl reject), not silently allowed.
    let plain = cluster.url.replace("?sslmode=require", "");
    let err = PgStore::open(&plain)
        .err()
        .expect("plain refused")
        .to_string();
    assert!(err.contains("no encryption"), "{err}");
}
