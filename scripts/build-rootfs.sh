#!/usr/bin/env bash
# Exports Docker images into the base root filesystems of the namespaces runtime
# plugin (plugins/namespaces): one Btrfs subvolume per image,
#   $DOCKER_BTRFS_PATH/runtimes/$NAMESPACES_PLUGIN_NAME/images/<slug>
# which the plugin snapshots for every new sandbox of that image. The slug is the
# image reference with ":latest" appended when it has no tag (a tag is a ':' after
# the last '/'), then every byte outside [A-Za-z0-9._-] replaced by '_'
# (ubuntu:22.04 -> ubuntu_22.04); the plugin computes the same one.
#
# Idempotent: an image whose ID matches the marker beside its subvolume
# (images/.<slug>.image-id) is skipped. Otherwise the image's filesystem is
# exported from a created (never started) container into a temporary subvolume,
# which then replaces the old one; sandboxes made from the old one keep theirs.
# Prints each destination.
#
# Usage: scripts/build-rootfs.sh [image ...]
#   (always $DOCKER_IMAGE, default ubuntu:22.04, plus every image given)
# Environment: DOCKER_HOST (default unix:///run/opensandbox/docker.sock, as
# scripts/setup.sh exports it), DOCKER_BTRFS_PATH (default /var/lib/sandbox-btrfs),
# NAMESPACES_PLUGIN_NAME (the plugin's name in the plugins file, default namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && set -a && . ./.env && set +a

export DOCKER_HOST="${DOCKER_HOST:-unix:///run/opensandbox/docker.sock}"
DOCKER_BTRFS_PATH="${DOCKER_BTRFS_PATH:-/var/lib/sandbox-btrfs}"
DOCKER_IMAGE="${DOCKER_IMAGE:-ubuntu:22.04}"
NAME="${NAMESPACES_PLUGIN_NAME:-namespaces}"
IMAGES="$DOCKER_BTRFS_PATH/runtimes/$NAME/images"
# Temporary subvolumes: on the same filesystem (so that mv is a rename) but outside
# every plugin's root (plugin names never start with a dot).
WORK="$DOCKER_BTRFS_PATH/runtimes/.build-rootfs"

log() { echo "build-rootfs: $*" >&2; }
die() { log "$*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The plugin's slug rule (plugins/namespaces/src/slug.rs), byte by byte.
slug() {
  local ref=$1
  [[ ${ref##*/} == *:* ]] || ref="$ref:latest"
  local LC_ALL=C
  printf '%s' "${ref//[^A-Za-z0-9._-]/_}"
}

[ "$(stat -f -c %T "$DOCKER_BTRFS_PATH" 2>/dev/null)" = btrfs ] ||
  die "$DOCKER_BTRFS_PATH is not a Btrfs filesystem (run scripts/setup.sh)"
docker info >/dev/null 2>&1 || die "no Docker engine answers at $DOCKER_HOST (run scripts/setup.sh)"
as_root mkdir -p "$IMAGES" "$WORK"

# What is cleaned up if the script stops half-way.
container=""
tmp=""
cleanup() {
  [ -n "$container" ] && docker rm -f "$container" >/dev/null 2>&1 || true
  [ -n "$tmp" ] && [ -d "$tmp" ] && as_root btrfs -q subvolume delete "$tmp" >/dev/null 2>&1 || true
  as_root rmdir "$WORK" 2>/dev/null || true
}
trap cleanup EXIT

build() {
  local image=$1 slug dest marker id
  slug=$(slug "$image")
  dest="$IMAGES/$slug"
  marker="$IMAGES/.$slug.image-id"
  id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null) ||
    die "image $image is not in the Docker engine at $DOCKER_HOST: pull or build it first"
  if [ -d "$dest" ] && [ "$(cat "$marker" 2>/dev/null)" = "$id" ]; then
    log "$image is up to date ($id)"
    echo "$dest"
    return
  fi
  log "exporting $image ($id) to $dest"
  # Created, never started: the entrypoint only has to be given (images without a
  # shell or a command are fine), and no network is needed.
  container=$(docker create --network none --entrypoint /nonexistent "$image")
  tmp="$WORK/$slug.$$"
  as_root btrfs -q subvolume create "$tmp"
  # Numeric owners, permissions and extended attributes (file capabilities) as the
  # image has them.
  docker export "$container" |
    as_root tar -x -C "$tmp" --numeric-owner --same-owner --same-permissions \
      --xattrs --xattrs-include='*'
  docker rm -f "$container" >/dev/null
  container=""
  # The host mounts its agent at /.opensandbox; Docker's marker file is not ours.
  as_root rm -rf "$tmp/.opensandbox" "$tmp/.dockerenv"
  # Docker writes /etc/hosts when a container starts; the export has it empty.
  if [ -d "$tmp/etc" ] && [ ! -s "$tmp/etc/hosts" ] && [ ! -L "$tmp/etc/hosts" ]; then
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' |
      as_root tee "$tmp/etc/hosts" >/dev/null
  fi
  if [ -e "$dest" ]; then
    as_root btrfs property set -ts "$dest" ro false 2>/dev/null || true
    as_root btrfs -q subvolume delete "$dest"
  fi
  as_root mv "$tmp" "$dest"
  tmp=""
  # Read-only: sandboxes get writable snapshots of it; nothing writes the base.
  as_root btrfs property set -ts "$dest" ro true
  printf '%s\n' "$id" | as_root tee "$marker.tmp" >/dev/null
  as_root mv "$marker.tmp" "$marker"
  echo "$dest"
}

seen=" "
for image in "$DOCKER_IMAGE" "$@"; do
  case "$seen" in *" $image "*) continue ;; esac
  seen="$seen$image "
  build "$image"
done
