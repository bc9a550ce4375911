"""End-to-end: two caseroom instances as one component on ejabberd (domain_balancing by bare
destination) sharing a PostgreSQL store. Each room is served by one of them; chat works in every
room; a tracker event posted at either instance reaches its room once, in MAM once and in order."""
import asyncio
import hashlib
import hmac
import json
import signal
import time

import pytest

from harness import DOMAIN, Caseroom, Client, XmppServer, body, store_url
from test_core import mam_query, run  # noqa: F401

ROOMS = [{"name": f"r{i}", "title": f"Room {i}", "owners": ["alice@localhost"], "admins": [],
          "members": ["bob@localhost"]} for i in range(12)]
SECRET = "as2-secret-0123456789"
TRACKER = f'''
[[tracker]]
name = "feed"
kind = "activitystreams"
secret = "{SECRET}"
bot_nick = "Feed"
'''


@pytest.fixture(scope="module")
def ejabberd():
    srv = XmppServer("ejabberd", balancing=True)
    srv.start()
    yield srv
    srv.cleanup()


def activity(room, n):
    """An Activity Streams 2.0 note to `room` (caseroom's generic format, README)."""
    doc = {"@context": "https://www.w3.org/ns/activitystreams", "type": "Create",
           "actor": {"type": "Person", "name": "Ann"},
           "object": {"type": "Page", "name": f"event {n} for {room}", "url": f"https://example.org/e/{n}"},
           "to": [room]}
    raw = json.dumps(doc).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return raw, {"X-Hub-Signature-256": sig, "X-Caseroom-Delivery": f"d-{n}"}


def occupants(cr):
    m, _ = cr.metrics()
    return m.get("caseroom_occupants", 0)


def test_two_instances_share_the_rooms_and_post_each_event_once(ejabberd):
    async def go():
        url = store_url(force=True)
        one = Caseroom(ejabberd, ROOMS, extra=TRACKER, url=url).start()
        two = Caseroom(ejabberd, ROOMS, extra=TRACKER, url=url).start()
        try:
            a = await Client("alice", ejabberd).start()
            b = await Client("bob", ejabberd).start()
            for r in ROOMS:
                await a.join(r["name"], "Alice")
                await b.join(r["name"], "Bob")
            # The rooms are split between the instances: each has occupants (counted each second).
            await asyncio.sleep(1.5)
            split = (occupants(one), occupants(two))
            assert split[0] > 0 and split[1] > 0 and sum(split) == 2 * len(ROOMS), split
            # Chat in every room reaches the other occupant.
            for r in ROOMS:
                a.raw(f"<message to='{r['name']}@{DOMAIN}' type='groupchat' id='c-{r['name']}'>"
                      f"<body>hello {r['name']}</body></message>")
            for r in ROOMS:
                await b.expect(lambda e, r=r: body(e) == f"hello {r['name']}", timeout=10, what=f"chat in {r['name']}")
            # Events accepted by either instance reach their room once, through its owner.
            for n, r in enumerate(ROOMS):
                raw, headers = activity(r["name"], n)
                st, _ = (one if n % 2 else two).post("feed", raw, headers)
                assert st == 202, st
            for n, r in enumerate(ROOMS):
                await b.expect(lambda e, r=r, n=n: f"Ann" in (body(e) or "") and f"event {n} for {r['name']}" in (body(e) or "")
                               and e.get("from") == f"{r['name']}@{DOMAIN}/Feed", timeout=15, what=f"event in {r['name']}")
            await asyncio.sleep(1)
            events = [e for e in b.received if "event " in (body(e) or "")]
            assert events == [], f"posted twice: {[body(e) for e in events]}"
            # Each room's archive holds its chat line and its event, once, in order.
            for n, r in enumerate(ROOMS):
                qid = f"q{n}"
                fin = await b.iq(mam_query(qid, f"iq-{qid}").replace(f"webteam@{DOMAIN}", f"{r['name']}@{DOMAIN}"),
                                 f"iq-{qid}", timeout=10)
                assert fin.get("type") == "result", fin
                got = [body(res.find("{urn:xmpp:forward:0}forwarded/{jabber:client}message")) or ""
                       for e in b.received if (res := e.find("{urn:xmpp:mam:2}result")) is not None
                       and res.get("queryid") == qid]
                assert got[0] == f"hello {r['name']}" and f"event {n} for" in got[1] and len(got) == 2, got
            await a.close()
            await b.close()
        finally:
            one.cleanup()
            two.cleanup()
    run(go(), timeout=120)


def test_an_instance_killed_its_rooms_go_on_without_rejoining(ejabberd):
    """Two active instances and a standby (store.instances = 2, ejabberd's component_number). kill -9
    an active one: the standby takes its place within a second, reads who is in its rooms from the
    store, and every occupant receives again within 5 s without rejoining; events are posted once;
    MAM is complete. The killed instance comes back as the new standby."""
    async def go():
        url = store_url(force=True)
        extra = TRACKER + "\n"
        one = Caseroom(ejabberd, ROOMS, extra=extra, url=url)
        two = Caseroom(ejabberd, ROOMS, extra=extra, url=url)
        spare = Caseroom(ejabberd, ROOMS, extra=extra, url=url)
        for cr in (one, two, spare):
            cr.config.write_text(cr.config.read_text().replace(f'url = "{url}"', f'url = "{url}"\ninstances = 2'))
        try:
            one.start()
            two.start()
            spare.start(wait=False)
            await wait_log(spare, "standby")
            a = await Client("alice", ejabberd).start()
            b = await Client("bob", ejabberd).start()
            for r in ROOMS:
                await a.join(r["name"], "Alice")
                await b.join(r["name"], "Bob")
            await asyncio.sleep(1.5)
            before = (occupants(one), occupants(two))
            assert before[0] > 0 and before[1] > 0, before
            one.stop(signal.SIGKILL)
            t0 = time.time()
            b.received.clear()
            # Every room answers again: alice's messages reach bob, who never rejoined. What was in
            # flight to the dead instance when it died is lost (as with any server dying); alice
            # says it again every half second until it arrives.
            recovered = {}
            k = 0
            while len(recovered) < len(ROOMS) and time.time() - t0 < 10:
                for r in ROOMS:
                    if r["name"] not in recovered:
                        a.raw(f"<message to='{r['name']}@{DOMAIN}' type='groupchat' id='k-{r['name']}-{k}'>"
                              f"<body>after {r['name']} {k}</body></message>")
                k += 1
                await asyncio.sleep(0.5)
                for e in b.received:
                    text = body(e) or ""
                    for r in ROOMS:
                        if text.startswith(f"after {r['name']} ") and r["name"] not in recovered:
                            recovered[r["name"]] = time.time() - t0
            missing = {r["name"] for r in ROOMS} - set(recovered)
            assert not missing, f"rooms that never answered again: {missing}"
            took = max(recovered.values())
            print(f"failover: every room answered again {took:.2f} s after the kill")
            assert took < 5, f"occupants received again after {took:.1f} s: {recovered}"
            assert [e for e in a.received if e.get("type") == "error"] == []
            spare.wait_healthy()
            # Events at the other active instance reach every room once.
            for n, r in enumerate(ROOMS):
                raw, headers = activity(r["name"], 100 + n)
                assert two.post("feed", raw, headers)[0] == 202
            for n, r in enumerate(ROOMS):
                await b.expect(lambda e, r=r, n=n: f"event {100 + n} for {r['name']}" in (body(e) or ""),
                               timeout=15, what=f"event in {r['name']}")
            await asyncio.sleep(1)
            assert not [e for e in b.received if "event 1" in (body(e) or "")], "posted twice"
            # Each room's archive: the event once, after the chat lines.
            for n, r in enumerate(ROOMS):
                qid = f"k{n}"
                fin = await b.iq(mam_query(qid, f"iq-{qid}").replace(f"webteam@{DOMAIN}", f"{r['name']}@{DOMAIN}"),
                                 f"iq-{qid}", timeout=10)
                assert fin.get("type") == "result", fin
                got = [body(res.find("{urn:xmpp:forward:0}forwarded/{jabber:client}message")) or ""
                       for e in b.received if (res := e.find("{urn:xmpp:mam:2}result")) is not None
                       and res.get("queryid") == qid]
                events = [g for g in got if f"event {100 + n} for" in g]
                assert len(events) == 1 and got[-1] == events[0], got
            # The killed instance comes back, as the standby now.
            one.start(wait=False)
            await wait_log(one, "standby")
            await a.close()
            await b.close()
        finally:
            for cr in (one, two, spare):
                cr.cleanup()
    run(go(), timeout=180)


async def wait_log(cr, text, timeout=20):
    deadline = time.time() + timeout
    while text not in cr.log.read_text():
        assert time.time() < deadline, f"no {text!r} in the log:\n{cr.log.read_text()[-2000:]}"
        await asyncio.sleep(0.2)
