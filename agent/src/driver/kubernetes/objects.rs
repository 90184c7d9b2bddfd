//! The Kubernetes objects of a replica, built from its spec and the
//! provider's settings: pure functions, no client.
//!
//! A replica is one Pod named `skymirror-<provider>-<app>-<index>`; with
//! `expose: service` an app also has one Service, `skymirror-<provider>-<app>`
//! (shortened with a checksum when that is longer than a Service name may be).
//! Both carry the labels that make them skymirror's and the provider's, which
//! is how the driver finds them again and how it tells them from everything
//! else in the namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, LocalObjectReference, Pod, PodSpec, ResourceRequirements,
    Service, ServicePort, ServiceSpec, Toleration as KubeToleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::driver::settings::{
    KubernetesExpose, KubernetesSettings, ServiceType, TaintEffect, Toleration, TolerationOperator,
};
use crate::driver::{DriverError, ReplicaKey, ReplicaSpec, Workload, replica_env};

/// The field manager every object is applied under.
pub(super) const MANAGER: &str = "skymirror";
/// The well-known label naming the tool that manages an object.
pub(super) const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`] on skymirror's objects.
pub(super) const MANAGED_BY: &str = "skymirror";
/// The well-known label naming the application, for kubectl users' selectors.
pub(super) const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label with the provider an object belongs to.
pub(super) const LABEL_PROVIDER: &str = "skymirror.dev/provider";
/// Label with the app of a replica (or of a Service).
pub(super) const LABEL_APP: &str = "skymirror.dev/app";
/// Label with the index of a replica.
pub(super) const LABEL_INDEX: &str = "skymirror.dev/index";
/// Label with the workload generation a pod runs.
pub(super) const LABEL_GENERATION: &str = "skymirror.dev/workload-generation";
/// Label of a pod reached through its app's Service: the Service's name.
/// The Service selects on it, so pods started while the provider exposed
/// pods are not behind it.
pub(super) const LABEL_SERVICE: &str = "skymirror.dev/service";
/// Annotation with the replica's identity `app/provider/index` (a label
/// value cannot hold `/`).
pub(super) const ANNOTATION_REPLICA: &str = "skymirror.dev/replica";
/// Annotation on a Service with the uid of the pod whose start applied it
/// last. It changes with every start, so a removal that read the Service
/// before a start applied it fails its precondition instead of deleting the
/// Service from under the new pod.
pub(super) const ANNOTATION_APPLIED_FOR: &str = "skymirror.dev/applied-for-pod";
/// The name of the replica's container.
pub(super) const CONTAINER: &str = "app";
/// Longest Service name (an RFC 1035 label).
const MAX_SERVICE_NAME: usize = 63;
/// Longest Pod name (an RFC 1123 subdomain).
const MAX_POD_NAME: usize = 253;
/// Port numbers given to ports without a `containerPort` start here.
const FIRST_DEFAULT_PORT: u16 = 8080;

/// The labels that make an object skymirror's and `provider`'s: the selector
/// of every list, and the test for "ours" before anything is changed.
pub(super) fn owner_selector(provider: &str) -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_PROVIDER}={provider}")
}

/// Whether `labels` mark an object as skymirror's for `provider` (and, when
/// given, for `app`).
pub(super) fn is_ours(
    labels: Option<&BTreeMap<String, String>>,
    provider: &str,
    app: Option<&str>,
) -> bool {
    let Some(labels) = labels else {
        return false;
    };
    let has = |k: &str, v: &str| labels.get(k).is_some_and(|x| x == v);
    has(LABEL_MANAGED_BY, MANAGED_BY)
        && has(LABEL_PROVIDER, provider)
        && app.is_none_or(|app| has(LABEL_APP, app))
}

/// Name of a replica's pod.
pub(super) fn pod_name(provider: &str, key: &ReplicaKey) -> Result<String, DriverError> {
    let name = format!("skymirror-{provider}-{}-{}", key.app, key.index);
    if name.len() > MAX_POD_NAME {
        return Err(DriverError::InvalidWorkload(format!(
            "app {}: pod name {name} is longer than {MAX_POD_NAME} characters",
            key.app
        )));
    }
    Ok(name)
}

/// Name of an app's Service: `skymirror-<provider>-<app>`, or, when that is
/// too long for a Service, its first characters and a checksum of the
/// provider and app, so distinct apps never share one.
pub(super) fn service_name(provider: &str, app: &str) -> String {
    let name = format!("skymirror-{provider}-{app}");
    if name.len() <= MAX_SERVICE_NAME {
        return name;
    }
    let sum = crc32fast::hash(format!("{provider}/{app}").as_bytes());
    let suffix = format!("-{sum:08x}");
    let head = name[..MAX_SERVICE_NAME - suffix.len()].trim_end_matches('-');
    format!("{head}{suffix}")
}

/// One port of a replica, as the pod and the Service declare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResolvedPort {
    /// The app's name for the port.
    pub(super) name: String,
    /// The number the app listens on inside the pod.
    pub(super) number: u16,
    /// `TCP` or `UDP`.
    pub(super) protocol: &'static str,
}

/// The workload's ports with their numbers: `containerPort`, or the lowest
/// free number from 8080 for a port that gives none (pods have addresses of
/// their own, so any number will do; `PORT_<NAME>` tells the app which).
pub(super) fn resolve_ports(
    app: &str,
    workload: &Workload,
) -> Result<Vec<ResolvedPort>, DriverError> {
    let invalid = |reason: String| DriverError::InvalidWorkload(format!("app {app}: {reason}"));
    let mut taken: Vec<(u16, &'static str)> = Vec::new();
    let mut out = Vec::with_capacity(workload.ports.len());
    let mut protocols = Vec::with_capacity(workload.ports.len());
    for port in &workload.ports {
        let protocol = match port.protocol.to_ascii_lowercase().as_str() {
            "tcp" | "" => "TCP",
            "udp" => "UDP",
            other => {
                return Err(invalid(format!(
                    "port {}: protocol {other:?} is not tcp or udp",
                    port.name
                )));
            }
        };
        protocols.push(protocol);
        if let Some(n) = port.container_port {
            if taken.contains(&(n, protocol)) {
                return Err(invalid(format!(
                    "two ports use container port {n}/{protocol}"
                )));
            }
            taken.push((n, protocol));
        }
    }
    let mut next = FIRST_DEFAULT_PORT;
    for (port, protocol) in workload.ports.iter().zip(protocols) {
        let number = match port.container_port {
            Some(n) => n,
            None => {
                while taken.iter().any(|(n, _)| *n == next) {
                    next = next
                        .checked_add(1)
                        .ok_or_else(|| invalid("no free port number left".into()))?;
                }
                taken.push((next, protocol));
                next
            }
        };
        out.push(ResolvedPort {
            name: port.name.clone(),
            number,
            protocol,
        });
    }
    Ok(out)
}

/// Whether `name` may name a container port (an IANA service name: at most
/// 15 lowercase letters, digits and inner single dashes, at least one letter).
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Whether `name` may name a Service port (an RFC 1123 label).
fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Text the kubelet passes on literally: it expands `$(VAR)` in commands,
/// arguments and environment values, and reads `$$` as `$`, so every `$`
/// is doubled. An app then sees what the other drivers give it.
fn literal(text: &str) -> String {
    text.replace('$', "$$")
}

/// The labels every object of the app carries: the settings' extra labels,
/// overridden by skymirror's own.
fn app_labels(
    settings: &KubernetesSettings,
    provider: &str,
    app: &str,
) -> BTreeMap<String, String> {
    let mut labels = settings.labels.clone();
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_NAME.into(), app.into());
    labels.insert(LABEL_PROVIDER.into(), provider.into());
    labels.insert(LABEL_APP.into(), app.into());
    labels
}

/// Whole seconds covering `grace` (Kubernetes counts grace in seconds).
pub(super) fn grace_seconds(grace: std::time::Duration) -> i64 {
    let whole = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i64::try_from(whole).unwrap_or(i64::MAX)
}

fn toleration(t: &Toleration) -> KubeToleration {
    KubeToleration {
        key: t.key.clone(),
        operator: Some(
            match t.operator {
                TolerationOperator::Equal => "Equal",
                TolerationOperator::Exists => "Exists",
            }
            .into(),
        ),
        value: t.value.clone(),
        effect: t.effect.map(|e| {
            match e {
                TaintEffect::NoSchedule => "NoSchedule",
                TaintEffect::PreferNoSchedule => "PreferNoSchedule",
                TaintEffect::NoExecute => "NoExecute",
            }
            .into()
        }),
        toleration_seconds: None,
    }
}

/// The pod of one replica, as it is applied. `service` is the name of the
/// app's Service when the provider exposes apps through one.
pub(super) fn pod(
    spec: &ReplicaSpec,
    namespace: &str,
    settings: &KubernetesSettings,
    ports: &[ResolvedPort],
    service: Option<&str>,
) -> Result<Pod, DriverError> {
    let key = &spec.key;
    let workload = &spec.workload;
    let image = workload
        .image
        .as_deref()
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| {
            DriverError::InvalidWorkload(format!(
                "app {}: the kubernetes driver needs `image`",
                key.app
            ))
        })?;
    let mut labels = app_labels(settings, &spec.provider, &key.app);
    labels.insert(LABEL_INDEX.into(), key.index.to_string());
    labels.insert(
        LABEL_GENERATION.into(),
        spec.workload_generation.to_string(),
    );
    if let Some(service) = service {
        labels.insert(LABEL_SERVICE.into(), service.into());
    }
    let mut annotations = settings.annotations.clone();
    annotations.insert(
        ANNOTATION_REPLICA.into(),
        format!("{}/{}/{}", key.app, spec.provider, key.index),
    );
    let numbers: Vec<(String, u16)> = ports.iter().map(|p| (p.name.clone(), p.number)).collect();
    let env = replica_env(spec, &numbers)
        .into_iter()
        .map(|(name, value)| EnvVar {
            name,
            value: Some(literal(&value)),
            value_from: None,
        })
        .collect();
    let mut limits = BTreeMap::new();
    if let Some(m) = workload.cpu_millis {
        limits.insert("cpu".to_string(), Quantity(format!("{m}m")));
    }
    if let Some(m) = workload.memory_mib {
        limits.insert("memory".to_string(), Quantity(format!("{m}Mi")));
    }
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image.to_string()),
        command: workload.command.as_deref().map(|c| vec![literal(c)]),
        args: Some(workload.args.iter().map(|a| literal(a)).collect::<Vec<_>>())
            .filter(|a| !a.is_empty()),
        env: Some(env),
        ports: Some(
            ports
                .iter()
                .map(|p| ContainerPort {
                    name: Some(p.name.clone()).filter(|n| is_port_name(n)),
                    container_port: i32::from(p.number),
                    protocol: Some(p.protocol.into()),
                    host_ip: None,
                    host_port: None,
                })
                .collect::<Vec<_>>(),
        )
        .filter(|p| !p.is_empty()),
        resources: Some(ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        })
        .filter(|r| r.limits.as_ref().is_some_and(|l| !l.is_empty())),
        working_dir: workload
            .working_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned()),
        ..Default::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&spec.provider, key)?),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            // The kubelet restarts a crashed container in place, with its
            // own back-off; the agent reports those restarts and replaces
            // only a pod the cluster has given up (evicted, deleted, failed).
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(grace_seconds(workload.stop_grace)),
            node_selector: Some(settings.node_selector.clone()).filter(|s| !s.is_empty()),
            tolerations: Some(
                settings
                    .tolerations
                    .iter()
                    .map(toleration)
                    .collect::<Vec<_>>(),
            )
            .filter(|t| !t.is_empty()),
            image_pull_secrets: Some(
                settings
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect::<Vec<_>>(),
            )
            .filter(|s| !s.is_empty()),
            // Replicas get the environment the other drivers give them, not
            // one variable per Service of the namespace.
            enable_service_links: Some(false),
            // Replicas need no access to the Kubernetes API.
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    })
}

/// The Service of an app, as it is applied by the start of the pod with uid
/// `pod_uid`. It selects the app's pods labelled with its name.
pub(super) fn service(
    provider: &str,
    app: &str,
    namespace: &str,
    settings: &KubernetesSettings,
    ports: &[ResolvedPort],
    pod_uid: &str,
) -> Service {
    let name = service_name(provider, app);
    let mut selector = BTreeMap::new();
    selector.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
    selector.insert(LABEL_PROVIDER.to_string(), provider.to_string());
    selector.insert(LABEL_APP.to_string(), app.to_string());
    selector.insert(LABEL_SERVICE.to_string(), name.clone());
    let mut annotations = settings.annotations.clone();
    annotations.insert(ANNOTATION_APPLIED_FOR.into(), pod_uid.into());
    let type_ = match settings.service_type {
        ServiceType::ClusterIp => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    let ports = ports
        .iter()
        .enumerate()
        .map(|(i, p)| ServicePort {
            name: Some(if is_label(&p.name) {
                p.name.clone()
            } else {
                format!("port-{i}")
            }),
            port: i32::from(p.number),
            target_port: Some(IntOrString::Int(i32::from(p.number))),
            protocol: Some(p.protocol.into()),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.into()),
            labels: Some(app_labels(settings, provider, app)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether the provider's settings put new pods behind a Service.
pub(super) fn exposed_by_service(settings: &KubernetesSettings) -> bool {
    settings.expose == KubernetesExpose::Service
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::driver::PortSpec;
    use crate::driver::settings::TaintEffect;

    fn spec(app: &str, ports: Vec<PortSpec>) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey {
                app: app.into(),
                index: 2,
            },
            provider: "gke".into(),
            workload: Workload {
                image: Some("example:1".into()),
                command: None,
                args: vec![],
                env: vec![("GREETING".into(), "costs $(5)".into())],
                ports,
                working_dir: None,
                stop_grace: Duration::from_millis(1500),
                cpu_millis: Some(250),
                memory_mib: None,
            },
            workload_generation: 7,
        }
    }

    fn port(name: &str, container_port: Option<u16>) -> PortSpec {
        PortSpec {
            name: name.into(),
            container_port,
            protocol: "tcp".into(),
        }
    }

    #[test]
    fn ports_without_a_number_get_free_ones_from_8080() {
        let s = spec(
            "web",
            vec![
                port("http", None),
                port("admin", Some(8080)),
                port("metrics", None),
            ],
        );
        let ports = resolve_ports("web", &s.workload).expect("ports");
        let numbers: Vec<u16> = ports.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![8081, 8080, 8082]);

        let clash = spec("web", vec![port("a", Some(80)), port("b", Some(80))]);
        let err = resolve_ports("web", &clash.workload).expect_err("clash");
        assert_eq!(
            err.to_string(),
            "app web: two ports use container port 80/TCP"
        );
        let mut udp = clash.clone();
        udp.workload.ports[1].protocol = "udp".into();
        assert!(
            resolve_ports("web", &udp.workload).is_ok(),
            "80/tcp and 80/udp differ"
        );
        udp.workload.ports[1].protocol = "sctp".into();
        assert!(resolve_ports("web", &udp.workload).is_err());
    }

    #[test]
    fn the_pod_carries_identity_settings_and_literal_text() {
        let s = spec(
            "web",
            vec![port("http", Some(8080)), port("very-long-port-name", None)],
        );
        let settings = KubernetesSettings {
            labels: BTreeMap::from([
                ("team".into(), "web".into()),
                // skymirror's own labels win.
                (LABEL_APP.into(), "other".into()),
            ]),
            annotations: BTreeMap::from([("owner".into(), "ops".into())]),
            node_selector: BTreeMap::from([("pool".into(), "apps".into())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: TolerationOperator::Equal,
                value: Some("web".into()),
                effect: Some(TaintEffect::NoSchedule),
            }],
            image_pull_secrets: vec!["registry".into()],
            ..Default::default()
        };
        let ports = resolve_ports("web", &s.workload).expect("ports");
        let pod = pod(&s, "apps", &settings, &ports, Some("skymirror-gke-web")).expect("pod");
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("skymirror-gke-web-2"));
        assert_eq!(meta.namespace.as_deref(), Some("apps"));
        let labels = meta.labels.as_ref().expect("labels");
        assert!(is_ours(Some(labels), "gke", Some("web")));
        assert!(!is_ours(Some(labels), "aks", None));
        assert_eq!(labels["team"], "web");
        assert_eq!(labels[LABEL_INDEX], "2");
        assert_eq!(labels[LABEL_GENERATION], "7");
        assert_eq!(labels[LABEL_SERVICE], "skymirror-gke-web");
        let annotations = meta.annotations.as_ref().expect("annotations");
        assert_eq!(annotations[ANNOTATION_REPLICA], "web/gke/2");
        assert_eq!(annotations["owner"], "ops");

        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            spec.termination_grace_period_seconds,
            Some(2),
            "1.5 s rounds up"
        );
        assert_eq!(
            spec.node_selector.as_ref().expect("selector")["pool"],
            "apps"
        );
        let t = &spec.tolerations.as_ref().expect("tolerations")[0];
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref()
            ),
            (
                Some("dedicated"),
                Some("Equal"),
                Some("web"),
                Some("NoSchedule")
            )
        );
        assert_eq!(
            spec.image_pull_secrets.as_ref().expect("secrets")[0].name,
            "registry"
        );
        let c = &spec.containers[0];
        assert_eq!(c.name, CONTAINER);
        let ports = c.ports.as_ref().expect("ports");
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[1].name, None, "not a valid container port name");
        assert_eq!(ports[1].container_port, 8081);
        let env: BTreeMap<&str, &str> = c
            .env
            .as_ref()
            .expect("env")
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(
            env["GREETING"], "costs $$(5)",
            "the kubelet must not expand it"
        );
        assert_eq!(env["PORT"], "8080");
        assert_eq!(env["PORT_VERY_LONG_PORT_NAME"], "8081");
        assert_eq!(env["SKYMIRROR_REPLICA"], "web/gke/2");
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(limits["cpu"].0, "250m");
        assert!(!limits.contains_key("memory"));
    }

    #[test]
    fn a_pod_needs_an_image() {
        let mut s = spec("web", vec![]);
        s.workload.image = None;
        let err =
            pod(&s, "default", &KubernetesSettings::default(), &[], None).expect_err("no image");
        assert_eq!(
            err.to_string(),
            "app web: the kubernetes driver needs `image`"
        );
    }

    #[test]
    fn service_names_fit_in_a_label_and_stay_distinct() {
        assert_eq!(service_name("gke", "web"), "skymirror-gke-web");
        let long_app = "a".repeat(60);
        let one = service_name("gke", &long_app);
        let other = service_name("gke", &format!("{}b", "a".repeat(59)));
        assert!(one.len() <= MAX_SERVICE_NAME, "{one}");
        assert!(is_label(&one), "{one}");
        assert_ne!(one, other);
        assert_eq!(one, service_name("gke", &long_app), "stable");
    }

    #[test]
    fn the_service_selects_the_apps_exposed_pods() {
        let s = spec(
            "web",
            vec![port("http", Some(8080)), port("UPPER", Some(9090))],
        );
        let settings = KubernetesSettings {
            expose: KubernetesExpose::Service,
            service_type: ServiceType::LoadBalancer,
            ..Default::default()
        };
        let ports = resolve_ports("web", &s.workload).expect("ports");
        let svc = service("gke", "web", "apps", &settings, &ports, "uid-1");
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        let selector = spec.selector.as_ref().expect("selector");
        assert_eq!(selector[LABEL_SERVICE], "skymirror-gke-web");
        assert_eq!(selector[LABEL_APP], "web");
        let ports = spec.ports.as_ref().expect("ports");
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[1].name.as_deref(), Some("port-1"));
        assert_eq!(ports[1].target_port, Some(IntOrString::Int(9090)));
        assert_eq!(
            svc.metadata.annotations.as_ref().expect("annotations")[ANNOTATION_APPLIED_FOR],
            "uid-1"
        );
    }
}
