#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), builds the host and runs
# `opensandbox serve` in the foreground on its embedded defaults
# (settings from the environment or .env; see `opensandbox serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup.sh)"
./scripts/build-agent.sh >/dev/null
cargo build --release -p opensandbox
export AGENT_BINARY="${AGENT_BINARY:-$PWD/target/agent/opensandbox-agent}"
exec ./target/release/opensandbox serve "$@"
