"""End-to-end harness: real Prosody/ejabberd on loopback, the real caseroom binary, slixmpp clients.

Everything here is plumbing; the assertions live in test_*.py.
"""
import asyncio
import copy
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ROOT / "tests" / "servers"
DOMAIN = "rooms.localhost"
SECRET = "e2e-secret"

NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_MAM = "urn:xmpp:mam:2"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_SID = "urn:xmpp:sid:0"
NS_OID = "urn:xmpp:occupant-id:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"

# CASEROOM_E2E_STORE=postgres: every caseroom of the run keeps its store in PostgreSQL (a throwaway
# cluster started once, tests/servers/postgres.sh; a new database per caseroom) instead of SQLite.
# CASEROOM_E2E_PG_TLS=1 besides: that cluster takes only TLS, and caseroom connects with
# sslmode=require, trusting the cluster's throwaway CA (store.ca_file).
_PG = {}


def store_url(force=False):
    """A new database on the run's PostgreSQL cluster, or None when the run uses SQLite."""
    if not force and os.environ.get("CASEROOM_E2E_STORE", "sqlite") != "postgres":
        return None
    if not _PG:
        import atexit
        d = tempfile.mkdtemp(prefix="caseroom-pg-")
        env = dict(os.environ, PG_TLS=os.environ.get("CASEROOM_E2E_PG_TLS", "0"))
        subprocess.run([str(SERVERS / "postgres.sh"), d, str(free_port())], check=True, stdout=subprocess.DEVNULL,
                       env=env)
        _PG.update(dir=d, url=(Path(d) / "url").read_text().strip(), n=0)
        def stop_cluster():
            subprocess.run([str(SERVERS / "postgres.sh"), "--stop", d], check=False)
            # Its data directory is ~90 MB; a run must not leave it behind in /tmp.
            shutil.rmtree(d, ignore_errors=True)
        atexit.register(stop_cluster)
    _PG["n"] += 1
    name = f"cr{_PG['n']}"
    base, last = _PG["url"].rsplit("/", 1)
    query = last[last.index("?"):] if "?" in last else ""
    subprocess.run(["psql", f"{base}/postgres{query}", "-qc", f"CREATE DATABASE {name}"], check=True,
                   stdout=subprocess.DEVNULL)
    return f"{base}/{name}{query}"


def pg_ca_file():
    """The throwaway cluster's CA, when it takes only TLS (CASEROOM_E2E_PG_TLS=1)."""
    ca = Path(_PG["dir"]) / "tls" / "ca.pem" if _PG else None
    return ca if ca and ca.exists() else None


def binary():
    for kind in ("release", "debug"):
        p = ROOT / "target" / kind / "caseroom"
        if p.exists():
            return p
    raise RuntimeError("build caseroom first: cargo build --release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class XmppServer:
    """A throwaway Prosody or ejabberd (tests/servers/*.sh)."""

    def __init__(self, kind, privileged=False, balancing=False):
        self.kind = kind
        # ejabberd: several caseroom instances as one component (domain_balancing).
        self.balancing = balancing
        # XEP-0356: caseroom may write localhost users' bookmarks (Prosody; ejabberd 23.01 grants
        # roster and message only). See tests/servers/*.sh, XMPP_PRIVILEGE.
        self.privileged = privileged
        self.dir = tempfile.mkdtemp(prefix=f"caseroom-{kind}-")
        os.chmod(self.dir, 0o755)
        self.c2s = free_port()
        self.component = free_port()
        while self.component == self.c2s:
            self.component = free_port()
        # ejabberd's Erlang distribution port: a free one too (its default, C2S + 1, may be taken:
        # CI once saw "inet_tcp: register/listen error: eaddrinuse" there).
        self.dist = free_port()
        while self.dist in (self.c2s, self.component):
            self.dist = free_port()

    def start(self):
        env = dict(os.environ, XMPP_PRIVILEGE="1" if self.privileged else "0",
                   EJABBERD_BALANCING="1" if self.balancing else "0")
        args = [str(SERVERS / f"{self.kind}.sh"), self.dir, str(self.c2s), str(self.component), DOMAIN, SECRET]
        if self.kind == "ejabberd":
            args.append(str(self.dist))
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)

    def stop(self):
        subprocess.run([str(SERVERS / "stop.sh"), self.dir], check=False, stdout=subprocess.DEVNULL)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Caseroom:
    """The caseroom binary with a temporary config and store."""

    def __init__(self, server, rooms, secret=SECRET, extra="", http_port=None, url=None):
        self.xmpp_server = server
        self.dir = tempfile.mkdtemp(prefix="caseroom-run-")
        self.http = http_port or free_port()
        self.config = Path(self.dir) / "caseroom.toml"
        url = url or store_url()
        self.url = url
        pg = f'url = "{url}"\n' if url else ""
        if url and "sslmode=require" in url and pg_ca_file():
            pg += f'ca_file = "{pg_ca_file()}"\n'
        room_toml = ""
        for r in rooms:
            room_toml += (f'[[room]]\nname = "{r["name"]}"\ntitle = "{r.get("title", r["name"])}"\n'
                          f'owners = {r.get("owners", [])!r}\nadmins = {r.get("admins", [])!r}\n'
                          f'members = {r.get("members", [])!r}\n').replace("'", '"')
        self.config.write_text(
            f'[component]\njid = "{DOMAIN}"\nserver = "127.0.0.1:{server.component}"\nsecret = "{secret}"\n'
            f'ping_interval_secs = 20\n'
            f'[store]\npath = "{self.dir}/caseroom.db"\n{pg}[http]\nlisten = "127.0.0.1:{self.http}"\n{room_toml}\n{extra}\n')
        self.proc = None
        self.log = Path(self.dir) / "caseroom.log"

    def start(self, wait=True, env=None):
        self.logf = open(self.log, "ab")
        env = dict(os.environ, CASEROOM_LOG=os.environ.get("CASEROOM_LOG", "info,caseroom=debug"), **(env or {}))
        self.proc = subprocess.Popen([str(binary()), "run", "--config", str(self.config)],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_healthy()
        return self

    def health(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def post(self, tracker, body, headers):
        """POST a webhook; returns (status, parsed JSON answer)."""
        import json
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/hooks/{tracker}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def health_json(self):
        import json
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz", timeout=1) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def metrics(self):
        """GET /metrics; returns {sample name with labels: value} and the Content-Type."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=5) as r:
            ctype = r.headers.get("Content-Type")
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples, ctype

    def wait_healthy(self, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"caseroom exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if self.health() == 200:
                return time.time()
            time.sleep(0.05)
        raise RuntimeError(f"caseroom not healthy after {timeout}s:\n{self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def cleanup(self):
        self.stop(signal.SIGKILL)
        keep = os.environ.get("CASEROOM_E2E_KEEP_LOGS")
        if keep:
            shutil.copy(self.log, Path(keep) / f"caseroom-{Path(self.dir).name}.log")
        shutil.rmtree(self.dir, ignore_errors=True)


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records every stanza it receives, for expect()."""

    def __init__(self, user, server, resource="e2e"):
        password = "pw-load" if user.startswith("load") else f"pw-{user}"
        super().__init__(f"{user}@localhost/{resource}", password)
        self.user = user
        self.xmpp_server = server
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.received = []
        self.cond = asyncio.Condition()
        for name in ("message", "presence", "iq"):
            self.register_handler(Callback(f"capture-{name}", MatchXPath(f"{{jabber:client}}{name}"), self._capture))
        self.online = asyncio.get_event_loop().create_future()
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("failed_auth", lambda *_: self.online.done() or self.online.set_exception(RuntimeError("auth failed")))

    def _capture(self, stanza):
        self.received.append(copy.deepcopy(stanza.xml))
        asyncio.ensure_future(self._notify())

    async def _notify(self):
        async with self.cond:
            self.cond.notify_all()

    async def _started(self, _):
        self.send_presence()
        if not self.online.done():
            self.online.set_result(True)

    async def start(self):
        self.connect("127.0.0.1", self.xmpp_server.c2s)
        await asyncio.wait_for(self.online, 10)
        return self

    async def expect(self, pred, timeout=5.0, what="stanza"):
        """Wait for (and consume) the first received stanza matching pred."""
        deadline = asyncio.get_event_loop().time() + timeout
        while True:
            for i, el in enumerate(self.received):
                if pred(el):
                    return self.received.pop(i)
            left = deadline - asyncio.get_event_loop().time()
            if left <= 0:
                seen = "\n".join(ET.tostring(e, encoding="unicode")[:300] for e in self.received[-8:])
                raise AssertionError(f"{self.user}: no {what} within {timeout}s; last received:\n{seen}")
            async with self.cond:
                try:
                    await asyncio.wait_for(self.cond.wait(), left)
                except asyncio.TimeoutError:
                    pass

    def raw(self, xml):
        self.send_raw(xml)

    async def iq(self, xml, iq_id, timeout=5.0):
        self.raw(xml)
        return await self.expect(lambda e: e.tag == "{jabber:client}iq" and e.get("id") == iq_id, timeout, f"iq {iq_id}")

    async def join(self, room, nick, history=None, expect_ok=True):
        h = "" if history is None else f"<history maxstanzas='{history}'/>"
        to = f"{room}@{DOMAIN}/{nick}"
        self.raw(f"<presence to='{to}'><x xmlns='http://jabber.org/protocol/muc'>{h}</x></presence>")
        if not expect_ok:
            return await self.expect(lambda e: e.tag == "{jabber:client}presence" and e.get("from") == to, what="join answer")
        pres = await self.expect(lambda e: e.tag == "{jabber:client}presence" and e.get("from") == to
                                 and (e.get("type") == "error" or self_presence(e)), what="self-presence")
        assert pres.get("type") != "error", ET.tostring(pres, encoding="unicode")
        await self.expect(lambda e: e.tag == "{jabber:client}message" and e.find("{jabber:client}subject") is not None,
                          what="subject")
        return pres

    async def close(self):
        self.disconnect()
        try:
            await asyncio.wait_for(self.disconnected, 5)
        except Exception:
            pass


def statuses(el):
    x = el.find(f"{{{NS_MUC_USER}}}x")
    return set() if x is None else {s.get("code") for s in x.findall(f"{{{NS_MUC_USER}}}status")}


def self_presence(el):
    return "110" in statuses(el)


def error_condition(el):
    err = el.find("{jabber:client}error")
    if err is None:
        return None
    for c in err:
        if c.tag.startswith(f"{{{NS_STANZAS}}}") and not c.tag.endswith("}text"):
            return c.tag.split("}")[1]
    return None


def body(el):
    b = el.find("{jabber:client}body")
    return None if b is None else b.text


NS_CMD = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"


async def command(c, iq_id, to, node, action=None, sessionid=None, fields=None, timeout=15.0):
    """Send one XEP-0050 <command/> (with a submitted form if fields is given); returns the answer IQ."""
    from xml.sax.saxutils import escape, quoteattr
    attrs = f"node={quoteattr(node)}"
    if action:
        attrs += f" action={quoteattr(action)}"
    if sessionid:
        attrs += f" sessionid={quoteattr(sessionid)}"
    form = ""
    if fields is not None:
        fs = ""
        for var, vals in fields.items():
            vals = vals if isinstance(vals, list) else [vals]
            fs += f"<field var={quoteattr(var)}>" + "".join(f"<value>{escape(v)}</value>" for v in vals) + "</field>"
        form = f"<x xmlns='{NS_DATA}' type='submit'>{fs}</x>"
    return await c.iq(f"<iq type='set' id='{iq_id}' to='{to}'><command xmlns='{NS_CMD}' {attrs}>{form}</command></iq>",
                      iq_id, timeout)


def command_of(iq):
    """(status, sessionid, notes [(type, text)], {var: [values]} of the form, form element) of a command answer."""
    cmd = iq.find(f"{{{NS_CMD}}}command")
    assert cmd is not None, ET.tostring(iq, encoding="unicode")
    notes = [(n.get("type", "info"), n.text or "") for n in cmd.findall(f"{{{NS_CMD}}}note")]
    x = cmd.find(f"{{{NS_DATA}}}x")
    fields = {}
    if x is not None:
        for f in x.findall(f"{{{NS_DATA}}}field"):
            fields[f.get("var")] = [v.text or "" for v in f.findall(f"{{{NS_DATA}}}value")]
    return cmd.get("status"), cmd.get("sessionid"), notes, fields, x


def specific_condition(iq):
    """The XEP-0050 specific error condition (bad-sessionid, …) of an error IQ."""
    err = iq.find("{jabber:client}error")
    if err is None:
        return None
    for c in err:
        if c.tag.startswith(f"{{{NS_CMD}}}"):
            return c.tag.split("}")[1]
    return None
