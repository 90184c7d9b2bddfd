//! The daemon's gRPC API answers stock gRPC clients, without the project's
//! CLI: health checks, server reflection, the agent handshake's refusals and
//! `Apply`'s invalid-argument errors. Each test runs the daemon library
//! in-process on `127.0.0.1:0` and ends by shutting it down, which must
//! complete within 5 s even with streams open.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use skymirror::daemon::DaemonConfig;
use skymirror_proto::v1 as pb;
use skymirror_proto::v1::agent_service_client::AgentServiceClient;
use skymirror_proto::v1::control_service_client::ControlServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const TOKEN: &str = "token";
const CONTROL: &str = "skymirror.v1.ControlService";
const AGENT: &str = "skymirror.v1.AgentService";
const HEALTH: &str = "grpc.health.v1.Health";
/// How long shutdown may take, open streams included.
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(5);

/// An in-process daemon on a loopback port.
struct TestDaemon {
    /// Keeps the data directory until the daemon has stopped.
    _dir: tempfile::TempDir,
    channel: Channel,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), skymirror::error::DaemonError>>,
}

impl TestDaemon {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let config = DaemonConfig::new(dir.path().join("store"), TOKEN.into());
        let task = tokio::spawn(skymirror::daemon::run(config, listener, async move {
            // A dropped sender stops the daemon too.
            let _ = stopped.await;
        }));
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to the daemon at {addr}"))?;
        Ok(TestDaemon {
            _dir: dir,
            channel,
            stop,
            task,
        })
    }

    /// Signals shutdown and requires `run` to return `Ok` within [`SHUTDOWN_WITHIN`].
    async fn shut_down(self) -> Result<()> {
        let TestDaemon {
            _dir, stop, task, ..
        } = self;
        // The receiver is gone only if the daemon already stopped; `task` says how.
        let _ = stop.send(());
        match tokio::time::timeout(SHUTDOWN_WITHIN, task).await {
            Err(_) => {
                bail!("the daemon did not stop within {SHUTDOWN_WITHIN:?} of the shutdown signal")
            }
            Ok(Err(join)) => bail!("the daemon task failed: {join}"),
            Ok(Ok(Err(e))) => bail!("run returned an error on shutdown: {e}"),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    fn control(&self) -> ControlServiceClient<Channel> {
        ControlServiceClient::new(self.channel.clone())
    }

    fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel.clone())
    }

    /// One reflection request on a fresh bidirectional stream; its one answer.
    async fn reflect(&self, request: MessageRequest) -> Result<MessageResponse> {
        let mut client = ServerReflectionClient::new(self.channel.clone());
        let mut answers = client
            .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request.clone()),
            }))
            .await
            .with_context(|| format!("reflection request {request:?}"))?
            .into_inner();
        answers
            .message()
            .await?
            .with_context(|| format!("no answer to reflection request {request:?}"))?
            .message_response
            .with_context(|| format!("empty answer to reflection request {request:?}"))
    }

    /// Applies `yaml` through `ControlService/Apply`.
    async fn apply(&self, source: &str, yaml: &str) -> Result<pb::ApplyResponse, tonic::Status> {
        self.control()
            .apply(pb::ApplyRequest {
                source: source.into(),
                content: yaml.into(),
                dry_run: false,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

fn hello(provider: &str, join_token: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            provider: provider.into(),
            agent_id: format!("test-agent-{provider}"),
            join_token: join_token.into(),
            version: "0.0.0-test".into(),
            driver: "process".into(),
            // No replicas running, no assignment applied yet.
            ..Default::default()
        })),
    }
}

const PROVIDER_AA: &str = "apiVersion: skymirror.dev/v1
kind: Provider
metadata:
  name: aa
spec:
  driver: process
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_both_services_serving() -> Result<()> {
    let d = TestDaemon::start().await?;
    let mut health = HealthClient::new(d.channel.clone());
    for service in [CONTROL, AGENT] {
        let answer: HealthCheckResponse = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .with_context(|| format!("grpc.health.v1.Health/Check for {service}"))?
            .into_inner();
        ensure!(
            answer.status() == ServingStatus::Serving,
            "{service} is {:?}, expected SERVING",
            answer.status()
        );
    }
    d.shut_down().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service() -> Result<()> {
    let d = TestDaemon::start().await?;
    let MessageResponse::ListServicesResponse(list) = d
        .reflect(MessageRequest::ListServices(String::new()))
        .await?
    else {
        bail!("ListServices was not answered with a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&str> = [CONTROL, AGENT, HEALTH]
        .into_iter()
        .filter(|want| !names.contains(want))
        .collect();
    // Expected to fail until the daemon also registers
    // `tonic_health::pb::FILE_DESCRIPTOR_SET` with its reflection service:
    // reflection lists only services whose descriptors it was given.
    ensure!(
        missing.is_empty(),
        "reflection ListServices lacks {missing:?}; it lists {names:?}"
    );
    d.shut_down().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_serves_the_control_service_descriptor() -> Result<()> {
    let d = TestDaemon::start().await?;
    let answer = d
        .reflect(MessageRequest::FileContainingSymbol(CONTROL.into()))
        .await?;
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        bail!("file_containing_symbol({CONTROL}) was answered with {answer:?}");
    };
    ensure!(
        !files.file_descriptor_proto.is_empty(),
        "file_containing_symbol({CONTROL}) returned no file descriptors"
    );
    // The encoded FileDescriptorProto holds the service's name as a string.
    ensure!(
        files.file_descriptor_proto.iter().any(|f| !f.is_empty()
            && f.windows(b"ControlService".len())
                .any(|w| w == b"ControlService")),
        "no descriptor returned for {CONTROL} defines ControlService ({} files, sizes {:?})",
        files.file_descriptor_proto.len(),
        files
            .file_descriptor_proto
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>()
    );
    d.shut_down().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sessions_are_refused_with_a_reason() -> Result<()> {
    let d = TestDaemon::start().await?;
    d.apply("providers.yaml", PROVIDER_AA)
        .await
        .context("applying provider aa")?;

    let refused = d
        .agents()
        .session(tokio_stream::once(hello("aa", "not-the-token")))
        .await;
    let status = match refused {
        Ok(_) => bail!("a session with a wrong join token was accepted"),
        Err(status) => status,
    };
    ensure!(
        status.code() == Code::Unauthenticated && status.message().contains("invalid join token"),
        "wrong join token: expected UNAUTHENTICATED naming the join token, got {:?}: {}",
        status.code(),
        status.message()
    );

    let refused = d
        .agents()
        .session(tokio_stream::once(hello("ghost", TOKEN)))
        .await;
    let status = match refused {
        Ok(_) => bail!("a session for an undeclared provider was accepted"),
        Err(status) => status,
    };
    ensure!(
        status.code() == Code::FailedPrecondition
            && status.message().contains("\"ghost\"")
            && status.message().contains("not declared"),
        "undeclared provider: expected FAILED_PRECONDITION naming \"ghost\", got {:?}: {}",
        status.code(),
        status.message()
    );
    d.shut_down().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_of_invalid_yaml_is_invalid_argument_naming_the_source() -> Result<()> {
    let d = TestDaemon::start().await?;
    let status = match d.apply("broken.yaml", "apiVersion: [\n").await {
        Ok(resp) => bail!("invalid YAML was applied: {resp:?}"),
        Err(status) => status,
    };
    ensure!(
        status.code() == Code::InvalidArgument
            && status
                .message()
                .starts_with("broken.yaml: document 1, line ")
            && status.message().contains("invalid YAML"),
        "expected INVALID_ARGUMENT starting with `broken.yaml: document 1, line `, got {:?}: {}",
        status.code(),
        status.message()
    );
    d.shut_down().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_graceful_with_open_streams() -> Result<()> {
    let d = TestDaemon::start().await?;
    d.apply("providers.yaml", PROVIDER_AA)
        .await
        .context("applying provider aa")?;

    // An agent session that stays open: the sender is kept until the end.
    let (to_daemon, outbound) = mpsc::channel(4);
    to_daemon
        .send(hello("aa", TOKEN))
        .await
        .context("queueing the hello")?;
    let mut session = d
        .agents()
        .session(ReceiverStream::new(outbound))
        .await
        .context("opening an agent session with a valid hello")?
        .into_inner();
    let welcome = session
        .message()
        .await?
        .context("the session ended before a welcome")?;
    ensure!(
        matches!(
            welcome.message,
            Some(pb::daemon_message::Message::Welcome(_))
        ),
        "first daemon message was {welcome:?}, expected a welcome"
    );

    // An event stream that follows: it never ends on its own.
    let mut events = d
        .control()
        .watch_events(pb::WatchEventsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .context("watching events")?
        .into_inner();
    ensure!(
        events.message().await?.is_some(),
        "the followed event stream ended before its first event"
    );

    d.shut_down().await?;
    // Both streams were ended by the shutdown, not left hanging: what was
    // already sent may still be read, then each stream ends.
    let session_end = tokio::time::timeout(SHUTDOWN_WITHIN, async {
        while let Ok(Some(_)) = session.message().await {}
    })
    .await;
    ensure!(
        session_end.is_ok(),
        "the agent session was still open {SHUTDOWN_WITHIN:?} after shutdown"
    );
    let events_end = tokio::time::timeout(SHUTDOWN_WITHIN, async {
        while let Ok(Some(_)) = events.message().await {}
    })
    .await;
    ensure!(
        events_end.is_ok(),
        "the event stream was still open {SHUTDOWN_WITHIN:?} after shutdown"
    );
    drop(to_daemon);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_lists_every_service_too() -> Result<()> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let d = TestDaemon::start().await?;
    let mut client = ServerReflectionClient::new(d.channel.clone());
    let mut answers = client
        .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }))
        .await
        .context("reflection v1alpha")?
        .into_inner();
    let answer = answers
        .message()
        .await?
        .and_then(|a| a.message_response)
        .context("no answer to reflection v1alpha")?;
    let MessageResponse::ListServicesResponse(list) = answer else {
        bail!("ListServices (v1alpha) was answered with {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    ensure!(
        [CONTROL, AGENT, HEALTH].iter().all(|s| names.contains(s)),
        "reflection v1alpha lists {names:?}"
    );
    d.shut_down().await
}
