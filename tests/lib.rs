//! Cross-crate integration tests (processes end to end).
