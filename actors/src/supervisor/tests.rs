//! Supervisor behaviour under paused tokio time: strategies, restart types, intensity
//! escalation, backoff, restart failures and ordered shutdown.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use super::*;
use crate::tree::{Status, Tree};

/// A child that records its starts and orderly stops, and misbehaves on request.
struct Probe;

#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct ProbeArgs {
    name: String,
    journal: Journal,
    /// Starts that fail before one succeeds.
    failing_starts: Arc<AtomicU32>,
}

enum ProbeMsg {
    Panic,
    Fail,
    Stop,
    Hang,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ProbeArgs;
    type Arguments = ProbeArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProbeMsg>,
        args: ProbeArgs,
    ) -> Result<ProbeArgs, ActorProcessingErr> {
        if args
            .failing_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            args.journal.push(format!("start-failed {}", args.name));
            return Err("cannot start".into());
        }
        args.journal.push(format!("start {}", args.name));
        Ok(args)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ProbeMsg>,
        state: &mut ProbeArgs,
    ) -> Result<(), ActorProcessingErr> {
        state.journal.push(format!("stop {}", state.name));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProbeMsg>,
        message: ProbeMsg,
        _state: &mut ProbeArgs,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProbeMsg::Panic => panic!("probe panicked"),
            ProbeMsg::Fail => Err("probe returned an error".into()),
            ProbeMsg::Stop => {
                myself.stop(Some("done".into()));
                Ok(())
            }
            ProbeMsg::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    }
}

struct Fixture {
    tree: Arc<Tree>,
    journal: Journal,
}

impl Fixture {
    fn new() -> Self {
        Self {
            tree: Tree::new(),
            journal: Journal::default(),
        }
    }

    fn probe(&self, name: &str, restart: Restart) -> ChildSpec {
        self.failing_probe(name, restart, 0)
    }

    fn failing_probe(&self, name: &str, restart: Restart, failing_starts: u32) -> ChildSpec {
        let journal = self.journal.clone();
        let failing = Arc::new(AtomicU32::new(failing_starts));
        let owned = name.to_string();
        ChildSpec::new(name, "probe", restart, move |_node| {
            (
                Probe,
                ProbeArgs {
                    name: owned.clone(),
                    journal: journal.clone(),
                    failing_starts: Arc::clone(&failing),
                },
            )
        })
    }

    fn cell(&self, path: &str) -> ActorCell {
        self.tree
            .cell(path)
            .unwrap_or_else(|| panic!("{path} is not running"))
    }

    fn id(&self, path: &str) -> ActorId {
        self.cell(path).get_id()
    }

    fn send(&self, path: &str, msg: ProbeMsg) {
        self.cell(path).send_message(msg).expect("probe alive");
    }

    fn status(&self, path: &str) -> Option<Status> {
        self.tree.get(path).map(|i| i.status)
    }

    fn restarts(&self, path: &str) -> u32 {
        self.tree.get(path).map(|i| i.restarts).unwrap_or(0)
    }

    /// Waits (in paused time, so instantly) until `cond` holds, up to `limit` of tokio time.
    async fn until(&self, limit: Duration, what: &str, cond: impl Fn(&Self) -> bool) {
        let end = Instant::now() + limit;
        while !cond(self) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                self.tree.render_text()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn no_jitter(base_ms: u64) -> Backoff {
    Backoff::try_new(Duration::from_millis(base_ms), Duration::from_secs(60), 0.0).unwrap()
}

fn spec(strategy: Strategy, children: Vec<ChildSpec>) -> SupervisorSpec {
    SupervisorSpec {
        strategy,
        intensity: Intensity::try_new(10, Duration::from_secs(10)).unwrap(),
        backoff: no_jitter(10),
        shutdown_timeout: Duration::from_secs(5),
        children,
    }
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_child_that_panicked() {
    let f = Fixture::new();
    let children = vec![
        f.probe("a", Restart::Permanent),
        f.probe("b", Restart::Permanent),
        f.probe("c", Restart::Permanent),
    ];
    let (root, _h) = start_root(&f.tree, "root", spec(Strategy::OneForOne, children))
        .await
        .unwrap();
    assert_eq!(f.journal.take(), ["start a", "start b", "start c"]);
    let (a, b, c) = (f.id("root/a"), f.id("root/b"), f.id("root/c"));

    f.send("root/b", ProbeMsg::Panic);
    f.until(WAIT, "b restarted", |f| {
        f.restarts("root/b") == 1 && f.status("root/b") == Some(Status::Running)
    })
    .await;

    assert_ne!(f.id("root/b"), b);
    assert_eq!(f.id("root/a"), a);
    assert_eq!(f.id("root/c"), c);
    assert_eq!(f.journal.take(), ["start b"]);
    let info = f.tree.get("root/b").unwrap();
    assert!(info.last_error.unwrap().contains("probe panicked"));
    assert!(f.tree.unhealthy().is_empty());
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn one_for_all_stops_siblings_in_reverse_and_restarts_all_in_order() {
    let f = Fixture::new();
    let children = vec![
        f.probe("a", Restart::Permanent),
        f.probe("b", Restart::Permanent),
        f.probe("c", Restart::Permanent),
    ];
    let (root, _h) = start_root(&f.tree, "root", spec(Strategy::OneForAll, children))
        .await
        .unwrap();
    f.journal.take();
    let (a, c) = (f.id("root/a"), f.id("root/c"));

    f.send("root/b", ProbeMsg::Fail);
    f.until(WAIT, "all restarted", |f| {
        ["root/a", "root/b", "root/c"]
            .iter()
            .all(|p| f.restarts(p) == 1 && f.status(p) == Some(Status::Running))
    })
    .await;

    assert_ne!(f.id("root/a"), a);
    assert_ne!(f.id("root/c"), c);
    assert_eq!(
        f.journal.take(),
        ["stop c", "stop a", "start a", "start b", "start c"]
    );
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let f = Fixture::new();
    let children = vec![
        f.probe("a", Restart::Permanent),
        f.probe("b", Restart::Permanent),
        f.probe("c", Restart::Permanent),
    ];
    let (root, _h) = start_root(&f.tree, "root", spec(Strategy::RestForOne, children))
        .await
        .unwrap();
    f.journal.take();
    let a = f.id("root/a");

    f.cell("root/b").kill();
    f.until(WAIT, "b and c restarted", |f| {
        f.restarts("root/b") == 1
            && f.restarts("root/c") == 1
            && f.status("root/c") == Some(Status::Running)
    })
    .await;

    assert_eq!(f.id("root/a"), a);
    assert_eq!(f.restarts("root/a"), 0);
    assert_eq!(f.journal.take(), ["stop c", "start b", "start c"]);
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn restart_types_decide_who_comes_back() {
    let f = Fixture::new();
    let children = vec![
        f.probe("perm", Restart::Permanent),
        f.probe("trans", Restart::Transient),
        f.probe("temp", Restart::Temporary),
    ];
    let (root, _h) = start_root(&f.tree, "root", spec(Strategy::OneForOne, children))
        .await
        .unwrap();

    // A permanent child comes back even after a normal stop.
    f.send("root/perm", ProbeMsg::Stop);
    f.until(WAIT, "perm restarted", |f| {
        f.restarts("root/perm") == 1 && f.status("root/perm") == Some(Status::Running)
    })
    .await;

    // A transient child comes back after an error and after a kill ...
    f.send("root/trans", ProbeMsg::Fail);
    f.until(WAIT, "trans restarted after error", |f| {
        f.restarts("root/trans") == 1 && f.status("root/trans") == Some(Status::Running)
    })
    .await;
    f.cell("root/trans").kill();
    f.until(WAIT, "trans restarted after kill", |f| {
        f.restarts("root/trans") == 2 && f.status("root/trans") == Some(Status::Running)
    })
    .await;
    // ... but not after a normal stop.
    f.send("root/trans", ProbeMsg::Stop);
    f.until(WAIT, "trans stopped", |f| {
        f.status("root/trans") == Some(Status::Stopped)
    })
    .await;

    // A temporary child never comes back, even after a panic, and leaves the tree.
    f.send("root/temp", ProbeMsg::Panic);
    f.until(WAIT, "temp gone", |f| f.tree.get("root/temp").is_none())
        .await;

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(f.status("root/trans"), Some(Status::Stopped));
    assert_eq!(f.restarts("root/trans"), 2);
    assert!(f.tree.get("root/temp").is_none());
    assert!(f.tree.unhealthy().is_empty(), "{:?}", f.tree.unhealthy());
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn restarts_back_off_exponentially() {
    let f = Fixture::new();
    let mut s = spec(Strategy::OneForOne, vec![f.probe("a", Restart::Permanent)]);
    s.backoff = no_jitter(1000);
    let (root, _h) = start_root(&f.tree, "root", s).await.unwrap();

    for (n, expected) in [(1, 1000), (2, 2000), (3, 4000)] {
        let killed_at = Instant::now();
        f.cell("root/a").kill();
        f.until(WAIT, "restart", |f| f.restarts("root/a") == n)
            .await;
        let waited = killed_at.elapsed();
        assert!(
            waited >= Duration::from_millis(expected)
                && waited < Duration::from_millis(expected + 50),
            "restart {n} after {waited:?}, expected {expected} ms"
        );
    }
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn a_child_that_cannot_restart_is_retried_after_backoff() {
    let f = Fixture::new();
    // Starts once, then fails its next two starts.
    let failing = Arc::new(AtomicU32::new(0));
    let journal = f.journal.clone();
    let counter = Arc::clone(&failing);
    let child = ChildSpec::new("flaky", "probe", Restart::Permanent, move |_| {
        (
            Probe,
            ProbeArgs {
                name: "flaky".into(),
                journal: journal.clone(),
                failing_starts: Arc::clone(&counter),
            },
        )
    });
    let (root, _h) = start_root(&f.tree, "root", spec(Strategy::OneForOne, vec![child]))
        .await
        .unwrap();
    failing.store(2, Ordering::SeqCst);
    f.send("root/flaky", ProbeMsg::Fail);
    f.until(WAIT, "flaky running again", |f| {
        f.status("root/flaky") == Some(Status::Running) && f.restarts("root/flaky") == 1
    })
    .await;
    assert_eq!(
        f.journal.take(),
        [
            "start flaky",
            "start-failed flaky",
            "start-failed flaky",
            "start flaky"
        ]
    );
    assert_eq!(f.status("root"), Some(Status::Running));
    root.stop(None);
}

#[tokio::test(start_paused = true)]
async fn intensity_exceeded_escalates_to_the_parent_which_restarts_the_subtree() {
    let f = Fixture::new();
    let (sink, mut events) = crate::broker::EventSink::channel(64);
    f.tree.attach_events(sink);
    let mut inner = spec(
        Strategy::OneForOne,
        vec![f.probe("worker", Restart::Permanent)],
    );
    inner.intensity = Intensity::try_new(2, Duration::from_secs(10)).unwrap();
    let outer = spec(
        Strategy::OneForOne,
        vec![
            ChildSpec::supervisor("inner", inner),
            f.probe("bystander", Restart::Permanent),
        ],
    );
    let (root, _h) = start_root(&f.tree, "root", outer).await.unwrap();
    let bystander = f.id("root/bystander");

    for n in 1..=2 {
        f.cell("root/inner/worker").kill();
        f.until(WAIT, "worker restarted", |f| {
            f.restarts("root/inner/worker") == n
                && f.status("root/inner/worker") == Some(Status::Running)
        })
        .await;
    }
    // The third kill within 10 s is one too many: inner gives up, root restarts it.
    f.cell("root/inner/worker").kill();
    f.until(WAIT, "inner restarted by root", |f| {
        f.restarts("root/inner") == 1 && f.status("root/inner/worker") == Some(Status::Running)
    })
    .await;
    let inner_info = f.tree.get("root/inner").unwrap();
    assert!(
        inner_info
            .last_error
            .as_deref()
            .unwrap()
            .contains("gave up after more than 2 restarts"),
        "{inner_info:?}"
    );
    // A fresh incarnation: the worker's restart count starts again.
    assert_eq!(f.restarts("root/inner/worker"), 0);
    assert_eq!(f.id("root/bystander"), bystander);
    root.stop(None);

    // Every step is on the events stream, in order.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        let path = event.detail["path"].as_str().unwrap_or("").to_string();
        seen.push(format!("{} {path}", event.kind));
    }
    assert_eq!(
        seen[..8],
        [
            "actor_exited root/inner/worker",
            "actor_restarted root/inner/worker",
            "actor_exited root/inner/worker",
            "actor_restarted root/inner/worker",
            "actor_exited root/inner/worker",
            "actor_gave_up root/inner",
            "actor_exited root/inner",
            "actor_restarted root/inner",
        ],
        "{seen:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_root_that_gives_up_ends_and_says_why() {
    let f = Fixture::new();
    let mut s = spec(Strategy::OneForOne, vec![f.probe("a", Restart::Permanent)]);
    s.intensity = Intensity::try_new(0, Duration::from_secs(10)).unwrap();
    let (_root, handle) = start_root(&f.tree, "root", s).await.unwrap();

    f.send("root/a", ProbeMsg::Panic);
    tokio::time::timeout(WAIT, handle).await.unwrap().unwrap();
    let root = f.tree.get("root").unwrap();
    assert_eq!(root.status, Status::Failed);
    let why = root.last_error.unwrap();
    assert!(
        why.contains("root gave up after more than 0 restarts"),
        "{why}"
    );
    assert!(why.contains("root/a failed: "), "{why}");
    assert!(!f.tree.unhealthy().is_empty());
}

#[tokio::test(start_paused = true)]
async fn orderly_stop_is_reverse_order_and_kills_what_does_not_stop_in_time() {
    let f = Fixture::new();
    let children = vec![
        f.probe("a", Restart::Permanent),
        f.probe("b", Restart::Permanent),
        f.probe("c", Restart::Permanent),
    ];
    let mut s = spec(Strategy::OneForOne, children);
    s.shutdown_timeout = Duration::from_secs(2);
    let (root, handle) = start_root(&f.tree, "root", s).await.unwrap();
    f.journal.take();
    f.send("root/a", ProbeMsg::Hang);
    tokio::time::sleep(Duration::from_millis(1)).await;

    let started = Instant::now();
    root.stop(Some("shutdown".into()));
    tokio::time::timeout(WAIT, handle).await.unwrap().unwrap();

    // c and b stopped in reverse order; a was busy past the deadline: killed (no post_stop).
    assert_eq!(f.journal.take(), ["stop c", "stop b"]);
    assert!(started.elapsed() >= Duration::from_secs(2));
    let a = f.tree.get("root/a").unwrap();
    assert_eq!(a.status, Status::Stopped);
    assert!(a.last_error.unwrap().contains("did not stop within"));
    assert_eq!(f.status("root/b"), Some(Status::Stopped));
}

#[tokio::test(start_paused = true)]
async fn a_child_that_cannot_start_fails_the_supervisor_start() {
    let f = Fixture::new();
    let children = vec![
        f.probe("a", Restart::Permanent),
        f.failing_probe("b", Restart::Permanent, 1),
        f.probe("c", Restart::Permanent),
    ];
    let err = start_root(&f.tree, "root", spec(Strategy::OneForOne, children))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("root/b failed to start"), "{err}");
    assert_eq!(f.journal.take(), ["start a", "start-failed b", "stop a"]);
    assert_eq!(f.status("root"), Some(Status::Failed));
}
