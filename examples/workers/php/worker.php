<?php
/**
 * A conveyor remote worker in PHP (CLI, with the curl and json extensions;
 * pcntl for a graceful SIGTERM). The same options, environment, semantics
 * and demo handlers as ../python/worker.py.
 *
 * It takes jobs over the HTTP API of `conveyor gateway` (the OpenAPI
 * document is served at /api/v1/openapi.json) and holds no Redis connection:
 *
 *   claim  POST /api/v1/claim              long-poll for one job and a lease
 *   stage  run the handler of each stage not yet in the job's "results"
 *          (those were finished by an earlier attempt)
 *   renew  PHP has no threads: the lease is renewed by every $ctx->progress()
 *          (POST .../progress), by $ctx->heartbeat() (POST .../heartbeat when
 *          a third of the lease has passed) and around each stage. A handler
 *          must therefore call one of them at least every ttl_secs/3 (the
 *          server's [gateway] lease_secs); the demo stages are far shorter.
 *   done   POST /api/v1/jobs/{id}/complete {"lease", "stage", "result"} after
 *          each stage; the job is completed with its last stage
 *   error  POST /api/v1/jobs/{id}/fail {"lease", "error", "retryable"}:
 *          retryable unless the handler threw PermanentError
 *   stop   POST /api/v1/jobs/{id}/release {"lease"} (see SIGTERM below)
 *
 * A 409 from any call means the lease is gone (it expired, another worker
 * has the job, or the job was cancelled): the job is dropped ($ctx->cancelled
 * turns true, $ctx->progress() throws LeaseLost) and the worker claims the
 * next one.
 *
 * SIGTERM / SIGINT (needs pcntl): no more claims (a waiting claim is
 * abandoned). The running stage goes on until it ends (and is completed as
 * usual) or the grace (--grace, 10 s) runs out. An unfinished job is then
 * given back with POST /api/v1/jobs/{id}/release: it returns to its queue and
 * resumes at its current stage, without an attempt counted. The exit code is
 * 0. The grace is enforced in progress()/heartbeat() and by SIGALRM, which
 * throws GraceExpired into a handler that calls neither. A second signal ends
 * the grace at once. Without pcntl, SIGTERM handling is best-effort: PHP's
 * default action ends the process at once and a running job's lease simply
 * expires (the attempt fails as retryable; the job runs again elsewhere,
 * resuming at its first unfinished stage).
 *
 * Usage:
 *   CONVEYOR_API_TOKEN=... php worker.php --api-url=http://127.0.0.1:8081 \
 *       --worker-id=php-1 --task-types=demo.remote
 *
 * Handlers: $HANDLERS maps a job type to a callable (all its stages) or to an
 * array of stage name => callable. A handler gets a Context and returns the
 * stage's result (any JSON value; an empty object is `new stdClass()`,
 * since PHP's [] encodes as a JSON list).
 *
 * Exit codes: 0 done (--max-runs reached, or stopped by a signal), 1 the API
 * refused the token, 2 bad options or missing extensions.
 */

declare(strict_types=1);

final class PermanentError extends Exception {}   // the job goes to the dead list at once
final class LeaseLost extends Exception {}        // 409: drop the job
final class GraceExpired extends Error {}         // the shutdown grace ran out mid-stage
final class Unauthorized extends Exception {}     // 401 from the API
final class ApiError extends Exception {}         // no answer (network, timeout)

// ------------------------------------------------------------------ handlers

/** Sleeps $secs in short steps; throws LeaseLost once the job was dropped. */
function nap(Context $ctx, float $secs): void
{
    $end = microtime(true) + $secs;
    while (!$ctx->cancelled && microtime(true) < $end) {
        usleep((int) (min(0.05, max(0.0, $end - microtime(true))) * 1e6));
    }
    if ($ctx->cancelled) {
        throw new LeaseLost('job dropped');
    }
}

/** Progress 0, 50, 100 with a nap of payload "sleep" seconds (0.2) in all. */
function demo_step(Context $ctx, string $verb): void
{
    $payload = is_array($ctx->payload) ? $ctx->payload : [];
    $secs = (float) ($payload['sleep'] ?? 0.2);
    $ctx->progress(0, "$verb started");
    nap($ctx, $secs / 2);
    $ctx->progress(50, "$verb half done");
    nap($ctx, $secs / 2);
    $ctx->progress(100, "$verb done");
}

$HANDLERS = [
    'demo.remote' => [
        'fetch' => function (Context $ctx) {
            demo_step($ctx, 'fetch');
            $payload = is_array($ctx->payload) ? $ctx->payload : [];
            return ['n' => $payload['n'] ?? 1];
        },
        'transform' => function (Context $ctx) {
            demo_step($ctx, 'transform');
            // From an earlier attempt (the claim's "results") or this one.
            return ['n' => $ctx->results['fetch']['n'] * 2];
        },
        'upload' => function (Context $ctx) {
            demo_step($ctx, 'upload');
            return ['uploaded' => true, 'n' => $ctx->results['transform']['n'], 'by' => $ctx->workerId];
        },
    ],
    'fail.always' => function (Context $ctx) {
        throw new RuntimeException("fail.always fails on purpose (attempt {$ctx->attempt})");
    },
    'fail.permanent' => function (Context $ctx) {
        throw new PermanentError('fail.permanent fails for good');
    },
];

function find_handler(array $handlers, string $type, ?string $stage): ?callable
{
    $h = $handlers[$type] ?? null;
    if ($h instanceof Closure || (is_callable($h) && !is_array($h))) {
        return $h;
    }
    if (is_array($h) && $stage !== null && isset($h[$stage]) && is_callable($h[$stage])) {
        return $h[$stage];
    }
    return is_callable($h) ? $h : null;
}

// ------------------------------------------------------------------ logging

$DEBUG = false;

function logline(string $level, string $msg): void
{
    $t = microtime(true);
    $ts = gmdate('Y-m-d\TH:i:s', (int) $t) . sprintf('.%03dZ', (int) (($t - floor($t)) * 1000));
    fwrite(STDERR, "$ts $level $msg\n");
}

/** At most $bytes bytes of $s (so at most that many characters; a split
 *  UTF-8 sequence at the end becomes U+FFFD when encoded). */
function cut(string $s, int $bytes): string
{
    return strlen($s) <= $bytes ? $s : substr($s, 0, $bytes);
}

function jenc($v): string
{
    return json_encode($v, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION
        | JSON_INVALID_UTF8_SUBSTITUTE);
}

// ------------------------------------------------------------------ HTTP

final class Api
{
    public string $base;

    /** @param ?string $token sent as a bearer token, never logged */
    public function __construct(string $url, private ?string $token, private bool $debug)
    {
        $base = rtrim($url, '/');
        if (str_ends_with($base, '/api/v1')) {
            $base = substr($base, 0, -strlen('/api/v1'));
        }
        $this->base = $base;
    }

    /**
     * POSTs JSON; returns [status, decoded body or null]. Throws LeaseLost on
     * 409 and ApiError when nothing answers. With $abort, a callable polled
     * while waiting: when it returns true the request is abandoned (null).
     */
    public function post(string $path, array $body, float $timeout = 30.0, ?callable $abort = null): ?array
    {
        $data = json_encode($body, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE
            | JSON_PRESERVE_ZERO_FRACTION | JSON_INVALID_UTF8_SUBSTITUTE | JSON_THROW_ON_ERROR);
        $headers = ['Content-Type: application/json', 'Accept: application/json', 'Expect:'];
        if ($this->token !== null && $this->token !== '') {
            $headers[] = 'Authorization: Bearer ' . $this->token;
        }
        if ($this->debug) {
            logline('DEBUG', "http_request POST /api/v1$path $data");
        }
        $ch = curl_init($this->base . '/api/v1' . $path);
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            CURLOPT_POSTFIELDS => $data,
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CONNECTTIMEOUT => 10,
            CURLOPT_TIMEOUT_MS => (int) ($timeout * 1000),
            CURLOPT_USERAGENT => 'conveyor-worker-php/1',
        ]);
        // curl_multi, so that a signal (a stop flag) can end the wait.
        $mh = curl_multi_init();
        curl_multi_add_handle($mh, $ch);
        $result = CURLE_OK;
        try {
            do {
                $mrc = curl_multi_exec($mh, $running);
                if ($running) {
                    if ($abort !== null && $abort()) {
                        return null;
                    }
                    curl_multi_select($mh, 0.2);
                }
            } while ($running && $mrc === CURLM_OK);
            while (($info = curl_multi_info_read($mh)) !== false) {
                if ($info['handle'] === $ch) {
                    $result = $info['result'];
                }
            }
            if ($mrc !== CURLM_OK || $result !== CURLE_OK) {
                $why = $result !== CURLE_OK ? curl_strerror($result) : curl_multi_strerror($mrc);
                throw new ApiError("POST /api/v1$path: $why");
            }
            $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
            $raw = (string) curl_multi_getcontent($ch);
        } finally {
            curl_multi_remove_handle($mh, $ch);
            curl_close($ch);
            curl_multi_close($mh);
        }
        if ($this->debug) {
            logline('DEBUG', "http_response $status /api/v1$path " . substr($raw, 0, 2000));
        }
        $parsed = trim($raw) === '' ? null : json_decode($raw, true);
        if ($status === 409) {
            throw new LeaseLost(is_array($parsed) ? (string) ($parsed['reason'] ?? 'conflict') : 'conflict');
        }
        return [$status, $parsed];
    }
}

function error_text(int $status, $parsed): string
{
    if (is_array($parsed) && isset($parsed['error'])) {
        return trim("$status " . ($parsed['reason'] ?? '') . ' ' . $parsed['error']);
    }
    return (string) $status;
}

// ------------------------------------------------------------------ job state

final class Lease
{
    public string $token;
    public int $ttl;
    public float $renewedAt;
    public bool $lost = false;

    public function __construct(array $l)
    {
        $this->token = (string) $l['token'];
        $this->ttl = max(1, (int) ($l['ttl_secs'] ?? 1));
        $this->renewedAt = microtime(true);
    }

    public function renewed($l): void
    {
        if (is_array($l) && isset($l['token'])) {
            $this->token = (string) $l['token'];
            $this->ttl = max(1, (int) ($l['ttl_secs'] ?? $this->ttl));
        }
        $this->renewedAt = microtime(true);
    }

    public function expiresIn(): float
    {
        return $this->renewedAt + $this->ttl - microtime(true);
    }
}

/** What a handler gets: the job, its stage, progress(), heartbeat(), cancelled. */
final class Context
{
    public bool $cancelled = false;
    public string $jobId;
    public $payload;
    public int $attempt;
    public string $workerId;
    /** Results of the finished stages: earlier attempts' and this one's. */
    public array $results;

    public function __construct(private Worker $worker, public array $job, public ?string $stage, private Lease $lease)
    {
        $this->jobId = (string) $job['job_id'];
        $this->payload = $job['payload'] ?? null;
        $this->attempt = (int) ($job['attempt'] ?? 1);
        $this->workerId = $worker->workerId;
        $this->results = $job['results'];
        $this->cancelled = $lease->lost;
    }

    /** Publishes progress of this stage (0-100) and renews the lease. Throws
     *  LeaseLost when the lease is gone, GraceExpired when the shutdown grace
     *  is over; other errors are logged (false). */
    public function progress(float $percent, ?string $message = null): bool
    {
        $this->checkAlive();
        $body = ['lease' => $this->lease->token, 'progress' => min(100.0, max(0.0, $percent))];
        if ($this->stage !== null) {
            $body['stage'] = $this->stage;
        }
        if ($message !== null && $message !== '') {
            $body['message'] = cut($message, 1000);
        }
        return $this->call('progress', $body);
    }

    /** Renews the lease when a third of it has passed (cheap to call often). */
    public function heartbeat(): bool
    {
        $this->checkAlive();
        if (microtime(true) - $this->lease->renewedAt < $this->lease->ttl / 3) {
            return true;
        }
        return $this->call('heartbeat', ['lease' => $this->lease->token]);
    }

    private function checkAlive(): void
    {
        $this->cancelled = $this->cancelled || $this->lease->lost;
        if ($this->cancelled) {
            throw new LeaseLost('job dropped');
        }
        if ($this->worker->graceOver()) {
            throw new GraceExpired('worker shutting down');
        }
    }

    private function call(string $what, array $body): bool
    {
        try {
            [$status, $data] = $this->worker->api->post("/jobs/{$this->jobId}/$what", $body);
        } catch (LeaseLost $e) {
            $this->cancelled = true;
            $this->worker->leaseLost($this->jobId, $this->lease, $what, $e);
            throw $e;
        } catch (ApiError $e) {
            logline('WARN', "{$what}_error job={$this->jobId} error={$e->getMessage()}");
            return false;
        }
        if ($status !== 200) {
            logline('WARN', "{$what}_refused job={$this->jobId} status=" . error_text($status, $data));
            return false;
        }
        $this->lease->renewed($data);
        return true;
    }
}

// ------------------------------------------------------------------ worker

final class Worker
{
    public Api $api;
    public string $workerId;
    public bool $stopping = false;
    private ?float $deadline = null;
    private bool $inStage = false;
    private int $runs = 0;

    public function __construct(private array $handlers, array $o)
    {
        $this->api = new Api($o['api_url'], $o['token'], $o['debug']);
        $this->workerId = $o['worker_id'];
        $this->types = $o['task_types'];
        $this->pollInterval = $o['poll_interval'];
        $this->wait = $o['wait'];
        $this->maxRuns = $o['max_runs'];
        $this->grace = $o['grace'];
    }

    private array $types;
    private float $pollInterval;
    private int $wait;
    private int $maxRuns;
    private float $grace;

    // -- signals

    public function installSignals(): void
    {
        if (!function_exists('pcntl_async_signals')) {
            logline('WARN', 'no_pcntl: SIGTERM/SIGINT end the worker at once (no grace)');
            return;
        }
        pcntl_async_signals(true);
        pcntl_signal(SIGTERM, [$this, 'onSignal']);
        pcntl_signal(SIGINT, [$this, 'onSignal']);
        pcntl_signal(SIGALRM, [$this, 'onAlarm']);
    }

    public function onSignal(int $signo): void
    {
        $name = $signo === SIGTERM ? 'SIGTERM' : 'SIGINT';
        if ($this->stopping) {
            $this->deadline = microtime(true);
            logline('INFO', "shutdown_now signal=$name");
            if ($this->inStage) {
                throw new GraceExpired('worker shutting down');
            }
            return;
        }
        $this->stopping = true;
        $this->deadline = microtime(true) + $this->grace;
        logline('INFO', "shutdown_requested signal=$name grace_secs={$this->grace}");
        // Cuts a handler that calls neither progress() nor heartbeat().
        pcntl_alarm(max(1, (int) ceil($this->grace)));
    }

    public function onAlarm(int $signo): void
    {
        if ($this->inStage && $this->graceOver()) {
            throw new GraceExpired('worker shutting down');
        }
        if ($this->stopping && !$this->graceOver()) {
            pcntl_alarm(1);
        }
    }

    public function graceOver(): bool
    {
        return $this->stopping && microtime(true) >= $this->deadline;
    }

    // -- main loop

    public function run(): int
    {
        logline('INFO', "worker_started worker={$this->workerId} api={$this->api->base} types="
            . (implode(',', $this->types) ?: '*') . " wait_secs={$this->wait}");
        while (!$this->stopping) {
            try {
                $job = $this->claim();
            } catch (Unauthorized $e) {
                logline('ERROR', "unauthorized error={$e->getMessage()} (check --token / CONVEYOR_API_TOKEN)");
                return 1;
            }
            if ($job === null) {
                if (!$this->stopping) {
                    $this->sleep($this->pollInterval);
                }
                continue;
            }
            $this->handle($job);
            $this->runs++;
            if ($this->maxRuns > 0 && $this->runs >= $this->maxRuns) {
                logline('INFO', "max_runs_reached runs={$this->runs}");
                break;
            }
        }
        logline('INFO', "worker_stopped worker={$this->workerId} runs={$this->runs}");
        return 0;
    }

    private function sleep(float $secs): void
    {
        $end = microtime(true) + $secs;
        while (!$this->stopping && microtime(true) < $end) {
            usleep((int) (min(0.1, max(0.0, $end - microtime(true))) * 1e6));
        }
    }

    /** One long-poll: the claimed job, or null (no job, an error, or a stop). */
    private function claim(): ?array
    {
        $body = ['worker_id' => $this->workerId, 'wait_secs' => $this->wait];
        if ($this->types) {
            $body['types'] = $this->types;
        }
        try {
            $r = $this->api->post('/claim', $body, $this->wait + 15, fn () => $this->stopping);
        } catch (ApiError $e) {
            logline('WARN', "claim_error error={$e->getMessage()}");
            return null;
        } catch (LeaseLost $e) {
            logline('WARN', "claim_error status=409 reason={$e->getMessage()}");
            return null;
        }
        if ($r === null) {
            return null; // abandoned: stopping
        }
        [$status, $data] = $r;
        if ($status === 200 && is_array($data) && isset($data['job_id'])) {
            return $data;
        }
        if ($status === 204) {
            return null;
        }
        if ($status === 401) {
            throw new Unauthorized(error_text($status, $data));
        }
        logline('WARN', 'claim_refused status=' . error_text($status, $data));
        return null;
    }

    // -- one job

    private function handle(array $job): void
    {
        $jobId = (string) $job['job_id'];
        $lease = new Lease($job['lease']);
        if (!is_array($job['results'] ?? null)) {
            $job['results'] = [];
        }
        $stages = array_values($job['stages'] ?? []);
        $done = array_values(array_filter($stages, fn ($s) => array_key_exists($s, $job['results'])));
        $todo = array_values(array_filter($stages, fn ($s) => !array_key_exists($s, $job['results'])));
        logline('INFO', "job_claimed job=$jobId type={$job['type']} attempt={$job['attempt']}/{$job['max_attempts']} "
            . 'stages=' . implode(',', $stages) . ' done_before=' . (implode(',', $done) ?: '-')
            . " ttl_secs={$lease->ttl}");
        if (!$stages) {
            // No stages of its own: the whole job in one go.
            $this->finish($job, $lease, null, $this->runStage($job, null, $lease));
            return;
        }
        if (!$todo) {
            $this->finish($job, $lease, null, ['ok', null]);
            return;
        }
        foreach ($todo as $stage) {
            if ($this->stopping) { // the stage before was the last one this worker runs
                $this->giveBack($jobId, $lease, "shutting down before stage $stage");
                return;
            }
            if (!$this->renewIfDue($jobId, $lease)) {
                return;
            }
            if (!$this->finish($job, $lease, $stage, $this->runStage($job, $stage, $lease))) {
                return;
            }
        }
    }

    /** @return array ['ok', result] | ['fail', Throwable] | ['lost', null] | ['grace', null] */
    private function runStage(array $job, ?string $stage, Lease $lease): array
    {
        $fn = find_handler($this->handlers, (string) $job['type'], $stage);
        if ($fn === null) {
            return ['fail', new RuntimeException("no handler for {$job['type']}/" . ($stage ?? '-'))];
        }
        $ctx = new Context($this, $job, $stage, $lease);
        logline('INFO', "stage_started job={$job['job_id']} stage=" . ($stage ?? '-'));
        $this->inStage = true;
        try {
            $result = $fn($ctx);
            $this->inStage = false;
            json_encode($result, JSON_THROW_ON_ERROR | JSON_PRESERVE_ZERO_FRACTION);
        } catch (LeaseLost $e) {
            return ['lost', null];
        } catch (GraceExpired $e) {
            return ['grace', null];
        } catch (Throwable $e) {
            return ['fail', $e];
        } finally {
            $this->inStage = false;
        }
        if ($lease->lost || $ctx->cancelled) {
            return ['lost', null];
        }
        return ['ok', $result];
    }

    /** Reports a stage's outcome; true when the job goes on to its next stage. */
    private function finish(array &$job, Lease $lease, ?string $stage, array $outcome): bool
    {
        $jobId = (string) $job['job_id'];
        [$kind, $value] = $outcome;
        $st = $stage ?? '-';
        if ($kind === 'lost') {
            logline('WARN', "job_dropped job=$jobId stage=$st reason=lease_lost");
            return false;
        }
        if ($kind === 'grace') {
            $this->giveBack($jobId, $lease, "the grace ran out during stage $st");
            return false;
        }
        if ($kind === 'fail') {
            $retryable = !($value instanceof PermanentError);
            $text = cut($value->getMessage() !== '' ? $value->getMessage() : get_class($value), 4000);
            logline('WARN', "stage_failed job=$jobId stage=$st retryable=" . ($retryable ? 'true' : 'false')
                . ' error=' . jenc($text));
            if (is_array($this->report($jobId, $lease, 'fail', ['error' => $text, 'retryable' => $retryable]))) {
                logline('INFO', "attempt_failed job=$jobId attempt={$job['attempt']}/{$job['max_attempts']}");
            }
            return false;
        }
        $body = ['result' => $value];
        if ($stage !== null) {
            $body['stage'] = $stage;
        }
        $data = $this->report($jobId, $lease, 'complete', $body);
        if (!is_array($data)) {
            return false;
        }
        if ($stage !== null) {
            $job['results'][$stage] = $value;
        }
        $next = $data['next_stage'] ?? null;
        if ($stage !== null && $next !== null) {
            logline('INFO', "stage_completed job=$jobId stage=$stage next=$next");
            return true;
        }
        logline('INFO', "job_completed job=$jobId stage=$st");
        return false;
    }

    /** A heartbeat when a third of the lease has passed; false when it is lost. */
    private function renewIfDue(string $jobId, Lease $lease): bool
    {
        if (microtime(true) - $lease->renewedAt < $lease->ttl / 3) {
            return true;
        }
        try {
            [$status, $data] = $this->api->post("/jobs/$jobId/heartbeat", ['lease' => $lease->token]);
        } catch (LeaseLost $e) {
            $this->leaseLost($jobId, $lease, 'heartbeat', $e);
            logline('WARN', "job_dropped job=$jobId reason=lease_lost");
            return false;
        } catch (ApiError $e) {
            logline('WARN', "heartbeat_error job=$jobId error={$e->getMessage()}");
            return true;
        }
        if ($status === 200) {
            $lease->renewed($data);
        } else {
            logline('WARN', "heartbeat_refused job=$jobId status=" . error_text($status, $data));
        }
        return true;
    }

    /** Shutting down: the job goes back to its queue, resuming at its current
     *  stage, without an attempt counted (release). */
    private function giveBack(string $jobId, Lease $lease, string $why): void
    {
        logline('WARN', "job_released job=$jobId why=" . jenc($why));
        if ($this->report($jobId, $lease, 'release', []) === false) {
            // A server without /release: fail the attempt as retryable instead.
            $this->report($jobId, $lease, 'fail', ['error' => 'worker shutting down', 'retryable' => true]);
        }
    }

    /** POSTs complete, fail or release, retrying while the lease may still be
     *  valid; the decoded 200 reply, null (the job is dropped) or false (no
     *  such endpoint). */
    private function report(string $jobId, Lease $lease, string $what, array $body): array|false|null
    {
        while (true) {
            try {
                [$status, $data] = $this->api->post("/jobs/$jobId/$what", ['lease' => $lease->token] + $body);
            } catch (LeaseLost $e) {
                $this->leaseLost($jobId, $lease, $what, $e);
                return null;
            } catch (ApiError $e) {
                if ($lease->expiresIn() <= 0) {
                    logline('ERROR', "job_dropped job=$jobId {$what}_error={$e->getMessage()} (lease expired)");
                    return null;
                }
                logline('WARN', "{$what}_error job=$jobId error={$e->getMessage()} (retrying)");
                usleep((int) (min(max($this->pollInterval, 0.2), 5.0) * 1e6));
                continue;
            }
            if ($status === 200) {
                $lease->renewed(null);
                return is_array($data) ? $data : [];
            }
            if ($what === 'release' && ($status === 404 || $status === 405)) {
                return false;
            }
            logline('ERROR', "{$what}_refused job=$jobId status=" . error_text($status, $data));
            if ($what === 'complete' && ($status === 400 || $status === 413)) {
                // The result was refused: the same handler would give the same.
                $this->report($jobId, $lease, 'fail', [
                    'error' => cut('result refused: ' . error_text($status, $data), 4000),
                    'retryable' => $status === 400,
                ]);
            }
            return null;
        }
    }

    public function leaseLost(string $jobId, Lease $lease, string $during, Throwable $e): void
    {
        if (!$lease->lost) {
            $lease->lost = true;
            logline('WARN', "lease_lost job=$jobId during=$during reason={$e->getMessage()}");
        }
    }
}

// ------------------------------------------------------------------ options

function envv(string $name, ?string $default = null): ?string
{
    $v = getenv($name);
    return ($v === false || $v === '') ? $default : $v;
}

function usage(int $code, string $error = ''): never
{
    if ($error !== '') {
        fwrite(STDERR, "worker.php: error: $error (see --help)\n");
        exit($code);
    }
    fwrite($code === 0 ? STDOUT : STDERR, <<<TXT
usage: php worker.php [--api-url=URL] [--worker-id=ID] [--task-types=T1,T2]
                      [--poll-interval=SECS] [--wait=SECS] [--max-runs=N]
                      [--grace=SECS] [--debug] [--token=TOKEN]

  --api-url        base URL of `conveyor gateway` [\$CONVEYOR_API_URL, http://127.0.0.1:8081]
  --worker-id      this process' name, [A-Za-z0-9_.-] [\$CONVEYOR_WORKER_ID, HOST-PID]
  --task-types     comma list of job types to claim [\$CONVEYOR_TASK_TYPES, the registry's]
  --poll-interval  seconds to sleep after an error or an empty claim [\$CONVEYOR_POLL_INTERVAL, 1]
  --wait           long-poll of one claim, 0-30 seconds [20]
  --max-runs       exit after this many jobs, 0 = never [\$CONVEYOR_MAX_RUNS, 0]
  --grace          seconds a running job may go on after SIGTERM/SIGINT [10]
  --debug          log every request and response (never the token) [\$CONVEYOR_DEBUG]
  --token          bearer token; prefer \$CONVEYOR_API_TOKEN (argv is visible to `ps`)

TXT);
    exit($code);
}

function number_opt(string $name, ?string $v, bool $int): float|int
{
    if ($v === null || !is_numeric($v) || ($int && (string) (int) $v !== trim($v)) || (float) $v < 0) {
        usage(2, "--$name: a " . ($int ? 'whole ' : '') . "number >= 0 expected, got " . var_export($v, true));
    }
    return $int ? (int) $v : (float) $v;
}

function parse_options(array $handlers): array
{
    $long = ['api-url:', 'worker-id:', 'task-types:', 'poll-interval:', 'wait:', 'max-runs:', 'grace:',
        'debug', 'token:', 'help'];
    // getopt() skips what it does not know: refuse unknown names first.
    $argv = $GLOBALS['argv'];
    for ($i = 1; $i < count($argv); $i++) {
        if (!preg_match('/^--([a-z-]+)(=.*)?$/s', $argv[$i], $m) && $argv[$i] !== '-h') {
            usage(2, "unexpected argument '{$argv[$i]}'");
        }
        if ($argv[$i] === '-h') {
            continue;
        }
        if (in_array($m[1] . ':', $long, true)) {
            $i += isset($m[2]) ? 0 : 1; // --name VALUE
        } elseif (!in_array($m[1], $long, true) || isset($m[2])) {
            usage(2, "unknown option '{$argv[$i]}'");
        }
    }
    $rest = 0;
    $o = getopt('h', $long, $rest);
    if ($o === false || $rest < count($argv)) {
        usage(2, 'unknown or malformed argument: ' . implode(' ', array_slice($GLOBALS['argv'], $rest)));
    }
    if (isset($o['h']) || isset($o['help'])) {
        usage(0);
    }
    foreach ($o as $k => $v) {
        if (is_array($v)) {
            $o[$k] = end($v); // given twice: the last one wins
        }
    }
    $host = preg_replace('/[^A-Za-z0-9_.-]/', '-', (string) gethostname()) ?: 'worker';
    $known = array_keys($handlers);
    $types = array_values(array_filter(array_map('trim',
        explode(',', (string) ($o['task-types'] ?? envv('CONVEYOR_TASK_TYPES', ''))))));
    $opts = [
        'api_url' => (string) ($o['api-url'] ?? envv('CONVEYOR_API_URL', 'http://127.0.0.1:8081')),
        'worker_id' => (string) ($o['worker-id'] ?? envv('CONVEYOR_WORKER_ID', substr($host, 0, 80) . '-' . getmypid())),
        'task_types' => $types ?: $known,
        'poll_interval' => (float) number_opt('poll-interval', $o['poll-interval'] ?? envv('CONVEYOR_POLL_INTERVAL', '1'), false),
        'wait' => (int) number_opt('wait', $o['wait'] ?? '20', true),
        'max_runs' => (int) number_opt('max-runs', $o['max-runs'] ?? envv('CONVEYOR_MAX_RUNS', '0'), true),
        'grace' => (float) number_opt('grace', $o['grace'] ?? '10', false),
        'debug' => isset($o['debug']) || in_array(strtolower((string) envv('CONVEYOR_DEBUG', '')), ['1', 'true', 'yes', 'on'], true),
        'token' => isset($o['token']) ? (string) $o['token'] : envv('CONVEYOR_API_TOKEN'),
    ];
    if (!preg_match('/^[A-Za-z0-9_.-]{1,100}$/', $opts['worker_id'])) {
        usage(2, "--worker-id '{$opts['worker_id']}': 1-100 of A-Z a-z 0-9 _ . -");
    }
    if ($opts['wait'] > 30) {
        usage(2, '--wait: 0 to 30 seconds');
    }
    $missing = array_diff($opts['task_types'], $known);
    if ($missing) {
        usage(2, '--task-types: no handler for ' . implode(', ', $missing));
    }
    if (!preg_match('#^https?://#', $opts['api_url'])) {
        usage(2, '--api-url must start with http:// or https://');
    }
    return $opts;
}

// ------------------------------------------------------------------ main

if (PHP_SAPI !== 'cli') {
    exit(2);
}
foreach (['curl', 'json'] as $ext) {
    if (!extension_loaded($ext)) {
        fwrite(STDERR, "worker.php: needs the PHP $ext extension (e.g. apt-get install php-$ext)\n");
        exit(2);
    }
}
$opts = parse_options($HANDLERS);
$DEBUG = $opts['debug'];
$worker = new Worker($HANDLERS, $opts);
$worker->installSignals();
exit($worker->run());
