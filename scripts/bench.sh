#!/usr/bin/env bash
# Benchmarks: the planner (10,000 DPUs x 8 volumes, in memory) and convergence against a private
# one-node Ceph cluster (50 simulated DPUs x 4 volumes, then watch-mode edit latency).
# Extra arguments go to converge-bench (e.g. `scripts/bench.sh --dpus 10 --volumes 2`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/release"
"$bin/plan-bench"
dir=$(mktemp -d "${TMPDIR:-/tmp}/unistor-bench.XXXXXX")
trap 'scripts/ceph-dev-cluster.sh down "$dir"' EXIT
scripts/ceph-dev-cluster.sh up "$dir" --port auto
# shellcheck disable=SC1091
. "$dir/env"
"$bin/converge-bench" "$@"
