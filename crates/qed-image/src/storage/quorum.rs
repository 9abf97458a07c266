//! [`QuorumStorage`]: QEMU's `quorum` driver as a storage — the same bytes kept on several
//! children; a read returns what enough of them agree on, a write goes to all of them.

use std::io;

use super::Storage;

/// How reads pick their answer (QEMU's `read-pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPattern {
    /// Read every child and vote: the contents most children return win, if at least the
    /// threshold of them returned it.
    #[default]
    Quorum,
    /// Read the children in order; the first that succeeds answers.
    Fifo,
}

/// Children that hold the same bytes, and how many must agree.
pub struct QuorumStorage {
    children: Vec<Box<dyn Storage>>,
    threshold: usize,
    pattern: ReadPattern,
}

impl std::fmt::Debug for QuorumStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuorumStorage")
            .field("children", &self.children.len())
            .field("threshold", &self.threshold)
            .field("pattern", &self.pattern)
            .finish()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl QuorumStorage {
    /// `children` (at least one) with a vote threshold from 1 to their number.
    pub fn new(
        children: Vec<Box<dyn Storage>>,
        threshold: usize,
        pattern: ReadPattern,
    ) -> io::Result<Self> {
        if children.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Number of provided children must be 1 or more",
            ));
        }
        if threshold < 1 || threshold > children.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "threshold may not exceed children count",
            ));
        }
        Ok(Self {
            children,
            threshold,
            pattern,
        })
    }

    /// The children.
    pub fn children(&self) -> &[Box<dyn Storage>] {
        &self.children
    }

    /// Runs `op` on every child: succeeds when at least the threshold of them did.
    fn all(&self, op: impl Fn(&dyn Storage) -> io::Result<()>) -> io::Result<()> {
        let mut done = 0;
        let mut first_error = None;
        for child in &self.children {
            match op(&**child) {
                Ok(()) => done += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if done < self.threshold => Err(e),
            _ => Ok(()),
        }
    }
}

impl Storage for QuorumStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.pattern == ReadPattern::Fifo {
            let mut first_error = None;
            for child in &self.children {
                match child.read_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            return Err(first_error.unwrap_or_else(eio));
        }
        // Each distinct answer and how many children gave it.
        let mut versions: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut first_error = None;
        for child in &self.children {
            let mut copy = vec![0u8; buf.len()];
            match child.read_at(&mut copy, offset) {
                Ok(()) => match versions.iter_mut().find(|(v, _)| *v == copy) {
                    Some((_, votes)) => *votes += 1,
                    None => versions.push((copy, 1)),
                },
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let winner = versions
            .into_iter()
            .enumerate()
            .max_by_key(|(i, (_, votes))| (*votes, std::cmp::Reverse(*i)))
            .map(|(_, version)| version);
        match winner {
            Some((bytes, votes)) if votes >= self.threshold => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            Some(_) => Err(eio()),
            None => Err(first_error.unwrap_or_else(eio)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.all(|c| c.write_at(buf, offset))
    }

    fn flush(&self) -> io::Result<()> {
        self.all(|c| c.flush())
    }

    /// The children's length, which must be the same for all (else `EIO`, as in QEMU).
    fn len(&self) -> io::Result<u64> {
        let first = self.children[0].len()?;
        for child in &self.children[1..] {
            if child.len()? != first {
                return Err(eio());
            }
        }
        Ok(first)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.all(|c| c.set_len(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.all(|c| c.punch_hole(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.all(|c| c.write_zeroes(offset, len))
    }

    fn alignment(&self) -> u64 {
        self.children
            .iter()
            .map(|c| c.alignment())
            .max()
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn child(bytes: &[u8]) -> Box<dyn Storage> {
        Box::new(MemoryStorage::from_bytes(bytes.to_vec()))
    }

    #[test]
    fn reads_vote_and_writes_reach_every_child() {
        let q = QuorumStorage::new(
            vec![child(&[1; 8]), child(&[2; 8]), child(&[2; 8])],
            2,
            ReadPattern::Quorum,
        )
        .unwrap();
        let mut buf = [0u8; 8];
        q.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 8]);
        q.write_at(&[3; 4], 2).unwrap();
        q.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2, 2, 3, 3, 3, 3, 2, 2]);
        assert_eq!(q.len().unwrap(), 8);
        let split =
            QuorumStorage::new(vec![child(&[1]), child(&[2])], 2, ReadPattern::Quorum).unwrap();
        assert!(split.read_at(&mut [0u8; 1], 0).is_err());
        let fifo =
            QuorumStorage::new(vec![child(&[1]), child(&[2])], 1, ReadPattern::Fifo).unwrap();
        let mut one = [0u8; 1];
        fifo.read_at(&mut one, 0).unwrap();
        assert_eq!(one, [1]);
        assert!(QuorumStorage::new(vec![child(&[1])], 2, ReadPattern::Quorum).is_err());
        let uneven =
            QuorumStorage::new(vec![child(&[1; 3]), child(&[1; 4])], 1, ReadPattern::Quorum)
                .unwrap();
        assert!(uneven.len().is_err());
    }
}
