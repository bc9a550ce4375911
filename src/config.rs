//! One typed configuration: TOML file plus `CASEROOM_*` environment overrides.
//!
//! Environment overrides use `CASEROOM_<SECTION>_<KEY>`, e.g. `CASEROOM_COMPONENT_SECRET` or
//! `CASEROOM_STORE_PATH`; the section is the first word after the prefix and the rest is the key.
//! `CASEROOM_LOG` is not a config key: it sets the log filter (tracing `EnvFilter` syntax).
//! [`Config::validate`] reports every problem and names the key it concerns.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use xmpp_parsers::jid::BareJid;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file we tried.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file we tried.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable name.
        var: String,
        /// Why it was rejected.
        message: String,
    },
    /// One or more values are invalid; each entry names its key.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The XEP-0114 link.
    pub component: ComponentConfig,
    /// The SQLite store.
    pub store: StoreConfig,
    /// The HTTP listener (health, later webhooks).
    #[serde(default)]
    pub http: HttpConfig,
    /// MUC/MAM service tuning.
    #[serde(default)]
    pub muc: MucConfig,
    /// Static rooms.
    #[serde(default, rename = "room")]
    pub rooms: Vec<RoomConfig>,
    /// Trackers that send webhooks (`POST /hooks/{name}`).
    #[serde(default, rename = "tracker")]
    pub trackers: Vec<TrackerConfig>,
    /// The async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads running the link and the bridge (the HTTP listener and the store have one each).
    /// 1 (the default) runs both on one thread: a stanza then crosses no thread on its way
    /// through, which halved caseroom's CPU per delivered stanza on a 2-core machine
    /// (BENCHMARKS.md). More threads only spread the bridge's work on machines with more cores.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: default_worker_threads(),
        }
    }
}

fn default_worker_threads() -> usize {
    1
}

/// One `[[tracker]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerConfig {
    /// Route name: `POST /hooks/{name}`; also part of thread ids.
    pub name: String,
    /// Dialect.
    pub kind: crate::webhook::TrackerKind,
    /// HMAC key or token, per kind (see README "Connecting your tracker").
    pub secret: Option<String>,
    /// File holding the secret.
    pub secret_file: Option<PathBuf>,
    /// Accept deliveries without a signature. Only for trackers that cannot sign (the redmine_webhook
    /// plugin); must be set explicitly.
    #[serde(default)]
    pub allow_unsigned: bool,
    /// Nick the events come from (default: the tracker name).
    pub bot_nick: Option<String>,
    /// Tracker project/group → room localpart. Without an entry, the room named like the project
    /// (`acme/web` → `acme-web`, then `web`) is used if it exists.
    #[serde(default)]
    pub rooms: std::collections::BTreeMap<String, String>,
    /// REST base URL (enables room sync and chat commands; Redmine only for now).
    pub url: Option<String>,
    /// API key; an admin key acts as people via `X-Redmine-Switch-User`.
    pub api_key: Option<String>,
    /// File holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// How often groups and members are synced ("5m", "30s", "1h").
    #[serde(default = "default_sync_interval", with = "duration")]
    pub sync_interval: std::time::Duration,
    /// Change catch-up interval (reserved for the catch-up poller; not used yet).
    #[serde(default, with = "duration::optional")]
    pub poll_interval: Option<std::time::Duration>,
    /// How JIDs map to tracker logins.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Tracker role name → affiliation (owner, admin, member). Unlisted roles give member.
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, Grant>,
    /// Chat command prefix.
    #[serde(default = "default_prefix")]
    pub command_prefix: String,
    /// Largest answer read from the tracker's REST API; larger ones fail the call.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Create or repair caseroom's webhook on every synced repository at each sync (GitHub, GitLab;
    /// the key must be allowed to administer the repositories' hooks). Needs `url` and `webhook_url`.
    #[serde(default)]
    pub manage_webhooks: bool,
    /// caseroom's `/hooks/<name>` as the tracker reaches it (through your reverse proxy), e.g.
    /// `https://caseroom.example.org/hooks/github`: the address `manage_webhooks` sets.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// The operator's OAuth application (GitHub OAuth App, GitLab application with the device
    /// grant): people link their account in the browser (RFC 8628 device flow) instead of pasting a
    /// token. GitHub and GitLab only; needs `url`.
    #[serde(default)]
    pub oauth_client_id: Option<String>,
    /// Case references (`#12`, or a link to one of the room's cases) a message is answered with a
    /// one-line summary for, at most; 0: none.
    #[serde(default = "default_references")]
    pub references: usize,
    /// A case summarised in a room is not summarised there again for this long.
    #[serde(default = "default_reference_quiet", with = "duration")]
    pub reference_quiet: std::time::Duration,
    /// Label changes of one case arriving within this long of each other become one message (the
    /// case's labels after the last change); "0s" posts each change at once.
    #[serde(default = "default_label_burst", with = "duration")]
    pub label_burst: std::time::Duration,
    /// Only the groups (projects, repositories) whose id matches one of these patterns become rooms
    /// and have their events posted; empty: every group. `*` is any run of characters (`/`
    /// included), `?` one character; case is ignored. E.g. `["acme/*"]`.
    #[serde(default)]
    pub include: Vec<String>,
    /// Groups whose id matches one of these patterns are left out, even when included. E.g.
    /// `["acme/archive-*", "*-sandbox"]`.
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl TrackerConfig {
    /// Does this tracker's group `id` become a room, and are its events posted (`include` /
    /// `exclude`)? A group excluded later keeps its room and archive, and loses its members as a
    /// group the tracker no longer lists does.
    pub fn shows_group(&self, id: &str) -> bool {
        let id = id.to_lowercase();
        let matches = |p: &String| wildmatch::WildMatch::new(&p.to_lowercase()).matches(&id);
        (self.include.is_empty() || self.include.iter().any(matches))
            && !self.exclude.iter().any(matches)
    }
}

fn default_max_response() -> usize {
    crate::tracker::rest::DEFAULT_MAX_RESPONSE
}

/// The room affiliation a tracker role grants (`[tracker.roles]` values).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// member (the default for unlisted roles).
    Member,
    /// admin.
    Admin,
    /// owner.
    Owner,
}

/// `[tracker.identity]`: JID ↔ tracker login.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `alice@<domain>` ↔ login `alice`.
    pub domain: Option<String>,
    /// Explicit bare JID → login, consulted first.
    #[serde(default)]
    pub map: std::collections::BTreeMap<String, String>,
}

impl IdentityConfig {
    /// The tracker login of a bare JID, if known.
    pub fn login_of(&self, jid: &str) -> Option<String> {
        if let Some(l) = self.map.get(jid) {
            return Some(l.clone());
        }
        let jid: BareJid = jid.parse().ok()?;
        let local = jid.node()?;
        (Some(jid.domain().as_str()) == self.domain.as_deref()).then(|| local.as_str().to_owned())
    }

    /// The bare JID of a tracker login, if the config can tell.
    pub fn jid_of(&self, login: &str) -> Option<String> {
        if let Some((jid, _)) = self.map.iter().find(|(_, l)| l.as_str() == login) {
            return Some(jid.clone());
        }
        self.domain
            .as_ref()
            .map(|d| format!("{}@{d}", login.to_lowercase()))
    }
}

fn default_references() -> usize {
    3
}

fn default_reference_quiet() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 60)
}

fn default_label_burst() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn default_sync_interval() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}

fn default_prefix() -> String {
    "!".into()
}

impl TrackerConfig {
    /// The secret, from `secret` or `secret_file`; `None` when unsigned deliveries are allowed.
    pub fn secret_bytes(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(s) = &self.secret {
            return Ok(Some(s.as_bytes().to_vec()));
        }
        match &self.secret_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).as_bytes().to_vec()))
                .map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                }),
            None => Ok(None),
        }
    }

    /// The nick events are posted under.
    pub fn nick(&self) -> &str {
        self.bot_nick.as_deref().unwrap_or(&self.name)
    }

    /// The API key, from `api_key` or `api_key_file`.
    pub fn api_key(&self) -> Result<Option<String>, ConfigError> {
        if let Some(k) = &self.api_key {
            return Ok(Some(k.clone()));
        }
        match &self.api_key_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim().to_owned()))
                .map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                }),
            None => Ok(None),
        }
    }
}

/// One `[[room.filter]]`: which tracker events a room shows. All given fields must match.
#[derive(Debug, Clone, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// `exclude` (default) hides matching events; `include` rules, if any, must match for an event to show.
    #[serde(default)]
    pub mode: FilterMode,
    /// Only events from this tracker (its `name`).
    pub tracker: Option<String>,
    /// issue, comment, push, pull_request, release, ci, other.
    pub event: Option<String>,
    /// caseroom's verb: opened, closed, reopened, edited, assigned, labeled, commented, pushed, merged,
    /// released, succeeded, failed, deleted.
    pub verb: Option<String>,
    /// The tracker's own action word (e.g. GitHub `labeled`, GitLab `open`).
    pub action: Option<String>,
    /// A label the case carries (`!x`: does not carry).
    pub label: Option<String>,
    /// Branch of a push, CI run or pull request (`!main`: any branch but main).
    pub branch: Option<String>,
}

/// Filter mode.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FilterMode {
    /// Hide what matches.
    #[default]
    Exclude,
    /// Show only what matches (together with other include rules).
    Include,
}

/// `[component]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The component's domain, e.g. `rooms.example.org`.
    pub jid: String,
    /// `host:port` of the XMPP server's component listener.
    pub server: String,
    /// The shared secret (or use `secret_file`).
    pub secret: Option<String>,
    /// A file holding the shared secret (trailing newline ignored).
    pub secret_file: Option<PathBuf>,
    /// Maximum stanzas queued while the link is down.
    #[serde(default = "default_queue")]
    pub queue_limit: usize,
    /// Seconds between keepalive pings to the server.
    #[serde(default = "default_ping")]
    pub ping_interval_secs: u64,
    /// Deepest element nesting accepted in an inbound stanza; deeper ones are answered with
    /// `policy-violation` and never built (see `xmpp::link::guard`).
    #[serde(default = "default_max_depth")]
    pub max_stanza_depth: usize,
    /// Largest inbound stanza in bytes; larger ones are answered with `policy-violation`.
    #[serde(default = "default_max_stanza_bytes")]
    pub max_stanza_bytes: usize,
    /// A write the XMPP server does not take within this time marks the link down (then relinks).
    #[serde(default = "default_write_timeout", with = "duration")]
    pub write_timeout: std::time::Duration,
    /// Stanzas waiting to be written while the link is up; more are dropped and counted.
    #[serde(default = "default_outgoing_limit")]
    pub outgoing_limit: usize,
    /// The component socket's send buffer (`SO_SNDBUF`) in bytes; 0 leaves it to the kernel.
    /// What the socket holds goes out in order; a join's answer can overtake only what is still
    /// waiting in caseroom, so the default keeps the socket's share small (256 KiB).
    #[serde(default = "default_send_buffer")]
    pub send_buffer_bytes: usize,
    /// Component connections to the server (1–16). More than one only where the server accepts
    /// several connections for one component domain and keeps each room's stanzas on one of
    /// them: ejabberd with `domain_balancing` by `bare_destination` (deploy/ejabberd.yml).
    /// Prosody accepts one. caseroom sends each recipient's stanzas over one connection, so their
    /// order holds; the server then parses and routes them on as many of its cores.
    #[serde(default = "default_connections")]
    pub connections: usize,
}

fn default_connections() -> usize {
    1
}

fn default_send_buffer() -> usize {
    256 * 1024
}

fn default_write_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_outgoing_limit() -> usize {
    65_536
}

fn default_max_depth() -> usize {
    crate::xmpp::link::guard::DEFAULT_MAX_DEPTH
}
fn default_max_stanza_bytes() -> usize {
    crate::xmpp::link::guard::DEFAULT_MAX_BYTES
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Path of the SQLite database file (created if missing). With `url`, only where the tokens
    /// file is looked for by default (`<path>.tokens.json`), to be copied into PostgreSQL once.
    pub path: PathBuf,
    /// A PostgreSQL database instead of SQLite: `postgres://user:password@host:port/database`.
    /// With `?sslmode=require` the connection is TLS, the server's certificate and host name
    /// verified (public roots and `ca_file`); otherwise plain TCP or a unix socket directory as
    /// host (keep those on loopback or a private network). Retention applies; `caseroom
    /// backup`/`restore`/`prune` are for SQLite (use `pg_dump`).
    #[serde(default)]
    pub url: Option<String>,
    /// With `url` and `sslmode=require`: a PEM file of the certificate authority that signed the
    /// PostgreSQL server's certificate (a private CA), trusted besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With `url`, on ejabberd: how many instances serve rooms at once (ejabberd's
    /// `component_number`). Further instances wait as standbys and one takes over, within about a
    /// second, when an active one dies. Unset: every instance serves at once.
    #[serde(default)]
    pub instances: Option<u32>,
    /// File of linked personal tracker tokens (mode 0600); default `<path>.tokens.json`.
    #[serde(default)]
    pub tokens: Option<PathBuf>,
    /// fsync commits that only archive members' messages too (default false: they survive a crash
    /// of caseroom, and an fsync follows within seconds; webhook deliveries are always fsynced
    /// before their 202). True costs about 2 µs of CPU per delivered message in a room of 50.
    #[serde(default)]
    pub fsync_messages: bool,
    /// Size (MiB) of the write-ahead log at which the writer checkpoints it once itself so that it
    /// starts over; below it the WAL does not start over (each restart costs a commit an fsync);
    /// the WAL file is cut back to twice this after a burst (see `store::worker`).
    #[serde(default = "default_wal_limit_mb")]
    pub wal_limit_mb: u64,
    /// Archived messages older than this are deleted, daily (default: kept forever).
    #[serde(default, with = "duration::optional")]
    pub retention: Option<std::time::Duration>,
    /// Per-room rules over `retention`: room name → a duration ("30d") or "forever".
    #[serde(default)]
    pub room_retention: std::collections::BTreeMap<String, String>,
    /// Handled webhook deliveries are kept this long (their duplicate checks with them), then
    /// deleted with their bodies; pending ones never are.
    #[serde(default = "default_inbox_keep", with = "duration")]
    pub inbox_keep: std::time::Duration,
}

fn default_inbox_keep() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 86_400)
}

impl StoreConfig {
    /// What retention deletes if applied at `now_us` (µs since the epoch).
    pub fn prune_plan(&self, now_us: i64) -> crate::store::prune::PrunePlan {
        let before = |d: std::time::Duration| now_us.saturating_sub(d.as_micros() as i64);
        crate::store::prune::PrunePlan {
            messages_before: self.retention.map(before),
            rooms: self
                .room_retention
                .iter()
                .map(|(room, rule)| {
                    let cut = match rule.trim() {
                        "forever" => None,
                        text => duration::parse(text).ok().map(before),
                    };
                    (room.clone(), cut)
                })
                .collect(),
            only_room: None,
            deliveries_before: Some(before(self.inbox_keep)),
        }
    }
}

fn default_wal_limit_mb() -> u64 {
    64
}

impl StoreConfig {
    /// Where linked tokens are kept.
    pub fn tokens_path(&self) -> PathBuf {
        self.tokens
            .clone()
            .unwrap_or_else(|| crate::links::LinksFile::default_path(&self.path))
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; `GET /healthz` answers 200 once the link is up.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest webhook body accepted (bytes); larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Connections open at once; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time allowed for a request's headers (and idle time of a kept-alive connection).
    #[serde(default = "default_header_timeout", with = "duration")]
    pub header_timeout: std::time::Duration,
    /// Time allowed for a webhook body once its headers arrived; then 408.
    #[serde(default = "default_body_timeout", with = "duration")]
    pub body_timeout: std::time::Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    4096
}
fn default_header_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_body_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// Durations in the config: `"30s"`, `"5m"`, `"1h 30m"`, `"400d"` (humantime), or a bare number of
/// seconds (`90` or `"90"`). Zero is refused: every duration here is a timeout or an interval.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    /// Parse the text form.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|e| e.to_string())?
        } else {
            humantime::parse_duration(s).map_err(|e| {
                format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"2h\"")
            })?
        };
        if d.is_zero() {
            return Err("must be longer than zero".into());
        }
        Ok(d)
    }

    /// serde `deserialize_with`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(0) => Err(serde::de::Error::custom("must be longer than zero")),
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }

    /// The same for an optional key.
    pub mod optional {
        use serde::Deserializer;
        use std::time::Duration;

        /// serde `deserialize_with` (use with `#[serde(default)]`).
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

fn default_max_body() -> usize {
    5 * 1024 * 1024
}

/// `[muc]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MucConfig {
    /// Largest MAM page served (XEP-0313 lets the server cap `max`).
    #[serde(default = "default_page")]
    pub mam_max_page: usize,
    /// History stanzas sent on join when the client does not ask (XEP-0045 §7.2.15).
    #[serde(default = "default_history")]
    pub default_history: usize,
    /// Service name shown in disco.
    #[serde(default = "default_service_name")]
    pub name: String,
    /// Bare JIDs allowed to run the service's operator commands (XEP-0050 "Resync now", "Status").
    #[serde(default)]
    pub operators: Vec<String>,
    /// Messages with a body (groupchat or private) one person may send per minute, sustained.
    #[serde(default = "default_rate")]
    pub messages_per_minute: u32,
    /// … and at once after a quiet spell.
    #[serde(default = "default_burst")]
    pub message_burst: u32,
    /// History (MAM) queries one person may make per minute, sustained.
    #[serde(default = "default_rate")]
    pub queries_per_minute: u32,
    /// … and at once (a client catching up pages through history quickly).
    #[serde(default = "default_burst")]
    pub query_burst: u32,
    /// Joins of one room by one person per minute, sustained (leaves are never refused).
    #[serde(default = "default_join_rate")]
    pub joins_per_minute: u32,
    /// … and at once (a client rejoins after every reconnect, once per session).
    #[serde(default = "default_join_burst")]
    pub join_burst: u32,
    /// Presence changes (status, show, nickname) of one person in one room per minute, sustained.
    /// An update beyond it is kept and announced when the person has a token again (at most one
    /// a second), the latest only; a nickname change beyond it is refused.
    #[serde(default = "default_presence_rate")]
    pub presence_changes_per_minute: u32,
    /// … and at once (a client sets its status, avatar and caps right after joining).
    #[serde(default = "default_presence_burst")]
    pub presence_change_burst: u32,
    /// Chat commands of one person waiting for the tracker at once.
    #[serde(default = "default_commands_per_person")]
    pub commands_in_flight_per_person: usize,
    /// Chat commands waiting for the trackers at once, everyone together.
    #[serde(default = "default_commands_total")]
    pub commands_in_flight: usize,
    /// `!mute` rules one person may keep per room.
    #[serde(default = "default_max_mutes")]
    pub max_mutes: usize,
    /// Stanzas to one room kept while its join history is read from the store (once per room after
    /// a start, a few milliseconds); more are answered with `resource-constraint` (wait).
    #[serde(default = "default_waiting_per_room")]
    pub waiting_per_room: usize,
    /// Messages one `!search` answers with (newest first); each search also counts as a history
    /// query against `queries_per_minute`.
    #[serde(default = "default_search_hits")]
    pub search_hits: usize,
}

/// Largest `muc.search_hits`.
pub const MAX_SEARCH_HITS: usize = 50;

fn default_search_hits() -> usize {
    10
}

fn default_commands_per_person() -> usize {
    2
}
fn default_commands_total() -> usize {
    16
}
fn default_max_mutes() -> usize {
    50
}
fn default_waiting_per_room() -> usize {
    256
}

fn default_rate() -> u32 {
    120
}
fn default_burst() -> u32 {
    30
}
fn default_join_rate() -> u32 {
    60
}
fn default_join_burst() -> u32 {
    20
}
fn default_presence_rate() -> u32 {
    60
}
fn default_presence_burst() -> u32 {
    10
}

impl Default for MucConfig {
    fn default() -> Self {
        MucConfig {
            mam_max_page: default_page(),
            default_history: default_history(),
            name: default_service_name(),
            operators: vec![],
            messages_per_minute: default_rate(),
            message_burst: default_burst(),
            queries_per_minute: default_rate(),
            query_burst: default_burst(),
            joins_per_minute: default_join_rate(),
            join_burst: default_join_burst(),
            presence_changes_per_minute: default_presence_rate(),
            presence_change_burst: default_presence_burst(),
            commands_in_flight_per_person: default_commands_per_person(),
            commands_in_flight: default_commands_total(),
            max_mutes: default_max_mutes(),
            waiting_per_room: default_waiting_per_room(),
            search_hits: default_search_hits(),
        }
    }
}

/// One `[[room]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfig {
    /// Localpart of the room JID.
    pub name: String,
    /// Human title (muc#roominfo / disco name).
    #[serde(default)]
    pub title: String,
    /// Longer description.
    #[serde(default)]
    pub description: String,
    /// Owner bare JIDs.
    #[serde(default)]
    pub owners: Vec<String>,
    /// Admin bare JIDs.
    #[serde(default)]
    pub admins: Vec<String>,
    /// Member bare JIDs.
    #[serde(default)]
    pub members: Vec<String>,
    /// Semi-anonymous room (real JIDs shown only to moderators). Default: false (team rooms).
    #[serde(default)]
    pub anonymous: bool,
    /// Which tracker events this room shows.
    #[serde(default, rename = "filter")]
    pub filters: Vec<FilterConfig>,
}

fn default_queue() -> usize {
    10_000
}
fn default_ping() -> u64 {
    30
}
fn default_listen() -> String {
    "127.0.0.1:8088".into()
}
fn default_page() -> usize {
    100
}
fn default_history() -> usize {
    20
}
fn default_service_name() -> String {
    "caseroom".into()
}

impl Config {
    /// Read, apply environment overrides, and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let vars: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("CASEROOM_") && k != "CASEROOM_LOG" && k != "CASEROOM_LOG_FORMAT"
            })
            .collect();
        let cfg = Self::from_toml(&text, &vars).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse TOML text with the given `CASEROOM_*` overrides (not validated).
    pub fn from_toml(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        for (var, val) in env {
            apply_env(&mut value, var, val)?;
        }
        Config::deserialize(toml::Value::Table(value)).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })
    }

    /// Check every value; each problem names its key.
    // Long by design: one independent check per key, in the order of the example config; every problem is collected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        match self.component.jid.parse::<BareJid>() {
            Ok(j) if j.node().is_none() => {}
            Ok(_) => errs.push(format!(
                "component.jid: {:?} must be a bare domain such as rooms.example.org, without user@",
                self.component.jid
            )),
            Err(e) => errs.push(format!("component.jid: {:?} is not a valid domain: {e}", self.component.jid)),
        }
        if self.component.server.parse::<SocketAddr>().is_err()
            && !self.component.server.contains(':')
        {
            errs.push(format!(
                "component.server: {:?} must be host:port, e.g. 127.0.0.1:5347",
                self.component.server
            ));
        }
        match (&self.component.secret, &self.component.secret_file) {
            (None, None) => {
                errs.push("component.secret: missing (set secret or secret_file)".into())
            }
            (Some(_), Some(_)) => errs
                .push("component.secret_file: set either secret or secret_file, not both".into()),
            (Some(s), None) => check_secret(&mut errs, "component.secret", s),
            (None, Some(p)) => check_secret_file(&mut errs, "component.secret_file", p),
        }
        if !(8..=1024).contains(&self.component.max_stanza_depth) {
            errs.push("component.max_stanza_depth: must be between 8 and 1024".into());
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.component.max_stanza_bytes) {
            errs.push("component.max_stanza_bytes: must be between 4096 and 67108864".into());
        }
        if self.http.max_connections < 16 {
            errs.push("http.max_connections: must be at least 16".into());
        }
        if self.component.outgoing_limit < 1024 {
            errs.push("component.outgoing_limit: must be at least 1024".into());
        }
        if !(1..=16).contains(&self.component.connections) {
            errs.push("component.connections: must be between 1 and 16".into());
        }
        let sndbuf = self.component.send_buffer_bytes;
        if sndbuf != 0 && !(16 * 1024..=64 * 1024 * 1024).contains(&sndbuf) {
            errs.push(
                "component.send_buffer_bytes: must be 0 (the kernel's sizing) or between 16384 and 67108864"
                    .into(),
            );
        }
        for (room, rule) in &self.store.room_retention {
            if rule.trim() != "forever" {
                if let Err(e) = duration::parse(rule) {
                    errs.push(format!("store.room_retention.{room}: {e} (or \"forever\")"));
                }
            }
        }
        if self
            .store
            .instances
            .is_some_and(|n| n == 0 || u64::from(n) > crate::store::pg::SLOTS)
        {
            errs.push(format!(
                "store.instances: must be between 1 and {} (instances sharing one database)",
                crate::store::pg::SLOTS
            ));
        }
        if self.store.instances.is_some() && self.store.url.is_none() {
            errs.push(
                "store.instances: only with store.url (several instances share PostgreSQL)".into(),
            );
        }
        if let Some(url) = &self.store.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                errs.push(
                    "store.url: must be a PostgreSQL URL, postgres://user@host:port/database"
                        .into(),
                );
            } else if url.contains("sslmode=verify") {
                errs.push("store.url: use sslmode=require: caseroom always verifies the server's certificate and host name (libpq's verify-full)".into());
            } else if let Err(e) = crate::store::pg_tls::check_url(url) {
                errs.push(format!("store.url: {e}"));
            }
        }
        match (&self.store.ca_file, &self.store.url) {
            (Some(_), None) => errs.push("store.ca_file: only with store.url (PostgreSQL)".into()),
            (Some(path), Some(url)) if !url.contains("sslmode=require") => errs.push(format!(
                "store.ca_file {}: the connection is plain without sslmode=require in store.url",
                path.display()
            )),
            (Some(path), Some(_)) => {
                if let Err(e) = crate::store::pg_tls::read_ca_file(path) {
                    errs.push(e.to_string());
                }
            }
            (None, _) => {}
        }
        if !(1..=65_536).contains(&self.store.wal_limit_mb) {
            errs.push("store.wal_limit_mb: must be between 1 and 65536".into());
        }
        if self.component.queue_limit == 0 {
            errs.push("component.queue_limit: must be at least 1".into());
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            errs.push(format!(
                "http.listen: {:?} must be ip:port, e.g. 127.0.0.1:8088",
                self.http.listen
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            errs.push("store.path: must not be empty".into());
        }
        for (key, v) in [
            ("muc.messages_per_minute", self.muc.messages_per_minute),
            ("muc.message_burst", self.muc.message_burst),
            ("muc.queries_per_minute", self.muc.queries_per_minute),
            ("muc.query_burst", self.muc.query_burst),
            ("muc.joins_per_minute", self.muc.joins_per_minute),
            ("muc.join_burst", self.muc.join_burst),
            (
                "muc.presence_changes_per_minute",
                self.muc.presence_changes_per_minute,
            ),
            ("muc.presence_change_burst", self.muc.presence_change_burst),
        ] {
            if v == 0 {
                errs.push(format!("{key}: must be at least 1"));
            }
        }
        for (key, v) in [
            (
                "muc.commands_in_flight_per_person",
                self.muc.commands_in_flight_per_person,
            ),
            ("muc.commands_in_flight", self.muc.commands_in_flight),
            ("muc.max_mutes", self.muc.max_mutes),
            ("muc.waiting_per_room", self.muc.waiting_per_room),
            ("muc.search_hits", self.muc.search_hits),
        ] {
            if v == 0 {
                errs.push(format!("{key}: must be at least 1"));
            }
        }
        if self.muc.mam_max_page == 0 {
            errs.push("muc.mam_max_page: must be at least 1".into());
        }
        if self.muc.search_hits > MAX_SEARCH_HITS {
            errs.push(format!(
                "muc.search_hits: at most {MAX_SEARCH_HITS} (the answer is one chat message)"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, room) in self.rooms.iter().enumerate() {
            let key = format!("room[{i}]");
            if room.name.is_empty()
                || !room
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                errs.push(format!(
                    "{key}.name: {:?} must be non-empty and use only a-z, 0-9, '-', '_', '.'",
                    room.name
                ));
            }
            if !seen.insert(room.name.to_lowercase()) {
                errs.push(format!("{key}.name: room {:?} is defined twice", room.name));
            }
            for (field, list) in [
                ("owners", &room.owners),
                ("admins", &room.admins),
                ("members", &room.members),
            ] {
                for jid in list {
                    match jid.parse::<BareJid>() {
                        Ok(j) if j.node().is_some() => {}
                        _ => errs.push(format!(
                            "{key}.{field}: {jid:?} is not a bare JID like alice@example.org"
                        )),
                    }
                }
            }
        }
        for jid in &self.muc.operators {
            match jid.parse::<BareJid>() {
                Ok(j) if j.node().is_some() => {}
                _ => errs.push(format!(
                    "muc.operators: {jid:?} is not a bare JID like admin@example.org"
                )),
            }
        }
        let room_names: std::collections::HashSet<String> =
            self.rooms.iter().map(|r| r.name.to_lowercase()).collect();
        for (i, room) in self.rooms.iter().enumerate() {
            for (j, f) in room.filters.iter().enumerate() {
                let key = format!("room[{i}].filter[{j}]");
                if let Some(e) = &f.event {
                    if crate::activity::EventKind::parse(e).is_none() {
                        errs.push(format!("{key}.event: {e:?} is not one of issue, comment, push, pull_request, release, ci, other"));
                    }
                }
                if let Some(t) = &f.tracker {
                    if !self.trackers.iter().any(|tr| &tr.name == t) {
                        errs.push(format!("{key}.tracker: no [[tracker]] is named {t:?}"));
                    }
                }
            }
        }
        let mut tracker_names = std::collections::HashSet::new();
        for (i, t) in self.trackers.iter().enumerate() {
            let key = format!("tracker[{i}]");
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                errs.push(format!("{key}.name: {:?} must be non-empty and use only a-z, 0-9, '-', '_' (it is a URL path)", t.name));
            }
            if !tracker_names.insert(t.name.clone()) {
                errs.push(format!("{key}.name: tracker {:?} is defined twice", t.name));
            }
            match (&t.secret, &t.secret_file, t.allow_unsigned) {
                (None, None, false) => errs.push(format!(
                    "{key}.secret: missing; set secret (or secret_file): the key the tracker signs its deliveries with"
                )),
                (None, None, true) => errs.push(format!(
                    "{key}.secret: missing; with allow_unsigned the secret is a token the sender puts in its URL, /hooks/{}/<secret>",
                    t.name
                )),
                (Some(_), Some(_), _) => errs.push(format!("{key}.secret_file: set either secret or secret_file, not both")),
                (Some(s), None, _) => check_secret(&mut errs, &format!("{key}.secret"), s),
                (None, Some(p), _) => check_secret_file(&mut errs, &format!("{key}.secret_file"), p),
            }
            if t.allow_unsigned {
                // It travels in a URL path: keep it to characters that need no encoding, and long.
                let token = t.secret.clone().unwrap_or_default();
                if t.secret.is_some()
                    && (token.len() < 16
                        || !token
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)))
                {
                    errs.push(format!("{key}.secret: with allow_unsigned it is the URL token: at least 16 characters of A-Z, a-z, 0-9, '-', '_', '.', '~' (e.g. `openssl rand -hex 24`)"));
                }
            }
            match (&t.api_key, &t.api_key_file) {
                (Some(_), Some(_)) => errs.push(format!(
                    "{key}.api_key_file: set either api_key or api_key_file, not both"
                )),
                (Some(k), None) => check_secret(&mut errs, &format!("{key}.api_key"), k),
                (None, Some(p)) => check_secret_file(&mut errs, &format!("{key}.api_key_file"), p),
                (None, None) => {}
            }
            if let Some(url) = &t.url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    errs.push(format!(
                        "{key}.url: {url:?} must start with http:// or https://"
                    ));
                }
                {
                    use crate::webhook::TrackerKind as K;
                    if !matches!(
                        t.kind,
                        K::Redmine | K::Gitea | K::Forgejo | K::Gitlab | K::Github | K::Jira
                    ) {
                        errs.push(format!("{key}.url: room sync and commands are implemented for kinds redmine, gitea, forgejo, gitlab, github and jira; not for kind = \"{}\" (leave url out to receive its webhooks only)", t.kind.as_str()));
                    }
                }
                if t.api_key.is_none() && t.api_key_file.is_none() {
                    errs.push(format!("{key}.api_key: needed with url (or api_key_file)"));
                }
            }
            if t.command_prefix.is_empty() || t.command_prefix.chars().any(char::is_alphanumeric) {
                errs.push(format!(
                    "{key}.command_prefix: {:?} must be punctuation such as ! or .",
                    t.command_prefix
                ));
            }
            if t.manage_webhooks {
                use crate::webhook::TrackerKind as K;
                if !matches!(t.kind, K::Github | K::Gitlab | K::Gitea | K::Forgejo)
                    || t.url.is_none()
                {
                    errs.push(format!("{key}.manage_webhooks: caseroom manages webhooks for kinds github, gitlab, gitea and forgejo with url set (not for Redmine or Jira: their webhooks are site-wide, set by an administrator)"));
                }
                match &t.webhook_url {
                    Some(u) if u.starts_with("https://") || u.starts_with("http://") => {}
                    _ => errs.push(format!("{key}.webhook_url: needed with manage_webhooks: caseroom's /hooks/{} as the tracker reaches it, e.g. https://caseroom.example.org/hooks/{}", t.name, t.name)),
                }
            }
            if let Some(id) = &t.oauth_client_id {
                use crate::webhook::TrackerKind as K;
                if !matches!(t.kind, K::Github | K::Gitlab) || t.url.is_none() {
                    errs.push(format!("{key}.oauth_client_id: the device flow is for kinds github and gitlab with url set"));
                }
                if id.trim().is_empty() || id.len() > 256 {
                    errs.push(format!(
                        "{key}.oauth_client_id: must be the OAuth application's client id"
                    ));
                }
            }
            if t.references > 10 {
                errs.push(format!(
                    "{key}.references: at most 10 summaries a message (0 turns them off)"
                ));
            }
            if t.label_burst > std::time::Duration::from_secs(60) {
                errs.push(format!(
                    "{key}.label_burst: at most 60s (events are held that long before they are posted)"
                ));
            }
            for (list, patterns) in [("include", &t.include), ("exclude", &t.exclude)] {
                for p in patterns {
                    if p.trim().is_empty() || p.len() > 256 {
                        errs.push(format!(
                            "{key}.{list}: {p:?} must be a non-empty pattern of at most 256 characters (e.g. \"acme/*\")"
                        ));
                    }
                }
            }
            if !t.include.is_empty() && t.include.iter().all(|p| t.exclude.contains(p)) {
                errs.push(format!(
                    "{key}.exclude: excludes every include pattern: no group would have a room"
                ));
            }
            for (project, room) in &t.rooms {
                // With sync (url), rooms come from the tracker and may not exist yet.
                if t.url.is_none() && !room_names.contains(&room.to_lowercase()) {
                    errs.push(format!(
                        "{key}.rooms: {project:?} maps to {room:?}, but no [[room]] has that name"
                    ));
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    /// The component secret, read from `secret` or `secret_file`.
    pub fn secret(&self) -> Result<String, ConfigError> {
        if let Some(s) = &self.component.secret {
            return Ok(s.clone());
        }
        let path = self.component.secret_file.clone().unwrap_or_default();
        std::fs::read_to_string(&path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|source| ConfigError::Read { path, source })
    }
}

/// A value that is certainly not a real secret: what example files and tutorials put there.
fn is_placeholder(s: &str) -> bool {
    let l = s.trim().to_lowercase();
    const MARKERS: [&str; 8] = [
        "change-me",
        "changeme",
        "change_me",
        "replace-me",
        "replaceme",
        "your-secret",
        "…",
        "...",
    ];
    MARKERS.iter().any(|m| l.contains(m))
        || ["secret", "password", "token", "xxx", "todo", "example"].contains(&l.as_str())
}

/// An inline secret must be present and not a placeholder (it would be a key anyone can guess:
/// an empty HMAC key, or an empty GitLab token that an empty header matches).
fn check_secret(errs: &mut Vec<String>, key: &str, value: &str) {
    if value.trim().is_empty() {
        errs.push(format!("{key}: must not be empty"));
    } else if is_placeholder(value) {
        errs.push(format!(
            "{key}: {value:?} is a placeholder; put a real secret here (e.g. from `openssl rand -hex 32`)"
        ));
    }
}

/// A secret file must be readable, and hold a secret by [`check_secret`]'s rules.
fn check_secret_file(errs: &mut Vec<String>, key: &str, path: &Path) {
    match std::fs::read_to_string(path) {
        Err(e) => errs.push(format!("{key}: cannot read {}: {e}", path.display())),
        Ok(text) => {
            let value = text.trim_end_matches(['\n', '\r']);
            if value.trim().is_empty() {
                errs.push(format!("{key}: {} is empty", path.display()));
            } else if is_placeholder(value) {
                errs.push(format!(
                    "{key}: {} holds a placeholder, not a secret",
                    path.display()
                ));
            }
        }
    }
}

/// Keys of the env-overridable sections whose values are numbers; every other key takes the
/// variable's text as it is (so `CASEROOM_COMPONENT_SECRET=123456` stays a string).
const NUMERIC_KEYS: [(&str, &str); 26] = [
    ("store", "wal_limit_mb"),
    ("component", "connections"),
    ("component", "queue_limit"),
    ("component", "outgoing_limit"),
    ("component", "send_buffer_bytes"),
    ("component", "ping_interval_secs"),
    ("component", "max_stanza_depth"),
    ("component", "max_stanza_bytes"),
    ("http", "max_body_bytes"),
    ("http", "max_connections"),
    ("muc", "mam_max_page"),
    ("muc", "default_history"),
    ("muc", "messages_per_minute"),
    ("muc", "message_burst"),
    ("muc", "joins_per_minute"),
    ("muc", "join_burst"),
    ("muc", "presence_changes_per_minute"),
    ("muc", "presence_change_burst"),
    ("muc", "queries_per_minute"),
    ("muc", "query_burst"),
    ("muc", "commands_in_flight_per_person"),
    ("muc", "commands_in_flight"),
    ("muc", "max_mutes"),
    ("muc", "waiting_per_room"),
    ("muc", "search_hits"),
    ("runtime", "worker_threads"),
];

/// Keys whose environment value is a boolean (`true`/`false`).
const BOOLEAN_KEYS: [(&str, &str); 1] = [("store", "fsync_messages")];

/// Apply `CASEROOM_SECTION_KEY=value` to the parsed TOML table.
fn apply_env(table: &mut toml::Table, var: &str, val: &str) -> Result<(), ConfigError> {
    let rest = &var["CASEROOM_".len()..];
    let Some((section, key)) = rest.split_once('_') else {
        tracing::debug!(%var, "ignoring an environment variable that names no config key");
        return Ok(());
    };
    let section = section.to_lowercase();
    let key = key.to_lowercase();
    if !["component", "store", "http", "muc", "runtime"].contains(&section.as_str()) {
        // Not ours (scripts use CASEROOM_BIN and the like): leave it alone. A wrong key inside a known
        // section is still an error, named by the schema.
        tracing::debug!(%var, "ignoring an environment variable outside the config sections");
        return Ok(());
    }
    let entry = table
        .entry(section.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sect) = entry else {
        return Err(ConfigError::Env {
            var: var.into(),
            message: format!("{section} is not a table in the file"),
        });
    };
    let value = if NUMERIC_KEYS.contains(&(section.as_str(), key.as_str())) {
        toml::Value::Integer(val.trim().parse::<i64>().map_err(|_| ConfigError::Env {
            var: var.into(),
            message: format!("{section}.{key} takes a whole number, not {val:?}"),
        })?)
    } else if BOOLEAN_KEYS.contains(&(section.as_str(), key.as_str())) {
        toml::Value::Boolean(match val.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("{section}.{key} takes true or false, not {val:?}"),
                })
            }
        })
    } else {
        toml::Value::String(val.to_owned())
    };
    sect.insert(key, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW_EXAMPLE: &str = include_str!("../deploy/caseroom.example.toml");

    /// The example with its placeholders filled, as an operator would (scripts/test does the same
    /// before `check-config`).
    /// The example with `line` added at the top of `[section]` is refused, naming `key`.
    fn assert_refused(section: &str, line: &str, key: &str) {
        let text = example().replace(&format!("[{section}]"), &format!("[{section}]\n{line}"));
        let err = Config::from_toml(&text, &[])
            .and_then(|c| c.validate())
            .map_err(|e| e.to_string());
        assert!(matches!(&err, Err(e) if e.contains(key)), "{line}: {err:?}");
    }

    /// The example file with one environment override.
    fn with_env(name: &str, value: &str) -> Config {
        let env = vec![(name.to_string(), value.to_string())];
        Config::from_toml(&example(), &env).expect("parses")
    }

    fn example() -> String {
        RAW_EXAMPLE
            .replace("\"change-me\"", "\"d1f0c7a93b5e4e8a\"")
            .replace("\"change-me-too\"", "\"5b2e9c0f7a1d4c36\"")
    }

    #[test]
    fn example_file_is_valid_once_its_placeholders_are_filled() {
        let cfg = Config::from_toml(&example(), &[]).expect("example parses");
        cfg.validate().expect("example validates");
        assert_eq!(cfg.rooms[0].name, "webteam");
    }

    #[test]
    fn placeholder_secrets_are_refused_by_name() {
        let cfg = Config::from_toml(RAW_EXAMPLE, &[]).expect("parses");
        let err = cfg.validate().expect_err("placeholders").to_string();
        assert!(
            err.contains("component.secret: \"change-me\" is a placeholder"),
            "{err}"
        );
        assert!(
            err.contains("tracker[0].secret: \"change-me-too\" is a placeholder"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 3, "only the two placeholders: {err}");
    }

    #[test]
    fn empty_or_placeholder_secret_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let fake = dir.path().join("fake");
        std::fs::write(&fake, "change-me\n").expect("write");
        let text = example()
            .replace(
                "secret = \"d1f0c7a93b5e4e8a\"",
                &format!("secret_file = {:?}", empty.display().to_string()),
            )
            .replace(
                "secret = \"5b2e9c0f7a1d4c36\"",
                &format!("secret_file = {:?}", fake.display().to_string()),
            );
        let err = Config::from_toml(&text, &[])
            .expect("parses")
            .validate()
            .expect_err("empty and placeholder files")
            .to_string();
        assert!(
            err.contains("component.secret_file") && err.contains("is empty"),
            "{err}"
        );
        assert!(
            err.contains("tracker[0].secret_file") && err.contains("placeholder"),
            "{err}"
        );
        let text = example().replace("secret = \"d1f0c7a93b5e4e8a\"", "secret = \"\"");
        let err = Config::from_toml(&text, &[]).expect("parses").validate();
        assert!(err
            .expect_err("empty")
            .to_string()
            .contains("component.secret: must not be empty"));
    }

    #[test]
    fn all_digit_overrides_stay_text_unless_the_key_is_a_number() {
        let env = vec![
            (
                "CASEROOM_COMPONENT_SECRET".to_string(),
                "123456".to_string(),
            ),
            (
                "CASEROOM_HTTP_MAX_CONNECTIONS".to_string(),
                "64".to_string(),
            ),
            ("CASEROOM_HTTP_HEADER_TIMEOUT".to_string(), "7".to_string()),
            ("CASEROOM_HTTP_BODY_TIMEOUT".to_string(), "2m".to_string()),
        ];
        let cfg = Config::from_toml(&example(), &env).expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.secret().expect("secret"), "123456");
        assert_eq!(cfg.http.max_connections, 64);
        assert_eq!(cfg.http.header_timeout, std::time::Duration::from_secs(7));
        assert_eq!(cfg.http.body_timeout, std::time::Duration::from_secs(120));
        let bad = vec![(
            "CASEROOM_HTTP_MAX_CONNECTIONS".to_string(),
            "many".to_string(),
        )];
        let err = Config::from_toml(&example(), &bad)
            .expect_err("text for a number")
            .to_string();
        assert!(
            err.contains("http.max_connections takes a whole number"),
            "{err}"
        );
        // Every numeric key takes a number from the environment.
        for (section, key) in NUMERIC_KEYS {
            let var = format!("CASEROOM_{}_{}", section.to_uppercase(), key.to_uppercase());
            let cfg = Config::from_toml(&example(), &[(var.clone(), "4096".into())]);
            assert!(cfg.is_ok(), "{var}: {:?}", cfg.err());
        }
    }

    #[test]
    fn one_runtime_thread_and_relaxed_message_commits_by_default() {
        let cfg = Config::from_toml(&example(), &[]).expect("parses");
        assert_eq!(cfg.runtime.worker_threads, 1);
        assert!(!cfg.store.fsync_messages);
        let env = vec![
            (
                "CASEROOM_RUNTIME_WORKER_THREADS".to_string(),
                "4".to_string(),
            ),
            (
                "CASEROOM_STORE_FSYNC_MESSAGES".to_string(),
                "true".to_string(),
            ),
        ];
        let got = Config::from_toml(&example(), &env)
            .map(|c| (c.runtime.worker_threads, c.store.fsync_messages))
            .map_err(|e| e.to_string());
        assert_eq!(got, Ok((4, true)));
        let text = example().replace("[store]", "[store]\nfsync_messages = true");
        let cfg = Config::from_toml(&text, &[]).expect("parses");
        assert!(cfg.store.fsync_messages);
    }

    #[test]
    fn the_wal_limit_has_a_default_and_refuses_nonsense() {
        let cfg = Config::from_toml(&example(), &[]).expect("parses");
        assert_eq!(cfg.store.wal_limit_mb, 64);
        let cfg = with_env("CASEROOM_STORE_WAL_LIMIT_MB", "8");
        assert_eq!(cfg.store.wal_limit_mb, 8);
        for bad in ["0", "100000"] {
            assert_refused(
                "store",
                &format!("wal_limit_mb = {bad}"),
                "store.wal_limit_mb",
            );
        }
    }

    #[test]
    fn the_send_buffer_has_a_default_and_refuses_nonsense() {
        let cfg = Config::from_toml(&example(), &[]).expect("parses");
        assert_eq!(cfg.component.send_buffer_bytes, 262_144);
        let cfg = with_env("CASEROOM_COMPONENT_SEND_BUFFER_BYTES", "0");
        assert_eq!(cfg.component.send_buffer_bytes, 0, "0: the kernel's sizing");
        assert!(cfg.validate().is_ok());
        for bad in ["100", "1000000000"] {
            assert_refused(
                "component",
                &format!("send_buffer_bytes = {bad}"),
                "component.send_buffer_bytes",
            );
        }
    }

    #[test]
    fn one_component_connection_by_default_and_at_most_sixteen() {
        let cfg = Config::from_toml(&example(), &[]).expect("parses");
        assert_eq!(cfg.component.connections, 1);
        let cfg = with_env("CASEROOM_COMPONENT_CONNECTIONS", "4");
        assert_eq!(cfg.component.connections, 4);
        assert!(cfg.validate().is_ok());
        for bad in ["0", "17"] {
            assert_refused(
                "component",
                &format!("connections = {bad}"),
                "component.connections",
            );
        }
    }

    #[test]
    fn presence_changes_have_a_limit_by_default_and_zero_is_refused() {
        let cfg = Config::from_toml(&example(), &[]).expect("parses");
        assert_eq!(
            (
                cfg.muc.presence_changes_per_minute,
                cfg.muc.presence_change_burst
            ),
            (60, 10)
        );
        for key in ["PRESENCE_CHANGES_PER_MINUTE", "PRESENCE_CHANGE_BURST"] {
            let env = vec![(format!("CASEROOM_MUC_{key}"), "0".to_string())];
            let err = Config::from_toml(&example(), &env)
                .and_then(|c| c.validate())
                .map_err(|e| e.to_string());
            let name = format!("muc.{}", key.to_lowercase());
            assert!(
                matches!(&err, Err(e) if e.contains(&name)),
                "{key}: {err:?}"
            );
        }
    }

    #[test]
    fn durations_read_units_and_refuse_zero() {
        use std::time::Duration;
        assert_eq!(duration::parse("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            duration::parse("400d"),
            Ok(Duration::from_secs(400 * 86400))
        );
        assert!(duration::parse("0s").is_err());
        assert!(duration::parse("soon").is_err());
        let text =
            format!("{}\n", example()).replace("[http]\n", "[http]\nheader_timeout = \"0s\"\n");
        let err = Config::from_toml(&text, &[]).expect_err("zero").to_string();
        assert!(err.contains("longer than zero"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            (
                "CASEROOM_COMPONENT_SECRET".to_string(),
                "from-env".to_string(),
            ),
            ("CASEROOM_MUC_MAM_MAX_PAGE".to_string(), "7".to_string()),
        ];
        let cfg = Config::from_toml(&example(), &env).expect("parses");
        assert_eq!(cfg.secret().expect("secret"), "from-env");
        assert_eq!(cfg.muc.mam_max_page, 7);
    }

    #[test]
    fn errors_name_the_key() {
        let text = example()
            .replace(
                "jid = \"rooms.example.org\"",
                "jid = \"bad@rooms.example.org\"",
            )
            .replace("\"bob@example.org\"", "\"not a jid\"");
        let cfg = Config::from_toml(&text, &[]).expect("parses");
        let err = cfg.validate().expect_err("invalid").to_string();
        assert!(err.contains("component.jid"), "{err}");
        assert!(err.contains("room[0].members"), "{err}");
    }

    #[test]
    fn foreign_variables_are_ignored_but_bad_keys_are_not() {
        let foreign = vec![
            ("CASEROOM_BIN".to_string(), "/x".to_string()),
            ("CASEROOM_E2E_TABLE".to_string(), "t".to_string()),
        ];
        Config::from_toml(&example(), &foreign)
            .expect("variables outside the sections are ignored");
        let typo = vec![("CASEROOM_COMPONENT_SECRETT".to_string(), "x".to_string())];
        let err = Config::from_toml(&example(), &typo)
            .expect_err("a typo in a known section")
            .to_string();
        assert!(err.contains("secrett"), "{err}");
    }

    #[test]
    fn include_and_exclude_patterns_choose_groups() {
        let with = |lines: &str| {
            let text = example().replace("kind = \"gitea\"", &format!("kind = \"gitea\"\n{lines}"));
            Config::from_toml(&text, &[]).expect("parses")
        };
        let cfg = with(
            "include = [\"Acme/*\", \"tools\"]\nexclude = [\"acme/archive-*\", \"*-sandbox\"]",
        );
        cfg.validate().expect("valid");
        let t = &cfg.trackers[0];
        for (id, shown) in [
            ("acme/web", true),
            ("ACME/sub/deep", true),
            ("tools", true),
            ("toolsmith", false),
            ("acme/archive-2019", false),
            ("acme/web-sandbox", false),
            ("other/web", false),
        ] {
            assert_eq!(t.shows_group(id), shown, "{id}");
        }
        // No patterns: every group.
        assert!(with("").trackers[0].shows_group("anything/at-all"));
        // Empty patterns, or excluding everything that is included, are mistakes said by name.
        let err = with("include = [\"\"]")
            .validate()
            .expect_err("empty")
            .to_string();
        assert!(err.contains("include"), "{err}");
        let err = with("include = [\"a/*\"]\nexclude = [\"a/*\"]")
            .validate()
            .expect_err("none left")
            .to_string();
        assert!(err.contains("excludes every include"), "{err}");
    }

    #[test]
    fn a_store_url_must_be_postgresql_and_tls_verified() {
        let with = |url: &str| {
            let text = example().replace("[store]\n", &format!("[store]\nurl = \"{url}\"\n"));
            Config::from_toml(&text, &[]).expect("parses").validate()
        };
        with("postgres://caseroom@127.0.0.1:5432/caseroom").expect("valid");
        with("postgresql://caseroom@db.internal/caseroom").expect("valid");
        let err = with("mysql://x@y/z").expect_err("not postgres").to_string();
        assert!(err.contains("store.url"), "{err}");
        with("postgres://x@y/z?sslmode=require").expect("TLS");
        let err = with("postgres://x@y/z?sslmode=verify-full")
            .expect_err("no such mode in the client")
            .to_string();
        assert!(err.contains("sslmode=require"), "{err}");
        let err = with("postgres://x@y/z?sslmode=sometimes")
            .expect_err("not a mode")
            .to_string();
        assert!(err.contains("store.url"), "{err}");
        // A CA file: only for TLS, and it must hold a certificate.
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let with_ca = |url: &str| {
            let text = example().replace(
                "[store]\n",
                &format!("[store]\nurl = \"{url}\"\nca_file = \"{}\"\n", ca.display()),
            );
            Config::from_toml(&text, &[]).expect("parses").validate()
        };
        let err = with_ca("postgres://x@y/z").expect_err("plain").to_string();
        assert!(err.contains("sslmode=require"), "{err}");
        let err = with_ca("postgres://x@y/z?sslmode=require")
            .expect_err("no certificate")
            .to_string();
        assert!(
            err.contains("store.ca_file") && err.contains("no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn managed_webhooks_need_a_forge_and_an_address() {
        let with = |kind: &str, lines: &str| {
            let text = example().replace(
                "kind = \"gitea\"",
                &format!("kind = \"{kind}\"\nurl = \"https://github.com\"\napi_key = \"k-3f9a7c1e\"\n{lines}"),
            );
            Config::from_toml(&text, &[]).expect("parses").validate()
        };
        with(
            "github",
            "manage_webhooks = true\nwebhook_url = \"https://caseroom.example.org/hooks/forge\"",
        )
        .expect("valid");
        let err = with("github", "manage_webhooks = true")
            .expect_err("no address")
            .to_string();
        assert!(err.contains("webhook_url"), "{err}");
        with(
            "gitea",
            "manage_webhooks = true\nwebhook_url = \"https://c.example.org/hooks/forge\"",
        )
        .expect("valid for gitea");
        let err = with(
            "jira",
            "manage_webhooks = true\nwebhook_url = \"https://c.example.org/hooks/forge\"",
        )
        .expect_err("not jira: site-wide webhooks")
        .to_string();
        assert!(err.contains("manage_webhooks"), "{err}");
    }

    #[test]
    fn url_is_for_kinds_with_a_rest_client() {
        for kind in ["gitea", "forgejo", "gitlab", "redmine", "github", "jira"] {
            let text = example().replace(
                "kind = \"gitea\"",
                &format!("kind = \"{kind}\"\nurl = \"https://forge.example.org\"\napi_key = \"k-3f9a7c1e\""),
            );
            let cfg = Config::from_toml(&text, &[]).expect("parses");
            cfg.validate()
                .unwrap_or_else(|e| panic!("url with kind {kind}: {e}"));
        }
        let text = example().replace(
            "kind = \"gitea\"",
            "kind = \"activitystreams\"\nurl = \"https://forge.example.org\"\napi_key = \"k-3f9a7c1e\"",
        );
        let cfg = Config::from_toml(&text, &[]).expect("parses");
        let err = cfg.validate().expect_err("no client").to_string();
        assert!(
            err.contains("url") && err.contains("kind = \"activitystreams\""),
            "{err}"
        );
    }

    #[test]
    fn roles_grant_owner_admin_or_member_only() {
        let text = format!("{}\n[tracker.roles]\nManager = \"boss\"\n", example());
        let err = Config::from_toml(&text, &[])
            .expect_err("bad grant")
            .to_string();
        assert!(err.contains("boss") && err.contains("owner"), "{err}");
        let ok = format!(
            "{}\n[tracker.roles]\nManager = \"owner\"\nDeveloper = \"member\"\n",
            example()
        );
        let cfg = Config::from_toml(&ok, &[]).expect("grants");
        assert_eq!(cfg.trackers[0].roles["Manager"], Grant::Owner);
    }

    #[test]
    fn identity_maps_by_domain_and_explicitly() {
        let id = IdentityConfig {
            domain: Some("example.org".into()),
            map: [("al@other.org".to_string(), "alice".to_string())].into(),
        };
        assert_eq!(id.login_of("bob@example.org").as_deref(), Some("bob"));
        assert_eq!(id.login_of("al@other.org").as_deref(), Some("alice"));
        assert_eq!(id.login_of("bob@evil.example"), None);
        assert_eq!(id.login_of("example.org"), None, "a domain is nobody");
        assert_eq!(id.login_of("not a jid@example.org"), None);
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = format!("{}\n[muc]\nbogus = 1\n", example());
        let err = Config::from_toml(&text, &[])
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
