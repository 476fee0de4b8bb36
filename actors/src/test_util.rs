//! Test harness shared by this crate's tests and (with the `test-util` feature) the `runtime`
//! crate's: [`RedisServer`], a private `redis-server` on a free loopback port, and
//! [`fuzz_cases`], how many cases a property test runs.
//!
//! Redis tests run against a real server started here — never a shared instance
//! (the system one on 6379 is never touched), never a mock. A machine without `redis-server`
//! fails the tests with the command that installs it; nothing is skipped.
//!
//! Every server is killed and reaped when its [`RedisServer`] is dropped (also while a failing
//! test unwinds), and its temporary directory is removed, so `cargo test` leaves no
//! `redis-server` process behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// How long a server gets to answer PING after it was launched (loading an AOF included).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often it is asked.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// The variable that sets how many cases each property test runs (`RT_FUZZ_CASES=100000` for a
/// long run); unset, each runs its own short default.
pub const FUZZ_CASES_ENV: &str = "RT_FUZZ_CASES";

/// How many cases a property test runs: [`FUZZ_CASES_ENV`] when set to a number, else
/// `default` (a profile of a few seconds, what `cargo test` and CI run).
///
/// # Panics
/// When the variable is set but is not a positive number (a typo must not shorten a long run
/// silently).
pub fn fuzz_cases(default: u32) -> u32 {
    match std::env::var(FUZZ_CASES_ENV) {
        Err(_) => default,
        Ok(text) => text
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{FUZZ_CASES_ENV}={text:?}: expected a positive number")),
    }
}

/// A private `redis-server` bound to 127.0.0.1 on a free port, with its own temporary
/// directory and no RDB snapshots (`--save ""`).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    appendonly: bool,
    /// A node of a Redis Cluster: its cluster bus port.
    bus: Option<u16>,
    child: Option<Child>,
}

impl RedisServer {
    /// Launches a server without persistence and waits until it answers PING.
    ///
    /// # Panics
    /// When `redis-server` is not installed (the message says how to install it) or does not
    /// come up.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Launches a server with the append-only file on (`--appendonly yes --appendfsync
    /// always`), so whatever it acknowledged survives [`stop`](Self::stop) +
    /// [`restart`](Self::restart).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_aof() -> Self {
        Self::launch(true)
    }

    fn launch(appendonly: bool) -> Self {
        Self::launch_node(appendonly, false)
    }

    fn launch_node(appendonly: bool, cluster: bool) -> Self {
        let mut last_failure = String::new();
        // A free port can be taken by someone else between the probe and redis-server's bind:
        // try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                port,
                dir: temp_dir(port),
                appendonly,
                bus: cluster.then(free_port),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start: {last_failure}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL (a crash, not a shutdown: nothing is saved on the way
    /// out) and reaps it. Does nothing when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, then starts it again on the same port and directory with
    /// `--appendonly yes`, so the data of a server started with
    /// [`start_with_aof`](Self::start_with_aof) is back.
    ///
    /// # Panics
    /// When the server does not come back.
    pub fn restart(&mut self) {
        self.stop();
        self.appendonly = true;
        if let Err(failure) = self.spawn() {
            panic!(
                "redis-server did not restart on port {}: {failure}",
                self.port
            );
        }
    }

    /// Launches the process and waits for PING; on failure nothing is left running.
    fn spawn(&mut self) -> Result<(), String> {
        assert_ne!(self.port, 6379, "never the system Redis");
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let log = self.dir.join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log);
        if self.appendonly {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(bus) = self.bus {
            command
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                // A replica syncs at once (not after the default 5 s gathering others), so a
                // master killed early in a test has a replica able to take over.
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--cluster-port")
                .arg(bus.to_string())
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (the Redis tests need a real server); install \
                 it with `apt-get install -y redis-server` (Debian/Ubuntu) and run the tests again"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        self.child = Some(child);
        // Counted polls rather than a clock: a test may have paused tokio's time.
        let polls = READY_TIMEOUT.as_millis() / POLL_EVERY.as_millis();
        for _ in 0..polls {
            if ping(self.port) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "exited with {status} on port {}: {}",
                    self.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
            std::thread::sleep(POLL_EVERY);
        }
        self.stop();
        Err(format!(
            "no PONG on port {} within {READY_TIMEOUT:?}",
            self.port
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Cluster on loopback: 3 masters and 3 replicas (`redis-server
/// --cluster-enabled yes`, joined by `redis-cli --cluster create`), each on a free port with its
/// own directory; every node is killed and reaped on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// How long a new cluster gets to agree that every slot is served.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

impl RedisCluster {
    /// Launches the 6 nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok` and every replica has synced with its master.
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing, or the cluster does not form.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| RedisServer::launch_node(false, true))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (it comes with redis-server): {e}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let mut cluster = Self { nodes };
        assert!(
            cluster.wait_synced(CLUSTER_READY_TIMEOUT),
            "the test cluster did not reach cluster_state:ok within {CLUSTER_READY_TIMEOUT:?}"
        );
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` (three seeds).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(3)
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The port of the master that serves `key`'s slot now (asked of a live node).
    ///
    /// # Panics
    /// When no live node answers or none serves the slot.
    pub fn master_of(&self, key: &str) -> u16 {
        self.serving(key)
            .unwrap_or_else(|| panic!("no master serves the slot of {key}"))
    }

    /// SIGKILLs the master serving `key` and waits until its replica took over (a node is
    /// not seen as failed before `cluster-node-timeout`: until then every node still says
    /// `cluster_state:ok`) and the cluster is whole again. Answers the killed node's port.
    ///
    /// # Panics
    /// When no replica takes over within `limit`.
    pub fn fail_over(&mut self, key: &str, limit: Duration) -> u16 {
        let victim = self.master_of(key);
        self.kill(victim);
        let polls = limit.as_millis() / 100;
        for _ in 0..polls {
            std::thread::sleep(Duration::from_millis(100));
            if self.serving(key).is_some_and(|port| port != victim) && self.wait_ok(Duration::ZERO)
            {
                return victim;
            }
        }
        panic!("no replica took over from {victim}:\n{}", self.describe());
    }

    /// The master serving `key`'s slot, if one does (none while a failed master's replica is
    /// not promoted yet).
    fn serving(&self, key: &str) -> Option<u16> {
        let port = self.live_port();
        let slot: u16 = cli(port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT");
        for line in cli(port, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(f), Ok(t)) if (f..=t).contains(&slot))
            });
            if serves {
                let address = fields[1].split('@').next().unwrap_or_default();
                return address.rsplit(':').next().and_then(|p| p.parse().ok());
            }
        }
        None
    }

    /// Kills the node on `port` with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port {
                node.stop();
            }
        }
    }

    /// Starts the killed node on `port` again with its directory (its `nodes.conf`): it
    /// rejoins the cluster — as a replica when its replica took over meanwhile.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port {
                node.appendonly = false;
                if let Err(failure) = node.spawn() {
                    panic!("cluster node {port} did not restart: {failure}");
                }
            }
        }
    }

    /// Waits until every live node says `cluster_state:ok` and every live replica has synced.
    /// False after `limit`.
    pub fn wait_synced(&mut self, limit: Duration) -> bool {
        self.wait_all(limit, |node| node.cluster_ok() && node.replica_synced())
    }

    /// Waits until every live node says `cluster_state:ok` (after a failover: the replica of
    /// a killed master was promoted). False after `limit` (asked at least once).
    pub fn wait_ok(&mut self, limit: Duration) -> bool {
        self.wait_all(limit, RedisServer::cluster_ok)
    }

    fn wait_all(&mut self, limit: Duration, ok: impl Fn(&RedisServer) -> bool) -> bool {
        let polls = (limit.as_millis() / 100).max(1);
        for _ in 0..polls {
            let mut live = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.is_running().then_some(&*n));
            if live.all(&ok) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `CLUSTER NODES` and `CLUSTER INFO` as a live node sees them (for failure messages).
    pub fn describe(&self) -> String {
        let port = self.live_port();
        format!(
            "{}\n{}",
            cli(port, &["cluster", "nodes"]),
            cli(port, &["cluster", "info"])
        )
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|node| node.child.is_some() && ping(node.port))
            .map(RedisServer::port)
            .expect("a live cluster node")
    }

    /// One cluster for every test of this process that asks (forming one takes seconds; the
    /// tests keep apart by key prefix). Statics are never dropped, so a watcher (`sh`, started
    /// here) kills its nodes by pid and removes their directories once this process has
    /// exited.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    #[allow(
        clippy::zombie_processes,
        reason = "the watcher is meant to outlive this process, which never waits for it"
    )]
    pub fn shared() -> &'static RedisCluster {
        static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = Self::start();
            let pids: Vec<String> = cluster
                .nodes
                .iter()
                .filter_map(|node| node.child.as_ref().map(|c| c.id().to_string()))
                .collect();
            let dirs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|node| format!("'{}'", node.dir.display()))
                .collect();
            let script = format!(
                "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pids} 2>/dev/null; \
                 rm -rf {dirs}",
                me = std::process::id(),
                pids = pids.join(" "),
                dirs = dirs.join(" "),
            );
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh for the cluster's watcher");
            cluster
        })
    }
}

impl RedisServer {
    /// A cluster node that answers `CLUSTER INFO` with `cluster_state:ok`.
    fn cluster_ok(&self) -> bool {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["cluster", "info"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
    }
}

impl RedisServer {
    /// A master, or a replica whose link to its master is up (it synced once).
    fn replica_synced(&self) -> bool {
        let info = cli(self.port, &["info", "replication"]);
        info.contains("role:master") || info.contains("master_link_status:up")
    }
}

/// What `redis-cli -p PORT ARGS…` printed.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port the OS says is free on 127.0.0.1 right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A fresh directory for one server's files (log, AOF).
fn temp_dir(port: u16) -> PathBuf {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "actors-redis-{}-{port}-{nanos}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ))
}

/// True when a server on `port` answers `PING` with `+PONG` (not `-LOADING`).
fn ping(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG"))
}
