"""End-to-end with a real tracker: Redmine (Debian's package, tests/servers/redmine.sh) on loopback, a real
Prosody, caseroom syncing rooms from Redmine and running chat commands as the speaking person."""
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import DOMAIN, SERVERS, Caseroom, Client, XmppServer, body, error_condition, free_port, statuses

sys.path.insert(0, str(SERVERS))
from redmine_smoke import Redmine  # noqa: E402

ROOM_JID = f"webteam@{DOMAIN}"


@pytest.fixture(scope="module", params=["prosody"])
def server(request):
    # One server is enough here: what is under test is the tracker side.
    srv = XmppServer(request.param)
    srv.start()
    yield srv
    srv.cleanup()


PLUGIN = Path(__file__).resolve().parents[2] / "deploy" / "redmine" / "caseroom_webhook"


@pytest.fixture(scope="module")
def redmine():
    d = tempfile.mkdtemp(prefix="caseroom-redmine-")
    port = free_port()
    hook_port = free_port()  # caseroom's HTTP port, known before caseroom starts: the plugin posts there
    env = dict(os.environ, REDMINE_PLUGINS=str(PLUGIN), CASEROOM_WEBHOOK_URL=f"http://127.0.0.1:{hook_port}/hooks/redmine",
               CASEROOM_WEBHOOK_SECRET="rm-secret")
    subprocess.run(["bash", str(SERVERS / "redmine.sh"), d, str(port)], check=True, stdout=subprocess.DEVNULL, timeout=600, env=env)
    key = (Path(d) / "admin_api_key").read_text().strip()
    rm = Redmine(port, key)
    # A project with two members: alice (Manager) and bob (Developer); carol exists but is not a member.
    st, _ = rm.call("POST", "/projects.json", {"project": {"name": "Web team", "identifier": "webteam",
                                                          "tracker_ids": [1, 2, 3], "enabled_module_names": ["issue_tracking"]}})
    assert st in (201, 422), st
    ids = {login: user_id(rm, login, login.capitalize(), "Tester") for login in ("alice", "bob", "carol")}
    for login, role in (("alice", 3), ("bob", 4)):
        ensure_member(rm, "webteam", ids[login], role)
    yield {"port": port, "key": key, "rm": rm, "ids": ids, "dir": d, "hook_port": hook_port}
    subprocess.run(["bash", str(SERVERS / "stop.sh"), d], check=False)
    shutil.rmtree(d, ignore_errors=True)


def config(rd, port=None, identity_map=""):
    return f'''
[[tracker]]
name = "redmine"
kind = "redmine"
url = "http://127.0.0.1:{port or rd["port"]}"
api_key = "{rd["key"]}"
secret = "rm-secret"
bot_nick = "Redmine"
sync_interval = "1s"
poll_interval = "1s"
[tracker.identity]
domain = "localhost"
{identity_map}
[tracker.roles]
Manager = "owner"
Developer = "member"
Reporter = "member"
'''


def run(coro, timeout=180):
    asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for_room(c, timeout=20, room="webteam"):
    """Join as soon as sync has created the room (registration-required until then is fine too)."""
    deadline = time.time() + timeout
    while True:
        pres = await c.join(room, c.user.capitalize(), expect_ok=False)
        if pres.get("type") != "error":
            await c.expect(lambda e: e.find("{jabber:client}subject") is not None, what="subject")
            return pres
        if time.time() > deadline:
            raise AssertionError(f"room never appeared for {c.user}: {error_condition(pres)}")
        await asyncio.sleep(0.5)


def reply(text_start):
    return lambda e: e.tag == "{jabber:client}message" and (body(e) or "").startswith(text_start)


def say(c, i, text, extra="", room=ROOM_JID):
    """A groupchat message with id `i` (the same id twice is the same message resent)."""
    c.raw(f"<message to='{room}' type='groupchat' id='{i}'><body>{text}</body>{extra}</message>")


async def wait_for_log(cr, *words, timeout=20):
    """Until a line of caseroom's log holds all `words` (or the timeout)."""
    deadline = time.time() + timeout
    while not any(all(w in line for w in words) for line in cr.log.read_text().splitlines()) and time.time() < deadline:
        await asyncio.sleep(0.2)


def user_id(rm, login, first, last):
    """A Redmine user's id, made if missing (the fixture's Redmine lives for the whole module)."""
    st, made = rm.call("POST", "/users.json", {"user": {"login": login, "firstname": first, "lastname": last,
                                                        "mail": f"{login}@example.org", "password": f"pw-{login}-redmine"}})
    if st == 201:
        return made["user"]["id"]
    _, found = rm.call("GET", f"/users.json?name={login}")
    return [u for u in found["users"] if u["login"] == login][0]["id"]


def ensure_member(rm, project, uid, role):
    _, ms = rm.call("GET", f"/projects/{project}/memberships.json")
    if not any(m.get("user", {}).get("id") == uid for m in ms["memberships"]):
        rm.call("POST", f"/projects/{project}/memberships.json", {"membership": {"user_id": uid, "role_ids": [role]}})


def test_rooms_members_and_commands_against_real_redmine(server, redmine):
    rm = redmine["rm"]

    async def go():
        cr = Caseroom(server, [], extra=config(redmine), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            b = await Client("bob", server).start()
            d = await Client("dave", server).start()
            pres = await wait_for_room(a)
            item = pres.find("{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item")
            assert item.get("affiliation") == "owner", "Redmine Manager → owner"
            pres = await wait_for_room(b)
            assert "110" in statuses(pres)
            refused = await d.join("webteam", "Dave", expect_ok=False)
            assert error_condition(refused) == "registration-required", "not a Redmine member"
            # Bob creates a case as himself, assigned by a guess.
            say(b, "c1", "!new Login broken on Safari @ali\nSteps: open the page")
            created = await b.expect(reply("created #"), timeout=30)
            text = body(created)
            assert "*Login broken on Safari*" in text and "you wrote @ali" in text, text
            number = int(text.split("#")[1].split()[0])
            st, issue = rm.call("GET", f"/issues/{number}.json")
            assert st == 200
            assert issue["issue"]["author"]["id"] == redmine["ids"]["bob"], "created as the speaker"
            assert issue["issue"]["assigned_to"]["id"] == redmine["ids"]["alice"], "guessed assignee"
            # Alice comments as an XEP-0461 reply to that answer, without a number, then closes the case.
            answer = await a.expect(reply(f"created #{number}"), timeout=10)
            sid = answer.find("{urn:xmpp:sid:0}stanza-id").get("id")
            say(a, "c2", "!comment looks good", f"<reply xmlns='urn:xmpp:reply:0' to='{ROOM_JID}/Redmine' id='{sid}'/>")
            await a.expect(reply(f"commented on #{number}"), timeout=30)
            say(a, "c3", f"!close {number} fixed in 1.2")
            closed = await a.expect(reply(f"closed #{number}"), timeout=30)
            st, issue = rm.call("GET", f"/issues/{number}.json?include=journals")
            assert issue["issue"]["status"]["is_closed"] if "is_closed" in issue["issue"]["status"] else issue["issue"].get("closed_on"), issue
            notes = [j.get("notes") for j in issue["issue"]["journals"]]
            assert "looks good" in notes and "fixed in 1.2" in notes, notes
            authors = {j["user"]["id"] for j in issue["issue"]["journals"]}
            assert authors == {redmine["ids"]["alice"]}, "changes made as alice"
            # Replies share the case's thread; a mistyped command gets usage, not silence.
            assert closed.find("{jabber:client}thread") is not None
            say(b, "c4", f"!clsoe {number}")
            hint = await b.expect(reply("Bob: unknown command !clsoe: did you mean !close?"), timeout=10)
            assert "usage: !close" in body(hint)
            # Membership follows Redmine: carol added as Reporter is invited and may enter.
            rm.call("POST", "/projects/webteam/memberships.json", {"membership": {"user_id": redmine["ids"]["carol"], "role_ids": [5]}})
            c = await Client("carol", server).start()
            invite = await c.expect(lambda e: e.find("{jabber:x:conference}x") is not None, timeout=20, what="invitation")
            assert invite.find("{jabber:x:conference}x").get("jid") == ROOM_JID
            await wait_for_room(c)
            # …and bob, removed in Redmine, is removed from the room with status 321.
            _, ms = rm.call("GET", "/projects/webteam/memberships.json")
            bob_m = [m for m in ms["memberships"] if m.get("user", {}).get("id") == redmine["ids"]["bob"]][0]
            rm.call("DELETE", f"/memberships/{bob_m['id']}.json")
            gone = await b.expect(lambda e: e.get("from") == f"{ROOM_JID}/Bob" and e.get("type") == "unavailable", timeout=20)
            assert "321" in statuses(gone)
            for cl in (a, b, c, d):
                await cl.close()
        finally:
            cr.cleanup()
    run(go())


def count(c, text):
    return sum(1 for e in c.received if text in (body(e) or ""))


def test_redmine_changes_reach_the_room_once_by_plugin_or_poller(server, redmine):
    rm = redmine["rm"]

    async def go():
        cr = Caseroom(server, [], extra=config(redmine), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            await wait_for_room(a)
            # A change made in Redmine: the plugin's signed webhook brings it.
            st, made = rm.call("POST", "/issues.json", {"issue": {"project_id": "webteam", "subject": "Made in Redmine"}}, as_user="alice")
            assert st == 201, made
            n = made["issue"]["id"]
            await a.expect(reply(f"[webteam] Alice Tester opened #{n} *Made in Redmine*"), timeout=15)
            await asyncio.sleep(3)  # several poll rounds: the poller sees the same change and must not repeat it
            assert count(a, f"opened #{n} *Made in Redmine*") == 0, "posted once (the expect above consumed it)"
            # The poller stores its starting point as soon as it has one (a first start reads it from Redmine).
            await wait_for_log(cr, "catch-up poller starts")
            # caseroom is down while bob comments: the plugin's delivery is lost; the poller catches it.
            t_stop = time.time()
            assert cr.stop() == 0, "a clean exit on SIGTERM, also with sync and poll tasks running"
            assert time.time() - t_stop < 5
            st, _ = rm.call("PUT", f"/issues/{n}.json", {"issue": {"notes": "while you were away"}}, as_user="bob")
            assert st == 204
            st, _ = rm.call("PUT", f"/issues/{n}.json", {"issue": {"notes": "a private remark", "private_notes": True}}, as_user="alice")
            assert st == 204
            cr.start()
            a2 = await Client("alice", server, resource="again").start()
            await wait_for_room(a2)
            # The poller runs every second; a Redmine request may take up to the client's 15 s timeout.
            deadline = time.time() + 40
            while count(a2, "> while you were away") == 0 and time.time() < deadline:
                await asyncio.sleep(0.3)
            await asyncio.sleep(3)
            log = [l for l in cr.log.read_text().splitlines() if "poll" in l or "ERROR" in l or "WARN" in l][-30:]
            assert count(a2, "> while you were away") == 1, ([body(e) for e in a2.received if body(e)], log)
            assert count(a2, "private remark") == 0, "private notes never reach the room"
            # After the restart, a command typed in the case's thread still knows its case (from history).
            ev = [e for e in a2.received if "> while you were away" in (body(e) or "")][0]
            th = ev.find("{jabber:client}thread").text
            say(a2, "t1", "!comment seen after the restart", f"<thread>{th}</thread>")
            await a2.expect(reply(f"commented on #{n}"), timeout=30)
            for cl in (a, a2):
                await cl.close()
        finally:
            cr.cleanup()
    run(go())


def test_forms_create_cases_and_link_accounts_against_real_redmine(server, redmine):
    """XEP-0050 on a synced room: "New case" creates the issue as the person with the form's choices;
    "Link my tracker account" checks a pasted token with Redmine, keeps it in a 0600 file, never logs it,
    and commands then run with that token."""
    import stat
    from harness import command, command_of
    rm = redmine["rm"]
    # carol is a Reporter of webteam by the time this runs (the first test adds her) or made one here.
    ensure_member(rm, "webteam", redmine["ids"]["carol"], 5)
    st, acct = rm.call("GET", "/my/account.json", as_user="carol")
    assert st == 200, acct
    carol_key = acct["user"]["api_key"]

    async def go():
        cr = Caseroom(server, [], extra=config(redmine), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            await wait_for_room(a)
            st, sid, _, fields, x = command_of(await command(a, "n1", ROOM_JID, "new-case"))
            assert st == "executing", "a form to fill"
            opts = {f.get("var"): [o.findtext("{jabber:x:data}value") for o in f.findall("{jabber:x:data}option")]
                    for f in x.findall("{jabber:x:data}field")}
            assert {"Bug", "Feature", "Support"} <= set(opts["type"]), opts
            assert "High" in opts["priority"] and {"alice", "carol"} <= set(opts["assignee"]), opts
            st, _, notes, _, _ = command_of(await command(a, "n2", ROOM_JID, "new-case", "complete", sid, {
                "title": "Form-made case", "description": ["from the form"], "type": "Feature",
                "priority": "High", "assignee": "carol", "labels": ""}, timeout=30))
            assert st == "completed" and notes[0][0] == "info", notes
            text = notes[0][1]
            assert text.startswith("created #") and "assigned to Carol Tester" in text, text
            number = int(text.split("#")[1].split()[0])
            _, issue = rm.call("GET", f"/issues/{number}.json")
            i = issue["issue"]
            assert i["author"]["id"] == redmine["ids"]["alice"], "created as the person who filled the form"
            assert (i["tracker"]["name"], i["priority"]["name"], i["assigned_to"]["id"]) == ("Feature", "High", redmine["ids"]["carol"])
            await a.expect(reply(f"alice (form): created #{number}"), timeout=10)

            # Linking: a wrong token is refused with a reason; a right one is kept privately.
            st, sid, _, fields, x = command_of(await command(a, "l1", ROOM_JID, "link-account"))
            types = {f.get("var"): f.get("type") for f in x.findall("{jabber:x:data}field")}
            assert types["token"] == "text-private" and "/my/account" in fields["help"][0]
            _, _, notes, _, _ = command_of(await command(a, "l2", ROOM_JID, "link-account", "complete", sid, {"token": "not-a-key"}))
            assert notes[0][0] == "error" and "did not accept this token" in notes[0][1], notes
            _, sid, _, _, _ = command_of(await command(a, "l3", ROOM_JID, "link-account"))
            _, _, notes, _, _ = command_of(await command(a, "l4", ROOM_JID, "link-account", "complete", sid, {"token": carol_key}))
            assert notes == [("info", "linked: you act as carol in redmine from now on, with your own token")], notes
            tokens = Path(cr.dir) / "caseroom.db.tokens.json"
            if cr.url:
                # PostgreSQL: a row every instance reads, and no file.
                rows = subprocess.run(["psql", cr.url, "-Atc", "SELECT jid, link FROM linked_tokens"],
                                      check=True, capture_output=True, text=True).stdout
                assert rows.startswith("alice@localhost|") and carol_key in rows, rows
                assert not tokens.exists()
            else:
                assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
            # Commands now run with the linked token: the issue's author is the token's owner.
            say(a, "lk1", "!new Made with a linked token")
            made = await a.expect(reply("created #"), timeout=30)
            n2 = int(body(made).split("#")[1].split()[0])
            _, issue = rm.call("GET", f"/issues/{n2}.json")
            assert issue["issue"]["author"]["id"] == redmine["ids"]["carol"]
            # Unlink: back to the identity rule.
            _, sid, _, fields, _ = command_of(await command(a, "l5", ROOM_JID, "link-account"))
            assert "unlink" in fields
            _, _, notes, _, _ = command_of(await command(a, "l6", ROOM_JID, "link-account", "complete", sid, {"token": "", "unlink": "1"}))
            assert notes[0][1].startswith("unlinked"), notes
            # Redmine groups: dave, only in a group that is a Developer of webteam, becomes a member.
            dave_id = user_id(rm, "dave", "Dave", "Tester")
            st, g = rm.call("POST", "/groups.json", {"group": {"name": "Ops", "user_ids": [dave_id]}})
            assert st == 201, g
            rm.call("POST", "/projects/webteam/memberships.json", {"membership": {"user_id": g["group"]["id"], "role_ids": [4]}})
            d = await Client("dave", server).start()
            await d.expect(lambda e: e.find("{jabber:x:conference}x") is not None, timeout=20, what="invitation")
            await wait_for_room(d)
            await a.close()
            await d.close()
            assert carol_key not in cr.log.read_text(), "a token never reaches the log"
        finally:
            cr.cleanup()
    run(go())


class Outage:
    """A TCP relay in front of Redmine that the test can make hang — accept, never answer — as a tracker
    does when it is overloaded or half down; closing the relayed connections on the switch makes the
    client's pooled keep-alive connections go through the hanging path too."""

    def __init__(self, target):
        self.target, self.hanging, self.open = target, False, set()

    async def start(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def serve(self, r, w):
        self.open.add(w)
        try:
            if self.hanging:
                await r.read()  # until the client gives up
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
            self.open.add(uw)

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    dst.close()
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        finally:
            self.open.discard(w)
            w.close()

    def hang(self, on=True):
        self.hanging = on
        for w in list(self.open):
            w.close()
        self.open.clear()


def test_commands_keep_to_their_project_and_failures_say_why(server, redmine):
    """A command in a project's room never reads or echoes another project's case (Redmine numbers issues
    across projects); an unknown number, and a tracker that hangs, get an answer saying what happened —
    and while the tracker hangs the room goes on."""
    rm = redmine["rm"]
    st, _ = rm.call("POST", "/projects.json", {"project": {"name": "Hidden", "identifier": "hidden", "is_public": False,
                                                          "tracker_ids": [1], "enabled_module_names": ["issue_tracking"]}})
    assert st in (201, 422), st
    rm.call("POST", "/projects/hidden/memberships.json", {"membership": {"user_id": redmine["ids"]["alice"], "role_ids": [3]}})
    st, h = rm.call("POST", "/issues.json", {"issue": {"project_id": "hidden", "subject": "Secret plan",
                                                       "assigned_to_id": redmine["ids"]["alice"]}})
    assert st == 201, h
    hidden = h["issue"]["id"]
    st, w = rm.call("POST", "/issues.json", {"issue": {"project_id": "webteam", "subject": "Public chore",
                                                       "assigned_to_id": redmine["ids"]["alice"]}})
    assert st == 201, w
    chore = w["issue"]["id"]
    st, pv = rm.call("POST", "/issues.json", {"issue": {"project_id": "webteam", "subject": "Private matter", "is_private": True}},
                     as_user="alice")
    assert st == 201, pv
    private = pv["issue"]["id"]
    ensure_member(rm, "webteam", redmine["ids"]["bob"], 4)

    async def go():
        relay = await Outage(redmine["port"]).start()
        cr = Caseroom(server, [], extra=config(redmine, relay.port), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            b = await Client("bob", server).start()
            await wait_for_room(a)
            await wait_for_room(b)

            # Reading commands answer with what the *speaker* may see; Redmine roles may be limited to
            # their own issues, so in a Redmine room the answer goes to the speaker alone (privately).
            def private_reply(start):
                return lambda e: e.get("type") == "chat" and (body(e) or "").startswith(start)
            # alice may see #hidden in Redmine, but this room's project does not hold it: not shown.
            say(a, "x1", f"!show {hidden}")
            no = await a.expect(lambda e: e.get("type") == "chat" and f"could not show #{hidden}" in (body(e) or ""), timeout=30)
            assert "webteam has no such case, or you may not see it" in body(no), body(no)
            say(a, "x2", "!mine")
            mine = await a.expect(private_reply(f"#{chore} *Public chore*"), timeout=30)
            assert "assigned to Alice Tester" in body(mine), body(mine)
            say(b, "x3", "!show 99999")
            await b.expect(lambda e: "could not show #99999: webteam has no such case" in (body(e) or ""), timeout=30)
            # A private issue of this very project: even to alice, its number and link only.
            say(a, "x4", f"!show {private}")
            shown = await a.expect(private_reply(f"#{private} (private: open it in the tracker) — "), timeout=30)
            say(a, "x5", "!find private matter")
            await a.expect(private_reply(f"#{private} (private: open it in the tracker) — "), timeout=30)
            await asyncio.sleep(1)
            assert not any("Secret plan" in (body(e) or "") for e in b.received), "another project's case leaked"
            assert not any("Private matter" in (body(e) or "") for e in b.received), "a private case's title leaked"
            assert not any((body(e) or "").startswith(f"#{chore} *Public chore*") for e in b.received), \
                "alice's !mine answer was shown to bob"
            assert body(shown).endswith(f"/issues/{private}"), body(shown)
            # A type the project has not enabled is dropped with the ones it has, and the case is made.
            await wait_for_room(a, room="hidden")
            say(a, "h1", "!new Only bugs here #feature", room=f"hidden@{DOMAIN}")
            made = await a.expect(reply("created #"), timeout=30)
            assert "dropped #feature (no such type here: Bug)" in body(made), body(made)
            n = int(body(made).split("#")[1].split()[0])
            _, issue = rm.call("GET", f"/issues/{n}.json")
            assert issue["issue"]["tracker"]["name"] == "Bug" and issue["issue"]["project"]["name"] == "Hidden"

            # Redmine hangs: the command waits for the client's timeout, the room does not.
            relay.hang()
            say(b, "o1", f"!comment {chore} during the outage")
            await asyncio.sleep(0.5)
            t0 = time.time()
            say(a, "o2", "still talking")
            await b.expect(lambda e: body(e) == "still talking", timeout=5)
            assert time.time() - t0 < 2, "the room goes on while a command waits for the tracker"
            down = await b.expect(lambda e: f"could not comment on #{chore}" in (body(e) or ""), timeout=40)
            assert "unreachable right now" in body(down) and "try again" in body(down), body(down)
            # Back up: the same person, the same room, it works again.
            relay.hang(False)
            say(b, "o3", f"!comment {chore} after the outage")
            await b.expect(reply(f"commented on #{chore}"), timeout=30)
            _, issue = rm.call("GET", f"/issues/{chore}.json?include=journals")
            notes = [j.get("notes") for j in issue["issue"]["journals"]]
            assert "after the outage" in notes and "during the outage" not in notes, notes
            for cl in (a, b):
                await cl.close()
        finally:
            cr.cleanup()
            relay.server.close()
    run(go())


def test_mapped_person_runs_every_command_once_and_replays_never(server, redmine):
    """[tracker.identity] map: erin@localhost is Redmine's "fdupont" — a member through the map, and her
    commands run as fdupont. The same message delivered twice creates one case; a message carrying a
    delay (a replay) runs nothing. !assign, !close, !reopen, !find and !help against real Redmine."""
    rm = redmine["rm"]
    frank = user_id(rm, "fdupont", "Frank", "Dupont")
    ensure_member(rm, "webteam", frank, 4)

    def issues_titled(title):
        _, found = rm.call("GET", "/issues.json?project_id=webteam&status_id=*&limit=100")
        return [i for i in found["issues"] if i["subject"] == title]

    async def go():
        cr = Caseroom(server, [], extra=config(redmine, identity_map='map = { "erin@localhost" = "fdupont" }'),
                      http_port=redmine["hook_port"]).start()
        try:
            e = await Client("erin", server).start()
            pres = await wait_for_room(e)
            item = pres.find("{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item")
            assert item.get("affiliation") == "member", "Developer → member, through the identity map"

            # The same message twice (a client resending after a reconnect): one case.
            say(e, "m1", "!new Mapped case #feature")
            say(e, "m1", "!new Mapped case #feature")
            made = await e.expect(reply("created #"), timeout=30)
            n = int(body(made).split("#")[1].split()[0])
            # A replayed command (it carries a delay) runs nothing; the live one after it does.
            say(e, "m2", "!new Replayed case", "<delay xmlns='urn:xmpp:delay' stamp='2026-01-01T00:00:00Z'/>")
            say(e, "m3", "!new Live case")
            await e.expect(reply("created #"), timeout=30)
            await asyncio.sleep(2)
            assert len(issues_titled("Mapped case")) == 1, "the same message twice creates one case"
            assert issues_titled("Replayed case") == [], "a delayed message never runs a command"
            assert not any((body(x) or "").startswith("created #") for x in e.received), "no third answer"
            _, issue = rm.call("GET", f"/issues/{n}.json")
            assert issue["issue"]["author"]["id"] == frank, "run as the mapped login"
            assert issue["issue"]["tracker"]["name"] == "Feature"

            say(e, "a1", f"!assign {n} @bob")
            got = await e.expect(reply(f"assigned #{n}"), timeout=30)
            assert "assigned to Bob Tester" in body(got), body(got)
            say(e, "a2", f"!close {n}")
            await e.expect(reply(f"closed #{n}"), timeout=30)
            # Redmine's default workflow does not let a Developer reopen a closed issue (Redmine would
            # ignore the status and answer 204): she is told so, and a Manager can.
            say(e, "a3", f"!reopen {n}")
            no = await e.expect(lambda x: f"could not reopen #{n}" in (body(x) or ""), timeout=30)
            assert "workflow does not let fdupont reopen" in body(no), body(no)
            a = await Client("alice", server).start()
            await wait_for_room(a)
            say(a, "a3b", f"!reopen {n}")
            await e.expect(reply(f"reopened #{n}"), timeout=30)
            await a.close()
            _, issue = rm.call("GET", f"/issues/{n}.json")
            i = issue["issue"]
            assert i["assigned_to"]["id"] == redmine["ids"]["bob"] and not i["status"].get("is_closed", False), i
            say(e, "a4", "!find mapped")
            found = await e.expect(reply(f"#{n} *Mapped case*"), timeout=30)
            assert "assigned to Bob Tester" in body(found)
            say(e, "a5", "!help close")
            await e.expect(reply("!close 42 [closing note] — close case 42"), timeout=10)
            # Resent once more after caseroom restarted (found in the room's history): still one case.
            assert cr.stop() == 0
            cr.start()
            e2 = await Client("erin", server, resource="again").start()
            await wait_for_room(e2)
            say(e2, "m1", "!new Mapped case #feature")
            say(e2, "a6", f"!show {n}")
            await e2.expect(reply(f"#{n} *Mapped case*"), timeout=30)
            await asyncio.sleep(2)
            assert len(issues_titled("Mapped case")) == 1, "resent across a restart: still one case"
            assert not any((body(x) or "").startswith("created #") for x in e2.received
                           if x.find("{urn:xmpp:delay}delay") is None), "no answer but from history"
            for c in (e, e2):
                await c.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_project_gone_from_redmine_closes_its_room(server, redmine):
    """Only people Redmine lets see a project may read its room. A project archived (or deleted) in
    Redmine closes its room: members are removed (321) and refused; the archive is kept, and when the
    project comes back so do they. Noticed also when it went while caseroom was down."""
    rm = redmine["rm"]
    for ident in ("gone1", "gone2"):
        st, _ = rm.call("POST", "/projects.json", {"project": {"name": ident.capitalize(), "identifier": ident, "is_public": False,
                                                              "enabled_module_names": ["issue_tracking"]}})
        assert st == 201, st
        rm.call("POST", f"/projects/{ident}/memberships.json", {"membership": {"user_id": redmine["ids"]["alice"], "role_ids": [4]}})

    async def refused(c, room):
        pres = await c.join(room, "Alice", expect_ok=False)
        return pres.get("type") == "error" and error_condition(pres) == "registration-required"

    async def go():
        cr = Caseroom(server, [], extra='[muc]\noperators = ["alice@localhost"]\n' + config(redmine),
                      http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            await wait_for_room(a, room="gone1")
            await wait_for_room(a, room="gone2")
            st, _ = rm.call("PUT", "/projects/gone1/archive.json")
            assert st == 204
            out = await a.expect(lambda e: e.get("from") == f"gone1@{DOMAIN}/Alice" and e.get("type") == "unavailable", timeout=20)
            assert "321" in statuses(out), "removed because her affiliation went"
            assert await refused(a, "gone1")
            # Back in Redmine: invited again, may enter again.
            st, _ = rm.call("PUT", "/projects/gone1/unarchive.json")
            assert st == 204
            await a.expect(lambda e: (x := e.find("{jabber:x:conference}x")) is not None and x.get("jid") == f"gone1@{DOMAIN}",
                           timeout=20, what="invitation")
            await wait_for_room(a, room="gone1")
            # Gone while caseroom was down: closed at the first sync after the restart.
            assert cr.stop() == 0
            st, _ = rm.call("DELETE", "/projects/gone2.json")
            assert st == 204
            cr.start()
            a2 = await Client("alice", server, resource="again").start()
            await wait_for_log(cr, "no longer lists", "gone2")
            assert await refused(a2, "gone2"), [l for l in cr.log.read_text().splitlines() if "sync" in l or "gone" in l or "WARN" in l][-12:]
            await wait_for_room(a2, room="gone1")
            # The operator's Status names the room nobody may enter any more.
            from harness import command, command_of
            _, _, _, fields, _ = command_of(await command(a2, "st1", DOMAIN, "status"))
            closed = fields["rooms"][0].split("closed (no one may enter): ")[-1].split(", ")
            assert "gone2" in closed and "gone1" not in closed, fields["rooms"]
            for c in (a, a2):
                await c.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_synced_project_cannot_take_over_a_room_by_name(server, redmine):
    """A Redmine project whose identifier equals a static room (anyone with "add project" rights can
    pick any identifier): the sync is refused and reported, the room keeps its owners and members."""
    rm = redmine["rm"]
    st, _ = rm.call("POST", "/projects.json", {"project": {"name": "Take over", "identifier": "hq", "is_public": False,
                                                          "enabled_module_names": ["issue_tracking"]}})
    assert st in (201, 422), st
    ensure_member(rm, "hq", redmine["ids"]["bob"], 3)  # bob is Manager of the Redmine project "hq"
    static = [{"name": "hq", "title": "Headquarters", "owners": ["carol@localhost"], "members": []}]

    async def go():
        cr = Caseroom(server, static, extra='[muc]\noperators = ["carol@localhost"]\n' + config(redmine),
                      http_port=redmine["hook_port"]).start()
        try:
            await wait_for_log(cr, "refused", "room hq belongs to the configuration")
            c = await Client("carol", server).start()
            pres = await c.join("hq", "Carol")
            item = pres.find("{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item")
            assert item.get("affiliation") == "owner", "the static room keeps its owner"
            b = await Client("bob", server).start()
            refused = await b.join("hq", "Bob", expect_ok=False)
            assert refused.get("type") == "error" and error_condition(refused) == "registration-required"
            from harness import command, command_of
            _, _, _, fields, _ = command_of(await command(c, "st-hq", DOMAIN, "status"))
            collisions = [v for k, vs in fields.items() for v in vs if "belongs to" in v]
            assert any("room hq belongs to the configuration" in v and "redmine group hq" in v for v in collisions), fields
            for cl in (b, c):
                await cl.close()
        finally:
            cr.cleanup()
    run(go())


def test_a_command_flood_waits_for_at_most_two_tracker_calls(server, redmine):
    """While the tracker hangs, a member fires 12 commands: 2 wait for the tracker
    (muc.commands_in_flight_per_person), the other 10 are answered at once, privately, that they were
    not run; meanwhile the room's messages keep flowing."""
    async def go():
        relay = await Outage(redmine["port"]).start()
        cr = Caseroom(server, [], extra=config(redmine, relay.port), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", server).start()
            b = await Client("bob", server).start()
            await wait_for_room(a)
            await wait_for_room(b)
            relay.hang()
            for i in range(12):
                say(b, f"fl{i}", f"!comment 1 flood {i}")
            not_run = []
            deadline = time.time() + 15
            while len(not_run) < 10 and time.time() < deadline:
                got = await b.expect(lambda e: e.get("type") == "chat" and "was not run" in (body(e) or ""), timeout=15)
                not_run.append(got)
            assert len(not_run) == 10, len(not_run)
            assert all("you have 2 commands waiting" in body(e) for e in not_run), body(not_run[0])
            rtts = []
            for i in range(20):
                t0 = time.monotonic()
                say(a, f"ok{i}", f"still talking {i}")
                await a.expect(lambda e, i=i: body(e) == f"still talking {i}", timeout=5)
                rtts.append(time.monotonic() - t0)
            rtts.sort()
            print(f"room round trip during the flood: p50 {rtts[10] * 1000:.1f} ms, max {rtts[-1] * 1000:.1f} ms")
            assert rtts[-1] < 1.0
            relay.hang(False)
            for c in (a, b):
                await c.close()
        finally:
            cr.cleanup()
    run(go())


BOOKMARKS = "urn:xmpp:bookmarks:1"


async def bookmarks(c, n):
    """The rooms in c's XEP-0402 bookmarks: {room JID: autojoin}, as c's own client reads them."""
    iq = await c.iq(f"<iq type='get' id='bm{n}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                    f"<items node='{BOOKMARKS}'/></pubsub></iq>", f"bm{n}")
    items = iq.findall(".//{http://jabber.org/protocol/pubsub}item")
    return {i.get("id"): i.find(f"{{{BOOKMARKS}}}conference").get("autojoin") for i in items
            if i.find(f"{{{BOOKMARKS}}}conference") is not None}


async def until_bookmarks(c, pred, what, timeout=20):
    deadline = time.time() + timeout
    n = 0
    while True:
        n += 1
        marks = await bookmarks(c, f"{c.user}{n}")
        if pred(marks):
            return marks
        if time.time() > deadline:
            raise AssertionError(f"{c.user}: {what}; bookmarks: {marks}")
        await asyncio.sleep(0.5)


def invited(room):
    return lambda e: (x := e.find("{jabber:x:conference}x")) is not None and x.get("jid") == f"{room}@{DOMAIN}"


def test_synced_rooms_appear_in_members_bookmarks_and_go_when_access_does(redmine):
    """XEP-0356 + XEP-0402: on a Prosody that grants caseroom pubsub IQs (mod_privilege), each member
    of a synced project finds its room in their bookmarks with autojoin, read by their own client; a
    bookmark removed by hand stays removed; losing access takes it away; nobody there is invited the
    old way. On ejabberd 23.01, whose mod_privilege has no IQ permission, members are invited."""
    rm = redmine["rm"]
    st, _ = rm.call("POST", "/projects.json", {"project": {"name": "Marks", "identifier": "marks", "is_public": False,
                                                          "enabled_module_names": ["issue_tracking"]}})
    assert st in (201, 422), st
    dave = user_id(rm, "dave", "Dave", "Tester")
    erin = user_id(rm, "erin", "Erin", "Tester")
    for uid in (redmine["ids"]["alice"], dave):
        ensure_member(rm, "marks", uid, 4)
    room = f"marks@{DOMAIN}"

    async def prosody():
        srv = XmppServer("prosody", privileged=True)
        srv.start()
        cr = Caseroom(srv, [], extra=config(redmine), http_port=redmine["hook_port"]).start()
        try:
            a = await Client("alice", srv).start()
            d = await Client("dave", srv).start()
            e = await Client("erin", srv).start()
            marks = await until_bookmarks(a, lambda m: room in m, "the synced room never appeared")
            assert marks[room] in ("true", "1"), marks
            await until_bookmarks(d, lambda m: room in m, "the synced room never appeared")
            # Alice deletes it by hand: syncs (every second) do not bring it back.
            await a.iq(f"<iq type='set' id='del'><pubsub xmlns='http://jabber.org/protocol/pubsub'><retract node='{BOOKMARKS}' "
                       f"notify='true'><item id='{room}'/></retract></pubsub></iq>", "del")
            await asyncio.sleep(4)
            assert room not in await bookmarks(a, "after-del")
            # …nor does a restart (who was given the bookmark is in the store).
            assert cr.stop() == 0
            cr.start()
            await asyncio.sleep(4)
            assert room not in await bookmarks(a, "after-restart")
            # Dave leaves the project in Redmine: the bookmark goes.
            _, ms = rm.call("GET", "/projects/marks/memberships.json")
            m = [m for m in ms["memberships"] if m.get("user", {}).get("id") == dave][0]
            rm.call("DELETE", f"/memberships/{m['id']}.json")
            await until_bookmarks(d, lambda m: room not in m, "the bookmark stayed after access was lost")
            # Erin joins the project: a bookmark, not an invitation.
            rm.call("POST", "/projects/marks/memberships.json", {"membership": {"user_id": erin, "role_ids": [5]}})
            await until_bookmarks(e, lambda m: room in m, "the new member got no bookmark")
            await asyncio.sleep(1)
            assert not any(invited("marks")(x) for c in (a, d, e) for x in c.received), "bookmarked, not invited"
            await wait_for_room(e, room="marks")
            for c in (a, d, e):
                await c.close()
        finally:
            cr.cleanup()
            srv.cleanup()
            ensure_member(rm, "marks", dave, 4)
            _, ms = rm.call("GET", "/projects/marks/memberships.json")
            for m in ms["memberships"]:
                if m.get("user", {}).get("id") == erin:
                    rm.call("DELETE", f"/memberships/{m['id']}.json")

    async def ejabberd():
        srv = XmppServer("ejabberd", privileged=True)
        srv.start()
        cr = Caseroom(srv, [], extra=config(redmine), http_port=redmine["hook_port"])
        try:
            d = await Client("dave", srv).start()  # online first: ejabberd here keeps no offline messages
            cr.start()
            await d.expect(invited("marks"), timeout=20, what="invitation")
            assert room not in await bookmarks(d, "ej"), "no privilege, no bookmark"
            await wait_for_log(cr, "grants no pubsub IQ privilege")
            assert "grants no pubsub IQ privilege" in cr.log.read_text()
            await d.close()
        finally:
            cr.cleanup()
            srv.cleanup()

    run(prosody())
    run(ejabberd())
