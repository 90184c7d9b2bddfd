//! Chaos in the three-provider lab (`deploy/lab/lab.sh`) on the real Docker
//! engine: the daemon, three agents and the front door run as containers from
//! the images of `deploy/docker/`, each agent on its own Docker network (a
//! "cloud") with its replicas, and the test does to them what happens to
//! clouds: an outage (`docker kill` of an agent with its replicas), a
//! control-plane partition (`docker network disconnect` of an agent from the
//! daemon's network) and a daemon restart (`docker restart`). Steady load runs
//! through the front door all along; no request may fail.
//!
//! Needs the engine and the `:test` images of tests/scripts/build-test-images.sh;
//! without them each test skips, unless CI=true, where it fails. Every lab has
//! names of its own (`smlab-<id>`, providers `aws-<id>`, ...) and is torn down
//! by `lab.sh down` when the test ends, even by failing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use skymirror_tests::{
    Cluster, Load, LoadReport, docker, docker_images_ready, free_port, unique_id,
};

/// Images the lab runs, tagged `test`.
const IMAGES: [&str; 3] = [
    "skymirror-daemon:test",
    "skymirror-agent:test",
    "skymirror-example:test",
];
/// The lab's app (deploy/lab/hello.yaml): 2 replicas on each provider.
const APP: &str = "hello";
/// Bound on every wait; fail-back alone takes the app's 10 s damping.
const WAIT: Duration = Duration::from_secs(60);
/// Pause between two requests of the steady load (about 100 per second).
const LOAD_INTERVAL: Duration = Duration::from_millis(10);

/// One lab, brought up by `lab.sh up` and torn down by `lab.sh down` on drop.
struct Lab {
    /// Prefix of every container, network and volume of the lab.
    name: String,
    /// Provider names, highest priority first: `aws-<id>`, `gcp-<id>`, `hetzner-<id>`.
    clouds: Vec<String>,
    /// The front door, published on loopback.
    edge: SocketAddr,
    /// The CLI and waits, against the daemon container's published API.
    cluster: Cluster,
}

impl Lab {
    /// Brings a lab up and waits until its 6 replicas are ready; `None` when
    /// the test must skip (see the module docs).
    fn up(test: &str) -> Result<Option<Lab>> {
        if !docker_images_ready(test, &IMAGES)? {
            return Ok(None);
        }
        let id = unique_id();
        let lab = Lab {
            name: format!("smlab-{id}"),
            clouds: ["aws", "gcp", "hetzner"]
                .iter()
                .map(|c| format!("{c}-{id}"))
                .collect(),
            edge: free_port()?,
            cluster: Cluster::attach(free_port()?)?,
        };
        // Built before `up` runs, so that a failed start is torn down too.
        lab.script("up")?;
        Ok(Some(lab))
    }

    /// Runs `lab.sh ACTION` with this lab's settings.
    fn script(&self, action: &str) -> Result<()> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/lab.sh");
        let out = Command::new(&script)
            .arg(action)
            .env("SKYMIRROR_LAB", &self.name)
            .env("SKYMIRROR_LAB_CLOUDS", self.clouds.join(" "))
            .env("SKYMIRROR_LAB_TAG", "test")
            .env(
                "SKYMIRROR_LAB_API_PORT",
                self.cluster.addr.port().to_string(),
            )
            .env("SKYMIRROR_LAB_EDGE_PORT", self.edge.port().to_string())
            .env("SKYMIRROR_LAB_READY_TIMEOUT", WAIT.as_secs().to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "`lab.sh {action}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The agent container of `cloud`.
    fn agent(&self, cloud: &str) -> String {
        format!("{}-agent-{cloud}", self.name)
    }

    /// Ids of the running replica containers of every provider.
    fn containers(&self) -> Result<BTreeMap<String, BTreeSet<String>>> {
        self.clouds
            .iter()
            .map(|cloud| {
                let filter = format!("label=skymirror.provider={cloud}");
                let ids = docker(&["ps", "-q", "--no-trunc", "--filter", &filter])?;
                Ok((cloud.clone(), ids.lines().map(str::to_string).collect()))
            })
            .collect()
    }

    /// Waits until the app's ready replicas per provider, in the order of
    /// `clouds`, are `want` (a 0 means none ready there) and all settled.
    fn wait_counts(&mut self, want: [usize; 3]) -> Result<()> {
        let want: Vec<(String, usize)> = self
            .clouds
            .iter()
            .cloned()
            .zip(want)
            .filter(|(_, n)| *n > 0)
            .collect();
        let want: Vec<(&str, usize)> = want.iter().map(|(p, n)| (p.as_str(), *n)).collect();
        self.cluster.wait_counts(APP, &want, WAIT)
    }

    /// The highest event sequence number so far.
    fn last_seq(&self) -> Result<u64> {
        Ok(self
            .cluster
            .events()?
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// Reasons of the events after `seq` about the app's placement and replicas.
    fn replica_events_since(&self, seq: u64) -> Result<Vec<String>> {
        Ok(self
            .cluster
            .events()?
            .iter()
            .filter(|e| e["seq"].as_u64().is_some_and(|s| s > seq))
            .filter(|e| {
                matches!(
                    e["reason"].as_str(),
                    Some("Scheduled" | "ReplicaStarted" | "ReplicaRemoved" | "DuplicateReplicas")
                )
            })
            .map(|e| format!("{}: {}", e["reason"], e["message"]))
            .collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.script("down") {
            eprintln!("tearing down lab {}: {e:#}", self.name);
        }
    }
}

/// Fails unless the load through the front door saw no failure.
fn no_failures(report: &LoadReport) -> Result<()> {
    ensure!(report.sent > 100, "too little load to judge: {report:?}");
    ensure!(
        report.failed == 0,
        "{} of {} requests failed through the front door: {:?}",
        report.failed,
        report.sent,
        report.failures
    );
    Ok(())
}

/// Answers of `provider`'s replicas, and when the last one came.
fn served_by(report: &LoadReport, provider: &str) -> (u64, Duration) {
    report
        .by_replica
        .iter()
        .filter(|(replica, _)| replica.split('/').nth(1) == Some(provider))
        .fold((0, Duration::ZERO), |(n, last), (_, (count, at))| {
            (n + count, last.max(*at))
        })
}

#[test]
fn lab_cloud_outage_fails_over_and_back_without_failed_requests() -> Result<()> {
    let Some(mut lab) = Lab::up("lab_cloud_outage_fails_over_and_back_without_failed_requests")?
    else {
        return Ok(());
    };
    let aws = lab.clouds[0].clone();
    let before = lab.containers()?;
    let load_started = Instant::now();
    let load = Load::start(lab.edge, LOAD_INTERVAL);

    // The outage: the agent and every replica of the cloud, at once.
    let agent = lab.agent(&aws);
    let mut kill = vec!["kill", agent.as_str()];
    kill.extend(before[&aws].iter().map(String::as_str));
    std::thread::sleep(Duration::from_millis(500));
    docker(&kill)?;
    lab.cluster.wait_state(&aws, "down", WAIT)?;
    // The lost share spills onto the survivors: 2 + 1 each.
    lab.wait_counts([0, 3, 3])?;

    // The cloud returns: its replicas come back, and after the damping the
    // survivors give their extras back.
    docker(&["start", &agent])?;
    let returned_at = load_started.elapsed();
    lab.wait_counts([2, 2, 2])?;
    std::thread::sleep(Duration::from_secs(1));
    let report = load.finish()?;

    no_failures(&report)?;
    let (_, last_answer) = served_by(&report, &aws);
    ensure!(
        last_answer > returned_at,
        "{aws} served nothing after it returned: {:?}",
        report.by_replica
    );
    let after = lab.containers()?;
    for cloud in &lab.clouds {
        ensure!(
            after[cloud].len() == 2,
            "{cloud} runs {:?} after fail-back",
            after[cloud]
        );
    }
    Ok(())
}

#[test]
fn lab_control_plane_partition_replaces_nothing_and_leaves_no_duplicates() -> Result<()> {
    let Some(mut lab) =
        Lab::up("lab_control_plane_partition_replaces_nothing_and_leaves_no_duplicates")?
    else {
        return Ok(());
    };
    let gcp = lab.clouds[1].clone();
    let before = lab.containers()?;
    let seq = lab.last_seq()?;
    let load = Load::start(lab.edge, LOAD_INTERVAL);

    // The agent loses the daemon; its replicas stay reachable from the edge
    // and from the daemon's outside probes.
    let control = format!("{}-control", lab.name);
    let agent = lab.agent(&gcp);
    docker(&["network", "disconnect", &control, &agent])?;
    lab.cluster.wait_state(&gcp, "partitioned", WAIT)?;
    // Held for longer than an outage needs to be declared (3 s): nothing moves.
    let held_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < held_until {
        let states = lab.cluster.provider_states()?;
        ensure!(
            states.get(&gcp).map(String::as_str) == Some("partitioned"),
            "{gcp} left the partitioned state while cut off: {states:?}"
        );
        ensure!(
            lab.containers()? == before,
            "containers changed during the partition"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    docker(&["network", "connect", &control, &agent])?;
    lab.cluster.wait_state(&gcp, "up", WAIT)?;
    lab.wait_counts([2, 2, 2])?;
    let report = load.finish()?;

    no_failures(&report)?;
    ensure!(
        served_by(&report, &gcp).0 > 0,
        "the partitioned cloud's replicas stopped serving: {:?}",
        report.by_replica
    );
    ensure!(
        lab.containers()? == before,
        "the partition left other containers than before"
    );
    let moved = lab.replica_events_since(seq)?;
    ensure!(moved.is_empty(), "replicas moved: {moved:?}");
    Ok(())
}

#[test]
fn lab_daemon_restart_keeps_state_and_restarts_nothing() -> Result<()> {
    let Some(mut lab) = Lab::up("lab_daemon_restart_keeps_state_and_restarts_nothing")? else {
        return Ok(());
    };
    let before = lab.containers()?;
    let apps_before = lab.cluster.apps()?;
    let seq = lab.last_seq()?;
    let load = Load::start(lab.edge, LOAD_INTERVAL);

    std::thread::sleep(Duration::from_millis(500));
    docker(&["restart", &format!("{}-daemon", lab.name)])?;
    let clouds = lab.clouds.clone();
    lab.cluster
        .wait_until("every provider up after the restart", WAIT, |c| {
            let states = c.provider_states()?;
            Ok(clouds
                .iter()
                .all(|p| states.get(p).map(String::as_str) == Some("up"))
                .then_some(()))
        })?;
    lab.wait_counts([2, 2, 2])?;
    // Long enough for a reconcile pass (every 5 s) to have run.
    std::thread::sleep(Duration::from_secs(6));
    let report = load.finish()?;

    no_failures(&report)?;
    ensure!(
        lab.containers()? == before,
        "containers changed across the daemon restart"
    );
    let apps_after = lab.cluster.apps()?;
    ensure!(
        apps_after.len() == apps_before.len()
            && apps_after
                .iter()
                .zip(&apps_before)
                .all(|(a, b)| a["generation"] == b["generation"] && a["spec"] == b["spec"]),
        "the stored apps changed: {apps_before:?} → {apps_after:?}"
    );
    let seqs: BTreeSet<u64> = lab
        .cluster
        .events()?
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    ensure!(
        seqs.contains(&seq) && seqs.last().is_some_and(|last| *last > seq),
        "the event log lost its history across the restart: event {seq} of {seqs:?}"
    );
    let moved = lab.replica_events_since(seq)?;
    ensure!(moved.is_empty(), "replicas moved: {moved:?}");
    Ok(())
}
