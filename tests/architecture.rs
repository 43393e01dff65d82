//! The layers of `src/`, checked on every `crate::` path in the code (not
//! in comments): a module may use modules of a lower layer only, so the
//! dependencies form no cycle and point down. A failure names the file, the
//! line and the two layers.
//!
//! ```text
//! 5  cli                                   (used by main.rs only)
//! 4  dashboard  gateway  bench  doctor     the programs behind the commands
//! 3  client  worker                        the library's two faces
//! 2  progress                              progress events and their publisher
//! 1  queue  store  pipeline                Redis, SQLite, stages
//! 0  job  time  config  telemetry  retry  shutdown  http   the ground floor
//! ```
//!
//! `lib.rs` (the crate root, which re-exports the library API) and
//! `main.rs` (the binary, which sees the crate as `conveyor::`) are not
//! layers.

use std::path::{Path, PathBuf};

/// Every top-level module of `src/` and its layer. A new module must be
/// added here, in the layer it belongs to.
const LAYERS: &[(&str, u8)] = &[
    ("cli", 5),
    ("dashboard", 4),
    ("gateway", 4),
    ("bench", 4),
    ("doctor", 4),
    ("client", 3),
    ("worker", 3),
    ("progress", 2),
    ("queue", 1),
    ("store", 1),
    ("pipeline", 1),
    ("job", 0),
    ("time", 0),
    ("config", 0),
    ("telemetry", 0),
    ("retry", 0),
    ("shutdown", 0),
    ("http", 0),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None`: the roots).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(name) => Some(name.to_owned()),
        None => Some(first),
    }
}

/// The code of a line, without its comment (`//`, `///`, `//!`).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Every module named by `crate::NAME` or `crate::{NAME, ...}` in `code`.
fn used_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        // `conveyor_crate::` or `$crate::` are other things.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        // `crate::{a::X, b}` names several modules; `crate::a::{X, Y}` one.
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
            None => vec![rest],
        };
        for name in names {
            let name: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// The violations in one file: `file:line: what`.
fn check_file(src: &Path, file: &Path) -> Vec<String> {
    let Some(module) = module_of(src, file) else {
        return Vec::new();
    };
    let rel = file.strip_prefix(src.parent().unwrap()).unwrap().display();
    let Some(own) = layer(&module) else {
        return vec![format!(
            "{rel}: module `{module}` is not in the layer table of tests/architecture.rs"
        )];
    };
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for used in used_modules(code(line)) {
            if used == module {
                continue;
            }
            match layer(&used) {
                Some(l) if l < own => {}
                Some(l) => out.push(format!(
                    "{rel}:{}: `{module}` (layer {own}) uses `crate::{used}` (layer {l}): dependencies point down only\n    {}",
                    n + 1,
                    line.trim()
                )),
                // A root item (`crate::Worker`, a re-export): the root sits
                // above every layer, so it is not for modules to use.
                None => out.push(format!(
                    "{rel}:{}: `crate::{used}` is not a module of the layer table; name the module that defines it\n    {}",
                    n + 1,
                    line.trim()
                )),
            }
        }
    }
    out
}

#[test]
fn every_dependency_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} files in src/", files.len());
    let violations: Vec<String> = files.iter().flat_map(|f| check_file(&src, f)).collect();
    assert!(
        violations.is_empty(),
        "{} dependency(ies) against the layers:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn only_main_uses_the_command_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let main = std::fs::read_to_string(root.join("src/main.rs")).unwrap();
    assert!(
        main.contains("conveyor::cli"),
        "main.rs runs the command line"
    );
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let users: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(root.join("src/cli")) && !f.ends_with("main.rs"))
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .any(|l| used_modules(code(l)).iter().any(|m| m == "cli"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        users.is_empty(),
        "crate::cli used outside main.rs: {users:?}"
    );
}

/// The checker itself: it sees what it must and nothing else.
#[test]
fn the_checker_reads_paths_and_skips_comments() {
    assert_eq!(used_modules("use crate::queue::Broker;"), ["queue"]);
    assert_eq!(
        used_modules("use crate::{job::Job, time};"),
        ["job", "time"]
    );
    assert_eq!(
        used_modules("let t = crate::time::now_ms() + crate::x::y();"),
        ["time", "x"]
    );
    assert!(used_modules(code("/// see [`crate::cli`]")).is_empty());
    assert!(used_modules(code("let a = 1; // crate::cli")).is_empty());
    assert!(used_modules("$crate::x").is_empty());

    // A cycle is caught: a low layer that names a higher one fails.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("queue")).unwrap();
    let file = src.join("queue/mod.rs");
    std::fs::write(&file, "use crate::cli::Failure;\nuse crate::job::Job;\n").unwrap();
    let found = check_file(&src, &file);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("src/queue/mod.rs:1"), "{found:?}");
    assert!(found[0].contains("uses `crate::cli`"), "{found:?}");
    // And a module missing from the table is named.
    let file = src.join("newthing.rs");
    std::fs::write(&file, "").unwrap();
    assert!(check_file(&src, &file)[0].contains("not in the layer table"));
}
