//! End to end: `skymirror logs` reads replica output through the agents that
//! run the replicas (process driver): every replica with a prefix, filters,
//! tails, following until the replica goes away, and clear errors for an
//! unknown app and a provider whose agent is gone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use skymirror_tests::{Cluster, MARKER_VAR, app_yaml, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);

/// The example app behind a shell that first prints which replica it is:
/// two lines of output per replica, the second one naming its address.
fn chatty_yaml(replicas: u32) -> String {
    app_yaml("chatty", replicas, "hi", &[]).replace(
        "  command: skymirror-example\n",
        "  command: sh\n  args: [\"-c\", 'echo \"starting $SKYMIRROR_REPLICA\"; exec skymirror-example']\n",
    )
}

/// A replica that prints `tick 1`, `tick 2`, ... five times a second.
const TICKER_YAML: &str = "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: ticker
spec:
  command: sh
  args: [\"-c\", 'i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done']
  replicas: 1
  stopGracePeriod: 2s
  placement:
    mode: mirror
";

fn cluster(providers: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(providers))?;
    for p in providers {
        c.start_agent(p)?;
    }
    Ok(c)
}

/// Sorted lines of `text`.
fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn logs_show_every_replica_with_filters_tails_and_errors() -> Result<()> {
    let providers = ["aa", "bb"];
    let mut c = cluster(&providers)?;
    c.apply_ok("chatty.yaml", &chatty_yaml(2))?;
    let replicas = c.wait_ready("chatty", &providers, 2, 1, WAIT)?;
    // replica id -> the line its app printed once listening.
    let listening: BTreeMap<String, String> = replicas
        .iter()
        .map(|r| {
            let id = r["id"].as_str().context("id")?.to_string();
            let address = r["address"].as_str().context("address")?;
            Ok((id, format!("listening on {address}")))
        })
        .collect::<Result<_>>()?;
    ensure!(listening.len() == 4, "replicas: {listening:?}");

    // Every replica's output, each line prefixed with its replica.
    let all = c.cli_ok(&["logs", "chatty"])?;
    let mut want: Vec<String> = listening
        .iter()
        .flat_map(|(id, listen)| [format!("[{id}] starting {id}"), format!("[{id}] {listen}")])
        .collect();
    want.sort();
    ensure!(sorted_lines(&all) == want, "logs chatty printed:\n{all}");
    // A replica's lines keep their order.
    for (id, listen) in &listening {
        let starting = all.find(&format!("[{id}] starting"));
        let listened = all.find(&format!("[{id}] {listen}"));
        ensure!(starting < listened, "{id}'s lines out of order:\n{all}");
    }

    // --provider keeps to one provider's replicas.
    let bb = c.cli_ok(&["logs", "chatty", "--provider", "bb"])?;
    let want_bb: Vec<String> = want
        .iter()
        .filter(|l| l.starts_with("[chatty/bb/"))
        .cloned()
        .collect();
    ensure!(want_bb.len() == 4, "{want_bb:?}");
    ensure!(
        sorted_lines(&bb) == want_bb,
        "logs --provider bb printed:\n{bb}"
    );

    // One replica's output is printed as it is, without prefixes.
    let one = c.cli_ok(&["logs", "chatty", "--provider", "bb", "--index", "1"])?;
    let want_one = format!(
        "starting chatty/bb/1\n{}\n",
        listening.get("chatty/bb/1").context("chatty/bb/1")?
    );
    ensure!(one == want_one, "logs of one replica printed:\n{one}");

    // --tail 1: the last line of each replica only.
    let last = c.cli_ok(&["logs", "chatty", "--tail", "1"])?;
    let mut want_last: Vec<String> = listening
        .iter()
        .map(|(id, listen)| format!("[{id}] {listen}"))
        .collect();
    want_last.sort();
    ensure!(
        sorted_lines(&last) == want_last,
        "logs --tail 1 printed:\n{last}"
    );

    // An unknown app, and a provider that runs none of the app's replicas.
    let out = c.cli(&["logs", "nope"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("app \"nope\" not found"),
        "logs of an unknown app: {}: {stderr}",
        out.status
    );
    let out = c.cli(&["logs", "chatty", "--provider", "zz"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("provider \"zz\" not found"),
        "logs on an unknown provider: {}: {stderr}",
        out.status
    );

    // A provider whose agent is gone is named in an error; the others' output
    // is still printed.
    c.kill_agent("bb")?;
    let (stdout, stderr) = c.wait_until("logs to report bb's agent gone", WAIT, |c| {
        let out = c.cli(&["logs", "chatty"])?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let gone = !out.status.success() && stderr.contains("provider bb: agent not connected");
        Ok(gone.then(|| (String::from_utf8_lossy(&out.stdout).to_string(), stderr)))
    })?;
    let want_aa: Vec<String> = want
        .iter()
        .filter(|l| l.starts_with("[chatty/aa/"))
        .cloned()
        .collect();
    ensure!(
        sorted_lines(&stdout) == want_aa,
        "with bb's agent gone, logs printed:\n{stdout}\nstderr: {stderr}"
    );
    Ok(())
}

/// A `skymirror logs --follow`, killed when dropped; its stdout lines arrive
/// on `lines`.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(c: &Cluster, args: &[&str]) -> Result<Self> {
        let mut child = std::process::Command::new(&c.bins.skymirror)
            .args(["--server", &c.url(), "logs"])
            .args(args)
            .env(MARKER_VAR, c.marker())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting skymirror logs --follow")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Follower { child, lines })
    }

    fn next_line(&self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .context("no line from skymirror logs --follow")
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn logs_follow_streams_new_output_until_the_replica_goes_away() -> Result<()> {
    let mut c = cluster(&["aa"])?;
    c.apply_ok("ticker.yaml", TICKER_YAML)?;
    c.wait_ready("ticker", &["aa"], 1, 1, WAIT)?;

    let mut follower = Follower::start(&c, &["ticker", "--tail", "1", "--follow"])?;
    let tick = |line: &str| -> Result<u64> {
        line.strip_prefix("tick ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected line {line:?}"))
    };
    // The last line written so far, then every new one, in order.
    let first = tick(&follower.next_line(Duration::from_secs(10))?)?;
    for n in first + 1..=first + 10 {
        let got = tick(&follower.next_line(Duration::from_secs(10))?)?;
        ensure!(got == n, "expected tick {n}, got tick {got}");
    }

    // Deleting the app stops the replica, which ends the stream.
    c.cli_ok(&["delete", "app", "ticker"])?;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = follower.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("skymirror logs --follow still runs after its replica was removed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        status.success(),
        "skymirror logs --follow ended with {status}"
    );
    Ok(())
}
