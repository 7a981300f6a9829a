//! Storage: where traces, spilled bodies and `modeldata` CSV parts end up.
//!
//! - [`key`]: key templates (the layout in README, "Storage");
//! - [`staging`]: files written locally first (the store itself for `file://`, the spool for
//!   remote stores), the spool's disk budget, recovery after a crash;
//! - [`batch`]: trace batches sealed by size, age and hour;
//! - [`modeldata`]: the Azure ML v1 compatible CSV export;
//! - [`remote`]: the S3-compatible and Azure Blob backends behind one type;
//! - [`uploader`]: the background thread that moves sealed spool files to a remote store.

pub mod batch;
pub mod key;
pub mod modeldata;
pub mod remote;
pub mod staging;
pub mod uploader;
