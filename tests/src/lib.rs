//! Harness for skymirror's end-to-end tests and benchmarks: it runs the real
//! `skymirror` and `skymirror-agent` binaries over real sockets, with real
//! replica processes, and cleans up every process it started, even when a
//! test fails.
//!
//! The binaries are found next to the test executable's `target/<profile>`
//! directory; they are built by the test command (`cargo build --workspace`
//! before the tests), never from inside a test.
//!
//! Waiting is driven by the daemon's event stream: [`Cluster::wait_until`]
//! re-checks its condition whenever an event arrives (and at least once a
//! second), up to a deadline, and reports the last observation on timeout.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `skymirror` (daemon and CLI).
    pub skymirror: PathBuf,
    /// `skymirror-agent`.
    pub agent: PathBuf,
    /// `skymirror-example`, the test app.
    pub example: PathBuf,
}

impl Bins {
    /// Locates the binaries of the current build profile.
    pub fn locate() -> Result<Self> {
        let exe = std::env::current_exe()?;
        // target/<profile>/deps/<test> or target/<profile>/<bin>
        let mut dir = exe
            .parent()
            .context("test executable has no directory")?
            .to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bins = Bins {
            skymirror: dir.join("skymirror"),
            agent: dir.join("skymirror-agent"),
            example: dir.join("skymirror-example"),
        };
        for b in [&bins.skymirror, &bins.agent, &bins.example] {
            if !b.exists() {
                bail!(
                    "{} is missing: build the binaries first (`cargo build --workspace`, as tests/scripts/test.sh does)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }

    /// The directory holding the binaries (agents search it for app commands).
    pub fn dir(&self) -> PathBuf {
        self.skymirror
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}

/// A TCP relay in front of the daemon that can be cut (existing connections
/// reset, new ones refused) and restored: a network partition on loopback.
#[derive(Debug)]
pub struct Relay {
    /// Where agents connect.
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Relays a fresh loopback port to `target`.
    pub fn start(target: SocketAddr) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, st, cs) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(target) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone())
                    && let Ok(mut list) = cs.lock()
                {
                    list.push(a);
                    list.push(b);
                }
                pipe(client, upstream);
            }
        });
        Ok(Relay {
            addr,
            cut,
            conns,
            stop,
        })
    }

    /// Resets every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut list) = self.conns.lock() {
            for s in list.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies both ways between two sockets on two threads.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Both);
    });
}

/// Env var set on every process a cluster starts; replicas inherit it, which
/// is how [`Cluster`]'s drop finds and kills them.
pub const MARKER_VAR: &str = "SKYMIRROR_TEST_MARKER";

/// A daemon, agents, and the replicas they run, for one test.
#[derive(Debug)]
pub struct Cluster {
    /// Binaries.
    pub bins: Bins,
    /// Scratch directory (data dir, agent state dirs, spec files).
    pub dir: tempfile::TempDir,
    /// Daemon address.
    pub addr: SocketAddr,
    /// Join token.
    pub token: String,
    marker: String,
    daemon: Option<Child>,
    agents: BTreeMap<String, Child>,
    relays: BTreeMap<String, Relay>,
    edges: Vec<Child>,
    events: Option<EventFeed>,
}

#[derive(Debug)]
struct EventFeed {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

fn random_marker() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{}-{:?}", std::process::id(), Instant::now()))
}

impl Cluster {
    /// Starts a daemon on a free loopback port.
    pub fn start() -> Result<Self> {
        let mut cluster = Self::new("127.0.0.1:0".parse()?, random_marker())?;
        cluster.start_daemon()?;
        Ok(cluster)
    }

    /// A cluster whose daemon runs elsewhere (in a container, say) at `addr`:
    /// the CLI helpers and waits work against it; nothing is started here, and
    /// dropping it stops nothing but the event feed.
    pub fn attach(addr: SocketAddr) -> Result<Self> {
        Self::new(addr, String::new())
    }

    /// A cluster with nothing started yet.
    fn new(addr: SocketAddr, token: String) -> Result<Self> {
        // SKYMIRROR_KEEP_TEST_DIRS=1 keeps the scratch directory (logs, state) for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("skymirror-e2e-")
            .disable_cleanup(std::env::var_os("SKYMIRROR_KEEP_TEST_DIRS").is_some())
            .tempdir()?;
        if !token.is_empty() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.path().join("join-token"))?
                .write_all(token.as_bytes())?;
        }
        Ok(Cluster {
            bins: Bins::locate()?,
            dir,
            addr,
            token,
            marker: random_marker(),
            daemon: None,
            agents: BTreeMap::new(),
            relays: BTreeMap::new(),
            edges: Vec::new(),
            events: None,
        })
    }

    /// The environment marker of this cluster's processes (see [`MARKER_VAR`]).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The daemon URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The daemon's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("daemon")
    }

    /// The file holding the join token, beside the data directory so that a
    /// test that loses the data directory keeps it.
    pub fn join_token_file(&self) -> PathBuf {
        self.dir.path().join("join-token")
    }

    /// Starts (or restarts, on the same port) the daemon and waits until it listens.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(&[])
    }

    /// The daemon's command line on this cluster's data dir, address and
    /// token, with `extra` flags.
    fn daemon_command(&self, extra: &[&str]) -> Command {
        // A plaintext loopback daemon whose agents present the shared join
        // token in their hello; the token is a file, never an argument.
        let mut cmd = Command::new(&self.bins.skymirror);
        cmd.args(["daemon", "--data-dir"])
            .arg(self.data_dir())
            .args([
                "--listen",
                &self.addr.to_string(),
                "--insecure-plaintext",
                "--join-token-file",
            ])
            .arg(self.join_token_file())
            .args(["--log", "info"])
            .args(extra)
            .env(MARKER_VAR, &self.marker);
        cmd
    }

    /// Runs the daemon with `extra` flags expecting it to refuse to start:
    /// returns its exit status and standard error once it exits, and fails
    /// (killing it) if it is still running after `timeout`.
    pub fn daemon_refusal(&self, extra: &[&str], timeout: Duration) -> Result<Output> {
        let mut child = self
            .daemon_command(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the daemon")?;
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "the daemon did not exit within {timeout:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.wait_with_output()?)
    }

    /// Starts (or restarts, on the same port) the daemon with `extra` flags
    /// (`--restore FILE`, `--reset-store`) and waits until it listens.
    pub fn start_daemon_with(&mut self, extra: &[&str]) -> Result<()> {
        let mut child = self
            .daemon_command(extra)
            .stdout(Stdio::piped())
            .stderr(log_file(self.dir.path(), "daemon.log")?)
            .spawn()
            .context("starting the daemon")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .context("the daemon exited before listening (see daemon.log)")??;
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line from the daemon: {line:?}"))?;
        self.addr = addr;
        self.daemon = Some(child);
        self.events = None;
        Ok(())
    }

    /// `kill -9` the daemon.
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.kill()?;
            d.wait()?;
        }
        self.events = None;
        Ok(())
    }

    /// Pid of the daemon process.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The state directory of a provider's agent.
    pub fn agent_dir(&self, provider: &str) -> PathBuf {
        self.dir.path().join("agents").join(provider)
    }

    /// Starts the agent of `provider` (process driver).
    pub fn start_agent(&mut self, provider: &str) -> Result<()> {
        let url = self.url();
        self.spawn_agent(provider, &url)
    }

    /// Starts the agent of `provider` behind a relay that [`Cluster::cut`] can
    /// sever, to partition it from the daemon while it and its replicas run on.
    pub fn start_agent_behind_relay(&mut self, provider: &str) -> Result<()> {
        let relay = Relay::start(self.addr)?;
        let url = format!("http://{}", relay.addr);
        self.relays.insert(provider.to_string(), relay);
        self.spawn_agent(provider, &url)
    }

    /// Starts a front door (`skymirror edge`) that binds each route's listen
    /// address as given, or at `overrides[listen]`.
    pub fn start_edge(&mut self, overrides: &[(&str, SocketAddr)]) -> Result<()> {
        let mut cmd = Command::new(&self.bins.skymirror);
        cmd.args(["--server", &self.url(), "edge", "--log", "info"]);
        for (route, addr) in overrides {
            cmd.arg("--listen-override").arg(format!("{route}={addr}"));
        }
        let n = self.edges.len();
        let child = cmd
            .env(MARKER_VAR, &self.marker)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("edge-{n}.log"))?)
            .spawn()
            .context("starting the front door")?;
        self.edges.push(child);
        Ok(())
    }

    /// Cuts the network between a relayed agent and the daemon.
    pub fn cut(&self, provider: &str) -> Result<()> {
        self.relays
            .get(provider)
            .context("no relay for that provider")?
            .cut();
        Ok(())
    }

    /// Restores the network between a relayed agent and the daemon.
    pub fn restore(&self, provider: &str) -> Result<()> {
        self.relays
            .get(provider)
            .context("no relay for that provider")?
            .restore();
        Ok(())
    }

    fn spawn_agent(&mut self, provider: &str, server: &str) -> Result<()> {
        let child = self.agent_process(provider, server, "process")?;
        self.agents.insert(provider.to_string(), child);
        Ok(())
    }

    /// Spawns an agent of `provider` for `server` with `driver` and hands the
    /// process to the caller (who kills it); its log goes to `agent-<provider>.log`.
    pub fn agent_process(&self, provider: &str, server: &str, driver: &str) -> Result<Child> {
        Command::new(&self.bins.agent)
            .args([
                "--server",
                server,
                "--provider",
                provider,
                "--driver",
                driver,
                "--state-dir",
            ])
            .arg(self.agent_dir(provider))
            .arg("--search-path")
            .arg(self.bins.dir())
            .env("SKYMIRROR_JOIN_TOKEN", &self.token)
            .env(MARKER_VAR, &self.marker)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("agent-{provider}.log"))?)
            .spawn()
            .with_context(|| format!("starting the {driver} agent of {provider}"))
    }

    /// Waits until requests through the front door at `front` reach all `all`
    /// replicas (by their `x-skymirror-replica` header).
    pub fn wait_front_door(
        &mut self,
        front: SocketAddr,
        all: usize,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_until(
            &format!("the front door to route to all {all} replicas"),
            timeout,
            |_| {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..10 * all {
                    if let Ok((200, h, _)) =
                        http_get_headers(&front.to_string(), "/", Duration::from_secs(1))
                        && let Some(r) = h.get("x-skymirror-replica")
                    {
                        seen.insert(r.clone());
                    }
                }
                Ok((seen.len() == all).then_some(()))
            },
        )
    }

    /// `kill -9` the agent of `provider` (its replicas keep running).
    pub fn kill_agent(&mut self, provider: &str) -> Result<()> {
        if let Some(mut a) = self.agents.remove(provider) {
            a.kill()?;
            a.wait()?;
        }
        Ok(())
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bins.skymirror)
            .arg("--server")
            .arg(self.url())
            .args(args)
            .env(MARKER_VAR, &self.marker)
            .stdin(Stdio::null())
            .output()
            .context("running the CLI")
    }

    /// Runs the CLI and returns its stdout; fails with its stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "`skymirror {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Writes `yaml` to a file named `name` in the scratch dir and returns its path.
    pub fn write_spec(&self, name: &str, yaml: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    /// `skymirror apply -f` of `yaml` (written to `name`); returns the CLI output.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<Output> {
        let path = self.write_spec(name, yaml)?;
        self.cli(&["apply", "-f", &path.to_string_lossy()])
    }

    /// Like [`Cluster::apply`], failing unless the CLI succeeds; returns stdout.
    pub fn apply_ok(&self, name: &str, yaml: &str) -> Result<String> {
        let path = self.write_spec(name, yaml)?;
        self.cli_ok(&["apply", "-f", &path.to_string_lossy()])
    }

    /// `get replicas -o json`.
    pub fn replicas(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_str(
            &self.cli_ok(&["get", "replicas", "-o", "json"])?,
        )?)
    }

    /// `get providers -o json`.
    pub fn providers(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_str(&self.cli_ok(&[
            "get",
            "providers",
            "-o",
            "json",
        ])?)?)
    }

    /// `get apps -o json`.
    pub fn apps(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_str(
            &self.cli_ok(&["get", "apps", "-o", "json"])?,
        )?)
    }

    /// All events in the log (`events -o json`).
    pub fn events(&self) -> Result<Vec<Value>> {
        self.cli_ok(&["events", "-o", "json"])?
            .lines()
            .map(|l| serde_json::from_str(l).map_err(Into::into))
            .collect()
    }

    fn feed(&mut self) -> Result<&EventFeed> {
        let alive = match self.events.as_mut() {
            Some(f) => f.child.try_wait()?.is_none(),
            None => false,
        };
        if !alive {
            let mut child = Command::new(&self.bins.skymirror)
                .args([
                    "--server",
                    &self.url(),
                    "events",
                    "--follow",
                    "--tail",
                    "1",
                    "-o",
                    "json",
                ])
                .env(MARKER_VAR, &self.marker)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let stdout = child.stdout.take().context("events stdout")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            });
            if let Some(mut old) = self.events.replace(EventFeed { child, rx }) {
                let _ = old.child.kill();
                let _ = old.child.wait();
            }
        }
        self.events.as_ref().context("event feed")
    }

    /// Starts following the daemon's event stream now (if it is not followed
    /// yet), so that [`Cluster::wait_events`] sees every event from here on.
    pub fn follow_events(&mut self) -> Result<()> {
        self.feed().map(|_| ())
    }

    /// Reads the event stream until `done` returns true for an event, up to
    /// `timeout`. Unlike [`Cluster::wait_until`] it runs no CLI per event, for
    /// measurements that such polling would disturb.
    pub fn wait_events(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            match self.feed()?.rx.recv_timeout(left) {
                Ok(event) if done(&event) => return Ok(()),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the event stream ended while waiting for {what}")
                }
            }
        }
    }

    /// Waits until `check` returns `Ok(Some(value))`, re-checking on every event
    /// from the daemon and at least once a second, up to `timeout`. `check`
    /// returning `Err` is taken as "not yet" (e.g. the daemon is restarting);
    /// on timeout, the last error or observation is reported.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Cluster) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => "condition not met".to_string(),
                Err(e) => format!("{e:#}"),
            };
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}: {last}");
            }
            let wait = (deadline - now).min(Duration::from_secs(1));
            match self.feed() {
                Ok(feed) => {
                    // Any event (or the timeout) triggers a re-check; drain the burst.
                    if feed.rx.recv_timeout(wait).is_ok() {
                        while feed.rx.try_recv().is_ok() {}
                    }
                }
                // No daemon to follow right now: fall back to the periodic check.
                Err(_) => std::thread::sleep(wait.min(Duration::from_millis(200))),
            }
        }
    }

    /// Waits until the replicas of `app` are exactly `count` per provider in
    /// `providers`, all ready, on workload generation at least `min_generation`.
    pub fn wait_ready(
        &mut self,
        app: &str,
        providers: &[&str],
        count: usize,
        min_generation: u64,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let app = app.to_string();
        let providers: Vec<String> = providers.iter().map(ToString::to_string).collect();
        self.wait_until(
            &format!("{count} ready replicas of {app} on each of {providers:?}"),
            timeout,
            |c| {
                let all: Vec<Value> = c
                    .replicas()?
                    .into_iter()
                    .filter(|r| r["app"] == app.as_str())
                    .collect();
                for p in &providers {
                    let mine: Vec<&Value> =
                        all.iter().filter(|r| r["provider"] == p.as_str()).collect();
                    let ready = mine
                        .iter()
                        .filter(|r| {
                            r["ready"] == true
                                && r["workloadGeneration"].as_u64().unwrap_or(0) >= min_generation
                        })
                        .count();
                    if mine.len() != count || ready != count {
                        return Ok(None);
                    }
                }
                if all.len() != count * providers.len() {
                    return Ok(None);
                }
                Ok(Some(all))
            },
        )
    }

    /// `kill -9` every replica process of `provider` (with its agent: a provider outage).
    pub fn kill_replicas(&self, provider: &str) -> Result<usize> {
        let mut killed = 0;
        for (id, pids) in self.replica_processes() {
            if id.split('/').nth(1) == Some(provider) {
                for pid in pids {
                    let pid = i32::try_from(pid)?;
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    )?;
                    killed += 1;
                }
            }
        }
        Ok(killed)
    }

    /// The provider entries of `get providers -o json`, by name.
    pub fn provider_states(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .providers()?
            .into_iter()
            .filter_map(|p| {
                Some((
                    p["name"].as_str()?.to_string(),
                    p["state"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// Ready replicas of `app` per provider.
    pub fn ready_counts(&self, app: &str) -> Result<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for r in self.replicas()? {
            if r["app"] == app && r["ready"] == true {
                *out.entry(r["provider"].as_str().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Waits until the ready replicas of `app` per provider are exactly `want`
    /// and every replica on those providers is ready (nothing starting or stopping).
    pub fn wait_counts(
        &mut self,
        app: &str,
        want: &[(&str, usize)],
        timeout: Duration,
    ) -> Result<()> {
        let want: BTreeMap<String, usize> = want.iter().map(|(p, n)| (p.to_string(), *n)).collect();
        self.wait_until(
            &format!("ready replicas of {app} to be {want:?}"),
            timeout,
            |c| {
                let got = c.ready_counts(app)?;
                let settled = c
                    .replicas()?
                    .iter()
                    .filter(|r| {
                        r["app"] == app && want.contains_key(r["provider"].as_str().unwrap_or(""))
                    })
                    .all(|r| r["ready"] == true);
                if got == want && settled {
                    Ok(Some(()))
                } else {
                    bail!(
                        "ready {got:?}, all settled: {settled}; providers {:?}",
                        c.provider_states()?
                    )
                }
            },
        )
    }

    /// Waits until `provider` is in `state` (`up`, `down`, `partitioned`, ...).
    pub fn wait_state(&mut self, provider: &str, state: &str, timeout: Duration) -> Result<()> {
        self.wait_until(
            &format!("provider {provider} to be {state}"),
            timeout,
            |c| {
                Ok(
                    (c.provider_states()?.get(provider).map(String::as_str) == Some(state))
                        .then_some(()),
                )
            },
        )
    }

    /// Sends `signal` to the agent of `provider` and to every replica process of
    /// it (SIGSTOP: a provider that freezes, as a paused VM does); returns how
    /// many processes got it.
    pub fn signal_provider(
        &self,
        provider: &str,
        signal: nix::sys::signal::Signal,
    ) -> Result<usize> {
        let mut pids: Vec<u32> = self
            .agents
            .get(provider)
            .map(Child::id)
            .into_iter()
            .collect();
        for (id, replica_pids) in self.replica_processes() {
            if id.split('/').nth(1) == Some(provider) {
                pids.extend(replica_pids);
            }
        }
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(*pid)?), signal)?;
        }
        Ok(pids.len())
    }

    /// Sends `signal` to the processes of one replica (`app/provider/index`).
    pub fn signal_replica(&self, replica: &str, signal: nix::sys::signal::Signal) -> Result<usize> {
        let pids = self.replica_processes().remove(replica).unwrap_or_default();
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(*pid)?), signal)?;
        }
        Ok(pids.len())
    }

    /// Sends SIGTERM to the `index`th front door started and waits for it to exit
    /// (at most `timeout`, then it is killed and this fails). It is no longer
    /// counted among the cluster's front doors afterwards.
    pub fn terminate_edge(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        anyhow::ensure!(index < self.edges.len(), "no front door {index}");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.edges[index].id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let mut child = self.edges.remove(index);
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(timeout) {
            Ok(status) => {
                let _ = waiter.join();
                Ok(status?)
            }
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = waiter.join();
                bail!("the front door did not exit within {timeout:?} of SIGTERM")
            }
        }
    }

    /// Pids of every replica process of this cluster still alive, by `SKYMIRROR_REPLICA`.
    pub fn replica_processes(&self) -> BTreeMap<String, Vec<u32>> {
        let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (pid, env) in processes_with(MARKER_VAR, &self.marker) {
            if let Some(id) = env.get("SKYMIRROR_REPLICA") {
                out.entry(id.clone()).or_default().push(pid);
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut f) = self.events.take() {
            let _ = f.child.kill();
            let _ = f.child.wait();
        }
        self.relays.clear();
        for mut e in std::mem::take(&mut self.edges) {
            let _ = e.kill();
            let _ = e.wait();
        }
        for (_, mut a) in std::mem::take(&mut self.agents) {
            let _ = a.kill();
            let _ = a.wait();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        // Replicas live in their own sessions and survive their agent: find
        // them by the marker they inherited.
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

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?)
}

/// Processes whose environment has `var=value`, with their environment.
pub fn processes_with(var: &str, value: &str) -> Vec<(u32, BTreeMap<String, String>)> {
    let needle = format!("{var}={value}");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        if !vars.contains(&needle) {
            continue;
        }
        // Zombies keep their environ readable until reaped; skip them.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let env = vars
            .into_iter()
            .filter_map(|v| {
                v.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        out.push((pid, env));
    }
    out
}

/// Whether a process with this pid is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Runs the docker CLI and returns its stdout, failing with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Whether the Docker engine answers and has `images` (built by
/// tests/scripts/build-test-images.sh). When not, `Ok(false)`: the test skips
/// with a message, unless CI=true, where this is an error and the test fails.
pub fn docker_images_ready(test: &str, images: &[&str]) -> Result<bool> {
    let reason = match Command::new("docker")
        .args(["image", "inspect"])
        .args(images)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => return Ok(true),
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("docker image inspect failed")
            .to_string(),
        Err(e) => format!("cannot run docker: {e}"),
    };
    let message = format!(
        "{test}: Docker or the test images are missing ({reason}); build them with tests/scripts/build-test-images.sh"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        bail!("{message}");
    }
    eprintln!("skipping {message}");
    Ok(false)
}

/// A short id unique to this test run, for names on the shared Docker engine.
pub fn unique_id() -> String {
    random_marker().replace('-', "").chars().take(8).collect()
}

/// A free loopback port (bound and released; fine for tests on one machine).
pub fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Steady HTTP load on a background thread: GET `/` at `addr` every
/// `interval`, each on a fresh connection, counting answers per replica.
#[derive(Debug)]
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<LoadReport>>,
}

/// What a [`Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// Requests that failed (no connection, no answer, or a status >= 500).
    pub failed: u64,
    /// The failures, with the time since the load started.
    pub failures: Vec<(Duration, String)>,
    /// Answers per replica (`x-skymirror-replica`), with the time of the last.
    pub by_replica: BTreeMap<String, (u64, Duration)>,
    /// The longest any request took (answered or not).
    pub slowest: Duration,
    /// Requests that took more than a second: when they started, how long.
    pub slow: Vec<(Duration, Duration)>,
}

impl Load {
    /// Starts the load.
    pub fn start(addr: SocketAddr, interval: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut report = LoadReport::default();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                report.sent += 1;
                let at = started.elapsed();
                let result = http_get_headers(&addr.to_string(), "/", Duration::from_secs(3));
                let took = started.elapsed() - at;
                report.slowest = report.slowest.max(took);
                if took > Duration::from_secs(1) {
                    report.slow.push((at, took));
                }
                match result {
                    Ok((status, headers, _)) if status < 500 => {
                        if let Some(r) = headers.get("x-skymirror-replica") {
                            let e = report.by_replica.entry(r.clone()).or_insert((0, at));
                            e.0 += 1;
                            e.1 = at;
                        }
                    }
                    Ok((status, _, body)) => {
                        report.failed += 1;
                        report
                            .failures
                            .push((at, format!("status {status}: {}", body.trim())));
                    }
                    Err(e) => {
                        report.failed += 1;
                        report.failures.push((at, format!("{e:#}")));
                    }
                }
                std::thread::sleep(interval);
            }
            report
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the load and returns what it saw.
    pub fn finish(mut self) -> Result<LoadReport> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .context("load already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One HTTP/1.1 GET over a fresh connection; returns (status, lowercase headers, body).
pub fn http_get_headers(
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, BTreeMap<String, String>, String)> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("bad response from {addr}: {raw:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line from {addr}: {raw:?}"))?;
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Ok((status, headers, body.to_string()))
}

/// One HTTP/1.1 GET over a fresh connection; returns (status, body).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad response from {addr}: {raw:?}"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// YAML of three process providers named `names`.
pub fn providers_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n  name: {n}\n  labels: {{cloud: local}}\nspec:\n  driver: process\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// YAML of process providers with priorities, `(name, priority)`.
pub fn prioritized_providers_yaml(providers: &[(&str, i32)]) -> String {
    providers
        .iter()
        .map(|(n, p)| {
            format!(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n  name: {n}\nspec:\n  driver: process\n  priority: {p}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// YAML of the app `web` ([`app_yaml`]) with `replicas` per provider, routed
/// by the front door on `listen`, failing back after 2 s.
pub fn routed_app_yaml(replicas: u32, listen: SocketAddr) -> String {
    let mut y = app_yaml("web", replicas, "hi", &[]);
    y.push_str(&format!(
        "  failover:\n    failbackAfter: 2s\n  routing:\n    listen: \"{listen}\"\n    port: http\n"
    ));
    y
}

/// Three providers `aa`, `bb`, `cc`, two replicas of `web` on each, and a
/// front door in front of them; returns the cluster and the front door's
/// address once it routes to all six replicas.
pub fn cluster_behind_front_door(wait: Duration) -> Result<(Cluster, SocketAddr)> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb", "cc"]))?;
    for p in ["aa", "bb", "cc"] {
        c.start_agent(p)?;
    }
    let front = free_port()?;
    c.apply_ok("web.yaml", &routed_app_yaml(2, front))?;
    c.wait_ready("web", &["aa", "bb", "cc"], 2, 1, wait)?;
    c.start_edge(&[])?;
    c.wait_front_door(front, 6, wait)?;
    Ok((c, front))
}

/// YAML of an app running `skymirror-example` with an HTTP health check.
pub fn app_yaml(name: &str, replicas: u32, greeting: &str, extra_env: &[(&str, &str)]) -> String {
    let mut env = format!("    GREETING: \"{greeting}\"\n");
    for (k, v) in extra_env {
        env.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    format!(
        "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: {name}
spec:
  command: skymirror-example
  env:
{env}  ports:
    - name: http
  replicas: {replicas}
  stopGracePeriod: 2s
  placement:
    mode: mirror
  health:
    http: {{path: /healthz, port: http}}
    interval: 500ms
    timeout: 400ms
    failureThreshold: 2
"
    )
}
