//! The HTTP reverse proxy: one request in, up to [`MAX_ATTEMPTS`] attempts on
//! upstreams, one response out.
//!
//! Retry rules. A connect failure (nothing was sent) ejects the upstream and
//! may be retried for any method. A failure after the request was sent but
//! before any response head (the upstream closed or reset the connection, or
//! was ejected while the request waited) is retried only for idempotent
//! methods. Bodies up to [`BUFFER_LIMIT`] are buffered so they can be sent
//! again; larger bodies are streamed and never retried.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{PathAndQuery, Scheme, Uri};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::EdgeStats;
use super::routes::{ListenerSlot, RouteState};

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

/// The upstream client: pooled keep-alive HTTP/1.1 connections per address.
pub(crate) type UpstreamClient = Client<HttpConnector, ReqBody>;

/// Everything a connection's requests need.
#[derive(Debug)]
pub(crate) struct ConnContext {
    /// The listener's current routes.
    pub slot: Arc<ListenerSlot>,
    /// Shared upstream client.
    pub client: UpstreamClient,
    /// Counters.
    pub stats: Arc<EdgeStats>,
    /// The client's IP address, for `X-Forwarded-For` (built once per connection).
    pub client_ip: HeaderValue,
}

/// Serves one request. Never fails: errors become 4xx/5xx responses.
pub(crate) async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    ctx.stats.count_request();
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

    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts, &ctx.client_ip);
    let body = match read_body(body).await {
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
    /// Anything else (a malformed response, a broken client body).
    Other(String),
}

async fn forward(
    ctx: &ConnContext,
    route: &RouteState,
    parts: Parts,
    body: ReqBody,
) -> Response<RespBody> {
    let idempotent = is_idempotent(&parts.method);
    let replayable = body.is_replayable();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut body = Some(body);
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut n_tried = 0;
    let mut last: Option<(usize, Failure)> = None;

    for attempt in 0..MAX_ATTEMPTS {
        let index = match route.pick(&tried[..n_tried]) {
            Some(i) => i,
            // Every upstream tried: a connection that died before answering
            // (a stale keep-alive connection) is worth a fresh one on the
            // same upstream; a failed connect is not.
            None => match &last {
                Some((i, Failure::NoResponse(_))) => *i,
                _ => break,
            },
        };
        if attempt > 0 {
            ctx.stats.count_retry();
        }
        let upstream = &route.upstreams[index];
        let attempt_body = if replayable {
            body.as_ref().map(ReqBody::replay)
        } else {
            body.take()
        };
        let Some(attempt_body) = attempt_body else {
            break;
        };
        let mut req = Request::new(attempt_body);
        *req.method_mut() = parts.method.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = parts.headers.clone();
        let mut uri = hyper::http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(upstream.authority.clone());
        uri.path_and_query = Some(path.clone());
        match Uri::from_parts(uri) {
            Ok(u) => *req.uri_mut() = u,
            Err(e) => {
                last = Some((index, Failure::Other(e.to_string())));
                break;
            }
        }

        let outcome = send(&ctx.client, &upstream.health, req, idempotent).await;
        let failure = match outcome {
            Ok(resp) => return respond(resp, upstream.replica_header.as_ref()),
            Err(f) => f,
        };
        let retry = match &failure {
            Failure::Connect(error) => {
                if upstream.health.eject() {
                    ctx.stats.count_ejection();
                    tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream ejected: connect failed");
                }
                route.probe_provider_soon(index);
                replayable
            }
            Failure::NoResponse(error) => {
                tracing::debug!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "no response from upstream");
                upstream.health.probe_soon();
                replayable && idempotent
            }
            Failure::Other(error) => {
                tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream request failed");
                false
            }
        };
        if n_tried < MAX_ATTEMPTS && !tried[..n_tried].contains(&index) {
            tried[n_tried] = index;
            n_tried += 1;
        }
        last = Some((index, failure));
        if !retry {
            break;
        }
    }

    ctx.stats.count_failure();
    let reason = match &last {
        Some((i, f)) => {
            let u = &route.upstreams[*i];
            let why = match f {
                Failure::Connect(e) | Failure::NoResponse(e) | Failure::Other(e) => e,
            };
            tracing::warn!(app = %route.app, upstream = %u.address, replica = %u.replica, error = %why, "request failed");
            format!("last upstream {} ({}): {why}", u.replica, u.address)
        }
        None => "no upstream".to_string(),
    };
    text(
        StatusCode::BAD_GATEWAY,
        format!(
            "skymirror edge: app {}: no upstream answered ({reason})\n",
            route.app
        ),
    )
}

/// One attempt. Idempotent requests also give up when the upstream is
/// ejected while they wait (a black-holed connection never answers).
async fn send(
    client: &UpstreamClient,
    health: &super::health::Health,
    req: Request<ReqBody>,
    watch_ejection: bool,
) -> Result<Response<Incoming>, Failure> {
    let request = client.request(req);
    if !(watch_ejection && health.is_usable()) {
        return request.await.map_err(classify);
    }
    let ejected = health.ejected();
    tokio::pin!(ejected);
    ejected.as_mut().enable();
    tokio::select! {
        r = request => r.map_err(classify),
        () = ejected => Err(Failure::NoResponse("upstream ejected while waiting for its response".into())),
    }
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
    strip_hop_by_hop(headers);
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
