//! `failover`: a provider outage under steady load through the front door,
//! round after round.
//!
//! Setup, once: three providers (`aa`, `bb`, `cc`) with an agent each, the app
//! `web` mirrored with 2 replicas per provider and routed on a free port, and
//! a front door (`skymirror edge`). Every liveness setting is the default; only
//! the app's fail-back damping (`failover.failbackAfter`) is shortened from
//! 30 s to 3 s, so a round does not wait half a minute for the provider's
//! share to return.
//!
//! Load: `--threads` threads, each pacing its own share of `--rate`
//! requests/s, each `GET /` on a fresh connection (as the harness's `Load`
//! does), recording when it was sent and answered and which replica answered
//! (`x-skymirror-replica`), or why it failed (no answer, or not a 2xx).
//!
//! A round: wait until steady (exactly 2 ready replicas on each provider,
//! every provider up, answers from all three within the last second); note
//! t0; `kill -9` the provider's agent, then its replicas (an outage); then
//! measure
//! - (a) traffic off the dead provider: the later of the last answer from one
//!   of its replicas (client view; requests in flight count) and the front
//!   door's ejection of the last of its upstreams (the edge's log), after t0;
//! - (b) full strength: 6 ready replicas on the two survivors, polled with
//!   `get replicas` (re-checked on every event of the daemon);
//! - (c) failed requests sent from t0 until (b) + 1 s.
//!
//! Then the agent is restarted and the failures until the next steady state
//! are counted as the fail-back's. Rounds rotate the killed provider.
//!
//! `--mode freeze` is the gray failure instead: the provider's agent and
//! replicas are stopped with SIGSTOP (a paused VM, a frozen host: the kernel
//! still accepts connections, nothing answers) for `--freeze-secs`, then
//! continued. A round measures the failed requests and the slowest request
//! sent from t0 until a second after the thaw, how many took over a second,
//! when the frozen provider answered last and when the front door ejected its
//! upstreams. Nothing is re-placed: from outside, replicas whose kernel
//! accepts connections look alive, so the daemon sees a partition.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use skymirror_tests::{Bins, Cluster, app_yaml, free_port, http_get_headers, providers_yaml};

use crate::{epoch_ms, missed, profile, secs};

/// The providers, killed in this order round after round.
const PROVIDERS: [&str; 3] = ["aa", "bb", "cc"];
/// The app under load.
const APP: &str = "web";
/// Replicas of the app on each provider.
const REPLICAS: usize = 2;
/// `failover.failbackAfter` of the app, seconds (the default is 30).
const FAILBACK_AFTER_SECS: u64 = 3;
/// Connect/read timeout of one request of the load.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after full strength failures still count against the outage.
const AFTERMATH: Duration = Duration::from_secs(1);
/// Every provider must have answered within this window for traffic to be steady.
const STEADY_WINDOW: Duration = Duration::from_secs(1);
/// Targets from the issue.
const TRAFFIC_OFF_TARGET: Duration = Duration::from_secs(1);
const STRENGTH_TARGET: Duration = Duration::from_secs(5);
/// Failure reasons printed per round, at most.
const SHOWN_FAILURES: usize = 5;
/// Slowest acceptable request during a freeze, from the issue.
const FREEZE_LATENCY_TARGET: Duration = Duration::from_secs(1);

/// What a round does to its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// `kill -9` the agent and its replicas: an outage.
    Kill,
    /// SIGSTOP the agent and its replicas, SIGCONT later: a gray failure.
    Freeze,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FailoverArgs {
    /// Rounds; each kills the next provider in turn (aa, bb, cc, aa, ...).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Requests per second through the front door, all threads together.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Load threads, each pacing its own share of the rate.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Longest wait for any one step (steady state, full strength), seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// What happens to the provider of a round.
    #[arg(long, value_enum, default_value_t = Mode::Kill)]
    mode: Mode,
    /// How long a frozen provider stays frozen (`--mode freeze`), seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    freeze_secs: u64,
}

pub(crate) fn failover(args: &FailoverArgs) -> Result<()> {
    let bins = Bins::locate()?;
    let profile = profile(&bins);
    let timeout = Duration::from_secs(args.timeout_secs);

    // The app's own start time: as many processes as a failover starts
    // (one per survivor), started directly, until they answer /healthz.
    let app_start = crate::scale::baseline(&bins, PROVIDERS.len() - 1, timeout)
        .context("baseline")?
        .healthy;

    let (mut cluster, front) = setup(timeout)?;
    if args.mode == Mode::Freeze {
        return freeze(args, &profile, &mut cluster, front, timeout);
    }
    println!(
        "failover benchmark ({profile} build): app {APP} mirrored with {REPLICAS} replicas on each of {} (process driver), routed through the front door at {front}; {} rounds, killing {} in turn",
        PROVIDERS.join(", "),
        args.rounds,
        PROVIDERS.join(" -> ")
    );
    println!(
        "settings: every liveness setting is the default; fail-back damping (failover.failbackAfter) is shortened from the 30 s default to {FAILBACK_AFTER_SECS} s to keep the run short"
    );
    println!(
        "load: {} req/s wanted from {} threads, each GET / on a fresh connection (timeout {})",
        args.rate,
        args.threads,
        secs(REQUEST_TIMEOUT)
    );
    println!(
        "the app's own start time: {} {} processes started directly, all answering /healthz after {}",
        PROVIDERS.len() - 1,
        bins.example
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        secs(app_start)
    );
    println!(
        "a round: wait until steady, t0, kill -9 the provider's agent and its replicas; (a) traffic off = the later of the last answer from the dead provider and the front door's ejection of its last upstream; (b) full strength = {} ready replicas on the survivors; (c) failed = requests sent from t0 until (b) + {}",
        REPLICAS * PROVIDERS.len(),
        secs(AFTERMATH)
    );

    let traffic = Traffic::start(front, args.rate, args.threads);
    let mut steady = wait_steady(&mut cluster, &traffic, timeout)?;
    let first_t0 = steady;
    let mut rounds = Vec::new();
    let mut counted_failures = 0;
    for n in 0..args.rounds {
        let provider = PROVIDERS
            .get(usize::try_from(n)? % PROVIDERS.len())
            .copied()
            .context("provider rotation")?;
        let round = run_round(&mut cluster, &traffic, provider, timeout)?;
        steady = round.steady;
        counted_failures += round.failed.len() + round.failback_failed.len();
        print_round(n + 1, &round, STRENGTH_TARGET + app_start);
        rounds.push(round);
    }
    let samples = traffic.finish();

    println!();
    summary(&rounds, app_start);
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.sent >= first_t0 && s.sent < steady)
        .collect();
    let span = steady.saturating_sub(first_t0).as_secs_f64().max(1e-9);
    let all_failed = samples.iter().filter(|s| s.outcome.is_err()).count();
    println!("details:");
    println!(
        "  load achieved {:.0} req/s over the rounds ({} requests in {}; wanted {}){}; {} requests in all, {all_failed} failed ({} outside the rounds' windows)",
        during.len() as f64 / span,
        during.len(),
        secs(steady.saturating_sub(first_t0)),
        args.rate,
        if (during.len() as f64 / span) < f64::from(args.rate) * 0.95 {
            " (below the wanted rate)"
        } else {
            ""
        },
        samples.len(),
        all_failed.saturating_sub(counted_failures)
    );
    let mut latencies: Vec<Duration> = during
        .iter()
        .filter(|s| s.outcome.is_ok())
        .map(|s| s.done.saturating_sub(s.sent))
        .collect();
    latencies.sort();
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or_else(
                || "-".into(),
                |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
            )
    };
    println!(
        "  request latency over the rounds (connect + GET through the front door): p50 {}, p99 {}, max {}",
        pct(50),
        pct(99),
        pct(100)
    );
    Ok(())
}

/// What one freeze round measured. Durations are from t0 unless said.
#[derive(Debug)]
struct FreezeRound {
    provider: &'static str,
    /// Processes stopped (its agent and replicas).
    frozen: usize,
    /// Requests sent from t0 until a second after the thaw.
    sent: usize,
    failed: Vec<(Duration, String)>,
    /// The slowest request sent in the window (answered or not).
    slowest: Duration,
    /// Requests of the window that took over [`FREEZE_LATENCY_TARGET`].
    over_target: usize,
    /// Last answer from the frozen provider before the thaw.
    last_answer: Option<Duration>,
    /// The front door's ejections of the provider's upstreams.
    ejected: Option<Vec<Duration>>,
    /// The provider's liveness events until steady again (reason, from t0).
    events: Vec<(String, Duration)>,
}

fn freeze(
    args: &FailoverArgs,
    profile: &str,
    cluster: &mut Cluster,
    front: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let frozen_for = Duration::from_secs(args.freeze_secs);
    println!(
        "failover benchmark, freeze mode ({profile} build): app {APP} mirrored with {REPLICAS} replicas on each of {} (process driver), routed through the front door at {front}; {} rounds, freezing {} in turn",
        PROVIDERS.join(", "),
        args.rounds,
        PROVIDERS.join(" -> ")
    );
    println!(
        "a round: wait until steady, t0, SIGSTOP the provider's agent and its replicas, SIGCONT after {}; measured over the requests sent from t0 until a second after the thaw",
        secs(frozen_for)
    );
    println!(
        "load: {} req/s wanted from {} threads, each GET / on a fresh connection (timeout {})",
        args.rate,
        args.threads,
        secs(REQUEST_TIMEOUT)
    );
    let traffic = Traffic::start(front, args.rate, args.threads);
    wait_steady(cluster, &traffic, timeout)?;
    let mut rounds = Vec::new();
    for n in 0..args.rounds {
        let provider = PROVIDERS
            .get(usize::try_from(n)? % PROVIDERS.len())
            .copied()
            .context("provider rotation")?;
        let t0_ms = epoch_ms();
        let t0 = traffic.now();
        let frozen = cluster.signal_provider(provider, nix::sys::signal::Signal::SIGSTOP)?;
        pause_until(&traffic, t0 + frozen_for);
        cluster.signal_provider(provider, nix::sys::signal::Signal::SIGCONT)?;
        let window_end = traffic.now() + AFTERMATH;
        pause_until(&traffic, window_end);
        wait_steady(cluster, &traffic, timeout)?;
        let window = traffic.sent_between(t0, window_end);
        let took = |s: &Sample| s.done.saturating_sub(s.sent);
        let events = cluster
            .events()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let at = u64::try_from(e["timeMs"].as_i64()? - t0_ms).ok()?;
                let reason = e["reason"].as_str()?.strip_prefix("Provider")?;
                (e["provider"].as_str()? == provider)
                    .then(|| (reason.to_lowercase(), Duration::from_millis(at)))
            })
            .collect();
        let round = FreezeRound {
            provider,
            frozen,
            sent: window.len(),
            failed: failures(&window, t0),
            slowest: window.iter().map(took).max().unwrap_or_default(),
            over_target: window
                .iter()
                .filter(|s| took(s) > FREEZE_LATENCY_TARGET)
                .count(),
            last_answer: window
                .iter()
                .filter(|s| {
                    s.done >= t0 && s.done < t0 + frozen_for && s.provider() == Some(provider)
                })
                .map(|s| s.done.saturating_sub(t0))
                .max(),
            ejected: edge_ejections(&cluster.dir.path().join("edge-0.log"), provider, t0_ms)
                .ok()
                .map(|v| v.into_iter().filter(|at| *at < frozen_for).collect()),
            events,
        };
        print_freeze_round(n + 1, &round);
        rounds.push(round);
    }
    drop(traffic);
    let mut slowest: Vec<Duration> = rounds.iter().map(|r| r.slowest).collect();
    slowest.sort();
    let failed: usize = rounds.iter().map(|r| r.failed.len()).sum();
    let sent: usize = rounds.iter().map(|r| r.sent).sum();
    let over: usize = rounds.iter().map(|r| r.over_target).sum();
    println!();
    println!("over {} rounds:", rounds.len());
    println!(
        "  failed requests {failed} of {sent} (target 0){}",
        missed(failed > 0)
    );
    println!(
        "  slowest request per round: median {}, worst {} (target < {}){}; {over} requests over {}",
        secs(slowest.get(slowest.len() / 2).copied().unwrap_or_default()),
        secs(slowest.last().copied().unwrap_or_default()),
        secs(FREEZE_LATENCY_TARGET),
        missed(over > 0),
        secs(FREEZE_LATENCY_TARGET)
    );
    Ok(())
}

fn print_freeze_round(n: u32, r: &FreezeRound) {
    println!(
        "round {n:>2}: {} frozen ({} processes) | failed {} of {}{} | slowest {}, {} over {}{}",
        r.provider,
        r.frozen,
        r.failed.len(),
        r.sent,
        missed(!r.failed.is_empty()),
        secs(r.slowest),
        r.over_target,
        secs(FREEZE_LATENCY_TARGET),
        missed(r.over_target > 0)
    );
    let answers = r.last_answer.map_or_else(
        || "no answer from it after t0".to_string(),
        |at| format!("its last answer +{}", secs(at)),
    );
    let ejected = match &r.ejected {
        Some(v) if v.is_empty() => "the front door ejected none of its upstreams".to_string(),
        Some(v) => format!(
            "the front door ejected {} of its {REPLICAS} upstreams, the last at +{}",
            v.len(),
            secs(v.iter().copied().max().unwrap_or_default())
        ),
        None => "front door log unreadable".to_string(),
    };
    let events = r
        .events
        .iter()
        .map(|(why, at)| format!("{why} +{}", secs(*at)))
        .collect::<Vec<_>>()
        .join(", ");
    println!("          {answers}; {ejected}; events: {events}");
    for (at, why) in r.failed.iter().take(SHOWN_FAILURES) {
        println!("          failure at +{}: {why}", secs(*at));
    }
}

/// Starts the cluster, the app and the front door; returns the front door's address.
fn setup(timeout: Duration) -> Result<(Cluster, SocketAddr)> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&PROVIDERS))?;
    for p in PROVIDERS {
        c.start_agent(p)?;
    }
    let front = free_port()?;
    let mut app = app_yaml(APP, u32::try_from(REPLICAS)?, "bench", &[]);
    app.push_str(&format!(
        "  failover:\n    failbackAfter: {FAILBACK_AFTER_SECS}s\n  routing:\n    listen: \"{front}\"\n    port: http\n"
    ));
    c.apply_ok("web.yaml", &app)?;
    c.wait_ready(APP, &PROVIDERS, REPLICAS, 1, timeout)?;
    c.start_edge(&[])?;
    let all = REPLICAS * PROVIDERS.len();
    c.wait_front_door(front, all, timeout)?;
    Ok((c, front))
}

/// What one round measured. Durations are on the load's clock.
#[derive(Debug)]
struct Round {
    provider: &'static str,
    /// Replica processes killed.
    killed: usize,
    /// How long killing the agent and the replicas took.
    kill_took: Duration,
    /// (a), from t0.
    traffic_off: Duration,
    /// Last answer from the dead provider after t0, from t0.
    last_answer: Option<Duration>,
    /// The edge's ejections of the dead provider's upstreams after t0, from t0
    /// (`None` when the edge's log could not be read).
    ejected: Option<Vec<Duration>>,
    /// (b), from t0.
    strength: Duration,
    /// The provider's events from t0 until steady again (reason, from t0),
    /// with the agent's restart.
    events: Vec<(String, Duration)>,
    /// Drop-outs of the survivors since t0 (provider, reason, from t0).
    survivor_events: Vec<(String, String, Duration)>,
    /// New replicas on the survivors: first and last spawn, last healthy at
    /// its agent (from t0), and the longest spawn -> healthy.
    spawned: Option<(Duration, Duration, Duration, Duration)>,
    /// Requests sent in the outage window, and the failed ones (from t0).
    sent: usize,
    failed: Vec<(Duration, String)>,
    /// From the agent's restart until steady again.
    failback: Duration,
    failback_sent: usize,
    /// Failed requests during the fail-back (from the restart).
    failback_failed: Vec<(Duration, String)>,
    /// When the round ended steady, on the load's clock.
    steady: Duration,
}

fn run_round(
    c: &mut Cluster,
    traffic: &Traffic,
    provider: &'static str,
    timeout: Duration,
) -> Result<Round> {
    let survivors: Vec<&str> = PROVIDERS.into_iter().filter(|p| *p != provider).collect();
    let full = REPLICAS * PROVIDERS.len();

    let t0_ms = epoch_ms();
    let t0 = traffic.now();
    c.kill_agent(provider)?;
    let killed = c.kill_replicas(provider)?;
    let kill_took = traffic.now().saturating_sub(t0);

    let (strength_at, replicas) = c.wait_until(
        &format!(
            "{full} ready replicas of {APP} on {} after {provider}'s outage",
            survivors.join(" and ")
        ),
        timeout,
        |c| {
            let rs: Vec<Value> = c
                .replicas()?
                .into_iter()
                .filter(|r| r["app"] == APP)
                .collect();
            let ready = rs
                .iter()
                .filter(|r| {
                    r["ready"] == true
                        && r["provider"]
                            .as_str()
                            .is_some_and(|p| survivors.contains(&p))
                })
                .count();
            Ok((ready >= full).then(|| (traffic.now(), rs)))
        },
    )?;
    let strength = strength_at.saturating_sub(t0);
    // The outage window ends a second after full strength.
    let window_end = strength_at + AFTERMATH;
    pause_until(traffic, window_end);

    let restart_at = traffic.now();
    let restart_ms = epoch_ms();
    c.start_agent(provider)?;
    let steady = wait_steady(c, traffic, timeout)?;

    // Everything below is read after the fact, so every request of the
    // windows has finished (or timed out) by now.
    let outage = traffic.sent_between(t0, window_end);
    let failed = failures(&outage, t0);
    let last_answer = outage
        .iter()
        .filter(|s| s.done >= t0 && s.provider() == Some(provider))
        .map(|s| s.done.saturating_sub(t0))
        .max();
    let ejected = edge_ejections(&c.dir.path().join("edge-0.log"), provider, t0_ms)
        .ok()
        .map(|v| {
            v.into_iter()
                .filter(|at| *at < strength + AFTERMATH)
                .collect::<Vec<_>>()
        });
    let traffic_off = last_answer
        .into_iter()
        .chain(ejected.iter().flatten().copied())
        .max()
        .unwrap_or_default();
    let failback_samples = traffic.sent_between(window_end, steady);

    // Provider events since t0: (provider, reason, from t0).
    let all_events: Vec<(String, String, Duration)> = c
        .events()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let at = u64::try_from(e["timeMs"].as_i64()? - t0_ms).ok()?;
            let reason = e["reason"].as_str()?.strip_prefix("Provider")?;
            Some((
                e["provider"].as_str()?.to_string(),
                reason.to_lowercase(),
                Duration::from_millis(at),
            ))
        })
        .collect();
    let mut events: Vec<(String, Duration)> = all_events
        .iter()
        .filter(|(p, _, _)| p == provider)
        .map(|(_, why, at)| (why.clone(), *at))
        .collect();
    // A survivor dropping out meanwhile (late heartbeats on a busy machine)
    // would distort the round and count towards its flapping.
    let survivor_events: Vec<(String, String, Duration)> = all_events
        .into_iter()
        .filter(|(p, why, _)| {
            p != provider
                && matches!(
                    why.as_str(),
                    "disconnected" | "suspect" | "down" | "partitioned" | "flapping"
                )
        })
        .collect();
    events.push((
        "(agent restarted)".into(),
        Duration::from_millis(u64::try_from(restart_ms - t0_ms).unwrap_or(0)),
    ));
    events.sort_by_key(|(_, at)| *at);

    Ok(Round {
        provider,
        killed,
        kill_took,
        traffic_off,
        last_answer,
        ejected,
        strength,
        events,
        survivor_events,
        spawned: new_replicas(&replicas, &survivors, t0_ms),
        sent: outage.len(),
        failed,
        failback: steady.saturating_sub(restart_at),
        failback_sent: failback_samples.len(),
        failback_failed: failures(&failback_samples, restart_at),
        steady,
    })
}

/// Waits until the app runs exactly its mirrored shape, every provider is up
/// and every provider answered within the last second; returns when, on the
/// load's clock.
fn wait_steady(c: &mut Cluster, traffic: &Traffic, timeout: Duration) -> Result<Duration> {
    c.wait_until(
        &format!(
            "{REPLICAS} ready replicas of {APP} on each of {}, nothing else, every provider up, answers from all",
            PROVIDERS.join(", ")
        ),
        timeout,
        |c| {
            let rs: Vec<Value> = c
                .replicas()?
                .into_iter()
                .filter(|r| r["app"] == APP)
                .collect();
            let shaped = rs.len() == REPLICAS * PROVIDERS.len()
                && rs.iter().all(|r| r["ready"] == true)
                && PROVIDERS
                    .iter()
                    .all(|p| rs.iter().filter(|r| r["provider"] == *p).count() == REPLICAS);
            if !shaped || c.provider_states()?.values().any(|s| s != "up") {
                return Ok(None);
            }
            let now = traffic.now();
            let seen = traffic.providers_answering_since(now.saturating_sub(STEADY_WINDOW));
            Ok(PROVIDERS
                .iter()
                .all(|p| seen.contains(*p))
                .then_some(now))
        },
    )
}

/// Sleeps until `at` on the load's clock: the measurement window has to pass,
/// there is no event to wait for.
fn pause_until(traffic: &Traffic, at: Duration) {
    let now = traffic.now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// The failures among `samples`, with their send time from `origin`.
fn failures(samples: &[Sample], origin: Duration) -> Vec<(Duration, String)> {
    samples
        .iter()
        .filter_map(|s| match &s.outcome {
            Ok(_) => None,
            Err(why) => Some((s.sent.saturating_sub(origin), why.clone())),
        })
        .collect()
}

/// Replicas on the survivors started after t0: first and last spawn, last
/// healthy at its agent, longest spawn -> healthy (all from t0, agent-stamped).
fn new_replicas(
    replicas: &[Value],
    survivors: &[&str],
    t0_ms: i64,
) -> Option<(Duration, Duration, Duration, Duration)> {
    let fresh: Vec<(i64, i64)> = replicas
        .iter()
        .filter(|r| {
            r["ready"] == true
                && r["provider"]
                    .as_str()
                    .is_some_and(|p| survivors.contains(&p))
        })
        .filter_map(|r| Some((r["startedAtMs"].as_i64()?, r["stateSinceMs"].as_i64()?)))
        .filter(|(started, _)| *started >= t0_ms)
        .collect();
    let after = |ms: i64| Duration::from_millis(u64::try_from(ms - t0_ms).unwrap_or(0));
    let first = fresh.iter().map(|(s, _)| *s).min()?;
    let last = fresh.iter().map(|(s, _)| *s).max()?;
    let healthy = fresh.iter().map(|(_, h)| *h).max()?;
    let start_time = fresh.iter().map(|(s, h)| h - s).max()?;
    Some((
        after(first),
        after(last),
        after(healthy),
        Duration::from_millis(u64::try_from(start_time).unwrap_or(0)),
    ))
}

fn print_round(n: u32, r: &Round, strength_target: Duration) {
    println!(
        "round {n:>2}: {} killed ({} replicas) | traffic off {}{} | full strength {}{} | failed {} of {}{} | fail-back {}, failed {} of {}{}",
        r.provider,
        r.killed,
        secs(r.traffic_off),
        missed(r.traffic_off > TRAFFIC_OFF_TARGET),
        secs(r.strength),
        missed(r.strength > strength_target),
        r.failed.len(),
        r.sent,
        missed(!r.failed.is_empty()),
        secs(r.failback),
        r.failback_failed.len(),
        r.failback_sent,
        missed(!r.failback_failed.is_empty()),
    );
    let events = if r.events.is_empty() {
        "no liveness event".to_string()
    } else {
        r.events
            .iter()
            .map(|(why, at)| format!("{why} +{}", secs(*at)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let spawned = match r.spawned {
        Some((first, last, healthy, start)) => format!(
            "new replicas spawned +{}..+{}, healthy at their agents by +{} (spawn -> healthy up to {})",
            secs(first),
            secs(last),
            secs(healthy),
            secs(start)
        ),
        None => "no new replica seen on the survivors".into(),
    };
    let answers = r.last_answer.map_or_else(
        || "no answer from it after t0".to_string(),
        |at| format!("its last answer +{}", secs(at)),
    );
    let ejected = match &r.ejected {
        Some(v) if v.is_empty() => "the front door ejected none of its upstreams".to_string(),
        Some(v) => format!(
            "the front door ejected {} of its {REPLICAS} upstreams, the last at +{}",
            v.len(),
            secs(v.iter().copied().max().unwrap_or_default())
        ),
        None => "front door log unreadable".to_string(),
    };
    println!(
        "          kill took {}; {answers}; {ejected}; {spawned}",
        secs(r.kill_took),
    );
    println!("          {} events: {events}", r.provider);
    if !r.survivor_events.is_empty() {
        println!(
            "          survivors dropping out meanwhile: {}",
            r.survivor_events
                .iter()
                .map(|(p, why, at)| format!("{p} {why} +{}", secs(*at)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (label, list) in [("outage", &r.failed), ("fail-back", &r.failback_failed)] {
        for (at, why) in list.iter().take(SHOWN_FAILURES) {
            println!("          {label} failure at +{}: {why}", secs(*at));
        }
        if list.len() > SHOWN_FAILURES {
            println!(
                "          ... {} more {label} failures",
                list.len() - SHOWN_FAILURES
            );
        }
    }
}

fn summary(rounds: &[Round], app_start: Duration) {
    let strength_target = STRENGTH_TARGET + app_start;
    let med_worst = |mut v: Vec<Duration>| {
        v.sort();
        (
            v.get(v.len() / 2).copied().unwrap_or_default(),
            v.last().copied().unwrap_or_default(),
        )
    };
    let count_med_worst = |mut v: Vec<usize>| {
        v.sort_unstable();
        (
            v.get(v.len() / 2).copied().unwrap_or_default(),
            v.last().copied().unwrap_or_default(),
        )
    };
    let (off_med, off_worst) = med_worst(rounds.iter().map(|r| r.traffic_off).collect());
    let (str_med, str_worst) = med_worst(rounds.iter().map(|r| r.strength).collect());
    let (fail_med, fail_worst) = count_med_worst(rounds.iter().map(|r| r.failed.len()).collect());
    let (fb_med, fb_worst) = med_worst(rounds.iter().map(|r| r.failback).collect());
    let (fbf_med, fbf_worst) =
        count_med_worst(rounds.iter().map(|r| r.failback_failed.len()).collect());
    println!("over {} rounds, median / worst:", rounds.len());
    println!(
        "  (a) traffic off the dead provider   {} / {} (target <= {}){}",
        secs(off_med),
        secs(off_worst),
        secs(TRAFFIC_OFF_TARGET),
        missed(off_worst > TRAFFIC_OFF_TARGET)
    );
    println!(
        "  (b) full strength on the survivors  {} / {} (target <= {} + app start {} = {}){}",
        secs(str_med),
        secs(str_worst),
        secs(STRENGTH_TARGET),
        secs(app_start),
        secs(strength_target),
        missed(str_worst > strength_target)
    );
    println!(
        "  (c) failed requests, t0 .. (b) + {}  {fail_med} / {fail_worst} (target 0){}",
        secs(AFTERMATH),
        missed(fail_worst > 0)
    );
    println!(
        "  fail-back: agent restart -> steady  {} / {}; failed requests {fbf_med} / {fbf_worst} (target 0){}",
        secs(fb_med),
        secs(fb_worst),
        missed(fbf_worst > 0)
    );
}

/// For each upstream of `provider` the front door's log says it ejected at or
/// after `t0_ms`: the first such ejection, as time from t0.
fn edge_ejections(log: &Path, provider: &str, t0_ms: i64) -> Result<Vec<Duration>> {
    let text = std::fs::read_to_string(log).with_context(|| log.display().to_string())?;
    let needle = format!("replica={APP}/{provider}/");
    let mut first: std::collections::BTreeMap<String, Duration> = Default::default();
    for line in text.lines().map(strip_ansi) {
        if !line.contains("upstream ejected") {
            continue;
        }
        let Some(replica) = line
            .split_whitespace()
            .find(|w| w.starts_with(&needle))
            .map(str::to_string)
        else {
            continue;
        };
        let Some(at) = line.split_whitespace().next().and_then(parse_utc_ms) else {
            continue;
        };
        if at < t0_ms {
            continue;
        }
        let after = Duration::from_millis(u64::try_from(at - t0_ms).unwrap_or(0));
        first.entry(replica).or_insert(after);
    }
    Ok(first.into_values().collect())
}

/// A log line without its terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as tracing writes it
/// (`2026-01-31T12:34:56.123456Z`).
fn parse_utc_ms(ts: &str) -> Option<i64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|v| v.parse::<i64>().ok());
    let (h, m, s) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    Some((((days_from_civil(year, month, day) * 24 + h) * 60 + m) * 60 + s) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One request of the load. Times are from the load's start.
#[derive(Debug, Clone)]
struct Sample {
    sent: Duration,
    done: Duration,
    /// The replica that answered, or why the request failed.
    outcome: Result<String, String>,
}

impl Sample {
    /// The provider of the replica that answered.
    fn provider(&self) -> Option<&str> {
        self.outcome.as_ref().ok()?.split('/').nth(1)
    }
}

/// Paced HTTP load on threads of its own; every request is recorded.
#[derive(Debug)]
struct Traffic {
    epoch: Instant,
    stop: Arc<AtomicBool>,
    /// One log per thread, appended in completion order.
    logs: Vec<Arc<Mutex<Vec<Sample>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr, rate: u32, threads: u32) -> Self {
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(f64::from(threads) / f64::from(rate));
        let mut logs = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads {
            let log = Arc::new(Mutex::new(Vec::new()));
            logs.push(log.clone());
            let stop = stop.clone();
            // Threads interleave instead of firing together.
            let offset = interval * i / threads;
            handles.push(std::thread::spawn(move || {
                let target = addr.to_string();
                let mut next = epoch.elapsed() + offset;
                while !stop.load(Ordering::SeqCst) {
                    let now = epoch.elapsed();
                    if next > now {
                        // Pacing, not waiting for a condition.
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_secs(1) {
                        // Far behind (requests waited out their timeouts):
                        // resume the pace rather than fire the backlog at once.
                        next = now;
                    }
                    let sent = epoch.elapsed();
                    let outcome = match http_get_headers(&target, "/", REQUEST_TIMEOUT) {
                        Ok((status, headers, _)) if (200..300).contains(&status) => Ok(headers
                            .get("x-skymirror-replica")
                            .cloned()
                            .unwrap_or_default()),
                        Ok((status, _, body)) => Err(format!("status {status}: {}", body.trim())),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    let done = epoch.elapsed();
                    if let Ok(mut l) = log.lock() {
                        l.push(Sample {
                            sent,
                            done,
                            outcome,
                        });
                    }
                    next += interval;
                }
            }));
        }
        Traffic {
            epoch,
            stop,
            logs,
            threads: handles,
        }
    }

    /// Now, on the load's clock.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Providers that answered a request finished at or after `since`.
    fn providers_answering_since(&self, since: Duration) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for log in &self.logs {
            if let Ok(l) = log.lock() {
                for s in l.iter().rev().take_while(|s| s.done >= since) {
                    if let Some(p) = s.provider() {
                        out.insert(p.to_string());
                    }
                }
            }
        }
        out
    }

    /// Requests sent in `[from, to)`, in send order.
    fn sent_between(&self, from: Duration, to: Duration) -> Vec<Sample> {
        let mut out: Vec<Sample> = Vec::new();
        for log in &self.logs {
            if let Ok(l) = log.lock() {
                out.extend(l.iter().filter(|s| s.sent >= from && s.sent < to).cloned());
            }
        }
        out.sort_by_key(|s| s.sent);
        out
    }

    /// Stops the load and returns every request, in send order.
    fn finish(mut self) -> Vec<Sample> {
        self.stop_and_join();
        let mut out: Vec<Sample> = Vec::new();
        for log in &self.logs {
            if let Ok(mut l) = log.lock() {
                out.append(&mut l);
            }
        }
        out.sort_by_key(|s| s.sent);
        out
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_parse() {
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(
            parse_utc_ms("2026-11-26T21:19:13.459098Z"),
            Some(1_795_727_953_459)
        );
        assert_eq!(
            parse_utc_ms("2000-03-01T00:00:01.5Z"),
            Some(951_868_801_500)
        );
        assert_eq!(parse_utc_ms("garbage"), None);
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026-11-26T21:19:13Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026-11-26T21:19:13Z  WARN x"
        );
    }
}
