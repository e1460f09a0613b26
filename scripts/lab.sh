#!/usr/bin/env bash
# The lab: the whole system on one machine, under ./lab.
#
#   scripts/lab.sh up      one-node Ceph, certificates, a ceph-agent, three simulated DPUs
#                          (dpu-agent + SNAP emulator in real-Ceph mode), `unistor apply
#                          examples/lab`, then the watch daemon (`unistor watch examples/lab`)
#                          with its dashboard, and the fleet's status
#   scripts/lab.sh up --fleet N
#                          the same with N simulated DPUs in one fleet-sim process (each its
#                          own dpu-agent endpoint and SNAP emulator) and 2 volumes each, from
#                          manifests generated in lab/fleet-manifests
#   scripts/lab.sh up --replicas R [--fleet N]
#                          the same with R controller replicas (`unistor watch --replicas-in
#                          unistor-ctl`, ctl-1..ctl-R, dashboards on consecutive ports from
#                          7480) sharing the DPUs through RADOS, with a cephx identity that
#                          reaches only the pool unistor-ctl
#   scripts/lab.sh down    stop everything, remove ./lab
#
# Ports: ceph-agent 127.0.0.1:7400, dpu-a/b/c 127.0.0.1:7411-7413 (as examples/lab names them),
# the dashboard 127.0.0.1:7480 (UNISTOR_LAB_HTTP to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
lab=$PWD/lab
bin=$PWD/target/release
http=${UNISTOR_LAB_HTTP:-127.0.0.1:7480}

start() { # name pidfile logfile command...
  local name=$1 pidfile=$2 log=$3; shift 3
  if [ -e "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 0; fi
  "$@" >"$log" 2>&1 &
  echo $! >"$pidfile"
}

wait_port() {
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "nothing listens on $1; see the logs in $lab" >&2
  exit 1
}

# N DPUs in one fleet-sim process; writes lab/fleet-manifests (the lab's cluster, the DPUs at
# the addresses fleet-sim announced, two 64 MiB volumes per DPU).
fleet() {
  local n=$1 m=$lab/fleet-manifests
  mkdir -p "$m"
  # stdin stays open (a FIFO nobody writes) so that fleet-sim serves until `down` stops it.
  [ -p "$lab/fleet.in" ] || mkfifo "$lab/fleet.in"
  start fleet "$lab/fleet.pid" "$lab/fleet.out" \
    sh -c 'exec "$0" "$@" <>"'"$lab/fleet.in"'"' "$bin/fleet-sim" --pki-dir "$lab/pki" \
    --issue-missing --state-dir "$lab/fleet" --dpus "$n" --prefix fleet --real-ceph
  for _ in $(seq 1 300); do
    grep -q "DPUs up" "$lab/fleet.out" 2>/dev/null && break
    sleep 0.2
  done
  grep -q "DPUs up" "$lab/fleet.out" || { echo "fleet-sim did not start; see $lab/fleet.out" >&2; exit 1; }
  cp examples/lab/ceph.yaml "$m/ceph.yaml"
  python3 - "$lab/fleet.out" "$m" <<'PY'
import sys
out, m = sys.argv[1], sys.argv[2]
dpus = [l.split(": listening on ") for l in open(out).read().splitlines() if ": listening on " in l]
with open(f"{m}/dpus.yaml", "w") as f:
    for name, addr in dpus:
        f.write(f"---\napiVersion: unistor.io/v1alpha1\nkind: Dpu\nmetadata: {{name: {name}}}\nspec:\n"
                f"  agent: {{name: {name}, address: '{addr}'}}\n  host: host-{name}\n"
                f"  snap: {{version: 4.5.0-6-doca2.9.0, functions: {{pfs: 1, vfsPerPf: 4}}}}\n")
with open(f"{m}/volumes.yaml", "w") as f:
    for name, _ in dpus:
        for j in range(2):
            f.write(f"---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}-v{j}, labels: {{fleet: lab}}}}\n"
                    f"spec:\n  host: host-{name}\n  size: 64Mi\n  rbd: {{cluster: ceph-lab, pool: rbd}}\n")
PY
}

# R replicas of the daemon on manifests $2 (resync $3): the coordination pool and identity
# once, then ctl-1..ctl-R, each with its dashboard on the next port from $http.
replicas() {
  local r=$1 m=$2 resync=$3 host=${http%:*} port=${http#*:}
  local c=(-c "$UNISTOR_CEPH_CONF" --id "$UNISTOR_CEPH_ID" -k "$UNISTOR_CEPH_KEYRING")
  if [ ! -e "$lab/unistor-ctl.keyring" ]; then
    ceph "${c[@]}" osd pool create unistor-ctl 8 >/dev/null 2>&1
    ceph "${c[@]}" osd pool application enable unistor-ctl unistor >/dev/null 2>&1
    ceph "${c[@]}" auth get-or-create client.unistor-ctl mon 'allow r' \
      osd 'allow rwx pool=unistor-ctl' >"$lab/unistor-ctl.keyring"
  fi
  for i in $(seq 1 "$r"); do
    start "ctl-$i" "$lab/ctl-$i.pid" "$lab/ctl-$i.log" \
      "$bin/unistor" watch "$m" --pki-dir "$lab/pki" --listen "$host:$((port + i - 1))" \
      --state-dir "$lab/ctl-$i" --resync "$resync" --replicas-in unistor-ctl \
      --replica-name "ctl-$i" --rados-conf "$UNISTOR_CEPH_CONF" --rados-id unistor-ctl \
      --rados-keyring "$lab/unistor-ctl.keyring"
  done
  for i in $(seq 1 "$r"); do wait_port "$host:$((port + i - 1))"; done
}

# The daemon on manifests $1 (resync $2): one, or the replicas `up --replicas R` asked for.
daemons() {
  if [ "$replicas" -gt 0 ]; then
    replicas "$replicas" "$1" "$2"
  else
    start watch "$lab/watch.pid" "$lab/watch.log" \
      "$bin/unistor" watch "$1" --pki-dir "$lab/pki" --listen "$http" \
      --state-dir "$lab/watch" --resync "$2"
    wait_port "$http"
  fi
}

replicas=0
up() {
  local n=0
  while [ $# -gt 0 ]; do
    case $1 in
      --fleet) n=${2:?usage: $0 up [--fleet N] [--replicas R]}; shift 2 ;;
      --replicas) replicas=${2:?usage: $0 up [--fleet N] [--replicas R]}; shift 2 ;;
      *) echo "usage: $0 up [--fleet N] [--replicas R]" >&2; exit 64 ;;
    esac
  done
  cargo build --release --workspace --bins
  mkdir -p "$lab"
  if [ ! -e "$lab/ceph/ceph.conf" ]; then
    scripts/ceph-dev-cluster.sh up "$lab/ceph" --port 6789
  fi
  # shellcheck disable=SC1091
  . "$lab/ceph/env"
  if [ ! -e "$lab/pki/ca.crt" ]; then
    "$bin/unistor" pki init --dir "$lab/pki"
    "$bin/unistor" pki issue --dir "$lab/pki" --name controller --role controller
    for a in ceph-1 dpu-a dpu-b dpu-c; do
      "$bin/unistor" pki issue --dir "$lab/pki" --name "$a" --role agent
    done
  fi
  start ceph-1 "$lab/ceph-agent.pid" "$lab/ceph-agent.log" \
    "$bin/ceph-agent" --name ceph-1 --listen 127.0.0.1:7400 --pki-dir "$lab/pki" \
    --state-dir "$lab/ceph-agent" --ceph-conf "$UNISTOR_CEPH_CONF" \
    --keyring "$UNISTOR_CEPH_KEYRING" --client-id "$UNISTOR_CEPH_ID"
  if [ "$n" -gt 0 ]; then
    up_fleet "$n"
    return
  fi
  port=7411
  for d in dpu-a dpu-b dpu-c; do
    mkdir -p "$lab/$d"
    start "$d" "$lab/$d.pid" "$lab/$d.log" \
      "$bin/dpu-agent" --name "$d" --listen "127.0.0.1:$port" --pki-dir "$lab/pki" \
      --state-dir "$lab/$d" --platform simulation --snap-socket "$lab/$d/spdk.sock" \
      --emulator "$bin/snap-emulator" --emulator-arg=--real-ceph
    port=$((port + 1))
  done
  for p in 7400 7411 7412 7413; do wait_port "127.0.0.1:$p"; done

  "$bin/unistor" apply examples/lab --pki-dir "$lab/pki" --auto-approve
  echo
  # The daemon keeps it converged from here on: edit examples/lab and watch it follow.
  daemons examples/lab 1m
  # Until the daemon has seen every volume's chain whole (status exits 0).
  for _ in $(seq 1 100); do
    if "$bin/unistor" status examples/lab --pki-dir "$lab/pki" --daemon "http://$http" >/dev/null 2>&1; then break; fi
    sleep 0.3
  done
  "$bin/unistor" status examples/lab --pki-dir "$lab/pki" --daemon "http://$http" || true
  echo
  # Each DPU's host sees its namespaces as block devices: NBD sockets the SNAP emulator serves.
  echo "the hosts' NVMe namespaces (use them with qemu-io -f raw 'nbd+unix:///?socket=DEVICE'):"
  for d in dpu-a dpu-b dpu-c; do
    python3 - "$lab/$d/host/host.json" "$d" <<'PY'
import json, sys
try:
    view = json.load(open(sys.argv[1]))
except OSError:
    view = {"controllers": []}
for c in view["controllers"]:
    for n in c["namespaces"]:
        print(f"  {sys.argv[2]}: {c['name']} nsid {n['nsid']} {n['size_bytes'] >> 20}Mi uuid {n['uuid']}\n    {n['device']}")
PY
  done
  echo
  echo "lab is up: manifests in examples/lab, certificates in $lab/pki, logs in $lab/*.log"
  echo "dashboard: http://$http/   (JSON: /api/v1/status, Prometheus: /metrics)"
  [ "$replicas" -gt 0 ] && echo "$replicas replicas: ctl-1..ctl-$replicas, dashboards from http://$http/ on consecutive ports; kill one (kill \$(cat $lab/ctl-1.pid)) and watch another take its DPUs"
  echo "the watch daemon follows edits to examples/lab; try: $bin/unistor plan examples/lab --pki-dir $lab/pki"
  echo "stop it with: scripts/lab.sh down"
}

# The rest of `up --fleet N`: apply the generated manifests, then the daemon on them.
up_fleet() {
  fleet "$1"
  wait_port 127.0.0.1:7400
  local m=$lab/fleet-manifests
  "$bin/unistor" apply "$m" --pki-dir "$lab/pki" --auto-approve | tail -3
  daemons "$m" 10m
  # Until the daemon has a session with every agent and has seen every chain whole.
  for _ in $(seq 1 300); do
    if "$bin/unistor" status "$m" --pki-dir "$lab/pki" --daemon "http://$http" --limit 0 >/dev/null 2>&1; then break; fi
    sleep 0.3
  done
  echo
  "$bin/unistor" status "$m" --pki-dir "$lab/pki" --daemon "http://$http" --limit 10 || true
  echo
  echo "lab is up: $1 simulated DPUs in one fleet-sim process (pid $(cat "$lab/fleet.pid")), manifests in $m"
  echo "dashboard: http://$http/   (JSON: /api/v1/status?state=problems, Prometheus: /metrics)"
  echo "stop it with: scripts/lab.sh down"
}

down() {
  local pids=()
  for f in "$lab"/*.pid; do
    [ -e "$f" ] || continue
    pids+=("$(cat "$f")")
    kill "${pids[-1]}" 2>/dev/null || true
  done
  # Until they are gone (fleet-sim closes every DPU's images first), at most 30 s, then KILL.
  for _ in $(seq 1 150); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -f "snap-emulator --socket $lab/" 2>/dev/null || true
  scripts/ceph-dev-cluster.sh down "$lab/ceph"
  rm -rf "$lab"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  *) echo "usage: $0 up [--fleet N] [--replicas R]|down" >&2; exit 64 ;;
esac
