//! Conversions between the domain and the wire types, at the API edge.
//!
//! Boundary: the only place besides `spec/convert.rs` (the spec's own wire
//! form) where domain types meet protobuf.

use std::time::Duration;

use skymirror_proto::v1 as pb;

use crate::explain::Explanation;
use crate::liveness::Liveness;
use crate::logs::{LogAnswer, LogChunk, LogsQuery};
use crate::model::{
    Action, DeclaredApp, DeclaredProvider, Event, ObjectResult, PlacementChange, ReplicaState,
    ReportedReplica, RoutingTable,
};
use crate::registry::{AgentCapabilities, AssignmentMessage, ToAgent};
use crate::reports::{FromAgent, Hello, ReplicaReport};
use crate::spec;
use crate::summary::{AppSummary, DaemonStatus, ProviderStatus};

use crate::security::{MAX_AGENT_TEXT, sanitize};

/// Longest address an agent may report (`host:port`).
const MAX_ADDRESS: usize = 255;
/// Most named ports one replica may report.
const MAX_PORTS: usize = 64;

/// Replica states as the wire spells them.
pub fn state_to_pb(state: ReplicaState) -> pb::ReplicaState {
    match state {
        ReplicaState::Pending => pb::ReplicaState::Pending,
        ReplicaState::Starting => pb::ReplicaState::Starting,
        ReplicaState::Running => pb::ReplicaState::Running,
        ReplicaState::Healthy => pb::ReplicaState::Healthy,
        ReplicaState::Unhealthy => pb::ReplicaState::Unhealthy,
        ReplicaState::Backoff => pb::ReplicaState::Backoff,
        ReplicaState::Stopping => pb::ReplicaState::Stopping,
        ReplicaState::Stopped => pb::ReplicaState::Stopped,
        ReplicaState::Failed => pb::ReplicaState::Failed,
    }
}

fn state_from_pb(state: i32) -> Option<ReplicaState> {
    Some(match pb::ReplicaState::try_from(state).ok()? {
        pb::ReplicaState::Unspecified => return None,
        pb::ReplicaState::Pending => ReplicaState::Pending,
        pb::ReplicaState::Starting => ReplicaState::Starting,
        pb::ReplicaState::Running => ReplicaState::Running,
        pb::ReplicaState::Healthy => ReplicaState::Healthy,
        pb::ReplicaState::Unhealthy => ReplicaState::Unhealthy,
        pb::ReplicaState::Backoff => ReplicaState::Backoff,
        pb::ReplicaState::Stopping => ReplicaState::Stopping,
        pb::ReplicaState::Stopped => ReplicaState::Stopped,
        pb::ReplicaState::Failed => ReplicaState::Failed,
    })
}

/// Text from an agent as the daemon keeps it: control characters escaped,
/// at most [`MAX_AGENT_TEXT`] bytes.
fn bounded(s: &str) -> String {
    sanitize(s, MAX_AGENT_TEXT)
}

/// Validates a replica status from an agent.
pub fn report_from_pb(provider: &str, r: pb::ReplicaStatus) -> Result<ReplicaReport, String> {
    if let Some(problem) = crate::spec::name_problem(&r.app) {
        return Err(format!(
            "replica status with an invalid app name: {}",
            sanitize(&problem, 200)
        ));
    }
    let state = state_from_pb(r.state).ok_or_else(|| {
        format!(
            "replica {}/{provider}/{}: unknown state {}",
            r.app, r.index, r.state
        )
    })?;
    if r.ports.len() > MAX_PORTS {
        return Err(format!(
            "replica {}/{provider}/{}: {} ports, over {MAX_PORTS}",
            r.app,
            r.index,
            r.ports.len()
        ));
    }
    Ok(ReplicaReport {
        app: r.app,
        index: r.index,
        generation: r.generation,
        workload_generation: r.workload_generation,
        state,
        address: sanitize(&r.address, MAX_ADDRESS),
        ports: r
            .ports
            .into_iter()
            .map(|(name, port)| (sanitize(&name, 63), port))
            .collect(),
        instance_id: bounded(&r.instance_id),
        restarts: r.restarts,
        crash_looping: r.crash_looping,
        message: bounded(&r.message),
        started_at_ms: r.started_at_ms,
        state_since_ms: r.state_since_ms,
    })
}

/// Valid replica statuses of a message, and why the others were left out
/// (the daemon counts and reports those at the agent's rate).
fn reports_from_pb(
    provider: &str,
    replicas: Vec<pb::ReplicaStatus>,
) -> (Vec<ReplicaReport>, Vec<String>) {
    let mut invalid = Vec::new();
    let valid = replicas
        .into_iter()
        .filter_map(|r| match report_from_pb(provider, r) {
            Ok(r) => Some(r),
            Err(e) => {
                invalid.push(e);
                None
            }
        })
        .collect();
    (valid, invalid)
}

/// The store identity an agent names; `None` when it names none (a release
/// before store identities).
fn store_of(store_id: String, epoch: u64) -> Option<crate::store::StoreIdentity> {
    (!store_id.is_empty()).then_some(crate::store::StoreIdentity { store_id, epoch })
}

/// An agent's hello.
pub fn hello_from_pb(h: pb::Hello) -> Hello {
    let capabilities = AgentCapabilities {
        max_stop: h
            .capabilities
            .as_ref()
            .filter(|c| c.max_stop_ms > 0)
            .map(|c| Duration::from_millis(u64::from(c.max_stop_ms))),
    };
    let provider = sanitize(&h.provider, 64);
    let (replicas, invalid) = reports_from_pb(&provider, h.replicas);
    Hello {
        replicas,
        invalid,
        provider,
        agent_id: sanitize(&h.agent_id, crate::access::MAX_AGENT_ID),
        join_token: h.join_token,
        version: sanitize(&h.version, 64),
        driver: sanitize(&h.driver, 32),
        applied_revision: h.applied_revision,
        applied_store: store_of(h.applied_store_id, h.applied_epoch),
        capabilities,
    }
}

/// A message on an established agent session.
pub fn from_agent_pb(provider: &str, msg: pb::AgentMessage) -> FromAgent {
    use pb::agent_message::Message;
    match msg.message {
        Some(Message::Heartbeat(hb)) => FromAgent::Heartbeat {
            seq: hb.seq,
            applied_revision: hb.applied_revision,
            applied_store: store_of(hb.applied_store_id, hb.applied_epoch),
        },
        Some(Message::Status(report)) => {
            let (replicas, invalid) = reports_from_pb(provider, report.replicas);
            FromAgent::Status {
                replicas,
                invalid,
                removed: report
                    .removed
                    .iter()
                    .filter_map(|k| {
                        let (app, index) = k.rsplit_once('/')?;
                        Some((app.to_string(), index.parse().ok()?))
                    })
                    .collect(),
                full: report.full,
                applied_revision: report.applied_revision,
                applied_store: store_of(report.applied_store_id, report.applied_epoch),
            }
        }
        Some(Message::Logs(answer)) => FromAgent::Logs(LogAnswer {
            request_id: answer.request_id,
            replica: sanitize(&answer.replica, 200),
            data: answer.data,
            error: bounded(&answer.error),
            end: answer.end,
        }),
        Some(Message::Hello(_)) | None => FromAgent::Unexpected,
    }
}

/// A message to an agent.
pub fn to_agent_pb(msg: &ToAgent) -> pb::DaemonMessage {
    use pb::daemon_message::Message;
    let message = match msg {
        ToAgent::Welcome(w) => Message::Welcome(pb::Welcome {
            daemon_id: w.daemon_id.clone(),
            heartbeat_interval_ms: u32::try_from(w.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            store_id: w.identity.store_id.clone(),
            epoch: w.identity.epoch,
        }),
        ToAgent::Assignment(a) => Message::Assignment(assignment_to_pb(a)),
        ToAgent::HeartbeatAck { seq, lease } => Message::HeartbeatAck(pb::HeartbeatAck {
            seq: *seq,
            lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
        }),
        ToAgent::LogsRequest(r) => Message::LogsRequest(pb::ReplicaLogsRequest {
            request_id: r.request_id,
            app: r.app.clone(),
            index: r.index,
            tail_lines: r.tail_lines,
            follow: r.follow,
        }),
        ToAgent::LogsCancel { request_id } => Message::LogsCancel(pb::ReplicaLogsCancel {
            request_id: *request_id,
        }),
    };
    pb::DaemonMessage {
        message: Some(message),
    }
}

/// The wire form of a provider's assignment.
pub fn assignment_to_pb(m: &AssignmentMessage) -> pb::Assignment {
    let a = &m.assignment;
    pb::Assignment {
        provider: a.provider.clone(),
        revision: a.revision,
        apps: a
            .apps
            .iter()
            .filter_map(|x| {
                let app = m.apps.get(&x.app)?;
                Some(pb::AppAssignment {
                    singleton: app.app.spec.failover.singleton,
                    app: x.app.clone(),
                    generation: x.generation,
                    workload_generation: x.workload_generation,
                    replicas: x.replicas,
                    workload: Some(spec::workload_to_pb(&app.app.spec.workload)),
                    health: app.app.spec.health.as_ref().map(spec::health_to_pb),
                })
            })
            .collect(),
        settings: m
            .provider
            .as_ref()
            .and_then(|p| spec::provider_settings_to_pb(&p.provider.spec)),
        epoch: m.identity.epoch,
        store_id: m.identity.store_id.clone(),
    }
}

/// A stored replica as the control API shows it.
pub fn replica_to_pb(r: &ReportedReplica) -> pb::ReplicaStatus {
    pb::ReplicaStatus {
        app: r.app.clone(),
        index: r.index,
        generation: r.generation,
        workload_generation: r.workload_generation,
        state: state_to_pb(r.state) as i32,
        address: r.address.clone(),
        ports: r.ports.clone().into_iter().collect(),
        instance_id: r.instance_id.clone(),
        restarts: r.restarts,
        crash_looping: r.crash_looping,
        message: r.message.clone(),
        started_at_ms: r.started_at_ms,
        state_since_ms: r.state_since_ms,
        provider: r.provider.clone(),
        ready: r.ready,
    }
}

/// A stored event as the API shows it.
pub fn event_to_pb(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time_ms: e.time_ms,
        reason: e.event.reason.as_str().to_string(),
        kind: e.event.kind().as_str().to_string(),
        object: e.event.object.clone(),
        message: e.event.message.clone(),
        app: e.event.app.clone(),
        provider: e.event.provider.clone(),
        severity: if e.event.warning() {
            "Warning"
        } else {
            "Normal"
        }
        .to_string(),
    }
}

fn meta(
    name: &str,
    generation: u64,
    created: i64,
    updated: i64,
    m: Option<pb::ObjectMeta>,
) -> pb::ObjectMeta {
    let mut m = m.unwrap_or_default();
    m.name = name.to_string();
    m.generation = generation;
    m.created_at_ms = created;
    m.updated_at_ms = updated;
    m
}

/// A stored app as the API shows it.
pub fn app_to_pb(a: &DeclaredApp) -> pb::App {
    let mut out = pb::App::from(&a.app);
    out.metadata = Some(meta(
        &a.app.metadata.name,
        a.generation,
        a.created_at_ms,
        a.updated_at_ms,
        out.metadata.take(),
    ));
    out
}

/// A stored provider as the API shows it.
pub fn provider_to_pb(p: &DeclaredProvider) -> pb::Provider {
    let mut out = pb::Provider::from(&p.provider);
    out.metadata = Some(meta(
        &p.provider.metadata.name,
        p.generation,
        p.created_at_ms,
        p.updated_at_ms,
        out.metadata.take(),
    ));
    out
}

/// Liveness as the wire spells it.
pub fn liveness_to_pb(l: Liveness) -> pb::ProviderState {
    match l {
        Liveness::Unknown => pb::ProviderState::Unknown,
        Liveness::Up => pb::ProviderState::Up,
        Liveness::Suspect => pb::ProviderState::Suspect,
        Liveness::Partitioned => pb::ProviderState::Partitioned,
        Liveness::Down => pb::ProviderState::Down,
        Liveness::Recovering => pb::ProviderState::Recovering,
    }
}

fn action_to_pb(a: Action) -> pb::ApplyAction {
    match a {
        Action::Created => pb::ApplyAction::Created,
        Action::Configured => pb::ApplyAction::Configured,
        Action::Unchanged => pb::ApplyAction::Unchanged,
        Action::Deleted => pb::ApplyAction::Deleted,
        Action::NotFound => pb::ApplyAction::NotFound,
    }
}

/// The result of an apply or delete for one object.
pub fn result_to_pb(r: &ObjectResult) -> pb::ObjectResult {
    pb::ObjectResult {
        kind: r.kind.as_str().to_string(),
        name: r.name.clone(),
        action: action_to_pb(r.action) as i32,
        generation: r.generation,
    }
}

/// A placement change of an apply.
pub fn change_to_pb(c: &PlacementChange) -> pb::PlacementChange {
    pb::PlacementChange {
        app: c.app.clone(),
        provider: c.provider.clone(),
        replicas_before: c.replicas_before,
        replicas_after: c.replicas_after,
        replace: c.replace,
    }
}

/// An app's summary.
pub fn summary_to_pb(s: AppSummary) -> pb::AppSummary {
    pb::AppSummary {
        name: s.name,
        desired_replicas: s.desired_replicas,
        ready_replicas: s.ready_replicas,
        providers: s.providers,
    }
}

/// A provider's status.
pub fn provider_status_to_pb(s: ProviderStatus) -> pb::ProviderStatus {
    pb::ProviderStatus {
        name: s.name,
        state: liveness_to_pb(s.state) as i32,
        state_reason: s.state_reason,
        state_since_ms: s.state_since_ms,
        held_out_until_ms: s.held_out_until_ms,
        cordoned: s.cordoned,
        draining: s.draining,
        agent_id: s.agent_id,
        agent_version: s.agent_version,
        last_heartbeat_ms: s.last_heartbeat_ms,
        applied_revision: s.applied_revision,
        assignment_revision: s.assignment_revision,
        assigned_replicas: s.assigned_replicas,
        ready_replicas: s.ready_replicas,
    }
}

/// The daemon's status.
pub fn daemon_status_to_pb(s: &DaemonStatus) -> pb::DaemonStatus {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let micros = |x: Duration| u64::try_from(x.as_micros()).unwrap_or(u64::MAX);
    let stats = &s.reconcile;
    pb::DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        apps: count(s.apps),
        providers: count(s.providers),
        connected_agents: count(s.connected_agents),
        replicas_reported: count(s.replicas_reported),
        reconcile_passes: stats.passes,
        last_reconcile_micros: micros(stats.last),
        mean_reconcile_micros: micros(stats.total).checked_div(stats.passes).unwrap_or(0),
        max_reconcile_micros: micros(stats.max),
        store_bytes: s.store_bytes,
        started_at_ms: s.started_at_ms,
        last_event_seq: s.last_event_seq,
        store_writable: s.store_error.is_none(),
        store_error: s.store_error.clone().unwrap_or_default(),
        store_id: s.identity.store_id.clone(),
        store_epoch: s.identity.epoch,
        tls: s.tls.is_some(),
        ca_cert_hash: s.tls.clone().unwrap_or_default(),
        refused_joins: s.security.refused_joins,
        refused_sessions: s.security.refused_sessions,
        refused_calls: s.security.refused_calls,
        failed_handshakes: s.security.failed_handshakes,
        dropped_reports: s.security.dropped_reports,
        dropped_events: s.security.dropped_events,
        flooding_agents: s.security.flooding_agents,
    }
}

/// An explanation.
pub fn explanation_to_pb(e: &Explanation) -> pb::ExplainResponse {
    pb::ExplainResponse {
        app: e.app.clone(),
        mode: match e.mode {
            spec::PlacementMode::Mirror => pb::PlacementMode::Mirror,
            spec::PlacementMode::ActivePassive => pb::PlacementMode::ActivePassive,
            spec::PlacementMode::Spread => pb::PlacementMode::Spread,
        } as i32,
        pinned_provider: e.pinned_provider.clone().unwrap_or_default(),
        placements: e
            .placements
            .iter()
            .map(|p| pb::PlacementReason {
                provider: p.provider.clone(),
                provider_state: liveness_to_pb(p.state) as i32,
                replicas: p.replicas,
                extra_replicas: p.extra,
                tier: p.tier,
                reason: p.reason.clone(),
            })
            .collect(),
        excluded: e
            .excluded
            .iter()
            .map(|x| pb::ExcludedProvider {
                provider: x.provider.clone(),
                provider_state: liveness_to_pb(x.state) as i32,
                reason: x.reason.clone(),
            })
            .collect(),
        decisions: e.decisions.iter().map(event_to_pb).collect(),
    }
}

/// The routing table.
pub fn routes_to_pb(t: &RoutingTable) -> pb::RoutingTable {
    pb::RoutingTable {
        revision: t.revision,
        routes: t
            .routes
            .iter()
            .map(|r| pb::Route {
                app: r.app.clone(),
                listen: r.listen.clone(),
                hosts: r.hosts.clone(),
                protocol: r.protocol.clone(),
                response_timeout_ms: u32::try_from(r.response_timeout.as_millis())
                    .unwrap_or(u32::MAX),
                hedging_disabled: !r.hedge,
                upstream_protocol: r.upstream_protocol.clone(),
                health_path: r.health_path.clone().unwrap_or_default(),
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|u| pb::Upstream {
                        address: u.address.clone(),
                        provider: u.provider.clone(),
                        replica: u.replica.clone(),
                        weight: u.weight,
                        tier: u.tier,
                        health_address: u.health_address.clone().unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A client's request for output.
pub fn logs_query_from_pb(r: pb::LogsRequest) -> LogsQuery {
    LogsQuery {
        app: r.app,
        provider: (!r.provider.is_empty()).then_some(r.provider),
        index: r.index,
        tail_lines: r.tail_lines,
        follow: r.follow,
    }
}

/// A piece of output for the client.
pub fn log_chunk_to_pb(c: LogChunk) -> pb::LogChunk {
    pb::LogChunk {
        replica: c.replica,
        provider: c.provider,
        data: c.data,
        error: c.error,
    }
}

/// A token role from the wire; `None` for an unspecified one.
pub fn role_from_pb(role: pb::TokenRole) -> Option<crate::security::Role> {
    use crate::security::Role;
    match role {
        pb::TokenRole::Unspecified => None,
        pb::TokenRole::Admin => Some(Role::Admin),
        pb::TokenRole::Viewer => Some(Role::Viewer),
        pb::TokenRole::Edge => Some(Role::Edge),
        pb::TokenRole::Join => Some(Role::Join),
    }
}

/// A token role on the wire.
pub fn role_to_pb(role: crate::security::Role) -> pb::TokenRole {
    use crate::security::Role;
    match role {
        Role::Admin => pb::TokenRole::Admin,
        Role::Viewer => pb::TokenRole::Viewer,
        Role::Edge => pb::TokenRole::Edge,
        Role::Join => pb::TokenRole::Join,
    }
}

/// What a token list shows of a token (never its secret or hash).
pub fn token_to_pb(t: &crate::security::ApiToken, last_used_ms: i64) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        role: role_to_pb(t.role) as i32,
        provider: t.provider.clone(),
        description: t.description.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        revoked: t.revoked_at_ms != 0,
        last_used_ms,
    }
}

/// An agent certificate's record.
pub fn certificate_to_pb(c: &crate::security::AgentCertificate) -> pb::AgentCertificate {
    pb::AgentCertificate {
        provider: c.provider.clone(),
        serial: c.serial.clone(),
        agent_id: c.agent_id.clone(),
        not_before_ms: c.not_before_ms,
        not_after_ms: c.not_after_ms,
        revoked: c.revoked_at_ms != 0,
    }
}
