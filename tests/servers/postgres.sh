#!/usr/bin/env bash
# Start a throwaway PostgreSQL on loopback for tests (Debian's postgresql package; see
# ../shared/notes/postgres.md). Usage: postgres.sh DIR PORT
# Cluster in DIR/data (trust authentication, loopback and a socket in DIR only), database
# "caseroom" owned by role "caseroom"; writes the connection URL to DIR/url. Stop with
# `postgres.sh --stop DIR` (PG_STOP_MODE=immediate for a crash). initdb refuses root: as root the cluster runs as the
# package's postgres user. PG_TLS=1: TCP only in TLS (hostssl; plain TCP rejected), with a server
# certificate for localhost and 127.0.0.1 signed by a throwaway CA in DIR/tls/ca.pem; the URL then
# asks for sslmode=require.
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
TLS_OPTS="" QUERY=""
if [[ ${PG_TLS:-0} == 1 ]]; then
  T=$DIR/tls
  if [[ ! -f $T/server.pem ]]; then
    mkdir -p "$T"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=caseroom test CA" \
      -keyout "$T/ca.key" -out "$T/ca.pem" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$T/server.key" -out "$T/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$T/san.ext"
    openssl x509 -req -in "$T/server.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial -days 2 \
      -extfile "$T/san.ext" -out "$T/server.pem" >/dev/null 2>&1
    [[ $(id -u) -eq 0 ]] && chown -R postgres "$T"
    chmod 600 "$T/server.key"
  fi
  printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n' \
    >"$DIR/data/pg_hba.conf"
  TLS_OPTS="-c ssl=on -c ssl_cert_file=$T/server.pem -c ssl_key_file=$T/server.key"
  QUERY="?sslmode=require"
  export PGSSLMODE=require
fi
# fsync stays on: the store's promises (2xx after commit) are tested against a real commit.
"${AS[@]}" "$bindir/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 30 \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 $TLS_OPTS" start >/dev/null \
  || { tail -n 30 "$DIR/server.log" >&2; exit 1; }
"$bindir/psql" -h 127.0.0.1 -p "$PORT" -U caseroom -d postgres -qAt \
  -c "SELECT 1 FROM pg_database WHERE datname = 'caseroom'" | grep -q 1 \
  || "$bindir/createdb" -h 127.0.0.1 -p "$PORT" -U caseroom caseroom
echo "postgres://caseroom@127.0.0.1:$PORT/caseroom$QUERY" >"$DIR/url"
echo postgres >"$DIR/server.kind"
