//! DICOM in and out: what the scanner sends and what goes back to PACS.
//!
//! - [`uid`]: UID validation (before a UID becomes a path part) and derived UIDs.
//! - [`config`]: the `[dicom]` and `[dicom.pacs]` keys.
//! - [`series`]: a series folder's identifiers and acquisition facts (headers only), and the
//!   checks before scoring (CT, no localizer, enough slices, thin-slice warning).
//! - [`sr`]: the job's DICOM SR (Comprehensive 3D SR, TID 1500, IHE AIR provenance).
//! - [`store`]: received instances on disk by Study/Series/SOP UID; stability; pruning.
//! - [`receiver`]: the C-STORE SCP (dicom-ul) that fills the store.
//! - [`sender`]: the durable PACS queue and its C-STORE SCU.
//!
//! dicom-rs does the parsing and the encoding (`dicom-object` in-memory objects); nothing
//! here writes DICOM bytes by hand.

pub mod config;
pub mod receiver;
pub mod sender;
pub mod series;
pub mod sr;
pub mod store;
pub mod uid;

pub use config::{DicomConfig, DicomSettings, PacsConfig};
pub use series::{SeriesError, SeriesInfo};
