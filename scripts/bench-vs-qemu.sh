#!/bin/bash
# qemu-img bench against this engine's equivalent (crates/qed-image/examples/bench.rs), on the
# same files, in one run, rounds interleaved; prints medians.
#
# Every case runs four ways: QEMU raw, QEMU qed, ours raw, ours qed. QEMU is `qemu-img bench`
# with the aio backends in AIOS; ours runs the same requests in the same order with -d
# threads sharing one open image ("raw" goes through the same storage layer, FileStorage).
# Reads and in-place writes use a fully allocated image; "alloc" writes start from a fresh
# empty image every run (qemu-img create; truncate -s for raw). The metric of both tools is
# their "Run completed in X seconds" line: requests only, no open/close, no flush.
#
# Knobs (environment):
#   ROUNDS=3          timed rounds; each round runs every case once, start case rotating
#   SIZE_GIB=4        virtual size of the images
#   CACHES="writeback none"   cache modes (none = O_DIRECT; skipped if the fs refuses it)
#   AIOS="io_uring threads"   qemu-img bench -i backends
#   ONLY=regex        run only the cases whose name matches (e.g. ONLY='alloc')
#   BENCH_DIR=DIR     scratch directory on a real disk (default: target/bench-vs-qemu)
#   OUT=FILE          also write the raw samples (TSV) here
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
SIZE_GIB="${SIZE_GIB:-4}"
SIZE=$((SIZE_GIB << 30))
CACHES="${CACHES:-writeback none}"
AIOS="${AIOS:-io_uring threads}"
ONLY="${ONLY:-}"
W="${BENCH_DIR:-$ROOT/target/bench-vs-qemu}"

command -v qemu-img >/dev/null || { echo "qemu-img not found" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }

echo "# building the bench example ..."
cargo build --quiet --release -p qed-image --example bench --manifest-path "$ROOT/Cargo.toml"
OURS="$ROOT/target/release/examples/bench"

mkdir -p "$W"
need_kb=$(( (SIZE_GIB * 4 + 2) * 1024 * 1024 ))
avail_kb=$(df -Pk "$W" | awk 'NR==2{print $4}')
if (( avail_kb < need_kb )); then
    echo "need $((need_kb >> 20)) GiB free in $W, have $((avail_kb >> 20)) GiB" >&2; exit 2
fi
trap 'rm -f "$W"/*.raw "$W"/*.qed' EXIT INT TERM

echo "# $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cpus  $(free -g | awk '/Mem:/{print $2}') GiB RAM"
echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p')  fs: $(df -PT "$W" | awk 'NR==2{print $2, $1}')"
echo "# $(qemu-img --version | head -1); ours: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "# load: $(cut -d' ' -f1-3 /proc/loadavg)"

# O_DIRECT probe.
if [[ " $CACHES " == *" none "* ]]; then
    truncate -s 1M "$W/probe.raw"
    if ! qemu-img bench -q -f raw -t none -c 1 "$W/probe.raw" >/dev/null 2>&1; then
        echo "# O_DIRECT not supported in $W: cache=none skipped"
        CACHES="${CACHES//none/}"
    fi
    rm -f "$W/probe.raw"
fi

# Fully allocated images, one pair per cache mode (O_DIRECT writes would otherwise drop the
# page-cache copy that the writeback cases are meant to hit).
echo "# preparing ${SIZE_GIB} GiB images in $W ..."
python3 - "$W/full.raw" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2]); blk = 64 << 20
fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
buf = bytearray(os.urandom(blk))
for i in range(size // blk):
    buf[0:8] = i.to_bytes(8, 'little')
    os.write(fd, buf)
os.close(fd)
EOF
qemu-img convert -f raw -O qed "$W/full.raw" "$W/full.qed"
for cache in $CACHES; do
    cp "$W/full.raw" "$W/full-$cache.raw"
    cp "$W/full.qed" "$W/full-$cache.qed"
done
rm -f "$W/full.raw" "$W/full.qed"
sync
for cache in $CACHES; do
    [[ $cache == writeback ]] && cat "$W/full-$cache.raw" "$W/full-$cache.qed" >/dev/null
done

# Interleaved runner: reads the case list on stdin, runs ROUNDS rounds, prints medians.
HARNESS=$(cat <<'EOF'
import re, shlex, statistics, subprocess, sys
from collections import defaultdict
rounds, out = int(sys.argv[1]), sys.argv[2]
cases = [l.rstrip("\n").split("\t") for l in sys.stdin if l.strip()]
samples = defaultdict(list)
done_re = re.compile(r"Run completed in ([0-9.]+) seconds")
for r in range(rounds):
    k = r % len(cases) if cases else 0
    for name, prep, cmd, count, bs in cases[k:] + cases[:k]:
        for attempt in range(3):
            subprocess.run(prep + "; sync", shell=True, check=True)
            p = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
            m = done_re.search(p.stdout)
            if p.returncode == 0 and m:
                break
            # qemu-img bench occasionally crashes (a stack overflow at depth 1): run it again.
            print(f"# {name}: exit status {p.returncode}, retrying", file=sys.stderr)
        else:
            sys.exit(f"{name}: {cmd} failed:\n{p.stdout}{p.stderr}")
        samples[name].append(float(m.group(1)))
        print(f"# round {r + 1}/{rounds}  {name:<40} {float(m.group(1)):8.3f} s", file=sys.stderr, flush=True)
if out:
    with open(out, "w") as f:
        for name, xs in samples.items():
            f.write(name + "\t" + "\t".join(f"{x:.4f}" for x in xs) + "\n")
meta = {c[0]: (int(c[3]), c[4]) for c in cases}
def rate(name):
    count, bs = meta[name]
    secs = statistics.median(samples[name])
    if bs == "4k":
        return count / secs, f"{count / secs / 1000:.1f}k IOPS"
    nbytes = count * (int(bs[:-1]) << 10)
    return nbytes / secs, f"{nbytes / secs / (1 << 20):.0f} MiB/s"
workloads = list(dict.fromkeys(n.split("|")[0] for n in samples))
engines = list(dict.fromkeys(n.split("|")[1] for n in samples))
print(f"\nmedians of {rounds} rounds; qed/raw = raw rate / qed rate (>1: qed slower);"
      " ours/QEMU = our qed rate / QEMU qed rate (>1: ours faster)\n")
head = ["workload"] + [f"{e} raw" for e in engines] + [f"{e} qed" for e in engines] \
    + [f"{e} qed/raw" for e in engines] + [f"ours/{e}" for e in engines if e != "ours"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for w in workloads:
    row, v = [w], {}
    for fmt in ("raw", "qed"):
        for e in engines:
            n = f"{w}|{e}|{fmt}"
            if n in samples:
                v[e, fmt], text = rate(n)
            else:
                text = "-"
            row.append(text)
    for e in engines:
        row.append(f"{v[e, 'raw'] / v[e, 'qed']:.2f}" if (e, "raw") in v and (e, "qed") in v else "-")
    for e in engines:
        if e != "ours":
            row.append(f"{v['ours', 'qed'] / v[e, 'qed']:.2f}" if ("ours", "qed") in v and (e, "qed") in v else "-")
    print("| " + " | ".join(row) + " |")
EOF
)

# Case list: NAME \t PREP \t CMD \t REQUESTS \t BYTES
gen() {
    local cache op flags bs depth cwb cnone img count fmt engine prep file cmd aio
    for cache in $CACHES; do
        while read -r op flags bs depth cwb cnone img; do
            [[ "$op" == "#"* || -z "$op" ]] && continue
            count=$cwb; [[ $cache == none ]] && count=$cnone
            flags=${flags//_/ }; [[ $flags == - ]] && flags=
            for fmt in raw qed; do
                if [[ $img == fresh ]]; then
                    file="$W/fresh.$fmt"
                    if [[ $fmt == raw ]]; then prep="rm -f $file; truncate -s $SIZE $file"
                    else prep="rm -f $file; qemu-img create -q -f qed $file $SIZE"; fi
                else
                    file="$W/full-$cache.$fmt"; prep=":"
                fi
                for aio in $AIOS; do
                    cmd="qemu-img bench -f $fmt -t $cache -i $aio $flags -c $count -d $depth -s $bs $file"
                    printf '%s\t%s\t%s\t%s\t%s\n' "$op $bs d$depth $cache|qemu-$aio|$fmt" "$prep" "$cmd" "$count" "$bs"
                done
                cmd="$OURS -f $fmt -t $cache $flags -c $count -d $depth -s $bs $file"
                printf '%s\t%s\t%s\t%s\t%s\n' "$op $bs d$depth $cache|ours|$fmt" "$prep" "$cmd" "$count" "$bs"
            done
        done <<'EOF'
# op     flags              bs  depth count(writeback) count(none) image
read     -                  4k   1    50000   20000  full
read     -                  4k  32   200000  100000  full
write    -w_--pattern=0xa5  4k   1    50000   20000  full
write    -w_--pattern=0xa5  4k  32   200000  100000  full
alloc    -w_--pattern=0xa5  4k   1    65536   65536  fresh
alloc    -w_--pattern=0xa5  4k  32    65536   65536  fresh
alloc    -w_--pattern=0xa5 64k  32    16384   16384  fresh
EOF
    done
}

gen | { if [[ -n "$ONLY" ]]; then awk -F'\t' -v re="$ONLY" '$1 ~ re'; else cat; fi; } \
    | python3 -c "$HARNESS" "$ROUNDS" "${OUT:-}"
