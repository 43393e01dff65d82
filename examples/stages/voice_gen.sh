#!/bin/sh
# Demo stage 2 of the "video.generate" pipeline: pretend to record a voice-over
# for the script written by script_gen.
#
# Stage protocol (see docs/stages.md):
#   stdin   one JSON object {"id","type","payload","attempt","stage","results":{...}}
#   env     CONVEYOR_JOB_ID, CONVEYOR_JOB_TYPE, CONVEYOR_STAGE, CONVEYOR_ATTEMPT
#   stdout  {"progress": 0-100, "message": "..."} lines are progress reports,
#           {"result": <json>} sets the stage result (last one wins),
#           anything else is logged, as is stderr
#   exit    0 done, 64/65 permanent failure, anything else retryable
#
# POSIX sh only (no bash, jq or python). It writes no files: the paths in the
# result are illustrative.
#
# DEMO_STAGE_SLEEP: seconds between progress steps (default 0.15; 4 steps).

# Read stdin fully so the daemon's write never fails with EPIPE.
input=$(cat)

step=${DEMO_STAGE_SLEEP:-0.15}
case $step in
    ''|*[!0-9.]*|*.*.*|.)
        echo "voice_gen: ignoring invalid DEMO_STAGE_SLEEP='$step', using 0.15" >&2
        step=0.15 ;;
esac

job_id=${CONVEYOR_JOB_ID:-unknown}
safe_id=$(printf '%s' "$job_id" | tr -c 'A-Za-z0-9._-' '_')

# Show that earlier results arrive on stdin: pick script_gen's "script" path
# (crude sed match, good enough for a demo; real stages should parse JSON).
script=$(printf '%s\n' "$input" \
    | sed -n 's/.*"script"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p' \
    | head -n 1)
[ -n "$script" ] || script="(no script result found)"

echo "voice_gen: job $safe_id attempt ${CONVEYOR_ATTEMPT:-1}: synthesising voice from $script" >&2

printf '{"progress": 0, "message": "loading voice model"}\n'
sleep "$step"
printf '{"progress": 25, "message": "recording scene 1 of 4"}\n'
sleep "$step"
printf '{"progress": 50, "message": "recording scene 2 of 4"}\n'
sleep "$step"
printf '{"progress": 75, "message": "recording scenes 3 and 4 of 4"}\n'
sleep "$step"
printf '{"progress": 100, "message": "voice-over ready (42 s)"}\n'

printf '{"result": {"audio": "audio/%s.wav", "seconds": 42}}\n' "$safe_id"
