//! The circuit breaker around PostgreSQL writes.
//!
//! Counting and state transitions come from the `failsafe` crate (open after
//! N consecutive failed batches, half-open after the recovery timeout). It
//! lacks two things this worker needs, which this wrapper adds:
//! - failsafe lets *every* call through while half-open; here exactly one
//!   probe batch goes through and the others wait for its result;
//! - failsafe has no way to wait for the breaker; sources and writers here
//!   wait asynchronously (and stop waiting on shutdown).
//!
//! It also mirrors the state for `/health/circuit-breaker`, `/readyz` and
//! the metrics, and logs each transition once. failsafe 1.3 has had no
//! release since 2024; keeping it behind this type lets it be swapped.
//!
//! Its thresholds apply live ([`CircuitBreaker::reconfigure`]): failsafe's
//! policy is fixed at build, so new thresholds build a new state machine,
//! swapped in only while the breaker is closed (an open breaker finishes
//! its recovery under the thresholds that opened it).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use failsafe::{Instrument, StateMachine};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// The breaker's state, as reported to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Lower-case name for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// Mirrors transitions into our state, logs and metrics.
#[derive(Clone)]
struct Hooks {
    state: Arc<AtomicU8>,
    transitions: Arc<AtomicU64>,
    metrics: Metrics,
    started: Arc<AtomicBool>,
}

impl Hooks {
    fn set(&self, state: BreakerState) {
        self.state.store(state as u8, Ordering::SeqCst);
        self.metrics.breaker_state.set(state as i64);
        if !self.started.swap(true, Ordering::SeqCst) {
            return; // the initial "closed" of construction is not a transition
        }
        self.transitions.fetch_add(1, Ordering::SeqCst);
        self.metrics
            .breaker_transitions
            .with_label_values(&[state.as_str()])
            .inc();
        match state {
            BreakerState::Open => tracing::warn!(
                "circuit breaker OPEN: database writes failing; reading paused, events wait in Redis"
            ),
            BreakerState::HalfOpen => {
                tracing::info!("circuit breaker HALF-OPEN: letting one probe batch through")
            }
            BreakerState::Closed => {
                tracing::info!("circuit breaker CLOSED: database writes succeed again")
            }
        }
    }
}

impl Instrument for Hooks {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.set(BreakerState::Closed);
    }
}

/// Shared circuit breaker; cheap to clone.
#[derive(Clone)]
pub struct CircuitBreaker {
    machine: Arc<RwLock<Thresholds>>,
    hooks: Hooks,
    probe_in_flight: Arc<AtomicBool>,
}

/// failsafe's state machine and the thresholds it was built with.
#[derive(Clone)]
struct Thresholds {
    machine: Machine,
    failures: u32,
    recovery: Duration,
}

type Machine = StateMachine<ConsecutiveFailures<Constant>, Hooks>;

/// How often waiters look at the breaker again while it is open.
const POLL: Duration = Duration::from_millis(100);

impl CircuitBreaker {
    /// Opens after `failures` consecutive failed batches; half-opens after
    /// `recovery`.
    pub fn new(failures: u32, recovery: Duration, metrics: Metrics) -> Self {
        let hooks = Hooks {
            state: Arc::new(AtomicU8::new(0)),
            transitions: Arc::new(AtomicU64::new(0)),
            metrics,
            started: Arc::new(AtomicBool::new(false)),
        };
        Self {
            machine: Arc::new(RwLock::new(Thresholds {
                machine: build_machine(failures, recovery, &hooks),
                failures,
                recovery,
            })),
            hooks,
            probe_in_flight: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Takes new thresholds (a reloaded configuration). They apply at once
    /// while the breaker is closed; otherwise nothing changes and the
    /// caller offers them again later (the sink does so for every batch).
    /// Returns whether the thresholds in force changed.
    pub fn reconfigure(&self, failures: u32, recovery: Duration) -> bool {
        {
            let current = self.thresholds();
            if current.failures == failures && current.recovery == recovery {
                return false;
            }
        }
        if self.state() != BreakerState::Closed {
            return false;
        }
        let mut slot = self.machine.write().unwrap_or_else(|e| e.into_inner());
        *slot = Thresholds {
            machine: build_machine(failures, recovery, &self.hooks),
            failures,
            recovery,
        };
        tracing::info!(
            failure_threshold = failures,
            recovery_secs = recovery.as_secs_f64(),
            "circuit breaker thresholds changed"
        );
        true
    }

    /// The thresholds (and machine) in force.
    fn thresholds(&self) -> Thresholds {
        self.machine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configured number of consecutive failures that opens the breaker.
    pub fn failure_threshold(&self) -> u32 {
        self.thresholds().failures
    }

    /// The current state (an open breaker past its timeout shows as open
    /// until someone asks to write).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.hooks.state.load(Ordering::SeqCst))
    }

    /// Transitions so far.
    pub fn transitions(&self) -> u64 {
        self.hooks.transitions.load(Ordering::SeqCst)
    }

    /// The configured recovery timeout.
    pub fn recovery_timeout(&self) -> Duration {
        self.thresholds().recovery
    }

    /// Whether a write may be attempted now (closed, or due for a probe).
    pub fn is_writable(&self) -> bool {
        self.thresholds().machine.is_call_permitted()
            && !(self.state() == BreakerState::HalfOpen
                && self.probe_in_flight.load(Ordering::SeqCst))
    }

    /// Waits until writes may be attempted; false if `cancel` fired first.
    /// Sources call this before reading, so nothing is read while open.
    pub async fn wait_writable(&self, cancel: &CancellationToken) -> bool {
        loop {
            if self.is_writable() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => return false,
            }
        }
    }

    /// Waits for permission to write one batch: any number while closed,
    /// a single probe while half-open. `None` if `cancel` fired first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<BreakerPermit> {
        loop {
            let machine = self.thresholds().machine;
            if machine.is_call_permitted() {
                match self.state() {
                    BreakerState::HalfOpen => {
                        if self
                            .probe_in_flight
                            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        {
                            return Some(BreakerPermit {
                                breaker: self.clone(),
                                machine,
                                probe: true,
                                recorded: false,
                            });
                        }
                    }
                    _ => {
                        return Some(BreakerPermit {
                            breaker: self.clone(),
                            machine,
                            probe: false,
                            recorded: false,
                        })
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }
}

/// Permission for one batch write; report its result with `success` or
/// `failure`. Dropped unreported (e.g. cancelled), it counts as neither.
pub struct BreakerPermit {
    breaker: CircuitBreaker,
    /// The machine that admitted the write: its result goes there, even
    /// if new thresholds were swapped in meanwhile.
    machine: Machine,
    probe: bool,
    recorded: bool,
}

impl BreakerPermit {
    /// The write succeeded.
    pub fn success(mut self) {
        self.recorded = true;
        self.machine.on_success();
    }

    /// The write failed transiently.
    pub fn failure(mut self) {
        self.recorded = true;
        self.machine.on_error();
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        let _ = self.recorded;
        if self.probe {
            self.breaker.probe_in_flight.store(false, Ordering::SeqCst);
        }
    }
}

/// A failsafe state machine: open after `failures` consecutive failures,
/// half-open after `recovery`, reporting transitions to `hooks`.
fn build_machine(failures: u32, recovery: Duration, hooks: &Hooks) -> Machine {
    failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(
            failures,
            failsafe::backoff::constant(recovery),
        ))
        .instrument(hooks.clone())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn new_thresholds_apply_while_closed_and_wait_while_open() {
        let b = breaker(60_000);
        let never = CancellationToken::new();
        assert!(b.reconfigure(1, Duration::from_millis(50)));
        assert_eq!(b.failure_threshold(), 1);
        assert_eq!(b.recovery_timeout(), Duration::from_millis(50));
        assert!(
            !b.reconfigure(1, Duration::from_millis(50)),
            "same thresholds: no change"
        );
        b.acquire(&never).await.unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open, "one failure opens it now");
        assert!(!b.reconfigure(5, Duration::from_secs(1)), "not while open");
        assert_eq!(b.failure_threshold(), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        b.acquire(&never).await.unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.reconfigure(5, Duration::from_secs(1)));
        for _ in 0..4 {
            b.acquire(&never).await.unwrap().failure();
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "four failures stay under five"
        );
    }

    fn breaker(recovery_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(3, Duration::from_millis(recovery_ms), Metrics::new())
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_success_resets_the_count() {
        let b = breaker(60_000);
        let never = CancellationToken::new();
        for _ in 0..2 {
            b.acquire(&never).await.unwrap().failure();
        }
        b.acquire(&never).await.unwrap().success();
        for _ in 0..2 {
            b.acquire(&never).await.unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire(&never).await.unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.is_writable());
        assert_eq!(b.transitions(), 1);
    }

    #[tokio::test]
    async fn half_open_admits_exactly_one_probe_and_its_result_decides() {
        let b = breaker(50);
        let never = CancellationToken::new();
        for _ in 0..3 {
            b.acquire(&never).await.unwrap().failure();
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        let probe = b.acquire(&never).await.unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let second = tokio::time::timeout(Duration::from_millis(300), b.acquire(&never)).await;
        assert!(second.is_err(), "a second batch waits while the probe runs");
        probe.failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(80)).await;
        b.acquire(&never).await.unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        let _ = b.acquire(&never).await.unwrap();
        let _ = b.acquire(&never).await.unwrap();
    }

    #[tokio::test]
    async fn waiting_stops_on_shutdown() {
        let b = breaker(60_000);
        let never = CancellationToken::new();
        for _ in 0..3 {
            b.acquire(&never).await.unwrap().failure();
        }
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(b.acquire(&cancel).await.is_none());
        assert!(!b.wait_writable(&cancel).await);
    }
}
