//! Placement: which provider runs how many replicas of which app.
//!
//! [`schedule`] is a pure function of the stored apps and providers and a
//! [`Context`] (provider liveness, readiness, operator controls, current
//! placement), so it is tested exhaustively without a runtime and re-run from
//! scratch on every reconcile pass (level-triggered: it is never told what
//! changed).
//!
//! Failure handling lives here as arithmetic on that input:
//! - a *lost* provider (down, draining, held out, or recovering within its
//!   damping period) runs nothing; its share is spilled onto the serving
//!   providers when the app's policy allows, within `maxExtraReplicas` and
//!   capacity;
//! - a *returning* provider (recovered and damped) gets its share back, but its
//!   missing-ready replicas still count as lost, so the survivors keep their
//!   extras until the returning replicas are ready: make-before-break;
//! - active-passive promotes the highest-priority serving provider;
//! - a singleton stays where it is, and moves only once the old provider's
//!   lease has certainly expired.
//!
//! Boundary: knows specs and the context, not agents, streams or the store.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::liveness::Liveness;
use crate::model::{DeclaredApp, DeclaredProvider};
use crate::spec::{PlacementMode, PlacementTarget, Provider};

/// Replicas per app per provider: `provider -> app -> replicas` (no zero entries).
pub type Placements = BTreeMap<String, BTreeMap<String, u32>>;

/// The outcome of a scheduling pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Replicas per provider and app.
    pub placements: Placements,
    /// Apps that could not be placed in full, with the reason.
    pub shortfalls: Vec<Shortfall>,
    /// Per app: every selected provider, what it got and why.
    pub decisions: BTreeMap<String, Vec<Decision>>,
}

/// What one selected provider got for one app, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Provider name.
    pub provider: String,
    /// Replicas assigned (including extras).
    pub replicas: u32,
    /// Of those, replicas re-placed from lost providers.
    pub extra: u32,
    /// Routing tier: traffic goes to the highest tier with a healthy replica.
    pub tier: i32,
    /// Whether the provider takes part (false: excluded).
    pub serving: bool,
    /// Why, for people.
    pub reason: String,
}

/// What the scheduler knows of a provider beyond its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Liveness state.
    pub liveness: Liveness,
    /// How long it has been recovering, if it is.
    pub recovering_for: Option<Duration>,
    /// Held out for flapping.
    pub held_out: bool,
    /// No new replicas (operator).
    pub cordoned: bool,
    /// Replicas moved away (operator).
    pub draining: bool,
    /// The provider's lease on singleton replicas has certainly expired, so a
    /// singleton may start elsewhere.
    pub lease_expired: bool,
}

impl Default for Condition {
    fn default() -> Self {
        Condition {
            liveness: Liveness::Up,
            recovering_for: None,
            held_out: false,
            cordoned: false,
            draining: false,
            lease_expired: false,
        }
    }
}

/// Everything besides specs that placement depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Provider conditions; a provider missing here is taken as up.
    pub conditions: BTreeMap<String, Condition>,
    /// Ready replicas on the app's current workload, by (app, provider).
    pub ready: BTreeMap<(String, String), u32>,
    /// Current placement (what agents were last told), for singleton stickiness.
    pub current: Placements,
    /// Failover extras in the current placement, by provider and app.
    pub current_extra: Placements,
    /// Manual failovers in force: app → provider.
    pub pins: BTreeMap<String, String>,
}

/// A selected provider's role for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// Runs its share.
    Serving,
    /// Recovered: gets its share back; survivors keep extras until it is ready.
    Returning,
    /// Runs nothing; its share may spill.
    Lost(String),
}

fn role(cond: &Condition, failback_after: Duration) -> Role {
    if cond.draining {
        return Role::Lost("draining".into());
    }
    if cond.held_out {
        return Role::Lost("held out after flapping".into());
    }
    match cond.liveness {
        Liveness::Up | Liveness::Suspect | Liveness::Partitioned | Liveness::Unknown => {
            Role::Serving
        }
        Liveness::Down => Role::Lost("down".into()),
        Liveness::Recovering => match cond.recovering_for {
            Some(d) if d >= failback_after => Role::Returning,
            Some(d) => Role::Lost(format!(
                "recovering: healthy for {:.0}s of the {:.0}s fail-back damping",
                d.as_secs_f64(),
                failback_after.as_secs_f64()
            )),
            None => Role::Lost("recovering".into()),
        },
    }
}

/// An app that got fewer replicas than it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// App name.
    pub app: String,
    /// Replicas wanted in total.
    pub wanted: u32,
    /// Replicas placed in total.
    pub placed: u32,
    /// Why.
    pub reason: String,
}

/// A provider selected by an app's placement, with the app's view of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate<'a> {
    name: &'a str,
    weight: u32,
    priority: i32,
}

/// Per-candidate working state while placing one app.
#[derive(Debug, Clone)]
struct Slot<'a> {
    cand: Candidate<'a>,
    role: Role,
    cordoned: bool,
    lease_expired: bool,
    ready: u32,
    /// Replicas the provider runs for the app now (last assignment).
    current: u32,
    /// Of those, failover extras.
    current_extra: u32,
    base: u32,
    extra: u32,
    tier: i32,
    reason: String,
}

fn matches(target: &PlacementTarget, provider: &Provider) -> bool {
    match &target.name {
        Some(name) => *name == provider.metadata.name,
        None => target
            .selector
            .iter()
            .all(|(k, v)| provider.metadata.labels.get(k) == Some(v)),
    }
}

/// Providers an app may run on, in placement order, each once (the first
/// matching entry gives its weight and priority).
fn candidates<'a>(app: &DeclaredApp, providers: &'a [DeclaredProvider]) -> Vec<Candidate<'a>> {
    let placement = &app.app.spec.placement;
    if placement.providers.is_empty() {
        return providers
            .iter()
            .map(|p| Candidate {
                name: &p.provider.metadata.name,
                weight: 1,
                priority: p.provider.spec.priority,
            })
            .collect();
    }
    let mut out: Vec<Candidate<'a>> = Vec::new();
    for target in &placement.providers {
        for p in providers.iter().filter(|p| matches(target, &p.provider)) {
            let name = p.provider.metadata.name.as_str();
            if out.iter().all(|c| c.name != name) {
                out.push(Candidate {
                    name,
                    weight: target.weight.max(1),
                    priority: target.priority.unwrap_or(p.provider.spec.priority),
                });
            }
        }
    }
    out
}

/// Divides `total` over `weights` in proportion (largest remainder), ties going
/// to the earlier entry.
fn divide(total: u32, weights: &[u32]) -> Vec<u32> {
    let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut shares: Vec<u32> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let exact = u64::from(total) * u64::from(*w);
        shares.push(u32::try_from(exact / sum).unwrap_or(u32::MAX));
        remainders.push((exact % sum, i));
    }
    let placed: u32 = shares.iter().sum();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders.into_iter().take((total - placed) as usize) {
        shares[i] += 1;
    }
    shares
}

/// Computes the placement of every app on the providers.
///
/// Apps are placed in name order against each provider's capacity (0 means
/// unlimited), so the result is deterministic.
pub fn schedule(apps: &[DeclaredApp], providers: &[DeclaredProvider], ctx: &Context) -> Schedule {
    let mut free: BTreeMap<&str, Option<u32>> = providers
        .iter()
        .map(|p| {
            let cap = p.provider.spec.capacity;
            (p.provider.metadata.name.as_str(), (cap > 0).then_some(cap))
        })
        .collect();
    let mut out = Schedule::default();
    let mut apps: Vec<&DeclaredApp> = apps.iter().collect();
    apps.sort_by(|a, b| a.app.metadata.name.cmp(&b.app.metadata.name));
    let default_condition = Condition::default();

    for app in apps {
        let name = &app.app.metadata.name;
        let spec = &app.app.spec;
        let cands = candidates(app, providers);
        if cands.is_empty() {
            if spec.replicas > 0 {
                out.shortfalls.push(Shortfall {
                    app: name.clone(),
                    wanted: spec.replicas,
                    placed: 0,
                    reason: "no provider matches the app's placement".into(),
                });
            }
            continue;
        }
        let mut slots: Vec<Slot> = cands
            .into_iter()
            .map(|cand| {
                let cond = ctx.conditions.get(cand.name).unwrap_or(&default_condition);
                Slot {
                    role: role(cond, spec.failover.failback_after),
                    cordoned: cond.cordoned,
                    lease_expired: cond.lease_expired,
                    ready: ctx
                        .ready
                        .get(&(name.clone(), cand.name.to_string()))
                        .copied()
                        .unwrap_or(0),
                    current: ctx
                        .current
                        .get(cand.name)
                        .and_then(|m| m.get(name))
                        .copied()
                        .unwrap_or(0),
                    current_extra: ctx
                        .current_extra
                        .get(cand.name)
                        .and_then(|m| m.get(name))
                        .copied()
                        .unwrap_or(0),
                    cand,
                    base: 0,
                    extra: 0,
                    tier: 0,
                    reason: String::new(),
                }
            })
            .collect();

        let wanted_total = if spec.failover.singleton {
            place_singleton(name, spec.replicas.min(1), &mut slots, ctx)
        } else {
            match spec.placement.mode {
                PlacementMode::Mirror | PlacementMode::Spread => place_active_active(
                    spec.placement.mode,
                    spec.replicas,
                    &spec.failover,
                    &mut slots,
                ),
                PlacementMode::ActivePassive => {
                    place_active_passive(spec.replicas, spec.placement.standby_replicas, &mut slots)
                }
            }
        };
        if let Some(pinned) = ctx.pins.get(name) {
            pin(pinned, spec.replicas, &mut slots);
        }

        let mut got: Vec<u32> = Vec::with_capacity(slots.len());
        for s in &mut slots {
            let want = s.base + s.extra;
            let n = take(&mut free, s.cand.name, want);
            if n < want {
                s.reason
                    .push_str(&format!("; capacity allows {n} of {want}"));
                s.extra = s.extra.min(n);
            }
            got.push(n);
        }
        // Spread moves what did not fit to serving providers with room, in order.
        if spec.placement.mode == PlacementMode::Spread && !spec.failover.singleton {
            let mut missing =
                slots.iter().map(|s| s.base + s.extra).sum::<u32>() - got.iter().sum::<u32>();
            for (i, s) in slots.iter_mut().enumerate() {
                if missing == 0 {
                    break;
                }
                if s.role == Role::Serving {
                    let n = take(&mut free, s.cand.name, missing);
                    if n > 0 {
                        got[i] += n;
                        missing -= n;
                        s.reason
                            .push_str(&format!("; +{n} that did not fit elsewhere"));
                    }
                }
            }
        }
        let mut placed_total = 0;
        let mut decisions = Vec::with_capacity(slots.len());
        for (s, n) in slots.iter_mut().zip(got) {
            placed_total += n;
            if n > 0 {
                out.placements
                    .entry(s.cand.name.to_string())
                    .or_default()
                    .insert(name.clone(), n);
            }
            decisions.push(Decision {
                provider: s.cand.name.to_string(),
                replicas: n,
                extra: s.extra,
                tier: s.tier,
                serving: !matches!(s.role, Role::Lost(_)),
                reason: std::mem::take(&mut s.reason),
            });
        }
        if placed_total < wanted_total {
            out.shortfalls.push(Shortfall {
                app: name.clone(),
                wanted: wanted_total,
                placed: placed_total,
                reason: if slots.iter().all(|s| matches!(s.role, Role::Lost(_))) {
                    "no provider can serve it".into()
                } else {
                    "providers are at capacity or excluded".into()
                },
            });
        }
        out.decisions.insert(name.clone(), decisions);
    }
    out
}

/// Mirror and spread: base shares on every serving or returning provider; the
/// shares of lost providers (and the not-yet-ready part of returning ones)
/// spill onto serving providers when the policy allows. Returns the total wanted.
fn place_active_active(
    mode: PlacementMode,
    replicas: u32,
    failover: &crate::spec::FailoverPolicy,
    slots: &mut [Slot],
) -> u32 {
    let bases: Vec<u32> = match mode {
        PlacementMode::Spread => divide(
            replicas,
            &slots.iter().map(|s| s.cand.weight).collect::<Vec<_>>(),
        ),
        _ => vec![replicas; slots.len()],
    };
    let mut lost = 0;
    let mut lost_from = Vec::new();
    for (s, base) in slots.iter_mut().zip(&bases) {
        match &s.role {
            Role::Serving => {
                s.base = *base;
                s.reason = match mode {
                    PlacementMode::Spread => format!("spread: weight {}", s.cand.weight),
                    _ => format!("mirror: {replicas} per provider"),
                };
            }
            Role::Returning => {
                s.base = *base;
                let missing = base.saturating_sub(s.ready);
                lost += missing;
                s.reason = format!(
                    "recovered: share back, {} of {base} ready (make-before-break)",
                    s.ready.min(*base)
                );
                if missing > 0 {
                    lost_from.push(s.cand.name.to_string());
                }
            }
            Role::Lost(why) => {
                lost += base;
                s.reason = format!("excluded: {why}");
                if *base > 0 {
                    lost_from.push(s.cand.name.to_string());
                }
            }
        }
    }
    // Serving providers short of ready replicas (a provider just back, whose
    // replicas are still starting): extras the survivors already run are kept
    // until those are ready — make-before-break. This never creates extras.
    let mut short_from = Vec::new();
    let mut short = 0;
    for s in slots.iter() {
        if s.role == Role::Serving && s.ready < s.base {
            short += s.base - s.ready;
            short_from.push(s.cand.name.to_string());
        }
    }
    let total: u32 = bases.iter().sum();
    if (lost == 0 && short == 0) || !failover.spill {
        return total - lost;
    }
    let cap = if failover.max_extra_replicas == 0 {
        lost
    } else {
        lost.min(failover.max_extra_replicas)
    };
    let takers: Vec<usize> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.role == Role::Serving && !s.cordoned)
        .map(|(i, _)| i)
        .collect();
    if takers.is_empty() {
        return total - lost;
    }
    let shares = divide(
        cap,
        &takers
            .iter()
            .map(|i| slots[*i].cand.weight)
            .collect::<Vec<_>>(),
    );
    let mut kept_total = 0;
    for (i, extra) in takers.into_iter().zip(shares) {
        let s = &mut slots[i];
        if extra > 0 {
            s.extra = extra;
            s.reason.push_str(&format!(
                "; +{extra} re-placed from {}",
                lost_from.join(", ")
            ));
        }
        let running_extra = s.current_extra.saturating_sub(s.extra);
        let keep = running_extra.min(short - kept_total);
        if keep > 0 {
            s.extra += keep;
            kept_total += keep;
            s.reason.push_str(&format!(
                "; +{keep} kept until {} is ready (make-before-break)",
                short_from.join(", ")
            ));
        }
    }
    total - lost + cap + kept_total
}

/// Active-passive: the highest-priority serving provider runs `replicas`; a
/// returning higher-priority provider takes over only once its replicas are
/// ready (until then it warms up in a lower tier). Others keep standbys.
fn place_active_passive(replicas: u32, standby: u32, slots: &mut [Slot]) -> u32 {
    let standby = standby.min(replicas);
    let mut order: Vec<usize> = (0..slots.len()).collect();
    // Highest priority first; ties keep placement order.
    order.sort_by_key(|i| std::cmp::Reverse(slots[*i].cand.priority));
    let target = order
        .iter()
        .copied()
        .find(|i| !matches!(slots[*i].role, Role::Lost(_)));
    let serving = order
        .iter()
        .copied()
        .find(|i| slots[*i].role == Role::Serving);
    let Some(target) = target else {
        for s in slots.iter_mut() {
            if let Role::Lost(why) = &s.role {
                s.reason = format!("excluded: {why}");
            }
        }
        return replicas;
    };
    // The provider serving now (it runs the full count) keeps serving until the
    // new target's replicas are ready: make-before-break.
    let serving_now = order
        .iter()
        .copied()
        .find(|i| *i != target && slots[*i].role == Role::Serving && slots[*i].current >= replicas)
        .or(serving.filter(|s| *s != target && slots[target].role == Role::Returning));
    let active = match serving_now {
        Some(s) if slots[target].ready < replicas => s,
        _ => target,
    };
    for (i, s) in slots.iter_mut().enumerate() {
        match &s.role {
            Role::Lost(why) => s.reason = format!("excluded: {why}"),
            _ if i == active => {
                s.base = replicas;
                s.tier = 1;
                s.reason = format!("active (priority {})", s.cand.priority);
                if i != order[0] {
                    s.reason
                        .push_str("; promoted while higher-priority providers are out");
                }
            }
            _ if i == target => {
                s.base = replicas;
                s.reason = format!(
                    "recovered primary warming up: {} of {replicas} ready (make-before-break)",
                    s.ready
                );
            }
            _ => {
                s.base = standby;
                s.reason = format!("standby (priority {})", s.cand.priority);
            }
        }
    }
    replicas
}

/// Singleton: one replica, kept where it runs; moved only when its provider is
/// lost *and* that provider's lease has certainly expired (so the old copy has
/// stopped itself before a new one starts).
fn place_singleton(app: &str, replicas: u32, slots: &mut [Slot], ctx: &Context) -> u32 {
    if replicas == 0 {
        return 0;
    }
    let holder = slots.iter().position(|s| {
        ctx.current
            .get(s.cand.name)
            .and_then(|m| m.get(app))
            .copied()
            .unwrap_or(0)
            > 0
    });
    let chosen = match holder {
        Some(h) if !matches!(slots[h].role, Role::Lost(_)) => {
            Some((h, "singleton: runs here".to_string()))
        }
        Some(h) if !slots[h].lease_expired => Some((
            h,
            "singleton: provider lost, waiting for its lease to expire before moving".to_string(),
        )),
        _ => {
            let mut order: Vec<usize> = (0..slots.len())
                .filter(|i| slots[*i].role == Role::Serving)
                .collect();
            order.sort_by_key(|i| std::cmp::Reverse(slots[*i].cand.priority));
            order.first().map(|i| {
                (
                    *i,
                    format!(
                        "singleton: placed on the highest-priority serving provider (priority {})",
                        slots[*i].cand.priority
                    ),
                )
            })
        }
    };
    for (i, s) in slots.iter_mut().enumerate() {
        match &chosen {
            Some((c, why)) if *c == i => {
                s.base = 1;
                s.tier = 1;
                s.reason = why.clone();
            }
            _ => {
                s.reason = match &s.role {
                    Role::Lost(why) => format!("excluded: {why}"),
                    _ => "singleton runs elsewhere".into(),
                }
            }
        }
    }
    1
}

/// Manual failover: the pinned provider serves (tier 2) with the full count.
fn pin(provider: &str, replicas: u32, slots: &mut [Slot]) {
    let Some(s) = slots.iter_mut().find(|s| s.cand.name == provider) else {
        return;
    };
    if let Role::Lost(why) = &s.role {
        s.reason
            .push_str(&format!("; manual failover here is not in force: {why}"));
        return;
    }
    s.base = s.base.max(replicas);
    s.tier = 2;
    s.reason = format!("manual failover: serves all traffic ({})", s.reason);
}

/// Takes up to `want` slots of a provider's free capacity.
fn take(free: &mut BTreeMap<&str, Option<u32>>, provider: &str, want: u32) -> u32 {
    match free.get_mut(provider) {
        Some(Some(left)) => {
            let got = want.min(*left);
            *left -= got;
            got
        }
        Some(None) => want,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{App, AppSpec, DriverKind, ObjectMeta, Placement, ProviderSpec};

    fn provider(
        name: &str,
        priority: i32,
        capacity: u32,
        labels: &[(&str, &str)],
    ) -> DeclaredProvider {
        DeclaredProvider {
            provider: Provider {
                metadata: ObjectMeta {
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
                spec: ProviderSpec {
                    priority,
                    capacity,
                    ..ProviderSpec::new(DriverKind::Process)
                },
            },
            generation: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn app(
        name: &str,
        replicas: u32,
        mode: PlacementMode,
        targets: Vec<PlacementTarget>,
    ) -> DeclaredApp {
        DeclaredApp {
            app: App {
                metadata: ObjectMeta {
                    name: name.into(),
                    labels: BTreeMap::new(),
                },
                spec: AppSpec {
                    replicas,
                    placement: Placement {
                        mode,
                        providers: targets,
                        standby_replicas: 0,
                    },
                    ..AppSpec::default()
                },
            },
            generation: 1,
            workload_generation: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn by_name(name: &str, weight: u32) -> PlacementTarget {
        PlacementTarget {
            name: Some(name.into()),
            selector: BTreeMap::new(),
            weight,
            priority: None,
        }
    }

    fn counts(s: &Schedule, app: &str) -> Vec<(String, u32)> {
        s.placements
            .iter()
            .filter_map(|(p, apps)| apps.get(app).map(|n| (p.clone(), *n)))
            .collect()
    }

    #[test]
    fn mirror_runs_the_full_count_everywhere() {
        let ps = vec![
            provider("a", 0, 0, &[]),
            provider("b", 0, 0, &[]),
            provider("c", 0, 0, &[]),
        ];
        let s = schedule(
            &[app("web", 2, PlacementMode::Mirror, vec![])],
            &ps,
            &Context::default(),
        );
        assert_eq!(
            counts(&s, "web"),
            vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]
        );
        assert!(s.shortfalls.is_empty());
    }

    #[test]
    fn selectors_and_names_pick_providers_once() {
        let ps = vec![
            provider("a", 0, 0, &[("cloud", "aws")]),
            provider("b", 0, 0, &[("cloud", "gcp")]),
            provider("c", 0, 0, &[("cloud", "aws")]),
        ];
        let sel = PlacementTarget {
            name: None,
            selector: [("cloud".to_string(), "aws".to_string())].into(),
            weight: 1,
            priority: None,
        };
        let s = schedule(
            &[app(
                "web",
                1,
                PlacementMode::Mirror,
                vec![sel, by_name("a", 5)],
            )],
            &ps,
            &Context::default(),
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 1), ("c".into(), 1)]);
    }

    #[test]
    fn spread_divides_by_weight_with_largest_remainder() {
        assert_eq!(divide(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(divide(5, &[3, 1]), vec![4, 1]);
        assert_eq!(divide(0, &[1, 2]), vec![0, 0]);
        assert_eq!(divide(7, &[0, 0]), vec![0, 0]);
        let ps = vec![provider("a", 0, 0, &[]), provider("b", 0, 0, &[])];
        let s = schedule(
            &[app(
                "web",
                4,
                PlacementMode::Spread,
                vec![by_name("a", 3), by_name("b", 1)],
            )],
            &ps,
            &Context::default(),
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 3), ("b".into(), 1)]);
    }

    #[test]
    fn spread_moves_overflow_to_providers_with_room() {
        let ps = vec![provider("a", 0, 1, &[]), provider("b", 0, 0, &[])];
        let s = schedule(
            &[app("web", 4, PlacementMode::Spread, vec![])],
            &ps,
            &Context::default(),
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 1), ("b".into(), 3)]);
        assert!(s.shortfalls.is_empty());
    }

    #[test]
    fn active_passive_serves_from_the_highest_priority() {
        let ps = vec![
            provider("a", 1, 0, &[]),
            provider("b", 5, 0, &[]),
            provider("c", 3, 0, &[]),
        ];
        let mut ap = app("web", 3, PlacementMode::ActivePassive, vec![]);
        let s = schedule(std::slice::from_ref(&ap), &ps, &Context::default());
        assert_eq!(counts(&s, "web"), vec![("b".into(), 3)]);
        ap.app.spec.placement.standby_replicas = 1;
        let s = schedule(&[ap], &ps, &Context::default());
        assert_eq!(
            counts(&s, "web"),
            vec![("a".into(), 1), ("b".into(), 3), ("c".into(), 1)]
        );
    }

    #[test]
    fn capacity_is_shared_in_app_name_order_and_shortfalls_reported() {
        let ps = vec![provider("a", 0, 3, &[])];
        let apps = vec![
            app("zeta", 2, PlacementMode::Mirror, vec![]),
            app("alpha", 2, PlacementMode::Mirror, vec![]),
        ];
        let s = schedule(&apps, &ps, &Context::default());
        assert_eq!(counts(&s, "alpha"), vec![("a".into(), 2)]);
        assert_eq!(counts(&s, "zeta"), vec![("a".into(), 1)]);
        assert_eq!(s.shortfalls.len(), 1);
        assert_eq!(s.shortfalls[0].app, "zeta");
    }

    #[test]
    fn zero_replicas_and_no_candidates() {
        let ps = vec![provider("a", 0, 0, &[])];
        let s = schedule(
            &[
                app("idle", 0, PlacementMode::Mirror, vec![]),
                app(
                    "lost",
                    1,
                    PlacementMode::Mirror,
                    vec![by_name("nowhere", 1)],
                ),
            ],
            &ps,
            &Context::default(),
        );
        assert!(s.placements.is_empty());
        assert_eq!(s.shortfalls.len(), 1);
    }

    fn cond(liveness: Liveness) -> Condition {
        Condition {
            liveness,
            ..Condition::default()
        }
    }

    fn ctx(conds: &[(&str, Condition)]) -> Context {
        Context {
            conditions: conds
                .iter()
                .map(|(n, c)| (n.to_string(), c.clone()))
                .collect(),
            ..Context::default()
        }
    }

    fn three() -> Vec<DeclaredProvider> {
        vec![
            provider("a", 30, 0, &[]),
            provider("b", 20, 0, &[]),
            provider("c", 10, 0, &[]),
        ]
    }

    #[test]
    fn a_lost_providers_share_spills_onto_the_survivors() {
        let c = ctx(&[("b", cond(Liveness::Down))]);
        let s = schedule(
            &[app("web", 2, PlacementMode::Mirror, vec![])],
            &three(),
            &c,
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 3), ("c".into(), 3)]);
        let d = &s.decisions["web"];
        assert!(
            d.iter()
                .any(|d| d.provider == "b" && !d.serving && d.reason.contains("down"))
        );
        assert!(
            d.iter().any(|d| d.provider == "a"
                && d.extra == 1
                && d.reason.contains("re-placed from b"))
        );
    }

    #[test]
    fn spill_respects_policy_limits_and_cordons() {
        let mut web = app("web", 3, PlacementMode::Mirror, vec![]);
        web.app.spec.failover.max_extra_replicas = 2;
        let mut c = ctx(&[("b", cond(Liveness::Down))]);
        c.conditions.insert(
            "c".into(),
            Condition {
                cordoned: true,
                ..Condition::default()
            },
        );
        let s = schedule(std::slice::from_ref(&web), &three(), &c);
        assert_eq!(counts(&s, "web"), vec![("a".into(), 5), ("c".into(), 3)]);
        web.app.spec.failover.spill = false;
        let s = schedule(&[web], &three(), &c);
        assert_eq!(counts(&s, "web"), vec![("a".into(), 3), ("c".into(), 3)]);
    }

    #[test]
    fn partitions_unknown_and_suspect_providers_keep_their_share() {
        for l in [Liveness::Partitioned, Liveness::Unknown, Liveness::Suspect] {
            let s = schedule(
                &[app("web", 2, PlacementMode::Mirror, vec![])],
                &three(),
                &ctx(&[("b", cond(l))]),
            );
            assert_eq!(
                counts(&s, "web"),
                vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)],
                "{l:?}"
            );
        }
    }

    #[test]
    fn fail_back_waits_for_damping_then_makes_before_breaking() {
        let web = app("web", 2, PlacementMode::Mirror, vec![]);
        let recovering = |secs: u64| Condition {
            liveness: Liveness::Recovering,
            recovering_for: Some(Duration::from_secs(secs)),
            ..Condition::default()
        };
        // Within the 30 s default damping: still excluded, survivors carry it.
        let s = schedule(
            std::slice::from_ref(&web),
            &three(),
            &ctx(&[("b", recovering(5))]),
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 3), ("c".into(), 3)]);
        // Damped: b gets its share back; survivors keep extras until b is ready.
        let mut c = ctx(&[("b", recovering(31))]);
        let s = schedule(std::slice::from_ref(&web), &three(), &c);
        assert_eq!(
            counts(&s, "web"),
            vec![("a".into(), 3), ("b".into(), 2), ("c".into(), 3)]
        );
        c.ready.insert(("web".into(), "b".into()), 1);
        let s = schedule(std::slice::from_ref(&web), &three(), &c);
        assert_eq!(counts(&s, "web").iter().map(|x| x.1).sum::<u32>(), 7);
        c.ready.insert(("web".into(), "b".into()), 2);
        let s = schedule(&[web], &three(), &c);
        assert_eq!(
            counts(&s, "web"),
            vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]
        );
    }

    #[test]
    fn active_passive_promotes_and_fails_back_make_before_break() {
        let web = app("web", 2, PlacementMode::ActivePassive, vec![]);
        let s = schedule(
            std::slice::from_ref(&web),
            &three(),
            &ctx(&[("a", cond(Liveness::Down))]),
        );
        assert_eq!(counts(&s, "web"), vec![("b".into(), 2)]);
        assert!(
            s.decisions["web"]
                .iter()
                .any(|d| d.provider == "b" && d.tier == 1 && d.reason.contains("promoted"))
        );
        let back = Condition {
            liveness: Liveness::Recovering,
            recovering_for: Some(Duration::from_secs(60)),
            ..Condition::default()
        };
        let mut c = ctx(&[("a", back)]);
        // a warms up in tier 0 while b keeps serving in tier 1.
        let s = schedule(std::slice::from_ref(&web), &three(), &c);
        assert_eq!(counts(&s, "web"), vec![("a".into(), 2), ("b".into(), 2)]);
        let tier = |s: &Schedule, p: &str| {
            s.decisions["web"]
                .iter()
                .find(|d| d.provider == p)
                .map(|d| d.tier)
        };
        assert_eq!((tier(&s, "a"), tier(&s, "b")), (Some(0), Some(1)));
        c.ready.insert(("web".into(), "a".into()), 2);
        let s = schedule(&[web], &three(), &c);
        assert_eq!(counts(&s, "web"), vec![("a".into(), 2)]);
        assert_eq!(tier(&s, "a"), Some(1));
    }

    #[test]
    fn manual_failover_pins_traffic_and_drain_moves_replicas() {
        let web = app("web", 2, PlacementMode::Mirror, vec![]);
        let mut c = Context::default();
        c.pins.insert("web".into(), "c".into());
        let s = schedule(std::slice::from_ref(&web), &three(), &c);
        let d = &s.decisions["web"];
        assert!(d.iter().all(|d| (d.provider == "c") == (d.tier == 2)));
        let c = ctx(&[(
            "a",
            Condition {
                draining: true,
                ..Condition::default()
            },
        )]);
        let s = schedule(&[web], &three(), &c);
        assert_eq!(counts(&s, "web"), vec![("b".into(), 3), ("c".into(), 3)]);
    }

    #[test]
    fn a_singleton_moves_only_after_the_lease_expires() {
        let mut job = app("job", 1, PlacementMode::Mirror, vec![]);
        job.app.spec.failover.singleton = true;
        let s = schedule(std::slice::from_ref(&job), &three(), &Context::default());
        assert_eq!(counts(&s, "job"), vec![("a".into(), 1)]);
        // Sticks to its current provider even if a higher priority one exists.
        let mut c = Context::default();
        c.current
            .entry("b".into())
            .or_default()
            .insert("job".into(), 1);
        let s = schedule(std::slice::from_ref(&job), &three(), &c);
        assert_eq!(counts(&s, "job"), vec![("b".into(), 1)]);
        // b is down but its lease may still run: stay.
        c.conditions.insert("b".into(), cond(Liveness::Down));
        let s = schedule(std::slice::from_ref(&job), &three(), &c);
        assert_eq!(counts(&s, "job"), vec![("b".into(), 1)]);
        // Lease expired: move to the best serving provider.
        c.conditions.insert(
            "b".into(),
            Condition {
                liveness: Liveness::Down,
                lease_expired: true,
                ..Condition::default()
            },
        );
        let s = schedule(&[job], &three(), &c);
        assert_eq!(counts(&s, "job"), vec![("a".into(), 1)]);
    }
}
