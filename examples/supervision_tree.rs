//! Embedding the `actors` library: a supervisor with your own actor under it.
//!
//! Run with: cargo run --example supervision_tree
//!
//! `flaky` panics on every third message; its supervisor restarts it (one_for_one, 20 ms
//! backoff) while `heartbeat` keeps running. The tree registry shows the restarts.

use std::time::Duration;

use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::supervisor::{ChildSpec, Intensity, Restart, Strategy, SupervisorSpec, start_root};
use actors::tree::{Tree, TreeHandle};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;

/// Counts messages and panics on every third one.
struct Flaky;

impl Actor for Flaky {
    type Msg = ();
    type State = (TreeHandle, u32);
    type Arguments = TreeHandle;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        node: TreeHandle,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((node, 0))
    }

    async fn handle(
        &self,
        _myself: ActorRef<()>,
        _message: (),
        (node, seen): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        *seen += 1;
        node.publish(json!({ "seen": *seen }));
        if *seen == 3 {
            panic!("third message");
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tree = Tree::new();
    let started = tokio::time::Instant::now();
    let spec = SupervisorSpec {
        strategy: Strategy::OneForOne,
        intensity: Intensity::try_new(10, Duration::from_secs(60))?,
        backoff: Default::default(),
        shutdown_timeout: Duration::from_secs(5),
        children: vec![
            ChildSpec::new("heartbeat", "heartbeat", Restart::Permanent, move |node| {
                let interval = Duration::from_millis(100);
                let args = HeartbeatArgs {
                    node,
                    interval,
                    node_started: started,
                };
                (HeartbeatActor, args)
            }),
            ChildSpec::new("flaky", "example", Restart::Permanent, |node| (Flaky, node)),
        ],
    };
    let (root, done) = start_root(&tree, "root", spec).await?;

    for _ in 0..7 {
        if let Some(flaky) = tree.cell("root/flaky") {
            let _ = flaky.send_message(());
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    print!("{}", tree.render_text());

    root.stop(Some("example done".into()));
    done.await?;
    Ok(())
}
