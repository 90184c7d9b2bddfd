//! `skymirror token`, `skymirror agent` and `skymirror config`: tokens, agents'
//! certificates and the CLI's contexts.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Serialize;
use skymirror_proto::v1 as pb;

use super::config::{Config, Context, Overrides};
use super::output::{self, Format};
use super::stdout::Stdout;
use super::{AgentCommand, Client, ClientError, ConfigCommand, RoleArg, TokenCommand};

fn role_to_pb(role: RoleArg) -> pb::TokenRole {
    match role {
        RoleArg::Admin => pb::TokenRole::Admin,
        RoleArg::Viewer => pb::TokenRole::Viewer,
        RoleArg::Edge => pb::TokenRole::Edge,
        RoleArg::Join => pb::TokenRole::Join,
    }
}

fn role_name(role: pb::TokenRole) -> &'static str {
    match role {
        pb::TokenRole::Admin => "admin",
        pb::TokenRole::Viewer => "viewer",
        pb::TokenRole::Edge => "edge",
        pb::TokenRole::Join => "join",
        pb::TokenRole::Unspecified => "-",
    }
}

/// A token, as `token list -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenView {
    id: String,
    role: String,
    provider: String,
    description: String,
    created_at_ms: i64,
    /// 0: no expiry.
    expires_at_ms: i64,
    revoked: bool,
    /// Since the daemon started; 0: not used.
    last_used_ms: i64,
}

impl From<&pb::TokenInfo> for TokenView {
    fn from(t: &pb::TokenInfo) -> Self {
        TokenView {
            id: t.id.clone(),
            role: role_name(t.role()).into(),
            provider: t.provider.clone(),
            description: t.description.clone(),
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            revoked: t.revoked,
            last_used_ms: t.last_used_ms,
        }
    }
}

/// An agent's certificate, as `agent list -o json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateView {
    provider: String,
    serial: String,
    agent_id: String,
    not_before_ms: i64,
    not_after_ms: i64,
    revoked: bool,
}

impl From<&pb::AgentCertificate> for CertificateView {
    fn from(c: &pb::AgentCertificate) -> Self {
        CertificateView {
            provider: c.provider.clone(),
            serial: c.serial.clone(),
            agent_id: c.agent_id.clone(),
            not_before_ms: c.not_before_ms,
            not_after_ms: c.not_after_ms,
            revoked: c.revoked,
        }
    }
}

/// When something ends, for tables: `never`, a date, `expired`.
fn expiry(ms: i64, revoked: bool) -> (String, &'static str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let state = if revoked {
        "revoked"
    } else if ms != 0 && ms <= now {
        "expired"
    } else {
        "active"
    };
    let when = if ms == 0 {
        "never".into()
    } else {
        output::time(ms)
    };
    (when, state)
}

/// Runs a `skymirror token` verb.
pub(super) async fn token_verb(mut client: Client, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            role,
            ttl,
            provider,
            description,
        } => {
            let r = client
                .create_token(pb::CreateTokenRequest {
                    role: role_to_pb(role) as i32,
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
                    provider: provider.clone().unwrap_or_default(),
                    description: description.unwrap_or_default(),
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let info = r.token.unwrap_or_default();
            let (until, _) = expiry(info.expires_at_ms, false);
            // The token alone on standard output, for scripts; what it is on
            // standard error.
            eprintln!(
                "created {} token {}{} (expires: {until}); it is shown this once",
                role_name(info.role()),
                info.id,
                if info.provider.is_empty() {
                    String::new()
                } else {
                    format!(" for provider {}", info.provider)
                }
            );
            if role == RoleArg::Join {
                eprintln!(
                    "join an agent with it: skymirror-agent --server https://DAEMON:7600 --provider {} --ca-cert-hash sha256:… --join-token-file FILE --state-dir DIR",
                    provider.as_deref().unwrap_or("NAME")
                );
            }
            let mut out = Stdout::lock();
            writeln!(out, "{}", r.secret)?;
            Ok(())
        }
        TokenCommand::List { output } => {
            let r = client
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let mut out = Stdout::lock();
            if output != Format::Table {
                let views: Vec<TokenView> = r.tokens.iter().map(TokenView::from).collect();
                return super::print_structured(&mut out, output, &views);
            }
            let rows = r
                .tokens
                .iter()
                .map(|t| {
                    let (until, state) = expiry(t.expires_at_ms, t.revoked);
                    vec![
                        t.id.clone(),
                        role_name(t.role()).into(),
                        if t.provider.is_empty() {
                            "-".into()
                        } else {
                            t.provider.clone()
                        },
                        state.into(),
                        until,
                        if t.last_used_ms == 0 {
                            "-".into()
                        } else {
                            format!("{} ago", output::age(t.last_used_ms))
                        },
                        t.description.clone(),
                    ]
                })
                .collect();
            writeln!(
                out,
                "{}",
                output::table(
                    &[
                        "ID",
                        "ROLE",
                        "PROVIDER",
                        "STATE",
                        "EXPIRES",
                        "LAST USED",
                        "DESCRIPTION"
                    ],
                    rows
                )
            )?;
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let r = client
                .revoke_token(pb::RevokeTokenRequest { id })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            writeln!(Stdout::lock(), "{}", r.message)?;
            Ok(())
        }
    }
}

/// Runs a `skymirror agent` verb.
pub(super) async fn agent_verb(mut client: Client, command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::List { output } => {
            let r = client
                .list_agent_certificates(pb::ListAgentCertificatesRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let mut out = Stdout::lock();
            if output != Format::Table {
                let views: Vec<CertificateView> =
                    r.certificates.iter().map(CertificateView::from).collect();
                return super::print_structured(&mut out, output, &views);
            }
            let rows = r
                .certificates
                .iter()
                .map(|c| {
                    let (until, state) = expiry(c.not_after_ms, c.revoked);
                    vec![
                        c.provider.clone(),
                        c.serial.clone(),
                        if c.agent_id.is_empty() {
                            "-".into()
                        } else {
                            c.agent_id.clone()
                        },
                        state.into(),
                        until,
                    ]
                })
                .collect();
            writeln!(
                out,
                "{}",
                output::table(&["PROVIDER", "SERIAL", "AGENT", "STATE", "EXPIRES"], rows)
            )?;
            Ok(())
        }
        AgentCommand::Revoke { provider, serial } => {
            let r = client
                .revoke_agent(pb::RevokeAgentRequest {
                    provider: provider.unwrap_or_default(),
                    serial: serial.unwrap_or_default(),
                })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            writeln!(Stdout::lock(), "{}", r.message)?;
            Ok(())
        }
    }
}

/// Runs a `skymirror config` verb on the config at `path`.
pub(super) fn config_verb(
    command: ConfigCommand,
    overrides: &Overrides,
    mut config: Config,
    path: &Path,
) -> anyhow::Result<()> {
    match command {
        ConfigCommand::SetContext {
            name,
            embed,
            token_stdin,
            make_current,
        } => {
            let old = config.contexts.iter().find(|c| c.name == name).cloned();
            let server = overrides
                .server
                .clone()
                .or_else(|| old.as_ref().map(|c| c.server.clone()))
                .context("a new context needs --server")?;
            let mut context = old.unwrap_or_default();
            context.name = name.clone();
            context.server = server;
            if let Some(ca) = &overrides.ca_file {
                let ca = std::path::absolute(ca)?;
                if embed {
                    context.ca_data = Some(
                        std::fs::read_to_string(&ca)
                            .with_context(|| format!("reading {}", ca.display()))?,
                    );
                    context.ca_file = None;
                } else {
                    std::fs::metadata(&ca).with_context(|| format!("{}", ca.display()))?;
                    context.ca_file = Some(ca);
                    context.ca_data = None;
                }
            }
            if token_stdin {
                let mut token = String::new();
                std::io::stdin()
                    .read_to_string(&mut token)
                    .context("reading the token from standard input")?;
                if token.trim().is_empty() {
                    bail!("no token on standard input");
                }
                context.token = Some(token.trim().to_string());
                context.token_file = None;
            } else if let Some(file) = &overrides.token_file {
                let file = std::path::absolute(file)?;
                if embed {
                    context.token = Some(
                        std::fs::read_to_string(&file)
                            .with_context(|| format!("reading {}", file.display()))?
                            .trim()
                            .to_string(),
                    );
                    context.token_file = None;
                } else {
                    std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?;
                    context.token_file = Some(file);
                    context.token = None;
                }
            }
            config.set(context, make_current);
            config.save(path)?;
            writeln!(
                Stdout::lock(),
                "context {name} set in {}{}",
                path.display(),
                if make_current { " (current)" } else { "" }
            )?;
            Ok(())
        }
        ConfigCommand::UseContext { name } => {
            if config.context(Some(&name))?.is_none() {
                bail!("no context {name:?}");
            }
            config.current_context = name.clone();
            config.save(path)?;
            writeln!(Stdout::lock(), "current context: {name}")?;
            Ok(())
        }
        ConfigCommand::GetContexts => {
            let rows = config
                .contexts
                .iter()
                .map(|c: &Context| {
                    vec![
                        if c.name == config.current_context {
                            "*".into()
                        } else {
                            String::new()
                        },
                        c.name.clone(),
                        c.server.clone(),
                        match (&c.ca_data, &c.ca_file) {
                            (Some(_), _) => "(inline)".into(),
                            (None, Some(f)) => f.display().to_string(),
                            (None, None) => "-".into(),
                        },
                        match (&c.token, &c.token_file) {
                            (Some(_), _) => "(inline)".into(),
                            (None, Some(f)) => f.display().to_string(),
                            (None, None) => "-".into(),
                        },
                    ]
                })
                .collect();
            writeln!(
                Stdout::lock(),
                "{}",
                output::table(&["CURRENT", "NAME", "SERVER", "CA", "TOKEN"], rows)
            )?;
            Ok(())
        }
    }
}
