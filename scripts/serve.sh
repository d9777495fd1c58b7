#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), builds the host and runs
# `opensandbox serve` in the foreground on its embedded defaults
# (settings from the environment or .env; see `opensandbox serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup.sh)"
cargo build --release -p opensandbox
exec ./target/release/opensandbox serve "$@"
