//! The webhook listener under hostile clients: slow or silent connections are closed by the header
//! timeout, a connection flood is capped, a body that never finishes gets 408 — and a valid signed
//! delivery still gets its 202 while all of that goes on. Real sockets, the real router and store.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caseroom::http::{self, HookCounters, HookTracker, HttpState, Limits};
use caseroom::store::Store;
use caseroom::webhook::TrackerKind;
use caseroom::xmpp::link::LinkState;
use hmac::{Hmac, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &[u8] = b"hostile-test-secret";
const UNSIGNED_TOKEN: &[u8] = b"0f3a9c2e7b5d4a61c8e2";

struct Server {
    addr: std::net::SocketAddr,
    counters: Arc<HookCounters>,
    _dir: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

async fn start(limits: Limits, body_timeout: Duration) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db.sqlite")).expect("store");
    let (store_tx, store_rx) = std::sync::mpsc::channel();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || caseroom::store::worker::run(store, store_rx, ev_tx));
    // Nobody plays the bridge here: drain what the store hands it.
    tokio::spawn(async move { while ev_rx.recv().await.is_some() {} });
    let counters = Arc::new(HookCounters::default());
    let mut trackers = std::collections::HashMap::new();
    trackers.insert(
        "gh".to_owned(),
        HookTracker {
            kind: TrackerKind::Github,
            secret: SECRET.to_vec(),
            unsigned: false,
        },
    );
    trackers.insert(
        "plugin".to_owned(),
        HookTracker {
            kind: TrackerKind::Redmine,
            secret: UNSIGNED_TOKEN.to_vec(),
            unsigned: true,
        },
    );
    let link = Arc::new(LinkState::default());
    let app = http::router(Arc::new(HttpState {
        link: link.clone(),
        hooks: counters.clone(),
        trackers,
        max_body: 1024 * 1024,
        body_timeout,
        store: store_tx,
        pack_bodies: true,
        metrics: Arc::new(caseroom::metrics::Metrics::new(link, counters.clone())),
        probed: Default::default(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let c = counters.clone();
    let task = tokio::spawn(async move {
        let _ = http::serve(listener, app, limits, c).await;
    });
    Server {
        addr,
        counters,
        _dir: dir,
        _task: task,
    }
}

fn signed_delivery(delivery: &str) -> Vec<u8> {
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/github/issues.opened.json"
    ))
    .expect("fixture");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).expect("key");
    mac.update(&body);
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut req = format!(
        "POST /hooks/gh HTTP/1.1\r\nHost: caseroom\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: issues\r\nX-GitHub-Delivery: {delivery}\r\n\
         X-Hub-Signature-256: sha256={sig}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req
}

/// Send raw request bytes, return the status code of the answer.
async fn status_of(addr: std::net::SocketAddr, req: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"))
}

/// Wait until the peer closes (EOF or reset), at most `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 written before the close
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_do_not_stall_a_valid_delivery_and_are_closed() {
    let header_timeout = Duration::from_secs(3);
    let srv = start(
        Limits {
            max_connections: 4096,
            header_timeout,
        },
        Duration::from_secs(5),
    )
    .await;
    // 2,000 clients that send a request line and one header, then nothing.
    let mut slow = Vec::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        s.write_all(b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    // And a few that send nothing at all.
    for _ in 0..10 {
        slow.push(TcpStream::connect(srv.addr).await.expect("connect"));
    }
    let started = Instant::now();
    let code = status_of(srv.addr, &signed_delivery("slowloris-1")).await;
    let took = started.elapsed();
    assert_eq!(code, 202, "a valid delivery during the attack");
    assert!(
        took < Duration::from_secs(1),
        "the valid delivery took {took:?}"
    );
    // Every slow connection is closed by the header timeout (plus scheduling slack).
    let mut open = 0;
    for s in &mut slow {
        if !closed_within(s, header_timeout + Duration::from_secs(3)).await {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "slow connections still open after the header timeout"
    );
    assert_eq!(srv.counters.accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let header_timeout = Duration::from_secs(1);
    let srv = start(
        Limits {
            max_connections: 64,
            header_timeout,
        },
        Duration::from_secs(5),
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 "));
    // Keep-alive: the connection stays for another request, but not forever.
    assert!(closed_within(&mut s, header_timeout + Duration::from_secs(3)).await);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_counted() {
    let srv = start(
        Limits {
            max_connections: 16,
            header_timeout: Duration::from_secs(30),
        },
        Duration::from_secs(5),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        s.write_all(b"POST /hooks/gh HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(s);
    }
    // Let the server accept all of them before the one over the cap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(srv.addr).await.expect("connect");
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    assert_eq!(srv.counters.connections_refused.load(Ordering::Relaxed), 1);
    // A slot frees when a held connection goes; then deliveries are served again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status_of(srv.addr, &signed_delivery("after-cap")).await,
        202
    );
}

#[tokio::test]
async fn a_body_that_never_finishes_gets_408() {
    let srv = start(
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        },
        Duration::from_secs(1),
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(
        b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"action\":",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(srv.counters.timed_out.load(Ordering::Relaxed), 1);
    assert_eq!(srv.counters.accepted.load(Ordering::Relaxed), 0);
}

fn unsigned_post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: caseroom\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test]
async fn unsigned_senders_need_the_url_token() {
    let srv = start(
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        },
        Duration::from_secs(5),
    )
    .await;
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/redmine/webhook-plugin.issue_opened.json"
    ))
    .expect("fixture");
    // Without the token, or with a wrong one: 401, nothing stored.
    assert_eq!(
        status_of(srv.addr, &unsigned_post("/hooks/plugin", &body)).await,
        401
    );
    assert_eq!(
        status_of(
            srv.addr,
            &unsigned_post("/hooks/plugin/0f3a9c2e7b5d4a61c8e3", &body)
        )
        .await,
        401
    );
    assert_eq!(srv.counters.accepted.load(Ordering::Relaxed), 0);
    assert_eq!(srv.counters.unauthorized.load(Ordering::Relaxed), 2);
    // With it: accepted.
    let ok = format!("/hooks/plugin/{}", String::from_utf8_lossy(UNSIGNED_TOKEN));
    assert_eq!(status_of(srv.addr, &unsigned_post(&ok, &body)).await, 202);
    // A signed tracker has no token URL: a token cannot stand in for a signature.
    assert_eq!(
        status_of(srv.addr, &unsigned_post("/hooks/gh/anything", &body)).await,
        404
    );
}
