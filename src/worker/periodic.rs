//! Periodic jobs (`[[schedules]]`): every daemon with schedules in its
//! config runs this task, and each tick is enqueued once in all.
//!
//! Each daemon computes the same tick instants ([`crate::config::timing`]) and,
//! when one is due, asks `lua/enqueue.lua` to enqueue its job. The script
//! keeps the last tick enqueued per schedule in `P:{Q}:schedules` and
//! refuses a tick that is not later, in the same atomic step as the push:
//! however many daemons race for a tick, one enqueues it, and a daemon that
//! comes late (slow clock, paused) finds it done.
//!
//! After downtime the missed ticks are skipped, unless the schedule asks for
//! `catch_up = N`: then at start the latest N missed ticks are enqueued, one
//! job each. A daemon that oversleeps (suspended VM) by more than a few
//! seconds goes on from the next tick after now, never a burst.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::timing::Timing;
use crate::job::Job;
use crate::queue::Broker;
use crate::retry::reconnect_backoff;

/// One `[[schedules]]` entry, resolved.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub kind: String,
    pub queue: String,
    pub payload: Value,
    pub timing: Timing,
    pub catch_up: u32,
}

impl Schedule {
    /// The schedules of a validated config.
    pub fn from_config(config: &Config) -> Vec<Schedule> {
        config
            .schedules
            .iter()
            .filter_map(|s| {
                let timing = Timing::parse(s.cron.as_deref(), s.every.as_deref()).ok()?;
                Some(Schedule {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    queue: config.schedule_queue(s),
                    payload: s.payload.clone(),
                    timing,
                    catch_up: s.catch_up,
                })
            })
            .collect()
    }

    /// Id of the job of one tick: `<name>@<tick, RFC 3339>`.
    pub fn job_id(&self, tick_ms: u64) -> String {
        let at = crate::time::time_of_ms(tick_ms);
        format!("{}@{}", self.name, humantime::format_rfc3339_seconds(at))
    }
}

pub struct Periodic {
    pub broker: Broker,
    pub schedules: Vec<Schedule>,
}

/// How late a tick may still be enqueued (see `run`), in ms.
const LATE_OK_MS: u64 = 5_000;

/// Longest single sleep: the wall clock is read again at least this often,
/// so a clock step (NTP) does not leave a tick far off.
const MAX_SLEEP: Duration = Duration::from_secs(30);

impl Periodic {
    pub async fn run(self, shutdown: CancellationToken) {
        if self.schedules.is_empty() {
            return;
        }
        let start = crate::time::now_ms();
        for s in self.schedules.iter().filter(|s| s.catch_up > 0) {
            let last = match self.broker.last_tick(&s.queue, &s.name).await {
                Ok(last) => last,
                Err(err) => {
                    tracing::warn!(schedule = %s.name, error = %err, "schedule_last_tick_unreadable");
                    None
                }
            };
            // A schedule that never ticked has nothing to catch up on.
            let Some(last) = last else { continue };
            let missed = s.timing.ticks_between(last, start, s.catch_up as usize);
            if !missed.is_empty() {
                tracing::info!(schedule = %s.name, missed = missed.len(), "schedule_catching_up");
            }
            for tick in missed {
                if !self.fire(s, tick, &shutdown).await {
                    return;
                }
            }
        }
        let mut next: Vec<Option<u64>> = self
            .schedules
            .iter()
            .map(|s| s.timing.next_after(start))
            .collect();
        loop {
            let Some((i, due)) = next
                .iter()
                .enumerate()
                .filter_map(|(i, t)| t.map(|t| (i, t)))
                .min_by_key(|&(_, t)| t)
            else {
                return; // No schedule ticks ever again.
            };
            let now = crate::time::now_ms();
            if now < due {
                let wait = Duration::from_millis(due - now).min(MAX_SLEEP);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            let s = &self.schedules[i];
            if !self.fire(s, due, &shutdown).await {
                return;
            }
            // A tick a little late (a slow Redis call, a busy host) is still
            // enqueued; ticks missed by more than LATE_OK are skipped.
            next[i] = s
                .timing
                .next_after(due)
                .filter(|&t| t + LATE_OK_MS >= crate::time::now_ms())
                .or_else(|| s.timing.next_after(crate::time::now_ms()));
        }
    }

    /// Enqueues one tick's job, retrying Redis until it answers; false when
    /// shutdown came first.
    async fn fire(&self, s: &Schedule, tick: u64, shutdown: &CancellationToken) -> bool {
        let id = s.job_id(tick);
        let body = Job::new(id.clone(), s.kind.clone(), s.payload.clone()).to_json();
        let mut backoff = reconnect_backoff();
        loop {
            match self
                .broker
                .enqueue_tick(&s.queue, &s.name, tick, &id, &s.kind, &body)
                .await
            {
                Ok(e) if e.added => {
                    tracing::info!(schedule = %s.name, job_id = %id, queue = %s.queue, "schedule_enqueued");
                    return true;
                }
                Ok(e) if e.status == "fired" => {
                    tracing::debug!(schedule = %s.name, job_id = %id, "schedule_tick_taken");
                    return true;
                }
                Ok(e) => {
                    tracing::warn!(schedule = %s.name, job_id = %id, status = %e.status,
                        "schedule_tick_skipped");
                    return true;
                }
                Err(err) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(schedule = %s.name, job_id = %id, error = %err,
                        retry_in_ms = delay.as_millis() as u64, "schedule_enqueue_failed");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_ids_name_the_schedule_and_the_instant() {
        let s = Schedule {
            name: "nightly".into(),
            kind: "report".into(),
            queue: "default".into(),
            payload: Value::Null,
            timing: Timing::parse(None, Some("1d")).unwrap(),
            catch_up: 0,
        };
        assert_eq!(s.job_id(1_795_392_000_000), "nightly@2026-11-23T00:00:00Z");
    }
}
