#!/bin/sh
# Demo stage 4 (last) of the "video.generate" pipeline: pretend to mux the
# voice-over and the rendered frames into the final file.
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
: "$input"  # not needed by this demo stage

step=${DEMO_STAGE_SLEEP:-0.15}
case $step in
    ''|*[!0-9.]*|*.*.*|.)
        echo "compositing: ignoring invalid DEMO_STAGE_SLEEP='$step', using 0.15" >&2
        step=0.15 ;;
esac

job_id=${CONVEYOR_JOB_ID:-unknown}
safe_id=$(printf '%s' "$job_id" | tr -c 'A-Za-z0-9._-' '_')

echo "compositing: job $safe_id attempt ${CONVEYOR_ATTEMPT:-1}: muxing audio and video into out/$safe_id.mp4" >&2

printf '{"progress": 0, "message": "aligning audio and video tracks"}\n'
sleep "$step"
printf '{"progress": 25, "message": "adding titles"}\n'
sleep "$step"
printf '{"progress": 50, "message": "encoding (pass 1 of 2)"}\n'
sleep "$step"
printf '{"progress": 75, "message": "encoding (pass 2 of 2)"}\n'
sleep "$step"
printf '{"progress": 100, "message": "wrote out/%s.mp4"}\n' "$safe_id"

printf '{"result": {"output": "out/%s.mp4"}}\n' "$safe_id"
