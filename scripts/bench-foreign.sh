#!/bin/bash
# `qed convert` and `qed compare` against qemu-img on qcow2 (through imago): qcow2->qed,
# qed->qcow2, qcow2->qcow2 and compare qcow2 qed, on a 1 GiB image half filled with random
# data (every other 1 MiB), files in the page cache, rounds interleaved. Each convert runs with
# the default cache mode (the target flushed at the end) and with `-t unsafe` (no flush: the
# copy alone). Prints the median wall time and peak memory (max RSS) of each, and the ratio
# qemu time / qed time (above 1: qed is faster).
#
# Knobs: ROUNDS=3  SIZE_GIB=1  BENCH_DIR=DIR (default target/bench-foreign)  OUT=FILE (TSV)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
SIZE_GIB="${SIZE_GIB:-1}"
SIZE=$((SIZE_GIB << 30))
W="${BENCH_DIR:-$ROOT/target/bench-foreign}"

for tool in qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 2; }
done
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time not found (apt-get install time)" >&2; exit 2; }
echo "# building qed ..."
cargo build --quiet --release -p qed-cli --manifest-path "$ROOT/Cargo.toml"
QED="$ROOT/target/release/qed"

mkdir -p "$W"
trap 'rm -f "$W"/*.raw "$W"/*.qed "$W"/*.qcow2' EXIT INT TERM

echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cpus  load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(qemu-img --version | head -1); qed $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "# ${SIZE_GIB} GiB images; medians of $ROUNDS; files in the page cache"

python3 - "$W/half.raw" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(size)
    block = os.urandom(1 << 20)
    for mib in range(0, size >> 20, 2):
        f.seek(mib << 20)
        f.write(block[mib % 97:] + block[:mib % 97])
EOF
qemu-img convert -q -f raw -O qcow2 "$W/half.raw" "$W/half.qcow2"
qemu-img convert -q -f raw -O qed "$W/half.raw" "$W/half.qed"
rm -f "$W/half.raw"
cat "$W/half.qcow2" "$W/half.qed" > /dev/null

SAMPLES="$W/samples.tsv"; : > "$SAMPLES"
measure() {  # measure NAME TOOL CMD...
    local name=$1 tool=$2; shift 2
    local out
    /usr/bin/time -o "$W/time.txt" -f '%e %M' "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
    out=$(tail -1 "$W/time.txt")
    printf '%s\t%s\t%s\t%s\n' "$name" "$tool" "${out% *}" "${out#* }" >> "$SAMPLES"
}

run_case() {  # run_case NAME TOOL
    local name=$1 tool=$2 img t=()
    if [[ $tool == qemu ]]; then img=qemu-img; else img="$QED"; fi
    [[ $name == *unsafe* ]] && t=(-t unsafe)
    rm -f "$W/out.qed" "$W/out.qcow2"
    case $name in
        "convert qcow2->qed"*) measure "$name" "$tool" $img convert "${t[@]}" -f qcow2 -O qed "$W/half.qcow2" "$W/out.qed" ;;
        "convert qed->qcow2"*) measure "$name" "$tool" $img convert "${t[@]}" -f qed -O qcow2 "$W/half.qed" "$W/out.qcow2" ;;
        "convert qcow2->qcow2"*) measure "$name" "$tool" $img convert "${t[@]}" -f qcow2 -O qcow2 "$W/half.qcow2" "$W/out.qcow2" ;;
        "compare qcow2 qed") measure "$name" "$tool" $img compare -f qcow2 -F qed "$W/half.qcow2" "$W/half.qed" ;;
    esac
}

CASES=("convert qcow2->qed" "convert qed->qcow2" "convert qcow2->qcow2"
       "convert qcow2->qed, -t unsafe" "convert qed->qcow2, -t unsafe"
       "convert qcow2->qcow2, -t unsafe" "compare qcow2 qed")
for round in $(seq "$ROUNDS"); do
    echo "# round $round/$ROUNDS"
    for c in "${CASES[@]}"; do
        if (( round % 2 )); then run_case "$c" qed; run_case "$c" qemu
        else run_case "$c" qemu; run_case "$c" qed; fi
    done
done

[[ -n ${OUT:-} ]] && cp "$SAMPLES" "$OUT"
python3 - "$SAMPLES" <<'EOF'
import statistics, sys
from collections import defaultdict
secs, rss, order = defaultdict(list), defaultdict(list), []
for line in open(sys.argv[1]):
    name, tool, s, kb = line.rstrip("\n").split("\t")
    if name not in order:
        order.append(name)
    secs[(name, tool)].append(float(s))
    rss[(name, tool)].append(int(kb))
print()
print("| case | qed | qemu-img | qemu time / qed time | qed peak RSS | qemu-img peak RSS |")
print("|---|---|---|---|---|---|")
for name in order:
    q, m = secs.get((name, "qed")), secs.get((name, "qemu"))
    if not q or not m:
        continue
    qs, ms = statistics.median(q), statistics.median(m)
    ratio = f"{ms / qs:.2f}" if qs > 0 else "-"
    qr, mr = max(rss[(name, "qed")]) / 1024, max(rss[(name, "qemu")]) / 1024
    print(f"| {name} | {qs:.2f} s | {ms:.2f} s | {ratio} | {qr:.0f} MiB | {mr:.0f} MiB |")
EOF
