//! Provider liveness: `up → suspect → down → recovering → up`, plus
//! `partitioned` (agent silent, replicas still answering) and `unknown` (no
//! agent since the daemon started).
//!
//! [`step`] is a pure function of what the daemon observes (heartbeat age,
//! whether the provider's replicas answer probes from outside, time since the
//! daemon started), so every transition is unit-tested with a fake clock.
//!
//! Why these rules:
//! - A silent agent whose replicas still answer is a control-plane partition,
//!   not an outage: nothing is re-placed until the replicas fail too.
//! - A provider is down as soon as both signals agree: its agent has been
//!   silent past the suspect threshold *and* none of its replicas answers from
//!   outside. Waiting for `down_after` as well would only delay full strength
//!   on the survivors; the outside probe is what keeps a partition from being
//!   taken for an outage, and it must say "nothing answers" to declare one.
//! - After a daemon restart, agents get a reconnect grace before anything is
//!   declared down, so a control-plane blink never triggers mass re-placement.
//! - A provider that keeps dropping out is held out for a while instead of
//!   having its share moved back and forth (flapping).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Liveness state of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// No agent has connected since the daemon started (within the reconnect grace).
    Unknown,
    /// Heartbeats arrive.
    Up,
    /// Heartbeats are late.
    Suspect,
    /// The agent is silent but replicas answer probes from outside.
    Partitioned,
    /// The agent is silent and no replica answers.
    Down,
    /// Back after being down (or held out); not yet trusted with its share.
    Recovering,
}

impl Liveness {
    /// Name as shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Unknown => "unknown",
            Liveness::Up => "up",
            Liveness::Suspect => "suspect",
            Liveness::Partitioned => "partitioned",
            Liveness::Down => "down",
            Liveness::Recovering => "recovering",
        }
    }
}

/// Timing of liveness decisions.
#[derive(Debug, Clone)]
pub struct LivenessConfig {
    /// Silence after which a provider is suspect.
    pub suspect_after: Duration,
    /// Silence after which a provider is partitioned (its replicas answer) or
    /// down (they do not, or there is nothing to probe). A provider whose
    /// replicas are probed and none answers is down from `suspect_after` on.
    pub down_after: Duration,
    /// After a daemon start, time agents get to reconnect before any is declared down.
    pub reconnect_grace: Duration,
    /// A provider dropping out this many times ...
    pub flap_threshold: usize,
    /// ... within this window is flapping ...
    pub flap_window: Duration,
    /// ... and is held out this long after its last drop-out.
    pub hold_out: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            suspect_after: Duration::from_millis(1000),
            down_after: Duration::from_millis(3000),
            reconnect_grace: Duration::from_secs(10),
            flap_threshold: 3,
            flap_window: Duration::from_secs(30),
            hold_out: Duration::from_secs(30),
        }
    }
}

/// What the daemon knows of a provider at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// Last heartbeat (or hello) received, if any since the daemon started.
    pub last_heartbeat: Option<Instant>,
    /// Whether an agent stream is open.
    pub connected: bool,
    /// Whether some replica of the provider answered the last probe from
    /// outside; `None` when nothing was probed (no known replica addresses).
    pub replicas_answer: Option<bool>,
    /// When the daemon started.
    pub daemon_started: Instant,
}

/// Tracked liveness of one provider.
#[derive(Debug, Clone)]
pub struct ProviderLiveness {
    /// Current state.
    pub state: Liveness,
    /// When it entered the state.
    pub since: Instant,
    /// Why, for people.
    pub reason: String,
    /// Recent drop-outs (entering suspect, partitioned or down), for flapping.
    dropouts: VecDeque<Instant>,
    /// Held out (flapping) until then.
    pub held_out_until: Option<Instant>,
}

/// A state change, for events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Previous state.
    pub from: Liveness,
    /// New state.
    pub to: Liveness,
    /// Why.
    pub reason: String,
    /// The change started a hold-out for flapping.
    pub held_out: bool,
}

impl ProviderLiveness {
    /// A provider the daemon has not heard from yet.
    pub fn new(now: Instant) -> Self {
        ProviderLiveness {
            state: Liveness::Unknown,
            since: now,
            reason: "no agent has connected since the daemon started".into(),
            dropouts: VecDeque::new(),
            held_out_until: None,
        }
    }

    /// Whether the provider is held out at `now`.
    pub fn held_out(&self, now: Instant) -> bool {
        self.held_out_until.is_some_and(|t| now < t)
    }

    /// How long the provider has been recovering, if it is.
    pub fn recovering_for(&self, now: Instant) -> Option<Duration> {
        (self.state == Liveness::Recovering).then(|| now.saturating_duration_since(self.since))
    }
}

fn human(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Advances a provider's liveness to `now`; returns the transition, if any.
///
/// `recovery` is how long a recovering provider must stay healthy before it is
/// `up` again (the longest fail-back damping of the apps it serves).
pub fn step(
    p: &mut ProviderLiveness,
    obs: &Observation,
    now: Instant,
    cfg: &LivenessConfig,
    recovery: Duration,
) -> Option<Transition> {
    let silent = obs.last_heartbeat.map(|t| now.saturating_duration_since(t));
    let fresh = obs.connected && silent.is_some_and(|s| s < cfg.suspect_after);
    let from = p.state;
    let (to, reason) = if fresh {
        match from {
            Liveness::Down | Liveness::Recovering => {
                if from == Liveness::Recovering
                    && !p.held_out(now)
                    && now.saturating_duration_since(p.since) >= recovery
                {
                    (
                        Liveness::Up,
                        format!("healthy for {} after recovering", human(recovery)),
                    )
                } else {
                    (Liveness::Recovering, p.reason.clone())
                }
            }
            _ if p.held_out(now) => (Liveness::Recovering, "held out after flapping".to_string()),
            _ => (Liveness::Up, "heartbeats arrive".to_string()),
        }
    } else {
        let silence = silent.unwrap_or_else(|| now.saturating_duration_since(obs.daemon_started));
        let in_grace = obs.last_heartbeat.is_none()
            && now.saturating_duration_since(obs.daemon_started) < cfg.reconnect_grace;
        if from == Liveness::Unknown && in_grace {
            (Liveness::Unknown, p.reason.clone())
        } else if silence < cfg.suspect_after && obs.connected {
            (from, p.reason.clone())
        } else if silence < cfg.down_after
            && !(silence >= cfg.suspect_after && obs.replicas_answer == Some(false))
        {
            match from {
                Liveness::Down | Liveness::Partitioned => (from, p.reason.clone()),
                _ => (
                    Liveness::Suspect,
                    if obs.connected {
                        format!("no heartbeat for {}", human(silence))
                    } else {
                        format!("agent disconnected, silent for {}", human(silence))
                    },
                ),
            }
        } else if obs.replicas_answer == Some(true) {
            (
                Liveness::Partitioned,
                format!(
                    "agent silent for {} but its replicas answer: control-plane partition",
                    human(silence)
                ),
            )
        } else {
            (
                Liveness::Down,
                format!("agent silent for {} and no replica answers", human(silence)),
            )
        }
    };
    p.reason = reason.clone();
    if to == from {
        return None;
    }
    let dropped_out = matches!(
        to,
        Liveness::Suspect | Liveness::Partitioned | Liveness::Down
    ) && matches!(
        from,
        Liveness::Up | Liveness::Recovering | Liveness::Unknown
    );
    let mut held_out = false;
    if dropped_out {
        p.dropouts.push_back(now);
        while p
            .dropouts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > cfg.flap_window)
        {
            p.dropouts.pop_front();
        }
        if p.dropouts.len() >= cfg.flap_threshold {
            held_out = !p.held_out(now);
            p.held_out_until = Some(now + cfg.hold_out);
        }
    }
    // A provider that was up and is merely late again stays in recovery mode if
    // it had not finished recovering, so the damping restarts.
    p.state = to;
    p.since = now;
    Some(Transition {
        from,
        to,
        reason,
        held_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(
        start: Instant,
        last: Option<Instant>,
        connected: bool,
        answer: Option<bool>,
    ) -> Observation {
        Observation {
            last_heartbeat: last,
            connected,
            replicas_answer: answer,
            daemon_started: start,
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn up_suspect_down_recovering_up() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        let rec = Duration::from_secs(10);
        let up = step(&mut p, &obs(t0, Some(t0), true, None), t0, &cfg, rec);
        assert_eq!(up.map(|t| t.to), Some(Liveness::Up));
        // 1.2 s of silence: suspect.
        let t = t0 + MS(1200);
        assert_eq!(
            step(&mut p, &obs(t0, Some(t0), true, None), t, &cfg, rec).map(|t| t.to),
            Some(Liveness::Suspect)
        );
        // 3 s: down, nothing answers.
        let t = t0 + MS(3000);
        let down = step(&mut p, &obs(t0, Some(t0), false, Some(false)), t, &cfg, rec);
        assert_eq!(down.map(|t| t.to), Some(Liveness::Down));
        // Back: recovering, then up after the damping.
        let t1 = t0 + MS(5000);
        assert_eq!(
            step(&mut p, &obs(t0, Some(t1), true, None), t1, &cfg, rec).map(|t| t.to),
            Some(Liveness::Recovering)
        );
        let t2 = t1 + MS(9000);
        assert_eq!(
            step(&mut p, &obs(t0, Some(t2), true, None), t2, &cfg, rec),
            None
        );
        let t3 = t1 + MS(10_000);
        assert_eq!(
            step(&mut p, &obs(t0, Some(t3), true, None), t3, &cfg, rec).map(|t| t.to),
            Some(Liveness::Up)
        );
    }

    #[test]
    fn silent_agent_with_answering_replicas_is_a_partition() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        step(&mut p, &obs(t0, Some(t0), true, None), t0, &cfg, MS(0));
        let t = t0 + MS(3500);
        let tr = step(
            &mut p,
            &obs(t0, Some(t0), false, Some(true)),
            t,
            &cfg,
            MS(0),
        );
        assert_eq!(tr.map(|t| t.to), Some(Liveness::Partitioned));
        // The replicas stop answering too: now it is down.
        let t = t0 + MS(4000);
        assert_eq!(
            step(
                &mut p,
                &obs(t0, Some(t0), false, Some(false)),
                t,
                &cfg,
                MS(0)
            )
            .map(|t| t.to),
            Some(Liveness::Down)
        );
    }

    #[test]
    fn down_as_soon_as_silence_and_the_outside_probe_agree() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        step(&mut p, &obs(t0, Some(t0), true, None), t0, &cfg, MS(0));
        // Disconnected half a second ago, nothing answers: not yet past the
        // suspect threshold, so only suspect.
        let t = t0 + MS(500);
        let tr = step(
            &mut p,
            &obs(t0, Some(t0), false, Some(false)),
            t,
            &cfg,
            MS(0),
        );
        assert_eq!(tr.map(|t| t.to), Some(Liveness::Suspect));
        // Past it, and still nothing answers: down, long before `down_after`.
        let t = t0 + MS(1100);
        let tr = step(
            &mut p,
            &obs(t0, Some(t0), false, Some(false)),
            t,
            &cfg,
            MS(0),
        );
        assert_eq!(tr.as_ref().map(|t| t.to), Some(Liveness::Down));
        assert!(
            tr.is_some_and(|t| t.reason.contains("no replica answers")),
            "{}",
            p.reason
        );
    }

    #[test]
    fn answering_replicas_are_never_taken_for_an_outage() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        step(&mut p, &obs(t0, Some(t0), true, None), t0, &cfg, MS(0));
        for ms in [1100, 2000, 2900] {
            step(
                &mut p,
                &obs(t0, Some(t0), false, Some(true)),
                t0 + MS(ms),
                &cfg,
                MS(0),
            );
            assert_eq!(p.state, Liveness::Suspect, "at {ms} ms");
        }
        step(
            &mut p,
            &obs(t0, Some(t0), false, Some(true)),
            t0 + MS(3000),
            &cfg,
            MS(0),
        );
        assert_eq!(p.state, Liveness::Partitioned);
        // Nothing to probe (no replica addresses): the silence alone decides,
        // at `down_after`.
        let mut q = ProviderLiveness::new(t0);
        step(&mut q, &obs(t0, Some(t0), true, None), t0, &cfg, MS(0));
        step(
            &mut q,
            &obs(t0, Some(t0), false, None),
            t0 + MS(2000),
            &cfg,
            MS(0),
        );
        assert_eq!(q.state, Liveness::Suspect);
        step(
            &mut q,
            &obs(t0, Some(t0), false, None),
            t0 + MS(3000),
            &cfg,
            MS(0),
        );
        assert_eq!(q.state, Liveness::Down);
    }

    #[test]
    fn reconnect_grace_after_daemon_start() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        // 9 s after the daemon started, no agent yet: still unknown, not down.
        assert_eq!(
            step(
                &mut p,
                &obs(t0, None, false, None),
                t0 + MS(9000),
                &cfg,
                MS(0)
            ),
            None
        );
        assert_eq!(p.state, Liveness::Unknown);
        // Past the grace: down.
        let tr = step(
            &mut p,
            &obs(t0, None, false, None),
            t0 + MS(10_500),
            &cfg,
            MS(0),
        );
        assert_eq!(tr.map(|t| t.to), Some(Liveness::Down));
    }

    #[test]
    fn flapping_is_held_out() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = ProviderLiveness::new(t0);
        let mut t = t0;
        let mut held = 0;
        for _ in 0..4 {
            step(&mut p, &obs(t0, Some(t), true, None), t, &cfg, MS(0));
            let late = t + MS(1500);
            if let Some(tr) = step(&mut p, &obs(t0, Some(t), false, None), late, &cfg, MS(0)) {
                held += usize::from(tr.held_out);
            }
            t = late + MS(500);
        }
        assert_eq!(held, 1, "one hold-out event, not one per flap");
        assert!(p.held_out(t));
        // Heartbeats while held out: recovering, not up.
        step(&mut p, &obs(t0, Some(t), true, None), t, &cfg, MS(0));
        assert_eq!(p.state, Liveness::Recovering);
        // After the hold-out and the damping, up again.
        let later = t + cfg.hold_out + MS(1);
        step(
            &mut p,
            &obs(t0, Some(later), true, None),
            later,
            &cfg,
            MS(0),
        );
        assert_eq!(p.state, Liveness::Up);
    }
}
