//! Conversions between the domain types and the generated protobuf types. Wire types
//! stay at the edge: the API converts on the way in (`TryFrom`, which also validates)
//! and on the way out (`From`).
//!
//! proto3 cannot tell an unset scalar from zero, so zero stands for "the default" where
//! the default is non-zero and zero is invalid anyway (weight, thresholds, probe timings,
//! stop grace period); domain → protobuf → domain is lossless for valid objects.

use std::collections::BTreeMap;
use std::time::Duration;

use skymirror_proto::v1 as pb;

use super::path::Issue;
use super::types::DEFAULT_RESPONSE_TIMEOUT;
use super::types::{
    App, AppSpec, DEFAULT_FAILURE_THRESHOLD, DEFAULT_INTERVAL, DEFAULT_NAMESPACE,
    DEFAULT_STOP_GRACE, DEFAULT_SUCCESS_THRESHOLD, DEFAULT_TIMEOUT, DockerSettings, DriverKind,
    Ec2Address, Ec2Settings, Expose, FailoverPolicy, HealthCheck, KubernetesSettings, ObjectMeta,
    Placement, PlacementMode, PlacementTarget, Port, Probe, Protocol, Provider, ProviderSpec,
    Resources, Routing, RoutingProtocol, ServiceType, TaintEffect, Toleration, TolerationOperator,
    UpstreamProtocol, Workload,
};
use super::validate;

/// Why a protobuf object is not a valid domain object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required message field is absent.
    #[error("missing field `{field}`")]
    Missing {
        /// Path of the field, e.g. `spec.workload`.
        field: &'static str,
    },
    /// A field holds a value the domain does not accept.
    #[error("invalid field `{field}`: {message}")]
    Invalid {
        /// Path of the field in YAML terms, e.g. `spec.ports[1].name`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ConvertError {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The first of `issues`, if any.
    fn first(issues: Vec<Issue>) -> Result<(), Self> {
        match issues.into_iter().next() {
            Some(issue) => Err(Self::Invalid {
                field: issue.path.to_string(),
                message: issue.message,
            }),
            None => Ok(()),
        }
    }
}

fn meta_to_pb(meta: &ObjectMeta) -> pb::ObjectMeta {
    pb::ObjectMeta {
        name: meta.name.clone(),
        labels: meta
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..Default::default()
    }
}

fn meta_from_pb(meta: Option<pb::ObjectMeta>) -> Result<ObjectMeta, ConvertError> {
    let meta = meta.ok_or(ConvertError::Missing { field: "metadata" })?;
    Ok(ObjectMeta {
        name: meta.name,
        labels: meta.labels.into_iter().collect(),
    })
}

/// `generation` and the timestamps are left 0; the caller fills them.
impl From<&Provider> for pb::Provider {
    fn from(p: &Provider) -> Self {
        pb::Provider {
            metadata: Some(meta_to_pb(&p.metadata)),
            spec: Some(pb::ProviderSpec {
                driver: p.spec.driver.as_str().to_owned(),
                priority: p.spec.priority,
                capacity: p.spec.capacity,
                description: p.spec.description.clone(),
                settings: provider_settings_to_pb(&p.spec),
            }),
        }
    }
}

/// Validates like [`parse_documents`](super::parse_documents) does.
impl TryFrom<pb::Provider> for Provider {
    type Error = ConvertError;

    fn try_from(p: pb::Provider) -> Result<Self, ConvertError> {
        let metadata = meta_from_pb(p.metadata)?;
        let spec = p.spec.ok_or(ConvertError::Missing { field: "spec" })?;
        let driver = DriverKind::ALL
            .into_iter()
            .find(|d| d.as_str() == spec.driver)
            .ok_or_else(|| {
                ConvertError::invalid(
                    "spec.driver",
                    format!(
                        "unknown driver {:?}, expected process, docker, kubernetes or ec2",
                        spec.driver
                    ),
                )
            })?;
        let mut provider = Provider {
            metadata,
            spec: ProviderSpec {
                priority: spec.priority,
                capacity: spec.capacity,
                description: spec.description,
                ..ProviderSpec::new(driver)
            },
        };
        settings_from_pb(spec.settings, &mut provider.spec)?;
        ConvertError::first(validate::provider(&provider))?;
        Ok(provider)
    }
}

/// The provider's driver settings as its agent receives them with every assignment (and
/// as the API shows them): the block named like its driver, every default filled in;
/// `None` when it has none, and for the process driver, which takes none.
pub fn provider_settings_to_pb(spec: &ProviderSpec) -> Option<pb::ProviderSettings> {
    use pb::provider_settings::Driver as D;
    // Blocks of other drivers are left out: validation refuses them.
    let driver = match spec.driver {
        DriverKind::Docker => D::Docker(docker_to_pb(spec.docker.as_ref()?)),
        DriverKind::Ec2 => D::Ec2(ec2_to_pb(spec.ec2.as_ref()?)),
        DriverKind::Kubernetes => D::Kubernetes(kubernetes_to_pb(spec.kubernetes.as_ref()?)),
        DriverKind::Process => return None,
    };
    Some(pb::ProviderSettings {
        driver: Some(driver),
    })
}

fn docker_to_pb(d: &DockerSettings) -> pb::DockerSettings {
    pb::DockerSettings {
        network: d.network.clone().unwrap_or_default(),
        bind_host: d.bind_host.clone().unwrap_or_default(),
    }
}

fn ec2_to_pb(e: &Ec2Settings) -> pb::Ec2Settings {
    pb::Ec2Settings {
        region: e.region.clone(),
        ami: e.ami.clone(),
        instance_type: e.instance_type.clone(),
        subnet_id: e.subnet_id.clone(),
        security_group_ids: e.security_group_ids.clone(),
        key_name: e.key_name.clone().unwrap_or_default(),
        iam_instance_profile: e.iam_instance_profile.clone().unwrap_or_default(),
        tags: e.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        address: e.address.as_str().to_owned(),
        endpoint_url: e.endpoint_url.clone().unwrap_or_default(),
        user_data: e.user_data.clone().unwrap_or_default(),
    }
}

fn kubernetes_to_pb(k: &KubernetesSettings) -> pb::KubernetesSettings {
    let map =
        |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let service_type = match k.expose {
        Expose::Pods => String::new(),
        Expose::Service(t) => t.as_str().to_owned(),
    };
    pb::KubernetesSettings {
        namespace: k.namespace.clone(),
        context: k.context.clone().unwrap_or_default(),
        labels: map(&k.labels),
        annotations: map(&k.annotations),
        node_selector: map(&k.node_selector),
        tolerations: k
            .tolerations
            .iter()
            .map(|t| pb::Toleration {
                key: t.key.clone(),
                operator: t.operator.as_str().to_owned(),
                value: t.value.clone(),
                effect: t
                    .effect
                    .map(TaintEffect::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
            .collect(),
        image_pull_secrets: k.image_pull_secrets.clone(),
        expose: k.expose.as_str().to_owned(),
        service_type,
    }
}

/// Sets the block of `spec` that `settings` holds; the caller validates the result
/// (which also refuses a block that does not match the driver).
fn settings_from_pb(
    settings: Option<pb::ProviderSettings>,
    spec: &mut ProviderSpec,
) -> Result<(), ConvertError> {
    use pb::provider_settings::Driver as D;
    match settings.and_then(|s| s.driver) {
        None => {}
        Some(D::Docker(d)) => {
            spec.docker = Some(DockerSettings {
                network: non_empty(d.network),
                bind_host: non_empty(d.bind_host),
            });
        }
        Some(D::Ec2(e)) => spec.ec2 = Some(ec2_from_pb(e)?),
        Some(D::Kubernetes(k)) => spec.kubernetes = Some(kubernetes_from_pb(k)?),
    }
    Ok(())
}

fn ec2_from_pb(e: pb::Ec2Settings) -> Result<Ec2Settings, ConvertError> {
    let address = match e.address.as_str() {
        "" => Ec2Address::default(),
        name => named(
            "spec.ec2.address",
            "address",
            name,
            &Ec2Address::ALL,
            Ec2Address::as_str,
        )?,
    };
    Ok(Ec2Settings {
        region: e.region,
        ami: e.ami,
        instance_type: e.instance_type,
        subnet_id: e.subnet_id,
        security_group_ids: e.security_group_ids,
        key_name: non_empty(e.key_name),
        iam_instance_profile: non_empty(e.iam_instance_profile),
        tags: e.tags.into_iter().collect(),
        address,
        endpoint_url: non_empty(e.endpoint_url),
        user_data: non_empty(e.user_data),
    })
}

fn kubernetes_from_pb(k: pb::KubernetesSettings) -> Result<KubernetesSettings, ConvertError> {
    let service_type = match k.service_type.as_str() {
        "" => None,
        name => Some(named(
            "spec.kubernetes.serviceType",
            "Service type",
            name,
            &ServiceType::ALL,
            ServiceType::as_str,
        )?),
    };
    let expose = match (k.expose.as_str(), service_type) {
        ("" | "pods", None) => Expose::Pods,
        ("" | "pods", Some(_)) => {
            return Err(ConvertError::invalid(
                "spec.kubernetes.serviceType",
                "only used with `expose: service`",
            ));
        }
        ("service", service_type) => Expose::Service(service_type.unwrap_or_default()),
        (other, _) => {
            return Err(ConvertError::invalid(
                "spec.kubernetes.expose",
                format!("unknown expose {other:?}, expected pods or service"),
            ));
        }
    };
    let tolerations = k
        .tolerations
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let field = |key: &str| format!("spec.kubernetes.tolerations[{i}].{key}");
            let operator = match t.operator.as_str() {
                "" => TolerationOperator::default(),
                name => named(
                    &field("operator"),
                    "operator",
                    name,
                    &TolerationOperator::ALL,
                    TolerationOperator::as_str,
                )?,
            };
            let effect = match t.effect.as_str() {
                "" => None,
                name => Some(named(
                    &field("effect"),
                    "effect",
                    name,
                    &TaintEffect::ALL,
                    TaintEffect::as_str,
                )?),
            };
            Ok(Toleration {
                key: t.key,
                operator,
                value: t.value,
                effect,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(KubernetesSettings {
        namespace: if k.namespace.is_empty() {
            DEFAULT_NAMESPACE.to_owned()
        } else {
            k.namespace
        },
        context: non_empty(k.context),
        labels: k.labels.into_iter().collect(),
        annotations: k.annotations.into_iter().collect(),
        node_selector: k.node_selector.into_iter().collect(),
        tolerations,
        image_pull_secrets: k.image_pull_secrets,
        expose,
    })
}

/// proto3's empty string as "not set".
fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// The one of `all` that `as_str` calls `name`; `what` names the kind of value in the
/// error.
fn named<T: Copy>(
    field: &str,
    what: &str,
    name: &str,
    all: &[T],
    as_str: fn(T) -> &'static str,
) -> Result<T, ConvertError> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == name)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| as_str(*v)).collect();
            ConvertError::invalid(
                field,
                format!(
                    "unknown {what} {name:?}, expected one of: {}",
                    names.join(", ")
                ),
            )
        })
}

/// `generation` and the timestamps are left 0; the caller fills them.
impl From<&App> for pb::App {
    fn from(a: &App) -> Self {
        let s = &a.spec;
        pb::App {
            metadata: Some(meta_to_pb(&a.metadata)),
            spec: Some(pb::AppSpec {
                workload: Some(workload_to_pb(&s.workload)),
                replicas: s.replicas,
                placement: Some(placement_to_pb(&s.placement)),
                health: s.health.as_ref().map(health_to_pb),
                failover: Some(pb::FailoverPolicy {
                    spill: s.failover.spill,
                    max_extra_replicas: s.failover.max_extra_replicas,
                    failback_after_seconds: secs_u32(s.failover.failback_after),
                    singleton: s.failover.singleton,
                }),
                routing: s.routing.as_ref().map(|r| pb::Routing {
                    listen: r.listen.clone(),
                    hosts: r.hosts.clone(),
                    port: r.port.clone(),
                    protocol: r.protocol.as_str().to_owned(),
                    response_timeout_ms: millis_u32(r.response_timeout),
                    hedging_disabled: !r.hedge,
                    upstream_protocol: r.upstream_protocol.as_str().to_owned(),
                }),
            }),
        }
    }
}

/// Validates like [`parse_documents`](super::parse_documents) does.
impl TryFrom<pb::App> for App {
    type Error = ConvertError;

    fn try_from(a: pb::App) -> Result<Self, ConvertError> {
        let metadata = meta_from_pb(a.metadata)?;
        let spec = a.spec.ok_or(ConvertError::Missing { field: "spec" })?;
        let workload = workload_from_pb(spec.workload.ok_or(ConvertError::Missing {
            field: "spec.workload",
        })?)?;
        let placement = match spec.placement {
            Some(p) => placement_from_pb(p)?,
            None => Placement::default(),
        };
        let health = spec.health.map(health_from_pb).transpose()?;
        let failover = match spec.failover {
            Some(f) => FailoverPolicy {
                spill: f.spill,
                max_extra_replicas: f.max_extra_replicas,
                failback_after: Duration::from_secs(u64::from(f.failback_after_seconds)),
                singleton: f.singleton,
            },
            None => FailoverPolicy::default(),
        };
        let routing = spec
            .routing
            .map(|r| {
                let protocol = match r.protocol.as_str() {
                    "" | "http" => RoutingProtocol::Http,
                    "tcp" => RoutingProtocol::Tcp,
                    other => {
                        return Err(ConvertError::invalid(
                            "spec.routing.protocol",
                            format!("unknown protocol {other:?}, expected http or tcp"),
                        ));
                    }
                };
                let upstream_protocol = match r.upstream_protocol.as_str() {
                    "" | "http1" => UpstreamProtocol::Http1,
                    "h2c" => UpstreamProtocol::H2c,
                    other => {
                        return Err(ConvertError::invalid(
                            "spec.routing.upstream_protocol",
                            format!("unknown upstream protocol {other:?}, expected http1 or h2c"),
                        ));
                    }
                };
                Ok(Routing {
                    listen: r.listen,
                    hosts: r.hosts,
                    port: r.port,
                    protocol,
                    response_timeout: match r.response_timeout_ms {
                        0 => DEFAULT_RESPONSE_TIMEOUT,
                        ms => Duration::from_millis(u64::from(ms)),
                    },
                    hedge: !r.hedging_disabled,
                    upstream_protocol,
                })
            })
            .transpose()?;
        let app = App {
            metadata,
            spec: AppSpec {
                workload,
                replicas: spec.replicas,
                placement,
                health,
                failover,
                routing,
            },
        };
        ConvertError::first(validate::app(&app))?;
        Ok(app)
    }
}

/// The workload as agents receive it in assignments: env sorted by name, durations in
/// whole seconds.
pub fn workload_to_pb(w: &Workload) -> pb::Workload {
    pb::Workload {
        image: w.image.clone().unwrap_or_default(),
        command: w.command.clone().unwrap_or_default(),
        args: w.args.clone(),
        env: w
            .env
            .iter()
            .map(|(name, value)| pb::EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        ports: w
            .ports
            .iter()
            .map(|p| pb::Port {
                name: p.name.clone(),
                container_port: p.container_port.map_or(0, u32::from),
                protocol: p.protocol.as_str().to_owned(),
            })
            .collect(),
        resources: Some(pb::Resources {
            cpu_millis: w.resources.cpu_millis.unwrap_or(0),
            memory_mib: w.resources.memory_mib.unwrap_or(0),
        }),
        working_dir: w.working_dir.clone().unwrap_or_default(),
        stop_grace_seconds: secs_u32(w.stop_grace_period),
    }
}

fn workload_from_pb(w: pb::Workload) -> Result<Workload, ConvertError> {
    let mut env = BTreeMap::new();
    for var in w.env {
        if env.contains_key(&var.name) {
            return Err(ConvertError::invalid(
                "spec.env",
                format!("duplicate environment variable {:?}", var.name),
            ));
        }
        env.insert(var.name, var.value);
    }
    let ports = w
        .ports
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let container_port = match p.container_port {
                0 => None,
                n => Some(u16::try_from(n).map_err(|_| {
                    ConvertError::invalid(
                        &format!("spec.ports[{i}].containerPort"),
                        format!("must be between 1 and 65535, found {n}"),
                    )
                })?),
            };
            let protocol = match p.protocol.as_str() {
                "" | "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    return Err(ConvertError::invalid(
                        &format!("spec.ports[{i}].protocol"),
                        format!("unknown protocol {other:?}, expected tcp or udp"),
                    ));
                }
            };
            Ok(Port {
                name: p.name,
                container_port,
                protocol,
            })
        })
        .collect::<Result<_, _>>()?;
    let resources = w.resources.unwrap_or_default();
    Ok(Workload {
        image: Some(w.image).filter(|s| !s.is_empty()),
        command: Some(w.command).filter(|s| !s.is_empty()),
        args: w.args,
        env,
        ports,
        working_dir: Some(w.working_dir).filter(|s| !s.is_empty()),
        resources: Resources {
            cpu_millis: Some(resources.cpu_millis).filter(|n| *n != 0),
            memory_mib: Some(resources.memory_mib).filter(|n| *n != 0),
        },
        stop_grace_period: match w.stop_grace_seconds {
            0 => DEFAULT_STOP_GRACE,
            n => Duration::from_secs(u64::from(n)),
        },
    })
}

fn placement_to_pb(p: &Placement) -> pb::Placement {
    let mode = match p.mode {
        PlacementMode::Mirror => pb::PlacementMode::Mirror,
        PlacementMode::ActivePassive => pb::PlacementMode::ActivePassive,
        PlacementMode::Spread => pb::PlacementMode::Spread,
    };
    pb::Placement {
        mode: mode.into(),
        providers: p
            .providers
            .iter()
            .map(|t| pb::PlacementTarget {
                name: t.name.clone().unwrap_or_default(),
                selector: t
                    .selector
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                weight: t.weight,
                priority: t.priority,
            })
            .collect(),
        standby_replicas: p.standby_replicas,
    }
}

fn placement_from_pb(p: pb::Placement) -> Result<Placement, ConvertError> {
    let mode = match pb::PlacementMode::try_from(p.mode) {
        Ok(pb::PlacementMode::Unspecified | pb::PlacementMode::Mirror) => PlacementMode::Mirror,
        Ok(pb::PlacementMode::ActivePassive) => PlacementMode::ActivePassive,
        Ok(pb::PlacementMode::Spread) => PlacementMode::Spread,
        Err(_) => {
            return Err(ConvertError::invalid(
                "spec.placement.mode",
                format!("unknown placement mode {}", p.mode),
            ));
        }
    };
    Ok(Placement {
        mode,
        providers: p
            .providers
            .into_iter()
            .map(|t| PlacementTarget {
                name: Some(t.name).filter(|n| !n.is_empty()),
                selector: t.selector.into_iter().collect(),
                weight: if t.weight == 0 { 1 } else { t.weight },
                priority: t.priority,
            })
            .collect(),
        standby_replicas: p.standby_replicas,
    })
}

/// The health check as agents receive it in assignments: durations in milliseconds.
pub fn health_to_pb(h: &HealthCheck) -> pb::HealthCheck {
    use pb::health_check::Probe as P;
    let probe = match &h.probe {
        Probe::Http { path, port } => P::Http(pb::HttpProbe {
            path: path.clone(),
            port: port.clone(),
        }),
        Probe::Tcp { port } => P::Tcp(pb::TcpProbe { port: port.clone() }),
        Probe::Exec { command } => P::Exec(pb::ExecProbe {
            command: command.clone(),
        }),
    };
    pb::HealthCheck {
        probe: Some(probe),
        interval_ms: millis_u32(h.interval),
        timeout_ms: millis_u32(h.timeout),
        failure_threshold: h.failure_threshold,
        success_threshold: h.success_threshold,
    }
}

fn health_from_pb(h: pb::HealthCheck) -> Result<HealthCheck, ConvertError> {
    use pb::health_check::Probe as P;
    let probe = match h.probe.ok_or(ConvertError::Missing {
        field: "spec.health.probe",
    })? {
        P::Http(http) => Probe::Http {
            path: http.path,
            port: http.port,
        },
        P::Tcp(tcp) => Probe::Tcp { port: tcp.port },
        P::Exec(exec) => Probe::Exec {
            command: exec.command,
        },
    };
    let or = |value: u32, default: u32| if value == 0 { default } else { value };
    let ms_or = |value: u32, default: Duration| {
        if value == 0 {
            default
        } else {
            Duration::from_millis(u64::from(value))
        }
    };
    Ok(HealthCheck {
        probe,
        interval: ms_or(h.interval_ms, DEFAULT_INTERVAL),
        timeout: ms_or(h.timeout_ms, DEFAULT_TIMEOUT),
        failure_threshold: or(h.failure_threshold, DEFAULT_FAILURE_THRESHOLD),
        success_threshold: or(h.success_threshold, DEFAULT_SUCCESS_THRESHOLD),
    })
}

/// Whole seconds, saturating (validation keeps real values far below the limit).
fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Whole milliseconds, saturating (validation keeps real values far below the limit).
fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{Document, parse_documents};
    use super::*;

    const TEXT: &str = "\
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: aws-east, labels: {cloud: aws}}
spec: {driver: ec2, priority: -5, capacity: 7, description: us-east-1}
---
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: hello, labels: {team: web}}
spec:
  image: example/hello:1
  args: [a, b]
  env: {B: '2', A: '1'}
  ports: [{name: http, containerPort: 8080}, {name: dns, protocol: udp}]
  resources: {cpuMillis: 250}
  stopGracePeriod: 1m
  replicas: 3
  placement:
    mode: active-passive
    standbyReplicas: 1
    providers: [{name: aws-east, priority: 3}, {selector: {cloud: gcp}, weight: 2}]
  health: {exec: {command: [true]}, interval: 1500ms, timeout: 500ms, failureThreshold: 5}
  failover: {spill: false, maxExtraReplicas: 4, failbackAfter: 0s, singleton: true}
  routing: {listen: '0.0.0.0:80', port: http, protocol: tcp}
---
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: minimal}
spec: {command: run, replicas: 1}
";

    fn documents() -> Vec<Document> {
        parse_documents("t.yaml", TEXT)
            .unwrap()
            .into_iter()
            .map(|d| d.document)
            .collect()
    }

    #[test]
    fn round_trips_through_protobuf() {
        for doc in documents() {
            match doc {
                Document::Provider(p) => {
                    let wire = pb::Provider::from(&p);
                    assert_eq!(Provider::try_from(wire), Ok(p));
                }
                Document::App(a) => {
                    let wire = pb::App::from(&a);
                    assert_eq!(App::try_from(wire), Ok(a));
                }
            }
        }
    }

    #[test]
    fn wire_values() {
        let docs = documents();
        let Document::App(app) = &docs[1] else {
            panic!()
        };
        let wire = pb::App::from(app);
        let spec = wire.spec.unwrap();
        assert_eq!(wire.metadata.unwrap().generation, 0);
        let w = spec.workload.unwrap();
        assert_eq!(
            w.env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(w.stop_grace_seconds, 60);
        assert_eq!(
            (w.ports[1].container_port, w.ports[1].protocol.as_str()),
            (0, "udp")
        );
        assert_eq!(w.command, "");
        let p = spec.placement.unwrap();
        assert_eq!(p.mode, pb::PlacementMode::ActivePassive as i32);
        assert_eq!(p.providers[1].name, "");
        let h = spec.health.unwrap();
        assert_eq!(
            (
                h.interval_ms,
                h.timeout_ms,
                h.failure_threshold,
                h.success_threshold
            ),
            (1500, 500, 5, 1)
        );
        assert_eq!(spec.failover.unwrap().failback_after_seconds, 0);
        assert_eq!(spec.routing.unwrap().protocol, "tcp");
    }

    #[test]
    fn zero_means_default() {
        let wire = pb::App {
            metadata: Some(pb::ObjectMeta {
                name: "a".into(),
                ..Default::default()
            }),
            spec: Some(pb::AppSpec {
                workload: Some(pb::Workload {
                    command: "run".into(),
                    ports: vec![pb::Port {
                        name: "http".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                replicas: 1,
                placement: Some(pb::Placement {
                    providers: vec![pb::PlacementTarget {
                        name: "p".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                health: Some(pb::HealthCheck {
                    probe: Some(pb::health_check::Probe::Tcp(pb::TcpProbe {
                        port: "http".into(),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let app = App::try_from(wire).unwrap();
        assert_eq!(app.spec.workload.stop_grace_period, DEFAULT_STOP_GRACE);
        assert_eq!(app.spec.placement.mode, PlacementMode::Mirror);
        assert_eq!(app.spec.placement.providers[0].weight, 1);
        assert_eq!(
            app.spec.health,
            Some(HealthCheck::new(Probe::Tcp {
                port: "http".into()
            }))
        );
        assert_eq!(app.spec.failover, FailoverPolicy::default());
        assert_eq!(app.spec.workload.resources, Resources::default());
    }

    #[test]
    fn rejects_missing_and_invalid_fields() {
        assert_eq!(
            Provider::try_from(pb::Provider::default()),
            Err(ConvertError::Missing { field: "metadata" })
        );
        let meta = Some(pb::ObjectMeta {
            name: "p".into(),
            ..Default::default()
        });
        let err = Provider::try_from(pb::Provider {
            metadata: meta.clone(),
            spec: Some(pb::ProviderSpec {
                driver: "vmware".into(),
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid field `spec.driver`: unknown driver \"vmware\", expected process, docker, kubernetes or ec2"
        );
        assert_eq!(
            App::try_from(pb::App {
                metadata: meta.clone(),
                spec: Some(pb::AppSpec::default()),
            }),
            Err(ConvertError::Missing {
                field: "spec.workload"
            })
        );
        let err = App::try_from(pb::App {
            metadata: Some(pb::ObjectMeta {
                name: "Bad".into(),
                ..Default::default()
            }),
            spec: Some(pb::AppSpec {
                workload: Some(pb::Workload {
                    command: "x".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert!(
            matches!(&err, ConvertError::Invalid { field, .. } if field == "metadata.name"),
            "{err}"
        );
        let err = App::try_from(pb::App {
            metadata: meta,
            spec: Some(pb::AppSpec {
                workload: Some(pb::Workload {
                    command: "x".into(),
                    ..Default::default()
                }),
                placement: Some(pb::Placement {
                    mode: 42,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid field `spec.placement.mode`: unknown placement mode 42"
        );
    }

    /// Providers with every setting of every driver, and with only the defaults.
    const SETTINGS: &str = "\
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: ec2-full}
spec:
  driver: ec2
  ec2:
    region: us-east-1
    ami: ami-12345678
    instanceType: m7g.2xlarge
    subnetId: subnet-0123456789abcdef0
    securityGroupIds: [sg-12345678, sg-0123456789abcdef0]
    keyName: ops
    iamInstanceProfile: arn:aws:iam::123456789012:instance-profile/web
    tags: {team: web, Name: mirror}
    address: public
    endpointUrl: http://127.0.0.1:5000
    userData: |
      #!/bin/sh
      echo hi
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: ec2-min}
spec:
  driver: ec2
  ec2: {region: eu-west-1, ami: ami-12345678, instanceType: t3.small, subnetId: subnet-12345678}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: k8s-full}
spec:
  driver: kubernetes
  kubernetes:
    namespace: web
    context: prod
    labels: {team: web, example.com/tier: front}
    annotations: {example.com/note: 'any text: here'}
    nodeSelector: {pool: apps}
    tolerations:
      - {key: dedicated, value: web, effect: NoSchedule}
      - {operator: Exists}
    imagePullSecrets: [registry]
    expose: service
    serviceType: LoadBalancer
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: k8s-service}
spec: {driver: kubernetes, kubernetes: {expose: service}}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: k8s-min}
spec: {driver: kubernetes, kubernetes: {}}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: docker-bind}
spec: {driver: docker, docker: {bindHost: '0.0.0.0'}}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: docker-net}
spec: {driver: docker, docker: {network: apps}}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: docker-none}
spec: {driver: docker}
";

    fn providers(text: &str) -> Vec<Provider> {
        parse_documents("t.yaml", text)
            .unwrap()
            .into_iter()
            .map(|d| match d.document {
                Document::Provider(p) => p,
                Document::App(a) => panic!("not a provider: {a:?}"),
            })
            .collect()
    }

    #[test]
    fn settings_round_trip() {
        let example = include_str!("../../../deploy/examples/cloud-providers.yaml");
        let all: Vec<Provider> = providers(SETTINGS)
            .into_iter()
            .chain(providers(example))
            .collect();
        for p in all {
            // YAML → domain → protobuf → domain (what `get` shows and agents receive).
            assert_eq!(Provider::try_from(pb::Provider::from(&p)), Ok(p.clone()));
            // domain → YAML → domain (`get -o yaml`, then apply again: unchanged).
            let yaml = Document::Provider(p.clone()).to_yaml();
            let again = providers(&yaml);
            assert_eq!(again, std::slice::from_ref(&p), "{yaml}");
            // domain → JSON → domain (stored records).
            let json = serde_json::to_string(&p.spec).unwrap();
            assert_eq!(serde_json::from_str::<ProviderSpec>(&json).unwrap(), p.spec);
        }
    }

    #[test]
    fn settings_wire_values() {
        use pb::provider_settings::Driver as D;
        let all = providers(SETTINGS);
        let wire = |name: &str| {
            let p = all.iter().find(|p| p.metadata.name == name).unwrap();
            let settings = provider_settings_to_pb(&p.spec);
            // The object API carries the same settings as assignments.
            let spec = pb::Provider::from(p).spec.unwrap();
            assert_eq!(spec.settings, settings);
            settings.and_then(|s| s.driver)
        };
        let Some(D::Ec2(e)) = wire("ec2-full") else {
            panic!()
        };
        assert_eq!(
            (
                e.address.as_str(),
                e.endpoint_url.as_str(),
                e.user_data.as_str()
            ),
            ("public", "http://127.0.0.1:5000", "#!/bin/sh\necho hi\n")
        );
        assert_eq!(
            e.security_group_ids,
            ["sg-12345678", "sg-0123456789abcdef0"]
        );
        assert_eq!(e.tags.get("Name").map(String::as_str), Some("mirror"));
        // Defaults are sent explicitly, so agents need not know them.
        let Some(D::Ec2(e)) = wire("ec2-min") else {
            panic!()
        };
        assert_eq!(
            (
                e.address.as_str(),
                e.key_name.as_str(),
                e.endpoint_url.as_str()
            ),
            ("private", "", "")
        );
        let Some(D::Kubernetes(k)) = wire("k8s-min") else {
            panic!()
        };
        assert_eq!(
            (
                k.namespace.as_str(),
                k.expose.as_str(),
                k.service_type.as_str()
            ),
            ("default", "pods", "")
        );
        let Some(D::Kubernetes(k)) = wire("k8s-service") else {
            panic!()
        };
        assert_eq!(
            (k.expose.as_str(), k.service_type.as_str()),
            ("service", "ClusterIP")
        );
        let Some(D::Kubernetes(k)) = wire("k8s-full") else {
            panic!()
        };
        assert_eq!(k.service_type, "LoadBalancer");
        assert_eq!(
            k.tolerations,
            [
                pb::Toleration {
                    key: "dedicated".into(),
                    operator: "Equal".into(),
                    value: "web".into(),
                    effect: "NoSchedule".into(),
                },
                pb::Toleration {
                    operator: "Exists".into(),
                    ..Default::default()
                },
            ]
        );
        let Some(D::Docker(d)) = wire("docker-bind") else {
            panic!()
        };
        assert_eq!((d.network.as_str(), d.bind_host.as_str()), ("", "0.0.0.0"));
        // No block: the agent's own flags decide.
        assert_eq!(wire("docker-none"), None);
        assert_eq!(
            provider_settings_to_pb(&ProviderSpec::new(DriverKind::Process)),
            None
        );
    }

    #[test]
    fn settings_from_protobuf_are_checked() {
        use pb::provider_settings::Driver as D;
        let provider = |driver: &str, settings: D| pb::Provider {
            metadata: Some(pb::ObjectMeta {
                name: "p".into(),
                ..Default::default()
            }),
            spec: Some(pb::ProviderSpec {
                driver: driver.into(),
                settings: Some(pb::ProviderSettings {
                    driver: Some(settings),
                }),
                ..Default::default()
            }),
        };
        let ec2 = pb::Ec2Settings {
            region: "eu-west-1".into(),
            ami: "ami-12345678".into(),
            instance_type: "t3.small".into(),
            subnet_id: "subnet-12345678".into(),
            ..Default::default()
        };
        let kubernetes = |expose: &str, service_type: &str| {
            D::Kubernetes(pb::KubernetesSettings {
                expose: expose.into(),
                service_type: service_type.into(),
                ..Default::default()
            })
        };
        let cases = [
            (
                provider("docker", D::Ec2(ec2.clone())),
                "invalid field `spec.ec2`: ec2 settings do not apply to this provider: its driver is docker (its settings go in spec.docker)",
            ),
            (
                provider(
                    "ec2",
                    D::Ec2(pb::Ec2Settings {
                        address: "elastic".into(),
                        ..ec2.clone()
                    }),
                ),
                "invalid field `spec.ec2.address`: unknown address \"elastic\", expected one of: private, public",
            ),
            (
                provider(
                    "ec2",
                    D::Ec2(pb::Ec2Settings {
                        ami: "ami-x".into(),
                        ..ec2
                    }),
                ),
                "invalid field `spec.ec2.ami`: invalid AMI id \"ami-x\": expected \"ami-\" and 8 or 17 lowercase hexadecimal digits, such as ami-0123456789abcdef0",
            ),
            (
                provider("kubernetes", kubernetes("ingress", "")),
                "invalid field `spec.kubernetes.expose`: unknown expose \"ingress\", expected pods or service",
            ),
            (
                provider("kubernetes", kubernetes("pods", "NodePort")),
                "invalid field `spec.kubernetes.serviceType`: only used with `expose: service`",
            ),
            (
                provider("kubernetes", kubernetes("service", "ExternalName")),
                "invalid field `spec.kubernetes.serviceType`: unknown Service type \"ExternalName\", expected one of: ClusterIP, NodePort, LoadBalancer",
            ),
            (
                provider(
                    "kubernetes",
                    D::Kubernetes(pb::KubernetesSettings {
                        tolerations: vec![pb::Toleration {
                            key: "k".into(),
                            operator: "In".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                ),
                "invalid field `spec.kubernetes.tolerations[0].operator`: unknown operator \"In\", expected one of: Equal, Exists",
            ),
            (
                provider(
                    "kubernetes",
                    D::Kubernetes(pb::KubernetesSettings {
                        tolerations: vec![pb::Toleration {
                            key: "k".into(),
                            effect: "NoRun".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                ),
                "invalid field `spec.kubernetes.tolerations[0].effect`: unknown effect \"NoRun\", expected one of: NoSchedule, PreferNoSchedule, NoExecute",
            ),
        ];
        for (wire, expected) in cases {
            assert_eq!(Provider::try_from(wire).unwrap_err().to_string(), expected);
        }
        // proto3's empty strings are the defaults.
        let p = Provider::try_from(provider("kubernetes", kubernetes("", ""))).unwrap();
        assert_eq!(p.spec.kubernetes, Some(KubernetesSettings::default()));
        let p = Provider::try_from(provider("kubernetes", kubernetes("service", ""))).unwrap();
        assert_eq!(
            p.spec.kubernetes.map(|k| k.expose),
            Some(Expose::Service(ServiceType::ClusterIp))
        );
    }
}
