#!/usr/bin/env bash
# History reads of conveyor (issue 13, point 4): a SQLite file with N jobs of
# history (10 M by default: 3 types, 4 queues, mostly completed, 1 % failed,
# finished 1,000 a second up to now, so the dashboard's last 15 minutes hold
# 900,000 of them), then the reads an operator makes, timed as they run:
# `conveyor jobs` (several filters, each with its total), `conveyor status`,
# and the dashboard's /api/queues and /api/jobs. Each figure is the median of
# 5 runs, process start or HTTP round trip included. With -o it also times
# the full-scan SQL these reads used before schema version 3.
#
# Usage: scripts/history_reads.sh [-n JOBS] [-o] [-k] [-d DB] [-b BINARY]
#   -n JOBS     jobs of history (default 10000000)
#   -d DB       time the reads on DB (one kept with -k) instead of generating one
#   -o          also time the old full-scan queries (sqlite3)
#   -k          keep the generated database (its path is printed)
#   -b BINARY   conveyor binary (default: cargo build --release, target/release/conveyor)
# Needs redis-server, redis-cli, sqlite3, curl and python3 on PATH; about
# 300 bytes of disk per job (3 GB for 10 M), deleted at the end unless -k.
set -euo pipefail

. "$(dirname -- "${BASH_SOURCE[0]}")/lib/args.sh"

jobs=10000000
old=0
keep=0
reuse=""
binary=""
while getopts ":n:okd:b:h" opt; do
    case "$opt" in
        n) jobs=$OPTARG ;;
        o) old=1 ;;
        k) keep=1 ;;
        d) reuse=$OPTARG ;;
        b) binary=$OPTARG ;;
        h) usage; exit 0 ;;
        *) bad_option "$opt" ;;
    esac
done
shift $((OPTIND - 1))
no_arguments "$@"
need_number -n "$jobs" 1
need_tools redis-server redis-cli sqlite3 curl python3

cd "$(dirname "$0")/.."
if [ -z "$binary" ]; then
    cargo build --release --quiet --bin conveyor
    binary=target/release/conveyor
fi
[ -x "$binary" ] || { echo "error: $binary is not an executable" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-history.XXXXXX")
pids=()
cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    if [ "$keep" = 1 ]; then
        echo "kept $dir/conveyor.db" >&2
        find "$dir" -mindepth 1 -not -name 'conveyor.db*' -delete
    else
        rm -rf "$dir"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.05
done
cat >"$dir/conveyor.toml" <<'EOF'
[worker]
queues = ["q0", "q1", "q2", "q3"]

[jobs.t0]
queue = "q0"
stages = [{ name = "s1", builtin = "noop" }]
EOF
db="$dir/conveyor.db"
if [ -n "$reuse" ]; then
    [ -f "$reuse" ] || { echo "error: no database at $reuse" >&2; exit 2; }
    db=$(realpath "$reuse")
    jobs=$(sqlite3 "$db" "SELECT sum(n) FROM job_counts")
fi
base=(--config "$dir/conveyor.toml" --redis-url "redis://127.0.0.1:$port" --prefix hist --db "$db")
cv() { "$binary" "${base[@]}" "$@"; }

if [ -z "$reuse" ]; then
# A daemon creates and migrates the file, as in production.
RUST_LOG=warn "$binary" "${base[@]}" worker --worker-id h1 >"$dir/worker.log" 2>&1 &
wpid=$!
pids+=($wpid)
for _ in $(seq 200); do
    [ -s "$db" ] && [ "$(sqlite3 "$db" 'PRAGMA user_version')" -ge 3 ] 2>/dev/null && break
    sleep 0.05
done
kill -TERM "$wpid"; wait "$wpid" || true

echo "generating $jobs jobs..." >&2
t0=$(date +%s.%N)
sqlite3 "$db" >/dev/null <<EOF
PRAGMA journal_mode = WAL;
PRAGMA synchronous = OFF;
PRAGMA cache_size = -262144;
WITH RECURSIVE x(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM x WHERE i < $jobs)
INSERT INTO jobs (id, type, queue, status, attempt, created_at, updated_at, finished_at)
SELECT 'j' || i, 't' || (i % 3), 'q' || (i % 4),
       CASE WHEN i % 2000 = 7 THEN 'cancelled' WHEN i % 1000 = 3 THEN 'running'
            WHEN i % 100 = 1 THEN 'failed' ELSE 'completed' END,
       1, ts, ts, CASE WHEN i % 1000 = 3 THEN NULL ELSE ts END
FROM (SELECT i, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || (($jobs - i) / 1000.0) || ' seconds') AS ts
      FROM x);
PRAGMA wal_checkpoint(TRUNCATE);
EOF
t1=$(date +%s.%N)
printf 'generated       %d jobs in %.0f s, %.0f MB\n' "$jobs" "$(echo "$t1 - $t0" | bc -l)" \
    "$(echo "$(stat -c %s "$db") / 1048576" | bc -l)"
else
    printf 'database        %s: %d jobs, %.0f MB\n' "$db" "$jobs" "$(echo "$(stat -c %s "$db") / 1048576" | bc -l)"
fi

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Median wall time in ms of 5 runs of a command.
timed() {
    for _ in 1 2 3 4 5; do
        local s e
        s=$(date +%s%N)
        "$@" >/dev/null
        e=$(date +%s%N)
        echo $(((e - s) / 1000))
    done | median | awk '{ printf "%.1f", $1 / 1000 }'
}
row() { printf '%-44s %8s ms\n' "$1" "$2"; }

echo
echo "CLI (process start included)"
row "conveyor jobs" "$(timed cv jobs)"
row "conveyor jobs --status failed" "$(timed cv jobs --status failed)"
row "conveyor jobs --queue q2" "$(timed cv jobs --queue q2)"
row "conveyor jobs --type t1 --status running" "$(timed cv jobs --type t1 --status running)"
row "conveyor jobs --status cancelled --page 20" "$(timed cv jobs --status cancelled --page 20)"
row "conveyor jobs --since 10m (capped total)" "$(timed cv jobs --since 10m)"
row "conveyor jobs --json --limit 500" "$(timed cv jobs --json --limit 500)"
row "conveyor status" "$(timed cv status)"
echo "  $(cv jobs --status failed | tail -1)"
echo "  $(cv jobs --since 10m | tail -1)"

dport=$(free_port)
RUST_LOG=warn "$binary" "${base[@]}" dashboard --listen "127.0.0.1:$dport" >"$dir/dashboard.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    curl -fs "http://127.0.0.1:$dport/api/queues" >/dev/null 2>&1 && break
    sleep 0.05
done
get() { curl -fsS -o /dev/null "http://127.0.0.1:$dport$1"; }
echo
echo "dashboard (HTTP round trip included)"
for path in /api/queues /api/jobs "/api/jobs?status=failed" "/api/jobs?queue=q1&page=100" \
    "/api/jobs?type=t2&status=cancelled" "/api/jobs?q=j9999999"; do
    row "GET $path" "$(timed get "$path")"
done

if [ "$old" = 1 ]; then
    echo
    echo "before schema version 3: the full-scan SQL (sqlite3, median of 3)"
    since=$(sqlite3 "$db" "SELECT strftime('%Y-%m-%dT%H:%M:00.000Z', 'now', '-14 minutes')")
    oldq() {
        for _ in 1 2 3; do
            printf '.timer on\n%s;\n' "$1" | sqlite3 "$db" | grep -oE 'real [0-9.]+' | awk '{ print $2 * 1000 }'
        done | median
    }
    row "counts by status (GROUP BY status)" "$(oldq "SELECT status, count(*) FROM jobs NOT INDEXED GROUP BY status")"
    row "total of conveyor jobs (count(*))" "$(oldq "SELECT count(*) FROM jobs NOT INDEXED")"
    row "finished per minute, 15 min" "$(oldq "SELECT substr(coalesce(finished_at, updated_at), 1, 16) AS minute, queue, status, count(*) FROM jobs INDEXED BY jobs_by_status WHERE status IN ('completed', 'failed') AND updated_at >= '$since' GROUP BY minute, queue, status")"
    row "first page, no filter (sort of all rows)" "$(oldq "SELECT id FROM jobs NOT INDEXED ORDER BY updated_at DESC, id LIMIT 50")"
fi
