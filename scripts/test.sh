#!/usr/bin/env bash
# Runs every test of the workspace against a private one-node Ceph cluster, started here and
# stopped on exit. Extra arguments go to the test runner (e.g. `scripts/test.sh -p protocol`).
# The runner is cargo-nextest (one process per test, one summary line at the end); plain
# `cargo test` when nextest is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian package $2 when command $1 is missing; $3 says what for.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "test.sh: installing $2 ($3)" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
# The dashboard test drives a real headless browser: Debian's chromium.
need chromium chromium "for the dashboard test"
# The simulated hosts do I/O with qemu-io and qemu-img (Debian's qemu-utils).
need qemu-io qemu-utils "the simulated hosts' I/O"
# The alert rules are checked and unit-tested with promtool (Debian's prometheus package).
need promtool prometheus "promtool, for the alert rules' tests"

dir=$(mktemp -d "${TMPDIR:-/tmp}/unistor-ceph.XXXXXX")
trap 'scripts/ceph-dev-cluster.sh down "$dir"' EXIT
scripts/ceph-dev-cluster.sh up "$dir" --port auto
# shellcheck disable=SC1091
. "$dir/env"

# The end-to-end tests run the real binaries.
cargo build --workspace --bins
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  echo "test.sh: cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi
# The chaos suite's quick run (one iteration of each loop, about 2 minutes); the whole
# workspace only (a run narrowed with arguments skips it). On a fresh cluster of its own: the
# suite leaves hundreds of images behind, and every listing on that cluster is slower for it.
if [ $# -eq 0 ]; then
  scripts/ceph-dev-cluster.sh down "$dir"
  env -u UNISTOR_CEPH_DIR -u UNISTOR_CEPH_CONF -u UNISTOR_CEPH_KEYRING -u UNISTOR_CEPH_ID \
    -u UNISTOR_CEPH_POOL -u UNISTOR_CEPH_POOL2 \
    scripts/chaos.sh --quick --max-time 4m30s || status=$?
fi
exit $status
