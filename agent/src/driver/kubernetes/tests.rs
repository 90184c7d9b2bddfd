//! The driver against the in-memory API of [`super::fake`], over a real
//! socket, and — when `SKYMIRROR_TEST_KUBECONFIG` names one — against a real
//! cluster: the scenarios every cluster must pass run on both; faults only
//! the fake can stage (conflicts, refusals, an unreachable server) run on
//! the fake alone. Waits are on the API's own watches or the supervisor's
//! status board, each with a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;
use skymirror_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::fake::{FakeApi, Kind};
use super::objects::{
    ANNOTATION_REPLICA, LABEL_APP, LABEL_GENERATION, LABEL_INDEX, LABEL_MANAGED_BY, LABEL_PROVIDER,
    LABEL_SERVICE, owner_selector,
};
use super::{KubernetesDriver, KubernetesDriverConfig};
use crate::convert::DesiredSet;
use crate::driver::settings::{KubernetesExpose, KubernetesSettings, ServiceType};
use crate::driver::{
    Driver, DriverError, DriverSettings, Handle, Inspection, LogOptions, PortSpec, ReplicaKey,
    ReplicaSpec, RuntimeHealth, Workload,
};
use crate::state::StateDir;
use crate::supervisor::{StatusBoard, Supervisor, SupervisorConfig, SupervisorHandle};

/// Label on every object a test makes by hand, so a real cluster's cleanup
/// finds them.
const TEST_LABEL: &str = "skymirror-test-run";
/// An image that cannot be had anywhere (the `.invalid` domain never
/// resolves).
const MISSING_IMAGE: &str = "registry.invalid/skymirror/nope:1";

/// Where a scenario runs.
struct Cluster {
    /// The fake API, or `None` for a real cluster.
    fake: Option<FakeApi>,
    /// How drivers reach it.
    config: KubernetesDriverConfig,
    /// The namespace replicas run in.
    namespace: String,
    /// The provider of this run (unique on a real cluster, so runs never see
    /// each other's pods).
    provider: String,
    /// An image with `sh`, `echo`, `sleep` (the fake runs anything).
    image: String,
    /// A client of the test's own, for looking and for objects of others.
    client: kube::Client,
    /// Holds the kubeconfig of the fake.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The fake API, with a kubeconfig whose current context reaches it.
    async fn fake() -> Cluster {
        let fake = FakeApi::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = FakeApi::kubeconfig(dir.path(), &[(&fake, "fake", "default")]);
        let client = kube::Client::try_from(kube::Config::new(fake.url().parse().expect("url")))
            .expect("a client");
        Cluster {
            fake: Some(fake),
            config: KubernetesDriverConfig {
                kubeconfig: Some(kubeconfig),
                start_timeout: Duration::from_secs(10),
                unschedulable_grace: Duration::from_millis(300),
                inspect_interval: Duration::from_millis(100),
                ..Default::default()
            },
            namespace: "default".into(),
            provider: "p".into(),
            image: "example:1".into(),
            client,
            _dir: dir,
        }
    }

    /// The cluster `SKYMIRROR_TEST_KUBECONFIG` names (namespace:
    /// `SKYMIRROR_TEST_NAMESPACE`, else the context's; image with a shell:
    /// `SKYMIRROR_TEST_IMAGE`, else `busybox:1.36`), or `None`, said on the
    /// test's output.
    async fn real() -> Option<Cluster> {
        let Some(path) = std::env::var_os("SKYMIRROR_TEST_KUBECONFIG") else {
            eprintln!(
                "skipping the real cluster: SKYMIRROR_TEST_KUBECONFIG is not set; the scenarios \
                 ran against the in-memory API only"
            );
            return None;
        };
        let path = std::path::PathBuf::from(path);
        let file = kube::config::Kubeconfig::read_from(&path).expect("SKYMIRROR_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .expect("a usable kubeconfig");
        let namespace = std::env::var("SKYMIRROR_TEST_NAMESPACE")
            .unwrap_or_else(|_| config.default_namespace.clone());
        let client = kube::Client::try_from(config).expect("a client");
        let run = crate::random::uuid_v4().expect("randomness");
        Some(Cluster {
            fake: None,
            config: KubernetesDriverConfig {
                kubeconfig: Some(path),
                namespace: Some(namespace.clone()),
                start_timeout: Duration::from_secs(300),
                unschedulable_grace: Duration::from_secs(5),
                inspect_interval: Duration::from_secs(1),
                ..Default::default()
            },
            namespace,
            provider: format!("t{}", &run[..8]),
            image: std::env::var("SKYMIRROR_TEST_IMAGE").unwrap_or_else(|_| "busybox:1.36".into()),
            client,
            _dir: tempfile::tempdir().expect("tempdir"),
        })
    }

    /// The fake API, in a test that runs on it alone.
    fn api(&self) -> &FakeApi {
        self.fake.as_ref().expect("a fake-only check")
    }

    /// How long the cluster may take for anything a scenario waits on.
    fn patience(&self) -> Duration {
        if self.fake.is_some() {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(300)
        }
    }

    async fn driver(&self) -> KubernetesDriver {
        KubernetesDriver::connect(self.config.clone())
            .await
            .expect("the driver connects")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pod_name(&self, app: &str, index: u32) -> String {
        format!("skymirror-{}-{app}-{index}", self.provider)
    }

    /// A workload that runs `script` in the image's shell.
    fn workload(&self, script: &str) -> Workload {
        Workload {
            image: Some(self.image.clone()),
            command: Some("sh".into()),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            ports: vec![PortSpec {
                name: "http".into(),
                container_port: Some(8080),
                protocol: "tcp".into(),
            }],
            working_dir: None,
            stop_grace: Duration::from_secs(1),
            cpu_millis: None,
            memory_mib: None,
        }
    }

    /// Says who it is, then runs until stopped.
    fn hello(&self) -> Workload {
        self.workload("echo \"hello from $SKYMIRROR_REPLICA\"; exec sleep 3600")
    }

    /// Says who it is, then exits with 3.
    fn crashing(&self) -> Workload {
        self.workload("echo \"hello from $SKYMIRROR_REPLICA\"; exit 3")
    }

    fn spec(&self, app: &str, index: u32, workload: Workload, generation: u64) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey {
                app: app.into(),
                index,
            },
            provider: self.provider.clone(),
            workload,
            workload_generation: generation,
        }
    }

    /// Applies a pod of someone else's (another field manager, labels of
    /// the test's choosing).
    async fn foreign_pod(&self, name: &str, labels: BTreeMap<String, String>) -> Pod {
        let mut labels = labels;
        labels.insert(TEST_LABEL.into(), self.provider.clone());
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "containers": [{"name": "main", "image": self.image, "command": ["sleep", "3600"]}],
                "terminationGracePeriodSeconds": 0,
            },
        }))
        .expect("a pod");
        self.pods()
            .patch(
                name,
                &PatchParams::apply("someone-else"),
                &Patch::Apply(&pod),
            )
            .await
            .expect("apply a foreign pod")
    }

    /// Waits until `done` holds of pod `name` (`None`: it does not exist),
    /// following the API's watch; returns the pod then.
    async fn until_pod(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(Option<&Pod>) -> bool,
    ) -> Option<Pod> {
        let api = self.pods();
        let wait = async {
            loop {
                let pod = api.get_opt(name).await.expect("get the pod");
                if done(pod.as_ref()) {
                    return pod;
                }
                let version = pod
                    .as_ref()
                    .and_then(|p| p.metadata.resource_version.clone())
                    .unwrap_or_else(|| "0".into());
                let params = WatchParams::default()
                    .fields(&format!("metadata.name={name}"))
                    .timeout(30);
                let stream = api.watch(&params, &version).await.expect("watch the pod");
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = futures::StreamExt::next(&mut stream).await {
                    match event.expect("a watch event") {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) if done(Some(&p)) => {
                            return Some(p);
                        }
                        WatchEvent::Deleted(_) if done(None) => return None,
                        WatchEvent::Error(_) => break,
                        _ => {}
                    }
                }
            }
        };
        match tokio::time::timeout(self.patience(), wait).await {
            Ok(pod) => pod,
            Err(_) => panic!("timed out waiting for pod {name}: {what}"),
        }
    }

    /// Every pod of the run's provider.
    async fn our_pods(&self) -> Vec<Pod> {
        let params = ListParams::default().labels(&owner_selector(&self.provider));
        self.pods().list(&params).await.expect("list").items
    }

    /// Removes everything the run made on a real cluster (the fake goes
    /// with its server).
    async fn clean_up(&self) {
        if self.fake.is_some() {
            return;
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for selector in [
            owner_selector(&self.provider),
            format!("{TEST_LABEL}={}", self.provider),
        ] {
            let lp = ListParams::default().labels(&selector);
            let _ = self.pods().delete_collection(&params, &lp).await;
            for svc in self
                .services()
                .list(&lp)
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                if let Some(name) = svc.metadata.name {
                    let _ = self.services().delete(&name, &params).await;
                }
            }
        }
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.labels.clone().unwrap_or_default()
}

fn ready(pod: Option<&Pod>) -> bool {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(pod: Option<&Pod>) -> i32 {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

async fn read_logs(
    driver: &KubernetesDriver,
    handle: &Handle,
    options: LogOptions,
) -> Result<String, DriverError> {
    crate::driver::testing::read_logs(driver, handle, options, Duration::from_secs(30)).await
}

// ---------------------------------------------------------------------------
// Scenarios every cluster passes.
// ---------------------------------------------------------------------------

/// Create: a labelled pod applied by `skymirror`, reached at its address,
/// inspected, its output read; stop and destroy remove it.
async fn create_inspect_read_and_remove(c: &Cluster) {
    let driver = c.driver().await;
    let spec = c.spec("web", 0, c.hello(), 4);
    let handle = driver.start(&spec).await.expect("start");
    let name = c.pod_name("web", 0);
    let pod = c.pods().get(&name).await.expect("the pod exists");
    assert_eq!(handle.driver, "kubernetes");
    assert_eq!(handle.instance_id, uid(&pod));
    let l = labels(&pod);
    assert_eq!(l[LABEL_MANAGED_BY], "skymirror");
    assert_eq!(l[LABEL_PROVIDER], c.provider);
    assert_eq!(l[LABEL_APP], "web");
    assert_eq!(l[LABEL_INDEX], "0");
    assert_eq!(l[LABEL_GENERATION], "4");
    assert_eq!(
        pod.metadata.annotations.as_ref().expect("annotations")[ANNOTATION_REPLICA],
        format!("web/{}/0", c.provider)
    );
    let managers: Vec<(String, String)> = pod
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("skymirror".into(), "Apply".into())),
        "applied server-side by skymirror: {managers:?}"
    );
    let pod_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("an address");
    assert_eq!(handle.address, Some(super::host_port(&pod_ip, 8080)));
    assert_eq!(handle.ports, BTreeMap::from([("http".to_string(), 8080)]));

    c.until_pod(&name, "ready", ready).await;
    assert_eq!(
        driver.inspect(&handle).await.expect("inspect"),
        Inspection::Running {
            health: Some(RuntimeHealth::Healthy)
        }
    );
    let greeting = format!("hello from web/{}/0\n", c.provider);
    let out = read_logs(&driver, &handle, LogOptions::new(0, false))
        .await
        .expect("logs");
    assert_eq!(out, greeting);

    driver
        .stop(&handle, Duration::from_secs(1))
        .await
        .expect("stop");
    assert!(
        c.pods().get_opt(&name).await.expect("get").is_none(),
        "stop waits until it is gone"
    );
    driver
        .destroy(&handle)
        .await
        .expect("destroying what is gone is fine");
    assert_eq!(
        driver.inspect(&handle).await.expect("inspect"),
        Inspection::Exited {
            code: None,
            signal: None
        }
    );
    let err = read_logs(&driver, &handle, LogOptions::new(0, false))
        .await
        .expect_err("no pod");
    assert!(err.to_string().contains("is gone"), "{err}");
}

/// Adopt after restart: a fresh driver recovers the pod and lists it, and
/// only it — not a bystander, not another provider's pod.
async fn a_fresh_driver_adopts_and_others_are_left_alone(c: &Cluster) {
    let first = c.driver().await;
    let handle = first
        .start(&c.spec("api", 0, c.hello(), 1))
        .await
        .expect("start");
    let persisted = serde_json::to_string(&handle).expect("persist");
    drop(first);
    let bystander = c
        .foreign_pod(&format!("{}-bystander", c.provider), BTreeMap::new())
        .await;
    let other_provider = c
        .foreign_pod(
            &format!("{}-other", c.provider),
            BTreeMap::from([
                (LABEL_MANAGED_BY.to_string(), "skymirror".to_string()),
                (LABEL_PROVIDER.to_string(), format!("{}-other", c.provider)),
                (LABEL_APP.to_string(), "api".to_string()),
            ]),
        )
        .await;

    let second = c.driver().await;
    second
        .configure(&DriverSettings::Unset)
        .await
        .expect("configure");
    let handle: Handle = serde_json::from_str(&persisted).expect("load");
    let recovered = second.recover(&handle).await.expect("recover");
    assert!(
        matches!(recovered, Inspection::Running { .. }),
        "the same pod runs: {recovered:?}"
    );
    let listed = second.list_instances(&c.provider).await.expect("list");
    let ids: Vec<&str> = listed
        .iter()
        .map(|l| l.handle.instance_id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec![handle.instance_id.as_str()],
        "its pod and nothing else"
    );
    // What the supervisor does with an instance no replica holds.
    second.destroy(&listed[0].handle).await.expect("destroy");
    c.until_pod(&c.pod_name("api", 0), "gone", |p| p.is_none())
        .await;
    for pod in [&bystander, &other_provider] {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = c.pods().get(&name).await.expect("still there");
        assert_eq!(uid(&now), uid(pod), "{name} untouched");
        assert!(
            now.metadata
                .managed_fields
                .iter()
                .flatten()
                .all(|m| m.manager.as_deref() != Some("skymirror")),
            "{name}: skymirror wrote nothing"
        );
    }
}

/// A foreign pod holding a replica's name is left alone, and the start says so.
async fn a_name_taken_by_a_foreign_pod_is_not_touched(c: &Cluster) {
    let driver = c.driver().await;
    let name = c.pod_name("taken", 0);
    let foreign = c.foreign_pod(&name, BTreeMap::new()).await;
    let err = driver
        .start(&c.spec("taken", 0, c.hello(), 1))
        .await
        .expect_err("the name is taken");
    assert!(err.is_retryable());
    assert!(
        err.to_string()
            .contains("is taken by a pod that is not replica"),
        "{err}"
    );
    let now = c.pods().get(&name).await.expect("still there");
    assert_eq!(uid(&now), uid(&foreign));
    assert_eq!(labels(&now).get(LABEL_MANAGED_BY), None);
}

/// A pod stuck in ImagePullBackOff fails its start with the cluster's
/// reason, for the workload, and is removed.
async fn an_image_that_cannot_be_pulled_fails_the_start(c: &Cluster) {
    if let Some(fake) = &c.fake {
        fake.kubelet(|k| {
            k.missing_images.insert(MISSING_IMAGE.into());
        });
    }
    let driver = c.driver().await;
    let mut workload = c.hello();
    workload.image = Some(MISSING_IMAGE.into());
    let err = driver
        .start(&c.spec("nope", 0, workload, 1))
        .await
        .expect_err("no such image");
    assert!(matches!(err, DriverError::InvalidWorkload(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("image {MISSING_IMAGE} cannot be pulled")),
        "{text}"
    );
    assert!(
        text.contains("ImagePullBackOff") || text.contains("ErrImagePull"),
        "{text}"
    );
    c.until_pod(&c.pod_name("nope", 0), "removed", |p| p.is_none())
        .await;
}

/// A crash loop is the kubelet's: the start succeeds once the container has
/// run, inspections report its restarts, and the output of the last run
/// stays readable.
async fn a_crash_loop_is_reported_with_its_output(c: &Cluster) {
    let driver = c.driver().await;
    let handle = driver
        .start(&c.spec("crash", 0, c.crashing(), 1))
        .await
        .expect("it runs, then crashes");
    let name = c.pod_name("crash", 0);
    c.until_pod(&name, "crash-looping twice", |p| {
        restarts(p) >= 2
            && p.and_then(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .as_ref()?
                    .waiting
                    .as_ref()
            })
            .is_some()
    })
    .await;
    // (The kubelet may be running it again by now.)
    match driver
        .inspect_all(std::slice::from_ref(&handle))
        .await
        .remove(0)
    {
        Ok(Inspection::Restarted { restarts, .. }) => assert!(restarts >= 2, "{restarts}"),
        other => panic!("{other:?}"),
    }
    let out = read_logs(&driver, &handle, LogOptions::new(0, false))
        .await
        .expect("logs");
    assert_eq!(
        out,
        format!("hello from crash/{}/0\n", c.provider),
        "the last run's output"
    );
    driver.destroy(&handle).await.expect("destroy");
}

/// Scale, image change, delete through the supervisor: pods follow the
/// assignment, a workload change replaces them one at a time.
async fn the_supervisor_scales_rolls_and_deletes(c: &Cluster) {
    let run = Supervised::start(c, None).await;
    let hello = c.hello();
    run.assign(c, 1, vec![("web", 2, 1, hello.clone())]).await;
    run.until_ready(c, 2).await;
    let first = c.our_pods().await;
    assert_eq!(first.len(), 2);

    run.assign(c, 2, vec![("web", 3, 1, hello.clone())]).await;
    run.until_ready(c, 3).await;
    let scaled = c.our_pods().await;
    for pod in &first {
        assert!(
            scaled.iter().any(|p| uid(p) == uid(pod)),
            "scaling up keeps the others"
        );
    }

    run.assign(c, 3, vec![("web", 1, 1, hello.clone())]).await;
    run.until_board(c, "one replica", |all| all.len() == 1)
        .await;
    c.until_pod(&c.pod_name("web", 2), "removed", |p| p.is_none())
        .await;
    c.until_pod(&c.pod_name("web", 1), "removed", |p| p.is_none())
        .await;

    // A workload change (here its environment) replaces the replicas.
    run.assign(c, 4, vec![("web", 2, 1, hello.clone())]).await;
    run.until_ready(c, 2).await;
    let before = c.our_pods().await;
    let mut changed = hello.clone();
    changed.env = vec![("GREETING".into(), "v2".into())];
    run.assign(c, 5, vec![("web", 2, 2, changed)]).await;
    run.until_board(c, "both on the new workload and ready", |all| {
        all.len() == 2
            && all
                .iter()
                .all(|r| r.workload_generation == 2 && ready_state(r))
    })
    .await;
    let after = c.our_pods().await;
    assert_eq!(after.len(), 2);
    for pod in &after {
        assert_eq!(labels(pod)[LABEL_GENERATION], "2");
        assert!(
            before.iter().all(|b| uid(b) != uid(pod)),
            "every pod is new"
        );
    }
    run.assign(c, 6, vec![]).await;
    run.until_board(c, "nothing", |all| all.is_empty()).await;
    for index in 0..2 {
        c.until_pod(&c.pod_name("web", index), "removed", |p| p.is_none())
            .await;
    }
    run.stop().await;
}

/// The scenarios above, on a real cluster when one is named.
#[tokio::test]
async fn a_real_cluster_passes_the_same_scenarios() {
    let Some(c) = Cluster::real().await else {
        return;
    };
    let c = Arc::new(c);
    let run = c.clone();
    // On its own task, so that the cleanup runs when a scenario fails.
    let result = tokio::spawn(async move {
        let c = run.as_ref();
        create_inspect_read_and_remove(c).await;
        a_fresh_driver_adopts_and_others_are_left_alone(c).await;
        a_name_taken_by_a_foreign_pod_is_not_touched(c).await;
        an_image_that_cannot_be_pulled_fails_the_start(c).await;
        a_crash_loop_is_reported_with_its_output(c).await;
        the_supervisor_scales_rolls_and_deletes(c).await;
    })
    .await;
    c.clean_up().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn create_inspect_read_and_remove_on_the_fake() {
    let c = Cluster::fake().await;
    create_inspect_read_and_remove(&c).await;
    let patches: Vec<String> = c
        .api()
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH"))
        .collect();
    assert!(!patches.is_empty());
    for p in &patches {
        assert!(p.contains("fieldManager=skymirror"), "{p}");
    }
}

#[tokio::test]
async fn a_fresh_driver_adopts_and_others_are_left_alone_on_the_fake() {
    a_fresh_driver_adopts_and_others_are_left_alone(&Cluster::fake().await).await;
}

#[tokio::test]
async fn a_name_taken_by_a_foreign_pod_is_not_touched_on_the_fake() {
    a_name_taken_by_a_foreign_pod_is_not_touched(&Cluster::fake().await).await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_start_on_the_fake() {
    an_image_that_cannot_be_pulled_fails_the_start(&Cluster::fake().await).await;
}

#[tokio::test]
async fn a_crash_loop_is_reported_with_its_output_on_the_fake() {
    a_crash_loop_is_reported_with_its_output(&Cluster::fake().await).await;
}

#[tokio::test]
async fn the_supervisor_scales_rolls_and_deletes_on_the_fake() {
    the_supervisor_scales_rolls_and_deletes(&Cluster::fake().await).await;
}

// ---------------------------------------------------------------------------
// A supervisor driving the kubernetes driver.
// ---------------------------------------------------------------------------

/// A supervisor of a kubernetes driver, with its state directory.
struct Supervised {
    handle: SupervisorHandle,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn ready_state(r: &pb::ReplicaStatus) -> bool {
    matches!(
        r.state(),
        pb::ReplicaState::Healthy | pb::ReplicaState::Running
    )
}

impl Supervised {
    /// A supervisor on `dir`'s state (a fresh directory when `None`).
    async fn start(c: &Cluster, dir: Option<tempfile::TempDir>) -> Supervised {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let state = StateDir::open(dir.path()).expect("state");
        let config = SupervisorConfig {
            tick: Duration::from_millis(50),
            ..Default::default()
        };
        let driver = Arc::new(c.driver().await);
        let (sup, handle) = Supervisor::restore(driver, c.provider.clone(), state, config)
            .await
            .expect("supervisor");
        let stop = CancellationToken::new();
        let task = tokio::spawn(sup.run(stop.clone(), false));
        Supervised {
            handle,
            stop,
            task,
            dir,
        }
    }

    /// Sends an assignment of `(app, replicas, workload generation, workload)`.
    async fn assign(&self, c: &Cluster, revision: u64, apps: Vec<(&str, u32, u64, Workload)>) {
        let raw = pb::Assignment {
            provider: c.provider.clone(),
            revision,
            apps: apps
                .into_iter()
                .map(|(app, replicas, generation, w)| pb::AppAssignment {
                    app: app.into(),
                    generation: revision,
                    workload_generation: generation,
                    replicas,
                    workload: Some(pb::Workload {
                        image: w.image.unwrap_or_default(),
                        command: w.command.unwrap_or_default(),
                        args: w.args,
                        env: w
                            .env
                            .into_iter()
                            .map(|(name, value)| pb::EnvVar { name, value })
                            .collect(),
                        ports: w
                            .ports
                            .into_iter()
                            .map(|p| pb::Port {
                                name: p.name,
                                container_port: p.container_port.map_or(0, u32::from),
                                protocol: p.protocol,
                            })
                            .collect(),
                        stop_grace_seconds: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let set = DesiredSet::try_from(raw.clone()).expect("a valid assignment");
        self.handle.assign(set, raw).await;
    }

    fn board(&self) -> &StatusBoard {
        &self.handle.board
    }

    async fn until_board(
        &self,
        c: &Cluster,
        what: &str,
        done: impl Fn(&[pb::ReplicaStatus]) -> bool,
    ) -> Vec<pb::ReplicaStatus> {
        let mut changes = self.board().subscribe();
        let wait = async {
            loop {
                let (all, _, _) = self.board().snapshot();
                if done(&all) {
                    return all;
                }
                changes.changed().await.expect("the board lives");
            }
        };
        match tokio::time::timeout(c.patience(), wait).await {
            Ok(all) => all,
            Err(_) => panic!(
                "timed out waiting for {what}: {:?}",
                self.board().snapshot().0
            ),
        }
    }

    async fn until_ready(&self, c: &Cluster, n: usize) -> Vec<pb::ReplicaStatus> {
        self.until_board(c, &format!("{n} ready"), |all| {
            all.len() == n && all.iter().all(ready_state)
        })
        .await
    }

    /// Stops the supervisor (as an agent stops: replicas keep running) and
    /// gives back its state directory.
    async fn stop(self) -> tempfile::TempDir {
        self.stop.cancel();
        self.task.await.expect("the supervisor ends");
        self.dir
    }
}

// ---------------------------------------------------------------------------
// What only the fake can stage.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_restarted_agent_adopts_its_pods_and_removes_strays() {
    let c = Cluster::fake().await;
    let run = Supervised::start(&c, None).await;
    run.assign(&c, 1, vec![("web", 2, 1, c.hello())]).await;
    let before = run.until_ready(&c, 2).await;
    let dir = run.stop().await;
    // A pod of ours no replica holds (its agent died before it kept the
    // handle), and one of someone else's.
    let stray = c
        .foreign_pod(
            &c.pod_name("web", 7),
            BTreeMap::from([
                (LABEL_MANAGED_BY.to_string(), "skymirror".to_string()),
                (LABEL_PROVIDER.to_string(), c.provider.clone()),
                (LABEL_APP.to_string(), "web".to_string()),
            ]),
        )
        .await;
    let bystander = c.foreign_pod("bystander", BTreeMap::new()).await;
    c.api().clear_requests();

    let run = Supervised::start(&c, Some(dir)).await;
    let after = run.until_ready(&c, 2).await;
    let ids = |all: &[pb::ReplicaStatus]| {
        all.iter()
            .map(|r| r.instance_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before), "the same pods, adopted");
    c.until_pod(
        &stray.metadata.name.clone().unwrap_or_default(),
        "removed",
        |p| p.is_none(),
    )
    .await;
    assert_eq!(
        uid(&c.pods().get("bystander").await.expect("left alone")),
        uid(&bystander)
    );
    let writes: Vec<String> = c
        .api()
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH") || (r.starts_with("DELETE") && !r.contains("-7")))
        .collect();
    assert!(writes.is_empty(), "nothing restarted: {writes:?}");
    run.stop().await;
}

#[tokio::test]
async fn supervised_failures_carry_the_clusters_reason() {
    let c = Cluster::fake().await;
    c.api().kubelet(|k| {
        k.missing_images.insert(MISSING_IMAGE.into());
    });
    let run = Supervised::start(&c, None).await;
    let mut missing = c.hello();
    missing.image = Some(MISSING_IMAGE.into());
    run.assign(
        &c,
        1,
        vec![("nope", 1, 1, missing), ("crash", 1, 1, c.crashing())],
    )
    .await;
    let all = run
        .until_board(&c, "a failed pull and a crash loop", |all| {
            let nope = all.iter().find(|r| r.app == "nope");
            let crash = all.iter().find(|r| r.app == "crash");
            nope.is_some_and(|r| r.state() == pb::ReplicaState::Failed)
                && crash.is_some_and(|r| r.crash_looping && r.state() == pb::ReplicaState::Backoff)
        })
        .await;
    let nope = all.iter().find(|r| r.app == "nope").expect("nope");
    assert!(
        nope.message.contains("ImagePullBackOff"),
        "{}",
        nope.message
    );
    let crash = all.iter().find(|r| r.app == "crash").expect("crash");
    assert!(crash.restarts >= 3, "{crash:?}");
    assert!(
        crash.message.contains("the runtime restarted it"),
        "{}",
        crash.message
    );
    assert!(
        crash.message.contains("CrashLoopBackOff"),
        "the cluster's reason reaches the replica: {}",
        crash.message
    );
    run.stop().await;
}

#[tokio::test]
async fn a_conflict_is_resolved_by_reading_again() {
    let c = Cluster::fake().await;
    let fake = c.api();
    let driver = c.driver().await;
    // The apply of the pod meets a conflict once.
    fake.fail_next("patch", "pods", 409, 1);
    fake.clear_requests();
    let handle = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("started after reading again");
    let calls: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| !r.contains("watch=true"))
        .map(|r| r.split('?').next().unwrap_or_default().to_string())
        .collect();
    let pod = "/api/v1/namespaces/default/pods/skymirror-p-web-0";
    assert_eq!(
        calls[..4],
        [
            format!("GET {pod}"),
            format!("PATCH {pod}"),
            format!("GET {pod}"),
            format!("PATCH {pod}"),
        ]
    );
    driver.destroy(&handle).await.expect("destroy");

    // The app's Service was edited by someone (kubectl edit): its fields are
    // taken back, by force, after reading it again.
    let edited: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "skymirror-p-api", "labels": {
            LABEL_MANAGED_BY: "skymirror", LABEL_PROVIDER: "p", LABEL_APP: "api",
        }},
        "spec": {"type": "NodePort", "ports": [{"port": 80}]},
    }))
    .expect("a service");
    fake.insert(
        Kind::Services,
        "default",
        serde_json::to_value(&edited).expect("json"),
        "kubectl-edit",
    );
    let exposed = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        expose: KubernetesExpose::Service,
        ..Default::default()
    }));
    driver.configure(&exposed).await.expect("configure");
    fake.clear_requests();
    let handle = driver
        .start(&c.spec("api", 0, c.hello(), 1))
        .await
        .expect("start");
    let service_patches: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH /api/v1/namespaces/default/services/"))
        .collect();
    assert_eq!(service_patches.len(), 2, "{service_patches:?}");
    assert!(!service_patches[0].contains("force=true"));
    assert!(service_patches[1].contains("force=true"));
    let svc = fake
        .object(Kind::Services, "default", "skymirror-p-api")
        .expect("the service");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    driver.destroy(&handle).await.expect("destroy");

    // Someone else's Service under the name is left alone.
    fake.insert(
        Kind::Services,
        "default",
        json!({"metadata": {"name": "skymirror-p-other"}, "spec": {"type": "ClusterIP"}}),
        "helm",
    );
    let err = driver
        .start(&c.spec("other", 0, c.hello(), 1))
        .await
        .expect_err("the service's name is taken");
    assert!(err.to_string().contains("is not skymirror's"), "{err}");
    let svc = fake
        .object(Kind::Services, "default", "skymirror-p-other")
        .expect("still there");
    assert_eq!(svc["metadata"]["labels"], serde_json::Value::Null);
    c.until_pod(&c.pod_name("other", 0), "removed", |p| p.is_none())
        .await;
}

#[tokio::test]
async fn a_forbidden_call_names_the_verb_and_resource() {
    let c = Cluster::fake().await;
    let fake = c.api();
    let driver = c.driver().await;
    let handle = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("start");

    fake.forbid("delete", "pods");
    let err = driver
        .stop(&handle, Duration::from_secs(1))
        .await
        .expect_err("forbidden");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "the Kubernetes API server at {} forbids the agent to delete pods in namespace default",
            fake.url()
        )),
        "{text}"
    );
    assert!(text.contains("deploy/k8s/rbac.yaml"), "{text}");
    assert!(err.is_retryable(), "RBAC can be fixed while the agent runs");

    fake.forbid("list", "pods");
    let inspected = driver.inspect_all(std::slice::from_ref(&handle)).await;
    let err = inspected[0].as_ref().expect_err("forbidden");
    assert!(
        err.to_string().contains("forbids the agent to list pods"),
        "{err}"
    );

    fake.forbid("create", "pods");
    let err = driver
        .start(&c.spec("web", 1, c.hello(), 1))
        .await
        .expect_err("forbidden");
    assert!(
        err.to_string().contains("forbids the agent to create pods"),
        "{err}"
    );

    fake.allow_all();
    fake.forbid("get", "pods/log");
    let err = read_logs(&driver, &handle, LogOptions::new(0, false))
        .await
        .expect_err("forbidden");
    assert!(
        err.to_string()
            .contains("forbids the agent to get pods/log"),
        "{err}"
    );
    assert!(
        fake.object(Kind::Pods, "default", "skymirror-p-web-0")
            .is_some(),
        "untouched"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_leaves_replicas_as_they_are() {
    let c = Cluster::fake().await;
    let fake = c.api();
    let driver = c.driver().await;
    let handle = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("start");
    c.until_pod(&c.pod_name("web", 0), "ready", ready).await;

    fake.set_down(true);
    let err = driver
        .inspect_all(std::slice::from_ref(&handle))
        .await
        .remove(0)
        .expect_err("down");
    assert!(err.is_retryable());
    assert!(
        err.to_string().starts_with(&format!(
            "cannot reach the Kubernetes API server at {}",
            fake.url()
        )),
        "{err}"
    );
    // Within the back-off, calls fail at once, without a request.
    let tried = fake.connections();
    let err = driver.inspect(&handle).await.expect_err("still down");
    assert!(err.to_string().contains("next attempt in"), "{err}");
    let err = driver
        .start(&c.spec("web", 1, c.hello(), 1))
        .await
        .expect_err("still down");
    assert!(err.to_string().contains("next attempt in"), "{err}");
    assert_eq!(fake.connections(), tried, "no request during the back-off");

    fake.set_down(false);
    // The first back-off is half a second, with up to half of it again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        driver
            .inspect_all(std::slice::from_ref(&handle))
            .await
            .remove(0)
            .expect("back"),
        Inspection::Running {
            health: Some(RuntimeHealth::Healthy)
        },
        "the same pod, untouched"
    );
    assert!(
        fake.history().iter().all(|h| h.type_ != "DELETED"),
        "nothing was removed"
    );
}

#[tokio::test]
async fn a_throttled_call_says_how_long_to_wait() {
    let c = Cluster::fake().await;
    let driver = c.driver().await;
    let handle = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("start");
    c.api().fail_next("list", "pods", 429, 1);
    let err = driver
        .inspect_all(std::slice::from_ref(&handle))
        .await
        .remove(0)
        .expect_err("429");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)), "{err}");
    assert!(
        driver
            .inspect_all(std::slice::from_ref(&handle))
            .await
            .remove(0)
            .is_ok()
    );
}

#[tokio::test]
async fn an_unschedulable_pod_fails_its_start_after_the_grace() {
    let c = Cluster::fake().await;
    let driver = c.driver().await;
    let settings = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        node_selector: BTreeMap::from([("pool".into(), "gpu".into())]),
        ..Default::default()
    }));
    driver.configure(&settings).await.expect("configure");
    let begun = tokio::time::Instant::now();
    let err = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect_err("no node fits");
    assert!(
        begun.elapsed() >= c.config.unschedulable_grace,
        "waited out the grace"
    );
    assert!(err.is_retryable());
    assert!(
        err.to_string().starts_with(
            "pod skymirror-p-web-0: cannot be scheduled: Unschedulable: 0/1 nodes are available"
        ),
        "{err}"
    );
    c.until_pod(&c.pod_name("web", 0), "removed", |p| p.is_none())
        .await;
}

#[tokio::test]
async fn an_evicted_pod_has_exited_and_its_replica_gets_a_new_one() {
    let c = Cluster::fake().await;
    let fake = c.api();
    let driver = c.driver().await;
    let spec = c.spec("web", 0, c.hello(), 1);
    let handle = driver.start(&spec).await.expect("start");
    let name = c.pod_name("web", 0);
    c.until_pod(&name, "ready", ready).await;
    fake.edit_pod("default", &name, |pod| {
        pod["status"]["phase"] = json!("Failed");
        pod["status"]["reason"] = json!("Evicted");
        pod["status"]["message"] = json!("The node was low on resource: memory.");
        pod["status"]["containerStatuses"][0]["state"] =
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}});
    });
    assert_eq!(
        driver
            .inspect_all(std::slice::from_ref(&handle))
            .await
            .remove(0)
            .expect("inspect"),
        Inspection::Exited {
            code: Some(137),
            signal: None
        }
    );
    let again = driver.start(&spec).await.expect("a new pod");
    assert_ne!(again.instance_id, handle.instance_id);
    assert_eq!(
        driver.inspect(&handle).await.expect("inspect"),
        Inspection::Exited {
            code: None,
            signal: None
        },
        "the evicted pod is gone"
    );
}

#[tokio::test]
async fn services_expose_an_app_and_go_with_its_last_pod() {
    let c = Cluster::fake().await;
    let fake = c.api();
    let driver = c.driver().await;
    for (app, service_type) in [
        ("cip", ServiceType::ClusterIp),
        ("np", ServiceType::NodePort),
        ("lb", ServiceType::LoadBalancer),
    ] {
        let settings = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
            expose: KubernetesExpose::Service,
            service_type,
            ..Default::default()
        }));
        driver.configure(&settings).await.expect("configure");
        let zero = driver
            .start(&c.spec(app, 0, c.hello(), 1))
            .await
            .expect("start");
        let one = driver
            .start(&c.spec(app, 1, c.hello(), 1))
            .await
            .expect("start");
        let service = format!("skymirror-p-{app}");
        let svc = fake
            .object(Kind::Services, "default", &service)
            .expect("the service");
        let expected = match service_type {
            ServiceType::ClusterIp => {
                format!("{}:8080", svc["spec"]["clusterIP"].as_str().expect("ip"))
            }
            ServiceType::NodePort => {
                format!("127.0.0.1:{}", svc["spec"]["ports"][0]["nodePort"])
            }
            ServiceType::LoadBalancer => format!(
                "{}:8080",
                svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .expect("ingress")
            ),
        };
        assert_eq!(zero.address.as_deref(), Some(expected.as_str()), "{app}");
        assert_eq!(one.address, zero.address, "{app}: one address for the app");
        let pod = c.pods().get(&c.pod_name(app, 0)).await.expect("pod");
        assert_eq!(labels(&pod)[LABEL_SERVICE], service);
        assert_eq!(svc["spec"]["selector"][LABEL_SERVICE], service.as_str());

        driver
            .stop(&zero, Duration::from_secs(1))
            .await
            .expect("stop");
        driver.destroy(&zero).await.expect("destroy");
        assert!(
            fake.object(Kind::Services, "default", &service).is_some(),
            "{app}: one pod is left"
        );
        driver
            .stop(&one, Duration::from_secs(1))
            .await
            .expect("stop");
        driver.destroy(&one).await.expect("destroy");
        assert!(
            fake.object(Kind::Services, "default", &service).is_none(),
            "{app}: gone with the last pod"
        );
    }
}

#[tokio::test]
async fn settings_choose_the_context_and_namespace_of_new_pods_only() {
    let a = Cluster::fake().await;
    let b = FakeApi::start().await;
    b.add_namespace("apps");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = FakeApi::kubeconfig(
        dir.path(),
        &[
            (a.api(), "cluster-a", "default"),
            (&b, "cluster-b", "default"),
        ],
    );
    let driver = KubernetesDriver::connect(KubernetesDriverConfig {
        kubeconfig: Some(kubeconfig),
        ..a.config.clone()
    })
    .await
    .expect("connect");
    let on_a = driver
        .start(&a.spec("web", 0, a.hello(), 1))
        .await
        .expect("start");

    let to_b = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        context: Some("cluster-b".into()),
        namespace: Some("apps".into()),
        labels: BTreeMap::from([("team".into(), "web".into())]),
        ..Default::default()
    }));
    driver.configure(&to_b).await.expect("configure");
    let on_b = driver
        .start(&a.spec("web", 1, a.hello(), 1))
        .await
        .expect("start");
    assert!(
        a.api()
            .object(Kind::Pods, "default", "skymirror-p-web-0")
            .is_some()
    );
    let pod = b
        .object(Kind::Pods, "apps", "skymirror-p-web-1")
        .expect("in b's namespace");
    assert_eq!(pod["metadata"]["labels"]["team"], "web");
    let both = driver.inspect_all(&[on_a.clone(), on_b.clone()]).await;
    assert!(
        both.iter().all(|r| matches!(
            r,
            Ok(Inspection::Running { .. } | Inspection::Restarted { .. })
        )),
        "{both:?}"
    );

    // Bad settings change nothing.
    let unknown = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        context: Some("nowhere".into()),
        ..Default::default()
    }));
    let err = driver
        .configure(&unknown)
        .await
        .expect_err("no such context");
    assert!(matches!(err, DriverError::InvalidSettings(_)), "{err:?}");
    assert!(
        err.to_string().starts_with("spec.kubernetes.context: "),
        "{err}"
    );
    let docker = DriverSettings::Docker(Default::default());
    let err = driver
        .configure(&docker)
        .await
        .expect_err("another driver's");
    assert!(matches!(err, DriverError::InvalidSettings(_)), "{err:?}");
    let on_b_too = driver
        .start(&a.spec("web", 2, a.hello(), 1))
        .await
        .expect("start");
    assert!(
        b.object(Kind::Pods, "apps", "skymirror-p-web-2").is_some(),
        "still cluster b"
    );

    // Each instance is removed where it runs.
    for h in [&on_a, &on_b, &on_b_too] {
        driver.stop(h, Duration::from_secs(1)).await.expect("stop");
    }
    assert!(a.api().objects(Kind::Pods, "default").is_empty());
    assert!(b.objects(Kind::Pods, "apps").is_empty());

    let missing = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        namespace: Some("nope".into()),
        ..Default::default()
    }));
    driver.configure(&missing).await.expect("configure");
    let err = driver
        .start(&a.spec("web", 0, a.hello(), 1))
        .await
        .expect_err("no such namespace");
    assert!(
        err.to_string().starts_with("namespace nope does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn following_output_ends_with_the_pod() {
    let c = Cluster::fake().await;
    let driver = c.driver().await;
    let handle = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("start");
    c.until_pod(&c.pod_name("web", 0), "running", ready).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let follow = driver.logs(&handle, LogOptions::new(1, true), tx);
    let stop_after_first = async {
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("output while following")
            .expect("a piece");
        driver
            .stop(&handle, Duration::from_secs(1))
            .await
            .expect("stop");
        while rx.recv().await.is_some() {}
        first
    };
    let (result, first) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(follow, stop_after_first)
    })
    .await
    .expect("following ended with the pod");
    result.expect("logs");
    assert_eq!(String::from_utf8_lossy(&first), "hello from web/p/0\n");
}

// ---------------------------------------------------------------------------
// deploy/k8s: the manifests parse, fit together, and grant what the driver
// uses and nothing more.
// ---------------------------------------------------------------------------

/// Every document of every manifest in deploy/k8s, by file.
fn manifests() -> BTreeMap<String, Vec<serde_json::Value>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/k8s") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("a manifest");
        let docs = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| {
                let value: serde_json::Value =
                    serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
                value
            })
            .collect();
        out.insert(name, docs);
    }
    out
}

/// The one document of `kind` (across every file), as its type.
fn only<T: serde::de::DeserializeOwned>(
    all: &BTreeMap<String, Vec<serde_json::Value>>,
    kind: &str,
) -> T {
    let found: Vec<&serde_json::Value> = all
        .values()
        .flatten()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    serde_json::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn the_manifests_fit_together() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret, ServiceAccount};
    use k8s_openapi::api::rbac::v1::RoleBinding;

    let all = manifests();
    let kustomized: Vec<String> = all["kustomization.yaml"][0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_string())
        .collect();
    let files: Vec<String> = all
        .keys()
        .filter(|f| *f != "kustomization.yaml")
        .cloned()
        .collect();
    let mut listed = kustomized.clone();
    listed.sort();
    assert_eq!(listed, files, "kustomization.yaml lists every manifest");

    let ns: Namespace = only(&all, "Namespace");
    let ns = ns.metadata.name.expect("a name");
    let account: ServiceAccount = only(&all, "ServiceAccount");
    let binding: RoleBinding = only(&all, "RoleBinding");
    let secret: Secret = only(&all, "Secret");
    let claim: PersistentVolumeClaim = only(&all, "PersistentVolumeClaim");
    let deployment: Deployment = only(&all, "Deployment");
    for namespace in [
        &account.metadata.namespace,
        &binding.metadata.namespace,
        &secret.metadata.namespace,
        &claim.metadata.namespace,
        &deployment.metadata.namespace,
    ] {
        assert_eq!(namespace.as_deref(), Some(ns.as_str()));
    }
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), Some(&subject.name)),
        ("ServiceAccount", account.metadata.name.as_ref())
    );
    assert_eq!(binding.role_ref.kind, "Role");

    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.and_then(|s| s.type_).as_deref(),
        Some("Recreate")
    );
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name, account.metadata.name);
    let agent = &pod.containers[0];
    let args = agent.args.clone().unwrap_or_default();
    assert!(
        args.windows(2).any(|w| w == ["--driver", "kubernetes"]),
        "{args:?}"
    );
    let state = args
        .iter()
        .skip_while(|a| *a != "--state-dir")
        .nth(1)
        .expect("--state-dir");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| &m.mount_path == state)
        .expect("the state dir is a volume");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the volume");
    assert_eq!(
        volume
            .persistent_volume_claim
            .as_ref()
            .map(|c| &c.claim_name),
        claim.metadata.name.as_ref(),
        "the state survives a rescheduled agent"
    );
    let env = agent.env.clone().unwrap_or_default();
    for needed in [
        "SKYMIRROR_SERVER",
        "SKYMIRROR_PROVIDER",
        "SKYMIRROR_JOIN_TOKEN",
    ] {
        assert!(env.iter().any(|e| e.name == needed), "{needed}");
    }
    let token = env
        .iter()
        .find(|e| e.name == "SKYMIRROR_JOIN_TOKEN")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .expect("the join token comes from the Secret");
    assert_eq!(Some(&token.name), secret.metadata.name.as_ref());
    assert!(secret.string_data.expect("data").contains_key(&token.key));
}

#[tokio::test]
async fn the_agents_role_grants_what_the_driver_uses_and_nothing_more() {
    use k8s_openapi::api::rbac::v1::Role;
    let role: Role = only(&manifests(), "Role");
    let mut granted = std::collections::BTreeSet::new();
    for rule in role.rules.expect("rules") {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "the core group only"
        );
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                granted.insert((verb.clone(), resource.clone()));
            }
        }
    }

    // Every call the driver makes: starts (a Service with a load balancer
    // included), inspection, output, adoption, stops and removals.
    let c = Cluster::fake().await;
    let driver = c.driver().await;
    let plain = driver
        .start(&c.spec("web", 0, c.hello(), 1))
        .await
        .expect("start");
    let exposed = DriverSettings::Kubernetes(Box::new(KubernetesSettings {
        expose: KubernetesExpose::Service,
        service_type: ServiceType::LoadBalancer,
        ..Default::default()
    }));
    driver.configure(&exposed).await.expect("configure");
    let behind = driver
        .start(&c.spec("api", 0, c.hello(), 1))
        .await
        .expect("start");
    let handles = [plain, behind];
    for r in driver.inspect_all(&handles).await {
        r.expect("inspect");
    }
    driver.recover(&handles[0]).await.expect("recover");
    read_logs(&driver, &handles[0], LogOptions::new(0, false))
        .await
        .expect("logs");
    assert_eq!(
        driver
            .list_instances(&c.provider)
            .await
            .expect("list")
            .len(),
        2
    );
    for h in &handles {
        driver.stop(h, Duration::from_secs(1)).await.expect("stop");
        driver.destroy(h).await.expect("destroy");
    }
    assert!(c.api().objects(Kind::Services, "default").is_empty());

    assert_eq!(c.api().used(), granted, "deploy/k8s/rbac.yaml's Role");
}
