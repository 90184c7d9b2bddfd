//! Checks on deserialized objects: what serde's types cannot say (name syntax, unique
//! port names, references between fields) and what needs other documents or the store.
//!
//! Every check reports an [`Issue`] at the YAML path of the offending value, so the
//! caller can locate it in the source text.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::uri::{Scheme, Uri};

use super::path::{FieldPath, Issue};
use super::types::DEFAULT_RESPONSE_TIMEOUT;
use super::types::{
    App, DockerSettings, Document, DriverKind, Ec2Settings, HealthCheck, KubernetesSettings,
    ObjectMeta, PlacementTarget, Probe, Provider, ProviderSpec, Routing, RoutingProtocol,
    TolerationOperator, UpstreamProtocol, Workload,
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
/// Shortest response-head timeout: below it, ordinary replicas would time out.
const MIN_RESPONSE_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest response-head timeout.
const MAX_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3_600);

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
    driver_settings(&provider.spec, &mut issues);
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
pub fn name_problem(name: &str) -> Option<String> {
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
    let timeout = r.response_timeout;
    if timeout < MIN_RESPONSE_TIMEOUT || timeout > MAX_RESPONSE_TIMEOUT {
        issues.push(Issue::new(
            at("responseTimeout"),
            format!(
                "must be between {} and {}, found {}",
                duration::format(MIN_RESPONSE_TIMEOUT),
                duration::format(MAX_RESPONSE_TIMEOUT),
                duration::format(timeout)
            ),
        ));
    } else if !timeout.subsec_nanos().is_multiple_of(1_000_000) {
        issues.push(Issue::new(
            at("responseTimeout"),
            format!(
                "must be a whole number of milliseconds, found {}",
                duration::format(timeout)
            ),
        ));
    }
    if r.protocol == RoutingProtocol::Tcp {
        if r.upstream_protocol != UpstreamProtocol::Http1 {
            issues.push(Issue::new(
                at("upstreamProtocol"),
                "applies to HTTP routing only; a tcp route forwards bytes as they come",
            ));
        }
        if !r.hedge {
            issues.push(Issue::new(
                at("hedge"),
                "applies to HTTP routing only; a tcp route is never hedged",
            ));
        }
        if r.response_timeout != DEFAULT_RESPONSE_TIMEOUT {
            issues.push(Issue::new(
                at("responseTimeout"),
                "applies to HTTP routing only; a tcp route has no response head",
            ));
        }
    }
}

/// Longest EC2 tag key.
const MAX_TAG_KEY: usize = 128;
/// Longest EC2 tag value.
const MAX_TAG_VALUE: usize = 256;
/// Longest EC2 key pair name.
const MAX_KEY_NAME: usize = 255;
/// Longest IAM instance profile name.
const MAX_PROFILE_NAME: usize = 128;
/// Largest EC2 user data, in bytes before base64 (AWS's limit).
const MAX_USER_DATA: usize = 16 * 1024;
/// Largest total size of a Kubernetes object's annotations, keys and values (the API
/// server's limit).
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// Longest DNS subdomain (Kubernetes object names, label key prefixes).
const MAX_DNS_SUBDOMAIN: usize = 253;
/// Key prefix of skymirror's own EC2 tags.
const OWN_TAG_PREFIX: &str = "skymirror";
/// Label and annotation key prefix of skymirror's own Kubernetes metadata.
const OWN_LABEL_PREFIX: &str = "skymirror.dev";

/// The settings blocks: only the driver's own, each well-formed.
fn driver_settings(spec: &ProviderSpec, issues: &mut Vec<Issue>) {
    let blocks = [
        (DriverKind::Docker, spec.docker.is_some()),
        (DriverKind::Ec2, spec.ec2.is_some()),
        (DriverKind::Kubernetes, spec.kubernetes.is_some()),
    ];
    for (block, _) in blocks
        .iter()
        .filter(|(block, set)| *set && *block != spec.driver)
    {
        let hint = if blocks.iter().any(|(b, _)| *b == spec.driver) {
            format!("its settings go in spec.{}", spec.driver.as_str())
        } else {
            format!("the {} driver takes no settings", spec.driver.as_str())
        };
        issues.push(Issue::new(
            FieldPath::of(&["spec", block.as_str()]),
            format!(
                "{} settings do not apply to this provider: its driver is {} ({hint})",
                block.as_str(),
                spec.driver.as_str()
            ),
        ));
    }
    match spec.driver {
        DriverKind::Docker => {
            if let Some(docker) = &spec.docker {
                docker_settings(docker, issues);
            }
        }
        DriverKind::Ec2 => {
            if let Some(ec2) = &spec.ec2 {
                ec2_settings(ec2, issues);
            }
        }
        DriverKind::Kubernetes => {
            if let Some(kubernetes) = &spec.kubernetes {
                kubernetes_settings(kubernetes, issues);
            }
        }
        DriverKind::Process => {}
    }
}

fn docker_settings(d: &DockerSettings, issues: &mut Vec<Issue>) {
    let at = |key: &str| FieldPath::of(&["spec", "docker", key]);
    if let Some(network) = &d.network {
        if network.is_empty() {
            issues.push(Issue::new(at("network"), "must not be empty"));
        } else if network == "host" || network == "none" {
            issues.push(Issue::new(
                at("network"),
                format!(
                    "Docker network {network:?} gives containers no address of their own; name a bridge or overlay network"
                ),
            ));
        } else if let Some(c) = network
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
        {
            issues.push(Issue::new(
                at("network"),
                format!("invalid Docker network name {network:?}: contains {c:?}"),
            ));
        }
    }
    if let Some(bind_host) = &d.bind_host {
        if bind_host.parse::<IpAddr>().is_err() {
            issues.push(Issue::new(
                at("bindHost"),
                format!("invalid bind address {bind_host:?}: expected an IP address such as 127.0.0.1 or ::1"),
            ));
        } else if d.network.is_some() {
            issues.push(Issue::new(
                at("bindHost"),
                "has no effect with `network`: replicas on a network publish no ports",
            ));
        }
    }
}

fn ec2_settings(e: &Ec2Settings, issues: &mut Vec<Issue>) {
    let at = |key: &str| FieldPath::of(&["spec", "ec2", key]);
    if !is_aws_region(&e.region) {
        issues.push(Issue::new(
            at("region"),
            format!(
                "invalid region {:?}: expected an AWS region such as eu-west-1",
                e.region
            ),
        ));
    }
    if let Some(problem) = aws_id_problem("AMI", "ami", &e.ami) {
        issues.push(Issue::new(at("ami"), problem));
    }
    if !is_instance_type(&e.instance_type) {
        issues.push(Issue::new(
            at("instanceType"),
            format!(
                "invalid instance type {:?}: expected a family and a size such as t3.small",
                e.instance_type
            ),
        ));
    }
    if let Some(problem) = aws_id_problem("subnet", "subnet", &e.subnet_id) {
        issues.push(Issue::new(at("subnetId"), problem));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, group) in e.security_group_ids.iter().enumerate() {
        let here = at("securityGroupIds").index(i);
        if let Some(problem) = aws_id_problem("security group", "sg", group) {
            issues.push(Issue::new(here, problem));
        } else if let Some(earlier) = seen.get(group.as_str()) {
            issues.push(Issue::new(
                here,
                format!("security group {group:?} is already listed at spec.ec2.securityGroupIds[{earlier}]"),
            ));
        } else {
            seen.insert(group, i);
        }
    }
    if let Some(key_name) = &e.key_name {
        let len = key_name.chars().count();
        if key_name.trim().is_empty() {
            issues.push(Issue::new(at("keyName"), "must not be empty"));
        } else if len > MAX_KEY_NAME || !key_name.is_ascii() || key_name.trim() != key_name {
            issues.push(Issue::new(
                at("keyName"),
                format!("invalid key pair name {key_name:?}: use 1 to {MAX_KEY_NAME} ASCII characters, without leading or trailing spaces"),
            ));
        }
    }
    if let Some(profile) = &e.iam_instance_profile
        && let Some(problem) = instance_profile_problem(profile)
    {
        issues.push(Issue::new(at("iamInstanceProfile"), problem));
    }
    for (key, value) in &e.tags {
        let here = if key.is_empty() {
            at("tags")
        } else {
            at("tags").key(key.as_str())
        };
        let lower = key.to_ascii_lowercase();
        let key_len = key.chars().count();
        let value_len = value.chars().count();
        let problem = if key.is_empty() {
            "tag keys must not be empty".to_owned()
        } else if lower.starts_with("aws:") {
            format!("tag key {key:?} starts with `aws:`, which AWS reserves for its own tags")
        } else if lower.starts_with(OWN_TAG_PREFIX) {
            format!(
                "tag key {key:?} starts with `{OWN_TAG_PREFIX}`, which skymirror reserves for the tags it puts on every instance"
            )
        } else if key_len > MAX_TAG_KEY {
            format!("tag key is {key_len} characters long, at most {MAX_TAG_KEY} are allowed")
        } else if value_len > MAX_TAG_VALUE {
            format!("tag value is {value_len} characters long, at most {MAX_TAG_VALUE} are allowed")
        } else {
            continue;
        };
        issues.push(Issue::new(here, problem));
    }
    if let Some(url) = &e.endpoint_url
        && let Some(problem) = endpoint_url_problem(url)
    {
        issues.push(Issue::new(at("endpointUrl"), problem));
    }
    if let Some(user_data) = &e.user_data {
        if user_data.trim().is_empty() {
            issues.push(Issue::new(at("userData"), "must not be empty"));
        } else if user_data.len() > MAX_USER_DATA {
            issues.push(Issue::new(
                at("userData"),
                format!(
                    "is {} bytes, over AWS's {MAX_USER_DATA}-byte limit",
                    user_data.len()
                ),
            ));
        }
    }
}

/// An AWS region name: lowercase words joined by '-', ending in a number (`eu-west-1`,
/// `us-gov-west-1`, `ap-southeast-2`).
fn is_aws_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let Some((number, words)) = parts.split_last() else {
        return false;
    };
    words.len() >= 2
        && words
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
        && !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
}

/// Why `id` is not an EC2 resource id `<prefix>-` and 8 or 17 lowercase hexadecimal
/// digits (the old and the new length), if it is not.
fn aws_id_problem(what: &str, prefix: &str, id: &str) -> Option<String> {
    let valid = id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            matches!(hex.len(), 8 | 17)
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        });
    (!valid).then(|| {
        format!(
            "invalid {what} id {id:?}: expected \"{prefix}-\" and 8 or 17 lowercase hexadecimal digits, such as {prefix}-0123456789abcdef0"
        )
    })
}

/// An EC2 instance type: a family and a size joined by '.' (`t3.small`, `m7g.2xlarge`,
/// `u-6tb1.metal`).
fn is_instance_type(instance_type: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    instance_type
        .split_once('.')
        .is_some_and(|(family, size)| part(family) && part(size))
}

/// Why `profile` is neither an IAM instance profile name nor its ARN, if it is not.
fn instance_profile_problem(profile: &str) -> Option<String> {
    let name_char = |c: char| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c);
    let is_name =
        |n: &str| !n.is_empty() && n.len() <= MAX_PROFILE_NAME && n.chars().all(name_char);
    let valid = match profile.strip_prefix("arn:") {
        // arn:PARTITION:iam::ACCOUNT:instance-profile/[PATH/]NAME
        Some(rest) => {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            match parts.as_slice() {
                [partition, "iam", "", account, resource] => {
                    partition.starts_with("aws")
                        && account.len() == 12
                        && account.chars().all(|c| c.is_ascii_digit())
                        && resource
                            .strip_prefix("instance-profile/")
                            .and_then(|path| path.rsplit('/').next())
                            .is_some_and(is_name)
                }
                _ => false,
            }
        }
        None => is_name(profile),
    };
    (!valid).then(|| {
        format!(
            "invalid instance profile {profile:?}: expected a name of 1 to {MAX_PROFILE_NAME} letters, digits and +=,.@_- or an ARN such as arn:aws:iam::123456789012:instance-profile/NAME"
        )
    })
}

/// Why `url` is not an http or https URL with a host, if it is not.
fn endpoint_url_problem(url: &str) -> Option<String> {
    let valid = url.parse::<Uri>().is_ok_and(|uri| {
        matches!(uri.scheme(), Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS)
            && uri.host().is_some_and(|h| !h.is_empty())
    });
    (!valid).then(|| {
        format!(
            "invalid endpoint URL {url:?}: expected an http or https URL such as http://127.0.0.1:5000"
        )
    })
}

fn kubernetes_settings(k: &KubernetesSettings, issues: &mut Vec<Issue>) {
    let at = |key: &str| FieldPath::of(&["spec", "kubernetes", key]);
    if let Some(problem) = dns_label_problem(&k.namespace) {
        issues.push(Issue::new(
            at("namespace"),
            format!("invalid namespace {:?}: {problem}", k.namespace),
        ));
    }
    if k.context.as_deref().is_some_and(|c| c.trim().is_empty()) {
        issues.push(Issue::new(at("context"), "must not be empty"));
    }
    for (key, value) in &k.labels {
        let here = map_entry(at("labels"), key);
        if let Some(problem) = own_key_problem(key, "label").or_else(|| {
            qualified_name_problem(key).map(|p| format!("invalid label key {key:?}: {p}"))
        }) {
            issues.push(Issue::new(here, problem));
        } else if let Some(problem) = label_value_problem(value) {
            issues.push(Issue::new(
                here,
                format!("invalid label value {value:?}: {problem}"),
            ));
        }
    }
    let mut annotation_bytes = 0;
    for (key, value) in &k.annotations {
        annotation_bytes += key.len() + value.len();
        if let Some(problem) = own_key_problem(key, "annotation").or_else(|| {
            qualified_name_problem(key).map(|p| format!("invalid annotation key {key:?}: {p}"))
        }) {
            issues.push(Issue::new(map_entry(at("annotations"), key), problem));
        }
    }
    if annotation_bytes > MAX_ANNOTATIONS_BYTES {
        issues.push(Issue::new(
            at("annotations"),
            format!(
                "annotations are {annotation_bytes} bytes in total, over Kubernetes' {MAX_ANNOTATIONS_BYTES}-byte limit"
            ),
        ));
    }
    for (key, value) in &k.node_selector {
        let here = map_entry(at("nodeSelector"), key);
        if let Some(problem) = qualified_name_problem(key) {
            issues.push(Issue::new(
                here,
                format!("invalid label key {key:?}: {problem}"),
            ));
        } else if let Some(problem) = label_value_problem(value) {
            issues.push(Issue::new(
                here,
                format!("invalid label value {value:?}: {problem}"),
            ));
        }
    }
    for (i, t) in k.tolerations.iter().enumerate() {
        let here = at("tolerations").index(i);
        if t.key.is_empty() {
            if t.operator != TolerationOperator::Exists {
                issues.push(Issue::new(
                    here.clone(),
                    "a toleration without `key` tolerates every taint and needs `operator: Exists`",
                ));
            }
        } else if let Some(problem) = qualified_name_problem(&t.key) {
            issues.push(Issue::new(
                here.clone().key("key"),
                format!("invalid taint key {:?}: {problem}", t.key),
            ));
        }
        if t.operator == TolerationOperator::Exists && !t.value.is_empty() {
            issues.push(Issue::new(
                here.key("value"),
                "must be empty with `operator: Exists`, which matches every value",
            ));
        } else if let Some(problem) = label_value_problem(&t.value) {
            issues.push(Issue::new(
                here.key("value"),
                format!("invalid taint value {:?}: {problem}", t.value),
            ));
        }
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, secret) in k.image_pull_secrets.iter().enumerate() {
        let here = at("imagePullSecrets").index(i);
        if let Some(problem) = dns_subdomain_problem(secret) {
            issues.push(Issue::new(
                here,
                format!("invalid secret name {secret:?}: {problem}"),
            ));
        } else if let Some(earlier) = seen.get(secret.as_str()) {
            issues.push(Issue::new(
                here,
                format!(
                    "secret {secret:?} is already listed at spec.kubernetes.imagePullSecrets[{earlier}]"
                ),
            ));
        } else {
            seen.insert(secret, i);
        }
    }
}

/// The path of `key` in the map at `map`; the map itself for the empty key, which
/// [`locate`](super::locate) could not tell from a missing one.
fn map_entry(map: FieldPath, key: &str) -> FieldPath {
    if key.is_empty() { map } else { map.key(key) }
}

/// A label or annotation key under skymirror's own prefix.
fn own_key_problem(key: &str, what: &str) -> Option<String> {
    let prefix = key.split_once('/')?.0;
    let own = prefix == OWN_LABEL_PREFIX || prefix.ends_with(&format!(".{OWN_LABEL_PREFIX}"));
    own.then(|| {
        format!("{what} key {key:?}: the `{OWN_LABEL_PREFIX}/` prefix is skymirror's own, for the objects it manages")
    })
}

/// Why `value` is not a DNS-1123 label (Kubernetes namespaces), if it is not.
fn dns_label_problem(value: &str) -> Option<String> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    (!valid).then(|| {
        format!("use 1 to {MAX_NAME} lowercase letters, digits and '-', starting and ending with a letter or digit")
    })
}

/// Why `value` is not a DNS-1123 subdomain (Kubernetes object names, label key
/// prefixes), if it is not.
fn dns_subdomain_problem(value: &str) -> Option<String> {
    let valid = !value.is_empty()
        && value.len() <= MAX_DNS_SUBDOMAIN
        && value.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    (!valid).then(|| {
        format!("use at most {MAX_DNS_SUBDOMAIN} lowercase letters, digits, '-' and '.', each '.'-separated part starting and ending with a letter or digit")
    })
}

/// The name part of a Kubernetes qualified name, or a label value when non-empty: at
/// most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit.
fn is_label_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Why `key` is not a Kubernetes qualified name (label and annotation keys, taint keys):
/// an optional DNS subdomain prefix and '/', then a name.
fn qualified_name_problem(key: &str) -> Option<String> {
    let rule = "expected an optional DNS subdomain prefix and '/', then 1 to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && dns_subdomain_problem(prefix).is_some()
    {
        return Some(format!(
            "the prefix {prefix:?} is not a DNS subdomain; {rule}"
        ));
    }
    (!is_label_name(name)).then(|| rule.to_owned())
}

/// Why `value` is not a Kubernetes label value (empty, or a label name), if it is not.
fn label_value_problem(value: &str) -> Option<String> {
    (!value.is_empty() && !is_label_name(value)).then(|| {
        "expected at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit".to_owned()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{
        DockerSettings, Document, Ec2Address, Expose, KubernetesSettings, ProviderSpec,
        ServiceType, TaintEffect, Toleration, TolerationOperator, parse_documents,
    };
    use super::*;

    /// A Provider document of `driver` whose settings block `block:` is on line 6 and
    /// whose block body (indented by four) starts on line 7.
    fn provider(driver: &str, block: &str, body: &str) -> String {
        format!(
            "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {{name: p}}\nspec:\n  driver: {driver}\n  {block}:\n{body}"
        )
    }

    /// The valid required ec2 fields on lines 7-10, with `key` set to `value` instead
    /// (or added on line 11 when it is not one of them).
    fn ec2(key: &str, value: &str) -> String {
        let mut lines = vec![
            ("region", "eu-west-1"),
            ("ami", "ami-12345678"),
            ("instanceType", "t3.small"),
            ("subnetId", "subnet-12345678"),
        ];
        match lines.iter_mut().find(|(k, _)| *k == key) {
            Some(line) => line.1 = value,
            None => lines.push((key, value)),
        }
        let body: String = lines
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        provider("ec2", "ec2", &body)
    }

    fn errors(content: &str) -> Vec<String> {
        match parse_documents("t.yaml", content) {
            Ok(docs) => panic!("expected errors, parsed {docs:?}"),
            Err(errs) => errs.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn spec(content: &str) -> ProviderSpec {
        let docs = parse_documents("t.yaml", content).unwrap();
        match &docs[0].document {
            Document::Provider(p) => p.spec.clone(),
            other => panic!("not a provider: {other:?}"),
        }
    }

    /// Runs every case, then fails listing those whose errors differ, so one wrong
    /// case does not hide the others.
    fn check(cases: &[(String, &[&str])]) {
        let mut wrong = Vec::new();
        for (content, expected) in cases {
            let got = errors(content);
            let expected: Vec<String> = expected
                .iter()
                .map(|e| format!("t.yaml: document 1, {e}"))
                .collect();
            if got != expected {
                wrong.push(format!(
                    "{content}\n  expected: {expected:#?}\n  got:      {got:#?}"
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    #[test]
    fn settings_must_match_the_driver() {
        check(&[
            (
                ec2("region", "eu-west-1").replace("driver: ec2", "driver: docker"),
                &[
                    "line 7, column 5: spec.ec2: ec2 settings do not apply to this provider: its driver is docker (its settings go in spec.docker)",
                ],
            ),
            (
                provider("process", "docker", "    network: apps\n"),
                &[
                    "line 7, column 5: spec.docker: docker settings do not apply to this provider: its driver is process (the process driver takes no settings)",
                ],
            ),
            (
                provider("ec2", "kubernetes", "    namespace: web\n"),
                &[
                    "line 7, column 5: spec.kubernetes: kubernetes settings do not apply to this provider: its driver is ec2 (its settings go in spec.ec2)",
                ],
            ),
            (
                format!(
                    "{}  docker: {{network: apps}}\n",
                    provider("kubernetes", "kubernetes", "    namespace: web\n")
                ),
                &[
                    "line 8, column 11: spec.docker: docker settings do not apply to this provider: its driver is kubernetes (its settings go in spec.kubernetes)",
                ],
            ),
        ]);
    }

    #[test]
    fn docker_rules() {
        let docker = |body: &str| provider("docker", "docker", body);
        check(&[
            (
                docker("    network: \"\"\n"),
                &["line 7, column 14: spec.docker.network: must not be empty"],
            ),
            (
                docker("    network: host\n"),
                &[
                    "line 7, column 14: spec.docker.network: Docker network \"host\" gives containers no address of their own; name a bridge or overlay network",
                ],
            ),
            (
                docker("    network: none\n"),
                &[
                    "line 7, column 14: spec.docker.network: Docker network \"none\" gives containers no address of their own; name a bridge or overlay network",
                ],
            ),
            (
                docker("    network: my net\n"),
                &[
                    "line 7, column 14: spec.docker.network: invalid Docker network name \"my net\": contains ' '",
                ],
            ),
            (
                docker("    bindHost: localhost\n"),
                &[
                    "line 7, column 15: spec.docker.bindHost: invalid bind address \"localhost\": expected an IP address such as 127.0.0.1 or ::1",
                ],
            ),
            (
                docker("    network: apps\n    bindHost: 10.0.0.1\n"),
                &[
                    "line 8, column 15: spec.docker.bindHost: has no effect with `network`: replicas on a network publish no ports",
                ],
            ),
            (
                docker("    bindHost: 10.0.0.1\n    password: x\n"),
                &[
                    "line 8, column 5: spec.docker.password: unknown field `password`, expected `network` or `bindHost`",
                ],
            ),
        ]);
    }

    #[test]
    fn ec2_rules() {
        let id = "expected \"{p}-\" and 8 or 17 lowercase hexadecimal digits, such as {p}-0123456789abcdef0";
        let id = |p: &str| id.replace("{p}", p);
        let region = |v: &str| {
            format!(
                "line 7, column 13: spec.ec2.region: invalid region \"{v}\": expected an AWS region such as eu-west-1"
            )
        };
        let ami = |v: &str| {
            format!(
                "line 8, column 10: spec.ec2.ami: invalid AMI id \"{v}\": {}",
                id("ami")
            )
        };
        let instance_type = |v: &str| {
            format!(
                "line 9, column 19: spec.ec2.instanceType: invalid instance type \"{v}\": expected a family and a size such as t3.small"
            )
        };
        let profile = |v: &str| {
            format!(
                "line 11, column 25: spec.ec2.iamInstanceProfile: invalid instance profile \"{v}\": expected a name of 1 to 128 letters, digits and +=,.@_- or an ARN such as arn:aws:iam::123456789012:instance-profile/NAME"
            )
        };
        let url = |v: &str| {
            format!(
                "line 11, column 18: spec.ec2.endpointUrl: invalid endpoint URL \"{v}\": expected an http or https URL such as http://127.0.0.1:5000"
            )
        };
        let key_name = |v: &str| {
            format!(
                "line 11, column 14: spec.ec2.keyName: invalid key pair name \"{v}\": use 1 to 255 ASCII characters, without leading or trailing spaces"
            )
        };
        let long_key = "k".repeat(129);
        let long_value = "v".repeat(257);
        let big = "x".repeat(MAX_USER_DATA + 1);
        check(&[
            (ec2("region", "EU-West-1"), &[&region("EU-West-1")]),
            (ec2("region", "eu-west"), &[&region("eu-west")]),
            (ec2("region", "euwest1"), &[&region("euwest1")]),
            (ec2("region", "eu--1"), &[&region("eu--1")]),
            (ec2("ami", "ami-123"), &[&ami("ami-123")]),
            (
                ec2("ami", "ami-0123456789ABCDEF0"),
                &[&ami("ami-0123456789ABCDEF0")],
            ),
            (ec2("ami", "ami-1234567g"), &[&ami("ami-1234567g")]),
            (ec2("ami", "img-12345678"), &[&ami("img-12345678")]),
            (ec2("instanceType", "t3"), &[&instance_type("t3")]),
            (
                ec2("instanceType", "T3.small"),
                &[&instance_type("T3.small")],
            ),
            (ec2("instanceType", ".small"), &[&instance_type(".small")]),
            (
                ec2("subnetId", "subnet-zz"),
                &[&format!(
                    "line 10, column 15: spec.ec2.subnetId: invalid subnet id \"subnet-zz\": {}",
                    id("subnet")
                )],
            ),
            (
                ec2("securityGroupIds", "[sg-12345678, sg-1, sg-12345678]"),
                &[
                    &format!(
                        "line 11, column 37: spec.ec2.securityGroupIds[1]: invalid security group id \"sg-1\": {}",
                        id("sg")
                    ),
                    "line 11, column 43: spec.ec2.securityGroupIds[2]: security group \"sg-12345678\" is already listed at spec.ec2.securityGroupIds[0]",
                ],
            ),
            (
                ec2("keyName", "\"\""),
                &["line 11, column 14: spec.ec2.keyName: must not be empty"],
            ),
            (ec2("keyName", "\" ops\""), &[&key_name(" ops")]),
            (ec2("keyName", "clé"), &[&key_name("clé")]),
            (
                ec2("iamInstanceProfile", "web profile"),
                &[&profile("web profile")],
            ),
            (
                ec2(
                    "iamInstanceProfile",
                    "arn:aws:iam::123:instance-profile/web",
                ),
                &[&profile("arn:aws:iam::123:instance-profile/web")],
            ),
            (
                ec2("iamInstanceProfile", "arn:aws:iam::123456789012:role/web"),
                &[&profile("arn:aws:iam::123456789012:role/web")],
            ),
            (
                ec2("tags", "{\"aws:team\": web}"),
                &[
                    "line 11, column 24: spec.ec2.tags.aws:team: tag key \"aws:team\" starts with `aws:`, which AWS reserves for its own tags",
                ],
            ),
            (
                ec2("tags", "{AWS:team: web}"),
                &[
                    "line 11, column 22: spec.ec2.tags.AWS:team: tag key \"AWS:team\" starts with `aws:`, which AWS reserves for its own tags",
                ],
            ),
            (
                ec2("tags", "{skymirror-app: web}"),
                &[
                    "line 11, column 27: spec.ec2.tags.skymirror-app: tag key \"skymirror-app\" starts with `skymirror`, which skymirror reserves for the tags it puts on every instance",
                ],
            ),
            (
                ec2("tags", "{SkyMirror:owner: me}"),
                &[
                    "line 11, column 29: spec.ec2.tags.SkyMirror:owner: tag key \"SkyMirror:owner\" starts with `skymirror`, which skymirror reserves for the tags it puts on every instance",
                ],
            ),
            (
                ec2("tags", "{\"\": web}"),
                &["line 11, column 11: spec.ec2.tags: tag keys must not be empty"],
            ),
            (
                ec2("tags", &format!("{{{long_key}: v}}")),
                &[&format!(
                    "line 11, column 143: spec.ec2.tags.{long_key}: tag key is 129 characters long, at most 128 are allowed"
                )],
            ),
            (
                ec2("tags", &format!("{{team: {long_value}}}")),
                &[
                    "line 11, column 18: spec.ec2.tags.team: tag value is 257 characters long, at most 256 are allowed",
                ],
            ),
            (
                ec2("address", "elastic"),
                &[
                    "line 11, column 14: spec.ec2.address: unknown variant `elastic`, expected `private` or `public`",
                ],
            ),
            (
                ec2("endpointUrl", "localhost:5000"),
                &[&url("localhost:5000")],
            ),
            (
                ec2("endpointUrl", "ftp://127.0.0.1"),
                &[&url("ftp://127.0.0.1")],
            ),
            (ec2("endpointUrl", "\"http://\""), &[&url("http://")]),
            (
                ec2("userData", "\"\""),
                &["line 11, column 15: spec.ec2.userData: must not be empty"],
            ),
            (
                ec2("userData", &big),
                &[
                    "line 11, column 15: spec.ec2.userData: is 16385 bytes, over AWS's 16384-byte limit",
                ],
            ),
            (
                provider(
                    "ec2",
                    "ec2",
                    "    ami: ami-12345678\n    instanceType: t3.small\n    subnetId: subnet-12345678\n",
                ),
                &["line 7, column 5: spec.ec2: missing field `region`"],
            ),
            (
                ec2("secretAccessKey", "x"),
                &[
                    "line 11, column 5: spec.ec2.secretAccessKey: unknown field `secretAccessKey`, expected one of `region`, `ami`, `instanceType`, `subnetId`, `securityGroupIds`, `keyName`, `iamInstanceProfile`, `tags`, `address`, `endpointUrl`, `userData`",
                ],
            ),
        ]);
    }

    #[test]
    fn kubernetes_rules() {
        let k8s = |body: &str| provider("kubernetes", "kubernetes", body);
        let namespace = |v: &str| {
            format!(
                "line 7, column 16: spec.kubernetes.namespace: invalid namespace \"{v}\": use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            )
        };
        let key_rule = "expected an optional DNS subdomain prefix and '/', then 1 to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
        let value_rule = "expected at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
        let own = |what: &str, key: &str, column: usize| {
            format!(
                "line 7, column {column}: spec.kubernetes.{what}s.{key}: {what} key \"{key}\": the `skymirror.dev/` prefix is skymirror's own, for the objects it manages"
            )
        };
        let long_namespace = "n".repeat(64);
        let big = "x".repeat(MAX_ANNOTATIONS_BYTES);
        check(&[
            (k8s("    namespace: Web\n"), &[&namespace("Web")]),
            (k8s("    namespace: -web\n"), &[&namespace("-web")]),
            (k8s("    namespace: web.prod\n"), &[&namespace("web.prod")]),
            (
                k8s(&format!("    namespace: {long_namespace}\n")),
                &[&namespace(&long_namespace)],
            ),
            (
                k8s("    context: \"\"\n"),
                &["line 7, column 14: spec.kubernetes.context: must not be empty"],
            ),
            (
                k8s("    labels: {\"team web\": x}\n"),
                &[&format!(
                    "line 7, column 26: spec.kubernetes.labels.team web: invalid label key \"team web\": {key_rule}"
                )],
            ),
            (
                k8s("    labels: {Example.com/team: x}\n"),
                &[&format!(
                    "line 7, column 32: spec.kubernetes.labels.Example.com/team: invalid label key \"Example.com/team\": the prefix \"Example.com\" is not a DNS subdomain; {key_rule}"
                )],
            ),
            (
                k8s("    labels: {a/b/c: x}\n"),
                &[&format!(
                    "line 7, column 21: spec.kubernetes.labels.a/b/c: invalid label key \"a/b/c\": {key_rule}"
                )],
            ),
            (
                k8s("    labels: {team: web!}\n"),
                &[&format!(
                    "line 7, column 20: spec.kubernetes.labels.team: invalid label value \"web!\": {value_rule}"
                )],
            ),
            (
                k8s("    labels: {skymirror.dev/app: x}\n"),
                &[&own("label", "skymirror.dev/app", 33)],
            ),
            (
                k8s("    annotations: {apps.skymirror.dev/owner: x}\n"),
                &[&own("annotation", "apps.skymirror.dev/owner", 45)],
            ),
            (
                k8s("    annotations: {\"-note\": x}\n"),
                &[&format!(
                    "line 7, column 28: spec.kubernetes.annotations.-note: invalid annotation key \"-note\": {key_rule}"
                )],
            ),
            (
                k8s(&format!("    annotations: {{note: {big}}}\n")),
                &[
                    "line 7, column 18: spec.kubernetes.annotations: annotations are 262148 bytes in total, over Kubernetes' 262144-byte limit",
                ],
            ),
            (
                k8s("    nodeSelector: {pool_: apps}\n"),
                &[&format!(
                    "line 7, column 27: spec.kubernetes.nodeSelector.pool_: invalid label key \"pool_\": {key_rule}"
                )],
            ),
            (
                k8s("    nodeSelector: {pool: _apps}\n"),
                &[&format!(
                    "line 7, column 26: spec.kubernetes.nodeSelector.pool: invalid label value \"_apps\": {value_rule}"
                )],
            ),
            (
                k8s(
                    "    tolerations:\n      - {value: web}\n      - {key: dedicated, operator: Exists, value: web}\n      - {key: \"bad key\", value: \"bad value\"}\n",
                ),
                &[
                    "line 8, column 9: spec.kubernetes.tolerations[0]: a toleration without `key` tolerates every taint and needs `operator: Exists`",
                    "line 9, column 51: spec.kubernetes.tolerations[1].value: must be empty with `operator: Exists`, which matches every value",
                    &format!(
                        "line 10, column 15: spec.kubernetes.tolerations[2].key: invalid taint key \"bad key\": {key_rule}"
                    ),
                    &format!(
                        "line 10, column 33: spec.kubernetes.tolerations[2].value: invalid taint value \"bad value\": {value_rule}"
                    ),
                ],
            ),
            (
                k8s("    tolerations: [{key: a, operator: In}]\n"),
                &[
                    "line 7, column 38: spec.kubernetes.tolerations[0].operator: unknown variant `In`, expected `Equal` or `Exists`",
                ],
            ),
            (
                k8s("    tolerations: [{key: a, effect: NoRun}]\n"),
                &[
                    "line 7, column 36: spec.kubernetes.tolerations[0].effect: unknown variant `NoRun`, expected one of `NoSchedule`, `PreferNoSchedule`, `NoExecute`",
                ],
            ),
            (
                k8s("    imagePullSecrets: [registry, Registry, registry]\n"),
                &[
                    "line 7, column 34: spec.kubernetes.imagePullSecrets[1]: invalid secret name \"Registry\": use at most 253 lowercase letters, digits, '-' and '.', each '.'-separated part starting and ending with a letter or digit",
                    "line 7, column 44: spec.kubernetes.imagePullSecrets[2]: secret \"registry\" is already listed at spec.kubernetes.imagePullSecrets[0]",
                ],
            ),
            (
                k8s("    serviceType: NodePort\n"),
                &[
                    "line 7, column 18: spec.kubernetes.serviceType: only used with `expose: service`; pods are reached at their own addresses",
                ],
            ),
            (
                k8s("    expose: pods\n    serviceType: ClusterIP\n"),
                &[
                    "line 8, column 18: spec.kubernetes.serviceType: only used with `expose: service`; pods are reached at their own addresses",
                ],
            ),
            (
                k8s("    expose: ingress\n"),
                &[
                    "line 7, column 13: spec.kubernetes.expose: unknown variant `ingress`, expected `pods` or `service`",
                ],
            ),
            (
                k8s("    expose: service\n    serviceType: ExternalName\n"),
                &[
                    "line 8, column 18: spec.kubernetes.serviceType: unknown variant `ExternalName`, expected one of `ClusterIP`, `NodePort`, `LoadBalancer`",
                ],
            ),
            (
                k8s("    token: abc\n"),
                &[
                    "line 7, column 5: spec.kubernetes.token: unknown field `token`, expected one of `namespace`, `context`, `labels`, `annotations`, `nodeSelector`, `tolerations`, `imagePullSecrets`, `expose`, `serviceType`",
                ],
            ),
        ]);
    }

    #[test]
    fn valid_settings_and_defaults() {
        let docker = spec(&provider("docker", "docker", "    bindHost: \"::1\"\n"));
        assert_eq!(
            docker.docker,
            Some(DockerSettings {
                network: None,
                bind_host: Some("::1".into()),
            })
        );
        let e = spec(&ec2("securityGroupIds", "[sg-0123456789abcdef0]"))
            .ec2
            .unwrap();
        assert_eq!(e.address, Ec2Address::Private);
        assert_eq!((e.key_name, e.endpoint_url), (None, None));
        for (key, value) in [
            ("region", "us-gov-west-1"),
            ("ami", "ami-0123456789abcdef0"),
            ("instanceType", "u-6tb1.metal"),
            (
                "iamInstanceProfile",
                "arn:aws:iam::123456789012:instance-profile/apps/web",
            ),
            ("iamInstanceProfile", "web+apps@acme"),
            ("endpointUrl", "http://127.0.0.1:5000"),
            ("endpointUrl", "https://ec2.eu-west-1.amazonaws.com/"),
            ("tags", "{Name: web, aws-team: x}"),
            ("keyName", "ops key"),
            ("address", "public"),
        ] {
            spec(&ec2(key, value));
        }

        let k = spec(&provider("kubernetes", "kubernetes", "    context: prod\n"))
            .kubernetes
            .unwrap();
        assert_eq!(
            k,
            KubernetesSettings {
                context: Some("prod".into()),
                ..KubernetesSettings::default()
            }
        );
        assert_eq!((k.namespace.as_str(), k.expose), ("default", Expose::Pods));
        let k = spec(&provider(
            "kubernetes",
            "kubernetes",
            "    expose: service\n    labels: {example.com/team: web, tier: \"\"}\n    tolerations: [{operator: Exists}, {key: k, value: v, effect: NoExecute}]\n",
        ))
        .kubernetes
        .unwrap();
        assert_eq!(k.expose, Expose::Service(ServiceType::ClusterIp));
        assert_eq!(
            k.tolerations,
            [
                Toleration {
                    operator: TolerationOperator::Exists,
                    ..Toleration::default()
                },
                Toleration {
                    key: "k".into(),
                    operator: TolerationOperator::Equal,
                    value: "v".into(),
                    effect: Some(TaintEffect::NoExecute),
                },
            ]
        );
        let k = spec(&provider(
            "kubernetes",
            "kubernetes",
            "    expose: service\n    serviceType: NodePort\n",
        ))
        .kubernetes
        .unwrap();
        assert_eq!(k.expose, Expose::Service(ServiceType::NodePort));
        // A provider of a cloud driver needs no block: its agent's flags decide.
        assert_eq!(
            spec(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {name: p}\nspec: {driver: kubernetes}\n"
            ),
            ProviderSpec::new(DriverKind::Kubernetes)
        );
    }

    #[test]
    fn the_cloud_providers_example_is_valid() {
        let text = include_str!("../../../deploy/examples/cloud-providers.yaml");
        let docs = parse_documents("cloud-providers.yaml", text).unwrap();
        let drivers: Vec<_> = docs
            .iter()
            .map(|d| match &d.document {
                Document::Provider(p) => p.spec.driver,
                Document::App(_) => panic!("not a provider"),
            })
            .collect();
        assert_eq!(
            drivers,
            [DriverKind::Ec2, DriverKind::Kubernetes, DriverKind::Docker]
        );
    }
}
