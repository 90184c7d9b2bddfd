//! The HTTP reverse proxy: one request in, up to [`MAX_ATTEMPTS`] attempts on
//! upstreams, one response out.
//!
//! Retry rules. A connect failure (nothing was sent) ejects the upstream and
//! may be retried for any method. A failure after the request was sent but
//! before any response head (the upstream closed or reset the connection, did
//! not answer within the route's response-head timeout, or was ejected while
//! the request waited) is retried only for idempotent methods. Bodies up to
//! [`BUFFER_LIMIT`] are buffered so they can be sent again; larger bodies, and
//! gRPC's streams, are streamed and never retried.
//!
//! Hedging. An idempotent request with a buffered body that has no response
//! head after the route's hedge delay (learned from its latency, see
//! `hedge.rs`) is also sent to an upstream on another provider; the first
//! head wins and the other attempt is dropped, which closes its connection.
//! At most one hedge per request, within the route's hedge budget. A request
//! that is not idempotent is never sent twice.
//!
//! Outlier detection. Live traffic judges upstreams: a response-head timeout
//! ejects at once, and resets, 5xx answers and attempts overtaken by their
//! hedge eject after [`EJECT_AFTER_FAILURES`](super::health::EJECT_AFTER_FAILURES)
//! in a row — but never the last usable upstream of a route.
//!
//! Upgrades. A request asking for a protocol upgrade (WebSocket) is sent with
//! its `Connection: upgrade` and `Upgrade` headers, retried only when the
//! connect fails, never hedged; a `101` answer joins the two connections.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{PathAndQuery, Scheme, Uri};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::routes::{ListenerSlot, RouteState, UpstreamProtocol};
use super::{CONNECTION_GRACE, ConnTracker, EdgeStats};

/// Attempts per request, the first included.
pub(crate) const MAX_ATTEMPTS: usize = 3;
/// Request bodies up to this size are buffered (and can be retried).
pub(crate) const BUFFER_LIMIT: usize = 1024 * 1024;
/// Response header naming the replica that answered.
pub(crate) const REPLICA_HEADER: HeaderName = HeaderName::from_static("x-skymirror-replica");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The response body: an upstream's, streamed, or one the edge wrote.
pub(crate) type RespBody = Either<Incoming, Full<Bytes>>;

/// The upstream client: pooled keep-alive connections per address.
pub(crate) type UpstreamClient = Client<HttpConnector, ReqBody>;

/// Everything a connection's requests need.
#[derive(Debug)]
pub(crate) struct ConnContext {
    /// The listener's current routes.
    pub slot: Arc<ListenerSlot>,
    /// The worker's HTTP/1.1 upstream client.
    pub client: UpstreamClient,
    /// The worker's HTTP/2 (prior knowledge) upstream client, for h2c routes.
    pub h2c: UpstreamClient,
    /// Counters.
    pub stats: Arc<EdgeStats>,
    /// The client's IP address, for `X-Forwarded-For` (built once per connection).
    pub client_ip: HeaderValue,
    /// Requests of this connection waiting for their response head, so the
    /// idle timeout never closes a connection that waits on an upstream.
    pub in_flight: AtomicUsize,
    /// Bumped by every read or write on the client connection, so the idle
    /// check can tell whether bytes moved since it last looked.
    pub activity: std::sync::atomic::AtomicU64,
    /// Counts upgraded connections (they outlive the HTTP connection), so
    /// shutdown waits for them.
    pub conns: Arc<ConnTracker>,
    /// The listener's token: upgraded connections get the grace period too.
    pub token: CancellationToken,
}

/// Counts a request as in flight on its connection while alive.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Busy(n)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one request. Never fails: errors become 4xx/5xx responses.
pub(crate) async fn handle(
    ctx: Arc<ConnContext>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    ctx.stats.count_request();
    let _busy = Busy::new(&ctx.in_flight);
    let routes = ctx.slot.current();
    let host = request_host(&req);
    let Some(route) = routes.for_host(host) else {
        let host = host.unwrap_or("").to_string();
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("no app for host {host}\n"),
        ));
    };
    let route = Arc::clone(route);
    drop(routes);

    let upgrade = upgrade_protocol(&req).map(|p| (p, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    let grpc = is_grpc(&parts.headers);
    prepare_request_headers(&mut parts, &ctx.client_ip);
    if let Some((protocol, on_upgrade)) = upgrade {
        return Ok(forward_upgrade(&ctx, &route, parts, protocol, on_upgrade).await);
    }
    // gRPC streams both ways: its body is forwarded as it comes (and a gRPC
    // call, always a POST, is never retried once sent anyway).
    let body = if grpc {
        Ok(ReqBody::Streamed {
            prefix: VecDeque::new(),
            rest: body,
        })
    } else {
        read_body(body).await
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(app = %route.app, error = %e, "client request body failed");
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "cannot read the request body\n".into(),
            ));
        }
    };
    Ok(forward(&ctx, &route, parts, body).await)
}

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    /// The connection could not be made: nothing was sent.
    Connect(String),
    /// The request was (maybe) sent, and no response head came back.
    NoResponse(String),
    /// The request was sent, and no response head came within the route's
    /// response-head timeout.
    Timeout(String),
    /// Anything else (a malformed response, a broken client body).
    Other(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Connect(e)
            | Failure::NoResponse(e)
            | Failure::Timeout(e)
            | Failure::Other(e) => e,
        }
    }
}

/// The upstreams that failed a request, in order (at most [`MAX_ATTEMPTS`]).
#[derive(Debug, Default)]
struct Tried {
    indices: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        &self.indices[..self.len]
    }

    fn add(&mut self, index: usize) {
        if self.len < MAX_ATTEMPTS && !self.as_slice().contains(&index) {
            self.indices[self.len] = index;
            self.len += 1;
        }
    }

    /// `self` and one more, for picking a hedge away from the running attempt.
    fn with(&self, index: usize) -> ([usize; MAX_ATTEMPTS + 1], usize) {
        let mut out = [0; MAX_ATTEMPTS + 1];
        out[..self.len].copy_from_slice(self.as_slice());
        out[self.len] = index;
        (out, self.len + 1)
    }
}

/// One attempt under way.
struct Running<F> {
    /// The upstream it went to.
    index: usize,
    /// When it started, for the latency estimate and to tell which attempt
    /// a hedge overtook.
    started: Instant,
    attempt: Pin<Box<F>>,
}

/// Polls the attempts under way; the first one done, with its slot.
fn poll_running<F, T>(
    running: &mut [Option<Running<F>>; 2],
    cx: &mut Context<'_>,
) -> Poll<(usize, T)>
where
    F: Future<Output = T>,
{
    for (slot, r) in running.iter_mut().enumerate() {
        if let Some(r) = r
            && let Poll::Ready(out) = r.attempt.as_mut().poll(cx)
        {
            return Poll::Ready((slot, out));
        }
    }
    Poll::Pending
}

/// The request towards upstream `index` of `route`, or why it cannot be built.
fn upstream_request(
    route: &RouteState,
    index: usize,
    parts: &Parts,
    path: &PathAndQuery,
    body: ReqBody,
) -> Result<Request<ReqBody>, Failure> {
    let upstream = &route.upstreams[index];
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = match route.upstream_protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };
    *req.headers_mut() = parts.headers.clone();
    let mut uri = hyper::http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(upstream.authority.clone());
    uri.path_and_query = Some(path.clone());
    *req.uri_mut() = Uri::from_parts(uri).map_err(|e| Failure::Other(e.to_string()))?;
    Ok(req)
}

async fn forward(
    ctx: &ConnContext,
    route: &RouteState,
    parts: Parts,
    body: ReqBody,
) -> Response<RespBody> {
    let idempotent = is_idempotent(&parts.method);
    let replayable = body.is_replayable();
    let hedging = route.hedge && idempotent && replayable;
    if hedging {
        route.hedge_budget.deposit();
    }
    let client = match route.upstream_protocol {
        UpstreamProtocol::Http1 => &ctx.client,
        UpstreamProtocol::H2c => &ctx.h2c,
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut body = Some(body);
    let mut tried = Tried::default();
    let mut last: Option<(usize, Failure)> = None;
    let mut started = 0usize;
    // No new attempt after a failure that must not be retried.
    let mut give_up = false;
    let mut running = [None, None];
    let mut hedge_at: Option<Instant> = None;

    loop {
        if running.iter().all(Option::is_none) {
            if give_up || started >= MAX_ATTEMPTS {
                break;
            }
            let index = match route.pick(tried.as_slice()) {
                Some(i) => i,
                // Every upstream tried: a connection that died before answering
                // (a stale keep-alive connection) is worth a fresh one on the same
                // upstream; a failed connect is not.
                None => match &last {
                    Some((i, Failure::NoResponse(_))) => *i,
                    _ => break,
                },
            };
            let attempt_body = if replayable {
                body.as_ref().map(ReqBody::replay)
            } else {
                body.take()
            };
            let Some(attempt_body) = attempt_body else {
                break;
            };
            if started > 0 {
                ctx.stats.count_retry();
            }
            started += 1;
            let req = match upstream_request(route, index, &parts, &path, attempt_body) {
                Ok(r) => r,
                Err(f) => {
                    last = Some((index, f));
                    break;
                }
            };
            let upstream = &route.upstreams[index];
            let now = Instant::now();
            // A hedged request needs no ejection watch (a lock on a wake-up
            // list shared by the workers): its hedge moves it off a silent
            // upstream anyway.
            running[0] = Some(Running {
                index,
                started: now,
                attempt: Box::pin(send(
                    client,
                    &upstream.health,
                    req,
                    idempotent && !hedging,
                    route.response_timeout,
                )),
            });
            hedge_at =
                (hedging && started < MAX_ATTEMPTS).then(|| now + route.latency.hedge_delay());
        }

        let hedge_due = async {
            match hedge_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (slot, outcome) = std::future::poll_fn(|cx| poll_running(&mut running, cx)) => {
                let Some(done) = running[slot].take() else { continue };
                let upstream = &route.upstreams[done.index];
                match outcome {
                    Ok(resp) => {
                        if resp.status().is_server_error() {
                            traffic_failed(ctx, route, done.index, "answered with a server error");
                        } else {
                            upstream.health.traffic_succeeded();
                            route.latency.observe(done.started.elapsed());
                        }
                        // An attempt started earlier and still waiting lost to this one.
                        for other in running.iter_mut().filter_map(Option::take) {
                            if other.started < done.started {
                                traffic_failed(ctx, route, other.index, "overtaken by its hedge");
                            }
                        }
                        return respond(resp, upstream.replica_header.as_ref());
                    }
                    Err(failure) => {
                        let retry = match &failure {
                            Failure::Connect(error) => {
                                if upstream.health.eject() {
                                    ctx.stats.count_ejection();
                                    tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream ejected: connect failed");
                                }
                                route.probe_provider_soon(done.index);
                                replayable
                            }
                            Failure::NoResponse(error) => {
                                tracing::debug!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "no response from upstream");
                                traffic_failed(ctx, route, done.index, "no response");
                                upstream.health.probe_soon();
                                replayable && idempotent
                            }
                            Failure::Timeout(error) => {
                                if route.eject_for_traffic(done.index) {
                                    ctx.stats.count_ejection();
                                    tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream ejected: no response head in time");
                                }
                                upstream.health.probe_soon();
                                replayable && idempotent
                            }
                            Failure::Other(error) => {
                                tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream request failed");
                                false
                            }
                        };
                        tried.add(done.index);
                        last = Some((done.index, failure));
                        give_up |= !retry;
                        // The hedge, if any, is now the request's next attempt.
                        hedge_at = None;
                    }
                }
            }
            () = hedge_due => {
                hedge_at = None;
                let Some(first) = running[0].as_ref().or(running[1].as_ref()).map(|r| r.index) else {
                    continue;
                };
                let (avoid, n) = tried.with(first);
                let Some(index) = route.pick(&avoid[..n]) else { continue };
                if !route.hedge_budget.withdraw() {
                    continue;
                }
                let Some(attempt_body) = body.as_ref().map(ReqBody::replay) else { continue };
                let Ok(req) = upstream_request(route, index, &parts, &path, attempt_body) else { continue };
                ctx.stats.count_hedge();
                started += 1;
                let slot = usize::from(running[0].is_some());
                running[slot] = Some(Running {
                    index,
                    started: Instant::now(),
                    attempt: Box::pin(send(client, &route.upstreams[index].health, req, false, route.response_timeout)),
                });
            }
        }
    }

    ctx.stats.count_failure();
    let (status, reason) = match &last {
        Some((i, f)) => {
            let u = &route.upstreams[*i];
            let why = f.message();
            tracing::warn!(app = %route.app, upstream = %u.address, replica = %u.replica, error = %why, "request failed");
            let status = if matches!(f, Failure::Timeout(_)) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            (
                status,
                format!("last upstream {} ({}): {why}", u.replica, u.address),
            )
        }
        None => (StatusCode::BAD_GATEWAY, "no upstream".to_string()),
    };
    text(
        status,
        format!(
            "skymirror edge: app {}: no upstream answered ({reason})\n",
            route.app
        ),
    )
}

/// Counts a failure on live traffic against upstream `index`, ejecting it when
/// the failures in a row reach the threshold (within the route's cap).
fn traffic_failed(ctx: &ConnContext, route: &RouteState, index: usize, what: &str) {
    let upstream = &route.upstreams[index];
    if upstream.health.traffic_failed() && route.eject_for_traffic(index) {
        ctx.stats.count_ejection();
        tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, last = what, "upstream ejected: failed live traffic repeatedly");
        upstream.health.probe_soon();
    }
}

/// One attempt, its wait for a response head bounded by `timeout`. With
/// `watch_ejection` (idempotent requests that are not hedged) it also gives
/// up when the upstream is ejected while it waits (a black-holed connection
/// never answers).
async fn send(
    client: &UpstreamClient,
    health: &super::health::Health,
    req: Request<ReqBody>,
    watch_ejection: bool,
    timeout: std::time::Duration,
) -> Result<Response<Incoming>, Failure> {
    let request = tokio::time::timeout(timeout, client.request(req));
    let timed_out = || Failure::Timeout(format!("no response head within {timeout:?}"));
    if !(watch_ejection && health.is_usable()) {
        return match request.await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(timed_out()),
        };
    }
    let ejected = health.ejected();
    tokio::pin!(ejected);
    ejected.as_mut().enable();
    tokio::select! {
        r = request => match r {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(timed_out()),
        },
        () = ejected => Err(Failure::NoResponse("upstream ejected while waiting for its response".into())),
    }
}

/// The protocol a request asks to upgrade to (HTTP/1.1 `Connection: upgrade`
/// with an `Upgrade` header), if any.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// gRPC (and gRPC-Web) requests, by content type.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Forwards an upgrade request; on `101` joins the client's connection and the
/// upstream's in a task of their own.
async fn forward_upgrade(
    ctx: &ConnContext,
    route: &RouteState,
    parts: Parts,
    protocol: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<RespBody> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = parts;
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol);
    let mut tried = Tried::default();
    let mut last: Option<(usize, Failure)> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(index) = route.pick(tried.as_slice()) else {
            break;
        };
        if attempt > 0 {
            ctx.stats.count_retry();
        }
        let upstream = &route.upstreams[index];
        // Upgrades are HTTP/1.1 whatever the route's upstream protocol.
        let req =
            upstream_request(route, index, &parts, &path, ReqBody::Buffered(None)).map(|mut r| {
                *r.version_mut() = Version::HTTP_11;
                r
            });
        let outcome = match req {
            Ok(req) => {
                send(
                    &ctx.client,
                    &upstream.health,
                    req,
                    false,
                    route.response_timeout,
                )
                .await
            }
            Err(f) => Err(f),
        };
        match outcome {
            Ok(mut resp) => {
                upstream.health.traffic_succeeded();
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    return respond(resp, upstream.replica_header.as_ref());
                }
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let agreed = resp.headers().get(header::UPGRADE).cloned();
                tunnel(ctx, route.app.clone(), on_upgrade, upstream_upgrade);
                let mut out = respond(resp, upstream.replica_header.as_ref());
                out.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                if let Some(p) = agreed {
                    out.headers_mut().insert(header::UPGRADE, p);
                }
                return out;
            }
            Err(Failure::Connect(error)) => {
                if upstream.health.eject() {
                    ctx.stats.count_ejection();
                    tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream ejected: connect failed");
                }
                route.probe_provider_soon(index);
                tried.add(index);
                last = Some((index, Failure::Connect(error)));
            }
            Err(f) => {
                last = Some((index, f));
                break;
            }
        }
    }
    ctx.stats.count_failure();
    let status = if matches!(last, Some((_, Failure::Timeout(_)))) {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let reason = last.as_ref().map_or("no upstream", |(_, f)| f.message());
    text(
        status,
        format!(
            "skymirror edge: app {}: upgrade not accepted by any upstream ({reason})\n",
            route.app
        ),
    )
}

/// Copies bytes both ways between an upgraded client connection and its
/// upstream until either closes, or the listener's grace period ends.
fn tunnel(
    ctx: &ConnContext,
    app: String,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let guard = ctx.conns.enter();
    let token = ctx.token.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(app, error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let result = tokio::select! {
            r = &mut copy => Some(r),
            () = token.cancelled() => tokio::time::timeout(CONNECTION_GRACE, &mut copy).await.ok(),
        };
        if let Some(Err(e)) = result {
            tracing::debug!(app, error = %e, "upgraded connection ended with an error");
        }
        drop(guard);
    });
}

/// Sorts a client error into the retry classes.
fn classify(e: hyper_util::client::legacy::Error) -> Failure {
    let message = error_chain(&e);
    if e.is_connect() {
        return Failure::Connect(message);
    }
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_parse() || h.is_parse_status() || h.is_parse_too_large() || h.is_user())
        {
            return Failure::Other(message);
        }
        source = s.source();
    }
    Failure::NoResponse(message)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn respond(resp: Response<Incoming>, replica: Option<&HeaderValue>) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(v) = replica {
        parts.headers.insert(REPLICA_HEADER, v.clone());
    }
    Response::from_parts(parts, Either::Left(body))
}

/// A plain-text response written by the edge.
pub(crate) fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// GET, HEAD, OPTIONS, PUT, DELETE and TRACE (RFC 9110, 9.2.2).
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The request's host: the URI authority (HTTP/2, absolute form) or the Host
/// header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().host().or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Removes hop-by-hop headers: the fixed set, `Proxy-*`, and whatever the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(v) = v.to_str() {
            named.extend(
                v.split(',')
                    .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
            );
        }
    }
    named.extend(
        headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned(),
    );
    for h in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(h);
    }
    for h in named {
        headers.remove(h);
    }
}

/// Headers towards the upstream: hop-by-hop removed, `X-Forwarded-For` and
/// `X-Forwarded-Proto` set, the client's Host kept (taken from the authority
/// for HTTP/2, which has no Host header). `Expect` is dropped: the edge has
/// already read or is streaming the body itself.
fn prepare_request_headers(parts: &mut Parts, client_ip: &HeaderValue) {
    let headers = &mut parts.headers;
    // `TE: trailers` is the one hop-by-hop value passed on: gRPC servers
    // require it, and the edge forwards trailers.
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(header::EXPECT);
    if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let forwarded = {
        let mut previous = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        if previous.peek().is_none() {
            client_ip.clone()
        } else {
            let mut joined = previous.collect::<Vec<_>>().join(", ");
            joined.push_str(", ");
            joined.push_str(client_ip.to_str().unwrap_or_default());
            HeaderValue::from_str(&joined).unwrap_or_else(|_| client_ip.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR, forwarded);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
}

/// A request body towards an upstream.
#[derive(Debug)]
pub(crate) enum ReqBody {
    /// Read whole (up to [`BUFFER_LIMIT`]): can be sent again.
    Buffered(Option<Bytes>),
    /// Too large to buffer: what was read while finding out, then the rest.
    Streamed {
        prefix: VecDeque<Bytes>,
        rest: Incoming,
    },
}

impl ReqBody {
    fn is_replayable(&self) -> bool {
        matches!(self, ReqBody::Buffered(_))
    }

    /// A copy for another attempt (cheap: `Bytes` is reference-counted).
    /// Only called on buffered bodies.
    fn replay(&self) -> ReqBody {
        match self {
            ReqBody::Buffered(b) => ReqBody::Buffered(b.clone()),
            ReqBody::Streamed { .. } => ReqBody::Buffered(None),
        }
    }
}

/// Reads a client body into memory when it fits in [`BUFFER_LIMIT`].
async fn read_body(mut body: Incoming) -> Result<ReqBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(ReqBody::Buffered(None));
    }
    let limit = BUFFER_LIMIT as u64;
    if body.size_hint().lower() > limit {
        return Ok(ReqBody::Streamed {
            prefix: VecDeque::new(),
            rest: body,
        });
    }
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        // Trailers are hop-by-hop for the edge and dropped.
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            chunks.push_back(data);
            if len > limit {
                return Ok(ReqBody::Streamed {
                    prefix: chunks,
                    rest: body,
                });
            }
        }
    }
    Ok(ReqBody::Buffered(match chunks.len() {
        0 => None,
        1 => chunks.pop_front().filter(|b| !b.is_empty()),
        _ => {
            let mut all = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            for c in chunks {
                all.extend_from_slice(&c);
            }
            Some(Bytes::from(all)).filter(|b| !b.is_empty())
        }
    }))
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Buffered(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Streamed { prefix, rest } => match prefix.pop_front() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Buffered(b) => b.is_none(),
            ReqBody::Streamed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Streamed { prefix, rest } => {
                let buffered: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "secret"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
            ("x-kept", "1"),
            ("host", "a.test"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["host", "x-kept"]);
    }

    #[test]
    fn forwarded_headers() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "a.test")
            .header("x-forwarded-for", "10.0.0.1")
            .header("expect", "100-continue")
            .body(())
            .expect("request");
        let (mut parts, ()) = req.into_parts();
        prepare_request_headers(&mut parts, &HeaderValue::from_static("127.0.0.1"));
        assert_eq!(parts.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.headers["host"], "a.test");
        assert!(!parts.headers.contains_key("expect"));

        // HTTP/2: no Host header, the authority stands in for it.
        let req = Request::builder()
            .uri("http://b.test:8080/x")
            .body(())
            .expect("request");
        let (mut parts, ()) = req.into_parts();
        prepare_request_headers(&mut parts, &HeaderValue::from_static("::1"));
        assert_eq!(parts.headers["host"], "b.test:8080");
        assert_eq!(parts.headers["x-forwarded-for"], "::1");
    }

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(
                is_idempotent(&Method::from_bytes(m.as_bytes()).expect("method")),
                "{m}"
            );
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(
                !is_idempotent(&Method::from_bytes(m.as_bytes()).expect("method")),
                "{m}"
            );
        }
    }
}
