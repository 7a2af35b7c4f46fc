//! Cross-crate integration tests (processes end to end), and [`cli_doc`]: the check that each
//! binary's `--help` and the README agree.

pub mod cli_doc;
