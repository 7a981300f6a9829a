//! Storage: where traces, spilled bodies and `modeldata` CSV parts end up.
//!
//! - [`remote`]: the S3-compatible and Azure Blob backends behind one type;
//! - `staging`: files written locally first (the store itself for `file://`, the spool for remote
//!   stores);
//! - `uploader`: the background thread that moves sealed spool files to a remote store.

pub mod remote;
