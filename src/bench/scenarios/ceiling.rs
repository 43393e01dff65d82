//! The raw ceiling: BLMOVE, a no-op handler and LREM, without conveyor.

use super::*;

/// One run of the ceiling.
pub struct CeilingRun {
    pub jobs_per_sec: f64,
    pub redis_cpu_us_per_job: Option<f64>,
    /// The consumers' side: this process.
    pub bench_cpu_us_per_job: Option<f64>,
}

/// A minimal Rust loop doing only what a safe fetch needs per job, on the
/// daemon's kind of connection: `concurrency` tasks share one multiplexed
/// [`redis::aio::ConnectionManager`], each moving a job from pending to an
/// active list (`LMOVE`, non-blocking; done on nil) and removing it (`LREM`).
/// The jobs are pushed before the clock starts.
pub async fn ceiling(env: &Env, jobs: u64, concurrency: usize) -> Result<CeilingRun> {
    let space = env.run_space("ceiling")?;
    let broker = Broker::connect(&env.url, &space.prefix).await?;
    let pending = broker.keys().pending(QUEUE);
    let active = broker.keys().active(QUEUE, "bench");
    push_jobs(env.connection().await?, pending.clone(), "noop1", 0..jobs).await?;

    let mut ctl = env.connection().await?;
    let cpu0 = redis_cpu_secs(&mut ctl).await.ok();
    let bench0 = cpu_secs("/proc/self/stat");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut conn = broker.conn();
        let (src, dst) = (pending.clone(), active.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                let job: Option<Vec<u8>> = redis::cmd("LMOVE")
                    .arg(&src)
                    .arg(&dst)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .query_async(&mut conn)
                    .await?;
                let Some(job) = job else {
                    return Ok::<u64, redis::RedisError>(done);
                };
                redis::cmd("LREM")
                    .arg(&dst)
                    .arg(1)
                    .arg(&job)
                    .query_async::<i64>(&mut conn)
                    .await?;
                done += 1;
            }
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        done += result.context("a ceiling task panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    let bench1 = cpu_secs("/proc/self/stat");
    let cpu1 = redis_cpu_secs(&mut ctl).await.ok();
    if done != jobs {
        bail!("ceiling: {done} of {jobs} jobs were taken");
    }
    env.clean(space).await?;
    Ok(CeilingRun {
        jobs_per_sec: jobs as f64 / secs,
        redis_cpu_us_per_job: per_job_us(cpu0, cpu1, jobs),
        bench_cpu_us_per_job: per_job_us(bench0, bench1, jobs),
    })
}
