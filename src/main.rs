//! The `conveyor` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use conveyor::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    conveyor::telemetry::init(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("conveyor")
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("conveyor: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(conveyor::cli::run(cli))
}
