//! Asking the operator before a bulk delete (`dead purge --all`).
//!
//! Only a person at a terminal is asked: when stdin or stderr is not a
//! terminal (a script, cron, a pipe) the command proceeds, as it was told.

use std::io::{BufRead, IsTerminal, Write};

/// Stdin and stderr are both terminals: someone can read the question and
/// answer it.
pub fn on_terminal() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Writes `question [y/N] ` to stderr and reads one line: true only for
/// `y` or `yes` (any case). End of input or a read error is a no.
pub fn ask(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(_) => is_yes(&line),
        Err(_) => false,
    }
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::is_yes;

    #[test]
    fn only_y_or_yes_is_a_yes() {
        for yes in ["y\n", "Y", " yes \r\n", "YES"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yep", "y es", "sure"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }
}
