//! What unistor's programs share below the protocol:
//! - [`exec`]: run an external tool as argv (never a shell) with a deadline, then SIGTERM to its
//!   process group, then SIGKILL; stderr carried into the error;
//! - [`fsutil`]: atomic file writes (temp file in the same directory, fsync, rename);
//! - [`cli`]: command-line parsing with unistor's exit codes (usage errors 64, never 2).

pub mod cli;
pub mod exec;
pub mod fsutil;
