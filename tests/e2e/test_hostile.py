"""End-to-end, hostile input (SECURITY.md): the release binary behind a real Prosody and ejabberd,
attacked through the same doors a stranger on the network has. Every test ends by checking that
caseroom is still alive, healthy, and serving the room."""
import asyncio
import socket
import time

from harness import Caseroom, Client, body, error_condition
from test_core import ROOM, ROOM_JID, ROOMS, is_msg, mam_page, run
from test_webhooks import TRACKERS, fixture, signed


async def still_serving(cr, member, text):
    """caseroom is alive, /healthz is 200 and a member's message still goes round."""
    assert cr.proc.poll() is None, f"caseroom exited:\n{cr.log.read_text()[-3000:]}"
    assert cr.health() == 200
    member.raw(f"<message to='{ROOM_JID}' type='groupchat' id='{text}'><body>{text}</body></message>")
    await member.expect(is_msg(text), timeout=10)


def deep(levels, stanza_id, to=ROOM_JID):
    return (f"<message to='{to}' type='groupchat' id='{stanza_id}'><body>deep</body>"
            + "<a>" * levels + "</a>" * levels + "</message>")


# Nesting depths per server: (levels, the answer caseroom must give). Prosody forwards 10k levels
# (70 KB) and closes a client that sends 100k (700 KB, over its 256 KiB stanza limit) before anything
# reaches us. ejabberd 23.01 itself dies on 5,000 levels from any client to any address (its own
# parser; see SECURITY.md), so 1,000 levels — 15× caseroom's limit — is as deep as it can be tested
# there; caseroom's own bound is proven at 100k levels in `xmpp::link::guard`'s unit tests.
DEPTHS = {"prosody": [(10_000, "policy-violation"), (100_000, None)],
          "ejabberd": [(1_000, "policy-violation")]}


def test_deeply_nested_stanzas_are_refused_not_fatal(server):
    """From a non-member and from a member: a policy-violation error, or, where the XMPP server
    itself refuses such a stanza, silence — never a crash, and the room keeps working."""
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            alice = await Client("alice", server).start()
            await alice.join(ROOM, "Alice")
            for user, joined in (("dave", False), ("bob", True)):
                for levels, answer in DEPTHS[server.kind]:
                    c = await Client(user, server, resource=f"deep{levels}").start()
                    if joined:
                        await c.join(ROOM, f"{user}{levels}")
                    sid = f"deep-{user}-{levels}"
                    c.raw(deep(levels, sid))
                    if answer:
                        err = await c.expect(lambda e: e.get("id") == sid and e.get("type") == "error", timeout=10)
                        assert error_condition(err) == answer, error_condition(err)
                        text = err.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}text")
                        assert text is not None and "nested deeper than 64 levels" in text.text
                    else:
                        await asyncio.sleep(2)
                    await c.close()
                    await still_serving(cr, alice, f"after-{user}-{levels}")
            assert cr.health_json()["refused"] >= sum(1 for _, a in DEPTHS[server.kind] if a) * 2
            await alice.close()
        finally:
            cr.cleanup()
    run(go(), timeout=240)


def test_slow_http_clients_cannot_hold_the_listener(server):
    """2,000 connections that send a request line and one header, then nothing: a valid signed
    delivery still gets 202 within a second, and the slow ones are closed within 30 s."""
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start(env={"CASEROOM_HTTP_MAX_BODY_BYTES": "200000"})
        slow = []
        try:
            for _ in range(2000):
                s = socket.create_connection(("127.0.0.1", cr.http))
                s.sendall(b"POST /hooks/forge HTTP/1.1\r\nHost: caseroom\r\n")
                s.setblocking(False)
                slow.append(s)
            issue = fixture("issues.opened.json")
            t0 = time.monotonic()
            status, answer = cr.post("forge", issue, signed(issue, "issues", "slow-1"))
            took = time.monotonic() - t0
            assert status == 202, answer
            assert took < 1.0, f"valid delivery took {took:.2f}s during the attack"
            deadline = time.monotonic() + 30
            open_ = list(slow)
            while open_ and time.monotonic() < deadline:
                still = []
                for s in open_:
                    try:
                        if s.recv(4096) == b"":
                            continue  # closed by caseroom
                        still.append(s)  # an error response; wait for the close
                    except BlockingIOError:
                        still.append(s)
                    except OSError:
                        continue  # reset: closed
                open_ = still
                await asyncio.sleep(0.5)
            assert not open_, f"{len(open_)} slow connections still open after 30 s"
            assert cr.health() == 200
        finally:
            for s in slow:
                s.close()
            cr.cleanup()
    run(go(), timeout=120)


def test_after_the_server_restarts_a_rejoin_is_a_join(server):
    """The XMPP server restarts under caseroom: the link comes back by itself, and a client that
    rejoins from the same full JID gets a real join (self-presence, then the subject), not the
    silent presence update a stale occupant list would give."""
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            alice = await Client("alice", server).start()
            await alice.join(ROOM, "Alice")
            server.stop()
            deadline = time.monotonic() + 10
            while cr.health() == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert cr.health() == 503, "/healthz reports the lost link"
            server.start()
            t0 = time.monotonic()
            while cr.health() != 200 and time.monotonic() - t0 < 20:
                await asyncio.sleep(0.1)
            assert cr.health() == 200, "relinked"
            again = await Client("alice", server).start()  # same full JID: alice@localhost/e2e
            await again.join(ROOM, "Alice")  # waits for the subject, which only a join sends
            again.raw(f"<message to='{ROOM_JID}' type='groupchat' id='back'><body>back</body></message>")
            await again.expect(is_msg("back"))
            assert cr.health_json()["relinks"] >= 1
            await again.close()
        finally:
            cr.cleanup()
    run(go(), timeout=120)


def test_a_captured_delivery_replayed_with_a_fresh_id_is_posted_once(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start(env={"CASEROOM_HTTP_MAX_BODY_BYTES": "200000"})
        try:
            a = await Client("alice", server).start()
            await a.join(ROOM, "Alice")
            issue = fixture("issues.opened.json")
            assert cr.post("forge", issue, signed(issue, "issues", "orig-1"))[0] == 202
            await a.expect(lambda e: (body(e) or "").startswith("[Codertocat/Hello-World] Codertocat opened #1"))
            # The attacker has the signed body and signature, and picks a new delivery id.
            status, answer = cr.post("forge", issue, signed(issue, "issues", "replay-2"))
            assert status == 200 and answer.get("duplicate") is True, (status, answer)
            bodies, _, _ = await mam_page(a, "replay", "<max>50</max>")
            assert len([b for b in bodies if "opened #1" in b]) == 1, bodies
            await a.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_message_flood_is_slowed_down_and_others_keep_talking(server):
    """One member sends 60 messages at once: the first 30 (muc.message_burst) go through, the rest are
    refused with policy-violation and a reason, while another member's messages keep flowing."""
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            alice = await Client("alice", server).start()
            bob = await Client("bob", server).start()
            await alice.join(ROOM, "Alice")
            await bob.join(ROOM, "Bob")
            for i in range(60):
                bob.raw(f"<message to='{ROOM_JID}' type='groupchat' id='flood{i}'><body>flood {i}</body></message>")
            refused = 0
            for i in range(60):
                got = await bob.expect(lambda e, i=i: e.get("id") == f"flood{i}", timeout=10)
                if got.get("type") == "error":
                    assert error_condition(got) == "policy-violation", error_condition(got)
                    refused += 1
            assert 20 <= refused <= 30, f"{refused} of 60 refused (burst 30, refill 2/s)"
            rtts = []
            for i in range(20):
                t0 = time.monotonic()
                alice.raw(f"<message to='{ROOM_JID}' type='groupchat' id='calm{i}'><body>calm {i}</body></message>")
                await alice.expect(is_msg(f"calm {i}"), timeout=5)
                rtts.append(time.monotonic() - t0)
            rtts.sort()
            print(f"{server.kind}: {refused}/60 flood messages refused; alice's round trip p50 "
                  f"{rtts[10] * 1000:.1f} ms, max {rtts[-1] * 1000:.1f} ms")
            assert rtts[-1] < 1.0
            for c in (alice, bob):
                await c.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_server_that_stops_reading_marks_the_link_down(server):
    """The XMPP server freezes (SIGSTOP) while caseroom has a lot to send: once a write has waited
    component.write_timeout (2 s here), /healthz says 503 instead of "up" forever; when the server
    resumes, caseroom relinks by itself."""
    import json
    import os
    import signal as sig

    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS)
        try:
            cr.start(env={"CASEROOM_HTTP_MAX_BODY_BYTES": "200000", "CASEROOM_COMPONENT_WRITE_TIMEOUT": "2s"})
            clients = []
            for user in ("alice", "bob", "carol"):
                c = await Client(user, server).start()
                await c.join(ROOM, user.capitalize())
                clients.append(c)
            pgid = int((server.dir and open(os.path.join(server.dir, "server.pid")).read()).strip())
            os.killpg(pgid, sig.SIGSTOP)
            try:
                base = json.loads(fixture("issues.opened.json"))
                frozen_at = None
                t0 = time.monotonic()
                for n in range(3000):
                    base["issue"]["number"] = 1000 + n
                    data = json.dumps(base).encode()
                    assert cr.post("forge", data, signed(data, "issues", f"stall-{n}"))[0] == 202
                    if n % 50 == 0 and cr.health() == 503:
                        frozen_at = time.monotonic() - t0
                        break
                deadline = time.monotonic() + 10
                while frozen_at is None and time.monotonic() < deadline:
                    if cr.health() == 503:
                        frozen_at = time.monotonic() - t0
                    await asyncio.sleep(0.1)
                assert frozen_at is not None, "/healthz still says up while the server takes nothing"
                assert cr.proc.poll() is None
            finally:
                os.killpg(pgid, sig.SIGCONT)
            deadline = time.monotonic() + 30
            while cr.health() != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert cr.health() == 200, "relinked after the server resumed"
            print(f"{server.kind}: link marked down {frozen_at:.1f} s after the server froze")
            for c in clients:
                await c.close()
        finally:
            cr.cleanup()
    run(go(), timeout=120)
