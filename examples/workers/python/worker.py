#!/usr/bin/env python3
"""A conveyor remote worker in Python 3, standard library only.

It takes jobs over the HTTP API of `conveyor gateway` (the OpenAPI document
is served at /api/v1/openapi.json) and holds no Redis connection:

    claim   POST /api/v1/claim              long-poll for one job and a lease
    stage   run the handler of each stage not yet in the job's "results"
            (those were finished by an earlier attempt), each in a thread of
            its own while this thread watches the lease and the shutdown grace
    renew   POST /api/v1/jobs/{id}/heartbeat every ttl_secs/3 (a heartbeat
            thread), and on every ctx.progress() (POST .../progress)
    done    POST /api/v1/jobs/{id}/complete {"lease", "stage", "result"}
            after each stage; the job is completed with its last stage
    error   POST /api/v1/jobs/{id}/fail {"lease", "error", "retryable"}:
            retryable unless the handler raised PermanentError
    stop    POST /api/v1/jobs/{id}/release {"lease"} (see SIGTERM below)

A 409 from any call means the lease is gone (it expired, another worker has
the job, or the job was cancelled): the job is dropped (ctx.cancelled turns
true, ctx.progress() raises LeaseLost) and the worker claims the next one.

SIGTERM / SIGINT: no more claims (a claim waiting for a job is abandoned).
The running stage goes on until it ends (and is completed as usual) or the
grace (--grace, 10 s) runs out. An unfinished job is then given back with
POST /api/v1/jobs/{id}/release: it returns to its queue and resumes at its
current stage, without an attempt counted. The exit code is 0. A second
signal ends the grace at once.

Usage:
    worker.py --api-url http://127.0.0.1:8081 --worker-id py-1 \\
              --task-types demo.remote        # token: $CONVEYOR_API_TOKEN

Handlers: HANDLERS maps (job type, stage) or a job type to a function taking
a Context and returning the stage's result (any JSON). Register your own with
the @handler decorator, in this file or from a module that imports it:

    from worker import handler, main
    @handler("thumbs.make", "resize")
    def resize(ctx):
        ctx.progress(50, "half way")
        return {"width": ctx.payload["width"] // 2}
    main()

Exit codes: 0 done (--max-runs reached, or stopped by a signal), 1 the API
refused the token, 2 bad options.
"""

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("conveyor.worker")

API = "/api/v1"
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TRUE_WORDS = {"1", "true", "yes", "on"}


class PermanentError(Exception):
    """Raise from a handler to dead-letter the job at once (retryable false)."""


class LeaseLost(Exception):
    """The lease is gone (409): expired, taken by another worker, or cancelled."""


class ApiError(Exception):
    """A reply other than the one expected (status None: no reply at all)."""

    def __init__(self, status, message, reason=None):
        super().__init__(message)
        self.status = status
        self.reason = reason


class Unauthorized(Exception):
    """401: the API refused the token."""


class Shutdown(BaseException):
    """Raised by the signal handler to abandon a waiting claim."""


# ---------------------------------------------------------------- handlers

HANDLERS = {}


def handler(job_type, stage=None):
    """Decorator: registers fn for a job type's stage, or for all its stages."""

    def register(fn):
        HANDLERS[(job_type, stage) if stage else job_type] = fn
        return fn

    return register


def find_handler(job_type, stage):
    return HANDLERS.get((job_type, stage)) or HANDLERS.get(job_type)


def handled_types():
    return sorted({k[0] if isinstance(k, tuple) else k for k in HANDLERS})


def _nap(ctx, secs):
    """Sleeps secs in short steps; stops early when the job was dropped."""
    end = time.monotonic() + secs
    while not ctx.cancelled and time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    if ctx.cancelled:
        raise LeaseLost("job dropped")


def _demo_step(ctx, verb):
    """Progress 0, 50, 100 with a nap of payload["sleep"] seconds (0.2) in all."""
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    secs = float(payload.get("sleep", 0.2))
    ctx.progress(0, f"{verb} started")
    _nap(ctx, secs / 2)
    ctx.progress(50, f"{verb} half done")
    _nap(ctx, secs / 2)
    ctx.progress(100, f"{verb} done")


@handler("demo.remote", "fetch")
def demo_fetch(ctx):
    _demo_step(ctx, "fetch")
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return {"n": payload.get("n", 1)}


@handler("demo.remote", "transform")
def demo_transform(ctx):
    _demo_step(ctx, "transform")
    # From an earlier attempt (the claim's "results") or this one: the same dict.
    return {"n": ctx.results["fetch"]["n"] * 2}


@handler("demo.remote", "upload")
def demo_upload(ctx):
    _demo_step(ctx, "upload")
    return {"uploaded": True, "n": ctx.results["transform"]["n"], "by": ctx.worker_id}


@handler("fail.always")
def fail_always(ctx):
    raise RuntimeError(f"fail.always fails on purpose (attempt {ctx.attempt})")


@handler("fail.permanent")
def fail_permanent(ctx):
    raise PermanentError("fail.permanent fails for good")


# ---------------------------------------------------------------- HTTP


class Api:
    """JSON POSTs to the API; the bearer token is sent, never logged."""

    def __init__(self, base_url, token, debug):
        base = base_url.rstrip("/")
        if base.endswith(API):
            base = base[: -len(API)]
        self.base = base
        self.token = token
        self.debug = debug

    def post(self, path, body, timeout=30.0, on_answer=None):
        """Returns (status, parsed JSON or None). Raises LeaseLost on 409 and
        ApiError(None, ...) when the server cannot be reached."""
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.base + API + path, data=data, method="POST")
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        req.add_header("User-Agent", "conveyor-worker-python/1")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        if self.debug:
            log.debug("http_request POST %s%s %s", API, path, data.decode())
        try:
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, raw = e.code, e.read() or b""
        except (OSError, ValueError) as e:  # URLError, timeouts, resets
            raise ApiError(None, f"POST {API}{path}: {e}") from None
        finally:
            if on_answer:
                on_answer()
        text = raw.decode("utf-8", "replace")
        if self.debug:
            log.debug("http_response %d %s%s %s", status, API, path, text[:2000])
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        reason = parsed.get("reason") if isinstance(parsed, dict) else None
        if status == 409:
            raise LeaseLost(reason or "conflict")
        return status, parsed


def error_text(status, parsed):
    if isinstance(parsed, dict) and parsed.get("error"):
        return f"{status} {parsed.get('reason') or ''} {parsed['error']}".replace("  ", " ")
    return str(status)


# ---------------------------------------------------------------- lease


class Lease:
    """A job's lease, shared by the stage threads and the heartbeat thread."""

    def __init__(self, data):
        self._lock = threading.Lock()
        self.token = data["token"]
        self.ttl = max(1, int(data.get("ttl_secs") or 1))
        self.renewed_at = time.monotonic()
        self.lost = threading.Event()

    def renewed(self, data):
        with self._lock:
            if isinstance(data, dict) and data.get("token"):
                self.token = data["token"]
                self.ttl = max(1, int(data.get("ttl_secs") or self.ttl))
            self.renewed_at = time.monotonic()

    def expires_in(self):
        return self.renewed_at + self.ttl - time.monotonic()


class Context:
    """What a handler gets: the job, its stage, progress() and cancelled."""

    def __init__(self, worker, job, stage, lease):
        self._worker = worker
        self._lease = lease
        self.job = job
        self.stage = stage
        self.worker_id = worker.worker_id
        self.job_id = job["job_id"]
        self.payload = job.get("payload")
        self.attempt = job.get("attempt", 1)
        # Results of the finished stages: earlier attempts' and this one's.
        self.results = job["results"]
        self.log = log

    @property
    def cancelled(self):
        """True once the lease is gone: stop working, nothing will be accepted."""
        return self._lease.lost.is_set()

    def progress(self, percent, message=None):
        """Publishes progress of this stage (0-100) and renews the lease.
        Raises LeaseLost when the lease is gone; other errors are logged."""
        if self.cancelled:
            raise LeaseLost("job dropped")
        body = {
            "lease": self._lease.token,
            "progress": min(100.0, max(0.0, float(percent))),
        }
        if self.stage:
            body["stage"] = self.stage
        if message:
            body["message"] = str(message)[:1000]
        try:
            status, data = self._worker.api.post(f"/jobs/{self.job_id}/progress", body)
        except LeaseLost as e:
            self._worker.lease_lost(self.job_id, self._lease, "progress", e)
            raise
        except ApiError as e:
            log.warning("progress_error job=%s stage=%s error=%s", self.job_id, self.stage, e)
            return False
        if status != 200:
            log.warning(
                "progress_refused job=%s stage=%s status=%s",
                self.job_id,
                self.stage,
                error_text(status, data),
            )
            return False
        self._lease.renewed(data)
        return True


class Heartbeat(threading.Thread):
    """Renews a job's lease every ttl_secs/3 until stopped or the lease is lost."""

    def __init__(self, worker, job_id, lease):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.worker, self.job_id, self.lease = worker, job_id, lease
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(max(0.5, self.lease.ttl / 3)):
            if self.lease.lost.is_set():
                return
            try:
                status, data = self.worker.api.post(
                    f"/jobs/{self.job_id}/heartbeat", {"lease": self.lease.token}
                )
            except LeaseLost as e:
                if not self.done.is_set():  # else the job just ended
                    self.worker.lease_lost(self.job_id, self.lease, "heartbeat", e)
                return
            except ApiError as e:
                if self.done.is_set():
                    return
                log.warning("heartbeat_error job=%s error=%s", self.job_id, e)
                continue
            if status == 200:
                self.lease.renewed(data)
            else:
                log.warning("heartbeat_refused job=%s status=%s", self.job_id, error_text(status, data))


# ---------------------------------------------------------------- worker


class Worker:
    def __init__(self, opts):
        self.api = Api(opts.api_url, opts.token, opts.debug)
        self.worker_id = opts.worker_id
        self.types = opts.task_types
        self.poll_interval = opts.poll_interval
        self.wait = opts.wait
        self.max_runs = opts.max_runs
        self.grace = opts.grace
        self.stopping = False
        self.deadline = None  # monotonic end of the grace, once stopping
        self.in_claim = False
        self.runs = 0

    # -- signals

    def install_signals(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.stopping:
            self.deadline = now
            log.info("shutdown_now signal=%s", name)
        else:
            self.stopping = True
            self.deadline = now + self.grace
            log.info("shutdown_requested signal=%s grace_secs=%s", name, self.grace)
        if self.in_claim:
            self.in_claim = False
            raise Shutdown()

    def grace_over(self):
        return self.stopping and time.monotonic() >= self.deadline

    # -- main loop

    def run(self):
        log.info(
            "worker_started worker=%s api=%s types=%s wait_secs=%s",
            self.worker_id,
            self.api.base,
            ",".join(self.types) or "*",
            self.wait,
        )
        while not self.stopping:
            try:
                job = self.claim()
            except Shutdown:
                break
            except Unauthorized as e:
                log.error("unauthorized error=%s (check --token / CONVEYOR_API_TOKEN)", e)
                return 1
            if job is None:
                if not self.stopping:
                    self.sleep(self.poll_interval)
                continue
            self.handle(job)
            self.runs += 1
            if self.max_runs and self.runs >= self.max_runs:
                log.info("max_runs_reached runs=%d", self.runs)
                break
        log.info("worker_stopped worker=%s runs=%d", self.worker_id, self.runs)
        return 0

    def sleep(self, secs):
        end = time.monotonic() + secs
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def claim(self):
        """One long-poll; the claimed job, or None (no job, or an error)."""
        body = {"worker_id": self.worker_id, "wait_secs": self.wait}
        if self.types:
            body["types"] = self.types

        def claim_answered():
            self.in_claim = False

        self.in_claim = True
        if self.stopping:  # a signal came just before
            self.in_claim = False
            raise Shutdown()
        try:
            status, data = self.api.post(
                "/claim", body, timeout=self.wait + 15, on_answer=claim_answered
            )
        except ApiError as e:
            log.warning("claim_error error=%s", e)
            return None
        except LeaseLost as e:  # no lease to lose here; unexpected
            log.warning("claim_error status=409 reason=%s", e)
            return None
        finally:
            self.in_claim = False
        if status == 200 and isinstance(data, dict) and "job_id" in data:
            return data
        if status == 204:
            log.debug("claim_empty")
            return None
        if status == 401:
            raise Unauthorized(error_text(status, data))
        log.warning("claim_refused status=%s", error_text(status, data))
        return None

    # -- one job

    def handle(self, job):
        job_id = job["job_id"]
        lease = Lease(job["lease"])
        if not isinstance(job.get("results"), dict):
            job["results"] = {}
        stages = list(job.get("stages") or [])
        todo = [s for s in stages if s not in job["results"]]
        log.info(
            "job_claimed job=%s type=%s attempt=%s/%s stages=%s done_before=%s ttl_secs=%s",
            job_id,
            job.get("type"),
            job.get("attempt"),
            job.get("max_attempts"),
            ",".join(stages),
            ",".join(s for s in stages if s in job["results"]) or "-",
            lease.ttl,
        )
        heartbeat = Heartbeat(self, job_id, lease)
        heartbeat.start()
        try:
            if not stages or not todo:
                # No stages of its own, or all were done: the whole job in one go.
                outcome = self.run_stage(job, None, lease) if not stages else ("ok", None)
                self.finish(job, lease, None, outcome)
                return
            for stage in todo:
                if self.stopping:  # the stage before was the last one this worker runs
                    self.give_back(job_id, lease, f"shutting down before stage {stage}")
                    return
                outcome = self.run_stage(job, stage, lease)
                if not self.finish(job, lease, stage, outcome):
                    return
        finally:
            heartbeat.done.set()

    def run_stage(self, job, stage, lease):
        """Runs one handler in a thread; returns ("ok", result), ("fail", exc),
        ("lost", None) or ("grace", None)."""
        fn = find_handler(job["type"], stage)
        if fn is None:
            return ("fail", RuntimeError(f"no handler for {job['type']}/{stage}"))
        ctx = Context(self, job, stage, lease)
        box = {}
        done = threading.Event()

        def target():
            try:
                result = fn(ctx)
                json.dumps(result)  # refuse what the API could not take
                box["result"] = result
            except BaseException as e:  # noqa: B036 - reported, not swallowed
                box["error"] = e
            finally:
                done.set()

        log.info("stage_started job=%s stage=%s", job["job_id"], stage or "-")
        threading.Thread(target=target, name=f"stage-{stage}", daemon=True).start()
        while not done.wait(0.05):
            if lease.lost.is_set():
                return ("lost", None)
            if self.grace_over():
                return ("grace", None)
        if lease.lost.is_set() or isinstance(box.get("error"), LeaseLost):
            return ("lost", None)
        if "error" in box:
            return ("fail", box["error"])
        return ("ok", box.get("result"))

    def finish(self, job, lease, stage, outcome):
        """Reports a stage's outcome; True when the job goes on to its next stage."""
        job_id = job["job_id"]
        kind, value = outcome
        if kind == "lost":
            log.warning("job_dropped job=%s stage=%s reason=lease_lost", job_id, stage or "-")
            return False
        if kind == "grace":
            self.give_back(job_id, lease, f"the grace ran out during stage {stage or '-'}")
            return False
        if kind == "fail":
            retryable = not isinstance(value, PermanentError)
            text = (str(value) or type(value).__name__)[:4000]
            log.warning(
                "stage_failed job=%s stage=%s retryable=%s error=%s",
                job_id,
                stage or "-",
                str(retryable).lower(),
                json.dumps(text),
            )
            if self.report(job_id, lease, "fail", {"error": text, "retryable": retryable}) is not None:
                log.info("attempt_failed job=%s attempt=%s/%s", job_id, job.get("attempt"), job.get("max_attempts"))
            return False
        body = {"result": value}
        if stage:
            body["stage"] = stage
        data = self.report(job_id, lease, "complete", body)
        if data is None:
            return False
        if stage:
            job["results"][stage] = value
        next_stage = data.get("next_stage") if isinstance(data, dict) else None
        if stage and next_stage:
            log.info("stage_completed job=%s stage=%s next=%s", job_id, stage, next_stage)
            return True
        log.info("job_completed job=%s stage=%s", job_id, stage or "-")
        return False

    def give_back(self, job_id, lease, why):
        """Shutting down: the job goes back to its queue, resuming at its
        current stage, without an attempt counted (release)."""
        log.warning("job_released job=%s why=%s", job_id, json.dumps(why))
        if self.report(job_id, lease, "release", {}) == "not_found":
            # A server without /release: fail the attempt as retryable instead.
            self.report(job_id, lease, "fail", {"error": "worker shutting down", "retryable": True})

    def report(self, job_id, lease, what, body):
        """POSTs complete, fail or release, retrying while the lease may still
        be valid; the parsed 200 reply, or None (the job is dropped)."""
        while True:
            try:
                status, data = self.api.post(f"/jobs/{job_id}/{what}", dict(body, lease=lease.token))
            except LeaseLost as e:
                self.lease_lost(job_id, lease, what, e)
                return None
            except ApiError as e:
                if lease.expires_in() <= 0 or lease.lost.is_set():
                    log.error("job_dropped job=%s %s_error=%s (lease expired)", job_id, what, e)
                    return None
                log.warning("%s_error job=%s error=%s (retrying)", what, job_id, e)
                time.sleep(min(max(self.poll_interval, 0.2), 5))
                continue
            if status == 200:
                lease.renewed(None)
                return data if isinstance(data, dict) else {}
            if what == "release" and status in (404, 405):
                return "not_found"
            log.error("%s_refused job=%s status=%s", what, job_id, error_text(status, data))
            if what == "complete" and status in (400, 413):
                # The result was refused: the same handler would give the same.
                self.report(
                    job_id,
                    lease,
                    "fail",
                    {"error": f"result refused: {error_text(status, data)}"[:4000], "retryable": status == 400},
                )
            return None

    def lease_lost(self, job_id, lease, during, exc):
        if not lease.lost.is_set():
            lease.lost.set()
            log.warning("lease_lost job=%s during=%s reason=%s", job_id, during, exc)


# ---------------------------------------------------------------- options


def env(name, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def default_worker_id():
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "worker"
    return f"{host[:80]}-{os.getpid()}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="worker.py",
        description="conveyor remote worker: claims jobs over the HTTP API and runs their stages.",
    )
    p.add_argument("--api-url", default=env("CONVEYOR_API_URL", "http://127.0.0.1:8081"),
                   help="base URL of `conveyor gateway` [$CONVEYOR_API_URL, http://127.0.0.1:8081]")
    p.add_argument("--worker-id", default=env("CONVEYOR_WORKER_ID") or default_worker_id(),
                   help="this process' name, [A-Za-z0-9_.-] [$CONVEYOR_WORKER_ID, HOST-PID]")
    p.add_argument("--task-types", default=env("CONVEYOR_TASK_TYPES", ""),
                   help="comma list of job types to claim [$CONVEYOR_TASK_TYPES, the registry's]")
    p.add_argument("--poll-interval", type=float, default=env("CONVEYOR_POLL_INTERVAL", "1"),
                   help="seconds to sleep after an error or an empty claim [$CONVEYOR_POLL_INTERVAL, 1]")
    p.add_argument("--wait", type=int, default=20,
                   help="long-poll of one claim, 0-30 seconds [20]")
    p.add_argument("--max-runs", type=int, default=env("CONVEYOR_MAX_RUNS", "0"),
                   help="exit after this many jobs, 0 = never [$CONVEYOR_MAX_RUNS, 0]")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds a running job may go on after SIGTERM/SIGINT [10]")
    p.add_argument("--debug", action="store_true",
                   default=env("CONVEYOR_DEBUG", "").lower() in TRUE_WORDS,
                   help="log every request and response (never the token) [$CONVEYOR_DEBUG]")
    p.add_argument("--token", default=env("CONVEYOR_API_TOKEN"),
                   help="bearer token; prefer $CONVEYOR_API_TOKEN (argv is visible to `ps`)")
    opts = p.parse_args(argv)
    opts.task_types = [t.strip() for t in opts.task_types.split(",") if t.strip()] or handled_types()
    if not WORKER_ID_RE.match(opts.worker_id):
        p.error(f"--worker-id {opts.worker_id!r}: 1-100 of A-Z a-z 0-9 _ . -")
    if not 0 <= opts.wait <= 30:
        p.error("--wait: 0 to 30 seconds")
    if opts.poll_interval < 0 or opts.max_runs < 0 or opts.grace < 0:
        p.error("--poll-interval, --max-runs and --grace must not be negative")
    missing = [t for t in opts.task_types if t not in handled_types()]
    if missing:
        p.error(f"--task-types: no handler for {', '.join(missing)}")
    if not opts.api_url.startswith(("http://", "https://")):
        p.error("--api-url must start with http:// or https://")
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.Formatter.converter = time.gmtime
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if opts.debug else logging.INFO,
        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    worker = Worker(opts)
    worker.install_signals()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
