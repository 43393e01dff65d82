#!/usr/bin/env bash
# examples/pools/run.sh - stage pools on one machine: a GPU pool end to end.
#
# Simulates three hosts sharing one Redis, each with a SQLite file of its own:
#   cpu-1    a daemon of the default pool      (conveyor worker)
#   gpu-1    a daemon of pool "gpu"            (conveyor worker --pools gpu)
#   laptop   no daemon: enqueues, watches and reads the job (an empty SQLite file)
# with examples/pools/conveyor.toml, where the demo pipeline's video_gen stage
# is in pool "gpu". It enqueues one video.generate job, follows it with
# `conveyor watch` until it ends, prints `conveyor job ID` as the laptop sees
# it (from the job record in Redis: each stage with its daemon and pool) and
# the Redis field a producer in any language reads the result from, then
# stops both daemons with SIGTERM and removes its temp dir.
#
# Usage: examples/pools/run.sh            (from anywhere; -h for this text)
#
# Environment:
#   CONVEYOR_REDIS_URL  the Redis (default redis://127.0.0.1:6379). None
#                       running? redis-server --daemonize yes starts one
#                       (./run_worker.sh --demo, the one-daemon demo, starts
#                       a private one by itself).
#   CONVEYOR_BIN        the conveyor binary; default target/release/conveyor,
#                       else target/debug/conveyor, else it is built
#                       (cargo build --release --locked).
#   DEMO_STAGE_SLEEP    seconds per progress step of the demo stages (0.15).
#   POOLS_DEMO_WAIT     seconds the job may take before the run gives up (120).
# Keys go under the prefix conveyor-pools-demo; other CONVEYOR_* variables
# of the caller are ignored.
#
# Exit status: 0 when the job completed and both daemons stopped cleanly,
# 1 otherwise.
set -euo pipefail

PROG=examples/pools/run.sh
PREFIX=conveyor-pools-demo

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

case ${1:-} in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    '') ;;
    *) log "unknown argument: $1 (try -h)"; exit 2 ;;
esac

# Stage commands in the config (sh examples/stages/...) are relative to the
# checkout: run from there.
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
cd -- "$here/../.."
CONFIG=$PWD/examples/pools/conveyor.toml

# Only the Redis URL and the binary come from the caller: a CONVEYOR_QUEUES,
# CONVEYOR_POOLS or CONVEYOR_DB meant for real daemons would change the demo.
url=${CONVEYOR_REDIS_URL:-redis://127.0.0.1:6379}
bin_env=${CONVEYOR_BIN:-}
while IFS= read -r name; do
    case $name in CONVEYOR_*) unset "$name" ;; esac
done < <(compgen -e)
export CONVEYOR_REDIS_URL=$url CONVEYOR_PREFIX=$PREFIX CONVEYOR_CONFIG=$CONFIG

# The URL for messages, its userinfo masked.
masked_url() {
    case $url in
        *://*@*) printf '%s://***@%s\n' "${url%%://*}" "${url##*@}" ;;
        *) printf '%s\n' "$url" ;;
    esac
}

# %XX escapes of a URL's userinfo decoded, as conveyor and redis-cli do.
percent_decode() {
    local s=${1//\\/\\\\}
    printf '%b' "${s//%/\\x}"
}

# redis-cli ARGS against $url: the password in REDISCLI_AUTH (not in argv,
# where ps shows it), a user name with --user.
redis_cli() {
    local rest=${url#*://} userinfo user='' pass='' args=()
    case $url in
        unix://*|redis+unix://*) args=(-s "${rest%%\?*}") ;;
        *)
            case $rest in
                *@*) userinfo=${rest%@*}; rest=${rest##*@}
                     user=${userinfo%%:*}
                     case $userinfo in *:*) pass=${userinfo#*:} ;; esac ;;
            esac
            args=(-u "redis://$rest")
            if [ -n "$pass" ] && [ -n "$user" ]; then
                args+=(--user "$(percent_decode "$user")")
            fi ;;
    esac
    (
        unset REDISCLI_AUTH
        if [ -n "$pass" ]; then
            REDISCLI_AUTH=$(percent_decode "$pass")
            export REDISCLI_AUTH
        fi
        redis-cli "${args[@]}" "$@"
    )
}

redis_help="start one (redis-server --port 6379 --daemonize yes; Debian: apt-get install redis-server), or set CONVEYOR_REDIS_URL to one that runs (./run_worker.sh --demo, the one-daemon demo, starts a private redis-server by itself)"

# --- Redis, before any build ----------------------------------------------------

# A TCP connect to a redis:// or rediss:// URL's host and port, so that a
# missing Redis is named before a build of several minutes. `conveyor status`
# checks the rest (password, TLS) once the binary is there.
tcp_check() {
    local rest host port=6379
    case $url in redis://*|rediss://*) ;; *) return 0 ;; esac
    rest=${url#*://}; rest=${rest##*@}; rest=${rest%%/*}; rest=${rest%%\?*}
    case $rest in
        \[*) host=${rest#\[}; host=${host%%\]*}
             case $rest in *\]:*) port=${rest##*\]:} ;; esac ;;
        *) host=${rest%%:*}
           case $rest in *:*) port=${rest##*:} ;; esac ;;
    esac
    local run=()
    command -v timeout >/dev/null 2>&1 && run=(timeout 3)
    # shellcheck disable=SC2016 # $1/$2 expand in the child
    ${run[@]+"${run[@]}"} bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${host:-127.0.0.1}" "$port" 2>/dev/null
}

tcp_check || die "no Redis answers at $(masked_url): $redis_help"

# --- the binary -------------------------------------------------------------------

if [ -n "$bin_env" ]; then
    BIN=$(command -v -- "$bin_env" 2>/dev/null) || die "CONVEYOR_BIN=$bin_env is not an executable file"
elif [ -x target/release/conveyor ]; then
    BIN=$PWD/target/release/conveyor
elif [ -x target/debug/conveyor ]; then
    BIN=$PWD/target/debug/conveyor
else
    command -v cargo >/dev/null 2>&1 \
        || die "no conveyor binary and no cargo to build one: install Rust (https://rustup.rs) or set CONVEYOR_BIN"
    log "no conveyor binary yet: building it (cargo build --release --locked; the first build takes minutes)..."
    cargo build --release --locked || die "cargo build failed"
    BIN=$PWD/target/release/conveyor
fi
[ -x "$BIN" ] || die "$BIN is not executable"
log "using ${BIN#"$PWD"/}"

# The authoritative check: conveyor's own connection (password, TLS, db).
if ! err=$("$BIN" status 2>&1 >/dev/null); then
    case $err in
        *refused*|*"No such file"*|*"timed out"*|*unreachable*) die "${err#conveyor: }: $redis_help" ;;
        *) die "${err#conveyor: } (check CONVEYOR_REDIS_URL: user, password, TLS)" ;;
    esac
fi
log "Redis at $(masked_url), key prefix $PREFIX"

# --- clean up on any way out ------------------------------------------------------

tmp=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-pools.XXXXXX")
hosts=(cpu-1 gpu-1)
pids=('' '')   # pids[i]: the daemon of hosts[i] while it runs
cleaned=0
watch_pid=

# SIGTERM to each daemon still running, then wait for it: at most $1
# seconds (its drain: shutdown_grace_secs 20 + kill_grace_secs 5), or until
# a second Ctrl-C, then SIGKILL. Sets stop_rc to 1 when a daemon had to be
# killed or exited non-zero.
stop_rc=0
force_stop=0
stop_daemons() {
    local limit=$1 h pid n i rc
    for pid in "${pids[@]}"; do
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for n in "${!hosts[@]}"; do
        h=${hosts[$n]} pid=${pids[$n]}
        [ -n "$pid" ] || continue
        # bash reaps an exited child on SIGCHLD: kill -0 fails once it is gone.
        for ((i = 0; i < limit * 10 && force_stop == 0; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1 || true
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$h (pid $pid) did not stop in time after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            stop_rc=1
        fi
        rc=0; wait "$pid" 2>/dev/null || rc=$?
        if [ "$rc" -eq 0 ]; then
            log "$h (pid $pid) stopped (exit 0)"
        else
            log "$h (pid $pid) exited with status $rc"
            stop_rc=1
        fi
        pids[n]=
    done
}

# shellcheck disable=SC2317 # invoked from a trap
cleanup() {
    set +e
    [ "$cleaned" -eq 0 ] || return 0
    cleaned=1
    # Another Ctrl-C while the daemons drain: stop waiting, SIGKILL them.
    trap 'force_stop=1' INT TERM HUP
    if [ -n "$watch_pid" ]; then
        kill -TERM "$watch_pid" 2>/dev/null
        wait "$watch_pid" 2>/dev/null
    fi
    log "stopping both daemons (SIGTERM; each finishes or requeues its running job)"
    stop_daemons 40
    rm -rf -- "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Prints the last lines of each daemon's log (after a failure).
show_logs() {
    local h
    for h in "${hosts[@]}"; do
        [ -f "$tmp/$h.log" ] || continue
        log "last lines of $h's log:"
        tail -n 15 "$tmp/$h.log" >&2
    done
}

# --- two hosts ------------------------------------------------------------------

# Started with setsid when there is one: a Ctrl-C in the terminal reaches
# only this script, which gives each daemon exactly one SIGTERM.
start_daemon() {
    local n=$1 h=${hosts[$1]}; shift
    if command -v setsid >/dev/null 2>&1; then
        setsid "$BIN" worker --worker-id "$h" --db "$tmp/$h.db" "$@" >"$tmp/$h.log" 2>&1 &
    else
        "$BIN" worker --worker-id "$h" --db "$tmp/$h.db" "$@" >"$tmp/$h.log" 2>&1 &
    fi
    pids[n]=$!
    log "started $h (pid $!): conveyor worker --worker-id $h --db $tmp/$h.db${*:+ $*}"
}

start_daemon 0             # cpu-1: the default pool
start_daemon 1 --pools gpu # gpu-1: pool gpu only

# The laptop: every command from here on runs as a third host, whose
# SQLite file has nothing of the job (a 0-byte file is an empty database).
export CONVEYOR_DB=$tmp/laptop.db
: >"$CONVEYOR_DB"

for ((i = 0; ; i++)); do
    live=$("$BIN" status --json 2>/dev/null || true)
    up=0
    for n in "${!hosts[@]}"; do
        h=${hosts[$n]}
        if ! kill -0 "${pids[$n]}" 2>/dev/null; then
            show_logs
            die "$h exited at start (a daemon with id $h already running on this Redis and prefix?)"
        fi
        grep -Eq "\"id\"[[:space:]]*:[[:space:]]*\"$h\"" <<<"$live" && up=$((up + 1))
    done
    [ "$up" -lt "${#hosts[@]}" ] || break
    if [ "$i" -ge 75 ]; then
        show_logs
        die "the daemons did not both show up in 'conveyor status' within 15 s"
    fi
    sleep 0.2
done
log "both daemons are up"
echo
"$BIN" status
echo

# --- one job ------------------------------------------------------------------------

job_id=$("$BIN" enqueue video.generate --payload '{"video_id": 123, "title": "A day at the sea"}') \
    || die "conveyor enqueue failed"
log "enqueued video.generate job $job_id; following it (conveyor watch $job_id)"

wait_secs=${POOLS_DEMO_WAIT:-120}
case $wait_secs in ''|*[!0-9]*) die "POOLS_DEMO_WAIT wants whole seconds, got '$wait_secs'" ;; esac
# In the background, and waited for in a loop: bounded without needing
# timeout(1), and a signal to this script runs its trap at once (the EXIT
# trap stops the watch too).
"$BIN" watch "$job_id" &
watch_pid=$!
deadline=$((SECONDS + wait_secs))
while kill -0 "$watch_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.2
done
timed_out=0
if kill -0 "$watch_pid" 2>/dev/null; then
    timed_out=1
    kill -TERM "$watch_pid" 2>/dev/null || true
fi
watch_rc=0
wait "$watch_pid" || watch_rc=$?
watch_pid=
[ "$timed_out" -eq 0 ] || watch_rc=124
echo
case $watch_rc in
    0) log "job $job_id completed" ;;
    124) show_logs; log "job $job_id did not end within $wait_secs s (POOLS_DEMO_WAIT)" ;;
    *) show_logs; log "job $job_id did not complete (conveyor watch exited with $watch_rc)" ;;
esac

# --- what any host sees ------------------------------------------------------------

echo "\$ conveyor job $job_id    # on the laptop: an empty SQLite file, the record in Redis"
"$BIN" job "$job_id" || log "warning: 'conveyor job $job_id' failed"
echo

# The job's result, where a producer in any language reads it: the hash
# P:{queue}:job:<id>; its field "job" names the field of the job's result
# ("result_field"), whose key "result" is the last stage's result.
key="$PREFIX:{default}:job:$job_id"
if command -v redis-cli >/dev/null 2>&1 && [ "${url#rediss://}" = "$url" ]; then
    field=$(redis_cli HGET "$key" job | sed -n 's/.*"result_field":"\([^"]*\)".*/\1/p')
    if [ -n "$field" ]; then
        echo "# where a producer in any language reads the result (field \"job\" names it in result_field):"
        echo "\$ redis-cli HGET '$key' $field"
        redis_cli HGET "$key" "$field" || log "warning: redis-cli HGET failed"
    else
        log "warning: the record has no result_field (job not completed, or [history] retention_secs = 0)"
    fi
else
    echo "# redis-cli is not installed (or the URL is rediss://): the record as conveyor job --json reads it"
    "$BIN" job "$job_id" --json || log "warning: 'conveyor job $job_id --json' failed"
fi
echo

# --- stop ---------------------------------------------------------------------------

cleanup
trap - EXIT
rc=0
[ "$watch_rc" -eq 0 ] || rc=1
[ "$stop_rc" -eq 0 ] || rc=1
log "done (exit $rc); temp dir $tmp removed"
exit "$rc"
