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
    match cli.command {
        Command::Daemon(args) => daemon(args).await,
        Command::Dev(args) => {
            init_logging(&args.log)?;
            skymirror::dev::run(args).await
        }
        Command::Edge(args) => {
            init_logging(&args.log)?;
            let mut config = skymirror_edge::EdgeConfig::new(cli.server);
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
        other => skymirror::cli::run_client(&cli.server, other).await,
    }
}

/// Reads the join token, or creates one in the data directory on first start.
fn join_token(args: &DaemonArgs) -> anyhow::Result<String> {
    if let Some(t) = &args.join_token {
        return Ok(t.clone());
    }
    let path = args.data_dir.join("join-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    }
    let token = skymirror::random_token()?;
    write_private(&path, &token)?;
    tracing::info!(path = %path.display(), "generated a join token for agents");
    Ok(token)
}

fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(content.as_bytes())
        .with_context(|| path.display().to_string())?;
    Ok(())
}

async fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logging(&args.log)?;
    if !args.listen.ip().is_loopback() && !args.insecure_listen_anywhere {
        anyhow::bail!(
            "refusing to listen on {}: the control API has no authentication yet; use a loopback address or pass --insecure-listen-anywhere",
            args.listen
        );
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| args.data_dir.display().to_string())?;
    let token = join_token(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port when `--listen` ends in :0.
    println!("skymirror daemon listening on {addr}");
    let mut config = DaemonConfig::new(args.data_dir.join("store"), token);
    config.restore = args.restore.clone();
    if args.reset_store {
        config.start = skymirror::store::Start::Reset;
    }
    skymirror::daemon::run(config, listener, skymirror::shutdown_signal()).await?;
    Ok(())
}
