#!/usr/bin/env bash
# Builds qed and runs the main job end to end: create an image, write and read it back with
# `qed io`, show it with `qed info`, check it with `qed check` and let qemu-img check it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p qed-cli
qed=target/release/qed
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$qed" create -f qed -o cluster_size=65536 "$dir/demo.qed" 1G
"$qed" io -c 'write -P 0xab 0 1M' -c 'write -z 2M 128k' -c 'read -P 0xab 0 1M' "$dir/demo.qed"
"$qed" info "$dir/demo.qed"
"$qed" check "$dir/demo.qed"
if command -v qemu-img >/dev/null 2>&1; then
  qemu-img check "$dir/demo.qed"
fi
