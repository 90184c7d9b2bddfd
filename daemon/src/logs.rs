//! Replica output for `ControlService.Logs`, read through the agents that run
//! the replicas.
//!
//! [`open`] picks the providers that run (or are assigned) the app's
//! replicas and starts one forwarding task per provider. Each registers a
//! request id in [`LogRequests`] (under the registry lock of the agents, so a
//! request never waits on a stream that is already gone), asks the agent with
//! a `ReplicaLogsRequest`, and turns the agent's `ReplicaLogs` answers, which
//! the agent's stream hands over through [`deliver`], into `LogChunk`s for the
//! client. A provider whose agent cannot answer gets an error chunk naming it;
//! the other providers' output still streams.
//!
//! Ends: the agent's last answer (`end`) ends a provider's part; when the
//! client goes away (or a part cannot keep up), the part ends and the agent is
//! told to stop (`ReplicaLogsCancel`); when the agent's stream ends,
//! [`agent_gone`] drops its requests and their parts say so.
//!
//! Bounds: the agent's stream carries heartbeats and must never wait for a
//! client, so [`deliver`] never blocks: each request buffers at most
//! [`FEED_BUFFER`] answers (at most 64 KiB each); an answer that finds the
//! buffer full ends that request with an error instead. The client's stream
//! buffers [`CLIENT_BUFFER`] chunks; a slow client slows the forwarding tasks,
//! whose buffers then fill.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::registry::{LogsRequest, ToAgent, lock};

/// Answers one request buffers before the client reads them (see the module docs).
const FEED_BUFFER: usize = 64;
/// Chunks the client's stream buffers.
const CLIENT_BUFFER: usize = 32;
/// How long an agent's full queue may delay a request or a cancellation
/// before the daemon gives up on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence of an agent answering a request without `follow`.
const ANSWER_SILENCE: Duration = Duration::from_secs(30);
/// How long a cancelled request waits for the agent's `end` before the next
/// request forgets it anyway.
const FORGET_CANCELLED_AFTER: Duration = Duration::from_secs(60);

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsQuery {
    /// App whose replicas' output is read.
    pub app: String,
    /// Only replicas on this provider.
    pub provider: Option<String>,
    /// Only the replica with this index (on each provider).
    pub index: Option<u32>,
    /// The last this many lines of each replica (0: all that is kept).
    pub tail_lines: u32,
    /// Then new output until the replicas end.
    pub follow: bool,
}

/// One message of an agent's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAnswer {
    /// The request answered.
    pub request_id: u64,
    /// `app/provider/index` of the replica the data is from.
    pub replica: String,
    /// Output bytes.
    pub data: Vec<u8>,
    /// An error about the replica, if any.
    pub error: String,
    /// The answer is complete.
    pub end: bool,
}

/// A piece of output (or an error) for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// `app/provider/index`; empty for an error about a whole provider.
    pub replica: String,
    /// Provider the chunk is from.
    pub provider: String,
    /// Output bytes.
    pub data: Vec<u8>,
    /// An error, if any.
    pub error: String,
}

/// What the agent's stream hands a request's forwarding task.
#[derive(Debug)]
enum Feed {
    /// One message of the agent's answer.
    Answer(LogAnswer),
    /// The buffer was full: answers were dropped, and the request must end.
    Overflow,
}

/// A request sent to an agent.
#[derive(Debug)]
struct Waiter {
    /// Provider whose agent answers; answers from another are not accepted.
    provider: String,
    /// The agent stream that was asked; the request ends with it.
    conn_id: u64,
    /// Where answers go; `None` once the request was cancelled, while the
    /// agent's last answers may still arrive (they are dropped, and its `end`
    /// forgets the request).
    feed: Option<mpsc::Sender<Feed>>,
    /// When it was cancelled: an `end` that never comes (lost with a full
    /// queue) must not keep the entry for the life of the agent's stream.
    cancelled_at: Option<tokio::time::Instant>,
}

/// Open requests for replica output, by request id.
#[derive(Debug, Default)]
pub(crate) struct LogRequests {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
}

impl LogRequests {
    /// Registers a request to the agent stream `conn_id` of `provider`.
    fn register(&self, provider: &str, conn_id: u64) -> (u64, mpsc::Receiver<Feed>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(FEED_BUFFER);
        let mut waiting = lock(&self.waiting);
        waiting.retain(|_, w| {
            w.cancelled_at
                .is_none_or(|at| at.elapsed() < FORGET_CANCELLED_AFTER)
        });
        waiting.insert(
            id,
            Waiter {
                provider: provider.to_string(),
                conn_id,
                feed: Some(tx),
                cancelled_at: None,
            },
        );
        (id, rx)
    }

    /// Stops feeding a request whose answer has not ended, and says whether
    /// it was still open (so the agent must be told).
    fn cancel(&self, id: u64) -> bool {
        lock(&self.waiting).get_mut(&id).is_some_and(|w| {
            w.cancelled_at.get_or_insert_with(tokio::time::Instant::now);
            w.feed.take().is_some()
        })
    }

    /// Forgets a request.
    fn forget(&self, id: u64) {
        lock(&self.waiting).remove(&id);
    }

    /// Requests open on one agent stream.
    #[cfg(test)]
    fn open_on(&self, conn_id: u64) -> usize {
        lock(&self.waiting)
            .values()
            .filter(|w| w.conn_id == conn_id)
            .count()
    }
}

/// Hands an agent's answer to the request it answers. Never waits (it runs
/// on the agent's stream): a request whose buffer is full gets an overflow
/// notice instead, in the slot kept free for it.
pub(crate) fn deliver(daemon: &Daemon, provider: &str, conn_id: u64, answer: LogAnswer) {
    let mut waiting = lock(&daemon.log_requests.waiting);
    let id = answer.request_id;
    let Some(waiter) = waiting
        .get(&id)
        .filter(|w| w.provider == provider && w.conn_id == conn_id)
    else {
        tracing::debug!(
            provider,
            request_id = id,
            "answer to an unknown request for output ignored"
        );
        return;
    };
    let end = answer.end;
    if let Some(feed) = &waiter.feed {
        let feed_item = if end || feed.capacity() > 1 {
            Feed::Answer(answer)
        } else {
            Feed::Overflow
        };
        // Full only after an overflow notice, which ends the request anyway.
        let _ = feed.try_send(feed_item);
    }
    if end {
        waiting.remove(&id);
    }
}

/// Drops every request of an agent stream that ended or was replaced; their
/// forwarding tasks then report the agent gone.
pub(crate) fn agent_gone(daemon: &Daemon, provider: &str, conn_id: u64) {
    lock(&daemon.log_requests.waiting)
        .retain(|_, w| !(w.provider == provider && w.conn_id == conn_id));
}

/// Starts streaming the output of the replicas `request` names; the
/// receiver yields the chunks for the client. Fails for a request without an
/// app, for an unknown app, and when no provider runs the replicas named.
pub(crate) fn open(
    daemon: &Arc<Daemon>,
    request: LogsQuery,
) -> Result<mpsc::Receiver<LogChunk>, DaemonError> {
    let app = request.app.as_str();
    if app.is_empty() {
        return Err(DaemonError::BadRequest("logs needs an app name".into()));
    }
    if daemon.store.app(app)?.is_none() {
        return Err(DaemonError::NotFound(format!("app {app:?} not found")));
    }
    // Assigned, or still reporting replicas of the app (being removed, or on a
    // provider that lost its share): both may hold output worth reading.
    let mut providers: BTreeSet<String> = daemon
        .store
        .assignments()?
        .into_iter()
        .filter(|a| a.apps.iter().any(|x| x.app == app && x.replicas > 0))
        .map(|a| a.provider)
        .collect();
    providers.extend(daemon.registry.with(|entries| {
        entries
            .iter()
            .filter(|(_, e)| e.view.replicas.keys().any(|(a, _)| a == app))
            .map(|(provider, _)| provider.clone())
            .collect::<Vec<_>>()
    }));
    if let Some(provider) = &request.provider {
        if !providers.contains(provider) {
            let declared = daemon
                .store
                .providers()?
                .iter()
                .any(|p| &p.provider.metadata.name == provider);
            return Err(DaemonError::NotFound(if declared {
                format!("app {app} has no replicas on provider {provider}")
            } else {
                format!("provider {provider:?} not found")
            }));
        }
        providers = BTreeSet::from([provider.clone()]);
    }
    if providers.is_empty() {
        return Err(DaemonError::NotFound(format!(
            "app {app} has no replicas on any provider"
        )));
    }
    let (out, rx) = mpsc::channel(CLIENT_BUFFER);
    for provider in providers {
        daemon.tasks.spawn(forward(
            daemon.clone(),
            provider,
            request.clone(),
            out.clone(),
        ));
    }
    Ok(rx)
}

/// How a provider's part of a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The agent's answer is complete, or its stream is gone.
    Answered,
    /// Nobody reads any more (client gone, daemon stopping) or the part could
    /// not keep up: the agent must stop.
    Stopped,
}

/// Streams one provider's part of a request to the client.
async fn forward(
    daemon: Arc<Daemon>,
    provider: String,
    request: LogsQuery,
    out: mpsc::Sender<LogChunk>,
) {
    let error = |text: String| LogChunk {
        replica: String::new(),
        provider: provider.clone(),
        data: Vec::new(),
        error: text,
    };
    // Registered under the registry's lock: a request never waits on a
    // session that is already gone.
    let registered = daemon.registry.with(|entries| {
        entries
            .get(&provider)
            .and_then(|e| e.session.as_ref())
            .map(|session| {
                let (id, feed) = daemon.log_requests.register(&provider, session.conn_id);
                (id, feed, session.conn_id, session.tx.clone())
            })
    });
    let Some((id, mut feed, conn_id, agent)) = registered else {
        let _ = out
            .send(error(format!("provider {provider}: agent not connected")))
            .await;
        return;
    };
    let ask = ToAgent::LogsRequest(LogsRequest {
        request_id: id,
        app: request.app.clone(),
        index: request.index,
        tail_lines: request.tail_lines,
        follow: request.follow,
    });
    let asked = tokio::time::timeout(SEND_TIMEOUT, agent.send(ask)).await;
    // Holding the sender would keep the agent's stream open after it ends.
    drop(agent);
    if !matches!(asked, Ok(Ok(()))) {
        daemon.log_requests.forget(id);
        let text = match asked {
            Ok(_) => format!("provider {provider}: agent disconnected"),
            Err(_) => format!(
                "provider {provider}: the agent did not take the request within {SEND_TIMEOUT:?}"
            ),
        };
        let _ = out.send(error(text)).await;
        return;
    }
    tracing::debug!(%provider, request_id = id, app = %request.app, "reading replica output");

    let ended = loop {
        let next = tokio::select! {
            _ = daemon.shutdown.cancelled() => break Ended::Stopped,
            _ = out.closed() => break Ended::Stopped,
            next = feed.recv() => next,
            // An answer without `follow` always ends; an agent silent that
            // long is stuck, and the client must not wait for it forever.
            () = tokio::time::sleep(ANSWER_SILENCE), if !request.follow => {
                let text = format!(
                    "provider {provider}: the agent sent nothing for {ANSWER_SILENCE:?}; stopped"
                );
                let _ = out.send(error(text)).await;
                break Ended::Stopped;
            }
        };
        match next {
            Some(Feed::Answer(answer)) => {
                let end = answer.end;
                if !answer.data.is_empty() || !answer.error.is_empty() {
                    let chunk = LogChunk {
                        replica: answer.replica,
                        provider: provider.clone(),
                        data: answer.data,
                        error: answer.error,
                    };
                    if out.send(chunk).await.is_err() {
                        break Ended::Stopped;
                    }
                }
                if end {
                    break Ended::Answered;
                }
            }
            Some(Feed::Overflow) => {
                let text = format!(
                    "provider {provider}: output arrived faster than the client read it; stopped"
                );
                let _ = out.send(error(text)).await;
                break Ended::Stopped;
            }
            None => {
                let text =
                    format!("provider {provider}: agent disconnected before its output ended");
                let _ = out.send(error(text)).await;
                break Ended::Answered;
            }
        }
    };
    // A stopping daemon ends the agents' streams, and with them their answers.
    if ended == Ended::Stopped && !daemon.shutdown.is_cancelled() && daemon.log_requests.cancel(id)
    {
        let agent = daemon
            .registry
            .session_of(&provider)
            .filter(|(current, _)| *current == conn_id)
            .map(|(_, tx)| tx);
        if let Some(agent) = agent {
            let cancel = ToAgent::LogsCancel { request_id: id };
            if !matches!(
                tokio::time::timeout(SEND_TIMEOUT, agent.send(cancel)).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(%provider, request_id = id, "could not cancel a request for output; the agent's answers are dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u64, data: &str, end: bool) -> LogAnswer {
        LogAnswer {
            request_id: id,
            replica: "web/aa/0".into(),
            data: data.as_bytes().to_vec(),
            error: String::new(),
            end,
        }
    }

    fn daemon() -> (Arc<Daemon>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SledStore::open(&dir.path().join("store")).expect("store");
        let config = crate::daemon::DaemonConfig::new(dir.path().join("store"), "t".into());
        (Daemon::new(Arc::new(store), config).expect("daemon"), dir)
    }

    #[tokio::test]
    async fn answers_reach_only_their_request_and_a_full_buffer_overflows() {
        let (daemon, _dir) = daemon();
        let requests = &daemon.log_requests;
        let (id, mut feed) = requests.register("aa", 1);

        // From another provider or another stream of the same one: dropped.
        deliver(&daemon, "bb", 1, answer(id, "x", false));
        deliver(&daemon, "aa", 2, answer(id, "x", false));
        assert!(feed.try_recv().is_err());

        // Data fills all but one slot; the next answer finds it full.
        for _ in 0..FEED_BUFFER {
            deliver(&daemon, "aa", 1, answer(id, "x", false));
        }
        for _ in 0..FEED_BUFFER - 1 {
            assert!(matches!(feed.try_recv(), Ok(Feed::Answer(a)) if a.data == b"x"));
        }
        assert!(matches!(feed.try_recv(), Ok(Feed::Overflow)));
        assert!(feed.try_recv().is_err());

        // A cancelled request swallows answers until the agent's end.
        assert!(requests.cancel(id));
        assert!(!requests.cancel(id), "cancelled once");
        deliver(&daemon, "aa", 1, answer(id, "late", false));
        assert!(feed.try_recv().is_err());
        assert_eq!(requests.open_on(1), 1);
        deliver(&daemon, "aa", 1, answer(id, "", true));
        assert_eq!(requests.open_on(1), 0, "the end forgets the request");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_ends_a_request_without_follow_but_not_a_followed_one() {
        let (daemon, _dir) = daemon();
        let (agent_tx, mut agent_rx) = mpsc::channel(8);
        let seen = crate::registry::AgentSeen {
            agent_id: "a".into(),
            version: "0".into(),
            last_seen: tokio::time::Instant::now(),
            last_seen_ms: 0,
            applied_revision: 0,
            capabilities: crate::registry::AgentCapabilities { max_stop: None },
        };
        let identity = crate::registry::SessionIdentity {
            agent_id: "a".into(),
            serial: None,
        };
        let conn_id = daemon
            .registry
            .connect("aa", seen, agent_tx, identity, Duration::from_secs(1))
            .expect("no live session")
            .conn_id;
        assert_eq!(conn_id, 1);
        for follow in [false, true] {
            let request = LogsQuery {
                app: "web".into(),
                provider: None,
                index: None,
                tail_lines: 0,
                follow,
            };
            let (out, mut client) = mpsc::channel(8);
            let part = tokio::spawn(forward(daemon.clone(), "aa".into(), request, out));
            // The agent takes the request and never answers.
            assert!(
                agent_rx.recv().await.is_some(),
                "the request reaches the agent"
            );
            tokio::time::advance(ANSWER_SILENCE + Duration::from_secs(1)).await;
            if follow {
                tokio::task::yield_now().await;
                assert!(client.try_recv().is_err(), "a followed request waits");
                part.abort();
                continue;
            }
            let chunk = client.recv().await.expect("a chunk");
            assert!(chunk.error.contains("the agent sent nothing"), "{chunk:?}");
            part.await.expect("the part ends");
            // ... and the agent is told to stop.
            let cancel = agent_rx.recv().await.expect("a cancellation");
            assert!(matches!(cancel, ToAgent::LogsCancel { .. }), "{cancel:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_request_whose_end_never_comes_is_forgotten_later() {
        let (daemon, _dir) = daemon();
        let requests = &daemon.log_requests;
        let (id, _feed) = requests.register("aa", 1);
        assert!(requests.cancel(id));
        // Its end was lost: it stays a while, for late answers...
        tokio::time::advance(FORGET_CANCELLED_AFTER / 2).await;
        let _next = requests.register("aa", 1);
        assert_eq!(requests.open_on(1), 2);
        // ... and no longer.
        tokio::time::advance(FORGET_CANCELLED_AFTER).await;
        let _later = requests.register("aa", 1);
        assert_eq!(requests.open_on(1), 2, "the cancelled one is gone");
        assert!(!lock(&requests.waiting).contains_key(&id));
    }

    #[tokio::test]
    async fn the_end_is_delivered_even_to_a_full_buffer_and_a_gone_agent_closes_the_feed() {
        let (daemon, _dir) = daemon();
        let requests = &daemon.log_requests;
        let (first, mut feed) = requests.register("aa", 1);
        for _ in 0..FEED_BUFFER - 1 {
            deliver(&daemon, "aa", 1, answer(first, "x", false));
        }
        deliver(&daemon, "aa", 1, answer(first, "", true));
        let mut got = Vec::new();
        while let Ok(Feed::Answer(a)) = feed.try_recv() {
            got.push(a.end);
        }
        assert_eq!(got.len(), FEED_BUFFER);
        assert_eq!(got.last(), Some(&true));
        assert_eq!(requests.open_on(1), 0);

        let (_, mut feed) = requests.register("aa", 1);
        let (_, mut other) = requests.register("aa", 2);
        agent_gone(&daemon, "aa", 1);
        assert!(
            feed.recv().await.is_none(),
            "the feed closes with the stream"
        );
        assert_eq!(requests.open_on(2), 1, "another stream's request stays");
        assert!(other.try_recv().is_err());
    }
}
