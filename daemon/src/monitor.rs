//! The liveness loop: every tick it observes each provider's agent (last
//! heartbeat, session), probes the replicas of silent providers from outside,
//! steps the pure state machine of [`crate::liveness`] and records the
//! transitions.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::liveness::{self, Liveness, Observation, ProviderLiveness, Transition};
use crate::model::{EventReason, NewEvent, now_ms};

/// Most replica addresses of one silent provider probed per tick.
pub const MAX_PROBES_PER_PROVIDER: usize = 32;

/// How long the agent of a deleted provider keeps its session to stop its
/// replicas (it gets an empty assignment) before the daemon ends it anyway.
const DELETED_PROVIDER_GRACE: Duration = Duration::from_secs(60);

/// How long a deleted provider's agent that reports no replicas has to apply
/// its empty assignment before its session ends.
const DELETED_PROVIDER_SETTLE: Duration = Duration::from_secs(5);

impl Daemon {
    /// One liveness evaluation of every provider: probe the replicas of silent
    /// providers from outside, step each state machine, record transitions.
    pub(crate) async fn liveness_pass(&self) -> Result<(), DaemonError> {
        let providers = self.store.providers()?;
        let recovery = self
            .store
            .apps()?
            .iter()
            .map(|a| a.app.spec.failover.failback_after)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let cfg = &self.config;
        let now = Instant::now();
        let snapshot = self.registry.snapshot();
        let mut to_probe: Vec<(String, Vec<String>)> = Vec::new();
        for p in &providers {
            let name = &p.provider.metadata.name;
            let view = snapshot.providers.get(name);
            let connected = view.is_some_and(|v| v.connected);
            let last = view.and_then(|v| v.seen.as_ref()).map(|s| s.last_seen);
            let silent =
                last.is_none_or(|t| now.saturating_duration_since(t) >= cfg.liveness.suspect_after);
            if silent || !connected {
                // Any one answer is enough, so a bounded sample is: what an
                // agent reported never makes the daemon probe without bound.
                let addrs = view
                    .map(|v| {
                        v.replicas
                            .values()
                            .filter(|r| !r.address.is_empty())
                            .map(|r| r.address.clone())
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .take(MAX_PROBES_PER_PROVIDER)
                            .collect()
                    })
                    .unwrap_or_default();
                to_probe.push((name.clone(), addrs));
            }
        }
        let probed = probe_all(to_probe, cfg.probe_timeout).await;

        let now = Instant::now();
        let started = self.started;
        let transitions: Vec<(String, Transition)> = self.registry.with(|entries| {
            for (name, entry) in entries.iter_mut() {
                if !providers.iter().any(|p| &p.provider.metadata.name == name) {
                    entry.view.liveness = None;
                }
            }
            let mut out = Vec::new();
            for p in &providers {
                let name = &p.provider.metadata.name;
                let entry = entries.entry(name.clone()).or_default();
                entry.view.probe = probed
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, answer)| *answer);
                let obs = Observation {
                    last_heartbeat: entry.view.seen.as_ref().map(|s| s.last_seen),
                    connected: entry.session.is_some(),
                    replicas_answer: entry.view.probe,
                    daemon_started: started,
                };
                let state = entry
                    .view
                    .liveness
                    .get_or_insert_with(|| ProviderLiveness::new(started));
                let Some(t) = liveness::step(state, &obs, now, &cfg.liveness, recovery) else {
                    continue;
                };
                let wall = now_ms();
                entry.view.liveness_since_ms = Some(wall);
                if t.held_out {
                    entry.view.held_out_until_ms =
                        wall + i64::try_from(cfg.liveness.hold_out.as_millis()).unwrap_or(0);
                }
                out.push((name.clone(), t));
            }
            out
        });

        let mut events = Vec::new();
        for (name, t) in &transitions {
            tracing::info!(provider = %name, from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "provider liveness");
            let reason = match t.to {
                Liveness::Up => EventReason::ProviderUp,
                Liveness::Suspect => EventReason::ProviderSuspect,
                Liveness::Partitioned => EventReason::ProviderPartitioned,
                Liveness::Down => EventReason::ProviderDown,
                Liveness::Recovering => EventReason::ProviderRecovering,
                Liveness::Unknown => EventReason::ProviderUnknown,
            };
            events.push(NewEvent::provider(
                reason,
                name,
                format!("provider {name} is {}: {}", t.to.as_str(), t.reason),
            ));
            if t.held_out {
                events.push(NewEvent::provider(
                    EventReason::ProviderFlapping,
                    name,
                    format!(
                        "provider {name} dropped out {} times within {}s: held out for {}s instead of moving its share back and forth",
                        cfg.liveness.flap_threshold,
                        cfg.liveness.flap_window.as_secs(),
                        cfg.liveness.hold_out.as_secs()
                    ),
                ));
            }
        }
        self.record(events);
        if !transitions.is_empty() {
            self.wake();
        }
        self.retire_deleted_providers(&providers);
        Ok(())
    }

    /// Deleted providers leave nothing behind: the session of a deleted
    /// provider's agent ends once it has stopped its replicas (it was sent an
    /// empty assignment) or after a grace, and the replicas recorded for a
    /// provider without a session are forgotten, in memory and in the store.
    fn retire_deleted_providers(&self, providers: &[crate::model::DeclaredProvider]) {
        let declared = |name: &str| providers.iter().any(|p| p.provider.metadata.name == name);
        let now = Instant::now();
        let (finished, forget) = self.registry.with(|entries| {
            let mut finished = Vec::new();
            let mut forget = Vec::new();
            for (name, entry) in entries.iter_mut() {
                if declared(name) {
                    entry.view.deleted_since = None;
                    continue;
                }
                match &entry.session {
                    Some(session) => {
                        let since = *entry.view.deleted_since.get_or_insert(now);
                        let waited = now.saturating_duration_since(since);
                        // It runs nothing, and has applied the empty
                        // assignment (or had a few seconds to).
                        let stopped = entry.view.replicas.is_empty()
                            && (entry.view.applied_revision() >= session.sent_revision
                                || waited >= DELETED_PROVIDER_SETTLE);
                        if stopped || waited >= DELETED_PROVIDER_GRACE {
                            finished.push((name.clone(), session.conn_id));
                        }
                    }
                    None if !entry.view.replicas.is_empty() => {
                        entry.view.replicas.clear();
                        forget.push(name.clone());
                    }
                    None => {}
                }
            }
            (finished, forget)
        });
        for (name, conn_id) in finished {
            let ended = self
                .registry
                .end_sessions(|p, s| p == name && s.conn_id == conn_id);
            for (p, c, agent) in ended {
                crate::logs::agent_gone(self, &p, c);
                tracing::info!(provider = %p, agent_id = %agent, "the deleted provider's agent session ended");
                self.record(vec![NewEvent::provider(
                    EventReason::ProviderDisconnected,
                    &p,
                    format!("agent {agent} disconnected: provider {p} was deleted"),
                )]);
            }
        }
        for name in forget {
            if let Err(e) = self.store.put_replicas(Some(&name), &[]) {
                tracing::warn!(provider = %name, error = %e, "cannot forget the deleted provider's replicas");
            }
            self.wake();
        }
    }

    /// Re-evaluates liveness every tick until cancelled. Time-driven changes
    /// (damping, lease expiry) also need passes, so the reconciler is woken
    /// whenever a provider is not simply up.
    pub async fn liveness_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.liveness_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.liveness_pass().await {
                tracing::error!(error = %e, "liveness pass failed");
            }
            self.watch_store();
            let unsettled = self.registry.with(|entries| {
                entries.values().any(|e| {
                    e.view
                        .liveness
                        .as_ref()
                        .is_some_and(|l| l.state != Liveness::Up)
                })
            });
            if unsettled {
                self.wake();
            }
        }
    }
}

/// Probes each provider's replica addresses with a TCP connect; a provider
/// answers if any of its replicas accepts. `None` when it has no address.
async fn probe_all(
    targets: Vec<(String, Vec<String>)>,
    timeout: Duration,
) -> Vec<(String, Option<bool>)> {
    let mut set = tokio::task::JoinSet::new();
    for (name, addrs) in targets {
        set.spawn(async move {
            if addrs.is_empty() {
                return (name, None);
            }
            let mut attempts = tokio::task::JoinSet::new();
            for a in addrs {
                attempts.spawn(async move {
                    matches!(
                        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await,
                        Ok(Ok(_))
                    )
                });
            }
            let mut any = false;
            while let Some(r) = attempts.join_next().await {
                any |= r.unwrap_or(false);
            }
            (name, Some(any))
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(x) = r {
            out.push(x);
        }
    }
    out
}
