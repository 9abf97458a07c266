//! How an image is opened: the flags qemu-io's `-r`, `-s`, `-n`, `-t`, `-d`, `-i`, `-k`, `-C`
//! and `-U` set, parsed as QEMU's `bdrv_parse_cache_mode`, `bdrv_parse_discard_flags` and
//! `bdrv_parse_aio` parse their values.

use qed_image::CacheMode;

/// The open flags of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFlags {
    /// Open read-only (`-r`).
    pub read_only: bool,
    /// Open a temporary overlay instead; writes are thrown away (`-s`).
    pub snapshot: bool,
    /// Bypass the host page cache: `O_DIRECT` (`-n`, `-t none`, `-t directsync`).
    pub nocache: bool,
    /// Flushes do nothing (`-t unsafe`).
    pub no_flush: bool,
    /// Every write is flushed before it completes (the default; `-t writethrough`,
    /// `-t directsync`).
    pub writethrough: bool,
    /// Discards give space back (`-d unmap`, the default) or do nothing (`-d ignore`).
    pub unmap: bool,
    /// Reads of ranges the image leaves to its backing file copy them into it (`-C`).
    pub copy_on_read: bool,
    /// `-i native` / `-k`: accepted; as in QEMU it requires `O_DIRECT`.
    pub native_aio: bool,
    /// Take no image lock (`-U`); QEMU allows it on read-only images only.
    pub force_share: bool,
    /// Take no image lock and allow it on writable images too (`-o file.locking=off`).
    pub no_lock: bool,
    /// Do not open the backing file (`-o backing=null`): unallocated ranges read as zeros.
    pub no_backing: bool,
}

impl Default for OpenFlags {
    /// qemu-io's defaults: read-write, writethrough, discards unmap.
    fn default() -> Self {
        Self {
            read_only: false,
            snapshot: false,
            nocache: false,
            no_flush: false,
            writethrough: true,
            unmap: true,
            copy_on_read: false,
            native_aio: false,
            force_share: false,
            no_lock: false,
            no_backing: false,
        }
    }
}

impl OpenFlags {
    /// Applies a cache mode (`none`/`off`, `directsync`, `writeback`, `unsafe`,
    /// `writethrough`); false when the name is not one.
    pub fn set_cache(&mut self, mode: &str) -> bool {
        let (nocache, no_flush, writethrough) = match mode {
            "off" | "none" => (true, false, false),
            "directsync" => (true, false, true),
            "writeback" => (false, false, false),
            "unsafe" => (false, true, false),
            "writethrough" => (false, false, true),
            _ => return false,
        };
        self.nocache = nocache;
        self.no_flush = no_flush;
        self.writethrough = writethrough;
        true
    }

    /// Applies a discard mode (`off`/`ignore`, `on`/`unmap`); false when it is not one.
    pub fn set_discard(&mut self, mode: &str) -> bool {
        match mode {
            "off" | "ignore" => self.unmap = false,
            "on" | "unmap" => self.unmap = true,
            _ => return false,
        }
        true
    }

    /// Applies an AIO mode (`threads`, `native`, `io_uring`); false when it is not one. The
    /// engine does its I/O on threads whatever the mode.
    pub fn set_aio(&mut self, mode: &str) -> bool {
        match mode {
            "threads" | "io_uring" => {}
            "native" => self.native_aio = true,
            _ => return false,
        }
        true
    }

    /// The engine's cache mode for these flags.
    pub fn cache_mode(&self) -> CacheMode {
        if self.nocache {
            CacheMode::None
        } else if self.no_flush {
            CacheMode::Unsafe
        } else {
            CacheMode::Writeback
        }
    }

    /// Whether the image lock is left alone.
    pub fn unlocked(&self) -> bool {
        self.force_share || self.no_lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_modes_as_qemu() {
        let mut f = OpenFlags::default();
        assert!(f.writethrough && !f.nocache);
        assert!(f.set_cache("none"));
        assert!(f.nocache && !f.writethrough);
        assert!(f.set_cache("directsync"));
        assert!(f.nocache && f.writethrough);
        assert!(f.set_cache("unsafe"));
        assert!(!f.nocache && f.no_flush && !f.writethrough);
        assert_eq!(f.cache_mode(), CacheMode::Unsafe);
        assert!(f.set_cache("writeback"));
        assert!(!f.no_flush && !f.writethrough);
        assert!(!f.set_cache("bogus"));
        assert!(f.set_discard("ignore") && !f.unmap);
        assert!(f.set_discard("on") && f.unmap);
        assert!(!f.set_discard("x"));
        assert!(f.set_aio("io_uring") && !f.native_aio);
        assert!(f.set_aio("native") && f.native_aio);
        assert!(!f.set_aio("posix"));
    }
}
