//! End to end: apply, converge, scale, replace, delete; daemon and agent
//! crashes; bad input; crash-looping replicas. Real binaries, real sockets,
//! real processes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use skymirror_tests::{Cluster, alive, app_yaml, http_get, providers_yaml};

const PROVIDERS: [&str; 3] = ["aa", "bb", "cc"];
const WAIT: Duration = Duration::from_secs(30);

fn cluster_with_agents() -> Result<Cluster> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&PROVIDERS))?;
    for p in PROVIDERS {
        c.start_agent(p)?;
    }
    c.wait_until("three agents connected", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .all(|p| p["state"] == "up")
            .then_some(()))
    })?;
    Ok(c)
}

/// `replica id -> pid` of an app.
fn pids(replicas: &[Value], app: &str) -> BTreeMap<String, String> {
    replicas
        .iter()
        .filter(|r| r["app"] == app)
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["instanceId"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pid_set(p: &BTreeMap<String, String>) -> Vec<u32> {
    p.values().filter_map(|v| v.parse().ok()).collect()
}

#[test]
fn apply_converges_scales_replaces_and_deletes() -> Result<()> {
    let mut c = cluster_with_agents()?;
    let out = c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    ensure!(out.contains("app/web created"), "apply said: {out}");
    let replicas = c.wait_ready("web", &PROVIDERS, 2, 1, WAIT)?;

    // Every replica answers its health check at its reported address.
    for r in &replicas {
        let addr = r["address"].as_str().context("address")?;
        let (status, _) = http_get(addr, "/healthz", Duration::from_secs(2))?;
        ensure!(status == 200, "{addr}/healthz answered {status}");
        let (_, body) = http_get(addr, "/", Duration::from_secs(2))?;
        ensure!(
            body.contains(r["id"].as_str().unwrap_or("?")),
            "{addr} answered {body:?}, expected its id {}",
            r["id"]
        );
    }

    // Re-applying the same file changes nothing.
    let again = c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    ensure!(
        again.trim() == "app/web unchanged",
        "re-apply said: {again}"
    );
    let apps = c.apps()?;
    ensure!(
        apps[0]["generation"] == 1,
        "generation bumped by an unchanged apply: {}",
        apps[0]
    );

    // Scale 2 → 4 → 1.
    c.apply_ok("web.yaml", &app_yaml("web", 4, "v1", &[]))?;
    let four = c.wait_ready("web", &PROVIDERS, 4, 1, WAIT)?;
    let before_shrink = pids(&four, "web");
    c.apply_ok("web.yaml", &app_yaml("web", 1, "v1", &[]))?;
    let one = c.wait_ready("web", &PROVIDERS, 1, 1, WAIT)?;
    let kept = pids(&one, "web");
    for (id, pid) in &kept {
        ensure!(
            before_shrink.get(id) == Some(pid),
            "scaling down restarted {id}"
        );
    }
    let removed: Vec<u32> = before_shrink
        .iter()
        .filter(|(id, _)| !kept.contains_key(*id))
        .filter_map(|(_, p)| p.parse().ok())
        .collect();
    c.wait_until("scaled-down replicas to exit", WAIT, |_| {
        Ok(removed.iter().all(|p| !alive(*p)).then_some(()))
    })?;

    // A change of the command replaces the replicas (new processes, generation 4).
    // The command itself changes: the same program, named by its absolute path.
    let command = c.bins.example.to_string_lossy().to_string();
    let v2 = app_yaml("web", 1, "v2", &[])
        .replace("command: skymirror-example", &format!("command: {command}"));
    ensure!(v2.contains(&command), "the spec did not change its command");
    c.apply_ok("web.yaml", &v2)?;
    let replaced = c.wait_ready("web", &PROVIDERS, 1, 4, WAIT)?;
    for (id, pid) in pids(&replaced, "web") {
        ensure!(kept.get(&id) != Some(&pid), "{id} was not replaced");
    }
    for r in &replaced {
        let (_, body) = http_get(
            r["address"].as_str().context("address")?,
            "/",
            Duration::from_secs(2),
        )?;
        ensure!(
            body.contains("v2"),
            "replaced replica still serves the old workload: {body:?}"
        );
    }

    // Delete stops everything.
    let replaced_pids = pid_set(&pids(&replaced, "web"));
    c.cli_ok(&["delete", "app", "web"])?;
    c.wait_until("every replica of web to be gone", WAIT, |c| {
        Ok((c.replicas()?.is_empty() && c.replica_processes().is_empty()).then_some(()))
    })?;
    ensure!(
        replaced_pids.iter().all(|p| !alive(*p)),
        "replica processes left running after delete"
    );
    Ok(())
}

#[test]
fn daemon_kill_9_keeps_state_and_restarts_nothing() -> Result<()> {
    let mut c = cluster_with_agents()?;
    c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    // kill -9 right after apply returns: the apply must be durable.
    c.kill_daemon()?;
    c.start_daemon()?;
    ensure!(
        c.apps()?.len() == 1,
        "the apply was lost by a kill -9 right after it returned"
    );
    let ready = c.wait_ready("web", &PROVIDERS, 2, 1, WAIT)?;
    let before = pids(&ready, "web");
    let last_seq = c
        .events()?
        .last()
        .and_then(|e| e["seq"].as_u64())
        .context("no events")?;

    c.kill_daemon()?;
    c.start_daemon()?;
    c.wait_until("agents to reconnect", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .all(|p| p["state"] == "up")
            .then_some(()))
    })?;
    let after = pids(&c.wait_ready("web", &PROVIDERS, 2, 1, WAIT)?, "web");
    ensure!(
        before == after,
        "replicas changed across a daemon restart:\nbefore {before:?}\nafter  {after:?}"
    );
    let events = c.events()?;
    ensure!(
        events
            .iter()
            .any(|e| e["reason"] == "DaemonStarted" && e["seq"].as_u64().unwrap_or(0) > last_seq),
        "the event log did not continue after the restart"
    );
    ensure!(
        events
            .iter()
            .all(|e| e["reason"] != "ReplicaStarted" || e["seq"].as_u64().unwrap_or(0) <= last_seq),
        "a replica was started after the daemon restart"
    );
    Ok(())
}

#[test]
fn agent_kill_9_adopts_its_replicas() -> Result<()> {
    let mut c = cluster_with_agents()?;
    c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    let before = pids(&c.wait_ready("web", &PROVIDERS, 2, 1, WAIT)?, "web");
    c.kill_agent("aa")?;
    c.start_agent("aa")?;
    c.wait_until("the agent of aa to reconnect", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .any(|p| {
                p["name"] == "aa"
                    && p["state"] == "up"
                    && p["appliedRevision"].as_u64().unwrap_or(0) > 0
            })
            .then_some(()))
    })?;
    let after = pids(&c.wait_ready("web", &PROVIDERS, 2, 1, WAIT)?, "web");
    ensure!(
        before == after,
        "replicas changed across an agent restart:\nbefore {before:?}\nafter  {after:?}"
    );
    // No duplicates: exactly one process per replica.
    let procs = c.replica_processes();
    ensure!(
        procs.len() == 6 && procs.values().all(|p| p.len() == 1),
        "replica processes: {procs:?}"
    );
    Ok(())
}

#[test]
fn replicas_keep_serving_while_the_daemon_is_down() -> Result<()> {
    let mut c = cluster_with_agents()?;
    c.apply_ok("web.yaml", &app_yaml("web", 1, "v1", &[]))?;
    let ready = c.wait_ready("web", &PROVIDERS, 1, 1, WAIT)?;
    let before = pids(&ready, "web");
    let addrs: Vec<String> = ready
        .iter()
        .filter_map(|r| r["address"].as_str().map(String::from))
        .collect();
    c.kill_daemon()?;
    // Serve for three seconds of control-plane outage: every request must succeed.
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        for a in &addrs {
            let (status, _) = http_get(a, "/", Duration::from_secs(2))?;
            ensure!(
                status == 200,
                "{a} answered {status} while the daemon was down"
            );
            served += 1;
        }
    }
    ensure!(served > 0);
    ensure!(
        c.replica_processes().len() == 3,
        "replicas stopped while the daemon was down"
    );
    c.start_daemon()?;
    c.wait_until("every agent to reconnect", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .all(|p| p["state"] == "up")
            .then_some(()))
    })?;
    let after = pids(&c.wait_ready("web", &PROVIDERS, 1, 1, WAIT)?, "web");
    ensure!(before == after, "replicas were restarted");
    Ok(())
}

#[test]
fn crash_looping_replica_backs_off() -> Result<()> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa"]))?;
    c.start_agent("aa")?;
    c.apply_ok(
        "crash.yaml",
        &app_yaml("crash", 1, "x", &[("CRASH_AFTER_MS", "50")]),
    )?;
    let started = Instant::now();
    let r = c.wait_until("the replica to be reported crash-looping", WAIT, |c| {
        Ok(c.replicas()?
            .into_iter()
            .find(|r| r["app"] == "crash" && r["crashLooping"] == true))
    })?;
    let restarts = r["restarts"].as_u64().unwrap_or(0);
    let elapsed = started.elapsed();
    // Backoff 0.5 s, 1 s, 2 s …: three restarts take about 1.5 s; a busy loop
    // would restart dozens of times in the same time.
    ensure!(
        restarts >= 3,
        "crash-looping after only {restarts} restarts"
    );
    ensure!(
        restarts <= 6,
        "{restarts} restarts in {elapsed:?}: not backing off"
    );
    ensure!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("exited with code 1"),
        "message: {}",
        r["message"]
    );
    let events = c.events()?;
    ensure!(
        events.iter().any(|e| e["reason"] == "ReplicaCrashLooping"),
        "no ReplicaCrashLooping event"
    );
    Ok(())
}
