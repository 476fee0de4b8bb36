//! On a Redis Cluster (3 masters + 3 replicas on loopback, from the harness): a master killed
//! under load is replaced by its replica and the node carries on by itself; with replicated
//! acknowledgement (`broker.ack_replicas = 1`) no task it acknowledged is lost.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::Node;
use actors::test_util::RedisCluster;
use serde_json::json;
use tokio::time::Instant;

const CONFIG: &str = r#"
[runtime]
shutdown_grace = "5s"
[http]
bind = "127.0.0.1:0"
[broker]
lease = "3s"
ack_replicas = ACK
ack_replicas_timeout = "2s"
[queues.chat]
concurrency = 8
[queues.default]
concurrency = 8
[tasks.rt_echo]
queue = "chat"
handler = { kind = "native" }
[tasks.rt_sleep]
queue = "default"
handler = { kind = "native" }
"#;

/// With replicated acknowledgement: every task the node answered 202 for ends `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_no_acknowledged_task_is_lost() {
    let (acknowledged, lost, log) = failover(1).await;
    assert!(acknowledged > 100, "too few enqueued: {acknowledged}");
    assert!(
        lost.is_empty(),
        "lost {} acknowledged tasks: {:?}\n{log}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Without it (the default) the node recovers all the same; what a failover lost is counted
/// (replication is asynchronous: an acknowledged enqueue the replica had not received is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicated_acknowledgement_a_failover_is_survived_and_its_losses_counted() {
    let (acknowledged, lost, _) = failover(0).await;
    assert!(acknowledged > 100, "too few enqueued: {acknowledged}");
    eprintln!(
        "failover without ack_replicas: lost {} of {acknowledged}",
        lost.len()
    );
}

/// Enqueues for 8 s (one POST at a time, alternating queues); 1.5 s in, the master of the
/// `chat` queue's slot is killed. Checks the replica took over and the node's `/health` says
/// connected again by itself; answers how many were acknowledged, the acknowledged tasks that
/// did not end `succeeded` within a minute, and the node's log.
async fn failover(ack_replicas: u32) -> (usize, Vec<(String, serde_json::Value)>, String) {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let config = CONFIG.replace("ACK", &ack_replicas.to_string());
    let node = Node::start(&config, &[("RT_BROKER_URL", &cluster.url())]);
    let victim = cluster.master_of("rt:{chat}:stream");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let started = Instant::now();
    let (mut acknowledged, mut refused) = (Vec::new(), BTreeMap::<String, usize>::new());
    let mut killed = None;
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(8) {
        if killed.is_none() && started.elapsed() > Duration::from_millis(1500) {
            cluster.kill(victim);
            killed = Some(Instant::now());
        }
        let body = if n % 2 == 0 {
            json!({ "task": "rt_echo", "args": [n] })
        } else {
            json!({ "task": "rt_sleep", "kwargs": { "ms": 1 } })
        };
        n += 1;
        match client
            .post(format!("{}/tasks", node.url))
            .json(&body)
            .send()
            .await
        {
            Ok(response) if response.status() == 202 => {
                let answer: serde_json::Value = response.json().await.unwrap();
                acknowledged.push(answer["id"].as_str().unwrap().to_string());
            }
            Ok(response) => *refused.entry(response.status().to_string()).or_default() += 1,
            Err(e) => *refused.entry(format!("{e}")).or_default() += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed.is_some(), "the master was killed");
    let promoted = tokio::task::spawn_blocking(move || {
        let ok = cluster.wait_ok(Duration::from_secs(20));
        (ok, cluster)
    })
    .await
    .unwrap();
    let cluster = promoted.1;
    assert!(
        promoted.0,
        "the cluster did not recover:\n{}",
        cluster.describe()
    );
    assert_ne!(
        cluster.master_of("rt:{chat}:stream"),
        victim,
        "a replica took over"
    );
    common::eventually(
        "the node connected again",
        Duration::from_secs(20),
        async || {
            let health = node.get("/health").await;
            if health.status() == 200 {
                Ok(())
            } else {
                Err(health.text().await.unwrap_or_default())
            }
        },
    )
    .await;
    // The killed master comes back as a replica of the one that took over; from then on
    // every enqueue is acknowledged again (with ack_replicas, none to the promoted master was
    // while it had no replica: each waited ack_replicas_timeout and was refused).
    let _cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.restart(victim);
        let synced = cluster.wait_synced(Duration::from_secs(20));
        assert!(
            synced,
            "the restarted node did not sync:\n{}",
            cluster.describe()
        );
        cluster
    })
    .await
    .unwrap();
    for n in 0..20 {
        let body = json!({ "task": "rt_echo", "args": [n] });
        let response = client
            .post(format!("{}/tasks", node.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "after the old master rejoined");
        let answer: serde_json::Value = response.json().await.unwrap();
        acknowledged.push(answer["id"].as_str().unwrap().to_string());
    }
    let mut lost = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &acknowledged {
        loop {
            let record = node.get_json(&format!("/tasks/{id}")).await;
            if record["state"] == "succeeded" {
                break;
            }
            if Instant::now() > deadline {
                lost.push((id.clone(), record));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "failover (ack_replicas {ack_replicas}): {} acknowledged, refused {refused:?}, lost {}",
        acknowledged.len(),
        lost.len()
    );
    (acknowledged.len(), lost, node.log())
}
