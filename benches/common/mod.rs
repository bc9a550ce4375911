//! Shared by the benchmarks: a minimal raw-socket c2s client, process CPU, free ports, cleanup.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub type BoxErr = Box<dyn std::error::Error + Send + Sync>;

pub struct Raw {
    pub r: OwnedReadHalf,
    pub w: OwnedWriteHalf,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn login(port: u16, user: &str, pw: &str) -> Result<Raw, BoxErr> {
        Raw::login_as(port, user, pw, "bench").await
    }

    /// Log in with the given resource (a benchmark's runs each use their own, so that no run's
    /// sessions are replaced by the next one's).
    pub async fn login_as(port: u16, user: &str, pw: &str, resource: &str) -> Result<Raw, BoxErr> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Raw {
            r,
            w,
            buf: Vec::new(),
        };
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
        c.send(header).await?;
        c.until(&["</stream:features>"]).await?;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"));
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ))
        .await?;
        let got = c.until(&["<success", "<failure"]).await?;
        if got.contains("<failure") {
            return Err(format!("login of {user} failed").into());
        }
        c.send(header).await?;
        c.until(&["</stream:features>"]).await?;
        c.send(&format!("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await?;
        c.until(&["</iq>"]).await?;
        Ok(c)
    }

    pub async fn send(&mut self, s: &str) -> Result<(), BoxErr> {
        self.w.write_all(s.as_bytes()).await?;
        Ok(())
    }

    /// Read until one of `pats` appears; returns (and consumes) everything up to it.
    pub async fn until(&mut self, pats: &[&str]) -> Result<String, BoxErr> {
        // Each read searches only what it added (plus a pattern's length before it): searching the
        // whole buffer again per read made a 100 KB MAM page cost the load generator O(n²).
        let longest = pats.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut from = 0;
        loop {
            let hit = pats
                .iter()
                .filter_map(|p| find(&self.buf[from..], p.as_bytes()).map(|i| from + i + p.len()))
                .min();
            if let Some(end) = hit {
                let out: Vec<u8> = self.buf.drain(..end).collect();
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            from = self.buf.len().saturating_sub(longest);
            // Straight into the buffer: no 64 KiB chunk zeroed and copied per read.
            self.buf.reserve(65536);
            let n = tokio::time::timeout(Duration::from_secs(20), self.r.read_buf(&mut self.buf))
                .await??;
            if n == 0 {
                return Err(format!(
                    "connection closed waiting for {pats:?}; had {}",
                    String::from_utf8_lossy(&self.buf)
                )
                .into());
            }
        }
    }

    pub async fn join(&mut self, room: &str, nick: &str) -> Result<(), BoxErr> {
        self.send(&format!(
            "<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
        ))
        .await?;
        let got = self
            .until(&["</subject>", "<subject/>", "type='error'", "type=\"error\""])
            .await?;
        if got.contains("error") && !got.contains("subject") {
            return Err(format!("join {room} as {nick} failed: {got}").into());
        }
        Ok(())
    }
}

/// Whether caseroom's `/healthz` on `http` says the link is up.
pub async fn healthy(http: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", http)).await else {
        return false;
    };
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    got.starts_with(b"HTTP/1.1 200")
}

/// The numbers written after `marker` in what a connection has read so far (e.g. "paced 17" in a
/// body), complete ones only; what was scanned is drained from `carry`, keeping a tail in which a
/// marker may still be arriving.
pub fn take_markers(carry: &mut Vec<u8>, marker: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(p) = find(&carry[pos..], marker) {
        let from = pos + p + marker.len();
        let len = carry[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if from + len >= carry.len() {
            break; // the number is not complete yet
        }
        if let Some(k) = std::str::from_utf8(&carry[from..from + len])
            .ok()
            .and_then(|d| d.parse().ok())
        {
            found.push(k);
        }
        pos = from + len;
    }
    let keep_from = pos.max(carry.len().saturating_sub(32)).min(carry.len());
    carry.drain(..keep_from);
    found
}

pub fn find(hay: &[u8], pat: &[u8]) -> Option<usize> {
    hay.windows(pat.len()).position(|w| w == pat)
}

/// A bench setting from the environment: `name` parsed, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) of a process, from /proc.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub struct Procs(pub Vec<Child>, pub Vec<PathBuf>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.1 {
            let _ = Command::new(root().join("tests/servers/stop.sh"))
                .arg(d)
                .status();
        }
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run a benchmark's async body on a one-worker runtime (the load generator stays light); `cargo test
/// --benches` probes benches with `--list`/`--test`, which do nothing.
pub fn bench_main<F: std::future::Future<Output = Result<(), BoxErr>>>(
    run: impl FnOnce() -> F,
) -> Result<(), BoxErr> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// A throwaway XMPP server (Prosody or ejabberd) for a benchmark.
pub struct Server {
    /// "Prosody" or "ejabberd", for what the benchmark prints.
    pub name: &'static str,
    /// Its directory (stop.sh takes it).
    pub dir: PathBuf,
    /// c2s port.
    pub c2s: u16,
    /// Component port.
    pub comp: u16,
    /// The extra component's port, if one was asked for (Prosody: the same port).
    pub extra_comp: u16,
    /// Process id (for CPU accounting).
    pub pid: u32,
}

/// Run `tests/servers/<script>` on `dir` with `args` after it (ports, domain, secret, …).
fn run_server_script(
    script: &str,
    dir: &std::path::Path,
    env: &[(&str, String)],
    args: &[String],
) -> Result<(), BoxErr> {
    let ok = Command::new(root().join("tests/servers").join(script))
        .envs(env.iter().map(|(k, v)| (k, v.as_str())))
        .arg(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()?
        .success();
    if !ok {
        return Err(format!("{script} did not start its server").into());
    }
    Ok(())
}

/// A process id from a pid file.
fn read_pid(path: &std::path::Path) -> Result<u32, BoxErr> {
    Ok(std::fs::read_to_string(path)?.trim().parse()?)
}

/// Start tests/servers/ejabberd.sh in `base/ejabberd`, with a second component listener for
/// `extra` if given (the null component's domain).
pub fn start_ejabberd(
    base: &std::path::Path,
    domain: &str,
    secret: &str,
    extra: Option<&str>,
    connections: usize,
) -> Result<Server, BoxErr> {
    let dir = base.join("ejabberd");
    std::fs::create_dir_all(&dir)?;
    let (c2s, comp, extra_comp) = (free_port(), free_port(), free_port());
    let mut env: Vec<(&str, String)> = extra
        .map(|d| ("EJABBERD_EXTRA_COMPONENT", format!("{d} {extra_comp}")))
        .into_iter()
        .collect();
    if connections > 1 {
        // caseroom's component.connections: ejabberd keeps each room on one of them.
        env.push(("EJABBERD_BALANCING", "1".into()));
        env.push(("EJABBERD_COMPONENTS", connections.to_string()));
    }
    let args = [c2s, comp]
        .map(|p| p.to_string())
        .into_iter()
        .chain([
            domain.to_owned(),
            secret.to_owned(),
            free_port().to_string(),
        ])
        .collect::<Vec<_>>();
    run_server_script("ejabberd.sh", &dir, &env, &args)?;
    Ok(Server {
        name: "ejabberd",
        // The Erlang VM's own pid (server.pid is the ejabberdctl wrapper's).
        pid: read_pid(&dir.join("ejabberd.pid"))?,
        dir,
        c2s,
        comp,
        extra_comp,
    })
}

/// Start tests/servers/prosody.sh in `base/prosody` with the given environment (PROSODY_* switches).
pub fn start_prosody(
    base: &std::path::Path,
    env: &[(&str, &str)],
    domain: &str,
    secret: &str,
) -> Result<Server, BoxErr> {
    let dir = base.join("prosody");
    std::fs::create_dir_all(&dir)?;
    let (c2s, comp) = (free_port(), free_port());
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let args = [
        c2s.to_string(),
        comp.to_string(),
        domain.to_owned(),
        secret.to_owned(),
    ];
    run_server_script("prosody.sh", &dir, &env, &args)?;
    Ok(Server {
        name: "Prosody",
        pid: read_pid(&dir.join("server.pid"))?,
        dir,
        c2s,
        comp,
        extra_comp: comp,
    })
}

/// Start the caseroom binary on `config` (written to `dir/caseroom.toml`), logging warnings to `dir/caseroom.log`.
pub fn start_caseroom(dir: &std::path::Path, config: &str) -> Result<Child, BoxErr> {
    let path = dir.join("caseroom.toml");
    std::fs::write(&path, config)?;
    // CASEROOM_BENCH_BIN runs another build (an older commit's, or one with frame pointers for
    // `perf`) under the same load generator.
    let bin = std::env::var_os("CASEROOM_BENCH_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_caseroom").into());
    Ok(Command::new(bin)
        .args(["run", "--config", path.to_str().ok_or("path")?])
        .env(
            "CASEROOM_LOG",
            std::env::var("BENCH_CASEROOM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(std::fs::File::create(dir.join("caseroom.log"))?)
        .spawn()?)
}

/// The benchmarks measure capacity: one load client sends as fast as the server takes it, which the
/// per-person rate limits (a policy against floods, see SECURITY.md) would otherwise refuse.
pub const NO_RATE_LIMITS: &str =
    "[muc]\nmessages_per_minute = 100000000\nmessage_burst = 100000000\n\
queries_per_minute = 100000000\nquery_burst = 100000000\n";

/// Append `total` messages to the caseroom store at `db`, one a millisecond up to now: message `i`
/// ("archived message i") in room `room_of(i)` of `domain`, from the occupant `nick` whose bare JID
/// is `sender`. Commits in batches, not fsynced one by one (setup, not a measure).
pub fn fill_archive(
    db: &std::path::Path,
    total: usize,
    domain: &str,
    room_of: impl Fn(usize) -> String,
    nick: &str,
    sender: &str,
) -> Result<(), BoxErr> {
    use caseroom::muc::ArchivedMessage;
    use chrono::Utc;
    use xmpp_parsers::{jid::Jid, message::Message};
    let mut store = caseroom::store::Store::open(db)?;
    store.set_fsync_messages(false);
    let sender: xmpp_parsers::jid::BareJid = sender.parse()?;
    let start = Utc::now().timestamp_micros() as u64 - total as u64 * 1000;
    let mut batch = Vec::new();
    for i in 0..total {
        let room = room_of(i);
        let seq = start + i as u64;
        let mut m = Message::groupchat(None);
        m.from = Some(Jid::new(&format!("{room}@{domain}/{nick}"))?);
        m.bodies
            .insert(Default::default(), format!("archived message {i}"));
        batch.push(ArchivedMessage {
            seq,
            id: format!("{seq:016x}{i:08x}"),
            room,
            ts: chrono::DateTime::from_timestamp_micros(seq as i64).unwrap_or_else(Utc::now),
            nick: nick.into(),
            sender: sender.clone(),
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
