//! `runtime check`: compile a config and print every error and warning.
//!
//! PLACEHOLDER — being written by the config work item.

use std::path::Path;
use std::process::ExitCode;

/// Runs `runtime check`; exit 0 when clean, 78 (EX_CONFIG) on errors.
pub fn run(_path: &Path, _deny_warnings: bool, _no_environment: bool) -> ExitCode {
    ExitCode::from(78)
}

/// sysexits.h EX_CONFIG: the exit code for a bad config.
pub const EX_CONFIG: u8 = 78;
