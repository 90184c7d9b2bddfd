//! skymirror's front door: a reverse proxy for HTTP/1.1, h2c and plain TCP
//! that sends each app's traffic to healthy replicas, on any provider. The
//! `skymirror edge` verb and `skymirror dev` run it; it runs on other hosts
//! than the daemon, following the daemon's routing table over gRPC.
//!
//! Layout: [`run`] follows the daemon's routing table
//! (`ControlService.WatchRoutes`, `watch.rs`) and hands it to [`serve`], the
//! proxy proper, which binds one listener per distinct `listen` address and
//! swaps its routes whenever a new table arrives. `routes.rs` turns a table
//! into per-listener routes (by Host for HTTP); `select.rs` is the pure
//! upstream selection (tiers, weights, retries on another provider);
//! `health.rs` keeps the edge's own health view (ejection on a failed connect,
//! a failed probe or failing live traffic; HTTP probes of the app's health
//! path, or TCP probes, per upstream address); `hedge.rs` learns when to hedge;
//! `http.rs` and `tcp.rs` proxy one request or connection; `limits.rs` bounds
//! connections (per client, in all, idle time). [`EdgeConfig`] holds the
//! settings, [`EdgeStats`] the counters and bound listeners, [`EdgeError`] the
//! failures.
//!
//! Invariant: the table says which upstreams exist, the edge's health view
//! says which are usable now; neither is ever blocked on the other, and a lost
//! daemon only means "no new table" — the last table keeps being served.
//!
//! Boundary: of the daemon, this crate knows only `ControlService.WatchRoutes`
//! and its `RoutingTable` (from `skymirror-proto`); it never depends on the
//! `skymirror` or `skymirror-agent` crates. No protobuf past `routes.rs`; the
//! proxy paths see `routes::ListenerRoutes` only, and hold no lock across an
//! await.

mod health;
mod hedge;
mod http;
mod limits;
mod routes;
mod select;
mod tcp;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use skymirror_proto::v1 as pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use watch::run;

use health::{Health, ProbeTarget};
use http::{ConnContext, UpstreamClient};
pub(crate) use limits::ConnTracker;
use limits::{Limits, TrackedIo};
use routes::{ListenerRoutes, ListenerSlot, Protocol};

/// How long a connection may finish its in-flight request (or an upgraded or
/// TCP connection go on) after its listener closes (table change or
/// shutdown) before it is dropped.
pub(crate) const CONNECTION_GRACE: Duration = Duration::from_secs(5);
/// Idle keep-alive upstream connections kept per upstream and worker.
const UPSTREAM_IDLE_PER_HOST: usize = 1024;
/// How often binds that failed are tried again while the table stays the same.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// Idle upstream keep-alive connections are closed after this long.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

/// Settings of one edge.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Daemon URL the routing table comes from, e.g. `http://127.0.0.1:7600`.
    pub server: String,
    /// Names this edge in the daemon's logs.
    pub edge_id: String,
    /// Interval of the TCP probes of every upstream (default 250 ms).
    pub probe_interval: Duration,
    /// Bound on upstream connects (default 300 ms).
    pub connect_timeout: Duration,
    /// Bound on one probe: a TCP connect, or a GET of the app's health path
    /// and its status line (default 500 ms).
    pub probe_timeout: Duration,
    /// Most client connections open at once, every listener together. Past
    /// it a connection is answered at once (HTTP: a 503) and closed, so the
    /// edge never runs out of file descriptors. Default: half the process's
    /// open-file limit, less a reserve (each connection may hold one upstream).
    pub max_connections: usize,
    /// Most connections open at once from one client IP address, so one
    /// client cannot take every connection. Default: a quarter of
    /// `max_connections`.
    pub max_connections_per_client: usize,
    /// How long an HTTP connection may stay open with no request in flight
    /// and no bytes moving (default 60 s). Past half of `max_connections` it
    /// shrinks in proportion, down to a second at the cap.
    pub idle_timeout: Duration,
    /// Route listen address → address actually bound (dev mode moves
    /// `127.0.0.1:8080` this way; several edges on one machine too). Listen
    /// addresses not in the map are bound as given.
    pub listen_override: BTreeMap<String, SocketAddr>,
    /// Counters and bound listeners; clone the `Arc` before handing the
    /// config to [`run`] or [`serve`] to watch them.
    pub stats: Arc<EdgeStats>,
}

impl EdgeConfig {
    /// Defaults for an edge following the daemon at `server`.
    pub fn new(server: impl Into<String>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self {
            server: server.into(),
            edge_id: format!("edge-{host}-{}", std::process::id()),
            probe_interval: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(300),
            probe_timeout: Duration::from_millis(500),
            max_connections: limits::default_max_connections(),
            max_connections_per_client: (limits::default_max_connections() / 4).max(1),
            idle_timeout: Duration::from_secs(60),
            listen_override: BTreeMap::new(),
            stats: Arc::new(EdgeStats::default()),
        }
    }
}

/// Why the edge, or one of its parts, failed.
///
/// Only [`EdgeError::InvalidServer`] ends [`run`]; the others are reported in
/// the log and retried, because an edge must keep serving what it can.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The daemon URL cannot be used. Not retryable: fix the configuration.
    #[error("invalid daemon address {url:?}: {reason}")]
    InvalidServer {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A route's listen address is not an address and does not resolve.
    /// Retried with the next table.
    #[error("route listen address {listen:?}: {reason}")]
    InvalidListen {
        /// The route's listen address.
        listen: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A listener could not be bound (address in use, no permission).
    /// Retried every second and with every new table.
    #[error("cannot listen on {addr} (route listen address {listen}): {source}")]
    Bind {
        /// The route's listen address.
        listen: String,
        /// The address bound (after `listen_override`).
        addr: SocketAddr,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The daemon could not be reached. Retried with backoff; the last table
    /// keeps being served.
    #[error("daemon {url} unreachable: {source}")]
    Connect {
        /// The daemon URL.
        url: String,
        /// The transport's reason.
        source: tonic::transport::Error,
    },
    /// The route stream failed or ended. Retried like [`EdgeError::Connect`].
    #[error("routing table stream from {url}: {}", .status.message())]
    Stream {
        /// The daemon URL.
        url: String,
        /// The gRPC status (boxed: it is large).
        status: Box<tonic::Status>,
    },
}

/// What an edge has done, for tests, benchmarks and status output.
#[derive(Debug)]
pub struct EdgeStats {
    /// HTTP requests received and TCP connections accepted.
    requests: AtomicU64,
    /// Attempts beyond the first (HTTP retries and TCP connects elsewhere).
    retries: AtomicU64,
    /// 5xx responses the edge wrote itself, and TCP connections it dropped
    /// for want of an upstream.
    failures: AtomicU64,
    /// Upstreams taken out of service (transitions, not failed probes).
    ejections: AtomicU64,
    /// Hedged attempts: second attempts sent while the first could still answer.
    hedges: AtomicU64,
    /// Connections refused at a connection limit.
    refused: AtomicU64,
    /// Route listen address → address bound, for every listener open now.
    listeners: tokio::sync::watch::Sender<BTreeMap<String, SocketAddr>>,
}

/// A snapshot of [`EdgeStats`]' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeCounters {
    /// HTTP requests received and TCP connections accepted.
    pub requests: u64,
    /// Attempts beyond the first.
    pub retries: u64,
    /// 5xx responses written by the edge (and TCP connections dropped).
    pub failures: u64,
    /// Upstream ejections.
    pub ejections: u64,
    /// Hedged attempts.
    pub hedges: u64,
    /// Connections refused at a connection limit.
    pub refused: u64,
}

impl Default for EdgeStats {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            listeners: tokio::sync::watch::Sender::new(BTreeMap::new()),
        }
    }
}

impl EdgeStats {
    /// The counters now.
    pub fn counters(&self) -> EdgeCounters {
        EdgeCounters {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Follows the open listeners: route listen address → address bound.
    pub fn listeners(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, SocketAddr>> {
        self.listeners.subscribe()
    }

    /// The address bound for a route listen address, if its listener is open.
    pub fn bound(&self, listen: &str) -> Option<SocketAddr> {
        self.listeners.borrow().get(listen).copied()
    }

    fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
    fn count_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }
    fn count_hedge(&self) {
        self.hedges.fetch_add(1, Ordering::Relaxed);
    }
    fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the proxy on the tables the caller sends, until `shutdown`.
///
/// `None` (or a table without routes) closes every listener; a table replaces
/// the previous one whole. When the sender is dropped the last table keeps
/// being served. Returns once every listener, connection and probe has ended.
pub async fn serve(
    mut tables: tokio::sync::watch::Receiver<Option<pb::RoutingTable>>,
    config: EdgeConfig,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    let mut edge = Edge::new(config, shutdown.clone());
    let first = tables.borrow_and_update().clone();
    edge.apply(first).await;
    let mut following = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = tables.changed(), if following => match changed {
                Ok(()) => {
                    let table = tables.borrow_and_update().clone();
                    edge.apply(table).await;
                }
                Err(_) => {
                    tracing::debug!("routing table source gone; serving the last table");
                    following = false;
                }
            },
            () = tokio::time::sleep(BIND_RETRY), if edge.bind_pending => {
                let table = edge.table.take();
                edge.apply(table).await;
            }
        }
    }
    edge.shutdown().await;
    Ok(())
}

/// The running proxy: listeners, probers and what they share.
#[derive(Debug)]
struct Edge {
    config: EdgeConfig,
    shutdown: CancellationToken,
    /// One per core: connections are accepted and proxied on a worker's own
    /// single-threaded runtime with its own upstream pool, so a request never
    /// hops threads (cross-thread wake-ups dominated the proxy's CPU time).
    workers: Vec<Worker>,
    http: Arc<auto::Builder<TokioExecutor>>,
    /// Every client connection (and upgraded connection), for the limits
    /// and so shutdown can wait for them.
    conns: Arc<ConnTracker>,
    /// Open listeners by route listen address.
    listeners: BTreeMap<String, Listener>,
    /// One prober (and health state) per upstream address in the table.
    probers: HashMap<String, Prober>,
    /// The table in force, kept to retry failed binds.
    table: Option<pb::RoutingTable>,
    /// Some listener of the table could not be bound.
    bind_pending: bool,
}

#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    slot: Arc<ListenerSlot>,
    /// Stops the accept loops and (gracefully) the listener's connections.
    token: CancellationToken,
    /// One accept loop per worker.
    tasks: Vec<JoinHandle<()>>,
}

/// A proxy worker: a thread running a single-threaded runtime.
#[derive(Debug)]
struct Worker {
    handle: tokio::runtime::Handle,
    client: UpstreamClient,
    /// HTTP/2 with prior knowledge, for h2c routes.
    h2c: UpstreamClient,
    /// Ends the worker's thread (after its tasks are done).
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(index: usize, connect_timeout: Duration) -> Option<Worker> {
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("edge-worker-{index}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start an edge worker runtime");
                        return;
                    }
                };
                if tx.send(rt.handle().clone()).is_err() {
                    return;
                }
                rt.block_on(until.cancelled());
            })
            .ok()?;
        let handle = rx.recv().ok()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_IDLE)
            .pool_max_idle_per_host(UPSTREAM_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(UPSTREAM_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Some(Worker {
            handle,
            client,
            h2c,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
struct Prober {
    /// What it probes: a table that changes the app's health path restarts it.
    target: ProbeTarget,
    health: Arc<Health>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Edge {
    fn new(config: EdgeConfig, shutdown: CancellationToken) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let workers = (0..cores)
            .filter_map(|i| Worker::start(i, config.connect_timeout))
            .collect();
        let conns = Arc::new(ConnTracker::new(Limits {
            max_connections: config.max_connections,
            max_per_client: config.max_connections_per_client,
            idle_timeout: config.idle_timeout,
        }));
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1().timer(TokioTimer::new());
        http.http2().timer(TokioTimer::new());
        Self {
            config,
            shutdown,
            workers,
            conns,
            http: Arc::new(http),
            listeners: BTreeMap::new(),
            probers: HashMap::new(),
            table: None,
            bind_pending: false,
        }
    }

    /// Makes listeners, routes and probers match `table`.
    async fn apply(&mut self, table: Option<pb::RoutingTable>) {
        let empty = pb::RoutingTable::default();
        let plans = routes::plan_listeners(table.as_ref().unwrap_or(&empty));
        if let Some(t) = &table {
            tracing::info!(
                revision = t.revision,
                routes = t.routes.len(),
                listeners = plans.len(),
                "routing table applied"
            );
        }

        // Probers: one per upstream address, health kept for addresses that stay.
        let mut targets: HashMap<&str, ProbeTarget> = HashMap::new();
        for route in plans.values().flat_map(|p| p.routes.iter()) {
            let http_route = routes::Protocol::parse(&route.protocol) == Some(Protocol::Http);
            for u in route
                .upstreams
                .iter()
                .filter(|u| routes::valid_address(&u.address))
            {
                let http = (http_route && route.health_path.starts_with('/')).then(|| {
                    let at = if routes::valid_address(&u.health_address) {
                        &u.health_address
                    } else {
                        &u.address
                    };
                    (at.clone(), route.health_path.clone())
                });
                targets
                    .entry(u.address.as_str())
                    .or_insert_with(|| ProbeTarget {
                        address: u.address.clone(),
                        http,
                        app: route.app.clone(),
                        replica: u.replica.clone(),
                    });
            }
        }
        let gone: Vec<String> = self
            .probers
            .iter()
            .filter(|(a, p)| {
                targets
                    .get(a.as_str())
                    .is_none_or(|t| t.http != p.target.http)
            })
            .map(|(a, _)| a.clone())
            .collect();
        let mut kept_health: HashMap<String, Arc<Health>> = HashMap::new();
        for address in gone {
            if let Some(p) = self.probers.remove(&address) {
                p.token.cancel();
                let _ = p.task.await;
                // A changed health check keeps what the edge knows of the address.
                kept_health.insert(address, p.health);
            }
        }
        for (address, target) in targets {
            if self.probers.contains_key(address) {
                continue;
            }
            let health = kept_health
                .remove(address)
                .unwrap_or_else(|| Arc::new(Health::new()));
            let token = self.shutdown.child_token();
            let task = tokio::spawn(health::probe_loop(
                target.clone(),
                Arc::clone(&health),
                self.config.probe_interval,
                self.config.probe_timeout,
                Arc::clone(&self.config.stats),
                token.clone(),
            ));
            self.probers.insert(
                address.to_string(),
                Prober {
                    target,
                    health,
                    token,
                    task,
                },
            );
        }

        // Listeners: close the ones no route uses first, so an address that
        // moves between route listen strings can be bound again at once.
        let closing: Vec<String> = self
            .listeners
            .keys()
            .filter(|l| !plans.contains_key(l.as_str()))
            .cloned()
            .collect();
        for listen in closing {
            if let Some(l) = self.listeners.remove(&listen) {
                l.token.cancel();
                for t in l.tasks {
                    let _ = t.await;
                }
                tracing::info!(listen, addr = %l.addr, "listener closed: no route uses it");
            }
        }
        self.bind_pending = false;
        for (listen, plan) in &plans {
            let probers = &self.probers;
            let routes = ListenerRoutes::build(plan, &mut |address| {
                probers
                    .get(address)
                    .map_or_else(|| Arc::new(Health::new()), |p| Arc::clone(&p.health))
            });
            if let Some(l) = self.listeners.get(*listen) {
                l.slot.replace(routes);
                continue;
            }
            match self.bind(listen).await {
                Ok(listener) => self.start_listener(listen, listener, routes),
                Err(e) => {
                    tracing::warn!(listen, error = %e, "listener not started; retrying");
                    self.bind_pending = true;
                }
            }
        }
        drop(plans);
        self.table = table;
        self.publish_listeners();
    }

    async fn bind(&self, listen: &str) -> Result<TcpListener, EdgeError> {
        let addr = match self.config.listen_override.get(listen) {
            Some(a) => *a,
            None => match listen.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => tokio::net::lookup_host(listen)
                    .await
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .ok_or_else(|| EdgeError::InvalidListen {
                        listen: listen.to_string(),
                        reason: "not host:port, or the host does not resolve".into(),
                    })?,
            },
        };
        TcpListener::bind(addr)
            .await
            .map_err(|source| EdgeError::Bind {
                listen: listen.to_string(),
                addr,
                source,
            })
    }

    fn start_listener(&mut self, listen: &str, listener: TcpListener, routes: ListenerRoutes) {
        let addr = listener.local_addr().unwrap_or_else(|_| {
            self.config
                .listen_override
                .get(listen)
                .copied()
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
        });
        let slot = Arc::new(ListenerSlot::new(routes));
        let token = self.shutdown.child_token();
        let mut tasks = Vec::with_capacity(self.workers.len());
        // Every worker accepts on its own handle of the same socket.
        match listener.into_std() {
            Ok(std_listener) => {
                for worker in &self.workers {
                    let socket = match std_listener.try_clone() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(listen, error = %e, "cannot share the listener with a worker");
                            continue;
                        }
                    };
                    let acceptor = Acceptor {
                        listen: listen.to_string(),
                        slot: Arc::clone(&slot),
                        client: worker.client.clone(),
                        h2c: worker.h2c.clone(),
                        http: Arc::clone(&self.http),
                        conns: Arc::clone(&self.conns),
                        stats: Arc::clone(&self.config.stats),
                        connect_timeout: self.config.connect_timeout,
                        token: token.clone(),
                    };
                    tasks.push(worker.handle.spawn(async move {
                        match TcpListener::from_std(socket) {
                            Ok(l) => acceptor.run(l).await,
                            Err(e) => tracing::error!(listen = %acceptor.listen, error = %e, "worker cannot listen"),
                        }
                    }));
                }
            }
            Err(e) => {
                tracing::error!(listen, error = %e, "cannot hand the listener to the workers")
            }
        }
        tracing::info!(listen, %addr, workers = tasks.len(), "listening");
        self.listeners.insert(
            listen.to_string(),
            Listener {
                addr,
                slot,
                token,
                tasks,
            },
        );
    }

    fn publish_listeners(&self) {
        let bound: BTreeMap<String, SocketAddr> = self
            .listeners
            .iter()
            .map(|(listen, l)| (listen.clone(), l.addr))
            .collect();
        self.config.stats.listeners.send_if_modified(|current| {
            if *current == bound {
                false
            } else {
                *current = bound;
                true
            }
        });
    }

    /// Closes listeners, lets connections finish (each within
    /// [`CONNECTION_GRACE`]) and stops the probers.
    async fn shutdown(mut self) {
        for (_, l) in std::mem::take(&mut self.listeners) {
            l.token.cancel();
            for t in l.tasks {
                let _ = t.await;
            }
        }
        self.publish_listeners();
        self.conns.wait_idle().await;
        for (_, p) in std::mem::take(&mut self.probers) {
            p.token.cancel();
            let _ = p.task.await;
        }
    }
}

/// One listener's accept loop and what its connections need.
#[derive(Debug)]
struct Acceptor {
    listen: String,
    slot: Arc<ListenerSlot>,
    client: UpstreamClient,
    h2c: UpstreamClient,
    http: Arc<auto::Builder<TokioExecutor>>,
    conns: Arc<ConnTracker>,
    stats: Arc<EdgeStats>,
    connect_timeout: Duration,
    token: CancellationToken,
}

impl Acceptor {
    async fn run(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.token.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => self.spawn_connection(stream, peer),
                Err(e) => {
                    // Out of file descriptors and the like: pause instead
                    // of spinning, and keep the listener.
                    tracing::warn!(listen = %self.listen, error = %e, "accept failed");
                    tokio::select! {
                        () = self.token.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }

    fn spawn_connection(&self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let protocol = self.slot.current().protocol;
        let guard = match self.conns.try_enter(peer.ip()) {
            Ok(g) => g,
            Err(refusal) => {
                self.stats.count_refused();
                tracing::debug!(listen = %self.listen, client = %peer.ip(), ?refusal, "connection refused at a limit");
                if protocol == Protocol::Http {
                    limits::refuse_http(stream, refusal, &self.conns);
                }
                return;
            }
        };
        let token = self.token.clone();
        match protocol {
            Protocol::Tcp => {
                let slot = Arc::clone(&self.slot);
                let stats = Arc::clone(&self.stats);
                let connect_timeout = self.connect_timeout;
                tokio::spawn(async move {
                    tcp::serve(stream, slot, stats, connect_timeout, token).await;
                    drop(guard);
                });
            }
            Protocol::Http => {
                let ctx = Arc::new(ConnContext {
                    slot: Arc::clone(&self.slot),
                    client: self.client.clone(),
                    h2c: self.h2c.clone(),
                    stats: Arc::clone(&self.stats),
                    client_ip: HeaderValue::from_str(&peer.ip().to_string())
                        .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
                    in_flight: AtomicUsize::new(0),
                    activity: AtomicU64::new(0),
                    conns: Arc::clone(&self.conns),
                    token: token.clone(),
                });
                let http = Arc::clone(&self.http);
                let listen = self.listen.clone();
                tokio::spawn(async move {
                    serve_http_connection(&http, stream, ctx, token, &listen).await;
                    drop(guard);
                });
            }
        }
    }
}

/// Serves one client connection until it ends, its listener closes (then it
/// gets [`CONNECTION_GRACE`] to finish), or it stays idle past the idle
/// timeout of the moment (checked once per timeout: a connection idle since
/// just after a check closes within two).
async fn serve_http_connection(
    http: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    ctx: Arc<ConnContext>,
    token: CancellationToken,
    listen: &str,
) {
    let io = TokioIo::new(TrackedIo::new(stream, Arc::clone(&ctx)));
    let service = {
        let ctx = Arc::clone(&ctx);
        hyper::service::service_fn(move |req| http::handle(Arc::clone(&ctx), req))
    };
    let conn = http.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut seen = ctx.activity.load(Ordering::Relaxed);
    let result = loop {
        let idle = ctx.conns.idle_timeout();
        tokio::select! {
            r = conn.as_mut() => break r,
            () = token.cancelled() => {
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(CONNECTION_GRACE, conn.as_mut()).await {
                    Ok(r) => break r,
                    Err(_) => return,
                }
            }
            () = tokio::time::sleep(idle) => {
                let now = ctx.activity.load(Ordering::Relaxed);
                if now == seen && ctx.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(listen, ?idle, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(CONNECTION_GRACE, conn.as_mut()).await {
                        Ok(r) => break r,
                        Err(_) => return,
                    }
                }
                seen = now;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listen, error = %e, "http connection ended with an error");
    }
}
