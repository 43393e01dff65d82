#!/usr/bin/env bash
# Long chaos run of conveyor (RELIABILITY.md T1): SIGKILL daemons under load,
# restart them (same id or a new one), drain, and check with Jepsen
# total-queue accounting that no acknowledged job was lost and no job was
# reported completed twice. The test itself is `chaos_long` in
# tests/chaos.rs; this script builds it in release mode, runs it, prints its
# report, and exits non-zero when jobs were lost, completions were
# duplicated, or any other check of the test failed.
#
# Usage: scripts/chaos.sh [-n JOBS] [-k KILLS] [-d DAEMONS] [-s SEED] [--pools]
#   -n JOBS     jobs to push (default 10000)          -> CHAOS_JOBS
#   -k KILLS    SIGKILLs of a random daemon (default 20) -> CHAOS_KILLS
#   -d DAEMONS  daemons running at once (default 2)   -> CHAOS_DAEMONS
#   -s SEED     replay the kill schedule of a seed    -> CHAOS_SEED
#   --pools     stage pools: stage s1 in pool a, s2 in pool b, odd daemons
#               serve a, even ones b (so jobs are handed over between them;
#               give -d 2 or more)                     -> CHAOS_POOLS=1
# Needs redis-server on PATH (Debian/Ubuntu: sudo apt-get install -y redis-server).
set -euo pipefail

. "$(dirname -- "${BASH_SOURCE[0]}")/lib/args.sh"

jobs=10000
kills=20
daemons=2
seed=""
pools=0

# The one long option, taken out before getopts.
args=()
for a in "$@"; do
    if [ "$a" = "--pools" ]; then
        pools=1
    else
        args+=("$a")
    fi
done
set -- "${args[@]+"${args[@]}"}"

while getopts ":n:k:d:s:h" opt; do
    case "$opt" in
        n) jobs=$OPTARG ;;
        k) kills=$OPTARG ;;
        d) daemons=$OPTARG ;;
        s) seed=$OPTARG ;;
        h) usage; exit 0 ;;
        *) bad_option "$opt" ;;
    esac
done
shift $((OPTIND - 1))
no_arguments "$@"

need_number -n "$jobs"
need_number -k "$kills"
need_number -d "$daemons" 1
[ -z "$seed" ] || need_number -s "$seed"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "error: redis-server is not installed (Debian/Ubuntu: sudo apt-get install -y redis-server)" >&2
    exit 1
fi
need_tools cargo

cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."

export CHAOS_JOBS="$jobs" CHAOS_KILLS="$kills" CHAOS_DAEMONS="$daemons"
if [ -n "$seed" ]; then
    export CHAOS_SEED="$seed"
fi
if [ "$pools" = 1 ]; then
    [ "$daemons" -ge 2 ] || { echo "error: --pools needs -d 2 or more (one daemon per pool)" >&2; exit 2; }
    export CHAOS_POOLS=1
fi

out=$(mktemp)
trap 'rm -f -- "$out"' EXIT

echo "--- chaos: $jobs jobs, $kills kills, $daemons daemons ($(redis-server --version | head -n 1))"
start=$(date +%s)
status=0
cargo test --release --test chaos -- --ignored --nocapture chaos_long 2>&1 | tee -- "$out" || status=$?
echo "--- chaos: wall time $(($(date +%s) - start)) s (build included)"

result=$(grep -m 1 '^CHAOS_RESULT ' -- "$out" || true)
if [ -z "$result" ]; then
    echo "FAIL: the chaos test printed no result (build failure or crash; exit status $status)" >&2
    exit 1
fi

# The value of KEY in "CHAOS_RESULT k=v k=v ...".
field() {
    local kv
    for kv in $result; do
        if [ "${kv%%=*}" = "$1" ]; then
            printf '%s\n' "${kv#*=}"
            return
        fi
    done
}

lost=$(field lost)
twice=$(field completions_twice)
if [ "$lost" != 0 ] || [ "$twice" != 0 ]; then
    echo "FAIL: lost=$lost jobs, $twice jobs reported completed twice" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "FAIL: no job lost or completed twice, but another check failed (exit status $status)" >&2
    exit "$status"
fi
echo "PASS: lost=0, completions twice=0 ($result)"
