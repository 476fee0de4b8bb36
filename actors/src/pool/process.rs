//! The OS side of an agent: spawning it (through [`crate::child::spawn`]: own process group,
//! clean environment, listed with the watchdog; three pipes), signalling its group, reading
//! its resident memory.

use std::collections::HashMap;
use std::io;
use std::process::Stdio;

use std::os::fd::OwnedFd;

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::{PoolSettings, worker};
use crate::child::{self, ProcessGroup};

/// Spawns one agent: `command args…` with only the configured env plus `RT_AGENT_ID` and
/// `RT_POOL`, in a new process group (its pgid is its pid) listed with the watchdog, stdin/
/// stdout/stderr piped, killed (and reaped by tokio) if its `Child` is ever dropped unreaped.
///
/// A worker pool's process gets no stdin but one end of a socket pair as its fd
/// [`worker::CHILD_FD`] (the protocol channel; the other end is returned) and the worker's
/// variables (`RT_WORKER_FD`, `RT_WORKER_MODULES`, …). The parent's copy of the child's end is
/// closed when `command` is dropped at the return, so the channel sees EOF when the child dies.
pub(super) fn spawn(
    settings: &PoolSettings,
    agent_id: &str,
) -> io::Result<(Child, ProcessGroup, Option<UnixStream>)> {
    let mut command = Command::new(&settings.command);
    command
        .args(&settings.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &settings.cwd {
        command.current_dir(cwd);
    }
    let mut own = vec![
        (child::AGENT_ID_VAR, agent_id.to_string()),
        (child::POOL_VAR, settings.name.clone()),
    ];
    let mut socket = None;
    if let Some(w) = &settings.worker {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        command
            .stdin(Stdio::null())
            .fd_mappings(vec![FdMapping {
                parent_fd: OwnedFd::from(theirs),
                child_fd: worker::CHILD_FD,
            }])
            .map_err(|err| io::Error::other(format!("fd mapping: {err}")))?;
        own.extend(worker::env(w));
        socket = Some(UnixStream::from_std(ours)?);
    }
    let own: Vec<(&str, &str)> = own.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (child, group) = child::spawn(&mut command, &settings.env, &own)?;
    Ok((child, group, socket))
}

/// Sends `signal` to the process group led by `pid` (ignoring a group that is already gone).
pub(super) fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Sends `signal` to the process `pid` alone (ignoring one that is already gone).
pub(super) fn signal_pid(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// The resident set size of `pid` in kB (`VmRSS` of `/proc/<pid>/status`); `None` when the
/// process is gone or a zombie.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// The resident memory in kB of each agent led by `leaders`: the sum of `VmRSS` over the
/// leader and all its live descendants (an agent's helpers — ffmpeg, a model server — count
/// towards its limit). Walks `/proc/<pid>/task/<tid>/children` down from each leader, so the
/// cost is per agent process, not per process on the machine. A leader that is gone or a
/// zombie is absent.
pub(super) fn group_rss_kb(leaders: &[u32]) -> HashMap<u32, u64> {
    leaders
        .iter()
        .filter_map(|&leader| {
            let mut total = rss_kb(leader)?;
            let mut stack = children(leader);
            // A bound against a pid-reuse cycle, far above any agent's process count.
            let mut budget = 4096;
            while let Some(pid) = stack.pop()
                && budget > 0
            {
                budget -= 1;
                total += rss_kb(pid).unwrap_or(0);
                stack.extend(children(pid));
            }
            Some((leader, total))
        })
        .collect()
}

/// The children of every thread of `pid` (`/proc/<pid>/task/<tid>/children`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
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

    #[tokio::test]
    async fn sums_the_rss_of_the_agent_and_its_descendants() {
        // The shell leader and two sleeping children.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while children(pid).len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "children not started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let leader = rss_kb(pid).unwrap();
        let total = group_rss_kb(&[pid])[&pid];
        assert!(
            total > leader,
            "with children {total} kB vs leader {leader} kB"
        );
        signal_group(pid, Signal::SIGKILL);
        child.wait().await.unwrap();
        assert!(group_rss_kb(&[pid]).is_empty(), "a reaped group has no RSS");
    }
}
