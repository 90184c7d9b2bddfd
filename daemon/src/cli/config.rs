//! The CLI's contexts, like a kubeconfig: each names a daemon (its URL), the
//! CA to trust it by (a file or the PEM inline) and the token to call it
//! with (inline or a file); one is current.
//!
//! The file is `$SKYMIRROR_CONFIG`, else `$XDG_CONFIG_HOME/skymirror/config`,
//! else `~/.config/skymirror/config`; YAML:
//!
//! ```yaml
//! current-context: dev
//! contexts:
//!   - name: dev
//!     server: https://127.0.0.1:7600
//!     ca-data: |
//!       -----BEGIN CERTIFICATE-----
//!       ...
//!     token: 0123456789abcdef.…
//!   - name: prod
//!     server: https://daemon.example.com:7600
//!     ca-file: /etc/skymirror/ca.pem
//!     token-file: /home/me/.config/skymirror/prod.token
//! ```
//!
//! It holds tokens: it is written 0600 in a 0700 directory. What a command
//! uses is resolved in this order: `--ca-file` over the context's CA;
//! `SKYMIRROR_TOKEN`, then `--token-file`, over the context's token;
//! `--server` (or `SKYMIRROR_SERVER`) over the context's server — and a
//! server given without `--context` uses no context at all, so that a
//! context's token only ever goes to its own daemon.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The server when neither a flag nor a context names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7600";

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// The context commands use without `--context`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_context: String,
    /// Every context.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One daemon and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Context {
    /// Its name.
    pub name: String,
    /// The daemon's URL: `https://host:port` (or `http://` for a plaintext
    /// loopback daemon).
    pub server: String,
    /// The daemon's CA certificate, a PEM file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The daemon's CA certificate, PEM, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_data: Option<String>,
    /// The token, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The token, in a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Where the config file is.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKYMIRROR_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p).join("skymirror").join("config"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no HOME to find the config file in; set SKYMIRROR_CONFIG")?;
    Ok(PathBuf::from(home)
        .join(".config")
        .join("skymirror")
        .join("config"))
}

impl Config {
    /// Reads the config at `path`; an absent file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml_ng::from_str(&text)
                .with_context(|| format!("{}: not a skymirror config", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the config to `path`, 0600 in a 0700 directory, atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        // A directory made for it is private; an existing one (the user
        // chose it with SKYMIRROR_CONFIG) is left as it is: the file is.
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_yaml_ng::to_string(self)?;
        crate::security::pki::write_private(path, text.as_bytes())?;
        Ok(())
    }

    /// The context `name`, or the current one.
    pub fn context(&self, name: Option<&str>) -> anyhow::Result<Option<&Context>> {
        let wanted = match name {
            Some(n) => n,
            None if self.current_context.is_empty() => return Ok(None),
            None => &self.current_context,
        };
        match self.contexts.iter().find(|c| c.name == wanted) {
            Some(c) => Ok(Some(c)),
            None => bail!(
                "no context {wanted:?} in the config (it has: {})",
                self.contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Adds or replaces a context; makes it current with `make_current`.
    pub fn set(&mut self, context: Context, make_current: bool) {
        if make_current {
            self.current_context = context.name.clone();
        }
        match self.contexts.iter_mut().find(|c| c.name == context.name) {
            Some(c) => *c = context,
            None => self.contexts.push(context),
        }
    }
}

/// Where and how a command reaches the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The daemon's URL.
    pub server: String,
    /// The CA to trust, PEM, for `https://`.
    pub ca_pem: Option<String>,
    /// The bearer token.
    pub token: Option<String>,
}

/// What the command line and the environment say, before the config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--server` / `SKYMIRROR_SERVER`.
    pub server: Option<String>,
    /// `--context` / `SKYMIRROR_CONTEXT`.
    pub context: Option<String>,
    /// `--ca-file` / `SKYMIRROR_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `--token-file` / `SKYMIRROR_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// `SKYMIRROR_TOKEN`.
    pub token: Option<String>,
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// Resolves the target from the overrides and the config. A server named
/// without a context (`--server` or `SKYMIRROR_SERVER` alone) uses no
/// context at all: a context's token is never sent to another daemon.
pub fn resolve(overrides: &Overrides, config: &Config) -> anyhow::Result<Target> {
    let context = match (&overrides.server, &overrides.context) {
        (Some(_), None) => None,
        (_, name) => config.context(name.as_deref())?,
    };
    let server = overrides
        .server
        .clone()
        .or_else(|| context.map(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let ca_pem = match (&overrides.ca_file, context) {
        (Some(f), _) => Some(read_file(f, "CA file")?),
        (None, Some(c)) => match (&c.ca_data, &c.ca_file) {
            (Some(pem), _) => Some(pem.clone()),
            (None, Some(f)) => Some(read_file(f, "CA file")?),
            (None, None) => None,
        },
        (None, None) => None,
    };
    let token = match (&overrides.token, &overrides.token_file, context) {
        (Some(t), _, _) => Some(t.clone()),
        (None, Some(f), _) => Some(read_file(f, "token file")?),
        (None, None, Some(c)) => match (&c.token, &c.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read_file(f, "token file")?),
            (None, None) => None,
        },
        (None, None, None) => None,
    };
    let token = token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    if server.starts_with("https://") && ca_pem.is_none() {
        bail!(
            "{server} serves TLS: give the daemon's CA with --ca-file (the daemon's DATA_DIR/pki/ca.pem) or a context with ca-file or ca-data (skymirror config set-context)"
        );
    }
    Ok(Target {
        server,
        ca_pem,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::default();
        c.set(
            Context {
                name: "dev".into(),
                server: "https://127.0.0.1:7600".into(),
                ca_data: Some("PEM".into()),
                token: Some("dev-token".into()),
                ..Context::default()
            },
            true,
        );
        c.set(
            Context {
                name: "lab".into(),
                server: "http://127.0.0.1:7601".into(),
                ..Context::default()
            },
            false,
        );
        c
    }

    #[test]
    fn the_current_context_is_used_and_flags_override_it() {
        let c = config();
        let t = resolve(&Overrides::default(), &c).expect("resolves");
        assert_eq!(t.server, "https://127.0.0.1:7600");
        assert_eq!(t.ca_pem.as_deref(), Some("PEM"));
        assert_eq!(t.token.as_deref(), Some("dev-token"));

        let env_token = Overrides {
            token: Some(" other\n".into()),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(&env_token, &c).expect("resolves").token.as_deref(),
            Some("other")
        );
        let lab = Overrides {
            context: Some("lab".into()),
            ..Overrides::default()
        };
        let t = resolve(&lab, &c).expect("resolves");
        assert_eq!(
            (t.server.as_str(), t.token),
            ("http://127.0.0.1:7601", None)
        );
        // A server alone uses no context: the context's token stays home.
        let server = Overrides {
            server: Some("http://127.0.0.1:9".into()),
            ..Overrides::default()
        };
        let t = resolve(&server, &c).expect("resolves");
        assert_eq!((t.server.as_str(), t.token), ("http://127.0.0.1:9", None));
        // With a context named, the server overrides only its server.
        let both = Overrides {
            server: Some("https://127.0.0.1:9".into()),
            context: Some("dev".into()),
            ..Overrides::default()
        };
        let t = resolve(&both, &c).expect("resolves");
        assert_eq!(t.server, "https://127.0.0.1:9");
        assert_eq!(t.token.as_deref(), Some("dev-token"));
    }

    #[test]
    fn no_config_is_the_local_default_and_https_needs_a_ca() {
        let t = resolve(&Overrides::default(), &Config::default()).expect("resolves");
        assert_eq!(t.server, DEFAULT_SERVER);
        let https = Overrides {
            server: Some("https://daemon:7600".into()),
            ..Overrides::default()
        };
        let err = resolve(&https, &Config::default()).expect_err("no CA");
        assert!(err.to_string().contains("--ca-file"), "{err}");
        let missing = Overrides {
            context: Some("nope".into()),
            ..Overrides::default()
        };
        let err = resolve(&missing, &config()).expect_err("unknown");
        assert!(err.to_string().contains("dev, lab"), "{err}");
    }

    #[test]
    fn the_file_is_private_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("conf").join("config");
        let c = config();
        c.save(&path).expect("saved");
        assert_eq!(Config::load(&path).expect("loaded"), c);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        assert_eq!(
            Config::load(&dir.path().join("absent")).expect("empty"),
            Config::default()
        );
    }
}
