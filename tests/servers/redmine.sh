#!/usr/bin/env bash
# Start a throwaway Redmine (Debian's redmine 5 + SQLite) on loopback for end-to-end tests.
# Usage: redmine.sh DIR PORT [--reset]
#
# Installs Redmine from Debian's packages if it is missing (as root, no interaction; ~50 s on a clean
# machine, a no-op afterwards), then serves it with rackup/webrick as www-data on 127.0.0.1:PORT and waits
# until GET /users/current.json with the admin key answers 200 (120 s at most, else exit 1). Writes:
#   DIR/admin_api_key   the admin's REST API key (X-Redmine-API-Key; + X-Redmine-Switch-User: LOGIN to act
#                       as a user); the same in every DIR and after --reset
#   DIR/redmine.sqlite  this DIR's own database (see below)
#   DIR/server.pid      the server's process group (for stop.sh); DIR/server.kind ("redmine"); DIR/server.port
#   DIR/rackup.pid      rackup's pidfile; DIR/stdout.log the server's output (Rails' own log is shared by
#                       all DIRs: /var/log/redmine/default/production.log); DIR/apt.log when it installed
# DIR is created if needed and chowned to www-data (the server writes its pidfile and database there), so
# www-data must be able to reach it: a mktemp -d directory works, one inside a root-only (0700) parent not.
#
# Databases. The first setup on a machine enables the REST API in Debian's database
# (/var/lib/dbconfig-common/sqlite3/redmine/instances/default/redmine_default) and snapshots it as the
# pristine database /var/lib/caseroom-test/redmine/pristine.sqlite, with admin_api_key and redmine.version
# beside it. It outlives any DIR, and is retaken when the redmine package's version changes (then --reset
# existing DIRs: their schema is old). Each DIR runs on its own copy, DIR/redmine.sqlite (via
# DATABASE_URL), made from the pristine one when missing: a new DIR starts pristine, re-running on an
# existing DIR keeps its data, and servers in different DIRs (on different ports) share no data. Debian's
# database itself is never served, so it stays as the snapshot took it.
# To retake the snapshot from Debian's database: rm -r /var/lib/caseroom-test/redmine.
#
# --reset: stop the server in DIR (if any), replace DIR/redmine.sqlite by the pristine database, start
# again (~4 s). Without --reset, a server already running in DIR and answering on PORT is left as it is
# (~0.1 s). Stop with stop.sh DIR. Must run as root; reads no input.
set -euo pipefail
if [[ $# -lt 2 || $# -gt 3 || ( $# -eq 3 && $3 != --reset ) || ! $2 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 DIR PORT [--reset]" >&2
  exit 2
fi
if [[ $(id -u) -ne 0 ]]; then echo "$0 must run as root (it installs packages and runs Redmine as www-data)" >&2; exit 2; fi
RESET=0
if [[ $# -eq 3 ]]; then RESET=1; fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd) PORT=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

APP=/usr/share/redmine
DEBIAN_DB=/var/lib/dbconfig-common/sqlite3/redmine/instances/default/redmine_default
LOCKFILE=/var/lib/redmine/Gemfile.lock   # $APP/Gemfile.lock is a symlink to it
STATE=/var/lib/caseroom-test/redmine
PKGS=(redmine redmine-sqlite ruby-webrick)
DB=$DIR/redmine.sqlite

# Progress on stderr, with the time since the start of this script (EPOCHREALTIME without its decimal
# separator, whatever the locale's, is in microseconds).
T0=${EPOCHREALTIME//[!0-9]/}
say() {
  local ds=$(((${EPOCHREALTIME//[!0-9]/} - T0) / 100000))
  printf '[redmine.sh %3d.%ds] %s\n' $((ds / 10)) $((ds % 10)) "$*" >&2
}
# Run a command as www-data with a clean environment (nothing of the caller's, e.g. CI's, leaks into
# Ruby/Bundler/Rails) and HOME=DIR. setpriv execs (no intermediate process, unlike runuser/su, which fork
# and may start a session of their own), so the server stays in the process group that stop.sh kills.
as_www() {
  setpriv --reuid=www-data --regid=www-data --init-groups \
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$DIR" LANG=C.UTF-8 \
    REDMINE_INSTANCE=default RAILS_ENV=production "$@"
}
pkg_ok() { [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii "* ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Is the server of DIR alive? A zombie (dead, not yet reaped by PID 1) is not.
running() {
  local stat
  [[ -f $DIR/server.pid ]] || return 1
  stat=$(ps -o stat= -p "$(cat "$DIR/server.pid")" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}
# HTTP status of GET /users/current.json with the admin key ("000" when nothing answers).
api_status() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H "X-Redmine-API-Key: $KEY" \
    "http://127.0.0.1:$PORT/users/current.json" || true
}

# The server (and step 4's rails runner) run as www-data with HOME=DIR and write DIR: check that first.
chown www-data:www-data "$DIR"
if ! setpriv --reuid=www-data --regid=www-data --init-groups test -w "$DIR" -a -x "$DIR"; then
  echo "www-data cannot write to $DIR (is a parent directory closed to it?)" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------------------
# 1. Install (each step skips itself when already done).
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${PKGS[@]}"; do pkg_ok "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  say "installing ${PKGS[*]} (not installed and configured: ${missing[*]})"
  # Answers for redmine's debconf questions: let dbconfig-common create an SQLite database, English data.
  # These are also what non-interactive defaults give (sqlite3 is the only type offered when only
  # redmine-sqlite is installed), so a failure is not fatal: after `apt-get purge redmine`, debconf keeps
  # these templates without their questions and refuses the answers ("Cannot find a question for ...").
  debconf-set-selections <<'SEL' || say "preseeding failed (see above); going on with the same defaults"
redmine redmine/instances/default/dbconfig-install boolean true
redmine redmine/instances/default/database-type select sqlite3
redmine redmine/instances/default/default-language select en
SEL
  apt-get update -q >"$DIR/apt.log" 2>&1 || { tail -n 30 "$DIR/apt.log" >&2; exit 1; }
  # ruby-webrick: bookworm has no other app server package (no puma, thin or unicorn).
  # --no-install-recommends leaves out passenger and ~30 image/font packages. With ruby3.1
  # 3.1.7-1~deb12u2 this failed in redmine's postinst (step 2 repairs that); whether it got far enough is
  # checked below.
  apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "${PKGS[@]}" >>"$DIR/apt.log" 2>&1 \
    || say "apt-get install failed (a failed redmine postinst is repaired next); log in $DIR/apt.log"
fi
if [[ ! -f $APP/config.ru ]]; then
  echo "redmine is not unpacked in $APP; the end of $DIR/apt.log:" >&2
  tail -n 30 "$DIR/apt.log" >&2 || true
  exit 1
fi

# webrick must be in the bundle. Written before a failed postinst is re-run in step 2, it is locked by
# the postinst's own `bundle install --local`; step 3 re-locks an install that is already configured.
if ! grep -qs "^gem 'webrick'" "$APP/Gemfile.local"; then
  say "adding webrick to $APP/Gemfile.local"
  echo "gem 'webrick'" >>"$APP/Gemfile.local"
fi

# 2. Debian problem: the bundler of ruby3.1 3.1.7-1~deb12u2 (bookworm-security; Debian reverted it in
# 3.1.7+really3.1.2-0+deb12u1) treats Debian gems that have a gemspec but no gem directory as missing
# (Bundler::GemNotFound: Could not find rotp-6.2.0.gem), so redmine's postinst failed. Creating the empty
# directories fixes it. Any later ruby-* install re-runs redmine's postinst (a dpkg trigger) and could fail
# the same way: this runs whenever one of the packages is not fully configured.
configured=1
for p in "${PKGS[@]}"; do pkg_ok "$p" || configured=0; done
if ((configured == 0)) || [[ -n $(dpkg --audit 2>/dev/null) ]]; then
  say "creating missing gem directories and finishing the configuration (dpkg --configure -a)"
  ruby -rfileutils -e 'Gem::Specification.each { |s|
    next if s.default_gem? || File.directory?(s.full_gem_path)
    FileUtils.mkdir_p(s.full_gem_path) }'
  dpkg --configure -a >>"$DIR/apt.log" 2>&1 || { tail -n 30 "$DIR/apt.log" >&2; exit 1; }
  for p in "${PKGS[@]}"; do
    pkg_ok "$p" || { echo "package $p is still not configured; see $DIR/apt.log" >&2; exit 1; }
  done
fi

if [[ ! -f $DEBIAN_DB ]]; then
  echo "redmine is configured, but dbconfig-common created no SQLite database at $DEBIAN_DB" >&2
  exit 1
fi

# 3. Re-lock the bundle if webrick is not in it yet (the same commands as redmine's postinst).
if ! grep -q '^    webrick ' "$LOCKFILE" 2>/dev/null; then
  say "re-locking the bundle with webrick"
  rm -f "$LOCKFILE"
  (cd "$APP" && BUNDLE_SILENCE_ROOT_WARNING=1 bundle install --local --quiet)
  chown www-data:www-data "$LOCKFILE"
fi

# 4. First setup: enable the REST API in Debian's database and read the admin key (one Rails boot, ~3 s;
# the postinst already created the database and loaded the default data), then snapshot the database as
# the pristine one. No server ever runs on Debian's database, so it is quiescent and a file copy is
# consistent.
VERSION=$(dpkg-query -W -f='${Version}' redmine)
if [[ ! -f $STATE/pristine.sqlite || ! -s $STATE/admin_api_key \
      || $(cat "$STATE/redmine.version" 2>/dev/null) != "$VERSION" ]]; then
  say "first setup: enabling the REST API, reading the admin key, snapshotting the database"
  mkdir -p "$STATE"
  out=$(cd "$APP" && as_www bundle exec rails runner -e production \
    'Setting.rest_api_enabled = "1"; puts "ADMIN_API_KEY=#{User.find_by_login("admin").api_key}"')
  key=$(sed -n 's/^ADMIN_API_KEY=\([0-9a-f]\{40\}\)$/\1/p' <<<"$out")
  if [[ -z $key ]]; then echo "could not read the admin API key; rails runner said:" >&2; echo "$out" >&2; exit 1; fi
  cp -p "$DEBIAN_DB" "$STATE/pristine.sqlite.tmp"
  mv -f "$STATE/pristine.sqlite.tmp" "$STATE/pristine.sqlite"
  echo "$key" >"$STATE/admin_api_key"
  echo "$VERSION" >"$STATE/redmine.version"
fi
KEY=$(cat "$STATE/admin_api_key")
echo "$KEY" >"$DIR/admin_api_key"

# ---------------------------------------------------------------------------------------------------------
# 5. Serve.
if running && ((RESET == 0)) && [[ $(cat "$DIR/server.port" 2>/dev/null) == "$PORT" ]] \
   && [[ $(api_status) == 200 ]]; then
  say "already running in $DIR on port $PORT (pid $(cat "$DIR/server.pid"))"
  exit 0
fi
if running; then say "stopping the server running in $DIR"; fi
"$HERE/stop.sh" "$DIR"   # a no-op when nothing runs in DIR
if port_open "$PORT"; then echo "port $PORT is already in use" >&2; exit 1; fi

if ((RESET)) || [[ ! -f $DB ]]; then
  say "$(if ((RESET)); then echo resetting; else echo creating; fi) $DB from the pristine database"
  rm -f "$DB" "$DB-journal" "$DB-wal" "$DB-shm"
  install -o www-data -g www-data -m 0660 "$STATE/pristine.sqlite" "$DB"
fi
rm -f "$DIR/rackup.pid"   # a stale one (after a SIGKILL) would stop rackup if its pid were reused

# In its own session/process group (stop.sh kills the group), with stdio redirected so that a CI step
# does not wait on an inherited stdout. As www-data, not root: root would take ownership of the shared
# logs and caches. `rails server` fails here (it cannot create $APP/tmp); rackup does not.
# REDMINE_PLUGINS="dir …": plugin folders to install (copied into $APP/plugins, replacing an older copy).
for plugin in ${REDMINE_PLUGINS:-}; do
  name=$(basename "$plugin")
  if ! diff -rq "$plugin" "$APP/plugins/$name" >/dev/null 2>&1; then
    say "installing Redmine plugin $name"
    mkdir -p "$APP/plugins"
    rm -rf "${APP:?}/plugins/$name"
    cp -r "$plugin" "$APP/plugins/$name"
  fi
done

say "starting Redmine on 127.0.0.1:$PORT"
(cd "$APP" && exec setsid setpriv --reuid=www-data --regid=www-data \
  --init-groups env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$DIR" LANG=C.UTF-8 \
  REDMINE_INSTANCE=default RAILS_ENV=production DATABASE_URL="sqlite3:$DB" \
  CASEROOM_WEBHOOK_URL="${CASEROOM_WEBHOOK_URL:-}" CASEROOM_WEBHOOK_SECRET="${CASEROOM_WEBHOOK_SECRET:-}" \
  bundle exec rackup -E production -s webrick -o 127.0.0.1 -p "$PORT" -P "$DIR/rackup.pid" \
  >"$DIR/stdout.log" 2>&1 </dev/null) &
echo $! >"$DIR/server.pid"
echo redmine >"$DIR/server.kind"
echo "$PORT" >"$DIR/server.port"

# Wait until the API answers the admin key: 200 = up. Any other answer (e.g. 403: REST API disabled in
# DIR's database; 401: the key was changed there) will not get better by waiting.
fail() {
  echo "redmine in $DIR: $1" >&2
  echo "--- $DIR/stdout.log:" >&2
  tail -n 40 "$DIR/stdout.log" >&2 || true
  echo "--- /var/log/redmine/default/production.log:" >&2
  tail -n 40 /var/log/redmine/default/production.log >&2 || true
  "$HERE/stop.sh" "$DIR" || true
  exit 1
}
deadline=$((SECONDS + 120))
while ((SECONDS < deadline)); do
  code=$(api_status)
  case $code in
    200) say "up: GET /users/current.json with the admin key answers 200"; exit 0 ;;
    000) running || fail "the server exited during startup" ;;
    *) fail "GET /users/current.json with the admin key answered HTTP $code (try --reset)" ;;
  esac
  sleep 0.25
done
fail "did not answer on port $PORT within 120 s"
