"""End-to-end XEP-0050: the room's "My filters" and the service's operator commands, through real servers."""
import asyncio

from harness import (DOMAIN, NS_CMD, Caseroom, Client, body, command, command_of, error_condition,
                     specific_condition)

ROOM = "ops"
ROOM_JID = f"{ROOM}@{DOMAIN}"
ROOMS = [{"name": ROOM, "owners": ["alice@localhost"], "members": ["bob@localhost"]}]
EXTRA = '[muc]\noperators = ["alice@localhost"]\n'


def run(coro, timeout=120):
    asyncio.run(asyncio.wait_for(coro, timeout))


async def items(c, iq_id, to):
    iq = await c.iq(f"<iq type='get' id='{iq_id}' to='{to}'><query xmlns='http://jabber.org/protocol/disco#items' "
                    f"node='{NS_CMD}'/></iq>", iq_id)
    assert iq.get("type") == "result", error_condition(iq)
    return {i.get("node"): i.get("name") for i in iq.iter("{http://jabber.org/protocol/disco#items}item")}


def test_room_and_service_commands(server):
    async def go():
        cr = Caseroom(server, ROOMS, extra=EXTRA).start()
        try:
            a = await Client("alice", server).start()
            b = await Client("bob", server).start()
            e = await Client("erin", server).start()
            # Discovery: the feature, and only the commands each person may run.
            info = await a.iq(f"<iq type='get' id='i1' to='{ROOM_JID}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", "i1")
            assert any(f.get("var") == NS_CMD for f in info.iter("{http://jabber.org/protocol/disco#info}feature"))
            assert await items(a, "i2", ROOM_JID) == {"my-filters": "My filters"}, "no tracker: only My filters"
            assert await items(e, "i3", ROOM_JID) == {}, "hidden from non-members"
            assert set(await items(a, "i4", DOMAIN)) == {"resync", "status"}
            assert await items(b, "i5", DOMAIN) == {}, "not an operator"

            # My filters: a form with the current rules, then a submission; a bad line is reported, not fatal.
            st, sid, notes, fields, x = command_of(await command(a, "f1", ROOM_JID, "my-filters"))
            assert st == "executing" and sid and fields["rules"] == [] and x.get("type") == "form"
            st, sid2, notes, _, _ = command_of(await command(a, "f2", ROOM_JID, "my-filters", "complete", sid,
                                                             {"rules": ["ci succeeded", "bogus words"]}))
            assert st == "completed" and sid2 == sid
            assert ("info", "hidden for you in this room: event=ci verb=succeeded") in notes, notes
            assert any(t == "warn" and "bogus" in text for t, text in notes), notes
            # The same rules as !mute keeps: !filters lists them.
            await a.join(ROOM, "Alice")
            a.raw(f"<message to='{ROOM_JID}' type='groupchat' id='m1'><body>!filters</body></message>")
            got = await a.expect(lambda el: (body(el) or "").startswith("hidden for you:"), timeout=10)
            assert "event=ci verb=succeeded" in body(got)
            # Reopening the form shows them.
            _, _, _, fields, _ = command_of(await command(a, "f3", ROOM_JID, "my-filters"))
            assert fields["rules"] == ["event=ci verb=succeeded"]

            # Errors with the §4.6 conditions.
            err = await command(e, "x1", ROOM_JID, "my-filters")
            assert error_condition(err) == "item-not-found", "a non-member does not see the room's commands"
            err = await command(a, "x2", ROOM_JID, "my-filters", "complete", "no-such-session", {"rules": []})
            assert (error_condition(err), specific_condition(err)) == ("bad-request", "bad-sessionid")
            _, sid, _, _, _ = command_of(await command(a, "x3", ROOM_JID, "my-filters"))
            err = await command(a, "x4", ROOM_JID, "my-filters", "next", sid)
            assert (error_condition(err), specific_condition(err)) == ("bad-request", "bad-action")
            err = await command(a, "x5", ROOM_JID, "my-filters", "jump")
            assert (error_condition(err), specific_condition(err)) == ("bad-request", "malformed-action")
            err = await command(a, "x6", ROOM_JID, "no-such-command")
            assert error_condition(err) == "item-not-found"
            _, sid, _, _, _ = command_of(await command(a, "x7", ROOM_JID, "my-filters"))
            st, _, _, _, _ = command_of(await command(a, "x8", ROOM_JID, "my-filters", "cancel", sid))
            assert st == "canceled"

            # Operator commands.
            st, _, _, fields, x = command_of(await command(a, "s1", DOMAIN, "status"))
            assert st == "completed" and x.get("type") == "result"
            assert fields["xmpp-link"][0].startswith("up;"), fields
            assert fields["rooms"][0].startswith("1 rooms, 1 occupants"), fields
            st, _, notes, _, _ = command_of(await command(a, "s2", DOMAIN, "resync"))
            assert st == "completed" and notes[0][0] == "warn", "no tracker to sync says so"
            err = await command(b, "s3", DOMAIN, "status")
            assert error_condition(err) == "forbidden"
            for cl in (a, b, e):
                await cl.close()
        finally:
            cr.cleanup()
    run(go())
