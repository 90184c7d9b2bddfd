//! The edge over real sockets on 127.0.0.1: HTTP and TCP round trips, retries
//! and ejection when upstreams die, listener life cycle, and `run` following
//! a (fake) daemon through an outage.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skymirror_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{EdgeConfig, EdgeCounters, EdgeError, EdgeStats};

const DEADLINE: Duration = Duration::from_secs(10);
/// Probes effectively off: only the first one, at start, runs.
const NO_PROBES: Duration = Duration::from_secs(3600);
const WEB: &str = "127.0.0.1:18080";
const ALT: &str = "127.0.0.1:18081";
const DB: &str = "127.0.0.1:15432";

// ---------------------------------------------------------------- upstreams

#[derive(Debug, Clone, Copy)]
enum Behavior {
    /// An HTTP server answering with its name and what it saw.
    Respond(&'static str),
    /// Reads a request head, then closes without answering.
    BlackHole,
    /// Reads a request head and never answers, keeping the connection.
    Hang,
    /// TCP echo.
    Echo,
    /// An HTTP server answering every request with this status.
    Status(u16),
    /// An HTTP server answering with its name after a delay (milliseconds).
    Slow(&'static str, u64),
    /// An HTTP server that accepts upgrades to `websocket` (101) and then
    /// echoes bytes; plain requests get a 426.
    UpgradeEcho,
    /// An HTTP/2 (prior knowledge) server answering like a gRPC server: the
    /// request body back, then trailers `grpc-status: 0` and what it saw.
    GrpcLike,
}

/// A test upstream. Every accepted connection counts in `accepts`, every
/// request (head read) in `hits`.
struct TestUpstream {
    addr: SocketAddr,
    accepts: Arc<watch::Sender<usize>>,
    hits: Arc<watch::Sender<usize>>,
    accept_task: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TestUpstream {
    async fn start(behavior: Behavior) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), behavior).await
    }

    async fn start_on(addr: SocketAddr, behavior: Behavior) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let accepts = Arc::new(watch::Sender::new(0usize));
        let hits = Arc::new(watch::Sender::new(0usize));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_task = tokio::spawn({
            let (accepts, hits, conns) = (accepts.clone(), hits.clone(), conns.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepts.send_modify(|n| *n += 1);
                    let task = tokio::spawn(serve_upstream_conn(stream, behavior, hits.clone()));
                    conns.lock().expect("conns").push(task);
                }
            }
        });
        Self {
            addr,
            accepts,
            hits,
            accept_task: Some(accept_task),
            conns,
        }
    }

    /// Stops accepting (new connects are refused); open connections stay.
    async fn close_listener(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Like a killed process: the listener and every connection close.
    async fn kill(&mut self) {
        self.close_listener().await;
        let conns: Vec<_> = std::mem::take(&mut *self.conns.lock().expect("conns"));
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }

    fn hits(&self) -> usize {
        *self.hits.borrow()
    }

    async fn wait_hits(&self, n: usize) {
        let mut rx = self.hits.subscribe();
        tokio::time::timeout(DEADLINE, rx.wait_for(|h| *h >= n))
            .await
            .expect("upstream hit in time")
            .expect("upstream alive");
    }

    async fn wait_accepts(&self, n: usize) {
        let mut rx = self.accepts.subscribe();
        tokio::time::timeout(DEADLINE, rx.wait_for(|h| *h >= n))
            .await
            .expect("upstream connected to in time")
            .expect("upstream alive");
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.accept_task {
            task.abort();
        }
        for c in self.conns.lock().expect("conns").iter() {
            c.abort();
        }
    }
}

async fn serve_upstream_conn(
    mut stream: TcpStream,
    behavior: Behavior,
    hits: Arc<watch::Sender<usize>>,
) {
    match behavior {
        Behavior::Respond(name) => {
            let service = service_fn(move |req: Request<Incoming>| {
                let hits = hits.clone();
                async move {
                    hits.send_modify(|n| *n += 1);
                    let seen = |h: &str| {
                        req.headers()
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let (host, xff, proto) = (
                        seen("host"),
                        seen("x-forwarded-for"),
                        seen("x-forwarded-proto"),
                    );
                    let hop = seen("connection") + &seen("upgrade") + &seen("transfer-encoding");
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .header("x-upstream", name)
                            .header("x-seen-host", host)
                            .header("x-seen-xff", xff)
                            .header("x-seen-proto", proto)
                            .header("x-seen-hop", hop)
                            .header("x-seen-body-len", body.len().to_string())
                            .header("connection", "keep-alive")
                            .body(Full::new(Bytes::from(name)))
                            .expect("response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Behavior::BlackHole | Behavior::Hang => {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            hits.send_modify(|n| *n += 1);
            if matches!(behavior, Behavior::Hang) {
                std::future::pending::<()>().await;
            }
        }
        Behavior::Echo => {
            hits.send_modify(|n| *n += 1);
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
        Behavior::Status(code) => {
            let service = service_fn(move |_req: Request<Incoming>| {
                hits.send_modify(|n| *n += 1);
                async move {
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .status(code)
                            .body(Full::new(Bytes::from(code.to_string())))
                            .expect("response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Behavior::Slow(name, ms) => {
            let service = service_fn(move |_req: Request<Incoming>| {
                hits.send_modify(|n| *n += 1);
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(name))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Behavior::UpgradeEcho => {
            let service = service_fn(move |mut req: Request<Incoming>| {
                hits.send_modify(|n| *n += 1);
                async move {
                    let wants = req
                        .headers()
                        .get("upgrade")
                        .is_some_and(|v| v == "websocket");
                    if !wants {
                        return Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(426)
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        );
                    }
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(upgraded) = on_upgrade.await {
                            let mut io = TokioIo::new(upgraded);
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    Ok(Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .header("x-upstream", "ws")
                        .body(Full::new(Bytes::new()))
                        .expect("response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        }
        Behavior::GrpcLike => {
            let service = service_fn(move |req: Request<Incoming>| {
                hits.send_modify(|n| *n += 1);
                async move {
                    let te = req
                        .headers()
                        .get("te")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let version = format!("{:?}", req.version());
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    trailers.insert(
                        "x-seen-te",
                        hyper::header::HeaderValue::from_str(&te).expect("te"),
                    );
                    trailers.insert(
                        "x-seen-version",
                        hyper::header::HeaderValue::from_str(&version).expect("version"),
                    );
                    let frames = futures_frames(body, trailers);
                    Ok::<_, hyper::Error>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(frames)
                            .expect("response"),
                    )
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}

/// A body of one data frame and then trailers.
fn futures_frames(data: Bytes, trailers: hyper::HeaderMap) -> TestFrames {
    TestFrames {
        frames: VecDeque::from([Frame::data(data), Frame::trailers(trailers)]),
    }
}

/// A response body from a list of frames.
struct TestFrames {
    frames: VecDeque<Frame<Bytes>>,
}

impl Body for TestFrames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------- tables

fn up(addr: SocketAddr, provider: &str, tier: i32) -> pb::Upstream {
    pb::Upstream {
        address: addr.to_string(),
        provider: provider.into(),
        replica: format!("web/{provider}/{}", addr.port()),
        weight: 1,
        tier,
        ..Default::default()
    }
}

fn replica(addr: SocketAddr, provider: &str) -> String {
    format!("web/{provider}/{}", addr.port())
}

fn route(listen: &str, hosts: &[&str], protocol: &str, upstreams: Vec<pb::Upstream>) -> pb::Route {
    pb::Route {
        app: "web".into(),
        listen: listen.into(),
        hosts: hosts.iter().map(|h| (*h).to_string()).collect(),
        protocol: protocol.into(),
        upstreams,
        ..Default::default()
    }
}

fn table(revision: u64, routes: Vec<pb::Route>) -> Option<pb::RoutingTable> {
    Some(pb::RoutingTable { revision, routes })
}

// ---------------------------------------------------------------- the edge

fn config(probe_interval: Duration) -> EdgeConfig {
    let mut c = EdgeConfig::new("http://127.0.0.1:9");
    c.probe_interval = probe_interval;
    for l in [WEB, ALT, DB] {
        c.listen_override
            .insert(l.to_string(), "127.0.0.1:0".parse().expect("addr"));
    }
    c
}

struct TestEdge {
    tables: watch::Sender<Option<pb::RoutingTable>>,
    stats: Arc<EdgeStats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), EdgeError>>,
}

impl TestEdge {
    fn start(config: EdgeConfig, first: Option<pb::RoutingTable>) -> Self {
        let (tables, rx) = watch::channel(first);
        let stats = config.stats.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(super::serve(rx, config, shutdown.clone()));
        Self {
            tables,
            stats,
            shutdown,
            task,
        }
    }

    async fn addr(&self, listen: &str) -> SocketAddr {
        wait_bound(&self.stats, listen).await
    }

    fn counters(&self) -> EdgeCounters {
        self.stats.counters()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("edge stops in time")
            .expect("edge task");
        assert!(r.is_ok(), "{r:?}");
    }
}

async fn wait_bound(stats: &EdgeStats, listen: &str) -> SocketAddr {
    let mut rx = stats.listeners();
    let map = tokio::time::timeout(DEADLINE, rx.wait_for(|m| m.contains_key(listen)))
        .await
        .expect("listener bound in time")
        .expect("edge alive");
    map[listen]
}

async fn wait_closed(stats: &EdgeStats, listen: &str) {
    let mut rx = stats.listeners();
    tokio::time::timeout(DEADLINE, rx.wait_for(|m| !m.contains_key(listen)))
        .await
        .expect("listener closed in time")
        .expect("edge alive");
}

// ---------------------------------------------------------------- clients

type TestClient = Client<HttpConnector, TestBody>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request body in chunks, without a known length (sent chunked).
struct TestBody {
    chunks: VecDeque<Bytes>,
    known_length: bool,
}

impl TestBody {
    fn empty() -> Self {
        Self::full(Bytes::new())
    }
    fn full(b: Bytes) -> Self {
        Self {
            chunks: if b.is_empty() {
                VecDeque::new()
            } else {
                VecDeque::from([b])
            },
            known_length: true,
        }
    }
    fn chunked(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
            known_length: false,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.known_length {
            hyper::body::SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    replica: String,
    headers: hyper::HeaderMap,
    body: String,
}

async fn send(
    client: &TestClient,
    addr: SocketAddr,
    method: &str,
    host: &str,
    body: TestBody,
) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}/path?q=1"))
        .header("host", host)
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        replica: parts
            .headers
            .get("x-skymirror-replica")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(client: &TestClient, addr: SocketAddr, host: &str) -> Reply {
    send(client, addr, "GET", host, TestBody::empty()).await
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn http_round_trip_then_a_dead_upstream_costs_no_request() {
    let mut a = TestUpstream::start(Behavior::Respond("a")).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(a.addr, "p1", 0), up(b.addr, "p2", 0)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();

    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = get(&client, addr, "shop.test:8080").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let name = r.body.clone();
        let expected = if name == "a" {
            replica(a.addr, "p1")
        } else {
            replica(b.addr, "p2")
        };
        assert_eq!(r.replica, expected);
        assert_eq!(
            r.headers["x-seen-host"], "shop.test:8080",
            "the client's Host is kept"
        );
        assert_eq!(r.headers["x-seen-xff"], "127.0.0.1");
        assert_eq!(r.headers["x-seen-proto"], "http");
        assert_eq!(
            r.headers["x-seen-hop"], "",
            "hop-by-hop headers are not forwarded"
        );
        assert!(!r.headers.contains_key("connection"), "nor sent back");
        seen.insert(name);
    }
    assert_eq!(seen, BTreeSet::from(["a".to_string(), "b".to_string()]));

    a.kill().await;
    for _ in 0..50 {
        let r = get(&client, addr, "shop.test").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.replica, replica(b.addr, "p2"));
    }
    let after_kill = edge.counters();
    assert_eq!(after_kill.ejections, 1);
    assert!(after_kill.retries >= 1, "{after_kill:?}");
    assert_eq!(after_kill.failures, 0);

    // The dead upstream is out: no more attempts on it.
    for _ in 0..20 {
        assert_eq!(
            get(&client, addr, "shop.test").await.replica,
            replica(b.addr, "p2")
        );
    }
    assert_eq!(edge.counters().retries, after_kill.retries);
    assert_eq!(edge.counters().requests, 90);
    edge.stop().await;
}

#[tokio::test]
async fn post_is_not_retried_once_sent() {
    let hole = TestUpstream::start(Behavior::BlackHole).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(hole.addr, "p1", 2), up(b.addr, "p2", 1)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();

    let r = send(
        &client,
        addr,
        "POST",
        "x",
        TestBody::full(Bytes::from_static(b"hello")),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert!(r.body.contains("app web"), "{}", r.body);
    assert_eq!(hole.hits(), 1);
    assert_eq!(b.hits(), 0, "a sent POST is never retried");
    assert_eq!(edge.counters().retries, 0);
    assert_eq!(edge.counters().failures, 1);

    // The same failure on a GET is retried, on the other provider.
    let r = get(&client, addr, "x").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.replica, replica(b.addr, "p2"));
    assert_eq!(hole.hits(), 2);
    assert_eq!(edge.counters().retries, 1);
    edge.stop().await;
}

#[tokio::test]
async fn post_is_retried_when_the_connect_fails() {
    let mut dying = TestUpstream::start(Behavior::Respond("dying")).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(dying.addr, "p1", 2), up(b.addr, "p2", 1)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    // The only probe ran and found it alive; now it dies.
    dying.wait_accepts(1).await;
    dying.kill().await;

    let client = client();
    let r = send(
        &client,
        addr,
        "POST",
        "x",
        TestBody::full(Bytes::from_static(b"hello")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.replica, replica(b.addr, "p2"));
    assert_eq!(r.headers["x-seen-body-len"], "5");
    let c = edge.counters();
    assert_eq!((c.ejections, c.retries, c.failures), (1, 1, 0), "{c:?}");

    // Bodies over the buffer limit are streamed, with and without a length.
    let big = Bytes::from(vec![7u8; 2 * 1024 * 1024 + 3]);
    let r = send(&client, addr, "PUT", "x", TestBody::full(big.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.headers["x-seen-body-len"], big.len().to_string());
    let chunks: Vec<Bytes> = (0..5).map(|_| Bytes::from(vec![1u8; 300 * 1024])).collect();
    let r = send(&client, addr, "POST", "x", TestBody::chunked(chunks)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.headers["x-seen-body-len"], (5 * 300 * 1024).to_string());
    let r = send(
        &client,
        addr,
        "POST",
        "x",
        TestBody::chunked(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]),
    )
    .await;
    assert_eq!(r.headers["x-seen-body-len"], "4");
    edge.stop().await;
}

#[tokio::test]
async fn a_black_holed_upstream_is_ejected_by_probes_and_returns() {
    let mut hang = TestUpstream::start(Behavior::Hang).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(Duration::from_millis(50)),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(hang.addr, "p1", 2), up(b.addr, "p2", 1)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();

    let pending = tokio::spawn({
        let client = client.clone();
        async move { get(&client, addr, "x").await }
    });
    hang.wait_hits(1).await;
    // New connects fail (probes too) while the request's connection stays
    // open and silent, as in a network partition.
    hang.close_listener().await;
    let r = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("request moved off the ejected upstream")
        .expect("request task");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.replica, replica(b.addr, "p2"));
    assert_eq!(edge.counters().ejections, 1);
    assert_eq!(edge.counters().failures, 0);

    // It comes back after two good probes, and its tier serves again.
    let hang_addr = hang.addr;
    hang.kill().await;
    let back = TestUpstream::start_on(hang_addr, Behavior::Respond("back")).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = get(&client, addr, "x").await;
        assert_eq!(r.status, StatusCode::OK);
        if r.replica == replica(hang_addr, "p1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream never restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back.hits() >= 1);
    edge.stop().await;
}

#[tokio::test]
async fn routes_by_host_and_speaks_h2c() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![
                route(WEB, &["a.test"], "http", vec![up(a.addr, "p1", 0)]),
                route(
                    WEB,
                    &["B.test", "127.0.0.1"],
                    "http",
                    vec![up(b.addr, "p1", 0)],
                ),
            ],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();
    assert_eq!(get(&client, addr, "a.test").await.body, "a");
    assert_eq!(get(&client, addr, "b.TEST:18080").await.body, "b");
    let r = get(&client, addr, "c.test").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body.trim(), "no app for host c.test");

    // h2c (prior knowledge): the authority names the host, there is no Host header.
    let h2: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::builder()
        .uri(format!("http://{addr}/x"))
        .body(TestBody::empty())
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, h2.request(req))
        .await
        .expect("h2 response in time")
        .expect("h2 response");
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-skymirror-replica"],
        replica(b.addr, "p1").as_str()
    );
    assert_eq!(resp.headers()["x-seen-host"], addr.to_string().as_str());
    edge.stop().await;
}

#[tokio::test]
async fn tcp_round_trip_skips_a_dead_upstream() {
    let echo = TestUpstream::start(Behavior::Echo).await;
    let dead = dead_addr().await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                DB,
                &[],
                "tcp",
                vec![up(dead, "p1", 2), up(echo.addr, "p2", 1)],
            )],
        ),
    );
    let addr = edge.addr(DB).await;
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).await.expect("connect to edge");
        let msg = format!("ping {i}");
        s.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(buf, msg.as_bytes());
    }
    assert_eq!(edge.counters().ejections, 1);
    assert_eq!(edge.counters().failures, 0);
    edge.stop().await;
}

#[tokio::test]
async fn listeners_follow_the_table() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let echo = TestUpstream::start(Behavior::Echo).await;
    let web = route(WEB, &[], "http", vec![up(a.addr, "p1", 0)]);
    let db = route(DB, &[], "tcp", vec![up(echo.addr, "p1", 0)]);
    let edge = TestEdge::start(config(NO_PROBES), table(1, vec![web.clone(), db]));
    let web_addr = edge.addr(WEB).await;
    let db_addr = edge.addr(DB).await;

    // The tcp route is removed: its listener closes, the other one stays.
    edge.tables.send_replace(table(2, vec![web.clone()]));
    wait_closed(&edge.stats, DB).await;
    assert!(TcpStream::connect(db_addr).await.is_err());
    let client = client();
    assert_eq!(get(&client, web_addr, "x").await.status, StatusCode::OK);
    assert_eq!(edge.stats.bound(WEB), Some(web_addr), "kept, not rebound");

    // No table at all: nothing listens.
    edge.tables.send_replace(None);
    wait_closed(&edge.stats, WEB).await;
    assert!(TcpStream::connect(web_addr).await.is_err());
    edge.stop().await;
}

#[tokio::test]
async fn keeps_serving_the_last_table_without_a_source() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let mut edge = TestEdge::start(
        config(NO_PROBES),
        table(1, vec![route(WEB, &[], "http", vec![up(a.addr, "p1", 0)])]),
    );
    let addr = edge.addr(WEB).await;
    let client = client();
    assert_eq!(get(&client, addr, "x").await.status, StatusCode::OK);
    // The table source goes away for good (a daemon that never comes back).
    edge.tables = watch::channel(None).0;
    for _ in 0..10 {
        assert_eq!(get(&client, addr, "x").await.body, "a");
    }
    assert_eq!(edge.stats.bound(WEB), Some(addr));
    edge.stop().await;
}

#[tokio::test]
async fn a_failed_bind_is_retried() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = squatter.local_addr().expect("addr").to_string();
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![
                route(&listen, &[], "http", vec![up(a.addr, "p1", 0)]),
                route(WEB, &[], "http", vec![up(a.addr, "p1", 0)]),
            ],
        ),
    );
    // The other listener serves regardless.
    let web = edge.addr(WEB).await;
    assert_eq!(edge.stats.bound(&listen), None);
    let client = client();
    assert_eq!(get(&client, web, "x").await.status, StatusCode::OK);

    drop(squatter);
    let addr = edge.addr(&listen).await;
    assert_eq!(addr.to_string(), listen);
    assert_eq!(get(&client, addr, "x").await.body, "a");
    edge.stop().await;
}

#[tokio::test]
async fn nothing_usable_still_tries_then_502s_and_health_survives_a_new_table() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let dead = dead_addr().await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(1, vec![route(WEB, &[], "http", vec![up(dead, "p1", 1)])]),
    );
    let addr = edge.addr(WEB).await;
    let client = client();
    for _ in 0..3 {
        // Ejected or not, the only upstream is tried: a 502, not a refusal.
        let r = get(&client, addr, "x").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert!(r.body.contains("app web"), "{}", r.body);
    }
    assert_eq!(edge.counters().failures, 3);
    assert_eq!(edge.counters().ejections, 1);

    // A new table keeps the dead address (now in the higher tier) and adds a
    // live one: the ejection is remembered, so nothing is tried on the dead
    // upstream again and no request needs a retry.
    edge.tables.send_replace(table(
        2,
        vec![route(
            WEB,
            &[],
            "http",
            vec![up(dead, "p1", 2), up(a.addr, "p2", 1)],
        )],
    ));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while get(&client, addr, "x").await.status != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new table never served"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert_eq!(get(&client, addr, "x").await.replica, replica(a.addr, "p2"));
    }
    assert_eq!(edge.counters().retries, 0);
    assert_eq!(edge.counters().ejections, 1);
    edge.stop().await;
}

// ---------------------------------------------------------------- gray failures

/// Waits until `check` holds, polling (the counters have no change signal).
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_hung_upstream_is_overtaken_by_hedges_then_ejected() {
    let hang = TestUpstream::start(Behavior::Hang).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(hang.addr, "p1", 0), up(b.addr, "p2", 0)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let started = tokio::time::Instant::now();
        let r = get(&client, addr, "x").await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.replica, replica(b.addr, "p2"));
        // Before any answer the delay is the ceiling; then it is learned.
        if i > 0 {
            slowest = slowest.max(took);
        }
        assert!(
            took < crate::hedge::HEDGE_MAX + Duration::from_millis(400),
            "request {i} took {took:?}"
        );
    }
    assert!(
        slowest < Duration::from_millis(300),
        "hedged requests waited {slowest:?}, the learned delay is far shorter"
    );
    let c = edge.counters();
    assert!(c.hedges >= 1, "{c:?}");
    assert_eq!(c.ejections, 1, "{c:?}");
    assert_eq!(c.failures, 0, "{c:?}");
    assert!(
        hang.hits() <= crate::health::EJECT_AFTER_FAILURES as usize,
        "the hung upstream got {} requests: overtaken attempts eject it",
        hang.hits()
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_response_head_timeout_retries_idempotent_requests_and_never_posts_twice() {
    let hang = TestUpstream::start(Behavior::Hang).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let mut r = route(
        WEB,
        &[],
        "http",
        vec![up(hang.addr, "p1", 0), up(b.addr, "p2", 0)],
    );
    r.response_timeout_ms = 300;
    r.hedging_disabled = true;
    let edge = TestEdge::start(config(NO_PROBES), table(1, vec![r.clone()]));
    let addr = edge.addr(WEB).await;
    let client = client();

    // The first pick is the hung upstream: the POST waits the timeout and gets
    // a 504; it is never sent to the other one.
    let started = tokio::time::Instant::now();
    let post = send(
        &client,
        addr,
        "POST",
        "x",
        TestBody::full(Bytes::from_static(b"order 1")),
    )
    .await;
    assert_eq!(post.status, StatusCode::GATEWAY_TIMEOUT, "{post:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((hang.hits(), b.hits()), (1, 0), "one POST, one delivery");
    assert_eq!(edge.counters().ejections, 1, "a timeout ejects at once");
    for i in 2..=6 {
        let body = Bytes::from(format!("order {i}"));
        let r = send(&client, addr, "POST", "x", TestBody::full(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    assert_eq!(
        hang.hits() + b.hits(),
        6,
        "every POST delivered exactly once"
    );

    // With a fresh health view (a new address set), a GET that meets the
    // timeout is retried on the other provider.
    let hang2 = TestUpstream::start(Behavior::Hang).await;
    r.upstreams = vec![up(hang2.addr, "p1", 0), up(b.addr, "p2", 0)];
    edge.tables.send_replace(table(2, vec![r]));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while hang2.hits() == 0 {
        let started = tokio::time::Instant::now();
        let got = get(&client, addr, "x").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.replica, replica(b.addr, "p2"));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new table never served"
        );
    }
    assert_eq!(edge.counters().hedges, 0, "hedging is off on this route");
    assert!(edge.counters().retries >= 1);
    edge.stop().await;
}

#[tokio::test]
async fn probes_ask_the_apps_health_path() {
    let sick = TestUpstream::start(Behavior::Status(503)).await;
    let frozen = TestUpstream::start(Behavior::Hang).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let mut r = route(
        WEB,
        &[],
        "http",
        vec![
            up(sick.addr, "p1", 0),
            up(frozen.addr, "p2", 0),
            up(b.addr, "p3", 0),
        ],
    );
    r.health_path = "/healthz".into();
    let mut c = config(Duration::from_millis(50));
    c.probe_timeout = Duration::from_millis(200);
    let edge = TestEdge::start(c, table(1, vec![r]));
    let addr = edge.addr(WEB).await;
    // Both accept connections; only the health path shows they are not well.
    wait_for("both upstreams ejected by probes", || {
        edge.counters().ejections >= 2
    })
    .await;
    let client = client();
    for _ in 0..20 {
        let r = get(&client, addr, "x").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.replica, replica(b.addr, "p3"));
    }
    assert_eq!(
        edge.counters().hedges,
        0,
        "no request met the frozen upstream"
    );
    edge.stop().await;
}

#[tokio::test]
async fn live_traffic_never_ejects_the_last_usable_upstream() {
    let a = TestUpstream::start(Behavior::Status(500)).await;
    let b = TestUpstream::start(Behavior::Status(500)).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(a.addr, "p1", 0), up(b.addr, "p2", 0)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let client = client();
    for _ in 0..20 {
        let r = get(&client, addr, "x").await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{r:?}");
        assert_eq!(r.body, "500", "the app's own answer is passed on");
    }
    let c = edge.counters();
    assert_eq!(c.ejections, 1, "one ejected, the last one kept: {c:?}");
    assert_eq!(c.failures, 0);
    edge.stop().await;
}

// ---------------------------------------------------------------- protocols

/// Reads an HTTP/1.1 response head (and a body of known length) from `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&raw));
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.expect("body");
    head + &String::from_utf8_lossy(&body)
}

#[tokio::test]
async fn a_websocket_upgrade_is_proxied_after_failover() {
    let dead = dead_addr().await;
    let ws = TestUpstream::start(Behavior::UpgradeEcho).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(
                WEB,
                &[],
                "http",
                vec![up(dead, "p1", 2), up(ws.addr, "p2", 1)],
            )],
        ),
    );
    let addr = edge.addr(WEB).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_response(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    for msg in ["hello over the tunnel", "and again"] {
        s.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(buf, msg.as_bytes());
    }
    assert_eq!(
        edge.counters().ejections,
        1,
        "the dead upstream failed over before the upgrade"
    );

    // A plain request to the same app gets the app's own answer.
    let r = get(&client(), addr, "chat.test").await;
    assert_eq!(r.status, StatusCode::UPGRADE_REQUIRED);
    drop(s);
    edge.stop().await;
}

#[tokio::test]
async fn h2c_upstreams_carry_grpc_streams_and_trailers() {
    let grpc = TestUpstream::start(Behavior::GrpcLike).await;
    let mut r = route(WEB, &[], "http", vec![up(grpc.addr, "p1", 0)]);
    r.upstream_protocol = "h2c".into();
    let edge = TestEdge::start(config(NO_PROBES), table(1, vec![r]));
    let addr = edge.addr(WEB).await;
    let h2: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // A gRPC frame: not compressed, length 2, payload.
    let message = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(TestBody::chunked(vec![message.clone()]))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, h2.request(req))
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers passed on");
    assert_eq!(collected.to_bytes(), message);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-seen-te"], "trailers",
        "TE: trailers reaches the app"
    );
    assert_eq!(trailers["x-seen-version"], "HTTP/2.0");
    edge.stop().await;
}

// ---------------------------------------------------------------- bounds

/// A connection to `addr` from the loopback address `from`.
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    socket.connect(addr).await.expect("connect")
}

/// A keep-alive GET on `s`: the edge has surely counted the connection after it.
async fn keep_alive_get(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    read_response(s).await
}

#[tokio::test]
async fn connection_limits_refuse_at_once_with_a_503() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let mut c = config(NO_PROBES);
    c.max_connections = 4;
    c.max_connections_per_client = 2;
    let edge = TestEdge::start(
        c,
        table(1, vec![route(WEB, &[], "http", vec![up(a.addr, "p1", 0)])]),
    );
    let addr = edge.addr(WEB).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from([127, 0, 0, 2], addr).await;
        assert!(keep_alive_get(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third from the same address: answered at once.
    let started = tokio::time::Instant::now();
    let mut s = connect_from([127, 0, 0, 2], addr).await;
    let refused = read_response(&mut s).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("from your address"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Other clients still get in, up to the global cap.
    for from in [[127, 0, 0, 3], [127, 0, 0, 4]] {
        let mut s = connect_from(from, addr).await;
        assert!(keep_alive_get(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut s = connect_from([127, 0, 0, 5], addr).await;
    let refused = read_response(&mut s).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too many connections"), "{refused}");
    assert_eq!(edge.counters().refused, 2);
    // A closed connection makes room.
    drop(held.pop());
    let mut s = connect_from([127, 0, 0, 5], addr).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = keep_alive_get(&mut s).await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        // The close may not have been seen yet: try a new connection.
        assert!(tokio::time::Instant::now() < deadline, "no room made: {r}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        s = connect_from([127, 0, 0, 5], addr).await;
    }
    edge.stop().await;
}

#[tokio::test]
async fn idle_connections_close_but_waiting_ones_stay() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let slow = TestUpstream::start(Behavior::Slow("slow", 700)).await;
    let mut c = config(NO_PROBES);
    c.idle_timeout = Duration::from_millis(200);
    let edge = TestEdge::start(
        c,
        table(
            1,
            vec![
                route(WEB, &["slow.test"], "http", vec![up(slow.addr, "p1", 0)]),
                route(WEB, &[], "http", vec![up(a.addr, "p1", 0)]),
            ],
        ),
    );
    let addr = edge.addr(WEB).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert!(keep_alive_get(&mut s).await.starts_with("HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("idle connection closed in time")
        .expect("read");
    assert_eq!(n, 0, "closed by the edge");
    assert!(started.elapsed() >= Duration::from_millis(200));

    // A request that waits on a slow upstream longer than the idle timeout
    // is not cut off.
    let r = get(&client(), addr, "slow.test").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body, "slow");
    edge.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_finishes_requests_in_flight() {
    let slow = TestUpstream::start(Behavior::Slow("slow", 500)).await;
    let edge = TestEdge::start(
        config(NO_PROBES),
        table(
            1,
            vec![route(WEB, &[], "http", vec![up(slow.addr, "p1", 0)])],
        ),
    );
    let addr = edge.addr(WEB).await;
    let pending = tokio::spawn(async move { get(&client(), addr, "x").await });
    slow.wait_hits(1).await;
    edge.shutdown.cancel();
    wait_closed(&edge.stats, WEB).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connection once shutting down"
    );
    let r = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("request finished in time")
        .expect("request task");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body, "slow");
    let result = tokio::time::timeout(DEADLINE, edge.task)
        .await
        .expect("edge stops in time")
        .expect("edge task");
    assert!(result.is_ok(), "{result:?}");
}

// ---------------------------------------------------------------- run

/// A daemon that only serves `WatchRoutes`, from a watch channel.
#[derive(Clone)]
struct FakeDaemon {
    table: watch::Receiver<pb::RoutingTable>,
    stop: CancellationToken,
}

type StreamOf<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

fn not_here<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("fake daemon"))
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for FakeDaemon {
    type WatchEventsStream = StreamOf<pb::Event>;
    type WatchRoutesStream = StreamOf<pb::RoutingTable>;
    type LogsStream = StreamOf<pb::LogChunk>;
    type BackupStream = StreamOf<pb::BackupChunk>;

    async fn watch_routes(
        &self,
        _: tonic::Request<pb::WatchRoutesRequest>,
    ) -> Result<tonic::Response<Self::WatchRoutesStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut table = self.table.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let current = table.borrow_and_update().clone();
                if tx.send(Ok(current)).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = table.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    async fn apply(
        &self,
        _: tonic::Request<pb::ApplyRequest>,
    ) -> Result<tonic::Response<pb::ApplyResponse>, tonic::Status> {
        not_here()
    }
    async fn delete(
        &self,
        _: tonic::Request<pb::DeleteRequest>,
    ) -> Result<tonic::Response<pb::DeleteResponse>, tonic::Status> {
        not_here()
    }
    async fn list_apps(
        &self,
        _: tonic::Request<pb::ListAppsRequest>,
    ) -> Result<tonic::Response<pb::ListAppsResponse>, tonic::Status> {
        not_here()
    }
    async fn list_providers(
        &self,
        _: tonic::Request<pb::ListProvidersRequest>,
    ) -> Result<tonic::Response<pb::ListProvidersResponse>, tonic::Status> {
        not_here()
    }
    async fn list_replicas(
        &self,
        _: tonic::Request<pb::ListReplicasRequest>,
    ) -> Result<tonic::Response<pb::ListReplicasResponse>, tonic::Status> {
        not_here()
    }
    async fn get_app_status(
        &self,
        _: tonic::Request<pb::GetAppStatusRequest>,
    ) -> Result<tonic::Response<pb::AppStatus>, tonic::Status> {
        not_here()
    }
    async fn get_daemon_status(
        &self,
        _: tonic::Request<pb::GetDaemonStatusRequest>,
    ) -> Result<tonic::Response<pb::DaemonStatus>, tonic::Status> {
        not_here()
    }
    async fn watch_events(
        &self,
        _: tonic::Request<pb::WatchEventsRequest>,
    ) -> Result<tonic::Response<Self::WatchEventsStream>, tonic::Status> {
        not_here()
    }
    async fn failover(
        &self,
        _: tonic::Request<pb::FailoverRequest>,
    ) -> Result<tonic::Response<pb::OperatorResponse>, tonic::Status> {
        not_here()
    }
    async fn failback(
        &self,
        _: tonic::Request<pb::FailbackRequest>,
    ) -> Result<tonic::Response<pb::OperatorResponse>, tonic::Status> {
        not_here()
    }
    async fn control_provider(
        &self,
        _: tonic::Request<pb::ControlProviderRequest>,
    ) -> Result<tonic::Response<pb::OperatorResponse>, tonic::Status> {
        not_here()
    }
    async fn explain(
        &self,
        _: tonic::Request<pb::ExplainRequest>,
    ) -> Result<tonic::Response<pb::ExplainResponse>, tonic::Status> {
        not_here()
    }
    async fn logs(
        &self,
        _: tonic::Request<pb::LogsRequest>,
    ) -> Result<tonic::Response<Self::LogsStream>, tonic::Status> {
        not_here()
    }

    async fn backup(
        &self,
        _: tonic::Request<pb::BackupRequest>,
    ) -> Result<tonic::Response<Self::BackupStream>, tonic::Status> {
        not_here()
    }
    async fn create_token(
        &self,
        _: tonic::Request<pb::CreateTokenRequest>,
    ) -> Result<tonic::Response<pb::CreateTokenResponse>, tonic::Status> {
        not_here()
    }
    async fn list_tokens(
        &self,
        _: tonic::Request<pb::ListTokensRequest>,
    ) -> Result<tonic::Response<pb::ListTokensResponse>, tonic::Status> {
        not_here()
    }
    async fn revoke_token(
        &self,
        _: tonic::Request<pb::RevokeTokenRequest>,
    ) -> Result<tonic::Response<pb::OperatorResponse>, tonic::Status> {
        not_here()
    }
    async fn list_agent_certificates(
        &self,
        _: tonic::Request<pb::ListAgentCertificatesRequest>,
    ) -> Result<tonic::Response<pb::ListAgentCertificatesResponse>, tonic::Status> {
        not_here()
    }
    async fn revoke_agent(
        &self,
        _: tonic::Request<pb::RevokeAgentRequest>,
    ) -> Result<tonic::Response<pb::OperatorResponse>, tonic::Status> {
        not_here()
    }
}

/// Serves the fake daemon on `addr` until `stop`; the returned task ends once
/// the server has shut down.
async fn start_daemon(
    addr: SocketAddr,
    table: pb::RoutingTable,
    stop: CancellationToken,
) -> (SocketAddr, watch::Sender<pb::RoutingTable>, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.expect("bind daemon");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = watch::channel(table);
    let fake = FakeDaemon {
        table: rx,
        stop: stop.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(pb::control_service_server::ControlServiceServer::new(fake))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            )
            .await;
    });
    (addr, tx, task)
}

#[tokio::test]
async fn run_follows_the_daemon_and_keeps_the_table_through_an_outage() {
    let a = TestUpstream::start(Behavior::Respond("a")).await;
    let b = TestUpstream::start(Behavior::Respond("b")).await;
    let web_a = table(1, vec![route(WEB, &[], "http", vec![up(a.addr, "p1", 0)])]).expect("table");
    let stop1 = CancellationToken::new();
    let (daemon_addr, _tx1, daemon1) =
        start_daemon("127.0.0.1:0".parse().expect("addr"), web_a, stop1.clone()).await;

    let mut cfg = config(NO_PROBES);
    cfg.server = format!("http://{daemon_addr}");
    let stats = cfg.stats.clone();
    let shutdown = CancellationToken::new();
    let edge = tokio::spawn(super::run(cfg, shutdown.clone()));
    let addr = wait_bound(&stats, WEB).await;
    let client = client();
    assert_eq!(get(&client, addr, "x").await.body, "a");

    // The daemon goes away: the edge keeps the table it has.
    stop1.cancel();
    tokio::time::timeout(DEADLINE, daemon1)
        .await
        .expect("daemon stops")
        .expect("daemon task");
    for _ in 0..5 {
        assert_eq!(get(&client, addr, "x").await.body, "a");
    }

    // It comes back on the same address; a placeholder table (revision 0)
    // is ignored, and the next real one is served.
    let stop2 = CancellationToken::new();
    let (_, tx2, daemon2) =
        start_daemon(daemon_addr, pb::RoutingTable::default(), stop2.clone()).await;
    tx2.send_replace(
        table(1, vec![route(WEB, &[], "http", vec![up(b.addr, "p2", 0)])]).expect("table"),
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = get(&client, addr, "x").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        if r.body == "b" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new table never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    shutdown.cancel();
    let r = tokio::time::timeout(DEADLINE, edge)
        .await
        .expect("edge stops")
        .expect("edge task");
    assert!(r.is_ok(), "{r:?}");
    stop2.cancel();
    let _ = tokio::time::timeout(DEADLINE, daemon2).await;
}

#[tokio::test]
async fn run_rejects_a_bad_daemon_url() {
    let mut cfg = EdgeConfig::new("not a url");
    cfg.listen_override.clear();
    let r = super::run(cfg, CancellationToken::new()).await;
    assert!(matches!(r, Err(EdgeError::InvalidServer { .. })), "{r:?}");
}

// ---------------------------------------------------------------- throughput
