#!/usr/bin/env bash
# Installs s3s-fs (pinned), the second S3-compatible server of the transfer tests and the
# benchmark's server, from crates.io with the lock file it ships, into
# /var/cache/opensandbox/s3s-fs-<version>. Idempotent. Prints `export S3S_FS=...` last.
#
# Why a second server beside moto (scripts/setup.sh): s3s-fs checks every request's SigV4
# signature (moto accepts any) and keeps objects in files, as a real store does. It is not
# faster than moto for exports here: on two cores both are bound by their own CPU (README,
# Benchmarks). 0.14: from 0.15 on it needs rustc 1.96. S3S_FS overrides.
set -euo pipefail

S3S_FS_VERSION=0.14.0
S3S_FS_ROOT=/var/cache/opensandbox/s3s-fs-$S3S_FS_VERSION
if [ -z "${S3S_FS:-}" ]; then
  S3S_FS=$S3S_FS_ROOT/bin/s3s-fs
  if [ ! -x "$S3S_FS" ]; then
    echo "install-s3s-fs: building s3s-fs $S3S_FS_VERSION into $S3S_FS_ROOT (a few minutes)" >&2
    mkdir -p /var/cache/opensandbox
    cargo install --quiet --locked "s3s-fs@$S3S_FS_VERSION" --features binary \
      --root "$S3S_FS_ROOT" >&2
  fi
fi
echo "export S3S_FS=$S3S_FS"
