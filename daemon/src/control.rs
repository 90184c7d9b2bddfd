//! `ControlService`: what the CLI and any other client use.
//!
//! Boundary: converts between wire types and the daemon's domain; the logic
//! lives in [`crate::daemon`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use skymirror_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{app_to_pb, event_to_pb, provider_to_pb, replica_to_pb};
use crate::daemon::{Daemon, lock};
use crate::error::DaemonError;
use crate::spec::{self, Kind};
use crate::store::{StoredApp, StoredAssignment, StoredEvent, StoredReplica};

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

    fn assignments(&self) -> Result<BTreeMap<String, StoredAssignment>, DaemonError> {
        Ok(self
            .daemon
            .store
            .assignments()?
            .into_iter()
            .map(|a| (a.provider.clone(), a))
            .collect())
    }

    fn replicas(&self) -> Vec<StoredReplica> {
        self.daemon.effective_replicas()
    }

    fn summary(
        &self,
        app: &StoredApp,
        assignments: &BTreeMap<String, StoredAssignment>,
        replicas: &[StoredReplica],
    ) -> pb::AppSummary {
        crate::daemon::summarize(app, assignments, replicas)
    }

    fn provider_status(
        &self,
        name: &str,
        assignments: &BTreeMap<String, StoredAssignment>,
        replicas: &[StoredReplica],
    ) -> pb::ProviderStatus {
        let assigned: u32 = assignments
            .get(name)
            .map_or(0, |a| a.apps.iter().map(|x| x.replicas).sum());
        let ready = u32::try_from(
            replicas
                .iter()
                .filter(|r| r.provider == name && r.ready)
                .count(),
        )
        .unwrap_or(u32::MAX);
        let mut status = pb::ProviderStatus {
            name: name.to_string(),
            assignment_revision: assignments.get(name).map_or(0, |a| a.revision),
            assigned_replicas: assigned,
            ready_replicas: ready,
            ..Default::default()
        };
        let (state, reason, since, held_out_until) = self.daemon.provider_liveness(name);
        status.state = state as i32;
        status.state_reason = reason;
        status.state_since_ms = since;
        status.held_out_until_ms = held_out_until;
        if let Ok(controls) = self.daemon.store.controls() {
            status.cordoned = controls.cordoned.contains(name);
            status.draining = controls.draining.contains(name);
        }
        if let Some(conn) = lock(&self.daemon.agents).get(name) {
            status.agent_id = conn.agent_id.clone();
            status.agent_version = conn.version.clone();
            status.last_heartbeat_ms = conn.last_seen_ms;
            status.applied_revision = conn.applied_revision;
        } else if let Some(seen) = lock(&self.daemon.seen).get(name) {
            status.agent_id = seen.agent_id.clone();
            status.agent_version = seen.version.clone();
            status.last_heartbeat_ms = seen.last_seen_ms;
            status.applied_revision = seen.applied_revision;
        }
        status
    }
}

fn targets_from_request(req: &pb::DeleteRequest) -> Result<Vec<(Kind, String)>, DaemonError> {
    if !req.content.is_empty() {
        let source = if req.source.is_empty() {
            "<input>"
        } else {
            &req.source
        };
        let docs = spec::parse_documents(source, &req.content)?;
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

fn event_matches(req: &pb::WatchEventsRequest, e: &StoredEvent) -> bool {
    (req.app.is_empty() || e.event.app == req.app)
        && (req.provider.is_empty() || e.event.provider == req.provider)
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    type WatchEventsStream = EventStream;
    type WatchRoutesStream = RouteStream;
    type LogsStream = LogStream;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let chunks = crate::logs::open(&self.daemon, request.into_inner())?;
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn watch_routes(
        &self,
        request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let edge = request.into_inner().edge_id;
        let daemon = self.daemon.clone();
        let mut table = daemon.routes.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            tracing::info!(edge = %edge, "front door follows the routing table");
            loop {
                // Always the newest table: a slow front door skips intermediate ones.
                let current = table.borrow_and_update().clone();
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
        let message = self
            .daemon
            .control_provider(&req.provider, req.control())
            .await?;
        Ok(Response::new(pb::OperatorResponse { message }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        Ok(Response::new(
            self.daemon.explain(&request.into_inner().app)?,
        ))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let req = request.into_inner();
        let source = if req.source.is_empty() {
            "<input>"
        } else {
            &req.source
        };
        let outcome = self.daemon.apply(source, &req.content, req.dry_run).await?;
        Ok(Response::new(pb::ApplyResponse {
            results: outcome.results,
            plan: outcome.plan,
            dry_run: req.dry_run,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let targets = targets_from_request(request.get_ref())?;
        let results = self.daemon.delete(targets).await?;
        Ok(Response::new(pb::DeleteResponse { results }))
    }

    async fn list_apps(
        &self,
        request: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        let name = request.into_inner().name;
        let apps: Vec<StoredApp> = self
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
        let assignments = self.assignments()?;
        let replicas = self.replicas();
        Ok(Response::new(pb::ListAppsResponse {
            summaries: apps
                .iter()
                .map(|a| self.summary(a, &assignments, &replicas))
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
        let assignments = self.assignments()?;
        let replicas = self.replicas();
        Ok(Response::new(pb::ListProvidersResponse {
            statuses: providers
                .iter()
                .map(|p| self.provider_status(&p.provider.metadata.name, &assignments, &replicas))
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
            .replicas()
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
        let assignments = self.assignments()?;
        let replicas = self.replicas();
        let placements = assignments
            .iter()
            .filter_map(|(provider, a)| {
                let share = a.apps.iter().find(|x| x.app == name)?;
                Some(pb::ProviderPlacement {
                    provider: provider.clone(),
                    replicas: share.replicas,
                    provider_state: self
                        .provider_status(provider, &assignments, &replicas)
                        .state,
                })
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
            summary: Some(self.summary(&app, &assignments, &replicas)),
            app: Some(app_to_pb(&app)),
            placements,
            replicas: replicas
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
        let d = &self.daemon;
        let stats = d.stats();
        let micros = |x: std::time::Duration| u64::try_from(x.as_micros()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            apps: u32::try_from(d.store.apps().map_err(DaemonError::from)?.len())
                .unwrap_or(u32::MAX),
            providers: u32::try_from(d.store.providers().map_err(DaemonError::from)?.len())
                .unwrap_or(u32::MAX),
            connected_agents: u32::try_from(lock(&d.agents).len()).unwrap_or(u32::MAX),
            replicas_reported: u32::try_from(self.replicas().len()).unwrap_or(u32::MAX),
            reconcile_passes: stats.passes,
            last_reconcile_micros: micros(stats.last),
            mean_reconcile_micros: micros(stats.total).checked_div(stats.passes).unwrap_or(0),
            max_reconcile_micros: micros(stats.max),
            store_bytes: d.store.size_on_disk().map_err(DaemonError::from)?,
            started_at_ms: d.started_at_ms,
            last_event_seq: d.store.last_event_seq().map_err(DaemonError::from)?,
        }))
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
        tokio::spawn(async move {
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
