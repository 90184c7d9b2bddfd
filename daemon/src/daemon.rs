//! The daemon's context ([`Daemon`]): the parts the control plane is made of,
//! each owning its own state, and the few effects they share (committing to
//! the store, recording events).
//!
//! The parts: the store; the [`AgentRegistry`] (sessions, liveness, reported
//! replicas, one lock); the event fan-out; the routing table's watch channel;
//! the schedule in force; the reconciler's wake-up and statistics; the open
//! requests for replica output; and the tasks the daemon spawned. The
//! behaviour lives beside the concern it belongs to: `apply.rs` (apply and
//! delete), `controls.rs` (operator controls), `reconciler.rs` (the pass's
//! effects and loop), `monitor.rs` (the liveness loop), `explain.rs`,
//! `reports.rs` (what agents say), `logs.rs` (replica output); the gRPC
//! services in `api/` only convert.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::DaemonError;
use crate::model::{DeclaredApp, DeclaredProvider, Event, NewEvent, RoutingTable, now_ms};
use crate::pass::{LeaseTiming, PassInput};
use crate::reconciler::Reconciler;
use crate::registry::{AgentRegistry, lock};
use crate::scheduler::{Context, Schedule};
use crate::store::{Batch, MemoryFront, SledStore, Start, Store, StoreError, StoreIdentity};

/// Settings of a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Directory of the sled store.
    pub data_dir: PathBuf,
    /// The shared secret an agent may present in its hello on a *plaintext*
    /// listener (loopback only); `None`: no agent is admitted that way. On a
    /// TLS listener only a client certificate admits an agent.
    pub hello_token: Option<String>,
    /// The daemon's TLS material and CA; `None`: it serves plaintext only,
    /// and issues no certificates.
    pub pki: Option<Arc<crate::security::Pki>>,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a provider is suspect.
    pub suspect_after: Duration,
    /// Silence after which a provider is down.
    pub down_after: Duration,
    /// Period of the resync pass that runs even when nothing woke the reconciler.
    pub resync_interval: Duration,
    /// Liveness timing (suspect, down, reconnect grace, flapping).
    pub liveness: crate::liveness::LivenessConfig,
    /// How often liveness is re-evaluated.
    pub liveness_tick: Duration,
    /// Lease an agent holds on its singleton replicas, renewed by every
    /// heartbeat acknowledgement.
    pub lease: Duration,
    /// Least extra wait after a lease has expired before a singleton starts
    /// elsewhere; a provider whose driver says its stops take longer gets
    /// that long instead.
    pub lease_margin: Duration,
    /// Timeout of the daemon's own probes of replicas of silent providers.
    pub probe_timeout: Duration,
    /// How the daemon starts on its store: resume it (refusing a damaged
    /// one) or reset it on purpose.
    pub start: Start,
    /// A backup to restore the store from before starting.
    pub restore: Option<PathBuf>,
}

impl DaemonConfig {
    /// Defaults for a data directory and the join token agents present in
    /// their hello, without TLS (a loopback daemon; see `pki`).
    pub fn new(data_dir: PathBuf, join_token: String) -> Self {
        DaemonConfig {
            data_dir,
            hello_token: Some(join_token),
            pki: None,
            heartbeat_interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(1000),
            down_after: Duration::from_secs(3),
            resync_interval: Duration::from_secs(5),
            liveness: crate::liveness::LivenessConfig::default(),
            liveness_tick: Duration::from_millis(100),
            lease: Duration::from_secs(2),
            lease_margin: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(300),
            start: Start::Resume,
            restore: None,
        }
    }
}

/// Events kept while the store cannot write, recorded once it can; older
/// ones are dropped (and counted) beyond this.
const PENDING_EVENTS: usize = 1000;

/// Events that could not be recorded while the store could not write.
#[derive(Debug, Default)]
struct PendingEvents {
    events: std::collections::VecDeque<NewEvent>,
    dropped: usize,
}

/// Events fanned out to followers of the log.
#[derive(Debug)]
pub struct EventFanout {
    /// New events; a lagging follower re-reads the store.
    tx: broadcast::Sender<Event>,
}

impl EventFanout {
    /// Followers subscribe before they read the log, so nothing is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn publish(&self, events: &[Event]) {
        for e in events {
            // No follower is not an error.
            let _ = self.tx.send(e.clone());
        }
    }
}

/// The daemon's context. See the module docs.
pub struct Daemon {
    /// Settings.
    pub(crate) config: DaemonConfig,
    /// Changes on every start: lets agents tell a restarted daemon.
    pub(crate) daemon_id: String,
    /// The store's identity, sent to agents with every assignment.
    pub(crate) identity: StoreIdentity,
    /// Wall-clock start, ms (display).
    pub(crate) started_at_ms: i64,
    /// Start on tokio's clock (reconnect grace, leases).
    pub(crate) started: Instant,
    /// Desired state, actual state and events.
    pub(crate) store: Arc<dyn Store>,
    /// Agents, liveness and reported replicas.
    pub(crate) registry: AgentRegistry,
    /// Events for followers.
    pub(crate) events: EventFanout,
    /// The front door's routing table; a new value whenever it changes.
    pub(crate) routes: watch::Sender<RoutingTable>,
    /// The schedule of the last pass: the decisions in force (`explain`).
    pub(crate) in_force: Mutex<Arc<Schedule>>,
    /// The reconcile loop's wake-up and what it remembers between passes.
    pub(crate) reconciler: Reconciler,
    /// Serializes apply, delete and controls so generations are assigned in order.
    pub(crate) writes: tokio::sync::Mutex<()>,
    /// Requests for replica output waiting for their agents' answers.
    pub(crate) log_requests: crate::logs::LogRequests,
    /// Every long-lived task the daemon spawned; joined on shutdown.
    pub(crate) tasks: TaskTracker,
    /// Whether the store can write; the health service follows it.
    pub(crate) writable: watch::Sender<bool>,
    /// Events kept while the store could not write.
    pending: Mutex<PendingEvents>,
    /// Credentials and bounds: the PKI, refusal counters, rates per source,
    /// token uses.
    pub(crate) security: crate::access::Security,
    /// Cancelled when the daemon stops; ends long-lived streams.
    pub(crate) shutdown: CancellationToken,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("daemon_id", &self.daemon_id)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Opens the store in `config.data_dir` as `config.start` and
    /// `config.restore` say (refusing a damaged one) and builds the context.
    pub fn open(config: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        let dir = config.data_dir.clone();
        if let Some(backup) = &config.restore {
            crate::store::backup::restore(&dir, backup)?;
        }
        let (sled, identity) = SledStore::open_checked(&dir, config.start)?;
        // The front reopens the store after a failed write, checked again.
        let opener: crate::store::Opener = Box::new(move || {
            let (reopened, _) = SledStore::open_checked(&dir, Start::Resume)?;
            Ok(Box::new(reopened) as Box<dyn Store>)
        });
        let front = MemoryFront::open_with(
            Some(Box::new(sled)),
            opener,
            SledStore::EVENT_RETENTION as usize,
        )?;
        Self::with_identity(Arc::new(front), identity, config)
    }

    /// Builds the context on an opened store, with a new identity (tests).
    pub fn new(store: Arc<dyn Store>, config: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        let identity = StoreIdentity {
            store_id: crate::random_id()?,
            epoch: 1,
        };
        Self::with_identity(store, identity, config)
    }

    /// Builds the context on an opened store of `identity`.
    pub fn with_identity(
        store: Arc<dyn Store>,
        identity: StoreIdentity,
        config: DaemonConfig,
    ) -> Result<Arc<Self>, DaemonError> {
        let registry = AgentRegistry::new(store.replicas()?);
        let (events, _) = broadcast::channel(1024);
        let security = crate::access::Security::new(config.pki.clone());
        Ok(Arc::new(Daemon {
            security,
            config,
            identity,
            writable: watch::channel(true).0,
            pending: Mutex::new(PendingEvents::default()),
            daemon_id: crate::random_id()?,
            started_at_ms: now_ms(),
            started: Instant::now(),
            store,
            registry,
            events: EventFanout { tx: events },
            routes: watch::channel(RoutingTable::default()).0,
            in_force: Mutex::new(Arc::new(Schedule::default())),
            reconciler: Reconciler::default(),
            writes: tokio::sync::Mutex::new(()),
            log_requests: crate::logs::LogRequests::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }))
    }

    /// Asks the reconciler for a pass soon.
    pub fn wake(&self) {
        self.reconciler.wake();
    }

    /// Commits a batch durably on a blocking thread (sled's flush waits for
    /// the disk), publishes its events and wakes the reconciler.
    pub(crate) async fn commit(&self, batch: Batch) -> Result<(), DaemonError> {
        let events = self.commit_quietly(batch).await?;
        self.events.publish(&events);
        self.wake();
        Ok(())
    }

    /// Commits a batch durably on a blocking thread and returns its events,
    /// unpublished: the reconciler's own commits must not wake it again.
    pub(crate) async fn commit_quietly(&self, batch: Batch) -> Result<Vec<Event>, DaemonError> {
        let store = self.store.clone();
        let events = tokio::task::spawn_blocking(move || store.commit(batch, true))
            .await
            .map_err(|e| DaemonError::Serve(format!("store commit task: {e}")))??;
        Ok(events)
    }

    /// Publishes stored events to followers.
    pub(crate) fn publish(&self, events: &[Event]) {
        self.events.publish(events);
    }

    /// Appends and publishes events. Events describe state rather than hold
    /// it, so a store that cannot write does not fail the caller: they are
    /// kept (up to a bound) and recorded once it can again.
    pub(crate) fn record(&self, events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        match self.store.append_events(events.clone()) {
            Ok(stored) => self.events.publish(&stored),
            Err(StoreError::Unwritable(_)) => {
                let mut pending = lock(&self.pending);
                pending.events.extend(events);
                while pending.events.len() > PENDING_EVENTS {
                    pending.events.pop_front();
                    pending.dropped += 1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot record events"),
        }
    }

    /// Follows whether the store can write: while it cannot, tries to make
    /// it writable again; once it can, records what happened meanwhile.
    pub(crate) fn watch_store(&self) {
        let writable = matches!(self.store.writable(), crate::store::Writable::Yes);
        if !writable && let Some((outage, error)) = self.store.recover() {
            let (mut events, dropped) = {
                let mut pending = lock(&self.pending);
                (
                    std::mem::take(&mut pending.events),
                    std::mem::take(&mut pending.dropped),
                )
            };
            events.push_front(NewEvent::daemon(
                crate::model::EventReason::StoreUnwritable,
                &self.daemon_id,
                format!("the store could not write: {error}; writes were refused, reads and routing went on from memory"),
            ));
            events.push_back(NewEvent::daemon(
                crate::model::EventReason::StoreWritable,
                &self.daemon_id,
                format!(
                    "the store can write again after {:.1}s{}",
                    outage.as_secs_f64(),
                    if dropped > 0 {
                        format!("; {dropped} events of the outage were dropped")
                    } else {
                        String::new()
                    }
                ),
            ));
            tracing::info!(outage = ?outage, "the store can write again");
            self.record(events.into());
            self.wake();
        }
        let now = matches!(self.store.writable(), crate::store::Writable::Yes);
        self.writable
            .send_if_modified(|w| std::mem::replace(w, now) != now);
    }

    /// The lease timing passes judge singletons by.
    pub(crate) fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            started: self.started,
            reconnect_grace: self.config.liveness.reconnect_grace,
            lease: self.config.lease,
            lease_margin: self.config.lease_margin,
        }
    }

    /// The placement context now, for planning an apply against.
    pub(crate) fn placement_context(
        &self,
        apps: &[DeclaredApp],
        providers: &[DeclaredProvider],
    ) -> Result<Context, DaemonError> {
        let assignments = self.store.assignments()?;
        let controls = self.store.controls()?;
        let snapshot = self.registry.snapshot();
        Ok(crate::pass::placement_context(&PassInput {
            apps,
            providers,
            assignments: &assignments,
            controls: &controls,
            snapshot: &snapshot,
            now: Instant::now(),
            timing: self.lease_timing(),
            reported_shortfalls: &Default::default(),
        }))
    }

    /// A consistent backup of the store (see `store::backup`), taken while
    /// no apply, delete or control can change desired state.
    pub async fn backup(&self) -> Result<Vec<u8>, DaemonError> {
        let _guard = self.writes.lock().await;
        let store = self.store.clone();
        let identity = self.identity.clone();
        let bytes =
            tokio::task::spawn_blocking(move || crate::store::backup::export(&*store, &identity))
                .await
                .map_err(|e| DaemonError::Serve(format!("backup task: {e}")))??;
        Ok(bytes)
    }

    /// The schedule in force: the last pass's decisions.
    pub(crate) fn schedule_in_force(&self) -> Arc<Schedule> {
        lock(&self.in_force).clone()
    }

    /// Ready and desired replicas over all apps.
    pub fn readiness(&self) -> Result<(u32, u32), DaemonError> {
        let assignments = self.store.assignments()?;
        let replicas = self.registry.snapshot().effective_replicas();
        let mut totals = (0, 0);
        for app in self.store.apps()? {
            let s = crate::summary::summarize(&app, &assignments, &replicas);
            totals.0 += s.ready_replicas;
            totals.1 += s.desired_replicas;
        }
        Ok(totals)
    }
}

/// Serves the daemon on `listener` until `shutdown` completes.
///
/// The caller owns the socket (tests bind `127.0.0.1:0`) and the shutdown signal.
pub async fn run(
    config: DaemonConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let daemon = Daemon::open(config)?;
    serve(daemon, listener, shutdown).await
}

pub use crate::api::serve;
