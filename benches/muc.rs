//! Benchmark: caseroom's rooms against Prosody's own MUC, in the same Prosody, in the same run.
//!
//! 1. Fan-out: 50 occupants, one of them sending as fast as a window of 50 in-flight messages allows;
//!    delivered groupchat stanzas per second, counted by the occupants' own connections.
//! 2. MAM: latency of the latest page (max 50) from a room archive of 100 000 messages.
//!
//! Run with `cargo bench --bench muc` (needs prosody and lua-dbi-sqlite3). It prints the ratios the core
//! issue asks for (fan-out caseroom/Prosody ≥ 1.0, MAM latency caseroom/Prosody ≤ 0.3) and the CPU time
//! each process used, so a saturated load generator would show.
//!
//! The load generator is a minimal raw-socket c2s client (SASL PLAIN on loopback, counting `</body>`)
//! so that its own cost stays far below the servers'.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

const OCCUPANTS: usize = 50;
const WINDOW: u64 = 50;
const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(8);
const ARCHIVE: usize = 100_000;
const MAM_QUERIES: usize = 200;
const DOMAIN: &str = "rooms.localhost";
const SECRET: &str = "bench-secret";

mod common;
use common::{
    bench_main, cpu_secs, find, free_port, start_caseroom, start_prosody, BoxErr, Procs, Raw,
    NO_RATE_LIMITS,
};

struct Fanout {
    rate: f64,
    cpu: Vec<(String, f64)>,
}

async fn fanout(port: u16, room: &str, watch: &[(String, u32)]) -> Result<Fanout, BoxErr> {
    let mut clients = Vec::new();
    for i in 1..=OCCUPANTS {
        let user = format!("load{i:02}");
        let mut c = Raw::login(port, &user, "pw-load").await?;
        c.join(room, &user).await?;
        clients.push(c);
    }
    let total = Arc::new(AtomicU64::new(0));
    let own = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let mut sender_w = None;
    let mut readers = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (total, own, wake) = (total.clone(), own.clone(), wake.clone());
        let Raw { mut r, w, buf } = c;
        if i == 0 {
            sender_w = Some(w);
        } else {
            drop_later(w);
        }
        readers.push(tokio::spawn(async move {
            let mut carry: Vec<u8> = buf;
            let mut chunk = vec![0u8; 65536];
            while let Ok(n) = r.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                carry.extend_from_slice(&chunk[..n]);
                let mut count = 0u64;
                let mut start = 0;
                while let Some(p) = find(&carry[start..], b"</body>") {
                    count += 1;
                    start += p + 7;
                }
                let keep = carry.len().saturating_sub(6).max(start);
                carry.drain(..keep);
                if count > 0 {
                    total.fetch_add(count, Ordering::Relaxed);
                    if i == 0 {
                        own.fetch_add(count, Ordering::Relaxed);
                        wake.notify_one();
                    }
                }
            }
        }));
    }
    let mut w = sender_w.ok_or("no sender")?;
    let room_owned = room.to_owned();
    let (own2, wake2) = (own.clone(), wake.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut batch = String::new();
        while !stop2.load(Ordering::Relaxed) {
            batch.clear();
            while sent - own2.load(Ordering::Relaxed) < WINDOW {
                sent += 1;
                batch.push_str(&format!("<message to='{room_owned}' type='groupchat'><body>bench message {sent}</body></message>"));
            }
            if !batch.is_empty() && w.write_all(batch.as_bytes()).await.is_err() {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), wake2.notified()).await;
        }
    });
    tokio::time::sleep(WARMUP).await;
    let me = std::process::id();
    let c0: Vec<f64> = watch.iter().map(|(_, p)| cpu_secs(*p)).collect();
    let self0 = cpu_secs(me);
    let t0 = Instant::now();
    let d0 = total.load(Ordering::Relaxed);
    tokio::time::sleep(MEASURE).await;
    let d1 = total.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let mut cpu: Vec<(String, f64)> = watch
        .iter()
        .zip(c0)
        .map(|((n, p), c)| (n.clone(), (cpu_secs(*p) - c) / el))
        .collect();
    cpu.push(("load generator".into(), (cpu_secs(me) - self0) / el));
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    for r in readers {
        r.abort();
    }
    Ok(Fanout {
        rate: (d1 - d0) as f64 / el,
        cpu,
    })
}

fn drop_later(w: OwnedWriteHalf) {
    // Keep the write half open (dropping it would half-close the socket) until the process ends.
    std::mem::forget(w);
}

async fn mam_latency(port: u16, room: &str) -> Result<(f64, f64), BoxErr> {
    let mut c = Raw::login(port, "load01", "pw-load").await?;
    let mut times = Vec::new();
    for i in 0..MAM_QUERIES + 10 {
        let t = Instant::now();
        c.send(&format!(
            "<iq type='set' id='mam{i}' to='{room}'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>50</max><before/></set></query></iq>"
        ))
        .await?;
        let got = c.until(&["</iq>"]).await?;
        if !got.contains("fin") {
            return Err(format!(
                "MAM query to {room} failed: {}",
                &got[got.len().saturating_sub(400)..]
            )
            .into());
        }
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Ok((pct(0.5), pct(0.99)))
}

/// Fill Prosody's MUC archive to ARCHIVE rows by copying the rows real messages produced.
fn fill_prosody(db: &Path) -> Result<(), BoxErr> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    loop {
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM prosodyarchive WHERE store = 'muc_log' AND user = 'bench'",
            [],
            |r| r.get(0),
        )?;
        if n as usize >= ARCHIVE {
            return Ok(());
        }
        if n == 0 {
            return Err(
                "Prosody archived nothing for the bench room (is muc_mam archiving it?)".into(),
            );
        }
        let add = (ARCHIVE - n as usize).min(n as usize);
        conn.execute(
            "INSERT INTO prosodyarchive (host, user, store, key, \"when\", \"with\", type, value)
             SELECT host, user, store, lower(hex(randomblob(16))), \"when\", \"with\", type, value
             FROM prosodyarchive WHERE store = 'muc_log' AND user = 'bench' ORDER BY sort_id LIMIT ?1",
            [add as i64],
        )?;
    }
}

/// Fill caseroom's archive to ARCHIVE messages through its own store API.
fn fill_caseroom(db: &Path) -> Result<(), BoxErr> {
    use caseroom::muc::ArchivedMessage;
    use xmpp_parsers::{jid::Jid, message::Message};
    let mut store = caseroom::store::Store::open(db)?;
    let start = Utc::now().timestamp_micros() as u64 - ARCHIVE as u64 * 1000;
    let mut batch = Vec::new();
    for i in 0..ARCHIVE {
        let seq = start + i as u64;
        let id = format!("{seq:016x}{:08x}", i);
        let mut m = Message::groupchat(None);
        m.from = Some(Jid::new(&format!("bench@{DOMAIN}/load01"))?);
        m.bodies
            .insert(Default::default(), format!("archived message {i}"));
        m.payloads.push(
            xmpp_parsers::stanza_id::StanzaId {
                id: id.clone(),
                by: Jid::new(&format!("bench@{DOMAIN}"))?,
            }
            .into(),
        );
        batch.push(ArchivedMessage {
            seq,
            id,
            room: "bench".into(),
            ts: chrono::DateTime::from_timestamp_micros(seq as i64).unwrap_or_else(Utc::now),
            nick: "load01".into(),
            sender: "load01@localhost".parse()?,
            message: m,
            origin: None,
            completes_inbox: None,
        });
        if batch.len() == 10_000 {
            store.append(&batch)?;
            batch.clear();
        }
    }
    store.append(&batch)?;
    Ok(())
}

/// caseroom's own share of a MAM query: store query plus building the result stanzas, in-process.
fn mam_in_process(db: &Path) -> Result<(f64, f64), BoxErr> {
    use caseroom::muc::mam::{self, ArchiveQuery, MamRequest, Page};
    use xmpp_parsers::jid::Jid;
    let store = caseroom::store::Store::open(db)?;
    let mut query = ArchiveQuery::metadata("bench");
    query.metadata = false;
    query.page = Page::Backward(None);
    query.max = 50;
    let req = MamRequest {
        requester: Jid::new("load01@localhost/bench")?,
        room_jid: Jid::new(&format!("bench@{DOMAIN}"))?,
        iq_id: "q".into(),
        queryid: None,
        query,
    };
    let mut times = Vec::new();
    for i in 0..MAM_QUERIES + 10 {
        let t = Instant::now();
        let page = store.query(&req.query);
        if i == 10 {
            eprintln!(
                "    (store query alone: {:.2} ms)",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        let stanzas = mam::results(&req, page);
        let bytes: usize = stanzas
            .into_iter()
            .map(|s| String::from(&minidom::Element::from(s)).len())
            .sum();
        if bytes == 0 {
            return Err("empty MAM answer".into());
        }
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}

fn main() -> Result<(), BoxErr> {
    bench_main(run)
}

async fn run() -> Result<(), BoxErr> {
    let dir = tempfile::tempdir()?;
    let prosody = start_prosody(
        dir.path(),
        &[("PROSODY_ARCHIVE_SQL", "1"), ("PROSODY_NO_NAGLE", "1")],
        DOMAIN,
        SECRET,
    )?;
    let mut procs = Procs(vec![], vec![prosody.dir.clone()]);
    let (c2s, comp, prosody_pid, pdir) =
        (prosody.c2s, prosody.comp, prosody.pid, prosody.dir.clone());

    // caseroom with a 'bench' room whose members are the load users, archive prefilled.
    let cdir = dir.path().join("caseroom");
    std::fs::create_dir_all(&cdir)?;
    fill_caseroom(&cdir.join("caseroom.db"))?;
    let (ip50, ip99) = mam_in_process(&cdir.join("caseroom.db"))?;
    let members: Vec<String> = (1..=OCCUPANTS)
        .map(|i| format!("\"load{i:02}@localhost\""))
        .collect();
    let http = free_port();
    let cfg = format!(
        "[component]\njid = \"{DOMAIN}\"\nserver = \"127.0.0.1:{comp}\"\nsecret = \"{SECRET}\"\n[store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n{NO_RATE_LIMITS}[[room]]\nname = \"bench\"\nmembers = [{}]\n",
        cdir.join("caseroom.db").display(),
        members.join(", ")
    );
    let child = start_caseroom(&cdir, &cfg)?;
    let caseroom_pid = child.id();
    procs.0.push(child);
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("caseroom benchmark: {OCCUPANTS} occupants, 1 sender (window {WINDOW}), {}s measured; MAM at {ARCHIVE} messages", MEASURE.as_secs());
    let prosody_room = "bench@conference.localhost";
    let caseroom_room = format!("bench@{DOMAIN}");
    let p = fanout(c2s, prosody_room, &[("prosody".into(), prosody_pid)]).await?;
    let c = fanout(
        c2s,
        &caseroom_room,
        &[
            ("prosody".into(), prosody_pid),
            ("caseroom".into(), caseroom_pid),
        ],
    )
    .await?;
    let show = |name: &str, f: &Fanout| {
        let cpu: Vec<String> = f
            .cpu
            .iter()
            .map(|(n, c)| format!("{n} {:.0}%", c * 100.0))
            .collect();
        println!(
            "  fan-out {name:<22} {:>9.0} stanzas/s   cpu: {}",
            f.rate,
            cpu.join(", ")
        );
    };
    show("Prosody MUC", &p);
    show("caseroom (via Prosody)", &c);
    println!(
        "  fan-out ratio caseroom/Prosody = {:.2} (target >= 1.0)",
        c.rate / p.rate
    );

    // Prosody's archive: the fan-out run left real rows; copy them up to ARCHIVE.
    fill_prosody(&pdir.join("data/prosody.sqlite"))?;
    let (pp50, pp99) = mam_latency(c2s, prosody_room).await?;
    let (cp50, cp99) = mam_latency(c2s, &caseroom_room).await?;
    println!("  MAM latest page (50) Prosody MUC   p50 {pp50:>6.2} ms  p99 {pp99:>6.2} ms");
    println!("  MAM latest page (50) caseroom      p50 {cp50:>6.2} ms  p99 {cp99:>6.2} ms");
    println!("    of which caseroom itself (store query + result stanzas, in-process) p50 {ip50:.2} ms  p99 {ip99:.2} ms");
    println!(
        "  MAM latency ratio caseroom/Prosody p50 = {:.2}, p99 = {:.2} (target <= 0.3)",
        cp50 / pp50,
        cp99 / pp99
    );
    drop(procs);
    Ok(())
}
