#!/usr/bin/env bash
# A real Redis Cluster on 127.0.0.1 for the remote tier's tests and benchmarks: 6 nodes
# (3 primaries, 3 replicas) from Debian's Redis packages, no system service.
#
#   scripts/redis-cluster.sh start [PORT_BASE] [DIR]   # nodes on PORT_BASE..PORT_BASE+5
#   scripts/redis-cluster.sh stop  [PORT_BASE] [DIR]   # kills the nodes by their PID files
#   scripts/redis-cluster.sh install                    # only makes sure redis-server exists
#
# `start` prints the seed list (`127.0.0.1:P,...`) on stdout once every node reports
# `cluster_state:ok` and every replica is in sync; it fails (exit 1, the nodes stopped) if that takes over 30 s.
# Defaults: PORT_BASE 30001, DIR ~/.cache/kvquilt/redis-cluster-PORT_BASE. Node settings
# come from KVQ_REDIS_MAXMEMORY (default 256mb, policy allkeys-lru) and
# KVQ_REDIS_NODE_TIMEOUT_MS (default 2000: how long a silent primary takes to fail over).
# Replicas get a 1 GiB output buffer: with Redis's default (256 MiB) a burst of large KV
# writes disconnects them and forces a full resync (fork + RDB), stalling the primary.
set -euo pipefail

cmd="${1:-start}"
base="${2:-30001}"
dir="${3:-$HOME/.cache/kvquilt/redis-cluster-$base}"
maxmemory="${KVQ_REDIS_MAXMEMORY:-256mb}"
node_timeout="${KVQ_REDIS_NODE_TIMEOUT_MS:-2000}"
ports=()
for i in 0 1 2 3 4 5; do ports+=($((base + i))); done

install_redis() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  echo "redis-cluster: installing Debian's redis-server and redis-tools (no service started)" >&2
  local sudo="" added_policy=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # policy-rc.d exit 101 tells the package scripts not to start the service.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  $sudo apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server redis-tools >&2 ||
    { [ -n "$added_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d; echo "redis-cluster: could not install redis-server (apt-get install redis-server redis-tools)" >&2; exit 1; }
  [ -n "$added_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d
  command -v redis-server >/dev/null 2>&1 || { echo "redis-cluster: redis-server still missing" >&2; exit 1; }
}

stop_nodes() {
  local p pid
  for p in "${ports[@]}"; do
    if [ -f "$dir/$p.pid" ]; then
      pid="$(cat "$dir/$p.pid")"
      kill -CONT "$pid" 2>/dev/null || true
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$p.pid"
    fi
  done
}

case "$cmd" in
  install)
    install_redis
    ;;
  stop)
    stop_nodes
    ;;
  start)
    install_redis
    stop_nodes
    rm -rf "$dir"
    mkdir -p "$dir"
    for p in "${ports[@]}"; do
      redis-server --bind 127.0.0.1 --port "$p" --dir "$dir" \
        --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
        --cluster-node-timeout "$node_timeout" --cluster-require-full-coverage no \
        --save '' --appendonly no --protected-mode no \
        --maxmemory "$maxmemory" --maxmemory-policy allkeys-lru \
        --client-output-buffer-limit "replica 1gb 512mb 60" \
        --daemonize yes --pidfile "$dir/$p.pid" --logfile "$dir/$p.log"
    done
    # every node answers a ping (100 tries 0.1 s apart), or the start fails with what its log
    # says (a port taken between the caller's check and the bind reads "Address already in
    # use" there, which the tests' harness answers by trying other ports)
    for p in "${ports[@]}"; do
      up=0
      for _ in $(seq 100); do timeout 1 redis-cli -p "$p" ping >/dev/null 2>&1 && { up=1; break; }; sleep 0.1; done
      if [ "$up" -ne 1 ]; then
        echo "redis-cluster: node $p did not answer 100 pings 0.1 s apart; its log ends:" >&2
        tail -n 5 "$dir/$p.log" >&2 2>/dev/null || true
        stop_nodes
        exit 1
      fi
    done
    addrs=()
    for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 ||
      { cat "$dir/create.log" >&2; stop_nodes; exit 1; }
    deadline=$(( $(date +%s) + 30 ))
    while :; do
      # every node sees the cluster ok, and every primary's replica is online (synced)
      ok=0 synced=0
      for p in "${ports[@]}"; do
        redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
        redis-cli -p "$p" info replication 2>/dev/null | grep -q '^slave0:.*state=online' && synced=$((synced + 1))
      done
      [ "$ok" -eq 6 ] && [ "$synced" -eq 3 ] && break
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "redis-cluster: not ready after 30 s (cluster_state ok on $ok of 6 nodes, $synced of 3 replicas online)" >&2
        stop_nodes
        exit 1
      fi
      sleep 0.2
    done
    (IFS=,; echo "${addrs[*]}")
    ;;
  *)
    echo "usage: $0 start|stop|install [PORT_BASE] [DIR]" >&2
    exit 2
    ;;
esac
