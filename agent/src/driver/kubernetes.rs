//! The `kubernetes` driver: runs each replica as a Pod in a Kubernetes
//! cluster, through the Kubernetes API (kube-rs).
//!
//! **Shape.** A replica is one Pod named `skymirror-<provider>-<app>-<index>`,
//! created and removed by the agent — no Deployment or StatefulSet between
//! them. The supervisor already is the controller every driver has: it
//! decides which replicas run, replaces them one at a time on a workload
//! change (make-before-break across the app's replicas), keeps a singleton to
//! at most one copy and never restarts what the daemon moved elsewhere. A
//! workload controller of the cluster's would do all of that again, by its
//! own rules: a Deployment's pods have no index, a StatefulSet rolls
//! updates its own way and re-creates a pod the agent removed, breaking a
//! singleton's fencing. What the cluster does well stays the cluster's: the
//! kubelet restarts a crashed container in place (`restartPolicy: Always`,
//! with its own back-off), and the driver reports those restarts
//! ([`Capabilities::runtime_restarts`]); a pod the cluster gives up on
//! (evicted, failed, deleted by someone) has exited, and the supervisor
//! starts another.
//!
//! **Objects.** Every object is written by server-side apply under the field
//! manager `skymirror` and labelled `app.kubernetes.io/managed-by=skymirror`,
//! `skymirror.dev/provider`, `skymirror.dev/app` (pods also
//! `skymirror.dev/index` and `skymirror.dev/workload-generation`, and the
//! annotation `skymirror.dev/replica: app/provider/index`); see
//! [`objects`]. The driver lists only objects with its provider's labels,
//! removes only those, and refuses to touch an object of another owner that
//! holds a name it needs. With `expose: service` each app also gets a Service
//! of the provider's `serviceType`, removed with the app's last pod.
//!
//! **Addresses.** With `expose: pods` (the default) a replica is reached at
//! its pod's address and its container ports. With `expose: service` it is
//! reached through its app's Service: the cluster IP and the port
//! (`ClusterIP`), its node's address and the node port (`NodePort`), or the
//! load balancer's address and the port (`LoadBalancer`; a start waits for
//! the cloud to give one). The agent's probes then go through the Service,
//! as users' traffic does; the pods' own readiness (`Ready`) comes from the
//! cluster.
//!
//! **Status.** A start returns once the container has run and the pod has
//! an address; it fails with the cluster's reason when the image cannot be
//! pulled (`ImagePullBackOff`, ...), the container cannot be created, or the
//! pod stays `Unschedulable` beyond a grace, and then removes the pod. Each
//! inspection pass is one list of the provider's pods per namespace (see
//! [`status`] for how a pod reads); what the cluster says is wrong with a pod
//! (`CrashLoopBackOff` with the last exit, `OOMKilled`, `Evicted`) is logged
//! once per change with the replica.
//!
//! **Cluster manners.** Starts and stops wait on a watch of their one pod,
//! never by polling. A 409 (a field another manager holds, an object changed
//! meanwhile) is answered by reading the object again: the driver takes its
//! own object's fields back, and leaves anyone else's object alone. A 403
//! names the verb and resource the agent's identity lacks. A 429 is
//! [`DriverError::Throttled`] with the server's delay. When the API server
//! cannot be reached, calls fail at once with that reason for a back-off
//! that doubles from half a second to eight (so a fleet of agents does not
//! hammer a recovering server), replicas are left as they are, and the next
//! call after the back-off tries again.
//!
//! **Logs.** [`Driver::logs`] reads the container's output through the pods
//! log API (`kubectl logs skymirror-<provider>-<app>-<index>`), the previous
//! container's when the current one waits to restart. There is no `exec`:
//! it needs a streaming protocol (websockets) the driver does not link.

mod objects;
mod status;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, Preconditions, WatchEvent,
    WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::settings::{KubernetesSettings, ServiceType};
use super::{
    Capabilities, Driver, DriverError, DriverSettings, Handle, Inspection, Listed, ListedReplica,
    LogOptions, MAX_LOG_CHUNK, ReplicaKey, ReplicaSpec,
};
use objects::{
    CONTAINER, LABEL_APP, LABEL_GENERATION, LABEL_INDEX, LABEL_SERVICE, MANAGER, ResolvedPort,
    is_ours, owner_selector,
};

/// Driver kind stored in every handle this driver makes.
const KIND: &str = "kubernetes";
/// Operations at once. A start holds its slot while it watches its pod come
/// up (image pulls take a while), so there are more than the API server's
/// default client rate would suggest; the server's priority and fairness
/// throttles the rest (429, retried after its delay).
const MAX_OPERATIONS: u32 = 16;
/// One list of the provider's pods per pass: the API server counts requests.
const INSPECT_INTERVAL: Duration = Duration::from_secs(2);
/// Beyond the grace, a stop takes the rounding to whole seconds, the
/// kubelet's kill and its report of the pod's end, and the API server's
/// removal of the pod and the watch's news of it.
const STOP_OVERHEAD: Duration = Duration::from_secs(10);
/// How long a start waits for its pod to run (image pulls included).
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an unschedulable pod is given before its start fails: a cluster
/// autoscaler looks for such pods every ten seconds or so.
const UNSCHEDULABLE_GRACE: Duration = Duration::from_secs(30);
/// How long a connection to the API server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the start-up check of the API server waits for an answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a watch request runs before the driver reads and watches again
/// (below the client's read timeout of 295 s).
const MAX_WATCH: Duration = Duration::from_secs(290);
/// A watch that ends sooner than this is followed by a pause before the
/// next read, so a server that ends watches at once is not hammered.
const MIN_WATCH: Duration = Duration::from_secs(1);
/// The pause after a watch that ended too soon.
const WATCH_PAUSE: Duration = Duration::from_millis(200);
/// First back-off after the API server could not be reached; it doubles.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest back-off while the API server cannot be reached, so a recovered
/// server is used again within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Attempts at applying an object when each meets a conflict.
const APPLY_ATTEMPTS: u32 = 3;
/// The delay a 429 without one of its own asks for.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings of a [`KubernetesDriver`]: where the cluster is, from the
/// agent's flags. The provider's `spec.kubernetes` overrides the context and
/// the namespace.
#[derive(Debug, Clone)]
pub struct KubernetesDriverConfig {
    /// kubeconfig file; `None`: `KUBECONFIG` or `~/.kube/config`, else the
    /// in-cluster configuration of the agent's own pod.
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context; `None`: the current one.
    pub context: Option<String>,
    /// Namespace of the replicas; `None`: the context's (or, in a pod, the
    /// agent's own).
    pub namespace: Option<String>,
    /// How long a start waits for its pod to run.
    pub start_timeout: Duration,
    /// How long an unschedulable pod is given before its start fails.
    pub unschedulable_grace: Duration,
    /// How often the supervisor lists the pods.
    pub inspect_interval: Duration,
}

impl Default for KubernetesDriverConfig {
    /// The usual kubeconfig (or the pod's own configuration), its current
    /// context and namespace, and the driver's timings.
    fn default() -> Self {
        KubernetesDriverConfig {
            kubeconfig: None,
            context: None,
            namespace: None,
            start_timeout: START_TIMEOUT,
            unschedulable_grace: UNSCHEDULABLE_GRACE,
            inspect_interval: INSPECT_INTERVAL,
        }
    }
}

/// Runs replicas as Kubernetes pods. See the module docs.
pub struct KubernetesDriver {
    /// The agent's flags, for settings that leave something out.
    config: KubernetesDriverConfig,
    /// One client per kubeconfig context in use (`None`: the kubeconfig's
    /// current context or the in-cluster configuration), so instances started
    /// under earlier settings are still reached in their own cluster.
    clusters: Mutex<HashMap<Option<String>, Arc<Cluster>>>,
    /// Where and how new pods are made now: the flags, or the provider's
    /// settings. Each start reads it once, so a change never splits one.
    target: Mutex<Arc<Target>>,
    /// What the cluster last said was wrong with each pod (by uid), so each
    /// new account is logged once.
    troubles: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for KubernetesDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = self.target();
        f.debug_struct("KubernetesDriver")
            .field("server", &target.cluster.url)
            .field("namespace", &target.namespace)
            .finish_non_exhaustive()
    }
}

/// One cluster, as one kubeconfig context reaches it.
struct Cluster {
    /// The client; cheap to clone (one shared connection pool).
    client: Client,
    /// The API server's address, for messages.
    url: String,
    /// The context, as handles record it.
    context: Option<String>,
    /// The context's namespace, for settings that name none.
    default_namespace: String,
    /// While the API server cannot be reached: since when, why, and when the
    /// next call may try.
    outage: Mutex<Option<Outage>>,
}

/// The API server could not be reached.
#[derive(Debug, Clone)]
struct Outage {
    /// The last transport error, for people.
    error: String,
    /// The current back-off.
    backoff: Duration,
    /// No call before this.
    retry_at: Instant,
}

/// Where and how new pods are made.
struct Target {
    /// The cluster.
    cluster: Arc<Cluster>,
    /// The namespace.
    namespace: String,
    /// The provider's settings: labels, annotations, scheduling, pull
    /// secrets, exposure (its context and namespace are resolved above).
    settings: KubernetesSettings,
}

/// What the driver keeps in [`Handle::data`]; the pod's uid is the handle's
/// `instance_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PodData {
    /// Pod name.
    name: String,
    /// Namespace of the pod.
    namespace: String,
    /// kubeconfig context the pod was made through; `None`: the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    context: Option<String>,
    /// App of the replica.
    app: String,
    /// Provider the pod runs for (its label selects the provider's pods).
    provider: String,
    /// The app's Service, when the pod is reached through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
}

/// One API call, for messages: `patch pods/NAME in namespace NS`.
#[derive(Debug, Clone, Copy)]
struct Call<'a> {
    /// The RBAC verb.
    verb: &'static str,
    /// The resource (`pods`, `pods/log`, `services`).
    resource: &'static str,
    /// The namespace.
    namespace: &'a str,
    /// The object, when the call names one.
    name: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(
        verb: &'static str,
        resource: &'static str,
        namespace: &'a str,
        name: Option<&'a str>,
    ) -> Self {
        Call {
            verb,
            resource,
            namespace,
            name,
        }
    }
}

impl fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(name) => write!(
                f,
                "{} {}/{name} in namespace {}",
                self.verb, self.resource, self.namespace
            ),
            None => write!(
                f,
                "{} {} in namespace {}",
                self.verb, self.resource, self.namespace
            ),
        }
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The verb and resource a 403's message says were refused (`... cannot
/// create resource "pods" in API group ...`).
fn refused_action(message: &str) -> Option<(String, String)> {
    let rest = message.split("cannot ").nth(1)?;
    let (verb, rest) = rest.split_once(" resource \"")?;
    let (resource, _) = rest.split_once('"')?;
    Some((verb.to_string(), resource.to_string()))
}

impl Cluster {
    /// Connects to the cluster of `context` (see [`KubernetesDriverConfig`]).
    /// Nothing is asked of the API server yet.
    async fn load(kubeconfig: Option<&PathBuf>, context: Option<&str>) -> Result<Self, String> {
        let options = KubeConfigOptions {
            context: context.map(str::to_string),
            ..Default::default()
        };
        let mut config = match (kubeconfig, context) {
            (Some(path), _) => {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?
            }
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| format!("kubeconfig: {}", chain(&e)))?,
            (None, None) => Config::infer().await.map_err(|e| {
                format!(
                    "no kubeconfig (KUBECONFIG, ~/.kube/config) and not in a pod: {}",
                    chain(&e)
                )
            })?,
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let url = config.cluster_url.to_string();
        let default_namespace = config.default_namespace.clone();
        let client = Client::try_from(config)
            .map_err(|e| format!("Kubernetes client for {url}: {}", chain(&e)))?;
        Ok(Cluster {
            client,
            url: url.trim_end_matches('/').to_string(),
            context: context.map(str::to_string),
            default_namespace,
            outage: Mutex::new(None),
        })
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one API call: the answer, or the status code when it is one of
    /// `expected` (a 404 that means "gone", a 409 that means "read again"),
    /// or the failure as a driver error for people. While the API server is
    /// known to be unreachable and its back-off has not run out, it fails at
    /// once without a request.
    async fn call<T>(
        &self,
        call: Call<'_>,
        expected: &[u16],
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<Result<T, u16>, DriverError> {
        if let Some(o) = self.outage().clone() {
            let now = Instant::now();
            if now < o.retry_at {
                return Err(DriverError::Runtime(format!(
                    "cannot reach the Kubernetes API server at {} ({}); next attempt in {:?}",
                    self.url,
                    o.error,
                    o.retry_at - now
                )));
            }
        }
        match request.await {
            Ok(answer) => {
                self.answered();
                Ok(Ok(answer))
            }
            Err(kube::Error::Api(status)) => {
                self.answered();
                if expected.contains(&status.code) {
                    Ok(Err(status.code))
                } else {
                    Err(self.refused(call, &status))
                }
            }
            Err(
                e @ (kube::Error::HyperError(_)
                | kube::Error::Service(_)
                | kube::Error::ReadEvents(_)),
            ) => Err(self.unreachable(&e)),
            Err(e) => Err(DriverError::Runtime(format!("{call}: {}", chain(&e)))),
        }
    }

    /// The API server answered: any outage is over.
    fn answered(&self) {
        if let Some(o) = self.outage().take() {
            tracing::info!(server = %self.url, after = %o.error, "the Kubernetes API server answers again");
        }
    }

    /// The API server could not be reached: the back-off grows.
    fn unreachable(&self, e: &kube::Error) -> DriverError {
        let error = chain(e);
        let mut outage = self.outage();
        let backoff = outage.as_ref().map_or(FIRST_BACKOFF, |o| {
            o.backoff.saturating_mul(2).min(MAX_BACKOFF)
        });
        // Agents that lost the server together do not return together.
        let jitter = crate::random::full_jitter(backoff / 2).unwrap_or_default();
        if outage.is_none() {
            tracing::warn!(server = %self.url, error = %error, "cannot reach the Kubernetes API server; replicas are left as they are");
        }
        *outage = Some(Outage {
            error: error.clone(),
            backoff,
            retry_at: Instant::now() + backoff + jitter,
        });
        DriverError::Runtime(format!(
            "cannot reach the Kubernetes API server at {}: {error}",
            self.url
        ))
    }

    /// The API server refused `call` with `status`.
    fn refused(&self, call: Call<'_>, status: &kube::core::Status) -> DriverError {
        let message = if status.message.is_empty() {
            status.reason.clone()
        } else {
            status.message.clone()
        };
        match status.code {
            403 => {
                let (verb, resource) = refused_action(&message)
                    .unwrap_or_else(|| (call.verb.to_string(), call.resource.to_string()));
                DriverError::Runtime(format!(
                    "the Kubernetes API server at {} forbids the agent to {verb} {resource} in \
                     namespace {}; grant it in the agent's Role (deploy/k8s/rbac.yaml) \
                     (403 Forbidden: {message})",
                    self.url, call.namespace
                ))
            }
            401 => DriverError::Runtime(format!(
                "the Kubernetes API server at {} does not accept the agent's credentials \
                 (401 Unauthorized: {message})",
                self.url
            )),
            429 => DriverError::Throttled {
                message: format!("{call}: {message}"),
                retry_after: status
                    .details
                    .as_ref()
                    .map(|d| Duration::from_secs(u64::from(d.retry_after_seconds)))
                    .filter(|d| !d.is_zero())
                    .unwrap_or(DEFAULT_RETRY_AFTER),
            },
            404 if status
                .details
                .as_ref()
                .is_some_and(|d| d.kind == "namespaces") =>
            {
                DriverError::Runtime(format!(
                    "namespace {} does not exist in the cluster at {} ({message})",
                    call.namespace, self.url
                ))
            }
            400 | 422 => DriverError::InvalidWorkload(format!(
                "the Kubernetes API server refused to {call}: {message}"
            )),
            code => DriverError::Runtime(format!("{call}: {code} {}: {message}", status.reason)),
        }
    }
}

impl Target {
    /// The namespaced API of `K` in the target's namespace.
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.cluster.client.clone(), &self.namespace)
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `host:port`, with brackets around an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

fn decode(handle: &Handle) -> Result<PodData, DriverError> {
    serde_json::from_value(handle.data.clone()).map_err(|e| {
        DriverError::Runtime(format!(
            "handle of instance {} is not a kubernetes pod's: {e}",
            handle.instance_id
        ))
    })
}

fn encode(data: &PodData) -> Result<serde_json::Value, DriverError> {
    serde_json::to_value(data).map_err(|e| DriverError::Runtime(format!("encode handle data: {e}")))
}

/// Where an instance's pod is: its kubeconfig context, namespace and
/// provider, what one list of pods answers for.
type Place = (Option<String>, String, String);

/// What [`KubernetesDriver::follow`] is told of the object it follows: the
/// object, or that it is gone.
type Seen<'a, K> = Option<&'a K>;

impl KubernetesDriver {
    /// Loads the kubeconfig (or the pod's own configuration) of the flags.
    /// An API server that does not answer yet is only logged: replicas are
    /// left as they are, and the driver tries again on every call.
    pub async fn connect(config: KubernetesDriverConfig) -> Result<Self, DriverError> {
        let cluster = Cluster::load(config.kubeconfig.as_ref(), config.context.as_deref())
            .await
            .map_err(DriverError::Runtime)?;
        let cluster = Arc::new(cluster);
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| cluster.default_namespace.clone());
        let hello = cluster.call(
            Call::new("get", "version", &namespace, None),
            &[],
            cluster.client.apiserver_version(),
        );
        match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
            Ok(Ok(Ok(version))) => tracing::info!(
                server = %cluster.url, version = %version.git_version, %namespace,
                "connected to the Kubernetes API server"
            ),
            // No status code is expected: every refusal is an error.
            Ok(Ok(Err(_))) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the Kubernetes API server does not answer yet")
            }
            Err(_) => {
                tracing::warn!(server = %cluster.url, "the Kubernetes API server does not answer yet")
            }
        }
        let target = Target {
            cluster: cluster.clone(),
            namespace,
            settings: KubernetesSettings::default(),
        };
        Ok(KubernetesDriver {
            clusters: Mutex::new(HashMap::from([(config.context.clone(), cluster)])),
            target: Mutex::new(Arc::new(target)),
            troubles: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// Where and how new pods are made now.
    fn target(&self) -> Arc<Target> {
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cluster of `context`, loaded on first use.
    async fn cluster(&self, context: Option<&str>) -> Result<Arc<Cluster>, String> {
        let key = context.map(str::to_string);
        if let Some(c) = self
            .clusters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(c.clone());
        }
        let loaded = Arc::new(Cluster::load(self.config.kubeconfig.as_ref(), context).await?);
        let mut clusters = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(clusters.entry(key).or_insert(loaded).clone())
    }

    /// The cluster of an existing instance (the one it was started in).
    async fn place_of(&self, data: &PodData) -> Result<Arc<Cluster>, DriverError> {
        self.cluster(data.context.as_deref()).await.map_err(|e| {
            DriverError::Runtime(format!(
                "pod {} was started through kubeconfig context {:?}, which is unusable now: {e}",
                data.name, data.context
            ))
        })
    }

    /// Follows one object: calls `decide` with it on the first read and on
    /// every change (with `None` once it is gone), and once more with the
    /// last state seen at `recheck`, until `decide` answers or `deadline`
    /// passes (`Ok(None)`). Reads and watches again whenever the watch ends.
    async fn follow<K, T>(
        &self,
        cluster: &Cluster,
        api: &Api<K>,
        call: Call<'_>,
        deadline: Instant,
        mut recheck: Option<Instant>,
        mut decide: impl FnMut(Seen<'_, K>) -> Option<T>,
    ) -> Result<Option<T>, DriverError>
    where
        K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
    {
        let name = call.name.unwrap_or_default();
        let watch_call = Call::new("watch", call.resource, call.namespace, None);
        loop {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let read = cluster.call(call, &[404], api.get(name)).await?.ok();
            if let Some(answer) = decide(read.as_ref()) {
                return Ok(Some(answer));
            }
            // Gone and undecided: nothing left to watch.
            let Some(mut last) = read else {
                return Ok(None);
            };
            let version = last.meta().resource_version.clone().unwrap_or_default();
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(MAX_WATCH);
            let params = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(u32::try_from(left.as_secs().max(1)).unwrap_or(1));
            let began = Instant::now();
            let Ok(stream) = cluster
                .call(watch_call, &[], api.watch(&params, &version))
                .await?
            else {
                continue;
            };
            let mut stream = std::pin::pin!(stream);
            loop {
                let wake = recheck.filter(|r| *r < deadline).unwrap_or(deadline);
                tokio::select! {
                    event = stream.next() => match event {
                        Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                            if let Some(answer) = decide(Some(&o)) {
                                return Ok(Some(answer));
                            }
                            last = o;
                        }
                        Some(Ok(WatchEvent::Deleted(_))) => {
                            if let Some(answer) = decide(None) {
                                return Ok(Some(answer));
                            }
                            break;
                        }
                        Some(Ok(WatchEvent::Bookmark(_))) => {}
                        // The version is too old (410) or the watch failed:
                        // read again.
                        Some(Ok(WatchEvent::Error(status))) => {
                            tracing::debug!(object = %name, status = %status.message, "watch ended; reading again");
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::debug!(object = %name, error = %chain(&e), "watch broke; reading again");
                            break;
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(wake) => {
                        if recheck.is_some_and(|r| r == wake) {
                            recheck = None;
                            if let Some(answer) = decide(Some(&last)) {
                                return Ok(Some(answer));
                            }
                        } else {
                            return Ok(None);
                        }
                    }
                }
            }
            if began.elapsed() < MIN_WATCH {
                tokio::time::sleep(WATCH_PAUSE).await;
            }
        }
    }

    /// Waits until the pod `name` with `uid` no longer exists (another pod
    /// may hold the name by then), for at most `limit`.
    async fn wait_gone(
        &self,
        cluster: &Cluster,
        api: &Api<Pod>,
        namespace: &str,
        name: &str,
        uid: &str,
        limit: Duration,
    ) -> Result<(), DriverError> {
        let call = Call::new("get", "pods", namespace, Some(name));
        let gone = self
            .follow(
                cluster,
                api,
                call,
                Instant::now() + limit,
                None,
                |pod: Seen<'_, Pod>| {
                    pod.is_none_or(|p| p.metadata.uid.as_deref() != Some(uid))
                        .then_some(())
                },
            )
            .await?;
        gone.ok_or_else(|| {
            DriverError::Runtime(format!(
                "pod {name} in namespace {namespace} is still terminating after {limit:?}; its \
                 node may be unreachable"
            ))
        })
    }

    /// Deletes the pod `name` if it is still the one with `uid`, giving it
    /// `grace` (`None`: its own). A pod that is gone, or replaced by another
    /// with the name, is fine.
    async fn delete_pod(
        &self,
        cluster: &Cluster,
        api: &Api<Pod>,
        namespace: &str,
        name: &str,
        uid: &str,
        grace: Option<Duration>,
    ) -> Result<(), DriverError> {
        let params = DeleteParams {
            grace_period_seconds: grace
                .map(|g| u32::try_from(objects::grace_seconds(g)).unwrap_or(u32::MAX)),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        // 404: gone already; 409: the name holds another pod now.
        let _deleted_or_gone = cluster
            .call(
                Call::new("delete", "pods", namespace, Some(name)),
                &[404, 409],
                api.delete(name, &params),
            )
            .await?;
        Ok(())
    }

    /// Applies `object` under the field manager `skymirror`. A conflict (a
    /// field another manager holds, the object changed meanwhile) is
    /// resolved by reading the object again: gone, it is applied afresh;
    /// ours (by its labels), our fields are taken back; anyone else's, it is
    /// left alone and the apply fails.
    async fn apply<K>(
        &self,
        cluster: &Cluster,
        api: &Api<K>,
        call: Call<'_>,
        object: &K,
        owner: (&str, &str),
    ) -> Result<K, DriverError>
    where
        K: kube::Resource + Clone + Serialize + DeserializeOwned + fmt::Debug,
    {
        let name = call.name.unwrap_or_default();
        let read = Call::new("get", call.resource, call.namespace, call.name);
        let mut force = false;
        for _ in 0..APPLY_ATTEMPTS {
            let mut params = PatchParams::apply(MANAGER);
            params.force = force;
            let patched = cluster
                .call(
                    call,
                    &[409],
                    api.patch(name, &params, &Patch::Apply(object)),
                )
                .await?;
            if let Ok(applied) = patched {
                return Ok(applied);
            }
            force = match cluster.call(read, &[404], api.get(name)).await? {
                Err(_) => false,
                Ok(current) if is_ours(current.meta().labels.as_ref(), owner.0, Some(owner.1)) => {
                    tracing::info!(object = %name, resource = call.resource, "another field manager changed skymirror's object; taking its fields back");
                    true
                }
                Ok(_) => return Err(foreign(call)),
            };
        }
        Err(DriverError::Runtime(format!(
            "{call}: {APPLY_ATTEMPTS} attempts met conflicts; trying again later"
        )))
    }

    /// Removes a pod of the replica left under its name (an earlier instance;
    /// the supervisor starts a replica only when it holds no running one) and
    /// waits until it is gone. A pod of anyone else under the name is left
    /// alone, and the start fails.
    async fn clear_name(
        &self,
        target: &Target,
        api: &Api<Pod>,
        name: &str,
        spec: &ReplicaSpec,
    ) -> Result<(), DriverError> {
        let ns = &target.namespace;
        let cluster = &target.cluster;
        let call = Call::new("get", "pods", ns, Some(name));
        let Ok(existing) = cluster.call(call, &[404], api.get(name)).await? else {
            return Ok(());
        };
        let labels = existing.metadata.labels.as_ref();
        let index = spec.key.index.to_string();
        if !is_ours(labels, &spec.provider, Some(&spec.key.app))
            || labels.and_then(|l| l.get(LABEL_INDEX)) != Some(&index)
        {
            return Err(DriverError::Runtime(format!(
                "pod name {name} in namespace {ns} is taken by a pod that is not replica {}/{}/{}; \
                 skymirror leaves it alone: remove or rename it",
                spec.key.app, spec.provider, spec.key.index
            )));
        }
        let uid = existing.metadata.uid.clone().unwrap_or_default();
        let grace = existing
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map_or(Duration::from_secs(30), |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        if existing.metadata.deletion_timestamp.is_none() {
            tracing::info!(replica = %spec.key, pod = %name, "removing the replica's stale pod");
            self.delete_pod(cluster, api, ns, name, &uid, None).await?;
        }
        self.wait_gone(cluster, api, ns, name, &uid, grace + STOP_OVERHEAD)
            .await
    }

    /// Waits until the pod has run and has an address, or fails with the
    /// cluster's reason.
    async fn wait_started(
        &self,
        cluster: &Cluster,
        api: &Api<Pod>,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(String, Option<String>), DriverError> {
        let begun = Instant::now();
        let grace = self.config.unschedulable_grace;
        let mut waiting = "the pod to be read".to_string();
        let call = Call::new("get", "pods", namespace, Some(name));
        let decided = self
            .follow(
                cluster,
                api,
                call,
                begun + self.config.start_timeout,
                Some(begun + grace),
                |pod: Seen<'_, Pod>| {
                    let Some(pod) = pod.filter(|p| p.metadata.uid.as_deref() == Some(uid)) else {
                        return Some(Err(DriverError::Runtime(format!(
                            "pod {name} was deleted before its container ran"
                        ))));
                    };
                    match status::progress(pod, begun.elapsed(), grace) {
                        status::Progress::Waiting(what) => {
                            waiting = what;
                            None
                        }
                        status::Progress::Started { pod_ip, host_ip } => {
                            Some(Ok((pod_ip, host_ip)))
                        }
                        status::Progress::Failed(e) => Some(Err(e)),
                    }
                },
            )
            .await?;
        decided.unwrap_or_else(|| {
            Err(DriverError::Runtime(format!(
                "pod {name} did not start within {:?}; it was still waiting for {waiting}",
                self.config.start_timeout
            )))
        })
    }

    /// Applies the app's Service for the pod with `uid`, and says where the
    /// replica is reached through it: address and port numbers by name.
    async fn expose(
        &self,
        target: &Target,
        spec: &ReplicaSpec,
        ports: &[ResolvedPort],
        uid: &str,
        host_ip: Option<&str>,
    ) -> Result<(Option<String>, BTreeMap<String, u16>), DriverError> {
        let ns = &target.namespace;
        let cluster = &target.cluster;
        let app = &spec.key.app;
        let object = objects::service(&spec.provider, app, ns, &target.settings, ports, uid);
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<Service> = target.api();
        let get = Call::new("get", "services", ns, Some(&name));
        if let Ok(existing) = cluster.call(get, &[404], api.get(&name)).await?
            && !is_ours(existing.metadata.labels.as_ref(), &spec.provider, Some(app))
        {
            return Err(foreign(get));
        }
        let patch = Call::new("patch", "services", ns, Some(&name));
        let applied = self
            .apply(cluster, &api, patch, &object, (&spec.provider, app))
            .await?;
        let service_ports = applied
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let numbers = |node: bool| -> BTreeMap<String, u16> {
            ports
                .iter()
                .zip(&service_ports)
                .filter_map(|(p, s)| {
                    let n = if node { s.node_port? } else { s.port };
                    Some((p.name.clone(), u16::try_from(n).ok()?))
                })
                .collect()
        };
        let host = match target.settings.service_type {
            ServiceType::ClusterIp => applied
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.clone())
                .filter(|ip| !ip.is_empty() && ip != "None"),
            ServiceType::NodePort => host_ip.map(str::to_string),
            ServiceType::LoadBalancer => {
                let deadline = Instant::now() + self.config.start_timeout;
                self.follow(
                    cluster,
                    &api,
                    get,
                    deadline,
                    None,
                    |svc: Seen<'_, Service>| {
                        let ingress = svc?
                            .status
                            .as_ref()?
                            .load_balancer
                            .as_ref()?
                            .ingress
                            .as_ref()?;
                        ingress
                            .iter()
                            .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                    },
                )
                .await?
            }
        };
        let Some(host) = host else {
            return Err(DriverError::Runtime(format!(
                "service {name} in namespace {ns} has no address (its type is {:?})",
                target.settings.service_type
            )));
        };
        let numbers = numbers(target.settings.service_type == ServiceType::NodePort);
        let address = spec
            .workload
            .ports
            .first()
            .and_then(|p| numbers.get(&p.name))
            .map(|port| host_port(&host, *port));
        Ok((address, numbers))
    }

    /// Removes the app's Service once no pod is behind it any more. The
    /// Service's version is read before its pods are counted and its
    /// deletion is conditional on it, so a start that applied it meanwhile
    /// (which changes it, see [`objects::ANNOTATION_APPLIED_FOR`]) keeps it.
    async fn release_service(
        &self,
        cluster: &Cluster,
        namespace: &str,
        data: &PodData,
        service: &str,
    ) -> Result<(), DriverError> {
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
        let get = Call::new("get", "services", namespace, Some(service));
        let list = Call::new("list", "pods", namespace, None);
        let delete = Call::new("delete", "services", namespace, Some(service));
        let behind = ListParams::default().labels(&format!(
            "{},{LABEL_APP}={},{LABEL_SERVICE}={service}",
            owner_selector(&data.provider),
            data.app
        ));
        for _ in 0..APPLY_ATTEMPTS {
            let Ok(svc) = cluster.call(get, &[404], services.get(service)).await? else {
                return Ok(());
            };
            if !is_ours(
                svc.metadata.labels.as_ref(),
                &data.provider,
                Some(&data.app),
            ) {
                return Ok(());
            }
            let version = svc.metadata.resource_version.clone();
            let listed = cluster.call(list, &[], pods.list(&behind)).await?;
            let remaining = listed
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            if remaining > 0 {
                return Ok(());
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: svc.metadata.uid.clone(),
                    resource_version: version,
                }),
                ..Default::default()
            };
            match cluster
                .call(delete, &[404, 409], services.delete(service, &params))
                .await?
            {
                Ok(_) | Err(404) => {
                    tracing::info!(service = %service, app = %data.app, "removed the app's service with its last pod");
                    return Ok(());
                }
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Logs what the cluster says is wrong with a pod, once per new account.
    fn note_trouble(&self, data: &PodData, uid: &str, pod: &Pod) {
        let mut troubles = self.troubles.lock().unwrap_or_else(PoisonError::into_inner);
        match status::trouble(pod) {
            Some(now) if troubles.get(uid) != Some(&now) => {
                tracing::warn!(pod = %data.name, app = %data.app, namespace = %data.namespace, trouble = %now, "the cluster reports trouble with a replica's pod");
                troubles.insert(uid.to_string(), now);
            }
            Some(_) => {}
            None => {
                troubles.remove(uid);
            }
        }
    }

    /// Reads one instance's pod.
    async fn state(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        let data = decode(handle)?;
        let cluster = self.place_of(&data).await?;
        let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &data.namespace);
        let call = Call::new("get", "pods", &data.namespace, Some(&data.name));
        match cluster.call(call, &[404], api.get(&data.name)).await? {
            Ok(pod) if pod.metadata.uid.as_deref() == Some(handle.instance_id.as_str()) => {
                self.note_trouble(&data, &handle.instance_id, &pod);
                Ok(status::inspection(&pod))
            }
            _ => Ok(Inspection::Exited {
                code: None,
                signal: None,
            }),
        }
    }

    /// Starts the pod and waits for it; see [`Driver::start`].
    async fn run_pod(
        &self,
        target: &Target,
        spec: &ReplicaSpec,
        ports: &[ResolvedPort],
        service: Option<&str>,
    ) -> Result<Handle, DriverError> {
        let ns = &target.namespace;
        let cluster = &target.cluster;
        let object = objects::pod(spec, ns, &target.settings, ports, service)?;
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = target.api();
        self.clear_name(target, &api, &name, spec).await?;
        let call = Call::new("patch", "pods", ns, Some(&name));
        let created = self
            .apply(
                cluster,
                &api,
                call,
                &object,
                (&spec.provider, &spec.key.app),
            )
            .await?;
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let data = PodData {
            name: name.clone(),
            namespace: ns.clone(),
            context: cluster.context.clone(),
            app: spec.key.app.clone(),
            provider: spec.provider.clone(),
            service: service.map(str::to_string),
        };
        let exposed = async {
            // The Service is applied as soon as the pod exists (a load
            // balancer is provisioned while the image is pulled), and only
            // after it exists (see `release_service`).
            let (pod_ip, host_ip) = self.wait_started(cluster, &api, ns, &name, &uid).await?;
            match service {
                Some(_) => {
                    self.expose(target, spec, ports, &uid, host_ip.as_deref())
                        .await
                }
                None => {
                    let numbers: BTreeMap<String, u16> =
                        ports.iter().map(|p| (p.name.clone(), p.number)).collect();
                    let address = ports.first().map(|p| host_port(&pod_ip, p.number));
                    Ok((address, numbers))
                }
            }
        };
        let (address, numbers) = match exposed.await {
            Ok(exposed) => exposed,
            Err(e) => {
                // A pod that never ran holds nothing worth keeping.
                if let Err(cleanup) = self.delete_pod(cluster, &api, ns, &name, &uid, None).await {
                    tracing::warn!(pod = %name, error = %cleanup, "cannot remove a pod that failed to start");
                }
                if let Some(svc) = service
                    && let Err(cleanup) = self.release_service(cluster, ns, &data, svc).await
                {
                    tracing::warn!(service = %svc, error = %cleanup, "cannot remove the app's service");
                }
                return Err(e);
            }
        };
        tracing::info!(replica = %spec.key, pod = %name, namespace = %ns, uid = %uid, address = ?address, "pod started");
        Ok(Handle {
            driver: KIND.to_string(),
            instance_id: uid,
            address,
            ports: numbers,
            started_at_ms: now_ms(),
            data: encode(&data)?,
        })
    }
}

/// The same error once more, for every instance a failed list answers for:
/// a throttled list stays throttled, with its delay.
fn again(e: &DriverError) -> DriverError {
    match e {
        DriverError::Throttled {
            message,
            retry_after,
        } => DriverError::Throttled {
            message: message.clone(),
            retry_after: *retry_after,
        },
        DriverError::InvalidWorkload(m) => DriverError::InvalidWorkload(m.clone()),
        DriverError::InvalidSettings(m) => DriverError::InvalidSettings(m.clone()),
        DriverError::Unsupported { driver, operation } => {
            DriverError::Unsupported { driver, operation }
        }
        DriverError::Io { .. } | DriverError::Runtime(_) => DriverError::Runtime(e.to_string()),
    }
}

/// The error for an object of someone else's that holds a name skymirror needs.
fn foreign(call: Call<'_>) -> DriverError {
    DriverError::Runtime(format!(
        "{} {} in namespace {} exists and is not skymirror's; skymirror leaves it alone: remove or \
         rename it",
        call.resource.trim_end_matches('s'),
        call.name.unwrap_or_default(),
        call.namespace
    ))
}

impl Driver for KubernetesDriver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            recover: true,
            exec: false,
            logs: true,
            max_concurrent_operations: MAX_OPERATIONS,
            inspect_interval: self.config.inspect_interval,
            stop_overhead: STOP_OVERHEAD,
            runtime_restarts: true,
        }
    }

    /// `spec.kubernetes` overrides the flags' context and namespace and
    /// brings the objects' metadata, scheduling and exposure; without it the
    /// flags decide and new pods get none of those. An unusable context is
    /// refused and changes nothing.
    async fn configure(&self, settings: &DriverSettings) -> Result<(), DriverError> {
        let (context, namespace, settings, field) = match settings {
            DriverSettings::Unset => (
                self.config.context.clone(),
                self.config.namespace.clone(),
                KubernetesSettings::default(),
                "--kube-context",
            ),
            DriverSettings::Kubernetes(k) => (
                k.context.clone().or_else(|| self.config.context.clone()),
                k.namespace
                    .clone()
                    .or_else(|| self.config.namespace.clone()),
                (**k).clone(),
                "spec.kubernetes.context",
            ),
            other => {
                return Err(DriverError::InvalidSettings(format!(
                    "settings of the {} driver given to the {KIND} driver",
                    other.kind().unwrap_or("unknown")
                )));
            }
        };
        let cluster = self
            .cluster(context.as_deref())
            .await
            .map_err(|e| DriverError::InvalidSettings(format!("{field}: {e}")))?;
        let namespace = namespace.unwrap_or_else(|| cluster.default_namespace.clone());
        tracing::info!(server = %cluster.url, context = ?context, %namespace, expose = ?settings.expose,
            "pods started from now on use these settings");
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(Target {
            cluster,
            namespace,
            settings,
        });
        Ok(())
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<Handle, DriverError> {
        let target = self.target();
        let ports = objects::resolve_ports(&spec.key.app, &spec.workload)?;
        let service = objects::exposed_by_service(&target.settings)
            .then(|| objects::service_name(&spec.provider, &spec.key.app));
        self.run_pod(&target, spec, &ports, service.as_deref())
            .await
    }

    async fn recover(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        self.state(handle).await
    }

    async fn inspect(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        self.state(handle).await
    }

    /// One list of the provider's pods per namespace answers for all of
    /// them; a pod that is not listed (or listed with another uid) is gone.
    async fn inspect_all(&self, handles: &[Handle]) -> Vec<Result<Inspection, DriverError>> {
        let decoded: Vec<Result<PodData, DriverError>> = handles.iter().map(decode).collect();
        let mut listed: HashMap<Place, Result<HashMap<String, Pod>, DriverError>> = HashMap::new();
        for data in decoded.iter().flatten() {
            let key = (
                data.context.clone(),
                data.namespace.clone(),
                data.provider.clone(),
            );
            if listed.contains_key(&key) {
                continue;
            }
            let pods = async {
                let cluster = self.place_of(data).await?;
                let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &data.namespace);
                let params = ListParams::default().labels(&owner_selector(&data.provider));
                let call = Call::new("list", "pods", &data.namespace, None);
                let list = cluster.call(call, &[], api.list(&params)).await?;
                Ok::<_, DriverError>(
                    list.map(|l| l.items)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|p| Some((p.metadata.name.clone()?, p)))
                        .collect::<HashMap<_, _>>(),
                )
            };
            listed.insert(key, pods.await);
        }
        let mut seen = Vec::new();
        let out = handles
            .iter()
            .zip(decoded)
            .map(|(handle, data)| {
                let data = data?;
                let key = (
                    data.context.clone(),
                    data.namespace.clone(),
                    data.provider.clone(),
                );
                let pods = match listed.get(&key) {
                    Some(Ok(pods)) => pods,
                    Some(Err(e)) => return Err(again(e)),
                    None => return Err(DriverError::Runtime("pods were not listed".into())),
                };
                Ok(
                    match pods
                        .get(&data.name)
                        .filter(|p| p.metadata.uid.as_deref() == Some(handle.instance_id.as_str()))
                    {
                        Some(pod) => {
                            self.note_trouble(&data, &handle.instance_id, pod);
                            seen.push(handle.instance_id.clone());
                            status::inspection(pod)
                        }
                        None => Inspection::Exited {
                            code: None,
                            signal: None,
                        },
                    },
                )
            })
            .collect();
        // Forget what was said of pods no replica holds any more.
        self.troubles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|uid, _| seen.contains(uid));
        out
    }

    /// The cluster's words on the pod, as of the last inspection.
    fn remark(&self, handle: &Handle) -> Option<String> {
        self.troubles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&handle.instance_id)
            .cloned()
    }

    /// Deletes the pod with `grace` and waits until it is gone (its name is
    /// then free for the next instance).
    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let cluster = self.place_of(&data).await?;
        let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &data.namespace);
        let (ns, name, uid) = (&data.namespace, &data.name, &handle.instance_id);
        self.delete_pod(&cluster, &api, ns, name, uid, Some(grace))
            .await?;
        self.wait_gone(&cluster, &api, ns, name, uid, grace + STOP_OVERHEAD)
            .await
    }

    /// Deletes the pod if it is still there (without waiting), and the app's
    /// Service once no pod is behind it.
    async fn destroy(&self, handle: &Handle) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let cluster = self.place_of(&data).await?;
        let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &data.namespace);
        self.delete_pod(
            &cluster,
            &api,
            &data.namespace,
            &data.name,
            &handle.instance_id,
            None,
        )
        .await?;
        if let Some(service) = &data.service {
            self.release_service(&cluster, &data.namespace, &data, service)
                .await?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        _handle: &Handle,
        _command: &[String],
        _timeout: Duration,
    ) -> Result<Option<i32>, DriverError> {
        Err(DriverError::Unsupported {
            driver: KIND,
            operation: "exec",
        })
    }

    /// Every pod with the provider's labels in the current namespace, for
    /// removal only: the labels name the replica but not its ports.
    async fn list_instances(&self, provider: &str) -> Result<Vec<Listed>, DriverError> {
        let target = self.target();
        let ns = &target.namespace;
        let api: Api<Pod> = target.api();
        let params = ListParams::default().labels(&owner_selector(provider));
        let call = Call::new("list", "pods", ns, None);
        let pods = target
            .cluster
            .call(call, &[], api.list(&params))
            .await?
            .map(|l| l.items)
            .unwrap_or_default();
        pods.into_iter()
            .filter_map(|pod| {
                let labels = pod.metadata.labels.as_ref()?;
                let data = PodData {
                    name: pod.metadata.name.clone()?,
                    namespace: ns.clone(),
                    context: target.cluster.context.clone(),
                    app: labels.get(LABEL_APP)?.clone(),
                    provider: provider.to_string(),
                    service: labels.get(LABEL_SERVICE).cloned(),
                };
                let replica = (|| {
                    Some(ListedReplica {
                        key: ReplicaKey {
                            app: labels.get(LABEL_APP)?.clone(),
                            index: labels.get(LABEL_INDEX)?.parse().ok()?,
                        },
                        workload_generation: labels.get(LABEL_GENERATION)?.parse().ok()?,
                    })
                })();
                Some((pod.metadata.uid.clone()?, data, replica))
            })
            .map(|(uid, data, replica)| {
                Ok(Listed {
                    handle: Handle {
                        driver: KIND.to_string(),
                        instance_id: uid,
                        address: None,
                        ports: BTreeMap::new(),
                        started_at_ms: 0,
                        data: encode(&data)?,
                    },
                    replica,
                    adoptable: false,
                })
            })
            .collect()
    }

    /// The container's output through the pods log API; while the container
    /// waits to restart (a crash loop), the previous one's.
    async fn logs(
        &self,
        handle: &Handle,
        options: LogOptions,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let cluster = self.place_of(&data).await?;
        let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &data.namespace);
        let call = Call::new("get", "pods/log", &data.namespace, Some(&data.name));
        let params = |previous: bool| LogParams {
            container: Some(CONTAINER.to_string()),
            follow: options.follow && !previous,
            previous,
            tail_lines: Some(i64::from(options.tail_lines)),
            ..Default::default()
        };
        let gone =
            || DriverError::Runtime(format!("pod {} is gone, and its output with it", data.name));
        let stream = match cluster
            .call(
                call,
                &[400, 404],
                api.log_stream(&data.name, &params(false)),
            )
            .await?
        {
            Ok(stream) => stream,
            Err(404) => return Err(gone()),
            // The container waits to run again: its last run's output.
            Err(_) => match cluster
                .call(call, &[400, 404], api.log_stream(&data.name, &params(true)))
                .await?
            {
                Ok(stream) => stream,
                Err(404) => return Err(gone()),
                Err(_) => {
                    return Err(DriverError::Runtime(format!(
                        "pod {}: its container has not run yet, so it has no output",
                        data.name
                    )));
                }
            },
        };
        let mut stream = std::pin::pin!(stream);
        let mut buf = vec![0u8; MAX_LOG_CHUNK];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| DriverError::io(format!("read the output of pod {}", data.name), e))?;
            if n == 0 || out.send(buf[..n].to_vec()).await.is_err() {
                return Ok(());
            }
        }
    }
}
