//! The engine's counters and latency histograms, kept with atomics so that readers (metrics,
//! health) never wait on the scheduler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Counters the engine keeps for metrics and health.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting to be prefilled.
    pub queued: AtomicUsize,
    /// Sequences decoding.
    pub running: AtomicUsize,
    /// Prompt tokens prefilled so far.
    pub prompt_tokens: AtomicUsize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of a prefill.
    pub prompt_tokens_cached: AtomicUsize,
    /// Bytes the prefix cache holds.
    pub prefix_cache_bytes: AtomicUsize,
    /// Tokens generated so far.
    pub generated_tokens: AtomicUsize,
    /// Requests cancelled because their client went away.
    pub cancelled: AtomicUsize,
    /// Requests accepted, by the adapters they asked for (`+`-joined; empty for the base).
    pub requests_by_adapter: Mutex<BTreeMap<String, usize>>,
    /// Seconds from submission to the first generated text.
    pub time_to_first_token: Histogram,
    /// Seconds between one piece of a sequence's text and the next.
    pub inter_token_latency: Histogram,
}

/// Upper bounds (seconds) of the latency buckets, as vLLM's metrics use: fine below 100 ms,
/// where decode steps live, coarse above.
const BOUNDS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
];

/// A cumulative histogram in Prometheus' shape: a count per upper bound (the last, `+Inf`,
/// holds everything), a sum and a count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    /// Sum of observations in microseconds (an integer, so it can be atomic).
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, cumulative; the last bound is infinity.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let at = BOUNDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BOUNDS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6).round() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The cumulative counts, sum and count now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let buckets = BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_are_cumulative_and_the_last_bucket_holds_all() {
        let h = Histogram::default();
        for s in [0.0005, 0.03, 0.03, 7.0, 100.0] {
            h.observe(s);
        }
        let snap = h.snapshot();
        assert_eq!(snap.count, 5);
        assert!((snap.sum - 107.0605).abs() < 1e-6);
        let at = |b: f64| snap.buckets.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!(at(0.001), 1);
        assert_eq!(at(0.02), 1);
        assert_eq!(at(0.04), 3);
        assert_eq!(at(10.0), 4);
        assert_eq!(snap.buckets.last().unwrap(), &(f64::INFINITY, 5));
    }
}
