#!/usr/bin/env bash
# The lab: a one-node Ceph cluster, certificates, and a ceph-agent, all under ./lab, and the
# agent's report shown through `unistor inspect`.
#
#   scripts/lab.sh up      build, start everything, print the report
#   scripts/lab.sh down    stop everything, remove ./lab
#
# The DPU side (dpu-agents with emulated SNAP) and the controller's plan/apply join the lab as
# they are built; see ARCHITECTURE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
lab=$PWD/lab
agent_addr=127.0.0.1:7400

up() {
  cargo build --release --workspace --bins
  local bin=$PWD/target/release
  if [ ! -e "$lab/ceph/ceph.conf" ]; then
    scripts/ceph-dev-cluster.sh up "$lab/ceph" --port 6789
  fi
  # shellcheck disable=SC1091
  . "$lab/ceph/env"
  if [ ! -e "$lab/pki/ca.crt" ]; then
    "$bin/unistor" pki init --dir "$lab/pki"
    "$bin/unistor" pki issue --dir "$lab/pki" --name controller --role controller
    "$bin/unistor" pki issue --dir "$lab/pki" --name ceph-1 --role agent
  fi
  if [ ! -e "$lab/ceph-agent.pid" ] || ! kill -0 "$(cat "$lab/ceph-agent.pid")" 2>/dev/null; then
    "$bin/ceph-agent" --name ceph-1 --listen "$agent_addr" --pki-dir "$lab/pki" \
      --state-dir "$lab/ceph-agent" --ceph-conf "$UNISTOR_CEPH_CONF" \
      --keyring "$UNISTOR_CEPH_KEYRING" --client-id "$UNISTOR_CEPH_ID" \
      >"$lab/ceph-agent.log" 2>&1 &
    echo $! >"$lab/ceph-agent.pid"
  fi
  for _ in $(seq 1 100); do
    if "$bin/unistor" inspect --agent ceph-1 --addr "$agent_addr" --pki-dir "$lab/pki" 2>/dev/null; then
      echo
      echo "lab is up: ceph-agent ceph-1 at $agent_addr (log: $lab/ceph-agent.log)"
      echo "stop it with: scripts/lab.sh down"
      return 0
    fi
    sleep 0.2
  done
  echo "ceph-agent did not answer; see $lab/ceph-agent.log" >&2
  exit 1
}

down() {
  if [ -e "$lab/ceph-agent.pid" ]; then
    kill "$(cat "$lab/ceph-agent.pid")" 2>/dev/null || true
  fi
  scripts/ceph-dev-cluster.sh down "$lab/ceph"
  rm -rf "$lab"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 64 ;;
esac
