//! End to end through the front door (`skymirror edge`) under steady HTTP
//! load: a provider outage, a control-plane partition and a daemon crash must
//! cost no idempotent request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use skymirror_tests::{Cluster, Load, LoadReport, cluster_behind_front_door, http_get_headers};

const WAIT: Duration = Duration::from_secs(30);
/// One request every 5 ms, each on a fresh connection (~150 requests/s here).
const PACE: Duration = Duration::from_millis(5);

/// Three providers, the app on all of them, a front door in front.
fn setup() -> Result<(Cluster, SocketAddr)> {
    cluster_behind_front_door(WAIT)
}

fn wait_counts(c: &mut Cluster, want: &[(&str, usize)]) -> Result<()> {
    c.wait_counts("web", want, WAIT)
}

fn no_failures(report: &LoadReport) -> Result<()> {
    ensure!(
        report.sent > 100,
        "the load sent only {} requests",
        report.sent
    );
    ensure!(
        report.failed == 0,
        "{} of {} requests failed: {:?}",
        report.failed,
        report.sent,
        report.failures.iter().take(10).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn a_provider_outage_and_its_return_cost_no_request() -> Result<()> {
    let (mut c, front) = setup()?;
    let load = Load::start(front, PACE);
    let started = Instant::now();

    c.kill_agent("aa")?;
    c.kill_replicas("aa")?;
    let killed_at = started.elapsed();
    wait_counts(&mut c, &[("bb", 3), ("cc", 3)])?;
    let returned_at = started.elapsed();
    c.start_agent("aa")?;
    wait_counts(&mut c, &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    // Keep the load on a little after the fail-back settled.
    c.wait_until("traffic to reach aa again", WAIT, |_| {
        let (_, h, _) = http_get_headers(&front.to_string(), "/", Duration::from_secs(1))?;
        Ok(h.get("x-skymirror-replica")
            .filter(|r| r.starts_with("web/aa/"))
            .map(|_| ()))
    })?;
    let report = load.finish()?;
    no_failures(&report)?;
    // From a second after the kill until aa came back, nothing was answered by it.
    for (replica, (_, last)) in &report.by_replica {
        if replica.starts_with("web/aa/") {
            ensure!(
                *last > returned_at || *last < killed_at + Duration::from_secs(1),
                "{replica} answered at {last:?}, while aa was down"
            );
        }
    }
    ensure!(
        report.by_replica.keys().any(|r| r.starts_with("web/bb/")),
        "bb never served"
    );
    Ok(())
}

#[test]
fn a_killed_agent_with_live_replicas_costs_no_request_and_moves_nothing() -> Result<()> {
    let (mut c, front) = setup()?;
    let load = Load::start(front, PACE);
    c.kill_agent("aa")?;
    c.wait_until("aa to be partitioned", WAIT, |c| {
        Ok(
            (c.provider_states()?.get("aa").map(String::as_str) == Some("partitioned"))
                .then_some(()),
        )
    })?;
    // Traffic keeps reaching aa's replicas after the partition is detected:
    // of 60 requests through the front door, aa's two replicas of six get some.
    let mut to_aa = 0;
    for _ in 0..60 {
        let (status, h, _) = http_get_headers(&front.to_string(), "/", Duration::from_secs(2))?;
        ensure!(status == 200, "status {status} during the partition");
        to_aa += usize::from(
            h.get("x-skymirror-replica")
                .is_some_and(|r| r.starts_with("web/aa/")),
        );
    }
    ensure!(
        to_aa > 0,
        "aa's replicas got none of 60 requests during the partition"
    );
    let report = load.finish()?;
    no_failures(&report)?;
    ensure!(
        c.ready_counts("web")?.values().all(|n| *n == 2),
        "replicas were moved: {:?}",
        c.ready_counts("web")?
    );
    Ok(())
}

#[test]
fn the_front_door_keeps_serving_while_the_daemon_is_down() -> Result<()> {
    let (mut c, front) = setup()?;
    let load = Load::start(front, PACE);
    c.kill_daemon()?;
    // Three seconds without a control plane: the front door serves its last table.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    c.start_daemon()?;
    c.wait_until("every provider up after the restart", WAIT, |c| {
        Ok(c.provider_states()?
            .values()
            .all(|s| s == "up")
            .then_some(()))
    })?;
    let report = load.finish()?;
    no_failures(&report)?;
    ensure!(
        report.by_replica.len() == 6,
        "not every replica served: {:?}",
        report.by_replica.keys().collect::<Vec<_>>()
    );
    Ok(())
}
