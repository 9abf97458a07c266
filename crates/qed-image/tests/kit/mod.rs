//! The test kit shared by every integration test of `qed-image`. Each test binary declares
//! `mod kit;` and uses the part it needs: hence `dead_code` is allowed here, and
//! `unused_imports` for the re-exports below, which let tests name every helper as `kit::x`.
//!
//! | module | job |
//! |---|---|
//! | [`rng`] | the seeded random number generator |
//! | [`oracle`] | running programs; qemu-img / qemu-io wrappers; missing tools skip, or fail under `CI=true` |
//! | [`map`] | `qemu-img map` entries: parsing QEMU's, converting ours |
//! | [`files`] | fixture and hostile image directories, scratch copies, reading and patching files |
//! | [`contents`] | guest ranges and whole disks as bytes, fill checks, sha256 |
//! | [`images`] | creating and opening images, backing layers, the parsed on-disk [`Layout`] |
//! | [`pattern`] | never-zero data patterns and the [`PatternStorage`] backing file |
//! | [`model`] | the reference disk [`SparseDisk`] and the checks of an image against it |
//! | [`workload`] | crash/fault workloads: [`CrashConfig`], guest [`Windows`], [`GuestOp`] |
//! | [`crash`] | [`RecordingStorage`] and the durability-contract checks |
//! | [`joint`] | crash states of an operation on several files: [`Timeline`], [`explore_joint`] |
//! | [`panics`] | caught panics as text |

#![allow(dead_code, unused_imports)]

pub mod contents;
pub mod crash;
pub mod files;
pub mod images;
pub mod joint;
pub mod map;
pub mod model;
pub mod oracle;
pub mod panics;
pub mod pattern;
pub mod rng;
pub mod workload;

pub use contents::*;
pub use crash::*;
pub use files::*;
pub use images::*;
pub use joint::*;
pub use map::*;
pub use model::*;
pub use oracle::*;
pub use panics::*;
pub use pattern::*;
pub use rng::*;
pub use workload::*;
