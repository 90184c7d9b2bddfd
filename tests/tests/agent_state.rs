//! End to end: the agent's state directory damaged while the agent is down.
//! Each damage is replayed on real binaries with real replica processes; the
//! restarted agent must keep every replica (the same processes, no restart),
//! leave no duplicate running (processes counted by the harness's marker),
//! and converge to the daemon's assignment.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use skymirror_tests::{Cluster, app_yaml, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);

/// A cluster of `providers`, each running two replicas of `web`. Every case
/// restarts the agent of a provider of its own: the daemon holds out a
/// provider whose agent drops out three times within 30 s (flapping), and
/// takes its share away.
fn cluster(providers: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(providers))?;
    for p in providers {
        c.start_agent(p)?;
    }
    c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    c.wait_ready("web", providers, 2, 1, WAIT)?;
    Ok(c)
}

/// `replica id -> instance id` of `web` on `provider`, as the daemon reports them.
fn instances(c: &Cluster, provider: &str) -> Result<BTreeMap<String, String>> {
    Ok(c.replicas()?
        .iter()
        .filter(|r| r["app"] == "web" && r["provider"] == provider)
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["instanceId"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// `replica id -> pids` of the replica processes of `provider` that run,
/// found by the harness's marker: the ground truth, whatever the daemon or
/// the agent say.
fn processes(c: &Cluster, provider: &str) -> BTreeMap<String, Vec<String>> {
    c.replica_processes()
        .into_iter()
        .filter(|(id, _)| id.split('/').nth(1) == Some(provider))
        .map(|(id, pids)| (id, pids.iter().map(ToString::to_string).collect()))
        .collect()
}

/// Waits until `provider` has applied its current assignment and `web` is
/// ready there on exactly the instances of `before`, one process each.
fn wait_kept(
    c: &mut Cluster,
    provider: &str,
    before: &BTreeMap<String, String>,
    what: &str,
) -> Result<()> {
    let expected: BTreeMap<String, Vec<String>> = before
        .iter()
        .map(|(id, pid)| (id.clone(), vec![pid.clone()]))
        .collect();
    c.wait_until(
        &format!("{what}: {provider} converged on the same replicas"),
        WAIT,
        |c| {
            let providers = c.providers()?;
            let Some(p) = providers.iter().find(|p| p["name"] == provider) else {
                bail!("no provider {provider}");
            };
            let (assigned, applied) = (
                p["assignmentRevision"].as_u64().unwrap_or(0),
                p["appliedRevision"].as_u64().unwrap_or(0),
            );
            if p["state"] != "up" || assigned == 0 || applied < assigned {
                bail!(
                    "{provider} is {} at revision {applied} of {assigned}",
                    p["state"]
                );
            }
            let ready = c
                .replicas()?
                .iter()
                .filter(|r| r["app"] == "web" && r["provider"] == provider && r["ready"] == true)
                .count();
            let (now, running) = (instances(c, provider)?, processes(c, provider));
            ensure!(
                now == *before && running == expected && ready == before.len(),
                "{ready} ready; reported {now:?}; running {running:?}"
            );
            Ok(Some(()))
        },
    )
}

/// Damages `file` as `how` says.
fn damage(file: &Path, how: &str) -> Result<()> {
    let bytes = std::fs::read(file)?;
    match how {
        "delete" => std::fs::remove_file(file)?,
        "empty" => std::fs::write(file, b"")?,
        "half" => std::fs::write(file, &bytes[..bytes.len() / 2])?,
        "garbage" => {
            // A fixed xorshift: the same bytes on every run.
            let mut seed: u32 = 0x9e37_79b9;
            let garbage: Vec<u8> = (0..bytes.len().max(64))
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed.to_le_bytes()[0]
                })
                .collect();
            std::fs::write(file, garbage)?;
        }
        "one byte flipped" => {
            let mut bytes = bytes;
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
            std::fs::write(file, bytes)?;
        }
        other => bail!("unknown damage {other}"),
    }
    Ok(())
}

/// Lines of `provider`'s agent log that contain `needle`.
fn logged(c: &Cluster, provider: &str, needle: &str) -> Result<usize> {
    let log = std::fs::read_to_string(c.dir.path().join(format!("agent-{provider}.log")))?;
    Ok(log.lines().filter(|l| l.contains(needle)).count())
}

/// Starts `provider`'s agent again and waits until the daemon has its new
/// session: what the daemon says from then on is what the new agent told it,
/// not what it kept of the agent before.
fn restart_agent(c: &mut Cluster, provider: &str) -> Result<()> {
    let mark = c
        .events()?
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);
    c.follow_events()?;
    c.start_agent(provider)?;
    c.wait_events(&format!("{provider}'s agent connected again"), WAIT, |e| {
        e["reason"] == "ProviderConnected"
            && e["provider"] == provider
            && e["seq"].as_u64().unwrap_or(0) > mark
    })
}

/// Stops `provider`'s agent, damages `file` of its state directory, starts
/// it again and expects it to keep every replica; returns how many more log
/// lines name the damage.
fn replay(c: &mut Cluster, provider: &str, file: &str, how: &str, message: &str) -> Result<usize> {
    let before = instances(c, provider)?;
    ensure!(before.len() == 2, "web runs on {provider}: {before:?}");
    let logged_before = logged(c, provider, message)?;
    c.kill_agent(provider)?;
    damage(&c.agent_dir(provider).join(file), how)?;
    restart_agent(c, provider)?;
    wait_kept(c, provider, &before, &format!("{file} {how}"))?;
    Ok(logged(c, provider, message)? - logged_before)
}

#[test]
fn a_damaged_assignment_file_keeps_every_replica_until_the_daemon_sends_it_again() -> Result<()> {
    let cases = [
        (
            "a1",
            "empty",
            "assignment.pb: damaged: it is empty (0 bytes)",
        ),
        ("a2", "half", "assignment.pb: damaged: truncated"),
        (
            "a3",
            "garbage",
            "assignment.pb: damaged: it has no header of this release",
        ),
        (
            "a4",
            "one byte flipped",
            "assignment.pb: damaged: its checksum does not match",
        ),
    ];
    let mut c = cluster(&["a1", "a2", "a3", "a4", "a5"])?;
    for (provider, how, message) in cases {
        let said = replay(&mut c, provider, "assignment.pb", how, message)?;
        ensure!(said >= 1, "{how}: the agent did not say {message:?}");
        // The daemon's assignment replaced the damaged file.
        let kept = std::fs::read(c.agent_dir(provider).join("assignment.pb"))?;
        ensure!(
            kept.starts_with(b"skymirror-agent-state 1 assignment "),
            "{how}: the assignment was not written again"
        );
    }
    let said = replay(
        &mut c,
        "a5",
        "assignment.pb",
        "delete",
        "assignment.pb: damaged",
    )?;
    ensure!(said == 0, "a missing assignment is no damage");
    Ok(())
}

#[test]
fn a_lost_or_damaged_handle_file_adopts_the_same_processes_and_leaves_no_duplicate() -> Result<()> {
    let cases = [
        ("h1", "delete", "adopted a running replica the driver found"),
        (
            "h2",
            "garbage",
            "replicas.json: damaged: it has no header of this release",
        ),
        ("h3", "half", "replicas.json: damaged: truncated"),
        (
            "h4",
            "empty",
            "replicas.json: damaged: it is empty (0 bytes)",
        ),
    ];
    let mut c = cluster(&["h1", "h2", "h3", "h4", "h5"])?;
    for (provider, how, message) in cases {
        let said = replay(&mut c, provider, "replicas.json", how, message)?;
        ensure!(said >= 1, "{how}: the agent did not say {message:?}");
    }
    // Both files at once: the replicas are found, kept as they are until
    // the daemon's assignment arrives, and then kept by it.
    let before = instances(&c, "h5")?;
    c.kill_agent("h5")?;
    damage(&c.agent_dir("h5").join("replicas.json"), "garbage")?;
    damage(&c.agent_dir("h5").join("assignment.pb"), "empty")?;
    restart_agent(&mut c, "h5")?;
    wait_kept(&mut c, "h5", &before, "both files damaged")?;

    // A replica the assignment no longer wants, found without its handle, is
    // stopped once the daemon's assignment arrives: nothing is left running.
    c.kill_agent("h5")?;
    c.apply_ok("web.yaml", &app_yaml("web", 1, "v1", &[]))?;
    damage(&c.agent_dir("h5").join("replicas.json"), "delete")?;
    restart_agent(&mut c, "h5")?;
    let kept: BTreeMap<String, String> = before
        .into_iter()
        .filter(|(id, _)| id.ends_with("/0"))
        .collect();
    wait_kept(&mut c, "h5", &kept, "scaled down while the agent was down")?;
    Ok(())
}

#[test]
fn a_damaged_agent_id_is_replaced_with_a_warning_and_nothing_restarts() -> Result<()> {
    let mut c = cluster(&["i1"])?;
    let agent_id = |c: &Cluster| -> Result<String> {
        Ok(c.providers()?
            .iter()
            .find(|p| p["name"] == "i1")
            .and_then(|p| p["agentId"].as_str())
            .unwrap_or_default()
            .to_string())
    };
    let first = agent_id(&c)?;
    let said = replay(
        &mut c,
        "i1",
        "agent-id",
        "half",
        "the agent id is damaged: this agent takes a new id",
    )?;
    ensure!(said == 1, "the agent warned {said} times");
    let second = agent_id(&c)?;
    ensure!(
        !second.is_empty() && second != first,
        "the agent kept the id {first:?}: {second:?}"
    );
    // The damaged file is kept aside: half of what a whole one holds.
    let aside = std::fs::read(c.agent_dir("i1").join("agent-id.damaged"))?;
    let whole = std::fs::read(c.agent_dir("i1").join("agent-id"))?;
    ensure!(
        aside.len() == whole.len() / 2 && whole.starts_with(&aside[..10]),
        "the damaged id is kept aside: {:?}",
        String::from_utf8_lossy(&aside)
    );
    Ok(())
}
