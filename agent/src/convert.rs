//! The agent's edge with the wire: assignments (with the provider's driver
//! settings) into the agent's own types, validated; the driver's capabilities
//! out, for the hello.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use skymirror_proto::v1 as pb;

use crate::driver::settings::{
    DockerSettings, Ec2Address, Ec2Settings, KubernetesExpose, KubernetesSettings, ServiceType,
    TaintEffect, Toleration, TolerationOperator,
};
use crate::driver::{Capabilities, DriverSettings, PortSpec, Workload};
use crate::health::{HealthSpec, Probe};

/// Most replicas of one app an agent accepts.
const MAX_REPLICAS: u32 = 10_000;

/// One app's share of the provider, as the supervisor uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredApp {
    /// App name.
    pub app: String,
    /// App generation.
    pub generation: u64,
    /// Generation at which the workload last changed.
    pub workload_generation: u64,
    /// Replicas to run: indices `0..replicas`.
    pub replicas: u32,
    /// What each replica runs.
    pub workload: Workload,
    /// Health check, if any.
    pub health: Option<HealthSpec>,
    /// At most one copy anywhere: runs only while the agent holds a lease.
    pub singleton: bool,
}

/// Which daemon store, and which epoch of it, an assignment comes from.
/// Revisions are ordered only within one: a store restored from a backup or
/// reset on purpose starts a new epoch and counts revisions from its own
/// history (see [`crate::supervisor::arrival`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreEpoch {
    /// The store's id; empty when unknown: an assignment of a daemon from
    /// before store identities, or one the agent kept from before them.
    pub store_id: String,
    /// The store's epoch; 0 when unknown.
    pub epoch: u64,
}

impl std::fmt::Display for StoreEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.store_id.is_empty() {
            write!(f, "an unknown store")
        } else {
            write!(f, "store {} epoch {}", self.store_id, self.epoch)
        }
    }
}

/// The complete desired set for the provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredSet {
    /// Assignment revision, ordered within `store`.
    pub revision: u64,
    /// The store and epoch the assignment comes from.
    pub store: StoreEpoch,
    /// Apps by name.
    pub apps: std::collections::BTreeMap<String, DesiredApp>,
    /// The provider's driver settings, from its Provider document.
    pub settings: DriverSettings,
}

/// An assignment the agent cannot use. Not retryable: the agent keeps the
/// assignment it has until the daemon sends a usable one.
#[derive(Debug, thiserror::Error)]
pub enum InvalidAssignment {
    /// One app's share is unusable.
    #[error("assignment for app {app:?}: {reason}")]
    App {
        /// App concerned.
        app: String,
        /// What is wrong.
        reason: String,
    },
    /// The provider's driver settings are unusable.
    #[error("assignment: provider settings: {field}: {reason}")]
    Settings {
        /// The setting, as the Provider document spells it (`spec.docker.bindHost`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn ms(v: u32, default: u64) -> Duration {
    Duration::from_millis(if v == 0 { default } else { u64::from(v) })
}

fn workload(app: &str, w: pb::Workload) -> Result<Workload, InvalidAssignment> {
    let invalid = |reason: String| InvalidAssignment::App {
        app: app.to_string(),
        reason,
    };
    let ports = w
        .ports
        .into_iter()
        .map(|p| {
            let container_port = match p.container_port {
                0 => None,
                n => Some(
                    u16::try_from(n)
                        .map_err(|_| invalid(format!("port {}: {n} is out of range", p.name)))?,
                ),
            };
            Ok(PortSpec {
                name: p.name,
                container_port,
                protocol: if p.protocol.is_empty() {
                    "tcp".into()
                } else {
                    p.protocol
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let resources = w.resources.unwrap_or_default();
    Ok(Workload {
        image: Some(w.image).filter(|s| !s.is_empty()),
        command: Some(w.command).filter(|s| !s.is_empty()),
        args: w.args,
        env: w.env.into_iter().map(|e| (e.name, e.value)).collect(),
        ports,
        working_dir: Some(w.working_dir)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        stop_grace: Duration::from_secs(if w.stop_grace_seconds == 0 {
            10
        } else {
            u64::from(w.stop_grace_seconds)
        }),
        cpu_millis: Some(resources.cpu_millis).filter(|v| *v > 0),
        memory_mib: Some(resources.memory_mib).filter(|v| *v > 0),
    })
}

fn health(app: &str, h: pb::HealthCheck) -> Result<HealthSpec, InvalidAssignment> {
    let probe = match h.probe {
        Some(pb::health_check::Probe::Http(p)) => Probe::Http {
            path: p.path,
            port: p.port,
        },
        Some(pb::health_check::Probe::Tcp(p)) => Probe::Tcp { port: p.port },
        Some(pb::health_check::Probe::Exec(p)) => Probe::Exec { command: p.command },
        None => {
            return Err(InvalidAssignment::App {
                app: app.to_string(),
                reason: "health check without a probe".into(),
            });
        }
    };
    Ok(HealthSpec {
        probe,
        interval: ms(h.interval_ms, 2000),
        timeout: ms(h.timeout_ms, 1000),
        failure_threshold: h.failure_threshold.max(1),
        success_threshold: h.success_threshold.max(1),
    })
}

impl TryFrom<pb::Assignment> for DesiredSet {
    type Error = InvalidAssignment;

    fn try_from(a: pb::Assignment) -> Result<Self, Self::Error> {
        let mut apps = std::collections::BTreeMap::new();
        for x in a.apps {
            if x.app.is_empty() || x.replicas > MAX_REPLICAS {
                return Err(InvalidAssignment::App {
                    app: x.app,
                    reason: format!("invalid name or replica count {}", x.replicas),
                });
            }
            let w = x.workload.ok_or_else(|| InvalidAssignment::App {
                app: x.app.clone(),
                reason: "no workload".into(),
            })?;
            let desired = DesiredApp {
                workload: workload(&x.app, w)?,
                health: x.health.map(|h| health(&x.app, h)).transpose()?,
                singleton: x.singleton,
                app: x.app.clone(),
                generation: x.generation,
                workload_generation: x.workload_generation,
                replicas: x.replicas,
            };
            apps.insert(x.app, desired);
        }
        let settings = match a.settings.and_then(|s| s.driver) {
            None => DriverSettings::Unset,
            Some(pb::provider_settings::Driver::Docker(d)) => DriverSettings::Docker(docker(d)?),
            Some(pb::provider_settings::Driver::Ec2(e)) => DriverSettings::Ec2(Box::new(ec2(e)?)),
            Some(pb::provider_settings::Driver::Kubernetes(k)) => {
                DriverSettings::Kubernetes(Box::new(kubernetes(k)?))
            }
        };
        Ok(DesiredSet {
            revision: a.revision,
            store: StoreEpoch {
                store_id: a.store_id,
                epoch: a.epoch,
            },
            apps,
            settings,
        })
    }
}

fn invalid_setting(field: &str, reason: impl Into<String>) -> InvalidAssignment {
    InvalidAssignment::Settings {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// An empty string is a setting the document leaves out.
fn given(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn docker(d: pb::DockerSettings) -> Result<DockerSettings, InvalidAssignment> {
    let bind_host = given(d.bind_host)
        .map(|h| {
            h.parse().map_err(|_| {
                invalid_setting(
                    "spec.docker.bindHost",
                    format!("{h:?} is not an IP address"),
                )
            })
        })
        .transpose()?;
    Ok(DockerSettings {
        network: given(d.network),
        bind_host,
    })
}

fn ec2(e: pb::Ec2Settings) -> Result<Ec2Settings, InvalidAssignment> {
    let address = match e.address.as_str() {
        "" | "private" => Ec2Address::Private,
        "public" => Ec2Address::Public,
        other => {
            return Err(invalid_setting(
                "spec.ec2.address",
                format!("{other:?} is neither \"private\" nor \"public\""),
            ));
        }
    };
    Ok(Ec2Settings {
        region: given(e.region),
        ami: given(e.ami),
        instance_type: given(e.instance_type),
        subnet_id: given(e.subnet_id),
        security_group_ids: e.security_group_ids,
        key_name: given(e.key_name),
        iam_instance_profile: given(e.iam_instance_profile),
        tags: e.tags.into_iter().collect(),
        address,
        endpoint_url: given(e.endpoint_url),
        user_data: given(e.user_data),
    })
}

fn kubernetes(k: pb::KubernetesSettings) -> Result<KubernetesSettings, InvalidAssignment> {
    let expose = match k.expose.as_str() {
        "" | "pods" => KubernetesExpose::Pods,
        "service" => KubernetesExpose::Service,
        other => {
            return Err(invalid_setting(
                "spec.kubernetes.expose",
                format!("{other:?} is neither \"pods\" nor \"service\""),
            ));
        }
    };
    let service_type = match k.service_type.as_str() {
        "" | "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        other => {
            return Err(invalid_setting(
                "spec.kubernetes.serviceType",
                format!("{other:?} is not one of ClusterIP, NodePort, LoadBalancer"),
            ));
        }
    };
    let tolerations = k
        .tolerations
        .into_iter()
        .enumerate()
        .map(|(i, t)| toleration(i, t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KubernetesSettings {
        namespace: given(k.namespace),
        context: given(k.context),
        labels: k.labels.into_iter().collect::<BTreeMap<_, _>>(),
        annotations: k.annotations.into_iter().collect(),
        node_selector: k.node_selector.into_iter().collect(),
        tolerations,
        image_pull_secrets: k.image_pull_secrets,
        expose,
        service_type,
    })
}

fn toleration(i: usize, t: pb::Toleration) -> Result<Toleration, InvalidAssignment> {
    let operator = match t.operator.as_str() {
        "" | "Equal" => TolerationOperator::Equal,
        "Exists" => TolerationOperator::Exists,
        other => {
            return Err(invalid_setting(
                &format!("spec.kubernetes.tolerations[{i}].operator"),
                format!("{other:?} is neither Equal nor Exists"),
            ));
        }
    };
    let effect = match t.effect.as_str() {
        "" => None,
        "NoSchedule" => Some(TaintEffect::NoSchedule),
        "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
        "NoExecute" => Some(TaintEffect::NoExecute),
        other => {
            return Err(invalid_setting(
                &format!("spec.kubernetes.tolerations[{i}].effect"),
                format!("{other:?} is not one of NoSchedule, PreferNoSchedule, NoExecute"),
            ));
        }
    };
    Ok(Toleration {
        key: given(t.key),
        operator,
        value: given(t.value),
        effect,
    })
}

/// Milliseconds for the wire, saturating.
fn wire_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The hello's account of the driver: its capabilities, with `max_stop` the
/// longest stop the agent may have to wait for at a singleton's lease end
/// ([`crate::supervisor::longest_stop`]).
pub fn capabilities_to_wire(caps: &Capabilities, max_stop: Duration) -> pb::DriverCapabilities {
    pb::DriverCapabilities {
        max_concurrent_operations: caps.max_concurrent_operations.max(1),
        inspect_interval_ms: wire_ms(caps.inspect_interval),
        max_stop_ms: wire_ms(max_stop),
        runtime_restarts: caps.runtime_restarts,
        recover: caps.recover,
        exec: caps.exec,
        logs: caps.logs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_and_epoch_come_with_the_assignment() {
        let a = pb::Assignment {
            revision: 3,
            store_id: "s1".into(),
            epoch: 2,
            ..Default::default()
        };
        let set = DesiredSet::try_from(a).expect("valid");
        assert_eq!(
            set.store,
            StoreEpoch {
                store_id: "s1".into(),
                epoch: 2
            }
        );
        assert_eq!(set.store.to_string(), "store s1 epoch 2");
        let old = DesiredSet::try_from(pb::Assignment::default()).expect("valid");
        assert_eq!(old.store.to_string(), "an unknown store");
    }

    fn with_settings(driver: pb::provider_settings::Driver) -> pb::Assignment {
        pb::Assignment {
            revision: 4,
            settings: Some(pb::ProviderSettings {
                driver: Some(driver),
            }),
            ..Default::default()
        }
    }

    fn settings_of(a: pb::Assignment) -> Result<DriverSettings, InvalidAssignment> {
        DesiredSet::try_from(a).map(|set| set.settings)
    }

    #[test]
    fn docker_settings_override_only_what_they_name() -> Result<(), InvalidAssignment> {
        assert_eq!(
            settings_of(pb::Assignment::default())?,
            DriverSettings::Unset
        );
        let a = with_settings(pb::provider_settings::Driver::Docker(pb::DockerSettings {
            network: "cloud-a".into(),
            bind_host: "10.0.0.7".into(),
        }));
        assert_eq!(
            settings_of(a)?,
            DriverSettings::Docker(DockerSettings {
                network: Some("cloud-a".into()),
                bind_host: Some([10, 0, 0, 7].into()),
            })
        );
        let empty = with_settings(pb::provider_settings::Driver::Docker(
            pb::DockerSettings::default(),
        ));
        assert_eq!(
            settings_of(empty)?,
            DriverSettings::Docker(DockerSettings::default())
        );
        Ok(())
    }

    #[test]
    fn unusable_settings_are_refused_naming_the_field() {
        let cases = [
            (
                pb::provider_settings::Driver::Docker(pb::DockerSettings {
                    bind_host: "localhost:80".into(),
                    ..Default::default()
                }),
                "assignment: provider settings: spec.docker.bindHost: \"localhost:80\" is not an IP address",
            ),
            (
                pb::provider_settings::Driver::Ec2(pb::Ec2Settings {
                    address: "elastic".into(),
                    ..Default::default()
                }),
                "assignment: provider settings: spec.ec2.address: \"elastic\" is neither \"private\" nor \"public\"",
            ),
            (
                pb::provider_settings::Driver::Kubernetes(pb::KubernetesSettings {
                    tolerations: vec![
                        pb::Toleration::default(),
                        pb::Toleration {
                            effect: "NoRun".into(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }),
                "assignment: provider settings: spec.kubernetes.tolerations[1].effect: \"NoRun\" is not one of NoSchedule, PreferNoSchedule, NoExecute",
            ),
        ];
        for (driver, message) in cases {
            match settings_of(with_settings(driver)) {
                Err(e) => assert_eq!(e.to_string(), message),
                Ok(s) => panic!("accepted {s:?}"),
            }
        }
    }

    #[test]
    fn ec2_and_kubernetes_settings_keep_every_field() -> Result<(), InvalidAssignment> {
        let ec2 = with_settings(pb::provider_settings::Driver::Ec2(pb::Ec2Settings {
            region: "eu-west-1".into(),
            ami: "ami-1".into(),
            instance_type: "t3.small".into(),
            security_group_ids: vec!["sg-1".into()],
            tags: [("team".to_string(), "web".to_string())].into(),
            address: "public".into(),
            endpoint_url: "http://127.0.0.1:5000".into(),
            ..Default::default()
        }));
        let DriverSettings::Ec2(e) = settings_of(ec2)? else {
            panic!("not ec2 settings");
        };
        assert_eq!(e.region.as_deref(), Some("eu-west-1"));
        assert_eq!(e.address, Ec2Address::Public);
        assert_eq!(e.subnet_id, None);
        assert_eq!(e.tags["team"], "web");
        assert_eq!(e.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));

        let k8s = with_settings(pb::provider_settings::Driver::Kubernetes(
            pb::KubernetesSettings {
                namespace: "apps".into(),
                expose: "service".into(),
                service_type: "NodePort".into(),
                tolerations: vec![pb::Toleration {
                    key: "spot".into(),
                    operator: "Exists".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ));
        let DriverSettings::Kubernetes(k) = settings_of(k8s)? else {
            panic!("not kubernetes settings");
        };
        assert_eq!(k.namespace.as_deref(), Some("apps"));
        assert_eq!(k.context, None);
        assert_eq!(
            (k.expose, k.service_type),
            (KubernetesExpose::Service, ServiceType::NodePort)
        );
        assert_eq!(
            k.tolerations,
            vec![Toleration {
                key: Some("spot".into()),
                operator: TolerationOperator::Exists,
                value: None,
                effect: Some(TaintEffect::NoSchedule),
            }]
        );
        Ok(())
    }

    #[test]
    fn the_hello_carries_the_capabilities_in_milliseconds() {
        let caps = Capabilities {
            recover: true,
            exec: false,
            logs: true,
            max_concurrent_operations: 0,
            inspect_interval: Duration::from_millis(1500),
            stop_overhead: Duration::from_secs(3),
            runtime_restarts: true,
        };
        let wire = capabilities_to_wire(&caps, Duration::from_secs(u64::MAX / 2000));
        assert_eq!(
            wire,
            pb::DriverCapabilities {
                max_concurrent_operations: 1,
                inspect_interval_ms: 1500,
                max_stop_ms: u32::MAX,
                runtime_restarts: true,
                recover: true,
                exec: false,
                logs: true,
            }
        );
    }
}
