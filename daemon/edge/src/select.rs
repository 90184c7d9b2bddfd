//! Upstream selection: which upstream of a route gets the next attempt of a
//! request or connection.
//!
//! Pure: no I/O, no clock, no shared state. Usability (the health view) is
//! passed in by the caller as a function, so the same code serves the proxy and
//! the unit tests.

/// One upstream as the selector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Routing tier: only the highest tier with a usable upstream serves.
    pub tier: i32,
    /// Share of traffic within its tier.
    pub weight: u32,
    /// The provider, interned per route; retries prefer another provider.
    pub provider: u32,
}

/// Chooses upstreams for one route.
///
/// **Ranking.** Every upstream not tried yet for the request gets the key
/// `(usable, on a provider not tried yet, tier)`, compared in that order; the
/// attempt goes to the group with the greatest key. On a first attempt nothing
/// was tried, so this is "the highest tier with a usable upstream"; when no
/// upstream is usable the group is the highest tier of all (an attempt rather
/// than a certain 502), and each retry moves on in tier order. On a retry an
/// upstream on a provider that has not failed this request beats a higher
/// tier: the failure most likely means the provider is dying, and a standby
/// answering one retry is better than a second failure on the same provider.
///
/// **Balancing.** Weighted round-robin without shared mutable state: the caller
/// passes a ticket (a per-route counter) and the ticket is mapped onto
/// `[0, total weight)` by a Weyl sequence (the ticket times the 64-bit golden
/// ratio). Consecutive tickets land far apart, so with weights 3:1 the
/// sequence interleaves instead of running in blocks, and with weights of 100
/// each it alternates instead of sending 100 requests in a row to one replica;
/// over any window the shares converge on the weights. This was chosen over
/// power-of-two-choices because it needs no in-flight counters updated on
/// every request (two atomic writes on shared cache lines) and it is
/// deterministic, so the shares can be tested exactly; the upstreams of a
/// route are replicas of one app, for which load-aware balancing buys little.
///
/// Weight 0 gives an upstream no share while its group has an upstream of
/// positive weight; a group whose weights are all 0 is balanced evenly.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    candidates: Vec<Candidate>,
}

/// Key of a candidate; greater is better.
type Rank = (bool, bool, i32);

impl Selector {
    /// A selector over `candidates`; indices returned by [`Selector::pick`]
    /// are positions in this vector.
    pub fn new(candidates: Vec<Candidate>) -> Self {
        Self { candidates }
    }

    /// The candidate at `index`.
    pub fn candidate(&self, index: usize) -> Option<&Candidate> {
        self.candidates.get(index)
    }

    /// The upstream for the next attempt, or `None` when every upstream was
    /// tried already. `usable(i)` says whether upstream `i` is not ejected;
    /// `tried` lists the upstreams that already failed this request.
    pub fn pick(
        &self,
        ticket: u64,
        usable: impl Fn(usize) -> bool,
        tried: &[usize],
    ) -> Option<usize> {
        let rank = |i: usize| -> Option<Rank> {
            if tried.contains(&i) {
                return None;
            }
            let c = &self.candidates[i];
            let fresh = !tried.iter().any(|&t| {
                self.candidates
                    .get(t)
                    .is_some_and(|p| p.provider == c.provider)
            });
            Some((usable(i), fresh, c.tier))
        };
        let best = (0..self.candidates.len()).filter_map(rank).max()?;
        let in_group = |i: &usize| rank(*i) == Some(best);

        let (mut total, mut members) = (0u64, 0u64);
        for i in (0..self.candidates.len()).filter(in_group) {
            total += u64::from(self.candidates[i].weight);
            members += 1;
        }
        let even = total == 0;
        if even {
            total = members;
        }
        let target = spread(ticket, total);
        let mut acc = 0u64;
        let mut last = None;
        for i in (0..self.candidates.len()).filter(in_group) {
            let w = if even {
                1
            } else {
                u64::from(self.candidates[i].weight)
            };
            acc += w;
            if w > 0 {
                last = Some(i);
                if target < acc {
                    return Some(i);
                }
            }
        }
        // Only reached when usability changed between the passes (another
        // task ejected or restored an upstream meanwhile): any member will do.
        last.or_else(|| (0..self.candidates.len()).find(|i| rank(*i).is_some()))
    }
}

/// Maps a ticket onto `[0, total)`, consecutive tickets far apart (a Weyl
/// sequence with the golden ratio, scaled by a 64×64→128-bit multiply).
fn spread(ticket: u64, total: u64) -> u64 {
    let x = ticket.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(x) * u128::from(total)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(tier: i32, weight: u32, provider: u32) -> Candidate {
        Candidate {
            tier,
            weight,
            provider,
        }
    }

    fn counts(s: &Selector, n: u64, usable: impl Fn(usize) -> bool + Copy) -> Vec<u64> {
        let mut out = vec![0; s.candidates.len()];
        for t in 0..n {
            if let Some(i) = s.pick(t, usable, &[]) {
                out[i] += 1;
            }
        }
        out
    }

    #[test]
    fn only_the_highest_usable_tier_serves() {
        let s = Selector::new(vec![c(0, 1, 0), c(2, 1, 1), c(1, 1, 2), c(2, 1, 3)]);
        let n = counts(&s, 1000, |_| true);
        assert_eq!(n[0] + n[2], 0);
        assert_eq!(n[1] + n[3], 1000);
        assert!(n[1].abs_diff(n[3]) <= 2, "{n:?}");

        // Tier 2 entirely ejected: tier 1 takes over, tier 0 stays idle.
        let n = counts(&s, 100, |i| i != 1 && i != 3);
        assert_eq!(n, vec![0, 0, 100, 0]);
    }

    #[test]
    fn shares_follow_weights_and_interleave() {
        let s = Selector::new(vec![c(0, 3, 0), c(0, 1, 1)]);
        let n = counts(&s, 4000, |_| true);
        assert!(n[0].abs_diff(3000) <= 4, "{n:?}");
        // Equal large weights alternate rather than running in blocks.
        let s = Selector::new(vec![c(0, 100, 0), c(0, 100, 1)]);
        let seq: Vec<usize> = (0..20).filter_map(|t| s.pick(t, |_| true, &[])).collect();
        let longest_run = seq
            .chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest_run <= 3, "{seq:?}");
    }

    #[test]
    fn zero_weights() {
        // A zero weight gets nothing while a positive one exists...
        let s = Selector::new(vec![c(0, 0, 0), c(0, 5, 1)]);
        assert_eq!(counts(&s, 100, |_| true), vec![0, 100]);
        // ... but is still a retry target, and all-zero groups split evenly.
        assert_eq!(s.pick(7, |_| true, &[1]), Some(0));
        let s = Selector::new(vec![c(0, 0, 0), c(0, 0, 1)]);
        let n = counts(&s, 1000, |_| true);
        assert!(n[0].abs_diff(500) <= 2, "{n:?}");
    }

    #[test]
    fn ejected_upstreams_are_skipped() {
        let s = Selector::new(vec![c(0, 1, 0), c(0, 1, 0), c(0, 1, 1)]);
        let n = counts(&s, 300, |i| i != 1);
        assert_eq!(n[1], 0);
        assert_eq!(n[0] + n[2], 300);
        assert!(n[0].abs_diff(150) <= 2, "{n:?}");
    }

    #[test]
    fn retry_prefers_another_provider() {
        // Upstreams 0 and 1 on provider 0, 2 on provider 1, all tier 0.
        let s = Selector::new(vec![c(0, 1, 0), c(0, 1, 0), c(0, 1, 1)]);
        for t in 0..50 {
            assert_eq!(s.pick(t, |_| true, &[0]), Some(2));
        }
        // Even over a higher tier on the failing provider.
        let s = Selector::new(vec![c(5, 1, 0), c(5, 1, 0), c(1, 1, 1)]);
        assert_eq!(s.pick(3, |_| true, &[0]), Some(2));
        // When the other provider failed too, the rest of the first one remains.
        assert_eq!(s.pick(3, |_| true, &[0, 2]), Some(1));
        // A usable upstream on the failed provider beats an ejected one elsewhere.
        assert_eq!(s.pick(3, |i| i != 2, &[0]), Some(1));
        // Everything tried: nothing left.
        assert_eq!(s.pick(3, |_| true, &[0, 1, 2]), None);
    }

    #[test]
    fn all_ejected_falls_back_in_tier_order() {
        let s = Selector::new(vec![c(1, 1, 0), c(3, 1, 1), c(2, 1, 2)]);
        let none = |_| false;
        assert_eq!(s.pick(0, none, &[]), Some(1));
        assert_eq!(s.pick(0, none, &[1]), Some(2));
        assert_eq!(s.pick(0, none, &[1, 2]), Some(0));
        assert_eq!(s.pick(0, none, &[1, 2, 0]), None);
        // One usable upstream anywhere wins over the fallback.
        assert_eq!(s.pick(0, |i| i == 0, &[]), Some(0));
    }

    #[test]
    fn empty_route_has_no_pick() {
        assert_eq!(Selector::default().pick(0, |_| true, &[]), None);
    }
}
