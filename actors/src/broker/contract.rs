//! The broker contract suite: every property the broker contract promises (docs/architecture.md), written once against
//! [`Broker`] and run for each implementation (`contract_suite!` below). Each property uses
//! its own queue names, so one broker (one Redis server) can serve a whole test binary.
//!
//! Times are real (Redis cannot pause), kept short: leases of a few hundred milliseconds.

use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use super::{
    Broker, BrokerError, BrokerSettings, Enqueued, Envelope, LastRun, NodeRecord, NodeState,
    TaskState,
};

/// Lets the suite write an entry the way a careless producer could.
pub(crate) trait RawProducer {
    /// Appends `raw` to `queue`'s ready entries without any parsing.
    async fn push_raw(&self, queue: &str, raw: &str);
}

/// Settings the suite expects: poison cap 3, records kept 1 s, entries up to 4 KiB.
pub(crate) fn settings() -> BrokerSettings {
    BrokerSettings {
        max_deliveries: 3,
        result_ttl: Duration::from_secs(1),
        max_entry_bytes: 4096,
        ..BrokerSettings::default()
    }
}

fn task(queue: &str, n: u32) -> Envelope {
    let mut env = Envelope::new("send_whatsapp_message_task", queue);
    env.args = vec![json!(n)];
    env
}

fn nth(env: &Envelope) -> u64 {
    env.args[0].as_u64().unwrap()
}

const NO_WAIT: Duration = Duration::ZERO;

/// Due times are stored rounded up to the millisecond (never early), so "at `at`" is checked
/// one millisecond later.
const MS: Duration = Duration::from_millis(1);

/// The `eta` a record shows for a due time `at`: its delayed-set score (rounded up to the
/// millisecond) in RFC 3339.
fn eta_of(at: SystemTime) -> String {
    super::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(super::due_ms(at)))
}

pub(crate) async fn fifo_with_ids<B: Broker>(b: &B, q: &str) {
    let sent = b
        .enqueue((0..10).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    assert_eq!(sent.len(), 10);
    assert!(sent.iter().all(|e| !e.duplicate && !e.id.is_empty()));
    let got = b.reserve(q, "c1", 100, NO_WAIT).await.unwrap();
    let order: Vec<u64> = got.iter().map(|d| nth(&d.envelope)).collect();
    assert_eq!(order, (0..10).collect::<Vec<u64>>());
    assert_eq!(got[3].envelope.id, sent[3].id);
    assert!(!got[0].envelope.enqueued_at.is_empty());
    assert!(got.iter().all(|d| d.deliveries == 1 && d.queue == q));
}

pub(crate) async fn prefetch_is_bounded<B: Broker>(b: &B, q: &str) {
    b.enqueue((0..10).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    let got = b.reserve(q, "c1", 3, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 3);
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (7, 3));
    b.ack(&got[0], json!(null)).await.unwrap();
    let rest: Vec<_> = got[1..]
        .iter()
        .map(|d| (d.clone(), json!(nth(&d.envelope))))
        .collect();
    b.ack_many(&rest).await.unwrap();
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (7, 0));
    let record = b.record(&got[2].envelope.id).await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.result),
        (TaskState::Succeeded, Some(json!(2)))
    );
}

pub(crate) async fn reserve_waits_for_an_entry<B: Broker>(b: &B, q: &str) {
    let started = Instant::now();
    assert!(
        b.reserve(q, "c1", 5, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(90));
    let started = Instant::now();
    let (got, _) = tokio::join!(b.reserve(q, "c1", 5, Duration::from_secs(5)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.enqueue(vec![task(q, 1)]).await.unwrap()
    });
    assert_eq!(got.unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(2), "woke late");
}

pub(crate) async fn renewed_leases_are_never_recovered<B: Broker>(b: &B, q: &str) {
    let lease = Duration::from_millis(300);
    b.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = b.reserve(q, "c1", 1, NO_WAIT).await.unwrap();
    let entries = vec![got[0].entry.clone()];
    // Held for 3 leases by a live owner renewing every lease/3, while another node sweeps.
    let end = Instant::now() + lease * 3;
    while Instant::now() < end {
        tokio::time::sleep(lease / 3).await;
        assert!(b.renew(q, "c1", &entries).await.unwrap().is_empty());
        assert_eq!(b.recover(q, lease).await.unwrap().requeued, 0);
    }
    assert!(b.reserve(q, "c2", 1, NO_WAIT).await.unwrap().is_empty());
    b.ack(&got[0], json!("done")).await.unwrap();
    assert_eq!(b.depth(q).await.unwrap().in_flight, 0);
}

pub(crate) async fn expired_leases_come_back_to_another_consumer<B: Broker>(b: &B, q: &str) {
    let lease = Duration::from_millis(200);
    let sent = b.enqueue(vec![task(q, 1), task(q, 2)]).await.unwrap();
    let first = b.reserve(q, "dead-node", 2, NO_WAIT).await.unwrap();
    assert_eq!(
        b.recover(q, lease).await.unwrap().requeued,
        0,
        "lease still young"
    );
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let recovered = b.recover(q, lease).await.unwrap();
    assert_eq!((recovered.requeued, recovered.dead), (2, 0));
    // Sweeping twice (or on two nodes) does not duplicate.
    assert_eq!(b.recover(q, lease).await.unwrap().requeued, 0);
    let again = b.reserve(q, "live-node", 5, NO_WAIT).await.unwrap();
    let ids: Vec<&str> = again.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, [sent[0].id.as_str(), sent[1].id.as_str()]);
    assert!(again.iter().all(|d| d.deliveries == 2));
    // The dead node's view: its leases are gone.
    let old: Vec<String> = first.iter().map(|d| d.entry.clone()).collect();
    assert_eq!(b.renew(q, "dead-node", &old).await.unwrap().len(), 2);
}

pub(crate) async fn poison_entries_are_dead_lettered<B: Broker>(b: &B, q: &str) {
    // max_deliveries = 3 in `settings()`.
    let sent = b.enqueue(vec![task(q, 7)]).await.unwrap();
    for delivery in 1..=3 {
        let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
        assert_eq!(got.len(), 1, "delivery {delivery}");
        assert_eq!(got[0].deliveries, delivery);
        let recovered = b.recover(q, Duration::ZERO).await.unwrap();
        if delivery < 3 {
            assert_eq!(recovered.requeued, 1);
        } else {
            assert_eq!(recovered.dead, 1);
            assert_eq!(recovered.dead_tasks, ["send_whatsapp_message_task"]);
        }
    }
    assert!(b.reserve(q, "c", 1, NO_WAIT).await.unwrap().is_empty());
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("delivered 3 times"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, sent[0].id);
    assert_eq!(b.depth(q).await.unwrap().dead, 1);
}

pub(crate) async fn delays_fire_on_time<B: Broker>(b: &B, q: &str) {
    let mut env = task(q, 1);
    env.eta = Some(super::Timestamp::at(
        SystemTime::now() + Duration::from_millis(300),
    ));
    // The eta as written (RFC 3339 with milliseconds) is the due time.
    let due = super::parse_time(env.eta.as_deref().unwrap()).unwrap();
    let started = Instant::now();
    b.enqueue(vec![env, task(q, 2)]).await.unwrap();
    assert_eq!(b.depth(q).await.unwrap().delayed, 1);
    let now_ready = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
    assert_eq!(now_ready.len(), 1, "only the task without eta is ready");
    assert_eq!(nth(&now_ready[0].envelope), 2);
    // The broker actor runs the mover every few milliseconds; do the same here.
    let got = loop {
        b.promote_due(q, SystemTime::now()).await.unwrap();
        let got = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "delayed task never came"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let late = SystemTime::now()
        .duration_since(due)
        .expect("fired before its eta");
    assert!(late < Duration::from_millis(50), "fired {late:?} late");
    assert_eq!(nth(&got[0].envelope), 1);
}

pub(crate) async fn retries_are_delayed_with_the_next_attempt<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    let at = SystemTime::now() + Duration::from_millis(100);
    b.retry(&got[0], at, "zep_call_error: 503").await.unwrap();
    let record = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Retrying);
    assert_eq!(record.error.as_deref(), Some("zep_call_error: 503"));
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.delayed, depth.in_flight), (0, 1, 0));
    assert_eq!(b.promote_due(q, SystemTime::now()).await.unwrap(), 0);
    assert_eq!(b.promote_due(q, at + MS).await.unwrap(), 1);
    let again = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    assert_eq!(again[0].envelope.id, sent[0].id);
    assert_eq!(again[0].envelope.attempt, 1);
    assert_eq!(
        again[0].deliveries, 1,
        "a retry is a new delivery, not a redelivery"
    );
}

pub(crate) async fn deferral_keeps_the_attempt<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    let at = SystemTime::now() + Duration::from_millis(50);
    b.defer(&got[0], at, "breaker zep open").await.unwrap();
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.delayed, depth.in_flight), (0, 1, 0));
    let record = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.attempts, record.eta),
        (TaskState::Scheduled, 0, Some(eta_of(at))),
        "a deferral: scheduled until then, no attempt"
    );
    assert_eq!(b.promote_due(q, at + MS).await.unwrap(), 1);
    let again = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    assert_eq!(again[0].envelope.id, sent[0].id);
    assert_eq!(again[0].envelope.attempt, 0, "no attempt spent");
    let events = b.events(None, 10_000).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "deferred" && e.task_id.as_deref() == Some(sent[0].id.as_str()))
    );
}

pub(crate) async fn idempotent_enqueue_returns_the_first_id<B: Broker>(b: &B, q: &str) {
    let key = format!("{q}:msg-42");
    let mut first = task(q, 1);
    first.idempotency_key = Some(key.clone());
    let mut second = task(q, 2);
    second.idempotency_key = Some(key);
    let a = b.enqueue(vec![first]).await.unwrap();
    let c = b.enqueue(vec![second]).await.unwrap();
    assert!(!a[0].duplicate);
    assert!(c[0].duplicate);
    assert_eq!(a[0].id, c[0].id);
    assert_eq!(b.depth(q).await.unwrap().ready, 1);
}

/// `task(q, n)` with the id `id`, chosen by the producer.
fn chosen(q: &str, id: &str, n: u32) -> Envelope {
    let mut env = task(q, n);
    env.id = id.to_string();
    env
}

fn fresh(id: &str) -> Enqueued {
    Enqueued {
        id: id.to_string(),
        duplicate: false,
    }
}

fn duplicate(id: &str) -> Enqueued {
    Enqueued {
        id: id.to_string(),
        duplicate: true,
    }
}

/// A chosen id (the seed's deterministic `telegram:process:<hash>`) is unique while its task
/// lives — ready, in flight, retried, redelivered — and while its record lasts
/// (`result_ttl`): enqueueing it again is a duplicate, not run again. The task's own retries
/// and redeliveries are not duplicates. Generated ids are never checked.
pub(crate) async fn chosen_ids_are_unique_while_their_task_lives<B: Broker>(b: &B, q: &str) {
    let id = format!("telegram:process:{q}");
    let again = || async { b.enqueue(vec![chosen(q, &id, 9)]).await.unwrap().remove(0) };
    let sent = b
        .enqueue(vec![chosen(q, &id, 1), chosen(q, &id, 2)])
        .await
        .unwrap();
    assert_eq!(
        sent,
        [fresh(&id), duplicate(&id)],
        "the same id twice in a batch"
    );
    assert_eq!(again().await, duplicate(&id), "ready");
    let got = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "the duplicates were not enqueued");
    assert_eq!(
        (got[0].envelope.id.as_str(), nth(&got[0].envelope)),
        (id.as_str(), 1)
    );
    assert_eq!(again().await, duplicate(&id), "in flight");
    b.retry(&got[0], SystemTime::now(), "zep_call_error: 503")
        .await
        .unwrap();
    assert_eq!(again().await, duplicate(&id), "waiting for its retry");
    b.promote_due(q, SystemTime::now() + MS).await.unwrap();
    let retried = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
    assert_eq!((retried.len(), retried[0].envelope.attempt), (1, 1));
    // Its node dies: the entry comes back through lease recovery, the same envelope again.
    assert_eq!(b.recover(q, Duration::ZERO).await.unwrap().requeued, 1);
    assert_eq!(again().await, duplicate(&id), "redelivered");
    let redelivered = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
    assert_eq!(redelivered.len(), 1);
    assert_eq!(
        (
            redelivered[0].envelope.id.as_str(),
            redelivered[0].deliveries
        ),
        (id.as_str(), 2)
    );
    b.ack(&redelivered[0], json!("sent")).await.unwrap();
    assert_eq!(again().await, duplicate(&id), "its record exists");
    assert_eq!(b.depth(q).await.unwrap(), Default::default());
    // result_ttl = 1 s in `settings()`: record gone, id free.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(again().await, fresh(&id));
    assert_eq!(b.depth(q).await.unwrap().ready, 1);
    // Generated ids are UUIDs: never duplicates of each other.
    let generated = b.enqueue(vec![task(q, 1), task(q, 1)]).await.unwrap();
    assert!(generated.iter().all(|e| !e.duplicate));
    assert_eq!(b.depth(q).await.unwrap().ready, 3);
}

/// How the other ways an entry ends or comes back treat its id: a dead-lettered task's id
/// is taken while its record lasts; a requeued dead letter runs again under its id (not a
/// duplicate of itself) and takes it again; a poisoned entry (delivered `max_deliveries`
/// times) keeps it `result_ttl` like any ended task; a purge frees the ids of what it removed.
pub(crate) async fn dead_requeued_poisoned_and_purged_ids<B: Broker>(b: &B, q: &str) {
    let [dead, poison, ready, delayed] =
        ["dead", "poison", "ready", "delayed"].map(|what| format!("{q}:{what}"));
    b.enqueue(vec![chosen(q, &dead, 1)]).await.unwrap();
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    b.dead_letter(&got[0], "permanent: 400").await.unwrap();
    let again = |id: &str| {
        let env = chosen(q, id, 9);
        async move { b.enqueue(vec![env]).await.unwrap().remove(0) }
    };
    assert_eq!(again(&dead).await, duplicate(&dead), "its record exists");
    assert_eq!(b.requeue_dead(q, 10).await.unwrap(), 1);
    assert_eq!(
        again(&dead).await,
        duplicate(&dead),
        "requeued: its entry exists"
    );
    let requeued = b.reserve(q, "c", 5, NO_WAIT).await.unwrap();
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].envelope.id, dead);
    b.ack(&requeued[0], json!(true)).await.unwrap();

    b.enqueue(vec![chosen(q, &poison, 2)]).await.unwrap();
    for _ in 0..3 {
        assert_eq!(b.reserve(q, "c", 5, NO_WAIT).await.unwrap().len(), 1);
        b.recover(q, Duration::ZERO).await.unwrap();
    }
    assert_eq!(b.depth(q).await.unwrap().dead, 1, "poisoned");
    assert_eq!(
        again(&poison).await,
        duplicate(&poison),
        "it ended just now"
    );

    let mut later = chosen(q, &delayed, 3);
    later.eta = Some(super::Timestamp::at(
        SystemTime::now() + Duration::from_secs(60),
    ));
    b.enqueue(vec![chosen(q, &ready, 4), later]).await.unwrap();
    assert_eq!(again(&ready).await, duplicate(&ready));
    assert_eq!(again(&delayed).await, duplicate(&delayed));
    let purged = b.purge(q).await.unwrap();
    assert_eq!((purged.ready, purged.delayed), (1, 1));
    assert_eq!(
        again(&ready).await,
        fresh(&ready),
        "purged: nothing of it is left"
    );
    assert_eq!(again(&delayed).await, fresh(&delayed));

    // result_ttl = 1 s in `settings()`: the ended tasks' ids are free again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(again(&dead).await, fresh(&dead));
    assert_eq!(again(&poison).await, fresh(&poison));
}

/// An id and an idempotency key together: the key is claimed first (taken → the id it
/// holds), then the id (taken → that id); a key claimed by an enqueue that turned out a
/// duplicate of an id holds that id.
pub(crate) async fn ids_and_idempotency_keys_together<B: Broker>(b: &B, q: &str) {
    let with = |id: &str, key: &str| {
        let mut env = chosen(q, id, 1);
        env.idempotency_key = Some(format!("{q}:{key}"));
        env
    };
    let (x, y, z) = (format!("{q}:x"), format!("{q}:y"), format!("{q}:z"));
    assert_eq!(b.enqueue(vec![with(&x, "k1")]).await.unwrap(), [fresh(&x)]);
    assert_eq!(
        b.enqueue(vec![with(&y, "k1"), with(&x, "k2"), with(&z, "k2")])
            .await
            .unwrap(),
        [duplicate(&x), duplicate(&x), duplicate(&x)]
    );
    assert_eq!(b.enqueue(vec![with(&y, "k3")]).await.unwrap(), [fresh(&y)]);
    let got = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, [x.as_str(), y.as_str()]);
}

/// One batch over three queues (on a Redis Cluster, three slots): the answers come in the
/// batch's order, a key repeated within a queue is a duplicate of its first id, each queue
/// delivers its own entries in order, and every record is found by id.
pub(crate) async fn batches_across_queues_are_answered_in_order<B: Broker>(b: &B, q: &str) {
    let queues = [format!("{q}-a"), format!("{q}-b"), format!("{q}-c")];
    let mut batch = Vec::new();
    for n in 0..9u32 {
        let queue = &queues[n as usize % 3];
        let mut env = chosen(queue, &format!("{queue}:{n}"), n);
        if n >= 3 {
            // Each queue's key first comes with envelope 3, 4 or 5, again 3 places later.
            env.idempotency_key = Some(format!("{queue}:key"));
        }
        batch.push(env);
    }
    let answers = b.enqueue(batch).await.unwrap();
    for (n, answer) in answers.iter().enumerate() {
        let queue = &queues[n % 3];
        if n >= 6 {
            assert_eq!(
                *answer,
                duplicate(&format!("{queue}:{}", n - 3)),
                "envelope {n}"
            );
        } else {
            assert_eq!(*answer, fresh(&format!("{queue}:{n}")), "envelope {n}");
        }
    }
    for (i, queue) in queues.iter().enumerate() {
        let got = b.reserve(queue, "c", 10, NO_WAIT).await.unwrap();
        let ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
        assert_eq!(
            ids,
            [format!("{queue}:{i}"), format!("{queue}:{}", i + 3)],
            "{queue}"
        );
        for id in ids {
            let record = b.record(id).await.unwrap().expect("a record");
            assert_eq!(record.queue, *queue);
        }
    }
}

/// Ids are checked at enqueue (the whole batch is refused, naming the rule) and when read from
/// a queue (another producer's entry: dead-lettered as malformed with the reason).
pub(crate) async fn bad_ids_are_refused_or_dead_lettered<B: Broker + RawProducer>(b: &B, q: &str) {
    for (id, why) in [
        (
            "line\nbreak",
            "id: holds a control character (U+000A at byte 4)",
        ),
        (&"x".repeat(300), "id: is 300 bytes, over the limit of 256"),
        (
            "..",
            "id: `..` cannot be read back at GET /tasks/{id} (HTTP clients resolve it away)",
        ),
    ] {
        let err = b
            .enqueue(vec![task(q, 1), chosen(q, id, 2)])
            .await
            .unwrap_err();
        assert!(matches!(err, super::BrokerError::Invalid(_)), "{err:?}");
        assert_eq!(err.to_string(), why);
    }
    assert_eq!(
        b.depth(q).await.unwrap(),
        Default::default(),
        "nothing enqueued"
    );
    // What the rule lets through, ids that need percent-encoding in a URL included.
    let odd = ["a/b", "100%", "with spaces", "привіт ✓", "?x=1#y"];
    let batch = odd
        .iter()
        .enumerate()
        .map(|(n, id)| chosen(q, id, n as u32));
    let sent = b.enqueue(batch.collect()).await.unwrap();
    assert!(sent.iter().all(|e| !e.duplicate));
    let got = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    for d in &got {
        b.ack(d, json!(nth(&d.envelope))).await.unwrap();
    }
    for (n, id) in odd.iter().enumerate() {
        let record = b.record(id).await.unwrap().unwrap();
        assert_eq!((record.id.as_str(), record.result), (*id, Some(json!(n))));
    }

    b.push_raw(
        q,
        &json!({ "id": "bell\u{7}", "task": "t", "queue": q }).to_string(),
    )
    .await;
    b.push_raw(
        q,
        &json!({ "id": "y".repeat(257), "task": "t", "queue": q }).to_string(),
    )
    .await;
    assert!(b.reserve(q, "c", 10, NO_WAIT).await.unwrap().is_empty());
    let dead = b.dead_letters(q, 10).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with(
            "malformed entry: invalid `id`: holds a control character (U+0007 at byte 4)"
        ),
        "{reasons:?}"
    );
    assert!(
        reasons[1]
            .starts_with("malformed entry: invalid `id`: is 257 bytes, over the limit of 256"),
        "{reasons:?}"
    );
}

pub(crate) async fn records_keep_results_for_their_ttl<B: Broker>(b: &B, q: &str) {
    // result_ttl = 1 s in `settings()`.
    let sent = b.enqueue(vec![task(q, 1)]).await.unwrap();
    let queued = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!((queued.state, queued.attempts), (TaskState::Queued, 0));
    // Kept while the task waits, however long: no TTL before its outcome.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(b.record(&sent[0].id).await.unwrap().is_some());
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    b.ack(&got[0], json!({"reply": "hello"})).await.unwrap();
    let record = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(record.result, Some(json!({"reply": "hello"})));
    assert_eq!(
        (record.task.as_str(), record.queue.as_str()),
        ("send_whatsapp_message_task", q)
    );
    assert_eq!(record.attempts, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        b.record(&sent[0].id).await.unwrap().is_none(),
        "record outlived its TTL"
    );
}

pub(crate) async fn dead_letters_can_be_listed_and_requeued<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    b.dead_letter(&got[0], "permanent: 400 bad request")
        .await
        .unwrap();
    let record = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Dead);
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "permanent: 400 bad request");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(b.requeue_dead(q, 10).await.unwrap(), 1);
    assert!(b.dead_letters(q, 10).await.unwrap().is_empty());
    let again = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    assert_eq!(again[0].envelope.id, sent[0].id);
    assert_eq!(again[0].envelope.attempt, 0);
}

/// One dead letter at a time: listed in pages (`after` the last entry of a page, even one
/// that is gone), requeued by its entry id (once: a second requeue finds nothing), deleted;
/// a malformed letter cannot be requeued and stays; entry ids that are not `<ms>-<seq>` are
/// refused before any command; `purge_dead` empties the dead letters and counts them.
pub(crate) async fn single_dead_letters_are_paged_requeued_deleted_and_purged<
    B: Broker + RawProducer,
>(
    b: &B,
    q: &str,
) {
    let sent = b
        .enqueue((0..3).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    b.push_raw(q, "not json at all").await;
    let got = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 3, "the malformed entry is buried, not delivered");
    for delivery in &got {
        b.dead_letter(delivery, "permanent: 400").await.unwrap();
    }
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 4);
    let entries: Vec<&str> = dead.iter().map(|l| l.entry.as_str()).collect();

    // Pages: two, then the rest after the second; nothing after the last.
    let page = b.dead_letters_after(q, None, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|l| l.entry.as_str()).collect::<Vec<_>>(),
        entries[..2]
    );
    let rest = b
        .dead_letters_after(q, Some(&page[1].entry), 10)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|l| l.entry.as_str()).collect::<Vec<_>>(),
        entries[2..]
    );
    assert!(
        b.dead_letters_after(q, Some(entries[3]), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Requeue one by its entry: it runs again under its id, from attempt 0.
    let of = |id: &str| {
        dead.iter()
            .find(|l| l.envelope.as_ref().is_some_and(|e| e.id == id))
            .unwrap()
            .entry
            .clone()
    };
    let second = of(&sent[1].id);
    assert_eq!(
        b.requeue_dead_entry(q, &second).await.unwrap(),
        Some(sent[1].id.clone())
    );
    assert_eq!(
        b.requeue_dead_entry(q, &second).await.unwrap(),
        None,
        "moved once"
    );
    let again = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].envelope.id.as_str(), again[0].envelope.attempt),
        (sent[1].id.as_str(), 0)
    );
    b.ack(&again[0], json!("ok")).await.unwrap();
    // A page may start after an entry that is gone.
    let at = entries.iter().position(|e| *e == second).unwrap();
    let after_gone = b.dead_letters_after(q, Some(&second), 10).await.unwrap();
    assert_eq!(
        after_gone
            .iter()
            .map(|l| l.entry.as_str())
            .collect::<Vec<_>>(),
        entries[at + 1..]
    );

    // The malformed letter stays; it can be deleted.
    let malformed = dead.iter().find(|l| l.raw.is_some()).unwrap().entry.clone();
    match b.requeue_dead_entry(q, &malformed).await {
        Err(BrokerError::Invalid(why)) => assert!(why.contains("not a valid envelope"), "{why}"),
        other => panic!("a malformed letter was requeued: {other:?}"),
    }
    assert!(b.delete_dead(q, &malformed).await.unwrap());
    assert!(!b.delete_dead(q, &malformed).await.unwrap(), "deleted once");
    assert_eq!(b.depth(q).await.unwrap().dead, 2);

    // Entry ids from outside are checked first.
    for bad in [
        "-",
        "+",
        "$",
        ">",
        "1",
        "1-",
        "-1",
        "x-1",
        "1-0 ",
        "99999999999999999999-0",
    ] {
        for result in [
            b.requeue_dead_entry(q, bad).await.map(|_| ()),
            b.delete_dead(q, bad).await.map(|_| ()),
            b.dead_letters_after(q, Some(bad), 1).await.map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(BrokerError::Invalid(_))),
                "{bad}: {result:?}"
            );
        }
    }
    assert_eq!(b.dead_letters(q, 10).await.unwrap().len(), 2);

    // Purge the rest.
    assert_eq!(b.purge_dead(q).await.unwrap(), 2);
    assert!(b.dead_letters(q, 10).await.unwrap().is_empty());
    assert_eq!(b.purge_dead(q).await.unwrap(), 0);
    assert_eq!(b.depth(q).await.unwrap().dead, 0);
    // The records stay: purging dead letters does not forget outcomes.
    let record = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Dead);
}

/// A `sent` event names the trace its task belongs to, and the parent of a sub-task.
pub(crate) async fn sent_events_name_the_trace<B: Broker>(b: &B, q: &str) {
    let root = task(q, 1);
    let mut child = task(q, 2);
    child.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
    child.parent_id = Some("the-parent".into());
    let sent = b.enqueue(vec![root, child]).await.unwrap();
    let events = b.events(None, 10_000).await.unwrap();
    let sent_event = |id: &str| {
        events
            .iter()
            .find(|e| e.kind == "sent" && e.task_id.as_deref() == Some(id))
            .unwrap()
            .detail
            .clone()
    };
    let root = sent_event(&sent[0].id);
    // A new trace: its id is the task id's UUID without dashes.
    assert_eq!(root["trace_id"], sent[0].id.replace('-', ""));
    assert!(root.get("parent_id").is_none(), "{root}");
    assert_eq!(root["eta"], serde_json::Value::Null);
    let child = sent_event(&sent[1].id);
    assert_eq!(child["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(child["parent_id"], "the-parent");
}

pub(crate) async fn purge_removes_ready_and_delayed_only<B: Broker>(b: &B, q: &str) {
    let mut batch: Vec<Envelope> = (0..5).map(|n| task(q, n)).collect();
    for n in 5..7 {
        let mut env = task(q, n);
        env.eta = Some(super::Timestamp::at(
            SystemTime::now() + Duration::from_secs(60),
        ));
        batch.push(env);
    }
    b.enqueue(batch).await.unwrap();
    let running = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    let purged = b.purge(q).await.unwrap();
    assert_eq!((purged.ready, purged.delayed), (4, 2));
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.delayed, depth.in_flight), (0, 0, 1));
    b.ack(&running[0], json!(1)).await.unwrap();
    assert_eq!(b.depth(q).await.unwrap().in_flight, 0);
}

pub(crate) async fn malformed_entries_are_dead_lettered_not_delivered<B: Broker + RawProducer>(
    b: &B,
    q: &str,
) {
    b.push_raw(q, "not json at all").await;
    b.push_raw(q, r#"{"queue":"x"}"#).await;
    b.enqueue(vec![task(q, 1)]).await.unwrap();
    let got = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(nth(&got[0].envelope), 1);
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].raw.as_deref(), Some("not json at all"));
    assert!(
        dead[0].reason.starts_with("malformed entry: expected"),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[1].reason.contains("missing field `task`"),
        "{}",
        dead[1].reason
    );
    // Malformed letters cannot be requeued; they stay for inspection.
    assert_eq!(b.requeue_dead(q, 10).await.unwrap(), 0);
    assert_eq!(b.dead_letters(q, 10).await.unwrap().len(), 2);
}

pub(crate) async fn bad_envelopes_are_refused_whole<B: Broker>(b: &B, q: &str) {
    let mut bad = task(q, 2);
    bad.eta = Some("tomorrow".into());
    let err = b.enqueue(vec![task(q, 1), bad]).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("eta: `tomorrow` is not an RFC 3339 time"),
        "{err}"
    );
    assert_eq!(
        b.depth(q).await.unwrap().ready,
        0,
        "nothing of a refused batch is enqueued"
    );
    let err = b.enqueue(vec![Envelope::new("", q)]).await.unwrap_err();
    assert_eq!(err.to_string(), "task: must not be empty");
}

pub(crate) async fn oversized_entries_are_refused_or_delivered_with_their_size<
    B: Broker + RawProducer,
>(
    b: &B,
    q: &str,
) {
    let limit = settings().max_entry_bytes;
    let mut big = task(q, 2);
    big.kwargs.insert("text".into(), json!("x".repeat(limit)));
    let err = b.enqueue(vec![task(q, 1), big]).await.unwrap_err();
    match &err {
        super::BrokerError::TooLarge {
            index,
            task,
            size,
            limit: cap,
        } => {
            assert_eq!(
                (*index, task.as_str(), *cap),
                (1, "send_whatsapp_message_task", limit)
            );
            assert!(*size > limit, "{size}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(" bytes, over the broker's max_entry_bytes of 4096"),
        "{text}"
    );
    assert_eq!(
        b.depth(q).await.unwrap(),
        Default::default(),
        "nothing enqueued"
    );

    // What another producer wrote is delivered with its size, the consumer's to refuse.
    let sent = b.enqueue(vec![task(q, 3)]).await.unwrap();
    let raw = json!({ "id": "raw-big", "task": "t", "queue": q, "args": ["y".repeat(limit)] })
        .to_string();
    b.push_raw(q, &raw).await;
    let got = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].envelope.id, sent[0].id);
    assert_eq!(got[0].size, got[0].envelope.to_json().len());
    assert!(settings().too_large(got[0].size).is_none());
    assert_eq!(
        (got[1].envelope.id.as_str(), got[1].size),
        ("raw-big", raw.len())
    );
    let reason = settings().too_large(got[1].size).unwrap();
    assert_eq!(
        reason,
        format!(
            "entry too large: {} bytes, over the broker's max_entry_bytes of 4096",
            raw.len()
        )
    );
    b.dead_letter(&got[1], &reason).await.unwrap();
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, reason);
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, "raw-big");
    let record = b.record("raw-big").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.error.as_deref()),
        (TaskState::Dead, Some(reason.as_str()))
    );
}

pub(crate) async fn events_tell_the_life_of_a_task<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1)]).await.unwrap();
    let id = sent[0].id.clone();
    let got = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    let started = super::Event::about("started", &got[0].envelope, json!({ "consumer": "c" }));
    b.publish(started).await.unwrap();
    b.retry(&got[0], SystemTime::now(), "timeout")
        .await
        .unwrap();
    b.promote_due(q, SystemTime::now() + MS).await.unwrap();
    let again = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    b.ack(&again[0], json!(true)).await.unwrap();

    let mine = |events: Vec<super::Event>| -> Vec<super::Event> {
        events
            .into_iter()
            .filter(|e| e.task_id.as_deref() == Some(id.as_str()))
            .collect()
    };
    let all = mine(b.events(None, 10_000).await.unwrap());
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["sent", "started", "retried", "succeeded"]);
    assert_eq!(all[2].detail["error"], "timeout");
    assert_eq!(all[3].queue.as_deref(), Some(q));
    let rest = mine(b.events(Some(&all[1].id), 10_000).await.unwrap());
    let kinds: Vec<&str> = rest.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["retried", "succeeded"]);
}

/// `started` costs no round trip: the start marker and `started` event travel with the
/// attempt's outcome (ahead of it), or are written on their own within `EVENT_FLUSH` when no
/// outcome comes.
pub(crate) async fn soon_events_precede_the_outcome_or_are_flushed<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1), task(q, 2)]).await.unwrap();
    let got = b.reserve(q, "c", 2, NO_WAIT).await.unwrap();
    for delivery in &got {
        b.started(delivery, "c");
    }
    b.ack(&got[0], json!(true)).await.unwrap();
    let kinds_of = |events: &[super::Event], id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.task_id.as_deref() == Some(id))
            .map(|e| e.kind.to_string())
            .collect()
    };
    let all = b.events(None, 10_000).await.unwrap();
    assert_eq!(
        kinds_of(&all, &sent[0].id),
        ["sent", "started", "succeeded"]
    );
    let done = b.record(&sent[0].id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.node.as_deref(), done.attempt),
        (TaskState::Succeeded, Some("c"), Some(0)),
        "the start marker came with the outcome"
    );
    assert!(done.started_at.is_some());
    // The second task, still running, gets its start written on its own within EVENT_FLUSH
    // (with its record saying it runs).
    let deadline = Instant::now() + super::EVENT_FLUSH * 20;
    for id in [&sent[1].id] {
        loop {
            let all = b.events(None, 10_000).await.unwrap();
            let record = b.record(id).await.unwrap().unwrap();
            if kinds_of(&all, id) == ["sent", "started"]
                && (record.state, record.node.as_deref()) == (TaskState::Running, Some("c"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "started never flushed");
            tokio::time::sleep(super::EVENT_FLUSH / 5).await;
        }
    }
}

/// A task that keeps no result (`store_result = false`): its success acks the entry and
/// writes the `succeeded` event like any ack, but leaves no record — whether its start marker
/// travelled with the outcome or was written before it.
pub(crate) async fn unrecorded_acks_leave_no_record<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1), task(q, 2)]).await.unwrap();
    let got = b.reserve(q, "c", 2, NO_WAIT).await.unwrap();
    // The first one's start goes with its outcome; the second's is written first.
    b.started(&got[0], "c");
    b.ack_unrecorded(&got[0]).await.unwrap();
    b.started(&got[1], "c");
    until_state(b, &sent[1].id, TaskState::Running).await;
    b.ack_unrecorded(&got[1]).await.unwrap();
    let events = b.events(None, 10_000).await.unwrap();
    for sent in &sent {
        assert!(
            b.record(&sent.id).await.unwrap().is_none(),
            "no record left"
        );
        let kinds: Vec<&str> = events
            .iter()
            .filter(|e| e.task_id.as_deref() == Some(sent.id.as_str()))
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(kinds, ["sent", "started", "succeeded"]);
    }
    // Nothing comes back later either (a start written after the DEL would make one again).
    tokio::time::sleep(super::EVENT_FLUSH * 3).await;
    assert!(b.record(&sent[0].id).await.unwrap().is_none());
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (0, 0));
}

/// Waits (up to 20 × `EVENT_FLUSH`) until task `id`'s record is in `state`: a start marker
/// is written within `EVENT_FLUSH`.
async fn until_state<B: Broker>(b: &B, id: &str, state: TaskState) -> super::TaskRecord {
    let deadline = Instant::now() + super::EVENT_FLUSH * 20;
    loop {
        let record = b.record(id).await.unwrap().unwrap();
        if record.state == state {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: still {:?}, not {state:?}",
            record.state
        );
        tokio::time::sleep(super::EVENT_FLUSH / 5).await;
    }
}

/// A task's record follows its whole life: `queued` at enqueue (`scheduled` with an eta, and
/// `queued` again once due), `running` once an attempt started, `retrying` with the next
/// attempt's time, `succeeded` or `dead` — and counts attempts as its events do. A start
/// marker that arrives after the outcome (it travels within `EVENT_FLUSH`) changes nothing; a
/// recovered attempt is no longer running; a poisoned task is dead with the reason; a
/// requeued dead letter starts afresh; a purge forgets what it removed.
pub(crate) async fn records_follow_the_life_of_a_task<B: Broker>(b: &B, q: &str) {
    let mut later = task(q, 2);
    let due = SystemTime::now() + Duration::from_millis(300);
    later.eta = Some(super::Timestamp::at(due));
    let sent = b.enqueue(vec![task(q, 1), later]).await.unwrap();
    let (now, soon) = (sent[0].id.clone(), sent[1].id.clone());
    let record = b.record(&now).await.unwrap().unwrap();
    assert_eq!(
        (
            record.state,
            record.attempts,
            record.attempt,
            record.eta.as_deref()
        ),
        (TaskState::Queued, 0, None, None)
    );
    assert!(record.enqueued_at.is_some() && record.started_at.is_none());
    let record = b.record(&soon).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Scheduled);
    assert_eq!(record.eta, Some(super::rfc3339(due)));

    // First attempt: running, then failed and retrying with the time of the next one.
    let got = b.reserve(q, "node-a", 1, NO_WAIT).await.unwrap();
    assert_eq!(
        b.record(&now).await.unwrap().unwrap().state,
        TaskState::Queued,
        "reserved, not started"
    );
    b.started(&got[0], "node-a");
    let running = until_state(b, &now, TaskState::Running).await;
    assert_eq!((running.attempts, running.attempt), (1, Some(0)));
    assert_eq!(running.node.as_deref(), Some("node-a"));
    assert!(running.started_at.is_some());
    let retry_at = SystemTime::now() + Duration::from_millis(100);
    b.retry(&got[0], retry_at, "zep_call_error: 503")
        .await
        .unwrap();
    let retrying = b.record(&now).await.unwrap().unwrap();
    assert_eq!(
        (retrying.state, retrying.attempts, retrying.attempt),
        (TaskState::Retrying, 1, Some(0))
    );
    assert_eq!(retrying.error.as_deref(), Some("zep_call_error: 503"));
    assert_eq!(retrying.eta, Some(eta_of(retry_at)));

    // Second attempt: its node dies; recovered, it waits again (not running).
    b.promote_due(q, retry_at + MS).await.unwrap();
    let again = b.reserve(q, "node-a", 5, NO_WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    b.started(&again[0], "node-a");
    let running = until_state(b, &now, TaskState::Running).await;
    assert_eq!((running.attempts, running.attempt), (2, Some(1)));
    assert_eq!(b.recover(q, Duration::ZERO).await.unwrap().requeued, 1);
    let waiting = b.record(&now).await.unwrap().unwrap();
    assert_eq!(waiting.state, TaskState::Retrying, "recovered: not running");
    let again = b.reserve(q, "node-b", 5, NO_WAIT).await.unwrap();
    b.started(&again[0], "node-b");
    until_state(b, &now, TaskState::Running).await;
    b.ack(&again[0], json!({"reply": "hi"})).await.unwrap();
    // A start marker that comes late changes nothing.
    b.started(&again[0], "node-b");
    tokio::time::sleep(super::EVENT_FLUSH * 3).await;
    let done = b.record(&now).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.result, done.attempts, done.attempt),
        (
            TaskState::Succeeded,
            Some(json!({"reply": "hi"})),
            2,
            Some(1)
        )
    );
    assert_eq!((done.error, done.eta), (None, None));
    assert_eq!(done.node.as_deref(), Some("node-b"));

    // The eta passed: due, it is queued (promoted within the mover's 10 ms).
    tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default() + MS).await;
    assert_eq!(
        b.record(&soon).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    b.promote_due(q, SystemTime::now()).await.unwrap();
    let got = b.reserve(q, "node-a", 5, NO_WAIT).await.unwrap();
    b.started(&got[0], "node-a");
    b.dead_letter(&got[0], "permanent: 400").await.unwrap();
    let dead = b.record(&soon).await.unwrap().unwrap();
    assert_eq!(
        (dead.state, dead.error.as_deref(), dead.attempts),
        (TaskState::Dead, Some("permanent: 400"), 1)
    );
    // The record and the events count the same attempt.
    let events = b.events(None, 10_000).await.unwrap();
    let event = events
        .iter()
        .rfind(|e| e.kind == "dead" && e.task_id.as_deref() == Some(soon.as_str()))
        .unwrap();
    assert_eq!(event.detail["attempt"], json!(dead.attempt.unwrap()));

    // Requeued: afresh.
    assert_eq!(b.requeue_dead(q, 10).await.unwrap(), 1);
    let requeued = b.record(&soon).await.unwrap().unwrap();
    assert_eq!(
        (requeued.state, requeued.attempts, requeued.error),
        (TaskState::Queued, 0, None)
    );
    // Poisoned: delivered max_deliveries (3) times without an ack.
    for _ in 0..3 {
        assert_eq!(b.reserve(q, "c", 5, NO_WAIT).await.unwrap().len(), 1);
        b.recover(q, Duration::ZERO).await.unwrap();
    }
    let poisoned = b.record(&soon).await.unwrap().unwrap();
    assert_eq!(poisoned.state, TaskState::Dead);
    assert!(
        poisoned
            .error
            .as_deref()
            .unwrap()
            .starts_with("delivered 3 times without an ack"),
        "{poisoned:?}"
    );
    // Purged: forgotten.
    let purged = b.enqueue(vec![task(q, 3)]).await.unwrap();
    assert!(b.record(&purged[0].id).await.unwrap().is_some());
    b.purge(q).await.unwrap();
    assert!(b.record(&purged[0].id).await.unwrap().is_none());
}

/// Revoking a task in each state: queued, delayed (an eta, a retry) — its record says
/// dead/revoked at once and a delayed entry is made ready, so a consumer meets it now —,
/// running (the record is left to its node; every node hears of it), unknown (kept, in case it
/// comes), ended (nothing done), revoked already (nothing more). A requeued dead letter is no
/// longer revoked.
pub(crate) async fn revocations_in_every_state<B: Broker>(b: &B, q: &str) {
    use super::Revoked;
    let mut heard = b.revocations();
    let mut later = task(q, 2);
    later.eta = Some(super::Timestamp::at(
        SystemTime::now() + Duration::from_secs(60),
    ));
    let sent = b
        .enqueue(vec![task(q, 1), later, task(q, 3), task(q, 4), task(q, 5)])
        .await
        .unwrap();
    let id = |n: usize| sent[n].id.clone();
    let got = b.reserve(q, "c", 4, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 4);
    let by_n = |n: u64| got.iter().find(|d| nth(&d.envelope) == n).unwrap().clone();
    // Task 3 fails and waits a minute for its retry; task 4 runs; task 5 succeeded.
    b.retry(
        &by_n(3),
        SystemTime::now() + Duration::from_secs(60),
        "timeout",
    )
    .await
    .unwrap();
    b.started(&by_n(4), "c");
    until_state(b, &id(3), TaskState::Running).await;
    b.ack(&by_n(5), json!(5)).await.unwrap();
    let queued = b.enqueue(vec![task(q, 6)]).await.unwrap()[0].id.clone();
    assert_eq!(b.depth(q).await.unwrap().delayed, 2);

    assert_eq!(
        b.revoke(&queued, false).await.unwrap(),
        Revoked::Pending(TaskState::Queued)
    );
    assert_eq!(
        b.revoke(&id(1), false).await.unwrap(),
        Revoked::Pending(TaskState::Scheduled)
    );
    assert_eq!(
        b.revoke(&id(2), false).await.unwrap(),
        Revoked::Pending(TaskState::Retrying)
    );
    for revoked in [&queued, &id(1), &id(2)] {
        let record = b.record(revoked).await.unwrap().unwrap();
        assert_eq!(
            (record.state, record.error.as_deref()),
            (TaskState::Dead, Some("revoked")),
            "{revoked}"
        );
        assert!(b.is_revoked(revoked));
    }
    let depth = b.depth(q).await.unwrap();
    assert_eq!(
        (depth.ready, depth.delayed),
        (3, 0),
        "the delayed ones are ready now"
    );
    assert_eq!(b.revoke(&id(3), true).await.unwrap(), Revoked::Running);
    assert_eq!(
        b.record(&id(3)).await.unwrap().unwrap().state,
        TaskState::Running,
        "left to the node running it"
    );
    assert_eq!(
        b.revoke(&id(4), false).await.unwrap(),
        Revoked::Ended(TaskState::Succeeded)
    );
    assert!(!b.is_revoked(&id(4)), "nothing done");
    assert_eq!(
        b.revoke(&queued, true).await.unwrap(),
        Revoked::AlreadyRevoked
    );
    let unknown = format!("{q}:not-yet");
    assert_eq!(b.revoke(&unknown, false).await.unwrap(), Revoked::Unknown);
    assert!(b.is_revoked(&unknown));
    assert!(!b.is_revoked(&id(0)));

    // Every revocation was told, with its terminate flag.
    let mut told = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while told.len() < 5 {
        match tokio::time::timeout(Duration::from_millis(100), heard.recv()).await {
            Ok(Ok(revocation)) => {
                if !told.contains(&revocation) {
                    told.push(revocation);
                }
            }
            _ => assert!(Instant::now() < deadline, "told only {told:?}"),
        }
    }
    let running = told.iter().find(|r| r.id == id(3)).unwrap();
    assert!(running.terminate);
    assert!(told.iter().any(|r| r.id == unknown && !r.terminate));

    // The consumer that meets a revoked entry dead-letters it; requeued, it may run again.
    let met = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(met.len(), 3);
    for delivery in &met {
        assert!(b.is_revoked(&delivery.envelope.id));
        b.dead_letter(delivery, "revoked").await.unwrap();
    }
    // Dead-lettered without running: no attempt counted (the retried one ran once).
    let never = b.record(&queued).await.unwrap().unwrap();
    assert_eq!((never.attempts, never.attempt), (0, None));
    assert_eq!(b.record(&id(2)).await.unwrap().unwrap().attempts, 1);
    assert_eq!(b.requeue_dead(q, 1).await.unwrap(), 1);
    let again = b.reserve(q, "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(!b.is_revoked(&again[0].envelope.id), "requeued on purpose");
    let record = b.record(&again[0].envelope.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Queued);
}

/// With `events_maxlen = 0` (`[events] enabled = false`) a task's whole life — sent, started,
/// retried, succeeded, and a dead letter — writes no event; the tasks themselves are unchanged.
/// Not part of [`contract_suite!`]: it needs a broker built with those settings.
pub(crate) async fn events_off_write_nothing<B: Broker>(b: &B, q: &str) {
    assert_eq!(
        b.enqueue(vec![task(q, 1), task(q, 2)]).await.unwrap().len(),
        2
    );
    let got = b.reserve(q, "c", 2, NO_WAIT).await.unwrap();
    let started = super::Event::about("started", &got[0].envelope, json!({ "consumer": "c" }));
    b.publish(started).await.unwrap();
    b.started(&got[0], "c");
    b.retry(&got[0], SystemTime::now(), "timeout")
        .await
        .unwrap();
    b.dead_letter(&got[1], "ValueError: bad phone number")
        .await
        .unwrap();
    b.promote_due(q, SystemTime::now() + MS).await.unwrap();
    let again = b.reserve(q, "c", 1, NO_WAIT).await.unwrap();
    assert_eq!(again[0].envelope.attempt, 1);
    b.ack(&again[0], json!(true)).await.unwrap();
    let record = b.record(&again[0].envelope.id).await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Succeeded);
    assert_eq!(b.dead_letters(q, 10).await.unwrap().len(), 1);
    assert!(b.events(None, 100).await.unwrap().is_empty());
    assert!(b.events_before(None, 100).await.unwrap().is_empty());
}

pub(crate) async fn events_page_forwards_and_backwards<B: Broker>(b: &B, q: &str) {
    assert!(b.events_before(None, 5).await.unwrap().is_empty());
    for n in 0..5 {
        let event = super::Event::new("actor_restarted", json!({ "n": n, "queue": q }));
        b.publish(event).await.unwrap();
    }
    let all = b.events(None, 100).await.unwrap();
    let ns: Vec<u64> = all
        .iter()
        .map(|e| e.detail["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [0, 1, 2, 3, 4]);
    assert_eq!(all[0].task_id, None);
    let newest = b.events_before(None, 1).await.unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].id, all[4].id);
    let page = b.events_before(None, 2).await.unwrap();
    assert_eq!(page, all[3..].to_vec(), "oldest first");
    let page = b.events_before(Some(&all[3].id), 2).await.unwrap();
    assert_eq!(page, all[1..3].to_vec());
    let page = b.events_before(Some(&all[1].id), 10).await.unwrap();
    assert_eq!(page, all[..1].to_vec());
    assert!(b.events(Some(&all[4].id), 10).await.unwrap().is_empty());
    assert_eq!(b.events(Some("0"), 2).await.unwrap(), all[..2].to_vec());
    assert_eq!(
        b.events(Some(&all[1].id), 2).await.unwrap(),
        all[2..4].to_vec()
    );
}

/// Paging the events one at a time, forwards and then backwards from the newest, meets every
/// event once, in order — also where one stream entry holds two events (Redis: an attempt's
/// start written with its outcome); every id is a cursor of its own.
pub(crate) async fn events_page_one_at_a_time_through_merged_starts<B: Broker>(b: &B, q: &str) {
    let sent = b.enqueue(vec![task(q, 1), task(q, 2)]).await.unwrap();
    let got = b.reserve(q, "c", 2, NO_WAIT).await.unwrap();
    for delivery in &got {
        b.started(delivery, "c");
        b.ack(delivery, json!(true)).await.unwrap();
    }
    let mine = |events: Vec<super::Event>| -> Vec<super::Event> {
        events
            .into_iter()
            .filter(|e| e.queue.as_deref() == Some(q))
            .collect()
    };
    let all = mine(b.events(None, 10_000).await.unwrap());
    let life: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e.kind.as_str(), e.task_id.as_deref().unwrap_or_default()))
        .collect();
    let (one, two) = (sent[0].id.as_str(), sent[1].id.as_str());
    assert_eq!(
        life,
        [
            ("sent", one),
            ("sent", two),
            ("started", one),
            ("succeeded", one),
            ("started", two),
            ("succeeded", two)
        ]
    );
    let ids: std::collections::HashSet<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "every id is its own: {all:?}");
    let (mut forward, mut at) = (Vec::new(), None::<String>);
    while let Some(event) = b.events(at.as_deref(), 1).await.unwrap().pop() {
        at = Some(event.id.clone());
        forward.push(event);
    }
    assert_eq!(mine(forward), all);
    let (mut backward, mut at) = (Vec::new(), None::<String>);
    while let Some(event) = b.events_before(at.as_deref(), 1).await.unwrap().pop() {
        at = Some(event.id.clone());
        backward.push(event);
    }
    backward.reverse();
    assert_eq!(mine(backward), all);
}

pub(crate) async fn handed_back_entries_are_ready_at_once<B: Broker>(b: &B, q: &str) {
    let sent = b
        .enqueue((0..4).map(|n| task(q, n)).collect())
        .await
        .unwrap();
    let got = b.reserve(q, "leaving", 4, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 4);
    // It started the first; the other three waited. Another consumer's entries are not its.
    let waiting: Vec<String> = got[1..].iter().map(|d| d.entry.clone()).collect();
    assert_eq!(b.hand_back(q, "someone-else", &waiting).await.unwrap(), 0);
    assert_eq!(b.hand_back(q, "leaving", &waiting).await.unwrap(), 3);
    let depth = b.depth(q).await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (3, 1), "{depth:?}");
    // Twice is harmless: they are no longer its.
    assert_eq!(b.hand_back(q, "leaving", &waiting).await.unwrap(), 0);
    let again = b.reserve(q, "staying", 10, NO_WAIT).await.unwrap();
    let ids: Vec<&str> = again.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(
        ids,
        [&sent[1].id, &sent[2].id, &sent[3].id].map(String::as_str)
    );
    // Not counted as a delivery: they never ran.
    assert!(again.iter().all(|d| d.deliveries == 1));
    // The leaving consumer no longer holds them; the one it started it still does.
    assert_eq!(b.renew(q, "leaving", &waiting).await.unwrap().len(), 3);
    assert!(
        b.renew(q, "leaving", std::slice::from_ref(&got[0].entry))
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn one_beat_leader_at_a_time<B: Broker>(b: &B, _q: &str) {
    let lease = Duration::from_millis(300);
    assert_eq!(b.claim_leadership("node-a", lease).await.unwrap(), "node-a");
    assert_eq!(b.claim_leadership("node-b", lease).await.unwrap(), "node-a");
    // Renewed by its holder every lease/3: never taken over.
    for _ in 0..4 {
        tokio::time::sleep(lease / 3).await;
        assert_eq!(b.claim_leadership("node-a", lease).await.unwrap(), "node-a");
        assert_eq!(b.claim_leadership("node-b", lease).await.unwrap(), "node-a");
    }
    // The holder stops renewing: another node takes over after one lease.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    assert_eq!(b.claim_leadership("node-b", lease).await.unwrap(), "node-b");
    assert_eq!(b.claim_leadership("node-a", lease).await.unwrap(), "node-b");
    // Resigning frees it at once, and only its holder can.
    assert!(!b.resign_leadership("node-a").await.unwrap());
    assert!(b.resign_leadership("node-b").await.unwrap());
    assert_eq!(b.claim_leadership("node-a", lease).await.unwrap(), "node-a");
}

pub(crate) async fn last_runs_and_presence_records<B: Broker>(b: &B, _q: &str) {
    assert!(b.last_runs().await.unwrap().is_empty());
    let run = |due_ms| LastRun {
        due_ms,
        task_id: format!("t-{due_ms}"),
        node: "node-a".into(),
    };
    b.record_run("health_check", &run(1000)).await.unwrap();
    b.record_run("health_check", &run(2000)).await.unwrap();
    b.record_run("sweep", &run(3000)).await.unwrap();
    let runs = b.last_runs().await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs["health_check"], run(2000));

    let record = |name: &str| NodeRecord {
        name: name.into(),
        queues: vec!["chat".into()],
        in_flight: [("chat".to_string(), 2)].into_iter().collect(),
        started_at: "2026-11-23T15:00:00.000Z".into(),
        last_seen: "2026-11-23T15:00:01.000Z".into(),
        state: if name == "node-a" {
            NodeState::Stopping
        } else {
            NodeState::Running
        },
        state_since: (name == "node-a").then(|| "2026-11-23T15:00:01.000Z".into()),
    };
    let ttl = Duration::from_millis(300);
    b.announce_node(&record("node-b"), ttl).await.unwrap();
    b.announce_node(&record("node-a"), Duration::from_secs(60))
        .await
        .unwrap();
    b.announce_node(&record("node-c"), Duration::from_secs(60))
        .await
        .unwrap();
    let names = |nodes: Vec<NodeRecord>| nodes.into_iter().map(|n| n.name).collect::<Vec<_>>();
    assert_eq!(
        names(b.nodes().await.unwrap()),
        ["node-a", "node-b", "node-c"]
    );
    assert_eq!(b.nodes().await.unwrap()[0], record("node-a"));
    // node-b stops writing: gone after its TTL; node-c leaves cleanly: gone at once.
    b.forget_node("node-c").await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert_eq!(names(b.nodes().await.unwrap()), ["node-a"]);
}

/// Instantiates every property as a `#[tokio::test]` for the broker `$make` builds (an async
/// expression evaluated once per test).
macro_rules! contract_suite {
    ($make:expr $(=> $field:ident)?) => {
        contract_suite!(@each [$make $(=> $field)?];
            fifo_with_ids, prefetch_is_bounded, reserve_waits_for_an_entry,
            renewed_leases_are_never_recovered, expired_leases_come_back_to_another_consumer,
            poison_entries_are_dead_lettered, delays_fire_on_time,
            retries_are_delayed_with_the_next_attempt, deferral_keeps_the_attempt,
            idempotent_enqueue_returns_the_first_id,
            chosen_ids_are_unique_while_their_task_lives, dead_requeued_poisoned_and_purged_ids,
            ids_and_idempotency_keys_together, batches_across_queues_are_answered_in_order,
            bad_ids_are_refused_or_dead_lettered,
            records_keep_results_for_their_ttl, dead_letters_can_be_listed_and_requeued,
            purge_removes_ready_and_delayed_only, malformed_entries_are_dead_lettered_not_delivered,
            single_dead_letters_are_paged_requeued_deleted_and_purged, sent_events_name_the_trace,
            bad_envelopes_are_refused_whole,
            oversized_entries_are_refused_or_delivered_with_their_size,
            events_tell_the_life_of_a_task, soon_events_precede_the_outcome_or_are_flushed,
            unrecorded_acks_leave_no_record,
            records_follow_the_life_of_a_task, revocations_in_every_state,
            events_page_forwards_and_backwards, events_page_one_at_a_time_through_merged_starts,
            handed_back_entries_are_ready_at_once,
            one_beat_leader_at_a_time, last_runs_and_presence_records);
    };
    (@each [$make:expr]; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let broker = $make.await;
                let queue = format!("{}-{}", stringify!($name), uuid::Uuid::new_v4().simple());
                $crate::broker::contract::$name(&broker, &queue).await;
            }
        )*
    };
    // `$make` holds the broker in `$field` (and keeps what it needs alive: a redis-server).
    (@each [$make:expr => $field:ident]; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let made = $make.await;
                let queue = format!("{}-{}", stringify!($name), uuid::Uuid::new_v4().simple());
                $crate::broker::contract::$name(&made.$field, &queue).await;
            }
        )*
    };
}
pub(crate) use contract_suite;
