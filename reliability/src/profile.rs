//! Problem sizes and time bounds of a run. Every load loop in the suite is bounded by these.

use std::time::Duration;

/// Sizes of one run of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    /// Presets that fill during the fault scenarios.
    pub presets: usize,
    /// Desired prebuilds per preset.
    pub instances: i32,
    pub workers: usize,
    /// How long faults are injected (and claims run) before the system is left to converge.
    pub fault_window: Duration,
    /// Period of the worker SIGKILL loop.
    pub kill_every: Duration,
    /// Concurrent claim clients and the pause between two claims of one client.
    pub claim_clients: usize,
    pub claim_pause: Duration,
    /// Poison messages of the poison scenario.
    pub poison: usize,
    /// Bound on convergence after the faults stopped.
    pub converge_timeout: Duration,
    /// Simulated build durations (`--sim-duration-min/max`) and agent-ready delay.
    pub sim_duration_min: &'static str,
    pub sim_duration_max: &'static str,
    pub sim_agent_ready_delay: &'static str,
    /// Bound on any worker's peak resident set (VmHWM).
    pub worker_memory_bound_mib: f64,
}

impl Profile {
    /// The CI form: debug builds, a few tens of presets, every scenario well under a minute.
    pub fn ci() -> Profile {
        Profile {
            name: "ci",
            presets: 30,
            instances: 1,
            workers: 3,
            fault_window: Duration::from_secs(10),
            kill_every: Duration::from_secs(2),
            claim_clients: 2,
            claim_pause: Duration::from_millis(200),
            poison: 200,
            converge_timeout: Duration::from_secs(60),
            sim_duration_min: "20ms",
            sim_duration_max: "200ms",
            sim_agent_ready_delay: "50ms",
            worker_memory_bound_mib: 256.0,
        }
    }

    /// The default form of the `reliability` binary: a few minutes in all.
    pub fn short() -> Profile {
        Profile {
            name: "short",
            presets: 200,
            instances: 1,
            workers: 3,
            fault_window: Duration::from_secs(20),
            kill_every: Duration::from_secs(3),
            claim_clients: 4,
            claim_pause: Duration::from_millis(100),
            poison: 1_000,
            converge_timeout: Duration::from_secs(120),
            sim_duration_min: "50ms",
            sim_duration_max: "500ms",
            sim_agent_ready_delay: "100ms",
            worker_memory_bound_mib: 256.0,
        }
    }

    /// `--long`: larger pools and longer fault windows.
    pub fn long() -> Profile {
        Profile {
            name: "long",
            presets: 500,
            instances: 3,
            workers: 4,
            fault_window: Duration::from_secs(90),
            kill_every: Duration::from_secs(3),
            claim_clients: 8,
            claim_pause: Duration::from_millis(50),
            poison: 5_000,
            converge_timeout: Duration::from_secs(300),
            sim_duration_min: "100ms",
            sim_duration_max: "2s",
            sim_agent_ready_delay: "200ms",
            worker_memory_bound_mib: 384.0,
        }
    }
}
