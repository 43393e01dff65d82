//! docs/reference/log-events.md lists every event conveyor logs: each
//! `tracing` call in `src/` (outside tests) has a row whose first cell is
//! its message (`event` in JSON), whose second cell names its level and
//! whose third names each of its fields.

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

#[test]
fn every_logged_event_is_documented_with_its_level() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/reference/log-events.md")).unwrap();
    // (event, level, fields) of each table row.
    let rows: Vec<(String, String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| "))
        .filter_map(|l| {
            let mut cells = l.split('|').skip(1).map(str::trim);
            let first = cells.next()?.trim_matches('`').to_owned();
            let level = cells.next()?.to_owned();
            Some((first, level, cells.next().unwrap_or_default().to_owned()))
        })
        .collect();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let calls: Vec<Call> = files.iter().flat_map(|f| calls_in(f)).collect();
    assert!(
        calls.len() > 50,
        "the scan finds the logging calls: {calls:?}"
    );
    let missing: Vec<String> = calls
        .iter()
        .filter(|c| {
            !rows.iter().any(|(event, level, fields)| {
                *event == c.message
                    && level.contains(c.level)
                    && c.fields.iter().all(|f| fields.contains(&format!("`{f}`")))
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
