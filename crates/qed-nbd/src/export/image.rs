//! A QED image as an export: the engine's calls, and status from the chain extent iterator.

use qed_image::{ChainKind, ExtentKind, Image, Result, ZeroFlags};

use super::{Export, Status};

impl Export for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }

    fn is_writable(&self) -> bool {
        Image::is_writable(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if fua {
            self.write_at_fua(buf, offset)
        } else {
            Image::write_at(self, buf, offset)
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.write_zeroes_with(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Image::discard(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }

    /// Unallocated in every layer: zero, hole, depth 0. A zero cluster: zero, hole, its
    /// layer's depth. Data: its layer's depth; on top, with `holes`, data whose host range is
    /// a hole (a discard's) is zero and hole.
    fn status(&self, offset: u64, len: u64, max: usize, holes: bool) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for extent in self.chain_extents_iter(offset, len) {
            let e = extent?;
            let depth = u32::try_from(e.depth + 1).unwrap_or(u32::MAX);
            match e.kind {
                ChainKind::Unallocated => out.push(Status {
                    offset: e.offset,
                    length: e.length,
                    zero: true,
                    hole: true,
                    depth: 0,
                }),
                ChainKind::Zero => out.push(Status {
                    offset: e.offset,
                    length: e.length,
                    zero: true,
                    hole: true,
                    depth,
                }),
                ChainKind::Data { .. } if holes && e.depth == 0 => {
                    for piece in self.extents_with_holes(e.offset, e.length) {
                        let p = piece?;
                        let punched = !matches!(p.kind, ExtentKind::Data { .. });
                        out.push(Status {
                            offset: p.offset,
                            length: p.length,
                            zero: punched,
                            hole: punched,
                            depth,
                        });
                        if out.len() >= max {
                            break;
                        }
                    }
                }
                ChainKind::Data { .. } => out.push(Status {
                    offset: e.offset,
                    length: e.length,
                    zero: false,
                    hole: false,
                    depth,
                }),
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }
}
