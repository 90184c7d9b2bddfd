//! The `Driver` extension point: one implementation per runtime.
//!
//! A driver starts, re-attaches to, inspects, stops and destroys *one replica* at
//! a time, and reads its output; beyond replicas it knows only its provider's
//! settings. It knows nothing of assignments, generations, restarts, retries or
//! health thresholds: the supervisor decides, the driver acts. Every running replica is
//! described by a [`Handle`], which the agent persists so that after an agent
//! restart [`Driver::recover`] re-attaches to what is already running instead of
//! starting it again. Every instance also carries marks of its own (the docker
//! driver's labels, the process driver's environment and handle file), so that
//! [`Driver::list_instances`] finds it without the agent's handle: a lost or
//! damaged handle file never leaves a duplicate running.
//!
//! How a driver must be driven is its [`Capabilities`] (Nomad's
//! `Capabilities`): besides the optional features, how many operations the
//! runtime takes at once, how often its instances are inspected, how long a
//! stop can take, and whether the runtime restarts crashed instances itself.
//! One supervisor thereby drives a local process and a cloud API alike. A
//! runtime that rate-limits its API says so per call ([`DriverError::Throttled`]),
//! with the delay it asks for. The provider's settings (its Provider
//! document's `spec.docker`, `spec.ec2`, `spec.kubernetes`) reach the driver
//! through [`Driver::configure`], before the supervisor acts on the assignment
//! that carries them.
//!
//! Invariant: a driver never restarts a replica on its own — the supervisor is
//! the single source of truth for what should run — unless it declares
//! [`Capabilities::runtime_restarts`]: then its runtime restarts crashed
//! instances (a Kubernetes controller does), the driver reports those restarts
//! ([`Inspection::Restarted`]), and the supervisor starts a new instance only
//! when the runtime has lost one.

#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod process;
pub mod settings;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use settings::DriverSettings;

/// Stable identity of a replica on one provider: `app/index`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaKey {
    /// App name.
    pub app: String,
    /// 0-based index within the app on this provider.
    pub index: u32,
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.app, self.index)
    }
}

/// What to run for one replica, in the agent's own terms (no protobuf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Container image, for image-based drivers.
    pub image: Option<String>,
    /// Program to run (process driver) or entrypoint override.
    pub command: Option<String>,
    /// Arguments for `command`.
    pub args: Vec<String>,
    /// Environment variables, sorted by name.
    pub env: Vec<(String, String)>,
    /// Named ports the app listens on.
    pub ports: Vec<PortSpec>,
    /// Working directory; `None` means the replica's own directory.
    pub working_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when the replica is stopped.
    pub stop_grace: Duration,
    /// CPU limit in thousandths of a core, if any.
    pub cpu_millis: Option<u32>,
    /// Memory limit in MiB, if any.
    pub memory_mib: Option<u32>,
}

/// One named port of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Unique name within the app, e.g. `http`.
    pub name: String,
    /// Port inside the container for image-based drivers; ignored by the process driver.
    pub container_port: Option<u16>,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// Everything a driver needs to start one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// Which replica this is.
    pub key: ReplicaKey,
    /// Provider the agent runs for; part of the replica's identity `app/provider/index`.
    pub provider: String,
    /// What to run.
    pub workload: Workload,
    /// Generation of the app at which `workload` last changed.
    pub workload_generation: u64,
}

/// Opaque, persisted reference to a running replica instance.
///
/// The agent stores it verbatim and hands it back to the driver that made it;
/// only that driver interprets `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handle {
    /// Driver kind that created the handle, e.g. `process`.
    pub driver: String,
    /// Driver's identifier of the instance: a pid, a container id.
    pub instance_id: String,
    /// Address users reach the first port at, `host:port`, if the replica has ports.
    pub address: Option<String>,
    /// Host port per named port.
    pub ports: BTreeMap<String, u16>,
    /// When the instance started, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Driver-specific data needed to re-attach.
    pub data: serde_json::Value,
}

/// One instance [`Driver::list_instances`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// How to act on the instance.
    pub handle: Handle,
    /// The replica it was started as, from its marks; `None` when they do
    /// not say.
    pub replica: Option<ListedReplica>,
    /// `handle` is what [`Driver::start`] returned for the instance (its
    /// address and ports included), so the agent can adopt it as if it had
    /// persisted it. A driver whose marks do not hold all of that lists its
    /// instances for removal only.
    pub adoptable: bool,
}

/// Which replica a listed instance was started as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedReplica {
    /// The replica.
    pub key: ReplicaKey,
    /// The workload generation it was started with.
    pub workload_generation: u64,
}

/// What a driver sees of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    /// The instance is running.
    Running {
        /// The runtime's own verdict on the instance's health (a container
        /// image's HEALTHCHECK), when it has one; `None` when it has none.
        health: Option<RuntimeHealth>,
    },
    /// The instance exited; the status is known only for instances the driver
    /// itself saw exit. From a driver with [`Capabilities::runtime_restarts`]:
    /// the runtime lost the instance and will not bring it back.
    Exited {
        /// Exit code, if it exited normally and the status is known.
        code: Option<i32>,
        /// Signal that ended it, if known.
        signal: Option<i32>,
    },
    /// The runtime restarts the instance itself (drivers with
    /// [`Capabilities::runtime_restarts`] only) and has restarted it
    /// `restarts` times since it was started. The supervisor reports those
    /// restarts and never restarts the instance itself.
    Restarted {
        /// The runtime's restarts of this instance so far (Kubernetes'
        /// `restartCount`); it only grows.
        restarts: u32,
        /// It runs now; `false` while the runtime waits to restart it again
        /// (a crash loop's back-off).
        running: bool,
        /// The runtime's own verdict on its health, as for `Running`.
        health: Option<RuntimeHealth>,
    },
}

impl Inspection {
    /// Running, with no verdict of the runtime's own.
    pub const RUNNING: Inspection = Inspection::Running { health: None };
}

/// A runtime's own health verdict on an instance (Docker's HEALTHCHECK
/// states). The supervisor combines it with the app's health check: a replica
/// is ready only when neither says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeHealth {
    /// Checks have not passed yet (Docker's `starting`, the start period).
    Starting,
    /// The runtime's checks pass.
    Healthy,
    /// The runtime's checks fail.
    Unhealthy,
}

/// What a driver can do and how it must be driven.
///
/// The optional features (`recover`, `exec`, `logs`) say which operations it
/// has; the rest is how the supervisor drives it: how many operations at
/// once, how often to inspect, and what to expect of stops and crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Can re-attach to instances after an agent restart.
    pub recover: bool,
    /// Can run a command in a replica's environment (exec health checks).
    pub exec: bool,
    /// Keeps the replica's output where `logs` can read it.
    pub logs: bool,
    /// Most operations (start, stop, destroy) the runtime is given at once;
    /// the supervisor queues the rest, in order. A cloud API's rate limits
    /// call for a few; local processes take hundreds. 0 counts as 1.
    pub max_concurrent_operations: u32,
    /// How often the supervisor inspects the running instances (one
    /// [`Driver::inspect_all`] per pass): often for a local runtime, less
    /// for an API that counts requests.
    pub inspect_interval: Duration,
    /// The longest a stop takes beyond the grace it is given, until the
    /// instance no longer runs: the forced kill, rounding of the grace, the
    /// runtime's own delay. [`Capabilities::max_stop`] adds the grace.
    pub stop_overhead: Duration,
    /// The runtime restarts crashed instances itself (a Kubernetes
    /// controller): the supervisor then never restarts them, and reports the
    /// runtime's restarts ([`Inspection::Restarted`]).
    pub runtime_restarts: bool,
}

impl Capabilities {
    /// The longest a stop with `grace` takes, until the instance no longer
    /// runs. The bound depends on the workload (its grace), so a driver
    /// declares only its own part ([`Capabilities::stop_overhead`]).
    pub fn max_stop(&self, grace: Duration) -> Duration {
        grace.saturating_add(self.stop_overhead)
    }

    /// Operations in flight at once, at least 1.
    pub fn operations(&self) -> usize {
        usize::try_from(self.max_concurrent_operations.max(1)).unwrap_or(usize::MAX)
    }
}

impl Default for Capabilities {
    /// What a driver that declares nothing gets, on the safe side: no
    /// optional feature, one operation at a time, an inspection a second, up
    /// to 10 s beyond a stop's grace, and restarts left to the supervisor.
    fn default() -> Self {
        Capabilities {
            recover: false,
            exec: false,
            logs: false,
            max_concurrent_operations: 1,
            inspect_interval: Duration::from_secs(1),
            stop_overhead: Duration::from_secs(10),
            runtime_restarts: false,
        }
    }
}

/// Most lines of output [`Driver::logs`] sends before following: a bound on
/// the work and traffic one request causes, whatever it asks for.
pub const MAX_LOG_LINES: u32 = 10_000;

/// Largest piece of output [`Driver::logs`] sends at once (and the agent
/// sends the daemon in one message).
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// What [`Driver::logs`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// The last this many lines, 1 to [`MAX_LOG_LINES`].
    pub tail_lines: u32,
    /// After them, new output until the instance exits.
    pub follow: bool,
}

impl LogOptions {
    /// Options from a request's `tail_lines`, where 0 means all that is kept:
    /// both 0 and anything over [`MAX_LOG_LINES`] become the bound.
    pub fn new(tail_lines: u32, follow: bool) -> Self {
        let tail_lines = match tail_lines {
            0 => MAX_LOG_LINES,
            n => n.min(MAX_LOG_LINES),
        };
        LogOptions { tail_lines, follow }
    }
}

/// Why a driver operation failed.
///
/// Retryability ([`DriverError::is_retryable`]): `Io`, `Runtime` and
/// `Throttled` may succeed later; `InvalidWorkload`, `InvalidSettings` and
/// `Unsupported` give the same answer until the spec, the settings or the
/// driver change. A retryable start failure is retried with the supervisor's
/// backoff and counts towards crash-looping, except `Throttled`: the runtime
/// refused the call for its rate, not for the replica, so the call is retried
/// after the delay it asked for ([`DriverError::retry_after`]), with jitter,
/// and counts as no crash.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The workload cannot run as specified (missing command or image, bad
    /// spec). Not retryable: retrying gives the same answer until the spec changes.
    #[error("{0}")]
    InvalidWorkload(String),
    /// The provider's driver settings cannot be used (settings of another
    /// driver, a Docker network that does not exist). Not retryable: the
    /// driver keeps its previous settings until the next assignment brings
    /// settings again.
    #[error("{0}")]
    InvalidSettings(String),
    /// The runtime failed; retrying later may succeed.
    #[error("{context}: {source}")]
    Io {
        /// What the driver was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime refused or failed the operation; retrying later may succeed.
    #[error("{0}")]
    Runtime(String),
    /// The runtime's API refused the call for its rate (EC2's
    /// `RequestLimitExceeded`, a Kubernetes 429): retryable after
    /// `retry_after`, and no fault of the replica.
    #[error("{message} (throttled by the runtime; retry in {retry_after:?})")]
    Throttled {
        /// What the runtime said.
        message: String,
        /// How long to wait before the next call: the runtime's own
        /// `Retry-After` when it gives one, else the driver's estimate.
        retry_after: Duration,
    },
    /// The driver does not support the operation (see [`Capabilities`]).
    #[error("the {driver} driver does not support {operation}")]
    Unsupported {
        /// Driver kind.
        driver: &'static str,
        /// Operation asked for.
        operation: &'static str,
    },
}

impl DriverError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DriverError::Io { .. } | DriverError::Runtime(_) | DriverError::Throttled { .. }
        )
    }

    /// How long the runtime asked to wait before the next call, for a
    /// throttled one; `None` for every other error (the supervisor's backoff
    /// decides).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DriverError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DriverError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Picks a free port on `host` for each named port of `workload`, in the
/// workload's order, by binding port 0 and releasing it. All sockets stay open
/// until every port is picked, so no two picks collide.
pub fn pick_host_ports(
    host: IpAddr,
    workload: &Workload,
) -> Result<Vec<(String, u16)>, DriverError> {
    enum Held {
        Tcp(TcpListener),
        Udp(UdpSocket),
    }
    let mut held = Vec::with_capacity(workload.ports.len());
    for port in &workload.ports {
        let addr = SocketAddr::new(host, 0);
        let socket = if port.protocol.eq_ignore_ascii_case("udp") {
            UdpSocket::bind(addr).map(Held::Udp)
        } else {
            TcpListener::bind(addr).map(Held::Tcp)
        };
        let local = socket.and_then(|s| {
            let local = match &s {
                Held::Tcp(l) => l.local_addr(),
                Held::Udp(u) => u.local_addr(),
            }?;
            Ok((s, local.port()))
        });
        let (socket, number) = local.map_err(|e| {
            DriverError::io(format!("pick a port for `{}` on {host}", port.name), e)
        })?;
        held.push((port.name.clone(), number, socket));
    }
    Ok(held
        .into_iter()
        .map(|(name, number, _)| (name, number))
        .collect())
}

/// The environment every driver gives a replica: the workload's own
/// variables, `PORT` (the first port) and `PORT_<NAME>` per named port (the
/// numbers the app listens on), and its identity: `SKYMIRROR_APP`,
/// `SKYMIRROR_PROVIDER`, `SKYMIRROR_INDEX`, `SKYMIRROR_REPLICA`.
pub fn replica_env(spec: &ReplicaSpec, ports: &[(String, u16)]) -> Vec<(String, String)> {
    let key = &spec.key;
    let mut env = spec.workload.env.clone();
    if let Some((_, port)) = ports.first() {
        env.push(("PORT".into(), port.to_string()));
    }
    for (name, port) in ports {
        let var = format!("PORT_{}", name.to_ascii_uppercase().replace('-', "_"));
        env.push((var, port.to_string()));
    }
    env.push(("SKYMIRROR_APP".into(), key.app.clone()));
    env.push(("SKYMIRROR_PROVIDER".into(), spec.provider.clone()));
    env.push(("SKYMIRROR_INDEX".into(), key.index.to_string()));
    env.push((
        "SKYMIRROR_REPLICA".into(),
        format!("{}/{}/{}", key.app, spec.provider, key.index),
    ));
    env
}

/// A runtime that runs replicas. See the module docs for the contract.
pub trait Driver: Send + Sync + 'static {
    /// Driver kind, e.g. `process`; stored in every handle it makes.
    fn kind(&self) -> &'static str;

    /// What this driver can do and how it must be driven. Constant for the
    /// driver's life: the agent reads it once, and tells the daemon in its
    /// hello.
    fn capabilities(&self) -> Capabilities;

    /// Takes the provider's driver settings (its Provider document's block
    /// for this driver, or [`DriverSettings::Unset`]: the agent's own flags),
    /// before the supervisor converges to the assignment that carries them.
    /// Called when they differ from the last ones it took, never with settings
    /// of another driver (the supervisor refuses those itself). New settings
    /// apply to the instances started afterwards; running ones are left as
    /// they are. An error changes nothing: the driver keeps its previous
    /// settings. Drivers without settings of their own keep the default, which
    /// takes anything.
    fn configure(
        &self,
        settings: &DriverSettings,
    ) -> impl Future<Output = Result<(), DriverError>> + Send {
        let _ = settings;
        async { Ok(()) }
    }

    /// Starts one instance of the replica and returns its handle once the
    /// runtime has accepted it (not once it is healthy).
    fn start(&self, spec: &ReplicaSpec)
    -> impl Future<Output = Result<Handle, DriverError>> + Send;

    /// Re-attaches to an instance started by an earlier agent run, from its
    /// persisted handle, and says whether it still runs.
    fn recover(
        &self,
        handle: &Handle,
    ) -> impl Future<Output = Result<Inspection, DriverError>> + Send;

    /// Says whether the instance still runs.
    fn inspect(
        &self,
        handle: &Handle,
    ) -> impl Future<Output = Result<Inspection, DriverError>> + Send;

    /// [`Driver::inspect`] of each of `handles`, in order. A runtime that can
    /// answer for many instances in one request overrides it (the docker
    /// driver lists its containers once rather than asking the engine about
    /// each every pass); the default inspects one after the other.
    fn inspect_all(
        &self,
        handles: &[Handle],
    ) -> impl Future<Output = Vec<Result<Inspection, DriverError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(handles.len());
            for handle in handles {
                out.push(self.inspect(handle).await);
            }
            out
        }
    }

    /// Stops the instance: a polite signal, then a forced kill after `grace`.
    /// Stopping an instance that already exited succeeds.
    fn stop(
        &self,
        handle: &Handle,
        grace: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Releases everything the instance held (files, containers). Called after
    /// `stop` when the replica is no longer wanted.
    fn destroy(&self, handle: &Handle) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Runs `command` in the instance's environment and returns its exit code;
    /// `None` if it did not finish within `timeout`.
    fn exec(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<i32>, DriverError>> + Send;

    /// What the runtime says is wrong with an instance, in its own words (a
    /// Kubernetes pod's `CrashLoopBackOff` with its last exit, `OOMKilled`,
    /// an eviction), as of the last [`Driver::inspect_all`]; `None` when
    /// nothing is, or the runtime says nothing. The supervisor carries it in
    /// the replica's message. Drivers whose runtime has no such words keep
    /// the default.
    fn remark(&self, handle: &Handle) -> Option<String> {
        let _ = handle;
        None
    }

    /// Every instance the runtime holds for `provider`, running or not,
    /// whether or not the agent knows it, found by the marks the driver gives
    /// every instance it starts (labels, an environment, a file). When the
    /// agent starts, the supervisor adopts the ones it can ([`Listed`]) for
    /// replicas it holds no running instance of — its handle file lost or
    /// damaged, or older than the instance — and stops and destroys the rest
    /// that no recovered replica holds: duplicates, instances started just
    /// before an agent died (before their handle was persisted), instances of
    /// replicas that are no longer assigned. Drivers whose instances cannot
    /// outlive the agent's knowledge of them keep the default: none.
    fn list_instances(
        &self,
        provider: &str,
    ) -> impl Future<Output = Result<Vec<Listed>, DriverError>> + Send {
        let _ = provider;
        async { Ok(Vec::new()) }
    }

    /// Sends the output the runtime keeps of the instance (stdout and
    /// stderr) to `out`, in pieces of at most [`MAX_LOG_CHUNK`] bytes: its
    /// last `options.tail_lines` lines, then, with `options.follow`, new
    /// output until the instance exits. Returns once that is sent, or as soon
    /// as `out`'s receiver is gone. Reading output is not an operation on the
    /// replica: it may run beside a start or stop of it, and then ends or
    /// fails like any read of a vanishing instance. Drivers without
    /// [`Capabilities::logs`] keep the default, which says so.
    fn logs(
        &self,
        handle: &Handle,
        options: LogOptions,
        out: mpsc::Sender<Vec<u8>>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send {
        let _ = (handle, options, out);
        let driver = self.kind();
        async move {
            Err(DriverError::Unsupported {
                driver,
                operation: "logs",
            })
        }
    }
}

/// Test helpers shared by the drivers' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::{Driver, DriverError, Handle, LogOptions, MAX_LOG_CHUNK};

    /// Everything `logs` sends, once it returns (within `limit`), as text.
    pub(crate) async fn read_logs<D: Driver>(
        driver: &D,
        handle: &Handle,
        options: LogOptions,
        limit: Duration,
    ) -> Result<String, DriverError> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let collect = async move {
            let mut all = Vec::new();
            while let Some(piece) = rx.recv().await {
                assert!(piece.len() <= MAX_LOG_CHUNK);
                all.extend(piece);
            }
            all
        };
        let read = tokio::time::timeout(limit, async {
            tokio::join!(driver.logs(handle, options, tx), collect)
        });
        let (result, all) = read.await.expect("logs returned");
        result.map(|()| String::from_utf8_lossy(&all).into_owned())
    }
}
