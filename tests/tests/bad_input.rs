//! Bad input, end to end through the real CLI and a real daemon: every kind of
//! bad spec file makes `skymirror apply -f FILE` exit non-zero with one clean
//! message naming the file, the document, the line, the column and the field
//! path, and stores nothing from that file (apply is all or nothing).
//!
//! Each bad document is the second document of its file; the first is a valid
//! app that does not exist yet, so a partial apply would show up as a new app
//! and an `AppCreated` event.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use skymirror_tests::{Cluster, app_yaml, providers_yaml};

const PROVIDERS: [&str; 2] = ["aa", "bb"];
const WAIT: Duration = Duration::from_secs(30);
/// 1 MiB, the largest spec file the CLI and the daemon accept.
const MAX_SOURCE_BYTES: usize = 1024 * 1024;

/// The valid first document of every bad file: an app that is not applied yet.
/// Lines 1-7; `---` is line 8, so every second document starts on line 9.
const FRESH: &str = "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: fresh
spec:
  command: skymirror-example
  replicas: 1
";

/// Events that say an object was stored.
const STORED_REASONS: [&str; 4] = [
    "AppCreated",
    "AppConfigured",
    "ProviderCreated",
    "ProviderConfigured",
];

/// What the daemon holds after the baseline apply; every rejected apply must
/// leave it exactly so.
#[derive(Debug)]
struct Baseline {
    apps: Vec<Value>,
    providers: Vec<Value>,
    /// Sequence number of the newest event at baseline time.
    last_seq: u64,
}

/// The desired-state fields of `get providers -o json`: what an apply could
/// change. Liveness, heartbeats and readiness are observations that move on
/// their own and are left out.
fn provider_specs(c: &Cluster) -> Result<Vec<Value>> {
    const DESIRED: &[&str] = &[
        "name",
        "driver",
        "priority",
        "capacity",
        "labels",
        "generation",
        "cordoned",
        "draining",
    ];
    Ok(c.providers()?
        .into_iter()
        .map(|p| {
            DESIRED
                .iter()
                .map(|k| (k.to_string(), p[*k].clone()))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect())
}

/// The desired-state fields of `get apps -o json`.
fn app_specs(c: &Cluster) -> Result<Vec<Value>> {
    const DESIRED: &[&str] = &[
        "name",
        "generation",
        "mode",
        "createdAtMs",
        "updatedAtMs",
        "spec",
        "desiredReplicas",
        "providers",
    ];
    Ok(c.apps()?
        .into_iter()
        .map(|a| {
            DESIRED
                .iter()
                .map(|k| (k.to_string(), a[*k].clone()))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect())
}

impl Baseline {
    fn capture(c: &Cluster) -> Result<Self> {
        Ok(Baseline {
            apps: app_specs(c)?,
            providers: provider_specs(c)?,
            last_seq: c
                .events()?
                .iter()
                .filter_map(|e| e["seq"].as_u64())
                .max()
                .context("no events after the baseline apply")?,
        })
    }

    /// Fails unless apps, providers (generations included) and stored-object
    /// events are exactly as at baseline.
    fn ensure_unchanged(&self, c: &Cluster) -> Result<()> {
        let apps = app_specs(c)?;
        ensure!(
            apps == self.apps,
            "`get apps -o json` changed:\nbefore {}\nafter  {}",
            Value::from(self.apps.clone()),
            Value::from(apps)
        );
        let providers = provider_specs(c)?;
        ensure!(
            providers == self.providers,
            "`get providers -o json` changed:\nbefore {}\nafter  {}",
            Value::from(self.providers.clone()),
            Value::from(providers)
        );
        let stored: Vec<Value> = c
            .events()?
            .into_iter()
            .filter(|e| e["seq"].as_u64().unwrap_or(0) > self.last_seq)
            .filter(|e| {
                STORED_REASONS
                    .iter()
                    .any(|r| e["reason"].as_str() == Some(r))
            })
            .collect();
        ensure!(
            stored.is_empty(),
            "objects were stored: new events {}",
            Value::from(stored)
        );
        Ok(())
    }
}

/// A daemon with two providers and one app, assignments settled.
fn baseline_cluster() -> Result<(Cluster, Baseline)> {
    let mut c = Cluster::start()?;
    let out = c.apply_ok(
        "baseline.yaml",
        &format!(
            "{}---\n{}",
            providers_yaml(&PROVIDERS),
            app_yaml("web", 2, "v1", &[])
        ),
    )?;
    ensure!(
        out.contains("provider/aa created")
            && out.contains("provider/bb created")
            && out.contains("app/web created"),
        "baseline apply said: {out}"
    );
    // The reconciler writes assignments after the apply returns; wait for them
    // so the snapshot does not race it.
    c.wait_until("web's assignments on aa and bb", WAIT, |c| {
        let providers = c.providers()?;
        Ok((providers.len() == 2
            && providers.iter().all(|p| {
                p["assignedReplicas"] == 2 && p["assignmentRevision"].as_u64().unwrap_or(0) >= 1
            }))
        .then_some(()))
    })?;
    let baseline = Baseline::capture(&c)?;
    Ok((c, baseline))
}

/// The one-line error a rejected command must print on stderr.
fn single_error(out: &Output, what: &str) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "{what} succeeded ({}); stdout: {stdout}",
        out.status
    );
    ensure!(
        stderr.starts_with("error: "),
        "{what}: stderr does not start with `error: `: {stderr:?}"
    );
    ensure!(
        !stderr.contains("panicked")
            && !stderr.contains("RUST_BACKTRACE")
            && !stderr.contains("stack backtrace"),
        "{what}: stderr shows a panic: {stderr:?}"
    );
    ensure!(
        stderr.trim_end().lines().count() == 1,
        "{what}: expected one error line, got: {stderr:?}"
    );
    Ok(stderr.trim_end().to_string())
}

/// One bad document and the error it must cause.
#[derive(Debug)]
struct Case {
    /// File name (also names the case in failures).
    file: &'static str,
    /// The bad second document.
    doc: String,
    /// `document N, line L, column C: path` after the file name.
    place: &'static str,
    /// How the message after the place must start.
    message: &'static str,
}

/// Applies `FRESH` + `case.doc` and checks the error and that nothing changed.
fn reject(c: &Cluster, baseline: &Baseline, case: &Case) -> Result<()> {
    let content = format!("{FRESH}---\n{}", case.doc);
    let path = c.write_spec(case.file, &content)?;
    let path = path.to_string_lossy();
    let out = c.cli(&["apply", "-f", &path])?;
    let err = single_error(&out, &format!("apply -f {}", case.file))?;
    let expected = format!("error: {path}: {}: {}", case.place, case.message);
    ensure!(
        err.starts_with(&expected),
        "wrong error\nexpected: {expected}…\ngot:      {err}"
    );
    baseline.ensure_unchanged(c)
}

/// An app document named `other`, starting on line 9, whose `spec:` (line 13)
/// is followed by `spec` (lines 14 on).
fn app_doc(spec: &str) -> String {
    format!("apiVersion: skymirror.dev/v1\nkind: App\nmetadata:\n  name: other\nspec:\n{spec}")
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "syntax.yaml",
            // Line 11 opens a flow mapping that line 12 does not close.
            doc: "apiVersion: skymirror.dev/v1\nkind: App\nmetadata: {name: other\nspec: {}\n"
                .into(),
            place: "document 2, line 12, column 5",
            message: "invalid YAML: did not find expected ',' or '}', while parsing a flow mapping at line 11 column 11",
        },
        Case {
            file: "wrong-type.yaml",
            doc: app_doc("  command: skymirror-example\n  replicas: many\n"),
            place: "document 2, line 15, column 13: spec.replicas",
            message: "expected a non-negative integer, found \"many\"",
        },
        Case {
            file: "unknown-field.yaml",
            doc: app_doc("  command: skymirror-example\n  replica: 2\n"),
            place: "document 2, line 15, column 3: spec.replica",
            message: "unknown field `replica`, expected one of `image`, `command`",
        },
        Case {
            file: "missing-field.yaml",
            // The mapping missing `replicas` starts at line 14, column 3.
            doc: app_doc("  command: skymirror-example\n"),
            place: "document 2, line 14, column 3: spec",
            message: "missing field `replicas`",
        },
        Case {
            file: "duplicate.yaml",
            // The same app twice: its name is on line 12, value at column 9.
            doc: FRESH.into(),
            place: "document 2, line 12, column 9: metadata.name",
            message: "duplicate App \"fresh\": already defined in document 1",
        },
        Case {
            file: "unknown-provider.yaml",
            // `    providers: [{name: nowhere}]`: the value is at column 24.
            doc: app_doc(
                "  command: skymirror-example\n  replicas: 1\n  placement:\n    providers: [{name: nowhere}]\n",
            ),
            place: "document 2, line 17, column 24: spec.placement.providers[0].name",
            message: "unknown provider \"nowhere\": not in this input and not applied before",
        },
        Case {
            file: "negative.yaml",
            doc: app_doc("  command: skymirror-example\n  replicas: -1\n"),
            place: "document 2, line 15, column 13: spec.replicas",
            message: "expected a non-negative integer, found -1",
        },
        Case {
            file: "unknown-kind.yaml",
            doc: "apiVersion: skymirror.dev/v1\nkind: Deployment\nmetadata:\n  name: other\nspec:\n  command: skymirror-example\n  replicas: 1\n"
                .into(),
            place: "document 2, line 10, column 7: kind",
            message: "unknown kind \"Deployment\", expected one of: Provider, App",
        },
        Case {
            file: "api-version.yaml",
            doc: "apiVersion: skymirror.dev/v2\nkind: App\nmetadata:\n  name: other\nspec:\n  command: skymirror-example\n  replicas: 1\n"
                .into(),
            place: "document 2, line 9, column 13: apiVersion",
            message: "unsupported apiVersion \"skymirror.dev/v2\", expected \"skymirror.dev/v1\"",
        },
        Case {
            file: "bad-name.yaml",
            doc: "apiVersion: skymirror.dev/v1\nkind: App\nmetadata:\n  name: Web_1\nspec:\n  command: skymirror-example\n  replicas: 1\n"
                .into(),
            place: "document 2, line 12, column 9: metadata.name",
            message: "\"Web_1\" contains 'W': names are 1 to 63 lowercase letters, digits and '-'",
        },
        Case {
            file: "health-port.yaml",
            // `    http: {path: /healthz, port: web}`: `web` is at column 34.
            doc: app_doc(
                "  command: skymirror-example\n  replicas: 1\n  ports:\n    - name: http\n  health:\n    http: {path: /healthz, port: web}\n",
            ),
            place: "document 2, line 19, column 34: spec.health.http.port",
            message: "unknown port \"web\": the app's ports are http",
        },
        Case {
            file: "provider-settings.yaml",
            // `  ec2: {…}` on line 15: the block opens at column 8.
            doc: "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n  name: other\nspec:\n  driver: docker\n  ec2: {region: eu-west-1, ami: ami-12345678, instanceType: t3.small, subnetId: subnet-12345678}\n"
                .into(),
            place: "document 2, line 15, column 8: spec.ec2",
            message: "ec2 settings do not apply to this provider: its driver is docker (its settings go in spec.docker)",
        },
    ]
}

#[test]
fn bad_documents_are_rejected_with_their_place_and_store_nothing() -> Result<()> {
    let (c, baseline) = baseline_cluster()?;
    // Every case runs, so one failure does not hide the others.
    let failures: Vec<String> = cases()
        .iter()
        .filter_map(|case| {
            reject(&c, &baseline, case)
                .err()
                .map(|e| format!("{}: {e:#}", case.file))
        })
        .collect();
    if !failures.is_empty() {
        bail!(
            "{} of {} cases failed:\n\n{}",
            failures.len(),
            cases().len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

/// Runs the CLI with `input` on standard input.
fn cli_with_stdin(c: &Cluster, args: &[&str], input: &[u8]) -> Result<Output> {
    let mut child = Command::new(&c.bins.skymirror)
        .arg("--server")
        .arg(c.url())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the CLI")?;
    let mut stdin = child.stdin.take().context("CLI stdin")?;
    // Write from a thread so a CLI that stops reading cannot block the test.
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    // The CLI may exit before reading everything; a broken pipe is not the test's concern.
    let _ = writer.join();
    Ok(out)
}

#[test]
fn files_over_one_mib_are_rejected_by_the_cli_and_the_daemon() -> Result<()> {
    let (c, baseline) = baseline_cluster()?;
    let content = format!(
        "{FRESH}---\n# {}\n{}",
        "x".repeat(MAX_SOURCE_BYTES),
        app_doc("  command: skymirror-example\n  replicas: 1\n")
    );
    let size = content.len();

    // A file: the CLI checks the size before sending anything.
    let path = c.write_spec("big.yaml", &content)?;
    let path = path.to_string_lossy();
    let err = single_error(&c.cli(&["apply", "-f", &path])?, "apply -f big.yaml")?;
    let expected = format!("error: {path}: file is {size} bytes, over the 1048576-byte limit");
    ensure!(
        err == expected,
        "wrong error\nexpected: {expected}\ngot:      {err}"
    );
    baseline.ensure_unchanged(&c)?;

    // Standard input: the CLI sends it as is, and the daemon enforces the limit.
    let out = cli_with_stdin(&c, &["apply", "-f", "-"], content.as_bytes())?;
    let err = single_error(&out, "apply -f - (over 1 MiB)")?;
    let expected = format!("error: <stdin>: file is {size} bytes, over the 1048576-byte limit");
    ensure!(
        err == expected,
        "wrong error\nexpected: {expected}\ngot:      {err}"
    );
    baseline.ensure_unchanged(&c)
}

#[test]
fn dry_run_and_missing_objects_change_nothing() -> Result<()> {
    let (c, baseline) = baseline_cluster()?;

    // A valid change, dry run: the plan is printed and nothing is stored.
    let path = c.write_spec("web-4.yaml", &app_yaml("web", 4, "v1", &[]))?;
    let out = c.cli_ok(&["apply", "--dry-run", "-f", &path.to_string_lossy()])?;
    ensure!(
        out.contains("app/web configured (dry run)"),
        "dry run said: {out}"
    );
    for p in PROVIDERS {
        let line = format!("plan: web on {p}: 2 → 4 replicas");
        ensure!(out.contains(&line), "dry run did not print {line:?}: {out}");
    }
    baseline.ensure_unchanged(&c)?;

    let err = single_error(&c.cli(&["delete", "app", "nope"])?, "delete app nope")?;
    ensure!(
        err.contains("not found") && err.contains("nope"),
        "delete app nope said: {err}"
    );
    baseline.ensure_unchanged(&c)?;

    let err = single_error(&c.cli(&["get", "apps", "nope"])?, "get apps nope")?;
    ensure!(
        err.contains("\"nope\"") && err.contains("not found"),
        "get apps nope said: {err}"
    );
    baseline.ensure_unchanged(&c)
}
