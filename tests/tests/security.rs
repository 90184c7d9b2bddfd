//! End to end: the daemon's security, on the real binary serving TLS by
//! default. A plaintext client is refused on the TLS port; control calls need
//! a token whose role allows them; agents join with a join token (unknown,
//! expired, revoked and other providers' tokens refused, each with an event),
//! hold a certificate that acts only for its provider, lose their session
//! when revoked and cannot come back; a second agent cannot take a live
//! provider over; a hostile agent's hello and reports are bounded; a stock
//! gRPC client (Python grpcio) works with the CA and a token.
//!
//! The agents here are small gRPC clients of the test's own (tonic, rustls,
//! rcgen), speaking the agent protocol with a certificate: they make their
//! key and certificate request, join, and open sessions like an agent would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use skymirror_proto::v1 as pb;
use skymirror_proto::v1::agent_service_client::AgentServiceClient;
use skymirror_proto::v1::control_service_client::ControlServiceClient;
use skymirror_tests::{Bins, MARKER_VAR, processes_with};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const WAIT: Duration = Duration::from_secs(20);

/// A daemon serving TLS, started from the binary.
struct Secure {
    bins: Bins,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Child,
    /// What the daemon printed after its first line.
    printed: Arc<Mutex<Vec<String>>>,
    marker: String,
}

impl Drop for Secure {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (pid, _) in processes_with(MARKER_VAR, &self.marker) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// An agent's key and certificate, PEM.
#[derive(Debug, Clone)]
struct AgentIdentity {
    cert: String,
    key: String,
}

impl Secure {
    fn start(extra: &[&str]) -> Result<Self> {
        let bins = Bins::locate()?;
        let dir = tempfile::Builder::new()
            .prefix("skymirror-security-")
            .tempdir()?;
        let marker = format!("security-{}-{}", std::process::id(), dir.path().display());
        let mut child = Command::new(&bins.skymirror)
            .args(["daemon", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--log", "info"])
            .args(extra)
            .env(MARKER_VAR, &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("daemon.log"))?)
            .spawn()
            .context("starting the daemon")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .context("the daemon exited before listening (see daemon.log)")??;
        let addr = first
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line {first:?}"))?;
        let printed = Arc::new(Mutex::new(Vec::new()));
        let sink = printed.clone();
        let (started, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(std::result::Result::ok) {
                if line.starts_with("Use the daemon") {
                    let _ = started.send(());
                }
                if let Ok(mut p) = sink.lock() {
                    p.push(line);
                }
            }
        });
        let d = Secure {
            bins,
            dir,
            addr,
            child,
            printed,
            marker,
        };
        // The daemon prints how to use it once its admin token is written.
        ready
            .recv_timeout(WAIT)
            .with_context(|| format!("the daemon did not finish starting: {:?}", d.printed()))?;
        Ok(d)
    }

    fn printed(&self) -> Vec<String> {
        self.printed.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ca_file(&self) -> PathBuf {
        self.data().join("pki").join("ca.pem")
    }

    fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.ca_file())?)
    }

    fn admin(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data().join("admin-token"))?
            .trim()
            .to_string())
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CLI against this daemon over TLS, with `token` (or none).
    fn command(&self, token: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bins.skymirror);
        cmd.arg("--server")
            .arg(self.url())
            .arg("--ca-file")
            .arg(self.ca_file())
            .args(args)
            .env("SKYMIRROR_CONFIG", self.dir.path().join("cli-config"))
            .env_remove("SKYMIRROR_TOKEN")
            .env(MARKER_VAR, &self.marker)
            .stdin(Stdio::null());
        if let Some(t) = token {
            cmd.env("SKYMIRROR_TOKEN", t);
        }
        cmd
    }

    fn cli(&self, token: Option<&str>, args: &[&str]) -> Result<Output> {
        self.command(token, args)
            .output()
            .context("running the CLI")
    }

    fn cli_ok(&self, token: Option<&str>, args: &[&str]) -> Result<String> {
        let out = self.cli(token, args)?;
        ensure!(
            out.status.success(),
            "`skymirror {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A new token of `role` (an admin creates it).
    fn token(&self, role: &str, extra: &[&str]) -> Result<String> {
        let admin = self.admin()?;
        let mut args = vec!["token", "create", "--role", role];
        args.extend_from_slice(extra);
        Ok(self.cli_ok(Some(&admin), &args)?.trim().to_string())
    }

    fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml)?;
        self.cli_ok(
            Some(&self.admin()?),
            &["apply", "-f", &path.to_string_lossy()],
        )?;
        Ok(())
    }

    fn events(&self) -> Result<Vec<Value>> {
        self.cli_ok(Some(&self.admin()?), &["events", "-o", "json"])?
            .lines()
            .map(|l| serde_json::from_str(l).map_err(Into::into))
            .collect()
    }

    fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli_ok(
            Some(&self.admin()?),
            &["status", "-o", "json"],
        )?)?)
    }

    /// Follows the event log (from its start) until dropped.
    fn follow(&self) -> Result<Feed> {
        let mut child = self
            .command(Some(&self.admin()?), &["events", "--follow", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("events stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Ok(Feed { child, rx })
    }

    /// A TLS channel trusting the daemon's CA, with a client certificate.
    async fn channel(&self, identity: Option<&AgentIdentity>) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca_pem()?));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
        }
        Ok(Endpoint::from_shared(self.url())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }

    /// Joins as `provider`'s agent `agent_id` with `token`: a new key, a
    /// request naming the provider, the certificate the daemon signs.
    async fn join(
        &self,
        provider: &str,
        agent_id: &str,
        token: &str,
    ) -> Result<std::result::Result<AgentIdentity, tonic::Status>> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, provider);
        let csr = params.serialize_request(&key)?.pem()?;
        let mut client = AgentServiceClient::new(self.channel(None).await?);
        Ok(client
            .join(pb::JoinRequest {
                provider: provider.into(),
                agent_id: agent_id.into(),
                join_token: token.into(),
                csr_pem: csr,
            })
            .await
            .map(|r| AgentIdentity {
                cert: r.into_inner().certificate_pem,
                key: key.serialize_pem(),
            }))
    }
}

/// The event log as it grows.
struct Feed {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Feed {
    /// Waits for an event with `reason` whose message contains `text`.
    fn wait(&self, reason: &str, text: &str) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {reason} event saying {text:?} within {WAIT:?}");
            }
            match self.rx.recv_timeout(left) {
                Ok(e)
                    if e["reason"] == reason
                        && e["message"].as_str().is_some_and(|m| m.contains(text)) =>
                {
                    return Ok(e);
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the event stream ended while waiting for {reason}")
                }
            }
        }
    }
}

const PROVIDERS: &str = "apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: aa}
spec: {driver: process}
---
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: bb}
spec: {driver: process}
";

/// An app of one replica on `aa` only, which the test's agents never run.
const WEB_ON_AA: &str = "apiVersion: skymirror.dev/v1
kind: App
metadata: {name: web}
spec:
  command: skymirror-example
  replicas: 1
  placement:
    providers: [{name: aa}]
";

fn hello(provider: &str, agent_id: &str) -> pb::Hello {
    pb::Hello {
        provider: provider.into(),
        agent_id: agent_id.into(),
        version: "0.0.0-test".into(),
        driver: "process".into(),
        ..pb::Hello::default()
    }
}

/// An open agent session that heartbeats on its own.
struct Session {
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::DaemonMessage>,
}

/// Opens a session on `channel` with `hello`; heartbeats every 200 ms until
/// the session is dropped.
async fn session(
    channel: Channel,
    hello: pb::Hello,
) -> std::result::Result<Session, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::internal("the test's channel closed"))?;
    let mut inbound = AgentServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match tokio::time::timeout(WAIT, inbound.message()).await {
        Ok(Ok(Some(pb::DaemonMessage {
            message: Some(pb::daemon_message::Message::Welcome(_)),
        }))) => {}
        other => return Err(tonic::Status::internal(format!("no welcome: {other:?}"))),
    }
    let beat = tx.clone();
    tokio::spawn(async move {
        for seq in 1.. {
            let hb = pb::AgentMessage {
                message: Some(pb::agent_message::Message::Heartbeat(pb::Heartbeat {
                    time_ms: 0,
                    applied_revision: 0,
                    seq,
                    ..pb::Heartbeat::default()
                })),
            };
            if beat.send(hb).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(Session { tx, inbound })
}

impl Session {
    /// Waits until the daemon ends the session; says how.
    async fn ended(&mut self) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.message()).await {
                Err(_) => bail!("the session was not ended within {WAIT:?}"),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Ok("closed".into()),
                Ok(Err(status)) => return Ok(format!("{status}")),
            }
        }
    }

    /// Whether the session is alive: over a second and a half the daemon
    /// acknowledges heartbeats and does not end it.
    async fn alive(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut acked = false;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.message()).await {
                Err(_) => return acked,
                Ok(Ok(Some(m))) => {
                    acked |= matches!(
                        m.message,
                        Some(pb::daemon_message::Message::HeartbeatAck(_))
                    );
                }
                Ok(Ok(None) | Err(_)) => return false,
            }
        }
    }
}

/// Renews the certificate `id` for a new key.
async fn renew(
    d: &Secure,
    id: &AgentIdentity,
) -> Result<std::result::Result<tonic::Response<pb::JoinResponse>, tonic::Status>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    // A request may name its provider or nothing; only its key is used.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    Ok(AgentServiceClient::new(d.channel(Some(id)).await?)
        .renew(pb::RenewRequest { csr_pem: csr })
        .await)
}

fn refused<T: std::fmt::Debug>(
    what: &str,
    result: std::result::Result<T, tonic::Status>,
    code: Code,
    says: &str,
) -> Result<()> {
    match result {
        Ok(v) => bail!("{what}: accepted ({v:?}), expected {code:?}"),
        Err(s) => ensure!(
            s.code() == code && s.message().contains(says),
            "{what}: expected {code:?} saying {says:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
    }
    Ok(())
}

#[test]
fn the_daemon_serves_tls_and_refuses_a_plaintext_client() -> Result<()> {
    let d = Secure::start(&[])?;
    let printed = d.printed().join("\n");
    ensure!(
        printed.contains("CA hash: sha256:")
            && printed.contains("skymirror-agent --server https://"),
        "the daemon prints its CA hash and how to join an agent: {printed}"
    );
    ensure!(
        printed.contains("first admin token"),
        "the first admin token is printed once: {printed}"
    );
    let mode = |p: PathBuf| -> Result<u32> {
        Ok(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p)?.permissions()) & 0o777)
    };
    ensure!(mode(d.data())? == 0o700, "the data dir is private");
    ensure!(
        mode(d.data().join("admin-token"))? == 0o600,
        "the admin token is private"
    );
    ensure!(
        mode(d.data().join("pki").join("ca-key.pem"))? == 0o600,
        "the CA key is private"
    );
    ensure!(
        mode(d.data().join("store"))? == 0o700,
        "the store is private"
    );

    let out = Command::new(&d.bins.skymirror)
        .args([
            "--server",
            &format!("http://{}", d.addr),
            "get",
            "providers",
        ])
        .env("SKYMIRROR_CONFIG", d.dir.path().join("cli-config"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("https://"),
        "a plaintext client is refused and told to use https://: {stderr}"
    );
    let status = d.status()?;
    ensure!(
        status["daemon"]["tls"] == true
            && status["daemon"]["failedHandshakes"].as_u64().unwrap_or(0) >= 1,
        "the daemon counts the failed handshake: {}",
        status["daemon"]
    );
    Ok(())
}

#[test]
fn control_calls_need_a_token_whose_role_allows_them() -> Result<()> {
    let d = Secure::start(&[])?;
    d.apply("providers.yaml", PROVIDERS)?;
    let spec = d.dir.path().join("providers.yaml");
    let spec = spec.to_string_lossy();

    // No token: refused, naming the method and the role it needs.
    let out = d.cli(None, &["get", "providers"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("ListProviders needs a token of role admin or viewer"),
        "no token: {stderr}"
    );

    // A viewer reads, and cannot change anything.
    let viewer = d.token("viewer", &["--description", "dashboards"])?;
    ensure!(
        d.cli_ok(Some(&viewer), &["get", "providers"])?
            .contains("aa")
    );
    d.cli_ok(Some(&viewer), &["events", "--tail", "1"])?;
    for args in [
        vec!["apply", "-f", &spec],
        vec!["failover", "web", "--to", "aa"],
        vec!["cordon", "aa"],
        vec!["token", "create", "--role", "admin"],
    ] {
        let out = d.cli(Some(&viewer), &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains("needs a token of role admin")
                && stderr.contains("has role viewer"),
            "a viewer may not `{}`: {stderr}",
            args.join(" ")
        );
    }

    // An edge token follows the routing table and nothing else.
    let edge = d.token("edge", &[])?;
    let out = d.cli(Some(&edge), &["get", "providers"])?;
    ensure!(!out.status.success(), "an edge token cannot read providers");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let channel = d.channel(None).await?;
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {edge}").parse()?;
        let mut client =
            ControlServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            });
        let mut routes = client
            .watch_routes(pb::WatchRoutesRequest {
                edge_id: "test".into(),
            })
            .await
            .context("an edge token watches routes")?
            .into_inner();
        tokio::time::timeout(WAIT, routes.message())
            .await
            .context("the first routing table")??;
        refused(
            "an edge token applying",
            client
                .apply(pb::ApplyRequest {
                    source: "x".into(),
                    content: PROVIDERS.into(),
                    dry_run: true,
                })
                .await,
            Code::PermissionDenied,
            "Apply needs a token of role admin",
        )?;
        anyhow::Ok(())
    })?;

    // Revoked and expired tokens are refused with when.
    let id = viewer.split('.').next().context("token id")?;
    d.cli_ok(Some(&d.admin()?), &["token", "revoke", id])?;
    let out = d.cli(Some(&viewer), &["get", "providers"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains(&format!("token {id} was revoked at")),
        "a revoked token: {stderr}"
    );
    let short = d.token("viewer", &["--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(1100));
    let out = d.cli(Some(&short), &["get", "providers"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("expired at"),
        "an expired token: {stderr}"
    );
    let list = d.cli_ok(Some(&d.admin()?), &["token", "list", "-o", "json"])?;
    let tokens: Vec<Value> = serde_json::from_str(&list)?;
    ensure!(
        tokens.iter().any(|t| t["id"] == id && t["revoked"] == true)
            && !list.contains(viewer.split('.').nth(1).context("secret")?),
        "the list shows the revocation and never a secret: {list}"
    );
    let status = d.status()?;
    ensure!(
        status["daemon"]["refusedCalls"].as_u64().unwrap_or(0) >= 7,
        "refused calls are counted: {}",
        status["daemon"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_join_with_a_join_token_and_act_only_for_their_provider() -> Result<()> {
    let d = Secure::start(&[])?;
    d.apply("providers.yaml", PROVIDERS)?;
    let feed = d.follow()?;

    // Join tokens that do not admit.
    let join_bb = d.token("join", &["--provider", "bb"])?;
    let viewer = d.token("viewer", &[])?;
    let revoked = d.token("join", &[])?;
    d.cli_ok(
        Some(&d.admin()?),
        &["token", "revoke", revoked.split('.').next().context("id")?],
    )?;
    let expired = d.token("join", &["--ttl", "1s"])?;
    let unknown =
        "0123456789abcdef.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (what, token, says) in [
        (
            "an unknown token",
            unknown,
            "unknown token 0123456789abcdef",
        ),
        ("a malformed token", "let-me-in", "malformed"),
        ("a viewer token", viewer.as_str(), "not a join token"),
        ("a revoked token", revoked.as_str(), "was revoked at"),
        ("an expired token", expired.as_str(), "expired at"),
        (
            "another provider's token",
            join_bb.as_str(),
            "is for provider bb, not aa",
        ),
    ] {
        refused(
            what,
            d.join("aa", "agent-a1", token).await?,
            Code::Unauthenticated,
            says,
        )?;
        feed.wait("AgentJoinRefused", says)
            .with_context(|| what.to_string())?;
    }
    refused(
        "an undeclared provider",
        d.join("ghost", "agent-g", &d.token("join", &[])?).await?,
        Code::FailedPrecondition,
        "not declared",
    )?;
    refused(
        "an agent id with control characters",
        d.join("aa", "agent\u{1b}[2J", &d.token("join", &[])?)
            .await?,
        Code::InvalidArgument,
        "agent id",
    )?;

    // A join token for aa (or any provider) admits aa's agent.
    let join = d.token("join", &[])?;
    let a1 = d
        .join("aa", "agent-a1", &join)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    feed.wait("AgentJoined", "agent agent-a1 of provider aa joined")?;
    let b1 = d
        .join("bb", "agent-b1", &join_bb)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;

    // No certificate: refused.
    refused(
        "a session without a certificate",
        session(d.channel(None).await?, hello("aa", "agent-a1"))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "need a client certificate",
    )?;
    feed.wait("AgentSessionRefused", "need a client certificate")?;
    // A certificate of aa acting as bb: refused.
    refused(
        "aa's certificate as bb",
        session(d.channel(Some(&a1)).await?, hello("bb", "agent-a1"))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "cannot act for provider bb",
    )?;
    feed.wait("AgentSessionRefused", "cannot act for provider bb")?;
    // Issued to another agent id: refused.
    refused(
        "aa's certificate under another agent id",
        session(d.channel(Some(&a1)).await?, hello("aa", "agent-x"))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "was issued to agent agent-a1",
    )?;

    // The real agents hold their sessions.
    let mut aa = session(d.channel(Some(&a1)).await?, hello("aa", "agent-a1"))
        .await
        .map_err(|s| anyhow::anyhow!("aa's session: {s}"))?;
    let mut bb = session(d.channel(Some(&b1)).await?, hello("bb", "agent-b1"))
        .await
        .map_err(|s| anyhow::anyhow!("bb's session: {s}"))?;
    ensure!(
        aa.alive().await && bb.alive().await,
        "both agents are heard"
    );

    // A second agent of aa, with a valid certificate of its own, cannot
    // take the live provider over.
    let a2 = d
        .join("aa", "agent-a2", &join)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    refused(
        "a second agent while aa's is alive",
        session(d.channel(Some(&a2)).await?, hello("aa", "agent-a2"))
            .await
            .map(|_| ()),
        Code::AlreadyExists,
        "already has a live session from agent agent-a1",
    )?;
    ensure!(aa.alive().await, "the real agent keeps its session");

    // Revoking aa's agents ends the session now and refuses the return.
    let said = d.cli_ok(Some(&d.admin()?), &["agent", "revoke", "aa"])?;
    ensure!(said.contains("ended 1 session"), "{said}");
    let how = aa.ended().await?;
    feed.wait("AgentRevoked", "of provider aa")?;
    refused(
        "a revoked agent reconnecting",
        session(d.channel(Some(&a1)).await?, hello("aa", "agent-a1"))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "was revoked at",
    )?;
    ensure!(
        bb.alive().await,
        "bb is unaffected (aa's session ended: {how})"
    );
    let list = d.cli_ok(Some(&d.admin()?), &["agent", "list", "-o", "json"])?;
    let certs: Vec<Value> = serde_json::from_str(&list)?;
    ensure!(
        certs
            .iter()
            .filter(|c| c["provider"] == "aa")
            .all(|c| c["revoked"] == true)
            && certs
                .iter()
                .any(|c| c["provider"] == "bb" && c["revoked"] == false),
        "{list}"
    );

    // Renewal needs a live certificate: bb renews, revoked aa cannot.
    let renewed = renew(&d, &b1)
        .await?
        .map_err(|s| anyhow::anyhow!("bb renews: {s}"))?;
    ensure!(renewed.get_ref().not_after_ms > 0);
    feed.wait("AgentCertificateRenewed", "provider bb")?;
    refused(
        "a revoked certificate renewing",
        renew(&d, &a1).await?,
        Code::Unauthenticated,
        "was revoked",
    )?;

    // Deleting bb revokes its certificates: it cannot come back.
    d.cli_ok(Some(&d.admin()?), &["delete", "provider", "bb"])?;
    feed.wait("AgentRevoked", "provider bb was deleted")?;
    let how = bb.ended().await?;
    refused(
        "a deleted provider's agent",
        session(d.channel(Some(&b1)).await?, hello("bb", "agent-b1"))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "was revoked",
    )
    .with_context(|| format!("bb's session ended: {how}"))?;
    let status = d.status()?;
    ensure!(
        status["daemon"]["refusedJoins"].as_u64().unwrap_or(0) >= 8
            && status["daemon"]["refusedSessions"].as_u64().unwrap_or(0) >= 5,
        "refusals are counted: {}",
        status["daemon"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_saying_when() -> Result<()> {
    let d = Secure::start(&["--agent-cert-lifetime", "1s"])?;
    d.apply("providers.yaml", PROVIDERS)?;
    let join = d.token("join", &["--provider", "aa"])?;
    let a1 = d
        .join("aa", "agent-a1", &join)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(
        "an expired certificate",
        session(d.channel(Some(&a1)).await?, hello("aa", "agent-a1"))
            .await
            .map(|_| ()),
        Code::Unauthenticated,
        "expired at",
    )?;
    let events = d.events()?;
    ensure!(
        events.iter().any(|e| e["reason"] == "AgentSessionRefused"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("expired at"))),
        "the refusal is an event"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_bounded_and_others_are_unaffected() -> Result<()> {
    let d = Secure::start(&[])?;
    d.apply("providers.yaml", PROVIDERS)?;
    d.apply("web.yaml", WEB_ON_AA)?;
    let join = d.token("join", &[])?;
    let a1 = d
        .join("aa", "agent-a1", &join)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let b1 = d
        .join("bb", "agent-b1", &join)
        .await?
        .map_err(|s| anyhow::anyhow!("{s}"))?;
    let mut bb = session(d.channel(Some(&b1)).await?, hello("bb", "agent-b1"))
        .await
        .map_err(|s| anyhow::anyhow!("bb's session: {s}"))?;
    let before = d.events()?.len();

    // A hello with 10,000 replicas the daemon never assigned: apps that do
    // not exist, indices beyond web's one replica; and a version that would
    // drive a terminal.
    let fake = |app: &str, index: u32| pb::ReplicaStatus {
        app: app.into(),
        index,
        generation: 1,
        workload_generation: 1,
        state: pb::ReplicaState::Healthy as i32,
        address: "127.0.0.1:9".into(),
        instance_id: format!("fake-{index}"),
        ..pb::ReplicaStatus::default()
    };
    let mut flood = hello("aa", "agent-a1");
    flood.version = "1.0\u{1b}]0;owned\u{7}".into();
    flood.replicas = (0..5000).map(|i| fake("ghost", i)).collect();
    flood.replicas.extend((1..5001).map(|i| fake("web", i)));
    let mut aa = session(d.channel(Some(&a1)).await?, flood)
        .await
        .map_err(|s| anyhow::anyhow!("aa's session: {s}"))?;
    let replicas: Vec<Value> =
        serde_json::from_str(&d.cli_ok(Some(&d.admin()?), &["get", "replicas", "-o", "json"])?)?;
    ensure!(
        replicas.is_empty(),
        "no replica the daemon did not assign is kept: {} of them",
        replicas.len()
    );
    let events = d.events()?;
    ensure!(
        events.len() - before < 20,
        "a hello of 10,000 replicas writes a few events, not {}",
        events.len() - before
    );
    ensure!(
        events.iter().any(|e| e["reason"] == "AgentReportRefused"),
        "the ignored replicas are said"
    );
    let shown = d.cli_ok(Some(&d.admin()?), &["describe", "provider", "aa"])?;
    ensure!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}') && shown.contains("\\u{1b}"),
        "strings from agents are escaped before they reach a terminal: {shown:?}"
    );

    // Status reports as fast as it can: the session is ended, and the
    // events it caused are bounded.
    let before = d.events()?.len();
    let sent = {
        let tx = aa.tx.clone();
        let mut sent = 0u32;
        for i in 0..5000u32 {
            let report = pb::AgentMessage {
                message: Some(pb::agent_message::Message::Status(pb::StatusReport {
                    replicas: vec![pb::ReplicaStatus {
                        state: if i % 2 == 0 {
                            pb::ReplicaState::Healthy
                        } else {
                            pb::ReplicaState::Unhealthy
                        } as i32,
                        ..fake("web", 0)
                    }],
                    ..pb::StatusReport::default()
                })),
            };
            // The daemon stops reading a session it ended.
            match tokio::time::timeout(Duration::from_secs(5), tx.send(report)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
            sent += 1;
        }
        sent
    };
    let how = aa.ended().await?;
    let events = d.events()?;
    ensure!(
        events
            .iter()
            .any(|e| e["reason"] == "AgentFlooding" && e["provider"] == "aa"),
        "the flooding agent is cut off and its provider marked (sent {sent}, ended: {how})"
    );
    ensure!(
        events.len() - before <= 2100,
        "one agent cannot flush the log: {} events from {sent} reports",
        events.len() - before
    );
    ensure!(bb.alive().await, "the other agent keeps its session");
    let status = d.status()?;
    ensure!(
        status["daemon"]["floodingAgents"] == 1
            && status["daemon"]["droppedReports"].as_u64().unwrap_or(0) >= 10_000,
        "{}",
        status["daemon"]
    );
    Ok(())
}

/// A Python interpreter with grpcio, or why there is none.
fn python_with_grpc() -> std::result::Result<String, String> {
    for python in ["python3", "/usr/bin/python3"] {
        if Command::new(python)
            .args(["-c", "import grpc"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Ok(python.to_string());
        }
    }
    Err("no python3 with grpcio (Debian: apt-get install python3-grpcio; tests/scripts/test.sh installs it)".into())
}

#[test]
fn a_stock_grpc_client_works_with_the_ca_and_a_token() -> Result<()> {
    let python = match python_with_grpc() {
        Ok(p) => p,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => bail!("{why}"),
        Err(why) => {
            eprintln!("skipping the stock client test: {why}");
            return Ok(());
        }
    };
    let d = Secure::start(&[])?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join("stock-client.py");
    let viewer = d.token("viewer", &[])?;
    let out = Command::new(&python)
        .arg(script)
        .arg(d.addr.to_string())
        .arg(d.ca_file())
        .env("SKYMIRROR_TOKEN", &viewer)
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the stock client failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "health: SERVING",
        "reflection v1alpha: lists",
        "ListProviders without a token: UNAUTHENTICATED",
        "ListProviders with the token: OK",
    ] {
        ensure!(said.contains(line), "{line:?} missing from: {said}");
    }
    Ok(())
}
