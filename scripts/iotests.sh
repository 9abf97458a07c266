#!/bin/bash
# QEMU's own qemu-iotests with `qed` as the tools: qemu-img, qemu-io and qemu-nbd are links to
# target/release/qed, so every test runs them exactly as it runs QEMU's.
#
#   scripts/iotests.sh qed-file    the qed format on files: qed as qemu-img and qemu-io
#   scripts/iotests.sh raw-nbd     raw over NBD: qed as qemu-nbd (QEMU's qemu-img and qemu-io
#                                  are the clients)
#
# The test scripts and reference outputs come from QEMU's source tarball for the installed
# qemu-utils (Debian's source package, fetched with a private apt configuration, so nothing
# under /etc changes; cached in $IOTESTS_CACHE). No system emulator is needed: QEMU_PROG is a
# stub, and the tests that start a VM are not in the expected list.
#
# Exit status: 0 when every test in testdata/iotests/SUITE.pass passes, 1 otherwise (each
# failure's diff is printed), 2 when the suite could not run. TESTS="001 002" runs only those
# (and checks only those). With CI=true a missing qemu-utils or tarball is a failure.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SUITE="${1:-qed-file}"
EXPECTED="$ROOT/testdata/iotests/$SUITE.pass"
CACHE="${IOTESTS_CACHE:-$HOME/.cache/qed-iotests}"
[[ -f $EXPECTED ]] || { echo "unknown suite '$SUITE' (no $EXPECTED)" >&2; exit 2; }
case $SUITE in
    qed-file) FMT=qed PROTO=file ;;
    raw-nbd) FMT=raw PROTO=nbd ;;
    *) echo "unknown suite '$SUITE'" >&2; exit 2 ;;
esac
unavailable() {  # a missing prerequisite: a failure under CI, a skip elsewhere
    echo "iotests: $1" >&2
    [[ ${CI:-} == true ]] && exit 2
    echo "iotests: skipped (not under CI)" >&2
    exit 0
}
command -v qemu-img >/dev/null && command -v dpkg-query >/dev/null \
    || unavailable "qemu-utils is not installed"

# QEMU's source tarball, matching the installed tools.
version=$(dpkg-query -W -f='${Version}' qemu-utils)   # e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1
upstream=$(sed 's/^[0-9]*://; s/-[^-]*$//' <<< "$version")  # 10.0.2+ds
mkdir -p "$CACHE"
tarball=$(ls "$CACHE"/qemu_"$upstream".orig.tar.* 2>/dev/null | head -1)
if [[ -z $tarball ]]; then
    apt_dir=$(mktemp -d)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null)
    [[ -n $mirror ]] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    suite=$(apt-cache policy qemu-utils | awk '/\*\*\*/{getline; print $3}' | cut -d/ -f1)
    [[ -z $suite || $suite == /var/lib/dpkg/status ]] && suite=bookworm-backports
    echo "deb-src $mirror $suite main" > "$apt_dir/sources.list"
    apt_opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache")
    apt-get "${apt_opts[@]}" update >/dev/null 2>&1
    (cd "$CACHE" && apt-get "${apt_opts[@]}" source --download-only "qemu=$version" >/dev/null 2>&1)
    rm -rf "$apt_dir"
    tarball=$(ls "$CACHE"/qemu_"$upstream".orig.tar.* 2>/dev/null | head -1)
    [[ -n $tarball ]] || unavailable "could not fetch qemu_$upstream.orig.tar.* with apt-get source"
fi

# TEST_DIR may hold only [-_a-zA-Z0-9/] (some tests refuse to run otherwise)
WORK=$(mktemp -d /tmp/qed-iotests-XXXXXX)
trap 'rm -rf "$WORK"' EXIT INT TERM
src="qemu-${upstream%+ds}"
tar -xf "$tarball" -C "$WORK" --wildcards "$src/tests/qemu-iotests/*" "$src/python/*" \
    || { echo "iotests: cannot unpack $tarball" >&2; exit 2; }

echo "iotests: building qed ..."
cargo build --quiet --release -p qed-cli --manifest-path "$ROOT/Cargo.toml" || exit 2
mkdir -p "$WORK/bin"
for tool in qemu-img qemu-io qemu-nbd; do ln -s "${CARGO_TARGET_DIR:-$ROOT/target}/release/qed" "$WORK/bin/$tool"; done
cat > "$WORK/bin/qemu-system-stub" <<'EOF'
#!/bin/sh
case "$*" in *"-machine help"*) echo "pc  Standard PC (i440FX + PIIX, 1996) (default)";;
             *) echo "no system emulator here" >&2; exit 1;; esac
EOF
chmod +x "$WORK/bin/qemu-system-stub"

export QEMU_PROG="$WORK/bin/qemu-system-stub"
export QSD_PROG=/usr/bin/qemu-storage-daemon
if [[ $SUITE == qed-file ]]; then
    export QEMU_IMG_PROG="$WORK/bin/qemu-img" QEMU_IO_PROG="$WORK/bin/qemu-io"
    export QEMU_NBD_PROG=/usr/bin/qemu-nbd
else
    export QEMU_IMG_PROG=/usr/bin/qemu-img QEMU_IO_PROG=/usr/bin/qemu-io
    export QEMU_NBD_PROG="$WORK/bin/qemu-nbd"
fi
export TEST_DIR="$WORK/scratch"
mkdir -p "$TEST_DIR"

expected=$(grep -v '^#' "$EXPECTED" | tr -s ' \n' ' ')
tests="${TESTS:-$expected}"
cd "$WORK/$src/tests/qemu-iotests" || exit 2
# Debian's python3 first (the runner needs its modules), and a bound on the whole run.
PATH=/usr/bin:$PATH timeout 1800 ./check "-$FMT" "-$PROTO" $tests > "$WORK/check.log" 2>&1
# Status lines are "NNN   pass   [time] ..."; the runner mixes in carriage returns.
passed=$(tr '\r' '\n' < "$WORK/check.log" | sed -nE 's/^([0-9a-z_-]+) +pass +\[.*/\1/p' | sort -u)
missing=()
for t in $tests; do
    grep -qx "$t" <<< "$passed" || missing+=("$t")
done
echo "iotests $SUITE: $(wc -w <<< "$passed") passed of $(wc -w <<< "$tests") expected"
if (( ${#missing[@]} )); then
    echo "iotests $SUITE: FAILED: ${missing[*]}"
    tr '\r' '\n' < "$WORK/check.log" | grep -v '^\s*$' | tail -200
    exit 1
fi
exit 0
