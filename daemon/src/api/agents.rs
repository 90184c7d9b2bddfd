//! `AgentService`: joining, renewing a certificate, and one bidirectional
//! stream per agent.
//!
//! What an agent proved comes from its connection: on a TLS listener its
//! client certificate (verified by the TLS layer, `api::tls`), on a
//! plaintext loopback listener the join token in its hello. The first message
//! of a session must be a hello; the daemon admits the session
//! (`access.rs`, `reports.rs`), answers with a welcome and then, through the
//! reconciler, the provider's complete assignment. Every later message is
//! converted and handed to the core until the stream ends, is replaced by a
//! newer one of the same agent, is ended by the daemon (a revocation, a
//! flood) or the daemon stops; the reading task is tracked and joined on
//! shutdown.
//!
//! Boundary: converts wire messages only; it decides nothing.

use std::pin::Pin;
use std::sync::Arc;

use skymirror_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{from_agent_pb, hello_from_pb, to_agent_pb};
use crate::access::{AgentProof, JoinRequest};
use crate::daemon::Daemon;
use crate::reports::{FromAgent, HELLO_TIMEOUT};
use crate::security::PeerCertificate;
use crate::security::limits::{AGENT_MESSAGES, Bucket};
use crate::security::pki::Issued;

/// Largest message an agent may send.
pub const MAX_AGENT_MESSAGE: usize = 8 * 1024 * 1024;
/// Messages queued to one agent; see `registry::Session::tx`.
const OUTBOUND_QUEUE: usize = 16;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    daemon: Arc<Daemon>,
}

impl AgentApi {
    /// The tonic service around a daemon context.
    pub fn server(daemon: Arc<Daemon>) -> pb::agent_service_server::AgentServiceServer<Self> {
        pb::agent_service_server::AgentServiceServer::new(AgentApi { daemon })
            .max_decoding_message_size(MAX_AGENT_MESSAGE)
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::DaemonMessage, Status>> + Send>>;

/// Whether the request came over TLS, and the client certificate it
/// presented, if any.
fn tls_peer<T>(request: &Request<T>) -> Option<Option<Vec<u8>>> {
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    Some(
        info.peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec())),
    )
}

/// What an agent proved by its connection.
fn proof_of<T>(request: &Request<T>) -> AgentProof {
    match tls_peer(request) {
        None => AgentProof::HelloToken,
        Some(None) => AgentProof::Nothing,
        Some(Some(der)) => match PeerCertificate::parse(&der) {
            Ok(cert) => AgentProof::Certificate(cert),
            Err(e) => AgentProof::Unreadable(e.to_string()),
        },
    }
}

fn join_response(daemon: &Daemon, issued: Issued) -> pb::JoinResponse {
    pb::JoinResponse {
        certificate_pem: issued.pem,
        ca_pem: daemon
            .security
            .pki
            .as_ref()
            .map(|p| p.ca_pem().to_string())
            .unwrap_or_default(),
        not_after_ms: issued.record.not_after_ms,
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let proof = proof_of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on an agent stream must be hello",
            ));
        };
        let hello = hello_from_pb(hello);
        let provider = hello.provider.clone();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let daemon = self.daemon.clone();
        let connected = daemon.open_session(hello, tx, proof, peer).await?;
        let conn_id = connected.conn_id;
        let ended_by_daemon = connected.ended;

        self.daemon.tasks.spawn(async move {
            // Heartbeats and status reports; answers to requests for output
            // are bounded by the requests themselves.
            let mut rate = Bucket::new(AGENT_MESSAGES, tokio::time::Instant::now());
            let ended = loop {
                let next = tokio::select! {
                    _ = daemon.shutdown.cancelled() => break "daemon stopping".to_string(),
                    _ = ended_by_daemon.cancelled() => break "ended by the daemon".to_string(),
                    next = inbound.message() => next,
                };
                if !daemon.registry.is_current(&provider, conn_id) {
                    break "replaced by a newer stream".to_string();
                }
                match next {
                    Ok(Some(msg)) => {
                        let msg = from_agent_pb(&provider, msg);
                        if matches!(msg, FromAgent::Heartbeat { .. } | FromAgent::Status { .. })
                            && !rate.take(tokio::time::Instant::now())
                        {
                            let what = format!(
                                "sent more than {} heartbeats and status reports at once, or {}/s for long",
                                AGENT_MESSAGES.burst, AGENT_MESSAGES.per_second
                            );
                            daemon.agent_flooding(&provider, conn_id, &what);
                            break what;
                        }
                        daemon.agent_message(&provider, conn_id, msg);
                    }
                    Ok(None) => break "stream closed".to_string(),
                    Err(status) => break format!("stream failed: {}", status.message()),
                }
            };
            daemon.close_session(&provider, conn_id, &ended);
        });

        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m| Ok(to_agent_pb(&m))),
        )))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = request.remote_addr();
        if tls_peer(&request).is_none() {
            // A join token must never cross the network in the clear.
            return Err(Status::failed_precondition(
                "Join is served over TLS only: connect with https:// and the daemon's CA",
            ));
        }
        let req = request.into_inner();
        let issued = self
            .daemon
            .join(
                JoinRequest {
                    provider: req.provider,
                    agent_id: req.agent_id,
                    join_token: req.join_token,
                    csr_pem: req.csr_pem,
                },
                peer,
            )
            .await?;
        Ok(Response::new(join_response(&self.daemon, issued)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = request.remote_addr();
        let current = match proof_of(&request) {
            AgentProof::Certificate(c) => Some(c),
            AgentProof::Unreadable(why) => return Err(Status::unauthenticated(why)),
            AgentProof::HelloToken | AgentProof::Nothing => None,
        };
        let csr = request.into_inner().csr_pem;
        let issued = self.daemon.renew(current, &csr, peer).await?;
        Ok(Response::new(join_response(&self.daemon, issued)))
    }
}
