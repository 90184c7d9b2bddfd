//! The reconcile pass as a pure function: [`plan`] takes the stored desired
//! state, the registry's [`Snapshot`] and the time, and returns a
//! [`PassPlan`]: the schedule, the assignments to store (with their events),
//! and the routing table. The effects (commit, send, publish) are
//! [`crate::reconciler`]'s.
//!
//! Boundary: no store, no sockets, no protobuf, no clock of its own — the
//! same input always gives the same plan, which the table-driven tests below
//! rely on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::liveness::Liveness;
use crate::model::{
    AssignedApp, Assignment, Controls, DeclaredApp, DeclaredProvider, EventReason, NewEvent, Route,
    Upstream,
};
use crate::registry::Snapshot;
use crate::scheduler::{self, Condition, Context, Schedule};

/// The timing a pass needs to judge leases.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// When this daemon started, on tokio's clock.
    pub started: Instant,
    /// Agents' grace to reconnect after a daemon start.
    pub reconnect_grace: Duration,
    /// Lease an agent holds on its singletons.
    pub lease: Duration,
    /// Least extra wait after a lease before a singleton starts elsewhere; a
    /// provider whose driver's stops take longer waits that long instead.
    pub lease_margin: Duration,
}

/// Everything a pass decides from.
#[derive(Debug, Clone, Copy)]
pub struct PassInput<'a> {
    /// Declared apps.
    pub apps: &'a [DeclaredApp],
    /// Declared providers.
    pub providers: &'a [DeclaredProvider],
    /// Assignments as stored.
    pub assignments: &'a [Assignment],
    /// Operator controls.
    pub controls: &'a Controls,
    /// The registry at one instant.
    pub snapshot: &'a Snapshot,
    /// Now, on tokio's clock.
    pub now: Instant,
    /// Lease timing.
    pub timing: LeaseTiming,
    /// Capacity shortfalls already reported: app → (wanted, placed).
    pub reported_shortfalls: &'a BTreeMap<String, (u32, u32)>,
}

/// What a pass decided.
#[derive(Debug, Clone, Default)]
pub struct PassPlan {
    /// The placement and its reasons.
    pub schedule: Schedule,
    /// Every provider's assignment after the pass (stored or new).
    pub assignments: BTreeMap<String, Assignment>,
    /// The assignments that changed, to store under their new revisions.
    pub changed: Vec<Assignment>,
    /// Events to record with them.
    pub events: Vec<NewEvent>,
    /// Capacity shortfalls now, to compare with on the next pass.
    pub shortfalls: BTreeMap<String, (u32, u32)>,
    /// The routing table's routes.
    pub routes: Vec<Route>,
}

/// Plans one pass; see the module docs.
pub fn plan(input: &PassInput<'_>) -> PassPlan {
    let ctx = placement_context(input);
    let schedule = scheduler::schedule(input.apps, input.providers, &ctx);
    let apps_by_name: BTreeMap<&str, &DeclaredApp> = input
        .apps
        .iter()
        .map(|a| (a.app.metadata.name.as_str(), a))
        .collect();
    let mut assignments: BTreeMap<String, Assignment> = input
        .assignments
        .iter()
        .map(|a| (a.provider.clone(), a.clone()))
        .collect();

    // Every declared provider, plus connected agents of deleted providers
    // (they get an empty assignment, so they stop what they run).
    let mut names: BTreeSet<String> = input
        .providers
        .iter()
        .map(|p| p.provider.metadata.name.clone())
        .collect();
    names.extend(
        input
            .snapshot
            .providers
            .iter()
            .filter(|(_, v)| v.connected)
            .map(|(n, _)| n.clone()),
    );

    let mut changed = Vec::new();
    let mut events = Vec::new();
    for provider in &names {
        let wanted: Vec<AssignedApp> = schedule
            .placements
            .get(provider)
            .into_iter()
            .flatten()
            .filter_map(|(app, replicas)| {
                apps_by_name.get(app.as_str()).map(|a| AssignedApp {
                    app: app.clone(),
                    generation: a.generation,
                    workload_generation: a.workload_generation,
                    replicas: *replicas,
                    extra: schedule
                        .decisions
                        .get(app)
                        .and_then(|d| d.iter().find(|d| &d.provider == provider))
                        .map_or(0, |d| d.extra),
                })
            })
            .collect();
        let old = assignments.get(provider);
        if old.is_some_and(|o| o.apps == wanted) {
            continue;
        }
        let old_apps = old.map_or(&[][..], |o| o.apps.as_slice());
        for (app, change) in diff_assignment(old_apps, &wanted) {
            let why = schedule
                .decisions
                .get(&app)
                .and_then(|d| d.iter().find(|d| &d.provider == provider))
                .map(|d| format!(" ({})", d.reason))
                .unwrap_or_default();
            events.push(
                NewEvent::app(
                    EventReason::Scheduled,
                    &app,
                    format!("{app} on {provider}: {change}{why}"),
                )
                .on_provider(provider),
            );
        }
        let next = Assignment {
            provider: provider.clone(),
            revision: old.map_or(1, |o| o.revision + 1),
            apps: wanted,
        };
        changed.push(next.clone());
        assignments.insert(provider.clone(), next);
    }

    let mut shortfalls = BTreeMap::new();
    for s in &schedule.shortfalls {
        shortfalls.insert(s.app.clone(), (s.wanted, s.placed));
        if input.reported_shortfalls.get(&s.app) != Some(&(s.wanted, s.placed)) {
            events.push(NewEvent::app(
                EventReason::InsufficientCapacity,
                &s.app,
                format!(
                    "{}: placed {} of {} replicas: {}",
                    s.app, s.placed, s.wanted, s.reason
                ),
            ));
        }
    }

    let routes = routes(input.apps, &schedule, input.snapshot);
    PassPlan {
        schedule,
        assignments,
        changed,
        events,
        shortfalls,
        routes,
    }
}

/// Everything besides specs that placement depends on, as of `input.now`.
pub fn placement_context(input: &PassInput<'_>) -> Context {
    let now = input.now;
    let controls = input.controls;
    let snapshot = input.snapshot;
    let mut ctx = Context {
        pins: controls.pins.clone(),
        ..Context::default()
    };
    let mut names: BTreeSet<&String> = snapshot
        .providers
        .iter()
        .filter(|(_, v)| v.liveness.is_some())
        .map(|(n, _)| n)
        .collect();
    names.extend(controls.cordoned.iter());
    names.extend(controls.draining.iter());
    for name in names {
        let view = snapshot.providers.get(name);
        let l = view.and_then(|v| v.liveness.as_ref());
        ctx.conditions.insert(
            name.clone(),
            Condition {
                liveness: l.map_or(Liveness::Up, |l| l.state),
                recovering_for: l.and_then(|l| l.recovering_for(now)),
                held_out: l.is_some_and(|l| l.held_out(now)),
                cordoned: controls.cordoned.contains(name) || controls.draining.contains(name),
                draining: controls.draining.contains(name),
                lease_expired: lease_expired(input, name),
            },
        );
    }
    let generations: BTreeMap<&str, u64> = input
        .apps
        .iter()
        .map(|a| (a.app.metadata.name.as_str(), a.workload_generation))
        .collect();
    // Readiness counts toward fail-back only once the agent has acknowledged
    // the provider's current assignment: before that, its reports may show
    // replicas that the assignment is about to stop.
    for a in input.assignments {
        let Some(view) = snapshot.providers.get(&a.provider) else {
            continue;
        };
        if !view.connected || view.applied_revision() < a.revision {
            continue;
        }
        for r in view.replicas.values() {
            if r.ready && generations.get(r.app.as_str()) == Some(&r.workload_generation) {
                *ctx.ready
                    .entry((r.app.clone(), a.provider.clone()))
                    .or_default() += 1;
            }
        }
    }
    for a in input.assignments {
        for x in &a.apps {
            ctx.current
                .entry(a.provider.clone())
                .or_default()
                .insert(x.app.clone(), x.replicas);
            if x.extra > 0 {
                ctx.current_extra
                    .entry(a.provider.clone())
                    .or_default()
                    .insert(x.app.clone(), x.extra);
            }
        }
    }
    ctx
}

/// Whether a provider's lease on singletons has certainly expired: the agent
/// stops them when its own (earlier-ending) view of the lease runs out, and
/// the stop itself takes up to the driver's longest stop, so after
/// `lease + margin` of silence the old copy is gone.
fn lease_expired(input: &PassInput<'_>, provider: &str) -> bool {
    let t = input.timing;
    let seen = input
        .snapshot
        .providers
        .get(provider)
        .and_then(|v| v.seen.as_ref());
    let base = match seen {
        Some(s) => s.last_seen,
        // Not heard from since this daemon started: the agent may have
        // renewed with the previous daemon up to the moment it stopped.
        None => t.started + t.reconnect_grace,
    };
    let margin = seen
        .and_then(|s| s.capabilities.max_stop)
        .map_or(t.lease_margin, |stop| t.lease_margin.max(stop));
    input.now >= base + t.lease + margin
}

/// The front door's routes: ready replicas of providers that are not down,
/// within their provider's share, by routing tier.
pub fn routes(apps: &[DeclaredApp], schedule: &Schedule, snapshot: &Snapshot) -> Vec<Route> {
    let mut routes = Vec::new();
    for app in apps {
        let Some(routing) = &app.app.spec.routing else {
            continue;
        };
        let name = &app.app.metadata.name;
        let decisions = schedule.decisions.get(name);
        let mut upstreams = Vec::new();
        for (provider, view) in &snapshot.providers {
            if view.is_down() {
                continue;
            }
            let Some(d) = decisions.and_then(|d| d.iter().find(|d| &d.provider == provider)) else {
                continue;
            };
            for r in view
                .replicas
                .values()
                .filter(|r| &r.app == name && r.ready && r.index < d.replicas)
            {
                let Some(port) = r.ports.get(&routing.port) else {
                    continue;
                };
                let host = r.address.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                upstreams.push(Upstream {
                    address: format!("{host}:{port}"),
                    provider: provider.clone(),
                    replica: r.id(),
                    weight: 1,
                    tier: d.tier,
                });
            }
        }
        routes.push(Route {
            app: name.clone(),
            listen: routing.listen.clone(),
            hosts: routing.hosts.clone(),
            protocol: routing.protocol.as_str().to_string(),
            upstreams,
        });
    }
    routes
}

/// `(app, "a → b replicas")` for every app whose share changed.
fn diff_assignment(old: &[AssignedApp], new: &[AssignedApp]) -> Vec<(String, String)> {
    let o: BTreeMap<&str, &AssignedApp> = old.iter().map(|a| (a.app.as_str(), a)).collect();
    let n: BTreeMap<&str, &AssignedApp> = new.iter().map(|a| (a.app.as_str(), a)).collect();
    let mut out = Vec::new();
    for app in o.keys().chain(n.keys()).collect::<BTreeSet<_>>() {
        let before = o.get(app).map_or(0, |a| a.replicas);
        let after = n.get(app).map_or(0, |a| a.replicas);
        let replaced = matches!((o.get(app), n.get(app)), (Some(x), Some(y)) if x.workload_generation != y.workload_generation);
        if before != after {
            out.push((app.to_string(), format!("{before} → {after} replicas")));
        } else if replaced {
            out.push((
                app.to_string(),
                format!(
                    "{after} replicas replaced with generation {}",
                    n.get(app).map_or(0, |a| a.workload_generation)
                ),
            ));
        }
    }
    out
}
