//! What agents say, in domain terms: a session's hello, heartbeats, replica
//! status reports and its end. Reports update the registry's replicas and the
//! store, and their state transitions become events.
//!
//! Boundary: this module records what agents say; it decides nothing about
//! placement. The API layer (`api/agents.rs`) converts the wire messages.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::logs::LogAnswer;
use crate::model::{EventReason, NewEvent, ReplicaState, ReportedReplica, now_ms};
use crate::registry::{AgentCapabilities, AgentSeen, ToAgent, Welcome};
use crate::store::StoreIdentity;

/// Most replicas one hello or report may carry.
pub const MAX_REPLICAS_PER_REPORT: usize = 10_000;

/// One replica as its agent reports it (readiness is the daemon's to judge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaReport {
    /// App name.
    pub app: String,
    /// Index within the app on the provider.
    pub index: u32,
    /// App generation the replica reflects.
    pub generation: u64,
    /// Workload generation it runs.
    pub workload_generation: u64,
    /// Its state.
    pub state: ReplicaState,
    /// `host:port` of the first port.
    pub address: String,
    /// Port per named port.
    pub ports: BTreeMap<String, u32>,
    /// Driver's id of the instance.
    pub instance_id: String,
    /// Unplanned restarts.
    pub restarts: u32,
    /// Keeps exiting shortly after starting.
    pub crash_looping: bool,
    /// Detail of the state.
    pub message: String,
    /// Instance start, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Last state change, ms since the Unix epoch.
    pub state_since_ms: i64,
}

impl ReplicaReport {
    /// The replica as the daemon keeps it: `has_health_check` says whether
    /// its app has a health check (without one, running counts as ready).
    pub fn into_replica(self, provider: &str, has_health_check: bool) -> ReportedReplica {
        let ready = match self.state {
            ReplicaState::Healthy => true,
            ReplicaState::Running => !has_health_check,
            _ => false,
        };
        ReportedReplica {
            provider: provider.to_string(),
            app: self.app,
            index: self.index,
            generation: self.generation,
            workload_generation: self.workload_generation,
            state: self.state,
            ready,
            address: self.address,
            ports: self.ports,
            instance_id: self.instance_id,
            restarts: self.restarts,
            crash_looping: self.crash_looping,
            message: self.message,
            started_at_ms: self.started_at_ms,
            state_since_ms: self.state_since_ms,
        }
    }
}

/// The first message of an agent's session.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Provider the agent runs for.
    pub provider: String,
    /// The agent's stable id.
    pub agent_id: String,
    /// The join token it presents.
    pub join_token: String,
    /// Agent software version.
    pub version: String,
    /// Driver it runs replicas with.
    pub driver: String,
    /// Replicas it already runs.
    pub replicas: Vec<ReplicaReport>,
    /// Revision of the last assignment it applied.
    pub applied_revision: u64,
    /// The store and epoch that revision belongs to; `None` from an agent of
    /// a release before store identities.
    pub applied_store: Option<StoreIdentity>,
    /// What its driver said of itself.
    pub capabilities: AgentCapabilities,
}

/// A message on an established session.
#[derive(Debug, Clone)]
pub enum FromAgent {
    /// A heartbeat.
    Heartbeat {
        /// Echoed in the acknowledgement.
        seq: u64,
        /// Revision the agent is converging to.
        applied_revision: u64,
        /// The store and epoch that revision belongs to.
        applied_store: Option<StoreIdentity>,
    },
    /// Replica status.
    Status {
        /// Changed (or, with `full`, all) replicas.
        replicas: Vec<ReplicaReport>,
        /// Replicas gone, by app and index.
        removed: Vec<(String, u32)>,
        /// The report lists every replica the agent runs.
        full: bool,
        /// Revision the agent applied.
        applied_revision: u64,
        /// The store and epoch that revision belongs to.
        applied_store: Option<StoreIdentity>,
    },
    /// Part of an answer to a request for output.
    Logs(LogAnswer),
    /// A message that has no place on an established session.
    Unexpected,
}

/// Compares secrets in time independent of where they differ.
fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

impl Daemon {
    /// Admits an agent's session: checks its token and provider, welcomes it
    /// on `tx`, registers the session (replacing an earlier one of the same
    /// provider) and records what it runs. Returns the session's id.
    pub async fn open_session(
        &self,
        hello: Hello,
        tx: mpsc::Sender<ToAgent>,
    ) -> Result<u64, DaemonError> {
        if !token_matches(&hello.join_token, &self.config.join_token) {
            return Err(DaemonError::Unauthenticated(format!(
                "agent {} for provider {}: invalid join token",
                hello.agent_id, hello.provider
            )));
        }
        let providers = self.store.providers()?;
        let Some(declared) = providers
            .iter()
            .find(|p| p.provider.metadata.name == hello.provider)
        else {
            return Err(DaemonError::FailedPrecondition(format!(
                "provider {:?} is not declared; apply a Provider document named {:?} first",
                hello.provider, hello.provider
            )));
        };
        if declared.provider.spec.driver.as_str() != hello.driver {
            tracing::warn!(provider = %hello.provider, declared = declared.provider.spec.driver.as_str(),
                agent = %hello.driver, "agent runs a different driver than the provider declares");
        }
        if hello.replicas.len() > MAX_REPLICAS_PER_REPORT {
            return Err(DaemonError::BadRequest(
                "hello lists too many replicas".into(),
            ));
        }
        tx.send(ToAgent::Welcome(Welcome {
            daemon_id: self.daemon_id.clone(),
            heartbeat_interval: self.config.heartbeat_interval,
            identity: self.identity.clone(),
        }))
        .await
        .map_err(|_| DaemonError::Cancelled("agent went away".into()))?;

        let provider = hello.provider.clone();
        let was_down = self
            .registry
            .with(|entries| entries.get(&provider).is_some_and(|e| e.view.is_down()));
        let (conn_id, replaced) = self.registry.connect(
            &provider,
            AgentSeen {
                agent_id: hello.agent_id.clone(),
                version: hello.version.clone(),
                last_seen: Instant::now(),
                last_seen_ms: now_ms(),
                applied_revision: self
                    .applied(hello.applied_revision, hello.applied_store.as_ref()),
                capabilities: hello.capabilities,
            },
            tx,
        );
        if let Some(old) = replaced {
            // The old stream may take a while to notice; its requests end now.
            crate::logs::agent_gone(self, &provider, old);
        }
        tracing::info!(%provider, agent_id = %hello.agent_id, replicas = hello.replicas.len(), "agent connected");
        let mut events = vec![NewEvent::provider(
            EventReason::ProviderConnected,
            &provider,
            format!(
                "agent {} (version {}) connected{}, running {} replicas",
                hello.agent_id,
                hello.version,
                if replaced.is_some() {
                    " and replaced the previous stream"
                } else {
                    ""
                },
                hello.replicas.len()
            ),
        )];
        let running = hello
            .replicas
            .iter()
            .filter(|r| !r.instance_id.is_empty())
            .count();
        if was_down && running > 0 {
            // Its share was re-placed while it was out of reach; what it kept
            // running meanwhile are duplicates. Its assignment stops them.
            events.push(NewEvent::provider(
                EventReason::DuplicateReplicas,
                &provider,
                format!(
                    "provider {provider} was down but kept {running} replicas running; they duplicate the re-placed ones and are stopped unless its share is given back"
                ),
            ));
        }
        self.record(events);
        self.report(&provider, hello.replicas, Vec::new(), true);
        self.wake();
        Ok(conn_id)
    }

    /// Handles one message of session `conn_id` of `provider`.
    pub fn agent_message(&self, provider: &str, conn_id: u64, msg: FromAgent) {
        let mut ack = None;
        let applied = match msg {
            FromAgent::Heartbeat {
                seq,
                applied_revision,
                applied_store,
            } => {
                ack = Some(ToAgent::HeartbeatAck {
                    seq,
                    lease: self.config.lease,
                });
                Some(self.applied(applied_revision, applied_store.as_ref()))
            }
            FromAgent::Status {
                replicas,
                removed,
                full,
                applied_revision,
                applied_store,
            } => {
                if replicas.len() > MAX_REPLICAS_PER_REPORT {
                    tracing::warn!(provider, "status report with too many replicas ignored");
                    return;
                }
                self.report(provider, replicas, removed, full);
                Some(self.applied(applied_revision, applied_store.as_ref()))
            }
            FromAgent::Logs(answer) => {
                crate::logs::deliver(self, provider, conn_id, answer);
                None
            }
            FromAgent::Unexpected => {
                tracing::warn!(
                    provider,
                    "unexpected message on an established agent stream ignored"
                );
                None
            }
        };
        self.registry.heard(provider, conn_id, applied, ack);
    }

    /// The revision an agent applied, as this store counts it: revisions
    /// compare only within one store epoch, so one of another store or epoch
    /// counts as none (an agent of a release before store identities says
    /// none, and is taken at its word).
    fn applied(&self, revision: u64, store: Option<&StoreIdentity>) -> u64 {
        match store {
            Some(s) if s != &self.identity => 0,
            _ => revision,
        }
    }

    /// Ends session `conn_id` of `provider` (`why` says how).
    pub fn close_session(&self, provider: &str, conn_id: u64, why: &str) {
        let removed = self.registry.disconnect(provider, conn_id);
        // After the removal: no request can register on this stream any more.
        crate::logs::agent_gone(self, provider, conn_id);
        if removed {
            let agent_id = self.registry.with(|entries| {
                entries
                    .get(provider)
                    .and_then(|e| e.view.seen.as_ref())
                    .map(|s| s.agent_id.clone())
                    .unwrap_or_default()
            });
            self.wake();
            tracing::info!(%provider, reason = %why, "agent disconnected");
            self.record(vec![NewEvent::provider(
                EventReason::ProviderDisconnected,
                provider,
                format!("agent {agent_id} disconnected: {why}"),
            )]);
        }
    }

    /// Records reported replicas, removes the ones reported gone, and turns
    /// state transitions into events.
    fn report(
        &self,
        provider: &str,
        reported: Vec<ReplicaReport>,
        removed: Vec<(String, u32)>,
        full: bool,
    ) {
        let mut health_of: BTreeMap<String, bool> = BTreeMap::new();
        let mut updates = Vec::with_capacity(reported.len());
        for r in reported {
            let has_check = *health_of.entry(r.app.clone()).or_insert_with(
                || matches!(self.store.app(&r.app), Ok(Some(a)) if a.app.spec.health.is_some()),
            );
            updates.push(r.into_replica(provider, has_check));
        }

        let mut events = Vec::new();
        let mut gone: Vec<ReportedReplica> = Vec::new();
        let readiness_changed = self.registry.with(|entries| {
            let known = &mut entries
                .entry(provider.to_string())
                .or_default()
                .view
                .replicas;
            if full {
                let keep: BTreeSet<(String, u32)> =
                    updates.iter().map(|r| (r.app.clone(), r.index)).collect();
                let stale: Vec<(String, u32)> = known
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for k in stale {
                    gone.extend(known.remove(&k));
                }
            }
            for k in &removed {
                gone.extend(known.remove(k));
            }
            let mut changed = false;
            for r in &updates {
                let old = known.get(&(r.app.clone(), r.index));
                changed |= old.is_none_or(|o| o.ready != r.ready || o.address != r.address);
                events.extend(transition_events(old, r));
                known.insert((r.app.clone(), r.index), r.clone());
            }
            changed
        });
        // Readiness feeds placement (make-before-break) and routing.
        if readiness_changed || !gone.is_empty() {
            self.wake();
        }
        for r in &gone {
            events.push(NewEvent::replica(
                EventReason::ReplicaRemoved,
                r,
                format!("replica {} stopped and removed", r.id()),
            ));
        }
        let result = if full {
            self.store.put_replicas(Some(provider), &updates)
        } else {
            self.store
                .delete_replicas(provider, &removed)
                .and_then(|()| self.store.put_replicas(None, &updates))
        };
        if let Err(e) = result {
            tracing::error!(provider, error = %e, "cannot store replica status");
        }
        self.record(events);
    }
}

/// How long an agent has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Events for the change from `old` to `new` of one replica.
fn transition_events(old: Option<&ReportedReplica>, new: &ReportedReplica) -> Vec<NewEvent> {
    let mut out = Vec::new();
    let id = new.id();
    let new_instance =
        !new.instance_id.is_empty() && old.is_none_or(|o| o.instance_id != new.instance_id);
    if new_instance {
        out.push(NewEvent::replica(
            EventReason::ReplicaStarted,
            new,
            format!(
                "replica {id} started (instance {}, generation {}){}",
                new.instance_id,
                new.workload_generation,
                if new.address.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", new.address)
                }
            ),
        ));
    }
    if old.map(|o| o.state) != Some(new.state) {
        let reason = match new.state {
            ReplicaState::Healthy => Some(EventReason::ReplicaHealthy),
            ReplicaState::Unhealthy => Some(EventReason::ReplicaUnhealthy),
            ReplicaState::Backoff => Some(EventReason::ReplicaExited),
            ReplicaState::Failed => Some(EventReason::ReplicaFailed),
            _ => None,
        };
        if let Some(reason) = reason {
            let detail = if new.message.is_empty() {
                String::new()
            } else {
                format!(": {}", new.message)
            };
            out.push(NewEvent::replica(
                reason,
                new,
                format!("replica {id} is {}{detail}", new.state.as_str()),
            ));
        }
    }
    if new.crash_looping && !old.is_some_and(|o| o.crash_looping) {
        out.push(NewEvent::replica(
            EventReason::ReplicaCrashLooping,
            new,
            format!(
                "replica {id} is crash-looping after {} restarts: {}",
                new.restarts, new.message
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches("secret", "secret"));
        assert!(!token_matches("secret", "secreT"));
        assert!(!token_matches("secret", "secret2"));
        assert!(!token_matches("", "x"));
    }
}
