#!/usr/bin/env bash
# Fuzzes unistor's parsers with cargo-fuzz (libFuzzer, address sanitizer), each target for a
# bounded time, and prints executions, speed and crashes per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Targets (fuzz/fuzz_targets/): frame (agents' frame decoder and message types), manifest (the
# manifest loader), snap_rpc (the SNAP emulator's JSON-RPC reader and method decoders),
# snap_replies (the dpu-agent's reading of SNAP's list replies). Seeds: fuzz/corpus/TARGET
# (committed); what the fuzzer finds grows fuzz/work/TARGET (not committed). A crash is written
# to fuzz/artifacts/TARGET/ and stops that target: turn it into a regression test, fix, re-run.
# Sanitizers need nightly features: the nightly toolchain when it is installed, else the stable
# one with RUSTC_BOOTSTRAP=1 (what CI has: a machine gets one toolchain). Installs cargo-fuzz
# when missing. Exits 1 when any target crashed or could not run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame manifest snap_rpc snap_replies)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

mkdir -p logs
status=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  echo "fuzz.sh: $t for ${secs}s" >&2
  if ! cargo "${toolchain[@]}" fuzz run -O "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
      -print_final_stats=1 >"logs/$t.log" 2>&1; then
    status=1
  fi
done

printf '%-14s %12s %10s %8s %s\n' target execs exec/s corpus crashes
for t in "${targets[@]}"; do
  log="logs/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
  corpus=$(find "work/$t" -type f | wc -l)
  crashes=$(find "artifacts/$t" -type f | wc -l)
  printf '%-14s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${speed:-?}" "$corpus" "$crashes"
  if grep -q 'SUMMARY\|panicked' "$log"; then
    grep -m3 -E 'panicked|SUMMARY|Test unit written' "$log" | sed 's/^/    /'
  fi
done
exit $status
