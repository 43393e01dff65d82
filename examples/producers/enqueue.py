#!/usr/bin/env python3
"""Enqueue one conveyor job from Python with redis-py (a raw producer).

    pip install redis
    enqueue.py [--redis-url URL] [--prefix P] [--queue Q] [--id ID]
               [--delay SECONDS] TYPE [PAYLOAD]

Prints the job id. Exit 0 when Redis accepted the job, 2 for a usage error,
1 for anything else.

What it does (the key layout of docs/reference/redis-keys.md):
    now:      LPUSH P:{Q}:pending '{"id": ..., "type": ..., "payload": ...}'
    --delay:  ZADD  P:{Q}:scheduled <due Unix ms> '<the same JSON>'
The due time is Redis' TIME plus the delay, the clock the daemons promote by,
so this host's clock does not matter.

A raw push skips the "a live job id is not enqueued twice" check: only
`conveyor enqueue` refuses an id that is already pending, scheduled or
running. Give each job its own id (the default) or go through the CLI.

In your own code the whole producer is two lines:

    job = {"id": job_id, "type": "video.generate", "payload": {"video_id": 123}}
    redis.Redis.from_url(url).lpush("conveyor:{default}:pending", json.dumps(job))
"""

import argparse
import json
import os
import sys
import uuid

try:
    import redis
except ImportError:
    sys.exit("enqueue.py: needs redis-py: pip install redis")


def job_key(prefix: str, queue: str, kind: str) -> str:
    # The braces are a Redis Cluster hash tag: all keys of one queue in one slot.
    return f"{prefix}:{{{queue}}}:{kind}"


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="enqueue.py", description="Enqueue one conveyor job (LPUSH, or ZADD with --delay)."
    )
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
    p.add_argument("--queue", default="default", help='default "default"')
    p.add_argument("--id", help="job id, default: a random UUID")
    p.add_argument(
        "--delay",
        type=float,
        metavar="SECONDS",
        help="run no earlier than SECONDS from now, by the Redis server's clock",
    )
    p.add_argument("type", metavar="TYPE", help="the job type")
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default="null", help="any JSON, default null")
    args = p.parse_args(argv)

    try:
        args.payload = json.loads(args.payload, parse_constant=reject_constant)
    except ValueError as e:
        p.error(f"PAYLOAD is not valid JSON: {e}")
    if args.delay is not None and not (args.delay >= 0 and args.delay < float("inf")):
        p.error("--delay must be a number of seconds >= 0")
    if args.id is None:
        args.id = str(uuid.uuid4())
    if not args.id or any(c.isspace() or not c.isprintable() for c in args.id):
        p.error("the id must not be empty or contain spaces or control characters")
    if not args.type:
        p.error("TYPE must not be empty")
    if not args.prefix:
        p.error("the prefix must not be empty")
    if not args.queue or any(c in "{}" or c.isspace() or not c.isprintable() for c in args.queue):
        p.error(f"bad queue name {args.queue!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    job = {"id": args.id, "type": args.type, "payload": args.payload}
    body = json.dumps(job, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    r = redis.Redis.from_url(args.redis_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        if args.delay is None:
            r.lpush(job_key(args.prefix, args.queue, "pending"), body)
        else:
            secs, micros = r.time()  # the Redis server's clock
            due_ms = secs * 1000 + micros // 1000 + round(args.delay * 1000)
            r.zadd(job_key(args.prefix, args.queue, "scheduled"), {body: due_ms})
    except redis.RedisError as e:
        print(f"enqueue.py: {e}", file=sys.stderr)
        return 1
    finally:
        r.close()
    print(args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
