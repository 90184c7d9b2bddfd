//! The daemon's domain: what users declared, what the scheduler decided, what
//! agents reported, and the event log, as the daemon's logic sees them.
//!
//! Boundary: these types know neither protobuf nor the store's encoding. The
//! API layer converts wire types to and from them (`crate::api`), and the
//! store converts them to and from its own versioned records
//! (`crate::store::records`), so a YAML field or a wire field can change
//! without making an existing store undecodable.

use std::collections::BTreeMap;

use crate::spec;

/// A declared app: the spec plus what the daemon tracks about it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredApp {
    /// The app as applied.
    pub app: spec::App,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// Generation at which the workload (what a replica runs) last changed.
    pub workload_generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// A declared provider.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredProvider {
    /// The provider as applied.
    pub provider: spec::Provider,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// Lifecycle state of a replica, as its agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Assigned, not started.
    Pending,
    /// Started, health not yet established.
    Starting,
    /// Running; no health check, or not passed yet.
    Running,
    /// Passing its health check.
    Healthy,
    /// Failing its health check.
    Unhealthy,
    /// Exited; waiting out a restart backoff.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Cannot be started.
    Failed,
}

impl ReplicaState {
    /// Name as shown to people and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Starting => "starting",
            ReplicaState::Running => "running",
            ReplicaState::Healthy => "healthy",
            ReplicaState::Unhealthy => "unhealthy",
            ReplicaState::Backoff => "backoff",
            ReplicaState::Stopping => "stopping",
            ReplicaState::Stopped => "stopped",
            ReplicaState::Failed => "failed",
        }
    }
}

/// A replica as last reported by its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedReplica {
    /// Provider the replica runs on.
    pub provider: String,
    /// App name.
    pub app: String,
    /// Index within the app on the provider.
    pub index: u32,
    /// App generation the replica reflects.
    pub generation: u64,
    /// Workload generation the replica runs.
    pub workload_generation: u64,
    /// Reported state.
    pub state: ReplicaState,
    /// Whether the app's health check considers it ready to serve
    /// (healthy, or running when the app has no health check).
    pub ready: bool,
    /// `host:port` of the first port, if running.
    pub address: String,
    /// Host port per named port.
    pub ports: BTreeMap<String, u32>,
    /// Driver's id of the instance (pid, container id).
    pub instance_id: String,
    /// Unplanned restarts.
    pub restarts: u32,
    /// Keeps exiting shortly after starting.
    pub crash_looping: bool,
    /// Detail of the state.
    pub message: String,
    /// Instance start, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Last state change, ms since the Unix epoch.
    pub state_since_ms: i64,
}

impl ReportedReplica {
    /// The replica's stable identity, `app/provider/index`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.app, self.provider, self.index)
    }
}

/// One app's share of a provider's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedApp {
    /// App name.
    pub app: String,
    /// App generation.
    pub generation: u64,
    /// Workload generation.
    pub workload_generation: u64,
    /// Replicas the provider runs.
    pub replicas: u32,
    /// Of those, replicas re-placed from lost providers (failover extras).
    pub extra: u32,
}

/// The complete desired set for one provider, as last decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Provider name.
    pub provider: String,
    /// Increases with every change of `apps`.
    pub revision: u64,
    /// Apps, sorted by name.
    pub apps: Vec<AssignedApp>,
}

/// What an event is about: each [`EventReason`] belongs to one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// An app: its spec, its placement.
    App,
    /// A provider: its spec, its agent, its liveness, operator controls.
    Provider,
    /// One replica, `app/provider/index`.
    Replica,
    /// The daemon itself.
    Daemon,
}

impl EventKind {
    /// The name in the API and in JSON output: `App`, `Provider`, `Replica`, `Daemon`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::App => "App",
            EventKind::Provider => "Provider",
            EventKind::Replica => "Replica",
            EventKind::Daemon => "Daemon",
        }
    }
}

/// Declares [`EventReason`]: each reason with its kind, whether it is a
/// warning, and whether it is a placement decision (`explain` lists those).
macro_rules! event_reasons {
    ($( $(#[$doc:meta])* $name:ident: $kind:ident, warning = $warning:literal, decision = $decision:literal; )*) => {
        /// Why an event was recorded. Serializes to the reason's name
        /// (`AppCreated`), the string the API and `events -o json` show.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum EventReason {
            $( $(#[$doc])* $name, )*
        }

        impl EventReason {
            /// Every reason.
            pub const ALL: &'static [EventReason] = &[$(EventReason::$name),*];

            /// The reason's name, e.g. `AppCreated`.
            pub fn as_str(self) -> &'static str {
                match self { $(EventReason::$name => stringify!($name),)* }
            }

            /// What the event is about.
            pub fn kind(self) -> EventKind {
                match self { $(EventReason::$name => EventKind::$kind,)* }
            }

            /// Whether people should look: something failed or degraded.
            pub fn is_warning(self) -> bool {
                match self { $(EventReason::$name => $warning,)* }
            }

            /// Whether the event records a placement decision or a change of
            /// what placement depends on (`explain` lists these).
            pub fn is_decision(self) -> bool {
                match self { $(EventReason::$name => $decision,)* }
            }
        }
    };
}

event_reasons! {
    /// An app was applied for the first time.
    AppCreated: App, warning = false, decision = false;
    /// An app's spec changed.
    AppConfigured: App, warning = false, decision = false;
    /// An app was deleted.
    AppDeleted: App, warning = false, decision = false;
    /// A provider's share of an app changed.
    Scheduled: App, warning = false, decision = true;
    /// An app could not be placed in full.
    InsufficientCapacity: App, warning = true, decision = true;
    /// An operator pinned an app to one provider.
    ManualFailover: App, warning = false, decision = true;
    /// An operator ended a manual failover.
    ManualFailback: App, warning = false, decision = true;
    /// A provider was applied for the first time.
    ProviderCreated: Provider, warning = false, decision = false;
    /// A provider's spec changed.
    ProviderConfigured: Provider, warning = false, decision = false;
    /// A provider was deleted.
    ProviderDeleted: Provider, warning = false, decision = false;
    /// A provider gets no new replicas.
    ProviderCordoned: Provider, warning = false, decision = true;
    /// A provider takes its share again.
    ProviderUncordoned: Provider, warning = false, decision = true;
    /// A provider's replicas move away.
    ProviderDraining: Provider, warning = false, decision = true;
    /// A provider's agent opened a session.
    ProviderConnected: Provider, warning = false, decision = false;
    /// A provider's agent session ended.
    ProviderDisconnected: Provider, warning = true, decision = false;
    /// A provider is up.
    ProviderUp: Provider, warning = false, decision = true;
    /// A provider's agent went silent.
    ProviderSuspect: Provider, warning = true, decision = false;
    /// A provider's agent is silent but its replicas answer.
    ProviderPartitioned: Provider, warning = true, decision = true;
    /// A provider is down: its share moves to the others.
    ProviderDown: Provider, warning = true, decision = true;
    /// A provider came back and waits out its damping.
    ProviderRecovering: Provider, warning = false, decision = true;
    /// A provider's liveness is not known.
    ProviderUnknown: Provider, warning = false, decision = false;
    /// A provider dropped out too often and is held out.
    ProviderFlapping: Provider, warning = true, decision = true;
    /// A provider that was down kept replicas that duplicate re-placed ones.
    DuplicateReplicas: Provider, warning = true, decision = false;
    /// A replica's instance started.
    ReplicaStarted: Replica, warning = false, decision = false;
    /// A replica passes its health check.
    ReplicaHealthy: Replica, warning = false, decision = false;
    /// A replica fails its health check.
    ReplicaUnhealthy: Replica, warning = true, decision = false;
    /// A replica's instance exited and waits out a restart backoff.
    ReplicaExited: Replica, warning = true, decision = false;
    /// A replica cannot be started.
    ReplicaFailed: Replica, warning = true, decision = false;
    /// A replica keeps exiting shortly after starting.
    ReplicaCrashLooping: Replica, warning = true, decision = false;
    /// A replica was stopped and removed.
    ReplicaRemoved: Replica, warning = false, decision = false;
    /// A daemon started.
    DaemonStarted: Daemon, warning = false, decision = false;
    /// The store could not write (a full disk): writes are refused while
    /// reads and routing go on from memory.
    StoreUnwritable: Daemon, warning = true, decision = false;
    /// The store can write again.
    StoreWritable: Daemon, warning = false, decision = false;
    /// An agent joined with a join token and got a certificate for its provider.
    AgentJoined: Provider, warning = false, decision = false;
    /// A join was refused: an unknown, expired or revoked join token, one for
    /// another provider, an undeclared provider or a bad certificate request.
    AgentJoinRefused: Provider, warning = true, decision = false;
    /// An agent renewed its certificate.
    AgentCertificateRenewed: Provider, warning = false, decision = false;
    /// An agent's session was refused: no, expired, revoked or another
    /// provider's certificate, a wrong join token, or a second session
    /// while the provider's agent holds a live one.
    AgentSessionRefused: Provider, warning = true, decision = false;
    /// Agent certificates were revoked; their sessions end and they cannot
    /// reconnect.
    AgentRevoked: Provider, warning = true, decision = false;
    /// An agent sent more than the daemon accepts from one agent: its
    /// session was ended.
    AgentFlooding: Provider, warning = true, decision = false;
    /// Events about a provider were dropped: its agent reported more changes
    /// than the log takes from one provider.
    AgentEventsDropped: Provider, warning = true, decision = false;
    /// A provider's agent reported replicas the daemon did not assign; they
    /// were ignored.
    AgentReportRefused: Provider, warning = true, decision = false;
    /// A token was created.
    TokenCreated: Daemon, warning = false, decision = false;
    /// A token was revoked.
    TokenRevoked: Daemon, warning = false, decision = false;
}

impl std::fmt::Display for EventReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason name that no [`EventReason`] has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event reason {0:?}")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for EventReason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, UnknownReason> {
        EventReason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// An event to append; the store gives it a sequence number and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Why it was recorded; also gives its kind and whether it is a warning.
    pub reason: EventReason,
    /// Object name (`app/provider/index` for replicas).
    pub object: String,
    /// Human-readable description.
    pub message: String,
    /// App concerned, or empty.
    pub app: String,
    /// Provider concerned, or empty.
    pub provider: String,
}

impl NewEvent {
    /// An event about an app.
    pub fn app(reason: EventReason, app: &str, message: String) -> Self {
        NewEvent {
            reason,
            object: app.to_string(),
            message,
            app: app.to_string(),
            provider: String::new(),
        }
    }

    /// An event about a provider.
    pub fn provider(reason: EventReason, provider: &str, message: String) -> Self {
        NewEvent {
            reason,
            object: provider.to_string(),
            message,
            app: String::new(),
            provider: provider.to_string(),
        }
    }

    /// An event about one replica.
    pub fn replica(reason: EventReason, replica: &ReportedReplica, message: String) -> Self {
        NewEvent {
            reason,
            object: replica.id(),
            message,
            app: replica.app.clone(),
            provider: replica.provider.clone(),
        }
    }

    /// An event about the daemon `id`.
    pub fn daemon(reason: EventReason, id: &str, message: String) -> Self {
        NewEvent {
            reason,
            object: id.to_string(),
            message,
            app: String::new(),
            provider: String::new(),
        }
    }

    /// The same event, also naming the provider concerned.
    pub fn on_provider(mut self, provider: &str) -> Self {
        self.provider = provider.to_string();
        self
    }

    /// What the event is about.
    pub fn kind(&self) -> EventKind {
        self.reason.kind()
    }

    /// Whether it is a warning.
    pub fn warning(&self) -> bool {
        self.reason.is_warning()
    }
}

/// An event of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log.
    pub seq: u64,
    /// ms since the Unix epoch.
    pub time_ms: i64,
    /// The event.
    pub event: NewEvent,
}

/// Operator controls: cordoned and draining providers, manual failovers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// Providers that get no new replicas.
    pub cordoned: std::collections::BTreeSet<String>,
    /// Providers whose replicas are moved away.
    pub draining: std::collections::BTreeSet<String>,
    /// Manual failovers: app → the provider that serves it.
    pub pins: BTreeMap<String, String>,
}

/// Milliseconds since the Unix epoch, for timestamps in stored records.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the front door routes: for each app with `routing`, its listener,
/// host names and the ready replicas it may send to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    /// Increases with every change, so followers can tell tables apart.
    pub revision: u64,
    /// One route per app with routing.
    pub routes: Vec<Route>,
}

/// One app's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// App name.
    pub app: String,
    /// Listener address, `host:port`.
    pub listen: String,
    /// Host names matched (HTTP); empty matches any.
    pub hosts: Vec<String>,
    /// `http` or `tcp`.
    pub protocol: String,
    /// Ready replicas traffic may go to.
    pub upstreams: Vec<Upstream>,
    /// Longest wait for a response head per attempt (HTTP), from the app's routing.
    pub response_timeout: std::time::Duration,
    /// Whether idempotent requests may be hedged to a second replica (HTTP).
    pub hedge: bool,
    /// `http1` or `h2c`: how the front door talks to the replicas.
    pub upstream_protocol: String,
    /// The app's HTTP health-check path, so the front door's own probes ask the
    /// app rather than the kernel (a frozen process still accepts connections);
    /// `None` when the app has no HTTP check: the front door probes by TCP.
    pub health_path: Option<String>,
}

/// One replica a route may send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port` of the routed port.
    pub address: String,
    /// Provider it runs on.
    pub provider: String,
    /// Its identity, `app/provider/index`.
    pub replica: String,
    /// Relative weight within its tier.
    pub weight: u32,
    /// Routing tier: only the highest tier with a healthy upstream serves.
    pub tier: i32,
    /// `host:port` of the app's HTTP health check on this replica, when the route
    /// has a `health_path` and the check's port is not the routed one.
    pub health_address: Option<String>,
}

/// What an apply or delete did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// New object.
    Created,
    /// Existing object changed.
    Configured,
    /// Same as stored.
    Unchanged,
    /// Removed.
    Deleted,
    /// Nothing of that kind and name to delete.
    NotFound,
}

impl Action {
    /// How it reads, e.g. `configured`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
            Action::Deleted => "deleted",
            Action::NotFound => "not found",
        }
    }
}

/// The outcome of an apply or delete for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectResult {
    /// `App` or `Provider`.
    pub kind: spec::Kind,
    /// Object name.
    pub name: String,
    /// What happened.
    pub action: Action,
    /// Its generation afterwards (0 when not found).
    pub generation: u64,
}

/// How an apply changes one provider's share of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementChange {
    /// App name.
    pub app: String,
    /// Provider name.
    pub provider: String,
    /// Replicas before the apply.
    pub replicas_before: u32,
    /// Replicas after it.
    pub replicas_after: u32,
    /// Whether running replicas are replaced (the workload changed).
    pub replace: bool,
}

/// An operator's control of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderControl {
    /// No new replicas are placed there.
    Cordon,
    /// It takes its share again (ends a cordon or a drain).
    Uncordon,
    /// Its replicas move to the other providers.
    Drain,
}

/// Fixtures for the daemon's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{DeclaredApp, DeclaredProvider};
    use crate::spec::{self, Document};

    /// The apps and providers of a YAML file, as declared at generation 1.
    pub(crate) fn declared(yaml: &str) -> (Vec<DeclaredApp>, Vec<DeclaredProvider>) {
        let docs = spec::parse_documents("test.yaml", yaml).expect("valid fixture");
        let (mut apps, mut providers) = (Vec::new(), Vec::new());
        for d in docs {
            match d.document {
                Document::App(app) => apps.push(DeclaredApp {
                    app,
                    generation: 1,
                    workload_generation: 1,
                    created_at_ms: 0,
                    updated_at_ms: 0,
                }),
                Document::Provider(provider) => providers.push(DeclaredProvider {
                    provider,
                    generation: 1,
                    created_at_ms: 0,
                    updated_at_ms: 0,
                }),
            }
        }
        (apps, providers)
    }
}
