//! Bounds on client connections: a global cap and a per-client cap, both
//! answered at once (an HTTP 503, or a close) rather than left to time out,
//! and an idle timeout that shrinks as the edge fills up.
//!
//! The global cap sits below the process's open-file limit, so the edge always
//! has descriptors left to accept (and refuse), to reach upstreams and to
//! follow the daemon: one client holding thousands of idle connections can
//! no longer starve every other client, nor the edge itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::http::ConnContext;

/// Shortest idle timeout, reached at the connection cap.
pub(crate) const IDLE_MIN: Duration = Duration::from_secs(1);
/// File descriptors kept out of the connection cap: listeners, probes, the
/// daemon's stream, logs.
const FD_RESERVE: usize = 256;
/// Connection cap when the open-file limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 4096;
/// Refusals being written at once; past it, refused connections are closed
/// without a word (a flood must not turn the refusals into the next leak).
const MAX_REFUSING: usize = 256;
/// How long a refused client gets to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The bounds in force.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most connections at once, in all.
    pub max_connections: usize,
    /// Most connections at once from one IP address.
    pub max_per_client: usize,
    /// Idle timeout while the edge is at most half full.
    pub idle_timeout: Duration,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The edge holds `max_connections`.
    Full,
    /// The client holds `max_per_client`.
    ClientFull,
}

/// Counts live connections (in all and per client) for the limits, and so
/// shutdown can wait for them.
#[derive(Debug)]
pub(crate) struct ConnTracker {
    limits: Limits,
    /// Connections open now.
    active: AtomicUsize,
    /// Connections open now per client address (only addresses with one).
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals being written now.
    refusing: AtomicUsize,
    /// Woken when the last connection ends.
    idle: Notify,
}

/// Held by a connection task; dropping it ends the connection's count.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    tracker: Arc<ConnTracker>,
    client: Option<IpAddr>,
}

impl ConnTracker {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            active: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Counts a new client connection from `client`, or says which limit
    /// refuses it.
    pub fn try_enter(self: &Arc<Self>, client: IpAddr) -> Result<ConnGuard, Refusal> {
        if self.active.load(Ordering::Relaxed) >= self.limits.max_connections {
            return Err(Refusal::Full);
        }
        {
            let mut per_client = self
                .per_client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = per_client.entry(client).or_insert(0);
            if *n >= self.limits.max_per_client {
                return Err(Refusal::ClientFull);
            }
            *n += 1;
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(ConnGuard {
            tracker: Arc::clone(self),
            client: Some(client),
        })
    }

    /// Counts a connection that no limit applies to (an upgraded connection,
    /// already counted as the client's HTTP connection until it upgraded).
    pub fn enter(self: &Arc<Self>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ConnGuard {
            tracker: Arc::clone(self),
            client: None,
        }
    }

    /// The idle timeout now: the configured one while at most half the
    /// connection cap is used, then shrinking in proportion to [`IDLE_MIN`] at
    /// the cap, so idle connections make room before anyone is refused.
    pub fn idle_timeout(&self) -> Duration {
        idle_timeout(self.limits, self.active.load(Ordering::Relaxed))
    }

    /// Waits until no connection is left.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            let mut per_client = self
                .tracker
                .per_client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = per_client.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    per_client.remove(&client);
                }
            }
        }
        if self.tracker.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// The idle timeout with `active` connections open (pure, for the tests).
fn idle_timeout(limits: Limits, active: usize) -> Duration {
    let cap = limits.max_connections.max(1);
    let half = cap / 2;
    if active <= half || limits.idle_timeout <= IDLE_MIN {
        return limits.idle_timeout;
    }
    // From the full timeout at half the cap down to IDLE_MIN at the cap.
    let left = cap.saturating_sub(active) as f64 / (cap - half).max(1) as f64;
    let span = limits.idle_timeout - IDLE_MIN;
    IDLE_MIN + span.mul_f64(left.clamp(0.0, 1.0))
}

/// Answers a refused HTTP connection with a 503 and closes it, in a task of
/// its own (bounded by [`MAX_REFUSING`]), reading what the client sends
/// meanwhile so the close does not reset the answer away.
pub(crate) fn refuse_http(mut stream: TcpStream, refusal: Refusal, tracker: &Arc<ConnTracker>) {
    if tracker.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        tracker.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let tracker = Arc::clone(tracker);
    tokio::spawn(async move {
        let body = match refusal {
            Refusal::Full => "skymirror edge: too many connections; try again\n",
            Refusal::ClientFull => {
                "skymirror edge: too many connections from your address; try again\n"
            }
        };
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let linger = async {
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
        tracker.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The default connection cap: half of what the open-file limit leaves after
/// [`FD_RESERVE`], since each client connection may hold an upstream one.
pub(crate) fn default_max_connections() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_files_limit(&limits))
        .map_or(FALLBACK_MAX_CONNECTIONS, |n| {
            (n.saturating_sub(FD_RESERVE) / 2).max(1)
        })
}

/// The soft "Max open files" of `/proc/self/limits`.
fn open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(usize::MAX / 4);
    }
    soft.parse().ok()
}

/// A client connection that notes every read and write in its context, for
/// the idle check (one relaxed add on a line only this connection uses).
#[derive(Debug)]
pub(crate) struct TrackedIo {
    stream: TcpStream,
    ctx: Arc<ConnContext>,
}

impl TrackedIo {
    pub fn new(stream: TcpStream, ctx: Arc<ConnContext>) -> Self {
        Self { stream, ctx }
    }

    fn touch(&self) {
        self.ctx.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if r.is_ready() {
            this.touch();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if r.is_ready() {
            this.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 100,
            max_per_client: 10,
            idle_timeout: Duration::from_secs(61),
        }
    }

    #[test]
    fn idle_timeout_shrinks_past_half_full() {
        let l = limits();
        assert_eq!(idle_timeout(l, 0), Duration::from_secs(61));
        assert_eq!(idle_timeout(l, 50), Duration::from_secs(61));
        assert_eq!(idle_timeout(l, 75), Duration::from_secs(31));
        assert_eq!(idle_timeout(l, 100), IDLE_MIN);
        assert_eq!(idle_timeout(l, 500), IDLE_MIN);
    }

    #[test]
    fn caps_in_all_and_per_client() {
        let t = Arc::new(ConnTracker::new(limits()));
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let mut held: Vec<ConnGuard> = (0..10)
            .map(|_| t.try_enter(a).expect("under the cap"))
            .collect();
        assert_eq!(t.try_enter(a).err(), Some(Refusal::ClientFull));
        held.pop();
        held.push(t.try_enter(a).expect("a slot freed"));
        for i in 0..9 {
            for _ in 0..10 {
                let ip = IpAddr::from([127, 1, 0, i]);
                held.push(t.try_enter(ip).expect("under the cap"));
            }
        }
        assert_eq!(t.try_enter(b).err(), Some(Refusal::Full));
        drop(held);
        assert!(t.per_client.lock().expect("lock").is_empty());
        assert!(t.try_enter(b).is_ok());
    }

    #[test]
    fn open_file_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            20000                524288               files\n";
        assert_eq!(open_files_limit(text), Some(20000));
        assert_eq!(open_files_limit("nothing"), None);
    }
}
