#!/bin/sh
# Enqueue one conveyor job with nothing but redis-cli (a raw producer).
#
#   enqueue.sh [options] TYPE [PAYLOAD]
#
#   TYPE                   the job type (selects the pipeline in the daemons' config)
#   PAYLOAD                any JSON, default null; passed on as given (checked with
#                          jq first when jq is installed)
#   --redis-url URL        default $REDIS_URL, then $CONVEYOR_REDIS_URL, then
#                          redis://127.0.0.1:6379 (any URL redis-cli -u takes)
#   --prefix P             key prefix, default $CONVEYOR_PREFIX, then conveyor
#   --queue Q              default "default"
#   --id ID                default: generated (UTC time + random hex)
#   --delay SECONDS        run no earlier than SECONDS from now (e.g. 30 or 1.5),
#                          counted from the Redis server's clock
#
# Prints the job id on stdout. Exit 0 when Redis accepted the job, 2 for a
# usage error, 1 for anything else.
#
# What it does (the key layout of docs/reference/redis-keys.md):
#   now:      LPUSH P:{Q}:pending '{"id":...,"type":...,"payload":...}'
#   --delay:  ZADD  P:{Q}:scheduled <due Unix ms> '<the same JSON>'
# The due time is Redis' TIME plus the delay, the clock the daemons promote
# by, so this host's clock does not matter.
#
# A raw push skips the "a live job id is not enqueued twice" check: only
# `conveyor enqueue` refuses an id that is already pending, scheduled or
# running. Give each job its own id (the default) or go through the CLI.
#
# The JSON is passed to redis-cli as one argument, never pasted into a
# command string, so quotes, $, backticks and spaces in it arrive as they are.
# A password in the URL is visible to other users in `ps`; prefer a URL
# without one and a REDISCLI_AUTH environment variable.
#
# POSIX sh; needs redis-cli, od and sed. REDIS_CLI names another redis-cli.

set -eu

prog=${0##*/}
cli=${REDIS_CLI:-redis-cli}

usage() {
    sed -n '4,19s/^# \{0,1\}//p' "$0"
}

die_usage() {
    printf '%s: %s\n' "$prog" "$1" >&2
    printf 'usage: %s [--redis-url URL] [--prefix P] [--queue Q] [--id ID] [--delay SECONDS] TYPE [PAYLOAD]\n' "$prog" >&2
    exit 2
}

die() {
    printf '%s: %s\n' "$prog" "$1" >&2
    exit 1
}

# A JSON string literal holding $1 (control characters are refused by the
# callers, so only \ and " need escaping).
json_string() {
    printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

has_control() {
    case $1 in
        *[[:cntrl:]]*) return 0 ;;
    esac
    return 1
}

# Strips leading zeros so that sh arithmetic does not read octal.
decimal() {
    d=$1
    while :; do
        case $d in
            0?*) d=${d#0} ;;
            *) break ;;
        esac
    done
    printf '%s' "${d:-0}"
}

url=${REDIS_URL:-${CONVEYOR_REDIS_URL:-redis://127.0.0.1:6379}}
prefix=${CONVEYOR_PREFIX:-conveyor}
queue=default
id=
delay=

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --redis-url=* | --prefix=* | --queue=* | --id=* | --delay=*)
            opt=${1%%=*}
            val=${1#*=}
            shift
            set -- "$opt" "$val" "$@"
            continue
            ;;
        --redis-url | --prefix | --queue | --id | --delay)
            [ $# -ge 2 ] || die_usage "$1 needs a value"
            case $1 in
                --redis-url) url=$2 ;;
                --prefix) prefix=$2 ;;
                --queue) queue=$2 ;;
                --id) id=$2 ;;
                --delay) delay=$2 ;;
            esac
            shift 2
            ;;
        --)
            shift
            break
            ;;
        -?*) die_usage "unknown option $1" ;;
        *) break ;;
    esac
done

[ $# -ge 1 ] || die_usage "missing TYPE"
[ $# -le 2 ] || die_usage "too many arguments (quote the PAYLOAD as one argument)"
type=$1
payload=${2:-null}

[ -n "$type" ] || die_usage "TYPE must not be empty"
has_control "$type" && die_usage "TYPE must not contain control characters"
[ -n "$prefix" ] || die_usage "the prefix must not be empty"
case $queue in
    '' | *[{}]* | *[[:space:]]* | *[[:cntrl:]]*) die_usage "bad queue name '$queue'" ;;
esac

if [ -z "$id" ]; then
    rnd=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
    id=$(date -u +%Y%m%dT%H%M%SZ)-$rnd
fi
case $id in
    *[[:space:][:cntrl:]]*) die_usage "the id must not contain spaces or control characters" ;;
esac

if command -v jq >/dev/null 2>&1; then
    printf '%s' "$payload" | jq empty >/dev/null 2>&1 || die_usage "PAYLOAD is not valid JSON: $payload"
fi

delay_ms=
if [ -n "$delay" ]; then
    case $delay in
        *[!0-9.]* | *.*.* | .* | *.) die_usage "--delay takes seconds, e.g. 30 or 1.5, not '$delay'" ;;
    esac
    case $delay in
        *.*) whole=${delay%.*} frac=${delay#*.} ;;
        *) whole=$delay frac= ;;
    esac
    # Milliseconds: the first three decimals.
    frac=$(printf '%s000' "$frac" | cut -c1-3)
    delay_ms=$(($(decimal "$whole") * 1000 + $(decimal "$frac")))
fi

json="{\"id\":$(json_string "$id"),\"type\":$(json_string "$type"),\"payload\":$payload}"
key_base="$prefix:{$queue}"

if [ -z "$delay_ms" ]; then
    out=$("$cli" -u "$url" LPUSH "$key_base:pending" "$json") || die "redis-cli LPUSH failed"
else
    now=$("$cli" -u "$url" TIME) || die "redis-cli TIME failed"
    # Two lines: seconds, microseconds.
    set -f
    # shellcheck disable=SC2086 # split on purpose
    set -- $now
    set +f
    [ $# -eq 2 ] || die "unexpected reply to TIME: $now"
    case $1$2 in
        *[!0-9]*) die "unexpected reply to TIME: $now" ;;
    esac
    due=$(($1 * 1000 + $(decimal "$2") / 1000 + delay_ms))
    out=$("$cli" -u "$url" ZADD "$key_base:scheduled" "$due" "$json") || die "redis-cli ZADD failed"
fi

# redis-cli exits 0 on an error reply (WRONGTYPE, NOAUTH...): check the reply,
# an integer.
case $out in
    '' | *[!0-9]*) die "Redis refused the job: $out" ;;
esac

printf '%s\n' "$id"
