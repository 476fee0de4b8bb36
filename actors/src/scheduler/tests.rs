//! Due times, jitter and the missed-run policy as pure functions; leadership (acquire, renew,
//! takeover after a kill, resign) and firing through real actors on the memory broker, the
//! lease under paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use croner::parser::{CronParser, Seconds};

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::broker::{BrokerSettings, LastRun, epoch_ms};
use crate::supervisor::{ChildSpec, Restart, SupervisorMessage, quick_restarts, start_root};
use crate::tree::{Status, Tree};

fn at_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn at(rfc3339: &str) -> SystemTime {
    crate::broker::parse_time(rfc3339).unwrap()
}

fn cron(expression: &str, timezone: chrono_tz::Tz) -> Trigger {
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(expression)
        .unwrap();
    Trigger::Cron {
        expression: expression.into(),
        cron: Box::new(cron),
        timezone,
    }
}

#[test]
fn every_is_aligned_to_the_epoch_so_every_node_agrees() {
    let every = Trigger::Every(Duration::from_secs(1));
    assert_eq!(every.next_after(at_ms(1_234)), Some(at_ms(2_000)));
    assert_eq!(
        every.next_after(at_ms(2_000)),
        Some(at_ms(3_000)),
        "strictly after"
    );
    assert_eq!(every.latest_at_or_before(at_ms(2_000)), Some(at_ms(2_000)));
    assert_eq!(every.latest_at_or_before(at_ms(2_999)), Some(at_ms(2_000)));
    let five = Trigger::Every(Duration::from_secs(300));
    assert_eq!(
        five.next_after(at("2026-11-23T15:03:10.5Z")),
        Some(at("2026-11-23T15:05:00Z"))
    );
    assert_eq!(
        five.latest_at_or_before(at("2026-11-23T15:03:10.5Z")),
        Some(at("2026-11-23T15:00:00Z"))
    );
    assert_eq!(
        idempotency_key("health", at("2026-11-23T15:05:00Z")),
        format!("beat:health:{}", epoch_ms(at("2026-11-23T15:05:00Z")))
    );
}

#[test]
fn cron_is_read_in_its_time_zone() {
    // 02:00 in Istanbul (UTC+3) is 23:00 UTC the day before.
    let nightly = cron("0 2 * * *", chrono_tz::Europe::Istanbul);
    assert_eq!(
        nightly.next_after(at("2026-11-23T12:00:00Z")),
        Some(at("2026-11-23T23:00:00Z"))
    );
    assert_eq!(
        nightly.next_after(at("2026-11-23T23:00:00Z")),
        Some(at("2026-11-24T23:00:00Z"))
    );
    assert_eq!(
        nightly.latest_at_or_before(at("2026-11-23T12:00:00Z")),
        Some(at("2026-11-22T23:00:00Z"))
    );
    assert_eq!(
        nightly.latest_at_or_before(at("2026-11-23T23:00:00Z")),
        Some(at("2026-11-23T23:00:00Z"))
    );
    let quarter = cron("*/15 * * * *", chrono_tz::UTC);
    assert_eq!(
        quarter.next_after(at("2026-11-23T15:07:00Z")),
        Some(at("2026-11-23T15:15:00Z"))
    );
}

#[test]
fn jitter_delays_within_its_bound_and_never_moves_the_due_time() {
    let due = at("2026-11-23T15:00:00Z");
    let jitter = Duration::from_millis(500);
    let mut rng = rand::rng();
    let starts: Vec<SystemTime> = (0..2_000)
        .map(|_| jittered(due, Some(jitter), &mut rng))
        .collect();
    assert!(starts.iter().all(|s| *s >= due && *s <= due + jitter));
    let spread = starts
        .iter()
        .max()
        .unwrap()
        .duration_since(*starts.iter().min().unwrap())
        .unwrap();
    assert!(spread > Duration::from_millis(400), "{spread:?}");
    assert_eq!(jittered(due, None, &mut rng), due);
    assert_eq!(jittered(due, Some(Duration::ZERO), &mut rng), due);
}

#[test]
fn missed_runs_are_skipped_or_run_once_on_takeover() {
    let every = Trigger::Every(Duration::from_secs(60));
    let now = at("2026-11-23T15:10:30Z");
    let last = Some(epoch_ms(at("2026-11-23T15:05:00Z")));
    // Five due times passed while nobody led.
    assert_eq!(
        first_due_on_takeover(&every, Missed::Skip, last, now),
        Some(at("2026-11-23T15:11:00Z"))
    );
    assert_eq!(
        first_due_on_takeover(&every, Missed::RunOnce, last, now),
        Some(at("2026-11-23T15:10:00Z")),
        "one run, for the latest missed due time"
    );
    // Nothing missed: the old leader fired the latest due time.
    let fresh = Some(epoch_ms(at("2026-11-23T15:10:00Z")));
    assert_eq!(
        first_due_on_takeover(&every, Missed::RunOnce, fresh, now),
        Some(at("2026-11-23T15:11:00Z"))
    );
    // Never ran: nothing to replay.
    assert_eq!(
        first_due_on_takeover(&every, Missed::RunOnce, None, now),
        Some(at("2026-11-23T15:11:00Z"))
    );
}

fn memory() -> Arc<AnyBroker> {
    Arc::new(AnyBroker::Memory(MemoryBroker::new(
        BrokerSettings::default(),
    )))
}

fn schedule(name: &str, every: Duration, missed: Missed) -> Schedule {
    Schedule {
        name: name.into(),
        task: "health_check".into(),
        queue: "default".into(),
        args: vec![],
        kwargs: Map::new(),
        trigger: Trigger::Every(every),
        jitter: None,
        missed,
    }
}

async fn start(
    broker: &Arc<AnyBroker>,
    node_name: &str,
    lease: Duration,
    schedules: Vec<Schedule>,
) -> (Arc<Tree>, ActorRef<SupervisorMessage>) {
    let tree = Tree::new();
    let broker = Arc::clone(broker);
    let node_name = node_name.to_string();
    let child = ChildSpec::new("scheduler", "scheduler", Restart::Temporary, move |node| {
        let args = SchedulerArgs {
            node,
            broker: Arc::clone(&broker),
            node_name: node_name.clone(),
            lease,
            tick: Duration::from_millis(10),
            schedules: schedules.clone(),
        };
        (SchedulerActor, args)
    });
    let (root, _) = start_root(&tree, "root", quick_restarts(vec![child]))
        .await
        .unwrap();
    (tree, root)
}

fn role(tree: &Tree) -> String {
    tree.get("root/scheduler")
        .map(|s| s.snapshot["role"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn one_leader_renews_its_lease_and_another_takes_over_within_one_lease() {
    let broker = memory();
    let lease = Duration::from_secs(3);
    let hourly = vec![schedule("hourly", Duration::from_secs(3600), Missed::Skip)];
    let (a, root_a) = start(&broker, "node-a", lease, hourly.clone()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (b, root_b) = start(&broker, "node-b", lease, hourly).await;
    // Ten leases later node-a still leads: its renewals keep the lease.
    for _ in 0..30 {
        tokio::time::sleep(lease / 3).await;
        assert_eq!(
            broker.claim_leadership("probe", lease).await.unwrap(),
            "node-a"
        );
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(role(&a), "leader");
    assert_eq!(role(&b), "follower");
    assert_eq!(
        b.get("root/scheduler").unwrap().snapshot["holder"],
        "node-a"
    );

    // node-a dies without resigning: node-b leads within one lease (+ one follower round).
    let killed = tokio::time::Instant::now();
    a.cell("root/scheduler").unwrap().kill();
    // (Watched through node-b's snapshot, published as soon as its role changes: a probing
    // claim would take the free lease itself.)
    while role(&b) != "leader" {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(killed.elapsed() < lease * 3, "no takeover");
    }
    let took = killed.elapsed();
    assert!(
        took <= lease + lease / 10 + Duration::from_millis(50),
        "{took:?}"
    );

    // A clean stop resigns: another claimant gets the lease at once.
    b.cell("root/scheduler").unwrap().stop(None);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if b.get("root/scheduler")
            .is_none_or(|s| s.status != Status::Running)
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        broker.claim_leadership("probe", lease).await.unwrap(),
        "probe"
    );
    root_a.stop(None);
    root_b.stop(None);
}

#[tokio::test]
async fn the_leader_fires_each_due_time_once_with_its_idempotency_key() {
    let broker = memory();
    let every = Duration::from_millis(100);
    let tick = vec![schedule("tick", every, Missed::Skip)];
    let (a, root_a) = start(&broker, "node-a", Duration::from_secs(2), tick.clone()).await;
    let (_b, root_b) = start(&broker, "node-b", Duration::from_secs(2), tick).await;
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let got = broker
        .reserve("default", "probe", 1_000, Duration::ZERO)
        .await
        .unwrap();
    let mut dues: Vec<u64> = got
        .iter()
        .map(|d| {
            let key = d.envelope.idempotency_key.as_deref().unwrap();
            key.strip_prefix("beat:tick:").unwrap().parse().unwrap()
        })
        .collect();
    assert!((9..=11).contains(&dues.len()), "{dues:?}");
    dues.sort_unstable();
    assert!(
        dues.windows(2).all(|w| w[1] - w[0] == 100),
        "consecutive: {dues:?}"
    );
    assert!(dues.iter().all(|d| d % 100 == 0), "aligned: {dues:?}");
    let runs = broker.last_runs().await.unwrap();
    assert_eq!(runs["tick"].node, "node-a");
    assert!(runs["tick"].due_ms >= *dues.last().unwrap());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let snapshot = a.get("root/scheduler").unwrap().snapshot;
    assert_eq!(snapshot["role"], "leader");
    assert_eq!(snapshot["schedules"][0]["name"], "tick");
    assert!(snapshot["schedules"][0]["last_run"]["task_id"].is_string());
    assert!(snapshot["schedules"][0]["next_due"].is_string());
    root_a.stop(None);
    root_b.stop(None);
}

#[tokio::test]
async fn a_new_leader_runs_a_missed_schedule_once_or_skips_it() {
    let broker = memory();
    let hour = Duration::from_secs(3600);
    let latest = Trigger::Every(hour)
        .latest_at_or_before(SystemTime::now())
        .unwrap();
    // Both last ran three hours before the latest due time: three runs were missed.
    for name in ["catch_up", "skip_it"] {
        let run = LastRun {
            due_ms: epoch_ms(latest) - 3 * 3_600_000,
            task_id: "old".into(),
            node: "gone".into(),
        };
        broker.record_run(name, &run).await.unwrap();
    }
    let schedules = vec![
        schedule("catch_up", hour, Missed::RunOnce),
        schedule("skip_it", hour, Missed::Skip),
    ];
    let (_a, root) = start(&broker, "node-a", Duration::from_secs(2), schedules).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = broker
        .reserve("default", "probe", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "one run, not three, and none for skip_it");
    assert_eq!(
        got[0].envelope.idempotency_key.as_deref(),
        Some(idempotency_key("catch_up", latest).as_str())
    );
    let runs = broker.last_runs().await.unwrap();
    assert_eq!(runs["catch_up"].due_ms, epoch_ms(latest));
    assert_eq!(runs["skip_it"].task_id, "old");
    root.stop(None);
}
