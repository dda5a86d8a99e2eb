//! The simulated backend: builds that take time, sometimes fail and, at claim, sometimes replace
//! resources — without any infrastructure. Used by docker compose, tests and benchmarks.
//!
//! Every random choice of a job comes from one RNG seeded with (`--sim-seed`, job id), drawn in a
//! fixed order by the pure [`simulate`], so the same job always gets the same outcome — on a
//! redelivery, or on another provisioner process with the same seed.

use std::time::Duration;

use prebuilds_schemas::{BuildStage, LogLevel, ProvisionerJob, ResourceReplacement, Transition};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    backend::{sleep_or_stop, BuildResult, RunError},
    events::Emitter,
};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub duration_min: Duration,
    pub duration_max: Duration,
    /// Probability that a start build fails.
    pub failure_rate: f64,
    /// Probability that a claim build replaces resources.
    pub replacement_rate: f64,
    pub agent_ready_delay: Duration,
    pub seed: u64,
    /// Presets whose start builds always fail.
    pub fail_presets: Vec<Uuid>,
}

/// What the simulation decided for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOutcome {
    pub duration: Duration,
    /// `Some(error)` when the build fails.
    pub failure: Option<String>,
    /// Non-empty only for claim builds.
    pub replacements: Vec<ResourceReplacement>,
}

/// Resources a simulated claim may replace, with the attribute paths that force it.
const REPLACEABLE: [(&str, &[&str]); 2] = [
    ("docker_container.workspace[0]", &["env", "image"]),
    ("docker_volume.home_volume[0]", &["name"]),
];

/// Mixes the seed and the job id into the RNG seed (SplitMix64 finaliser over both halves).
fn rng_seed(seed: u64, job_id: Uuid) -> u64 {
    let id = job_id.as_u128();
    let mut x = seed ^ (id as u64) ^ ((id >> 64) as u64).rotate_left(32);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Decides the outcome of `job`. Pure: a function of the configuration and the job only. The draws
/// happen in a fixed order whatever the job, so changing one rate does not reshuffle the others.
pub fn simulate(config: &SimConfig, job: &ProvisionerJob) -> SimOutcome {
    let mut rng = StdRng::seed_from_u64(rng_seed(config.seed, job.job_id));
    let min = config.duration_min.as_nanos().min(u64::MAX as u128) as u64;
    let max = config.duration_max.as_nanos().min(u64::MAX as u128) as u64;
    let duration_nanos = if max > min {
        rng.random_range(min..=max)
    } else {
        min
    };
    let failure_draw: f64 = rng.random();
    let replacement_draw: f64 = rng.random();
    let resources: usize = rng.random_range(1..=REPLACEABLE.len());
    let paths_of_first: usize = rng.random_range(1..=REPLACEABLE[0].1.len());

    let start = job.transition == Transition::Start;
    let failure = if !start {
        None
    } else if job
        .preset_id
        .is_some_and(|p| config.fail_presets.contains(&p))
    {
        Some(format!(
            "simulated failure: preset {} is listed in --sim-fail-presets",
            job.preset_id.unwrap_or_default()
        ))
    } else if failure_draw < config.failure_rate {
        Some(format!(
            "simulated failure (--sim-failure-rate {}): terraform apply exited with status 1",
            config.failure_rate
        ))
    } else {
        None
    };
    let replacements =
        if start && job.stage == BuildStage::Claim && replacement_draw < config.replacement_rate {
            REPLACEABLE
                .iter()
                .take(resources)
                .enumerate()
                .map(|(i, (resource, paths))| ResourceReplacement {
                    resource: (*resource).to_owned(),
                    paths: paths
                        .iter()
                        .take(if i == 0 { paths_of_first } else { paths.len() })
                        .map(|p| (*p).to_owned())
                        .collect(),
                })
                .collect()
        } else {
            Vec::new()
        };
    SimOutcome {
        duration: Duration::from_nanos(duration_nanos),
        failure,
        replacements,
    }
}

#[derive(Debug)]
pub struct SimBackend {
    config: SimConfig,
}

impl SimBackend {
    pub fn new(config: SimConfig) -> Self {
        SimBackend { config }
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Plays the simulated build: a third of the duration planning, the rest applying.
    pub async fn run(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<BuildResult, RunError> {
        let outcome = simulate(&self.config, job);
        let plan_time = outcome.duration / 3;
        let apply_time = outcome.duration - plan_time;
        let info = LogLevel::Info;
        emitter
            .log(info, "init", "Initializing the backend... (simulated)")
            .await;
        emitter
            .log(info, "init", "Terraform has been successfully initialized!")
            .await;
        sleep_or_stop(plan_time, stop).await?;
        match job.transition {
            Transition::Start => {
                for r in &outcome.replacements {
                    emitter
                        .log(
                            LogLevel::Warn,
                            "plan",
                            format!("  # {} must be replaced", r.resource),
                        )
                        .await;
                    for path in &r.paths {
                        emitter
                            .log(
                                LogLevel::Warn,
                                "plan",
                                format!("      ~ {path} = (changed) # forces replacement"),
                            )
                            .await;
                    }
                }
                let replaced = outcome.replacements.len();
                let created = if job.stage == BuildStage::Claim {
                    replaced
                } else {
                    2
                };
                emitter
                    .log(
                        info,
                        "plan",
                        format!("Plan: {created} to add, 0 to change, {replaced} to destroy."),
                    )
                    .await;
                emitter.plan_result(outcome.replacements.clone()).await;
                sleep_or_stop(apply_time, stop).await?;
                if let Some(error) = outcome.failure {
                    emitter.log(LogLevel::Error, "apply", error.clone()).await;
                    return Ok(BuildResult::Failed { error });
                }
                emitter
                    .log(
                        info,
                        "apply",
                        format!(
                            "Apply complete! Resources: {created} added, 0 changed, {replaced} destroyed."
                        ),
                    )
                    .await;
                Ok(BuildResult::Succeeded {
                    agents: vec!["main".to_owned()],
                })
            }
            Transition::Stop | Transition::Delete => {
                let verb = if job.transition == Transition::Stop {
                    "apply"
                } else {
                    "destroy"
                };
                sleep_or_stop(apply_time, stop).await?;
                emitter
                    .log(
                        info,
                        verb,
                        format!(
                            "{} complete! Resources: 0 added, 0 changed, 2 destroyed.",
                            if verb == "apply" { "Apply" } else { "Destroy" }
                        ),
                    )
                    .await;
                Ok(BuildResult::Succeeded { agents: vec![] })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prebuilds_schemas::Payload;

    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            duration_min: Duration::from_millis(100),
            duration_max: Duration::from_millis(900),
            failure_rate: 0.0,
            replacement_rate: 0.0,
            agent_ready_delay: Duration::ZERO,
            seed: 7,
            fail_presets: vec![],
        }
    }

    fn job(n: u128, stage: BuildStage) -> ProvisionerJob {
        let mut job = ProvisionerJob::example();
        job.job_id = Uuid::from_u128(n);
        job.stage = stage;
        job
    }

    #[test]
    fn the_same_job_gets_the_same_outcome() {
        let mut c = config();
        c.failure_rate = 0.5;
        c.replacement_rate = 0.5;
        for n in 0..50 {
            let j = job(n, BuildStage::Claim);
            assert_eq!(simulate(&c, &j), simulate(&c, &j));
        }
    }

    #[test]
    fn durations_stay_within_bounds_and_vary() {
        let c = config();
        let durations: Vec<_> = (0..200)
            .map(|n| simulate(&c, &job(n, BuildStage::Create)).duration)
            .collect();
        assert!(durations
            .iter()
            .all(|d| *d >= c.duration_min && *d <= c.duration_max));
        let distinct: std::collections::HashSet<_> = durations.iter().collect();
        assert!(distinct.len() > 150, "uniform draws rarely collide");
    }

    #[test]
    fn zero_durations_are_zero() {
        let mut c = config();
        c.duration_min = Duration::ZERO;
        c.duration_max = Duration::ZERO;
        assert_eq!(
            simulate(&c, &job(1, BuildStage::Create)).duration,
            Duration::ZERO
        );
    }

    #[test]
    fn rates_of_zero_and_one_are_exact() {
        let mut c = config();
        c.failure_rate = 1.0;
        c.replacement_rate = 1.0;
        for n in 0..100 {
            let claim = simulate(&c, &job(n, BuildStage::Claim));
            assert!(claim.failure.is_some());
            assert!(!claim.replacements.is_empty() && claim.replacements.len() <= 2);
            assert!(claim.replacements.iter().all(|r| !r.paths.is_empty()));
            // Replacements only at claim.
            assert!(simulate(&c, &job(n, BuildStage::Create))
                .replacements
                .is_empty());
        }
        c.failure_rate = 0.0;
        c.replacement_rate = 0.0;
        for n in 0..100 {
            let claim = simulate(&c, &job(n, BuildStage::Claim));
            assert!(claim.failure.is_none() && claim.replacements.is_empty());
        }
    }

    #[test]
    fn a_failure_rate_is_roughly_honoured() {
        let mut c = config();
        c.failure_rate = 0.3;
        let failed = (0..2000)
            .filter(|n| simulate(&c, &job(*n, BuildStage::Create)).failure.is_some())
            .count();
        assert!((450..750).contains(&failed), "failed = {failed}");
    }

    #[test]
    fn only_start_builds_fail() {
        let mut c = config();
        c.failure_rate = 1.0;
        let mut j = job(1, BuildStage::None);
        j.transition = Transition::Delete;
        assert!(simulate(&c, &j).failure.is_none());
    }

    #[test]
    fn listed_presets_always_fail() {
        let preset = Uuid::new_v4();
        let mut c = config();
        c.fail_presets = vec![preset];
        let mut j = job(1, BuildStage::Create);
        j.preset_id = Some(preset);
        assert!(simulate(&c, &j)
            .failure
            .unwrap()
            .contains(&preset.to_string()));
        j.preset_id = Some(Uuid::new_v4());
        assert!(simulate(&c, &j).failure.is_none());
    }

    #[test]
    fn the_seed_changes_outcomes() {
        let mut a = config();
        a.failure_rate = 0.5;
        let mut b = a.clone();
        b.seed = 8;
        let differ = (0..100)
            .filter(|n| {
                let j = job(*n, BuildStage::Create);
                simulate(&a, &j) != simulate(&b, &j)
            })
            .count();
        assert!(differ > 50);
    }
}
