#!/bin/bash
# `qed` against qemu-img and qemu-io on the same files, in one run, rounds interleaved: convert
# (raw->qed, qed->raw, qed->qed, on an image half filled with random data and on a sparse
# one; qcow2->qed and qed->qcow2 through imago), check, compare (qed with raw, and qcow2 with
# qed), and qemu-io writes in writethrough (the default: a flush after every
# write command) and writeback mode. Prints the median wall time and peak memory (max RSS) of
# each, and the ratio QEMU time / qed time (above 1: qed is faster).
#
# Each run starts after a sync; a first round warms up, uncounted. Knobs: ROUNDS=3  SIZE_GIB=4  ONLY=regex (case names)  BENCH_DIR=DIR (default
#        target/bench-img)  OUT=FILE (raw samples, TSV)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
SIZE_GIB="${SIZE_GIB:-4}"
SIZE=$((SIZE_GIB << 30))
ONLY="${ONLY:-}"
W="${BENCH_DIR:-$ROOT/target/bench-img}"

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 2; }
done
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time not found (apt-get install time)" >&2; exit 2; }
echo "# building qed ..."
cargo build --quiet --release -p qed-cli --manifest-path "$ROOT/Cargo.toml"
QED="$ROOT/target/release/qed"

mkdir -p "$W"
need_kb=$(( (SIZE_GIB * 5 + 1) * 1024 * 1024 ))
avail_kb=$(df -Pk "$W" | awk 'NR==2{print $4}')
(( avail_kb >= need_kb )) || { echo "need $((need_kb >> 20)) GiB free in $W" >&2; exit 2; }
trap 'rm -f "$W"/*.raw "$W"/*.qed "$W"/*.qcow2' EXIT INT TERM

echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cpus  load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(qemu-img --version | head -1); qed $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "# ${SIZE_GIB} GiB images; medians of $ROUNDS; files in the page cache (sources read once first)"

echo "# preparing data ..."
# Half filled: random data in every other 1 MiB, the rest a hole.
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
qemu-img convert -q -f raw -O qed "$W/half.raw" "$W/half.qed"
qemu-img convert -q -f raw -O qcow2 "$W/half.raw" "$W/half.qcow2"
truncate -s "$SIZE" "$W/sparse.raw"
qemu-img create -q -f qed "$W/sparse.qed" "$SIZE"
cat "$W/half.raw" "$W/half.qed" "$W/half.qcow2" > /dev/null

SAMPLES="$W/samples.tsv"; : > "$SAMPLES"

# measure NAME TOOL CMD...: runs CMD, records wall seconds and max RSS (KiB).
measure() {
    local name=$1 tool=$2; shift 2
    local out
    # Dirty pages of the previous run are written back first, not during this one.
    sync
    /usr/bin/time -o "$W/time.out" -f '%e %M' "$@" >/dev/null 2>&1 || true
    out=$(tail -1 "$W/time.out")
    (( COUNTED )) || return 0
    printf '%s\t%s\t%s\t%s\n' "$name" "$tool" "${out% *}" "${out#* }" >> "$SAMPLES"
}

# A qemu-io command list: N 64 KiB writes across the image.
io_cmds() {
    local n=$1 i args=()
    for ((i = 0; i < n; i++)); do args+=(-c "write -P $((i % 250 + 1)) $((i * 7 % (SIZE >> 16) << 16)) 64k"); done
    printf '%s\0' "${args[@]}"
}
mapfile -d '' IO_ARGS < <(io_cmds 2000)

run_case() {  # run_case NAME TOOL
    local name=$1 tool=$2 img io
    [[ -n $ONLY && ! $name =~ $ONLY ]] && return
    if [[ $tool == qemu ]]; then img=qemu-img; io=qemu-io; else img="$QED"; io="$QED io"; fi
    rm -f "$W/out.qed" "$W/out.raw" "$W/out.qcow2"
    case $name in
        "convert raw->qed (half)") measure "$name" "$tool" $img convert -f raw -O qed "$W/half.raw" "$W/out.qed" ;;
        "convert qed->raw (half)") measure "$name" "$tool" $img convert -f qed -O raw "$W/half.qed" "$W/out.raw" ;;
        "convert qed->qed (half)") measure "$name" "$tool" $img convert -f qed -O qed "$W/half.qed" "$W/out.qed" ;;
        "convert raw->qed (sparse)") measure "$name" "$tool" $img convert -f raw -O qed "$W/sparse.raw" "$W/out.qed" ;;
        "convert qed->qed (sparse)") measure "$name" "$tool" $img convert -f qed -O qed "$W/sparse.qed" "$W/out.qed" ;;
        "convert qcow2->qed (half)") measure "$name" "$tool" $img convert -f qcow2 -O qed "$W/half.qcow2" "$W/out.qed" ;;
        "convert qed->qcow2 (half)") measure "$name" "$tool" $img convert -f qed -O qcow2 "$W/half.qed" "$W/out.qcow2" ;;
        "compare qcow2 qed (half)") measure "$name" "$tool" $img compare -f qcow2 -F qed "$W/half.qcow2" "$W/half.qed" ;;
        "check (half)") measure "$name" "$tool" $img check -f qed "$W/half.qed" ;;
        "compare qed raw (half)") measure "$name" "$tool" $img compare -f qed -F raw "$W/half.qed" "$W/half.raw" ;;
        "io 2000x64k writethrough"|"io 2000x64k writeback")
            local mode=writethrough
            [[ $name == *writeback ]] && mode=writeback
            qemu-img create -q -f qed "$W/out.qed" "$SIZE"
            # shellcheck disable=SC2086
            measure "$name" "$tool" $io -t "$mode" "${IO_ARGS[@]}" "$W/out.qed" ;;
    esac
}

CASES=("convert raw->qed (half)" "convert qed->raw (half)" "convert qed->qed (half)"
       "convert raw->qed (sparse)" "convert qed->qed (sparse)" "convert qcow2->qed (half)"
       "convert qed->qcow2 (half)" "compare qcow2 qed (half)" "check (half)"
       "compare qed raw (half)" "io 2000x64k writethrough" "io 2000x64k writeback")
# Round 0 warms up and is not counted: the first runs after the data is made are slower
# for both tools (memory the machine had not touched yet), by up to 2x. Each round starts
# with an uncounted run too: whichever tool ran first in a round was up to 3x slower.
for round in $(seq 0 "$ROUNDS"); do
    echo "# round $round/$ROUNDS"
    COUNTED=0
    run_case "${CASES[0]}" qed
    COUNTED=$(( round > 0 ))
    for c in "${CASES[@]}"; do
        if (( round % 2 )); then run_case "$c" qed; run_case "$c" qemu
        else run_case "$c" qemu; run_case "$c" qed; fi
    done
done

[[ -n ${OUT:-} ]] && cp "$SAMPLES" "$OUT"
python3 - "$SAMPLES" "$SIZE" <<'EOF'
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
print("| case | qed | qemu | qemu time / qed time | qed peak RSS | qemu peak RSS |")
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
