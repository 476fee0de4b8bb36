//! The supervision tree of a node, built from its validated config.
//!
//! ```text
//! root            SupervisorActor   [supervision] policy, stops within runtime.shutdown_grace
//! ├── broker      BrokerActor       permanent; delayed mover, lease renewal, recovery sweep
//! ├── resources   SupervisorActor   permanent, when [resources] are configured
//! │   ├── zep     ZepActor          breaker snapshot, write replay; the client lives outside
//! │   └── openai  OpenAiActor       limiter snapshot; the client lives outside
//! ├── queues      SupervisorActor   permanent
//! │   ├── chat    ConsumerActor     permanent; one per [queues.NAME], task actors below it
//! │   └── …
//! ├── celery      SupervisorActor   permanent, when [celery] takes over kombu queues
//! │   └── celery  BridgeActor       permanent; one per taken-over kombu queue
//! ├── scheduler   SchedulerActor    permanent, when [schedules] are configured (beat)
//! └── heartbeat   HeartbeatActor    permanent; uptime and event-loop lag
//! ```
//!
//! Pools attach before `queues` (a task may claim an agent as soon as it runs). Children start in this order and stop in the
//! reverse one: the scheduler stops (and resigns its leader lease) before the consumers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actors::broker::AnyBroker;
use actors::broker_actor::{BrokerActor, BrokerArgs, NodeStatus, Presence};
use actors::celery::Celery;
use actors::celery::bridge::{BridgeActor, BridgeArgs, BridgeCounters};
use actors::consumer::{ConsumerActor, ConsumerArgs, Outcomes, Work};
use actors::gate::ResourceGate;
use actors::handler::exec::ExecHandler;
use actors::handler::http::HttpHandler;
use actors::handler::native::Natives;
use actors::handler::pool::PoolHandler;
use actors::handler::python::PythonHandler;
use actors::handler::{Handler, TaskDef, TaskDefs};
use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::metrics::{BuildInfo, Metrics};
use actors::pool::{Pool, PoolActor, PoolArgs};
use actors::resource::Resources;
use actors::resource::openai::{OpenAiActor, OpenAiArgs, OpenAiClient};
use actors::resource::zep::{ZepActor, ZepArgs, ZepClient, replay_queue};
use actors::scheduler::{Schedule, SchedulerActor, SchedulerArgs};
use actors::supervisor::{ChildSpec, Restart, SupervisorSpec};
use tokio::time::Instant;

use crate::config::{self, Config};
use crate::http::egress::EgressAccess;

/// Name of the root supervisor (and first segment of every path).
pub const ROOT: &str = "root";

/// How often the delayed mover runs: an eta or retry fires at most this late.
pub const PROMOTE_EVERY: Duration = Duration::from_millis(10);

/// How often the scheduler checks due times: a run is enqueued at most this late (+ jitter).
pub const BEAT_TICK: Duration = Duration::from_millis(50);

/// How long a node's presence record (`GET /nodes`) outlives its last write (written every
/// second by the broker actor).
pub const PRESENCE_TTL: Duration = Duration::from_secs(5);

/// What the actors of a node share, created before the tree and outliving every restart.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The broker, the leases, the task definitions and this node's consumer name.
    pub work: Arc<Work>,
    /// The shared resources; also the consumers' gate.
    pub resources: Arc<Resources>,
    /// Each queue's outcome counters on this node (by queue name): kept across restarts of
    /// its consumer, sampled by the node's history.
    pub outcomes: BTreeMap<String, Arc<Outcomes>>,
    /// The Celery bridge, when `[celery]` takes over kombu queues.
    pub celery: Option<Arc<Celery>>,
}

impl Shared {
    /// The broker connection.
    pub fn broker(&self) -> &Arc<AnyBroker> {
        &self.work.broker
    }
}

/// Problems a valid config still has with this binary: `(key path, message)` pairs, reported
/// by `runtime check` and at start like compile errors.
pub type Problems = Vec<(String, String)>;

/// The whole environment of a child of the node (an `exec` command, a pool agent): `env` and
/// `pass_env` as configured (and `PATH`, see [`actors::child::environment`]), plus the
/// node's egress URL and the children's egress token.
fn child_env<'a>(
    env: impl IntoIterator<Item = (&'a String, &'a String)>,
    pass_env: &[String],
    egress: &EgressAccess,
) -> BTreeMap<String, String> {
    let mut vars = actors::child::environment(
        env.into_iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
        pass_env,
    );
    for (name, value) in egress.vars() {
        vars.insert(name.to_string(), value.to_string());
    }
    vars
}

/// The task definitions of `config`, with their handlers: native ones from `natives`, HTTP
/// ones sharing `client`, exec ones with their environment and the node's `egress`. `Err`
/// lists `(key path, message)` for each native task that has no registered function.
pub fn task_defs(
    config: &Config,
    natives: &Natives,
    client: &reqwest::Client,
    pools: &BTreeMap<String, Pool>,
    egress: &EgressAccess,
) -> Result<TaskDefs, Problems> {
    let mut defs = Vec::new();
    let mut missing = Vec::new();
    for (name, task) in &config.tasks {
        let handler: Arc<dyn Handler> = match &task.handler {
            config::Handler::Http { url, timeout } => {
                Arc::new(HttpHandler::new(url.as_str(), *timeout, client.clone()))
            }
            config::Handler::Exec {
                command,
                args,
                cwd,
                env,
                pass_env,
            } => Arc::new(
                ExecHandler::new(command, args, cwd.clone())
                    .with_env(child_env(env, pass_env, egress))
                    .with_max_result_bytes(config.broker.settings.max_entry_bytes),
            ),
            config::Handler::Native => match natives.handler(name) {
                Some(handler) => handler,
                None => {
                    let suggestion = config::did_you_mean(name, BUILTIN_NATIVES)
                        .map(|close| format!("; did you mean `{close}`?"))
                        .unwrap_or_default();
                    missing.push((
                        format!("tasks.{name}.handler"),
                        format!(
                            "no native function `{name}` is registered in this binary{suggestion} \
                             (built-in: {})",
                            BUILTIN_NATIVES.join(", ")
                        ),
                    ));
                    continue;
                }
            },
            config::Handler::Python { pool, function } => match pools.get(pool) {
                Some(pool) => Arc::new(PythonHandler::new(pool.clone(), function.clone())),
                None => {
                    missing.push((
                        format!("tasks.{name}.handler.workers"),
                        format!("no worker pool `{pool}`"),
                    ));
                    continue;
                }
            },
            config::Handler::Pool { pool } => match pools.get(pool) {
                Some(pool) => Arc::new(PoolHandler::new(pool.clone())),
                None => {
                    missing.push((
                        format!("tasks.{name}.handler.pool"),
                        format!("no pool `{pool}`"),
                    ));
                    continue;
                }
            },
        };
        defs.push(TaskDef {
            name: name.clone(),
            queue: task.queue.clone(),
            handler,
            time_limit: task.time_limit,
            soft_time_limit: task.soft_time_limit,
            retry: task.retry,
            uses: task.uses.clone(),
            link: task.link.clone(),
            link_error: task.link_error.clone(),
            store_result: task.store_result,
        });
    }
    if missing.is_empty() {
        Ok(TaskDefs::new(defs))
    } else {
        Err(missing)
    }
}

/// The shared resources of `config` (`[resources.NAME]`): one client per resource, created
/// once per node and shared by the tasks, the egress proxy and the gate, plus the permanent
/// actor of each. `Err` lists `(key path, message)` problems the config compiler cannot see.
pub fn resources(
    config: &Config,
    broker: &Arc<AnyBroker>,
    node_name: &str,
) -> Result<(Resources, Vec<ChildSpec>), Problems> {
    let mut resources = Resources::default();
    let mut children = Vec::new();
    let mut problems = Vec::new();
    for (name, settings) in &config.resources {
        let at = format!("resources.{name}");
        match settings {
            config::ResourceSettings::Zep(zep) => {
                let replay = replay_queue(name);
                if config.queues.contains_key(&replay) {
                    problems.push((
                        format!("queues.{replay}"),
                        format!("the name is taken by the replay queue of resources.{name}"),
                    ));
                    continue;
                }
                match ZepClient::new(zep.clone(), Arc::clone(broker), node_name) {
                    Ok(client) => {
                        let client = Arc::new(client);
                        resources.insert(name, client.clone());
                        children.push(ChildSpec::new(
                            name,
                            "zep",
                            Restart::Permanent,
                            move |node| {
                                let args = ZepArgs {
                                    node,
                                    client: Arc::clone(&client),
                                    replay_every: REPLAY_EVERY,
                                };
                                (ZepActor, args)
                            },
                        ));
                    }
                    Err(err) => problems.push((at, err.to_string())),
                }
            }
            config::ResourceSettings::OpenAi(openai) => {
                match OpenAiClient::try_new(name, openai.clone(), egress_client()) {
                    Ok(client) => {
                        let client = Arc::new(client);
                        resources.insert(name, client.clone());
                        children.push(ChildSpec::new(
                            name,
                            "openai",
                            Restart::Permanent,
                            move |node| {
                                let args = OpenAiArgs {
                                    node,
                                    client: Arc::clone(&client),
                                };
                                (OpenAiActor, args)
                            },
                        ));
                    }
                    Err(err) => problems.push((at, err.to_string())),
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((resources, children))
    } else {
        Err(problems)
    }
}

/// The process pools of `config` (`[pools.NAME]`): one [`Pool`] per pool, created once per
/// node (membership outside the actor) and shared by its actor, the `pool` task handler and
/// the HTTP routes; agents get the node's `egress`. `Err` lists `(key path, message)`
/// problems of the pool settings.
pub fn pools(
    config: &Config,
    egress: &EgressAccess,
) -> Result<(BTreeMap<String, Pool>, Vec<ChildSpec>), Problems> {
    let mut pools = BTreeMap::new();
    let mut children = Vec::new();
    let mut problems = Vec::new();
    for (name, p) in &config.pools {
        let env = child_env(&p.spec.settings().env, &p.pass_env, egress);
        match p.spec.clone().with_env(env) {
            Ok(spec) => {
                let pool = Pool::new(spec);
                pools.insert(name.clone(), pool.clone());
                children.push(ChildSpec::new(
                    name,
                    "pool",
                    Restart::Permanent,
                    move |node| {
                        let args = PoolArgs {
                            node,
                            pool: pool.clone(),
                        };
                        (PoolActor, args)
                    },
                ));
            }
            Err(errors) => {
                for err in errors {
                    problems.push((format!("pools.{name}.{}", err.field), err.reason));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((pools, children))
    } else {
        Err(problems)
    }
}

/// Pause between replay rounds of a resource's write backlog.
pub const REPLAY_EVERY: Duration = Duration::from_secs(1);

/// An HTTP client that never follows redirects (a redirect could carry an API key to another
/// host).
fn egress_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// The native functions every `runtime` binary has.
pub const BUILTIN_NATIVES: [&str; 5] = ["rt_add", "rt_echo", "rt_fail", "rt_noop", "rt_sleep"];

/// What this binary is, for `rt_build_info`: its version, the git commit and the compiler it
/// was built from and with (set by `build.rs`; `unknown` where it could not tell).
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    git_sha: env!("RT_GIT_SHA"),
    rustc: env!("RT_RUSTC"),
};

/// The metrics registry of a node running `config` (disabled by `[metrics] enabled = false`):
/// the configured tasks on their queues, the consumers' queues, the breakers, limiters and
/// pools read at scrape time, and [`BUILD`].
pub fn metrics(
    config: &Config,
    resources: &Arc<Resources>,
    pools: &BTreeMap<String, Pool>,
) -> Metrics {
    if !config.metrics.enabled {
        return Metrics::disabled();
    }
    let mut metrics = Metrics::new(
        config
            .tasks
            .iter()
            .map(|(name, task)| (name.as_str(), task.queue.as_str())),
        config.queues.keys().map(String::as_str),
    );
    metrics.watch_resources(Arc::clone(resources));
    metrics.watch_pools(pools.values().cloned().collect());
    metrics.build_info(BUILD);
    metrics
}

/// This node's name: `runtime.node_name`, else `<host>-<pid>-<random>` (unique per process,
/// so a restarted node never inherits a dead one's leases by accident).
pub fn node_name(config: &Config) -> String {
    config.runtime.node_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_string());
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        format!("{host}-{}-{suffix}", std::process::id())
    })
}

/// The root supervisor's spec for `config`; `node_started` anchors the node's uptime, and
/// `status` is the state its presence record shows (moved by the program as it stops).
pub fn root_spec(
    config: &Config,
    shared: &Shared,
    resources: Vec<ChildSpec>,
    pools: Vec<ChildSpec>,
    node_started: Instant,
    status: Arc<NodeStatus>,
) -> SupervisorSpec {
    let started_at = std::time::SystemTime::now() - node_started.elapsed();
    let broker_args = {
        let work = Arc::clone(&shared.work);
        let queues: Vec<String> = config.queues.keys().cloned().collect();
        let lease = config.broker.lease;
        move |node| BrokerArgs {
            node,
            broker: Arc::clone(&work.broker),
            leases: Arc::clone(&work.leases),
            queues: queues.clone(),
            lease,
            promote_every: PROMOTE_EVERY,
            metrics: Arc::clone(&work.metrics),
            presence: Some(Presence {
                node: work.consumer.clone(),
                started_at,
                ttl: PRESENCE_TTL,
                status: Arc::clone(&status),
            }),
        }
    };
    let broker = ChildSpec::new("broker", "broker", Restart::Permanent, move |node| {
        (BrokerActor, broker_args(node))
    });
    let interval = config.runtime.heartbeat_interval;
    let heartbeat = ChildSpec::new("heartbeat", "heartbeat", Restart::Permanent, move |node| {
        (
            HeartbeatActor,
            HeartbeatArgs {
                node,
                interval,
                node_started,
            },
        )
    });
    let consumers = config
        .queues
        .iter()
        .map(|(name, queue)| {
            let queue_name = name.clone();
            let settings = queue.settings;
            let drain = config.runtime.shutdown_grace;
            let work = Arc::clone(&shared.work);
            let gate: Arc<dyn ResourceGate> = shared.resources.clone();
            let outcomes = shared.outcomes.get(name).cloned().unwrap_or_default();
            ChildSpec::new(name, "consumer", Restart::Permanent, move |node| {
                let args = ConsumerArgs {
                    node,
                    queue: queue_name.clone(),
                    settings,
                    drain,
                    work: Arc::clone(&work),
                    gate: Arc::clone(&gate),
                    outcomes: Arc::clone(&outcomes),
                };
                (ConsumerActor, args)
            })
        })
        .collect();
    let policy = |children| SupervisorSpec {
        strategy: config.supervision.strategy,
        intensity: config.supervision.intensity,
        backoff: config.supervision.backoff,
        shutdown_timeout: config.runtime.shutdown_grace,
        children,
    };
    let mut children = vec![broker];
    if !resources.is_empty() {
        children.push(ChildSpec::supervisor("resources", policy(resources)));
    }
    if !pools.is_empty() {
        children.push(ChildSpec::supervisor("pools", policy(pools)));
    }
    children.push(ChildSpec::supervisor("queues", policy(consumers)));
    if let Some(celery) = &shared.celery {
        let bridges: Vec<ChildSpec> = celery
            .settings()
            .queues
            .iter()
            .map(|queue| {
                let celery = Arc::clone(celery);
                let queue_name = queue.clone();
                let counters = Arc::new(BridgeCounters::new(
                    shared.work.metrics.celery_bridge(queue),
                ));
                ChildSpec::new(queue, "celery_bridge", Restart::Permanent, move |node| {
                    let args = BridgeArgs {
                        node,
                        celery: Arc::clone(&celery),
                        queue: queue_name.clone(),
                        counters: Arc::clone(&counters),
                    };
                    (BridgeActor, args)
                })
            })
            .collect();
        if !bridges.is_empty() {
            children.push(ChildSpec::supervisor("celery", policy(bridges)));
        }
    }
    let schedules: Vec<Schedule> = config.schedules.values().cloned().collect();
    if !schedules.is_empty() {
        let work = Arc::clone(&shared.work);
        let lease = config.beat.lease;
        children.push(ChildSpec::new(
            "scheduler",
            "scheduler",
            Restart::Permanent,
            move |node| {
                let args = SchedulerArgs {
                    node,
                    broker: Arc::clone(&work.broker),
                    node_name: work.consumer.clone(),
                    lease,
                    tick: BEAT_TICK,
                    schedules: schedules.clone(),
                };
                (SchedulerActor, args)
            },
        ));
    }
    children.push(heartbeat);
    policy(children)
}
