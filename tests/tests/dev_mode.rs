//! End to end: `skymirror dev`, the README's main command — a daemon, three
//! local providers, the example app behind the front door — and a clean stop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use skymirror_tests::{Bins, MARKER_VAR, free_port, http_get_headers, processes_with};

#[test]
fn dev_mode_serves_the_example_app_and_stops_cleanly() -> Result<()> {
    let bins = Bins::locate()?;
    let api = free_port()?;
    let front = free_port()?;
    let marker = format!("dev-{}", std::process::id());
    let config = tempfile::tempdir()?;
    let mut dev = Command::new(&bins.skymirror)
        .args([
            "dev",
            "--listen",
            &api.to_string(),
            "--edge-listen",
            &front.to_string(),
        ])
        .env(MARKER_VAR, &marker)
        // `skymirror dev` writes the CLI's context `dev`: into the test's
        // own config file, not the user's.
        .env("SKYMIRROR_CONFIG", config.path().join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        // Every request through the front door is answered by one of the six replicas.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 6 {
            if Instant::now() > deadline {
                bail!("the front door served only {seen:?} within 30 s");
            }
            match http_get_headers(&front.to_string(), "/", Duration::from_secs(2)) {
                Ok((200, h, body)) => {
                    ensure!(
                        body.contains("Hello from skymirror!"),
                        "unexpected body {body:?}"
                    );
                    seen.insert(
                        h.get("x-skymirror-replica")
                            .cloned()
                            .context("no replica header")?,
                    );
                }
                // Not up yet.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        ensure!(
            seen.iter().all(|r| r.starts_with("hello/local-")),
            "replicas: {seen:?}"
        );
        let replicas = processes_with(MARKER_VAR, &marker)
            .iter()
            .filter(|(_, e)| e.contains_key("SKYMIRROR_REPLICA"))
            .count();
        ensure!(replicas == 6, "{replicas} replica processes, expected 6");
        Ok(())
    })();
    // SIGTERM, as a service manager or `timeout` would send.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(dev.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = dev.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left = processes_with(MARKER_VAR, &marker);
    for (pid, _) in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(*pid)?),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if status.is_none() {
        let _ = dev.kill();
        let _ = dev.wait();
    }
    result?;
    let status = status.context("skymirror dev did not stop within 20 s of SIGTERM")?;
    ensure!(status.success(), "skymirror dev exited with {status}");
    ensure!(
        left.is_empty(),
        "processes left after the stop: {:?}",
        left.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    Ok(())
}
