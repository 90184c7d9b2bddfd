//! Health probes: one check of a replica ([`probe_once`]) and the thresholds
//! that turn a run of check results into a health state ([`HealthTracker`]).
//!
//! Boundary: this module checks and counts; it does not schedule probes or act
//! on their results. The supervisor runs [`probe_once`] every
//! [`HealthSpec::interval`] and decides what an unhealthy replica means.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::driver::{Driver, DriverError, Handle};

/// How a replica is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` on a named port; a status in 200..=399 is healthy.
    Http {
        /// Request path, e.g. `/healthz`.
        path: String,
        /// Name of the replica's port to connect to.
        port: String,
    },
    /// A TCP connection to a named port is accepted.
    Tcp {
        /// Name of the replica's port to connect to.
        port: String,
    },
    /// A command run in the replica's environment exits with 0.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
}

/// An app's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// What to check.
    pub probe: Probe,
    /// Time between two checks.
    pub interval: Duration,
    /// Longest one check may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that make a replica unhealthy.
    pub failure_threshold: u32,
    /// Consecutive successes that make a replica healthy.
    pub success_threshold: u32,
}

/// Why a check failed. The messages end up in a replica's status, so each
/// names what was checked. Every variant is transient by nature: the next
/// check may pass.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe names a port the replica does not have.
    #[error("the replica has no port named `{0}`")]
    NoSuchPort(String),
    /// The TCP connection failed.
    #[error("connect to {target}: {source}")]
    Connect {
        /// `host:port` connected to.
        target: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The check did not finish within the probe's timeout.
    #[error("{target}: no answer within {after:?}")]
    Timeout {
        /// What was checked: `GET url`, `host:port` or the command.
        target: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The HTTP exchange failed.
    #[error("GET {url}: {source}")]
    Http {
        /// URL requested.
        url: String,
        /// The underlying error.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built, e.g. the path is not a valid URI path.
    #[error("GET {url}: invalid request: {source}")]
    Request {
        /// URL requested.
        url: String,
        /// The underlying error.
        #[source]
        source: hyper::http::Error,
    },
    /// The server answered with a status outside 200..=399.
    #[error("GET {url}: status {status}")]
    HttpStatus {
        /// URL requested.
        url: String,
        /// Status received.
        status: u16,
    },
    /// The command exited with a non-zero code.
    #[error("exec `{command}`: exit code {code}")]
    Exec {
        /// The command, space-joined.
        command: String,
        /// Its exit code; 128 + n if signal n ended it.
        code: i32,
    },
    /// The driver could not run the command.
    #[error("exec probe: {0}")]
    Driver(#[from] DriverError),
}

/// Runs one check of the replica behind `handle`.
///
/// Network probes connect to `host` if given, else to the host part of the
/// handle's address (an unspecified address such as `0.0.0.0` means the local
/// host), else to 127.0.0.1. Exec probes go through [`Driver::exec`].
pub async fn probe_once<D: Driver>(
    driver: &D,
    handle: &Handle,
    host: Option<IpAddr>,
    spec: &HealthSpec,
) -> Result<(), ProbeError> {
    match &spec.probe {
        Probe::Http { path, port } => {
            let target = target(handle, host, port)?;
            let path = if path.starts_with('/') {
                path.clone()
            } else {
                format!("/{path}")
            };
            let url = format!("http://{target}{path}");
            tokio::time::timeout(spec.timeout, http_get(&target, &path, &url))
                .await
                .map_err(|_| ProbeError::Timeout {
                    target: format!("GET {url}"),
                    after: spec.timeout,
                })?
        }
        Probe::Tcp { port } => {
            let target = target(handle, host, port)?;
            match tokio::time::timeout(spec.timeout, TcpStream::connect(&target)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(source)) => Err(ProbeError::Connect { target, source }),
                Err(_) => Err(ProbeError::Timeout {
                    target,
                    after: spec.timeout,
                }),
            }
        }
        Probe::Exec { command } => match driver.exec(handle, command, spec.timeout).await? {
            Some(0) => Ok(()),
            Some(code) => Err(ProbeError::Exec {
                command: command.join(" "),
                code,
            }),
            None => Err(ProbeError::Timeout {
                target: format!("exec `{}`", command.join(" ")),
                after: spec.timeout,
            }),
        },
    }
}

/// `host:port` of the replica's port named `port`.
fn target(handle: &Handle, host: Option<IpAddr>, port: &str) -> Result<String, ProbeError> {
    let number = handle
        .ports
        .get(port)
        .ok_or_else(|| ProbeError::NoSuchPort(port.to_string()))?;
    let host = match host {
        Some(ip) => ip.to_string(),
        None => handle
            .address
            .as_deref()
            .and_then(|address| address.rsplit_once(':'))
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
            .filter(|host| !host.is_empty())
            .map_or_else(|| "127.0.0.1".to_string(), str::to_string),
    };
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() && ip.is_ipv6() => format!("[::1]:{number}"),
        Ok(ip) if ip.is_unspecified() => format!("127.0.0.1:{number}"),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{number}"),
        // An IPv4 address, or a host name drivers may report; both connect as is.
        _ => format!("{host}:{number}"),
    })
}

/// One HTTP/1.1 `GET` on a fresh connection; healthy on 200..=399.
async fn http_get(target: &str, path: &str, url: &str) -> Result<(), ProbeError> {
    let http = |source| ProbeError::Http {
        url: url.to_string(),
        source,
    };
    let stream = TcpStream::connect(target)
        .await
        .map_err(|source| ProbeError::Connect {
            target: target.to_string(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, target)
        .header(hyper::header::USER_AGENT, "skymirror-agent")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ProbeError::Request {
            url: url.to_string(),
            source,
        })?;
    // The connection is driven here rather than in a spawned task, so a
    // timeout that drops this future also drops the socket. With
    // `Connection: close` the connection may finish in the same poll that
    // delivers the response, so the response is still collected after it ends.
    let send = sender.send_request(request);
    tokio::pin!(send);
    let response = tokio::select! {
        response = &mut send => response,
        closed = connection => {
            closed.map_err(http)?;
            send.await
        }
    }
    .map_err(http)?;
    let status = response.status().as_u16();
    if (200..=399).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus {
            url: url.to_string(),
            status,
        })
    }
}

/// Health of a replica as its checks have shown it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not enough checks yet to say.
    Unknown,
    /// Passed `success_threshold` checks in a row.
    Healthy,
    /// Failed `failure_threshold` checks in a row.
    Unhealthy,
}

/// Turns check results into a [`Health`] using an app's thresholds.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    /// Current state.
    state: Health,
    /// Consecutive successes so far.
    successes: u32,
    /// Consecutive failures so far.
    failures: u32,
    /// Successes needed to become healthy (at least 1).
    success_threshold: u32,
    /// Failures needed to become unhealthy (at least 1).
    failure_threshold: u32,
}

impl HealthTracker {
    /// A tracker in state [`Health::Unknown`]. Thresholds of 0 count as 1.
    pub fn new(spec: &HealthSpec) -> Self {
        HealthTracker {
            state: Health::Unknown,
            successes: 0,
            failures: 0,
            success_threshold: spec.success_threshold.max(1),
            failure_threshold: spec.failure_threshold.max(1),
        }
    }

    /// Records one check result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let next = if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= self.success_threshold).then_some(Health::Healthy)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= self.failure_threshold).then_some(Health::Unhealthy)
        };
        match next {
            Some(state) if state != self.state => {
                self.state = state;
                Some(state)
            }
            _ => None,
        }
    }

    /// Current state.
    pub fn state(&self) -> Health {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::driver::{Capabilities, Inspection, ReplicaSpec};

    fn spec(probe: Probe, timeout: Duration) -> HealthSpec {
        HealthSpec {
            probe,
            interval: Duration::from_secs(1),
            timeout,
            failure_threshold: 3,
            success_threshold: 2,
        }
    }

    fn handle(port: u16) -> Handle {
        Handle {
            driver: "fake".into(),
            instance_id: "1".into(),
            address: Some(format!("127.0.0.1:{port}")),
            ports: BTreeMap::from([("http".to_string(), port)]),
            started_at_ms: 0,
            data: serde_json::Value::Null,
        }
    }

    fn http(path: &str) -> Probe {
        Probe::Http {
            path: path.into(),
            port: "http".into(),
        }
    }

    /// A driver whose `exec` answers by the command's first word:
    /// `ok` -> 0, `hang` -> timeout, anything else -> 1.
    struct FakeDriver;

    impl Driver for FakeDriver {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn start(&self, _: &ReplicaSpec) -> Result<Handle, DriverError> {
            Err(unsupported("start"))
        }
        async fn recover(&self, _: &Handle) -> Result<Inspection, DriverError> {
            Err(unsupported("recover"))
        }
        async fn inspect(&self, _: &Handle) -> Result<Inspection, DriverError> {
            Err(unsupported("inspect"))
        }
        async fn stop(&self, _: &Handle, _: Duration) -> Result<(), DriverError> {
            Err(unsupported("stop"))
        }
        async fn destroy(&self, _: &Handle) -> Result<(), DriverError> {
            Err(unsupported("destroy"))
        }
        async fn exec(
            &self,
            _: &Handle,
            command: &[String],
            _: Duration,
        ) -> Result<Option<i32>, DriverError> {
            Ok(match command.first().map(String::as_str) {
                Some("ok") => Some(0),
                Some("hang") => None,
                _ => Some(1),
            })
        }
    }

    fn unsupported(operation: &'static str) -> DriverError {
        DriverError::Unsupported {
            driver: "fake",
            operation,
        }
    }

    /// Serves one canned HTTP response per connection; returns its port.
    async fn http_server(status_line: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 {status_line}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    #[test]
    fn tracker_follows_thresholds() {
        let mut tracker = HealthTracker::new(&spec(http("/"), Duration::from_secs(1)));
        assert_eq!(tracker.state(), Health::Unknown);
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(true), Some(Health::Healthy));
        assert_eq!(tracker.record(true), None);
        // Failures must be consecutive: a success in between resets the count.
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), Some(Health::Unhealthy));
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(true), Some(Health::Healthy));
        assert_eq!(tracker.state(), Health::Healthy);
    }

    #[test]
    fn tracker_goes_unhealthy_from_unknown() {
        let mut spec = spec(http("/"), Duration::from_secs(1));
        spec.failure_threshold = 0;
        let mut tracker = HealthTracker::new(&spec);
        assert_eq!(tracker.record(false), Some(Health::Unhealthy));
        assert_eq!(tracker.state(), Health::Unhealthy);
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let ok = http_server("200 OK").await;
        let probe = spec(http("/healthz"), Duration::from_secs(5));
        probe_once(&FakeDriver, &handle(ok), None, &probe)
            .await
            .expect("healthy");

        let failing = http_server("503 Service Unavailable").await;
        let err = probe_once(&FakeDriver, &handle(failing), None, &probe)
            .await
            .expect_err("unhealthy");
        assert_eq!(
            err.to_string(),
            format!("GET http://127.0.0.1:{failing}/healthz: status 503")
        );

        let other_port = spec(
            Probe::Tcp {
                port: "admin".into(),
            },
            Duration::from_secs(1),
        );
        let err = probe_once(&FakeDriver, &handle(ok), None, &other_port)
            .await
            .expect_err("no port");
        assert!(
            matches!(err, ProbeError::NoSuchPort(ref p) if p == "admin"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tcp_probe_fails_fast_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let probe = spec(
            Probe::Tcp {
                port: "http".into(),
            },
            Duration::from_secs(5),
        );
        probe_once(&FakeDriver, &handle(port), None, &probe)
            .await
            .expect("open port");
        drop(listener);

        let begun = Instant::now();
        let err = probe_once(&FakeDriver, &handle(port), None, &probe)
            .await
            .expect_err("closed");
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        assert!(begun.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let timeout = Duration::from_millis(200);
        let begun = Instant::now();
        let err = probe_once(
            &FakeDriver,
            &handle(port),
            None,
            &spec(http("healthz"), timeout),
        )
        .await
        .expect_err("silent");
        let took = begun.elapsed();
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");
        assert!(took >= timeout && took < Duration::from_secs(2), "{took:?}");
        assert_eq!(
            err.to_string(),
            format!("GET http://127.0.0.1:{port}/healthz: no answer within 200ms")
        );
        silent.abort();
    }

    #[tokio::test]
    async fn exec_probe_uses_the_driver() {
        let exec = |word: &str| {
            spec(
                Probe::Exec {
                    command: vec![word.into(), "x".into()],
                },
                Duration::from_secs(1),
            )
        };
        probe_once(&FakeDriver, &handle(1), None, &exec("ok"))
            .await
            .expect("ok");
        let err = probe_once(&FakeDriver, &handle(1), None, &exec("fail"))
            .await
            .expect_err("fails");
        assert_eq!(err.to_string(), "exec `fail x`: exit code 1");
        let err = probe_once(&FakeDriver, &handle(1), None, &exec("hang"))
            .await
            .expect_err("hangs");
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");
    }

    #[test]
    fn target_prefers_override_then_address() {
        let mut h = handle(4001);
        assert_eq!(target(&h, None, "http").expect("target"), "127.0.0.1:4001");
        assert_eq!(
            target(&h, Some("10.0.0.2".parse().expect("ip")), "http").expect("target"),
            "10.0.0.2:4001"
        );
        h.address = Some("0.0.0.0:4001".into());
        assert_eq!(target(&h, None, "http").expect("target"), "127.0.0.1:4001");
        h.address = Some("[fd00::1]:4001".into());
        assert_eq!(target(&h, None, "http").expect("target"), "[fd00::1]:4001");
        h.address = None;
        assert_eq!(target(&h, None, "http").expect("target"), "127.0.0.1:4001");
    }
}
