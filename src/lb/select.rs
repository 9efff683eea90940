//! Pure parts of the balancer: the order in which backends are tried for a new
//! connection, and the rise/fall health state machine.

use serde::{Deserialize, Serialize};

/// How a new connection picks its backend among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each new connection goes to the next healthy backend in turn.
    #[default]
    RoundRobin,
    /// The healthy backend with the fewest active connections; ties go round robin.
    LeastConn,
}

/// What selection needs to know about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub healthy: bool,
    pub active: u64,
}

/// The indices of the backends to try, best first, for one new connection.
///
/// Only healthy backends appear. `turn` is a counter the caller increments once per
/// connection; it drives round robin and breaks least-connection ties, so equal loads
/// spread evenly. The caller tries the first index and falls through to the next when
/// the connect is refused or times out.
pub fn try_order(policy: Policy, backends: &[Candidate], turn: u64) -> Vec<usize> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let start = (turn % n as u64) as usize;
    let mut order: Vec<usize> = (0..n)
        .map(|i| (start + i) % n)
        .filter(|&i| backends[i].healthy)
        .collect();
    if policy == Policy::LeastConn {
        // Stable sort keeps the rotated order among equals.
        order.sort_by_key(|&i| backends[i].active);
    }
    order
}

/// Result of feeding one probe result to the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Enough consecutive failures: the backend goes down.
    Down,
    /// Enough consecutive successes: the backend comes (back) up.
    Up,
}

/// Rise/fall hysteresis of one backend.
///
/// A backend starts up, so traffic flows from the first second; the first `fall`
/// failed probes take it down. A down backend needs `rise` consecutive successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState::new()
    }
}

impl HealthState {
    pub fn new() -> HealthState {
        HealthState {
            healthy: true,
            streak: 0,
        }
    }

    /// Records one probe result and reports a state change, if any.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { fall } else { rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(if ok { Transition::Up } else { Transition::Down })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(active: u64) -> Candidate {
        Candidate {
            healthy: true,
            active,
        }
    }
    fn down() -> Candidate {
        Candidate {
            healthy: false,
            active: 0,
        }
    }

    #[test]
    fn round_robin_rotates_over_all_healthy() {
        let b = [up(0), up(0), up(0)];
        let firsts: Vec<usize> = (0..6)
            .map(|t| try_order(Policy::RoundRobin, &b, t)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(try_order(Policy::RoundRobin, &b, 1), vec![1, 2, 0]);
    }

    #[test]
    fn round_robin_skips_unhealthy() {
        let b = [up(0), down(), up(0)];
        assert_eq!(try_order(Policy::RoundRobin, &b, 0), vec![0, 2]);
        assert_eq!(try_order(Policy::RoundRobin, &b, 1), vec![2, 0]);
        assert_eq!(try_order(Policy::RoundRobin, &b, 2), vec![2, 0]);
        let mut counts = [0; 3];
        for t in 0..300 {
            counts[try_order(Policy::RoundRobin, &b, t)[0]] += 1;
        }
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0] + counts[2], 300);
    }

    #[test]
    fn nothing_healthy_gives_nothing() {
        assert!(try_order(Policy::RoundRobin, &[down(), down()], 7).is_empty());
        assert!(try_order(Policy::LeastConn, &[], 7).is_empty());
    }

    #[test]
    fn least_conn_prefers_fewest_active() {
        let b = [up(5), up(1), up(3)];
        assert_eq!(try_order(Policy::LeastConn, &b, 0), vec![1, 2, 0]);
        assert_eq!(try_order(Policy::LeastConn, &b, 2), vec![1, 2, 0]);
        let b = [up(5), down(), up(3)];
        assert_eq!(try_order(Policy::LeastConn, &b, 0), vec![2, 0]);
    }

    #[test]
    fn least_conn_ties_rotate() {
        let b = [up(2), up(2), up(9)];
        assert_eq!(try_order(Policy::LeastConn, &b, 0), vec![0, 1, 2]);
        assert_eq!(try_order(Policy::LeastConn, &b, 1), vec![1, 0, 2]);
    }

    #[test]
    fn least_conn_keeps_loads_even_when_simulated() {
        let mut active = [0u64; 3];
        for t in 0..30 {
            let c: Vec<Candidate> = active.iter().map(|&a| up(a)).collect();
            active[try_order(Policy::LeastConn, &c, t)[0]] += 1;
        }
        assert_eq!(active, [10, 10, 10]);
    }

    #[test]
    fn falls_after_exactly_fall_failures() {
        let mut h = HealthState::new();
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert!(h.healthy);
        assert_eq!(h.record(false, 2, 3), Some(Transition::Down));
        assert!(!h.healthy);
        assert_eq!(h.record(false, 2, 3), None);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut h = HealthState::new();
        h.record(false, 2, 3);
        h.record(false, 2, 3);
        h.record(true, 2, 3);
        h.record(false, 2, 3);
        h.record(false, 2, 3);
        assert!(h.healthy);
        assert_eq!(h.record(false, 2, 3), Some(Transition::Down));
    }

    #[test]
    fn rises_after_exactly_rise_successes() {
        let mut h = HealthState::new();
        h.record(false, 3, 1);
        assert!(!h.healthy);
        assert_eq!(h.record(true, 3, 1), None);
        assert_eq!(h.record(true, 3, 1), None);
        assert_eq!(h.record(false, 3, 1), None);
        assert_eq!(h.record(true, 3, 1), None);
        assert_eq!(h.record(true, 3, 1), None);
        assert_eq!(h.record(true, 3, 1), Some(Transition::Up));
        assert!(h.healthy);
    }

    #[test]
    fn zero_counts_act_as_one() {
        let mut h = HealthState::new();
        assert_eq!(h.record(false, 0, 0), Some(Transition::Down));
        assert_eq!(h.record(true, 0, 0), Some(Transition::Up));
    }
}
