use super::*;

const FIXED: u32 = FLAG_C_FIXED_NEWSTYLE;

fn config() -> ExportConfig {
    let mut c = ExportConfig::new("disk", 1 << 20);
    c.description = Some("a test disk".into());
    c
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(data.len() as u32);
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.extend_from_slice(name.as_bytes());
    v.put_u16(requests.len() as u16);
    for r in requests {
        v.put_u16(*r);
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.extend_from_slice(name.as_bytes());
    v.put_u32(queries.len() as u32);
    for q in queries {
        v.put_u32(q.len() as u32);
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// A handshake past the client flags.
fn started(config: ExportConfig, flags: u32) -> Handshake {
    let mut h = Handshake::new(config);
    assert!(h.on_bytes(&flags.to_be_bytes()).unwrap().is_empty());
    h
}

/// One option reply: (option, type, data).
type Reply = (u32, u32, Vec<u8>);

fn replies(actions: &[Action]) -> Vec<Reply> {
    let mut bytes = Vec::new();
    for a in actions {
        if let Action::Send(b) = a {
            bytes.extend_from_slice(b);
        }
    }
    let mut c = Cursor::new(&bytes);
    let mut out = Vec::new();
    while c.remaining() > 0 {
        assert_eq!(c.u64().unwrap(), OPTION_REPLY_MAGIC);
        let option = c.u32().unwrap();
        let kind = c.u32().unwrap();
        let len = c.u32().unwrap() as usize;
        out.push((option, kind, c.take(len).unwrap().to_vec()));
    }
    out
}

fn done(actions: &[Action]) -> Option<&Negotiated> {
    actions.iter().find_map(|a| match a {
        Action::Done(n) => Some(n),
        _ => None,
    })
}

fn kinds(r: &[Reply]) -> Vec<u32> {
    r.iter().map(|x| x.1).collect()
}

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let g = Handshake::new(config()).greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
}

#[test]
fn unknown_client_flags_close() {
    let mut h = Handshake::new(config());
    assert_eq!(
        h.on_bytes(&4u32.to_be_bytes()),
        Err(ProtoError::UnknownClientFlags { flags: 4 })
    );
}

#[test]
fn bad_option_magic_closes() {
    let mut h = started(config(), FIXED);
    let mut bytes = opt(OPT_LIST, &[]);
    bytes[0] ^= 1;
    assert!(matches!(
        h.on_bytes(&bytes),
        Err(ProtoError::BadOptionMagic { .. })
    ));
}

#[test]
fn export_name_sends_size_flags_and_zeroes() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_EXPORT_NAME, b"disk")).unwrap();
    let Action::Send(bytes) = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(bytes.len(), 8 + 2 + 124);
    assert_eq!(&bytes[..8], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([bytes[8], bytes[9]]);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF only with structured replies");
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    let n = done(&a).unwrap();
    assert_eq!(n.mode, Mode::Simple);
    assert_eq!(n.flags, flags);
    assert!(h.is_finished());
    assert_eq!(h.on_bytes(&[0]), Err(ProtoError::HandshakeOver));
}

#[test]
fn export_name_with_no_zeroes_omits_the_padding() {
    let mut h = started(config(), FIXED | FLAG_C_NO_ZEROES);
    let a = h.on_bytes(&opt(OPT_EXPORT_NAME, b"disk")).unwrap();
    let Action::Send(bytes) = &a[0] else { panic!() };
    assert_eq!(bytes.len(), 10);
}

#[test]
fn export_name_of_an_unknown_export_closes() {
    let mut h = started(config(), FIXED);
    assert_eq!(
        h.on_bytes(&opt(OPT_EXPORT_NAME, b"other")),
        Err(ProtoError::UnknownExport {
            name: "other".into()
        })
    );
}

#[test]
fn oversized_export_name_closes() {
    let mut h = started(config(), FIXED);
    let long = vec![b'a'; MAX_STRING_LEN + 1];
    assert!(matches!(
        h.on_bytes(&opt(OPT_EXPORT_NAME, &long)),
        Err(ProtoError::NameTooLong { .. })
    ));
    let mut h = started(config(), FIXED);
    let mut header = Vec::new();
    header.put_u64(IHAVEOPT);
    header.put_u32(OPT_EXPORT_NAME);
    header.put_u32(u32::MAX);
    assert!(matches!(
        h.on_bytes(&header),
        Err(ProtoError::NameTooLong { .. })
    ));
}

#[test]
fn leftover_bytes_after_the_handshake_are_handed_on() {
    let mut h = started(config(), FIXED);
    let mut bytes = opt(OPT_EXPORT_NAME, b"disk");
    bytes.extend_from_slice(b"request");
    let a = h.on_bytes(&bytes).unwrap();
    assert_eq!(done(&a).unwrap().leftover, b"request");
}

#[test]
fn go_sends_info_then_ack_and_finishes() {
    let mut h = started(config(), FIXED);
    let a = h
        .on_bytes(&opt(
            OPT_GO,
            &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
        ))
        .unwrap();
    let r = replies(&a);
    assert_eq!(
        kinds(&r),
        vec![REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
    );
    let infos: Vec<u16> = r[..4]
        .iter()
        .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
        .collect();
    assert_eq!(
        infos,
        vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    assert_eq!(&r[2].2[2..], b"a test disk");
    let block = &r[3].2;
    assert_eq!(&block[2..6], &1u32.to_be_bytes());
    assert_eq!(&block[10..14], &(32u32 << 20).to_be_bytes());
    let n = done(&a).unwrap();
    assert!(n.block_size_requested);
    assert!(h.is_finished());
}

#[test]
fn info_does_not_finish_and_go_may_follow() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_INFO, &info_data("disk", &[]))).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_INFO, REP_INFO, REP_ACK]);
    assert!(done(&a).is_none());
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert!(!done(&a).unwrap().block_size_requested);
}

#[test]
fn go_for_an_unknown_export_is_an_error_and_negotiation_goes_on() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_GO, &info_data("nope", &[]))).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_UNKNOWN]);
    assert!(!h.is_finished());
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert!(done(&a).is_some());
}

#[test]
fn malformed_go_is_invalid() {
    let mut h = started(config(), FIXED);
    let mut data = info_data("disk", &[]);
    data.push(0);
    let a = h.on_bytes(&opt(OPT_GO, &data)).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    let a = h.on_bytes(&opt(OPT_GO, &[0, 0])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
}

#[test]
fn unknown_options_get_unsup_and_negotiation_goes_on() {
    let mut h = started(config(), FIXED);
    let mut bytes = opt(4242, b"whatever");
    bytes.extend(opt(OPT_LIST, &[]));
    let a = h.on_bytes(&bytes).unwrap();
    let r = replies(&a);
    assert_eq!((r[0].0, r[0].1), (4242, REP_ERR_UNSUP));
    assert_eq!(kinds(&r[1..]), vec![REP_SERVER, REP_ACK]);
    assert_eq!(&r[1].2[..4], &4u32.to_be_bytes());
    assert_eq!(&r[1].2[4..8], b"disk");
    assert_eq!(&r[1].2[8..], b"a test disk");
}

#[test]
fn list_with_data_is_invalid() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_LIST, b"x")).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
}

#[test]
fn oversized_options_are_skipped_without_buffering() {
    let mut h = started(config(), FIXED);
    let len = MAX_OPTION_LEN + 10;
    let mut header = Vec::new();
    header.put_u64(IHAVEOPT);
    header.put_u32(OPT_GO);
    header.put_u32(len);
    assert!(h.on_bytes(&header).unwrap().is_empty());
    // Fed in pieces; nothing is answered until the last byte, and nothing is kept.
    let piece = vec![0u8; 4096];
    let mut left = len as usize;
    while left > 4096 {
        assert!(h.on_bytes(&piece).unwrap().is_empty());
        assert!(h.buf.is_empty());
        left -= 4096;
    }
    let mut last = vec![0u8; left];
    last.extend(opt(9999, &[]));
    let a = h.on_bytes(&last).unwrap();
    let r = replies(&a);
    assert_eq!((r[0].0, r[0].1), (OPT_GO, REP_ERR_TOO_BIG));
    assert_eq!((r[1].0, r[1].1), (9999, REP_ERR_UNSUP));
}

#[test]
fn too_many_options_close() {
    let mut h = started(config(), FIXED);
    let one = opt(4242, &[]);
    for _ in 0..MAX_OPTIONS {
        h.on_bytes(&one).unwrap();
    }
    assert_eq!(
        h.on_bytes(&one),
        Err(ProtoError::TooManyOptions { limit: MAX_OPTIONS })
    );
}

#[test]
fn bytes_may_arrive_one_at_a_time() {
    let mut h = Handshake::new(config());
    let mut bytes = FIXED.to_be_bytes().to_vec();
    bytes.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    bytes.extend(opt(OPT_GO, &info_data("disk", &[])));
    bytes.extend_from_slice(b"xy");
    let mut all = Vec::new();
    for b in &bytes {
        all.extend(h.on_bytes(std::slice::from_ref(b)).unwrap());
        if h.is_finished() {
            break;
        }
    }
    let n = done(&all).unwrap();
    assert_eq!(n.mode, Mode::Structured);
    assert_ne!(n.flags & TFLAG_SEND_DF, 0);
    assert!(n.leftover.is_empty());
}

#[test]
fn abort_acks_and_ends() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_ABORT, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ACK]);
    assert_eq!(a.last(), Some(&Action::Abort));
    assert!(h.is_finished());
}

#[test]
fn structured_reply_negotiation() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_STRUCTURED_REPLY, b"x")).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    let a = h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ACK]);
    let a = h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    let a = h.on_bytes(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ACK]);
    let a = h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_EXT_HEADER_REQD]);
    let a = h.on_bytes(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert_eq!(done(&a).unwrap().mode, Mode::Extended);
}

#[test]
fn export_name_after_extended_headers_closes() {
    let mut h = started(config(), FIXED);
    h.on_bytes(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
    assert!(matches!(
        h.on_bytes(&opt(OPT_EXPORT_NAME, b"disk")),
        Err(ProtoError::OptionNotAllowed { .. })
    ));
}

#[test]
fn meta_contexts_need_structured_replies() {
    let mut h = started(config(), FIXED);
    let a = h
        .on_bytes(&opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ))
        .unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
}

fn context_names(r: &[Reply]) -> Vec<(u32, String)> {
    r.iter()
        .filter(|x| x.1 == REP_META_CONTEXT)
        .map(|x| {
            (
                u32::from_be_bytes([x.2[0], x.2[1], x.2[2], x.2[3]]),
                String::from_utf8(x.2[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn list_meta_context_lists_what_is_offered() {
    let mut c = config();
    c.allocation_depth = true;
    let mut h = started(c, FIXED);
    h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    let a = h
        .on_bytes(&opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])))
        .unwrap();
    let r = replies(&a);
    assert_eq!(
        context_names(&r),
        vec![
            (0, "base:allocation".into()),
            (0, "qemu:allocation-depth".into())
        ]
    );
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let a = h
        .on_bytes(&opt(
            OPT_LIST_META_CONTEXT,
            &meta_data("disk", &["qemu:", "x-other:thing"]),
        ))
        .unwrap();
    assert_eq!(
        context_names(&replies(&a)),
        vec![(0, "qemu:allocation-depth".into())]
    );
}

#[test]
fn allocation_depth_is_not_offered_without_the_option() {
    let mut h = started(config(), FIXED);
    h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    let a = h
        .on_bytes(&opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:allocation-depth", "base:allocation"]),
        ))
        .unwrap();
    assert_eq!(
        context_names(&replies(&a)),
        vec![(0, "base:allocation".into())]
    );
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert_eq!(
        done(&a).unwrap().contexts,
        vec![MetaContext::BaseAllocation]
    );
}

#[test]
fn set_meta_context_selects_replaces_and_fails() {
    let mut c = config();
    c.allocation_depth = true;
    let mut h = started(c, FIXED);
    h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    let a = h
        .on_bytes(&opt(
            OPT_SET_META_CONTEXT,
            &meta_data(
                "disk",
                &[
                    "base:allocation",
                    "qemu:allocation-depth",
                    "base:allocation",
                    "base:",
                ],
            ),
        ))
        .unwrap();
    assert_eq!(
        context_names(&replies(&a)),
        vec![
            (0, "base:allocation".into()),
            (1, "qemu:allocation-depth".into())
        ]
    );
    // A failing SET still clears the selection.
    let a = h
        .on_bytes(&opt(
            OPT_SET_META_CONTEXT,
            &meta_data("other", &["base:allocation"]),
        ))
        .unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_UNKNOWN]);
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert!(done(&a).unwrap().contexts.is_empty());
}

#[test]
fn set_meta_context_with_a_bad_query_is_invalid() {
    let mut h = started(config(), FIXED);
    h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    let a = h
        .on_bytes(&opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["nocolon"])))
        .unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    let a = h
        .on_bytes(&opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 9]))
        .unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
}

#[test]
fn starttls_is_refused_when_tls_is_off() {
    let mut h = started(config(), FIXED);
    let a = h.on_bytes(&opt(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_POLICY]);
    let a = h.on_bytes(&opt(OPT_STARTTLS, b"x")).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
}

#[test]
fn required_tls_refuses_everything_until_starttls() {
    let mut c = config();
    c.tls = TlsMode::Required;
    let mut h = started(c, FIXED);
    h.on_bytes(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_TLS_REQD]);
    let a = h.on_bytes(&opt(4242, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_TLS_REQD]);
    let mut bytes = opt(OPT_STARTTLS, &[]);
    bytes.extend_from_slice(b"\x16\x03");
    let a = h.on_bytes(&bytes).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ACK]);
    assert_eq!(
        a.last(),
        Some(&Action::StartTls {
            leftover: b"\x16\x03".to_vec()
        })
    );
    let a = h.on_bytes(&opt(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(kinds(&replies(&a)), vec![REP_ERR_INVALID]);
    // Structured replies negotiated before TLS are forgotten.
    let a = h.on_bytes(&opt(OPT_GO, &info_data("disk", &[]))).unwrap();
    assert_eq!(done(&a).unwrap().mode, Mode::Simple);
}

#[test]
fn required_tls_closes_on_export_name() {
    let mut c = config();
    c.tls = TlsMode::Required;
    let mut h = started(c, FIXED);
    assert!(matches!(
        h.on_bytes(&opt(OPT_EXPORT_NAME, b"disk")),
        Err(ProtoError::OptionNotAllowed { .. })
    ));
}

#[test]
fn read_only_exports_advertise_it() {
    let mut c = config();
    c.writable = false;
    let f = c.transmission_flags(Mode::Structured);
    assert_ne!(f & TFLAG_READ_ONLY, 0);
    assert_eq!(f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    let w = config().transmission_flags(Mode::Simple);
    assert_eq!(w & TFLAG_READ_ONLY, 0);
    assert_ne!(w & TFLAG_SEND_FAST_ZERO, 0);
}
