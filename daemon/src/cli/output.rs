//! What the CLI prints: tables for people, and a stable JSON (and YAML) shape
//! for scripts. The JSON field names below are a compatibility promise; they
//! are documented in the README ("Output formats").

use std::collections::BTreeMap;

use comfy_table::{ContentArrangement, Table, presets::NOTHING};
use serde::Serialize;
use skymirror_proto::v1 as pb;

/// Output format chosen with `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON: one document (an array for lists; one object per line for `events`).
    Json,
    /// YAML.
    Yaml,
}

/// `s` with every control character escaped (`\u{1b}`): text that came
/// from agents or the daemon never drives the terminal it is printed on.
pub fn printable(s: &str) -> String {
    crate::security::sanitize(s, usize::MAX)
}

/// A plain, borderless table like kubectl's; cells are [`printable`].
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row.iter().map(|c| printable(c)).collect::<Vec<_>>());
    }
    // comfy-table pads every cell by one space on each side; trim the margins.
    t.to_string()
        .lines()
        .map(|l| l.trim().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// "3s", "5m", "2h", "4d" since `ms` (epoch ms); "-" if unset.
pub fn age(ms: i64) -> String {
    age_at(ms, now_ms())
}

/// [`age`] as of `now` (epoch ms).
fn age_at(ms: i64, now: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// This machine's wall clock, epoch ms, to compare with the daemon's times.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `apply` or `delete` did to an object, as printed and as the JSON
/// `action` field: created, configured, unchanged, deleted, not found.
pub fn action_word(a: pb::ApplyAction) -> &'static str {
    match a {
        pb::ApplyAction::Created => "created",
        pb::ApplyAction::Configured => "configured",
        pb::ApplyAction::Unchanged => "unchanged",
        pb::ApplyAction::Deleted => "deleted",
        pb::ApplyAction::NotFound => "not found",
        pb::ApplyAction::Unspecified => "unknown",
    }
}

/// RFC 3339 time of epoch ms, UTC, to the second.
pub fn time(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A replica, as `get replicas -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// `app/provider/index`.
    pub id: String,
    pub app: String,
    pub provider: String,
    pub index: u32,
    /// pending, starting, running, healthy, unhealthy, backoff, stopping, stopped, failed.
    pub state: String,
    pub ready: bool,
    /// `host:port` of the first port; empty when not running.
    pub address: String,
    pub ports: BTreeMap<String, u32>,
    /// Driver's id of the instance (a pid for the process driver).
    pub instance_id: String,
    pub restarts: u32,
    pub crash_looping: bool,
    pub generation: u64,
    pub workload_generation: u64,
    pub message: String,
    pub started_at_ms: i64,
    pub state_since_ms: i64,
}

/// Lowercase name of a wire replica state.
pub fn state_name(s: pb::ReplicaState) -> &'static str {
    match s {
        pb::ReplicaState::Unspecified => "unknown",
        pb::ReplicaState::Pending => "pending",
        pb::ReplicaState::Starting => "starting",
        pb::ReplicaState::Running => "running",
        pb::ReplicaState::Healthy => "healthy",
        pb::ReplicaState::Unhealthy => "unhealthy",
        pb::ReplicaState::Backoff => "backoff",
        pb::ReplicaState::Stopping => "stopping",
        pb::ReplicaState::Stopped => "stopped",
        pb::ReplicaState::Failed => "failed",
    }
}

/// Lowercase name of a wire provider state.
pub fn provider_state_name(s: pb::ProviderState) -> &'static str {
    match s {
        pb::ProviderState::Unspecified | pb::ProviderState::Unknown => "unknown",
        pb::ProviderState::Up => "up",
        pb::ProviderState::Suspect => "suspect",
        pb::ProviderState::Down => "down",
        pb::ProviderState::Partitioned => "partitioned",
        pb::ProviderState::Recovering => "recovering",
    }
}

impl From<&pb::ReplicaStatus> for ReplicaView {
    fn from(r: &pb::ReplicaStatus) -> Self {
        ReplicaView {
            id: format!("{}/{}/{}", r.app, r.provider, r.index),
            app: r.app.clone(),
            provider: r.provider.clone(),
            index: r.index,
            state: state_name(r.state()).to_string(),
            ready: r.ready,
            address: r.address.clone(),
            ports: r.ports.clone().into_iter().collect(),
            instance_id: r.instance_id.clone(),
            restarts: r.restarts,
            crash_looping: r.crash_looping,
            generation: r.generation,
            workload_generation: r.workload_generation,
            message: r.message.clone(),
            started_at_ms: r.started_at_ms,
            state_since_ms: r.state_since_ms,
        }
    }
}

/// Replicas as a table.
pub fn replica_table(replicas: &[pb::ReplicaStatus]) -> String {
    table(
        &[
            "REPLICA", "STATE", "READY", "ADDRESS", "INSTANCE", "RESTARTS", "GEN", "AGE", "MESSAGE",
        ],
        replicas
            .iter()
            .map(|r| {
                vec![
                    format!("{}/{}/{}", r.app, r.provider, r.index),
                    format!(
                        "{}{}",
                        state_name(r.state()),
                        if r.crash_looping { " (crash-loop)" } else { "" }
                    ),
                    if r.ready { "yes" } else { "no" }.into(),
                    if r.address.is_empty() {
                        "-".into()
                    } else {
                        r.address.clone()
                    },
                    if r.instance_id.is_empty() {
                        "-".into()
                    } else {
                        r.instance_id.clone()
                    },
                    r.restarts.to_string(),
                    r.workload_generation.to_string(),
                    age(r.started_at_ms),
                    r.message.chars().take(60).collect(),
                ]
            })
            .collect(),
    )
}

/// A provider, as `get providers -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderView {
    pub name: String,
    pub driver: String,
    pub priority: i32,
    /// 0 means unlimited.
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    /// up, suspect, partitioned, down, recovering, unknown.
    pub state: String,
    /// Why the provider is in its state.
    pub state_reason: String,
    pub state_since_ms: i64,
    pub cordoned: bool,
    pub draining: bool,
    /// Held out after flapping until then (0: not held out).
    pub held_out_until_ms: i64,
    pub agent_id: String,
    pub agent_version: String,
    pub last_heartbeat_ms: i64,
    pub assigned_replicas: u32,
    pub ready_replicas: u32,
    pub assignment_revision: u64,
    pub applied_revision: u64,
    pub generation: u64,
}

impl ProviderView {
    /// Joins a provider and its status.
    pub fn new(p: &pb::Provider, s: &pb::ProviderStatus) -> Self {
        let meta = p.metadata.clone().unwrap_or_default();
        let spec = p.spec.clone().unwrap_or_default();
        ProviderView {
            name: meta.name,
            driver: spec.driver,
            priority: spec.priority,
            capacity: spec.capacity,
            labels: meta.labels.into_iter().collect(),
            state: provider_state_name(s.state()).to_string(),
            state_reason: s.state_reason.clone(),
            state_since_ms: s.state_since_ms,
            cordoned: s.cordoned,
            draining: s.draining,
            held_out_until_ms: s.held_out_until_ms,
            agent_id: s.agent_id.clone(),
            agent_version: s.agent_version.clone(),
            last_heartbeat_ms: s.last_heartbeat_ms,
            assigned_replicas: s.assigned_replicas,
            ready_replicas: s.ready_replicas,
            assignment_revision: s.assignment_revision,
            applied_revision: s.applied_revision,
            generation: meta.generation,
        }
    }
}

/// Providers as a table.
pub fn provider_table(views: &[ProviderView]) -> String {
    table(
        &[
            "PROVIDER",
            "DRIVER",
            "STATE",
            "PRIORITY",
            "READY",
            "AGENT",
            "LAST SEEN",
        ],
        views
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.driver.clone(),
                    match (p.draining, p.cordoned) {
                        (true, _) => format!("{},draining", p.state),
                        (_, true) => format!("{},cordoned", p.state),
                        _ => p.state.clone(),
                    },
                    p.priority.to_string(),
                    format!("{}/{}", p.ready_replicas, p.assigned_replicas),
                    if p.agent_id.is_empty() {
                        "-".into()
                    } else {
                        p.agent_id.chars().take(8).collect()
                    },
                    age(p.last_heartbeat_ms),
                ]
            })
            .collect(),
    )
}

/// An app, as `get apps -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppView {
    pub name: String,
    pub generation: u64,
    /// mirror, active-passive, spread.
    pub mode: String,
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    pub providers: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The app as applied, in the YAML document's shape.
    pub spec: serde_json::Value,
}

/// An event, as `events -o json` prints it (one object per line).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    pub seq: u64,
    pub time_ms: i64,
    /// RFC 3339, UTC.
    pub time: String,
    pub severity: String,
    pub reason: String,
    pub kind: String,
    pub object: String,
    pub app: String,
    pub provider: String,
    pub message: String,
}

impl From<&pb::Event> for EventView {
    fn from(e: &pb::Event) -> Self {
        EventView {
            seq: e.seq,
            time_ms: e.time_ms,
            time: time(e.time_ms),
            severity: e.severity.clone(),
            reason: e.reason.clone(),
            kind: e.kind.clone(),
            object: e.object.clone(),
            app: e.app.clone(),
            provider: e.provider.clone(),
            message: e.message.clone(),
        }
    }
}

/// One event line for people, [`printable`].
pub fn event_line(e: &pb::Event) -> String {
    printable(&format!(
        "{}  {:<7}  {:<22}  {}",
        time(e.time_ms),
        e.severity,
        e.reason,
        e.message
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_printed_cannot_drive_the_terminal() {
        let rows = vec![vec!["agent\u{1b}]0;owned\u{7}".to_string(), "ok".into()]];
        let t = table(&["AGENT", "STATE"], rows);
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");
        assert!(t.contains("agent\\u{1b}]0;owned\\u{7}"), "{t}");
        let e = pb::Event {
            message: "replica failed:\r\u{1b}[2K forged line".into(),
            ..pb::Event::default()
        };
        let line = event_line(&e);
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
    }

    #[test]
    fn ages_round_down_to_the_largest_unit() {
        let now = 1_000_000_000;
        assert_eq!(age_at(0, now), "-");
        assert_eq!(age_at(now - 59_999, now), "59s");
        assert_eq!(age_at(now - 119_999, now), "119s");
        assert_eq!(age_at(now - 120_000, now), "2m");
        assert_eq!(age_at(now - 7_200_000, now), "2h");
        assert_eq!(age_at(now - 172_800_000, now), "2d");
        // A time ahead of this machine's clock (skew) is "0s", not negative.
        assert_eq!(age_at(now + 5_000, now), "0s");
    }

    #[test]
    fn every_apply_action_has_its_word() {
        let words: Vec<&str> = [
            pb::ApplyAction::Created,
            pb::ApplyAction::Configured,
            pb::ApplyAction::Unchanged,
            pb::ApplyAction::Deleted,
            pb::ApplyAction::NotFound,
            pb::ApplyAction::Unspecified,
        ]
        .into_iter()
        .map(action_word)
        .collect();
        assert_eq!(
            words,
            [
                "created",
                "configured",
                "unchanged",
                "deleted",
                "not found",
                "unknown"
            ]
        );
    }

    #[test]
    fn the_clock_is_the_wall_clock() {
        // 2020-01-01T00:00:00Z: a clock in milliseconds, not seconds or zero.
        assert!(now_ms() > 1_577_836_800_000);
    }
}
