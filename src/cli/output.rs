//! Which commands answer in JSON when they fail.
//!
//! A command run with `--json` that fails prints `{"error", "exit_code"}` on
//! stdout as well as its message on stderr, so a script parsing stdout sees
//! one object either way. `watch --json` (a stream of progress messages),
//! `doctor --json` (its checks say what failed) and `bench` keep their own
//! output.

use super::Command;
use super::admin::DeadCommand;

/// `command` was given `--json` and reports a failure as a JSON object.
pub fn json_errors(command: &Command) -> bool {
    match command {
        Command::Enqueue(args) => args.json,
        Command::Jobs(args) => args.json,
        Command::Job { json, .. }
        | Command::Status { json }
        | Command::Cancel { json, .. }
        | Command::Retry { json, .. }
        | Command::Cleanup { json, .. } => *json,
        Command::Dead(
            DeadCommand::List { json, .. }
            | DeadCommand::Retry { json, .. }
            | DeadCommand::Purge { json, .. },
        ) => *json,
        _ => false,
    }
}
