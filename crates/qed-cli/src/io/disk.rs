//! The open image as qemu-io's block backend sees it: the request checks of the block layer
//! (`Request exceeds the disk` is `EIO`), the cache mode's flushes (writethrough: a flush
//! before every write completes), the discard mode, and copy-on-read. Shared by the commands
//! and the asynchronous requests in flight (`Send + Sync`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use qed_image::{Error, ExtentKind, Result, ZeroFlags};

use super::flags::OpenFlags;
use super::target::Target;

/// Bytes copied per step by copy-on-read.
const COPY_CHUNK: u64 = 1 << 20;

/// An open image with its I/O policy.
#[derive(Debug)]
pub struct Disk {
    target: Target,
    writethrough: bool,
    unmap: bool,
    copy_on_read: bool,
    /// Flushes issued (the writethrough ones included), for tests.
    flushes: AtomicU64,
    /// Writes hold it shared; a copy-on-read holds it exclusively while it checks what is
    /// still unallocated and copies it, so that it never copies over a newer write.
    copy_guard: RwLock<()>,
}

impl Disk {
    /// The image with the policy `flags` asks for.
    pub fn new(target: Target, flags: &OpenFlags) -> Self {
        Self {
            target,
            writethrough: flags.writethrough,
            unmap: flags.unmap,
            copy_on_read: flags.copy_on_read,
            flushes: AtomicU64::new(0),
            copy_guard: RwLock::new(()),
        }
    }

    /// The image itself.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.target.is_writable()
    }

    /// Virtual disk size.
    pub fn size(&self) -> u64 {
        self.target.size()
    }

    /// Flushes issued so far.
    #[cfg(test)]
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// The block layer's request check: the range must end inside the disk.
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset > size || size - offset < len {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Reads guest bytes; with copy-on-read, what the backing file supplied is copied into
    /// the image (whole clusters) first.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if self.copy_on_read {
            self.copy_in(offset, buf.len() as u64)?;
        }
        self.target.read_at(buf, offset)
    }

    /// Writes guest bytes; flushed before returning with `fua` or in writethrough mode.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        {
            let _writing = self
                .copy_guard
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.target.write_at(buf, offset)?;
        }
        self.settle(fua)
    }

    /// Writes zeros (`write -z`): `unmap` (`-u`) lets space be given back when the discard
    /// mode allows it; `no_fallback` (`-n`) is refused for QED as QEMU's QED driver refuses
    /// it (`ENOTSUP`).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        no_fallback: bool,
    ) -> Result<()> {
        self.check(offset, len)?;
        if no_fallback && self.target.image().is_some() {
            return Err(Error::Unsupported(
                "zero writes without a fallback (QED cannot promise them)".into(),
            ));
        }
        {
            let _writing = self
                .copy_guard
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.target.write_zeroes(offset, len, unmap && self.unmap)?;
        }
        self.settle(false)
    }

    /// Discards a range; with `-d ignore` the request succeeds and changes nothing.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        if !self.unmap {
            return Ok(());
        }
        {
            let _writing = self
                .copy_guard
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.target.discard(offset, len)?;
        }
        self.settle(false)
    }

    /// Changes the virtual size.
    pub fn truncate(&self, size: u64) -> Result<()> {
        {
            let _writing = self
                .copy_guard
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.target.resize(size)?;
        }
        self.settle(false)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.target.flush()
    }

    /// The flush a write owes before it completes.
    fn settle(&self, fua: bool) -> Result<()> {
        if fua || self.writethrough {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Copy-on-read: copies the clusters of `[offset, offset + len)` that this image leaves
    /// to its backing file into it, as QEMU does: data as data, zeros as zero clusters.
    fn copy_in(&self, offset: u64, len: u64) -> Result<()> {
        let Some(image) = self.target.image() else {
            return Ok(());
        };
        if !image.is_writable() || len == 0 {
            return Ok(());
        }
        let cluster = image.cluster_size();
        let start = offset / cluster * cluster;
        let end = (offset + len)
            .div_ceil(cluster)
            .saturating_mul(cluster)
            .min(self.size());
        let unallocated = |from: u64, to: u64| -> Result<Vec<(u64, u64)>> {
            let mut runs = Vec::new();
            for extent in image.extents(from, to - from) {
                let extent = extent?;
                if matches!(extent.kind, ExtentKind::Unallocated) {
                    runs.push((extent.offset, extent.length));
                }
            }
            Ok(runs)
        };
        if unallocated(start, end)?.is_empty() {
            return Ok(());
        }
        let _copying = self
            .copy_guard
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for (run_offset, run_len) in unallocated(start, end)? {
            let mut done = 0;
            while done < run_len {
                let n = (run_len - done).min(COPY_CHUNK);
                let at = run_offset + done;
                let mut data = vec![0u8; n as usize];
                image.read_at(&mut data, at)?;
                if data.iter().all(|&b| b == 0) {
                    image.write_zeroes_with(at, n, ZeroFlags::default())?;
                } else {
                    image.write_at(&data, at)?;
                }
                done += n;
            }
        }
        Ok(())
    }

    /// Closes the image (writes back and marks a QED image clean).
    pub fn close(self) -> Result<()> {
        self.target.close()
    }
}
