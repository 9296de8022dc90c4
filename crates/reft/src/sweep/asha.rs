//! Asynchronous successive halving (ASHA, Li et al. 2020) over epochs, for trials that run
//! one after another.
//!
//! Rungs are epoch counts `min, min·η, min·η², …` below `max`, plus `max` itself. A trial
//! trains to its first rung, reports a metric, and is either stopped or continued to the next
//! rung; a trial whose own epoch target is below `max` uses the rungs below its target and
//! then the target as its last rung ([`Asha::rungs_for`]).
//!
//! **Variant.** Trials here cannot be paused and resumed later, so promotion is decided on
//! arrival: when a trial reaches rung `k` it is compared with every result recorded so far at
//! that rung (itself included) and continues iff it ranks within the top `⌊n/η⌋` (ties
//! continue). The first `η − 1` arrivals at a rung have no field to be ranked in and always
//! continue. Optuna's `SuccessiveHalvingPruner` instead continues those only when they are
//! the best so far; with the few dozen trials of a fine-tuning sweep that stops most early
//! trials on the evidence of one or two peers, so the more patient rule is used. Lower
//! metrics are better.

use super::error::{Result, SweepError};

/// What a trial does after reporting at a rung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Train on to the next rung.
    Continue,
    /// Stop now: the trial is unlikely to end among the best.
    Stop,
}

/// The rung schedule and reduction factor of an ASHA run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asha {
    rungs: Vec<usize>,
    eta: usize,
}

impl Asha {
    /// Rungs `min_epochs·eta^k` below `max_epochs`, then `max_epochs`. Refuses
    /// `min_epochs == 0`, `max_epochs < min_epochs` and `eta < 2`, which would not halve.
    pub fn new(min_epochs: usize, max_epochs: usize, eta: usize) -> Result<Asha> {
        if min_epochs == 0 || max_epochs < min_epochs || eta < 2 {
            return Err(SweepError::Invalid(format!(
                "asha needs 1 <= min_epochs <= max_epochs and eta >= 2 \
                 (got min {min_epochs}, max {max_epochs}, eta {eta})"
            )));
        }
        let mut rungs = Vec::new();
        let mut r = min_epochs;
        while r < max_epochs {
            rungs.push(r);
            r = match r.checked_mul(eta) {
                Some(next) => next,
                None => break,
            };
        }
        rungs.push(max_epochs);
        Ok(Asha { rungs, eta })
    }

    /// The global rung schedule in epochs, ascending; the last is `max_epochs`.
    pub fn rungs(&self) -> &[usize] {
        &self.rungs
    }

    /// The reduction factor: about one trial in `eta` passes each rung.
    pub fn eta(&self) -> usize {
        self.eta
    }

    /// The epoch target used for trials whose config does not set one.
    pub fn max_epochs(&self) -> usize {
        self.rungs.last().copied().unwrap_or(1)
    }

    /// The rungs a trial with its own epoch target goes through: the global rungs below the
    /// target, then the target itself as its final rung (where it completes, never stops).
    pub fn rungs_for(&self, target: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.rungs.iter().copied().filter(|&r| r < target).collect();
        out.push(target);
        out
    }

    /// Whether `trial`, having reached the rung of `rung` epochs with `metric`, trains on.
    /// `results_at_rung` are `(trial, metric)` recorded at that rung so far; an entry for
    /// `trial` itself is replaced by `metric`, so callers may pass it or not. Call it only
    /// for rungs before a trial's last one. A NaN metric always stops.
    pub fn decide(
        &self,
        trial: usize,
        rung: usize,
        metric: f64,
        results_at_rung: &[(usize, f64)],
    ) -> Decision {
        if metric.is_nan() {
            return Decision::Stop;
        }
        if rung >= self.max_epochs() {
            return Decision::Continue;
        }
        let mut values: Vec<f64> = results_at_rung
            .iter()
            .filter(|(t, _)| *t != trial)
            .map(|(_, m)| *m)
            .collect();
        values.push(metric);
        let promotable = values.len() / self.eta;
        if promotable == 0 {
            return Decision::Continue;
        }
        values.sort_by(f64::total_cmp);
        if metric <= values[promotable - 1] {
            Decision::Continue
        } else {
            Decision::Stop
        }
    }

    /// Epochs not trained thanks to early stopping, from `(epochs asked, epochs run)` pairs.
    pub fn epochs_saved(trials: &[(usize, usize)]) -> usize {
        trials
            .iter()
            .map(|(asked, run)| asked.saturating_sub(*run))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_grow_by_eta_and_end_at_max() {
        let rungs = |a, b, e| Asha::new(a, b, e).map(|x| x.rungs().to_vec()).unwrap();
        assert_eq!(rungs(1, 12, 3), [1, 3, 9, 12]);
        assert_eq!(rungs(1, 9, 3), [1, 3, 9]);
        assert_eq!(rungs(2, 12, 3), [2, 6, 12]);
        assert_eq!(rungs(1, 8, 2), [1, 2, 4, 8]);
        assert_eq!(rungs(4, 4, 3), [4]);
        assert!(Asha::new(0, 4, 3).is_err());
        assert!(Asha::new(5, 4, 3).is_err());
        assert!(Asha::new(1, 4, 1).is_err());
    }

    #[test]
    fn a_trial_uses_the_rungs_below_its_own_target() {
        let a = Asha::new(1, 12, 3).unwrap();
        assert_eq!(a.rungs_for(12), [1, 3, 9, 12]);
        assert_eq!(a.rungs_for(6), [1, 3, 6]);
        assert_eq!(a.rungs_for(3), [1, 3]);
        assert_eq!(a.rungs_for(1), [1]);
        assert_eq!(a.rungs_for(20), [1, 3, 9, 12, 20]);
    }

    #[test]
    fn the_first_arrivals_continue() {
        let a = Asha::new(1, 12, 3).unwrap();
        assert_eq!(a.decide(0, 1, 9.0, &[]), Decision::Continue);
        assert_eq!(a.decide(1, 1, 9.0, &[(0, 1.0)]), Decision::Continue);
        // Its own earlier entry is not counted twice.
        assert_eq!(
            a.decide(1, 1, 9.0, &[(0, 1.0), (1, 9.0)]),
            Decision::Continue
        );
    }

    #[test]
    fn only_the_top_third_is_promoted() {
        let a = Asha::new(1, 12, 3).unwrap();
        let field = [(0, 1.0), (1, 2.0)];
        assert_eq!(a.decide(2, 1, 0.5, &field), Decision::Continue);
        assert_eq!(
            a.decide(2, 1, 1.0, &field),
            Decision::Continue,
            "ties continue"
        );
        assert_eq!(a.decide(2, 1, 1.5, &field), Decision::Stop);
        let field: Vec<(usize, f64)> = (0..5).map(|t| (t, t as f64)).collect();
        // Six results: the best two continue.
        assert_eq!(a.decide(9, 3, 0.5, &field), Decision::Continue);
        assert_eq!(a.decide(9, 3, 1.0, &field), Decision::Continue);
        assert_eq!(a.decide(9, 3, 1.5, &field), Decision::Stop);
        assert_eq!(a.decide(9, 3, f64::NAN, &[]), Decision::Stop);
        assert_eq!(a.decide(9, 12, 99.0, &field), Decision::Continue);
    }

    #[test]
    fn epochs_saved_counts_the_skipped_epochs() {
        assert_eq!(Asha::epochs_saved(&[(12, 12), (12, 3), (6, 1), (4, 9)]), 14);
        assert_eq!(Asha::epochs_saved(&[]), 0);
    }
}
