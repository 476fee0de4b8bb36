//! `runtime check`: compile a config and print every error and warning.
//!
//! Output, all on stdout (it is the command's result, meant to be read or grepped; stderr
//! stays free for logs): one line per diagnostic, errors first, then warnings —
//!
//! ```text
//! error: <key.path>: <message>
//! warning: <key.path>: <message>
//! ```
//!
//! — then one summary line: `<file>: ok`, or the counts, e.g. `<file>: 2 errors, 1 warning`.
//! An unreadable file or a TOML syntax error is one error line (a syntax error is named by
//! `line L, column C`). Beyond the file it checks that every native task has a function in
//! this binary and, unless `--no-environment`, that the broker answers. Exit status: 0 when clean (warnings allowed), 78 (`EX_CONFIG`) on
//! errors, and on warnings too with `--deny-warnings`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use actors::broker::AnyBroker;
use actors::broker::memory::MemoryBroker;
use actors::handler::native::Natives;

use crate::config::{self, Config, Diagnostics, Environment};
use crate::http::egress::EgressAccess;
use crate::topology::{pools, resources, task_defs};

/// sysexits.h EX_CONFIG: the exit code for a bad config.
pub const EX_CONFIG: u8 = 78;

/// Runs `runtime check`; exit 0 when clean, 78 (EX_CONFIG) on errors (or on warnings with
/// `deny_warnings`). `no_environment` skips the checks that read the environment.
pub async fn run(path: &Path, deny_warnings: bool, no_environment: bool) -> ExitCode {
    let lookup = |name: &str| std::env::var(name).ok();
    let env = if no_environment {
        Environment::Ignored
    } else {
        Environment::Lookup(&lookup)
    };
    let diagnostics = match config::load_with(path, env) {
        Ok(loaded) => {
            let mut diagnostics = Diagnostics {
                errors: Vec::new(),
                warnings: loaded.warnings,
            };
            beyond_the_file(&loaded.config, no_environment, &mut diagnostics).await;
            diagnostics
        }
        Err(err) => err.diagnostics,
    };
    for diagnostic in diagnostics.iter() {
        println!("{diagnostic}");
    }
    println!("{}: {}", path.display(), summary(&diagnostics));
    let failed =
        !diagnostics.errors.is_empty() || deny_warnings && !diagnostics.warnings.is_empty();
    if failed {
        ExitCode::from(EX_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

/// What a valid config still needs from this binary and this machine: a registered function
/// for every native task, and (unless `no_environment`) a reachable broker.
async fn beyond_the_file(config: &Config, no_environment: bool, diagnostics: &mut Diagnostics) {
    // Nothing listens in a check: the egress URL is the configured one.
    let egress = EgressAccess::new(config.http.bind);
    let pools = match pools(config, &egress) {
        Ok((pools, _)) => pools,
        Err(problems) => {
            for (path, message) in problems {
                diagnostics.error(path, message);
            }
            Default::default()
        }
    };
    let client = reqwest::Client::new();
    if let Err(missing) = task_defs(config, &Natives::builtin(), &client, &pools, &egress) {
        for (path, message) in missing {
            diagnostics.error(path, message);
        }
    }
    let scratch = Arc::new(AnyBroker::Memory(MemoryBroker::new(
        config.broker.settings.clone(),
    )));
    if let Err(problems) = resources(config, &scratch, "check") {
        for (path, message) in problems {
            diagnostics.error(path, message);
        }
    }
    if !no_environment && !config.broker.url.starts_with("memory:") {
        let settings = config.broker.settings.clone();
        if let Err(err) = AnyBroker::connect(&config.broker.url, settings).await {
            diagnostics.error("broker.url".to_string(), err.to_string());
        }
    }
}

/// `ok`, or the non-zero counts: `2 errors, 1 warning`.
fn summary(diagnostics: &Diagnostics) -> String {
    let counts: Vec<String> = [
        (diagnostics.errors.len(), "error"),
        (diagnostics.warnings.len(), "warning"),
    ]
    .into_iter()
    .filter(|&(count, _)| count > 0)
    .map(|(count, noun)| {
        if count == 1 {
            format!("1 {noun}")
        } else {
            format!("{count} {noun}s")
        }
    })
    .collect();
    if counts.is_empty() {
        "ok".to_owned()
    } else {
        counts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_only_what_is_there() {
        let mut diagnostics = Diagnostics::default();
        assert_eq!(summary(&diagnostics), "ok");
        diagnostics.warning("a", "w");
        assert_eq!(summary(&diagnostics), "1 warning");
        diagnostics.error("b", "e");
        diagnostics.error("c", "e");
        assert_eq!(summary(&diagnostics), "2 errors, 1 warning");
    }
}
