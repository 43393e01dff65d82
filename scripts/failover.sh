#!/usr/bin/env bash
# Longer Redis failover runs: the failover tests of tests/cluster.rs (a
# master of a 3-master cluster SIGKILLed, its replica promoted) and
# tests/sentinel.rs (a Sentinel-managed master SIGKILLed, the replica
# promoted by three Sentinels), with many more jobs than in CI. Each prints
# one line: jobs, time to promotion, time until everything was done, jobs
# lost, stage re-runs and stages completed twice. Exits non-zero when a job
# was lost or a test failed.
#
# Usage: scripts/failover.sh [-n JOBS] [-r ROUNDS]
#   -n JOBS    jobs enqueued before the kill (default 5000) -> CONVEYOR_FAILOVER_JOBS
#   -r ROUNDS  times each test runs (default 3)
# Needs redis-server and redis-cli on PATH (Debian: apt-get install -y redis-server redis-tools).
set -euo pipefail

jobs=5000
rounds=3
while getopts ":n:r:h" opt; do
    case "$opt" in
        n) jobs=$OPTARG ;;
        r) rounds=$OPTARG ;;
        *) sed -n '/^# Usage:/,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
done

cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --tests --quiet
status=0
for round in $(seq 1 "$rounds"); do
    for test in "cluster cluster_master_failover_mid_run" "sentinel sentinel_failover_mid_run"; do
        set -- $test
        out=$(CONVEYOR_FAILOVER_JOBS=$jobs cargo test --release --locked --quiet --test "$1" "$2" \
            -- --nocapture 2>&1) || status=1
        line=$(grep -a "failover:" <<<"$out" || true)
        echo "round $round $1: ${line:-no report (the test failed early)}"
        if [ -z "$line" ] || ! grep -q "lost 0," <<<"$line"; then
            status=1
            grep -a -A5 "panicked" <<<"$out" | head -20 >&2 || true
        fi
    done
done
exit "$status"
