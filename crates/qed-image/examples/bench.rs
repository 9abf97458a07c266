//! `qemu-img bench` for this engine: the same requests against a QED image (or a raw file,
//! through the same storage layer), with threads standing in for the queue depth.
//!
//! ```text
//! cargo run --release -p qed-image --example bench -- \
//!     [-f qed|raw] [-t writeback|none|unsafe] [-w] [-c COUNT] [-d THREADS] [-s SIZE]
//!     [-S STEP] [-o OFFSET] [--pattern BYTE] [--random] FILE
//! ```
//!
//! As in `qemu-img bench`, request `i` goes to `OFFSET + i * STEP` (modulo the image size;
//! `STEP` defaults to `SIZE`) and requests are issued in that order, with `-d` of them in
//! flight: here `-d` threads share one open image and each takes the next request number
//! when it finishes one. `--random` sends each request to a random `SIZE`-aligned offset
//! instead. The time covers the requests only, not opening or closing (closing a QED image
//! writes its metadata back); there is no flush. The last lines printed are
//! `Run completed in X seconds.` (the line `qemu-img bench` prints) and the rate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{Image, OpenOptions};

const ALIGN: usize = 4096;

struct Args {
    format: String,
    cache: CacheMode,
    write: bool,
    count: u64,
    depth: usize,
    size: usize,
    step: Option<u64>,
    offset: u64,
    pattern: u8,
    random: bool,
    file: PathBuf,
}

const USAGE: &str = "usage: bench [-f qed|raw] [-t writeback|none|unsafe] [-w] [-c COUNT] \
                     [-d THREADS] [-s SIZE] [-S STEP] [-o OFFSET] [--pattern BYTE] [--random] FILE";

/// Parses `4096`, `4k`, `64K`, `1M`, `2G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .map(|n| n << shift)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        format: "qed".into(),
        cache: CacheMode::Writeback,
        write: false,
        count: 75000,
        depth: 64,
        size: 4096,
        step: None,
        offset: 0,
        pattern: 0,
        random: false,
        file: PathBuf::new(),
    };
    let mut file = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // `--opt=value` as well as `--opt value`.
        let (a, mut inline) = match arg.split_once('=') {
            Some((opt, v)) if opt.starts_with("--") => (opt.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .take()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "-f" => args.format = value()?,
            "-t" => {
                args.cache = match value()?.as_str() {
                    "writeback" => CacheMode::Writeback,
                    "none" => CacheMode::None,
                    "unsafe" => CacheMode::Unsafe,
                    other => return Err(format!("unknown cache mode {other:?}")),
                }
            }
            "-w" => args.write = true,
            "-c" => args.count = parse_size(&value()?)?,
            "-d" => args.depth = parse_size(&value()?)? as usize,
            "-s" => args.size = parse_size(&value()?)? as usize,
            "-S" => args.step = Some(parse_size(&value()?)?),
            "-o" => args.offset = parse_size(&value()?)?,
            "--pattern" => {
                let v = value()?;
                let v = v.trim_start_matches("0x");
                args.pattern =
                    u8::from_str_radix(v, 16).map_err(|e| format!("bad pattern {v:?}: {e}"))?;
            }
            "--random" => args.random = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if a.starts_with('-') => return Err(format!("unknown option {a}\n{USAGE}")),
            _ => file = Some(PathBuf::from(a)),
        }
    }
    args.file = file.ok_or_else(|| USAGE.to_string())?;
    if args.format != "qed" && args.format != "raw" {
        return Err(format!("unknown format {:?}", args.format));
    }
    if args.depth == 0 || args.size == 0 {
        return Err("-d and -s must be positive".into());
    }
    Ok(args)
}

/// The image or raw file under test.
enum Target {
    Qed(Image),
    Raw(FileStorage),
}

impl Target {
    fn size(&self) -> std::io::Result<u64> {
        match self {
            Target::Qed(image) => Ok(image.size()),
            Target::Raw(file) => file.len(),
        }
    }

    fn io(&self, write: bool, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let result = match (self, write) {
            (Target::Qed(image), false) => image.read_at(buf, offset).map_err(|e| e.to_string()),
            (Target::Qed(image), true) => image.write_at(buf, offset).map_err(|e| e.to_string()),
            (Target::Raw(file), false) => file.read_at(buf, offset).map_err(|e| e.to_string()),
            (Target::Raw(file), true) => file.write_at(buf, offset).map_err(|e| e.to_string()),
        };
        result.map_err(|e| format!("request at offset {offset}: {e}"))
    }

    fn close(self) -> Result<(), String> {
        match self {
            Target::Qed(image) => image.close().map_err(|e| e.to_string()),
            Target::Raw(file) => {
                drop(file);
                Ok(())
            }
        }
    }
}

/// splitmix64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn run(args: &Args) -> Result<(), String> {
    let target = match args.format.as_str() {
        "qed" => Target::Qed(
            Image::open(
                &args.file,
                &OpenOptions {
                    writable: args.write,
                    cache: args.cache,
                    ..OpenOptions::default()
                },
            )
            .map_err(|e| e.to_string())?,
        ),
        _ => Target::Raw(
            FileStorage::open(
                &args.file,
                &FileOptions {
                    writable: args.write,
                    create: false,
                    cache: args.cache,
                    lock: if args.write {
                        LockMode::Write
                    } else {
                        LockMode::Read
                    },
                },
            )
            .map_err(|e| format!("{}: {e}", args.file.display()))?,
        ),
    };
    let image_size = target.size().map_err(|e| e.to_string())?;
    let bs = args.size as u64;
    if image_size < bs {
        return Err(format!(
            "image of {image_size} bytes is smaller than a request"
        ));
    }
    let step = args.step.unwrap_or(bs);
    let slots = image_size / bs;
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (threads; {})",
        args.count,
        if args.write { "write" } else { "read" },
        bs,
        args.depth,
        if args.random {
            "random offsets".to_string()
        } else {
            format!("starting at offset {}, step size {step}", args.offset)
        }
    );

    let next = AtomicU64::new(0);
    let worker = |t: usize| -> Result<(), String> {
        // Aligned for O_DIRECT, so requests take the storage's direct path.
        let mut block = vec![args.pattern; args.size + ALIGN];
        let start = block.as_ptr().align_offset(ALIGN);
        let buf = &mut block[start..start + args.size];
        let mut rng = mix(t as u64 + 1);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= args.count {
                return Ok(());
            }
            let offset = if args.random {
                rng = mix(rng);
                (rng % slots) * bs
            } else {
                let off = args.offset.wrapping_add(i.wrapping_mul(step)) % image_size;
                if off + bs > image_size {
                    0
                } else {
                    off
                }
            };
            target.io(args.write, buf, offset)?;
        }
    };
    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.depth)
            .map(|t| {
                let worker = &worker;
                s.spawn(move || worker(t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    target.close()?;
    println!("Run completed in {secs:.3} seconds.");
    println!(
        "{:.0} IOPS, {:.1} MiB/s",
        args.count as f64 / secs,
        (args.count * bs) as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
