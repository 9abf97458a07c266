//! A window on another export: guest byte N is byte `start + N` of the inner export
//! (`qed serve -o`).

use std::sync::Arc;

use qed_image::{Error, Result, ZeroFlags};

use super::{Export, Status};

/// The part of `inner` from `start` to its end.
pub struct Window {
    inner: Arc<dyn Export>,
    start: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("start", &self.start)
            .finish()
    }
}

impl Window {
    /// The window of `inner` from `start`; fails when `start` lies past its end.
    pub fn new(inner: Arc<dyn Export>, start: u64) -> Result<Self> {
        if start > inner.size() {
            return Err(Error::InvalidArgument(format!(
                "offset {start} is past the end of the image ({} bytes)",
                inner.size()
            )));
        }
        Ok(Self { inner, start })
    }

    fn at(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(self.start + offset),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }
}

impl Export for Window {
    fn size(&self) -> u64 {
        self.inner.size() - self.start
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let at = self.at(offset, len)?;
        self.inner.write_zeroes(at, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.at(offset, len)?;
        self.inner.discard(at, len)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn status(&self, offset: u64, len: u64, max: usize, holes: bool) -> Result<Vec<Status>> {
        let len = len.min(self.size().saturating_sub(offset));
        let mut out = self
            .inner
            .status(self.start.saturating_add(offset), len, max, holes)?;
        for s in &mut out {
            s.offset -= self.start;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qed_image::storage::MemoryStorage;
    use qed_image::{CreateParams, Image, OpenOptions};

    #[test]
    fn shifts_every_call_and_bounds_the_size() {
        let storage = MemoryStorage::new();
        Image::create_on(
            &storage,
            &CreateParams {
                image_size: 1 << 20,
                cluster_size: 4096,
                table_size: 1,
                backing_file: None,
                backing_raw: false,
            },
        )
        .unwrap();
        let image: Arc<dyn Export> = Arc::new(
            Image::open_storage(Box::new(storage), &OpenOptions::read_write(), None).unwrap(),
        );
        assert!(Window::new(Arc::clone(&image), (1 << 20) + 1).is_err());
        let w = Window::new(Arc::clone(&image), 65536).unwrap();
        assert_eq!(w.size(), (1 << 20) - 65536);
        w.write_at(&[7; 4096], 0, false).unwrap();
        let mut buf = [0u8; 4096];
        image.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [7; 4096]);
        assert!(matches!(
            w.write_at(&[1], w.size(), false),
            Err(Error::OutOfRange { .. })
        ));
        let s = w.status(0, 8192, 16, true).unwrap();
        assert_eq!((s[0].offset, s[0].length, s[0].zero), (0, 4096, false));
        assert_eq!((s[1].offset, s[1].zero), (4096, true));
    }
}
