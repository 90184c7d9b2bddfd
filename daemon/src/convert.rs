//! Conversions between stored records and wire types, at the API edge.

use skymirror_proto::v1 as pb;

use crate::store::{ReplicaState, StoredApp, StoredEvent, StoredProvider, StoredReplica};

/// Largest string an agent may report in one field; longer values are cut.
const MAX_FIELD: usize = 4096;

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

fn bounded(mut s: String) -> String {
    if s.len() > MAX_FIELD {
        let mut cut = MAX_FIELD;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Validates a replica status from an agent. `has_health_check` says whether
/// the app has a health check: without one, running counts as ready.
pub fn replica_from_pb(
    provider: &str,
    r: pb::ReplicaStatus,
    has_health_check: bool,
) -> Result<StoredReplica, String> {
    if r.app.is_empty() || r.app.len() > 63 {
        return Err(format!(
            "replica status with an invalid app name {:?}",
            r.app
        ));
    }
    let state = state_from_pb(r.state).ok_or_else(|| {
        format!(
            "replica {}/{provider}/{}: unknown state {}",
            r.app, r.index, r.state
        )
    })?;
    let ready = match state {
        ReplicaState::Healthy => true,
        ReplicaState::Running => !has_health_check,
        _ => false,
    };
    Ok(StoredReplica {
        provider: provider.to_string(),
        app: r.app,
        index: r.index,
        generation: r.generation,
        workload_generation: r.workload_generation,
        state,
        ready,
        address: bounded(r.address),
        ports: r.ports.into_iter().take(64).collect(),
        instance_id: bounded(r.instance_id),
        restarts: r.restarts,
        crash_looping: r.crash_looping,
        message: bounded(r.message),
        started_at_ms: r.started_at_ms,
        state_since_ms: r.state_since_ms,
    })
}

/// A stored replica as the control API shows it.
pub fn replica_to_pb(r: &StoredReplica) -> pb::ReplicaStatus {
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
pub fn event_to_pb(e: &StoredEvent) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time_ms: e.time_ms,
        reason: e.event.reason.clone(),
        kind: e.event.kind.clone(),
        object: e.event.object.clone(),
        message: e.event.message.clone(),
        app: e.event.app.clone(),
        provider: e.event.provider.clone(),
        severity: if e.event.warning { "Warning" } else { "Normal" }.to_string(),
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
pub fn app_to_pb(a: &StoredApp) -> pb::App {
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
pub fn provider_to_pb(p: &StoredProvider) -> pb::Provider {
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
