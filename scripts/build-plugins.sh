#!/usr/bin/env bash
# Builds every Wasm plugin for wasm32-wasip2, in release mode:
#   plugins/*        the first-party plugins (default-policy, command-guard, audit)
#   tests/plugins/*  the faulty plugins used by the host's tests
# and copies each component to target/plugins/<package-name>.wasm (the cargo package name,
# with its dashes: target/plugins/default-policy.wasm, target/plugins/loop-hook.wasm, ...).
#
# Each package is built by its own cargo invocation, so cargo's feature unification never
# mixes two plugins' dependencies. The build directory is target/wasm-plugins (shared by both
# workspaces, separate from the host's target/debug and target/release). Idempotent.
#
# Usage: scripts/build-plugins.sh [package ...]   (default: every package of both workspaces)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=wasm32-wasip2
OUT="$ROOT/target/plugins"
export CARGO_TARGET_DIR="${PLUGINS_TARGET_DIR:-$ROOT/target/wasm-plugins}"

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$TARGET"; then
        rustup target add "$TARGET"
    fi
fi

# The members of a workspace, one directory (relative to it) per line.
members() {
    sed -n '/^members *= *\[/,/\]/p' "$1/Cargo.toml" | grep -o '"[^"]*"' | tr -d '"'
}

mkdir -p "$OUT"
built=()
for ws in "$ROOT/plugins" "$ROOT/tests/plugins"; do
    for member in $(members "$ws"); do
        manifest="$ws/$member/Cargo.toml"
        name="$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$manifest" | head -n1)"
        if [ "$#" -gt 0 ]; then
            wanted=0
            for arg in "$@"; do [ "$arg" = "$name" ] && wanted=1; done
            [ "$wanted" = 1 ] || continue
        fi
        echo "==> $name" >&2
        cargo build --quiet --release --locked --target "$TARGET" --manifest-path "$ws/Cargo.toml" -p "$name"
        # A cdylib is named with underscores, a binary (wrong-world) as its package.
        artifact="$CARGO_TARGET_DIR/$TARGET/release/${name//-/_}.wasm"
        [ -f "$artifact" ] || artifact="$CARGO_TARGET_DIR/$TARGET/release/$name.wasm"
        if [ ! -f "$artifact" ]; then
            echo "build-plugins: no .wasm produced for $name" >&2
            exit 1
        fi
        # A component starts with \0asm, version 0x0d 0x00, layer 0x01 0x00.
        if [ "$(head -c 8 "$artifact" | od -An -tx1 | tr -d ' \n')" != "0061736d0d000100" ]; then
            echo "build-plugins: $artifact is not a WebAssembly component" >&2
            exit 1
        fi
        cp "$artifact" "$OUT/$name.wasm"
        built+=("$OUT/$name.wasm")
    done
done

if [ "${#built[@]}" -eq 0 ]; then
    echo "build-plugins: nothing matched: $*" >&2
    exit 1
fi
for f in "${built[@]}"; do
    echo "${f#"$ROOT"/}"
done
