#!/usr/bin/env bash
# Brings up, on loopback, the Redis deployments the high-availability tests
# run against, with the machine's redis-server (installed with apt-get when
# missing, as scripts/services.sh does), and takes them down again.
#
#   scripts/redis-topology.sh sentinel DIR PORT
#       a primary on PORT, two replicas on PORT+1 and PORT+2, and three
#       sentinels on PORT+3..PORT+5 monitoring it as "audit" (quorum 2,
#       down-after 1 s, failover-timeout 5 s: fast, for tests)
#   scripts/redis-topology.sh cluster DIR PORT
#       a three-master Redis Cluster on PORT..PORT+2 (cluster bus on
#       PORT+1000..PORT+1002), no replicas, all 16384 slots assigned
#   scripts/redis-topology.sh down DIR
#       SIGKILLs every server started in DIR, then removes DIR
#
# Everything a topology writes (configs, pid files, logs) stays in DIR, so
# several topologies run side by side on different ports. Nothing is
# persisted to disk (no RDB, no AOF). Choose PORT below the kernel's
# ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, usually from
# 32768) with its bus ports: a port in that range that is free when chosen
# can be taken by any outgoing connection before the server binds it. A
# topology that does not come up is taken down again, after printing the
# end of the server log that says why.
set -euo pipefail

log() { printf 'redis-topology: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    log "installing redis-server and redis-tools with apt-get"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
}

wait_for() { # PORT WHAT COMMAND...: retries COMMAND for 20 s
  local port=$1 what=$2
  shift 2
  for _ in $(seq 1 200); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$what on port $port did not come up; the end of its log:"
  tail -n 5 "$dir/redis-$port.log" >&2 2>/dev/null || true
  exit 1
}

server() { # PORT [extra redis-server args...]
  local port=$1
  shift
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
    --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" \
    --dir "$dir" --dbfilename "dump-$port.rdb" --save "" --appendonly no "$@"
  wait_for "$port" "redis-server" redis-cli -p "$port" ping
}

sentinel() {
  local base=$1
  server "$base"
  for r in 1 2; do
    server $((base + r)) --replicaof 127.0.0.1 "$base"
  done
  for r in 1 2; do
    wait_for $((base + r)) "replication" sh -c \
      "redis-cli -p $((base + r)) info replication | grep -q 'master_link_status:up'"
  done
  for s in 3 4 5; do
    local port=$((base + s)) conf="$dir/sentinel-$((base + s)).conf"
    cat >"$conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
pidfile $dir/redis-$port.pid
logfile $dir/redis-$port.log
dir $dir
sentinel monitor audit 127.0.0.1 $base 2
sentinel down-after-milliseconds audit 1000
sentinel failover-timeout audit 5000
sentinel parallel-syncs audit 1
EOF
    redis-server "$conf" --sentinel
    wait_for "$port" "sentinel" sh -c \
      "redis-cli -p $port sentinel get-master-addr-by-name audit | grep -q $base"
  done
  # Every sentinel has found both replicas and its two peers.
  for s in 3 4 5; do
    wait_for $((base + s)) "sentinel discovery" sh -c \
      "redis-cli -p $((base + s)) sentinel master audit | tr '\n' ' ' | grep -Eq 'num-slaves 2 .*num-other-sentinels 2 '"
  done
  log "sentinel topology up: primary $base, replicas $((base + 1)) $((base + 2)), sentinels $((base + 3))-$((base + 5)), master name audit"
}

cluster() {
  local base=$1 nodes=()
  for n in 0 1 2; do
    local port=$((base + n))
    server "$port" --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
      --cluster-port $((port + 1000)) --cluster-node-timeout 2000
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/cluster-create.log" 2>&1 ||
    { log "cluster create failed:"; tail -n 5 "$dir/cluster-create.log" >&2; exit 1; }
  for n in 0 1 2; do
    wait_for $((base + n)) "cluster state" sh -c \
      "redis-cli -p $((base + n)) cluster info | grep -q 'cluster_state:ok'"
  done
  log "cluster up: masters $base $((base + 1)) $((base + 2))"
}

down() {
  [ -d "$dir" ] || return 0
  for pidfile in "$dir"/redis-*.pid; do
    [ -f "$pidfile" ] || continue
    local pid port
    pid=$(cat "$pidfile")
    port=${pidfile##*/redis-}
    port=${port%.pid}
    # Only the server this topology started (its title names its port): a
    # pid left by a server killed earlier may belong to someone else now.
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q "redis-server.*:$port"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

[ $# -ge 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
command=$1
dir=$2
case "$command" in
  sentinel | cluster)
    [ $# -eq 3 ] || { log "usage: $0 $command DIR PORT"; exit 2; }
    ensure_redis
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # Half a topology is taken down: no server is left behind.
    trap 'status=$?; [ "$status" -eq 0 ] || down' EXIT
    "$command" "$3"
    ;;
  down) down ;;
  *) log "unknown command $command: use sentinel, cluster or down"; exit 2 ;;
esac
