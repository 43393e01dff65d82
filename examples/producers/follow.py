#!/usr/bin/env python3
"""Follow conveyor progress messages from Python with redis-py.

    pip install redis
    follow.py [--redis-url URL] [--prefix P] [--timeout SECONDS] [--json] [JOB_ID]

With JOB_ID: SUBSCRIBE P:progress:<JOB_ID> and exit when the job reaches a
final status: 0 when it completed, 1 when it failed or was cancelled (the
exit codes of `conveyor watch ID`). Without: PSUBSCRIBE P:progress:* and
print every job's messages until interrupted.

Each message is printed as one line:

    <job_id> <status> <event> <progress>% <stage or -> <message>

(--json prints the message itself instead). "following ..." goes to stderr
once Redis has confirmed the subscription: start the follower before the job
is enqueued, pub/sub does not replay what was published before.

--timeout: give up after SECONDS without reaching a final status, exit 124.

Messages are JSON: job_id, type, queue, status, event, stage (or null),
stage_index, stages_total, progress (0-100, whole job), attempt, worker_id,
message (or null), ts (RFC 3339) and seq. seq counts the messages of one run
of the job (one delivery to one daemon) and starts again at 1 on the next run
(a retry's attempt, or a job resumed after a daemon stopped). A message whose
seq is not greater than the last one seen of the same run is a repeat or
arrived late, and is skipped. A run is told apart by (attempt, worker_id);
a job_started message always begins a new one, and a message with a final
status always passes (a job cancelled before its next run says so with seq 1).

Pub/sub is at-most-once: a follower that loses its connection misses
messages. `conveyor job ID` (SQLite) holds the truth.
"""

import argparse
import json
import os
import sys
import time

try:
    import redis
except ImportError:
    sys.exit("follow.py: needs redis-py: pip install redis")

FINAL = {"completed": 0, "failed": 1, "cancelled": 1}


class Order:
    """Drops repeated and late messages, per job and run (see the docstring)."""

    def __init__(self):
        self.last = {}  # job_id -> ((attempt, worker_id), seq)

    def accept(self, msg) -> bool:
        seq = msg.get("seq")
        if not isinstance(seq, int):
            return True
        run = (msg.get("attempt"), msg.get("worker_id"))
        job = msg.get("job_id")
        seen = self.last.get(job)
        starts_or_ends = msg.get("event") == "job_started" or msg.get("status") in FINAL
        if seen is not None and seen[0] == run and seq <= seen[1] and not starts_or_ends:
            return False
        self.last[job] = (run, seq)
        return True


def one_line(text) -> str:
    """Keeps a message on one line (and out of the terminal's control codes)."""
    return "".join(c if c.isprintable() else " " for c in str(text))


def format_message(msg) -> str:
    progress = msg.get("progress")
    pct = f"{progress:.1f}%" if isinstance(progress, (int, float)) else "?%"
    fields = [
        msg.get("job_id"),
        msg.get("status"),
        msg.get("event"),
        pct,
        msg.get("stage") or "-",
        msg.get("message") or "",
    ]
    return " ".join(one_line(f) for f in fields).rstrip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="follow.py", description="Follow conveyor progress messages.")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL")
        or os.environ.get("CONVEYOR_REDIS_URL")
        or "redis://127.0.0.1:6379",
        help="default $REDIS_URL, then $CONVEYOR_REDIS_URL, then redis://127.0.0.1:6379",
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("CONVEYOR_PREFIX") or "conveyor",
        help="key prefix, default $CONVEYOR_PREFIX, then conveyor",
    )
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after SECONDS (exit 124)")
    p.add_argument("--json", action="store_true", help="print each message as received (JSON)")
    p.add_argument("job_id", metavar="JOB_ID", nargs="?", help="follow this job until it ends")
    args = p.parse_args(argv)

    r = redis.Redis.from_url(args.redis_url, decode_responses=True, socket_connect_timeout=10)
    pubsub = r.pubsub()
    if args.job_id is not None:
        channel = f"{args.prefix}:progress:{args.job_id}"
        pubsub.subscribe(channel)
    else:
        channel = f"{args.prefix}:progress:*"
        pubsub.psubscribe(channel)

    order = Order()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while True:
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    print(f"follow.py: no final status within {args.timeout} s", file=sys.stderr)
                    return 124
                wait = min(wait, 1.0)
            item = pubsub.get_message(timeout=wait)
            if item is None:
                continue
            if item["type"] in ("subscribe", "psubscribe"):
                print(f"following {item['channel']}", file=sys.stderr, flush=True)
                continue
            if item["type"] not in ("message", "pmessage"):
                continue
            try:
                msg = json.loads(item["data"])
            except ValueError:
                print(f"follow.py: not JSON on {item['channel']}: {item['data']!r}", file=sys.stderr)
                continue
            if not isinstance(msg, dict) or not order.accept(msg):
                continue
            print(item["data"] if args.json else format_message(msg), flush=True)
            if args.job_id is not None and msg.get("job_id") == args.job_id and msg.get("status") in FINAL:
                return FINAL[msg["status"]]
    except KeyboardInterrupt:
        return 130
    except redis.RedisError as e:
        print(f"follow.py: {e} (pub/sub missed whatever came meanwhile; see `conveyor job ID`)", file=sys.stderr)
        return 1
    finally:
        pubsub.close()
        r.close()


if __name__ == "__main__":
    sys.exit(main())
