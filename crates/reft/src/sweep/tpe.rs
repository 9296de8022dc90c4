//! Tree-structured Parzen Estimator (Bergstra et al. 2011), as Optuna's default
//! `TPESampler`: univariate (each parameter modelled on its own), with a prior component,
//! Optuna's neighbour-distance bandwidths and "magic clip", and its trial-recency weights.
//!
//! After `n_startup` random trials, the history is split into the best `n_good` trials
//! (`n_good = min(ceil(gamma·n), 25)`) and the rest. For each parameter a density `l(x)` is
//! fitted to the good values and `g(x)` to the others; `n_candidates` values are drawn from
//! `l` and the one maximising `l(x)/g(x)` is suggested. Numeric ranges are modelled on their
//! internal axis ([`Param::internal_bounds`]: log scale for log ranges, ints widened by half a
//! step and rounded back); categoricals by weighted counts plus a prior of one per category.
//!
//! Suggestions are reproducible: trial `i`'s config depends only on `(seed, i, history)`,
//! because its random stream is derived from the seed and the trial index (within one
//! version of `rand`, whose `StdRng` algorithm may change between major versions).

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::space::{Config, Param, Space, Value};

/// How many times a duplicate suggestion is perturbed before falling back to random.
const RETRIES: usize = 16;
/// How many random draws are tried to find a config not yet in the history.
const RANDOM_TRIES: usize = 32;
/// Observations beyond this many (oldest first) get linearly decreasing weight (Optuna).
const FLAT_WEIGHTS: usize = 25;

/// TPE sampler settings; lower metrics are better (negate accuracies before passing them).
#[derive(Debug, Clone, PartialEq)]
pub struct Tpe {
    /// Trials drawn uniformly at random before the model is trusted.
    pub n_startup: usize,
    /// Fraction of the history counted as good.
    pub gamma: f64,
    /// Cap on the number of good trials (Optuna: 25), so `l(x)` stays sharp.
    pub max_good: usize,
    /// Candidates drawn from `l(x)` per parameter and suggestion.
    pub n_candidates: usize,
    /// Weight of the prior component (a wide kernel over the whole range).
    pub prior_weight: f64,
    /// Seed of every trial's random stream.
    pub seed: u64,
}

impl Tpe {
    /// Optuna's defaults except `n_startup` (8 instead of 10, as sweeps here are short).
    pub fn new(seed: u64) -> Tpe {
        Tpe {
            n_startup: 8,
            gamma: 0.1,
            max_good: 25,
            n_candidates: 24,
            prior_weight: 1.0,
            seed,
        }
    }

    /// How many of `n` observed trials count as good: `min(ceil(gamma·n), max_good)`, at
    /// least one.
    pub fn n_good(&self, n: usize) -> usize {
        let g = (self.gamma * n as f64).ceil() as usize;
        g.min(self.max_good).max(1).min(n)
    }

    /// The config for trial `trial`, given `(config, metric)` of the finished trials (lower
    /// is better; NaN metrics are ignored). Avoids configs already in `history` when it can.
    pub fn suggest(&self, space: &Space, history: &[(Config, f64)], trial: usize) -> Config {
        let mut rng = trial_rng(self.seed, trial);
        let seen = seen_keys(history);
        let ranked: Vec<&(Config, f64)> = history.iter().filter(|(_, m)| !m.is_nan()).collect();
        if ranked.len() < self.n_startup.max(1) {
            return random_unseen(space, &mut rng, &seen);
        }
        let (good, bad) = self.split(&ranked);
        let choices: Vec<(&String, Vec<Value>)> = space
            .params
            .iter()
            .map(|(k, p)| (k, self.candidates(k, p, &good, &bad, &mut rng)))
            .filter(|(_, ranked)| !ranked.is_empty())
            .collect();
        if choices.is_empty() {
            return random_unseen(space, &mut rng, &seen);
        }
        let mut config = space.fixed.clone();
        for (k, ranked) in &choices {
            config.insert((*k).clone(), ranked[0].clone());
        }
        for _ in 0..RETRIES {
            if !seen.contains(&Space::key_for(&config)) {
                return config;
            }
            let (k, ranked) = &choices[rng.gen_range(0..choices.len())];
            config.insert((*k).clone(), ranked[rng.gen_range(0..ranked.len())].clone());
        }
        if seen.contains(&Space::key_for(&config)) {
            return random_unseen(space, &mut rng, &seen);
        }
        config
    }

    /// Splits the history into good and bad configs, each kept in trial order so the
    /// recency weights apply.
    fn split<'h>(&self, ranked: &[&'h (Config, f64)]) -> (Vec<&'h Config>, Vec<&'h Config>) {
        let mut order: Vec<usize> = (0..ranked.len()).collect();
        order.sort_by(|&i, &j| ranked[i].1.total_cmp(&ranked[j].1));
        let mut is_good = vec![false; ranked.len()];
        for &i in &order[..self.n_good(ranked.len())] {
            is_good[i] = true;
        }
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (h, g) in ranked.iter().zip(is_good) {
            if g {
                good.push(&h.0);
            } else {
                bad.push(&h.0);
            }
        }
        (good, bad)
    }

    /// Candidates for one parameter drawn from `l`, best `l/g` ratio first (empty only for
    /// an empty list).
    fn candidates(
        &self,
        key: &str,
        param: &Param,
        good: &[&Config],
        bad: &[&Config],
        rng: &mut StdRng,
    ) -> Vec<Value> {
        let mut scored = match param {
            Param::Categorical(values) => self.score_categorical(key, values, good, bad, rng),
            _ => self.score_numeric(key, param, good, bad, rng),
        };
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut out: Vec<Value> = scored.into_iter().map(|(_, v)| v).collect();
        if out.is_empty() {
            out.extend(param.sample(rng));
        }
        out
    }

    /// `(ln l(c) − ln g(c), c)` for categories `c` drawn from `l`.
    fn score_categorical(
        &self,
        key: &str,
        values: &[Value],
        good: &[&Config],
        bad: &[&Config],
        rng: &mut StdRng,
    ) -> Vec<(f64, Value)> {
        let l = self.categorical(key, values, good);
        let g = self.categorical(key, values, bad);
        let score = |i: usize| Some((l.get(i)?.ln() - g.get(i)?.ln(), values.get(i)?.clone()));
        (0..self.n_candidates.max(1))
            .filter_map(|_| score(pick(&l, rng)))
            .collect()
    }

    /// `(ln l(x) − ln g(x), x)` for values `x` drawn from `l`, on the internal axis.
    fn score_numeric(
        &self,
        key: &str,
        param: &Param,
        good: &[&Config],
        bad: &[&Config],
        rng: &mut StdRng,
    ) -> Vec<(f64, Value)> {
        let Some((lo, hi)) = param.internal_bounds() else {
            return Vec::new();
        };
        let obs = |set: &[&Config]| -> Vec<f64> {
            set.iter()
                .filter_map(|c| param.to_internal(c.get(key)?))
                .collect()
        };
        let l = Mixture::new(&obs(good), lo, hi, self.prior_weight);
        let g = Mixture::new(&obs(bad), lo, hi, self.prior_weight);
        let mut score = |_| {
            let x = l.sample(rng);
            Some((l.log_pdf(x) - g.log_pdf(x), param.from_internal(x)?))
        };
        (0..self.n_candidates.max(1))
            .filter_map(&mut score)
            .collect()
    }

    /// Category probabilities: prior weight per category plus the recency-weighted counts.
    fn categorical(&self, key: &str, values: &[Value], set: &[&Config]) -> Vec<f64> {
        let weights = recency_weights(set.len());
        let mut p = vec![self.prior_weight.max(1e-12); values.len()];
        for (c, w) in set.iter().zip(weights) {
            if let Some(i) = c.get(key).and_then(|v| values.iter().position(|x| x == v)) {
                p[i] += w;
            }
        }
        let total: f64 = p.iter().sum();
        p.iter().map(|x| x / total).collect()
    }
}

/// A uniform random config for trial `trial` that avoids `history`'s configs when it can;
/// what random search uses, and TPE for its start-up trials (so both agree there).
pub fn sample_random(space: &Space, seed: u64, trial: usize, history: &[(Config, f64)]) -> Config {
    random_unseen(space, &mut trial_rng(seed, trial), &seen_keys(history))
}

/// The random stream of one trial, so suggestions do not depend on how many draws earlier
/// trials made (which is what makes resumed sweeps repeat themselves).
pub fn trial_rng(seed: u64, trial: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ splitmix64(trial as u64))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seen_keys(history: &[(Config, f64)]) -> HashSet<String> {
    history.iter().map(|(c, _)| Space::key_for(c)).collect()
}

fn random_unseen(space: &Space, rng: &mut StdRng, seen: &HashSet<String>) -> Config {
    let mut config = space.sample(rng);
    for _ in 1..RANDOM_TRIES {
        if !seen.contains(&Space::key_for(&config)) {
            break;
        }
        config = space.sample(rng);
    }
    config
}

/// Optuna's `default_weights`: flat for the newest 25 observations, a ramp for older ones.
fn recency_weights(n: usize) -> Vec<f64> {
    if n <= FLAT_WEIGHTS {
        return vec![1.0; n];
    }
    let ramp = n - FLAT_WEIGHTS;
    let step = |i: usize| match ramp {
        1 => 1.0 / n as f64,
        _ => 1.0 / n as f64 + (1.0 - 1.0 / n as f64) * i as f64 / (ramp - 1) as f64,
    };
    (0..ramp)
        .map(step)
        .chain(std::iter::repeat_n(1.0, FLAT_WEIGHTS))
        .collect()
}

/// Index drawn with probability proportional to `weights`.
fn pick(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len().saturating_sub(1)
}

/// A mixture of Gaussians truncated to `[lo, hi]`: one kernel per observation plus the prior.
#[derive(Debug, Clone)]
struct Mixture {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    weights: Vec<f64>,
    log_norms: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Mixture {
    /// Optuna's `_calculate_numerical_distributions` (univariate, prior, magic clip, no
    /// endpoints): each bandwidth is the larger gap to its sorted neighbours.
    fn new(obs: &[f64], lo: f64, hi: f64, prior_weight: f64) -> Mixture {
        let width = hi - lo;
        let prior_mu = 0.5 * (lo + hi);
        let mut sorted: Vec<(f64, usize)> = obs
            .iter()
            .copied()
            .chain([prior_mu])
            .enumerate()
            .map(|(i, x)| (x, i))
            .collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut points = vec![lo];
        points.extend(sorted.iter().map(|p| p.0));
        points.push(hi);
        let m = sorted.len();
        let mut gaps: Vec<f64> = (1..=m)
            .map(|i| (points[i] - points[i - 1]).max(points[i + 1] - points[i]))
            .collect();
        if points.len() >= 4 {
            gaps[0] = points[2] - points[1];
            gaps[m - 1] = points[m] - points[m - 1];
        }
        let min_sigma = width / f64::min(100.0, 1.0 + m as f64);
        let mut sigmas = vec![width; m];
        for (g, (_, i)) in gaps.iter().zip(&sorted) {
            sigmas[*i] = g.max(min_sigma).min(width);
        }
        sigmas[m - 1] = width;
        let mut mus = obs.to_vec();
        mus.push(prior_mu);
        let mut weights = recency_weights(obs.len());
        weights.push(prior_weight.max(1e-12));
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let log_norms = mus
            .iter()
            .zip(&sigmas)
            .map(|(mu, s)| (phi((hi - mu) / s) - phi((lo - mu) / s)).max(1e-300).ln())
            .collect();
        Mixture {
            mus,
            sigmas,
            weights,
            log_norms,
            lo,
            hi,
        }
    }

    /// A draw: pick a kernel by weight, then its truncated normal by rejection (the kernel's
    /// centre lies in the range, so at least about a third of draws are accepted).
    fn sample(&self, rng: &mut StdRng) -> f64 {
        let k = pick(&self.weights, rng);
        let (mu, s) = (self.mus[k], self.sigmas[k]);
        for _ in 0..64 {
            let x = mu + s * standard_normal(rng);
            if (self.lo..=self.hi).contains(&x) {
                return x;
            }
        }
        mu.max(self.lo).min(self.hi)
    }

    /// `ln` of the mixture density at `x`, by log-sum-exp over the kernels.
    fn log_pdf(&self, x: f64) -> f64 {
        let terms: Vec<f64> = (0..self.mus.len())
            .map(|k| {
                let z = (x - self.mus[k]) / self.sigmas[k];
                self.weights[k].ln()
                    - 0.5 * z * z
                    - self.sigmas[k].ln()
                    - 0.5 * (2.0 * std::f64::consts::PI).ln()
                    - self.log_norms[k]
            })
            .collect();
        let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln()
    }
}

/// Box–Muller, so no distribution crate is needed.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes `erfcc`, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let series = poly.iter().rev().fold(0.0, |acc, c| c + t * acc);
    let r = t * (-z * z + series).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lr_space() -> Space {
        Space::from_toml_str("[search]\nlr = { float = [1e-5, 1e-1], log = true }").unwrap()
    }

    fn lr_of(c: &Config) -> f64 {
        c["lr"].as_f64().unwrap()
    }

    fn loss(c: &Config) -> f64 {
        (lr_of(c).log10() + 3.0).powi(2)
    }

    /// Runs `n` sequential trials with `suggest` and returns the suggested lrs.
    fn run(n: usize, mut suggest: impl FnMut(&[(Config, f64)], usize) -> Config) -> Vec<f64> {
        let mut history = Vec::new();
        for i in 0..n {
            let c = suggest(&history, i);
            history.push((c.clone(), loss(&c)));
        }
        history.iter().map(|(c, _)| lr_of(c)).collect()
    }

    fn mixed_space() -> Space {
        let text = "[fixed]\nk = \"x\"\n[search]\na = [\"p\", \"q\", \"r\"]\n\
                    n = { int = [4, 32], log = true }\nm = { int = [2, 12] }\n\
                    x = { float = [0.0, 0.1] }\n";
        Space::from_toml_str(text).unwrap()
    }

    fn random_history(space: &Space, n: usize) -> Vec<(Config, f64)> {
        (0..n)
            .map(|i| (sample_random(space, 99, i, &[]), (i * 7919 % 13) as f64))
            .collect()
    }

    #[test]
    fn suggestions_are_reproducible() {
        let space = mixed_space();
        let history = random_history(&space, 12);
        let tpe = Tpe::new(5);
        for trial in [0, 3, 12, 40] {
            let a = tpe.suggest(&space, &history, trial);
            assert_eq!(a, tpe.suggest(&space, &history, trial));
        }
        let differ = (0..10)
            .filter(|&s| {
                Tpe::new(s).suggest(&space, &history, 12) != tpe.suggest(&space, &history, 12)
            })
            .count();
        assert!(differ >= 8, "only {differ} of 10 seeds differ");
    }

    #[test]
    fn suggestions_stay_in_the_space() {
        let space = mixed_space();
        let mut history = random_history(&space, 10);
        let tpe = Tpe::new(1);
        for trial in 10..200 {
            let c = tpe.suggest(&space, &history, trial);
            assert!(
                space.contains(&c) && c["k"] == Value::Str("x".into()),
                "{c:?}"
            );
            history.push((c, (trial % 17) as f64));
        }
    }

    #[test]
    fn duplicates_are_avoided_while_possible() {
        let space = Space::from_toml_str("[search]\na = [1, 2, 3]\nb = [true, false]").unwrap();
        let tpe = Tpe {
            n_startup: 2,
            ..Tpe::new(3)
        };
        let mut history: Vec<(Config, f64)> = Vec::new();
        for trial in 0..6 {
            let c = tpe.suggest(&space, &history, trial);
            history.push((c, trial as f64));
        }
        let keys: HashSet<String> = history.iter().map(|(c, _)| Space::key_for(c)).collect();
        assert_eq!(keys.len(), 6);
        assert!(space.contains(&tpe.suggest(&space, &history, 6)));
    }

    #[test]
    fn tpe_beats_random_on_a_log_scale_bowl() {
        let space = lr_space();
        let (mut tpe_best, mut rnd_best, mut tpe_dist, mut rnd_dist) = (0.0, 0.0, 0.0, 0.0);
        let dist = |lrs: &[f64]| {
            lrs[20..]
                .iter()
                .map(|x| (x.log10() + 3.0).abs())
                .sum::<f64>()
        };
        let best = |lrs: &[f64]| {
            lrs.iter()
                .map(|x| (x.log10() + 3.0).powi(2))
                .fold(f64::MAX, f64::min)
        };
        for seed in 0..10 {
            let tpe = Tpe::new(seed);
            let t = run(40, |h, i| tpe.suggest(&space, h, i));
            let r = run(40, |h, i| sample_random(&space, seed, i, h));
            (tpe_best, rnd_best) = (tpe_best + best(&t), rnd_best + best(&r));
            (tpe_dist, rnd_dist) = (tpe_dist + dist(&t), rnd_dist + dist(&r));
        }
        assert!(
            tpe_best < rnd_best,
            "best: tpe {tpe_best} vs random {rnd_best}"
        );
        assert!(
            tpe_dist < 0.75 * rnd_dist,
            "spread: tpe {tpe_dist} vs random {rnd_dist}"
        );
    }

    #[test]
    fn mixture_is_a_normalised_density() {
        let m = Mixture::new(&[0.1, 0.15, 0.9], 0.0, 1.0, 1.0);
        let n = 20_000;
        let integral: f64 = (0..n)
            .map(|i| m.log_pdf((i as f64 + 0.5) / n as f64).exp())
            .sum::<f64>()
            / n as f64;
        assert!((integral - 1.0).abs() < 1e-3, "{integral}");
        assert!((phi(0.0) - 0.5).abs() < 1e-7 && (phi(1.96) - 0.975).abs() < 1e-4);
    }

    #[test]
    fn good_fraction_follows_optuna() {
        let tpe = Tpe::new(0);
        assert_eq!([1, 9, 10, 11, 300].map(|n| tpe.n_good(n)), [1, 1, 1, 2, 25]);
        let w = recency_weights(30);
        assert_eq!(w.len(), 30);
        assert!(w[0] < w[4] && w[4] == 1.0 && w[29] == 1.0);
    }
}
