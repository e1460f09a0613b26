#!/usr/bin/env bash
# A one-node Ceph cluster for tests and the lab: one monitor, one manager, one memstore OSD, all on
# 127.0.0.1, all inside DIR. No systemd, no disks, nothing outside DIR.
#
#   scripts/ceph-dev-cluster.sh up DIR [--port PORT|auto]   install packages if missing, start, wait
#     (`auto`: a port below the ephemeral range, derived from this process's id, that nothing
#     listens on now; the monitor's port must be in its map before it runs, so the system
#     cannot pick it)
#   scripts/ceph-dev-cluster.sh down DIR               stop the daemons by pid, remove DIR
#   scripts/ceph-dev-cluster.sh status DIR             ceph -s
#
# After `up`, DIR/env holds the variables the tests read:
#   UNISTOR_CEPH_CONF, UNISTOR_CEPH_KEYRING, UNISTOR_CEPH_ID (admin), UNISTOR_CEPH_POOL (rbd),
#   UNISTOR_CEPH_POOL2 (a second rbd pool), UNISTOR_CEPH_DIR.
set -euo pipefail

usage() { echo "usage: $0 up|down|status DIR [--port PORT]" >&2; exit 64; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2
port=6789
while [ $# -gt 0 ]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    *) usage ;;
  esac
done

log() { echo "ceph-dev-cluster: $*" >&2; }

# Whether something listens on TCP port $1 (read from /proc: nothing is bound to find out).
listening() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A port for `--port auto`.
auto_port() {
  local i p
  for i in $(seq 0 99); do
    p=$((20000 + ($$ * 7 + i * 1031) % 10000))
    if ! listening "$p"; then
      echo "$p"
      return 0
    fi
  done
  log "no free port found for the monitor"
  return 1
}

install_packages() {
  local missing=()
  for bin in ceph-mon ceph-osd ceph-mgr ceph rbd rados ceph-authtool monmaptool; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Ceph packages (missing: ${missing[*]})"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    ceph-mon ceph-osd ceph-mgr ceph-common >/dev/null
}

# Waits up to $1 seconds for "$2..." to succeed.
wait_for() {
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      log "timed out after ${secs}s waiting for: $*"
      return 1
    fi
    sleep 0.3
  done
}

up() {
  install_packages
  if [ "$port" = auto ]; then
    port=$(auto_port)
  fi
  if [ -e "$dir/ceph.conf" ]; then
    log "$dir already holds a cluster; run '$0 down $dir' first"
    exit 1
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  mkdir -p "$dir"/{run,log,mon,mgr/x,osd}
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = 127.0.0.1:$port
public network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/admin.keyring
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.\$pid.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
# Every client here (librados/librbd 16.2, the ceph and rbd CLIs) reclaims its global_id
# securely: allowing the insecure way only raises AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED.
auth allow insecure global id reclaim = false
mon data avail warn = 2
mon data avail crit = 1
[mon.a]
mon data = $dir/mon/a
keyring = $dir/mon.a.keyring
[mgr.x]
mgr data = $dir/mgr/x
keyring = $dir/mgr/x/keyring
[osd]
osd data = $dir/osd/\$id
keyring = $dir/osd/\$id/keyring
osd objectstore = memstore
memstore device bytes = 1073741824
osd max object name len = 256
osd max object namespace len = 64
EOF
  local c=(-c "$dir/ceph.conf")
  ceph-authtool --create-keyring "$dir/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/admin.keyring" >/dev/null
  monmaptool --create --add a "127.0.0.1:$port" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon "${c[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.a.keyring" 2>>"$dir/log/mkfs.stderr"
  ceph-mon "${c[@]}" -i a --pid-file "$dir/run/mon.a.pid"
  wait_for 30 ceph "${c[@]}" --connect-timeout 5 mon stat

  ceph "${c[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$dir/mgr/x/keyring"
  ceph-mgr "${c[@]}" -i x --pid-file "$dir/run/mgr.x.pid"

  local id
  id=$(ceph "${c[@]}" osd create)
  mkdir -p "$dir/osd/$id"
  ceph-osd "${c[@]}" -i "$id" --mkfs --mkkey --no-mon-config >/dev/null 2>&1
  ceph "${c[@]}" auth add "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$dir/osd/$id/keyring" >/dev/null 2>&1
  ceph "${c[@]}" osd crush add-bucket localhost host >/dev/null 2>&1
  ceph "${c[@]}" osd crush move localhost root=default >/dev/null 2>&1
  ceph "${c[@]}" osd crush add "osd.$id" 1.0 host=localhost >/dev/null 2>&1
  ceph-osd "${c[@]}" -i "$id" --pid-file "$dir/run/osd.$id.pid" 2>>"$dir/log/osd.$id.stderr"
  wait_for 60 osd_up "${c[@]}"

  for pool in rbd rbd2; do
    ceph "${c[@]}" osd pool create "$pool" 8 8 >/dev/null 2>&1
    rbd "${c[@]}" pool init "$pool"
  done
  wait_for 60 rbd "${c[@]}" ls rbd

  cat >"$dir/env" <<EOF
export UNISTOR_CEPH_DIR=$dir
export UNISTOR_CEPH_CONF=$dir/ceph.conf
export UNISTOR_CEPH_KEYRING=$dir/admin.keyring
export UNISTOR_CEPH_ID=admin
export UNISTOR_CEPH_POOL=rbd
export UNISTOR_CEPH_POOL2=rbd2
EOF
  log "up in ${SECONDS}s: $(ceph "${c[@]}" health 2>/dev/null | head -1)"
  log "use it with: . $dir/env"
}

osd_up() {
  [ "$(ceph "$@" osd stat --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])')" -ge 1 ]
}

down() {
  if [ ! -d "$dir" ]; then
    log "$dir does not exist; nothing to stop"
    return 0
  fi
  local pids=()
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    pids+=("$(cat "$f")")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    # A daemon a test stopped (SIGSTOP) acts on the TERM only once continued.
    kill -CONT "${pids[@]}" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while [ $SECONDS -lt $end ]; do
      local alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive -eq 0 ] && break
      sleep 0.2
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
  fi
  rm -rf "$dir"
  log "stopped and removed $dir"
}

case $cmd in
  up) up ;;
  down) down ;;
  status) ceph -c "$dir/ceph.conf" -s ;;
  *) usage ;;
esac
