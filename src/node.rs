//! Running a node: start the watchdog of its child processes (which also kills what dead
//! nodes left), bind the listener (its address is the children's egress URL), start the
//! supervision tree and the HTTP server, wait for a shutdown signal or for the root to end by
//! itself, then stop in reverse order within the grace.
//!
//! With `memory://` the queues live in this process and end with it. On a signal, with
//! `broker.drain_on_shutdown`, the consumers first go on taking ready tasks until no queue has
//! a ready or running entry, or `runtime.shutdown_grace` runs out ([`drain_memory`]); then the
//! usual stop follows. However the node ends, it then logs at WARN, queue by queue, what the
//! memory broker still held and takes with it ([`report_dropped`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actors::broker::{
    Admin, AnyBroker, BrokerMessage, Coordination, EventSink, NodeState, NodeStatus,
};
use actors::celery::Celery;
use actors::consumer::{ConsumerMessage, Outcomes, Work};
use actors::handler::native::Natives;
use actors::history::{self, History, Source};
use actors::supervisor::start_root;
use actors::tree::{Status, Tree};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::check::EX_CONFIG;
use crate::config::Config;
use crate::http::egress::EgressAccess;
use crate::http::serve::serve;
use crate::http::{AppState, app};
use crate::topology::{
    ROOT, Shared, broker_settings, celery_settings, metrics, node_name, pools, resources,
    root_spec, task_defs,
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

/// Tells every consumer to stop fetching at once, so their running tasks finish in parallel
/// while the tree stops (each consumer waits for its own up to the grace).
/// Moves the node to `state` and has the broker actor write its presence record at once, so
/// that `GET /nodes` on every node shows it within a round trip, not at the next round.
fn announce(tree: &Tree, status: &NodeStatus, state: NodeState) {
    status.set(state);
    if let Some(cell) = tree.cell(&format!("{ROOT}/broker")) {
        let _ = cell.send_message(BrokerMessage::Announce);
    }
}

fn drain_consumers(tree: &Tree) {
    for actor in tree.list().into_iter().filter(|a| a.kind == "consumer") {
        if let Some(cell) = tree.cell(&actor.path) {
            let _ = cell.send_message(ConsumerMessage::Drain);
        }
    }
}

/// Runs a node until `shutdown` resolves (with the signal's name) or the root supervisor
/// ends by itself (it gave up, or was killed). Exit 0 after an orderly stop, 1 otherwise.
pub async fn run(config: Config, shutdown: impl Future<Output = &'static str>) -> ExitCode {
    run_with(config, Natives::builtin(), shutdown).await
}

/// [`run`] with the native task functions of an embedding program (`natives` should start
/// from [`Natives::builtin`] to keep the built-in ones).
pub async fn run_with(
    config: Config,
    natives: Natives,
    shutdown: impl Future<Output = &'static str>,
) -> ExitCode {
    let node_started = Instant::now();
    // Before any child starts: the watchdog that kills the children if this process dies, and
    // what earlier processes that died with their watchdog left behind killed.
    actors::child::watchdog::start();
    // The listener comes first: the children's egress URL needs its port.
    let listener = match TcpListener::bind(config.http.bind).await {
        Ok(listener) => listener,
        Err(err) => {
            error!(bind = %config.http.bind, error = %err, "cannot listen (http.bind)");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(config.http.bind, |a| a);
    let egress = EgressAccess::new(addr);
    let (pools, pool_actors) = match pools(&config, &egress) {
        Ok(built) => built,
        Err(problems) => {
            for (path, message) in problems {
                error!("{path}: {message}");
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    let client = reqwest::Client::new();
    let tasks = match task_defs(&config, &natives, &client, &pools, &egress) {
        Ok(tasks) => Arc::new(tasks),
        Err(missing) => {
            for (path, message) in missing {
                error!("{path}: {message}");
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    let url = config.broker.redacted_url();
    let broker = match AnyBroker::connect(&config.broker.url, broker_settings(&config)).await {
        Ok(broker) => Arc::new(broker),
        Err(err) => {
            error!(broker = %url, error = %err, "cannot start without the broker (broker.url / RT_BROKER_URL)");
            return ExitCode::FAILURE;
        }
    };
    // Supervision, breaker and pool events reach the events stream through one writer task.
    let events = EventSink::spawn(Arc::clone(&broker));
    for pool in pools.values() {
        pool.attach_events(events.clone());
    }
    let name = node_name(&config);
    let (resources, resource_actors) = match resources(&config, &broker, &name) {
        Ok(built) => built,
        Err(problems) => {
            for (path, message) in problems {
                error!("{path}: {message}");
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    resources.attach_events(&events);
    let celery = match celery_settings(&config, &name) {
        None => None,
        Some(settings) => match Celery::connect(settings).await {
            Ok(celery) => Some(Arc::new(celery)),
            Err(err) => {
                error!(error = %err, "cannot start the Celery bridge ([celery])");
                return ExitCode::FAILURE;
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
            celery,
            metrics: Arc::clone(&metrics),
            terminate_grace: config.runtime.terminate_grace,
        }),
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
        node_started,
        Arc::clone(&status),
    );
    let (root, mut root_done) = match start_root(&tree, ROOT, spec).await {
        Ok(started) => started,
        Err(err) => {
            error!(error = %err, "the supervision tree failed to start");
            return ExitCode::FAILURE;
        }
    };

    // The history the page draws: each queue's counters and depth, sampled every 5 s.
    let history = Arc::new(History::default());
    // Sampling stops when `_sampling` is dropped, as this function returns.
    let (_sampling, stop_sampling) = tokio::sync::oneshot::channel::<()>();
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
    let mut server = tokio::spawn(async move {
        serve(listener, app(state), &http, async move {
            stopped.notified().await
        })
        .await
    });
    info!("http listening on http://{addr}");

    let broker = Arc::clone(shared.broker());
    let node = shared.work.consumer.clone();
    let code = tokio::select! {
        signal = shutdown => {
            let stopping = Instant::now();
            let grace = config.runtime.shutdown_grace;
            info!(signal, ?grace, "shutdown requested; draining the consumers, then stopping the tree in reverse order");
            if config.broker.drain_on_shutdown && matches!(*broker, AnyBroker::Memory(_)) {
                announce(&tree, &status, NodeState::Draining);
                info!("draining memory:// before stopping: the consumers keep taking ready tasks until the queues are empty or the grace runs out");
                let started = Instant::now();
                let queues: Vec<String> = config.queues.keys().cloned().collect();
                if drain_memory(&broker, &queues, started + grace).await {
                    info!(elapsed = ?started.elapsed(), "memory:// queues drained");
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
                    info!(elapsed = ?stopping.elapsed(), uptime = ?node_started.elapsed(), "tree stopped");
                    // Leaving cleanly: out of `GET /nodes` at once, not after the record's TTL.
                    if let Err(err) = broker.forget_node(&node).await {
                        warn!(error = %err, "presence record not removed; it expires by itself");
                    }
                    ExitCode::SUCCESS
                }
                Err(_) => {
                    error!(?grace, "the tree did not stop within the grace; killing it");
                    root.kill();
                    ExitCode::FAILURE
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
            ExitCode::FAILURE
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
            return ExitCode::FAILURE;
        }
    };

    http_stop.notify_one();
    if tokio::time::timeout(HTTP_DRAIN, server).await.is_err() {
        warn!(?HTTP_DRAIN, "http server did not drain in time");
    }
    report_dropped(&broker);
    code
}
