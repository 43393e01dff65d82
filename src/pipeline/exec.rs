//! External program stages: the stage protocol.
//!
//! - stdin: one JSON object `{"id","type","payload","attempt","stage","results"}`,
//!   plus `CONVEYOR_JOB_ID`, `CONVEYOR_JOB_TYPE`, `CONVEYOR_STAGE` and
//!   `CONVEYOR_ATTEMPT` in the environment;
//! - stdout: a JSON object line with `progress` (0-100) and an optional
//!   `message` is a progress report; `{"result": ...}` sets the result (last
//!   one wins); anything else, and stderr, is logged;
//! - exit 0: done; 64 or 65: permanent failure; anything else: retryable.
//!
//! Output is read in bounded chunks: a line that is not JSON is kept only up
//! to 2 KiB (for the log, cut there); a line starting with `{` (a progress
//! or result line) is kept up to `max_result_bytes` + 64 KiB, and a longer
//! one fails the stage permanently once the program has exited. The daemon
//! never holds more of a stage's output than that, however much it prints.
//!
//! The program runs as the leader of its own process group, so that on
//! timeout, cancel or shutdown the whole group (its children too) gets
//! SIGTERM and, after the kill grace, SIGKILL; and so that a Ctrl-C on the
//! daemon's terminal reaches the daemon only, which then decides.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::{BoxFuture, Stage, StageContext, StageError};

/// How long output may go on after the program exited (a child it left
/// behind may hold stdout) before the group is killed.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Longest stdout/stderr line kept; longer lines are cut when logged.
const MAX_LOG_LINE: usize = 2048;
/// Room for the rest of a protocol line (`{"result": ...}`, a progress
/// message) beyond `max_result_bytes`.
pub const PROTOCOL_LINE_MARGIN: usize = 64 * 1024;

pub struct ExecStage {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

impl ExecStage {
    pub fn new(argv: Vec<String>, env: BTreeMap<String, String>) -> Self {
        Self { argv, env }
    }

    fn command(&self, ctx: &StageContext) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .envs(&self.env)
            .env("CONVEYOR_JOB_ID", &ctx.job_id)
            .env("CONVEYOR_JOB_TYPE", &ctx.job_type)
            .env("CONVEYOR_STAGE", &ctx.stage)
            .env("CONVEYOR_ATTEMPT", ctx.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Last resort if this future is dropped mid-run: the leader dies.
            .kill_on_drop(true);
        // SIGTSTP quiets the daemon; `systemctl kill` without
        // `--kill-whom=main` sends it to the stages too, which would then
        // stop (frozen) while the daemon waits for them. An ignored signal
        // stays ignored across exec.
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGTSTP, libc::SIG_IGN);
                Ok(())
            });
        }
        cmd
    }

    async fn run_program(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let mut child = self
            .command(ctx)
            .spawn()
            .map_err(|e| StageError::retryable(format!("cannot start `{}`: {e}", self.argv[0])))?;
        let pgid = child.id().map(|id| id as i32);

        let mut stdin = child.stdin.take();
        let input = ctx.input_json().to_string();
        let feed = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A program that does not read its input closes the pipe:
                // that is its right, not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                let _ = stdin.write_all(b"\n").await;
            }
            drop(stdin);
        };
        let protocol_cap = ctx.max_result_bytes.saturating_add(PROTOCOL_LINE_MARGIN);
        let stdout = read_stdout(child.stdout.take(), ctx, protocol_cap);
        let stderr = log_lines(child.stderr.take(), ctx);
        let output = async {
            let ((), result, last_stderr) = tokio::join!(feed, stdout, stderr);
            (result, last_stderr)
        };
        tokio::pin!(output);

        // Output is read while the program runs (it may wait for its stdin
        // to close, or block on a full stdout pipe).
        let mut finished_output = None;
        let exited = loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => break None,
                out = &mut output, if finished_output.is_none() => finished_output = Some(out),
                status = child.wait() => break Some(status),
            }
        };
        let Some(status) = exited else {
            stop_group(&mut child, pgid, ctx.kill_grace).await;
            return Err(StageError::interrupted());
        };
        let status = status.map_err(|e| StageError::retryable(format!("wait failed: {e}")))?;
        let (result, last_stderr) = match finished_output {
            Some(out) => out,
            None => match tokio::time::timeout(OUTPUT_DRAIN, &mut output).await {
                Ok(out) => out,
                Err(_) => {
                    // Something the program started still holds its output open.
                    if let Some(pgid) = pgid {
                        signal_group(pgid, libc::SIGKILL);
                    }
                    output.await
                }
            },
        };
        if let Some(bytes) = result.overlong {
            return Err(StageError::permanent(format!(
                "printed a protocol line of {bytes} bytes on stdout, over worker.max_result_bytes \
                 ({} bytes) + {PROTOCOL_LINE_MARGIN}",
                ctx.max_result_bytes
            )));
        }
        classify(status, result.result, last_stderr)
    }
}

impl Stage for ExecStage {
    fn run<'a>(&'a self, ctx: &'a StageContext) -> BoxFuture<'a, Result<Value, StageError>> {
        Box::pin(self.run_program(ctx))
    }
}

fn classify(
    status: ExitStatus,
    result: Option<Value>,
    last_stderr: Option<String>,
) -> Result<Value, StageError> {
    use std::os::unix::process::ExitStatusExt;
    let detail = last_stderr.map(|l| format!(": {l}")).unwrap_or_default();
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(result.unwrap_or(Value::Null)),
        (Some(code @ (64 | 65)), _) => Err(StageError::permanent(format!(
            "exited with code {code} (permanent){detail}"
        ))),
        (Some(code), _) => Err(StageError::retryable(format!(
            "exited with code {code}{detail}"
        ))),
        (None, Some(sig)) => Err(StageError::retryable(format!(
            "killed by signal {sig}{detail}"
        ))),
        (None, None) => Err(StageError::retryable(format!("ended abnormally{detail}"))),
    }
}

/// What a stage program printed on stdout.
#[derive(Debug, Default)]
struct Stdout {
    /// The last `result` seen.
    result: Option<Value>,
    /// Size of a protocol line that was too long to be read (the last one).
    overlong: Option<usize>,
}

/// Reads protocol lines, each held up to `protocol_cap` bytes.
async fn read_stdout(
    out: Option<impl AsyncRead + Unpin>,
    ctx: &StageContext,
    protocol_cap: usize,
) -> Stdout {
    let mut seen = Stdout::default();
    let Some(out) = out else {
        return seen;
    };
    let mut lines = BoundedLines::new(out, protocol_cap);
    while let Ok(Some(line)) = lines.next_line().await {
        let line = match line {
            RawLine::Whole(line) => line,
            RawLine::Cut {
                head,
                len,
                protocol,
            } => {
                if protocol {
                    seen.overlong = Some(len);
                }
                log_cut("stdout", &head, len);
                continue;
            }
        };
        let line = String::from_utf8_lossy(&line);
        match parse_line(&line) {
            Line::Result(value) => seen.result = Some(value),
            Line::Progress(pct, message) => ctx.progress(pct, message),
            Line::Text => tracing::info!(stream = "stdout", line = %clip(&line), "stage_output"),
        }
    }
    seen
}

/// One stdout line of the stage protocol.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    /// `{"result": ...}`: the stage's result (the last one wins).
    Result(Value),
    /// `{"progress": N, "message"?: "..."}`, N a finite number.
    Progress(f64, Option<String>),
    /// Anything else: logged as the stage's output.
    Text,
}

/// Reads one stdout line of the stage protocol; any text is some [`Line`].
pub(crate) fn parse_line(line: &str) -> Line {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(mut o)) if o.contains_key("result") => {
            Line::Result(o.remove("result").unwrap_or_default())
        }
        Ok(Value::Object(o)) => match o.get("progress").and_then(Value::as_f64) {
            Some(pct) if pct.is_finite() => {
                let message = o.get("message").and_then(Value::as_str).map(str::to_owned);
                Line::Progress(pct, message)
            }
            _ => Line::Text,
        },
        _ => Line::Text,
    }
}

/// Logs stderr lines; returns the last non-empty one for the error message.
async fn log_lines(err: Option<impl AsyncRead + Unpin>, _ctx: &StageContext) -> Option<String> {
    let err = err?;
    // Nothing on stderr is protocol: every line is kept up to MAX_LOG_LINE.
    let mut lines = BoundedLines::new(err, MAX_LOG_LINE);
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let text = match &line {
            RawLine::Whole(line) => {
                let line = String::from_utf8_lossy(line);
                tracing::info!(stream = "stderr", line = %clip(&line), "stage_output");
                clip(&line).into_owned()
            }
            RawLine::Cut { head, len, .. } => {
                log_cut("stderr", head, *len);
                format!("{}…", String::from_utf8_lossy(head))
            }
        };
        if !text.trim().is_empty() {
            last = Some(text);
        }
    }
    last
}

fn log_cut(stream: &'static str, head: &[u8], len: usize) {
    let head = String::from_utf8_lossy(head);
    tracing::info!(stream, line = %format_args!("{head}…"), bytes = len, "stage_output_cut");
}

/// A line of a stage's output.
#[derive(Debug, PartialEq)]
enum RawLine {
    /// The whole line, without its `\n` (or `\r\n`).
    Whole(Vec<u8>),
    /// A line too long to keep: its first [`MAX_LOG_LINE`] bytes, its
    /// length, and whether it looked like a protocol line (`{` first).
    Cut {
        head: Vec<u8>,
        len: usize,
        protocol: bool,
    },
}

/// Lines read in bounded memory: a line is held whole up to
/// [`MAX_LOG_LINE`] bytes, or up to `protocol_cap` when it starts (after
/// blanks) with `{`; past that only its head is kept and the rest is read
/// and dropped.
struct BoundedLines<R> {
    inner: BufReader<R>,
    protocol_cap: usize,
}

impl<R: AsyncRead + Unpin> BoundedLines<R> {
    fn new(inner: R, protocol_cap: usize) -> Self {
        Self {
            inner: BufReader::new(inner),
            protocol_cap,
        }
    }

    /// The next line; `None` at the end of the stream.
    async fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut kept = Vec::new();
        let mut len = 0usize;
        // Some(protocol?) once the line is cut.
        let mut cut: Option<bool> = None;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                if len == 0 {
                    return Ok(None);
                }
                break;
            }
            let (part, used, ends) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], i + 1, true),
                None => (chunk, chunk.len(), false),
            };
            len = len.saturating_add(part.len());
            if cut.is_none() {
                // Grow by doubling, but never past what may be kept: a line
                // at the cap holds the cap, not twice it.
                let want = kept.len() + part.len();
                if want > kept.capacity() {
                    let limit = self.protocol_cap.max(MAX_LOG_LINE) + 1;
                    let target = (kept.capacity() * 2).max(want).min(limit.max(want));
                    kept.reserve_exact(target - kept.len());
                }
                kept.extend_from_slice(part);
                if kept.len() > MAX_LOG_LINE {
                    let protocol = kept.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
                    if !protocol || kept.len() > self.protocol_cap {
                        kept.truncate(MAX_LOG_LINE);
                        kept.shrink_to_fit();
                        cut = Some(protocol);
                    }
                }
            }
            self.inner.consume(used);
            if ends {
                break;
            }
        }
        Ok(Some(match cut {
            Some(protocol) => RawLine::Cut {
                head: kept,
                len,
                protocol,
            },
            None => {
                if kept.last() == Some(&b'\r') {
                    kept.pop();
                }
                RawLine::Whole(kept)
            }
        }))
    }
}

fn clip(line: &str) -> std::borrow::Cow<'_, str> {
    if line.len() <= MAX_LOG_LINE {
        return line.into();
    }
    let mut end = MAX_LOG_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end]).into()
}

/// SIGTERM to the group, SIGKILL after `grace`, then reap the leader.
async fn stop_group(child: &mut Child, pgid: Option<i32>, grace: Duration) {
    let Some(pgid) = pgid else {
        let _ = child.kill().await;
        return;
    };
    signal_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(pgid, "stage_killed");
    }
    // Children of the leader may outlive it: the group gets SIGKILL anyway.
    signal_group(pgid, libc::SIGKILL);
    let _ = child.wait().await;
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: killpg only sends a signal; the group id is the child's pid,
    // which stays reserved while the group has members.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn protocol_lines_are_results_progress_or_text() {
        assert_eq!(
            parse_line(r#"{"result": {"a": 1}}"#),
            Line::Result(json!({"a": 1}))
        );
        assert_eq!(parse_line(r#"{"result": null}"#), Line::Result(Value::Null));
        assert_eq!(
            parse_line(r#"{"progress": 40, "message": "half"}"#),
            Line::Progress(40.0, Some("half".into()))
        );
        assert_eq!(
            parse_line(r#"{"progress": 1.5}"#),
            Line::Progress(1.5, None)
        );
        for text in [
            "",
            "hello",
            "{",
            r#"{"progress": "40"}"#,
            r#"{"progress": 1e400}"#,
            "[1]",
            "€",
        ] {
            assert_eq!(parse_line(text), Line::Text, "{text}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any text a stage prints: some line, never a panic.
        #[test]
        fn any_stdout_line_parses_without_panic(line in "\\PC{0,200}") {
            let _ = parse_line(&line);
        }

        /// Protocol-shaped lines with arbitrary values: progress is always
        /// finite, a result is what was sent.
        #[test]
        fn protocol_shaped_lines(
            key in prop_oneof![Just("result".to_owned()), Just("progress".to_owned()), Just("message".to_owned()), "\\PC{0,8}"],
            value in prop_oneof![
                any::<f64>().prop_map(|f| f.to_string()),
                "-?[0-9]{1,400}(\\.[0-9]{0,20})?(e-?[0-9]{1,4})?",
                "\\PC{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                Just("null".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()),
            ],
        ) {
            let line = format!("{{{}: {value}}}", serde_json::to_string(&key).unwrap());
            match parse_line(&line) {
                Line::Progress(pct, _) => prop_assert!(pct.is_finite()),
                Line::Result(v) => prop_assert_eq!(key, "result", "{}", v),
                Line::Text => {}
            }
        }
    }

    async fn lines(input: &[u8], cap: usize) -> Vec<RawLine> {
        let mut reader = BoundedLines::new(input, cap);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn stages_start_with_sigtstp_ignored() {
        let stage = ExecStage::new(
            vec![
                "sh".into(),
                "-c".into(),
                r#"printf '{"result": "%s"}\n' "$(sed -n 's/^SigIgn:[[:space:]]*//p' /proc/self/status)""#
                    .into(),
            ],
            BTreeMap::new(),
        );
        let ctx = StageContext::for_test("j1");
        let mask = stage.run(&ctx).await.unwrap();
        let mask = u64::from_str_radix(mask.as_str().unwrap(), 16).unwrap();
        assert_ne!(mask & (1 << (libc::SIGTSTP - 1)), 0, "SigIgn {mask:x}");
    }

    #[tokio::test]
    async fn short_lines_are_whole() {
        let got = lines(b"a\r\n{\"progress\": 5}\n\nlast", 10_000).await;
        assert_eq!(
            got,
            [
                RawLine::Whole(b"a".to_vec()),
                RawLine::Whole(b"{\"progress\": 5}".to_vec()),
                RawLine::Whole(Vec::new()),
                RawLine::Whole(b"last".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn long_noise_is_cut_at_the_log_limit() {
        let mut input = vec![b'x'; 100_000];
        input.extend_from_slice(b"\nafter\n");
        let got = lines(&input, 1 << 20).await;
        assert_eq!(got.len(), 2);
        let RawLine::Cut {
            head,
            len,
            protocol,
        } = &got[0]
        else {
            panic!("{:?}", got[0]);
        };
        assert_eq!(
            (head.len(), *len, *protocol),
            (MAX_LOG_LINE, 100_000, false)
        );
        assert_eq!(got[1], RawLine::Whole(b"after".to_vec()));
    }

    #[tokio::test]
    async fn protocol_lines_are_kept_up_to_the_cap() {
        let line = format!("  {{\"result\": \"{}\"}}", "r".repeat(50_000));
        let input = format!("{line}\n{line}");
        let got = lines(input.as_bytes(), line.len()).await;
        assert_eq!(
            got,
            [
                RawLine::Whole(line.clone().into_bytes()),
                RawLine::Whole(line.clone().into_bytes())
            ]
        );
        let got = lines(input.as_bytes(), line.len() - 1).await;
        for l in &got {
            assert!(
                matches!(l, RawLine::Cut { head, len, protocol: true } if head.len() == MAX_LOG_LINE && *len == line.len()),
                "{l:?}"
            );
        }
        assert_eq!(got.len(), 2);
    }
}
