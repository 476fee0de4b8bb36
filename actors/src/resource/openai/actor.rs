//! `OpenAiActor` (`kind = "openai"`, permanent): the OpenAI resource's place in the tree. It
//! holds the node's [`OpenAiClient`] and publishes its snapshot every second (a timer it sends
//! itself, rescheduled after each round), and, while OpenAI refuses the key, sends the probe
//! when it is due ([`OpenAiClient::probe`]). While misconfigured it is marked degraded
//! (`/health` names it and the refusal).
//!
//! Everything that must survive a crash — the limiters, the server's hold, the counters, the
//! misconfiguration and its next probe time — lives in the client's `Arc`, which the
//! supervisor hands to every incarnation: a killed and restarted actor neither refills the
//! limiters, nor forgets a hold or a refused key.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::OpenAiClient;
use crate::tree::TreeHandle;

/// How often the snapshot is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct OpenAiArgs {
    pub node: TreeHandle,
    /// The node's client (shared with tasks, the egress proxy and the gate).
    pub client: Arc<OpenAiClient>,
}

/// Messages (a timer the actor sends itself).
#[derive(Debug, Clone, Copy)]
pub enum OpenAiMessage {
    /// Refresh the snapshot.
    Snapshot,
    /// Probe a misconfigured resource when it is due.
    Probe,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiActor;

/// Its state: the arguments (the client lives outside).
#[derive(Debug)]
pub struct OpenAiState {
    args: OpenAiArgs,
}

impl Actor for OpenAiActor {
    type Msg = OpenAiMessage;
    type State = OpenAiState;
    type Arguments = OpenAiArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: OpenAiArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A first snapshot right away, so the tree shows the limits from the start.
        myself.cast(OpenAiMessage::Snapshot)?;
        myself.cast(OpenAiMessage::Probe)?;
        Ok(OpenAiState { args })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let client = &state.args.client;
        match message {
            OpenAiMessage::Snapshot => {
                state.args.node.publish(client.snapshot());
                myself.send_after(SNAPSHOT_EVERY, || OpenAiMessage::Snapshot);
            }
            OpenAiMessage::Probe => {
                client.probe().await;
                myself.send_after(client.auth().next_check(), || OpenAiMessage::Probe);
            }
        }
        let degraded = client.auth().refused().map(|refusal| {
            format!(
                "{}; calls are refused without reaching it, tasks that use it fail until a \
                 probe is accepted",
                client.auth().describe(&refusal)
            )
        });
        state.args.node.set_degraded(degraded);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::resource::openai::{Limit, OpenAiSettings};
    use crate::supervisor::{ChildSpec, Restart, start_root};
    use crate::tree::{Status, Tree};

    async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_killed_actor_comes_back_with_the_same_limiter_and_counters() {
        let mut settings = OpenAiSettings::new("OPENAI_API_KEY", Some("sk-test".into()));
        // Two requests at once, then one every 30 s.
        settings.requests = Some(Limit::try_new(3, 2).unwrap());
        let client =
            Arc::new(OpenAiClient::try_new("openai", settings, reqwest::Client::new()).unwrap());
        let tree = Tree::new();
        let shared = Arc::clone(&client);
        let child = ChildSpec::new("openai", "openai", Restart::Permanent, move |node| {
            let args = OpenAiArgs {
                node,
                client: Arc::clone(&shared),
            };
            (OpenAiActor, args)
        });
        let spec = crate::supervisor::quick_restarts(vec![child]);
        let (root, _) = start_root(&tree, "root", spec).await.unwrap();

        // Spend the burst (the limiter is all the calls would go through before sending).
        for _ in 0..2 {
            drop(client.admit(1).await);
        }
        eventually("a snapshot with both calls", Duration::from_secs(3), || {
            tree.get("root/openai")
                .is_some_and(|a| a.snapshot["calls"]["started"] == 2)
        })
        .await;
        let before = tree.get("root/openai").unwrap().snapshot;
        assert_eq!(before["limits"]["requests_per_minute"], 3);
        assert_eq!(before["api_key_set"], true);
        assert!(!before.to_string().contains("sk-test"), "{before}");

        tree.cell("root/openai").unwrap().kill();
        eventually("openai restarted", Duration::from_secs(2), || {
            tree.get("root/openai")
                .is_some_and(|a| a.restarts == 1 && a.status == Status::Running)
        })
        .await;
        // The limiter is still spent: a third call waits (30 s) instead of passing, and the
        // restarted actor's snapshot shows it waiting, with the counters of before.
        let third = tokio::spawn({
            let client = Arc::clone(&client);
            async move { drop(client.admit(1).await) }
        });
        eventually("the new actor's snapshot", Duration::from_secs(3), || {
            tree.get("root/openai").is_some_and(|a| {
                a.snapshot["calls"]["waiting"] == 1 && a.snapshot["calls"]["started"] == 2
            })
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !third.is_finished(),
            "the restart must not refill the limiter"
        );
        third.abort();
        root.stop(None);
    }
}
