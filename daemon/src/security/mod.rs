//! Who may do what: the daemon's certificate authority and the agents'
//! certificates ([`pki`]), bearer tokens with roles and the map of methods
//! to roles ([`tokens`]), the bounds on what one agent can make the daemon
//! do ([`limits`]), the counters of refusals ([`Counters`]) and the
//! sanitizing of strings that come from agents ([`sanitize`]).
//!
//! The trust model: the daemon's CA (created in `DATA_DIR/pki` on first
//! start, or brought by the operator) signs the daemon's server certificate
//! and agents' client certificates. An agent proves it may run for a
//! provider once, with a join token, and from then on by a certificate
//! naming that provider (`spiffe://skymirror/provider/<name>`); callers of
//! the control API present bearer tokens whose role decides which methods
//! they may call. The daemon keeps only a SHA-256 of each token's secret.
//!
//! Boundary: pure functions and types, no store, no sockets and no protobuf;
//! the effects (issuing, revoking, admitting sessions) live in
//! `crate::access`, the gRPC layer's checks in `crate::api::auth` and
//! `crate::api::tls`.

pub mod limits;
pub mod pki;
pub mod tokens;

use std::sync::atomic::{AtomicU64, Ordering};

pub use pki::{AgentCertificate, PeerCertificate, Pki, PkiError};
pub use tokens::{Access, ApiToken, Role, TokenRefusal};

/// Refusals and drops since the daemon started, for `status` and the logs.
#[derive(Debug, Default)]
pub struct Counters {
    /// `Join` calls refused (a bad join token, an undeclared provider, a bad
    /// request).
    pub refused_joins: AtomicU64,
    /// Agent sessions refused (no, expired, revoked or another provider's
    /// certificate; a second live session; a wrong hello token).
    pub refused_sessions: AtomicU64,
    /// Control calls without a valid token, or with a token of a role that
    /// may not call the method.
    pub refused_calls: AtomicU64,
    /// TLS handshakes that failed (a plaintext client on the TLS port, an
    /// untrusted certificate, a client that never finished).
    pub failed_handshakes: AtomicU64,
    /// Replica reports dropped: replicas the daemon did not assign, of apps
    /// that do not exist, or beyond the bounds.
    pub dropped_reports: AtomicU64,
    /// Events about a provider dropped over its rate.
    pub dropped_events: AtomicU64,
    /// Agent sessions ended because they sent too much.
    pub flooding_agents: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The value of `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The operating system could not give random bytes for a secret or a
/// serial number. Not retryable: nothing is issued without them.
#[derive(Debug, thiserror::Error)]
#[error("the operating system gave no randomness: {0}")]
pub struct NoRandomness(String);

/// `N` random bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], NoRandomness> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| NoRandomness(e.to_string()))?;
    Ok(bytes)
}

/// Longest string from an agent that the daemon keeps in one field (an agent
/// id, a version, a replica's message); longer ones are cut.
pub const MAX_AGENT_TEXT: usize = 1024;

/// `s` safe to print on a terminal and bounded: control characters (C0,
/// DEL, C1, and the bidirectional overrides that reorder what a terminal
/// shows) become `\u{…}` escapes, and the text is cut to `max` bytes on a
/// character boundary. Strings from agents pass through here before they are
/// stored, logged or shown.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if is_unsafe_char(c) {
            let escaped = format!("\\u{{{:x}}}", u32::from(c));
            if out.len() + escaped.len() > max {
                break;
            }
            out.push_str(&escaped);
        } else {
            if out.len() + c.len_utf8() > max {
                break;
            }
            out.push(c);
        }
    }
    out
}

/// Whether `c` changes what a terminal shows rather than showing itself.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_text_is_bounded() {
        assert_eq!(sanitize("plain agent-1", 64), "plain agent-1");
        assert_eq!(sanitize("a\u{1b}[31mred", 64), "a\\u{1b}[31mred");
        assert_eq!(sanitize("line\nbreak\r", 64), "line\\u{a}break\\u{d}");
        assert_eq!(sanitize("\u{7f}\u{9b}", 64), "\\u{7f}\\u{9b}");
        assert_eq!(sanitize("evil\u{202e}txt", 64), "evil\\u{202e}txt");
        assert_eq!(sanitize("ünïcode", 64), "ünïcode");
        assert_eq!(sanitize("abcdef", 3), "abc");
        // Never cuts inside a character or an escape.
        assert_eq!(sanitize("aé", 2), "a");
        assert_eq!(sanitize("a\u{1b}", 4), "a");
    }
}
