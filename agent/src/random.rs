//! Randomness from the operating system's CSPRNG (`getrandom`): the agent's
//! id and every jitter come from it, never from a clock or a pid. Agents
//! started together, in containers where each one is PID 1, would otherwise
//! share their "random" delays and reconnect to a restarted daemon in the
//! same millisecond.
//!
//! When the OS cannot give randomness the caller gets [`NoRandomness`]; the
//! agent stops with it rather than run on predictable values.

use std::time::Duration;

/// The operating system could not give random bytes. Not retryable: the
/// agent stops.
#[derive(Debug, thiserror::Error)]
#[error("the operating system gave no randomness: {0}")]
pub struct NoRandomness(#[source] getrandom::Error);

/// A random (version 4) UUID in its usual text form.
pub fn uuid_v4() -> Result<String, NoRandomness> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(NoRandomness)?;
    // RFC 9562: version 4 in the high nibble of byte 6, variant 0b10 in byte 8.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

/// A uniform random number in `0..bound` (0 when `bound` is 0), without the
/// bias of a plain modulo: draws from the incomplete last stretch of `u64`
/// are thrown away (fewer than one in two on average).
fn below(bound: u64) -> Result<u64, NoRandomness> {
    if bound == 0 {
        return Ok(0);
    }
    let limit = (u64::MAX / bound) * bound;
    loop {
        let x = getrandom::u64().map_err(NoRandomness)?;
        if x < limit {
            return Ok(x % bound);
        }
    }
}

/// "Full jitter" (AWS's *Exponential Backoff and Jitter*): a uniform random
/// delay between zero and `window`, both included, to the nanosecond. A
/// fleet retrying on the same schedule then spreads over the whole window
/// instead of arriving together.
pub fn full_jitter(window: Duration) -> Result<Duration, NoRandomness> {
    let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    Ok(Duration::from_nanos(below(nanos.saturating_add(1))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_spreads_uniformly_over_the_window() -> Result<(), NoRandomness> {
        const DRAWS: usize = 2000;
        const BUCKETS: usize = 10;
        let window = Duration::from_secs(1);
        let mut draws = Vec::with_capacity(DRAWS);
        for _ in 0..DRAWS {
            let d = full_jitter(window)?;
            assert!(d <= window, "{d:?} is outside the window");
            draws.push(d);
        }
        // Every tenth of the window gets about a tenth of the draws (200 each;
        // the standard deviation is about 13, so 120..280 is six of them).
        let mut counts = [0usize; BUCKETS];
        for d in &draws {
            let bucket = (d.as_secs_f64() * BUCKETS as f64) as usize;
            counts[bucket.min(BUCKETS - 1)] += 1;
        }
        for (i, n) in counts.iter().enumerate() {
            assert!((120..=280).contains(n), "bucket {i} got {n}: {counts:?}");
        }
        // Not a handful of repeated values: nanosecond draws hardly ever collide.
        draws.sort();
        draws.dedup();
        assert!(
            draws.len() > DRAWS - 5,
            "only {} distinct draws",
            draws.len()
        );
        let mean = draws.iter().map(Duration::as_secs_f64).sum::<f64>() / draws.len() as f64;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
        Ok(())
    }

    #[test]
    fn full_jitter_of_nothing_is_nothing() -> Result<(), NoRandomness> {
        assert_eq!(full_jitter(Duration::ZERO)?, Duration::ZERO);
        let tiny = Duration::from_nanos(1);
        for _ in 0..100 {
            assert!(full_jitter(tiny)? <= tiny);
        }
        Ok(())
    }

    #[test]
    fn below_stays_below_its_bound() -> Result<(), NoRandomness> {
        for bound in [1, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..50 {
                assert!(below(bound)? < bound);
            }
        }
        Ok(())
    }

    #[test]
    fn uuids_are_version_4_and_differ() -> Result<(), NoRandomness> {
        let a = uuid_v4()?;
        let b = uuid_v4()?;
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{a}"
        );
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{a}");
        assert!(parts[2].starts_with('4'), "version: {a}");
        assert!(
            matches!(parts[3].chars().next(), Some('8' | '9' | 'a' | 'b')),
            "variant: {a}"
        );
        Ok(())
    }
}
