//! In-process stages for demos, tests and benchmarks.

use std::time::Duration;

use serde_json::Value;

use super::{BoxFuture, Stage, StageContext, StageError};

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
    use serde_json::json;

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
}
