//! `skymirror dev`: the all-in-one local mode.
//!
//! One process runs a daemon on a temporary (or given) sled store, three
//! providers whose agents use the process driver, the bundled example app
//! mirrored on all three, and a front door on 127.0.0.1:8080 (`--edge-listen`). The agents run in-process but talk to the daemon over
//! its real gRPC socket, exactly as remote agents do. On Ctrl-C everything is
//! stopped, replicas included, and a temporary data directory is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use skymirror_agent::supervisor::SupervisorConfig;
use skymirror_agent::{AgentConfig, DriverConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::daemon::{Daemon, DaemonConfig};

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
    std::fs::create_dir_all(&data_dir)
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
    let server = format!("http://{addr}");
    let daemon = Daemon::open(DaemonConfig::new(data_dir.join("store"), token.clone()))?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let daemon_task = tokio::spawn(crate::daemon::serve(daemon.clone(), listener, async move {
        stop.cancelled().await;
    }));

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
            server: server.clone(),
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
    let mut edge = skymirror_edge::EdgeConfig::new(server.clone());
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
    let port = addr.port();
    let flag = if port == 7600 {
        String::new()
    } else {
        format!(" --server {server}")
    };
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
