#!/usr/bin/env bash
# Build the Debian package of conveyor with cargo-deb (the assets are listed
# in Cargo.toml, [package.metadata.deb]): a release build, then the man pages
# (`conveyor man`) and the shell completions (`conveyor completions`) made
# from that binary into $TARGET/release/deb-assets/, then
# `cargo deb --no-build`. Prints the path of the .deb on the last line.
#
# Usage: scripts/package-deb.sh [-b BINARY] [-o DIR] [-f]
#   -b BINARY  package this conveyor binary (e.g. target/debug/conveyor)
#              instead of building a release. It is linked (or copied) to
#              $CARGO_TARGET_DIR/release/conveyor, where cargo-deb takes it,
#              so CARGO_TARGET_DIR must name a directory of its own.
#   -o DIR     write the .deb there (default: $TARGET/debian/)
#   -f         fast: strip the binary and compress less (a larger .deb; for tests)
# Needs cargo-deb (cargo install cargo-deb --locked; .ci/run installs it).
set -euo pipefail

. "$(dirname -- "${BASH_SOURCE[0]}")/lib/args.sh"

binary=""
out=""
fast=0
while getopts ":b:o:fh" opt; do
    case "$opt" in
        b) binary=$OPTARG ;;
        o) out=$OPTARG ;;
        f) fast=1 ;;
        h) usage; exit 0 ;;
        *) bad_option "$opt" ;;
    esac
done
shift $((OPTIND - 1))
no_arguments "$@"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "error: cargo-deb is not installed: cargo install cargo-deb --locked" >&2
    exit 1
fi

# Relative -b and -o are relative to the caller's directory.
here=$PWD
abs() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$here/$1" ;; esac; }
[ -z "$binary" ] || binary=$(abs "$binary")
[ -z "$out" ] || out=$(abs "$out")

cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
target=$(abs "${CARGO_TARGET_DIR:-target}")
bin=$target/release/conveyor

if [ -z "$binary" ]; then
    echo "--- cargo build --release --locked" >&2
    cargo build --release --locked
else
    [ -x "$binary" ] || { echo "error: -b $binary is not an executable file" >&2; exit 2; }
    # Never overwrite the release binary of the checkout with another build.
    if [ -z "${CARGO_TARGET_DIR:-}" ] || [ "$target" -ef "$PWD/target" ]; then
        echo "error: -b needs CARGO_TARGET_DIR set to a directory of its own (not ./target)" >&2
        exit 2
    fi
    mkdir -p "$target/release"
    if ! [ "$binary" -ef "$bin" ]; then
        rm -f "$bin"
        ln "$binary" "$bin" 2>/dev/null || cp "$binary" "$bin"
    fi
fi

assets=$target/release/deb-assets
echo "--- man pages and completions into $assets" >&2
rm -rf "$assets"
mkdir -p "$assets/completions"
"$bin" man --out "$assets/man" >&2
# Compressed here: cargo-deb compresses man pages, but not the ones it takes
# from the target directory. -n: no name or time inside, for reproducibility.
gzip -9n "$assets"/man/*.1
"$bin" completions bash >"$assets/completions/conveyor.bash"
"$bin" completions zsh >"$assets/completions/_conveyor"
"$bin" completions fish >"$assets/completions/conveyor.fish"

args=(--no-build)
[ -z "$out" ] || args+=(--output "$out")
[ "$fast" -eq 0 ] || args+=(--fast --strip)
echo "--- cargo deb ${args[*]}" >&2
cargo deb "${args[@]}"
