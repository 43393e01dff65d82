//! Fuzzes the remote-worker API (`/api/v1`) from its OpenAPI document with
//! schemathesis, through `scripts/fuzz_api.sh` (a private redis-server, the
//! real binary as `conveyor gateway`, every schemathesis check with
//! positive and negative data, then the server's and conveyor's state).
//! A few test cases per operation only; run the script by hand for more
//! (`scripts/fuzz_api.sh -n 100`). Skips itself when schemathesis cannot be
//! installed (no python3 venv, or no network to PyPI): the script exits 3.

use std::process::Command;
use std::time::Instant;

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "5";
/// Hard limit on the schemathesis run, in seconds.
const SECONDS: &str = "300";
/// The script's exit code when schemathesis cannot be installed.
const CANNOT_INSTALL: i32 = 3;

#[test]
fn api_conforms_to_its_openapi_document_under_schemathesis() {
    let root = env!("CARGO_MANIFEST_DIR");
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/fuzz_api.sh")
        .args(["-n", MAX_EXAMPLES, "-s", SECONDS])
        .current_dir(root)
        // The binary cargo built for this test run: no nested cargo build.
        .env("FUZZ_API_BIN", env!("CARGO_BIN_EXE_conveyor"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run scripts/fuzz_api.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(CANNOT_INSTALL) {
        println!(
            "skipping: schemathesis cannot be installed here (python3 venv or pip from PyPI): {}",
            stderr.trim()
        );
        return;
    }
    let summary = stdout
        .find("=== fuzz_api summary")
        .map_or("(no summary)", |i| &stdout[i..]);
    println!("{summary}");
    println!("fuzz_api: {:.0} s", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "scripts/fuzz_api.sh failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(stdout.contains("RESULT: PASS"), "{stdout}");
}
