//! The component link's two lanes, against a minimal XEP-0114 peer on loopback: answers overtake
//! broadcasts not yet written, a departure cancels the copies still queued for the session that
//! left, and the socket gets the configured send buffer. With several connections: each person's
//! stanzas keep to one, occupants rejoin only when all were down, and a server that spreads one
//! room over several is noticed.

use std::time::Duration;

use caseroom::xmpp::link::{self, LinkConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xmpp_parsers::{
    jid::{BareJid, FullJid, Jid},
    message::{Message, MessageType},
    stanza::Stanza,
};

const ROOM: &str = "team@rooms.localhost";

fn cfg(server: String) -> LinkConfig {
    LinkConfig {
        domain: "rooms.localhost".into(),
        server,
        secret: "s".into(),
        queue_limit: 100,
        ping_interval: Duration::from_secs(60),
        write_timeout: Duration::from_secs(5),
        outgoing_limit: 1024,
        send_buffer: 64 * 1024,
    }
}

/// Read what `peer` has next into `buf`.
async fn read_more(peer: &mut TcpStream, buf: &mut String) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut chunk))
        .await
        .expect("the link wrote nothing for 5 s")
        .expect("read");
    assert!(n > 0, "the link closed the stream; got {buf}");
    buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
}

/// Read from `peer` until `needle` has been seen.
async fn read_until(peer: &mut TcpStream, buf: &mut String, needle: &str) {
    while !buf.contains(needle) {
        read_more(peer, buf).await;
    }
}

/// Accept the link and answer its handshake (any digest: the test is not about authentication).
async fn accept(listener: &TcpListener) -> TcpStream {
    let (mut peer, _) = listener.accept().await.expect("accept");
    let mut seen = String::new();
    read_until(&mut peer, &mut seen, ">").await;
    peer.write_all(b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' from='rooms.localhost' id='test-stream'>")
        .await
        .expect("header");
    read_until(&mut peer, &mut seen, "</handshake>").await;
    peer.write_all(b"<handshake/>").await.expect("handshake");
    peer
}

/// A link up against a peer on loopback: the peer's end, the link, and what it reads.
async fn linked() -> (
    TcpStream,
    link::LinkHandle,
    tokio::sync::mpsc::Receiver<link::Inbound>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = cfg(listener.local_addr().expect("addr").to_string());
    let (peer, conn) = tokio::join!(accept(&listener), link::connect(&config));
    let (inbound, rx) = tokio::sync::mpsc::channel(16);
    (
        peer,
        link::spawn(config, vec![conn.expect("link up")], inbound),
        rx,
    )
}

/// A link counter's value.
fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

fn full(s: &str) -> FullJid {
    s.parse().expect("test JID")
}

fn groupchat(body: &str) -> Stanza {
    let mut m = Message::new(None::<Jid>);
    m.type_ = MessageType::Groupchat;
    m.from = Some(Jid::from(full(&format!("{ROOM}/bot"))));
    m.bodies.insert(Default::default(), body.into());
    m.into()
}

fn to(body: &str, session: &str) -> Stanza {
    let Stanza::Message(mut m) = groupchat(body) else {
        unreachable!("groupchat builds a message")
    };
    m.to = Some(Jid::from(full(session)));
    m.into()
}

/// (recipient, body) of each message in what the peer read, in order.
fn deliveries(wire: &str) -> Vec<(String, String)> {
    wire.split("<message")
        .skip(1)
        .map(|m| {
            let attr = |name: &str| {
                let start = m.find(&format!("{name}='")).map(|i| i + name.len() + 2);
                start
                    .and_then(|s| m[s..].find('\'').map(|e| m[s..s + e].to_owned()))
                    .unwrap_or_default()
            };
            let body = m
                .find("<body>")
                .and_then(|s| {
                    m[s + 6..]
                        .find("</body>")
                        .map(|e| m[s + 6..s + 6 + e].to_owned())
                })
                .unwrap_or_default();
            (attr("to"), body)
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn answers_overtake_queued_broadcasts_and_a_departure_cancels_its_copies() {
    let (mut peer, handle, _rx) = linked().await;
    let (a, b, c) = ("a@localhost/r", "b@localhost/r", "c@localhost/r");
    // All queued before the link task runs (current-thread runtime, no await in between): the
    // order below is what the bridge emitted.
    handle.broadcast(groupchat("b1"), vec![full(a), full(b)]);
    handle.broadcast(groupchat("b2"), vec![full(a), full(b)]);
    handle.send(to("direct to b", b));
    handle.reply(to("answer to c", c));
    handle.departed(ROOM.parse::<BareJid>().expect("room"), full(b));
    handle.reply(to("b left", b));
    handle.broadcast(groupchat("b3"), vec![full(a), full(b)]);
    // b3, queued last, ends what is written: read until both of its copies are in.
    let mut wire = String::new();
    while wire.matches(">b3</body></message>").count() < 2 {
        read_more(&mut peer, &mut wire).await;
    }
    let got = deliveries(&wire);
    let want: Vec<(String, String)> = [
        (c, "answer to c"),
        (b, "b left"),
        (a, "b1"),
        (a, "b2"),
        (a, "b3"),
        (b, "b3"),
    ]
    .iter()
    .map(|(t, m)| (t.to_string(), m.to_string()))
    .collect();
    assert_eq!(got, want, "wire: {wire}");
    let skipped = count(&handle.state.skipped_departed);
    assert_eq!(
        skipped, 3,
        "b1, b2 and the direct message to b were not sent"
    );
    assert_eq!(
        count(&handle.state.queued),
        0,
        "nothing is left counted as queued"
    );
}

#[tokio::test]
async fn the_socket_gets_the_configured_send_buffer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let tcp = link::dial(&addr, 32 * 1024).await.expect("dial");
    let size = socket2::SockRef::from(&tcp)
        .send_buffer_size()
        .expect("SO_SNDBUF");
    // Linux doubles the value for its bookkeeping; other kernels keep it.
    assert!(
        (32 * 1024..=64 * 1024).contains(&size),
        "SO_SNDBUF is {size} after asking for 32768"
    );
    let default = link::dial(&addr, 0).await.expect("dial");
    let kernel = socket2::SockRef::from(&default)
        .send_buffer_size()
        .expect("SO_SNDBUF");
    assert_ne!(kernel, size, "0 leaves the kernel's own size");
}

#[tokio::test]
async fn a_name_without_addresses_is_a_clear_error() {
    let err = link::dial("no-such-host.invalid:5347", 0)
        .await
        .expect_err("cannot resolve");
    assert!(!err.to_string().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn a_backlog_longer_than_a_batch_is_written_whole_and_in_order() {
    let (mut peer, handle, _rx) = linked().await;
    let a = "a@localhost/r";
    // Several batches' worth, all queued before the link runs.
    for i in 0..300 {
        handle.broadcast(groupchat(&format!("m{i}")), vec![full(a)]);
    }
    let mut wire = String::new();
    read_until(&mut peer, &mut wire, ">m299</body>").await;
    let bodies: Vec<String> = deliveries(&wire).into_iter().map(|(_, b)| b).collect();
    let want: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
}

/// While the link writes a burst into a server that is busy (here: not reading at all), what the
/// server sends is still read and handed on: a join must not wait behind answers to earlier ones.
#[tokio::test(flavor = "current_thread")]
async fn the_server_is_read_while_a_burst_waits_to_be_written() {
    let (mut peer, handle, mut rx) = linked().await;
    // Far more than the socket buffers on both sides hold: the link's writes block.
    let big = "x".repeat(8 * 1024);
    let a = "a@localhost/r";
    for i in 0..1000 {
        handle.broadcast(groupchat(&format!("{i}{big}")), vec![full(a)]);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    peer.write_all(format!("<message from='b@localhost/r' to='{ROOM}' type='groupchat'><body>hello</body></message>").as_bytes())
        .await
        .expect("peer writes");
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the link read nothing for 5 s while its writes were blocked")
        .expect("inbound open");
    let link::Inbound::Stanza(Stanza::Message(m)) = got else {
        panic!("expected the message, got {got:?}");
    };
    assert_eq!(m.bodies.values().next().map(String::as_str), Some("hello"));
    let written = count(&handle.state.stanzas_out);
    assert!(
        written < 1000,
        "the writes were meant to be blocked ({written} written)"
    );
}

/// `n` connections up against peers on loopback: the peers' ends (in connection order), the
/// link, what it reads, and the listener (for relinks).
async fn linked_n(
    n: usize,
) -> (
    Vec<TcpStream>,
    link::LinkHandle,
    tokio::sync::mpsc::Receiver<link::Inbound>,
    TcpListener,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = cfg(listener.local_addr().expect("addr").to_string());
    let peers = async {
        let mut peers = Vec::new();
        for _ in 0..n {
            peers.push(accept(&listener).await);
        }
        peers
    };
    let (peers, conns) = tokio::join!(peers, link::connect_all(&config, n));
    let (inbound, rx) = tokio::sync::mpsc::channel(16);
    let handle = link::spawn(config, conns.expect("links up"), inbound);
    (peers, handle, rx, listener)
}

#[tokio::test(flavor = "current_thread")]
async fn with_two_connections_each_person_keeps_to_one_and_a_broadcast_is_split() {
    let (mut peers, handle, _rx, _listener) = linked_n(2).await;
    let sessions: Vec<String> = (0..10)
        .flat_map(|i| ["a", "b"].map(|r| format!("u{i}@localhost/{r}")))
        .collect();
    let all: Vec<FullJid> = sessions.iter().map(|s| full(s)).collect();
    for k in 0..20 {
        handle.broadcast(groupchat(&format!("m{k}")), all.clone());
        if k == 10 {
            handle.send(to("direct", "u3@localhost/a"));
            handle.reply(to("answer", "u4@localhost/b"));
        }
    }
    handle.close().await;
    let mut wires = Vec::new();
    for peer in &mut peers {
        let mut wire = String::new();
        read_until(peer, &mut wire, "</stream:stream>").await;
        wires.push(deliveries(&wire));
    }
    let on = |session: &str| -> Vec<usize> {
        (0..wires.len())
            .filter(|&i| wires[i].iter().any(|(to, _)| to == session))
            .collect()
    };
    for s in &sessions {
        let conns = on(s);
        assert_eq!(conns.len(), 1, "{s} got stanzas over {conns:?}");
        let bare = s.split('/').next().unwrap_or_default();
        assert_eq!(
            on(&format!("{bare}/a")),
            on(&format!("{bare}/b")),
            "one person's sessions share a connection"
        );
        let bodies: Vec<&str> = wires[conns[0]]
            .iter()
            .filter(|(to, _)| to == s)
            .map(|(_, b)| b.as_str())
            .collect();
        let mut want: Vec<String> = (0..20).map(|k| format!("m{k}")).collect();
        match s.as_str() {
            "u3@localhost/a" => want.insert(11, "direct".into()),
            // An answer overtakes broadcasts its connection had not written yet: all of them here.
            "u4@localhost/b" => want.insert(0, "answer".into()),
            _ => {}
        }
        assert_eq!(bodies, want, "{s}: in the order sent");
    }
    assert!(
        wires.iter().all(|w| !w.is_empty()),
        "both connections carry a share"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn occupants_must_rejoin_only_when_every_connection_was_down() {
    let (mut peers, handle, mut rx, listener) = linked_n(2).await;
    let relinks = || count(&handle.state.relinks);
    // One of two lost: the server routed everything over the other meanwhile.
    drop(peers.remove(0));
    let back = tokio::time::timeout(Duration::from_secs(5), accept(&listener))
        .await
        .expect("the lost connection comes back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relinks(), 1);
    assert!(
        rx.try_recv().is_err(),
        "no rejoin while a connection stayed up"
    );
    assert!(handle.state.is_up());
    // Both lost: the server bounced what came for us; occupants must rejoin, once.
    drop(back);
    drop(peers);
    let mut again = Vec::new();
    for _ in 0..2 {
        again.push(
            tokio::time::timeout(Duration::from_secs(5), accept(&listener))
                .await
                .expect("both come back"),
        );
    }
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("told to rejoin");
    assert!(matches!(got, Some(link::Inbound::Relinked)), "{got:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "told once, not once per connection");
    assert_eq!(relinks(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn stanzas_for_one_room_over_two_connections_are_counted_as_misrouted() {
    let (mut peers, handle, mut rx, _listener) = linked_n(2).await;
    let misrouted = || count(&handle.state.misrouted);
    let msg = |to: &str, body: &str| {
        format!("<message from='b@localhost/r' to='{to}' type='groupchat'><body>{body}</body></message>")
    };
    let sends = [
        (0, msg(ROOM, "1")),
        (1, msg("other@rooms.localhost", "2")),
        (0, msg(&format!("{ROOM}/nick"), "3")),
        (1, msg(ROOM, "4")),
    ];
    for (i, (peer, text)) in sends.iter().enumerate() {
        peers[*peer]
            .write_all(text.as_bytes())
            .await
            .expect("peer writes");
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("read");
        assert!(matches!(got, Some(link::Inbound::Stanza(_))), "{got:?}");
        let want = if i < 3 { 0 } else { 1 };
        assert_eq!(misrouted(), want, "after stanza {}", i + 1);
    }
}
