//! BERT-family encoders (BERT, RoBERTa, MiniLM and other sentence-transformers exports) with the
//! same hook points as the decoders, and their sequence-classification heads.
//!
//! Post-LayerNorm blocks: `h' = LN(h + Attn(h))`, `out = LN(h' + FFN(h'))`, exact-erf GELU, learned
//! absolute positions (RoBERTa's start after the padding id and skip padding tokens), token-type
//! embeddings. Hook components follow pyvene's BERT mapping: `attention_output` is the attention
//! block's output after its LayerNorm, `mlp_output` the feed-forward block's output after its
//! LayerNorm (the same tensor as `block_output`, which hooks see next). Every op is composed of
//! differentiable candle ops, so gradients reach interventions at any layer. On the CPU in f32
//! each run of hook-free layers is one fused op instead ([`crate::cpu::encoder_fused`]: the same
//! maths with an input-only backward, padding rows skipped, so the output is zero there); the
//! composed ops serve other devices and dtypes, batches with an example of no real token, and
//! stay the reference the fused op is tested against.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::blocks::Norm;
use super::{has_inner_hooks, hook_free_run_end, run_hook, Component, Hooks, Site, SiteContext};
use crate::cpu::encoder_fused::{EncoderGeometry, EncoderLayerWeights, FusedEncoderLayers};
use crate::ops::{softmax_last_dim, FrozenLinear, FusedLinears};
use crate::weights::{LoadContext, WeightSource};
use crate::{Error, Result};

/// Which encoder family (decides positions and the classification head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// BERT and its descendants (MiniLM): positions from 0, pooler + linear classifier.
    Bert,
    /// RoBERTa: positions after the padding id, dense + tanh + linear classifier on `<s>`.
    Roberta,
}

/// An encoder's shape, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Family.
    pub kind: EncoderKind,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Token types.
    pub type_vocab_size: usize,
    /// Padding id (RoBERTa's positions depend on it).
    pub pad_token_id: u32,
    /// Classes of the classification head, when the checkpoint is a `…ForSequenceClassification`.
    pub num_labels: Option<usize>,
    /// Dropout probability of a classification head in training: `classifier_dropout`, or
    /// `hidden_dropout_prob` when that is absent or null (as transformers' heads do; 0.1 when
    /// neither is given).
    pub classifier_dropout: f64,
}

impl EncoderConfig {
    /// Reads a Hugging Face `config.json` of a BERT-family model.
    pub fn from_hf_json(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::BadConfig {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let kind = match v["model_type"].as_str() {
            Some("bert") => EncoderKind::Bert,
            Some("roberta") => EncoderKind::Roberta,
            other => return Err(bad(format!("not a BERT-family model: {other:?}"))),
        };
        let num = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing `{k}`")))
        };
        if let Some(act) = v["hidden_act"].as_str().filter(|a| *a != "gelu") {
            return Err(bad(format!("hidden_act `{act}` is not supported (gelu)")));
        }
        let classifier = v["architectures"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x.as_str()
                    .is_some_and(|s| s.ends_with("ForSequenceClassification"))
            })
        });
        let num_labels = classifier.then(|| {
            v["id2label"].as_object().map_or_else(
                || v["num_labels"].as_u64().unwrap_or(2) as usize,
                |m| m.len(),
            )
        });
        Ok(Self {
            kind,
            hidden_size: num("hidden_size")?,
            num_layers: num("num_hidden_layers")?,
            num_heads: num("num_attention_heads")?,
            intermediate_size: num("intermediate_size")?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            vocab_size: num("vocab_size")?,
            max_position_embeddings: num("max_position_embeddings")?,
            type_vocab_size: v["type_vocab_size"].as_u64().unwrap_or(2) as usize,
            pad_token_id: v["pad_token_id"]
                .as_u64()
                .unwrap_or(if kind == EncoderKind::Roberta { 1 } else { 0 })
                as u32,
            num_labels,
            classifier_dropout: v["classifier_dropout"]
                .as_f64()
                .or_else(|| v["hidden_dropout_prob"].as_f64())
                .unwrap_or(0.1),
        })
    }
}

struct Layer {
    /// q, k and v, stacked (the parts are views into the stacked weight, so the fused path
    /// reads one `[3d, d]` matrix at no extra memory).
    qkv: FusedLinears,
    attn_out: FrozenLinear,
    attn_norm: Norm,
    up: FrozenLinear,
    down: FrozenLinear,
    out_norm: Norm,
}

enum Head {
    /// BERT: `classifier(tanh(pooler(h₀)))`.
    Pooler {
        pooler: FrozenLinear,
        classifier: FrozenLinear,
    },
    /// RoBERTa: `out_proj(tanh(dense(h₀)))`.
    Roberta {
        dense: FrozenLinear,
        out_proj: FrozenLinear,
    },
}

/// A frozen BERT-family encoder.
pub struct Encoder {
    cfg: EncoderConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    head: Option<Head>,
    head_weights: std::collections::HashMap<&'static str, (Tensor, Tensor)>,
    device: Device,
    /// Whether passes with a graph run hook-free layers as one fused op (see
    /// [`crate::cpu::encoder_fused`]).
    fused_layers: AtomicBool,
}

impl Encoder {
    /// Loads `cfg`'s weights from a Hugging Face folder (names with or without the `bert.` /
    /// `roberta.` prefix, as sentence-transformers exports them).
    pub fn load(
        source: &WeightSource,
        cfg: EncoderConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let ctx = LoadContext::safetensors(device, dtype);
        let family = match cfg.kind {
            EncoderKind::Bert => "bert",
            EncoderKind::Roberta => "roberta",
        };
        let prefix = if source.contains(&format!("{family}.embeddings.word_embeddings.weight")) {
            format!("{family}.")
        } else {
            String::new()
        };
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let get = |name: &str, shape: &[usize]| source.get(name, shape, &ctx);
        let linear = |name: &str, out: usize, inp: usize| -> Result<FrozenLinear> {
            Ok(FrozenLinear::new(
                get(&format!("{name}.weight"), &[out, inp])?,
                Some(get(&format!("{name}.bias"), &[out])?),
            ))
        };
        let norm = |name: &str| Norm::layer_from(source, name, d, &ctx);
        let e = format!("{prefix}embeddings");
        let word = get(&format!("{e}.word_embeddings.weight"), &[cfg.vocab_size, d])?;
        let position = get(
            &format!("{e}.position_embeddings.weight"),
            &[cfg.max_position_embeddings, d],
        )?;
        let token_type = get(
            &format!("{e}.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, d],
        )?;
        let embed_norm = norm(&format!("{e}.LayerNorm"))?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("{prefix}encoder.layer.{l}");
            let a = format!("{p}.attention.self");
            layers.push(Layer {
                qkv: FusedLinears::new(vec![
                    linear(&format!("{a}.query"), d, d)?,
                    linear(&format!("{a}.key"), d, d)?,
                    linear(&format!("{a}.value"), d, d)?,
                ])?,
                attn_out: linear(&format!("{p}.attention.output.dense"), d, d)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: linear(&format!("{p}.intermediate.dense"), i, d)?,
                down: linear(&format!("{p}.output.dense"), d, i)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        // The checkpoint's head layers, kept by their unprefixed names: the frozen head of
        // `classify` is built from them, and trainable heads may start from them.
        let pair = |name: &str, out: usize, inp: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                get(&format!("{name}.weight"), &[out, inp])?,
                get(&format!("{name}.bias"), &[out])?,
            ))
        };
        let mut head_weights = std::collections::HashMap::new();
        // BERT's classifier reads the pooler: a classifier checkpoint must have it.
        let pooler = format!("{prefix}pooler.dense");
        let bert_classifier = cfg.num_labels.is_some() && cfg.kind == EncoderKind::Bert;
        if bert_classifier || source.contains(&format!("{pooler}.weight")) {
            head_weights.insert("pooler.dense", pair(&pooler, d, d)?);
        }
        match (cfg.num_labels, cfg.kind) {
            (None, _) => {}
            (Some(n), EncoderKind::Bert) => {
                head_weights.insert("classifier", pair("classifier", n, d)?);
            }
            (Some(n), EncoderKind::Roberta) => {
                head_weights.insert("classifier.dense", pair("classifier.dense", d, d)?);
                head_weights.insert("classifier.out_proj", pair("classifier.out_proj", n, d)?);
            }
        }
        let frozen = |name: &str| {
            let (w, b) = &head_weights[name];
            FrozenLinear::new(w.clone(), Some(b.clone()))
        };
        let head = match (cfg.num_labels, cfg.kind) {
            (None, _) => None,
            (Some(_), EncoderKind::Bert) => Some(Head::Pooler {
                pooler: frozen("pooler.dense"),
                classifier: frozen("classifier"),
            }),
            (Some(_), EncoderKind::Roberta) => Some(Head::Roberta {
                dense: frozen("classifier.dense"),
                out_proj: frozen("classifier.out_proj"),
            }),
        };
        Ok(Self {
            cfg,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            head,
            head_weights,
            device: device.clone(),
            fused_layers: AtomicBool::new(true),
        })
    }

    /// Turns the fused training path (hook-free layers as one op) on (the default) or off.
    /// Both give the same losses and gradients; off, every op is a candle op (slower).
    pub fn set_fused_layers(&self, on: bool) {
        self.fused_layers.store(on, Ordering::Relaxed);
    }

    /// Whether passes take the fused path: on, f32 weights, on the CPU (the fused kernels are
    /// CPU code; other devices and dtypes run the composed ops). Unlike the decoder's, it also
    /// serves passes without a graph: an encoder has no cache for the layers below the lowest
    /// edit, so they are recomputed every training step, and inference gains the same.
    pub fn runs_fused_layers(&self) -> bool {
        self.fused_layers.load(Ordering::Relaxed)
            && self.word.dtype() == DType::F32
            && self.device.is_cpu()
    }

    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// A linear layer of the checkpoint's heads as `(weight [out, in], bias [out])`, by its
    /// name without the family prefix: `pooler.dense` (BERT checkpoints usually have it, even
    /// plain `BertModel` exports), and in `…ForSequenceClassification` checkpoints `classifier`
    /// (BERT) or `classifier.dense` and `classifier.out_proj` (RoBERTa). `None` when absent.
    /// Trainable heads start from these, as transformers' heads do when the weights exist.
    pub fn head_linear(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.head_weights.get(name).map(|(w, b)| (w, b))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the encoder on `input_ids` `[b, t]` with `attention_mask` (1 = real token; `None`:
    /// all real) and returns the last hidden states `[b, t, d]`; `hooks` see and may replace the
    /// states at the sites they list.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        self.forward_with_types(input_ids, None, attention_mask, hooks)
    }

    /// Like [`forward`](Self::forward), with token types `[b, t]` (u32; the second text of a
    /// pair is type 1 in BERT). `None`: all type 0.
    pub fn forward_with_types(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&[Vec<u32>]>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (d, nh) = (self.cfg.hidden_size, self.cfg.num_heads);
        let eps = self.cfg.layer_norm_eps;
        let sites = hooks.sites();
        let ctx = SiteContext { past_len: 0 };
        let mut hook = |layer: usize, c: Component, h: Tensor| -> Result<Tensor> {
            run_hook(hooks, &sites, &ctx, Site::new(layer, c), h)
        };
        let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
        // Positions: BERT counts from 0; RoBERTa from pad + 1 over non-padding tokens.
        let mut pos = Vec::with_capacity(b * t);
        for row in ids.chunks(t) {
            let mut n = 0u32;
            for &id in row {
                pos.push(match self.cfg.kind {
                    EncoderKind::Bert => n,
                    EncoderKind::Roberta if id == self.cfg.pad_token_id => self.cfg.pad_token_id,
                    EncoderKind::Roberta => self.cfg.pad_token_id + 1 + n,
                });
                n += 1;
                if self.cfg.kind == EncoderKind::Roberta && id == self.cfg.pad_token_id {
                    n -= 1;
                }
            }
        }
        let pos = Tensor::from_vec(pos, b * t, &self.device)?;
        let flat = input_ids.flatten_all()?;
        let types = match token_type_ids {
            Some(tt) => self.token_type.index_select(&tt.flatten_all()?, 0)?,
            None => self
                .token_type
                .get(0)?
                .unsqueeze(0)?
                .broadcast_as((b * t, d))?,
        };
        let emb =
            ((self.word.index_select(&flat, 0)? + self.position.index_select(&pos, 0)?)? + types)?;
        let mut h = self.embed_norm.forward(&emb.reshape((b, t, d))?, eps)?;
        let mask = match attention_mask {
            Some(m) => {
                let data: Vec<f32> = m
                    .iter()
                    .flat_map(|row| row.iter().map(|&x| if x == 0 { f32::MIN } else { 0.0 }))
                    .collect();
                Some(Tensor::from_vec(data, (b, 1, 1, t), &self.device)?.to_dtype(h.dtype())?)
            }
            None => None,
        };
        // On the fused path every run of hook-free layers is one op, with a graph or without
        // (layers below the lowest edit of a training pass have none, and are a sixth of the
        // work of an edit at every layer); batches it cannot pack stay composed.
        let geo = match self.runs_fused_layers() && h.dtype() == DType::F32 {
            true => EncoderGeometry::new((b, t, d, nh), eps, attention_mask)?.map(Arc::new),
            false => None,
        };
        let n_layers = self.layers.len();
        let inner_hooks = |l: usize| has_inner_hooks(&sites, l);
        let mut l = 0;
        while l < n_layers {
            h = hook(l, Component::BlockInput, h)?;
            if let Some(geo) = geo.as_ref().filter(|_| !inner_hooks(l)) {
                // A run of layers with no hook inside: one fused op.
                let end = hook_free_run_end(&sites, l, n_layers);
                h = self.fused_run(l..end, &h, geo)?;
                h = hook(end - 1, Component::BlockOutput, h)?;
                l = end;
                continue;
            }
            let mut layer_hook = |c: Component, h: Tensor| hook(l, c, h);
            let m = self.composed_layer(&self.layers[l], &h, mask.as_ref(), &mut layer_hook)?;
            h = hook(l, Component::BlockOutput, m)?;
            l += 1;
        }
        Ok(h)
    }

    /// One layer through composed candle ops on `h` `[b, t, d]` with the additive key mask
    /// `[b, 1, 1, t]`; `hook` sees the attention and feed-forward outputs.
    fn composed_layer(
        &self,
        layer: &Layer,
        h: &Tensor,
        mask: Option<&Tensor>,
        hook: &mut dyn FnMut(Component, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let nh = self.cfg.num_heads;
        let hd = d / nh;
        let eps = self.cfg.layer_norm_eps;
        let heads = |x: &Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let qkv = layer.qkv.forward(h)?;
        let (q, k, v) = (heads(&qkv[0])?, heads(&qkv[1])?, heads(&qkv[2])?);
        let mut scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let ctxt = softmax_last_dim(&scores)?.matmul(&v)?;
        let ctxt = ctxt.transpose(1, 2)?.reshape((b, t, d))?;
        let a = layer
            .attn_norm
            .forward(&(layer.attn_out.forward(&ctxt)? + h)?, eps)?;
        let a = hook(Component::AttentionOutput, a)?;
        let m = layer.down.forward(&layer.up.forward(&a)?.gelu_erf()?)?;
        let m = layer.out_norm.forward(&(m + &a)?, eps)?;
        hook(Component::MlpOutput, m)
    }

    /// Layers `range` as one fused op on `h` `[b, t, d]` (see [`crate::cpu::encoder_fused`]).
    fn fused_run(
        &self,
        range: std::ops::Range<usize>,
        h: &Tensor,
        geo: &Arc<EncoderGeometry>,
    ) -> Result<Tensor> {
        let layers = self.layers[range]
            .iter()
            .map(Layer::fused_weights)
            .collect::<Result<Vec<_>>>()?;
        let op = FusedEncoderLayers {
            layers,
            geo: geo.clone(),
            keep: h.track_op(),
            state: Arc::new(Mutex::new(Vec::new())),
        };
        Ok(h.contiguous()?.apply_op1(op)?)
    }

    /// The classification head's logits `[b, labels]` from last hidden states `[b, t, d]`
    /// (it reads the first token).
    pub fn classify(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        match &self.head {
            Some(Head::Pooler { pooler, classifier }) => {
                classifier.forward(&pooler.forward(&first)?.tanh()?)
            }
            Some(Head::Roberta { dense, out_proj }) => {
                out_proj.forward(&dense.forward(&first)?.tanh()?)
            }
            None => Err(Error::InvalidArgument(
                "this encoder checkpoint has no classification head".into(),
            )),
        }
    }
}

impl Layer {
    /// The layer's weights as the fused op reads them (clones of the tensors, no copies).
    fn fused_weights(&self) -> Result<EncoderLayerWeights> {
        let linear = |l: &FrozenLinear| -> Result<(Tensor, Tensor)> {
            let bias = l.bias().ok_or_else(|| {
                Error::InvalidArgument("the fused encoder layers need linear biases".into())
            })?;
            Ok((l.weight().contiguous()?, bias.contiguous()?))
        };
        let norm = |n: &Norm| -> Result<(Tensor, Tensor)> {
            match n {
                Norm::Layer { weight, bias } => Ok((weight.contiguous()?, bias.contiguous()?)),
                Norm::Rms(_) => Err(Error::InvalidArgument(
                    "the fused encoder layers need LayerNorms".into(),
                )),
            }
        };
        let qkv_bias = self.qkv.bias().ok_or_else(|| {
            Error::InvalidArgument("the fused encoder layers need q/k/v biases".into())
        })?;
        let (o, o_bias) = linear(&self.attn_out)?;
        let (up, up_bias) = linear(&self.up)?;
        let (down, down_bias) = linear(&self.down)?;
        Ok(EncoderLayerWeights {
            qkv: self.qkv.weight().contiguous()?,
            qkv_bias: qkv_bias.contiguous()?,
            o,
            o_bias,
            norm1: norm(&self.attn_norm)?,
            up,
            up_bias,
            down,
            down_bias,
            norm2: norm(&self.out_norm)?,
        })
    }
}
