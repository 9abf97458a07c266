#!/bin/bash
# `qed serve` against qemu-nbd serving the same QED image, with nbdkit's file plugin serving a
# raw file as the ceiling, all driven by fio's nbd engine (libnbd) and nbdcopy over Unix
# sockets, in one run, rounds interleaved; prints medians and ratios.
#
# Servers (all with the host page cache, writeback, as qemu-nbd's default):
#   qed      qed serve -t -e 8 FILE.qed
#   qemu     qemu-nbd -t -e 8 -f qed FILE.qed      (aio=threads, cache=writeback)
#   nbdkit   nbdkit file FILE.raw                  (raw; the ceiling)
# Workloads: 4k random read and in-place write at QD1 and QD32 on a fully allocated image;
# allocating 4k and 64k random writes into an empty image (a fresh image every run); 1M
# sequential read and write at QD8; 4k random read/write QD32 on 4 connections (numjobs=4,
# one connection each); nbdcopy export->null and file->export. fio runs time-based.
#
# Knobs: ROUNDS=3  SIZE_GIB=1  RUNTIME=4 (s per fio run)  ONLY=regex (case names)
#        BENCH_DIR=DIR (default target/bench-nbd)  OUT=FILE (raw samples, TSV)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
SIZE_GIB="${SIZE_GIB:-1}"
SIZE=$((SIZE_GIB << 30))
RUNTIME="${RUNTIME:-4}"
ONLY="${ONLY:-}"
W="${BENCH_DIR:-$ROOT/target/bench-nbd}"

for tool in qemu-nbd qemu-img fio nbdcopy nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install qemu-utils fio libnbd-bin nbdkit)" >&2; exit 2; }
done
echo "# building qed ..."
cargo build --quiet --release -p qed-cli --manifest-path "$ROOT/Cargo.toml"
QED="$ROOT/target/release/qed"

mkdir -p "$W"
PIDS=()
stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; done
    PIDS=()
}
trap 'stop_servers; rm -f "$W"/*.raw "$W"/*.qed "$W"/*.sock "$W"/*.pid' EXIT INT TERM

echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cpus  load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(fio --version)  $(nbdcopy --version | head -1)  $(qemu-nbd --version | head -1)  nbdkit $(nbdkit --version | awk '{print $2}')"
echo "# qed $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); ${SIZE_GIB} GiB exports; fio ${RUNTIME}s per run; medians of $ROUNDS"

echo "# preparing data ..."
python3 - "$W/full.raw" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    block = os.urandom(1 << 20)
    for i in range(size >> 20):
        f.write(block[i % 251:] + block[:i % 251])
EOF
qemu-img convert -q -f raw -O qed "$W/full.raw" "$W/full.qed"
cp "$W/full.raw" "$W/src.raw"
sync

# start SERVER NAME FILE: serves FILE on $W/NAME.sock and waits until it listens.
start() {
    local server=$1 name=$2 file=$3 sock="$W/$2.sock"
    rm -f "$sock" "$W/$name.pid"
    case $server in
        qed)    "$QED" serve -t -e 8 -f qed -k "$sock" --pid-file "$W/$name.pid" "$file" & ;;
        qemu)   qemu-nbd -t -e 8 -f qed -k "$sock" --pid-file "$W/$name.pid" "$file" & ;;
        nbdkit) nbdkit -f -U "$sock" -P "$W/$name.pid" file "$file" & ;;
    esac
    PIDS+=($!)
    for _ in $(seq 200); do [[ -s $W/$name.pid && -S $sock ]] && return; sleep 0.05; done
    echo "$server did not start" >&2; exit 1
}
uri() { echo "nbd+unix:///?socket=$W/$1.sock"; }
fresh() {  # fresh SERVER: an empty image for allocating runs
    local f
    if [[ $1 == nbdkit ]]; then f="$W/fresh-$1.raw"; rm -f "$f"; truncate -s "$SIZE" "$f"
    else f="$W/fresh-$1.qed"; rm -f "$f"; qemu-img create -q -f qed "$f" "$SIZE"; fi
    echo "$f"
}

FIO=(fio --output-format=json --name=j --ioengine=nbd --size="$SIZE" --group_reporting)
# case NAME | fio args (time-based on the full image) | metric
CASES=(
    "randread 4k QD1|--rw=randread --bs=4k --iodepth=1|read_iops"
    "randread 4k QD32|--rw=randread --bs=4k --iodepth=32|read_iops"
    "randwrite 4k QD1|--rw=randwrite --bs=4k --iodepth=1|write_iops"
    "randwrite 4k QD32|--rw=randwrite --bs=4k --iodepth=32|write_iops"
    "read 1M QD8|--rw=read --bs=1M --iodepth=8|read_mibs"
    "write 1M QD8|--rw=write --bs=1M --iodepth=8|write_mibs"
    "randread 4k QD32 x4 conns|--rw=randread --bs=4k --iodepth=32 --numjobs=4|read_iops"
    "randwrite 4k QD32 x4 conns|--rw=randwrite --bs=4k --iodepth=32 --numjobs=4|write_iops"
    "alloc randwrite 4k QD32|--rw=randwrite --bs=4k --iodepth=32 --io_size=128M|write_iops"
    "alloc randwrite 64k QD32|--rw=randwrite --bs=64k --iodepth=32 --io_size=1G|write_mibs"
    "alloc randwrite 4k QD32 x4 conns|--rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --io_size=32M|write_iops"
    "nbdcopy export->null||copy_out"
    "nbdcopy file->export (alloc)||copy_in"
)
SERVERS=(qed qemu nbdkit)
SAMPLES="$W/samples.tsv"; : > "$SAMPLES"

metric() {  # metric NAME < fio json
    python3 -c '
import json, sys
text = sys.stdin.read()  # fio prints "fio: connected to NBD server" before its JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
m = sys.argv[1]
op = "read" if m.startswith("read") else "write"
print(j[op]["iops"] if m.endswith("iops") else j[op]["bw_bytes"] / 1048576)' "$1"
}

run_case() {  # run_case SERVER "NAME|ARGS|METRIC"
    local server=$1 name args what value file t0 t1
    IFS='|' read -r name args what <<< "$2"
    [[ -n $ONLY && ! $name =~ $ONLY ]] && return
    if [[ $name == alloc* || $what == copy_in ]]; then
        file=$(fresh "$server")
        start "$server" "f-$server" "$file"
        local u; u=$(uri "f-$server")
        if [[ $what == copy_in ]]; then
            t0=$(date +%s.%N); nbdcopy "$W/src.raw" "$u"; t1=$(date +%s.%N)
            value=$(python3 -c "print($SIZE / 1048576 / ($t1 - $t0))")
        else
            # shellcheck disable=SC2086
            value=$("${FIO[@]}" --uri="$u" $args | metric "$what")
        fi
        stop_servers
    elif [[ $what == copy_out ]]; then
        local u; u=$(uri "$server")
        t0=$(date +%s.%N); nbdcopy "$u" null:; t1=$(date +%s.%N)
        value=$(python3 -c "print($SIZE / 1048576 / ($t1 - $t0))")
    else
        # shellcheck disable=SC2086
        value=$("${FIO[@]}" --uri="$(uri "$server")" --time_based --runtime="$RUNTIME" --ramp_time=1 $args | metric "$what")
    fi
    printf '%s\t%s\t%s\n' "$name" "$server" "$value" >> "$SAMPLES"
}

for round in $(seq "$ROUNDS"); do
    echo "# round $round/$ROUNDS"
    # Each round: the steady-state cases against long-running servers on the full image,
    # then the fresh-image cases. The server order rotates every round.
    order=("${SERVERS[@]:round%3}" "${SERVERS[@]:0:round%3}")
    for server in "${order[@]}"; do
        if [[ $server == nbdkit ]]; then start nbdkit "$server" "$W/full.raw"
        else start "$server" "$server" "$W/full.qed"; fi
        for c in "${CASES[@]}"; do
            case $c in alloc*|*copy_in) ;; *) run_case "$server" "$c" ;; esac
        done
        stop_servers
        for c in "${CASES[@]}"; do
            case $c in alloc*|*copy_in) run_case "$server" "$c" ;; esac
        done
    done
done

[[ -n ${OUT:-} ]] && cp "$SAMPLES" "$OUT"
python3 - "$SAMPLES" <<'EOF'
import statistics, sys
from collections import defaultdict
samples = defaultdict(list)
order = []
for line in open(sys.argv[1]):
    name, server, value = line.rstrip("\n").split("\t")
    if name not in order:
        order.append(name)
    samples[(name, server)].append(float(value))
def med(name, server):
    v = samples.get((name, server))
    return statistics.median(v) if v else None
def fmt(name, v):
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k IOPS" if " 4k " in f" {name} " else f"{v:.0f} MiB/s"
print()
print("| workload | qed serve | qemu-nbd (qed) | nbdkit file (raw) | qed / qemu-nbd | qed / nbdkit |")
print("|---|---|---|---|---|---|")
for name in order:
    q, m, k = med(name, "qed"), med(name, "qemu"), med(name, "nbdkit")
    r1 = f"{q / m:.2f}" if q and m else "-"
    r2 = f"{q / k:.2f}" if q and k else "-"
    print(f"| {name} | {fmt(name, q)} | {fmt(name, m)} | {fmt(name, k)} | {r1} | {r2} |")
EOF
