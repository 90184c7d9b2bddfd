//! From a routing table to what each listener serves: grouping routes by
//! listen address, choosing a route by Host header, and the per-route state
//! the proxy uses (upstreams, their health, the selector).
//!
//! [`plan_listeners`] and [`HostRouter`] are pure; [`ListenerRoutes::build`]
//! only attaches the shared health state.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use skymirror_proto::v1 as pb;

use super::health::Health;
use super::hedge::{HedgeBudget, LatencyEstimate};
use super::select::{Candidate, Selector};

/// Response-head timeout of a route whose table gives none (a daemon that
/// predates the setting).
pub(crate) const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// How the edge talks to a route's upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamProtocol {
    /// HTTP/1.1, pooled keep-alive connections.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC).
    H2c,
}

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.1 and h2c, routed by Host header.
    Http,
    /// Plain TCP pass-through.
    Tcp,
}

impl Protocol {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.eq_ignore_ascii_case("http") {
            Some(Protocol::Http)
        } else if s.eq_ignore_ascii_case("tcp") {
            Some(Protocol::Tcp)
        } else {
            None
        }
    }
}

/// The host part of a Host header or authority: without port, IPv6 brackets
/// or a trailing dot, lower-cased (allocating only when it has upper case).
pub(crate) fn normalize_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else if raw.bytes().filter(|b| *b == b':').count() == 1 {
        raw.split_once(':').map_or(raw, |(h, _)| h)
    } else {
        raw
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Picks a route of one listener by host name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostRouter {
    /// Normalized host name → route index.
    by_host: HashMap<String, usize>,
    /// The route with no host names, if any.
    default: Option<usize>,
}

impl HostRouter {
    /// Builds the router from each route's host names, in route order: the
    /// first route naming a host (or the first with no hosts, for the default)
    /// wins; later duplicates are returned so the caller can report them.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a [String]>) -> (Self, Vec<(usize, String)>) {
        let mut router = HostRouter::default();
        let mut shadowed = Vec::new();
        for (i, hosts) in routes.into_iter().enumerate() {
            if hosts.is_empty() {
                if router.default.is_some() {
                    shadowed.push((i, "<default>".to_string()));
                } else {
                    router.default = Some(i);
                }
            }
            for h in hosts {
                let h = normalize_host(h).into_owned();
                match router.by_host.entry(h) {
                    Entry::Occupied(e) => shadowed.push((i, e.key().clone())),
                    Entry::Vacant(e) => {
                        e.insert(i);
                    }
                }
            }
        }
        (router, shadowed)
    }

    /// The route for a request's host (`None`: no Host header at all).
    pub fn route(&self, host: Option<&str>) -> Option<usize> {
        if self.by_host.is_empty() {
            return self.default;
        }
        host.and_then(|h| self.by_host.get(normalize_host(h).as_ref()).copied())
            .or(self.default)
    }
}

/// What one listen address serves, from the table alone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListenerPlan<'t> {
    /// Protocol of the first route on the address; routes of the other
    /// protocol are ignored (and logged).
    pub protocol: Protocol,
    /// The routes served, in table order.
    pub routes: Vec<&'t pb::Route>,
    /// Route choice by host (HTTP).
    pub router: HostRouter,
}

/// Groups the table's routes by listen address. Routes with an unknown
/// protocol, and routes whose protocol differs from the first route on the
/// same address, are left out and logged.
pub(crate) fn plan_listeners(table: &pb::RoutingTable) -> BTreeMap<&str, ListenerPlan<'_>> {
    let mut grouped: BTreeMap<&str, (Protocol, Vec<&pb::Route>)> = BTreeMap::new();
    for route in &table.routes {
        let Some(protocol) = Protocol::parse(&route.protocol) else {
            tracing::warn!(app = %route.app, protocol = %route.protocol, "route ignored: unknown protocol");
            continue;
        };
        let entry = grouped
            .entry(route.listen.as_str())
            .or_insert_with(|| (protocol, Vec::new()));
        if entry.0 != protocol {
            tracing::warn!(
                app = %route.app,
                listen = %route.listen,
                "route ignored: its listen address already serves another protocol"
            );
            continue;
        }
        entry.1.push(route);
    }
    grouped
        .into_iter()
        .map(|(listen, (protocol, routes))| {
            let (router, shadowed) = HostRouter::new(routes.iter().map(|r| r.hosts.as_slice()));
            for (i, host) in shadowed {
                tracing::warn!(app = %routes[i].app, listen, host, "host already routed to another app on this address");
            }
            (
                listen,
                ListenerPlan {
                    protocol,
                    routes,
                    router,
                },
            )
        })
        .collect()
}

/// Whether an upstream address is usable: `host:port` with a port.
pub(crate) fn valid_address(address: &str) -> bool {
    address
        .parse::<Authority>()
        .is_ok_and(|a| a.port_u16().is_some() && !a.host().is_empty())
}

/// One upstream of a route, ready for the proxy.
#[derive(Debug)]
pub(crate) struct UpstreamState {
    /// "host:port".
    pub address: String,
    /// The address as a URI authority, for HTTP requests.
    pub authority: Authority,
    /// Replica id "app/provider/index" (logs).
    pub replica: String,
    /// The same as a header value for `x-skymirror-replica` (`None` if the id
    /// is not a valid header value).
    pub replica_header: Option<HeaderValue>,
    /// Shared with every route using the same address.
    pub health: Arc<Health>,
}

/// One route, ready for the proxy.
#[derive(Debug)]
pub(crate) struct RouteState {
    /// App name (logs and error bodies).
    pub app: String,
    /// Same order as the selector's candidates.
    pub upstreams: Vec<UpstreamState>,
    /// Longest wait for a response head, per attempt.
    pub response_timeout: Duration,
    /// Whether idempotent requests may be hedged.
    pub hedge: bool,
    /// How requests reach the upstreams.
    pub upstream_protocol: UpstreamProtocol,
    /// Learned from the answers of this route, for the hedge delay.
    pub latency: LatencyEstimate,
    /// Bounds the share of requests that are hedged.
    pub hedge_budget: HedgeBudget,
    selector: Selector,
    /// Round-robin ticket; relaxed atomic, the only write on the hot path.
    ticket: AtomicU64,
}

impl RouteState {
    fn build(route: &pb::Route, health: &mut dyn FnMut(&str) -> Arc<Health>) -> Self {
        let mut providers: Vec<&str> = Vec::new();
        let mut upstreams = Vec::with_capacity(route.upstreams.len());
        let mut candidates = Vec::with_capacity(route.upstreams.len());
        for u in &route.upstreams {
            let authority = match u.address.parse::<Authority>() {
                Ok(a) if valid_address(&u.address) => a,
                _ => {
                    tracing::warn!(app = %route.app, upstream = %u.address, replica = %u.replica, "upstream ignored: address is not host:port");
                    continue;
                }
            };
            let provider = match providers.iter().position(|p| *p == u.provider) {
                Some(i) => i,
                None => {
                    providers.push(&u.provider);
                    providers.len() - 1
                }
            };
            candidates.push(Candidate {
                tier: u.tier,
                weight: u.weight,
                provider: u32::try_from(provider).unwrap_or(u32::MAX),
            });
            upstreams.push(UpstreamState {
                address: u.address.clone(),
                authority,
                replica: u.replica.clone(),
                replica_header: HeaderValue::from_str(&u.replica).ok(),
                health: health(&u.address),
            });
        }
        let upstream_protocol = if route.upstream_protocol.eq_ignore_ascii_case("h2c") {
            UpstreamProtocol::H2c
        } else {
            if !route.upstream_protocol.is_empty()
                && !route.upstream_protocol.eq_ignore_ascii_case("http1")
            {
                tracing::warn!(app = %route.app, upstream_protocol = %route.upstream_protocol, "unknown upstream protocol; using HTTP/1.1");
            }
            UpstreamProtocol::Http1
        };
        Self {
            app: route.app.clone(),
            upstreams,
            response_timeout: match route.response_timeout_ms {
                0 => DEFAULT_RESPONSE_TIMEOUT,
                ms => Duration::from_millis(u64::from(ms)),
            },
            hedge: !route.hedging_disabled,
            upstream_protocol,
            latency: LatencyEstimate::default(),
            hedge_budget: HedgeBudget::default(),
            selector: Selector::new(candidates),
            ticket: AtomicU64::new(0),
        }
    }

    /// The upstream for the next attempt (see [`Selector`]), excluding
    /// `tried`.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let ticket = self.ticket.fetch_add(1, Ordering::Relaxed);
        self.selector
            .pick(ticket, |i| self.upstreams[i].health.is_usable(), tried)
    }

    /// Ejects upstream `index` for what live traffic showed, unless it is the
    /// last usable upstream of the route: the edge never ejects every upstream
    /// of an app on its own judgement of traffic (a bad request that makes
    /// every replica fail must not take the app offline). Returns true if the
    /// upstream was ejected now.
    pub fn eject_for_traffic(&self, index: usize) -> bool {
        let others_usable = self
            .upstreams
            .iter()
            .enumerate()
            .any(|(i, u)| i != index && u.health.is_usable());
        others_usable && self.upstreams[index].health.eject()
    }

    /// Asks for an immediate probe of every upstream on the same provider as
    /// `index`: one failed connect often means the whole provider is gone.
    pub fn probe_provider_soon(&self, index: usize) {
        let Some(provider) = self.selector.candidate(index).map(|c| c.provider) else {
            return;
        };
        for (i, u) in self.upstreams.iter().enumerate() {
            if i != index
                && self
                    .selector
                    .candidate(i)
                    .is_some_and(|c| c.provider == provider)
            {
                u.health.probe_soon();
            }
        }
    }
}

/// Everything one listener serves, swapped whole when the table changes.
#[derive(Debug)]
pub(crate) struct ListenerRoutes {
    /// How connections are handled.
    pub protocol: Protocol,
    /// Route choice by host.
    router: HostRouter,
    /// Indexed by the router.
    routes: Vec<Arc<RouteState>>,
}

impl ListenerRoutes {
    /// Attaches health state (looked up or created by `health`) to a plan.
    pub fn build(plan: &ListenerPlan<'_>, health: &mut dyn FnMut(&str) -> Arc<Health>) -> Self {
        Self {
            protocol: plan.protocol,
            router: plan.router.clone(),
            routes: plan
                .routes
                .iter()
                .map(|r| Arc::new(RouteState::build(r, health)))
                .collect(),
        }
    }

    /// The route for an HTTP request's host.
    pub fn for_host(&self, host: Option<&str>) -> Option<&Arc<RouteState>> {
        self.router.route(host).and_then(|i| self.routes.get(i))
    }

    /// The route of a TCP listener (the first route on the address).
    pub fn tcp_route(&self) -> Option<&Arc<RouteState>> {
        self.routes.first()
    }
}

/// A listener's current routes. The listener task keeps the slot; the serve
/// loop replaces the contents when the table changes, so a table change never
/// restarts a listener.
#[derive(Debug)]
pub(crate) struct ListenerSlot {
    /// Read (and the `Arc` cloned) once per request or TCP connection; the
    /// lock is never held across an await.
    routes: RwLock<Arc<ListenerRoutes>>,
}

impl ListenerSlot {
    /// A slot holding `routes`.
    pub fn new(routes: ListenerRoutes) -> Self {
        Self {
            routes: RwLock::new(Arc::new(routes)),
        }
    }

    /// The routes in force now.
    pub fn current(&self) -> Arc<ListenerRoutes> {
        Arc::clone(
            &self
                .routes
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the routes; requests already routed finish on the old ones.
    pub fn replace(&self, routes: ListenerRoutes) {
        *self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(routes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(app: &str, listen: &str, hosts: &[&str], protocol: &str) -> pb::Route {
        pb::Route {
            app: app.into(),
            listen: listen.into(),
            hosts: hosts.iter().map(|h| (*h).to_string()).collect(),
            protocol: protocol.into(),
            upstreams: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("::1"), "::1");
        assert_eq!(normalize_host("10.0.0.1:443"), "10.0.0.1");
        assert!(matches!(normalize_host("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn routing_by_host() {
        let a = vec!["a.test".to_string(), "www.A.test".to_string()];
        let b = vec!["b.test".to_string()];
        let none: Vec<String> = vec![];
        let (r, shadowed) = HostRouter::new([a.as_slice(), b.as_slice()]);
        assert!(shadowed.is_empty());
        assert_eq!(r.route(Some("a.test")), Some(0));
        assert_eq!(r.route(Some("WWW.a.test:8080")), Some(0));
        assert_eq!(r.route(Some("b.test")), Some(1));
        assert_eq!(r.route(Some("c.test")), None);
        assert_eq!(r.route(None), None);

        let (r, _) = HostRouter::new([a.as_slice(), none.as_slice()]);
        assert_eq!(
            r.route(Some("c.test")),
            Some(1),
            "the route without hosts is the default"
        );
        assert_eq!(r.route(None), Some(1));
        assert_eq!(r.route(Some("a.test")), Some(0));

        let (r, shadowed) =
            HostRouter::new([b.as_slice(), b.as_slice(), none.as_slice(), none.as_slice()]);
        assert_eq!(r.route(Some("b.test")), Some(0), "first route wins");
        assert_eq!(r.route(Some("x")), Some(2));
        assert_eq!(
            shadowed,
            vec![(1, "b.test".to_string()), (3, "<default>".to_string())]
        );
    }

    #[test]
    fn listeners_group_routes_by_address() {
        let table = pb::RoutingTable {
            revision: 1,
            routes: vec![
                route("a", "0.0.0.0:80", &["a.test"], "http"),
                route("b", "0.0.0.0:80", &["b.test"], ""),
                route("db", "0.0.0.0:5432", &[], "tcp"),
                route("clash", "0.0.0.0:80", &[], "tcp"),
                route("odd", "0.0.0.0:81", &[], "udp"),
            ],
        };
        let plan = plan_listeners(&table);
        assert_eq!(
            plan.keys().copied().collect::<Vec<_>>(),
            vec!["0.0.0.0:5432", "0.0.0.0:80"]
        );
        let web = &plan["0.0.0.0:80"];
        assert_eq!(web.protocol, Protocol::Http);
        assert_eq!(
            web.routes
                .iter()
                .map(|r| r.app.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(web.router.route(Some("b.test")), Some(1));
        assert_eq!(plan["0.0.0.0:5432"].protocol, Protocol::Tcp);
    }

    #[test]
    fn route_state_shares_health_by_address_and_skips_bad_addresses() {
        let mut r = route("a", "l", &[], "http");
        for (addr, provider) in [
            ("127.0.0.1:1", "p1"),
            ("not an address", "p1"),
            ("127.0.0.1:2", "p2"),
            ("127.0.0.1:1", "p2"),
        ] {
            r.upstreams.push(pb::Upstream {
                address: addr.into(),
                provider: provider.into(),
                replica: format!("a/{provider}/0"),
                weight: 1,
                tier: 0,
                ..Default::default()
            });
        }
        let mut healths: HashMap<String, Arc<Health>> = HashMap::new();
        let state = RouteState::build(&r, &mut |a| {
            healths.entry(a.to_string()).or_default().clone()
        });
        assert_eq!(state.upstreams.len(), 3);
        assert!(Arc::ptr_eq(
            &state.upstreams[0].health,
            &state.upstreams[2].health
        ));
        state.upstreams[0].health.eject();
        // Only the upstream on 127.0.0.1:2 is usable now.
        for _ in 0..10 {
            assert_eq!(state.pick(&[]), Some(1));
        }
    }
}
