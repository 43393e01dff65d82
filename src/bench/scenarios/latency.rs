//! Enqueue-to-start latency at fixed rates, heard on the progress channels.

use super::*;

/// Percentiles of one latency measurement, ms.
#[derive(Debug, Clone, Copy)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&ms, 0.50),
            p99: percentile(&ms, 0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// One rate of one latency run.
pub struct LatencyRun {
    pub rate: u32,
    pub pushed: u64,
    pub missed_started: u64,
    pub missed_completed: u64,
    pub to_start: Quantiles,
    pub to_done: Quantiles,
    /// Daemon-side calls by command while this rate ran.
    pub commands: BTreeMap<String, u64>,
}

/// One idle daemon at concurrency 64; for each rate, a producer pushes one
/// job per tick of a fixed-rate interval for `secs`, recording when it
/// pushed each job; a subscriber records when `job_started` and
/// `job_completed` arrive.
pub async fn latency(env: &Env, rates: &[u32], secs: u64) -> Result<Vec<LatencyRun>> {
    let space = env.run_space("latency")?;
    let mut daemons = start_daemons(env, &space, 1, 64, &[]).await?;
    let keys = Keys::new(&space.prefix);
    let pending = keys.pending(QUEUE);
    let subscriber = Subscriber::start(env.url.clone(), keys.progress_pattern()).await?;
    let mut ctl = env.connection().await?;
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut ctl)
        .await?;
    if patterns < 1 {
        bail!("latency: the progress subscription is not registered");
    }
    // Idle: its fetch loop is blocked in BLMOVE.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut producer = env.connection().await?;
    let mut out = Vec::new();
    let mut total = 0;
    for &rate in rates {
        let calls_before = command_calls(&mut ctl).await?;
        let pushes = produce_at_rate(&mut producer, &pending, rate, secs).await?;
        total += pushes.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while subscriber.completed_of(&pushes) < pushes.len() && Instant::now() < deadline {
            daemons[0].check_alive()?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls_after = command_calls(&mut ctl).await?;
        let mut run = subscriber.measure(rate, &pushes);
        run.commands = daemon_commands(
            &calls_before,
            &calls_after,
            &[("lpush", pushes.len() as u64)],
        );
        out.push(run);
        // Idle again before the next rate.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    subscriber.stop()?;
    let completed = completed_in_sqlite(&space.db).await?;
    stop_daemons(daemons).await?;
    if completed != total {
        bail!("latency: SQLite holds {completed} of {total} pushed jobs as completed");
    }
    env.clean(space).await?;
    Ok(out)
}

/// Pushes one job per tick for `secs`; a late tick is skipped rather than
/// made up with a burst. Returns each job id with the instant it was pushed.
async fn produce_at_rate(
    conn: &mut MultiplexedConnection,
    pending: &str,
    rate: u32,
    secs: u64,
) -> Result<Vec<(String, Instant)>> {
    let period = Duration::from_nanos(1_000_000_000 / u64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut pushes = Vec::with_capacity((u64::from(rate) * secs) as usize);
    loop {
        tick.tick().await;
        let at = Instant::now();
        if at >= end {
            return Ok(pushes);
        }
        let id = format!("r{rate}-{}", pushes.len());
        redis::cmd("LPUSH")
            .arg(pending)
            .arg(job_body("noop1", &id))
            .query_async::<i64>(conn)
            .await
            .context("latency: push failed")?;
        pushes.push((id, at));
    }
}

/// When the first `job_started` / `job_completed` of each job arrived.
#[derive(Default)]
struct Seen {
    started: HashMap<String, Instant>,
    completed: HashMap<String, Instant>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct EventHead {
    job_id: String,
    event: String,
}

/// A progress subscriber on its own connection and its own thread, so that
/// the receive instant is taken as soon as the message is read.
struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Returns once the server confirmed the subscription.
    async fn start(url: String, pattern: String) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (sink, stopped) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || subscribe(&url, &pattern, sink, stopped, ready_tx))?;
        let mut subscriber = Self {
            seen,
            stop,
            thread: Some(thread),
        };
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(e))) => Err(anyhow!("latency: cannot subscribe: {e}")),
            _ => {
                subscriber.stop.store(true, Ordering::Relaxed);
                subscriber.thread.take();
                Err(anyhow!("latency: the subscriber did not start"))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn completed_of(&self, pushes: &[(String, Instant)]) -> usize {
        let seen = self.lock();
        pushes
            .iter()
            .filter(|(id, _)| seen.completed.contains_key(id))
            .count()
    }

    fn measure(&self, rate: u32, pushes: &[(String, Instant)]) -> LatencyRun {
        let seen = self.lock();
        let since = |map: &HashMap<String, Instant>| -> Vec<f64> {
            pushes
                .iter()
                .filter_map(|(id, at)| map.get(id).map(|t| t.duration_since(*at)))
                // Microsecond precision.
                .map(|d| d.as_micros() as f64 / 1000.0)
                .collect()
        };
        let (to_start, to_done) = (since(&seen.started), since(&seen.completed));
        LatencyRun {
            rate,
            pushed: pushes.len() as u64,
            missed_started: (pushes.len() - to_start.len()) as u64,
            missed_completed: (pushes.len() - to_done.len()) as u64,
            to_start: Quantiles::of(to_start),
            to_done: Quantiles::of(to_done),
            commands: BTreeMap::new(),
        }
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.lock().error.take() {
            Some(e) => Err(anyhow!("latency: subscriber failed: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The subscriber thread: reads messages until `stop` (checked every 100 ms).
fn subscribe(
    url: &str,
    pattern: &str,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let setup = || -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(url)?;
        client.get_connection_with_timeout(Duration::from_secs(5))
    };
    let mut conn = match setup() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let mut pubsub = conn.as_pubsub();
    // Returns once the server confirmed it.
    if let Err(e) = pubsub
        .psubscribe(pattern)
        .and_then(|()| pubsub.set_read_timeout(Some(Duration::from_millis(100))))
    {
        let _ = ready.send(Err(e.to_string()));
        return;
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match pubsub.get_message() {
            Ok(msg) => {
                let at = Instant::now();
                let Ok(head) = serde_json::from_slice::<EventHead>(msg.get_payload_bytes()) else {
                    continue;
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let map = match head.event.as_str() {
                    "job_started" => &mut seen.started,
                    "job_completed" => &mut seen.completed,
                    _ => continue,
                };
                map.entry(head.job_id).or_insert(at);
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => {
                if !stop.load(Ordering::Relaxed) {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e.to_string());
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let q = Quantiles::of((1..=1000).rev().map(|v| v as f64 / 10.0).collect());
        assert_eq!((q.p50, q.p99, q.max), (50.0, 99.0, 100.0));
    }
}
