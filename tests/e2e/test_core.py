"""End-to-end: caseroom linked to a real Prosody and a real ejabberd, driven by slixmpp clients."""
import asyncio
import signal
import time
import xml.etree.ElementTree as ET

from harness import (DOMAIN, NS_DELAY, NS_FORWARD, NS_MAM, NS_MUC_USER, NS_OID, NS_RSM, NS_SID, Caseroom,
                     Client, body, error_condition, statuses)

ROOM = "webteam"
ROOM_JID = f"{ROOM}@{DOMAIN}"
ROOMS = [{"name": ROOM, "title": "Web team", "owners": ["alice@localhost"], "admins": [],
          "members": ["bob@localhost", "carol@localhost"]}]


def run(coro, timeout=120):
    asyncio.run(asyncio.wait_for(coro, timeout))


async def clients(server, *users):
    return [await Client(u, server).start() for u in users]


async def close(*cs):
    for c in cs:
        await c.close()


def is_msg(text):
    return lambda e: e.tag == "{jabber:client}message" and body(e) == text


def mam_query(qid, iq_id, rsm="", form="", flip=False):
    f = f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{NS_MAM}</value></field>{form}</x>" if form else ""
    return (f"<iq type='set' id='{iq_id}' to='{ROOM_JID}'><query xmlns='{NS_MAM}' queryid='{qid}'>{f}"
            f"<set xmlns='{NS_RSM}'>{rsm}</set>{'<flip-page/>' if flip else ''}</query></iq>")


async def mam_page(c, qid, rsm="", form="", flip=False):
    """One MAM page: (bodies in received order, result ids, fin element)."""
    fin_iq = await c.iq(mam_query(qid, f"iq-{qid}", rsm, form, flip), f"iq-{qid}", timeout=10)
    assert fin_iq.get("type") == "result", error_condition(fin_iq)
    results = []
    keep = []
    for e in c.received:
        r = e.find(f"{{{NS_MAM}}}result")
        if r is not None and r.get("queryid") == qid:
            results.append(r)
        else:
            keep.append(e)
    c.received = keep
    # A tombstone (a retracted message) has no body: None.
    found = [r.find(f"{{{NS_FORWARD}}}forwarded/{{jabber:client}}message/{{jabber:client}}body") for r in results]
    bodies = [b.text if b is not None else None for b in found]
    return bodies, [r.get("id") for r in results], fin_iq.find(f"{{{NS_MAM}}}fin")


async def send_many(c, n, prefix):
    for i in range(n):
        c.raw(f"<message to='{ROOM_JID}' type='groupchat' id='{prefix}{i}'><body>{prefix} {i}</body></message>")
    await c.expect(is_msg(f"{prefix} {n - 1}"), timeout=30)


def test_join_fanout_stanza_ids(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, b, c = await clients(server, "alice", "bob", "carol")
            for cl, nick in ((a, "Alice"), (b, "Bob"), (c, "Carol")):
                pres = await cl.join(ROOM, nick)
                assert {"110", "100", "170"} <= statuses(pres)
                assert pres.find(f"{{{NS_OID}}}occupant-id") is not None
            # Carol learns about Alice and Bob, with real JIDs (non-anonymous room).
            seen = await c.expect(lambda e: e.get("from") == f"{ROOM_JID}/Alice" and e.tag.endswith("presence"))
            item = seen.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}item")
            assert item.get("affiliation") == "owner" and item.get("role") == "moderator"
            assert item.get("jid", "").startswith("alice@localhost/")
            # A forged stanza-id and occupant-id are replaced by the room's own.
            a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='fan1'><body>hello team</body>"
                  f"<stanza-id xmlns='{NS_SID}' by='{ROOM_JID}' id='forged'/><occupant-id xmlns='{NS_OID}' id='forged'/></message>")
            got = [await cl.expect(is_msg("hello team")) for cl in (a, b, c)]
            ids = set()
            for m in got:
                sids = m.findall(f"{{{NS_SID}}}stanza-id")
                assert len(sids) == 1 and sids[0].get("by") == ROOM_JID and sids[0].get("id") != "forged"
                ids.add(sids[0].get("id"))
                oids = m.findall(f"{{{NS_OID}}}occupant-id")
                assert len(oids) == 1 and oids[0].get("id") != "forged"
                assert m.get("from") == f"{ROOM_JID}/Alice"
            assert len(ids) == 1, "every occupant sees the same stanza-id"
            await close(a, b, c)
        finally:
            cr.cleanup()
    run(go())


def test_non_member_refused_and_rooms_hidden(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, d = await clients(server, "alice", "dave")
            pres = await d.join(ROOM, "Dave", expect_ok=False)
            assert pres.get("type") == "error" and error_condition(pres) == "registration-required"
            items = await d.iq(f"<iq type='get' id='di' to='{DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", "di")
            assert ROOM_JID not in [i.get("jid") for i in items.iter("{http://jabber.org/protocol/disco#items}item")]
            items = await a.iq(f"<iq type='get' id='ai' to='{DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>", "ai")
            assert ROOM_JID in [i.get("jid") for i in items.iter("{http://jabber.org/protocol/disco#items}item")]
            denied = await d.iq(mam_query("dq", "dq"), "dq")
            assert error_condition(denied) == "forbidden"
            # An owner adds Dave as a member (muc#admin); now he may enter.
            ok = await a.iq(f"<iq type='set' id='add' to='{ROOM_JID}'><query xmlns='http://jabber.org/protocol/muc#admin'>"
                            f"<item affiliation='member' jid='dave@localhost'/></query></iq>", "add")
            assert ok.get("type") == "result"
            await d.join(ROOM, "Dave")
            await close(a, d)
        finally:
            cr.cleanup()
    run(go())


def test_nick_conflict_multisession_private_subject(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, b = await clients(server, "alice", "bob")
            await a.join(ROOM, "Alice")
            pres = await b.join(ROOM, "Alice", expect_ok=False)
            assert error_condition(pres) == "conflict"
            await b.join(ROOM, "Bob")
            # Bob may not change the subject; Alice (owner) may.
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='s1'><subject>mine</subject></message>")
            err = await b.expect(lambda e: e.get("type") == "error" and e.get("id") == "s1")
            assert error_condition(err) == "forbidden"
            a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='s2'><subject>Release 2.0</subject></message>")
            subj = await b.expect(lambda e: e.find("{jabber:client}subject") is not None)
            assert subj.find("{jabber:client}subject").text == "Release 2.0"
            # Private message Bob → Alice.
            b.raw(f"<message to='{ROOM_JID}/Alice' type='chat' id='pm'><body>psst</body></message>")
            pm = await a.expect(is_msg("psst"))
            assert pm.get("from") == f"{ROOM_JID}/Bob"
            # A second session of Alice shares the nick.
            a2 = await Client("alice", server, resource="second").start()
            await a2.join(ROOM, "Alice")
            # Nick change (303).
            b.raw(f"<presence to='{ROOM_JID}/Robert'/>")
            gone = await a.expect(lambda e: e.get("from") == f"{ROOM_JID}/Bob" and e.get("type") == "unavailable")
            assert "303" in statuses(gone)
            assert gone.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}item").get("nick") == "Robert"
            await a.expect(lambda e: e.get("from") == f"{ROOM_JID}/Robert" and e.tag.endswith("presence"))
            await close(a, a2, b)
        finally:
            cr.cleanup()
    run(go())


def test_mam_paging_250_both_directions(server):
    async def go():
        # One person sends 250 messages at once here: lift the per-person flood limit (SECURITY.md).
        cr = Caseroom(server, ROOMS).start(env={"CASEROOM_MUC_MESSAGE_BURST": "1000"})
        try:
            (a,) = await clients(server, "alice")
            await a.join(ROOM, "Alice")
            await send_many(a, 250, "msg")
            a.received.clear()
            # Forward, pages of 50.
            forward, after, fins = [], None, []
            for i in range(5):
                rsm = "<max>50</max>" + (f"<after>{after}</after>" if after else "")
                bodies, ids, fin = await mam_page(a, f"f{i}", rsm)
                assert len(bodies) == 50
                forward += bodies
                after = fin.find(f"{{{NS_RSM}}}set/{{{NS_RSM}}}last").text
                assert after == ids[-1]
                assert fin.find(f"{{{NS_RSM}}}set/{{{NS_RSM}}}count").text == "250"
                fins.append(fin.get("complete") in ("true", "1"))
            assert forward == [f"msg {i}" for i in range(250)]
            assert fins == [False, False, False, False, True]
            # Backward from the end, pages of 50.
            backward, before, fins = [], "", []
            for i in range(5):
                bodies, ids, fin = await mam_page(a, f"b{i}", f"<max>50</max><before>{before}</before>")
                assert len(bodies) == 50
                backward = bodies + backward
                before = fin.find(f"{{{NS_RSM}}}set/{{{NS_RSM}}}first").text
                fins.append(fin.get("complete") in ("true", "1"))
            assert backward == forward
            assert fins == [False, False, False, False, True]
            # Flipped page: same items, newest first.
            bodies, _, _ = await mam_page(a, "flip", "<max>10</max><before/>", flip=True)
            assert bodies == [f"msg {i}" for i in range(249, 239, -1)]
            # Unknown id → item-not-found; page size capped at 100.
            err = await a.iq(mam_query("bad", "bad", "<after>nope</after>"), "bad")
            assert error_condition(err) == "item-not-found"
            bodies, _, _ = await mam_page(a, "cap", "<max>1000</max>")
            assert len(bodies) == 100
            # A delayed, forwarded result carries the original stanza-id and a stamp.
            bodies, ids, _ = await mam_page(a, "one", "<max>1</max>")
            assert len(ids) == 1
            await close(a)
        finally:
            cr.cleanup()
    run(go(), timeout=180)


def test_fulltext_search_through_mam_with_paging(server):
    """XEP-0431: the MAM form offers {urn:xmpp:fulltext:0}fulltext; every word must occur (case and
    accents ignored), combinable with `with`, paged with RSM; a stranger gets the same refusal as MAM."""
    ft = "{urn:xmpp:fulltext:0}fulltext"

    def search(words, extra=""):
        return f"<field var='{ft}'><value>{words}</value></field>{extra}"

    async def go():
        cr = Caseroom(server, ROOMS).start(env={"CASEROOM_MUC_MESSAGE_BURST": "1000"})
        try:
            a, b, stranger = await clients(server, "alice", "bob", "dave")
            await a.join(ROOM, "Alice")
            await b.join(ROOM, "Bob")
            for i in range(7):
                a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='d{i}'><body>Deploy number {i} to staging</body></message>")
                a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='o{i}'><body>other chatter {i}</body></message>")
            await a.expect(is_msg("other chatter 6"), timeout=30)
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='bz'><body>Bob says DÉPLOY is broken</body></message>")
            await a.expect(is_msg("Bob says DÉPLOY is broken"), timeout=30)
            # The form advertises the field, the room the feature.
            form_iq = await a.iq(f"<iq type='get' id='form' to='{ROOM_JID}'><query xmlns='{NS_MAM}'/></iq>", "form")
            assert ft in [f.get("var") for f in form_iq.iter("{jabber:x:data}field")]
            info = await a.iq(f"<iq type='get' id='info' to='{ROOM_JID}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "info")
            assert "urn:xmpp:fulltext:0" in [f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")]
            # Every word, any case or accent; paged by 3.
            found, after = [], None
            for i in range(4):
                rsm = "<max>3</max>" + (f"<after>{after}</after>" if after else "")
                bodies, ids, fin = await mam_page(a, f"s{i}", rsm, form=search("deploy"))
                found += bodies
                assert fin.find(f"{{{NS_RSM}}}set/{{{NS_RSM}}}count").text == "8"
                if fin.get("complete") in ("true", "1"):
                    break
                after = ids[-1]
            assert found == [f"Deploy number {i} to staging" for i in range(7)] + ["Bob says DÉPLOY is broken"]
            bodies, _, _ = await mam_page(a, "two", "<max>10</max>", form=search("staging NUMBER 3"))
            assert bodies == ["Deploy number 3 to staging"]
            # With `with`: only Bob's.
            bodies, _, _ = await mam_page(a, "bob", "<max>10</max>",
                                          form=search("deploy", f"<field var='with'><value>{ROOM_JID}/Bob</value></field>"))
            assert bodies == ["Bob says DÉPLOY is broken"]
            # `!search` typed in the room: the hits before the question, newest first, to the asker alone.
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='q1'><body>!search Staging number</body></message>")
            answer = await b.expect(lambda e: e.tag == "{jabber:client}message" and e.get("type") == "chat"
                                    and e.get("from") == f"{ROOM_JID}/caseroom", timeout=15, what="the !search answer")
            lines = body(answer).splitlines()
            assert len(lines) == 8, lines
            assert lines[1].endswith("Alice: Deploy number 6 to staging"), lines
            assert lines[7].endswith("Alice: Deploy number 0 to staging"), lines
            assert not [e for e in a.received if e.get("type") == "chat"], "only the asker is answered"
            # Operators are words like any other; nothing found is an empty, complete page.
            bodies, _, fin = await mam_page(a, "none", "<max>10</max>", form=search('deploy AND NOT "x*'))
            assert bodies == [] and fin.get("complete") in ("true", "1")
            # A non-member cannot search.
            err = await stranger.iq(mam_query("m", "m", "<max>5</max>", search("deploy")), "m")
            assert error_condition(err) == "forbidden", error_condition(err)
            await close(a, b, stranger)
        finally:
            cr.cleanup()
    run(go(), timeout=120)


def test_moderation_retracts_for_everyone_and_mam_keeps_a_tombstone(server):
    """XEP-0425: an owner retracts a member's message; the other occupant is told by the room itself;
    MAM serves a tombstone without the text; search no longer finds it; a member's attempt is refused."""
    retract_ns, moderate_ns = "urn:xmpp:message-retract:1", "urn:xmpp:message-moderate:1"

    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, b = await clients(server, "alice", "bob")
            await a.join(ROOM, "Alice")
            await b.join(ROOM, "Bob")
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='s1'><body>the secret is swordfish</body></message>")
            m = await a.expect(is_msg("the secret is swordfish"))
            sid = [e.get("id") for e in m.iter("{urn:xmpp:sid:0}stanza-id") if e.get("by") == ROOM_JID][0]

            def moderate(iq_id):
                return (f"<iq type='set' id='{iq_id}' to='{ROOM_JID}'><moderate xmlns='{moderate_ns}' id='{sid}'>"
                        f"<retract xmlns='{retract_ns}'/><reason>a leaked secret</reason></moderate></iq>")
            refused = await b.iq(moderate("by-bob"), "by-bob")
            assert error_condition(refused) == "forbidden"
            ok = await a.iq(moderate("by-alice"), "by-alice")
            assert ok.get("type") == "result", error_condition(ok)
            note = await b.expect(lambda e: e.find(f"{{{retract_ns}}}retract") is not None)
            assert note.get("from") == ROOM_JID
            retract = note.find(f"{{{retract_ns}}}retract")
            assert retract.get("id") == sid
            assert retract.find(f"{{{moderate_ns}}}moderated").get("by") == f"{ROOM_JID}/Alice"
            # MAM: a tombstone in its place.
            b.received.clear()
            fin = await b.iq(mam_query("t", "t", "<max>10</max>"), "t", timeout=10)
            assert fin.get("type") == "result"
            results = [e for e in b.received if e.find(f"{{{NS_MAM}}}result") is not None]
            stone = [r for r in results if r.find(f"{{{NS_MAM}}}result").get("id") == sid]
            assert len(stone) == 1
            inner = stone[0].find(f"{{{NS_MAM}}}result/{{{NS_FORWARD}}}forwarded/{{jabber:client}}message")
            assert inner.find("{jabber:client}body") is None
            retracted = inner.find(f"{{{retract_ns}}}retracted")
            assert retracted is not None and retracted.find(f"{{{moderate_ns}}}reason").text == "a leaked secret"
            # Search no longer finds it.
            bodies, _, _ = await mam_page(a, "s", "<max>10</max>",
                                          form="<field var='{urn:xmpp:fulltext:0}fulltext'><value>swordfish</value></field>")
            assert bodies == []
            await close(a, b)
        finally:
            cr.cleanup()
    run(go(), timeout=60)


def test_restart_keeps_history_and_332_on_shutdown(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, b = await clients(server, "alice", "bob")
            await a.join(ROOM, "Alice")
            await b.join(ROOM, "Bob")
            await send_many(a, 5, "before-restart")
            assert cr.stop(signal.SIGTERM) == 0
            bye = await b.expect(lambda e: e.get("from") == f"{ROOM_JID}/Bob" and e.get("type") == "unavailable")
            assert {"110", "332"} <= statuses(bye)
            cr.start()
            # History is served on join (with delay) and through MAM.
            b.received.clear()
            await b.join(ROOM, "Bob", history=3)
            hist = [e for e in b.received if body(e) and body(e).startswith("before-restart")]
            b.raw(f"<presence to='{ROOM_JID}/Bob' type='unavailable'/>")
            await a.join(ROOM, "Alice")
            bodies, _, fin = await mam_page(a, "after-restart", "<max>50</max>")
            assert bodies == [f"before-restart {i}" for i in range(5)]
            assert fin.get("complete") in ("true", "1")
            await close(a, b)
        finally:
            cr.cleanup()
        return hist
    out = []

    async def wrapper():
        out.append(await go())
    run(wrapper())


def test_history_on_join_has_delay(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            a, b = await clients(server, "alice", "bob")
            await a.join(ROOM, "Alice")
            await send_many(a, 4, "hist")
            b.received.clear()
            b.raw(f"<presence to='{ROOM_JID}/Bob'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='2'/></x></presence>")
            await b.expect(lambda e: e.find("{jabber:client}subject") is not None)
            hist = [e for e in b.received if body(e)]
            assert [body(e) for e in hist] == ["hist 2", "hist 3"]
            for e in hist:
                d = e.find(f"{{{NS_DELAY}}}delay")
                assert d is not None and d.get("from") == ROOM_JID
            await close(a, b)
        finally:
            cr.cleanup()
    run(go())


def test_bad_stanzas_get_errors_link_survives(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            (a,) = await clients(server, "alice")
            # An IQ get without a payload is malformed (RFC 6120 §8.2.3); whichever hop notices answers.
            bad = await a.iq(f"<iq type='get' id='bad1' to='{DOMAIN}'/>", "bad1")
            assert error_condition(bad) == "bad-request", ET.tostring(bad, encoding="unicode")
            # A presence whose priority is not a number: the servers pass it on (or refuse it themselves).
            a.raw(f"<presence to='{ROOM_JID}/Alice' id='bad2'><priority>loud</priority></presence>")
            two = await a.expect(lambda e: e.get("id") == "bad2" and e.get("type") == "error")
            assert error_condition(two) == "bad-request", ET.tostring(two, encoding="unicode")
            assert cr.health_json()["malformed"] >= 1, "caseroom itself answered the malformed presence"
            unknown = await a.iq(f"<iq type='get' id='u1' to='{DOMAIN}'><query xmlns='urn:example:nothing'/></iq>", "u1")
            assert error_condition(unknown) == "service-unavailable"
            not_joined = await a.iq(f"<iq type='get' id='sp' to='{ROOM_JID}/Alice'><ping xmlns='urn:xmpp:ping'/></iq>", "sp")
            assert error_condition(not_joined) == "not-acceptable"
            a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='nj'><body>not joined</body></message>")
            err = await a.expect(lambda e: e.get("id") == "nj" and e.get("type") == "error")
            assert error_condition(err) == "not-acceptable"
            ping = await a.iq(f"<iq type='get' id='p1' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>", "p1")
            assert ping.get("type") == "result"
            await a.join(ROOM, "Alice")
            self_ping = await a.iq(f"<iq type='get' id='sp2' to='{ROOM_JID}/Alice'><ping xmlns='urn:xmpp:ping'/></iq>", "sp2")
            assert self_ping.get("type") == "result"
            assert cr.health() == 200
            await close(a)
        finally:
            cr.cleanup()
    run(go())


def test_server_restart_relinks(server):
    async def go():
        cr = Caseroom(server, ROOMS).start()
        try:
            server.stop()
            deadline = time.time() + 10
            while cr.health() != 503 and time.time() < deadline:
                await asyncio.sleep(0.1)
            assert cr.health() == 503
            server.start()
            back = time.time()
            relinked = cr.wait_healthy(timeout=10)
            assert relinked - back < 5, f"relinked {relinked - back:.1f}s after the server came back"
            (a,) = await clients(server, "alice")
            await a.join(ROOM, "Alice")
            a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='r1'><body>after relink</body></message>")
            await a.expect(is_msg("after relink"))
            await close(a)
        finally:
            cr.cleanup()
    run(go())


def test_first_handshake_failure_exits_nonzero(server):
    cr = Caseroom(server, ROOMS, secret="wrong-secret")
    try:
        cr.start(wait=False)
        code = cr.proc.wait(20)
        assert code != 0
        assert "refused the component handshake" in cr.log.read_text()
    finally:
        cr.cleanup()
    # Nothing listening.
    class Nowhere:
        component = 1
    cr = Caseroom(Nowhere(), ROOMS)
    try:
        cr.start(wait=False)
        assert cr.proc.wait(20) != 0
        assert "cannot connect" in cr.log.read_text()
    finally:
        cr.cleanup()
