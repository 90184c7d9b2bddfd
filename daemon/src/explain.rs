//! `explain`: why an app runs where it does, read from the decisions in
//! force (the last pass's schedule) rather than recomputed, so it explains
//! the placement that is running; plus the recent decision events
//! ([`EventReason::is_decision`]).

use std::collections::BTreeSet;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::liveness::Liveness;
use crate::model::Event;
use crate::registry::Snapshot;
use crate::spec::PlacementMode;

/// Most decision events an explanation lists.
const MAX_DECISIONS: usize = 20;

/// Why an app runs where it does.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// App name.
    pub app: String,
    /// Its placement mode.
    pub mode: PlacementMode,
    /// The provider a manual failover pins it to, if any.
    pub pinned_provider: Option<String>,
    /// Providers that run replicas, with why.
    pub placements: Vec<Placed>,
    /// Providers that run none, with why.
    pub excluded: Vec<Excluded>,
    /// Recent decisions about the app or its providers, oldest first.
    pub decisions: Vec<Event>,
}

/// A provider that runs replicas of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Provider name.
    pub provider: String,
    /// Its liveness.
    pub state: Liveness,
    /// Replicas it runs.
    pub replicas: u32,
    /// Of those, re-placed from lost providers.
    pub extra: u32,
    /// Routing tier (higher serves first).
    pub tier: i32,
    /// Why.
    pub reason: String,
}

/// A provider that runs none of the app's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    /// Provider name.
    pub provider: String,
    /// Its liveness.
    pub state: Liveness,
    /// Why.
    pub reason: String,
}

fn state_of(snapshot: &Snapshot, provider: &str) -> Liveness {
    snapshot
        .providers
        .get(provider)
        .and_then(|v| v.liveness.as_ref())
        .map_or(Liveness::Unknown, |l| l.state)
}

impl Daemon {
    /// Why an app runs where it does; see `ControlService.Explain`.
    pub fn explain(&self, app: &str) -> Result<Explanation, DaemonError> {
        let Some(declared) = self.store.app(app)? else {
            return Err(DaemonError::NotFound(format!("app {app:?} not found")));
        };
        let providers = self.store.providers()?;
        let controls = self.store.controls()?;
        let schedule = self.schedule_in_force();
        let snapshot = self.registry.snapshot();
        let mut out = Explanation {
            app: app.to_string(),
            mode: declared.app.spec.placement.mode,
            pinned_provider: controls.pins.get(app).cloned(),
            placements: Vec::new(),
            excluded: Vec::new(),
            decisions: Vec::new(),
        };
        let decisions = schedule.decisions.get(app).cloned().unwrap_or_default();
        let selected: BTreeSet<String> = decisions.iter().map(|d| d.provider.clone()).collect();
        for d in &decisions {
            let state = state_of(&snapshot, &d.provider);
            if d.replicas > 0 {
                out.placements.push(Placed {
                    provider: d.provider.clone(),
                    state,
                    replicas: d.replicas,
                    extra: d.extra,
                    tier: d.tier,
                    reason: d.reason.clone(),
                });
            } else {
                out.excluded.push(Excluded {
                    provider: d.provider.clone(),
                    state,
                    reason: d.reason.clone(),
                });
            }
        }
        for p in &providers {
            let name = &p.provider.metadata.name;
            if !selected.contains(name) {
                out.excluded.push(Excluded {
                    provider: name.clone(),
                    state: state_of(&snapshot, name),
                    reason: "not selected by the app's placement".into(),
                });
            }
        }
        let recent: Vec<Event> = self
            .store
            .last_events(crate::store::SledStore::EVENT_RETENTION as usize)?
            .into_iter()
            .filter(|e| e.event.reason.is_decision())
            .filter(|e| {
                e.event.app == app
                    || (e.event.app.is_empty() && selected.contains(&e.event.provider))
            })
            .collect();
        out.decisions = recent[recent.len().saturating_sub(MAX_DECISIONS)..].to_vec();
        Ok(out)
    }
}
