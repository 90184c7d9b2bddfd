//! The daemon's shared context ([`Daemon`]), the reconcile loop and [`run`].
//!
//! Data flow: `apply` stores specs (durably) and wakes the reconciler; a pass
//! re-schedules everything from scratch, stores every provider assignment that
//! changed under a new revision, and sends each connected agent the complete
//! assignment it has not seen yet. Agents report replica status back over the
//! same stream (see [`crate::agents`]); reports update actual state and events.
//!
//! Invariant: one reconcile pass runs at a time (a single task owns the loop),
//! and a pass is a pure function of the store plus the set of connected agents.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::DaemonError;
use crate::liveness::{self, Liveness, Observation, ProviderLiveness};
use crate::scheduler::{self, Condition, Context, Schedule};
use crate::spec::{self, Document, Kind};
use crate::store::{
    AssignedApp, Batch, NewEvent, Store, StoredApp, StoredAssignment, StoredEvent, StoredProvider,
    StoredReplica, now_ms,
};

/// Shortest time between two reconcile passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(50);

/// Settings of a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Directory of the sled store.
    pub data_dir: PathBuf,
    /// Secret agents present in their hello.
    pub join_token: String,
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
    /// Extra wait after a lease has expired before a singleton starts elsewhere.
    pub lease_margin: Duration,
    /// Timeout of the daemon's own probes of replicas of silent providers.
    pub probe_timeout: Duration,
}

impl DaemonConfig {
    /// Defaults for a data directory and join token.
    pub fn new(data_dir: PathBuf, join_token: String) -> Self {
        DaemonConfig {
            data_dir,
            join_token,
            heartbeat_interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(1000),
            down_after: Duration::from_secs(3),
            resync_interval: Duration::from_secs(5),
            liveness: crate::liveness::LivenessConfig::default(),
            liveness_tick: Duration::from_millis(100),
            lease: Duration::from_secs(2),
            lease_margin: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(300),
        }
    }
}

/// A live agent stream.
#[derive(Debug)]
pub(crate) struct AgentConn {
    /// Distinguishes this stream from a later one for the same provider.
    pub conn_id: u64,
    /// The agent's stable id.
    pub agent_id: String,
    /// Agent software version.
    pub version: String,
    /// Messages to the agent. Bounded; a full queue means the agent is slow, and
    /// the assignment is re-sent on a later pass rather than queued without bound.
    pub tx: mpsc::Sender<Result<pb::DaemonMessage, Status>>,
    /// Last heartbeat (or hello), on tokio's clock.
    pub last_seen: Instant,
    /// Last heartbeat, wall clock ms, for display.
    pub last_seen_ms: i64,
    /// Revision of the last assignment sent on this stream.
    pub sent_revision: u64,
    /// Revision the agent says it applied.
    pub applied_revision: u64,
}

/// Reported replicas: provider → (app, index) → replica.
pub(crate) type ReportedReplicas = BTreeMap<String, BTreeMap<(String, u32), StoredReplica>>;

/// What the daemon remembers of a provider's agent after it disconnects.
#[derive(Debug, Clone, Default)]
pub(crate) struct AgentSeen {
    pub agent_id: String,
    pub version: String,
    pub last_seen_ms: i64,
    pub applied_revision: u64,
    /// Last heartbeat on tokio's clock (for liveness and leases).
    pub last_seen: Option<Instant>,
}

/// Reconcile timings.
#[derive(Debug, Clone, Default)]
pub struct ReconcileStats {
    /// Passes run.
    pub passes: u64,
    /// Last pass.
    pub last: Duration,
    /// Sum of all passes.
    pub total: Duration,
    /// Longest pass.
    pub max: Duration,
}

/// The daemon's context: store, agent registry, event fan-out, reconciler wake-up.
pub struct Daemon {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: DaemonConfig,
    /// Changes on every start: lets agents tell a restarted daemon.
    pub(crate) daemon_id: String,
    pub(crate) started_at_ms: i64,
    pub(crate) agents: Mutex<BTreeMap<String, AgentConn>>,
    pub(crate) seen: Mutex<BTreeMap<String, AgentSeen>>,
    /// Reported replicas per provider, mirrored from the store to diff reports
    /// against without reading the store on every report.
    pub(crate) replicas: Mutex<ReportedReplicas>,
    /// New events for followers; lagging followers re-read the store.
    pub(crate) events: broadcast::Sender<StoredEvent>,
    wake: Notify,
    /// Serializes apply and delete so generations are assigned in order.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    stats: Mutex<ReconcileStats>,
    /// Cancelled when the daemon stops; ends long-lived streams (agents, watches).
    pub(crate) shutdown: CancellationToken,
    /// Liveness per provider.
    pub(crate) liveness: Mutex<BTreeMap<String, crate::liveness::ProviderLiveness>>,
    /// Wall-clock times of the last liveness transition and of the end of a
    /// hold-out, per provider, recorded when they happen so reads are stable.
    pub(crate) liveness_wall: Mutex<BTreeMap<String, (i64, i64)>>,
    /// Whether some replica of a silent provider answered the daemon's last
    /// probe from outside (`None`: nothing to probe).
    pub(crate) probes: Mutex<BTreeMap<String, Option<bool>>>,
    /// The front door's routing table; a new value whenever it changes.
    pub(crate) routes: tokio::sync::watch::Sender<pb::RoutingTable>,
    /// The last schedule, for `explain`.
    pub(crate) last_schedule: Mutex<Schedule>,
    /// When the daemon started, on tokio's clock (reconnect grace).
    pub(crate) started: Instant,
    /// Shortfalls already reported, so a pass does not repeat the same event.
    shortfalls: Mutex<BTreeMap<String, (u32, u32)>>,
    next_conn_id: std::sync::atomic::AtomicU64,
    /// Requests for replica output waiting for their agents' answers.
    pub(crate) log_requests: crate::logs::LogRequests,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("daemon_id", &self.daemon_id)
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex, recovering the data if a panicking thread poisoned it:
/// the maps it guards are rebuilt from the store and agents on every pass.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Result of an apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    /// One result per document.
    pub results: Vec<pb::ObjectResult>,
    /// Placement changes.
    pub plan: Vec<pb::PlacementChange>,
}

fn random_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{:x}", now_ms()))
}

impl Daemon {
    /// Builds the context on an opened store.
    pub fn new(store: Arc<dyn Store>, config: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        let mut replicas: BTreeMap<String, BTreeMap<(String, u32), StoredReplica>> =
            BTreeMap::new();
        for r in store.replicas()? {
            replicas
                .entry(r.provider.clone())
                .or_default()
                .insert((r.app.clone(), r.index), r);
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Daemon {
            store,
            config,
            daemon_id: random_id(),
            started_at_ms: now_ms(),
            agents: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            replicas: Mutex::new(replicas),
            events,
            wake: Notify::new(),
            apply_lock: tokio::sync::Mutex::new(()),
            stats: Mutex::new(ReconcileStats::default()),
            shutdown: CancellationToken::new(),
            liveness: Mutex::new(BTreeMap::new()),
            liveness_wall: Mutex::new(BTreeMap::new()),
            probes: Mutex::new(BTreeMap::new()),
            routes: tokio::sync::watch::channel(pb::RoutingTable::default()).0,
            last_schedule: Mutex::new(Schedule::default()),
            started: Instant::now(),
            shortfalls: Mutex::new(BTreeMap::new()),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
            log_requests: crate::logs::LogRequests::default(),
        }))
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Asks the reconciler for a pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Reported replicas as the API shows them: a replica of a provider that
    /// is down is not ready, whatever it last reported, since nobody can tell.
    pub(crate) fn effective_replicas(&self) -> Vec<StoredReplica> {
        let down: BTreeSet<String> = lock(&self.liveness)
            .iter()
            .filter(|(_, l)| l.state == Liveness::Down)
            .map(|(n, _)| n.clone())
            .collect();
        lock(&self.replicas)
            .values()
            .flat_map(|m| m.values().cloned())
            .map(|mut r| {
                if down.contains(&r.provider) {
                    r.message = format!(
                        "provider {} is down; last reported {}",
                        r.provider,
                        r.state.as_str()
                    );
                    r.ready = false;
                }
                r
            })
            .collect()
    }

    /// Ready and desired replicas over all apps.
    pub fn readiness(&self) -> Result<(u32, u32), DaemonError> {
        let assignments: BTreeMap<String, StoredAssignment> = self
            .store
            .assignments()?
            .into_iter()
            .map(|a| (a.provider.clone(), a))
            .collect();
        let replicas = self.effective_replicas();
        let mut totals = (0, 0);
        for app in self.store.apps()? {
            let s = summarize(&app, &assignments, &replicas);
            totals.0 += s.ready_replicas;
            totals.1 += s.desired_replicas;
        }
        Ok(totals)
    }

    /// Reconcile timings so far.
    pub fn stats(&self) -> ReconcileStats {
        lock(&self.stats).clone()
    }

    /// Publishes stored events to followers.
    pub(crate) fn publish(&self, events: &[StoredEvent]) {
        for e in events {
            // No follower is not an error.
            let _ = self.events.send(e.clone());
        }
    }

    /// Appends and publishes events; a store failure is logged, not fatal,
    /// because events describe state rather than hold it.
    pub(crate) fn record(&self, events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        match self.store.append_events(events) {
            Ok(stored) => self.publish(&stored),
            Err(e) => tracing::warn!(error = %e, "cannot record events"),
        }
    }

    /// Validates and stores documents; see `ControlService.Apply`.
    pub async fn apply(
        &self,
        source: &str,
        content: &str,
        dry_run: bool,
    ) -> Result<ApplyOutcome, DaemonError> {
        let _guard = self.apply_lock.lock().await;
        let docs = spec::parse_documents(source, content)?;
        let providers = self.store.providers()?;
        let apps = self.store.apps()?;
        let known: BTreeSet<String> = providers
            .iter()
            .map(|p| p.provider.metadata.name.clone())
            .collect();
        spec::validate_references(source, content, &docs, &known)?;

        let now = now_ms();
        let mut batch = Batch::default();
        let mut results = Vec::new();
        let mut new_providers: BTreeMap<String, StoredProvider> = providers
            .iter()
            .map(|p| (p.provider.metadata.name.clone(), p.clone()))
            .collect();
        let mut new_apps: BTreeMap<String, StoredApp> = apps
            .iter()
            .map(|a| (a.app.metadata.name.clone(), a.clone()))
            .collect();

        for parsed in docs {
            match parsed.document {
                Document::Provider(p) => {
                    let name = p.metadata.name.clone();
                    let (action, stored) = match new_providers.get(&name) {
                        Some(old) if old.provider == p => (pb::ApplyAction::Unchanged, old.clone()),
                        Some(old) => (
                            pb::ApplyAction::Configured,
                            StoredProvider {
                                provider: p,
                                generation: old.generation + 1,
                                created_at_ms: old.created_at_ms,
                                updated_at_ms: now,
                            },
                        ),
                        None => (
                            pb::ApplyAction::Created,
                            StoredProvider {
                                provider: p,
                                generation: 1,
                                created_at_ms: now,
                                updated_at_ms: now,
                            },
                        ),
                    };
                    if action != pb::ApplyAction::Unchanged {
                        batch.events.push(NewEvent {
                            reason: if action == pb::ApplyAction::Created {
                                "ProviderCreated"
                            } else {
                                "ProviderConfigured"
                            }
                            .into(),
                            kind: "Provider".into(),
                            object: name.clone(),
                            message: format!(
                                "provider {name} {} (generation {})",
                                action_word(action),
                                stored.generation
                            ),
                            provider: name.clone(),
                            ..NewEvent::default()
                        });
                        batch.put_providers.push(stored.clone());
                    }
                    results.push(result("Provider", &name, action, stored.generation));
                    new_providers.insert(name, stored);
                }
                Document::App(a) => {
                    let name = a.metadata.name.clone();
                    let (action, stored) = match new_apps.get(&name) {
                        Some(old) if old.app == a => (pb::ApplyAction::Unchanged, old.clone()),
                        Some(old) => {
                            let generation = old.generation + 1;
                            let workload_generation = if old.app.spec.workload == a.spec.workload {
                                old.workload_generation
                            } else {
                                generation
                            };
                            (
                                pb::ApplyAction::Configured,
                                StoredApp {
                                    app: a,
                                    generation,
                                    workload_generation,
                                    created_at_ms: old.created_at_ms,
                                    updated_at_ms: now,
                                },
                            )
                        }
                        None => (
                            pb::ApplyAction::Created,
                            StoredApp {
                                app: a,
                                generation: 1,
                                workload_generation: 1,
                                created_at_ms: now,
                                updated_at_ms: now,
                            },
                        ),
                    };
                    if action != pb::ApplyAction::Unchanged {
                        let detail = match new_apps.get(&name) {
                            Some(old) => describe_change(old, &stored),
                            None => format!(
                                "{} replicas, {} placement",
                                stored.app.spec.replicas,
                                stored.app.spec.placement.mode.as_str()
                            ),
                        };
                        batch.events.push(NewEvent {
                            reason: if action == pb::ApplyAction::Created {
                                "AppCreated"
                            } else {
                                "AppConfigured"
                            }
                            .into(),
                            kind: "App".into(),
                            object: name.clone(),
                            message: format!(
                                "app {name} {} (generation {}): {detail}",
                                action_word(action),
                                stored.generation
                            ),
                            app: name.clone(),
                            ..NewEvent::default()
                        });
                        batch.put_apps.push(stored.clone());
                    }
                    results.push(result("App", &name, action, stored.generation));
                    new_apps.insert(name, stored);
                }
            }
        }

        let ctx = self.context(&apps, &self.store.assignments()?)?;
        let before = scheduler::schedule(&apps, &providers, &ctx);
        let after_apps: Vec<StoredApp> = new_apps.into_values().collect();
        let after_providers: Vec<StoredProvider> = new_providers.into_values().collect();
        let after = scheduler::schedule(&after_apps, &after_providers, &ctx);
        let plan = plan_changes(&before, &after, &apps, &after_apps);

        if !dry_run && !batch.is_empty() {
            let events = self.store.commit(batch, true)?;
            self.publish(&events);
            self.wake();
        }
        Ok(ApplyOutcome { results, plan })
    }

    /// Deletes objects named by documents, or one object by kind and name.
    pub async fn delete(
        &self,
        targets: Vec<(Kind, String)>,
    ) -> Result<Vec<pb::ObjectResult>, DaemonError> {
        let _guard = self.apply_lock.lock().await;
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let deleted: BTreeSet<(Kind, String)> = targets.iter().cloned().collect();
        let mut batch = Batch::default();
        let mut results = Vec::new();
        for (kind, name) in targets {
            let (exists, generation) = match kind {
                Kind::App => apps
                    .iter()
                    .find(|a| a.app.metadata.name == name)
                    .map_or((false, 0), |a| (true, a.generation)),
                Kind::Provider => providers
                    .iter()
                    .find(|p| p.provider.metadata.name == name)
                    .map_or((false, 0), |p| (true, p.generation)),
            };
            if !exists {
                results.push(result(
                    &kind.to_string(),
                    &name,
                    pb::ApplyAction::NotFound,
                    0,
                ));
                continue;
            }
            if kind == Kind::Provider {
                let users: Vec<&str> = apps
                    .iter()
                    .filter(|a| !deleted.contains(&(Kind::App, a.app.metadata.name.clone())))
                    .filter(|a| {
                        a.app
                            .spec
                            .placement
                            .providers
                            .iter()
                            .any(|t| t.name.as_deref() == Some(&name))
                    })
                    .map(|a| a.app.metadata.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(DaemonError::FailedPrecondition(format!(
                        "provider {name} is named in the placement of app(s) {}; change or delete them first",
                        users.join(", ")
                    )));
                }
                batch.delete_providers.push(name.clone());
            } else {
                batch.delete_apps.push(name.clone());
            }
            batch.events.push(NewEvent {
                reason: format!("{kind}Deleted"),
                kind: kind.to_string(),
                object: name.clone(),
                message: format!("{} {name} deleted", kind.to_string().to_lowercase()),
                app: if kind == Kind::App {
                    name.clone()
                } else {
                    String::new()
                },
                provider: if kind == Kind::Provider {
                    name.clone()
                } else {
                    String::new()
                },
                ..NewEvent::default()
            });
            results.push(result(
                &kind.to_string(),
                &name,
                pb::ApplyAction::Deleted,
                generation,
            ));
        }
        if !batch.is_empty() {
            let events = self.store.commit(batch, true)?;
            self.publish(&events);
            self.wake();
        }
        Ok(results)
    }

    /// One reconcile pass: schedule, store changed assignments, send them.
    pub fn reconcile(&self) -> Result<(), DaemonError> {
        let started = std::time::Instant::now();
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let stored_assignments = self.store.assignments()?;
        let ctx = self.context(&apps, &stored_assignments)?;
        let schedule = scheduler::schedule(&apps, &providers, &ctx);
        let apps_by_name: BTreeMap<&str, &StoredApp> = apps
            .iter()
            .map(|a| (a.app.metadata.name.as_str(), a))
            .collect();
        let mut assignments: BTreeMap<String, StoredAssignment> = stored_assignments
            .into_iter()
            .map(|a| (a.provider.clone(), a))
            .collect();

        // Every declared provider, plus connected agents of deleted providers
        // (they get an empty assignment, so they stop what they run).
        let mut names: BTreeSet<String> = providers
            .iter()
            .map(|p| p.provider.metadata.name.clone())
            .collect();
        names.extend(lock(&self.agents).keys().cloned());

        let mut batch = Batch::default();
        for provider in &names {
            let wanted: Vec<AssignedApp> = schedule
                .placements
                .get(provider)
                .into_iter()
                .flatten()
                .filter_map(|(app, replicas)| {
                    apps_by_name.get(app.as_str()).map(|a| AssignedApp {
                        app: app.clone(),
                        generation: a.generation,
                        workload_generation: a.workload_generation,
                        replicas: *replicas,
                        extra: schedule
                            .decisions
                            .get(app)
                            .and_then(|d| d.iter().find(|d| &d.provider == provider))
                            .map_or(0, |d| d.extra),
                    })
                })
                .collect();
            let old = assignments.get(provider);
            if old.is_some_and(|o| o.apps == wanted) {
                continue;
            }
            let empty = Vec::new();
            let old_apps = old.map_or(&empty, |o| &o.apps);
            for change in diff_assignment(old_apps, &wanted) {
                let why = schedule
                    .decisions
                    .get(&change.0)
                    .and_then(|d| d.iter().find(|d| &d.provider == provider))
                    .map(|d| format!(" ({})", d.reason))
                    .unwrap_or_default();
                batch.events.push(NewEvent {
                    reason: "Scheduled".into(),
                    kind: "App".into(),
                    object: change.0.clone(),
                    message: format!("{} on {provider}: {}{why}", change.0, change.1),
                    app: change.0,
                    provider: provider.clone(),
                    ..NewEvent::default()
                });
            }
            let next = StoredAssignment {
                provider: provider.clone(),
                revision: old.map_or(1, |o| o.revision + 1),
                apps: wanted,
            };
            batch.put_assignments.push(next.clone());
            assignments.insert(provider.clone(), next);
        }
        batch.events.extend(self.shortfall_events(&schedule));
        if !batch.is_empty() {
            let events = self.store.commit(batch, true)?;
            self.publish(&events);
        }

        let mut agents = lock(&self.agents);
        for (provider, conn) in agents.iter_mut() {
            let Some(assignment) = assignments.get(provider) else {
                continue;
            };
            if conn.sent_revision == assignment.revision {
                continue;
            }
            let msg = assignment_to_pb(assignment, &apps_by_name);
            match conn.tx.try_send(Ok(pb::DaemonMessage {
                message: Some(pb::daemon_message::Message::Assignment(msg)),
            })) {
                Ok(()) => {
                    conn.sent_revision = assignment.revision;
                    tracing::debug!(provider, revision = assignment.revision, "assignment sent");
                }
                Err(e) => {
                    tracing::warn!(provider, error = %e, "assignment not sent; retrying on the next pass")
                }
            }
        }
        drop(agents);

        self.publish_routes(&apps, &schedule);
        *lock(&self.last_schedule) = schedule;

        let took = started.elapsed();
        let mut stats = lock(&self.stats);
        stats.passes += 1;
        stats.last = took;
        stats.total += took;
        stats.max = stats.max.max(took);
        Ok(())
    }

    fn shortfall_events(&self, schedule: &Schedule) -> Vec<NewEvent> {
        let mut seen = lock(&self.shortfalls);
        let mut now: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        let mut events = Vec::new();
        for s in &schedule.shortfalls {
            now.insert(s.app.clone(), (s.wanted, s.placed));
            if seen.get(&s.app) != Some(&(s.wanted, s.placed)) {
                events.push(NewEvent {
                    reason: "InsufficientCapacity".into(),
                    kind: "App".into(),
                    object: s.app.clone(),
                    message: format!(
                        "{}: placed {} of {} replicas: {}",
                        s.app, s.placed, s.wanted, s.reason
                    ),
                    app: s.app.clone(),
                    warning: true,
                    ..NewEvent::default()
                });
            }
        }
        *seen = now;
        events
    }

    /// Starts (`Some`) or ends (`None`) a manual failover of an app.
    pub async fn set_pin(&self, app: &str, provider: Option<&str>) -> Result<String, DaemonError> {
        let _guard = self.apply_lock.lock().await;
        let Some(stored) = self.store.app(app)? else {
            return Err(DaemonError::NotFound(format!("app {app:?} not found")));
        };
        let mut controls = self.store.controls()?;
        let (reason, message) = match provider {
            Some(p) => {
                let providers = self.store.providers()?;
                let Some(target) = providers.iter().find(|x| x.provider.metadata.name == p) else {
                    return Err(DaemonError::NotFound(format!("provider {p:?} not found")));
                };
                let ctx = Context::default();
                let s = scheduler::schedule(
                    std::slice::from_ref(&stored),
                    std::slice::from_ref(target),
                    &ctx,
                );
                if s.decisions.get(app).is_none_or(|d| d.is_empty()) {
                    return Err(DaemonError::FailedPrecondition(format!(
                        "provider {p} is not in the placement of app {app}; failover targets must be providers the app may run on"
                    )));
                }
                controls.pins.insert(app.to_string(), p.to_string());
                (
                    "ManualFailover",
                    format!(
                        "manual failover: {app} is served by {p} only until `skymirror failback {app}`"
                    ),
                )
            }
            None => {
                if controls.pins.remove(app).is_none() {
                    return Ok(format!("{app} has no manual failover in force"));
                }
                (
                    "ManualFailback",
                    format!("manual failover of {app} ended: normal placement and routing resume"),
                )
            }
        };
        self.commit_controls(
            controls,
            NewEvent {
                reason: reason.into(),
                kind: "App".into(),
                object: app.to_string(),
                message: message.clone(),
                app: app.to_string(),
                provider: provider.unwrap_or_default().to_string(),
                ..NewEvent::default()
            },
        )?;
        Ok(message)
    }

    /// Stores new operator controls with the event that explains them, and
    /// re-plans.
    fn commit_controls(
        &self,
        controls: crate::store::StoredControls,
        event: NewEvent,
    ) -> Result<(), DaemonError> {
        let events = self.store.commit(
            Batch {
                controls: Some(controls),
                events: vec![event],
                ..Batch::default()
            },
            true,
        )?;
        self.publish(&events);
        self.wake();
        Ok(())
    }

    /// Cordons, uncordons or drains a provider.
    pub async fn control_provider(
        &self,
        provider: &str,
        control: pb::ProviderControl,
    ) -> Result<String, DaemonError> {
        let _guard = self.apply_lock.lock().await;
        if !self
            .store
            .providers()?
            .iter()
            .any(|p| p.provider.metadata.name == provider)
        {
            return Err(DaemonError::NotFound(format!(
                "provider {provider:?} not found"
            )));
        }
        let mut controls = self.store.controls()?;
        let (reason, message) = match control {
            pb::ProviderControl::Cordon => {
                controls.cordoned.insert(provider.to_string());
                (
                    "ProviderCordoned",
                    format!("provider {provider} cordoned: no new replicas are placed there"),
                )
            }
            pb::ProviderControl::Uncordon => {
                controls.cordoned.remove(provider);
                controls.draining.remove(provider);
                (
                    "ProviderUncordoned",
                    format!("provider {provider} uncordoned: it takes its share again"),
                )
            }
            pb::ProviderControl::Drain => {
                controls.draining.insert(provider.to_string());
                (
                    "ProviderDraining",
                    format!(
                        "provider {provider} draining: its replicas move to the other providers"
                    ),
                )
            }
            pb::ProviderControl::Unspecified => {
                return Err(DaemonError::BadRequest(
                    "control must be cordon, uncordon or drain".into(),
                ));
            }
        };
        self.commit_controls(
            controls,
            NewEvent {
                reason: reason.into(),
                kind: "Provider".into(),
                object: provider.to_string(),
                message: message.clone(),
                provider: provider.to_string(),
                ..NewEvent::default()
            },
        )?;
        Ok(message)
    }

    /// A provider's liveness as the API shows it: state, reason, since (ms), held out until (ms).
    pub(crate) fn provider_liveness(
        &self,
        provider: &str,
    ) -> (pb::ProviderState, String, i64, i64) {
        let now = Instant::now();
        let (since, held) = lock(&self.liveness_wall)
            .get(provider)
            .copied()
            .unwrap_or((self.started_at_ms, 0));
        match lock(&self.liveness).get(provider) {
            Some(l) => (
                liveness_to_pb(l.state),
                l.reason.clone(),
                since,
                if l.held_out(now) { held } else { 0 },
            ),
            None => (
                pb::ProviderState::Unknown,
                "not evaluated yet".into(),
                since,
                0,
            ),
        }
    }

    /// Why an app runs where it does; see `ControlService.Explain`.
    pub fn explain(&self, app: &str) -> Result<pb::ExplainResponse, DaemonError> {
        let Some(stored) = self.store.app(app)? else {
            return Err(DaemonError::NotFound(format!("app {app:?} not found")));
        };
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let ctx = self.context(&apps, &self.store.assignments()?)?;
        let schedule = scheduler::schedule(&apps, &providers, &ctx);
        let mut out = pb::ExplainResponse {
            app: app.to_string(),
            mode: match stored.app.spec.placement.mode {
                spec::PlacementMode::Mirror => pb::PlacementMode::Mirror,
                spec::PlacementMode::ActivePassive => pb::PlacementMode::ActivePassive,
                spec::PlacementMode::Spread => pb::PlacementMode::Spread,
            } as i32,
            pinned_provider: ctx.pins.get(app).cloned().unwrap_or_default(),
            ..Default::default()
        };
        let decisions = schedule.decisions.get(app).cloned().unwrap_or_default();
        let selected: BTreeSet<String> = decisions.iter().map(|d| d.provider.clone()).collect();
        for d in &decisions {
            let state = self.provider_liveness(&d.provider).0 as i32;
            if d.replicas > 0 {
                out.placements.push(pb::PlacementReason {
                    provider: d.provider.clone(),
                    provider_state: state,
                    replicas: d.replicas,
                    extra_replicas: d.extra,
                    tier: d.tier,
                    reason: d.reason.clone(),
                });
            } else {
                out.excluded.push(pb::ExcludedProvider {
                    provider: d.provider.clone(),
                    provider_state: state,
                    reason: d.reason.clone(),
                });
            }
        }
        for p in &providers {
            let name = &p.provider.metadata.name;
            if !selected.contains(name) {
                out.excluded.push(pb::ExcludedProvider {
                    provider: name.clone(),
                    provider_state: self.provider_liveness(name).0 as i32,
                    reason: "not selected by the app's placement".into(),
                });
            }
        }
        const DECISIONS: &[&str] = &[
            "Scheduled",
            "ProviderDown",
            "ProviderUp",
            "ProviderRecovering",
            "ProviderPartitioned",
            "ProviderFlapping",
            "ManualFailover",
            "ManualFailback",
            "ProviderCordoned",
            "ProviderUncordoned",
            "ProviderDraining",
            "InsufficientCapacity",
        ];
        let recent: Vec<pb::Event> = self
            .store
            .last_events(crate::store::SledStore::EVENT_RETENTION as usize)?
            .iter()
            .filter(|e| DECISIONS.contains(&e.event.reason.as_str()))
            .filter(|e| {
                e.event.app == app
                    || (e.event.app.is_empty() && selected.contains(&e.event.provider))
            })
            .map(crate::convert::event_to_pb)
            .collect();
        out.decisions = recent[recent.len().saturating_sub(20)..].to_vec();
        Ok(out)
    }

    /// Last heartbeat of a provider's agent (connected or not), on tokio's clock.
    fn last_heartbeat(&self, provider: &str) -> (Option<Instant>, bool) {
        if let Some(c) = lock(&self.agents).get(provider) {
            return (Some(c.last_seen), true);
        }
        (
            lock(&self.seen).get(provider).and_then(|s| s.last_seen),
            false,
        )
    }

    /// Whether a provider's lease on singletons has certainly expired: the
    /// agent stops them when its own (earlier-ending) view of the lease runs
    /// out, so after `lease + margin` of silence the old copy is gone.
    fn lease_expired(&self, provider: &str, now: Instant) -> bool {
        let cfg = &self.config;
        let base = match self.last_heartbeat(provider).0 {
            Some(t) => t,
            // Not heard from since this daemon started: the agent may have
            // renewed with the previous daemon up to the moment it stopped.
            None => self.started + cfg.liveness.reconnect_grace,
        };
        now >= base + cfg.lease + cfg.lease_margin
    }

    /// Everything besides specs that placement depends on, as of now.
    pub(crate) fn context(
        &self,
        apps: &[StoredApp],
        assignments: &[StoredAssignment],
    ) -> Result<Context, DaemonError> {
        let now = Instant::now();
        let controls = self.store.controls()?;
        let mut ctx = Context {
            pins: controls.pins.clone(),
            ..Context::default()
        };
        let live = lock(&self.liveness).clone();
        let mut names: BTreeSet<&String> = live.keys().collect();
        names.extend(controls.cordoned.iter());
        names.extend(controls.draining.iter());
        for name in names {
            let l = live.get(name);
            ctx.conditions.insert(
                name.clone(),
                Condition {
                    liveness: l.map_or(Liveness::Up, |l| l.state),
                    recovering_for: l.and_then(|l| l.recovering_for(now)),
                    held_out: l.is_some_and(|l| l.held_out(now)),
                    cordoned: controls.cordoned.contains(name) || controls.draining.contains(name),
                    draining: controls.draining.contains(name),
                    lease_expired: self.lease_expired(name, now),
                },
            );
        }
        let generations: BTreeMap<&str, u64> = apps
            .iter()
            .map(|a| (a.app.metadata.name.as_str(), a.workload_generation))
            .collect();
        // Readiness counts toward fail-back only once the agent has acknowledged
        // the provider's current assignment: before that, its reports may show
        // replicas that the assignment is about to stop.
        let acknowledged: BTreeSet<String> = {
            let agents = lock(&self.agents);
            assignments
                .iter()
                .filter(|a| {
                    agents
                        .get(&a.provider)
                        .is_some_and(|c| c.applied_revision >= a.revision)
                })
                .map(|a| a.provider.clone())
                .collect()
        };
        for (provider, replicas) in lock(&self.replicas)
            .iter()
            .filter(|(p, _)| acknowledged.contains(*p))
        {
            for r in replicas.values() {
                if r.ready && generations.get(r.app.as_str()) == Some(&r.workload_generation) {
                    *ctx.ready
                        .entry((r.app.clone(), provider.clone()))
                        .or_default() += 1;
                }
            }
        }
        for a in assignments {
            for x in &a.apps {
                ctx.current
                    .entry(a.provider.clone())
                    .or_default()
                    .insert(x.app.clone(), x.replicas);
                if x.extra > 0 {
                    ctx.current_extra
                        .entry(a.provider.clone())
                        .or_default()
                        .insert(x.app.clone(), x.extra);
                }
            }
        }
        Ok(ctx)
    }

    /// Recomputes the front door's routing table and publishes it if it changed.
    fn publish_routes(&self, apps: &[StoredApp], schedule: &Schedule) {
        let live = lock(&self.liveness).clone();
        let replicas = lock(&self.replicas).clone();
        let mut routes = Vec::new();
        for app in apps {
            let Some(routing) = &app.app.spec.routing else {
                continue;
            };
            let name = &app.app.metadata.name;
            let decisions = schedule.decisions.get(name);
            let mut upstreams = Vec::new();
            for (provider, rs) in &replicas {
                if live
                    .get(provider)
                    .is_some_and(|l| l.state == Liveness::Down)
                {
                    continue;
                }
                let Some(d) = decisions.and_then(|d| d.iter().find(|d| &d.provider == provider))
                else {
                    continue;
                };
                for r in rs
                    .values()
                    .filter(|r| &r.app == name && r.ready && r.index < d.replicas)
                {
                    let Some(port) = r.ports.get(&routing.port) else {
                        continue;
                    };
                    let host = r.address.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                    upstreams.push(pb::Upstream {
                        address: format!("{host}:{port}"),
                        provider: provider.clone(),
                        replica: r.id(),
                        weight: 1,
                        tier: d.tier,
                    });
                }
            }
            routes.push(pb::Route {
                app: name.clone(),
                listen: routing.listen.clone(),
                hosts: routing.hosts.clone(),
                protocol: routing.protocol.as_str().to_string(),
                upstreams,
            });
        }
        self.routes.send_if_modified(|table| {
            if table.routes == routes {
                return false;
            }
            table.routes = routes;
            table.revision += 1;
            true
        });
    }

    /// One liveness evaluation of every provider: probe the replicas of silent
    /// providers from outside, step each state machine, record transitions.
    pub(crate) async fn liveness_pass(&self) -> Result<(), DaemonError> {
        let providers = self.store.providers()?;
        let recovery = self
            .store
            .apps()?
            .iter()
            .map(|a| a.app.spec.failover.failback_after)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let now = Instant::now();
        let cfg = &self.config;
        let mut observed = Vec::with_capacity(providers.len());
        let mut to_probe: Vec<(String, Vec<String>)> = Vec::new();
        for p in &providers {
            let name = p.provider.metadata.name.clone();
            let (last, connected) = self.last_heartbeat(&name);
            let silent =
                last.is_none_or(|t| now.saturating_duration_since(t) >= cfg.liveness.suspect_after);
            if silent || !connected {
                let addrs: Vec<String> = lock(&self.replicas)
                    .get(&name)
                    .map(|rs| {
                        rs.values()
                            .filter(|r| !r.address.is_empty())
                            .map(|r| r.address.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                to_probe.push((name.clone(), addrs));
            } else {
                lock(&self.probes).remove(&name);
            }
            observed.push((name, last, connected));
        }
        for (name, answer) in probe_all(to_probe, cfg.probe_timeout).await {
            lock(&self.probes).insert(name, answer);
        }
        let now = Instant::now();
        let mut events = Vec::new();
        let mut changed = false;
        {
            let probes = lock(&self.probes).clone();
            let mut live = lock(&self.liveness);
            live.retain(|name, _| observed.iter().any(|(n, _, _)| n == name));
            for (name, last, connected) in observed {
                let entry = live
                    .entry(name.clone())
                    .or_insert_with(|| ProviderLiveness::new(self.started));
                let obs = Observation {
                    last_heartbeat: last,
                    connected,
                    replicas_answer: probes.get(&name).copied().flatten(),
                    daemon_started: self.started,
                };
                let Some(t) = liveness::step(entry, &obs, now, &cfg.liveness, recovery) else {
                    continue;
                };
                changed = true;
                let wall = now_ms();
                let mut walls = lock(&self.liveness_wall);
                let w = walls.entry(name.clone()).or_insert((wall, 0));
                w.0 = wall;
                if t.held_out {
                    w.1 = wall + i64::try_from(cfg.liveness.hold_out.as_millis()).unwrap_or(0);
                }
                drop(walls);
                tracing::info!(provider = %name, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "provider liveness");
                let warning = matches!(
                    t.to,
                    Liveness::Suspect | Liveness::Partitioned | Liveness::Down
                );
                let reason = match t.to {
                    Liveness::Up => "ProviderUp",
                    Liveness::Suspect => "ProviderSuspect",
                    Liveness::Partitioned => "ProviderPartitioned",
                    Liveness::Down => "ProviderDown",
                    Liveness::Recovering => "ProviderRecovering",
                    Liveness::Unknown => "ProviderUnknown",
                };
                events.push(NewEvent {
                    reason: reason.into(),
                    kind: "Provider".into(),
                    object: name.clone(),
                    message: format!("provider {name} is {}: {}", t.to.as_str(), t.reason),
                    provider: name.clone(),
                    warning,
                    ..NewEvent::default()
                });
                if t.held_out {
                    events.push(NewEvent {
                        reason: "ProviderFlapping".into(),
                        kind: "Provider".into(),
                        object: name.clone(),
                        message: format!(
                            "provider {name} dropped out {} times within {}s: held out for {}s instead of moving its share back and forth",
                            cfg.liveness.flap_threshold,
                            cfg.liveness.flap_window.as_secs(),
                            cfg.liveness.hold_out.as_secs()
                        ),
                        provider: name.clone(),
                        warning: true,
                        ..NewEvent::default()
                    });
                }
            }
        }
        self.record(events);
        if changed {
            self.wake();
        }
        Ok(())
    }

    /// Re-evaluates liveness every tick until cancelled. Time-driven changes
    /// (damping, lease expiry) also need passes, so the reconciler is woken
    /// whenever a provider is not simply up.
    pub async fn liveness_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.liveness_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.liveness_pass().await {
                tracing::error!(error = %e, "liveness pass failed");
            }
            if lock(&self.liveness)
                .values()
                .any(|l| l.state != Liveness::Up)
            {
                self.wake();
            }
        }
    }

    /// Runs reconcile passes when woken and on every resync interval until cancelled.
    pub async fn reconcile_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let began = tokio::time::Instant::now();
            let span = tracing::debug_span!("reconcile");
            let _enter = span.enter();
            if let Err(e) = self.reconcile() {
                tracing::error!(error = %e, "reconcile pass failed");
            }
            drop(_enter);
            let ended = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.config.resync_interval) => {}
            }
            // Coalesce bursts (hundreds of status reports while replicas start):
            // at most one pass per interval, wake-ups meanwhile folding into the
            // next. A wake-up after a quiet spell (an apply) runs at once; a
            // pass that took the whole interval still leaves a gap.
            let next = (began + MIN_PASS_INTERVAL).max(ended + MIN_PASS_INTERVAL / 5);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }
}

/// Liveness as the wire spells it.
pub(crate) fn liveness_to_pb(l: Liveness) -> pb::ProviderState {
    match l {
        Liveness::Unknown => pb::ProviderState::Unknown,
        Liveness::Up => pb::ProviderState::Up,
        Liveness::Suspect => pb::ProviderState::Suspect,
        Liveness::Partitioned => pb::ProviderState::Partitioned,
        Liveness::Down => pb::ProviderState::Down,
        Liveness::Recovering => pb::ProviderState::Recovering,
    }
}

/// Probes each provider's replica addresses with a TCP connect; a provider
/// answers if any of its replicas accepts. `None` when it has no address.
async fn probe_all(
    targets: Vec<(String, Vec<String>)>,
    timeout: Duration,
) -> Vec<(String, Option<bool>)> {
    let mut set = tokio::task::JoinSet::new();
    for (name, addrs) in targets {
        set.spawn(async move {
            if addrs.is_empty() {
                return (name, None);
            }
            let mut attempts = tokio::task::JoinSet::new();
            for a in addrs {
                attempts.spawn(async move {
                    matches!(
                        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await,
                        Ok(Ok(_))
                    )
                });
            }
            let mut any = false;
            while let Some(r) = attempts.join_next().await {
                any |= r.unwrap_or(false);
            }
            (name, Some(any))
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(x) = r {
            out.push(x);
        }
    }
    out
}

/// How an apply or delete result reads, e.g. `configured`.
pub fn action_word(a: pb::ApplyAction) -> &'static str {
    match a {
        pb::ApplyAction::Created => "created",
        pb::ApplyAction::Configured => "configured",
        pb::ApplyAction::Unchanged => "unchanged",
        pb::ApplyAction::Deleted => "deleted",
        pb::ApplyAction::NotFound => "not found",
        pb::ApplyAction::Unspecified => "unknown",
    }
}

fn result(kind: &str, name: &str, action: pb::ApplyAction, generation: u64) -> pb::ObjectResult {
    pb::ObjectResult {
        kind: kind.to_string(),
        name: name.to_string(),
        action: action as i32,
        generation,
    }
}

fn describe_change(old: &StoredApp, new: &StoredApp) -> String {
    let (o, n) = (&old.app.spec, &new.app.spec);
    let mut parts = Vec::new();
    if o.replicas != n.replicas {
        parts.push(format!("replicas {} → {}", o.replicas, n.replicas));
    }
    if o.workload != n.workload {
        parts.push("workload changed, replicas will be replaced".to_string());
    }
    if o.placement != n.placement {
        parts.push("placement changed".to_string());
    }
    if o.health != n.health {
        parts.push("health check changed".to_string());
    }
    if o.failover != n.failover || o.routing != n.routing || old.app.metadata != new.app.metadata {
        parts.push("settings changed".to_string());
    }
    parts.join(", ")
}

/// `(app, "a → b replicas")` for every app whose count changed.
fn diff_assignment(old: &[AssignedApp], new: &[AssignedApp]) -> Vec<(String, String)> {
    let o: BTreeMap<&str, &AssignedApp> = old.iter().map(|a| (a.app.as_str(), a)).collect();
    let n: BTreeMap<&str, &AssignedApp> = new.iter().map(|a| (a.app.as_str(), a)).collect();
    let mut out = Vec::new();
    for app in o.keys().chain(n.keys()).collect::<BTreeSet<_>>() {
        let before = o.get(app).map_or(0, |a| a.replicas);
        let after = n.get(app).map_or(0, |a| a.replicas);
        let replaced = matches!((o.get(app), n.get(app)), (Some(x), Some(y)) if x.workload_generation != y.workload_generation);
        if before != after {
            out.push((app.to_string(), format!("{before} → {after} replicas")));
        } else if replaced {
            out.push((
                app.to_string(),
                format!(
                    "{after} replicas replaced with generation {}",
                    n.get(app).map_or(0, |a| a.workload_generation)
                ),
            ));
        }
    }
    out
}

fn plan_changes(
    before: &Schedule,
    after: &Schedule,
    old_apps: &[StoredApp],
    new_apps: &[StoredApp],
) -> Vec<pb::PlacementChange> {
    let wg = |apps: &[StoredApp], name: &str| {
        apps.iter()
            .find(|a| a.app.metadata.name == name)
            .map(|a| a.workload_generation)
    };
    let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
    for s in [before, after] {
        for (p, apps) in &s.placements {
            for a in apps.keys() {
                keys.insert((a.clone(), p.clone()));
            }
        }
    }
    let count = |s: &Schedule, app: &str, p: &str| {
        s.placements
            .get(p)
            .and_then(|m| m.get(app))
            .copied()
            .unwrap_or(0)
    };
    keys.into_iter()
        .filter_map(|(app, provider)| {
            let b = count(before, &app, &provider);
            let a = count(after, &app, &provider);
            let replace = b > 0 && a > 0 && wg(old_apps, &app) != wg(new_apps, &app);
            (b != a || replace).then_some(pb::PlacementChange {
                app,
                provider,
                replicas_before: b,
                replicas_after: a,
                replace,
            })
        })
        .collect()
}

/// Desired and ready replicas of an app over all providers. A replica counts
/// as ready only if it is assigned, ready, and runs the current workload.
pub(crate) fn summarize(
    app: &StoredApp,
    assignments: &BTreeMap<String, StoredAssignment>,
    replicas: &[StoredReplica],
) -> pb::AppSummary {
    let name = &app.app.metadata.name;
    let mut summary = pb::AppSummary {
        name: name.clone(),
        ..Default::default()
    };
    for (provider, a) in assignments {
        let Some(share) = a.apps.iter().find(|x| &x.app == name) else {
            continue;
        };
        summary.desired_replicas += share.replicas;
        summary.providers.push(provider.clone());
        let ready = replicas
            .iter()
            .filter(|r| {
                &r.provider == provider
                    && &r.app == name
                    && r.index < share.replicas
                    && r.ready
                    && r.workload_generation == app.workload_generation
            })
            .count();
        summary.ready_replicas += u32::try_from(ready).unwrap_or(u32::MAX);
    }
    summary
}

/// The wire form of a provider's assignment.
pub(crate) fn assignment_to_pb(
    a: &StoredAssignment,
    apps: &BTreeMap<&str, &StoredApp>,
) -> pb::Assignment {
    pb::Assignment {
        provider: a.provider.clone(),
        revision: a.revision,
        apps: a
            .apps
            .iter()
            .filter_map(|x| {
                let app = apps.get(x.app.as_str())?;
                Some(pb::AppAssignment {
                    singleton: app.app.spec.failover.singleton,
                    app: x.app.clone(),
                    generation: x.generation,
                    workload_generation: x.workload_generation,
                    replicas: x.replicas,
                    workload: Some(spec::workload_to_pb(&app.app.spec.workload)),
                    health: app.app.spec.health.as_ref().map(spec::health_to_pb),
                })
            })
            .collect(),
    }
}

/// Serves the daemon on `listener` until `shutdown` completes.
///
/// The caller owns the socket (tests bind `127.0.0.1:0`) and the shutdown signal.
pub async fn run(
    config: DaemonConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let store = crate::store::SledStore::open(&config.data_dir)?;
    let daemon = Daemon::new(Arc::new(store), config)?;
    serve(daemon, listener, shutdown).await
}

/// Serves an already-built daemon context; see [`run`].
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let token = daemon.shutdown.clone();
    let reconciler = tokio::spawn(daemon.clone().reconcile_loop(token.clone()));
    let liveness = tokio::spawn(daemon.clone().liveness_loop(token.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::control_service_server::ControlServiceServer<crate::control::ControlApi>>()
        .await;
    health_reporter
        .set_serving::<pb::agent_service_server::AgentServiceServer<crate::agents::AgentApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(skymirror_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Serve(format!("reflection: {e}")))?;

    daemon.record(vec![NewEvent {
        reason: "DaemonStarted".into(),
        kind: "Daemon".into(),
        object: daemon.daemon_id.clone(),
        message: format!(
            "daemon {} started on {}",
            daemon.daemon_id,
            addr.map_or_else(|| "?".to_string(), |a| a.to_string())
        ),
        ..NewEvent::default()
    }]);
    tracing::info!(addr = ?addr, daemon_id = %daemon.daemon_id, "serving");

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = token.clone();
    let closing = daemon.clone();
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(crate::control::ControlApi::server(daemon.clone()))
        .add_service(crate::agents::AgentApi::server(daemon.clone()))
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
            // Close agent streams so graceful shutdown is not held open by them.
            lock(&closing.agents).clear();
        })
        .await
        .map_err(|e| DaemonError::Serve(e.to_string()));
    token.cancel();
    let _ = reconciler.await;
    let _ = liveness.await;
    if let Err(e) = daemon.store.flush() {
        tracing::warn!(error = %e, "final flush failed");
    }
    result
}
