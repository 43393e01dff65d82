//! `[jobs.<type>]`: job types, their stages, retry overrides and `rate`
//! ([`parse_rate`]), remote job types and their queues, with the checks of
//! all of them.
//!
//! A `builtin = "..."` stage names an in-process stage, which only the
//! pipeline layer knows: it passes the check of those as a
//! [`BuiltinCheck`], so this module depends on nothing above it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use super::worker::validate_retry;
use super::{Config, ConfigError, DEFAULT_POOL, RetryConfig, check_name, check_pool, invalid};

/// Checks the stage name a `builtin = "..."` stage gives, with the stage's
/// `args`: it gets the name and the stage, and returns the field at fault
/// (`"builtin"` or `"args"`) and what is wrong. The pipeline layer supplies
/// it (`pipeline::builtin::checker`); [`Config::validate_with`] calls it
/// for every `builtin` stage of a local job type, where the stage's other
/// checks run, so the first problem of a config is the one reported.
pub type BuiltinCheck<'a> = dyn Fn(&str, &StageConfig) -> Result<(), (&'static str, String)> + 'a;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTypeConfig {
    /// Queue `conveyor enqueue` pushes this type to when `--queue` is absent.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Override of `retry.max_attempts`.
    pub max_attempts: Option<u32>,
    /// Override of `retry.backoff_ms`.
    pub backoff_ms: Option<u64>,
    /// Override of `retry.backoff_max_ms`.
    pub backoff_max_ms: Option<u64>,
    /// Deadline of a whole attempt, all stages together; none by default.
    pub timeout_secs: Option<u64>,
    /// Most job starts of this type per period across all daemons, e.g.
    /// "100/1m" (enforced in Redis); none by default.
    pub rate: Option<String>,
    /// Run by remote workers over HTTP (`conveyor gateway`), not
    /// by daemons: its stages name the steps a remote worker reports, with
    /// no `run` or `builtin`, and its queue is served by the API only.
    #[serde(default)]
    pub remote: bool,
    pub stages: Vec<StageConfig>,
}

impl JobTypeConfig {
    /// `rate` as (jobs, period); `None` when unset. Validated at load.
    pub fn rate_limit(&self) -> Option<(u32, std::time::Duration)> {
        self.rate.as_deref().and_then(|r| parse_rate(r).ok())
    }
}

/// "N/period": N jobs per period, e.g. "100/1m", "5/1s", "1000/1h".
pub fn parse_rate(text: &str) -> Result<(u32, std::time::Duration), String> {
    let bad = |why: &str| format!("`{text}` is not a rate like \"100/1m\": {why}");
    let (n, period) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| bad("the count must be a whole number"))?;
    let period = period.trim();
    // "100/m" reads as "100/1m".
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        humantime::parse_duration(period)
    } else {
        humantime::parse_duration(&format!("1{period}"))
    }
    .map_err(|e| bad(&e.to_string()))?;
    if n == 0 {
        return Err(bad("the count must be at least 1"));
    }
    if period < std::time::Duration::from_millis(1)
        || period > std::time::Duration::from_secs(86_400 * 7)
    {
        return Err(bad("the period must be between 1ms and 7 days"));
    }
    Ok((n, period))
}

fn default_queue() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// An external program: argv, run per the stage protocol.
    pub run: Option<Vec<String>>,
    /// Or an in-process stage: a built-in (`noop`, `sleep`, `echo`, `fail`)
    /// or a Rust stage registered with [`crate::Worker::builder`].
    pub builtin: Option<String>,
    /// Arguments of a built-in, e.g. `{ ms = 50 }` for `sleep`.
    pub args: Option<toml::Table>,
    /// Extra environment for an external program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Share of the job's overall progress this stage accounts for.
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub timeout_secs: Option<u64>,
    /// At most this many runs of this stage at once (of every job type with
    /// a stage of this name), per daemon or per host (`max_concurrent_scope`).
    pub max_concurrent: Option<u32>,
    /// "daemon" (default) or "host": all the daemons of a host together.
    pub max_concurrent_scope: Option<String>,
    /// The pool whose daemons run this stage (`[worker] pools`); "default"
    /// when unset. See docs/concepts.md, "Stage pools".
    pub pool: Option<String>,
}

fn default_weight() -> u32 {
    1
}

impl StageConfig {
    /// The pool that runs this stage.
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }

    /// The built-in's arguments as JSON (empty object when none).
    pub fn args_json(&self) -> Value {
        match &self.args {
            Some(table) => serde_json::to_value(table).unwrap_or(Value::Null),
            None => Value::Object(Default::default()),
        }
    }
}

impl Config {
    /// Queues that hold remote job types (served by the API only).
    pub fn remote_queues(&self) -> BTreeSet<&str> {
        self.jobs
            .values()
            .filter(|j| j.remote)
            .map(|j| j.queue.as_str())
            .collect()
    }

    /// A queue holds remote job types or local ones, and daemons do not
    /// serve the remote ones' queues (the API does).
    pub(super) fn validate_remote_queues(&self) -> Result<(), ConfigError> {
        let remote = self.remote_queues();
        for (name, job) in &self.jobs {
            if !job.remote && remote.contains(job.queue.as_str()) {
                return Err(invalid(
                    format!("jobs.\"{name}\".queue"),
                    format!(
                        "queue `{}` holds remote job types; give local and remote types different queues",
                        job.queue
                    ),
                ));
            }
        }
        for (i, q) in self.worker.queues.iter().enumerate() {
            if remote.contains(q.as_str()) {
                return Err(invalid(
                    format!("worker.queues[{i}]"),
                    format!(
                        "queue `{q}` holds remote job types, which the gateway serves (conveyor gateway); daemons do not"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A stage name's limit is shared by every job type that has a stage of
    /// that name: they must all say the same.
    pub(super) fn validate_stage_limits(&self) -> Result<(), ConfigError> {
        let mut seen: BTreeMap<&str, (String, Option<u32>, &str)> = BTreeMap::new();
        for (kind, job) in &self.jobs {
            for (i, stage) in job.stages.iter().enumerate() {
                let key = format!("jobs.\"{kind}\".stages[{i}].max_concurrent");
                let scope = stage.max_concurrent_scope.as_deref().unwrap_or("daemon");
                let this = (stage.max_concurrent, scope);
                match seen.get(stage.name.as_str()) {
                    Some((first, limit, scope)) if (*limit, *scope) != this => {
                        return Err(invalid(
                            key,
                            format!(
                                "stage `{}` is limited differently at {first}; every stage of that name shares one limit",
                                stage.name
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(&stage.name, (key, this.0, this.1));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Most stages of one job type: a job's record write carries a field per
/// stage in one Redis command (Lua's `unpack` takes some 8,000 values).
pub const MAX_STAGES: usize = 1000;

pub(super) fn validate_job_type(
    name: &str,
    job: &JobTypeConfig,
    builtin: &BuiltinCheck<'_>,
) -> Result<(), ConfigError> {
    let key = format!("jobs.\"{name}\"");
    if name.is_empty() {
        return Err(invalid("jobs", "a job type name must not be empty"));
    }
    check_name(&format!("{key}.queue"), &job.queue)?;
    validate_retry(
        &key,
        &RetryConfig {
            max_attempts: job.max_attempts.unwrap_or(1),
            backoff_ms: job.backoff_ms.unwrap_or(0),
            backoff_max_ms: job.backoff_max_ms.unwrap_or(u64::MAX),
        },
    )?;
    if job.timeout_secs == Some(0) {
        return Err(invalid(format!("{key}.timeout_secs"), "must be at least 1"));
    }
    if let Some(rate) = &job.rate {
        parse_rate(rate).map_err(|m| invalid(format!("{key}.rate"), m))?;
    }
    if job.stages.is_empty() {
        return Err(invalid(
            format!("{key}.stages"),
            "a job type needs at least one stage",
        ));
    }
    if job.stages.len() > MAX_STAGES {
        return Err(invalid(
            format!("{key}.stages"),
            format!(
                "at most {MAX_STAGES} stages (this one has {})",
                job.stages.len()
            ),
        ));
    }
    for i in 0..job.stages.len() {
        validate_stage(&format!("{key}.stages[{i}]"), job, i, builtin)?;
    }
    Ok(())
}

/// Checks stage `i` of `job`, at `key` (`jobs."T".stages[i]`).
fn validate_stage(
    key: &str,
    job: &JobTypeConfig,
    i: usize,
    builtin: &BuiltinCheck<'_>,
) -> Result<(), ConfigError> {
    let stage = &job.stages[i];
    if stage.name.trim().is_empty() {
        return Err(invalid(format!("{key}.name"), "must not be empty"));
    }
    if job.stages[..i].iter().any(|s| s.name == stage.name) {
        return Err(invalid(
            format!("{key}.name"),
            format!("stage name `{}` is used twice", stage.name),
        ));
    }
    if let Some(pool) = &stage.pool {
        check_pool(&format!("{key}.pool"), pool)?;
    }
    if stage.weight == 0 {
        return Err(invalid(format!("{key}.weight"), "must be at least 1"));
    }
    if stage.timeout_secs == Some(0) {
        return Err(invalid(format!("{key}.timeout_secs"), "must be at least 1"));
    }
    if stage.max_concurrent == Some(0) {
        return Err(invalid(
            format!("{key}.max_concurrent"),
            "must be at least 1",
        ));
    }
    match stage.max_concurrent_scope.as_deref() {
        None | Some("daemon") | Some("host") => {}
        Some(other) => {
            return Err(invalid(
                format!("{key}.max_concurrent_scope"),
                format!("`{other}` is not \"daemon\" or \"host\""),
            ));
        }
    }
    if stage.max_concurrent_scope.is_some() && stage.max_concurrent.is_none() {
        return Err(invalid(
            format!("{key}.max_concurrent_scope"),
            "is for a stage with `max_concurrent`",
        ));
    }
    if job.remote {
        if stage.pool.is_some() {
            return Err(invalid(
                format!("{key}.pool"),
                "is for daemons' stages: the gateway serves every stage of a remote job type",
            ));
        }
        if stage.run.is_some() || stage.builtin.is_some() {
            return Err(invalid(
                key,
                "is a stage of a remote job type: remote workers run it, so it has no `run` or `builtin`",
            ));
        }
        return Ok(());
    }
    validate_program(key, stage, builtin)
}

/// Checks what a local stage runs: a program (`run`) or an in-process
/// stage (`builtin`, checked by `builtin`).
fn validate_program(
    key: &str,
    stage: &StageConfig,
    builtin: &BuiltinCheck<'_>,
) -> Result<(), ConfigError> {
    match (&stage.run, &stage.builtin) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key,
                "has both `run` and `builtin`; a stage is one or the other",
            ));
        }
        (None, None) => {
            return Err(invalid(
                key,
                "needs `run = [argv...]` or `builtin = \"name\"`",
            ));
        }
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(invalid(format!("{key}.run"), "must name a program"));
            }
            if stage.args.is_some() {
                return Err(invalid(
                    format!("{key}.args"),
                    "`args` is for built-ins; pass arguments in `run`",
                ));
            }
        }
        (None, Some(b)) => {
            builtin(b, stage)
                .map_err(|(field, message)| invalid(format!("{key}.{field}"), message))?;
            if !stage.env.is_empty() {
                return Err(invalid(format!("{key}.env"), "`env` is for `run` stages"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;

    #[test]
    fn remote_job_types_keep_to_their_own_queues() {
        let remote = "[worker]\nqueues = [\"a\"]\n[jobs.r]\nremote = true\nqueue = \"r\"\nstages = [{ name = \"s\" }]\n";
        Config::from_toml(remote).unwrap().validate().unwrap();
        let cases = [
            (
                remote.replace("{ name = \"s\" }", "{ name = \"s\", builtin = \"noop\" }"),
                "jobs.\"r\".stages[0]",
            ),
            (
                format!(
                    "{remote}[jobs.l]\nqueue = \"r\"\nstages = [{{ name = \"x\", builtin = \"noop\" }}]\n"
                ),
                "jobs.\"l\".queue",
            ),
            (
                remote.replace("queues = [\"a\"]", "queues = [\"a\", \"r\"]"),
                "worker.queues[1]",
            ),
            (
                format!("{remote}[gateway]\nlease_secs = 0\n"),
                "gateway.lease_secs",
            ),
            (
                format!("{remote}[gateway]\ntokens = {{ w = \"short\" }}\n"),
                "gateway.tokens.w",
            ),
            // The old name still loads; its keys are named as they now are.
            (
                format!("{remote}[api]\nlease_secs = 0\n"),
                "gateway.lease_secs",
            ),
            (
                format!("{remote}[dashboard]\ntls_cert_file = \"/x\"\n"),
                "dashboard.tls_cert_file",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.starts_with(&format!("config key `{key}`")), "{text}: {e}");
        }
        let c = Config::from_toml(&format!(
            "{remote}[gateway]\ntokens = {{ w = \"0123456789abcdefXYZ\" }}\n"
        ))
        .unwrap();
        assert!(
            !format!("{c:?}").contains("0123456789abcdefXYZ"),
            "a token in Debug output"
        );
    }

    #[test]
    fn rates_parse_and_bad_ones_name_the_key() {
        use std::time::Duration;
        assert_eq!(parse_rate("100/1m"), Ok((100, Duration::from_secs(60))));
        assert_eq!(parse_rate("5 / s"), Ok((5, Duration::from_secs(1))));
        assert_eq!(parse_rate("1000/1h"), Ok((1000, Duration::from_secs(3600))));
        for bad in ["100", "0/1m", "x/1m", "10/forever", "10/30d"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let e = err("[jobs.x]\nrate = \"lots\"\nstages = [{ name = \"a\", builtin = \"noop\" }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".rate`"), "{e}");
    }

    #[test]
    fn stage_limits_are_checked_and_shared_by_name() {
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 0 }]\n",
        );
        assert!(
            e.starts_with("config key `jobs.\"x\".stages[0].max_concurrent`"),
            "{e}"
        );
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1, max_concurrent_scope = \"rack\" }]\n",
        );
        assert!(e.contains("max_concurrent_scope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent_scope = \"host\" }]\n",
        );
        assert!(e.contains("max_concurrent_scope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n[jobs.y]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 2 }]\n",
        );
        assert!(
            e.contains("jobs.\"y\".stages[0].max_concurrent") && e.contains("shares one limit"),
            "{e}"
        );
        let ok = "[jobs.x]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n[jobs.y]\nstages = [{ name = \"gpu\", builtin = \"noop\", max_concurrent = 1 }]\n";
        Config::from_toml(ok).unwrap().validate().unwrap();
    }

    #[test]
    fn unknown_field_in_job_type_is_named() {
        let e = err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\" }]\nretries = 3\n");
        assert!(e.contains("retries"), "{e}");
    }

    #[test]
    fn too_many_stages_are_refused() {
        let stage = |i: usize| format!("{{ name = \"s{i}\", builtin = \"noop\" }}");
        let many = |n: usize| (0..n).map(stage).collect::<Vec<_>>().join(", ");
        let e = err(&format!("[jobs.x]\nstages = [{}]\n", many(MAX_STAGES + 1)));
        assert_eq!(
            e,
            "config key `jobs.\"x\".stages`: at most 1000 stages (this one has 1001)"
        );
        let text = format!("[jobs.x]\nstages = [{}]\n", many(MAX_STAGES));
        assert!(Config::from_toml(&text).is_ok());
    }

    #[test]
    fn empty_stages_are_refused() {
        let e = err("[jobs.x]\nstages = []\n");
        assert_eq!(
            e,
            "config key `jobs.\"x\".stages`: a job type needs at least one stage"
        );
    }

    #[test]
    fn run_and_builtin_together_are_refused() {
        let e =
            err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\", run = [\"true\"] }]\n");
        assert!(e.starts_with("config key `jobs.\"x\".stages[0]`"), "{e}");
        assert!(e.contains("both `run` and `builtin`"), "{e}");
    }

    #[test]
    fn duplicate_stage_names_are_refused() {
        let e = err(
            "[jobs.x]\nstages = [{ name = \"a\", builtin = \"noop\" }, { name = \"a\", builtin = \"noop\" }]\n",
        );
        assert!(e.contains("stages[1].name"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::parse_rate;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any text: a rate within its bounds, or an error naming the text.
        #[test]
        fn any_rate_text(text in prop_oneof![
            "\\PC{0,30}",
            "[0-9]{0,12}/[0-9]{0,25}[a-zµ€ ]{0,6}",
        ]) {
            match parse_rate(&text) {
                Ok((n, period)) => {
                    prop_assert!(n >= 1);
                    prop_assert!(period >= std::time::Duration::from_millis(1));
                    prop_assert!(period <= std::time::Duration::from_secs(7 * 86_400));
                }
                Err(e) => prop_assert!(e.starts_with(&format!("`{text}`")), "{}", e),
            }
        }
    }
}
