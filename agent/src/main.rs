//! `skymirror-agent`: parses flags, sets up logging and runs the agent library.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use skymirror_agent::{AgentConfig, DriverConfig, run, supervisor::SupervisorConfig};
use tokio_util::sync::CancellationToken;

/// Runs one provider's replicas for a skymirror daemon.
#[derive(Debug, Parser)]
#[command(name = "skymirror-agent", version)]
struct Args {
    /// Daemon URL.
    #[arg(
        long,
        env = "SKYMIRROR_SERVER",
        default_value = "http://127.0.0.1:7600"
    )]
    server: String,
    /// Provider this agent runs (must be declared on the daemon).
    #[arg(long, env = "SKYMIRROR_PROVIDER")]
    provider: String,
    /// Driver: `process`, `docker` (containers through the engine of
    /// `DOCKER_HOST`, default unix:///var/run/docker.sock; logs: `docker logs
    /// skymirror-<provider>-<app>-<index>`), or `kubernetes` (pods through
    /// the API server of the kubeconfig, or of the cluster the agent runs
    /// in; logs: `kubectl logs skymirror-<provider>-<app>-<index>`).
    #[arg(long, default_value = "process")]
    driver: String,
    /// Directory for the agent's persistent state and replica files.
    #[arg(long, env = "SKYMIRROR_STATE_DIR")]
    state_dir: PathBuf,
    /// Join token (or set SKYMIRROR_JOIN_TOKEN, or use --join-token-file).
    #[arg(long, env = "SKYMIRROR_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// File holding the join token.
    #[arg(long, conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// Extra directory searched for app commands (repeatable).
    #[arg(long = "search-path")]
    search_path: Vec<PathBuf>,
    /// Host replicas bind (process driver) or container ports are published
    /// on (docker driver), and where they are reported at. The provider's
    /// `spec.docker.bindHost` overrides it for containers.
    #[arg(long, default_value = "127.0.0.1")]
    bind_host: IpAddr,
    /// Docker driver: containers join this Docker network and are reached at
    /// their address on it, instead of publishing ports on --bind-host. A
    /// provider with a `spec.docker` block decides instead (its `network`).
    #[arg(long, env = "SKYMIRROR_DOCKER_NETWORK")]
    docker_network: Option<String>,
    /// Kubernetes driver: the kubeconfig file (default: `KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster configuration of the agent's pod).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes driver: the kubeconfig context (default: the current one).
    /// A provider's `spec.kubernetes.context` decides instead.
    #[arg(long, env = "SKYMIRROR_KUBE_CONTEXT")]
    kube_context: Option<String>,
    /// Kubernetes driver: the namespace of the replicas (default: the
    /// context's, or the agent's own in a pod). A provider's
    /// `spec.kubernetes.namespace` decides instead.
    #[arg(long, env = "SKYMIRROR_KUBE_NAMESPACE")]
    kube_namespace: Option<String>,
    /// Log filter, e.g. `info` or `skymirror_agent=debug`.
    #[arg(long, env = "SKYMIRROR_LOG", default_value = "info")]
    log: String,
}

/// The drivers this build has, for the error on an unknown `--driver`.
const DRIVERS: &str = match (cfg!(feature = "docker"), cfg!(feature = "kubernetes")) {
    (true, true) => "process, docker, kubernetes",
    (true, false) => "process, docker",
    (false, true) => "process, kubernetes",
    (false, false) => "process",
};

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("skymirror-agent: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter: tracing_subscriber::filter::Targets = args.log.parse().context("--log")?;
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let join_token = match (args.join_token, args.join_token_file) {
        (Some(t), _) => t,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading the join token from {}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!(
            "a join token is needed: --join-token, SKYMIRROR_JOIN_TOKEN or --join-token-file"
        ),
    };
    if args.docker_network.is_some() && args.driver != "docker" {
        anyhow::bail!(
            "--docker-network is for --driver docker, not {}",
            args.driver
        );
    }
    let kube_flags = [
        ("--kubeconfig", args.kubeconfig.is_some()),
        ("--kube-context", args.kube_context.is_some()),
        ("--kube-namespace", args.kube_namespace.is_some()),
    ];
    if let Some((flag, _)) = kube_flags.iter().find(|(_, given)| *given)
        && args.driver != "kubernetes"
    {
        anyhow::bail!("{flag} is for --driver kubernetes, not {}", args.driver);
    }
    let driver = match args.driver.as_str() {
        "process" => DriverConfig::Process {
            search_path: args.search_path,
            bind_host: args.bind_host,
        },
        #[cfg(feature = "docker")]
        "docker" => DriverConfig::Docker {
            bind_host: args.bind_host,
            network: args.docker_network,
        },
        #[cfg(feature = "kubernetes")]
        "kubernetes" => DriverConfig::Kubernetes {
            kubeconfig: args.kubeconfig,
            context: args.kube_context,
            namespace: args.kube_namespace,
        },
        other => anyhow::bail!("unknown driver {other:?}; this build supports: {DRIVERS}"),
    };
    let config = AgentConfig {
        server: args.server,
        provider: args.provider,
        state_dir: args.state_dir,
        join_token,
        driver,
        stop_replicas_on_exit: false,
        supervisor: SupervisorConfig::default(),
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        // Replicas keep running: the next agent run adopts them.
        skymirror_agent::shutdown_signal().await;
        signal.cancel();
    });
    run(config, shutdown).await?;
    Ok(())
}
