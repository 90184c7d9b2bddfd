//! End to end with the docker driver: agents started with `--driver docker`
//! run image-based apps as containers on the local Docker engine: apply, read
//! output, scale, replace on an image change, adopt after an agent `kill -9`,
//! report an image that cannot be pulled, delete.
//!
//! Needs a Docker engine and the images of tests/scripts/build-test-images.sh
//! (nothing can be pulled). Without them each test skips, unless CI=true, where
//! it fails. Containers do not inherit the cluster's marker variable, so every
//! test uses provider names of its own and removes their containers by label
//! when it ends, even by failing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use skymirror_tests::{Cluster, docker, docker_images_ready, http_get, unique_id};

const WAIT: Duration = Duration::from_secs(60);
/// The test image and the same image under another tag.
const IMAGE: &str = "skymirror-example:test";
const IMAGE2: &str = "skymirror-example:test2";

/// Full ids of every container of `provider`, running or not.
fn containers(provider: &str) -> Result<BTreeSet<String>> {
    let filter = format!("label=skymirror.provider={provider}");
    Ok(docker(&["ps", "-aq", "--no-trunc", "--filter", &filter])?
        .lines()
        .map(str::to_string)
        .collect())
}

/// A container's labels and image.
fn labels_and_image(id: &str) -> Result<(BTreeMap<String, String>, String)> {
    let out = docker(&["inspect", "--format", "{{json .Config}}", id])?;
    let config: Value = serde_json::from_str(&out)?;
    let labels = serde_json::from_value(config["Labels"].clone())?;
    Ok((labels, config["Image"].as_str().unwrap_or("").to_string()))
}

/// Provider names of this test run: Docker is shared by everything on the
/// machine, so they must not collide with another run's.
fn unique_providers(n: usize) -> Vec<String> {
    let id = unique_id();
    (0..n)
        .map(|i| format!("dk-{id}-{}", char::from(b'a' + i as u8)))
        .collect()
}

/// Docker providers, as YAML.
fn providers_yaml(names: &[String]) -> String {
    names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n  name: {n}\nspec:\n  driver: docker\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// An app running `image` (the example app, listening on 0.0.0.0 inside its
/// container) with an HTTP health check, mirrored on every provider.
fn app_yaml(name: &str, image: &str, replicas: u32) -> String {
    format!(
        "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: {name}
spec:
  image: {image}
  args: [\"--host\", \"0.0.0.0\"]
  env:
    GREETING: \"hello from {name}\"
  ports:
    - name: http
  replicas: {replicas}
  stopGracePeriod: 2s
  placement:
    mode: mirror
  health:
    http: {{path: /healthz, port: http}}
    interval: 500ms
    timeout: 400ms
    failureThreshold: 2
"
    )
}

/// Agents on the docker driver, outside the harness (which starts process
/// agents). Dropping it kills them and removes every container of their
/// providers.
#[derive(Debug, Default)]
struct DockerAgents {
    running: BTreeMap<String, Child>,
    providers: BTreeSet<String>,
}

impl DockerAgents {
    /// Starts the agent of `provider` with `--driver docker`, as
    /// `Cluster::start_agent` starts a process agent.
    fn start(&mut self, c: &Cluster, provider: &str) -> Result<()> {
        self.providers.insert(provider.to_string());
        let child = c.agent_process(provider, &c.url(), "docker")?;
        self.running.insert(provider.to_string(), child);
        Ok(())
    }

    /// `kill -9` the agent of `provider`; its containers keep running.
    fn kill(&mut self, provider: &str) -> Result<()> {
        if let Some(mut a) = self.running.remove(provider) {
            a.kill()?;
            a.wait()?;
        }
        Ok(())
    }
}

impl Drop for DockerAgents {
    fn drop(&mut self) {
        for (_, mut a) in std::mem::take(&mut self.running) {
            let _ = a.kill();
            let _ = a.wait();
        }
        for p in &self.providers {
            if let Ok(ids) = containers(p)
                && !ids.is_empty()
            {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                let _ = docker(&args);
            }
        }
    }
}

/// Waits until every provider in `providers` is up.
fn wait_up(c: &mut Cluster, providers: &[String]) -> Result<()> {
    c.wait_until("the docker agents to connect", WAIT, |c| {
        let states = c.provider_states()?;
        Ok(providers
            .iter()
            .all(|p| states.get(p).map(String::as_str) == Some("up"))
            .then_some(()))
    })
}

/// A daemon and one docker provider with its agent up. Keep the agents alive
/// for the test: dropping them removes the provider's containers.
fn one_docker_provider() -> Result<(Cluster, DockerAgents, String)> {
    let mut c = Cluster::start()?;
    let mut agents = DockerAgents::default();
    let providers = unique_providers(1);
    c.apply_ok("providers.yaml", &providers_yaml(&providers))?;
    agents.start(&c, &providers[0])?;
    wait_up(&mut c, &providers)?;
    let provider = providers[0].clone();
    Ok((c, agents, provider))
}

/// `replica id -> container id` of an app.
fn instances(replicas: &[Value], app: &str) -> BTreeMap<String, String> {
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

/// Every container of `providers`, which must be exactly `want`, eventually.
fn wait_containers(c: &mut Cluster, providers: &[String], want: &BTreeSet<String>) -> Result<()> {
    c.wait_until("the containers to match the replicas", WAIT, |_| {
        let mut all = BTreeSet::new();
        for p in providers {
            all.extend(containers(p)?);
        }
        if &all == want {
            Ok(Some(()))
        } else {
            bail!("containers {all:?}, replicas {want:?}")
        }
    })
}

#[test]
fn docker_apply_scale_replace_adopt_and_delete() -> Result<()> {
    if !docker_images_ready(
        "docker_apply_scale_replace_adopt_and_delete",
        &[IMAGE, IMAGE2],
    )? {
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let mut agents = DockerAgents::default();
    let providers = unique_providers(2);
    let names: Vec<&str> = providers.iter().map(String::as_str).collect();
    c.apply_ok("providers.yaml", &providers_yaml(&providers))?;
    for p in &providers {
        agents.start(&c, p)?;
    }
    wait_up(&mut c, &providers)?;

    // One container per provider, labelled, answering its health check at the
    // reported address.
    c.apply_ok("web.yaml", &app_yaml("web", IMAGE, 1))?;
    let one = c.wait_ready("web", &names, 1, 1, WAIT)?;
    for r in &one {
        let id = r["instanceId"].as_str().context("instanceId")?;
        let provider = r["provider"].as_str().context("provider")?;
        let (labels, image) = labels_and_image(id)?;
        let want = [
            ("skymirror.managed", "true"),
            ("skymirror.provider", provider),
            ("skymirror.app", "web"),
            ("skymirror.index", "0"),
            ("skymirror.workload-generation", "1"),
        ];
        for (k, v) in want {
            ensure!(
                labels.get(k).map(String::as_str) == Some(v),
                "container {id}: label {k} is {:?}, want {v:?} ({labels:?})",
                labels.get(k)
            );
        }
        ensure!(image == IMAGE, "container {id} runs {image}");
        let addr = r["address"].as_str().context("address")?;
        let (status, _) = http_get(addr, "/healthz", Duration::from_secs(2))?;
        ensure!(status == 200, "{addr}/healthz answered {status}");
        let (_, body) = http_get(addr, "/", Duration::from_secs(2))?;
        ensure!(
            body.contains(r["id"].as_str().unwrap_or("?")),
            "{addr} answered {body:?}, expected its id {}",
            r["id"]
        );
        let name = format!("skymirror-{provider}-web-0");
        let inspected = docker(&["inspect", "--format", "{{.Id}}", &name])?;
        ensure!(inspected.trim() == id, "{name} is {inspected}, not {id}");
    }
    wait_containers(
        &mut c,
        &providers,
        &instances(&one, "web").into_values().collect(),
    )?;

    // `skymirror logs` reads the containers' output through their agents.
    let logs = c.cli_ok(&["logs", "web"])?;
    for p in &names {
        let want = format!("[web/{p}/0] listening on 0.0.0.0:");
        ensure!(logs.contains(&want), "logs printed {logs:?}, not {want:?}");
    }

    // Scale 1 → 3 → 1: scaling down keeps index 0's container and removes the rest.
    c.apply_ok("web.yaml", &app_yaml("web", IMAGE, 3))?;
    let three = instances(&c.wait_ready("web", &names, 3, 1, WAIT)?, "web");
    wait_containers(&mut c, &providers, &three.values().cloned().collect())?;
    c.apply_ok("web.yaml", &app_yaml("web", IMAGE, 1))?;
    let kept = instances(&c.wait_ready("web", &names, 1, 1, WAIT)?, "web");
    for (id, container) in &kept {
        ensure!(
            three.get(id) == Some(container),
            "scaling down replaced {id}"
        );
    }
    wait_containers(&mut c, &providers, &kept.values().cloned().collect())?;

    // A new image tag replaces the containers (workload generation 4).
    c.apply_ok("web.yaml", &app_yaml("web", IMAGE2, 1))?;
    let replaced = instances(&c.wait_ready("web", &names, 1, 4, WAIT)?, "web");
    for (id, container) in &replaced {
        ensure!(kept.get(id) != Some(container), "{id} was not replaced");
        let (labels, image) = labels_and_image(container)?;
        ensure!(image == IMAGE2, "{id} runs {image}");
        ensure!(
            labels
                .get("skymirror.workload-generation")
                .map(String::as_str)
                == Some("4"),
            "{id}: {labels:?}"
        );
    }
    wait_containers(&mut c, &providers, &replaced.values().cloned().collect())?;

    // kill -9 one agent; meanwhile a stray container with its labels appears
    // (as if an agent had died before persisting it). The restarted agent
    // adopts its containers, recreates nothing, and removes the stray.
    let first = &providers[0];
    agents.kill(first)?;
    let stray_name = format!("skymirror-{first}-gone-0");
    let stray = docker(&[
        "create",
        "--name",
        &stray_name,
        "--label",
        "skymirror.managed=true",
        "--label",
        &format!("skymirror.provider={first}"),
        "--label",
        "skymirror.app=gone",
        "--label",
        "skymirror.index=0",
        IMAGE,
    ])?;
    ensure!(
        containers(first)?.contains(stray.trim()),
        "stray not created"
    );
    agents.start(&c, first)?;
    c.wait_until("the restarted agent to report", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .any(|p| {
                p["name"] == first.as_str()
                    && p["state"] == "up"
                    && p["appliedRevision"].as_u64().unwrap_or(0) > 0
            })
            .then_some(()))
    })?;
    let adopted = instances(&c.wait_ready("web", &names, 1, 4, WAIT)?, "web");
    ensure!(
        adopted == replaced,
        "containers changed across an agent restart:\nbefore {replaced:?}\nafter  {adopted:?}"
    );
    wait_containers(&mut c, &providers, &adopted.values().cloned().collect())?;

    // Delete removes every container.
    c.cli_ok(&["delete", "app", "web"])?;
    c.wait_until("every replica of web to be gone", WAIT, |c| {
        Ok(c.replicas()?.is_empty().then_some(()))
    })?;
    wait_containers(&mut c, &providers, &BTreeSet::new())?;
    Ok(())
}

#[test]
fn docker_image_that_cannot_be_pulled_fails_only_its_app() -> Result<()> {
    if !docker_images_ready(
        "docker_image_that_cannot_be_pulled_fails_only_its_app",
        &[IMAGE, IMAGE2],
    )? {
        return Ok(());
    }
    let (mut c, _agents, provider) = one_docker_provider()?;
    let provider = provider.as_str();

    c.apply_ok("good.yaml", &app_yaml("good", IMAGE, 1))?;
    c.apply_ok("nope.yaml", &app_yaml("nope", "skymirror-nope:1", 1))?;
    let failed = c.wait_until("the replica of nope to fail", WAIT, |c| {
        Ok(c.replicas()?
            .into_iter()
            .find(|r| r["app"] == "nope" && r["state"] == "failed"))
    })?;
    let message = failed["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("image skymirror-nope:1 not found locally and could not be pulled"),
        "message: {message:?}"
    );
    let good = c.wait_ready("good", &[provider], 1, 1, WAIT)?;
    let addr = good[0]["address"].as_str().context("address")?;
    let (status, _) = http_get(addr, "/healthz", Duration::from_secs(2))?;
    ensure!(status == 200, "{addr}/healthz answered {status}");

    // Not a silent retry loop: it stays failed, with nothing started for it.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let nope: Vec<Value> = c
            .replicas()?
            .into_iter()
            .filter(|r| r["app"] == "nope")
            .collect();
        ensure!(
            nope.len() == 1 && nope[0]["state"] == "failed",
            "nope: {nope:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mine = containers(provider)?;
    ensure!(
        mine.len() == 1 && mine.contains(good[0]["instanceId"].as_str().unwrap_or("?")),
        "containers of {provider}: {mine:?}"
    );
    Ok(())
}

#[test]
fn docker_image_healthcheck_decides_readiness_with_the_apps_check() -> Result<()> {
    const PASSING: &str = "skymirror-example:test-healthcheck-passing";
    const FAILING: &str = "skymirror-example:test-healthcheck-failing";
    if !docker_images_ready(
        "docker_image_healthcheck_decides_readiness_with_the_apps_check",
        &[PASSING, FAILING],
    )? {
        return Ok(());
    }
    let (mut c, _agents, provider) = one_docker_provider()?;
    let provider = provider.as_str();

    // Both apps have their own HTTP check, which passes: the image's verdict
    // decides.
    c.apply_ok("passing.yaml", &app_yaml("passing", PASSING, 1))?;
    c.apply_ok("failing.yaml", &app_yaml("failing", FAILING, 1))?;
    c.wait_ready("passing", &[provider], 1, 1, WAIT)?;
    let failing = c.wait_until("the replica of failing to be unhealthy", WAIT, |c| {
        Ok(c.replicas()?
            .into_iter()
            .find(|r| r["app"] == "failing" && r["state"] == "unhealthy"))
    })?;
    let message = failing["message"].as_str().unwrap_or_default();
    ensure!(
        failing["ready"] == false && message.contains("HEALTHCHECK reports unhealthy"),
        "failing: {failing:?}"
    );
    // It answers the app's own check: only the image's verdict holds it back,
    // and it keeps running (the agent does not restart unhealthy replicas).
    let addr = failing["address"].as_str().context("address")?;
    let (status, _) = http_get(addr, "/healthz", Duration::from_secs(2))?;
    ensure!(status == 200, "{addr}/healthz answered {status}");
    // Several of the app's own (passing) probes later, the verdict still shows.
    std::thread::sleep(Duration::from_secs(2));
    let again = c
        .replicas()?
        .into_iter()
        .find(|r| r["app"] == "failing")
        .context("the replica of failing")?;
    ensure!(
        again["instanceId"] == failing["instanceId"]
            && again["ready"] == false
            && again["message"]
                .as_str()
                .is_some_and(|m| m.contains("HEALTHCHECK reports unhealthy")),
        "failing changed: {again:?}"
    );
    Ok(())
}

#[test]
fn docker_crashed_replica_container_is_removed_with_its_app() -> Result<()> {
    if !docker_images_ready(
        "docker_crashed_replica_container_is_removed_with_its_app",
        &[IMAGE],
    )? {
        return Ok(());
    }
    let (mut c, _agents, provider) = one_docker_provider()?;
    let provider = provider.as_str();
    let yaml = app_yaml("crashy", IMAGE, 1).replace(
        "args: [\"--host\", \"0.0.0.0\"]",
        "args: [\"--exit-code\", \"3\"]",
    );
    c.apply_ok("crashy.yaml", &yaml)?;
    // Between restarts the replica runs no instance; its exited container is
    // kept (its output stays readable) until the replica goes.
    c.wait_until("the replica of crashy to be backing off", WAIT, |c| {
        Ok(c.replicas()?
            .into_iter()
            .find(|r| r["app"] == "crashy" && r["state"] == "backoff"))
    })?;
    ensure!(
        !containers(provider)?.is_empty(),
        "no exited container kept"
    );
    c.cli_ok(&["delete", "app", "crashy"])?;
    wait_containers(&mut c, &[provider.to_string()], &BTreeSet::new())
}
