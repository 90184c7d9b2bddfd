//! The daemon's certificates: its CA, its server certificate, the agents'
//! client certificates, and what a peer's certificate says.
//!
//! On first start the daemon creates a CA in `DATA_DIR/pki` (`ca.pem`,
//! `ca-key.pem`; ECDSA P-256; ten years) and a server certificate signed by
//! it (`server.pem`, `server-key.pem`; one year) naming `localhost`,
//! `127.0.0.1`, `::1` and every `--advertise` name. The server certificate is
//! issued again when those names change or when it has less than 30 days
//! left. Keys are written 0600 in a 0700 directory, atomically.
//!
//! An operator may bring a PKI instead: `--tls-cert/--tls-key` for the
//! server certificate (agents then pin that certificate's CA themselves with
//! `--ca-file`), and `--client-ca` for the CA that signs agents'
//! certificates; `Join` and `Renew` then need that CA's key too
//! (`--client-ca-key`), and without it agents get their certificates from
//! the operator's PKI and the daemon only checks them.
//!
//! The daemon sends its CA certificate after its server certificate in the
//! handshake, so an agent that pins the CA by the SHA-256 of its public key
//! (`--ca-cert-hash sha256:…`, kubeadm's form) needs no file copied: it finds
//! the certificate with that key in the chain and verifies the server's
//! certificate against it.
//!
//! An agent's certificate names its provider in a URI subject alternative
//! name, `spiffe://skymirror/provider/<name>` (and in its common name); it is
//! for client authentication only, with a random 127-bit serial.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsName, SignatureScheme,
};

use super::tokens::{hex, sha256};

/// The prefix of the URI that names an agent's provider in its certificate.
pub const PROVIDER_URI_PREFIX: &str = "spiffe://skymirror/provider/";

/// Names the server certificate always carries, so local clients connect.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// How long the daemon's own CA lives.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate lives.
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A server certificate with less than this left is issued again at start.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates are valid from this long before they are issued, so a
/// peer whose clock is a little behind accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Largest certificate request accepted.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why certificate material cannot be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file cannot be read or written. Not retryable without operator action.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should (a certificate, a key).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificates could not be made or TLS set up. Not retryable.
    #[error("certificates: {0}")]
    Generate(String),
    /// A certificate request the daemon will not sign: the caller's fault,
    /// nothing was issued.
    #[error("certificate request: {0}")]
    BadRequest(String),
    /// This daemon does not sign agents' certificates (it checks certificates
    /// of an operator's CA whose key it does not hold).
    #[error(
        "this daemon does not issue agent certificates: it trusts the CA of --client-ca without its key (--client-ca-key); give the agent a certificate from that CA naming {PROVIDER_URI_PREFIX}<provider>"
    )]
    NoIssuer,
    /// A peer's certificate cannot be read.
    #[error("the client certificate cannot be read: {0}")]
    Peer(String),
    /// The OS gave no randomness for a serial number.
    #[error(transparent)]
    Randomness(#[from] super::NoRandomness),
}

fn generate(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// Where the daemon's PKI comes from.
#[derive(Debug, Clone)]
pub struct PkiOptions {
    /// Directory of the daemon's own CA and server certificate (`DATA_DIR/pki`).
    pub dir: PathBuf,
    /// Names and addresses the server certificate carries besides loopback.
    pub advertise: Vec<String>,
    /// The operator's server certificate chain (PEM) and its key, instead of
    /// one from the daemon's CA.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    /// The operator's CA for agents' certificates, and its key if the daemon
    /// may sign with it.
    pub client_ca: Option<(PathBuf, Option<PathBuf>)>,
    /// Lifetime of the agent certificates the daemon signs.
    pub agent_lifetime: Duration,
}

/// An agent's certificate as the daemon records it (issued by `Join` or
/// `Renew`, or first seen from an operator's CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertificate {
    /// Serial number, lowercase hex; its key in the store.
    pub serial: String,
    /// The provider it names.
    pub provider: String,
    /// The agent it was issued to (empty for one the daemon did not issue).
    pub agent_id: String,
    /// Valid from, ms since the Unix epoch.
    pub not_before_ms: i64,
    /// Valid until, ms since the Unix epoch.
    pub not_after_ms: i64,
    /// Revocation, ms since the Unix epoch; 0 while not revoked.
    pub revoked_at_ms: i64,
    /// How it was obtained, for people: `join token <id>`, `renewal of
    /// <serial>`, `operator's CA`.
    pub issued_by: String,
}

/// What a peer's certificate says, read after the TLS layer verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The provider its URI name (or, without one, its common name) names.
    pub provider: Option<String>,
    /// Valid from, ms since the Unix epoch.
    pub not_before_ms: i64,
    /// Valid until, ms since the Unix epoch.
    pub not_after_ms: i64,
}

impl PeerCertificate {
    /// Reads a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Peer(e.to_string()))?;
        let validity = cert.validity();
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && let Some(p) = uri.strip_prefix(PROVIDER_URI_PREFIX)
                {
                    uris.push(p.to_string());
                }
            }
        }
        if uris.len() > 1 {
            return Err(PkiError::Peer(format!(
                "it names {} providers; an agent's certificate names one",
                uris.len()
            )));
        }
        let provider = uris.pop().or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string)
        });
        Ok(PeerCertificate {
            serial: hex(cert.raw_serial()),
            provider: provider.filter(|p| crate::spec::name_problem(p).is_none()),
            not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
            not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
        })
    }
}

/// A certificate the daemon just signed for an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub pem: String,
    /// Its record (not revoked; `agent_id` and `issued_by` as given).
    pub record: AgentCertificate,
}

/// The daemon's TLS material: what it serves with, whom it trusts, and the
/// CA it signs agents' certificates with.
pub struct Pki {
    /// Signs agents' certificates; `None` when the operator's CA is trusted
    /// without its key.
    agent_issuer: Option<Issuer<'static, KeyPair>>,
    /// The CA certificate agents pin, PEM; empty when the server certificate
    /// is the operator's (its CA is theirs to hand out).
    server_ca_pem: String,
    /// `sha256:<hex>` of that CA's SubjectPublicKeyInfo; empty likewise.
    ca_hash: String,
    /// The TLS server configuration (certificate, key, client verifier, h2).
    server_config: Arc<rustls::ServerConfig>,
    /// Lifetime of the agent certificates it signs.
    agent_lifetime: Duration,
    /// What loading did, for the start-up log: `created a CA`, ...
    notes: Vec<String>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca_hash", &self.ca_hash)
            .field("issues_agent_certificates", &self.agent_issuer.is_some())
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the PKI `options` describe, creating the daemon's own CA and
    /// server certificate where they are missing or due.
    pub fn load_or_create(options: &PkiOptions) -> Result<Self, PkiError> {
        let mut notes = Vec::new();
        let needs_own_ca = options.tls_cert.is_none() || options.client_ca.is_none();
        let own_ca = if needs_own_ca {
            private_dir(&options.dir)?;
            Some(own_ca(&options.dir, &mut notes)?)
        } else {
            None
        };

        // The server's certificate and key.
        let (chain, key, server_ca_pem) = match (&options.tls_cert, &own_ca) {
            (Some((cert, key)), _) => (read_chain(cert)?, read_key(key)?, String::new()),
            (None, Some(ca)) => {
                let (cert_pem, key_pem) = server_certificate(options, ca, &mut notes)?;
                // The CA goes with the server certificate, so an agent that
                // pins it by hash (`--ca-cert-hash`) finds it in the handshake.
                let mut chain = parse_chain(Path::new("server.pem"), cert_pem.as_bytes())?;
                chain.extend(parse_chain(
                    &options.dir.join("ca.pem"),
                    ca.cert_pem.as_bytes(),
                )?);
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| generate(format!("the server key: {e}")))?;
                (chain, key, ca.cert_pem.clone())
            }
            (None, None) => return Err(generate("no CA for the server certificate")),
        };

        // Whom agents' certificates come from.
        let (agent_roots, agent_issuer) = match (&options.client_ca, own_ca) {
            (Some((ca_path, key_path)), _) => {
                let pem = read(ca_path)?;
                let roots = parse_chain(ca_path, pem.as_bytes())?;
                let issuer = match key_path {
                    Some(k) => {
                        let key = KeyPair::from_pem(&read(k)?).map_err(|e| PkiError::Invalid {
                            path: k.clone(),
                            reason: format!("not a private key rcgen can sign with: {e}"),
                        })?;
                        Some(Issuer::from_ca_cert_pem(&pem, key).map_err(|e| {
                            PkiError::Invalid {
                                path: ca_path.clone(),
                                reason: format!("not a CA certificate: {e}"),
                            }
                        })?)
                    }
                    None => None,
                };
                (roots, issuer)
            }
            (None, Some(ca)) => {
                let roots = parse_chain(&options.dir.join("ca.pem"), ca.cert_pem.as_bytes())?;
                (roots, Some(ca.issuer))
            }
            (None, None) => return Err(generate("no CA for agents' certificates")),
        };

        let ca_hash = if server_ca_pem.is_empty() {
            String::new()
        } else {
            ca_cert_hash(&server_ca_pem)?
        };
        let server_config = server_config(chain, key, agent_roots)?;
        Ok(Pki {
            agent_issuer,
            server_ca_pem,
            ca_hash,
            server_config,
            agent_lifetime: options.agent_lifetime,
            notes,
        })
    }

    /// The TLS server configuration.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// The CA agents pin, PEM (empty with the operator's server certificate).
    pub fn ca_pem(&self) -> &str {
        &self.server_ca_pem
    }

    /// `sha256:<hex>` of the pinned CA's public key, as kubeadm prints it
    /// (empty with the operator's server certificate).
    pub fn ca_hash(&self) -> &str {
        &self.ca_hash
    }

    /// Whether `Join` and `Renew` can issue certificates.
    pub fn issues_agent_certificates(&self) -> bool {
        self.agent_issuer.is_some()
    }

    /// What loading did (created a CA, issued a server certificate), for the log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Lifetime of the agent certificates this PKI signs.
    pub fn agent_lifetime(&self) -> Duration {
        self.agent_lifetime
    }

    /// Signs `csr_pem` for `provider`'s agent `agent_id`, valid from
    /// `now_ms` (less a few minutes for clock skew) for the agent lifetime.
    /// Only the request's public key is used; a request that names another
    /// provider is refused.
    pub fn sign_agent(
        &self,
        provider: &str,
        agent_id: &str,
        csr_pem: &str,
        issued_by: String,
        now_ms: i64,
    ) -> Result<Issued, PkiError> {
        let issuer = self.agent_issuer.as_ref().ok_or(PkiError::NoIssuer)?;
        let csr = check_request(provider, csr_pem)?;
        let serial = random_serial()?;
        // Certificates count whole seconds.
        let now = at_ms(now_ms - now_ms.rem_euclid(1000));
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, provider);
        dn.push(DnType::OrganizationName, "skymirror agents");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("{PROVIDER_URI_PREFIX}{provider}")
                .try_into()
                .map_err(|e| PkiError::BadRequest(format!("provider {provider:?}: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + self.agent_lifetime;
        let cert = params
            .signed_by(&csr.public_key, issuer)
            .map_err(generate)?;
        Ok(Issued {
            pem: cert.pem(),
            record: AgentCertificate {
                serial: hex(&serial),
                provider: provider.to_string(),
                agent_id: agent_id.to_string(),
                not_before_ms: ms_of(params.not_before),
                not_after_ms: ms_of(params.not_after),
                revoked_at_ms: 0,
                issued_by,
            },
        })
    }
}

/// Checks a certificate request: its signature, its size, and that it names
/// no provider but `provider` (in its common name or a provider URI).
fn check_request(
    provider: &str,
    csr_pem: &str,
) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(PkiError::BadRequest(format!(
            "it is {} bytes, over the {MAX_CSR_BYTES}-byte limit",
            csr_pem.len()
        )));
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::BadRequest(format!(
            "not a PEM certificate request with a valid signature: {e}"
        ))
    })?;
    for (ty, value) in csr.params.distinguished_name.iter() {
        if *ty == DnType::CommonName {
            let cn = match value {
                rcgen::DnValue::Utf8String(s) => s.clone(),
                rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if cn != provider {
                return Err(PkiError::BadRequest(format!(
                    "it names {cn:?}; this join is for provider {provider:?}"
                )));
            }
        }
    }
    for san in &csr.params.subject_alt_names {
        if let SanType::URI(uri) = san
            && let Some(named) = uri.as_str().strip_prefix(PROVIDER_URI_PREFIX)
            && named != provider
        {
            return Err(PkiError::BadRequest(format!(
                "it names provider {named:?}; this join is for provider {provider:?}"
            )));
        }
    }
    Ok(csr)
}

/// `sha256:<hex>` of the SubjectPublicKeyInfo of the CA certificate in
/// `ca_pem`: what `--ca-cert-hash` pins.
pub fn ca_cert_hash(ca_pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| generate(format!("the CA certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| generate(format!("the CA certificate: {e}")))?;
    Ok(format!("sha256:{}", hex(&sha256(cert.public_key().raw))))
}

/// A random serial number: 16 bytes, the first in 1..=127, so its DER
/// integer is positive, 16 bytes long and reads back the same.
fn random_serial() -> Result<[u8; 16], PkiError> {
    let mut serial = super::random_bytes::<16>()?;
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

fn at_ms(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ms_of(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The daemon's own CA, loaded.
struct OwnCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// Loads the CA in `dir`, creating it when neither file exists.
fn own_ca(dir: &Path, notes: &mut Vec<String>) -> Result<OwnCa, PkiError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {}
        (false, false) => {
            let key = KeyPair::generate().map_err(generate)?;
            let now = time::OffsetDateTime::now_utc();
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "skymirror daemon CA");
            dn.push(DnType::OrganizationName, "skymirror");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
            params.not_before = now - BACKDATE;
            params.not_after = now + CA_LIFETIME;
            let cert = params.self_signed(&key).map_err(generate)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_public(&cert_path, cert.pem().as_bytes())?;
            notes.push(format!("created a CA in {}", dir.display()));
        }
        (has_cert, _) => {
            let (present, missing) = if has_cert {
                (&cert_path, &key_path)
            } else {
                (&key_path, &cert_path)
            };
            return Err(PkiError::Invalid {
                path: missing.clone(),
                reason: format!(
                    "is missing while {} exists: restore it from a backup of the data directory, or remove both to create a new CA (every agent must then join again)",
                    present.display()
                ),
            });
        }
    }
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
        path: key_path.clone(),
        reason: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Invalid {
        path: cert_path.clone(),
        reason: format!("not a CA certificate: {e}"),
    })?;
    Ok(OwnCa { cert_pem, issuer })
}

/// The names a server certificate must carry: loopback plus `advertise`,
/// normalized (IP addresses in their canonical form, names lowercase).
fn wanted_names(advertise: &[String]) -> BTreeSet<String> {
    LOOPBACK_NAMES
        .iter()
        .map(|s| (*s).to_string())
        .chain(advertise.iter().cloned())
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        })
        .collect()
}

/// The names a certificate carries (DNS names and IP addresses) and when it
/// expires, ms since the Unix epoch.
fn certificate_names(pem: &str) -> Option<(BTreeSet<String>, i64)> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.insert(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    let ip = match raw.len() {
                        4 => <[u8; 4]>::try_from(*raw).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*raw).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|i| i.to_string()));
                }
                _ => {}
            }
        }
    }
    Some((
        names,
        cert.validity().not_after.timestamp().saturating_mul(1000),
    ))
}

/// The server certificate and key in `options.dir`, issued (again) by `ca`
/// when missing, for other names, or near its end.
fn server_certificate(
    options: &PkiOptions,
    ca: &OwnCa,
    notes: &mut Vec<String>,
) -> Result<(String, String), PkiError> {
    let cert_path = options.dir.join("server.pem");
    let key_path = options.dir.join("server-key.pem");
    let wanted = wanted_names(&options.advertise);
    let now = time::OffsetDateTime::now_utc();
    let current = match (std::fs::read_to_string(&cert_path), key_path.exists()) {
        (Ok(pem), true) => {
            certificate_names(&pem).map(|(names, not_after)| (pem, names, not_after))
        }
        _ => None,
    };
    let why = match &current {
        None => Some("issued a server certificate".to_string()),
        Some((_, names, _)) if *names != wanted => Some(format!(
            "issued a server certificate for the names {} (it was for {})",
            wanted.iter().cloned().collect::<Vec<_>>().join(", "),
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        )),
        Some((_, _, not_after)) if *not_after < ms_of(now + SERVER_RENEW_BEFORE) => {
            Some("issued a server certificate again: the old one expires within 30 days".into())
        }
        Some(_) => None,
    };
    let Some(why) = why else {
        return Ok((read(&cert_path)?, read(&key_path)?));
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skymirror daemon");
    params.distinguished_name = dn;
    params.subject_alt_names = wanted
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| generate(format!("--advertise {n:?}: {e}"))),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + SERVER_LIFETIME;
    let cert = params.signed_by(&key, &ca.issuer).map_err(generate)?;
    // The key first: a certificate never names a key that is not there.
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    notes.push(why);
    Ok((cert.pem(), key.serialize_pem()))
}

/// The rustls server configuration: the certificate chain and key, client
/// certificates optional and checked against `agent_roots` when offered,
/// HTTP/2 by ALPN.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    agent_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in agent_roots {
        roots.add(root).map_err(generate)?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(generate)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(generate)?
        .with_client_cert_verifier(Arc::new(AgentCertVerifier { inner }))
        .with_single_cert(chain, key)
        .map_err(generate)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Checks client certificates against the agents' CA, but lets an *expired*
/// one through the handshake when its chain verifies at a time it was valid:
/// the agent service then refuses the session with a message that says the
/// certificate expired and when, and records it, instead of the peer seeing
/// a bare TLS alert. Every other failure fails the handshake.
#[derive(Debug)]
struct AgentCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let not_after = PeerCertificate::parse(end_entity)
                    .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
                    .not_after_ms;
                let within = u64::try_from(not_after / 1000 - 1).unwrap_or(0);
                self.inner.verify_client_cert(
                    end_entity,
                    intermediates,
                    UnixTime::since_unix_epoch(Duration::from_secs(within)),
                )
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_chain(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if chain.is_empty() {
        return Err(PkiError::Invalid {
            path: path.to_path_buf(),
            reason: "holds no certificate".into(),
        });
    }
    Ok(chain)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    parse_chain(path, read(path)?.as_bytes())
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(read(path)?.as_bytes()).map_err(|e| PkiError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not a PEM private key: {e}"),
    })
}

/// Creates `dir` (and its parents) readable by its owner only, or makes an
/// existing one so.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` with `mode`, replacing it atomically (a
/// temporary file beside it, synced, then renamed).
fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    // A file left by an earlier run keeps its mode through `open`.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes a secret (a key, a token) readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_with_mode(path, bytes, 0o600)
}

/// Writes a certificate (public).
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_with_mode(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, advertise: &[&str]) -> PkiOptions {
        PkiOptions {
            dir: dir.join("pki"),
            advertise: advertise.iter().map(|s| (*s).to_string()).collect(),
            tls_cert: None,
            client_ca: None,
            agent_lifetime: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// An agent's key and a certificate request naming `cn`, PEM.
    fn request(cn: Option<&str>, uri: Option<&str>) -> String {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        }
        params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_first_start_creates_a_private_ca_and_a_server_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path(), &["daemon.example.com", "10.1.2.3"]);
        let pki = Pki::load_or_create(&opts).expect("created");
        assert_eq!(pki.notes().len(), 2, "{:?}", pki.notes());
        assert!(pki.issues_agent_certificates());
        assert!(pki.ca_hash().starts_with("sha256:") && pki.ca_hash().len() == 7 + 64);
        assert_eq!(mode(&opts.dir), 0o700);
        assert_eq!(mode(&opts.dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&opts.dir.join("server-key.pem")), 0o600);
        let (names, _) =
            certificate_names(&read(&opts.dir.join("server.pem")).expect("read")).expect("names");
        let want: BTreeSet<String> = [
            "localhost",
            "127.0.0.1",
            "::1",
            "daemon.example.com",
            "10.1.2.3",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        assert_eq!(names, want);

        // The same names again: nothing is created, the CA is the same.
        let again = Pki::load_or_create(&opts).expect("loaded");
        assert!(again.notes().is_empty(), "{:?}", again.notes());
        assert_eq!(again.ca_hash(), pki.ca_hash());
        // Other names: a new server certificate from the same CA.
        let renamed =
            Pki::load_or_create(&options(dir.path(), &["other.example.com"])).expect("loaded");
        assert_eq!(renamed.notes().len(), 1, "{:?}", renamed.notes());
        assert_eq!(renamed.ca_hash(), pki.ca_hash());
    }

    #[test]
    fn a_half_missing_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path(), &[]);
        Pki::load_or_create(&opts).expect("created");
        std::fs::remove_file(opts.dir.join("ca-key.pem")).expect("removed");
        let err = Pki::load_or_create(&opts).expect_err("refused").to_string();
        assert!(err.contains("ca-key.pem: is missing while"), "{err}");
    }

    #[test]
    fn an_agent_certificate_names_its_provider_and_is_for_clients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(&options(dir.path(), &[])).expect("created");
        let now = crate::model::now_ms();
        for csr in [
            request(Some("aws"), None),
            request(None, Some("spiffe://skymirror/provider/aws")),
            request(None, None),
        ] {
            let issued = pki
                .sign_agent("aws", "agent-1", &csr, "join token x".into(), now)
                .expect("signed");
            let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).expect("pem");
            let peer = PeerCertificate::parse(&der).expect("parsed");
            assert_eq!(peer.provider.as_deref(), Some("aws"));
            assert_eq!(peer.serial, issued.record.serial);
            assert_eq!(peer.serial.len(), 32);
            assert_eq!(peer.not_after_ms, issued.record.not_after_ms);
            let lifetime = issued.record.not_after_ms - now;
            assert!((7 * 24 * 3600 * 1000 - 2000..=7 * 24 * 3600 * 1000).contains(&lifetime));
            let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
            let eku = cert
                .extended_key_usage()
                .expect("eku")
                .expect("present")
                .value;
            assert!(eku.client_auth && !eku.server_auth);
            assert!(!cert.is_ca());
        }
    }

    #[test]
    fn a_request_for_another_provider_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(&options(dir.path(), &[])).expect("created");
        let now = crate::model::now_ms();
        for csr in [
            request(Some("gcp"), None),
            request(None, Some("spiffe://skymirror/provider/gcp")),
        ] {
            let err = pki
                .sign_agent("aws", "agent-1", &csr, "join token x".into(), now)
                .expect_err("refused");
            assert!(
                matches!(err, PkiError::BadRequest(ref m) if m.contains("\"gcp\"") && m.contains("\"aws\"")),
                "{err}"
            );
        }
        let err = pki
            .sign_agent("aws", "a", "not a request", "x".into(), now)
            .expect_err("refused");
        assert!(matches!(err, PkiError::BadRequest(_)), "{err}");
        let huge = "A".repeat(MAX_CSR_BYTES + 1);
        assert!(matches!(
            pki.sign_agent("aws", "a", &huge, "x".into(), now),
            Err(PkiError::BadRequest(_))
        ));
    }

    #[test]
    fn serials_are_random_and_positive() {
        let a = random_serial().expect("random");
        let b = random_serial().expect("random");
        assert_ne!(a, b);
        assert!((1..=0x7f).contains(&a[0]));
    }

    #[test]
    fn the_ca_hash_is_the_public_key_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path(), &[]);
        let pki = Pki::load_or_create(&opts).expect("created");
        let key =
            KeyPair::from_pem(&read(&opts.dir.join("ca-key.pem")).expect("key")).expect("key");
        use rcgen::PublicKeyData as _;
        let expected = format!("sha256:{}", hex(&sha256(&key.subject_public_key_info())));
        assert_eq!(pki.ca_hash(), expected);
    }
}
