//! `conveyor doctor`: one line per check, ✅ or ❌, exit 1 if any fails.

use serde_json::json;

use super::{Cli, CliResult, Failure};

pub async fn run(cli: &Cli, json: bool) -> CliResult {
    let config = cli.load_config().map_err(|f| f.message);
    if let Ok(config) = &config {
        for notice in config.notices() {
            eprintln!("conveyor: {notice}");
        }
    }
    let report = crate::doctor::run(config, cli.global.config.as_deref()).await;
    let failed = report.0.iter().filter(|c| !c.ok).count();
    if json {
        println!("{}", json!({"ok": failed == 0, "checks": report.0}));
    } else {
        for c in &report.0 {
            println!(
                "{} {:<12} {}",
                if c.ok { "✅" } else { "❌" },
                c.name,
                c.detail
            );
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::other(format!("{failed} check(s) failed")))
    }
}
