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
        // The app's HTTP check, so the front door probes what users get.
        let http_check = app
            .app
            .spec
            .health
            .as_ref()
            .and_then(|h| match &h.probe {
                crate::spec::Probe::Http { path, port } => Some((path, port)),
                _ => None,
            })
            .filter(|_| routing.protocol == crate::spec::RoutingProtocol::Http);
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
                let health_address = http_check
                    .filter(|(_, check_port)| **check_port != routing.port)
                    .and_then(|(_, check_port)| r.ports.get(check_port.as_str()))
                    .map(|p| format!("{host}:{p}"));
                upstreams.push(Upstream {
                    address: format!("{host}:{port}"),
                    provider: provider.clone(),
                    replica: r.id(),
                    weight: 1,
                    tier: d.tier,
                    health_address,
                });
            }
        }
        routes.push(Route {
            app: name.clone(),
            listen: routing.listen.clone(),
            hosts: routing.hosts.clone(),
            protocol: routing.protocol.as_str().to_string(),
            upstreams,
            response_timeout: routing.response_timeout,
            hedge: routing.hedge,
            upstream_protocol: routing.upstream_protocol.as_str().to_string(),
            health_path: http_check.map(|(path, _)| path.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::ProviderLiveness;
    use crate::model::testing::declared;
    use crate::model::{ReplicaState, ReportedReplica};
    use crate::registry::{AgentCapabilities, AgentSeen, ProviderView};

    const PROVIDERS: &str = "
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: a}
spec: {driver: process, priority: 30}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: b}
spec: {driver: process, priority: 20}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: c}
spec: {driver: process, priority: 10}
";

    /// An app `web` with 2 replicas (6 in all for spread) in `mode`.
    fn app_yaml(mode: &str) -> String {
        let replicas = if mode == "spread" { 6 } else { 2 };
        format!(
            "
apiVersion: skymirror.dev/v1
kind: App
metadata: {{name: web}}
spec:
  command: server
  ports: [{{name: http}}]
  replicas: {replicas}
  placement: {{mode: {mode}}}
  failover: {{spill: true}}
  routing: {{listen: '127.0.0.1:8080', port: http}}
"
        )
    }

    fn timing(started: Instant) -> LeaseTiming {
        LeaseTiming {
            started,
            reconnect_grace: Duration::from_secs(10),
            lease: Duration::from_secs(2),
            lease_margin: Duration::from_secs(1),
        }
    }

    /// Plans a pass over `apps` and `providers` with `rest`'s other parts.
    fn plan_pass(apps: &[DeclaredApp], providers: &[DeclaredProvider], rest: Rest<'_>) -> PassPlan {
        let now = rest.now.unwrap_or_else(Instant::now);
        plan(&PassInput {
            apps,
            providers,
            assignments: rest.assignments,
            controls: rest.controls.unwrap_or(&Controls::default()),
            snapshot: rest.snapshot.unwrap_or(&Snapshot::default()),
            now,
            timing: timing(rest.started.unwrap_or(now)),
            reported_shortfalls: rest.reported.unwrap_or(&BTreeMap::new()),
        })
    }

    /// Everything of a [`PassInput`] besides the specs; defaults: nothing
    /// assigned, no controls, no agents, now, started now, nothing reported.
    #[derive(Default)]
    struct Rest<'a> {
        assignments: &'a [Assignment],
        controls: Option<&'a Controls>,
        snapshot: Option<&'a Snapshot>,
        now: Option<Instant>,
        started: Option<Instant>,
        reported: Option<&'a BTreeMap<String, (u32, u32)>>,
    }

    /// A provider in `state`, connected (unless down) and heard from at `seen`.
    fn view(state: Liveness, seen: Instant, max_stop: Option<Duration>) -> ProviderView {
        let mut liveness = ProviderLiveness::new(seen);
        liveness.state = state;
        ProviderView {
            connected: state != Liveness::Down,
            seen: Some(AgentSeen {
                agent_id: "agent".into(),
                version: "0".into(),
                last_seen: seen,
                last_seen_ms: 0,
                applied_revision: 1,
                capabilities: AgentCapabilities { max_stop },
            }),
            liveness: Some(liveness),
            ..ProviderView::default()
        }
    }

    fn ready_replica(provider: &str, index: u32, port: u32) -> ReportedReplica {
        ReportedReplica {
            provider: provider.into(),
            app: "web".into(),
            index,
            generation: 1,
            workload_generation: 1,
            state: ReplicaState::Healthy,
            ready: true,
            address: format!("127.0.0.1:{port}"),
            ports: [("http".to_string(), port)].into(),
            instance_id: port.to_string(),
            restarts: 0,
            crash_looping: false,
            message: String::new(),
            started_at_ms: 0,
            state_since_ms: 0,
        }
    }

    /// Each provider's replicas of `web` in a plan.
    fn shares(plan: &PassPlan) -> Vec<(String, u32)> {
        plan.assignments
            .iter()
            .map(|(p, a)| {
                let n = a
                    .apps
                    .iter()
                    .find(|x| x.app == "web")
                    .map_or(0, |x| x.replicas);
                (p.clone(), n)
            })
            .collect()
    }

    fn shares_of(expected: [u32; 3]) -> Vec<(String, u32)> {
        ["a", "b", "c"]
            .iter()
            .zip(expected)
            .map(|(p, n)| (p.to_string(), n))
            .collect()
    }

    #[test]
    fn provider_states_placement_modes_and_controls() {
        // (mode, liveness of a/b/c, controls, expected replicas on a/b/c)
        let up = Liveness::Up;
        let down = Liveness::Down;
        let partitioned = Liveness::Partitioned;
        let suspect = Liveness::Suspect;
        let none = Controls::default();
        let cordon_b = Controls {
            cordoned: ["b".to_string()].into(),
            ..Controls::default()
        };
        let drain_b = Controls {
            draining: ["b".to_string()].into(),
            ..Controls::default()
        };
        let pin_c = Controls {
            pins: [("web".to_string(), "c".to_string())].into(),
            ..Controls::default()
        };
        let cases: Vec<(&str, [Liveness; 3], &Controls, [u32; 3])> = vec![
            ("mirror", [up, up, up], &none, [2, 2, 2]),
            ("mirror", [up, down, up], &none, [3, 0, 3]),
            ("mirror", [up, partitioned, up], &none, [2, 2, 2]),
            ("mirror", [up, suspect, up], &none, [2, 2, 2]),
            ("mirror", [down, down, up], &none, [0, 0, 6]),
            ("mirror", [up, up, up], &drain_b, [3, 0, 3]),
            ("mirror", [up, up, up], &pin_c, [2, 2, 2]),
            ("mirror", [up, up, up], &cordon_b, [2, 2, 2]),
            ("mirror", [down, up, up], &cordon_b, [0, 2, 4]),
            ("active-passive", [up, up, up], &none, [2, 0, 0]),
            ("active-passive", [down, up, up], &none, [0, 2, 0]),
            ("active-passive", [up, up, up], &pin_c, [2, 0, 2]),
            ("spread", [up, up, up], &none, [2, 2, 2]),
            ("spread", [up, down, up], &none, [3, 0, 3]),
            ("spread", [up, up, up], &drain_b, [3, 0, 3]),
        ];
        for (mode, states, controls, expected) in cases {
            let (apps, providers) = declared(&format!("{PROVIDERS}---{}", app_yaml(mode)));
            let now = Instant::now();
            let snapshot = Snapshot {
                providers: ["a", "b", "c"]
                    .iter()
                    .zip(states)
                    .map(|(p, s)| (p.to_string(), view(s, now, None)))
                    .collect(),
            };
            let plan = plan_pass(
                &apps,
                &providers,
                Rest {
                    controls: Some(controls),
                    snapshot: Some(&snapshot),
                    now: Some(now),
                    ..Rest::default()
                },
            );
            assert_eq!(
                shares(&plan),
                shares_of(expected),
                "{mode} with {states:?} and {controls:?}"
            );
            // A manual failover puts the pinned provider alone on the top tier.
            let tiers: Vec<(String, i32)> = plan.schedule.decisions["web"]
                .iter()
                .filter(|d| d.replicas > 0)
                .map(|d| (d.provider.clone(), d.tier))
                .collect();
            let top = tiers.iter().map(|(_, t)| *t).max().unwrap_or(0);
            let on_top: Vec<&str> = tiers
                .iter()
                .filter(|(_, t)| *t == top)
                .map(|(p, _)| p.as_str())
                .collect();
            if !controls.pins.is_empty() {
                assert_eq!(on_top, vec!["c"], "{mode} pinned: {tiers:?}");
            }
            // Every provider's first assignment is new, with revision 1, and
            // every share it got is explained by a Scheduled event.
            assert!(plan.changed.iter().all(|a| a.revision == 1));
            let scheduled = plan
                .events
                .iter()
                .filter(|e| e.reason == EventReason::Scheduled)
                .count();
            assert_eq!(
                scheduled,
                expected.iter().filter(|n| **n > 0).count(),
                "{mode} with {states:?}: {:?}",
                plan.events
            );
        }
    }

    #[test]
    fn an_unchanged_plan_stores_nothing_and_a_change_bumps_the_revision() {
        let (apps, providers) = declared(&format!("{PROVIDERS}---{}", app_yaml("mirror")));
        let now = Instant::now();
        let snapshot = Snapshot {
            providers: ["a", "b", "c"]
                .iter()
                .map(|p| (p.to_string(), view(Liveness::Up, now, None)))
                .collect(),
        };
        let run = |assignments: &[Assignment], snapshot: &Snapshot| {
            plan_pass(
                &apps,
                &providers,
                Rest {
                    assignments,
                    snapshot: Some(snapshot),
                    now: Some(now),
                    ..Rest::default()
                },
            )
        };
        let first = run(&[], &snapshot);
        let stored: Vec<Assignment> = first.assignments.values().cloned().collect();
        let again = run(&stored, &snapshot);
        assert!(again.changed.is_empty() && again.events.is_empty());

        let mut b_down = snapshot.clone();
        if let Some(b) = b_down.providers.get_mut("b") {
            *b = view(Liveness::Down, now, None);
        }
        let failover = run(&stored, &b_down);
        let revisions: Vec<(String, u64)> = failover
            .changed
            .iter()
            .map(|a| (a.provider.clone(), a.revision))
            .collect();
        assert_eq!(
            revisions,
            vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]
        );
        let extras: Vec<u32> = failover
            .changed
            .iter()
            .map(|a| a.apps.first().map_or(0, |x| x.extra))
            .collect();
        assert_eq!(extras, vec![1, 0, 1], "the survivors' extras are marked");
    }

    #[test]
    fn routes_hold_ready_replicas_of_providers_that_are_not_down_within_their_share() {
        let (apps, providers) = declared(&format!("{PROVIDERS}---{}", app_yaml("mirror")));
        let now = Instant::now();
        let mut snapshot = Snapshot::default();
        for (p, state, base) in [
            ("a", Liveness::Up, 9000),
            ("b", Liveness::Down, 9100),
            ("c", Liveness::Up, 9200),
        ] {
            let mut v = view(state, now, None);
            for index in 0..3 {
                let r = ready_replica(p, index, base + index);
                v.replicas.insert(("web".into(), index), r);
            }
            snapshot.providers.insert(p.into(), v);
        }
        let plan = plan_pass(
            &apps,
            &providers,
            Rest {
                snapshot: Some(&snapshot),
                now: Some(now),
                ..Rest::default()
            },
        );
        let [route] = plan.routes.as_slice() else {
            panic!("one route: {:?}", plan.routes);
        };
        let addresses: Vec<&str> = route.upstreams.iter().map(|u| u.address.as_str()).collect();
        // a and c run 3 each after b's loss; b's replicas are not routed.
        assert_eq!(
            addresses,
            vec![
                "127.0.0.1:9000",
                "127.0.0.1:9001",
                "127.0.0.1:9002",
                "127.0.0.1:9200",
                "127.0.0.1:9201",
                "127.0.0.1:9202"
            ]
        );
    }

    #[test]
    fn routes_carry_the_front_door_settings_and_the_apps_http_check() {
        let with_check = app_yaml("mirror").replace(
            "  ports: [{name: http}]\n",
            "  ports: [{name: http}, {name: admin}]\n  health: {http: {path: /ready, port: admin}}\n",
        ) + "  \n";
        let with_check = with_check.replace(
            "port: http}",
            "port: http, responseTimeout: 2s, hedge: false, upstreamProtocol: h2c}",
        );
        let (apps, providers) = declared(&format!("{PROVIDERS}---{with_check}"));
        let now = Instant::now();
        let mut snapshot = Snapshot::default();
        for (p, base) in [("a", 9000), ("b", 9100), ("c", 9200)] {
            let mut v = view(Liveness::Up, now, None);
            for index in 0..2 {
                let mut r = ready_replica(p, index, base + index);
                r.ports.insert("admin".into(), base + 50 + index);
                v.replicas.insert(("web".into(), index), r);
            }
            snapshot.providers.insert(p.into(), v);
        }
        let set = plan(&PassInput {
            apps: &apps,
            providers: &providers,
            assignments: &[],
            controls: &Controls::default(),
            snapshot: &snapshot,
            now,
            timing: timing(now),
            reported_shortfalls: &BTreeMap::new(),
        });
        let [route] = set.routes.as_slice() else {
            panic!("one route: {:?}", set.routes);
        };
        assert_eq!(route.health_path.as_deref(), Some("/ready"));
        assert_eq!(route.response_timeout, std::time::Duration::from_secs(2));
        assert!(!route.hedge);
        assert_eq!(route.upstream_protocol, "h2c");
        assert_eq!(route.upstreams[0].address, "127.0.0.1:9000");
        assert_eq!(
            route.upstreams[0].health_address.as_deref(),
            Some("127.0.0.1:9050")
        );

        // Without a health check: TCP probes, and the defaults.
        let (apps, providers) = declared(&format!("{PROVIDERS}---{}", app_yaml("mirror")));
        let defaults = plan(&PassInput {
            apps: &apps,
            providers: &providers,
            assignments: &[],
            controls: &Controls::default(),
            snapshot: &snapshot,
            now,
            timing: timing(now),
            reported_shortfalls: &BTreeMap::new(),
        });
        let route = &defaults.routes[0];
        assert_eq!(route.health_path, None);
        assert!(route.hedge);
        assert_eq!(route.upstream_protocol, "http1");
        assert!(route.upstreams.iter().all(|u| u.health_address.is_none()));
    }

    #[test]
    fn a_singleton_moves_only_after_the_lease_and_the_drivers_longest_stop() {
        let yaml = format!(
            "{PROVIDERS}---{}",
            app_yaml("active-passive").replace(
                "failover: {spill: true}",
                "failover: {spill: true, singleton: true}"
            )
        )
        .replace("replicas: 2", "replicas: 1");
        let (apps, providers) = declared(&yaml);
        let last_heard = Instant::now();
        let running = vec![Assignment {
            provider: "a".into(),
            revision: 1,
            apps: vec![AssignedApp {
                app: "web".into(),
                generation: 1,
                workload_generation: 1,
                replicas: 1,
                extra: 0,
            }],
        }];
        // a's driver says a stop can take 30 s (a cloud instance).
        let slow_stop = Some(Duration::from_secs(30));
        let at = |after: Duration, max_stop: Option<Duration>| {
            let now = last_heard + after;
            let mut snapshot = Snapshot::default();
            snapshot
                .providers
                .insert("a".into(), view(Liveness::Down, last_heard, max_stop));
            for p in ["b", "c"] {
                snapshot
                    .providers
                    .insert(p.into(), view(Liveness::Up, now, None));
            }
            let plan = plan_pass(
                &apps,
                &providers,
                Rest {
                    assignments: &running,
                    snapshot: Some(&snapshot),
                    now: Some(now),
                    started: Some(last_heard),
                    ..Rest::default()
                },
            );
            shares(&plan)
        };
        // A local runtime: lease (2 s) + margin (1 s).
        assert_eq!(at(Duration::from_millis(2900), None), shares_of([1, 0, 0]));
        assert_eq!(at(Duration::from_millis(3100), None), shares_of([0, 1, 0]));
        // A slow runtime: lease + its longest stop.
        assert_eq!(at(Duration::from_secs(20), slow_stop), shares_of([1, 0, 0]));
        assert_eq!(
            at(Duration::from_millis(32_100), slow_stop),
            shares_of([0, 1, 0])
        );
    }

    #[test]
    fn a_shortfall_is_reported_once_until_it_changes() {
        let yaml = format!("{PROVIDERS}---{}", app_yaml("mirror"))
            .replace("priority: 30}", "priority: 30, capacity: 1}");
        let (apps, providers) = declared(&yaml);
        let now = Instant::now();
        let snapshot = Snapshot {
            providers: ["a", "b", "c"]
                .iter()
                .map(|p| (p.to_string(), view(Liveness::Up, now, None)))
                .collect(),
        };
        let run = |reported: &BTreeMap<String, (u32, u32)>| {
            plan_pass(
                &apps,
                &providers,
                Rest {
                    snapshot: Some(&snapshot),
                    now: Some(now),
                    reported: Some(reported),
                    ..Rest::default()
                },
            )
        };
        let first = run(&BTreeMap::new());
        let warnings: Vec<&NewEvent> = first
            .events
            .iter()
            .filter(|e| e.reason == EventReason::InsufficientCapacity)
            .collect();
        assert_eq!(warnings.len(), 1, "{:?}", first.events);
        assert!(warnings[0].warning());
        let second = run(&first.shortfalls);
        assert!(
            second
                .events
                .iter()
                .all(|e| e.reason != EventReason::InsufficientCapacity)
        );
    }
}
