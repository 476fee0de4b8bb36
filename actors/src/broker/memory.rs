//! `MemoryBroker` (`memory://`): the broker contract in process memory, for single-node use
//! and fast tests. Same semantics as Redis — leases, recovery, delays, poison cap, dead
//! letters, idempotency, records with a TTL — but nothing survives the process.
//!
//! Lease ages use `tokio::time::Instant` (so tests can pause time); due times of delayed
//! entries are wall-clock, like the envelope's `eta`.
//!
//! Records are kept as in Redis (`StoredRecord`): written at enqueue, without expiry while
//! the entry exists (ready, delayed, in flight, retried, requeued), then `result_ttl` after the
//! task's outcome (acked, dead-lettered, poisoned); a purge drops the records of what it
//! removed. A chosen id is taken while its record exists. Everything a call changes happens
//! under one lock, so an outcome's record, ack and event are always written together; the
//! start marker and `started` event ([`TaskQueue::started`]) are written at once (no round trip
//! to save). Revocations are kept in `Revocations` for `result_ttl`.
//!
//! Everything lives in this process: when it ends, what the queues still hold is gone.
//! [`MemoryBroker::leftovers`] counts it, queue by queue, so the node can say so as it stops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::outcome::{
    Next, Outcome, Writes, malformed_event, recovery_event, sent_event, started_event,
};
use super::revocations::Revocations;
use super::{
    Admin, BrokerError, BrokerSettings, Coordination, DeadLetter, Delivery, Enqueued, Envelope,
    Event, LastRun, NodeRecord, Purged, QueueDepth, REVOKED, Records, Recovered, Revocation,
    Revoked, StoredRecord, TaskQueue, TaskRecord, TaskState, check_id, due_ms, entry_arg, epoch_ms,
    malformed_letter, rfc3339,
};

/// The in-memory broker.
#[derive(Debug)]
pub struct MemoryBroker {
    settings: BrokerSettings,
    state: Mutex<State>,
    arrived: Notify,
    revocations: Revocations,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// Records and until when they are kept: `None` while the task's entry exists, then
    /// `result_ttl` after its outcome.
    records: HashMap<String, (StoredRecord, Option<Instant>)>,
    idempotency: HashMap<String, (String, Instant)>,
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
    /// Puts a dead letter's envelope back on `queue` with its attempts reset: its entry exists
    /// again, so it gets a fresh record (kept until its next outcome, its first enqueue time
    /// kept), and — requeued on purpose — a revocation no longer holds it back.
    fn revive(&self, state: &mut State, queue: &str, envelope: &Envelope) {
        let mut envelope = envelope.clone();
        envelope.attempt = 0;
        let mut record = StoredRecord::enqueued(&envelope, None, &rfc3339(SystemTime::now()));
        if let Some((old, _)) = state.records.get(&envelope.id) {
            record.enqueued_at = old.enqueued_at.clone();
        }
        state.records.insert(envelope.id.clone(), (record, None));
        self.revocations.remove(&envelope.id);
        state.push_ready(queue, &envelope, 0);
    }

    /// An empty broker.
    pub fn new(settings: BrokerSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
            revocations: Revocations::default(),
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
                state.record_ended(&id, now + self.settings.result_ttl);
            }
            let reason = format!("malformed entry: {err}");
            let at = rfc3339(SystemTime::now());
            let event = malformed_event(queue, &entry.id, &reason, &at);
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

    /// Writes an outcome of `delivery` ([`Outcome::writes`]): releases its entry, puts it
    /// where it goes next, changes its record and adds its event.
    fn settle(&self, state: &mut State, delivery: &Delivery, outcome: Outcome<'_>) {
        let at = rfc3339(SystemTime::now());
        let Writes {
            next,
            record: change,
            event,
        } = outcome.writes(&delivery.envelope, &at);
        let envelope = &delivery.envelope;
        self.release(state, delivery);
        match next {
            Next::Gone => {}
            Next::Delayed { due_ms, json } => state.push_delayed_raw(&delivery.queue, due_ms, json),
            Next::Dead { reason, attempts } => {
                let id = state.next_id();
                state.queue(&delivery.queue).dead.push_back(DeadLetter {
                    entry: id,
                    reason,
                    attempts,
                    at: at.clone(),
                    envelope: Some(envelope.clone()),
                    raw: None,
                });
            }
        }
        state.event(event, self.settings.events_maxlen);
        let now = Instant::now();
        // Expired records and idempotency keys are dropped every so often, so a long-running
        // node keeps only what its TTLs promise.
        if state.records.len() % 4096 == 4095 {
            state
                .records
                .retain(|_, (_, until)| until.is_none_or(|until| until > now));
            state.idempotency.retain(|_, (_, expires)| *expires > now);
        }
        change.apply(state.record_of(envelope), &at);
        let until = change.ends().then(|| now + self.settings.result_ttl);
        state.keep_record(&envelope.id, until);
    }
}

/// The position of an event id (`N-0`; a bare `N` is accepted, anything else is 0).
fn event_seq(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl State {
    /// Whether task `id` has a record (its entry exists, or it ended less than `result_ttl`
    /// ago): a chosen id is then taken.
    fn record_exists(&self, id: &str, now: Instant) -> bool {
        self.records
            .get(id)
            .is_some_and(|(_, until)| until.is_none_or(|until| until > now))
    }

    /// The record of `envelope`'s task, made (empty) when it has none or it expired (an entry
    /// another producer wrote); its id, task and queue set from the envelope.
    fn record_of(&mut self, envelope: &Envelope) -> &mut StoredRecord {
        let now = Instant::now();
        let (record, until) = self
            .records
            .entry(envelope.id.clone())
            .or_insert_with(|| (StoredRecord::default(), None));
        if until.is_some_and(|until| until <= now) {
            *record = StoredRecord::default();
            *until = None;
        }
        envelope.id.clone_into(&mut record.id);
        envelope.task.clone_into(&mut record.task);
        envelope.queue.clone_into(&mut record.queue);
        record
    }

    /// Sets until when the record of `id` is kept (`None`: while its entry exists).
    fn keep_record(&mut self, id: &str, until: Option<Instant>) {
        if let Some((_, kept)) = self.records.get_mut(id) {
            *kept = until;
        }
    }

    /// The task of `id` ended without an outcome of its own (a malformed entry): its record,
    /// if it has one, lasts until `until`.
    fn record_ended(&mut self, id: &str, until: Instant) {
        self.keep_record(id, Some(until));
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

impl TaskQueue for MemoryBroker {
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
                if chosen && state.record_exists(&envelope.id, clock) {
                    out.push(Enqueued {
                        id: envelope.id,
                        duplicate: true,
                    });
                    continue;
                }
                let record = StoredRecord::enqueued(&envelope, due, &envelope.enqueued_at);
                state.records.insert(envelope.id.clone(), (record, None));
                match due {
                    Some(due_ms) => state.push_delayed_raw(&envelope.queue, due_ms, json),
                    None => state.push_ready_raw(&envelope.queue, json, 0),
                }
                let event = sent_event(&envelope, &envelope.enqueued_at);
                state.event(event, self.settings.events_maxlen);
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
        self.settle(&mut self.lock(), delivery, Outcome::Succeeded(&result));
        Ok(())
    }

    async fn ack_unrecorded(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut state = self.lock();
        self.settle(&mut state, delivery, Outcome::Succeeded(&Value::Null));
        state.records.remove(&delivery.envelope.id);
        Ok(())
    }

    async fn ack_many(&self, done: &[(Delivery, Value)]) -> Result<(), BrokerError> {
        let mut state = self.lock();
        for (delivery, result) in done {
            self.settle(&mut state, delivery, Outcome::Succeeded(result));
        }
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        error: &str,
    ) -> Result<(), BrokerError> {
        self.settle(&mut self.lock(), delivery, Outcome::Retried { at, error });
        Ok(())
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        reason: &str,
    ) -> Result<(), BrokerError> {
        self.settle(&mut self.lock(), delivery, Outcome::Deferred { at, reason });
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.settle(&mut self.lock(), delivery, Outcome::Dead(reason));
        Ok(())
    }

    async fn recover(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
        let mut state = self.lock();
        let now = Instant::now();
        let at = rfc3339(SystemTime::now());
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
        let mut requeued = Vec::new();
        let mut letters = Vec::new();
        for id in expired {
            let Some(leased) = q.in_flight.remove(&id) else {
                continue;
            };
            let delivered = leased.entry.delivered + 1;
            let envelope = Envelope::from_json(&leased.entry.raw).ok();
            let dead = delivered >= max;
            let event = |envelope| {
                let deliveries = u64::from(delivered);
                recovery_event(
                    dead,
                    Some(envelope),
                    queue,
                    deliveries,
                    &leased.consumer,
                    &at,
                )
            };
            if dead {
                if let Some(envelope) = &envelope {
                    events.push(event(envelope));
                    out.dead_tasks.push(envelope.task.clone());
                }
                let reason =
                    format!("delivered {delivered} times without an ack (max_deliveries = {max})");
                if let Some(envelope) = &envelope {
                    poisoned.push((envelope.clone(), reason.clone()));
                }
                letters.push(DeadLetter {
                    entry: String::new(),
                    reason,
                    attempts: envelope.as_ref().map_or(0, |e| e.attempt.saturating_add(1)),
                    at: rfc3339(SystemTime::now()),
                    raw: envelope.is_none().then_some(leased.entry.raw),
                    envelope,
                });
                out.dead += 1;
            } else {
                if let Some(envelope) = &envelope {
                    events.push(event(envelope));
                    requeued.push(envelope.id.clone());
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
        for (envelope, reason) in poisoned {
            let record = state.record_of(&envelope);
            record.state = Some(TaskState::Dead);
            record.error = Some(reason);
            record.updated_at = rfc3339(SystemTime::now());
            state.keep_record(&envelope.id, Some(now + self.settings.result_ttl));
        }
        // Their attempt is over (its node lost the lease): no longer running, still counted.
        for id in requeued {
            if let Some((record, _)) = state.records.get_mut(&id) {
                record.lost = true;
            }
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

    fn started(&self, delivery: &Delivery, consumer: &str) {
        let envelope = &delivery.envelope;
        // No round trip to save: written at once, so before any later outcome.
        let at = rfc3339(SystemTime::now());
        let mut state = self.lock();
        let record = state.record_of(envelope);
        record.started = Some(envelope.attempt);
        record.lost = false;
        record.started_at = Some(at.clone());
        record.node = Some(consumer.to_string());
        record.updated_at = at;
        state.event(
            started_event(envelope, consumer),
            self.settings.events_maxlen,
        );
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
}

impl Records for MemoryBroker {
    async fn publish(&self, event: Event) -> Result<(), BrokerError> {
        self.lock().event(event, self.settings.events_maxlen);
        Ok(())
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
        if !state.record_exists(id, now) {
            state.records.remove(id);
            return Ok(None);
        }
        let now_ms = epoch_ms(SystemTime::now());
        Ok(state
            .records
            .get(id)
            .map(|(record, _)| record.clone().view(now_ms)))
    }

    async fn revoke(&self, id: &str, terminate: bool) -> Result<Revoked, BrokerError> {
        let now = SystemTime::now();
        let until = epoch_ms(now).saturating_add(
            u64::try_from(self.settings.result_ttl.as_millis()).unwrap_or(u64::MAX),
        );
        let mut state = self.lock();
        let clock = Instant::now();
        let record = state
            .record_exists(id, clock)
            .then(|| state.records.get(id).map(|(r, _)| r.clone()))
            .flatten();
        let answer = match &record {
            None => Revoked::Unknown,
            Some(record) => match record.clone().view(epoch_ms(now)) {
                view if view.state == TaskState::Dead && view.error.as_deref() == Some(REVOKED) => {
                    Revoked::AlreadyRevoked
                }
                view if view.state.is_final() => Revoked::Ended(view.state),
                view if view.state == TaskState::Running => Revoked::Running,
                view => Revoked::Pending(view.state),
            },
        };
        if matches!(answer, Revoked::AlreadyRevoked | Revoked::Ended(_)) {
            return Ok(answer);
        }
        if let (Revoked::Pending(_), Some(stored)) = (answer, &record) {
            // A delayed entry is made ready now, so a consumer dead-letters it at once.
            if let Some(due) = stored.due_ms {
                let q = state.queue(&stored.queue);
                let key = q
                    .delayed
                    .range((due, 0)..=(due, u64::MAX))
                    .find(|(_, raw)| Envelope::id_in(raw).as_deref() == Some(id))
                    .map(|(key, _)| *key);
                if let Some(raw) = key.and_then(|key| q.delayed.remove(&key)) {
                    state.push_ready_raw(&stored.queue, raw, 0);
                }
            }
            if let Some((record, _)) = state.records.get_mut(id) {
                record.state = Some(TaskState::Dead);
                record.error = Some(REVOKED.to_string());
                record.updated_at = rfc3339(now);
            }
        }
        drop(state);
        let revocation = Revocation {
            id: id.to_string(),
            terminate,
        };
        self.revocations.add(revocation, until);
        self.arrived.notify_waiters();
        Ok(answer)
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revocations.contains(id, epoch_ms(SystemTime::now()))
    }

    fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }
}

impl Coordination for MemoryBroker {
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

impl Admin for MemoryBroker {
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
                    self.revive(&mut state, queue, envelope);
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
        self.revive(&mut state, queue, &envelope);
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
        // Their records go with them (their ids are free again): nothing of them is left.
        let raws = ready.iter().map(|e| &e.raw).chain(delayed.values());
        for id in raws
            .filter_map(|raw| Envelope::id_in(raw))
            .collect::<Vec<_>>()
        {
            state.records.remove(&id);
        }
        Ok(purged)
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
        use crate::broker::{Admin, Envelope, TaskQueue};
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
        later.eta = Some(crate::broker::Timestamp::at(
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
