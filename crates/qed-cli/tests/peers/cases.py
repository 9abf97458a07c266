"""The client side of crates/qed-cli/tests/serve_peers.rs: `cases.py CASE SOCKET [ARG...]`
drives `qed serve` on the Unix socket SOCKET with libnbd (python3-libnbd, the module nbdsh
runs) or the raw client of nbdraw.py, and prints what it saw as one JSON object on its last
line; the Rust test asserts on it. A case that cannot go on raises (exit status 1).
"""

import json
import os
import signal
import socket
import struct
import sys
import time

import nbd

import nbdraw
from nbdraw import Raw

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def connect(sock, contexts=(), structured=True, strict=True, opt_mode=False):
    """A libnbd handle with compact headers (libnbd 1.18 and later ask for extended headers
    by default; the extended case asks for them itself)."""
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if hasattr(h, "set_request_extended_headers"):
        h.set_request_extended_headers(False)
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_unix(sock)
    return h


def errno_of(call):
    """"ok" when `call` succeeds, else the errno name of the nbd.Error it raised."""
    try:
        call()
        return "ok"
    except nbd.Error as e:
        return e.errno or str(e.errnum)


def pattern(byte, n):
    return bytes([byte]) * n


def negotiation(sock):
    out = {}
    raw = Raw(sock)
    out["greeting_flags"] = raw.greet()
    # An unknown option with a little data, and one larger than the 64 KiB the server holds
    # (it must be skipped as it arrives).
    out["unknown_small"] = raw.option(0x7E57, b"hello, server!")[-1][0]
    out["unknown_big"] = raw.option(0x7E58, pattern(0x61, 100 * KIB))[-1][0]
    listed = raw.option(nbdraw.OPT_LIST)
    out["list_final"] = listed[-1][0]
    out["list_names"] = [
        p[4 : 4 + struct.unpack(">I", p[:4])[0]].decode()
        for kind, p in listed[:-1]
        if kind == nbdraw.REP_SERVER
    ]
    raw.structured()
    out["unknown_after_structured"] = raw.option(0x7E59)[-1][0]
    out["size"], out["transmission_flags"] = raw.go()
    got = raw.call(nbdraw.CMD_READ, 0, 4096)
    out["read_error"] = got["error"]
    out["read_data"] = nbdraw.read_data(got, 0, 4096) == pattern(0x5A, 4096)
    raw.disconnect()

    # libnbd in option mode: LIST, INFO and LIST_META_CONTEXT, then GO.
    h = connect(sock, opt_mode=True)
    names = []
    out["libnbd_opt_list"] = h.opt_list(lambda name, desc: names.append(name))
    out["libnbd_names"] = names
    h.opt_info()
    out["libnbd_info_size"] = h.get_size()
    contexts = []
    h.opt_list_meta_context(lambda name: contexts.append(name))
    out["libnbd_contexts"] = sorted(contexts)
    h.opt_go()
    out["libnbd_read"] = bytes(h.pread(4096, 0)) == pattern(0x5A, 4096)
    h.shutdown()
    return out


def oversized(sock):
    out = {}
    for structured in (True, False):
        h = connect(sock, structured=structured, strict=False)
        key = "structured" if structured else "simple"
        maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
        r = {"maximum": maximum}
        r["read_over"] = errno_of(lambda: h.pread(maximum + 4096, 0))
        r["write_over"] = errno_of(lambda: h.pwrite(pattern(0x77, maximum + 4096), 0))
        # The connection goes on: the refused write's payload was skipped, not taken as
        # requests.
        r["write_after"] = errno_of(lambda: h.pwrite(pattern(0x42, 4096), 8 * MIB))
        r["read_after"] = bytes(h.pread(4096, 8 * MIB)) == pattern(0x42, 4096)
        # Exactly the maximum works both ways.
        r["write_max"] = errno_of(lambda: h.pwrite(pattern(0x43, maximum), 0))
        r["read_max"] = bytes(h.pread(maximum, 0)) == pattern(0x43, maximum)
        r["nothing_else_written"] = bytes(h.pread(4096, maximum)) == bytes(4096)
        h.shutdown()
        out[key] = r
    return out


def out_of_range(sock):
    h = connect(sock, contexts=["base:allocation"], strict=False)
    size = h.get_size()
    out = {"size": size}
    out["read_across_end"] = errno_of(lambda: h.pread(8192, size - 4096))
    out["read_at_end"] = errno_of(lambda: h.pread(512, size))
    out["read_far"] = errno_of(lambda: h.pread(512, 1 << 62))
    # offset + length past 2^64: no wrap-around to the start of the disk.
    out["read_wrapping"] = errno_of(lambda: h.pread(8192, (1 << 64) - 4096))
    out["write_wrapping"] = errno_of(lambda: h.pwrite(pattern(0x55, 8192), (1 << 64) - 4096))
    out["zero_wrapping"] = errno_of(lambda: h.zero(8192, (1 << 64) - 4096))
    out["status_wrapping"] = errno_of(
        lambda: h.block_status(8192, (1 << 64) - 4096, lambda *a: 0)
    )
    out["write_across_end"] = errno_of(lambda: h.pwrite(pattern(0x55, 8192), size - 4096))
    out["write_at_end"] = errno_of(lambda: h.pwrite(pattern(0x55, 512), size))
    out["zero_across_end"] = errno_of(lambda: h.zero(8192, size - 4096))
    out["trim_across_end"] = errno_of(lambda: h.trim(8192, size - 4096))
    out["cache_across_end"] = errno_of(lambda: h.cache(8192, size - 4096))
    out["status_at_end"] = errno_of(lambda: h.block_status(4096, size, lambda *a: 0))
    # The refused writes changed nothing; the last block is still usable.
    out["tail_untouched"] = bytes(h.pread(4096, size - 4096)) == bytes(4096)
    out["head_untouched"] = bytes(h.pread(8192, 0)) == bytes(8192)
    out["tail_write"] = errno_of(lambda: h.pwrite(pattern(0x56, 4096), size - 4096))
    out["tail_read"] = bytes(h.pread(4096, size - 4096)) == pattern(0x56, 4096)
    h.shutdown()
    return out


FUA_WRITES = [(0, 64 * KIB, 0x61), (1 * MIB + 512, 5000, 0x62), (3 * MIB - 4096, 12288, 0x63)]


def fua(sock):
    h = connect(sock)
    out = {"can_fua": h.can_fua()}
    for off, n, byte in FUA_WRITES:
        h.pwrite(pattern(byte, n), off, nbd.CMD_FLAG_FUA)
    out["same_connection"] = all(
        bytes(h.pread(n, off)) == pattern(byte, n) for off, n, byte in FUA_WRITES
    )
    # FUA on the other writing commands is accepted too.
    out["zero_fua"] = errno_of(lambda: h.zero(4096, 4 * MIB, nbd.CMD_FLAG_FUA))
    out["trim_fua"] = errno_of(lambda: h.trim(4096, 5 * MIB, nbd.CMD_FLAG_FUA))
    other = connect(sock)
    out["other_connection"] = all(
        bytes(other.pread(n, off)) == pattern(byte, n) for off, n, byte in FUA_WRITES
    )
    other.shutdown()
    h.shutdown()
    return out


def fast_zero(sock):
    h = connect(sock, contexts=["base:allocation", "qemu:allocation-depth"])
    out = {"can_fast_zero": h.can_fast_zero()}
    # The image: top.qed (64 KiB clusters) over base.qed, which reads 0x5a everywhere; top
    # holds 0x11 over [0, 128 KiB).
    cases = {
        "data_whole_cluster": (0, 64 * KIB),
        "data_part_cluster": (64 * KIB + 4096, 8192),
        "backing_part_cluster": (1 * MIB + 4096, 8192),
        "backing_whole_cluster": (2 * MIB, 64 * KIB),
    }

    def depth(off, n):
        seen = []

        def cb(context, offset, entries, err):
            if context == "qemu:allocation-depth":
                seen.extend(entries)
            return 0

        h.block_status(n, off, cb)
        return seen

    for name, (off, n) in cases.items():
        # The surrounding cluster too: a refused request must not touch it either.
        lo = off - off % (64 * KIB)
        before = bytes(h.pread(128 * KIB, lo))
        depth_before = depth(lo, 64 * KIB)
        result = errno_of(lambda: h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO))
        after = bytes(h.pread(128 * KIB, lo))
        inside = after[off - lo : off - lo + n]
        expected = bytearray(before)
        expected[off - lo : off - lo + n] = bytes(n)
        out[name] = {
            "result": result,
            "zeroed": inside == bytes(n) and after == bytes(expected),
            "unchanged": after == before and depth(lo, 64 * KIB) == depth_before,
        }
    h.shutdown()
    return out


def req_one(sock):
    # The image: 64 MiB, 64 KiB clusters; data at [1 MiB, 1 MiB + 64 KiB), a zero cluster at
    # [2 MiB, 2 MiB + 64 KiB), the rest unallocated.
    h = connect(sock, contexts=["base:allocation", "qemu:allocation-depth"])
    out = {}

    def status(n, off, flags):
        seen = {}

        def cb(context, offset, entries, err):
            assert offset == off, (offset, off)
            seen.setdefault(context, []).append(list(entries))
            return 0

        h.block_status(n, off, cb, flags)
        return seen

    for name, (off, n) in {
        "start": (0, 4 * MIB),
        "data": (1 * MIB, 4 * MIB),
        "inside_data": (1 * MIB + 4096, 4096),
        "zero_cluster": (2 * MIB, 8 * MIB),
        "tail": (63 * MIB, 1 * MIB),
    }.items():
        out[name] = status(n, off, nbd.CMD_FLAG_REQ_ONE)
    out["without_req_one"] = status(4 * MIB, 0, 0)
    h.shutdown()
    return out


def extended(sock):
    # The image: 8 GiB, empty.
    out = {}
    raw = Raw(sock)
    raw.greet()
    raw.extended()
    out["again"] = raw.option(nbdraw.OPT_EXTENDED_HEADERS)[-1][0]
    out["structured_after"] = raw.option(nbdraw.OPT_STRUCTURED_REPLY)[-1][0]
    contexts = raw.set_meta_context([b"base:allocation", b"qemu:allocation-depth"])
    out["contexts"] = sorted(contexts.values())
    out["size"], _ = raw.go()
    size = out["size"]
    far = 6 * GIB + 4096
    data = bytes(range(256)) * 256
    w = raw.call(nbdraw.CMD_WRITE, far, len(data), payload=data)
    out["write"] = [(c["type"], c["flags"], c["offset"]) for c in w["chunks"]]
    r = raw.call(nbdraw.CMD_READ, far, len(data))
    out["read_matches"] = nbdraw.read_data(r, far, len(data)) == data
    out["read_chunk_offsets"] = sorted(
        struct.unpack(">Q", c["payload"][:8])[0]
        for c in r["chunks"]
        if c["type"] == nbdraw.REPLY_TYPE_OFFSET_DATA
    )
    out["read_header_offset"] = r["chunks"][0]["offset"]

    def status(off, n, flags=0):
        got = raw.call(nbdraw.CMD_BLOCK_STATUS, off, n, flags)
        seen = {}
        for c in got["chunks"]:
            if c["type"] in (nbdraw.REPLY_TYPE_BLOCK_STATUS, nbdraw.REPLY_TYPE_BLOCK_STATUS_EXT):
                cid, ds = nbdraw.descriptors(c)
                seen[contexts[cid]] = {"type": c["type"], "descriptors": ds}
        return seen

    # A 64-bit effect length over the whole export, and REQ_ONE's single extent that is
    # longer than 4 GiB.
    out["status_all"] = status(0, size)
    out["status_one"] = status(0, size, nbdraw.CMD_FLAG_REQ_ONE)
    # 64-bit write zeroes and trim.
    out["zero_5g"] = raw.call(nbdraw.CMD_WRITE_ZEROES, 0, 5 * GIB)["error"]
    out["status_after_zero"] = status(0, 6 * GIB, nbdraw.CMD_FLAG_REQ_ONE)
    out["trim_7g"] = raw.call(nbdraw.CMD_TRIM, 0, 7 * GIB)["error"]
    # READ stays bounded by the maximum payload even with 64-bit lengths.
    out["read_5g"] = raw.call(nbdraw.CMD_READ, 0, 5 * GIB)["error"]
    out["read_after"] = nbdraw.read_data(raw.call(nbdraw.CMD_READ, far, 4096), far, 4096) == data[:4096]
    raw.disconnect()

    # libnbd 1.18 and later negotiate extended headers themselves.
    if hasattr(nbd.NBD, "set_request_extended_headers"):
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.set_request_extended_headers(True)
        h.connect_unix(sock)
        lib = {"negotiated": h.get_extended_headers_negotiated()}
        seen = []

        def cb(context, offset, entries, err):
            # block_status_64 (the same release) gives (length, flags) pairs.
            flat = []
            for e in entries:
                flat.extend(e)
            seen.append(flat)
            return 0

        h.block_status_64(size, 0, cb)
        lib["status"] = seen
        lib["read_matches"] = bytes(h.pread(len(data), far)) == data
        h.shutdown()
        out["libnbd"] = lib
    else:
        out["libnbd"] = None
    return out


def structured_holes(sock):
    # The image: 4 MiB, 64 KiB clusters; 0x33 over [64 KiB, 128 KiB), a zero cluster at
    # [256 KiB, 320 KiB), 0x34 over [1 MiB, 1 MiB + 4 KiB) (one partly written cluster).
    h = connect(sock)
    out = {"structured": h.get_structured_replies_negotiated()}

    def read(off, n, flags=0):
        chunks = []

        def cb(subbuf, offset, status, err):
            chunks.append([offset, len(subbuf), status])
            if status == nbd.READ_HOLE:
                assert bytes(subbuf) == bytes(len(subbuf))
            return 0

        buf = bytes(h.pread_structured(n, off, cb, flags))
        chunks.sort()
        return buf, chunks

    buf, chunks = read(0, 2 * MIB)
    expected = bytearray(2 * MIB)
    expected[64 * KIB : 128 * KIB] = pattern(0x33, 64 * KIB)
    expected[1 * MIB : 1 * MIB + 4096] = pattern(0x34, 4096)
    out["whole"] = {"chunks": chunks, "data_matches": buf == bytes(expected)}
    buf, chunks = read(32 * KIB, 64 * KIB)
    out["straddling"] = {
        "chunks": chunks,
        "data_matches": buf == bytes(expected[32 * KIB : 96 * KIB]),
    }
    buf, chunks = read(0, 2 * MIB, nbd.CMD_FLAG_DF)
    out["df"] = {"chunks": chunks, "data_matches": buf == bytes(expected)}
    out["names"] = {"data": nbd.READ_DATA, "hole": nbd.READ_HOLE}
    h.shutdown()
    return out


def half_write(sock):
    out = {}
    a = connect(sock)
    a.pwrite(pattern(0x44, 64 * KIB), 0)
    # A client that sends a 1 MiB write, half its payload, and leaves.
    raw = Raw(sock)
    raw.greet()
    raw.go()
    _, head = raw.header(nbdraw.CMD_WRITE, 1 * MIB, 1 * MIB)
    raw.sock.sendall(head + pattern(0x99, 512 * KIB))
    raw.close()
    # One that leaves half way through a request header.
    cut = Raw(sock)
    cut.greet()
    cut.go()
    cut.sock.sendall(head[:10])
    cut.close()
    # One that leaves in the middle of the handshake, inside an option.
    mid = Raw(sock)
    mid.greet()
    mid.sock.sendall(struct.pack(">QII", nbdraw.IHAVEOPT, nbdraw.OPT_GO, 100) + b"\0\0")
    mid.close()
    time.sleep(0.5)
    # The connection that was there all along goes on.
    out["a_reads_own"] = bytes(a.pread(64 * KIB, 0)) == pattern(0x44, 64 * KIB)
    out["cut_write_absent"] = bytes(a.pread(1 * MIB, 1 * MIB)) == bytes(1 * MIB)
    a.pwrite(pattern(0x45, 64 * KIB), 2 * MIB)
    a.flush()
    # And a new one is served.
    b = connect(sock)
    out["b_reads"] = bytes(b.pread(64 * KIB, 0)) == pattern(0x44, 64 * KIB) and bytes(
        b.pread(64 * KIB, 2 * MIB)
    ) == pattern(0x45, 64 * KIB)
    b.shutdown()
    a.shutdown()
    return out


def hog(sock, count, length):
    """Sends `count` reads of `length` bytes and never reads a reply; prints how many were
    sent, then waits to be killed."""
    raw = Raw(sock)
    raw.greet()
    raw.go()
    raw.sock.settimeout(3.0)
    sent = 0
    try:
        # In batches, so that the socket holds many: the server reads them into its buffer.
        while sent < int(count):
            batch = b"".join(
                raw.header(nbdraw.CMD_READ, 0, int(length))[1] for _ in range(256)
            )
            raw.sock.sendall(batch)
            sent += 256
    except (socket.timeout, BlockingIOError):
        pass
    print(json.dumps({"sent": sent}), flush=True)
    time.sleep(600)
    return None


def probe(sock):
    """What another client does while one hogs the server: it must be served, quickly."""
    start = time.monotonic()
    h = connect(sock)
    h.pwrite(pattern(0x66, 64 * KIB), 16 * MIB)
    h.flush()
    ok = bytes(h.pread(64 * KIB, 16 * MIB)) == pattern(0x66, 64 * KIB)
    ok = ok and bytes(h.pread(4096, 0)) == pattern(0x5A, 4096)
    h.shutdown()
    return {"ok": ok, "seconds": time.monotonic() - start}


CASES = {
    "negotiation": negotiation,
    "oversized": oversized,
    "out_of_range": out_of_range,
    "fua": fua,
    "fast_zero": fast_zero,
    "req_one": req_one,
    "extended": extended,
    "structured_holes": structured_holes,
    "half_write": half_write,
    "hog": hog,
    "probe": probe,
}


def main():
    # A case that hangs ends here instead of holding the test.
    signal.alarm(int(os.environ.get("PEER_TIMEOUT", "120")))
    case, sock, *args = sys.argv[1:]
    result = CASES[case](sock, *args)
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
