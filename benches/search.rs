//! Benchmark: full-text search of a room's history (XEP-0431 through MAM), in-process on a real
//! SQLite store configured as in production, without servers (what it measures is the store's
//! query; the MUC core and the link add the same per page as for any MAM query, `cargo bench --bench muc`).
//!
//! 1. Archive ingest with the index on: messages appended in batches of 100 (group commit).
//! 2. One-word searches for the latest page of 50 in a room of 100,000 and then 1,000,000 messages:
//!    p50/p99 by how common the word is, against the same latest-page query without a search
//!    (plain MAM) in the same run.
//! 3. Index build for an archive kept before the index existed (the upgrade's backfill), at 100,000.
//!
//! Target (operating issue): p99 < 50 ms for a one-word query on a 1M-message room.
//! Run: `cargo bench --bench search` (`CASEROOM_BENCH_MESSAGES` for the largest size, default 1,000,000).

use std::time::Instant;

use caseroom::muc::mam::{ArchiveQuery, Page};
use caseroom::muc::ArchivedMessage;
use caseroom::store::Store;
use xmpp_parsers::message::Message;

type BoxErr = Box<dyn std::error::Error>;

/// Words of the synthetic vocabulary; word k is used with probability ∝ 1/(k+1) (Zipf), like text.
const VOCABULARY: usize = 20_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A Zipf-distributed word index (inverse of the harmonic CDF, approximately).
    fn word(&mut self) -> usize {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        let k = ((VOCABULARY as f64 + 1.0).powf(u) - 1.0) as usize;
        k.min(VOCABULARY - 1)
    }
}

fn word(k: usize) -> String {
    // Pronounceable, distinct, no digits (so the numbers in ids are not words here).
    const SYL: [&str; 16] = [
        "ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "fu", "ge", "hi", "ja", "vo", "wu",
        "ze",
    ];
    let mut s = String::new();
    let mut n = k + 16;
    while n > 0 {
        s.push_str(SYL[n % 16]);
        n /= 16;
    }
    s
}

fn message(seq: u64, ts: i64, rng: &mut Rng) -> ArchivedMessage {
    let words: Vec<String> = (0..12).map(|_| word(rng.word())).collect();
    let mut m = Message::groupchat(None);
    m.from = "team@rooms.localhost/alice".parse().ok();
    m.bodies.insert(Default::default(), words.join(" "));
    ArchivedMessage {
        seq,
        id: format!("{seq:016x}"),
        room: "team".into(),
        ts: chrono::DateTime::from_timestamp_micros(ts).unwrap_or_default(),
        nick: "alice".into(),
        sender: "alice@localhost".parse().expect("jid"),
        message: m,
        origin: None,
        completes_inbox: None,
    }
}

/// Append messages up to `total`; returns messages per second.
fn fill(store: &mut Store, from: u64, total: u64, rng: &mut Rng) -> Result<f64, BoxErr> {
    let t = Instant::now();
    let mut batch = Vec::with_capacity(100);
    for seq in from..total {
        batch.push(message(
            seq + 1,
            1_700_000_000_000_000 + seq as i64 * 1000,
            rng,
        ));
        if batch.len() == 100 {
            store.append(&batch)?;
            batch.clear();
        }
    }
    store.append(&batch)?;
    Ok((total - from) as f64 / t.elapsed().as_secs_f64())
}

fn latest_page(words: Option<Vec<String>>) -> ArchiveQuery {
    let mut q = ArchiveQuery::metadata("team");
    q.metadata = false;
    q.max = 50;
    q.page = Page::Backward(None);
    q.fulltext = words;
    q
}

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Time `n` queries; returns (p50, p99) in ms and the mean hit count.
fn time(store: &Store, n: usize, mut q: impl FnMut(usize) -> ArchiveQuery) -> (f64, f64, f64) {
    let mut ms = Vec::with_capacity(n);
    let mut hits = 0usize;
    for i in 0..n {
        let query = q(i);
        let t = Instant::now();
        let page = store.query(&query).expect("query");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        // Beyond 10,000 hits the page carries no count (store::search::COUNT_UP_TO).
        hits += page.count.unwrap_or(10_001);
    }
    (
        percentile(&mut ms, 50),
        percentile(&mut ms, 99),
        hits as f64 / n as f64,
    )
}

fn measure(store: &Store, size: u64) {
    println!("  {size} messages in the room:");
    let (p50, p99, _) = time(store, 200, |_| latest_page(None));
    println!("    plain MAM latest page (reference)   p50 {p50:6.2} ms  p99 {p99:6.2} ms");
    let mut worst = 0f64;
    for (label, range) in [
        ("common word (rank 1-10)", 0..10),
        ("medium word (rank 100-1000)", 100..1000),
        ("rare word (rank 5000-20000)", 5000..VOCABULARY),
    ] {
        let width = range.end - range.start;
        let (p50, p99, hits) = time(store, 200, |i| {
            latest_page(Some(vec![word(range.start + (i * 7919) % width)]))
        });
        worst = worst.max(p99);
        println!(
            "    search, {label:<28} p50 {p50:6.2} ms  p99 {p99:6.2} ms  ({hits:.0} hits on average; over 10,000 counts as 10,001)"
        );
    }
    println!(
        "    worst p99 {worst:.2} ms (target < 50 ms: {})",
        if worst < 50.0 { "met" } else { "NOT met" }
    );
}

fn run() -> Result<(), BoxErr> {
    let largest: u64 = std::env::var("CASEROOM_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(&dir.path().join("caseroom.db"))?;
    store.set_fsync_messages(false);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!(
        "caseroom full-text search benchmark (12-word messages, Zipf vocabulary of {VOCABULARY})"
    );
    let first = largest.min(100_000);
    let rate = fill(&mut store, 0, first, &mut rng)?;
    println!("  archive ingest with the index on: {rate:.0} messages/s (batches of 100)");
    measure(&store, first);

    // The upgrade's backfill: the same archive as if kept before the index existed.
    let c = rusqlite::Connection::open(dir.path().join("caseroom.db"))?;
    c.execute_batch(&format!(
        "DELETE FROM archive_fts; UPDATE meta SET value = '{}' WHERE key = 'fts_backfill_below';",
        first + 1
    ))?;
    drop(c);
    let t = Instant::now();
    while store.fts_backfill_step()? {}
    println!(
        "  index build for {first} messages kept before the index (backfill): {:.1} s",
        t.elapsed().as_secs_f64()
    );

    if largest > first {
        let rate = fill(&mut store, first, largest, &mut rng)?;
        println!("  archive ingest with the index on, up to {largest}: {rate:.0} messages/s");
        measure(&store, largest);
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("search bench failed: {e}");
        std::process::exit(1);
    }
}
