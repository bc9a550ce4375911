"""End-to-end: signed tracker webhooks into a running caseroom linked to a real XMPP server; a real
client receives the event with its JSON payload; MAM returns it; replays and crashes post it once."""
import asyncio
import hashlib
import hmac
import json
import signal
from pathlib import Path

from harness import DOMAIN, NS_FORWARD, NS_MAM, Caseroom, Client, body, error_condition  # noqa: F401
from test_core import ROOM, ROOM_JID, ROOMS, mam_page, run

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
NS_JSON = "urn:xmpp:json:0"
SECRET = "gh-secret"
TRACKERS = f'''
[[tracker]]
name = "forge"
kind = "github"
secret = "{SECRET}"
bot_nick = "Forge"
[tracker.rooms]
"Codertocat/Hello-World" = "{ROOM}"
"octo-org/octo-repo" = "{ROOM}"
'''


def signed(body, event, delivery, secret=SECRET):
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": sig}


def fixture(name):
    return (FIXTURES / "github" / name).read_bytes()


def is_event(text_start):
    return lambda e: e.tag == "{jabber:client}message" and (body(e) or "").startswith(text_start)


def test_signed_webhooks_reach_the_room_once(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start(env={"CASEROOM_HTTP_MAX_BODY_BYTES": "200000"})
        try:
            (a,) = [await Client("alice", server).start()]
            await a.join(ROOM, "Alice")
            issue = fixture("issues.opened.json")
            status, answer = cr.post("forge", issue, signed(issue, "issues", "d-1"))
            assert status == 202, answer
            msg = await a.expect(is_event("[Codertocat/Hello-World] Codertocat opened #1"))
            assert msg.get("from") == f"{ROOM_JID}/Forge"
            payload = json.loads(msg.find(f"{{{NS_JSON}}}json").text)
            assert payload["type"] == "Create" and payload["caseroom:case"] == "Codertocat/Hello-World#1"
            assert payload["object"]["name"] == "Spelling error in the README file"
            thread = msg.find("{jabber:client}thread").text
            # A comment on the same issue lands in the same thread.
            comment = fixture("issue_comment.created.json")
            assert cr.post("forge", comment, signed(comment, "issue_comment", "d-2"))[0] == 202
            c = await a.expect(is_event("[Codertocat/Hello-World] Codertocat commented on #1"))
            assert c.find("{jabber:client}thread").text == thread
            # The same delivery again: 200, nothing posted.
            status, answer = cr.post("forge", issue, signed(issue, "issues", "d-1"))
            assert (status, answer) == (200, {"duplicate": True})
            # Bad signature, wrong secret, missing signature: 401 and nothing stored.
            bad = dict(signed(issue, "issues", "d-3"), **{"X-Hub-Signature-256": "sha256=" + "0" * 64})
            assert cr.post("forge", issue, bad)[0] == 401
            assert cr.post("forge", issue, signed(issue, "issues", "d-4", secret="nope"))[0] == 401
            assert cr.post("forge", issue, {"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d-5"})[0] == 401
            # Malformed JSON (correctly signed): 400 with the reason.
            junk = b'{"action": "opened", '
            status, answer = cr.post("forge", junk, signed(junk, "issues", "d-6"))
            assert status == 400 and "JSON" in answer["error"], answer
            # Nested past serde_json's depth limit under a key a dialect reads: 400 with the reason,
            # at the door (not accepted and failed later), and never a stack overflow.
            deep = b'{"issue": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
            status, answer = cr.post("forge", deep, signed(deep, "issues", "d-6b"))
            assert status == 400 and "recursion limit" in answer["error"], answer
            # Oversized: 413.
            big = b'{"x": "' + b"a" * 300_000 + b'"}'
            assert cr.post("forge", big, signed(big, "issues", "d-7"))[0] == 413
            # Ping: answered, not posted; unknown tracker: 404.
            ping = fixture("ping.json")
            assert cr.post("forge", ping, signed(ping, "ping", "d-8")) == (200, {"pong": True})
            assert cr.post("nosuch", issue, {})[0] == 404
            # The archive holds exactly the two events, with their JSON payloads.
            bodies, _, fin = await mam_page(a, "hooks", "<max>50</max>")
            assert [b.split(" — ")[0] for b in bodies] == [
                "[Codertocat/Hello-World] Codertocat opened #1 *Spelling error in the README file*",
                "[Codertocat/Hello-World] Codertocat commented on #1 *Spelling error in the README file*",
            ]
            stats = cr.health_json()["webhooks"]
            assert stats["accepted"] == 2 and stats["duplicates"] == 1 and stats["unauthorized"] == 3, stats
            assert stats["posted"] == 2, stats
            assert cr.health_json()["store"] == "writable"
            # The same, by tracker and outcome, for Prometheus; route names nobody configured share
            # one label (they come from anyone).
            m, ctype = cr.metrics()
            assert ctype.startswith("application/openmetrics-text"), ctype
            hooks = {k: v for k, v in m.items() if k.startswith("caseroom_webhooks_total")}
            lbl = 'caseroom_webhooks_total{{tracker="{}",outcome="{}"}}'.format
            assert hooks == {
                lbl("forge", "accepted"): 2, lbl("forge", "duplicate"): 1, lbl("forge", "unauthorized"): 3,
                lbl("forge", "malformed"): 2, lbl("forge", "too_large"): 1, lbl("forge", "ping"): 1,
                lbl("(unknown)", "unknown_tracker"): 1,
            }, hooks
            assert m['caseroom_events_total{tracker="forge",outcome="posted"}'] == 2
            assert m["caseroom_link_up"] == 1 and m["caseroom_store_writable"] == 1
            assert m["caseroom_inbox_pending"] == 0 and m["caseroom_inbox_oldest_pending_seconds"] == 0
            # In: her join and her MAM query; out: at least her presence, the subject, two events, two
            # MAM results and the end of the query.
            assert m["caseroom_stanzas_in_total"] >= 2 and m["caseroom_stanzas_out_total"] >= 7, m
            assert m["caseroom_mam_query_seconds_count"] == 1
            await a.close()
        finally:
            cr.cleanup()
    run(go())


def test_mam_keeps_the_json_payload(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start()
        try:
            a = await Client("alice", server).start()
            await a.join(ROOM, "Alice")
            push = fixture("push.new-branch.json")
            assert cr.post("forge", push, signed(push, "push", "p-1"))[0] == 202
            await a.expect(is_event("[Codertocat/Hello-World] Codertocat pushed 1 commit"))
            a.received.clear()
            fin = await a.iq(f"<iq type='set' id='m' to='{ROOM_JID}'><query xmlns='{NS_MAM}' queryid='m'/></iq>", "m")
            assert fin.get("type") == "result"
            results = [e for e in a.received if e.find(f"{{{NS_MAM}}}result") is not None]
            assert len(results) == 1
            inner = results[0].find(f"{{{NS_MAM}}}result/{{{NS_FORWARD}}}forwarded/{{jabber:client}}message")
            payload = json.loads(inner.find(f"{{{NS_JSON}}}json").text)
            assert payload["type"] == "Add" and payload["caseroom:commits"] == 1
            await a.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_comment_deleted_on_github_is_retracted_in_the_room_and_in_mam(server):
    """GitHub's `issue_comment` `deleted`: the room retracts the comment's message (XEP-0424/0425,
    from the room itself), MAM keeps a tombstone without its text, and no new message repeats it."""
    retract_ns = "urn:xmpp:message-retract:1"

    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start()
        try:
            a = await Client("alice", server).start()
            await a.join(ROOM, "Alice")
            created = fixture("issue_comment.created.json")
            assert cr.post("forge", created, signed(created, "issue_comment", "c-1"))[0] == 202
            m = await a.expect(is_event("[Codertocat/Hello-World] Codertocat commented on #1"))
            sid = [e.get("id") for e in m.iter("{urn:xmpp:sid:0}stanza-id") if e.get("by") == ROOM_JID][0]
            deleted = fixture("issue_comment.deleted.json")
            assert cr.post("forge", deleted, signed(deleted, "issue_comment", "c-2"))[0] == 202
            note = await a.expect(lambda e: e.find(f"{{{retract_ns}}}retract") is not None, timeout=15)
            assert note.get("from") == ROOM_JID
            assert note.find(f"{{{retract_ns}}}retract").get("id") == sid
            bodies, ids, _ = await mam_page(a, "after", "<max>10</max>")
            assert bodies == [None] and ids == [sid], (bodies, ids)  # the tombstone, in its place
            await a.close()
        finally:
            cr.cleanup()
    run(go())


def test_crash_between_202_and_broadcast_posts_exactly_once(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS)
        try:
            # The fault leaves accepted deliveries pending, as if the process died right after the 202.
            cr.start(env={"CASEROOM_FAULT": "stall-inbox"})
            issue = fixture("issues.opened.json")
            assert cr.post("forge", issue, signed(issue, "issues", "crash-1"))[0] == 202
            cr.stop(signal.SIGKILL)
            cr.start()
            a = await Client("alice", server).start()
            await a.join(ROOM, "Alice", history=10)
            hist = [e for e in a.received if (body(e) or "").startswith("[Codertocat/Hello-World] Codertocat opened #1")]
            assert len(hist) == 1, [body(e) for e in a.received]
            bodies, _, _ = await mam_page(a, "crash", "<max>50</max>")
            assert len(bodies) == 1, bodies
            # The tracker retrying the same delivery changes nothing.
            assert cr.post("forge", issue, signed(issue, "issues", "crash-1"))[0] == 200
            bodies, _, _ = await mam_page(a, "crash2", "<max>50</max>")
            assert len(bodies) == 1, bodies
            await a.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_person_mutes_ci_successes_for_themselves(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=TRACKERS).start()
        try:
            a = await Client("alice", server).start()
            b = await Client("bob", server).start()
            await a.join(ROOM, "Alice")
            await b.join(ROOM, "Bob")
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='m1'><body>!mute ci succeeded</body></message>")
            ok = await b.expect(lambda e: e.get("type") == "chat" and (body(e) or "").startswith("hidden for you"))
            assert ok.get("from") == f"{ROOM_JID}/Forge" and "event=ci verb=succeeded" in body(ok)
            run_ok = fixture("workflow_run.completed.json")
            assert cr.post("forge", run_ok, signed(run_ok, "workflow_run", "w-1"))[0] == 202
            await a.expect(is_event("[octo-org/octo-repo] ✅ *test* succeeded"))
            push = fixture("push.new-branch.json")
            assert cr.post("forge", push, signed(push, "push", "p-9"))[0] == 202
            await b.expect(is_event("[Codertocat/Hello-World] Codertocat pushed 1 commit"))
            assert not [e for e in b.received if "*test* succeeded" in (body(e) or "")], "bob muted CI successes"
            b.raw(f"<message to='{ROOM_JID}' type='groupchat' id='m2'><body>!filters</body></message>")
            listed = await b.expect(lambda e: e.get("type") == "chat" and (body(e) or "").startswith("hidden for you:"))
            assert "verb=succeeded" in body(listed)
            await a.close()
            await b.close()
        finally:
            cr.cleanup()
    run(go())
