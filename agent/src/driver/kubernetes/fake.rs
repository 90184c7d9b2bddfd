//! An in-memory Kubernetes API server for the driver's tests, served by
//! hyper over a real socket on 127.0.0.1, so every request goes through
//! kube-rs's whole client (kubeconfig, connection pool, serialization,
//! watch streams) as it would to a cluster.
//!
//! It keeps pods and services as JSON with resource versions and a history
//! of changes, and answers what the driver uses: get, list (label and field
//! selectors), watch (from a resource version, with a timeout), server-side
//! apply (field managers, conflicts, preconditions), delete (grace,
//! preconditions) and pod logs (tail, previous, follow). It plays the
//! scheduler and the kubelet of one node: pods whose node selector the node
//! does not match stay `Unschedulable`; images it is told are missing end
//! in `ImagePullBackOff`; a container whose last argument ends in `exit N`
//! crash-loops with code N; every other container runs and writes `hello
//! from <replica>`. Tests can also refuse verbs (403), inject failures (409,
//! 429, ...), take the server down (connections dropped, as behind a load
//! balancer whose API server died) and edit pods as the kubelet would.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};

type Body = BoxBody<Bytes, Infallible>;

/// The kinds of object the fake keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    /// Pods.
    Pods,
    /// Services.
    Services,
}

impl Kind {
    fn resource(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Services => "services",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Services => "Service",
        }
    }
}

/// How the fake's one node schedules and runs pods.
#[derive(Debug, Clone)]
pub(super) struct Kubelet {
    /// The node's labels: a pod whose node selector asks for others cannot
    /// be scheduled.
    pub(super) node_labels: BTreeMap<String, String>,
    /// Images no registry has.
    pub(super) missing_images: BTreeSet<String>,
    /// From a pod's creation to its running container.
    pub(super) start_delay: Duration,
    /// From a deletion to the pod's removal.
    pub(super) stop_delay: Duration,
    /// The node stopped answering: deleted pods stay terminating.
    pub(super) node_unreachable: bool,
    /// How long a crash-looping container runs before it exits.
    pub(super) crash_after: Duration,
    /// How long the kubelet waits before running a crashed container again.
    pub(super) restart_after: Duration,
}

impl Default for Kubelet {
    fn default() -> Self {
        Kubelet {
            node_labels: BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]),
            missing_images: BTreeSet::new(),
            start_delay: Duration::from_millis(30),
            stop_delay: Duration::from_millis(30),
            node_unreachable: false,
            crash_after: Duration::from_millis(30),
            restart_after: Duration::from_millis(120),
        }
    }
}

/// A failure to answer instead of the real thing.
#[derive(Debug, Clone)]
struct Fault {
    verb: String,
    resource: String,
    code: u16,
    remaining: u32,
}

/// One change, for watches.
#[derive(Debug, Clone)]
pub(super) struct Change {
    /// The resource version it made.
    pub(super) revision: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub(super) type_: &'static str,
    /// The kind of the object.
    pub(super) kind: Kind,
    /// Its namespace.
    pub(super) namespace: String,
    /// The object after the change (before it, for `DELETED`).
    pub(super) object: Value,
}

/// Output of one pod's container.
#[derive(Debug, Default, Clone)]
struct PodLogs {
    current: String,
    previous: Option<String>,
}

#[derive(Debug)]
struct World {
    revision: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    requests: Vec<String>,
    faults: Vec<Fault>,
    forbidden: BTreeSet<(String, String)>,
    namespaces: BTreeSet<String>,
    kubelet: Kubelet,
    logs: BTreeMap<(String, String), PodLogs>,
    /// Addresses handed out so far.
    addresses: u32,
    /// Connections accepted so far, while down too.
    connections: u64,
    /// Every verb on every resource asked for, as RBAC names them.
    used: BTreeSet<(String, String)>,
    down: bool,
}

struct Shared {
    world: Mutex<World>,
    /// The newest resource version, for watches and followed logs.
    changed: watch::Sender<u64>,
    /// Cancelled when the server goes down: every open connection drops.
    up: Mutex<CancellationToken>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the world and tells watchers about what it changed.
    fn change<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        let (out, revision) = {
            let mut world = self.world();
            let out = f(&mut world);
            (out, world.revision)
        };
        self.changed.send_replace(revision);
        out
    }
}

/// A timestamp of the fake's own clock: one second per change, so times
/// of later changes are later.
fn stamp(revision: u64) -> String {
    let second = 1_767_225_600 + i64::try_from(revision).unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl World {
    /// Records a change of an object (`None`: removed).
    fn commit(&mut self, kind: Kind, ns: &str, name: &str, object: Option<Value>) {
        self.revision += 1;
        let key = (kind, ns.to_string(), name.to_string());
        let (type_, object) = match object {
            Some(mut o) => {
                o["metadata"]["resourceVersion"] = json!(self.revision.to_string());
                let type_ = if self.objects.contains_key(&key) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                self.objects.insert(key, o.clone());
                (type_, o)
            }
            None => match self.objects.remove(&key) {
                Some(o) => ("DELETED", o),
                None => return,
            },
        };
        if kind == Kind::Pods && type_ == "DELETED" {
            self.logs.remove(&(ns.to_string(), name.to_string()));
        }
        self.history.push(Change {
            revision: self.revision,
            type_,
            kind,
            namespace: ns.to_string(),
            object,
        });
    }

    fn now(&self) -> String {
        stamp(self.revision + 1)
    }

    fn next_address(&mut self, block: u8) -> String {
        self.addresses += 1;
        let [_, _, hi, lo] = self.addresses.to_be_bytes();
        format!("127.{block}.{hi}.{}", lo.max(1))
    }

    /// The pod `name` if it still has `uid`.
    fn pod_mut(&mut self, ns: &str, name: &str, uid: &str) -> Option<Value> {
        self.objects
            .get(&(Kind::Pods, ns.to_string(), name.to_string()))
            .filter(|p| p["metadata"]["uid"] == uid && p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
    }
}

/// The fake API server; it stops when dropped.
pub(super) struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi").field("addr", &self.addr).finish()
    }
}

fn status_body(code: u16, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(code, &status_body(code, reason, message, json!({})))
}

fn streaming(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let mut response = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Whether `labels` match an equality-based selector `k=v,k2=v2`.
fn selected(object: &Value, labels: Option<&String>, fields: Option<&String>) -> bool {
    let label_ok = labels.is_none_or(|selector| {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            object["metadata"]["labels"][k] == v
        })
    });
    let field_ok = fields.is_none_or(|selector| {
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some(("metadata.name", v)) => object["metadata"]["name"] == v,
                Some(("metadata.namespace", v)) => object["metadata"]["namespace"] == v,
                _ => false,
            })
    });
    label_ok && field_ok
}

/// Whether every field of `part` is in `whole` with the same value.
fn contains(whole: &Value, part: &Value) -> bool {
    match (whole, part) {
        (Value::Object(w), Value::Object(p)) => p
            .iter()
            .all(|(k, v)| w.get(k).is_some_and(|wv| contains(wv, v))),
        (Value::Array(w), Value::Array(p)) => {
            w.len() == p.len() && w.iter().zip(p).all(|(wv, pv)| contains(wv, pv))
        }
        (w, p) => w == p,
    }
}

/// Whether the container's arguments end in `exit N`: its exit code.
fn crash_code(pod: &Value) -> Option<i32> {
    let container = &pod["spec"]["containers"][0];
    let last = container["args"]
        .as_array()
        .and_then(|a| a.last())
        .or_else(|| container["command"].as_array().and_then(|c| c.last()))?
        .as_str()?;
    let (_, code) = last.trim().trim_end_matches(';').rsplit_once("exit ")?;
    code.trim().parse().ok()
}

/// What a running container writes.
fn greeting(pod: &Value) -> String {
    let replica = pod["spec"]["containers"][0]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SKYMIRROR_REPLICA"))
        .and_then(|e| e["value"].as_str())
        .unwrap_or("nobody")
        .to_string();
    format!("hello from {replica}\n")
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 with the `default` namespace.
    pub(super) async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API");
        let addr = listener.local_addr().expect("its address");
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                revision: 1,
                objects: BTreeMap::new(),
                history: Vec::new(),
                requests: Vec::new(),
                faults: Vec::new(),
                forbidden: BTreeSet::new(),
                namespaces: BTreeSet::from(["default".to_string()]),
                kubelet: Kubelet::default(),
                logs: BTreeMap::new(),
                addresses: 9,
                connections: 0,
                used: BTreeSet::new(),
                down: false,
            }),
            changed,
            up: Mutex::new(CancellationToken::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        FakeApi {
            addr,
            shared,
            _stop: stop.drop_guard(),
        }
    }

    /// The server's URL.
    pub(super) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig in `dir` whose contexts reach the given servers,
    /// each with its namespace; the first is the current one.
    pub(super) fn kubeconfig(dir: &Path, contexts: &[(&FakeApi, &str, &str)]) -> PathBuf {
        let mut clusters = String::new();
        let mut named = String::new();
        for (api, context, namespace) in contexts {
            clusters.push_str(&format!(
                "- name: {context}\n  cluster:\n    server: {}\n",
                api.url()
            ));
            named.push_str(&format!(
                "- name: {context}\n  context:\n    cluster: {context}\n    user: agent\n    namespace: {namespace}\n"
            ));
        }
        let current = contexts.first().map_or("", |(_, c, _)| c);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n{clusters}users:\n- name: agent\n  user:\n    token: fake-token\ncontexts:\n{named}current-context: {current}\n"
        );
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// Changes how the node schedules and runs pods.
    pub(super) fn kubelet(&self, f: impl FnOnce(&mut Kubelet)) {
        f(&mut self.shared.world().kubelet);
    }

    /// Creates a namespace.
    pub(super) fn add_namespace(&self, ns: &str) {
        self.shared.world().namespaces.insert(ns.to_string());
    }

    /// Refuses `verb` on `resource` (403) from now on.
    pub(super) fn forbid(&self, verb: &str, resource: &str) {
        self.shared
            .world()
            .forbidden
            .insert((verb.to_string(), resource.to_string()));
    }

    /// Allows everything again.
    pub(super) fn allow_all(&self) {
        self.shared.world().forbidden.clear();
    }

    /// Answers the next `times` requests of `verb` on `resource` with `code`.
    pub(super) fn fail_next(&self, verb: &str, resource: &str, code: u16, times: u32) {
        self.shared.world().faults.push(Fault {
            verb: verb.to_string(),
            resource: resource.to_string(),
            code,
            remaining: times,
        });
    }

    /// Takes the server down (every connection drops, new ones are closed
    /// at once) or brings it back.
    pub(super) fn set_down(&self, down: bool) {
        self.shared.world().down = down;
        let mut up = self
            .shared
            .up
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down {
            up.cancel();
        } else if up.is_cancelled() {
            *up = CancellationToken::new();
        }
    }

    /// Every request so far: `METHOD path?query`.
    pub(super) fn requests(&self) -> Vec<String> {
        self.shared.world().requests.clone()
    }

    /// Connections accepted so far (also while down).
    pub(super) fn connections(&self) -> u64 {
        self.shared.world().connections
    }

    /// Every verb on every resource asked for so far (`create` when an
    /// apply created the object), as RBAC names them.
    pub(super) fn used(&self) -> BTreeSet<(String, String)> {
        self.shared.world().used.clone()
    }

    /// Forgets the requests so far.
    pub(super) fn clear_requests(&self) {
        self.shared.world().requests.clear();
    }

    /// Every change so far.
    pub(super) fn history(&self) -> Vec<Change> {
        self.shared.world().history.clone()
    }

    /// Stores `object` as if `manager` had applied it (a pod is not run).
    pub(super) fn insert(&self, kind: Kind, ns: &str, mut object: Value, manager: &str) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.shared.change(|w| {
            let uid = format!("foreign-{}", w.revision);
            let now = w.now();
            let meta = &mut object["metadata"];
            meta["uid"] = json!(uid);
            meta["namespace"] = json!(ns);
            meta["creationTimestamp"] = json!(now);
            meta["managedFields"] =
                json!([{"manager": manager, "operation": "Update", "apiVersion": "v1"}]);
            object["apiVersion"] = json!("v1");
            object["kind"] = json!(kind.kind());
            if kind == Kind::Services && object["spec"]["clusterIP"].is_null() {
                object["spec"]["clusterIP"] = json!(w.next_address(1));
            }
            w.commit(kind, ns, &name, Some(object));
        });
    }

    /// The object, as stored.
    pub(super) fn object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .world()
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of `kind` in `ns`.
    pub(super) fn objects(&self, kind: Kind, ns: &str) -> Vec<Value> {
        self.shared
            .world()
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && n == ns)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Changes a pod as the kubelet or a controller would (its status).
    pub(super) fn edit_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        self.shared.change(|w| {
            let key = (Kind::Pods, ns.to_string(), name.to_string());
            let Some(mut pod) = w.objects.get(&key).cloned() else {
                panic!("no pod {ns}/{name} to edit");
            };
            f(&mut pod);
            w.commit(Kind::Pods, ns, name, Some(pod));
        });
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        shared.world().connections += 1;
        if shared.world().down {
            drop(stream);
            continue;
        }
        let up = shared
            .up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = up.cancelled() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return failure(400, "BadRequest", "unreadable body"),
    };
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    shared.world().requests.push(format!("{method} {uri}"));
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    if uri.path() == "/version" {
        return respond(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "",
                "platform": "linux/amd64",
            }),
        );
    }
    let (ns, kind, name, sub) = match segments.as_slice() {
        ["api", "v1", "namespaces", ns, res, rest @ ..] => {
            let kind = match *res {
                "pods" => Kind::Pods,
                "services" => Kind::Services,
                other => return failure(404, "NotFound", &format!("the fake has no {other}")),
            };
            match rest {
                [] => (ns.to_string(), kind, None, None),
                [name] => (ns.to_string(), kind, Some(name.to_string()), None),
                [name, sub] => (
                    ns.to_string(),
                    kind,
                    Some(name.to_string()),
                    Some(sub.to_string()),
                ),
                _ => return failure(404, "NotFound", "no such path"),
            }
        }
        _ => {
            return failure(
                404,
                "NotFound",
                &format!("the fake does not serve {}", uri.path()),
            );
        }
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let (verb, resource) = match (&method, &name, &sub) {
        (&Method::GET, None, _) if watching => ("watch", kind.resource().to_string()),
        (&Method::GET, None, _) => ("list", kind.resource().to_string()),
        (&Method::GET, Some(_), Some(sub)) => ("get", format!("{}/{sub}", kind.resource())),
        (&Method::GET, Some(_), None) => ("get", kind.resource().to_string()),
        (&Method::PATCH, Some(_), None) => ("patch", kind.resource().to_string()),
        (&Method::DELETE, Some(_), None) => ("delete", kind.resource().to_string()),
        _ => return failure(405, "MethodNotAllowed", "not served by the fake"),
    };
    if let Some(refusal) = refuse(&shared, verb, &resource, &ns, name.as_deref()) {
        return refusal;
    }
    match (verb, name) {
        ("watch", _) => watch_objects(&shared, kind, &ns, &query),
        ("list", _) => list(&shared, kind, &ns, &query),
        ("get", Some(name)) if sub.as_deref() == Some("log") => logs(&shared, &ns, &name, &query),
        ("get", Some(name)) => match shared
            .world()
            .objects
            .get(&(kind, ns.clone(), name.clone()))
        {
            Some(o) => respond(200, o),
            None => not_found(kind, &name),
        },
        ("patch", Some(name)) => apply(&shared, kind, &ns, &name, &query, &content_type, &body),
        ("delete", Some(name)) => delete(&shared, kind, &ns, &name, &body),
        _ => failure(405, "MethodNotAllowed", "not served by the fake"),
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let resource = kind.resource();
    respond(
        404,
        &status_body(
            404,
            "NotFound",
            &format!("{resource} \"{name}\" not found"),
            json!({"name": name, "kind": resource}),
        ),
    )
}

fn forbidden(verb: &str, resource: &str, ns: &str, name: Option<&str>) -> Response<Body> {
    let what = match name {
        Some(name) => format!("{resource} \"{name}\""),
        None => resource.to_string(),
    };
    failure(
        403,
        "Forbidden",
        &format!(
            "{what} is forbidden: User \"system:serviceaccount:skymirror:skymirror-agent\" cannot \
             {verb} resource \"{resource}\" in API group \"\" in the namespace \"{ns}\""
        ),
    )
}

/// A 403 or an injected failure for the request, if there is one.
fn refuse(
    shared: &Shared,
    verb: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
) -> Option<Response<Body>> {
    let mut world = shared.world();
    world.used.insert((verb.to_string(), resource.to_string()));
    if world
        .forbidden
        .contains(&(verb.to_string(), resource.to_string()))
    {
        return Some(forbidden(verb, resource, ns, name));
    }
    let fault = world
        .faults
        .iter_mut()
        .find(|f| f.verb == verb && f.resource == resource && f.remaining > 0)?;
    fault.remaining -= 1;
    let code = fault.code;
    Some(match code {
        409 => failure(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your \
             changes to the latest version and try again",
        ),
        429 => respond(
            429,
            &status_body(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
                json!({"retryAfterSeconds": 1}),
            ),
        ),
        code => failure(code, "InternalError", "an injected failure"),
    })
}

fn list(shared: &Shared, kind: Kind, ns: &str, query: &BTreeMap<String, String>) -> Response<Body> {
    let world = shared.world();
    let items: Vec<Value> = world
        .objects
        .iter()
        .filter(|((k, n, _), o)| {
            *k == kind
                && n == ns
                && selected(o, query.get("labelSelector"), query.get("fieldSelector"))
        })
        .map(|(_, o)| o.clone())
        .collect();
    respond(
        200,
        &json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": world.revision.to_string()},
            "items": items,
        }),
    )
}

fn watch_objects(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let (labels, fields) = (
        query.get("labelSelector").cloned(),
        query.get("fieldSelector").cloned(),
    );
    let (tx, rx) = mpsc::channel(64);
    let mut changes = shared.changed.subscribe();
    let (shared, ns) = (shared.clone(), ns.to_string());
    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        let mut next = since;
        loop {
            let events: Vec<Value> = {
                let world = shared.world();
                let events = world
                    .history
                    .iter()
                    .filter(|c| {
                        c.revision > next
                            && c.kind == kind
                            && c.namespace == ns
                            && selected(&c.object, labels.as_ref(), fields.as_ref())
                    })
                    .map(|c| json!({"type": c.type_, "object": c.object}))
                    .collect();
                next = world.revision;
                events
            };
            for event in events {
                let line = Bytes::from(format!("{event}\n"));
                if tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
            }
        }
    });
    streaming(rx)
}

fn logs(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (pod, text) = {
        let world = shared.world();
        let Some(pod) = world
            .objects
            .get(&(Kind::Pods, ns.to_string(), name.to_string()))
            .cloned()
        else {
            return not_found(Kind::Pods, name);
        };
        let logs = world
            .logs
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default();
        let state = &pod["status"]["containerStatuses"][0]["state"];
        let previous = query.get("previous").is_some_and(|p| p == "true");
        let text = if previous {
            match logs.previous {
                Some(text) => text,
                None => {
                    return failure(
                        400,
                        "BadRequest",
                        &format!(
                            "previous terminated container \"app\" in pod \"{name}\" not found"
                        ),
                    );
                }
            }
        } else if state["running"].is_null() && state["terminated"].is_null() {
            let why = state["waiting"]["reason"]
                .as_str()
                .unwrap_or("ContainerCreating");
            return failure(
                400,
                "BadRequest",
                &format!("container \"app\" in pod \"{name}\" is waiting to start: {why}"),
            );
        } else {
            logs.current
        };
        (pod, text)
    };
    let tail = query.get("tailLines").and_then(|t| t.parse::<usize>().ok());
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let skip = tail.map_or(0, |t| lines.len().saturating_sub(t));
    let shown: String = lines[skip..].concat();
    let follow = query.get("follow").is_some_and(|f| f == "true");
    if !follow {
        let mut response = Response::new(Full::new(Bytes::from(shown)).boxed());
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        return response;
    }
    // Following: what is there, then what is written, until the container
    // stops running or the pod is gone.
    let uid = pod["metadata"]["uid"].clone();
    let (tx, rx) = mpsc::channel(64);
    let mut changes = shared.changed.subscribe();
    let (shared, ns, name) = (shared.clone(), ns.to_string(), name.to_string());
    tokio::spawn(async move {
        let mut sent = text.len();
        if !shown.is_empty() && tx.send(Ok(Frame::data(Bytes::from(shown)))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
            let (more, running) = {
                let world = shared.world();
                let pod = world.objects.get(&(Kind::Pods, ns.clone(), name.clone()));
                let running = pod.is_some_and(|p| {
                    p["metadata"]["uid"] == uid
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && !p["status"]["containerStatuses"][0]["state"]["running"].is_null()
                });
                let current = world
                    .logs
                    .get(&(ns.clone(), name.clone()))
                    .map(|l| l.current.clone())
                    .unwrap_or_default();
                let more = current.get(sent..).unwrap_or_default().to_string();
                sent = sent.max(current.len());
                (more, running)
            };
            if !more.is_empty() && tx.send(Ok(Frame::data(Bytes::from(more)))).await.is_err() {
                return;
            }
            if !running {
                return;
            }
        }
    });
    let mut response = streaming(rx);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    response
}

fn apply(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    name: &str,
    query: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    if content_type != "application/apply-patch+yaml" {
        return failure(
            415,
            "UnsupportedMediaType",
            &format!("the fake takes only server-side apply, not {content_type}"),
        );
    }
    let Some(manager) = query.get("fieldManager").cloned() else {
        return failure(
            400,
            "BadRequest",
            "fieldManager is required for apply requests",
        );
    };
    let force = query.get("force").is_some_and(|f| f == "true");
    let Ok(applied) = serde_json::from_slice::<Value>(body) else {
        return failure(400, "BadRequest", "the body is not JSON");
    };
    if applied["metadata"]["name"] != name {
        return failure(
            400,
            "BadRequest",
            "the name in the body differs from the path's",
        );
    }
    let existing = shared
        .world()
        .objects
        .get(&(kind, ns.to_string(), name.to_string()))
        .cloned();
    let Some(existing) = existing else {
        let creating = ("create".to_string(), kind.resource().to_string());
        shared.world().used.insert(creating.clone());
        if shared.world().forbidden.contains(&creating) {
            return forbidden("create", kind.resource(), ns, Some(name));
        }
        if !shared.world().namespaces.contains(ns) {
            return respond(
                404,
                &status_body(
                    404,
                    "NotFound",
                    &format!("namespaces \"{ns}\" not found"),
                    json!({"name": ns, "kind": "namespaces"}),
                ),
            );
        }
        return create(shared, kind, ns, name, applied, &manager);
    };
    if let Some(version) = applied["metadata"]["resourceVersion"].as_str()
        && existing["metadata"]["resourceVersion"] != version
    {
        return failure(
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    let others: Vec<String> = existing["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["manager"].as_str())
        .filter(|m| *m != manager)
        .map(str::to_string)
        .collect();
    let same_spec = contains(&existing["spec"], &applied["spec"]);
    if !force
        && !same_spec
        && let Some(other) = others.first()
    {
        return failure(
            409,
            "Conflict",
            &format!("Apply failed with 1 conflict: conflict with \"{other}\" using v1: .spec"),
        );
    }
    if kind == Kind::Pods && !same_spec {
        return failure(
            422,
            "Invalid",
            &format!(
                "Pod \"{name}\" is invalid: spec: Forbidden: pod updates may not change fields \
                 other than `spec.containers[*].image`, `spec.activeDeadlineSeconds` or \
                 `spec.tolerations` (only additions to existing tolerations)"
            ),
        );
    }
    shared.change(|w| {
        let mut merged = existing.clone();
        for field in ["labels", "annotations"] {
            if let Some(values) = applied["metadata"][field].as_object() {
                for (k, v) in values {
                    merged["metadata"][field][k] = v.clone();
                }
            }
        }
        if kind == Kind::Services {
            let mut spec = applied["spec"].clone();
            spec["clusterIP"] = existing["spec"]["clusterIP"].clone();
            if let (Some(ports), Some(old)) = (
                spec["ports"].as_array_mut(),
                existing["spec"]["ports"].as_array(),
            ) {
                for (p, o) in ports.iter_mut().zip(old) {
                    if !o["nodePort"].is_null() {
                        p["nodePort"] = o["nodePort"].clone();
                    }
                }
            }
            merged["spec"] = spec;
        }
        let mut managers = if force { Vec::new() } else { others };
        managers.push(manager);
        merged["metadata"]["managedFields"] = json!(
            managers
                .iter()
                .map(|m| json!({"manager": m, "operation": "Apply", "apiVersion": "v1"}))
                .collect::<Vec<_>>()
        );
        w.commit(kind, ns, name, Some(merged));
        let stored = w
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned();
        respond(200, &stored.unwrap_or_default())
    })
}

fn create(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    name: &str,
    mut object: Value,
    manager: &str,
) -> Response<Body> {
    let (stored, start) = shared.change(|w| {
        let uid = format!("uid-{}", w.revision + 1);
        let now = w.now();
        let meta = &mut object["metadata"];
        meta["uid"] = json!(uid);
        meta["namespace"] = json!(ns);
        meta["creationTimestamp"] = json!(now);
        meta["managedFields"] = json!([{"manager": manager, "operation": "Apply", "apiVersion": "v1"}]);
        let mut start = false;
        match kind {
            Kind::Pods => {
                let selector = object["spec"]["nodeSelector"].as_object().cloned().unwrap_or_default();
                let fits = selector
                    .iter()
                    .all(|(k, v)| w.kubelet.node_labels.get(k).is_some_and(|n| v == n));
                object["status"] = if fits {
                    start = true;
                    let image = object["spec"]["containers"][0]["image"].clone();
                    json!({
                        "phase": "Pending",
                        "hostIP": "127.0.0.1",
                        "podIP": w.next_address(0),
                        "startTime": now,
                        "conditions": [
                            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
                        ],
                        "containerStatuses": [{
                            "name": "app", "image": image, "imageID": "", "ready": false,
                            "restartCount": 0, "started": false,
                            "state": {"waiting": {"reason": "ContainerCreating"}},
                        }],
                    })
                } else {
                    json!({
                        "phase": "Pending",
                        "conditions": [{
                            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "lastTransitionTime": now,
                            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.",
                        }],
                    })
                };
            }
            Kind::Services => {
                let cluster_ip = w.next_address(1);
                let type_ = object["spec"]["type"].as_str().unwrap_or("ClusterIP").to_string();
                object["spec"]["clusterIP"] = json!(cluster_ip);
                if type_ != "ClusterIP"
                    && let Some(ports) = object["spec"]["ports"].as_array_mut()
                {
                    for p in ports {
                        w.addresses += 1;
                        p["nodePort"] = json!(30000 + w.addresses);
                    }
                }
                object["status"] = json!({"loadBalancer": {}});
                start = type_ == "LoadBalancer";
            }
        }
        w.commit(kind, ns, name, Some(object));
        (w.objects.get(&(kind, ns.to_string(), name.to_string())).cloned(), start)
    });
    let stored = stored.unwrap_or_default();
    if start {
        let uid = stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (shared, ns, name) = (shared.clone(), ns.to_string(), name.to_string());
        match kind {
            Kind::Pods => {
                tokio::spawn(run_pod(shared, ns, name, uid));
            }
            Kind::Services => {
                tokio::spawn(provision_load_balancer(shared, ns, name));
            }
        }
    }
    respond(201, &stored)
}

/// The cloud gives a LoadBalancer Service an address, after a while.
async fn provision_load_balancer(shared: Arc<Shared>, ns: String, name: String) {
    let delay = shared.world().kubelet.start_delay;
    tokio::time::sleep(delay).await;
    shared.change(|w| {
        let key = (Kind::Services, ns.clone(), name.clone());
        if let Some(mut svc) = w.objects.get(&key).cloned() {
            svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": w.next_address(2)}]}});
            w.commit(Kind::Services, &ns, &name, Some(svc));
        }
    });
}

/// The kubelet: pulls the image, runs the container, restarts it when it
/// crashes; until the pod is deleted.
async fn run_pod(shared: Arc<Shared>, ns: String, name: String, uid: String) {
    let kubelet = shared.world().kubelet.clone();
    tokio::time::sleep(kubelet.start_delay).await;
    let pod = shared.world().pod_mut(&ns, &name, &uid);
    let Some(pod) = pod else { return };
    let image = pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if kubelet.missing_images.contains(&image) {
        shared.change(|w| {
            if let Some(mut pod) = w.pod_mut(&ns, &name, &uid) {
                pod["status"]["containerStatuses"][0]["state"] = json!({"waiting": {
                    "reason": "ImagePullBackOff",
                    "message": format!("Back-off pulling image \"{image}\""),
                }});
                w.commit(Kind::Pods, &ns, &name, Some(pod));
            }
        });
        return;
    }
    let crash = crash_code(&pod);
    loop {
        let running = shared.change(|w| {
            let Some(mut pod) = w.pod_mut(&ns, &name, &uid) else {
                return false;
            };
            let now = w.now();
            let status = &mut pod["status"];
            status["phase"] = json!("Running");
            status["conditions"][1] =
                json!({"type": "Ready", "status": "True", "lastTransitionTime": now});
            let c = &mut status["containerStatuses"][0];
            c["ready"] = json!(true);
            c["started"] = json!(true);
            c["state"] = json!({"running": {"startedAt": now}});
            let key = (ns.clone(), name.clone());
            let line = greeting(&pod);
            w.logs.entry(key).or_default().current = line;
            w.commit(Kind::Pods, &ns, &name, Some(pod));
            true
        });
        let Some(code) = crash.filter(|_| running) else {
            return;
        };
        tokio::time::sleep(kubelet.crash_after).await;
        let crashed = shared.change(|w| {
            let Some(mut pod) = w.pod_mut(&ns, &name, &uid) else {
                return false;
            };
            let now = w.now();
            let status = &mut pod["status"];
            status["conditions"][1] = json!({"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now});
            let c = &mut status["containerStatuses"][0];
            let restarts = c["restartCount"].as_i64().unwrap_or(0) + 1;
            c["restartCount"] = json!(restarts);
            c["ready"] = json!(false);
            c["started"] = json!(false);
            c["lastState"] = json!({"terminated": {"exitCode": code, "reason": "Error", "finishedAt": now}});
            c["state"] = json!({"waiting": {
                "reason": "CrashLoopBackOff",
                "message": format!("back-off 10s restarting failed container=app pod={name}_{ns}({uid})"),
            }});
            let logs = w.logs.entry((ns.clone(), name.clone())).or_default();
            logs.previous = Some(std::mem::take(&mut logs.current));
            w.commit(Kind::Pods, &ns, &name, Some(pod));
            true
        });
        if !crashed {
            return;
        }
        tokio::time::sleep(kubelet.restart_after).await;
    }
}

fn delete(shared: &Arc<Shared>, kind: Kind, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let key = (kind, ns.to_string(), name.to_string());
    let Some(existing) = shared.world().objects.get(&key).cloned() else {
        return not_found(kind, name);
    };
    let preconditions = &options["preconditions"];
    if let Some(uid) = preconditions["uid"].as_str()
        && existing["metadata"]["uid"] != uid
    {
        return failure(
            409,
            "Conflict",
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                existing["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        );
    }
    if let Some(version) = preconditions["resourceVersion"].as_str()
        && existing["metadata"]["resourceVersion"] != version
    {
        return failure(
            409,
            "Conflict",
            &format!(
                "Precondition failed: ResourceVersion in precondition: {version}, ResourceVersion in object meta: {}",
                existing["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            ),
        );
    }
    let grace = options["gracePeriodSeconds"]
        .as_i64()
        .or_else(|| existing["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30);
    let scheduled = !existing["status"]["hostIP"].is_null();
    if kind == Kind::Services || grace == 0 || !scheduled {
        shared.change(|w| w.commit(kind, ns, name, None));
        return respond(200, &existing);
    }
    if !existing["metadata"]["deletionTimestamp"].is_null() {
        return respond(200, &existing);
    }
    let (terminating, kubelet) = shared.change(|w| {
        let mut pod = existing.clone();
        pod["metadata"]["deletionTimestamp"] = json!(w.now());
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        w.commit(kind, ns, name, Some(pod));
        (
            w.objects.get(&key).cloned().unwrap_or_default(),
            w.kubelet.clone(),
        )
    });
    if !kubelet.node_unreachable {
        let uid = existing["metadata"]["uid"].clone();
        let (shared, ns, name) = (shared.clone(), ns.to_string(), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(kubelet.stop_delay).await;
            shared.change(|w| {
                let still = w
                    .objects
                    .get(&(Kind::Pods, ns.clone(), name.clone()))
                    .is_some_and(|p| p["metadata"]["uid"] == uid);
                if still {
                    w.commit(Kind::Pods, &ns, &name, None);
                }
            });
        });
    }
    respond(200, &terminating)
}
