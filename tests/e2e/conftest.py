"""Fixtures: one throwaway XMPP server per kind (module scope), and a pass/fail table per server."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import XmppServer  # noqa: E402

RESULTS = {}


@pytest.fixture(scope="module", params=["prosody", "ejabberd"])
def server(request):
    srv = XmppServer(request.param)
    srv.start()
    yield srv
    srv.cleanup()


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    name, _, param = report.nodeid.partition("[")
    RESULTS.setdefault(name.split("::")[-1], {})[param.rstrip("]")] = report.outcome


def pytest_sessionfinish(session):
    out = os.environ.get("CASEROOM_E2E_TABLE")
    if not out or not RESULTS:
        return
    lines = ["| scenario | prosody | ejabberd |", "|---|---|---|"]
    for test, by_server in RESULTS.items():
        lines.append(f"| {test} | {by_server.get('prosody', '-')} | {by_server.get('ejabberd', '-')} |")
    Path(out).write_text("\n".join(lines) + "\n")
