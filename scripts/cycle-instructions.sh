#!/usr/bin/env bash
# Client instructions per uncontended lock + unlock cycle, counted by
# callgrind (repeatable where CPU times are not): the cycle bench for one
# library, one deployment and one task count, run for 3 s and for 1 s; the
# difference in instructions over the difference in cycles leaves start-up
# out. The redis-server processes the bench starts are not counted.
#
#   scripts/cycle-instructions.sh tower 1 1    # tower-dsync, 1 node, 1 task
#   scripts/cycle-instructions.sh floor 1 1    # the raw redis-rs floor
#
# Needs valgrind and a release build of the bench
# (`cargo build --release --all-features --bench cycle`).
set -euo pipefail
cd "$(dirname "$0")/.."
library=$1 servers=$2 tasks=$3
bin=$(ls -t target/release/deps/cycle-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
declare -A instructions cycles
for secs in 1 3; do
  row=$(DSYNC_BENCH_SERVERS=$servers DSYNC_BENCH_TASKS=$tasks DSYNC_BENCH_FILTER=$library \
    DSYNC_BENCH_SECS=$secs valgrind --tool=callgrind --callgrind-out-file="$out/cg-$secs" \
    "$bin" --bench 2>"$out/err-$secs" | grep -i -- "$library" | grep -v '| nodes |')
  cycles[$secs]=$(awk -F'|' '{gsub(/ /, "", $5); print $5}' <<<"$row")
  instructions[$secs]=$(awk '/refs:/ {gsub(",", "", $4); print $4}' "$out/err-$secs")
done
python3 -c "print('$library, servers $servers, tasks $tasks: %.0f instructions per cycle' % ((${instructions[3]} - ${instructions[1]}) / (3 * ${cycles[3]} - ${cycles[1]})))"
rm -rf "$out"
