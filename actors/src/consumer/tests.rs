//! Consumers and task actors over the memory broker, in real time (delays are wall-clock):
//! bulkheads, limits, retries, callbacks, crashes, deferral.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Admin, AnyBroker, BrokerSettings, Envelope, Event, Leases, TaskState};
use crate::broker_actor::{BrokerActor, BrokerArgs};
use crate::gate::{Admission, AlwaysOpen, Use};
use crate::handler::native::Natives;
use crate::handler::{Handler, RetryPolicy, TaskDef, TaskDefs};
use crate::metrics::Metrics;
use crate::supervisor::{
    Backoff, ChildSpec, Intensity, Restart, Strategy, SupervisorSpec, start_root,
};
use crate::tree::Tree;

struct Queue {
    name: &'static str,
    concurrency: usize,
}

struct Rig {
    tree: Arc<Tree>,
    broker: Arc<AnyBroker>,
    /// Each queue's outcome counters (what the node's history samples).
    outcomes: std::collections::HashMap<String, Arc<Outcomes>>,
    leases: Arc<Leases>,
    root: ActorRef<crate::supervisor::SupervisorMessage>,
}

fn def(name: &str, queue: &str, handler: Arc<dyn Handler>) -> TaskDef {
    TaskDef {
        name: name.into(),
        queue: queue.into(),
        handler,
        time_limit: Duration::from_secs(30),
        soft_time_limit: None,
        retry: RetryPolicy {
            max_retries: 0,
            backoff: Backoff::try_new(Duration::from_millis(100), Duration::from_secs(10), 0.0)
                .unwrap(),
            retry_on_timeout: true,
        },
        uses: vec![],
        link: vec![],
        link_error: vec![],
        store_result: true,
    }
}

impl Rig {
    async fn start(queues: &[Queue], defs: Vec<TaskDef>, gate: Arc<dyn ResourceGate>) -> Rig {
        Self::start_prefetching(queues, defs, gate, 0).await
    }

    /// [`Rig::start`] with every queue's `prefetch`: deliveries wait in the consumer.
    async fn start_prefetching(
        queues: &[Queue],
        defs: Vec<TaskDef>,
        gate: Arc<dyn ResourceGate>,
        prefetch: usize,
    ) -> Rig {
        Self::start_full(queues, defs, gate, prefetch, None).await
    }

    /// [`Rig::start_prefetching`] with an [`Origin`] hooked into settling.
    async fn start_full(
        queues: &[Queue],
        defs: Vec<TaskDef>,
        gate: Arc<dyn ResourceGate>,
        prefetch: usize,
        origin: Option<Arc<dyn crate::task::Origin>>,
    ) -> Rig {
        // Metrics on, so every recording path runs under these tests too.
        let metrics = Arc::new(Metrics::new(
            defs.iter().map(|d| (d.name.as_str(), d.queue.as_str())),
            queues.iter().map(|q| q.name),
        ));
        let tree = Tree::with_metrics(Arc::clone(&metrics));
        let broker = Arc::new(AnyBroker::Memory(MemoryBroker::new(
            BrokerSettings::default(),
        )));
        let leases: Arc<Leases> = Arc::default();
        let work = Arc::new(Work {
            broker: Arc::clone(&broker),
            leases: Arc::clone(&leases),
            tasks: Arc::new(TaskDefs::new(defs)),
            consumer: "node-test".into(),
            origin,
            metrics: Arc::clone(&metrics),
            terminate_grace: Duration::from_millis(300),
        });
        let policy = |children| SupervisorSpec {
            strategy: Strategy::OneForOne,
            intensity: Intensity::try_new(20, Duration::from_secs(10)).unwrap(),
            backoff: Backoff::try_new(Duration::from_millis(5), Duration::from_millis(50), 0.0)
                .unwrap(),
            shutdown_timeout: Duration::from_secs(5),
            children,
        };
        let outcomes: std::collections::HashMap<String, Arc<Outcomes>> = queues
            .iter()
            .map(|q| (q.name.to_string(), Arc::default()))
            .collect();
        let consumers = queues
            .iter()
            .map(|q| {
                let (name, concurrency) = (q.name.to_string(), q.concurrency);
                let work = Arc::clone(&work);
                let gate = Arc::clone(&gate);
                let outcomes = Arc::clone(&outcomes[q.name]);
                ChildSpec::new(q.name, "consumer", Restart::Permanent, move |node| {
                    let args = ConsumerArgs {
                        node,
                        queue: name.clone(),
                        settings: QueueSettings {
                            concurrency: NonZeroUsize::new(concurrency).expect("concurrency ≥ 1"),
                            prefetch,
                            poll: Duration::from_millis(200),
                        },
                        drain: Duration::from_secs(2),
                        work: Arc::clone(&work),
                        gate: Arc::clone(&gate),
                        outcomes: Arc::clone(&outcomes),
                    };
                    (ConsumerActor, args)
                })
            })
            .collect();
        let broker_child = {
            let metrics = Arc::clone(&metrics);
            let broker = Arc::clone(&broker);
            let leases = Arc::clone(&leases);
            let queues: Vec<String> = queues.iter().map(|q| q.name.to_string()).collect();
            ChildSpec::new("broker", "broker", Restart::Permanent, move |node| {
                let args = BrokerArgs {
                    node,
                    broker: Arc::clone(&broker),
                    leases: Arc::clone(&leases),
                    queues: queues.clone(),
                    lease: Duration::from_secs(3),
                    promote_every: Duration::from_millis(5),
                    metrics: Arc::clone(&metrics),
                    presence: None,
                };
                (BrokerActor, args)
            })
        };
        let spec = policy(vec![
            broker_child,
            ChildSpec::supervisor("queues", policy(consumers)),
        ]);
        let (root, _) = start_root(&tree, "root", spec).await.unwrap();
        Rig {
            tree,
            outcomes,
            broker,
            leases,
            root,
        }
    }

    async fn enqueue(&self, task: &str, queue: &str, kwargs: Value) -> String {
        let mut env = Envelope::new(task, queue);
        env.kwargs = kwargs.as_object().cloned().unwrap_or_default();
        self.broker.enqueue(vec![env]).await.unwrap()[0].id.clone()
    }

    async fn state_of(&self, id: &str) -> Option<TaskState> {
        self.broker.record(id).await.unwrap().map(|r| r.state)
    }

    async fn until_state(
        &self,
        id: &str,
        state: TaskState,
        limit: Duration,
    ) -> crate::broker::TaskRecord {
        let end = Instant::now() + limit;
        loop {
            if let Some(record) = self.broker.record(id).await.unwrap() {
                if record.state == state {
                    return record;
                }
            }
            assert!(
                Instant::now() < end,
                "task {id} never reached {state:?}; now {:?}",
                self.state_of(id).await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn events_of(&self, id: &str) -> Vec<Event> {
        let all = self.broker.events(None, 100_000).await.unwrap();
        all.into_iter()
            .filter(|e| e.task_id.as_deref() == Some(id))
            .collect()
    }
}

fn natives() -> Natives {
    Natives::builtin()
}

fn native(name: &str) -> Arc<dyn Handler> {
    natives().handler(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_tasks_within_the_bulkhead_concurrency() {
    let live = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut n = Natives::default();
    {
        let (live, peak) = (Arc::clone(&live), Arc::clone(&peak));
        n.register("count", move |_| {
            let (live, peak) = (Arc::clone(&live), Arc::clone(&peak));
            async move {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                live.fetch_sub(1, Ordering::SeqCst);
                Ok(json!("ok"))
            }
        });
    }
    let rig = Rig::start(
        &[Queue {
            name: "background",
            concurrency: 3,
        }],
        vec![def("count", "background", n.handler("count").unwrap())],
        Arc::new(AlwaysOpen),
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(rig.enqueue("count", "background", json!({})).await);
    }
    for id in &ids {
        let record = rig
            .until_state(id, TaskState::Succeeded, Duration::from_secs(10))
            .await;
        assert_eq!(record.result, Some(json!("ok")));
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "concurrency is the bulkhead's size"
    );
    // The queue's totals (the node's history) saw every first wait and every run.
    let totals = rig.outcomes["background"].totals();
    assert_eq!(
        (totals.succeeded, totals.waits.count, totals.runs.count),
        (20, 20, 20)
    );
    assert!(totals.runs.sum_us >= 20 * 20_000, "{totals:?}");
    assert!(
        totals.waits.sum_us > totals.runs.sum_us / 3,
        "17 of 20 tasks waited for a slot: {totals:?}"
    );
    let kinds: Vec<String> = rig
        .events_of(&ids[0])
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect();
    assert_eq!(kinds, ["sent", "started", "succeeded"]);
    assert_eq!(rig.leases.count(), 0);
    let snapshot = rig.tree.get("root/queues/background").unwrap().snapshot;
    assert_eq!(snapshot["concurrency"], 3);
    rig.root.stop(None);
}

/// `store_result = false` (Celery's `ignore_result`): a success leaves no record, but its
/// `link` callbacks get the result and its events are written; a failure is recorded as
/// usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_without_stored_results_leave_no_record_on_success() {
    let mut quiet = def("rt_noop", "background", native("rt_noop"));
    quiet.store_result = false;
    quiet.link = vec!["rt_echo".into()];
    let mut failing = def("rt_fail", "background", native("rt_fail"));
    failing.store_result = false;
    let rig = Rig::start(
        &[Queue {
            name: "background",
            concurrency: 2,
        }],
        vec![
            quiet,
            failing,
            def("rt_echo", "background", native("rt_echo")),
        ],
        Arc::new(AlwaysOpen),
    )
    .await;
    let id = rig.enqueue("rt_noop", "background", json!({})).await;
    let failed = rig
        .enqueue("rt_fail", "background", json!({ "permanent": true }))
        .await;
    let dead = rig
        .until_state(&failed, TaskState::Dead, Duration::from_secs(10))
        .await;
    assert!(dead.error.is_some(), "a failure is recorded");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let kinds: Vec<String> = rig
            .events_of(&id)
            .await
            .into_iter()
            .map(|e| e.kind.to_string())
            .collect();
        if kinds == ["sent", "started", "succeeded"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{kinds:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rig.broker.record(&id).await.unwrap().is_none(), "no record");
    // Its callback ran (with the result as its first argument) and kept its own record.
    let events = rig.broker.events(None, 1000).await.unwrap();
    let callback = events
        .iter()
        .find(|e| e.kind.as_str() == "sent" && e.task.as_deref() == Some("rt_echo"))
        .and_then(|e| e.task_id.clone())
        .expect("the link callback was enqueued");
    rig.until_state(&callback, TaskState::Succeeded, Duration::from_secs(10))
        .await;
    rig.root.stop(None);
}

/// Holds the recording of `rt_noop`'s outcome until `rt_echo` has started: possible only if
/// the consumer starts the next task while an outcome is being recorded.
#[derive(Debug)]
struct HoldsRecording {
    echo_started: Arc<tokio::sync::Notify>,
    waited: Arc<AtomicUsize>,
}

impl crate::task::Origin for HoldsRecording {
    fn owns(&self, envelope: &Envelope) -> bool {
        envelope.task == "rt_noop"
    }

    fn decode(&self, _: &Envelope) -> Result<Option<Envelope>, String> {
        Ok(None)
    }

    fn started(&self, _: &Envelope) -> Option<crate::task::settle::BoxFuture<'static, ()>> {
        None
    }

    fn settled<'a>(
        &'a self,
        _: &'a AnyBroker,
        _: &'a Envelope,
        _: crate::task::Settled<'a>,
    ) -> crate::task::settle::BoxFuture<'a, Result<(), crate::broker::BrokerError>> {
        Box::pin(async move {
            let started = self.echo_started.notified();
            if tokio::time::timeout(Duration::from_secs(10), started)
                .await
                .is_ok()
            {
                self.waited.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    }
}

/// `concurrency` bounds running attempts, not attempts whose outcome is being recorded: with
/// concurrency 1 and a prefetched second task, the second starts while the first one's outcome
/// is still being written (its recording here waits for that start), and both end recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_task_starts_while_an_outcome_is_recorded() {
    let echo_started = Arc::new(tokio::sync::Notify::new());
    let waited = Arc::new(AtomicUsize::new(0));
    let mut n = Natives::default();
    n.register("rt_noop", |_| async { Ok(Value::Null) });
    {
        let echo_started = Arc::clone(&echo_started);
        n.register("rt_echo", move |_| {
            let echo_started = Arc::clone(&echo_started);
            async move {
                echo_started.notify_one();
                Ok(json!("echoed"))
            }
        });
    }
    let origin = HoldsRecording {
        echo_started,
        waited: Arc::clone(&waited),
    };
    let rig = Rig::start_full(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![
            def("rt_noop", "default", n.handler("rt_noop").unwrap()),
            def("rt_echo", "default", n.handler("rt_echo").unwrap()),
        ],
        Arc::new(AlwaysOpen),
        1,
        Some(Arc::new(origin)),
    )
    .await;
    let first = rig.enqueue("rt_noop", "default", json!({})).await;
    let second = rig.enqueue("rt_echo", "default", json!({})).await;
    rig.until_state(&first, TaskState::Succeeded, Duration::from_secs(20))
        .await;
    rig.until_state(&second, TaskState::Succeeded, Duration::from_secs(20))
        .await;
    assert_eq!(
        waited.load(Ordering::SeqCst),
        1,
        "the second task started while the first one's outcome was being recorded"
    );
    rig.root.stop(None);
}

/// The seed incident: long chat tasks must not delay background tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_queue_does_not_delay_another() {
    async fn background_p50(with_chat: bool) -> Duration {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let mut n = Natives::builtin();
        {
            let waits = Arc::clone(&waits);
            n.register("quick", move |ctx| {
                let waits = Arc::clone(&waits);
                async move {
                    let enqueued = crate::broker::parse_time(&ctx.envelope.enqueued_at).unwrap();
                    let wait = SystemTime::now()
                        .duration_since(enqueued)
                        .unwrap_or_default();
                    waits.lock().unwrap().push(wait);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Value::Null)
                }
            });
        }
        let rig = Rig::start(
            &[
                Queue {
                    name: "chat",
                    concurrency: 4,
                },
                Queue {
                    name: "background",
                    concurrency: 4,
                },
            ],
            vec![
                def(
                    "process_chat_message",
                    "chat",
                    n.handler("rt_sleep").unwrap(),
                ),
                def("quick", "background", n.handler("quick").unwrap()),
            ],
            Arc::new(AlwaysOpen),
        )
        .await;
        if with_chat {
            for _ in 0..8 {
                rig.enqueue("process_chat_message", "chat", json!({"ms": 1500}))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(rig.enqueue("quick", "background", json!({})).await);
        }
        for id in &ids {
            rig.until_state(id, TaskState::Succeeded, Duration::from_secs(10))
                .await;
        }
        rig.root.stop(None);
        let mut waits = waits.lock().unwrap().clone();
        waits.sort();
        waits[waits.len() / 2]
    }
    let idle = background_p50(false).await;
    let busy = background_p50(true).await;
    assert!(
        busy <= idle.mul_f64(1.2) + Duration::from_millis(25),
        "background p50 wait {busy:?} with chat saturated vs {idle:?} with chat idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ignoring_its_soft_limit_is_stopped_at_the_hard_limit() {
    let mut stubborn = def("stubborn", "default", native("rt_sleep"));
    stubborn.time_limit = Duration::from_millis(300);
    stubborn.soft_time_limit = Some(Duration::from_millis(100));
    let mut polite = stubborn.clone();
    polite.name = "polite".into();
    // Timeouts of this one are not retried, whatever max_retries says.
    stubborn.retry.max_retries = 3;
    stubborn.retry.retry_on_timeout = false;
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 2,
        }],
        vec![stubborn, polite],
        Arc::new(AlwaysOpen),
    )
    .await;
    let started = Instant::now();
    let a = rig
        .enqueue(
            "stubborn",
            "default",
            json!({"ms": 10_000, "ignore_soft": true}),
        )
        .await;
    let b = rig
        .enqueue("polite", "default", json!({"ms": 10_000}))
        .await;
    let dead = rig
        .until_state(&a, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(
        dead.error.as_deref(),
        Some("not retried (retry_on_timeout = false): hard time limit of 300ms exceeded")
    );
    assert_eq!(dead.attempts, 1);
    let dead = rig
        .until_state(&b, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(
        dead.error.as_deref(),
        Some("retries exhausted after 1 attempts: cancelled: soft time limit")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy_then_dead_letter_with_link_error_once() {
    let mut flaky = def("zep_write", "default", native("rt_fail"));
    flaky.retry.max_retries = 2;
    flaky.link_error = vec!["notify_failure".into()];
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 2,
        }],
        vec![flaky, def("notify_failure", "default", native("rt_echo"))],
        Arc::new(AlwaysOpen),
    )
    .await;
    let id = rig
        .enqueue(
            "zep_write",
            "default",
            json!({"message": "zep_call_error: 503"}),
        )
        .await;
    let dead = rig
        .until_state(&id, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(dead.attempts, 3);
    assert_eq!(
        dead.error.as_deref(),
        Some("retries exhausted after 3 attempts: zep_call_error: 503")
    );
    let events = rig.events_of(&id).await;
    let starts: Vec<SystemTime> = events
        .iter()
        .filter(|e| e.kind == "started")
        .map(|e| crate::broker::parse_time(&e.at).unwrap())
        .collect();
    assert_eq!(starts.len(), 3);
    // backoff 100 ms doubling, no jitter: ~100 ms then ~200 ms between attempts.
    for (gap, expected) in starts.windows(2).zip([100u64, 200]) {
        let gap = gap[1].duration_since(gap[0]).unwrap();
        assert!(
            gap >= Duration::from_millis(expected) && gap < Duration::from_millis(expected + 80),
            "gap {gap:?}, expected ~{expected} ms"
        );
    }
    // Exactly one link_error callback, with the failure as its first argument.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = rig.broker.events(None, 100_000).await.unwrap();
    let callbacks: Vec<&Event> = all
        .iter()
        .filter(|e| e.kind == "succeeded" && e.task.as_deref() == Some("notify_failure"))
        .collect();
    assert_eq!(callbacks.len(), 1);
    let cb = rig
        .broker
        .record(callbacks[0].task_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cb.result.unwrap()["args"][0]["id"], json!(id));
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_wins_permanent_errors_are_not_retried_and_link_runs_once() {
    let mut limited = def("openai_call", "default", native("rt_fail"));
    limited.retry.max_retries = 1;
    limited.retry.backoff =
        Backoff::try_new(Duration::from_millis(10), Duration::from_secs(1), 0.0).unwrap();
    let mut chained = def("extract_preferences_async", "default", native("rt_echo"));
    chained.link = vec!["store_preferences".into()];
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 4,
        }],
        vec![
            limited,
            chained,
            def("store_preferences", "default", native("rt_echo")),
        ],
        Arc::new(AlwaysOpen),
    )
    .await;
    let slow = rig
        .enqueue("openai_call", "default", json!({"retry_after_ms": 400}))
        .await;
    let denied = rig
        .enqueue(
            "openai_call",
            "default",
            json!({"permanent": true, "message": "insufficient_quota"}),
        )
        .await;
    let ok = rig
        .enqueue("extract_preferences_async", "default", json!({"user": 7}))
        .await;

    let dead = rig
        .until_state(&denied, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(dead.attempts, 1);
    assert_eq!(dead.error.as_deref(), Some("permanent: insufficient_quota"));

    rig.until_state(&slow, TaskState::Dead, Duration::from_secs(5))
        .await;
    let starts: Vec<SystemTime> = rig
        .events_of(&slow)
        .await
        .iter()
        .filter(|e| e.kind == "started")
        .map(|e| crate::broker::parse_time(&e.at).unwrap())
        .collect();
    let gap = starts[1].duration_since(starts[0]).unwrap();
    assert!(
        gap >= Duration::from_millis(400),
        "Retry-After not honoured: {gap:?}"
    );

    rig.until_state(&ok, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = rig.broker.events(None, 100_000).await.unwrap();
    let linked: Vec<&Event> = all
        .iter()
        .filter(|e| e.kind == "succeeded" && e.task.as_deref() == Some("store_preferences"))
        .collect();
    assert_eq!(linked.len(), 1);
    let record = rig
        .broker
        .record(linked[0].task_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.result.unwrap()["args"][0]["kwargs"]["user"], 7);
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_expired_tasks_are_dead_lettered_without_running() {
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![def("rt_noop", "default", native("rt_noop"))],
        Arc::new(AlwaysOpen),
    )
    .await;
    let ghost = rig.enqueue("no_such_task", "default", json!({})).await;
    let mut old = Envelope::new("rt_noop", "default");
    old.expires = Some(crate::broker::Timestamp::at(
        SystemTime::now() - Duration::from_secs(1),
    ));
    let old = rig.broker.enqueue(vec![old]).await.unwrap()[0].id.clone();
    assert_eq!(
        rig.until_state(&ghost, TaskState::Dead, Duration::from_secs(5))
            .await
            .error
            .as_deref(),
        Some("no such task `no_such_task`")
    );
    let expired = rig
        .until_state(&old, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert!(expired.error.unwrap().starts_with("expired at "));
    let fine = rig.enqueue("rt_noop", "default", json!({})).await;
    rig.until_state(&fine, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_over_max_entry_bytes_is_dead_lettered_without_running() {
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![def("rt_noop", "default", native("rt_noop"))],
        Arc::new(AlwaysOpen),
    )
    .await;
    let limit = rig.broker.settings().max_entry_bytes;
    // As another producer would write it: `enqueue` refuses it.
    let raw = json!({ "id": "big-1", "task": "rt_noop", "queue": "default",
        "args": ["z".repeat(limit)] })
    .to_string();
    let AnyBroker::Memory(memory) = &*rig.broker else {
        unreachable!("the rig runs on memory://")
    };
    memory.push_raw("default", &raw);
    let fine = rig.enqueue("rt_noop", "default", json!({})).await;
    let record = rig
        .until_state("big-1", TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(
        record.error.unwrap(),
        format!(
            "entry too large: {} bytes, over the broker's max_entry_bytes of {limit}",
            raw.len()
        )
    );
    let kinds: Vec<String> = rig
        .events_of("big-1")
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect();
    assert!(!kinds.iter().any(|k| k == "started"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "dead"), "{kinds:?}");
    rig.until_state(&fine, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    let dead = rig.broker.dead_letters("default", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, "big-1");
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_over_max_entry_bytes_is_left_out_and_the_others_run() {
    // A result of 60 % of the limit: it fits into one callback, not beside a second
    // callback's own kwargs of the same size.
    let limit = crate::broker::DEFAULT_MAX_ENTRY_BYTES;
    let part = "p".repeat(limit * 6 / 10);
    let mut natives = natives();
    let result = part.clone();
    natives.register("rt_big", move |_| {
        let result = result.clone();
        async move { Ok(json!(result)) }
    });
    let mut chained = def(
        "extract_preferences_async",
        "default",
        natives.handler("rt_big").unwrap(),
    );
    chained.link = vec!["store_preferences".into()];
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 2,
        }],
        vec![
            chained,
            def("store_preferences", "default", native("rt_echo")),
            def("store_everything", "default", native("rt_echo")),
        ],
        Arc::new(AlwaysOpen),
    )
    .await;
    assert_eq!(rig.broker.settings().max_entry_bytes, limit);
    let mut parent = Envelope::new("extract_preferences_async", "default");
    parent.link = vec![crate::broker::Callback {
        task: "store_everything".into(),
        queue: None,
        args: vec![],
        kwargs: [("more".to_string(), json!(part))].into_iter().collect(),
    }];
    let id = rig.broker.enqueue(vec![parent]).await.unwrap()[0]
        .id
        .clone();
    rig.until_state(&id, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let all = rig.broker.events(None, 100_000).await.unwrap();
        let done = |task: &str| {
            all.iter()
                .filter(|e| e.kind == "succeeded" && e.task.as_deref() == Some(task))
                .count()
        };
        if done("store_preferences") == 1 {
            assert_eq!(done("extract_preferences_async"), 1, "the parent ran once");
            let sent_big = all
                .iter()
                .any(|e| e.task.as_deref() == Some("store_everything"));
            assert!(!sent_big, "the oversized callback was enqueued");
            break;
        }
        assert!(Instant::now() < end, "store_preferences never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_the_consumer_keeps_running() {
    let mut n = Natives::default();
    n.register("fragile", |ctx| async move {
        if ctx.envelope.attempt == 0 {
            panic!("index out of range in the handler");
        }
        Ok(json!("second time lucky"))
    });
    let mut fragile = def("fragile", "default", n.handler("fragile").unwrap());
    fragile.retry.max_retries = 1;
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![fragile],
        Arc::new(AlwaysOpen),
    )
    .await;
    let consumer = rig.tree.get("root/queues/default").unwrap();
    let id = rig.enqueue("fragile", "default", json!({})).await;
    let record = rig
        .until_state(&id, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    assert_eq!(record.attempts, 2);
    let retried = rig
        .events_of(&id)
        .await
        .into_iter()
        .find(|e| e.kind == "retried")
        .unwrap();
    assert!(
        retried.detail["error"]
            .as_str()
            .unwrap()
            .contains("panicked"),
        "{retried:?}"
    );
    let after = rig.tree.get("root/queues/default").unwrap();
    assert_eq!(
        after.restarts, consumer.restarts,
        "the consumer did not restart"
    );
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_is_restarted_and_reruns_what_it_held() {
    let rig = Rig::start(
        &[Queue {
            name: "chat",
            concurrency: 2,
        }],
        vec![def("process_chat_message", "chat", native("rt_sleep"))],
        Arc::new(AlwaysOpen),
    )
    .await;
    let a = rig
        .enqueue("process_chat_message", "chat", json!({"ms": 400}))
        .await;
    let b = rig
        .enqueue("process_chat_message", "chat", json!({"ms": 400}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.leases.count(), 2);
    rig.tree.cell("root/queues/chat").unwrap().kill();
    for id in [&a, &b] {
        let record = rig
            .until_state(id, TaskState::Succeeded, Duration::from_secs(5))
            .await;
        assert_eq!(
            record.attempts, 1,
            "re-run by the restarted consumer, same attempt"
        );
    }
    assert_eq!(rig.tree.get("root/queues/chat").unwrap().restarts, 1);
    assert_eq!(rig.broker.depth("chat").await.unwrap().in_flight, 0);
    rig.root.stop(None);
}

#[derive(Debug)]
struct ClosedFor {
    until: SystemTime,
    asked: Mutex<HashMap<String, usize>>,
}

/// `openai` is unusable, every other resource closed until `until`; weighed by the first
/// declared use's need, as the node's gate does.
impl ResourceGate for ClosedFor {
    fn admit(&self, uses: &[Use]) -> Admission {
        let Some(declared) = uses.first() else {
            return Admission::Open;
        };
        let resource = declared.resource.clone();
        *self
            .asked
            .lock()
            .unwrap()
            .entry(resource.clone())
            .or_default() += 1;
        let state = if resource == "openai" {
            Admission::Unusable {
                resource,
                reason: "OPENAI_API_KEY is not set".into(),
            }
        } else if SystemTime::now() < self.until {
            Admission::ClosedUntil {
                resource,
                until: self.until,
            }
        } else {
            Admission::Open
        };
        state.for_need(declared.need)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_defers_without_spending_an_attempt() {
    let gate = Arc::new(ClosedFor {
        until: SystemTime::now() + Duration::from_millis(300),
        asked: Mutex::default(),
    });
    let mut chat = def("process_chat_message", "chat", native("rt_echo"));
    chat.uses = vec![Use::required("zep")];
    let rig = Rig::start(
        &[Queue {
            name: "chat",
            concurrency: 2,
        }],
        vec![chat, def("rt_noop", "chat", native("rt_noop"))],
        gate.clone(),
    )
    .await;
    let started = SystemTime::now();
    let id = rig.enqueue("process_chat_message", "chat", json!({})).await;
    let free = rig.enqueue("rt_noop", "chat", json!({})).await;
    rig.until_state(&free, TaskState::Succeeded, Duration::from_secs(2))
        .await;
    let record = rig
        .until_state(&id, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    assert_eq!(record.attempts, 1, "the deferral spent no attempt");
    assert!(SystemTime::now().duration_since(started).unwrap() >= Duration::from_millis(300));
    let kinds: Vec<String> = rig
        .events_of(&id)
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect();
    assert_eq!(kinds, ["sent", "deferred", "started", "succeeded"]);
    assert_eq!(gate.asked.lock().unwrap()["zep"], 2);
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_degrades_a_closed_resource_runs_at_once_while_one_that_uses_it_waits() {
    let gate = Arc::new(ClosedFor {
        until: SystemTime::now() + Duration::from_secs(30),
        asked: Mutex::default(),
    });
    let mut chat = def("process_chat_message", "chat", native("rt_echo"));
    chat.uses = vec![Use::degradable("zep")];
    let mut recall = def("recall_memory", "chat", native("rt_echo"));
    recall.uses = vec![Use::required("zep")];
    let rig = Rig::start(
        &[Queue {
            name: "chat",
            concurrency: 2,
        }],
        vec![chat, recall],
        gate.clone(),
    )
    .await;
    let waits = rig.enqueue("recall_memory", "chat", json!({})).await;
    let runs = rig.enqueue("process_chat_message", "chat", json!({})).await;
    let record = rig
        .until_state(&runs, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    assert_eq!(record.attempts, 1);
    let kinds = |events: Vec<crate::broker::Event>| -> Vec<String> {
        events.into_iter().map(|e| e.kind.to_string()).collect()
    };
    assert_eq!(
        kinds(rig.events_of(&runs).await),
        ["sent", "started", "succeeded"]
    );
    let end = Instant::now() + Duration::from_secs(5);
    while !kinds(rig.events_of(&waits).await).contains(&"deferred".to_string()) {
        assert!(Instant::now() < end, "recall_memory was not deferred");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kinds(rig.events_of(&waits).await), ["sent", "deferred"]);
    let deferred = rig.broker.record(&waits).await.unwrap().unwrap();
    assert_eq!(
        (deferred.state, deferred.attempts),
        (TaskState::Scheduled, 0)
    );
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_resource_fails_the_task_permanently_and_link_error_fires() {
    let gate = Arc::new(ClosedFor {
        until: SystemTime::now(),
        asked: Mutex::default(),
    });
    let mut extract = def("extract_preferences_async", "default", native("rt_echo"));
    extract.uses = vec![Use::required("openai")];
    extract.retry.max_retries = 3;
    extract.link_error = vec!["record_task_failure".into()];
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 2,
        }],
        vec![
            extract,
            def("record_task_failure", "default", native("rt_echo")),
        ],
        gate,
    )
    .await;
    let id = rig
        .enqueue("extract_preferences_async", "default", json!({}))
        .await;
    let dead = rig
        .until_state(&id, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(
        dead.error.as_deref(),
        Some("permanent: resource openai unusable: OPENAI_API_KEY is not set")
    );
    let at = Instant::now();
    loop {
        let all = rig.broker.events(None, 100_000).await.unwrap();
        if all
            .iter()
            .any(|e| e.kind == "succeeded" && e.task.as_deref() == Some("record_task_failure"))
        {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "link_error never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.root.stop(None);
}

/// Waits until `n` leases are held here (the consumer admitted and started that many).
async fn until_leases(rig: &Rig, n: usize) {
    let end = Instant::now() + Duration::from_secs(5);
    while rig.leases.count() != n {
        assert!(
            Instant::now() < end,
            "{} leases, expected {n}",
            rig.leases.count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_task_is_retried_or_dead_lettered_and_its_consumer_keeps_running() {
    // Hangs on its first attempt, succeeds on the next one.
    let mut n = Natives::default();
    n.register("hang_once", |ctx| async move {
        if ctx.envelope.attempt == 0 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Ok(json!("second time"))
    });
    let mut retried = def("hang_once", "default", n.handler("hang_once").unwrap());
    retried.retry.max_retries = 1;
    let mut no_retry = def("hang_once_dead", "default", n.handler("hang_once").unwrap());
    no_retry.link_error = vec!["on_dead".into()];
    let on_dead = def("on_dead", "default", native("rt_echo"));
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![retried, no_retry, on_dead],
        Arc::new(AlwaysOpen),
    )
    .await;
    let before = rig.tree.get("root/queues/default").unwrap();
    let cell = rig.tree.cell("root/queues/default").unwrap();

    // Retried: the next attempt runs and succeeds.
    let id = rig.enqueue("hang_once", "default", json!({})).await;
    until_leases(&rig, 1).await;
    let killed = kill_task(&cell, &id, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        killed,
        KilledTask {
            id: id.clone(),
            task: "hang_once".into(),
            queue: "default".into(),
            attempt: 0,
        }
    );
    let record = rig
        .until_state(&id, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    assert_eq!(record.attempts, 2, "{record:?}");
    let events = rig.events_of(&id).await;
    let retry = events.iter().find(|e| e.kind == "retried").unwrap();
    assert_eq!(retry.detail["error"], "task actor killed", "{retry:?}");
    assert_eq!(
        events.iter().filter(|e| e.kind == "started").count(),
        2,
        "{events:?}"
    );

    // Not retryable any more (max_retries = 0): dead-lettered, link_error fired.
    let dead = rig.enqueue("hang_once_dead", "default", json!({})).await;
    until_leases(&rig, 1).await;
    let killed = kill_task(&cell, &dead, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(killed.attempt, 0);
    let record = rig
        .until_state(&dead, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert!(
        record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("retries exhausted after 1 attempts: task actor killed"),
        "{record:?}"
    );

    // A task that is not running here (finished; never existed) is not found.
    for unknown in [id.as_str(), "no-such-task"] {
        let err = kill_task(&cell, unknown, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, KillTaskError::NotRunning(ref i) if i == unknown),
            "{err:?}"
        );
    }

    // Nothing leaked, nothing restarted, the outcomes counted.
    let end = Instant::now() + Duration::from_secs(5);
    while rig.leases.count() != 0 || rig.broker.depth("default").await.unwrap().in_flight != 0 {
        assert!(
            Instant::now() < end,
            "a lease or an in-flight entry is left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = rig.tree.get("root/queues/default").unwrap();
    assert_eq!(
        after.restarts, before.restarts,
        "the consumer did not restart"
    );
    assert_eq!(after.started_at, before.started_at);
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let outcomes = rig.tree.get("root/queues/default").unwrap().snapshot["outcomes"].clone();
        // hang_once: retried, then succeeded; hang_once_dead: dead; its on_dead: succeeded.
        if outcomes == json!({"succeeded": 2, "retried": 1, "dead": 1}) {
            break;
        }
        assert!(Instant::now() < end, "outcomes {outcomes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.root.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_exec_task_kills_and_reaps_its_process_group() {
    let dir = std::env::temp_dir().join(format!("rt-killtask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pids = dir.join("pids");
    // First attempt: a shell with a `sleep` child in its group, both written down; later
    // attempts print a result.
    let body = format!(
        r#"read -r envelope; case "$envelope" in *'"attempt":0'*) sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait;; esac; echo '"done"'"#,
        pids = pids.display()
    );
    let handler = Arc::new(crate::handler::exec::ExecHandler::new(
        "/bin/sh",
        &["-c".to_string(), body],
        None,
    ));
    let mut task = def("slow_exec", "default", handler);
    task.retry.max_retries = 1;
    let rig = Rig::start(
        &[Queue {
            name: "default",
            concurrency: 1,
        }],
        vec![task],
        Arc::new(AlwaysOpen),
    )
    .await;
    let id = rig.enqueue("slow_exec", "default", json!({})).await;
    let end = Instant::now() + Duration::from_secs(5);
    while !pids.exists() {
        assert!(Instant::now() < end, "the command never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ids: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let cell = rig.tree.cell("root/queues/default").unwrap();
    kill_task(&cell, &id, Duration::from_secs(1)).await.unwrap();
    let record = rig
        .until_state(&id, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    assert_eq!(record.attempts, 2);
    assert_eq!(record.result, Some(json!("done")));
    // The shell (our child: a zombie if not reaped) and its `sleep` are gone.
    for pid in ids {
        let end = Instant::now() + Duration::from_secs(2);
        while let Some(state) = proc_state(pid) {
            assert!(
                Instant::now() < end,
                "process {pid} left behind (state {state})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    rig.root.stop(None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The state letter of `/proc/PID/stat` (`Z` for a zombie); `None` once the pid is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// A native handler that notes the id of each task it runs, then sleeps `kwargs.ms`
/// (stopping at the soft signal unless `kwargs.ignore_soft`).
fn noting(ran: &Arc<Mutex<Vec<String>>>) -> Arc<dyn Handler> {
    let mut n = Natives::default();
    let ran = Arc::clone(ran);
    n.register("note", move |ctx| {
        let ran = Arc::clone(&ran);
        async move {
            ran.lock().unwrap().push(ctx.envelope.id.clone());
            let ms = ctx
                .envelope
                .kwargs
                .get("ms")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let sleep = tokio::time::sleep(Duration::from_millis(ms));
            if ctx.envelope.kwargs.get("ignore_soft") == Some(&json!(true)) {
                sleep.await;
            } else {
                tokio::select! {
                    () = sleep => {}
                    () = ctx.soft.cancelled() => return Err(TaskError::Cancelled("soft".into())),
                }
            }
            match ctx.envelope.kwargs.get("fail") {
                Some(_) => Err(TaskError::retry("flaky")),
                None => Ok(json!("ran")),
            }
        }
    });
    n.handler("note").unwrap()
}

/// Revoked before they start — queued in the broker, delayed by an eta, waiting in the
/// consumer (prefetched) — tasks never run: each is dead-lettered as `revoked`, its record
/// says dead/revoked, its `link_error` callback runs with the error `revoked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tasks_that_did_not_start_never_run_and_their_link_error_fires() {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut work = def("work", "chat", noting(&ran));
    work.link_error = vec!["on_failure".into()];
    let rig = Rig::start_prefetching(
        &[
            Queue {
                name: "chat",
                concurrency: 1,
            },
            Queue {
                name: "notes",
                concurrency: 1,
            },
        ],
        vec![work, def("on_failure", "notes", native("rt_echo"))],
        Arc::new(AlwaysOpen),
        1,
    )
    .await;
    let busy = rig.enqueue("work", "chat", json!({ "ms": 800 })).await;
    rig.until_state(&busy, TaskState::Running, Duration::from_secs(5))
        .await;
    // Prefetched (one slot beyond the running one): it waits in the consumer.
    let waiting = rig.enqueue("work", "chat", json!({})).await;
    let end = Instant::now() + Duration::from_secs(5);
    while rig.broker.depth("chat").await.unwrap().in_flight < 2 {
        assert!(Instant::now() < end, "never prefetched");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let queued = rig.enqueue("work", "chat", json!({})).await;
    let mut later = Envelope::new("work", "chat");
    later.eta = Some(crate::broker::Timestamp::at(
        SystemTime::now() + Duration::from_secs(60),
    ));
    let delayed = rig.broker.enqueue(vec![later]).await.unwrap()[0].id.clone();
    for id in [&waiting, &queued, &delayed] {
        rig.broker.revoke(id, false).await.unwrap();
    }
    for id in [&waiting, &queued, &delayed] {
        let record = rig
            .until_state(id, TaskState::Dead, Duration::from_secs(5))
            .await;
        assert_eq!(record.error.as_deref(), Some("revoked"), "{id}");
    }
    rig.until_state(&busy, TaskState::Succeeded, Duration::from_secs(5))
        .await;
    // Each is in the dead letters, and its link_error ran with the error.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = rig.broker.depth("chat").await.unwrap();
        if depth.dead == 3 && depth.ready + depth.delayed + depth.in_flight == 0 {
            break;
        }
        assert!(Instant::now() < end, "{depth:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let letters = rig.broker.dead_letters("chat", 10).await.unwrap();
    assert!(letters.iter().all(|l| l.reason == "revoked"), "{letters:?}");
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let echoed: Vec<Event> = rig
            .broker
            .events(None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "succeeded" && e.task.as_deref() == Some("on_failure"))
            .collect();
        if echoed.len() == 3 {
            for event in echoed {
                let id = event.task_id.unwrap();
                let record = rig.broker.record(&id).await.unwrap().unwrap();
                let failure = &record.result.unwrap()["args"][0];
                assert_eq!(failure["error"], "revoked", "{failure}");
            }
            break;
        }
        assert!(
            Instant::now() < end,
            "link_error ran {} times",
            echoed.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*ran.lock().unwrap(), [busy], "only the unrevoked task ran");
    rig.root.stop(None);
}

/// A running task revoked with terminate gets the soft signal at once; one that honours it
/// ends at once, one that ignores it is stopped `terminate_grace` (300 ms here) later. Both
/// are recorded dead/revoked, not retried (their policy would retry them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_revoked_with_terminate_is_stopped_soft_then_hard_and_not_retried() {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut work = def("work", "chat", noting(&ran));
    work.retry.max_retries = 3;
    let rig = Rig::start(
        &[Queue {
            name: "chat",
            concurrency: 2,
        }],
        vec![work],
        Arc::new(AlwaysOpen),
    )
    .await;
    let polite = rig.enqueue("work", "chat", json!({ "ms": 30_000 })).await;
    let stubborn = rig
        .enqueue("work", "chat", json!({ "ms": 30_000, "ignore_soft": true }))
        .await;
    for id in [&polite, &stubborn] {
        rig.until_state(id, TaskState::Running, Duration::from_secs(5))
            .await;
    }
    let asked = Instant::now();
    assert_eq!(
        rig.broker.revoke(&polite, true).await.unwrap(),
        crate::broker::Revoked::Running
    );
    let record = rig
        .until_state(&polite, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert!(
        asked.elapsed() < Duration::from_millis(250),
        "soft: at once"
    );
    assert_eq!(
        (record.error.as_deref(), record.attempts),
        (Some("revoked"), 1)
    );
    let asked = Instant::now();
    rig.broker.revoke(&stubborn, true).await.unwrap();
    let record = rig
        .until_state(&stubborn, TaskState::Dead, Duration::from_secs(5))
        .await;
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(3),
        "hard stop after the grace, took {took:?}"
    );
    assert_eq!(record.error.as_deref(), Some("revoked"));
    let depth = rig.broker.depth("chat").await.unwrap();
    assert_eq!((depth.delayed, depth.dead), (0, 2), "not retried");
    rig.root.stop(None);
}

/// Revoked without terminate, a running task finishes its attempt; the retry it schedules
/// is refused at admission (dead/revoked), so it does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_revoked_without_terminate_finishes_and_its_retry_is_revoked() {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut work = def("work", "chat", noting(&ran));
    work.retry.max_retries = 3;
    let rig = Rig::start(
        &[Queue {
            name: "chat",
            concurrency: 1,
        }],
        vec![work],
        Arc::new(AlwaysOpen),
    )
    .await;
    let id = rig
        .enqueue("work", "chat", json!({ "ms": 300, "fail": true }))
        .await;
    rig.until_state(&id, TaskState::Running, Duration::from_secs(5))
        .await;
    assert_eq!(
        rig.broker.revoke(&id, false).await.unwrap(),
        crate::broker::Revoked::Running
    );
    let record = rig
        .until_state(&id, TaskState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(record.error.as_deref(), Some("revoked"));
    assert_eq!(ran.lock().unwrap().len(), 1, "ran once, not again");
    let kinds: Vec<String> = rig
        .events_of(&id)
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect();
    assert_eq!(kinds, ["sent", "started", "retried", "dead"]);
    rig.root.stop(None);
}
