//! `ControlService`: what the CLI and any other client use.
//!
//! Boundary: converts between wire types and the daemon's domain; the logic
//! lives beside each concern (`apply.rs`, `controls.rs`, `explain.rs`,
//! `summary.rs`, `logs.rs`). Streams it opens are tracked by the daemon's
//! task tracker and end with it.

use std::pin::Pin;
use std::sync::Arc;

use skymirror_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{
    app_to_pb, certificate_to_pb, change_to_pb, daemon_status_to_pb, event_to_pb,
    explanation_to_pb, log_chunk_to_pb, logs_query_from_pb, provider_status_to_pb, provider_to_pb,
    replica_to_pb, result_to_pb, role_from_pb, routes_to_pb, summary_to_pb, token_to_pb,
};
use crate::access::Caller;
use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{Event, ProviderControl};
use crate::spec::{self, Kind};

/// Largest request the control API accepts (a 1 MiB spec file plus framing).
pub const MAX_CONTROL_MESSAGE: usize = 2 * 1024 * 1024;
/// Events read from the store per batch when replaying.
const REPLAY_BATCH: usize = 512;

/// The `ControlService` implementation.
#[derive(Debug, Clone)]
pub struct ControlApi {
    daemon: Arc<Daemon>,
}

impl ControlApi {
    /// The tonic service around a daemon context.
    pub fn server(daemon: Arc<Daemon>) -> pb::control_service_server::ControlServiceServer<Self> {
        pb::control_service_server::ControlServiceServer::new(ControlApi { daemon })
            .max_decoding_message_size(MAX_CONTROL_MESSAGE)
    }
}

fn source_name(source: &str) -> &str {
    if source.is_empty() { "<input>" } else { source }
}

fn targets_from_request(req: &pb::DeleteRequest) -> Result<Vec<(Kind, String)>, DaemonError> {
    if !req.content.is_empty() {
        let docs = spec::parse_documents(source_name(&req.source), &req.content)?;
        return Ok(docs
            .iter()
            .map(|d| (d.document.kind(), d.document.name().to_string()))
            .collect());
    }
    let kind: Kind = req.kind.parse().map_err(|_| {
        DaemonError::BadRequest(format!(
            "unknown kind {:?}; expected App or Provider",
            req.kind
        ))
    })?;
    if req.name.is_empty() {
        return Err(DaemonError::BadRequest(
            "delete needs documents or a kind and a name".into(),
        ));
    }
    Ok(vec![(kind, req.name.clone())])
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;
type RouteStream = Pin<Box<dyn Stream<Item = Result<pb::RoutingTable, Status>> + Send>>;
type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

/// Bytes per piece of a backup.
const BACKUP_CHUNK: usize = 1024 * 1024;

/// Who called, as the authentication layer established it; a request that
/// did not pass through it (an in-process test) is an admin's.
fn caller_of<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller {
            token_id: None,
            role: crate::security::Role::Admin,
        })
}

fn event_matches(req: &pb::WatchEventsRequest, e: &Event) -> bool {
    (req.app.is_empty() || e.event.app == req.app)
        && (req.provider.is_empty() || e.event.provider == req.provider)
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    type WatchEventsStream = EventStream;
    type WatchRoutesStream = RouteStream;
    type LogsStream = LogStream;
    type BackupStream = BackupStream;

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let by = caller_of(&request);
        let req = request.into_inner();
        let role = role_from_pb(req.role()).ok_or_else(|| {
            DaemonError::BadRequest("a token needs a role: admin, viewer, edge or join".into())
        })?;
        let ttl = (req.ttl_seconds > 0).then(|| std::time::Duration::from_secs(req.ttl_seconds));
        let (token, secret) = self
            .daemon
            .create_token(role, ttl, &req.provider, &req.description, &by)
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_to_pb(&token, 0)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Ok(Response::new(pb::ListTokensResponse {
            tokens: self
                .daemon
                .list_tokens()?
                .iter()
                .map(|(t, used)| token_to_pb(t, *used))
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        let by = caller_of(&request);
        let message = self
            .daemon
            .revoke_token(&request.into_inner().id, &by)
            .await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn list_agent_certificates(
        &self,
        _request: Request<pb::ListAgentCertificatesRequest>,
    ) -> Result<Response<pb::ListAgentCertificatesResponse>, Status> {
        Ok(Response::new(pb::ListAgentCertificatesResponse {
            certificates: self
                .daemon
                .list_certificates()?
                .iter()
                .map(certificate_to_pb)
                .collect(),
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        let by = caller_of(&request);
        let req = request.into_inner();
        let message = self
            .daemon
            .revoke_agent(&req.provider, &req.serial, &by)
            .await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn backup(
        &self,
        _request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let bytes = self.daemon.backup().await?;
        let chunks: Vec<Result<pb::BackupChunk, Status>> = bytes
            .chunks(BACKUP_CHUNK)
            .map(|c| Ok(pb::BackupChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let chunks = crate::logs::open(&self.daemon, logs_query_from_pb(request.into_inner()))?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(chunks).map(|c| Ok(log_chunk_to_pb(c))),
        )))
    }

    async fn watch_routes(
        &self,
        request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let edge = request.into_inner().edge_id;
        let daemon = self.daemon.clone();
        let mut table = daemon.routes.subscribe();
        let (tx, rx) = mpsc::channel(4);
        self.daemon.tasks.spawn(async move {
            tracing::info!(edge = %edge, "front door follows the routing table");
            loop {
                // Always the newest table: a slow front door skips intermediate ones.
                let current = routes_to_pb(&table.borrow_and_update());
                if tx.send(Ok(current)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = daemon.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = table.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        let req = request.into_inner();
        if req.provider.is_empty() {
            return Err(Status::invalid_argument(
                "failover needs the provider to serve from (--to)",
            ));
        }
        let message = self.daemon.set_pin(&req.app, Some(&req.provider)).await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn failback(
        &self,
        request: Request<pb::FailbackRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        let message = self.daemon.set_pin(&request.into_inner().app, None).await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn control_provider(
        &self,
        request: Request<pb::ControlProviderRequest>,
    ) -> Result<Response<pb::OperatorResponse>, Status> {
        let req = request.into_inner();
        let control = match req.control() {
            pb::ProviderControl::Cordon => ProviderControl::Cordon,
            pb::ProviderControl::Uncordon => ProviderControl::Uncordon,
            pb::ProviderControl::Drain => ProviderControl::Drain,
            pb::ProviderControl::Unspecified => {
                return Err(DaemonError::BadRequest(
                    "control must be cordon, uncordon or drain".into(),
                )
                .into());
            }
        };
        let message = self.daemon.control_provider(&req.provider, control).await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let explanation = self.daemon.explain(&request.into_inner().app)?;
        Ok(Response::new(explanation_to_pb(&explanation)))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let req = request.into_inner();
        let outcome = self
            .daemon
            .apply(source_name(&req.source), &req.content, req.dry_run)
            .await?;
        Ok(Response::new(pb::ApplyResponse {
            results: outcome.results.iter().map(result_to_pb).collect(),
            plan: outcome.changes.iter().map(change_to_pb).collect(),
            dry_run: req.dry_run,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let targets = targets_from_request(request.get_ref())?;
        let results = self.daemon.delete(targets).await?;
        Ok(Response::new(pb::DeleteResponse {
            results: results.iter().map(result_to_pb).collect(),
        }))
    }

    async fn list_apps(
        &self,
        request: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        let name = request.into_inner().name;
        let apps: Vec<_> = self
            .daemon
            .store
            .apps()
            .map_err(DaemonError::from)?
            .into_iter()
            .filter(|a| name.is_empty() || a.app.metadata.name == name)
            .collect();
        if !name.is_empty() && apps.is_empty() {
            return Err(DaemonError::NotFound(format!("app {name:?} not found")).into());
        }
        let view = self.daemon.read_view()?;
        Ok(Response::new(pb::ListAppsResponse {
            summaries: apps
                .iter()
                .map(|a| summary_to_pb(view.summary(a)))
                .collect(),
            apps: apps.iter().map(app_to_pb).collect(),
        }))
    }

    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let name = request.into_inner().name;
        let providers: Vec<_> = self
            .daemon
            .store
            .providers()
            .map_err(DaemonError::from)?
            .into_iter()
            .filter(|p| name.is_empty() || p.provider.metadata.name == name)
            .collect();
        if !name.is_empty() && providers.is_empty() {
            return Err(DaemonError::NotFound(format!("provider {name:?} not found")).into());
        }
        let view = self.daemon.read_view()?;
        Ok(Response::new(pb::ListProvidersResponse {
            statuses: providers
                .iter()
                .map(|p| provider_status_to_pb(view.provider_status(&p.provider.metadata.name)))
                .collect(),
            providers: providers.iter().map(provider_to_pb).collect(),
        }))
    }

    async fn list_replicas(
        &self,
        request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let req = request.into_inner();
        let replicas = self
            .daemon
            .registry
            .snapshot()
            .effective_replicas()
            .iter()
            .filter(|r| {
                (req.app.is_empty() || r.app == req.app)
                    && (req.provider.is_empty() || r.provider == req.provider)
            })
            .map(replica_to_pb)
            .collect();
        Ok(Response::new(pb::ListReplicasResponse { replicas }))
    }

    async fn get_app_status(
        &self,
        request: Request<pb::GetAppStatusRequest>,
    ) -> Result<Response<pb::AppStatus>, Status> {
        let name = request.into_inner().name;
        let Some(app) = self.daemon.store.app(&name).map_err(DaemonError::from)? else {
            return Err(DaemonError::NotFound(format!("app {name:?} not found")).into());
        };
        let view = self.daemon.read_view()?;
        let placements = view
            .shares(&name)
            .into_iter()
            .map(|(provider, replicas)| pb::ProviderPlacement {
                provider_state: provider_status_to_pb(view.provider_status(&provider)).state,
                provider,
                replicas,
            })
            .collect();
        let recent_events = self
            .daemon
            .store
            .last_events(crate::store::SledStore::EVENT_RETENTION as usize)
            .map_err(DaemonError::from)?
            .iter()
            .filter(|e| e.event.app == name)
            .rev()
            .take(20)
            .map(event_to_pb)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Ok(Response::new(pb::AppStatus {
            summary: Some(summary_to_pb(view.summary(&app))),
            app: Some(app_to_pb(&app)),
            placements,
            replicas: view
                .replicas
                .iter()
                .filter(|r| r.app == name)
                .map(replica_to_pb)
                .collect(),
            recent_events,
        }))
    }

    async fn get_daemon_status(
        &self,
        _request: Request<pb::GetDaemonStatusRequest>,
    ) -> Result<Response<pb::DaemonStatus>, Status> {
        Ok(Response::new(daemon_status_to_pb(
            &self.daemon.daemon_status()?,
        )))
    }

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        let daemon = self.daemon.clone();
        // Subscribe before reading the log so nothing recorded in between is missed.
        let mut live = daemon.events.subscribe();
        let mut after = req.after_seq;
        if req.tail > 0 {
            let last = daemon.store.last_event_seq().map_err(DaemonError::from)?;
            // `tail` counts matching events: walk back through the log.
            let all = daemon
                .store
                .last_events(crate::store::SledStore::EVENT_RETENTION as usize)
                .map_err(DaemonError::from)?;
            let matching: Vec<u64> = all
                .iter()
                .filter(|e| event_matches(&req, e))
                .map(|e| e.seq)
                .collect();
            let start = matching.len().saturating_sub(req.tail as usize);
            after = after.max(matching.get(start).map_or(last, |s| s.saturating_sub(1)));
        }
        let (tx, rx) = mpsc::channel(256);
        self.daemon.tasks.spawn(async move {
            // Replay, then follow; `after` is the last sequence number sent.
            loop {
                let batch = match daemon.store.events_after(after, REPLAY_BATCH) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                let n = batch.len();
                for e in batch {
                    after = e.seq;
                    if event_matches(&req, &e) && tx.send(Ok(event_to_pb(&e))).await.is_err() {
                        return;
                    }
                }
                if n < REPLAY_BATCH {
                    break;
                }
            }
            if !req.follow {
                return;
            }
            loop {
                let next = tokio::select! {
                    _ = daemon.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    next = live.recv() => next,
                };
                match next {
                    Ok(e) if e.seq <= after => {}
                    Ok(e) => {
                        after = e.seq;
                        if event_matches(&req, &e) && tx.send(Ok(event_to_pb(&e))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the fan-out: catch up from the log.
                        match daemon.store.events_after(after, usize::MAX) {
                            Ok(batch) => {
                                for e in batch {
                                    after = e.seq;
                                    if event_matches(&req, &e)
                                        && tx.send(Ok(event_to_pb(&e))).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
