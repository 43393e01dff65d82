//! The `conveyor` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use conveyor::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.prints_and_exits() {
        // `conveyor jobs | head`: end quietly when the reader goes away,
        // as other command-line tools do, instead of a panic on EPIPE.
        // Not for the daemon, the dashboard or the bench: they write to
        // stage stdins and sockets, where EPIPE is an error to handle.
        // SAFETY: set before any other thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    cli.init_logging();
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
    let code = runtime.block_on(conveyor::cli::run(cli));
    // A daemon whose drain was abandoned past its bound may leave tasks
    // behind; they must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
