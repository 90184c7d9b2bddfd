//! The read side: what `get`, `status` and `describe` show, in domain terms
//! (app summaries, provider statuses, the daemon's own status), computed from
//! the store and one registry snapshot.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::liveness::Liveness;
use crate::model::{Assignment, DeclaredApp, ReportedReplica};
use crate::registry::Snapshot;

/// Desired and ready replicas of an app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSummary {
    /// App name.
    pub name: String,
    /// Replicas assigned over all providers.
    pub desired_replicas: u32,
    /// Of those, ready and on the current workload.
    pub ready_replicas: u32,
    /// Providers with a share.
    pub providers: Vec<String>,
}

/// A provider as `get providers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    /// Provider name.
    pub name: String,
    /// Liveness.
    pub state: Liveness,
    /// Why, for people.
    pub state_reason: String,
    /// Since when, wall-clock ms.
    pub state_since_ms: i64,
    /// Held out until, wall-clock ms; 0 when not held out.
    pub held_out_until_ms: i64,
    /// No new replicas are placed there.
    pub cordoned: bool,
    /// Its replicas move away.
    pub draining: bool,
    /// Its agent's id, if it was ever heard from.
    pub agent_id: String,
    /// Its agent's version.
    pub agent_version: String,
    /// Last heartbeat, wall-clock ms.
    pub last_heartbeat_ms: i64,
    /// Revision its agent applied.
    pub applied_revision: u64,
    /// Revision of its assignment.
    pub assignment_revision: u64,
    /// Replicas assigned.
    pub assigned_replicas: u32,
    /// Replicas ready.
    pub ready_replicas: u32,
}

/// The daemon's own status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonStatus {
    /// Declared apps.
    pub apps: usize,
    /// Declared providers.
    pub providers: usize,
    /// Agents with a session.
    pub connected_agents: usize,
    /// Replicas reported.
    pub replicas_reported: usize,
    /// Reconcile timings.
    pub reconcile: crate::reconciler::ReconcileStats,
    /// Bytes the store takes on disk.
    pub store_bytes: u64,
    /// Start, wall-clock ms.
    pub started_at_ms: i64,
    /// Newest event's sequence number.
    pub last_event_seq: u64,
    /// Why the store cannot write, when it cannot.
    pub store_error: Option<String>,
    /// The store's identity.
    pub identity: crate::store::StoreIdentity,
    /// Whether the API is served over TLS, and the pinned CA's hash.
    pub tls: Option<String>,
    /// Refusals and drops since start, in the order of the counters.
    pub security: SecurityCounts,
}

/// Refusals and drops since the daemon started (see `security::Counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecurityCounts {
    /// Joins and renewals refused.
    pub refused_joins: u64,
    /// Agent sessions refused.
    pub refused_sessions: u64,
    /// Control calls refused.
    pub refused_calls: u64,
    /// TLS handshakes failed.
    pub failed_handshakes: u64,
    /// Replica reports dropped.
    pub dropped_reports: u64,
    /// Events dropped over a provider's rate.
    pub dropped_events: u64,
    /// Sessions ended for flooding.
    pub flooding_agents: u64,
}

/// Desired and ready replicas of an app over all providers. A replica counts
/// as ready only if it is assigned, ready, and runs the current workload.
pub fn summarize(
    app: &DeclaredApp,
    assignments: &[Assignment],
    replicas: &[ReportedReplica],
) -> AppSummary {
    let name = &app.app.metadata.name;
    let mut summary = AppSummary {
        name: name.clone(),
        ..AppSummary::default()
    };
    for a in assignments {
        let Some(share) = a.apps.iter().find(|x| &x.app == name) else {
            continue;
        };
        summary.desired_replicas += share.replicas;
        summary.providers.push(a.provider.clone());
        let ready = replicas
            .iter()
            .filter(|r| {
                r.provider == a.provider
                    && &r.app == name
                    && r.index < share.replicas
                    && r.ready
                    && r.workload_generation == app.workload_generation
            })
            .count();
        summary.ready_replicas += u32::try_from(ready).unwrap_or(u32::MAX);
    }
    summary
}

/// A provider's liveness as the API shows it: state, reason, since (ms),
/// held out until (ms).
pub fn provider_liveness(
    snapshot: &Snapshot,
    provider: &str,
    started_at_ms: i64,
    now: Instant,
) -> (Liveness, String, i64, i64) {
    let view = snapshot.providers.get(provider);
    let since = view
        .and_then(|v| v.liveness_since_ms)
        .unwrap_or(started_at_ms);
    match view.and_then(|v| v.liveness.as_ref()) {
        Some(l) => (
            l.state,
            l.reason.clone(),
            since,
            if l.held_out(now) {
                view.map_or(0, |v| v.held_out_until_ms)
            } else {
                0
            },
        ),
        None => (Liveness::Unknown, "not evaluated yet".into(), since, 0),
    }
}

/// What the read side needs of the daemon at one instant.
#[derive(Debug, Clone)]
pub struct ReadView {
    /// Assignments, by provider.
    pub assignments: Vec<Assignment>,
    /// Replicas as the API shows them.
    pub replicas: Vec<ReportedReplica>,
    /// The registry.
    pub snapshot: Snapshot,
    /// Operator controls.
    pub controls: crate::model::Controls,
    /// Daemon start, wall-clock ms.
    pub started_at_ms: i64,
}

impl ReadView {
    /// An app's summary.
    pub fn summary(&self, app: &DeclaredApp) -> AppSummary {
        summarize(app, &self.assignments, &self.replicas)
    }

    /// A provider's status.
    pub fn provider_status(&self, name: &str) -> ProviderStatus {
        let assignment = self.assignments.iter().find(|a| a.provider == name);
        let (state, state_reason, state_since_ms, held_out_until_ms) =
            provider_liveness(&self.snapshot, name, self.started_at_ms, Instant::now());
        let seen = self
            .snapshot
            .providers
            .get(name)
            .and_then(|v| v.seen.as_ref());
        ProviderStatus {
            name: name.to_string(),
            state,
            state_reason,
            state_since_ms,
            held_out_until_ms,
            cordoned: self.controls.cordoned.contains(name),
            draining: self.controls.draining.contains(name),
            agent_id: seen.map(|s| s.agent_id.clone()).unwrap_or_default(),
            agent_version: seen.map(|s| s.version.clone()).unwrap_or_default(),
            last_heartbeat_ms: seen.map_or(0, |s| s.last_seen_ms),
            applied_revision: seen.map_or(0, |s| s.applied_revision),
            assignment_revision: assignment.map_or(0, |a| a.revision),
            assigned_replicas: assignment.map_or(0, |a| a.apps.iter().map(|x| x.replicas).sum()),
            ready_replicas: u32::try_from(
                self.replicas
                    .iter()
                    .filter(|r| r.provider == name && r.ready)
                    .count(),
            )
            .unwrap_or(u32::MAX),
        }
    }

    /// Each provider's share of `app`, by provider.
    pub fn shares(&self, app: &str) -> BTreeMap<String, u32> {
        self.assignments
            .iter()
            .filter_map(|a| {
                let share = a.apps.iter().find(|x| x.app == app)?;
                Some((a.provider.clone(), share.replicas))
            })
            .collect()
    }
}

impl Daemon {
    /// The read side's view now.
    pub fn read_view(&self) -> Result<ReadView, DaemonError> {
        let snapshot = self.registry.snapshot();
        Ok(ReadView {
            assignments: self.store.assignments()?,
            replicas: snapshot.effective_replicas(),
            snapshot,
            controls: self.store.controls()?,
            started_at_ms: self.started_at_ms,
        })
    }

    /// The daemon's own status.
    pub fn daemon_status(&self) -> Result<DaemonStatus, DaemonError> {
        let snapshot = self.registry.snapshot();
        Ok(DaemonStatus {
            apps: self.store.apps()?.len(),
            providers: self.store.providers()?.len(),
            connected_agents: snapshot.providers.values().filter(|v| v.connected).count(),
            replicas_reported: snapshot.effective_replicas().len(),
            reconcile: self.stats(),
            store_bytes: self.store.size_on_disk()?,
            started_at_ms: self.started_at_ms,
            last_event_seq: self.store.last_event_seq()?,
            store_error: match self.store.writable() {
                crate::store::Writable::Yes => None,
                crate::store::Writable::No { error, .. } => Some(error),
            },
            identity: self.identity.clone(),
            tls: self.security.pki.as_ref().map(|p| p.ca_hash().to_string()),
            security: {
                use crate::security::Counters;
                let c = &self.security.counters;
                SecurityCounts {
                    refused_joins: Counters::get(&c.refused_joins),
                    refused_sessions: Counters::get(&c.refused_sessions),
                    refused_calls: Counters::get(&c.refused_calls),
                    failed_handshakes: Counters::get(&c.failed_handshakes),
                    dropped_reports: Counters::get(&c.dropped_reports),
                    dropped_events: Counters::get(&c.dropped_events),
                    flooding_agents: Counters::get(&c.flooding_agents),
                }
            },
        })
    }
}
