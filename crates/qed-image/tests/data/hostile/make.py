#!/usr/bin/env python3
"""Writes the hostile QED images of this directory (deterministic: same bytes every run).

Usage: python3 make.py [OUTPUT_DIR]   (default: the directory of this script)

Every image is small (< 100 KiB). Geometries that need a big file are written short; the test
(`crates/qed-image/tests/hostile.rs`) extends its copy to the nominal length with a sparse
`set_len` where the README says so. Expected results: README.md.
"""

import os
import struct
import sys

CS = 4096  # cluster size of the standard layout
TS = 2  # table size of the standard layout (QEMU refuses table_size 1)
TABLE = CS * TS
NEED_CHECK = 0x2
BACKING = 0x1
NO_PROBE = 0x4
U64_MAX = (1 << 64) - 1


def header(cs=CS, ts=TS, hs=1, features=0, compat=0, autoclear=0, l1=None,
           size=8 << 20, bfo=0, bfs=0):
    if l1 is None:
        l1 = hs * cs
    return struct.pack("<4sIIIQQQQQII", b"QED\0", cs, ts, hs, features, compat,
                       autoclear, l1, size, bfo, bfs)


class Img:
    """A file image in memory: header, L1 at `hs * cs`, then whatever is placed after it."""

    def __init__(self, hs=1, **kw):
        self.hs = hs
        self.l1 = hs * CS
        self.kw = kw
        self.buf = bytearray(self.l1 + TABLE)

    def ensure(self, end):
        if len(self.buf) < end:
            self.buf.extend(bytes(end - len(self.buf)))

    def put64(self, at, value):
        self.ensure(at + 8)
        self.buf[at:at + 8] = struct.pack("<Q", value & U64_MAX)

    def l1e(self, index, value):
        self.put64(self.l1 + 8 * index, value)

    def l2e(self, table, index, value):
        self.put64(table + 8 * index, value)

    def data(self, at, byte):
        self.ensure(at + CS)
        self.buf[at:at + CS] = bytes([byte]) * CS

    def bytes(self):
        kw = dict(self.kw)
        kw.setdefault("hs", self.hs)
        kw.setdefault("l1", self.l1)
        h = header(**kw)
        self.buf[0:64] = h
        return bytes(self.buf)


def standard(hs=1, **kw):
    """A valid image: L1[0] -> L2 table right after L1; L2[0], L2[1] data, L2[2] zero,
    L2[5] data. Returns (image, l2 offset, [data offsets])."""
    img = Img(hs=hs, **kw)
    l2 = img.l1 + TABLE
    img.ensure(l2 + TABLE)
    d = [l2 + TABLE + i * CS for i in range(3)]
    img.l1e(0, l2)
    img.l2e(l2, 0, d[0])
    img.l2e(l2, 1, d[1])
    img.l2e(l2, 2, 1)
    img.l2e(l2, 5, d[2])
    for off, byte in zip(d, (0x11, 0x22, 0x33)):
        img.data(off, byte)
    return img, l2, d


def cases():
    out = {}

    img, _, _ = standard()
    out["valid.qed"] = img.bytes()

    # --- L1 entries pointing where they must not ---
    img, l2, d = standard(hs=2)
    img.l1e(1, CS)  # second cluster of the header area
    out["l1-to-header.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, img.l1)  # the L1 table itself
    out["l1-to-l1.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, l2)  # shares L1[0]'s table
    out["l1-duplicate.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, l2)  # shares L1[0]'s table, which has an entry at EOF: a repair copies the
    img.l2e(l2, 3, len(img.buf))  # table to EOF, and the stale entry must not become valid
    out["l1-duplicate-past-eof.qed"] = img.bytes()

    img, l2, d = standard()
    for i in range(1, 4):
        img.l1e(i, l2)  # three more references to one table
    out["l1-duplicate-many.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 6, img.l1)  # data entry at the L1 table
    img.l2e(l2, 7, l2)  # data entry at its own table
    img.l1e(1, d[0])  # L1 entry at a data cluster (+ the cluster after it)
    out["l1-l2-cycle.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, len(img.buf) + 16 * CS)  # table wholly past EOF
    img.l1e(2, len(img.buf) - CS)  # table starts inside, ends past EOF
    out["l1-past-eof.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, 1)  # "zero cluster" value: meaningless in L1
    out["l1-entry-one.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, l2 + 512)
    out["l1-unaligned.qed"] = img.bytes()

    img, l2, d = standard()
    img.l1e(1, U64_MAX & ~(CS - 1))  # aligned, offset + table overflows
    img.l1e(2, U64_MAX)
    img.l1e(3, 1 << 63)
    out["l1-near-u64-max.qed"] = img.bytes()

    # --- L2 entries pointing where they must not ---
    img, l2, d = standard()
    img.l2e(l2, 3, l2)  # first cluster of an L2 table
    img.l2e(l2, 4, l2 + CS)  # second cluster of it
    out["l2-to-l2.qed"] = img.bytes()

    img, l2, d = standard(hs=2)
    img.l2e(l2, 3, CS)  # header area
    out["l2-to-header.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 3, img.l1)  # the L1 table
    out["l2-to-l1.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 3, len(img.buf))  # exactly EOF
    img.l2e(l2, 4, 1 << 40)
    out["l2-past-eof.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 3, d[0] + 8)
    img.l2e(l2, 4, 2)
    img.l2e(l2, 6, 0xfff)
    out["l2-unaligned.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 3, U64_MAX & ~(CS - 1))
    img.l2e(l2, 4, U64_MAX)
    img.l2e(l2, 6, (1 << 63) | CS)
    out["l2-near-u64-max.qed"] = img.bytes()

    img, l2, d = standard()
    img.l2e(l2, 3, d[0])  # two guest clusters share one data cluster
    img.l2e(l2, 4, d[0])
    out["l2-duplicate.qed"] = img.bytes()

    # A second L2 table at L1[1] whose every entry points at the first data cluster.
    img, l2, d = standard()
    t2 = len(img.buf)
    img.ensure(t2 + TABLE)
    img.l1e(1, t2)
    for i in range(TABLE // 8):
        img.l2e(t2, i, d[0])
    out["l2-duplicate-full.qed"] = img.bytes()

    # Every L1 entry leads to one table whose every entry leads to one data cluster: a
    # repair that gave each reference its own copy would write 1024 * 1024 clusters (4 GiB).
    img = Img()
    l2 = img.l1 + TABLE
    d0 = l2 + TABLE
    img.data(d0, 0x44)
    for i in range(TABLE // 8):
        img.l1e(i, l2)
        img.l2e(l2, i, d0)
    out["l1-l2-duplicate-all.qed"] = img.bytes()

    # --- the L1 table itself ---
    img, l2, d = standard()
    img.buf = img.buf[:img.l1 + CS]  # file ends inside the L1 table
    out["l1-table-truncated.qed"] = img.bytes()

    img, l2, d = standard(l1=U64_MAX & ~(CS - 1))
    out["l1-table-near-u64-max.qed"] = img.bytes()

    # --- header fields ---
    out["cluster-64m-ts16.qed"] = header(cs=64 << 20, ts=16, l1=64 << 20, size=0) + bytes(CS - 64)
    out["cluster-64m-ts16-sparse.qed"] = out["cluster-64m-ts16.qed"]
    out["cluster-size-huge.qed"] = header(cs=1 << 31, l1=1 << 31) + bytes(CS - 64)

    img, _, _ = standard(size=U64_MAX)
    out["image-size-all-ones.qed"] = img.bytes()
    img, _, _ = standard(size=U64_MAX & ~511)
    out["image-size-near-max.qed"] = img.bytes()
    # The largest size this geometry addresses (4 GiB): valid, sparse.
    img, _, _ = standard(size=1 << 32)
    out["image-size-geometry-max.qed"] = img.bytes()

    img, _, _ = standard()
    img.kw["hs"] = 0xFFFFFFFF
    out["header-size-huge.qed"] = img.bytes()
    img, _, _ = standard()
    img.kw["hs"] = 0x10000
    out["header-size-65536.qed"] = img.bytes()
    img, _, _ = standard()
    img.kw["hs"] = 0
    out["header-size-zero.qed"] = img.bytes()

    out["table-size-zero.qed"] = header(ts=0) + bytes(3 * CS - 64)
    out["table-size-32.qed"] = header(ts=32) + bytes(3 * CS - 64)
    out["cluster-size-zero.qed"] = header(cs=0) + bytes(3 * CS - 64)
    out["unknown-feature-bits.qed"] = header(features=U64_MAX) + bytes(3 * CS - 64)
    out["short-header.qed"] = header()[:40]
    out["empty.qed"] = b""

    # --- backing file names ---
    img, _, _ = standard(features=BACKING, bfo=4000, bfs=200)
    out["backing-name-outside-header.qed"] = img.bytes()
    img, _, _ = standard(features=BACKING, bfo=0xFFFFFFFF, bfs=0xFFFFFFFF)
    out["backing-name-u32-max.qed"] = img.bytes()
    img, _, _ = standard(features=BACKING, bfo=64, bfs=CS - 64)
    out["backing-name-whole-cluster.qed"] = img.bytes()  # name = rest of the header cluster

    def backed(name, features=BACKING):
        img, _, _ = standard(features=features, bfo=64, bfs=len(name))
        img.buf[64:64 + len(name)] = name
        return img.bytes()

    out["backing-loop-self.qed"] = backed(b"backing-loop-self.qed")
    out["backing-loop-a.qed"] = backed(b"backing-loop-b.qed")
    out["backing-loop-b.qed"] = backed(b"backing-loop-a.qed")
    out["backing-name-nul.qed"] = backed(b"valid.qed\0ignored")
    out["backing-name-not-utf8.qed"] = backed(b"\xff\xfe-\xc3(.qed")
    out["backing-raw-missing.qed"] = backed(b"does-not-exist.raw", BACKING | NO_PROBE)

    # --- NEED_CHECK plus each table corruption: a writable open repairs ---
    for name in [
        "l1-to-header.qed", "l1-to-l1.qed", "l1-duplicate.qed", "l1-l2-cycle.qed",
        "l1-past-eof.qed", "l1-entry-one.qed", "l1-unaligned.qed", "l1-near-u64-max.qed",
        "l2-to-l2.qed", "l2-to-header.qed", "l2-to-l1.qed", "l2-past-eof.qed",
        "l2-unaligned.qed", "l2-near-u64-max.qed", "l2-duplicate.qed",
    ]:
        raw = bytearray(out[name])
        features = struct.unpack_from("<Q", raw, 16)[0]
        struct.pack_into("<Q", raw, 16, features | NEED_CHECK)
        out["dirty-" + name] = bytes(raw)

    return out


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for name, data in sorted(cases().items()):
        assert len(data) < 100 * 1024, name
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
