//! Benchmark: caseroom's rooms against Prosody's own MUC, in the same Prosody, in the same run.
//!
//! 1. Fan-out: 50 occupants, one of them sending as fast as a window of 50 in-flight messages allows;
//!    delivered groupchat stanzas per second, counted by the occupants' own connections. Three
//!    senders of the same stanzas through the same Prosody: Prosody's own MUC, caseroom, and a null
//!    component that replays the bytes caseroom wrote for one message (captured through a proxy from a
//!    short caseroom run) to the same 50 sessions and does nothing else: the ceiling of what Prosody
//!    can route from a component. Alternating runs, medians of `CASEROOM_BENCH_REPEAT` (3).
//! 2. MAM: latency of the latest page (max 50) from a room archive of 100 000 messages.
//! 3. Archive ingest: one sender alone in a room, 200 messages unanswered at most, 5,000 messages:
//!    messages per second archived (each echo comes back only once it is), Prosody's MUC with
//!    mod_muc_mam on SQLite against caseroom with its full-text index, alternating.
//! 4. Join storm: 200 sessions (50 people × 4, each its own nick) join one room at once; joins per
//!    second from the first join sent to the last joiner in (self-presence and subject received),
//!    and how long the median and the 90th-percentile joiner waited. Twice: each joiner leaving
//!    as soon as it is in, and everyone staying, where it also reports when every joiner has seen
//!    all 200 presences (the whole room settled: every presence XEP-0045 §7.2.3 asks for routed).
//!
//! Prosody runs with `network_default_read_size = 65536`, as `deploy/prosody.cfg.lua` recommends (with
//! its default of 4,096 Prosody pauses a component's stream for a timer tick, ≥ 1 ms, after every other
//! read: BENCHMARKS.md section 9); `CASEROOM_BENCH_PROSODY_READ_SIZE=4096` measures the stock setting.
//! Every sender in a run shares the one Prosody, so the setting applies to the references too.
//!
//! `CASEROOM_BENCH_SERVER=ejabberd` runs all of it on ejabberd (its own `mod_muc`/`mod_mam`, archive
//! in ejabberd's default Mnesia store, filled by sending messages) instead of Prosody.
//! `CASEROOM_BENCH_ONLY=storm` (a comma list of fanout, paced, ingest, storm, mam) runs only those
//! phases; with `CASEROOM_BENCH_ARCHIVE=1000` a single phase takes well under a minute.
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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const OCCUPANTS: usize = 50;
const WINDOW: u64 = 50;
/// Messages per archive-ingest run.
const INGEST: usize = 5_000;
const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(8);
/// Archived messages in each room for the MAM figures (`CASEROOM_BENCH_ARCHIVE`, default 100,000;
/// on ejabberd 10,000: its archive is filled by sending messages, ~150 a second into its Mnesia MAM).
fn archive() -> usize {
    let ejabberd = std::env::var("CASEROOM_BENCH_SERVER").is_ok_and(|v| v == "ejabberd");
    common::env_or(
        "CASEROOM_BENCH_ARCHIVE",
        if ejabberd { 10_000 } else { 100_000 },
    )
}
const MAM_QUERIES: usize = 200;
/// Sessions in a join storm (50 people × 4 resources).
const STORM: usize = 200;
const DOMAIN: &str = "rooms.localhost";
/// The null component's domain: as long as DOMAIN, so replayed stanzas keep caseroom's byte count.
const NULL_DOMAIN: &str = "nulls.localhost";
const SECRET: &str = "bench-secret";

mod common;
use common::{
    bench_main, cpu_secs, find, free_port, start_caseroom, start_ejabberd, start_prosody,
    take_markers, BoxErr, Procs, Raw, NO_RATE_LIMITS,
};

struct Fanout {
    rate: f64,
    cpu: Vec<(String, f64)>,
}

/// One fan-out run. `resource` names this run's sessions (five characters, like the captured
/// stanza's "bench", so that replayed copies keep their size); they are closed at the end.
async fn fanout(
    port: u16,
    room: &str,
    join: bool,
    resource: &str,
    watch: &[(String, u32)],
) -> Result<Fanout, BoxErr> {
    let mut clients = Vec::new();
    for i in 1..=OCCUPANTS {
        let user = format!("load{i:02}");
        let mut c = Raw::login_as(port, &user, "pw-load", resource).await?;
        if join {
            c.join(room, &user).await?;
        }
        clients.push(c);
    }
    let total = Arc::new(AtomicU64::new(0));
    let own = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let mut sender_w = None;
    let mut others = Vec::new();
    let mut readers = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (total, own, wake) = (total.clone(), own.clone(), wake.clone());
        let Raw { mut r, w, buf } = c;
        if i == 0 {
            sender_w = Some(w);
        } else {
            others.push(w);
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
                return None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), wake2.notified()).await;
        }
        Some(w)
    });
    tokio::time::sleep(WARMUP).await;
    let cpu_since = CpuSince::now(watch);
    let t0 = Instant::now();
    let d0 = total.load(Ordering::Relaxed);
    tokio::time::sleep(MEASURE).await;
    let d1 = total.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let cpu = cpu_since.shares(el);
    stop.store(true, Ordering::Relaxed);
    if let Ok(Some(mut w)) = sender.await {
        let _ = w.write_all(b"</stream:stream>").await;
    }
    for mut w in others {
        let _ = w.write_all(b"</stream:stream>").await;
    }
    for r in readers {
        r.abort();
    }
    Ok(Fanout {
        rate: (d1 - d0) as f64 / el,
        cpu,
    })
}

/// CPU time of watched processes, and of this load generator, from a moment on.
struct CpuSince<'a> {
    watch: &'a [(String, u32)],
    start: Vec<f64>,
    own: f64,
}

impl<'a> CpuSince<'a> {
    fn now(watch: &'a [(String, u32)]) -> Self {
        CpuSince {
            watch,
            start: watch.iter().map(|(_, p)| cpu_secs(*p)).collect(),
            own: cpu_secs(std::process::id()),
        }
    }

    /// Each one's share of a core over the `elapsed` seconds since, the load generator last.
    fn shares(self, elapsed: f64) -> Vec<(String, f64)> {
        let mut cpu: Vec<(String, f64)> = self
            .watch
            .iter()
            .zip(self.start)
            .map(|((n, p), c)| (n.clone(), (cpu_secs(*p) - c) / elapsed))
            .collect();
        cpu.push((
            "load generator".into(),
            (cpu_secs(std::process::id()) - self.own) / elapsed,
        ));
        cpu
    }
}

/// Paced latency: one occupant sends 10 messages a second for 10 s into a room of 50; every
/// occupant's connection notes when each arrives. Returns (p50, p99) in ms over all deliveries.
async fn paced(port: u16, room: &str, resource: &str) -> Result<(f64, f64), BoxErr> {
    const RATE: u64 = 10;
    const COUNT: usize = 100;
    let start = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..COUNT).map(|_| AtomicU64::new(0)).collect());
    let lat = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for i in 1..=OCCUPANTS {
        let user = format!("load{i:02}");
        let mut c = Raw::login_as(port, &user, "pw-load", resource).await?;
        c.join(room, &user).await?;
        let Raw { mut r, w, buf } = c;
        writers.push(w);
        let (sent, lat) = (sent.clone(), lat.clone());
        readers.push(tokio::spawn(async move {
            let mut carry = buf;
            let mut chunk = vec![0u8; 65536];
            while let Ok(n) = r.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let now = start.elapsed().as_nanos() as u64;
                carry.extend_from_slice(&chunk[..n]);
                for k in take_markers(&mut carry, b"paced ") {
                    let t0 = sent.get(k).map_or(0, |s| s.load(Ordering::Relaxed));
                    if t0 > 0 {
                        if let Ok(mut l) = lat.lock() {
                            l.push(now.saturating_sub(t0) as f64 / 1e6);
                        }
                    }
                }
            }
        }));
    }
    let mut w = writers.swap_remove(0);
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    for k in 0..COUNT {
        tick.tick().await;
        sent[k].store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        w.write_all(
            format!("<message to='{room}' type='groupchat'><body>paced {k} end</body></message>")
                .as_bytes(),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for mut w in writers.into_iter().chain([w]) {
        let _ = w.write_all(b"</stream:stream>").await;
    }
    for r in readers {
        r.abort();
    }
    let mut l = lat.lock().map_err(|_| "lock")?.clone();
    if l.len() < COUNT * OCCUPANTS / 2 {
        return Err(format!("only {} of {} deliveries seen", l.len(), COUNT * OCCUPANTS).into());
    }
    l.sort_by(|a, b| a.total_cmp(b));
    Ok((l[l.len() / 2], l[(l.len() * 99 / 100).min(l.len() - 1)]))
}

/// A raw XEP-0114 component stream, authenticated (§3: SHA-1 of stream id and secret).
async fn raw_component(port: u16, domain: &str) -> Result<TcpStream, BoxErr> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='{domain}'>").as_bytes()).await?;
    let mut buf = Vec::new();
    let id = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("component stream closed before its header".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(at) = text.find(" id=") {
            let q = text[at + 4..].chars().next().ok_or("id")?;
            if let Some(end) = text[at + 5..].find(q) {
                break text[at + 5..at + 5 + end].to_owned();
            }
        }
    };
    let digest = xmpp_parsers::component::Handshake::from_stream_id_and_password(id, SECRET)
        .data
        .ok_or("no digest")?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    s.write_all(format!("<handshake>{hex}</handshake>").as_bytes())
        .await?;
    let mut got = Vec::new();
    while find(&got, b"<handshake").is_none() {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(format!("handshake refused for {domain}").into());
        }
        got.extend_from_slice(&chunk[..n]);
    }
    Ok(s)
}

/// What caseroom writes to its server for one room message: the copy for load01, captured by a
/// forwarding proxy between caseroom and Prosody during a short run of caseroom with `config(port)`.
async fn capture(
    c2s: u16,
    comp: u16,
    cdir: &Path,
    config: impl Fn(u16) -> String,
    config_http: u16,
) -> Result<String, BoxErr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let seen2 = seen.clone();
    let proxy = tokio::spawn(async move {
        let Ok((down, _)) = listener.accept().await else {
            return;
        };
        let Ok(up) = TcpStream::connect(("127.0.0.1", comp)).await else {
            return;
        };
        let (mut dr, mut dw) = down.into_split();
        let (mut ur, mut uw) = up.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ur, &mut dw).await;
        });
        let mut chunk = vec![0u8; 65536];
        while let Ok(n) = dr.read(&mut chunk).await {
            if n == 0 || uw.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            if let Ok(mut s) = seen2.lock() {
                s.extend_from_slice(&chunk[..n]);
            }
        }
        back.abort();
    });
    let mut child = start_caseroom(cdir, &config(port))?;
    let http = config_http;
    let result = async {
        wait_healthy(http).await?;
        let mut c = Raw::login(c2s, "load01", "pw-load").await?;
        c.join(&format!("bench@{DOMAIN}"), "load01").await?;
        c.send(&format!(
            "<message to='bench@{DOMAIN}' type='groupchat'><body>bench message 1</body></message>"
        ))
        .await?;
        c.until(&["bench message 1"]).await?;
        let bytes = seen.lock().map_err(|_| "lock")?.clone();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = text.find("bench message 1").ok_or("no message captured")?;
        let start = text[..body].rfind("<message").ok_or("no <message")?;
        let end = body + text[body..].find("</message>").ok_or("no </message>")? + 10;
        Ok::<String, BoxErr>(text[start..end].to_owned())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    // The proxy ends when caseroom's side closes; only then is Prosody free to take the next link.
    if tokio::time::timeout(Duration::from_secs(5), proxy)
        .await
        .is_err()
    {
        return Err("the capture proxy did not close".into());
    }
    // Prosody unregisters a closed component a moment later; a link made before that is orphaned
    // (linked, but "Component not connected" to everyone else).
    tokio::time::sleep(Duration::from_secs(2)).await;
    result
}

/// Wait until caseroom's /healthz says the link is up.
async fn wait_healthy(http: u16) -> Result<(), BoxErr> {
    for _ in 0..200 {
        if common::healthy(http).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("caseroom did not become healthy within 20 s".into())
}

/// Component connections for caseroom (`component.connections`) and the null component alike:
/// `CASEROOM_BENCH_LINKS` (default 1; ejabberd only: Prosody accepts one per component).
fn links() -> usize {
    common::env_or("CASEROOM_BENCH_LINKS", 1usize).max(1)
}

/// The null component: for each message the sender sends to it, the captured copies for all
/// occupants (sessions with the sender's resource), and nothing else. Over `links` connections,
/// occupant i's copies always go over connection i mod `links`, so each recipient's order holds.
async fn null_component(comp: u16, captured: &str, links: usize) -> Result<(), BoxErr> {
    let one = captured.replace(DOMAIN, NULL_DOMAIN);
    let mine = "to='load01@localhost/bench'";
    if !one.contains(mine) {
        return Err(format!("the captured stanza is not addressed to load01: {one}").into());
    }
    let one = Arc::new(one);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for link in 0..links {
        let s = raw_component(comp, NULL_DOMAIN).await?;
        let (r, mut w) = s.into_split();
        readers.push(r);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, usize)>();
        writers.push(tx);
        let one = one.clone();
        // Writer `link`: the copies for occupants i with i mod links == link.
        tokio::spawn(async move {
            let copies_for = |resource: &str| -> Vec<u8> {
                (1..=OCCUPANTS)
                    .filter(|i| i % links == link)
                    .flat_map(|i| {
                        one.replace(mine, &format!("to='load{i:02}@localhost/{resource}'"))
                            .into_bytes()
                    })
                    .collect()
            };
            let mut copies: (String, Vec<u8>) = (String::new(), Vec::new());
            while let Some((resource, due)) = rx.recv().await {
                if resource != copies.0 {
                    copies = (resource.clone(), copies_for(&resource));
                }
                for _ in 0..due {
                    if w.write_all(&copies.1).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    for mut r in readers {
        let writers = writers.clone();
        tokio::spawn(async move {
            let mut carry: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 65536];
            let mut resource = String::new();
            while let Ok(n) = r.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                carry.extend_from_slice(&chunk[..n]);
                let mut start = 0;
                let mut due = 0;
                while let Some(p) = find(&carry[start..], b"</body>") {
                    // The run's sessions share the sender's resource: from='load01@localhost/<resource>'.
                    let stanza = &carry[..start + p];
                    // ejabberd bounces copies to sessions of earlier runs back as errors, body
                    // included: never answer those (each would be replayed to 50 more gone sessions).
                    let head = stanza
                        .windows(8)
                        .rposition(|w| w == b"<message")
                        .map_or(stanza, |at| &stanza[at..]);
                    if find(head, b"type='error'").is_some()
                        || find(head, b"type=\"error\"").is_some()
                    {
                        start += p + 7;
                        continue;
                    }
                    if let Some(at) = stanza.windows(17).rposition(|w| w == b"load01@localhost/") {
                        let rest = &stanza[at + 17..];
                        let end = rest
                            .iter()
                            .position(|b| *b == b'\'' || *b == b'"')
                            .unwrap_or(0);
                        resource = String::from_utf8_lossy(&rest[..end]).into_owned();
                    }
                    due += 1;
                    start += p + 7;
                }
                let keep = carry.len().saturating_sub(64).max(start);
                carry.drain(..keep);
                if due > 0 {
                    for tx in &writers {
                        if tx.send((resource.clone(), due)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
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
        if n as usize >= archive() {
            return Ok(());
        }
        if n == 0 {
            return Err(
                "Prosody archived nothing for the bench room (is muc_mam archiving it?)".into(),
            );
        }
        let add = (archive() - n as usize).min(n as usize);
        conn.execute(
            "INSERT INTO prosodyarchive (host, user, store, key, \"when\", \"with\", type, value)
             SELECT host, user, store, lower(hex(randomblob(16))), \"when\", \"with\", type, value
             FROM prosodyarchive WHERE store = 'muc_log' AND user = 'bench' ORDER BY sort_id LIMIT ?1",
            [add as i64],
        )?;
    }
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
        // What the link then writes: results as they come, the <fin/> serialised.
        let bytes: usize = mam::results(&req, page)
            .into_iter()
            .map(|out| match out {
                caseroom::xmpp::wire::Out::Raw(b) => b.len(),
                caseroom::xmpp::wire::Out::Stanza(s) => {
                    caseroom::xmpp::wire::encode(&minidom::Element::from(s)).map_or(0, |b| b.len())
                }
            })
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

/// What one join storm measured.
struct Storm {
    /// Joins per second until the last joiner had its self-presence and the subject.
    rate: f64,
    /// Seconds until the median and the 90th-percentile joiner had them.
    p50: f64,
    p90: f64,
    /// With everyone staying: seconds until every joiner had all `STORM` presences (the room
    /// as everyone sees it, settled).
    settled: Option<f64>,
    /// CPU shares of the watched processes over the storm.
    cpu: Vec<f64>,
}

/// Join storm: `STORM` sessions (50 people × 4 resources, nick `loadNN-k`) logged in first, then
/// all sending their join at once. A joiner is in when it has its self-presence and the subject.
/// Without `stay` each closes its stream as soon as it is in (the others are told it left);
/// with `stay` each waits until it has seen all `STORM` occupants' presences, and all leave once
/// everyone has.
async fn join_storm(
    port: u16,
    room: &str,
    tag: &str,
    watch: &[u32],
    stay: bool,
) -> Result<Storm, BoxErr> {
    let mut clients = Vec::new();
    for k in 0..STORM / OCCUPANTS {
        for i in 1..=OCCUPANTS {
            let user = format!("load{i:02}");
            let c = Raw::login_as(port, &user, "pw-load", &format!("{tag}{k}")).await?;
            clients.push((c, format!("{user}-{k}")));
        }
    }
    let go = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let all_settled = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let mut tasks = Vec::new();
    for (mut c, nick) in clients {
        let (go, all_settled, room) = (go.clone(), all_settled.clone(), room.to_owned());
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let r = storm_join(&mut c, &room, &nick, stay).await;
            if stay {
                all_settled.wait().await;
            }
            let _ = c.send("</stream:stream>").await;
            r
        }));
    }
    go.wait().await;
    let t0 = Instant::now();
    let c0: Vec<f64> = watch.iter().map(|p| cpu_secs(*p)).collect();
    if stay {
        all_settled.wait().await;
    }
    let (mut ins, mut settles) = (Vec::new(), Vec::new());
    for t in tasks {
        let (joined, settled) = t.await??;
        ins.push((joined - t0).as_secs_f64());
        settles.push((settled - t0).as_secs_f64());
    }
    ins.sort_by(|a, b| a.total_cmp(b));
    settles.sort_by(|a, b| a.total_cmp(b));
    let el = ins[STORM - 1];
    let end = if stay { settles[STORM - 1] } else { el };
    let cpu = watch
        .iter()
        .zip(c0)
        .map(|(p, c)| (cpu_secs(*p) - c) / end)
        .collect();
    Ok(Storm {
        rate: STORM as f64 / el,
        p50: ins[STORM / 2],
        p90: ins[STORM * 9 / 10],
        settled: stay.then_some(settles[STORM - 1]),
        cpu,
    })
}

/// One storm joiner: join `room` as `nick`; when it is in (self-presence and subject), and, with
/// `stay`, when it has seen all `STORM` occupants' presences (each ends with `</presence>`: both
/// servers' MUC presences carry a muc#user element). Reads raw chunks and counts each pattern
/// once where it ends, so that 200 clients reading 40,000 presences cost the load generator
/// little (it reports its own CPU).
async fn storm_join(
    c: &mut Raw,
    room: &str,
    nick: &str,
    stay: bool,
) -> Result<(Instant, Instant), BoxErr> {
    const PRESENCE: &[u8] = b"</presence>";
    const SUBJECT: [&[u8]; 2] = [b"</subject>", b"<subject/>"];
    const ERROR: [&[u8]; 2] = [b"type='error'", b"type=\"error\""];
    const KEEP: usize = 11; // the longest pattern, less one byte
    c.send(&format!(
        "<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
    ))
    .await?;
    let (mut presences, mut joined) = (0usize, None);
    let mut data = std::mem::take(&mut c.buf);
    let mut old = 0; // bytes of `data` scanned already (kept for patterns across reads)
    let mut chunk = vec![0u8; 65536];
    loop {
        // Matches that end in the new bytes only.
        let ends_new = |pat: &[u8], at: usize| at + pat.len() > old;
        let count = |pat: &[u8]| {
            data.windows(pat.len())
                .enumerate()
                .filter(|(at, w)| *w == pat && ends_new(pat, *at))
                .count()
        };
        if ERROR.iter().any(|p| count(p) > 0) {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(format!("join {room} as {nick} failed: {text}").into());
        }
        presences += count(PRESENCE);
        if joined.is_none() && SUBJECT.iter().any(|p| count(p) > 0) {
            joined = Some(Instant::now());
        }
        if let Some(at) = joined {
            if !stay {
                return Ok((at, at));
            }
            if presences >= STORM {
                return Ok((at, Instant::now()));
            }
        }
        let keep = data.len().saturating_sub(KEEP);
        data.drain(..keep);
        old = data.len();
        let n = tokio::time::timeout(Duration::from_secs(30), c.r.read(&mut chunk))
            .await
            .map_err(|_| {
                format!(
                    "{room}: {nick} heard nothing for 30 s ({presences} presences so far, in: {})",
                    joined.is_some()
                )
            })??;
        if n == 0 {
            return Err(format!("{room}: the server closed {nick}'s session").into());
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

/// The run with the median `rate`.
fn median<T>(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    runs.swap_remove(runs.len() / 2)
}

/// The watched processes' CPU shares, as printed: "Prosody 100%, caseroom 4%".
fn cpu_shares(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(n, c)| format!("{n} {:.0}%", c * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_storm(sname: &str, stay: bool, jp: &Storm, jc: &Storm) {
    let pct = |c: &[f64], i: usize| c.get(i).map_or(0.0, |v| v * 100.0);
    let how = if stay {
        "everyone stays"
    } else {
        "each leaves once in"
    };
    println!(
        "  join storm, {STORM} sessions at once, {how}: {sname} MUC {:.0} joins/s ({sname} {:.0}%, load generator {:.0}%), caseroom {:.0} joins/s ({sname} {:.0}%, caseroom {:.0}%, load generator {:.0}%); ratio {:.2} (target >= 1.0)",
        jp.rate,
        pct(&jp.cpu, 0),
        pct(&jp.cpu, 1),
        jc.rate,
        pct(&jc.cpu, 0),
        pct(&jc.cpu, 1),
        pct(&jc.cpu, 2),
        jc.rate / jp.rate
    );
    println!(
        "    a joiner is in after p50 {:.2} s / p90 {:.2} s ({sname} MUC) vs p50 {:.2} s / p90 {:.2} s (caseroom)",
        jp.p50, jp.p90, jc.p50, jc.p90
    );
    if let (Some(p), Some(c)) = (jp.settled, jc.settled) {
        println!(
            "    everyone has seen all {STORM} after {p:.2} s ({sname} MUC) vs {c:.2} s (caseroom): ratio {:.2}",
            p / c
        );
    }
}

/// Fill the server's own MUC archive (ejabberd: no SQL table to copy rows in) by sending messages
/// into the room from one occupant until `archive()` more are echoed back. The occupant stays
/// (returned): ejabberd destroys a room nobody is in, archive and all.
async fn fill_by_messages(port: u16, room: &str) -> Result<Raw, BoxErr> {
    let mut c = Raw::login_as(port, "load01", "pw-load", "fill0").await?;
    c.join(room, "load01").await?;
    send_window(&mut c, room, archive(), "archived").await?;
    Ok(c)
}

/// Send `total` messages into `room` (joined by `c`) with at most 200 unanswered, until each one's
/// echo came back; the bodies are "`tag` message N".
async fn send_window(c: &mut Raw, room: &str, total: usize, tag: &str) -> Result<(), BoxErr> {
    let marker = format!("{tag} message ");
    let mut echoed = 0usize;
    let mut sent = 0usize;
    let mut carry = Vec::new();
    let mut chunk = vec![0u8; 65536];
    while echoed < total {
        let mut batch = String::new();
        while sent < total && sent - echoed < 200 {
            sent += 1;
            batch.push_str(&format!(
                "<message to='{room}' type='groupchat'><body>{marker}{sent}</body></message>"
            ));
        }
        if !batch.is_empty() {
            c.w.write_all(batch.as_bytes()).await?;
        }
        let n = match tokio::time::timeout(Duration::from_secs(10), c.r.read(&mut chunk)).await {
            Ok(n) => n?,
            Err(_) => {
                return Err(format!("{room}: no echo for 10 s after {echoed} of {total}").into())
            }
        };
        if n == 0 {
            return Err(format!("{room}: the server closed the session").into());
        }
        carry.extend_from_slice(&chunk[..n]);
        if find(&carry, b"type='error'").is_some() || find(&carry, b"type=\"error\"").is_some() {
            let text = String::from_utf8_lossy(&carry);
            return Err(format!("{room}: {}", &text[text.len().saturating_sub(400)..]).into());
        }
        echoed += take_markers(&mut carry, marker.as_bytes()).len();
    }
    Ok(())
}

/// Archive ingest: one sender alone in `room` sends `total` messages, at most 200 unanswered; each
/// echo comes back once the room has archived the message (caseroom broadcasts only after its
/// commit, full-text index included; Prosody's mod_muc_mam stores in the broadcast path). Messages
/// per second, and the CPU of the watched processes and of this load generator.
async fn ingest(
    port: u16,
    room: &str,
    resource: &str,
    total: usize,
    watch: &[(String, u32)],
) -> Result<Fanout, BoxErr> {
    let mut c = Raw::login_as(port, "load01", "pw-load", resource).await?;
    c.join(room, "load01").await?;
    let cpu_since = CpuSince::now(watch);
    let t0 = Instant::now();
    send_window(&mut c, room, total, resource).await?;
    let el = t0.elapsed().as_secs_f64();
    let cpu = cpu_since.shares(el);
    let _ = c.w.write_all(b"</stream:stream>").await;
    Ok(Fanout {
        rate: total as f64 / el,
        cpu,
    })
}

fn main() -> Result<(), BoxErr> {
    bench_main(run)
}

/// Prosody's `network_default_read_size` for this run: `CASEROOM_BENCH_PROSODY_READ_SIZE`, else the
/// 65,536 that `deploy/prosody.cfg.lua` recommends.
fn prosody_read_size() -> String {
    std::env::var("CASEROOM_BENCH_PROSODY_READ_SIZE")
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "65536".into())
}

/// Whether to run the phase `name`: all of them unless `CASEROOM_BENCH_ONLY` lists some
/// (comma-separated: fanout, paced, ingest, storm, mam).
fn phase(name: &str) -> bool {
    std::env::var("CASEROOM_BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
}

async fn run() -> Result<(), BoxErr> {
    let dir = tempfile::tempdir()?;
    let read_size = prosody_read_size();

    let ejabberd = std::env::var("CASEROOM_BENCH_SERVER").is_ok_and(|v| v == "ejabberd");
    let links = if ejabberd { links() } else { 1 };
    let server = if ejabberd {
        start_ejabberd(dir.path(), DOMAIN, SECRET, Some(NULL_DOMAIN), links)?
    } else {
        start_prosody(
            dir.path(),
            &[
                ("PROSODY_ARCHIVE_SQL", "1"),
                ("PROSODY_NO_NAGLE", "1"),
                ("PROSODY_EXTRA_COMPONENT", NULL_DOMAIN),
                ("PROSODY_READ_SIZE", &read_size),
            ],
            DOMAIN,
            SECRET,
        )?
    };
    let mut procs = Procs(vec![], vec![server.dir.clone()]);
    let (c2s, comp, prosody_pid, pdir) = (server.c2s, server.comp, server.pid, server.dir.clone());
    let sname = server.name;

    // caseroom with a 'bench' room whose members are the load users, archive prefilled.
    let cdir = dir.path().join("caseroom");
    std::fs::create_dir_all(&cdir)?;
    common::fill_archive(
        &cdir.join("caseroom.db"),
        archive(),
        DOMAIN,
        |_| "bench".into(),
        "load01",
        "load01@localhost",
    )?;
    let (ip50, ip99) = mam_in_process(&cdir.join("caseroom.db"))?;
    let members: Vec<String> = (1..=OCCUPANTS)
        .map(|i| format!("\"load{i:02}@localhost\""))
        .collect();
    let http = free_port();
    // The capture proxy takes one connection; the bytes per copy do not depend on how many.
    let config_n = |port: u16, connections: usize| {
        format!(
            "[component]\njid = \"{DOMAIN}\"\nserver = \"127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\nconnections = {connections}\n[store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n{NO_RATE_LIMITS}[[room]]\nname = \"bench\"\nmembers = [{}]\n",
            cdir.join("caseroom.db").display(),
            members.join(", ")
        )
    };
    // What caseroom writes for one message, from a short run through a proxy; then the real run.
    let captured = capture(c2s, comp, &cdir, |port| config_n(port, 1), http).await?;
    null_component(server.extra_comp, &captured, links).await?;
    let child = start_caseroom(&cdir, &config_n(comp, links))?;
    let caseroom_pid = child.id();
    procs.0.push(child);
    wait_healthy(http).await?;

    let repeat: usize = common::env_or("CASEROOM_BENCH_REPEAT", 3).max(1);
    if !ejabberd {
        println!("Prosody's network_default_read_size: {read_size}");
    }
    if links > 1 {
        println!("component connections (caseroom and the null component): {links}");
    }
    println!("caseroom benchmark on {sname}: {OCCUPANTS} occupants, 1 sender (window {WINDOW}), {}s measured, median of {repeat} alternating runs; MAM at {} messages", MEASURE.as_secs(), archive());
    println!("  replayed stanza ({} bytes): {captured}", captured.len());
    let prosody_room = "bench@conference.localhost";
    let caseroom_room = format!("bench@{DOMAIN}");
    let null_room = format!("bench@{NULL_DOMAIN}");
    // The processes each phase watches: the server alone, or the server and caseroom.
    let server_only: [(String, u32); 1] = [(sname.into(), prosody_pid)];
    let with_caseroom: [(String, u32); 2] = [
        (sname.into(), prosody_pid),
        ("caseroom".into(), caseroom_pid),
    ];
    if phase("fanout") {
        let (mut p, mut n, mut c) = (vec![], vec![], vec![]);
        for run in 0..repeat {
            let res = |kind: char| format!("{kind}run{run}");
            p.push(fanout(c2s, prosody_room, true, &res('p'), &server_only).await?);
            c.push(fanout(c2s, &caseroom_room, true, &res('c'), &with_caseroom).await?);
            n.push(fanout(c2s, &null_room, false, &res('n'), &server_only).await?);
        }
        let rate = |f: &Fanout| f.rate;
        let (p, n, c) = (median(p, rate), median(n, rate), median(c, rate));
        let show = |name: &str, f: &Fanout| {
            println!(
                "  fan-out {name:<30} {:>9.0} stanzas/s   cpu: {}",
                f.rate,
                cpu_shares(&f.cpu)
            );
        };
        show(&format!("{sname} MUC"), &p);
        show("null component (the ceiling)", &n);
        show(&format!("caseroom (via {sname})"), &c);
        let caseroom_cpu = c
            .cpu
            .iter()
            .find(|(name, _)| name == "caseroom")
            .map_or(0.0, |(_, v)| *v);
        println!(
        "  fan-out ratio caseroom/null component = {:.2} (target >= 0.95); caseroom/{sname} MUC = {:.2}",
        c.rate / n.rate,
        c.rate / p.rate
    );
        println!(
            "  caseroom's own CPU per delivered stanza = {:.1} us (target <= 5)",
            caseroom_cpu / c.rate * 1e6
        );
    }
    if phase("paced") {
        // Latency at a human pace: 10 messages a second into 50 occupants.
        let (lp50, lp99) = paced(c2s, prosody_room, "plat0").await?;
        let (lc50, lc99) = paced(c2s, &caseroom_room, "clat0").await?;
        println!("  paced 10 msg/s into {OCCUPANTS}: {sname} MUC p50 {lp50:.2} ms p99 {lp99:.2} ms; caseroom p50 {lc50:.2} ms p99 {lc99:.2} ms; p99 ratio {:.2} (target <= 1.0)", lc99 / lp99);
    }
    if phase("ingest") {
        // Archive ingest, alternating, median of `repeat`: one sender alone in each room.
        let (mut ap, mut ac) = (vec![], vec![]);
        for run in 0..repeat {
            ap.push(ingest(c2s, prosody_room, &format!("ip{run}"), INGEST, &server_only).await?);
            ac.push(
                ingest(
                    c2s,
                    &caseroom_room,
                    &format!("ic{run}"),
                    INGEST,
                    &with_caseroom,
                )
                .await?,
            );
        }
        let (ap, ac) = (median(ap, |f| f.rate), median(ac, |f| f.rate));
        for (name, f) in [
            (format!("{sname} MUC + MAM"), &ap),
            ("caseroom".to_owned(), &ac),
        ] {
            println!(
            "  archive ingest {name:<22} {:>7.0} messages/s ({INGEST} messages, 1 occupant)   cpu: {}",
            f.rate,
            cpu_shares(&f.cpu)
        );
        }
        println!(
            "  archive ingest ratio caseroom (full-text index on)/{sname} = {:.2} (target >= 3)",
            ac.rate / ap.rate
        );
    }
    if phase("storm") {
        // This process (the 200 clients) is watched too: the load generator must not be the bound.
        let me = std::process::id();
        for stay in [false, true] {
            // Join storms, alternating, median of `repeat`.
            let (mut jp, mut jc) = (vec![], vec![]);
            for run in 0..repeat {
                let v = if stay { "s" } else { "l" };
                let own_room = format!("storm{v}{run}@conference.localhost");
                let tag = format!("p{v}{run}-");
                jp.push(join_storm(c2s, &own_room, &tag, &[prosody_pid, me], stay).await?);
                let tag = format!("c{v}{run}-");
                let watch = [prosody_pid, caseroom_pid, me];
                jc.push(join_storm(c2s, &caseroom_room, &tag, &watch, stay).await?);
                // The 200 leave as their streams close: let that settle before the next storm.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let (jp, jc) = (median(jp, |s| s.rate), median(jc, |s| s.rate));
            print_storm(sname, stay, &jp, &jc);
        }
    }
    if phase("mam") {
        // The server's own archive: Prosody's from the rows the fan-out runs left, copied up to
        // archive(); ejabberd's by sending messages.
        let _filler = if ejabberd {
            Some(fill_by_messages(c2s, prosody_room).await?)
        } else {
            fill_prosody(&pdir.join("data/prosody.sqlite"))?;
            None
        };
        let (pp50, pp99) = mam_latency(c2s, prosody_room).await?;
        let (cp50, cp99) = mam_latency(c2s, &caseroom_room).await?;
        println!("  MAM latest page (50) {sname} MUC   p50 {pp50:>6.2} ms  p99 {pp99:>6.2} ms");
        println!("  MAM latest page (50) caseroom      p50 {cp50:>6.2} ms  p99 {cp99:>6.2} ms");
        println!("    of which caseroom itself (store query + result stanzas, in-process) p50 {ip50:.2} ms  p99 {ip99:.2} ms");
        println!(
            "  MAM latency ratio caseroom/{sname} p50 = {:.2}, p99 = {:.2} (target <= 0.3)",
            cp50 / pp50,
            cp99 / pp99
        );
    }
    if std::env::var("BENCH_DEBUG").is_ok() {
        eprintln!("kept: {}", dir.keep().display());
    }
    drop(procs);
    Ok(())
}
