//! The master dataset's format, shared by the archiver that writes it and by every reader
//! (the batch layer's SQL and loads, and the speed layer's recompute):
//!
//! - [`layout`]: where files and progress markers live, and which files count;
//! - [`progress`]: each partition's progress in a bounded number of objects, and the files
//!   of units a crash left unfinished;
//! - [`parquet_file`]: events (with their Kafka partition and offset) to a Parquet file and
//!   back;
//! - [`reader`]: an archive file back to events, for recompute;
//! - [`identity_file`]: the speed layer's identity records of a unit, beside its events;
//! - [`erase`]: a file rewritten without erased people's rows; [`bloom`]: the id columns'
//!   bloom filters that find the files holding them;
//! - [`store`]: opening the object store (local directory, `s3://`, `gs://`).

pub mod bloom;
pub mod erase;
pub mod identity_file;
pub mod layout;
pub mod parquet_file;
pub mod progress;
pub mod reader;
pub mod store;
