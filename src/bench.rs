//! `conveyor bench`: throughput, latency, memory and Redis cost of the
//! daemon on this machine, against the raw Redis path measured in the same
//! session.
//!
//! The bench starts a private `redis-server` (unless `--redis-url` is
//! given), writes a config with four job types (`noop1`, `noop4`,
//! `exec1`, and `noop4ab` with its stages in pools a and b on a queue of
//! its own), and runs daemons as child processes of this same binary, each
//! run on a fresh key prefix and SQLite file. Scenarios run in rounds: each
//! round runs every selected scenario once, so a "ratio to the ceiling"
//! compares runs made minutes apart at most. See docs/benchmarks.md for what
//! each figure means and what bounds it.
//!
//! Layout: [`infra`] (guards for the work dir, Redis and daemons; /proc and
//! INFO readers), [`scenarios`] (one function per measurement), [`report`]
//! (the JSON object and the table).

pub mod infra;
pub mod report;
pub mod scenarios;

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use infra::{Env, Machine, POOLS_QUEUE, Serves};
use report::{
    Ceiling, CpuPerJob, Growth, Latency, MemoryReport, MemorySample, Params, Percentiles,
    RedisCost, Report, Stat, Throughput,
};
use scenarios::{CeilingRun, LatencyRun, ThroughputRun, Workload};

/// Concurrency of the ceiling's consumers (and of the daemons it is compared to).
const CEILING_CONCURRENCY: usize = 64;
/// Arrival rates of the latency scenario, jobs/s.
const LATENCY_RATES: [u32; 2] = [1000, 500];

/// What `conveyor bench --scenarios` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    Ceiling,
    Noop,
    Pipeline,
    Latency,
    Memory,
    Redis,
    /// noop4 on 2 daemons in one pool against noop4ab (stages in pools
    /// a, b, a, b) on 2 daemons, one per pool.
    Pools,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::Noop => "noop",
            Scenario::Pipeline => "pipeline",
            Scenario::Latency => "latency",
            Scenario::Memory => "memory",
            Scenario::Redis => "redis",
            Scenario::Pools => "pools",
        }
    }
}

/// `conveyor bench`. It writes its own config, SQLite files and key
/// prefixes: `--config`, `--db`, `--prefix` and `CONVEYOR_REDIS_URL` are
/// not used; `--redis-url` on the command line is.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs per throughput run [default: 100000; 10000 with --quick]
    #[arg(long)]
    pub jobs: Option<u64>,
    /// Runs of each scenario; the median is reported [default: 3; 1 with --quick]
    #[arg(long)]
    pub runs: Option<u32>,
    /// Shorter: 1 run, 10000 jobs, 2 s per latency rate, memory over 100000 jobs
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
    /// Run the daemons with the job records off (`[history] retention_secs =
    /// 0`), to compare with the default (records on)
    #[arg(long)]
    pub no_records: bool,
    /// Scenarios, comma-separated [default: all]
    #[arg(long, value_delimiter = ',', value_enum)]
    pub scenarios: Option<Vec<Scenario>>,
}

/// The bench's parameters, defaults applied.
#[derive(Debug, Clone)]
pub struct Options {
    /// `Some`: run against this Redis (unique prefix, keys deleted after).
    pub redis_url: Option<String>,
    pub jobs: u64,
    pub runs: u32,
    pub quick: bool,
    pub json: bool,
    /// Job records in Redis (`[history]`) on, as by default.
    pub records: bool,
    pub scenarios: Vec<Scenario>,
    pub latency_secs: u64,
    pub memory_small: u64,
    pub memory_large: u64,
}

impl Options {
    pub fn from_args(args: &BenchArgs, redis_url: Option<String>) -> Result<Self, String> {
        let quick = args.quick;
        let jobs = args.jobs.unwrap_or(if quick { 10_000 } else { 100_000 });
        if jobs < 100 {
            return Err("--jobs must be at least 100".into());
        }
        let runs = args.runs.unwrap_or(if quick { 1 } else { 3 });
        if !(1..=100).contains(&runs) {
            return Err("--runs must be between 1 and 100".into());
        }
        let mut scenarios = args
            .scenarios
            .clone()
            .unwrap_or_else(|| Scenario::value_variants().to_vec());
        scenarios.sort_unstable();
        scenarios.dedup();
        Ok(Self {
            redis_url,
            jobs,
            runs,
            quick,
            json: args.json,
            records: !args.no_records,
            scenarios,
            latency_secs: if quick { 2 } else { 5 },
            memory_small: 10_000,
            memory_large: if quick { 100_000 } else { 1_000_000 },
        })
    }

    fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    fn noop_workloads(&self) -> Vec<Workload> {
        let n = self.jobs;
        let w = |name, jobs, daemons, concurrency| Workload {
            name,
            job_type: "noop1",
            jobs,
            daemons,
            concurrency,
            serves: &[],
        };
        if self.has(Scenario::Noop) {
            vec![
                // Concurrency 1 is slow: a tenth of the jobs.
                w("c1", (n / 10).max(100), 1, 1),
                w("c16", n, 1, 16),
                w("c64", n, 1, 64),
                w("2x64", n, 2, 64),
                w("4x64", n, 4, 64),
            ]
        } else if self.has(Scenario::Redis) || self.has(Scenario::Memory) {
            // Their figures come from the one-daemon c=64 noop run.
            vec![w("c64", n, 1, 64)]
        } else {
            Vec::new()
        }
    }

    fn pipeline_workloads(&self) -> Vec<Workload> {
        if !self.has(Scenario::Pipeline) {
            return Vec::new();
        }
        vec![
            Workload {
                name: "noop4",
                job_type: "noop4",
                jobs: self.jobs,
                daemons: 1,
                concurrency: 64,
                serves: &[],
            },
            Workload {
                name: "exec1",
                job_type: "exec1",
                jobs: (self.jobs / 20).max(100),
                daemons: 1,
                concurrency: 64,
                serves: &[],
            },
        ]
    }

    /// The same four noop stages on two daemons: in one pool (no handover,
    /// the fetch of a fleet without pools), then alternating pools a and b
    /// with one daemon per pool (a handover after each stage but the last).
    fn pools_workloads(&self) -> Vec<Workload> {
        const AB: &[Serves] = &[
            Serves {
                queue: POOLS_QUEUE,
                pools: Some("a"),
            },
            Serves {
                queue: POOLS_QUEUE,
                pools: Some("b"),
            },
        ];
        if !self.has(Scenario::Pools) {
            return Vec::new();
        }
        vec![
            Workload {
                name: "noop4-1pool-2x64",
                job_type: "noop4",
                jobs: self.jobs,
                daemons: 2,
                concurrency: 64,
                serves: &[],
            },
            Workload {
                name: "noop4ab-2pools-2x64",
                job_type: "noop4ab",
                jobs: self.jobs,
                daemons: 2,
                concurrency: 64,
                serves: AB,
            },
        ]
    }
}

/// Runs the bench and prints its report. Ctrl-C or SIGTERM stops it: the
/// bench's future is dropped, and with it every process it started.
pub async fn run(options: Options) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let report = tokio::select! {
        report = measure(&options) => report?,
        _ = int.recv() => bail!("interrupted; every process the bench started is stopped"),
        _ = term.recv() => bail!("terminated; every process the bench started is stopped"),
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Everything measured, run by run.
#[derive(Default)]
struct Runs {
    ceiling: Vec<CeilingRun>,
    /// By workload name, in round order.
    throughput: BTreeMap<&'static str, Vec<ThroughputRun>>,
    latency: Vec<Vec<LatencyRun>>,
    growth: Option<scenarios::GrowthRun>,
}

fn say(line: impl AsRef<str>) {
    eprintln!("conveyor bench: {}", line.as_ref());
}

async fn measure(o: &Options) -> Result<Report> {
    let env = Env::start(o.redis_url.as_deref(), o.records).await?;
    let machine = Machine::probe(&env).await?;
    say(format!(
        "{} CPUs ({}), redis {} ({}), {} build; {} jobs, {} run(s), scenarios {}",
        machine.nproc,
        machine.cpu_model,
        machine.redis_version,
        machine.redis,
        machine.build,
        o.jobs,
        o.runs,
        o.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(",")
    ));
    let workloads: Vec<Workload> = o
        .noop_workloads()
        .into_iter()
        .chain(o.pipeline_workloads())
        .chain(o.pools_workloads())
        .collect();
    let mut runs = Runs::default();
    for round in 1..=o.runs {
        let tag = format!("run {round}/{}", o.runs);
        if o.has(Scenario::Ceiling) {
            let r = scenarios::ceiling(&env, o.jobs, CEILING_CONCURRENCY).await?;
            say(format!(
                "{tag} ceiling c={CEILING_CONCURRENCY}: {:.0} jobs/s",
                r.jobs_per_sec
            ));
            runs.ceiling.push(r);
        }
        for w in &workloads {
            let r = scenarios::throughput(&env, w).await?;
            say(format!(
                "{tag} {} {} daemon(s) c={} ({} jobs): {:.0} jobs/s, {:.2} round trips/job, {:.2} handovers/job, Redis {} B/job after drain",
                w.name,
                w.daemons,
                w.concurrency,
                w.jobs,
                r.jobs_per_sec,
                r.round_trips_per_job,
                r.handovers as f64 / w.jobs as f64,
                r.redis_bytes_per_job
                    .map_or_else(|| "-".to_owned(), |b| format!("{b:.0}"))
            ));
            runs.throughput.entry(w.name).or_default().push(r);
        }
        if o.has(Scenario::Latency) {
            let r = scenarios::latency(&env, &LATENCY_RATES, o.latency_secs).await?;
            for l in &r {
                say(format!(
                    "{tag} latency {} jobs/s: start p50 {:.3} p99 {:.3} ms, done p99 {:.3} ms",
                    l.rate, l.to_start.p50, l.to_start.p99, l.to_done.p99
                ));
            }
            runs.latency.push(r);
        }
    }
    if o.has(Scenario::Memory) {
        say(format!(
            "memory: RSS of one daemon over {} jobs (one run)",
            o.memory_large
        ));
        let growth = scenarios::memory_growth(&env, o.memory_small, o.memory_large, |jobs, kib| {
            say(format!(
                "memory: after {jobs} jobs VmRSS {:.1} MiB",
                kib as f64 / 1024.0
            ))
        })
        .await?;
        runs.growth = Some(growth);
    }
    let mut report = build_report(o, machine, &workloads, &runs);
    report.check_targets();
    Ok(report)
}

fn stat(values: impl IntoIterator<Item = f64>) -> Stat {
    let v: Vec<f64> = values.into_iter().collect();
    Stat::of(&v).unwrap_or(Stat {
        median: 0.0,
        min: 0.0,
        max: 0.0,
        runs: Vec::new(),
    })
}

fn opt_stat(values: impl IntoIterator<Item = Option<f64>>) -> Option<Stat> {
    let v: Option<Vec<f64>> = values.into_iter().collect();
    Stat::of(&v?)
}

fn build_report(o: &Options, machine: Machine, workloads: &[Workload], runs: &Runs) -> Report {
    let ceiling = (!runs.ceiling.is_empty()).then(|| Ceiling {
        jobs: o.jobs,
        concurrency: CEILING_CONCURRENCY,
        jobs_per_sec: stat(runs.ceiling.iter().map(|c| c.jobs_per_sec)),
        redis_cpu_us_per_job: opt_stat(runs.ceiling.iter().map(|c| c.redis_cpu_us_per_job)),
        bench_cpu_us_per_job: opt_stat(runs.ceiling.iter().map(|c| c.bench_cpu_us_per_job)),
    });
    let throughput = |w: &Workload| -> Option<Throughput> {
        let rs = runs.throughput.get(w.name)?;
        let ratio = (rs.len() == runs.ceiling.len()).then(|| {
            stat(
                rs.iter()
                    .zip(&runs.ceiling)
                    .map(|(r, c)| r.jobs_per_sec / c.jobs_per_sec),
            )
        });
        Some(Throughput {
            name: w.name.into(),
            job_type: w.job_type.into(),
            daemons: w.daemons,
            concurrency: w.concurrency,
            jobs: w.jobs,
            jobs_per_sec: stat(rs.iter().map(|r| r.jobs_per_sec)),
            ratio_to_ceiling: ratio,
            round_trips_per_job: stat(rs.iter().map(|r| r.round_trips_per_job)),
            cpu_us_per_job: CpuPerJob {
                daemons: opt_stat(rs.iter().map(|r| r.cpu_us_per_job.daemons)),
                redis: opt_stat(rs.iter().map(|r| r.cpu_us_per_job.redis)),
                bench: opt_stat(rs.iter().map(|r| r.cpu_us_per_job.bench)),
            },
            completed_in_sqlite: rs.iter().map(|r| r.completed_in_sqlite).collect(),
            progress_events_dropped: rs.iter().map(|r| r.events_dropped).sum(),
            handovers_per_job: stat(rs.iter().map(|r| r.handovers as f64 / w.jobs as f64)),
            redis_bytes_per_job: opt_stat(rs.iter().map(|r| r.redis_bytes_per_job)),
        })
    };
    let (noop, pipeline): (Vec<&Workload>, Vec<&Workload>) =
        workloads.iter().partition(|w| w.job_type == "noop1");
    let noop: Vec<Throughput> = if o.has(Scenario::Noop) {
        noop.into_iter().filter_map(throughput).collect()
    } else {
        Vec::new()
    };
    let pipeline: Vec<Throughput> = pipeline.into_iter().filter_map(throughput).collect();
    let c64 = runs.throughput.get("c64");

    let memory = o.has(Scenario::Memory).then(|| MemoryReport {
        peak_rss_mib_c64: c64.map(|rs| stat(rs.iter().map(|r| r.peak_rss_kib as f64 / 1024.0))),
        growth: runs.growth.as_ref().map(|g| growth_report(o, g)),
    });
    let redis = if o.has(Scenario::Redis) {
        c64.map(|rs| redis_cost(o.jobs, rs))
    } else {
        None
    };
    Report {
        schema: 1,
        machine,
        params: Params {
            jobs: o.jobs,
            runs: o.runs,
            quick: o.quick,
            records: o.records,
            scenarios: o.scenarios.iter().map(|s| s.name().to_owned()).collect(),
            ceiling_concurrency: CEILING_CONCURRENCY,
            latency_secs: o.latency_secs,
            latency_rates_per_sec: LATENCY_RATES.to_vec(),
            memory_small_jobs: o.memory_small,
            memory_large_jobs: o.memory_large,
        },
        ceiling,
        noop,
        pipeline,
        latency: latency_report(o, &runs.latency),
        memory,
        redis,
        targets: Vec::new(),
    }
}

fn latency_report(o: &Options, rounds: &[Vec<LatencyRun>]) -> Vec<Latency> {
    LATENCY_RATES
        .iter()
        .map(|&rate| {
            let rs: Vec<&LatencyRun> = rounds
                .iter()
                .filter_map(|round| round.iter().find(|l| l.rate == rate))
                .collect();
            let pick = |f: &dyn Fn(&LatencyRun) -> f64| stat(rs.iter().map(|r| f(r)));
            Latency {
                rate_per_sec: rate,
                secs: o.latency_secs,
                pushed: rs.iter().map(|r| r.pushed).collect(),
                missed_started: rs.iter().map(|r| r.missed_started).sum(),
                missed_completed: rs.iter().map(|r| r.missed_completed).sum(),
                enqueue_to_start_ms: Percentiles {
                    p50: pick(&|r| r.to_start.p50),
                    p99: pick(&|r| r.to_start.p99),
                    max: pick(&|r| r.to_start.max),
                },
                enqueue_to_done_ms: Percentiles {
                    p50: pick(&|r| r.to_done.p50),
                    p99: pick(&|r| r.to_done.p99),
                    max: pick(&|r| r.to_done.max),
                },
                commands_per_job: per_job_by_command(
                    rs.iter().map(|r| (&r.commands, r.pushed.max(1))),
                ),
                commands_per_job_total: pick(&|r| {
                    r.commands.values().sum::<u64>() as f64 / r.pushed.max(1) as f64
                }),
                note: "times run from just before the producer's LPUSH to the subscriber \
                       receiving the job's message, so they include the publish path: an upper bound"
                    .into(),
            }
        })
        .filter(|l| !l.pushed.is_empty())
        .collect()
}

fn growth_report(o: &Options, g: &scenarios::GrowthRun) -> Growth {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let at = |jobs: u64| {
        g.samples
            .iter()
            .find(|(n, _)| *n == jobs)
            .map(|(_, kib)| *kib)
            .unwrap_or(0)
    };
    let (small, large) = (at(o.memory_small), at(o.memory_large));
    Growth {
        small_jobs: o.memory_small,
        large_jobs: o.memory_large,
        rss_mib_small: mib(small),
        rss_mib_large: mib(large),
        growth_pct: if small > 0 {
            (large as f64 - small as f64) * 100.0 / small as f64
        } else {
            0.0
        },
        peak_rss_mib: mib(g.peak_kib),
        samples: g
            .samples
            .iter()
            .map(|&(jobs, kib)| MemorySample {
                jobs,
                rss_mib: mib(kib),
            })
            .collect(),
        secs: g.secs,
    }
}

/// Calls per job by command, the median over runs of each; `runs` yields
/// each run's calls and its job count.
fn per_job_by_command<'a>(
    runs: impl Iterator<Item = (&'a BTreeMap<String, u64>, u64)> + Clone,
) -> BTreeMap<String, f64> {
    let names: std::collections::BTreeSet<&String> =
        runs.clone().flat_map(|(calls, _)| calls.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let per_run = runs
                .clone()
                .map(|(calls, jobs)| calls.get(name).copied().unwrap_or(0) as f64 / jobs as f64);
            (name.clone(), stat(per_run).median)
        })
        .collect()
}

fn redis_cost(jobs: u64, rs: &[ThroughputRun]) -> RedisCost {
    RedisCost {
        jobs,
        round_trips_per_job: stat(rs.iter().map(|r| r.round_trips_per_job)),
        commands_per_job: per_job_by_command(rs.iter().map(|r| (&r.commands, jobs))),
        commands_per_job_total: stat(
            rs.iter()
                .map(|r| r.commands.values().sum::<u64>() as f64 / jobs as f64),
        ),
        producer_commands_per_job: stat(
            rs.iter().map(|r| r.producer_commands as f64 / jobs as f64),
        )
        .median,
    }
}
