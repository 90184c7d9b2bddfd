//! Checks on deserialized objects: what serde's types cannot say (name syntax, unique
//! port names, references between fields) and what needs other documents or the store.
//!
//! Every check reports an [`Issue`] at the YAML path of the offending value, so the
//! caller can locate it in the source text.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::path::{FieldPath, Issue};
use super::types::{
    App, Document, HealthCheck, ObjectMeta, PlacementTarget, Probe, Provider, Routing, Workload,
};
use super::{Kind, MAX_REPLICAS, ParsedDocument, duration};

/// Longest object name and label key.
const MAX_NAME: usize = 63;
/// Longest label value.
const MAX_LABEL_VALUE: usize = 253;
/// Longest port name.
const MAX_PORT_NAME: usize = 15;
/// Longest health-check interval and timeout.
const MAX_PROBE_PERIOD: Duration = Duration::from_secs(3_600);
/// Longest stop grace period.
const MAX_STOP_GRACE: Duration = Duration::from_secs(3_600);
/// Longest fail-back delay.
const MAX_FAILBACK: Duration = Duration::from_secs(86_400);

/// Problems of one document on its own.
pub(super) fn document(document: &Document) -> Vec<Issue> {
    match document {
        Document::Provider(p) => provider(p),
        Document::App(a) => app(a),
    }
}

/// Problems of a provider on its own.
pub(super) fn provider(provider: &Provider) -> Vec<Issue> {
    let mut issues = Vec::new();
    metadata(&provider.metadata, &mut issues);
    issues
}

/// Problems of an app on its own.
pub(super) fn app(app: &App) -> Vec<Issue> {
    let mut issues = Vec::new();
    metadata(&app.metadata, &mut issues);
    let spec = &app.spec;
    let at = |keys: &[&str]| FieldPath::of(&["spec"]).join(&FieldPath::of(keys));
    workload(&spec.workload, &mut issues);
    if spec.replicas > MAX_REPLICAS {
        issues.push(Issue::new(
            at(&["replicas"]),
            format!("must be at most {MAX_REPLICAS}, found {}", spec.replicas),
        ));
    }
    if spec.placement.standby_replicas > MAX_REPLICAS {
        issues.push(Issue::new(
            at(&["placement", "standbyReplicas"]),
            format!(
                "must be at most {MAX_REPLICAS}, found {}",
                spec.placement.standby_replicas
            ),
        ));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, target) in spec.placement.providers.iter().enumerate() {
        placement_target(
            target,
            at(&["placement", "providers"]).index(i),
            &mut seen,
            i,
            &mut issues,
        );
    }
    if let Some(health) = &spec.health {
        health_check(health, &spec.workload, &mut issues);
    }
    let failback = spec.failover.failback_after;
    if let Some(problem) = whole_seconds(failback, Duration::ZERO, MAX_FAILBACK) {
        issues.push(Issue::new(at(&["failover", "failbackAfter"]), problem));
    }
    if let Some(routing) = &spec.routing {
        routing_check(routing, &spec.workload, &mut issues);
    }
    issues
}

/// Duplicate objects and placements naming providers that exist neither in `docs` nor in
/// `known_providers`; each issue comes with the 1-based index of its document.
pub(super) fn references(
    docs: &[ParsedDocument],
    known_providers: &BTreeSet<String>,
) -> Vec<(usize, Issue)> {
    let mut issues = Vec::new();
    let mut first: BTreeMap<(Kind, &str), usize> = BTreeMap::new();
    for doc in docs {
        let key = (doc.document.kind(), doc.document.name());
        if let Some(earlier) = first.get(&key) {
            issues.push((
                doc.index,
                Issue::new(
                    FieldPath::of(&["metadata", "name"]),
                    format!(
                        "duplicate {} {:?}: already defined in document {earlier}",
                        key.0, key.1
                    ),
                ),
            ));
        } else {
            first.insert(key, doc.index);
        }
    }
    for doc in docs {
        let Document::App(app) = &doc.document else {
            continue;
        };
        for (i, target) in app.spec.placement.providers.iter().enumerate() {
            let Some(name) = &target.name else { continue };
            if !first.contains_key(&(Kind::Provider, name.as_str()))
                && !known_providers.contains(name)
            {
                issues.push((
                    doc.index,
                    Issue::new(
                        FieldPath::of(&["spec", "placement", "providers"])
                            .index(i)
                            .key("name"),
                        format!(
                            "unknown provider {name:?}: not in this input and not applied before"
                        ),
                    ),
                ));
            }
        }
    }
    issues
}

fn metadata(meta: &ObjectMeta, issues: &mut Vec<Issue>) {
    if let Some(problem) = name_problem(&meta.name) {
        issues.push(Issue::new(FieldPath::of(&["metadata", "name"]), problem));
    }
    labels(
        &meta.labels,
        FieldPath::of(&["metadata", "labels"]),
        "label",
        issues,
    );
}

/// Why `name` is not a valid object name, if it is not.
fn name_problem(name: &str) -> Option<String> {
    let rule = "names are 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit";
    let bad_char = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'));
    let problem = if name.is_empty() {
        "must not be empty".to_owned()
    } else if name.len() > MAX_NAME {
        format!("is {} characters long", name.chars().count())
    } else if let Some(c) = bad_char {
        format!("{name:?} contains {c:?}")
    } else if name.starts_with('-') || name.ends_with('-') {
        format!("{name:?} starts or ends with '-'")
    } else {
        return None;
    };
    Some(format!("{problem}: {rule}"))
}

/// Label-style maps (`metadata.labels`, placement selectors).
fn labels(map: &BTreeMap<String, String>, at: FieldPath, what: &str, issues: &mut Vec<Issue>) {
    for (key, value) in map {
        if key.is_empty() {
            issues.push(Issue::new(
                at.clone(),
                format!("{what} keys must not be empty"),
            ));
            continue;
        }
        let here = at.clone().key(key.as_str());
        let key_len = key.chars().count();
        if key_len > MAX_NAME {
            issues.push(Issue::new(
                here.clone(),
                format!("{what} key is {key_len} characters long, at most {MAX_NAME} are allowed"),
            ));
        }
        let value_len = value.chars().count();
        if value.is_empty() {
            issues.push(Issue::new(here, format!("{what} values must not be empty")));
        } else if value_len > MAX_LABEL_VALUE {
            issues.push(Issue::new(
                here,
                format!("{what} value is {value_len} characters long, at most {MAX_LABEL_VALUE} are allowed"),
            ));
        }
    }
}

fn workload(w: &Workload, issues: &mut Vec<Issue>) {
    let at = |key: &str| FieldPath::of(&["spec", key]);
    match (&w.image, &w.command) {
        (None, None) => issues.push(Issue::new(
            FieldPath::of(&["spec"]),
            "at least one of `image` or `command` is required",
        )),
        (image, command) => {
            for (key, value) in [("image", image), ("command", command)] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    issues.push(Issue::new(at(key), "must not be empty"));
                }
            }
        }
    }
    for name in w.env.keys() {
        if !is_env_name(name) {
            let path = if name.is_empty() {
                at("env")
            } else {
                at("env").key(name.as_str())
            };
            issues.push(Issue::new(
                path,
                format!(
                    "invalid environment variable name {name:?}: use letters, digits and '_', not starting with a digit"
                ),
            ));
        }
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, port) in w.ports.iter().enumerate() {
        let here = at("ports").index(i);
        let valid = !port.name.is_empty()
            && port.name.len() <= MAX_PORT_NAME
            && port
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            issues.push(Issue::new(
                here.clone().key("name"),
                format!(
                    "invalid port name {:?}: use 1 to {MAX_PORT_NAME} lowercase letters, digits and '-'",
                    port.name
                ),
            ));
        } else if let Some(earlier) = seen.get(port.name.as_str()) {
            issues.push(Issue::new(
                here.clone().key("name"),
                format!(
                    "duplicate port name {:?}: already used by spec.ports[{earlier}]",
                    port.name
                ),
            ));
        } else {
            seen.insert(&port.name, i);
        }
        if port.container_port == Some(0) {
            issues.push(Issue::new(
                here.key("containerPort"),
                "must be between 1 and 65535, found 0",
            ));
        }
    }
    if let Some(problem) =
        whole_seconds(w.stop_grace_period, Duration::from_secs(1), MAX_STOP_GRACE)
    {
        issues.push(Issue::new(at("stopGracePeriod"), problem));
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why `d` is not a whole number of seconds within `min..=max`, if it is not.
fn whole_seconds(d: Duration, min: Duration, max: Duration) -> Option<String> {
    if d.subsec_nanos() != 0 {
        Some(format!(
            "must be a whole number of seconds, found {}",
            duration::format(d)
        ))
    } else if d < min {
        Some(format!("must be at least {}", duration::format(min)))
    } else if d > max {
        Some(format!(
            "must be at most {}, found {}",
            duration::format(max),
            duration::format(d)
        ))
    } else {
        None
    }
}

fn placement_target(
    target: &PlacementTarget,
    here: FieldPath,
    seen: &mut BTreeMap<String, usize>,
    index: usize,
    issues: &mut Vec<Issue>,
) {
    match (&target.name, target.selector.is_empty()) {
        (None, true) => issues.push(Issue::new(here.clone(), "set either `name` or `selector`")),
        (Some(_), false) => issues.push(Issue::new(
            here.clone(),
            "set either `name` or `selector`, not both",
        )),
        (Some(name), true) => {
            let at = here.clone().key("name");
            if let Some(problem) = name_problem(name) {
                issues.push(Issue::new(at, problem));
            } else if let Some(earlier) = seen.get(name) {
                issues.push(Issue::new(
                    at,
                    format!(
                        "provider {name:?} is already listed at spec.placement.providers[{earlier}]"
                    ),
                ));
            } else {
                seen.insert(name.clone(), index);
            }
        }
        (None, false) => labels(
            &target.selector,
            here.clone().key("selector"),
            "selector",
            issues,
        ),
    }
    if target.weight == 0 {
        issues.push(Issue::new(here.key("weight"), "must be at least 1"));
    }
}

fn health_check(h: &HealthCheck, w: &Workload, issues: &mut Vec<Issue>) {
    let at = |keys: &[&str]| FieldPath::of(&["spec", "health"]).join(&FieldPath::of(keys));
    match &h.probe {
        Probe::Http { path, port } => {
            if !path.starts_with('/') {
                issues.push(Issue::new(
                    at(&["http", "path"]),
                    format!("must start with '/', found {path:?}"),
                ));
            }
            port_reference(port, w, at(&["http", "port"]), issues);
        }
        Probe::Tcp { port } => port_reference(port, w, at(&["tcp", "port"]), issues),
        Probe::Exec { command } => match command.first() {
            None => issues.push(Issue::new(at(&["exec", "command"]), "must not be empty")),
            Some(program) if program.trim().is_empty() => issues.push(Issue::new(
                at(&["exec", "command"]).index(0),
                "the program must not be empty",
            )),
            Some(_) => {}
        },
    }
    for (key, value) in [("interval", h.interval), ("timeout", h.timeout)] {
        if value.is_zero() {
            issues.push(Issue::new(at(&[key]), "must be greater than 0"));
        } else if value > MAX_PROBE_PERIOD {
            issues.push(Issue::new(
                at(&[key]),
                format!(
                    "must be at most {}, found {}",
                    duration::format(MAX_PROBE_PERIOD),
                    duration::format(value)
                ),
            ));
        }
    }
    if !h.interval.is_zero() && h.timeout > h.interval {
        issues.push(Issue::new(
            at(&["timeout"]),
            format!(
                "must not be longer than the interval ({}), found {}",
                duration::format(h.interval),
                duration::format(h.timeout)
            ),
        ));
    }
    for (key, value) in [
        ("failureThreshold", h.failure_threshold),
        ("successThreshold", h.success_threshold),
    ] {
        if value == 0 {
            issues.push(Issue::new(at(&[key]), "must be at least 1"));
        }
    }
}

/// `port` must name one of the app's ports.
fn port_reference(port: &str, w: &Workload, at: FieldPath, issues: &mut Vec<Issue>) {
    if w.ports.iter().any(|p| p.name == port) {
        return;
    }
    let names: Vec<&str> = w.ports.iter().map(|p| p.name.as_str()).collect();
    let message = if names.is_empty() {
        format!("unknown port {port:?}: the app declares no ports (spec.ports)")
    } else {
        format!(
            "unknown port {port:?}: the app's ports are {}",
            names.join(", ")
        )
    };
    issues.push(Issue::new(at, message));
}

fn routing_check(r: &Routing, w: &Workload, issues: &mut Vec<Issue>) {
    let at = |key: &str| FieldPath::of(&["spec", "routing", key]);
    if r.listen.parse::<SocketAddr>().is_err() {
        issues.push(Issue::new(
            at("listen"),
            format!("invalid listen address {:?}: expected an IP address and port such as 127.0.0.1:8080", r.listen),
        ));
    }
    for (i, host) in r.hosts.iter().enumerate() {
        if host.trim().is_empty() {
            issues.push(Issue::new(at("hosts").index(i), "must not be empty"));
        }
    }
    port_reference(&r.port, w, at("port"), issues);
}
