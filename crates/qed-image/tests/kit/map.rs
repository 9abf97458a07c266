//! Allocation maps in the shape `qemu-img map --output=json` prints, so that ours and QEMU's
//! can be compared.

use std::collections::BTreeMap;

use qed_image::{ChainExtent, ChainKind};

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// `None` where the depth is not compared (see [`chain_to_map`]).
    pub depth: Option<u64>,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    fn joins(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

fn merge_push(out: &mut Vec<MapEntry>, e: MapEntry) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.joins(&e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Parses the JSON printed by `qemu-img map --output=json` (one flat object per entry; only
/// numbers and booleans), dropping empty entries and the depth of entries that are not
/// present (see [`chain_to_map`]). Adjacent equal entries are merged again.
pub fn parse_qemu_map(json: &str) -> Vec<MapEntry> {
    let mut out = Vec::new();
    for obj in json.split('{').skip(1) {
        let body = obj.split('}').next().expect("object body");
        let mut fields = BTreeMap::new();
        for pair in body.split(',') {
            let Some((k, v)) = pair.split_once(':') else {
                continue;
            };
            fields.insert(k.trim().trim_matches('"').to_string(), v.trim().to_string());
        }
        let num = |k: &str| -> Option<u64> { fields.get(k).map(|v| v.parse().expect(k)) };
        let flag = |k: &str| fields.get(k).is_some_and(|v| v == "true");
        let present = flag("present");
        merge_push(
            &mut out,
            MapEntry {
                start: num("start").expect("start"),
                length: num("length").expect("length"),
                depth: if present { num("depth") } else { None },
                present,
                zero: flag("zero"),
                data: flag("data"),
                offset: num("offset"),
            },
        );
    }
    out
}

/// Converts our chain extents into `qemu-img map` entries.
///
/// How a [`ChainExtent`] maps onto the fields QEMU prints:
/// * `ChainKind::Data { host_offset }` at depth d → `present: true, data: true, zero: false,
///   depth: d, offset: host_offset` (for a raw backing layer the host offset is the guest
///   offset, exactly what QEMU reports; for a QED layer it is the offset in that layer's file).
/// * `ChainKind::Zero` at depth d → `present: true, zero: true, data: false, depth: d`, no
///   offset (QED zero clusters have no host cluster).
/// * `ChainKind::Unallocated` → `present: false, zero: true, data: false`, no offset. Its
///   depth is not compared: ours counts the layers looked through (1 past the end of a
///   shorter backing file), while QEMU stops at the first layer whose block status says
///   "zero" and prints depth 0 there. The parser drops the depth of non-present entries too.
///
/// Entries are merged like qemu-img does (same fields, contiguous offsets).
pub fn chain_to_map(extents: &[ChainExtent]) -> Vec<MapEntry> {
    let mut out = Vec::new();
    for e in extents {
        let (present, zero, data, offset, depth) = match e.kind {
            ChainKind::Data { host_offset } => {
                (true, false, true, Some(host_offset), Some(e.depth as u64))
            }
            ChainKind::Zero => (true, true, false, None, Some(e.depth as u64)),
            ChainKind::Unallocated => (false, true, false, None, None),
        };
        merge_push(
            &mut out,
            MapEntry {
                start: e.offset,
                length: e.length,
                depth,
                present,
                zero,
                data,
                offset,
            },
        );
    }
    out
}
