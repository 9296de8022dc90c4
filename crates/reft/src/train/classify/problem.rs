//! What a classifier predicts and how it is trained and scored, as transformers' `problem_type`:
//! one class per input (cross-entropy), one number (mean squared error) or a set of classes
//! (binary cross-entropy on each class's logit). The losses are composed of differentiable candle
//! ops in the logits' dtype, so their gradients reach the head and the interventions (fused ops
//! without a backward would cut them silently, SPEC §8).

use candle_core::{DType, Device, Tensor, D};

use crate::eval::metrics;
use crate::{Error, Result};

/// The kind of target, and with it the loss and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Problem {
    /// One class per input: cross-entropy over the logits, argmax at inference.
    #[default]
    SingleLabel,
    /// One real number per input (the head has one output): mean squared error.
    Regression,
    /// Any subset of the classes per input: binary cross-entropy with logits, averaged over
    /// inputs and classes (PyTorch's `BCEWithLogitsLoss`); a class is predicted when its logit
    /// is above 0 (probability above 0.5).
    MultiLabel,
}

impl Problem {
    /// Every problem, in the order of the command line's help.
    pub const ALL: [Problem; 3] = [
        Problem::SingleLabel,
        Problem::Regression,
        Problem::MultiLabel,
    ];

    /// The name on the command line and in saved heads.
    pub fn name(self) -> &'static str {
        match self {
            Problem::SingleLabel => "single",
            Problem::Regression => "regression",
            Problem::MultiLabel => "multi-label",
        }
    }

    /// The mean loss of `logits` `[b, k]` against `targets`: class ids (u32 `[b]`) for single
    /// label, values `[b]` for regression, 0/1 indicators `[b, k]` for multi-label (both in the
    /// logits' dtype).
    pub fn loss(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Problem::SingleLabel => cross_entropy(logits, targets),
            Problem::Regression => mse(logits, targets),
            Problem::MultiLabel => bce_with_logits(logits, targets),
        }
    }

    /// No predictions, of this problem's kind.
    pub(crate) fn decode_empty(self) -> Predictions {
        match self {
            Problem::SingleLabel => Predictions::Classes(Vec::new()),
            Problem::Regression => Predictions::Values(Vec::new()),
            Problem::MultiLabel => Predictions::Sets(Vec::new()),
        }
    }

    /// Predictions from logits `[b, k]`.
    pub fn decode(self, logits: &Tensor) -> Result<Predictions> {
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self {
            Problem::SingleLabel => Predictions::Classes(
                logits
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|c| c as usize)
                    .collect(),
            ),
            Problem::Regression => Predictions::Values(logits.flatten_all()?.to_vec1()?),
            Problem::MultiLabel => Predictions::Sets(
                logits
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|row| (0..row.len()).filter(|&c| row[c] > 0.0).collect())
                    .collect(),
            ),
        })
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Problem {
    type Err = Error;
    /// Our names, and transformers' `problem_type` values.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "single" | "single_label_classification" => Ok(Problem::SingleLabel),
            "regression" => Ok(Problem::Regression),
            "multi-label" | "multi_label_classification" => Ok(Problem::MultiLabel),
            _ => Err(Error::InvalidArgument(format!(
                "unknown problem `{s}` (single, regression, multi-label)"
            ))),
        }
    }
}

/// Mean cross-entropy of `logits` `[b, k]` against class ids `targets` (u32 `[b]`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Mean squared error of one output per row (`[b, 1]` or `[b]`) against `targets` `[b]`.
pub fn mse(outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let outputs = match outputs.dims() {
        [_, 1] => outputs.squeeze(1)?,
        [_] => outputs.clone(),
        other => {
            return Err(Error::InvalidArgument(format!(
                "regression needs one output per input, got shape {other:?}"
            )))
        }
    };
    Ok((outputs - targets)?.sqr()?.mean_all()?)
}

/// Binary cross-entropy of `logits` `[b, k]` against 0/1 `targets` `[b, k]`, averaged over all
/// entries, in the stable form `max(x, 0) − x·z + log(1 + e^{−|x|})` (no overflow for large
/// logits; its gradient is `σ(x) − z`).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let per = ((logits.relu()? - (logits * targets)?)? + soft)?;
    Ok(per.mean_all()?)
}

/// Gold labels of a data set, one entry per input; the variant decides the [`Problem`].
#[derive(Debug, Clone, Copy)]
pub enum Labels<'a> {
    /// Class ids (single label).
    Classes(&'a [usize]),
    /// Real targets (regression).
    Values(&'a [f32]),
    /// The class ids present in each input (multi-label; an empty set is allowed).
    Sets(&'a [Vec<usize>]),
}

impl Labels<'_> {
    /// The problem these labels pose.
    pub fn problem(&self) -> Problem {
        match self {
            Labels::Classes(_) => Problem::SingleLabel,
            Labels::Values(_) => Problem::Regression,
            Labels::Sets(_) => Problem::MultiLabel,
        }
    }

    /// Number of inputs labelled.
    pub fn len(&self) -> usize {
        match self {
            Labels::Classes(c) => c.len(),
            Labels::Values(v) => v.len(),
            Labels::Sets(s) => s.len(),
        }
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every label fits a head with `num_labels` outputs.
    pub(crate) fn validate(&self, num_labels: usize) -> Result<()> {
        let bad_class = |c: usize| {
            Error::InvalidArgument(format!("label {c} but the head has {num_labels} classes"))
        };
        match self {
            Labels::Classes(c) => match c.iter().find(|&&c| c >= num_labels) {
                Some(&c) => Err(bad_class(c)),
                None => Ok(()),
            },
            Labels::Sets(s) => match s.iter().flatten().find(|&&c| c >= num_labels) {
                Some(&c) => Err(bad_class(c)),
                None => Ok(()),
            },
            Labels::Values(v) => {
                if num_labels != 1 {
                    return Err(Error::InvalidArgument(format!(
                        "regression needs a head with one output, this one has {num_labels}"
                    )));
                }
                match v.iter().position(|x| !x.is_finite()) {
                    Some(i) => Err(Error::InvalidArgument(format!(
                        "regression target {} of input {i} is not a finite number",
                        v[i]
                    ))),
                    None => Ok(()),
                }
            }
        }
    }

    /// The targets of inputs `rows` in the form [`Problem::loss`] takes.
    pub(crate) fn targets(
        &self,
        rows: &[usize],
        num_labels: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = rows.len();
        Ok(match self {
            Labels::Classes(c) => {
                let t: Vec<u32> = rows.iter().map(|&i| c[i] as u32).collect();
                Tensor::from_vec(t, n, device)?
            }
            Labels::Values(v) => {
                let t: Vec<f32> = rows.iter().map(|&i| v[i]).collect();
                Tensor::from_vec(t, n, device)?.to_dtype(dtype)?
            }
            Labels::Sets(s) => {
                let mut t = vec![0f32; n * num_labels];
                for (r, &i) in rows.iter().enumerate() {
                    for &c in &s[i] {
                        t[r * num_labels + c] = 1.0;
                    }
                }
                Tensor::from_vec(t, (n, num_labels), device)?.to_dtype(dtype)?
            }
        })
    }
}

/// What a classifier predicted, one entry per input.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictions {
    /// Class ids (single label).
    Classes(Vec<usize>),
    /// Values (regression).
    Values(Vec<f32>),
    /// Sets of class ids, ascending (multi-label).
    Sets(Vec<Vec<usize>>),
}

impl Predictions {
    /// The class ids, for a single-label classifier.
    pub fn classes(&self) -> Option<&[usize]> {
        match self {
            Predictions::Classes(c) => Some(c),
            _ => None,
        }
    }

    /// The values, for a regression head.
    pub fn values(&self) -> Option<&[f32]> {
        match self {
            Predictions::Values(v) => Some(v),
            _ => None,
        }
    }

    /// The class sets, for a multi-label classifier.
    pub fn sets(&self) -> Option<&[Vec<usize>]> {
        match self {
            Predictions::Sets(s) => Some(s),
            _ => None,
        }
    }

    /// Number of inputs predicted.
    pub fn len(&self) -> usize {
        match self {
            Predictions::Classes(c) => c.len(),
            Predictions::Values(v) => v.len(),
            Predictions::Sets(s) => s.len(),
        }
    }

    /// True when nothing was predicted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The metrics of `pred` against `gold` (the same problem, as many inputs): single label
/// `accuracy`, `macro_f1`, `mcc`; regression `pearson`, `spearman`, `mse`; multi-label
/// `subset_accuracy` (exact match of the whole set), `micro_f1`, `macro_f1` (over the
/// `num_labels` classes). Definitions in [`crate::eval::metrics`].
pub fn score(
    pred: &Predictions,
    gold: Labels,
    num_labels: usize,
) -> Result<Vec<(&'static str, f64)>> {
    if pred.len() != gold.len() {
        return Err(Error::InvalidArgument(format!(
            "{} predictions for {} labels",
            pred.len(),
            gold.len()
        )));
    }
    Ok(match (pred, gold) {
        (Predictions::Classes(p), Labels::Classes(g)) => vec![
            ("accuracy", metrics::accuracy(p, g)),
            ("macro_f1", metrics::macro_f1(p, g, num_labels)),
            ("mcc", metrics::matthews_corrcoef(p, g, num_labels)),
        ],
        (Predictions::Values(p), Labels::Values(g)) => {
            let p: Vec<f64> = p.iter().map(|&x| x as f64).collect();
            let g: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            vec![
                ("pearson", metrics::pearson(&p, &g)),
                ("spearman", metrics::spearman(&p, &g)),
                ("mse", metrics::mean_squared_error(&p, &g)),
            ]
        }
        (Predictions::Sets(p), Labels::Sets(g)) => vec![
            ("subset_accuracy", metrics::subset_accuracy(p, g)),
            ("micro_f1", metrics::multilabel_micro_f1(p, g, num_labels)),
            ("macro_f1", metrics::multilabel_macro_f1(p, g, num_labels)),
        ],
        (_, gold) => {
            return Err(Error::InvalidArgument(format!(
                "predictions and labels are for different problems (labels: {})",
                gold.problem()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// `f`'s value and gradient at `x` (f64), and the gradient by central differences.
    fn grads(
        x: &[f64],
        shape: &[usize],
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::from_slice(x, shape, &dev).unwrap()).unwrap();
        let loss = f(v.as_tensor()).unwrap();
        let value = loss.to_scalar::<f64>().unwrap();
        let g = loss.backward().unwrap();
        let analytic: Vec<f64> = g
            .get(v.as_tensor())
            .expect("a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eps = 1e-6;
        let at = |y: Vec<f64>| {
            let t = Tensor::from_vec(y, shape, &dev).unwrap();
            f(&t).unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (0..x.len())
            .map(|i| {
                let (mut up, mut down) = (x.to_vec(), x.to_vec());
                up[i] += eps;
                down[i] -= eps;
                (at(up) - at(down)) / (2.0 * eps)
            })
            .collect();
        (value, analytic, numeric)
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn cross_entropy_value_and_gradient() {
        let dev = Device::Cpu;
        // One row: −log softmax([2, 0])₀ = log(1 + e⁻²).
        let one = cross_entropy(
            &Tensor::new(&[[2.0f64, 0.0]], &dev).unwrap(),
            &Tensor::new(&[0u32], &dev).unwrap(),
        )
        .unwrap();
        assert!((one.to_scalar::<f64>().unwrap() - 0.126_928_011_042_972_6).abs() < 1e-12);

        let x = [1.0, 2.0, 0.5, 0.1, -0.3, 0.2];
        let t = Tensor::new(&[1u32, 2], &dev).unwrap();
        let (value, analytic, numeric) = grads(&x, &[2, 3], |l| cross_entropy(l, &t));
        // Computed by hand (logsumexp of each row minus the target logit, averaged).
        assert!((value - 0.692_598_219_830_602_1).abs() < 1e-12, "{value}");
        // d/dx = (softmax(x) − onehot) / b.
        let mut expected = Vec::new();
        for (r, target) in [(0, 1), (1, 2)] {
            let row = &x[r * 3..r * 3 + 3];
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            for (c, v) in row.iter().enumerate() {
                expected.push((v.exp() / z - f64::from(u8::from(c == target))) / 2.0);
            }
        }
        assert_close(&analytic, &expected, 1e-12);
        assert_close(&analytic, &numeric, 1e-7);
    }

    #[test]
    fn mse_value_and_gradient() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[1.0f64, 1.5, 0.0], &dev).unwrap();
        // Differences −0.5, 0.5, −1: mean of squares 0.5; gradient 2·diff/3.
        let (value, analytic, numeric) = grads(&[0.5, 2.0, -1.0], &[3, 1], |o| mse(o, &t));
        assert!((value - 0.5).abs() < 1e-12, "{value}");
        assert_close(&analytic, &[-1.0 / 3.0, 1.0 / 3.0, -2.0 / 3.0], 1e-12);
        assert_close(&analytic, &numeric, 1e-7);
        let err = mse(&Tensor::zeros((3, 2), DType::F64, &dev).unwrap(), &t).unwrap_err();
        assert!(err.to_string().contains("one output"), "{err}");
    }

    #[test]
    fn bce_with_logits_value_gradient_and_large_logits() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0]], &dev).unwrap();
        let x = [0.0, 2.0, -1.0, 3.0];
        let (value, analytic, numeric) = grads(&x, &[2, 2], |l| bce_with_logits(l, &z));
        // log 2, 2 + log(1 + e⁻²), log(1 + e⁻¹), log(1 + e⁻³), averaged.
        let expected = (2f64.ln()
            + 2.0
            + (-2f64).exp().ln_1p()
            + (-1f64).exp().ln_1p()
            + (-3f64).exp().ln_1p())
            / 4.0;
        assert!((value - expected).abs() < 1e-12, "{value} vs {expected}");
        assert!((value - 0.795_481).abs() < 1e-6, "{value}");
        let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
        let want: Vec<f64> = x
            .iter()
            .zip([1.0, 0.0, 0.0, 1.0])
            .map(|(&v, z)| (sigma(v) - z) / 4.0)
            .collect();
        assert_close(&analytic, &want, 1e-12);
        assert_close(&analytic, &numeric, 1e-7);
        // Logits far beyond exp's range stay finite: 0 when right, |x| when wrong.
        let big = bce_with_logits(
            &Tensor::new(&[[200.0f32, -200.0]], &dev).unwrap(),
            &Tensor::new(&[[1.0f32, 1.0]], &dev).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!((big - 100.0).abs() < 1e-3, "{big}");
    }

    #[test]
    fn decode_and_names() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0.3f32, -1.0, 2.0], [-0.1, 0.4, -3.0]], &dev).unwrap();
        assert_eq!(
            Problem::SingleLabel.decode(&logits).unwrap(),
            Predictions::Classes(vec![2, 1])
        );
        assert_eq!(
            Problem::MultiLabel.decode(&logits).unwrap(),
            Predictions::Sets(vec![vec![0, 2], vec![1]])
        );
        let one = Tensor::new(&[[0.25f32], [-2.0]], &dev).unwrap();
        assert_eq!(
            Problem::Regression.decode(&one).unwrap(),
            Predictions::Values(vec![0.25, -2.0])
        );
        for p in Problem::ALL {
            assert_eq!(p.name().parse::<Problem>().unwrap(), p);
        }
        assert_eq!(
            "multi_label_classification".parse::<Problem>().unwrap(),
            Problem::MultiLabel
        );
        assert!("multi".parse::<Problem>().is_err());
    }

    #[test]
    fn labels_are_checked_and_become_targets() {
        let dev = Device::Cpu;
        let sets = vec![vec![0, 2], vec![], vec![1]];
        let t = Labels::Sets(&sets)
            .targets(&[2, 0], 3, DType::F32, &dev)
            .unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 1.0]]
        );
        let err = Labels::Sets(&sets).validate(2).unwrap_err().to_string();
        assert!(err.contains("label 2"), "{err}");
        let err = Labels::Values(&[0.5]).validate(2).unwrap_err().to_string();
        assert!(err.contains("one output"), "{err}");
        let err = Labels::Values(&[0.5, f32::NAN])
            .validate(1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("input 1"), "{err}");
        let err = score(&Predictions::Values(vec![0.5]), Labels::Classes(&[1]), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("different problems"), "{err}");
    }
}
