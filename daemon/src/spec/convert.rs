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
use super::types::{
    App, AppSpec, DEFAULT_FAILURE_THRESHOLD, DEFAULT_INTERVAL, DEFAULT_STOP_GRACE,
    DEFAULT_SUCCESS_THRESHOLD, DEFAULT_TIMEOUT, DriverKind, FailoverPolicy, HealthCheck,
    ObjectMeta, Placement, PlacementMode, PlacementTarget, Port, Probe, Protocol, Provider,
    ProviderSpec, Resources, Routing, RoutingProtocol, Workload,
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
        let provider = Provider {
            metadata,
            spec: ProviderSpec {
                driver,
                priority: spec.priority,
                capacity: spec.capacity,
                description: spec.description,
            },
        };
        ConvertError::first(validate::provider(&provider))?;
        Ok(provider)
    }
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
                Ok(Routing {
                    listen: r.listen,
                    hosts: r.hosts,
                    port: r.port,
                    protocol,
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
