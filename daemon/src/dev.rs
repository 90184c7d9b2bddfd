//! `skymirror dev`: the all-in-one local mode.
//!
//! One process runs a daemon on a temporary (or given) sled store, three
//! providers whose agents use the process driver, the bundled example app
//! mirrored on all three, and a front door on 127.0.0.1:8080 (`--edge-listen`). The agents run in-process but talk to the daemon over
//! a real gRPC socket, as remote agents do. On Ctrl-C everything is
//! stopped, replicas included, and a temporary data directory is removed.
//!
//! The daemon's API (`--listen`) serves TLS with tokens, like a deployed
//! daemon: `skymirror dev` writes a context `dev` (its server, its CA inline
//! and an admin token) into the CLI's config and makes it current, so the
//! CLI needs no flags. The in-process agents and front door reach it on a
//! second, plaintext listener on a loopback port of its own, where agents
//! are admitted by a join token only they know and a caller without a token
//! may only follow the routing table (the role edge).

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use anyhow::Context as _;
use skymirror_agent::supervisor::SupervisorConfig;
use skymirror_agent::{AgentConfig, DriverConfig};
use tokio_util::sync::CancellationToken;

use crate::api::Listener;
use crate::cli::DevArgs;
use crate::daemon::{Daemon, DaemonConfig};
use crate::security::pki::PkiOptions;
use crate::security::{Pki, Role};

const PROVIDERS: &str = include_str!("../../deploy/examples/local-providers.yaml");
const EXAMPLE_APP: &str = include_str!("../../deploy/examples/hello.yaml");
const PROVIDER_NAMES: [&str; 3] = ["local-a", "local-b", "local-c"];

/// Runs the all-in-one mode until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let (data_dir, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("skymirror-dev-{}", std::process::id())),
            true,
        ),
    };
    crate::security::pki::private_dir(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let result = run_in(&args, &data_dir).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

async fn run_in(args: &DevArgs, data_dir: &Path) -> anyhow::Result<()> {
    // Listen for Ctrl-C and SIGTERM from the start, so a stop during start-up
    // also takes the replicas down instead of leaving them behind.
    let stop_requested = CancellationToken::new();
    let on_signal = stop_requested.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        on_signal.cancel();
    });
    let token = crate::random_token()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another skymirror running? use --listen)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    // The in-process agents and front door, on loopback.
    let local = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot listen on a loopback port for the local agents")?;
    let local_server = format!("http://{}", local.local_addr()?);
    // The server certificate names loopback, not "any address".
    let named = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
    } else {
        addr
    };
    let server = format!("https://{named}");
    let pki = Arc::new(Pki::load_or_create(&PkiOptions {
        dir: data_dir.join("pki"),
        advertise: Vec::new(),
        tls_cert: None,
        client_ca: None,
        agent_lifetime: Duration::from_secs(7 * 24 * 3600),
    })?);
    let mut config = DaemonConfig::new(data_dir.join("store"), token.clone());
    config.pki = Some(pki.clone());
    let daemon = Daemon::open(config)?;
    let admin = admin_token(&daemon, &data_dir.join("admin-token")).await?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let daemon_task = tokio::spawn(crate::api::serve_on(
        daemon.clone(),
        vec![
            Listener {
                socket: listener,
                tls: true,
                anonymous: None,
            },
            Listener {
                socket: local,
                tls: false,
                anonymous: Some(Role::Edge),
            },
        ],
        async move {
            stop.cancelled().await;
        },
    ));
    let context = write_context(&server, pki.ca_pem(), &admin);

    daemon
        .apply("local-providers.yaml", PROVIDERS, false)
        .await?;
    let (app_source, app_text) = match &args.file {
        Some(f) => (
            f.display().to_string(),
            std::fs::read_to_string(f).with_context(|| f.display().to_string())?,
        ),
        None => ("hello.yaml".to_string(), EXAMPLE_APP.to_string()),
    };
    daemon.apply(&app_source, &app_text, false).await?;

    // The example app ships next to the skymirror binary.
    let search_path: Vec<PathBuf> = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .into_iter()
        .collect();
    let agents_stop = CancellationToken::new();
    let mut agents = Vec::new();
    for name in PROVIDER_NAMES {
        let config = AgentConfig {
            server: local_server.clone(),
            provider: name.to_string(),
            state_dir: data_dir.join("agents").join(name),
            join_token: token.clone(),
            driver: DriverConfig::Process {
                search_path: search_path.clone(),
                bind_host: std::net::Ipv4Addr::LOCALHOST.into(),
            },
            stop_replicas_on_exit: true,
            supervisor: SupervisorConfig::default(),
        };
        agents.push(tokio::spawn(skymirror_agent::run(
            config,
            agents_stop.child_token(),
        )));
    }

    // The front door, in-process, following the daemon like any other edge.
    let mut edge = skymirror_edge::EdgeConfig::new(local_server.clone());
    edge.edge_id = "dev".into();
    edge.listen_override
        .insert("127.0.0.1:8080".into(), args.edge_listen);
    let edge_stop = CancellationToken::new();
    let edge_task = tokio::spawn(skymirror_edge::run(edge, edge_stop.clone()));

    println!(
        "skymirror dev: daemon on {server}, data in {}",
        data_dir.display()
    );
    println!("providers: {} (process driver)", PROVIDER_NAMES.join(", "));
    let ready = tokio::select! {
        r = wait_ready(&daemon, Duration::from_secs(30)) => r,
        _ = stop_requested.cancelled() => Err(anyhow::anyhow!("stopped before the app was ready")),
    };
    match ready {
        Ok(n) => println!("example app `hello` is up: {n} replicas healthy across 3 providers\n"),
        Err(e) => println!(
            "the app is not healthy yet: {e}\n(see `skymirror get replicas` and `skymirror events`)\n"
        ),
    }
    let flag = match &context {
        Ok(path) => {
            println!(
                "the CLI's context `dev` (TLS, an admin token) is current in {}",
                path.display()
            );
            String::new()
        }
        Err(e) => {
            println!(
                "could not write the CLI's context `dev` ({e:#}); pass the daemon with flags:"
            );
            format!(
                " --server {server} --ca-file {}",
                data_dir.join("pki").join("ca.pem").display()
            )
        }
    };
    if context.is_err() {
        println!(
            "  export SKYMIRROR_TOKEN=$(cat {})",
            data_dir.join("admin-token").display()
        );
    }
    println!("Try, in another terminal:");
    println!(
        "  skymirror{flag} get replicas          # where each replica runs, its address and health"
    );
    println!("  skymirror{flag} status hello          # placement, readiness and recent events");
    println!("  skymirror{flag} events --follow       # the event stream");
    println!(
        "  curl http://{}/             # through the front door, to a healthy replica",
        args.edge_listen
    );
    println!("  curl http://<a replica address>/      # one replica directly (see get replicas)");
    println!("  skymirror{flag} apply -f deploy/examples/hello.yaml --dry-run");
    println!("\nPress Ctrl-C to stop everything.");

    stop_requested.cancelled().await;
    println!("\nstopping: front door, replicas, agents, daemon");
    edge_stop.cancel();
    match edge_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("front door: {e}"),
        Err(e) => eprintln!("front door task: {e}"),
    }
    agents_stop.cancel();
    for a in agents {
        match a.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("agent: {:#}", anyhow::Error::from(e)),
            Err(e) => eprintln!("agent task: {e}"),
        }
    }
    shutdown.cancel();
    daemon_task.await.context("daemon task")??;
    Ok(())
}

/// The admin token of the context `dev`: the first one, created now, or the
/// one a kept data directory holds; a new one if its file was lost.
async fn admin_token(daemon: &Daemon, path: &Path) -> anyhow::Result<String> {
    if let Some(token) = daemon.bootstrap_admin_token(path).await? {
        return Ok(token);
    }
    if let Ok(token) = std::fs::read_to_string(path)
        && daemon.authenticate(token.trim()).is_ok()
    {
        return Ok(token.trim().to_string());
    }
    let by = crate::access::Caller {
        token_id: None,
        role: Role::Admin,
    };
    let (_, token) = daemon
        .create_token(Role::Admin, None, "", "skymirror dev's context", &by)
        .await?;
    crate::security::pki::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Writes the context `dev` (`server`, the CA inline, `token`) into the
/// CLI's config and makes it current; returns the config's path.
fn write_context(server: &str, ca_pem: &str, token: &str) -> anyhow::Result<PathBuf> {
    use crate::cli::config::{Config, Context, path};
    let path = path()?;
    let mut config = Config::load(&path)?;
    config.set(
        Context {
            name: "dev".into(),
            server: server.to_string(),
            ca_data: Some(ca_pem.to_string()),
            token: Some(token.to_string()),
            ..Context::default()
        },
        true,
    );
    config.save(&path)?;
    Ok(path)
}

/// Waits until every assigned replica is ready; returns how many.
async fn wait_ready(daemon: &Daemon, timeout: Duration) -> anyhow::Result<u32> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (ready, desired) = daemon.readiness()?;
        if desired > 0 && ready == desired {
            return Ok(ready);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{ready} of {desired} replicas ready after {}s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
