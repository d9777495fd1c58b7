#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), then runs every check and test:
# formatting, clippy, unit tests, and the end-to-end suites that drive real
# host processes against the real dockerd and Btrfs.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup.sh)"
eval "$(./scripts/install-s3s-fs.sh)"
./scripts/build-plugins.sh
./scripts/build-agent.sh
# Base root filesystems of the namespaces runtime plugin (from the Docker images).
./scripts/build-rootfs.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Everything the tests need, built once with the features the whole workspace unifies on.
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets -- --test-threads "${TEST_THREADS:-2}" 2>&1 | tee "$log"
# The plugin SDK's and the plugins' own unit tests (native; their own workspaces).
for ws in sdk plugins tests/plugins; do
    (cd "$ws" && CARGO_TARGET_DIR="$OLDPWD/target/native-plugins" cargo test --locked --quiet) 2>&1 | tee -a "$log"
done
# The same end-to-end suites again against the namespaces runtime plugin
# (tests of Docker-only behaviour say so and return early).
OPENSANDBOX_TEST_RUNTIME=namespaces cargo test -p opensandbox-e2e \
    --test seed --test snapshots --test run --test auth --test bad_input \
    --test processes --test files --test transfer -- --test-threads "${TEST_THREADS:-2}" 2>&1 | tee -a "$log"
# The transfer suite again against s3s-fs, the S3 server that checks signatures.
OPENSANDBOX_TEST_S3=s3s-fs cargo test -p opensandbox-e2e --test transfer \
    -- --test-threads "${TEST_THREADS:-2}" 2>&1 | tee -a "$log"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
