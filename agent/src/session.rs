//! The agent's side of `AgentService.Session`: dial the daemon, say hello,
//! heartbeat, report status, receive assignments, answer requests for replica
//! output; reconnect with backoff.
//!
//! Boundary: the session never touches replicas; it hands assignments and
//! requests for output to the supervisor and forwards what the supervisor
//! publishes. Losing the daemon therefore changes nothing that runs; it ends
//! every answer of the session.

use std::collections::HashMap;
use std::time::Duration;

use skymirror_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::convert::{DesiredSet, capabilities_to_wire};
use crate::driver::{Capabilities, LogOptions};
use crate::logs::LogsQuery;
use crate::random::{NoRandomness, full_jitter};
use crate::supervisor::{SupervisorHandle, longest_stop};

/// Who the agent is, for the hello.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Daemon URL, e.g. `http://127.0.0.1:7600`.
    pub server: String,
    /// Provider name.
    pub provider: String,
    /// Stable agent id.
    pub agent_id: String,
    /// Join token.
    pub join_token: String,
    /// Driver kind.
    pub driver: String,
    /// What the driver can do and how it must be driven.
    pub capabilities: Capabilities,
}

/// Reconnect backoff window: least, and largest. See [`Reconnect`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long was no fluke: its end starts a new outage.
/// A shorter one (the daemon dropped it at once: a second agent for the same
/// provider, a daemon failing right after its welcome) continues the outage
/// it interrupted, so it cannot make the agent retry at the fastest pace.
const HELD_SESSION: Duration = Duration::from_millis(500);
/// Heartbeat period until the daemon's welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// Requests for output answered at once per session; beyond it a request is
/// refused with an error, so a daemon cannot make the agent read without bound.
const MAX_LOG_REQUESTS: usize = 64;
/// Messages of replica output queued for the daemon (at most 64 KiB each);
/// readers wait for room.
const LOG_QUEUE: usize = 8;

/// What the session sends: heartbeats and status from `main`, and replica
/// output from `logs` only when `main` has nothing waiting, so reading output
/// never delays a heartbeat (a late one makes the provider suspect, and ends
/// singleton leases early). Ends with `main`.
struct Outbound {
    main: mpsc::Receiver<pb::AgentMessage>,
    logs: mpsc::Receiver<pb::AgentMessage>,
}

impl tokio_stream::Stream for Outbound {
    type Item = pb::AgentMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        match self.main.poll_recv(cx) {
            Poll::Pending => {}
            ready => return ready,
        }
        match self.logs.poll_recv(cx) {
            Poll::Ready(Some(message)) => Poll::Ready(Some(message)),
            // No reader holds a sender right now; `main` decides the end.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// When to try the daemon again: "full jitter" (AWS's *Exponential Backoff
/// and Jitter*), each wait drawn from the OS CSPRNG uniformly between zero
/// and the backoff window, so a fleet that lost its daemon together — all
/// PID 1 in their containers, all on the same schedule — does not come back
/// in the same millisecond.
///
/// The window is half the outage's age (the time since the daemon last
/// served a session that held), between [`BACKOFF_START`] and
/// [`BACKOFF_MAX`]. That grows it as exponential backoff does — retries
/// thin out in proportion to how long the daemon has been gone, so an outage
/// of length `L` costs each agent about `4·ln(L / 0.2 s)` attempts — but by
/// the clock, not by the attempt count: a run of short draws early in an
/// outage cannot inflate the window to seconds, so an agent out for a second
/// is back within half a second of the daemon's return. The cap stays well
/// below the daemon's reconnect grace after its own restart (10 s), so every
/// agent is back before it is judged.
#[derive(Debug, Clone, Copy)]
struct Reconnect {
    /// When the daemon was last known to serve: the end of the last session
    /// that held, or the agent's start.
    outage_began: tokio::time::Instant,
}

impl Reconnect {
    fn new(now: tokio::time::Instant) -> Self {
        Reconnect { outage_began: now }
    }

    /// A session ended at `now` after lasting `lasted`.
    fn session_ended(&mut self, lasted: Duration, now: tokio::time::Instant) {
        if lasted >= HELD_SESSION {
            self.outage_began = now;
        }
    }

    /// The window the next wait is drawn from.
    fn window(&self, now: tokio::time::Instant) -> Duration {
        (now.saturating_duration_since(self.outage_began) / 2).clamp(BACKOFF_START, BACKOFF_MAX)
    }
}

/// Keeps a session with the daemon until `shutdown`; fails only when the OS
/// gives no randomness for the reconnect jitter.
pub async fn run(
    identity: Identity,
    supervisor: SupervisorHandle,
    shutdown: CancellationToken,
) -> Result<(), NoRandomness> {
    let mut reconnect = Reconnect::new(tokio::time::Instant::now());
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = session(&identity, &supervisor) => r,
        };
        let now = tokio::time::Instant::now();
        if outcome.is_ok() {
            reconnect.session_ended(now.saturating_duration_since(started), now);
        }
        let wait = full_jitter(reconnect.window(now))?;
        match outcome {
            Ok(reason) => {
                tracing::warn!(reason = %reason, retry_in = ?wait, "session with the daemon ended; reconnecting")
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot hold a session with the daemon")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Why a session could not be held.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The daemon URL is malformed. Not retryable.
    #[error("invalid server URL {url:?}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// Cannot connect. Retryable.
    #[error("connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The daemon refused the session (bad token, unknown provider). Retried,
    /// since the operator may fix it on the daemon's side.
    #[error("the daemon refused the session: {}", .0.message())]
    Refused(tonic::Status),
}

async fn session(id: &Identity, sup: &SupervisorHandle) -> Result<String, SessionError> {
    let endpoint = Endpoint::from_shared(id.server.clone())
        .map_err(|source| SessionError::Url {
            url: id.server.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| SessionError::Connect {
            url: id.server.clone(),
            source,
        })?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);

    // Outbound queue: heartbeats and reports are produced only when there is
    // room (the producer awaits), so a slow daemon slows reporting, not memory.
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(32);
    let (logs_tx, logs_rx) = mpsc::channel::<pb::AgentMessage>(LOG_QUEUE);
    // Subscribe before the snapshot: a change in between then wakes the loop
    // (at worst for an empty delta) instead of waiting for the next change.
    let mut changes = sup.board.subscribe();
    let (replicas, revision, store) = sup.board.snapshot();
    // Revision of the last status the daemon was sent. Heartbeats carry this,
    // not the supervisor's newest revision: the daemon trusts replica states
    // as reflecting a revision only once it has received them.
    let mut reported_revision = revision;
    let mut reported_store = store.clone();
    let hello = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            provider: id.provider.clone(),
            agent_id: id.agent_id.clone(),
            join_token: id.join_token.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            driver: id.driver.clone(),
            replicas,
            applied_revision: revision,
            applied_store_id: store.store_id.clone(),
            applied_epoch: store.epoch,
            capabilities: Some(capabilities_to_wire(
                &id.capabilities,
                longest_stop(&id.capabilities),
            )),
        })),
    };
    if tx.send(hello).await.is_err() {
        return Ok("outbound queue closed".into());
    }
    let response = client
        .session(Outbound {
            main: rx,
            logs: logs_rx,
        })
        .await
        .map_err(SessionError::Refused)?;
    let mut inbound = response.into_inner();
    tracing::info!(server = %id.server, provider = %id.provider, "session established");

    // Send times of recent heartbeats: a lease runs from when the acknowledged
    // heartbeat was sent, so the agent's lease ends before the daemon's view of it.
    let mut sent: std::collections::VecDeque<(u64, tokio::time::Instant)> =
        std::collections::VecDeque::new();
    let mut seq: u64 = 0;
    // Answers to requests for output, by request id; each one's token ends it.
    // Dropping the guard when the session ends, however it ends, ends them all.
    let answers_stop = CancellationToken::new();
    let _answers_guard = answers_stop.clone().drop_guard();
    let mut answers: HashMap<u64, CancellationToken> = HashMap::new();
    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::DaemonMessage { message: Some(pb::daemon_message::Message::Welcome(w)) })) => {
                    let every = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(50)));
                    heartbeat = tokio::time::interval(every);
                    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    // The store's identity is for people here: assignments
                    // carry it too, and only they decide (see `supervisor::arrival`).
                    tracing::info!(daemon_id = %w.daemon_id, store_id = %w.store_id, epoch = w.epoch, heartbeat = ?every, "welcomed");
                }
                Ok(Some(pb::DaemonMessage { message: Some(pb::daemon_message::Message::Assignment(a)) })) => {
                    match DesiredSet::try_from(a.clone()) {
                        Ok(set) => sup.assign(set, a).await,
                        Err(e) => tracing::error!(error = %e, "rejected an invalid assignment; keeping the current one"),
                    }
                }
                Ok(Some(pb::DaemonMessage { message: Some(pb::daemon_message::Message::HeartbeatAck(ack)) })) => {
                    if let Some((_, at)) = sent.iter().find(|(s, _)| *s == ack.seq) {
                        sup.lease.renew(*at + Duration::from_millis(u64::from(ack.lease_ms)));
                    }
                }
                Ok(Some(pb::DaemonMessage { message: Some(pb::daemon_message::Message::LogsRequest(r)) })) => {
                    // Finished answers cancel their own tokens.
                    answers.retain(|_, token| !token.is_cancelled());
                    let refusal = if answers.len() >= MAX_LOG_REQUESTS {
                        Some(format!("provider {}: already answering {MAX_LOG_REQUESTS} requests for output; try again later", id.provider))
                    } else {
                        let cancel = answers_stop.child_token();
                        answers.insert(r.request_id, cancel.clone());
                        let query = LogsQuery {
                            request_id: r.request_id,
                            app: r.app,
                            index: r.index,
                            options: LogOptions::new(r.tail_lines, r.follow),
                            out: logs_tx.clone(),
                            cancel,
                        };
                        (!sup.logs(query).await).then(|| format!("provider {}: the agent is stopping", id.provider))
                    };
                    if let Some(error) = refusal {
                        let end = pb::ReplicaLogs { request_id: r.request_id, error, end: true, ..Default::default() };
                        if tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Logs(end)) }).await.is_err() {
                            return Ok("outbound queue closed".into());
                        }
                    }
                }
                Ok(Some(pb::DaemonMessage { message: Some(pb::daemon_message::Message::LogsCancel(c)) })) => {
                    if let Some(token) = answers.remove(&c.request_id) {
                        token.cancel();
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok("the daemon closed the stream".into()),
                Err(status) => return Ok(format!("stream failed: {}", status.message())),
            },
            _ = heartbeat.tick() => {
                seq += 1;
                sent.push_back((seq, tokio::time::Instant::now()));
                if sent.len() > 64 {
                    sent.pop_front();
                }
                let hb = pb::Heartbeat {
                    time_ms: now_ms(),
                    applied_revision: reported_revision,
                    seq,
                    applied_store_id: reported_store.store_id.clone(),
                    applied_epoch: reported_store.epoch,
                };
                if tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Heartbeat(hb)) }).await.is_err() {
                    return Ok("outbound queue closed".into());
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok("supervisor stopped".into());
                }
                let delta = sup.board.drain();
                if delta.replicas.is_empty()
                    && delta.removed.is_empty()
                    && delta.revision == reported_revision
                    && delta.store == reported_store
                {
                    continue;
                }
                reported_revision = delta.revision;
                reported_store = delta.store.clone();
                let report = pb::StatusReport {
                    replicas: delta.replicas,
                    full: false,
                    removed: delta.removed,
                    applied_revision: delta.revision,
                    applied_store_id: delta.store.store_id,
                    applied_epoch: delta.store.epoch,
                };
                if tx.send(pb::AgentMessage { message: Some(pb::agent_message::Message::Status(report)) }).await.is_err() {
                    return Ok("outbound queue closed".into());
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn heartbeat(seq: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            message: Some(pb::agent_message::Message::Heartbeat(pb::Heartbeat {
                seq,
                ..Default::default()
            })),
        }
    }

    fn output(request_id: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            message: Some(pb::agent_message::Message::Logs(pb::ReplicaLogs {
                request_id,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn the_reconnect_window_is_half_the_outages_age_within_bounds() {
        let began = tokio::time::Instant::now();
        let reconnect = Reconnect::new(began);
        let at = |ms: u64| began + Duration::from_millis(ms);
        assert_eq!(reconnect.window(began), BACKOFF_START);
        assert_eq!(reconnect.window(at(150)), BACKOFF_START);
        assert_eq!(reconnect.window(at(1000)), Duration::from_millis(500));
        assert_eq!(reconnect.window(at(4000)), Duration::from_secs(2));
        assert_eq!(reconnect.window(at(60_000)), BACKOFF_MAX);
    }

    #[test]
    fn only_a_session_that_held_starts_a_new_outage() {
        let began = tokio::time::Instant::now();
        let at = |ms: u64| began + Duration::from_millis(ms);
        let mut reconnect = Reconnect::new(began);
        // Dropped at once, twice: the outage that began at the start goes on.
        reconnect.session_ended(Duration::from_millis(20), at(3000));
        reconnect.session_ended(HELD_SESSION - Duration::from_millis(1), at(6000));
        assert_eq!(reconnect.window(at(6000)), Duration::from_secs(3));
        // A session that held: a new outage, retried densely again.
        reconnect.session_ended(HELD_SESSION, at(8000));
        assert_eq!(reconnect.window(at(8000)), BACKOFF_START);
        assert_eq!(reconnect.window(at(9000)), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn heartbeats_go_before_queued_output_and_end_the_stream() {
        let (tx, main) = mpsc::channel(4);
        let (logs_tx, logs) = mpsc::channel(4);
        let mut out = Outbound { main, logs };
        for id in 1..=3 {
            logs_tx.send(output(id)).await.expect("queue output");
        }
        tx.send(heartbeat(7)).await.expect("queue heartbeat");
        let first = out.next().await.expect("a message");
        assert_eq!(first, heartbeat(7), "the heartbeat jumps the queued output");
        assert_eq!(out.next().await, Some(output(1)));
        tx.send(heartbeat(8)).await.expect("queue heartbeat");
        assert_eq!(out.next().await, Some(heartbeat(8)));
        assert_eq!(out.next().await, Some(output(2)));
        // The session's end (its queue closed) ends the stream, output or not.
        drop(tx);
        assert_eq!(out.next().await, None);
    }
}
