//! When to hedge: the delay after which an idempotent request that has not
//! been answered is also sent to another provider, learned from the route's
//! recent latency, and the budget that keeps hedges a small share of traffic.
//!
//! Both are lock-free and shared by the workers that serve a route; both are
//! estimates, so a lost update under a race costs nothing but precision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Shortest hedge delay: below it, ordinary jitter (a scheduler tick, a
/// busy core) would double traffic for nothing.
pub(crate) const HEDGE_MIN: Duration = Duration::from_millis(25);
/// Longest hedge delay, so a request to a frozen upstream is answered by
/// another well within a second, however slow the route usually is.
pub(crate) const HEDGE_MAX: Duration = Duration::from_millis(500);
/// Hedges allowed per request, in tenths: one hedge per ten requests.
const BUDGET_PER_REQUEST: u64 = 1;
/// What one hedge costs (see [`BUDGET_PER_REQUEST`]).
const HEDGE_COST: u64 = 10;
/// Hedges that may be spent at once from a full budget: enough for the
/// requests in flight on a provider that froze, before it is ejected.
const BUDGET_BURST: u64 = 50;

/// A high-percentile estimate of response-head latency, as TCP estimates its
/// retransmission timeout (RFC 6298): a smoothed mean plus four times the
/// smoothed mean deviation.
#[derive(Debug, Default)]
pub(crate) struct LatencyEstimate {
    /// Smoothed latency in microseconds; 0 before the first sample.
    mean_us: AtomicU64,
    /// Smoothed mean deviation in microseconds.
    deviation_us: AtomicU64,
}

impl LatencyEstimate {
    /// Takes in the time one attempt waited for its response head.
    pub fn observe(&self, sample: Duration) {
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX);
        let mean = self.mean_us.load(Ordering::Relaxed);
        if mean == 0 {
            self.mean_us.store(sample.max(1), Ordering::Relaxed);
            self.deviation_us.store(sample / 2, Ordering::Relaxed);
            return;
        }
        let deviation = self.deviation_us.load(Ordering::Relaxed);
        let new_deviation = (3 * deviation + mean.abs_diff(sample)) / 4;
        let new_mean = ((7 * mean + sample) / 8).max(1);
        // Stores only when the value moves: a steady route does not write.
        if new_deviation != deviation {
            self.deviation_us.store(new_deviation, Ordering::Relaxed);
        }
        if new_mean != mean {
            self.mean_us.store(new_mean, Ordering::Relaxed);
        }
    }

    /// The hedge delay: mean plus four deviations, within
    /// [`HEDGE_MIN`]..=[`HEDGE_MAX`]; [`HEDGE_MAX`] before any sample.
    pub fn hedge_delay(&self) -> Duration {
        let mean = self.mean_us.load(Ordering::Relaxed);
        if mean == 0 {
            return HEDGE_MAX;
        }
        let deviation = self.deviation_us.load(Ordering::Relaxed);
        Duration::from_micros(mean.saturating_add(deviation.saturating_mul(4)))
            .clamp(HEDGE_MIN, HEDGE_MAX)
    }
}

/// Keeps hedges to about a tenth of a route's requests, with a burst, so a
/// route whose every replica is slow is not sent twice its traffic.
#[derive(Debug)]
pub(crate) struct HedgeBudget {
    /// In tenths of a hedge; starts full.
    tokens: AtomicU64,
}

impl Default for HedgeBudget {
    fn default() -> Self {
        Self {
            tokens: AtomicU64::new(BUDGET_BURST * HEDGE_COST),
        }
    }
}

impl HedgeBudget {
    /// Credits one request.
    pub fn deposit(&self) {
        // A full budget (the usual case) is only read.
        if self.tokens.load(Ordering::Relaxed) < BUDGET_BURST * HEDGE_COST {
            self.tokens.fetch_add(BUDGET_PER_REQUEST, Ordering::Relaxed);
        }
    }

    /// Takes one hedge from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(HEDGE_COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_follows_latency_within_bounds() {
        let e = LatencyEstimate::default();
        assert_eq!(e.hedge_delay(), HEDGE_MAX, "nothing learned yet");
        for _ in 0..50 {
            e.observe(Duration::from_micros(300));
        }
        assert_eq!(
            e.hedge_delay(),
            HEDGE_MIN,
            "a fast route hedges at the floor"
        );
        for _ in 0..50 {
            e.observe(ms(60));
        }
        let d = e.hedge_delay();
        assert!(d >= ms(60) && d < ms(120), "{d:?}");
        // Jitter widens the delay: alternating 40 and 80 ms.
        for i in 0..100 {
            e.observe(if i % 2 == 0 { ms(40) } else { ms(80) });
        }
        let d = e.hedge_delay();
        assert!(d > ms(100) && d < ms(200), "{d:?}");
        for _ in 0..50 {
            e.observe(Duration::from_secs(5));
        }
        assert_eq!(
            e.hedge_delay(),
            HEDGE_MAX,
            "a slow route hedges at the ceiling"
        );
    }

    #[test]
    fn budget_allows_a_burst_then_a_tenth() {
        let b = HedgeBudget::default();
        let burst = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(burst, 50);
        let mut hedged = 0;
        for _ in 0..1000 {
            b.deposit();
            hedged += usize::from(b.withdraw());
        }
        assert_eq!(hedged, 100);
        for _ in 0..10_000 {
            b.deposit();
        }
        let burst = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(burst, 50, "the budget refills only up to its burst");
    }
}
