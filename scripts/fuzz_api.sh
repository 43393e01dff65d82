#!/usr/bin/env bash
# Fuzzes the remote-worker API (/api/v1) of `conveyor gateway` from its
# own OpenAPI document with schemathesis: builds conveyor, starts a private
# redis-server and `conveyor gateway` on free loopback ports with the API
# enabled and a remote job type, enqueues remote jobs (so claims can answer
# 200), runs `schemathesis run` with every check, positive and negative
# data, then checks that the server still answers, that a claim gets a job
# once the leases the fuzzer left ran out (and completing it completes the
# job), that `conveyor status` and `conveyor jobs` still work, and that no
# 5xx was seen. Prints a summary (test cases, requests by operation and
# status, failures by check, each unique failure with its request and
# response) and exits non-zero on any failure.
#
# Usage: scripts/fuzz_api.sh [-n MAX_EXAMPLES] [-s SECONDS] [-k]
#   -n MAX_EXAMPLES  test cases per operation and phase (default 20)
#   -s SECONDS       hard limit on the schemathesis run (default 600); a run
#                    cut short by it fails
#   -k               keep the temporary directory (logs, reports)
# FUZZ_API_SEED=N replays a run's data (its seed is printed);
# FUZZ_API_WAIT_CAP=S caps the claims' wait_secs (default 1; 0 is fastest);
# FUZZ_API_BIN=PATH uses that conveyor binary instead of `cargo build`.
# schemathesis comes from PyPI into target/fuzz-venv (reused when it holds
# the wanted version; FUZZ_API_SCHEMATHESIS_VERSION=X.Y.Z wants another).
# Exit codes: 0 all checks passed; 1 a failure; 2 bad usage; 3 schemathesis
# could not be installed (no python3, no venv module or no network).
# Needs redis-server, redis-cli and curl (Debian/Ubuntu: apt-get install -y redis-server curl).
set -euo pipefail

. "$(dirname -- "${BASH_SOURCE[0]}")/lib/args.sh"

max_examples=20
seconds=600
keep=0
while getopts ":n:s:kh" opt; do
    case "$opt" in
        n) max_examples=$OPTARG ;;
        s) seconds=$OPTARG ;;
        k) keep=1 ;;
        h) usage; exit 0 ;;
        *) bad_option "$opt" ;;
    esac
done
shift $((OPTIND - 1))
no_arguments "$@"
need_number -n "$max_examples" 1
wait_cap=${FUZZ_API_WAIT_CAP:-1}
[[ $wait_cap =~ ^([0-9]|[12][0-9]|30)$ ]] || { echo "error: FUZZ_API_WAIT_CAP wants 0 to 30, got '$wait_cap'" >&2; exit 2; }
need_number -s "$seconds" 1

need_tools redis-server redis-cli curl
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is not on PATH: cannot install schemathesis" >&2
    exit 3
fi

cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
root=$PWD
start=$(date +%s)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/conveyor-fuzz-api.XXXXXX")
redis_pid=""
dash_pid=""
cleanup() {
    local pid
    for pid in "$dash_pid" "$redis_pid"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [ "$keep" = 1 ]; then
        echo "--- fuzz_api: kept $tmp"
    else
        rm -rf -- "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --- schemathesis, into a venv of its own (reused)
venv=${FUZZ_API_VENV:-$root/target/fuzz-venv}
want=${FUZZ_API_SCHEMATHESIS_VERSION:-4.32.5}
spec="schemathesis==$want"
have=""
if [ -x "$venv/bin/schemathesis" ]; then
    have=$("$venv/bin/schemathesis" --version 2>/dev/null | awk '{print $NF}' || true)
fi
if [ "$have" != "$want" ]; then
    echo "--- fuzz_api: installing $spec into $venv"
    rm -rf -- "$venv"
    if ! python3 -m venv "$venv" >"$tmp/venv.log" 2>&1; then
        cat "$tmp/venv.log" >&2
        echo "error: python3 -m venv failed (Debian/Ubuntu: apt-get install -y python3-venv)" >&2
        rm -rf -- "$venv"
        exit 3
    fi
    if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --timeout 30 --retries 2 "$spec" >"$tmp/pip.log" 2>&1; then
        tail -n 20 "$tmp/pip.log" >&2
        echo "error: pip install $spec failed (no network?)" >&2
        rm -rf -- "$venv"
        exit 3
    fi
fi
st_version=$("$venv/bin/schemathesis" --version | awk '{print $NF}')

# --- conveyor
if [ -n "${FUZZ_API_BIN:-}" ]; then
    bin=$FUZZ_API_BIN
else
    command -v cargo >/dev/null 2>&1 || { echo "error: cargo is not on PATH" >&2; exit 1; }
    cargo build --locked --quiet
    bin=$root/target/debug/conveyor
fi

# --- redis
redis_port=$(free_port)
mkdir -p "$tmp/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp/redis" --logfile "$tmp/redis.log" >/dev/null 2>&1 &
redis_pid=$!
for _ in $(seq 100); do
    if redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG; then break; fi
    kill -0 "$redis_pid" 2>/dev/null || { cat "$tmp/redis.log" >&2; echo "error: redis-server exited" >&2; exit 1; }
    sleep 0.1
done

# --- conveyor gateway (the API and its daemon)
token="fuzz-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
cat >"$tmp/conveyor.toml" <<EOF
[worker]
queues = ["local"]
shutdown_grace_secs = 2
heartbeat_secs = 1
dead_after_secs = 3
fetch_block_ms = 100
promote_interval_ms = 50

[gateway]
tokens = { workers = "$token" }
lease_secs = 5
max_jobs = 4

[retry]
backoff_ms = 50
backoff_max_ms = 100

[jobs."demo.remote"]
remote = true
queue = "remote"
max_attempts = 3
stages = [{ name = "fetch" }, { name = "transform", weight = 2 }, { name = "upload" }]

[jobs.local]
queue = "local"
stages = [{ name = "only", builtin = "noop" }]
EOF
for k in $(env | sed -n 's/^\(CONVEYOR_[A-Z_]*\)=.*/\1/p'); do unset "$k"; done
export CONVEYOR_REDIS_URL="redis://127.0.0.1:$redis_port"
export CONVEYOR_DB="$tmp/conveyor.db"
export CONVEYOR_PREFIX="fuzz$(date +%s)"
export CONVEYOR_CONFIG="$tmp/conveyor.toml"
export CONVEYOR_LOG_FORMAT=json

dash_port=$(free_port)
base="http://127.0.0.1:$dash_port"
"$bin" gateway --listen "127.0.0.1:$dash_port" >"$tmp/gateway.log" 2>&1 &
dash_pid=$!
up=0
for _ in $(seq 150); do
    if curl -fsS -o /dev/null "$base/api/v1/openapi.json" 2>/dev/null; then up=1; break; fi
    kill -0 "$dash_pid" 2>/dev/null || break
    sleep 0.1
done
if [ "$up" != 1 ]; then
    tail -n 50 "$tmp/gateway.log" >&2
    echo "error: conveyor gateway did not answer on $base" >&2
    exit 1
fi

jobs_enqueued=$((max_examples < 20 ? 20 : max_examples))
for i in $(seq "$jobs_enqueued"); do
    "$bin" enqueue demo.remote --payload "{\"n\": $i}" >/dev/null
done

# --- schemathesis
# Hooks: claims wait at most FUZZ_API_WAIT_CAP s (valid wait_secs above it,
# or absent, are lowered to it, so that a run is not made of 20-30 s long
# polls; invalid values are left alone), and every call is logged (method,
# path, status) for the summary.
cat >"$tmp/hooks.py" <<'EOF'
import json
import os

import schemathesis

CALLS = os.environ["FUZZ_API_CALLS"]
CAP = int(os.environ["FUZZ_API_WAIT_CAP"])


def null_is_valid(op):
    """Whether the document lets wait_secs be null (then null means the default)."""
    try:
        prop = op.schema.raw_schema["components"]["schemas"]["ClaimRequest"]["properties"]["wait_secs"]
    except (KeyError, TypeError):
        return False
    return prop.get("nullable") is True


@schemathesis.hook
def before_call(context, case, kwargs):
    op = context.operation
    if op is None or op.path != "/api/v1/claim" or not isinstance(case.body, dict):
        return
    wait = case.body.get("wait_secs")
    if (
        "wait_secs" not in case.body
        or (wait is None and null_is_valid(op))
        or (isinstance(wait, int) and not isinstance(wait, bool) and CAP < wait <= 30)
    ):
        case.body["wait_secs"] = CAP


@schemathesis.hook
def after_call(context, case, response):
    with open(CALLS, "a") as f:
        f.write(json.dumps({
            "method": case.method,
            "path": case.operation.path,
            "status": response.status_code,
            "body": response.text[:300] if response.status_code >= 500 else None,
        }) + "\n")
EOF
# An empty config file of our own, so that no schemathesis.toml around
# changes the run.
: >"$tmp/schemathesis.toml"

export FUZZ_API_CALLS="$tmp/calls.ndjson"
export FUZZ_API_WAIT_CAP="$wait_cap"
export SCHEMATHESIS_HOOKS="$tmp/hooks.py"
: >"$FUZZ_API_CALLS"
cmd=("$venv/bin/schemathesis" --config-file "$tmp/schemathesis.toml" run "$base/api/v1/openapi.json"
    -H "Authorization: Bearer $token"
    --checks all
    --mode all
    --phases examples,coverage,fuzzing,stateful
    --max-examples "$max_examples"
    --request-timeout 35
    --max-response-time 10
    --workers 1
    --seed "${FUZZ_API_SEED:-$RANDOM}"
    --generation-database none
    --suppress-health-check too_slow,filter_too_much
    --report junit,ndjson --report-dir "$tmp/report"
    --no-color)
echo "--- fuzz_api: schemathesis $st_version, $jobs_enqueued remote jobs, server $base"
echo "--- fuzz_api: ${cmd[*]/$token/<token>}" | sed "s/$token/<token>/g"
set +e
# From $tmp: schemathesis keeps a .schemathesis/ cache in its working directory.
(cd "$tmp" && exec timeout --signal=INT --kill-after=10 "$seconds" "${cmd[@]}") 2>&1 | sed "s/$token/<token>/g" | tee "$tmp/schemathesis.out"
st_status=${PIPESTATUS[0]}
set -e
timed_out=0
[ "$st_status" = 124 ] || [ "$st_status" = 130 ] && timed_out=1

# --- after the run: the server, conveyor's state
after_ok=1
if ! kill -0 "$dash_pid" 2>/dev/null; then
    echo "FAIL: conveyor gateway exited during the run" >&2
    tail -n 50 "$tmp/gateway.log" >&2
    after_ok=0
elif ! curl -fsS -o /dev/null "$base/api/v1/openapi.json"; then
    echo "FAIL: the server no longer serves /api/v1/openapi.json" >&2
    after_ok=0
else
    # Leases the fuzzer left behind run out within lease_secs (5 s): a
    # claim must then get a job, and completing it must complete the job.
    "$bin" enqueue demo.remote --payload '{"after": true}' >/dev/null
    code=$(curl -sS --max-time 30 -o "$tmp/claim.json" -w '%{http_code}' -X POST "$base/api/v1/claim" \
        -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d '{"worker_id": "fuzz-after", "types": ["demo.remote"], "wait_secs": 15}' || true)
    if [ "$code" != 200 ]; then
        echo "FAIL: a valid claim after the run (wait_secs 15, lease_secs 5) answered $code, not 200 with a job: $(cat "$tmp/claim.json")" >&2
        after_ok=0
    else
        read -r job_id lease < <(python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print(j["job_id"], j["lease"]["token"])' "$tmp/claim.json")
        code=$(curl -sS --max-time 10 -o "$tmp/complete.json" -w '%{http_code}' -X POST "$base/api/v1/jobs/$job_id/complete" \
            -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
            -d "{\"lease\": \"$lease\", \"result\": {\"by\": \"fuzz_api\"}}" || true)
        status=""
        for _ in $(seq 100); do
            status=$("$bin" job "$job_id" --json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' 2>/dev/null || true)
            [ "$status" = completed ] && break
            sleep 0.1
        done
        if [ "$code" != 200 ] || [ "$status" != completed ]; then
            echo "FAIL: completing job $job_id after the run: $code $(cat "$tmp/complete.json"); its status: ${status:-?}" >&2
            after_ok=0
        fi
    fi
fi
if ! "$bin" status --json >"$tmp/status.json" 2>"$tmp/status.err"; then
    echo "FAIL: conveyor status --json: $(cat "$tmp/status.err")" >&2
    after_ok=0
fi
if ! "$bin" jobs --json >"$tmp/jobs.json" 2>"$tmp/jobs.err"; then
    echo "FAIL: conveyor jobs --json: $(cat "$tmp/jobs.err")" >&2
    after_ok=0
fi
if command -v sqlite3 >/dev/null 2>&1; then
    integrity=$(sqlite3 "$CONVEYOR_DB" 'PRAGMA integrity_check' 2>&1 || true)
    if [ "$integrity" != ok ]; then
        echo "FAIL: SQLite integrity_check: $integrity" >&2
        after_ok=0
    fi
fi
if grep -q '"level":"ERROR"' "$tmp/gateway.log" || grep -qi 'panicked' "$tmp/gateway.log"; then
    echo "FAIL: the gateway logged errors or panics:" >&2
    grep -E '"level":"ERROR"|panicked' "$tmp/gateway.log" | head -n 20 >&2
    after_ok=0
fi

# --- summary
summary_status=0
python3 - "$tmp" "$st_status" "$timed_out" "$after_ok" "$st_version" "$(($(date +%s) - start))" <<'EOF' || summary_status=$?
import base64, collections, glob, json, os, sys

tmp, st_status, timed_out, after_ok, version, wall = sys.argv[1:]
st_status, timed_out, after_ok = int(st_status), timed_out == "1", after_ok == "1"

calls = [json.loads(l) for l in open(os.path.join(tmp, "calls.ndjson")) if l.strip()]
by_status = collections.Counter(c["status"] for c in calls)
by_op = collections.Counter(c["path"].rsplit("/", 1)[-1] for c in calls)
server_errors = [c for c in calls if c["status"] >= 500]

# Test cases and check results, from the ndjson event stream.
cases = 0
checks_run = collections.Counter()
failures = collections.Counter()
unique = {}
for path in glob.glob(os.path.join(tmp, "report", "*.ndjson")):
    for line in open(path):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        rec = (ev.get("ScenarioFinished") or {}).get("recorder") or {}
        cases += len(rec.get("cases") or {})
        for case_id, results in (rec.get("checks") or {}).items():
            for r in results:
                checks_run[r["name"]] += 1
                if r.get("status") != "failure":
                    continue
                failures[r["name"]] += 1
                f = (r.get("failure_info") or {}).get("failure") or {}
                key = (r["name"], f.get("operation"), f.get("title"), f.get("message"))
                if key in unique:
                    continue
                case = ((rec.get("cases") or {}).get(case_id) or {}).get("value") or {}
                inter = (rec.get("interactions") or {}).get(case_id) or {}
                req = inter.get("request") or {}
                body = req.get("body")
                if isinstance(body, dict) and "$base64" in body:
                    body = base64.b64decode(body["$base64"]).decode("utf-8", "replace")
                resp = inter.get("response") or {}
                content = resp.get("content")
                if isinstance(content, dict) and "$base64" in content:
                    content = base64.b64decode(content["$base64"]).decode("utf-8", "replace")
                phase = ((case.get("meta") or {}).get("phase") or {}).get("name")
                unique[key] = (
                    f"{r['name']} [{f.get('code')}] {f.get('operation')} ({phase} phase, case {case_id}): {f.get('title')}\n"
                    f"      {(f.get('message') or '').replace(chr(10), '; ')}\n"
                    f"      request: {req.get('method')} {req.get('uri')} body={body}\n"
                    f"      response: {resp.get('status_code')} {str(content)[:300]}"
                )
print()
print(f"=== fuzz_api summary (schemathesis {version}, {wall} s wall)")
print(f"test cases: {cases}; requests: {len(calls)}")
print("requests by operation: " + ", ".join(f"{k} {v}" for k, v in sorted(by_op.items())))
print("requests by status: " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
print(f"5xx: {len(server_errors)}")
for c in server_errors[:10]:
    print(f"  {c['method']} {c['path']} -> {c['status']}: {c['body']}")
print("checks run: " + ", ".join(f"{k} {v}" for k, v in sorted(checks_run.items())))
if failures:
    print("failures by check: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))
    print(f"unique failures ({len(unique)}):")
    for text in unique.values():
        print("  - " + text)
else:
    print("failures by check: none")
print(f"schemathesis exit code: {st_status}" + (" (cut short by -s)" if timed_out else ""))
print(f"server and state after the run: {'ok' if after_ok else 'FAILED'}")
ok = st_status == 0 and not timed_out and after_ok and not server_errors and not failures
print("RESULT: " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
EOF
exit "$summary_status"
