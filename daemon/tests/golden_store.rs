//! A store written by the previous release still works: `tests/data/golden-store/store`
//! was written by the daemon of commit f32e1b1 (see `tests/data/make-golden-store.sh`,
//! which applied `initial.yaml`, ran agents, changed, deleted, cordoned, drained and
//! failed over, then applied `spec.yaml`). This build opens a copy of it, reads back
//! every app, provider, assignment, replica, the controls and every event with their
//! values, and a daemon on it finds `spec.yaml` unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use skymirror::daemon::{Daemon, DaemonConfig};
use skymirror::model::{Action, DeclaredApp, EventReason, ReplicaState};
use skymirror::spec::{self, DriverKind, Kind, PlacementMode, Probe, Protocol, RoutingProtocol};
use skymirror::store::{SledStore, Store};

/// The golden data, beside this test.
fn golden() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-store")
}

/// The spec that made the store's final state.
fn spec_yaml() -> Result<String> {
    let path = golden().join("spec.yaml");
    std::fs::read_to_string(&path).with_context(|| path.display().to_string())
}

/// Copies `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| from.display().to_string())? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| entry.path().display().to_string())?;
        }
    }
    Ok(())
}

/// A copy of the golden store (opening it writes to it), opened by this build.
fn open_copy() -> Result<(tempfile::TempDir, SledStore)> {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("store");
    copy_dir(&golden().join("store"), &store_dir)?;
    let store = SledStore::open(&store_dir).context("opening the golden store")?;
    Ok((dir, store))
}

fn app<'a>(apps: &'a [DeclaredApp], name: &str) -> Result<&'a DeclaredApp> {
    apps.iter()
        .find(|a| a.app.metadata.name == name)
        .with_context(|| format!("no app {name}"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_record_of_the_previous_release_reads_back() -> Result<()> {
    let (_dir, store) = open_copy()?;

    let apps = store.apps()?;
    let names: Vec<&str> = apps.iter().map(|a| a.app.metadata.name.as_str()).collect();
    assert_eq!(names, ["api", "batch", "leader", "web", "worker"]);

    let web = app(&apps, "web")?;
    assert_eq!((web.generation, web.workload_generation), (2, 2));
    assert!(web.created_at_ms < web.updated_at_ms);
    assert_eq!(
        web.app.metadata.labels,
        labels(&[("team", "web"), ("tier", "frontend")])
    );
    let s = &web.app.spec;
    let w = &s.workload;
    assert_eq!(w.command.as_deref(), Some("skymirror-example"));
    assert_eq!(w.args, ["--host", "127.0.0.1"]);
    assert_eq!(
        w.env,
        labels(&[("GREETING", "web v2"), ("LOG_LEVEL", "info")])
    );
    assert_eq!(w.working_dir.as_deref(), Some("/tmp"));
    let ports: Vec<_> = w
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.container_port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", None, Protocol::Tcp),
            ("admin", Some(9090), Protocol::Tcp),
            ("stats", None, Protocol::Udp)
        ]
    );
    assert_eq!(
        (w.resources.cpu_millis, w.resources.memory_mib),
        (Some(250), Some(128))
    );
    assert_eq!(w.stop_grace_period, Duration::from_secs(5));
    assert_eq!(s.replicas, 2);
    assert_eq!(s.placement.mode, PlacementMode::Mirror);
    let first = &s.placement.providers[0];
    assert_eq!(
        (first.name.as_deref(), first.weight, first.priority),
        (Some("aws-east"), 2, Some(50))
    );
    assert_eq!(
        s.placement.providers[1].selector,
        labels(&[("cloud", "gcp")])
    );
    let health = s.health.as_ref().context("web's health check")?;
    assert_eq!(
        health.probe,
        Probe::Http {
            path: "/healthz".into(),
            port: "http".into()
        }
    );
    assert_eq!(
        (
            health.interval,
            health.timeout,
            health.failure_threshold,
            health.success_threshold
        ),
        (Duration::from_secs(1), Duration::from_millis(500), 2, 1)
    );
    assert_eq!(
        (
            s.failover.spill,
            s.failover.max_extra_replicas,
            s.failover.failback_after
        ),
        (true, 4, Duration::from_secs(10))
    );
    let routing = s.routing.as_ref().context("web's routing")?;
    assert_eq!(routing.listen, "127.0.0.1:18080");
    assert_eq!(routing.hosts, ["web.example.com", "www.example.com"]);
    assert_eq!(routing.protocol, RoutingProtocol::Http);

    let api = app(&apps, "api")?;
    assert_eq!((api.generation, api.workload_generation), (2, 1));
    let s = &api.app.spec;
    assert_eq!(s.placement.mode, PlacementMode::ActivePassive);
    assert_eq!(s.placement.standby_replicas, 1);
    assert_eq!(s.placement.providers[2].priority, None);
    assert_eq!(
        s.health.as_ref().map(|h| (&h.probe, h.success_threshold)),
        Some((&Probe::Tcp { port: "api".into() }, 2))
    );
    assert_eq!(
        (s.failover.spill, s.failover.failback_after),
        (false, Duration::from_secs(90))
    );
    assert_eq!(
        s.routing.as_ref().map(|r| r.protocol),
        Some(RoutingProtocol::Tcp)
    );

    let worker = app(&apps, "worker")?;
    let s = &worker.app.spec;
    assert_eq!((s.placement.mode, s.replicas), (PlacementMode::Spread, 4));
    assert_eq!(s.placement.providers[0].weight, 3);
    assert_eq!(
        s.health.as_ref().map(|h| &h.probe),
        Some(&Probe::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]
        })
    );

    let leader = app(&apps, "leader")?;
    let s = &leader.app.spec;
    assert!(s.failover.singleton);
    assert_eq!((&s.health, &s.routing), (&None, &None));

    let batch = app(&apps, "batch")?;
    let w = &batch.app.spec.workload;
    assert_eq!(
        w.image.as_deref(),
        Some("registry.example.com/skymirror/batch:1.4.2")
    );
    assert_eq!(
        (w.resources.cpu_millis, w.resources.memory_mib),
        (None, Some(512))
    );
    assert_eq!(w.stop_grace_period, Duration::from_secs(10));
    assert_eq!(w.ports[0].container_port, Some(9100));

    let providers: Vec<_> = store
        .providers()?
        .into_iter()
        .map(|p| {
            let s = p.provider.spec;
            (
                p.provider.metadata.name,
                s.driver,
                s.priority,
                s.capacity,
                s.description,
                p.generation,
            )
        })
        .collect();
    let expected = [
        (
            "aws-east",
            DriverKind::Process,
            30,
            20,
            "AWS us-east-1 (process driver)",
        ),
        ("docker-lab", DriverKind::Docker, 5, 0, ""),
        ("ec2-spot", DriverKind::Ec2, 0, 4, ""),
        (
            "gcp-west",
            DriverKind::Process,
            20,
            0,
            "GCP us-west1 (process driver)",
        ),
        ("hetzner", DriverKind::Process, 10, 12, "Hetzner bare metal"),
        (
            "k8s-prod",
            DriverKind::Kubernetes,
            -5,
            100,
            "production cluster",
        ),
    ]
    .map(|(n, d, p, c, desc)| (n.to_string(), d, p, c, desc.to_string(), 1));
    assert_eq!(providers, expected);
    let hetzner = store
        .providers()?
        .into_iter()
        .find(|p| p.provider.metadata.name == "hetzner")
        .context("hetzner")?;
    assert_eq!(
        hetzner.provider.metadata.labels,
        labels(&[("cloud", "hetzner"), ("tier", "cheap")])
    );

    let assignments = store.assignments()?;
    let shares: BTreeMap<&str, Vec<(&str, u64, u64, u32)>> = assignments
        .iter()
        .map(|a| {
            let apps = a
                .apps
                .iter()
                .map(|s| {
                    (
                        s.app.as_str(),
                        s.generation,
                        s.workload_generation,
                        s.replicas,
                    )
                })
                .collect();
            (a.provider.as_str(), apps)
        })
        .collect();
    assert_eq!(
        shares["aws-east"],
        [("api", 2, 1, 2), ("leader", 1, 1, 1), ("web", 2, 2, 2)]
    );
    assert_eq!(shares["gcp-west"], [("api", 2, 1, 2), ("web", 2, 2, 2)]);
    assert_eq!(shares["ec2-spot"], [], "drained");
    assert_eq!(shares["old-dc"], [], "its only app was deleted");
    assert!(assignments.iter().all(|a| a.revision >= 1));

    let replicas = store.replicas()?;
    let ids: BTreeSet<String> = replicas.iter().map(|r| r.id()).collect();
    let expected: BTreeSet<String> = [
        "api/aws-east/0",
        "api/aws-east/1",
        "leader/aws-east/0",
        "web/aws-east/0",
        "web/aws-east/1",
        "api/gcp-west/0",
        "api/gcp-west/1",
        "web/gcp-west/0",
        "web/gcp-west/1",
        "api/hetzner/0",
        "worker/hetzner/0",
        "worker/hetzner/1",
    ]
    .map(String::from)
    .into();
    assert_eq!(ids, expected);
    assert!(
        replicas
            .iter()
            .all(|r| r.ready && r.address.starts_with("127.0.0.1:"))
    );
    let killed = replicas
        .iter()
        .find(|r| r.id() == "web/aws-east/0")
        .context("web/aws-east/0")?;
    assert_eq!(
        (killed.state, killed.restarts, killed.workload_generation),
        (ReplicaState::Healthy, 1, 2)
    );
    let port_names: Vec<&str> = killed.ports.keys().map(String::as_str).collect();
    assert_eq!(port_names, ["admin", "http", "stats"]);
    let leader = replicas
        .iter()
        .find(|r| r.id() == "leader/aws-east/0")
        .context("leader/aws-east/0")?;
    assert_eq!(leader.state, ReplicaState::Running, "no health check");

    let controls = store.controls()?;
    assert_eq!(controls.cordoned, BTreeSet::from(["hetzner".to_string()]));
    assert_eq!(controls.draining, BTreeSet::from(["ec2-spot".to_string()]));
    assert_eq!(
        controls.pins,
        BTreeMap::from([("api".to_string(), "gcp-west".to_string())])
    );

    let events = store.events_after(0, usize::MAX)?;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(seqs, expected, "the log is complete and in order");
    assert_eq!(store.last_event_seq()?, events.len() as u64);
    assert_eq!(store.last_events(events.len())?, events);
    assert_eq!(events[0].event.reason, EventReason::DaemonStarted);
    let objects = |reason: EventReason| -> Vec<&str> {
        events
            .iter()
            .filter(|e| e.event.reason == reason)
            .map(|e| e.event.object.as_str())
            .collect()
    };
    assert_eq!(
        objects(EventReason::AppCreated),
        ["web", "api", "worker", "leader", "batch", "scratch"]
    );
    assert_eq!(objects(EventReason::ProviderCreated).len(), 7);
    assert_eq!(objects(EventReason::AppConfigured), ["web", "api"]);
    assert_eq!(objects(EventReason::AppDeleted), ["scratch"]);
    assert_eq!(objects(EventReason::ProviderDeleted), ["old-dc"]);
    assert_eq!(
        objects(EventReason::ProviderCordoned),
        ["docker-lab", "hetzner"]
    );
    assert_eq!(objects(EventReason::ProviderUncordoned), ["docker-lab"]);
    assert_eq!(objects(EventReason::ProviderDraining), ["ec2-spot"]);
    assert_eq!(objects(EventReason::ManualFailover), ["leader", "api"]);
    assert_eq!(objects(EventReason::ManualFailback), ["leader"]);
    assert_eq!(objects(EventReason::ProviderConnected).len(), 3);
    assert_eq!(objects(EventReason::ReplicaExited), ["web/aws-east/0"]);
    for reason in [
        EventReason::Scheduled,
        EventReason::ProviderUp,
        EventReason::ReplicaStarted,
        EventReason::ReplicaHealthy,
        EventReason::ReplicaRemoved,
    ] {
        assert!(!objects(reason).is_empty(), "no {reason} event");
    }
    let exited = events
        .iter()
        .find(|e| e.event.reason == EventReason::ReplicaExited)
        .context("the exit")?;
    assert!(exited.event.warning());
    assert_eq!(
        (exited.event.app.as_str(), exited.event.provider.as_str()),
        ("web", "aws-east")
    );
    Ok(())
}

#[tokio::test]
async fn a_daemon_on_it_finds_the_spec_that_made_it_unchanged() -> Result<()> {
    let (dir, store) = open_copy()?;
    let store = Arc::new(store);
    let apps_before = store.apps()?;
    let last_seq = store.last_event_seq()?;
    let daemon = Daemon::new(
        store.clone(),
        DaemonConfig::new(dir.path().join("store"), "token".into()),
    )?;

    let outcome = daemon.apply("spec.yaml", &spec_yaml()?, false).await?;
    let results: Vec<_> = outcome
        .results
        .iter()
        .map(|r| (r.kind, r.name.as_str(), r.action, r.generation))
        .collect();
    let p = |name| (Kind::Provider, name, Action::Unchanged, 1);
    let a = |name, generation| (Kind::App, name, Action::Unchanged, generation);
    assert_eq!(
        results,
        [
            p("aws-east"),
            p("gcp-west"),
            p("hetzner"),
            p("docker-lab"),
            p("k8s-prod"),
            p("ec2-spot"),
            a("web", 2),
            a("api", 2),
            a("worker", 1),
            a("leader", 1),
            a("batch", 1),
        ]
    );
    ensure!(
        store.apps()? == apps_before && store.last_event_seq()? == last_seq,
        "an unchanged apply wrote to the store"
    );

    // The comparison is not blind: the first state of the store differs.
    let initial = std::fs::read_to_string(golden().join("initial.yaml"))?;
    let outcome = daemon.apply("initial.yaml", &initial, true).await?;
    let changed: Vec<_> = outcome
        .results
        .iter()
        .filter(|r| r.action != Action::Unchanged)
        .map(|r| (r.name.as_str(), r.action))
        .collect();
    assert_eq!(
        changed,
        [
            ("web", Action::Configured),
            ("api", Action::Configured),
            ("old-dc", Action::Created),
            ("scratch", Action::Created),
        ]
    );
    // The spec as parsed today equals the stored one, field for field.
    let parsed = spec::parse_documents("spec.yaml", &spec_yaml()?)?;
    for doc in parsed {
        if let spec::Document::App(parsed) = doc.document {
            let stored = app(&apps_before, &parsed.metadata.name)?;
            assert_eq!(stored.app, parsed);
        }
    }
    Ok(())
}
