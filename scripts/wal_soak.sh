#!/usr/bin/env bash
# WAL soak of conveyor (issue 13, point 3): one daemon runs N two-stage noop
# jobs at full speed (all pushed before it starts, concurrency 64) while the
# script samples the SQLite `-wal` file every 50 ms. It reports the WAL's
# peak, the database size, the throughput, and the WAL restarts the writer
# made (how many and how long each held its batch: the latency they cost).
# Exits non-zero when a job is missing or the peak passes -m MB.
#
# Usage: scripts/wal_soak.sh [-n JOBS] [-c CONCURRENCY] [-m MAX_MB] [-b BINARY]
#   -n JOBS         jobs to run (default 1000000)
#   -c CONCURRENCY  the daemon's --concurrency (default 64)
#   -m MAX_MB       fail when the WAL peaks above this (default 100)
#   -b BINARY       conveyor binary (default: cargo build --release, target/release/conveyor)
# Needs redis-server and redis-cli on PATH (Debian/Ubuntu: sudo apt-get install -y redis-server)
# and python3 (a free port) and sqlite3 (the final count).
set -euo pipefail

. "$(dirname -- "${BASH_SOURCE[0]}")/lib/args.sh"

jobs=1000000
concurrency=64
max_mb=100
binary=""
while getopts ":n:c:m:b:h" opt; do
    case "$opt" in
        n) jobs=$OPTARG ;;
        c) concurrency=$OPTARG ;;
        m) max_mb=$OPTARG ;;
        b) binary=$OPTARG ;;
        h) usage; exit 0 ;;
        *) bad_option "$opt" ;;
    esac
done
shift $((OPTIND - 1))
no_arguments "$@"
need_number -n "$jobs" 1
need_number -c "$concurrency" 1
need_number -m "$max_mb" 1
need_tools redis-server redis-cli python3 sqlite3

cd "$(dirname "$0")/.."
if [ -z "$binary" ]; then
    cargo build --release --quiet --bin conveyor
    binary=target/release/conveyor
fi
[ -x "$binary" ] || { echo "error: $binary is not an executable" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-wal-soak.XXXXXX")
redis_pid=""
daemon_pid=""
cleanup() {
    set +e
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
redis_pid=$!
for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.05
done
rcli() { redis-cli -p "$port" "$@"; }

cat >"$dir/conveyor.toml" <<'EOF'
[worker]
queues = ["soak"]

[jobs.noop2]
queue = "soak"
stages = [{ name = "s1", builtin = "noop" }, { name = "s2", builtin = "noop" }]
EOF

echo "pushing $jobs jobs..." >&2
# One LPUSH per job in the Redis protocol, through redis-cli --pipe.
awk -v n="$jobs" 'BEGIN {
    key = "soak:{soak}:pending"
    for (i = 1; i <= n; i++) {
        body = sprintf("{\"id\":\"j%d\",\"type\":\"noop2\",\"payload\":null}", i)
        printf "*3\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(key), key, length(body), body
    }
}' | rcli --pipe >/dev/null

db="$dir/conveyor.db"
wal="$db-wal"
RUST_LOG="conveyor=warn,conveyor::worker=info,conveyor::worker::runner=warn,conveyor::store=debug" \
    "$binary" worker --config "$dir/conveyor.toml" --redis-url "redis://127.0.0.1:$port" \
    --prefix soak --db "$db" --worker-id soak1 --concurrency "$concurrency" \
    >"$dir/daemon.log" 2>&1 &
daemon_pid=$!
start=$(date +%s.%N)
echo "running (one daemon, c=$concurrency)..." >&2

size() { stat -c %s "$1" 2>/dev/null || echo 0; }
peak=0
ticks=0
while :; do
    w=$(size "$wal")
    [ "$w" -gt "$peak" ] && peak=$w
    ticks=$((ticks + 1))
    if [ $((ticks % 20)) -eq 0 ]; then
        kill -0 "$daemon_pid" 2>/dev/null || { echo "error: the daemon exited" >&2; tail -20 "$dir/daemon.log" >&2; exit 1; }
        waiting=$(rcli llen "soak:{soak}:pending")
        active=$(rcli llen "soak:{soak}:active:soak1")
        if [ "$waiting" = 0 ] && [ "$active" = 0 ]; then
            break
        fi
        if [ $((ticks % 200)) -eq 0 ]; then
            echo "  $((jobs - waiting)) taken, WAL $((w / 1048576)) MB, peak $((peak / 1048576)) MB" >&2
        fi
    fi
    sleep 0.05
done
end=$(date +%s.%N)
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=""

completed=$(sqlite3 "$db" "SELECT count(*) FROM jobs WHERE status = 'completed'")
restarts=$(grep -c 'wal_restarted' "$dir/daemon.log" || true)
deferred=$(grep -cE 'wal_restart_(busy|failed)' "$dir/daemon.log" || true)
# elapsed_ms of each restart (JSON or text logs).
stats=$({ grep 'wal_restarted' "$dir/daemon.log" || true; } \
    | { grep -oE 'elapsed_ms"?[=:]"?[0-9.]+' || true; } | { grep -oE '[0-9.]+$' || true; } | sort -n \
    | awk '{ v[NR] = $1; s += $1 } END {
        if (NR == 0) { print "none"; exit }
        printf "p50 %.1f ms, p99 %.1f ms, max %.1f ms, mean %.1f ms", v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)], v[NR], s / NR }')
secs=$(echo "$end - $start" | bc -l)
printf 'jobs            %d completed of %d\n' "$completed" "$jobs"
printf 'elapsed         %.1f s (%.0f jobs/s)\n' "$secs" "$(echo "$jobs / $secs" | bc -l)"
printf 'WAL peak        %.1f MB (sampled every 50 ms)\n' "$(echo "$peak / 1048576" | bc -l)"
printf 'database        %.1f MB\n' "$(echo "$(size "$db") / 1048576" | bc -l)"
printf 'WAL restarts    %d (deferred %d): %s\n' "$restarts" "$deferred" "$stats"
status=0
if [ "$completed" -ne "$jobs" ]; then
    echo "FAIL: $((jobs - completed)) jobs are not completed in SQLite" >&2
    status=1
fi
if [ "$peak" -gt $((max_mb * 1048576)) ]; then
    echo "FAIL: the WAL peaked above $max_mb MB" >&2
    status=1
fi
exit $status
