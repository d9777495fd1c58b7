#!/usr/bin/env bash
# Builds the in-sandbox agent as a static Linux binary and copies it to
# target/agent/opensandbox-agent, the file the host bind-mounts into every
# sandbox at /.opensandbox/agent. Static, so it runs in any image (glibc,
# musl or none).
#
# By default it links glibc statically (x86_64-unknown-linux-gnu with
# +crt-static; needs gcc and libc6-dev, which scripts/setup.sh installs):
# measured here, 1 GiB of stdout through the agent ran at 674-983 MiB/s
# against 365-445 MiB/s for the musl build, whose malloc maps and unmaps
# every large output buffer. The agent uses no NSS (it reads /etc/passwd
# itself), so static glibc has none of its usual caveats.
# AGENT_TARGET=x86_64-unknown-linux-musl builds the musl variant (the musl
# target is added when missing; with no C compiler rust-lld links it).
#
# Usage: scripts/build-agent.sh   (CARGO_TARGET_DIR defaults to target)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${AGENT_TARGET:-x86_64-unknown-linux-gnu}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OUT="$ROOT/target/agent"

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$TARGET"; then
        rustup target add "$TARGET"
    fi
fi

# The musl target links with `cc` by default; a bare machine may have none.
if ! command -v cc >/dev/null 2>&1 && [ -z "${CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER:-}" ]; then
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
fi

# With an explicit --target these flags reach only the agent's own crates,
# not build scripts, and its output stays apart from the host's builds.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p opensandbox-agent --target "$TARGET"

bin="$CARGO_TARGET_DIR/$TARGET/release/opensandbox-agent"
mkdir -p "$OUT"
# Copy then rename, so a running sandbox never sees a half-written file.
cp "$bin" "$OUT/opensandbox-agent.tmp"
# The release profile keeps debug info (for the host's backtraces); the agent
# is mounted into every sandbox, so ship it without.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$OUT/opensandbox-agent.tmp"
fi
mv -f "$OUT/opensandbox-agent.tmp" "$OUT/opensandbox-agent"

# Static means no program interpreter (PT_INTERP) and no shared libraries.
static=unknown
if command -v readelf >/dev/null 2>&1; then
    if readelf -lW "$OUT/opensandbox-agent" | grep -q 'INTERP'; then static=no; else static=yes; fi
    if readelf -dW "$OUT/opensandbox-agent" 2>/dev/null | grep -q '(NEEDED)'; then static=no; fi
elif command -v ldd >/dev/null 2>&1; then
    if ldd "$OUT/opensandbox-agent" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
        static=yes
    else
        static=no
    fi
else
    # No binutils: read the ELF program headers ourselves (PT_INTERP = 3).
    if command -v python3 >/dev/null 2>&1; then
        static=$(python3 - "$OUT/opensandbox-agent" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
phoff, = struct.unpack_from('<Q', d, 0x20)
phentsize, phnum = struct.unpack_from('<HH', d, 0x36)
types = [struct.unpack_from('<I', d, phoff + i * phentsize)[0] for i in range(phnum)]
print('no' if 3 in types else 'yes')
PY
)
    fi
fi
case "$static" in
    yes) ;;
    no) echo "error: $OUT/opensandbox-agent is not statically linked" >&2; exit 1 ;;
    *) echo "warning: could not check that the agent is static (no readelf, ldd or python3)" >&2 ;;
esac

"$OUT/opensandbox-agent" --version >&2
echo "$OUT/opensandbox-agent"
