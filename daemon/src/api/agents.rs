//! `AgentService`: one bidirectional stream per agent.
//!
//! The first message must be a hello; the daemon admits the session
//! (`reports.rs`), answers with a welcome and then, through the reconciler,
//! the provider's complete assignment. Every later message is converted and
//! handed to the core until the stream ends, is replaced by a newer one, or
//! the daemon stops; the reading task is tracked and joined on shutdown.
//!
//! Boundary: converts wire messages only; it decides nothing.

use std::pin::Pin;
use std::sync::Arc;

use skymirror_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{from_agent_pb, hello_from_pb, to_agent_pb};
use crate::daemon::Daemon;
use crate::reports::HELLO_TIMEOUT;

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

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
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
        let conn_id = daemon.open_session(hello, tx).await?;

        self.daemon.tasks.spawn(async move {
            let ended = loop {
                let next = tokio::select! {
                    _ = daemon.shutdown.cancelled() => break "daemon stopping".to_string(),
                    next = inbound.message() => next,
                };
                if !daemon.registry.is_current(&provider, conn_id) {
                    break "replaced by a newer stream".to_string();
                }
                match next {
                    Ok(Some(msg)) => {
                        daemon.agent_message(&provider, conn_id, from_agent_pb(&provider, msg));
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
}
