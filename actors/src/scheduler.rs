//! `SchedulerActor`: beat — periodic tasks (`every` or `cron`) enqueued by exactly one leader
//! among the nodes that share a broker (docs/tasks.md, "Schedules (beat)").
//!
//! # Leadership
//!
//! Every node with schedules runs a scheduler; only the one holding the broker's **leader
//! lease** (`Broker::claim_leadership`: `SET p:{beat}:leader <node> NX PX lease`, renewed
//! by compare-and-`PEXPIRE`) enqueues. The leader renews every `lease / 3`; a follower tries
//! to take the lease every `lease / 10`, so when a leader dies another node leads within one
//! lease (plus one follower round). A failed renewal ends leadership at once (the lease may be
//! gone by the time the broker answers again), and a leader never fires past `lease` after the
//! start of its last successful renewal, even before it learns it lost the lease. A clean
//! stop resigns (compare-and-`DEL`), so another node takes over at its next round. The
//! `memory://` broker is process-local: its only node always leads.
//!
//! # At most once per due time
//!
//! Due times are computed the same way on every node, so a new leader agrees with the old
//! one: `every` is aligned to multiples of the interval since the Unix epoch (`every = "5m"`
//! fires at :00, :05, …, in UTC), `cron` uses croner's next occurrence in the schedule's time
//! zone. The enqueue carries the idempotency key `beat:<schedule>:<due_ms>`: should two nodes
//! ever both believe they lead (a paused process, a clock step), the broker still enqueues one
//! task per due time. Jitter adds a random eta delay in `[0, jitter]` after the due time; the
//! due time (and so the key) does not move.
//!
//! # Missed runs
//!
//! After each fire the leader records the schedule's last run (`Broker::record_run`: due time,
//! task id, node). A node that becomes leader compares it with the latest due time at or
//! before now: if due times passed unfired while no node led, `Missed::Skip` forgets them (the
//! next run is the next due time) and `Missed::RunOnce` enqueues one run, for the latest missed
//! due time, at once. A schedule that never ran has missed nothing. While a node leads it fires
//! every due time as it comes (at most [`CATCH_UP`] per round if it fell behind).
//!
//! # Snapshot
//!
//! `role` (`leader`/`follower`), `node`, `holder` (the lease holder as last seen), `lease_ms`,
//! `fired`, and per schedule its `task`, `trigger`, `next_due` and `last_run` (`due`,
//! `task_id`, `node`). Each fire and each leadership change is logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::{
    AnyBroker, BrokerError, Coordination, Envelope, LastRun, TaskQueue, Timestamp, epoch_ms,
    rfc3339,
};
use crate::tree::TreeHandle;

/// Due times a leader fires per schedule and round when it fell behind; the rest are skipped.
pub const CATCH_UP: usize = 16;
/// How often the snapshot (and a follower's view of the last runs) is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// When a schedule is due.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// Every interval, aligned to multiples of it since the Unix epoch (whole milliseconds).
    Every(Duration),
    /// A cron expression read in a time zone.
    Cron {
        /// As written (for the snapshot).
        expression: String,
        /// Parsed.
        cron: Box<croner::Cron>,
        /// The zone its fields are read in.
        timezone: chrono_tz::Tz,
    },
}

impl Trigger {
    /// The first due time strictly after `after`.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        match self {
            Trigger::Every(every) => {
                let step = every_ms(*every);
                let now = epoch_ms(after);
                Some(from_ms((now / step + 1) * step))
            }
            Trigger::Cron { cron, timezone, .. } => {
                let at = chrono::DateTime::<chrono::Utc>::from(after).with_timezone(timezone);
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(SystemTime::from(next.with_timezone(&chrono::Utc)))
            }
        }
    }

    /// The latest due time at or before `at`.
    pub fn latest_at_or_before(&self, at: SystemTime) -> Option<SystemTime> {
        match self {
            Trigger::Every(every) => {
                let step = every_ms(*every);
                Some(from_ms(epoch_ms(at) / step * step))
            }
            Trigger::Cron { cron, timezone, .. } => {
                let at = chrono::DateTime::<chrono::Utc>::from(at).with_timezone(timezone);
                let previous = cron.find_previous_occurrence(&at, true).ok()?;
                Some(SystemTime::from(previous.with_timezone(&chrono::Utc)))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Trigger::Every(every) => format!("every {}", humantime::format_duration(*every)),
            Trigger::Cron {
                expression,
                timezone,
                ..
            } => format!("cron \"{expression}\" ({timezone})"),
        }
    }
}

fn every_ms(every: Duration) -> u64 {
    (every.as_millis() as u64).max(1)
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// What happens to the due times that passed while no node led (`missed = "skip"` or
/// `"run_once"` in a schedule's table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Forget them; run at the next due time.
    #[default]
    Skip,
    /// Enqueue one run, for the latest of them, on takeover.
    RunOnce,
}

/// One periodic task.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its name (`[schedules.NAME]`; part of the idempotency key).
    pub name: String,
    /// The task it enqueues.
    pub task: String,
    pub queue: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// When it is due.
    pub trigger: Trigger,
    /// Random eta delay up to this much after the due time.
    pub jitter: Option<Duration>,
    /// Missed-run policy.
    pub missed: Missed,
}

/// The idempotency key of `schedule`'s run for `due`: the same on every node.
pub fn idempotency_key(schedule: &str, due: SystemTime) -> String {
    format!("beat:{schedule}:{}", epoch_ms(due))
}

/// When the run due at `due` may start: `due` plus a random delay in `[0, jitter]`.
pub fn jittered(due: SystemTime, jitter: Option<Duration>, rng: &mut impl Rng) -> SystemTime {
    match jitter {
        Some(jitter) if !jitter.is_zero() => {
            let ms = rng.random_range(0..=jitter.as_millis() as u64);
            due + Duration::from_millis(ms)
        }
        _ => due,
    }
}

/// The first due time a node that just became leader considers for a schedule: the latest
/// missed one (`RunOnce`, when due times passed since `last_due_ms`), else the next one after
/// `now`. A schedule that never ran (`None`) has missed nothing.
pub fn first_due_on_takeover(
    trigger: &Trigger,
    missed: Missed,
    last_due_ms: Option<u64>,
    now: SystemTime,
) -> Option<SystemTime> {
    if missed == Missed::RunOnce
        && let Some(last) = last_due_ms
        && let Some(latest) = trigger.latest_at_or_before(now)
        && epoch_ms(latest) > last
    {
        return Some(latest);
    }
    trigger.next_after(now)
}

#[derive(Debug, Clone)]
pub struct SchedulerArgs {
    pub node: TreeHandle,
    /// The broker (the lease, the last runs, the enqueues).
    pub broker: Arc<AnyBroker>,
    /// This node's name (the lease holder's value).
    pub node_name: String,
    /// How long the leader lease lasts without a renewal (renewed every third of it).
    pub lease: Duration,
    /// How often due times are checked (a run starts at most this late, plus jitter).
    pub tick: Duration,
    pub schedules: Vec<Schedule>,
}

/// Messages (a timer the actor sends itself).
#[derive(Debug, Clone, Copy)]
pub enum SchedulerMessage {
    /// Renew or claim the lease when its round is due, then fire what is due.
    Tick,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerActor;

#[derive(Debug)]
pub struct SchedulerState {
    args: SchedulerArgs,
    leader: bool,
    holder: Option<String>,
    /// The leader fires only before this (start of the last successful renewal + lease).
    valid_until: Option<Instant>,
    next_claim: Instant,
    next_snapshot: Instant,
    /// Per schedule (same order as `args.schedules`): its next due time while leading.
    next: Vec<Option<SystemTime>>,
    last: HashMap<String, LastRun>,
    fired: u64,
    last_error: Option<String>,
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMessage;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let now = Instant::now();
        let state = SchedulerState {
            next: vec![None; args.schedules.len()],
            args,
            leader: false,
            holder: None,
            valid_until: None,
            next_claim: now,
            next_snapshot: now,
            last: HashMap::new(),
            fired: 0,
            last_error: None,
        };
        myself.cast(SchedulerMessage::Tick)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMessage::Tick => {
                if Instant::now() >= state.next_claim {
                    state.claim().await;
                }
                if state.leading() {
                    state.fire_due().await;
                }
                if Instant::now() >= state.next_snapshot {
                    state.publish().await;
                    state.next_snapshot = Instant::now() + SNAPSHOT_EVERY;
                }
                myself.send_after(state.args.tick, || SchedulerMessage::Tick);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.leader {
            match state
                .args
                .broker
                .resign_leadership(&state.args.node_name)
                .await
            {
                Ok(_) => {
                    info!(node = %state.args.node_name, "beat: leadership given up (stopping)")
                }
                Err(err) => {
                    warn!(error = %err, "beat: cannot give up the leader lease; it expires by itself")
                }
            }
        }
        Ok(())
    }
}

impl SchedulerState {
    fn leading(&self) -> bool {
        self.leader && self.valid_until.is_some_and(|until| Instant::now() < until)
    }

    /// One lease round: renew (leader) or try to take (follower).
    async fn claim(&mut self) {
        let lease = self.args.lease;
        let started = Instant::now();
        let node = self.args.node_name.clone();
        match self.args.broker.claim_leadership(&node, lease).await {
            Ok(holder) if holder == node => {
                self.valid_until = Some(started + lease);
                self.next_claim = started + lease / 3;
                self.last_error = None;
                if !self.leader {
                    self.take_over(self.holder.clone()).await;
                    self.next_snapshot = Instant::now();
                }
                self.holder = Some(holder);
            }
            Ok(holder) => {
                if self.leader {
                    warn!(%node, holder = %holder, "beat: leadership lost: the lease is held by another node");
                    self.next_snapshot = Instant::now();
                } else if self.holder.as_deref() != Some(holder.as_str()) {
                    info!(%node, leader = %holder, "beat: following");
                }
                self.leader = false;
                self.valid_until = None;
                self.holder = Some(holder);
                self.last_error = None;
                self.next_claim = started + follow_every(lease);
            }
            Err(err) => {
                if self.leader {
                    warn!(%node, error = %err, "beat: leadership lost: the lease could not be renewed");
                    self.next_snapshot = Instant::now();
                } else if self.last_error.is_none() {
                    warn!(%node, error = %err, "beat: cannot reach the broker to claim the lease");
                }
                self.leader = false;
                self.valid_until = None;
                self.last_error = Some(err.to_string());
                self.next_claim = started + follow_every(lease);
            }
        }
    }

    /// This node just became leader: where each schedule starts, per its missed-run policy.
    async fn take_over(&mut self, previous: Option<String>) {
        let now = SystemTime::now();
        match self.args.broker.last_runs().await {
            Ok(last) => self.last = last,
            Err(err) => {
                // Without the record nothing can be said to be missed: start at the next due
                // times (the idempotency keys still guard against a double fire).
                warn!(error = %err, "beat: cannot read the last runs; missed runs are not replayed");
            }
        }
        for (i, schedule) in self.args.schedules.iter().enumerate() {
            let last = self.last.get(&schedule.name).map(|r| r.due_ms);
            self.next[i] = first_due_on_takeover(&schedule.trigger, schedule.missed, last, now);
        }
        self.leader = true;
        info!(node = %self.args.node_name, previous = previous.as_deref().unwrap_or("none"),
            lease = ?self.args.lease, "beat: leadership taken; this node enqueues the schedules");
    }

    /// Fires every schedule whose due time has come.
    async fn fire_due(&mut self) {
        for i in 0..self.args.schedules.len() {
            let mut fired = 0;
            while let Some(due) = self.next[i] {
                if due > SystemTime::now() || !self.leading() {
                    break;
                }
                if fired == CATCH_UP {
                    let schedule = &self.args.schedules[i];
                    warn!(schedule = %schedule.name, "beat: fell behind; skipping to the next due time");
                    self.next[i] = schedule.trigger.next_after(SystemTime::now());
                    break;
                }
                if let Err(err) = self.fire(i, due).await {
                    warn!(schedule = %self.args.schedules[i].name, due = %rfc3339(due), error = %err,
                        "beat: enqueue failed; trying again next round");
                    break;
                }
                fired += 1;
                self.next[i] = self.args.schedules[i].trigger.next_after(due);
            }
        }
    }

    async fn fire(&mut self, i: usize, due: SystemTime) -> Result<(), BrokerError> {
        let schedule = &self.args.schedules[i];
        let mut envelope = Envelope::new(&schedule.task, &schedule.queue);
        envelope.args = schedule.args.clone();
        envelope.kwargs = schedule.kwargs.clone();
        envelope.idempotency_key = Some(idempotency_key(&schedule.name, due));
        let start = jittered(due, schedule.jitter, &mut rand::rng());
        if start > due {
            envelope.eta = Some(Timestamp::at(start));
        }
        let sent = self.args.broker.enqueue(vec![envelope]).await?;
        let Some(sent) = sent.into_iter().next() else {
            return Err(BrokerError::Command("enqueue answered nothing".into()));
        };
        let run = LastRun {
            due_ms: epoch_ms(due),
            task_id: sent.id.clone(),
            node: self.args.node_name.clone(),
        };
        if sent.duplicate {
            info!(schedule = %schedule.name, task = %schedule.task, due = %rfc3339(due), due_ms = run.due_ms,
                task_id = %sent.id, "beat: already enqueued for this due time (by another leader)");
        } else {
            self.fired += 1;
            info!(schedule = %schedule.name, task = %schedule.task, due = %rfc3339(due), due_ms = run.due_ms,
                eta = %rfc3339(start), task_id = %sent.id, "beat: fired");
        }
        if let Err(err) = self.args.broker.record_run(&schedule.name, &run).await {
            warn!(schedule = %schedule.name, error = %err, "beat: last run not recorded");
        }
        self.last.insert(schedule.name.clone(), run);
        Ok(())
    }

    async fn publish(&mut self) {
        if !self.leader
            && let Ok(last) = self.args.broker.last_runs().await
        {
            self.last = last;
        }
        let now = SystemTime::now();
        let schedules: Vec<Value> = self
            .args
            .schedules
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let next = if self.leader {
                    self.next[i]
                } else {
                    s.trigger.next_after(now)
                };
                let last = self.last.get(&s.name).map(|r| {
                    json!({
                        "due": rfc3339(from_ms(r.due_ms)),
                        "due_ms": r.due_ms,
                        "task_id": r.task_id,
                        "node": r.node,
                    })
                });
                json!({
                    "name": s.name,
                    "task": s.task,
                    "trigger": s.trigger.describe(),
                    "jitter_ms": s.jitter.map(|j| j.as_millis() as u64),
                    "missed": match s.missed { Missed::Skip => "skip", Missed::RunOnce => "run_once" },
                    "next_due": next.map(rfc3339),
                    "last_run": last,
                })
            })
            .collect();
        self.args.node.publish(json!({
            "role": if self.leading() { "leader" } else { "follower" },
            "node": self.args.node_name,
            "holder": self.holder,
            "lease_ms": self.args.lease.as_millis() as u64,
            "fired": self.fired,
            "last_error": self.last_error,
            "schedules": schedules,
        }));
    }
}

/// How often a follower tries to take the lease.
fn follow_every(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(10))
}

#[cfg(test)]
mod tests;
