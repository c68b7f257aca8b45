//! Project automation, run as `cargo xtask <command>`.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_methods)]
fn main() {}
