//! End to end through the front door (`skymirror edge`) when providers and
//! replicas fail *gray*: frozen (SIGSTOP) rather than dead, so the kernel still
//! accepts their connections and nothing answers. No request may fail and
//! none may wait a second. Also: a graceful front-door stop on SIGTERM.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use nix::sys::signal::Signal;
use skymirror_tests::{
    Cluster, Load, LoadReport, cluster_behind_front_door, free_port, providers_yaml,
};

const WAIT: Duration = Duration::from_secs(30);
/// Each client sends one request every 5 ms, each on a fresh connection.
const PACE: Duration = Duration::from_millis(5);
/// Clients at once, as in the issue that reported the gray failures.
const CLIENTS: usize = 4;
/// How long a gray failure lasts: past the daemon's suspect threshold (1 s)
/// and its outside probes (3 s).
const FROZEN_FOR: Duration = Duration::from_secs(5);

/// Three providers, two replicas of the app on each, a front door in front.
fn setup() -> Result<(Cluster, SocketAddr)> {
    cluster_behind_front_door(WAIT)
}

/// Runs `during` under load from [`CLIENTS`] clients and returns what they saw
/// together.
fn under_load(front: SocketAddr, during: impl FnOnce() -> Result<()>) -> Result<LoadReport> {
    let loads: Vec<Load> = (0..CLIENTS).map(|_| Load::start(front, PACE)).collect();
    let outcome = during();
    let mut total = LoadReport::default();
    for load in loads {
        let r = load.finish()?;
        total.sent += r.sent;
        total.failed += r.failed;
        total.failures.extend(r.failures);
        total.slowest = total.slowest.max(r.slowest);
        total.slow.extend(r.slow);
        for (replica, (n, last)) in r.by_replica {
            let e = total.by_replica.entry(replica).or_insert((0, last));
            e.0 += n;
            e.1 = e.1.max(last);
        }
    }
    outcome?;
    Ok(total)
}

/// No failed request and none slower than a second.
fn unharmed(what: &str, report: &LoadReport) -> Result<()> {
    eprintln!(
        "{what}: {} requests, {} failed, slowest {:?}, {} over 1 s",
        report.sent,
        report.failed,
        report.slowest,
        report.slow.len()
    );
    ensure!(
        report.sent > 200,
        "the load sent only {} requests",
        report.sent
    );
    ensure!(
        report.failed == 0,
        "{} of {} requests failed: {:?}",
        report.failed,
        report.sent,
        report.failures.iter().take(10).collect::<Vec<_>>()
    );
    ensure!(
        report.slow.is_empty(),
        "{} requests took more than a second (slowest {:?}): {:?}",
        report.slow.len(),
        report.slowest,
        report.slow.iter().take(10).collect::<Vec<_>>()
    );
    Ok(())
}

/// Keeps the load on for `d`: the window in which the failure is measured.
fn hold(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_frozen_provider_costs_no_request_and_none_waits_a_second() -> Result<()> {
    let (mut c, front) = setup()?;
    let report = under_load(front, || {
        hold(Duration::from_secs(1));
        let frozen = c.signal_provider("aa", Signal::SIGSTOP)?;
        ensure!(
            frozen == 3,
            "froze {frozen} processes, expected the agent and 2 replicas"
        );
        hold(FROZEN_FOR);
        c.signal_provider("aa", Signal::SIGCONT)?;
        c.wait_state("aa", "up", WAIT)?;
        hold(Duration::from_secs(1));
        Ok(())
    })?;
    unharmed("provider aa frozen for 5 s", &report)
}

#[test]
fn a_replica_that_accepts_and_never_answers_is_hedged_around() -> Result<()> {
    let (c, front) = setup()?;
    let report = under_load(front, || {
        hold(Duration::from_secs(1));
        let frozen = c.signal_replica("web/bb/0", Signal::SIGSTOP)?;
        ensure!(frozen == 1, "froze {frozen} processes of web/bb/0");
        hold(FROZEN_FOR);
        // The agent may have replaced it meanwhile; whatever runs now goes on.
        c.signal_replica("web/bb/0", Signal::SIGCONT)?;
        hold(Duration::from_secs(1));
        Ok(())
    })?;
    unharmed("replica web/bb/0 frozen for 5 s", &report)?;
    // The hedge delay is learned from the route's latency: the frozen replica's
    // requests were answered by others well within the hedge ceiling.
    ensure!(
        report.slowest < Duration::from_millis(700),
        "slowest request {:?}",
        report.slowest
    );
    Ok(())
}

#[test]
fn sigterm_stops_the_front_door_gracefully() -> Result<()> {
    let (mut c, front) = setup()?;
    let started = Instant::now();
    let status = c.terminate_edge(0, Duration::from_secs(10))?;
    ensure!(status.success(), "the front door exited with {status}");
    ensure!(
        started.elapsed() < Duration::from_secs(6),
        "it took {:?} to stop with nothing in flight",
        started.elapsed()
    );
    ensure!(
        std::net::TcpStream::connect_timeout(&front, Duration::from_secs(1)).is_err(),
        "{front} still accepts connections"
    );
    Ok(())
}

/// An app that records every POST body, one line per request, in a file of
/// its own replica under `$POST_LOG_DIR`, and answers `GET /healthz`.
const COUNTING_APP: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = os.path.join(os.environ["POST_LOG_DIR"], os.environ["SKYMIRROR_REPLICA"].replace("/", "_"))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(b"ok")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(LOG, "ab") as f:
            f.write(body + b"\n")
        self.answer(b"recorded")

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// One POST over a fresh connection; the status, or why there was none.
fn post(front: SocketAddr, body: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&front, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /orders HTTP/1.1\r\nHost: {front}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad response {raw:?}"))
}

#[test]
fn a_post_is_never_delivered_twice_when_a_provider_freezes() -> Result<()> {
    if !std::path::Path::new("/usr/bin/python3").exists() {
        ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test needs /usr/bin/python3, and CI=true"
        );
        eprintln!("skipping: no /usr/bin/python3");
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let script = c.write_spec("counting_app.py", COUNTING_APP)?;
    let logs = script.with_file_name("posts");
    std::fs::create_dir_all(&logs)?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb", "cc"]))?;
    for p in ["aa", "bb", "cc"] {
        c.start_agent(p)?;
    }
    let front = free_port()?;
    let app = format!(
        "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: orders
spec:
  command: /usr/bin/python3
  args: [\"{}\"]
  env:
    POST_LOG_DIR: \"{}\"
  ports:
    - name: http
  replicas: 1
  stopGracePeriod: 2s
  placement:
    mode: mirror
  health:
    http: {{path: /healthz, port: http}}
    interval: 500ms
    timeout: 400ms
  failover:
    failbackAfter: 2s
  routing:
    listen: \"{front}\"
    port: http
    responseTimeout: 1s
",
        script.display(),
        logs.display()
    );
    c.apply_ok("orders.yaml", &app)?;
    c.wait_ready("orders", &["aa", "bb", "cc"], 1, 1, WAIT)?;
    c.start_edge(&[])?;
    c.wait_until("the front door to take orders", WAIT, |_| {
        Ok((post(front, "warm-up")? == 200).then_some(()))
    })?;

    // Orders flow while aa freezes; each is sent once by the client.
    let mut statuses = Vec::new();
    let frozen = c.signal_provider("aa", Signal::SIGSTOP)?;
    ensure!(
        frozen == 2,
        "froze {frozen} processes, expected the agent and its replica"
    );
    let until = Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    while Instant::now() < until {
        statuses.push((format!("order-{n}"), post(front, &format!("order-{n}"))?));
        n += 1;
    }
    // The frozen replica wakes and handles whatever it had received.
    c.signal_provider("aa", Signal::SIGCONT)?;
    c.wait_state("aa", "up", WAIT)?;
    hold(Duration::from_secs(1));

    let mut delivered: std::collections::BTreeMap<String, usize> = Default::default();
    for entry in std::fs::read_dir(&logs)? {
        for line in std::fs::read_to_string(entry?.path())?.lines() {
            *delivered.entry(line.to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        twice.is_empty(),
        "orders delivered more than once: {twice:?}"
    );
    let ok = statuses.iter().filter(|(_, s)| *s == 200).count();
    let timed_out = statuses.iter().filter(|(_, s)| *s == 504).count();
    eprintln!(
        "{} orders while aa was frozen: {ok} answered 200, {timed_out} answered 504 (sent to aa before its ejection), none delivered twice",
        statuses.len()
    );
    for (id, status) in &statuses {
        ensure!(
            *status == 200 || *status == 504,
            "{id} got {status}, expected 200 or 504"
        );
        if *status == 200 {
            ensure!(
                delivered.get(id) == Some(&1),
                "{id} answered 200 but not recorded once"
            );
        }
    }
    ensure!(ok > statuses.len() / 2, "most orders went through");
    Ok(())
}
