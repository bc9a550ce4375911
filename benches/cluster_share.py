#!/usr/bin/env python3
"""One caseroom instance vs two on one component domain (ejabberd domain_balancing, PostgreSQL store):
how the rooms' traffic splits between the instances, and what each spends per delivered stanza.

Run (needs Debian's ejabberd and postgresql, slixmpp; `cargo build --release` first):
    python3 benches/cluster_share.py
For each setup, in the same run: 12 rooms, each with alice and 4 load users joined; alice sends messages
round-robin to the rooms at a paced rate; every message is delivered to 5 sessions. Reported per instance:
its share of the stanzas sent, and its CPU (utime + stime from /proc, the caseroom process only) divided by
the stanzas it sent; and ejabberd's CPU per delivered stanza (the beam process), for the capacity model.
"""
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from harness import DOMAIN, Caseroom, Client, XmppServer, body, store_url  # noqa: E402

ROOMS = 12
PER_ROOM = 4
MESSAGES = int(os.environ.get("CLUSTER_BENCH_MESSAGES", "1200"))
RATE = float(os.environ.get("CLUSTER_BENCH_RATE", "150"))  # messages per second


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(srv):
    """ejabberd's beam process (the group leader's child that uses CPU)."""
    pgid = int(Path(srv.dir, "server.pid").read_text())
    best, most = pgid, -1.0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[2]) == pgid and "beam" in (p / "comm").read_text():
                    c = cpu_seconds(int(p.name))
                    if c > most:
                        best, most = int(p.name), c
            except (OSError, IndexError, ValueError):
                pass
    return best


def rooms():
    users = [f"load{i:02d}" for i in range(1, ROOMS * PER_ROOM + 1)]
    return [{"name": f"b{r}", "title": f"Bench {r}", "owners": ["alice@localhost"], "admins": [],
             "members": [f"{u}@localhost" for u in users[r * PER_ROOM:(r + 1) * PER_ROOM]]} for r in range(ROOMS)]


async def measure(srv, instances):
    url = store_url(force=True)
    env = {"CASEROOM_MUC_MESSAGE_BURST": "100000", "CASEROOM_MUC_MESSAGES_PER_MINUTE": "100000"}
    os.environ["CASEROOM_LOG"] = "warn"
    crs = [Caseroom(srv, rooms(), url=url).start(env=env) for _ in range(instances)]
    try:
        a = await Client("alice", srv).start()
        loads = []
        for r in rooms():
            await a.join(r["name"], "Alice", history=0)
            for m in r["members"]:
                c = await Client(m.split("@")[0], srv).start()
                await c.join(r["name"], m.split("@")[0], history=0)
                loads.append(c)
        await asyncio.sleep(1.5)
        a.received.clear()
        for c in loads:
            c.received.clear()
        ej = server_pid(srv)
        before = [(cpu_seconds(cr.proc.pid), cr.metrics()[0]["caseroom_stanzas_out_total"]) for cr in crs]
        ej0 = cpu_seconds(ej)
        t0 = time.time()
        for i in range(MESSAGES):
            a.raw(f"<message to='b{i % ROOMS}@{DOMAIN}' type='groupchat' id='m{i}'><body>m {i}</body></message>")
            lag = t0 + (i + 1) / RATE - time.time()
            if lag > 0:
                await asyncio.sleep(lag)
        await a.expect(lambda e: body(e) == f"m {MESSAGES - 1}", timeout=60, what="the last message")
        await asyncio.sleep(2)
        took = time.time() - t0
        after = [(cpu_seconds(cr.proc.pid), cr.metrics()[0]["caseroom_stanzas_out_total"]) for cr in crs]
        ej1 = cpu_seconds(ej)
        got = sum(1 for c in loads for e in c.received if (body(e) or "").startswith("m "))
        for c in loads + [a]:
            await c.close()
        sent = [x[1] - b[1] for x, b in zip(after, before)]
        cpu = [x[0] - b[0] for x, b in zip(after, before)]
        total = sum(sent)
        return {"instances": instances, "took": took, "delivered_to_load_users": got, "expected": MESSAGES * PER_ROOM,
                "share": [s / total for s in sent], "us_per_stanza": [c * 1e6 / s if s else 0 for c, s in zip(cpu, sent)],
                "caseroom_us_per_stanza": sum(cpu) * 1e6 / total, "ejabberd_us_per_stanza": (ej1 - ej0) * 1e6 / total,
                "stanzas": total}
    finally:
        for cr in crs:
            cr.cleanup()


async def main():
    results = []
    for n in (1, 2):
        # One instance: ejabberd as usual; two: domain_balancing with component_number 2 (a
        # missing instance's share would be dropped, and ejabberd refuses component_number 1).
        os.environ["EJABBERD_COMPONENTS"] = str(max(n, 2))
        srv = XmppServer("ejabberd", balancing=n > 1)
        srv.start()
        try:
            results.append(await measure(srv, n))
        finally:
            srv.cleanup()
    for r in results:
        print(f"{r['instances']} instance(s): {r['stanzas']:.0f} stanzas out in {r['took']:.1f} s; "
              f"load users got {r['delivered_to_load_users']}/{r['expected']}; share per instance "
              + ", ".join(f"{s:.2f}" for s in r["share"])
              + "; caseroom CPU per stanza per instance " + ", ".join(f"{u:.1f} µs" for u in r["us_per_stanza"])
              + f" (all: {r['caseroom_us_per_stanza']:.1f} µs); ejabberd {r['ejabberd_us_per_stanza']:.1f} µs per stanza")
    one, two = results
    print(f"caseroom CPU per stanza, two instances vs one: {two['caseroom_us_per_stanza'] / one['caseroom_us_per_stanza']:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
