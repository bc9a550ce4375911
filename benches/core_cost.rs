//! caseroom's own CPU per delivered room message, in-process, without servers: the MUC core handling
//! one occupant's message in a room of 50, the archive write (a real SQLite store, configured as in
//! production), and the link's serialisation of every copy. Splits the figure that
//! `cargo bench --bench muc` reports for the whole process into its parts.
//!
//! Also the MUC core's memory per idle occupant: live heap bytes (a counting allocator) before and
//! after 1,000 sessions join 20 rooms, exactly, where the process's RSS (`cargo bench --bench scale`)
//! moves by pages and reuses what start-up freed.
//!
//! Run: `cargo bench --bench core_cost`.

use std::time::Instant;

use caseroom::muc::{Effect, RoomInfo, Service};
use caseroom::store::Store;
use caseroom::xmpp::wire::Template;
use chrono::{Duration, TimeZone, Utc};
use minidom::Element;
use xmpp_parsers::muc::user::Affiliation;
use xmpp_parsers::stanza::Stanza;

/// Counts live heap bytes (what is allocated and not yet freed).
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

const OCCUPANTS: usize = 50;
const MESSAGES: usize = 2000;

fn stanza(xml: &str) -> Stanza {
    let el: Element = xml.parse().expect("literal");
    Stanza::try_from(el).expect("stanza")
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(&dir.path().join("bench.db")).expect("store");
    // As configured by default (store.fsync_messages = false); CASEROOM_BENCH_FSYNC=1 fsyncs each.
    store.set_fsync_messages(std::env::var("CASEROOM_BENCH_FSYNC").is_ok_and(|v| v == "1"));
    let mut svc = Service::new(service_config(), 1);
    svc.upsert_room(room("bench", load_members()), vec![]);
    delivery_cost(svc, store);
    idle_occupants();
}

/// The load users load01…load50, members.
fn load_members() -> std::collections::BTreeMap<xmpp_parsers::jid::BareJid, Affiliation> {
    (1..=OCCUPANTS)
        .map(|i| {
            let jid = format!("load{i:02}@localhost").parse().expect("jid");
            (jid, Affiliation::Member)
        })
        .collect()
}

fn room(
    name: &str,
    affiliations: std::collections::BTreeMap<xmpp_parsers::jid::BareJid, Affiliation>,
) -> RoomInfo {
    RoomInfo {
        name: name.into(),
        title: name.into(),
        description: String::new(),
        anonymous: false,
        subject: String::new(),
        affiliations,
    }
}

/// No rate limit: the bench measures cost, not policy.
const UNLIMITED: caseroom::muc::limits::Rate = caseroom::muc::limits::Rate {
    per_minute: u32::MAX,
    burst: u32::MAX,
};

fn service_config() -> caseroom::muc::ServiceConfig {
    caseroom::muc::ServiceConfig {
        domain: "rooms.localhost".parse().expect("domain"),
        name: "caseroom".into(),
        mam_max_page: 100,
        default_history: 20,
        occupant_salt: "salt".into(),
        reserved_nicks: vec![],
        message_rate: UNLIMITED,
        query_rate: UNLIMITED,
        join_rate: UNLIMITED,
        presence_rate: UNLIMITED,
        waiting_per_room: 256,
    }
}

/// One occupant's messages into a room of `OCCUPANTS`: the CPU of each part per delivered copy.
fn delivery_cost(mut svc: Service, mut store: Store) {
    let mut now = Utc
        .with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
        .single()
        .expect("date");
    for i in 1..=OCCUPANTS {
        let _ = svc.handle(
            stanza(&format!("<presence xmlns='jabber:component:accept' from='load{i:02}@localhost/bench' to='bench@rooms.localhost/load{i:02}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>")),
            now,
        );
    }
    let (mut core, mut archive, mut wire) = (0f64, 0f64, 0f64);
    let mut copies = 0usize;
    for n in 0..MESSAGES {
        now += Duration::milliseconds(5);
        let input = stanza(&format!("<message xmlns='jabber:component:accept' xml:lang='en' from='load01@localhost/bench' to='bench@rooms.localhost' type='groupchat'><body>bench message {n}</body></message>"));
        let t = Instant::now();
        let effects = svc.handle(input, now);
        core += t.elapsed().as_secs_f64();
        for e in effects {
            if let Effect::Archive(m) = e {
                let t = Instant::now();
                store.append(std::slice::from_ref(&m)).expect("append");
                archive += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let more = svc.archived(m);
                core += t.elapsed().as_secs_f64();
                for e in more {
                    if let Effect::Broadcast(b) = e {
                        let t = Instant::now();
                        let tpl = Template::new(&Element::from(b.stanza)).expect("template");
                        for to in b.to.iter() {
                            let c = tpl.copy_for(to.as_str());
                            copies += 1;
                            std::hint::black_box(c);
                        }
                        wire += t.elapsed().as_secs_f64();
                    }
                }
            }
        }
    }
    let per = |s: f64| s / copies as f64 * 1e6;
    println!("caseroom core cost: {MESSAGES} messages into a room of {OCCUPANTS}, {copies} copies");
    println!(
        "  MUC core (handle + archived)      {:.2} us per delivery",
        per(core)
    );
    println!(
        "  archive write (one commit each)   {:.2} us per delivery (wall time, fsync included)",
        per(archive)
    );
    println!(
        "  serialisation (template + copies) {:.2} us per delivery",
        per(wire)
    );
    println!(
        "  total                             {:.2} us per delivery",
        per(core + archive + wire)
    );
}

/// Live heap of the MUC core per idle occupant: 20 rooms of 50 members, each of the 50 people
/// joining every room from a session of its own (1,000 sessions), with a client's usual join
/// presence (XEP-0115 caps, kept to relay it; the MUC element is not kept).
fn idle_occupants() {
    const ROOMS: usize = 20;
    let mut svc = Service::new(service_config(), 2);
    for r in 0..ROOMS {
        svc.upsert_room(room(&format!("room{r}"), load_members()), vec![]);
    }
    let now = Utc
        .with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
        .single()
        .expect("date");
    // Each join presence is parsed inside the loop and freed by it: what stays is what the core keeps.
    let n = ROOMS * OCCUPANTS;
    let before = live();
    for r in 0..ROOMS {
        for i in 1..=OCCUPANTS {
            let join = stanza(&format!("<presence xmlns='jabber:component:accept' from='load{i:02}@localhost/idle{r:02}' to='room{r}@rooms.localhost/load{i:02}'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://conversations.im' ver='Rc3CxLaJnHFh2cRoS8Y1dUOZdBk='/><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"));
            drop(svc.handle(join, now));
        }
    }
    let after = live();
    let joined: usize = svc.rooms().map(|r| r.occupants().count()).sum();
    assert_eq!(joined, n, "every session joined");
    println!(
        "  MUC core memory: {n} idle occupants in {ROOMS} rooms: {:.0} bytes of live heap each   (target <= 2 KiB)",
        after.saturating_sub(before) as f64 / n as f64
    );
    std::hint::black_box(svc);
}
