//! What a pod's status says about its replica: pure functions of the pod as
//! the API server returns it.
//!
//! The pod's phase, its conditions (`PodScheduled`, `Ready`) and its
//! container's state give the replica's state and readiness, and the
//! cluster's own words for what is wrong (`ImagePullBackOff`,
//! `CrashLoopBackOff`, `Unschedulable`, `Evicted`, `OOMKilled`) are kept
//! with their messages, for people.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod, PodCondition};

use super::objects::CONTAINER;
use crate::driver::{DriverError, Inspection, RuntimeHealth};

/// Waiting reasons of a container whose image cannot be had: the same spec
/// gets the same answer, so the start fails for the workload.
const IMAGE_FAILURES: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "RegistryUnavailable",
    "ImageInspectError",
];

/// Waiting and termination reasons of a container the runtime cannot create
/// or run as specified (a missing secret, an entrypoint that does not exist).
const RUN_FAILURES: [&str; 5] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "StartError",
    "ContainerCannotRun",
];

/// How far the start of a pod has got.
#[derive(Debug)]
pub(super) enum Progress {
    /// On its way (being scheduled, its image pulled, its container
    /// created): what it waits for, for people.
    Waiting(String),
    /// Its container has run, and it has an address.
    Started {
        /// The pod's address.
        pod_ip: String,
        /// The address of its node (where node ports are reached).
        host_ip: Option<String>,
    },
    /// It will not run as it is: the cluster's reason.
    Failed(DriverError),
}

/// The container of the replica.
fn container(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

/// The pod's condition of type `type_`.
fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// `reason: message`, or whichever of them there is.
fn said(reason: Option<&str>, message: Option<&str>) -> Option<String> {
    let reason = reason.filter(|r| !r.is_empty());
    let message = message.map(str::trim).filter(|m| !m.is_empty());
    match (reason, message) {
        (Some(r), Some(m)) => Some(format!("{r}: {m}")),
        (Some(r), None) => Some(r.to_string()),
        (None, Some(m)) => Some(m.to_string()),
        (None, None) => None,
    }
}

/// How a terminated container ended: `Error, exit code 3`, `OOMKilled,
/// exit code 137`.
fn ended(state: Option<&ContainerState>) -> Option<String> {
    let t = state?.terminated.as_ref()?;
    let how = match t.reason.as_deref().filter(|r| !r.is_empty()) {
        Some(reason) => format!("{reason}, exit code {}", t.exit_code),
        None => format!("exit code {}", t.exit_code),
    };
    Some(
        match t
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            Some(message) => format!("{how}: {message}"),
            None => how,
        },
    )
}

/// The cluster's account of what is wrong with the pod, for people; `None`
/// when nothing is.
pub(super) fn trouble(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref();
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("the pod is being deleted".into());
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Failed" | "Succeeded")) {
        let pod_said = said(
            status.and_then(|s| s.reason.as_deref()),
            status.and_then(|s| s.message.as_deref()),
        );
        let exit = container(pod).and_then(|c| ended(c.state.as_ref()));
        let phase = phase.unwrap_or_default();
        return Some(match (pod_said, exit) {
            (Some(p), Some(e)) => format!("pod {phase}: {p} (container {e})"),
            (Some(p), None) => format!("pod {phase}: {p}"),
            (None, Some(e)) => format!("pod {phase}: container {e}"),
            (None, None) => format!("pod {phase}"),
        });
    }
    if let Some(c) = container(pod) {
        let waiting = c
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .filter(|w| {
                !matches!(
                    w.reason.as_deref(),
                    Some("ContainerCreating" | "PodInitializing")
                )
            })
            .and_then(|w| said(w.reason.as_deref(), w.message.as_deref()));
        let last = ended(c.last_state.as_ref()).map(|e| format!("last exit: {e}"));
        return match (waiting, last) {
            (Some(w), Some(l)) => Some(format!("{w}; {l}")),
            (Some(w), None) => Some(w),
            (None, Some(l)) if c.restart_count > 0 => Some(l),
            _ => None,
        };
    }
    condition(pod, "PodScheduled")
        .filter(|c| c.status == "False")
        .and_then(|c| said(c.reason.as_deref(), c.message.as_deref()))
}

/// How far the start of `pod` has got, `waited` after it was created. An
/// unschedulable pod gets `unschedulable_grace` (a cluster autoscaler may
/// be adding a node for it) before its start fails.
pub(super) fn progress(pod: &Pod, waited: Duration, unschedulable_grace: Duration) -> Progress {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref();
    let failed =
        |what: String| Progress::Failed(DriverError::Runtime(format!("pod {name}: {what}")));
    if pod.metadata.deletion_timestamp.is_some() {
        return failed("deleted before its container ran".into());
    }
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    ) {
        return failed(trouble(pod).unwrap_or_else(|| "ended".into()));
    }
    if let Some(c) = container(pod) {
        let state = c.state.as_ref();
        let waiting = state.and_then(|s| s.waiting.as_ref());
        let reason = waiting
            .and_then(|w| w.reason.as_deref())
            .unwrap_or_default();
        if IMAGE_FAILURES.contains(&reason) {
            let image = c.image.as_str();
            let what = trouble(pod).unwrap_or_else(|| reason.to_string());
            return Progress::Failed(DriverError::InvalidWorkload(format!(
                "pod {name}: image {image} cannot be pulled: {what}"
            )));
        }
        let cannot_run = RUN_FAILURES.contains(&reason)
            || [state, c.last_state.as_ref()]
                .into_iter()
                .flatten()
                .any(|s| {
                    s.terminated
                        .as_ref()
                        .and_then(|t| t.reason.as_deref())
                        .is_some_and(|r| RUN_FAILURES.contains(&r))
                });
        if cannot_run {
            let what = trouble(pod).unwrap_or_else(|| reason.to_string());
            return Progress::Failed(DriverError::InvalidWorkload(format!(
                "pod {name}: the container cannot run: {what}"
            )));
        }
        // It has run once it runs, or has ended or is waiting to restart
        // (a crash loop is the kubelet's to restart, and the inspection's
        // to report).
        let ran = state.is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            || c.restart_count > 0;
        if ran {
            return match status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty())
            {
                Some(pod_ip) => Progress::Started {
                    pod_ip,
                    host_ip: status
                        .and_then(|s| s.host_ip.clone())
                        .filter(|ip| !ip.is_empty()),
                },
                None => Progress::Waiting("an address".into()),
            };
        }
        return Progress::Waiting(
            match waiting.and_then(|w| said(w.reason.as_deref(), w.message.as_deref())) {
                Some(what) => format!("its container ({what})"),
                None => "its container".into(),
            },
        );
    }
    match condition(pod, "PodScheduled").filter(|c| c.status == "False") {
        Some(c) if c.reason.as_deref() == Some("Unschedulable") => {
            let what = said(c.reason.as_deref(), c.message.as_deref()).unwrap_or_default();
            if waited >= unschedulable_grace {
                failed(format!("cannot be scheduled: {what}"))
            } else {
                Progress::Waiting(format!("a node ({what})"))
            }
        }
        _ => Progress::Waiting("a node".into()),
    }
}

/// The replica as the runtime sees it, from its pod. The kubelet restarts
/// crashed containers itself, so a pod that still exists is `Restarted` (or
/// `Running` before its first restart); a pod the cluster has given up —
/// failed, evicted, being deleted — has `Exited`.
pub(super) fn inspection(pod: &Pod) -> Inspection {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let c = container(pod);
    if pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Failed" | "Succeeded")) {
        let t = c
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        return Inspection::Exited {
            code: t.map(|t| t.exit_code),
            signal: t.and_then(|t| t.signal),
        };
    }
    let Some(c) = c else {
        return Inspection::Restarted {
            restarts: 0,
            running: false,
            health: None,
        };
    };
    let restarts = u32::try_from(c.restart_count).unwrap_or(0);
    let started_at = c
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .map(|r| r.started_at.as_ref().map(|t| t.0));
    let Some(started_at) = started_at else {
        return Inspection::Restarted {
            restarts,
            running: false,
            health: None,
        };
    };
    // Readiness is the cluster's: `Ready` (what Services route by). False
    // since before this container started means it is not ready yet; false
    // since after, that it was and is no more (its node stopped reporting,
    // a readiness gate failed).
    let health = condition(pod, "Ready").and_then(|ready| match ready.status.as_str() {
        "True" => Some(RuntimeHealth::Healthy),
        "False" => {
            let since = ready.last_transition_time.as_ref().map(|t| t.0);
            match (since, started_at) {
                (Some(since), Some(started)) if since > started => Some(RuntimeHealth::Unhealthy),
                _ => Some(RuntimeHealth::Starting),
            }
        }
        _ => None,
    });
    if restarts == 0 {
        Inspection::Running { health }
    } else {
        Inspection::Restarted {
            restarts,
            running: true,
            health,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "skymirror-gke-web-0"},
            "status": status,
        }))
        .expect("a pod")
    }

    fn running(restarts: i32, ready: &str, ready_since: &str) -> Pod {
        pod(json!({
            "phase": "Running",
            "podIP": "10.0.0.7",
            "hostIP": "192.0.2.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": ready, "lastTransitionTime": ready_since},
            ],
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": ready == "True",
                "restartCount": restarts,
                "state": {"running": {"startedAt": "2026-01-01T10:00:00Z"}},
            }],
        }))
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_running_pod_has_started_and_its_readiness_comes_from_the_ready_condition() {
        let p = running(0, "True", "2026-01-01T10:00:01Z");
        match progress(&p, Duration::ZERO, GRACE) {
            Progress::Started { pod_ip, host_ip } => {
                assert_eq!(pod_ip, "10.0.0.7");
                assert_eq!(host_ip.as_deref(), Some("192.0.2.1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            inspection(&p),
            Inspection::Running {
                health: Some(RuntimeHealth::Healthy)
            }
        );
        assert_eq!(trouble(&p), None);
        // Not ready since before the container started: not ready yet.
        assert_eq!(
            inspection(&running(0, "False", "2026-01-01T09:59:59Z")),
            Inspection::Running {
                health: Some(RuntimeHealth::Starting)
            }
        );
        // Not ready since after: it was, and is no more.
        assert_eq!(
            inspection(&running(2, "False", "2026-01-01T10:05:00Z")),
            Inspection::Restarted {
                restarts: 2,
                running: true,
                health: Some(RuntimeHealth::Unhealthy)
            }
        );
    }

    #[test]
    fn a_crash_loop_is_the_kubelets_with_the_last_exit_reported() {
        let p = pod(json!({
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": false,
                "restartCount": 4,
                "state": {"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 1m20s restarting failed container=app pod=skymirror-gke-web-0",
                }},
                "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}},
            }],
        }));
        assert_eq!(
            inspection(&p),
            Inspection::Restarted {
                restarts: 4,
                running: false,
                health: None
            }
        );
        assert_eq!(
            trouble(&p).as_deref(),
            Some(
                "CrashLoopBackOff: back-off 1m20s restarting failed container=app \
                 pod=skymirror-gke-web-0; last exit: Error, exit code 3"
            )
        );
        // It has run, so its start is over: the kubelet restarts it.
        assert!(matches!(
            progress(&p, Duration::ZERO, GRACE),
            Progress::Started { .. }
        ));
    }

    #[test]
    fn an_oom_kill_is_reported_with_the_clusters_reason() {
        let p = pod(json!({
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": true,
                "restartCount": 1,
                "state": {"running": {"startedAt": "2026-01-01T10:00:00Z"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }],
        }));
        assert_eq!(
            inspection(&p),
            Inspection::Restarted {
                restarts: 1,
                running: true,
                health: None
            }
        );
        assert_eq!(
            trouble(&p).as_deref(),
            Some("last exit: OOMKilled, exit code 137")
        );
    }

    #[test]
    fn an_evicted_pod_has_exited_for_good() {
        let p = pod(json!({
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: memory.",
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}},
            }],
        }));
        assert_eq!(
            inspection(&p),
            Inspection::Exited {
                code: Some(137),
                signal: None
            }
        );
        assert_eq!(
            trouble(&p).as_deref(),
            Some(
                "pod Failed: Evicted: The node was low on resource: memory. \
                 (container ContainerStatusUnknown, exit code 137)"
            )
        );
        match progress(&p, Duration::ZERO, GRACE) {
            Progress::Failed(e) => {
                assert!(e.is_retryable());
                assert!(e.to_string().contains("Evicted"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn image_pull_failures_fail_the_start_for_the_workload() {
        let p = pod(json!({
            "phase": "Pending",
            "podIP": "10.0.0.7",
            "containerStatuses": [{
                "name": "app", "image": "registry.invalid/nope:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {
                    "reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"registry.invalid/nope:1\"",
                }},
            }],
        }));
        match progress(&p, Duration::ZERO, GRACE) {
            Progress::Failed(e @ DriverError::InvalidWorkload(_)) => assert_eq!(
                e.to_string(),
                "pod skymirror-gke-web-0: image registry.invalid/nope:1 cannot be pulled: \
                 ImagePullBackOff: Back-off pulling image \"registry.invalid/nope:1\""
            ),
            other => panic!("{other:?}"),
        }
        let missing_secret = pod(json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"x\" not found"}},
            }],
        }));
        match progress(&missing_secret, Duration::ZERO, GRACE) {
            Progress::Failed(e @ DriverError::InvalidWorkload(_)) => assert!(
                e.to_string().ends_with(
                    "the container cannot run: CreateContainerConfigError: secret \"x\" not found"
                ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        let creating = pod(json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "app", "image": "example:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }],
        }));
        assert!(matches!(
            progress(&creating, Duration::ZERO, GRACE),
            Progress::Waiting(_)
        ));
        assert_eq!(
            trouble(&creating),
            None,
            "creating a container is no trouble"
        );
    }

    #[test]
    fn an_unschedulable_pod_fails_its_start_after_the_grace() {
        let p = pod(json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient cpu.",
            }],
        }));
        match progress(&p, Duration::from_secs(5), GRACE) {
            Progress::Waiting(what) => assert!(what.contains("Insufficient cpu"), "{what}"),
            other => panic!("{other:?}"),
        }
        match progress(&p, GRACE, GRACE) {
            Progress::Failed(e) => {
                assert!(e.is_retryable(), "capacity may come");
                assert_eq!(
                    e.to_string(),
                    "pod skymirror-gke-web-0: cannot be scheduled: Unschedulable: \
                     0/3 nodes are available: 3 Insufficient cpu."
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            trouble(&p).as_deref(),
            Some("Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.")
        );
        assert_eq!(
            inspection(&p),
            Inspection::Restarted {
                restarts: 0,
                running: false,
                health: None
            }
        );
    }
}
