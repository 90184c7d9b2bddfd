//! The reconcile pass's effects and its loop. [`Daemon::reconcile`] reads the
//! stored state and one registry snapshot, lets [`crate::pass::plan`] decide,
//! then commits the changed assignments with their events (durably, off the
//! runtime), sends each connected agent the assignment it has not seen,
//! publishes the routing table and records the schedule in force.
//!
//! Invariant: one pass runs at a time (a single task owns the loop).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::DeclaredApp;
use crate::pass::{self, PassInput};
use crate::registry::{AssignmentMessage, lock};
use crate::store::Batch;

/// Shortest time between two reconcile passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(50);

/// Reconcile timings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileStats {
    /// Passes run.
    pub passes: u64,
    /// Last pass.
    pub last: Duration,
    /// Sum of all passes.
    pub total: Duration,
    /// Longest pass.
    pub max: Duration,
}

/// What the reconciler keeps between passes.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Wakes the loop for a pass soon.
    wake: Notify,
    /// Capacity shortfalls already reported, so a pass does not repeat the
    /// same event: app → (wanted, placed).
    shortfalls: Mutex<BTreeMap<String, (u32, u32)>>,
    /// Timings.
    stats: Mutex<ReconcileStats>,
}

impl Reconciler {
    /// Asks for a pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Timings so far.
    pub fn stats(&self) -> ReconcileStats {
        lock(&self.stats).clone()
    }
}

impl Daemon {
    /// One reconcile pass: plan from one snapshot, then commit, send, publish.
    pub async fn reconcile(&self) -> Result<(), DaemonError> {
        let started = std::time::Instant::now();
        let apps = self.store.apps()?;
        let providers = self.store.providers()?;
        let stored = self.store.assignments()?;
        let controls = self.store.controls()?;
        let snapshot = self.registry.snapshot();
        let reported = lock(&self.reconciler.shortfalls).clone();
        let plan = pass::plan(&PassInput {
            apps: &apps,
            providers: &providers,
            assignments: &stored,
            controls: &controls,
            snapshot: &snapshot,
            now: Instant::now(),
            timing: self.lease_timing(),
            reported_shortfalls: &reported,
        });

        if !plan.changed.is_empty() || !plan.events.is_empty() {
            let events = self
                .commit_quietly(Batch {
                    put_assignments: plan.changed,
                    events: plan.events,
                    ..Batch::default()
                })
                .await?;
            self.publish(&events);
        }
        *lock(&self.reconciler.shortfalls) = plan.shortfalls;

        let apps_by_name: BTreeMap<&str, &DeclaredApp> = apps
            .iter()
            .map(|a| (a.app.metadata.name.as_str(), a))
            .collect();
        // Messages are built only for sessions that have not seen the
        // revision: most passes send nothing.
        self.registry
            .send_assignments(&plan.assignments, |provider, a| {
                Arc::new(AssignmentMessage {
                    assignment: a.clone(),
                    apps: a
                        .apps
                        .iter()
                        .filter_map(|x| apps_by_name.get(x.app.as_str()))
                        .map(|d| (d.app.metadata.name.clone(), (*d).clone()))
                        .collect(),
                    provider: providers
                        .iter()
                        .find(|p| p.provider.metadata.name == provider)
                        .cloned(),
                    identity: self.identity.clone(),
                })
            });

        self.routes.send_if_modified(|table| {
            if table.routes == plan.routes {
                return false;
            }
            table.routes = plan.routes;
            table.revision += 1;
            true
        });
        *lock(&self.in_force) = Arc::new(plan.schedule);

        let took = started.elapsed();
        let mut stats = lock(&self.reconciler.stats);
        stats.passes += 1;
        stats.last = took;
        stats.total += took;
        stats.max = stats.max.max(took);
        Ok(())
    }

    /// Reconcile timings so far.
    pub fn stats(&self) -> ReconcileStats {
        self.reconciler.stats()
    }

    /// Runs reconcile passes when woken and on every resync interval until cancelled.
    pub async fn reconcile_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let began = Instant::now();
            let span = tracing::debug_span!("reconcile");
            match tracing::Instrument::instrument(self.reconcile(), span).await {
                Ok(()) => {}
                // Said once, when the store became unwritable; the pass is
                // retried on every wake-up until it can write again.
                Err(DaemonError::Store(crate::store::StoreError::Unwritable(e))) => {
                    tracing::debug!(error = %e, "reconcile pass waits for the store");
                }
                Err(e) => tracing::error!(error = %e, "reconcile pass failed"),
            }
            let ended = Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.reconciler.wake.notified() => {}
                _ = tokio::time::sleep(self.config.resync_interval) => {}
            }
            // Coalesce bursts (hundreds of status reports while replicas start):
            // at most one pass per interval, wake-ups meanwhile folding into the
            // next. A wake-up after a quiet spell (an apply) runs at once; a
            // pass that took the whole interval still leaves a gap.
            let next = (began + MIN_PASS_INTERVAL).max(ended + MIN_PASS_INTERVAL / 5);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }
}
