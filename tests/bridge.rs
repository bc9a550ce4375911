//! Scenario tests of the bridge core: inputs in (stanzas as the server delivers them, inbox rows,
//! sync results, finished tracker jobs, time), actions out. The store is a real SQLite store that
//! this test plays the store thread for; tracker jobs run against a fake tracker that records every
//! call. No sockets, no clock: time is stepped by hand.

use std::collections::VecDeque;

mod common;
use std::sync::{Arc, Mutex};

use caseroom::bridge::{self, driver, Action, Bridge, Input, Job, Synced};
use caseroom::config::Config;
use caseroom::http::HookCounters;
use caseroom::muc::Service;
use caseroom::store::worker::{StoreEvent, StoreOp};
use caseroom::store::{InboxItem, InboxRow, Store};
use caseroom::tracker::{Actor, Case, Group, Member, NewCase, Tracker, TrackerError, Vocabulary};
use caseroom::xmpp::link::LinkState;
use chrono::{DateTime, Duration, TimeZone, Utc};
use minidom::Element;
use xmpp_parsers::stanza::Stanza;

const NS: &str = "jabber:component:accept";
const ROOM: &str = "gogits-hello-world@rooms.example.org";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

const CONFIG: &str = r#"
[component]
jid = "rooms.example.org"
server = "127.0.0.1:5347"
secret = "3f9a7c1e5b2d4a60"
[store]
path = "unused"
[[tracker]]
name = "forge"
kind = "gitea"
url = "https://forge.example.org"
api_key = "k-7d2e9b4c1a"
secret = "9c1e5b2d4a603f7a"
bot_nick = "Forge"
[tracker.identity]
domain = "example.org"
map = { "carol.w@partner.net" = "carol" }
[tracker.roles]
owner = "owner"
write = "member"
[[tracker]]
name = "hub"
kind = "github"
secret = "5b2d4a603f7a9c1e"
bot_nick = "Hub"
[tracker.rooms]
"Codertocat/Hello-World" = "hello"
[tracker.identity]
domain = "example.org"
[[room]]
name = "hello"
members = ["alice@example.org", "octocat@example.org"]
"#;

/// What the fake tracker was asked, as (operation, login, group, detail).
type Calls = Arc<Mutex<Vec<(String, String, String, String)>>>;

#[derive(Default, Clone)]
struct FakeTracker {
    calls: Calls,
    /// The personal token each call carried (None: through the admin key), in call order.
    tokens: Arc<Mutex<Vec<Option<String>>>>,
}

fn case(number: u64, title: &str) -> Case {
    Case {
        number,
        title: title.into(),
        status: "open".into(),
        closed: false,
        assignee: None,
        author: "Alice".into(),
        url: format!("https://forge.example.org/gogits/hello-world/issues/{number}"),
        private: false,
    }
}

impl FakeTracker {
    fn record(&self, op: &str, who: &Actor, group: &str, detail: String) {
        self.tokens.lock().expect("tokens").push(who.token.clone());
        self.calls.lock().expect("calls").push((
            op.into(),
            who.login.clone(),
            group.into(),
            detail,
        ));
    }
}

impl Tracker for FakeTracker {
    async fn groups(&self) -> Result<Vec<Group>, TrackerError> {
        Ok(vec![])
    }
    async fn vocabulary(&self, _group: &str) -> Result<Vocabulary, TrackerError> {
        Ok(Vocabulary {
            kinds: vec!["bug".into()],
            priorities: vec![],
        })
    }
    async fn whoami(&self, token: &str) -> Result<String, TrackerError> {
        // A personal token names its owner: "tok-dave" is dave's.
        token
            .strip_prefix("tok-")
            .map(str::to_owned)
            .ok_or_else(|| TrackerError::Denied("invalid token".into()))
    }
    async fn create(&self, who: &Actor, c: &NewCase) -> Result<Case, TrackerError> {
        self.record("create", who, &c.group, c.title.clone());
        Ok(case(7, &c.title))
    }
    async fn comment(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        text: &str,
    ) -> Result<Case, TrackerError> {
        self.record("comment", who, group, format!("#{number} {text}"));
        Ok(case(number, "Problem"))
    }
    async fn set_closed(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        closed: bool,
        _note: Option<&str>,
    ) -> Result<Case, TrackerError> {
        self.record("close", who, group, format!("#{number} {closed}"));
        let mut c = case(number, "Problem");
        c.closed = closed;
        Ok(c)
    }
    async fn assign(
        &self,
        who: &Actor,
        group: &str,
        number: u64,
        to: &str,
    ) -> Result<Case, TrackerError> {
        self.record("assign", who, group, format!("#{number} {to}"));
        Ok(case(number, "Problem"))
    }
    async fn get(&self, who: &Actor, group: &str, number: u64) -> Result<Case, TrackerError> {
        self.record("get", who, group, format!("#{number}"));
        Ok(case(number, "Problem"))
    }
    async fn search(
        &self,
        who: &Actor,
        group: &str,
        words: &str,
    ) -> Result<Vec<Case>, TrackerError> {
        self.record("search", who, group, words.into());
        Ok(vec![case(1, "Problem")])
    }
    async fn mine(&self, who: &Actor, group: &str) -> Result<Vec<Case>, TrackerError> {
        self.record("mine", who, group, String::new());
        Ok(vec![])
    }
}

struct World {
    bridge: Bridge,
    store: Store,
    now: DateTime<Utc>,
    sent: common::Outbox,
    jobs: Vec<Job>,
    resyncs: Vec<String>,
    /// Link changes written, in order (what the shared store would get).
    link_changes: Vec<caseroom::links::LinkChange>,
    fake: FakeTracker,
    counters: Arc<HookCounters>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn member(login: &str, role: &str) -> Member {
    Member {
        login: login.into(),
        name: login.into(),
        roles: vec![role.into()],
    }
}

fn group(members: Vec<Member>) -> Group {
    Group {
        id: "gogits/hello-world".into(),
        name: "Hello World".into(),
        description: String::new(),
        members,
    }
}

impl World {
    fn new() -> World {
        World::with(|_, _| {})
    }

    /// A world set up as after a restart: `prepare` gets the MUC core and the bridge's command state
    /// as the process would load them from the store.
    fn with(prepare: impl FnOnce(&mut Service, &mut bridge::Commands)) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.db")).expect("store");
        World::build(dir, store, CONFIG, prepare)
    }

    /// The process again on the same store: rooms, their last sync and the archive come back as
    /// `caseroom run` loads them (a room's history only when it is first used); nothing else does.
    fn restart(self) -> World {
        let World {
            store,
            _dir,
            now,
            fake,
            ..
        } = self;
        let rooms = store.rooms().expect("rooms");
        let synced = store
            .meta(&bridge::synced_key("forge"))
            .expect("meta")
            .and_then(|v| bridge::parse_synced(&v));
        let last = store.last_seq().expect("last seq");
        let mut w = World::build(_dir, store, CONFIG, |service, commands| {
            service.set_last_seq(last);
            for r in rooms {
                service.restore_room(r);
            }
            if let Some(rooms) = synced {
                commands.restore([("forge".to_string(), rooms)].into());
            }
        });
        w.now = now;
        w.fake = fake;
        w
    }

    /// A world whose configuration is `config` (the tests' usual one: [`CONFIG`]).
    fn with_config(config: &str) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.db")).expect("store");
        World::build(dir, store, config, |_, commands| {
            commands.links = Some(caseroom::links::Links::default());
        })
    }

    fn build(
        dir: tempfile::TempDir,
        store: Store,
        config: &str,
        prepare: impl FnOnce(&mut Service, &mut bridge::Commands),
    ) -> World {
        let cfg = Config::from_toml(config, &[]).expect("config");
        cfg.validate().expect("valid config");
        let service = Service::new(common::service_config(600, 100), 42);
        let counters = Arc::new(HookCounters::default());
        let hooks = bridge::Hooks::from_config(&cfg, counters.clone());
        let mut commands = bridge::Commands::default();
        commands.clients.insert("forge".into());
        commands.resync.insert("forge".into());
        let mut service = service;
        prepare(&mut service, &mut commands);
        let bridge = Bridge::new(service, Arc::new(LinkState::default()), hooks, commands, 7);
        World {
            bridge,
            store,
            now: Utc
                .with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
                .single()
                .expect("date"),
            sent: common::Outbox::default(),
            jobs: vec![],
            resyncs: vec![],
            link_changes: vec![],
            fake: FakeTracker::default(),
            counters,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            _dir: dir,
        }
    }

    /// One input; actions performed (the store's answers fed back at once, as the store thread does).
    fn input(&mut self, input: Input) {
        self.now += Duration::milliseconds(100);
        let mut queue = VecDeque::from([input]);
        while let Some(i) = queue.pop_front() {
            for a in self.bridge.handle(i, self.now) {
                match a {
                    // The link's answer lane reorders only against broadcasts it has not
                    // written yet; here everything is "written" at once, in emitted order.
                    Action::Send(s) | Action::Reply(s) => self.sent.push_back(Element::from(s)),
                    Action::ReplyPrepared(p) => self.sent.push_back(Element::from(
                        p.stanza().expect("a prepared copy parses back"),
                    )),
                    Action::Departed { .. } => {}
                    Action::SendRaw { bytes: b, .. } => self
                        .sent
                        .push_back(common::element(caseroom::xmpp::wire::Out::Raw(b))),
                    Action::Broadcast(b) => self.sent.extend(b.copies().map(Element::from)),
                    Action::Job(j) => self.jobs.push(j),
                    Action::Resync(t) => self.resyncs.push(t),
                    Action::SaveLinks {
                        contents,
                        change,
                        ticket,
                    } => {
                        self.link_changes.push(change);
                        let result = caseroom::links::LinksFile::new(&self.links_path())
                            .write(&contents)
                            .map_err(|e| e.to_string());
                        queue.push_back(Input::LinksSaved { ticket, result });
                    }
                    Action::Store(cmd) => {
                        if let Some(ev) = self.play_store(cmd) {
                            queue.push_back(Input::Store(ev));
                        }
                    }
                }
            }
        }
    }

    /// Where the driver would keep the account links.
    fn links_path(&self) -> std::path::PathBuf {
        self._dir.path().join("links.json")
    }

    fn play_store(&mut self, cmd: StoreOp) -> Option<StoreEvent> {
        match cmd {
            StoreOp::Append(a) => {
                let m = a.message;
                let written = self.store.append(std::slice::from_ref(&m)).expect("append");
                written[0].then(|| StoreEvent::Archived(vec![m]))
            }
            StoreOp::Persist(p) => {
                self.store.persist(&p).expect("persist");
                None
            }
            StoreOp::Query(req) => {
                let page = self.store.query(&req.query);
                Some(StoreEvent::Mam(Box::new((req, page, Default::default()))))
            }
            StoreOp::History(room) => {
                let recent = self
                    .store
                    .recent(&room, caseroom::muc::room::HISTORY_CACHE)
                    .map_err(|e| e.to_string());
                Some(StoreEvent::History(room, recent))
            }
            StoreOp::Search(req) => {
                let page = self.store.query(&req.query);
                Some(StoreEvent::Searched(Box::new((*req, page))))
            }
            StoreOp::SetMeta(k, v) => {
                self.store.set_meta(&k, &v).expect("meta");
                None
            }
            StoreOp::FinishInbox { id, state, note } => {
                self.store.finish_inbox(id, state, &note).expect("finish");
                None
            }
            StoreOp::Moderate(m) => {
                let result = self.store.moderate(&m).map_err(|e| e.to_string());
                Some(StoreEvent::Moderated(Box::new((m, result))))
            }
            // One instance's store: every pending delivery is its own.
            StoreOp::ReplayPending | StoreOp::ReplayOwn => Some(StoreEvent::Inbox(
                self.store.pending_inbox().expect("pending"),
            )),
            StoreOp::LoadRoom(room) => {
                let info = self
                    .store
                    .rooms()
                    .expect("rooms")
                    .into_iter()
                    .find(|r| r.name == room);
                Some(StoreEvent::RoomLoaded(room, info))
            }
            StoreOp::Notify(room) => Some(StoreEvent::Notified(room)),
            StoreOp::Accept(..)
            | StoreOp::Probe(_)
            | StoreOp::Prune(_)
            | StoreOp::ReplayStale(_) => {
                panic!("the bridge never accepts deliveries, probes, prunes or sweeps the store itself")
            }
        }
    }

    /// Run the tracker jobs the bridge asked for against the fake, and feed their results back.
    fn run_jobs(&mut self) {
        for job in std::mem::take(&mut self.jobs) {
            let done = self.rt.block_on(driver::run_job(&self.fake, job));
            self.input(done);
        }
    }

    fn stanza(&mut self, xml: &str) {
        let at = xml.find([' ', '>', '/']).expect("a tag");
        let xml = format!("{} xmlns='{NS}'{}", &xml[..at], &xml[at..]);
        let el: Element = xml.parse().expect("valid XML literal");
        self.input(Input::Stanza(Stanza::try_from(el).expect("a stanza")));
    }

    fn sync(&mut self, groups: Vec<Group>) {
        self.input(Input::Synced(Synced {
            tracker: "forge".into(),
            groups: Ok(groups),
            hooks: vec![],
        }));
    }

    fn join(&mut self, full: &str, nick: &str) {
        self.stanza(&format!(
            "<presence from='{full}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
        ));
        self.take("self-presence", |e| {
            e.name() == "presence" && e.attr("to") == Some(full) && e.attr("type").is_none()
        });
        self.sent.clear();
    }

    fn say(&mut self, full: &str, id: &str, text: &str) {
        self.stanza(&format!(
            "<message from='{full}' to='{ROOM}' type='groupchat' id='{id}'><body>{text}</body></message>"
        ));
    }

    fn deliver(&mut self, id: i64, file: &str, event: &str) {
        let item = delivery("forge", "gitea", &format!("d-{id}"), file, event);
        self.input(Input::Store(StoreEvent::Inbox(vec![InboxRow { id, item }])));
    }

    /// A GitHub delivery of a fixture, kept in the store's inbox first (as the HTTP side does) and
    /// handed to the bridge; its inbox row.
    fn deliver_github(&mut self, file: &str, event: &str) -> InboxRow {
        let id = format!("gh-{file}-{}", self.now.timestamp_micros());
        let item = delivery("hub", "github", &id, file, event);
        self.store.accept(&[item]).expect("accept");
        let rows = self.store.pending_inbox().expect("pending");
        let row = rows.last().cloned().expect("a pending row");
        self.input(Input::Store(StoreEvent::Inbox(rows)));
        row
    }

    /// A GitHub fixture as an inbox row handed to the bridge (not kept in the store first).
    fn github_row(&mut self, id: i64, file: &str, event: &str) {
        let item = delivery("hub", "github", &format!("gh-{id}"), file, event);
        self.input(Input::Store(StoreEvent::Inbox(vec![InboxRow { id, item }])));
    }

    fn take(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        self.sent.take(what, pred)
    }

    fn none(&self, what: &str, pred: impl Fn(&Element) -> bool) {
        self.sent.none(what, pred)
    }
}

/// A delivery of `fixtures/<dialect>/<file>` to `tracker`, with the dialect's event header.
fn delivery(tracker: &str, dialect: &str, id: &str, file: &str, event: &str) -> InboxItem {
    let body = std::fs::read(format!(
        "{}/fixtures/{dialect}/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture");
    InboxItem {
        tracker: tracker.into(),
        delivery: Some(id.into()),
        received: 1,
        content_type: Some("application/json".into()),
        headers: vec![(format!("x-{dialect}-event"), event.into())],
        body,
        body_hash: None,
        packed: None,
        doc: None,
    }
}

fn body(e: &Element) -> Option<String> {
    e.get_child("body", NS).map(|b| b.text())
}

fn statuses(e: &Element) -> Vec<String> {
    e.get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.name() == "status")
                .filter_map(|c| c.attr("code").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn to(e: &Element, jid: &str) -> bool {
    e.attr("to") == Some(jid)
}

#[test]
fn sync_mirrors_members_invites_them_and_removes_who_left() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    // Invitations (XEP-0249) to both.
    for jid in ["alice@example.org", "bob@example.org"] {
        let inv = w.take("invitation", |e| to(e, jid));
        assert_eq!(
            inv.get_child("x", "jabber:x:conference")
                .and_then(|x| x.attr("jid")),
            Some(ROOM)
        );
    }
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    // bob loses access in the tracker: removed from the room with 321.
    w.sync(vec![group(vec![member("alice", "owner")])]);
    let gone = w.take("bob's removal", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("unavailable")
    });
    assert!(
        statuses(&gone).contains(&"321".to_owned()),
        "{}",
        String::from(&gone)
    );
    // The whole group vanishes: the room closes (alice removed too), its archive stays.
    w.sent.clear();
    w.sync(vec![]);
    let closed = w.take("alice's removal", |e| {
        to(e, "alice@example.org/a") && e.attr("type") == Some("unavailable")
    });
    assert!(statuses(&closed).contains(&"321".to_owned()));
    w.stanza(&format!(
        "<presence from='alice@example.org/a' to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ));
    let refused = w.take("refusal", |e| to(e, "alice@example.org/a"));
    assert!(String::from(&refused).contains("registration-required"));
}

#[test]
fn include_and_exclude_choose_which_groups_become_rooms() {
    // The forge tracker of CONFIG, keeping only gogits/* and leaving out its archive-* projects.
    let config = CONFIG.replace(
        "bot_nick = \"Forge\"\n",
        "bot_nick = \"Forge\"\ninclude = [\"GOGITS/*\"]\nexclude = [\"gogits/archive-*\"]\n",
    );
    let mut w = World::with_config(&config);
    let named = |id: &str| Group {
        id: id.into(),
        ..group(vec![member("alice", "owner")])
    };
    w.sync(vec![
        named("gogits/hello-world"),
        named("gogits/archive-2019"),
        named("other/tool"),
    ]);
    let invitation = |e: &Element| {
        e.get_child("x", "jabber:x:conference")
            .and_then(|x| x.attr("jid"))
            .map(str::to_owned)
    };
    w.take("an invitation to the included group's room", |e| {
        invitation(e).as_deref() == Some(ROOM)
    });
    w.none("an invitation to another room", |e| invitation(e).is_some());
    // Its events are posted.
    w.join("alice@example.org/a", "Alice");
    w.deliver(1, "issues.opened.json", "issues");
    w.take("the included project's event", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
}

#[test]
fn a_webhook_becomes_one_message_with_body_json_and_thread_once() {
    let mut w = World::new();
    w.sync(vec![group(vec![member("alice", "owner")])]);
    w.join("alice@example.org/a", "Alice");
    w.deliver(1, "issues.opened.json", "issues");
    let m = w.take("the event", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    assert_eq!(
        body(&m).as_deref(),
        Some("[gogits/hello-world] unknwon opened #1 *Problem* — http://try.gitea.io/gogits/hello-world/issues/1")
    );
    assert_eq!(m.attr("from"), Some(&*format!("{ROOM}/Forge")));
    assert!(m.get_child("json", "urn:xmpp:json:0").is_some());
    assert!(m.get_child("thread", NS).is_some());
    // The same inbox row again (a replay after a crash): archived once, shown once.
    w.sent.clear();
    w.deliver(1, "issues.opened.json", "issues");
    w.none("a second copy", |e| body(e).is_some());
    assert_eq!(
        w.store
            .recent("gogits-hello-world", 10)
            .expect("recent")
            .len(),
        1
    );
}

#[test]
fn commands_run_as_the_speaker_and_answer_in_the_case_thread() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    w.say("bob@example.org/b", "c1", "!comment 1 works for me");
    assert_eq!(w.jobs.len(), 1, "one tracker job");
    w.run_jobs();
    assert_eq!(
        w.fake.calls.lock().expect("calls").clone(),
        vec![(
            "comment".to_owned(),
            "bob".to_owned(),
            "gogits/hello-world".to_owned(),
            "#1 works for me".to_owned()
        )],
        "as bob, in the room's own repository"
    );
    let answer = w.take("the answer in the room", |e| {
        to(e, "alice@example.org/a")
            && e.attr("from") == Some(&*format!("{ROOM}/Forge"))
            && body(e).is_some_and(|b| b.contains("#1"))
    });
    assert!(
        answer.get_child("thread", NS).is_some(),
        "threaded with the case"
    );
    // The same message delivered again runs nothing.
    w.say("bob@example.org/b", "c1", "!comment 1 works for me");
    assert!(w.jobs.is_empty());
}

#[test]
fn case_references_are_summarised_once_in_a_while_as_read_by_the_sender() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    w.say(
        "bob@example.org/b",
        "r1",
        "does #7 still happen? like https://forge.example.org/gogits/hello-world/issues/9 and #7",
    );
    assert_eq!(w.jobs.len(), 1, "one tracker job for the message");
    w.run_jobs();
    let calls = w.fake.calls.lock().expect("calls").clone();
    assert_eq!(
        calls,
        vec![
            (
                "get".to_owned(),
                "bob".to_owned(),
                "gogits/hello-world".to_owned(),
                "#7".to_owned()
            ),
            (
                "get".to_owned(),
                "bob".to_owned(),
                "gogits/hello-world".to_owned(),
                "#9".to_owned()
            ),
        ],
        "each case once, read as the sender"
    );
    let summary = w.take("the summary", |e| {
        to(e, "alice@example.org/a")
            && e.attr("from") == Some(&*format!("{ROOM}/Forge"))
            && body(e).is_some_and(|b| b.starts_with("#7 *Problem*"))
    });
    let text = body(&summary).expect("body");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("/issues/9"), "{text}");
    // Again within 30 minutes: nothing; a command is not a reference; 31 minutes later: again.
    w.say("alice@example.org/a", "r2", "#7 again");
    w.say("alice@example.org/a", "r3", "!show 7");
    assert_eq!(w.jobs.len(), 1, "only the command");
    w.run_jobs();
    w.now += Duration::minutes(31);
    w.say("alice@example.org/a", "r4", "what about #7");
    assert_eq!(w.jobs.len(), 1);
    w.run_jobs();
    // Another project's link, or more than three numbers: only the room's own, three at most.
    w.now += Duration::minutes(31);
    w.say(
        "alice@example.org/a",
        "r5",
        "https://forge.example.org/other/repo/issues/3 #11 #12 #13 #14",
    );
    w.run_jobs();
    let asked: Vec<String> = w
        .fake
        .calls
        .lock()
        .expect("calls")
        .iter()
        .skip(4)
        .map(|c| c.3.clone())
        .collect();
    assert_eq!(asked, vec!["#11", "#12", "#13"]);
    // References wait for the tracker like commands: two messages in flight, the third is not read.
    w.now += Duration::minutes(31);
    for (i, n) in [21, 22, 23].iter().enumerate() {
        w.say(
            "alice@example.org/a",
            &format!("f{i}"),
            &format!("and #{n}"),
        );
    }
    assert_eq!(
        w.jobs.len(),
        2,
        "at most two of alice's tracker calls at once"
    );
}

#[test]
fn a_command_flood_waits_for_two_tracker_calls_at_most() {
    let mut w = World::new();
    w.sync(vec![group(vec![member("bob", "write")])]);
    w.join("bob@example.org/b", "Bob");
    for i in 0..5 {
        w.say("bob@example.org/b", &format!("f{i}"), &format!("!show {i}"));
    }
    assert_eq!(w.jobs.len(), 2, "two jobs at once per person");
    let refused: Vec<Element> = w
        .sent
        .iter()
        .filter(|e| body(e).is_some_and(|b| b.contains("was not run")))
        .cloned()
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(
        refused.iter().all(|e| e.attr("type") == Some("chat")),
        "told privately"
    );
    // Once answered, the next one runs.
    w.run_jobs();
    w.say("bob@example.org/b", "f9", "!show 9");
    assert_eq!(w.jobs.len(), 1);
}

#[test]
fn a_persons_mute_hides_events_from_them_only() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    w.say("bob@example.org/b", "m1", "!mute issue opened");
    w.take("the confirmation", |e| {
        to(e, "bob@example.org/b") && body(e).is_some_and(|b| b.starts_with("hidden for you"))
    });
    w.sent.clear();
    w.deliver(1, "issues.opened.json", "issues");
    w.take("alice sees it", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    w.none("bob does not", |e| {
        to(e, "bob@example.org/b") && body(e).is_some()
    });
}

#[test]
fn search_answers_the_asker_alone_with_the_rooms_earlier_hits() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    w.say("alice@example.org/a", "m1", "the Deploy failed on staging");
    w.say("bob@example.org/b", "m2", "lunch anyone?");
    w.deliver(1, "issues.opened.json", "issues");
    w.say(
        "alice@example.org/a",
        "m3",
        "deploy fixed, it was the certificate",
    );
    w.sent.clear();
    w.say("bob@example.org/b", "m4", "!search DEPLOY");
    let answer = w.take("bob's answer", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("chat")
    });
    let text = body(&answer).expect("a body");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("\"deploy\""), "{text}");
    assert_eq!(lines.len(), 3, "two hits, newest first: {text}");
    assert!(lines[1].contains("Alice: deploy fixed"), "{text}");
    assert!(lines[2].contains("Alice: the Deploy failed"), "{text}");
    assert_eq!(answer.attr("from"), Some(format!("{ROOM}/Forge").as_str()));
    let json = answer
        .get_child("json", "urn:xmpp:json:0")
        .expect("hit ids for bots");
    let v: serde_json::Value = serde_json::from_str(&json.text()).expect("JSON");
    assert_eq!(v["hits"].as_array().map(Vec::len), Some(2), "{v}");
    // Only the asker is told; the question itself stays in the room as any message does.
    w.none("nobody else hears the answer", |e| {
        to(e, "alice@example.org/a") && e.attr("type") == Some("chat")
    });

    // Words in a tracker event's title are found too, and the event's hit carries its link.
    w.sent.clear();
    w.say("alice@example.org/a", "m5", "!search problem");
    let text = body(&w.take("alice's answer", |e| {
        to(e, "alice@example.org/a") && e.attr("type") == Some("chat")
    }))
    .expect("a body");
    assert!(
        text.contains("Forge:") && text.contains("/gogits/hello-world/issues/1"),
        "{text}"
    );

    // An earlier search is not a hit; nothing found says so and how to widen it.
    w.sent.clear();
    w.say("bob@example.org/b", "m6", "!search deploy lunch");
    let text = body(&w.take("no hits", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("chat")
    }))
    .expect("a body");
    assert!(text.starts_with("nothing said in this room"), "{text}");

    // Empty and oversized searches are explained, not run.
    w.sent.clear();
    w.say("bob@example.org/b", "m7", "!search");
    let text = body(&w.take("usage", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("chat")
    }))
    .expect("a body");
    assert!(text.contains("say what to look for"), "{text}");
    w.say(
        "bob@example.org/b",
        "m8",
        &format!("!search {}", "w ".repeat(40)),
    );
    let text = body(&w.take("too many words", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("chat")
    }))
    .expect("a body");
    assert!(text.contains("at most 16 words"), "{text}");
}

#[test]
fn searches_count_against_the_history_query_rate() {
    // At most 3 history queries at once and one a minute more (and as many messages).
    let mut w = World::with(|service, _| {
        *service = Service::new(common::service_config(1, 3), 42);
    });
    w.sync(vec![group(vec![member("bob", "write")])]);
    w.join("bob@example.org/b", "Bob");
    for i in 0..3 {
        w.stanza(&format!(
            "<iq from='bob@example.org/b' to='{ROOM}' type='set' id='q{i}'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>1</max></set></query></iq>"
        ));
    }
    w.sent.clear();
    w.say("bob@example.org/b", "s1", "!search anything");
    let text = body(&w.take("refused", |e| {
        to(e, "bob@example.org/b") && e.attr("type") == Some("chat")
    }))
    .expect("a body");
    assert!(text.contains("too many history searches"), "{text}");
}

#[test]
fn a_comment_deleted_in_the_tracker_is_retracted_from_the_room_and_its_archive() {
    const RETRACT: &str = "urn:xmpp:message-retract:1";
    const HELLO: &str = "hello@rooms.example.org";
    let mut w = hello_world(&[("alice@example.org/a", "Alice")]);
    w.deliver_github("issue_comment.created.json", "issue_comment");
    let posted = w.take("the comment", |e| {
        to(e, "alice@example.org/a") && body(e).is_some_and(|b| b.contains("totally right"))
    });
    let sid = stanza_id(&posted);
    w.sent.clear();

    let deletion = w.deliver_github("issue_comment.deleted.json", "issue_comment");
    let note = w.take("the retraction", |e| {
        to(e, "alice@example.org/a") && e.get_child("retract", RETRACT).is_some()
    });
    let retract = note.get_child("retract", RETRACT).expect("retract");
    assert_eq!(retract.attr("id"), Some(sid.as_str()));
    assert_eq!(note.attr("from"), Some(HELLO));
    let reason = retract
        .children()
        .find(|c| c.name() == "reason")
        .map(|r| r.text())
        .expect("a reason");
    assert_eq!(reason, "the comment was deleted in hub by Codertocat");
    // Nothing else is posted: the deletion's text is not repeated.
    w.none("a message about the deletion", |e| {
        body(e).is_some_and(|b| b.contains("deleted a comment"))
    });
    // The archive keeps a tombstone; search no longer finds the text; the delivery is done.
    let stored = w.store.recent("hello", 10).expect("recent");
    let stone = stored.iter().find(|m| m.id == sid).expect("kept in place");
    assert!(stone.message.bodies.is_empty(), "{stone:?}");
    assert!(w.store.pending_inbox().expect("pending").is_empty());
    let found = w
        .store
        .query(&caseroom::muc::mam::ArchiveQuery::search_before(
            "hello",
            vec!["totally".into()],
            &stored.last().expect("a message").id,
            10,
        ))
        .expect("search");
    assert!(
        found.items.is_empty(),
        "the retracted text is out of the index"
    );

    // The same delivery handled again (replayed after a crash before its answer) retracts nothing
    // more and leaves nothing pending.
    w.sent.clear();
    w.input(Input::Store(StoreEvent::Inbox(vec![deletion])));
    w.none("a second retraction", |e| {
        e.get_child("retract", RETRACT).is_some()
    });
    assert!(w.store.pending_inbox().expect("pending").is_empty());
}

/// Several instances: the comment's deletion, accepted by any instance, is asked of the room's
/// owner (it knows the occupants), who writes the tombstone and announces it; only the service
/// itself can ask.
#[test]
fn with_several_instances_a_deleted_comment_is_retracted_by_the_rooms_owner() {
    const RETRACT: &str = "urn:xmpp:message-retract:1";
    const CLUSTER: &str = "urn:xmpp:caseroom:cluster:0";
    let mut w = hello_world(&[("alice@example.org/a", "Alice")]);
    w.bridge.set_cluster(true);
    w.deliver_github("issue_comment.created.json", "issue_comment");
    let relay = w.take("the relayed comment", |e| {
        e.get_child("relay", CLUSTER).is_some()
    });
    w.input(Input::Stanza(Stanza::try_from(relay).expect("stanza")));
    let posted = w.take("the comment", |e| {
        to(e, "alice@example.org/a") && body(e).is_some_and(|b| b.contains("totally right"))
    });
    let sid = stanza_id(&posted);
    w.sent.clear();

    w.deliver_github("issue_comment.deleted.json", "issue_comment");
    w.none("a retraction by the instance that took the delivery", |e| {
        e.get_child("retract", RETRACT).is_some()
    });
    let ask = w.take("the request to the room's owner", |e| {
        to(e, "hello@rooms.example.org") && e.get_child("retract", CLUSTER).is_some()
    });
    assert_eq!(ask.attr("from"), Some("rooms.example.org"));
    // From anyone else it is an ordinary message: nothing is retracted.
    let forged: Element = String::from(&ask)
        .replace("from=\"rooms.example.org\"", "from=\"alice@example.org/a\"")
        .replace("from='rooms.example.org'", "from='alice@example.org/a'")
        .parse()
        .expect("xml");
    w.input(Input::Stanza(Stanza::try_from(forged).expect("stanza")));
    w.none("a retraction on a forged request", |e| {
        e.get_child("retract", RETRACT).is_some()
    });
    assert_eq!(w.store.pending_inbox().expect("pending").len(), 1);
    w.input(Input::Stanza(Stanza::try_from(ask).expect("stanza")));
    let note = w.take("the retraction", |e| {
        to(e, "alice@example.org/a") && e.get_child("retract", RETRACT).is_some()
    });
    let retract = note.get_child("retract", RETRACT).expect("retract");
    assert_eq!(retract.attr("id"), Some(sid.as_str()));
    let stored = w.store.recent("hello", 10).expect("recent");
    let stone = stored.iter().find(|m| m.id == sid).expect("kept in place");
    assert!(stone.message.bodies.is_empty(), "{stone:?}");
    assert!(
        w.store.pending_inbox().expect("pending").is_empty(),
        "the delivery is done with the owner's retraction"
    );
}

/// Several instances: a relay the server handed to a room's owner as it died is lost with it.
/// The delivery stays pending, and when the linked instances change the instance that accepted it
/// asks again, so the room's next owner posts it; a relay that arrives twice is posted once.
#[test]
fn with_several_instances_a_relay_lost_with_its_owner_is_asked_again_when_the_instances_change() {
    const CLUSTER: &str = "urn:xmpp:caseroom:cluster:0";
    let mut w = hello_world(&[("alice@example.org/a", "Alice")]);
    w.bridge.set_cluster(true);
    w.deliver_github("issue_comment.created.json", "issue_comment");
    w.take("the relay the dying owner never read", |e| {
        e.get_child("relay", CLUSTER).is_some()
    });
    assert_eq!(w.store.pending_inbox().expect("pending").len(), 1);
    w.sent.clear();
    w.input(Input::Epoch);
    let again = w.take("the relay asked again", |e| {
        to(e, "hello@rooms.example.org") && e.get_child("relay", CLUSTER).is_some()
    });
    w.input(Input::Stanza(
        Stanza::try_from(again.clone()).expect("stanza"),
    ));
    w.take("the comment", |e| {
        to(e, "alice@example.org/a") && body(e).is_some_and(|b| b.contains("totally right"))
    });
    assert!(w.store.pending_inbox().expect("pending").is_empty());
    // The first relay reaching an owner after all (it was only slow): archived once, shown once.
    w.input(Input::Stanza(Stanza::try_from(again).expect("stanza")));
    w.none("the comment twice", |e| {
        body(e).is_some_and(|b| b.contains("totally right"))
    });
    let archived = w.store.recent("hello", 10).expect("recent");
    let shown = archived
        .iter()
        .filter(|m| {
            m.message
                .bodies
                .values()
                .any(|b| b.contains("totally right"))
        })
        .count();
    assert_eq!(shown, 1, "{archived:?}");
}

/// The XEP-0359 stanza id a room gave a message.
fn stanza_id(m: &Element) -> String {
    m.children()
        .find(|c| c.name() == "stanza-id")
        .and_then(|c| c.attr("id"))
        .expect("stanza-id")
        .to_owned()
}

/// A world with the static room `hello` that the GitHub tracker `hub` posts to, `people` joined
/// (full JID, nick).
fn hello_world(people: &[(&str, &str)]) -> World {
    let mut w = World::with(|service, _| {
        let cfg = Config::from_toml(CONFIG, &[]).expect("config");
        service.upsert_room(bridge::room_from_config(&cfg.rooms[0]), vec![]);
    });
    for (full, nick) in people {
        w.stanza(&format!(
            "<presence from='{full}' to='hello@rooms.example.org/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ));
    }
    w.sent.clear();
    w
}

#[test]
fn a_review_request_names_the_reviewer_by_their_nick_with_a_mention() {
    let mut w = hello_world(&[
        ("alice@example.org/a", "Alice"),
        ("octocat@example.org/o", "Octo"),
    ]);
    w.deliver_github("pull_request.review_requested.json", "pull_request");
    let m = w.take("the review request", |e| {
        to(e, "octocat@example.org/o") && body(e).is_some()
    });
    let text = body(&m).expect("body");
    // GitHub names the reviewer `octocat`; in this room they are "Octo", which their client highlights.
    assert!(
        text.contains("requested a review of #2") && text.contains(" from Octo —"),
        "{text}"
    );
    let r = m
        .get_child("reference", "urn:xmpp:reference:0")
        .expect("an XEP-0372 mention");
    assert_eq!(r.attr("type"), Some("mention"));
    assert_eq!(r.attr("uri"), Some("xmpp:octocat@example.org"));
    let (begin, end): (usize, usize) = (
        r.attr("begin").and_then(|b| b.parse().ok()).expect("begin"),
        r.attr("end").and_then(|e| e.parse().ok()).expect("end"),
    );
    let named: String = text.chars().skip(begin).take(end - begin).collect();
    assert_eq!(named, "Octo");
    // Not in the room: named by login, still mentioned by JID.
    let mut w = hello_world(&[("alice@example.org/a", "Alice")]);
    w.deliver_github("pull_request.review_requested.json", "pull_request");
    let m = w.take("the review request", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    assert!(body(&m).is_some_and(|b| b.contains(" from octocat —")));
    assert!(m.get_child("reference", "urn:xmpp:reference:0").is_some());
}

#[test]
fn a_burst_of_label_changes_on_one_case_is_one_message() {
    let mut w = hello_world(&[("alice@example.org/a", "Alice")]);
    let labeled = |e: &Element| {
        to(e, "alice@example.org/a") && body(e).is_some_and(|b| b.contains(" labeled #1"))
    };
    // Three label changes a second apart (label_burst is 5 s): nothing yet.
    for id in [1, 2, 3] {
        w.github_row(id, "issues.labeled.json", "issues");
        w.now += Duration::seconds(1);
        w.input(Input::Tick);
    }
    w.none("a label message during the burst", labeled);
    // Five quiet seconds later: one message, with the labels after the last change.
    w.now += Duration::seconds(5);
    w.input(Input::Tick);
    let m = w.take("the one label message", labeled);
    assert!(
        body(&m).is_some_and(|b| b.contains("(bug)")),
        "{}",
        String::from(&m)
    );
    w.none("a second label message", labeled);

    // Another event on the case posts its held label change first, then itself.
    w.github_row(4, "issues.labeled.json", "issues");
    w.github_row(5, "issue_comment.created.json", "issue_comment");
    let first = w.take("a message", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    assert!(labeled(&first), "{}", String::from(&first));
    w.take("then the comment", |e| {
        to(e, "alice@example.org/a") && body(e).is_some_and(|b| b.contains("commented on #1"))
    });
    // A burst that never pauses is still posted, after four windows at most.
    for id in 10..40 {
        w.github_row(id, "issues.labeled.json", "issues");
        w.now += Duration::seconds(1);
        w.input(Input::Tick);
    }
    w.take("a label message despite the endless burst", labeled);
}

#[test]
fn a_membership_webhook_wakes_the_sync() {
    let mut w = World::new();
    w.sync(vec![group(vec![member("alice", "owner")])]);
    let body = br#"{"action":"added","repository":{"full_name":"gogits/hello-world"},"sender":{"login":"alice"}}"#;
    let item = InboxItem {
        tracker: "forge".into(),
        delivery: Some("m-1".into()),
        received: 1,
        content_type: Some("application/json".into()),
        headers: vec![("x-gitea-event".into(), "member".into())],
        body: body.to_vec(),
        body_hash: None,
        packed: None,
        doc: None,
    };
    w.input(Input::Store(StoreEvent::Inbox(vec![InboxRow {
        id: 5,
        item,
    }])));
    assert_eq!(w.resyncs, vec!["forge".to_owned()]);
}

#[test]
fn adhoc_sessions_expire_and_wrong_ids_are_refused() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    let cmd = |sid: &str, action: &str| {
        format!(
            "<iq from='alice@example.org/a' to='{ROOM}' type='set' id='q'>\
             <command xmlns='http://jabber.org/protocol/commands' node='my-filters' {sid} {action}/></iq>"
        )
    };
    w.stanza(&cmd("", "action='execute'"));
    let form = w.take("the form", |e| {
        e.name() == "iq" && e.attr("type") == Some("result")
    });
    let sid = form
        .get_child("command", "http://jabber.org/protocol/commands")
        .and_then(|c| c.attr("sessionid"))
        .expect("a session id")
        .to_owned();
    // (A cancel of any session is simply answered "canceled".)
    w.stanza(&cmd("sessionid='not-mine'", "action='complete'"));
    let err = w.take("bad-sessionid", |e| e.attr("type") == Some("error"));
    assert!(
        String::from(&err).contains("bad-sessionid"),
        "{}",
        String::from(&err)
    );
    // Another member cannot continue alice's session.
    w.stanza(&format!(
        "<iq from='bob@example.org/b' to='{ROOM}' type='set' id='q'>\
         <command xmlns='http://jabber.org/protocol/commands' node='my-filters' sessionid='{sid}' action='complete'/></iq>"
    ));
    let err = w.take("not hers", |e| e.attr("type") == Some("error"));
    assert!(
        String::from(&err).contains("bad-sessionid"),
        "{}",
        String::from(&err)
    );
    // At most eight open sessions per person: a ninth drops her oldest, the others stay.
    let mut sids = vec![sid.clone()];
    for _ in 0..8 {
        w.stanza(&cmd("", "action='execute'"));
        let form = w.take("a form", |e| {
            e.name() == "iq" && e.attr("type") == Some("result")
        });
        sids.push(
            form.get_child("command", "http://jabber.org/protocol/commands")
                .and_then(|c| c.attr("sessionid"))
                .expect("a session id")
                .to_owned(),
        );
    }
    w.stanza(&cmd(
        &format!("sessionid='{}'", sids[0]),
        "action='complete'",
    ));
    let gone = w.take("the oldest is gone", |e| e.name() == "iq");
    assert!(
        String::from(&gone).contains("bad-sessionid"),
        "{}",
        String::from(&gone)
    );
    w.stanza(&cmd(
        &format!("sessionid='{}'", sids[1]),
        "action='complete'",
    ));
    let kept = w.take("the second is kept", |e| e.name() == "iq");
    // (It is still known: what is wrong now is only the missing form.)
    assert!(
        String::from(&kept).contains("bad-payload"),
        "{}",
        String::from(&kept)
    );
    let sid = sids[2].clone();
    // Sixteen minutes later the session is gone.
    w.now += Duration::minutes(16);
    w.stanza(&cmd(&format!("sessionid='{sid}'"), "action='complete'"));
    let err = w.take("expired", |e| e.attr("type") == Some("error"));
    assert!(String::from(&err).contains("bad-sessionid"));
}

#[test]
fn an_event_for_a_project_without_a_room_is_recorded_not_posted() {
    let mut w = World::new();
    // No sync: no room for gogits/hello-world.
    w.deliver(3, "issues.opened.json", "issues");
    assert!(w.sent.is_empty());
    assert_eq!(
        w.counters
            .ignored
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn after_a_restart_commands_run_before_the_first_sync() {
    // The room and its last sync (room → group) come from the store; no sync has run yet.
    let mut w = World::with(|service, commands| {
        let mut affiliations = std::collections::BTreeMap::new();
        affiliations.insert(
            "alice@example.org".parse().expect("jid"),
            xmpp_parsers::muc::user::Affiliation::Owner,
        );
        service.upsert_room(
            caseroom::muc::RoomInfo {
                name: "gogits-hello-world".into(),
                title: "Hello World".into(),
                description: String::new(),
                anonymous: false,
                subject: String::new(),
                affiliations,
            },
            vec![],
        );
        commands.restore(
            [(
                "forge".to_string(),
                [(
                    "gogits-hello-world".to_string(),
                    "gogits/hello-world".to_string(),
                )]
                .into(),
            )]
            .into(),
        );
    });
    w.join("alice@example.org/a", "Alice");
    w.say("alice@example.org/a", "r1", "!close 1 done");
    assert_eq!(w.jobs.len(), 1, "the command runs at once");
    w.run_jobs();
    assert_eq!(
        w.fake.calls.lock().expect("calls")[0].2,
        "gogits/hello-world",
        "in the room's group, known from the store"
    );
}

#[test]
fn a_command_resent_after_a_restart_runs_once() {
    let mut w = World::new();
    w.sync(vec![group(vec![member("bob", "write")])]);
    w.join("bob@example.org/b", "Bob");
    w.say("bob@example.org/b", "c1", "!comment 1 works for me");
    w.run_jobs();
    assert_eq!(w.fake.calls.lock().expect("calls").len(), 1);
    // caseroom restarts; Bob's client, unsure its message went out, sends it again after rejoining.
    let mut w = w.restart();
    w.join("bob@example.org/b", "Bob");
    w.say("bob@example.org/b", "c1", "!comment 1 works for me");
    assert!(
        w.jobs.is_empty(),
        "recognised in the room's history: not run again"
    );
    // The same text under a new id is a new command.
    w.say("bob@example.org/b", "c2", "!comment 1 works for me");
    assert_eq!(w.jobs.len(), 1);
}

/// An owner adds someone by JID (XEP-0045 §9.3), outside what the tracker knows.
fn add_member(w: &mut World, owner: &str, jid: &str) {
    w.stanza(&format!(
        "<iq from='{owner}' to='{ROOM}' type='set' id='aff'>\
         <query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='{jid}'/></query></iq>"
    ));
    w.take("the admin result", |e| {
        e.name() == "iq" && e.attr("id") == Some("aff") && e.attr("type") == Some("result")
    });
    w.sent.clear();
}

#[test]
fn identity_rules_decide_who_acts_and_strangers_are_told_how_to_link() {
    let mut w = World::new();
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("carol", "write"),
    ])]);
    // carol is mapped explicitly to a JID outside the identity domain; the map wins.
    w.join("carol.w@partner.net/c", "Carol");
    w.say("carol.w@partner.net/c", "i1", "!comment 1 seen it");
    w.run_jobs();
    {
        let calls = w.fake.calls.lock().expect("calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].0.as_str(), calls[0].1.as_str()),
            ("comment", "carol")
        );
    }
    assert_eq!(
        w.fake.tokens.lock().expect("tokens").clone(),
        vec![None],
        "through the admin key"
    );
    // dave@partner.net was let in by an owner, but no rule names his tracker account.
    add_member(&mut w, "alice@example.org/a", "dave@partner.net");
    w.join("dave@partner.net/d", "Dave");
    w.say("dave@partner.net/d", "i2", "!close 1 fixed");
    assert!(w.jobs.is_empty(), "nothing runs as nobody");
    let told = w.take("a private explanation", |e| {
        to(e, "dave@partner.net/d")
            && e.attr("type") == Some("chat")
            && body(e).is_some_and(|b| b.contains("I don't know your forge account"))
    });
    assert!(
        body(&told).is_some_and(
            |b| b.contains("Link my tracker account") && b.contains("dave@partner.net")
        ),
        "says how to fix it"
    );
    w.none("a bot answer in the room", |e| {
        e.attr("type") == Some("groupchat") && e.attr("from") == Some(&*format!("{ROOM}/Forge"))
    });
    // Someone at the identity domain is their node there: eve@example.org is eve.
    add_member(&mut w, "alice@example.org/a", "eve@example.org");
    w.join("eve@example.org/e", "Eve");
    w.say("eve@example.org/e", "i3", "!show 1");
    w.run_jobs();
    assert_eq!(w.fake.calls.lock().expect("calls")[1].1, "eve");
}

#[test]
fn a_linked_token_acts_as_its_owner_until_unlinked() {
    let mut w = World::with(|_, commands| {
        commands.links = Some(caseroom::links::Links::default());
    });
    let links_path = w.links_path();
    w.sync(vec![group(vec![member("alice", "owner")])]);
    add_member(&mut w, "alice@example.org/a", "dave@partner.net");
    let link = |sid: &str, form: &str| {
        format!(
            "<iq from='dave@partner.net/d' to='{ROOM}' type='set' id='l'>\
             <command xmlns='http://jabber.org/protocol/commands' node='link-account' {sid}>{form}</command></iq>"
        )
    };
    let submit = |fields: &str| format!("<x xmlns='jabber:x:data' type='submit'>{fields}</x>");
    let session = |w: &mut World| -> String {
        w.stanza(&link("action='execute'", ""));
        let form = w.take("the link form", |e| {
            e.name() == "iq" && e.attr("type") == Some("result")
        });
        form.get_child("command", "http://jabber.org/protocol/commands")
            .and_then(|c| c.attr("sessionid"))
            .expect("a session id")
            .to_owned()
    };
    let note = |w: &mut World| -> String {
        let done = w.take("the completion", |e| {
            e.name() == "iq" && e.attr("type") == Some("result")
        });
        done.get_child("command", "http://jabber.org/protocol/commands")
            .and_then(|c| c.get_child("note", "http://jabber.org/protocol/commands"))
            .map(|n| n.text())
            .expect("a note")
    };

    // A token the tracker does not accept links nothing.
    let sid = session(&mut w);
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        &submit("<field var='token'><value>forged</value></field>"),
    ));
    assert_eq!(w.jobs.len(), 1, "the token is checked with the tracker");
    w.run_jobs();
    let refused = note(&mut w);
    assert!(refused.contains("did not accept this token"), "{refused}");
    assert!(
        !links_path.exists()
            || !std::fs::read_to_string(&links_path)
                .expect("links")
                .contains("forged")
    );

    // dave's own token: he acts as dave, with it, from now on.
    let sid = session(&mut w);
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        &submit("<field var='token'><value>tok-dave</value></field>"),
    ));
    w.run_jobs();
    let linked = note(&mut w);
    assert!(linked.contains("you act as dave"), "{linked}");
    let saved = std::fs::read_to_string(&links_path).expect("links file");
    assert!(saved.contains("tok-dave"), "kept across restarts");
    w.join("dave@partner.net/d", "Dave");
    w.say("dave@partner.net/d", "k1", "!comment 1 on it");
    w.run_jobs();
    assert_eq!(w.fake.calls.lock().expect("calls")[0].1, "dave");
    assert_eq!(
        w.fake.tokens.lock().expect("tokens").clone(),
        vec![Some("tok-dave".to_owned())],
        "with his own token, not the admin key"
    );

    // Unlinked: caseroom no longer acts as him.
    let sid = session(&mut w);
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        &submit("<field var='unlink'><value>1</value></field>"),
    ));
    let unlinked = note(&mut w);
    assert!(unlinked.contains("unlinked"), "{unlinked}");
    // What a shared store is given: the one change, each time.
    let changes: Vec<_> = w
        .link_changes
        .iter()
        .map(|c| (c.jid.as_str(), c.link.as_ref().map(|l| l.token.as_str())))
        .collect();
    assert_eq!(
        changes,
        [
            ("dave@partner.net", Some("tok-dave")),
            ("dave@partner.net", None)
        ]
    );
    assert!(!std::fs::read_to_string(&links_path)
        .expect("links file")
        .contains("tok-dave"));
    w.sent.clear();
    w.say("dave@partner.net/d", "k2", "!comment 1 again");
    assert!(w.jobs.is_empty());
    w.take("the explanation", |e| {
        to(e, "dave@partner.net/d")
            && body(e).is_some_and(|b| b.contains("I don't know your forge account"))
    });

    // Linked again, then the disk refuses the unlink: he is told plainly what that means.
    let sid = session(&mut w);
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        &submit("<field var='token'><value>tok-dave</value></field>"),
    ));
    w.run_jobs();
    assert!(note(&mut w).contains("you act as dave"));
    std::fs::remove_file(&links_path).expect("remove");
    std::fs::create_dir(&links_path).expect("a directory where the file goes");
    let sid = session(&mut w);
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        &submit("<field var='unlink'><value>1</value></field>"),
    ));
    let failed = note(&mut w);
    assert!(
        failed.contains("could not write") && failed.contains("Revoke the token"),
        "{failed}"
    );
}

/// A tracker's OAuth endpoints on loopback, as RFC 8628 and GitLab's docs describe them: the device
/// authorization answer, then one `authorization_pending` before the grant; refresh grants count up.
/// Returns the base URL and the form bodies it received.
fn oauth_server() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::post;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let state = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let json = |status: StatusCode, v: serde_json::Value| {
                (status, [("content-type", "application/json")], v.to_string()).into_response()
            };
            let app = axum::Router::new()
                .route(
                    "/oauth/authorize_device",
                    post(move |State(seen): State<Arc<Mutex<Vec<String>>>>, body: String| async move {
                        seen.lock().expect("seen").push(body);
                        json(StatusCode::OK, serde_json::json!({
                            "device_code": "GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS",
                            "user_code": "WDJB-MJHT",
                            "verification_uri": "https://gitlab.example.com/oauth/device",
                            "verification_uri_complete": "https://gitlab.example.com/oauth/device?user_code=WDJB-MJHT",
                            "expires_in": 300,
                            "interval": 1
                        }))
                    }),
                )
                .route(
                    "/oauth/token",
                    post(move |State(seen): State<Arc<Mutex<Vec<String>>>>, body: String| async move {
                        let mut seen = seen.lock().expect("seen");
                        seen.push(body.clone());
                        let polls = seen.iter().filter(|b| b.contains("device_code=")).count();
                        let refreshes = seen.iter().filter(|b| b.contains("grant_type=refresh_token")).count();
                        if body.contains("grant_type=refresh_token") && refreshes > 1 {
                            // The second refresh token was revoked meanwhile.
                            json(StatusCode::BAD_REQUEST, serde_json::json!({
                                "error": "invalid_grant",
                                "error_description": "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client."
                            }))
                        } else if body.contains("grant_type=refresh_token") {
                            json(StatusCode::OK, serde_json::json!({
                                "access_token": "tok-dave", "token_type": "Bearer", "expires_in": 7200,
                                "refresh_token": format!("r-{}", refreshes + 1), "created_at": 1607635748
                            }))
                        } else if polls < 3 {
                            // RFC 8628 §3.5: 400 with error=authorization_pending.
                            json(StatusCode::BAD_REQUEST, serde_json::json!({
                                "error": "authorization_pending",
                                "error_description": "The authorization request is still pending."
                            }))
                        } else {
                            json(StatusCode::OK, serde_json::json!({
                                "access_token": "tok-dave", "token_type": "Bearer", "expires_in": 7200,
                                "refresh_token": "r-1", "created_at": 1607635748
                            }))
                        }
                    }),
                )
                .with_state(state);
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    (base, seen)
}

/// Several instances: a person linked through another instance (the shared store's listener
/// hands the links over) acts with their token here; unlinked there, not any more.
#[test]
fn a_link_made_on_another_instance_is_used_here() {
    let mut w = World::with(|_, commands| {
        commands.links = Some(caseroom::links::Links::default());
    });
    w.sync(vec![group(vec![member("alice", "owner")])]);
    add_member(&mut w, "alice@example.org/a", "dave@partner.net");
    w.join("dave@partner.net/d", "Dave");
    let mut links = caseroom::links::Links::default();
    links.set(
        "forge",
        "dave@partner.net",
        caseroom::links::Link::token("dave".into(), "tok-dave".into()),
    );
    w.input(Input::LinksLoaded(links));
    w.say("dave@partner.net/d", "s1", "!comment 1 from the other side");
    w.run_jobs();
    assert_eq!(
        w.fake.tokens.lock().expect("tokens").clone(),
        vec![Some("tok-dave".to_owned())]
    );
    assert!(w.link_changes.is_empty(), "read, not written again");
    w.input(Input::LinksLoaded(caseroom::links::Links::default()));
    w.sent.clear();
    w.say("dave@partner.net/d", "s2", "!comment 1 again");
    assert!(w.jobs.is_empty());
    w.take("the explanation", |e| {
        to(e, "dave@partner.net/d")
            && body(e).is_some_and(|b| b.contains("I don't know your forge account"))
    });
}

#[test]
fn linking_in_the_browser_polls_the_device_flow_and_refreshes_the_token() {
    let (base, seen) = oauth_server();
    // The forge tracker as a GitLab with an OAuth application that offers the device flow.
    let config = CONFIG
        .replace("kind = \"gitea\"", "kind = \"gitlab\"")
        .replace(
            "url = \"https://forge.example.org\"",
            &format!("url = \"{base}\"\noauth_client_id = \"caseroom-demo-app\""),
        );
    let mut w = World::with_config(&config);
    let links_path = w.links_path();
    w.sync(vec![group(vec![member("alice", "owner")])]);
    add_member(&mut w, "alice@example.org/a", "dave@partner.net");
    let link = |sid: &str, form: &str| {
        format!(
            "<iq from='dave@partner.net/d' to='{ROOM}' type='set' id='l'>\
             <command xmlns='http://jabber.org/protocol/commands' node='link-account' {sid}>{form}</command></iq>"
        )
    };
    w.stanza(&link("action='execute'", ""));
    let form = w.take("the link form", |e| {
        e.name() == "iq" && e.attr("type") == Some("result")
    });
    assert!(
        String::from(&form).contains("link in your browser"),
        "{}",
        String::from(&form)
    );
    let sid = form
        .get_child("command", "http://jabber.org/protocol/commands")
        .and_then(|c| c.attr("sessionid"))
        .expect("a session id")
        .to_owned();
    // An empty token: the device flow. The form is answered with the address and the code.
    w.stanza(&link(
        &format!("sessionid='{sid}'"),
        "<x xmlns='jabber:x:data' type='submit'><field var='token'><value/></field></x>",
    ));
    assert!(matches!(w.jobs.as_slice(), [Job::DeviceStart { .. }]));
    w.run_jobs();
    let done = w.take("the code", |e| {
        e.name() == "iq" && e.attr("type") == Some("result")
    });
    let note = done
        .get_child("command", "http://jabber.org/protocol/commands")
        .and_then(|c| c.get_child("note", "http://jabber.org/protocol/commands"))
        .map(|n| n.text())
        .expect("a note");
    assert!(
        note.contains("https://gitlab.example.com/oauth/device?user_code=WDJB-MJHT")
            && note.contains("WDJB-MJHT"),
        "{note}"
    );
    // caseroom polls (pending twice, then the grant), asks whose the token is, keeps the link and
    // says so in a chat message.
    assert!(matches!(w.jobs.as_slice(), [Job::DevicePoll { .. }]));
    w.run_jobs();
    let told = w.take("the chat message", |e| {
        to(e, "dave@partner.net") && e.attr("type") == Some("chat")
    });
    assert!(
        body(&told).is_some_and(|b| b.contains("you act as dave")),
        "{}",
        String::from(&told)
    );
    let saved = std::fs::read_to_string(&links_path).expect("links file");
    assert!(
        saved.contains("\"refresh_token\": \"r-1\"") && saved.contains("expires_at"),
        "{saved}"
    );
    {
        let bodies = seen.lock().expect("seen");
        assert!(
            bodies[0].contains("client_id=caseroom-demo-app") && bodies[0].contains("scope=api"),
            "{bodies:?}"
        );
        assert!(
            bodies[1].contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code"),
            "{bodies:?}"
        );
    }
    // dave now acts with the linked token.
    w.join("dave@partner.net/d", "Dave");
    w.say(
        "dave@partner.net/d",
        "c9",
        "!comment 1 linked in the browser",
    );
    w.run_jobs();
    assert_eq!(
        w.fake
            .tokens
            .lock()
            .expect("tokens")
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("tok-dave")
    );
    // Several instances share the links: only the leader refreshes them (a refresh token spent
    // twice would fail the second time), so a follower leaves it.
    w.now = Utc::now() + Duration::minutes(116);
    w.input(Input::Leading(false));
    w.input(Input::Tick);
    assert!(
        w.jobs.is_empty(),
        "a follower leaves refreshes to the leader"
    );
    w.input(Input::Leading(true));
    // Two hours later (the token's life, on the real clock the driver stamped it with) the token
    // is refreshed before it expires, once.
    w.now = Utc::now() + Duration::minutes(118);
    w.input(Input::Tick);
    assert!(
        matches!(w.jobs.as_slice(), [Job::Refresh { .. }]),
        "one refresh"
    );
    w.now += Duration::seconds(61);
    w.input(Input::Tick);
    assert_eq!(w.jobs.len(), 1, "not asked twice while it runs");
    w.run_jobs();
    let saved = std::fs::read_to_string(&links_path).expect("links file");
    assert!(saved.contains("\"refresh_token\": \"r-2\""), "{saved}");
    // A refresh the tracker refuses is not asked again every minute: ten minutes later.
    w.now += Duration::seconds(61);
    w.input(Input::Tick);
    assert!(matches!(w.jobs.as_slice(), [Job::Refresh { .. }]));
    w.run_jobs();
    w.now += Duration::seconds(61);
    w.input(Input::Tick);
    assert!(w.jobs.is_empty(), "backing off after the refusal");
    w.now += Duration::minutes(10);
    w.input(Input::Tick);
    assert!(
        matches!(w.jobs.as_slice(), [Job::Refresh { .. }]),
        "tried again later"
    );
}

/// Several instances (PostgreSQL, ejabberd balancing by room): a tracker event is sent to the room's
/// JID from the service's own domain, for the instance serving the room to post; a sync's change to
/// a room is announced the same way once it is written. Here the server's routing is played by
/// feeding the sent request back, as it would reach the room's owner.
#[test]
fn with_several_instances_events_and_room_changes_go_to_the_rooms_owner() {
    let mut w = World::new();
    w.bridge.set_cluster(true);
    w.sync(vec![group(vec![
        member("alice", "owner"),
        member("bob", "write"),
    ])]);
    let reload = w.take("the announcement of the new members", |e| {
        to(e, ROOM)
            && e.get_child("reload", "urn:xmpp:caseroom:cluster:0")
                .is_some()
    });
    assert_eq!(reload.attr("from"), Some("rooms.example.org"));
    w.input(Input::Stanza(Stanza::try_from(reload).expect("stanza")));
    w.join("alice@example.org/a", "Alice");
    w.join("bob@example.org/b", "Bob");
    w.deliver(1, "issues.opened.json", "issues");
    // Not posted here: asked of the room's owner.
    w.none("a post without the owner", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    let relay = w.take("the relayed event", |e| {
        to(e, ROOM)
            && e.get_child("relay", "urn:xmpp:caseroom:cluster:0")
                .is_some()
    });
    // A forged request from a member is an ordinary message to the room, never a bot's post.
    let forged: Element = String::from(&relay)
        .replace("from='rooms.example.org'", "from='bob@example.org/b'")
        .replace("from=\"rooms.example.org\"", "from=\"bob@example.org/b\"")
        .parse()
        .expect("xml");
    assert_eq!(forged.attr("from"), Some("bob@example.org/b"));
    w.input(Input::Stanza(Stanza::try_from(forged).expect("stanza")));
    w.none("a post from a forged request", |e| {
        e.attr("from") == Some(&*format!("{ROOM}/Forge")) && body(e).is_some()
    });
    // The owner (this instance, as the server routed it here) posts it, once even if asked twice.
    for _ in 0..2 {
        w.input(Input::Stanza(
            Stanza::try_from(relay.clone()).expect("stanza"),
        ));
    }
    let m = w.take("the event", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    assert_eq!(m.attr("from"), Some(&*format!("{ROOM}/Forge")));
    assert!(m.get_child("json", "urn:xmpp:json:0").is_some());
    w.none("a second copy", |e| {
        to(e, "alice@example.org/a") && body(e).is_some()
    });
    assert_eq!(
        w.store
            .recent("gogits-hello-world", 10)
            .expect("recent")
            .len(),
        1
    );
    // bob loses access: the owner learns it from the store and removes him (321).
    w.sync(vec![group(vec![member("alice", "owner")])]);
    let reload = w.take("the announcement", |e| {
        to(e, ROOM)
            && e.get_child("reload", "urn:xmpp:caseroom:cluster:0")
                .is_some()
    });
    w.sent.clear();
    w.input(Input::Stanza(Stanza::try_from(reload).expect("stanza")));
    w.none(
        "a second removal (the leader's own copy removed him already)",
        |e| to(e, "bob@example.org/b") && e.attr("type") == Some("unavailable"),
    );
}
