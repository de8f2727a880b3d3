//! Integration tests: one binary, modules by topic. Fixtures live in tests/fixtures
//! (copied from the project's reference fixtures; see tests/fixtures/reference/README.md).

mod eval;
mod synth;
mod util;
