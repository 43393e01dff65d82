//! Throughput of a workload through real daemons, with the CPU, Redis commands and memory it cost.

use super::*;

/// `jobs` jobs of `job_type` through `daemons` daemons at `concurrency`.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub job_type: &'static str,
    pub jobs: u64,
    pub daemons: usize,
    pub concurrency: usize,
    /// What daemon i serves (`serves[i % len]`); empty: [`QUEUE`], default pool.
    pub serves: &'static [Serves],
}

impl Workload {
    /// The queue its jobs go through: the first daemon's.
    fn queue(&self) -> &'static str {
        self.serves.first().map_or(QUEUE, |s| s.queue)
    }

    /// The pool lists its daemons take from (empty without `--pools`).
    fn pool_lists(&self, keys: &Keys) -> Vec<String> {
        let mut names: Vec<&str> = self
            .serves
            .iter()
            .filter_map(|s| s.pools)
            .flat_map(|p| p.split(','))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|p| keys.pool(self.queue(), p))
            .collect()
    }
}

/// One run of a [`Workload`].
pub struct ThroughputRun {
    pub jobs_per_sec: f64,
    pub completed_in_sqlite: u64,
    pub round_trips_per_job: f64,
    pub events_dropped: u64,
    /// Highest VmHWM of the run's daemons, KiB.
    pub peak_rss_kib: u64,
    pub cpu_us_per_job: Cpu,
    /// Daemon-side calls by command (the bench's own removed).
    pub commands: BTreeMap<String, u64>,
    pub producer_commands: u64,
    /// Jobs handed over to a stage pool: the daemons' `LPUSH` calls
    /// (settle.lua's handover; the producer's LPUSHes are the bench's own,
    /// and nothing is dead-lettered or revived in a bench run).
    pub handovers: u64,
    /// Redis `used_memory` after the queues drained minus before the first
    /// push, per job: with the queues empty, what stays is the job records
    /// (and the daemons' registrations), so this is the cost of a retained
    /// record. `None` when INFO could not be read.
    pub redis_bytes_per_job: Option<f64>,
}

/// CPU microseconds per job.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub daemons: Option<f64>,
    pub redis: Option<f64>,
    pub bench: Option<f64>,
}

/// CPU seconds used so far by the daemons, Redis and the bench.
struct CpuSnapshot {
    daemons: Option<f64>,
    redis: Option<f64>,
    bench: Option<f64>,
}

impl CpuSnapshot {
    async fn take(ctl: &mut MultiplexedConnection, daemons: &[Daemon]) -> Self {
        Self {
            daemons: daemons.iter().map(Daemon::cpu_secs).sum(),
            redis: redis_cpu_secs(ctl).await.ok(),
            bench: cpu_secs("/proc/self/stat"),
        }
    }

    fn per_job(&self, after: &Self, jobs: u64) -> Cpu {
        Cpu {
            daemons: per_job_us(self.daemons, after.daemons, jobs),
            redis: per_job_us(self.redis, after.redis, jobs),
            bench: per_job_us(self.bench, after.bench, jobs),
        }
    }
}

/// The clock starts before the first push (pushing goes on while the
/// daemons work) and stops when pending and every active list are empty.
/// Then SQLite must hold every job as completed: a job leaves its active
/// list only after its commit.
pub async fn throughput(env: &Env, w: &Workload) -> Result<ThroughputRun> {
    let space = env.run_space(w.name)?;
    let mut daemons = start_daemons(env, &space, w.daemons, w.concurrency, w.serves).await?;
    let keys = Keys::new(&space.prefix);
    let queue = w.queue();
    let pending = keys.pending(queue);
    // Active lists, then pool lists: every place a job can wait or run.
    let mut lists: Vec<String> = daemons.iter().map(|d| keys.active(queue, &d.id)).collect();
    lists.extend(w.pool_lists(&keys));
    let mut ctl = env.connection().await?;
    let producer_conn = env.connection().await?;
    let calls_before = command_calls(&mut ctl).await?;
    let memory_before = redis_used_memory(&mut ctl).await.ok();
    let cpu_before = CpuSnapshot::take(&mut ctl, &daemons).await;

    let start = Instant::now();
    let producer = tokio::spawn(push_jobs(
        producer_conn,
        pending.clone(),
        w.job_type,
        0..w.jobs,
    ));
    let polls = wait_drained(&mut ctl, &mut daemons, &pending, &lists, Some(producer)).await?;
    let secs = start.elapsed().as_secs_f64();

    let cpu_after = CpuSnapshot::take(&mut ctl, &daemons).await;
    let calls_after = command_calls(&mut ctl).await?;
    let memory_after = redis_used_memory(&mut ctl).await.ok();
    let peak_rss_kib = daemons
        .iter()
        .filter_map(|d| d.memory())
        .map(|m| m.hwm_kib)
        .max()
        .unwrap_or(0);
    // Counted while the daemons still run: nothing is flushed by a shutdown.
    let completed = completed_in_sqlite(&space.db).await?;
    let shutdowns = stop_daemons(daemons).await?;
    if completed != w.jobs {
        bail!(
            "{}: the queues drained but SQLite holds {completed} of {} jobs as completed (acknowledged before commit?)",
            w.name,
            w.jobs
        );
    }
    let by_daemons: u64 = shutdowns.iter().map(|s| s.completed).sum();
    let round_trips: u64 = shutdowns.iter().map(|s| s.round_trips).sum();
    let bench_calls = [
        ("llen", polls * (1 + lists.len() as u64)),
        ("lpush", w.jobs),
    ];
    let commands = daemon_commands(&calls_before, &calls_after, &bench_calls);
    let handovers = commands.get("lpush").copied().unwrap_or(0);
    let redis_bytes_per_job = match (memory_before, memory_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / w.jobs as f64),
        _ => None,
    };
    env.clean(space).await?;
    Ok(ThroughputRun {
        jobs_per_sec: w.jobs as f64 / secs,
        completed_in_sqlite: completed,
        round_trips_per_job: round_trips as f64 / by_daemons.max(1) as f64,
        events_dropped: shutdowns.iter().map(|s| s.events_dropped).sum(),
        peak_rss_kib,
        cpu_us_per_job: cpu_before.per_job(&cpu_after, w.jobs),
        commands,
        producer_commands: w.jobs,
        handovers,
        redis_bytes_per_job,
    })
}
