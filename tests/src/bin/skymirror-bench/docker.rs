//! `docker`: time from `apply` to every replica healthy with the docker
//! driver, for 1, 10 and 50 replicas on one host, against the engine's own
//! `docker run` of the same image measured in the same run. Each count is
//! measured `--rounds` times, baseline and skymirror alternating, and the
//! medians are compared: one round on a shared machine is noise.
//!
//! Containers do not inherit the cluster's marker variable, so everything this
//! benchmark creates carries a label of its own (baseline containers
//! `skymirror.bench=<run>`, replicas `skymirror.provider=<provider>`) and
//! [`Containers`] removes them by label when the benchmark ends, even by failing.

use std::collections::BTreeSet;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use skymirror_tests::{Cluster, docker as docker_cli, http_get, unique_id};

use crate::{free_ports, missed, profile, secs};

/// The image of tests/scripts/build-test-images.sh.
const IMAGE: &str = "skymirror-example:test";
/// Port the example app listens on inside a baseline container.
const CONTAINER_PORT: u16 = 8080;
/// Connect/read timeout of one baseline health probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the agent gets to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Target from the issue: skymirror's overhead under 10% of the engine's own time.
const OVERHEAD_TARGET_PCT: f64 = 10.0;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DockerArgs {
    /// Replica counts to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 10, 50])]
    replicas: Vec<u32>,
    /// Rounds per replica count (baseline and skymirror each time).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Longest wait for everything to be healthy (or gone), seconds, per step.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Figures for one replica count, one entry per round.
#[derive(Debug)]
struct Row {
    replicas: u32,
    baseline: Vec<Duration>,
    skymirror: Vec<Duration>,
}

/// The median of `times` (the lower middle one of an even count).
fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// `min–max` of `times`, in seconds.
fn range(times: &[Duration]) -> String {
    let min = times.iter().min().copied().unwrap_or_default();
    let max = times.iter().max().copied().unwrap_or_default();
    format!("{:.2}–{:.2}", min.as_secs_f64(), max.as_secs_f64())
}

pub(crate) fn docker(args: &DockerArgs) -> Result<()> {
    if let Err(reason) = docker_cli(&["image", "inspect", IMAGE]) {
        bail!(
            "the docker benchmark needs a Docker engine and the image {IMAGE} ({reason:#}); build it with tests/scripts/build-test-images.sh"
        );
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let run = unique_id();
    let provider = format!("bench-{run}");
    let mut cluster = Cluster::start()?;
    // Declared after the cluster so it drops first: the agent is gone before
    // its containers are removed, and nothing recreates them.
    let mut guard = Containers {
        run: run.clone(),
        provider: provider.clone(),
        agent: None,
    };
    cluster.apply_ok(
        "providers.yaml",
        &format!(
            "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n  name: {provider}\nspec:\n  driver: docker\n"
        ),
    )?;
    guard.agent = Some(start_agent(&cluster, &provider)?);
    cluster.wait_until("the docker agent to connect", CONNECT_TIMEOUT, |c| {
        Ok((c.provider_states()?.get(&provider).map(String::as_str) == Some("up")).then_some(()))
    })?;

    let mut rows = Vec::new();
    for &n in &args.replicas {
        let mut row = Row {
            replicas: n,
            baseline: Vec::new(),
            skymirror: Vec::new(),
        };
        for round in 1..=args.rounds.max(1) {
            let baseline = baseline(&run, n, timeout)
                .with_context(|| format!("baseline, {n} replicas, round {round}"))?;
            let skymirror = skymirror(&mut cluster, &provider, n, timeout)
                .with_context(|| format!("skymirror, {n} replicas, round {round}"))?;
            println!(
                "{n} replicas, round {round}: docker run -> all healthy in {}; apply -> all ready in {}",
                secs(baseline),
                secs(skymirror)
            );
            row.baseline.push(baseline);
            row.skymirror.push(skymirror);
        }
        rows.push(row);
    }

    println!();
    println!(
        "docker benchmark ({} build), image {IMAGE}, one host, provider {provider}, {} rounds (median, min–max in s):",
        profile(&cluster.bins),
        args.rounds.max(1)
    );
    println!(
        "{:>8}  {:>9}  {:>11}  {:>9}  {:>11}  {:>9}  {:>8}",
        "replicas", "baseline", "", "skymirror", "", "overhead", "overhead"
    );
    for r in &rows {
        let (baseline, skymirror) = (median(&r.baseline), median(&r.skymirror));
        let overhead = skymirror.as_secs_f64() - baseline.as_secs_f64();
        let pct = overhead / baseline.as_secs_f64().max(1e-9) * 100.0;
        println!(
            "{:>8}  {:>9}  {:>11}  {:>9}  {:>11}  {:>7.2} s  {:>7.1}% (target < {OVERHEAD_TARGET_PCT:.0}%){}",
            r.replicas,
            secs(baseline),
            range(&r.baseline),
            secs(skymirror),
            range(&r.skymirror),
            overhead,
            pct,
            missed(pct >= OVERHEAD_TARGET_PCT)
        );
    }
    println!(
        "baseline: `docker run -d` of N containers from N threads until every one answers GET /healthz; \
skymirror: `apply` of an app with N replicas until the event stream has said each is healthy (checked against `get replicas` after)"
    );
    Ok(())
}

/// Starts `n` containers with `docker run -d`, concurrently, and times them
/// until every one answers `GET /healthz` with 200; then removes them.
fn baseline(run: &str, n: u32, timeout: Duration) -> Result<Duration> {
    let ports = free_ports(usize::try_from(n)?)?;
    let label = format!("skymirror.bench={run}");
    let start = Instant::now();
    let threads: Vec<_> = ports
        .into_iter()
        .enumerate()
        .map(|(i, port)| {
            let name = format!("skymirror-bench-{run}-{n}-{i}");
            let label = label.clone();
            std::thread::spawn(move || -> Result<()> {
                let publish = format!("127.0.0.1:{port}:{CONTAINER_PORT}");
                let env = format!("PORT={CONTAINER_PORT}");
                docker_cli(&[
                    "run", "-d", "--name", &name, "--label", &label, "-e", &env, "-p", &publish,
                    IMAGE, "--host", "0.0.0.0",
                ])?;
                let addr = format!("127.0.0.1:{port}");
                while !matches!(http_get(&addr, "/healthz", PROBE_TIMEOUT), Ok((200, _))) {
                    if start.elapsed() > timeout {
                        bail!("{name} on {addr} not healthy after {timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
        })
        .collect();
    let mut result = Ok(());
    for t in threads {
        let r = t
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a baseline thread panicked")));
        if result.is_ok() {
            result = r;
        }
    }
    let took = start.elapsed();
    remove_labelled(&label);
    result.map(|()| took)
}

/// Applies an app with `n` replicas, times it until all are ready, deletes it
/// and waits until its containers are gone.
fn skymirror(cluster: &mut Cluster, provider: &str, n: u32, timeout: Duration) -> Result<Duration> {
    let app = format!("bench-{n}");
    let spec = cluster.write_spec(&format!("{app}.yaml"), &app_yaml(&app, n))?;
    let spec = spec.to_string_lossy().into_owned();
    let want = usize::try_from(n)?;
    // Readiness is read off the event stream: a CLI call per event would cost
    // the machine more than some of what is measured.
    cluster.follow_events()?;
    let applied_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let start = Instant::now();
    cluster.cli_ok(&["apply", "-f", &spec])?;
    let mut healthy = BTreeSet::new();
    cluster.wait_events(&format!("{n} replicas of {app} healthy"), timeout, |e| {
        if e["reason"] == "ReplicaHealthy"
            && e["app"] == app.as_str()
            && e["timeMs"].as_i64().is_some_and(|t| t >= applied_ms)
        {
            healthy.insert(e["object"].as_str().unwrap_or_default().to_string());
        }
        healthy.len() == want
    })?;
    let took = start.elapsed();
    let ready = cluster
        .replicas()?
        .iter()
        .filter(|r| r["app"] == app.as_str() && r["ready"] == true)
        .count();
    if ready != want {
        bail!("{n} replicas of {app} reported healthy, but {ready} are ready");
    }
    cluster.cli_ok(&["delete", "app", &app])?;
    cluster.wait_until(
        &format!("the containers of {app} to be gone"),
        timeout,
        |_| {
            Ok(containers(&format!("skymirror.provider={provider}"))?
                .is_empty()
                .then_some(()))
        },
    )?;
    Ok(took)
}

/// The example app as an image, with an HTTP health check, as in tests/tests/docker.rs.
fn app_yaml(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: {name}
spec:
  image: {IMAGE}
  args: [\"--host\", \"0.0.0.0\"]
  ports:
    - name: http
  replicas: {replicas}
  stopGracePeriod: 2s
  health:
    http: {{path: /healthz, port: http}}
    interval: 500ms
    timeout: 400ms
    failureThreshold: 2
"
    )
}

/// Starts the agent of `provider` with `--driver docker`, as the docker
/// end-to-end tests do (the harness only starts process agents).
fn start_agent(c: &Cluster, provider: &str) -> Result<Child> {
    c.agent_process(provider, &c.url(), "docker")
}

/// Kills the agent and removes every container of this run, also when the
/// benchmark fails.
#[derive(Debug)]
struct Containers {
    run: String,
    provider: String,
    agent: Option<Child>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        remove_labelled(&format!("skymirror.bench={}", self.run));
        remove_labelled(&format!("skymirror.provider={}", self.provider));
    }
}

/// Full ids of every container with `label` (`key=value`), running or not.
fn containers(label: &str) -> Result<BTreeSet<String>> {
    let filter = format!("label={label}");
    Ok(
        docker_cli(&["ps", "-aq", "--no-trunc", "--filter", &filter])?
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

/// `docker rm -f -v` every container with `label`; best effort.
fn remove_labelled(label: &str) {
    if let Ok(ids) = containers(label)
        && !ids.is_empty()
    {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids.iter().map(String::as_str));
        let _ = docker_cli(&args);
    }
}
