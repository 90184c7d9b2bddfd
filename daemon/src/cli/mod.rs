//! The `skymirror` command line: kubectl-like verbs over `ControlService`,
//! plus `daemon` and `dev`, which run the control plane itself.
//!
//! Boundary: the CLI talks to the daemon only through the gRPC API, like any
//! other client; it shares the spec types with the daemon to print YAML and
//! the pure helpers of `security` (escaping text for a terminal, private
//! files), and uses nothing else of this crate (no daemon, store or
//! scheduler internals).

mod access;
pub mod config;
mod logs;
pub mod output;
pub mod stdout;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use skymirror_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::spec;
use output::{AppView, EventView, Format, ProviderView, ReplicaView, action_word};
use stdout::Stdout;

/// Default address of the daemon's API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7600";

/// skymirror keeps identical replicas of an app on several providers and moves
/// traffic and replicas to the survivors when one of them fails.
#[derive(Debug, Parser)]
#[command(name = "skymirror", version, propagate_version = true)]
pub struct Cli {
    /// Daemon API URL, over the context's (default: the current context's,
    /// else http://127.0.0.1:7600).
    #[arg(long, global = true, env = "SKYMIRROR_SERVER")]
    pub server: Option<String>,
    /// Context of the config file (~/.config/skymirror/config, or
    /// SKYMIRROR_CONFIG) to use instead of its current one.
    #[arg(long, global = true, env = "SKYMIRROR_CONTEXT")]
    pub context: Option<String>,
    /// The daemon's CA certificate (PEM), for an https:// server.
    #[arg(long, global = true, env = "SKYMIRROR_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// File holding the token to call the daemon with (or set
    /// SKYMIRROR_TOKEN; never on the command line).
    #[arg(long, global = true, env = "SKYMIRROR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// What the command line and the environment say of the target.
    pub fn overrides(&self) -> config::Overrides {
        config::Overrides {
            server: self.server.clone(),
            context: self.context.clone(),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone(),
            token: std::env::var("SKYMIRROR_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (control plane).
    Daemon(DaemonArgs),
    /// All-in-one local mode: a daemon, three local providers, the example app
    /// and a front door.
    Dev(DevArgs),
    /// Run a front door: a reverse proxy (HTTP and TCP) that sends each app's
    /// traffic to its healthy replicas, following the daemon's routing table.
    Edge(EdgeArgs),
    /// Create or update objects from a YAML file (all or nothing).
    Apply {
        /// File with one or more documents; `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate and show the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// List apps, providers or replicas.
    Get {
        #[arg(value_enum)]
        what: Resource,
        /// Only this object (for replicas: this app).
        name: Option<String>,
        /// Replicas: only this provider.
        #[arg(long)]
        provider: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one app or provider in detail.
    Describe {
        #[arg(value_enum)]
        what: Resource,
        name: String,
    },
    /// Delete objects named in a file, or one object by kind and name.
    Delete {
        /// File whose documents name the objects; `-` reads standard input.
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["what", "name"])]
        file: Option<PathBuf>,
        #[arg(value_enum, requires = "name")]
        what: Option<Resource>,
        name: Option<String>,
        /// Succeed even if an object does not exist.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Status of one app, or an overview of the daemon, providers and apps.
    Status {
        app: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Manual failover: serve APP from one provider only, until `failback`.
    Failover {
        app: String,
        /// Provider that serves the app.
        #[arg(long)]
        to: String,
    },
    /// End a manual failover: normal placement and routing resume.
    Failback { app: String },
    /// Place no new replicas on a provider (running ones stay).
    Cordon { provider: String },
    /// Undo `cordon` and `drain`.
    Uncordon { provider: String },
    /// Cordon a provider and move its replicas to the others.
    Drain { provider: String },
    /// Where an app's replicas run and why, which providers are excluded and
    /// why, and the latest failover decisions.
    Explain {
        app: String,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Print the output of an app's replicas, read through the agents that
    /// run them; with several replicas, each line starts with
    /// `[app/provider/index]`.
    Logs {
        app: String,
        /// Only replicas on this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only the replica with this index (on each provider).
        #[arg(long)]
        index: Option<u32>,
        /// Only the last N lines of each replica (0: all that is kept, at most
        /// 10,000 lines; the process driver counts stdout and stderr apart).
        #[arg(long)]
        tail: Option<u32>,
        /// Keep printing new output until the replicas' instances exit.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Write a consistent backup of the daemon's store to a file (mode
    /// 0600: it holds apps' environment); `skymirror daemon --restore FILE`
    /// starts a daemon from it.
    Backup {
        /// File to write; replaced atomically.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Tokens: bearer tokens of the control API (roles admin, viewer, edge)
    /// and join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Agents' certificates: list them, revoke them (the agent's session
    /// ends and it cannot reconnect).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The CLI's contexts (server, CA, token), like a kubeconfig. The
    /// context's server, CA and token come from --server, --ca-file and
    /// --token-file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the event log; with --follow, keep printing new events.
    Events {
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only events about this app.
        #[arg(long)]
        app: Option<String>,
        /// Only events about this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only the last N events of the log.
        #[arg(long)]
        tail: Option<u32>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Everything.
    Admin,
    /// Read: get, describe, status, events, logs, explain.
    Viewer,
    /// The routing table only (front doors).
    Edge,
    /// Joining an agent, once per installation.
    Join,
}

/// `skymirror token` verbs.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token. Only the token goes to standard output, once: the
    /// daemon keeps its hash.
    Create {
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Lifetime, e.g. `1h`, `30d` (default: join tokens 24h, others
        /// until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Join tokens: only for this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Free text shown by `token list`.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a token by its id (the part before the dot).
    Revoke { id: String },
}

/// `skymirror agent` verbs.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List agents' certificates.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke every certificate of a provider's agents, or one by serial;
    /// sessions opened with them end at once and cannot reconnect.
    Revoke {
        /// The provider whose agents' certificates are revoked.
        #[arg(required_unless_present = "serial")]
        provider: Option<String>,
        /// Only this certificate (`agent list` shows serials).
        #[arg(long)]
        serial: Option<String>,
    },
}

/// `skymirror config` verbs.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Add or change a context: its server (--server), CA (--ca-file) and
    /// token (--token-file, or --token-stdin).
    SetContext {
        name: String,
        /// Copy the CA and the token into the config instead of naming
        /// their files.
        #[arg(long)]
        embed: bool,
        /// Read the token from standard input and keep it in the config.
        #[arg(long, conflicts_with = "token_file")]
        token_stdin: bool,
        /// Make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Make a context the current one.
    UseContext { name: String },
    /// List the contexts; the current one is marked `*`.
    GetContexts,
}

/// Object kinds the verbs take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "app")]
    Apps,
    #[value(alias = "provider")]
    Providers,
    #[value(alias = "replica")]
    Replicas,
}

/// `skymirror daemon` flags.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Directory of the embedded store, the CA and the first admin token
    /// (made private: 0700).
    #[arg(long, env = "SKYMIRROR_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the gRPC API (control and agents), served over TLS.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// A host name or IP address agents and clients reach the daemon by; the
    /// server certificate names it (repeatable; localhost, 127.0.0.1 and ::1
    /// are always named).
    #[arg(long = "advertise", value_name = "NAME|IP")]
    pub advertise: Vec<String>,
    /// Serve this certificate chain (PEM) instead of one from the daemon's
    /// own CA; agents then pin its CA with --ca-file.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Trust agents' certificates from this CA (PEM) instead of the daemon's
    /// own; without --client-ca-key, agents cannot join (their certificates
    /// come from that CA, naming spiffe://skymirror/provider/<name>).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The key of --client-ca, to sign the certificates of joining agents.
    #[arg(long, requires = "client_ca")]
    pub client_ca_key: Option<PathBuf>,
    /// How long agents' certificates last; agents renew them before.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    pub agent_cert_lifetime: std::time::Duration,
    /// Serve plaintext, without TLS or authentication: every local process
    /// is an admin, and agents are admitted by the shared join token. For
    /// tests and single-user machines; loopback addresses only.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// With --insecure-plaintext: the file holding the join token agents
    /// present (or set SKYMIRROR_JOIN_TOKEN); default: generated once into
    /// DATA_DIR/join-token.
    #[arg(long, requires = "insecure_plaintext")]
    pub join_token_file: Option<PathBuf>,
    /// Removed: a secret on the command line is visible in `ps`.
    #[arg(long, hide = true)]
    pub join_token: Option<String>,
    /// With --insecure-plaintext: serve plaintext beyond loopback too. Only
    /// for a lab on private networks (deploy/lab) while agents that join
    /// with a certificate are not deployed there: anyone who reaches the
    /// port is an admin.
    #[arg(long, requires = "insecure_plaintext")]
    pub insecure_listen_anywhere: bool,
    /// Log filter, e.g. `info` or `skymirror=debug`.
    #[arg(long, env = "SKYMIRROR_LOG", default_value = "info")]
    pub log: String,
    /// Replace the store with the one in this backup (`skymirror backup`),
    /// keeping the current one aside, then serve. Agents take over under the
    /// restored store's new epoch.
    #[arg(long, conflicts_with = "reset_store")]
    pub restore: Option<PathBuf>,
    /// Start an empty store on purpose, keeping the current one (damaged or
    /// not) aside; agents accept the new store's assignments.
    #[arg(long)]
    pub reset_store: bool,
}

/// `skymirror edge` flags.
#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    /// Name of this front door in the daemon's logs.
    #[arg(long)]
    pub edge_id: Option<String>,
    /// Bind a route's listen address elsewhere: `ROUTE_LISTEN=ADDR`, e.g.
    /// `127.0.0.1:8080=127.0.0.1:9080` (repeatable).
    #[arg(long = "listen-override", value_parser = parse_override)]
    pub listen_override: Vec<(String, SocketAddr)>,
    /// Log filter.
    #[arg(long, env = "SKYMIRROR_LOG", default_value = "info")]
    pub log: String,
}

/// Writes `bytes` to `path` readable by its owner only, replacing it
/// atomically (a temporary file beside it, synced, then renamed).
fn write_private_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn parse_override(s: &str) -> Result<(String, SocketAddr), String> {
    let (route, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ROUTE_LISTEN=ADDR"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{s:?}: {addr:?} is not a socket address: {e}"))?;
    Ok((route.to_string(), addr))
}

/// `skymirror dev` flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Keep state here (default: a temporary directory removed on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the daemon's API.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// App spec to run instead of the bundled example.
    #[arg(short = 'f', long = "filename")]
    pub file: Option<PathBuf>,
    /// Where the front door serves the example app (its routes' `127.0.0.1:8080`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub edge_listen: SocketAddr,
    /// Log filter.
    #[arg(long, env = "SKYMIRROR_LOG", default_value = "warn")]
    pub log: String,
}

/// Reads a file argument, `-` meaning standard input; returns (source name, text).
fn read_source(path: &PathBuf) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        return Ok(("<stdin>".into(), s));
    }
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.len() > spec::MAX_SOURCE_BYTES as u64 {
        bail!(
            "{}: file is {} bytes, over the {}-byte limit",
            path.display(),
            meta.len(),
            spec::MAX_SOURCE_BYTES
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok((path.display().to_string(), text))
}

/// A client error for people: the daemon's message, or how to reach it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {url}: {reason} (is `skymirror daemon` or `skymirror dev` running? set --server or SKYMIRROR_SERVER, or a context: skymirror config get-contexts)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{}", .0.message())]
    Status(tonic::Status),
}

/// Adds the token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the daemon's control API.
pub type Client =
    pb::control_service_client::ControlServiceClient<InterceptedService<Channel, Bearer>>;

/// Why a call failed, with a hint when the failure looks like the wrong
/// scheme: a plaintext client talking to the TLS port, or the reverse.
fn explain_failure(server: &str, e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    // A plaintext client on the TLS port sees the connection fail in one of
    // several ways, depending on when the daemon's TLS alert arrives.
    let broken = [
        "h2 protocol error",
        "http2 error",
        "frame with invalid size",
        "operation was canceled",
        "transport error",
        "connection reset",
        "connection closed",
        "broken pipe",
    ];
    let hint = if server.starts_with("http://")
        && !text.contains("cannot reach the daemon")
        && broken.iter().any(|b| text.contains(b))
    {
        Some(
            "the connection failed as it does against TLS, which the daemon serves by default: use https://HOST:PORT with its CA (--ca-file, or a context; skymirror dev writes one)",
        )
    } else if server.starts_with("https://")
        && (text.contains("InvalidContentType") || text.contains("corrupt message"))
    {
        Some("the daemon serves plaintext (--insecure-plaintext): use http://")
    } else {
        None
    };
    match hint {
        Some(h) => e.context(h),
        None => e,
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

/// Connects to the daemon `target` names: TLS with its CA for `https://`,
/// its token on every call.
pub async fn connect(target: &config::Target) -> Result<Client, ClientError> {
    let url = target.server.as_str();
    let unreachable = |reason: String| ClientError::Unreachable {
        url: url.into(),
        reason,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(3));
    if url.starts_with("https://") {
        let ca = target
            .ca_pem
            .as_deref()
            .ok_or_else(|| unreachable("no CA to trust it by (--ca-file)".into()))?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .map_err(|e| unreachable(e.to_string()))?;
    }
    let bearer = match &target.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| unreachable("the token is not printable text".into()))?,
        ),
        None => None,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable {
            url: url.into(),
            reason: std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), ToString::to_string),
        })?;
    Ok(
        pb::control_service_client::ControlServiceClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// Prints JSON, or YAML when asked for (callers print tables themselves).
fn print_structured<T: serde::Serialize>(
    out: &mut Stdout,
    format: Format,
    value: &T,
) -> anyhow::Result<()> {
    match format {
        Format::Yaml => write!(out, "{}", serde_yaml_ng::to_string(value)?)?,
        Format::Json | Format::Table => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
    }
    Ok(())
}

/// JSON shape of `apply -o json`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ApplyView {
    dry_run: bool,
    results: Vec<ResultView>,
    plan: Vec<PlanView>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultView {
    kind: String,
    name: String,
    /// created, configured, unchanged, deleted, not found.
    action: String,
    generation: u64,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanView {
    app: String,
    provider: String,
    replicas_before: u32,
    replicas_after: u32,
    replace: bool,
}

fn app_view(app: &pb::App, summary: Option<&pb::AppSummary>) -> anyhow::Result<AppView> {
    let meta = app.metadata.clone().unwrap_or_default();
    let domain =
        spec::App::try_from(app.clone()).map_err(|e| anyhow::anyhow!("app {}: {e}", meta.name))?;
    let doc = serde_json::to_value(spec::Document::App(domain.clone()))?;
    Ok(AppView {
        name: meta.name.clone(),
        generation: meta.generation,
        mode: domain.spec.placement.mode.as_str().to_string(),
        desired_replicas: summary.map_or(0, |s| s.desired_replicas),
        ready_replicas: summary.map_or(0, |s| s.ready_replicas),
        providers: summary.map_or_else(Vec::new, |s| s.providers.clone()),
        created_at_ms: meta.created_at_ms,
        updated_at_ms: meta.updated_at_ms,
        spec: doc,
    })
}

/// Runs a client verb (everything but `daemon`, `dev` and `edge`) against
/// the daemon `overrides` and the config file name.
///
/// A reader of stdout that went away ends the verb with
/// [`stdout::PrintError::Closed`] (see [`stdout::output_closed`]).
pub async fn run_client(overrides: &config::Overrides, command: Command) -> anyhow::Result<()> {
    let path = config::path()?;
    let cfg = config::Config::load(&path)?;
    if let Command::Config(c) = command {
        access::config_verb(c, overrides, cfg, &path)?;
    } else {
        let target = config::resolve(overrides, &cfg)?;
        run_verb(&target, command)
            .await
            .map_err(|e| explain_failure(&target.server, e))?;
    }
    // What stdout still buffers is written now, so a failure to write it is
    // reported like any other.
    Stdout::lock().flush()?;
    Ok(())
}

async fn run_verb(server: &config::Target, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Daemon(_) | Command::Dev(_) | Command::Edge(_) | Command::Config(_) => {
            bail!("not a client command")
        }
        Command::Token(c) => access::token_verb(connect(server).await?, c).await,
        Command::Agent(c) => access::agent_verb(connect(server).await?, c).await,
        Command::Apply {
            file,
            dry_run,
            output,
        } => {
            let (source, content) = read_source(&file)?;
            let mut client = connect(server).await?;
            let resp = client
                .apply(pb::ApplyRequest {
                    source,
                    content,
                    dry_run,
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let mut out = Stdout::lock();
            if output != Format::Table {
                return print_structured(
                    &mut out,
                    output,
                    &ApplyView {
                        dry_run,
                        results: resp
                            .results
                            .iter()
                            .map(|r| ResultView {
                                kind: r.kind.clone(),
                                name: r.name.clone(),
                                action: action_word(r.action()).into(),
                                generation: r.generation,
                            })
                            .collect(),
                        plan: resp
                            .plan
                            .iter()
                            .map(|p| PlanView {
                                app: p.app.clone(),
                                provider: p.provider.clone(),
                                replicas_before: p.replicas_before,
                                replicas_after: p.replicas_after,
                                replace: p.replace,
                            })
                            .collect(),
                    },
                );
            }
            let suffix = if dry_run { " (dry run)" } else { "" };
            for r in &resp.results {
                writeln!(
                    out,
                    "{}/{} {}{suffix}",
                    r.kind.to_lowercase(),
                    r.name,
                    action_word(r.action())
                )?;
            }
            for p in &resp.plan {
                let what = if p.replace && p.replicas_before == p.replicas_after {
                    format!("replace {} replicas", p.replicas_after)
                } else if p.replace {
                    format!(
                        "{} → {} replicas (replaced)",
                        p.replicas_before, p.replicas_after
                    )
                } else {
                    format!("{} → {} replicas", p.replicas_before, p.replicas_after)
                };
                writeln!(out, "  plan: {} on {}: {what}", p.app, p.provider)?;
            }
            Ok(())
        }
        Command::Get {
            what,
            name,
            provider,
            output,
        } => {
            let mut client = connect(server).await?;
            match what {
                Resource::Apps => {
                    let resp = client
                        .list_apps(pb::ListAppsRequest {
                            name: name.unwrap_or_default(),
                        })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    let mut out = Stdout::lock();
                    match output {
                        Format::Yaml => {
                            let mut docs = Vec::new();
                            for app in &resp.apps {
                                let domain = spec::App::try_from(app.clone())
                                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                                docs.push(spec::Document::App(domain).to_yaml());
                            }
                            write!(out, "{}", docs.join("---\n"))?;
                        }
                        Format::Json => {
                            let views = resp
                                .apps
                                .iter()
                                .zip(resp.summaries.iter())
                                .map(|(a, s)| app_view(a, Some(s)))
                                .collect::<anyhow::Result<Vec<_>>>()?;
                            print_structured(&mut out, output, &views)?;
                        }
                        Format::Table => {
                            let rows = resp
                                .apps
                                .iter()
                                .zip(resp.summaries.iter())
                                .map(|(a, s)| {
                                    let meta = a.metadata.clone().unwrap_or_default();
                                    let mode = a
                                        .spec
                                        .as_ref()
                                        .and_then(|s| s.placement.as_ref())
                                        .map_or("mirror", |p| match p.mode() {
                                            pb::PlacementMode::ActivePassive => "active-passive",
                                            pb::PlacementMode::Spread => "spread",
                                            _ => "mirror",
                                        });
                                    vec![
                                        meta.name,
                                        mode.to_string(),
                                        format!("{}/{}", s.ready_replicas, s.desired_replicas),
                                        s.providers.join(","),
                                        meta.generation.to_string(),
                                        output::age(meta.created_at_ms),
                                    ]
                                })
                                .collect();
                            writeln!(
                                out,
                                "{}",
                                output::table(
                                    &["APP", "MODE", "READY", "PROVIDERS", "GEN", "AGE"],
                                    rows
                                )
                            )?;
                        }
                    }
                }
                Resource::Providers => {
                    let resp = client
                        .list_providers(pb::ListProvidersRequest {
                            name: name.unwrap_or_default(),
                        })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    let views: Vec<ProviderView> = resp
                        .providers
                        .iter()
                        .zip(resp.statuses.iter())
                        .map(|(p, s)| ProviderView::new(p, s))
                        .collect();
                    let mut out = Stdout::lock();
                    match output {
                        Format::Table => writeln!(out, "{}", output::provider_table(&views))?,
                        _ => print_structured(&mut out, output, &views)?,
                    }
                }
                Resource::Replicas => {
                    let resp = client
                        .list_replicas(pb::ListReplicasRequest {
                            app: name.unwrap_or_default(),
                            provider: provider.unwrap_or_default(),
                        })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    let mut out = Stdout::lock();
                    match output {
                        Format::Table => {
                            writeln!(out, "{}", output::replica_table(&resp.replicas))?
                        }
                        _ => print_structured(
                            &mut out,
                            output,
                            &resp
                                .replicas
                                .iter()
                                .map(ReplicaView::from)
                                .collect::<Vec<_>>(),
                        )?,
                    }
                }
            }
            Ok(())
        }
        Command::Describe { what, name } => {
            let mut client = connect(server).await?;
            match what {
                Resource::Apps => {
                    let status = client
                        .get_app_status(pb::GetAppStatusRequest { name: name.clone() })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    print_app_status(&mut Stdout::lock(), &status)?;
                }
                Resource::Providers => {
                    let resp = client
                        .list_providers(pb::ListProvidersRequest { name: name.clone() })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    let replicas = client
                        .list_replicas(pb::ListReplicasRequest {
                            app: String::new(),
                            provider: name,
                        })
                        .await
                        .map_err(ClientError::from)?
                        .into_inner();
                    let mut out = Stdout::lock();
                    for (p, s) in resp.providers.iter().zip(resp.statuses.iter()) {
                        let v = ProviderView::new(p, s);
                        writeln!(out, "Provider:     {}", v.name)?;
                        writeln!(out, "Driver:       {}", v.driver)?;
                        writeln!(out, "State:        {}", v.state)?;
                        writeln!(out, "Priority:     {}", v.priority)?;
                        writeln!(
                            out,
                            "Capacity:     {}",
                            if v.capacity == 0 {
                                "unlimited".into()
                            } else {
                                v.capacity.to_string()
                            }
                        )?;
                        writeln!(
                            out,
                            "Labels:       {}",
                            v.labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )?;
                        writeln!(
                            out,
                            "Agent:        {} (version {})",
                            if v.agent_id.is_empty() {
                                "-".to_string()
                            } else {
                                output::printable(&v.agent_id)
                            },
                            output::printable(&v.agent_version)
                        )?;
                        writeln!(
                            out,
                            "Last seen:    {} ago",
                            output::age(v.last_heartbeat_ms)
                        )?;
                        writeln!(
                            out,
                            "Replicas:     {} ready of {} assigned",
                            v.ready_replicas, v.assigned_replicas
                        )?;
                        writeln!(
                            out,
                            "Assignment:   revision {} sent, {} applied",
                            v.assignment_revision, v.applied_revision
                        )?;
                    }
                    writeln!(out, "\n{}", output::replica_table(&replicas.replicas))?;
                }
                Resource::Replicas => bail!(
                    "describe takes `app` or `provider`; for replicas use `get replicas -o yaml`"
                ),
            }
            Ok(())
        }
        Command::Delete {
            file,
            what,
            name,
            ignore_not_found,
        } => {
            let req = match (file, what, name) {
                (Some(file), _, _) => {
                    let (source, content) = read_source(&file)?;
                    pb::DeleteRequest {
                        source,
                        content,
                        ..Default::default()
                    }
                }
                (None, Some(what), Some(name)) => {
                    let kind = match what {
                        Resource::Apps => "App",
                        Resource::Providers => "Provider",
                        Resource::Replicas => {
                            bail!("replicas are deleted by scaling or deleting their app")
                        }
                    };
                    pb::DeleteRequest {
                        kind: kind.into(),
                        name,
                        ..Default::default()
                    }
                }
                _ => bail!("delete needs -f FILE, or a kind and a name (e.g. `delete app web`)"),
            };
            let mut client = connect(server).await?;
            let resp = client
                .delete(req)
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let mut out = Stdout::lock();
            let mut missing = Vec::new();
            for r in &resp.results {
                writeln!(
                    out,
                    "{}/{} {}",
                    r.kind.to_lowercase(),
                    r.name,
                    action_word(r.action())
                )?;
                if r.action() == pb::ApplyAction::NotFound {
                    missing.push(format!("{}/{}", r.kind.to_lowercase(), r.name));
                }
            }
            if !missing.is_empty() && !ignore_not_found {
                bail!("not found: {}", missing.join(", "));
            }
            Ok(())
        }
        Command::Failover { app, to } => {
            let mut client = connect(server).await?;
            let r = client
                .failover(pb::FailoverRequest { app, provider: to })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            writeln!(Stdout::lock(), "{}", r.message)?;
            Ok(())
        }
        Command::Failback { app } => {
            let mut client = connect(server).await?;
            let r = client
                .failback(pb::FailbackRequest { app })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            writeln!(Stdout::lock(), "{}", r.message)?;
            Ok(())
        }
        Command::Cordon { provider } => {
            control_provider(server, provider, pb::ProviderControl::Cordon).await
        }
        Command::Uncordon { provider } => {
            control_provider(server, provider, pb::ProviderControl::Uncordon).await
        }
        Command::Drain { provider } => {
            control_provider(server, provider, pb::ProviderControl::Drain).await
        }
        Command::Backup { file } => {
            let mut client = connect(server).await?;
            let mut stream = client
                .backup(pb::BackupRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(ClientError::from)? {
                bytes.extend(chunk.data);
            }
            write_private_atomically(&file, &bytes)?;
            writeln!(
                Stdout::lock(),
                "backup written to {} ({} bytes)",
                file.display(),
                bytes.len()
            )?;
            Ok(())
        }
        Command::Explain { app, output } => {
            let mut client = connect(server).await?;
            let r = client
                .explain(pb::ExplainRequest { app })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let view = ExplainView::from(&r);
            let mut out = Stdout::lock();
            if output != Format::Table {
                return print_structured(&mut out, output, &view);
            }
            writeln!(
                out,
                "App {} ({} placement){}",
                view.app,
                view.mode,
                if view.pinned_provider.is_empty() {
                    String::new()
                } else {
                    format!(", manual failover to {}", view.pinned_provider)
                }
            )?;
            writeln!(out, "\nRuns on:")?;
            writeln!(
                out,
                "{}",
                output::table(
                    &["PROVIDER", "STATE", "REPLICAS", "EXTRA", "TIER", "WHY"],
                    view.placements
                        .iter()
                        .map(|p| vec![
                            p.provider.clone(),
                            p.provider_state.clone(),
                            p.replicas.to_string(),
                            p.extra_replicas.to_string(),
                            p.tier.to_string(),
                            p.reason.clone()
                        ])
                        .collect()
                )
            )?;
            if !view.excluded.is_empty() {
                writeln!(out, "\nExcluded:")?;
                writeln!(
                    out,
                    "{}",
                    output::table(
                        &["PROVIDER", "STATE", "WHY"],
                        view.excluded
                            .iter()
                            .map(|e| vec![
                                e.provider.clone(),
                                e.provider_state.clone(),
                                e.reason.clone()
                            ])
                            .collect()
                    )
                )?;
            }
            if !r.decisions.is_empty() {
                writeln!(out, "\nDecisions:")?;
                for e in &r.decisions {
                    writeln!(out, "  {}", output::event_line(e))?;
                }
            }
            Ok(())
        }
        Command::Status { app, output } => {
            let mut client = connect(server).await?;
            if let Some(app) = app {
                let status = client
                    .get_app_status(pb::GetAppStatusRequest { name: app })
                    .await
                    .map_err(ClientError::from)?
                    .into_inner();
                let mut out = Stdout::lock();
                if output == Format::Table {
                    return print_app_status(&mut out, &status);
                }
                return print_structured(&mut out, output, &AppStatusView::new(&status)?);
            }
            let daemon = client
                .get_daemon_status(pb::GetDaemonStatusRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let providers = client
                .list_providers(pb::ListProvidersRequest::default())
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let apps = client
                .list_apps(pb::ListAppsRequest::default())
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let provider_views: Vec<ProviderView> = providers
                .providers
                .iter()
                .zip(providers.statuses.iter())
                .map(|(p, s)| ProviderView::new(p, s))
                .collect();
            let app_views = apps
                .apps
                .iter()
                .zip(apps.summaries.iter())
                .map(|(a, s)| app_view(a, Some(s)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut out = Stdout::lock();
            if output != Format::Table {
                return print_structured(
                    &mut out,
                    output,
                    &OverviewView {
                        daemon: DaemonView::from(&daemon),
                        providers: provider_views,
                        apps: app_views,
                    },
                );
            }
            writeln!(
                out,
                "Daemon {} up {}, {} apps, {} providers ({} agents connected), {} replicas reported",
                daemon.version,
                output::age(daemon.started_at_ms),
                daemon.apps,
                daemon.providers,
                daemon.connected_agents,
                daemon.replicas_reported
            )?;
            writeln!(
                out,
                "Reconcile: {} passes, last {} µs, mean {} µs, max {} µs; store {} KiB, epoch {}{}\n",
                daemon.reconcile_passes,
                daemon.last_reconcile_micros,
                daemon.mean_reconcile_micros,
                daemon.max_reconcile_micros,
                daemon.store_bytes / 1024,
                daemon.store_epoch,
                if daemon.store_writable {
                    String::new()
                } else {
                    format!("; CANNOT WRITE: {}", daemon.store_error)
                }
            )?;
            writeln!(
                out,
                "Security: {}; refused {} joins, {} agent sessions, {} calls, {} TLS handshakes; dropped {} reports, {} events; {} flooding agents cut off\n",
                if daemon.tls {
                    format!(
                        "TLS, CA {}",
                        if daemon.ca_cert_hash.is_empty() {
                            "(the operator's)"
                        } else {
                            &daemon.ca_cert_hash
                        }
                    )
                } else {
                    "PLAINTEXT on loopback, no authentication".into()
                },
                daemon.refused_joins,
                daemon.refused_sessions,
                daemon.refused_calls,
                daemon.failed_handshakes,
                daemon.dropped_reports,
                daemon.dropped_events,
                daemon.flooding_agents
            )?;
            writeln!(out, "{}\n", output::provider_table(&provider_views))?;
            writeln!(
                out,
                "{}",
                output::table(
                    &["APP", "MODE", "READY", "PROVIDERS"],
                    app_views
                        .iter()
                        .map(|a| vec![
                            a.name.clone(),
                            a.mode.clone(),
                            format!("{}/{}", a.ready_replicas, a.desired_replicas),
                            a.providers.join(",")
                        ])
                        .collect()
                )
            )?;
            Ok(())
        }
        Command::Logs {
            app,
            provider,
            index,
            tail,
            follow,
        } => {
            let client = connect(server).await?;
            let args = logs::LogsArgs {
                app,
                provider,
                index,
                tail,
                follow,
            };
            logs::run(client, args).await
        }
        Command::Events {
            follow,
            app,
            provider,
            tail,
            output,
        } => {
            let mut client = connect(server).await?;
            let mut stream = client
                .watch_events(pb::WatchEventsRequest {
                    after_seq: 0,
                    tail: tail.unwrap_or(0),
                    follow,
                    app: app.unwrap_or_default(),
                    provider: provider.unwrap_or_default(),
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(ClientError::from)? {
                let line = match output {
                    Format::Table => output::event_line(&e),
                    Format::Json => serde_json::to_string(&EventView::from(&e))?,
                    Format::Yaml => {
                        format!("---\n{}", serde_yaml_ng::to_string(&EventView::from(&e))?)
                    }
                };
                // Locked per event: the lock is not held while waiting for
                // the next one, and a follower sees each event as it comes.
                let mut out = Stdout::lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Ok(())
        }
    }
}

async fn control_provider(
    server: &config::Target,
    provider: String,
    control: pb::ProviderControl,
) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let r = client
        .control_provider(pb::ControlProviderRequest {
            provider,
            control: control as i32,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    writeln!(Stdout::lock(), "{}", r.message)?;
    Ok(())
}

/// JSON shape of `explain -o json`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ExplainView {
    app: String,
    mode: String,
    pinned_provider: String,
    placements: Vec<ExplainPlacement>,
    excluded: Vec<ExplainExcluded>,
    decisions: Vec<EventView>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ExplainPlacement {
    provider: String,
    provider_state: String,
    replicas: u32,
    extra_replicas: u32,
    tier: i32,
    reason: String,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ExplainExcluded {
    provider: String,
    provider_state: String,
    reason: String,
}

impl From<&pb::ExplainResponse> for ExplainView {
    fn from(r: &pb::ExplainResponse) -> Self {
        ExplainView {
            app: r.app.clone(),
            mode: match r.mode() {
                pb::PlacementMode::ActivePassive => "active-passive",
                pb::PlacementMode::Spread => "spread",
                _ => "mirror",
            }
            .into(),
            pinned_provider: r.pinned_provider.clone(),
            placements: r
                .placements
                .iter()
                .map(|p| ExplainPlacement {
                    provider: p.provider.clone(),
                    provider_state: output::provider_state_name(p.provider_state()).into(),
                    replicas: p.replicas,
                    extra_replicas: p.extra_replicas,
                    tier: p.tier,
                    reason: p.reason.clone(),
                })
                .collect(),
            excluded: r
                .excluded
                .iter()
                .map(|e| ExplainExcluded {
                    provider: e.provider.clone(),
                    provider_state: output::provider_state_name(e.provider_state()).into(),
                    reason: e.reason.clone(),
                })
                .collect(),
            decisions: r.decisions.iter().map(EventView::from).collect(),
        }
    }
}

/// JSON shape of `status` without an app.
#[derive(Debug, serde::Serialize)]
struct OverviewView {
    daemon: DaemonView,
    providers: Vec<ProviderView>,
    apps: Vec<AppView>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct DaemonView {
    version: String,
    apps: u32,
    providers: u32,
    connected_agents: u32,
    replicas_reported: u32,
    reconcile_passes: u64,
    last_reconcile_micros: u64,
    mean_reconcile_micros: u64,
    max_reconcile_micros: u64,
    store_bytes: u64,
    started_at_ms: i64,
    last_event_seq: u64,
    store_writable: bool,
    store_error: String,
    store_id: String,
    store_epoch: u64,
    tls: bool,
    ca_cert_hash: String,
    refused_joins: u64,
    refused_sessions: u64,
    refused_calls: u64,
    failed_handshakes: u64,
    dropped_reports: u64,
    dropped_events: u64,
    flooding_agents: u64,
}

impl From<&pb::DaemonStatus> for DaemonView {
    fn from(d: &pb::DaemonStatus) -> Self {
        DaemonView {
            version: d.version.clone(),
            apps: d.apps,
            providers: d.providers,
            connected_agents: d.connected_agents,
            replicas_reported: d.replicas_reported,
            reconcile_passes: d.reconcile_passes,
            last_reconcile_micros: d.last_reconcile_micros,
            mean_reconcile_micros: d.mean_reconcile_micros,
            max_reconcile_micros: d.max_reconcile_micros,
            store_bytes: d.store_bytes,
            started_at_ms: d.started_at_ms,
            last_event_seq: d.last_event_seq,
            store_writable: d.store_writable,
            store_error: d.store_error.clone(),
            store_id: d.store_id.clone(),
            store_epoch: d.store_epoch,
            tls: d.tls,
            ca_cert_hash: d.ca_cert_hash.clone(),
            refused_joins: d.refused_joins,
            refused_sessions: d.refused_sessions,
            refused_calls: d.refused_calls,
            failed_handshakes: d.failed_handshakes,
            dropped_reports: d.dropped_reports,
            dropped_events: d.dropped_events,
            flooding_agents: d.flooding_agents,
        }
    }
}

/// JSON shape of `status APP`.
#[derive(Debug, serde::Serialize)]
struct AppStatusView {
    app: AppView,
    placements: Vec<PlacementView>,
    replicas: Vec<ReplicaView>,
    events: Vec<EventView>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PlacementView {
    provider: String,
    replicas: u32,
    provider_state: String,
}

impl AppStatusView {
    fn new(s: &pb::AppStatus) -> anyhow::Result<Self> {
        let app = s
            .app
            .as_ref()
            .context("the daemon sent a status without the app")?;
        Ok(AppStatusView {
            app: app_view(app, s.summary.as_ref())?,
            placements: s
                .placements
                .iter()
                .map(|p| PlacementView {
                    provider: p.provider.clone(),
                    replicas: p.replicas,
                    provider_state: output::provider_state_name(p.provider_state()).into(),
                })
                .collect(),
            replicas: s.replicas.iter().map(ReplicaView::from).collect(),
            events: s.recent_events.iter().map(EventView::from).collect(),
        })
    }
}

fn print_app_status(out: &mut Stdout, s: &pb::AppStatus) -> anyhow::Result<()> {
    let view = AppStatusView::new(s)?;
    let a = &view.app;
    writeln!(out, "App:        {} (generation {})", a.name, a.generation)?;
    writeln!(out, "Placement:  {}", a.mode)?;
    writeln!(
        out,
        "Ready:      {}/{}",
        a.ready_replicas, a.desired_replicas
    )?;
    writeln!(
        out,
        "Providers:  {}",
        view.placements
            .iter()
            .map(|p| format!("{} ×{} ({})", p.provider, p.replicas, p.provider_state))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(out, "\n{}", output::replica_table(&s.replicas))?;
    if !s.recent_events.is_empty() {
        writeln!(out, "\nEvents:")?;
        for e in &s.recent_events {
            writeln!(out, "  {}", output::event_line(e))?;
        }
    }
    Ok(())
}
