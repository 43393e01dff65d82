//! `conveyor doctor`: one line per check, ✅ or ❌, exit 1 if any fails;
//! with `--config-only`, the config line alone, exit 2 if it fails.

use serde_json::json;

use super::{Cli, CliResult, Failure};

pub async fn run(cli: &Cli, json: bool, config_only: bool) -> CliResult {
    let source = cli.config_source();
    let config = cli.load_config().map_err(|f| f.message);
    if let Ok(config) = &config {
        for notice in config.notices() {
            eprintln!("conveyor: {notice}");
        }
    }
    let report = if config_only {
        crate::doctor::run_config_only(config, &source)
    } else {
        crate::doctor::run(config, &source).await
    };
    let failed = report.0.iter().filter(|c| !c.ok).count();
    if json {
        println!(
            "{}",
            json!({"ok": failed == 0, "config_file": source, "checks": report.0})
        );
    } else {
        for c in &report.0 {
            println!(
                "{} {:<12} {}",
                match (c.ok, c.warning) {
                    (true, false) => "✅",
                    (true, true) => "⚠️",
                    (false, _) => "❌",
                },
                c.name,
                c.detail
            );
        }
    }
    if failed == 0 {
        Ok(())
    } else if config_only {
        Err(Failure::usage("the config does not load"))
    } else {
        Err(Failure::other(format!("{failed} check(s) failed")))
    }
}
