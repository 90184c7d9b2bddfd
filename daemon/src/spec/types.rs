//! The domain types of the declarative specs, and their YAML shape (serde).
//!
//! Most types serialize as themselves. Three differ from their YAML shape: [`AppSpec`],
//! whose [`Workload`] fields sit directly under `spec`, [`HealthCheck`], whose probe is
//! one of the sibling keys `http`, `tcp` or `exec`, and [`KubernetesSettings`], whose
//! [`Expose`] is the sibling keys `expose` and `serviceType`. They go through a private
//! wire struct rather than `#[serde(flatten)]`, which would lose field paths, positions
//! and `deny_unknown_fields`; so does [`ProviderSpec`], which holds the Kubernetes one,
//! so that its problems are placed in the text like every other field's.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, IgnoredAny};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::fields::{self, ApiVersion};
use super::path::{FieldPath, Issue};
use super::{API_VERSION, duration, validate};

/// One object of a spec file: a `Provider` or an `App`.
///
/// Serializes as the YAML document (`apiVersion`, `kind`, `metadata`, `spec`).
/// Deserializing also validates what can be checked from the object alone.
// Not boxed: documents are few and short-lived, and plain variants keep matching simple.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// A place where replicas run.
    Provider(Provider),
    /// An application.
    App(App),
}

impl Document {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Provider(_) => Kind::Provider,
            Self::App(_) => Kind::App,
        }
    }

    /// The object's name (`metadata.name`).
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Provider(p) => &p.metadata,
            Self::App(a) => &a.metadata,
        }
    }

    /// The document as YAML, in the shape [`parse_documents`](super::parse_documents)
    /// reads (without a leading `---`).
    pub fn to_yaml(&self) -> String {
        // Every type here serializes to plain mappings, sequences and strings, which
        // serde_yaml_ng always accepts.
        serde_yaml_ng::to_string(self).expect("spec documents always serialize to YAML")
    }
}

impl Serialize for Document {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut doc = serializer.serialize_struct("Document", 4)?;
        doc.serialize_field("apiVersion", API_VERSION)?;
        doc.serialize_field("kind", &self.kind())?;
        match self {
            Self::Provider(p) => {
                doc.serialize_field("metadata", &p.metadata)?;
                doc.serialize_field("spec", &p.spec)?;
            }
            Self::App(a) => {
                doc.serialize_field("metadata", &a.metadata)?;
                doc.serialize_field("spec", &a.spec)?;
            }
        }
        doc.end()
    }
}

/// The YAML shape of a document for [`Document`]'s `Deserialize`.
#[allow(clippy::large_enum_variant)]
#[derive(Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
enum DocumentRepr {
    Provider {
        #[serde(rename = "apiVersion")]
        _api_version: ApiVersion,
        metadata: ObjectMeta,
        spec: ProviderSpec,
    },
    App {
        #[serde(rename = "apiVersion")]
        _api_version: ApiVersion,
        metadata: ObjectMeta,
        spec: AppSpec,
    },
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let document = match DocumentRepr::deserialize(deserializer)? {
            DocumentRepr::Provider { metadata, spec, .. } => {
                Self::Provider(Provider { metadata, spec })
            }
            DocumentRepr::App { metadata, spec, .. } => Self::App(App { metadata, spec }),
        };
        match validate::document(&document).into_iter().next() {
            Some(issue) => Err(de::Error::custom(issue)),
            None => Ok(document),
        }
    }
}

/// The typed YAML shape of one document whose kind is already known; used by
/// [`parse_documents`](super::parse_documents) so that serde reports field paths.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DocumentWire<S> {
    #[serde(rename = "apiVersion")]
    _api_version: ApiVersion,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    pub(super) metadata: ObjectMeta,
    pub(super) spec: S,
}

/// The kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`Provider`].
    Provider,
    /// [`App`].
    App,
}

impl Kind {
    /// Every kind, in the order they are listed to people.
    pub const ALL: [Kind; 2] = [Kind::Provider, Kind::App];

    /// The name used in `kind:` fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "Provider",
            Self::App => "App",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind name that is not one of [`Kind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind `{0}`, expected one of: Provider, App")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts `Provider`, `App` and their lowercase and plural forms (as typed on a
    /// command line), case-insensitively.
    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        match s.to_ascii_lowercase().as_str() {
            "provider" | "providers" => Ok(Self::Provider),
            "app" | "apps" => Ok(Self::App),
            _ => Err(UnknownKind(s.to_owned())),
        }
    }
}

/// Metadata common to every object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within its kind: 1 to 63 of `[a-z0-9-]`, starting and ending alphanumeric.
    pub name: String,
    /// Free-form labels, matched by placement selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A place where replicas run: one cloud account and region, one cluster, one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// What the provider is.
    pub spec: ProviderSpec,
}

/// The `spec` of a [`Provider`].
///
/// At most one settings block is set, the one named like `driver` (validation rejects the
/// others); none means the agent's own flags decide. Settings are sent to the provider's
/// agent with every assignment. They never hold credentials: the agent takes those from
/// its own environment (the AWS credential chain, its kubeconfig or service account, its
/// Docker socket).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "ProviderSpecWire", into = "ProviderSpecWire")]
pub struct ProviderSpec {
    /// Driver the provider's agent uses.
    pub driver: DriverKind,
    /// Higher serves first in active-passive placement. Default 0.
    pub priority: i32,
    /// Most replicas (of all apps) the provider may run; 0 means unlimited.
    pub capacity: u32,
    /// Free text shown by `describe`.
    pub description: String,
    /// Settings of the docker driver (`spec.docker`).
    pub docker: Option<DockerSettings>,
    /// Settings of the ec2 driver (`spec.ec2`).
    pub ec2: Option<Ec2Settings>,
    /// Settings of the kubernetes driver (`spec.kubernetes`).
    pub kubernetes: Option<KubernetesSettings>,
}

impl ProviderSpec {
    /// A provider of `driver` with priority 0, no capacity limit, no description and no
    /// settings. A starting point for building specs in code.
    pub fn new(driver: DriverKind) -> Self {
        Self {
            driver,
            priority: 0,
            capacity: 0,
            description: String::new(),
            docker: None,
            ec2: None,
            kubernetes: None,
        }
    }
}

/// Settings of the `docker` driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DockerSettings {
    /// Docker network the replicas join instead of publishing ports (a provider whose
    /// replicas live on a private network); not `host` or `none`, which give a container
    /// no address of its own. `None`: the agent's `--docker-network`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// IP address ports are published on when there is no network. `None`: the agent's
    /// `--bind-host` (127.0.0.1 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_host: Option<String>,
}

/// Settings of the `ec2` driver: a replica is one instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ec2Settings {
    /// AWS region the instances run in, e.g. `eu-west-1`.
    pub region: String,
    /// AMI the instances boot, `ami-` and 8 or 17 hexadecimal digits.
    pub ami: String,
    /// Instance type, e.g. `t3.small`.
    pub instance_type: String,
    /// Subnet the instances are placed in, `subnet-…`; it decides the VPC and zone.
    pub subnet_id: String,
    /// Security groups of the instances, `sg-…`; empty: the VPC's default group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// EC2 key pair for SSH access to the instances; `None`: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// IAM instance profile (name or ARN) the instances run with, e.g. to pull images
    /// from a private registry; `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// Extra tags on every instance, for cost allocation and ownership. Keys starting
    /// with `aws:` (AWS's) or `skymirror` (skymirror's own identity tags) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Which address of an instance replicas are reached at. Default private.
    #[serde(default)]
    pub address: Ec2Address,
    /// EC2 API endpoint to use instead of AWS's (moto, LocalStack), an http(s) URL;
    /// `None`: AWS's endpoint for `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// User-data template the instances boot with; `None`: the built-in one that
    /// starts the app. At most 16 KiB, AWS's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// Which address of an EC2 instance its replica is reached at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ec2Address {
    /// The address in the subnet (the default): the agent, the front door and the
    /// daemon reach the instances inside the VPC or over a peering.
    #[default]
    Private,
    /// The public address: for instances reached over the internet.
    Public,
}

impl Ec2Address {
    /// Every address kind.
    pub const ALL: [Ec2Address; 2] = [Self::Private, Self::Public];

    /// `private` or `public`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
        }
    }
}

/// Default Kubernetes namespace of a provider's objects.
pub(super) const DEFAULT_NAMESPACE: &str = "default";

/// Settings of the `kubernetes` driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "KubernetesWire", into = "KubernetesWire")]
pub struct KubernetesSettings {
    /// Namespace the replicas' objects live in. Default `default`.
    pub namespace: String,
    /// kubeconfig context; `None`: the current context, or the in-cluster configuration
    /// when the agent runs as a pod.
    pub context: Option<String>,
    /// Extra labels on every object; `skymirror.dev/` keys are skymirror's own.
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on every object; `skymirror.dev/` keys are skymirror's own.
    pub annotations: BTreeMap<String, String>,
    /// Node selector of the replicas' pods.
    pub node_selector: BTreeMap<String, String>,
    /// Taints the replicas' pods tolerate.
    pub tolerations: Vec<Toleration>,
    /// Secrets (in `namespace`) the kubelet pulls the app's image with.
    pub image_pull_secrets: Vec<String>,
    /// How replicas are reached. Default [`Expose::Pods`].
    pub expose: Expose,
}

impl Default for KubernetesSettings {
    /// The `default` namespace, replicas reached at their pods' addresses, nothing else.
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            context: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            image_pull_secrets: Vec::new(),
            expose: Expose::Pods,
        }
    }
}

/// How the replicas of a Kubernetes provider are reached. In YAML: `expose: pods`, or
/// `expose: service` with an optional `serviceType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Expose {
    /// At each pod's own address (the default): the agent, the front door and the
    /// daemon are on the cluster's pod network.
    #[default]
    Pods,
    /// Through one Service per app, of this type: for front doors outside the cluster.
    Service(ServiceType),
}

impl Expose {
    /// `pods` or `service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Service(_) => "service",
        }
    }
}

/// The `expose` key alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExposeKind {
    #[default]
    Pods,
    Service,
}

/// Type of the Service of [`Expose::Service`], as Kubernetes names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// Reachable inside the cluster only (the default).
    #[default]
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// Every Service type.
    pub const ALL: [ServiceType; 3] = [Self::ClusterIp, Self::NodePort, Self::LoadBalancer];

    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A Kubernetes toleration, as in a pod spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key; empty (with operator `Exists`) tolerates every taint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// How `value` is compared. Default `Equal`.
    #[serde(default)]
    pub operator: TolerationOperator,
    /// Taint value for `Equal`; empty for `Exists`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Taint effect tolerated; `None`: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

/// How a [`Toleration`] matches a taint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TolerationOperator {
    /// Key and value equal (the default, as in Kubernetes).
    #[default]
    Equal,
    /// Key present, whatever the value.
    Exists,
}

impl TolerationOperator {
    /// Every operator.
    pub const ALL: [TolerationOperator; 2] = [Self::Equal, Self::Exists];

    /// `Equal` or `Exists`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equal => "Equal",
            Self::Exists => "Exists",
        }
    }
}

/// The effect of a Kubernetes taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaintEffect {
    /// New pods are not scheduled on the node.
    NoSchedule,
    /// The scheduler avoids the node.
    PreferNoSchedule,
    /// Running pods are evicted too.
    NoExecute,
}

impl TaintEffect {
    /// Every effect.
    pub const ALL: [TaintEffect; 3] = [Self::NoSchedule, Self::PreferNoSchedule, Self::NoExecute];

    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// The runtimes an agent can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Local processes.
    Process,
    /// Docker containers.
    Docker,
    /// Kubernetes deployments.
    Kubernetes,
    /// EC2 instances.
    Ec2,
}

impl DriverKind {
    /// Every driver.
    pub const ALL: [DriverKind; 4] = [Self::Process, Self::Docker, Self::Kubernetes, Self::Ec2];

    /// The name used in YAML and in the API: `process`, `docker`, `kubernetes`, `ec2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Docker => "docker",
            Self::Kubernetes => "kubernetes",
            Self::Ec2 => "ec2",
        }
    }
}

/// An application: what to run, how many, where, how to check it and route to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// The desired state.
    pub spec: AppSpec,
}

/// The `spec` of an [`App`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "AppSpecWire", into = "AppSpecWire")]
pub struct AppSpec {
    /// What each replica runs. In YAML its fields sit directly under `spec`.
    pub workload: Workload,
    /// Replicas per provider (mirror, active-passive) or in total (spread), at most
    /// [`MAX_REPLICAS`](super::MAX_REPLICAS).
    pub replicas: u32,
    /// Which providers run the app and how replicas are divided.
    pub placement: Placement,
    /// How agents decide a replica is healthy; `None`: running means healthy.
    pub health: Option<HealthCheck>,
    /// What happens when a provider is lost.
    pub failover: FailoverPolicy,
    /// How the front door routes to the app; `None`: not routed.
    pub routing: Option<Routing>,
}

/// One replica of a default [`Workload`] (neither image nor command, so not valid as
/// it is), placed everywhere in mirror mode, with the default failover and no health
/// check or routing. A starting point for building specs in code.
impl Default for AppSpec {
    fn default() -> Self {
        Self {
            workload: Workload::default(),
            replicas: 1,
            placement: Placement::default(),
            health: None,
            failover: FailoverPolicy::default(),
            routing: None,
        }
    }
}

/// The part of an app a driver needs to start one replica. Changing it replaces the
/// app's replicas; changing the rest of the spec does not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Container image (docker, kubernetes and ec2 drivers).
    pub image: Option<String>,
    /// Program to run (process driver) or the container entrypoint override.
    pub command: Option<String>,
    /// Arguments for `command`.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Named ports the app listens on.
    pub ports: Vec<Port>,
    /// Working directory for the process driver; `None`: the replica's own directory.
    pub working_dir: Option<String>,
    /// Resource hints.
    pub resources: Resources,
    /// Time between SIGTERM and SIGKILL when a replica stops. Default 10s; whole seconds.
    pub stop_grace_period: Duration,
}

/// Default time between SIGTERM and SIGKILL.
pub(super) const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

impl Default for Workload {
    fn default() -> Self {
        Self {
            image: None,
            command: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            working_dir: None,
            resources: Resources::default(),
            stop_grace_period: DEFAULT_STOP_GRACE,
        }
    }
}

/// A named port of an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    /// 1 to 15 of `[a-z0-9-]`, unique in the app. Replicas see it as `PORT_<NAME>`.
    pub name: String,
    /// Port inside the container (image-based drivers); `None`: the same as the host port.
    #[serde(
        default,
        deserialize_with = "fields::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_port: Option<u16>,
    /// Transport protocol. Default tcp.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a [`Port`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Resource hints; drivers that can enforce them do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// CPU limit in thousandths of a core; `None`: no limit.
    #[serde(
        default,
        deserialize_with = "fields::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_millis: Option<u32>,
    /// Memory limit in MiB; `None`: no limit.
    #[serde(
        rename = "memoryMiB",
        default,
        deserialize_with = "fields::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_mib: Option<u32>,
}

impl Resources {
    fn is_unset(&self) -> bool {
        self.cpu_millis.is_none() && self.memory_mib.is_none()
    }
}

/// Where an app runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// How replicas are divided. Default mirror.
    pub mode: PlacementMode,
    /// Providers that may run the app; empty means every provider.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<PlacementTarget>,
    /// Active-passive: replicas kept warm on each standby provider. Default 0.
    #[serde(deserialize_with = "fields::int")]
    pub standby_replicas: u32,
}

/// How an app's replicas are divided over its providers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementMode {
    /// Every selected provider runs `replicas` (active-active). The default.
    #[default]
    Mirror,
    /// The highest-priority healthy provider runs `replicas`; the others keep standbys.
    ActivePassive,
    /// `replicas` in total, divided by weight.
    Spread,
}

impl PlacementMode {
    /// The name used in YAML: `mirror`, `active-passive` or `spread`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::ActivePassive => "active-passive",
            Self::Spread => "spread",
        }
    }
}

/// One entry of a placement: a provider by name, or the providers matching a selector.
/// Exactly one of `name` and `selector` is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlacementTarget {
    /// A provider's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels a provider must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Share in spread placement and in routing; at least 1. Default 1.
    #[serde(default = "one", deserialize_with = "fields::int")]
    pub weight: u32,
    /// Overrides the provider's own priority for this app.
    #[serde(
        default,
        deserialize_with = "fields::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub priority: Option<i32>,
}

fn one() -> u32 {
    1
}

impl Default for PlacementTarget {
    fn default() -> Self {
        Self {
            name: None,
            selector: BTreeMap::new(),
            weight: 1,
            priority: None,
        }
    }
}

/// How agents check a replica's health.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "HealthWire", into = "HealthWire")]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between probes. Default 2s.
    pub interval: Duration,
    /// Time a probe may take; at most `interval`. Default 1s.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy replica unhealthy. Default 3.
    pub failure_threshold: u32,
    /// Consecutive successes that make a replica healthy. Default 1.
    pub success_threshold: u32,
}

pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
pub(super) const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;

impl HealthCheck {
    /// A check with `probe` and the default timings and thresholds.
    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
        }
    }
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// An HTTP GET answered with a 2xx or 3xx status.
    Http {
        /// Request path, starting with '/'.
        path: String,
        /// Name of the app port to probe.
        port: String,
    },
    /// A TCP connection that opens.
    Tcp {
        /// Name of the app port to probe.
        port: String,
    },
    /// A command that exits 0.
    Exec {
        /// Program and arguments, run in the replica's environment.
        command: Vec<String>,
    },
}

/// What happens when a provider is lost.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverPolicy {
    /// Re-place a down provider's share on the survivors. Default true.
    pub spill: bool,
    /// Most extra replicas started on survivors, in total; 0 means no limit.
    #[serde(deserialize_with = "fields::int")]
    pub max_extra_replicas: u32,
    /// How long a recovered provider must stay healthy before it gets its share back.
    /// Default 30s; whole seconds.
    #[serde(with = "duration::text")]
    pub failback_after: Duration,
    /// At most one serving copy anywhere.
    pub singleton: bool,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self {
            spill: true,
            max_extra_replicas: 0,
            failback_after: Duration::from_secs(30),
            singleton: false,
        }
    }
}

/// How the front door routes traffic to an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Routing {
    /// Socket address the front door listens on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// Host names routed to the app (HTTP); empty routes every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Name of the app port traffic goes to.
    pub port: String,
    /// Default http.
    #[serde(default)]
    pub protocol: RoutingProtocol,
    /// Longest wait for a replica's response head, per attempt (HTTP). A replica
    /// that accepts connections and never answers (a frozen process, a paused VM)
    /// must not hold requests for ever; an idempotent request that waited this long
    /// is retried elsewhere, another gets a 504. Default 15s.
    #[serde(
        default = "default_response_timeout",
        with = "duration::text",
        skip_serializing_if = "is_default_response_timeout"
    )]
    pub response_timeout: Duration,
    /// Whether an idempotent request that has not been answered within a delay
    /// learned from recent latency is also sent to another provider, the first
    /// answer winning (HTTP). Default true; requests that are not idempotent are
    /// never sent twice either way.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub hedge: bool,
    /// How the front door talks to the replicas (HTTP): `http1` (the default) or
    /// `h2c` (HTTP/2 without TLS, for gRPC).
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub upstream_protocol: UpstreamProtocol,
}

/// Default of [`Routing::response_timeout`].
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

fn default_response_timeout() -> Duration {
    DEFAULT_RESPONSE_TIMEOUT
}

fn is_default_response_timeout(d: &Duration) -> bool {
    *d == DEFAULT_RESPONSE_TIMEOUT
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_true(b: &bool) -> bool {
    *b
}

/// How the front door talks to an app's replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections (the default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, without TLS: gRPC and other HTTP/2-only apps.
    H2c,
}

impl UpstreamProtocol {
    /// `http1` or `h2c`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
        }
    }

    fn is_default(&self) -> bool {
        *self == Self::Http1
    }
}

/// How the front door forwards traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingProtocol {
    /// HTTP, routed by host name (the default).
    #[default]
    Http,
    /// Raw TCP.
    Tcp,
}

impl RoutingProtocol {
    /// `http` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// The YAML shape of an app's `spec`: the workload's fields flat beside the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AppSpecWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Resources::is_unset")]
    resources: Resources,
    #[serde(default = "default_stop_grace", with = "duration::text")]
    stop_grace_period: Duration,
    #[serde(deserialize_with = "fields::int")]
    replicas: u32,
    #[serde(default)]
    placement: Placement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<HealthWire>,
    #[serde(default)]
    failover: FailoverPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    routing: Option<Routing>,
}

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

impl TryFrom<AppSpecWire> for AppSpec {
    /// A health check without exactly one probe; the path is relative to `spec`.
    type Error = Issue;

    fn try_from(w: AppSpecWire) -> Result<Self, Issue> {
        let health = match w.health {
            Some(health) => Some(HealthCheck::try_from(health).map_err(|e| e.under("health"))?),
            None => None,
        };
        Ok(Self {
            workload: Workload {
                image: w.image,
                command: w.command,
                args: w.args,
                env: w.env,
                ports: w.ports,
                working_dir: w.working_dir,
                resources: w.resources,
                stop_grace_period: w.stop_grace_period,
            },
            replicas: w.replicas,
            placement: w.placement,
            health,
            failover: w.failover,
            routing: w.routing,
        })
    }
}

impl From<AppSpec> for AppSpecWire {
    fn from(s: AppSpec) -> Self {
        let w = s.workload;
        Self {
            image: w.image,
            command: w.command,
            args: w.args,
            env: w.env,
            working_dir: w.working_dir,
            ports: w.ports,
            resources: w.resources,
            stop_grace_period: w.stop_grace_period,
            replicas: s.replicas,
            placement: s.placement,
            health: s.health.map(HealthWire::from),
            failover: s.failover,
            routing: s.routing,
        }
    }
}

/// The YAML shape of a health check: the probe is one of three sibling keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HealthWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<HttpProbeWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp: Option<TcpProbeWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec: Option<ExecProbeWire>,
    #[serde(default = "default_interval", with = "duration::text")]
    interval: Duration,
    #[serde(default = "default_timeout", with = "duration::text")]
    timeout: Duration,
    #[serde(
        default = "default_failure_threshold",
        deserialize_with = "fields::int"
    )]
    failure_threshold: u32,
    #[serde(
        default = "default_success_threshold",
        deserialize_with = "fields::int"
    )]
    success_threshold: u32,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_failure_threshold() -> u32 {
    DEFAULT_FAILURE_THRESHOLD
}

fn default_success_threshold() -> u32 {
    DEFAULT_SUCCESS_THRESHOLD
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpProbeWire {
    path: String,
    port: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpProbeWire {
    port: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecProbeWire {
    command: Vec<String>,
}

impl TryFrom<HealthWire> for HealthCheck {
    /// Not exactly one probe; the path is relative to the health check.
    type Error = Issue;

    fn try_from(w: HealthWire) -> Result<Self, Issue> {
        let probe = match (w.http, w.tcp, w.exec) {
            (Some(http), None, None) => Probe::Http {
                path: http.path,
                port: http.port,
            },
            (None, Some(tcp), None) => Probe::Tcp { port: tcp.port },
            (None, None, Some(exec)) => Probe::Exec {
                command: exec.command,
            },
            (None, None, None) => {
                return Err(Issue::new(
                    FieldPath::default(),
                    "set one of `http`, `tcp` or `exec` to say how to probe",
                ));
            }
            (http, tcp, _) => {
                // Point at the second probe given: the first one is the one that counts.
                let second = if http.is_some() && tcp.is_some() {
                    "tcp"
                } else {
                    "exec"
                };
                return Err(Issue::new(
                    FieldPath::of(&[second]),
                    "only one of `http`, `tcp` or `exec` may be set",
                ));
            }
        };
        Ok(Self {
            probe,
            interval: w.interval,
            timeout: w.timeout,
            failure_threshold: w.failure_threshold,
            success_threshold: w.success_threshold,
        })
    }
}

impl From<HealthCheck> for HealthWire {
    fn from(h: HealthCheck) -> Self {
        let (mut http, mut tcp, mut exec) = (None, None, None);
        match h.probe {
            Probe::Http { path, port } => http = Some(HttpProbeWire { path, port }),
            Probe::Tcp { port } => tcp = Some(TcpProbeWire { port }),
            Probe::Exec { command } => exec = Some(ExecProbeWire { command }),
        }
        Self {
            http,
            tcp,
            exec,
            interval: h.interval,
            timeout: h.timeout,
            failure_threshold: h.failure_threshold,
            success_threshold: h.success_threshold,
        }
    }
}

/// The YAML shape of a provider's `spec`; differs from [`ProviderSpec`] only in holding
/// the Kubernetes settings in their YAML shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ProviderSpecWire {
    driver: DriverKind,
    #[serde(default, deserialize_with = "fields::int")]
    priority: i32,
    #[serde(default, deserialize_with = "fields::int")]
    capacity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    docker: Option<DockerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ec2: Option<Ec2Settings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesWire>,
}

impl TryFrom<ProviderSpecWire> for ProviderSpec {
    /// Kubernetes settings whose `serviceType` goes without `expose: service`; the path
    /// is relative to `spec`.
    type Error = Issue;

    fn try_from(w: ProviderSpecWire) -> Result<Self, Issue> {
        let kubernetes = match w.kubernetes {
            Some(k) => Some(KubernetesSettings::try_from(k).map_err(|e| e.under("kubernetes"))?),
            None => None,
        };
        Ok(Self {
            driver: w.driver,
            priority: w.priority,
            capacity: w.capacity,
            description: w.description,
            docker: w.docker,
            ec2: w.ec2,
            kubernetes,
        })
    }
}

impl From<ProviderSpec> for ProviderSpecWire {
    fn from(s: ProviderSpec) -> Self {
        Self {
            driver: s.driver,
            priority: s.priority,
            capacity: s.capacity,
            description: s.description,
            docker: s.docker,
            ec2: s.ec2,
            kubernetes: s.kubernetes.map(KubernetesWire::from),
        }
    }
}

/// The YAML shape of the Kubernetes settings: [`Expose`] is two sibling keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct KubernetesWire {
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    context: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    image_pull_secrets: Vec<String>,
    #[serde(default)]
    expose: ExposeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_type: Option<ServiceType>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

impl TryFrom<KubernetesWire> for KubernetesSettings {
    /// `serviceType` without `expose: service`; the path is relative to the settings.
    type Error = Issue;

    fn try_from(w: KubernetesWire) -> Result<Self, Issue> {
        let expose = match (w.expose, w.service_type) {
            (ExposeKind::Pods, None) => Expose::Pods,
            (ExposeKind::Service, service_type) => {
                Expose::Service(service_type.unwrap_or_default())
            }
            (ExposeKind::Pods, Some(_)) => {
                return Err(Issue::new(
                    FieldPath::of(&["serviceType"]),
                    "only used with `expose: service`; pods are reached at their own addresses",
                ));
            }
        };
        Ok(Self {
            namespace: w.namespace,
            context: w.context,
            labels: w.labels,
            annotations: w.annotations,
            node_selector: w.node_selector,
            tolerations: w.tolerations,
            image_pull_secrets: w.image_pull_secrets,
            expose,
        })
    }
}

impl From<KubernetesSettings> for KubernetesWire {
    fn from(k: KubernetesSettings) -> Self {
        let (expose, service_type) = match k.expose {
            Expose::Pods => (ExposeKind::Pods, None),
            Expose::Service(t) => (ExposeKind::Service, Some(t)),
        };
        Self {
            namespace: k.namespace,
            context: k.context,
            labels: k.labels,
            annotations: k.annotations,
            node_selector: k.node_selector,
            tolerations: k.tolerations,
            image_pull_secrets: k.image_pull_secrets,
            expose,
            service_type,
        }
    }
}
