//! The edge's own view of upstream health: ejection on failure, return after
//! consecutive successful probes, and the prober task that runs per address.
//!
//! The routing table says which upstreams exist; this module says which of
//! them are usable right now. State is keyed by upstream address and survives
//! table changes as long as the address stays in the table.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_util::sync::CancellationToken;

use super::EdgeStats;

/// Successful probes in a row that bring an ejected upstream back.
pub(crate) const RESTORE_AFTER: u32 = 2;
/// Failures on live traffic in a row (a reset or closed connection, a 5xx, an
/// attempt overtaken by its hedge) that eject an upstream, as Envoy's outlier
/// detection does; a response-head timeout ejects at once.
pub(crate) const EJECT_AFTER_FAILURES: u32 = 3;
/// Largest HTTP probe response head read: the status line is all it needs.
const PROBE_READ_LIMIT: usize = 1024;

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
    /// Failures on live traffic since the last success (passive outlier
    /// detection). Written only when it changes, so the hot path of a healthy
    /// upstream reads it and never writes the shared cache line.
    failures: AtomicU32,
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
            failures: AtomicU32::new(0),
        }
    }

    /// Records an answer on live traffic: the failure streak ends.
    pub fn traffic_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure on live traffic. Returns true when the streak reached
    /// [`EJECT_AFTER_FAILURES`] (the caller decides whether to eject: the
    /// cap on ejections is the route's).
    pub fn traffic_failed(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER_FAILURES
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
        self.failures.store(0, Ordering::Relaxed);
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

/// What the prober probes, and what it logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeTarget {
    /// "host:port" traffic goes to.
    pub address: String,
    /// The app's HTTP health check on the upstream, when it has one: "host:port"
    /// and path. A paused host or a frozen process still completes TCP
    /// handshakes (the kernel answers), so only a request shows it is gone.
    pub http: Option<(String, String)>,
    /// An app routed to the address (for logs).
    pub app: String,
    /// The replica behind the address (for logs).
    pub replica: String,
}

/// Probes `target` every `interval` (and whenever asked), each probe bounded
/// by `timeout`, until `cancel`: a GET of the app's health path when the
/// target has one (2xx or 3xx is healthy), a TCP connect otherwise.
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
        let probe = tokio::time::timeout(timeout, probe_once(&target));
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            r = probe => r,
        };
        match outcome {
            Ok(Ok(())) => {
                if health.probe_succeeded() {
                    tracing::info!(
                        app = %target.app,
                        upstream = %target.address,
                        replica = %target.replica,
                        "upstream back in service after {RESTORE_AFTER} successful probes"
                    );
                }
            }
            Ok(Err(e)) => eject_after_probe(&target, &health, &stats, &e),
            Err(_) => eject_after_probe(&target, &health, &stats, "probe timed out"),
        }
    }
}

/// One probe: Ok when the upstream is healthy, else why not.
async fn probe_once(target: &ProbeTarget) -> Result<(), String> {
    let Some((address, path)) = &target.http else {
        return TcpStream::connect(target.address.as_str())
            .await
            .map(drop)
            .map_err(|e| e.to_string());
    };
    let mut stream = TcpStream::connect(address.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: skymirror-edge\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    // Only the status line matters; read until it is complete.
    while !head.contains(&b'\n') && head.len() < PROBE_READ_LIMIT {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match parse_status(&head) {
        Some(status) if (200..400).contains(&status) => Ok(()),
        Some(status) => Err(format!("health check {path} answered {status}")),
        None => Err(format!("health check {path}: no HTTP status line")),
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts
        .next()
        .filter(|v| v.starts_with("HTTP/1."))
        .and(parts.next())
        .and_then(|c| c.parse().ok())
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

    #[test]
    fn live_traffic_failures_in_a_row() {
        let h = Health::new();
        assert!(!h.traffic_failed());
        assert!(!h.traffic_failed());
        h.traffic_succeeded();
        assert!(!h.traffic_failed());
        assert!(!h.traffic_failed());
        assert!(h.traffic_failed(), "the third failure in a row");
        h.eject();
        assert!(!h.traffic_failed(), "an ejection starts a new streak");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx: y"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
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
