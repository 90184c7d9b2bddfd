//! `skymirror-bench api`: what TLS and tokens cost the control API, measured
//! against a plaintext loopback daemon in the same run. Two daemons start
//! from the binaries (`--insecure-plaintext`, and the default TLS with its
//! first admin token); for each it prints the latency of calls on one
//! connection (`ListProviders`, which the token layer checks), of a new
//! connection and one call (the TLS handshake included), and, on the TLS
//! daemon, of an agent joining (a new key, a certificate request, the
//! daemon's signature and its durable record).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use skymirror_proto::v1 as pb;
use skymirror_proto::v1::agent_service_client::AgentServiceClient;
use skymirror_proto::v1::control_service_client::ControlServiceClient;
use skymirror_tests::Bins;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// `skymirror-bench api` flags.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Calls on one connection, per daemon.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// New connections (each with one call), per daemon.
    #[arg(long, default_value_t = 300)]
    connections: usize,
    /// Agents joining the TLS daemon.
    #[arg(long, default_value_t = 100)]
    joins: usize,
}

/// A daemon started for the benchmark, killed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(bins: &Bins, data: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(&bins.skymirror)
            .args(["daemon", "--data-dir"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--log", "warn"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = lines.next().context("the daemon exited")??;
        let addr = first
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line {first:?}"))?;
        // Read until it is ready (a TLS daemon prints its admin token
        // first), then keep the pipe drained.
        if !extra.contains(&"--insecure-plaintext") {
            for line in lines.by_ref() {
                if line?.starts_with("Use the daemon") {
                    break;
                }
            }
        }
        std::thread::spawn(move || for _ in lines.map_while(std::result::Result::ok) {});
        Ok(Daemon {
            child,
            addr,
            data: data.to_path_buf(),
        })
    }

    fn tls(&self) -> bool {
        self.data.join("pki").exists()
    }

    async fn channel(&self) -> Result<Channel> {
        let endpoint = if self.tls() {
            let ca = std::fs::read_to_string(self.data.join("pki").join("ca.pem"))?;
            Endpoint::from_shared(format!("https://{}", self.addr))?
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
        } else {
            Endpoint::from_shared(format!("http://{}", self.addr))?
        };
        Ok(endpoint.connect().await?)
    }

    fn token(&self) -> Result<Option<String>> {
        if !self.tls() {
            return Ok(None);
        }
        Ok(Some(
            std::fs::read_to_string(self.data.join("admin-token"))?
                .trim()
                .to_string(),
        ))
    }
}

/// Adds the admin token to a call.
type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

/// A control client with the daemon's admin token, if it needs one.
type Client =
    ControlServiceClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

async fn client(d: &Daemon) -> Result<Client> {
    let bearer: Option<tonic::metadata::MetadataValue<_>> = d
        .token()?
        .map(|t| format!("Bearer {t}").parse())
        .transpose()?;
    let add: AddToken = Box::new(move |mut r| {
        if let Some(b) = &bearer {
            r.metadata_mut().insert("authorization", b.clone());
        }
        Ok(r)
    });
    Ok(ControlServiceClient::with_interceptor(
        d.channel().await?,
        add,
    ))
}

/// `p50 / p99` of durations, in microseconds.
fn percentiles(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |q: f64| {
        d.get(((d.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    format!(
        "p50 {} us, p99 {} us",
        at(0.5).as_micros(),
        at(0.99).as_micros()
    )
}

async fn measure(d: &Daemon, args: &ApiArgs) -> Result<(String, String)> {
    let mut c = client(d).await?;
    // Warm up the connection and the daemon.
    for _ in 0..100 {
        c.list_providers(pb::ListProvidersRequest::default())
            .await?;
    }
    let mut calls = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let t = Instant::now();
        c.list_providers(pb::ListProvidersRequest::default())
            .await?;
        calls.push(t.elapsed());
    }
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let t = Instant::now();
        let mut fresh = client(d).await?;
        fresh
            .list_providers(pb::ListProvidersRequest::default())
            .await?;
        connections.push(t.elapsed());
    }
    Ok((percentiles(calls), percentiles(connections)))
}

async fn joins(d: &Daemon, n: usize) -> Result<String> {
    let mut admin = client(d).await?;
    admin
        .apply(pb::ApplyRequest {
            source: "bench.yaml".into(),
            content: "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {name: bench}\nspec: {driver: process}\n".into(),
            dry_run: false,
        })
        .await?;
    let token = admin
        .create_token(pb::CreateTokenRequest {
            role: pb::TokenRole::Join as i32,
            ttl_seconds: 3600,
            provider: "bench".into(),
            description: "skymirror-bench api".into(),
        })
        .await?
        .into_inner()
        .secret;
    let mut agents = AgentServiceClient::new(d.channel().await?);
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?.pem()?;
        agents
            .join(pb::JoinRequest {
                provider: "bench".into(),
                agent_id: format!("bench-{i}"),
                join_token: token.clone(),
                csr_pem: csr,
            })
            .await?;
        took.push(t.elapsed());
    }
    Ok(percentiles(took))
}

/// Runs the benchmark.
pub fn api(args: &ApiArgs) -> Result<()> {
    ensure!(args.calls > 0 && args.connections > 0, "nothing to measure");
    let bins = Bins::locate()?;
    let dir = tempfile::tempdir()?;
    let plain = Daemon::start(&bins, &dir.path().join("plain"), &["--insecure-plaintext"])?;
    let tls = Daemon::start(&bins, &dir.path().join("tls"), &[])?;
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "control API: {} calls on one connection and {} new connections per daemon ({} build)",
        args.calls,
        args.connections,
        super::profile(&bins)
    );
    for (what, d) in [("plaintext, no token", &plain), ("TLS + token", &tls)] {
        let (calls, connections) = runtime.block_on(measure(d, args))?;
        println!("  {what:<20} calls: {calls}; new connection + call: {connections}");
    }
    if args.joins > 0 {
        let took = runtime.block_on(joins(&tls, args.joins))?;
        println!(
            "  join (key, request, signature, durable record), {} agents: {took}",
            args.joins
        );
    }
    // Both daemons must still be running: a crash would make the figures lie.
    for d in [&plain, &tls] {
        ensure!(
            std::net::TcpStream::connect_timeout(&d.addr, Duration::from_secs(1)).is_ok(),
            "the daemon at {} stopped during the benchmark",
            d.addr
        );
    }
    Ok(())
}
