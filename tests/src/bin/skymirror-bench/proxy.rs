//! `proxy`: the front door's throughput and latency against a direct
//! connection to one replica and against nginx and HAProxy proxying the same
//! replicas, measured in the same run with `wrk`, over several rounds (each
//! round runs every target once, in turn) whose medians are reported.
//!
//! Setup: three providers (`aa`, `bb`, `cc`) with an agent each, the app `web`
//! mirrored with 2 replicas per provider and routed on a free port, a front
//! door, and (when installed) nginx with an `upstream` block of the same six
//! replicas, an upstream keep-alive pool and HTTP/1.1 to the upstreams, as
//! many worker processes as the front door has runtime worker threads (tokio
//! starts one per core), and (when installed) HAProxy in HTTP mode with the
//! same servers, `nbthread` as many, server-side keep-alive. `wrk` then runs
//! against the replica, the front door, nginx and HAProxy, in that order,
//! once per round.
//!
//! Besides wrk's figures, each run records the CPU time the proxy, the
//! replicas and wrk used, and how busy the whole machine was, because all of
//! them share the same cores.
//!
//! `wrk`, `nginx` and `haproxy` come from Debian (`apt-get install nginx-light
//! haproxy wrk`); without wrk the benchmark is skipped, without nginx or
//! HAProxy their rows are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use skymirror_tests::{
    Bins, Cluster, MARKER_VAR, app_yaml, free_port, processes_with, providers_yaml,
};

use crate::{USER_HZ, cpu_secs, missed, profile};

const PROVIDERS: [&str; 3] = ["aa", "bb", "cc"];
const APP: &str = "web";
const REPLICAS: usize = 2;
/// The front door's throughput should be at least this share of nginx's.
const THROUGHPUT_TARGET: f64 = 0.8;
/// How to get the external tools on Debian.
const INSTALL: &str = "apt-get install nginx-light haproxy wrk";
/// Upstream keep-alive connections nginx keeps per worker.
const NGINX_KEEPALIVE: u32 = 32;
/// How long nginx gets to stop on SIGTERM before it is killed.
const NGINX_STOP_GRACE: Duration = Duration::from_secs(5);
/// Extra time a wrk run gets beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Length of each wrk run, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    duration_secs: u32,
    /// wrk connections (`-c`), kept alive.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// wrk threads (`-t`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Longest wait for the cluster, the front door or nginx to be ready, seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Rounds: each runs wrk once against every target; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

pub(crate) fn proxy(args: &ProxyArgs) -> Result<()> {
    let bins = Bins::locate()?;
    let profile = profile(&bins);
    let timeout = Duration::from_secs(args.timeout_secs);
    let Some(wrk) = find_tool("wrk") else {
        println!(
            "proxy benchmark skipped: wrk is not installed (on Debian: `{INSTALL}`; wrk must be on PATH)"
        );
        return Ok(());
    };
    let nginx_bin = find_tool("nginx");
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    let (cluster, front, upstreams) = setup(timeout)?;
    let (direct_id, direct_addr) = upstreams.first().cloned().context("no replica")?;
    let edge_pid = edge_pid(&cluster).context("the front door's process is not running")?;

    let workers = cores;
    let nginx = match &nginx_bin {
        Some(bin) => {
            let dir = cluster.dir.path().join("nginx");
            match Nginx::start(bin, &dir, &upstreams, workers, timeout) {
                Ok(n) => Some(n),
                Err(e) => {
                    println!("nginx did not start, its column is skipped: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let haproxy_bin = find_tool("haproxy");
    let haproxy = match &haproxy_bin {
        Some(bin) => {
            let dir = cluster.dir.path().join("haproxy");
            match Haproxy::start(bin, &dir, &upstreams, workers, timeout) {
                Ok(h) => Some(h),
                Err(e) => {
                    println!("HAProxy did not start, its row is skipped: {e:#}");
                    None
                }
            }
        }
        None => None,
    };

    println!(
        "proxy benchmark ({profile} build): wrk -t{} -c{} -d{}s --latency, GET / over keep-alive connections; app {APP}, {REPLICAS} replicas on each of {} (skymirror-example, one thread per connection)",
        args.threads,
        args.connections,
        args.duration_secs,
        PROVIDERS.join(", ")
    );
    println!(
        "machine: {cores} cores, shared by wrk, the proxy under test and the upstream replicas (the daemon and agents idle alongside)"
    );
    match (&nginx_bin, &nginx) {
        (Some(bin), Some(n)) => println!(
            "nginx ({}, {}): worker_processes {workers} (the front door's tokio runtime runs one worker thread per core: {cores}), upstream block of the same {} replicas, keepalive {NGINX_KEEPALIVE}, proxy_http_version 1.1, Connection \"\", Host / X-Forwarded-For / X-Forwarded-Proto set as the front door does; listening on {}",
            bin.display(),
            n.version,
            upstreams.len(),
            n.addr
        ),
        (None, _) => println!(
            "nginx is not installed (on Debian: `{INSTALL}`): the nginx comparison is skipped"
        ),
        (Some(_), None) => {}
    }
    match (&haproxy_bin, &haproxy) {
        (Some(bin), Some(h)) => println!(
            "HAProxy ({}, {}): nbthread {workers}, mode http, roundrobin over the same {} servers, server-side keep-alive, option forwardfor, X-Forwarded-Proto set; listening on {}",
            bin.display(),
            h.version,
            upstreams.len(),
            h.addr
        ),
        (None, _) => println!(
            "HAProxy is not installed (on Debian: `{INSTALL}`): the HAProxy comparison is skipped"
        ),
        (Some(_), None) => {}
    }
    if profile == "debug" {
        println!(
            "note: a debug build of the front door (unoptimized) is compared with Debian's optimized nginx"
        );
    }

    let mut targets = vec![
        (format!("direct ({direct_id})"), direct_addr, Vec::new()),
        ("front door".to_string(), front, vec![edge_pid]),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx".to_string(), n.addr, n.pids()));
    }
    if let Some(h) = &haproxy {
        targets.push(("haproxy".to_string(), h.addr, vec![h.process.id()]));
    }
    let mut runs: Vec<(String, Vec<WrkRow>)> = targets
        .iter()
        .map(|(n, _, _)| (n.clone(), Vec::new()))
        .collect();
    for round in 1..=args.rounds {
        println!();
        println!("round {round} of {}:", args.rounds);
        print_header();
        for (i, (name, addr, pids)) in targets.iter().enumerate() {
            let row = run_wrk(&wrk, args, *addr, pids, &cluster)
                .with_context(|| format!("wrk against {name} ({addr})"))?;
            print_row(name, &row, cores);
            runs[i].1.push(row);
        }
    }
    drop(nginx);
    drop(haproxy);
    let rows: Vec<(String, WrkRow)> = runs
        .into_iter()
        .map(|(name, rows)| (name, median_row(rows)))
        .collect();

    println!();
    println!("median of {} rounds:", args.rounds);
    print_header();
    for (name, r) in &rows {
        print_row(name, r, cores);
    }
    println!(
        "(proxy, replicas, wrk, other: CPU used over the run, as a share of one core, {cores} cores in all; proxy/req: the proxy's CPU time per request)"
    );
    let rps = |key: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(key))
            .map(|(_, r)| r.rps)
    };
    let per_request = |key: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(key))
            .and_then(|(_, r)| r.proxy_cpu.map(|c| c / r.rps.max(1e-9) * 1e6))
    };
    for peer in ["nginx", "haproxy"] {
        if let (Some(edge), Some(other)) = (rps("front door"), rps(peer)) {
            println!(
                "front door / {peer}: throughput {:.0}%, CPU per request {} vs {} us",
                edge / other.max(1e-9) * 100.0,
                per_request("front door").map_or_else(|| "?".into(), |c| format!("{c:.0}")),
                per_request(peer).map_or_else(|| "?".into(), |c| format!("{c:.0}")),
            );
        }
    }
    rows_footer(&rows)
}

fn print_header() {
    println!(
        "{:<20} {:>8} {:>9} {:>9} {:>6} {:>6} {:>9} {:>8} {:>5} {:>6}",
        "target", "req/s", "p50", "p99", "errors", "proxy", "proxy/req", "replicas", "wrk", "other"
    );
}

/// The median of each figure over the rounds (figures taken apart: a row
/// of medians, not the median row).
fn median_row(all: Vec<WrkRow>) -> WrkRow {
    fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v.get(v.len() / 2).copied()
    }
    let errors: Vec<String> = all.iter().flat_map(|r| r.error_detail.clone()).collect();
    WrkRow {
        rps: median(all.iter().map(|r| r.rps).collect()).unwrap_or(0.0),
        p50: median(all.iter().filter_map(|r| r.p50).collect()),
        p99: median(all.iter().filter_map(|r| r.p99).collect()),
        errors: all.iter().map(|r| r.errors).sum(),
        error_detail: errors,
        proxy_cpu: median(all.iter().filter_map(|r| r.proxy_cpu).collect()),
        replicas_cpu: median(all.iter().map(|r| r.replicas_cpu).collect()).unwrap_or(0.0),
        wrk_cpu: median(all.iter().map(|r| r.wrk_cpu).collect()).unwrap_or(0.0),
        busy: median(all.iter().filter_map(|r| r.busy).collect()),
    }
}

fn print_row(name: &str, r: &WrkRow, cores: usize) {
    // Everything else the machine ran meanwhile (the daemon, agents, the
    // kernel's softirq work billed to no process, other users).
    let other = r
        .busy
        .map(|b| b * cores as f64 - r.proxy_cpu.unwrap_or(0.0) - r.replicas_cpu - r.wrk_cpu);
    println!(
        "{:<20} {:>8.0} {:>9} {:>9} {:>6} {:>6} {:>9} {:>8} {:>5} {:>6}",
        name,
        r.rps,
        latency(r.p50),
        latency(r.p99),
        r.errors,
        r.proxy_cpu.map_or_else(|| "-".into(), share),
        r.proxy_cpu.map_or_else(
            || "-".into(),
            |c| format!("{:.0} us", c / r.rps.max(1e-9) * 1e6)
        ),
        share(r.replicas_cpu),
        share(r.wrk_cpu),
        other.map_or_else(|| "?".into(), share),
    );
}

/// The comparison with nginx against the target, and the error details.
fn rows_footer(rows: &[(String, WrkRow)]) -> Result<()> {
    let rps = |key: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(key))
            .map(|(_, r)| r.rps)
    };
    match (rps("front door"), rps("nginx")) {
        (Some(edge), Some(nginx)) if nginx > 0.0 => {
            let ratio = edge / nginx;
            println!(
                "front door / nginx throughput: {:.0}% (target >= {:.0}%){}",
                ratio * 100.0,
                THROUGHPUT_TARGET * 100.0,
                missed(ratio < THROUGHPUT_TARGET)
            );
        }
        _ => println!("front door / nginx throughput: not measured (no nginx)"),
    }
    if let (Some(edge), Some(direct)) = (rps("front door"), rps("direct")) {
        println!(
            "front door / direct throughput: {:.0}%",
            edge / direct.max(1e-9) * 100.0
        );
    }
    for (name, r) in rows {
        if !r.error_detail.is_empty() {
            println!("{name}: {}", r.error_detail.join("; "));
        }
    }
    Ok(())
}

/// A replica as nginx and the direct run see it: its id and address.
type Upstream = (String, SocketAddr);

/// Starts the cluster, the app and the front door; returns the front door's
/// address and every replica's `(id, address)`.
fn setup(timeout: Duration) -> Result<(Cluster, SocketAddr, Vec<Upstream>)> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&PROVIDERS))?;
    for p in PROVIDERS {
        c.start_agent(p)?;
    }
    let front = free_port()?;
    let mut app = app_yaml(APP, u32::try_from(REPLICAS)?, "bench", &[]);
    app.push_str(&format!(
        "  routing:\n    listen: \"{front}\"\n    port: http\n"
    ));
    c.apply_ok("web.yaml", &app)?;
    let replicas = c.wait_ready(APP, &PROVIDERS, REPLICAS, 1, timeout)?;
    let mut upstreams = replicas
        .iter()
        .map(|r| {
            let id = r["id"]
                .as_str()
                .context("replica without an id")?
                .to_string();
            let addr = r["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("replica {id} has no address: {r}"))?;
            Ok((id, addr))
        })
        .collect::<Result<Vec<Upstream>>>()?;
    upstreams.sort();
    c.start_edge(&[])?;
    let all = upstreams.len();
    c.wait_front_door(front, all, timeout)?;
    Ok((c, front, upstreams))
}

/// The pid of the cluster's front door: a `skymirror edge` process carrying
/// the cluster's marker.
fn edge_pid(cluster: &Cluster) -> Option<u32> {
    processes_with(MARKER_VAR, cluster.marker())
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                raw.split(|b| *b == 0).any(|a| a == b"edge")
                    && raw
                        .split(|b| *b == 0)
                        .next()
                        .is_some_and(|a| a.ends_with(b"skymirror"))
            })
        })
}

/// An executable named `name` on PATH, or in the sbin directories (nginx
/// lives in /usr/sbin, which is not on every user's PATH).
fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What one wrk run measured.
#[derive(Debug)]
struct WrkRow {
    rps: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    /// Socket errors plus non-2xx/3xx responses.
    errors: u64,
    error_detail: Vec<String>,
    /// CPU seconds per second of wall time.
    proxy_cpu: Option<f64>,
    replicas_cpu: f64,
    wrk_cpu: f64,
    /// Share of the machine's CPU time not idle.
    busy: Option<f64>,
}

fn run_wrk(
    wrk: &Path,
    args: &ProxyArgs,
    addr: SocketAddr,
    proxy_pids: &[u32],
    cluster: &Cluster,
) -> Result<WrkRow> {
    let replica_pids: Vec<u32> = cluster
        .replica_processes()
        .into_values()
        .flatten()
        .collect();
    let sum = |pids: &[u32]| pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
    let proxy_before = sum(proxy_pids);
    let replicas_before = sum(&replica_pids);
    let children_before = children_cpu_secs();
    let machine_before = machine_jiffies();
    let started = Instant::now();

    let mut cmd = Command::new(wrk);
    cmd.arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.duration_secs))
        .arg("--latency")
        .arg(format!("http://{addr}/"));
    let limit = Duration::from_secs(u64::from(args.duration_secs)) + WRK_GRACE;
    let out = run_with_deadline(cmd, limit)?;

    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let proxy_cpu = (!proxy_pids.is_empty()).then(|| (sum(proxy_pids) - proxy_before) / wall);
    let replicas_cpu = (sum(&replica_pids) - replicas_before) / wall;
    // wrk was this process's only child reaped during the run.
    let wrk_cpu = children_cpu_secs()
        .zip(children_before)
        .map_or(0.0, |(a, b)| (a - b) / wall);
    let busy = machine_jiffies()
        .zip(machine_before)
        .and_then(|((t1, i1), (t0, i0))| {
            let total = t1.checked_sub(t0)?;
            (total > 0).then(|| 1.0 - i1.saturating_sub(i0) as f64 / total as f64)
        });
    let mut row = parse_wrk(&out)?;
    row.proxy_cpu = proxy_cpu;
    row.replicas_cpu = replicas_cpu;
    row.wrk_cpu = wrk_cpu;
    row.busy = busy;
    Ok(row)
}

/// wrk's report: `Requests/sec`, the 50% and 99% lines of the latency
/// distribution, socket errors and non-2xx/3xx responses.
fn parse_wrk(out: &str) -> Result<WrkRow> {
    let mut row = WrkRow {
        rps: 0.0,
        p50: None,
        p99: None,
        errors: 0,
        error_detail: Vec::new(),
        proxy_cpu: None,
        replicas_cpu: 0.0,
        wrk_cpu: 0.0,
        busy: None,
    };
    let mut rps = None;
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => rps = v.parse::<f64>().ok(),
            (Some("50%"), Some(v)) => row.p50 = parse_latency(v),
            (Some("99%"), Some(v)) => row.p99 = parse_latency(v),
            _ => {}
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            let n: u64 = rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            if n > 0 {
                row.errors += n;
                row.error_detail.push(format!("socket errors:{rest}"));
            }
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            let n: u64 = rest.trim().parse().unwrap_or(0);
            row.errors += n;
            row.error_detail.push(format!("{n} non-2xx/3xx responses"));
        }
    }
    row.rps = rps.with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    Ok(row)
}

/// `383.00us`, `1.23ms`, `2.00s` as wrk prints latencies.
fn parse_latency(v: &str) -> Option<Duration> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("m") {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    Duration::try_from_secs_f64(num.parse::<f64>().ok()? * scale).ok()
}

fn latency(d: Option<Duration>) -> String {
    match d {
        Some(d) if d < Duration::from_millis(1) => format!("{} us", d.as_micros()),
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        None => "?".into(),
    }
}

fn share(cpu_per_sec: f64) -> String {
    format!("{:.0}%", cpu_per_sec * 100.0)
}

/// User + system CPU seconds of this process's reaped children.
fn children_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) as f64 / USER_HZ)
}

/// (total, idle + iowait) jiffies of the whole machine, from `/proc/stat`.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// Kills a child by pid unless it was reaped; for children whose `Child` a
/// waiting thread owns.
#[derive(Debug)]
struct KillOnDrop {
    pid: u32,
    reaped: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.reaped {
            signal(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Runs `cmd` to its end and returns its stdout; kills it after `limit`.
fn run_with_deadline(mut cmd: Command, limit: Duration) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut guard = KillOnDrop {
        pid: child.id(),
        reaped: false,
    };
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            signal(guard.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            guard.reaped = true;
            bail!("{cmd:?} still running after {limit:?}; killed");
        }
    };
    guard.reaped = true;
    let _ = waiter.join();
    let out = out.with_context(|| format!("waiting for {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// nginx in the foreground (`daemon off`) as this process's child; stopped
/// (SIGTERM, then SIGKILL for the master and its workers) when dropped.
#[derive(Debug)]
struct Nginx {
    master: Child,
    workers: Vec<u32>,
    addr: SocketAddr,
    version: String,
}

impl Nginx {
    fn start(
        bin: &Path,
        dir: &Path,
        upstreams: &[Upstream],
        workers: usize,
        timeout: Duration,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let addr = free_port()?;
        let d = dir.display();
        let servers: String = upstreams
            .iter()
            .map(|(_, a)| format!("        server {a};\n"))
            .collect();
        let conf = format!(
            "worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    upstream {APP} {{
{servers}        keepalive {NGINX_KEEPALIVE};
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://{APP};
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).with_context(|| conf_path.display().to_string())?;
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .trim_start_matches("nginx version: ")
                    .to_string()
            })
            .unwrap_or_default();
        let master = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nginx = Nginx {
            master,
            workers: Vec::new(),
            addr,
            version,
        };
        let deadline = Instant::now() + timeout;
        let error_log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        // nginx has no readiness signal but its socket: poll it.
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = nginx.master.try_wait()? {
                bail!("nginx exited ({status}): {}", error_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx is not listening on {addr} after {timeout:?}: {}",
                    error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Workers fork after the master listens; find them for the CPU
        // figures and for the cleanup.
        while nginx.workers.len() < workers && Instant::now() < deadline {
            nginx.workers = children_of(nginx.master.id());
            if nginx.workers.len() < workers {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(nginx)
    }

    /// Master and workers.
    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.master.id())
            .chain(self.workers.iter().copied())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown: the master stops its workers.
        signal(self.master.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + NGINX_STOP_GRACE;
        loop {
            match self.master.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.master.kill();
                    let _ = self.master.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // Workers outlive a killed master; never leave one behind.
        for pid in &self.workers {
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "nginx")
            {
                signal(*pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// HAProxy in the foreground (`-db`), one process with `nbthread` threads;
/// stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
struct Haproxy {
    process: Child,
    addr: SocketAddr,
    version: String,
}

impl Haproxy {
    fn start(
        bin: &Path,
        dir: &Path,
        upstreams: &[Upstream],
        threads: usize,
        timeout: Duration,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let addr = free_port()?;
        let servers: String = upstreams
            .iter()
            .enumerate()
            .map(|(i, (_, a))| format!("    server s{i} {a}\n"))
            .collect();
        let conf = format!(
            "global
    nbthread {threads}
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option forwardfor
frontend edge
    bind {addr}
    http-request set-header X-Forwarded-Proto http
    default_backend {APP}
backend {APP}
    balance roundrobin
    http-reuse always
{servers}"
        );
        let conf_path = dir.join("haproxy.cfg");
        std::fs::write(&conf_path, conf).with_context(|| conf_path.display().to_string())?;
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("HAProxy version ")
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let log = dir.join("haproxy.log");
        let process = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).with_context(|| log.display().to_string())?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut haproxy = Haproxy {
            process,
            addr,
            version,
        };
        let deadline = Instant::now() + timeout;
        // HAProxy has no readiness signal but its socket: poll it.
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = haproxy.process.try_wait()? {
                bail!(
                    "haproxy exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("haproxy is not listening on {addr} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        signal(self.process.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + NGINX_STOP_GRACE;
        loop {
            match self.process.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.process.kill();
                    let _ = self.process.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_found_on_path_only_when_there() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("skymirror-no-such-tool").is_none());
    }

    #[test]
    fn wrk_report_parses() -> Result<()> {
        let out = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   635.91us    0.89ms  12.92ms   93.69%
    Req/Sec    28.94k     3.39k   38.43k    76.50%
  Latency Distribution
     50%  383.00us
     75%  533.00us
     90%    0.93ms
     99%    4.63ms
  576416 requests in 10.00s, 68.71MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:  57633.89
Transfer/sec:      6.87MB
";
        let row = parse_wrk(out)?;
        assert!((row.rps - 57633.89).abs() < 1e-6);
        assert_eq!(row.p50, Some(Duration::from_micros(383)));
        assert_eq!(row.p99, Some(Duration::from_micros(4630)));
        assert_eq!(row.errors, 15);
        assert!(parse_wrk("nothing").is_err());
        Ok(())
    }
}
