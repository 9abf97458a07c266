//! A memory workload: 4 KiB writes spread over a large image, never flushed, on a file.
//! Run it under `/usr/bin/time -v` to see the peak RSS; it prints the cache's own counters.
//!
//! `cargo run --release --example spread_writes -- PATH [WRITES] [CACHE_MIB]`

use std::path::Path;

use qed_image::{CreateParams, Image, OpenOptions};

fn main() -> qed_image::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "spread.qed".into());
    let writes: u64 = args.next().map_or(20_000, |s| s.parse().expect("WRITES"));
    let cache_mib: usize = args.next().map_or(32, |s| s.parse().expect("CACHE_MIB"));
    let path = Path::new(&path);
    let size = 64u64 << 30;
    Image::create(
        path,
        &CreateParams {
            image_size: size,
            cluster_size: 4096,
            table_size: 16,
            backing_file: None,
            backing_raw: false,
        },
    )?;
    let options = OpenOptions {
        l2_cache_bytes: cache_mib << 20,
        ..OpenOptions::read_write()
    };
    let image = Image::open(path, &options)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut peak_bytes = 0;
    let mut peak_dirty = 0;
    let buf = vec![0x5au8; 4096];
    for _ in 0..writes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % (size / 4096)) * 4096;
        image.write_at(&buf, offset)?;
        let stats = image.cache_stats();
        peak_bytes = peak_bytes.max(stats.bytes);
        peak_dirty = peak_dirty.max(stats.dirty_bytes);
    }
    let stats = image.cache_stats();
    image.close()?;
    println!(
        "writes {writes}, cache budget {cache_mib} MiB: peak table bytes {} KiB, peak dirty {} KiB, \
         misses {}, evictions {}",
        peak_bytes >> 10,
        peak_dirty >> 10,
        stats.misses,
        stats.evictions
    );
    Ok(())
}
