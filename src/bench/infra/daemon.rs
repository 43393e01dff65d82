//! The daemons of a run: `conveyor worker` child processes, started
//! ready, stopped with SIGTERM and read back from their logs.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::{DAEMON_LOG_FILTER, Env, Memory, POOLS_QUEUE, QUEUE, RunSpace, cpu_secs};

/// A `conveyor worker` child process, SIGKILLed on drop unless stopped.
pub struct Daemon {
    child: Child,
    pub id: String,
    log: PathBuf,
    exited: bool,
}

/// The figures of a daemon's `worker_shutdown_complete` line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shutdown {
    pub completed: u64,
    pub round_trips: u64,
    pub events_dropped: u64,
}

/// What one daemon of a run serves.
#[derive(Debug, Clone, Copy)]
pub struct Serves {
    pub queue: &'static str,
    /// `--pools` (comma-separated); `None`: the config's default pool.
    pub pools: Option<&'static str>,
}

impl Serves {
    /// [`QUEUE`], default pool: what every scenario but the pools one runs.
    pub const DEFAULT: Serves = Serves {
        queue: QUEUE,
        pools: None,
    };
}

impl Daemon {
    /// Starts `conveyor worker` for one run; see [`Daemon::wait_ready`].
    pub fn spawn(
        env: &Env,
        space: &RunSpace,
        id: &str,
        concurrency: usize,
        serves: Serves,
    ) -> Result<Self> {
        let log = space.dir.join(format!("{id}.log"));
        let file = File::create(&log).context("cannot create a daemon log file")?;
        let mut cmd = Command::new(&env.exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CONVEYOR_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("worker")
            .arg("--config")
            .arg(if serves.queue == POOLS_QUEUE {
                &env.pools_config
            } else {
                &env.config
            })
            // In the environment, not argv: `ps` shows argv to every user.
            .env("CONVEYOR_REDIS_URL", &env.url)
            .args(["--prefix", &space.prefix])
            .arg("--db")
            .arg(&space.db)
            .args(["--worker-id", id])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--queues", serves.queue])
            .env("CONVEYOR_LOG_FORMAT", "json")
            .env("RUST_LOG", DAEMON_LOG_FILTER)
            .current_dir(&space.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        if let Some(pools) = serves.pools {
            cmd.args(["--pools", pools]);
        }
        let child = cmd.spawn().context("cannot start `conveyor worker`")?;
        Ok(Self {
            child,
            id: id.to_owned(),
            log,
            exited: false,
        })
    }

    /// Waits until the daemon logs `worker_started` (it is then registered
    /// and its fetch loop starts).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains("\"worker_started\"") {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "daemon {} did not start within {timeout:?}; log:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error (with the end of its log) if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            bail!(
                "daemon {} exited unexpectedly ({status}); log:\n{}",
                self.id,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// `VmHWM` / `VmRSS` in KiB, while it runs.
    pub fn memory(&self) -> Option<Memory> {
        Memory::of(self.pid())
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        cpu_secs(&format!("/proc/{}/stat", self.pid()))
    }

    fn terminate(&self) {
        if !self.exited {
            // SAFETY: a signal to our own child, not yet reaped.
            unsafe {
                libc::kill(self.pid() as i32, libc::SIGTERM);
            }
        }
    }

    async fn wait_exit(&mut self, timeout: Duration) -> Result<Shutdown> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = true;
                if !status.success() {
                    bail!(
                        "daemon {} exited with {status}; log:\n{}",
                        self.id,
                        self.log_tail()
                    );
                }
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "daemon {} did not stop within {timeout:?} of SIGTERM; log:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown_line().ok_or_else(|| {
            anyhow!(
                "daemon {} logged no worker_shutdown_complete; log:\n{}",
                self.id,
                self.log_tail()
            )
        })
    }

    fn shutdown_line(&self) -> Option<Shutdown> {
        let text = self.log_text();
        let line = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == "worker_shutdown_complete")?;
        let n = |field: &str| line[field].as_u64();
        Some(Shutdown {
            completed: n("completed")?,
            round_trips: n("redis_round_trips")?,
            events_dropped: n("progress_events_dropped").unwrap_or(0),
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `count` daemons `b1..bN` and waits until all are ready. Daemon
/// `i` serves `serves[(i - 1) % len]` ([`Serves::DEFAULT`] when empty).
pub async fn start_daemons(
    env: &Env,
    space: &RunSpace,
    count: usize,
    concurrency: usize,
    serves: &[Serves],
) -> Result<Vec<Daemon>> {
    let mut daemons = Vec::with_capacity(count);
    for i in 1..=count {
        let s = match serves {
            [] => Serves::DEFAULT,
            _ => serves[(i - 1) % serves.len()],
        };
        daemons.push(Daemon::spawn(env, space, &format!("b{i}"), concurrency, s)?);
    }
    for d in &mut daemons {
        d.wait_ready(Duration::from_secs(30)).await?;
    }
    Ok(daemons)
}

/// SIGTERMs every daemon at once, then waits for each; returns their
/// shutdown figures.
pub async fn stop_daemons(daemons: Vec<Daemon>) -> Result<Vec<Shutdown>> {
    for d in &daemons {
        d.terminate();
    }
    let mut out = Vec::with_capacity(daemons.len());
    for mut d in daemons {
        out.push(d.wait_exit(Duration::from_secs(60)).await?);
    }
    Ok(out)
}
