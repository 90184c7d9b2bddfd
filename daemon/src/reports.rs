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

use std::net::SocketAddr;

use crate::access::{AgentProof, Refused};
use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::logs::LogAnswer;
use crate::model::{Assignment, EventReason, NewEvent, ReplicaState, ReportedReplica, now_ms};
use crate::registry::{AgentCapabilities, AgentSeen, Connected, LiveSession, ToAgent, Welcome};
use crate::security::Counters;
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
    /// Why the replica statuses that could not be read were left out.
    pub invalid: Vec<String>,
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
        /// Why the statuses that could not be read were left out.
        invalid: Vec<String>,
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

impl Daemon {
    /// Admits an agent's session: checks what it proved (`proof`) and its
    /// provider, refuses a second agent while the provider's agent is alive,
    /// welcomes it on `tx`, registers the session (replacing an earlier one
    /// of the same agent) and records what it runs.
    pub async fn open_session(
        &self,
        hello: Hello,
        tx: mpsc::Sender<ToAgent>,
        proof: AgentProof,
        peer: Option<SocketAddr>,
    ) -> Result<Connected, DaemonError> {
        let identity = self.admit_agent(&hello, &proof, peer).await?;
        let refuse = |e: DaemonError| {
            self.refuse(
                Refused::Session,
                peer,
                &hello.provider,
                &format!(
                    "session of agent {} for provider {} refused: {e}",
                    hello.agent_id, hello.provider
                ),
            );
            e
        };
        let providers = self.store.providers()?;
        let Some(declared) = providers
            .iter()
            .find(|p| p.provider.metadata.name == hello.provider)
        else {
            return Err(refuse(DaemonError::FailedPrecondition(format!(
                "provider {:?} is not declared; apply a Provider document named {:?} first",
                hello.provider, hello.provider
            ))));
        };
        if declared.provider.spec.driver.as_str() != hello.driver {
            tracing::warn!(provider = %hello.provider, declared = declared.provider.spec.driver.as_str(),
                agent = %hello.driver, "agent runs a different driver than the provider declares");
        }
        if hello.replicas.len() > MAX_REPLICAS_PER_REPORT {
            return Err(refuse(DaemonError::BadRequest(format!(
                "hello lists {} replicas, over the {MAX_REPLICAS_PER_REPORT} one message may carry",
                hello.replicas.len()
            ))));
        }
        let quiet_after = self.config.liveness.suspect_after;
        let live = |l: LiveSession| {
            refuse(DaemonError::Conflict(format!(
                "provider {} already has a live session from agent {} (heard {} ms ago); a second agent cannot take it over while it lives: stop the other agent, or wait until it has been silent for {} ms",
                hello.provider,
                l.agent_id,
                l.heard_ago.as_millis(),
                quiet_after.as_millis()
            )))
        };
        self.registry
            .may_connect(&hello.provider, &identity.agent_id, quiet_after)
            .map_err(live)?;
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
        let certificate = identity.serial.clone();
        let connected = self
            .registry
            .connect(
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
                identity,
                quiet_after,
            )
            .map_err(live)?;
        if let Some(old) = connected.replaced {
            // The old stream may take a while to notice; its requests end now.
            crate::logs::agent_gone(self, &provider, old);
        }
        tracing::info!(%provider, agent_id = %hello.agent_id, replicas = hello.replicas.len(),
            certificate = certificate.as_deref().unwrap_or("-"), "agent connected");
        let mut events = vec![NewEvent::provider(
            EventReason::ProviderConnected,
            &provider,
            format!(
                "agent {} (version {}) connected{}{}, running {} replicas",
                hello.agent_id,
                hello.version,
                certificate
                    .as_deref()
                    .map_or_else(String::new, |c| format!(" with certificate {c}")),
                if connected.replaced.is_some() {
                    " and replaced its previous stream"
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
        self.record_agent_events(&provider, events);
        if !hello.invalid.is_empty() {
            self.refused_reports(&provider, &hello.invalid);
        }
        self.report(&provider, hello.replicas, Vec::new(), true);
        self.wake();
        Ok(connected)
    }

    /// Ends session `conn_id` of `provider`: its agent sent more than the
    /// daemon takes from one agent.
    pub fn agent_flooding(&self, provider: &str, conn_id: u64, what: &str) {
        let ended = self
            .registry
            .end_sessions(|p, s| p == provider && s.conn_id == conn_id);
        if ended.is_empty() {
            return;
        }
        Counters::add(&self.security.counters.flooding_agents, 1);
        crate::logs::agent_gone(self, provider, conn_id);
        let agent = ended.first().map(|(_, _, a)| a.clone()).unwrap_or_default();
        tracing::warn!(provider, agent_id = %agent, "agent session ended: {what}");
        self.record(vec![NewEvent::provider(
            EventReason::AgentFlooding,
            provider,
            format!("agent {agent} of provider {provider} {what}: its session was ended"),
        )]);
        self.wake();
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
                invalid,
                removed,
                full,
                applied_revision,
                applied_store,
            } => {
                if !invalid.is_empty() {
                    self.refused_reports(provider, &invalid);
                }
                if replicas.len() > MAX_REPLICAS_PER_REPORT {
                    self.refused_reports(
                        provider,
                        &[format!(
                            "a status report of {} replicas, over the {MAX_REPLICAS_PER_REPORT} one message may carry",
                            replicas.len()
                        )],
                    );
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
                self.refused_reports(
                    provider,
                    &["a message that has no place on an established session (a second hello, or an empty one)".to_string()],
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
            self.record_agent_events(
                provider,
                vec![NewEvent::provider(
                    EventReason::ProviderDisconnected,
                    provider,
                    format!("agent {agent_id} disconnected: {why}"),
                )],
            );
        }
    }

    /// Records reported replicas the daemon assigned to `provider` (or
    /// already tracks), removes the ones reported gone, and turns state
    /// transitions into events. Replicas it did not assign are dropped,
    /// counted and said once per burst.
    fn report(
        &self,
        provider: &str,
        reported: Vec<ReplicaReport>,
        removed: Vec<(String, u32)>,
        full: bool,
    ) {
        let assignment = self.store.assignment(provider).ok().flatten();
        let known: BTreeSet<(String, u32)> = self.registry.with(|entries| {
            entries
                .get(provider)
                .map(|e| e.view.replicas.keys().cloned().collect())
                .unwrap_or_default()
        });
        let mut apps: BTreeMap<String, Option<AppFacts>> = BTreeMap::new();
        let mut updates = Vec::with_capacity(reported.len());
        let mut refused: Vec<String> = Vec::new();
        for r in reported {
            let facts = *apps.entry(r.app.clone()).or_insert_with(|| {
                self.store.app(&r.app).ok().flatten().map(|a| AppFacts {
                    generation: a.generation,
                    has_health_check: a.app.spec.health.is_some(),
                })
            });
            let is_known = known.contains(&(r.app.clone(), r.index));
            match admissible(provider, &r, facts, assignment.as_ref(), is_known) {
                Ok(facts) => updates.push(r.into_replica(provider, facts.has_health_check)),
                Err(why) => refused.push(why),
            }
        }
        if !refused.is_empty() {
            self.refused_reports(provider, &refused);
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
        self.record_agent_events(provider, events);
    }

    /// Counts replicas of `provider`'s report that were dropped, and says so
    /// (in the log and as an event) at most at the agent's event rate.
    fn refused_reports(&self, provider: &str, refused: &[String]) {
        Counters::add(
            &self.security.counters.dropped_reports,
            refused.len() as u64,
        );
        let sample: Vec<&str> = refused.iter().take(3).map(String::as_str).collect();
        let message = format!(
            "ignored {} item(s) of what provider {provider}'s agent reported: {}{}",
            refused.len(),
            sample.join("; "),
            if refused.len() > sample.len() {
                "; …"
            } else {
                ""
            }
        );
        let admitted =
            self.security
                .agent_events
                .admit(&format!("{provider}/refused"), 1, Instant::now());
        if admitted.allowed == 1 {
            tracing::warn!(provider, "{message}");
            self.record(vec![NewEvent::provider(
                EventReason::AgentReportRefused,
                provider,
                message,
            )]);
        }
    }

    /// Records events derived from what `provider`'s agent said, at most at
    /// the agent event rate: beyond it they are dropped and counted, and the
    /// next event admitted is preceded by one saying how many were dropped.
    pub(crate) fn record_agent_events(&self, provider: &str, mut events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        let admitted = self
            .security
            .agent_events
            .admit(provider, events.len(), Instant::now());
        let dropped = events.len() - admitted.allowed;
        if dropped > 0 {
            Counters::add(&self.security.counters.dropped_events, dropped as u64);
            tracing::debug!(provider, dropped, "events over the provider's rate dropped");
        }
        events.truncate(admitted.allowed);
        if admitted.dropped_before > 0 {
            let rate = crate::security::limits::AGENT_EVENTS;
            events.insert(
                0,
                NewEvent::provider(
                    EventReason::AgentEventsDropped,
                    provider,
                    format!(
                        "{} events about provider {provider} were dropped: its agent reported more changes than the log takes from one provider ({} at once, {}/s)",
                        admitted.dropped_before, rate.burst, rate.per_second
                    ),
                ),
            );
        }
        self.record(events);
    }
}

/// What a report is checked against about its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AppFacts {
    /// The app's generation now.
    generation: u64,
    /// Without a health check, running counts as ready.
    has_health_check: bool,
}

/// Whether the daemon takes `r` from `provider`'s agent: its app is declared
/// (`app`), it does not claim a generation the app has not reached, and it
/// is a replica the daemon assigned to the provider (index below the
/// assigned count) or one it already tracks (a replica being stopped after a
/// scale-down). Says why not, for the log.
fn admissible(
    provider: &str,
    r: &ReplicaReport,
    app: Option<AppFacts>,
    assignment: Option<&Assignment>,
    known: bool,
) -> Result<AppFacts, String> {
    let id = format!("{}/{provider}/{}", r.app, r.index);
    let Some(app) = app else {
        return Err(format!("{id}: app {} is not declared", r.app));
    };
    if r.generation > app.generation || r.workload_generation > app.generation {
        return Err(format!(
            "{id}: reports generation {}, but the app is at generation {}",
            r.generation.max(r.workload_generation),
            app.generation
        ));
    }
    let assigned = assignment
        .and_then(|a| a.apps.iter().find(|x| x.app == r.app))
        .map_or(0, |x| x.replicas);
    if !known && r.index >= assigned {
        return Err(format!(
            "{id}: not assigned (the provider runs {assigned} replica(s) of {})",
            r.app
        ));
    }
    Ok(app)
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
    use std::sync::Arc;

    use proptest::prelude::*;
    use skymirror_proto::v1 as pb;

    use super::*;
    use crate::api::convert::{from_agent_pb, hello_from_pb};
    use crate::model::{AssignedApp, Assignment};
    use crate::store::{Batch, SledStore, Store};

    const SPEC: &str = "
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: aa}
spec: {driver: process}
---
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: web}
spec: {command: server, replicas: 2}
";

    fn report(app: &str, index: u32, generation: u64) -> ReplicaReport {
        ReplicaReport {
            app: app.into(),
            index,
            generation,
            workload_generation: generation,
            state: ReplicaState::Healthy,
            address: "127.0.0.1:1".into(),
            ports: BTreeMap::new(),
            instance_id: "1".into(),
            restarts: 0,
            crash_looping: false,
            message: String::new(),
            started_at_ms: 0,
            state_since_ms: 0,
        }
    }

    #[test]
    fn only_assigned_or_tracked_replicas_of_declared_apps_are_admitted() {
        let web = Some(AppFacts {
            generation: 3,
            has_health_check: false,
        });
        let assignment = Assignment {
            provider: "aa".into(),
            revision: 1,
            apps: vec![AssignedApp {
                app: "web".into(),
                generation: 3,
                workload_generation: 3,
                replicas: 2,
                extra: 0,
            }],
        };
        let ok = |r: &ReplicaReport, app, known| admissible("aa", r, app, Some(&assignment), known);
        assert!(ok(&report("web", 0, 3), web, false).is_ok());
        assert!(ok(&report("web", 1, 2), web, false).is_ok());
        let beyond = ok(&report("web", 2, 3), web, false).expect_err("not assigned");
        assert!(
            beyond.contains("web/aa/2: not assigned (the provider runs 2"),
            "{beyond}"
        );
        // A replica already tracked (being stopped after a scale-down) stays.
        assert!(ok(&report("web", 2, 3), web, true).is_ok());
        let ghost = ok(&report("ghost", 0, 1), None, false).expect_err("undeclared");
        assert!(ghost.contains("app ghost is not declared"), "{ghost}");
        let future = ok(&report("web", 0, 4), web, true).expect_err("future");
        assert!(future.contains("generation 4"), "{future}");
        assert!(admissible("aa", &report("web", 0, 3), web, None, false).is_err());
    }

    fn daemon() -> (Arc<Daemon>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("store")).expect("store");
        let (apps, providers) = crate::model::testing::declared(SPEC);
        store
            .commit(
                Batch {
                    put_apps: apps,
                    put_providers: providers,
                    put_assignments: vec![Assignment {
                        provider: "aa".into(),
                        revision: 1,
                        apps: vec![AssignedApp {
                            app: "web".into(),
                            generation: 1,
                            workload_generation: 1,
                            replicas: 2,
                            extra: 0,
                        }],
                    }],
                    ..Batch::default()
                },
                true,
            )
            .expect("committed");
        let config = crate::daemon::DaemonConfig::new(dir.path().join("store"), "t".into());
        (Daemon::new(Arc::new(store), config).expect("daemon"), dir)
    }

    /// Text an agent may send: anything, control characters included.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,12}",
            any::<String>(),
            Just("\u{1b}]0;owned\u{7}\r\n".to_string()),
        ]
    }

    fn replica() -> impl Strategy<Value = pb::ReplicaStatus> {
        (
            prop_oneof![Just("web".to_string()), Just("ghost".to_string()), text()],
            0u32..6,
            0u64..4,
            0i32..12,
            text(),
            text(),
            prop::collection::btree_map(text(), any::<u32>(), 0..3),
        )
            .prop_map(|(app, index, generation, state, address, message, ports)| {
                pb::ReplicaStatus {
                    app,
                    index,
                    generation,
                    workload_generation: generation,
                    state,
                    address,
                    ports: ports.into_iter().collect(),
                    instance_id: message.clone(),
                    message,
                    ..pb::ReplicaStatus::default()
                }
            })
    }

    /// Any message an agent can send after its hello.
    fn message() -> impl Strategy<Value = pb::AgentMessage> {
        use pb::agent_message::Message;
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(seq, applied_revision)| {
                Some(Message::Heartbeat(pb::Heartbeat {
                    time_ms: 0,
                    applied_revision,
                    seq,
                    ..pb::Heartbeat::default()
                }))
            }),
            (
                prop::collection::vec(replica(), 0..8),
                any::<bool>(),
                prop::collection::vec(text(), 0..3)
            )
                .prop_map(|(replicas, full, removed)| {
                    Some(Message::Status(pb::StatusReport {
                        replicas,
                        full,
                        removed,
                        applied_revision: 1,
                        ..pb::StatusReport::default()
                    }))
                }),
            (any::<u64>(), text(), any::<bool>()).prop_map(|(request_id, error, end)| {
                Some(Message::Logs(pb::ReplicaLogs {
                    request_id,
                    replica: error.clone(),
                    data: error.clone().into_bytes(),
                    error,
                    end,
                }))
            }),
            Just(Some(Message::Hello(pb::Hello::default()))),
            Just(None),
        ]
        .prop_map(|message| pb::AgentMessage { message })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever an admitted agent sends, the daemon keeps only replicas
        /// it assigned to the provider, every string it keeps is printable
        /// and bounded, and nothing panics.
        #[test]
        fn every_agent_message_is_bounded_and_sanitized(
            agent_id in text(),
            version in text(),
            hello_replicas in prop::collection::vec(replica(), 0..20),
            messages in prop::collection::vec(message(), 0..30),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let (daemon, _dir) = daemon();
            runtime.block_on(async {
                let hello = hello_from_pb(pb::Hello {
                    provider: "aa".into(),
                    agent_id,
                    join_token: "t".into(),
                    version,
                    driver: "process".into(),
                    replicas: hello_replicas,
                    ..pb::Hello::default()
                });
                prop_assert!(!hello.agent_id.chars().any(crate::security::is_unsafe_char));
                let (tx, mut rx) = mpsc::channel(1024);
                let connected = daemon
                    .open_session(hello, tx, AgentProof::HelloToken, None)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for m in messages {
                    daemon.agent_message("aa", connected.conn_id, from_agent_pb("aa", m));
                }
                while rx.try_recv().is_ok() {}
                let snapshot = daemon.registry.snapshot();
                let view = snapshot.providers.get("aa").expect("aa");
                prop_assert!(view.replicas.len() <= 2, "{} replicas kept", view.replicas.len());
                for r in view.replicas.values() {
                    prop_assert_eq!(&r.app, "web");
                    prop_assert!(r.index < 2 && r.generation <= 1);
                    for s in [&r.address, &r.message, &r.instance_id] {
                        prop_assert!(!s.chars().any(crate::security::is_unsafe_char), "{:?}", s);
                        prop_assert!(s.len() <= crate::security::MAX_AGENT_TEXT);
                    }
                }
                Ok(())
            })?;
        }
    }
}
