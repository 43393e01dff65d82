#!/usr/bin/env bash
# run_worker.sh - start conveyor worker daemon(s) from a checkout, or run the
# end-to-end demo. Run `./run_worker.sh -h` for the details.
#
# In production prefer the systemd template unit (systemd/conveyor@.service) or
# the supervisord example (examples/supervisor/conveyor.conf): they restart a
# crashed daemon, this wrapper does not.
set -euo pipefail

PROG=${0##*/}

usage() {
    cat <<EOF
Usage: $PROG [-n N] [-e ENV_FILE] [--demo [--dashboard]] [-h] [ID]

Start the conveyor worker daemon (conveyor worker) from this checkout.

  ID             worker id (default: \$CONVEYOR_WORKER_ID, else "\$(hostname)-1").
                 Every live daemon needs a distinct id: a daemon restarted with
                 the same id immediately recovers the jobs it held.
  -n N           start N daemons in the background, with ids ID-1 .. ID-N
                 (or \$(hostname)-1 .. \$(hostname)-N when no ID or
                 \$CONVEYOR_WORKER_ID is given). SIGTERM, SIGINT and SIGHUP are
                 forwarded to all of them as SIGTERM (graceful drain), and
                 SIGTSTP and SIGCONT as they are (quiet: take no new jobs;
                 resume); the script waits for all and exits with the worst
                 exit code.
                 Without -n (or with -n 1) the script exec's the daemon, so
                 signals reach it directly.
  -e ENV_FILE    load variables from ENV_FILE (shell syntax, KEY=value lines)
                 before anything else. Default: \$CONVEYOR_ENV_FILE, else
                 ./conveyor.env next to this script if it exists. A file named
                 with -e or \$CONVEYOR_ENV_FILE that does not exist is an error.
  --demo         end-to-end demo: use the Redis at \$CONVEYOR_REDIS_URL (or
                 redis://127.0.0.1:6379), or start a private redis-server in
                 data/ if none answers. Before building, it checks that cargo
                 and a C compiler (cc; when a build is needed) and a Redis or
                 redis-server are there; a missing C compiler (gcc) or
                 redis-server is installed with apt-get (as root, or with
                 sudo; it prints the commands first), otherwise it stops at
                 once saying what to install. On a host with systemd the
                 redis-server package starts a system Redis on port 6379,
                 which the demo then uses (and which stays). Then it starts
                 one daemon (log in
                 data/demo-worker.log), enqueue a video.generate job, watch its
                 progress live, print the job, then stop everything.
                 Exits 0 if the job completed, 1 if it failed. ID and -n are
                 ignored.
  --dashboard    with --demo: also start 'conveyor dashboard' on
                 \$DEMO_DASHBOARD_LISTEN (default 127.0.0.1:8080; log in
                 data/demo-dashboard.log), print its URL, wait a few seconds
                 before enqueueing so the page can be opened, and keep it
                 (and the daemon) running after the job until Ctrl-C.
  -h, --help     show this help.

The script first changes to its own directory: stage commands in
config/conveyor.toml (e.g. examples/stages/script_gen.sh) are relative to it.

The binary is \$CONVEYOR_BIN if set (relative paths are relative to this
directory); else target/release/conveyor if it is newer than Cargo.toml,
Cargo.lock and every file in src/; else it is built first with
'cargo build --release --locked' (the first build takes about 4½ minutes on 2 cores).

Environment (flags given to the daemon > environment > config file > default):
  CONVEYOR_CONFIG       config file (daemon default: config/conveyor.toml)
  CONVEYOR_REDIS_URL    Redis URL, e.g. redis://user:password@host:6379/0,
                        rediss:// for TLS
  CONVEYOR_DB           SQLite file (--demo default: data/demo.db)
  CONVEYOR_WORKER_ID    worker id when no ID argument is given
  CONVEYOR_QUEUES       comma-separated queues to consume, in priority order
  CONVEYOR_CONCURRENCY  jobs run at once by one daemon
  CONVEYOR_PREFIX       Redis key prefix (default: conveyor; conveyor-demo with --demo)
  CONVEYOR_BIN          conveyor binary to run instead of target/release/conveyor
  CONVEYOR_ENV_FILE     env file to load when -e is not given
  RUST_LOG              log filter, e.g. conveyor=info or conveyor=debug
                        (logs are JSON lines when stderr is not a terminal)
  DEMO_STAGE_SLEEP      seconds per progress step of the demo stages
                        (default 0.15)
  DEMO_DASHBOARD_LISTEN address of the --dashboard page (default 127.0.0.1:8080)

Exit status: the daemon's (0 after a graceful shutdown), 2 for a usage error,
1 for other failures; with --demo, the status of 'conveyor watch'.

Examples:
  $PROG --demo                 # try it out
  $PROG --demo --dashboard     # the same, with the web dashboard on 127.0.0.1:8080
  $PROG                        # one daemon, id "\$(hostname)-1"
  $PROG -n 4                   # four daemons, ids "\$(hostname)-1..4"
  $PROG -e prod.env -n 2 box7  # ids box7-1 and box7-2, settings from prod.env
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage_error() { log "$*"; printf 'Try %s -h\n' "$PROG" >&2; exit 2; }

# --- arguments ---------------------------------------------------------------

num=1
env_file=
env_file_explicit=0
demo=0
dashboard=0
id_arg=
orig_pwd=$PWD

while [ "$#" -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        -n) [ "$#" -ge 2 ] || usage_error "-n needs a number"
            num=$2; shift 2 ;;
        -n*) num=${1#-n}; shift ;;
        -e) [ "$#" -ge 2 ] || usage_error "-e needs a file"
            env_file=$2; env_file_explicit=1; shift 2 ;;
        -e*) env_file=${1#-e}; env_file_explicit=1; shift ;;
        --demo) demo=1; shift ;;
        --dashboard) dashboard=1; shift ;;
        --) shift
            [ "$#" -le 1 ] || usage_error "too many arguments: $*"
            if [ "$#" -eq 1 ]; then
                [ -z "$id_arg" ] || usage_error "too many arguments: $id_arg $1"
                id_arg=$1; shift
            fi ;;
        -*) usage_error "unknown option: $1" ;;
        *)  [ -z "$id_arg" ] || usage_error "too many arguments: $id_arg $1"
            id_arg=$1; shift ;;
    esac
done

[ "$dashboard" -eq 0 ] || [ "$demo" -eq 1 ] \
    || usage_error "--dashboard goes with --demo (otherwise run: conveyor dashboard)"

case $num in
    ''|*[!0-9]*) usage_error "-n wants a positive integer, got '$num'" ;;
esac
num=$((10#$num))   # 10#: "08" is not octal
[ "$num" -ge 1 ] || usage_error "-n wants a positive integer, got '$num'"

if [ "$env_file_explicit" -eq 0 ] && [ -n "${CONVEYOR_ENV_FILE:-}" ]; then
    env_file=$CONVEYOR_ENV_FILE
    env_file_explicit=1
fi
# A file named on the command line (or in the caller's environment) is relative
# to the caller's directory, not to ours: resolve it before the cd below.
if [ -n "$env_file" ] && [ "${env_file#/}" = "$env_file" ]; then
    env_file=$orig_pwd/$env_file
fi

# --- change to the checkout ----------------------------------------------------

# Follow a symlink (e.g. /usr/local/bin/run_worker.sh -> checkout) to the real
# script so that relative stage commands resolve against the checkout.
self=${BASH_SOURCE[0]}
if command -v readlink >/dev/null 2>&1 && real=$(readlink -f -- "$self" 2>/dev/null); then
    self=$real
fi
cd -- "$(dirname -- "$self")" || die "cannot cd to the directory of $self"

# --- environment file ----------------------------------------------------------

if [ "$env_file_explicit" -eq 1 ]; then
    if [ ! -f "$env_file" ] || [ ! -r "$env_file" ]; then
        log "env file not found or not readable: $env_file"
        exit 2
    fi
elif [ -f conveyor.env ]; then
    env_file=$PWD/conveyor.env
fi
if [ -n "$env_file" ]; then
    # set -a exports every variable the file assigns, so the daemon sees them.
    set -a
    # shellcheck source=/dev/null
    . "$env_file"
    set +a
fi

# --- the binary ----------------------------------------------------------------

find_cargo() {
    if command -v cargo >/dev/null 2>&1; then
        command -v cargo
    elif [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        # rustup installs here; a fresh login shell may not have it on PATH yet.
        printf '%s\n' "${CARGO_HOME:-$HOME/.cargo}/bin/cargo"
    else
        return 1
    fi
}

# True when $1 is older than any build input. Cargo.lock is included because a
# dependency change also needs a rebuild.
binary_is_stale() {
    local bin=$1 newer
    newer=$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null || true)
    [ -n "$newer" ]
}

# target/release/conveyor (or under $CARGO_TARGET_DIR), absolute.
default_bin() {
    local bin=${CARGO_TARGET_DIR:-target}/release/conveyor
    case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
    printf '%s\n' "$bin"
}

# True when resolve_bin will have to build: no $CONVEYOR_BIN, a checkout, and
# no binary yet. (A stale binary is rebuilt too, but used as it is when there
# is no cargo.)
bin_needs_build() {
    [ -z "${CONVEYOR_BIN:-}" ] && [ -f Cargo.toml ] && [ ! -x "$(default_bin)" ]
}

resolve_bin() {
    if [ -n "${CONVEYOR_BIN:-}" ]; then
        local b
        b=$(command -v -- "$CONVEYOR_BIN" 2>/dev/null) \
            || die "CONVEYOR_BIN=$CONVEYOR_BIN is not an executable file (or a command on PATH)"
        [ -x "$b" ] || die "CONVEYOR_BIN=$CONVEYOR_BIN is not executable"
        BIN=$b
        return
    fi

    BIN=$(default_bin)

    if [ ! -f Cargo.toml ]; then
        # An installed copy without sources: use the binary as it is.
        [ -x "$BIN" ] || die "no $BIN and no Cargo.toml to build it from; set CONVEYOR_BIN"
        return
    fi
    if [ -x "$BIN" ] && ! binary_is_stale "$BIN"; then
        return
    fi

    local cargo
    if ! cargo=$(find_cargo); then
        if [ -x "$BIN" ]; then
            log "warning: $BIN is older than the sources but cargo is not installed; using it anyway"
            return
        fi
        die "cargo not found: install Rust from https://rustup.rs (or set CONVEYOR_BIN to a conveyor binary)"
    fi
    command -v cc >/dev/null 2>&1 \
        || die "no C compiler (cc) to build conveyor with: $cc_help (or set CONVEYOR_BIN to a conveyor binary)"
    if [ -x "$BIN" ]; then
        log "sources changed since the last build: building conveyor (cargo build --release --locked)..."
    else
        log "building conveyor (cargo build --release --locked); the first build takes about 4½ minutes on 2 cores..."
    fi
    "$cargo" build --release --locked || die "cargo build failed"
    [ -x "$BIN" ] || die "cargo build succeeded but $BIN does not exist"
}

# --- worker ids -------------------------------------------------------------

host_name() {
    hostname 2>/dev/null || uname -n
}

# The base for ids: the positional ID, else $CONVEYOR_WORKER_ID, else none.
base_id=${id_arg:-${CONVEYOR_WORKER_ID:-}}

# Start a command in the background in its own session when setsid exists.
# Why: a Ctrl-C in the terminal goes to the whole foreground process group; the
# children must get exactly one SIGTERM from us instead (and, in the demo, the
# private Redis must outlive the daemon's drain). setsid does not fork here
# because a background child of a non-interactive shell is never a process
# group leader, so $! is the command's own pid.
spawn_bg() {
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" &
    else
        "$@" &
    fi
}

# Wait for one child; its exit status goes to $child_rc. `wait` returns early
# (>128) when a trapped signal arrives, so keep waiting while the child is
# alive; bash remembers the status of children it has reaped, so the final
# wait returns the child's real status. (Not usable in $(...): a subshell
# cannot wait for its parent's children.)
child_rc=0
wait_child() {
    local pid=$1
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" 2>/dev/null || true
    done
    child_rc=0
    wait "$pid" 2>/dev/null || child_rc=$?
}

# Send SIGTERM to a child and wait up to $2 seconds, then SIGKILL it.
stop_child() {
    local pid=$1 limit=$2 name=$3 i=0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    # bash reaps exited children on SIGCHLD, so kill -0 fails once it is gone.
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$i" -ge $((limit * 10)) ] || [ "${force_stop:-0}" -eq 1 ]; then
            log "$name (pid $pid) did not stop in time: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1 || true
        i=$((i + 1))
    done
    wait "$pid" 2>/dev/null || true
}

# --- N daemons ---------------------------------------------------------------

pids=()

# Signal handler of run_many. Every signal becomes SIGTERM: the daemon treats
# TERM and INT alike, and a second signal simply repeats the request.
# shellcheck disable=SC2317 # invoked from a trap
forward() {
    log "received $1: asking ${#pids[@]} daemon(s) to drain (SIGTERM)"
    local p
    for p in ${pids[@]+"${pids[@]}"}; do
        kill -TERM "$p" 2>/dev/null || true
    done
}

# Signal handler of run_many for SIGTSTP (quiet: the daemons take no new jobs
# and finish their running ones) and SIGCONT (take jobs again): passed on as
# they are. The script itself is not suspended by TSTP.
# shellcheck disable=SC2317 # invoked from a trap
relay() {
    log "received SIG$1: passing it to ${#pids[@]} daemon(s)"
    local p
    for p in ${pids[@]+"${pids[@]}"}; do
        kill -"$1" "$p" 2>/dev/null || true
    done
}

run_many() {
    local prefix=${base_id:-$(host_name)}
    local -a ids=()
    local i pid rc worst=0

    trap 'forward SIGTERM' TERM
    trap 'forward SIGINT' INT
    trap 'forward SIGHUP' HUP
    trap 'relay TSTP' TSTP
    trap 'relay CONT' CONT

    for ((i = 1; i <= num; i++)); do
        spawn_bg "$BIN" worker --worker-id "$prefix-$i"
        pids+=("$!")
        ids+=("$prefix-$i")
        log "started daemon $prefix-$i (pid $!)"
    done

    for i in ${pids[@]+"${!pids[@]}"}; do
        pid=${pids[$i]}
        wait_child "$pid"
        rc=$child_rc
        if [ "$rc" -ne 0 ]; then
            log "daemon ${ids[$i]} (pid $pid) exited with status $rc"
        fi
        [ "$rc" -le "$worst" ] || worst=$rc
    done
    exit "$worst"
}

# --- demo ----------------------------------------------------------------------

# Split scheme://[userinfo@]rest into url_scheme, url_user, url_pass and
# url_rest. The userinfo ends at the LAST @: a password may hold @, ? or /.
# "user:pw" and ":pw" give a user (maybe empty) and a password; a userinfo
# without ":" is a user name to conveyor (redis-rs), which sends no AUTH
# without a password, so url_pass stays empty then.
split_redis_url() {
    local rest=${1#*://} userinfo
    url_scheme=${1%%://*}
    url_user='' url_pass=''
    case $rest in
        *@*) userinfo=${rest%@*}; rest=${rest##*@}
             url_user=${userinfo%%:*}
             case $userinfo in *:*) url_pass=${userinfo#*:} ;; esac ;;
    esac
    url_rest=$rest
}

# The URL for messages: everything between :// and the last @ masked, but
# for a user name before a ":".
mask_url() {
    case $1 in *://*@*) ;; *) printf '%s\n' "$1"; return ;; esac
    local rest=${1#*://} userinfo
    userinfo=${rest%@*}
    case $userinfo in
        *:*) printf '%s://%s:***@%s\n' "${1%%://*}" "${userinfo%%:*}" "${rest##*@}" ;;
        *)   printf '%s://***@%s\n' "${1%%://*}" "${rest##*@}" ;;
    esac
}

# %XX escapes of a URL's userinfo decoded, as conveyor and redis-cli do.
percent_decode() {
    local s=${1//\\/\\\\}
    printf '%b' "${s//%/\\x}"
}

# Parse host and port (into url_host/url_port) from redis[s]://[user[:pw]@]host[:port][/db].
parse_redis_url() {
    local rest
    split_redis_url "$1"
    rest=${url_rest%%/*}
    rest=${rest%%\?*}
    url_port=6379
    if [ "${rest#\[}" != "$rest" ]; then        # [IPv6]:port
        url_host=${rest#\[}; url_host=${url_host%%\]*}
        case $rest in *\]:*) url_port=${rest##*\]:} ;; esac
    else
        url_host=${rest%%:*}
        case $rest in *:*) url_port=${rest##*:} ;; esac
    fi
    [ -n "$url_host" ] || url_host=127.0.0.1
}

tcp_open() {   # host port: does something accept connections there?
    local run=()
    command -v timeout >/dev/null 2>&1 && run=(timeout 2)
    # A child bash, so that `timeout` can bound a connect to a black hole.
    # shellcheck disable=SC2016 # $1/$2 expand in the child
    ${run[@]+"${run[@]}"} "$BASH" -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# 0 = answers PING; 1 = nothing there; 2 = something answered, but not PONG.
redis_ping() {
    local url=$1 reply run=()
    case $url in
        unix://*|redis+unix://*)
            local path=${url#*://}; path=${path%%\?*}
            if command -v redis-cli >/dev/null 2>&1; then
                reply=$(redis-cli -s "$path" ping 2>/dev/null || true)
            else
                [ -S "$path" ] && return 0
                return 1
            fi ;;
        *)
            if command -v redis-cli >/dev/null 2>&1; then
                command -v timeout >/dev/null 2>&1 && run=(timeout 3)
                # The password goes in REDISCLI_AUTH, not in argv where `ps`
                # shows it; the URL keeps no userinfo, and a user name goes
                # in --user (redis-cli reads a lone "name@" as a password).
                local user=() pass=
                split_redis_url "$url"
                if [ -n "$url_pass" ]; then
                    pass=$(percent_decode "$url_pass")
                    [ -z "$url_user" ] || user=(--user "$(percent_decode "$url_user")")
                fi
                reply=$(
                    unset REDISCLI_AUTH
                    [ -z "$pass" ] || export REDISCLI_AUTH="$pass"
                    ${run[@]+"${run[@]}"} redis-cli -u "$url_scheme://$url_rest" \
                        ${user[@]+"${user[@]}"} ping 2>/dev/null || true
                )
            else
                parse_redis_url "$url"
                tcp_open "$url_host" "$url_port" && return 0
                return 1
            fi ;;
    esac
    case $reply in
        *PONG*) return 0 ;;
        '') return 1 ;;
        *) REDIS_REPLY=$reply; return 2 ;;
    esac
}

# Demo state, read by demo_cleanup.
redis_pid=
daemon_pid=
dashboard_pid=
force_stop=0
cleaned=0

demo_cleanup() {
    set +e
    [ "$cleaned" -eq 0 ] || return 0
    cleaned=1
    # A second Ctrl-C while we wait for the drain: stop waiting, SIGKILL.
    trap 'force_stop=1' INT TERM HUP
    if [ -n "$dashboard_pid" ] && kill -0 "$dashboard_pid" 2>/dev/null; then
        stop_child "$dashboard_pid" 10 "the dashboard"
    fi
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        log "stopping the daemon (SIGTERM; it finishes or requeues its jobs; Ctrl-C again to kill it)..."
        # 20 s shutdown grace + 5 s TERM->KILL for stages + margin.
        stop_child "$daemon_pid" 40 "the daemon"
    fi
    if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
        log "stopping the private redis-server (pid $redis_pid)"
        force_stop=0   # give Redis its own chance to write the AOF and exit
        stop_child "$redis_pid" 10 "redis-server"
    fi
}

run_demo() {
    local url=${CONVEYOR_REDIS_URL:-redis://127.0.0.1:6379}
    local i rc

    # Signals exit through the EXIT trap, which stops everything we started.
    trap demo_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP

    mkdir -p data

    # a) Redis: use the configured one, else start a private one.
    REDIS_REPLY=
    rc=0; redis_ping "$url" || rc=$?
    if [ "$rc" -eq 2 ]; then
        die "Redis at $(mask_url "$url") answered '$REDIS_REPLY' to PING; fix CONVEYOR_REDIS_URL (password? ACL user?)"
    elif [ "$rc" -eq 0 ]; then
        log "using Redis at $(mask_url "$url")"
    else
        log "no Redis answers at $(mask_url "$url"): starting a private redis-server for the demo"
        if ! command -v redis-server >/dev/null 2>&1; then
            # shellcheck disable=SC2016 # the backticks are meant literally
            log 'redis-server not found: install it with `sudo apt-get install -y redis-server`'
            exit 1
        fi
        local port=6390
        while tcp_open 127.0.0.1 "$port"; do
            port=$((port + 1))
            [ "$port" -lt 6490 ] || die "no free port in 6390-6489 for redis-server"
        done
        # --save '': no RDB snapshots; --appendonly yes: jobs survive a restart
        # like they would in production. Data lives in data/.
        spawn_bg redis-server --bind 127.0.0.1 --port "$port" --dir "$PWD/data" \
            --save '' --appendonly yes --daemonize no >data/redis-demo.log 2>&1
        redis_pid=$!
        url=redis://127.0.0.1:$port
        for ((i = 0; ; i++)); do
            if redis_ping "$url"; then break; fi
            if ! kill -0 "$redis_pid" 2>/dev/null; then
                tail -n 20 data/redis-demo.log >&2 || true
                die "redis-server exited at start (log: data/redis-demo.log)"
            fi
            [ "$i" -lt 50 ] || die "redis-server did not answer PING within 5 s (log: data/redis-demo.log)"
            sleep 0.1
        done
        log "private redis-server on port $port (pid $redis_pid, log: data/redis-demo.log)"
    fi
    export CONVEYOR_REDIS_URL=$url

    # b) SQLite, and a key prefix of its own: on a Redis that also serves
    # real daemons, the demo neither takes their jobs nor gives them its own.
    export CONVEYOR_DB=${CONVEYOR_DB:-data/demo.db}
    export CONVEYOR_PREFIX=${CONVEYOR_PREFIX:-conveyor-demo}

    # c) One daemon.
    local wid=demo-$$
    spawn_bg "$BIN" worker --worker-id "$wid" >data/demo-worker.log 2>&1
    daemon_pid=$!
    log "started daemon $wid (pid $daemon_pid); its log: data/demo-worker.log (tail -f data/demo-worker.log)"
    for ((i = 0; ; i++)); do
        # Match "id": "demo-<pid>" in `status --json` without needing jq.
        if "$BIN" status --json 2>/dev/null \
            | grep -Eq "\"id\"[[:space:]]*:[[:space:]]*\"$wid\""; then
            break
        fi
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            wait_child "$daemon_pid"; rc=$child_rc; daemon_pid=
            tail -n 20 data/demo-worker.log >&2 || true
            die "the daemon exited with status $rc at start (log: data/demo-worker.log)"
        fi
        if [ "$i" -ge 50 ]; then
            tail -n 20 data/demo-worker.log >&2 || true
            die "the daemon did not show up in 'conveyor status' within 10 s (log: data/demo-worker.log)"
        fi
        sleep 0.2
    done

    # The web dashboard, when asked for.
    if [ "$dashboard" -eq 1 ]; then
        local listen=${DEMO_DASHBOARD_LISTEN:-127.0.0.1:8080}
        spawn_bg "$BIN" dashboard --listen "$listen" >data/demo-dashboard.log 2>&1
        dashboard_pid=$!
        for ((i = 0; ; i++)); do
            grep -q "conveyor dashboard on" data/demo-dashboard.log 2>/dev/null && break
            if ! kill -0 "$dashboard_pid" 2>/dev/null; then
                dashboard_pid=
                tail -n 20 data/demo-dashboard.log >&2 || true
                die "the dashboard did not start (log: data/demo-dashboard.log; DEMO_DASHBOARD_LISTEN picks another address)"
            fi
            [ "$i" -lt 50 ] || die "the dashboard did not start within 10 s (log: data/demo-dashboard.log)"
            sleep 0.2
        done
        log "dashboard: open http://$listen/ now (the job is enqueued in 5 s)"
        sleep 5
    fi

    # d) A job.
    local job_id
    job_id=$("$BIN" enqueue video.generate --payload '{"video_id": 123, "title": "A day at the sea"}') \
        || die "conveyor enqueue failed"
    log "enqueued video.generate job $job_id"

    # e) Follow it to the end, then show it.
    local watch_rc=0
    "$BIN" watch "$job_id" || watch_rc=$?
    echo
    "$BIN" job "$job_id" || log "warning: 'conveyor job $job_id' failed"

    if [ -n "$dashboard_pid" ]; then
        log "the dashboard stays up at http://${DEMO_DASHBOARD_LISTEN:-127.0.0.1:8080}/: Ctrl-C stops everything"
        wait_child "$dashboard_pid"
    fi

    # f) Stop everything (also done by the EXIT trap on any other way out).
    demo_cleanup
    trap - EXIT
    if [ "$watch_rc" -eq 0 ]; then
        log "demo finished: job $job_id completed"
    else
        log "demo finished: job $job_id did not complete (watch exited with $watch_rc)"
    fi
    exit "$watch_rc"
}

# --- demo prerequisites ------------------------------------------------------

# Tell the user what to install when we cannot do it for them.
redis_help='install redis-server (Debian/Ubuntu: apt-get install redis-server; Fedora: dnf install redis; macOS: brew install redis), or set CONVEYOR_REDIS_URL to a Redis that runs'
cc_help='install a C compiler (Debian/Ubuntu: apt-get install gcc; Fedora: dnf install gcc; macOS: xcode-select --install)'

# Install Debian packages with apt-get, as root or through sudo, saying what
# runs and why; or stop with what to install. $1: why; $2: what to install
# otherwise; the rest: the packages.
apt_install() {
    local why=$1 help=$2 sudo=()
    shift 2
    command -v apt-get >/dev/null 2>&1 \
        || die "$why, and there is no apt-get to install it: $help"
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || die "$why; installing it needs root or sudo: $help"
        sudo=(sudo)
    fi
    local as=''
    [ "${#sudo[@]}" -eq 0 ] || as="${sudo[*]} "
    log "$why: installing it for the demo"
    log "running: ${as}apt-get update; ${as}apt-get install -y $*"
    # env: sudo would drop DEBIAN_FRONTEND from our environment.
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || die "apt-get update failed: $help"
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" \
        || die "apt-get install $* failed: $help"
}

# True when resolve_bin will run cargo: no binary yet, or one older than the
# sources and a cargo to rebuild it.
build_ahead() {
    [ -z "${CONVEYOR_BIN:-}" ] && [ -f Cargo.toml ] || return 1
    bin_needs_build && return 0
    binary_is_stale "$(default_bin)" && find_cargo >/dev/null
}

# Everything the demo needs, checked before the build (minutes on a fresh
# machine) so a missing piece is named at once: cargo when there is nothing
# to run yet, a C compiler when there is a build ahead (the bundled SQLite is
# C, and cc is Rust's linker), and a Redis that answers or redis-server to
# start one. The C compiler and redis-server are installed with apt-get when
# that is possible (root or sudo), in one go.
demo_prereqs() {
    local url=${CONVEYOR_REDIS_URL:-redis://127.0.0.1:6379} rc=0
    local pkgs=() whys=() helps=()
    if bin_needs_build && ! find_cargo >/dev/null; then
        die "cargo not found, and the demo must build conveyor first: install Rust from https://rustup.rs (or set CONVEYOR_BIN to a conveyor binary)"
    fi
    if build_ahead && ! command -v cc >/dev/null 2>&1; then
        pkgs+=(gcc); helps+=("$cc_help")
        whys+=("no C compiler (cc) to build conveyor with")
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        # 0: it answers; 2: something else answers, which run_demo reports.
        redis_ping "$url" || rc=$?
        if [ "$rc" -eq 1 ]; then
            pkgs+=(redis-server); helps+=("$redis_help")
            whys+=("no Redis answers at $(mask_url "$url") and redis-server is not installed")
        fi
    fi
    [ "${#pkgs[@]}" -gt 0 ] || return 0
    local why='' help='' i
    for i in "${!whys[@]}"; do
        why+=${why:+; }${whys[$i]}
        help+=${help:+; }${helps[$i]}
    done
    apt_install "$why" "$help" "${pkgs[@]}"
    if [[ " ${pkgs[*]} " == *" gcc "* ]]; then
        command -v cc >/dev/null 2>&1 \
            || die "apt-get installed gcc, but cc is not on PATH: $cc_help"
        log "installed $(cc --version | head -n 1)"
    fi
    if [[ " ${pkgs[*]} " == *" redis-server "* ]]; then
        command -v redis-server >/dev/null 2>&1 \
            || die "apt-get installed redis-server, but it is not on PATH: $redis_help"
        log "installed $(redis-server --version | head -n 1)"
        # On a host with systemd the package also starts a system Redis on
        # 127.0.0.1:6379 (a service that stays after the demo); the demo
        # uses it when it is at the URL, and otherwise starts its own.
        if redis_ping "$url"; then
            log "the redis-server package started a system Redis at $(mask_url "$url"): the demo uses it (it stays afterwards: systemctl disable --now redis-server to stop it)"
        else
            log "the demo starts its own redis-server in data/"
        fi
    fi
}

# --- main ----------------------------------------------------------------------

if [ "$demo" -eq 1 ]; then
    demo_prereqs
fi

BIN=
resolve_bin

if [ "$demo" -eq 1 ]; then
    if [ -n "$id_arg" ] || [ "$num" -ne 1 ]; then
        log "note: ID and -n are ignored with --demo"
    fi
    run_demo
fi

if [ "$num" -gt 1 ]; then
    run_many
fi

ID=${base_id:-$(host_name)-1}
exec "$BIN" worker --worker-id "$ID"
