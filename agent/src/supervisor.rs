//! The supervisor: converges the replicas a driver runs to the desired set.
//!
//! It is one task that owns all replica state (an actor). Inputs arrive on a
//! bounded channel: new assignments from the session, results of driver
//! operations (which run in their own tasks, so a slow stop never blocks the
//! loop), health probe results and periodic ticks. After every input the
//! supervisor runs [`plan`], a pure diff of desired against observed, and
//! applies it item by item; a failed item is logged and retried, never aborts
//! the pass.
//!
//! Requests for replica output are resolved here too, since the supervisor
//! holds the handles: the loop only looks them up and hands the reading to a
//! task of its own ([`crate::logs::serve`]), so a followed replica never holds
//! the loop up.
//!
//! The driver's [`Capabilities`] say how it is driven: driver operations
//! (start, stop, destroy) run under a semaphore of
//! [`Capabilities::max_concurrent_operations`] permits, handed out in order;
//! inspection passes run every [`Capabilities::inspect_interval`]; a call the
//! runtime throttles ([`DriverError::Throttled`]) is retried after the delay
//! it asked for plus jitter, never sooner, and counts as no crash; and with
//! [`Capabilities::runtime_restarts`] crashed instances are the runtime's to
//! restart: the supervisor reports those restarts and starts an instance only
//! when the runtime has lost one. The provider's driver settings, which come
//! with each assignment, are handed to the driver ([`Driver::configure`]) in a
//! task of their own before the supervisor converges to that assignment.
//!
//! Assignments are ordered by revision within one epoch of the daemon's
//! store only ([`arrival`]): a restored or reset store takes over the fleet
//! with revisions of its own history, and its assignment then decides what
//! runs like any other — an epoch change alone restarts or stops nothing.
//!
//! At start-up ([`Supervisor::restore`]) the supervisor re-attaches to the
//! instances of its persisted handles, then takes in what the driver finds
//! running beyond them ([`Driver::list_instances`]): it adopts the best
//! instance of each replica it holds none of, and stops the others, so that
//! a lost or damaged handle file never leaves a duplicate running. Damaged
//! state is never read as "nothing" (see [`crate::state`]).
//!
//! Invariants: at most one driver operation is in flight per replica (reading
//! output is not one: it changes nothing), and at most
//! `max_concurrent_operations` in all; a replica is never torn down
//! because the daemon is unreachable; every instance handle is persisted
//! before the replica is reported running.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::convert::{DesiredApp, DesiredSet, StoreEpoch};
use crate::driver::{
    Capabilities, Driver, DriverError, DriverSettings, Handle, Inspection, Listed, ReplicaKey,
    ReplicaSpec, RuntimeHealth,
};
use crate::health::{Health, HealthSpec, HealthTracker, probe_once};
use crate::logs::{LogsQuery, Target};
use crate::state::{PersistedReplica, StateDir, StateError};

/// Tunables of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// How often the supervisor re-plans when no input arrives: a restart
    /// or retry that falls due waits at most this long. Running instances are
    /// inspected on the driver's own period
    /// ([`Capabilities::inspect_interval`]); when that is shorter, the
    /// supervisor ticks on it instead.
    pub tick: Duration,
    /// First restart delay after a crash; doubles per consecutive crash.
    pub backoff_base: Duration,
    /// Longest restart delay (also the retry delay of a replica that cannot start).
    pub backoff_max: Duration,
    /// A run shorter than this counts as a crash in a row.
    pub min_run: Duration,
    /// Consecutive short runs after which a replica is reported crash-looping.
    pub crash_loop_after: u32,
    /// Probe period while a replica has not passed its first check, so a new
    /// replica is seen healthy quickly.
    pub startup_probe_interval: Duration,
    /// Host network probes connect to (the driver's bind host).
    pub probe_host: Option<IpAddr>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            tick: Duration::from_millis(250),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            min_run: Duration::from_secs(10),
            crash_loop_after: 3,
            startup_probe_interval: Duration::from_millis(100),
            probe_host: None,
        }
    }
}

/// Replica statuses for the session to report, coalesced: the supervisor
/// overwrites, the session drains. Bounded by the number of replicas.
#[derive(Debug, Default)]
pub struct StatusBoard {
    inner: Mutex<BoardInner>,
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct BoardInner {
    current: BTreeMap<ReplicaKey, pb::ReplicaStatus>,
    dirty: BTreeSet<ReplicaKey>,
    removed: BTreeSet<ReplicaKey>,
    revision: u64,
    /// The store and epoch `revision` belongs to.
    store: StoreEpoch,
}

/// Changes since the last drain.
#[derive(Debug, Default)]
pub struct Delta {
    /// Replicas whose status changed.
    pub replicas: Vec<pb::ReplicaStatus>,
    /// Replicas that are gone, as `app/index`.
    pub removed: Vec<String>,
    /// Revision being converged to.
    pub revision: u64,
    /// The store and epoch that revision belongs to.
    pub store: StoreEpoch,
}

impl StatusBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoardInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to change notifications.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every current status, and clears the pending changes (used for a hello).
    pub fn snapshot(&self) -> (Vec<pb::ReplicaStatus>, u64, StoreEpoch) {
        let mut b = self.lock();
        b.dirty.clear();
        b.removed.clear();
        (
            b.current.values().cloned().collect(),
            b.revision,
            b.store.clone(),
        )
    }

    /// Pending changes.
    pub fn drain(&self) -> Delta {
        let mut b = self.lock();
        let dirty = std::mem::take(&mut b.dirty);
        let removed = std::mem::take(&mut b.removed);
        Delta {
            replicas: dirty
                .iter()
                .filter_map(|k| b.current.get(k).cloned())
                .collect(),
            removed: removed.iter().map(ToString::to_string).collect(),
            revision: b.revision,
            store: b.store.clone(),
        }
    }

    fn update(
        &self,
        statuses: BTreeMap<ReplicaKey, pb::ReplicaStatus>,
        revision: u64,
        store: &StoreEpoch,
    ) {
        let mut b = self.lock();
        let mut changed = b.revision != revision || &b.store != store;
        b.revision = revision;
        b.store = store.clone();
        let gone: Vec<ReplicaKey> = b
            .current
            .keys()
            .filter(|k| !statuses.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            b.current.remove(&k);
            b.dirty.remove(&k);
            b.removed.insert(k);
            changed = true;
        }
        for (k, s) in statuses {
            if b.current.get(&k) != Some(&s) {
                b.removed.remove(&k);
                b.dirty.insert(k.clone());
                b.current.insert(k, s);
                changed = true;
            }
        }
        drop(b);
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }
}

/// The agent's lease on singleton replicas, renewed by heartbeat acks.
#[derive(Debug, Default)]
pub struct Lease {
    deadline: Mutex<Option<Instant>>,
}

impl Lease {
    /// Extends the lease to `deadline` (never shortens it).
    pub fn renew(&self, deadline: Instant) {
        let mut d = self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.is_none_or(|cur| deadline > cur) {
            *d = Some(deadline);
        }
    }

    /// When the lease ends, if the agent holds one.
    pub fn deadline(&self) -> Option<Instant> {
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Singletons are stopped this long before the lease ends, and get at most
/// this much of a stop grace, so they are gone before the lease is.
const FENCE_EARLY: Duration = Duration::from_millis(500);
const FENCE_GRACE: Duration = Duration::from_millis(400);

/// The longest stop the agent may have to wait for when a singleton's lease
/// ends, which the hello tells the daemon (`DriverCapabilities.max_stop_ms`):
/// the driver's bound ([`Capabilities::max_stop`]) for the largest grace such
/// a stop gets, [`FENCE_GRACE`]. One number per agent, whatever its apps'
/// graces: a singleton whose lease runs out is stopped with at most that
/// grace, so this is how long after the agent's fence it may still run, and
/// what the daemon's margin past the lease must cover. (Stops for other
/// reasons — a replacement, a removal — get the app's full grace, but the
/// daemon never waits on those to place a singleton.)
pub fn longest_stop(capabilities: &Capabilities) -> Duration {
    capabilities.max_stop(FENCE_GRACE)
}

/// Most times one stop or destroy (or a recovery at start-up) is retried
/// after the runtime throttled it, before it counts as failed.
const THROTTLED_RETRIES: u32 = 10;

/// Longest [`Driver::configure`] may take; past it the new settings count as
/// refused and the assignment is taken with the old ones.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest inspection period, whatever a driver declares (a zero period
/// would spin).
const MIN_INSPECT_INTERVAL: Duration = Duration::from_millis(10);

/// What a replica is doing.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// A start is in flight.
    Starting,
    /// An instance runs.
    Running,
    /// Exited; restart at the deadline.
    Backoff { until: Instant },
    /// Cannot start; retry at the deadline or when the workload changes.
    Failed { until: Instant },
    /// A stop is in flight; afterwards start again (`replace`) or forget it.
    Stopping { replace: bool },
}

#[derive(Debug)]
struct Replica {
    generation: u64,
    workload_generation: u64,
    handle: Option<Handle>,
    /// The latest instance, kept after it exits or is stopped for a
    /// replacement, so the output of a crashed replica stays readable until
    /// the next instance starts.
    output: Option<Handle>,
    phase: Phase,
    /// Bumped per driver operation; results of older operations are ignored.
    op: u64,
    health: Option<HealthTracker>,
    /// The runtime's own verdict (an image's HEALTHCHECK), from the last
    /// inspection; `None` when the runtime has no check of its own.
    runtime_health: Option<RuntimeHealth>,
    /// What the runtime says is wrong with the instance ([`Driver::remark`]).
    runtime_remark: Option<String>,
    probe: Option<CancellationToken>,
    /// Restarts by the supervisor, and the runtime's restarts of earlier
    /// instances; persisted.
    restarts: u32,
    /// The runtime's own restarts of the current instance
    /// ([`Inspection::Restarted`]), read anew from the runtime after an agent
    /// restart, so never persisted.
    runtime_restarts: u32,
    /// The runtime holds the current instance between two of its restarts
    /// (a crash loop's back-off): it is the runtime's to bring back.
    runtime_down: bool,
    crashes_in_row: u32,
    message: String,
    started_at: Option<Instant>,
    state_since_ms: i64,
    last_state: pb::ReplicaState,
}

impl Replica {
    fn new(generation: u64, workload_generation: u64) -> Self {
        Replica {
            generation,
            workload_generation,
            handle: None,
            output: None,
            phase: Phase::Starting,
            op: 0,
            health: None,
            runtime_health: None,
            runtime_remark: None,
            probe: None,
            restarts: 0,
            runtime_restarts: 0,
            runtime_down: false,
            crashes_in_row: 0,
            message: String::new(),
            started_at: None,
            state_since_ms: 0,
            last_state: pb::ReplicaState::Pending,
        }
    }

    fn ready(&self, has_check: bool) -> bool {
        matches!(
            self.running_state(has_check),
            pb::ReplicaState::Healthy | pb::ReplicaState::Running
        )
    }

    /// The reported state of a replica, from its phase and both health
    /// verdicts: the app's check (`has_check`: the app has one) and the
    /// runtime's own. Either one failing makes it unhealthy; either one not
    /// passed yet keeps it starting.
    fn running_state(&self, has_check: bool) -> pb::ReplicaState {
        let app = self.health.as_ref().map(HealthTracker::state);
        match self.phase {
            Phase::Starting => pb::ReplicaState::Starting,
            Phase::Backoff { .. } => pb::ReplicaState::Backoff,
            Phase::Failed { .. } => pb::ReplicaState::Failed,
            Phase::Stopping { .. } => pb::ReplicaState::Stopping,
            Phase::Running if self.runtime_down => pb::ReplicaState::Backoff,
            Phase::Running => match (app, self.runtime_health) {
                (Some(Health::Unhealthy), _) | (_, Some(RuntimeHealth::Unhealthy)) => {
                    pb::ReplicaState::Unhealthy
                }
                (Some(Health::Unknown), _) | (_, Some(RuntimeHealth::Starting)) => {
                    pb::ReplicaState::Starting
                }
                (None, _) if has_check => pb::ReplicaState::Starting,
                (Some(Health::Healthy), _) | (None, Some(RuntimeHealth::Healthy)) => {
                    pb::ReplicaState::Healthy
                }
                (None, None) => pb::ReplicaState::Running,
            },
        }
    }

    fn stop_probe(&mut self) {
        if let Some(t) = self.probe.take() {
            t.cancel();
        }
    }

    /// The message reported with the state: the runtime's own verdict when it
    /// holds the replica back (the app's probe results, which set `message`,
    /// would hide it otherwise), else the last event's message.
    fn status_message(&self) -> String {
        let running = self.phase == Phase::Running;
        let runtime = match self.runtime_health.filter(|_| running) {
            Some(RuntimeHealth::Unhealthy) => Some("the image's HEALTHCHECK reports unhealthy"),
            Some(RuntimeHealth::Starting) => Some("the image's HEALTHCHECK has not passed yet"),
            _ => None,
        };
        // The runtime's words stay until a new instance starts: after a
        // crash they say why.
        let remark = self.runtime_remark.as_deref();
        [runtime, Some(self.message.as_str()), remark]
            .into_iter()
            .flatten()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// First wait before a stop the runtime failed is tried again; waits double
/// up to [`REMOVAL_RETRY_MAX`].
const REMOVAL_RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between two tries of a stop the runtime failed.
const REMOVAL_RETRY_MAX: Duration = Duration::from_secs(30);

/// First retry of a replica's health probe while it starts; retries double
/// up to [`SupervisorConfig::startup_probe_interval`].
const FIRST_STARTUP_PROBE: Duration = Duration::from_millis(10);

/// Inputs of the supervisor loop.
#[derive(Debug)]
pub enum Input {
    /// A new desired set from the daemon, with the assignment as it came
    /// (boxed: the wire type is large, inputs are many and assignments rare).
    Assign(DesiredSet, Box<pb::Assignment>),
    /// A start finished.
    Started {
        key: ReplicaKey,
        op: u64,
        result: Result<Handle, DriverError>,
    },
    /// A stop finished.
    Stopped { key: ReplicaKey, op: u64 },
    /// A health probe finished.
    Probe {
        key: ReplicaKey,
        op: u64,
        result: Result<(), String>,
    },
    /// An inspection pass finished: what each running instance looked like,
    /// with the operation it was inspected under.
    Inspected(Vec<(ReplicaKey, u64, Inspection, Option<String>)>),
    /// The runtime throttled an inspection pass: the next one waits.
    InspectionThrottled {
        /// The delay the runtime asked for.
        retry_after: Duration,
    },
    /// [`Driver::configure`] finished.
    Configured {
        /// The settings it was given.
        settings: DriverSettings,
        /// Why the driver refused them, for people.
        result: Result<(), String>,
    },
    /// The daemon asks for replica output.
    Logs(LogsQuery),
}

/// What [`plan`] decides for one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Replicas to start (new, or due after a backoff).
    pub start: Vec<ReplicaKey>,
    /// Running replicas whose workload is outdated, to stop and start again.
    pub replace: Vec<ReplicaKey>,
    /// Replicas no longer wanted, to stop and forget.
    pub remove: Vec<ReplicaKey>,
}

/// What [`plan`] needs to know of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Workload generation it runs (or last ran).
    pub workload_generation: u64,
    /// A driver operation is in flight.
    pub busy: bool,
    /// Has a running instance.
    pub running: bool,
    /// Waiting to be started and the wait is over.
    pub due: bool,
    /// Ready to serve.
    pub ready: bool,
}

/// How an assignment stands to the newest one the agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first, or the same or a later revision of the same store epoch:
    /// taken.
    Next,
    /// From another store or epoch than the one held (a store restored from a
    /// backup or reset on purpose, which counts revisions from its own
    /// history), or the first to name its store after one that did not: taken
    /// whatever its revision.
    NewEpoch,
    /// An older revision of the same store epoch: ignored.
    Stale,
}

/// Orders `incoming` against `held`, the newest assignment the agent holds
/// (none: it holds none it can use). Revisions are ordered only within one
/// store epoch ([`DesiredSet::store`]); an assignment that carries another is
/// taken whatever its revision, and, like any assignment, decides alone what
/// runs: replicas it still wants on the same workload generation keep
/// running untouched. Held assignments that do not name their store (kept
/// from before store identities) are of an unknown one: the first assignment
/// that names its store is taken, and orders those after it.
pub fn arrival(held: Option<&DesiredSet>, incoming: &DesiredSet) -> Arrival {
    match held {
        None => Arrival::Next,
        Some(held) if held.store != incoming.store => Arrival::NewEpoch,
        Some(held) if incoming.revision < held.revision => Arrival::Stale,
        Some(_) => Arrival::Next,
    }
}

/// The pure diff: what to start, replace and remove to reach `desired`.
///
/// Outdated replicas are replaced one at a time per app (the next only once
/// every replica already on the new workload is ready), unless no replica of
/// the app is ready, in which case all are replaced at once: there is no
/// service left to protect.
pub fn plan(
    desired: &BTreeMap<String, DesiredApp>,
    observed: &BTreeMap<ReplicaKey, Observed>,
) -> Plan {
    let mut out = Plan::default();
    for (key, o) in observed {
        let wanted = desired
            .get(&key.app)
            .is_some_and(|d| key.index < d.replicas);
        if !wanted && !o.busy {
            out.remove.push(key.clone());
        }
    }
    for (name, d) in desired {
        let mine: Vec<(ReplicaKey, Option<&Observed>)> = (0..d.replicas)
            .map(|index| {
                let key = ReplicaKey {
                    app: name.clone(),
                    index,
                };
                let o = observed.get(&key);
                (key, o)
            })
            .collect();
        let any_ready = mine.iter().any(|(_, o)| o.is_some_and(|o| o.ready));
        // A replacement is in progress while a replica on the new workload is
        // not ready yet (including one that crashes) or an old one is stopping.
        let mut rolling_busy = mine.iter().any(|(_, o)| {
            o.is_some_and(|o| {
                (o.workload_generation == d.workload_generation && !o.ready)
                    || (o.busy && o.workload_generation != d.workload_generation)
            })
        });
        for (key, o) in mine {
            match o {
                None => out.start.push(key),
                Some(o) if o.busy => {}
                // Another workload generation, older or newer: newer ones run
                // after a store went back to a backup taken before a change,
                // or an app was deleted and declared again.
                Some(o) if o.workload_generation != d.workload_generation => {
                    if !o.running {
                        // Between its stop and the start of its replacement:
                        // that start is the rolling step in progress, and no
                        // other replica is taken down meanwhile.
                        out.start.push(key);
                        rolling_busy = true;
                    } else if !any_ready || !rolling_busy {
                        out.replace.push(key);
                        rolling_busy = true;
                    }
                }
                Some(o) if !o.running && o.due => out.start.push(key),
                Some(_) => {}
            }
        }
    }
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Handle to a running supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    inbox: mpsc::Sender<Input>,
    /// Statuses for the session.
    pub board: Arc<StatusBoard>,
    /// Lease on singletons, renewed by the session.
    pub lease: Arc<Lease>,
}

impl SupervisorHandle {
    /// Hands a new assignment to the supervisor.
    pub async fn assign(&self, set: DesiredSet, raw: pb::Assignment) {
        // The supervisor only stops with the agent; a closed inbox means shutdown.
        let _ = self.inbox.send(Input::Assign(set, Box::new(raw))).await;
    }

    /// Hands a request for replica output to the supervisor, which answers it
    /// on `query.out`; `false` if the supervisor has stopped.
    pub async fn logs(&self, query: LogsQuery) -> bool {
        self.inbox.send(Input::Logs(query)).await.is_ok()
    }
}

/// The supervisor task's state.
pub struct Supervisor<D: Driver> {
    driver: Arc<D>,
    /// How the driver must be driven, read once.
    capabilities: Capabilities,
    /// One permit per driver operation in flight, at most
    /// `capabilities.max_concurrent_operations`; fair, so operations run in
    /// the order they were asked for.
    ops: Arc<Semaphore>,
    provider: String,
    state: StateDir,
    config: SupervisorConfig,
    desired: Option<DesiredSet>,
    /// The newest assignment, held back while the driver takes its settings.
    pending: Option<DesiredSet>,
    /// A [`Driver::configure`] is in flight; assignments wait in `pending`.
    configuring: bool,
    /// The settings the driver runs with (the last it took).
    settings: DriverSettings,
    /// Why the provider's latest settings are not in use, for every
    /// replica's message until settings the driver takes arrive.
    settings_error: Option<String>,
    replicas: BTreeMap<ReplicaKey, Replica>,
    inbox: mpsc::Receiver<Input>,
    inbox_tx: mpsc::Sender<Input>,
    board: Arc<StatusBoard>,
    lease: Arc<Lease>,
    /// Lease deadline last persisted, to persist only renewals.
    saved_lease: Option<Instant>,
    /// Handles changed since the last save.
    dirty: bool,
    /// The inspection pass in flight; ticks start none until it has ended, so
    /// passes never overlap (and one that died does not stop them).
    inspection: Option<tokio::task::JoinHandle<()>>,
    /// When the next inspection pass is due: one driver period after the last.
    next_inspection: Instant,
    /// No inspection pass before this: the runtime throttled the last one.
    inspect_not_before: Option<Instant>,
}

impl<D: Driver> std::fmt::Debug for Supervisor<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Inbox bound: inputs beyond it wait (driver tasks and probes are few per replica).
const INBOX: usize = 1024;

/// Runs one driver call under an operation permit. A call the runtime
/// throttles is retried after the delay it asked for plus jitter, up to
/// `retries` times; the permit is given back while it waits, so a throttled
/// call holds up nothing else.
async fn call_driver<T, F, Fut>(
    ops: &Semaphore,
    retries: u32,
    mut call: F,
) -> Result<T, DriverError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DriverError>>,
{
    let mut attempt = 0;
    loop {
        let result = {
            // The semaphore is never closed; were it, the call would go ahead
            // unbounded rather than never.
            let _permit = ops.acquire().await.ok();
            call().await
        };
        let delay = match &result {
            Err(e) if attempt < retries => e.retry_after(),
            _ => None,
        };
        let Some(delay) = delay else {
            return result;
        };
        attempt += 1;
        let wait = throttle_delay(delay);
        tracing::info!(retry_in = ?wait, "the runtime throttled a call; waiting");
        tokio::time::sleep(wait).await;
    }
}

/// Hands `settings` to the driver, within [`CONFIGURE_TIMEOUT`]; the refusal
/// is for people.
async fn configure<D: Driver>(driver: &D, settings: &DriverSettings) -> Result<(), String> {
    match tokio::time::timeout(CONFIGURE_TIMEOUT, driver.configure(settings)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the {} driver did not take them within {CONFIGURE_TIMEOUT:?}",
            driver.kind()
        )),
    }
}

/// How long to wait after the runtime throttled a call: its delay, never
/// less, plus up to half of it again at random, so that calls throttled
/// together are not retried together.
fn throttle_delay(retry_after: Duration) -> Duration {
    match crate::random::full_jitter(retry_after / 2) {
        Ok(jitter) => retry_after.saturating_add(jitter),
        Err(e) => {
            tracing::error!(error = %e, "retrying a throttled call without jitter");
            retry_after
        }
    }
}

/// What the supervisor takes an inspection for. A driver that does not
/// declare [`Capabilities::runtime_restarts`] does not get restarts left to
/// its runtime: what it reports as restarted counts as running, or as an exit
/// the supervisor restarts.
fn normalize(inspection: Inspection, runtime_restarts: bool) -> Inspection {
    match inspection {
        Inspection::Restarted {
            running: true,
            health,
            ..
        } if !runtime_restarts => Inspection::Running { health },
        Inspection::Restarted { running: false, .. } if !runtime_restarts => Inspection::Exited {
            code: None,
            signal: None,
        },
        other => other,
    }
}

impl<D: Driver> Supervisor<D> {
    /// Restores persisted state, hands the persisted assignment's driver
    /// settings to the driver, re-attaches to running instances, and takes
    /// in what the driver finds running beyond them
    /// ([`Driver::list_instances`]).
    ///
    /// Damaged state is never read as "nothing" ([`StateError::Corrupt`],
    /// logged naming the file): without a usable assignment every replica is
    /// kept as it is and nothing is started until the daemon sends its
    /// assignment (the hello then says revision 0, and the daemon sends its
    /// current one on every new session); without usable handles the
    /// replicas are found through the driver, and when the driver cannot list
    /// them either, the agent does not start rather than start duplicates.
    pub async fn restore(
        driver: Arc<D>,
        provider: String,
        state: StateDir,
        config: SupervisorConfig,
    ) -> Result<(Self, SupervisorHandle), crate::AgentError> {
        let (inbox_tx, inbox) = mpsc::channel(INBOX);
        let board = Arc::new(StatusBoard::default());
        let lease = Arc::new(Lease::default());
        match state.load_lease() {
            Ok(Some(deadline_ms)) => {
                // Carry the lease over an agent restart, converted to this run's clock.
                let left = deadline_ms - now_ms();
                if left > 0 {
                    lease.renew(
                        Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                    );
                }
            }
            Ok(None) => {}
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!(error = %e, "the lease on singletons is unreadable: singletons wait for the daemon to renew it");
            }
            Err(e) => return Err(e.into()),
        }
        let desired = match state.load_assignment(&provider) {
            Ok(Some(raw)) => match DesiredSet::try_from(raw) {
                Ok(set) => Some(set),
                Err(e) => {
                    tracing::warn!(error = %e, "persisted assignment unusable; waiting for the daemon");
                    None
                }
            },
            Ok(None) => None,
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!(error = %e, "the persisted assignment is unusable: every replica is kept as it is, and none is started, until the daemon sends its assignment");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let capabilities = driver.capabilities();
        let mut sup = Supervisor {
            ops: Arc::new(Semaphore::new(capabilities.operations())),
            capabilities,
            driver,
            provider,
            state,
            config,
            desired: None,
            pending: None,
            configuring: false,
            settings: DriverSettings::Unset,
            settings_error: None,
            replicas: BTreeMap::new(),
            inbox,
            inbox_tx: inbox_tx.clone(),
            board: board.clone(),
            lease: lease.clone(),
            saved_lease: None,
            dirty: false,
            inspection: None,
            next_inspection: Instant::now(),
            inspect_not_before: None,
        };
        if let Some(set) = desired {
            let settings = set.settings.clone();
            match sup.refusal(&settings) {
                Some(problem) => {
                    sup.settings_refused(problem);
                }
                None if settings != sup.settings => {
                    let result = configure(sup.driver.as_ref(), &settings).await;
                    sup.settings_taken(settings, result);
                }
                None => {}
            }
            sup.desired = Some(set);
        }
        let persisted = match sup.state.load_replicas() {
            Ok(persisted) => Some(persisted),
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!(error = %e, "the replica handles are unreadable: the replicas that run are found through the driver instead");
                // Rewritten from what is found, at the end of the restore.
                sup.dirty = true;
                None
            }
            Err(e) => return Err(e.into()),
        };
        let handles_known = persisted.is_some();
        for p in persisted.into_iter().flatten() {
            let driver = sup.driver.clone();
            let recovered = call_driver(&sup.ops, THROTTLED_RETRIES, || driver.recover(&p.handle))
                .await
                .map(|i| normalize(i, sup.capabilities.runtime_restarts));
            match recovered {
                Ok(inspection @ (Inspection::Running { .. } | Inspection::Restarted { .. })) => {
                    tracing::info!(replica = %p.key, instance = %p.handle.instance_id, "adopted running replica");
                    let mut r = Replica::new(p.generation, p.workload_generation);
                    r.restarts = p.restarts;
                    sup.replicas.insert(p.key.clone(), r);
                    sup.adopt(&p.key, p.handle, inspection);
                }
                Ok(Inspection::Exited { .. }) | Err(_) => {
                    tracing::info!(replica = %p.key, "replica exited while the agent was down; it will be restarted");
                    let mut r = Replica::new(p.generation, p.workload_generation);
                    r.restarts = p.restarts;
                    r.phase = Phase::Backoff {
                        until: Instant::now(),
                    };
                    r.message = "exited while the agent was not running".into();
                    sup.replicas.insert(p.key, r);
                    sup.dirty = true;
                }
            }
        }
        sup.take_in_listed(handles_known).await?;
        sup.align_generations();
        sup.converge();
        sup.publish();
        sup.persist();
        Ok((
            sup,
            SupervisorHandle {
                inbox: inbox_tx,
                board,
                lease,
            },
        ))
    }

    /// Makes replica `key` (already in `replicas`) run `handle`, as
    /// [`Driver::recover`] or an inspection found it.
    fn adopt(&mut self, key: &ReplicaKey, handle: Handle, inspection: Inspection) {
        let Some(r) = self.replicas.get_mut(key) else {
            return;
        };
        let (health, runtime) = match inspection {
            Inspection::Running { health } => (health, None),
            Inspection::Restarted {
                restarts,
                running,
                health,
            } => (health, Some((restarts, running))),
            Inspection::Exited { .. } => return,
        };
        r.phase = Phase::Running;
        r.runtime_health = health;
        if let Some((restarts, running)) = runtime {
            r.runtime_restarts = restarts;
            r.runtime_down = !running;
        }
        r.started_at = Some(Instant::now());
        r.message = "adopted after agent restart".into();
        r.output = Some(handle.clone());
        r.handle = Some(handle);
        self.start_probe(key);
    }

    /// Takes in what the driver lists for the provider beyond the recovered
    /// replicas: for each replica that holds no running instance, the best
    /// adoptable instance of it (running first, then on the assignment's
    /// workload generation, then the latest) is adopted; every other
    /// instance no replica holds is stopped, and destroyed unless its replica
    /// is held (a duplicate shares its replica's files, the process driver's
    /// directory). What is adopted then meets the assignment like any
    /// replica: kept when wanted on its workload generation, replaced or
    /// removed otherwise, and kept as it is while there is no assignment.
    /// Fails only when the listing fails and the handles were unreadable:
    /// starting replicas then could duplicate running ones.
    async fn take_in_listed(&mut self, handles_known: bool) -> Result<(), crate::AgentError> {
        let found = match self.driver.list_instances(&self.provider).await {
            Ok(found) => found,
            Err(e) if handles_known => {
                tracing::warn!(error = %e, "cannot list instances; any strays stay");
                return Ok(());
            }
            Err(e) => {
                tracing::error!(error = %e, "the replica handles are unreadable and the driver cannot list what runs: not starting, so as not to start duplicates");
                return Err(e.into());
            }
        };
        let held: BTreeSet<String> = self
            .replicas
            .values()
            .filter_map(|r| r.handle.as_ref().map(|h| h.instance_id.clone()))
            .collect();
        let mut candidates: BTreeMap<ReplicaKey, Vec<(Listed, Inspection)>> = BTreeMap::new();
        let mut strays = Vec::new();
        for listed in found {
            if held.contains(&listed.handle.instance_id) {
                continue;
            }
            let key = match &listed.replica {
                Some(r) if listed.adoptable => r.key.clone(),
                _ => {
                    strays.push(listed);
                    continue;
                }
            };
            if self.replicas.get(&key).is_some_and(|r| r.handle.is_some()) {
                strays.push(listed);
                continue;
            }
            let driver = self.driver.clone();
            let inspection = call_driver(&self.ops, THROTTLED_RETRIES, || {
                driver.recover(&listed.handle)
            })
            .await
            .map(|i| normalize(i, self.capabilities.runtime_restarts));
            match inspection {
                Ok(inspection) => candidates
                    .entry(key)
                    .or_default()
                    .push((listed, inspection)),
                Err(e) => {
                    tracing::warn!(instance = %listed.handle.instance_id, error = %e, "cannot inspect a listed instance");
                    strays.push(listed);
                }
            }
        }
        for (key, mut found) in candidates {
            let wanted = self
                .desired
                .as_ref()
                .and_then(|d| d.apps.get(&key.app))
                .map(|d| d.workload_generation);
            found.sort_by_key(|(l, i)| {
                std::cmp::Reverse((
                    !matches!(i, Inspection::Exited { .. }),
                    l.replica.as_ref().map(|r| r.workload_generation) == wanted,
                    l.handle.started_at_ms,
                ))
            });
            let mut found = found.into_iter();
            let Some((best, inspection)) = found.next() else {
                continue;
            };
            strays.extend(found.map(|(l, _)| l));
            let wg = best.replica.as_ref().map_or(0, |r| r.workload_generation);
            if matches!(inspection, Inspection::Exited { .. }) {
                // Nothing runs: the replica is restarted like one that exited
                // while the agent was down, its last instance kept for its
                // output (or destroyed when it is not wanted).
                if self.replicas.contains_key(&key) {
                    strays.push(best);
                    continue;
                }
                let mut r = Replica::new(wg, wg);
                r.phase = Phase::Backoff {
                    until: Instant::now(),
                };
                r.message = "exited while the agent was not running".into();
                r.output = Some(best.handle);
                self.replicas.insert(key, r);
                continue;
            }
            tracing::info!(replica = %key, instance = %best.handle.instance_id, "adopted a running replica the driver found");
            let restarts = self.replicas.get(&key).map_or(0, |r| r.restarts);
            let mut r = Replica::new(wg, wg);
            r.restarts = restarts;
            self.replicas.insert(key.clone(), r);
            self.adopt(&key, best.handle, inspection);
            self.dirty = true;
        }
        for stray in strays {
            self.remove_stray(stray);
        }
        Ok(())
    }

    /// Stops an instance no replica holds, in a task of its own, and
    /// destroys it unless its replica is held.
    fn remove_stray(&self, stray: Listed) {
        let app = stray
            .replica
            .as_ref()
            .and_then(|r| self.desired.as_ref()?.apps.get(&r.key.app));
        let grace = app.map_or(Duration::from_secs(10), |d| d.workload.stop_grace);
        let shared = stray
            .replica
            .as_ref()
            .is_some_and(|r| self.replicas.contains_key(&r.key));
        let what = stray
            .replica
            .as_ref()
            .map_or_else(|| "unknown replica".to_string(), |r| r.key.to_string());
        tracing::info!(instance = %stray.handle.instance_id, replica = %what, duplicate = shared, "stopping an instance no replica holds");
        let (driver, ops, h) = (self.driver.clone(), self.ops.clone(), stray.handle);
        tokio::spawn(async move {
            if let Err(e) = call_driver(&ops, THROTTLED_RETRIES, || driver.stop(&h, grace)).await {
                tracing::warn!(instance = %h.instance_id, error = %e, "cannot stop it");
            }
            if !shared
                && let Err(e) = call_driver(&ops, THROTTLED_RETRIES, || driver.destroy(&h)).await
            {
                tracing::warn!(instance = %h.instance_id, error = %e, "cannot remove it");
            }
        });
    }

    /// Brings each replica's app generation up to the desired one when it
    /// runs the desired workload (a change of anything but the workload
    /// restarts nothing), and starts health probes the desired set asks for
    /// on running replicas that have none (replicas adopted before the agent
    /// had a usable assignment).
    fn align_generations(&mut self) {
        let Some(desired) = self.desired.as_ref() else {
            return;
        };
        let mut unprobed = Vec::new();
        for (key, r) in &mut self.replicas {
            let Some(d) = desired.apps.get(&key.app) else {
                continue;
            };
            if r.workload_generation == d.workload_generation {
                r.generation = d.generation;
            }
            if d.health.is_some() && r.phase == Phase::Running && r.probe.is_none() {
                unprobed.push(key.clone());
            }
        }
        for key in unprobed {
            self.start_probe(&key);
        }
    }

    /// Runs until `shutdown`; with `stop_all`, stops every replica before returning.
    pub async fn run(mut self, shutdown: CancellationToken, stop_all: bool) {
        let inspect_every = self.capabilities.inspect_interval.max(MIN_INSPECT_INTERVAL);
        let mut tick = tokio::time::interval(self.config.tick.min(inspect_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Work per pass is proportional to all replicas, so inputs are
            // handled in batches and a pass that changed nothing (most probe
            // results) publishes and persists nothing.
            let mut changed = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(input) = self.inbox.recv() => {
                    let mut changed = self.handle(input);
                    while let Ok(more) = self.inbox.try_recv() {
                        changed |= self.handle(more);
                    }
                    changed
                }
                at = tick.tick() => {
                    let throttled = self.inspect_not_before.is_some_and(|t| at < t);
                    if at >= self.next_inspection && !throttled {
                        self.next_inspection = at + inspect_every;
                        self.start_inspection();
                    }
                    false
                }
            };
            changed |= self.converge();
            if changed {
                self.publish();
                self.persist();
            }
        }
        for r in self.replicas.values_mut() {
            r.stop_probe();
        }
        if stop_all {
            self.stop_everything().await;
        }
        self.persist();
    }

    async fn stop_everything(&mut self) {
        let mut tasks = Vec::new();
        for (key, r) in &mut self.replicas {
            if let Some(h) = r.handle.take() {
                let (driver, ops) = (self.driver.clone(), self.ops.clone());
                let grace = self
                    .desired
                    .as_ref()
                    .and_then(|d| d.apps.get(&key.app))
                    .map_or(Duration::from_secs(10), |d| d.workload.stop_grace);
                tasks.push(tokio::spawn(async move {
                    let _ = call_driver(&ops, THROTTLED_RETRIES, || driver.stop(&h, grace)).await;
                    let _ = call_driver(&ops, THROTTLED_RETRIES, || driver.destroy(&h)).await;
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        self.replicas.clear();
        self.dirty = true;
    }

    /// Why the driver cannot take `settings` at all: settings of another
    /// driver. Refused without asking the driver.
    fn refusal(&self, settings: &DriverSettings) -> Option<String> {
        let kind = settings.kind()?;
        let mine = self.driver.kind();
        (kind != mine).then(|| {
            format!(
                "the provider's settings are for the {kind} driver, but this agent runs the \
                 {mine} driver; it keeps its own flags"
            )
        })
    }

    /// Records that the driver refused the provider's settings: said once in
    /// the log, and in every replica's message while it stands.
    fn settings_refused(&mut self, problem: String) -> bool {
        let problem = format!("provider settings not in use: {problem}");
        if self.settings_error.as_ref() == Some(&problem) {
            return false;
        }
        tracing::error!(problem = %problem, "the driver cannot take the provider's settings");
        self.settings_error = Some(problem);
        true
    }

    /// Records what [`Driver::configure`] made of `settings`.
    fn settings_taken(&mut self, settings: DriverSettings, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => {
                tracing::info!(settings = ?settings, "the driver took the provider's settings");
                self.settings = settings;
                self.settings_error.take().is_some()
            }
            Err(problem) => self.settings_refused(problem),
        }
    }

    /// Takes an assignment: at once when the driver has (or cannot have) its
    /// settings, else after [`Driver::configure`], in a task of its own so
    /// the loop never waits on the runtime. Returns whether the desired set
    /// changed.
    fn take_assignment(&mut self, set: DesiredSet) -> bool {
        if set.settings == self.settings {
            self.settings_error = None;
            self.accept(set);
            return true;
        }
        if let Some(problem) = self.refusal(&set.settings) {
            self.settings_refused(problem);
            self.accept(set);
            return true;
        }
        self.configuring = true;
        let settings = set.settings.clone();
        self.pending = Some(set);
        let (driver, tx) = (self.driver.clone(), self.inbox_tx.clone());
        tokio::spawn(async move {
            let result = configure(driver.as_ref(), &settings).await;
            let _ = tx.send(Input::Configured { settings, result }).await;
        });
        false
    }

    /// Makes `set` the desired set.
    fn accept(&mut self, set: DesiredSet) {
        self.desired = Some(set);
        self.align_generations();
    }

    /// Applies one input; returns whether replica state may have changed.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Assign(set, raw) => {
                let newest = self.pending.as_ref().or(self.desired.as_ref());
                match (arrival(newest, &set), newest) {
                    (Arrival::Stale, Some(held)) => {
                        tracing::warn!(
                            revision = set.revision,
                            current = held.revision,
                            store = %set.store,
                            "ignoring an assignment older than the current one of the same store epoch"
                        );
                        return false;
                    }
                    (Arrival::NewEpoch, Some(held)) => {
                        tracing::info!(
                            revision = set.revision,
                            store = %set.store,
                            previous = %held.store,
                            previous_revision = held.revision,
                            "assignment of another store epoch (a restored or reset store): taken whatever its revision; it decides what runs"
                        );
                    }
                    _ => {}
                }
                if let Err(e) = self.state.save_assignment(&raw) {
                    tracing::error!(error = %e, "cannot persist the assignment");
                }
                tracing::info!(
                    revision = set.revision,
                    apps = set.apps.len(),
                    "assignment received"
                );
                if self.configuring {
                    // Taken once the driver has answered for the settings before.
                    self.pending = Some(set);
                    return false;
                }
                self.take_assignment(set)
            }
            Input::Configured { settings, result } => {
                self.configuring = false;
                let mut changed = self.settings_taken(settings.clone(), result);
                if let Some(set) = self.pending.take() {
                    if set.settings == settings {
                        // Taken or refused just now: not asked for twice.
                        self.accept(set);
                        changed = true;
                    } else {
                        changed |= self.take_assignment(set);
                    }
                }
                changed
            }
            Input::Started { key, op, result } => {
                let backoff_max = self.config.backoff_max;
                let Some(r) = self.replicas.get_mut(&key).filter(|r| r.op == op) else {
                    // The replica was removed meanwhile: stop what was started.
                    if let Ok(h) = result {
                        let (driver, ops) = (self.driver.clone(), self.ops.clone());
                        tokio::spawn(async move {
                            let grace = Duration::from_secs(5);
                            let _ = call_driver(&ops, THROTTLED_RETRIES, || driver.stop(&h, grace))
                                .await;
                            let _ =
                                call_driver(&ops, THROTTLED_RETRIES, || driver.destroy(&h)).await;
                        });
                    }
                    return false;
                };
                match result {
                    Ok(handle) => {
                        tracing::info!(replica = %key, instance = %handle.instance_id, "replica started");
                        r.phase = Phase::Running;
                        r.started_at = Some(Instant::now());
                        r.message.clear();
                        r.output = Some(handle.clone());
                        r.handle = Some(handle);
                        self.dirty = true;
                        self.start_probe(&key);
                    }
                    Err(e) => match e.retry_after() {
                        // The runtime's rate, not the replica: its delay, and
                        // no crash.
                        Some(delay) => {
                            let wait = throttle_delay(delay);
                            tracing::info!(replica = %key, error = %e, retry_in = ?wait, "start throttled");
                            r.phase = Phase::Backoff {
                                until: Instant::now() + wait,
                            };
                            r.message =
                                format!("start throttled: {e}; retrying in {}", human(wait));
                        }
                        None if e.is_retryable() => {
                            tracing::warn!(replica = %key, error = %e, "start failed; retrying");
                            let backoff = backoff(&self.config, r.crashes_in_row.saturating_add(1));
                            r.crashes_in_row = r.crashes_in_row.saturating_add(1);
                            r.phase = Phase::Backoff {
                                until: Instant::now() + backoff,
                            };
                            r.message =
                                format!("start failed: {e}; retrying in {}", human(backoff));
                        }
                        None => {
                            tracing::warn!(replica = %key, error = %e, "replica cannot start");
                            r.phase = Phase::Failed {
                                until: Instant::now() + backoff_max,
                            };
                            r.message = e.to_string();
                        }
                    },
                }
                true
            }
            Input::Stopped { key, op } => {
                let Some(r) = self.replicas.get_mut(&key).filter(|r| r.op == op) else {
                    return false;
                };
                if let Phase::Stopping { replace: true } = r.phase {
                    r.phase = Phase::Backoff {
                        until: Instant::now(),
                    };
                    r.health = None;
                    r.runtime_health = None;
                    r.runtime_remark = None;
                    r.message = "replacing with a new workload".into();
                } else {
                    self.replicas.remove(&key);
                }
                self.dirty = true;
                true
            }
            Input::Inspected(seen) => self.inspected(seen),
            Input::InspectionThrottled { retry_after } => {
                let wait = throttle_delay(retry_after);
                tracing::info!(retry_in = ?wait, "the runtime throttled inspection; the next pass waits");
                self.inspect_not_before = Some(Instant::now() + wait);
                false
            }
            Input::Probe { key, op, result } => {
                let Some(r) = self
                    .replicas
                    .get_mut(&key)
                    .filter(|r| r.op == op && r.phase == Phase::Running)
                else {
                    return false;
                };
                let Some(tracker) = r.health.as_mut() else {
                    return false;
                };
                let ok = result.is_ok();
                let transition = tracker.record(ok);
                if let Some(next) = transition {
                    tracing::info!(replica = %key, health = ?next, "health changed");
                }
                let message = match result {
                    Ok(()) if tracker.state() == Health::Healthy => String::new(),
                    Ok(()) => r.message.clone(),
                    Err(msg) => msg,
                };
                let changed = transition.is_some() || message != r.message;
                r.message = message;
                changed
            }
            Input::Logs(query) => {
                let targets = self.log_targets(&query.app, query.index);
                tokio::spawn(crate::logs::serve(self.driver.clone(), targets, query));
                false
            }
        }
    }

    /// The replicas a request for output names, with their latest instances;
    /// an error for people when there is none.
    fn log_targets(&self, app: &str, index: Option<u32>) -> Result<Vec<Target>, String> {
        let provider = &self.provider;
        let targets: Vec<Target> = self
            .replicas
            .iter()
            .filter(|(k, _)| k.app == app && index.is_none_or(|i| i == k.index))
            .map(|(k, r)| Target {
                replica: format!("{app}/{provider}/{}", k.index),
                handle: r.output.clone(),
            })
            .collect();
        if !targets.is_empty() {
            return Ok(targets);
        }
        Err(match index {
            Some(i) => format!("provider {provider} runs no replica {app}/{provider}/{i}"),
            None => format!("provider {provider} runs no replica of app {app}"),
        })
    }

    /// Inspects every running instance in a task of its own
    /// ([`Driver::inspect_all`]): the loop never waits on the runtime, and a
    /// pass puts one request at a time on it besides starts and stops. The
    /// results come back as [`Input::Inspected`].
    fn start_inspection(&mut self) {
        if self.inspection.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let targets: Vec<(ReplicaKey, u64, Handle)> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.phase == Phase::Running)
            .filter_map(|(k, r)| Some((k.clone(), r.op, r.handle.clone()?)))
            .collect();
        if targets.is_empty() {
            return;
        }
        let (driver, tx) = (self.driver.clone(), self.inbox_tx.clone());
        self.inspection = Some(tokio::spawn(async move {
            let handles: Vec<Handle> = targets.iter().map(|(_, _, h)| h.clone()).collect();
            let results = driver.inspect_all(&handles).await;
            let mut seen = Vec::with_capacity(targets.len());
            let mut throttled: Option<Duration> = None;
            for ((key, op, handle), result) in targets.into_iter().zip(results) {
                match result {
                    Ok(inspection) => {
                        let remark = driver.remark(&handle);
                        seen.push((key, op, inspection, remark));
                    }
                    Err(e) => match e.retry_after() {
                        Some(delay) => throttled = throttled.max(Some(delay)),
                        None => tracing::warn!(replica = %key, error = %e, "inspect failed"),
                    },
                }
            }
            if let Some(retry_after) = throttled {
                let _ = tx.send(Input::InspectionThrottled { retry_after }).await;
            }
            let _ = tx.send(Input::Inspected(seen)).await;
        }));
    }

    /// Takes in an inspection pass; an exit is a crash (stops we asked for are
    /// in `Stopping` and not inspected), and a restart by the runtime is
    /// reported, never acted on. Results for an instance that was replaced or
    /// stopped meanwhile (another `op`) are stale and ignored.
    fn inspected(&mut self, seen: Vec<(ReplicaKey, u64, Inspection, Option<String>)>) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for (key, op, inspection, remark) in seen {
            let config = self.config.clone();
            let (min_run, loop_after) = (config.min_run, config.crash_loop_after);
            let Some(r) = self
                .replicas
                .get_mut(&key)
                .filter(|r| r.op == op && r.phase == Phase::Running)
            else {
                continue;
            };
            if r.runtime_remark != remark {
                r.runtime_remark = remark;
                changed = true;
            }
            match normalize(inspection, self.capabilities.runtime_restarts) {
                Inspection::Running { health } => {
                    if r.runtime_down {
                        r.runtime_down = false;
                        changed = true;
                    }
                    if health != r.runtime_health {
                        tracing::info!(replica = %key, health = ?health, "the runtime's own health check changed");
                        r.runtime_health = health;
                        changed = true;
                    }
                    if r.crashes_in_row > 0
                        && r.started_at
                            .is_some_and(|s| now.duration_since(s) >= min_run)
                    {
                        r.crashes_in_row = 0;
                        changed = true;
                    }
                }
                Inspection::Restarted {
                    restarts,
                    running,
                    health,
                } => {
                    if restarts > r.runtime_restarts {
                        // Counted like the supervisor's own restarts: runs
                        // shorter than `min_run` in a row are a crash loop.
                        let new = restarts - r.runtime_restarts;
                        let ran = r
                            .started_at
                            .map_or(Duration::ZERO, |s| now.duration_since(s));
                        r.crashes_in_row = if ran < min_run {
                            r.crashes_in_row.saturating_add(new)
                        } else {
                            new
                        };
                        r.runtime_restarts = restarts;
                        r.started_at = Some(now);
                        r.message = format!(
                            "the runtime restarted it ({restarts} restart{} so far)",
                            if restarts == 1 { "" } else { "s" }
                        );
                        if r.crashes_in_row >= loop_after {
                            r.message.push_str(&format!(
                                " (crash-looping: {} short runs in a row)",
                                r.crashes_in_row
                            ));
                        }
                        tracing::warn!(replica = %key, message = %r.message, "the runtime restarted the replica");
                        changed = true;
                    }
                    if r.runtime_down == running {
                        r.runtime_down = !running;
                        changed = true;
                    }
                    let health = health.filter(|_| running);
                    if health != r.runtime_health {
                        r.runtime_health = health;
                        changed = true;
                    }
                    if running
                        && r.crashes_in_row > 0
                        && r.started_at
                            .is_some_and(|s| now.duration_since(s) >= min_run)
                    {
                        r.crashes_in_row = 0;
                        changed = true;
                    }
                }
                Inspection::Exited { code, signal } => {
                    r.stop_probe();
                    r.health = None;
                    r.runtime_health = None;
                    let ran = r
                        .started_at
                        .map_or(Duration::ZERO, |s| now.duration_since(s));
                    r.crashes_in_row = if ran < min_run {
                        r.crashes_in_row.saturating_add(1)
                    } else {
                        1
                    };
                    r.restarts = r.restarts.saturating_add(1);
                    let delay = backoff(&config, r.crashes_in_row);
                    let how = match (code, signal) {
                        (Some(c), _) => format!("exited with code {c}"),
                        (None, Some(s)) => format!("killed by signal {s}"),
                        (None, None) => "exited".to_string(),
                    };
                    r.message =
                        format!("{how} after {}; restarting in {}", human(ran), human(delay));
                    if r.crashes_in_row >= loop_after {
                        r.message.push_str(&format!(
                            " (crash-looping: {} short runs in a row)",
                            r.crashes_in_row
                        ));
                    }
                    tracing::warn!(replica = %key, message = %r.message, "replica exited");
                    r.phase = Phase::Backoff { until: now + delay };
                    r.handle = None;
                    r.started_at = None;
                    self.dirty = true;
                    changed = true;
                }
            }
        }
        changed
    }

    fn observed(&self, desired: &DesiredSet) -> BTreeMap<ReplicaKey, Observed> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|(k, r)| {
                let has_check = desired.apps.get(&k.app).is_some_and(|d| d.health.is_some());
                let o = Observed {
                    workload_generation: r.workload_generation,
                    busy: matches!(r.phase, Phase::Starting | Phase::Stopping { .. }),
                    running: r.phase == Phase::Running,
                    due: match r.phase {
                        Phase::Backoff { until } | Phase::Failed { until } => now >= until,
                        _ => false,
                    },
                    ready: r.ready(has_check),
                };
                (k.clone(), o)
            })
            .collect()
    }

    /// Whether singletons must not run now: no lease, or it ends too soon.
    fn fenced(&self) -> bool {
        self.lease
            .deadline()
            .is_none_or(|d| Instant::now() + FENCE_EARLY >= d)
    }

    /// Plans and starts the driver operations to reach the desired set;
    /// returns whether it did anything.
    fn converge(&mut self) -> bool {
        let Some(desired) = self.desired.take() else {
            return false;
        };
        let observed = self.observed(&desired);
        let fence = self.fenced() && desired.apps.values().any(|d| d.singleton && d.replicas > 0);
        let p = if fence {
            let mut apps = desired.apps.clone();
            for d in apps.values_mut().filter(|d| d.singleton && d.replicas > 0) {
                if self.replicas.keys().any(|k| k.app == d.app) {
                    tracing::warn!(app = %d.app, "lease on the singleton not renewed: stopping it");
                }
                d.replicas = 0;
            }
            plan(&apps, &observed)
        } else {
            plan(&desired.apps, &observed)
        };
        self.desired = Some(desired);
        let acted = !(p.remove.is_empty() && p.replace.is_empty() && p.start.is_empty());
        for key in p.remove {
            self.stop(&key, false);
        }
        for key in p.replace {
            self.stop(&key, true);
        }
        for key in p.start {
            let d = self
                .desired
                .as_ref()
                .and_then(|d| d.apps.get(&key.app))
                .cloned();
            if let Some(d) = d {
                self.start(&key, &d);
            }
        }
        acted
    }

    fn start(&mut self, key: &ReplicaKey, d: &DesiredApp) {
        let r = self
            .replicas
            .entry(key.clone())
            .or_insert_with(|| Replica::new(d.generation, d.workload_generation));
        r.op += 1;
        r.phase = Phase::Starting;
        r.generation = d.generation;
        r.workload_generation = d.workload_generation;
        r.health = None;
        r.runtime_health = None;
        r.runtime_remark = None;
        // The runtime's restarts belonged to the last instance: they join
        // the replica's own count, and the new instance starts from none.
        r.restarts = r.restarts.saturating_add(r.runtime_restarts);
        r.runtime_restarts = 0;
        r.runtime_down = false;
        let spec = ReplicaSpec {
            key: key.clone(),
            provider: self.provider.clone(),
            workload: d.workload.clone(),
            workload_generation: d.workload_generation,
        };
        let (driver, ops, tx, op, key) = (
            self.driver.clone(),
            self.ops.clone(),
            self.inbox_tx.clone(),
            r.op,
            key.clone(),
        );
        tokio::spawn(async move {
            // A throttled start comes back as it is: the supervisor schedules
            // the retry, so the replica says what it waits for.
            let result = call_driver(&ops, 0, || driver.start(&spec)).await;
            let _ = tx.send(Input::Started { key, op, result }).await;
        });
    }

    fn stop(&mut self, key: &ReplicaKey, replace: bool) {
        let app = self.desired.as_ref().and_then(|d| d.apps.get(&key.app));
        let mut grace = app.map_or(Duration::from_secs(10), |d| d.workload.stop_grace);
        if app.is_some_and(|d| d.singleton) && self.fenced() {
            grace = grace.min(FENCE_GRACE);
        }
        let Some(r) = self.replicas.get_mut(key) else {
            return;
        };
        r.op += 1;
        r.stop_probe();
        r.phase = Phase::Stopping { replace };
        let handle = r.handle.take();
        // A replica that crashed runs no instance, but its last one may still
        // hold a container or files (kept for its output): removal frees them.
        let leftover = if replace || handle.is_some() {
            None
        } else {
            r.output.take()
        };
        self.dirty = true;
        let (driver, ops, tx, op, key) = (
            self.driver.clone(),
            self.ops.clone(),
            self.inbox_tx.clone(),
            r.op,
            key.clone(),
        );
        tokio::spawn(async move {
            let destroy = |h: Handle| {
                let (driver, ops) = (driver.clone(), ops.clone());
                async move { call_driver(&ops, THROTTLED_RETRIES, || driver.destroy(&h)).await }
            };
            if let Some(h) = handle {
                // The replica stays `Stopping` until the runtime confirms:
                // an instance the runtime could not stop (its API
                // unreachable, say) may still run, and forgetting it would
                // leave it running untracked.
                let mut wait = REMOVAL_RETRY_FIRST;
                while let Err(e) =
                    call_driver(&ops, THROTTLED_RETRIES, || driver.stop(&h, grace)).await
                {
                    if !e.is_retryable() {
                        tracing::warn!(replica = %key, error = %e, "stop failed");
                        break;
                    }
                    tracing::warn!(replica = %key, error = %e, retry_in = ?wait, "stop failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(REMOVAL_RETRY_MAX);
                }
                if !replace && let Err(e) = destroy(h).await {
                    tracing::warn!(replica = %key, error = %e, "destroy failed");
                }
            } else if let Some(h) = leftover
                && let Err(e) = destroy(h).await
            {
                tracing::warn!(replica = %key, error = %e, "destroy failed");
            }
            let _ = tx.send(Input::Stopped { key, op }).await;
        });
    }

    fn start_probe(&mut self, key: &ReplicaKey) {
        let spec: Option<HealthSpec> = self
            .desired
            .as_ref()
            .and_then(|d| d.apps.get(&key.app))
            .and_then(|d| d.health.clone());
        let Some(r) = self.replicas.get_mut(key) else {
            return;
        };
        r.stop_probe();
        let (Some(spec), Some(handle)) = (spec, r.handle.clone()) else {
            r.health = None;
            return;
        };
        r.health = Some(HealthTracker::new(&spec));
        let token = CancellationToken::new();
        r.probe = Some(token.clone());
        let (driver, tx, op, key, host) = (
            self.driver.clone(),
            self.inbox_tx.clone(),
            r.op,
            key.clone(),
            self.config.probe_host,
        );
        let fast = self.config.startup_probe_interval.min(spec.interval);
        tokio::spawn(async move {
            let mut passed = false;
            // Until the first pass, probes start quick and back off to `fast`,
            // so an app that is up within milliseconds is seen within
            // milliseconds; failures meanwhile count once per `fast`, as if
            // probed only then, so the quick retries do not make a starting
            // replica unhealthy sooner.
            let mut retry = FIRST_STARTUP_PROBE.min(fast);
            let mut failure_counted: Option<tokio::time::Instant> = None;
            loop {
                let result = probe_once(driver.as_ref(), &handle, host, &spec)
                    .await
                    .map_err(|e| e.to_string());
                let count = passed
                    || result.is_ok()
                    || failure_counted.is_none_or(|at| at.elapsed() >= fast);
                passed |= result.is_ok();
                if !passed && count {
                    failure_counted = Some(tokio::time::Instant::now());
                }
                if count
                    && tx
                        .send(Input::Probe {
                            key: key.clone(),
                            op,
                            result,
                        })
                        .await
                        .is_err()
                {
                    return;
                }
                let wait = if passed {
                    spec.interval
                } else {
                    let wait = retry;
                    retry = retry.saturating_mul(2).min(fast);
                    wait
                };
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    fn status_of(&self, key: &ReplicaKey, r: &Replica) -> pb::ReplicaStatus {
        let has_check = self
            .desired
            .as_ref()
            .and_then(|d| d.apps.get(&key.app))
            .is_some_and(|d| d.health.is_some());
        let state = r.running_state(has_check);
        let h = r.handle.as_ref();
        pb::ReplicaStatus {
            app: key.app.clone(),
            index: key.index,
            generation: r.generation,
            workload_generation: r.workload_generation,
            state: state as i32,
            address: h.and_then(|h| h.address.clone()).unwrap_or_default(),
            ports: h
                .map(|h| {
                    h.ports
                        .iter()
                        .map(|(k, v)| (k.clone(), u32::from(*v)))
                        .collect()
                })
                .unwrap_or_default(),
            instance_id: h.map(|h| h.instance_id.clone()).unwrap_or_default(),
            restarts: r.restarts.saturating_add(r.runtime_restarts),
            crash_looping: r.crashes_in_row >= self.config.crash_loop_after,
            message: match (r.status_message(), &self.settings_error) {
                (own, None) => own,
                (own, Some(problem)) if own.is_empty() => problem.clone(),
                (own, Some(problem)) => format!("{own}; {problem}"),
            },
            started_at_ms: h.map_or(0, |h| h.started_at_ms),
            state_since_ms: r.state_since_ms,
            provider: self.provider.clone(),
            // The daemon decides readiness from the state and the app's spec.
            ready: false,
        }
    }

    fn publish(&mut self) {
        let now = now_ms();
        let keys: Vec<ReplicaKey> = self.replicas.keys().cloned().collect();
        let mut statuses = BTreeMap::new();
        for key in keys {
            let Some(r) = self.replicas.get(&key) else {
                continue;
            };
            let mut s = self.status_of(&key, r);
            let state = s.state();
            if let Some(r) = self.replicas.get_mut(&key) {
                if r.last_state != state || r.state_since_ms == 0 {
                    r.last_state = state;
                    r.state_since_ms = now;
                }
                s.state_since_ms = r.state_since_ms;
            }
            statuses.insert(key, s);
        }
        self.board.update(
            statuses,
            self.desired.as_ref().map_or(0, |d| d.revision),
            &self
                .desired
                .as_ref()
                .map(|d| d.store.clone())
                .unwrap_or_default(),
        );
    }

    fn persist(&mut self) {
        let has_singletons = self
            .desired
            .as_ref()
            .is_some_and(|d| d.apps.values().any(|a| a.singleton));
        let lease = self.lease.deadline();
        if has_singletons
            && lease != self.saved_lease
            && let Some(deadline) = lease
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let wall = now_ms() + i64::try_from(left.as_millis()).unwrap_or(0);
            match self.state.save_lease(wall) {
                Ok(()) => self.saved_lease = lease,
                Err(e) => tracing::error!(error = %e, "cannot persist the lease"),
            }
        }
        if !self.dirty {
            return;
        }
        let replicas = self
            .replicas
            .iter()
            .filter_map(|(k, r)| {
                Some(PersistedReplica {
                    key: k.clone(),
                    handle: r.handle.clone()?,
                    generation: r.generation,
                    workload_generation: r.workload_generation,
                    restarts: r.restarts,
                })
            })
            .collect();
        match self.state.save_replicas(replicas) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::error!(error = %e, "cannot persist replica handles"),
        }
    }
}

/// Restart delay after `crashes` crashes in a row: doubling from the base, capped.
fn backoff(config: &SupervisorConfig, crashes: u32) -> Duration {
    let factor = 2u32.saturating_pow(crashes.saturating_sub(1).min(16));
    config
        .backoff_base
        .saturating_mul(factor)
        .min(config.backoff_max)
}

fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Workload;

    fn app(name: &str, replicas: u32, wg: u64) -> (String, DesiredApp) {
        (
            name.to_string(),
            DesiredApp {
                app: name.into(),
                generation: wg,
                workload_generation: wg,
                replicas,
                workload: Workload {
                    image: None,
                    command: Some("x".into()),
                    args: vec![],
                    env: vec![],
                    ports: vec![],
                    working_dir: None,
                    stop_grace: Duration::from_secs(1),
                    cpu_millis: None,
                    memory_mib: None,
                },
                health: None,
                singleton: false,
            },
        )
    }

    #[tokio::test]
    async fn inspection_results_for_a_replaced_instance_are_ignored() {
        use crate::driver::process::{ProcessDriver, ProcessDriverConfig};
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = ProcessDriver::new(ProcessDriverConfig::new(dir.path().join("driver")))
            .expect("driver");
        let state = StateDir::open(&dir.path().join("state")).expect("state");
        let (mut sup, _handle) = Supervisor::restore(
            Arc::new(driver),
            "p".into(),
            state,
            SupervisorConfig::default(),
        )
        .await
        .expect("supervisor");
        let k = key("web", 0);
        let mut r = Replica::new(1, 1);
        r.phase = Phase::Running;
        r.op = 5;
        sup.replicas.insert(k.clone(), r);
        let exited = Inspection::Exited {
            code: Some(1),
            signal: None,
        };

        // Seen under an older operation: another instance runs now.
        assert!(!sup.inspected(vec![(k.clone(), 4, exited, None)]));
        assert_eq!(sup.replicas[&k].phase, Phase::Running);
        // A verdict of the runtime under the current one counts...
        let unhealthy = Inspection::Running {
            health: Some(RuntimeHealth::Unhealthy),
        };
        assert!(sup.inspected(vec![(k.clone(), 5, unhealthy, None)]));
        assert_eq!(
            sup.replicas[&k].runtime_health,
            Some(RuntimeHealth::Unhealthy)
        );
        assert!(
            !sup.inspected(vec![(k.clone(), 5, unhealthy, None)]),
            "no change twice"
        );
        // What the runtime says is wrong joins the replica's message, and
        // leaves it when the runtime stops saying it.
        let remark = Some(
            "CrashLoopBackOff: back-off restarting failed container (last exit 1)".to_string(),
        );
        assert!(sup.inspected(vec![(k.clone(), 5, unhealthy, remark)]));
        let message = sup.replicas[&k].status_message();
        assert!(
            message.contains("HEALTHCHECK") && message.contains("CrashLoopBackOff"),
            "{message}"
        );
        assert!(sup.inspected(vec![(k.clone(), 5, unhealthy, None)]));
        assert!(
            !sup.replicas[&k]
                .status_message()
                .contains("CrashLoopBackOff")
        );
        // ... and so does an exit: a crash, restarted after a backoff.
        assert!(sup.inspected(vec![(k.clone(), 5, exited, None)]));
        let r = &sup.replicas[&k];
        assert!(matches!(r.phase, Phase::Backoff { .. }), "{:?}", r.phase);
        assert_eq!((r.restarts, r.runtime_health), (1, None));
        assert!(r.message.contains("exited with code 1"), "{}", r.message);
    }

    #[test]
    fn both_health_verdicts_decide_the_state_and_readiness() {
        use pb::ReplicaState as S;
        let spec = HealthSpec {
            probe: crate::health::Probe::Tcp {
                port: "http".into(),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 1,
            success_threshold: 1,
        };
        let tracker = |result: Option<bool>| {
            let mut t = HealthTracker::new(&spec);
            if let Some(ok) = result {
                t.record(ok);
            }
            t
        };
        let replica = |app: Option<Option<bool>>, runtime: Option<RuntimeHealth>| {
            let mut r = Replica::new(1, 1);
            r.phase = Phase::Running;
            r.health = app.map(tracker);
            r.runtime_health = runtime;
            r
        };
        // (app check: None = the app has none, Some(None) = no result yet;
        //  the runtime's verdict) -> (state, ready)
        let cases = [
            (None, None, S::Running, true),
            (None, Some(RuntimeHealth::Starting), S::Starting, false),
            (None, Some(RuntimeHealth::Healthy), S::Healthy, true),
            (None, Some(RuntimeHealth::Unhealthy), S::Unhealthy, false),
            (Some(None), None, S::Starting, false),
            (Some(Some(true)), None, S::Healthy, true),
            (Some(Some(false)), None, S::Unhealthy, false),
            (
                Some(Some(true)),
                Some(RuntimeHealth::Healthy),
                S::Healthy,
                true,
            ),
            (
                Some(Some(true)),
                Some(RuntimeHealth::Starting),
                S::Starting,
                false,
            ),
            (
                Some(Some(true)),
                Some(RuntimeHealth::Unhealthy),
                S::Unhealthy,
                false,
            ),
            (
                Some(Some(false)),
                Some(RuntimeHealth::Healthy),
                S::Unhealthy,
                false,
            ),
        ];
        for (app, runtime, state, ready) in cases {
            let has_check = app.is_some();
            let r = replica(app, runtime);
            assert_eq!(r.running_state(has_check), state, "{app:?} {runtime:?}");
            assert_eq!(r.ready(has_check), ready, "{app:?} {runtime:?}");
        }
        // An app with a check whose tracker is not set up yet is starting.
        let r = replica(None, Some(RuntimeHealth::Healthy));
        assert_eq!(r.running_state(true), S::Starting);
        assert!(!r.ready(true));

        // The runtime's verdict stays in the message, whatever probes say.
        let mut r = replica(Some(Some(true)), Some(RuntimeHealth::Unhealthy));
        assert_eq!(
            r.status_message(),
            "the image's HEALTHCHECK reports unhealthy"
        );
        r.message = "restarted".into();
        assert_eq!(
            r.status_message(),
            "the image's HEALTHCHECK reports unhealthy; restarted"
        );
        r.runtime_health = Some(RuntimeHealth::Healthy);
        assert_eq!(r.status_message(), "restarted");
    }

    fn key(app: &str, index: u32) -> ReplicaKey {
        ReplicaKey {
            app: app.into(),
            index,
        }
    }

    fn running(wg: u64, ready: bool) -> Observed {
        Observed {
            workload_generation: wg,
            busy: false,
            running: true,
            due: false,
            ready,
        }
    }

    #[test]
    fn starts_missing_and_removes_unwanted() {
        let desired: BTreeMap<_, _> = [app("web", 2, 1)].into();
        let observed: BTreeMap<_, _> = [
            (key("web", 1), running(1, true)),
            (key("web", 2), running(1, true)),
            (key("old", 0), running(1, true)),
        ]
        .into();
        let p = plan(&desired, &observed);
        assert_eq!(p.start, vec![key("web", 0)]);
        assert_eq!(p.remove, vec![key("old", 0), key("web", 2)]);
        assert!(p.replace.is_empty());
    }

    #[test]
    fn busy_replicas_are_left_alone() {
        let desired: BTreeMap<_, _> = [app("web", 1, 2)].into();
        let busy = Observed {
            busy: true,
            running: false,
            ..running(1, false)
        };
        let observed: BTreeMap<_, _> =
            [(key("web", 0), busy.clone()), (key("web", 5), busy)].into();
        assert_eq!(plan(&desired, &observed), Plan::default());
    }

    #[test]
    fn replaces_one_at_a_time_while_the_app_serves() {
        let desired: BTreeMap<_, _> = [app("web", 3, 2)].into();
        let observed: BTreeMap<_, _> = (0..3).map(|i| (key("web", i), running(1, true))).collect();
        assert_eq!(plan(&desired, &observed).replace, vec![key("web", 0)]);
        // The first replacement is up but not ready yet: wait.
        let mut observed = observed;
        observed.insert(key("web", 0), running(2, false));
        assert!(plan(&desired, &observed).replace.is_empty());
        // Ready: next one.
        observed.insert(key("web", 0), running(2, true));
        assert_eq!(plan(&desired, &observed).replace, vec![key("web", 1)]);
    }

    #[test]
    fn a_replacement_between_its_stop_and_its_start_holds_the_next_one_back() {
        let desired: BTreeMap<_, _> = [app("web", 2, 2)].into();
        let stopped = Observed {
            running: false,
            ..running(1, false)
        };
        let observed: BTreeMap<_, _> =
            [(key("web", 0), stopped), (key("web", 1), running(1, true))].into();
        let p = plan(&desired, &observed);
        assert_eq!(p.start, vec![key("web", 0)]);
        assert!(p.replace.is_empty(), "web/1 still serves alone: {p:?}");
    }

    #[test]
    fn replaces_everything_when_nothing_serves() {
        let desired: BTreeMap<_, _> = [app("web", 2, 2)].into();
        let observed: BTreeMap<_, _> = (0..2).map(|i| (key("web", i), running(1, false))).collect();
        assert_eq!(
            plan(&desired, &observed).replace,
            vec![key("web", 0), key("web", 1)]
        );
    }

    #[test]
    fn restarts_only_when_the_backoff_is_over() {
        let desired: BTreeMap<_, _> = [app("web", 2, 1)].into();
        let waiting = Observed {
            running: false,
            due: false,
            ..running(1, false)
        };
        let due = Observed {
            due: true,
            ..waiting.clone()
        };
        let observed: BTreeMap<_, _> = [(key("web", 0), waiting), (key("web", 1), due)].into();
        assert_eq!(plan(&desired, &observed).start, vec![key("web", 1)]);
    }

    #[test]
    fn outdated_stopped_replicas_start_at_once() {
        let desired: BTreeMap<_, _> = [app("web", 1, 3)].into();
        let failed = Observed {
            running: false,
            due: false,
            ..running(1, false)
        };
        let observed: BTreeMap<_, _> = [(key("web", 0), failed)].into();
        assert_eq!(plan(&desired, &observed).start, vec![key("web", 0)]);
    }

    #[test]
    fn board_coalesces_and_reports_removals() {
        let board = StatusBoard::default();
        let s = |state: pb::ReplicaState| pb::ReplicaStatus {
            app: "web".into(),
            state: state as i32,
            ..Default::default()
        };
        let store = StoreEpoch::default();
        board.update(
            [(key("web", 0), s(pb::ReplicaState::Starting))].into(),
            1,
            &store,
        );
        board.update(
            [(key("web", 0), s(pb::ReplicaState::Healthy))].into(),
            1,
            &store,
        );
        let d = board.drain();
        assert_eq!(d.replicas.len(), 1);
        assert_eq!(d.replicas[0].state(), pb::ReplicaState::Healthy);
        board.update(BTreeMap::new(), 2, &store);
        let d = board.drain();
        assert_eq!(d.removed, vec!["web/0".to_string()]);
        assert_eq!(d.revision, 2);
    }

    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::convert::StoreEpoch;
    use crate::driver::ListedReplica;
    use crate::driver::settings::DockerSettings;

    /// A driver for the supervisor's own tests. Every call is recorded with
    /// its time (on the paused clock) and announced on `changes`; operations
    /// can be held at a gate; starts and inspections can be throttled by
    /// script; inspections answer what the test sets per instance.
    #[derive(Debug)]
    struct Fake {
        kind: &'static str,
        caps: Capabilities,
        /// When set, every start, stop and destroy takes a permit of it first
        /// (and keeps it), so the test decides when they finish.
        gate: Option<Semaphore>,
        /// How many of the next starts the runtime throttles, and for how long.
        throttled_starts: Mutex<VecDeque<Duration>>,
        /// The next inspection is throttled for this long.
        throttled_inspection: Mutex<Option<Duration>>,
        /// Refuses every settings but `Unset` with this reason.
        refuse_settings: Option<&'static str>,
        /// Operations (start, stop, destroy) in flight, and the most ever.
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        /// Every call: what, and when.
        calls: Mutex<Vec<(&'static str, Instant)>>,
        /// The settings `configure` was given, in order.
        configured: Mutex<Vec<DriverSettings>>,
        /// What `inspect` and `recover` answer per instance id; running
        /// when unset.
        inspections: Mutex<HashMap<String, Inspection>>,
        /// What `list_instances` finds.
        listed: Mutex<Vec<Listed>>,
        /// `list_instances` fails.
        list_fails: bool,
        /// How many of the next stops fail as if the runtime were unreachable.
        failing_stops: AtomicUsize,
        /// The instances stopped and destroyed, in order.
        stopped: Mutex<Vec<String>>,
        destroyed: Mutex<Vec<String>>,
        next_id: AtomicUsize,
        changes: watch::Sender<u64>,
    }

    impl Fake {
        fn new(caps: Capabilities) -> Self {
            Fake {
                kind: "fake",
                caps,
                gate: None,
                throttled_starts: Mutex::default(),
                throttled_inspection: Mutex::default(),
                refuse_settings: None,
                in_flight: AtomicUsize::new(0),
                most_in_flight: AtomicUsize::new(0),
                calls: Mutex::default(),
                configured: Mutex::default(),
                inspections: Mutex::default(),
                listed: Mutex::default(),
                list_fails: false,
                failing_stops: AtomicUsize::new(0),
                stopped: Mutex::default(),
                destroyed: Mutex::default(),
                next_id: AtomicUsize::new(1),
                changes: watch::Sender::new(0),
            }
        }

        /// A local runtime: many operations, inspected every 250 ms.
        fn caps() -> Capabilities {
            Capabilities {
                recover: true,
                exec: true,
                logs: false,
                max_concurrent_operations: 64,
                inspect_interval: Duration::from_millis(250),
                stop_overhead: Duration::from_secs(1),
                runtime_restarts: false,
            }
        }

        fn record(&self, call: &'static str) {
            self.calls
                .lock()
                .expect("calls")
                .push((call, Instant::now()));
            self.changes.send_modify(|n| *n += 1);
        }

        /// When each call of this kind was made.
        fn times(&self, call: &str) -> Vec<Instant> {
            self.calls
                .lock()
                .expect("calls")
                .iter()
                .filter(|(c, _)| *c == call)
                .map(|(_, at)| *at)
                .collect()
        }

        fn count(&self, call: &str) -> usize {
            self.times(call).len()
        }

        fn in_flight(&self) -> usize {
            self.in_flight.load(Ordering::SeqCst)
        }

        fn set_inspection(&self, instance: &str, inspection: Inspection) {
            self.inspections
                .lock()
                .expect("inspections")
                .insert(instance.to_string(), inspection);
        }

        /// One operation: counted in flight while it waits at the gate.
        async fn operation(&self, call: &'static str) {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            self.record(call);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate").forget();
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    impl Driver for Fake {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn capabilities(&self) -> Capabilities {
            self.caps
        }
        async fn configure(&self, settings: &DriverSettings) -> Result<(), DriverError> {
            self.configured
                .lock()
                .expect("configured")
                .push(settings.clone());
            self.record("configure");
            match self.refuse_settings {
                Some(reason) if *settings != DriverSettings::Unset => {
                    Err(DriverError::InvalidSettings(reason.into()))
                }
                _ => Ok(()),
            }
        }
        async fn start(&self, spec: &ReplicaSpec) -> Result<Handle, DriverError> {
            self.operation("start").await;
            let throttled = self.throttled_starts.lock().expect("script").pop_front();
            if let Some(retry_after) = throttled {
                return Err(DriverError::Throttled {
                    message: "RequestLimitExceeded".into(),
                    retry_after,
                });
            }
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            Ok(Handle {
                driver: self.kind.into(),
                instance_id: format!("{}-{id}", spec.key),
                address: None,
                ports: BTreeMap::new(),
                started_at_ms: 0,
                data: serde_json::Value::Null,
            })
        }
        async fn recover(&self, handle: &Handle) -> Result<Inspection, DriverError> {
            let set = self.inspections.lock().expect("inspections");
            Ok(set
                .get(&handle.instance_id)
                .copied()
                .unwrap_or(Inspection::RUNNING))
        }
        async fn list_instances(&self, _: &str) -> Result<Vec<Listed>, DriverError> {
            if self.list_fails {
                return Err(DriverError::Runtime("the runtime does not answer".into()));
            }
            Ok(self.listed.lock().expect("listed").clone())
        }
        async fn inspect(&self, handle: &Handle) -> Result<Inspection, DriverError> {
            self.record("inspect");
            if let Some(retry_after) = self.throttled_inspection.lock().expect("script").take() {
                return Err(DriverError::Throttled {
                    message: "RequestLimitExceeded".into(),
                    retry_after,
                });
            }
            let set = self.inspections.lock().expect("inspections");
            Ok(set
                .get(&handle.instance_id)
                .copied()
                .unwrap_or(Inspection::RUNNING))
        }
        async fn stop(&self, handle: &Handle, _: Duration) -> Result<(), DriverError> {
            self.stopped
                .lock()
                .expect("stopped")
                .push(handle.instance_id.clone());
            self.operation("stop").await;
            let failing =
                self.failing_stops
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(DriverError::Runtime(
                    "the runtime's API is unreachable".into(),
                ));
            }
            Ok(())
        }
        async fn destroy(&self, handle: &Handle) -> Result<(), DriverError> {
            self.destroyed
                .lock()
                .expect("destroyed")
                .push(handle.instance_id.clone());
            self.operation("destroy").await;
            Ok(())
        }
        async fn exec(
            &self,
            _: &Handle,
            _: &[String],
            _: Duration,
        ) -> Result<Option<i32>, DriverError> {
            Ok(Some(0))
        }
    }

    /// A supervisor of `fake` running on its own task (stopped with the
    /// token), and the state directory it keeps.
    async fn supervise(
        fake: &Arc<Fake>,
    ) -> (
        SupervisorHandle,
        tokio_util::sync::DropGuard,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state");
        let (sup, handle) =
            Supervisor::restore(fake.clone(), "p".into(), state, SupervisorConfig::default())
                .await
                .expect("supervisor");
        let stop = CancellationToken::new();
        tokio::spawn(sup.run(stop.clone(), false));
        (handle, stop.drop_guard(), dir)
    }

    /// Sends the supervisor an assignment of `apps` with `settings`.
    async fn assign(
        handle: &SupervisorHandle,
        revision: u64,
        apps: Vec<(String, DesiredApp)>,
        settings: DriverSettings,
    ) {
        let set = DesiredSet {
            revision,
            store: StoreEpoch::default(),
            apps: apps.into_iter().collect(),
            settings,
        };
        let raw = pb::Assignment {
            revision,
            ..Default::default()
        };
        handle.assign(set, raw).await;
    }

    /// Waits until `done` holds of the fake, within a minute of the paused clock.
    async fn until_fake(fake: &Fake, what: &str, done: impl Fn(&Fake) -> bool) {
        let mut changes = fake.changes.subscribe();
        let wait = async {
            while !done(fake) {
                changes.changed().await.expect("the fake lives");
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}");
        }
    }

    /// Waits until `done` holds of the published statuses, within a minute
    /// of the paused clock; returns them.
    async fn until_board(
        board: &StatusBoard,
        what: &str,
        done: impl Fn(&[pb::ReplicaStatus]) -> bool,
    ) -> Vec<pb::ReplicaStatus> {
        let mut changes = board.subscribe();
        let wait = async {
            loop {
                let (all, _, _) = board.snapshot();
                if done(&all) {
                    return all;
                }
                changes.changed().await.expect("the board lives");
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(all) => all,
            Err(_) => panic!("timed out waiting for {what}: {:?}", board.snapshot().0),
        }
    }

    fn all_in(state: pb::ReplicaState, n: usize) -> impl Fn(&[pb::ReplicaStatus]) -> bool {
        move |all| all.len() == n && all.iter().all(|r| r.state() == state)
    }

    #[tokio::test(start_paused = true)]
    async fn driver_operations_in_flight_never_exceed_the_drivers_bound() {
        let mut fake = Fake::new(Capabilities {
            max_concurrent_operations: 3,
            ..Fake::caps()
        });
        fake.gate = Some(Semaphore::new(0));
        let fake = Arc::new(fake);
        let (handle, _stop, _dir) = supervise(&fake).await;
        let gate = |n| fake.gate.as_ref().expect("gate").add_permits(n);

        // A burst of twelve starts: three go to the runtime, the rest wait.
        assign(&handle, 1, vec![app("web", 12, 1)], DriverSettings::Unset).await;
        until_fake(&fake, "three starts in flight", |f| f.in_flight() == 3).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!((fake.count("start"), fake.in_flight()), (3, 3));
        gate(12);
        until_board(
            &handle.board,
            "twelve running replicas",
            all_in(pb::ReplicaState::Running, 12),
        )
        .await;
        assert_eq!(fake.count("start"), 12);

        // A burst of removals: stops and destroys share the same bound.
        assign(&handle, 2, vec![], DriverSettings::Unset).await;
        until_fake(&fake, "three stops in flight", |f| f.in_flight() == 3).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!((fake.count("stop"), fake.in_flight()), (3, 3));
        gate(24);
        until_board(&handle.board, "every replica gone", |all| all.is_empty()).await;
        assert_eq!((fake.count("stop"), fake.count("destroy")), (12, 12));
        assert_eq!(fake.most_in_flight.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_the_runtime_fails_is_tried_again_until_it_succeeds() {
        let fake = Fake::new(Fake::caps());
        fake.failing_stops.store(3, Ordering::SeqCst);
        let fake = Arc::new(fake);
        let (handle, _stop, _dir) = supervise(&fake).await;
        assign(&handle, 1, vec![app("web", 1, 1)], DriverSettings::Unset).await;
        until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;
        assign(&handle, 2, vec![], DriverSettings::Unset).await;
        until_board(&handle.board, "the replica removed", |all| all.is_empty()).await;
        let stops = fake.times("stop");
        assert_eq!(stops.len(), 4, "three failed stops, then one that worked");
        assert!(
            stops.windows(2).all(|p| p[1] - p[0] >= REMOVAL_RETRY_FIRST),
            "tried again only after a wait: {stops:?}"
        );
        let destroys = fake.times("destroy");
        assert_eq!(destroys.len(), 1, "removed once the stop worked");
        assert!(destroys[0] >= stops[3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_start_waits_out_the_runtimes_delay_and_is_no_crash() {
        const DELAY: Duration = Duration::from_secs(4);
        let fake = Fake::new(Fake::caps());
        // More throttles in a row than make a crash loop, each shorter than
        // the supervisor's own backoff would wait.
        fake.throttled_starts
            .lock()
            .expect("script")
            .extend([DELAY; 4]);
        let fake = Arc::new(fake);
        let (handle, _stop, _dir) = supervise(&fake).await;
        assign(&handle, 1, vec![app("web", 1, 1)], DriverSettings::Unset).await;

        let waiting = until_board(&handle.board, "the replica waiting on the runtime", |all| {
            all.iter()
                .any(|r| r.state() == pb::ReplicaState::Backoff && r.message.contains("throttled"))
        })
        .await;
        assert!(
            waiting[0].message.contains("RequestLimitExceeded"),
            "{}",
            waiting[0].message
        );
        let all = until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;

        let starts = fake.times("start");
        assert_eq!(starts.len(), 5, "four throttled starts, then one that ran");
        // The delay plus at most half of it as jitter, noticed on the next tick.
        let latest = DELAY + DELAY / 2 + SupervisorConfig::default().tick;
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= DELAY,
                "retried after {gap:?}, before the runtime's {DELAY:?}"
            );
            assert!(gap <= latest, "retried only after {gap:?}");
        }
        assert!(!all[0].crash_looping, "throttling counted as crashes");
        assert_eq!(all[0].restarts, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn inspections_follow_the_drivers_period_and_wait_out_throttling() {
        const PERIOD: Duration = Duration::from_secs(2);
        const DELAY: Duration = Duration::from_secs(30);
        let fake = Arc::new(Fake::new(Capabilities {
            inspect_interval: PERIOD,
            ..Fake::caps()
        }));
        let (handle, _stop, _dir) = supervise(&fake).await;
        assign(&handle, 1, vec![app("web", 1, 1)], DriverSettings::Unset).await;
        until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;
        until_fake(&fake, "three inspections", |f| f.count("inspect") >= 3).await;
        *fake.throttled_inspection.lock().expect("script") = Some(DELAY);
        let throttled_at = fake.count("inspect") + 1;
        until_fake(&fake, "two more inspections", |f| {
            f.count("inspect") > throttled_at
        })
        .await;

        let times = fake.times("inspect");
        for (i, pair) in times[..throttled_at].windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= PERIOD && gap < PERIOD + Duration::from_millis(300),
                "inspection {i} after {gap:?}, not on the driver's period"
            );
        }
        let gap = times[throttled_at] - times[throttled_at - 1];
        assert!(
            gap >= DELAY && gap <= DELAY + DELAY / 2 + PERIOD,
            "the inspection after a throttled one came after {gap:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_that_restarts_instances_itself_is_reported_not_overruled() {
        let fake = Arc::new(Fake::new(Capabilities {
            runtime_restarts: true,
            ..Fake::caps()
        }));
        let (handle, _stop, _dir) = supervise(&fake).await;
        assign(&handle, 1, vec![app("web", 1, 1)], DriverSettings::Unset).await;
        let all = until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;
        let instance = all[0].instance_id.clone();

        // The runtime holds the crashed instance in its back-off ...
        fake.set_inspection(
            &instance,
            Inspection::Restarted {
                restarts: 1,
                running: false,
                health: None,
            },
        );
        let all = until_board(&handle.board, "the runtime's restart reported", |all| {
            all.iter()
                .any(|r| r.state() == pb::ReplicaState::Backoff && r.restarts == 1)
        })
        .await;
        assert!(
            all[0].message.contains("the runtime restarted it"),
            "{}",
            all[0].message
        );
        // ... and brings it back, twice more in quick succession.
        fake.set_inspection(
            &instance,
            Inspection::Restarted {
                restarts: 3,
                running: true,
                health: None,
            },
        );
        let all = until_board(&handle.board, "the replica running again", |all| {
            all.iter()
                .any(|r| r.state() == pb::ReplicaState::Running && r.restarts == 3)
        })
        .await;
        assert!(
            all[0].crash_looping,
            "three short runs in a row are a crash loop"
        );
        assert_eq!(all[0].instance_id, instance, "the same instance throughout");
        assert_eq!(
            (fake.count("start"), fake.count("stop")),
            (1, 0),
            "the supervisor restarted a replica its runtime restarts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_runtime_restarts_a_restarted_instance_is_the_supervisors_to_restart() {
        let fake = Arc::new(Fake::new(Fake::caps()));
        let (handle, _stop, _dir) = supervise(&fake).await;
        assign(&handle, 1, vec![app("web", 1, 1)], DriverSettings::Unset).await;
        let all = until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;
        fake.set_inspection(
            &all[0].instance_id,
            Inspection::Restarted {
                restarts: 1,
                running: false,
                health: None,
            },
        );
        until_fake(&fake, "a second start", |f| f.count("start") == 2).await;
    }

    #[tokio::test(start_paused = true)]
    async fn settings_reach_the_driver_before_its_assignment_and_other_drivers_settings_do_not() {
        let mut fake = Fake::new(Fake::caps());
        fake.kind = "docker";
        let fake = Arc::new(fake);
        let (handle, _stop, _dir) = supervise(&fake).await;
        let docker = DriverSettings::Docker(DockerSettings {
            network: Some("private".into()),
            bind_host: None,
        });
        assign(&handle, 1, vec![app("web", 1, 1)], docker.clone()).await;
        until_board(
            &handle.board,
            "the replica running",
            all_in(pb::ReplicaState::Running, 1),
        )
        .await;
        let (configured, started) = (fake.times("configure"), fake.times("start"));
        assert_eq!(
            *fake.configured.lock().expect("configured"),
            vec![docker.clone()]
        );
        assert!(
            configured[0] <= started[0],
            "started before the driver had its settings"
        );

        // The same settings again are not handed over again.
        assign(&handle, 2, vec![app("web", 2, 1)], docker).await;
        until_board(
            &handle.board,
            "two replicas running",
            all_in(pb::ReplicaState::Running, 2),
        )
        .await;
        assert_eq!(fake.count("configure"), 1);

        // Settings of another driver are refused without asking the driver,
        // and every replica says so; the replicas run on.
        let ec2 = DriverSettings::Ec2(Box::default());
        assign(&handle, 3, vec![app("web", 3, 1)], ec2).await;
        let all = until_board(&handle.board, "the refusal on every replica", |all| {
            all.len() == 3
                && all
                    .iter()
                    .all(|r| r.message.contains("settings are for the ec2 driver"))
        })
        .await;
        assert!(all.iter().all(|r| r.state() == pb::ReplicaState::Running));
        assert_eq!(fake.count("configure"), 1);

        // No settings: the driver goes back to its flags, and the refusal is gone.
        assign(&handle, 4, vec![app("web", 3, 1)], DriverSettings::Unset).await;
        until_board(&handle.board, "the refusal gone", |all| {
            all.iter().all(|r| !r.message.contains("settings"))
        })
        .await;
        assert_eq!(
            fake.configured.lock().expect("configured").last(),
            Some(&DriverSettings::Unset)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn settings_the_driver_refuses_are_reported_and_change_nothing_else() {
        let mut fake = Fake::new(Fake::caps());
        fake.kind = "docker";
        fake.refuse_settings = Some("Docker network private does not exist");
        let fake = Arc::new(fake);
        let (handle, _stop, _dir) = supervise(&fake).await;
        let docker = DriverSettings::Docker(DockerSettings {
            network: Some("private".into()),
            bind_host: None,
        });
        assign(&handle, 1, vec![app("web", 2, 1)], docker).await;
        let all = until_board(
            &handle.board,
            "the refusal on every running replica",
            |all| {
                all.len() == 2 && all.iter().all(|r| {
                    r.state() == pb::ReplicaState::Running
                        && r.message
                            == "provider settings not in use: Docker network private does not exist"
                })
            },
        )
        .await;
        assert_eq!(all.len(), 2);
        assert_eq!(fake.count("configure"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_agent_hands_the_persisted_settings_to_its_driver() {
        let mut fake = Fake::new(Fake::caps());
        fake.kind = "docker";
        let fake = Arc::new(fake);
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state");
        // As the daemon sent it, and the agent kept it.
        let raw = pb::Assignment {
            revision: 9,
            settings: Some(pb::ProviderSettings {
                driver: Some(pb::provider_settings::Driver::Docker(pb::DockerSettings {
                    network: "private".into(),
                    bind_host: String::new(),
                })),
            }),
            ..Default::default()
        };
        state.save_assignment(&raw).expect("save");
        Supervisor::restore(fake.clone(), "p".into(), state, SupervisorConfig::default())
            .await
            .expect("supervisor");
        assert_eq!(
            *fake.configured.lock().expect("configured"),
            vec![DriverSettings::Docker(DockerSettings {
                network: Some("private".into()),
                bind_host: None,
            })]
        );
    }

    #[test]
    fn arrival_orders_revisions_only_within_one_store_epoch() {
        let set = |store_id: &str, epoch: u64, revision: u64| DesiredSet {
            revision,
            store: StoreEpoch {
                store_id: store_id.into(),
                epoch,
            },
            ..Default::default()
        };
        let held = set("s1", 1, 9);
        assert_eq!(arrival(None, &set("s1", 1, 1)), Arrival::Next);
        assert_eq!(arrival(Some(&held), &set("s1", 1, 10)), Arrival::Next);
        assert_eq!(arrival(Some(&held), &set("s1", 1, 9)), Arrival::Next);
        assert_eq!(arrival(Some(&held), &set("s1", 1, 3)), Arrival::Stale);
        // A restored or reset store: another epoch, or another store, counts
        // revisions from its own history.
        assert_eq!(arrival(Some(&held), &set("s1", 2, 1)), Arrival::NewEpoch);
        assert_eq!(arrival(Some(&held), &set("s1", 0, 1)), Arrival::NewEpoch);
        assert_eq!(arrival(Some(&held), &set("s2", 1, 1)), Arrival::NewEpoch);
        // Kept from before store identities: unknown, and the first
        // assignment that names its store is taken.
        let unknown = set("", 0, 9);
        assert_eq!(arrival(Some(&unknown), &set("s1", 1, 1)), Arrival::NewEpoch);
        assert_eq!(arrival(Some(&unknown), &set("", 0, 3)), Arrival::Stale);
        assert_eq!(arrival(Some(&unknown), &set("", 0, 10)), Arrival::Next);
    }

    #[test]
    fn a_replica_on_another_workload_generation_is_replaced_newer_or_older() {
        let desired = [app("web", 2, 3)].into_iter().collect();
        let observed = [
            (key("web", 0), running(5, true)),
            (key("web", 1), running(3, true)),
        ]
        .into();
        assert_eq!(
            plan(&desired, &observed),
            Plan {
                replace: vec![key("web", 0)],
                ..Default::default()
            }
        );
    }

    /// Sends the supervisor an assignment of `apps` from `store`.
    async fn assign_from(
        handle: &SupervisorHandle,
        store: (&str, u64),
        revision: u64,
        apps: Vec<(String, DesiredApp)>,
    ) {
        let (store_id, epoch) = store;
        let set = DesiredSet {
            revision,
            store: StoreEpoch {
                store_id: store_id.into(),
                epoch,
            },
            apps: apps.into_iter().collect(),
            settings: DriverSettings::Unset,
        };
        let raw = pb::Assignment {
            revision,
            store_id: store_id.into(),
            epoch,
            ..Default::default()
        };
        handle.assign(set, raw).await;
    }

    /// `app/index → instance id` of the published statuses.
    fn instances(all: &[pb::ReplicaStatus]) -> BTreeMap<String, String> {
        all.iter()
            .map(|r| (format!("{}/{}", r.app, r.index), r.instance_id.clone()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_assignment_of_another_epoch_is_taken_whatever_its_revision_and_keeps_what_it_still_wants()
     {
        let fake = Arc::new(Fake::new(Fake::caps()));
        let (handle, _stop, dir) = supervise(&fake).await;
        let apps = vec![app("web", 2, 1), app("api", 1, 1)];
        assign_from(&handle, ("s1", 1), 9, apps).await;
        let before = instances(
            &until_board(
                &handle.board,
                "three replicas running",
                all_in(pb::ReplicaState::Running, 3),
            )
            .await,
        );

        // An older revision of the same epoch: ignored, whatever it says.
        assign_from(&handle, ("s1", 1), 3, vec![]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(instances(&handle.board.snapshot().0), before);
        assert_eq!(handle.board.snapshot().1, 9);
        assert_eq!(fake.count("stop"), 0);

        // The store restored from a backup: epoch 2 counts from revision 1.
        // Its assignment decides: api goes, web keeps its instances.
        assign_from(&handle, ("s1", 2), 1, vec![app("web", 2, 1)]).await;
        let after = until_board(&handle.board, "api removed", |all| {
            all.len() == 2 && all.iter().all(|r| r.app == "web")
        })
        .await;
        let kept: BTreeMap<String, String> = before
            .into_iter()
            .filter(|(k, _)| k.starts_with("web/"))
            .collect();
        assert_eq!(instances(&after), kept, "web was restarted");
        assert_eq!(handle.board.snapshot().1, 1);
        assert_eq!((fake.count("start"), fake.count("stop")), (3, 1));
        // The new identity is persisted with the assignment, and orders
        // what follows: an older revision of epoch 2 is ignored.
        let saved = StateDir::open(dir.path())
            .expect("state")
            .load_assignment("p")
            .expect("load")
            .expect("an assignment");
        assert_eq!(
            (saved.store_id.as_str(), saved.epoch, saved.revision),
            ("s1", 2, 1)
        );
        assign_from(&handle, ("s1", 2), 2, vec![app("web", 2, 1)]).await;
        assign_from(&handle, ("s1", 2), 1, vec![]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(instances(&handle.board.snapshot().0), kept);
        assert_eq!(handle.board.snapshot().1, 2);
    }

    /// An assignment of `apps` as the daemon sends it, for a state directory.
    fn wire_assignment(revision: u64, apps: &[(&str, u32, u64)]) -> pb::Assignment {
        pb::Assignment {
            provider: "p".into(),
            revision,
            store_id: "s1".into(),
            epoch: 1,
            apps: apps
                .iter()
                .map(|(name, replicas, wg)| pb::AppAssignment {
                    app: (*name).into(),
                    generation: *wg,
                    workload_generation: *wg,
                    replicas: *replicas,
                    workload: Some(pb::Workload {
                        command: "x".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn listed(instance: &str, replica: Option<(&str, u32, u64)>, adoptable: bool) -> Listed {
        Listed {
            handle: Handle {
                driver: "fake".into(),
                instance_id: instance.into(),
                address: None,
                ports: BTreeMap::new(),
                started_at_ms: instance.len() as i64,
                data: serde_json::Value::Null,
            },
            replica: replica.map(|(app, index, workload_generation)| ListedReplica {
                key: key(app, index),
                workload_generation,
            }),
            adoptable,
        }
    }

    /// A supervisor of `fake` restored from the state directory `dir`,
    /// running on its own task.
    async fn restore_from(
        fake: &Arc<Fake>,
        dir: &std::path::Path,
    ) -> (SupervisorHandle, tokio_util::sync::DropGuard) {
        let state = StateDir::open(dir).expect("state");
        let (sup, handle) =
            Supervisor::restore(fake.clone(), "p".into(), state, SupervisorConfig::default())
                .await
                .expect("supervisor");
        let stop = CancellationToken::new();
        tokio::spawn(sup.run(stop.clone(), false));
        (handle, stop.drop_guard())
    }

    #[tokio::test(start_paused = true)]
    async fn without_its_handles_a_restarted_agent_adopts_what_runs_and_stops_duplicates() {
        let fake = Fake::new(Fake::caps());
        *fake.listed.lock().expect("listed") = vec![
            // Two instances of web/0: the later one is kept.
            listed("a", Some(("web", 0, 1)), true),
            listed("bb", Some(("web", 0, 1)), true),
            listed("c", Some(("web", 1, 1)), true),
            // A replica the assignment no longer wants.
            listed("d", Some(("web", 5, 1)), true),
            // Found by its marks only (started just before the agent died):
            // a duplicate of web/1, and an instance of nothing known.
            listed("e", Some(("web", 1, 1)), false),
            listed("f", None, false),
        ];
        let fake = Arc::new(fake);
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state");
        state
            .save_assignment(&wire_assignment(4, &[("web", 2, 1)]))
            .expect("save");
        let (handle, _stop) = restore_from(&fake, dir.path()).await;
        let all = until_board(&handle.board, "web adopted, web/5 removed", |all| {
            all.len() == 2
        })
        .await;
        assert_eq!(
            instances(&all),
            [("web/0".into(), "bb".into()), ("web/1".into(), "c".into())].into()
        );
        until_fake(&fake, "four stops and two destroys", |f| {
            f.count("stop") == 4 && f.count("destroy") == 2
        })
        .await;
        let sorted = |v: &Mutex<Vec<String>>| {
            let mut v = v.lock().expect("list").clone();
            v.sort();
            v
        };
        assert_eq!(sorted(&fake.stopped), ["a", "d", "e", "f"]);
        // Duplicates share their replica's files: stopped, not destroyed.
        assert_eq!(sorted(&fake.destroyed), ["d", "f"]);
        assert_eq!(fake.count("start"), 0, "a replica was started again");
        // The handles are persisted again.
        let persisted = StateDir::open(dir.path())
            .expect("state")
            .load_replicas()
            .expect("replicas");
        let held: Vec<&str> = persisted
            .iter()
            .map(|p| p.handle.instance_id.as_str())
            .collect();
        assert_eq!(held, ["bb", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_damaged_assignment_keeps_every_replica_until_the_daemon_sends_one() {
        let fake = Arc::new(Fake::new(Fake::caps()));
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // An agent ran web×2, then its assignment file was emptied.
            let (handle, _stop) = restore_from(&fake, dir.path()).await;
            assign(&handle, 4, vec![app("web", 2, 1)], DriverSettings::Unset).await;
            until_board(
                &handle.board,
                "two replicas running",
                all_in(pb::ReplicaState::Running, 2),
            )
            .await;
        }
        std::fs::write(dir.path().join("assignment.pb"), b"").expect("empty it");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = fake.count("start");

        let (handle, _stop) = restore_from(&fake, dir.path()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (all, revision, _) = handle.board.snapshot();
        assert_eq!(revision, 0, "the hello asks for the assignment");
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|r| r.state() == pb::ReplicaState::Running));
        assert_eq!((fake.count("start"), fake.count("stop")), (started, 0));

        // The daemon's assignment decides, and brings the health check the
        // adopted replicas had none of.
        let (name, mut web) = app("web", 1, 1);
        web.health = Some(HealthSpec {
            probe: crate::health::Probe::Exec {
                command: vec!["true".into()],
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 1,
            success_threshold: 1,
        });
        assign(&handle, 4, vec![(name, web)], DriverSettings::Unset).await;
        until_board(
            &handle.board,
            "web/0 healthy, web/1 gone",
            all_in(pb::ReplicaState::Healthy, 1),
        )
        .await;
        assert_eq!((fake.count("start"), fake.count("stop")), (started, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn unreadable_handles_and_no_listing_do_not_start() {
        let mut fake = Fake::new(Fake::caps());
        fake.list_fails = true;
        let fake = Arc::new(fake);
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state");
        state
            .save_assignment(&wire_assignment(4, &[("web", 2, 1)]))
            .expect("save");
        std::fs::write(dir.path().join("replicas.json"), b"{\"v\":1,\"repl").expect("damage");
        let refused = Supervisor::restore(
            fake.clone(),
            "p".into(),
            state.clone(),
            SupervisorConfig::default(),
        )
        .await;
        assert!(refused.is_err(), "started without knowing what runs");
        assert_eq!(fake.count("start"), 0);
        // With its handles readable, a listing that fails only leaves strays.
        state.save_replicas(Vec::new()).expect("save");
        let (_, handle) =
            Supervisor::restore(fake.clone(), "p".into(), state, SupervisorConfig::default())
                .await
                .expect("supervisor");
        drop(handle);
    }

    /// Kills, when dropped, every process started by the process driver of
    /// `owner` (its state directory), children and all.
    struct KillOwned(String);

    impl Drop for KillOwned {
        fn drop(&mut self) {
            for pid in owned_processes(&self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Live processes whose environment marks them as started by the process
    /// driver of state directory `owner`.
    fn owned_processes(owner: &str) -> Vec<u32> {
        let needle = format!("SKYMIRROR_PROCESS_OWNER={owner}");
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let zombie =
                    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    });
                !zombie
                    && std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
            })
            .collect()
    }

    #[tokio::test]
    async fn real_replicas_are_adopted_again_without_their_handle_file() {
        use crate::driver::process::{ProcessDriver, ProcessDriverConfig};
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = std::path::absolute(dir.path())
            .expect("absolute")
            .to_string_lossy()
            .into_owned();
        let _cleanup = KillOwned(owner.clone());
        // As the daemon sends it: the agent keeps it, and restarts with it.
        let mut sleeper = wire_assignment(1, &[("sleeper", 2, 1)]);
        if let Some(w) = sleeper.apps[0].workload.as_mut() {
            w.command = "sleep".into();
            w.args = vec!["300".into()];
        }
        /// What happens to `replicas.json` before an agent starts.
        #[derive(Debug, Clone, Copy)]
        enum HandleFile {
            Kept,
            Deleted,
            Written(&'static [u8]),
        }
        let run = |file: HandleFile| {
            let dir = dir.path().to_path_buf();
            async move {
                let path = dir.join("replicas.json");
                match file {
                    HandleFile::Kept => {}
                    HandleFile::Deleted => std::fs::remove_file(&path).expect("delete"),
                    HandleFile::Written(bytes) => std::fs::write(&path, bytes).expect("damage"),
                }
                let driver = ProcessDriver::new(ProcessDriverConfig::new(&dir)).expect("driver");
                let state = StateDir::open(&dir).expect("state");
                let (sup, handle) = Supervisor::restore(
                    Arc::new(driver),
                    "p".into(),
                    state,
                    SupervisorConfig::default(),
                )
                .await
                .expect("supervisor");
                let stop = CancellationToken::new();
                let task = tokio::spawn(sup.run(stop.clone(), false));
                (handle, stop, task)
            }
        };
        let (handle, stop, task) = run(HandleFile::Kept).await;
        let set = DesiredSet::try_from(sleeper.clone()).expect("valid");
        handle.assign(set, sleeper).await;
        let first = instances(
            &until_board(
                &handle.board,
                "two replicas running",
                all_in(pb::ReplicaState::Running, 2),
            )
            .await,
        );
        stop.cancel();
        task.await.expect("supervisor");

        for damage in [
            HandleFile::Deleted,
            HandleFile::Written(b""),
            HandleFile::Written(b"{\"v\":1,\"replicas\":[{\"key\":"),
            HandleFile::Written(b"\x00\x01garbage"),
        ] {
            let (handle, stop, task) = run(damage).await;
            let all = until_board(
                &handle.board,
                "both replicas adopted",
                all_in(pb::ReplicaState::Running, 2),
            )
            .await;
            assert_eq!(
                instances(&all),
                first,
                "after {damage:?}: not the same processes"
            );
            let mut running = owned_processes(&owner);
            running.sort_unstable();
            let mut pids: Vec<u32> = first.values().map(|p| p.parse().expect("pid")).collect();
            pids.sort_unstable();
            assert_eq!(running, pids, "after {damage:?}: a duplicate runs");
            stop.cancel();
            task.await.expect("supervisor");
        }
    }
}
