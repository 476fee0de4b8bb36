//! The OS side of an agent: spawning it (own process group, clean environment, three pipes),
//! signalling its group, reading its resident memory.

use std::collections::HashMap;
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
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// The resident memory in kB of each of the process groups led by `leaders`: the sum of
/// `VmRSS` over every live process of the group (an agent's helpers — ffmpeg, a model
/// server — count towards its limit). One pass over `/proc`; a group whose leader is gone or
/// a zombie is absent, even if members linger (they are killed with the group on stop).
pub(super) fn group_rss_kb(leaders: &[u32]) -> HashMap<u32, u64> {
    let mut totals: HashMap<u32, u64> = leaders
        .iter()
        .filter_map(|&pid| rss_kb(pid).map(|kb| (pid, kb)))
        .collect();
    if totals.is_empty() {
        return totals;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return totals;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if totals.contains_key(&pid) {
            continue; // a leader, already counted
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(pgid) = parse_pgrp(&stat)
            && let Some(total) = totals.get_mut(&pgid)
            && let Some(kb) = rss_kb(pid)
        {
            *total += kb;
        }
    }
    totals
}

/// The process group (field 5) of a `/proc/<pid>/stat` line; the command (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so parse after the last `)`.
fn parse_pgrp(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    rest.split_whitespace().nth(2)?.parse().ok()
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

    #[test]
    fn parses_the_process_group_after_an_awkward_command_name() {
        let stat = "4242 (bot (v2) x) S 1 4240 4240 0 -1 4194560 123 0 0 0";
        assert_eq!(parse_pgrp(stat), Some(4240));
        assert_eq!(parse_pgrp("garbage"), None);
    }

    #[tokio::test]
    async fn sums_the_rss_of_every_process_in_the_group() {
        // A group of three: the shell leader and two sleeping children.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .ok()
                        .and_then(|s| parse_pgrp(&s))
                        == Some(pid)
                })
                .count()
        };
        while members() < 3 {
            assert!(std::time::Instant::now() < deadline, "children not started");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let leader = rss_kb(pid).unwrap();
        let total = group_rss_kb(&[pid])[&pid];
        assert!(total > leader, "group {total} kB vs leader {leader} kB");
        signal_group(pid, Signal::SIGKILL);
        child.wait().await.unwrap();
        assert!(group_rss_kb(&[pid]).is_empty(), "a reaped group has no RSS");
    }
}
