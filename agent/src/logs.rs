//! Answers the daemon's requests for replica output (`ReplicaLogsRequest`).
//!
//! The supervisor resolves a request to the replicas it names and their
//! instances' handles, then hands them to [`serve`] in a task of its own: one
//! driver read per replica, all at once (a followed replica may never end),
//! each forwarded as `ReplicaLogs` messages on the session's outbound queue,
//! and a last message with `end` once every read is over.
//!
//! Bounds: a driver read hands over at most [`PIECES`] pieces the session has
//! not sent yet, each at most [`MAX_LOG_CHUNK`] bytes; messages join small
//! pieces up to that size. The outbound queue is shared with heartbeats and
//! reports, and its producers wait, so a slow daemon slows the reads.

use std::sync::Arc;

use skymirror_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, Handle, LogOptions, MAX_LOG_CHUNK};

/// Pieces a driver read may get ahead of the session (see the module docs).
const PIECES: usize = 8;

/// One request, as the session hands it to the supervisor.
#[derive(Debug)]
pub struct LogsQuery {
    /// The daemon's id of the request, echoed in every answer.
    pub request_id: u64,
    /// App whose replicas are read.
    pub app: String,
    /// Only this index, if set.
    pub index: Option<u32>,
    /// How much to read.
    pub options: LogOptions,
    /// The session's outbound queue.
    pub out: mpsc::Sender<pb::AgentMessage>,
    /// Cancelled when the daemon cancels the request or the session ends;
    /// [`serve`] cancels it too when it is done, so the session can forget it.
    pub cancel: CancellationToken,
}

/// A replica whose output is read.
#[derive(Debug, Clone)]
pub struct Target {
    /// `app/provider/index`.
    pub replica: String,
    /// Its latest instance; `None` when it has not had one yet.
    pub handle: Option<Handle>,
}

/// Sends the output of `targets` (or, for `Err`, that error about the whole
/// request), then the end of the answer; stops early, with the end, when
/// `query.cancel` is cancelled, and without it when the outbound queue closes.
pub async fn serve<D: Driver>(
    driver: Arc<D>,
    targets: Result<Vec<Target>, String>,
    query: LogsQuery,
) {
    let LogsQuery {
        request_id,
        options,
        out,
        cancel,
        ..
    } = query;
    let message = |replica: &str, data: Vec<u8>, error: String, end: bool| pb::AgentMessage {
        message: Some(pb::agent_message::Message::Logs(pb::ReplicaLogs {
            request_id,
            replica: replica.to_string(),
            data,
            error,
            end,
        })),
    };
    let all = async {
        let targets = match targets {
            Ok(targets) => targets,
            Err(error) => {
                return out
                    .send(message("", Vec::new(), error, false))
                    .await
                    .is_ok();
            }
        };
        // Dropping the set (on cancellation) aborts the reads still running.
        let mut reads = JoinSet::new();
        for target in targets {
            reads.spawn(read_one(
                driver.clone(),
                target,
                options,
                out.clone(),
                request_id,
            ));
        }
        let mut delivered = true;
        while let Some(done) = reads.join_next().await {
            delivered &= done.unwrap_or(true);
        }
        delivered
    };
    let end = message("", Vec::new(), String::new(), true);
    tokio::select! {
        // The end lets the daemon forget a request it cancelled. Best effort:
        // when the session is ending, nobody reads it.
        _ = cancel.cancelled() => {
            let _ = out.try_send(end);
        }
        delivered = all => if delivered {
            let _ = out.send(end).await;
        },
    }
    cancel.cancel();
}

/// Reads one replica's output and forwards it; returns `false` once the
/// outbound queue is closed.
async fn read_one<D: Driver>(
    driver: Arc<D>,
    target: Target,
    options: LogOptions,
    out: mpsc::Sender<pb::AgentMessage>,
    request_id: u64,
) -> bool {
    let send = |data: Vec<u8>, error: String| {
        out.send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Logs(pb::ReplicaLogs {
                request_id,
                replica: target.replica.clone(),
                data,
                error,
                end: false,
            })),
        })
    };
    let Some(handle) = &target.handle else {
        let error = format!(
            "replica {}: no instance has started yet, so there is no output",
            target.replica
        );
        return send(Vec::new(), error).await.is_ok();
    };
    let (tx, mut rx) = mpsc::channel(PIECES);
    let read = driver.logs(handle, options, tx);
    let forward = async move {
        let mut held: Option<Vec<u8>> = None;
        loop {
            let next = match held.take() {
                Some(data) => Some(data),
                None => rx.recv().await,
            };
            let Some(mut data) = next else {
                return true;
            };
            while data.len() < MAX_LOG_CHUNK {
                match rx.try_recv() {
                    Ok(more) if data.len() + more.len() <= MAX_LOG_CHUNK => data.extend(more),
                    Ok(more) => {
                        held = Some(more);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Drivers keep to the bound; this keeps the message bound whatever they do.
            for piece in data.chunks(MAX_LOG_CHUNK) {
                if send(piece.to_vec(), String::new()).await.is_err() {
                    return false;
                }
            }
        }
    };
    let (result, delivered) = tokio::join!(read, forward);
    match result {
        Err(e) if delivered => {
            let error = format!("replica {}: {e}", target.replica);
            send(Vec::new(), error).await.is_ok()
        }
        _ => delivered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{
        Capabilities, DriverError, Inspection, ReplicaSpec, process::ProcessDriver,
    };
    use std::time::Duration;

    /// A driver whose `logs` sends what it is given, then fails or not.
    #[derive(Debug)]
    struct Scripted {
        pieces: Vec<Vec<u8>>,
        fail: bool,
    }

    impl Driver for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                logs: true,
                ..Capabilities::default()
            }
        }
        async fn start(&self, _: &ReplicaSpec) -> Result<Handle, DriverError> {
            Err(DriverError::Runtime("not here".into()))
        }
        async fn recover(&self, _: &Handle) -> Result<Inspection, DriverError> {
            Ok(Inspection::RUNNING)
        }
        async fn inspect(&self, _: &Handle) -> Result<Inspection, DriverError> {
            Ok(Inspection::RUNNING)
        }
        async fn stop(&self, _: &Handle, _: Duration) -> Result<(), DriverError> {
            Ok(())
        }
        async fn destroy(&self, _: &Handle) -> Result<(), DriverError> {
            Ok(())
        }
        async fn exec(
            &self,
            _: &Handle,
            _: &[String],
            _: Duration,
        ) -> Result<Option<i32>, DriverError> {
            Ok(Some(0))
        }
        async fn logs(
            &self,
            _: &Handle,
            _: LogOptions,
            out: mpsc::Sender<Vec<u8>>,
        ) -> Result<(), DriverError> {
            for piece in &self.pieces {
                if out.send(piece.clone()).await.is_err() {
                    return Ok(());
                }
            }
            if self.fail {
                return Err(DriverError::Runtime("the runtime lost it".into()));
            }
            Ok(())
        }
    }

    fn handle() -> Handle {
        Handle {
            driver: "scripted".into(),
            instance_id: "1".into(),
            address: None,
            ports: Default::default(),
            started_at_ms: 0,
            data: serde_json::Value::Null,
        }
    }

    fn query(out: mpsc::Sender<pb::AgentMessage>) -> LogsQuery {
        LogsQuery {
            request_id: 7,
            app: "web".into(),
            index: None,
            options: LogOptions::new(0, false),
            out,
            cancel: CancellationToken::new(),
        }
    }

    /// Every message of an answer, until its end or the channel closes.
    async fn answer(mut rx: mpsc::Receiver<pb::AgentMessage>) -> Vec<pb::ReplicaLogs> {
        let mut all = Vec::new();
        while let Some(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Logs(m)),
        }) = rx.recv().await
        {
            let end = m.end;
            all.push(m);
            if end {
                break;
            }
        }
        all
    }

    #[tokio::test]
    async fn pieces_join_up_to_the_chunk_bound_and_the_answer_ends() {
        // Too big to join with what comes before or after it.
        let big = vec![b'x'; MAX_LOG_CHUNK - 1];
        let driver = Arc::new(Scripted {
            pieces: vec![
                b"a\n".to_vec(),
                b"b\n".to_vec(),
                big.clone(),
                b"tail".to_vec(),
            ],
            fail: true,
        });
        let (tx, rx) = mpsc::channel(64);
        let target = Target {
            replica: "web/aa/0".into(),
            handle: Some(handle()),
        };
        let q = query(tx);
        let cancel = q.cancel.clone();
        // The driver sends everything before the forwarder first looks, so
        // what it joins does not depend on timing.
        serve(driver, Ok(vec![target]), q).await;
        let all = answer(rx).await;
        let data: Vec<u8> = all.iter().flat_map(|m| m.data.clone()).collect();
        let mut expected = b"a\nb\n".to_vec();
        expected.extend(&big);
        expected.extend(b"tail");
        assert_eq!(data, expected);
        assert!(all.iter().all(|m| m.data.len() <= MAX_LOG_CHUNK));
        assert!(all.iter().all(|m| m.request_id == 7));
        let sizes: Vec<usize> = all
            .iter()
            .filter(|m| !m.data.is_empty())
            .map(|m| m.data.len())
            .collect();
        assert_eq!(
            sizes,
            [4, MAX_LOG_CHUNK - 1, 4],
            "pieces joined up to the bound"
        );
        let errors: Vec<&str> = all
            .iter()
            .filter(|m| !m.error.is_empty())
            .map(|m| m.error.as_str())
            .collect();
        assert_eq!(errors, ["replica web/aa/0: the runtime lost it"]);
        let last = all.last().expect("an answer");
        assert!(last.end && last.replica.is_empty() && last.error.is_empty());
        assert!(
            cancel.is_cancelled(),
            "a finished answer releases its token"
        );
    }

    #[tokio::test]
    async fn a_request_error_and_a_replica_without_instance_are_answered() {
        let driver = Arc::new(Scripted {
            pieces: Vec::new(),
            fail: false,
        });
        let (tx, rx) = mpsc::channel(8);
        serve(
            driver.clone(),
            Err("provider aa runs no replica of app web".into()),
            query(tx),
        )
        .await;
        let all = answer(rx).await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].error, "provider aa runs no replica of app web");
        assert!(all[1].end);

        let (tx, rx) = mpsc::channel(8);
        let target = Target {
            replica: "web/aa/1".into(),
            handle: None,
        };
        serve(driver, Ok(vec![target]), query(tx)).await;
        let all = answer(rx).await;
        assert_eq!(all[0].replica, "web/aa/1");
        assert!(
            all[0].error.contains("no instance has started yet"),
            "{all:?}"
        );
        assert!(all[1].end);
    }

    #[tokio::test]
    async fn cancelling_stops_a_followed_read_and_ends_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = Arc::new(
            ProcessDriver::new(crate::driver::process::ProcessDriverConfig::new(dir.path()))
                .expect("driver"),
        );
        let spec = ReplicaSpec {
            key: crate::driver::ReplicaKey {
                app: "loud".into(),
                index: 0,
            },
            provider: "aa".into(),
            workload: crate::driver::Workload {
                image: None,
                command: Some("sh".into()),
                args: vec!["-c".into(), "echo hello; exec sleep 60".into()],
                env: Vec::new(),
                ports: Vec::new(),
                working_dir: None,
                stop_grace: Duration::from_secs(1),
                cpu_millis: None,
                memory_mib: None,
            },
            workload_generation: 1,
        };
        let handle = driver.start(&spec).await.expect("start");
        let (tx, mut rx) = mpsc::channel(8);
        let mut q = query(tx);
        q.options = LogOptions::new(0, true);
        let cancel = q.cancel.clone();
        let target = Target {
            replica: "loud/aa/0".into(),
            handle: Some(handle.clone()),
        };
        let task = tokio::spawn(serve(driver.clone(), Ok(vec![target]), q));
        let mut seen = Vec::new();
        while !seen.ends_with(b"hello\n") {
            let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            let Ok(Some(pb::AgentMessage {
                message: Some(pb::agent_message::Message::Logs(m)),
            })) = next
            else {
                panic!("no output: {next:?}");
            };
            seen.extend(m.data);
        }
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the answer stops when cancelled")
            .expect("join");
        let Ok(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Logs(last)),
        }) = rx.try_recv()
        else {
            panic!("no end after the cancellation");
        };
        assert!(last.end && last.data.is_empty(), "{last:?}");
        assert!(rx.try_recv().is_err(), "nothing after the end");
        driver
            .stop(&handle, Duration::from_secs(1))
            .await
            .expect("stop");
    }
}
