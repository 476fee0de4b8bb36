use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::RedisBroker;
use crate::broker::contract::{RawProducer, contract_suite, settings};
use crate::broker::{
    Admin, BrokerError, BrokerSettings, Envelope, QueueDepth, Records, Recovered, TaskQueue,
    TaskState,
};
use crate::test_util::RedisServer;

/// A broker with its own redis-server, killed when the test ends.
struct Harness {
    broker: RedisBroker,
    server: RedisServer,
}

impl Harness {
    async fn start(settings: BrokerSettings) -> Self {
        Self::on(RedisServer::start(), settings).await
    }

    async fn on(server: RedisServer, settings: BrokerSettings) -> Self {
        let broker = RedisBroker::connect(&server.url(), settings).await.unwrap();
        Self { broker, server }
    }

    /// A plain connection, as another program (a Python producer) would have.
    async fn outsider(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// The calls of the suite and of these tests go to the broker the harness started.
impl std::ops::Deref for Harness {
    type Target = RedisBroker;
    fn deref(&self) -> &RedisBroker {
        &self.broker
    }
}

/// A raw `XADD`, as another program (a Python producer) would write it.
impl RawProducer for RedisBroker {
    async fn push_raw(&self, queue: &str, raw: &str) {
        let mut conn = self.manager.clone();
        redis::cmd("XADD")
            .arg(self.keys.stream(queue))
            .arg("*")
            .arg("e")
            .arg(raw)
            .query_async::<String>(&mut conn)
            .await
            .unwrap();
    }
}

contract_suite!(Harness::start(settings()) => broker);

/// The same contract on a Redis Cluster (3 masters + 3 replicas, one per test process; each
/// test under a key prefix of its own).
mod on_a_cluster {
    use super::{RedisBroker, contract_suite, settings};
    use crate::broker::BrokerSettings;
    use crate::test_util::RedisCluster;

    struct ClusterHarness {
        broker: RedisBroker,
    }

    impl ClusterHarness {
        async fn start(settings: BrokerSettings) -> Self {
            let url = tokio::task::spawn_blocking(|| RedisCluster::shared().url())
                .await
                .unwrap();
            let prefix = format!("rt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            let broker = RedisBroker::connect(&url, BrokerSettings { prefix, ..settings })
                .await
                .unwrap();
            Self { broker }
        }
    }

    contract_suite!(ClusterHarness::start(settings()) => broker);
}

#[tokio::test]
async fn events_off_write_nothing() {
    let h = Harness::start(BrokerSettings {
        events_maxlen: 0,
        ..settings()
    })
    .await;
    crate::broker::contract::events_off_write_nothing(&h.broker, "chat").await;
    let mut conn = h.outsider().await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("rt:events")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "rt:events written with events off");
}

fn task(queue: &str, n: u32) -> Envelope {
    let mut env = Envelope::new("send_whatsapp_message_task", queue);
    env.args = vec![json!(n)];
    env
}

/// Outcomes go out as a directly built `EVALSHA` of `commit.lua`: when Redis lost the script
/// (`SCRIPT FLUSH`, a restart without it) it is loaded again and the outcome written once.
#[tokio::test]
async fn outcomes_are_written_after_redis_lost_its_scripts() {
    let h = Harness::start(settings()).await;
    let q = "flushed";
    h.broker
        .enqueue((0..3).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    let got = h.broker.reserve(q, "c1", 3, Duration::ZERO).await.unwrap();
    h.broker.ack(&got[0], json!("first")).await.unwrap();
    let mut conn = h.outsider().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let done: Vec<_> = got[1..]
        .iter()
        .map(|d| (d.clone(), json!("after")))
        .collect();
    h.broker.ack_many(&done).await.unwrap();
    for (d, expected) in got.iter().zip(["first", "after", "after"]) {
        let record = h.broker.record(&d.envelope.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.result, Some(json!(expected)));
    }
    let depth = h.broker.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (0, 0));
    // The claiming enqueue (`enqueue.lua`, sent the same way) too.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keyed = task(q, 9);
    keyed.idempotency_key = Some("k9".into());
    let sent = h.broker.enqueue(vec![keyed.clone()]).await.unwrap();
    assert!(!sent[0].duplicate);
    keyed.id = "another".into();
    let again = h.broker.enqueue(vec![keyed]).await.unwrap();
    assert_eq!(
        (again[0].id.as_str(), again[0].duplicate),
        (sent[0].id.as_str(), true)
    );
}

#[tokio::test]
async fn a_closed_port_is_unreachable_and_named_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://app:hunter2@127.0.0.1:{port}/0");
    let started = tokio::time::Instant::now();
    let err = RedisBroker::connect(&url, BrokerSettings::default())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "not fast");
    match &err {
        BrokerError::Unreachable { url, .. } => {
            assert_eq!(url, &format!("redis://app@127.0.0.1:{port}/0"));
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_xadd_from_another_producer_is_delivered() {
    let h = Harness::start(settings()).await;
    let mut conn = h.outsider().await;
    // Added before any consumer (or group) exists, the way a Python producer would.
    let json = r#"{"id":"py-1","task":"process_chat_message","queue":"chat","args":["hi"],"kwargs":{"user":7},"celery_origin":"web-1"}"#;
    let _: String = redis::cmd("XADD")
        .arg("rt:{chat}:stream")
        .arg("*")
        .arg("e")
        .arg(json)
        .query_async(&mut conn)
        .await
        .unwrap();
    let got = h
        .broker
        .reserve("chat", "node-1", 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id, "py-1");
    assert_eq!(got[0].envelope.kwargs["user"], 7);
    assert_eq!(got[0].envelope.extra["celery_origin"], "web-1");
    assert_eq!(got[0].deliveries, 1);
    h.broker.ack(&got[0], json!({"ok": true})).await.unwrap();
    // The record is a plain hash a Python reader can HGETALL.
    let state: String = redis::cmd("HGET")
        .arg("rt:result:py-1")
        .arg("state")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(state, "succeeded");
    assert_eq!(h.broker.depth("chat").await.unwrap(), QueueDepth::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_inside_one_batch_return_the_first_id() {
    let h = Harness::start(settings()).await;
    let q = "dedupe";
    let mut batch: Vec<Envelope> = (0..4).map(|n| task(q, n)).collect();
    batch[0].idempotency_key = Some("k1".into());
    batch[2].idempotency_key = Some("k1".into());
    batch[3].idempotency_key = Some("k2".into());
    let sent = h.broker.enqueue(batch).await.unwrap();
    let flags: Vec<bool> = sent.iter().map(|e| e.duplicate).collect();
    assert_eq!(flags, [false, false, true, false]);
    assert_eq!(sent[2].id, sent[0].id);
    assert_eq!(h.broker.depth(q).await.unwrap().ready, 3);
    // Re-sending the very same envelope (same id, same key) is a duplicate too.
    let mut again = task(q, 9);
    again.id = sent[3].id.clone();
    again.idempotency_key = Some("k2".into());
    let second = h.broker.enqueue(vec![again]).await.unwrap();
    assert!(second[0].duplicate);
    assert_eq!(h.broker.depth(q).await.unwrap().ready, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_reserve_does_not_hold_up_other_commands() {
    let h = Harness::start(settings()).await;
    let started = tokio::time::Instant::now();
    let (got, _) = tokio::join!(
        h.broker
            .reserve("idle", "c", 1, Duration::from_millis(1500)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for n in 0..20 {
                h.broker.enqueue(vec![task("other", n)]).await.unwrap();
                h.broker.depth("other").await.unwrap();
            }
            assert!(
                started.elapsed() < Duration::from_millis(1000),
                "commands waited for the blocking read"
            );
        }
    );
    assert!(got.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_acknowledged_result_and_no_task() {
    let settings = BrokerSettings {
        result_ttl: Duration::from_secs(600),
        ..settings()
    };
    let mut h = Harness::on(RedisServer::start_with_aof(), settings).await;
    let q = "restart";
    let sent = h
        .broker
        .enqueue((0..20).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    let got = h.broker.reserve(q, "c1", 10, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 10);
    for d in &got[..5] {
        h.broker.ack(d, json!(d.envelope.args[0])).await.unwrap();
    }
    // A consumer blocked on the queue while the server dies.
    let blocked = h.broker.reserve("empty", "c1", 1, Duration::from_secs(2));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.server.stop();
    };
    let (blocked, ()) = tokio::join!(blocked, kill);
    assert!(
        matches!(blocked, Err(BrokerError::Unreachable { .. })),
        "{blocked:?}"
    );
    let err = h.broker.depth(q).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err:?}");
    let state = h.broker.connection_state();
    assert!(!state.is_connected(), "{state}");
    assert!(
        state.to_string().starts_with("reconnecting since "),
        "{state}"
    );

    h.server.restart();
    // The broker reconnects by itself; callers just try again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let depth = loop {
        match h.broker.depth(q).await {
            Ok(depth) => break depth,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never reconnected: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(h.broker.connection_state().is_connected());
    assert_eq!((depth.ready, depth.in_flight), (10, 5));
    for d in &got[..5] {
        let record = h.broker.record(&d.envelope.id).await.unwrap();
        let record = record.expect("acknowledged result lost in the restart");
        assert_eq!(record.state, TaskState::Succeeded);
        assert_eq!(record.result, Some(d.envelope.args[0].clone()));
    }
    // The unacknowledged five come back when their lease expires; with the rest, every
    // task that was not acknowledged is delivered.
    let recovered = h.broker.recover(q, Duration::ZERO).await.unwrap();
    assert_eq!(recovered.requeued, 5);
    let mut rest = Vec::new();
    loop {
        let more = h
            .broker
            .reserve(q, "c2", 7, Duration::from_millis(200))
            .await
            .unwrap();
        if more.is_empty() {
            break;
        }
        rest.extend(more);
    }
    let mut ids: Vec<String> = rest.iter().map(|d| d.envelope.id.clone()).collect();
    ids.sort();
    let mut expected: Vec<String> = sent[5..].iter().map(|e| e.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    // The blocking consumer works again too.
    h.broker.enqueue(vec![task("empty", 1)]).await.unwrap();
    let got = h
        .broker
        .reserve("empty", "c1", 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_entries_have_the_documented_fields() {
    let h = Harness::start(settings()).await;
    let q = "fields";
    h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
    h.broker
        .dead_letter(&got[0], "permanent: 400")
        .await
        .unwrap();
    let mut conn = h.outsider().await;
    let reply: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("rt:{fields}:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let names: Vec<&str> = reply[0].1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["e", "reason", "attempts", "at"]);
    let depth = h.broker.depth(q).await.unwrap();
    assert_eq!((depth.in_flight, depth.dead), (0, 1));
}

/// Sizes above one script batch (256) and one dead-letter page (100) take several calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_queues_are_moved_in_batches() {
    let h = Harness::start(settings()).await;
    let q = "big";
    let n = 700u32;
    let due = crate::broker::rfc3339(SystemTime::now() + Duration::from_millis(100));
    let batch: Vec<Envelope> = (0..n)
        .map(|i| {
            let mut env = task(q, i);
            env.eta = Some(due.clone().into());
            env
        })
        .collect();
    h.broker.enqueue(batch).await.unwrap();
    assert_eq!(h.broker.depth(q).await.unwrap().delayed, u64::from(n));
    let later = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(h.broker.promote_due(q, later).await.unwrap(), u64::from(n));
    let got = h
        .broker
        .reserve(q, "c", 1000, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), n as usize);
    let first_order: Vec<u64> = got
        .iter()
        .map(|d| d.envelope.args[0].as_u64().unwrap())
        .collect();
    let recovered = h.broker.recover(q, Duration::ZERO).await.unwrap();
    assert_eq!(recovered.requeued, u64::from(n));
    // Recovered entries keep their order. (Entries due at the same millisecond are
    // promoted in member order, not enqueue order: see the module docs.)
    let again = h
        .broker
        .reserve(q, "c", 1000, Duration::ZERO)
        .await
        .unwrap();
    let order: Vec<u64> = again
        .iter()
        .map(|d| d.envelope.args[0].as_u64().unwrap())
        .collect();
    assert_eq!(order, first_order);
    for d in &again {
        h.broker.dead_letter(d, "permanent").await.unwrap();
    }
    assert_eq!(h.broker.requeue_dead(q, 650).await.unwrap(), 650);
    assert_eq!(h.broker.depth(q).await.unwrap().dead, 50);
    assert_eq!(h.broker.purge(q).await.unwrap().ready, 650);
    assert_eq!(
        h.broker.depth(q).await.unwrap(),
        QueueDepth {
            dead: 50,
            ..QueueDepth::default()
        }
    );
}

/// A Redis that comes back empty (no persistence) loses its consumer groups: the broker
/// creates them again instead of failing on NOGROUP forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_gets_its_groups_back() {
    let mut h = Harness::start(settings()).await;
    let q = "amnesia";
    h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
    // Started without AOF and with `--save ""`: it comes back empty.
    h.server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.broker.depth(q).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The lost delivery can still be settled; new work flows, blocking reads included.
    h.broker.ack(&got[0], json!(1)).await.unwrap();
    h.broker.enqueue(vec![task(q, 2)]).await.unwrap();
    let got = h
        .broker
        .reserve(q, "c", 1, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        h.broker
            .renew(q, "c", &[got[0].entry.clone()])
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        h.broker.recover(q, Duration::from_secs(60)).await.unwrap(),
        Recovered::default()
    );
}

/// Runs `cmd` on another connection (a careless tool or program writing into the
/// runtime's namespace).
async fn redis_cli(h: &Harness, cmd: &[&str]) -> redis::Value {
    let mut conn = h.outsider().await;
    redis::cmd(cmd[0])
        .arg(&cmd[1..])
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Entries of `queue` reserved and not settled (`XPENDING`), from outside the broker.
async fn pending(h: &Harness, queue: &str) -> i64 {
    let stream = format!("rt:{{{queue}}}:stream");
    match redis_cli(h, &["XPENDING", &stream, "rt"]).await {
        redis::Value::Array(summary) => super::int(&summary[0]),
        other => panic!("XPENDING: {other:?}"),
    }
}

/// Event kinds written about task `id`.
async fn kinds(h: &Harness, id: &str) -> Vec<String> {
    let events = h.broker.events(None, 10_000).await.unwrap();
    events
        .into_iter()
        .filter(|e| e.task_id.as_deref() == Some(id))
        .map(|e| e.kind.to_string())
        .collect()
}

/// A key of the wrong type where an outcome writes (`SET rt:result:<id> x`, a string at
/// the delayed set, the dead letters or the events stream) fails that outcome whole: the
/// error names the key, the entry stays pending (it comes back after its lease — it was
/// not acked), no record, no event, nothing moved. With the key fixed, the entry comes back
/// and its outcome is written. (Before: the record write failed, the ack went through, and
/// the task was gone with no record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_written_is_not_written_at_all() {
    let h = Harness::start(settings()).await;
    let q = "wrongtype";
    let sent = h
        .broker
        .enqueue((0..4).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    let got = h.broker.reserve(q, "c", 4, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 4);
    let id = |n: usize| sent[n].id.as_str();

    // The record key holds a string.
    let record_key = format!("rt:result:{}", id(0));
    redis_cli(&h, &["SET", &record_key, "x"]).await;
    let err = h.broker.ack(&got[0], json!("r")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "broker command failed: WRONGTYPE {record_key} holds a string, not a hash \
             (nothing of this outcome was written)"
        )
    );
    // The delayed set is a string: neither a retry nor a deferral is written.
    redis_cli(&h, &["SET", "rt:{wrongtype}:delayed", "x"]).await;
    let at = SystemTime::now();
    let err = h.broker.retry(&got[1], at, "timeout").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("rt:{wrongtype}:delayed holds a string, not a zset"),
        "{err}"
    );
    let err = h.broker.defer(&got[1], at, "breaker").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("rt:{wrongtype}:delayed holds a string"),
        "{err}"
    );
    // The dead letters are a list.
    redis_cli(&h, &["LPUSH", "rt:{wrongtype}:dead", "x"]).await;
    let err = h
        .broker
        .dead_letter(&got[2], "permanent")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("rt:{wrongtype}:dead holds a list, not a stream"),
        "{err}"
    );
    // Several acks at once: the good one is written, the bad one named.
    let err = h
        .broker
        .ack_many(&[(got[0].clone(), json!("r")), (got[3].clone(), json!("ok"))])
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "broker command failed: 1 of 2 outcomes not written (the others were): WRONGTYPE"
        ),
        "{err}"
    );
    assert_eq!(
        h.broker.record(id(3)).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );

    // Nothing of the three failed outcomes was written.
    assert_eq!(pending(&h, q).await, 3, "their entries were not acked");
    for n in 0..3 {
        assert_eq!(
            kinds(&h, id(n)).await,
            ["sent"],
            "task {n}: no outcome event"
        );
    }
    assert_eq!(
        redis_cli(&h, &["GET", &record_key]).await,
        redis::Value::BulkString(b"x".to_vec())
    );
    for n in 1..3 {
        let record = h.broker.record(id(n)).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Queued, "task {n}: as enqueued");
    }
    let dead = redis_cli(&h, &["LLEN", "rt:{wrongtype}:dead"]).await;
    assert_eq!(dead, redis::Value::Int(1), "the list is as it was");

    // Fixed: the entries come back through lease recovery and their outcomes are written.
    for key in [
        record_key.as_str(),
        "rt:{wrongtype}:delayed",
        "rt:{wrongtype}:dead",
    ] {
        redis_cli(&h, &["DEL", key]).await;
    }
    assert_eq!(
        h.broker.recover(q, Duration::ZERO).await.unwrap().requeued,
        3
    );
    let again = h.broker.reserve(q, "c", 4, Duration::ZERO).await.unwrap();
    let ids: Vec<&str> = again.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, [id(0), id(1), id(2)]);
    h.broker.ack(&again[0], json!("r")).await.unwrap();
    h.broker.retry(&again[1], at, "timeout").await.unwrap();
    h.broker.dead_letter(&again[2], "permanent").await.unwrap();
    for (n, state) in [TaskState::Succeeded, TaskState::Retrying, TaskState::Dead]
        .into_iter()
        .enumerate()
    {
        let record = h.broker.record(id(n)).await.unwrap().unwrap();
        assert_eq!(record.state, state, "task {n}");
    }
    assert_eq!(kinds(&h, id(0)).await, ["sent", "recovered", "succeeded"]);
    assert_eq!(
        h.broker.depth(q).await.unwrap(),
        QueueDepth {
            delayed: 1,
            dead: 1,
            ..QueueDepth::default()
        }
    );
}

/// The events stream is part of every outcome: a string there fails the outcome whole
/// (the task stays pending), and the `started` events waiting to travel with it are
/// reported, not written half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_events_stream_fails_the_outcome_whole() {
    let h = Harness::start(settings()).await;
    let q = "events-wrongtype";
    let sent = h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
    h.broker.started(&got[0], "c");
    redis_cli(&h, &["DEL", "rt:events"]).await;
    redis_cli(&h, &["SET", "rt:events", "x"]).await;
    let err = h.broker.ack(&got[0], json!(1)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("rt:events holds a string, not a stream"),
        "{err}"
    );
    assert_eq!(pending(&h, q).await, 1);
    let record = h.broker.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Queued, "neither started nor acked");
    redis_cli(&h, &["DEL", "rt:events"]).await;
    h.broker.ack(&got[0], json!(1)).await.unwrap();
    assert_eq!(pending(&h, q).await, 0);
    assert_eq!(kinds(&h, &sent[0].id).await, ["succeeded"]);
}

/// Requeuing dead letters, purging, enqueueing with ids or keys, and a malformed entry's
/// burial check their keys before writing: a wrong-type stream loses no dead letter, a
/// wrong-type idempotency key enqueues nothing, a malformed entry whose dead letters
/// cannot be written stays pending (and the good entries read with it still run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_scripts_check_their_keys_before_writing() {
    let h = Harness::start(settings()).await;
    let q = "scripts-wrongtype";
    h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
    h.broker.dead_letter(&got[0], "permanent").await.unwrap();
    let stream = format!("rt:{{{q}}}:stream");
    redis_cli(&h, &["DEL", &stream]).await;
    redis_cli(&h, &["SET", &stream, "x"]).await;
    let err = h.broker.requeue_dead(q, 10).await.unwrap_err();
    assert!(
        err.to_string().contains("holds a string, not a stream"),
        "{err}"
    );
    assert_eq!(
        h.broker.dead_letters(q, 10).await.unwrap().len(),
        1,
        "not lost"
    );
    // One letter by its entry: the same script, the same check.
    let entry = h.broker.dead_letters(q, 1).await.unwrap()[0].entry.clone();
    let err = h.broker.requeue_dead_entry(q, &entry).await.unwrap_err();
    assert!(
        err.to_string().contains("holds a string, not a stream"),
        "{err}"
    );
    assert_eq!(h.broker.dead_letters(q, 10).await.unwrap().len(), 1);
    let err = h.broker.purge(q).await.unwrap_err();
    assert!(
        err.to_string().contains("holds a string, not a stream"),
        "{err}"
    );
    redis_cli(&h, &["DEL", &stream]).await;

    redis_cli(&h, &["HSET", "rt:idem:k", "f", "v"]).await;
    let mut keyed = task(q, 2);
    keyed.idempotency_key = Some("k".into());
    let mut chosen = task(q, 3);
    chosen.id = "chosen-1".into();
    let err = h
        .broker
        .enqueue(vec![chosen.clone(), keyed])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("rt:idem:k holds a hash, not a string"),
        "{err}"
    );
    assert_eq!(h.broker.depth(q).await.unwrap().ready, 0);
    // Its id was not taken either (no record written): it enqueues once the key is fixed.
    assert!(!h.broker.enqueue(vec![chosen]).await.unwrap()[0].duplicate);

    let dead = format!("rt:{{{q}}}:dead");
    redis_cli(&h, &["DEL", &dead]).await;
    redis_cli(&h, &["SET", &dead, "x"]).await;
    h.push_raw(q, "not json").await;
    h.broker.enqueue(vec![task(q, 4)]).await.unwrap();
    let got = h.broker.reserve(q, "c", 10, Duration::ZERO).await.unwrap();
    let ns: Vec<u64> = got
        .iter()
        .map(|d| d.envelope.args[0].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [3, 4], "the good entries run");
    assert_eq!(
        pending(&h, q).await,
        3,
        "the malformed one is pending, not lost"
    );
}

/// Revocations reach every node sharing the Redis: one listening hears it as it is made
/// (the node running the task acts on it), and one that starts later knows it from its
/// first read (its consumers refuse the task at admission).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_other_nodes_and_nodes_started_later() {
    let a = Harness::start(settings()).await;
    let b = RedisBroker::connect(&a.server.url(), settings())
        .await
        .unwrap();
    let mut heard = b.revocations();
    let q = "revoke-nodes";
    let sent = a
        .broker
        .enqueue(vec![task(q, 1), task(q, 2)])
        .await
        .unwrap();
    let got = b.reserve(q, "node-b", 1, Duration::ZERO).await.unwrap();
    b.started(&got[0], "node-b");
    // The start travels within EVENT_FLUSH.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.broker.record(&sent[0].id).await.unwrap().unwrap().state != TaskState::Running {
        assert!(tokio::time::Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.broker.revoke(&sent[0].id, true).await.unwrap(),
        crate::broker::Revoked::Running
    );
    let told = tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .expect("node b never heard of it")
        .unwrap();
    assert_eq!(
        told,
        crate::broker::Revocation {
            id: sent[0].id.clone(),
            terminate: true
        }
    );
    assert!(b.is_revoked(&sent[0].id));
    a.broker.revoke(&sent[1].id, false).await.unwrap();
    // A node that starts now: it knows both once it reads (in the read's round trip).
    let c = RedisBroker::connect(&a.server.url(), settings())
        .await
        .unwrap();
    let got = c.reserve(q, "node-c", 5, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id, sent[1].id);
    assert!(c.is_revoked(&sent[1].id));
    assert!(c.is_revoked(&sent[0].id));
    assert!(!c.is_revoked("someone-else"));
}

/// Throughput probe (`cargo test -p actors throughput -- --ignored --nocapture`): a
/// debug build is several times slower than release; the targets (≥ 50k enqueues/s
/// batched, ≥ 45k/s drained with acks) are for release builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn enqueue_and_drain_throughput() {
    let server = RedisServer::start();
    let broker = std::sync::Arc::new(
        RedisBroker::connect(&server.url(), settings())
            .await
            .unwrap(),
    );
    let q = "bench";
    let total = 50_000u32;
    let started = tokio::time::Instant::now();
    for chunk in 0..total / 500 {
        let batch = (0..500).map(|i| task(q, chunk * 500 + i)).collect();
        broker.enqueue(batch).await.unwrap();
    }
    let took = started.elapsed();
    println!(
        "enqueue (batches of 500): {total} in {took:?} = {:.0}/s",
        f64::from(total) / took.as_secs_f64()
    );
    let started = tokio::time::Instant::now();
    let mut done = 0;
    while done < total as usize {
        let got = broker.reserve(q, "c", 256, Duration::ZERO).await.unwrap();
        done += got.len();
        let mut acks = tokio::task::JoinSet::new();
        for d in got {
            let broker = broker.clone();
            acks.spawn(async move { broker.ack(&d, Value::Null).await });
        }
        while let Some(r) = acks.join_next().await {
            r.unwrap().unwrap();
        }
    }
    let took = started.elapsed();
    println!(
        "drain (reserve 256, acks concurrent): {total} in {took:?} = {:.0}/s",
        f64::from(total) / took.as_secs_f64()
    );
}

/// `n` tasks enqueued on `q` and all reserved by consumer `c`: what was sent, what was got.
async fn enqueued_and_reserved(
    h: &Harness,
    q: &str,
    n: u32,
) -> (Vec<crate::broker::Enqueued>, Vec<crate::broker::Delivery>) {
    let sent = h
        .broker
        .enqueue((0..n).map(|i| task(q, i)).collect())
        .await
        .unwrap();
    let got = h
        .broker
        .reserve(q, "c", n as usize, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), n as usize);
    (sent, got)
}

/// Redis' own count of calls of `command` (`INFO commandstats`).
async fn calls_of(h: &Harness, command: &str) -> u64 {
    let info = match redis_cli(h, &["INFO", "commandstats"]).await {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    };
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Outcomes handed over while a write is in flight go out together: 400 acks from 400
/// concurrent callers (each with its start waiting to travel along) cost far fewer than 400
/// calls of `commit.lua`, every one is written with its start marker, and one whose record
/// key holds a string fails alone, naming the key, its entry left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_outcomes_are_coalesced_each_still_whole() {
    let h = Arc::new(Harness::start(settings()).await);
    let q = "coalesced";
    let n = 400;
    let (sent, got) = enqueued_and_reserved(&h, q, n).await;
    let bad = format!("rt:result:{}", sent[7].id);
    redis_cli(&h, &["SET", &bad, "x"]).await;
    let before = calls_of(&h, "evalsha").await;
    let mut acks = tokio::task::JoinSet::new();
    for delivery in got {
        let h = Arc::clone(&h);
        acks.spawn(async move {
            h.broker.started(&delivery, "c");
            let acked = h
                .broker
                .ack(&delivery, json!(delivery.envelope.args[0]))
                .await;
            (delivery.envelope.id.clone(), acked)
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = acks.join_next().await {
        let (id, acked) = joined.unwrap();
        if let Err(err) = acked {
            failed.push((id, err.to_string()));
        }
    }
    let calls = calls_of(&h, "evalsha").await - before;
    assert!(calls < 100, "{calls} calls of commit.lua for {n} outcomes");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, sent[7].id);
    assert!(
        failed[0]
            .1
            .contains(&format!("WRONGTYPE {bad} holds a string")),
        "{}",
        failed[0].1
    );
    for (i, s) in sent.iter().enumerate().filter(|(i, _)| *i != 7) {
        let record = h.broker.record(&s.id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Succeeded, "task {i}");
        assert_eq!(record.result, Some(json!(i)));
        assert_eq!(
            record.node.as_deref(),
            Some("c"),
            "task {i}: its start marker"
        );
        assert!(record.started_at.is_some(), "task {i}");
    }
    assert_eq!(pending(&h, q).await, 1, "only the bad one's entry is left");
}

/// A call carries at most `MAX_CALL_BYTES` of arguments: 24 outcomes with a 1 MiB result each,
/// all waiting for the writer when it starts (so nothing but the cap splits them), go out in
/// several calls (not one of 24 MiB), every one written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outcomes_are_split_over_calls() {
    use super::commit::{Job, Writer};
    use crate::broker::outcome::Outcome;
    let h = Harness::start(settings()).await;
    let q = "large-results";
    let n = 24;
    let (sent, got) = enqueued_and_reserved(&h, q, n).await;
    let big = json!("x".repeat(1 << 20));
    let (jobs_tx, jobs) = tokio::sync::mpsc::unbounded_channel();
    let mut answers = Vec::new();
    let at = crate::broker::rfc3339(SystemTime::now());
    for delivery in &got {
        let writes = Outcome::Succeeded(&big).writes(&delivery.envelope, &at);
        let write = h.broker.outcome_write(delivery, &writes, &at, true);
        let (reply, answer) = tokio::sync::oneshot::channel();
        jobs_tx
            .send(Job::Commit {
                writes: vec![write],
                reply,
            })
            .unwrap();
        answers.push(answer);
    }
    drop(jobs_tx);
    let before = calls_of(&h, "evalsha").await;
    Writer {
        jobs,
        conn: h.broker.manager.clone(),
        link: Arc::clone(&h.broker.link),
        sha: redis::Script::new(super::COMMIT).get_hash().to_string(),
        cluster: false,
        maxlen: settings().events_maxlen,
    }
    .run()
    .await;
    for answer in answers {
        let values = answer.await.unwrap().unwrap();
        assert_eq!(values, [redis::Value::Int(1)]);
    }
    let calls = calls_of(&h, "evalsha").await - before;
    assert!(calls >= 3, "{calls} calls for 24 MiB of results");
    for s in &sent {
        let record = h.broker.record(&s.id).await.unwrap().unwrap();
        assert_eq!(
            record.result.as_ref().and_then(Value::as_str).map(str::len),
            Some(1 << 20)
        );
    }
}

/// An event is one field of its entry (its kind → the rest as JSON), and an attempt's start
/// written with its outcome shares the outcome's entry: a task's whole life is two entries
/// (`sent`; `started` + `succeeded`), read back as three events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_and_its_outcome_are_one_events_entry() {
    let h = Harness::start(settings()).await;
    let (sent, got) = enqueued_and_reserved(&h, "merged", 1).await;
    h.broker.started(&got[0], "c");
    h.broker.ack(&got[0], json!(7)).await.unwrap();
    let mut conn = h.outsider().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("rt:events")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let names: Vec<Vec<&str>> = entries
        .iter()
        .map(|(_, fields)| fields.iter().map(|(name, _)| name.as_str()).collect())
        .collect();
    assert_eq!(names, [vec!["sent"], vec!["started", "succeeded"]]);
    let rest: serde_json::Value = serde_json::from_str(&entries[1].1[1].1).unwrap();
    assert_eq!(rest["task_id"], sent[0].id.as_str());
    assert_eq!(rest["queue"], "merged");
    let events = h.broker.events(None, 10).await.unwrap();
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let second = format!("{}.1", entries[1].0);
    assert_eq!(
        ids,
        [
            entries[0].0.as_str(),
            entries[1].0.as_str(),
            second.as_str()
        ]
    );
}

/// Batched outcomes keep the events stream within its cap: after 600 concurrent acks (with
/// their starts) it holds about `events_maxlen` (`MAXLEN ~` trims whole nodes of 100 entries),
/// the newest events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_stays_capped_under_batched_outcomes() {
    let h = Arc::new(
        Harness::start(BrokerSettings {
            events_maxlen: 50,
            ..settings()
        })
        .await,
    );
    let q = "capped";
    let n = 600;
    let (_, got) = enqueued_and_reserved(&h, q, n).await;
    let mut acks = tokio::task::JoinSet::new();
    for delivery in got {
        let h = Arc::clone(&h);
        acks.spawn(async move {
            h.broker.started(&delivery, "c");
            h.broker.ack(&delivery, json!(null)).await
        });
    }
    while let Some(joined) = acks.join_next().await {
        joined.unwrap().unwrap();
    }
    let len = match redis_cli(&h, &["XLEN", "rt:events"]).await {
        redis::Value::Int(len) => len,
        other => panic!("XLEN answered {other:?}"),
    };
    assert!(
        (50..=150).contains(&len),
        "{len} events kept for a cap of 50"
    );
    // What is kept is the newest: the outcomes' events (an entry holds a task's start and
    // its outcome), none of the enqueue's `sent`.
    let kept = h.broker.events(None, 1000).await.unwrap();
    assert!(
        (len..=2 * len).contains(&(kept.len() as i64)),
        "{} events in {len} entries",
        kept.len()
    );
    let kinds: std::collections::BTreeSet<&str> = kept.iter().map(|e| e.kind.as_str()).collect();
    assert!(!kinds.contains("sent"), "{kinds:?}");
    assert!(kinds.contains("succeeded"), "{kinds:?}");
}

/// A queue of 3 partitions (`[queues.hot] partitions = 3`): generated ids go round robin, a
/// key or a chosen id always to the same partition (a repeat is a duplicate), reads take from
/// every partition fairly, depth and recovery count them all, a blocking read wakes for any
/// partition, and a partition's dead letters are named `<entry>@p` and requeued by that name.
async fn a_partitioned_queue(b: &RedisBroker) {
    use crate::broker::Admin;
    let q = "hot";
    let env = |n: u32| {
        let mut env = Envelope::new("rt_noop", q);
        env.args = vec![json!(n)];
        env
    };
    let sent = b.enqueue((0..30).map(env).collect()).await.unwrap();
    assert!(sent.iter().all(|s| !s.duplicate));
    assert_eq!(b.depth(q).await.unwrap().ready, 30);
    // Three reads of 10: every read starts at another partition; all 30 come, 10 per stream.
    let mut per_stream = std::collections::BTreeMap::<String, usize>::new();
    let mut got = Vec::new();
    for _ in 0..3 {
        for d in b.reserve(q, "c", 10, Duration::ZERO).await.unwrap() {
            *per_stream.entry(d.queue.clone()).or_default() += 1;
            assert_eq!(d.envelope.queue, q, "the envelope keeps its queue");
            got.push(d);
        }
    }
    assert_eq!(got.len(), 30);
    assert_eq!(
        per_stream,
        [("hot", 10), ("hot:1", 10), ("hot:2", 10)]
            .map(|(k, v)| (k.to_string(), v))
            .into()
    );
    assert_eq!(b.depth(q).await.unwrap().in_flight, 30);
    // One of partition 2 last: it is dead-lettered below.
    let at = got.iter().position(|d| d.queue == "hot:2").unwrap();
    got.swap(at, 29);
    for d in &got[..29] {
        // Its start travels with its outcome: both in the slot of the stream it came from.
        b.started(d, "c");
        b.ack(d, json!(null)).await.unwrap();
        assert_eq!(
            b.record(&d.envelope.id).await.unwrap().unwrap().state,
            TaskState::Succeeded
        );
    }
    // The last one dead-lettered: named with its partition, requeued by that name.
    let last = &got[29];
    b.dead_letter(last, "poison").await.unwrap();
    let letters = b.dead_letters_after(q, None, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].entry.ends_with("@2"), "{}", letters[0].entry);
    assert_eq!(
        letters[0].envelope.as_ref().map(|e| e.id.as_str()),
        Some(last.envelope.id.as_str())
    );
    assert_eq!(
        b.requeue_dead_entry(q, &letters[0].entry).await.unwrap(),
        Some(last.envelope.id.clone())
    );
    let again = b.reserve(q, "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!(again.len(), 1);
    b.ack(&again[0], json!(null)).await.unwrap();
    assert_eq!(b.depth(q).await.unwrap(), QueueDepth::default());
    // Keys and chosen ids pick one partition: their repeats are duplicates.
    for n in 0..6 {
        let mut keyed = env(100 + n);
        keyed.idempotency_key = Some(format!("order-{n}"));
        let mut chosen = env(200 + n);
        chosen.id = format!("telegram:process:{n}");
        let first = b
            .enqueue(vec![keyed.clone(), chosen.clone()])
            .await
            .unwrap();
        keyed.args = vec![json!(300 + n)];
        let second = b.enqueue(vec![keyed, chosen]).await.unwrap();
        assert!(second.iter().all(|s| s.duplicate), "{second:?}");
        assert_eq!(
            first.iter().map(|s| &s.id).collect::<Vec<_>>(),
            second.iter().map(|s| &s.id).collect::<Vec<_>>()
        );
    }
    assert_eq!(b.depth(q).await.unwrap().ready, 12);
    let all = b.reserve(q, "c", 100, Duration::ZERO).await.unwrap();
    assert_eq!(all.len(), 12);
    // Leases expire: recovery sweeps every partition.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recovered = b.recover(q, Duration::from_millis(100)).await.unwrap();
    assert_eq!(recovered.requeued, 12);
    let all = b.reserve(q, "c", 100, Duration::ZERO).await.unwrap();
    assert_eq!(all.len(), 12);
    for d in &all {
        b.ack(d, json!(null)).await.unwrap();
    }
    // Revoking a task that waits for its eta moves its entry from its partition's delayed set
    // to that partition's stream at once (a consumer then dead-letters it).
    let mut delayed = Vec::new();
    for n in 0..6 {
        let mut later = env(500 + n);
        later.id = format!("reminder:{n}");
        later.eta = Some(crate::broker::Timestamp::at(
            std::time::SystemTime::now() + Duration::from_secs(3600),
        ));
        delayed.push(later);
    }
    b.enqueue(delayed).await.unwrap();
    assert_eq!(b.depth(q).await.unwrap().delayed, 6);
    for n in 0..6 {
        let id = format!("reminder:{n}");
        assert_eq!(
            b.revoke(&id, false).await.unwrap(),
            crate::broker::Revoked::Pending(TaskState::Scheduled),
            "{id}"
        );
        assert!(b.is_revoked(&id));
    }
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.delayed, depth.ready), (0, 6), "{depth:?}");
    for d in b.reserve(q, "c", 10, Duration::ZERO).await.unwrap() {
        b.dead_letter(&d, "revoked").await.unwrap();
    }
    assert_eq!(b.purge_dead(q).await.unwrap(), 6);
    // A blocking read wakes for an entry in any partition.
    for n in 0..3 {
        let waiting = b.reserve(q, "c", 10, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let (got, _) = tokio::join!(waiting, async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.enqueue(vec![env(400 + n)]).await.unwrap();
        });
        let got = got.unwrap();
        assert_eq!(got.len(), 1, "read {n}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        b.ack(&got[0], json!(null)).await.unwrap();
    }
    assert_eq!(b.depth(q).await.unwrap(), QueueDepth::default());
}

fn partitioned() -> BrokerSettings {
    BrokerSettings {
        partitions: [("hot".to_string(), 3)].into(),
        ..settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_queue_on_one_server() {
    let h = Harness::start(partitioned()).await;
    a_partitioned_queue(&h.broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_queue_on_a_cluster() {
    let url = tokio::task::spawn_blocking(|| crate::test_util::RedisCluster::shared().url())
        .await
        .unwrap();
    let prefix = format!("rt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let broker = RedisBroker::connect(
        &url,
        BrokerSettings {
            prefix,
            ..partitioned()
        },
    )
    .await
    .unwrap();
    a_partitioned_queue(&broker).await;
    // Each partition's tasks' events are in its own stream (its own slot); the merged read names
    // the stream in each id, and an id is a cursor of its own.
    use crate::broker::Records;
    let mut conn = broker.manager.clone();
    for stream in ["hot", "hot:1", "hot:2"] {
        let key = format!("{}:{{{stream}}}:events", broker.settings.prefix);
        let len: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(len > 0, "{key}");
    }
    let all = broker.events(None, 10_000).await.unwrap();
    for stream in ["hot", "hot:1", "hot:2"] {
        assert!(
            all.iter().any(|e| e.id.ends_with(&format!("@{stream}"))),
            "no event of {stream}"
        );
    }
    // Paging by the merged ids gives the same events in the same order.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = broker.events(after.as_deref(), 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        paged.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(paged, all.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
    let mut back = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = broker.events_before(before.as_deref(), 5).await.unwrap();
        let Some(first) = page.first() else { break };
        before = Some(first.id.clone());
        back.splice(0..0, page.into_iter().map(|e| e.id));
    }
    assert_eq!(back, paged);
}
