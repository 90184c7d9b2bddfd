//! End to end: what happens when a provider dies, is cut off, flaps or comes
//! back — real binaries, real processes, a real TCP relay to cut networks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use skymirror_tests::{
    Cluster, MARKER_VAR, app_yaml, prioritized_providers_yaml, processes_with, providers_yaml,
};

const WAIT: Duration = Duration::from_secs(30);

/// `app_yaml` with a placement mode and a short fail-back damping.
fn app(name: &str, replicas: u32, mode: &str, failover: &str) -> String {
    let mut y =
        app_yaml(name, replicas, "hi", &[]).replace("mode: mirror", &format!("mode: {mode}"));
    y.push_str("  failover:\n    failbackAfter: 2s\n");
    for line in failover.lines() {
        y.push_str(&format!("    {line}\n"));
    }
    y
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(p, n)| (p.to_string(), *n)).collect()
}

fn wait_counts(c: &mut Cluster, app: &str, want: &[(&str, usize)]) -> Result<()> {
    c.wait_counts(app, want, WAIT)
}

fn wait_state(c: &mut Cluster, provider: &str, state: &str) -> Result<()> {
    c.wait_state(provider, state, WAIT)
}

fn seq(e: &Value) -> u64 {
    e["seq"].as_u64().unwrap_or(0)
}

fn message(e: &Value) -> &str {
    e["message"].as_str().unwrap_or("")
}

fn three_agents(providers_doc: &str) -> Result<Cluster> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", providers_doc)?;
    for p in ["aa", "bb", "cc"] {
        c.start_agent(p)?;
    }
    c.wait_until("three agents up", WAIT, |c| {
        Ok(c.provider_states()?
            .values()
            .all(|s| s == "up")
            .then_some(()))
    })?;
    Ok(c)
}

#[test]
fn an_outage_moves_the_share_and_fail_back_makes_before_it_breaks() -> Result<()> {
    let mut c = three_agents(&providers_yaml(&["aa", "bb", "cc"]))?;
    c.apply_ok("web.yaml", &app("web", 2, "mirror", ""))?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;

    // A provider outage: the agent and its replicas die together.
    c.kill_agent("aa")?;
    ensure!(c.kill_replicas("aa")? == 2);
    wait_state(&mut c, "aa", "down")?;
    wait_counts(&mut c, "web", &[("bb", 3), ("cc", 3)])?;
    let explain: Value = serde_json::from_str(&c.cli_ok(&["explain", "web", "-o", "json"])?)?;
    let excluded = explain["excluded"].as_array().context("excluded")?;
    ensure!(
        excluded
            .iter()
            .any(|e| e["provider"] == "aa" && e["reason"].as_str().unwrap_or("").contains("down")),
        "explain does not say why aa is excluded: {explain}"
    );
    ensure!(
        explain["placements"]
            .as_array()
            .context("placements")?
            .iter()
            .any(|p| p["extraReplicas"] == 1),
        "explain shows no re-placed replicas: {explain}"
    );
    let before_return = c.events()?.last().map(seq).unwrap_or(0);

    // It comes back: after the damping it gets its share, and the survivors
    // shrink only once its replicas are healthy.
    c.start_agent("aa")?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    let events: Vec<Value> = c
        .events()?
        .into_iter()
        .filter(|e| seq(e) > before_return)
        .collect();
    // The returned share: replicas healthy after aa was given its share back.
    let share_back = events
        .iter()
        .filter(|e| e["reason"] == "Scheduled" && message(e).contains("web on aa: 0 → 2"))
        .map(seq)
        .min()
        .context("aa never got its share back")?;
    let healthy: Vec<u64> = events
        .iter()
        .filter(|e| seq(e) > share_back && e["reason"] == "ReplicaHealthy" && e["provider"] == "aa")
        .map(seq)
        .collect();
    let shrinks: Vec<u64> = events
        .iter()
        .filter(|e| {
            e["reason"] == "Scheduled"
                && (message(e).contains("web on bb: 3 → 2")
                    || message(e).contains("web on cc: 3 → 2"))
        })
        .map(seq)
        .collect();
    ensure!(
        shrinks.len() == 2,
        "expected both survivors to shrink once: {shrinks:?}"
    );
    // Make-before-break, replica by replica: the k-th survivor replica goes
    // only after the k-th returned replica is healthy.
    for (k, shrink) in shrinks.iter().enumerate() {
        let ready_before = healthy.iter().filter(|h| *h < shrink).count();
        ensure!(
            ready_before > k,
            "survivor shrink {} (event {shrink}) came with only {ready_before} of aa's replicas healthy:\n{}",
            k + 1,
            events
                .iter()
                .map(|e| format!("{} {} {}", seq(e), e["reason"], message(e)))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    ensure!(
        events
            .iter()
            .any(|e| e["reason"] == "ProviderRecovering" && e["provider"] == "aa"),
        "no ProviderRecovering event"
    );
    Ok(())
}

#[test]
fn a_silent_agent_with_live_replicas_is_a_partition_not_an_outage() -> Result<()> {
    let mut c = three_agents(&providers_yaml(&["aa", "bb", "cc"]))?;
    c.apply_ok("web.yaml", &app("web", 2, "mirror", ""))?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    let pids_before = c.replica_processes();
    let mark = c.events()?.last().map(seq).unwrap_or(0);

    c.kill_agent("aa")?;
    wait_state(&mut c, "aa", "partitioned")?;
    let moved: Vec<Value> = c
        .events()?
        .into_iter()
        .filter(|e| seq(e) > mark && (e["reason"] == "Scheduled" || e["reason"] == "ProviderDown"))
        .collect();
    ensure!(
        moved.is_empty(),
        "a partition caused re-placement: {moved:?}"
    );
    ensure!(c.ready_counts("web")? == counts(&[("aa", 2), ("bb", 2), ("cc", 2)]));

    c.start_agent("aa")?;
    wait_state(&mut c, "aa", "up")?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    ensure!(
        c.replica_processes() == pids_before,
        "replicas were restarted after the partition"
    );
    Ok(())
}

#[test]
fn a_daemon_restart_declares_nothing_down_and_moves_nothing() -> Result<()> {
    let mut c = three_agents(&providers_yaml(&["aa", "bb", "cc"]))?;
    c.apply_ok("web.yaml", &app("web", 2, "mirror", ""))?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    let pids_before = c.replica_processes();
    c.kill_daemon()?;
    c.start_daemon()?;
    let mark = c
        .events()?
        .iter()
        .filter(|e| e["reason"] == "DaemonStarted")
        .map(seq)
        .max()
        .unwrap_or(0);
    c.wait_until("every provider up after the restart", WAIT, |c| {
        Ok(c.provider_states()?
            .values()
            .all(|s| s == "up")
            .then_some(()))
    })?;
    wait_counts(&mut c, "web", &[("aa", 2), ("bb", 2), ("cc", 2)])?;
    let bad: Vec<Value> = c
        .events()?
        .into_iter()
        .filter(|e| {
            seq(e) > mark
                && ["ProviderDown", "Scheduled", "ReplicaStarted"]
                    .contains(&e["reason"].as_str().unwrap_or(""))
        })
        .collect();
    ensure!(bad.is_empty(), "the restart caused: {bad:?}");
    ensure!(
        c.replica_processes() == pids_before,
        "replicas were restarted"
    );
    Ok(())
}

#[test]
fn active_passive_promotes_the_standby_and_fails_back() -> Result<()> {
    let mut c = three_agents(&prioritized_providers_yaml(&[
        ("aa", 30),
        ("bb", 20),
        ("cc", 10),
    ]))?;
    c.apply_ok("db.yaml", &app("db", 2, "active-passive", ""))?;
    wait_counts(&mut c, "db", &[("aa", 2)])?;

    c.kill_agent("aa")?;
    c.kill_replicas("aa")?;
    wait_state(&mut c, "aa", "down")?;
    wait_counts(&mut c, "db", &[("bb", 2)])?;
    let mark = c.events()?.last().map(seq).unwrap_or(0);

    c.start_agent("aa")?;
    wait_counts(&mut c, "db", &[("aa", 2)])?;
    let events: Vec<Value> = c.events()?.into_iter().filter(|e| seq(e) > mark).collect();
    let aa_healthy = events
        .iter()
        .filter(|e| e["reason"] == "ReplicaHealthy" && e["provider"] == "aa")
        .map(seq)
        .max()
        .context("aa's replicas never became healthy")?;
    let bb_down = events
        .iter()
        .filter(|e| e["reason"] == "Scheduled" && message(e).contains("db on bb: 2 → 0"))
        .map(seq)
        .min()
        .context("bb was never scaled back to standby")?;
    ensure!(
        bb_down > aa_healthy,
        "bb stopped serving (event {bb_down}) before aa was healthy (event {aa_healthy}):\n{}",
        events
            .iter()
            .map(|e| format!("{} {} {}", seq(e), e["reason"], message(e)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

#[test]
fn a_singleton_never_runs_twice_when_its_provider_is_cut_off() -> Result<()> {
    let mut c = Cluster::start()?;
    c.apply_ok(
        "providers.yaml",
        &prioritized_providers_yaml(&[("aa", 30), ("bb", 20)]),
    )?;
    c.start_agent_behind_relay("aa")?;
    c.start_agent("bb")?;
    c.wait_until("agents up", WAIT, |c| {
        Ok(c.provider_states()?
            .values()
            .all(|s| s == "up")
            .then_some(()))
    })?;
    c.apply_ok("job.yaml", &app("job", 1, "mirror", "singleton: true"))?;
    wait_counts(&mut c, "job", &[("aa", 1)])?;

    // Watch every copy of the job from the outside while aa is cut off.
    let marker = c.marker().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut timeline: Vec<(Instant, Vec<u32>)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let pids: Vec<u32> = processes_with(MARKER_VAR, &marker)
                    .into_iter()
                    .filter(|(_, env)| env.get("SKYMIRROR_APP").map(String::as_str) == Some("job"))
                    .map(|(pid, _)| pid)
                    .collect();
                if timeline.last().is_none_or(|(_, last)| *last != pids) {
                    timeline.push((Instant::now(), pids));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            timeline
        })
    };
    c.cut("aa")?;
    let moved = wait_counts(&mut c, "job", &[("bb", 1)]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let timeline = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    moved?;
    let most = timeline.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    let described: Vec<String> = timeline
        .iter()
        .map(|(t, p)| format!("+{:?} {p:?}", t.duration_since(timeline[0].0)))
        .collect();
    ensure!(
        most <= 1,
        "two copies of the singleton ran at once: {described:?}"
    );
    ensure!(
        timeline.iter().any(|(_, p)| p.is_empty()),
        "the old copy never stopped before the new one: {described:?}"
    );
    c.restore("aa")?;
    wait_state(&mut c, "aa", "recovering").or_else(|_| wait_state(&mut c, "aa", "up"))?;
    ensure!(
        processes_with(MARKER_VAR, c.marker())
            .iter()
            .filter(|(_, env)| env.get("SKYMIRROR_APP").map(String::as_str) == Some("job"))
            .count()
            == 1,
        "more than one copy after aa came back"
    );
    Ok(())
}

#[test]
fn a_flapping_provider_is_held_out_not_bounced() -> Result<()> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb", "cc"]))?;
    c.start_agent_behind_relay("aa")?;
    c.start_agent("bb")?;
    c.start_agent("cc")?;
    c.wait_until("agents up", WAIT, |c| {
        Ok(c.provider_states()?
            .values()
            .all(|s| s == "up")
            .then_some(()))
    })?;
    c.apply_ok("web.yaml", &app("web", 1, "mirror", ""))?;
    wait_counts(&mut c, "web", &[("aa", 1), ("bb", 1), ("cc", 1)])?;
    let mark = c.events()?.last().map(seq).unwrap_or(0);

    // Flap: the network to aa goes away and comes back every 1.2 s.
    for _ in 0..5 {
        c.cut("aa")?;
        std::thread::sleep(Duration::from_millis(1200));
        c.restore("aa")?;
        std::thread::sleep(Duration::from_millis(1200));
    }
    let events: Vec<Value> = c.events()?.into_iter().filter(|e| seq(e) > mark).collect();
    ensure!(
        events
            .iter()
            .any(|e| e["reason"] == "ProviderFlapping" && e["provider"] == "aa"),
        "no ProviderFlapping event: {:?}",
        events
            .iter()
            .map(|e| format!("{} {}", e["reason"], message(e)))
            .collect::<Vec<_>>()
    );
    // Its share moved at most once, and never back during the flapping.
    let moves: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "Scheduled")
        .collect();
    for p in ["aa", "bb", "cc"] {
        let n = moves
            .iter()
            .filter(|e| message(e).contains(&format!("web on {p}:")))
            .count();
        ensure!(
            n <= 1,
            "web on {p} was rescheduled {n} times while aa flapped: {moves:?}"
        );
    }
    let explain = c.cli_ok(&["explain", "web"])?;
    ensure!(
        explain.contains("held out"),
        "explain does not say aa is held out:\n{explain}"
    );
    Ok(())
}
