//! The TLS side of a listener: accepts TCP connections, runs each handshake
//! on a task of its own (bounded in number and time, so a slow or silent
//! client holds up nobody), and hands finished TLS streams to the gRPC
//! server. tonic reads a stream's client certificate from it
//! (`Request::peer_certs`).
//!
//! A failed handshake (a plaintext client on the TLS port, an untrusted
//! certificate, a client that never finishes) is counted and logged at the
//! refusal rate of its address.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::security::Counters;

/// Handshakes in progress at once; connections beyond wait in the kernel's
/// backlog.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished connections waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Accepts connections on `listener` until `stop` and yields them once their
/// TLS handshake (with `config`) completed. The accepting task and each
/// handshake are tracked by the daemon.
pub fn incoming(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (ready, rx) = mpsc::channel(READY_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let tasks = daemon.tasks.clone();
    tasks.spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = permits.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { return };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little
                        // rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let ready = ready.clone();
            let daemon = daemon.clone();
            let stop = stop.clone();
            daemon.tasks.clone().spawn(async move {
                let _permit = permit;
                let handshake = tokio::select! {
                    _ = stop.cancelled() => return,
                    h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => h,
                };
                let why = match handshake {
                    Ok(Ok(stream)) => {
                        // The server went away: the connection goes with it.
                        let _ = ready.send(Ok(stream)).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        let hint = if e.to_string().contains("InvalidContentType")
                            || e.to_string().contains("corrupt message")
                        {
                            " (a plaintext client on the TLS port? use https:// and the daemon's CA)"
                        } else {
                            ""
                        };
                        format!("TLS handshake failed: {e}{hint}")
                    }
                    Err(_) => format!(
                        "TLS handshake not finished within {}s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                };
                Counters::add(&daemon.security.counters.failed_handshakes, 1);
                let admitted =
                    daemon
                        .security
                        .refusals
                        .admit(&peer.ip().to_string(), 1, tokio::time::Instant::now());
                if admitted.allowed > 0 {
                    tracing::warn!(peer = %peer, "{why}");
                } else {
                    tracing::debug!(peer = %peer, "{why}");
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
