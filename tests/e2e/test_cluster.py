"""End-to-end: two caseroom instances as one component on ejabberd (domain_balancing by bare
destination) sharing a PostgreSQL store. Each room is served by one of them; chat works in every
room; a tracker event posted at either instance reaches its room once, in MAM once and in order."""
import asyncio
import hashlib
import hmac
import http.client
import json
import signal
import subprocess
import threading
import time

import pytest

from harness import DOMAIN, Caseroom, Client, XmppServer, body, store_url
from test_core import run  # noqa: F401

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


def activity(room, n, to=None):
    """An Activity Streams 2.0 note to `room` (or to the rooms `to`; caseroom's generic format, README)."""
    doc = {"@context": "https://www.w3.org/ns/activitystreams", "type": "Create",
           "actor": {"type": "Person", "name": "Ann"},
           "object": {"type": "Page", "name": f"event {n} for {room}", "url": f"https://example.org/e/{n}"},
           "to": to or [room]}
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
            await heard_of_the_others(one)
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
                got = await archive(b, r["name"], f"q{n}")
                assert got[0] == f"hello {r['name']}" and f"event {n} for" in got[1] and len(got) == 2, got
            # One delivery for every room, so for both instances: posted once in each, and done in
            # the shared inbox once the last room's message is archived, whichever instance that is.
            b.received.clear()
            raw, headers = activity("all", 500, to=[r["name"] for r in ROOMS])
            assert one.post("feed", raw, headers)[0] == 202
            for r in ROOMS:
                await b.expect(lambda e, r=r: "event 500 for all" in (body(e) or "")
                               and e.get("from") == f"{r['name']}@{DOMAIN}/Feed", timeout=15, what=f"event in {r['name']}")
            pending = None
            for _ in range(50):
                pending = subprocess.run(["psql", url, "-Atc", "SELECT count(*) FROM inbox WHERE state = 'pending'"],
                                         check=True, capture_output=True, text=True).stdout.strip()
                if pending == "0":
                    break
                await asyncio.sleep(0.1)
            assert pending == "0", f"{pending} deliveries still pending"
            await asyncio.sleep(1)
            again = [e for e in b.received if "event 500 for all" in (body(e) or "")]
            assert again == [], f"posted twice: {[e.get('from') for e in again]}"
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
    MAM is complete. The killed instance comes back as the new standby and, when the other
    active instance is killed in turn, takes a share of the rooms again."""
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
            await heard_of_the_others(one)
            a = await Client("alice", ejabberd).start()
            b = await Client("bob", ejabberd).start()
            for r in ROOMS:
                await a.join(r["name"], "Alice")
                await b.join(r["name"], "Bob")
            await asyncio.sleep(1.5)
            before = (occupants(one), occupants(two))
            assert before[0] > 0 and before[1] > 0, before
            took = await kill_and_hear_every_room(one, a, b, "k")
            print(f"failover: every room answered again {took:.2f} s after the kill")
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
                got = await archive(b, r["name"], f"k{n}")
                events = [g for g in got if f"event {100 + n} for" in g]
                assert len(events) == 1 and got[-1] == events[0], got
            # The killed instance comes back, as the standby now, and takes a share again when
            # the next active instance dies: its rooms' occupants receive again within 5 s.
            one.start(wait=False)
            await wait_log(one, "standby")
            took = await kill_and_hear_every_room(two, a, b, "m")
            print(f"second failover, onto the instance that came back: {took:.2f} s")
            one.wait_healthy()
            # Both serve rooms, each room from one of them: the occupants gauge counts the
            # occupants of the rooms an instance read since the linked instances last changed.
            # An instance hears of a change up to about 2 s late (its store poll each second,
            # then its next tick), and a room it served until the server moved it goes cold then
            # (until then it is counted on both); so the rooms are used again, up to three
            # times, until each instance holds a share and the shares add up.
            split, shared = (0, 0), lambda s: s[0] > 0 and s[1] > 0 and sum(s) == 2 * len(ROOMS)
            for round_ in range(3):
                await hear_every_room(a, b, f"s{round_}")
                await asyncio.sleep(1.5)  # the occupants gauge is refreshed every second
                split = (occupants(one), occupants(spare))
                if shared(split):
                    break
            assert shared(split), split
            await a.close()
            await b.close()
        finally:
            for cr in (one, two, spare):
                cr.cleanup()
    run(go(), timeout=180)


async def kill_and_hear_every_room(victim, a, b, tag):
    """kill -9 `victim`, then alice speaks in every room until bob (who never rejoined) hears her
    there: what was in flight to the dead instance when it died is lost (as with any server
    dying), so she says it again every half second. Asserts every room answered within 5 s of the
    kill and nothing bounced; returns the slowest room's time."""
    victim.stop(signal.SIGKILL)
    return await hear_every_room(a, b, tag)


async def hear_every_room(a, b, tag):
    """Alice speaks in every room, again every half second where bob has not heard her yet, until
    he has heard her in each; asserts each room answered within 5 s and nothing bounced, and
    returns the slowest room's time."""
    t0 = time.time()
    b.received.clear()
    recovered = {}
    k = 0
    while len(recovered) < len(ROOMS) and time.time() - t0 < 10:
        for r in ROOMS:
            if r["name"] not in recovered:
                a.raw(f"<message to='{r['name']}@{DOMAIN}' type='groupchat' id='{tag}-{r['name']}-{k}'>"
                      f"<body>after {tag} {r['name']} {k}</body></message>")
        k += 1
        await asyncio.sleep(0.5)
        for e in b.received:
            text = body(e) or ""
            for r in ROOMS:
                if text.startswith(f"after {tag} {r['name']} ") and r["name"] not in recovered:
                    recovered[r["name"]] = time.time() - t0
    missing = {r["name"] for r in ROOMS} - set(recovered)
    assert not missing, f"rooms that never answered again: {missing}"
    took = max(recovered.values())
    assert took < 5, f"occupants received again after {took:.1f} s: {recovered}"
    assert [e for e in a.received if e.get("type") == "error"] == []
    return took


async def archive(b, room, tag):
    """The bodies in `room`'s whole archive, oldest first, as `b` pages through it (MAM with RSM,
    100 a page); each result is taken out of `b.received`."""
    got, after = [], None
    for page in range(40):
        qid = f"{tag}p{page}"
        rsm = "<set xmlns='http://jabber.org/protocol/rsm'><max>100</max>" + (f"<after>{after}</after>" if after else "") + "</set>"
        q = (f"<iq type='set' id='iq-{qid}' to='{room}@{DOMAIN}'><query xmlns='urn:xmpp:mam:2' queryid='{qid}'>"
             f"{rsm}</query></iq>")
        fin = await b.iq(q, f"iq-{qid}", timeout=15)
        assert fin.get("type") == "result", fin
        results = [e.find("{urn:xmpp:mam:2}result") for e in b.received]
        results = [res for res in results if res is not None and res.get("queryid") == qid]
        got += [body(res.find("{urn:xmpp:forward:0}forwarded/{jabber:client}message")) or "" for res in results]
        b.received = [e for e in b.received if e.find("{urn:xmpp:mam:2}result") is None]
        last = fin.find("{urn:xmpp:mam:2}fin/{http://jabber.org/protocol/rsm}set/{http://jabber.org/protocol/rsm}last")
        if fin.find("{urn:xmpp:mam:2}fin").get("complete") in ("true", "1") or last is None:
            break
        after = last.text
    return got


async def heard_of_the_others(first):
    """The instance started first has heard that the second linked (about a second later): its
    rooms went cold then, and are read again when next used. Joins before that would be forgotten
    by its occupants gauge until the rooms are used again (the store keeps them), so the tests that
    count occupants per instance let the instances settle first."""
    await wait_log(first, "rooms are read again from the store")


async def wait_log(cr, text, timeout=20):
    deadline = time.time() + timeout
    while text not in cr.log.read_text():
        assert time.time() < deadline, f"no {text!r} in the log:\n{cr.log.read_text()[-2000:]}"
        await asyncio.sleep(0.2)


HOOKS_PER_SECOND = 200
CHAT_PER_SECOND = 100
LOAD_SECONDS = 8


class Balancer:
    """The webhook sender behind an HTTP load balancer, open loop: delivery i is due at
    t0 + i / rate whatever the answers, so a slow or dead instance does not slow the offered load.
    Each delivery goes to the instances in turn, starting at i mod n; one that refuses or resets the
    connection (the killed instance, the standby before it is active) is skipped, and the same
    delivery, with the same delivery id, goes to the next, as a balancer's retry would."""

    # Workers enough that the answers' latency does not bound the offered load: 8 blocking workers
    # cap it at 8 / latency, and on a saturated 2-core machine (POST p50 41 ms, p99 145 ms in one
    # CI run) that was 161/s of the 200/s asked, failing the "generator fell behind" check.
    def __init__(self, instances, rate, seconds, workers=24):
        self.instances, self.rate, self.seconds = instances, rate, seconds
        self.lock = threading.Lock()
        self.next = 0
        self.acked, self.failed, self.late, self.latency = [], [], 0, []
        self.threads = [threading.Thread(target=self.work) for _ in range(workers)]

    def start(self):
        self.t0 = time.time()
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()

    def post(self, conns, cr, raw, headers):
        conn = conns.get(cr.http) or http.client.HTTPConnection("127.0.0.1", cr.http, timeout=3)
        conns[cr.http] = conn
        try:
            conn.request("POST", "/hooks/feed", body=raw, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            conn.close()
            del conns[cr.http]
            return None

    def work(self):
        conns = {}
        while True:
            with self.lock:
                i = self.next
                self.next += 1
            due = self.t0 + i / self.rate
            if due >= self.t0 + self.seconds:
                break
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.1:
                self.late += 1
            r = ROOMS[i % len(ROOMS)]["name"]
            raw, headers = activity(r, i)
            n = len(self.instances)
            sent = time.time()
            for k in range(n):
                status = self.post(conns, self.instances[(i + k) % n], raw, headers)
                if status is not None:
                    break
            self.latency.append(time.time() - sent)
            if status is not None and 200 <= status < 300:
                self.acked.append((r, i))
            else:
                self.failed.append((i, status))


# Chat messages sent this close to the kill (by number, at CHAT_PER_SECOND) may be archived by the
# killed instance without having been reflected.
KILL_WINDOW = 50


def test_failover_under_load_loses_and_doubles_nothing_acknowledged(ejabberd):
    """The failover again, under load: webhooks at 200/s spread over every instance (a load
    balancer's way) and chat at 100 messages/s while an active instance is killed. Every room
    answers again within 5 s of the kill (alice's messages reflected in each). Every delivery
    answered 2xx is in its room's archive exactly once; every message alice saw reflected is archived
    once; each archive is in order (sequence numbers increase with the messages' order of
    reflection), and holds nothing else but messages the killed instance archived just before it died; the load was offered at the asked rates and all but the few deliveries in flight at
    the killed instance were acknowledged."""

    async def go():
        url = store_url(force=True)
        crs = [Caseroom(ejabberd, ROOMS, extra=TRACKER, url=url) for _ in range(3)]
        for cr in crs:
            cr.config.write_text(cr.config.read_text().replace(f'url = "{url}"', f'url = "{url}"\ninstances = 2'))
        one, two, spare = crs
        try:
            env = {"CASEROOM_MUC_MESSAGE_BURST": "100000", "CASEROOM_MUC_MESSAGES_PER_MINUTE": "100000"}
            one.start(env=env)
            two.start(env=env)
            spare.start(wait=False, env=env)
            await wait_log(spare, "standby")
            await heard_of_the_others(one)
            a = await Client("alice", ejabberd).start()
            b = await Client("bob", ejabberd).start()
            for r in ROOMS:
                await a.join(r["name"], "Alice")
                await b.join(r["name"], "Bob")
            hooks = Balancer(crs, HOOKS_PER_SECOND, LOAD_SECONDS)
            hooks.start()
            t0 = hooks.t0
            k = 0
            killed = None  # (when, the last message sent before)
            recovered, scanned = {}, 0  # room → seconds from the kill to its first reflection after

            def scan():
                nonlocal scanned
                for e in a.received[scanned:]:
                    words = (body(e) or "").split()
                    if len(words) == 3 and words[0] == "load" and int(words[2]) > killed[1]:
                        recovered.setdefault(words[1], time.time() - killed[0])
                scanned = len(a.received)

            # Chat, open loop too: every message due by now is sent, then a sleep until the next.
            while time.time() - t0 < LOAD_SECONDS:
                while k < (time.time() - t0) * CHAT_PER_SECOND:
                    r = ROOMS[k % len(ROOMS)]["name"]
                    a.raw(f"<message to='{r}@{DOMAIN}' type='groupchat' id='load-{k}'><body>load {r} {k}</body></message>")
                    k += 1
                if killed is None and time.time() - t0 > 3:
                    one.stop(signal.SIGKILL)
                    killed = (time.time(), k - 1)
                if killed is not None:
                    scan()
                await asyncio.sleep(max(0.0, t0 + (k + 1) / CHAT_PER_SECOND - time.time()))
            chat_rate = k / (time.time() - t0)
            scan()
            # Every room answers again within 5 s of the kill, under the load: alice sees her own
            # messages sent after it reflected in every room.
            slowest = max(recovered.values(), default=None)
            print(f"under load, every room answered again within {slowest:.2f} s of the kill")
            assert len(recovered) == len(ROOMS), f"rooms silent after the kill: {len(recovered)} of {len(ROOMS)} answered"
            assert slowest < 5, recovered
            await asyncio.get_running_loop().run_in_executor(None, hooks.join)
            acked = hooks.acked
            rate = len(acked) / (time.time() - t0)
            lat = sorted(hooks.latency)
            print(f"POST latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, p99 {lat[len(lat) * 99 // 100] * 1000:.1f} ms, "
                  f"max {lat[-1] * 1000:.1f} ms; generator CPU {time.process_time():.1f} s")
            # Deliveries the killed instance accepted and had not posted are replayed by the leader.
            await asyncio.sleep(14)
            reflected = {}
            for e in a.received:
                text = body(e) or ""
                if text.startswith("load "):
                    reflected.setdefault(text.split()[1], []).append(text)
            b.received.clear()
            missing, doubled, disorder = [], [], []
            for i, r in enumerate(ROOMS):
                name = r["name"]
                got = await archive(b, name, f"l{i}")
                for (room, n) in acked:
                    if room == name:
                        hits = sum(1 for g in got if f"event {n} for {name}" in g)
                        if hits == 0:
                            missing.append(n)
                        elif hits > 1:
                            doubled.append(n)
                chats = [g for g in got if g.startswith("load ")]
                seen = reflected.get(name, [])
                # Every reflected message archived once and in order. The killed instance may have
                # archived a message and died before reflecting it (archive before broadcast): such
                # a message is in the archive, once, and was sent just before the kill.
                extra = [g for g in chats if g not in seen]
                late = [g for g in extra if abs(int(g.split()[2]) - killed[1]) > KILL_WINDOW]
                if [g for g in chats if g in seen] != seen or len(set(chats)) != len(chats) or late:
                    disorder.append((name, len(chats), len(seen), late[:5]))
            print(f"failover under load: {HOOKS_PER_SECOND * LOAD_SECONDS} deliveries offered, {len(acked)} acknowledged ({rate:.0f}/s), "
                  f"{len(hooks.failed)} not ({hooks.failed[:10]}), {hooks.late} sent over 100 ms late; "
                  f"{k} chat messages sent ({chat_rate:.0f}/s), {sum(len(v) for v in reflected.values())} reflected")
            # The offered load is the asked one (the generator kept up over the window: single POSTs
            # sent over 100 ms late are common on a saturated 2-core machine and are only reported,
            # as CI saw 146 of 1,600 at 199/s acknowledged), and every delivery but those in flight
            # when the instance died was acknowledged by a live one.
            assert rate >= 0.95 * HOOKS_PER_SECOND, "the load generator fell behind"
            assert chat_rate >= 0.95 * CHAT_PER_SECOND, "the chat generator fell behind"
            assert len(acked) >= 0.97 * HOOKS_PER_SECOND * LOAD_SECONDS, "deliveries refused by the live instances"
            assert not missing, f"acknowledged deliveries lost: {missing[:20]}"
            assert not doubled, f"posted twice: {doubled[:20]}"
            assert not disorder, f"archived chat differs from what alice saw: {disorder}"
            await a.close()
            await b.close()
        finally:
            for cr in crs:
                cr.cleanup()
    run(go(), timeout=300)
