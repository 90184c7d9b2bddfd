//! The gRPC API: `ControlService` ([`control`]), `AgentService` ([`agents`]),
//! the standard health and reflection (v1 and v1alpha) services, and
//! [`serve_on`], which runs them on one or more listeners — TLS ([`tls`]) or
//! plaintext loopback — behind the authentication layer ([`auth`]), with the
//! daemon's loops, until shutdown.
//!
//! Boundary: protobuf types and `tonic::Status` appear only here (and in the
//! spec's own wire conversions); [`convert`] maps them to and from the
//! domain, and `From<DaemonError> for Status` is the one mapping of errors.

pub mod agents;
pub mod auth;
pub mod control;
pub mod convert;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{EventReason, NewEvent};
use crate::security::Role;

/// A socket the daemon serves its API on, and how.
#[derive(Debug)]
pub struct Listener {
    /// The bound socket (the caller owns the address; tests bind `:0`).
    pub socket: TcpListener,
    /// Serve TLS with the daemon's PKI; otherwise plaintext, which callers
    /// keep to loopback.
    pub tls: bool,
    /// The role of callers without a token; `None`: a token is required.
    pub anonymous: Option<Role>,
}

/// The health service name that says whether the store accepts writes.
pub const STORE_HEALTH: &str = "skymirror.v1.Store";

/// How long shutdown waits for the daemon's tasks (streams, forwarders) to end.
const TASKS_GRACE: Duration = Duration::from_secs(5);

impl From<DaemonError> for tonic::Status {
    fn from(e: DaemonError) -> Self {
        let message = e.to_string();
        match e {
            DaemonError::Invalid(_) | DaemonError::BadRequest(_) => {
                tonic::Status::invalid_argument(message)
            }
            DaemonError::NotFound(_) => tonic::Status::not_found(message),
            DaemonError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            DaemonError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            DaemonError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            DaemonError::Conflict(_) => tonic::Status::already_exists(message),
            DaemonError::Pki(crate::security::PkiError::BadRequest(_)) => {
                tonic::Status::invalid_argument(message)
            }
            DaemonError::Pki(crate::security::PkiError::NoIssuer) => {
                tonic::Status::failed_precondition(message)
            }
            DaemonError::Cancelled(_) => tonic::Status::cancelled(message),
            DaemonError::Store(crate::store::StoreError::Unwritable(_)) => {
                tonic::Status::unavailable(message)
            }
            DaemonError::Store(_)
            | DaemonError::Randomness(_)
            | DaemonError::Pki(_)
            | DaemonError::Serve(_) => tonic::Status::internal(message),
        }
    }
}

/// Serves an already-built daemon context on `listener` until `shutdown`
/// completes; see [`crate::daemon::run`]. With a PKI the listener serves TLS
/// and every control call needs a token; without one it serves plaintext
/// (loopback) and callers without a token are admins.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let tls = daemon.security.pki.is_some();
    serve_on(
        daemon,
        vec![Listener {
            socket: listener,
            tls,
            anonymous: (!tls).then_some(Role::Admin),
        }],
        shutdown,
    )
    .await
}

/// Serves an already-built daemon context on every listener until
/// `shutdown` completes, then stops its loops and joins its tasks.
pub async fn serve_on(
    daemon: Arc<Daemon>,
    listeners: Vec<Listener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.socket.local_addr().ok())
        .collect();
    if listeners.iter().any(|l| l.tls) && daemon.security.pki.is_none() {
        return Err(DaemonError::Serve(
            "a TLS listener needs the daemon's PKI".into(),
        ));
    }
    let token = daemon.shutdown.clone();
    daemon
        .tasks
        .spawn(daemon.clone().reconcile_loop(token.clone()));
    daemon
        .tasks
        .spawn(daemon.clone().liveness_loop(token.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::control_service_server::ControlServiceServer<control::ControlApi>>()
        .await;
    health_reporter
        .set_serving::<pb::agent_service_server::AgentServiceServer<agents::AgentApi>>()
        .await;
    // `skymirror.v1.Store` says whether writes are accepted (see
    // `DaemonStatus.store_writable`); the services stay SERVING for reads.
    let mut writable = daemon.writable.subscribe();
    let store_health = health_reporter.clone();
    let stop_health = token.clone();
    daemon.tasks.spawn(async move {
        loop {
            let status = if *writable.borrow_and_update() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            store_health.set_service_status(STORE_HEALTH, status).await;
            tokio::select! {
                _ = stop_health.cancelled() => return,
                changed = writable.changed() => if changed.is_err() { return },
            }
        }
    });
    // Both versions of reflection: grpcurl and grpcui speak v1, the Python
    // grpcio-reflection client and older grpcurl only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(skymirror_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| DaemonError::Serve(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| DaemonError::Serve(format!("reflection: {e}")))?;

    daemon.record(vec![NewEvent::daemon(
        EventReason::DaemonStarted,
        &daemon.daemon_id,
        format!(
            "daemon {} started on {}",
            daemon.daemon_id,
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )]);
    tracing::info!(addrs = ?addrs, daemon_id = %daemon.daemon_id, "serving");

    // One signal stops every listener.
    let stop = token.clone();
    let closing = daemon.clone();
    let stopping = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop.cancelled() => {}
        }
        stop.cancel();
        // Close agent streams so graceful shutdown is not held open by them.
        closing.registry.close_all();
    });
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .layer(auth::AuthLayer::new(daemon.clone(), listener.anonymous))
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(control::ControlApi::server(daemon.clone()))
            .add_service(agents::AgentApi::server(daemon.clone()));
        let stop = token.clone();
        let done = async move { stop.cancelled().await };
        if listener.tls {
            let config = daemon
                .security
                .pki
                .as_ref()
                .map(|p| p.server_config())
                .ok_or_else(|| {
                    DaemonError::Serve("a TLS listener needs the daemon's PKI".into())
                })?;
            let incoming = tls::incoming(daemon.clone(), listener.socket, config, token.clone());
            servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, done).await });
        } else {
            // No Nagle: small gRPC frames would wait out the peer's delayed ACK.
            let incoming =
                tokio_stream::wrappers::TcpListenerStream::new(listener.socket).map(|conn| {
                    if let Ok(c) = &conn {
                        let _ = c.set_nodelay(true);
                    }
                    conn
                });
            servers.spawn(async move { router.serve_with_incoming_shutdown(incoming, done).await });
        }
    }
    let mut result = Ok(());
    while let Some(ended) = servers.join_next().await {
        let outcome = match ended {
            Ok(r) => r.map_err(|e| DaemonError::Serve(e.to_string())),
            Err(e) => Err(DaemonError::Serve(format!("server task: {e}"))),
        };
        if outcome.is_err() {
            // One listener failing stops them all.
            token.cancel();
            if result.is_ok() {
                result = outcome;
            }
        }
    }
    let _ = stopping.await;
    token.cancel();
    daemon.tasks.close();
    if tokio::time::timeout(TASKS_GRACE, daemon.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = daemon.tasks.len(),
            "tasks still running after {TASKS_GRACE:?}; stopping without them"
        );
    }
    let store = daemon.store.clone();
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "final flush failed"),
        Err(e) => tracing::warn!(error = %e, "final flush task failed"),
    }
    result
}
