//! Following the daemon's routing table (`ControlService.WatchRoutes`).
//!
//! The stream sends the current table at once and a new full table on every
//! change. When the daemon is unreachable or the stream breaks, the follower
//! reconnects with backoff ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]) and
//! sends nothing meanwhile: the proxy keeps serving the last table it got.
//! A table with revision 0 (the daemon's placeholder before it has computed
//! one) is ignored for the same reason.

use std::time::Duration;

use skymirror_proto::v1 as pb;
use skymirror_proto::v1::control_service_client::ControlServiceClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::{EdgeConfig, EdgeError, serve};

/// First reconnect delay; also the delay after a stream that delivered tables.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Largest routing table accepted.
const MAX_TABLE_BYTES: usize = 64 * 1024 * 1024;

/// Runs the edge until `shutdown`: follows `WatchRoutes` on the daemon at
/// `config.server` and serves each table it receives (see [`serve`]).
///
/// Fails only on a daemon URL that cannot be used; an unreachable daemon is
/// retried for as long as the edge runs.
pub async fn run(config: EdgeConfig, shutdown: CancellationToken) -> Result<(), EdgeError> {
    let endpoint = Endpoint::from_shared(config.server.clone())
        .map_err(|e| EdgeError::InvalidServer {
            url: config.server.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let (tables, receiver) = watch::channel(None);
    let follower = follow(
        endpoint,
        config.server.clone(),
        config.edge_id.clone(),
        tables,
        shutdown.clone(),
    );
    let (_, served) = tokio::join!(follower, serve(receiver, config, shutdown));
    served
}

/// Feeds `tables` from the daemon until `shutdown`, reconnecting with backoff.
async fn follow(
    endpoint: Endpoint,
    url: String,
    edge_id: String,
    tables: watch::Sender<Option<pb::RoutingTable>>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut received = false;
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            r = follow_once(&endpoint, &url, &edge_id, &tables, &mut received) => r,
        };
        if received {
            backoff = BACKOFF_MIN;
        }
        match outcome {
            Ok(()) => {
                tracing::warn!(daemon = %url, retry_in = ?backoff, "routing table stream ended; serving the last table")
            }
            Err(e) => {
                tracing::warn!(daemon = %url, error = %e, retry_in = ?backoff, "routing table unavailable; serving the last table")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: forwards every table until the stream ends or fails.
async fn follow_once(
    endpoint: &Endpoint,
    url: &str,
    edge_id: &str,
    tables: &watch::Sender<Option<pb::RoutingTable>>,
    received: &mut bool,
) -> Result<(), EdgeError> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| EdgeError::Connect {
            url: url.to_string(),
            source,
        })?;
    let stream_error = |status: tonic::Status| EdgeError::Stream {
        url: url.to_string(),
        status: Box::new(status),
    };
    let mut client = ControlServiceClient::new(channel).max_decoding_message_size(MAX_TABLE_BYTES);
    let mut stream = client
        .watch_routes(pb::WatchRoutesRequest {
            edge_id: edge_id.to_string(),
        })
        .await
        .map_err(stream_error)?
        .into_inner();
    tracing::info!(daemon = %url, "following the routing table");
    while let Some(table) = stream.message().await.map_err(stream_error)? {
        *received = true;
        if table.revision == 0 {
            // Revisions start at 1: 0 is the daemon's placeholder before its
            // first reconcile pass, not an instruction to drop every route.
            tracing::debug!(daemon = %url, "ignoring a routing table with revision 0");
            continue;
        }
        // A reconnect usually brings the same table again: no churn for it.
        tables.send_if_modified(|current| {
            if current.as_ref() == Some(&table) {
                false
            } else {
                *current = Some(table);
                true
            }
        });
    }
    Ok(())
}
