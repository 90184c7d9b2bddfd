//! The store's own record types: what is written to disk, versioned apart
//! from the domain types in [`crate::model`] and from the YAML and wire
//! formats, so that either can change without making a store undecodable.
//!
//! Every stored value is a JSON envelope `{"v": N, "data": …}` where `N` is
//! the version of that *record type* (apps, providers, assignments,
//! replicas, controls and events are versioned separately, so a change to
//! one never forces a rewrite of the others). [`Versioned`] ties a domain
//! type to its current record: [`super::encode`] writes the current record
//! at the current version; [`super::decode`] reads the version, decodes the
//! record of that version, upgrades it step by step to the current record
//! and converts that to the domain type. A version this build does not know
//! (written by a newer release) is a [`StoreError::Decode`] naming the record
//! and the version; nothing guesses.
//!
//! Version 1 of every record is the shape the releases before these types
//! wrote by serializing their domain types directly: field names
//! in `snake_case` around the spec, the spec itself in the YAML's
//! `camelCase`, the workload's fields flat in the app's `spec`, the health
//! probe as one of the keys `http`, `tcp` or `exec`, durations as text
//! (`"10s"`, `"500ms"`, see `store::duration`), enums as the spec spells them
//! (`active-passive`, `udp`, `healthy`). Its types mirror that shape as plain
//! data: they never reuse a spec type, never `deny_unknown_fields`, and
//! default every field that the release that wrote them could omit, with the
//! default that release gave it (frozen here, whatever the spec's defaults
//! become). Records written by this build are byte for byte what that
//! release wrote, so it can still read a store this build has used.
//!
//! `daemon/tests/data/golden-store/` holds a store written by that release
//! (commit f32e1b1, made by `daemon/tests/data/make-golden-store.sh`);
//! `daemon/tests/golden_store.rs` and the tests below read every record of
//! it, so a change that breaks an existing store fails the tests.
//!
//! # Migrations
//!
//! The rule: a released record version is frozen. Its types are never
//! edited in a way that changes what they read or write; new shapes are new
//! fields or new versions, and every version a released build may have
//! written stays readable.
//!
//! - **Add a field** (e.g. an optional spec setting): add it to the current
//!   record with `#[serde(default, skip_serializing_if = …)]` so that records
//!   without it still read (the default must mean what the absence meant
//!   before) and records that do not use it are written exactly as before.
//!   No version bump. An older build reading a record that uses the field
//!   ignores it (records never deny unknown fields), and rewrites the record
//!   without it: acceptable for settings, not for anything an older build
//!   must not lose — then bump the version. The provider driver settings
//!   (`spec.docker`, `spec.ec2`, `spec.kubernetes`) are added this way: one
//!   optional field per block in [`ProviderSpecRecordV1`], each with record
//!   types of its own (`DockerSettingsRecordV1`, …) mirroring the domain
//!   settings, absent from every record written before them.
//! - **Rename or remove a field, or change its type or meaning**: add a
//!   version. Copy the record's current types to `…V2` (nested types that do
//!   not change are shared), make the change there, implement
//!   `From<…V1> for …V2` (the upgrade function: it fills what V1 did not
//!   have from what it did), move the domain conversions to V2, set
//!   [`Versioned::VERSION`] to 2 and `Record` to the V2 type, and make
//!   its [`Versioned::read`] upgrade: `1 => data::<AppRecordV1>(what,
//!   bytes).map(AppRecordV2::from)`, `2 => data(what, bytes)`. V1 types
//!   then stay untouched for as long as stores of that version may exist,
//!   which is to say always: they cost nothing. Add a v1 record of the golden
//!   store to the tests of the upgrade. Records are upgraded when read and
//!   written in the new version the next time they change; a store is never
//!   rewritten wholesale for a record version. A build older than the bump
//!   refuses the new records with a clear error instead of misreading them.
//! - **Change the layout** (a tree renamed or split, a key encoded
//!   differently, the envelope itself): bump [`super::SCHEMA_VERSION`] and
//!   give `SledStore::open` a migration from the previous schema that
//!   rewrites the store in one transaction before it records the new
//!   version. Record versions do not change for this.
//! - **Keep a store of each release that bumps a version** beside the golden
//!   store, written by that release, and extend the golden test to it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::{
    AssignedApp, Assignment, Controls, DeclaredApp, DeclaredProvider, Event, EventReason, NewEvent,
    ReplicaState, ReportedReplica,
};
use crate::security::{AgentCertificate, ApiToken, Role};
use crate::spec;

/// A domain type stored as a versioned record.
pub(super) trait Versioned: Sized {
    /// What the record holds, for messages: `app`, `replica`, ...
    const RECORD: &'static str;
    /// The version written today, and the newest one this build reads.
    const VERSION: u32;
    /// The record of version [`Self::VERSION`].
    type Record: Serialize + for<'a> From<&'a Self> + TryInto<Self, Error = StoreError>;

    /// Reads the envelope `bytes`, whose version is `version`, as the current
    /// record, upgrading older versions; `what` names the record in errors.
    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<Self::Record, StoreError>;
}

/// The envelope's data, as the record type `R` of the version it carries.
fn data<R: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<R, StoreError> {
    #[derive(Deserialize)]
    struct Data<R> {
        data: R,
    }
    serde_json::from_slice::<Data<R>>(bytes)
        .map(|d| d.data)
        .map_err(|e| StoreError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

/// The error for a version this build does not read.
fn unknown_version<T: Versioned>(what: &str, version: u32) -> StoreError {
    let why = if version > T::VERSION {
        "it was written by a newer release of skymirror"
    } else {
        "no release of skymirror writes it"
    };
    StoreError::Decode {
        what: what.to_string(),
        reason: format!(
            "record version {version} is not supported: this build reads {} records up to version {}, and {why}",
            T::RECORD,
            T::VERSION
        ),
    }
}

/// A decode error of a record that parsed but does not make a valid object.
fn invalid(what: String, reason: impl Into<String>) -> StoreError {
    StoreError::Decode {
        what,
        reason: reason.into(),
    }
}

impl Versioned for DeclaredApp {
    const RECORD: &'static str = "app";
    const VERSION: u32 = 1;
    type Record = AppRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<AppRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for DeclaredProvider {
    const RECORD: &'static str = "provider";
    const VERSION: u32 = 1;
    type Record = ProviderRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<ProviderRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for Assignment {
    const RECORD: &'static str = "assignment";
    const VERSION: u32 = 1;
    type Record = AssignmentRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<AssignmentRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for ReportedReplica {
    const RECORD: &'static str = "replica";
    const VERSION: u32 = 1;
    type Record = ReplicaRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<ReplicaRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for Controls {
    const RECORD: &'static str = "controls";
    const VERSION: u32 = 1;
    type Record = ControlsRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<ControlsRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for Event {
    const RECORD: &'static str = "event";
    const VERSION: u32 = 1;
    type Record = EventRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<EventRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for ApiToken {
    const RECORD: &'static str = "token";
    const VERSION: u32 = 1;
    type Record = TokenRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<TokenRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

impl Versioned for AgentCertificate {
    const RECORD: &'static str = "certificate";
    const VERSION: u32 = 1;
    type Record = CertificateRecordV1;

    fn read(what: &str, version: u32, bytes: &[u8]) -> Result<CertificateRecordV1, StoreError> {
        match version {
            1 => data(what, bytes),
            _ => Err(unknown_version::<Self>(what, version)),
        }
    }
}

// ---------------------------------------------------------------------------
// Version 1: the shape written by the releases up to commit f32e1b1. Frozen.
// ---------------------------------------------------------------------------

/// Defaults of version 1 records, as the release that wrote them applied
/// them to a field it could omit. Never tied to the spec's defaults.
mod v1_default {
    use std::time::Duration;

    /// `stopGracePeriod`.
    pub(super) fn stop_grace_period() -> Duration {
        Duration::from_secs(10)
    }

    /// A placement target's `weight`.
    pub(super) fn weight() -> u32 {
        1
    }

    /// The health check's `interval`.
    pub(super) fn interval() -> Duration {
        Duration::from_secs(2)
    }

    /// The health check's `timeout`.
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(1)
    }

    /// The health check's `failureThreshold`.
    pub(super) fn failure_threshold() -> u32 {
        3
    }

    /// The health check's `successThreshold`.
    pub(super) fn success_threshold() -> u32 {
        1
    }

    /// The failover policy's `failbackAfter`.
    pub(super) fn failback_after() -> Duration {
        Duration::from_secs(30)
    }

    /// The failover policy's `spill`.
    pub(super) fn spill() -> bool {
        true
    }
}

/// Name and labels of a stored app or provider (the spec's `metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MetaRecordV1 {
    /// The object's name, also its key in the store.
    pub name: String,
    /// Labels, matched by placement selectors; written only when there are some.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl From<&spec::ObjectMeta> for MetaRecordV1 {
    fn from(m: &spec::ObjectMeta) -> Self {
        MetaRecordV1 {
            name: m.name.clone(),
            labels: m.labels.clone(),
        }
    }
}

impl From<MetaRecordV1> for spec::ObjectMeta {
    fn from(r: MetaRecordV1) -> Self {
        spec::ObjectMeta {
            name: r.name,
            labels: r.labels,
        }
    }
}

/// Record version 1 of a declared app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AppRecordV1 {
    /// The app as applied.
    pub app: AppObjectRecordV1,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// Generation at which the workload last changed: replicas of an older
    /// one are replaced.
    pub workload_generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// An app document as stored: its metadata and spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AppObjectRecordV1 {
    /// Name and labels.
    pub metadata: MetaRecordV1,
    /// The desired state.
    pub spec: AppSpecRecordV1,
}

/// An app's spec as stored: the workload's fields flat beside the others, as
/// in the YAML. Fields that may be unset are written only when set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AppSpecRecordV1 {
    /// Container image, for the image-based drivers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Program to run, or the container's entrypoint override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Arguments of `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment of each replica.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of the process driver's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Named ports, in the order declared (the first one is `PORT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRecordV1>,
    /// Resource limits; written only when one is set.
    #[serde(default, skip_serializing_if = "ResourcesRecordV1::is_unset")]
    pub resources: ResourcesRecordV1,
    /// Time between SIGTERM and SIGKILL.
    #[serde(default = "v1_default::stop_grace_period", with = "super::duration")]
    pub stop_grace_period: Duration,
    /// Replicas per provider, or in total for spread placement.
    pub replicas: u32,
    /// Which providers run the app and how replicas are divided.
    #[serde(default)]
    pub placement: PlacementRecordV1,
    /// The health check, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthRecordV1>,
    /// What happens when a provider is lost.
    #[serde(default)]
    pub failover: FailoverRecordV1,
    /// How the front door routes to the app, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingRecordV1>,
}

/// A named port as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PortRecordV1 {
    /// The port's name, unique in the app.
    pub name: String,
    /// Port inside the container, when it differs from the host port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    /// Transport protocol; always written.
    #[serde(default)]
    pub protocol: ProtocolRecordV1,
}

/// A port's transport protocol as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProtocolRecordV1 {
    /// `tcp`, also what an absent protocol meant.
    #[default]
    Tcp,
    /// `udp`.
    Udp,
}

/// Resource limits as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResourcesRecordV1 {
    /// CPU limit in thousandths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Memory limit in MiB.
    #[serde(rename = "memoryMiB", default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
}

impl ResourcesRecordV1 {
    fn is_unset(&self) -> bool {
        self.cpu_millis.is_none() && self.memory_mib.is_none()
    }
}

/// Placement as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct PlacementRecordV1 {
    /// How replicas are divided.
    pub mode: PlacementModeRecordV1,
    /// Providers that may run the app; empty (and not written) means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<PlacementTargetRecordV1>,
    /// Active-passive: warm replicas per standby provider.
    pub standby_replicas: u32,
}

/// A placement mode as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum PlacementModeRecordV1 {
    /// `mirror`, also what an absent mode meant.
    #[default]
    Mirror,
    /// `active-passive`.
    ActivePassive,
    /// `spread`.
    Spread,
}

/// One placement entry as stored: a provider by name or by selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PlacementTargetRecordV1 {
    /// A provider's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels a provider must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Share in spread placement and in routing; always written.
    #[serde(default = "v1_default::weight")]
    pub weight: u32,
    /// The app's own priority for these providers, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// A health check as stored: exactly one of `http`, `tcp` and `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HealthRecordV1 {
    /// An HTTP probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbeRecordV1>,
    /// A TCP probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbeRecordV1>,
    /// A command probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbeRecordV1>,
    /// Time between probes.
    #[serde(default = "v1_default::interval", with = "super::duration")]
    pub interval: Duration,
    /// Time a probe may take.
    #[serde(default = "v1_default::timeout", with = "super::duration")]
    pub timeout: Duration,
    /// Consecutive failures that make a replica unhealthy.
    #[serde(default = "v1_default::failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive successes that make a replica healthy.
    #[serde(default = "v1_default::success_threshold")]
    pub success_threshold: u32,
}

/// An HTTP probe as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HttpProbeRecordV1 {
    /// Request path.
    pub path: String,
    /// Name of the app port probed.
    pub port: String,
}

/// A TCP probe as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TcpProbeRecordV1 {
    /// Name of the app port probed.
    pub port: String,
}

/// A command probe as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ExecProbeRecordV1 {
    /// Program and arguments.
    pub command: Vec<String>,
}

/// A failover policy as stored; every field is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct FailoverRecordV1 {
    /// Whether a lost provider's share is re-placed on the survivors.
    pub spill: bool,
    /// Most extra replicas on survivors; 0: no limit.
    pub max_extra_replicas: u32,
    /// How long a recovered provider stays healthy before it gets its share back.
    #[serde(with = "super::duration")]
    pub failback_after: Duration,
    /// At most one serving copy anywhere.
    pub singleton: bool,
}

impl Default for FailoverRecordV1 {
    fn default() -> Self {
        FailoverRecordV1 {
            spill: v1_default::spill(),
            max_extra_replicas: 0,
            failback_after: v1_default::failback_after(),
            singleton: false,
        }
    }
}

/// Routing as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RoutingRecordV1 {
    /// Address the front door listens on.
    pub listen: String,
    /// Host names routed to the app; empty (and not written): every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Name of the app port traffic goes to.
    pub port: String,
    /// How traffic is forwarded; always written.
    #[serde(default)]
    pub protocol: RoutingProtocolRecordV1,
    /// The front door's response-head timeout, as duration text; written
    /// only when not the default (and absent from records written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<String>,
    /// Hedging; written only when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<bool>,
    /// How the front door talks to replicas; written only when not `http1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<UpstreamProtocolRecordV1>,
}

/// The response-head timeout a routing record without one means: the
/// default when the field was added, frozen whatever the spec's becomes.
const RESPONSE_TIMEOUT_V1: std::time::Duration = std::time::Duration::from_secs(15);

/// An upstream protocol as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum UpstreamProtocolRecordV1 {
    /// `http1`.
    Http1,
    /// `h2c`.
    H2c,
}

/// A routing protocol as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RoutingProtocolRecordV1 {
    /// `http`, also what an absent protocol meant.
    #[default]
    Http,
    /// `tcp`.
    Tcp,
}

impl From<&DeclaredApp> for AppRecordV1 {
    fn from(d: &DeclaredApp) -> Self {
        let s = &d.app.spec;
        let w = &s.workload;
        AppRecordV1 {
            app: AppObjectRecordV1 {
                metadata: MetaRecordV1::from(&d.app.metadata),
                spec: AppSpecRecordV1 {
                    image: w.image.clone(),
                    command: w.command.clone(),
                    args: w.args.clone(),
                    env: w.env.clone(),
                    working_dir: w.working_dir.clone(),
                    ports: w.ports.iter().map(PortRecordV1::from).collect(),
                    resources: ResourcesRecordV1 {
                        cpu_millis: w.resources.cpu_millis,
                        memory_mib: w.resources.memory_mib,
                    },
                    stop_grace_period: w.stop_grace_period,
                    replicas: s.replicas,
                    placement: PlacementRecordV1::from(&s.placement),
                    health: s.health.as_ref().map(HealthRecordV1::from),
                    failover: FailoverRecordV1 {
                        spill: s.failover.spill,
                        max_extra_replicas: s.failover.max_extra_replicas,
                        failback_after: s.failover.failback_after,
                        singleton: s.failover.singleton,
                    },
                    routing: s.routing.as_ref().map(RoutingRecordV1::from),
                },
            },
            generation: d.generation,
            workload_generation: d.workload_generation,
            created_at_ms: d.created_at_ms,
            updated_at_ms: d.updated_at_ms,
        }
    }
}

impl TryFrom<AppRecordV1> for DeclaredApp {
    type Error = StoreError;

    fn try_from(r: AppRecordV1) -> Result<Self, StoreError> {
        let AppObjectRecordV1 { metadata, spec: s } = r.app;
        let what = format!("app {}", metadata.name);
        let routing = match s.routing {
            Some(r) => Some(r.into_spec(&what)?),
            None => None,
        };
        let health = match s.health {
            Some(h) => Some(h.into_domain().map_err(|e| invalid(what, e))?),
            None => None,
        };
        Ok(DeclaredApp {
            app: spec::App {
                metadata: metadata.into(),
                spec: spec::AppSpec {
                    workload: spec::Workload {
                        image: s.image,
                        command: s.command,
                        args: s.args,
                        env: s.env,
                        ports: s.ports.into_iter().map(spec::Port::from).collect(),
                        working_dir: s.working_dir,
                        resources: spec::Resources {
                            cpu_millis: s.resources.cpu_millis,
                            memory_mib: s.resources.memory_mib,
                        },
                        stop_grace_period: s.stop_grace_period,
                    },
                    replicas: s.replicas,
                    placement: s.placement.into(),
                    health,
                    failover: spec::FailoverPolicy {
                        spill: s.failover.spill,
                        max_extra_replicas: s.failover.max_extra_replicas,
                        failback_after: s.failover.failback_after,
                        singleton: s.failover.singleton,
                    },
                    routing,
                },
            },
            generation: r.generation,
            workload_generation: r.workload_generation,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        })
    }
}

impl From<&spec::Port> for PortRecordV1 {
    fn from(p: &spec::Port) -> Self {
        PortRecordV1 {
            name: p.name.clone(),
            container_port: p.container_port,
            protocol: match p.protocol {
                spec::Protocol::Tcp => ProtocolRecordV1::Tcp,
                spec::Protocol::Udp => ProtocolRecordV1::Udp,
            },
        }
    }
}

impl From<PortRecordV1> for spec::Port {
    fn from(r: PortRecordV1) -> Self {
        spec::Port {
            name: r.name,
            container_port: r.container_port,
            protocol: match r.protocol {
                ProtocolRecordV1::Tcp => spec::Protocol::Tcp,
                ProtocolRecordV1::Udp => spec::Protocol::Udp,
            },
        }
    }
}

impl From<&spec::Placement> for PlacementRecordV1 {
    fn from(p: &spec::Placement) -> Self {
        PlacementRecordV1 {
            mode: match p.mode {
                spec::PlacementMode::Mirror => PlacementModeRecordV1::Mirror,
                spec::PlacementMode::ActivePassive => PlacementModeRecordV1::ActivePassive,
                spec::PlacementMode::Spread => PlacementModeRecordV1::Spread,
            },
            providers: p
                .providers
                .iter()
                .map(|t| PlacementTargetRecordV1 {
                    name: t.name.clone(),
                    selector: t.selector.clone(),
                    weight: t.weight,
                    priority: t.priority,
                })
                .collect(),
            standby_replicas: p.standby_replicas,
        }
    }
}

impl From<PlacementRecordV1> for spec::Placement {
    fn from(r: PlacementRecordV1) -> Self {
        spec::Placement {
            mode: match r.mode {
                PlacementModeRecordV1::Mirror => spec::PlacementMode::Mirror,
                PlacementModeRecordV1::ActivePassive => spec::PlacementMode::ActivePassive,
                PlacementModeRecordV1::Spread => spec::PlacementMode::Spread,
            },
            providers: r
                .providers
                .into_iter()
                .map(|t| spec::PlacementTarget {
                    name: t.name,
                    selector: t.selector,
                    weight: t.weight,
                    priority: t.priority,
                })
                .collect(),
            standby_replicas: r.standby_replicas,
        }
    }
}

impl From<&spec::HealthCheck> for HealthRecordV1 {
    fn from(h: &spec::HealthCheck) -> Self {
        let (mut http, mut tcp, mut exec) = (None, None, None);
        match &h.probe {
            spec::Probe::Http { path, port } => {
                http = Some(HttpProbeRecordV1 {
                    path: path.clone(),
                    port: port.clone(),
                });
            }
            spec::Probe::Tcp { port } => tcp = Some(TcpProbeRecordV1 { port: port.clone() }),
            spec::Probe::Exec { command } => {
                exec = Some(ExecProbeRecordV1 {
                    command: command.clone(),
                });
            }
        }
        HealthRecordV1 {
            http,
            tcp,
            exec,
            interval: h.interval,
            timeout: h.timeout,
            failure_threshold: h.failure_threshold,
            success_threshold: h.success_threshold,
        }
    }
}

impl HealthRecordV1 {
    /// The health check, or why the record holds none or several probes.
    fn into_domain(self) -> Result<spec::HealthCheck, String> {
        let probe = match (self.http, self.tcp, self.exec) {
            (Some(http), None, None) => spec::Probe::Http {
                path: http.path,
                port: http.port,
            },
            (None, Some(tcp), None) => spec::Probe::Tcp { port: tcp.port },
            (None, None, Some(exec)) => spec::Probe::Exec {
                command: exec.command,
            },
            (http, tcp, exec) => {
                let set: Vec<&str> = [
                    ("http", http.is_some()),
                    ("tcp", tcp.is_some()),
                    ("exec", exec.is_some()),
                ]
                .into_iter()
                .filter_map(|(key, present)| present.then_some(key))
                .collect();
                return Err(format!(
                    "spec.health: exactly one of `http`, `tcp` and `exec` must be set, found {}",
                    if set.is_empty() {
                        "none".to_string()
                    } else {
                        set.join(" and ")
                    }
                ));
            }
        };
        Ok(spec::HealthCheck {
            probe,
            interval: self.interval,
            timeout: self.timeout,
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
        })
    }
}

impl From<&spec::Routing> for RoutingRecordV1 {
    fn from(r: &spec::Routing) -> Self {
        RoutingRecordV1 {
            listen: r.listen.clone(),
            hosts: r.hosts.clone(),
            port: r.port.clone(),
            protocol: match r.protocol {
                spec::RoutingProtocol::Http => RoutingProtocolRecordV1::Http,
                spec::RoutingProtocol::Tcp => RoutingProtocolRecordV1::Tcp,
            },
            response_timeout: (r.response_timeout != RESPONSE_TIMEOUT_V1)
                .then(|| super::duration::format(r.response_timeout)),
            hedge: (!r.hedge).then_some(false),
            upstream_protocol: match r.upstream_protocol {
                spec::UpstreamProtocol::Http1 => None,
                spec::UpstreamProtocol::H2c => Some(UpstreamProtocolRecordV1::H2c),
            },
        }
    }
}

impl RoutingRecordV1 {
    fn into_spec(self, what: &str) -> Result<spec::Routing, StoreError> {
        let response_timeout = match &self.response_timeout {
            Some(text) => super::duration::parse(text).map_err(|reason| StoreError::Decode {
                what: what.to_string(),
                reason: format!("routing.responseTimeout: {reason}"),
            })?,
            None => RESPONSE_TIMEOUT_V1,
        };
        Ok(spec::Routing {
            listen: self.listen,
            hosts: self.hosts,
            port: self.port,
            protocol: match self.protocol {
                RoutingProtocolRecordV1::Http => spec::RoutingProtocol::Http,
                RoutingProtocolRecordV1::Tcp => spec::RoutingProtocol::Tcp,
            },
            response_timeout,
            hedge: self.hedge.unwrap_or(true),
            upstream_protocol: match self.upstream_protocol {
                None | Some(UpstreamProtocolRecordV1::Http1) => spec::UpstreamProtocol::Http1,
                Some(UpstreamProtocolRecordV1::H2c) => spec::UpstreamProtocol::H2c,
            },
        })
    }
}

/// Record version 1 of a declared provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProviderRecordV1 {
    /// The provider as applied.
    pub provider: ProviderObjectRecordV1,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// A provider document as stored: its metadata and spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProviderObjectRecordV1 {
    /// Name and labels.
    pub metadata: MetaRecordV1,
    /// What the provider is.
    pub spec: ProviderSpecRecordV1,
}

/// A provider's spec as stored.
///
/// The driver settings blocks (`docker`, `ec2`, `kubernetes`) join this
/// record as optional fields, absent from every record written before them
/// (see "Migrations" in the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProviderSpecRecordV1 {
    /// The driver the provider's agent uses.
    pub driver: DriverRecordV1,
    /// Higher serves first in active-passive placement; always written.
    #[serde(default)]
    pub priority: i32,
    /// Most replicas the provider runs; 0: unlimited. Always written.
    #[serde(default)]
    pub capacity: u32,
    /// Free text; written only when not empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Settings of the docker driver; absent when unset (and in every record
    /// written before driver settings existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerSettingsRecordV1>,
    /// Settings of the ec2 driver; absent when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<Ec2SettingsRecordV1>,
    /// Settings of the kubernetes driver; absent when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSettingsRecordV1>,
}

/// The docker driver's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DockerSettingsRecordV1 {
    /// Docker network the containers join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Host address ports are published on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_host: Option<String>,
}

/// The ec2 driver's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Ec2SettingsRecordV1 {
    /// AWS region.
    pub region: String,
    /// AMI the instances boot.
    pub ami: String,
    /// Instance type.
    pub instance_type: String,
    /// Subnet of the instances.
    pub subnet_id: String,
    /// Security groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// EC2 key pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// IAM instance profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// Extra tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// `private` or `public`.
    #[serde(default)]
    pub address: Ec2AddressRecordV1,
    /// Another EC2 endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// User-data template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// Which address replicas on EC2 are reached at, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Ec2AddressRecordV1 {
    /// The instance's private address.
    #[default]
    Private,
    /// Its public address.
    Public,
}

/// The kubernetes driver's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KubernetesSettingsRecordV1 {
    /// Namespace of the replicas' objects.
    pub namespace: String,
    /// kubeconfig context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Extra labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<TolerationRecordV1>,
    /// Image pull secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// `pods`, or `service` with `service_type`.
    #[serde(default)]
    pub expose: String,
    /// `ClusterIP`, `NodePort` or `LoadBalancer` when exposed by a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
}

/// A toleration as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TolerationRecordV1 {
    /// Taint key; empty matches every key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// `Equal` or `Exists`.
    pub operator: String,
    /// Taint value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Taint effect; absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

impl From<&spec::DockerSettings> for DockerSettingsRecordV1 {
    fn from(d: &spec::DockerSettings) -> Self {
        DockerSettingsRecordV1 {
            network: d.network.clone(),
            bind_host: d.bind_host.clone(),
        }
    }
}

impl From<DockerSettingsRecordV1> for spec::DockerSettings {
    fn from(r: DockerSettingsRecordV1) -> Self {
        spec::DockerSettings {
            network: r.network,
            bind_host: r.bind_host,
        }
    }
}

impl From<&spec::Ec2Settings> for Ec2SettingsRecordV1 {
    fn from(e: &spec::Ec2Settings) -> Self {
        Ec2SettingsRecordV1 {
            region: e.region.clone(),
            ami: e.ami.clone(),
            instance_type: e.instance_type.clone(),
            subnet_id: e.subnet_id.clone(),
            security_group_ids: e.security_group_ids.clone(),
            key_name: e.key_name.clone(),
            iam_instance_profile: e.iam_instance_profile.clone(),
            tags: e.tags.clone(),
            address: match e.address {
                spec::Ec2Address::Private => Ec2AddressRecordV1::Private,
                spec::Ec2Address::Public => Ec2AddressRecordV1::Public,
            },
            endpoint_url: e.endpoint_url.clone(),
            user_data: e.user_data.clone(),
        }
    }
}

impl From<Ec2SettingsRecordV1> for spec::Ec2Settings {
    fn from(r: Ec2SettingsRecordV1) -> Self {
        spec::Ec2Settings {
            region: r.region,
            ami: r.ami,
            instance_type: r.instance_type,
            subnet_id: r.subnet_id,
            security_group_ids: r.security_group_ids,
            key_name: r.key_name,
            iam_instance_profile: r.iam_instance_profile,
            tags: r.tags,
            address: match r.address {
                Ec2AddressRecordV1::Private => spec::Ec2Address::Private,
                Ec2AddressRecordV1::Public => spec::Ec2Address::Public,
            },
            endpoint_url: r.endpoint_url,
            user_data: r.user_data,
        }
    }
}

impl From<&spec::KubernetesSettings> for KubernetesSettingsRecordV1 {
    fn from(k: &spec::KubernetesSettings) -> Self {
        let (expose, service_type) = match k.expose {
            spec::Expose::Pods => ("pods", None),
            spec::Expose::Service(t) => ("service", Some(t.as_str().to_string())),
        };
        KubernetesSettingsRecordV1 {
            namespace: k.namespace.clone(),
            context: k.context.clone(),
            labels: k.labels.clone(),
            annotations: k.annotations.clone(),
            node_selector: k.node_selector.clone(),
            tolerations: k
                .tolerations
                .iter()
                .map(|t| TolerationRecordV1 {
                    key: t.key.clone(),
                    operator: t.operator.as_str().to_string(),
                    value: t.value.clone(),
                    effect: t.effect.map(|e| e.as_str().to_string()),
                })
                .collect(),
            image_pull_secrets: k.image_pull_secrets.clone(),
            expose: expose.to_string(),
            service_type,
        }
    }
}

impl KubernetesSettingsRecordV1 {
    fn into_spec(self, what: &str) -> Result<spec::KubernetesSettings, StoreError> {
        let bad = |field: &str, value: &str| StoreError::Decode {
            what: what.to_string(),
            reason: format!("kubernetes.{field}: unknown value {value:?}"),
        };
        let expose = match (self.expose.as_str(), self.service_type.as_deref()) {
            ("pods" | "", _) => spec::Expose::Pods,
            ("service", t) => {
                let t = t.unwrap_or("ClusterIP");
                spec::Expose::Service(
                    spec::ServiceType::ALL
                        .into_iter()
                        .find(|x| x.as_str() == t)
                        .ok_or_else(|| bad("serviceType", t))?,
                )
            }
            (other, _) => return Err(bad("expose", other)),
        };
        let mut tolerations = Vec::with_capacity(self.tolerations.len());
        for t in self.tolerations {
            let operator = spec::TolerationOperator::ALL
                .into_iter()
                .find(|o| o.as_str() == t.operator)
                .ok_or_else(|| bad("tolerations.operator", &t.operator))?;
            let effect = match t.effect {
                Some(e) => Some(
                    spec::TaintEffect::ALL
                        .into_iter()
                        .find(|x| x.as_str() == e)
                        .ok_or_else(|| bad("tolerations.effect", &e))?,
                ),
                None => None,
            };
            tolerations.push(spec::Toleration {
                key: t.key,
                operator,
                value: t.value,
                effect,
            });
        }
        Ok(spec::KubernetesSettings {
            namespace: self.namespace,
            context: self.context,
            labels: self.labels,
            annotations: self.annotations,
            node_selector: self.node_selector,
            tolerations,
            image_pull_secrets: self.image_pull_secrets,
            expose,
        })
    }
}

/// A driver as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum DriverRecordV1 {
    /// `process`.
    Process,
    /// `docker`.
    Docker,
    /// `kubernetes`.
    Kubernetes,
    /// `ec2`.
    Ec2,
}

impl From<&DeclaredProvider> for ProviderRecordV1 {
    fn from(d: &DeclaredProvider) -> Self {
        let s = &d.provider.spec;
        ProviderRecordV1 {
            provider: ProviderObjectRecordV1 {
                metadata: MetaRecordV1::from(&d.provider.metadata),
                spec: ProviderSpecRecordV1 {
                    driver: match s.driver {
                        spec::DriverKind::Process => DriverRecordV1::Process,
                        spec::DriverKind::Docker => DriverRecordV1::Docker,
                        spec::DriverKind::Kubernetes => DriverRecordV1::Kubernetes,
                        spec::DriverKind::Ec2 => DriverRecordV1::Ec2,
                    },
                    priority: s.priority,
                    capacity: s.capacity,
                    description: s.description.clone(),
                    docker: s.docker.as_ref().map(DockerSettingsRecordV1::from),
                    ec2: s.ec2.as_ref().map(Ec2SettingsRecordV1::from),
                    kubernetes: s.kubernetes.as_ref().map(KubernetesSettingsRecordV1::from),
                },
            },
            generation: d.generation,
            created_at_ms: d.created_at_ms,
            updated_at_ms: d.updated_at_ms,
        }
    }
}

impl TryFrom<ProviderRecordV1> for DeclaredProvider {
    type Error = StoreError;

    fn try_from(r: ProviderRecordV1) -> Result<Self, StoreError> {
        let ProviderObjectRecordV1 { metadata, spec: s } = r.provider;
        let kubernetes = match s.kubernetes {
            Some(k) => Some(k.into_spec(&format!("provider {}", metadata.name))?),
            None => None,
        };
        Ok(DeclaredProvider {
            provider: spec::Provider {
                metadata: metadata.into(),
                spec: spec::ProviderSpec {
                    driver: match s.driver {
                        DriverRecordV1::Process => spec::DriverKind::Process,
                        DriverRecordV1::Docker => spec::DriverKind::Docker,
                        DriverRecordV1::Kubernetes => spec::DriverKind::Kubernetes,
                        DriverRecordV1::Ec2 => spec::DriverKind::Ec2,
                    },
                    priority: s.priority,
                    capacity: s.capacity,
                    description: s.description,
                    docker: s.docker.map(Into::into),
                    ec2: s.ec2.map(Into::into),
                    kubernetes,
                },
            },
            generation: r.generation,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        })
    }
}

/// Record version 1 of a provider's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AssignmentRecordV1 {
    /// Provider name, also the record's key.
    pub provider: String,
    /// Increases with every change of `apps`, so agents ignore older ones.
    pub revision: u64,
    /// The provider's share of each app, sorted by app.
    pub apps: Vec<AssignedAppRecordV1>,
}

/// One app's share in an assignment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AssignedAppRecordV1 {
    /// App name.
    pub app: String,
    /// App generation decided for.
    pub generation: u64,
    /// Workload generation the replicas run.
    pub workload_generation: u64,
    /// Replicas the provider runs.
    pub replicas: u32,
    /// Of those, replicas re-placed from lost providers; absent in records
    /// written before failover extras were counted.
    #[serde(default)]
    pub extra: u32,
}

impl From<&Assignment> for AssignmentRecordV1 {
    fn from(a: &Assignment) -> Self {
        AssignmentRecordV1 {
            provider: a.provider.clone(),
            revision: a.revision,
            apps: a
                .apps
                .iter()
                .map(|s| AssignedAppRecordV1 {
                    app: s.app.clone(),
                    generation: s.generation,
                    workload_generation: s.workload_generation,
                    replicas: s.replicas,
                    extra: s.extra,
                })
                .collect(),
        }
    }
}

impl TryFrom<AssignmentRecordV1> for Assignment {
    type Error = StoreError;

    fn try_from(r: AssignmentRecordV1) -> Result<Self, StoreError> {
        Ok(Assignment {
            provider: r.provider,
            revision: r.revision,
            apps: r
                .apps
                .into_iter()
                .map(|s| AssignedApp {
                    app: s.app,
                    generation: s.generation,
                    workload_generation: s.workload_generation,
                    replicas: s.replicas,
                    extra: s.extra,
                })
                .collect(),
        })
    }
}

/// Record version 1 of a replica as its agent last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ReplicaRecordV1 {
    /// Provider the replica runs on.
    pub provider: String,
    /// App name.
    pub app: String,
    /// Index within the app on the provider.
    pub index: u32,
    /// App generation the replica reflects.
    pub generation: u64,
    /// Workload generation the replica runs.
    pub workload_generation: u64,
    /// Reported state.
    pub state: ReplicaStateRecordV1,
    /// Whether it may serve traffic.
    pub ready: bool,
    /// `host:port` of the first port.
    pub address: String,
    /// Host port per named port.
    pub ports: BTreeMap<String, u32>,
    /// The driver's id of the instance.
    pub instance_id: String,
    /// Unplanned restarts.
    pub restarts: u32,
    /// Keeps exiting shortly after starting.
    pub crash_looping: bool,
    /// Detail of the state.
    pub message: String,
    /// Instance start, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Last state change, ms since the Unix epoch.
    pub state_since_ms: i64,
}

/// A replica state as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum ReplicaStateRecordV1 {
    /// `pending`.
    Pending,
    /// `starting`.
    Starting,
    /// `running`.
    Running,
    /// `healthy`.
    Healthy,
    /// `unhealthy`.
    Unhealthy,
    /// `backoff`.
    Backoff,
    /// `stopping`.
    Stopping,
    /// `stopped`.
    Stopped,
    /// `failed`.
    Failed,
}

impl From<ReplicaState> for ReplicaStateRecordV1 {
    fn from(s: ReplicaState) -> Self {
        match s {
            ReplicaState::Pending => Self::Pending,
            ReplicaState::Starting => Self::Starting,
            ReplicaState::Running => Self::Running,
            ReplicaState::Healthy => Self::Healthy,
            ReplicaState::Unhealthy => Self::Unhealthy,
            ReplicaState::Backoff => Self::Backoff,
            ReplicaState::Stopping => Self::Stopping,
            ReplicaState::Stopped => Self::Stopped,
            ReplicaState::Failed => Self::Failed,
        }
    }
}

impl From<ReplicaStateRecordV1> for ReplicaState {
    fn from(s: ReplicaStateRecordV1) -> Self {
        match s {
            ReplicaStateRecordV1::Pending => Self::Pending,
            ReplicaStateRecordV1::Starting => Self::Starting,
            ReplicaStateRecordV1::Running => Self::Running,
            ReplicaStateRecordV1::Healthy => Self::Healthy,
            ReplicaStateRecordV1::Unhealthy => Self::Unhealthy,
            ReplicaStateRecordV1::Backoff => Self::Backoff,
            ReplicaStateRecordV1::Stopping => Self::Stopping,
            ReplicaStateRecordV1::Stopped => Self::Stopped,
            ReplicaStateRecordV1::Failed => Self::Failed,
        }
    }
}

impl From<&ReportedReplica> for ReplicaRecordV1 {
    fn from(r: &ReportedReplica) -> Self {
        ReplicaRecordV1 {
            provider: r.provider.clone(),
            app: r.app.clone(),
            index: r.index,
            generation: r.generation,
            workload_generation: r.workload_generation,
            state: r.state.into(),
            ready: r.ready,
            address: r.address.clone(),
            ports: r.ports.clone(),
            instance_id: r.instance_id.clone(),
            restarts: r.restarts,
            crash_looping: r.crash_looping,
            message: r.message.clone(),
            started_at_ms: r.started_at_ms,
            state_since_ms: r.state_since_ms,
        }
    }
}

impl TryFrom<ReplicaRecordV1> for ReportedReplica {
    type Error = StoreError;

    fn try_from(r: ReplicaRecordV1) -> Result<Self, StoreError> {
        Ok(ReportedReplica {
            provider: r.provider,
            app: r.app,
            index: r.index,
            generation: r.generation,
            workload_generation: r.workload_generation,
            state: r.state.into(),
            ready: r.ready,
            address: r.address,
            ports: r.ports,
            instance_id: r.instance_id,
            restarts: r.restarts,
            crash_looping: r.crash_looping,
            message: r.message,
            started_at_ms: r.started_at_ms,
            state_since_ms: r.state_since_ms,
        })
    }
}

/// Record version 1 of the operator controls (one record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ControlsRecordV1 {
    /// Cordoned providers: no new replicas.
    #[serde(default)]
    pub cordoned: BTreeSet<String>,
    /// Draining providers: replicas move away.
    #[serde(default)]
    pub draining: BTreeSet<String>,
    /// Manual failovers: app → the provider that serves it.
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
}

impl From<&Controls> for ControlsRecordV1 {
    fn from(c: &Controls) -> Self {
        ControlsRecordV1 {
            cordoned: c.cordoned.clone(),
            draining: c.draining.clone(),
            pins: c.pins.clone(),
        }
    }
}

impl TryFrom<ControlsRecordV1> for Controls {
    type Error = StoreError;

    fn try_from(r: ControlsRecordV1) -> Result<Self, StoreError> {
        Ok(Controls {
            cordoned: r.cordoned,
            draining: r.draining,
            pins: r.pins,
        })
    }
}

/// Record version 1 of an event of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EventRecordV1 {
    /// Position in the log.
    pub seq: u64,
    /// ms since the Unix epoch.
    pub time_ms: i64,
    /// The reason's name, e.g. `AppCreated`.
    pub reason: String,
    /// `App`, `Provider`, `Replica` or `Daemon`; derived from the reason, kept
    /// so the record reads on its own.
    pub kind: String,
    /// Object name.
    pub object: String,
    /// Human-readable description.
    pub message: String,
    /// App concerned, or empty.
    #[serde(default)]
    pub app: String,
    /// Provider concerned, or empty.
    #[serde(default)]
    pub provider: String,
    /// Whether it is a warning; derived from the reason, kept like `kind`.
    #[serde(default)]
    pub warning: bool,
}

impl From<&Event> for EventRecordV1 {
    fn from(e: &Event) -> Self {
        EventRecordV1 {
            seq: e.seq,
            time_ms: e.time_ms,
            reason: e.event.reason.as_str().to_string(),
            kind: e.event.kind().as_str().to_string(),
            object: e.event.object.clone(),
            message: e.event.message.clone(),
            app: e.event.app.clone(),
            provider: e.event.provider.clone(),
            warning: e.event.warning(),
        }
    }
}

impl TryFrom<EventRecordV1> for Event {
    type Error = StoreError;

    fn try_from(r: EventRecordV1) -> Result<Self, StoreError> {
        let reason: EventReason = r
            .reason
            .parse()
            .map_err(|e| invalid(format!("event {}", r.seq), format!("{e}")))?;
        Ok(Event {
            seq: r.seq,
            time_ms: r.time_ms,
            event: NewEvent {
                reason,
                object: r.object,
                message: r.message,
                app: r.app,
                provider: r.provider,
            },
        })
    }
}

// ---------------------------------------------------------------------------
// Version 1 of the records that came with authentication (tokens and agent
// certificates). A store of an earlier release has none: its trees are
// created empty.
// ---------------------------------------------------------------------------

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Record version 1 of a bearer or join token: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TokenRecordV1 {
    /// Public part of the token; also its key in the store.
    pub id: String,
    /// SHA-256 of the secret part, lowercase hex.
    pub secret_sha256: String,
    /// `admin`, `viewer`, `edge` or `join`.
    pub role: String,
    /// Join tokens: the one provider it joins; written only when set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// Free text; written only when set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Creation, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since the Unix epoch; absent for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires_at_ms: i64,
    /// Revocation, ms since the Unix epoch; absent while not revoked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoked_at_ms: i64,
}

impl From<&ApiToken> for TokenRecordV1 {
    fn from(t: &ApiToken) -> Self {
        TokenRecordV1 {
            id: t.id.clone(),
            secret_sha256: crate::security::tokens::hex(&t.secret_sha256),
            role: t.role.as_str().to_string(),
            provider: t.provider.clone(),
            description: t.description.clone(),
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            revoked_at_ms: t.revoked_at_ms,
        }
    }
}

impl TryFrom<TokenRecordV1> for ApiToken {
    type Error = StoreError;

    fn try_from(r: TokenRecordV1) -> Result<Self, StoreError> {
        let what = || format!("token {}", r.id);
        let role = Role::parse(&r.role)
            .ok_or_else(|| invalid(what(), format!("unknown role {:?}", r.role)))?;
        let digest = (0..r.secret_sha256.len())
            .step_by(2)
            .map(|i| {
                r.secret_sha256
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| invalid(what(), "secret_sha256 is not 64 hex digits"))?;
        Ok(ApiToken {
            id: r.id,
            secret_sha256: digest,
            role,
            provider: r.provider,
            description: r.description,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
            revoked_at_ms: r.revoked_at_ms,
        })
    }
}

/// Record version 1 of an agent's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CertificateRecordV1 {
    /// Serial number, lowercase hex; also its key in the store.
    pub serial: String,
    /// The provider it names.
    pub provider: String,
    /// The agent it was issued to; written only when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    /// Valid from, ms since the Unix epoch.
    pub not_before_ms: i64,
    /// Valid until, ms since the Unix epoch.
    pub not_after_ms: i64,
    /// Revocation, ms since the Unix epoch; absent while not revoked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoked_at_ms: i64,
    /// How it was obtained, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issued_by: String,
}

impl From<&AgentCertificate> for CertificateRecordV1 {
    fn from(c: &AgentCertificate) -> Self {
        CertificateRecordV1 {
            serial: c.serial.clone(),
            provider: c.provider.clone(),
            agent_id: c.agent_id.clone(),
            not_before_ms: c.not_before_ms,
            not_after_ms: c.not_after_ms,
            revoked_at_ms: c.revoked_at_ms,
            issued_by: c.issued_by.clone(),
        }
    }
}

impl TryFrom<CertificateRecordV1> for AgentCertificate {
    type Error = StoreError;

    fn try_from(r: CertificateRecordV1) -> Result<Self, StoreError> {
        Ok(AgentCertificate {
            serial: r.serial,
            provider: r.provider,
            agent_id: r.agent_id,
            not_before_ms: r.not_before_ms,
            not_after_ms: r.not_after_ms,
            revoked_at_ms: r.revoked_at_ms,
            issued_by: r.issued_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{decode, encode};
    use super::*;
    use crate::model::ReplicaState;

    /// The spec the golden store was made from: every feature of the spec.
    const GOLDEN_SPEC: &str = include_str!("../../tests/data/golden-store/spec.yaml");

    // Records copied from the golden store (tests/data/golden-store), as the
    // release at commit f32e1b1 wrote them.
    const WEB_V1: &str = r#"{"v":1,"data":{"app":{"metadata":{"name":"web","labels":{"team":"web","tier":"frontend"}},"spec":{"command":"skymirror-example","args":["--host","127.0.0.1"],"env":{"GREETING":"web v2","LOG_LEVEL":"info"},"workingDir":"/tmp","ports":[{"name":"http","protocol":"tcp"},{"name":"admin","containerPort":9090,"protocol":"tcp"},{"name":"stats","protocol":"udp"}],"resources":{"cpuMillis":250,"memoryMiB":128},"stopGracePeriod":"5s","replicas":2,"placement":{"mode":"mirror","providers":[{"name":"aws-east","weight":2,"priority":50},{"selector":{"cloud":"gcp"},"weight":1}],"standbyReplicas":0},"health":{"http":{"path":"/healthz","port":"http"},"interval":"1s","timeout":"500ms","failureThreshold":2,"successThreshold":1},"failover":{"spill":true,"maxExtraReplicas":4,"failbackAfter":"10s","singleton":false},"routing":{"listen":"127.0.0.1:18080","hosts":["web.example.com","www.example.com"],"port":"http","protocol":"http"}}},"generation":2,"workload_generation":2,"created_at_ms":1796034400408,"updated_at_ms":1796034404745}}"#;
    const API_V1: &str = r#"{"v":1,"data":{"app":{"metadata":{"name":"api"},"spec":{"command":"skymirror-example","env":{"GREETING":"api"},"ports":[{"name":"api","protocol":"tcp"}],"stopGracePeriod":"20s","replicas":2,"placement":{"mode":"active-passive","providers":[{"name":"aws-east","weight":1,"priority":100},{"name":"gcp-west","weight":1,"priority":50},{"name":"hetzner","weight":1}],"standbyReplicas":1},"health":{"tcp":{"port":"api"},"interval":"2s","timeout":"1s","failureThreshold":3,"successThreshold":2},"failover":{"spill":false,"maxExtraReplicas":0,"failbackAfter":"90s","singleton":false},"routing":{"listen":"127.0.0.1:18081","port":"api","protocol":"tcp"}}},"generation":2,"workload_generation":1,"created_at_ms":1796034400408,"updated_at_ms":1796034404745}}"#;
    const K8S_PROD_V1: &str = r#"{"v":1,"data":{"provider":{"metadata":{"name":"k8s-prod","labels":{"cluster":"prod","runtime":"container"}},"spec":{"driver":"kubernetes","priority":-5,"capacity":100,"description":"production cluster"}},"generation":1,"created_at_ms":1796034400408,"updated_at_ms":1796034400408}}"#;
    const DOCKER_LAB_ASSIGNMENT_V1: &str = r#"{"v":1,"data":{"provider":"docker-lab","revision":2,"apps":[{"app":"batch","generation":1,"workload_generation":1,"replicas":2,"extra":1},{"app":"worker","generation":1,"workload_generation":1,"replicas":2,"extra":0}]}}"#;
    const REPLICA_V1: &str = r#"{"v":1,"data":{"provider":"aws-east","app":"web","index":0,"generation":2,"workload_generation":2,"state":"healthy","ready":true,"address":"127.0.0.1:43413","ports":{"admin":38277,"http":43413,"stats":35283},"instance_id":"16020","restarts":1,"crash_looping":false,"message":"","started_at_ms":1796034404817,"state_since_ms":1796034404830}}"#;
    const CONTROLS_V1: &str = r#"{"v":1,"data":{"cordoned":["hetzner"],"draining":["ec2-spot"],"pins":{"api":"gcp-west"}}}"#;
    const EVENT_V1: &str = r#"{"v":1,"data":{"seq":52,"time_ms":1796034404104,"reason":"ReplicaExited","kind":"Replica","object":"web/aws-east/0","message":"replica web/aws-east/0 is backoff: killed by signal 9 after 3.5s; restarting in 500ms","app":"web","provider":"aws-east","warning":true}}"#;

    /// Encodes, checks the envelope carries the current version, decodes.
    fn round_trip<T: Versioned + std::fmt::Debug>(value: &T) -> T {
        let bytes = encode(value).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(json["v"], T::VERSION, "{json}");
        decode(T::RECORD, &bytes).expect("decodes")
    }

    /// Decodes `json` and checks it encodes back to the same bytes: what
    /// this build writes is what the release that wrote `json` reads.
    fn read_v1<T: Versioned>(json: &str) -> T {
        let value: T = decode(T::RECORD, json.as_bytes()).expect("a v1 record decodes");
        let again = encode(&value).expect("encodes");
        assert_eq!(
            String::from_utf8_lossy(&again),
            json,
            "re-encoded differently"
        );
        value
    }

    fn golden_objects() -> (Vec<DeclaredApp>, Vec<DeclaredProvider>) {
        let docs = spec::parse_documents("spec.yaml", GOLDEN_SPEC).expect("the golden spec parses");
        let (mut apps, mut providers) = (Vec::new(), Vec::new());
        for (i, doc) in docs.into_iter().enumerate() {
            let n = i64::try_from(i).expect("few documents");
            match doc.document {
                spec::Document::App(app) => apps.push(DeclaredApp {
                    app,
                    generation: 3,
                    workload_generation: 2,
                    created_at_ms: 1_000 + n,
                    updated_at_ms: 2_000 + n,
                }),
                spec::Document::Provider(provider) => providers.push(DeclaredProvider {
                    provider,
                    generation: 4,
                    created_at_ms: -n,
                    updated_at_ms: n,
                }),
            }
        }
        (apps, providers)
    }

    fn replica(state: ReplicaState) -> ReportedReplica {
        ReportedReplica {
            provider: "aws".into(),
            app: "web".into(),
            index: 7,
            generation: 5,
            workload_generation: 4,
            state,
            ready: state == ReplicaState::Healthy,
            address: "127.0.0.1:8080".into(),
            ports: BTreeMap::from([("http".into(), 8080), ("admin".into(), 9090)]),
            instance_id: "4242".into(),
            restarts: 3,
            crash_looping: true,
            message: "exited with status 1".into(),
            started_at_ms: 1_700_000_000_000,
            state_since_ms: 1_700_000_000_500,
        }
    }

    #[test]
    fn apps_and_providers_round_trip() {
        let (apps, providers) = golden_objects();
        assert_eq!(apps.len(), 5);
        assert_eq!(providers.len(), 6);
        for app in &apps {
            assert_eq!(&round_trip(app), app);
        }
        for provider in &providers {
            assert_eq!(&round_trip(provider), provider);
        }
        // Every unset optional part, too.
        let mut bare = apps[0].clone();
        bare.app.metadata.labels.clear();
        bare.app.spec = spec::AppSpec::default();
        assert_eq!(round_trip(&bare), bare);
    }

    #[test]
    fn routing_settings_round_trip_and_defaults_keep_version_1_bytes() {
        let (apps, _) = crate::model::testing::declared(
            "
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: grpc}
spec:
  command: server
  ports: [{name: api}]
  replicas: 1
  routing: {listen: '127.0.0.1:9000', port: api, responseTimeout: 2500ms, hedge: false, upstreamProtocol: h2c}
",
        );
        let app = &apps[0];
        assert_eq!(&round_trip(app), app);
        // Defaults are not written: a version-1 record reads and writes as before.
        let _: DeclaredApp = read_v1(WEB_V1);
    }

    #[test]
    fn providers_with_driver_settings_round_trip() {
        let text = include_str!("../../../deploy/examples/cloud-providers.yaml");
        let docs = spec::parse_documents("cloud-providers.yaml", text).expect("the example parses");
        let mut with_settings = 0;
        for doc in docs {
            let spec::Document::Provider(provider) = doc.document else {
                continue;
            };
            let s = &provider.spec;
            with_settings +=
                usize::from(s.docker.is_some() || s.ec2.is_some() || s.kubernetes.is_some());
            let declared = DeclaredProvider {
                provider,
                generation: 1,
                created_at_ms: 1,
                updated_at_ms: 2,
            };
            assert_eq!(round_trip(&declared), declared);
        }
        assert_eq!(with_settings, 3, "the example shows every driver's block");
        // A version-1 provider from before driver settings reads without them.
        let old: DeclaredProvider = read_v1(K8S_PROD_V1);
        let s = &old.provider.spec;
        assert!(s.docker.is_none() && s.ec2.is_none() && s.kubernetes.is_none());
    }

    #[test]
    fn assignments_replicas_controls_and_events_round_trip() {
        let assignment = Assignment {
            provider: "aws".into(),
            revision: 9,
            apps: vec![
                AssignedApp {
                    app: "api".into(),
                    generation: 2,
                    workload_generation: 1,
                    replicas: 3,
                    extra: 1,
                },
                AssignedApp {
                    app: "web".into(),
                    generation: 5,
                    workload_generation: 5,
                    replicas: 2,
                    extra: 0,
                },
            ],
        };
        assert_eq!(round_trip(&assignment), assignment);
        for state in [
            ReplicaState::Pending,
            ReplicaState::Starting,
            ReplicaState::Running,
            ReplicaState::Healthy,
            ReplicaState::Unhealthy,
            ReplicaState::Backoff,
            ReplicaState::Stopping,
            ReplicaState::Stopped,
            ReplicaState::Failed,
        ] {
            let r = replica(state);
            assert_eq!(round_trip(&r), r);
        }
        let controls = Controls {
            cordoned: BTreeSet::from(["a".into(), "b".into()]),
            draining: BTreeSet::from(["b".into()]),
            pins: BTreeMap::from([("web".into(), "a".into())]),
        };
        assert_eq!(round_trip(&controls), controls);
        assert_eq!(round_trip(&Controls::default()), Controls::default());
        for (i, reason) in EventReason::ALL.iter().enumerate() {
            let event = Event {
                seq: i as u64 + 1,
                time_ms: 1_700_000_000_000,
                event: NewEvent {
                    reason: *reason,
                    object: "web/aws/0".into(),
                    message: format!("{reason} happened"),
                    app: "web".into(),
                    provider: "aws".into(),
                },
            };
            assert_eq!(round_trip(&event), event);
        }
    }

    #[test]
    fn version_1_records_decode_and_encode_to_the_same_bytes() {
        let web: DeclaredApp = read_v1(WEB_V1);
        let s = &web.app.spec;
        assert_eq!((web.generation, web.workload_generation), (2, 2));
        assert_eq!(s.workload.env["GREETING"], "web v2");
        assert_eq!(s.workload.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(s.workload.ports[1].container_port, Some(9090));
        assert_eq!(s.workload.ports[2].protocol, spec::Protocol::Udp);
        assert_eq!(s.workload.resources.memory_mib, Some(128));
        assert_eq!(s.workload.stop_grace_period, Duration::from_secs(5));
        assert_eq!(s.placement.providers[0].priority, Some(50));
        let health = s.health.as_ref().expect("web has a health check");
        assert_eq!(
            health.probe,
            spec::Probe::Http {
                path: "/healthz".into(),
                port: "http".into()
            }
        );
        assert_eq!(health.timeout, Duration::from_millis(500));
        let routing = s.routing.as_ref().expect("web is routed");
        assert_eq!(routing.hosts, ["web.example.com", "www.example.com"]);

        let api: DeclaredApp = read_v1(API_V1);
        let s = &api.app.spec;
        assert_eq!(s.placement.mode, spec::PlacementMode::ActivePassive);
        assert_eq!(s.placement.standby_replicas, 1);
        assert_eq!(s.failover.failback_after, Duration::from_secs(90));
        assert!(!s.failover.spill);
        assert_eq!(
            s.health.as_ref().map(|h| &h.probe),
            Some(&spec::Probe::Tcp { port: "api".into() })
        );
        assert_eq!(
            s.routing.as_ref().map(|r| r.protocol),
            Some(spec::RoutingProtocol::Tcp)
        );

        let k8s: DeclaredProvider = read_v1(K8S_PROD_V1);
        assert_eq!(k8s.provider.spec.driver, spec::DriverKind::Kubernetes);
        assert_eq!(k8s.provider.spec.priority, -5);
        assert_eq!(k8s.provider.spec.description, "production cluster");

        let assignment: Assignment = read_v1(DOCKER_LAB_ASSIGNMENT_V1);
        assert_eq!(assignment.revision, 2);
        assert_eq!(assignment.apps[0].extra, 1);

        let replica: ReportedReplica = read_v1(REPLICA_V1);
        assert_eq!(replica.id(), "web/aws-east/0");
        assert_eq!(replica.state, ReplicaState::Healthy);
        assert_eq!(replica.restarts, 1);
        assert_eq!(replica.ports["stats"], 35283);

        let controls: Controls = read_v1(CONTROLS_V1);
        assert!(controls.cordoned.contains("hetzner"));
        assert_eq!(controls.pins["api"], "gcp-west");

        let event: Event = read_v1(EVENT_V1);
        assert_eq!(event.seq, 52);
        assert_eq!(event.event.reason, EventReason::ReplicaExited);
        assert!(event.event.warning());
    }

    #[test]
    fn version_1_fields_an_older_release_omitted_take_its_defaults() {
        let app: DeclaredApp = decode(
            "app min",
            br#"{"v":1,"data":{"app":{"metadata":{"name":"min"},"spec":{"command":"run","replicas":1,"health":{"exec":{"command":["true"]}}}},"generation":1,"workload_generation":1,"created_at_ms":0,"updated_at_ms":0}}"#,
        )
        .expect("decodes");
        let s = &app.app.spec;
        assert_eq!(s.workload.stop_grace_period, Duration::from_secs(10));
        assert_eq!(s.placement, spec::Placement::default());
        assert_eq!(
            s.health,
            Some(spec::HealthCheck::new(spec::Probe::Exec {
                command: vec!["true".into()]
            }))
        );
        assert_eq!(s.failover, spec::FailoverPolicy::default());
        let assignment: Assignment = decode(
            "assignment a",
            br#"{"v":1,"data":{"provider":"a","revision":1,"apps":[{"app":"web","generation":1,"workload_generation":1,"replicas":2}]}}"#,
        )
        .expect("decodes");
        assert_eq!(assignment.apps[0].extra, 0);
    }

    #[test]
    fn unknown_versions_are_refused_by_name_and_version() {
        let newer = WEB_V1.replacen(r#"{"v":1,"#, r#"{"v":2,"#, 1);
        let err = decode::<DeclaredApp>("app web", newer.as_bytes())
            .expect_err("a newer record is refused")
            .to_string();
        assert_eq!(
            err,
            "store: cannot decode app web: record version 2 is not supported: this build reads \
             app records up to version 1, and it was written by a newer release of skymirror"
        );
        let zero = CONTROLS_V1.replacen(r#"{"v":1,"#, r#"{"v":0,"#, 1);
        let err = decode::<Controls>("controls", zero.as_bytes())
            .expect_err("version 0 is refused")
            .to_string();
        assert!(err.contains("record version 0 is not supported"), "{err}");
        let err = decode::<Event>("event 52", br#"{"data":{}}"#)
            .expect_err("no version is refused")
            .to_string();
        assert!(
            err.starts_with("store: cannot decode event 52: not a versioned record"),
            "{err}"
        );
    }

    #[test]
    fn records_that_parse_but_make_no_object_are_refused_by_name() {
        let two_probes = API_V1.replace(
            r#""tcp":{"port":"api"}"#,
            r#""tcp":{"port":"api"},"exec":{"command":["true"]}"#,
        );
        let err = decode::<DeclaredApp>("app api", two_probes.as_bytes())
            .expect_err("two probes are refused")
            .to_string();
        assert_eq!(
            err,
            "store: cannot decode app api: spec.health: exactly one of `http`, `tcp` and `exec` \
             must be set, found tcp and exec"
        );
        let unknown = EVENT_V1.replace("ReplicaExited", "ReplicaTeleported");
        let err = decode::<Event>("event 52", unknown.as_bytes())
            .expect_err("an unknown reason is refused")
            .to_string();
        assert!(err.contains("event 52"), "{err}");
        assert!(err.contains("ReplicaTeleported"), "{err}");
        let bad_state = REPLICA_V1.replace("healthy", "levitating");
        let err = decode::<ReportedReplica>("replica web/aws-east/0", bad_state.as_bytes())
            .expect_err("an unknown state is refused")
            .to_string();
        assert!(
            err.starts_with(
                "store: cannot decode replica web/aws-east/0: unknown variant `levitating`"
            ),
            "{err}"
        );
    }

    /// The golden store's files, copied so that opening them changes nothing.
    fn golden_store_copy() -> tempfile::TempDir {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-store/store");
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["conf", "db"] {
            std::fs::copy(from.join(name), dir.path().join(name)).expect("golden store file");
        }
        dir
    }

    /// Every record of `tree` decoded as `T`, each re-encoded to its bytes.
    fn check_tree<T: Versioned>(db: &sled::Db, tree: &str) -> usize {
        let tree = db.open_tree(tree).expect("tree");
        let mut count = 0;
        for entry in tree.iter() {
            let (key, bytes) = entry.expect("entry");
            let what = format!("{} {:?}", T::RECORD, String::from_utf8_lossy(&key));
            let value: T = decode(&what, &bytes).unwrap_or_else(|e| panic!("{e}"));
            let again = encode(&value).expect("encodes");
            assert_eq!(
                String::from_utf8_lossy(&again),
                String::from_utf8_lossy(&bytes),
                "{what} re-encoded differently"
            );
            count += 1;
        }
        count
    }

    #[test]
    fn every_golden_record_reads_and_is_written_back_unchanged() {
        let dir = golden_store_copy();
        let db = sled::open(dir.path()).expect("the golden store opens");
        assert_eq!(check_tree::<DeclaredApp>(&db, "apps"), 5);
        assert_eq!(check_tree::<DeclaredProvider>(&db, "providers"), 6);
        assert_eq!(check_tree::<Assignment>(&db, "assignments"), 7);
        assert_eq!(check_tree::<ReportedReplica>(&db, "replicas"), 12);
        assert_eq!(check_tree::<Controls>(&db, "controls"), 1);
        assert!(check_tree::<Event>(&db, "events") > 80);
    }

    #[test]
    fn tokens_and_certificates_round_trip_and_refuse_damage() {
        let token = ApiToken {
            id: "0123456789abcdef".into(),
            secret_sha256: crate::security::tokens::sha256(b"secret"),
            role: Role::Join,
            provider: "aws".into(),
            description: "for the aws agent".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            revoked_at_ms: 0,
        };
        assert_eq!(round_trip(&token), token);
        let json = String::from_utf8(encode(&token).expect("encodes")).expect("utf-8");
        assert!(
            !json.contains("revoked_at_ms"),
            "unset fields are not written: {json}"
        );
        let cert = AgentCertificate {
            serial: "7f00".into(),
            provider: "aws".into(),
            agent_id: "agent-1".into(),
            not_before_ms: 1,
            not_after_ms: 2,
            revoked_at_ms: 3,
            issued_by: "join token 0123456789abcdef".into(),
        };
        assert_eq!(round_trip(&cert), cert);

        let bad_role =
            r#"{"v":1,"data":{"id":"x","secret_sha256":"00","role":"root","created_at_ms":1}}"#;
        let err = decode::<ApiToken>("token x", bad_role.as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("unknown role \"root\""), "{err}");
        let bad_hash =
            r#"{"v":1,"data":{"id":"x","secret_sha256":"zz","role":"admin","created_at_ms":1}}"#;
        let err = decode::<ApiToken>("token x", bad_hash.as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}
