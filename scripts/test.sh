#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), then runs every check and test:
# formatting, clippy, unit tests, and the end-to-end suites that drive real
# host processes against the real dockerd and Btrfs.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup.sh)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build -p opensandbox
cargo test --workspace -- --test-threads "${TEST_THREADS:-2}"
