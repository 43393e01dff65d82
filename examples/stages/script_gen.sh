#!/bin/sh
# Demo stage 1 of the "video.generate" pipeline: pretend to write a script.
#
# Stage protocol (see docs/stages.md):
#   stdin   one JSON object {"id","type","payload","attempt","stage","results":{...}}
#   env     CONVEYOR_JOB_ID, CONVEYOR_JOB_TYPE, CONVEYOR_STAGE, CONVEYOR_ATTEMPT
#   stdout  {"progress": 0-100, "message": "..."} lines are progress reports,
#           {"result": <json>} sets the stage result (last one wins),
#           anything else is logged, as is stderr
#   exit    0 done, 64/65 permanent failure, anything else retryable
#
# POSIX sh only (no bash, jq or python), so it runs on any box. It writes no
# files: the paths in the result are illustrative.
#
# DEMO_STAGE_SLEEP: seconds between progress steps (default 0.15; 4 steps).

# The daemon writes the whole object and closes stdin; read it all so the
# writer never sees EPIPE, even though this demo barely looks at it.
input=$(cat)

step=${DEMO_STAGE_SLEEP:-0.15}
case $step in
    ''|*[!0-9.]*|*.*.*|.)
        echo "script_gen: ignoring invalid DEMO_STAGE_SLEEP='$step', using 0.15" >&2
        step=0.15 ;;
esac

job_id=${CONVEYOR_JOB_ID:-unknown}
# The id goes into a JSON string and a file name: keep only safe characters.
safe_id=$(printf '%s' "$job_id" | tr -c 'A-Za-z0-9._-' '_')

# Best-effort "title" from the payload, without a JSON parser: the first
# "title": "..." whose value has no quote or backslash, so it is safe to embed
# in a JSON string as is. Falls back to a generic name.
title=$(printf '%s\n' "$input" \
    | sed -n 's/.*"title"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p' \
    | head -n 1)
[ -n "$title" ] || title="untitled video"

echo "script_gen: job $safe_id attempt ${CONVEYOR_ATTEMPT:-1}: writing a 4-scene script for \"$title\"" >&2

printf '{"progress": 0, "message": "outlining \\"%s\\""}\n' "$title"
sleep "$step"
printf '{"progress": 25, "message": "writing scene 1 of 4"}\n'
sleep "$step"
printf '{"progress": 50, "message": "writing scene 2 of 4"}\n'
sleep "$step"
printf '{"progress": 75, "message": "writing scenes 3 and 4 of 4"}\n'
sleep "$step"
printf '{"progress": 100, "message": "script ready"}\n'

printf '{"result": {"script": "scripts/%s.txt", "scenes": 4}}\n' "$safe_id"
