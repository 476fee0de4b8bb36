//! The OS side of an agent: spawning it (own process group, clean environment, three pipes),
//! signalling its group, reading its resident memory.

use std::io;
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::PoolSettings;

/// Spawns one agent: `command args…` with only the configured env plus `RT_AGENT_ID` and
/// `RT_POOL`, in a new process group (its pgid is its pid), stdin/stdout/stderr piped, killed
/// (and reaped by tokio) if its `Child` is ever dropped unreaped.
pub(super) fn spawn(settings: &PoolSettings, agent_id: &str) -> io::Result<Child> {
    let mut command = Command::new(&settings.command);
    command
        .args(&settings.args)
        .env_clear()
        .envs(&settings.env)
        .env("RT_AGENT_ID", agent_id)
        .env("RT_POOL", &settings.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &settings.cwd {
        command.current_dir(cwd);
    }
    command.spawn()
}

/// Sends `signal` to the process group led by `pid` (ignoring a group that is already gone).
pub(super) fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// The resident set size of `pid` in kB (`VmRSS` of `/proc/<pid>/status`); `None` when the
/// process is gone or a zombie.
pub(super) fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_kb() {
        let status = "Name:\tpython3\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tzombie\nState:\tZ (zombie)\n"), None);
        assert!(rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }
}
