//! End to end: a fleet of agents that lost its daemon together does not come
//! back together. Sixteen agents (process driver, no replicas) lose the
//! daemon to a `kill -9`; it restarts on the same data directory and port
//! after an outage of four seconds, and the times at which it records their
//! reconnections (`ProviderConnected`) must spread over the backoff window.
//!
//! Why the bounds tell random jitter from the old one: each wait used to be
//! the backoff (100 ms, doubling) plus `pid % 100` ms, the same offset for an
//! agent at every attempt. Agents on that schedule stay in step: after `k`
//! attempts two of them are at most `k · 99` ms apart, and when a four-second
//! outage ends (and the daemon is back within 2.3 s more) they are all at
//! their sixth attempt (6.3 s plus six offsets), so every reconnection falls
//! within 600 ms — within a few tens of milliseconds when their pids are
//! close, as here, and at once when they are all PID 1 in containers. Now
//! each wait is drawn over the whole window, half the outage's age (about
//! two seconds by then), and the reconnections spread over it. The unit
//! tests of the jitter (`skymirror_agent::random`, `session`) are the
//! primary evidence; this test shows the fleet's behaviour.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skymirror_tests::{Cluster, providers_yaml};

const AGENTS: usize = 16;
const WAIT: Duration = Duration::from_secs(30);
/// How long the daemon stays dead: long enough for the agents' backoff
/// window to grow to about two seconds.
const OUTAGE: Duration = Duration::from_secs(4);
/// Least spread of the reconnections: more than agents on the old schedule
/// can reach (see the module docs), a fraction of what the jitter gives (it
/// falls short about once in tens of thousands of runs).
const MIN_SPAN_MS: i64 = 600;
/// No slice of this length may hold more than half of the reconnections.
const CLUSTER_MS: i64 = 50;

#[test]
fn agents_reconnect_to_a_restarted_daemon_spread_over_the_backoff_window() -> Result<()> {
    let names: Vec<String> = (0..AGENTS).map(|i| format!("p{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&names))?;
    for p in &names {
        c.start_agent(p)?;
    }
    c.wait_until(&format!("{AGENTS} agents connected"), WAIT, |c| {
        let states = c.provider_states()?;
        Ok((states.len() == AGENTS && states.values().all(|s| s == "up")).then_some(()))
    })?;
    let before = c
        .events()?
        .last()
        .and_then(|e| e["seq"].as_u64())
        .context("no events")?;

    c.kill_daemon()?;
    // The outage itself, not a wait for a condition: the agents retry
    // meanwhile, and their backoff window grows.
    std::thread::sleep(OUTAGE);
    c.start_daemon()?;

    let reconnected = c.wait_until(&format!("{AGENTS} agents to reconnect"), WAIT, |c| {
        // Each provider's first connection after the restart, by time.
        let mut first: BTreeMap<String, i64> = BTreeMap::new();
        for e in c.events()? {
            if e["reason"] == "ProviderConnected" && e["seq"].as_u64().unwrap_or(0) > before {
                let provider = e["provider"].as_str().unwrap_or_default().to_string();
                let at = e["timeMs"].as_i64().context("an event without timeMs")?;
                first.entry(provider).or_insert(at);
            }
        }
        Ok((first.len() == AGENTS).then_some(first))
    })?;

    let mut times: Vec<i64> = reconnected.values().copied().collect();
    times.sort_unstable();
    let offsets: Vec<i64> = times.iter().map(|t| t - times[0]).collect();
    let span = offsets.last().copied().unwrap_or(0);
    println!("reconnections, ms after the first: {offsets:?}");
    ensure!(
        span >= MIN_SPAN_MS,
        "the agents reconnected within {span} ms of each other (at least {MIN_SPAN_MS} ms \
         expected from jitter over the backoff window): {offsets:?}"
    );
    let crowded = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| (*t..*t + CLUSTER_MS).contains(*u))
                .count()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        crowded <= AGENTS / 2,
        "{crowded} of {AGENTS} agents reconnected within {CLUSTER_MS} ms: {offsets:?}"
    );
    Ok(())
}
