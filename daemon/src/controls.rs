//! Operator controls: manual failover and failback of an app, cordon,
//! uncordon and drain of a provider. Each is planned purely (the new
//! [`Controls`] and the event that explains them) and then committed; the
//! next reconcile pass acts on them.

use crate::daemon::Daemon;
use crate::error::DaemonError;
use crate::model::{
    Controls, DeclaredApp, DeclaredProvider, EventReason, NewEvent, ProviderControl,
};
use crate::scheduler::{self, Context};

/// A planned change of the controls: the new controls, the event that
/// explains them, and the message for the operator. `None` controls: nothing
/// to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlan {
    /// The controls to store, if they change.
    pub controls: Option<(Controls, NewEvent)>,
    /// What the operator is told.
    pub message: String,
}

/// Plans a manual failover of `app` to `provider` (`Some`) or its end (`None`).
pub fn plan_pin(
    app: &str,
    provider: Option<&str>,
    apps: &[DeclaredApp],
    providers: &[DeclaredProvider],
    mut controls: Controls,
) -> Result<ControlPlan, DaemonError> {
    let Some(declared) = apps.iter().find(|a| a.app.metadata.name == app) else {
        return Err(DaemonError::NotFound(format!("app {app:?} not found")));
    };
    let (reason, message) = match provider {
        Some(p) => {
            let Some(target) = providers.iter().find(|x| x.provider.metadata.name == p) else {
                return Err(DaemonError::NotFound(format!("provider {p:?} not found")));
            };
            let s = scheduler::schedule(
                std::slice::from_ref(declared),
                std::slice::from_ref(target),
                &Context::default(),
            );
            if s.decisions.get(app).is_none_or(|d| d.is_empty()) {
                return Err(DaemonError::FailedPrecondition(format!(
                    "provider {p} is not in the placement of app {app}; failover targets must be providers the app may run on"
                )));
            }
            controls.pins.insert(app.to_string(), p.to_string());
            (
                EventReason::ManualFailover,
                format!(
                    "manual failover: {app} is served by {p} only until `skymirror failback {app}`"
                ),
            )
        }
        None => {
            if controls.pins.remove(app).is_none() {
                return Ok(ControlPlan {
                    controls: None,
                    message: format!("{app} has no manual failover in force"),
                });
            }
            (
                EventReason::ManualFailback,
                format!("manual failover of {app} ended: normal placement and routing resume"),
            )
        }
    };
    let mut event = NewEvent::app(reason, app, message.clone());
    if let Some(p) = provider {
        event = event.on_provider(p);
    }
    Ok(ControlPlan {
        controls: Some((controls, event)),
        message,
    })
}

/// Plans a cordon, uncordon or drain of `provider`.
pub fn plan_provider_control(
    provider: &str,
    control: ProviderControl,
    providers: &[DeclaredProvider],
    mut controls: Controls,
) -> Result<ControlPlan, DaemonError> {
    if !providers
        .iter()
        .any(|p| p.provider.metadata.name == provider)
    {
        return Err(DaemonError::NotFound(format!(
            "provider {provider:?} not found"
        )));
    }
    let (reason, message) = match control {
        ProviderControl::Cordon => {
            controls.cordoned.insert(provider.to_string());
            (
                EventReason::ProviderCordoned,
                format!("provider {provider} cordoned: no new replicas are placed there"),
            )
        }
        ProviderControl::Uncordon => {
            controls.cordoned.remove(provider);
            controls.draining.remove(provider);
            (
                EventReason::ProviderUncordoned,
                format!("provider {provider} uncordoned: it takes its share again"),
            )
        }
        ProviderControl::Drain => {
            controls.draining.insert(provider.to_string());
            (
                EventReason::ProviderDraining,
                format!("provider {provider} draining: its replicas move to the other providers"),
            )
        }
    };
    let event = NewEvent::provider(reason, provider, message.clone());
    Ok(ControlPlan {
        controls: Some((controls, event)),
        message,
    })
}

impl Daemon {
    /// Starts (`Some`) or ends (`None`) a manual failover of an app.
    pub async fn set_pin(&self, app: &str, provider: Option<&str>) -> Result<String, DaemonError> {
        let _guard = self.writes.lock().await;
        let plan = plan_pin(
            app,
            provider,
            &self.store.apps()?,
            &self.store.providers()?,
            self.store.controls()?,
        )?;
        self.commit_controls(plan).await
    }

    /// Cordons, uncordons or drains a provider.
    pub async fn control_provider(
        &self,
        provider: &str,
        control: ProviderControl,
    ) -> Result<String, DaemonError> {
        let _guard = self.writes.lock().await;
        let plan = plan_provider_control(
            provider,
            control,
            &self.store.providers()?,
            self.store.controls()?,
        )?;
        self.commit_controls(plan).await
    }

    /// Stores planned controls with their event; the reconciler re-plans.
    async fn commit_controls(&self, plan: ControlPlan) -> Result<String, DaemonError> {
        if let Some((controls, event)) = plan.controls {
            self.commit(crate::store::Batch {
                controls: Some(controls),
                events: vec![event],
                ..crate::store::Batch::default()
            })
            .await?;
        }
        Ok(plan.message)
    }
}
