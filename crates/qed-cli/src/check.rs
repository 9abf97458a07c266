//! `qed check`: consistency check and repair of a QED image, printed as `qemu-img check`
//! prints it (human text or JSON, same lines, field names, field order and exit codes).
//!
//! Without `-r` the image is opened read-only and never modified — not even the automatic
//! repair a writable open of an image with NEED_CHECK set would run. With `-r` it is opened
//! read-write; see [`repair`] for how the automatic repair of a dirty image is reported.
//!
//! Differences from QEMU, on purpose (the engine's check is stricter and its repair goes
//! further):
//! - Leak counts are exact (QEMU reports phantom leaks in files of at least `cs − 1`
//!   clusters, through a division by `cluster_size − 1`).
//! - `-r` reclaims leaked clusters (QEMU only counts them), so `leaks-fixed` can be non-zero
//!   and a repaired image is usually clean; clusters referenced twice are copied under
//!   `-r all` (QEMU never fixes duplicates).
//! - `image-end-offset` (the file length after the check) is printed, in JSON and as the
//!   human `Image end offset: N` line, as qemu-img does for formats that report it (QEMU's
//!   QED driver does not).

use std::path::PathBuf;

use qed_image::ops::Disk;
use qed_image::{CheckReport, Image, Repair};
use serde::Serialize;

use crate::error::{open_failure, CliError, CliResult};
use crate::format::{ImageFormat, OutputFormat};
use crate::json::to_qemu_json;
use crate::spec::{self, Access};

/// Exit code of qemu-img when the format has no check (`-ENOTSUP` becomes 63).
pub const EXIT_NOT_SUPPORTED: i32 = 63;

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters; for QED the same repairs as `all` (QEMU's also clears invalid entries).
    Leaks,
    /// Every inconsistency the check can repair.
    All,
}

impl From<RepairMode> for Repair {
    fn from(mode: RepairMode) -> Self {
        match mode {
            RepairMode::Leaks => Repair::Leaks,
            RepairMode::All => Repair::All,
        }
    }
}

/// Arguments of `qed check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Repair what the check finds (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_name = "MODE", value_enum)]
    pub repair: Option<RepairMode>,
    /// Open without taking the image lock (for images in use); not with `-r`.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format.
    #[arg(long = "output", value_name = "FMT", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Print nothing but errors (the exit code still tells the result).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image: a file name, `file:NAME`, `json:{...}` (see docs/cli.md).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The result as `qemu-img check --output=json` prints it: qemu-img's field names, in the
/// order its dictionary prints them, zero-valued optional counters left out
/// (`check-errors`, `filename` and `format` are always there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckOutput {
    #[serde(rename = "image-end-offset", skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(rename = "total-clusters", skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(rename = "check-errors")]
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: String,
    format: &'static str,
    #[serde(rename = "fragmented-clusters", skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
}

// serde's `skip_serializing_if` passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckOutput {
    fn new(report: &CheckReport, filename: &str) -> Self {
        Self {
            image_end_offset: report.image_end_offset,
            total_clusters: report.total_clusters,
            corruptions: report.corruptions,
            corruptions_fixed: report.corruptions_fixed,
            check_errors: report.check_errors,
            leaks: report.leaks,
            leaks_fixed: report.leaks_fixed,
            allocated_clusters: report.allocated_clusters,
            filename: filename.to_string(),
            format: ImageFormat::Qed.name(),
            fragmented_clusters: report.fragmented_clusters,
        }
    }

    /// The exit code qemu-img gives this result once the check ran (check errors are
    /// handled before: they make it 1).
    fn exit_code(&self) -> i32 {
        if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// The result as `qemu-img check` prints it for people.
pub fn render_human(c: &CheckOutput) -> String {
    let mut out = String::new();
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if c.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                c.corruptions
            ));
        }
        if c.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                c.leaks
            ));
        }
        if c.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                c.check_errors
            ));
        }
    }
    if c.total_clusters != 0 && c.allocated_clusters != 0 {
        let allocated = c.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            c.allocated_clusters,
            c.total_clusters,
            allocated * 100.0 / c.total_clusters as f64,
            c.fragmented_clusters as f64 * 100.0 / allocated,
            0.0
        ));
    }
    if c.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", c.image_end_offset));
    }
    out
}

/// The lines qemu-img prints before checking a repaired image again.
pub fn render_repaired(leaks_fixed: u64, corruptions_fixed: u64) -> String {
    format!(
        "The following inconsistencies were found and repaired:\n\n    \
         {leaks_fixed} leaked clusters\n    {corruptions_fixed} corruptions\n\n\
         Double checking the fixed image now...\n"
    )
}

/// Runs `qed check`; returns the exit code.
pub fn run(args: &CheckArgs) -> CliResult<i32> {
    let name = args.file.display().to_string();
    let open_error = |why: String| CliError::new(format!("Could not open '{name}'"), why);
    if args.repair.is_some() && args.force_share {
        return Err(open_error(
            "force-share=on can only be used with read-only images".to_string(),
        ));
    }
    let access = Access {
        writable: args.repair.is_some(),
        unlocked: args.force_share,
        // qemu-img opens the backing chain too (and fails when it is missing).
        backing: true,
        ..Access::read_only()
    };
    let opened = spec::open_arg(args.file.as_os_str(), args.image_opts, args.format, &access)?;
    let Disk::Qed(image) = opened.disk else {
        // Opened (and locked) as qemu-img opens it, so that an unreadable file fails as an
        // open failure; then, as qemu-img: no check for raw, exit 63.
        eprintln!(
            "{}: This image format does not support checks",
            crate::prog()
        );
        return Ok(EXIT_NOT_SUPPORTED);
    };
    let checked = match args.repair {
        None => image.check(Repair::None).map(|report| Checked {
            output: CheckOutput::new(&report, &name),
            repaired: None,
        }),
        Some(mode) => repair(&image, mode.into(), &name),
    };
    let result = checked.map_err(|e| CliError::new("Check failed", open_failure(&e)));
    if let Ok(checked) = &result {
        if !args.quiet {
            let mut text = String::new();
            if let (Some((leaks, corruptions)), OutputFormat::Human) =
                (checked.repaired, args.output)
            {
                text.push_str(&render_repaired(leaks, corruptions));
            }
            match args.output {
                OutputFormat::Human => text.push_str(&render_human(&checked.output)),
                OutputFormat::Json => text.push_str(
                    &to_qemu_json(&checked.output).map_err(|e| CliError::new("JSON output", e))?,
                ),
            }
            print!("{text}");
        }
    }
    let closed = image.close();
    let checked = result?;
    closed.map_err(|e| CliError::new(format!("closing {name}"), e))?;
    if checked.output.check_errors > 0 {
        return Err(CliError::plain("Check failed"));
    }
    Ok(checked.output.exit_code())
}

/// What a check printed: the final result and, after a repair, how many leaks and
/// corruptions were repaired.
struct Checked {
    output: CheckOutput,
    repaired: Option<(u64, u64)>,
}

/// `-r`: repairs, then (if anything was repaired) checks again, as qemu-img does.
///
/// A writable open of an image with NEED_CHECK set has already checked and repaired it
/// (with [`Repair::All`]: the engine does that before anything else can touch the image),
/// so the explicit check would find nothing of what that repair fixed. What the open
/// repaired ([`Image::open_repair`]) is therefore added to what the explicit check repaired,
/// and the sum is reported as "found and repaired" — the same figures QEMU's single
/// check-with-repair gives for the image. Leaks the open could not reclaim are found again
/// by the explicit check and counted once.
fn repair(image: &Image, mode: Repair, name: &str) -> qed_image::Result<Checked> {
    let at_open = image.open_repair().cloned().unwrap_or_default();
    let report = image.check(mode)?;
    let leaks_fixed = at_open.leaks_fixed + report.leaks_fixed;
    let corruptions_fixed = at_open.corruptions_fixed + report.corruptions_fixed;
    if leaks_fixed == 0 && corruptions_fixed == 0 {
        return Ok(Checked {
            output: CheckOutput::new(&report, name),
            repaired: None,
        });
    }
    let again = image.check(Repair::None)?;
    let mut output = CheckOutput::new(&again, name);
    output.leaks_fixed = leaks_fixed;
    output.corruptions_fixed = corruptions_fixed;
    Ok(Checked {
        output,
        repaired: Some((leaks_fixed, corruptions_fixed)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output() -> CheckOutput {
        CheckOutput {
            total_clusters: 256,
            allocated_clusters: 5,
            fragmented_clusters: 1,
            filename: "x.qed".into(),
            format: "qed",
            ..CheckOutput::default()
        }
    }

    #[test]
    fn clean_human() {
        assert_eq!(
            render_human(&output()),
            "No errors were found on the image.\n\
             5/256 = 1.95% allocated, 20.00% fragmented, 0.00% compressed clusters\n"
        );
        let empty = CheckOutput {
            allocated_clusters: 0,
            image_end_offset: 327_680,
            ..output()
        };
        assert_eq!(
            render_human(&empty),
            "No errors were found on the image.\nImage end offset: 327680\n"
        );
    }

    #[test]
    fn problems_human() {
        let c = CheckOutput {
            corruptions: 1,
            leaks: 5,
            check_errors: 2,
            ..output()
        };
        assert_eq!(
            render_human(&c),
            "\n1 errors were found on the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it.\n\
             \n5 leaked clusters were found on the image.\n\
             This means waste of disk space, but no harm to data.\n\
             \n2 internal errors have occurred during the check.\n\
             5/256 = 1.95% allocated, 20.00% fragmented, 0.00% compressed clusters\n"
        );
        assert_eq!(c.exit_code(), 2);
        assert_eq!(
            CheckOutput {
                leaks: 1,
                ..output()
            }
            .exit_code(),
            3
        );
        assert_eq!(output().exit_code(), 0);
    }

    #[test]
    fn repaired_lines() {
        assert_eq!(
            render_repaired(0, 1),
            "The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\n"
        );
    }

    #[test]
    fn json_order_and_omissions() {
        let c = CheckOutput {
            image_end_offset: 4096,
            corruptions: 1,
            corruptions_fixed: 2,
            leaks: 3,
            leaks_fixed: 4,
            ..output()
        };
        assert_eq!(
            to_qemu_json(&c).unwrap(),
            "{\n    \"image-end-offset\": 4096,\n    \"total-clusters\": 256,\n    \
             \"corruptions\": 1,\n    \"corruptions-fixed\": 2,\n    \"check-errors\": 0,\n    \
             \"leaks\": 3,\n    \"leaks-fixed\": 4,\n    \"allocated-clusters\": 5,\n    \
             \"filename\": \"x.qed\",\n    \"format\": \"qed\",\n    \
             \"fragmented-clusters\": 1\n}\n"
        );
        let bare = CheckOutput {
            filename: "e.qed".into(),
            format: "qed",
            ..CheckOutput::default()
        };
        assert_eq!(
            to_qemu_json(&bare).unwrap(),
            "{\n    \"check-errors\": 0,\n    \"filename\": \"e.qed\",\n    \"format\": \"qed\"\n}\n"
        );
    }
}
