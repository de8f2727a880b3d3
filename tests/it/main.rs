//! Integration tests: one binary, modules by topic. Fixtures live in tests/fixtures
//! (copied from the project's reference fixtures; see tests/fixtures/reference/README.md).

mod bench;
mod bundle;
mod bundle_store;
mod confine;
mod csv_edges;
mod daemon;
mod daemon_ct;
mod daemon_faults;
mod daemon_stuck;
mod daemon_support;
mod device;
mod dicom_limits;
mod dicom_net;
mod dicom_pacs;
mod dicom_sr;
mod eval;
mod finetune;
mod fuzz;
mod integrity;
mod layout;
mod model;
mod mqtt_tls;
mod preprocess;
mod score_ct;
mod synth;
mod unit;
mod util;
mod volume;
