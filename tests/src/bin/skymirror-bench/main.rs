//! `skymirror-bench`: benchmarks that drive the real skymirror binaries through
//! the end-to-end harness ([`skymirror_tests::Cluster`]).
//!
//! - `scale` (`scale.rs`) applies `--apps` apps × `--replicas` replicas ×
//!   `--providers` providers (default 50 × 3 × 3 = 450 replicas) with the
//!   process driver and prints:
//!   - a baseline measured in the same run: as many `skymirror-example`
//!     processes started directly and the time until every one answers
//!     `GET /healthz` (the app's own start-up cost);
//!   - the time from `apply` to every replica ready, and the orchestration
//!     overhead (that time minus the baseline), with a breakdown of when the
//!     agents spawned the last replica and saw it healthy;
//!   - the daemon's and each agent's peak RSS (`VmHWM`), current RSS and CPU time;
//!   - the daemon's reconcile pass statistics (`skymirror status -o json`).
//!
//!   Targets: orchestration overhead < 1 s, daemon RSS < 50 MB, agent RSS < 20 MB.
//! - `failover` (`failover.rs`) keeps an app mirrored on three providers under
//!   steady load through the front door, kills one provider per round and
//!   prints how long traffic still went there, how long until the survivors
//!   ran full strength, and how many requests failed, per round and as median
//!   and worst. Targets: traffic off the dead provider ≤ 1 s, full strength
//!   ≤ 5 s plus the app's start time, no failed request.
//! - `proxy` (`proxy.rs`) runs `wrk` against one replica directly, the front
//!   door and nginx proxying the same replicas, in one run, and prints
//!   throughput and p50/p99 latency. Target: the front door within 20% of
//!   nginx's throughput. Skipped, with how to install them, when `wrk` or
//!   `nginx` is missing.
//! - `docker` (`docker.rs`) times, with the docker driver on one host, `apply`
//!   to every replica healthy for 1, 10 and 50 replicas, against `docker run`
//!   of the same image and as many containers measured in the same run, over
//!   `--rounds` rounds, comparing medians. Target: skymirror's overhead under
//!   10% of the engine's own time. Needs the image of
//!   tests/scripts/build-test-images.sh.
//!
//! - `api` (`api.rs`) measures what TLS and tokens cost the control API:
//!   latency of calls on one connection and of a new connection with one
//!   call, against a plaintext loopback daemon in the same run, and of an
//!   agent joining (its certificate signed and recorded).
//!
//! Targets are printed next to the figures, with `MISSED` when one is missed.
//! Timings are never asserted: the exit status is non-zero only when the
//! benchmark itself could not run. MB here is 10^6 bytes.
//!
//! Run it with the binaries of the same build profile, e.g.
//!
//! ```text
//! cargo build --workspace && target/debug/skymirror-bench scale
//! cargo build --workspace && target/debug/skymirror-bench failover
//! cargo build --workspace && target/debug/skymirror-bench proxy
//! cargo build --workspace && target/debug/skymirror-bench docker
//! cargo build --workspace && target/debug/skymirror-bench api
//! cargo build --workspace --release && target/release/skymirror-bench scale --runs 3
//! ```

mod api;
mod docker;
mod failover;
mod proxy;
mod scale;

use std::net::TcpListener;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use skymirror_tests::Bins;

/// Ticks per second of the CPU times in `/proc/<pid>/stat` (`USER_HZ`, which
/// Linux fixes at 100 for userspace on every architecture).
const USER_HZ: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of skymirror, driving the real binaries")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Apply apps × replicas × providers and time it until every replica is healthy.
    Scale(scale::ScaleArgs),
    /// Kill a provider under load through the front door, round after round.
    Failover(failover::FailoverArgs),
    /// Front door throughput and latency against a direct connection and nginx.
    Proxy(proxy::ProxyArgs),
    /// Docker driver: apply to all replicas healthy against the engine's own `docker run`.
    Docker(docker::DockerArgs),
    /// Control API latency with TLS and tokens against plaintext, and joins.
    Api(api::ApiArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Bench::Scale(args) => scale::scale(&args),
        Bench::Failover(args) => failover::failover(&args),
        Bench::Proxy(args) => proxy::proxy(&args),
        Bench::Docker(args) => docker::docker(&args),
        Bench::Api(args) => api::api(&args),
    }
}

/// Name of the build profile the binaries come from (`debug`, `release`).
fn profile(bins: &Bins) -> String {
    bins.dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// `min / median / max` of sorted durations.
fn spread(sorted: &[Duration]) -> String {
    let at = |i: usize| sorted.get(i).copied().unwrap_or_default();
    format!(
        "{} / {} / {}",
        secs(at(0)),
        secs(at(sorted.len() / 2)),
        secs(at(sorted.len().saturating_sub(1)))
    )
}

/// `n` distinct free loopback ports (all held until every one is picked).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// User + system CPU seconds of a process, if it is still there.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), secs)
}

fn ms(ms: i64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

fn micros(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1} ms", Duration::from_micros(us).as_secs_f64() * 1000.0)
    } else {
        format!("{us} us")
    }
}

/// Bytes as MB of 10^6 bytes.
fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn missed(miss: bool) -> &'static str {
    if miss { " MISSED" } else { "" }
}
