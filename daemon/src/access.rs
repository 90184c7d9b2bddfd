//! Who may talk to the daemon, in its terms: bearer tokens (created, listed,
//! revoked, checked on every control call), agents joining with a join token
//! and renewing their certificates, agents admitted to a session by their
//! certificate (or, on a plaintext loopback listener, by the shared hello
//! token), revocation, and the record of every refusal.
//!
//! Every refusal is counted ([`crate::security::Counters`]), logged and, for
//! agents, recorded as an event; logs and events are rate-limited per peer
//! address so a client retrying a bad token in a loop cannot flood either.
//!
//! Boundary: decides who is admitted; knows no protobuf (the API layer
//! converts) and nothing of placement.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{EventReason, NewEvent, now_ms};
use crate::registry::{SessionIdentity, lock};
use crate::reports::Hello;
use crate::security::limits::{self, RateLimiter};
use crate::security::pki::Issued;
use crate::security::tokens::{self, rfc3339};
use crate::security::{
    AgentCertificate, ApiToken, Counters, MAX_AGENT_TEXT, PeerCertificate, Pki, Role, sanitize,
};
use crate::store::Batch;

/// Records of agent certificates and join tokens are forgotten this long
/// after they expired (revoked ones too: an expired certificate is refused
/// anyway).
const FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest agent id accepted.
pub const MAX_AGENT_ID: usize = 128;

/// The daemon's credentials and bounds (a part of the context).
#[derive(Debug)]
pub struct Security {
    /// TLS material and the CA; `None` on a plaintext daemon.
    pub(crate) pki: Option<Arc<Pki>>,
    /// Refusals and drops since start.
    pub(crate) counters: Counters,
    /// Events derived from each provider's reports.
    pub(crate) agent_events: RateLimiter,
    /// Refusals logged and recorded, per peer address.
    pub(crate) refusals: RateLimiter,
    /// Last accepted use of each token since the daemon started, ms.
    last_used: Mutex<HashMap<String, i64>>,
    /// Serializes writes of tokens and certificates (each reads, then
    /// rewrites a record).
    writes: tokio::sync::Mutex<()>,
}

impl Security {
    /// The part for a daemon with `pki` (or none).
    pub fn new(pki: Option<Arc<Pki>>) -> Self {
        Security {
            pki,
            counters: Counters::default(),
            agent_events: RateLimiter::new(limits::AGENT_EVENTS),
            refusals: RateLimiter::new(limits::REFUSALS),
            last_used: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
        }
    }
}

/// Who called a control method, as the API layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id; `None` for a caller without one on a listener that
    /// admits such callers (plaintext loopback).
    pub token_id: Option<String>,
    /// What the caller may do.
    pub role: Role,
}

impl Caller {
    /// How logs and events name the caller: `token 0123…`, `a local caller`.
    pub fn describe(&self) -> String {
        match &self.token_id {
            Some(id) => format!("token {id}"),
            None => "a caller without a token".into(),
        }
    }
}

/// What kind of request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `Join` or `Renew`.
    Join,
    /// An agent session.
    Session,
    /// A control call.
    Call,
}

/// How an agent proves who it is when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentProof {
    /// A plaintext listener: the shared join token in its hello.
    HelloToken,
    /// A TLS listener: its client certificate, verified by the TLS layer.
    Certificate(PeerCertificate),
    /// A TLS listener, and a client certificate that cannot be read.
    Unreadable(String),
    /// A TLS listener, and no client certificate.
    Nothing,
}

/// An agent's request to join.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Provider the agent runs for.
    pub provider: String,
    /// The agent's stable id.
    pub agent_id: String,
    /// The join token, `<id>.<secret>`.
    pub join_token: String,
    /// Its certificate request, PEM.
    pub csr_pem: String,
}

/// Why an agent id is not acceptable, if it is not.
pub fn agent_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_AGENT_ID {
        return Some(format!(
            "the agent id must be 1 to {MAX_AGENT_ID} characters, not {}",
            id.len()
        ));
    }
    id.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|c| {
            format!(
                "the agent id {:?} contains {c:?}: use letters, digits, '-', '_' and '.'",
                sanitize(id, 64)
            )
        })
}

/// A provider name from an agent, fit for logs and events: itself when it
/// is a valid name, a marked, escaped copy otherwise.
fn shown_provider(name: &str) -> String {
    if crate::spec::name_problem(name).is_none() {
        name.to_string()
    } else {
        format!("(invalid name {:?})", sanitize(name, 64))
    }
}

impl Daemon {
    /// The PKI, or why this daemon has none.
    fn pki(&self) -> Result<&Arc<Pki>, DaemonError> {
        self.security.pki.as_ref().ok_or_else(|| {
            DaemonError::FailedPrecondition(
                "this daemon serves plaintext on loopback and issues no certificates: agents are admitted by the shared join token in their hello".into(),
            )
        })
    }

    /// Counts a refusal, logs it and, for agents, records an event about
    /// `provider` — both at most at the refusal rate of `peer`.
    pub(crate) fn refuse(
        &self,
        what: Refused,
        peer: Option<SocketAddr>,
        provider: &str,
        message: &str,
    ) {
        let c = &self.security.counters;
        Counters::add(
            match what {
                Refused::Join => &c.refused_joins,
                Refused::Session => &c.refused_sessions,
                Refused::Call => &c.refused_calls,
            },
            1,
        );
        let source = peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string());
        let admitted = self.security.refusals.admit(&source, 1, Instant::now());
        if admitted.allowed == 0 {
            tracing::debug!(peer = %source, %message, "refused (not logged: over the rate)");
            return;
        }
        let unlogged = if admitted.dropped_before > 0 {
            format!(
                " ({} earlier refusals of {source} were counted, not logged)",
                admitted.dropped_before
            )
        } else {
            String::new()
        };
        tracing::warn!(peer = %source, "refused: {message}{unlogged}");
        let reason = match what {
            Refused::Join => EventReason::AgentJoinRefused,
            Refused::Session => EventReason::AgentSessionRefused,
            Refused::Call => return,
        };
        let shown = shown_provider(provider);
        let mut event = NewEvent::provider(
            reason,
            &shown,
            format!("{message} (from {source}){unlogged}"),
        );
        if shown != provider {
            event.provider = String::new();
        }
        self.record(vec![event]);
    }

    /// Checks a bearer token: its format, its secret, expiry and revocation.
    pub fn authenticate(&self, presented: &str) -> Result<ApiToken, tokens::TokenRefusal> {
        let (id, secret) = tokens::split(presented)?;
        let stored = self
            .store
            .token(id)
            .map_err(|_| tokens::TokenRefusal::Unknown { id: id.to_string() })?;
        let now = now_ms();
        tokens::check(id, secret, stored.as_ref(), now)?;
        let token = stored.ok_or_else(|| tokens::TokenRefusal::Unknown { id: id.to_string() })?;
        lock(&self.security.last_used).insert(token.id.clone(), now);
        Ok(token)
    }

    /// Creates a token of `role`, valid for `ttl` (`None`: the role's
    /// default), for `provider` (join tokens only); returns it and the whole
    /// token to show once.
    pub async fn create_token(
        &self,
        role: Role,
        ttl: Option<Duration>,
        provider: &str,
        description: &str,
        by: &Caller,
    ) -> Result<(ApiToken, String), DaemonError> {
        if !provider.is_empty() {
            if role != Role::Join {
                return Err(DaemonError::BadRequest(format!(
                    "only join tokens are for one provider; a {role} token is not"
                )));
            }
            if let Some(problem) = crate::spec::name_problem(provider) {
                return Err(DaemonError::BadRequest(format!("provider: {problem}")));
            }
        }
        if description.len() > MAX_AGENT_TEXT
            || description.chars().any(crate::security::is_unsafe_char)
        {
            return Err(DaemonError::BadRequest(format!(
                "the description must be at most {MAX_AGENT_TEXT} bytes of printable text"
            )));
        }
        let ttl = ttl.or(role.default_ttl());
        let _guard = self.security.writes.lock().await;
        let now = now_ms();
        let (token, secret) = tokens::new_token(role, ttl, provider, description, now)?;
        let forget = i64::try_from(FORGET_AFTER.as_millis()).unwrap_or(i64::MAX);
        let delete_tokens = self
            .store
            .tokens()?
            .into_iter()
            .filter(|t| t.expires_at_ms != 0 && t.expires_at_ms < now - forget)
            .map(|t| t.id)
            .collect();
        let expiry = if token.expires_at_ms == 0 {
            "no expiry".to_string()
        } else {
            format!("expires {}", rfc3339(token.expires_at_ms))
        };
        let scope = if provider.is_empty() {
            String::new()
        } else {
            format!(" for provider {provider}")
        };
        self.commit(Batch {
            put_tokens: vec![token.clone()],
            delete_tokens,
            events: vec![NewEvent::daemon(
                EventReason::TokenCreated,
                &token.id,
                format!(
                    "{} created {role} token {}{scope} ({expiry})",
                    by.describe(),
                    token.id
                ),
            )],
            ..Batch::default()
        })
        .await?;
        tracing::info!(token = %token.id, %role, by = %by.describe(), "token created");
        Ok((token, secret))
    }

    /// Every token with its last use since the daemon started (0: none).
    pub fn list_tokens(&self) -> Result<Vec<(ApiToken, i64)>, DaemonError> {
        let used = lock(&self.security.last_used).clone();
        Ok(self
            .store
            .tokens()?
            .into_iter()
            .map(|t| {
                let last = used.get(&t.id).copied().unwrap_or(0);
                (t, last)
            })
            .collect())
    }

    /// Revokes token `id`; says what it did.
    pub async fn revoke_token(&self, id: &str, by: &Caller) -> Result<String, DaemonError> {
        let _guard = self.security.writes.lock().await;
        let Some(mut token) = self.store.token(id)? else {
            return Err(DaemonError::NotFound(format!("token {id:?} not found")));
        };
        if token.revoked_at_ms != 0 {
            return Ok(format!(
                "token {id} was already revoked at {}",
                rfc3339(token.revoked_at_ms)
            ));
        }
        token.revoked_at_ms = now_ms();
        let message = format!("{} revoked {} token {id}", by.describe(), token.role);
        self.commit(Batch {
            put_tokens: vec![token],
            events: vec![NewEvent::daemon(
                EventReason::TokenRevoked,
                id,
                message.clone(),
            )],
            ..Batch::default()
        })
        .await?;
        tracing::info!(token = %id, by = %by.describe(), "token revoked");
        Ok(message)
    }

    /// Creates an admin token when none is usable (the first start, or every
    /// admin token was revoked or expired), writes it to `path` (0600) and
    /// returns it, to be shown once; `None` when one is usable.
    pub async fn bootstrap_admin_token(
        &self,
        path: &std::path::Path,
    ) -> Result<Option<String>, DaemonError> {
        let now = now_ms();
        if self
            .store
            .tokens()?
            .iter()
            .any(|t| t.role == Role::Admin && t.is_active(now))
        {
            return Ok(None);
        }
        let by = Caller {
            token_id: None,
            role: Role::Admin,
        };
        let description = format!("the first admin token, in {}", path.display());
        let (_, secret) = self
            .create_token(
                Role::Admin,
                None,
                "",
                &sanitize(&description, MAX_AGENT_TEXT),
                &by,
            )
            .await?;
        crate::security::pki::write_private(path, format!("{secret}\n").as_bytes())?;
        Ok(Some(secret))
    }

    /// An agent joins: checks its join token and provider, signs its
    /// certificate request, records the certificate.
    pub async fn join(
        &self,
        req: JoinRequest,
        peer: Option<SocketAddr>,
    ) -> Result<Issued, DaemonError> {
        let provider = req.provider.clone();
        let agent = sanitize(&req.agent_id, MAX_AGENT_ID);
        let refuse = |e: DaemonError| {
            self.refuse(
                Refused::Join,
                peer,
                &provider,
                &format!(
                    "join of agent {agent} for provider {} refused: {e}",
                    shown_provider(&provider)
                ),
            );
            e
        };
        let pki = self.pki().map_err(refuse)?.clone();
        if !pki.issues_agent_certificates() {
            return Err(refuse(crate::security::PkiError::NoIssuer.into()));
        }
        if let Some(problem) = crate::spec::name_problem(&req.provider) {
            return Err(refuse(DaemonError::BadRequest(format!(
                "provider: {problem}"
            ))));
        }
        if let Some(problem) = agent_id_problem(&req.agent_id) {
            return Err(refuse(DaemonError::BadRequest(problem)));
        }
        let token = self
            .authenticate(&req.join_token)
            .map_err(|e| refuse(DaemonError::Unauthenticated(format!("join token: {e}"))))?;
        if token.role != Role::Join {
            return Err(refuse(DaemonError::Unauthenticated(format!(
                "token {} is a {} token, not a join token (skymirror token create --role join)",
                token.id, token.role
            ))));
        }
        if !token.provider.is_empty() && token.provider != req.provider {
            return Err(refuse(DaemonError::Unauthenticated(format!(
                "join token {} is for provider {}, not {}",
                token.id, token.provider, req.provider
            ))));
        }
        if self
            .store
            .providers()?
            .iter()
            .all(|p| p.provider.metadata.name != req.provider)
        {
            return Err(refuse(DaemonError::FailedPrecondition(format!(
                "provider {:?} is not declared; apply a Provider document named {:?} first",
                req.provider, req.provider
            ))));
        }
        let _guard = self.security.writes.lock().await;
        let now = now_ms();
        let issued = pki
            .sign_agent(
                &req.provider,
                &req.agent_id,
                &req.csr_pem,
                format!("join token {}", token.id),
                now,
            )
            .map_err(|e| refuse(e.into()))?;
        let message = format!(
            "agent {} of provider {} joined with join token {}: certificate {} until {}",
            req.agent_id,
            req.provider,
            token.id,
            issued.record.serial,
            rfc3339(issued.record.not_after_ms)
        );
        self.record_issued(
            &issued,
            EventReason::AgentJoined,
            &req.provider,
            &message,
            now,
        )
        .await?;
        tracing::info!(provider = %req.provider, agent_id = %req.agent_id, serial = %issued.record.serial, "{message}");
        Ok(issued)
    }

    /// An agent renews its certificate: the one it connected with must be
    /// one this daemon knows, unexpired and not revoked.
    pub async fn renew(
        &self,
        current: Option<PeerCertificate>,
        csr_pem: &str,
        peer: Option<SocketAddr>,
    ) -> Result<Issued, DaemonError> {
        let provider = current
            .as_ref()
            .and_then(|c| c.provider.clone())
            .unwrap_or_default();
        let refuse = |e: DaemonError| {
            self.refuse(
                Refused::Join,
                peer,
                &provider,
                &format!("certificate renewal refused: {e}"),
            );
            e
        };
        let pki = self.pki().map_err(refuse)?.clone();
        if !pki.issues_agent_certificates() {
            return Err(refuse(crate::security::PkiError::NoIssuer.into()));
        }
        let Some(current) = current else {
            return Err(refuse(DaemonError::Unauthenticated(
                "renewing needs the current certificate: call Renew with mutual TLS".into(),
            )));
        };
        let now = now_ms();
        let record = self.known_certificate(&current, now).map_err(refuse)?;
        if self
            .store
            .providers()?
            .iter()
            .all(|p| p.provider.metadata.name != record.provider)
        {
            return Err(refuse(DaemonError::FailedPrecondition(format!(
                "provider {:?} is no longer declared",
                record.provider
            ))));
        }
        let _guard = self.security.writes.lock().await;
        let issued = pki
            .sign_agent(
                &record.provider,
                &record.agent_id,
                csr_pem,
                format!("renewal of {}", record.serial),
                now,
            )
            .map_err(|e| refuse(e.into()))?;
        let message = format!(
            "agent {} of provider {} renewed certificate {}: certificate {} until {}",
            record.agent_id,
            record.provider,
            record.serial,
            issued.record.serial,
            rfc3339(issued.record.not_after_ms)
        );
        self.record_issued(
            &issued,
            EventReason::AgentCertificateRenewed,
            &record.provider,
            &message,
            now,
        )
        .await?;
        tracing::info!(provider = %record.provider, serial = %issued.record.serial, "{message}");
        Ok(issued)
    }

    /// The record of a peer's certificate, if it may still be used at
    /// `now`: known (or, from an operator's CA, recorded now), unexpired and
    /// not revoked.
    fn known_certificate(
        &self,
        cert: &PeerCertificate,
        now: i64,
    ) -> Result<AgentCertificate, DaemonError> {
        let Some(provider) = &cert.provider else {
            return Err(DaemonError::Unauthenticated(format!(
                "client certificate {} names no provider ({}<name>)",
                cert.serial,
                crate::security::pki::PROVIDER_URI_PREFIX
            )));
        };
        let record = match self.store.certificate(&cert.serial)? {
            Some(r) => r,
            None if self
                .security
                .pki
                .as_ref()
                .is_some_and(|p| !p.issues_agent_certificates()) =>
            {
                // The operator's CA: its certificates are recorded at first
                // use, so they can be listed and revoked.
                AgentCertificate {
                    serial: cert.serial.clone(),
                    provider: provider.clone(),
                    agent_id: String::new(),
                    not_before_ms: cert.not_before_ms,
                    not_after_ms: cert.not_after_ms,
                    revoked_at_ms: 0,
                    issued_by: "operator's CA".into(),
                }
            }
            None => {
                return Err(DaemonError::Unauthenticated(format!(
                    "certificate {} of provider {provider} is not one this daemon issued (or it was forgotten): join again with a join token",
                    cert.serial
                )));
            }
        };
        if record.revoked_at_ms != 0 {
            return Err(DaemonError::Unauthenticated(format!(
                "certificate {} of provider {} was revoked at {}: join again with a new join token",
                record.serial,
                record.provider,
                rfc3339(record.revoked_at_ms)
            )));
        }
        if now >= cert.not_after_ms || now >= record.not_after_ms {
            return Err(DaemonError::Unauthenticated(format!(
                "certificate {} of provider {} expired at {}: join again with a join token",
                record.serial,
                record.provider,
                rfc3339(cert.not_after_ms.min(record.not_after_ms))
            )));
        }
        if record.provider != *provider {
            return Err(DaemonError::Unauthenticated(format!(
                "certificate {} names provider {provider}, but was issued for {}",
                record.serial, record.provider
            )));
        }
        Ok(record)
    }

    /// Stores an issued certificate (forgetting long-expired ones) with the
    /// event that says who got it and why, durably.
    async fn record_issued(
        &self,
        issued: &Issued,
        reason: EventReason,
        provider: &str,
        message: &str,
        now: i64,
    ) -> Result<(), DaemonError> {
        self.commit(Batch {
            put_certificates: vec![issued.record.clone()],
            delete_certificates: self.expired_certificates(now)?,
            events: vec![NewEvent::provider(reason, provider, message.to_string())],
            ..Batch::default()
        })
        .await
    }

    /// Serials of certificate records expired long enough to forget.
    fn expired_certificates(&self, now: i64) -> Result<Vec<String>, DaemonError> {
        let forget = i64::try_from(FORGET_AFTER.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .store
            .certificates()?
            .into_iter()
            .filter(|c| c.not_after_ms < now - forget)
            .map(|c| c.serial)
            .collect())
    }

    /// Decides whether `hello` may open a session with `proof`; returns
    /// who holds it. Refusals are counted, logged and recorded.
    pub(crate) async fn admit_agent(
        &self,
        hello: &Hello,
        proof: &AgentProof,
        peer: Option<SocketAddr>,
    ) -> Result<SessionIdentity, DaemonError> {
        let refuse = |e: DaemonError| {
            self.refuse(
                Refused::Session,
                peer,
                &hello.provider,
                &format!(
                    "session of agent {} for provider {} refused: {e}",
                    hello.agent_id,
                    shown_provider(&hello.provider)
                ),
            );
            e
        };
        let identity = match proof {
            AgentProof::HelloToken => {
                let Some(expected) = &self.config.hello_token else {
                    return Err(refuse(DaemonError::Unauthenticated(
                        "this listener admits no agent by join token: connect over TLS with a certificate (join first)".into(),
                    )));
                };
                if !secret_matches(&hello.join_token, expected) {
                    return Err(refuse(DaemonError::Unauthenticated(format!(
                        "agent {} for provider {}: invalid join token",
                        hello.agent_id,
                        shown_provider(&hello.provider)
                    ))));
                }
                SessionIdentity {
                    agent_id: hello.agent_id.clone(),
                    serial: None,
                }
            }
            AgentProof::Nothing => {
                return Err(refuse(DaemonError::Unauthenticated(
                    "agent sessions need a client certificate: join first (skymirror-agent with a join token and the daemon's CA pin)".into(),
                )));
            }
            AgentProof::Unreadable(why) => {
                return Err(refuse(DaemonError::Unauthenticated(why.clone())));
            }
            AgentProof::Certificate(cert) => {
                let record = self.known_certificate(cert, now_ms()).map_err(refuse)?;
                if record.provider != hello.provider {
                    return Err(refuse(DaemonError::PermissionDenied(format!(
                        "certificate {} is for provider {}; it cannot act for provider {}",
                        record.serial,
                        record.provider,
                        shown_provider(&hello.provider)
                    ))));
                }
                if !record.agent_id.is_empty() && record.agent_id != hello.agent_id {
                    return Err(refuse(DaemonError::PermissionDenied(format!(
                        "certificate {} was issued to agent {}, not {}",
                        record.serial, record.agent_id, hello.agent_id
                    ))));
                }
                if record.issued_by == "operator's CA"
                    && self.store.certificate(&record.serial)?.is_none()
                {
                    let _guard = self.security.writes.lock().await;
                    self.commit(Batch {
                        put_certificates: vec![record.clone()],
                        ..Batch::default()
                    })
                    .await?;
                }
                SessionIdentity {
                    agent_id: hello.agent_id.clone(),
                    serial: Some(record.serial),
                }
            }
        };
        Ok(identity)
    }

    /// Every recorded agent certificate.
    pub fn list_certificates(&self) -> Result<Vec<AgentCertificate>, DaemonError> {
        Ok(self.store.certificates()?)
    }

    /// Revokes the certificates of `provider`'s agents, or the one of
    /// `serial`, and ends the sessions opened with them; says what it did.
    pub async fn revoke_agent(
        &self,
        provider: &str,
        serial: &str,
        by: &Caller,
    ) -> Result<String, DaemonError> {
        if provider.is_empty() && serial.is_empty() {
            return Err(DaemonError::BadRequest(
                "revoke needs a provider or a certificate's serial".into(),
            ));
        }
        let guard = self.security.writes.lock().await;
        let now = now_ms();
        let mut revoked: Vec<AgentCertificate> = Vec::new();
        if serial.is_empty() {
            for mut c in self.store.certificates()? {
                if c.provider == provider && c.revoked_at_ms == 0 {
                    c.revoked_at_ms = now;
                    revoked.push(c);
                }
            }
        } else {
            let Some(mut c) = self.store.certificate(serial)? else {
                return Err(DaemonError::NotFound(format!(
                    "certificate {serial:?} not found (skymirror agent list shows them)"
                )));
            };
            if !provider.is_empty() && c.provider != provider {
                return Err(DaemonError::BadRequest(format!(
                    "certificate {serial} is of provider {}, not {provider}",
                    c.provider
                )));
            }
            if c.revoked_at_ms == 0 {
                c.revoked_at_ms = now;
                revoked.push(c);
            }
        }
        let serials: Vec<String> = revoked.iter().map(|c| c.serial.clone()).collect();
        let providers: std::collections::BTreeSet<String> =
            revoked.iter().map(|c| c.provider.clone()).collect();
        let mut events = Vec::new();
        for p in &providers {
            let mine: Vec<&str> = revoked
                .iter()
                .filter(|c| &c.provider == p)
                .map(|c| c.serial.as_str())
                .collect();
            events.push(NewEvent::provider(
                EventReason::AgentRevoked,
                p,
                format!(
                    "{} revoked {} certificate(s) of provider {p}: {}; sessions opened with them end and cannot reconnect",
                    by.describe(),
                    mine.len(),
                    mine.join(", ")
                ),
            ));
        }
        if !revoked.is_empty() {
            self.commit(Batch {
                put_certificates: revoked,
                events,
                ..Batch::default()
            })
            .await?;
        }
        drop(guard);
        // By provider, its session ends whatever it proved (on a plaintext
        // listener it holds no certificate); by serial, the sessions opened
        // with that certificate.
        let ended = self.registry.end_sessions(|p, s| {
            (serial.is_empty() && p == provider)
                || s.identity
                    .serial
                    .as_ref()
                    .is_some_and(|x| serials.contains(x))
        });
        for (p, conn_id, _) in &ended {
            crate::logs::agent_gone(self, p, *conn_id);
        }
        if !ended.is_empty() {
            self.wake();
        }
        let what = if serial.is_empty() {
            format!("provider {provider}")
        } else {
            format!("certificate {serial}")
        };
        let message = format!(
            "revoked {} certificate(s) of {what}; ended {} session(s){}",
            serials.len(),
            ended.len(),
            if self.security.pki.is_none() {
                " (this daemon admits agents by the shared join token: change it to keep them out)"
            } else {
                ""
            }
        );
        tracing::info!(by = %by.describe(), "{message}");
        Ok(message)
    }

    /// Holds writes of tokens and certificates off while a caller reads and
    /// rewrites them (a deletion revoking a provider's certificates).
    pub(crate) async fn security_writes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.security.writes.lock().await
    }

    /// Revokes every certificate of `provider` (it is being deleted): the
    /// records to commit with the deletion.
    pub(crate) fn revocations_of(
        &self,
        provider: &str,
    ) -> Result<Vec<AgentCertificate>, DaemonError> {
        let now = now_ms();
        Ok(self
            .store
            .certificates()?
            .into_iter()
            .filter(|c| c.provider == provider && c.revoked_at_ms == 0)
            .map(|mut c| {
                c.revoked_at_ms = now;
                c
            })
            .collect())
    }
}

/// Compares secrets in time independent of where they differ.
fn secret_matches(given: &str, expected: &str) -> bool {
    tokens::constant_time_eq(
        &tokens::sha256(given.as_bytes()),
        &tokens::sha256(expected.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_bounded_plain_text() {
        assert_eq!(agent_id_problem("3f2a-agent_1.local"), None);
        assert!(agent_id_problem("").is_some());
        assert!(agent_id_problem(&"a".repeat(MAX_AGENT_ID + 1)).is_some());
        let p = agent_id_problem("evil\u{1b}[2J").expect("refused");
        assert!(p.contains("\\u{1b}") && !p.contains('\u{1b}'), "{p}");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secret_matches("secret", "secret"));
        assert!(!secret_matches("secret", "secreT"));
        assert!(!secret_matches("secret", "secret2"));
        assert!(!secret_matches("", "x"));
    }

    #[test]
    fn invalid_provider_names_are_marked_in_logs() {
        assert_eq!(shown_provider("aws"), "aws");
        assert_eq!(shown_provider("A\u{7}"), "(invalid name \"A\\\\u{7}\")");
    }
}
