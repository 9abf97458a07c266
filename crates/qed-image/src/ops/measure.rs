//! `measure`: how large a file a conversion into a new image needs, as `qemu-img measure`
//! reports it: the size required for the data a source holds, and the size when every
//! cluster is allocated.
//!
//! Raw targets need their virtual size either way (as QEMU says). QEMU cannot measure QED
//! (`Block driver 'qed' does not support size measurement`); here a QED target needs its
//! header cluster and L1 table, one L2 table for each L1 entry that leads to data, and one
//! cluster for each cluster of the target geometry that holds data in the source, found by
//! block status (nothing is read; a range known to read as zeros needs nothing, as a new
//! image reads zeros). That is what [`super::convert`] writes at most; fully allocated, every
//! cluster and every table of the virtual size.

use qed_format::{new_image_layout, CreateParams, Geometry};

use crate::{Error, Result};

use super::disk::{sector_rounded, Disk};

/// The target format of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureFormat {
    /// A raw file.
    Raw,
    /// A QED image of this geometry.
    Qed {
        /// Bytes per cluster.
        cluster_size: u32,
        /// Clusters per table.
        table_size: u32,
    },
}

/// The sizes `qemu-img measure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File bytes a conversion of the source needs (`required`).
    pub required: u64,
    /// File bytes with every cluster allocated (`fully-allocated`).
    pub fully_allocated: u64,
}

/// What a new image of `size` bytes (rounded up to whole sectors, as image creation rounds
/// it) needs, holding nothing yet, and fully allocated.
pub fn measure_size(size: u64, format: &MeasureFormat) -> Result<Measurement> {
    let size = sector_rounded(size);
    match *format {
        MeasureFormat::Raw => Ok(Measurement {
            required: size,
            fully_allocated: size,
        }),
        MeasureFormat::Qed {
            cluster_size,
            table_size,
        } => {
            let (g, empty) = qed_layout(size, cluster_size, table_size)?;
            Ok(Measurement {
                required: empty,
                fully_allocated: fully_allocated(&g, size, empty)?,
            })
        }
    }
}

/// What a conversion of `source` into a new image of `format` needs.
pub fn measure(source: &Disk, format: &MeasureFormat) -> Result<Measurement> {
    let size = sector_rounded(source.size());
    let MeasureFormat::Qed {
        cluster_size,
        table_size,
    } = *format
    else {
        return measure_size(size, format);
    };
    let (g, empty) = qed_layout(size, cluster_size, table_size)?;
    let cs = g.cluster_size();
    let coverage = g.l2_coverage();
    // Clusters and tables counted so far, and the last of each counted (walks are in order).
    let (mut clusters, mut tables) = (0u64, 0u64);
    let (mut last_cluster, mut last_table): (Option<u64>, Option<u64>) = (None, None);
    for status in source.block_status_with_holes(0, size) {
        let status = status?;
        if !status.kind.is_data() {
            continue;
        }
        let (start, end) = (status.offset, status.offset + status.length);
        let (first, past) = (start / cs, end.div_ceil(cs));
        let first_new = last_cluster.map_or(first, |c| first.max(c + 1));
        clusters += past.saturating_sub(first_new);
        last_cluster = Some(past - 1);
        let (first_t, past_t) = (start / coverage, end.div_ceil(coverage));
        let first_t_new = last_table.map_or(first_t, |t| first_t.max(t + 1));
        tables += past_t.saturating_sub(first_t_new);
        last_table = Some(past_t - 1);
    }
    let required = clusters
        .checked_mul(cs)
        .and_then(|d| tables.checked_mul(g.table_bytes()).map(|t| (d, t)))
        .and_then(|(d, t)| empty.checked_add(d)?.checked_add(t))
        .ok_or_else(too_large)?;
    Ok(Measurement {
        required,
        fully_allocated: fully_allocated(&g, size, empty)?,
    })
}

fn too_large() -> Error {
    Error::InvalidArgument("the measured size does not fit in 64 bits".into())
}

/// The geometry of a new QED image and the length of its file when empty; fails as image
/// creation fails for a size the geometry cannot hold.
fn qed_layout(size: u64, cluster_size: u32, table_size: u32) -> Result<(Geometry, u64)> {
    let params = CreateParams {
        image_size: size,
        cluster_size,
        table_size,
        backing_file: None,
        backing_raw: false,
    };
    let (_, _, file_len) = new_image_layout(&params)?;
    let g = Geometry::new(cluster_size, table_size)?;
    Ok((g, file_len))
}

fn fully_allocated(g: &Geometry, size: u64, empty: u64) -> Result<u64> {
    let data = size
        .div_ceil(g.cluster_size())
        .checked_mul(g.cluster_size());
    let tables = size.div_ceil(g.l2_coverage()).checked_mul(g.table_bytes());
    data.zip(tables)
        .and_then(|(d, t)| empty.checked_add(d)?.checked_add(t))
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QED: MeasureFormat = MeasureFormat::Qed {
        cluster_size: 65536,
        table_size: 4,
    };

    #[test]
    fn sizes_of_new_images() {
        let raw = measure_size(1000, &MeasureFormat::Raw).unwrap();
        assert_eq!((raw.required, raw.fully_allocated), (1024, 1024));
        let qed = measure_size(1 << 30, &QED).unwrap();
        // Header + L1 (5 clusters); 1 GiB is 16384 clusters under 1 table of 2 GiB coverage.
        assert_eq!(qed.required, 5 * 65536);
        assert_eq!(qed.fully_allocated, 5 * 65536 + (1 << 30) + 4 * 65536);
        assert!(measure_size(1 << 62, &QED).is_err());
    }
}
