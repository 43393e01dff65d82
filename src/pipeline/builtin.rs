//! In-process stages for demos, tests and benchmarks, and the check of
//! the config's `builtin = "..."` stages against them ([`checker`]).

use std::time::Duration;

use serde_json::Value;

use super::{BoxFuture, Stage, StageContext, StageError};
use crate::config::StageConfig;

/// Names accepted in `builtin = "..."`.
pub const NAMES: &[&str] = &["noop", "sleep", "echo", "fail"];

#[derive(Debug, Clone, PartialEq)]
pub enum Builtin {
    /// Does nothing; result `null`.
    Noop,
    /// Waits `ms` milliseconds, reporting progress as it goes; result `null`.
    Sleep { ms: u64 },
    /// Result = the job's payload.
    Echo,
    /// Always fails, permanently or retryably.
    Fail { permanent: bool, message: String },
}

impl Builtin {
    /// Builds a built-in from its name and `args`, or says what is wrong.
    pub fn parse(name: &str, args: &Value) -> Result<Self, String> {
        let empty = serde_json::Map::new();
        let args = args.as_object().unwrap_or(&empty);
        let allow = |known: &[&str]| match args.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("built-in `{name}` takes no argument `{k}`")),
            None => Ok(()),
        };
        match name {
            "noop" => allow(&[]).map(|()| Builtin::Noop),
            "echo" => allow(&[]).map(|()| Builtin::Echo),
            "sleep" => {
                allow(&["ms"])?;
                match args.get("ms").map(Value::as_u64) {
                    Some(Some(ms)) => Ok(Builtin::Sleep { ms }),
                    _ => Err("built-in `sleep` needs `args = { ms = <integer> }`".into()),
                }
            }
            "fail" => {
                allow(&["permanent", "message"])?;
                let permanent = match args.get("permanent") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err("`fail`'s `permanent` must be true or false".into()),
                };
                let message = match args.get("message") {
                    None => "failed on purpose (built-in `fail`)".to_owned(),
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => return Err("`fail`'s `message` must be a string".into()),
                };
                Ok(Builtin::Fail { permanent, message })
            }
            other => Err(format!(
                "unknown built-in `{other}` (known: {})",
                NAMES.join(", ")
            )),
        }
    }
}

/// The check of the config's `builtin = "..."` stages for a process whose
/// in-process stages are the built-ins and `rust_stages` (Rust stages
/// registered with [`crate::Worker::builder`]; none for the binary), to
/// pass to [`crate::config::Config::validate_with`] or
/// [`crate::config::Config::load`]. A Rust stage takes no `args`; a
/// built-in's `args` must be the ones it takes.
pub fn checker<'a>(
    rust_stages: &'a [&'a str],
) -> impl Fn(&str, &StageConfig) -> Result<(), (&'static str, String)> + 'a {
    move |name: &str, stage: &StageConfig| {
        if rust_stages.contains(&name) {
            if stage.args.is_some() {
                return Err((
                    "args",
                    format!("`{name}` is a Rust stage; it takes no `args`"),
                ));
            }
            Ok(())
        } else if !rust_stages.is_empty() && !NAMES.contains(&name) {
            Err((
                "builtin",
                format!(
                    "unknown stage `{name}` (built-ins: {}; Rust stages: {})",
                    NAMES.join(", "),
                    rust_stages.join(", ")
                ),
            ))
        } else {
            Builtin::parse(name, &stage.args_json())
                .map(drop)
                .map_err(|message| ("builtin", message))
        }
    }
}

impl Stage for Builtin {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(async move {
            match self {
                Builtin::Noop => Ok(Value::Null),
                Builtin::Echo => Ok(ctx.payload.clone()),
                Builtin::Fail { permanent, message } => Err(if *permanent {
                    StageError::permanent(message.clone())
                } else {
                    StageError::retryable(message.clone())
                }),
                Builtin::Sleep { ms } => sleep(ctx, *ms).await,
            }
        })
    }
}

/// Sleeps in up to ten steps, reporting progress after each one.
async fn sleep(ctx: &StageContext, ms: u64) -> Result<Value, StageError> {
    let steps = ms.clamp(1, 10);
    let step = Duration::from_millis(ms) / steps as u32;
    for i in 1..=steps {
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(StageError::interrupted()),
            _ = tokio::time::sleep(step) => {}
        }
        ctx.progress((i * 100 / steps) as f64, None);
    }
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::locate::DEFAULT_CONFIG_PATH;
    use serde_json::json;

    /// The parse error, or else the validation error, of a config text, for
    /// the binary (built-ins only).
    fn err(text: &str) -> String {
        match Config::from_toml(text) {
            Err(e) => e,
            Ok(c) => c.validate_with(&checker(&[])).unwrap_err().to_string(),
        }
    }

    #[test]
    fn parses_arguments() {
        assert_eq!(Builtin::parse("noop", &json!({})), Ok(Builtin::Noop));
        assert_eq!(
            Builtin::parse("sleep", &json!({"ms": 5})),
            Ok(Builtin::Sleep { ms: 5 })
        );
        assert!(Builtin::parse("sleep", &json!({})).is_err());
        assert!(Builtin::parse("noop", &json!({"x": 1})).is_err());
        assert_eq!(
            Builtin::parse("fail", &json!({"permanent": true})),
            Ok(Builtin::Fail {
                permanent: true,
                message: "failed on purpose (built-in `fail`)".into()
            })
        );
        assert!(
            Builtin::parse("nope", &json!({}))
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn unknown_builtin_and_bad_args_are_refused() {
        let e = err("[jobs.x]\nstages = [{ name = \"a\", builtin = \"nope\" }]\n");
        assert!(e.contains("stages[0].builtin") && e.contains("nope"), "{e}");
        let e = err(
            "[jobs.x]\nstages = [{ name = \"a\", builtin = \"sleep\", args = { ms = \"x\" } }]\n",
        );
        assert!(e.contains("stages[0].builtin") && e.contains("ms"), "{e}");
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let c = Config::from_file(&path).unwrap();
        c.validate_with(&checker(&[])).unwrap();
        assert!(c.jobs.contains_key("echo"));
        assert_eq!(c.jobs["video.generate"].stages.len(), 4);
    }
}
