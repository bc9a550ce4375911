#!/usr/bin/env bash
# Start a throwaway PostgreSQL on loopback for tests (Debian's postgresql package; see
# ../shared/notes/postgres.md). Usage: postgres.sh DIR PORT
# Cluster in DIR/data (trust authentication, loopback and a socket in DIR only), database
# "caseroom" owned by role "caseroom"; writes the connection URL to DIR/url. Stop with
# `postgres.sh --stop DIR` (PG_STOP_MODE=immediate for a crash). initdb refuses root: as root the cluster runs as the
# package's postgres user.
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z $bindir || ! -x $bindir/initdb ]]; then
  echo "PostgreSQL is not installed (apt-get install -y --no-install-recommends postgresql)" >&2
  exit 1
fi
AS=()
[[ $(id -u) -eq 0 ]] && AS=(runuser -u postgres --)
if [[ ${1:-} == --stop ]]; then
  DIR=$(cd "$2" && pwd)
  "${AS[@]}" "$bindir/pg_ctl" -D "$DIR/data" -m "${PG_STOP_MODE:-fast}" stop >/dev/null 2>&1 || true
  exit 0
fi
if [[ $# -lt 2 ]]; then echo "usage: $0 DIR PORT | --stop DIR" >&2; exit 2; fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd) PORT=$2
[[ $(id -u) -eq 0 ]] && chown postgres "$DIR" && chmod 755 "$DIR"
if [[ ! -d $DIR/data ]]; then
  "${AS[@]}" "$bindir/initdb" -D "$DIR/data" -A trust -U caseroom -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
fi
# fsync stays on: the store's promises (2xx after commit) are tested against a real commit.
"${AS[@]}" "$bindir/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 30 \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" start >/dev/null \
  || { tail -n 30 "$DIR/server.log" >&2; exit 1; }
"$bindir/psql" -h 127.0.0.1 -p "$PORT" -U caseroom -d postgres -qAt \
  -c "SELECT 1 FROM pg_database WHERE datname = 'caseroom'" | grep -q 1 \
  || "$bindir/createdb" -h 127.0.0.1 -p "$PORT" -U caseroom caseroom
echo "postgres://caseroom@127.0.0.1:$PORT/caseroom" >"$DIR/url"
echo postgres >"$DIR/server.kind"
