//! The agent registry: everything the daemon knows of each provider's agent
//! and of the replicas it reported, under one lock.
//!
//! One [`ProviderEntry`] per provider holds the live session (if any), what
//! was last heard from the agent, the provider's liveness and the outcome of
//! the daemon's own probes, and the replicas the agent reported. A pass takes
//! one [`Snapshot`] of all of it, so it decides on a world that existed at one
//! instant rather than on five maps read one after another.
//!
//! Boundary: the registry records; it decides nothing about placement and
//! knows no wire types. Messages to agents are [`ToAgent`] values that the
//! API layer turns into protobuf.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::liveness::{Liveness, ProviderLiveness};
use crate::model::{Assignment, DeclaredApp, DeclaredProvider, ReportedReplica, now_ms};
use crate::store::StoreIdentity;

/// Locks a std mutex, recovering the data if a panicking thread poisoned it:
/// everything it guards is rebuilt from the store and the agents' next reports.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the daemon sends an agent, in domain terms.
#[derive(Debug, Clone)]
pub enum ToAgent {
    /// The first message of a session.
    Welcome(Welcome),
    /// The provider's complete desired set.
    Assignment(Arc<AssignmentMessage>),
    /// A heartbeat was received; renews the agent's lease on its singletons.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
        /// How long the lease runs from the heartbeat's send time.
        lease: Duration,
    },
    /// Asks for a replica's output.
    LogsRequest(LogsRequest),
    /// Stops an earlier request for output.
    LogsCancel {
        /// The request's id.
        request_id: u64,
    },
}

/// The first message of a session.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// This daemon run's id.
    pub daemon_id: String,
    /// How often the agent must heartbeat.
    pub heartbeat_interval: Duration,
    /// The store's identity: agents order assignments only within one epoch.
    pub identity: StoreIdentity,
}

/// An assignment with what the agent needs to act on it: the apps it names
/// (their workloads and health checks) and the provider's driver settings.
#[derive(Debug, Clone)]
pub struct AssignmentMessage {
    /// The assignment.
    pub assignment: Assignment,
    /// The apps it names, by name.
    pub apps: BTreeMap<String, DeclaredApp>,
    /// The provider, for its driver settings; `None` once it was deleted.
    pub provider: Option<DeclaredProvider>,
    /// The store's identity (its epoch orders revisions).
    pub identity: StoreIdentity,
}

/// A request for replica output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsRequest {
    /// Ties the answers to the request.
    pub request_id: u64,
    /// App whose replicas' output is read.
    pub app: String,
    /// One replica, or every replica of the app on the provider.
    pub index: Option<u32>,
    /// The last this many lines (0: all the agent keeps).
    pub tail_lines: u32,
    /// Then new output until the replicas end.
    pub follow: bool,
}

/// What the agent said of its driver in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentCapabilities {
    /// The longest a stop of one replica can take; `None` when the agent did
    /// not say (an older agent: a local runtime).
    pub max_stop: Option<Duration>,
}

/// Who holds a session: what its agent proved when it opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIdentity {
    /// The agent's id (bound to its certificate when it has one).
    pub agent_id: String,
    /// Serial of the client certificate the session was opened with; `None`
    /// on a plaintext listener (the shared join token).
    pub serial: Option<String>,
}

/// A live session that a newer one may not replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// The agent holding it.
    pub agent_id: String,
    /// How long ago it was last heard from.
    pub heard_ago: Duration,
}

/// A session just registered.
#[derive(Debug)]
pub struct Connected {
    /// Its id.
    pub conn_id: u64,
    /// The session of the same agent it replaced, if any.
    pub replaced: Option<u64>,
    /// Cancelled when the daemon ends the session (a revocation, a flood, a
    /// deleted provider): the stream's reader stops at once.
    pub ended: CancellationToken,
}

/// A live agent session.
#[derive(Debug)]
pub struct Session {
    /// Tells this session from a later one of the same provider.
    pub conn_id: u64,
    /// What its agent proved.
    pub identity: SessionIdentity,
    /// Cancelled when the daemon ends the session.
    pub ended: CancellationToken,
    /// Messages to the agent. Bounded: a full queue means a slow agent, and
    /// an assignment is re-sent on a later pass rather than queued without bound.
    pub tx: mpsc::Sender<ToAgent>,
    /// Revision of the last assignment sent on this session.
    pub sent_revision: u64,
}

/// What was last heard from a provider's agent; kept after it disconnects.
#[derive(Debug, Clone)]
pub struct AgentSeen {
    /// The agent's stable id.
    pub agent_id: String,
    /// Agent software version.
    pub version: String,
    /// Last message, on tokio's clock (liveness, leases).
    pub last_seen: Instant,
    /// Last message, wall clock ms (display).
    pub last_seen_ms: i64,
    /// Revision the agent says it applied.
    pub applied_revision: u64,
    /// What its driver said of itself.
    pub capabilities: AgentCapabilities,
}

/// Everything known of one provider's agent and replicas: the live session
/// and what a snapshot copies.
#[derive(Debug, Default)]
pub struct ProviderEntry {
    /// The live session, if the agent is connected.
    pub session: Option<Session>,
    /// What a pass may read; `view.connected` follows `session`.
    pub view: ProviderView,
}

/// What is known of one provider besides its session's sender: what a
/// [`Snapshot`] holds.
#[derive(Debug, Clone, Default)]
pub struct ProviderView {
    /// Whether its agent holds a session now.
    pub connected: bool,
    /// What was last heard from its agent since this daemon started.
    pub seen: Option<AgentSeen>,
    /// Liveness state machine; `None` until the first liveness pass.
    pub liveness: Option<ProviderLiveness>,
    /// Wall-clock ms of the last liveness transition (display).
    pub liveness_since_ms: Option<i64>,
    /// Wall-clock ms until which the provider is held out (display).
    pub held_out_until_ms: i64,
    /// Whether some replica answered the daemon's last probe from outside
    /// (`None`: not probed, or nothing to probe).
    pub probe: Option<bool>,
    /// Replicas as last reported, by app and index.
    pub replicas: BTreeMap<(String, u32), ReportedReplica>,
    /// When the liveness loop first saw this provider's agent connected
    /// although the provider is no longer declared.
    pub deleted_since: Option<Instant>,
}

impl ProviderView {
    /// Whether the provider is declared down.
    pub fn is_down(&self) -> bool {
        self.liveness
            .as_ref()
            .is_some_and(|l| l.state == Liveness::Down)
    }

    /// Revision its agent says it applied (0 when never heard from).
    pub fn applied_revision(&self) -> u64 {
        self.seen.as_ref().map_or(0, |s| s.applied_revision)
    }
}

/// A consistent copy of the registry, taken under its lock at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per provider (declared or with a session).
    pub providers: BTreeMap<String, ProviderView>,
}

impl Snapshot {
    /// Reported replicas as the API shows them: a replica of a provider that
    /// is down is not ready, whatever it last reported, since nobody can tell.
    pub fn effective_replicas(&self) -> Vec<ReportedReplica> {
        let mut out = Vec::new();
        for view in self.providers.values() {
            let down = view.is_down();
            for r in view.replicas.values() {
                let mut r = r.clone();
                if down {
                    r.message = format!(
                        "provider {} is down; last reported {}",
                        r.provider,
                        r.state.as_str()
                    );
                    r.ready = false;
                }
                out.push(r);
            }
        }
        out
    }
}

/// The registry. See the module docs.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    providers: Mutex<BTreeMap<String, ProviderEntry>>,
    next_conn_id: std::sync::atomic::AtomicU64,
}

impl AgentRegistry {
    /// A registry holding the replicas a previous daemon run stored.
    pub fn new(replicas: Vec<ReportedReplica>) -> Self {
        let mut providers: BTreeMap<String, ProviderEntry> = BTreeMap::new();
        for r in replicas {
            providers
                .entry(r.provider.clone())
                .or_default()
                .view
                .replicas
                .insert((r.app.clone(), r.index), r);
        }
        AgentRegistry {
            providers: Mutex::new(providers),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Runs `f` on every entry under the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, ProviderEntry>) -> R) -> R {
        f(&mut lock(&self.providers))
    }

    /// A consistent copy of everything.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            providers: lock(&self.providers)
                .iter()
                .map(|(name, e)| (name.clone(), e.view.clone()))
                .collect(),
        }
    }

    /// Whether a new session of `agent_id` may take `provider`'s place: it
    /// may when no session is live, when the live one is the same agent's
    /// (a restarted agent whose old connection has not closed yet), or when
    /// the live one has been silent for `quiet_after` (it is gone). A second
    /// agent never silently takes over a provider whose agent is alive.
    pub fn may_connect(
        &self,
        provider: &str,
        agent_id: &str,
        quiet_after: Duration,
    ) -> Result<(), LiveSession> {
        may_replace(lock(&self.providers).get(provider), agent_id, quiet_after)
    }

    /// Registers a new session of `provider`'s agent if [`Self::may_connect`]
    /// allows it (checked again under the lock), replacing the live one.
    pub fn connect(
        &self,
        provider: &str,
        seen: AgentSeen,
        tx: mpsc::Sender<ToAgent>,
        identity: SessionIdentity,
        quiet_after: Duration,
    ) -> Result<Connected, LiveSession> {
        let mut providers = lock(&self.providers);
        may_replace(providers.get(provider), &identity.agent_id, quiet_after)?;
        let conn_id = self
            .next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ended = CancellationToken::new();
        let entry = providers.entry(provider.to_string()).or_default();
        let replaced = entry.session.replace(Session {
            conn_id,
            identity,
            ended: ended.clone(),
            tx,
            sent_revision: 0,
        });
        if let Some(old) = &replaced {
            old.ended.cancel();
        }
        entry.view.connected = true;
        entry.view.seen = Some(seen);
        Ok(Connected {
            conn_id,
            replaced: replaced.map(|s| s.conn_id),
            ended,
        })
    }

    /// Ends every session `which` picks (a revoked certificate, a deleted
    /// provider, a flood): its reader stops and its stream closes. Returns
    /// the provider, session id and agent of each.
    pub fn end_sessions(
        &self,
        which: impl Fn(&str, &Session) -> bool,
    ) -> Vec<(String, u64, String)> {
        let mut ended = Vec::new();
        for (provider, entry) in lock(&self.providers).iter_mut() {
            if entry.session.as_ref().is_some_and(|s| which(provider, s))
                && let Some(s) = entry.session.take()
            {
                s.ended.cancel();
                entry.view.connected = false;
                ended.push((provider.clone(), s.conn_id, s.identity.agent_id));
            }
        }
        ended
    }

    /// Ends session `conn_id` of `provider` if it is still the current one;
    /// says whether it was.
    pub fn disconnect(&self, provider: &str, conn_id: u64) -> bool {
        let mut providers = lock(&self.providers);
        match providers.get_mut(provider) {
            Some(e) if e.session.as_ref().is_some_and(|s| s.conn_id == conn_id) => {
                e.session = None;
                e.view.connected = false;
                true
            }
            _ => false,
        }
    }

    /// Whether `conn_id` is `provider`'s current session.
    pub fn is_current(&self, provider: &str, conn_id: u64) -> bool {
        lock(&self.providers)
            .get(provider)
            .and_then(|e| e.session.as_ref())
            .is_some_and(|s| s.conn_id == conn_id)
    }

    /// Records that session `conn_id` of `provider` was heard from, with the
    /// revision its agent applied, and acknowledges a heartbeat (`ack`).
    pub fn heard(&self, provider: &str, conn_id: u64, applied: Option<u64>, ack: Option<ToAgent>) {
        let mut providers = lock(&self.providers);
        let Some(entry) = providers.get_mut(provider) else {
            return;
        };
        let Some(session) = entry.session.as_ref().filter(|s| s.conn_id == conn_id) else {
            return;
        };
        if let Some(ack) = ack {
            // A full queue drops the ack: the agent's lease then lapses
            // sooner, which is the safe direction.
            let _ = session.tx.try_send(ack);
        }
        if let Some(seen) = &mut entry.view.seen {
            seen.last_seen = Instant::now();
            seen.last_seen_ms = now_ms();
            if let Some(rev) = applied {
                seen.applied_revision = seen.applied_revision.max(rev);
            }
        }
    }

    /// The sender and id of `provider`'s current session.
    pub fn session_of(&self, provider: &str) -> Option<(u64, mpsc::Sender<ToAgent>)> {
        lock(&self.providers)
            .get(provider)
            .and_then(|e| e.session.as_ref())
            .map(|s| (s.conn_id, s.tx.clone()))
    }

    /// Sends each connected agent its assignment when it has not been sent
    /// on the current session yet; `message` builds what is sent. A full
    /// queue leaves it for the next pass.
    pub fn send_assignments(
        &self,
        assignments: &BTreeMap<String, Assignment>,
        message: impl Fn(&str, &Assignment) -> Arc<AssignmentMessage>,
    ) {
        let mut providers = lock(&self.providers);
        for (provider, entry) in providers.iter_mut() {
            let (Some(session), Some(assignment)) =
                (entry.session.as_mut(), assignments.get(provider))
            else {
                continue;
            };
            let revision = assignment.revision;
            if session.sent_revision == revision {
                continue;
            }
            match session
                .tx
                .try_send(ToAgent::Assignment(message(provider, assignment)))
            {
                Ok(()) => {
                    session.sent_revision = revision;
                    tracing::debug!(provider, revision, "assignment sent");
                }
                Err(e) => {
                    tracing::warn!(provider, error = %e, "assignment not sent; retrying on the next pass");
                }
            }
        }
    }

    /// Ends every session (the daemon is stopping): dropping the senders lets
    /// the agents' response streams end, so graceful shutdown completes.
    pub fn close_all(&self) {
        for entry in lock(&self.providers).values_mut() {
            if let Some(s) = entry.session.take() {
                s.ended.cancel();
            }
            entry.view.connected = false;
        }
    }
}

/// See [`AgentRegistry::may_connect`].
fn may_replace(
    entry: Option<&ProviderEntry>,
    agent_id: &str,
    quiet_after: Duration,
) -> Result<(), LiveSession> {
    let Some(entry) = entry else { return Ok(()) };
    let Some(live) = &entry.session else {
        return Ok(());
    };
    if live.identity.agent_id == agent_id {
        return Ok(());
    }
    let heard_ago = entry
        .view
        .seen
        .as_ref()
        .map_or(Duration::MAX, |s| s.last_seen.elapsed());
    if heard_ago >= quiet_after {
        return Ok(());
    }
    Err(LiveSession {
        agent_id: live.identity.agent_id.clone(),
        heard_ago,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(agent: &str) -> AgentSeen {
        AgentSeen {
            agent_id: agent.into(),
            version: "0".into(),
            last_seen: Instant::now(),
            last_seen_ms: 0,
            applied_revision: 0,
            capabilities: AgentCapabilities { max_stop: None },
        }
    }

    fn identity(agent: &str) -> SessionIdentity {
        SessionIdentity {
            agent_id: agent.into(),
            serial: Some(format!("serial-of-{agent}")),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_agent_never_takes_over_a_live_provider() {
        let quiet = Duration::from_secs(1);
        let registry = AgentRegistry::new(Vec::new());
        let (tx, _rx) = mpsc::channel(4);
        let first = registry
            .connect("aa", seen("a1"), tx.clone(), identity("a1"), quiet)
            .expect("nobody holds aa");
        // Another agent while a1 is heard: refused, naming a1.
        let live = registry
            .connect("aa", seen("a2"), tx.clone(), identity("a2"), quiet)
            .expect_err("a1 is alive");
        assert_eq!(live.agent_id, "a1");
        assert!(registry.is_current("aa", first.conn_id));
        // The same agent again (it restarted): it replaces its old stream,
        // which is told to end.
        let again = registry
            .connect("aa", seen("a1"), tx.clone(), identity("a1"), quiet)
            .expect("the same agent");
        assert_eq!(again.replaced, Some(first.conn_id));
        assert!(first.ended.is_cancelled());
        // Once a1 is silent past the threshold, it is gone: a2 may take over.
        tokio::time::advance(quiet).await;
        let taken = registry
            .connect("aa", seen("a2"), tx.clone(), identity("a2"), quiet)
            .expect("a1 is silent");
        assert_eq!(taken.replaced, Some(again.conn_id));
        // Revoking a2's certificate ends its session.
        let ended =
            registry.end_sessions(|_, s| s.identity.serial.as_deref() == Some("serial-of-a2"));
        assert_eq!(
            ended,
            vec![("aa".to_string(), taken.conn_id, "a2".to_string())]
        );
        assert!(taken.ended.is_cancelled());
        assert!(!registry.snapshot().providers["aa"].connected);
    }
}
