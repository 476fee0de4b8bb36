//! `MemoryBroker` (`memory://`): the broker contract in process memory, for single-node use
//! and fast tests. Same semantics as Redis — leases, recovery, delays, poison cap, dead
//! letters, idempotency, records with a TTL — but nothing survives the process.
//!
//! Lease ages use `tokio::time::Instant` (so tests can pause time); due times of delayed
//! entries are wall-clock, like the envelope's `eta`.
//!
//! Chosen task ids are guarded as in Redis (`p:id:<id>`): a guard is taken at enqueue and lives
//! while the entry does (ready, delayed, in flight, retried, requeued), then `result_ttl` after
//! the task's outcome (acked, dead-lettered, poisoned, malformed); a purge drops the guards of
//! what it removed. Everything a call changes happens under one lock, so an outcome's record,
//! ack and event are always written together.
//!
//! Everything lives in this process: when it ends, what the queues still hold is gone.
//! [`MemoryBroker::leftovers`] counts it, queue by queue, so the node can say so as it stops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Broker, BrokerError, BrokerSettings, DeadLetter, Delivery, Enqueued, Envelope, Event, LastRun,
    NodeRecord, Purged, QueueDepth, Recovered, SentDetail, TaskRecord, TaskState, check_id, due_ms,
    entry_arg, epoch_ms, malformed_letter, rfc3339,
};

/// The in-memory broker.
#[derive(Debug)]
pub struct MemoryBroker {
    settings: BrokerSettings,
    state: Mutex<State>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    records: HashMap<String, (TaskRecord, Instant)>,
    idempotency: HashMap<String, (String, Instant)>,
    /// Id guards of chosen task ids: `None` while the task's entry exists, then until when the
    /// id stays taken (`result_ttl` after its outcome).
    ids: HashMap<String, Option<Instant>>,
    events: VecDeque<Event>,
    next_entry: u64,
    next_event: u64,
    /// The beat leader lease: holder and expiry.
    leader: Option<(String, Instant)>,
    /// Last run per schedule.
    runs: HashMap<String, LastRun>,
    /// Presence records and their expiry.
    nodes: BTreeMap<String, (NodeRecord, Instant)>,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<Entry>,
    /// Keyed by (due ms, sequence) so equal due times keep their order.
    delayed: BTreeMap<(u64, u64), String>,
    in_flight: HashMap<String, Leased>,
    dead: VecDeque<DeadLetter>,
}

/// What one queue of a [`MemoryBroker`] still holds ([`MemoryBroker::leftovers`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftover {
    /// The queue.
    pub queue: String,
    /// Entries waiting to be reserved.
    pub ready: u64,
    /// Entries waiting for their time (eta, retry backoff, deferral).
    pub delayed: u64,
    /// Entries reserved by a consumer and not settled (a task still running, or killed).
    pub in_flight: u64,
    /// How many of the ready, delayed and in-flight entries are `link`/`link_error` callbacks
    /// the runtime enqueued for a finished task.
    pub callbacks: u64,
    /// Dead letters.
    pub dead: u64,
}

impl Leftover {
    /// Whether the queue holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.ready + self.delayed + self.in_flight + self.dead == 0
    }
}

/// Whether a stored entry is a callback the runtime enqueued (`link` / `link_error`): it has a
/// parent and the idempotency key `cb:{parent}:…` the task gave it.
fn is_callback(raw: &str) -> bool {
    Envelope::from_json(raw).is_ok_and(|envelope| {
        envelope.parent_id.as_ref().is_some_and(|parent| {
            envelope
                .idempotency_key
                .as_deref()
                .and_then(|key| key.strip_prefix("cb:"))
                .is_some_and(|key| key.starts_with(&format!("{parent}:")))
        })
    })
}

#[derive(Debug)]
struct Entry {
    id: String,
    /// The entry as a producer wrote it (it may be malformed).
    raw: String,
    /// Deliveries before this one became ready again.
    delivered: u32,
}

#[derive(Debug)]
struct Leased {
    entry: Entry,
    consumer: String,
    renewed: Instant,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new(settings: BrokerSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
        }
    }

    /// The tunables it runs with.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// Appends a raw entry as a producer could (tests of malformed input use it).
    pub fn push_raw(&self, queue: &str, raw: &str) {
        let mut state = self.lock();
        let id = state.next_id();
        state.queue(queue).ready.push_back(Entry {
            id,
            raw: raw.to_string(),
            delivered: 0,
        });
        drop(state);
        self.arrived.notify_waiters();
    }

    /// What every queue still holds, by queue name, leaving out the empty ones: what would be
    /// lost if the process ended now. Parses each waiting entry once to count the callbacks
    /// (meant for a stop, not for a hot path).
    pub fn leftovers(&self) -> Vec<Leftover> {
        let state = self.lock();
        let mut out: Vec<Leftover> = state
            .queues
            .iter()
            .map(|(name, q)| {
                let waiting = q
                    .ready
                    .iter()
                    .map(|e| e.raw.as_str())
                    .chain(q.delayed.values().map(String::as_str))
                    .chain(q.in_flight.values().map(|l| l.entry.raw.as_str()));
                Leftover {
                    queue: name.clone(),
                    ready: q.ready.len() as u64,
                    delayed: q.delayed.len() as u64,
                    in_flight: q.in_flight.len() as u64,
                    callbacks: waiting.filter(|raw| is_callback(raw)).count() as u64,
                    dead: q.dead.len() as u64,
                }
            })
            .filter(|leftover| !leftover.is_empty())
            .collect();
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the broker: keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_ready(&self, queue: &str, consumer: &str, max: usize) -> Vec<Delivery> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        let mut malformed = Vec::new();
        let q = state.queue(queue);
        while out.len() < max {
            let Some(entry) = q.ready.pop_front() else {
                break;
            };
            match Envelope::from_json(&entry.raw) {
                Ok(envelope) => {
                    out.push(Delivery {
                        queue: queue.to_string(),
                        entry: entry.id.clone(),
                        deliveries: entry.delivered + 1,
                        size: entry.raw.len(),
                        envelope,
                    });
                    q.in_flight.insert(
                        entry.id.clone(),
                        Leased {
                            entry,
                            consumer: consumer.to_string(),
                            renewed: now,
                        },
                    );
                }
                Err(err) => malformed.push((entry, err.to_string())),
            }
        }
        for (entry, err) in malformed {
            if let Some(id) = Envelope::id_in(&entry.raw) {
                state.id_ended(&id, now + self.settings.result_ttl);
            }
            let reason = format!("malformed entry: {err}");
            let event = Event {
                id: String::new(),
                kind: "dead".into(),
                at: rfc3339(SystemTime::now()),
                task_id: None,
                task: None,
                queue: Some(queue.to_string()),
                detail: serde_json::json!({ "reason": reason, "entry": entry.id }),
            };
            // A dead letter gets an id of its own, as in Redis (a new entry of the dead
            // stream): dead letters are then in id order, which paging relies on.
            let dead_id = state.next_id();
            state.queue(queue).dead.push_back(DeadLetter {
                entry: dead_id,
                reason,
                attempts: 0,
                at: rfc3339(SystemTime::now()),
                envelope: None,
                raw: Some(entry.raw),
            });
            state.event(event, self.settings.events_maxlen);
        }
        out
    }

    /// Removes a leased entry; `None` when the lease was lost.
    fn release(&self, state: &mut State, delivery: &Delivery) -> Option<Leased> {
        state
            .queue(&delivery.queue)
            .in_flight
            .remove(&delivery.entry)
    }

    /// Records the task's new state and its event.
    fn record(&self, state: &mut State, envelope: &Envelope, record: Outcome<'_>) {
        let (task_state, result, error) = match record {
            Outcome::Succeeded(value) => (TaskState::Succeeded, Some(value), None),
            Outcome::Retrying(err) => (TaskState::Retrying, None, Some(err.to_string())),
            Outcome::Dead(err) => (TaskState::Dead, None, Some(err.to_string())),
        };
        let kind = match task_state {
            TaskState::Succeeded => "succeeded",
            TaskState::Retrying => "retried",
            TaskState::Dead => "dead",
        };
        let detail = serde_json::json!({ "attempt": envelope.attempt, "error": error });
        state.event(
            Event::about(kind, envelope, detail),
            self.settings.events_maxlen,
        );
        let now = Instant::now();
        if task_state != TaskState::Retrying {
            state.id_ended(&envelope.id, now + self.settings.result_ttl);
        }
        let record = TaskRecord {
            id: envelope.id.clone(),
            task: envelope.task.clone(),
            queue: envelope.queue.clone(),
            state: task_state,
            result,
            error,
            attempts: envelope.attempt.saturating_add(1),
            updated_at: rfc3339(SystemTime::now()),
        };
        // Expired records, idempotency keys and id guards are dropped every so often, so a
        // long-running node keeps only what its TTLs promise.
        if state.records.len() % 4096 == 4095 {
            state.records.retain(|_, (_, expires)| *expires > now);
            state.idempotency.retain(|_, (_, expires)| *expires > now);
            state
                .ids
                .retain(|_, until| until.is_none_or(|until| until > now));
        }
        let expires = now + self.settings.result_ttl;
        state.records.insert(envelope.id.clone(), (record, expires));
    }
}

enum Outcome<'a> {
    Succeeded(Value),
    Retrying(&'a str),
    Dead(&'a str),
}

/// The position of an event id (`N-0`; a bare `N` is accepted, anything else is 0).
fn event_seq(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl State {
    /// Whether the chosen id `id` is taken (its entry exists, or its task ended less than
    /// `result_ttl` ago).
    fn id_taken(&self, id: &str, now: Instant) -> bool {
        match self.ids.get(id) {
            Some(None) => true,
            Some(Some(until)) => *until > now,
            None => false,
        }
    }

    /// The task of `id` ended: its guard, if it has one, lasts until `until`.
    fn id_ended(&mut self, id: &str, until: Instant) {
        if let Some(guard) = self.ids.get_mut(id) {
            *guard = Some(until);
        }
    }

    fn event(&mut self, mut event: Event, cap: usize) {
        if cap == 0 {
            return;
        }
        self.next_event += 1;
        event.id = format!("{}-0", self.next_event);
        if self.events.len() >= cap {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn queue(&mut self, name: &str) -> &mut Queue {
        self.queues.entry(name.to_string()).or_default()
    }

    fn next_id(&mut self) -> String {
        self.next_entry += 1;
        format!("{}-0", self.next_entry)
    }

    fn next_seq(&mut self) -> u64 {
        self.next_entry += 1;
        self.next_entry
    }

    fn push_ready(&mut self, queue: &str, envelope: &Envelope, delivered: u32) {
        self.push_ready_raw(queue, envelope.to_json(), delivered);
    }

    fn push_ready_raw(&mut self, queue: &str, raw: String, delivered: u32) {
        let id = self.next_id();
        self.queue(queue)
            .ready
            .push_back(Entry { id, raw, delivered });
    }

    fn push_delayed(&mut self, queue: &str, due_ms: u64, envelope: &Envelope) {
        self.push_delayed_raw(queue, due_ms, envelope.to_json());
    }

    fn push_delayed_raw(&mut self, queue: &str, due_ms: u64, raw: String) {
        let seq = self.next_seq();
        self.queue(queue).delayed.insert((due_ms, seq), raw);
    }
}

/// An envelope checked and completed for enqueue.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) envelope: Envelope,
    /// Its JSON, as it will be stored.
    pub(crate) json: String,
    /// Its due time (delayed-set score) when the eta is in the future.
    pub(crate) due: Option<u64>,
    /// The producer chose its id (guarded: a second enqueue of it is a duplicate); false for a
    /// generated UUID.
    pub(crate) chosen: bool,
}

/// Checks and completes every envelope of a batch (see [`prepare`]), in order; the first
/// problem fails the whole batch.
pub(crate) fn prepare_batch(
    batch: Vec<Envelope>,
    now: SystemTime,
    settings: &BrokerSettings,
) -> Result<Vec<Prepared>, BrokerError> {
    let mut prepared = Vec::with_capacity(batch.len());
    for (index, mut envelope) in batch.into_iter().enumerate() {
        let chosen = !envelope.id.is_empty();
        let due = prepare(&mut envelope, now)?;
        let json = envelope.to_json();
        if json.len() > settings.max_entry_bytes {
            return Err(BrokerError::TooLarge {
                index,
                task: envelope.task,
                size: json.len(),
                limit: settings.max_entry_bytes,
            });
        }
        prepared.push(Prepared {
            envelope,
            json,
            due,
            chosen,
        });
    }
    Ok(prepared)
}

/// Checks a chosen id ([`check_id`]), fills in the id, enqueue time and trace id; returns the
/// wall-clock due time when the eta is in the future. An `eta` or `expires` that is not a time,
/// or an eta past the cap, is refused ([`Envelope::due`], [`Envelope::expiry`]).
fn prepare(envelope: &mut Envelope, now: SystemTime) -> Result<Option<u64>, BrokerError> {
    if envelope.task.is_empty() {
        return Err(BrokerError::Invalid("task: must not be empty".into()));
    }
    if envelope.queue.is_empty() {
        return Err(BrokerError::Invalid("queue: must not be empty".into()));
    }
    if !envelope.id.is_empty() {
        check_id(&envelope.id).map_err(|why| BrokerError::Invalid(format!("id: {why}")))?;
    }
    // A new trace gets the W3C trace-id shape (32 lowercase hex digits); a fresh task id and
    // its trace id share one random UUID.
    let mut fresh = None;
    if envelope.id.is_empty() {
        let uuid = uuid::Uuid::new_v4();
        envelope.id = uuid.to_string();
        fresh = Some(uuid);
    }
    if envelope.enqueued_at.is_empty() {
        envelope.enqueued_at = rfc3339(now);
    }
    if envelope.trace_id.is_none() {
        let uuid = fresh.unwrap_or_else(uuid::Uuid::new_v4);
        envelope.trace_id = Some(uuid.simple().to_string());
    }
    let invalid = |err: super::FieldError| BrokerError::Invalid(err.to_string());
    envelope.expiry().map_err(invalid)?;
    let due = envelope.due(now).map_err(invalid)?;
    Ok(due.filter(|due| *due > now).map(due_ms))
}

impl Broker for MemoryBroker {
    async fn enqueue(&self, batch: Vec<Envelope>) -> Result<Vec<Enqueued>, BrokerError> {
        let prepared = prepare_batch(batch, SystemTime::now(), &self.settings)?;
        let mut out = Vec::with_capacity(prepared.len());
        {
            let mut state = self.lock();
            let clock = Instant::now();
            for Prepared {
                envelope,
                json,
                due,
                chosen,
            } in prepared
            {
                if let Some(key) = &envelope.idempotency_key {
                    match state.idempotency.get(key) {
                        Some((first, expires)) if *expires > clock => {
                            out.push(Enqueued {
                                id: first.clone(),
                                duplicate: true,
                            });
                            continue;
                        }
                        _ => {
                            let ttl = self.settings.idempotency_ttl_for(&envelope.task);
                            let expires = clock + ttl;
                            state
                                .idempotency
                                .insert(key.clone(), (envelope.id.clone(), expires));
                        }
                    }
                }
                if chosen {
                    if state.id_taken(&envelope.id, clock) {
                        out.push(Enqueued {
                            id: envelope.id,
                            duplicate: true,
                        });
                        continue;
                    }
                    state.ids.insert(envelope.id.clone(), None);
                }
                match due {
                    Some(due_ms) => state.push_delayed_raw(&envelope.queue, due_ms, json),
                    None => state.push_ready_raw(&envelope.queue, json, 0),
                }
                let detail = serde_json::to_value(SentDetail::of(&envelope)).unwrap_or(Value::Null);
                state.event(
                    Event::about("sent", &envelope, detail),
                    self.settings.events_maxlen,
                );
                out.push(Enqueued {
                    id: envelope.id,
                    duplicate: false,
                });
            }
        }
        self.arrived.notify_waiters();
        Ok(out)
    }

    async fn reserve(
        &self,
        queue: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let got = self.take_ready(queue, consumer, max);
            if !got.is_empty() || max == 0 || Instant::now() >= deadline {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(self.take_ready(queue, consumer, max));
            }
        }
    }

    async fn renew(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<Vec<String>, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        let q = state.queue(queue);
        let mut lost = Vec::new();
        for entry in entries {
            match q.in_flight.get_mut(entry) {
                Some(leased) if leased.consumer == consumer => leased.renewed = now,
                _ => lost.push(entry.clone()),
            }
        }
        Ok(lost)
    }

    async fn ack(&self, delivery: &Delivery, result: Value) -> Result<(), BrokerError> {
        let mut state = self.lock();
        self.release(&mut state, delivery);
        self.record(&mut state, &delivery.envelope, Outcome::Succeeded(result));
        Ok(())
    }

    async fn ack_many(&self, done: &[(Delivery, Value)]) -> Result<(), BrokerError> {
        let mut state = self.lock();
        for (delivery, result) in done {
            self.release(&mut state, delivery);
            self.record(
                &mut state,
                &delivery.envelope,
                Outcome::Succeeded(result.clone()),
            );
        }
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        error: &str,
    ) -> Result<(), BrokerError> {
        let mut next = delivery.envelope.clone();
        next.attempt = next.attempt.saturating_add(1);
        let mut state = self.lock();
        self.release(&mut state, delivery);
        state.push_delayed(&delivery.queue, due_ms(at), &next);
        self.record(&mut state, &delivery.envelope, Outcome::Retrying(error));
        Ok(())
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut state = self.lock();
        self.release(&mut state, delivery);
        state.push_delayed(&delivery.queue, due_ms(at), &delivery.envelope);
        let detail = serde_json::json!({ "reason": reason, "until": rfc3339(at) });
        state.event(
            Event::about("deferred", &delivery.envelope, detail),
            self.settings.events_maxlen,
        );
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        let mut state = self.lock();
        self.release(&mut state, delivery);
        let id = state.next_id();
        state.queue(&delivery.queue).dead.push_back(DeadLetter {
            entry: id,
            reason: reason.to_string(),
            attempts: delivery.envelope.attempt.saturating_add(1),
            at: rfc3339(SystemTime::now()),
            envelope: Some(delivery.envelope.clone()),
            raw: None,
        });
        self.record(&mut state, &delivery.envelope, Outcome::Dead(reason));
        Ok(())
    }

    async fn recover(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        let max = self.settings.max_deliveries;
        let q = state.queue(queue);
        let mut expired: Vec<String> = q
            .in_flight
            .iter()
            .filter(|(_, l)| now.duration_since(l.renewed) >= lease)
            .map(|(id, _)| id.clone())
            .collect();
        // Oldest first, so redelivery keeps the original order.
        expired.sort_by_key(|id| id.split('-').next().and_then(|n| n.parse::<u64>().ok()));
        let mut out = Recovered::default();
        let mut events = Vec::new();
        let mut poisoned = Vec::new();
        let mut letters = Vec::new();
        for id in expired {
            let Some(leased) = q.in_flight.remove(&id) else {
                continue;
            };
            let delivered = leased.entry.delivered + 1;
            let envelope = Envelope::from_json(&leased.entry.raw).ok();
            let detail =
                serde_json::json!({ "deliveries": delivered, "consumer": leased.consumer });
            if delivered >= max {
                if let Some(envelope) = &envelope {
                    events.push(Event::about("dead", envelope, detail));
                    out.dead_tasks.push(envelope.task.clone());
                }
                if let Some(id) = Envelope::id_in(&leased.entry.raw) {
                    poisoned.push(id);
                }
                letters.push(DeadLetter {
                    entry: String::new(),
                    reason: format!(
                        "delivered {delivered} times without an ack (max_deliveries = {max})"
                    ),
                    attempts: envelope.as_ref().map_or(0, |e| e.attempt.saturating_add(1)),
                    at: rfc3339(SystemTime::now()),
                    raw: envelope.is_none().then_some(leased.entry.raw),
                    envelope,
                });
                out.dead += 1;
            } else {
                if let Some(envelope) = &envelope {
                    events.push(Event::about("recovered", envelope, detail));
                }
                q.ready.push_back(Entry {
                    delivered,
                    ..leased.entry
                });
                out.requeued += 1;
            }
        }
        for mut letter in letters {
            letter.entry = state.next_id();
            state.queue(queue).dead.push_back(letter);
        }
        for event in events {
            state.event(event, self.settings.events_maxlen);
        }
        for id in poisoned {
            state.id_ended(&id, now + self.settings.result_ttl);
        }
        drop(state);
        if out.requeued > 0 {
            self.arrived.notify_waiters();
        }
        Ok(out)
    }

    async fn promote_due(&self, queue: &str, now: SystemTime) -> Result<u64, BrokerError> {
        let now_ms = epoch_ms(now);
        let mut state = self.lock();
        let q = state.queue(queue);
        let later = q.delayed.split_off(&(now_ms + 1, 0));
        let due = std::mem::replace(&mut q.delayed, later);
        let moved = due.len() as u64;
        for raw in due.into_values() {
            let id = state.next_id();
            state.queue(queue).ready.push_back(Entry {
                id,
                raw,
                delivered: 0,
            });
        }
        drop(state);
        if moved > 0 {
            self.arrived.notify_waiters();
        }
        Ok(moved)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let mut state = self.lock();
        let q = state.queue(queue);
        Ok(QueueDepth {
            ready: q.ready.len() as u64,
            delayed: q.delayed.len() as u64,
            in_flight: q.in_flight.len() as u64,
            dead: q.dead.len() as u64,
        })
    }

    async fn dead_letters_after(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let after = match after {
            Some(after) => {
                entry_arg(after)?;
                Some(entry_seq(after))
            }
            None => None,
        };
        let mut state = self.lock();
        let dead = &state.queue(queue).dead;
        // Dead letters are in id order: a binary search finds the first one after `after`.
        let from = after.map_or(0, |after| {
            dead.partition_point(|l| entry_seq(&l.entry) <= after)
        });
        Ok(dead.range(from..).take(limit).cloned().collect())
    }

    async fn requeue_dead(&self, queue: &str, limit: usize) -> Result<u64, BrokerError> {
        let mut state = self.lock();
        let dead = std::mem::take(&mut state.queue(queue).dead);
        let mut moved = 0;
        let mut kept = VecDeque::new();
        for letter in dead {
            match (&letter.envelope, moved < limit as u64) {
                (Some(envelope), true) => {
                    let mut envelope = envelope.clone();
                    envelope.attempt = 0;
                    // Its entry exists again: its id is taken until its next outcome.
                    state.ids.insert(envelope.id.clone(), None);
                    state.push_ready(queue, &envelope, 0);
                    moved += 1;
                }
                _ => kept.push_back(letter),
            }
        }
        state.queue(queue).dead = kept;
        drop(state);
        if moved > 0 {
            self.arrived.notify_waiters();
        }
        Ok(moved)
    }

    async fn requeue_dead_entry(
        &self,
        queue: &str,
        entry: &str,
    ) -> Result<Option<String>, BrokerError> {
        entry_arg(entry)?;
        let mut state = self.lock();
        let dead = &mut state.queue(queue).dead;
        let Some(at) = dead.iter().position(|l| l.entry == entry) else {
            return Ok(None);
        };
        let Some(envelope) = dead[at].envelope.clone() else {
            return Err(malformed_letter(queue, entry));
        };
        dead.remove(at);
        let mut envelope = envelope;
        envelope.attempt = 0;
        state.ids.insert(envelope.id.clone(), None);
        state.push_ready(queue, &envelope, 0);
        drop(state);
        self.arrived.notify_waiters();
        Ok(Some(envelope.id))
    }

    async fn delete_dead(&self, queue: &str, entry: &str) -> Result<bool, BrokerError> {
        entry_arg(entry)?;
        let mut state = self.lock();
        let dead = &mut state.queue(queue).dead;
        let at = dead.iter().position(|l| l.entry == entry);
        Ok(at.and_then(|at| dead.remove(at)).is_some())
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut state = self.lock();
        let dead = std::mem::take(&mut state.queue(queue).dead);
        Ok(dead.len() as u64)
    }

    async fn purge(&self, queue: &str) -> Result<Purged, BrokerError> {
        let mut state = self.lock();
        let q = state.queue(queue);
        let purged = Purged {
            ready: q.ready.len() as u64,
            delayed: q.delayed.len() as u64,
        };
        let ready = std::mem::take(&mut q.ready);
        let delayed = std::mem::take(&mut q.delayed);
        // Their ids are free again: nothing of them is left.
        let raws = ready.iter().map(|e| &e.raw).chain(delayed.values());
        for id in raws
            .filter_map(|raw| Envelope::id_in(raw))
            .collect::<Vec<_>>()
        {
            state.ids.remove(&id);
        }
        Ok(purged)
    }

    async fn publish(&self, event: Event) -> Result<(), BrokerError> {
        self.lock().event(event, self.settings.events_maxlen);
        Ok(())
    }

    fn publish_soon(&self, event: Event) {
        // No round trip to save: written at once, so before any later outcome.
        self.lock().event(event, self.settings.events_maxlen);
    }

    async fn events(&self, after: Option<&str>, limit: usize) -> Result<Vec<Event>, BrokerError> {
        let after = after.map_or(0, event_seq);
        let state = self.lock();
        // Ids grow with the position: a binary search finds the first one after `after`.
        let from = state.events.partition_point(|e| event_seq(&e.id) <= after);
        Ok(state.events.range(from..).take(limit).cloned().collect())
    }

    async fn events_before(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, BrokerError> {
        let state = self.lock();
        let end = match before {
            Some(id) => {
                let before = event_seq(id);
                state.events.partition_point(|e| event_seq(&e.id) < before)
            }
            None => state.events.len(),
        };
        let from = end.saturating_sub(limit);
        Ok(state.events.range(from..end).cloned().collect())
    }

    async fn record(&self, id: &str) -> Result<Option<TaskRecord>, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.records.get(id) {
            Some((record, expires)) if *expires > now => Ok(Some(record.clone())),
            Some(_) => {
                state.records.remove(id);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn hand_back(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<u64, BrokerError> {
        let mut state = self.lock();
        let q = state.queue(queue);
        let mut back = Vec::new();
        for id in entries {
            if q.in_flight.get(id).is_some_and(|l| l.consumer == consumer)
                && let Some(leased) = q.in_flight.remove(id)
            {
                back.push(leased.entry);
            }
        }
        // First in line again, in their original order: they were next before being reserved.
        back.sort_by_key(|e| entry_seq(&e.id));
        let moved = back.len() as u64;
        for entry in back.into_iter().rev() {
            q.ready.push_front(entry);
        }
        drop(state);
        if moved > 0 {
            self.arrived.notify_waiters();
        }
        Ok(moved)
    }

    async fn claim_leadership(&self, node: &str, lease: Duration) -> Result<String, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        match &mut state.leader {
            Some((holder, expires)) if *expires > now => {
                if holder == node {
                    *expires = now + lease;
                }
                Ok(holder.clone())
            }
            _ => {
                state.leader = Some((node.to_string(), now + lease));
                Ok(node.to_string())
            }
        }
    }

    async fn resign_leadership(&self, node: &str) -> Result<bool, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        let held =
            matches!(&state.leader, Some((holder, expires)) if holder == node && *expires > now);
        if held {
            state.leader = None;
        }
        Ok(held)
    }

    async fn last_runs(&self) -> Result<HashMap<String, LastRun>, BrokerError> {
        Ok(self.lock().runs.clone())
    }

    async fn record_run(&self, schedule: &str, run: &LastRun) -> Result<(), BrokerError> {
        self.lock().runs.insert(schedule.to_string(), run.clone());
        Ok(())
    }

    async fn announce_node(&self, record: &NodeRecord, ttl: Duration) -> Result<(), BrokerError> {
        self.lock()
            .nodes
            .insert(record.name.clone(), (record.clone(), Instant::now() + ttl));
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        state.nodes.retain(|_, (_, expires)| *expires > now);
        Ok(state.nodes.values().map(|(r, _)| r.clone()).collect())
    }

    async fn forget_node(&self, name: &str) -> Result<(), BrokerError> {
        self.lock().nodes.remove(name);
        Ok(())
    }
}

/// The sequence number of an entry id (ids are given in order).
fn entry_seq(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::MemoryBroker;
    use crate::broker::BrokerSettings;
    use crate::broker::contract::{RawProducer, contract_suite, settings};

    impl RawProducer for MemoryBroker {
        async fn push_raw(&self, queue: &str, raw: &str) {
            MemoryBroker::push_raw(self, queue, raw);
        }
    }

    contract_suite!(async { MemoryBroker::new(settings()) });

    #[tokio::test]
    async fn leftovers_count_what_each_queue_still_holds_callbacks_included() {
        use super::Leftover;
        use crate::broker::{Broker, Envelope};
        use std::time::{Duration, SystemTime};
        let broker = MemoryBroker::new(settings());
        assert_eq!(broker.leftovers(), Vec::<Leftover>::new());
        let mut callback = Envelope::new("notify", "notes");
        callback.parent_id = Some("p-1".into());
        callback.idempotency_key = Some("cb:p-1:0:notify".into());
        // A caller's own key that merely looks like one is not a callback.
        let mut lookalike = Envelope::new("notify", "notes");
        lookalike.idempotency_key = Some("cb:p-2:0:notify".into());
        let mut later = Envelope::new("work", "chat");
        later.eta = Some(crate::broker::rfc3339(
            SystemTime::now() + Duration::from_secs(86_400),
        ));
        let batch = vec![
            Envelope::new("work", "chat"),
            Envelope::new("work", "chat"),
            Envelope::new("work", "chat"),
            later,
            callback,
            lookalike,
        ];
        broker.enqueue(batch).await.unwrap();
        let taken = broker
            .reserve("chat", "n1", 2, Duration::ZERO)
            .await
            .unwrap();
        broker.dead_letter(&taken[0], "boom").await.unwrap();
        broker
            .retry(
                &taken[1],
                SystemTime::now() + Duration::from_secs(60),
                "again",
            )
            .await
            .unwrap();
        broker
            .reserve("chat", "n1", 1, Duration::ZERO)
            .await
            .unwrap();
        broker.depth("empty").await.unwrap();
        assert_eq!(
            broker.leftovers(),
            [
                Leftover {
                    queue: "chat".into(),
                    ready: 0,
                    delayed: 2,
                    in_flight: 1,
                    callbacks: 0,
                    dead: 1,
                },
                Leftover {
                    queue: "notes".into(),
                    ready: 2,
                    callbacks: 1,
                    ..Leftover::default()
                },
            ]
        );
    }

    #[tokio::test]
    async fn events_off_write_nothing() {
        let settings = BrokerSettings {
            events_maxlen: 0,
            ..settings()
        };
        crate::broker::contract::events_off_write_nothing(&MemoryBroker::new(settings), "chat")
            .await;
    }
}
