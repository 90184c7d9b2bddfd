//! Assignments from the wire into the agent's own types, validated.

use std::path::PathBuf;
use std::time::Duration;

use skymirror_proto::v1 as pb;

use crate::driver::{PortSpec, Workload};
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

/// The complete desired set for the provider.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredSet {
    /// Assignment revision.
    pub revision: u64,
    /// Apps by name.
    pub apps: std::collections::BTreeMap<String, DesiredApp>,
}

/// An assignment the agent cannot use.
#[derive(Debug, thiserror::Error)]
#[error("assignment for app {app:?}: {reason}")]
pub struct InvalidAssignment {
    /// App concerned.
    pub app: String,
    /// What is wrong.
    pub reason: String,
}

fn ms(v: u32, default: u64) -> Duration {
    Duration::from_millis(if v == 0 { default } else { u64::from(v) })
}

fn workload(app: &str, w: pb::Workload) -> Result<Workload, InvalidAssignment> {
    let invalid = |reason: String| InvalidAssignment {
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
            return Err(InvalidAssignment {
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
                return Err(InvalidAssignment {
                    app: x.app,
                    reason: format!("invalid name or replica count {}", x.replicas),
                });
            }
            let w = x.workload.ok_or_else(|| InvalidAssignment {
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
        Ok(DesiredSet {
            revision: a.revision,
            apps,
        })
    }
}
