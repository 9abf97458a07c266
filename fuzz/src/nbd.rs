//! Bodies of the NBD fuzz targets, included by path by the targets and by the corpus replay
//! test of `qed-nbd` (`crates/qed-nbd/tests/fuzz_corpus.rs`), so `qed-image`'s replay of
//! `lib.rs` does not depend on `qed-nbd`.

use qed_nbd::proto::{
    check, decode_request, header_len, Action, Command, ExportConfig, Handshake, Limits, Mode,
    ProtoError, MAX_OPTION_LEN,
};

/// Most reply bytes one option may cause (a LIST or GO reply of the longest strings).
const MAX_REPLY_PER_OPTION: usize = 5 * 4200;

/// Target `nbd_handshake`: the bytes, cut into pieces whose sizes come from the input, fed to
/// a handshake. It must never panic; what it sends is bounded by what it was sent; a `Done`
/// hands on exactly the bytes that followed the option that ended the handshake.
pub fn nbd_handshake(data: &[u8]) {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let mut config = ExportConfig::new("disk", 1 << 30);
    config.description = Some("fuzz".into());
    config.allocation_depth = cut & 1 != 0;
    let mut hs = Handshake::new(config);
    let piece = usize::from(cut >> 1).max(1);
    let mut sent = 0usize;
    let mut fed = 0usize;
    for chunk in input.chunks(piece) {
        fed += chunk.len();
        let actions = match hs.on_bytes(chunk) {
            Ok(a) => a,
            Err(ProtoError::HandshakeOver) => {
                assert!(hs.is_finished());
                return;
            }
            Err(_) => return,
        };
        for action in actions {
            match action {
                Action::Send(bytes) => sent += bytes.len(),
                Action::Done(n) => {
                    assert!(n.leftover.len() <= chunk.len());
                    assert!(input[..fed].ends_with(&n.leftover));
                    return;
                }
                Action::Abort => return,
                Action::StartTls { .. } => panic!("TLS was not offered"),
            }
        }
        // Every option is at least a 16-byte header.
        let options = fed / 16 + 1;
        assert!(
            sent <= options * MAX_REPLY_PER_OPTION,
            "{sent} bytes sent for {fed} received"
        );
        assert!(hs.wants() <= MAX_OPTION_LEN as usize + 16);
    }
}

/// Target `nbd_requests`: the bytes as a stream of request headers in each header mode. A
/// header either fails to decode or decodes to a request whose checks, when they pass, keep
/// it inside the export and within the maximum payload.
pub fn nbd_requests(data: &[u8]) {
    const MAX: u32 = 32 << 20;
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let limits = Limits {
            mode,
            size: 1 << 30,
            writable: data.first().is_some_and(|b| b & 1 == 0),
            max_payload: MAX,
            contexts: data.first().is_some_and(|b| b & 2 == 0),
        };
        for header in data.chunks_exact(header_len(mode)).take(1024) {
            let Ok(request) = decode_request(mode, header, MAX) else {
                continue;
            };
            if mode == Mode::Extended {
                assert!(request.payload <= u64::from(MAX));
            }
            if check(&request, &limits).is_err() {
                continue;
            }
            match request.command {
                Command::Read | Command::Write => {
                    assert!(request.length <= u64::from(MAX));
                    assert!(request.offset + request.length <= limits.size);
                }
                Command::WriteZeroes | Command::Trim | Command::Cache | Command::BlockStatus => {
                    assert!(request.offset.checked_add(request.length).is_some());
                    assert!(request.offset + request.length <= limits.size);
                }
                Command::Flush | Command::Disc => {}
                Command::Unknown(_) => panic!("an unknown command passed the checks"),
            }
            if matches!(
                request.command,
                Command::Write | Command::WriteZeroes | Command::Trim
            ) {
                assert!(limits.writable);
            }
        }
    }
}
