//! Child processes of the node — `exec` commands and pool agents — are started, read and killed
//! one way:
//!
//! - `spawn`: a clean environment (only what [`environment`] built from the configuration,
//!   plus the variables the runtime sets itself), a new process group whose id is the child's
//!   pid, `kill_on_drop`, and the group listed with the [`watchdog`] as a [`ProcessGroup`];
//! - [`lines`]: each pipe read to its end, at most a cap of each line kept;
//! - [`watchdog`]: every listed group is SIGKILLed when the process that spawned it dies,
//!   however it dies; dropping a [`ProcessGroup`] SIGKILLs its group and unlists it.

pub mod lines;
pub mod watchdog;

use std::collections::BTreeMap;
use std::io;

use tokio::process::{Child, Command};

pub use watchdog::ProcessGroup;

/// `PATH` of a child when neither its configuration nor the runtime's own environment has one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A pool agent's id (`voice-17`), set by the pool in each agent.
pub const AGENT_ID_VAR: &str = "RT_AGENT_ID";
/// A pool agent's pool name, set by the pool in each agent.
pub const POOL_VAR: &str = "RT_POOL";

/// Variables the runtime sets in its children itself: a configuration's `env` or `pass_env`
/// cannot name them.
pub const RESERVED: [&str; 7] = [
    "RT_TASK_ID",
    "RT_TASK",
    "RT_QUEUE",
    "RT_EGRESS_URL",
    "RT_EGRESS_TOKEN",
    AGENT_ID_VAR,
    POOL_VAR,
];

/// The whole environment of a child built from its configuration: `env` as written, then each
/// `pass_env` variable the runtime's own environment has (as UTF-8), then `PATH` — the
/// runtime's own, else [`DEFAULT_PATH`] — when neither set it (without one, `python3` and the
/// like are not found by the child's own lookups). Nothing else is inherited.
pub fn environment<'a>(
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
    pass_env: &[String],
) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = env
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    for name in pass_env {
        if let Ok(value) = std::env::var(name) {
            vars.insert(name.clone(), value);
        }
    }
    if !vars.contains_key("PATH") {
        let path = std::env::var("PATH")
            .ok()
            .filter(|path| !path.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.to_string());
        vars.insert("PATH".to_string(), path);
    }
    vars
}

/// Spawns `command` (its program, arguments, stdio and working directory set by the caller)
/// with exactly `env` plus `own` (the runtime's variables, which win), in a new process group,
/// killed if its `Child` is dropped unreaped, its group listed with the watchdog.
pub(crate) fn spawn(
    command: &mut Command,
    env: &BTreeMap<String, String>,
    own: &[(&str, &str)],
) -> io::Result<(Child, ProcessGroup)> {
    watchdog::start();
    command
        .env_clear()
        .envs(env)
        .envs(own.iter().copied())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the child has no pid"))?;
    Ok((child, ProcessGroup::watch(pid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_env_then_passed_variables_then_path() {
        let env = environment([("PYTHONUNBUFFERED", "1")], &["HOME".to_string()]);
        assert_eq!(env["PYTHONUNBUFFERED"], "1");
        assert_eq!(env.get("HOME"), std::env::var("HOME").ok().as_ref());
        assert!(env.contains_key("PATH"));
        assert!(!env.contains_key("CARGO_MANIFEST_DIR"), "{env:?}");
        let own = environment([("PATH", "/opt/venv/bin")], &[]);
        assert_eq!(own["PATH"], "/opt/venv/bin");
        let unset = environment([], &["RT_SURELY_NOT_SET_ANYWHERE".to_string()]);
        assert_eq!(unset.keys().collect::<Vec<_>>(), ["PATH"]);
    }
}
