//! `conveyor watch [ID]`: live progress from the progress channel.
//!
//! On a terminal, one progress bar per running job (`indicatif`); a job's
//! bar goes when the job ends, leaving one summary line. Otherwise (a pipe,
//! a log file) one line per message, and `--json` prints the messages as
//! they came. Messages of a job arrive in order on one channel, but a
//! reconnect or a late subscriber may repeat or skip some: a message whose
//! `seq` is not above the last one seen for its job is ignored.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{CliResult, Failure, connect};
use crate::config::Config;
use crate::job::Status;
use crate::progress::ProgressEvent;
use crate::store::{JobRecord, Reader};

pub async fn run(config: &Config, id: Option<&str>, json: bool) -> CliResult {
    let broker = connect(config).await?;
    let mut pubsub = crate::progress::subscribe(&broker, id)
        .await
        .map_err(|e| Failure::other(format!("cannot subscribe: {e}")))?;
    let mut out = if json {
        Output::Json
    } else if std::io::stdout().is_terminal() {
        Output::Bars(Bars::new())
    } else {
        Output::Lines
    };
    // Subscribed first, then the stored state: nothing falls in between.
    if let Some(id) = id {
        match stored_state(config, id) {
            Some(state) if is_final(&state.status) => return finish(id, &state.status),
            Some(state) => out.stored(&state),
            None => {}
        }
    }
    let mut order = Order::default();
    let mut messages = pubsub.on_message();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else {
                    out.clear();
                    return Err(Failure::other("lost the Redis connection"));
                };
                let body: String = msg.get_payload().unwrap_or_default();
                let event: Option<ProgressEvent> = serde_json::from_str(&body).ok();
                match &event {
                    Some(ev) if !order.accept(ev) => continue,
                    Some(ev) => out.event(ev, &body),
                    None if json => println!("{body}"),
                    None => {}
                }
                if let (Some(_), Some(ev)) = (id, &event)
                    && ev.status.is_final()
                {
                    out.clear();
                    return if ev.status == Status::Completed { Ok(()) } else {
                        Err(Failure::other(format!("job {}", ev.status.as_str())))
                    };
                }
            }
            // A missed final message (pub/sub is at-most-once) must not
            // leave the watcher hanging: SQLite has the truth.
            _ = poll.tick(), if id.is_some() => {
                if let Some(id) = id
                    && let Some(state) = stored_state(config, id)
                    && is_final(&state.status)
                {
                    out.clear();
                    return finish(id, &state.status);
                }
            }
        }
    }
}

/// Drops messages older than the last one seen of the same job.
#[derive(Default)]
struct Order {
    last: HashMap<String, u64>,
}

impl Order {
    fn accept(&mut self, ev: &ProgressEvent) -> bool {
        let last = self.last.entry(ev.job_id.clone()).or_insert(0);
        // seq starts at 1 for each delivery of a job: a new attempt after a
        // retry or requeue starts over with `job_started`.
        // A final status always counts: "cancelled before it ran" is sent
        // with seq 1 whatever ran before.
        let restart = ev.event == "job_started" || ev.status.is_final();
        if ev.seq <= *last && !restart {
            return false;
        }
        *last = if ev.status.is_final() { 0 } else { ev.seq };
        true
    }
}

enum Output {
    Json,
    Lines,
    Bars(Bars),
}

impl Output {
    fn stored(&mut self, state: &JobRecord) {
        let stage = state
            .stage
            .as_deref()
            .map(|s| format!(" [{s}]"))
            .unwrap_or_default();
        match self {
            Output::Json => {}
            Output::Lines => println!(
                "{} {} {:.1}%{stage} (stored state; following live progress)",
                state.id, state.status, state.progress
            ),
            Output::Bars(bars) => bars.stored(state),
        }
    }

    fn event(&mut self, ev: &ProgressEvent, body: &str) {
        match self {
            Output::Json => println!("{body}"),
            Output::Lines => println!("{}", render_event(ev)),
            Output::Bars(bars) => bars.event(ev),
        }
    }

    fn clear(&mut self) {
        if let Output::Bars(bars) = self {
            bars.clear();
        }
    }
}

/// One bar per live job.
struct Bars {
    multi: MultiProgress,
    style: ProgressStyle,
    jobs: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        let style =
            ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            style,
            jobs: HashMap::new(),
        }
    }

    fn bar(&mut self, id: &str) -> &ProgressBar {
        self.jobs.entry(id.to_owned()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(100));
            bar.set_style(self.style.clone());
            bar.set_prefix(short(id, 36));
            bar
        })
    }

    fn stored(&mut self, state: &JobRecord) {
        let bar = self.bar(&state.id).clone();
        bar.set_position(state.progress.clamp(0.0, 100.0) as u64);
        bar.set_message(format!(
            "{} {} (stored state)",
            state.status,
            state.stage.as_deref().unwrap_or("")
        ));
    }

    fn event(&mut self, ev: &ProgressEvent) {
        let bar = self.bar(&ev.job_id).clone();
        bar.set_position(ev.progress.clamp(0.0, 100.0) as u64);
        let stage = match (&ev.stage, ev.stage_index) {
            (Some(name), Some(i)) => format!(" [{}/{} {name}]", i + 1, ev.stages_total),
            _ => String::new(),
        };
        let message = ev
            .message
            .as_deref()
            .map(|m| format!(" {}", short(m, 80)))
            .unwrap_or_default();
        bar.set_message(format!("{}{stage}{message}", ev.status.as_str()));
        if ev.status.is_final() || ev.status == Status::Retrying {
            // The bar goes; a line says how the job (or attempt) ended.
            let _ = self.multi.println(render_event(ev));
            bar.finish_and_clear();
            self.multi.remove(&bar);
            self.jobs.remove(&ev.job_id);
        }
    }

    fn clear(&mut self) {
        let _ = self.multi.clear();
    }
}

fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

fn stored_state(config: &Config, id: &str) -> Option<JobRecord> {
    if !config.store.path.exists() {
        return None;
    }
    Reader::open(&config.store.path).ok()?.job(id).ok()?
}

fn is_final(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_final)
}

fn finish(id: &str, status: &str) -> CliResult {
    println!("{id} {status}");
    if status == "completed" {
        Ok(())
    } else {
        Err(Failure::other(format!("job {status}")))
    }
}

/// One message as one line: time, job, status, progress, stage, event.
pub fn render_event(ev: &ProgressEvent) -> String {
    let stage = match (&ev.stage, ev.stage_index) {
        (Some(name), Some(i)) => format!(" [{}/{} {name}]", i + 1, ev.stages_total),
        _ => String::new(),
    };
    let message = ev
        .message
        .as_deref()
        .map(|m| format!(" {m}"))
        .unwrap_or_default();
    let short_ts = ev.ts.get(11..23).unwrap_or(&ev.ts);
    format!(
        "{short_ts} {} {:<9} {:>5.1}%{stage} {}{message}",
        ev.job_id,
        ev.status.as_str(),
        ev.progress,
        ev.event
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(job: &str, seq: u64, event: &str, status: Status) -> ProgressEvent {
        ProgressEvent {
            job_id: job.into(),
            kind: "t".into(),
            queue: "q".into(),
            status,
            event: event.into(),
            stage: None,
            stage_index: None,
            stages_total: 1,
            progress: 0.0,
            attempt: 1,
            worker_id: "w".into(),
            message: None,
            ts: "2026-11-23T00:00:00.000Z".into(),
            seq,
            result: None,
            result_truncated: None,
            result_key: None,
            result_field: None,
        }
    }

    #[test]
    fn stale_and_repeated_messages_are_dropped_per_job() {
        let mut o = Order::default();
        assert!(o.accept(&ev("a", 1, "job_started", Status::Running)));
        assert!(o.accept(&ev("a", 3, "progress", Status::Running)));
        assert!(!o.accept(&ev("a", 2, "progress", Status::Running)), "older");
        assert!(
            !o.accept(&ev("a", 3, "progress", Status::Running)),
            "repeated"
        );
        assert!(
            o.accept(&ev("b", 1, "job_started", Status::Running)),
            "other job"
        );
        assert!(o.accept(&ev("a", 4, "job_completed", Status::Completed)));
        // The same id enqueued again starts over at 1.
        assert!(o.accept(&ev("a", 1, "job_started", Status::Running)));
        assert!(o.accept(&ev("a", 2, "progress", Status::Running)));
    }

    #[test]
    fn a_new_delivery_restarts_the_sequence() {
        let mut o = Order::default();
        assert!(o.accept(&ev("a", 5, "progress", Status::Running)));
        // Requeued on shutdown, taken again elsewhere: seq restarts.
        assert!(o.accept(&ev("a", 1, "job_started", Status::Running)));
        assert!(o.accept(&ev("a", 2, "stage_started", Status::Running)));
    }

    #[test]
    fn a_final_status_always_counts() {
        let mut o = Order::default();
        assert!(o.accept(&ev("a", 4, "progress", Status::Running)));
        assert!(o.accept(&ev("a", 1, "job_cancelled", Status::Cancelled)));
    }

    #[test]
    fn long_texts_are_cut() {
        assert_eq!(short("abc", 5), "abc");
        assert_eq!(short("abcdefgh", 5), "abcd…");
    }
}
