//! Crash exploration: a storage that records its I/O so that any prefix can be replayed, and
//! the checks of the durability contract (design.md §Durability) on what a crash left.

use std::io;
use std::sync::{Arc, Mutex};

use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{CheckReport, Image, Repair};

use super::images::need_check;
use super::workload::{CrashConfig, Windows};

/// One I/O a [`RecordingStorage`] saw.
#[derive(Debug, Clone)]
pub enum Event {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
    Flush,
}

impl Event {
    /// Does to `disk` what this event did.
    pub fn apply(&self, disk: &dyn Storage) {
        match self {
            Event::Write(offset, data) => disk.write_at(data, *offset).unwrap(),
            Event::SetLen(len) => disk.set_len(*len).unwrap(),
            Event::Punch(offset, len) => disk.punch_hole(*offset, *len).unwrap(),
            Event::Flush => {}
        }
    }
}

/// A memory storage that records every write, length change, hole punch and flush in order.
#[derive(Debug)]
pub struct RecordingStorage {
    initial: Vec<u8>,
    state: Mutex<(MemoryStorage, Vec<Event>)>,
}

impl RecordingStorage {
    pub fn new(initial: Vec<u8>) -> Self {
        Self {
            state: Mutex::new((MemoryStorage::from_bytes(initial.clone()), Vec::new())),
            initial,
        }
    }

    /// Number of events so far.
    pub fn position(&self) -> usize {
        self.state.lock().unwrap().1.len()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.state.lock().unwrap().1.clone()
    }

    /// The disk before the first event.
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// The disk after the first `count` events.
    pub fn replay(&self, count: usize) -> Vec<u8> {
        let disk = MemoryStorage::from_bytes(self.initial.clone());
        for event in &self.events()[..count] {
            event.apply(&disk);
        }
        disk.to_bytes()
    }

    fn record<T>(
        &self,
        event: Event,
        apply: impl FnOnce(&MemoryStorage) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.state.lock().unwrap();
        let result = apply(&state.0)?;
        state.1.push(event);
        Ok(result)
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.state.lock().unwrap().0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(Event::Write(offset, buf.to_vec()), |s| {
            s.write_at(buf, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Event::Flush, |s| s.flush())
    }

    fn len(&self) -> io::Result<u64> {
        self.state.lock().unwrap().0.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Event::SetLen(len), |s| s.set_len(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Event::Punch(offset, len), |s| s.punch_hole(offset, len))
    }
}

/// Why a state broke the contract.
pub type Verdict = Result<(), String>;

/// Checks that `actual` (the windows, flat) reads, byte by byte, either `flushed` or the
/// value one of `pending` wrote there.
pub fn check_bytes(
    windows: &Windows,
    actual: &[u8],
    flushed: &[u8],
    pending: &[&(usize, Vec<u8>)],
) -> Verdict {
    const CHUNK: usize = 512;
    for start in (0..actual.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(actual.len());
        if actual[start..end] == flushed[start..end] {
            continue;
        }
        for i in start..end {
            let got = actual[i];
            if got == flushed[i] {
                continue;
            }
            let written = pending
                .iter()
                .any(|(at, data)| i >= *at && i < at + data.len() && data[i - at] == got);
            if !written {
                return Err(format!(
                    "guest byte {:#x} reads {got:#04x}: neither the flushed {:#04x} nor a \
                     value written since ({} pending writes)",
                    windows.guest(i),
                    flushed[i],
                    pending.len()
                ));
            }
        }
    }
    Ok(())
}

/// Fails unless a report shows no corruption, and (without `allow_leaks`) no leaks either.
pub fn report_clean(report: &CheckReport, what: &str, allow_leaks: bool) -> Verdict {
    if report.corruptions != 0 || report.check_errors != 0 || (!allow_leaks && report.leaks != 0) {
        return Err(format!(
            "{what}: {} corruptions, {} leaks, {} check errors: {:?}",
            report.corruptions,
            report.leaks,
            report.check_errors,
            &report.findings[..report.findings.len().min(5)]
        ));
    }
    Ok(())
}

/// Opens `storage` read-write as an image of `config` (a dirty image is repaired then),
/// checks it is consistent, and returns the open image and, when leaks were found with
/// NEED_CHECK clear, the report of the explicit repair that reclaimed them.
pub fn open_and_repair(
    config: &CrashConfig,
    storage: Arc<MemoryStorage>,
) -> Result<(Image, Option<CheckReport>), String> {
    let mut header = [0u8; 64];
    storage.read_at(&mut header, 0).map_err(|e| e.to_string())?;
    let dirty = need_check(&header);
    let image = config
        .open(Box::new(storage.clone()), true, 32 << 20)
        .map_err(|e| format!("read-write open: {e}"))?;
    if dirty && image.open_repair().is_none() {
        return Err("NEED_CHECK was set but the open did not repair".into());
    }
    let report = image
        .check(Repair::None)
        .map_err(|e| format!("check: {e}"))?;
    let mut clean_flag_leaks = None;
    if dirty {
        report_clean(&report, "check after the repair at open", false)?;
    } else {
        report_clean(&report, "check of an image with NEED_CHECK clear", true)?;
        if report.leaks > 0 {
            // Leaks are allowed in a clean image (discarded clusters stay in the file until a
            // repair); a repair must reclaim them all.
            let fixed = image
                .check(Repair::All)
                .map_err(|e| format!("repair: {e}"))?;
            let again = image
                .check(Repair::None)
                .map_err(|e| format!("check: {e}"))?;
            report_clean(&again, "check after an explicit repair", false)?;
            clean_flag_leaks = Some(fixed);
        }
    }
    Ok((image, clean_flag_leaks))
}
