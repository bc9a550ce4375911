#!/usr/bin/env python3
"""Stanza economy: what an occupant receives from a caseroom room and from the server's own MUC, byte
for byte, for the same input (a groupchat message, one MAM result of it, and the presence that tells
an occupant someone joined: a join storm of n people sends n² of those).

Both rooms live on the same server; the client reads raw bytes off its c2s stream, so the figures are
what a client really downloads. Run: python3 benches/stanza_economy.py [prosody|ejabberd ...]
(needs a release build: cargo build --release). Prints each stanza and its size, and the ratio.
"""
import base64
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from harness import Caseroom, XmppServer  # noqa: E402


class Raw:
    def __init__(self, port, user, pw):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        header = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                  b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
        self.s.sendall(header)
        self.until(b"</stream:features>")
        auth = base64.b64encode(f"\0{user}\0{pw}".encode())
        self.s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + auth + b"</auth>")
        self.until(b"success")
        self.s.sendall(header)
        self.until(b"</stream:features>")
        self.s.sendall(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                       b"<resource>r</resource></bind></iq>")
        self.until(b"</iq>")

    def until(self, pat, timeout=10):
        deadline = time.time() + timeout
        while pat not in self.buf:
            self.s.settimeout(max(0.1, deadline - time.time()))
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError(f"closed waiting for {pat!r}: {self.buf[-400:]!r}")
            self.buf += chunk
        i = self.buf.index(pat) + len(pat)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, xml):
        self.s.sendall(xml.encode())

    def join(self, room, nick):
        self.send(f"<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
        self.until(b"</message>")  # the subject ends the join

    def presence_from(self, occupant):
        """The next <presence/> from `occupant` (skipping others)."""
        while True:
            got = self.until(b"</presence>")
            stanza = got[got.rfind(b"<presence"):].decode()
            if f"from='{occupant}'" in stanza or f'from="{occupant}"' in stanza:
                return stanza

    def stanza_with(self, marker):
        """The whole <message/> stanza that contains `marker` (skipping others)."""
        while True:
            got = self.until(b"</message>")
            start = got.rfind(b"<message")
            # A MAM result wraps a <message/> in a <message/>: take the outermost.
            outer = got.find(b"<message")
            if got.count(b"<message") > 1:
                got = got + self.until(b"</message>")
                start = outer
            if marker.encode() in got[start:]:
                return got[start:].decode()


def measure(kind):
    server = XmppServer(kind)
    server.start()
    cr = Caseroom(server, [{"name": "econ", "owners": ["alice@localhost"], "members": ["bob@localhost"]}])
    cr.start()
    rows = []
    try:
        alice = Raw(server.c2s, "alice", "pw-alice")
        bob = Raw(server.c2s, "bob", "pw-bob")
        for room in ("econ@rooms.localhost", "econ@conference.localhost"):
            alice.join(room, "Alice")
            bob.join(room, "Bob")
            arrival = alice.presence_from(f"{room}/Bob")  # bob's arrival
            text = f"economy check {room.split('@')[1].split('.')[0]}"
            alice.send(f"<message type='groupchat' to='{room}' id='m1'><body>{text}</body></message>")
            live = bob.stanza_with(text)
            time.sleep(0.5)
            bob.send(f"<iq type='set' id='q1' to='{room}'><query xmlns='urn:xmpp:mam:2' queryid='f'>"
                     f"<set xmlns='http://jabber.org/protocol/rsm'><max>1</max><before/></set></query></iq>")
            result = bob.stanza_with(text)
            bob.until(b"</iq>")
            rows.append((room, live, result, arrival))
    finally:
        cr.cleanup()
        server.cleanup()
    print(f"== {kind}")
    for room, live, result, arrival in rows:
        print(f"-- {room}\n  live ({len(live.encode())} bytes): {live}\n  MAM  ({len(result.encode())} bytes): {result}"
              f"\n  presence ({len(arrival.encode())} bytes): {arrival}")
    # The two services' domains differ in length (rooms.localhost, conference.localhost): compare with
    # each domain counted as one character, so only what each service chooses to send counts.
    def size(stanza, domain):
        return len(stanza.replace(domain, "D").replace("economy check " + domain.split(".")[0], "T").encode())
    (_, cl, cm, cp), (_, pl, pm, pp) = rows
    c_live, p_live = size(cl, "rooms.localhost"), size(pl, "conference.localhost")
    c_mam, p_mam = size(cm, "rooms.localhost"), size(pm, "conference.localhost")
    print(f"  bytes per delivered message (domains as 1 char): caseroom {c_live} vs {kind} MUC {p_live} "
          f"= {c_live / p_live:.2f}x (target <= 1.0)")
    print(f"  bytes per MAM result (domains as 1 char):        caseroom {c_mam} vs {kind} MUC {p_mam} "
          f"= {c_mam / p_mam:.2f}x")
    c_pres, p_pres = size(cp, "rooms.localhost"), size(pp, "conference.localhost")
    print(f"  bytes per join presence (domains as 1 char):     caseroom {c_pres} vs {kind} MUC {p_pres} "
          f"= {c_pres / p_pres:.2f}x")


if __name__ == "__main__":
    for k in sys.argv[1:] or ["prosody", "ejabberd"]:
        measure(k)
