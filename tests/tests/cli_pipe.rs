//! End to end: the CLI's reader going away ends the command quietly. A
//! reader that takes the first bytes and leaves (`skymirror get apps -o yaml |
//! head -3`) and a reader gone before the CLI writes anything
//! (`skymirror get replicas | true`) both make every verb that prints exit
//! with status 0 or 141 (128 + SIGPIPE, as the shell reports a tool killed by
//! it), with nothing on stderr: no panic, no message.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use skymirror_tests::{Cluster, MARKER_VAR, app_yaml, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);
/// How long a CLI whose reader went away may take to end.
const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Linux's default pipe capacity: output beyond it blocks the writer until
/// the reader reads, or fails once the reader is gone.
const PIPE_BUFFER: usize = 64 * 1024;
/// What the early reader takes before it leaves, like `head -3`.
const HEAD_BYTES: usize = 200;
/// Apps beside `web`, so `get apps -o yaml|json` is several pipe buffers long.
const BULK_APPS: usize = 500;

/// The example app behind a shell that first prints which replica it is, so
/// `logs` has output to print.
fn web_yaml() -> String {
    app_yaml("web", 2, "hi", &[]).replace(
        "  command: skymirror-example\n",
        "  command: sh\n  args: [\"-c\", 'echo \"starting $SKYMIRROR_REPLICA\"; exec skymirror-example']\n",
    )
}

/// Who reads the CLI's standard output.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Reads this many bytes, then closes its end while the CLI still writes.
    Head(usize),
    /// Closed its end before the CLI started.
    Gone,
}

/// Runs `skymirror ARGS` against `c` with `reader` on its standard output and
/// returns how it ended (stdout is not captured).
fn run_with_reader(c: &Cluster, args: &[&str], reader: Reader) -> Result<Output> {
    let mut cmd = Command::new(&c.bins.skymirror);
    cmd.arg("--server")
        .arg(c.url())
        .args(args)
        .env(MARKER_VAR, c.marker())
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let what = format!("`skymirror {}`", args.join(" "));
    let child = match reader {
        Reader::Gone => {
            let (read_end, write_end) = std::io::pipe().context("creating a pipe")?;
            drop(read_end);
            cmd.stdout(write_end)
                .spawn()
                .with_context(|| format!("starting {what}"))?
        }
        Reader::Head(n) => {
            let mut child = cmd
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {what}"))?;
            let mut stdout = child.stdout.take().context("the CLI's stdout")?;
            let mut head = vec![0u8; n];
            if let Err(e) = stdout.read_exact(&mut head) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} printed less than {n} bytes: {e}");
            }
            // `stdout` is dropped here: the reader leaves mid-output.
            child
        }
    };
    // Wait for the exit with a deadline, so a CLI blocked on its output fails
    // the test instead of holding the run.
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(EXIT_WAIT) {
        Ok(out) => Ok(out.with_context(|| format!("waiting for {what}"))?),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            bail!("{what} did not exit within {EXIT_WAIT:?} after its reader went away")
        }
    }
}

/// Exit status 0 or 141, and nothing on stderr.
fn ends_quietly(args: &[&str], reader: Reader, out: &Output) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !stderr.contains("panicked"),
        "`skymirror {}` ({reader:?}) panicked: {stderr}",
        args.join(" ")
    );
    ensure!(
        matches!(out.status.code(), Some(0 | 141)),
        "`skymirror {}` ({reader:?}) exited with {}, not 0 or 141: {stderr}",
        args.join(" "),
        out.status
    );
    ensure!(
        stderr.is_empty(),
        "`skymirror {}` ({reader:?}) printed on stderr: {stderr}",
        args.join(" ")
    );
    Ok(())
}

#[test]
fn a_reader_that_goes_away_ends_every_verb_quietly() -> Result<()> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["local-a"]))?;
    c.start_agent("local-a")?;
    c.apply_ok("web.yaml", &web_yaml())?;
    c.wait_ready("web", &["local-a"], 2, 1, WAIT)?;
    let bulk = (0..BULK_APPS)
        .map(|i| app_yaml(&format!("bulk-{i:03}"), 0, "idle", &[]))
        .collect::<Vec<_>>()
        .join("---\n");
    c.apply_ok("bulk.yaml", &bulk)?;

    // Listings several pipe buffers long: the CLI is still writing when the
    // reader leaves, whatever the timing.
    for args in [["get", "apps", "-o", "yaml"], ["get", "apps", "-o", "json"]] {
        let full = c.cli_ok(&args)?.len();
        ensure!(
            full > 2 * PIPE_BUFFER,
            "`skymirror {}` prints {full} bytes, too few to fill the pipe",
            args.join(" ")
        );
        let reader = Reader::Head(HEAD_BYTES);
        ends_quietly(&args, reader, &run_with_reader(&c, &args, reader)?)?;
    }

    // Every verb that prints, with the reader gone before it starts: its
    // first write fails, however short the output.
    let spec = c.write_spec("web-again.yaml", &web_yaml())?;
    let spec = spec.to_string_lossy();
    let verbs: &[&[&str]] = &[
        &["get", "replicas"],
        &["get", "replicas", "-o", "json"],
        &["get", "replicas", "-o", "yaml"],
        &["get", "providers"],
        &["get", "apps"],
        &["describe", "app", "web"],
        &["describe", "provider", "local-a"],
        &["status"],
        &["status", "-o", "json"],
        &["status", "web"],
        &["status", "web", "-o", "yaml"],
        &["explain", "web"],
        &["explain", "web", "-o", "json"],
        &["events", "--tail", "5"],
        &["events", "--tail", "5", "-o", "json"],
        &["logs", "web", "--tail", "5"],
        &["apply", "-f", &spec, "--dry-run"],
        &["apply", "-f", &spec, "--dry-run", "-o", "json"],
        &["uncordon", "local-a"],
    ];
    for args in verbs {
        ends_quietly(
            args,
            Reader::Gone,
            &run_with_reader(&c, args, Reader::Gone)?,
        )?;
    }
    Ok(())
}
