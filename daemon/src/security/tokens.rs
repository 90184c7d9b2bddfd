//! Bearer tokens and what each role may call.
//!
//! A token is `<id>.<secret>`: the id (16 hex digits) names it in lists and
//! logs and is not secret; the secret (64 hex digits, 256 bits from the OS
//! CSPRNG) is shown once, at creation. The daemon keeps the SHA-256 of the
//! secret and compares digests in constant time, so neither its store nor a
//! backup holds a usable token.
//!
//! [`access`] maps each gRPC method to who may call it: health and
//! reflection are open; `AgentService` checks agents by its own rules (a
//! join token in `Join`, a client certificate in `Session` and `Renew`);
//! every `ControlService` method needs a token whose role allows it.

use std::time::Duration;

use ring::digest;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reading: get, describe, status, events, logs, explain.
    Viewer,
    /// The routing table only (front doors).
    Edge,
    /// Joining an agent (`AgentService.Join`) and nothing else.
    Join,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Viewer, Role::Edge, Role::Join];

    /// The role's name, as the CLI and the store spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Edge => "edge",
            Role::Join => "join",
        }
    }

    /// The role named `s`, if any.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// How long a token of this role lives when its creator does not say:
    /// join tokens a day (they are meant for one installation), the others
    /// until revoked.
    pub fn default_ttl(self) -> Option<Duration> {
        match self {
            Role::Join => Some(Duration::from_secs(24 * 3600)),
            Role::Admin | Role::Viewer | Role::Edge => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as the daemon keeps it: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Public part of the token; names it in lists, logs and `revoke`.
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
    /// What it may do.
    pub role: Role,
    /// Join tokens: the only provider it joins; empty for any declared one
    /// (and for other roles).
    pub provider: String,
    /// Free text shown in lists, to tell tokens apart.
    pub description: String,
    /// Creation, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since the Unix epoch; 0 for none.
    pub expires_at_ms: i64,
    /// Revocation, ms since the Unix epoch; 0 while not revoked.
    pub revoked_at_ms: i64,
}

impl ApiToken {
    /// Whether the token is usable at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms == 0 && (self.expires_at_ms == 0 || now_ms < self.expires_at_ms)
    }
}

/// Why a presented token is refused. The message never says more about a
/// token than its id, and says nothing of an id whose secret was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Not of the form `<id>.<secret>`.
    #[error("the token is malformed: expected <id>.<secret> as `skymirror token create` prints it")]
    Malformed,
    /// No such token, or a wrong secret.
    #[error("unknown token {id}")]
    Unknown {
        /// The id presented.
        id: String,
    },
    /// It expired.
    #[error("token {id} expired at {at}")]
    Expired {
        /// The token's id.
        id: String,
        /// When, for people (RFC 3339, UTC).
        at: String,
    },
    /// It was revoked.
    #[error("token {id} was revoked at {at}")]
    Revoked {
        /// The token's id.
        id: String,
        /// When, for people (RFC 3339, UTC).
        at: String,
    },
}

/// Digits of a token's id and of its secret.
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A new token of `role` valid for `ttl` (none: until revoked) from
/// `now_ms`; returns it and the whole token `<id>.<secret>` to show once.
pub fn new_token(
    role: Role,
    ttl: Option<Duration>,
    provider: &str,
    description: &str,
    now_ms: i64,
) -> Result<(ApiToken, String), super::NoRandomness> {
    let id = hex(&super::random_bytes::<{ ID_HEX / 2 }>()?);
    let secret = hex(&super::random_bytes::<{ SECRET_HEX / 2 }>()?);
    let expires_at_ms = ttl.map_or(0, |t| {
        now_ms.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
    });
    let token = ApiToken {
        id: id.clone(),
        secret_sha256: sha256(secret.as_bytes()),
        role,
        provider: provider.to_string(),
        description: description.to_string(),
        created_at_ms: now_ms,
        expires_at_ms,
        revoked_at_ms: 0,
    };
    Ok((token, format!("{id}.{secret}")))
}

/// Splits a presented token into its id and secret, refusing anything that
/// is not exactly the daemon's format (before any lookup).
pub fn split(presented: &str) -> Result<(&str, &str), TokenRefusal> {
    let (id, secret) = presented
        .trim()
        .split_once('.')
        .ok_or(TokenRefusal::Malformed)?;
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if is_hex(id, ID_HEX) && is_hex(secret, SECRET_HEX) {
        Ok((id, secret))
    } else {
        Err(TokenRefusal::Malformed)
    }
}

/// Checks a presented secret against the stored token of its id (`None`
/// when there is none) at `now_ms`.
pub fn check(
    id: &str,
    secret: &str,
    stored: Option<&ApiToken>,
    now_ms: i64,
) -> Result<(), TokenRefusal> {
    let unknown = || TokenRefusal::Unknown { id: id.to_string() };
    let token = stored.ok_or_else(unknown)?;
    if !constant_time_eq(&sha256(secret.as_bytes()), &token.secret_sha256) {
        return Err(unknown());
    }
    if token.revoked_at_ms != 0 {
        return Err(TokenRefusal::Revoked {
            id: id.to_string(),
            at: rfc3339(token.revoked_at_ms),
        });
    }
    if token.expires_at_ms != 0 && now_ms >= token.expires_at_ms {
        return Err(TokenRefusal::Expired {
            id: id.to_string(),
            at: rfc3339(token.expires_at_ms),
        });
    }
    Ok(())
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// Compares two digests in time independent of where they differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ms` since the Unix epoch as RFC 3339 in UTC, for messages.
pub fn rfc3339(ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{ms} ms"))
}

/// Who may call a gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, reflection).
    Open,
    /// `AgentService`: agents prove themselves by its own rules.
    Agent,
    /// Callers whose token has one of these roles (admin always may).
    Roles(&'static [Role]),
}

impl Access {
    /// Whether `role` may call a method of this access.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Open | Access::Agent => true,
            Access::Roles(roles) => role == Role::Admin || roles.contains(&role),
        }
    }

    /// The roles that may call, for messages: `admin or viewer`.
    pub fn describe(self) -> String {
        match self {
            Access::Open | Access::Agent => "none".into(),
            Access::Roles(roles) => std::iter::once("admin")
                .chain(roles.iter().map(|r| r.as_str()))
                .collect::<Vec<_>>()
                .join(" or "),
        }
    }
}

/// Reading methods: what a viewer may call.
const READ: &[Role] = &[Role::Viewer];
/// What a front door may call.
const ROUTES: &[Role] = &[Role::Edge];
/// Everything else: admin only.
const ADMIN: &[Role] = &[];

/// Who may call the gRPC method at `path` (`/package.Service/Method`).
/// Methods this map does not know need an admin, so a method added to a
/// service is closed until someone opens it here.
pub fn access(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Roles(ADMIN);
    };
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        "skymirror.v1.AgentService" => Access::Agent,
        "skymirror.v1.ControlService" => match method {
            "ListApps" | "ListProviders" | "ListReplicas" | "GetAppStatus" | "GetDaemonStatus"
            | "WatchEvents" | "Explain" | "Logs" => Access::Roles(READ),
            "WatchRoutes" => Access::Roles(ROUTES),
            _ => Access::Roles(ADMIN),
        },
        _ => Access::Roles(ADMIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn token(role: Role, ttl: Option<Duration>) -> (ApiToken, String) {
        new_token(role, ttl, "", "test", NOW).expect("randomness")
    }

    #[test]
    fn a_new_token_checks_and_only_its_hash_is_kept() {
        let (t, whole) = token(Role::Viewer, None);
        let (id, secret) = split(&whole).expect("well-formed");
        assert_eq!(id, t.id);
        assert_eq!(t.secret_sha256, sha256(secret.as_bytes()));
        assert!(!format!("{t:?}").contains(secret), "the secret is not kept");
        assert_eq!(check(id, secret, Some(&t), NOW), Ok(()));
        let (other, _) = token(Role::Viewer, None);
        assert_ne!(other.id, t.id, "ids are random");
    }

    #[test]
    fn wrong_unknown_expired_and_revoked_tokens_are_refused() {
        let (t, whole) = token(Role::Join, Some(Duration::from_secs(60)));
        let (id, secret) = split(&whole).expect("well-formed");
        let mut wrong = secret.to_string();
        wrong.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        assert_eq!(
            check(id, &wrong, Some(&t), NOW),
            Err(TokenRefusal::Unknown { id: id.into() })
        );
        assert_eq!(
            check(id, secret, None, NOW),
            Err(TokenRefusal::Unknown { id: id.into() })
        );
        assert_eq!(check(id, secret, Some(&t), NOW + 59_999), Ok(()));
        let expired = check(id, secret, Some(&t), NOW + 60_000).expect_err("expired");
        assert!(
            expired
                .to_string()
                .contains("expired at 2027-01-15T08:01:00"),
            "{expired}"
        );
        let mut revoked = t.clone();
        revoked.revoked_at_ms = NOW + 1;
        assert!(matches!(
            check(id, secret, Some(&revoked), NOW + 2),
            Err(TokenRefusal::Revoked { .. })
        ));
        assert!(!revoked.is_active(NOW + 2));
        assert!(t.is_active(NOW) && !t.is_active(NOW + 60_000));
    }

    #[test]
    fn only_the_exact_format_is_accepted() {
        let (_, whole) = token(Role::Admin, None);
        for bad in [
            "",
            "nodot",
            ".",
            &whole.to_uppercase(),
            &format!("{whole}0"),
            &whole.replacen('.', ":", 1),
            "0123456789abcdef.short",
        ] {
            assert_eq!(split(bad), Err(TokenRefusal::Malformed), "{bad:?}");
        }
        assert!(
            split(&format!(" {whole}\n")).is_ok(),
            "a file's newline is fine"
        );
    }

    #[test]
    fn join_tokens_expire_by_default_others_do_not() {
        assert_eq!(
            Role::Join.default_ttl(),
            Some(Duration::from_secs(24 * 3600))
        );
        for r in [Role::Admin, Role::Viewer, Role::Edge] {
            assert_eq!(r.default_ttl(), None);
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn the_role_map() {
        let control = |m: &str| access(&format!("/skymirror.v1.ControlService/{m}"));
        for m in [
            "ListApps",
            "ListProviders",
            "ListReplicas",
            "GetAppStatus",
            "GetDaemonStatus",
            "WatchEvents",
            "Explain",
            "Logs",
        ] {
            let a = control(m);
            assert!(a.allows(Role::Viewer) && a.allows(Role::Admin), "{m}");
            assert!(!a.allows(Role::Edge) && !a.allows(Role::Join), "{m}");
        }
        let routes = control("WatchRoutes");
        assert!(routes.allows(Role::Edge) && routes.allows(Role::Admin));
        assert!(!routes.allows(Role::Viewer) && !routes.allows(Role::Join));
        for m in [
            "Apply",
            "Delete",
            "Failover",
            "Failback",
            "ControlProvider",
            "Backup",
            "CreateToken",
            "ListTokens",
            "RevokeToken",
            "ListAgentCertificates",
            "RevokeAgent",
            "SomethingNew",
        ] {
            let a = control(m);
            assert!(a.allows(Role::Admin), "{m}");
            for r in [Role::Viewer, Role::Edge, Role::Join] {
                assert!(!a.allows(r), "{m} must not allow {r}");
            }
            assert_eq!(a.describe(), "admin", "{m}");
        }
        assert_eq!(control("Logs").describe(), "admin or viewer");
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(access("/skymirror.v1.AgentService/Join"), Access::Agent);
        assert_eq!(access("/other.Service/Method"), Access::Roles(ADMIN));
        assert_eq!(access("garbage"), Access::Roles(ADMIN));
    }
}
