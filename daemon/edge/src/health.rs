//! The edge's own view of upstream health: ejection on failure, return after
//! consecutive successful probes, and the prober task that runs per address.
//!
//! The routing table says which upstreams exist; this module says which of
//! them are usable right now. State is keyed by upstream address and survives
//! table changes as long as the address stays in the table.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_util::sync::CancellationToken;

use super::EdgeStats;

/// Successful probes in a row that bring an ejected upstream back.
pub(crate) const RESTORE_AFTER: u32 = 2;

/// Health of one upstream address.
#[derive(Debug)]
pub(crate) struct Health {
    /// Read on every pick (the hot path), hence an atomic beside the mutex.
    usable: AtomicBool,
    /// Successful probes in a row since the last failure, counted while
    /// ejected. Behind a mutex so a failure and a success cannot interleave
    /// into a wrong restore.
    streak: Mutex<u32>,
    /// Woken on every usable → ejected transition, so requests waiting on the
    /// upstream (a black-holed connection) can give up and retry elsewhere.
    ejected: Notify,
    /// Asks the prober for a probe now rather than at the next interval.
    probe_now: Notify,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A new upstream is usable until something fails: the first probe runs
    /// at once, and a fresh edge must not wait a probe interval to serve.
    pub fn new() -> Self {
        Self {
            usable: AtomicBool::new(true),
            streak: Mutex::new(0),
            ejected: Notify::new(),
            probe_now: Notify::new(),
        }
    }

    /// Whether traffic may go to the upstream.
    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// Ejects the upstream (a failed connect or probe). Returns true if it was
    /// usable until now. Resets the success streak either way.
    pub fn eject(&self) -> bool {
        let mut streak = self
            .streak
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *streak = 0;
        let was_usable = self.usable.swap(false, Ordering::Relaxed);
        if was_usable {
            self.ejected.notify_waiters();
        }
        was_usable
    }

    /// Records a successful probe. Returns true if this brought the upstream
    /// back into service.
    pub fn probe_succeeded(&self) -> bool {
        let mut streak = self
            .streak
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.usable.load(Ordering::Relaxed) {
            *streak = 0;
            return false;
        }
        *streak += 1;
        if *streak >= RESTORE_AFTER {
            *streak = 0;
            self.usable.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Completes at the next ejection. Call `enable` on it before the work it
    /// guards so an ejection in between is not missed.
    pub fn ejected(&self) -> Notified<'_> {
        self.ejected.notified()
    }

    /// Asks for an immediate probe (a request saw the upstream misbehave).
    pub fn probe_soon(&self) {
        self.probe_now.notify_one();
    }
}

/// What the prober logs about the address it probes.
#[derive(Debug, Clone)]
pub(crate) struct ProbeTarget {
    /// "host:port" to connect to.
    pub address: String,
    /// An app routed to the address (for logs).
    pub app: String,
    /// The replica behind the address (for logs).
    pub replica: String,
}

/// Probes `target` by TCP connect every `interval` (and whenever asked), each
/// probe bounded by `timeout`, until `cancel`.
pub(crate) async fn probe_loop(
    target: ProbeTarget,
    health: std::sync::Arc<Health>,
    interval: Duration,
    timeout: Duration,
    stats: std::sync::Arc<EdgeStats>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
            () = health.probe_now.notified() => {}
        }
        let probe = tokio::time::timeout(timeout, TcpStream::connect(target.address.as_str()));
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            r = probe => r,
        };
        match outcome {
            Ok(Ok(_stream)) => {
                if health.probe_succeeded() {
                    tracing::info!(
                        app = %target.app,
                        upstream = %target.address,
                        replica = %target.replica,
                        "upstream back in service after {RESTORE_AFTER} successful probes"
                    );
                }
            }
            Ok(Err(e)) => eject_after_probe(&target, &health, &stats, &e.to_string()),
            Err(_) => eject_after_probe(&target, &health, &stats, "connect timed out"),
        }
    }
}

fn eject_after_probe(target: &ProbeTarget, health: &Health, stats: &EdgeStats, error: &str) {
    if health.eject() {
        stats.count_ejection();
        tracing::warn!(
            app = %target.app,
            upstream = %target.address,
            replica = %target.replica,
            error,
            "upstream ejected: probe failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_and_restore_after_two_probes() {
        let h = Health::new();
        assert!(h.is_usable());
        assert!(!h.probe_succeeded(), "a usable upstream stays as it is");
        assert!(h.eject());
        assert!(!h.eject(), "only the first ejection is a transition");
        assert!(!h.is_usable());
        assert!(!h.probe_succeeded());
        assert!(!h.is_usable());
        assert!(h.probe_succeeded());
        assert!(h.is_usable());
    }

    #[test]
    fn a_failure_resets_the_streak() {
        let h = Health::new();
        h.eject();
        assert!(!h.probe_succeeded());
        h.eject();
        assert!(!h.probe_succeeded());
        assert!(!h.is_usable());
        assert!(h.probe_succeeded());
    }

    #[tokio::test]
    async fn ejection_wakes_waiters() {
        let h = Health::new();
        let waiter = h.ejected();
        tokio::pin!(waiter);
        waiter.as_mut().enable();
        h.eject();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken by the ejection");
    }
}
