//! The `process` driver: runs each replica as a plain child process of the host.
//!
//! Every replica gets a directory `state_dir/replicas/<app>-<index>/` holding its
//! `stdout.log` and `stderr.log` (and serving as its working directory unless the
//! workload names one). The replica runs in its own session, so it outlives the
//! agent and is not hit by signals sent to the agent's terminal; after an agent
//! restart [`Driver::recover`] re-attaches to it through `/proc`.
//!
//! A pid alone does not identify a process for long: pids are reused. The handle
//! therefore records the process start time (field 22 of `/proc/<pid>/stat`), and
//! the driver treats a pid whose start time differs as a process that is gone.
//!
//! Marks, so that replicas are found without the agent's `replicas.json`
//! ([`Driver::list_instances`]), the way the docker driver finds its containers
//! by label:
//! - **The handle file.** `start` writes the instance's handle, with its
//!   replica and workload generation, to `replicas/<app>-<index>/handle` (a
//!   checked file, [`crate::checked`]) before it returns, so before the agent
//!   persists it: the file is never older than `replicas.json`. Listing reads
//!   these files, and a process whose pid and start time match one is listed
//!   as adoptable with exactly the handle `start` returned.
//! - **The environment.** Every replica is started with
//!   `SKYMIRROR_PROCESS_OWNER` (this driver's absolute state directory) and
//!   `SKYMIRROR_WORKLOAD_GENERATION` beside `SKYMIRROR_PROVIDER`,
//!   `SKYMIRROR_APP` and `SKYMIRROR_INDEX`. Listing also scans `/proc` for
//!   process group leaders whose environment (`/proc/<pid>/environ`) carries
//!   this driver's owner and the provider, and whose parent does not (a
//!   replica's own children inherit its environment): a replica started just
//!   before the agent died, before its handle file was written, or whose
//!   handle file is gone or damaged. Those are listed for removal only — the
//!   environment does not hold everything a handle does — with their start
//!   time, so a stop never reaches a later process that reused the pid.
//!   Apps that rewrite their environment block (`setproctitle`) are found by
//!   their handle file only.
//!
//! Output: the two logs only grow while the replica directory lives (a
//! restarted or replaced instance appends to them), so [`Driver::logs`] reads
//! them from the end: the last lines of `stdout.log`, then those of
//! `stderr.log` (the files do not say how the two streams interleaved), then,
//! when following, whatever either gains, polled, until the instance exits.
//!
//! Invariant: the driver never signals a pid whose start time does not match
//! the handle it was given.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Capabilities, Driver, DriverError, Handle, Inspection, Listed, ListedReplica, LogOptions,
    MAX_LOG_CHUNK, ReplicaKey, ReplicaSpec,
};

/// Driver kind stored in every handle this driver makes.
const KIND: &str = "process";
/// How often `stop` looks whether the replica is gone.
const POLL: Duration = Duration::from_millis(50);
/// How long `stop` waits for the kernel to finish a SIGKILLed replica.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// The replica's output files, in the order `logs` sends them.
const LOG_FILES: [&str; 2] = ["stdout.log", "stderr.log"];
/// Most bytes `logs` sends of each file before following, whatever the line
/// count: one endless line must not make a tail read the whole file.
const MAX_TAIL_BYTES: u64 = 4 * 1024 * 1024;
/// How often a followed replica's logs are looked at for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Operations at once: spawning and signalling local processes is cheap, and
/// a stop mostly waits out its grace, so only a bound against a runaway burst.
const MAX_OPERATIONS: u32 = 256;
/// Inspection period: reading `/proc` and the reaper's table costs next to
/// nothing, so crashes are seen within a quarter second.
const INSPECT_INTERVAL: Duration = Duration::from_millis(250);
/// Beyond the grace, a stop polls for the exit (`POLL`), sends SIGKILL and
/// waits up to `KILL_WAIT` for the kernel to finish the process.
const STOP_OVERHEAD: Duration = KILL_WAIT.saturating_add(POLL.saturating_mul(2));
/// The replica's handle file, in its directory.
const HANDLE_FILE: &str = "handle";
/// What the handle file's header says it holds.
const HANDLE_KIND: &str = "process-handle";
/// Environment mark: the absolute state directory of the driver that started
/// the replica, so that agents of other state directories (other providers,
/// other installations on the host) never take it for theirs.
const OWNER_VAR: &str = "SKYMIRROR_PROCESS_OWNER";
/// Environment mark: the workload generation the replica was started with.
const GENERATION_VAR: &str = "SKYMIRROR_WORKLOAD_GENERATION";

/// Settings of a [`ProcessDriver`].
#[derive(Debug, Clone)]
pub struct ProcessDriverConfig {
    /// Directory the driver owns; replica directories go under `replicas/`.
    pub state_dir: PathBuf,
    /// Directories searched for a workload's command before `PATH`, and
    /// prepended to the replica's `PATH` (so bundled tools win over the host's).
    pub search_path: Vec<PathBuf>,
    /// Host replicas are told to bind and reported at.
    pub bind_host: IpAddr,
}

impl ProcessDriverConfig {
    /// A config with no extra search path that binds replicas to 127.0.0.1.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ProcessDriverConfig {
            state_dir: state_dir.into(),
            search_path: Vec::new(),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Runs replicas as host processes. See the module docs.
#[derive(Debug)]
pub struct ProcessDriver {
    /// Settings, with `state_dir` made absolute so handles stay valid if the
    /// agent's working directory changes.
    config: ProcessDriverConfig,
    /// `setsid` program, if the host has one: it puts the replica in a new
    /// session without `pre_exec` (which would need `unsafe`).
    setsid: Option<PathBuf>,
    /// Children this driver spawned, by pid. Only the reaper sees a child's exit
    /// status, so it leaves it here for `inspect`.
    children: Arc<Mutex<HashMap<u32, ChildRecord>>>,
}

/// What the driver knows of a child it spawned.
#[derive(Debug, Clone, Copy)]
struct ChildRecord {
    /// Start time of the child, to tell it from a later process with its pid.
    start_time: u64,
    /// Exit status once the reaper has collected it.
    exit: Option<ExitStatus>,
}

/// What the driver keeps in [`Handle::data`]: enough to re-attach and to
/// `exec` in the replica's environment after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProcessData {
    /// Pid of the replica, also its process group and session id.
    pid: u32,
    /// Start time of the replica in clock ticks since boot (`/proc/<pid>/stat` field 22).
    start_time: u64,
    /// The replica's own directory.
    replica_dir: PathBuf,
    /// Working directory the replica runs in.
    working_dir: PathBuf,
    /// Variables set on top of the agent's environment. The agent's own
    /// environment is not persisted: it may hold secrets.
    env: Vec<(String, String)>,
}

/// What the handle file of a replica holds: the instance's handle as `start`
/// returned it, and which replica it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HandleRecord {
    /// Provider the replica runs for.
    provider: String,
    /// The replica.
    key: ReplicaKey,
    /// The workload generation it was started with.
    workload_generation: u64,
    /// The handle `start` returned.
    handle: Handle,
}

/// The fields of `/proc/<pid>/stat` the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcStat {
    /// Executable name, as the kernel truncates it (15 bytes).
    comm: String,
    /// State letter: `R`, `S`, `Z`, ...
    state: char,
    /// Parent process id.
    ppid: i32,
    /// Process group id.
    pgrp: i32,
    /// Session id.
    session: i32,
    /// Start time in clock ticks since boot.
    start_time: u64,
}

impl ProcessDriver {
    /// Creates the driver and its state directory.
    pub fn new(mut config: ProcessDriverConfig) -> Result<Self, DriverError> {
        config.state_dir = std::path::absolute(&config.state_dir).map_err(|e| {
            DriverError::io(format!("state directory {}", config.state_dir.display()), e)
        })?;
        let replicas = config.state_dir.join("replicas");
        std::fs::create_dir_all(&replicas)
            .map_err(|e| DriverError::io(format!("create {}", replicas.display()), e))?;
        let setsid = Some(PathBuf::from("/usr/bin/setsid"))
            .filter(|p| is_executable(p))
            .or_else(|| find_in(std::env::var_os("PATH").as_deref(), "setsid"));
        Ok(ProcessDriver {
            config,
            setsid,
            children: Arc::default(),
        })
    }

    /// Directory of one replica: `state_dir/replicas/<app>-<index>`.
    pub fn replica_dir(&self, key: &ReplicaKey) -> PathBuf {
        self.config
            .state_dir
            .join("replicas")
            .join(format!("{}-{}", key.app, key.index))
    }

    /// The value of the replicas' [`OWNER_VAR`] mark.
    fn owner(&self) -> String {
        self.config.state_dir.to_string_lossy().into_owned()
    }

    /// The replicas whose handle files say they run for `provider`, running
    /// or not; damaged files are logged and skipped (their processes, if
    /// any, are found by their environment).
    fn listed_by_handle_file(&self, provider: &str) -> Result<Vec<Listed>, DriverError> {
        let replicas = self.config.state_dir.join("replicas");
        let entries = std::fs::read_dir(&replicas)
            .map_err(|e| DriverError::io(format!("list {}", replicas.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join(HANDLE_FILE);
            let raw = match std::fs::read(&path) {
                Ok(raw) => raw,
                // A replica directory of a release before handle files, or
                // of a replica that never started.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read a replica's handle file");
                    continue;
                }
            };
            let record = match read_handle_file(&raw) {
                Ok(record) => record,
                Err(why) => {
                    tracing::warn!(file = %path.display(), problem = %why, "a replica's handle file is unusable; its process, if it runs, is found by its environment");
                    continue;
                }
            };
            if record.provider != provider || record.handle.driver != KIND {
                continue;
            }
            out.push(Listed {
                replica: Some(ListedReplica {
                    key: record.key,
                    workload_generation: record.workload_generation,
                }),
                handle: record.handle,
                adoptable: true,
            });
        }
        Ok(out)
    }

    /// Running replicas of `provider` marked as this driver's in their
    /// environment, but not named by any of `known` (pid and start time):
    /// for removal only.
    fn listed_by_environment(
        &self,
        provider: &str,
        known: &[(u32, u64)],
    ) -> Result<Vec<Listed>, DriverError> {
        let owner = self.owner();
        let ours = |pid: i32| {
            u32::try_from(pid)
                .ok()
                .and_then(|pid| read_environ(pid).ok())
                .is_some_and(|env| env.get(OWNER_VAR) == Some(&owner))
        };
        let entries = std::fs::read_dir("/proc").map_err(|e| DriverError::io("list /proc", e))?;
        let mut out = Vec::new();
        for pid in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            // Processes come and go while the scan runs: any that cannot be
            // read is one that is gone, or not ours to read.
            let Ok(stat) = read_stat(pid) else { continue };
            let Ok(raw_pid) = i32::try_from(pid) else {
                continue;
            };
            if stat.pgrp != raw_pid || matches!(stat.state, 'Z' | 'X') {
                continue;
            }
            if known.contains(&(pid, stat.start_time)) {
                continue;
            }
            let Ok(env) = read_environ(pid) else { continue };
            if env.get(OWNER_VAR) != Some(&owner)
                || env.get("SKYMIRROR_PROVIDER").map(String::as_str) != Some(provider)
                || ours(stat.ppid)
            {
                continue;
            }
            let replica = (|| {
                let key = ReplicaKey {
                    app: env.get("SKYMIRROR_APP")?.clone(),
                    index: env.get("SKYMIRROR_INDEX")?.parse().ok()?,
                };
                Some(ListedReplica {
                    workload_generation: env.get(GENERATION_VAR)?.parse().ok()?,
                    key,
                })
            })();
            // Its own directory when the marks name a usable one; `destroy`
            // refuses anything else.
            let replica_dir = match &replica {
                Some(r) if valid_app_name(&r.key.app) => self.replica_dir(&r.key),
                _ => self.config.state_dir.join("replicas"),
            };
            let data = ProcessData {
                pid,
                start_time: stat.start_time,
                working_dir: replica_dir.clone(),
                replica_dir,
                env: Vec::new(),
            };
            out.push(Listed {
                handle: Handle {
                    driver: KIND.to_string(),
                    instance_id: pid.to_string(),
                    address: None,
                    ports: BTreeMap::new(),
                    started_at_ms: 0,
                    data: serde_json::to_value(&data)
                        .map_err(|e| DriverError::Runtime(format!("encode handle data: {e}")))?,
                },
                replica,
                adoptable: false,
            });
        }
        Ok(out)
    }

    /// Locks the child table; a panic elsewhere cannot leave it inconsistent
    /// (every update is a single insert or remove), so poisoning is ignored.
    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ChildRecord>> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops what the reaper recorded for the replica of `data`: once it is
    /// stopped or destroyed nobody asks for its exit status again. Without this
    /// the table would grow by one entry per replica ever started.
    fn forget(&self, data: &ProcessData) {
        let mut children = self.children();
        if children
            .get(&data.pid)
            .is_some_and(|r| r.start_time == data.start_time)
        {
            children.remove(&data.pid);
        }
    }

    /// Whether the process of `data` still runs: for a child of this driver,
    /// until the reaper saw it exit; for any other, while `/proc` shows a
    /// non-zombie with the recorded start time.
    fn inspect_data(&self, data: &ProcessData) -> Inspection {
        if let Some(record) = self.children().get(&data.pid)
            && record.start_time == data.start_time
        {
            return match record.exit {
                Some(status) => Inspection::Exited {
                    code: status.code(),
                    signal: status.signal(),
                },
                None => Inspection::RUNNING,
            };
        }
        match read_stat(data.pid) {
            Ok(stat) if stat.start_time == data.start_time && !matches!(stat.state, 'Z' | 'X') => {
                Inspection::RUNNING
            }
            _ => Inspection::Exited {
                code: None,
                signal: None,
            },
        }
    }

    /// Sends `signal` to the replica's process group, after checking the pid
    /// still belongs to it. Returns whether a signal was sent.
    fn signal(&self, data: &ProcessData, signal: Signal) -> Result<bool, DriverError> {
        let Ok(stat) = read_stat(data.pid) else {
            return Ok(false);
        };
        if stat.start_time != data.start_time {
            return Ok(false);
        }
        let pid = Pid::from_raw(to_raw_pid(data.pid)?);
        // The replica leads its own group, so this reaches anything it started
        // too; the fallback covers a process whose group was changed under us.
        let sent = if stat.pgrp == pid.as_raw() {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
        match sent {
            Ok(()) => Ok(true),
            Err(Errno::ESRCH) => Ok(false),
            Err(e) => Err(DriverError::Runtime(format!(
                "send {signal} to process {}: {e}",
                data.pid
            ))),
        }
    }

    /// Waits until the replica is gone or `deadline` passes; returns whether it is gone.
    async fn wait_gone(&self, data: &ProcessData, deadline: Instant) -> bool {
        loop {
            if matches!(self.inspect_data(data), Inspection::Exited { .. }) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    /// Builds the replica's environment on top of the agent's.
    fn replica_env(
        &self,
        spec: &ReplicaSpec,
        ports: &[(String, u16)],
    ) -> Result<Vec<(String, String)>, DriverError> {
        let mut env = super::replica_env(spec, ports);
        if !self.config.search_path.is_empty() {
            // The workload's own PATH, if it sets one, is what the search path extends.
            let base = match spec.workload.env.iter().rev().find(|(k, _)| k == "PATH") {
                Some((_, path)) => Some(OsString::from(path)),
                None => std::env::var_os("PATH"),
            };
            let mut dirs = self.config.search_path.clone();
            dirs.extend(base.iter().flat_map(std::env::split_paths));
            let path = std::env::join_paths(dirs).map_err(|e| {
                DriverError::InvalidWorkload(format!("app {}: search path: {e}", spec.key.app))
            })?;
            let path = path.into_string().map_err(|p| {
                DriverError::InvalidWorkload(format!(
                    "app {}: PATH is not UTF-8: {p:?}",
                    spec.key.app
                ))
            })?;
            env.push(("PATH".into(), path));
        }
        Ok(env)
    }
}

impl Driver for ProcessDriver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            recover: true,
            exec: true,
            logs: true,
            max_concurrent_operations: MAX_OPERATIONS,
            inspect_interval: INSPECT_INTERVAL,
            stop_overhead: STOP_OVERHEAD,
            runtime_restarts: false,
        }
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<Handle, DriverError> {
        let key = &spec.key;
        let workload = &spec.workload;
        let command = workload.command.as_deref().ok_or_else(|| {
            DriverError::InvalidWorkload(format!(
                "app {}: the process driver needs `command`",
                key.app
            ))
        })?;
        // The app name becomes a path component; keep it from escaping `replicas/`.
        if !valid_app_name(&key.app) {
            return Err(DriverError::InvalidWorkload(format!(
                "app {:?}: not usable as a directory name",
                key.app
            )));
        }

        let replica_dir = self.replica_dir(key);
        tokio::fs::create_dir_all(&replica_dir)
            .await
            .map_err(|e| DriverError::io(format!("create {}", replica_dir.display()), e))?;
        let working_dir = match &workload.working_dir {
            Some(dir) => std::path::absolute(dir)
                .map_err(|e| DriverError::io(format!("working directory {}", dir.display()), e))?,
            None => replica_dir.clone(),
        };
        if !working_dir.is_dir() {
            return Err(DriverError::InvalidWorkload(format!(
                "app {}: working directory {} does not exist",
                key.app,
                working_dir.display()
            )));
        }

        let ports = super::pick_host_ports(self.config.bind_host, workload)?;
        let mut env = self.replica_env(spec, &ports)?;
        env.push((OWNER_VAR.into(), self.owner()));
        env.push((GENERATION_VAR.into(), spec.workload_generation.to_string()));
        let child_path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v);
        let program = resolve_command(command, &working_dir, child_path.map(OsString::from))
            .ok_or_else(|| {
                DriverError::InvalidWorkload(format!(
                    "app {}: command `{command}` not found in PATH or search path",
                    key.app
                ))
            })?;

        let log = |name: &str| {
            let path = replica_dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| DriverError::io(format!("open {}", path.display()), e))
        };
        let (stdout, stderr) = (log("stdout.log")?, log("stderr.log")?);

        let mut cmd = match &self.setsid {
            // The child is not a group leader, so setsid execs in place and the
            // pid we get is the replica's own.
            Some(setsid) => {
                let mut cmd = Command::new(setsid);
                cmd.arg("--").arg(&program);
                cmd
            }
            None => {
                let mut cmd = Command::new(&program);
                cmd.process_group(0);
                cmd
            }
        };
        cmd.args(&workload.args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&working_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            DriverError::io(format!("app {}: spawn {}", key.app, program.display()), e)
        })?;
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));

        // Until reaped the child stays at least a zombie, so its stat is readable.
        let stat = child
            .id()
            .ok_or_else(|| io::Error::other("child exited before its pid was read"))
            .and_then(|pid| Ok((pid, read_stat(pid)?)));
        let (pid, start_time) = match stat {
            Ok((pid, stat)) => (pid, stat.start_time),
            Err(e) => {
                let _ = child.start_kill();
                tokio::spawn(async move { child.wait().await });
                return Err(DriverError::io(
                    format!("app {}: read its /proc entry", key.app),
                    e,
                ));
            }
        };

        self.children().insert(
            pid,
            ChildRecord {
                start_time,
                exit: None,
            },
        );
        let children = Arc::clone(&self.children);
        let replica = key.to_string();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    tracing::debug!(%replica, pid, %status, "replica exited");
                    Some(status)
                }
                Err(e) => {
                    tracing::warn!(%replica, pid, error = %e, "waiting for replica failed");
                    None
                }
            };
            let mut children = children.lock().unwrap_or_else(PoisonError::into_inner);
            // Only the entry of this very child: stop may have dropped it already.
            if children
                .get(&pid)
                .is_some_and(|record| record.start_time == start_time)
            {
                match exit {
                    Some(status) => {
                        children.insert(
                            pid,
                            ChildRecord {
                                start_time,
                                exit: Some(status),
                            },
                        );
                    }
                    // Status unknown: forget the child so inspect falls back to /proc.
                    None => {
                        children.remove(&pid);
                    }
                }
            }
        });
        tracing::info!(replica = %key, pid, program = %program.display(), "replica started");

        let data = ProcessData {
            pid,
            start_time,
            replica_dir: replica_dir.clone(),
            working_dir,
            env,
        };
        let handle = Handle {
            driver: KIND.to_string(),
            instance_id: pid.to_string(),
            address: ports
                .first()
                .map(|(_, port)| SocketAddr::new(self.config.bind_host, *port).to_string()),
            ports: ports.into_iter().collect::<BTreeMap<_, _>>(),
            started_at_ms,
            data: serde_json::to_value(&data)
                .map_err(|e| DriverError::Runtime(format!("encode handle data: {e}")))?,
        };
        let record = HandleRecord {
            provider: spec.provider.clone(),
            key: key.clone(),
            workload_generation: spec.workload_generation,
            handle: handle.clone(),
        };
        // Without its handle file the replica is still found by its
        // environment, for removal: a failed write costs a restart after an
        // agent restart that also lost `replicas.json`, never a duplicate.
        if let Err(e) = write_handle_file(&replica_dir, &record).await {
            tracing::warn!(replica = %key, pid, error = %e, "cannot write the replica's handle file");
        }
        Ok(handle)
    }

    async fn recover(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        Ok(self.inspect_data(&decode(handle)?))
    }

    async fn inspect(&self, handle: &Handle) -> Result<Inspection, DriverError> {
        Ok(self.inspect_data(&decode(handle)?))
    }

    async fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), DriverError> {
        let data = decode(handle)?;
        if matches!(self.inspect_data(&data), Inspection::Exited { .. }) {
            self.forget(&data);
            return Ok(());
        }
        self.signal(&data, Signal::SIGTERM)?;
        if !self.wait_gone(&data, Instant::now() + grace).await {
            tracing::info!(
                pid = data.pid,
                ?grace,
                "replica ignored SIGTERM; killing it"
            );
            self.signal(&data, Signal::SIGKILL)?;
            if !self.wait_gone(&data, Instant::now() + KILL_WAIT).await {
                return Err(DriverError::Runtime(format!(
                    "process {} still runs {KILL_WAIT:?} after SIGKILL",
                    data.pid
                )));
            }
        }
        self.forget(&data);
        Ok(())
    }

    async fn destroy(&self, handle: &Handle) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let replicas = self.config.state_dir.join("replicas");
        // The handle is persisted data: never delete outside our own directory.
        if !data.replica_dir.starts_with(&replicas) || data.replica_dir == replicas {
            return Err(DriverError::Runtime(format!(
                "refusing to remove {}: not a replica directory under {}",
                data.replica_dir.display(),
                replicas.display()
            )));
        }
        self.forget(&data);
        match tokio::fs::remove_dir_all(&data.replica_dir).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DriverError::io(
                format!("remove {}", data.replica_dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }

    async fn exec(
        &self,
        handle: &Handle,
        command: &[String],
        timeout: Duration,
    ) -> Result<Option<i32>, DriverError> {
        let data = decode(handle)?;
        let (program, args) = command
            .split_first()
            .ok_or_else(|| DriverError::InvalidWorkload("exec: empty command".into()))?;
        // Its own group, so a timeout kills whatever the command started too.
        let mut child = Command::new(program)
            .args(args)
            .envs(data.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&data.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DriverError::io(format!("exec `{}`", command.join(" ")), e))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            // A command killed by a signal reports 128 + signal, as shells do.
            Ok(Ok(status)) => Ok(Some(
                status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            )),
            Ok(Err(e)) => Err(DriverError::io(
                format!("wait for `{}`", command.join(" ")),
                e,
            )),
            Err(_) => {
                // The child is unreaped, so its pid is still ours to signal.
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = tokio::time::timeout(KILL_WAIT, child.wait()).await;
                Ok(None)
            }
        }
    }

    /// The replicas named by handle files (adoptable, running or not), then
    /// the running ones found only by their environment (for removal). See
    /// the module docs.
    async fn list_instances(&self, provider: &str) -> Result<Vec<Listed>, DriverError> {
        let mut listed = self.listed_by_handle_file(provider)?;
        let mut known = Vec::with_capacity(listed.len());
        for l in &mut listed {
            let data = decode(&l.handle)?;
            known.push((data.pid, data.start_time));
        }
        listed.extend(self.listed_by_environment(provider, &known)?);
        Ok(listed)
    }

    async fn logs(
        &self,
        handle: &Handle,
        options: LogOptions,
        out: mpsc::Sender<Vec<u8>>,
    ) -> Result<(), DriverError> {
        let data = decode(handle)?;
        let mut followed = Vec::with_capacity(LOG_FILES.len());
        for name in LOG_FILES {
            let path = data.replica_dir.join(name);
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                // A replica started by an older agent may lack one of them.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DriverError::io(format!("open {}", path.display()), e)),
            };
            let read = async {
                let len = file.metadata().await?.len();
                let start = tail_start(&mut file, len, options.tail_lines, MAX_TAIL_BYTES).await?;
                let sent = send_range(&mut file, start, len, &out).await?;
                Ok::<_, io::Error>((len, sent))
            };
            let (len, sent) = read
                .await
                .map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
            if !sent {
                return Ok(());
            }
            followed.push((path, file, len));
        }
        if followed.is_empty() {
            return Err(DriverError::Runtime(format!(
                "no output kept for process {}: {} holds no logs",
                data.pid,
                data.replica_dir.display()
            )));
        }
        if !options.follow {
            return Ok(());
        }
        loop {
            // Looked at before the read, so what an exiting replica wrote last
            // is still read before the stream ends.
            let running = matches!(self.inspect_data(&data), Inspection::Running { .. });
            for (path, file, pos) in &mut followed {
                let read = async {
                    let len = file.metadata().await?.len();
                    // Shorter than what was sent: someone truncated it; start over.
                    if len < *pos {
                        *pos = 0;
                    }
                    let sent = send_range(file, *pos, len, &out).await?;
                    *pos = len;
                    Ok::<_, io::Error>(sent)
                };
                let sent = read
                    .await
                    .map_err(|e| DriverError::io(format!("read {}", path.display()), e))?;
                if !sent {
                    return Ok(());
                }
            }
            if !running {
                return Ok(());
            }
            tokio::select! {
                _ = out.closed() => return Ok(()),
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }
}

/// Where the last `lines` lines of a file of `len` bytes start, at most
/// `max_bytes` before its end; a cut at that bound moves to the next line
/// start, unless a single line is longer than the bound. A final newline ends
/// the last line rather than starting an empty one.
async fn tail_start<R>(file: &mut R, len: u64, lines: u32, max_bytes: u64) -> io::Result<u64>
where
    R: AsyncRead + AsyncSeek + Unpin,
{
    const BLOCK: u64 = 64 * 1024;
    let floor = len.saturating_sub(max_bytes);
    // One byte before the floor too, to see whether the floor starts a line.
    let scan_floor = floor.saturating_sub(1);
    let mut buf = vec![0; BLOCK as usize];
    let mut newlines = 0u32;
    let mut earliest_newline = None;
    let mut end = len;
    while end > scan_floor {
        let start = end.saturating_sub(BLOCK).max(scan_floor);
        let block = buf
            .get_mut(..usize::try_from(end - start).unwrap_or(usize::MAX))
            .ok_or_else(|| io::Error::other("tail block larger than its buffer"))?;
        file.seek(io::SeekFrom::Start(start)).await?;
        file.read_exact(block).await?;
        for (offset, byte) in block.iter().enumerate().rev() {
            let pos = start + offset as u64;
            if *byte != b'\n' || pos + 1 == len {
                continue;
            }
            earliest_newline = Some(pos);
            newlines += 1;
            if newlines == lines || pos < floor {
                return Ok(pos + 1);
            }
        }
        end = start;
    }
    Ok(match earliest_newline {
        _ if floor == 0 => 0,
        Some(pos) => pos + 1,
        None => floor,
    })
}

/// Sends bytes `start..end` of `file` to `out` in pieces of at most
/// [`MAX_LOG_CHUNK`]; returns `false` when the receiver is gone. Stops early
/// at the end of a file that shrank meanwhile.
async fn send_range<R>(
    file: &mut R,
    start: u64,
    end: u64,
    out: &mpsc::Sender<Vec<u8>>,
) -> io::Result<bool>
where
    R: AsyncRead + AsyncSeek + Unpin,
{
    file.seek(io::SeekFrom::Start(start)).await?;
    let mut left = end.saturating_sub(start);
    while left > 0 {
        let want = usize::try_from(left).map_or(MAX_LOG_CHUNK, |l| l.min(MAX_LOG_CHUNK));
        let mut piece = vec![0; want];
        let n = file.read(&mut piece).await?;
        if n == 0 {
            break;
        }
        piece.truncate(n);
        left -= n as u64;
        if out.send(piece).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads the driver's data out of a handle.
fn decode(handle: &Handle) -> Result<ProcessData, DriverError> {
    if handle.driver != KIND {
        return Err(DriverError::Runtime(format!(
            "handle of the {} driver given to the {KIND} driver",
            handle.driver
        )));
    }
    serde_json::from_value(handle.data.clone()).map_err(|e| {
        DriverError::Runtime(format!(
            "handle of process {}: bad data: {e}",
            handle.instance_id
        ))
    })
}

/// Whether an app name is usable as a directory name under `replicas/`.
fn valid_app_name(app: &str) -> bool {
    !(app.is_empty() || app.starts_with('.') || app.contains(['/', '\0']))
}

/// Writes the handle file of a replica (see the module docs). Not synced to
/// the disk: it serves an agent restart, which the replica's process
/// survives, and a machine crash takes the process with it.
async fn write_handle_file(replica_dir: &Path, record: &HandleRecord) -> io::Result<()> {
    let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
    let path = replica_dir.join(HANDLE_FILE);
    tokio::task::spawn_blocking(move || {
        crate::checked::write_atomic_unsynced(&path, &crate::checked::seal(HANDLE_KIND, &payload))
    })
    .await
    .map_err(io::Error::other)?
}

/// The record in a handle file's bytes, or what is wrong with them.
fn read_handle_file(raw: &[u8]) -> Result<HandleRecord, String> {
    match crate::checked::open(raw, HANDLE_KIND) {
        Ok(crate::checked::Opened::Checked(payload)) => {
            serde_json::from_slice(payload).map_err(|e| format!("damaged: {e}"))
        }
        Ok(crate::checked::Opened::Legacy(_)) => Err("damaged: it has no header".into()),
        Err(damage) => Err(damage.to_string()),
    }
}

/// The environment a process was started with (`/proc/<pid>/environ`).
fn read_environ(pid: u32) -> io::Result<HashMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|var| {
            let var = std::str::from_utf8(var).ok()?;
            let (name, value) = var.split_once('=')?;
            Some((name.to_string(), value.to_string()))
        })
        .collect())
}

/// Converts a pid for nix.
fn to_raw_pid(pid: u32) -> Result<i32, DriverError> {
    i32::try_from(pid).map_err(|_| DriverError::Runtime(format!("pid {pid} out of range")))
}

/// Finds the program to run: a name with a '/' is a path relative to
/// `working_dir`; a bare name is looked up in `path` (the child's `PATH`, which
/// already starts with the search path) or else the agent's `PATH`.
fn resolve_command(command: &str, working_dir: &Path, path: Option<OsString>) -> Option<PathBuf> {
    if command.contains('/') {
        let candidate = working_dir.join(command);
        return is_executable(&candidate).then_some(candidate);
    }
    let path = path.or_else(|| std::env::var_os("PATH"));
    find_in(path.as_deref(), command).and_then(|found| std::path::absolute(found).ok())
}

/// First executable `name` in the directories of a `PATH`-style list.
fn find_in(path: Option<&std::ffi::OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file with an execute bit set.
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Reads `/proc/<pid>/stat`. procfs reads are served from memory, so a
/// blocking read is fine even on the async path.
fn read_stat(pid: u32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unexpected format"),
        )
    })
}

/// Parses a `/proc/<pid>/stat` line. The command name may hold spaces and
/// parentheses, so the fields after it are found from the *last* `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields from 3 (state) on; field n is at index n - 3.
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{PortSpec, Workload};

    /// Kills a test's replica group when the test ends, even by panicking.
    struct KillOnDrop(i32);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }

    fn workload(command: &str, args: &[&str]) -> Workload {
        Workload {
            image: None,
            command: Some(command.to_string()),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("GREETING".into(), "hi".into())],
            ports: vec![],
            working_dir: None,
            stop_grace: Duration::from_secs(5),
            cpu_millis: None,
            memory_mib: None,
        }
    }

    fn spec(app: &str, workload: Workload) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey {
                app: app.to_string(),
                index: 0,
            },
            provider: "local".into(),
            workload,
            workload_generation: 1,
        }
    }

    fn driver(dir: &tempfile::TempDir) -> ProcessDriver {
        ProcessDriver::new(ProcessDriverConfig::new(dir.path())).expect("driver")
    }

    async fn start(driver: &ProcessDriver, spec: &ReplicaSpec) -> (Handle, KillOnDrop) {
        let handle = driver.start(spec).await.expect("start");
        let pid = handle.instance_id.parse().expect("pid");
        (handle, KillOnDrop(pid))
    }

    /// Waits, with a deadline, until the replica exits.
    async fn wait_exit(driver: &ProcessDriver, handle: &Handle) -> Inspection {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let inspection = driver.inspect(handle).await.expect("inspect");
            if inspection != Inspection::RUNNING {
                return inspection;
            }
            assert!(Instant::now() < deadline, "replica did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits, with a deadline, until `/proc` shows `comm` for `pid` (setsid
    /// execs the command a moment after the spawn returns).
    async fn wait_comm(pid: u32, comm: &str) -> ProcStat {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = read_stat(pid).expect("stat");
            if stat.comm == comm {
                return stat;
            }
            assert!(Instant::now() < deadline, "pid {pid} runs {:?}", stat.comm);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line =
            "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2\n";
        let stat = parse_stat(line).expect("parse");
        assert_eq!(stat.comm, "a) b) (c");
        assert_eq!(stat.state, 'S');
        assert_eq!((stat.pgrp, stat.session), (4242, 4242));
        assert_eq!(stat.start_time, 987654);
        assert_eq!(parse_stat("4242 (truncated) S 1"), None);
    }

    #[tokio::test]
    async fn start_inspect_stop_in_own_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let (handle, _guard) = start(&driver, &spec("sleepy", workload("sleep", &["60"]))).await;
        let pid: u32 = handle.instance_id.parse().expect("pid");
        assert_eq!(handle.driver, "process");
        assert_eq!(handle.address, None);

        let stat = wait_comm(pid, "sleep").await;
        assert_eq!(stat.session, pid as i32, "own session");
        assert_eq!(stat.pgrp, pid as i32, "own process group");
        assert_eq!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::RUNNING
        );

        driver
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
        assert!(matches!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::Exited { .. }
        ));
        driver.destroy(&handle).await.expect("destroy");
        assert!(
            !driver
                .replica_dir(&spec("sleepy", workload("x", &[])).key)
                .exists()
        );
        driver.destroy(&handle).await.expect("destroy twice");
    }

    #[tokio::test]
    async fn environment_ports_and_stdout_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        let mut config = ProcessDriverConfig::new(dir.path().join("state"));
        config.search_path = vec![bin.clone()];
        let driver = ProcessDriver::new(config).expect("driver");

        let mut workload = workload(
            "sh",
            &[
                "-c",
                "echo PORT=$PORT; echo PORT_HTTP=$PORT_HTTP; echo PORT_ADMIN_API=$PORT_ADMIN_API; \
                 echo REPLICA=$SKYMIRROR_REPLICA; echo GREETING=$GREETING; echo PATH=$PATH; \
                 echo oops >&2",
            ],
        );
        workload.ports = ["http", "admin-api"]
            .into_iter()
            .map(|name| PortSpec {
                name: name.into(),
                container_port: None,
                protocol: "tcp".into(),
            })
            .collect();
        let spec = spec("web", workload);
        let (handle, _guard) = start(&driver, &spec).await;
        assert_eq!(
            wait_exit(&driver, &handle).await,
            Inspection::Exited {
                code: Some(0),
                signal: None
            }
        );

        let http = handle.ports["http"];
        let admin = handle.ports["admin-api"];
        assert_ne!(http, admin);
        assert_eq!(handle.address, Some(format!("127.0.0.1:{http}")));
        let replica_dir = driver.replica_dir(&spec.key);
        let out = std::fs::read_to_string(replica_dir.join("stdout.log")).expect("stdout.log");
        assert!(out.contains(&format!("PORT={http}\n")), "{out}");
        assert!(out.contains(&format!("PORT_HTTP={http}\n")), "{out}");
        assert!(out.contains(&format!("PORT_ADMIN_API={admin}\n")), "{out}");
        assert!(out.contains("REPLICA=web/local/0\n"), "{out}");
        assert!(out.contains("GREETING=hi\n"), "{out}");
        assert!(out.contains(&format!("PATH={}:", bin.display())), "{out}");
        let err = std::fs::read_to_string(replica_dir.join("stderr.log")).expect("stderr.log");
        assert_eq!(err, "oops\n");
    }

    #[tokio::test]
    async fn crash_reports_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let (handle, _guard) =
            start(&driver, &spec("crash", workload("sh", &["-c", "exit 3"]))).await;
        assert_eq!(
            wait_exit(&driver, &handle).await,
            Inspection::Exited {
                code: Some(3),
                signal: None
            }
        );
        driver
            .stop(&handle, Duration::from_secs(1))
            .await
            .expect("stop an exited replica");
    }

    #[tokio::test]
    async fn missing_or_absent_command_is_invalid_workload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let err = driver
            .start(&spec("nope", workload("skymirror-no-such-command", &[])))
            .await
            .expect_err("not found");
        assert!(matches!(err, DriverError::InvalidWorkload(_)), "{err:?}");
        assert!(
            err.to_string().contains("not found in PATH or search path"),
            "{err}"
        );
        assert!(!err.is_retryable());

        let err = driver
            .start(&spec("nope", workload("./missing.sh", &[])))
            .await
            .expect_err("not found");
        assert!(matches!(err, DriverError::InvalidWorkload(_)), "{err:?}");

        let mut no_command = workload("x", &[]);
        no_command.command = None;
        let err = driver
            .start(&spec("nope", no_command))
            .await
            .expect_err("no command");
        assert_eq!(
            err.to_string(),
            "app nope: the process driver needs `command`"
        );
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_for_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let script = "trap '' TERM; sleep 60 & wait; sleep 60";
        let (handle, _guard) =
            start(&driver, &spec("stubborn", workload("sh", &["-c", script]))).await;
        let pid: u32 = handle.instance_id.parse().expect("pid");
        wait_comm(pid, "sh").await;
        // Give the shell time to install its trap before it is signalled.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let grace = Duration::from_millis(300);
        let begun = Instant::now();
        driver.stop(&handle, grace).await.expect("stop");
        let took = begun.elapsed();
        assert!(
            took >= grace,
            "stopped in {took:?}: SIGTERM was not ignored"
        );
        assert!(took < grace + Duration::from_secs(2), "stop took {took:?}");
        assert!(matches!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::Exited { .. }
        ));
        // The backgrounded sleep was in the group and died with it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_members(pid as i32) > 0 {
            assert!(Instant::now() < deadline, "group {pid} survived SIGKILL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Live (non-zombie) processes in process group `pgrp`.
    fn group_members(pgrp: i32) -> usize {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| read_stat(pid).ok())
            .filter(|s| s.pgrp == pgrp && s.state != 'Z')
            .count()
    }

    #[tokio::test]
    async fn wrong_start_time_is_never_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let (handle, _guard) = start(&driver, &spec("reused", workload("sleep", &["60"]))).await;
        let mut stale = handle.clone();
        let mut data = decode(&handle).expect("data");
        data.start_time += 1;
        stale.data = serde_json::to_value(&data).expect("encode");

        let fresh = ProcessDriver::new(ProcessDriverConfig::new(dir.path())).expect("driver");
        for d in [&driver, &fresh] {
            assert_eq!(
                d.recover(&stale).await.expect("recover"),
                Inspection::Exited {
                    code: None,
                    signal: None
                }
            );
            d.stop(&stale, Duration::from_millis(100))
                .await
                .expect("stop");
        }
        assert_eq!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::RUNNING
        );
        driver
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
    }

    #[tokio::test]
    async fn a_restarted_agent_recovers_and_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = driver(&dir);
        let (handle, _guard) = start(&first, &spec("survivor", workload("sleep", &["60"]))).await;
        let persisted = serde_json::to_string(&handle).expect("persist");
        drop(first);

        let second = driver(&dir);
        let handle: Handle = serde_json::from_str(&persisted).expect("load");
        assert_eq!(
            second.recover(&handle).await.expect("recover"),
            Inspection::RUNNING
        );
        assert_eq!(
            second
                .exec(&handle, &["true".into()], Duration::from_secs(5))
                .await
                .expect("exec"),
            Some(0)
        );
        second
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
        assert_eq!(
            second.inspect(&handle).await.expect("inspect"),
            Inspection::Exited {
                code: None,
                signal: None
            }
        );
    }

    /// Where the tail of `text` starts, for `lines` lines and `max_bytes`.
    async fn tail_of(text: &str, lines: u32, max_bytes: u64) -> String {
        let mut file = io::Cursor::new(text.as_bytes().to_vec());
        let start = tail_start(&mut file, text.len() as u64, lines, max_bytes)
            .await
            .expect("tail_start");
        text[usize::try_from(start).expect("offset")..].to_string()
    }

    #[tokio::test]
    async fn tail_counts_lines_from_the_end_within_the_byte_bound() {
        let text = "a\nb\nc\n";
        assert_eq!(tail_of(text, 1, 100).await, "c\n");
        assert_eq!(tail_of(text, 2, 100).await, "b\nc\n");
        assert_eq!(tail_of(text, 3, 100).await, text);
        assert_eq!(tail_of(text, 10, 100).await, text);
        // An unfinished last line counts as a line.
        assert_eq!(tail_of("a\nb\nc", 1, 100).await, "c");
        assert_eq!(tail_of("a\n\n\n", 2, 100).await, "\n\n");
        assert_eq!(tail_of("", 5, 100).await, "");

        // The byte bound cuts at the next line start...
        let text = "aaaa\nbbbb\ncccc\n";
        assert_eq!(tail_of(text, 10, 7).await, "cccc\n");
        // ... or exactly at it when a line starts there ...
        assert_eq!(tail_of(text, 10, 10).await, "bbbb\ncccc\n");
        // ... and mid-line only for a line longer than the bound.
        assert_eq!(tail_of("xxxxxxxxxx", 3, 4).await, "xxxx");

        // Over several read blocks.
        let long: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert!(long.len() > 2 * 64 * 1024);
        assert_eq!(
            tail_of(&long, 3, MAX_TAIL_BYTES).await,
            "line 19997\nline 19998\nline 19999\n"
        );
        let cut = tail_of(&long, 20_000, 100_000).await;
        assert!(
            cut.len() <= 100_000 && cut.starts_with("line "),
            "{cut:.20}"
        );
    }

    /// Everything `logs` sends, once it returns.
    async fn read_logs(driver: &ProcessDriver, handle: &Handle, options: LogOptions) -> String {
        crate::driver::testing::read_logs(driver, handle, options, Duration::from_secs(20))
            .await
            .expect("logs")
    }

    #[tokio::test]
    async fn logs_send_the_last_lines_of_stdout_then_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let script = "for i in 1 2 3 4 5; do echo out$i; done; echo err1 >&2; echo err2 >&2";
        let (handle, _guard) = start(&driver, &spec("talk", workload("sh", &["-c", script]))).await;
        wait_exit(&driver, &handle).await;

        let two = read_logs(&driver, &handle, LogOptions::new(2, false)).await;
        assert_eq!(two, "out4\nout5\nerr1\nerr2\n");
        let all = read_logs(&driver, &handle, LogOptions::new(0, false)).await;
        assert_eq!(all, "out1\nout2\nout3\nout4\nout5\nerr1\nerr2\n");
        // Following an instance that has exited sends what is there and ends.
        let followed = read_logs(&driver, &handle, LogOptions::new(1, true)).await;
        assert_eq!(followed, "out5\nerr2\n");

        driver.destroy(&handle).await.expect("destroy");
        let (tx, _rx) = mpsc::channel(1);
        let err = driver
            .logs(&handle, LogOptions::new(1, false), tx)
            .await
            .expect_err("no logs after destroy");
        assert!(err.to_string().contains("no output kept"), "{err}");
    }

    #[tokio::test]
    async fn following_sends_new_output_until_the_replica_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let script = "echo first; sleep 0.6; echo second; sleep 0.6; echo third >&2; echo fourth";
        let (handle, _guard) = start(&driver, &spec("slow", workload("sh", &["-c", script]))).await;
        let begun = Instant::now();
        let out = read_logs(&driver, &handle, LogOptions::new(0, true)).await;
        // The lines came as they were written, and the stream ended only with
        // the replica, which wrote its last line after 1.2 s.
        assert!(begun.elapsed() >= Duration::from_millis(1200));
        assert!(out.starts_with("first\nsecond\n"), "{out:?}");
        let mut rest: Vec<&str> = out["first\nsecond\n".len()..].lines().collect();
        rest.sort_unstable();
        assert_eq!(rest, ["fourth", "third"], "{out:?}");
        assert!(matches!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::Exited { .. }
        ));
    }

    #[tokio::test]
    async fn following_stops_when_the_reader_goes_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let (handle, _guard) = start(
            &driver,
            &spec(
                "quiet",
                workload("sh", &["-c", "echo hello; exec sleep 60"]),
            ),
        )
        .await;
        let (tx, mut rx) = mpsc::channel(4);
        let read = driver.logs(&handle, LogOptions::new(0, true), tx);
        let reader = async move {
            let mut seen = Vec::new();
            while !seen.ends_with(b"hello\n") {
                match rx.recv().await {
                    Some(piece) => seen.extend(piece),
                    None => panic!("logs ended while the replica runs"),
                }
            }
            // Going away here ends the follow.
        };
        let (result, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(read, reader)
        })
        .await
        .expect("logs returned once nobody read");
        result.expect("logs");
        assert_eq!(
            driver.inspect(&handle).await.expect("inspect"),
            Inspection::RUNNING
        );
        driver
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
    }

    #[tokio::test]
    async fn exec_uses_the_replica_environment_and_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let (handle, _guard) = start(&driver, &spec("execs", workload("sleep", &["60"]))).await;
        let run = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let check =
            run("test \"$GREETING\" = hi && test \"$SKYMIRROR_APP\" = execs && test -f stdout.log");
        assert_eq!(
            driver
                .exec(&handle, &check, Duration::from_secs(5))
                .await
                .expect("exec"),
            Some(0)
        );
        assert_eq!(
            driver
                .exec(&handle, &run("exit 7"), Duration::from_secs(5))
                .await
                .expect("exec"),
            Some(7)
        );

        let begun = Instant::now();
        let slow = driver
            .exec(&handle, &run("sleep 30"), Duration::from_millis(200))
            .await;
        assert_eq!(slow.expect("exec"), None);
        assert!(begun.elapsed() < Duration::from_secs(3));
        driver
            .stop(&handle, Duration::from_secs(5))
            .await
            .expect("stop");
    }

    /// Kills, when dropped, every process the driver of `dir` marked as its
    /// own, whatever group or session it is in.
    struct KillMarked(String);

    impl Drop for KillMarked {
        fn drop(&mut self) {
            for pid in marked(&self.0) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }

    /// Live processes carrying the owner mark `owner`.
    fn marked(owner: &str) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| read_stat(*pid).is_ok_and(|s| s.state != 'Z'))
            .filter(|pid| {
                read_environ(*pid)
                    .is_ok_and(|env| env.get(OWNER_VAR).map(String::as_str) == Some(owner))
            })
            .collect()
    }

    fn indexed(app: &str, index: u32, provider: &str, workload: Workload) -> ReplicaSpec {
        ReplicaSpec {
            key: ReplicaKey {
                app: app.to_string(),
                index,
            },
            provider: provider.into(),
            workload,
            workload_generation: 4,
        }
    }

    /// `instance id → (replica, adoptable)` of a listing.
    fn by_instance(listed: &[Listed]) -> BTreeMap<String, (Option<String>, bool)> {
        listed
            .iter()
            .map(|l| {
                let replica = l
                    .replica
                    .as_ref()
                    .map(|r| format!("{}@{}", r.key, r.workload_generation));
                (l.handle.instance_id.clone(), (replica, l.adoptable))
            })
            .collect()
    }

    #[tokio::test]
    async fn replicas_are_listed_by_their_handle_files_and_their_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let _cleanup = KillMarked(driver.owner());
        let sleep = workload("sleep", &["60"]);
        let (web0, _g0) = start(&driver, &indexed("web", 0, "local", sleep.clone())).await;
        // Its child leads a session of its own but inherits the marks: it is
        // the replica's, not an instance.
        let forks = workload("sh", &["-c", "setsid sleep 60 & exec sleep 61"]);
        let (web1, _g1) = start(&driver, &indexed("web", 1, "local", forks)).await;
        let (other, _g2) = start(&driver, &indexed("api", 0, "elsewhere", sleep.clone())).await;
        // Another state directory is another agent's.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let stranger = ProcessDriver::new(ProcessDriverConfig::new(dir2.path())).expect("driver");
        let _cleanup2 = KillMarked(stranger.owner());
        let (_, _g3) = start(&stranger, &indexed("web", 2, "local", sleep.clone())).await;
        let web1_pid: u32 = web1.instance_id.parse().expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while marked(&driver.owner()).len() < 4 {
            assert!(Instant::now() < deadline, "setsid's child did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_comm(web1_pid, "sleep").await;

        let listed = driver.list_instances("local").await.expect("list");
        assert_eq!(
            by_instance(&listed),
            [
                (web0.instance_id.clone(), (Some("web/0@4".into()), true)),
                (web1.instance_id.clone(), (Some("web/1@4".into()), true)),
            ]
            .into()
        );
        let of = |id: &str| {
            listed
                .iter()
                .find(|l| l.handle.instance_id == id)
                .expect("listed")
        };
        assert_eq!(
            of(&web0.instance_id).handle,
            web0,
            "not the handle start returned"
        );
        assert_eq!(
            by_instance(&driver.list_instances("elsewhere").await.expect("list")),
            [(other.instance_id.clone(), (Some("api/0@4".into()), true))].into()
        );

        // Without its handle file (deleted, or damaged) a replica is still
        // found, by its environment, for removal only.
        std::fs::remove_file(driver.replica_dir(&web0_key()).join(HANDLE_FILE)).expect("delete");
        let handle1 = driver
            .replica_dir(&ReplicaKey {
                app: "web".into(),
                index: 1,
            })
            .join(HANDLE_FILE);
        let raw = std::fs::read(&handle1).expect("read");
        std::fs::write(&handle1, &raw[..raw.len() / 2]).expect("truncate");
        let listed = driver.list_instances("local").await.expect("list");
        assert_eq!(
            by_instance(&listed),
            [
                (web0.instance_id.clone(), (Some("web/0@4".into()), false)),
                (web1.instance_id.clone(), (Some("web/1@4".into()), false)),
            ]
            .into()
        );
        // Stopping what was found that way stops the replica and its group.
        for l in &listed {
            driver
                .stop(&l.handle, Duration::from_secs(5))
                .await
                .expect("stop");
        }
        for h in [&web0, &web1] {
            assert!(matches!(
                driver.inspect(h).await.expect("inspect"),
                Inspection::Exited { .. }
            ));
        }
    }

    fn web0_key() -> ReplicaKey {
        ReplicaKey {
            app: "web".into(),
            index: 0,
        }
    }

    #[tokio::test]
    async fn an_exited_replica_is_listed_by_its_handle_file_and_a_reused_pid_is_not_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver(&dir);
        let _cleanup = KillMarked(driver.owner());
        let (handle, _guard) =
            start(&driver, &indexed("web", 0, "local", workload("true", &[]))).await;
        wait_exit(&driver, &handle).await;
        let listed = driver.list_instances("local").await.expect("list");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].adoptable);
        assert!(matches!(
            driver.recover(&listed[0].handle).await.expect("recover"),
            Inspection::Exited { .. }
        ));
        // Destroying it removes its directory, handle file included.
        driver.destroy(&listed[0].handle).await.expect("destroy");
        assert!(
            driver
                .list_instances("local")
                .await
                .expect("list")
                .is_empty()
        );
    }
}
