//! `AgentService`: one bidirectional stream per agent.
//!
//! The first message must be a hello with a valid join token for a declared
//! provider. The daemon answers with a welcome and then (through the reconciler)
//! the provider's complete assignment; the agent sends heartbeats and replica
//! status, and answers requests for replica output (routed to [`crate::logs`]).
//! A second stream for the same provider replaces the first.
//!
//! Boundary: this module records what agents say; it decides nothing about
//! placement.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::replica_from_pb;
use crate::daemon::{AgentConn, AgentSeen, Daemon, lock};
use crate::store::{NewEvent, ReplicaState, StoredReplica, now_ms};

/// Time an agent has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most replicas one report may carry.
const MAX_REPLICAS_PER_REPORT: usize = 10_000;
/// Largest message an agent may send.
pub const MAX_AGENT_MESSAGE: usize = 8 * 1024 * 1024;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    daemon: Arc<Daemon>,
}

impl AgentApi {
    /// The tonic service around a daemon context.
    pub fn server(daemon: Arc<Daemon>) -> pb::agent_service_server::AgentServiceServer<Self> {
        pb::agent_service_server::AgentServiceServer::new(AgentApi { daemon })
            .max_decoding_message_size(MAX_AGENT_MESSAGE)
    }
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

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::DaemonMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on an agent stream must be hello",
            ));
        };
        let daemon = &self.daemon;
        if !token_matches(&hello.join_token, &daemon.config.join_token) {
            return Err(Status::unauthenticated(format!(
                "agent {} for provider {}: invalid join token",
                hello.agent_id, hello.provider
            )));
        }
        let providers = daemon
            .store
            .providers()
            .map_err(crate::error::DaemonError::from)?;
        let Some(provider) = providers
            .iter()
            .find(|p| p.provider.metadata.name == hello.provider)
        else {
            return Err(Status::failed_precondition(format!(
                "provider {:?} is not declared; apply a Provider document named {:?} first",
                hello.provider, hello.provider
            )));
        };
        if provider.provider.spec.driver.as_str() != hello.driver {
            tracing::warn!(provider = %hello.provider, declared = provider.provider.spec.driver.as_str(),
                agent = %hello.driver, "agent runs a different driver than the provider declares");
        }
        if hello.replicas.len() > MAX_REPLICAS_PER_REPORT {
            return Err(Status::invalid_argument("hello lists too many replicas"));
        }

        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(pb::DaemonMessage {
            message: Some(pb::daemon_message::Message::Welcome(pb::Welcome {
                daemon_id: daemon.daemon_id.clone(),
                heartbeat_interval_ms: u32::try_from(daemon.config.heartbeat_interval.as_millis())
                    .unwrap_or(500),
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;

        let conn_id = daemon.next_conn_id();
        let provider = hello.provider.clone();
        let replaced = lock(&daemon.agents).insert(
            provider.clone(),
            AgentConn {
                conn_id,
                agent_id: hello.agent_id.clone(),
                version: hello.version.clone(),
                tx,
                last_seen: Instant::now(),
                last_seen_ms: now_ms(),
                sent_revision: 0,
                applied_revision: hello.applied_revision,
            },
        );
        if let Some(old) = &replaced {
            // The old stream may take a while to notice; its requests end now.
            crate::logs::agent_gone(daemon, &provider, old.conn_id);
        }
        tracing::info!(%provider, agent_id = %hello.agent_id, replicas = hello.replicas.len(), "agent connected");
        daemon.record(vec![NewEvent {
            reason: "ProviderConnected".into(),
            kind: "Provider".into(),
            object: provider.clone(),
            message: format!(
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
            provider: provider.clone(),
            ..NewEvent::default()
        }]);
        let was_down = lock(&daemon.liveness)
            .get(&provider)
            .is_some_and(|l| l.state == crate::liveness::Liveness::Down);
        let running = hello
            .replicas
            .iter()
            .filter(|r| !r.instance_id.is_empty())
            .count();
        if was_down && running > 0 {
            // Its share was re-placed while it was out of reach; what it kept
            // running meanwhile are duplicates. Its assignment stops them.
            daemon.record(vec![NewEvent {
                reason: "DuplicateReplicas".into(),
                kind: "Provider".into(),
                object: provider.clone(),
                message: format!(
                    "provider {provider} was down but kept {running} replicas running; they duplicate the re-placed ones and are stopped unless its share is given back"
                ),
                provider: provider.clone(),
                warning: true,
                ..NewEvent::default()
            }]);
        }
        handle_report(daemon, &provider, hello.replicas, Vec::new(), true);
        daemon.wake();

        let daemon = daemon.clone();
        tokio::spawn(async move {
            let ended = loop {
                let next = tokio::select! {
                    _ = daemon.shutdown.cancelled() => break "daemon stopping".to_string(),
                    next = inbound.message() => next,
                };
                if !is_current(&daemon, &provider, conn_id) {
                    break "replaced by a newer stream".to_string();
                }
                match next {
                    Ok(Some(msg)) => handle_message(&daemon, &provider, conn_id, msg),
                    Ok(None) => break "stream closed".to_string(),
                    Err(status) => break format!("stream failed: {}", status.message()),
                }
            };
            let removed = {
                let mut agents = lock(&daemon.agents);
                match agents.get(&provider) {
                    Some(c) if c.conn_id == conn_id => agents.remove(&provider),
                    _ => None,
                }
            };
            // After the removal: no request can register on this stream any more.
            crate::logs::agent_gone(&daemon, &provider, conn_id);
            if let Some(conn) = removed {
                lock(&daemon.seen).insert(
                    provider.clone(),
                    AgentSeen {
                        agent_id: conn.agent_id.clone(),
                        version: conn.version.clone(),
                        last_seen_ms: conn.last_seen_ms,
                        applied_revision: conn.applied_revision,
                        last_seen: Some(conn.last_seen),
                    },
                );
                daemon.wake();
                tracing::info!(%provider, reason = %ended, "agent disconnected");
                daemon.record(vec![NewEvent {
                    reason: "ProviderDisconnected".into(),
                    kind: "Provider".into(),
                    object: provider.clone(),
                    message: format!("agent {} disconnected: {ended}", conn.agent_id),
                    provider: provider.clone(),
                    warning: true,
                    ..NewEvent::default()
                }]);
            }
        });

        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn is_current(daemon: &Daemon, provider: &str, conn_id: u64) -> bool {
    lock(&daemon.agents)
        .get(provider)
        .is_some_and(|c| c.conn_id == conn_id)
}

fn handle_message(daemon: &Daemon, provider: &str, conn_id: u64, msg: pb::AgentMessage) {
    let mut ack = None;
    let applied = match msg.message {
        Some(pb::agent_message::Message::Heartbeat(hb)) => {
            ack = Some(hb.seq);
            Some(hb.applied_revision)
        }
        Some(pb::agent_message::Message::Status(report)) => {
            if report.replicas.len() > MAX_REPLICAS_PER_REPORT {
                tracing::warn!(provider, "status report with too many replicas ignored");
                return;
            }
            handle_report(
                daemon,
                provider,
                report.replicas,
                report.removed,
                report.full,
            );
            Some(report.applied_revision)
        }
        Some(pb::agent_message::Message::Logs(answer)) => {
            crate::logs::deliver(daemon, provider, conn_id, answer);
            None
        }
        Some(pb::agent_message::Message::Hello(_)) | None => {
            tracing::warn!(
                provider,
                "unexpected message on an established agent stream ignored"
            );
            None
        }
    };
    let mut agents = lock(&daemon.agents);
    if let Some(conn) = agents.get_mut(provider).filter(|c| c.conn_id == conn_id) {
        conn.last_seen = Instant::now();
        conn.last_seen_ms = now_ms();
        if let Some(rev) = applied {
            conn.applied_revision = conn.applied_revision.max(rev);
        }
        if let Some(seq) = ack {
            let lease_ms = u32::try_from(daemon.config.lease.as_millis()).unwrap_or(u32::MAX);
            // A full queue drops the ack: the agent's lease then lapses sooner,
            // which is the safe direction.
            let _ = conn.tx.try_send(Ok(pb::DaemonMessage {
                message: Some(pb::daemon_message::Message::HeartbeatAck(
                    pb::HeartbeatAck { seq, lease_ms },
                )),
            }));
        }
    }
}

/// Records reported replicas, removes the ones reported gone, and turns state
/// transitions into events.
fn handle_report(
    daemon: &Daemon,
    provider: &str,
    reported: Vec<pb::ReplicaStatus>,
    removed: Vec<String>,
    full: bool,
) {
    let mut health_of: BTreeMap<String, bool> = BTreeMap::new();
    let mut updates = Vec::with_capacity(reported.len());
    for r in reported {
        let has_check = *health_of.entry(r.app.clone()).or_insert_with(
            || matches!(daemon.store.app(&r.app), Ok(Some(a)) if a.app.spec.health.is_some()),
        );
        match replica_from_pb(provider, r, has_check) {
            Ok(replica) => updates.push(replica),
            Err(e) => tracing::warn!(provider, error = %e, "invalid replica status ignored"),
        }
    }
    let removed: Vec<(String, u32)> = removed
        .iter()
        .filter_map(|k| {
            let (app, index) = k.rsplit_once('/')?;
            Some((app.to_string(), index.parse().ok()?))
        })
        .collect();

    let mut events = Vec::new();
    let mut gone: Vec<StoredReplica> = Vec::new();
    let mut readiness_changed = false;
    {
        let mut all = lock(&daemon.replicas);
        let known = all.entry(provider.to_string()).or_default();
        if full {
            let keep: std::collections::BTreeSet<(String, u32)> =
                updates.iter().map(|r| (r.app.clone(), r.index)).collect();
            let stale: Vec<(String, u32)> = known
                .keys()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            for k in stale {
                if let Some(r) = known.remove(&k) {
                    gone.push(r);
                }
            }
        }
        for k in &removed {
            if let Some(r) = known.remove(k) {
                gone.push(r);
            }
        }
        for r in &updates {
            let old = known.get(&(r.app.clone(), r.index));
            readiness_changed |= old.is_none_or(|o| o.ready != r.ready || o.address != r.address);
            events.extend(transition_events(old, r));
            known.insert((r.app.clone(), r.index), r.clone());
        }
    }
    // Readiness feeds placement (make-before-break) and routing.
    if readiness_changed || !gone.is_empty() {
        daemon.wake();
    }
    for r in &gone {
        events.push(replica_event(
            r,
            "ReplicaRemoved",
            format!("replica {} stopped and removed", r.id()),
            false,
        ));
    }
    let result = if full {
        daemon.store.put_replicas(Some(provider), &updates)
    } else {
        daemon
            .store
            .delete_replicas(provider, &removed)
            .and_then(|()| daemon.store.put_replicas(None, &updates))
    };
    if let Err(e) = result {
        tracing::error!(provider, error = %e, "cannot store replica status");
    }
    daemon.record(events);
}

fn replica_event(r: &StoredReplica, reason: &str, message: String, warning: bool) -> NewEvent {
    NewEvent {
        reason: reason.into(),
        kind: "Replica".into(),
        object: r.id(),
        message,
        app: r.app.clone(),
        provider: r.provider.clone(),
        warning,
    }
}

/// Events for the change from `old` to `new` of one replica.
fn transition_events(old: Option<&StoredReplica>, new: &StoredReplica) -> Vec<NewEvent> {
    let mut out = Vec::new();
    let id = new.id();
    let new_instance =
        !new.instance_id.is_empty() && old.is_none_or(|o| o.instance_id != new.instance_id);
    if new_instance {
        out.push(replica_event(
            new,
            "ReplicaStarted",
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
            false,
        ));
    }
    let old_state = old.map(|o| o.state);
    if old_state != Some(new.state) {
        let (reason, warning) = match new.state {
            ReplicaState::Healthy => (Some("ReplicaHealthy"), false),
            ReplicaState::Unhealthy => (Some("ReplicaUnhealthy"), true),
            ReplicaState::Backoff => (Some("ReplicaExited"), true),
            ReplicaState::Failed => (Some("ReplicaFailed"), true),
            _ => (None, false),
        };
        if let Some(reason) = reason {
            let detail = if new.message.is_empty() {
                String::new()
            } else {
                format!(": {}", new.message)
            };
            out.push(replica_event(
                new,
                reason,
                format!("replica {id} is {}{detail}", new.state.as_str()),
                warning,
            ));
        }
    }
    if new.crash_looping && !old.is_some_and(|o| o.crash_looping) {
        out.push(replica_event(
            new,
            "ReplicaCrashLooping",
            format!(
                "replica {id} is crash-looping after {} restarts: {}",
                new.restarts, new.message
            ),
            true,
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
