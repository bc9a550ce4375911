#!/usr/bin/env bash
# Stop the throwaway server (prosody.sh, ejabberd.sh or redmine.sh) started in DIR.
# Usage: stop.sh DIR
# SIGTERM to the server's whole process group, wait up to 10 s, then SIGKILL the group. Returns once no
# process of the group is left (so the ports are free for a restart). A no-op if nothing runs in DIR.
set -euo pipefail
if [[ $# -ne 1 ]]; then echo "usage: $0 DIR" >&2; exit 2; fi
PIDFILE=$1/server.pid
[[ -f $PIDFILE ]] || exit 0
PGID=$(cat "$PIDFILE")
# Any live process left in the group? Zombies don't count: they hold no ports, and on some machines
# PID 1 is slow to reap them.
alive() { ps -e -o pgid=,stat= | awk -v g="$PGID" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'; }
if alive; then
  kill -TERM -- "-$PGID" 2>/dev/null || true
  for _ in $(seq 100); do alive || break; sleep 0.1; done
  if alive; then
    echo "server in $1 (pgid $PGID) ignored SIGTERM for 10 s; sending SIGKILL" >&2
    kill -KILL -- "-$PGID" 2>/dev/null || true
    for _ in $(seq 50); do alive || break; sleep 0.1; done
  fi
fi
rm -f "$PIDFILE"
