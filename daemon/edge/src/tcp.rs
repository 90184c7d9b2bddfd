//! TCP pass-through: pick an upstream, connect (ejecting and moving on when
//! the connect fails, up to [`MAX_ATTEMPTS`] upstreams), then copy bytes both
//! ways until either side closes, or the listener goes away and its grace
//! period ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::MAX_ATTEMPTS;
use super::routes::ListenerSlot;
use super::{CONNECTION_GRACE, EdgeStats};

/// Proxies one accepted connection.
pub(crate) async fn serve(
    mut inbound: TcpStream,
    slot: Arc<ListenerSlot>,
    stats: Arc<EdgeStats>,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    stats.count_request();
    let Some(route) = slot.current().tcp_route().cloned() else {
        return;
    };
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut n_tried = 0;
    let mut outbound = None;
    while n_tried < MAX_ATTEMPTS {
        let Some(index) = route.pick(&tried[..n_tried]) else {
            break;
        };
        if n_tried > 0 {
            stats.count_retry();
        }
        let upstream = &route.upstreams[index];
        let connect = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect(upstream.address.as_str()),
        );
        let error = tokio::select! {
            () = cancel.cancelled() => return,
            r = connect => match r {
                Ok(Ok(stream)) => {
                    outbound = Some((index, stream));
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connect timed out".to_string(),
            },
        };
        if upstream.health.eject() {
            stats.count_ejection();
            tracing::warn!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error, "upstream ejected: connect failed");
        }
        route.probe_provider_soon(index);
        tried[n_tried] = index;
        n_tried += 1;
    }
    let Some((index, mut outbound)) = outbound else {
        stats.count_failure();
        tracing::warn!(app = %route.app, attempts = n_tried, "tcp connection dropped: no upstream accepted it");
        return;
    };
    // Small writes (interactive protocols) must not wait for Nagle.
    let _ = outbound.set_nodelay(true);
    let upstream = &route.upstreams[index];
    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
    tokio::pin!(copy);
    // A closing listener (shutdown, table change) leaves the connection its
    // grace period, as an HTTP request in flight gets.
    let result = tokio::select! {
        r = &mut copy => Some(r),
        () = cancel.cancelled() => tokio::time::timeout(CONNECTION_GRACE, &mut copy).await.ok(),
    };
    if let Some(Err(e)) = result {
        tracing::debug!(app = %route.app, upstream = %upstream.address, replica = %upstream.replica, error = %e, "tcp connection ended with an error");
    }
}
