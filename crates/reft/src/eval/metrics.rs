//! Evaluation metrics for classification (single and multi-label), regression and extractive QA.
//!
//! The definitions follow the reference implementations people compare against:
//! scikit-learn (`accuracy_score`, `f1_score(average="macro")`, `matthews_corrcoef`),
//! SciPy (`pearsonr`, `spearmanr` with `rankdata(method="average")`) and the official
//! SQuAD v1.1 evaluation script (`normalize_answer`, exact match).
//!
//! Every function is infallible. When the two input slices differ in length, the extra
//! elements of the longer one are ignored (pairs are formed as by [`Iterator::zip`]).

use std::cmp::Ordering;

/// Fraction of positions where `pred[i] == gold[i]` (sklearn `accuracy_score`).
///
/// Returns NaN when there are no pairs (empty input).
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    let n = pred.len().min(gold.len());
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    if n == 0 {
        f64::NAN
    } else {
        correct as f64 / n as f64
    }
}

/// Macro-averaged F1: the unweighted mean of per-label F1 scores, like sklearn's
/// `f1_score(gold, pred, average="macro")`.
///
/// The mean runs over the labels in `0..num_labels` that occur in `gold` or in `pred`
/// (sklearn's `unique_labels`); a label absent from both does not count. Per-label
/// F1 is `2·tp / (2·tp + fp + fn)`, i.e. 0 for a label that is never predicted
/// correctly (sklearn's `zero_division=0`). A value `>= num_labels` is not averaged
/// over but still counts as an error (a missed gold label); this equals sklearn with
/// `labels=` set to the in-range labels present. Returns NaN when no label qualifies
/// (e.g. empty input).
pub fn macro_f1(pred: &[usize], gold: &[usize], num_labels: usize) -> f64 {
    let (mut tp, mut n_pred, mut n_gold) = (
        vec![0u64; num_labels],
        vec![0u64; num_labels],
        vec![0u64; num_labels],
    );
    for (&p, &g) in pred.iter().zip(gold) {
        if p < num_labels {
            n_pred[p] += 1;
        }
        if g < num_labels {
            n_gold[g] += 1;
            if p == g {
                tp[g] += 1;
            }
        }
    }
    let (mut sum, mut count) = (0.0, 0usize);
    for k in 0..num_labels {
        if n_pred[k] + n_gold[k] > 0 {
            sum += f1(tp[k], n_pred[k] - tp[k], n_gold[k] - tp[k]);
            count += 1;
        }
    }
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Multiclass Matthews correlation coefficient as sklearn's `matthews_corrcoef`
/// computes it from the confusion matrix `C`:
///
/// `(c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)·(s² − Σ_k t_k²))`, where `s` is the
/// number of samples, `c` the number of correct ones, `p_k` how often label `k` was
/// predicted and `t_k` how often it truly occurs. Returns 0 when the denominator is 0
/// (e.g. a constant prediction, or empty input), as sklearn does. For two labels this
/// is the usual `(TP·TN − FP·FN) / sqrt(...)`. Values `>= num_labels` are pooled into
/// one extra class (identical to sklearn when they are a single sentinel value).
pub fn matthews_corrcoef(pred: &[usize], gold: &[usize], num_labels: usize) -> f64 {
    let (mut p_sum, mut t_sum) = (vec![0u64; num_labels + 1], vec![0u64; num_labels + 1]);
    let (mut correct, mut s) = (0u64, 0u64);
    for (&p, &g) in pred.iter().zip(gold) {
        let (p, g) = (p.min(num_labels), g.min(num_labels));
        p_sum[p] += 1;
        t_sum[g] += 1;
        correct += u64::from(p == g);
        s += 1;
    }
    let dot = |a: &[u64], b: &[u64]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
    };
    let (s, c) = (s as f64, correct as f64);
    let cov_tp = c * s - dot(&t_sum, &p_sum);
    let cov_pp = s * s - dot(&p_sum, &p_sum);
    let cov_tt = s * s - dot(&t_sum, &t_sum);
    if cov_pp * cov_tt == 0.0 {
        0.0
    } else {
        cov_tp / (cov_tt.sqrt() * cov_pp.sqrt())
    }
}

/// Pearson product-moment correlation coefficient (SciPy `pearsonr(x, y).statistic`),
/// clamped to `[-1, 1]`.
///
/// Returns NaN when it is undefined: fewer than two pairs, or either input constant
/// (SciPy also gives NaN for constant input). NaN in the input propagates.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let constant = |v: &[f64]| v.iter().all(|&a| a == v[0]);
    if n < 2 || constant(x) || constant(y) {
        return f64::NAN;
    }
    let (mx, my) = (
        x.iter().sum::<f64>() / n as f64,
        y.iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman rank correlation (SciPy `spearmanr(x, y).statistic`): the Pearson
/// correlation of the ranks, where tied values get the mean of the ranks they span
/// (SciPy `rankdata(method="average")`).
///
/// Returns NaN when undefined: fewer than two pairs, either input constant, or any
/// NaN in the input (SciPy's default `nan_policy="propagate"`).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks; ties share the average of their ranks. Input must not contain NaN.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].partial_cmp(&v[b]).unwrap_or(Ordering::Equal));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && v[order[j]] == v[order[i]] {
            j += 1;
        }
        // Sorted positions i..j hold ranks i+1..=j; their mean is (i + 1 + j) / 2.
        let rank = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            ranks[k] = rank;
        }
        i = j;
    }
    ranks
}

/// F1 from counts, `2·tp / (2·tp + fp + fn)`; 0 when all three are 0 (sklearn's
/// `zero_division=0`).
fn f1(tp: u64, fp: u64, fneg: u64) -> f64 {
    let denom = 2 * tp + fp + fneg;
    if denom == 0 {
        0.0
    } else {
        2.0 * tp as f64 / denom as f64
    }
}

/// Mean squared error `Σ (pred − gold)² / n` (sklearn `mean_squared_error`). NaN for empty
/// input.
pub fn mean_squared_error(pred: &[f64], gold: &[f64]) -> f64 {
    let n = pred.len().min(gold.len());
    if n == 0 {
        return f64::NAN;
    }
    pred.iter()
        .zip(gold)
        .map(|(p, g)| (p - g) * (p - g))
        .sum::<f64>()
        / n as f64
}

/// Multi-label predictions and gold labels as indicator rows: `sets[i]` lists the classes of
/// input `i` (order and repeats do not matter); ids `>= num_labels` are dropped.
fn indicators(sets: &[Vec<usize>], num_labels: usize) -> Vec<Vec<bool>> {
    sets.iter()
        .map(|s| {
            let mut row = vec![false; num_labels];
            for &c in s.iter().filter(|&&c| c < num_labels) {
                row[c] = true;
            }
            row
        })
        .collect()
}

/// Multi-label exact match: the fraction of inputs whose predicted set of classes equals the
/// gold set (order and repeats ignored), sklearn's `accuracy_score` on indicator matrices
/// ("subset accuracy"). NaN for empty input.
pub fn subset_accuracy(pred: &[Vec<usize>], gold: &[Vec<usize>]) -> f64 {
    let n = pred.len().min(gold.len());
    if n == 0 {
        return f64::NAN;
    }
    let norm = |s: &Vec<usize>| {
        let mut v = s.clone();
        v.sort_unstable();
        v.dedup();
        v
    };
    let same = pred
        .iter()
        .zip(gold)
        .filter(|(p, g)| norm(p) == norm(g))
        .count();
    same as f64 / n as f64
}

/// Per-class `(tp, fp, fn)` of multi-label predictions over classes `0..num_labels`.
fn multilabel_counts(
    pred: &[Vec<usize>],
    gold: &[Vec<usize>],
    num_labels: usize,
) -> Vec<(u64, u64, u64)> {
    let mut counts = vec![(0u64, 0u64, 0u64); num_labels];
    let (p, g) = (indicators(pred, num_labels), indicators(gold, num_labels));
    for (pr, gr) in p.iter().zip(&g) {
        for (k, c) in counts.iter_mut().enumerate() {
            match (pr[k], gr[k]) {
                (true, true) => c.0 += 1,
                (true, false) => c.1 += 1,
                (false, true) => c.2 += 1,
                (false, false) => {}
            }
        }
    }
    counts
}

/// Micro-averaged multi-label F1 (sklearn `f1_score(Y, P, average="micro")` on indicator
/// matrices with `num_labels` columns): `2·TP / (2·TP + FP + FN)` with the counts summed over
/// every input and class; 0 when nothing is predicted or gold (sklearn's `zero_division=0`).
pub fn multilabel_micro_f1(pred: &[Vec<usize>], gold: &[Vec<usize>], num_labels: usize) -> f64 {
    let (tp, fp, fneg) = multilabel_counts(pred, gold, num_labels)
        .into_iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    f1(tp, fp, fneg)
}

/// Macro-averaged multi-label F1 (sklearn `f1_score(Y, P, average="macro")` on indicator
/// matrices with `num_labels` columns): the unweighted mean over all `num_labels` classes of
/// each class's F1, where a class never predicted nor gold counts 0 (`zero_division=0`).
/// NaN when `num_labels` is 0.
pub fn multilabel_macro_f1(pred: &[Vec<usize>], gold: &[Vec<usize>], num_labels: usize) -> f64 {
    if num_labels == 0 {
        return f64::NAN;
    }
    let sum: f64 = multilabel_counts(pred, gold, num_labels)
        .into_iter()
        .map(|(tp, fp, fneg)| f1(tp, fp, fneg))
        .sum();
    sum / num_labels as f64
}

/// SQuAD-style answer normalisation, as `normalize_answer` in the SQuAD v1.1
/// evaluation script: lower-case; delete punctuation (ASCII punctuation, i.e. Python's
/// `string.punctuation`, and every Unicode General Category `P*` character); replace
/// the whole words `a`, `an`, `the` by a space (like the regex `\b(a|an|the)\b`); then
/// collapse runs of whitespace to single spaces and trim.
///
/// Deleting punctuation joins its neighbours: `"don't"` becomes `"dont"`.
pub fn normalize_answer(s: &str) -> String {
    let no_punct: String = s
        .to_lowercase()
        .chars()
        .filter(|&c| !is_punctuation(c))
        .collect();
    let mut spaced = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        // A regex word character: alphanumeric or underscore.
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut spaced);
            spaced.push(c);
        }
    }
    flush(&mut word, &mut spaced);
    spaced.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD exact match: whether `pred` and `gold` are equal after [`normalize_answer`].
pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize_answer(pred) == normalize_answer(gold)
}

/// SQuAD exact match against several references: true when `pred` matches any of
/// `golds` (the maximum over references); false when `golds` is empty.
pub fn exact_match_any(pred: &str, golds: &[String]) -> bool {
    let pred = normalize_answer(pred);
    golds.iter().any(|g| normalize_answer(g) == pred)
}

fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    let c = c as u32;
    PUNCTUATION
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

/// Non-ASCII code point ranges of Unicode General Category `P*` (Pc, Pd, Ps, Pe, Pi,
/// Pf, Po), Unicode 14.0, generated from Python 3.11's `unicodedata.category`.
#[rustfmt::skip]
const PUNCTUATION: &[(u32, u32)] = &[
    (0xA1, 0xA1), (0xA7, 0xA7), (0xAB, 0xAB), (0xB6, 0xB7), (0xBB, 0xBB), (0xBF, 0xBF),
    (0x37E, 0x37E), (0x387, 0x387), (0x55A, 0x55F), (0x589, 0x58A), (0x5BE, 0x5BE), (0x5C0, 0x5C0),
    (0x5C3, 0x5C3), (0x5C6, 0x5C6), (0x5F3, 0x5F4), (0x609, 0x60A), (0x60C, 0x60D), (0x61B, 0x61B),
    (0x61D, 0x61F), (0x66A, 0x66D), (0x6D4, 0x6D4), (0x700, 0x70D), (0x7F7, 0x7F9), (0x830, 0x83E),
    (0x85E, 0x85E), (0x964, 0x965), (0x970, 0x970), (0x9FD, 0x9FD), (0xA76, 0xA76), (0xAF0, 0xAF0),
    (0xC77, 0xC77), (0xC84, 0xC84), (0xDF4, 0xDF4), (0xE4F, 0xE4F), (0xE5A, 0xE5B), (0xF04, 0xF12),
    (0xF14, 0xF14), (0xF3A, 0xF3D), (0xF85, 0xF85), (0xFD0, 0xFD4), (0xFD9, 0xFDA),
    (0x104A, 0x104F), (0x10FB, 0x10FB), (0x1360, 0x1368), (0x1400, 0x1400), (0x166E, 0x166E),
    (0x169B, 0x169C), (0x16EB, 0x16ED), (0x1735, 0x1736), (0x17D4, 0x17D6), (0x17D8, 0x17DA),
    (0x1800, 0x180A), (0x1944, 0x1945), (0x1A1E, 0x1A1F), (0x1AA0, 0x1AA6), (0x1AA8, 0x1AAD),
    (0x1B5A, 0x1B60), (0x1B7D, 0x1B7E), (0x1BFC, 0x1BFF), (0x1C3B, 0x1C3F), (0x1C7E, 0x1C7F),
    (0x1CC0, 0x1CC7), (0x1CD3, 0x1CD3), (0x2010, 0x2027), (0x2030, 0x2043), (0x2045, 0x2051),
    (0x2053, 0x205E), (0x207D, 0x207E), (0x208D, 0x208E), (0x2308, 0x230B), (0x2329, 0x232A),
    (0x2768, 0x2775), (0x27C5, 0x27C6), (0x27E6, 0x27EF), (0x2983, 0x2998), (0x29D8, 0x29DB),
    (0x29FC, 0x29FD), (0x2CF9, 0x2CFC), (0x2CFE, 0x2CFF), (0x2D70, 0x2D70), (0x2E00, 0x2E2E),
    (0x2E30, 0x2E4F), (0x2E52, 0x2E5D), (0x3001, 0x3003), (0x3008, 0x3011), (0x3014, 0x301F),
    (0x3030, 0x3030), (0x303D, 0x303D), (0x30A0, 0x30A0), (0x30FB, 0x30FB), (0xA4FE, 0xA4FF),
    (0xA60D, 0xA60F), (0xA673, 0xA673), (0xA67E, 0xA67E), (0xA6F2, 0xA6F7), (0xA874, 0xA877),
    (0xA8CE, 0xA8CF), (0xA8F8, 0xA8FA), (0xA8FC, 0xA8FC), (0xA92E, 0xA92F), (0xA95F, 0xA95F),
    (0xA9C1, 0xA9CD), (0xA9DE, 0xA9DF), (0xAA5C, 0xAA5F), (0xAADE, 0xAADF), (0xAAF0, 0xAAF1),
    (0xABEB, 0xABEB), (0xFD3E, 0xFD3F), (0xFE10, 0xFE19), (0xFE30, 0xFE52), (0xFE54, 0xFE61),
    (0xFE63, 0xFE63), (0xFE68, 0xFE68), (0xFE6A, 0xFE6B), (0xFF01, 0xFF03), (0xFF05, 0xFF0A),
    (0xFF0C, 0xFF0F), (0xFF1A, 0xFF1B), (0xFF1F, 0xFF20), (0xFF3B, 0xFF3D), (0xFF3F, 0xFF3F),
    (0xFF5B, 0xFF5B), (0xFF5D, 0xFF5D), (0xFF5F, 0xFF65), (0x10100, 0x10102), (0x1039F, 0x1039F),
    (0x103D0, 0x103D0), (0x1056F, 0x1056F), (0x10857, 0x10857), (0x1091F, 0x1091F),
    (0x1093F, 0x1093F), (0x10A50, 0x10A58), (0x10A7F, 0x10A7F), (0x10AF0, 0x10AF6),
    (0x10B39, 0x10B3F), (0x10B99, 0x10B9C), (0x10EAD, 0x10EAD), (0x10F55, 0x10F59),
    (0x10F86, 0x10F89), (0x11047, 0x1104D), (0x110BB, 0x110BC), (0x110BE, 0x110C1),
    (0x11140, 0x11143), (0x11174, 0x11175), (0x111C5, 0x111C8), (0x111CD, 0x111CD),
    (0x111DB, 0x111DB), (0x111DD, 0x111DF), (0x11238, 0x1123D), (0x112A9, 0x112A9),
    (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145D), (0x114C6, 0x114C6),
    (0x115C1, 0x115D7), (0x11641, 0x11643), (0x11660, 0x1166C), (0x116B9, 0x116B9),
    (0x1173C, 0x1173E), (0x1183B, 0x1183B), (0x11944, 0x11946), (0x119E2, 0x119E2),
    (0x11A3F, 0x11A46), (0x11A9A, 0x11A9C), (0x11A9E, 0x11AA2), (0x11C41, 0x11C45),
    (0x11C70, 0x11C71), (0x11EF7, 0x11EF8), (0x11FFF, 0x11FFF), (0x12470, 0x12474),
    (0x12FF1, 0x12FF2), (0x16A6E, 0x16A6F), (0x16AF5, 0x16AF5), (0x16B37, 0x16B3B),
    (0x16B44, 0x16B44), (0x16E97, 0x16E9A), (0x16FE2, 0x16FE2), (0x1BC9F, 0x1BC9F),
    (0x1DA87, 0x1DA8B), (0x1E95E, 0x1E95F),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn accuracy_counts_matches_and_handles_edges() {
        assert_eq!(accuracy(&[0, 1, 2, 1], &[0, 1, 1, 1]), 0.75);
        // Extra element of the longer slice is ignored: 2 of 2 pairs match.
        assert_eq!(accuracy(&[3, 4, 9], &[3, 4]), 1.0);
        assert!(accuracy(&[], &[]).is_nan());
    }

    // gold [0,0,1,1,2,2,0,1], pred [0,1,1,1,0,1,0,0]; label 2 is never predicted.
    // Confusion (gold rows × pred cols): [[2,1,0],[1,2,0],[1,1,0]].
    const GOLD3: [usize; 8] = [0, 0, 1, 1, 2, 2, 0, 1];
    const PRED3: [usize; 8] = [0, 1, 1, 1, 0, 1, 0, 0];

    #[test]
    fn macro_f1_three_classes_with_unpredicted_label() {
        // By hand: label 0 tp=2 fp=2 fn=1 → F1 = 4/7; label 1 likewise 4/7; label 2
        // tp=0 → 0. Mean = (8/7)/3 = 8/21 = 0.380952380952381.
        assert!(close(macro_f1(&PRED3, &GOLD3, 3), 8.0 / 21.0));
        // Label 3 occurs nowhere, so it is not averaged over.
        assert!(close(macro_f1(&PRED3, &GOLD3, 4), 0.380952380952381));
        // Label 2 only predicted: F1 = 2/3, 1, 0 → 5/9.
        assert!(close(macro_f1(&[0, 2, 1], &[0, 0, 1], 3), 5.0 / 9.0));
        assert_eq!(macro_f1(&[1, 0], &[1, 0], 2), 1.0);
        assert!(macro_f1(&[], &[], 3).is_nan());
    }

    #[test]
    fn mcc_three_classes_with_unpredicted_label() {
        // s=8, c=4, p=[4,4,0], t=[3,3,2]: (32−24)/sqrt((64−32)(64−22)) = 8/sqrt(1344)
        // = 1/sqrt(21) = 0.2182178902359924 (by hand, checked with python3 math).
        assert!(close(
            matthews_corrcoef(&PRED3, &GOLD3, 3),
            0.2182178902359924
        ));
    }

    #[test]
    fn mcc_binary_and_degenerate() {
        let gold = [1, 1, 1, 0, 0, 0, 1, 0, 1, 1];
        let pred = [1, 0, 1, 0, 1, 0, 1, 1, 1, 0];
        // TP=4 TN=2 FP=2 FN=2, binary formula (4·2−2·2)/sqrt(6·6·4·4) = 4/24 = 1/6.
        assert!(close(matthews_corrcoef(&pred, &gold, 2), 1.0 / 6.0));
        assert!(close(matthews_corrcoef(&gold, &gold, 2), 1.0));
        let flipped: Vec<usize> = gold.iter().map(|g| 1 - g).collect();
        assert!(close(matthews_corrcoef(&flipped, &gold, 2), -1.0));
        // Constant prediction → zero denominator → 0, as sklearn.
        assert_eq!(matthews_corrcoef(&[1; 10], &gold, 2), 0.0);
        assert_eq!(matthews_corrcoef(&[], &[], 2), 0.0);
    }

    #[test]
    fn pearson_known_value_and_nan_cases() {
        // dx=[-2,-1,0,1,2], dy=[-2,0,1,0,1]: 6/sqrt(10·6) = sqrt(0.6) = 0.7745966692414834.
        let r = pearson(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 4.0, 5.0, 4.0, 5.0]);
        assert!(close(r, 0.7745966692414834));
        // Trailing 100.0 is ignored (shorter length wins): y = 2x + 1 → 1.
        assert!(close(
            pearson(&[1.0, 2.0, 3.0, 100.0], &[3.0, 5.0, 7.0]),
            1.0
        ));
        assert!(pearson(&[0.1, 0.1, 0.1], &[1.0, 2.0, 3.0]).is_nan());
        assert!(pearson(&[1.0], &[2.0]).is_nan());
        assert!(pearson(&[], &[]).is_nan());
    }

    #[test]
    fn spearman_with_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 5.0]),
            [2.0, 3.5, 3.5, 1.0]
        );
        // Ranks [1,2.5,2.5,4,5] and [1,4,2.5,2.5,5]; centred dot 7.25, both sums of
        // squares 9.5 → 7.25/9.5 = 29/38 = 0.7631578947368421 (by hand).
        let r = spearman(&[1.0, 2.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 2.0, 5.0]);
        assert!(close(r, 29.0 / 38.0));
        // Monotone but non-linear → 1.
        assert!(close(
            spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 8.0, 27.0, 64.0]),
            1.0
        ));
        assert!(close(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0));
    }

    #[test]
    fn spearman_undefined_is_nan() {
        assert!(spearman(&[2.0, 2.0, 2.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(spearman(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(spearman(&[], &[]).is_nan());
    }

    #[test]
    fn normalize_answer_squad_style() {
        assert_eq!(normalize_answer("The  Cat!"), "cat");
        assert_eq!(normalize_answer("an apple, a day"), "apple day");
        // Articles only as whole words; punctuation inside a word joins it.
        assert_eq!(normalize_answer("Theater: a-b, THE end."), "theater ab end");
        // Unicode punctuation (« » — …) is removed too; accented letters stay.
        assert_eq!(normalize_answer("«Élan» — vital…"), "élan vital");
        assert_eq!(normalize_answer("  A  "), "");
    }

    #[test]
    fn exact_match_normalises_both_sides() {
        assert!(exact_match("The Cat.", "cat"));
        assert!(!exact_match("cats", "cat"));
        assert!(!exact_match("black cat", "cat"));
        let golds = vec!["London".to_string(), "the  Paris".to_string()];
        assert!(exact_match_any("Paris!", &golds));
        assert!(!exact_match_any("Rome", &golds));
        assert!(!exact_match_any("Paris", &[]));
    }

    #[test]
    fn mean_squared_error_by_hand() {
        // Differences 0.5, −1, 2 → (0.25 + 1 + 4) / 3 = 1.75.
        assert!(close(
            mean_squared_error(&[1.5, 2.0, 5.0], &[1.0, 3.0, 3.0]),
            1.75
        ));
        assert!(mean_squared_error(&[], &[]).is_nan());
    }

    #[test]
    fn multilabel_metrics_by_hand() {
        // Three classes, four inputs.
        let gold = vec![vec![0, 2], vec![1], vec![], vec![0, 1]];
        let pred = vec![vec![2, 0], vec![1, 2], vec![], vec![0]];
        // Exact sets: rows 0 (order ignored) and 2 → 2/4.
        assert!(close(subset_accuracy(&pred, &gold), 0.5));
        // Class 0: tp 2 fp 0 fn 0 → F1 1. Class 1: tp 1 fp 0 fn 1 → 2/3.
        // Class 2: tp 1 fp 1 fn 0 → 2/3. Micro: tp 4 fp 1 fn 1 → 8/10.
        assert!(close(multilabel_micro_f1(&pred, &gold, 3), 0.8));
        assert!(close(
            multilabel_macro_f1(&pred, &gold, 3),
            (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0
        ));
        // A fourth class that never occurs counts 0 in the macro mean (sklearn over all
        // columns), and nothing in the micro counts.
        assert!(close(
            multilabel_macro_f1(&pred, &gold, 4),
            (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 4.0
        ));
        assert!(close(multilabel_micro_f1(&pred, &gold, 4), 0.8));
        // Nothing predicted, nothing gold: 0 by zero_division, exact match 1.
        let empty = vec![vec![], vec![]];
        assert_eq!(multilabel_micro_f1(&empty, &empty, 2), 0.0);
        assert_eq!(subset_accuracy(&empty, &empty), 1.0);
        assert!(subset_accuracy(&[], &[]).is_nan());
    }
}
