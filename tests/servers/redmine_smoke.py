#!/usr/bin/env python3
"""Smoke test of a Redmine started by redmine.sh, through its REST API only (standard library only).

Usage: redmine_smoke.py PORT KEY
  KEY is the admin's API key, or a file holding it (e.g. DIR/admin_api_key written by redmine.sh).

Sets up (or finds, when it already exists: the script is re-runnable, with or without redmine.sh --reset)
  project  webteam (private, all trackers, module issue_tracking)
  users    alice, bob (mail LOGIN@example.org, password LOGIN-secret-pw)
  members  alice as Manager (role 3), bob as Developer (role 4)
then, acting as the users through the admin key plus X-Redmine-Switch-User:
  bob creates an issue (assigned to alice), alice adds a note, alice closes it,
and reads the issue back with its journals: author bob, closed, alice's journal with the note and the
status change; the issue also shows up in a change poll (updated_on>=, status_id=*).
Prints the time of each step; exits 1 on the first failure.
"""
import http.client
import json
import os
import sys
import time

PROJECT = "webteam"
USERS = {"alice": 3, "bob": 4}  # login -> role id (Manager, Developer)


class Fail(Exception):
    pass


class Redmine:
    def __init__(self, port, key):
        self.port, self.key = port, key

    def call(self, method, path, body=None, as_user=None):
        """One request on its own connection; returns (status, parsed JSON body or None).

        Not kept alive on purpose: webrick writes a response in several segments, and on a reused
        connection Nagle plus the client's delayed ACK add ~50 ms to every request (20 ms -> 75 ms).
        """
        headers = {"X-Redmine-API-Key": self.key, "Accept": "application/json",
                   "Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if as_user:
            headers["X-Redmine-Switch-User"] = as_user
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        parsed = None
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")[:500]
        return resp.status, parsed


def expect(cond, msg):
    if not cond:
        raise Fail(msg)


class Steps:
    """Runs named steps, printing each one's wall time."""

    def __init__(self):
        self.total = 0.0

    def run(self, name, fn):
        t = time.perf_counter()
        result, detail = fn()
        ms = (time.perf_counter() - t) * 1000
        self.total += ms
        print(f"{name:<34} {ms:8.1f} ms  {detail}", flush=True)
        return result


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    port = int(sys.argv[1])
    key = sys.argv[2]
    if os.path.isfile(key):
        with open(key) as f:
            key = f.read().strip()
    rm = Redmine(port, key)
    steps = Steps()
    ids = {}

    def current():
        st, body = rm.call("GET", "/users/current.json")
        expect(st == 200, f"GET /users/current.json with the admin key: HTTP {st} {body}")
        expect(body["user"].get("admin"), f"the key is not an admin's: {body}")
        return None, f"admin = {body['user']['login']}"

    def lookups():
        st, trackers = rm.call("GET", "/trackers.json")
        expect(st == 200, f"GET /trackers.json: HTTP {st}")
        st, roles = rm.call("GET", "/roles.json")
        expect(st == 200, f"GET /roles.json: HTTP {st}")
        st, statuses = rm.call("GET", "/issue_statuses.json")
        expect(st == 200, f"GET /issue_statuses.json: HTTP {st}")
        by_name = {r["name"]: r["id"] for r in roles["roles"]}
        expect(by_name.get("Manager") == 3 and by_name.get("Developer") == 4,
               f"unexpected role ids: {by_name}")
        closed = [s for s in statuses["issue_statuses"] if s.get("is_closed")]
        expect(closed, f"no closed status: {statuses}")
        ids["trackers"] = [t["id"] for t in trackers["trackers"]]
        ids["closed"] = closed[0]["id"]
        return None, (f"trackers {ids['trackers']}, closed status {closed[0]['name']} "
                      f"({ids['closed']})")

    def project():
        st, body = rm.call("POST", "/projects.json", {"project": {
            "name": "Web team", "identifier": PROJECT, "is_public": False,
            "tracker_ids": ids["trackers"], "enabled_module_names": ["issue_tracking"]}})
        if st == 201:
            ids["project"] = body["project"]["id"]
            return None, f"created, id {ids['project']}"
        expect(st == 422, f"POST /projects.json: HTTP {st} {body}")
        st2, got = rm.call("GET", f"/projects/{PROJECT}.json?include=trackers,enabled_modules")
        expect(st2 == 200, f"POST gave 422 {body}, but GET /projects/{PROJECT}.json: HTTP {st2}")
        mods = [m["name"] for m in got["project"].get("enabled_modules", [])]
        expect("issue_tracking" in mods, f"existing project lacks issue_tracking: {mods}")
        ids["project"] = got["project"]["id"]
        return None, f"already there (422 {body['errors']}), id {ids['project']}"

    def user(login):
        def fn():
            st, body = rm.call("POST", "/users.json", {"user": {
                "login": login, "firstname": login.capitalize(), "lastname": "Example",
                "mail": f"{login}@example.org", "password": f"{login}-secret-pw"}})
            if st == 201:
                ids[login] = body["user"]["id"]
                return None, f"created, id {ids[login]}"
            expect(st == 422, f"POST /users.json ({login}): HTTP {st} {body}")
            st2, got = rm.call("GET", f"/users.json?name={login}&status=")
            match = [u for u in (got or {}).get("users", []) if u["login"] == login]
            expect(st2 == 200 and match, f"POST gave 422 {body}, and no user {login} found")
            ids[login] = match[0]["id"]
            return None, f"already there (422 {body['errors']}), id {ids[login]}"
        return fn

    def member(login):
        role = USERS[login]

        def fn():
            st, body = rm.call("POST", f"/projects/{PROJECT}/memberships.json",
                               {"membership": {"user_id": ids[login], "role_ids": [role]}})
            if st == 201:
                return None, f"created, role {role}"
            expect(st == 422, f"POST memberships ({login}): HTTP {st} {body}")
            st2, got = rm.call("GET", f"/projects/{PROJECT}/memberships.json?limit=100")
            expect(st2 == 200, f"GET memberships: HTTP {st2}")
            mine = [m for m in got["memberships"] if m.get("user", {}).get("id") == ids[login]]
            expect(mine and role in [r["id"] for r in mine[0]["roles"]],
                   f"POST gave 422 {body}, and {login} lacks role {role}: {mine}")
            return None, f"already there (422 {body['errors']})"
        return fn

    def create_issue():
        ids["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        subject = f"Smoke test issue {time.strftime('%H:%M:%S')}"
        st, body = rm.call("POST", "/issues.json", {"issue": {
            "project_id": PROJECT, "subject": subject,
            "description": "Created by redmine_smoke.py as bob.",
            "assigned_to_id": ids["alice"]}}, as_user="bob")
        expect(st == 201, f"POST /issues.json as bob: HTTP {st} {body}")
        issue = body["issue"]
        expect(issue["author"]["id"] == ids["bob"], f"author is not bob: {issue['author']}")
        ids["issue"] = issue["id"]
        return None, f"#{issue['id']} by {issue['author']['name']}"

    def note():
        st, body = rm.call("PUT", f"/issues/{ids['issue']}.json",
                           {"issue": {"notes": "Looked at it (alice)."}}, as_user="alice")
        expect(st == 204, f"PUT note as alice: HTTP {st} {body}")
        return None, "204"

    def close():
        st, body = rm.call("PUT", f"/issues/{ids['issue']}.json",
                           {"issue": {"notes": "Done.", "status_id": ids["closed"]}},
                           as_user="alice")
        expect(st == 204, f"PUT status_id={ids['closed']} as alice: HTTP {st} {body}")
        return None, "204"

    def read_back():
        st, body = rm.call("GET", f"/issues/{ids['issue']}.json?include=journals")
        expect(st == 200, f"GET issue: HTTP {st} {body}")
        issue = body["issue"]
        expect(issue["author"]["id"] == ids["bob"], f"author is not bob: {issue['author']}")
        expect(issue["status"]["id"] == ids["closed"], f"not closed: {issue['status']}")
        journals = issue.get("journals", [])
        by_alice = [j for j in journals if j["user"]["id"] == ids["alice"]]
        expect(len(by_alice) == 2, f"expected 2 journals by alice: {journals}")
        expect(by_alice[0]["notes"] == "Looked at it (alice).", f"note lost: {by_alice[0]}")
        change = [d for d in by_alice[1]["details"] if d["name"] == "status_id"]
        expect(change and change[0]["new_value"] == str(ids["closed"]),
               f"no status change in {by_alice[1]}")
        return None, (f"author {issue['author']['name']}, status {issue['status']['name']}, "
                      f"journals {[j['id'] for j in journals]}")

    def poll():
        q = (f"/issues.json?project_id={PROJECT}&status_id=*&sort=updated_on&limit=100"
             f"&updated_on=%3E%3D{ids['since']}")
        st, body = rm.call("GET", q)
        expect(st == 200, f"GET {q}: HTTP {st}")
        found = [i["id"] for i in body["issues"]]
        expect(ids["issue"] in found, f"#{ids['issue']} not in the poll result {found}")
        return None, f"{body['total_count']} issue(s) updated since {ids['since']}"

    try:
        steps.run("admin key (GET /users/current)", current)
        steps.run("trackers, roles, statuses", lookups)
        steps.run("project webteam", project)
        for login in USERS:
            steps.run(f"user {login}", user(login))
        for login in USERS:
            steps.run(f"membership {login} (role {USERS[login]})", member(login))
        steps.run("issue created as bob", create_issue)
        steps.run("note as alice", note)
        steps.run("closed as alice", close)
        steps.run("read back with journals", read_back)
        steps.run("change poll (updated_on>=)", poll)
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as e:
        print(f"FAIL: cannot talk to Redmine on 127.0.0.1:{port}: {e!r}", file=sys.stderr)
        return 1
    print(f"{'total':<34} {steps.total:8.1f} ms  OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
