//! `summary.md`: the best trials of a sweep and what each hyper-parameter did.
//!
//! Trials stopped early by ASHA never reach their final epochs, so their final metrics are not
//! comparable with completed ones. Every trial is scored at its first rung, at the same epoch
//! count for all (ASHA's smallest rung), so the effect of each hyper-parameter is read there,
//! over every trial; the best trials are ranked among completed ones only.

use std::fmt::Write;

use super::journal::{History, Record, Status};
use super::space::{Config, Param, Space, Value};

/// What the summary says beside the journal.
#[derive(Debug, Clone)]
pub struct SummaryInput<'a> {
    /// The sweep's history.
    pub history: &'a History,
    /// The space searched.
    pub space: &'a Space,
    /// The metric's name.
    pub metric: &'a str,
    /// Epochs ASHA saved against training every trial to its target.
    pub epochs_saved: usize,
    /// The best trial's score on the test split, if one was given: `(metric, items)`.
    pub test: Option<(f64, usize)>,
    /// How many best trials to list.
    pub top: usize,
}

/// The summary in Markdown.
pub fn summary_markdown(s: &SummaryInput<'_>) -> String {
    let finished: Vec<&Record> = s.history.finished().collect();
    let count = |st: Status| finished.iter().filter(|r| r.status == st).count();
    let seconds: f64 = finished.iter().map(|r| r.seconds).sum();
    let dir = if s.history.maximizes() {
        "higher"
    } else {
        "lower"
    };
    let epochs_run = s.history.epochs_run();
    let mut o = String::new();
    let _ = writeln!(o, "# Sweep summary\n");
    let _ = writeln!(
        o,
        "{} trials on the dev split's `{}` ({dir} is better): {} completed, {} stopped early by \
         ASHA, {} failed. {} epochs trained; ASHA saved {} ({:.0} % of {}). {:.0} s of trials, \
         {:.1} s per trial.\n",
        finished.len(),
        s.metric,
        count(Status::Completed),
        count(Status::Stopped),
        count(Status::Failed),
        epochs_run,
        s.epochs_saved,
        100.0 * s.epochs_saved as f64 / (epochs_run + s.epochs_saved).max(1) as f64,
        epochs_run + s.epochs_saved,
        seconds,
        seconds / finished.len().max(1) as f64,
    );
    if let Some(best) = s.history.best() {
        let _ = writeln!(
            o,
            "Best: trial {} with {} = {}{}.\n",
            best.trial,
            s.metric,
            fmt_metric(best.metric),
            match s.test {
                Some((m, n)) =>
                    format!("; on the test split ({n} items, scored once, after the search) {m:.4}"),
                None => String::new(),
            }
        );
    }
    best_table(&mut o, s, &finished);
    effects(&mut o, s);
    o
}

fn fmt_metric(m: Option<f64>) -> String {
    m.map_or("-".into(), |m| format!("{m:.4}"))
}

/// The searched values of a config, `key=value` joined.
pub fn config_text(space: &Space, config: &Config) -> String {
    space
        .params
        .iter()
        .filter_map(|(k, _)| Some(format!("{k}={}", short(config.get(k)?))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A value as the table shows it: floats with three significant digits.
pub fn short(v: &Value) -> String {
    match v {
        Value::Float(x) => format!("{x:.3e}"),
        other => other.to_string(),
    }
}

fn best_table(o: &mut String, s: &SummaryInput<'_>, finished: &[&Record]) {
    let mut done: Vec<&&Record> = finished
        .iter()
        .filter(|r| r.status == Status::Completed && r.metric.is_some())
        .collect();
    done.sort_by(|a, b| {
        let key = |r: &Record| s.history.score(r.metric.unwrap_or(f64::NAN));
        key(a).total_cmp(&key(b))
    });
    let _ = writeln!(o, "## Best completed trials\n");
    let _ = writeln!(
        o,
        "| trial | {} | epochs | params | seconds | config |\n|---|---|---|---|---|---|",
        s.metric
    );
    for r in done.iter().take(s.top) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {} |",
            r.trial,
            fmt_metric(r.metric),
            r.epochs,
            r.params,
            r.seconds,
            config_text(s.space, &r.config)
        );
    }
    let _ = writeln!(o);
}

/// Each trial's `(config value, metric)` at the first rung, for one key.
fn first_rung(s: &SummaryInput<'_>, key: &str) -> Vec<(Value, f64)> {
    let mut out = Vec::new();
    for last in s.history.finished() {
        let first = s.history.records(last.trial).first();
        if let (Some(r), Some(v)) = (first, last.config.get(key)) {
            if let Some(m) = r.metric.filter(|m| m.is_finite()) {
                out.push((v.clone(), m));
            }
        }
    }
    out
}

fn effects(o: &mut String, s: &SummaryInput<'_>) {
    let _ = writeln!(
        o,
        "## Effect of each hyper-parameter\n\nEvery trial's `{}` at its first rung (the same \
         epoch count for all).\n",
        s.metric
    );
    for (key, param) in &s.space.params {
        let points = first_rung(s, key);
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(o, "### `{key}`\n");
        match param {
            Param::Categorical(values) => {
                let _ = writeln!(o, "| value | trials | mean | best |\n|---|---|---|---|");
                for v in values {
                    let ms: Vec<f64> = points
                        .iter()
                        .filter(|(x, _)| x == v)
                        .map(|(_, m)| *m)
                        .collect();
                    let best = ms
                        .iter()
                        .copied()
                        .min_by(|a, b| s.history.score(*a).total_cmp(&s.history.score(*b)));
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} |",
                        short(v),
                        ms.len(),
                        fmt_metric(mean(&ms)),
                        fmt_metric(best)
                    );
                }
            }
            Param::Int { .. } | Param::Float { .. } => {
                let xs: Vec<f64> = points.iter().filter_map(|(v, _)| v.as_f64()).collect();
                let ys: Vec<f64> = points.iter().map(|(_, m)| *m).collect();
                let rho = spearman(&xs, &ys);
                let _ = writeln!(
                    o,
                    "Spearman correlation of `{key}` with `{}` over {} trials: {}.\n",
                    s.metric,
                    xs.len(),
                    rho.map_or("-".into(), |r| format!("{r:+.2}"))
                );
            }
        }
        let _ = writeln!(o);
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Spearman's rank correlation (average ranks for ties); `None` under 3 points or with no
/// spread.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() < 3 || x.len() != y.len() {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let (mx, my) = (mean(&rx)?, mean(&ry)?);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0;
        for &k in &idx[i..=j] {
            out[k] = r;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_matches_known_values() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(spearman(&x, &[2.0, 4.0, 6.0, 8.0, 10.0]), Some(1.0));
        assert_eq!(spearman(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        // scipy.stats.spearmanr([1,2,3,4,5], [1,3,2,5,4]) = 0.8
        let r = spearman(&x, &[1.0, 3.0, 2.0, 5.0, 4.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        assert_eq!(spearman(&x, &[1.0; 5]), None);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), [1.5, 0.0, 1.5]);
    }
}
