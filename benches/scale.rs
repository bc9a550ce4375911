//! Benchmark: scale and memory of the caseroom process (RSS from /proc, start-up time to a healthy link).
//!
//! 1. 10,000 rooms with 10 members each, empty archive: start-up time and RSS.
//! 2. The same rooms with 1,000,000 archived messages (100 a room): start-up time and RSS.
//! 3. Idle occupants: 1,000 sessions (50 users × 20 resources, each resource in its own room) join an
//!    instance of those 20 rooms; RSS growth per occupant over the second 500 (`core_cost` measures
//!    the same as live heap, exactly).
//!
//! Targets (performance issue): ≤ 2 KiB per idle occupant; 10k rooms × 10 members ≤ 100 MB; start-up with 10k
//! rooms and 1M messages < 1 s to link up. Run: `cargo bench --bench scale` (`CASEROOM_BENCH_MESSAGES` to
//! change the 1,000,000).

mod common;

use std::time::{Duration, Instant};

use common::{bench_main, free_port, start_caseroom, start_prosody, BoxErr, Procs, Raw};

const DOMAIN: &str = "rooms.localhost";
const SECRET: &str = "bench-secret";
const ROOMS: usize = 10_000;
const MEMBERS: usize = 10;
const USERS: usize = 50;
const RESOURCES: usize = 20;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Start caseroom on `db` with 10k rooms; the time until its link is up, and the process.
async fn start(
    dir: &std::path::Path,
    comp: u16,
    db: &std::path::Path,
    rooms: usize,
) -> Result<(Duration, std::process::Child, u16), BoxErr> {
    let http = free_port();
    let mut cfg = format!(
        "[component]\njid = \"{DOMAIN}\"\nserver = \"127.0.0.1:{comp}\"\nsecret = \"{SECRET}\"\n[store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n{}",
        db.display(),
        common::NO_RATE_LIMITS
    );
    for r in 0..rooms {
        // The first RESOURCES rooms hold the 50 load users (the idle-occupant test: each session joins
        // its own room, so join presences stay 50² a room); the rest, ten distinct people each.
        let members: Vec<String> = if r < RESOURCES {
            (1..=USERS)
                .map(|u| format!("\"load{u:02}@localhost\""))
                .collect()
        } else {
            (0..MEMBERS)
                .map(|m| format!("\"p{r}m{m}@example.org\""))
                .collect()
        };
        let extra: Vec<String> = vec![];
        cfg.push_str(&format!(
            "[[room]]\nname = \"room{r}\"\nmembers = [{}]\n",
            members
                .into_iter()
                .chain(extra)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let t = Instant::now();
    let child = start_caseroom(dir, &cfg)?;
    for _ in 0..600 {
        if common::healthy(http).await {
            return Ok((t.elapsed(), child, http));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("caseroom did not link up within 3 s".into())
}

/// Start caseroom with all ROOMS on the store in `dir`, print how long it took to link up and its
/// RSS then, and stop it again.
async fn startup(
    dir: &std::path::Path,
    comp: u16,
    label: &str,
    target: &str,
) -> Result<(), BoxErr> {
    let (took, mut child, _) = start(dir, comp, &dir.join("caseroom.db"), ROOMS).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(child.id());
    println!(
        "  start-up, {label} linked in {:>6.0} ms, RSS {:>6.1} MB   {target}",
        took.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_secs(2)).await; // Prosody frees the component domain
    Ok(())
}

fn main() -> Result<(), BoxErr> {
    bench_main(run)
}

async fn run() -> Result<(), BoxErr> {
    let messages: usize = common::env_or("CASEROOM_BENCH_MESSAGES", 1_000_000);
    let dir = tempfile::tempdir()?;
    let prosody = start_prosody(dir.path(), &[("PROSODY_NO_NAGLE", "1")], DOMAIN, SECRET)?;
    let mut procs = Procs(vec![], vec![prosody.dir.clone()]);
    println!("caseroom scale benchmark: {ROOMS} rooms x {MEMBERS} members");

    // 1. Empty archive.
    let cdir = dir.path().join("empty");
    std::fs::create_dir_all(&cdir)?;
    startup(
        &cdir,
        prosody.comp,
        "empty archive:       ",
        "(target <= 100 MB)",
    )
    .await?;

    // 2. With the archive.
    let fdir = dir.path().join("full");
    std::fs::create_dir_all(&fdir)?;
    let t = Instant::now();
    common::fill_archive(
        &fdir.join("caseroom.db"),
        messages,
        DOMAIN,
        |i| format!("room{}", i % ROOMS),
        "someone",
        "someone@example.org",
    )?;
    eprintln!(
        "    (filled {messages} messages in {:.0} s)",
        t.elapsed().as_secs_f64()
    );
    let label = format!("{messages} messages:");
    startup(&fdir, prosody.comp, &label, "(target < 1000 ms)").await?;

    // 3. Idle occupants, in an instance of only the 20 rooms they join: start-up with 10,000 rooms
    // frees tens of MB that the allocator would hand to the occupants without RSS moving.
    let (_, child, _) = start(&fdir, prosody.comp, &fdir.join("caseroom.db"), RESOURCES).await?;
    let pid = child.id();
    procs.0.push(child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A room reads its history when first used: read the 20 rooms' before the baseline, so that
    // what is measured is the occupants (one session joins and leaves each room).
    let mut warm = Raw::login_as(prosody.c2s, "load01", "pw-load", "warm").await?;
    for res in 0..RESOURCES {
        let room = format!("room{res}@{DOMAIN}");
        warm.join(&room, "warmup").await?;
        warm.send(&format!(
            "<presence to='{room}/warmup' type='unavailable'/>"
        ))
        .await?;
        warm.until(&["type='unavailable'"]).await?;
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // RSS grows by pages and the allocator first reuses what the warm-up freed: the first half
    // of the sessions absorbs that; the figure is the growth over the second half.
    let mut clients = Vec::new();
    let before = rss_kib(pid);
    let mut half = before;
    for res in 0..RESOURCES {
        if res == RESOURCES / 2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            half = rss_kib(pid);
        }
        for u in 1..=USERS {
            let user = format!("load{u:02}");
            let mut c =
                Raw::login_as(prosody.c2s, &user, "pw-load", &format!("idle{res:02}")).await?;
            c.join(&format!("room{res}@{DOMAIN}"), &user).await?;
            clients.push(c);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let n = clients.len() as f64;
    println!(
        "  idle occupants: {} joined 20 rooms: RSS +{:.1} MB in all ({:.2} KiB each); second half {:.2} KiB per occupant   (target <= 2 KiB)",
        clients.len(),
        (after.saturating_sub(before)) as f64 / 1024.0,
        after.saturating_sub(before) as f64 / n,
        after.saturating_sub(half) as f64 / (n / 2.0)
    );
    drop(clients);
    drop(procs);
    Ok(())
}
