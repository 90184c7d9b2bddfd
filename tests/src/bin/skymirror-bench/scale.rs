//! `scale`: apply many apps at once and time them until every replica is
//! healthy, against the app's own start-up measured in the same run.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use skymirror_tests::{Bins, Cluster, app_yaml, http_get, providers_yaml};

use crate::{
    USER_HZ, cpu_secs, epoch_ms, free_ports, mb, micros, missed, ms, opt_secs, profile, secs,
    spread,
};

/// Connect/read timeout of one baseline health probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the agents get to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Targets from the issue.
const OVERHEAD_TARGET: Duration = Duration::from_secs(1);
const DAEMON_RSS_TARGET: u64 = 50_000_000;
const AGENT_RSS_TARGET: u64 = 20_000_000;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Number of apps, in one multi-document YAML file.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    apps: u32,
    /// Replicas of each app on each provider.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    replicas: u32,
    /// Providers (one agent each, process driver); apps are mirrored on all.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    providers: u32,
    /// Repetitions (each with its own baseline and cluster).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Longest wait for everything to be healthy, seconds (baseline and skymirror each).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// After convergence, measure the CPU the daemon and agents use while
    /// nothing changes, over this many seconds (0 skips it).
    #[arg(long, default_value_t = 2)]
    idle_secs: u64,
}

impl ScaleArgs {
    fn total(&self) -> usize {
        usize::try_from(u64::from(self.apps) * u64::from(self.replicas) * u64::from(self.providers))
            .unwrap_or(usize::MAX)
    }
}

/// Figures of one `scale` run.
#[derive(Debug)]
struct ScaleRun {
    baseline: Duration,
    total: Duration,
}

pub(crate) fn scale(args: &ScaleArgs) -> Result<()> {
    let bins = Bins::locate()?;
    let profile = profile(&bins);
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        if args.runs > 1 {
            println!("--- run {run} of {} ---", args.runs);
        }
        runs.push(scale_once(args, &bins, &profile)?);
        println!();
    }
    if runs.len() > 1 {
        let mut overheads: Vec<Duration> = runs
            .iter()
            .map(|r| r.total.saturating_sub(r.baseline))
            .collect();
        overheads.sort();
        let mut totals: Vec<Duration> = runs.iter().map(|r| r.total).collect();
        totals.sort();
        let mut baselines: Vec<Duration> = runs.iter().map(|r| r.baseline).collect();
        baselines.sort();
        println!(
            "over {} runs ({profile} build), min / median / max:",
            runs.len()
        );
        println!("  baseline  {}", spread(&baselines));
        println!("  skymirror {}", spread(&totals));
        println!("  overhead  {}", spread(&overheads));
    }
    Ok(())
}

fn scale_once(args: &ScaleArgs, bins: &Bins, profile: &str) -> Result<ScaleRun> {
    let total = args.total();
    let timeout = Duration::from_secs(args.timeout_secs);

    // 1. Baseline: the app's own start-up, without skymirror.
    let base = baseline(bins, total, timeout).context("baseline")?;

    // 2. skymirror.
    let providers: Vec<String> = (1..=args.providers).map(|i| format!("p{i}")).collect();
    let provider_refs: Vec<&str> = providers.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start()?;
    cluster.apply_ok("providers.yaml", &providers_yaml(&provider_refs))?;
    for p in &providers {
        cluster.start_agent(p)?;
    }
    cluster.wait_until(
        &format!("{} agents connected", providers.len()),
        CONNECT_TIMEOUT,
        |c| {
            let ps = c.providers()?;
            Ok(
                (ps.len() == providers.len() && ps.iter().all(|p| p["state"] == "up"))
                    .then_some(()),
            )
        },
    )?;
    let daemon_pid = cluster.daemon_pid().context("the daemon is not running")?;
    let agents = agent_pids(&cluster.url());
    ensure!(
        agents.len() == providers.len(),
        "found {} agent processes for {}, expected {}",
        agents.len(),
        cluster.url(),
        providers.len()
    );
    let cpu_before = cpu_times(daemon_pid, &agents);
    let observer_before = children_cpu_secs();
    let reconcile_before = daemon_status(&cluster)?;

    let yaml = (0..args.apps)
        .map(|i| app_yaml(&format!("app-{i:03}"), args.replicas, "bench", &[]))
        .collect::<Vec<_>>()
        .join("---\n");
    let spec = cluster.write_spec("apps.yaml", &yaml)?;
    let spec = spec.to_string_lossy().into_owned();

    let apply_ms = epoch_ms();
    let start = Instant::now();
    cluster.cli_ok(&["apply", "-f", &spec])?;
    let applied = start.elapsed();
    let mut all_reported: Option<Duration> = None;
    let mut first_ready: Option<Duration> = None;
    let mut checks = 0u32;
    let replicas = cluster.wait_until(&format!("{total} replicas ready"), timeout, |c| {
        checks += 1;
        let rs = c.replicas()?;
        let ready = rs.iter().filter(|r| r["ready"] == true).count();
        if all_reported.is_none() && rs.len() >= total {
            all_reported = Some(start.elapsed());
        }
        if first_ready.is_none() && ready > 0 {
            first_ready = Some(start.elapsed());
        }
        Ok((rs.len() == total && ready == total).then_some(rs))
    })?;
    let took = start.elapsed();
    let observer = children_cpu_secs().zip(observer_before).map(|(a, b)| a - b);
    // 4. Reconcile statistics, before the idle window so the pass count is the scale-up's.
    let reconcile = daemon_status(&cluster)?;

    // 3. Memory and CPU, while everything still runs.
    let daemon_mem = memory(daemon_pid)?;
    let agent_mem = agents
        .iter()
        .map(|(p, pid)| Ok((p.clone(), memory(*pid)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let cpu_after = cpu_times(daemon_pid, &agents);
    // Idle cost: nothing changes any more, so this is what health probing and
    // periodic work cost with this many replicas. Sleeping is the measurement
    // here, not a wait for a condition.
    let idle = Duration::from_secs(args.idle_secs);
    std::thread::sleep(idle);
    let cpu_idle = cpu_times(daemon_pid, &agents);
    let replica_pids: usize = cluster.replica_processes().values().map(Vec::len).sum();

    // 5. Summary.
    let overhead = took.saturating_sub(base.healthy);
    println!(
        "scale benchmark ({profile} build): {} apps x {} replicas x {} providers = {total} replicas",
        args.apps, args.replicas, args.providers
    );
    println!(
        "baseline: {total} app processes started directly, all healthy in {} (spawned in {})",
        secs(base.healthy),
        secs(base.spawned)
    );
    println!(
        "skymirror: apply -> {total} replicas healthy in {}; orchestration overhead {} (target < {}){}; ratio {:.1}x baseline",
        secs(took),
        secs(overhead),
        secs(OVERHEAD_TARGET),
        missed(overhead >= OVERHEAD_TARGET),
        took.as_secs_f64() / base.healthy.as_secs_f64().max(1e-9)
    );
    println!(
        "daemon peak RSS {} (target < {}){}; agents peak RSS {} (target < {}){}",
        mb(daemon_mem.hwm),
        mb(DAEMON_RSS_TARGET),
        missed(daemon_mem.hwm >= DAEMON_RSS_TARGET),
        agent_mem
            .values()
            .map(|m| mb(m.hwm))
            .collect::<Vec<_>>()
            .join(" / "),
        mb(AGENT_RSS_TARGET),
        missed(agent_mem.values().any(|m| m.hwm >= AGENT_RSS_TARGET)),
    );
    println!(
        "reconcile passes: {}, mean {}, max {}, last {} ({} passes during the scale-up)",
        reconcile.passes,
        micros(reconcile.mean_us),
        micros(reconcile.max_us),
        micros(reconcile.last_us),
        reconcile.passes.saturating_sub(reconcile_before.passes)
    );
    println!("details:");
    println!(
        "  apply CLI returned after {}; all {total} replicas listed after {}; first ready after {}; {checks} readiness checks",
        secs(applied),
        opt_secs(all_reported),
        opt_secs(first_ready)
    );
    for line in agent_breakdown(&replicas, apply_ms) {
        println!("  {line}");
    }
    println!(
        "  current RSS after the run: daemon {}, agents {}",
        mb(daemon_mem.rss),
        agent_mem
            .values()
            .map(|m| mb(m.rss))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!(
        "  CPU during the scale-up: daemon {}, agents {}",
        cpu_delta(&cpu_before, &cpu_after, "daemon"),
        agents
            .keys()
            .map(|p| cpu_delta(&cpu_before, &cpu_after, p))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    if !idle.is_zero() {
        let share = |key: &str| match (
            cpu_after.get(key).copied().flatten(),
            cpu_idle.get(key).copied().flatten(),
        ) {
            (Some(b), Some(a)) => format!("{:.0}%", (a - b) / idle.as_secs_f64() * 100.0),
            _ => "?".into(),
        };
        println!(
            "  CPU when idle (over {}, after convergence): daemon {}, agents {}",
            secs(idle),
            share("daemon"),
            agents
                .keys()
                .map(|p| share(p))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    println!(
        "  observer cost: the {checks} readiness checks (`get replicas -o json` CLI runs) used {} of CPU in their own processes",
        observer.map_or_else(|| "?".into(), |s| format!("{s:.2} s"))
    );
    println!(
        "  replica processes alive: {replica_pids} (expected {total}){}",
        missed(replica_pids != total)
    );
    Ok(ScaleRun {
        baseline: base.healthy,
        total: took,
    })
}

/// Per provider: when (after the apply started) the agent spawned its last
/// replica and when it saw its last replica healthy, from the replicas'
/// `startedAtMs` / `stateSinceMs` (stamped by the agent, same host clock).
fn agent_breakdown(replicas: &[Value], apply_ms: i64) -> Vec<String> {
    let mut by_provider: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for r in replicas {
        let provider = r["provider"].as_str().unwrap_or("?").to_string();
        let started = r["startedAtMs"].as_i64().unwrap_or(0) - apply_ms;
        let healthy = r["stateSinceMs"].as_i64().unwrap_or(0) - apply_ms;
        let e = by_provider
            .entry(provider)
            .or_insert((i64::MAX, i64::MIN, i64::MIN));
        e.0 = e.0.min(started);
        e.1 = e.1.max(started);
        e.2 = e.2.max(healthy);
    }
    let mut lines: Vec<String> = by_provider
        .into_iter()
        .map(|(p, (first, last, healthy))| {
            format!(
                "agent {p}: spawned replicas from +{} to +{}, last seen healthy by the agent at +{}",
                ms(first),
                ms(last),
                ms(healthy)
            )
        })
        .collect();
    let mut spawn_to_healthy: Vec<i64> = replicas
        .iter()
        .filter_map(|r| Some(r["stateSinceMs"].as_i64()? - r["startedAtMs"].as_i64()?))
        .collect();
    spawn_to_healthy.sort_unstable();
    let pct = |p: usize| {
        let i = (spawn_to_healthy.len() * p / 100).min(spawn_to_healthy.len().saturating_sub(1));
        spawn_to_healthy
            .get(i)
            .map_or_else(|| "-".into(), |v| ms(*v))
    };
    lines.push(format!(
        "per replica, spawn -> healthy at its agent: p10 {}, p50 {}, p90 {}, max {}",
        pct(10),
        pct(50),
        pct(90),
        pct(100)
    ));
    lines
}

/// Baseline figures.
#[derive(Debug)]
pub(crate) struct Baseline {
    /// From the first spawn until the last spawn returned.
    pub(crate) spawned: Duration,
    /// From the first spawn until every process answered `/healthz`.
    pub(crate) healthy: Duration,
}

/// Kills and reaps the baseline processes, also when the benchmark fails.
#[derive(Debug, Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Starts `n` `skymirror-example` processes directly and times them until
/// every one answers `GET /healthz` with 200.
pub(crate) fn baseline(bins: &Bins, n: usize, timeout: Duration) -> Result<Baseline> {
    let ports = free_ports(n)?;
    let mut procs = Procs(Vec::with_capacity(n));
    let start = Instant::now();
    for port in &ports {
        let child = Command::new(&bins.example)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting skymirror-example")?;
        procs.0.push(child);
    }
    let spawned = start.elapsed();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut pending: Vec<usize> = (0..n).collect();
    while !pending.is_empty() {
        let mut still = Vec::with_capacity(pending.len());
        for i in pending {
            let (Some(addr), Some(child)) = (addrs.get(i), procs.0.get_mut(i)) else {
                continue;
            };
            if matches!(http_get(addr, "/healthz", PROBE_TIMEOUT), Ok((200, _))) {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                bail!("skymirror-example on {addr} exited: {status}");
            }
            still.push(i);
        }
        pending = still;
        if !pending.is_empty() && start.elapsed() > timeout {
            bail!(
                "{} of {n} processes still not healthy after {timeout:?}",
                pending.len()
            );
        }
    }
    let healthy = start.elapsed();
    drop(procs);
    Ok(Baseline { spawned, healthy })
}

/// `provider -> pid` of the agents talking to the daemon at `url`: processes
/// named `skymirror-agent` whose command line has `--server <url>`.
fn agent_pids(url: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim_end() != "skymirror-agent" {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let after = |flag: &str| {
            args.windows(2)
                .find(|w| w.first().is_some_and(|f| f == flag))
                .and_then(|w| w.get(1).cloned())
        };
        if after("--server").as_deref() != Some(url) {
            continue;
        }
        if let Some(provider) = after("--provider") {
            out.insert(provider, pid);
        }
    }
    out
}

/// Resident set sizes of a process, bytes.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Peak (`VmHWM`).
    hwm: u64,
    /// Current (`VmRSS`).
    rss: u64,
}

fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            // `/proc` says kB and means KiB.
            .map(|kib| kib * 1024)
            .with_context(|| format!("{path}: no {name}"))
    };
    Ok(Memory {
        hwm: field("VmHWM:")?,
        rss: field("VmRSS:")?,
    })
}

/// User + system CPU seconds of this process's reaped children (the CLI runs).
fn children_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) as f64 / USER_HZ)
}

/// CPU seconds of the daemon (key `daemon`) and of each agent (by provider).
fn cpu_times(daemon: u32, agents: &BTreeMap<String, u32>) -> BTreeMap<String, Option<f64>> {
    std::iter::once(("daemon".to_string(), cpu_secs(daemon)))
        .chain(agents.iter().map(|(p, pid)| (p.clone(), cpu_secs(*pid))))
        .collect()
}

fn cpu_delta(
    before: &BTreeMap<String, Option<f64>>,
    after: &BTreeMap<String, Option<f64>>,
    key: &str,
) -> String {
    match (
        before.get(key).copied().flatten(),
        after.get(key).copied().flatten(),
    ) {
        (Some(b), Some(a)) => format!("{:.2} s", a - b),
        _ => "?".into(),
    }
}

/// The reconcile figures of `skymirror status -o json`.
#[derive(Debug)]
struct Reconcile {
    passes: u64,
    last_us: u64,
    mean_us: u64,
    max_us: u64,
}

fn daemon_status(cluster: &Cluster) -> Result<Reconcile> {
    let status: Value = serde_json::from_str(&cluster.cli_ok(&["status", "-o", "json"])?)
        .context("parsing `status -o json`")?;
    let d = &status["daemon"];
    let field = |name: &str| {
        d[name]
            .as_u64()
            .with_context(|| format!("`status -o json` has no daemon.{name}: {d}"))
    };
    Ok(Reconcile {
        passes: field("reconcilePasses")?,
        last_us: field("lastReconcileMicros")?,
        mean_us: field("meanReconcileMicros")?,
        max_us: field("maxReconcileMicros")?,
    })
}
