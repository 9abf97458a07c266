//! Option payloads (what `NBD_OPT_INFO`/`GO` and the meta-context options carry) and option
//! replies. Parsing is bounded by the option's length, which the handshake has bounded already.

use super::consts::*;
use super::wire::{Cursor, PutBe};

/// An option payload that does not parse; answered with `NBD_REP_ERR_INVALID` and this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// One option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    // Every reply the server builds is far below 4 GiB (strings are at most 4096 bytes).
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
    out
}

/// An error reply with a message for people.
pub fn error_reply(option: u32, error: u32, message: &str) -> Vec<u8> {
    option_reply(option, error, clip(message.as_bytes()))
}

/// At most [`MAX_STRING_LEN`] bytes of `s`.
pub fn clip(s: &[u8]) -> &[u8] {
    &s[..s.len().min(MAX_STRING_LEN)]
}

/// What `NBD_OPT_INFO` and `NBD_OPT_GO` ask: an export name and information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name as sent.
    pub name: &'a [u8],
    /// The information types asked for (unknown ones included; they are ignored).
    pub requests: Vec<u16>,
}

impl InfoRequest<'_> {
    /// Whether the client asked for `info`.
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, Invalid> {
    let mut c = Cursor::new(data);
    let short = |_| Invalid("option data too short");
    let name_len = c.u32().map_err(short)? as usize;
    if name_len > data.len().saturating_sub(6) {
        return Err(Invalid("export name length exceeds the option data"));
    }
    if name_len > MAX_STRING_LEN {
        return Err(Invalid("export name too long"));
    }
    let name = c.take(name_len).map_err(short)?;
    let count = c.u16().map_err(short)? as usize;
    if c.remaining() != count * 2 {
        return Err(Invalid(
            "information request count does not match the option length",
        ));
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(c.u16().map_err(short)?);
    }
    Ok(InfoRequest { name, requests })
}

/// What `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// The export name as sent.
    pub name: &'a [u8],
    /// The queries, in order.
    pub queries: Vec<&'a [u8]>,
}

/// Parses a meta-context option payload.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest<'_>, Invalid> {
    let mut c = Cursor::new(data);
    let short = |_| Invalid("option data too short");
    let name_len = c.u32().map_err(short)? as usize;
    if name_len > MAX_STRING_LEN {
        return Err(Invalid("export name too long"));
    }
    let name = c.take(name_len).map_err(short)?;
    let count = c.u32().map_err(short)? as usize;
    // Each query takes at least its 4-byte length: the option length bounds the count.
    if count > c.remaining() / 4 {
        return Err(Invalid("query count exceeds the option data"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32().map_err(short)? as usize;
        if len > MAX_STRING_LEN {
            return Err(Invalid("query too long"));
        }
        queries.push(c.take(len).map_err(short)?);
    }
    if c.remaining() != 0 {
        return Err(Invalid("trailing bytes after the queries"));
    }
    Ok(MetaRequest { name, queries })
}

/// A metadata context this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero flags.
    BaseAllocation,
    /// `qemu:allocation-depth`: which layer of the backing chain holds a range (0: none).
    AllocationDepth,
}

impl MetaContext {
    /// The context's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::BaseAllocation => "base:allocation",
            Self::AllocationDepth => "qemu:allocation-depth",
        }
    }

    /// The id the server gives it when selected.
    pub fn id(self) -> u32 {
        match self {
            Self::BaseAllocation => 0,
            Self::AllocationDepth => 1,
        }
    }

    /// The context with this id.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(Self::BaseAllocation),
            1 => Some(Self::AllocationDepth),
            _ => None,
        }
    }
}

/// The contexts a query names. `list` is true for `NBD_OPT_LIST_META_CONTEXT`, where a bare
/// namespace (`base:`) is a wildcard; for `SET` it selects nothing. Unknown namespaces and
/// leaf names select nothing; a query without a colon is invalid.
pub fn match_query(
    query: &[u8],
    list: bool,
    offered: &[MetaContext],
) -> Result<Vec<MetaContext>, Invalid> {
    let Some(colon) = query.iter().position(|&b| b == b':') else {
        return Err(Invalid("query lacks a namespace"));
    };
    let (namespace, leaf) = (&query[..colon], &query[colon + 1..]);
    let found = offered
        .iter()
        .copied()
        .filter(|c| {
            let (ns, name) = c.name().split_once(':').unwrap_or(("", ""));
            ns.as_bytes() == namespace && (leaf == name.as_bytes() || (list && leaf.is_empty()))
        })
        .collect();
    Ok(found)
}

/// `NBD_REP_META_CONTEXT` data: id and name.
pub fn meta_context_data(id: u32, context: MetaContext) -> Vec<u8> {
    let mut data = Vec::new();
    data.put_u32(id);
    data.extend_from_slice(context.name().as_bytes());
    data
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.put_u16(INFO_EXPORT);
    data.put_u64(size);
    data.put_u16(flags);
    data
}

/// `NBD_REP_INFO` data for a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(info: u16, s: &str) -> Vec<u8> {
    let mut data = Vec::new();
    data.put_u16(info);
    data.extend_from_slice(clip(s.as_bytes()));
    data
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.put_u16(INFO_BLOCK_SIZE);
    data.put_u32(minimum);
    data.put_u32(preferred);
    data.put_u32(maximum);
    data
}

/// `NBD_REP_SERVER` data: the name, then a description for people.
pub fn server_data(name: &str, description: Option<&str>) -> Vec<u8> {
    let mut data = Vec::new();
    let name = clip(name.as_bytes());
    data.put_u32(name.len() as u32);
    data.extend_from_slice(name);
    if let Some(d) = description {
        data.extend_from_slice(clip(d.as_bytes()));
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_payload(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.extend_from_slice(name);
        v.put_u16(requests.len() as u16);
        for r in requests {
            v.put_u16(*r);
        }
        v
    }

    #[test]
    fn info_request_parses() {
        let p = info_payload(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE, 77]);
        let r = parse_info_request(&p).unwrap();
        assert_eq!(r.name, b"disk");
        assert!(r.wants(INFO_BLOCK_SIZE));
        assert!(!r.wants(INFO_DESCRIPTION));
    }

    #[test]
    fn info_request_rejects_bad_lengths() {
        let mut p = info_payload(b"disk", &[INFO_NAME]);
        p.push(0);
        assert!(parse_info_request(&p).is_err());
        let mut p = info_payload(b"disk", &[]);
        p[3] = 200; // name length past the data
        assert!(parse_info_request(&p).is_err());
        assert!(parse_info_request(&[0, 0]).is_err());
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(parse_info_request(&info_payload(&long, &[])).is_err());
    }

    fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.extend_from_slice(name);
        v.put_u32(queries.len() as u32);
        for q in queries {
            v.put_u32(q.len() as u32);
            v.extend_from_slice(q);
        }
        v
    }

    #[test]
    fn meta_request_parses_and_bounds_the_count() {
        let p = meta_payload(b"", &[b"base:allocation", b"qemu:"]);
        let r = parse_meta_request(&p).unwrap();
        assert_eq!(r.queries, vec![&b"base:allocation"[..], &b"qemu:"[..]]);
        let mut p = meta_payload(b"", &[]);
        p[7] = 0xff; // claims 255 queries with no bytes for them
        assert_eq!(
            parse_meta_request(&p),
            Err(Invalid("query count exceeds the option data"))
        );
        let mut p = meta_payload(b"", &[b"base:allocation"]);
        p.push(1);
        assert!(parse_meta_request(&p).is_err());
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(parse_meta_request(&meta_payload(b"", &[&long])).is_err());
    }

    #[test]
    fn queries_match_contexts() {
        let all = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];
        let base = [MetaContext::BaseAllocation];
        assert_eq!(
            match_query(b"base:allocation", false, &all).unwrap(),
            vec![MetaContext::BaseAllocation]
        );
        assert_eq!(match_query(b"base:", true, &all).unwrap(), base.to_vec());
        assert!(match_query(b"base:", false, &all).unwrap().is_empty());
        assert_eq!(
            match_query(b"qemu:", true, &all).unwrap(),
            vec![MetaContext::AllocationDepth]
        );
        assert!(match_query(b"qemu:allocation-depth", false, &base)
            .unwrap()
            .is_empty());
        assert!(match_query(b"x-foo:bar", true, &all).unwrap().is_empty());
        assert!(match_query(b"base:nothing", false, &all)
            .unwrap()
            .is_empty());
        assert!(match_query(b"nocolon", true, &all).is_err());
    }

    #[test]
    fn replies_have_the_header() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&r[12..16], &REP_ACK.to_be_bytes());
        let long = "x".repeat(10_000);
        assert_eq!(
            error_reply(1, REP_ERR_INVALID, &long).len(),
            20 + MAX_STRING_LEN
        );
        assert_eq!(info_export(5, 1).len(), 12);
        assert_eq!(info_block_size(1, 4096, 1 << 25).len(), 14);
    }
}
