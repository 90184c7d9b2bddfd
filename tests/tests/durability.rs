//! End to end: damage to the daemon's store is refused, not served; a backup
//! taken under load restores a daemon that takes over its fleet without
//! restarting anything; a full disk is a state the daemon leaves by itself.
//! Real binaries, real files, a real tmpfs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use skymirror_tests::{Cluster, app_yaml, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);

/// `replica id -> instance id` of an app's replicas.
fn instances(c: &Cluster, app: &str) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = c
        .replicas()?
        .iter()
        .filter(|r| r["app"] == app)
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["instanceId"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `provider -> revision of its current assignment`.
fn assignment_revisions(c: &Cluster) -> Result<BTreeMap<String, u64>> {
    Ok(c.providers()?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["assignmentRevision"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    Ok(())
}

/// Damages `file` as `how` says.
fn damage(file: &Path, how: &str) -> Result<()> {
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    match how {
        "delete" => std::fs::remove_file(file)?,
        "empty" => std::fs::write(file, b"")?,
        "one byte" => std::fs::OpenOptions::new()
            .write(true)
            .open(file)?
            .set_len(1)?,
        "half" => std::fs::OpenOptions::new()
            .write(true)
            .open(file)?
            .set_len(len / 2)?,
        "garbage at the start" | "garbage in the middle" | "garbage at the end" => {
            let mut bytes = std::fs::read(file)?;
            let n = bytes.len().min(512);
            let at = match how {
                "garbage at the start" => 0,
                "garbage in the middle" => bytes.len() / 2 - n / 2,
                _ => bytes.len() - n,
            };
            let mut seed: u32 = 0x9e37_79b9;
            for b in &mut bytes[at..at + n] {
                // A fixed xorshift: the same damage on every run.
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed.to_le_bytes()[0];
            }
            std::fs::write(file, bytes)?;
        }
        other => bail!("unknown damage {other}"),
    }
    Ok(())
}

#[test]
fn a_damaged_store_is_refused_naming_the_file_and_a_reset_keeps_it_aside() -> Result<()> {
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb"]))?;
    for i in 0..20 {
        c.apply_ok("app.yaml", &app_yaml(&format!("app-{i}"), 1, "v1", &[]))?;
    }
    c.kill_daemon()?;
    let data = c.data_dir();
    let pristine = c.dir.path().join("pristine");
    copy_dir(&data, &pristine)?;

    let db = PathBuf::from("store").join("db");
    let identity = PathBuf::from("store.identity");
    let cases: Vec<(&Path, &str, &str)> = vec![
        (&db, "delete", "store/db is damaged: it is missing"),
        (&db, "empty", "store/db is damaged: it holds no store"),
        (&db, "one byte", "store/db is damaged: it holds no store"),
        (&db, "half", "store/db is damaged"),
        (&db, "garbage at the start", "store/db is damaged"),
        (&db, "garbage in the middle", "store/db is damaged"),
        (&db, "garbage at the end", "store/db is damaged"),
        (&identity, "empty", "store.identity is damaged"),
        (
            &identity,
            "garbage at the start",
            "store.identity is damaged",
        ),
        (&identity, "one byte", "store.identity is damaged"),
    ];
    for (file, how, expected) in cases {
        std::fs::remove_dir_all(&data)?;
        copy_dir(&pristine, &data)?;
        damage(&data.join(file), how)?;
        let out = c.daemon_refusal(&[], Duration::from_secs(20))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{} {how}: the daemon started: {stderr}",
            file.display()
        );
        ensure!(
            stderr.contains(expected)
                && stderr.contains("--restore")
                && stderr.contains("--reset-store"),
            "{} {how}: expected {expected:?} and the ways out, got: {stderr}",
            file.display()
        );
        ensure!(
            !stderr.contains("panicked"),
            "{} {how}: {stderr}",
            file.display()
        );
    }

    // The way out on purpose: a fresh store, the damaged one kept aside.
    c.start_daemon_with(&["--reset-store"])?;
    ensure!(c.apps()?.is_empty(), "a reset store holds no apps");
    let kept: Vec<String> = std::fs::read_dir(&data)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("store.reset-") || n.starts_with("store.identity.reset-"))
        .collect();
    ensure!(
        kept.len() == 2,
        "the damaged store and its identity are kept aside: {kept:?}"
    );
    let status: Value = serde_json::from_str(&c.cli_ok(&["status", "-o", "json"])?)?;
    ensure!(
        status["daemon"]["storeEpoch"]
            .as_u64()
            .is_some_and(|e| e > 1),
        "a reset starts a later epoch: {}",
        status["daemon"]
    );
    Ok(())
}

#[test]
fn a_backup_under_load_restores_a_daemon_that_takes_over_without_restarting_anything() -> Result<()>
{
    let mut c = Cluster::start()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb"]))?;
    c.start_agent("aa")?;
    c.start_agent("bb")?;
    c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    c.wait_ready("web", &["aa", "bb"], 2, 1, WAIT)?;
    let before = instances(&c, "web")?;

    // Load: applies while the backup is taken.
    let url = c.url();
    let bin = c.bins.skymirror.clone();
    let dir = c.dir.path().to_path_buf();
    let load = std::thread::spawn(move || -> Result<usize> {
        let mut n = 0;
        for i in 0..40 {
            let path = dir.join(format!("load-{i}.yaml"));
            std::fs::write(&path, app_yaml(&format!("load-{i}"), 0, "x", &[]))?;
            let out = Command::new(&bin)
                .args(["--server", &url, "apply", "-f"])
                .arg(&path)
                .output()?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
        Ok(n)
    });
    std::thread::sleep(Duration::from_millis(300));
    let backup = c.dir.path().join("backup.skm");
    let said = c.cli_ok(&["backup", "-f", &backup.to_string_lossy()])?;
    ensure!(said.contains("backup written"), "{said}");
    let applied = load
        .join()
        .map_err(|_| anyhow::anyhow!("load panicked"))??;
    ensure!(applied == 40, "the load ran");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&backup)?.permissions());
    ensure!(mode & 0o777 == 0o600, "the backup is private: {mode:o}");
    let apps_at_backup = {
        let text = std::fs::read(&backup)?;
        let body_start = text.iter().position(|b| *b == b'\n').context("header")? + 1;
        let body: Value = serde_json::from_slice(&text[body_start..])?;
        body["apps"].as_array().map_or(0, Vec::len)
    };
    ensure!(
        (1..=41).contains(&apps_at_backup),
        "the backup holds web and the load applied before it: {apps_at_backup}"
    );

    // After the backup, a change the restore must undo: web scaled to three
    // replicas takes every provider's assignment to a revision newer than
    // the backup's. Only agents that order revisions within one store epoch
    // take the restored daemon's (older) assignments, and stop the extra
    // replicas.
    c.apply_ok("web.yaml", &app_yaml("web", 3, "v1", &[]))?;
    c.wait_ready("web", &["aa", "bb"], 3, 1, WAIT)?;
    let held = assignment_revisions(&c)?;

    // The data dir is lost; a daemon is restored from the backup.
    c.kill_daemon()?;
    std::fs::remove_dir_all(c.data_dir())?;
    // A backup that cannot be read is refused before anything is touched.
    let out = c.daemon_refusal(
        &["--restore", "/nonexistent/backup"],
        Duration::from_secs(10),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("/nonexistent/backup"),
        "a missing backup: {stderr}"
    );
    c.start_daemon_with(&["--restore", &backup.to_string_lossy()])?;
    c.wait_until("both agents back", WAIT, |c| {
        Ok(c.providers()?
            .iter()
            .all(|p| p["state"] == "up")
            .then_some(()))
    })?;
    let apps = c.apps()?;
    ensure!(
        apps.len() == apps_at_backup,
        "get shows the backup's {apps_at_backup} apps, not {}",
        apps.len()
    );
    c.wait_ready("web", &["aa", "bb"], 2, 1, WAIT)?;
    ensure!(
        instances(&c, "web")? == before,
        "replicas were restarted by the restore: {before:?} → {:?}",
        instances(&c, "web")?
    );
    let restored = assignment_revisions(&c)?;
    ensure!(
        restored
            .iter()
            .all(|(p, r)| held.get(p).is_some_and(|h| r < h)),
        "the restored assignments ({restored:?}) are not older than the agents' ({held:?}): \
         nothing here needs the epoch rule"
    );
    // Nothing beyond the backup's replicas runs: each one's own process only.
    let running: Vec<(String, String)> = c
        .replica_processes()
        .into_iter()
        .flat_map(|(id, pids)| {
            pids.into_iter()
                .map(move |pid| (id.clone(), pid.to_string()))
        })
        .collect();
    ensure!(
        running == before,
        "the processes that run are not the backup's replicas: {running:?}"
    );
    let status: Value = serde_json::from_str(&c.cli_ok(&["status", "-o", "json"])?)?;
    ensure!(
        status["daemon"]["storeEpoch"]
            .as_u64()
            .is_some_and(|e| e > 1),
        "a restore starts a later epoch: {}",
        status["daemon"]
    );
    Ok(())
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Option<Self>> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Tmpfs {
                dir: dir.to_path_buf(),
            })),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                if std::env::var("CI").as_deref() == Ok("true") {
                    bail!("cannot mount a tmpfs (needs root): {why}");
                }
                eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {why}");
                Ok(None)
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the file system of `dir` with a file of its own.
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0u8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial blocks, byte by byte in small pieces.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    let _ = f.sync_all();
    Ok(path)
}

#[test]
fn a_full_disk_is_a_state_the_daemon_leaves_by_itself() -> Result<()> {
    let mut c = Cluster::start()?;
    c.kill_daemon()?;
    let mount = c.dir.path().join("small-disk");
    let Some(_fs) = Tmpfs::mount(&mount, "16m")? else {
        return Ok(());
    };
    // The daemon's data dir on the small disk.
    std::fs::remove_dir_all(c.data_dir())?;
    std::fs::create_dir_all(mount.join("daemon"))?;
    std::os::unix::fs::symlink(mount.join("daemon"), c.data_dir())?;
    c.start_daemon()?;
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb"]))?;
    c.start_agent("aa")?;
    c.start_agent("bb")?;
    c.apply_ok("web.yaml", &app_yaml("web", 2, "v1", &[]))?;
    c.wait_ready("web", &["aa", "bb"], 2, 1, WAIT)?;

    let filler = fill(&mount)?;
    // The store may still have room in the pages it holds: applies of large
    // apps succeed until it has none, and then fail clearly.
    let padding = "x".repeat(8 * 1024);
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..200 {
        let name = format!("more-{i}");
        let out = c.apply("more.yaml", &app_yaml(&name, 0, &padding, &[]))?;
        if out.status.success() {
            acknowledged.push(name);
        } else {
            refusal = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let refusal = refusal.context("200 applies of 8 KiB on a full disk all succeeded")?;
    ensure!(
        refusal.contains("cannot write"),
        "an apply on a full disk fails clearly: {refusal}"
    );
    // Reads go on from memory.
    ensure!(
        c.apps()?.len() == 1 + acknowledged.len(),
        "get apps works while the disk is full"
    );
    let status: Value = serde_json::from_str(&c.cli_ok(&["status", "-o", "json"])?)?;
    ensure!(
        status["daemon"]["storeWritable"] == false,
        "status says the store cannot write: {}",
        status["daemon"]
    );

    // A provider dies while the disk is full.
    c.kill_agent("bb")?;
    c.kill_replicas("bb")?;
    c.wait_state("bb", "down", WAIT)?;

    // Space returns: the daemon writes again by itself and handles the death.
    std::fs::remove_file(&filler)?;
    c.wait_until("aa carries bb's share", WAIT, |c| {
        let ready = c.ready_counts("web")?;
        Ok((ready.get("aa") == Some(&4)).then_some(()))
    })?;
    let events = c.events()?;
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    ensure!(
        reasons.contains(&"StoreUnwritable") && reasons.contains(&"StoreWritable"),
        "the outage is in the event log: {reasons:?}"
    );
    let out = c.apply_ok("after.yaml", &app_yaml("after", 1, "v1", &[]))?;
    ensure!(out.contains("app/after created"), "{out}");
    // Every apply acknowledged before the disk filled up is still there.
    c.kill_daemon()?;
    c.start_daemon()?;
    let names: Vec<String> = c
        .apps()?
        .iter()
        .filter_map(|a| a["name"].as_str().map(str::to_string))
        .collect();
    for name in &acknowledged {
        ensure!(
            names.contains(name),
            "acknowledged {name} is lost: {names:?}"
        );
    }
    Ok(())
}
