#!/usr/bin/env bash
# A multi-replica test bed on 127.0.0.1: PostgreSQL and Redis (the Debian packages), three
# gateway replicas sharing them, and HAProxy in front (round robin, health-checked on
# /v2/health/ready, for HTTP and for gRPC over h2c).
#
#   bash scripts/cluster.sh start     # prints the load balancer's address, 127.0.0.1:PORT
#   bash scripts/cluster.sh status    # each process and its readiness
#   bash scripts/cluster.sh stop      # stops everything it started
#
# Environment: BASTION_CLUSTER_DIR (state, logs, ports; default /tmp/bastion-cluster),
# BASTION_CLUSTER_REPLICAS (3), BASTION_PYTHON (the interpreter with bastion installed; default
# .venv/bin/python in this checkout, else python3), BASTION_CLUSTER_ENV (a file of extra
# BASTION_* settings, one NAME=value a line, given to every replica). After `start`, the
# directory holds `lb` (the HTTP address), `lb-grpc`, `admin-token`, `database-url`,
# `redis-url`, and replica-N/ (its log, its incident-log witness `incident-checkpoint.json`, its
# `port`, `grpc-port` and `pid`). `start` clears the folder only when it is empty or an earlier
# bed; the folder's parents must be readable by the `postgres` user when run as root.
# The Debian packages come from scripts/system-packages.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${BASTION_CLUSTER_DIR:-/tmp/bastion-cluster}"
replicas="${BASTION_CLUSTER_REPLICAS:-3}"
python="${BASTION_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

say() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {  # URL SECONDS [PID: give up at once when it has exited]
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    if "$python" - "$1" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
EOF
    sleep 0.5
  done
  return 1
}

as_postgres=()
[ "$(id -u)" = 0 ] && as_postgres=(runuser -u postgres --)

start_postgres() {
  local bin port
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$bin" ] || die "PostgreSQL is not installed: bash scripts/system-packages.sh"
  port="$(free_port)"
  mkdir -p "$dir/postgres"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir/postgres"
  "${as_postgres[@]}" "$bin/initdb" -D "$dir/postgres/data" -U bastion -A trust --no-sync >/dev/null
  "${as_postgres[@]}" "$bin/pg_ctl" -D "$dir/postgres/data" -l "$dir/postgres/log" -w -t 60 \
    -o "-p $port -k $dir/postgres -c listen_addresses=127.0.0.1" start >/dev/null
  echo "$bin" > "$dir/postgres-bin"
  echo "postgresql://bastion@127.0.0.1:$port/postgres" > "$dir/database-url"
  say "PostgreSQL on 127.0.0.1:$port"
}

start_redis() {
  command -v redis-server >/dev/null || die "Redis is not installed: bash scripts/system-packages.sh"
  local port
  port="$(free_port)"
  mkdir -p "$dir/redis"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir/redis" \
    --daemonize yes --pidfile "$dir/redis/pid" --logfile "$dir/redis/log" >/dev/null
  echo "redis://127.0.0.1:$port/0" > "$dir/redis-url"
  say "Redis on 127.0.0.1:$port"
}

start_replica() {  # N
  local n="$1" rdir="$dir/replica-$1" port grpc
  port="$(free_port)"; grpc="$(free_port)"
  mkdir -p "$rdir"
  echo "$port" > "$rdir/port"; echo "$grpc" > "$rdir/grpc-port"
  (
    set -a
    [ -n "${BASTION_CLUSTER_ENV:-}" ] && . "$BASTION_CLUSTER_ENV"
    BASTION_DATABASE_URL="$(cat "$dir/database-url")"
    BASTION_REDIS_URL="$(cat "$dir/redis-url")"
    BASTION_ADMIN_TOKEN="$(cat "$dir/admin-token")"
    BASTION_DEFENCE="${BASTION_DEFENCE:-true}"
    BASTION_GRPC_PORT="$grpc"
    BASTION_QUARANTINE_PATH="$rdir/quarantine.db"
    BASTION_KEYS_PATH="$rdir/keys.db"
    BASTION_INCIDENT_LOG_PATH="$rdir/incidents.db"
    BASTION_INCIDENT_KEY_PATH="$dir/incident-signing.key"
    BASTION_INCIDENT_CHECKPOINT_PATH="$rdir/incident-checkpoint.json"
    BASTION_LEDGER_PATH="$rdir/ledger.db"
    BASTION_TORCH_THREADS="${BASTION_TORCH_THREADS:-1}"
    set +a
    cd "$here"
    exec "$python" -m bastion.gateway serve --port "$port" >"$rdir/log" 2>&1
  ) &
  echo $! > "$rdir/pid"
  say "replica $n starting on 127.0.0.1:$port (gRPC $grpc)"
}

write_haproxy() {
  local lb="$1" lbg="$2" n port grpc
  {
    cat <<EOF
global
    log stderr format raw local0 warning
    maxconn 4096
    pidfile $dir/haproxy/pid
    stats socket $dir/haproxy/admin.sock mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option redispatch
    retries 2
frontend http
    bind 127.0.0.1:$lb
    default_backend replicas
frontend grpc
    bind 127.0.0.1:$lbg proto h2
    default_backend replicas-grpc
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
EOF
    for ((n = 1; n <= replicas; n++)); do
      port="$(cat "$dir/replica-$n/port")"
      echo "    server replica-$n 127.0.0.1:$port check"
    done
    cat <<EOF
backend replicas-grpc
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
EOF
    for ((n = 1; n <= replicas; n++)); do
      port="$(cat "$dir/replica-$n/port")"; grpc="$(cat "$dir/replica-$n/grpc-port")"
      echo "    server replica-$n 127.0.0.1:$grpc proto h2 check port $port check-proto h1"
    done
  } > "$dir/haproxy/haproxy.cfg"
}

start() {
  [ -e "$dir/lb" ] || [ -e "$dir/redis/pid" ] || [ -e "$dir/postgres-bin" ] \
    && die "a cluster runs (or a failed start left one) in $dir: bash scripts/cluster.sh stop"
  command -v haproxy >/dev/null || die "HAProxy is not installed: bash scripts/system-packages.sh"
  # only an empty folder or an earlier bed (its marker) is cleared: never a folder of other files
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -e "$dir/.bastion-cluster" ]; then
    die "$dir holds other files: give BASTION_CLUSTER_DIR a new or empty folder"
  fi
  rm -rf "$dir"; mkdir -p "$dir/haproxy"; : > "$dir/.bastion-cluster"
  local began=$SECONDS n lb lbg
  "$python" -c 'import secrets; print(secrets.token_hex(24))' > "$dir/admin-token"
  chmod 600 "$dir/admin-token"
  start_postgres
  start_redis
  # one incident signing key for every replica (they sign heads of one shared log), made now:
  # replicas starting together would each make their own
  (cd "$here" && "$python" -c 'import sys; from pathlib import Path
from bastion.gateway.incidents.signing import Signer
Signer.from_file(Path(sys.argv[1]))' "$dir/incident-signing.key") \
    || die "$python cannot import bastion (set BASTION_PYTHON to the environment's python)"
  for ((n = 1; n <= replicas; n++)); do start_replica "$n"; done
  for ((n = 1; n <= replicas; n++)); do
    wait_ready "http://127.0.0.1:$(cat "$dir/replica-$n/port")/v2/health/ready" 180 \
      "$(cat "$dir/replica-$n/pid")" \
      || die "replica $n is not ready (log: $dir/replica-$n/log; stop cleans up)"
    say "replica $n ready"
  done
  lb="$(free_port)"; lbg="$(free_port)"
  write_haproxy "$lb" "$lbg"
  haproxy -c -q -f "$dir/haproxy/haproxy.cfg" || die "invalid HAProxy configuration"
  haproxy -D -f "$dir/haproxy/haproxy.cfg" 2>"$dir/haproxy/log"
  wait_ready "http://127.0.0.1:$lb/v2/health/ready" 30 || die "HAProxy does not answer"
  echo "127.0.0.1:$lbg" > "$dir/lb-grpc"
  echo "127.0.0.1:$lb" > "$dir/lb"
  say "ready in $((SECONDS - began)) s: HTTP 127.0.0.1:$lb, gRPC 127.0.0.1:$lbg, state in $dir"
  echo "127.0.0.1:$lb"
}

stop_pid() {  # PIDFILE NAME
  [ -f "$1" ] || return 0
  local pid; pid="$(cat "$1")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    say "stopped $2"
  fi
  rm -f "$1"
}

stop() {
  [ -d "$dir" ] || { say "nothing runs in $dir"; return 0; }
  local rdir
  stop_pid "$dir/haproxy/pid" haproxy
  for rdir in "$dir"/replica-*; do
    [ -d "$rdir" ] && stop_pid "$rdir/pid" "$(basename "$rdir")"
  done
  stop_pid "$dir/redis/pid" redis
  if [ -f "$dir/postgres-bin" ] && [ -d "$dir/postgres/data" ]; then
    "${as_postgres[@]}" "$(cat "$dir/postgres-bin")/pg_ctl" -D "$dir/postgres/data" -m fast -w \
      stop >/dev/null 2>&1 && say "stopped postgres"
  fi
  rm -f "$dir/lb" "$dir/lb-grpc" "$dir/postgres-bin"
}

status() {
  [ -f "$dir/lb" ] || { echo "no cluster in $dir"; return 1; }
  local rdir port state
  echo "load balancer: http $(cat "$dir/lb"), grpc $(cat "$dir/lb-grpc")"
  for rdir in "$dir"/replica-*; do
    port="$(cat "$rdir/port")"
    if wait_ready "http://127.0.0.1:$port/v2/health/ready" 1; then state=ready; else state="not ready"; fi
    echo "$(basename "$rdir"): 127.0.0.1:$port pid $(cat "$rdir/pid" 2>/dev/null || echo -) $state"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash scripts/cluster.sh start|stop|status" >&2; exit 2 ;;
esac
