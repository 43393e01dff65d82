//! The bench's figures: one JSON object (`--json`, field names stable) and
//! the readable table rendered from it.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::infra::Machine;

/// One figure measured in several runs.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Each run's value, in run order.
    pub runs: Vec<f64>,
}

impl Stat {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if !n.is_multiple_of(2) {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: values.to_vec(),
        })
    }
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Every figure of one bench session.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Version of this JSON layout.
    pub schema: u32,
    pub machine: Machine,
    pub params: Params,
    pub ceiling: Option<Ceiling>,
    pub noop: Vec<Throughput>,
    pub pipeline: Vec<Throughput>,
    pub latency: Vec<Latency>,
    pub memory: Option<MemoryReport>,
    pub redis: Option<RedisCost>,
    pub targets: Vec<TargetCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub jobs: u64,
    pub runs: u32,
    pub quick: bool,
    /// Job records in Redis on (`--no-records`: off).
    pub records: bool,
    pub scenarios: Vec<String>,
    pub ceiling_concurrency: usize,
    pub latency_secs: u64,
    pub latency_rates_per_sec: Vec<u32>,
    pub memory_small_jobs: u64,
    pub memory_large_jobs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub jobs: u64,
    pub concurrency: usize,
    pub jobs_per_sec: Stat,
    pub redis_cpu_us_per_job: Option<Stat>,
    /// The consumers' CPU (the bench process).
    pub bench_cpu_us_per_job: Option<Stat>,
}

/// CPU time per job, microseconds, of each process involved.
#[derive(Debug, Clone, Serialize)]
pub struct CpuPerJob {
    pub daemons: Option<Stat>,
    pub redis: Option<Stat>,
    /// The bench process itself (producer and poller).
    pub bench: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Stable name: `c1`, `c16`, `c64`, `2x64`, `4x64`, `noop4`, `exec1`,
    /// `noop4-1pool-2x64`, `noop4ab-2pools-2x64`.
    pub name: String,
    pub job_type: String,
    pub daemons: usize,
    pub concurrency: usize,
    pub jobs: u64,
    pub jobs_per_sec: Stat,
    /// jobs/s over the ceiling's jobs/s of the same round.
    pub ratio_to_ceiling: Option<Stat>,
    /// The daemons' `redis_round_trips / completed`.
    pub round_trips_per_job: Stat,
    pub cpu_us_per_job: CpuPerJob,
    /// Jobs `completed` in SQLite after each run (always `jobs`, or the
    /// bench fails).
    pub completed_in_sqlite: Vec<u64>,
    pub progress_events_dropped: u64,
    /// Jobs handed over to a stage pool, per job (the daemons' `LPUSH` calls).
    pub handovers_per_job: Stat,
    /// Redis `used_memory` after the drain minus before the run, per job:
    /// the retained job records (≈ 0 with `--no-records`).
    pub redis_bytes_per_job: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: Stat,
    pub p99: Stat,
    pub max: Stat,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub rate_per_sec: u32,
    pub secs: u64,
    /// Jobs pushed in each run (ticks that came too late are skipped).
    pub pushed: Vec<u64>,
    /// Jobs whose `job_started` / `job_completed` message was not received
    /// (pub/sub is at-most-once).
    pub missed_started: u64,
    pub missed_completed: u64,
    pub enqueue_to_start_ms: Percentiles,
    pub enqueue_to_done_ms: Percentiles,
    /// Daemon-side Redis commands per job at this rate (median over runs),
    /// from `INFO commandstats`; Lua-internal commands included.
    pub commands_per_job: BTreeMap<String, f64>,
    pub commands_per_job_total: Stat,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// VmHWM of one daemon at concurrency 64 after the noop run.
    pub peak_rss_mib_c64: Option<Stat>,
    pub growth: Option<Growth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    pub small_jobs: u64,
    pub large_jobs: u64,
    pub rss_mib_small: f64,
    pub rss_mib_large: f64,
    pub growth_pct: f64,
    pub peak_rss_mib: f64,
    /// VmRSS after each checkpoint, for the shape of the curve.
    pub samples: Vec<MemorySample>,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemorySample {
    pub jobs: u64,
    pub rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisCost {
    /// From the noop run with one daemon at concurrency 64.
    pub jobs: u64,
    pub round_trips_per_job: Stat,
    /// Daemon-side commands per job by command (median over runs), from
    /// `INFO commandstats`; commands run inside Lua scripts are counted too.
    pub commands_per_job: BTreeMap<String, f64>,
    pub commands_per_job_total: Stat,
    /// The producer's LPUSHes per job (1: one push per job).
    pub producer_commands_per_job: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub figure: String,
    pub target: String,
    pub value: String,
    pub met: bool,
}

// ------------------------------------------------------------ targets

impl Report {
    /// The targets of the issue, checked against the medians.
    pub fn check_targets(&mut self) {
        let mut checks = Vec::new();
        if let Some(c64) = self.noop.iter().find(|t| t.name == "c64") {
            let v = c64.jobs_per_sec.median;
            checks.push(TargetCheck {
                figure: "noop jobs/s, 1 daemon c=64".into(),
                target: ">= 40,000".into(),
                value: thousands(v),
                met: v >= 40_000.0,
            });
            if let Some(r) = &c64.ratio_to_ceiling {
                checks.push(TargetCheck {
                    figure: "noop / ceiling, 1 daemon c=64".into(),
                    target: ">= 50 %".into(),
                    value: format!("{:.1} %", r.median * 100.0),
                    met: r.median >= 0.5,
                });
            }
        }
        if let Some(l) = self.latency.iter().find(|l| l.rate_per_sec == 500) {
            let v = l.enqueue_to_start_ms.p99.median;
            checks.push(TargetCheck {
                figure: "enqueue->start p99 at 500 jobs/s".into(),
                target: "< 1 ms".into(),
                value: format!("{v:.3} ms"),
                met: v < 1.0,
            });
        }
        if let Some(m) = &self.memory {
            if let Some(peak) = &m.peak_rss_mib_c64 {
                let mb = peak.median * 1.048_576;
                checks.push(TargetCheck {
                    figure: "peak RSS, 1 daemon c=64".into(),
                    target: "< 20 MB".into(),
                    value: format!("{mb:.1} MB"),
                    met: mb < 20.0,
                });
            }
            if let Some(g) = &m.growth {
                checks.push(TargetCheck {
                    figure: format!("RSS growth {} -> {} jobs", g.small_jobs, g.large_jobs),
                    target: "flat (<= 5 %)".into(),
                    value: format!("{:+.1} %", g.growth_pct),
                    met: g.growth_pct <= 5.0,
                });
            }
        }
        if let Some(r) = &self.redis {
            let v = r.round_trips_per_job.median;
            checks.push(TargetCheck {
                figure: "Redis round trips per job".into(),
                target: "<= 4".into(),
                value: format!("{v:.2}"),
                met: v <= 4.0,
            });
        }
        self.targets = checks;
    }
}

// ------------------------------------------------------------ table

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `median (min-max)` with `f` applied to each.
fn spread(s: &Stat, f: impl Fn(f64) -> String) -> String {
    if s.runs.len() <= 1 {
        f(s.median)
    } else {
        format!("{} ({}-{})", f(s.median), f(s.min), f(s.max))
    }
}

fn pct(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn us(v: f64) -> String {
    format!("{v:.1}")
}

fn opt(s: &Option<Stat>, f: impl Fn(f64) -> String) -> String {
    s.as_ref()
        .map(|s| f(s.median))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    pub fn table(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let p = &self.params;
        let _ = writeln!(o, "conveyor bench");
        let _ = writeln!(
            o,
            "machine  {} CPUs, {}; redis {} ({}); conveyor {} ({} build)",
            m.nproc, m.cpu_model, m.redis_version, m.redis, m.conveyor_version, m.build
        );
        let _ = writeln!(
            o,
            "params   {} jobs per throughput run, {} run(s) (median, min-max); scenarios {}; job records {}",
            p.jobs,
            p.runs,
            p.scenarios.join(","),
            if p.records { "on" } else { "off" }
        );
        if m.build == "debug" {
            let _ = writeln!(
                o,
                "WARNING  debug build: figures are not representative (cargo build --release)"
            );
        }
        self.throughput_table(&mut o);
        self.latency_table(&mut o);
        self.memory_table(&mut o);
        self.redis_table(&mut o);
        if !self.targets.is_empty() {
            let _ = writeln!(o, "\nTARGETS (issue 4, medians)");
            for t in &self.targets {
                let _ = writeln!(
                    o,
                    "  {:<44} {:>14}  target {:<14} {}",
                    t.figure,
                    t.value,
                    t.target,
                    if t.met { "met" } else { "NOT MET" }
                );
            }
        }
        o
    }

    fn throughput_table(&self, o: &mut String) {
        if self.ceiling.is_none() && self.noop.is_empty() && self.pipeline.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\nTHROUGHPUT                            jobs     jobs/s                        vs ceiling  rt/job  CPU us/job daemon/redis/bench  handovers/job  Redis B/job"
        );
        if let Some(c) = &self.ceiling {
            let _ = writeln!(
                o,
                "  {:<34} {:>7}  {:<29} {:>10}  {:>6}  -/{}/{}",
                format!("ceiling LMOVE+LREM c={}", c.concurrency),
                c.jobs,
                spread(&c.jobs_per_sec, thousands),
                "100.0 %",
                "2.00",
                opt(&c.redis_cpu_us_per_job, us),
                opt(&c.bench_cpu_us_per_job, us),
            );
        }
        for t in self.noop.iter().chain(&self.pipeline) {
            let label = format!(
                "{} {} daemon{} c={}",
                t.job_type,
                t.daemons,
                if t.daemons == 1 { "" } else { "s" },
                t.concurrency
            );
            let cpu = format!(
                "{}/{}/{}",
                opt(&t.cpu_us_per_job.daemons, us),
                opt(&t.cpu_us_per_job.redis, us),
                opt(&t.cpu_us_per_job.bench, us),
            );
            let _ = writeln!(
                o,
                "  {:<34} {:>7}  {:<29} {:>10}  {:>6}  {:<30} {:>13.2}  {:>11}",
                label,
                t.jobs,
                spread(&t.jobs_per_sec, thousands),
                t.ratio_to_ceiling
                    .as_ref()
                    .map(|r| pct(r.median))
                    .unwrap_or_else(|| "-".into()),
                format!("{:.2}", t.round_trips_per_job.median),
                cpu,
                t.handovers_per_job.median,
                t.redis_bytes_per_job
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.0}", b.median)),
            );
        }
    }

    fn latency_table(&self, o: &mut String) {
        if self.latency.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\nLATENCY, ms (1 idle daemon c=64)  pushed  enqueue->start p50 / p99 / max     enqueue->done p50 / p99 / max"
        );
        for l in &self.latency {
            let s = &l.enqueue_to_start_ms;
            let d = &l.enqueue_to_done_ms;
            let pushed: u64 = l.pushed.iter().sum::<u64>() / l.pushed.len().max(1) as u64;
            let _ = writeln!(
                o,
                "  {:<31} {:>6}  {:>8} / {:>8} / {:>8}         {:>8} / {:>8} / {:>8}",
                format!("{} jobs/s for {} s", l.rate_per_sec, l.secs),
                pushed,
                ms(s.p50.median),
                ms(s.p99.median),
                ms(s.max.median),
                ms(d.p50.median),
                ms(d.p99.median),
                ms(d.max.median),
            );
            let by: Vec<String> = l
                .commands_per_job
                .iter()
                .filter(|(_, v)| **v >= 0.05)
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect();
            let _ = writeln!(
                o,
                "    Redis commands per job {:.1}: {}",
                l.commands_per_job_total.median,
                by.join(", ")
            );
            if l.missed_started + l.missed_completed > 0 {
                let _ = writeln!(
                    o,
                    "  (messages not received: {} job_started, {} job_completed)",
                    l.missed_started, l.missed_completed
                );
            }
        }
        if let Some(l) = self.latency.first() {
            let _ = writeln!(o, "  note: {}", l.note);
        }
    }

    fn memory_table(&self, o: &mut String) {
        let Some(m) = &self.memory else { return };
        let _ = writeln!(o, "\nMEMORY");
        if let Some(peak) = &m.peak_rss_mib_c64 {
            let _ = writeln!(
                o,
                "  peak RSS (VmHWM), 1 daemon c=64 noop     {} MiB",
                spread(peak, |v| format!("{v:.1}"))
            );
        }
        if let Some(g) = &m.growth {
            let _ = writeln!(
                o,
                "  RSS after {} jobs {:.1} MiB, after {} jobs {:.1} MiB: growth {:+.1} % (peak {:.1} MiB, {:.0} s)",
                g.small_jobs,
                g.rss_mib_small,
                g.large_jobs,
                g.rss_mib_large,
                g.growth_pct,
                g.peak_rss_mib,
                g.secs
            );
            let curve: Vec<String> = g
                .samples
                .iter()
                .map(|s| format!("{}: {:.1}", s.jobs, s.rss_mib))
                .collect();
            let _ = writeln!(o, "  RSS MiB by jobs done: {}", curve.join(", "));
        }
    }

    fn redis_table(&self, o: &mut String) {
        let Some(r) = &self.redis else { return };
        let _ = writeln!(
            o,
            "\nREDIS COST (noop, 1 daemon c=64, {} jobs per run)",
            r.jobs
        );
        let _ = writeln!(
            o,
            "  round trips per job (daemon's counter)   {}",
            spread(&r.round_trips_per_job, |v| format!("{v:.2}"))
        );
        let _ = writeln!(
            o,
            "  commands per job (INFO commandstats)     {}  (+ {:.2} LPUSH by the producer)",
            spread(&r.commands_per_job_total, |v| format!("{v:.2}")),
            r.producer_commands_per_job
        );
        let by: Vec<String> = r
            .commands_per_job
            .iter()
            .filter(|(_, v)| **v >= 0.005)
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        let _ = writeln!(o, "    by command: {}", by.join(", "));
        let _ = writeln!(
            o,
            "    (commands run inside Lua scripts count too, besides the EVALSHA)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.runs, [3.0, 1.0, 2.0]);
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
