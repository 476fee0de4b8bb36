//! [`Node`]: a running node, for the `runtime` binary and for programs that embed one. It
//! starts the watchdog of its child processes (which also kills what dead nodes left), takes
//! the listener it is given (its address is the children's egress URL), starts the
//! supervision tree and the HTTP server, waits for a shutdown future or for the root to end by
//! itself, then stops in reverse order within the grace.
//!
//! With `memory://` the queues live in this process and end with it. On a signal, with
//! `broker.drain_on_shutdown`, the consumers first go on taking ready tasks until no queue has
//! a ready or running entry, or `runtime.shutdown_grace` runs out (`drain_memory`); then the
//! usual stop follows. However the node ends, it then logs at WARN, queue by queue, what the
//! memory broker still held and takes with it (`report_dropped`).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actors::broker::{Admin, AnyBroker, Coordination, EventSink, NodeState};
use actors::broker_actor::{BrokerMessage, NodeStatus};
use actors::celery::{Celery, CeleryOrigin};
use actors::consumer::{ConsumerMessage, Outcomes, Work};
use actors::handler::native::Natives;
use actors::history::{self, History, Source};
use actors::supervisor::{SupervisorMessage, start_root};
use actors::tree::{Status, Tree};
use ractor::ActorRef;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::http::egress::EgressAccess;
use crate::http::serve::serve;
use crate::http::{AppState, app};
use crate::topology::{
    Problems, ROOT, Shared, metrics, node_name, pools, resources, root_spec, task_defs,
};

/// Time the HTTP server gets to finish open requests once the tree has stopped.
const HTTP_DRAIN: Duration = Duration::from_secs(2);

/// How often a memory drain looks at the queues.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// `broker.drain_on_shutdown` with `memory://`: the consumers keep running until none of
/// `queues` has a ready or in-flight entry, or `until`. Returns whether they emptied. New
/// work that keeps arriving meanwhile (`POST /tasks`, beat, callbacks) is run too, within the
/// same deadline.
async fn drain_memory(broker: &AnyBroker, queues: &[String], until: Instant) -> bool {
    loop {
        let mut busy = false;
        for queue in queues {
            match broker.depth(queue).await {
                Ok(depth) => busy |= depth.ready + depth.in_flight > 0,
                Err(_) => busy = true,
            }
        }
        if !busy {
            return true;
        }
        if Instant::now() + DRAIN_POLL > until {
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// With `memory://`, what the process takes with it as it ends: one WARN line per queue that
/// still holds entries (ready, delayed, in flight — running tasks that were killed —, how many
/// of those are callbacks, dead letters), or one INFO line when nothing is left. Results and
/// events go too; nothing to say with Redis, which keeps them.
fn report_dropped(broker: &AnyBroker) {
    let AnyBroker::Memory(memory) = broker else {
        return;
    };
    let leftovers = memory.leftovers();
    if leftovers.is_empty() {
        info!("memory:// broker: nothing left to drop");
    }
    for left in leftovers {
        warn!(
            queue = %left.queue,
            ready = left.ready,
            delayed = left.delayed,
            in_flight = left.in_flight,
            callbacks = left.callbacks,
            dead = left.dead,
            "memory:// broker: dropping what this queue still holds (its entries live in this \
             process; see broker.drain_on_shutdown)"
        );
    }
}

/// Moves the node to `state` and has the broker actor write its presence record at once, so
/// that `GET /nodes` on every node shows it within a round trip, not at the next round.
fn announce(tree: &Tree, status: &NodeStatus, state: NodeState) {
    status.set(state);
    if let Some(cell) = tree.cell(&format!("{ROOT}/broker")) {
        let _ = cell.send_message(BrokerMessage::Announce);
    }
}

/// Tells every consumer to stop fetching at once, so their running tasks finish in parallel
/// while the tree stops (each consumer waits for its own up to the grace).
fn drain_consumers(tree: &Tree) {
    for actor in tree.list().into_iter().filter(|a| a.kind == "consumer") {
        if let Some(cell) = tree.cell(&actor.path) {
            let _ = cell.send_message(ConsumerMessage::Drain);
        }
    }
}

/// Why a [`Node`] could not start, or ended other than by an orderly stop. Each was logged
/// (at ERROR, with its fields) where it happened; the `runtime` binary maps it to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config asks for something this binary cannot build: `(key path, message)` pairs,
    /// like `runtime check` reports them (a native task without a function, a bad pool or
    /// resource setting).
    #[error("invalid config: {}", list(.0))]
    Config(Problems),
    /// The broker did not answer (`broker.url` / `RT_BROKER_URL`).
    #[error("cannot start without the broker {url}: {error}")]
    Broker {
        /// The broker URL, its password redacted.
        url: String,
        /// Why it did not answer.
        error: String,
    },
    /// The Celery bridge could not connect (`[celery]`).
    #[error("cannot start the Celery bridge: {0}")]
    Celery(String),
    /// The root supervisor did not start.
    #[error("the supervision tree failed to start: {0}")]
    Tree(String),
    /// The root supervisor ended by itself: it gave up (restart intensity exceeded) or was
    /// killed.
    #[error("the root supervisor ended: {0}")]
    RootEnded(String),
    /// The HTTP server ended by itself.
    #[error("the http server ended: {0}")]
    HttpEnded(String),
    /// The tree did not stop within `runtime.shutdown_grace` (plus one second); it was killed.
    #[error("the tree did not stop within the grace of {0:?}")]
    StopTimeout(Duration),
}

/// `path: message; path: message`.
fn list(problems: &Problems) -> String {
    let lines: Vec<String> = (problems.iter())
        .map(|(path, message)| format!("{path}: {message}"))
        .collect();
    lines.join("; ")
}

/// Logs `problems` one per line, as at start, and wraps them.
fn config_problems(problems: Problems) -> NodeError {
    for (path, message) in &problems {
        error!("{path}: {message}");
    }
    NodeError::Config(problems)
}

/// A running node: its supervision tree and its HTTP server on the listener it was given.
/// [`Node::start`] builds it from a compiled config; [`Node::run`] keeps it running until a
/// shutdown future resolves, then stops it in reverse order within the grace — the only
/// orderly stop: a `Node` dropped without `run` leaves its tree and server to the end of the
/// tokio runtime.
///
/// ```no_run
/// # async fn example(config: runtime::config::Config) -> Result<(), Box<dyn std::error::Error>> {
/// use actors::handler::native::Natives;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let node = runtime::node::Node::start(config, Natives::builtin(), listener).await?;
/// println!("serving on http://{}", node.addr());
/// node.run(async { tokio::signal::ctrl_c().await.ok(); "SIGINT" }).await?;
/// # Ok(()) }
/// ```
pub struct Node {
    config: Config,
    addr: SocketAddr,
    started: Instant,
    tree: Arc<Tree>,
    root: ActorRef<SupervisorMessage>,
    root_done: JoinHandle<()>,
    status: Arc<NodeStatus>,
    broker: Arc<AnyBroker>,
    name: String,
    server: JoinHandle<std::io::Result<()>>,
    http_stop: Arc<Notify>,
    /// The history's sampling stops when this is dropped, with the node.
    _sampling: oneshot::Sender<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node running `config` with the native task functions `natives` (start from
    /// [`Natives::builtin`] to keep the built-in ones), serving HTTP on `listener` (its
    /// address is also the children's egress URL; `http.bind` is not read — binding it is the
    /// caller's choice). When this returns the tree is up and the server accepts connections
    /// on [`Node::addr`].
    pub async fn start(
        config: Config,
        natives: Natives,
        listener: TcpListener,
    ) -> Result<Node, NodeError> {
        let started = Instant::now();
        // Before any child starts: the watchdog that kills the children if this process
        // dies, and what earlier processes that died with their watchdog left behind killed.
        actors::child::watchdog::start();
        let addr = listener.local_addr().unwrap_or(config.http.bind);
        let egress = EgressAccess::new(addr);
        let (pools, pool_actors) = pools(&config, &egress).map_err(config_problems)?;
        let client = reqwest::Client::new();
        let tasks = task_defs(&config, &natives, &client, &pools, &egress)
            .map(Arc::new)
            .map_err(config_problems)?;
        let url = config.broker.redacted_url();
        let broker = match AnyBroker::connect(&config.broker.url, config.broker.settings.clone())
            .await
        {
            Ok(broker) => Arc::new(broker),
            Err(err) => {
                error!(broker = %url, error = %err, "cannot start without the broker (broker.url / RT_BROKER_URL)");
                return Err(NodeError::Broker {
                    url,
                    error: err.to_string(),
                });
            }
        };
        // Supervision, breaker and pool events reach the events stream through one writer.
        let events = EventSink::spawn(Arc::clone(&broker));
        for pool in pools.values() {
            pool.attach_events(events.clone());
        }
        let name = node_name(&config);
        let (resources, resource_actors) =
            resources(&config, &broker, &name).map_err(config_problems)?;
        resources.attach_events(&events);
        let celery = match &config.celery {
            None => None,
            Some(settings) => match Celery::connect(
                settings.clone(),
                &config.broker.url,
                &config.broker.settings,
                &name,
            )
            .await
            {
                Ok(celery) => Some(Arc::new(celery)),
                Err(err) => {
                    error!(error = %err, "cannot start the Celery bridge ([celery])");
                    return Err(NodeError::Celery(err.to_string()));
                }
            },
        };
        let resources = Arc::new(resources);
        let metrics = Arc::new(metrics(&config, &resources, &pools));
        let outcomes: BTreeMap<String, Arc<Outcomes>> = (config.queues.keys())
            .map(|queue| (queue.clone(), Arc::default()))
            .collect();
        let shared = Shared {
            resources,
            outcomes,
            work: Arc::new(Work {
                broker,
                leases: Arc::default(),
                tasks,
                consumer: name,
                origin: Some(Arc::new(CeleryOrigin::new(celery.clone()))),
                metrics: Arc::clone(&metrics),
                terminate_grace: config.runtime.terminate_grace,
            }),
            celery,
        };
        info!(node = %shared.work.consumer, broker = %url, "broker ready");
        let tree = Tree::with_metrics(Arc::clone(&metrics));
        tree.attach_events(events);
        let status = Arc::new(NodeStatus::default());
        let spec = root_spec(
            &config,
            &shared,
            resource_actors,
            pool_actors,
            started,
            Arc::clone(&status),
        );
        let (root, root_done) = match start_root(&tree, ROOT, spec).await {
            Ok(started) => started,
            Err(err) => {
                error!(error = %err, "the supervision tree failed to start");
                return Err(NodeError::Tree(err.to_string()));
            }
        };

        // The history the page draws: each queue's counters and depth, sampled every 5 s.
        let history = Arc::new(History::default());
        let (sampling, stop_sampling) = oneshot::channel::<()>();
        let sources = (shared.outcomes.iter())
            .map(|(queue, outcomes)| {
                let outcomes = Arc::clone(outcomes);
                let source: Source = Box::new(move || outcomes.totals());
                (queue.clone(), source)
            })
            .collect();
        tokio::spawn(Arc::clone(&history).run(
            sources,
            Arc::clone(shared.broker()),
            history::EVERY,
            async {
                let _ = stop_sampling.await;
            },
        ));

        let mut state = AppState::new(
            Arc::clone(&tree),
            Arc::clone(shared.broker()),
            Arc::clone(&shared.resources),
            &config,
        );
        state.pools = Arc::new(pools);
        state.egress_token = Some(Arc::from(egress.token()));
        state.metrics = metrics;
        state.history = history;
        if config.chaos.enabled {
            warn!("chaos routes are enabled: POST /chaos/kill/{{path}} kills actors");
        }
        let http_stop = Arc::new(Notify::new());
        let stopped = Arc::clone(&http_stop);
        let http = config.http.clone();
        let server = tokio::spawn(async move {
            serve(listener, app(state), &http, async move {
                stopped.notified().await
            })
            .await
        });
        Ok(Node {
            addr,
            started,
            tree,
            root,
            root_done,
            status,
            broker: Arc::clone(shared.broker()),
            name: shared.work.consumer.clone(),
            server,
            http_stop,
            _sampling: sampling,
            config,
        })
    }

    /// The address the HTTP server listens on (with the port the system chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's name (`runtime.node_name`, else generated): its consumer name and its
    /// entry in `GET /nodes`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs until `shutdown` resolves (with a reason to log, e.g. the signal's name), then
    /// stops in order: with `memory://` and `broker.drain_on_shutdown` the queues drain
    /// first; the consumers stop fetching, the tree stops in reverse order within
    /// `runtime.shutdown_grace`, the HTTP server finishes open requests. `Ok` after an orderly
    /// stop; an error when the root supervisor or the HTTP server ended by itself, or the tree
    /// did not stop in time.
    pub async fn run(self, shutdown: impl Future<Output = &'static str>) -> Result<(), NodeError> {
        let Node {
            config,
            started,
            tree,
            root,
            mut root_done,
            status,
            broker,
            name,
            mut server,
            http_stop,
            ..
        } = self;
        let result = tokio::select! {
            signal = shutdown => {
                let stopping = Instant::now();
                let grace = config.runtime.shutdown_grace;
                info!(signal, ?grace, "shutdown requested; draining the consumers, then stopping the tree in reverse order");
                if config.broker.drain_on_shutdown && matches!(*broker, AnyBroker::Memory(_)) {
                    announce(&tree, &status, NodeState::Draining);
                    info!("draining memory:// before stopping: the consumers keep taking ready tasks until the queues are empty or the grace runs out");
                    let drain_started = Instant::now();
                    let queues: Vec<String> = config.queues.keys().cloned().collect();
                    if drain_memory(&broker, &queues, drain_started + grace).await {
                        info!(elapsed = ?drain_started.elapsed(), "memory:// queues drained");
                    } else {
                        warn!(?grace, "shutdown_grace ran out while draining memory://; stopping with what is left");
                    }
                }
                announce(&tree, &status, NodeState::Stopping);
                drain_consumers(&tree);
                root.stop(Some(format!("shutdown ({signal})")));
                // Every supervisor enforces the grace on its own children; this is the backstop.
                match tokio::time::timeout(grace + Duration::from_secs(1), &mut root_done).await {
                    Ok(_) => {
                        // `elapsed`: the stop itself, from the signal; `uptime`: the node's life.
                        info!(elapsed = ?stopping.elapsed(), uptime = ?started.elapsed(), "tree stopped");
                        // Leaving cleanly: out of `GET /nodes` at once, not after the record's TTL.
                        if let Err(err) = broker.forget_node(&name).await {
                            warn!(error = %err, "presence record not removed; it expires by itself");
                        }
                        Ok(())
                    }
                    Err(_) => {
                        error!(?grace, "the tree did not stop within the grace; killing it");
                        root.kill();
                        Err(NodeError::StopTimeout(grace))
                    }
                }
            }
            _ = &mut root_done => {
                let why = tree
                    .get(ROOT)
                    .filter(|root| root.status == Status::Failed)
                    .and_then(|root| root.last_error)
                    .unwrap_or_else(|| "the root supervisor was killed".to_string());
                error!(reason = %why, "the root supervisor ended; exiting so the service manager restarts the node");
                Err(NodeError::RootEnded(why))
            }
            ended = &mut server => {
                let why = match ended {
                    Ok(Ok(())) => "it returned".to_string(),
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                };
                error!(reason = %why, "the http server ended; stopping the node");
                root.stop(Some("http server ended".into()));
                let _ = tokio::time::timeout(config.runtime.shutdown_grace, &mut root_done).await;
                report_dropped(&broker);
                return Err(NodeError::HttpEnded(why));
            }
        };

        http_stop.notify_one();
        if tokio::time::timeout(HTTP_DRAIN, server).await.is_err() {
            warn!(?HTTP_DRAIN, "http server did not drain in time");
        }
        report_dropped(&broker);
        result
    }
}
