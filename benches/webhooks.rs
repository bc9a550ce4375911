//! Benchmark: durable webhook intake and end-to-end latency.
//!
//! 1. Accepted per second: 32 keep-alive HTTP connections from this process (a separate process
//!    from caseroom) POST signed GitHub deliveries with unique delivery ids, as fast as caseroom
//!    answers 202 (each 202 means: verified, deduplicated and committed to the SQLite inbox).
//! 2. Latency: 20 occupants in the room; deliveries paced at 50/s (the performance issue's figure;
//!    `CASEROOM_BENCH_RATE` to change it: at 1,000/s the 20,000 event stanzas a second of ~3 KB
//!    saturate Prosody, which then bounds the latency); time from sending the POST to the message
//!    reaching an occupant's connection, p50/p99.
//!
//! Targets: ≥ 5,000 accepted/s; p99 < 50 ms. Run: `cargo bench --bench webhooks`
//! (`CASEROOM_BENCH_ONLY=intake`: the throughput phase alone, for alternating builds).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    bench_main, cpu_secs, env_or, find, free_port, root, start_caseroom, start_prosody,
    take_markers, BoxErr, Procs, Raw, NO_RATE_LIMITS,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DOMAIN: &str = "rooms.localhost";
const SECRET: &str = "bench-secret";
const HOOK_SECRET: &str = "bench-hook-secret";
const CONNECTIONS: usize = 32;
const OCCUPANTS: usize = 20;
const MEASURE: Duration = Duration::from_secs(5);

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).expect("any key length");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(port: u16) -> Result<Http, BoxErr> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        Ok(Http { s, buf: Vec::new() })
    }

    /// One POST on the kept-alive connection; returns the status code.
    async fn post(
        &mut self,
        port: u16,
        delivery: &str,
        sig: &str,
        body: &[u8],
    ) -> Result<u16, BoxErr> {
        let head = format!(
            "POST /hooks/forge HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             X-GitHub-Event: issues\r\nX-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: {sig}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.s.write_all(&req).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or("bad status line")?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    return Ok(status);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).await?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn health(port: u16) -> Result<serde_json::Value, BoxErr> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let body = find(&out, b"\r\n\r\n")
        .map(|i| &out[i + 4..])
        .ok_or("no body")?;
    Ok(serde_json::from_slice(body)?)
}

fn main() -> Result<(), BoxErr> {
    bench_main(run)
}

/// One paced delivery: when it was sent (ns since the run's start) and how long its 202 took (ms).
struct Posted {
    k: usize,
    sent_ns: u64,
    answered_ms: Option<f64>,
}

/// Post `total` signed deliveries at `rate` a second over 8 keep-alive connections taking turns
/// (sender s starts s/8 of a period late: started together they posted in bursts of eight, and
/// each delivery's latency then included the seven before it). Delivery k's issue title is
/// "{tag} {k} end", its delivery id "{tag}-{k}".
async fn post_paced(
    http: u16,
    doc: &serde_json::Value,
    rate: u64,
    total: usize,
    tag: &str,
    start: Instant,
) -> Vec<Posted> {
    let senders = 8usize;
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (doc, tag) = (doc.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut posted = Vec::new();
            let Ok(mut h) = Http::connect(http).await else {
                return posted;
            };
            let period = Duration::from_nanos(1_000_000_000 * senders as u64 / rate);
            tokio::time::sleep(period * s as u32 / senders as u32).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for k in (s..total).step_by(senders) {
                tick.tick().await;
                let mut d = doc.clone();
                d["issue"]["title"] = serde_json::Value::String(format!("{tag} {k} end"));
                let body = serde_json::to_vec(&d).unwrap_or_default();
                let sig = sign(&body);
                let sent_ns = start.elapsed().as_nanos() as u64;
                let t = Instant::now();
                let answered_ms = matches!(
                    h.post(http, &format!("{tag}-{k}"), &sig, &body).await,
                    Ok(202)
                )
                .then(|| t.elapsed().as_secs_f64() * 1000.0);
                posted.push(Posted {
                    k,
                    sent_ns,
                    answered_ms,
                });
            }
            posted
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// POST → 202 times (ms, sorted) of 5 seconds of deliveries at `rate`.
async fn paced_202(
    http: u16,
    doc: &serde_json::Value,
    rate: u64,
    tag: &str,
) -> Result<Vec<f64>, BoxErr> {
    let posted = post_paced(http, doc, rate, rate as usize * 5, tag, Instant::now()).await;
    let mut all: Vec<f64> = posted.iter().filter_map(|p| p.answered_ms).collect();
    if all.is_empty() {
        return Err("no delivery was accepted".into());
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(all)
}

/// The `q` quantile of sorted values (NaN when there are none).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(at).copied().unwrap_or(f64::NAN)
}

/// One reads-beside-writes phase: 202 times (ms, sorted) and what the readers got.
struct Beside {
    label: &'static str,
    acks: Vec<f64>,
    pages_per_s: f64,
    page_bytes: f64,
    /// CPU (% of a core) of Prosody, caseroom and the load generator over the phase.
    cpu: (f64, f64, f64),
}

/// The MAM query the readers send: the latest page of 50.
fn latest_page(n: u64, room: &str) -> String {
    format!("<iq type='set' id='q{n}' to='{room}'><query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'><max>50</max><before/></set></query></iq>")
}

/// Fill a room of Prosody's own MUC with 60 messages whose MAM results are as large as those of
/// caseroom's room `ours` (measured on one page of it), so that reading either costs Prosody
/// about the same; returns the room's JID.
async fn prepare_reference_archive(c2s: u16, ours: &str) -> Result<String, BoxErr> {
    let mut c = Raw::login_as(c2s, "load05", "pw-load", "fill").await?;
    c.send(&latest_page(0, ours)).await?;
    let page = c.until(&["</iq>"]).await?;
    let items = page.matches("<result").count().max(1);
    let per_item = page.len() / items;
    let room = "reference@conference.localhost".to_owned();
    c.join(&room, "filler").await?;
    // Prosody's own result wraps a body in about 400 bytes.
    let text = "x".repeat(per_item.saturating_sub(400).max(16));
    for i in 0..60 {
        c.send(&format!(
            "<message to='{room}' type='groupchat'><body>ref {i} {text}</body></message>"
        ))
        .await?;
        c.until(&[&format!("ref {i} ")]).await?;
    }
    c.send(&latest_page(1, &room)).await?;
    let theirs = c.until(&["</iq>"]).await?;
    if theirs.matches("<result").count() < 50 {
        return Err(format!("Prosody's MUC archive gave no full page: {theirs:.300}").into());
    }
    Ok(room)
}

/// POST → 202 at 1,000/s for 5 s while 4 members read `room`'s latest MAM page in a loop (none
/// when `room` is `None`).
async fn paced_202_beside(
    c2s: u16,
    http: u16,
    doc: &serde_json::Value,
    label: &'static str,
    room: Option<String>,
    prosody_pid: u32,
    caseroom_pid: u32,
) -> Result<Beside, BoxErr> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pages = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut queriers = Vec::new();
    let readers = if room.is_some() { 4 } else { 0 };
    for i in 1..=readers {
        let room = room.clone().unwrap_or_default();
        let mut c = Raw::login_as(c2s, &format!("load{i:02}"), "pw-load", label).await?;
        let (stop, pages, bytes) = (stop.clone(), pages.clone(), bytes.clone());
        queriers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if c.send(&latest_page(n, &room)).await.is_err() {
                    break;
                }
                let Ok(page) = c.until(&["</iq>"]).await else {
                    break;
                };
                pages.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(page.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    if !queriers.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (pages0, bytes0) = (pages.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
    let cpu = || {
        (
            cpu_secs(prosody_pid),
            cpu_secs(caseroom_pid),
            cpu_secs(std::process::id()),
        )
    };
    let (c0, t0) = (cpu(), Instant::now());
    let acks = paced_202(http, doc, 1000, label).await?;
    let (c1, el) = (cpu(), t0.elapsed().as_secs_f64());
    let (pages1, bytes1) = (pages.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for q in queriers {
        q.abort();
    }
    let read = (pages1 - pages0).max(1);
    Ok(Beside {
        label,
        acks,
        pages_per_s: (pages1 - pages0) as f64 / el,
        page_bytes: (bytes1 - bytes0) as f64 / read as f64,
        cpu: (
            (c1.0 - c0.0) / el * 100.0,
            (c1.1 - c0.1) / el * 100.0,
            (c1.2 - c0.2) / el * 100.0,
        ),
    })
}

async fn run() -> Result<(), BoxErr> {
    let dir = tempfile::tempdir()?;
    let prosody = start_prosody(dir.path(), &[("PROSODY_NO_NAGLE", "1")], DOMAIN, SECRET)?;
    let mut procs = Procs(vec![], vec![prosody.dir.clone()]);
    let (c2s, comp, prosody_pid) = (prosody.c2s, prosody.comp, prosody.pid);
    let http = free_port();
    let members: Vec<String> = (1..=OCCUPANTS)
        .map(|i| format!("\"load{i:02}@localhost\""))
        .collect();
    let cfg = format!(
        "[component]\njid = \"{DOMAIN}\"\nserver = \"127.0.0.1:{comp}\"\nsecret = \"{SECRET}\"\n[store]\npath = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n{NO_RATE_LIMITS}[[room]]\nname = \"bench\"\nmembers = [{}]\n\
         [[tracker]]\nname = \"forge\"\nkind = \"github\"\nsecret = \"{HOOK_SECRET}\"\n[tracker.rooms]\n\"Codertocat/Hello-World\" = \"bench\"\n",
        dir.path().join("caseroom.db").display(),
        members.join(", ")
    );
    let child = start_caseroom(dir.path(), &cfg)?;
    let caseroom_pid = child.id();
    procs.0.push(child);
    tokio::time::sleep(Duration::from_millis(700)).await;

    let fixture = std::fs::read(root().join("fixtures/github/issues.opened.json"))?;
    println!(
        "caseroom webhook benchmark ({} byte GitHub deliveries)",
        fixture.len()
    );

    // 1. Throughput. Every delivery is its own event (caseroom deduplicates on the body): the real
    // payload with the issue number replaced by a fixed-width counter, signed per request.
    let mut template: serde_json::Value = serde_json::from_slice(&fixture)?;
    template["issue"]["number"] = serde_json::json!(100_000_000_000u64);
    let template = serde_json::to_vec(&template)?;
    let at = find(&template, b"100000000000").ok_or("no number in the template")?;
    let body = Arc::new(template);
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    // `CASEROOM_BENCH_CONNECTIONS`: a probe of what bounds intake, not the reported figure.
    let connections = env_or("CASEROOM_BENCH_CONNECTIONS", CONNECTIONS);
    for c in 0..connections {
        let (body, accepted, errors, stop) =
            (body.clone(), accepted.clone(), errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut h) = Http::connect(http).await else {
                return;
            };
            let mut i = 0u64;
            let mut mine = body.to_vec();
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let n = 100_000_000_000u64 + (c as u64) * 1_000_000_000 + i;
                mine[at..at + 12].copy_from_slice(n.to_string().as_bytes());
                let sig = sign(&mine);
                match h.post(http, &format!("tp-{c}-{i}"), &sig, &mine).await {
                    Ok(202) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a0, c0, s0, t0) = (
        accepted.load(Ordering::Relaxed),
        cpu_secs(caseroom_pid),
        cpu_secs(std::process::id()),
        Instant::now(),
    );
    tokio::time::sleep(MEASURE).await;
    let (a1, c1, s1, el) = (
        accepted.load(Ordering::Relaxed),
        cpu_secs(caseroom_pid),
        cpu_secs(std::process::id()),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let rate = (a1 - a0) as f64 / el;
    println!(
        "  accepted (202, committed)   {rate:>8.0} /s   errors {}   cpu: caseroom {:.0}%, load generator {:.0}%   (target >= 5000/s: {})",
        errors.load(Ordering::Relaxed),
        (c1 - c0) / el * 100.0,
        (s1 - s0) / el * 100.0,
        if rate >= 5000.0 { "met" } else { "NOT met" }
    );

    // Let caseroom finish posting what it accepted before measuring latency.
    let drained = Instant::now();
    loop {
        let h = health(http).await.unwrap_or_default();
        let w = &h["webhooks"];
        let handled = w["posted"].as_u64().unwrap_or(0)
            + w["ignored"].as_u64().unwrap_or(0)
            + w["unknown"].as_u64().unwrap_or(0);
        if handled >= w["accepted"].as_u64().unwrap_or(0)
            || drained.elapsed() > Duration::from_secs(120)
        {
            println!(
                "  posting all accepted deliveries into the room finished {:.1} s after intake stopped",
                drained.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if std::env::var("CASEROOM_BENCH_ONLY").is_ok_and(|v| v == "intake") {
        return Ok(());
    }

    // 3 (before the occupants join). Reads beside writes: POST → 202 at 1,000/s, alone, with 4
    // members reading the room's latest MAM page as fast as they are answered, and (the reference)
    // with the same 4 reading Prosody's own MUC archive instead, pages of the same size: the same
    // load on the machine, none of it on caseroom's store.
    let fixture_doc: serde_json::Value = serde_json::from_slice(&fixture)?;
    let reference_room = prepare_reference_archive(c2s, &format!("bench@{DOMAIN}")).await?;
    let mut phases = Vec::new();
    for (label, room) in [
        ("alone", None),
        ("caseroom", Some(format!("bench@{DOMAIN}"))),
        ("reference", Some(reference_room)),
    ] {
        phases.push(
            paced_202_beside(
                c2s,
                http,
                &fixture_doc,
                label,
                room,
                prosody_pid,
                caseroom_pid,
            )
            .await?,
        );
    }
    let p99 = |v: &[f64]| quantile(v, 0.99);
    let (alone, ours, reference) = (&phases[0], &phases[1], &phases[2]);
    println!(
        "  POST → 202 at 1000/s: p99 {:.1} ms alone, {:.1} ms with 4 members reading caseroom's MAM ({:.0} pages/s of {:.0} KB): ratio {:.2} (target <= 1.2)",
        p99(&alone.acks),
        p99(&ours.acks),
        ours.pages_per_s,
        ours.page_bytes / 1000.0,
        p99(&ours.acks) / p99(&alone.acks).max(0.001)
    );
    println!(
        "    reference, the same 4 reading Prosody's own MUC archive instead ({:.0} pages/s of {:.0} KB): p99 {:.1} ms, ratio {:.2}; caseroom's readers / Prosody's readers: {:.2}",
        reference.pages_per_s,
        reference.page_bytes / 1000.0,
        p99(&reference.acks),
        p99(&reference.acks) / p99(&alone.acks).max(0.001),
        p99(&ours.acks) / p99(&reference.acks).max(0.001)
    );
    for ph in &phases {
        println!(
            "    {}: 202 p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} ms; cpu prosody {:.0}%, caseroom {:.0}%, load generator {:.0}%",
            ph.label,
            quantile(&ph.acks, 0.5),
            quantile(&ph.acks, 0.9),
            quantile(&ph.acks, 0.99),
            quantile(&ph.acks, 0.999),
            ph.cpu.0,
            ph.cpu.1,
            ph.cpu.2
        );
    }

    // 2. Latency at 50/s (or CASEROOM_BENCH_RATE) with 20 occupants.
    let rate: u64 = env_or("CASEROOM_BENCH_RATE", 50);
    let start = Instant::now();
    let n_total = (rate * MEASURE.as_secs()) as usize;
    let got: Arc<Vec<AtomicU64>> = Arc::new((0..n_total).map(|_| AtomicU64::new(0)).collect());
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 1..=OCCUPANTS {
        let user = format!("load{i:02}");
        let mut c = Raw::login(c2s, &user, "pw-load").await?;
        c.join(&format!("bench@{DOMAIN}"), &user).await?;
        let (got, delivered) = (got.clone(), delivered.clone());
        let first = i == 1;
        readers.push(tokio::spawn(async move {
            let mut carry = std::mem::take(&mut c.buf);
            let mut chunk = vec![0u8; 65536];
            while let Ok(n) = c.r.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let now = start.elapsed().as_nanos() as u64;
                carry.extend_from_slice(&chunk[..n]);
                // Each event body carries "*lat N end*".
                for k in take_markers(&mut carry, b"*lat ") {
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if first {
                        if let Some(slot) = got.get(k) {
                            slot.store(now, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
        std::mem::forget(c.w);
    }
    let doc: serde_json::Value = serde_json::from_slice(&fixture)?;
    let (p0, c0, t0) = (
        cpu_secs(prosody_pid),
        cpu_secs(caseroom_pid),
        Instant::now(),
    );
    let posted = post_paced(http, &doc, rate, n_total, "lat", start).await;
    let (p1, c1, el) = (
        cpu_secs(prosody_pid),
        cpu_secs(caseroom_pid),
        t0.elapsed().as_secs_f64(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "    cpu while paced: prosody {:.0}%, caseroom {:.0}%",
        (p1 - p0) / el * 100.0,
        (c1 - c0) / el * 100.0
    );
    let mut lat: Vec<f64> = posted
        .iter()
        .filter_map(|p| {
            let g = got.get(p.k)?.load(Ordering::Relaxed);
            (g > 0).then(|| g.saturating_sub(p.sent_ns) as f64 / 1e6)
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let missing = n_total - lat.len();
    let mut acks: Vec<f64> = posted.iter().filter_map(|p| p.answered_ms).collect();
    acks.sort_by(|a, b| a.total_cmp(b));
    if !acks.is_empty() {
        println!(
            "    POST → 202 (durably accepted): p50 {:.1} ms  p99 {:.1} ms",
            quantile(&acks, 0.5),
            quantile(&acks, 0.99)
        );
    }
    let pct = |q: f64| quantile(&lat, q);
    println!(
        "  POST → occupant at {rate}/s, {OCCUPANTS} occupants: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms   ({} messages delivered to occupants, {missing} of {n_total} not seen)   (target p99 < 50 ms: {})",
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        delivered.load(Ordering::Relaxed),
        if pct(0.99) < 50.0 && missing == 0 { "met" } else { "NOT met" }
    );
    for r in readers {
        r.abort();
    }
    // For comparison: an occupant's own groupchat message, from sending to its reflection.
    let mut c = Raw::login(c2s, "load20", "pw-load").await?;
    c.join(&format!("bench@{DOMAIN}"), "load20-echo").await?;
    let mut echo = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        c.send(&format!(
            "<message to='bench@{DOMAIN}' type='groupchat'><body>echo {i} end</body></message>"
        ))
        .await?;
        c.until(&[&format!("echo {i} end")]).await?;
        echo.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    echo.sort_by(|a, b| a.total_cmp(b));
    println!("    occupant message → its reflection (same path back through the archive): p50 {:.1} ms  p99 {:.1} ms", echo[25], echo[49]);
    if std::env::var("BENCH_DEBUG").is_ok() {
        eprintln!("kept: {}", dir.keep().display());
    }
    drop(procs);
    Ok(())
}
