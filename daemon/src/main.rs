//! `skymirror`: the daemon, the all-in-one mode and the client verbs. Parses
//! flags, sets up logging, and hands over to the library.

use std::path::Path;

use anyhow::Context;
use clap::Parser;
use skymirror::cli::{Cli, Command, DaemonArgs};
use skymirror::daemon::DaemonConfig;

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        // The reader of our output went away (`| head`): a quiet end.
        if skymirror::cli::stdout::output_closed(&e) {
            std::process::exit(skymirror::cli::stdout::CLOSED_EXIT_STATUS);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let targets: tracing_subscriber::filter::Targets = filter.parse().context("--log")?;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(targets)
        .init();
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let overrides = cli.overrides();
    match cli.command {
        Command::Daemon(args) => daemon(args).await,
        Command::Dev(args) => {
            init_logging(&args.log)?;
            skymirror::dev::run(args).await
        }
        Command::Edge(args) => {
            init_logging(&args.log)?;
            let cfg = skymirror::cli::config::Config::load(&skymirror::cli::config::path()?)?;
            let target = skymirror::cli::config::resolve(&overrides, &cfg)?;
            let mut config = skymirror_edge::EdgeConfig::new(target.server);
            if let Some(id) = args.edge_id {
                config.edge_id = id;
            }
            config.listen_override = args.listen_override.into_iter().collect();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                skymirror::shutdown_signal().await;
                stop.cancel();
            });
            skymirror_edge::run(config, shutdown).await?;
            Ok(())
        }
        other => skymirror::cli::run_client(&overrides, other).await,
    }
}

/// The join token agents present in their hello on a plaintext daemon: from
/// `--join-token-file`, `SKYMIRROR_JOIN_TOKEN`, or created once in the data
/// directory.
fn hello_token(args: &DaemonArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.join_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the join token from {}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            anyhow::bail!("{}: the join token file is empty", path.display());
        }
        return Ok(token.to_string());
    }
    if let Ok(t) = std::env::var("SKYMIRROR_JOIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    let path = args.data_dir.join("join-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    }
    let token = skymirror::random_token()?;
    skymirror::security::pki::write_private(&path, token.as_bytes())?;
    tracing::info!(path = %path.display(), "generated a join token for agents");
    Ok(token)
}

/// Takes group and other permissions off everything in the data directory
/// (a store of an earlier release was written 0644 in 0755 directories):
/// it holds apps' environment and the CA's key.
fn make_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir).with_context(|| dir.display().to_string())?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .with_context(|| dir.display().to_string())?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            make_private(&entry?.path())?;
        }
    }
    Ok(())
}

async fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logging(&args.log)?;
    // Everything the daemon and its store create holds apps' environment or
    // keys: its owner's only (files 0600, directories 0700).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if args.join_token.is_some() {
        anyhow::bail!(
            "--join-token was removed: a secret on the command line is visible in `ps`. Agents join with tokens from `skymirror token create --role join`; with --insecure-plaintext, give the shared token in a file (--join-token-file) or SKYMIRROR_JOIN_TOKEN"
        );
    }
    if args.insecure_plaintext && !args.listen.ip().is_loopback() && !args.insecure_listen_anywhere
    {
        anyhow::bail!(
            "refusing to serve plaintext on {}: --insecure-plaintext is for loopback addresses only; beyond loopback the daemon serves TLS with authentication (drop --insecure-plaintext)",
            args.listen
        );
    }
    skymirror::security::pki::private_dir(&args.data_dir)?;
    make_private(&args.data_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port when `--listen` ends in :0.
    println!("skymirror daemon listening on {addr}");
    let mut config = DaemonConfig::new(args.data_dir.join("store"), String::new());
    config.restore = args.restore.clone();
    if args.reset_store {
        config.start = skymirror::store::Start::Reset;
    }
    if args.insecure_plaintext {
        config.hello_token = Some(hello_token(&args)?);
        tracing::warn!(
            %addr,
            "serving PLAINTEXT without TLS or authentication (--insecure-plaintext): every process that reaches the port is an admin, and agents are admitted by the shared join token"
        );
        let daemon = skymirror::daemon::Daemon::open(config)?;
        let listener = skymirror::api::Listener {
            socket: listener,
            tls: false,
            anonymous: Some(skymirror::security::Role::Admin),
        };
        skymirror::api::serve_on(daemon, vec![listener], skymirror::shutdown_signal()).await?;
        return Ok(());
    }
    config.hello_token = None;
    let pki = skymirror::security::Pki::load_or_create(&skymirror::security::pki::PkiOptions {
        dir: args.data_dir.join("pki"),
        advertise: args.advertise.clone(),
        tls_cert: args.tls_cert.clone().zip(args.tls_key.clone()),
        client_ca: args
            .client_ca
            .clone()
            .map(|ca| (ca, args.client_ca_key.clone())),
        agent_lifetime: args.agent_cert_lifetime,
    })?;
    for note in pki.notes() {
        tracing::info!("{note}");
    }
    let pki = std::sync::Arc::new(pki);
    config.pki = Some(pki.clone());
    let daemon = skymirror::daemon::Daemon::open(config)?;
    let token_path = args.data_dir.join("admin-token");
    let admin = daemon.bootstrap_admin_token(&token_path).await?;
    print_welcome(&args, addr, &pki, admin.as_deref(), &token_path);
    let listener = skymirror::api::Listener {
        socket: listener,
        tls: true,
        anonymous: None,
    };
    skymirror::api::serve_on(daemon, vec![listener], skymirror::shutdown_signal()).await?;
    Ok(())
}

/// What a TLS daemon says at start: the CA's hash, the admin token when it
/// was just created, and how to join an agent.
fn print_welcome(
    args: &DaemonArgs,
    addr: std::net::SocketAddr,
    pki: &skymirror::security::Pki,
    admin: Option<&str>,
    token_path: &Path,
) {
    let host = args
        .advertise
        .first()
        .map_or_else(|| addr.ip().to_string(), Clone::clone);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let server = format!("https://{host}:{}", addr.port());
    let ca = args.data_dir.join("pki").join("ca.pem");
    println!("serving TLS; CA certificate {}", ca.display());
    if !pki.ca_hash().is_empty() {
        println!("CA hash: {}", pki.ca_hash());
    }
    if let Some(token) = admin {
        println!(
            "first admin token (shown once; also in {}): {token}",
            token_path.display()
        );
    }
    println!(
        "\nUse the daemon from this host:\n  skymirror config set-context local --server https://127.0.0.1:{} --ca-file {} --token-file {} --use",
        addr.port(),
        ca.display(),
        token_path.display()
    );
    if pki.issues_agent_certificates() {
        let pin = if pki.ca_hash().is_empty() {
            "--ca-file CA.pem".to_string()
        } else {
            format!("--ca-cert-hash {}", pki.ca_hash())
        };
        println!(
            "\nJoin an agent from another host:\n  1. skymirror apply -f provider.yaml                     # declares provider NAME\n  2. skymirror token create --role join --provider NAME --ttl 1h > join-token\n  3. skymirror-agent --server {server} --provider NAME {pin} --join-token-file join-token --state-dir /var/lib/skymirror-agent"
        );
    }
}
