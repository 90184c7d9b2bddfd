//! The `docker` driver: runs each replica as a Docker container, through the
//! Docker Engine API (bollard, over the unix socket named by `DOCKER_HOST`, or
//! `/var/run/docker.sock`).
//!
//! A replica is one container named `skymirror-<provider>-<app>-<index>`, created
//! from the app's `image` with its environment, command and arguments, resource
//! limits, and labels that say whose it is:
//!
//! | label | value |
//! |---|---|
//! | `skymirror.managed` | `true` |
//! | `skymirror.provider` | the agent's provider |
//! | `skymirror.app` | the app |
//! | `skymirror.index` | the replica's index |
//! | `skymirror.workload-generation` | the workload generation it runs |
//!
//! Addresses. By default every named port is published on
//! `bind_host:<free host port>`; the host ports are the replica's address, where
//! the agent's health probes and the front door connect. Inside the container
//! the app listens on the port's `containerPort`, or, when the spec gives none,
//! on the same number as the host port; `PORT` and `PORT_<NAME>` say which.
//!
//! With a `network` (`skymirror-agent --docker-network NAME`), containers join
//! that Docker network instead and publish nothing: the replica's address is the
//! container's IP on the network and the container port. That is how a provider
//! whose replicas live on a private network (a cloud's VPC; the lab's per-cloud
//! networks) is run: the agent, the front door and the daemon's outside probes
//! reach the replicas over that network.
//!
//! The provider's `spec.docker` settings ([`Driver::configure`]) override both
//! flags: `network` (empty: publish ports) and `bindHost`. A change applies to
//! containers started afterwards; running ones keep the address they have
//! until they are replaced for another reason, so new settings never restart
//! anything by themselves.
//!
//! The handle's instance id is the container id, so an agent restart adopts the
//! same containers ([`Driver::recover`]); [`Driver::list_instances`] finds the
//! provider's containers by label, so the agent removes those it does not hold.
//! The labels do not say which published port is which named port, so a
//! listed container is for removal only: an agent that lost its
//! `replicas.json` replaces its containers (never leaving one beside its
//! replacement) instead of adopting them.
//!
//! Invariant: Docker never restarts a replica (restart policy `no`): a crashed
//! container stays exited until the supervisor restarts it with backoff, so the
//! agent stays the one source of truth.
//!
//! Logs: the container keeps the replica's output (Docker's log driver);
//! [`Driver::logs`] reads it through the Engine API, as
//! `docker logs skymirror-<provider>-<app>-<index>` shows it, also after a
//! crash, until the replica is started again or removed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerState, ContainerStateStatusEnum, ContainerSummary,
    ContainerSummaryHealthStatusEnum, ContainerSummaryStateEnum, HealthStatusEnum, HostConfig,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{
    Capabilities, Driver, DriverError, DriverSettings, Handle, Inspection, Listed, ListedReplica,
    LogOptions, MAX_LOG_CHUNK, ReplicaKey, ReplicaSpec, RuntimeHealth,
};

/// Driver kind stored in every handle this driver makes.
const KIND: &str = "docker";
/// Where the engine is when neither the config nor `DOCKER_HOST` says.
const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long the agent waits for the engine to answer at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an image pull may take before the replica is reported failed.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Added to a stop's grace for the request timeout: `stop` answers only once
/// the container is gone, up to `grace` plus the time a SIGKILL takes.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// Label every container of this driver carries.
const LABEL_MANAGED: &str = "skymirror.managed";
/// Label with the provider the container runs for.
const LABEL_PROVIDER: &str = "skymirror.provider";
/// Label with the app of the replica.
const LABEL_APP: &str = "skymirror.app";
/// Label with the index of the replica.
const LABEL_INDEX: &str = "skymirror.index";
/// Label with the workload generation the container runs.
const LABEL_GENERATION: &str = "skymirror.workload-generation";
/// Operations at once: the engine serialises much of its work, so more
/// concurrent creates and removals only queue inside it.
const MAX_OPERATIONS: u32 = 32;
/// Inspection period: one list of the engine's containers per pass.
const INSPECT_INTERVAL: Duration = Duration::from_millis(250);
/// Beyond the grace, a stop takes up to a second of rounding (the engine
/// takes whole seconds) and the engine's SIGKILL and its wait for the exit.
/// (`STOP_SLACK` bounds the request, not the container's life.)
const STOP_OVERHEAD: Duration = Duration::from_secs(3);

/// Settings of a [`DockerDriver`].
#[derive(Debug, Clone)]
pub struct DockerDriverConfig {
    /// Engine address, `unix:///path`; `None` means `DOCKER_HOST`, else
    /// `unix:///var/run/docker.sock`.
    pub docker_host: Option<String>,
    /// Host address ports are published on and replicas are reported at.
    pub bind_host: IpAddr,
    /// Docker network the containers join; `None` publishes ports on
    /// `bind_host` instead (see the module docs).
    pub network: Option<String>,
}

impl Default for DockerDriverConfig {
    /// The engine of `DOCKER_HOST` (or the default socket), ports on 127.0.0.1.
    fn default() -> Self {
        DockerDriverConfig {
            docker_host: None,
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            network: None,
        }
    }
}

/// Runs replicas as Docker containers. See the module docs.
#[derive(Debug)]
pub struct DockerDriver {
    /// The engine client; cheap to clone (one shared connection pool).
    docker: Docker,
    /// The engine address, for messages that must say which engine failed.
    host: String,
    /// Where containers are reached by the agent's flags, which apply while
    /// the provider has no settings.
    flags: Addressing,
    /// Where new containers are reached now: the flags, or the provider's
    /// settings. Each start reads it once, so a change never splits one.
    addressing: Mutex<Addressing>,
}

/// Where a container is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addressing {
    /// Host address ports are published on.
    bind_host: IpAddr,
    /// Network the containers join instead of publishing ports.
    network: Option<String>,
}

/// What the driver keeps in [`Handle::data`]; the container id is the handle's
/// `instance_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DockerData {
    /// Container name, for messages and `docker logs`.
    name: String,
    /// Image the container was created from.
    image: String,
}

impl DockerDriver {
    /// Connects to the engine and checks that it answers, agreeing on an API
    /// version both sides speak (older engines answer only older versions).
    pub async fn connect(config: DockerDriverConfig) -> Result<Self, DriverError> {
        let host = config
            .docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        let unreachable = |reason: String| {
            DriverError::Runtime(format!(
                "cannot reach the Docker engine at {host}: {reason}; is the Docker daemon running?"
            ))
        };
        if !host.starts_with("unix://") {
            return Err(DriverError::Runtime(format!(
                "Docker engine at {host}: the docker driver reaches the engine over a unix socket \
                 only (DOCKER_HOST=unix:///path)"
            )));
        }
        let docker = Docker::connect_with_host(&host).map_err(|e| unreachable(e.to_string()))?;
        let docker = match tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await {
            Ok(Ok(docker)) => docker,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        tracing::info!(host = %host, api = %docker.client_version(), "connected to the Docker engine");
        if let Some(network) = &config.network {
            check_network(&docker, network).await.map_err(|e| match e {
                NetworkProblem::Unusable(reason) => DriverError::Runtime(reason),
                NetworkProblem::Engine(e) => unreachable(e.to_string()),
            })?;
        }
        let flags = Addressing {
            bind_host: config.bind_host,
            network: config.network,
        };
        Ok(DockerDriver {
            docker,
            host,
            addressing: Mutex::new(flags.clone()),
            flags,
        })
    }

    /// Where new containers are reached now.
    fn addressing(&self) -> Addressing {
        self.addressing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An engine failure as a retryable driver error. Transport failures name
    /// the engine, since the usual cause is that it stopped.
    fn engine_error(&self, context: &str, e: &EngineError) -> DriverError {
        match e {
            EngineError::HyperLegacyError { .. }
            | EngineError::HyperResponseError { .. }
            | EngineError::IOError { .. }
            | EngineError::RequestTimeoutError
            | EngineError::SocketNotFoundError(_) => DriverError::Runtime(format!(
                "{context}: {e} (Docker engine at {}; is the Docker daemon running?)",
                self.host
            )),
            _ => DriverError::Runtime(format!("{context}: {}", engine_message(e))),
        }
    }

    /// Removes a container and its anonymous volumes, whatever its state;
    /// a container that is already gone (or going) is fine.
    async fn remove(&self, id: &str, name: &str) -> Result<(), DriverError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            // 409: removal already in progress.
            Err(e) if status(&e) == Some(409) => Ok(()),
            Err(e) => Err(self.engine_error(&format!("remove container {name}"), &e)),
        }
    }

    /// Removes a container left under the replica's name by an earlier
    /// instance. The supervisor starts a replica only when it holds no running
    /// instance of it (a replaced or crashed instance is stopped, not removed,
    /// so its logs stay readable until now), so such a container is stale. One
    /// with the name but not the replica's labels is someone else's: it is
    /// left alone and the start fails.
    async fn remove_stale(&self, name: &str, spec: &ReplicaSpec) -> Result<(), DriverError> {
        let existing = match self.docker.inspect_container(name, None).await {
            Ok(c) => c,
            Err(e) if status(&e) == Some(404) => return Ok(()),
            Err(e) => return Err(self.engine_error(&format!("inspect container {name}"), &e)),
        };
        let id = existing.id.unwrap_or_else(|| name.to_string());
        let labels = existing.config.and_then(|c| c.labels).unwrap_or_default();
        let ours = labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
            && labels.get(LABEL_PROVIDER) == Some(&spec.provider)
            && labels.get(LABEL_APP) == Some(&spec.key.app)
            && labels.get(LABEL_INDEX) == Some(&spec.key.index.to_string());
        if !ours {
            return Err(DriverError::Runtime(format!(
                "container name {name} is taken by container {id}, which is not replica {} of \
                 provider {}; remove or rename that container",
                spec.key, spec.provider
            )));
        }
        tracing::info!(replica = %spec.key, container = %id, "removing the replica's stale container");
        self.remove(&id, name).await
    }

    /// Pulls `image`; any failure (unknown image, no registry, timeout) is
    /// final until the spec changes, so it is an invalid workload.
    async fn pull(&self, image: &str) -> Result<(), DriverError> {
        let failed = |reason: String| {
            DriverError::InvalidWorkload(format!(
                "image {image} not found locally and could not be pulled: {reason}"
            ))
        };
        tracing::info!(%image, "image not found locally; pulling it");
        let options = CreateImageOptionsBuilder::new()
            .from_image(&pull_reference(image))
            .build();
        let pull = async {
            let stream = self.docker.create_image(Some(options), None, None);
            let mut stream = std::pin::pin!(stream);
            while let Some(progress) = stream.next().await {
                progress.map_err(|e| failed(engine_message(&e)))?;
            }
            Ok(())
        };
        match tokio::time::timeout(PULL_TIMEOUT, pull).await {
            Ok(result) => result,
            Err(_) => Err(failed(format!("no result within {PULL_TIMEOUT:?}"))),
        }
    }

    /// The container's address on `network`.
    async fn network_ip(&self, id: &str, name: &str, network: &str) -> Result<IpAddr, DriverError> {
        let inspected = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| self.engine_error(&format!("inspect container {name}"), &e))?;
        let networks = inspected
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default();
        // Keyed by name; a network given by id matches its endpoint's id.
        let endpoint = networks.get(network).or_else(|| {
            networks.values().find(|e| {
                e.network_id
                    .as_deref()
                    .is_some_and(|n| n.starts_with(network))
            })
        });
        let ip = endpoint
            .and_then(|e| e.ip_address.as_deref())
            .filter(|ip| !ip.is_empty());
        match ip.map(str::parse::<IpAddr>) {
            Some(Ok(ip)) => Ok(ip),
            Some(Err(e)) => Err(DriverError::Runtime(format!(
                "container {name}: bad address on network {network}: {e}"
            ))),
            None => Err(DriverError::Runtime(format!(
                "container {name} has no address on network {network}"
            ))),
        }
    }

    /// Reads the container's state; a container that is gone has exited.
    async fn state(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        let data = decode(handle)?;
        match self
            .docker
            .inspect_container(&handle.instance_id, None)
            .await
        {
            Ok(c) => Ok(inspection_of(c.state.as_ref(), &data.name)),
            Err(e) if status(&e) == Some(404) => Ok(Inspection::Exited {
                code: None,
                signal: None,
            }),
            Err(e) => Err(self.engine_error(&format!("inspect container {}", data.name), &e)),
        }
    }
}

impl Driver for DockerDriver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            recover: true,
            exec: true,
            logs: true,
            max_concurrent_operations: MAX_OPERATIONS,
            inspect_interval: INSPECT_INTERVAL,
            stop_overhead: STOP_OVERHEAD,
            runtime_restarts: false,
        }
    }

    /// `spec.docker` overrides the flags; a network must exist and give
    /// containers an address of their own, as for `--docker-network`.
    async fn configure(&self, settings: &DriverSettings) -> Result<(), DriverError> {
        let next = match settings {
            DriverSettings::Unset => self.flags.clone(),
            DriverSettings::Docker(d) => Addressing {
                bind_host: d.bind_host.unwrap_or(self.flags.bind_host),
                network: d.network.clone(),
            },
            other => {
                return Err(DriverError::InvalidSettings(format!(
                    "settings of the {} driver given to the {KIND} driver",
                    other.kind().unwrap_or("unknown")
                )));
            }
        };
        if let Some(network) = &next.network {
            check_network(&self.docker, network)
                .await
                .map_err(|e| match e {
                    NetworkProblem::Unusable(reason) => {
                        DriverError::InvalidSettings(format!("spec.docker.network: {reason}"))
                    }
                    NetworkProblem::Engine(e) => {
                        self.engine_error(&format!("inspect Docker network {network}"), &e)
                    }
                })?;
        }
        let mut current = self
            .addressing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != next {
            tracing::info!(bind_host = %next.bind_host, network = ?next.network,
                "containers started from now on use the provider's new settings");
            *current = next;
        }
        Ok(())
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<Handle, DriverError> {
        let key = &spec.key;
        let workload = &spec.workload;
        let image = workload
            .image
            .as_deref()
            .filter(|i| !i.trim().is_empty())
            .ok_or_else(|| {
                DriverError::InvalidWorkload(format!(
                    "app {}: the docker driver needs `image`",
                    key.app
                ))
            })?;
        let name = container_name(&spec.provider, key)?;
        let Addressing { bind_host, network } = self.addressing();

        let ports = pick_ports(bind_host, workload)?;
        let mut exposed = Vec::with_capacity(ports.len());
        let mut bindings = HashMap::with_capacity(ports.len());
        for p in &ports {
            let inside = format!("{}/{}", p.container, p.protocol);
            // On a network, replicas are reached at their own address: nothing
            // is published on the host.
            let binding = PortBinding {
                host_ip: Some(bind_host.to_string()),
                host_port: Some(p.host.to_string()),
            };
            let binding = Some(binding).filter(|_| network.is_none());
            if bindings
                .insert(inside.clone(), binding.map(|b| vec![b]))
                .is_some()
            {
                return Err(DriverError::InvalidWorkload(format!(
                    "app {}: two ports use container port {inside}",
                    key.app
                )));
            }
            exposed.push(inside);
        }

        let (entrypoint, cmd) = match &workload.command {
            Some(command) => (
                Some(vec![command.clone()]),
                Some(workload.args.clone()).filter(|a| !a.is_empty()),
            ),
            None => (None, Some(workload.args.clone()).filter(|a| !a.is_empty())),
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_PROVIDER.to_string(), spec.provider.clone()),
            (LABEL_APP.to_string(), key.app.clone()),
            (LABEL_INDEX.to_string(), key.index.to_string()),
            (
                LABEL_GENERATION.to_string(),
                spec.workload_generation.to_string(),
            ),
        ]);
        let host_config = HostConfig {
            port_bindings: Some(bindings).filter(|_| network.is_none()),
            network_mode: network.clone(),
            nano_cpus: workload
                .cpu_millis
                .map(|m| i64::from(m).saturating_mul(1_000_000)),
            memory: workload
                .memory_mib
                .map(|m| i64::from(m).saturating_mul(1024 * 1024)),
            // The supervisor restarts crashed replicas, with backoff.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            // A tiny init as pid 1 forwards the stop signal and reaps zombies:
            // an app without a SIGTERM handler would otherwise ignore it as pid
            // 1 and be killed only when the grace runs out.
            init: Some(true),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint,
            cmd,
            env: Some(
                replica_env(spec, &ports)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            exposed_ports: Some(exposed),
            working_dir: workload
                .working_dir
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned()),
            labels: Some(labels),
            // So a `docker stop` by hand gives the app its grace too.
            stop_timeout: Some(grace_seconds(workload.stop_grace).into()),
            host_config: Some(host_config),
            ..Default::default()
        };

        let create = || {
            let options = CreateContainerOptionsBuilder::new().name(&name).build();
            self.docker.create_container(Some(options), body.clone())
        };
        let mut created = create().await;
        // 409: the name is taken, usually by an earlier instance of this
        // replica. Looking only now saves a round trip on every start.
        if matches!(&created, Err(e) if status(e) == Some(409)) {
            self.remove_stale(&name, spec).await?;
            created = create().await;
        }
        let created = match created {
            Err(e) if status(&e) == Some(404) => {
                self.pull(image).await?;
                create().await
            }
            other => other,
        };
        let id = match created {
            Ok(created) => created.id,
            Err(e) if status(&e) == Some(404) => {
                return Err(DriverError::InvalidWorkload(format!(
                    "image {image} not found locally and could not be pulled: {}",
                    engine_message(&e)
                )));
            }
            // A bad parameter (a memory limit below the engine's minimum, ...):
            // the same spec gets the same answer.
            Err(e) if status(&e) == Some(400) => {
                return Err(DriverError::InvalidWorkload(format!(
                    "app {}: the Docker engine refused container {name}: {}",
                    key.app,
                    engine_message(&e)
                )));
            }
            Err(e) => {
                return Err(self.engine_error(&format!("create container {name}"), &e));
            }
        };
        if let Err(e) = self.docker.start_container(&id, None).await {
            let err = match status(&e) {
                // The runtime cannot run it (no such entrypoint, ...); a port
                // taken meanwhile is a 500, retried with new ports.
                Some(400) => DriverError::InvalidWorkload(format!(
                    "app {}: container {name} cannot start: {}",
                    key.app,
                    engine_message(&e)
                )),
                _ => self.engine_error(&format!("start container {name}"), &e),
            };
            // A container that never ran holds nothing worth keeping.
            if let Err(cleanup) = self.remove(&id, &name).await {
                tracing::warn!(container = %name, error = %cleanup, "cannot remove a container that failed to start");
            }
            return Err(err);
        }
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        // Where the replica is reached: its published host ports, or its own
        // address on the network and the container ports.
        let (ip, ports): (IpAddr, BTreeMap<String, u16>) = match &network {
            None => (
                bind_host,
                ports.into_iter().map(|p| (p.name, p.host)).collect(),
            ),
            Some(network) => match self.network_ip(&id, &name, network).await {
                Ok(ip) => (
                    ip,
                    ports.into_iter().map(|p| (p.name, p.container)).collect(),
                ),
                Err(e) => {
                    if let Err(cleanup) = self.remove(&id, &name).await {
                        tracing::warn!(container = %name, error = %cleanup, "cannot remove a container without an address");
                    }
                    return Err(e);
                }
            },
        };
        tracing::info!(replica = %key, container = %id, %name, %image, %ip, "container started");

        let data = DockerData {
            name,
            image: image.to_string(),
        };
        Ok(Handle {
            driver: KIND.to_string(),
            instance_id: id,
            address: workload
                .ports
                .first()
                .and_then(|p| ports.get(&p.name))
                .map(|port| SocketAddr::new(ip, *port).to_string()),
            ports,
            started_at_ms,
            data: serde_json::to_value(&data)
                .map_err(|e| DriverError::Runtime(format!("encode handle data: {e}")))?,
        })
    }

    async fn recover(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        self.state(handle).await
    }

    async fn inspect(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        self.state(handle).await
    }

    /// One list of the engine's skymirror containers answers for every
    /// running one; only a container that stopped is inspected on its own,
    /// for its exit code.
    async fn inspect_all(&self, handles: &[Handle]) -> Vec<Result<Inspection, DriverError>> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_MANAGED}=true")])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let listed: HashMap<String, ContainerSummary> =
            match self.docker.list_containers(Some(options)).await {
                Ok(containers) => containers
                    .into_iter()
                    .filter_map(|c| Some((c.id.clone()?, c)))
                    .collect(),
                Err(e) => {
                    let e = self.engine_error("list containers", &e);
                    return handles
                        .iter()
                        .map(|_| Err(DriverError::Runtime(e.to_string())))
                        .collect();
                }
            };
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            let result = match listed.get(&handle.instance_id).and_then(running_summary) {
                Some(running) => decode(handle).map(|_| running),
                // Stopped, or gone (which `state` reads as exited).
                None => self.state(handle).await,
            };
            out.push(result);
        }
        out
    }

    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let options = StopContainerOptionsBuilder::new()
            .t(grace_seconds(grace))
            .build();
        // The engine answers once the container is gone, which may be after
        // the client's usual request timeout.
        let docker = self
            .docker
            .clone()
            .with_timeout(grace.saturating_add(STOP_SLACK));
        match docker
            .stop_container(&handle.instance_id, Some(options))
            .await
        {
            // 304: it was not running.
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.engine_error(&format!("stop container {}", data.name), &e)),
        }
    }

    async fn destroy(&self, handle: &Handle) -> Result<(), DriverError> {
        let data = decode(handle)?;
        self.remove(&handle.instance_id, &data.name).await
    }

    /// Runs `command` with `docker exec` semantics. On timeout the command is
    /// abandoned, not killed: the Engine API cannot signal an exec'd process,
    /// so it ends with the container or by itself.
    async fn exec(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> Result<Option<i32>, DriverError> {
        let data = decode(handle)?;
        if command.is_empty() {
            return Err(DriverError::InvalidWorkload("exec: empty command".into()));
        }
        let what = format!("exec `{}` in container {}", command.join(" "), data.name);
        let run = async {
            let options = CreateExecOptions {
                cmd: Some(command.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            };
            let exec = self
                .docker
                .create_exec(&handle.instance_id, options)
                .await
                .map_err(|e| self.engine_error(&what, &e))?;
            // Attached, the output stream ends when the command does; the
            // output itself is not wanted.
            if let StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| self.engine_error(&what, &e))?
            {
                while let Some(chunk) = output.next().await {
                    chunk.map_err(|e| self.engine_error(&what, &e))?;
                }
            }
            // The exit code is recorded a moment after the streams close.
            loop {
                let inspected = self
                    .docker
                    .inspect_exec(&exec.id)
                    .await
                    .map_err(|e| self.engine_error(&what, &e))?;
                if inspected.running != Some(true) {
                    let code = inspected.exit_code.unwrap_or(-1);
                    return Ok(i32::try_from(code).unwrap_or(-1));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The provider's containers by label, each with the replica its labels
    /// name. For removal only: the labels do not say which named port each
    /// published port is, so a listed container's handle lacks the address a
    /// start reports (without `replicas.json`, the agent replaces them).
    async fn list_instances(&self, provider: &str) -> Result<Vec<Listed>, DriverError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_PROVIDER}={provider}"),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| {
                self.engine_error(&format!("list the containers of provider {provider}"), &e)
            })?;
        containers
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_else(|| id.clone());
                let labels = c.labels.unwrap_or_default();
                let replica = (|| {
                    Some(ListedReplica {
                        key: ReplicaKey {
                            app: labels.get(LABEL_APP)?.clone(),
                            index: labels.get(LABEL_INDEX)?.parse().ok()?,
                        },
                        workload_generation: labels.get(LABEL_GENERATION)?.parse().ok()?,
                    })
                })();
                let data = DockerData {
                    name,
                    image: c.image.unwrap_or_default(),
                };
                Some((id, c.created.unwrap_or(0), data, replica))
            })
            .map(|(id, created, data, replica)| {
                Ok(Listed {
                    handle: Handle {
                        driver: KIND.to_string(),
                        instance_id: id,
                        address: None,
                        ports: BTreeMap::new(),
                        started_at_ms: created.saturating_mul(1000),
                        data: serde_json::to_value(&data).map_err(|e| {
                            DriverError::Runtime(format!("encode handle data: {e}"))
                        })?,
                    },
                    replica,
                    adoptable: false,
                })
            })
            .collect()
    }

    /// Docker's own `tail` counts lines of stdout and stderr together, and a
    /// followed stream ends when the container stops.
    async fn logs(
        &self,
        handle: &Handle,
        options: LogOptions,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let query = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(options.follow)
            .tail(&options.tail_lines.to_string())
            .build();
        let stream = self.docker.logs(&handle.instance_id, Some(query));
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                _ = out.closed() => return Ok(()),
                next = stream.next() => next,
            };
            let output = match next {
                None => return Ok(()),
                Some(Ok(output)) => output.into_bytes(),
                Some(Err(e)) if status(&e) == Some(404) => {
                    return Err(DriverError::Runtime(format!(
                        "container {} is gone, and its output with it",
                        data.name
                    )));
                }
                Some(Err(e)) => {
                    return Err(
                        self.engine_error(&format!("read the logs of container {}", data.name), &e)
                    );
                }
            };
            for piece in output.chunks(MAX_LOG_CHUNK) {
                if out.send(piece.to_vec()).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Why a network cannot take replicas.
#[derive(Debug)]
enum NetworkProblem {
    /// It does not exist, or gives containers no address of their own.
    Unusable(String),
    /// The engine failed to answer.
    Engine(EngineError),
}

/// Checks that replicas can join `network`: it exists and gives each
/// container an address of its own (`host` and `none` do not).
async fn check_network(docker: &Docker, network: &str) -> Result<(), NetworkProblem> {
    let unaddressed = || {
        NetworkProblem::Unusable(format!(
            "Docker network {network} gives containers no address of their own; \
             name a bridge or overlay network"
        ))
    };
    if matches!(network, "host" | "none") {
        return Err(unaddressed());
    }
    match docker.inspect_network(network, None).await {
        Ok(n) if matches!(n.driver.as_deref(), Some("host" | "null")) => Err(unaddressed()),
        Ok(_) => Ok(()),
        Err(e) if status(&e) == Some(404) => Err(NetworkProblem::Unusable(format!(
            "Docker network {network} does not exist (docker network create {network})"
        ))),
        Err(e) => Err(NetworkProblem::Engine(e)),
    }
}

/// One published port of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PublishedPort {
    /// Port name from the spec.
    name: String,
    /// Port the app listens on inside the container.
    container: u16,
    /// Port on `bind_host` that Docker forwards to it.
    host: u16,
    /// `tcp` or `udp`.
    protocol: &'static str,
}

/// Free host ports for the workload's named ports. A port without a
/// container port listens inside on its host port's number.
fn pick_ports(host: IpAddr, workload: &super::Workload) -> Result<Vec<PublishedPort>, DriverError> {
    let picked = super::pick_host_ports(host, workload)?;
    Ok(workload
        .ports
        .iter()
        .zip(picked)
        .map(|(port, (name, number))| PublishedPort {
            name,
            container: port.container_port.unwrap_or(number),
            host: number,
            protocol: if port.protocol.eq_ignore_ascii_case("udp") {
                "udp"
            } else {
                "tcp"
            },
        })
        .collect())
}

/// The replica's environment, with the container-side port numbers.
fn replica_env(spec: &ReplicaSpec, ports: &[PublishedPort]) -> Vec<(String, String)> {
    let numbers: Vec<(String, u16)> = ports
        .iter()
        .map(|p| (p.name.clone(), p.container))
        .collect();
    super::replica_env(spec, &numbers)
}

/// `skymirror-<provider>-<app>-<index>`, if Docker accepts it as a name
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
fn container_name(provider: &str, key: &ReplicaKey) -> Result<String, DriverError> {
    let name = format!("skymirror-{provider}-{}-{}", key.app, key.index);
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(name)
    } else {
        Err(DriverError::InvalidWorkload(format!(
            "app {} on provider {provider}: {name:?} is not a valid container name",
            key.app
        )))
    }
}

/// What a container's state means to the supervisor. A running container's
/// HEALTHCHECK status, when its image has one, comes along as the runtime's
/// own verdict; an `unhealthy` container still runs (the supervisor decides).
fn inspection_of(state: Option<&ContainerState>, name: &str) -> Inspection {
    let Some(state) = state else {
        return Inspection::Exited {
            code: None,
            signal: None,
        };
    };
    let running = match state.status {
        Some(
            ContainerStateStatusEnum::RUNNING
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING
            | ContainerStateStatusEnum::STOPPING,
        ) => true,
        Some(_) => false,
        None => state.running == Some(true),
    };
    if running {
        let health = match state.health.as_ref().and_then(|h| h.status) {
            Some(HealthStatusEnum::STARTING) => Some(RuntimeHealth::Starting),
            Some(HealthStatusEnum::HEALTHY) => Some(RuntimeHealth::Healthy),
            Some(HealthStatusEnum::UNHEALTHY) => {
                tracing::debug!(container = %name, "the image's HEALTHCHECK reports unhealthy");
                Some(RuntimeHealth::Unhealthy)
            }
            // `none` (no HEALTHCHECK, or disabled) and an empty status.
            _ => None,
        };
        return Inspection::Running { health };
    }
    let finished = matches!(
        state.status,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
    );
    Inspection::Exited {
        code: state
            .exit_code
            .filter(|_| finished)
            .and_then(|c| i32::try_from(c).ok()),
        signal: None,
    }
}

/// A listed container's inspection if it runs, with its HEALTHCHECK verdict;
/// `None` if it does not (its exit code needs a full inspection).
fn running_summary(c: &ContainerSummary) -> Option<Inspection> {
    use ContainerSummaryStateEnum as S;
    if !matches!(
        c.state,
        Some(S::RUNNING | S::PAUSED | S::RESTARTING | S::STOPPING)
    ) {
        return None;
    }
    // Engines before API 1.52 give the health only in the status text
    // ("Up 3 seconds (healthy)").
    let health = match c.health.as_ref().and_then(|h| h.status) {
        Some(ContainerSummaryHealthStatusEnum::STARTING) => Some(RuntimeHealth::Starting),
        Some(ContainerSummaryHealthStatusEnum::HEALTHY) => Some(RuntimeHealth::Healthy),
        Some(ContainerSummaryHealthStatusEnum::UNHEALTHY) => Some(RuntimeHealth::Unhealthy),
        _ => match c.status.as_deref() {
            Some(s) if s.ends_with("(health: starting)") => Some(RuntimeHealth::Starting),
            Some(s) if s.ends_with("(unhealthy)") => Some(RuntimeHealth::Unhealthy),
            Some(s) if s.ends_with("(healthy)") => Some(RuntimeHealth::Healthy),
            _ => None,
        },
    };
    Some(Inspection::Running { health })
}

/// The reference to pull: Docker pulls *every* tag of a reference without a
/// tag or digest, so those get `latest`, as `docker pull` does.
fn pull_reference(image: &str) -> String {
    // A registry host may carry a port (`host:5000/app`): a tag is a ':' in
    // the last path component only.
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// A stop grace in whole seconds, rounded up, as the Engine API takes it.
fn grace_seconds(grace: Duration) -> i32 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// The HTTP status of an engine error, if the engine answered with one.
fn status(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// What the engine said, without the client's wrapping.
fn engine_message(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } => message.clone(),
        EngineError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Reads the driver's data out of a handle.
fn decode(handle: &Handle) -> Result<DockerData, DriverError> {
    if handle.driver != KIND {
        return Err(DriverError::Runtime(format!(
            "handle of the {} driver given to the {KIND} driver",
            handle.driver
        )));
    }
    serde_json::from_value(handle.data.clone()).map_err(|e| {
        DriverError::Runtime(format!(
            "handle of container {}: bad data: {e}",
            handle.instance_id
        ))
    })
}

#[cfg(test)]
mod tests {
    //! These run against the real engine and the images that
    //! tests/scripts/build-test-images.sh builds. Without them a test skips,
    //! unless CI=true, where it fails.

    use super::*;
    use crate::driver::{PortSpec, Workload};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// The image the tests run (`skymirror-example` in an empty image).
    const IMAGE: &str = "skymirror-example:test";

    /// Removes every container of a test's provider when the test ends, even
    /// by panicking. Drop cannot await, so it runs on a runtime of its own.
    struct Cleanup(String);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let provider = self.0.clone();
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    let Ok(driver) = DockerDriver::connect(DockerDriverConfig::default()).await
                    else {
                        return;
                    };
                    for listed in driver.list_instances(&provider).await.unwrap_or_default() {
                        let _ = driver.destroy(&listed.handle).await;
                    }
                });
            })
            .join();
        }
    }

    /// A driver on the local engine and a provider name of the test's own
    /// (containers are global to the engine), or `None` when the test must
    /// skip: no engine, or no test image.
    async fn setup(test: &str) -> Option<(DockerDriver, String, Cleanup)> {
        let reason = match DockerDriver::connect(DockerDriverConfig::default()).await {
            Ok(driver) => match driver.docker.inspect_image(IMAGE).await {
                Ok(_) => {
                    let provider = format!("unit-{}-{test}", std::process::id());
                    let cleanup = Cleanup(provider.clone());
                    return Some((driver, provider, cleanup));
                }
                Err(e) => format!("image {IMAGE} is missing ({})", engine_message(&e)),
            },
            Err(e) => e.to_string(),
        };
        let message = format!(
            "{test}: {reason}; build the test images with tests/scripts/build-test-images.sh"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("skipping {message}");
        None
    }

    /// The example app, listening on 0.0.0.0 inside the container, with one
    /// `http` port.
    fn workload(image: &str, container_port: Option<u16>, extra_args: &[&str]) -> Workload {
        let mut args = vec!["--host".to_string(), "0.0.0.0".to_string()];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        Workload {
            image: Some(image.to_string()),
            command: None,
            args,
            env: vec![("GREETING".into(), "hi".into())],
            ports: vec![PortSpec {
                name: "http".into(),
                container_port,
                protocol: "tcp".into(),
            }],
            working_dir: None,
            stop_grace: Duration::from_secs(5),
            cpu_millis: Some(500),
            memory_mib: Some(64),
        }
    }

    fn spec(provider: &str, app: &str, workload: Workload) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey {
                app: app.to_string(),
                index: 0,
            },
            provider: provider.to_string(),
            workload,
            workload_generation: 3,
        }
    }

    /// One `GET path` over a fresh connection: the status and the body.
    async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad answer {raw:?}")))?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        Ok((status, body.unwrap_or_default()))
    }

    /// Waits, with a deadline, until `GET path` at `addr` answers 200; returns the body.
    async fn wait_ok(addr: &str, path: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = match tokio::time::timeout(Duration::from_secs(2), get(addr, path)).await {
                Ok(Ok((200, body))) => return body,
                Ok(other) => format!("{other:?}"),
                Err(_) => "timed out".to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "{addr}{path} never answered 200: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits, with a deadline, until the container is no longer running.
    async fn wait_exit(driver: &DockerDriver, handle: &Handle) -> Inspection {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let inspection = driver.inspect(handle).await.expect("inspect");
            if !matches!(inspection, Inspection::Running { .. }) {
                return inspection;
            }
            assert!(Instant::now() < deadline, "container did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn container_state_maps_to_inspection() {
        use bollard::models::Health;
        let state = |status, exit_code, health: Option<HealthStatusEnum>| ContainerState {
            status: Some(status),
            exit_code: Some(exit_code),
            health: health.map(|s| Health {
                status: Some(s),
                ..Default::default()
            }),
            ..Default::default()
        };
        let exited = |code| Inspection::Exited { code, signal: None };
        use ContainerStateStatusEnum as S;
        assert_eq!(
            inspection_of(Some(&state(S::RUNNING, 0, None)), "c"),
            Inspection::RUNNING
        );
        assert_eq!(
            inspection_of(
                Some(&state(S::RUNNING, 0, Some(HealthStatusEnum::UNHEALTHY))),
                "c"
            ),
            Inspection::Running {
                health: Some(RuntimeHealth::Unhealthy)
            },
            "an unhealthy container still runs, with the image's verdict"
        );
        for (status, verdict) in [
            (HealthStatusEnum::STARTING, Some(RuntimeHealth::Starting)),
            (HealthStatusEnum::HEALTHY, Some(RuntimeHealth::Healthy)),
            (HealthStatusEnum::NONE, None),
        ] {
            assert_eq!(
                inspection_of(Some(&state(S::RUNNING, 0, Some(status))), "c"),
                Inspection::Running { health: verdict }
            );
        }
        assert_eq!(
            inspection_of(Some(&state(S::EXITED, 3, None)), "c"),
            exited(Some(3))
        );
        assert_eq!(
            inspection_of(Some(&state(S::DEAD, 137, None)), "c"),
            exited(Some(137))
        );
        assert_eq!(
            inspection_of(Some(&state(S::CREATED, 0, None)), "c"),
            exited(None)
        );
        assert_eq!(inspection_of(None, "c"), exited(None));
    }

    #[test]
    fn names_references_and_graces() {
        let key = ReplicaKey {
            app: "web".into(),
            index: 2,
        };
        assert_eq!(
            container_name("eu", &key).expect("name"),
            "skymirror-eu-web-2"
        );
        assert!(matches!(
            container_name("e u", &key),
            Err(DriverError::InvalidWorkload(_))
        ));
        assert_eq!(pull_reference("app"), "app:latest");
        assert_eq!(pull_reference("app:1"), "app:1");
        assert_eq!(
            pull_reference("host:5000/team/app"),
            "host:5000/team/app:latest"
        );
        assert_eq!(pull_reference("host:5000/app:2"), "host:5000/app:2");
        assert_eq!(pull_reference("app@sha256:ab"), "app@sha256:ab");
        assert_eq!(grace_seconds(Duration::from_millis(300)), 1);
        assert_eq!(grace_seconds(Duration::from_secs(10)), 10);
    }

    #[tokio::test]
    async fn unreachable_engine_names_the_socket() {
        let config = DockerDriverConfig {
            docker_host: Some("unix:///nonexistent/docker.sock".into()),
            ..Default::default()
        };
        let err = DockerDriver::connect(config)
            .await
            .expect_err("no engine there");
        assert!(matches!(err, DriverError::Runtime(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("unix:///nonexistent/docker.sock"), "{text}");
        assert!(text.contains("is the Docker daemon running?"), "{text}");

        let config = DockerDriverConfig {
            docker_host: Some("tcp://127.0.0.1:2375".into()),
            ..Default::default()
        };
        let err = DockerDriver::connect(config)
            .await
            .expect_err("not a unix socket");
        assert!(err.to_string().contains("unix socket only"), "{err}");
    }

    #[tokio::test]
    async fn start_inspect_serve_stop_destroy() {
        let Some((driver, provider, _cleanup)) = setup("lifecycle").await else {
            return;
        };
        let spec = spec(&provider, "web", workload(IMAGE, None, &[]));
        let handle = driver.start(&spec).await.expect("start");
        assert_eq!(handle.driver, "docker");
        let port = handle.ports["http"];
        assert_eq!(handle.address, Some(format!("127.0.0.1:{port}")));
        assert_eq!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::RUNNING
        );

        // It answers its health check at the reported address, as itself.
        wait_ok(handle.address.as_deref().expect("address"), "/healthz").await;
        let body = wait_ok(handle.address.as_deref().expect("address"), "/").await;
        assert!(body.contains(&format!("web/{provider}/0")), "{body}");

        // Name, labels, limits, restart policy and environment as documented.
        let c = driver
            .docker
            .inspect_container(&handle.instance_id, None)
            .await
            .expect("inspect container");
        assert_eq!(
            c.name.as_deref(),
            Some(format!("/skymirror-{provider}-web-0").as_str())
        );
        let config = c.config.expect("config");
        let labels = config.labels.expect("labels");
        for (k, v) in [
            ("skymirror.managed", "true"),
            ("skymirror.provider", provider.as_str()),
            ("skymirror.app", "web"),
            ("skymirror.index", "0"),
            ("skymirror.workload-generation", "3"),
        ] {
            assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
        }
        let env = config.env.expect("env");
        for var in [
            format!("PORT={port}"),
            format!("PORT_HTTP={port}"),
            "GREETING=hi".to_string(),
            format!("SKYMIRROR_REPLICA=web/{provider}/0"),
        ] {
            assert!(env.contains(&var), "{var} not in {env:?}");
        }
        let host = c.host_config.expect("host config");
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(
            host.restart_policy.and_then(|p| p.name),
            Some(RestartPolicyNameEnum::NO)
        );

        // A stop is prompt (the init forwards SIGTERM) and leaves it exited.
        let begun = Instant::now();
        driver
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
        assert!(
            begun.elapsed() < Duration::from_secs(4),
            "stop took {:?}",
            begun.elapsed()
        );
        assert!(matches!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::Exited { .. }
        ));
        driver
            .stop(&handle, Duration::from_secs(1))
            .await
            .expect("stop twice");
        driver.destroy(&handle).await.expect("destroy");
        assert_eq!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::Exited {
                code: None,
                signal: None
            }
        );
        driver.destroy(&handle).await.expect("destroy twice");
    }

    #[tokio::test]
    async fn container_port_is_published_on_a_host_port() {
        let Some((driver, provider, _cleanup)) = setup("ports").await else {
            return;
        };
        let spec = spec(&provider, "fixed", workload(IMAGE, Some(8080), &[]));
        let handle = driver.start(&spec).await.expect("start");
        let port = handle.ports["http"];
        assert_ne!(port, 8080);
        wait_ok(handle.address.as_deref().expect("address"), "/healthz").await;
        let c = driver
            .docker
            .inspect_container(&handle.instance_id, None)
            .await
            .expect("inspect container");
        let env = c.config.and_then(|c| c.env).expect("env");
        assert!(env.contains(&"PORT=8080".to_string()), "{env:?}");
    }

    #[tokio::test]
    async fn on_a_network_the_replica_is_reached_at_its_own_address() {
        let Some((driver, provider, _cleanup)) = setup("network").await else {
            return;
        };
        let network = format!("skymirror-unit-{}", std::process::id());
        driver
            .docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: network.clone(),
                ..Default::default()
            })
            .await
            .expect("create network");
        let config = DockerDriverConfig {
            network: Some(network.clone()),
            ..Default::default()
        };
        let on_network = DockerDriver::connect(config).await.expect("connect");
        let spec = spec(&provider, "private", workload(IMAGE, Some(8080), &[]));
        let started = on_network.start(&spec).await;
        let answered = match &started {
            Ok(handle) => Some(
                tokio::time::timeout(
                    Duration::from_secs(30),
                    wait_ok(handle.address.as_deref().unwrap_or(""), "/healthz"),
                )
                .await,
            ),
            Err(_) => None,
        };
        let published = match &started {
            Ok(handle) => on_network
                .docker
                .inspect_container(&handle.instance_id, None)
                .await
                .ok()
                .and_then(|c| c.host_config)
                .and_then(|h| h.port_bindings),
            Err(_) => None,
        };
        if let Ok(handle) = &started {
            let _ = on_network.destroy(handle).await;
        }
        let _ = driver.docker.remove_network(&network).await;

        let handle = started.expect("start on the network");
        assert_eq!(
            handle.ports["http"], 8080,
            "the container port, not a host port"
        );
        let address: SocketAddr = handle
            .address
            .as_deref()
            .expect("address")
            .parse()
            .expect("an ip:port");
        assert!(!address.ip().is_loopback(), "{address}");
        assert_eq!(address.port(), 8080);
        assert!(
            answered.is_some_and(|r| r.is_ok()),
            "{address} never answered"
        );
        assert!(
            published.is_none_or(|b| b.values().all(Option::is_none)),
            "nothing is published on the host"
        );

        let missing = DockerDriverConfig {
            network: Some(format!("{network}-missing")),
            ..Default::default()
        };
        let err = DockerDriver::connect(missing)
            .await
            .expect_err("no such network");
        assert!(err.to_string().contains("does not exist"), "{err}");
        for unaddressed in ["host", "none"] {
            let config = DockerDriverConfig {
                network: Some(unaddressed.to_string()),
                ..Default::default()
            };
            let err = DockerDriver::connect(config)
                .await
                .expect_err("no address of their own");
            assert!(err.to_string().contains("no address of their own"), "{err}");
        }
    }

    #[tokio::test]
    async fn provider_settings_place_the_containers_started_after_them() {
        use crate::driver::settings::DockerSettings;
        let Some((driver, provider, _cleanup)) = setup("settings").await else {
            return;
        };
        let network = format!("skymirror-unit-settings-{}", std::process::id());
        driver
            .docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: network.clone(),
                ..Default::default()
            })
            .await
            .expect("create network");
        let docker = |network: Option<&str>, bind_host: Option<IpAddr>| {
            DriverSettings::Docker(DockerSettings {
                network: network.map(str::to_string),
                bind_host,
            })
        };
        let w = workload(IMAGE, Some(8080), &[]);
        let mut started = Vec::new();
        let mut start = async |app: &str| {
            let result = driver.start(&spec(&provider, app, w.clone())).await;
            if let Ok(h) = &result {
                started.push(h.clone());
            }
            result.map(|h| h.address.unwrap_or_default())
        };

        // On the flags: published on a loopback host port.
        let before = start("before").await;
        // The provider's network, for the containers started from now on.
        let taken = driver.configure(&docker(Some(&network), None)).await;
        let after = start("after").await;
        // Refused settings change nothing.
        let missing = driver
            .configure(&docker(Some(&format!("{network}-missing")), None))
            .await;
        let host = driver.configure(&docker(Some("host"), None)).await;
        let other = driver.configure(&DriverSettings::Ec2(Box::default())).await;
        let still = start("still").await;
        // No network and another bind host: published there.
        let moved = driver
            .configure(&docker(None, Some([127, 0, 0, 2].into())))
            .await;
        let published = start("moved").await;
        // No settings: the flags again.
        let back = driver.configure(&DriverSettings::Unset).await;
        let flags = start("flags").await;
        let first_runs = match started.first() {
            Some(h) => driver.inspect(h).await.ok(),
            None => None,
        };
        for h in &started {
            let _ = driver.destroy(h).await;
        }
        let _ = driver.docker.remove_network(&network).await;

        let on_host = |address: &str, host: &str| {
            address
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.ip().to_string() == host && a.port() != 8080)
        };
        let before = before.expect("start on the flags");
        assert!(on_host(&before, "127.0.0.1"), "{before}");
        taken.expect("an existing network is taken");
        let after = after.expect("start on the network");
        assert!(
            after.ends_with(":8080") && !after.starts_with("127."),
            "{after}"
        );
        for (refused, why) in [
            (missing, "does not exist"),
            (host, "no address of their own"),
            (other, "ec2 driver"),
        ] {
            match refused {
                Err(DriverError::InvalidSettings(message)) => {
                    assert!(message.contains(why), "{message}")
                }
                other => panic!("not refused as invalid settings: {other:?}"),
            }
        }
        let still = still.expect("start after refusals");
        assert!(
            still.ends_with(":8080") && !still.starts_with("127."),
            "{still}"
        );
        moved.expect("a bind host is taken");
        let published = published.expect("start on the new bind host");
        assert!(on_host(&published, "127.0.0.2"), "{published}");
        back.expect("no settings are taken");
        let flags = flags.expect("start on the flags again");
        assert!(on_host(&flags, "127.0.0.1"), "{flags}");
        assert_eq!(
            first_runs,
            Some(Inspection::RUNNING),
            "new settings touched a running container"
        );
    }

    #[test]
    fn a_listed_container_reads_as_running_with_its_health() {
        use bollard::models::ContainerSummaryHealth;
        let summary = |state, status: &str, health: Option<ContainerSummaryHealthStatusEnum>| {
            ContainerSummary {
                state: Some(state),
                status: Some(status.to_string()),
                health: health.map(|status| ContainerSummaryHealth {
                    status: Some(status),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let running = |health| Some(Inspection::Running { health });
        use ContainerSummaryStateEnum as S;
        assert_eq!(
            running_summary(&summary(S::RUNNING, "Up 3 seconds", None)),
            running(None)
        );
        for (text, verdict) in [
            ("Up 3 seconds (healthy)", RuntimeHealth::Healthy),
            ("Up 1 second (health: starting)", RuntimeHealth::Starting),
            ("Up 2 minutes (unhealthy)", RuntimeHealth::Unhealthy),
        ] {
            assert_eq!(
                running_summary(&summary(S::RUNNING, text, None)),
                running(Some(verdict)),
                "{text}"
            );
        }
        // Newer engines say it in a field of its own, which wins.
        assert_eq!(
            running_summary(&summary(
                S::RUNNING,
                "Up 3 seconds (healthy)",
                Some(ContainerSummaryHealthStatusEnum::UNHEALTHY)
            )),
            running(Some(RuntimeHealth::Unhealthy))
        );
        // A stopped container needs a full inspection for its exit code.
        assert_eq!(
            running_summary(&summary(S::EXITED, "Exited (1) 2 seconds ago", None)),
            None
        );
        assert_eq!(running_summary(&summary(S::CREATED, "Created", None)), None);
    }

    #[tokio::test]
    async fn inspecting_many_at_once_agrees_with_one_by_one() {
        let Some((driver, provider, _cleanup)) = setup("inspect-all").await else {
            return;
        };
        let mut handles = Vec::new();
        for app in ["runs", "crashes", "removed"] {
            let extra: &[&str] = if app == "crashes" {
                &["--exit-code", "3"]
            } else {
                &[]
            };
            handles.push(
                driver
                    .start(&spec(&provider, app, workload(IMAGE, None, extra)))
                    .await
                    .expect("start"),
            );
        }
        assert_eq!(
            wait_exit(&driver, &handles[1]).await,
            Inspection::Exited {
                code: Some(3),
                signal: None
            }
        );
        driver.destroy(&handles[2]).await.expect("destroy");

        let all = driver.inspect_all(&handles).await;
        let mut one_by_one = Vec::new();
        for h in &handles {
            one_by_one.push(driver.inspect(h).await.expect("inspect"));
        }
        let all: Vec<Inspection> = all.into_iter().map(|r| r.expect("inspect_all")).collect();
        assert_eq!(all, one_by_one);
        assert_eq!(
            all,
            vec![
                Inspection::RUNNING,
                Inspection::Exited {
                    code: Some(3),
                    signal: None
                },
                Inspection::Exited {
                    code: None,
                    signal: None
                },
            ]
        );
    }

    #[tokio::test]
    async fn the_images_own_healthcheck_comes_with_the_inspection() {
        let Some((driver, provider, _cleanup)) = setup("healthcheck").await else {
            return;
        };
        for (tag, verdict) in [
            ("test-healthcheck-failing", RuntimeHealth::Unhealthy),
            ("test-healthcheck-passing", RuntimeHealth::Healthy),
        ] {
            let image = format!("skymirror-example:{tag}");
            let app = tag.replace("test-", "");
            let handle = driver
                .start(&spec(&provider, &app, workload(&image, None, &[])))
                .await
                .unwrap_or_else(|e| {
                    panic!("start {image}: {e} (built by tests/scripts/build-test-images.sh)")
                });
            let deadline = Instant::now() + Duration::from_secs(20);
            let want = Inspection::Running {
                health: Some(verdict),
            };
            loop {
                let one = driver.inspect(&handle).await.expect("inspect");
                let all = driver.inspect_all(std::slice::from_ref(&handle)).await;
                let listed = all.first().and_then(|r| r.as_ref().ok()).copied();
                if one == want && listed == Some(want) {
                    break;
                }
                let inspection = (one, listed);
                assert!(
                    Instant::now() < deadline,
                    "{image}: still {inspection:?}, want {verdict:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            driver.destroy(&handle).await.expect("destroy");
        }
    }

    #[tokio::test]
    async fn a_fresh_driver_recovers_the_same_container_and_execs() {
        let Some((first, provider, _cleanup)) = setup("recover").await else {
            return;
        };
        let handle = first
            .start(&spec(&provider, "survivor", workload(IMAGE, None, &[])))
            .await
            .expect("start");
        let persisted = serde_json::to_string(&handle).expect("persist");
        drop(first);

        let second = DockerDriver::connect(DockerDriverConfig::default())
            .await
            .expect("connect");
        let handle: Handle = serde_json::from_str(&persisted).expect("load");
        assert_eq!(
            second.recover(&handle).await.expect("recover"),
            Inspection::RUNNING
        );
        let listed = second.list_instances(&provider).await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|l| l.handle.instance_id.as_str())
                .collect::<Vec<_>>(),
            vec![handle.instance_id.as_str()],
            "the same container, nothing else"
        );
        // Its labels name the replica; the listing is for removal only.
        assert_eq!(
            listed[0].replica,
            Some(ListedReplica {
                key: ReplicaKey {
                    app: "survivor".into(),
                    index: 0,
                },
                workload_generation: 3,
            })
        );
        assert!(!listed[0].adoptable);
        assert!(
            second
                .list_instances(&format!("{provider}-other"))
                .await
                .expect("list")
                .is_empty()
        );

        let exec = |args: &[&str]| {
            let mut command = vec!["/skymirror-example".to_string()];
            command.extend(args.iter().map(|a| a.to_string()));
            command
        };
        assert_eq!(
            second
                .exec(
                    &handle,
                    &exec(&["--exit-code", "7"]),
                    Duration::from_secs(10)
                )
                .await
                .expect("exec"),
            Some(7)
        );
        assert_eq!(
            second
                .exec(
                    &handle,
                    &exec(&["--exit-code", "0"]),
                    Duration::from_secs(10)
                )
                .await
                .expect("exec"),
            Some(0)
        );
        let begun = Instant::now();
        let slow = second
            .exec(&handle, &exec(&["--port", "0"]), Duration::from_millis(300))
            .await
            .expect("exec");
        assert_eq!(slow, None, "a server never finishes");
        assert!(begun.elapsed() < Duration::from_secs(3));

        second
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
        second.destroy(&handle).await.expect("destroy");
        assert!(
            second
                .list_instances(&provider)
                .await
                .expect("list")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn crash_reports_exit_code_and_a_restart_replaces_the_stale_container() {
        let Some((driver, provider, _cleanup)) = setup("crash").await else {
            return;
        };
        let spec = spec(
            &provider,
            "crash",
            workload(IMAGE, None, &["--exit-code", "3"]),
        );
        let first = driver.start(&spec).await.expect("start");
        assert_eq!(
            wait_exit(&driver, &first).await,
            Inspection::Exited {
                code: Some(3),
                signal: None
            }
        );
        // The exited container keeps the name (and its logs) until the
        // supervisor starts the replica again: here with an entrypoint that
        // does not exist, which the init reports as exit code 127.
        let mut bad_entrypoint = spec.clone();
        bad_entrypoint.workload.command = Some("/no-such-entrypoint".into());
        let second = driver.start(&bad_entrypoint).await.expect("start again");
        assert_ne!(second.instance_id, first.instance_id);
        assert_eq!(
            driver.inspect(&first).await.expect("inspect"),
            Inspection::Exited {
                code: None,
                signal: None
            },
            "the stale container is gone"
        );
        assert_eq!(
            wait_exit(&driver, &second).await,
            Inspection::Exited {
                code: Some(127),
                signal: None
            }
        );
    }

    /// Everything `logs` sends, once it returns.
    async fn read_logs(
        driver: &DockerDriver,
        handle: &Handle,
        options: LogOptions,
    ) -> Result<String, DriverError> {
        crate::driver::testing::read_logs(driver, handle, options, Duration::from_secs(30)).await
    }

    #[tokio::test]
    async fn logs_read_stdout_and_stderr_and_follow_until_the_container_stops() {
        let Some((driver, provider, _cleanup)) = setup("logs").await else {
            return;
        };
        // A crashed replica's output stays readable: stderr included.
        let crashed = spec(
            &provider,
            "crashed",
            workload(IMAGE, None, &["--exit-code", "3"]),
        );
        let crashed = driver.start(&crashed).await.expect("start");
        wait_exit(&driver, &crashed).await;
        let out = read_logs(&driver, &crashed, LogOptions::new(0, false))
            .await
            .expect("logs");
        assert_eq!(out, "exiting with code 3 as asked\n");

        let spec = spec(&provider, "talk", workload(IMAGE, None, &[]));
        let handle = driver.start(&spec).await.expect("start");
        let address = handle.address.clone().expect("address");
        wait_ok(&address, "/healthz").await;
        let listening = format!("listening on 0.0.0.0:{}\n", handle.ports["http"]);
        let out = read_logs(&driver, &handle, LogOptions::new(1, false))
            .await
            .expect("logs");
        assert_eq!(out, listening);

        // Following keeps the stream open while the container runs and ends
        // it when the container stops.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let follow = driver.logs(&handle, LogOptions::new(0, true), tx);
        let stop_after_first_line = async {
            let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("output while following")
                .expect("a piece");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(rx.try_recv().is_err(), "nothing more was written");
            driver
                .stop(&handle, Duration::from_secs(5))
                .await
                .expect("stop");
            while rx.recv().await.is_some() {}
            first
        };
        let (result, first) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(follow, stop_after_first_line)
        })
        .await
        .expect("following ended with the container");
        result.expect("logs");
        assert_eq!(String::from_utf8_lossy(&first), listening);

        driver.destroy(&handle).await.expect("destroy");
        let err = read_logs(&driver, &handle, LogOptions::new(0, false))
            .await
            .expect_err("no container, no logs");
        assert!(err.to_string().contains("is gone"), "{err}");
    }

    #[tokio::test]
    async fn a_name_taken_by_a_foreign_container_is_not_removed() {
        let Some((driver, provider, _cleanup)) = setup("foreign").await else {
            return;
        };
        let spec = spec(&provider, "taken", workload(IMAGE, None, &[]));
        let name = container_name(&provider, &spec.key).expect("name");
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let body = ContainerCreateBody {
            image: Some(IMAGE.to_string()),
            // Our provider label, so the cleanup removes it, but no app label.
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_string(), "true".to_string()),
                (LABEL_PROVIDER.to_string(), provider.clone()),
            ])),
            ..Default::default()
        };
        let foreign = driver
            .docker
            .create_container(Some(options), body)
            .await
            .expect("create");
        let err = driver.start(&spec).await.expect_err("the name is taken");
        assert!(err.to_string().contains("is taken by container"), "{err}");
        assert!(err.is_retryable());
        driver
            .docker
            .inspect_container(&foreign.id, None)
            .await
            .expect("the foreign container is still there");
    }

    #[tokio::test]
    async fn missing_image_is_an_invalid_workload_after_a_pull() {
        let Some((driver, provider, _cleanup)) = setup("missing").await else {
            return;
        };
        let err = driver
            .start(&spec(
                &provider,
                "nope",
                workload("skymirror-nope:1", None, &[]),
            ))
            .await
            .expect_err("no such image");
        assert!(matches!(err, DriverError::InvalidWorkload(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("image skymirror-nope:1 not found locally and could not be pulled: "),
            "{err}"
        );
        assert!(
            driver
                .list_instances(&provider)
                .await
                .expect("list")
                .is_empty()
        );

        // The engine's minimum memory limit is a few MiB.
        let mut tiny = workload(IMAGE, None, &[]);
        tiny.memory_mib = Some(1);
        let err = driver
            .start(&spec(&provider, "tiny", tiny))
            .await
            .expect_err("below the minimum memory");
        assert!(matches!(err, DriverError::InvalidWorkload(_)), "{err:?}");
        assert!(err.to_string().contains("refused container"), "{err}");

        let mut no_image = workload(IMAGE, None, &[]);
        no_image.image = None;
        let err = driver
            .start(&spec(&provider, "nope", no_image))
            .await
            .expect_err("no image");
        assert_eq!(err.to_string(), "app nope: the docker driver needs `image`");
    }
}
