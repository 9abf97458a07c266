"""A small NBD client on a raw socket, for what libnbd will not send: unknown options,
extended headers (libnbd before 1.18 has none), a write cut off half way, requests whose
replies are never read. Only what the peer tests need; every read is bounded by a timeout.
"""

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3

INFO_EXPORT = 0

REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_PAYLOAD_LEN = 1 << 5

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1


class Raw:
    """One connection; `mode` becomes "simple", "structured" or "extended" at `go`."""

    def __init__(self, path, timeout=20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.mode = "simple"
        self.contexts = {}
        self.cookie = 0

    def close(self):
        self.sock.close()

    def recv_exact(self, n):
        parts = []
        while n > 0:
            part = self.sock.recv(min(n, 1 << 20))
            if not part:
                raise EOFError("server closed the connection")
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    # The handshake.

    def greet(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        assert flags & FLAG_FIXED_NEWSTYLE, flags
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        return flags

    def send_option(self, option, data=b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self):
        """One reply: (option, type, data)."""
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return option, kind, self.recv_exact(length)

    def option(self, option, data=b""):
        """Sends an option and collects its replies up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            got, kind, payload = self.option_reply()
            assert got == option, (got, option)
            replies.append((kind, payload))
            if kind == REP_ACK or kind & (1 << 31):
                return replies

    def set_meta_context(self, names, name=b""):
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(names))
        for n in names:
            data += struct.pack(">I", len(n)) + n
        replies = self.option(OPT_SET_META_CONTEXT, data)
        assert replies[-1][0] == REP_ACK, replies
        for kind, payload in replies[:-1]:
            assert kind == REP_META_CONTEXT, kind
            (cid,) = struct.unpack(">I", payload[:4])
            self.contexts[cid] = payload[4:].decode()
        return self.contexts

    def go(self, name=b""):
        """NBD_OPT_GO; returns (size, transmission flags)."""
        replies = self.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert replies[-1][0] == REP_ACK, replies
        size = flags = None
        for kind, payload in replies[:-1]:
            if kind == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:12])
        return size, flags

    def extended(self):
        replies = self.option(OPT_EXTENDED_HEADERS)
        assert replies == [(REP_ACK, b"")], replies
        self.mode = "extended"

    def structured(self):
        replies = self.option(OPT_STRUCTURED_REPLY)
        assert replies == [(REP_ACK, b"")], replies
        self.mode = "structured"

    # Transmission.

    def header(self, command, offset, length, flags=0, cookie=None):
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        if self.mode == "extended":
            return cookie, struct.pack(
                ">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
            )
        return cookie, struct.pack(
            ">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length
        )

    def send(self, command, offset, length, flags=0, payload=b""):
        """Sends one request (with its payload); returns its cookie."""
        if payload and self.mode == "extended":
            flags |= CMD_FLAG_PAYLOAD_LEN
        cookie, head = self.header(command, offset, length, flags)
        self.sock.sendall(head + payload)
        return cookie

    def reply(self, read_len=0):
        """The next reply: a dict with cookie, error, and for chunks the chunk list.
        `read_len` is the data length that follows a successful simple read reply."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_len) if error == 0 and read_len else b""
            return {"cookie": cookie, "error": error, "data": data, "simple": True}
        chunks = []
        while True:
            if magic == EXTENDED_REPLY_MAGIC:
                flags, kind, cookie, offset, length = struct.unpack(
                    ">HHQQQ", self.recv_exact(28)
                )
            else:
                assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
                flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
                offset = None
            chunks.append(
                {
                    "flags": flags,
                    "type": kind,
                    "cookie": cookie,
                    "offset": offset,
                    "payload": self.recv_exact(length),
                }
            )
            if flags & REPLY_FLAG_DONE:
                break
            magic = struct.unpack(">I", self.recv_exact(4))[0]
        error = 0
        for c in chunks:
            if c["type"] & (1 << 15):
                error = struct.unpack(">I", c["payload"][:4])[0]
        return {"cookie": chunks[0]["cookie"], "error": error, "chunks": chunks}

    def call(self, command, offset, length, flags=0, payload=b""):
        cookie = self.send(command, offset, length, flags, payload)
        read_len = length if command == CMD_READ else 0
        got = self.reply(read_len)
        assert got["cookie"] == cookie, (got["cookie"], cookie)
        return got

    def disconnect(self):
        self.send(CMD_DISC, 0, 0)
        self.close()


def read_data(reply, offset, length):
    """The bytes a structured or extended read reply describes (holes as zeros)."""
    if reply.get("simple"):
        return reply["data"]
    out = bytearray(length)
    for c in reply["chunks"]:
        p = c["payload"]
        if c["type"] == REPLY_TYPE_OFFSET_DATA:
            at = struct.unpack(">Q", p[:8])[0] - offset
            out[at : at + len(p) - 8] = p[8:]
    return bytes(out)


def descriptors(chunk):
    """(context id, [(length, status)]) of a block status chunk of either kind."""
    p = chunk["payload"]
    if chunk["type"] == REPLY_TYPE_BLOCK_STATUS_EXT:
        cid, count = struct.unpack(">II", p[:8])
        ds = [struct.unpack(">QQ", p[8 + 16 * i : 24 + 16 * i]) for i in range(count)]
        assert len(p) == 8 + 16 * count, (len(p), count)
        return cid, ds
    assert chunk["type"] == REPLY_TYPE_BLOCK_STATUS, chunk["type"]
    cid = struct.unpack(">I", p[:4])[0]
    n = (len(p) - 4) // 8
    return cid, [struct.unpack(">II", p[4 + 8 * i : 12 + 8 * i]) for i in range(n)]
