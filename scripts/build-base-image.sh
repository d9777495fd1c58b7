#!/usr/bin/env bash
# Builds a small local base image (Debian bookworm, minbase, with python3) and
# tags it as the image name given in $1. Used when DOCKER_IMAGE cannot be pulled
# (this project's machines reach no registry). The image is labelled so that
# nobody mistakes it for the upstream image whose name it stands in for.
set -euo pipefail
image="${1:?usage: build-base-image.sh IMAGE}"
suite="${BASE_SUITE:-bookworm}"
mirror="${BASE_MIRROR:-http://deb.debian.org/debian}"
cache="${BASE_ROOTFS_CACHE:-/var/cache/opensandbox}"
mkdir -p "$cache"
tarball="$cache/rootfs-$suite.tar"

if [ ! -s "$tarball" ]; then
  work=$(mktemp -d /var/tmp/opensandbox-rootfs.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  echo "building a $suite rootfs with debootstrap (a few minutes, once)..." >&2
  debootstrap --variant=minbase --include=python3-minimal,ca-certificates,procps \
    "$suite" "$work/root" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
      tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # Trim what a sandbox never needs: package lists and docs.
  rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/usr/share/doc/"* \
         "$work/root/usr/share/man/"* "$work/root/var/cache/apt/"*.bin
  tar -C "$work/root" -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi

docker import \
  --change 'CMD ["/bin/sh"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL org.opensandbox.standin=debian-$suite" \
  "$tarball" "$image" >/dev/null
echo "built local base image '$image' (Debian $suite minbase + python3)" >&2
