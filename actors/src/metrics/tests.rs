use super::*;
use crate::broker::TaskQueue;
use crate::broker::memory::MemoryBroker;
use crate::broker::{BrokerSettings, rfc3339};
use std::time::SystemTime;

fn memory() -> AnyBroker {
    AnyBroker::Memory(MemoryBroker::new(BrokerSettings::default()))
}

fn metrics() -> Metrics {
    Metrics::new(
        [("process_chat_message", "chat"), ("rt_noop", "default")],
        ["chat", "default"],
    )
}

/// The value of the sample `name{labels}` (labels as written, in order), if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|value| value.parse().expect("a number"))
}

#[tokio::test]
async fn no_task_id_reaches_the_labels() {
    let metrics = metrics();
    let broker = memory();
    let mut ids = Vec::new();
    for n in 0..20 {
        let (task, queue) = match n % 4 {
            0 => ("process_chat_message", "chat"),
            1 => ("rt_noop", "default"),
            2 => ("not_configured", "chat"),
            _ => ("rt_noop", "some-other-queue"),
        };
        let mut envelope = Envelope::new(task, queue);
        envelope.id = uuid::Uuid::new_v4().to_string();
        envelope.enqueued_at = rfc3339(SystemTime::now());
        ids.push(envelope.id.clone());
        let counting = metrics.enqueuing(std::slice::from_ref(&envelope));
        counting.done(&[Enqueued {
            id: envelope.id.clone(),
            duplicate: false,
        }]);
        let series = metrics.series(metrics.task(&envelope.task, &envelope.queue).unwrap());
        series.started();
        series.waited(envelope.first_wait(SystemTime::now()).unwrap());
        series.ran(Duration::from_millis(3), n % 2 == 0);
        series.dead_lettered(DeadReason::Failed);
    }
    metrics.actor_restarted("root/queues/chat", "consumer");
    let text = metrics.render(&broker).await.unwrap();
    for id in &ids {
        assert!(!text.contains(id.as_str()), "task id {id} in:\n{text}");
    }
    // Names outside the configured sets are folded into `unknown`.
    assert!(!text.contains("not_configured"), "{text}");
    assert!(!text.contains("some-other-queue"), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"rt_tasks_started_total{task="unknown",queue="chat"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"rt_tasks_enqueued_total{task="rt_noop",queue="unknown"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"rt_task_duration_seconds_count{task="process_chat_message",queue="chat"}"#
        ),
        Some(5.0)
    );
}

#[tokio::test]
async fn duplicates_are_not_counted_as_enqueued_and_depths_are_read_at_scrape() {
    let metrics = metrics();
    let broker = memory();
    let batch = vec![Envelope::new("rt_noop", "default"); 3];
    let counting = metrics.enqueuing(&batch);
    let answers = broker.enqueue(batch).await.unwrap();
    let mut answers = answers;
    answers[1].duplicate = true;
    counting.done(&answers);
    // A configured task on another configured queue gets its own series on first use.
    let elsewhere = metrics.task("rt_noop", "chat").unwrap();
    assert_ne!(Some(elsewhere), metrics.task("rt_noop", "default"));
    metrics.series(elsewhere).started();
    // Poison messages found by the recovery sweep, by their task names.
    metrics.poisoned("chat", &["process_chat_message".into(), "gone_task".into()]);
    let text = metrics.render(&broker).await.unwrap();
    assert_eq!(
        sample(
            &text,
            r#"rt_tasks_enqueued_total{task="rt_noop",queue="default"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"rt_tasks_started_total{task="rt_noop",queue="chat"}"#
        ),
        Some(1.0)
    );
    let poison = |task: &str| {
        let series = format!(
            r#"rt_tasks_dead_lettered_total{{task="{task}",queue="chat",reason="poison"}}"#
        );
        sample(&text, &series)
    };
    assert_eq!(poison("process_chat_message"), Some(1.0));
    assert_eq!(poison("unknown"), Some(1.0));
    assert_eq!(
        sample(&text, r#"rt_queue_depth{queue="default",state="ready"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, r#"rt_queue_depth{queue="chat",state="ready"}"#),
        Some(0.0)
    );
    assert_eq!(sample(&text, "rt_broker_connected"), Some(1.0));
    assert!(
        text.contains("# TYPE rt_tasks_enqueued_total counter"),
        "{text}"
    );
}

#[tokio::test]
async fn the_wait_is_observed_for_first_attempts_only() {
    let metrics = metrics();
    let series = metrics.series(metrics.task("rt_noop", "default").unwrap());
    let mut envelope = Envelope::new("rt_noop", "default");
    envelope.enqueued_at = rfc3339(SystemTime::now() - Duration::from_millis(40));
    // What the task actor does as an attempt starts: a retry has no first wait.
    let start = |envelope: &Envelope| {
        if let Some(wait) = envelope.first_wait(SystemTime::now()) {
            series.waited(wait);
        }
    };
    start(&envelope);
    envelope.attempt = 1;
    start(&envelope);
    let text = metrics.render(&memory()).await.unwrap();
    let wait = |what: &str| {
        sample(
            &text,
            &format!(r#"rt_task_wait_seconds_{what}{{task="rt_noop",queue="default"}}"#),
        )
    };
    assert_eq!(wait("count"), Some(1.0));
    let sum = wait("sum").unwrap();
    assert!((0.039..1.0).contains(&sum), "{sum}");
}

#[tokio::test]
async fn disabled_metrics_record_and_render_nothing() {
    let metrics = Metrics::disabled();
    assert!(metrics.task("rt_noop", "default").is_none());
    assert!(metrics.consumer("default").is_none());
    metrics.actor_restarted("root/heartbeat", "heartbeat");
    assert!(metrics.render(&memory()).await.is_none());
}
