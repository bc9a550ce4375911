//! Operating tasks through the real `caseroom` binary: an online backup taken while the store is
//! under write load holds every delivery acknowledged before it began; a restore is refused while
//! caseroom runs on the database and puts the backup in place otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use caseroom::store::worker::StoreOp;
use caseroom::store::{ops, Accepted, InboxItem, Store};

fn config(dir: &Path, db: &Path) -> PathBuf {
    let path = dir.join("caseroom.toml");
    std::fs::write(
        &path,
        format!(
            "[component]\njid = \"rooms.localhost\"\nserver = \"127.0.0.1:5347\"\nsecret = \"d1f0c7a93b5e4e8a\"\n\
             [store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:8088\"\n",
            db.display()
        ),
    )
    .expect("config");
    path
}

fn item(n: usize) -> InboxItem {
    let mut body = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
    body.extend(std::iter::repeat_n(b'x', 4000));
    body.extend_from_slice(b"\"}");
    InboxItem {
        tracker: "forge".into(),
        delivery: Some(format!("d-{n}")),
        received: 1,
        content_type: Some("application/json".into()),
        headers: vec![],
        body,
        body_hash: None,
        packed: None,
        doc: None,
    }
}

fn caseroom(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_caseroom"))
        .args(args)
        .env("CASEROOM_LOG", "warn")
        .output()
        .expect("run caseroom")
}

fn ids(db: &Path) -> Vec<i64> {
    let c = rusqlite::Connection::open(db).expect("open");
    let mut s = c
        .prepare("SELECT id FROM inbox ORDER BY id")
        .expect("select");
    let rows = s.query_map([], |r| r.get(0)).expect("query");
    rows.collect::<Result<_, _>>().expect("rows")
}

#[test]
fn a_backup_under_write_load_holds_every_delivery_acknowledged_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("caseroom.db");
    let cfg = config(dir.path(), &db);
    std::fs::write(dir.path().join("caseroom.db.tokens.json"), b"{}").expect("tokens");
    let store = Store::open(&db).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();
    let (ev_tx, _ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = std::thread::spawn(move || caseroom::store::worker::run(store, rx, ev_tx));
    // A client acknowledging deliveries as fast as they commit, until told to stop.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop, tx) = (acked.clone(), stop.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut answers = Vec::new();
                for _ in 0..10 {
                    n += 1;
                    let (otx, orx) = tokio::sync::oneshot::channel();
                    tx.send(StoreOp::Accept(item(n), otx)).expect("store");
                    answers.push(orx);
                }
                for a in answers {
                    if let Ok(Ok(Accepted::New(id))) = a.blocking_recv() {
                        acked.lock().expect("lock").push(id);
                    }
                }
            }
        })
    };
    while acked.lock().expect("lock").len() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before: Vec<i64> = acked.lock().expect("lock").clone();
    let out = dir.path().join("backup.db");
    let ran = caseroom(&[
        "backup",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--to",
        out.to_str().expect("utf-8"),
    ]);
    let during = acked.lock().expect("lock").len() - before.len();
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    drop(tx);
    writer.join().expect("store thread");
    let said = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(said.contains("webhook deliveries"), "{said}");
    assert!(
        during > 0,
        "the backup must run while deliveries are acknowledged"
    );
    let copied = ids(&out);
    let missing: Vec<&i64> = before.iter().filter(|i| !copied.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, not in it: {missing:?}"
    );
    let tokens = dir.path().join("backup.db.tokens.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&tokens)
            .expect("tokens copied")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // A backup never overwrites a file.
    let again = caseroom(&[
        "backup",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--to",
        out.to_str().expect("utf-8"),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
}

#[test]
fn a_restore_waits_for_caseroom_to_stop_and_keeps_what_it_replaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("caseroom.db");
    let cfg = config(dir.path(), &db);
    let cfg = cfg.to_str().expect("utf-8");
    let mut store = Store::open(&db).expect("open");
    store.accept(&[item(1), item(2)]).expect("accept");
    let out = dir.path().join("backup.db");
    let tokens = dir.path().join("none.json");
    ops::backup(&db, &tokens, &out).expect("backup");
    store.accept(&[item(3)]).expect("accept after the backup");
    drop(store);
    let from = out.to_str().expect("utf-8");

    // While a caseroom holds the database: refused, nothing touched.
    let running = ops::InstanceLock::acquire(&db).expect("lock");
    let refused = caseroom(&["restore", "--config", cfg, "--from", from]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("in use") && why.contains("stop it first"),
        "{why}"
    );
    assert_eq!(ids(&db).len(), 3);
    drop(running);

    // Not a caseroom database: refused with the reason.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all, just text").expect("junk");
    let bad = caseroom(&[
        "restore",
        "--config",
        cfg,
        "--from",
        junk.to_str().expect("utf-8"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("junk.db"));

    let ok = caseroom(&["restore", "--config", cfg, "--from", from]);
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        ids(&db).len(),
        2,
        "the backup's deliveries, not the later one"
    );
    let kept = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("caseroom.db.before-restore-"))
                .is_some_and(|stamp| stamp.chars().all(|c| c.is_ascii_digit()))
        })
        .expect("the replaced database is kept");
    assert_eq!(ids(&kept).len(), 3, "the replaced database, intact");
    assert!(said.contains("kept as"), "{said}");
    // The restored database opens (and migrates) as usual.
    Store::open(&db).expect("opens after the restore");
}

fn old_and_new_messages(store: &mut Store, first_seq: u64, old: usize, new: usize) {
    use caseroom::muc::ArchivedMessage;
    use xmpp_parsers::message::Message;
    let now = chrono::Utc::now();
    let msgs: Vec<ArchivedMessage> = (0..old + new)
        .map(|i| {
            let seq = first_seq + i as u64;
            let mut m = Message::groupchat(None);
            m.from = Some("team@rooms.localhost/alice".parse().expect("jid"));
            m.bodies
                .insert(Default::default(), format!("message {seq}"));
            ArchivedMessage {
                seq,
                id: format!("id{seq}"),
                room: "team".into(),
                ts: if i < old {
                    now - chrono::Duration::days(400)
                } else {
                    now
                },
                nick: "alice".into(),
                sender: "alice@localhost".parse().expect("jid"),
                message: m,
                origin: None,
                completes_inbox: None,
            }
        })
        .collect();
    store.append(&msgs).expect("append");
}

fn archived(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).expect("open");
    c.query_row("SELECT COUNT(*) FROM archive", [], |r| r.get(0))
        .expect("count")
}

#[test]
fn prune_runs_inside_a_running_caseroom_or_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("caseroom.db");
    let cfg = config(dir.path(), &db);
    let cfg = cfg.to_str().expect("utf-8");
    let mut store = Store::open(&db).expect("open");
    old_and_new_messages(&mut store, 1, 10, 5);
    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--config", cfg, "--older-than", "30d"];
        args.extend_from_slice(extra);
        let out = caseroom(&args);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    };
    let said = prune(&["--dry-run"]);
    assert!(
        said.starts_with("would delete 10 messages in 1 rooms"),
        "{said}"
    );
    assert_eq!(archived(&db), 15, "a dry run deletes nothing");
    let said = prune(&["--dry-run", "--room", "elsewhere"]);
    assert!(said.starts_with("would delete 0 messages"), "{said}");

    // A running caseroom (its lock and its store thread): the request goes to it.
    let running = ops::InstanceLock::acquire(&db).expect("lock");
    let (tx, rx) = std::sync::mpsc::channel::<StoreOp>();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = std::thread::spawn(move || caseroom::store::worker::run(store, rx, ev_tx));
    let said = prune(&[]);
    assert!(
        said.starts_with("deleted (by the running caseroom) 10 messages in 1 rooms"),
        "{said}"
    );
    assert_eq!(archived(&db), 5);
    // The service was told, so that join history in memory forgets them too.
    let mut told = false;
    while let Ok(ev) = ev_rx.try_recv() {
        if let caseroom::store::worker::StoreEvent::Pruned(rooms) = ev {
            told = rooms.iter().any(|(r, _)| r == "team");
        }
    }
    assert!(told);
    drop(tx);
    writer.join().expect("store thread");
    drop(running);

    // Nobody runs on it: this process prunes.
    let mut store = Store::open(&db).expect("open");
    old_and_new_messages(&mut store, 100, 3, 0);
    drop(store);
    let said = prune(&[]);
    assert!(said.starts_with("deleted 3 messages in 1 rooms"), "{said}");
    assert_eq!(archived(&db), 5);
}

#[test]
fn logs_can_be_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("caseroom.db");
    let cfg = config(dir.path(), &db);
    // Nothing listens on the configured port: caseroom logs, then says why it cannot start.
    let out = Command::new(env!("CARGO_BIN_EXE_caseroom"))
        .args(["run", "--config", cfg.to_str().expect("utf-8")])
        .env("CASEROOM_LOG", "debug")
        .env("CASEROOM_LOG_FORMAT", "json")
        .env("CASEROOM_NOT_A_SECTION", "1")
        .env("CASEROOM_COMPONENT_SERVER", "127.0.0.1:9")
        .output()
        .expect("run caseroom");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each log line is a JSON object"))
        .collect();
    assert!(
        logged
            .iter()
            .any(|v| v["level"] == "DEBUG" && v["fields"]["var"] == "CASEROOM_NOT_A_SECTION"),
        "{stderr}"
    );
}
