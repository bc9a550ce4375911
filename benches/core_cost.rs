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

use std::sync::Arc;

use caseroom::muc::{Effect, RoomInfo, Service, Shared};
use caseroom::store::Store;
use caseroom::xmpp::wire::Template;
use chrono::{Duration, TimeZone, Utc};
use minidom::Element;
use xmpp_parsers::muc::user::Affiliation;
use xmpp_parsers::stanza::Stanza;

/// Counts live heap bytes (what is allocated and not yet freed).
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Allocations so far (each `alloc` and each `realloc` that moves or grows a block counts one).
static ALLOCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

fn allocs() -> usize {
    ALLOCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Time and allocations of one part of the work, summed over the messages.
#[derive(Default)]
struct Part {
    secs: f64,
    allocs: usize,
}

impl Part {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (t, a) = (Instant::now(), allocs());
        let out = f();
        self.secs += t.elapsed().as_secs_f64();
        self.allocs += allocs() - a;
        out
    }
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
    let (mut core, mut archive, mut wire) = (Part::default(), Part::default(), Part::default());
    let mut copies = 0usize;
    let mut buf = Vec::with_capacity(64 * 1024);
    for n in 0..MESSAGES {
        now += Duration::milliseconds(5);
        let input = stanza(&format!("<message xmlns='jabber:component:accept' xml:lang='en' from='load01@localhost/bench' to='bench@rooms.localhost' type='groupchat'><body>bench message {n}</body></message>"));
        let effects = core.time(|| svc.handle(input, now));
        for e in effects {
            if let Effect::Archive(m) = e {
                // As the bridge does: the message serialised and read for search before the store
                // thread gets it (counted with the core: the same thread).
                let a = core.time(|| caseroom::store::Appended::prepared(m));
                // As the store thread does: one commit, the search index when its batch is due.
                archive.time(|| {
                    store
                        .commit_appended(&[], std::slice::from_ref(&a))
                        .expect("commit");
                    store.index_pending(false).expect("index")
                });
                let more = core.time(|| svc.archived(a.message));
                for e in more {
                    if let Effect::Broadcast(b) = e {
                        copies += wire.time(|| {
                            // A room message comes serialised by the core; anything else is
                            // serialised by the link. Copies go into one buffer, as the link's.
                            let tpl = match b.what {
                                Shared::Message { template, .. } => template,
                                Shared::Stanza(s) => {
                                    Arc::new(Template::new(&Element::from(s)).expect("template"))
                                }
                            };
                            for to in b.to.iter() {
                                buf.clear();
                                tpl.write_for(to.as_str(), &mut buf);
                                std::hint::black_box(&buf);
                            }
                            b.to.len()
                        });
                    }
                }
            }
        }
    }
    let per = |p: &Part| p.secs / copies as f64 * 1e6;
    let each = |p: &Part| p.allocs as f64 / MESSAGES as f64;
    println!("caseroom core cost: {MESSAGES} messages into a room of {OCCUPANTS}, {copies} copies");
    println!("  part                                   CPU per delivery   allocations per message");
    for (name, p) in [
        ("MUC core (handle, archived, MAM bytes)", &core),
        ("archive write (one commit each)", &archive),
        ("the copies (link's share)", &wire),
    ] {
        println!("  {name:<38} {:>6.2} us          {:>7.1}", per(p), each(p));
    }
    println!(
        "  total                                  {:>6.2} us          {:>7.1}   (archive: wall time, fsync included; a room message is serialised by the MUC core)",
        per(&core) + per(&archive) + per(&wire),
        each(&core) + each(&archive) + each(&wire)
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
    // Idle: a minute later the service's tick has dropped what served the burst of joins (the
    // join answers' serialised presences, the recipient list, the join rate buckets).
    drop(svc.tick(now + Duration::seconds(61)));
    let after = live();
    let joined: usize = svc.rooms().map(|r| r.occupants().count()).sum();
    assert_eq!(joined, n, "every session joined");
    println!(
        "  MUC core memory: {n} idle occupants in {ROOMS} rooms: {:.0} bytes of live heap each   (target <= 2 KiB)",
        after.saturating_sub(before) as f64 / n as f64
    );
    std::hint::black_box(svc);
}
