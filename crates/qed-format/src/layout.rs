//! The layout of a newly created image, byte-identical to `qemu-img create -f qed`.

use crate::{
    FormatError, Geometry, Header, FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE,
    HEADER_LEN, SECTOR_SIZE,
};

/// Longest backing file name QEMU can read back (it copies the name into a 4 KiB buffer).
pub const QEMU_MAX_BACKING_NAME_LEN: usize = 4095;

/// What a new image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    /// Virtual disk size in bytes; must be a multiple of 512.
    pub image_size: u64,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per table.
    pub table_size: u32,
    /// Backing file name as it is to be stored (relative names resolve against the image's
    /// directory).
    pub backing_file: Option<String>,
    /// Whether the backing file is raw (sets BACKING_FORMAT_NO_PROBE).
    pub backing_raw: bool,
}

/// Builds a new image: returns the header, the bytes of the header cluster (header and
/// backing name, zero padded) and the file length (`(1 + table_size) × cluster_size`; the
/// L1 table after the header cluster is all zeros).
pub fn new_image_layout(params: &CreateParams) -> Result<(Header, Vec<u8>, u64), FormatError> {
    let geometry = Geometry::new(params.cluster_size, params.table_size)?;
    if params.image_size % SECTOR_SIZE != 0 {
        return Err(FormatError::ImageSizeUnaligned {
            value: params.image_size,
        });
    }
    let max = geometry.max_image_size();
    if u128::from(params.image_size) > max {
        return Err(FormatError::ImageSizeTooLarge {
            value: params.image_size,
            max,
        });
    }
    let cluster_size = geometry.cluster_size();
    let name = params.backing_file.as_deref().unwrap_or("").as_bytes();
    let room = cluster_size as usize - HEADER_LEN;
    if name.len() > room {
        return Err(FormatError::BackingNameTooLong {
            size: name.len() as u64,
            max: room as u64,
        });
    }
    let mut features = 0;
    if !name.is_empty() {
        features |= FEATURE_BACKING_FILE;
        if params.backing_raw {
            features |= FEATURE_BACKING_FORMAT_NO_PROBE;
        }
    }
    let header = Header {
        cluster_size: params.cluster_size,
        table_size: params.table_size,
        header_size: 1,
        features,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster_size,
        image_size: params.image_size,
        backing_filename_offset: if name.is_empty() {
            0
        } else {
            HEADER_LEN as u32
        },
        backing_filename_size: name.len() as u32,
    };
    let mut cluster = vec![0u8; cluster_size as usize];
    cluster[..HEADER_LEN].copy_from_slice(&header.encode());
    cluster[HEADER_LEN..HEADER_LEN + name.len()].copy_from_slice(name);
    let file_len = geometry.table_bytes() + cluster_size;
    Ok((header, cluster, file_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cs: u32, ts: u32) -> CreateParams {
        CreateParams {
            image_size: 1 << 30,
            cluster_size: cs,
            table_size: ts,
            backing_file: None,
            backing_raw: false,
        }
    }

    #[test]
    fn file_lengths_match_qemu() {
        for (cs, ts, len) in [
            (65536, 4, 327_680),
            (4096, 2, 12_288),
            (4096, 16, 69_632),
            (1 << 20, 4, 5_242_880),
            (8192, 2, 24_576),
        ] {
            let (h, cluster, file_len) = new_image_layout(&params(cs, ts)).unwrap();
            assert_eq!(file_len, len);
            assert_eq!(cluster.len(), cs as usize);
            assert!(h.validate(file_len).is_ok());
        }
    }

    #[test]
    fn backing_name_layout() {
        let mut p = params(65536, 4);
        p.backing_file = Some("base.raw".into());
        p.backing_raw = true;
        let (h, cluster, _) = new_image_layout(&p).unwrap();
        assert_eq!(h.features, 0x5);
        assert_eq!(h.backing_filename_offset, 64);
        assert_eq!(h.backing_filename_size, 8);
        assert_eq!(&cluster[64..72], b"base.raw");
        p.backing_raw = false;
        assert_eq!(new_image_layout(&p).unwrap().0.features, 0x1);
    }

    #[test]
    fn backing_name_must_fit_header_cluster() {
        let mut p = params(4096, 4);
        p.backing_file = Some("x".repeat(4032));
        assert!(new_image_layout(&p).is_ok());
        p.backing_file = Some("x".repeat(4033));
        assert!(matches!(
            new_image_layout(&p),
            Err(FormatError::BackingNameTooLong { .. })
        ));
    }

    #[test]
    fn size_rules() {
        let mut p = params(4096, 1);
        p.image_size = 1 << 30;
        assert!(new_image_layout(&p).is_ok());
        p.image_size += 512;
        assert!(new_image_layout(&p).is_err());
        p.image_size = 1000;
        assert!(matches!(
            new_image_layout(&p),
            Err(FormatError::ImageSizeUnaligned { .. })
        ));
        p.image_size = 0;
        assert!(new_image_layout(&p).is_ok());
    }
}
