//! The daemon's RSS as jobs accumulate.

use super::*;

/// VmRSS of a daemon after each checkpoint.
pub struct GrowthRun {
    /// (jobs done, VmRSS KiB).
    pub samples: Vec<(u64, u64)>,
    pub peak_kib: u64,
    pub secs: f64,
}

/// One daemon at concurrency 64 runs `large` jobs, pushed in chunks while
/// it works (at most 20,000 waiting); its VmRSS is read each
/// time the queue is drained at a checkpoint (`small` first, `large` last).
pub async fn memory_growth(
    env: &Env,
    small: u64,
    large: u64,
    report: impl Fn(u64, u64),
) -> Result<GrowthRun> {
    let space = env.run_space("memory")?;
    let mut daemons = start_daemons(env, &space, 1, 64, &[]).await?;
    let keys = Keys::new(&space.prefix);
    let pending = keys.pending(QUEUE);
    let actives = [keys.active(QUEUE, &daemons[0].id)];
    let mut ctl = env.connection().await?;
    let producer = env.connection().await?;
    let mut checkpoints = vec![small, large / 10, large / 4, large / 2, large];
    checkpoints.retain(|&c| c >= small && c <= large);
    checkpoints.sort_unstable();
    checkpoints.dedup();

    let start = Instant::now();
    let mut pushed = 0;
    let mut samples = Vec::new();
    for checkpoint in checkpoints {
        while pushed < checkpoint {
            daemons[0].check_alive()?;
            let waiting: u64 = redis::cmd("LLEN")
                .arg(&pending)
                .query_async(&mut ctl)
                .await?;
            if waiting > MEMORY_BACKLOG {
                tokio::time::sleep(POLL).await;
                continue;
            }
            let end = (pushed + 10 * CHUNK).min(checkpoint);
            push_jobs(producer.clone(), pending.clone(), "noop1", pushed..end).await?;
            pushed = end;
        }
        wait_drained(&mut ctl, &mut daemons, &pending, &actives, None).await?;
        let rss = daemons[0]
            .memory()
            .ok_or_else(|| anyhow!("memory: cannot read /proc/<pid>/status"))?
            .rss_kib;
        report(checkpoint, rss);
        samples.push((checkpoint, rss));
    }
    let secs = start.elapsed().as_secs_f64();
    let peak_kib = daemons[0].memory().map(|m| m.hwm_kib).unwrap_or(0);
    let completed = completed_in_sqlite(&space.db).await?;
    stop_daemons(daemons).await?;
    if completed != large {
        bail!("memory: SQLite holds {completed} of {large} jobs as completed");
    }
    env.clean(space).await?;
    Ok(GrowthRun {
        samples,
        peak_kib,
        secs,
    })
}
