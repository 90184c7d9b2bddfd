//! The gRPC API: `ControlService` ([`control`]), `AgentService` ([`agents`]),
//! the standard health and reflection services, and [`serve`], which runs
//! them with the daemon's loops until shutdown.
//!
//! Boundary: protobuf types and `tonic::Status` appear only here (and in the
//! spec's own wire conversions); [`convert`] maps them to and from the
//! domain, and `From<DaemonError> for Status` is the one mapping of errors.

pub mod agents;
pub mod control;
pub mod convert;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::net::TcpListener;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{EventReason, NewEvent};

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
            DaemonError::Cancelled(_) => tonic::Status::cancelled(message),
            DaemonError::Store(crate::store::StoreError::Unwritable(_)) => {
                tonic::Status::unavailable(message)
            }
            DaemonError::Store(_) | DaemonError::Randomness(_) | DaemonError::Serve(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

/// Serves an already-built daemon context on `listener` until `shutdown`
/// completes; see [`crate::daemon::run`].
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(skymirror_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Serve(format!("reflection: {e}")))?;

    daemon.record(vec![NewEvent::daemon(
        EventReason::DaemonStarted,
        &daemon.daemon_id,
        format!(
            "daemon {} started on {}",
            daemon.daemon_id,
            addr.map_or_else(|| "?".to_string(), |a| a.to_string())
        ),
    )]);
    tracing::info!(addr = ?addr, daemon_id = %daemon.daemon_id, "serving");

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = token.clone();
    let closing = daemon.clone();
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(control::ControlApi::server(daemon.clone()))
        .add_service(agents::AgentApi::server(daemon.clone()))
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
            // Close agent streams so graceful shutdown is not held open by them.
            closing.registry.close_all();
        })
        .await
        .map_err(|e| DaemonError::Serve(e.to_string()));
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
