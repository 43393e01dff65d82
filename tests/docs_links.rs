//! The documentation's relative links point at files that exist: every
//! `[text](path)` and `[text](path#anchor)` in README.md, docs/**/*.md and
//! examples/**/README.md. Web links, mail links and links within a page
//! (`#anchor`) are not checked; neither are anchors. Links inside code
//! (fenced blocks and `inline code`) are not links, so they are skipped.

use std::fs;
use std::path::{Path, PathBuf};

const CRATE_ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A link found in a Markdown file: its 1-based line and its target as written.
#[derive(Debug, PartialEq)]
struct Link {
    line: usize,
    target: String,
}

/// The Markdown files whose links are checked.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    collect(&root.join("docs"), &mut files, &|p| {
        p.extension().is_some_and(|e| e == "md")
    });
    collect(&root.join("examples"), &mut files, &|p| {
        p.file_name().is_some_and(|n| n == "README.md")
    });
    files.sort();
    files
}

/// Files under `dir` that `keep` accepts, skipping hidden directories and
/// installed dependencies (`node_modules` holds other projects' READMEs).
fn collect(dir: &Path, out: &mut Vec<PathBuf>, keep: &dyn Fn(&Path) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "node_modules" {
                collect(&path, out, keep);
            }
        } else if keep(&path) {
            out.push(path);
        }
    }
}

/// Blanks out `inline code` so that a `](` inside it is not taken for a link.
/// Backticks inside a link's text (`` [`file`](file) ``) leave the link intact.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Every inline link target in `text`, outside fenced code blocks.
fn links(text: &str) -> Vec<Link> {
    let mut found = Vec::new();
    let mut in_fence = false;
    for (i, raw) in text.lines().enumerate() {
        if raw.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = without_code_spans(raw);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            // `[text](path "title")`: the target ends at the first space.
            let target = after[..end].split_whitespace().next().unwrap_or("");
            let target = target.trim_start_matches('<').trim_end_matches('>');
            found.push(Link {
                line: i + 1,
                target: target.to_owned(),
            });
            rest = &after[end..];
        }
    }
    found
}

/// Whether a link target is a path in this repository that must exist.
fn is_local(target: &str) -> bool {
    !(target.starts_with("http:")
        || target.starts_with("https:")
        || target.starts_with("mailto:")
        || target.starts_with('#'))
}

/// The broken links of one file, as `file:line: target`.
fn broken_links(root: &Path, file: &Path, text: &str) -> Vec<String> {
    let dir = file.parent().unwrap_or(root);
    links(text)
        .into_iter()
        .filter(|l| is_local(&l.target))
        .filter(|l| {
            let path = l.target.split('#').next().unwrap_or("");
            let resolved = match path.strip_prefix('/') {
                Some(from_root) => root.join(from_root),
                None => dir.join(path),
            };
            path.is_empty() || !resolved.exists()
        })
        .map(|l| {
            let shown = file.strip_prefix(root).unwrap_or(file).display();
            format!("{shown}:{}: {}", l.line, l.target)
        })
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_points_at_a_file() {
    let root = Path::new(CRATE_ROOT);
    let files = documents(root);
    assert!(
        files.iter().any(|f| f.ends_with("docs/README.md")),
        "no docs/README.md among {files:?}"
    );
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        checked += links(&text).iter().filter(|l| is_local(&l.target)).count();
        broken.extend(broken_links(root, file, &text));
    }
    assert!(checked > 0, "no relative links found in {files:?}");
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the docs:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_link_finder_sees_links_and_skips_code() {
    let text = "\
See [a](docs/a.md) and ![b](b.png \"title\") and [`c.rs`](../c.rs#L1).
`not [a](link)` and [web](https://example.com) and [here](#anchor).
```sh
echo '[x](not-a-link)'
```
[after](fence.md)";
    let found: Vec<(usize, String)> = links(text)
        .into_iter()
        .map(|l| (l.line, l.target))
        .collect();
    let expected = [
        (1, "docs/a.md"),
        (1, "b.png"),
        (1, "../c.rs#L1"),
        (2, "https://example.com"),
        (2, "#anchor"),
        (6, "fence.md"),
    ]
    .map(|(n, t)| (n, t.to_owned()));
    assert_eq!(found, expected);
    let local: Vec<String> = links(text)
        .into_iter()
        .filter(|l| is_local(&l.target))
        .map(|l| l.target)
        .collect();
    assert_eq!(local, ["docs/a.md", "b.png", "../c.rs#L1", "fence.md"]);
}

#[test]
fn a_missing_target_is_reported_with_file_and_line() {
    let root = Path::new(CRATE_ROOT);
    let file = root.join("docs/README.md");
    let text = "fine: [readme](../README.md)\n\nbroken: [gone](no-such-page.md#x)\n";
    assert_eq!(
        broken_links(root, &file, text),
        ["docs/README.md:3: no-such-page.md#x"]
    );
}
