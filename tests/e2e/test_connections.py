"""End-to-end: several component connections from one caseroom (`component.connections`).

On ejabberd with domain_balancing by bare destination, each room's stanzas come over one connection
and each person's go out over one, so chat in every room arrives whole and in order. On an ejabberd
that spreads a room over the connections (no domain_balancing) caseroom says so, in its log and
metrics. Prosody accepts one connection per component: a second is a clear error at start."""
import asyncio

import pytest

from harness import DOMAIN, Caseroom, Client, XmppServer, body
from test_core import run  # noqa: F401

ROOMS = [{"name": f"c{i}", "title": f"Room {i}", "owners": ["alice@localhost"], "admins": [],
          "members": ["bob@localhost", "carol@localhost"]} for i in range(8)]
MESSAGES = 25
# 8 rooms × 25 messages from one person at once: past muc.message_burst (30), so no rate limit here.
UNLIMITED = "[muc]\nmessages_per_minute = 100000\nmessage_burst = 100000\n"


def with_connections(cr, n):
    cr.config.write_text(cr.config.read_text().replace("ping_interval_secs = 20\n",
                                                       f"ping_interval_secs = 20\nconnections = {n}\n"))
    return cr


@pytest.fixture(scope="module")
def balanced():
    srv = XmppServer("ejabberd", balancing=True)
    srv.start()
    yield srv
    srv.cleanup()


async def chat_everywhere(server, tag):
    """alice and bob (two sessions) in every room; alice sends MESSAGES into each, interleaved."""
    a = await Client("alice", server).start()
    b1 = await Client("bob", server, resource="one").start()
    b2 = await Client("bob", server, resource="two").start()
    for r in ROOMS:
        await a.join(r["name"], "Alice")
        await b1.join(r["name"], "Bob")
        await b2.join(r["name"], "Bob")
    for i in range(MESSAGES):
        for r in ROOMS:
            a.raw(f"<message to='{r['name']}@{DOMAIN}' type='groupchat' id='{tag}-{r['name']}-{i}'>"
                  f"<body>{tag} {r['name']} {i}</body></message>")
    return a, b1, b2


def test_two_connections_keep_every_room_whole_and_in_order(balanced):
    async def go():
        cr = with_connections(Caseroom(balanced, ROOMS, extra=UNLIMITED), 2).start()
        try:
            m, _ = cr.metrics()
            assert m["caseroom_link_connections_up"] == 2 and m["caseroom_link_up"] == 1, m
            a, b1, b2 = await chat_everywhere(balanced, "ord")
            for b in (b1, b2):
                for r in ROOMS:
                    last = f"ord {r['name']} {MESSAGES - 1}"
                    await b.expect(lambda e, last=last: body(e) == last, timeout=20, what=last)
            for b in (b1, b2):
                got = {}
                for e in b.received:
                    text = body(e) or ""
                    if text.startswith("ord "):
                        _, room, i = text.split()
                        got.setdefault(room, []).append(int(i))
                # The last one of each room was taken by expect(): all before it, once, in order.
                for r in ROOMS:
                    assert got.get(r["name"]) == list(range(MESSAGES - 1)), (r["name"], got.get(r["name"]))
            m, _ = cr.metrics()
            assert m["caseroom_link_misrouted_total"] == 0, "ejabberd kept each room on one connection"
            assert m["caseroom_link_dropped_total"] == 0
            for c in (a, b1, b2):
                await c.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_server_spreading_a_room_over_connections_is_reported():
    """ejabberd without domain_balancing picks a connection per stanza, not per room."""
    srv = XmppServer("ejabberd")
    srv.start()
    try:
        async def go():
            cr = with_connections(Caseroom(srv, ROOMS, extra=UNLIMITED), 2).start()
            try:
                a, b1, b2 = await chat_everywhere(srv, "spread")
                misrouted = 0
                for _ in range(100):
                    m, _ = cr.metrics()
                    misrouted = m.get("caseroom_link_misrouted_total", 0)
                    if misrouted >= 8:
                        break
                    await asyncio.sleep(0.1)
                assert misrouted >= 8, misrouted
                log = cr.log.read_text()
                assert "bare_destination" in log and "component.connections = 1" in log, log[-2000:]
                for c in (a, b1, b2):
                    await c.close()
            finally:
                cr.cleanup()
        run(go())
    finally:
        srv.cleanup()


def test_prosody_refuses_a_second_connection_and_caseroom_says_what_to_set():
    srv = XmppServer("prosody")
    srv.start()
    try:
        cr = with_connections(Caseroom(srv, ROOMS), 2)
        try:
            cr.start(wait=False)
            assert cr.proc.wait(20) != 0
            log = cr.log.read_text()
            assert "component.connections = 2: connection 2 of 2 failed" in log, log[-2000:]
            assert "set component.connections = 1" in log
        finally:
            cr.cleanup()
    finally:
        srv.cleanup()
