//! Sequence classification with a frozen encoder (SPEC §5): interventions and a small head are
//! trained together on cross-entropy. The head here is a linear layer on the mean of the last
//! hidden states over real tokens (`HeadKind::Mean`); with no interventions it is exactly a
//! (softmax) logistic-regression probe on frozen mean-pooled embeddings, the baseline ReFT
//! classification is compared with.

use candle_core::{DType, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::adapter::Adapter;
use crate::model::bert::Encoder;
use crate::model::{NoHooks, PromptLayout};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Classification training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// AdamW settings (learning rate of both the interventions and the head).
    pub optim: AdamWConfig,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Seed of the head's initialisation and of the data order.
    pub seed: u64,
    /// Longest input in tokens (longer ones are cut, keeping `[SEP]` last).
    pub max_length: usize,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            optim: AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..Default::default()
            },
            max_grad_norm: 1.0,
            seed: 42,
            max_length: 128,
        }
    }
}

/// What is classified: single texts, or text pairs (`second[i]` goes with `texts[i]`).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The (first) texts.
    pub texts: &'a [&'a str],
    /// The second texts of pairs, as many as `texts`.
    pub second: Option<&'a [&'a str]>,
}

impl<'a> Inputs<'a> {
    /// Single texts.
    pub fn single(texts: &'a [&'a str]) -> Self {
        Self {
            texts,
            second: None,
        }
    }

    /// Text pairs.
    pub fn pairs(texts: &'a [&'a str], second: &'a [&'a str]) -> Self {
        Self {
            texts,
            second: Some(second),
        }
    }
}

/// A linear head on mean-pooled states: `logits = W · mean(h) + b`.
pub struct MeanHead {
    /// `[labels, d]`.
    pub weight: Var,
    /// `[labels]`.
    pub bias: Var,
}

impl MeanHead {
    /// PyTorch `nn.Linear` initialisation (uniform in ±1/√d), seeded.
    pub fn init(d: usize, labels: usize, seed: u64, device: &candle_core::Device) -> Result<Self> {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bound = 1.0 / (d as f32).sqrt();
        let w: Vec<f32> = (0..labels * d)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        let b: Vec<f32> = (0..labels).map(|_| rng.gen_range(-bound..bound)).collect();
        Ok(Self {
            weight: Var::from_tensor(&Tensor::from_vec(w, (labels, d), device)?)?,
            bias: Var::from_tensor(&Tensor::from_vec(b, labels, device)?)?,
        })
    }

    /// File name of a saved head, beside the adapter's files.
    pub const FILE: &'static str = "classifier_head.safetensors";

    /// Writes `weight` and `bias` to `dir/classifier_head.safetensors`.
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        let path = dir.join(Self::FILE);
        let tensors = [
            ("weight", self.weight.as_tensor().clone()),
            ("bias", self.bias.as_tensor().clone()),
        ];
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None)
            .map_err(|e| Error::InvalidArgument(format!("serialising the head: {e}")))?;
        crate::adapter::native::write_atomic(&path, &bytes)
    }

    /// Reads a head saved by [`save`](Self::save) for hidden size `d`.
    pub fn load(dir: &std::path::Path, d: usize, device: &candle_core::Device) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let bad = |msg: String| Error::BadWeights {
            path: path.clone(),
            msg,
        };
        let t = candle_core::safetensors::load(&path, device).map_err(|e| bad(e.to_string()))?;
        let (w, b) = match (t.get("weight"), t.get("bias")) {
            (Some(w), Some(b)) => (w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
            _ => return Err(bad("needs `weight` and `bias`".into())),
        };
        let (labels, wd) = w.dims2().map_err(|e| bad(e.to_string()))?;
        if wd != d || b.dims() != [labels] {
            return Err(bad(format!(
                "head shapes {:?} and {:?} do not fit hidden size {d}",
                w.dims(),
                b.dims()
            )));
        }
        Ok(Self {
            weight: Var::from_tensor(&w)?,
            bias: Var::from_tensor(&b)?,
        })
    }

    /// Logits `[b, labels]` from hidden states `[b, t, d]` and the real-token mask.
    pub fn forward(&self, hidden: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        let m: Vec<f32> = mask
            .iter()
            .flat_map(|row| {
                let n = row.iter().filter(|&&x| x != 0).count().max(1) as f32;
                row.iter().map(move |&x| if x != 0 { 1.0 / n } else { 0.0 })
            })
            .collect();
        let m = Tensor::from_vec(m, (b, t, 1), hidden.device())?.to_dtype(hidden.dtype())?;
        let pooled = hidden.broadcast_mul(&m)?.sum(1)?;
        Ok(pooled
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

/// Tokenised, padded batch: ids `[b, t]`, token types `[b, t]`, mask rows and lengths. With
/// `pairs`, each text is encoded with its partner (`[CLS] a [SEP] b [SEP]`).
#[allow(clippy::type_complexity)]
fn batch(
    tok: &Tokenizer,
    texts: &[&str],
    pairs: Option<&[&str]>,
    max_length: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor, Vec<Vec<u32>>, Vec<usize>)> {
    let mut enc: Vec<(Vec<u32>, Vec<u32>)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| match pairs {
            Some(p) => tok.encode_pair(t, p.get(i).copied().unwrap_or("")),
            None => tok.encode_with_special_tokens(t).map(|ids| {
                let n = ids.len();
                (ids, vec![0; n])
            }),
        })
        .collect::<Result<_>>()?;
    for (ids, types) in &mut enc {
        if ids.len() > max_length {
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_length);
            types.truncate(max_length);
            *ids.last_mut().expect("non-empty") = last;
        }
    }
    let t = enc.iter().map(|e| e.0.len()).max().unwrap_or(1).max(1);
    let lens: Vec<usize> = enc.iter().map(|e| e.0.len()).collect();
    let mask = lens
        .iter()
        .map(|&n| (0..t).map(|j| u32::from(j < n)).collect())
        .collect();
    let pad = |v: &[u32]| {
        v.iter()
            .copied()
            .chain(std::iter::repeat(0))
            .take(t)
            .collect::<Vec<_>>()
    };
    let ids: Vec<u32> = enc.iter().flat_map(|e| pad(&e.0)).collect();
    let types: Vec<u32> = enc.iter().flat_map(|e| pad(&e.1)).collect();
    Ok((
        Tensor::from_vec(ids, (texts.len(), t), device)?,
        Tensor::from_vec(types, (texts.len(), t), device)?,
        mask,
        lens,
    ))
}

/// Logits of `texts` through the encoder (with `adapter`'s edits, if any) and `head`.
pub fn classify_logits(
    encoder: &Encoder,
    tok: &Tokenizer,
    adapter: Option<&mut Adapter>,
    head: &MeanHead,
    inputs: Inputs,
    max_length: usize,
) -> Result<Tensor> {
    let dev = head.weight.device().clone();
    let (ids, types, mask, lens) = batch(tok, inputs.texts, inputs.second, max_length, &dev)?;
    let hidden = match adapter {
        Some(a) => {
            // Positions count over the whole input (`f1` is `[CLS]`).
            crate::model::Hooks::prepare(a, &PromptLayout::unpadded(lens))?;
            encoder.forward_with_types(&ids, Some(&types), Some(&mask), a)?
        }
        None => encoder.forward_with_types(&ids, Some(&types), Some(&mask), &mut NoHooks)?,
    };
    head.forward(&hidden, &mask)
}

/// Predicted labels of `texts`, in batches.
pub fn predict(
    encoder: &Encoder,
    tok: &Tokenizer,
    mut adapter: Option<&mut Adapter>,
    head: &MeanHead,
    inputs: Inputs,
    cfg: &ClassifyConfig,
) -> Result<Vec<usize>> {
    let (texts, pairs) = (inputs.texts, inputs.second);
    if let Some(a) = adapter.as_deref_mut() {
        a.set_training(false);
    }
    let mut out = Vec::with_capacity(texts.len());
    let size = cfg.batch_size.max(1);
    for (k, chunk) in texts.chunks(size).enumerate() {
        let pair_chunk = pairs.map(|p| &p[(k * size).min(p.len())..((k + 1) * size).min(p.len())]);
        let logits = classify_logits(
            encoder,
            tok,
            adapter.as_deref_mut(),
            head,
            Inputs {
                texts: chunk,
                second: pair_chunk,
            },
            cfg.max_length,
        )?;
        let am: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        out.extend(am.into_iter().map(|x| x as usize));
    }
    Ok(out)
}

/// Trains `head` (and `adapter`, when given) on `(texts, labels)`; returns each step's loss.
pub fn train_classifier(
    encoder: &Encoder,
    tok: &Tokenizer,
    mut adapter: Option<&mut Adapter>,
    head: &MeanHead,
    inputs: Inputs,
    labels: &[usize],
    cfg: &ClassifyConfig,
) -> Result<Vec<f64>> {
    let (texts, pairs) = (inputs.texts, inputs.second);
    if texts.is_empty()
        || texts.len() != labels.len()
        || pairs.is_some_and(|p| p.len() != texts.len())
    {
        return Err(Error::InvalidArgument(format!(
            "{} texts, {} labels and {} second texts: need the same number, at least one",
            texts.len(),
            labels.len(),
            pairs.map_or(texts.len(), <[&str]>::len)
        )));
    }
    let num_labels = head.weight.as_tensor().dim(0)?;
    if let Some(&bad) = labels.iter().find(|&&l| l >= num_labels) {
        return Err(Error::InvalidArgument(format!(
            "label {bad} but the head has {num_labels} classes"
        )));
    }
    let mut vars = vec![
        ("head.weight".to_string(), head.weight.clone()),
        ("head.bias".to_string(), head.bias.clone()),
    ];
    if let Some(a) = adapter.as_deref_mut() {
        a.set_training(true);
        vars.extend(a.vars());
    }
    let mut opt = AdamW::new(vars.clone(), cfg.optim)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    let steps_per_epoch = texts.len().div_ceil(cfg.batch_size.max(1));
    let total = steps_per_epoch * cfg.epochs;
    let mut losses = Vec::with_capacity(total);
    let dev = head.weight.device().clone();
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let batch_pairs: Option<Vec<&str>> = pairs.map(|p| {
                chunk
                    .iter()
                    .map(|&i| p.get(i).copied().unwrap_or(""))
                    .collect()
            });
            let targets: Vec<u32> = chunk.iter().map(|&i| labels[i] as u32).collect();
            let logits = classify_logits(
                encoder,
                tok,
                adapter.as_deref_mut(),
                head,
                Inputs {
                    texts: &batch_texts,
                    second: batch_pairs.as_deref(),
                },
                cfg.max_length,
            )?
            .to_dtype(DType::F32)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let t = Tensor::from_vec(targets, (chunk.len(), 1), &dev)?;
            let loss = logp.gather(&t, 1)?.mean_all()?.neg()?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the loss became {value} at step {}",
                    losses.len() + 1
                )));
            }
            let mut grads = match adapter.as_deref() {
                Some(a) => a.backward(&loss)?,
                None => loss.backward()?,
            };
            clip_grad_norm(&mut grads, &vars, cfg.max_grad_norm)?;
            // Linear decay to zero, as the causal trainer's default.
            let lr = cfg.optim.lr * (1.0 - losses.len() as f64 / total as f64);
            opt.step(&grads, lr)?;
            losses.push(value);
        }
    }
    Ok(losses)
}
