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
                settings: None,
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
}
