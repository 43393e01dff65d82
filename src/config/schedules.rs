//! `[[schedules]]`: periodic jobs (what to enqueue, where, and when, see
//! [`super::timing`]) and their checks.

use serde::Deserialize;
use serde_json::Value;

use super::timing::Timing;
use super::{Config, ConfigError, check_name, invalid};

/// One periodic job: `[[schedules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Names the schedule in keys, logs and job ids (`<name>@<tick>`).
    pub name: String,
    /// Job type to enqueue.
    #[serde(rename = "type")]
    pub kind: String,
    /// Cron expression, UTC: "minute hour day-of-month month day-of-week".
    pub cron: Option<String>,
    /// Or a fixed interval, ticking on multiples of it since the Unix epoch.
    pub every: Option<String>,
    /// Payload of each job (any TOML value; default null).
    #[serde(default)]
    pub payload: Value,
    /// Queue [default: the job type's queue, else "default"].
    pub queue: Option<String>,
    /// After downtime, enqueue up to this many missed ticks (the latest
    /// ones). 0, the default: missed ticks are skipped.
    #[serde(default)]
    pub catch_up: u32,
}

impl Config {
    /// The queue a schedule's jobs go to.
    pub fn schedule_queue(&self, s: &ScheduleConfig) -> String {
        s.queue
            .clone()
            .or_else(|| self.jobs.get(&s.kind).map(|j| j.queue.clone()))
            .unwrap_or_else(|| "default".into())
    }
}

impl Config {
    pub(super) fn validate_schedule(
        &self,
        i: usize,
        s: &ScheduleConfig,
    ) -> Result<(), ConfigError> {
        let key = format!("schedules[{i}]");
        check_name(&format!("{key}.name"), &s.name)?;
        if self.schedules[..i].iter().any(|o| o.name == s.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("schedule name `{}` is used twice", s.name),
            ));
        }
        if s.kind.is_empty() {
            return Err(invalid(format!("{key}.type"), "must name a job type"));
        }
        if !self.jobs.is_empty() && !self.jobs.contains_key(&s.kind) {
            let known: Vec<_> = self.jobs.keys().map(String::as_str).collect();
            return Err(invalid(
                format!("{key}.type"),
                format!(
                    "unknown job type `{}` (known: {})",
                    s.kind,
                    known.join(", ")
                ),
            ));
        }
        if let Some(q) = &s.queue {
            check_name(&format!("{key}.queue"), q)?;
        }
        Timing::parse(s.cron.as_deref(), s.every.as_deref())
            .map_err(|(field, message)| invalid(format!("{key}.{field}"), message))?;
        if s.catch_up > 1000 {
            return Err(invalid(format!("{key}.catch_up"), "must be at most 1000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;

    const JOBS: &str =
        "[jobs.report]\nqueue = \"reports\"\nstages = [{ name = \"a\", builtin = \"noop\" }]\n";

    #[test]
    fn schedules_parse_and_take_their_job_types_queue() {
        let text = format!(
            "{JOBS}[[schedules]]\nname = \"nightly\"\ntype = \"report\"\ncron = \"0 3 * * *\"\npayload = {{ full = true }}\n\n[[schedules]]\nname = \"often\"\ntype = \"report\"\nevery = \"5m\"\nqueue = \"q2\"\ncatch_up = 2\n"
        );
        let c = Config::from_toml(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.schedules.len(), 2);
        assert_eq!(c.schedule_queue(&c.schedules[0]), "reports");
        assert_eq!(c.schedules[0].payload, serde_json::json!({"full": true}));
        assert_eq!(c.schedule_queue(&c.schedules[1]), "q2");
        assert_eq!(c.schedules[1].catch_up, 2);
    }

    #[test]
    fn bad_schedules_name_the_key() {
        let sched = |body: &str| err(&format!("{JOBS}[[schedules]]\n{body}"));
        let e = sched("name = \"n\"\ntype = \"report\"\ncron = \"99 * * * *\"\n");
        assert!(e.starts_with("config key `schedules[0].cron`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\n");
        assert!(e.starts_with("config key `schedules[0].cron`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\nevery = \"often\"\n");
        assert!(e.starts_with("config key `schedules[0].every`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"nope\"\nevery = \"1m\"\n");
        assert!(
            e.starts_with("config key `schedules[0].type`") && e.contains("report"),
            "{e}"
        );
        let e = sched("name = \"a b\"\ntype = \"report\"\nevery = \"1m\"\n");
        assert!(e.starts_with("config key `schedules[0].name`"), "{e}");
        let e = sched(
            "name = \"n\"\ntype = \"report\"\nevery = \"1m\"\n[[schedules]]\nname = \"n\"\ntype = \"report\"\nevery = \"2m\"\n",
        );
        assert!(e.starts_with("config key `schedules[1].name`"), "{e}");
        let e = sched("name = \"n\"\ntype = \"report\"\nevery = \"1m\"\nat = 3\n");
        assert!(e.contains("unknown field `at`"), "{e}");
    }
}
