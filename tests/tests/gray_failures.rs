//! End to end through the front door (`skymirror edge`) when providers and
//! replicas fail *gray*: frozen (SIGSTOP) rather than dead, so the kernel still
//! accepts their connections and nothing answers. No request may fail and
//! none may wait a second. Also: a graceful front-door stop on SIGTERM.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use nix::sys::signal::Signal;
use skymirror_tests::{Cluster, Load, LoadReport, app_yaml, free_port, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);
/// Each client sends one request every 5 ms, each on a fresh connection.
const PACE: Duration = Duration::from_millis(5);
/// Clients at once, as in the issue that reported the gray failures.
const CLIENTS: usize = 4;
/// How long a gray failure lasts: past the daemon's suspect threshold (1 s)
/// and its outside probes (3 s).
const FROZEN_FOR: Duration = Duration::from_secs(5);

fn routed_app(replicas: u32, listen: SocketAddr) -> String {
    let mut y = app_yaml("web", replicas, "hi", &[]);
    y.push_str(&format!(
        "  failover:\n    failbackAfter: 2s\n  routing:\n    listen: \"{listen}\"\n    port: http\n"
    ));
    y
}

/// Three providers, two replicas of the app on each, a front door in front.
fn setup() -> Result<(Cluster, SocketAddr)> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb", "cc"]))?;
    for p in ["aa", "bb", "cc"] {
        c.start_agent(p)?;
    }
    let front = free_port()?;
    c.apply_ok("web.yaml", &routed_app(2, front))?;
    c.wait_ready("web", &["aa", "bb", "cc"], 2, 1, WAIT)?;
    c.start_edge(&[])?;
    c.wait_front_door(front, 6, WAIT)?;
    Ok((c, front))
}

/// Runs `during` under load from [`CLIENTS`] clients and returns what they saw
/// together.
fn under_load(front: SocketAddr, during: impl FnOnce() -> Result<()>) -> Result<LoadReport> {
    let loads: Vec<Load> = (0..CLIENTS).map(|_| Load::start(front, PACE)).collect();
    let outcome = during();
    let mut total = LoadReport::default();
    for load in loads {
        let r = load.finish()?;
        total.sent += r.sent;
        total.failed += r.failed;
        total.failures.extend(r.failures);
        total.slowest = total.slowest.max(r.slowest);
        total.slow.extend(r.slow);
        for (replica, (n, last)) in r.by_replica {
            let e = total.by_replica.entry(replica).or_insert((0, last));
            e.0 += n;
            e.1 = e.1.max(last);
        }
    }
    outcome?;
    Ok(total)
}

/// No failed request and none slower than a second.
fn unharmed(what: &str, report: &LoadReport) -> Result<()> {
    eprintln!(
        "{what}: {} requests, {} failed, slowest {:?}, {} over 1 s",
        report.sent,
        report.failed,
        report.slowest,
        report.slow.len()
    );
    ensure!(
        report.sent > 200,
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
    ensure!(
        report.slow.is_empty(),
        "{} requests took more than a second (slowest {:?}): {:?}",
        report.slow.len(),
        report.slowest,
        report.slow.iter().take(10).collect::<Vec<_>>()
    );
    Ok(())
}

/// Keeps the load on for `d`: the window in which the failure is measured.
fn hold(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_frozen_provider_costs_no_request_and_none_waits_a_second() -> Result<()> {
    let (mut c, front) = setup()?;
    let report = under_load(front, || {
        hold(Duration::from_secs(1));
        let frozen = c.signal_provider("aa", Signal::SIGSTOP)?;
        ensure!(
            frozen == 3,
            "froze {frozen} processes, expected the agent and 2 replicas"
        );
        hold(FROZEN_FOR);
        c.signal_provider("aa", Signal::SIGCONT)?;
        c.wait_state("aa", "up", WAIT)?;
        hold(Duration::from_secs(1));
        Ok(())
    })?;
    unharmed("provider aa frozen for 5 s", &report)
}

#[test]
fn a_replica_that_accepts_and_never_answers_is_hedged_around() -> Result<()> {
    let (c, front) = setup()?;
    let report = under_load(front, || {
        hold(Duration::from_secs(1));
        let frozen = c.signal_replica("web/bb/0", Signal::SIGSTOP)?;
        ensure!(frozen == 1, "froze {frozen} processes of web/bb/0");
        hold(FROZEN_FOR);
        // The agent may have replaced it meanwhile; whatever runs now goes on.
        c.signal_replica("web/bb/0", Signal::SIGCONT)?;
        hold(Duration::from_secs(1));
        Ok(())
    })?;
    unharmed("replica web/bb/0 frozen for 5 s", &report)?;
    // The hedge delay is learned from the route's latency: the frozen replica's
    // requests were answered by others well within the hedge ceiling.
    ensure!(
        report.slowest < Duration::from_millis(700),
        "slowest request {:?}",
        report.slowest
    );
    Ok(())
}

#[test]
fn sigterm_stops_the_front_door_gracefully() -> Result<()> {
    let (mut c, front) = setup()?;
    let started = Instant::now();
    let status = c.terminate_edge(0, Duration::from_secs(10))?;
    ensure!(status.success(), "the front door exited with {status}");
    ensure!(
        started.elapsed() < Duration::from_secs(6),
        "it took {:?} to stop with nothing in flight",
        started.elapsed()
    );
    ensure!(
        std::net::TcpStream::connect_timeout(&front, Duration::from_secs(1)).is_err(),
        "{front} still accepts connections"
    );
    Ok(())
}
