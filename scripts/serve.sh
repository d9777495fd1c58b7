#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), builds the host, the agent and the
# namespaces runtime plugin (with its base root filesystem), and runs
# `opensandbox serve` in the foreground on its embedded defaults with
# deploy/plugins.toml (settings from the environment or .env; see
# `opensandbox serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup.sh)"
./scripts/build-agent.sh >/dev/null
# The namespaces runtime plugin and its base root filesystem (from DOCKER_IMAGE).
./scripts/build-plugins.sh namespaces >/dev/null
./scripts/build-rootfs.sh >/dev/null
cargo build --release -p opensandbox
export AGENT_BINARY="${AGENT_BINARY:-$PWD/target/agent/opensandbox-agent}"
# A PLUGINS_CONFIG in the environment or in .env wins over the default file.
if [ -z "${PLUGINS_CONFIG:-}" ] && ! grep -qs '^PLUGINS_CONFIG=' .env; then
  export PLUGINS_CONFIG="$PWD/deploy/plugins.toml"
fi
exec ./target/release/opensandbox serve "$@"
