//! `apply` and `delete`: validate and plan (pure), then commit.
//!
//! [`plan_apply`] turns a file's documents and the declared state into the
//! batch to commit, the per-object results and the placement changes the
//! apply causes; [`plan_delete`] does the same for deletions. Neither touches
//! the store: [`Daemon::apply`] and [`Daemon::delete`] read the declared state,
//! plan, and commit the batch durably before they answer.
//!
//! Invariant: an apply is all-or-nothing and durable before it is
//! acknowledged; a rejected file changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{
    Action, DeclaredApp, DeclaredProvider, EventReason, NewEvent, ObjectResult, PlacementChange,
    now_ms,
};
use crate::scheduler::{self, Context, Schedule};
use crate::spec::{self, Document, Kind};
use crate::store::Batch;

/// What an apply would do.
#[derive(Debug, Default)]
pub struct ApplyPlan {
    /// One result per document.
    pub results: Vec<ObjectResult>,
    /// How placement changes.
    pub changes: Vec<PlacementChange>,
    /// What to commit.
    pub batch: Batch,
}

/// The outcome of an apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// One result per document.
    pub results: Vec<ObjectResult>,
    /// Placement changes.
    pub changes: Vec<PlacementChange>,
}

/// Plans an apply of `content` (read from `source`) onto the declared `apps`
/// and `providers`; `ctx` is the placement context now, so the changes are
/// the ones the next pass will make. Fails, changing nothing, on any invalid
/// document.
pub fn plan_apply(
    source: &str,
    content: &str,
    apps: &[DeclaredApp],
    providers: &[DeclaredProvider],
    ctx: &Context,
    now_ms: i64,
) -> Result<ApplyPlan, DaemonError> {
    let docs = spec::parse_documents(source, content)?;
    let known: BTreeSet<String> = providers
        .iter()
        .map(|p| p.provider.metadata.name.clone())
        .collect();
    spec::validate_references(source, content, &docs, &known)?;

    let mut batch = Batch::default();
    let mut results = Vec::new();
    let mut new_providers: BTreeMap<String, DeclaredProvider> = providers
        .iter()
        .map(|p| (p.provider.metadata.name.clone(), p.clone()))
        .collect();
    let mut new_apps: BTreeMap<String, DeclaredApp> = apps
        .iter()
        .map(|a| (a.app.metadata.name.clone(), a.clone()))
        .collect();

    for parsed in docs {
        match parsed.document {
            Document::Provider(p) => {
                let name = p.metadata.name.clone();
                let (action, declared) = match new_providers.get(&name) {
                    Some(old) if old.provider == p => (Action::Unchanged, old.clone()),
                    Some(old) => (
                        Action::Configured,
                        DeclaredProvider {
                            provider: p,
                            generation: old.generation + 1,
                            created_at_ms: old.created_at_ms,
                            updated_at_ms: now_ms,
                        },
                    ),
                    None => (
                        Action::Created,
                        DeclaredProvider {
                            provider: p,
                            generation: 1,
                            created_at_ms: now_ms,
                            updated_at_ms: now_ms,
                        },
                    ),
                };
                if action != Action::Unchanged {
                    let reason = if action == Action::Created {
                        EventReason::ProviderCreated
                    } else {
                        EventReason::ProviderConfigured
                    };
                    batch.events.push(NewEvent::provider(
                        reason,
                        &name,
                        format!(
                            "provider {name} {} (generation {})",
                            action.as_str(),
                            declared.generation
                        ),
                    ));
                    batch.put_providers.push(declared.clone());
                }
                results.push(ObjectResult {
                    kind: Kind::Provider,
                    name: name.clone(),
                    action,
                    generation: declared.generation,
                });
                new_providers.insert(name, declared);
            }
            Document::App(a) => {
                let name = a.metadata.name.clone();
                let (action, declared) = match new_apps.get(&name) {
                    Some(old) if old.app == a => (Action::Unchanged, old.clone()),
                    Some(old) => {
                        let generation = old.generation + 1;
                        let workload_generation = if old.app.spec.workload == a.spec.workload {
                            old.workload_generation
                        } else {
                            generation
                        };
                        (
                            Action::Configured,
                            DeclaredApp {
                                app: a,
                                generation,
                                workload_generation,
                                created_at_ms: old.created_at_ms,
                                updated_at_ms: now_ms,
                            },
                        )
                    }
                    None => (
                        Action::Created,
                        DeclaredApp {
                            app: a,
                            generation: 1,
                            workload_generation: 1,
                            created_at_ms: now_ms,
                            updated_at_ms: now_ms,
                        },
                    ),
                };
                if action != Action::Unchanged {
                    let detail = match new_apps.get(&name) {
                        Some(old) => describe_change(old, &declared),
                        None => format!(
                            "{} replicas, {} placement",
                            declared.app.spec.replicas,
                            declared.app.spec.placement.mode.as_str()
                        ),
                    };
                    let reason = if action == Action::Created {
                        EventReason::AppCreated
                    } else {
                        EventReason::AppConfigured
                    };
                    batch.events.push(NewEvent::app(
                        reason,
                        &name,
                        format!(
                            "app {name} {} (generation {}): {detail}",
                            action.as_str(),
                            declared.generation
                        ),
                    ));
                    batch.put_apps.push(declared.clone());
                }
                results.push(ObjectResult {
                    kind: Kind::App,
                    name: name.clone(),
                    action,
                    generation: declared.generation,
                });
                new_apps.insert(name, declared);
            }
        }
    }

    let before = scheduler::schedule(apps, providers, ctx);
    let after_apps: Vec<DeclaredApp> = new_apps.into_values().collect();
    let after_providers: Vec<DeclaredProvider> = new_providers.into_values().collect();
    let after = scheduler::schedule(&after_apps, &after_providers, ctx);
    Ok(ApplyPlan {
        results,
        changes: placement_changes(&before, &after, apps, &after_apps),
        batch,
    })
}

/// Plans the deletion of `targets`. A provider still named in the placement
/// of an app that stays is refused, and then nothing is deleted.
pub fn plan_delete(
    targets: &[(Kind, String)],
    apps: &[DeclaredApp],
    providers: &[DeclaredProvider],
) -> Result<(Vec<ObjectResult>, Batch), DaemonError> {
    let deleted: BTreeSet<(Kind, String)> = targets.iter().cloned().collect();
    let mut batch = Batch::default();
    let mut results = Vec::new();
    for (kind, name) in targets {
        let generation = match kind {
            Kind::App => apps
                .iter()
                .find(|a| &a.app.metadata.name == name)
                .map(|a| a.generation),
            Kind::Provider => providers
                .iter()
                .find(|p| &p.provider.metadata.name == name)
                .map(|p| p.generation),
        };
        let Some(generation) = generation else {
            results.push(ObjectResult {
                kind: *kind,
                name: name.clone(),
                action: Action::NotFound,
                generation: 0,
            });
            continue;
        };
        let message = format!("{} {name} deleted", kind.as_str().to_lowercase());
        match kind {
            Kind::Provider => {
                let users: Vec<&str> = apps
                    .iter()
                    .filter(|a| !deleted.contains(&(Kind::App, a.app.metadata.name.clone())))
                    .filter(|a| {
                        a.app
                            .spec
                            .placement
                            .providers
                            .iter()
                            .any(|t| t.name.as_deref() == Some(name))
                    })
                    .map(|a| a.app.metadata.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(DaemonError::FailedPrecondition(format!(
                        "provider {name} is named in the placement of app(s) {}; change or delete them first",
                        users.join(", ")
                    )));
                }
                batch.delete_providers.push(name.clone());
                batch.events.push(NewEvent::provider(
                    EventReason::ProviderDeleted,
                    name,
                    message,
                ));
            }
            Kind::App => {
                batch.delete_apps.push(name.clone());
                batch
                    .events
                    .push(NewEvent::app(EventReason::AppDeleted, name, message));
            }
        }
        results.push(ObjectResult {
            kind: *kind,
            name: name.clone(),
            action: Action::Deleted,
            generation,
        });
    }
    Ok((results, batch))
}

impl Daemon {
    /// Validates and stores documents; see `ControlService.Apply`.
    pub async fn apply(
        &self,
        source: &str,
        content: &str,
        dry_run: bool,
    ) -> Result<ApplyOutcome, DaemonError> {
        let _guard = self.writes.lock().await;
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let ctx = self.placement_context(&apps, &providers)?;
        let plan = plan_apply(source, content, &apps, &providers, &ctx, now_ms())?;
        if !dry_run && !plan.batch.is_empty() {
            self.commit(plan.batch).await?;
        }
        Ok(ApplyOutcome {
            results: plan.results,
            changes: plan.changes,
        })
    }

    /// Deletes objects by kind and name.
    pub async fn delete(
        &self,
        targets: Vec<(Kind, String)>,
    ) -> Result<Vec<ObjectResult>, DaemonError> {
        let _guard = self.writes.lock().await;
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let (results, mut batch) = plan_delete(&targets, &apps, &providers)?;
        // A deleted provider's agents cannot come back: their certificates
        // are revoked with the deletion. Its agent keeps its session until
        // it has stopped its replicas (see `monitor`).
        let _credentials = self.security_writes().await;
        for name in batch.delete_providers.clone() {
            let revoked = self.revocations_of(&name)?;
            if !revoked.is_empty() {
                batch.events.push(crate::model::NewEvent::provider(
                    crate::model::EventReason::AgentRevoked,
                    &name,
                    format!(
                        "provider {name} was deleted: {} certificate(s) of its agents revoked",
                        revoked.len()
                    ),
                ));
                batch.put_certificates.extend(revoked);
            }
        }
        if !batch.is_empty() {
            self.commit(batch).await?;
        }
        Ok(results)
    }
}

fn describe_change(old: &DeclaredApp, new: &DeclaredApp) -> String {
    let (o, n) = (&old.app.spec, &new.app.spec);
    let mut parts = Vec::new();
    if o.replicas != n.replicas {
        parts.push(format!("replicas {} → {}", o.replicas, n.replicas));
    }
    if o.workload != n.workload {
        parts.push("workload changed, replicas will be replaced".to_string());
    }
    if o.placement != n.placement {
        parts.push("placement changed".to_string());
    }
    if o.health != n.health {
        parts.push("health check changed".to_string());
    }
    if o.failover != n.failover || o.routing != n.routing || old.app.metadata != new.app.metadata {
        parts.push("settings changed".to_string());
    }
    parts.join(", ")
}

/// Every provider's share of every app that differs between two schedules.
fn placement_changes(
    before: &Schedule,
    after: &Schedule,
    old_apps: &[DeclaredApp],
    new_apps: &[DeclaredApp],
) -> Vec<PlacementChange> {
    let wg = |apps: &[DeclaredApp], name: &str| {
        apps.iter()
            .find(|a| a.app.metadata.name == name)
            .map(|a| a.workload_generation)
    };
    let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
    for s in [before, after] {
        for (p, apps) in &s.placements {
            for a in apps.keys() {
                keys.insert((a.clone(), p.clone()));
            }
        }
    }
    let count = |s: &Schedule, app: &str, p: &str| {
        s.placements
            .get(p)
            .and_then(|m| m.get(app))
            .copied()
            .unwrap_or(0)
    };
    keys.into_iter()
        .filter_map(|(app, provider)| {
            let b = count(before, &app, &provider);
            let a = count(after, &app, &provider);
            let replace = b > 0 && a > 0 && wg(old_apps, &app) != wg(new_apps, &app);
            (b != a || replace).then_some(PlacementChange {
                app,
                provider,
                replicas_before: b,
                replicas_after: a,
                replace,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDERS: &str = "
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: a}
spec: {driver: process, priority: 20}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: b}
spec: {driver: process, priority: 10}
";

    fn web(replicas: u32, command: &str) -> String {
        format!(
            "
apiVersion: skymirror.dev/v1
kind: App
metadata: {{name: web}}
spec:
  command: {command}
  replicas: {replicas}
  placement: {{mode: mirror, providers: [{{name: a}}, {{name: b}}]}}
"
        )
    }

    /// Applies `content` onto the declared state and keeps what it commits.
    fn apply(
        content: &str,
        apps: &mut Vec<DeclaredApp>,
        providers: &mut Vec<DeclaredProvider>,
    ) -> Result<ApplyPlan, DaemonError> {
        let plan = plan_apply("t.yaml", content, apps, providers, &Context::default(), 7)?;
        for p in &plan.batch.put_providers {
            providers.retain(|x| x.provider.metadata.name != p.provider.metadata.name);
            providers.push(p.clone());
        }
        for a in &plan.batch.put_apps {
            apps.retain(|x| x.app.metadata.name != a.app.metadata.name);
            apps.push(a.clone());
        }
        Ok(plan)
    }

    fn actions(plan: &ApplyPlan) -> Vec<(Kind, &str, Action, u64)> {
        plan.results
            .iter()
            .map(|r| (r.kind, r.name.as_str(), r.action, r.generation))
            .collect()
    }

    #[test]
    fn apply_plans_creations_changes_and_replacements_and_reapplying_changes_nothing() {
        let (mut apps, mut providers) = (Vec::new(), Vec::new());
        let both = |app: &str| format!("{PROVIDERS}---{app}");

        let created = apply(&both(&web(2, "server")), &mut apps, &mut providers).expect("valid");
        assert_eq!(
            actions(&created),
            vec![
                (Kind::Provider, "a", Action::Created, 1),
                (Kind::Provider, "b", Action::Created, 1),
                (Kind::App, "web", Action::Created, 1),
            ]
        );
        let reasons: Vec<EventReason> = created.batch.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons,
            vec![
                EventReason::ProviderCreated,
                EventReason::ProviderCreated,
                EventReason::AppCreated
            ]
        );
        assert_eq!(created.batch.put_apps[0].created_at_ms, 7);
        let fresh: Vec<(&str, u32, u32, bool)> = created
            .changes
            .iter()
            .map(|c| {
                (
                    c.provider.as_str(),
                    c.replicas_before,
                    c.replicas_after,
                    c.replace,
                )
            })
            .collect();
        assert_eq!(fresh, vec![("a", 0, 2, false), ("b", 0, 2, false)]);

        let again = apply(&both(&web(2, "server")), &mut apps, &mut providers).expect("valid");
        assert!(again.results.iter().all(|r| r.action == Action::Unchanged));
        assert!(again.batch.is_empty() && again.changes.is_empty());

        let scaled = apply(&web(3, "server"), &mut apps, &mut providers).expect("valid");
        assert_eq!(
            actions(&scaled),
            vec![(Kind::App, "web", Action::Configured, 2)]
        );
        assert_eq!(
            scaled.batch.put_apps[0].workload_generation, 1,
            "same workload"
        );
        assert!(scaled.batch.events[0].message.contains("replicas 2 → 3"));
        assert!(
            scaled
                .changes
                .iter()
                .all(|c| c.replicas_after == 3 && !c.replace)
        );

        let replaced = apply(&web(3, "server2"), &mut apps, &mut providers).expect("valid");
        assert_eq!(replaced.batch.put_apps[0].generation, 3);
        assert_eq!(replaced.batch.put_apps[0].workload_generation, 3);
        assert!(
            replaced.changes.iter().all(|c| c.replace),
            "{:?}",
            replaced.changes
        );
    }

    #[test]
    fn an_invalid_document_plans_nothing() {
        let (mut apps, mut providers) = (Vec::new(), Vec::new());
        let unknown_provider = web(2, "server");
        let err = apply(&unknown_provider, &mut apps, &mut providers).expect_err("no provider a");
        assert!(matches!(err, DaemonError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("t.yaml"), "{err}");
        assert!(apps.is_empty() && providers.is_empty());
    }

    #[test]
    fn delete_refuses_a_provider_in_use_unless_its_apps_go_too() {
        let (mut apps, mut providers) = (Vec::new(), Vec::new());
        apply(
            &format!("{PROVIDERS}---{}", web(2, "server")),
            &mut apps,
            &mut providers,
        )
        .expect("valid");
        let err = plan_delete(&[(Kind::Provider, "a".into())], &apps, &providers)
            .expect_err("web places on a");
        assert!(err.to_string().contains("app(s) web"), "{err}");

        let (results, batch) = plan_delete(
            &[
                (Kind::App, "web".into()),
                (Kind::Provider, "a".into()),
                (Kind::Provider, "zz".into()),
            ],
            &apps,
            &providers,
        )
        .expect("web goes too");
        let got: Vec<(Kind, &str, Action, u64)> = results
            .iter()
            .map(|r| (r.kind, r.name.as_str(), r.action, r.generation))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::App, "web", Action::Deleted, 1),
                (Kind::Provider, "a", Action::Deleted, 1),
                (Kind::Provider, "zz", Action::NotFound, 0),
            ]
        );
        assert_eq!(batch.delete_apps, vec!["web".to_string()]);
        assert_eq!(batch.delete_providers, vec!["a".to_string()]);
        let reasons: Vec<EventReason> = batch.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons,
            vec![EventReason::AppDeleted, EventReason::ProviderDeleted]
        );
    }
}
