#!/usr/bin/env bash
# Start a throwaway ejabberd on loopback for end-to-end tests.
# Usage: ejabberd.sh DIR C2S_PORT COMPONENT_PORT COMPONENT_DOMAIN SECRET [ERL_DIST_PORT]
# Host "localhost" with users alice bob carol dave erin (password pw-<name>) and load01..load50 (pw-load),
# plaintext c2s (SASL PLAIN, no STARTTLS) on 127.0.0.1:C2S_PORT, XEP-0114 component COMPONENT_DOMAIN on
# 127.0.0.1:COMPONENT_PORT, mod_muc + mod_mam on conference.localhost. The Erlang distribution listens on
# 127.0.0.1:ERL_DIST_PORT (default C2S_PORT+1; no epmd); nothing else listens.
# Re-running on an existing DIR keeps its data. Stop with stop.sh DIR.
set -euo pipefail
if [[ $# -lt 5 ]]; then
  echo "usage: $0 DIR C2S_PORT COMPONENT_PORT COMPONENT_DOMAIN SECRET [ERL_DIST_PORT]" >&2
  exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd) C2S_PORT=$2 COMP_PORT=$3 COMP_DOMAIN=$4 SECRET=$5 DIST_PORT=${6:-$(($2 + 1))}
if [[ $DIST_PORT == "$COMP_PORT" ]]; then echo "ERL_DIST_PORT $DIST_PORT clashes with COMPONENT_PORT" >&2; exit 2; fi
# The mnesia spool is tied to the node name, so derive it from DIR: stable across restarts of one DIR
# (whatever the ports), distinct between DIRs.
NODE=ejabberd-$(printf %s "$DIR" | cksum | cut -d' ' -f1)@localhost
COOKIE=caseroom-test  # passed with -setcookie, so no ~/.erlang.cookie is read or written

if [[ -f $DIR/server.pid ]] && kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then
  echo "a server is already running in $DIR (pid $(cat "$DIR/server.pid"))" >&2
  exit 1
fi
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$C2S_PORT" "$COMP_PORT" "$DIST_PORT"; do
  if port_open "$p"; then echo "port $p is already in use" >&2; exit 1; fi
done
mkdir -p "$DIR/spool" "$DIR/logs"

# ejabberdctl reads DIR/ejabberdctl.cfg (because of --config-dir) instead of /etc/ejabberd's.
# ERL_DIST_PORT makes it pass "-erl_epmd_port P -start_epmd false": a fixed port and no epmd.
cat >"$DIR/ejabberdctl.cfg" <<CFG
ERLANG_NODE=$NODE
ERL_DIST_PORT=$DIST_PORT
ERL_OPTIONS="-setcookie $COOKIE -kernel inet_dist_use_interface {127,0,0,1} -env ERL_CRASH_DUMP_BYTES 0"
EJABBERD_PID_PATH="$DIR/ejabberd.pid"
CFG
cp /etc/ejabberd/inetrc "$DIR/inetrc"

# EJABBERD_EXTRA_COMPONENT="domain port" adds a second component listener (same secret), e.g. the
# benchmark's null component.
EXTRA_LISTENER=
if [[ -n ${EJABBERD_EXTRA_COMPONENT:-} ]]; then
  read -r EXTRA_DOMAIN EXTRA_PORT <<<"$EJABBERD_EXTRA_COMPONENT"
  EXTRA_LISTENER="  -
    port: $EXTRA_PORT
    ip: \"127.0.0.1\"
    module: ejabberd_service
    hosts:
      \"$EXTRA_DOMAIN\":
        password: \"$SECRET\""
fi

# XMPP_PRIVILEGE=1 loads mod_privilege with what ejabberd 23.01 can grant (XEP-0356 0.3: roster and
# message, no IQ permission), so tests see caseroom fall back to invitations on such a server.
PRIVILEGE=
if [[ ${XMPP_PRIVILEGE:-0} == 1 ]]; then
  PRIVILEGE="  mod_privilege:
    roster:
      both: all
    message:
      outgoing: all"
fi

# EJABBERD_BALANCING=1 lets several caseroom instances link as the component at once, each room's
# stanzas going to one of them (domain_balancing by bare destination), as in deploy/ejabberd.yml.
# ejabberd 23.01 needs component_number with it (without, the handshake crashes on a badkey).
BALANCING=
if [[ ${EJABBERD_BALANCING:-0} == 1 ]]; then
  BALANCING="domain_balancing:
  \"$COMP_DOMAIN\":
    type: bare_destination
    component_number: ${EJABBERD_COMPONENTS:-2}"
fi

# Block-style YAML only (flow lists of IP ranges are a syntax error in 23.01).
cat >"$DIR/ejabberd.yml" <<CFG
loglevel: info
log_rotate_count: 0
hosts:
  - localhost
auth_method: internal
auth_password_format: plain
acme:
  auto: false
listen:
  -
    port: $C2S_PORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: false
    starttls_required: false
    max_stanza_size: 262144
    backlog: 1024
  -
    port: $COMP_PORT
    ip: "127.0.0.1"
    module: ejabberd_service
    hosts:
      "$COMP_DOMAIN":
        password: "$SECRET"
$EXTRA_LISTENER
$BALANCING
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  muc_create:
    allow: local
modules:
  mod_disco: {}
  mod_ping: {}
  mod_roster: {}
  mod_mam: {}
  mod_muc:
    host: "conference.localhost"
    access_create: muc_create
    default_room_options:
      mam: true
$PRIVILEGE
CFG

# As root the node runs as user ejabberd (see below): it must own DIR and be able to reach it.
if [[ $(id -u) -eq 0 ]]; then
  chown -R ejabberd: "$DIR"
  if ! setpriv --reuid ejabberd --regid ejabberd --init-groups test -w "$DIR/spool"; then
    echo "user ejabberd cannot write $DIR/spool (a parent directory not searchable?)" >&2
    exit 1
  fi
fi

# As root, drop to the ejabberd user with setpriv rather than letting ejabberdctl use su: su puts the
# VM in a new session (out of reach of stop.sh's process-group kill) and SIGKILLs it 2 s after a SIGTERM.
AS=()
[[ $(id -u) -eq 0 ]] && AS=(env HOME="$DIR" setpriv --reuid ejabberd --regid ejabberd --init-groups)
setsid "${AS[@]}" ejabberdctl --config-dir "$DIR" --spool "$DIR/spool" --logs "$DIR/logs" foreground \
  >"$DIR/stdout.log" 2>&1 </dev/null &
echo $! >"$DIR/server.pid"
echo ejabberd >"$DIR/server.kind"

# On failure: show the logs, kill what was started, exit 1.
fail() {
  echo "ejabberd in $DIR: $1" >&2
  tail -n 50 "$DIR/stdout.log" "$DIR/logs/ejabberd.log" >&2 || true
  kill -KILL -- "-$(cat "$DIR/server.pid")" 2>/dev/null || true
  exit 1
}

# Wait until both ports accept TCP connections (listeners start last, after modules).
up=
for _ in $(seq 200); do
  if port_open "$C2S_PORT" && port_open "$COMP_PORT"; then up=1; break; fi
  if ! kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then break; fi
  sleep 0.1
done
[[ -n $up ]] || fail "did not come up on ports $C2S_PORT/$COMP_PORT within 20 s"

# Register (or reset the passwords of) all users with one short-lived hidden Erlang node doing RPCs:
# one VM start (~0.3 s) instead of one per `ejabberdctl register` (~0.25 s each, ~14 s for all).
USERS="[{<<\"alice\">>,<<\"pw-alice\">>},{<<\"bob\">>,<<\"pw-bob\">>},{<<\"carol\">>,<<\"pw-carol\">>},"
USERS+="{<<\"dave\">>,<<\"pw-dave\">>},{<<\"erin\">>,<<\"pw-erin\">>}"
for i in $(seq -w 1 50); do USERS+=",{<<\"load$i\">>,<<\"pw-load\">>}"; done
USERS+="]"
# The listeners can be up while Mnesia is still creating the `passwd` table (seen in CI:
# `{aborted,{no_exists,passwd,storage_type}}`): try again a few times, half a second apart.
register_users() {
  timeout 20 erl -sname "reg-$$-$1@localhost" -hidden -noinput -setcookie "$COOKIE" \
    -erl_epmd_port "$DIST_PORT" -start_epmd false -dist_listen false -eval "
      N = '$NODE', H = <<\"localhost\">>,
      Reg = fun({U, P}) ->
        case rpc:call(N, ejabberd_auth, try_register, [U, H, P]) of
          ok -> ok;
          {error, exists} -> ok = rpc:call(N, ejabberd_auth, set_password, [U, H, P]);
          E -> error({register, U, E})
        end end,
      try lists:foreach(Reg, $USERS) of _ -> halt(0)
      catch C:R -> io:format(standard_error, \"~p:~p~n\", [C, R]), halt(1) end."
}
registered=
for attempt in 1 2 3 4 5 6; do
  if register_users "$attempt"; then registered=1; break; fi
  sleep 0.5
done
[[ -n $registered ]] || fail "registering users failed"
