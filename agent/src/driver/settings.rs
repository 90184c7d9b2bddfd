//! A provider's driver settings, in the agent's own terms: the block of its
//! Provider document for its driver (`spec.docker`, `spec.ec2`,
//! `spec.kubernetes`), sent with every assignment and handed to the driver by
//! [`super::Driver::configure`]. `crate::convert` builds them from the wire and
//! checks what can be checked without the runtime; the driver checks the rest.
//!
//! Settings never hold credentials: a driver takes those from the agent's own
//! environment (AWS's credential chain, a kubeconfig or service account).

use std::collections::BTreeMap;
use std::net::IpAddr;

/// The settings of one provider's driver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DriverSettings {
    /// The Provider document has no settings block: the driver runs on the
    /// agent's flags.
    #[default]
    Unset,
    /// `spec.docker`.
    Docker(DockerSettings),
    /// `spec.ec2` (boxed: it is far larger than the others).
    Ec2(Box<Ec2Settings>),
    /// `spec.kubernetes` (boxed: it is far larger than the others).
    Kubernetes(Box<KubernetesSettings>),
}

impl DriverSettings {
    /// The driver kind the settings are for, as [`super::Driver::kind`]
    /// names it; `None` when unset.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            DriverSettings::Unset => None,
            DriverSettings::Docker(_) => Some("docker"),
            DriverSettings::Ec2(_) => Some("ec2"),
            DriverSettings::Kubernetes(_) => Some("kubernetes"),
        }
    }
}

/// `spec.docker`: where containers are reached. Both override the agent's
/// flags (`--docker-network`, `--bind-host`) for containers started after
/// they arrive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerSettings {
    /// Docker network the containers join instead of publishing ports;
    /// `None` (empty in the document) publishes each port on `bind_host`,
    /// whatever `--docker-network` says.
    pub network: Option<String>,
    /// Host address ports are published on; `None`: the agent's `--bind-host`.
    pub bind_host: Option<IpAddr>,
}

/// `spec.ec2`: a replica is one instance. `None` is a field the document
/// leaves empty: the driver's default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ec2Settings {
    /// AWS region, e.g. `eu-west-1`; `None`: the credential chain's region.
    pub region: Option<String>,
    /// AMI the instances boot, `ami-…`.
    pub ami: Option<String>,
    /// Instance type, e.g. `t3.small`.
    pub instance_type: Option<String>,
    /// Subnet the instances are placed in, `subnet-…`.
    pub subnet_id: Option<String>,
    /// Security groups of the instances, `sg-…`.
    pub security_group_ids: Vec<String>,
    /// EC2 key pair for SSH access.
    pub key_name: Option<String>,
    /// IAM instance profile (name or ARN) the instances run with.
    pub iam_instance_profile: Option<String>,
    /// Extra tags on every instance (skymirror's own tags win).
    pub tags: BTreeMap<String, String>,
    /// Which address replicas are reached at.
    pub address: Ec2Address,
    /// EC2 API endpoint instead of AWS's (moto, LocalStack).
    pub endpoint_url: Option<String>,
    /// User-data template; `None`: the driver's own, which starts the app.
    pub user_data: Option<String>,
}

/// Which address of an instance its replica is reached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ec2Address {
    /// The private address (inside the VPC).
    #[default]
    Private,
    /// The public address.
    Public,
}

/// `spec.kubernetes`. `None` is a field the document leaves empty: the
/// driver's default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubernetesSettings {
    /// Namespace the replicas' objects live in.
    pub namespace: Option<String>,
    /// kubeconfig context; `None`: the current one, or the in-cluster
    /// configuration in a pod.
    pub context: Option<String>,
    /// Extra labels on every object (skymirror's own labels win).
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on every object.
    pub annotations: BTreeMap<String, String>,
    /// Node selector of the replicas' pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the replicas' pods.
    pub tolerations: Vec<Toleration>,
    /// Secrets the kubelet pulls images with.
    pub image_pull_secrets: Vec<String>,
    /// How replicas are reached.
    pub expose: KubernetesExpose,
    /// Type of the Service with [`KubernetesExpose::Service`].
    pub service_type: ServiceType,
}

/// How the replicas of a Kubernetes provider are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KubernetesExpose {
    /// Each pod at its own address.
    #[default]
    Pods,
    /// One Service per app.
    Service,
}

/// A Kubernetes Service type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// `ClusterIP`, Kubernetes' default.
    #[default]
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
}

/// A toleration, as in a pod spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    /// Taint key; `None` matches every key (with `Exists`).
    pub key: Option<String>,
    /// How the value is matched.
    pub operator: TolerationOperator,
    /// Taint value, with `Equal`.
    pub value: Option<String>,
    /// Taint effect tolerated; `None`: all.
    pub effect: Option<TaintEffect>,
}

/// How a toleration matches a taint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TolerationOperator {
    /// The values are equal (Kubernetes' default).
    #[default]
    Equal,
    /// Any value.
    Exists,
}

/// A taint effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    /// `NoSchedule`.
    NoSchedule,
    /// `PreferNoSchedule`.
    PreferNoSchedule,
    /// `NoExecute`.
    NoExecute,
}
