//! Image locking compatible with QEMU's fcntl OFD byte-range locks.
//!
//! QEMU's `file-posix` driver (`block/file-posix.c`, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`) expresses the block-layer permissions a user of an image holds as
//! shared (`F_RDLCK`) open-file-description locks on single bytes of the image file:
//!
//! * byte `100 + bit` for each permission the user *holds*;
//! * byte `200 + bit` for each permission the user does *not share* with others;
//!
//! where `bit` is the index of the permission in `include/block/block-common.h`:
//! `BLK_PERM_CONSISTENT_READ = 0x01` (bit 0), `BLK_PERM_WRITE = 0x02` (bit 1),
//! `BLK_PERM_WRITE_UNCHANGED = 0x04` (bit 2) and `BLK_PERM_RESIZE = 0x08` (bit 3).
//!
//! Taking permissions means: first lock the bytes, then test with `F_OFD_GETLK` (as if for an
//! exclusive lock) that no other open file description locks byte `200 + bit` for a
//! permission we want, nor byte `100 + bit` for a permission we refuse to share. Locking
//! before testing closes the race between two openers: at least one of them sees the other.
//!
//! [`LockMode`] maps onto exactly the permissions QEMU takes on the file node below a format
//! driver (`bdrv_default_perms_for_storage` in `block.c`, with the `BDRV_O_NO_SHARE` parent
//! permissions of `blk_new_open` that `qemu-io`, `qemu-img` and `qemu-nbd` use):
//!
//! | mode | holds | does not share | bytes locked |
//! | --- | --- | --- | --- |
//! | [`LockMode::Write`] (`qemu-io`) | consistent read, write, resize | write, resize | 100, 101, 103, 201, 203 |
//! | [`LockMode::Read`] (`qemu-io -r`) | consistent read | write, resize | 100, 201, 203 |
//! | [`LockMode::None`] (`-U`) | nothing | nothing | none |
//!
//! The locks belong to the open file description: they last until the last descriptor of the
//! [`File`] they were taken on is closed, and a second `open` of the same file (in this
//! process or another) conflicts with them.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// `RAW_LOCK_PERM_BASE` in QEMU's `block/file-posix.c`.
const LOCK_PERM_BASE: u64 = 100;
/// `RAW_LOCK_SHARED_BASE` in QEMU's `block/file-posix.c`.
const LOCK_SHARED_BASE: u64 = 200;

/// `BLK_PERM_CONSISTENT_READ`.
const PERM_CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`.
const PERM_WRITE: u8 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`.
const PERM_WRITE_UNCHANGED: u8 = 0x04;
/// `BLK_PERM_RESIZE`.
const PERM_RESIZE: u8 = 0x08;
/// `BLK_PERM_ALL`: the bits QEMU walks (`PERM_FOREACH`).
const PERM_ALL: u8 = 0x0f;

/// QEMU's names for the permission bits (`bdrv_perm_names`), used in error messages.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Which lock to take on an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Read and write; nobody else may write or resize the image, nor take it as long as
    /// anybody else writes it. QEMU's read-write open (`qemu-io img`, a VM's disk).
    #[default]
    Write,
    /// Read only; nobody else may write or resize the image while we hold it. QEMU's
    /// read-only open (`qemu-io -r img`, `qemu-img convert` source).
    Read,
    /// No lock at all and no check (`-U` / `--force-share`).
    None,
}

impl LockMode {
    /// The lock an open takes: none when sharing is forced, else by access.
    pub fn for_access(writable: bool, force_share: bool) -> Self {
        match (force_share, writable) {
            (true, _) => Self::None,
            (false, true) => Self::Write,
            (false, false) => Self::Read,
        }
    }

    /// The `(held, shared)` QEMU permission masks of this mode, or `None` for no locking.
    fn permissions(self) -> Option<(u8, u8)> {
        // Shared by a format node's file child when the parent asks for BDRV_O_NO_SHARE:
        // consistent read and unchanging writes (see the module docs).
        let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
        match self {
            LockMode::Write => Some((PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared)),
            LockMode::Read => Some((PERM_CONSISTENT_READ, shared)),
            LockMode::None => None,
        }
    }
}

/// The QEMU image lock held on an open file.
///
/// OFD locks belong to the open file description, not to this value: they are released when
/// the last descriptor of the [`File`] they were taken on is closed (dropping a
/// [`FileStorage`](super::FileStorage) does that). This value records what is held.
#[derive(Debug, PartialEq, Eq)]
pub struct QemuLock {
    mode: LockMode,
    perm: u8,
    shared: u8,
}

/// How often a conflicting lock is retried before giving up.
const LOCK_RETRIES: u32 = 10;
/// Pause between retries (the whole wait is at most 100 ms).
const LOCK_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

impl QemuLock {
    /// Takes the lock for `mode` on `file` the way QEMU does, failing if another open file
    /// description (of any process, QEMU or ours) holds a conflicting one.
    ///
    /// Returns `Ok(None)` for [`LockMode::None`]. A conflict is an error of kind
    /// [`io::ErrorKind::WouldBlock`] saying which permission could not be had (QEMU's wording:
    /// `Failed to get "write" lock`) and that the image is locked by another process. On any
    /// error no lock byte is left held.
    pub fn acquire(file: &File, mode: LockMode) -> io::Result<Option<Self>> {
        // A conflict can be a lock that outlives its owner for an instant: a child process
        // forked by another thread shares the open file description until it execs. Such a
        // lock goes away within milliseconds; a real owner is still there after the retries.
        let mut attempt = 0;
        loop {
            match Self::try_acquire(file, mode) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt < LOCK_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(LOCK_RETRY_DELAY);
                }
                result => return result,
            }
        }
    }

    fn try_acquire(file: &File, mode: LockMode) -> io::Result<Option<Self>> {
        let Some((perm, shared)) = mode.permissions() else {
            return Ok(None);
        };
        let lock = Self { mode, perm, shared };
        let fd = file.as_raw_fd();
        let bytes = lock.locked_bytes();
        for (i, &byte) in bytes.iter().enumerate() {
            if let Err(errno) = set_lock(fd, byte, libc::F_RDLCK) {
                for &taken in &bytes[..i] {
                    let _ = set_lock(fd, taken, libc::F_UNLCK);
                }
                return Err(lock_error(errno, byte));
            }
        }
        if let Err(e) = lock.check(fd) {
            for &taken in &bytes {
                let _ = set_lock(fd, taken, libc::F_UNLCK);
            }
            return Err(e);
        }
        Ok(Some(lock))
    }

    /// The mode this lock was taken for.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The file offsets of the bytes this lock holds (shared OFD locks of one byte each), in
    /// ascending order.
    pub fn locked_bytes(&self) -> Vec<u64> {
        let unshared = !self.shared & PERM_ALL;
        let held = (0..4)
            .filter(|bit| self.perm & (1 << bit) != 0)
            .map(|bit| LOCK_PERM_BASE + bit);
        let refused = (0..4)
            .filter(|bit| unshared & (1 << bit) != 0)
            .map(|bit| LOCK_SHARED_BASE + bit);
        held.chain(refused).collect()
    }

    /// QEMU's `raw_check_lock_bytes`: nobody else may refuse to share what we hold, nor hold
    /// what we refuse to share.
    fn check(&self, fd: i32) -> io::Result<()> {
        for bit in 0..4u64 {
            if self.perm & (1 << bit) != 0 && locked_by_other(fd, LOCK_SHARED_BASE + bit)? {
                return Err(conflict(format!(
                    "Failed to get \"{}\" lock",
                    PERM_NAMES[bit as usize]
                )));
            }
        }
        let unshared = !self.shared & PERM_ALL;
        for bit in 0..4u64 {
            if unshared & (1 << bit) != 0 && locked_by_other(fd, LOCK_PERM_BASE + bit)? {
                return Err(conflict(format!(
                    "Failed to get shared \"{}\" lock",
                    PERM_NAMES[bit as usize]
                )));
            }
        }
        Ok(())
    }
}

/// A one-byte `flock` at `byte`.
fn flock_at(byte: u64, l_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// `F_OFD_SETLK` (non-blocking) of one byte; `l_type` is `F_RDLCK` or `F_UNLCK`.
fn set_lock(fd: i32, byte: u64, l_type: libc::c_int) -> Result<(), Errno> {
    let fl = flock_at(byte, l_type);
    loop {
        match fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)) {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop),
        }
    }
}

/// QEMU's `qemu_lock_fd_test(fd, byte, 1, true)`: whether another open file description holds
/// any lock on `byte`.
fn locked_by_other(fd: i32, byte: u64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    loop {
        match fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl)) {
            Ok(_) => return Ok(fl.l_type != libc::F_UNLCK as libc::c_short),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(lock_error(errno, byte)),
        }
    }
}

/// The error for a permission another process holds or refuses to share.
fn conflict(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{what}: the image is locked by another process (Is another process using the image?)"
        ),
    )
}

/// The error for a failed `fcntl` on lock byte `byte`.
fn lock_error(errno: Errno, byte: u64) -> io::Error {
    match errno {
        // Somebody holds an exclusive lock on the byte (QEMU never does; other tools may).
        Errno::EAGAIN | Errno::EACCES => conflict(format!("Failed to lock byte {byte}")),
        Errno::EINVAL | Errno::ENOLCK | Errno::ENOSYS | Errno::EOPNOTSUPP => io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "cannot take QEMU image lock byte {byte}: the file system does not support \
                 OFD locks ({errno}); open without locking (force share) to proceed"
            ),
        ),
        _ => io::Error::new(
            io::Error::from(errno).kind(),
            format!("Failed to lock byte {byte}: {errno}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        (dir, path)
    }

    /// Which of the bytes QEMU could lock (100..=104, 200..=204) some OFD other than `probe`'s
    /// holds.
    fn locked_by_others(probe: &File) -> Vec<u64> {
        (100..=104)
            .chain(200..=204)
            .filter(|&b| locked_by_other(probe.as_raw_fd(), b).unwrap())
            .collect()
    }

    fn assert_conflict(result: io::Result<Option<QemuLock>>) {
        let err = result.expect_err("lock must conflict");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("locked by another process"), "{msg}");
        assert!(msg.contains("Failed to get"), "{msg}");
    }

    #[test]
    fn modes_lock_the_bytes_qemu_locks() {
        let (_dir, path) = scratch();
        let probe = open(&path);
        let w = open(&path);
        let lock = QemuLock::acquire(&w, LockMode::Write).unwrap().unwrap();
        assert_eq!(lock.mode(), LockMode::Write);
        assert_eq!(lock.locked_bytes(), vec![100, 101, 103, 201, 203]);
        assert_eq!(locked_by_others(&probe), vec![100, 101, 103, 201, 203]);
        drop(w);
        assert!(locked_by_others(&probe).is_empty(), "closing releases");

        let r = open(&path);
        let lock = QemuLock::acquire(&r, LockMode::Read).unwrap().unwrap();
        assert_eq!(lock.locked_bytes(), vec![100, 201, 203]);
        assert_eq!(locked_by_others(&probe), vec![100, 201, 203]);
        drop(r);

        let n = open(&path);
        assert!(QemuLock::acquire(&n, LockMode::None).unwrap().is_none());
        assert!(locked_by_others(&probe).is_empty());
    }

    #[test]
    fn write_then_write_conflicts() {
        let (_dir, path) = scratch();
        let a = open(&path);
        let _held = QemuLock::acquire(&a, LockMode::Write).unwrap();
        let b = open(&path);
        assert_conflict(QemuLock::acquire(&b, LockMode::Write));
        // The failed attempt left nothing behind: once `a` closes, `b` gets the lock.
        drop(a);
        let probe = open(&path);
        assert!(locked_by_others(&probe).is_empty());
        assert!(QemuLock::acquire(&b, LockMode::Write).unwrap().is_some());
    }

    #[test]
    fn write_and_read_conflict_both_ways() {
        let (_dir, path) = scratch();
        let a = open(&path);
        let _w = QemuLock::acquire(&a, LockMode::Write).unwrap();
        assert_conflict(QemuLock::acquire(&open(&path), LockMode::Read));
        drop(a);

        let a = open(&path);
        let _r = QemuLock::acquire(&a, LockMode::Read).unwrap();
        assert_conflict(QemuLock::acquire(&open(&path), LockMode::Write));
    }

    #[test]
    fn read_and_read_share() {
        let (_dir, path) = scratch();
        let a = open(&path);
        let b = open(&path);
        let c = open(&path);
        assert!(QemuLock::acquire(&a, LockMode::Read).unwrap().is_some());
        assert!(QemuLock::acquire(&b, LockMode::Read).unwrap().is_some());
        assert!(QemuLock::acquire(&c, LockMode::Read).unwrap().is_some());
    }

    #[test]
    fn none_always_succeeds_and_blocks_nobody() {
        let (_dir, path) = scratch();
        let a = open(&path);
        let _w = QemuLock::acquire(&a, LockMode::Write).unwrap();
        assert!(QemuLock::acquire(&open(&path), LockMode::None)
            .unwrap()
            .is_none());
        drop(a);
        let n = open(&path);
        assert!(QemuLock::acquire(&n, LockMode::None).unwrap().is_none());
        assert!(QemuLock::acquire(&open(&path), LockMode::Write)
            .unwrap()
            .is_some());
    }

    // ---- interoperability with QEMU's own tools ----

    /// Whether the QEMU tool `name` runs; if not, panics under CI and otherwise says why the
    /// test is skipped.
    fn have_tool(name: &str) -> bool {
        let ok = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{name} is required under CI but is not installed");
            }
            eprintln!("skipping: {name} is not installed");
        }
        ok
    }

    /// A QED image made by `qemu-img create`.
    fn qemu_image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qed");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qed"])
            .arg(&path)
            .arg("4M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (dir, path)
    }

    fn qemu_io(args: &[&str], path: &Path) -> std::process::Output {
        Command::new("qemu-io")
            .args(args)
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A `qemu-io` sleeping with the image open; killed when dropped.
    struct Holder(Child);

    impl Holder {
        /// Starts `qemu-io` with `extra` options and waits until its locks are visible.
        fn start(extra: &[&str], path: &Path) -> Self {
            let child = Command::new("qemu-io")
                .args(extra)
                .args(["-f", "qed", "-c", "sleep 60000"])
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut holder = Holder(child);
            let probe = open(path);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !locked_by_others(&probe).contains(&100) {
                if let Some(status) = holder.0.try_wait().unwrap() {
                    panic!("qemu-io exited early: {status}");
                }
                assert!(Instant::now() < deadline, "qemu-io never locked the image");
                std::thread::sleep(Duration::from_millis(20));
            }
            holder
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn qemu_io_cannot_write_while_we_hold_write() {
        if !have_tool("qemu-img") || !have_tool("qemu-io") {
            return;
        }
        let (_dir, path) = qemu_image();
        let file = open(&path);
        let _lock = QemuLock::acquire(&file, LockMode::Write).unwrap();

        let out = qemu_io(&["-f", "qed", "-c", "write 0 4k"], &path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "qemu-io wrote a locked image");
        assert!(stderr.contains("lock"), "{stderr}");

        // Not even read-only: we do not share writing, QEMU refuses to read an image that
        // somebody writes.
        let out = qemu_io(&["-r", "-f", "qed", "-c", "read 0 4k"], &path);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));

        // With force-share it works (read-only), as in QEMU.
        let out = qemu_io(&["-U", "-r", "-f", "qed", "-c", "read 0 4k"], &path);
        assert!(out.status.success(), "{out:?}");

        drop(file);
        let out = qemu_io(&["-f", "qed", "-c", "write 0 4k"], &path);
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn qemu_tools_and_our_read_lock() {
        if !have_tool("qemu-img") || !have_tool("qemu-io") {
            return;
        }
        let (_dir, path) = qemu_image();
        let file = open(&path);
        let _lock = QemuLock::acquire(&file, LockMode::Read).unwrap();

        let out = qemu_io(&["-r", "-f", "qed", "-c", "read 0 4k"], &path);
        assert!(out.status.success(), "{out:?}");
        let out = Command::new("qemu-img")
            .arg("info")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = qemu_io(&["-f", "qed", "-c", "write 0 4k"], &path);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    }

    #[test]
    fn we_cannot_take_an_image_qemu_io_writes() {
        if !have_tool("qemu-img") || !have_tool("qemu-io") {
            return;
        }
        let (_dir, path) = qemu_image();
        let holder = Holder::start(&[], &path);
        assert_conflict(QemuLock::acquire(&open(&path), LockMode::Write));
        assert_conflict(QemuLock::acquire(&open(&path), LockMode::Read));
        assert!(QemuLock::acquire(&open(&path), LockMode::None)
            .unwrap()
            .is_none());
        drop(holder);
        assert!(QemuLock::acquire(&open(&path), LockMode::Write)
            .unwrap()
            .is_some());
    }

    #[test]
    fn we_share_reading_with_read_only_qemu_io() {
        if !have_tool("qemu-img") || !have_tool("qemu-io") {
            return;
        }
        let (_dir, path) = qemu_image();
        let _holder = Holder::start(&["-r"], &path);
        assert!(QemuLock::acquire(&open(&path), LockMode::Read)
            .unwrap()
            .is_some());
        assert_conflict(QemuLock::acquire(&open(&path), LockMode::Write));
    }
}
