//! The watchdog: child processes die with the process that spawned them, however it dies —
//! `kill -9`, the OOM killer, a panic with `panic = "abort"` — together with their own
//! children.
//!
//! # How
//!
//! Each process that spawns children (a node; a test binary running many nodes) starts one
//! small watchdog process, `/bin/sh -c '<script>' rt-watchdog`, in its own process group with
//! an empty environment, and holds the write end of its stdin for its whole life. Every child
//! runs in its own process group; when one is spawned the line `+ PGID START` goes to the
//! watchdog, and `- PGID START` once the group was SIGKILLed and the child reaped (START is the
//! leader's start time, field 22 of `/proc/PGID/stat`). When the process dies the kernel closes
//! the pipe, the watchdog reads end-of-file and SIGKILLs every group still listed — unless that
//! group's leader is alive with another start time (its pid was reused) — then exits.
//!
//! Why not a parent-death signal: `PR_SET_PDEATHSIG` fires when the *thread* that forked exits
//! (tokio's blocking threads come and go), reaches only the direct child (not its group), and
//! needs `pre_exec` (unsafe code, forbidden in this workspace). Why not a cgroup: it needs a
//! delegated cgroup tree the runtime cannot count on. The pipe needs nothing: the kernel closes
//! it on every kind of death, and the watchdog's death is noticed (a failed write, or the
//! check every second) and answered with a new one that is sent every group still alive.
//!
//! The lines are written by one thread that owns the watchdog, fed through a channel: a spawn
//! never blocks on the watchdog, and one watchdog serves every node a process runs.
//!
//! # The ledger: what a dead watchdog left
//!
//! If the watchdog dies together with its process (both SIGKILLed), nobody kills the children.
//! So the same lines are appended to a ledger file, `<dir>/<pid>-<start>.groups` — `<dir>` is
//! `$XDG_RUNTIME_DIR/rt-children` when that is set, else `<temp dir>/rt-children-<uid>`,
//! created mode 0700 and refused when it is not a directory owned by the user with no access
//! for others. When a process starts its watchdog it reads the ledgers of processes that are
//! gone (no process with that pid and start time), kills the groups they list that are still
//! there — a group whose leader is alive with the recorded start time; for a group whose
//! leader is gone, its members that started no earlier than the leader did — and deletes those
//! ledgers. So a restarted node (or any node of the same user on the machine) kills what an
//! earlier incarnation left.
//!
//! # Limits
//!
//! - A grandchild that leaves its group (`setsid`, `setpgid`) is not reached, neither by the
//!   runtime's own kills nor by the watchdog.
//! - A child spawned in the instant before its process dies, before its line reached the
//!   watchdog, is not listed (the window is one channel hand-off and one pipe write).
//! - Leftovers are killed when a process starts the watchdog: at node start, or for a program
//!   embedding the library at its first child.
//! - A group whose leader is gone and whose id was reused, in the meantime, by a new group
//!   whose own leader is gone too, could be hit by a leftover kill (its members started after
//!   the recorded leader).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{error, warn};

/// The watchdog's program: collect `+`/`-` lines until end-of-file, then SIGKILL every group
/// still listed whose leader is gone or has the recorded start time.
const SCRIPT: &str = r#"trap '' HUP INT PIPE
groups=' '
while read -r op pgid start; do
  e="$pgid:$start"
  case $op in
    +) groups="$groups$e " ;;
    -) case $groups in *" $e "*) groups="${groups%% $e *} ${groups#* $e }" ;; esac ;;
  esac
done
for e in $groups; do
  p=${e%%:*}; s=${e#*:}
  if read -r stat 2>/dev/null < "/proc/$p/stat"; then
    set -- ${stat##*) }
    [ "$s" = 0 ] || [ "${20}" = "$s" ] || continue
  fi
  kill -s KILL -- "-$p" 2>/dev/null
done
"#;

/// The watchdog's `$0`: how it shows in `ps`.
pub const NAME: &str = "rt-watchdog";

/// How often the watchdog's liveness is checked when no child starts or ends.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Lines a ledger may hold before it is rewritten with only the live groups.
const COMPACT_AFTER: usize = 4096;

/// A listed group: its id and its leader's start time (0 when it could not be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    pgid: u32,
    start: u64,
}

impl Entry {
    fn line(self, op: char) -> String {
        format!("{op} {} {}\n", self.pgid, self.start)
    }
}

enum Note {
    Add(Entry),
    Remove(Entry),
}

static NOTES: OnceLock<mpsc::Sender<Note>> = OnceLock::new();

/// Starts this process's watchdog (once; later calls return at once), after killing what the
/// children of dead processes left (see the module docs).
pub fn start() {
    notes();
}

fn notes() -> &'static mpsc::Sender<Note> {
    NOTES.get_or_init(|| {
        let ledger = Ledger::open();
        let (sender, receiver) = mpsc::channel();
        let keeper = Keeper {
            ledger,
            live: BTreeSet::new(),
            watchdog: None,
            failed_at: None,
        };
        if let Err(err) = std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || keeper.run(&receiver))
        {
            error!(error = %err, "cannot start the watchdog thread: children will not die with this process");
        }
        sender
    })
}

/// A child's process group, listed with the watchdog while this value lives. Dropping it
/// SIGKILLs the group — the child's own children with it — and then unlists it.
#[derive(Debug)]
pub struct ProcessGroup {
    entry: Entry,
}

impl ProcessGroup {
    /// Lists the group led by `pid`: a child spawned in a new process group (its pgid is its
    /// pid) and not reaped yet.
    pub fn watch(pid: u32) -> Self {
        let entry = Entry {
            pgid: pid,
            start: stat(pid).map_or(0, |s| s.start),
        };
        let _ = notes().send(Note::Add(entry));
        Self { entry }
    }

    /// The group's id (the leader's pid).
    pub fn id(&self) -> u32 {
        self.entry.pgid
    }

    /// Sends `signal` to every process of the group (a group already gone is no error).
    pub fn signal(&self, signal: Signal) {
        if let Ok(pgid) = i32::try_from(self.entry.pgid)
            && pgid > 1
        {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = notes().send(Note::Remove(self.entry));
    }
}

/// The running watchdog process and the write end of its stdin.
struct Watchdog {
    process: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl Watchdog {
    fn spawn() -> io::Result<Self> {
        let mut process = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg(NAME)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = process
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the watchdog has no stdin"))?;
        Ok(Self { process, stdin })
    }

    fn alive(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    fn stop(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The thread that owns the watchdog: applies the notes to the live set, the ledger and the
/// watchdog, and replaces a watchdog that died.
struct Keeper {
    ledger: Option<Ledger>,
    live: BTreeSet<Entry>,
    watchdog: Option<Watchdog>,
    /// When the last spawn of a watchdog failed (the next try waits [`CHECK_EVERY`]).
    failed_at: Option<Instant>,
}

impl Keeper {
    fn run(mut self, notes: &mpsc::Receiver<Note>) {
        self.ensure_watchdog();
        loop {
            match notes.recv_timeout(CHECK_EVERY) {
                Ok(note) => self.apply(note),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.ensure_watchdog();
        }
    }

    fn apply(&mut self, note: Note) {
        let line = match note {
            Note::Add(entry) => {
                self.live.insert(entry);
                entry.line('+')
            }
            Note::Remove(entry) => {
                if !self.live.remove(&entry) {
                    return;
                }
                entry.line('-')
            }
        };
        if let Some(ledger) = &mut self.ledger
            && let Err(err) = ledger.append(&line, &self.live)
        {
            warn!(ledger = %ledger.path.display(), error = %err, "cannot write the watchdog's ledger: a restarted node will not kill what this one leaves if its watchdog dies with it");
            self.ledger = None;
        }
        if let Some(watchdog) = &mut self.watchdog
            && watchdog.stdin.write_all(line.as_bytes()).is_err()
        {
            warn!("the watchdog is gone; starting a new one");
            if let Some(old) = self.watchdog.take() {
                old.stop();
            }
            self.ensure_watchdog();
        }
    }

    /// Starts a watchdog when there is none or it exited, and sends it every live group.
    fn ensure_watchdog(&mut self) {
        if let Some(watchdog) = &mut self.watchdog {
            if watchdog.alive() {
                return;
            }
            warn!("the watchdog exited; starting a new one");
            if let Some(old) = self.watchdog.take() {
                old.stop();
            }
        }
        if self.failed_at.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
            return;
        }
        match Watchdog::spawn() {
            Ok(mut watchdog) => {
                let lines: String = self.live.iter().map(|e| e.line('+')).collect();
                if watchdog.stdin.write_all(lines.as_bytes()).is_ok() {
                    self.watchdog = Some(watchdog);
                    self.failed_at = None;
                } else {
                    watchdog.stop();
                    self.failed_at = Some(Instant::now());
                }
            }
            Err(err) => {
                if self.failed_at.is_none() {
                    error!(error = %err, "cannot start the watchdog (/bin/sh): children will not die with this process until it starts");
                }
                self.failed_at = Some(Instant::now());
            }
        }
    }
}

/// This process's ledger file.
struct Ledger {
    path: PathBuf,
    file: fs::File,
    lines: usize,
}

impl Ledger {
    /// Kills what the ledgers of dead processes list and opens this process's own; `None`
    /// (with a warning) when the directory cannot be used.
    fn open() -> Option<Self> {
        let dir = ledger_dir();
        let opened = prepare(&dir).and_then(|()| {
            let killed = clean(&dir);
            if killed > 0 {
                warn!(ledgers = %dir.display(), killed, "killed processes left running by children of a process that died with its watchdog");
            }
            let me = stat_of("self").ok_or_else(|| io::Error::other("cannot read /proc/self/stat"))?;
            let path = dir.join(format!("{}-{}.groups", std::process::id(), me.start));
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&path)?;
            Ok(Self {
                path,
                file,
                lines: 0,
            })
        });
        match opened {
            Ok(ledger) => Some(ledger),
            Err(err) => {
                warn!(ledgers = %dir.display(), error = %err, "the watchdog keeps no ledger: a restarted node will not kill what this one leaves if its watchdog dies with it");
                None
            }
        }
    }

    fn append(&mut self, line: &str, live: &BTreeSet<Entry>) -> io::Result<()> {
        self.file.write_all(line.as_bytes())?;
        self.lines += 1;
        if self.lines > COMPACT_AFTER && self.lines > live.len().saturating_mul(4) {
            let lines: String = live.iter().map(|e| e.line('+')).collect();
            let fresh = self.path.with_extension("compacting");
            fs::write(&fresh, lines)?;
            fs::rename(&fresh, &self.path)?;
            self.file = fs::OpenOptions::new().append(true).open(&self.path)?;
            self.lines = live.len();
        }
        Ok(())
    }
}

/// `$XDG_RUNTIME_DIR/rt-children`, else `<temp dir>/rt-children-<uid>`.
fn ledger_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("rt-children"),
        _ => {
            let uid = fs::metadata("/proc/self").map_or(0, |m| m.uid());
            std::env::temp_dir().join(format!("rt-children-{uid}"))
        }
    }
}

/// Creates `dir` (mode 0700) and checks that it is a directory of this user that nobody else
/// can read or write — another user must not be able to plant a ledger.
fn prepare(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    let meta = fs::symlink_metadata(dir)?;
    let me = fs::metadata("/proc/self")?.uid();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory owned by uid {me} with mode 0700",
            dir.display()
        )));
    }
    Ok(())
}

/// Kills the leftovers listed in the ledgers of dead processes under `dir` and deletes those
/// ledgers; returns how many processes or groups were signalled.
fn clean(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some((pid, start)) = owner(&path) else {
            continue;
        };
        if stat(pid).is_some_and(|s| s.start == start) {
            continue; // its process is alive: its watchdog is its business
        }
        for group in replay(&path) {
            killed += kill_leftover(group);
        }
        let _ = fs::remove_file(&path);
    }
    killed
}

/// The `(pid, start time)` of the process a ledger named `<pid>-<start>.groups` belongs to.
fn owner(path: &Path) -> Option<(u32, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".groups")?;
    let (pid, start) = name.split_once('-')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// The groups a ledger still lists after its `+` and `-` lines.
fn replay(path: &Path) -> BTreeSet<Entry> {
    let mut live = BTreeSet::new();
    let Ok(file) = fs::File::open(path) else {
        return live;
    };
    for line in io::BufReader::new(file).lines().map_while(Result::ok) {
        let mut fields = line.split(' ');
        let (Some(op), Some(pgid), Some(start)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(pgid), Ok(start)) = (pgid.parse(), start.parse()) else {
            continue;
        };
        let entry = Entry { pgid, start };
        match op {
            "+" => {
                live.insert(entry);
            }
            "-" => {
                live.remove(&entry);
            }
            _ => {}
        }
    }
    live
}

/// SIGKILLs what is left of `group`: the whole group when its leader is alive with the
/// recorded start time; nothing when the leader's pid now belongs to another process; the
/// group's members that started no earlier than the leader when the leader is gone. Returns
/// how many groups or processes were signalled.
fn kill_leftover(group: Entry) -> usize {
    if group.pgid <= 1 {
        return 0;
    }
    let Ok(pgid) = i32::try_from(group.pgid) else {
        return 0;
    };
    match stat(group.pgid) {
        Some(leader) if leader.start == group.start || group.start == 0 => {
            usize::from(killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok())
        }
        Some(_) => 0,
        None => members(group.pgid)
            .into_iter()
            .filter(|(_, s)| s.start >= group.start)
            .filter_map(|(pid, _)| i32::try_from(pid).ok())
            .filter(|&pid| kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok())
            .count(),
    }
}

/// The processes whose process group is `pgid`.
fn members(pgid: u32) -> Vec<(u32, Stat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| s.pgrp == pgid)
        .collect()
}

/// What the watchdog reads of `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug)]
struct Stat {
    pgrp: u32,
    /// Clock ticks after boot at which the process started.
    start: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    stat_of(&pid.to_string())
}

fn stat_of(pid: &str) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Fields after the command name (which may hold spaces and parentheses): state is field 3,
/// pgrp field 5, starttime field 22.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::*;

    /// A shell in its own group with a `sleep` child; returns the process and its pid.
    fn group() -> (std::process::Child, u32) {
        let child = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        (child, pid)
    }

    /// Whether `pid` is alive (a zombie counts as gone).
    fn running(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    }

    fn members_running(pgid: u32) -> usize {
        members(pgid)
            .into_iter()
            .filter(|(pid, _)| running(*pid))
            .count()
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn reads_pgrp_and_start_time_past_a_command_with_spaces() {
        let text =
            "4711 (voice (bot) 1) S 1 4711 4711 0 -1 4194560 1 0 0 0 2 1 0 0 20 0 1 0 987654 1 2 3";
        let stat = parse_stat(text).unwrap();
        assert_eq!((stat.pgrp, stat.start), (4711, 987654));
        let me = stat_of("self").unwrap();
        assert!(me.start > 0);
    }

    #[test]
    fn the_script_kills_the_groups_still_listed_at_end_of_file_and_spares_the_others() {
        let (mut listed, a) = group();
        let (mut removed, b) = group();
        let (mut reused, c) = group();
        assert!(wait_for(
            || members_running(a) == 2 && members_running(b) == 2
        ));
        let mut watchdog = Watchdog::spawn().unwrap();
        let start = |pid| stat(pid).unwrap().start;
        let lines = format!(
            "+ {a} {}\n+ {b} {}\n+ {c} {}\n- {b} {}\n",
            start(a),
            start(b),
            start(c) + 1, // as if `c` were another process with the same pid
            start(b)
        );
        watchdog.stdin.write_all(lines.as_bytes()).unwrap();
        // The end of the pipe, as when the process dies.
        drop(watchdog.stdin);
        assert!(watchdog.process.wait().unwrap().success());
        assert!(
            wait_for(|| members_running(a) == 0),
            "the listed group lives"
        );
        listed.wait().unwrap();
        assert_eq!(members_running(b), 2, "an unlisted group was killed");
        assert_eq!(members_running(c), 2, "a reused pid was killed");
        for child in [&mut removed, &mut reused] {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            child.wait().unwrap();
        }
    }

    #[test]
    fn a_ledger_of_a_dead_process_has_its_leftovers_killed_and_is_deleted() {
        let dir = std::env::temp_dir().join(format!("rt-ledger-test-{}", std::process::id()));
        prepare(&dir).unwrap();
        let (mut alive_leader, a) = group();
        // A group whose leader is gone: only its member (`sleep`) is left.
        let mut orphaned = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & echo $!"])
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let b = orphaned.id();
        let b_start = stat(b).unwrap().start;
        orphaned.wait().unwrap();
        let (mut spared, c) = group();
        assert!(wait_for(|| members_running(a) == 2
            && members_running(b) == 1
            && members_running(c) == 2));
        // A dead owner: pid 1 never has this start time.
        let dead = dir.join("1-1.groups");
        let start = |pid| stat(pid).unwrap().start;
        fs::write(
            &dead,
            format!(
                "+ {a} {}\n+ {b} {b_start}\n+ {c} {}\n- {c} {}\ngarbage\n+ 1",
                start(a),
                start(c),
                start(c)
            ),
        )
        .unwrap();
        // A live owner (this process): its ledger is left alone.
        let me = stat_of("self").unwrap().start;
        let live = dir.join(format!("{}-{me}.groups", std::process::id()));
        fs::write(&live, format!("+ {c} {}\n", start(c))).unwrap();

        assert_eq!(clean(&dir), 2);
        assert!(!dead.exists() && live.exists());
        assert!(wait_for(
            || members_running(a) == 0 && members_running(b) == 0
        ));
        alive_leader.wait().unwrap();
        assert_eq!(members_running(c), 2);
        let _ = killpg(Pid::from_raw(c as i32), Signal::SIGKILL);
        spared.wait().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = std::env::temp_dir().join(format!("rt-ledger-open-{}", std::process::id()));
        prepare(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare(&dir).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dropped_group_is_killed_and_the_watchdog_is_replaced_when_it_dies() {
        start();
        let (mut child, pid) = group();
        assert!(wait_for(|| members_running(pid) == 2));
        let watched = ProcessGroup::watch(pid);
        assert_eq!(watched.id(), pid);
        drop(watched);
        assert!(wait_for(|| members_running(pid) == 0));
        child.wait().unwrap();
        // This process's watchdog, killed, comes back within the check interval.
        let find = || {
            fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .find(|pid| {
                    let parent = fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| {
                            s.rsplit_once(") ")?
                                .1
                                .split_whitespace()
                                .nth(1)?
                                .parse::<u32>()
                                .ok()
                        });
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    parent == Some(std::process::id())
                        && running(*pid)
                        && String::from_utf8_lossy(&cmdline).contains(NAME)
                })
        };
        assert!(wait_for(|| find().is_some()), "no watchdog");
        let first = find().unwrap();
        kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        assert!(
            wait_for(|| find().is_some_and(|pid| pid != first)),
            "the watchdog was not replaced"
        );
    }
}
