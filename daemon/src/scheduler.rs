//! Placement: which provider runs how many replicas of which app.
//!
//! [`schedule`] is a pure function of the stored apps and providers, so it is
//! tested exhaustively without a runtime and re-run from scratch on every
//! reconcile pass (level-triggered: it is never told what changed).
//!
//! Boundary: knows specs, not agents, streams or the store.

use std::collections::BTreeMap;

use crate::spec::{PlacementMode, PlacementTarget, Provider};
use crate::store::{StoredApp, StoredProvider};

/// Replicas per app per provider: `provider -> app -> replicas` (no zero entries).
pub type Placements = BTreeMap<String, BTreeMap<String, u32>>;

/// The outcome of a scheduling pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Replicas per provider and app.
    pub placements: Placements,
    /// Apps that could not be placed in full, with the reason.
    pub shortfalls: Vec<Shortfall>,
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
fn candidates<'a>(app: &StoredApp, providers: &'a [StoredProvider]) -> Vec<Candidate<'a>> {
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
pub fn schedule(apps: &[StoredApp], providers: &[StoredProvider]) -> Schedule {
    let mut free: BTreeMap<&str, Option<u32>> = providers
        .iter()
        .map(|p| {
            let cap = p.provider.spec.capacity;
            (p.provider.metadata.name.as_str(), (cap > 0).then_some(cap))
        })
        .collect();
    let mut out = Schedule::default();
    let mut apps: Vec<&StoredApp> = apps.iter().collect();
    apps.sort_by(|a, b| a.app.metadata.name.cmp(&b.app.metadata.name));

    for app in apps {
        let name = &app.app.metadata.name;
        let spec = &app.app.spec;
        let mut cands = candidates(app, providers);
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
        // Wanted replicas per candidate, before capacity.
        let wanted: Vec<u32> = match spec.placement.mode {
            PlacementMode::Mirror => vec![spec.replicas; cands.len()],
            PlacementMode::Spread => divide(
                spec.replicas,
                &cands.iter().map(|c| c.weight).collect::<Vec<_>>(),
            ),
            PlacementMode::ActivePassive => {
                // Highest priority first; ties by placement order (stable sort).
                cands.sort_by_key(|c| std::cmp::Reverse(c.priority));
                let standby = spec.placement.standby_replicas.min(spec.replicas);
                (0..cands.len())
                    .map(|i| if i == 0 { spec.replicas } else { standby })
                    .collect()
            }
        };
        let mut placed = vec![0u32; cands.len()];
        for (i, c) in cands.iter().enumerate() {
            placed[i] = take(&mut free, c.name, wanted[i]);
        }
        // Spread moves what did not fit to providers with room, in order.
        if spec.placement.mode == PlacementMode::Spread {
            let mut missing: u32 = wanted.iter().sum::<u32>() - placed.iter().sum::<u32>();
            for (i, c) in cands.iter().enumerate() {
                if missing == 0 {
                    break;
                }
                let got = take(&mut free, c.name, missing);
                placed[i] += got;
                missing -= got;
            }
        }
        let total_wanted: u32 = wanted.iter().sum();
        let total_placed: u32 = placed.iter().sum();
        if total_placed < total_wanted {
            out.shortfalls.push(Shortfall {
                app: name.clone(),
                wanted: total_wanted,
                placed: total_placed,
                reason: "providers are at capacity".into(),
            });
        }
        for (c, n) in cands.iter().zip(placed) {
            if n > 0 {
                out.placements
                    .entry(c.name.to_string())
                    .or_default()
                    .insert(name.clone(), n);
            }
        }
    }
    out
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
    ) -> StoredProvider {
        StoredProvider {
            provider: Provider {
                metadata: ObjectMeta {
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                },
                spec: ProviderSpec {
                    driver: DriverKind::Process,
                    priority,
                    capacity,
                    description: String::new(),
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
    ) -> StoredApp {
        StoredApp {
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
        let s = schedule(&[app("web", 2, PlacementMode::Mirror, vec![])], &ps);
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
        );
        assert_eq!(counts(&s, "web"), vec![("a".into(), 3), ("b".into(), 1)]);
    }

    #[test]
    fn spread_moves_overflow_to_providers_with_room() {
        let ps = vec![provider("a", 0, 1, &[]), provider("b", 0, 0, &[])];
        let s = schedule(&[app("web", 4, PlacementMode::Spread, vec![])], &ps);
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
        let s = schedule(std::slice::from_ref(&ap), &ps);
        assert_eq!(counts(&s, "web"), vec![("b".into(), 3)]);
        ap.app.spec.placement.standby_replicas = 1;
        let s = schedule(&[ap], &ps);
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
        let s = schedule(&apps, &ps);
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
        );
        assert!(s.placements.is_empty());
        assert_eq!(s.shortfalls.len(), 1);
    }
}
