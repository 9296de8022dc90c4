//! Trainable classification heads (SPEC §5), one type for every kind so the trainer and the
//! predictor never branch on it:
//!
//! - `mean`: `W · mean(h) + b` over the real tokens of the last hidden states (with no
//!   interventions, a logistic-regression probe on frozen mean-pooled embeddings);
//! - `pooler` (BERT): `classifier(dropout(tanh(pooler(h₀))))` on the first token;
//! - `roberta`: `out_proj(dropout(tanh(dense(dropout(h₀)))))`, transformers'
//!   `RobertaClassificationHead`.
//!
//! [`Head::for_encoder`] starts the pooler/RoBERTa layers from the checkpoint's weights when it
//! has them with the right shapes (`pooler.dense`, `classifier`, `classifier.dense`,
//! `classifier.out_proj`), like transformers' `…ForSequenceClassification`; other layers get
//! PyTorch's `nn.Linear` initialisation (uniform in ±1/√fan_in), seeded. Dropout is the
//! config's `classifier_dropout` (else `hidden_dropout_prob`), applied in training only, with
//! a seeded mask. The encoder itself stays frozen and runs without dropout.
//!
//! A head is saved as `classifier_head.safetensors` (`head/file.rs`); its metadata records the
//! kind, the problem, the label count and the hidden size, so it can be rebuilt from the file.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod file;

pub use file::HeadFile;

use super::problem::Problem;
use crate::model::bert::Encoder;
use crate::{Error, Result};

/// Which head sits on the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadKind {
    /// Linear layer on the masked mean of the last hidden states.
    #[default]
    Mean,
    /// BERT style: pooler dense + tanh on the first token, dropout, linear classifier.
    Pooler,
    /// RoBERTa style: dropout, dense + tanh on the first token, dropout, linear `out_proj`.
    Roberta,
}

impl HeadKind {
    /// Every kind.
    pub const ALL: [HeadKind; 3] = [HeadKind::Mean, HeadKind::Pooler, HeadKind::Roberta];

    /// The name on the command line and in saved heads.
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Mean => "mean",
            HeadKind::Pooler => "pooler",
            HeadKind::Roberta => "roberta",
        }
    }

    /// The head's linear layers in order, as `(name in the head file, name of the checkpoint
    /// layer it may start from)`. The mean head's tensors have no prefix (`weight`, `bias`).
    fn layers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HeadKind::Mean => &[("", "")],
            HeadKind::Pooler => &[("pooler", "pooler.dense"), ("classifier", "classifier")],
            HeadKind::Roberta => &[
                ("dense", "classifier.dense"),
                ("out_proj", "classifier.out_proj"),
            ],
        }
    }
}

impl std::fmt::Display for HeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for HeadKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        HeadKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("unknown head `{s}` (mean, pooler, roberta)"))
            })
    }
}

/// What a head is: its kind, the problem it is trained for, and its number of outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSpec {
    /// Kind.
    pub kind: HeadKind,
    /// Loss and decoding.
    pub problem: Problem,
    /// Outputs (classes; 1 for regression).
    pub num_labels: usize,
}

impl HeadSpec {
    /// The head's linear layers in order, as `(name in the head file, checkpoint layer it may
    /// start from, outputs)`; each reads `hidden` inputs, and the last gives the labels.
    fn layer_shapes(
        &self,
        hidden: usize,
    ) -> impl Iterator<Item = (&'static str, &'static str, usize)> {
        let names = self.kind.layers();
        let num_labels = self.num_labels;
        names.iter().enumerate().map(move |(i, &(name, source))| {
            let out = if i + 1 == names.len() {
                num_labels
            } else {
                hidden
            };
            (name, source, out)
        })
    }

    fn check(&self) -> Result<()> {
        if self.num_labels == 0 {
            return Err(Error::InvalidArgument(
                "a head needs at least one label".into(),
            ));
        }
        if self.problem == Problem::Regression && self.num_labels != 1 {
            return Err(Error::InvalidArgument(format!(
                "regression needs a head with one output, not {}",
                self.num_labels
            )));
        }
        Ok(())
    }
}

/// A trainable linear layer `x Wᵀ + b`.
struct Dense {
    name: &'static str,
    weight: Var,
    bias: Var,
}

impl Dense {
    /// PyTorch's `nn.Linear` default: weight and bias uniform in ±1/√inp, drawn from `rng`
    /// (weight first, row-major).
    fn init(
        name: &'static str,
        out: usize,
        inp: usize,
        rng: &mut StdRng,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inp as f32).sqrt();
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        let b: Vec<f32> = (0..out).map(|_| rng.gen_range(-bound..bound)).collect();
        Self::from_tensors(
            name,
            &Tensor::from_vec(w, (out, inp), dev)?,
            &Tensor::from_vec(b, out, dev)?,
        )
    }

    /// A trainable copy of `weight` `[out, in]` and `bias` `[out]` in f32.
    fn from_tensors(name: &'static str, weight: &Tensor, bias: &Tensor) -> Result<Self> {
        Ok(Self {
            name,
            weight: Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
            bias: Var::from_tensor(&bias.to_dtype(DType::F32)?)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor().to_dtype(x.dtype())?;
        let b = self.bias.as_tensor().to_dtype(x.dtype())?;
        Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?)
    }

    /// The tensor name of `param` (`weight`, `bias`) in head files.
    fn tensor_name(layer: &str, param: &str) -> String {
        if layer.is_empty() {
            param.to_string()
        } else {
            format!("{layer}.{param}")
        }
    }
}

/// A trainable classification head (see the module docs for the kinds).
pub struct Head {
    spec: HeadSpec,
    hidden: usize,
    layers: Vec<Dense>,
    dropout: f64,
    from_checkpoint: Vec<&'static str>,
}

impl Head {
    /// File name of a saved head, beside the adapter's files.
    pub const FILE: &'static str = "classifier_head.safetensors";

    /// A freshly initialised head for hidden size `hidden`, seeded, without dropout.
    pub fn new(spec: HeadSpec, hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        Self::build(spec, hidden, seed, device, &|_, _, _| None)
    }

    /// A single-label mean-pooling head with `labels` classes (the probe).
    pub fn mean(hidden: usize, labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let spec = HeadSpec {
            kind: HeadKind::Mean,
            problem: Problem::SingleLabel,
            num_labels: labels,
        };
        Self::new(spec, hidden, seed, device)
    }

    /// A head for `encoder`: layers the checkpoint has (with the shapes this head needs) start
    /// from its weights, the others are initialised from `seed`; dropout is the config's
    /// classifier dropout for the pooler and RoBERTa heads (none for mean pooling).
    pub fn for_encoder(encoder: &Encoder, spec: HeadSpec, seed: u64) -> Result<Self> {
        let cfg = encoder.config();
        let mut head = Self::build(
            spec,
            cfg.hidden_size,
            seed,
            encoder.device(),
            &|source, out, inp| {
                encoder
                    .head_linear(source)
                    .filter(|(w, b)| w.dims() == [out, inp] && b.dims() == [out])
            },
        )?;
        if spec.kind != HeadKind::Mean {
            head = head.with_dropout(cfg.classifier_dropout)?;
        }
        Ok(head)
    }

    /// Builds the layers of `spec`, each from `checkpoint(source name, out, in)` when that
    /// gives weights, else freshly initialised.
    #[allow(clippy::type_complexity)]
    fn build<'a>(
        spec: HeadSpec,
        hidden: usize,
        seed: u64,
        device: &Device,
        checkpoint: &dyn Fn(&str, usize, usize) -> Option<(&'a Tensor, &'a Tensor)>,
    ) -> Result<Self> {
        spec.check()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(spec.kind.layers().len());
        let mut from_checkpoint = Vec::new();
        for (name, source, out) in spec.layer_shapes(hidden) {
            layers.push(match checkpoint(source, out, hidden) {
                Some((w, b)) => {
                    from_checkpoint.push(source);
                    Dense::from_tensors(name, w, b)?
                }
                None => Dense::init(name, out, hidden, &mut rng, device)?,
            });
        }
        Ok(Self {
            spec,
            hidden,
            layers,
            dropout: 0.0,
            from_checkpoint,
        })
    }

    /// Sets the training-time dropout probability (in `[0, 1)`; no effect on the mean head).
    pub fn with_dropout(mut self, p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArgument(format!(
                "head dropout {p} is not in [0, 1)"
            )));
        }
        self.dropout = p;
        Ok(self)
    }

    /// Kind, problem and label count.
    pub fn spec(&self) -> HeadSpec {
        self.spec
    }

    /// The kind.
    pub fn kind(&self) -> HeadKind {
        self.spec.kind
    }

    /// The problem it is trained for.
    pub fn problem(&self) -> Problem {
        self.spec.problem
    }

    /// Number of outputs.
    pub fn num_labels(&self) -> usize {
        self.spec.num_labels
    }

    /// The hidden size it reads.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Training-time dropout probability.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// The checkpoint layers ([`Encoder::head_linear`] names) it started from.
    pub fn from_checkpoint(&self) -> &[&'static str] {
        &self.from_checkpoint
    }

    /// The device its parameters live on.
    pub fn device(&self) -> &Device {
        self.layers[0].weight.device()
    }

    /// Trainable parameters, named `head.<tensor name in the head file>`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    (
                        format!("head.{}", Dense::tensor_name(l.name, "weight")),
                        l.weight.clone(),
                    ),
                    (
                        format!("head.{}", Dense::tensor_name(l.name, "bias")),
                        l.bias.clone(),
                    ),
                ]
            })
            .collect()
    }

    /// Outputs `[b, labels]` from last hidden states `[b, t, d]` and the real-token mask; with
    /// `rng` (training) dropout is on.
    pub fn forward(
        &self,
        hidden: &Tensor,
        mask: &[Vec<u32>],
        rng: Option<&mut StdRng>,
    ) -> Result<Tensor> {
        self.forward_pooled(&self.pool(hidden, mask)?, rng)
    }

    /// The one vector per input `[b, d]` the head reads: the masked mean of the last hidden
    /// states (mean head) or the first token's (pooler, RoBERTa). Without interventions it never
    /// changes, so a trainer can compute it once per input.
    pub fn pool(&self, hidden: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        match self.spec.kind {
            HeadKind::Mean => masked_mean(hidden, mask),
            HeadKind::Pooler | HeadKind::Roberta => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
        }
    }

    /// Outputs `[b, labels]` from [`pool`](Self::pool)ed vectors `[b, d]`; with `rng`
    /// (training) dropout is on.
    pub fn forward_pooled(&self, pooled: &Tensor, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        let p = self.dropout;
        match self.spec.kind {
            HeadKind::Mean => self.layers[0].forward(pooled),
            HeadKind::Pooler => {
                let x = self.layers[0].forward(pooled)?.tanh()?;
                self.layers[1].forward(&dropout(&x, p, rng)?)
            }
            HeadKind::Roberta => {
                let x = dropout(pooled, p, rng.as_deref_mut())?;
                let x = self.layers[0].forward(&x)?.tanh()?;
                self.layers[1].forward(&dropout(&x, p, rng)?)
            }
        }
    }
}

/// Mean of `hidden` `[b, t, d]` over each row's real tokens (`mask` 1).
fn masked_mean(hidden: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    let m: Vec<f32> = mask
        .iter()
        .flat_map(|row| {
            let n = row.iter().filter(|&&x| x != 0).count().max(1) as f32;
            row.iter().map(move |&x| if x != 0 { 1.0 / n } else { 0.0 })
        })
        .collect();
    let m = Tensor::from_vec(m, (b, t, 1), hidden.device())?.to_dtype(hidden.dtype())?;
    Ok(hidden.broadcast_mul(&m)?.sum(1)?)
}

/// Inverted dropout with a mask drawn from `rng`; identity without `rng` or with `p` 0.
fn dropout(x: &Tensor, p: f64, rng: Option<&mut StdRng>) -> Result<Tensor> {
    let Some(rng) = rng.filter(|_| p > 0.0) else {
        return Ok(x.clone());
    };
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let m: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.gen::<f64>() < keep { scale } else { 0.0 })
        .collect();
    let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * m)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_zeroes_about_p_and_rescales_the_rest() {
        let dev = Device::Cpu;
        let x = Tensor::ones((100, 100), DType::F32, &dev).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let y: Vec<f32> = dropout(&x, 0.25, Some(&mut rng))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((2300..2700).contains(&zeros), "{zeros} of 10000 dropped");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let same = dropout(&x, 0.25, None).unwrap();
        assert_eq!(same.sum_all().unwrap().to_scalar::<f32>().unwrap(), 10000.0);
    }

    #[test]
    fn specs_are_checked() {
        let dev = Device::Cpu;
        let spec = HeadSpec {
            kind: HeadKind::Roberta,
            problem: Problem::Regression,
            num_labels: 2,
        };
        let err = Head::new(spec, 8, 0, &dev).err().unwrap().to_string();
        assert!(err.contains("one output"), "{err}");
        let head = Head::mean(8, 3, 0, &dev).unwrap();
        assert!(head.with_dropout(1.0).is_err());
        for k in HeadKind::ALL {
            assert_eq!(k.name().parse::<HeadKind>().unwrap(), k);
        }
        assert!("cls".parse::<HeadKind>().is_err());
    }

    #[test]
    fn mean_head_initialisation_is_pytorch_linear_and_seeded() {
        let dev = Device::Cpu;
        let a = Head::mean(16, 3, 9, &dev).unwrap();
        let b = Head::mean(16, 3, 9, &dev).unwrap();
        let w = |h: &Head| -> Vec<f32> {
            h.vars()[0]
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert!(w(&a).iter().all(|x| x.abs() < 0.25), "bound 1/√16");
        assert_ne!(w(&a), w(&Head::mean(16, 3, 10, &dev).unwrap()));
        let names: Vec<String> = a.vars().into_iter().map(|v| v.0).collect();
        assert_eq!(names, ["head.weight", "head.bias"]);
    }
}
