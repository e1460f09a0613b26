#!/usr/bin/env bash
# The chaos suite (tests/src/bin/chaos.rs): faults injected into a lab on a real one-node Ceph
# cluster — the controller, the ceph-agent and a dpu-agent SIGKILLed mid-work, two controllers
# with one certificate — each followed by a re-run and the same invariants. Seeded (printed;
# `--seed N` replays a run), bounded in iterations and time; ends with `N passed, M failed`.
#   scripts/chaos.sh            the full suite (a benchmark-style run, minutes)
#   scripts/chaos.sh --quick    a few iterations of each loop (what scripts/test.sh runs)
# Uses the cluster of UNISTOR_CEPH_* when set, else starts a private one and stops it on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
# In a session of its own: agents and emulators run in process groups of their own, and
# whatever ends this script (a signal included) ends all of them with it, then the cluster it
# started.
sid=""
dir=""
stop_all() {
  if [ -n "$sid" ]; then pkill -KILL -s "$sid" 2>/dev/null || true; fi
  if [ -n "$dir" ]; then scripts/ceph-dev-cluster.sh down "$dir" || true; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM
if [ -z "${UNISTOR_CEPH_CONF:-}" ]; then
  dir=$(mktemp -d "${TMPDIR:-/tmp}/unistor-chaos.XXXXXX")
  scripts/ceph-dev-cluster.sh up "$dir" --port auto
  # shellcheck disable=SC1091
  . "$dir/env"
fi
# A background job of a script is no group leader, so setsid makes it a session leader
# without forking: its pid is the session's id.
setsid "$bin/chaos" "$@" &
sid=$!
wait "$sid"
