//! The skymirror agent: runs one provider's replicas through a driver.
//!
//! Layout: [`session`] holds the gRPC stream to the daemon and reconnects;
//! [`supervisor`] owns the replicas and converges them to the last assignment;
//! [`driver`] is the runtime extension point ([`driver::process`],
//! `driver::docker` with the default `docker` feature and
//! `driver::kubernetes` with the default `kubernetes` feature);
//! [`health`] runs the app's checks; [`logs`] answers requests for replica
//! output; [`state`] persists what must survive a restart, in [`checked`]
//! files (a version and a checksum, so damage is seen); [`convert`] turns
//! wire assignments into the agent's own types (and the driver's capabilities
//! into the hello's); [`random`] draws ids and jitter from the OS CSPRNG.
//!
//! Data flow: daemon → assignment → session → supervisor (persist, plan,
//! driver start/stop) → status board → session → daemon. Output: daemon →
//! request → session → supervisor (which replicas, which handles) → a reading
//! task → session → daemon.

pub mod checked;
pub mod convert;
pub mod driver;
pub mod health;
pub mod logs;
pub mod random;
pub mod session;
pub mod state;
pub mod supervisor;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::driver::Driver;
use crate::driver::process::{ProcessDriver, ProcessDriverConfig};
use crate::state::StateDir;
use crate::supervisor::{Supervisor, SupervisorConfig};

/// Which runtime the agent drives, with its settings.
#[derive(Debug, Clone)]
pub enum DriverConfig {
    /// Local child processes.
    Process {
        /// Extra directories searched for commands.
        search_path: Vec<PathBuf>,
        /// Host replicas bind and are reported at.
        bind_host: IpAddr,
    },
    /// Docker containers, through the engine of `DOCKER_HOST` (or the default
    /// socket). The provider's `spec.docker` settings override both fields.
    #[cfg(feature = "docker")]
    Docker {
        /// Host address container ports are published on and reported at.
        bind_host: IpAddr,
        /// Docker network replicas join instead of publishing ports; they are
        /// then reached at their address on it.
        network: Option<String>,
    },
    /// Kubernetes pods, through the API server of a kubeconfig (or of the
    /// cluster the agent runs in). The provider's `spec.kubernetes` settings
    /// override the context and the namespace.
    #[cfg(feature = "kubernetes")]
    Kubernetes {
        /// kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, or the
        /// in-cluster configuration.
        kubeconfig: Option<PathBuf>,
        /// kubeconfig context; `None`: the current one.
        context: Option<String>,
        /// Namespace of the replicas; `None`: the context's (in a pod, its own).
        namespace: Option<String>,
    },
}

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Daemon URL.
    pub server: String,
    /// Provider this agent runs.
    pub provider: String,
    /// Directory for persistent state.
    pub state_dir: PathBuf,
    /// Join token for the daemon.
    pub join_token: String,
    /// Runtime.
    pub driver: DriverConfig,
    /// Stop every replica when the agent stops (all-in-one mode); otherwise
    /// replicas keep running, and the next agent run adopts them.
    pub stop_replicas_on_exit: bool,
    /// Supervisor tunables.
    pub supervisor: SupervisorConfig,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// State directory problem. Not retryable without operator action.
    #[error("agent state")]
    State(#[from] state::StateError),
    /// The driver could not be set up.
    #[error("driver")]
    Driver(#[from] driver::DriverError),
    /// The OS gave no randomness (for reconnect jitter). Not retryable.
    #[error("session with the daemon")]
    Randomness(#[from] random::NoRandomness),
}

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    match &config.driver {
        DriverConfig::Process {
            search_path,
            bind_host,
        } => {
            let mut dc = ProcessDriverConfig::new(&config.state_dir);
            dc.search_path = search_path.clone();
            dc.bind_host = *bind_host;
            let mut config = config.clone();
            config.supervisor.probe_host = Some(*bind_host);
            run_with_driver(ProcessDriver::new(dc)?, config, shutdown).await
        }
        #[cfg(feature = "docker")]
        DriverConfig::Docker { bind_host, network } => {
            let dc = driver::docker::DockerDriverConfig {
                bind_host: *bind_host,
                network: network.clone(),
                ..Default::default()
            };
            let driver = driver::docker::DockerDriver::connect(dc).await?;
            let mut config = config.clone();
            // Probes go to each replica's reported address: its host ports on
            // the bind host, or its own address on a network — whichever the
            // flags or the provider's settings gave it when it started.
            config.supervisor.probe_host = None;
            run_with_driver(driver, config, shutdown).await
        }
        #[cfg(feature = "kubernetes")]
        DriverConfig::Kubernetes {
            kubeconfig,
            context,
            namespace,
        } => {
            let dc = driver::kubernetes::KubernetesDriverConfig {
                kubeconfig: kubeconfig.clone(),
                context: context.clone(),
                namespace: namespace.clone(),
                ..Default::default()
            };
            let driver = driver::kubernetes::KubernetesDriver::connect(dc).await?;
            let mut config = config.clone();
            // Probes go to each replica's reported address: its pod's, or
            // its app's Service's.
            config.supervisor.probe_host = None;
            run_with_driver(driver, config, shutdown).await
        }
    }
}

/// Runs an agent with a ready driver until `shutdown` is cancelled.
pub async fn run_with_driver<D: Driver>(
    driver: D,
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let state = StateDir::open(&config.state_dir)?;
    let agent_id = state.agent_id()?;
    let kind = driver.kind();
    let capabilities = driver.capabilities();
    let span = tracing::info_span!("agent", provider = %config.provider);
    let _enter = span.enter();
    let (sup, handle) = Supervisor::restore(
        Arc::new(driver),
        config.provider.clone(),
        state,
        config.supervisor.clone(),
    )
    .await?;
    drop(_enter);
    let sup_stop = CancellationToken::new();
    let supervisor = tokio::spawn(sup.run(sup_stop.clone(), config.stop_replicas_on_exit));
    let identity = session::Identity {
        server: config.server.clone(),
        provider: config.provider.clone(),
        agent_id,
        join_token: config.join_token.clone(),
        driver: kind.to_string(),
        capabilities,
    };
    let ended = session::run(identity, handle, shutdown.clone()).await;
    sup_stop.cancel();
    // The supervisor persists its state on the way out; wait for it.
    let _ = supervisor.await;
    Ok(ended?)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // Without a SIGTERM handler, Ctrl-C alone still stops cleanly.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
