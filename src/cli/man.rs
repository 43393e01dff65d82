//! `conveyor man --out DIR` (hidden): writes the manual pages, made from
//! the same clap definitions as `--help`, so they cannot drift from it:
//! `conveyor.1` and one page per subcommand (`conveyor-worker.1`,
//! `conveyor-dead-purge.1`, ...). The Debian package ships them
//! (`scripts/package-deb.sh`).

use std::path::Path;

use clap::CommandFactory;

use super::{Cli, CliResult, Failure};

pub fn write_pages(out: &Path) -> CliResult {
    std::fs::create_dir_all(out)
        .map_err(|e| Failure::other(format!("cannot create {}: {e}", out.display())))?;
    clap_mangen::generate_to(Cli::command(), out)
        .map_err(|e| Failure::other(format!("cannot write the pages to {}: {e}", out.display())))?;
    let mut count = 0;
    if let Ok(entries) = std::fs::read_dir(out) {
        count = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
            .count();
    }
    println!("{count} manual page(s) in {}", out.display());
    Ok(())
}
