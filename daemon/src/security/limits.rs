//! Rates: token buckets that bound what one source (an agent's provider, a
//! peer address) can make the daemon record or log.
//!
//! A [`Bucket`] holds up to `burst` tokens and gains `per_second` of them
//! every second; taking more than it holds is refused. A [`RateLimiter`]
//! keeps one bucket per source (at most [`MAX_SOURCES`], idle ones forgotten
//! first) and counts what it refused, so the caller can say so once the
//! source is admitted again. Time is tokio's, so tests can pause it.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::registry::lock;

/// Sources a limiter remembers; beyond this, full (idle) buckets are
/// forgotten first.
pub const MAX_SOURCES: usize = 10_000;

/// A rate: bursts of `burst`, `per_second` on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Most taken at once after a quiet spell.
    pub burst: u32,
    /// Tokens regained per second.
    pub per_second: f64,
}

/// Events derived from what one provider's agent reports (replica
/// transitions): a provider starting a thousand replicas fits the burst, and
/// flushing the 10,000-event log takes one agent over a quarter of an hour.
pub const AGENT_EVENTS: Rate = Rate {
    burst: 2000,
    per_second: 10.0,
};

/// Refusals recorded as events and logged, per peer address: a client that
/// retries a bad token in a loop is counted, not written down each time.
pub const REFUSALS: Rate = Rate {
    burst: 20,
    per_second: 0.5,
};

/// Heartbeats and status reports one agent session may send: an agent sends
/// two heartbeats a second and coalesces its reports; one that sends more
/// than this for long is flooding, and its session is ended.
pub const AGENT_MESSAGES: Rate = Rate {
    burst: 400,
    per_second: 50.0,
};

/// A token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * self.rate.per_second;
        self.tokens = (self.tokens + gained).min(f64::from(self.rate.burst));
        self.last = now;
    }

    /// Takes up to `n` tokens at `now`; returns how many it could.
    pub fn take_up_to(&mut self, n: usize, now: Instant) -> usize {
        self.refill(now);
        // Whole tokens only: the bucket never goes negative.
        let available = self.tokens.floor().max(0.0);
        let taken = (n as f64).min(available);
        self.tokens -= taken;
        taken as usize
    }

    /// Takes one token at `now`, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_up_to(1, now) == 1
    }

    /// Whether the bucket is full at `now` (its source has been quiet).
    fn is_full(&self, now: Instant) -> bool {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * self.rate.per_second;
        self.tokens + gained >= f64::from(self.rate.burst)
    }
}

/// What a limiter let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// How many of the items asked for may go ahead (the first ones).
    pub allowed: usize,
    /// Items of this source refused since the last time some were allowed.
    pub dropped_before: u64,
}

/// One bucket per source.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    /// Bucket and refusals not yet reported, per source.
    sources: Mutex<HashMap<String, (Bucket, u64)>>,
}

impl RateLimiter {
    /// A limiter at `rate` per source.
    pub fn new(rate: Rate) -> Self {
        RateLimiter {
            rate,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Admits up to `n` items of `source` at `now`.
    pub fn admit(&self, source: &str, n: usize, now: Instant) -> Admitted {
        let mut sources = lock(&self.sources);
        if !sources.contains_key(source) && sources.len() >= MAX_SOURCES {
            let idle: Vec<String> = sources
                .iter()
                .filter(|(_, (b, dropped))| *dropped == 0 && b.is_full(now))
                .map(|(k, _)| k.clone())
                .take(MAX_SOURCES / 10)
                .collect();
            if idle.is_empty() {
                // Every source is busy: forget one at random rather than grow.
                if let Some(k) = sources.keys().next().cloned() {
                    sources.remove(&k);
                }
            }
            for k in idle {
                sources.remove(&k);
            }
        }
        let (bucket, dropped) = sources
            .entry(source.to_string())
            .or_insert_with(|| (Bucket::new(self.rate, now), 0));
        let allowed = bucket.take_up_to(n, now);
        let refused_now = (n - allowed) as u64;
        let dropped_before = if allowed > 0 {
            std::mem::replace(dropped, refused_now)
        } else {
            *dropped += refused_now;
            0
        };
        Admitted {
            allowed,
            dropped_before,
        }
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        lock(&self.sources).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RATE: Rate = Rate {
        burst: 10,
        per_second: 2.0,
    };

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        assert_eq!(b.take_up_to(25, t0), 10);
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(400)));
        assert!(b.take(t0 + Duration::from_millis(500)));
        // Never more than the burst, however long the pause.
        assert_eq!(b.take_up_to(100, t0 + Duration::from_secs(3600)), 10);
    }

    #[test]
    fn a_limiter_keeps_sources_apart_and_reports_what_it_dropped() {
        let t0 = Instant::now();
        let l = RateLimiter::new(RATE);
        assert_eq!(
            l.admit("flood", 15, t0),
            Admitted {
                allowed: 10,
                dropped_before: 0
            }
        );
        assert_eq!(l.admit("flood", 3, t0).allowed, 0);
        // Another source is not affected.
        assert_eq!(l.admit("quiet", 1, t0).allowed, 1);
        // Once admitted again, the refusals since are reported, once.
        let later = l.admit("flood", 1, t0 + Duration::from_secs(1));
        assert_eq!(
            later,
            Admitted {
                allowed: 1,
                dropped_before: 8
            }
        );
        assert_eq!(
            l.admit("flood", 1, t0 + Duration::from_secs(1))
                .dropped_before,
            0
        );
    }

    #[test]
    fn a_limiter_remembers_a_bounded_number_of_sources() {
        let t0 = Instant::now();
        let l = RateLimiter::new(RATE);
        for i in 0..MAX_SOURCES + 50 {
            l.admit(&format!("peer-{i}"), 1, t0);
        }
        assert!(l.sources() <= MAX_SOURCES, "{}", l.sources());
    }
}
