//! docs/reference/log-events.md lists every event conveyor logs: each
//! `tracing` call in `src/` (outside tests) has a row whose first cell is
//! its message (`event` in JSON), a snake_case name, whose second cell
//! names its level, whose third names each of its fields and whose fourth
//! says when it happens. Every row names an event that is logged.

use std::path::{Path, PathBuf};

const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// One logging call: where, its level, its message and its fields.
#[derive(Debug)]
struct Call {
    at: String,
    level: &'static str,
    message: String,
    fields: Vec<String>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text of a macro call's arguments starting at `open` (just after its
/// `(`), up to the matching `)`, string literals skipped over.
fn arguments(text: &str, open: usize) -> &str {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (1, open);
    while depth > 0 && i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    &text[open..i.saturating_sub(1)]
}

/// The arguments of a call split at its top-level commas.
fn split_top(args: &str) -> Vec<&str> {
    let bytes = args.as_bytes();
    let (mut parts, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(args[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(args[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// The field names of a call: `name = value`, `name` alone, `%name`,
/// `?name`; not its message or its `target:`.
fn field_names(args: &str) -> Vec<String> {
    split_top(args)
        .into_iter()
        .filter(|p| !p.starts_with('"') && !p.starts_with("target:"))
        .map(|p| {
            let name = p.split('=').next().unwrap_or_default().trim();
            name.trim_start_matches(['%', '?'])
                .trim_start_matches("r#")
                .to_owned()
        })
        .collect()
}

/// The last string literal of a call's arguments: its message.
fn last_literal(args: &str) -> Option<String> {
    let end = args.rfind('"')?;
    let start = args[..end].rfind('"')?;
    Some(args[start + 1..end].to_owned())
}

fn calls_in(path: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(path).expect("read source");
    // Unit tests log freely; only the code's events are documented.
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String = code
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut calls = Vec::new();
    for level in LEVELS {
        let needle = format!("{level}!(");
        for (i, _) in code.match_indices(&needle) {
            let before = code[..i].chars().next_back().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' {
                continue;
            }
            let args = arguments(&code, i + needle.len());
            let line = code[..i].lines().count();
            if let Some(message) = last_literal(args) {
                calls.push(Call {
                    at: format!("{}:{line}", path.display()),
                    level,
                    message,
                    fields: field_names(args),
                });
            }
        }
    }
    calls
}

/// One table row of the doc: event, level, fields, description.
#[derive(Debug)]
struct Row {
    event: String,
    level: String,
    fields: String,
    description: String,
}

fn doc_rows(doc: &str) -> Vec<Row> {
    doc.lines()
        .filter(|l| l.starts_with("| "))
        .filter(|l| !l.starts_with("| event |") && !l.starts_with("| --- |"))
        .map(|l| {
            let cells: Vec<&str> = l
                .trim_end()
                .trim_end_matches('|')
                .split('|')
                .skip(1)
                .map(str::trim)
                .collect();
            assert_eq!(cells.len(), 4, "a row has 4 cells: {l}");
            assert!(
                cells[0].starts_with('`') && cells[0].ends_with('`'),
                "the event is in backquotes: {l}"
            );
            assert!(!cells[3].is_empty(), "a row says when it happens: {l}");
            Row {
                event: cells[0].trim_matches('`').to_owned(),
                level: cells[1].to_owned(),
                fields: cells[2].to_owned(),
                description: cells[3].to_owned(),
            }
        })
        .collect()
}

/// `[a-z][a-z0-9_]*`: what operators grep and alert on.
fn is_snake_case(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn all_calls() -> Vec<Call> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let calls: Vec<Call> = files.iter().flat_map(|f| calls_in(f)).collect();
    assert!(
        calls.len() > 50,
        "the scan finds the logging calls: {calls:?}"
    );
    calls
}

fn doc() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join("docs/reference/log-events.md")).unwrap()
}

#[test]
fn snake_case_check_tells_names_from_sentences() {
    for good in ["job_started", "wal_restarted", "a", "http2_ready"] {
        assert!(is_snake_case(good), "{good}");
    }
    for bad in [
        "",
        "Fetch failed",
        "fetch failed",
        "Job_started",
        "_x",
        "9x",
        "x-y",
        "a:b",
    ] {
        assert!(!is_snake_case(bad), "{bad}");
    }
}

#[test]
fn every_event_name_is_snake_case() {
    let sentences: Vec<String> = all_calls()
        .iter()
        .filter(|c| !is_snake_case(&c.message))
        .map(|c| format!("{} {} {:?}", c.at, c.level, c.message))
        .collect();
    assert!(
        sentences.is_empty(),
        "events must be snake_case names ([a-z][a-z0-9_]*), explained in the docs' description column:\n{}",
        sentences.join("\n")
    );
    let rows = doc_rows(&doc());
    assert!(rows.len() > 50, "the doc's rows are found: {rows:?}");
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !is_snake_case(&r.event))
        .map(|r| r.event.as_str())
        .collect();
    assert!(bad.is_empty(), "documented names not snake_case: {bad:?}");
}

#[test]
fn every_documented_event_is_logged() {
    let calls = all_calls();
    let stale: Vec<String> = doc_rows(&doc())
        .into_iter()
        .filter(|r| !calls.iter().any(|c| c.message == r.event))
        .map(|r| format!("{} ({})", r.event, r.description))
        .collect();
    assert!(
        stale.is_empty(),
        "documented in docs/reference/log-events.md but logged nowhere in src/:\n{}",
        stale.join("\n")
    );
}

#[test]
fn every_logged_event_is_documented_with_its_level() {
    let rows = doc_rows(&doc());
    let calls = all_calls();
    let missing: Vec<String> = calls
        .iter()
        .filter(|c| {
            !rows.iter().any(|r| {
                r.event == c.message
                    && r.level.contains(c.level)
                    && c.fields
                        .iter()
                        .all(|f| r.fields.contains(&format!("`{f}`")))
            })
        })
        .map(|c| format!("{} {} {:?} {:?}", c.at, c.level, c.message, c.fields))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/reference/log-events.md with this level and these fields:\n{}",
        missing.join("\n")
    );
}
