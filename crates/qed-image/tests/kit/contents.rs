//! What disks and files hold: guest ranges and whole virtual disks read as bytes, fill
//! checks, sha256 hashes.

use std::path::Path;

use qed_image::Image;
use sha2::{Digest, Sha256};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a byte slice, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).expect("read file"))
}

/// `len` guest bytes at `offset`, read through [`Image::read_at`].
pub fn read_range(image: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image
        .read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {len}@{offset}: {e}"));
    buf
}

/// Panics, naming the first offender, unless every byte of `buf` is `byte`.
#[track_caller]
pub fn assert_fill(buf: &[u8], byte: u8, what: &str) {
    if let Some(i) = buf.iter().position(|&b| b != byte) {
        panic!("{what}: byte {i} is {:#x}, expected {byte:#x}", buf[i]);
    }
}

/// Reads the whole virtual disk through [`Image::read_at`].
pub fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    const CHUNK: usize = 1 << 20;
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        image
            .read_at(chunk, (i * CHUNK) as u64)
            .unwrap_or_else(|e| panic!("read at {}: {e}", i * CHUNK));
    }
    buf
}

/// sha256 of the whole virtual disk read through [`Image::read_at`] (the "raw sha256").
pub fn image_sha256(image: &Image) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let size = image.size();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        image
            .read_at(&mut buf[..n], pos)
            .unwrap_or_else(|e| panic!("read at {pos}: {e}"));
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    hex(&hasher.finalize())
}
