//! The XEP-0114 component link: handshake, read loop, write queue, keepalive and reconnection.
//!
//! tokio-xmpp's `Component` stream ends on any read error — including a single malformed stanza —
//! and says nothing about why. We therefore drive tokio-xmpp's lower-level `XmlStream` with
//! `FallibleStreamElement` items: an unparseable stanza gets a `bad-request` error reply and the
//! link stays up; a real read error is logged with its cause and the link is re-established with
//! capped backoff. Stanzas produced while the link is down wait in a bounded queue.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use minidom::Element;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_xmpp::{
    parsers::{
        component::Handshake,
        iq::Iq,
        jid::{BareJid, FullJid, Jid},
        ns,
        ping::Ping,
        stanza::Stanza,
        stanza_error::DefinedCondition,
    },
    xmlstream::{
        initiate_stream, FallibleStreamElement, ReadError, StreamElementError, StreamHeader,
        Timeouts, XmlStream, XmppStreamElement,
    },
};

/// The parse guard is part of the link: the one module that speaks tokio-xmpp.
#[path = "guard.rs"]
pub mod guard;

use super::outbound;
use super::wire::{self, Template};
use guard::{Exceeded, Guarded, Header};

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The component domain is not a valid JID.
    #[error("component.jid {0:?} is not a valid domain")]
    BadJid(String),
    /// TCP connect or stream setup failed.
    #[error("cannot connect to the XMPP server at {server}: {reason} (is it running, and is its component port {server}?)")]
    Connect {
        /// The address.
        server: String,
        /// Cause.
        reason: String,
    },
    /// The server refused the handshake or the domain.
    #[error("the XMPP server at {server} refused the component handshake for {domain}: {reason} (check component.secret and that the server has a Component block for {domain})")]
    Refused {
        /// The address.
        server: String,
        /// Our domain.
        domain: String,
        /// What the server said.
        reason: String,
    },
    /// The first connection linked, a further one did not.
    #[error("component.connections = {total}: connection {index} of {total} failed: {source} (Prosody accepts one connection per component: set component.connections = 1; ejabberd accepts several with domain_balancing for the domain, see deploy/ejabberd.yml)")]
    Extra {
        /// Which connection (1-based).
        index: usize,
        /// How many were asked for.
        total: usize,
        /// Why it failed.
        source: Box<LinkError>,
    },
}

/// What the link needs to know.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Component domain.
    pub domain: String,
    /// `host:port`.
    pub server: String,
    /// Shared secret.
    pub secret: String,
    /// Bounded queue size while down.
    pub queue_limit: usize,
    /// Silence before we ping the server.
    pub ping_interval: Duration,
    /// A write (or flush) the server does not take within this time marks the link down: a server
    /// that stops reading must not block caseroom while `/healthz` says "up".
    pub write_timeout: Duration,
    /// Stanzas waiting for the link task while it is up (the bridge never waits on the link; beyond
    /// this, stanzas are dropped and counted).
    pub outgoing_limit: usize,
    /// The socket's send buffer in bytes (`SO_SNDBUF`; 0: the kernel's own sizing). What is in it
    /// goes out in order; what waits in the link can still be overtaken by answers (see
    /// [`LinkHandle::reply`]), so it is kept small.
    pub send_buffer: usize,
}

/// Inbound stanzas waiting for the bridge; when full, the link stops reading (the server's TCP
/// buffers then hold the rest), so a burst cannot grow memory without bound.
pub const INBOUND_LIMIT: usize = 4096;

/// Counters and state shared with the HTTP health endpoint (one for all connections).
#[derive(Debug, Default)]
pub struct LinkState {
    /// Connections configured (`component.connections`; 0 until the link is spawned).
    pub connections: u64,
    /// Connections up.
    pub links_up: AtomicU64,
    /// Connections that came up or went down: a change resets the balance check.
    changes: AtomicU64,
    /// Stanzas for one room that came over another connection than the room's earlier ones with
    /// no connection coming or going in between: the server does not keep a room on one
    /// connection, so the order of what people send a room is not guaranteed.
    pub misrouted: AtomicU64,
    /// Stanzas waiting to be sent.
    pub queued: AtomicU64,
    /// Stanzas refused because the queue was full.
    pub dropped: AtomicU64,
    /// Successful re-links.
    pub relinks: AtomicU64,
    /// Malformed stanzas received and answered.
    pub malformed: AtomicU64,
    /// Stanzas refused for crossing `max_stanza_depth` or `max_stanza_bytes`.
    pub refused: AtomicU64,
    /// Stanzas received from the server and handed to the bridge.
    pub stanzas_in: AtomicU64,
    /// Stanzas written to the server (one per recipient of a broadcast).
    pub stanzas_out: AtomicU64,
    /// Queued room stanzas not sent because their recipient had left the room meanwhile.
    pub skipped_departed: AtomicU64,
}

impl LinkState {
    /// Every configured connection is up.
    pub fn is_up(&self) -> bool {
        self.connections > 0 && self.links_up.load(Ordering::SeqCst) >= self.connections
    }

    /// A connection came up; true when it is the first of them (none was up before).
    fn came_up(&self) -> bool {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.links_up.fetch_add(1, Ordering::SeqCst) == 0
    }

    fn went_down(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.links_up.fetch_sub(1, Ordering::SeqCst);
    }

    /// `n` queued stanzas went into a connection's write buffer.
    fn written(&self, n: u64) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.stanzas_out.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the link hands the bridge.
#[allow(clippy::large_enum_variant)] // stanzas are the hot path
#[derive(Debug)]
pub enum Inbound {
    /// A stanza from the server.
    Stanza(Stanza),
    /// The link was lost and is up again. While it was down the server bounced everything sent to
    /// us, so nobody can be assumed to still be in a room.
    Relinked,
}

/// Messages to the link task.
#[allow(clippy::large_enum_variant)] // stanzas are the hot path; Close is rare and small
pub enum Outgoing {
    /// Send a stanza (queued while down).
    Stanza(Stanza),
    /// Send a stanza serialised already.
    Raw(Vec<u8>),
    /// A broadcast (its share for this connection): serialised once by the handle, each
    /// recipient's copy with only `to` changed.
    Copies {
        /// The stanza without its `to`.
        template: Arc<Template>,
        /// The room it comes from (for departures).
        room: Option<BareJid>,
        /// Its recipients on this connection (shared with the room when there is one connection).
        to: Arc<[FullJid]>,
    },
    /// Flush what is queued, close the stream, and answer.
    Close(oneshot::Sender<()>),
    /// (Answer lane only.) `session` left `room`: of what the broadcast lane queued before
    /// `before` (a [`LinkHandle`] sequence number), the room's messages and presences to `session`
    /// are not sent.
    Departed {
        /// The room's bare JID.
        room: BareJid,
        /// The session that left.
        session: FullJid,
        /// Broadcast-lane items numbered below this were queued before the departure.
        before: u64,
    },
}

/// An item of the broadcast lane with its sequence number (for [`Outgoing::Departed`]).
struct Numbered {
    seq: u64,
    out: Outgoing,
}

/// The TCP connection as tokio-xmpp's `XmlStream` sees it. Reads go through a buffer to its parser
/// (and the parse guard). Writes go to the write half only until the handshake is done: the link
/// then takes the write half out ([`LinkIo::take_writer`]) and writes the bytes it serialised
/// itself ([`wire`]): a broadcast is serialised once, not once per recipient as tokio-xmpp's
/// `Sink` would.
struct LinkIo {
    read: BufReader<OwnedReadHalf>,
    write: Mutex<Option<OwnedWriteHalf>>,
}

impl LinkIo {
    fn new(tcp: tokio::net::TcpStream) -> LinkIo {
        let (r, w) = tcp.into_split();
        LinkIo {
            read: BufReader::with_capacity(64 * 1024, r),
            write: Mutex::new(Some(w)),
        }
    }

    /// The write half, once: from then on tokio-xmpp's writes fail (it makes none after the
    /// handshake).
    fn take_writer(&self) -> Option<OwnedWriteHalf> {
        self.write.lock().ok()?.take()
    }

    fn with_writer<R>(
        &self,
        f: impl FnOnce(Pin<&mut OwnedWriteHalf>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        // Never contended: only tokio-xmpp's stream calls this, from the task that owns it.
        match self.write.lock() {
            Ok(mut w) => match w.as_mut() {
                Some(w) => f(Pin::new(w)),
                None => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the link writes stanzas itself after the handshake",
                ))),
            },
            Err(_) => Poll::Ready(Err(std::io::Error::other("link writer lock poisoned"))),
        }
    }
}

impl AsyncRead for LinkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncBufRead for LinkIo {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().read).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.get_mut().read).consume(amt)
    }
}

impl AsyncWrite for LinkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.with_writer(|w| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with_writer(|w| w.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with_writer(|w| w.poll_shutdown(cx))
    }
}

type Conn = XmlStream<LinkIo, Guarded>;

/// An established, authenticated component stream: tokio-xmpp reads it, caseroom writes it.
pub struct Connection {
    read: Conn,
    write: Writer,
}

/// A TCP connection to `server` (`host:port`, each address in turn) with `send_buffer` bytes of
/// socket send buffer (0: the kernel's sizing).
pub async fn dial(server: &str, send_buffer: usize) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(server).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if send_buffer > 0 {
            socket.set_send_buffer_size(u32::try_from(send_buffer).unwrap_or(u32::MAX))?;
        }
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{server} resolves to no address"),
        )
    }))
}

/// Connect and authenticate (XEP-0114 §3: SHA-1 of stream id + secret).
pub async fn connect(cfg: &LinkConfig) -> Result<Connection, LinkError> {
    let domain: BareJid = cfg
        .domain
        .parse()
        .map_err(|_| LinkError::BadJid(cfg.domain.clone()))?;
    let timeouts = Timeouts {
        read_timeout: cfg.ping_interval,
        response_timeout: Duration::from_secs(20),
    };
    let connect_err = |reason: String| LinkError::Connect {
        server: cfg.server.clone(),
        reason,
    };
    let refused = |reason: String| LinkError::Refused {
        server: cfg.server.clone(),
        domain: cfg.domain.clone(),
        reason,
    };
    // Our own TCP connect (instead of tokio-xmpp's TcpServerConnector) so that Nagle is off: stanzas
    // are flushed in batches already, and a lone IQ answer must not wait for the peer's delayed ACK.
    let tcp = tokio::time::timeout(Duration::from_secs(10), dial(&cfg.server, cfg.send_buffer))
        .await
        .map_err(|_| connect_err("timed out after 10 s".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    tcp.set_nodelay(true)
        .map_err(|e| connect_err(e.to_string()))?;
    let header = StreamHeader {
        to: Some(std::borrow::Cow::Borrowed(domain.as_str())),
        from: None,
        id: None,
    };
    let mut pending = tokio::time::timeout(
        Duration::from_secs(10),
        initiate_stream(LinkIo::new(tcp), ns::COMPONENT, header, timeouts),
    )
    .await
    .map_err(|_| refused("no stream header within 10 s".into()))?
    .map_err(|e| refused(e.to_string()))?;
    let header = pending.take_header();
    let Some(id) = header.id else {
        return Err(refused(
            "the server sent no stream id (wrong domain?)".into(),
        ));
    };
    let mut stream: Conn = pending.skip_features();
    let handshake = Handshake::from_stream_id_and_password(id.into_owned(), &cfg.secret);
    stream
        .send(&XmppStreamElement::ComponentHandshake(handshake))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| refused("no handshake answer within 10 s".into()))?;
        match next {
            Some(Ok(Guarded::Element(FallibleStreamElement::Ok(
                XmppStreamElement::ComponentHandshake(_),
            )))) => {
                let Some(w) = stream.get_stream().take_writer() else {
                    return Err(connect_err("the connection lost its write half".into()));
                };
                return Ok(Connection {
                    read: stream,
                    write: Writer::new(w),
                });
            }
            Some(Ok(Guarded::Element(FallibleStreamElement::Ok(
                XmppStreamElement::StreamError(e),
            )))) => return Err(refused(e.0.to_string())),
            Some(Ok(_)) => {
                return Err(refused(
                    "unexpected element before the handshake answer".into(),
                ))
            }
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(refused(
                    "the server closed the stream (wrong secret or unknown domain)".into(),
                ))
            }
            Some(Err(e)) => return Err(refused(format!("{e}"))),
        }
    }
}

/// Connect and authenticate `count` connections (`component.connections`), one after the other.
pub async fn connect_all(cfg: &LinkConfig, count: usize) -> Result<Vec<Connection>, LinkError> {
    let mut conns = Vec::with_capacity(count);
    for index in 1..=count.max(1) {
        match connect(cfg).await {
            Ok(c) => conns.push(c),
            Err(e) if index == 1 => return Err(e),
            Err(e) => {
                return Err(LinkError::Extra {
                    index,
                    total: count,
                    source: Box::new(e),
                })
            }
        }
    }
    Ok(conns)
}

/// Handle for senders.
///
/// Two lanes lead to the link task. The broadcast lane ([`send`](Self::send),
/// [`broadcast`](Self::broadcast), [`send_raw`](Self::send_raw)) is written strictly in order. The
/// answer lane ([`reply`](Self::reply)) carries what answers a session's own join or leave; the
/// link writes it before the next broadcast-lane item it has not started. Under a burst (200
/// sessions joining at once queue megabytes of presences, XEP-0045 §7.2.3) each joiner then has
/// its occupant list, self-presence and subject after its own answer, not after everyone's
/// broadcasts. Order per recipient holds: a session's answer is queued before any broadcast to
/// it as an occupant, and [`departed`](Self::departed) removes what the broadcast lane still held
/// for it from that room, so an old copy cannot arrive after the answer that says it left.
///
/// With several connections (`component.connections`) each has its own task and lanes, and
/// everything for one recipient (by bare JID) goes over the same one, so the order above holds
/// per recipient; a broadcast is split by recipient.
#[derive(Clone)]
pub struct LinkHandle {
    lanes: Arc<[Lane]>,
    /// Shared counters.
    pub state: Arc<LinkState>,
}

/// The two lanes to one connection's task.
struct Lane {
    tx: mpsc::Sender<Numbered>,
    answers: mpsc::Sender<Outgoing>,
    seq: AtomicU64,
}

impl LinkHandle {
    /// Queue a stanza for sending.
    pub fn send(&self, s: Stanza) {
        let lane = self.lane_of_stanza(&s);
        self.push(lane, Outgoing::Stanza(s), 1);
    }

    /// Queue a stanza serialised already ([`super::wire`]) for `to`.
    pub fn send_raw(&self, to: &Jid, bytes: Vec<u8>) {
        self.push(self.lane_of(to.as_str()), Outgoing::Raw(bytes), 1);
    }

    /// Queue one stanza for each of `to` (the stanza's own `to` is ignored).
    pub fn broadcast(&self, s: Stanza, to: impl Into<Arc<[FullJid]>>) {
        let to = to.into();
        if to.is_empty() {
            return;
        }
        // Serialised once, here, for every recipient on every connection. (A room message comes
        // serialised by the MUC core already: `broadcast_serialised`.)
        let room = room_of(&s);
        match Template::new(&Element::from(s)) {
            Ok(t) => self.broadcast_serialised(Arc::new(t), room, to),
            Err(e) => unserialisable(&self.state, to.len() as u64, &e),
        }
    }

    /// [`broadcast`](Self::broadcast) of a stanza serialised already (without `to`), from `room`.
    pub fn broadcast_serialised(
        &self,
        template: Arc<Template>,
        room: Option<BareJid>,
        to: Arc<[FullJid]>,
    ) {
        if to.is_empty() {
            return;
        }
        // One connection (the default) takes the room's list as it is, shared, not copied.
        let groups: Vec<Arc<[FullJid]>> = if self.lanes.len() == 1 {
            vec![to]
        } else {
            let mut groups: Vec<Vec<FullJid>> = vec![Vec::new(); self.lanes.len()];
            for j in to.iter() {
                groups[self.index_of(j.as_str())].push(j.clone());
            }
            groups.into_iter().map(Arc::from).collect()
        };
        for (lane, to) in self.lanes.iter().zip(groups) {
            let n = to.len() as u64;
            if n > 0 {
                let out = Outgoing::Copies {
                    template: template.clone(),
                    room: room.clone(),
                    to,
                };
                self.push(lane, out, n);
            }
        }
    }

    /// Queue a stanza on the answer lane: it is written before broadcasts queued earlier that
    /// the link has not started on.
    pub fn reply(&self, s: Stanza) {
        let lane = self.lane_of_stanza(&s);
        self.answer(lane, Outgoing::Stanza(s));
    }

    /// [`reply`](Self::reply) with a stanza for `to` serialised already.
    pub fn reply_raw(&self, to: &FullJid, bytes: Vec<u8>) {
        self.answer(self.lane_of(to.as_str()), Outgoing::Raw(bytes));
    }

    fn answer(&self, lane: &Lane, out: Outgoing) {
        self.state.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = lane.answers.try_send(out) {
            self.refused(&e, 1);
        }
    }

    /// `session` left `room`: the room's messages and presences to it still waiting in the
    /// broadcast lane are not sent.
    pub fn departed(&self, room: BareJid, session: FullJid) {
        let lane = self.lane_of(session.as_str());
        let before = lane.seq.load(Ordering::SeqCst);
        let _ = lane.answers.try_send(Outgoing::Departed {
            room,
            session,
            before,
        });
    }

    /// The connection for what goes to `to` (a JID's text): one per person, by bare JID.
    fn index_of(&self, to: &str) -> usize {
        let n = self.lanes.len();
        if n == 1 {
            return 0;
        }
        // `DefaultHasher::new()` has fixed keys: the same person maps to the same connection for
        // the life of the process, which is all the order needs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(bare_of(to), &mut h);
        (std::hash::Hasher::finish(&h) % n as u64) as usize
    }

    fn lane_of(&self, to: &str) -> &Lane {
        &self.lanes[self.index_of(to)]
    }

    fn lane_of_stanza(&self, s: &Stanza) -> &Lane {
        match stanza_to(s) {
            Some(to) => self.lane_of(to.as_str()),
            None => &self.lanes[0],
        }
    }

    /// Hand `out` (`n` stanzas on the wire) to a link task, counted as queued; the bridge never
    /// waits, so when the queue is full the stanzas are dropped and counted instead.
    fn push(&self, lane: &Lane, out: Outgoing, n: u64) {
        let seq = lane.seq.fetch_add(1, Ordering::SeqCst);
        self.state.queued.fetch_add(n, Ordering::Relaxed);
        if let Err(e) = lane.tx.try_send(Numbered { seq, out }) {
            self.refused(&e, n);
        }
    }

    /// `n` stanzas counted as queued (before the link task could count them as written) did not
    /// get into their lane: count them as dropped instead.
    fn refused<T>(&self, e: &mpsc::error::TrySendError<T>, n: u64) {
        self.state.queued.fetch_sub(n, Ordering::Relaxed);
        let before = self.state.dropped.fetch_add(n, Ordering::Relaxed);
        let total = before + n;
        // The largest power of two up to the new total is past the old one: the total reached a
        // power of two. Logged only then, so a full queue under load does not flood the log too.
        let reached_power_of_two = (1u64 << total.ilog2()) > before;
        match e {
            mpsc::error::TrySendError::Full(_) if reached_power_of_two => {
                tracing::warn!(
                    dropped_total = total,
                    "the link's outgoing queue is full; stanzas dropped"
                )
            }
            mpsc::error::TrySendError::Full(_) => {}
            mpsc::error::TrySendError::Closed(_) => {
                tracing::error!(count = n, "link task is gone; stanzas dropped")
            }
        }
    }

    /// Flush and close every connection's stream.
    pub async fn close(&self) {
        let closes = self.lanes.iter().map(|lane| async move {
            let (tx, rx) = oneshot::channel();
            let seq = lane.seq.fetch_add(1, Ordering::SeqCst);
            let close = Numbered {
                seq,
                out: Outgoing::Close(tx),
            };
            if lane.tx.send(close).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
        });
        futures::future::join_all(closes).await;
    }
}

/// Start one link task per established connection. Inbound stanzas of all of them go to
/// `inbound`.
pub fn spawn(
    cfg: LinkConfig,
    conns: Vec<Connection>,
    inbound: mpsc::Sender<Inbound>,
) -> LinkHandle {
    let state = Arc::new(LinkState {
        connections: conns.len() as u64,
        ..Default::default()
    });
    let balance = (conns.len() > 1).then(|| Arc::new(Mutex::new(Balance::default())));
    let mut lanes = Vec::with_capacity(conns.len());
    for (index, conn) in conns.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(cfg.outgoing_limit.max(1));
        let (answers, answers_rx) = mpsc::channel(cfg.outgoing_limit.max(1));
        lanes.push(Lane {
            tx,
            answers,
            seq: AtomicU64::new(0),
        });
        let task = Lanes {
            rx,
            answers: answers_rx,
            departed: Departures::new(cfg.outgoing_limit.max(1)),
        };
        let shared = Shared {
            index,
            inbound: inbound.clone(),
            state: state.clone(),
            balance: balance.clone(),
        };
        tokio::spawn(run(cfg.clone(), conn, task, shared));
    }
    LinkHandle {
        lanes: lanes.into(),
        state,
    }
}

/// What a link task shares with the others.
struct Shared {
    /// This connection's number (0-based).
    index: usize,
    inbound: mpsc::Sender<Inbound>,
    state: Arc<LinkState>,
    /// With several connections: which one each room's stanzas came over.
    balance: Option<Arc<Mutex<Balance>>>,
}

/// Rooms (bare `to`) remembered by the balance check before it starts over.
const BALANCE_ROOMS: usize = 10_000;

/// Misrouted stanzas before the first warning (then at every power of two): a server that
/// just moved a room to another connection (one came or went) is not worth a warning.
const MISROUTED_WARN: u64 = 8;

/// With several connections, the connection each room's inbound stanzas came over since the
/// last change of connections: stanzas for one room must come over one of them, else the server
/// may reorder what people send it (a message overtaking its sender's join).
#[derive(Debug, Default)]
struct Balance {
    changes: u64,
    rooms: HashMap<String, usize>,
}

impl Balance {
    /// Note that a stanza to `to` came over connection `index`.
    fn note(&mut self, to: &str, index: usize, state: &LinkState) {
        let changes = state.changes.load(Ordering::SeqCst);
        if changes != self.changes || self.rooms.len() >= BALANCE_ROOMS {
            self.rooms.clear();
            self.changes = changes;
        }
        let bare = bare_of(to);
        match self.rooms.get(bare) {
            Some(&i) if i != index => {
                let n = state.misrouted.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= MISROUTED_WARN && n.is_power_of_two() {
                    tracing::warn!(
                        misrouted_total = n,
                        room = bare,
                        "the XMPP server sends one room's stanzas over several component connections, so their order is not guaranteed: set domain_balancing with type bare_destination for this domain (deploy/ejabberd.yml), or component.connections = 1"
                    );
                }
                self.rooms.insert(bare.to_owned(), index);
            }
            Some(_) => {}
            None => {
                self.rooms.insert(bare.to_owned(), index);
            }
        }
    }
}

/// The link task's ends of the two lanes, and the departures still to apply to the broadcast lane.
struct Lanes {
    rx: mpsc::Receiver<Numbered>,
    answers: mpsc::Receiver<Outgoing>,
    departed: Departures,
}

/// Sessions that left a room while the broadcast lane still held stanzas for them: session →
/// (room, the first broadcast-lane number queued after the departure). Emptied whenever the lane
/// is; while it never is (a lasting backlog), at most `component.outgoing_limit` sessions are
/// remembered, and copies to sessions that left beyond that are sent as before (harmless, only
/// not saved).
struct Departures {
    by_session: HashMap<FullJid, Vec<(BareJid, u64)>>,
    limit: usize,
}

impl Departures {
    fn new(limit: usize) -> Departures {
        Departures {
            by_session: Default::default(),
            limit,
        }
    }

    fn add(&mut self, room: BareJid, session: FullJid, before: u64) {
        if self.by_session.len() >= self.limit && !self.by_session.contains_key(&session) {
            return;
        }
        self.by_session
            .entry(session)
            .or_default()
            .push((room, before));
    }

    /// Whether item `seq` of `room` is still to reach `session` (it is not when the session left
    /// the room after the item was queued).
    fn keeps(&mut self, room: &BareJid, session: &FullJid, seq: u64) -> bool {
        let Some(list) = self.by_session.get_mut(session) else {
            return true;
        };
        // Departures every later item was queued after are spent.
        list.retain(|(_, before)| *before > seq);
        let gone = list.iter().any(|(r, _)| r == room);
        if list.is_empty() {
            self.by_session.remove(session);
        }
        !gone
    }

    /// Forget departures no queued item can precede any more (the lane is empty up to `next`).
    fn settle(&mut self, next: u64) {
        self.by_session.retain(|_, list| {
            list.retain(|(_, before)| *before > next);
            !list.is_empty()
        });
    }

    /// `out` without the recipients that left its room after it was queued (counted as skipped);
    /// `None` when no recipient is left.
    fn filter(&mut self, seq: u64, mut out: Outgoing, state: &LinkState) -> Option<Outgoing> {
        if self.by_session.is_empty() {
            return Some(out);
        }
        let skipped = match &mut out {
            Outgoing::Copies {
                room: Some(room),
                to,
                ..
            } => {
                // The list may be the room's own, shared: a departure (rare) makes a new one.
                let before = to.len();
                if to.iter().any(|j| !self.keeps(room, j, seq)) {
                    *to = to
                        .iter()
                        .filter(|j| self.keeps(room, j, seq))
                        .cloned()
                        .collect();
                }
                before - to.len()
            }
            Outgoing::Stanza(s) => match (room_of(s), full_to(s)) {
                (Some(room), Some(to)) if !self.keeps(&room, &to, seq) => 1,
                _ => 0,
            },
            _ => 0,
        };
        if skipped > 0 {
            state.queued.fetch_sub(skipped as u64, Ordering::Relaxed);
            state
                .skipped_departed
                .fetch_add(skipped as u64, Ordering::Relaxed);
        }
        match &out {
            Outgoing::Stanza(_) if skipped > 0 => None,
            Outgoing::Copies { to, .. } if to.is_empty() => None,
            _ => Some(out),
        }
    }
}

/// The room a message or presence comes from (IQs are answered whatever happened since).
fn room_of(s: &Stanza) -> Option<BareJid> {
    match s {
        Stanza::Message(m) => m.from.as_ref().map(|j| j.to_bare()),
        Stanza::Presence(p) => p.from.as_ref().map(|j| j.to_bare()),
        Stanza::Iq(_) => None,
    }
}

fn full_to(s: &Stanza) -> Option<FullJid> {
    match s {
        Stanza::Iq(_) => None,
        _ => stanza_to(s)?.clone().try_into_full().ok(),
    }
}

/// Whom a stanza is addressed to.
fn stanza_to(s: &Stanza) -> Option<&Jid> {
    match s {
        Stanza::Message(m) => m.to.as_ref(),
        Stanza::Presence(p) => p.to.as_ref(),
        Stanza::Iq(iq) => iq.to(),
    }
}

/// The bare part of a JID's text: a JID's first '/' starts its resource (RFC 7622 §3.1).
fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(bare, _)| bare)
}

enum Exit {
    Closed,
    Lost,
}

/// One serialised stanza, as written on the stream.
type Bytes = Vec<u8>;

async fn run(cfg: LinkConfig, conn: Connection, mut lanes: Lanes, shared: Shared) {
    let state = shared.state.clone();
    let connection = shared.index + 1;
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    let mut conn = Some(conn);
    let mut relinked = false;
    let mut close_ack: Option<oneshot::Sender<()>> = None;
    loop {
        if let Some(mut c) = conn.take() {
            // Only when every connection was down did the server bounce what was sent to us (with
            // one still up it routed everything over that one): only then must occupants rejoin.
            let first_up = state.came_up();
            if first_up && relinked && shared.inbound.send(Inbound::Relinked).await.is_err() {
                return;
            }
            tracing::info!(server = %cfg.server, domain = %cfg.domain, connection, backlog = queue.len(), "component link up");
            match serve(
                &cfg,
                &mut c,
                &mut queue,
                &mut lanes,
                &shared,
                &mut close_ack,
            )
            .await
            {
                Exit::Closed => {
                    // RFC 6120 §4.4: close our stream; the server closes its own.
                    let limit = cfg.write_timeout;
                    let _ = c.write.put(b"</stream:stream>", limit).await;
                    let _ = c.write.flush(limit).await;
                    c.write.shutdown(limit).await;
                    state.went_down();
                    if let Some(ack) = close_ack.take() {
                        let _ = ack.send(());
                    }
                    return;
                }
                Exit::Lost => {
                    state.went_down();
                    tracing::warn!(server = %cfg.server, connection, "component link lost; reconnecting");
                }
            }
        }
        // Down: keep queueing while retrying with capped backoff (≤ 1 s, so a returning server is
        // relinked within about a second).
        let mut backoff = Duration::from_millis(100);
        loop {
            let closing = queue_while_down(&mut lanes, &mut queue, &cfg, &state, backoff).await;
            if closing {
                if !queue.is_empty() {
                    tracing::warn!(
                        count = queue.len(),
                        connection,
                        "shutting down with stanzas still queued for a down link"
                    );
                }
                return;
            }
            match connect(&cfg).await {
                Ok(c) => {
                    state.relinks.fetch_add(1, Ordering::Relaxed);
                    conn = Some(c);
                    relinked = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, connection, "relink attempt failed");
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// While the link is down, serialise what both lanes bring into `queue` (answers first; departures
/// cannot reach stanzas serialised already) until `backoff` has passed. True when caseroom is
/// shutting down.
async fn queue_while_down(
    lanes: &mut Lanes,
    queue: &mut VecDeque<Bytes>,
    cfg: &LinkConfig,
    state: &LinkState,
    backoff: Duration,
) -> bool {
    let sleep = tokio::time::sleep(backoff);
    tokio::pin!(sleep);
    loop {
        let out = tokio::select! {
            biased;
            a = lanes.answers.recv() => match a {
                Some(Outgoing::Departed { .. }) => continue,
                Some(out) => out,
                None => return true,
            },
            msg = lanes.rx.recv() => match msg.map(|m| m.out) {
                Some(Outgoing::Close(ack)) => {
                    let _ = ack.send(());
                    return true;
                }
                Some(out) => out,
                None => return true,
            },
            _ = &mut sleep => return false,
        };
        for b in serialise(out, state) {
            enqueue(queue, b, cfg.queue_limit, state);
        }
    }
}

/// The bytes of an outgoing stanza, or of each copy of a broadcast. A stanza that cannot be
/// serialised (a name or text rxml refuses) is dropped, counted and logged, never sent half-made.
fn serialise(out: Outgoing, state: &LinkState) -> Vec<Bytes> {
    match out {
        Outgoing::Stanza(s) => match wire::encode(&Element::from(s)) {
            Ok(b) => vec![b],
            Err(e) => {
                state.queued.fetch_sub(1, Ordering::Relaxed);
                unserialisable(state, 1, &e);
                vec![]
            }
        },
        Outgoing::Raw(bytes) => vec![bytes],
        Outgoing::Copies { template, to, .. } => {
            to.iter().map(|j| template.copy_for(j.as_str())).collect()
        }
        Outgoing::Close(_) | Outgoing::Departed { .. } => vec![],
    }
}

/// `copies` of a stanza that cannot be serialised are dropped: counted and logged.
fn unserialisable(state: &LinkState, copies: u64, e: &wire::WireError) {
    state.dropped.fetch_add(copies, Ordering::Relaxed);
    tracing::warn!(error = %e, copies, "dropped a stanza that cannot be serialised");
}

fn enqueue(queue: &mut VecDeque<Bytes>, s: Bytes, limit: usize, state: &LinkState) {
    if queue.len() >= limit {
        // Bounded: the oldest stanza gives way, loudly and counted.
        queue.pop_front();
        state.queued.fetch_sub(1, Ordering::Relaxed);
        let n = state.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            dropped_total = n,
            limit,
            "link queue full while the server is away: dropped the oldest stanza"
        );
    }
    queue.push_back(s);
}

/// How long a write may take; set per link from `component.write_timeout` (the server stopped
/// reading when it runs out: the link is then marked down and re-established).
fn timed_out(limit: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the XMPP server took no data for {limit:?} (component.write_timeout)"),
    )
}

/// Bytes the writer gathers before it writes them to the socket (or sooner, at [`Writer::flush`]).
const WRITE_BUFFER: usize = 64 * 1024;

/// The write half and the link's own buffer. A broadcast's copies are written straight into the
/// buffer ([`wire::Template::write_for`]): no allocation, copy or timer per recipient, one
/// `write` per 64 KiB. (A buffered writer took each copy as a buffer of its own, and each write
/// read the clock for its timeout: BENCHMARKS.md §2, stop 26.)
struct Writer {
    sock: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Writer {
    fn new(sock: OwnedWriteHalf) -> Writer {
        Writer {
            sock,
            buf: Vec::with_capacity(WRITE_BUFFER + 4096),
        }
    }

    /// Write what the buffer holds to the socket. What a failed write leaves is dropped with the
    /// connection, as what sits in the socket's own buffer is.
    async fn flush(&mut self, limit: Duration) -> Result<(), std::io::Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(limit, self.sock.write_all(&self.buf)).await;
        self.buf.clear();
        written.map_err(|_| timed_out(limit))?
    }

    /// Write the buffer out once it is full.
    async fn spill(&mut self, limit: Duration) -> Result<(), std::io::Error> {
        if self.buf.len() >= WRITE_BUFFER {
            self.flush(limit).await
        } else {
            Ok(())
        }
    }

    /// Buffer one serialised stanza (writing the buffer out first if it is full: when that
    /// fails, `b` is not in it and the caller keeps it for the next link).
    async fn put(&mut self, b: &[u8], limit: Duration) -> Result<(), std::io::Error> {
        self.spill(limit).await?;
        self.buf.extend_from_slice(b);
        Ok(())
    }

    async fn shutdown(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.sock.shutdown()).await;
    }
}

/// Write one stanza of our own (a keepalive, an error reply) and flush it.
async fn send_now(w: &mut Writer, s: Stanza, limit: Duration) -> Result<(), std::io::Error> {
    let b = wire::encode(&Element::from(s)).map_err(std::io::Error::other)?;
    w.put(&b, limit).await?;
    w.flush(limit).await
}

/// Write what the bridge sent; on a failed write what is not in the buffer goes back to the front
/// of the queue for the next link.
async fn write_out(
    w: &mut Writer,
    out: Outgoing,
    queue: &mut VecDeque<Bytes>,
    state: &LinkState,
    limit: Duration,
) -> Result<(), std::io::Error> {
    if let Outgoing::Copies { template, to, .. } = out {
        return write_copies(w, &template, &to, queue, state, limit).await;
    }
    // One stanza (none if it cannot be serialised): broadcasts took the branch above.
    for b in serialise(out, state) {
        if let Err(e) = w.put(&b, limit).await {
            queue.push_front(b);
            return Err(e);
        }
        state.written(1);
    }
    Ok(())
}

/// Write a broadcast's copies into the buffer; when a write of the full buffer fails, the copies
/// not in it yet go back to the front of the queue for the next link (as [`Writer::put`]).
async fn write_copies(
    w: &mut Writer,
    template: &wire::Template,
    to: &[FullJid],
    queue: &mut VecDeque<Bytes>,
    state: &LinkState,
    limit: Duration,
) -> Result<(), std::io::Error> {
    let mut done = 0;
    let mut result = Ok(());
    for j in to {
        if let Err(e) = w.spill(limit).await {
            result = Err(e);
            break;
        }
        template.write_for(j.as_str(), &mut w.buf);
        done += 1;
    }
    state.written(done as u64);
    for j in to[done..].iter().rev() {
        queue.push_front(template.copy_for(j.as_str()));
    }
    result
}

/// Broadcast-lane items written between two looks at the server's stream.
const BATCH: usize = 64;

/// Write `first` (if any) and every answer waiting on the answer lane; departures are noted for
/// the broadcast lane.
async fn write_answers(
    w: &mut Writer,
    first: Option<Outgoing>,
    lanes: &mut Lanes,
    queue: &mut VecDeque<Bytes>,
    state: &LinkState,
    limit: Duration,
) -> Result<(), std::io::Error> {
    let mut next = first.or_else(|| lanes.answers.try_recv().ok());
    while let Some(out) = next {
        match out {
            Outgoing::Departed {
                room,
                session,
                before,
            } => lanes.departed.add(room, session, before),
            out => write_out(w, out, queue, state, limit).await?,
        }
        next = lanes.answers.try_recv().ok();
    }
    Ok(())
}

/// Stanzas of the link's own (keepalive pings, error replies to what it refused) that the
/// reader hands to the writer.
const CONTROL: usize = 64;

/// One established link: the backlog first, then reading the server and writing both lanes at
/// the same time. They used to share one loop, so while a burst was being written into a full
/// socket nothing was read: in a join storm the later joins waited in the receive buffer for
/// up to a second behind answers to the earlier ones (BENCHMARKS §9, stop 23).
async fn serve(
    cfg: &LinkConfig,
    conn: &mut Connection,
    queue: &mut VecDeque<Bytes>,
    lanes: &mut Lanes,
    shared: &Shared,
    close_ack: &mut Option<oneshot::Sender<()>>,
) -> Exit {
    let state = &*shared.state;
    let limit = cfg.write_timeout;
    let Connection {
        read: stream,
        write: w,
    } = conn;
    // Backlog first, in order.
    while let Some(b) = queue.front() {
        if let Err(e) = w.put(b, limit).await {
            tracing::warn!(error = %e, "write failed while sending the backlog");
            return Exit::Lost;
        }
        queue.pop_front();
        state.written(1);
    }
    if let Err(e) = w.flush(limit).await {
        tracing::warn!(error = %e, "flush failed");
        return Exit::Lost;
    }
    let (control, control_rx) = mpsc::channel(CONTROL);
    let stop = tokio::sync::Notify::new();
    let reader = read_server(cfg, stream, shared, control);
    let writer = write_lanes(w, queue, lanes, state, close_ack, control_rx, &stop, limit);
    tokio::pin!(reader, writer);
    tokio::select! {
        exit = &mut writer => exit,
        exit = &mut reader => {
            // The writer stops between two items (never inside one: write_out puts what it
            // could not write back in the queue for the next link, so nothing is lost).
            stop.notify_one();
            writer.await;
            exit
        }
    }
}

/// Write what the lanes and the reader bring until the bridge closes the link, a write fails,
/// or `stop` (the reader is done).
#[allow(clippy::too_many_arguments)]
async fn write_lanes(
    w: &mut Writer,
    queue: &mut VecDeque<Bytes>,
    lanes: &mut Lanes,
    state: &LinkState,
    close_ack: &mut Option<oneshot::Sender<()>>,
    mut control: mpsc::Receiver<Stanza>,
    stop: &tokio::sync::Notify,
    limit: Duration,
) -> Exit {
    let lost = |e: std::io::Error| {
        tracing::warn!(error = %e, "write failed; keeping the stanzas for the next link");
        Exit::Lost
    };
    loop {
        tokio::select! {
            _ = stop.notified() => return Exit::Lost,
            Some(s) = control.recv() => {
                if let Err(e) = send_now(w, s, limit).await {
                    return lost(e);
                }
            }
            answer = lanes.answers.recv() => {
                let Some(answer) = answer else { return Exit::Closed };
                if let Err(e) = write_answers(w, Some(answer), lanes, queue, state, limit).await {
                    return lost(e);
                }
                if let Err(e) = w.flush(limit).await {
                    return lost(e);
                }
            }
            msg = lanes.rx.recv() => {
                let Some(next) = msg else { return Exit::Closed };
                match write_batch(w, next, queue, lanes, state, limit).await {
                    Ok(Some(ack)) => {
                        *close_ack = Some(ack);
                        return Exit::Closed;
                    }
                    Ok(None) => {}
                    Err(e) => return lost(e),
                }
                if let Err(e) = w.flush(limit).await {
                    return lost(e);
                }
                tracing::trace!("flushed to the server");
            }
        }
    }
}

/// Write `next` and up to [`BATCH`] broadcast-lane items ready behind it, each after the answers
/// waiting then. The close acknowledgement when the bridge asked to close.
async fn write_batch(
    w: &mut Writer,
    mut next: Numbered,
    queue: &mut VecDeque<Bytes>,
    lanes: &mut Lanes,
    state: &LinkState,
    limit: Duration,
) -> Result<Option<oneshot::Sender<()>>, std::io::Error> {
    for written in 1.. {
        // Answers go ahead of every broadcast-lane item not started yet.
        write_answers(w, None, lanes, queue, state, limit).await?;
        if let Outgoing::Close(ack) = next.out {
            let _ = w.flush(limit).await;
            return Ok(Some(ack));
        }
        let seq = next.seq;
        if let Some(out) = lanes.departed.filter(seq, next.out, state) {
            write_out(w, out, queue, state, limit).await?;
        }
        // Taken off the lane only to be written: an item received here and not written is lost.
        if written == BATCH {
            break;
        }
        match lanes.rx.try_recv() {
            Ok(m) => next = m,
            Err(_) => {
                lanes.departed.settle(seq + 1);
                break;
            }
        }
    }
    Ok(None)
}

/// Read the server's stream: stanzas go to the bridge, replies of the link's own (errors for
/// what it refused, keepalive pings on silence) to the writer. Ends when the stream does.
async fn read_server(
    cfg: &LinkConfig,
    stream: &mut Conn,
    shared: &Shared,
    control: mpsc::Sender<Stanza>,
) -> Exit {
    let state = &*shared.state;
    let server_domain = parent_domain(&cfg.domain);
    let mut ping_seq = 0u64;
    loop {
        let reply = match stream.next().await {
            Some(Ok(Guarded::Element(FallibleStreamElement::Ok(XmppStreamElement::Stanza(s))))) => {
                state.stanzas_in.fetch_add(1, Ordering::Relaxed);
                tracing::trace!("stanza from the server");
                if let Some(balance) = &shared.balance {
                    note_route(balance, &s, shared.index, state);
                }
                if shared.inbound.send(Inbound::Stanza(s)).await.is_err() {
                    return Exit::Closed;
                }
                None
            }
            Some(Ok(Guarded::Element(FallibleStreamElement::Ok(
                XmppStreamElement::StreamError(e),
            )))) => {
                tracing::error!(error = %e.0, "the server sent a stream error");
                return Exit::Lost;
            }
            Some(Ok(Guarded::Element(FallibleStreamElement::Ok(other)))) => {
                tracing::debug!(element = ?other, "ignoring a non-stanza element");
                None
            }
            Some(Ok(Guarded::Refused { header, exceeded })) => {
                state.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(from = ?header.from, %exceeded, "refused an oversized stanza with policy-violation");
                refused_reply(&cfg.domain, &header, exceeded)
            }
            Some(Ok(Guarded::Element(FallibleStreamElement::Err(err)))) => {
                state.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(error = %err, "answered a malformed stanza with bad-request");
                malformed_reply(&cfg.domain, &err)
            }
            Some(Err(ReadError::SoftTimeout)) => {
                // Silence: ping the server; its answer (even an error) is traffic (XEP-0199).
                ping_seq += 1;
                let ping = Iq::from_get(format!("keepalive-{ping_seq}"), Ping)
                    .with_from(Jid::new(&cfg.domain).unwrap_or_else(|_| server_domain.clone()))
                    .with_to(server_domain.clone());
                Some(ping.into())
            }
            Some(Err(ReadError::StreamFooterReceived)) => {
                tracing::warn!("the server closed the component stream");
                return Exit::Lost;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "component stream read error");
                return Exit::Lost;
            }
            None => {
                tracing::warn!("component stream ended");
                return Exit::Lost;
            }
        };
        // Waits only while the writer has CONTROL replies to write: it is stuck, so is reading.
        if let Some(r) = reply {
            if control.send(r).await.is_err() {
                return Exit::Lost;
            }
        }
    }
}

/// Note which connection a stanza for its room came over ([`Balance`]).
fn note_route(balance: &Mutex<Balance>, s: &Stanza, index: usize, state: &LinkState) {
    if let (Some(to), Ok(mut b)) = (stanza_to(s), balance.lock()) {
        b.note(to.as_str(), index, state);
    }
}

/// The server's domain, guessed as the component domain's parent (rooms.example.org → example.org).
fn parent_domain(domain: &str) -> Jid {
    let parent = domain.split_once('.').map(|(_, p)| p).unwrap_or(domain);
    Jid::new(parent)
        .or_else(|_| Jid::new(domain))
        .unwrap_or_else(|_| {
            // Unreachable for a validated domain; keep a syntactically valid target.
            Jid::new("localhost").expect("literal JID")
        })
}

/// A bad-request error for a stanza that could not be parsed (RFC 6120 §8.3.3.1), unless it was
/// itself an error or result (never answer those, §8.3.1), or its addresses are unusable.
fn malformed_reply(domain: &str, err: &StreamElementError) -> Option<Stanza> {
    let StreamElementError::InvalidStanza {
        name,
        header,
        error,
        ..
    } = err
    else {
        return None;
    };
    let header = Header {
        name: name.to_string(),
        from: header.from.clone(),
        to: header.to.clone(),
        id: header.id.clone(),
        type_: header.type_.clone(),
    };
    let text = format!("malformed {name}: {error}");
    error_reply(domain, &header, DefinedCondition::BadRequest, &text)
}

/// A policy-violation error (RFC 6120 §8.3.3.12) for a stanza refused while it was read.
fn refused_reply(domain: &str, header: &Header, exceeded: Exceeded) -> Option<Stanza> {
    let text = format!("{exceeded}; not processed");
    error_reply(domain, header, DefinedCondition::PolicyViolation, &text)
}

/// An error reply to a stanza known only by its header. Never answers an error or a result
/// (RFC 6120 §8.3.1), nor a non-stanza, nor a stanza without a usable `from`.
fn error_reply(
    domain: &str,
    header: &Header,
    condition: DefinedCondition,
    text: &str,
) -> Option<Stanza> {
    if matches!(header.type_.as_deref(), Some("error") | Some("result")) {
        return None;
    }
    let to = Jid::new(header.from.as_deref()?).ok()?;
    let from = header
        .to
        .as_deref()
        .and_then(|t| Jid::new(t).ok())
        .filter(|j| j.domain().as_str() == domain)
        .or_else(|| Jid::new(domain).ok())?;
    let id = header.id.clone();
    Some(match header.name.as_str() {
        "iq" => outbound::iq_error(from, to, id.as_deref().unwrap_or(""), condition, text).into(),
        "message" => outbound::message_error(from, to, id, condition, text).into(),
        "presence" => outbound::presence_error(from, to, id, condition, text).into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &str) -> FullJid {
        s.parse().expect("test JID")
    }

    fn room(s: &str) -> BareJid {
        s.parse().expect("test JID")
    }

    #[test]
    fn a_departure_holds_back_only_earlier_items_of_its_room() {
        let mut d = Departures::new(8);
        d.add(room("team@rooms.x"), full("b@x/r"), 5);
        assert!(
            !d.keeps(&room("team@rooms.x"), &full("b@x/r"), 4),
            "queued before"
        );
        assert!(
            d.keeps(&room("other@rooms.x"), &full("b@x/r"), 4),
            "another room"
        );
        assert!(
            d.keeps(&room("team@rooms.x"), &full("a@x/r"), 4),
            "another session"
        );
        assert!(
            d.keeps(&room("team@rooms.x"), &full("b@x/r"), 5),
            "queued after"
        );
        assert!(d.by_session.is_empty(), "spent once a later item went by");
    }

    #[test]
    fn departures_are_bounded_and_forgotten_when_the_lane_empties() {
        let mut d = Departures::new(2);
        d.add(room("team@rooms.x"), full("a@x/r"), 10);
        d.add(room("team@rooms.x"), full("b@x/r"), 10);
        d.add(room("team@rooms.x"), full("c@x/r"), 10);
        assert_eq!(d.by_session.len(), 2, "the limit holds");
        assert!(
            d.keeps(&room("team@rooms.x"), &full("c@x/r"), 3),
            "beyond the limit a copy is sent as before"
        );
        d.add(room("other@rooms.x"), full("a@x/r"), 12);
        assert_eq!(d.by_session.len(), 2, "a known session may add a room");
        d.settle(11);
        assert_eq!(
            d.by_session.len(),
            1,
            "only a@x/r's later departure is left"
        );
        d.settle(12);
        assert!(d.by_session.is_empty());
    }
}
