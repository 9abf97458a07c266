//! Transmission requests: the compact (28-byte) and extended (32-byte) headers, and the checks
//! that decide whether a request is served or refused with an error.

use super::config::Mode;
use super::consts::*;
use super::error::ProtoError;
use super::wire::Cursor;

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read.
    Read,
    /// Write (with a payload).
    Write,
    /// Disconnect.
    Disc,
    /// Flush.
    Flush,
    /// Trim (discard).
    Trim,
    /// Cache (prefetch).
    Cache,
    /// Write zeroes.
    WriteZeroes,
    /// Block status.
    BlockStatus,
    /// A command this server does not know.
    Unknown(u16),
}

impl Command {
    fn from_wire(kind: u16) -> Self {
        match kind {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The command flags it accepts (besides FUA, which every command accepts).
    fn allowed_flags(self, mode: Mode) -> u16 {
        let mut allowed = CMD_FLAG_FUA;
        match self {
            Self::Read if mode != Mode::Simple => allowed |= CMD_FLAG_DF,
            Self::Write if mode == Mode::Extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
            Self::WriteZeroes => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Self::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        allowed
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Guest offset.
    pub offset: u64,
    /// Effect length (for a write: its payload length).
    pub length: u64,
    /// Payload bytes that follow the header.
    pub payload: u64,
}

impl Request {
    /// Whether `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Header length in `mode`.
pub fn header_len(mode: Mode) -> usize {
    if mode == Mode::Extended {
        32
    } else {
        28
    }
}

/// Decodes a request header (`header_len(mode)` bytes). A payload the client announces with
/// `NBD_CMD_FLAG_PAYLOAD_LEN` beyond `max_payload` cannot be skipped safely and closes the
/// connection; a compact write's 32-bit payload can, and is refused later by [`check`].
pub fn decode_request(mode: Mode, header: &[u8], max_payload: u32) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(header);
    let magic = c.u32().unwrap_or(0);
    let expected = if mode == Mode::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtoError::BadRequestMagic { magic, expected });
    }
    let flags = c.u16().unwrap_or(0);
    let command = Command::from_wire(c.u16().unwrap_or(0));
    let cookie = c.u64().unwrap_or(0);
    let offset = c.u64().unwrap_or(0);
    let length = if mode == Mode::Extended {
        c.u64().unwrap_or(0)
    } else {
        u64::from(c.u32().unwrap_or(0))
    };
    // A write always carries its data. The extended-headers text wants PAYLOAD_LEN on it, but
    // QEMU's client sends extended writes without the flag, so it is not required.
    let has_payload =
        command == Command::Write || (mode == Mode::Extended && flags & CMD_FLAG_PAYLOAD_LEN != 0);
    let payload = if has_payload { length } else { 0 };
    if mode == Mode::Extended && payload > u64::from(max_payload) {
        return Err(ProtoError::PayloadTooLarge {
            len: length,
            limit: max_payload,
        });
    }
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
        payload,
    })
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Negotiated headers.
    pub mode: Mode,
    /// Export size.
    pub size: u64,
    /// Whether writes are allowed.
    pub writable: bool,
    /// Largest payload (and largest read).
    pub max_payload: u32,
    /// Whether metadata contexts were selected.
    pub contexts: bool,
}

/// Whether `request` may be served; the error value to reply with if not.
pub fn check(request: &Request, limits: &Limits) -> Result<(), u32> {
    let command = request.command;
    if let Command::Unknown(_) = command {
        return Err(EINVAL);
    }
    if request.flags & !command.allowed_flags(limits.mode) != 0 {
        return Err(EINVAL);
    }
    let end = request.offset.checked_add(request.length);
    let inside = end.is_some_and(|e| e <= limits.size);
    match command {
        Command::Write | Command::WriteZeroes | Command::Trim => {
            if !limits.writable {
                return Err(EPERM);
            }
            if command == Command::Write && request.payload > u64::from(limits.max_payload) {
                return Err(EINVAL);
            }
            if !inside {
                return Err(if command == Command::Trim {
                    EINVAL
                } else {
                    ENOSPC
                });
            }
        }
        Command::Read => {
            if request.length > u64::from(limits.max_payload) {
                return Err(if limits.mode == Mode::Simple {
                    EINVAL
                } else {
                    EOVERFLOW
                });
            }
            if !inside {
                return Err(EINVAL);
            }
        }
        Command::Cache => {
            if !inside {
                return Err(EINVAL);
            }
        }
        Command::BlockStatus => {
            if !limits.contexts || !inside {
                return Err(EINVAL);
            }
        }
        Command::Flush | Command::Disc | Command::Unknown(_) => {}
    }
    if request.payload > 0 && command != Command::Write {
        // Payload forms of other commands are not offered.
        return Err(EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::wire::PutBe;
    use super::*;

    fn compact(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(REQUEST_MAGIC);
        v.put_u16(flags);
        v.put_u16(kind);
        v.put_u64(cookie);
        v.put_u64(offset);
        v.put_u32(length);
        v
    }

    fn extended(flags: u16, kind: u16, offset: u64, length: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(EXTENDED_REQUEST_MAGIC);
        v.put_u16(flags);
        v.put_u16(kind);
        v.put_u64(7);
        v.put_u64(offset);
        v.put_u64(length);
        v
    }

    const MAX: u32 = 32 << 20;

    fn limits(mode: Mode) -> Limits {
        Limits {
            mode,
            size: 1 << 30,
            writable: true,
            max_payload: MAX,
            contexts: true,
        }
    }

    #[test]
    fn compact_requests_decode() {
        let r = decode_request(Mode::Simple, &compact(1, CMD_WRITE, 9, 4096, 512), MAX).unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!(
            (r.cookie, r.offset, r.length, r.payload),
            (9, 4096, 512, 512)
        );
        assert!(r.has(CMD_FLAG_FUA));
        let r = decode_request(Mode::Structured, &compact(0, CMD_READ, 1, 0, 512), MAX).unwrap();
        assert_eq!(r.payload, 0);
        assert_eq!(header_len(Mode::Structured), 28);
    }

    #[test]
    fn wrong_magic_closes() {
        let h = compact(0, CMD_READ, 1, 0, 512);
        assert!(matches!(
            decode_request(Mode::Extended, &[h.clone(), vec![0; 4]].concat(), MAX),
            Err(ProtoError::BadRequestMagic { .. })
        ));
        let mut h = h;
        h[0] = 0;
        assert!(decode_request(Mode::Simple, &h, MAX).is_err());
    }

    #[test]
    fn extended_requests_carry_64_bit_lengths() {
        let r = decode_request(
            Mode::Extended,
            &extended(0, CMD_WRITE_ZEROES, 0, 1 << 40),
            MAX,
        )
        .unwrap();
        assert_eq!((r.length, r.payload), (1 << 40, 0));
        let r = decode_request(
            Mode::Extended,
            &extended(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 4096),
            MAX,
        )
        .unwrap();
        assert_eq!(r.payload, 4096);
        assert_eq!(header_len(Mode::Extended), 32);
    }

    #[test]
    fn oversized_extended_payload_closes() {
        assert_eq!(
            decode_request(
                Mode::Extended,
                &extended(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, u64::from(MAX) + 1),
                MAX
            ),
            Err(ProtoError::PayloadTooLarge {
                len: u64::from(MAX) + 1,
                limit: MAX
            })
        );
    }

    fn checked(mode: Mode, flags: u16, kind: u16, offset: u64, length: u32) -> Result<(), u32> {
        let r = decode_request(mode, &compact(flags, kind, 1, offset, length), MAX).unwrap();
        check(&r, &limits(mode))
    }

    #[test]
    fn checks_refuse_what_they_must() {
        let s = Mode::Structured;
        assert_eq!(checked(s, 0, CMD_READ, 0, 4096), Ok(()));
        assert_eq!(checked(s, 0, 99, 0, 0), Err(EINVAL));
        assert_eq!(checked(s, 1 << 9, CMD_READ, 0, 1), Err(EINVAL));
        assert_eq!(checked(s, CMD_FLAG_DF, CMD_READ, 0, 1), Ok(()));
        assert_eq!(
            checked(Mode::Simple, CMD_FLAG_DF, CMD_READ, 0, 1),
            Err(EINVAL)
        );
        assert_eq!(checked(s, CMD_FLAG_NO_HOLE, CMD_READ, 0, 1), Err(EINVAL));
        assert_eq!(checked(s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1), Ok(()));
        assert_eq!(checked(s, CMD_FLAG_FUA, CMD_FLUSH, 0, 0), Ok(()));
        assert_eq!(
            checked(
                s,
                CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                CMD_WRITE_ZEROES,
                0,
                1
            ),
            Ok(())
        );
        assert_eq!(checked(s, 0, CMD_READ, (1 << 30) - 1, 2), Err(EINVAL));
        assert_eq!(checked(s, 0, CMD_WRITE, (1 << 30) - 1, 2), Err(ENOSPC));
        assert_eq!(checked(s, 0, CMD_WRITE_ZEROES, 1 << 30, 1), Err(ENOSPC));
        assert_eq!(checked(s, 0, CMD_TRIM, 1 << 30, 1), Err(EINVAL));
        assert_eq!(checked(s, 0, CMD_CACHE, 1 << 30, 1), Err(EINVAL));
        assert_eq!(checked(s, 0, CMD_READ, 0, MAX + 1), Err(EOVERFLOW));
        assert_eq!(checked(Mode::Simple, 0, CMD_READ, 0, MAX + 1), Err(EINVAL));
        assert_eq!(checked(s, 0, CMD_WRITE, 0, MAX + 1), Err(EINVAL));
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mut l = limits(Mode::Structured);
        l.writable = false;
        for kind in [CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM] {
            let r = decode_request(Mode::Structured, &compact(0, kind, 1, 0, 512), MAX).unwrap();
            assert_eq!(check(&r, &l), Err(EPERM));
        }
    }

    #[test]
    fn block_status_needs_contexts() {
        let mut l = limits(Mode::Structured);
        l.contexts = false;
        let r = decode_request(
            Mode::Structured,
            &compact(0, CMD_BLOCK_STATUS, 1, 0, 512),
            MAX,
        )
        .unwrap();
        assert_eq!(check(&r, &l), Err(EINVAL));
    }

    #[test]
    fn extended_payload_forms() {
        let l = limits(Mode::Extended);
        let r = decode_request(Mode::Extended, &extended(0, CMD_WRITE, 0, 512), MAX).unwrap();
        assert_eq!(
            r.payload, 512,
            "a write carries its data without the flag too"
        );
        assert_eq!(check(&r, &l), Ok(()));
        let r = decode_request(
            Mode::Extended,
            &extended(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, 16),
            MAX,
        )
        .unwrap();
        assert_eq!(r.payload, 16);
        assert_eq!(check(&r, &l), Err(EINVAL));
        let r = decode_request(Mode::Extended, &extended(0, CMD_TRIM, 0, 1 << 30), MAX).unwrap();
        assert_eq!(check(&r, &l), Ok(()));
        let r = decode_request(Mode::Extended, &extended(0, CMD_READ, u64::MAX, 2), MAX).unwrap();
        assert_eq!(check(&r, &l), Err(EINVAL));
    }
}
