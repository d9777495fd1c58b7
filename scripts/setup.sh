#!/usr/bin/env bash
# Prepares this machine for OpenSandbox, idempotently:
#   1. installs what is missing (docker.io, btrfs-progs, debootstrap, tini, curl,
#      bubblewrap);
#   2. mounts a loop-backed Btrfs at DOCKER_BTRFS_PATH unless a Btrfs is there;
#   3. starts our own dockerd (socket /run/opensandbox/docker.sock) with its data
#      root on that Btrfs, --storage-driver btrfs and no networking of its own
#      (--bridge=none --iptables=false --ip6tables=false);
#   4. builds a small local base image when DOCKER_IMAGE cannot be pulled;
#   5. installs moto's S3-compatible server (moto_server, pinned), which the
#      snapshot transfer tests start on 127.0.0.1, into a virtualenv.
# Prints the `export DOCKER_HOST=...` line that the service needs, and the
# `export MOTO_SERVER=...` line of the tests, last.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && set -a && . ./.env && set +a

DOCKER_BTRFS_PATH="${DOCKER_BTRFS_PATH:-/var/lib/sandbox-btrfs}"
DOCKER_IMAGE="${DOCKER_IMAGE:-ubuntu:22.04}"
BTRFS_IMAGE_FILE="${BTRFS_IMAGE_FILE:-${DOCKER_BTRFS_PATH%/}.img}"
BTRFS_IMAGE_SIZE="${BTRFS_IMAGE_SIZE:-40G}"
SOCK_DIR=/run/opensandbox
export DOCKER_HOST="unix://$SOCK_DIR/docker.sock"

log() { echo "setup: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v tini >/dev/null || need+=(tini)
# The namespaces runtime plugin runs its sandboxes under bubblewrap.
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v curl >/dev/null || need+=(curl)
command -v zstd >/dev/null || need+=(zstd)
# The agent is linked statically against glibc (scripts/build-agent.sh).
command -v cc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$(stat -f -c %T "$DOCKER_BTRFS_PATH" 2>/dev/null)" != btrfs ]; then
  log "mounting a $BTRFS_IMAGE_SIZE loop-backed Btrfs at $DOCKER_BTRFS_PATH ($BTRFS_IMAGE_FILE, sparse)"
  as_root mkdir -p "$DOCKER_BTRFS_PATH"
  if [ ! -s "$BTRFS_IMAGE_FILE" ]; then
    as_root truncate -s "$BTRFS_IMAGE_SIZE" "$BTRFS_IMAGE_FILE"
    as_root mkfs.btrfs -q "$BTRFS_IMAGE_FILE"
  fi
  as_root mount -o loop "$BTRFS_IMAGE_FILE" "$DOCKER_BTRFS_PATH"
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd on $DOCKER_HOST (data root $DOCKER_BTRFS_PATH/docker, btrfs driver)"
  as_root mkdir -p "$SOCK_DIR" "$DOCKER_BTRFS_PATH/docker"
  # A dockerd left dead by a previous run leaves its pid file behind.
  as_root rm -f "$SOCK_DIR/docker.pid"
  as_root sh -c "nohup dockerd \
      --host '$DOCKER_HOST' \
      --data-root '$DOCKER_BTRFS_PATH/docker' \
      --exec-root '$SOCK_DIR/exec' \
      --pidfile '$SOCK_DIR/docker.pid' \
      --storage-driver btrfs \
      --bridge=none --iptables=false --ip6tables=false \
      >'$SOCK_DIR/dockerd.log' 2>&1 &"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -20 "$SOCK_DIR/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
fi
driver=$(docker info --format '{{.Driver}}')
[ "$driver" = btrfs ] || { log "the engine at $DOCKER_HOST uses $driver, not btrfs"; exit 1; }

if ! docker image inspect "$DOCKER_IMAGE" >/dev/null 2>&1; then
  if ! timeout 20 docker pull "$DOCKER_IMAGE" >/dev/null 2>&1; then
    log "$DOCKER_IMAGE cannot be pulled here; building a local stand-in"
    ./scripts/build-base-image.sh "$DOCKER_IMAGE"
  fi
fi
# moto 5.0.x: from 5.1 on, moto answers CompleteMultipartUpload with a
# <CompleteMultipartUploadResponse> root that aws-sdk-s3 refuses. (s3s-fs, the
# Rust alternative, is installed by scripts/install-s3s-fs.sh.) MOTO_SERVER overrides.
MOTO_VERSION=5.0.28
MOTO_VENV=/var/cache/opensandbox/moto-$MOTO_VERSION
if [ -z "${MOTO_SERVER:-}" ]; then
  MOTO_SERVER=$MOTO_VENV/bin/moto_server
  if [ ! -x "$MOTO_SERVER" ]; then
    log "installing moto[server]==$MOTO_VERSION into $MOTO_VENV (the S3 server of the tests)"
    as_root mkdir -p /var/cache/opensandbox
    as_root python3 -m venv "$MOTO_VENV"
    as_root "$MOTO_VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION" >&2
  fi
fi
log "ready"
echo "export DOCKER_HOST=$DOCKER_HOST"
echo "export MOTO_SERVER=$MOTO_SERVER"
