//! caseroom's own CPU per delivered room message, in-process, without servers: the MUC core handling
//! one occupant's message in a room of 50, the archive write (a real SQLite store, configured as in
//! production), and the link's serialisation of every copy. Splits the figure that
//! `cargo bench --bench muc` reports for the whole process into its parts.
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
    let mut cfg = caseroom::muc::ServiceConfig {
        domain: "rooms.localhost".parse().expect("domain"),
        name: "caseroom".into(),
        mam_max_page: 100,
        default_history: 20,
        occupant_salt: "salt".into(),
        reserved_nicks: vec![],
        message_rate: caseroom::muc::limits::Rate {
            per_minute: u32::MAX,
            burst: u32::MAX,
        },
        query_rate: caseroom::muc::limits::Rate {
            per_minute: u32::MAX,
            burst: u32::MAX,
        },
        waiting_per_room: 256,
    };
    cfg.mam_max_page = 100;
    let mut svc = Service::new(cfg, 1);
    let mut affiliations = std::collections::BTreeMap::new();
    for i in 1..=OCCUPANTS {
        affiliations.insert(
            format!("load{i:02}@localhost").parse().expect("jid"),
            Affiliation::Member,
        );
    }
    svc.upsert_room(
        RoomInfo {
            name: "bench".into(),
            title: "bench".into(),
            description: String::new(),
            anonymous: false,
            subject: String::new(),
            affiliations,
        },
        vec![],
    );
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
                        for to in &b.to {
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
