//! The fused training path for hook-free layers and the LM-head loss against the composed
//! candle ops: same hidden states at real positions, same loss, same gradient into the edit,
//! same new keys/values, on tiny-llama (grouped-query attention) and tiny-qwen2 (q/k/v biases), with the
//! trainer's layout — a cached prefix left-padded to the longest and right-padded tails — and
//! with a hook inside a layer that splits the fused run in two.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use reft::model::llama::ForwardInput;
use reft::model::{Component, Decoder, FnHooks, KvCache, NoHooks, Site};

struct Run {
    loss: f32,
    grad: Vec<f32>,
    hidden: Vec<Vec<f32>>,
    keys: Vec<Vec<f32>>,
}

/// Three sequences whose first `p0[i]` tokens are cached, then a training-style pass over the
/// rest with an additive edit at `block_output` of layer 0 (and optionally a hook inside
/// layer `split`).
fn run(model: &Decoder, fused: bool, split: Option<usize>) -> Run {
    model.set_fused_layers(fused);
    let dev = Device::Cpu;
    let n_layers = model.config().num_layers;
    let d = model.config().hidden_size;
    let seqs: [&[u32]; 3] = [
        &[5, 17, 42, 99, 7, 3, 8, 1],
        &[11, 250, 33, 8, 9],
        &[4, 4, 90, 21, 77, 13, 2],
    ];
    let p0 = [3usize, 1, 4];
    let pmax = *p0.iter().max().unwrap();
    let tails: Vec<usize> = seqs.iter().zip(p0).map(|(s, p)| s.len() - p).collect();
    let t = *tails.iter().max().unwrap();
    // Each prefix on its own, then left-padded into one cache.
    let mut layers: Vec<Option<(Tensor, Tensor)>> = vec![None; n_layers];
    let mut per: Vec<KvCache> = Vec::new();
    for (s, &p) in seqs.iter().zip(&p0) {
        let ids = Tensor::new(&s[..p], &dev).unwrap().unsqueeze(0).unwrap();
        let mut kv = KvCache::new(n_layers);
        model
            .forward(&ForwardInput::new(&ids), &mut NoHooks, Some(&mut kv))
            .unwrap();
        per.push(kv);
    }
    for (l, slot) in layers.iter_mut().enumerate() {
        let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = per
            .iter()
            .zip(p0)
            .map(|(kv, p)| {
                let (k, v) = kv.layer(l).unwrap();
                (
                    k.pad_with_zeros(2, pmax - p, 0).unwrap(),
                    v.pad_with_zeros(2, pmax - p, 0).unwrap(),
                )
            })
            .unzip();
        *slot = Some((Tensor::cat(&ks, 0).unwrap(), Tensor::cat(&vs, 0).unwrap()));
    }
    let mut cache = KvCache::from_layers(layers);
    let mut flat = Vec::new();
    for (s, &p) in seqs.iter().zip(&p0) {
        flat.extend(s[p..].iter().copied().chain(std::iter::repeat(0)).take(t));
    }
    let ids = Tensor::from_vec(flat, (3, t), &dev).unwrap();
    let mask: Vec<Vec<u32>> = (0..3)
        .map(|b| {
            (0..pmax + t)
                .map(|j| {
                    u32::from(if j < pmax {
                        j >= pmax - p0[b]
                    } else {
                        j - pmax < tails[b]
                    })
                })
                .collect()
        })
        .collect();
    let positions: Vec<Vec<u32>> = (0..3)
        .map(|b| (0..t).map(|c| (p0[b] + c) as u32).collect())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let init: Vec<f32> = (0..3 * t * d).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let delta = Var::from_vec(init, (3, t, d), &dev).unwrap();
    let mut sites = vec![Site::new(0, Component::BlockOutput)];
    if let Some(l) = split {
        sites.push(Site::new(l, Component::AttentionOutput));
    }
    let mut hooks = FnHooks::new(sites, |site: Site, h: &Tensor, _| {
        Ok(Some(if site.component == Component::BlockOutput {
            (h + delta.as_tensor())?
        } else {
            (h * 0.5)?
        }))
    });
    let input = ForwardInput {
        input_ids: &ids,
        attention_mask: Some(&mask),
        position_ids: Some(&positions),
        start: None,
    };
    let h = model.forward(&input, &mut hooks, Some(&mut cache)).unwrap();
    // A loss on the real rows only: logits of each real position against a fixed target.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, &len) in tails.iter().enumerate() {
        for c in 0..len {
            rows.push((b * t + c) as u32);
            targets.push(((b * 31 + c * 7) % model.config().vocab_size) as u32);
        }
    }
    let picked = h
        .reshape((3 * t, d))
        .unwrap()
        .index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 0)
        .unwrap();
    let loss = model.head_loss(&picked, &targets).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(delta.as_tensor()).unwrap();
    let real_rows = |x: &Tensor| -> Vec<f32> {
        x.reshape((3 * t, d))
            .unwrap()
            .index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let keys = (0..n_layers)
        .map(|l| {
            let (k, _) = cache.layer(l).unwrap();
            // Real new positions only: the cache holds [b, nkv, pmax + t, hd].
            (0..3)
                .flat_map(|b| {
                    k.get(b)
                        .unwrap()
                        .narrow(1, pmax, tails[b])
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        })
        .collect();
    Run {
        loss: loss.to_scalar().unwrap(),
        grad: real_rows(grad),
        hidden: vec![real_rows(&h)],
        keys,
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(name: &str, split: Option<usize>) {
    let model = tiny_decoder(name, DType::F32);
    let composed = run(&model, false, split);
    let fused = run(&model, true, split);
    let rel_loss = (fused.loss - composed.loss).abs() / composed.loss.abs();
    assert!(
        rel_loss < 1e-5,
        "{name}: loss {} vs {}",
        fused.loss,
        composed.loss
    );
    let gh = max_rel(&fused.hidden[0], &composed.hidden[0]);
    assert!(gh < 1e-5, "{name}: hidden states differ by {gh}");
    let gg = max_rel(&fused.grad, &composed.grad);
    assert!(gg < 1e-4, "{name}: gradients differ by {gg}");
    assert!(
        composed.grad.iter().any(|x| x.abs() > 1e-4),
        "{name}: gradient is zero"
    );
    for (l, (a, b)) in fused.keys.iter().zip(&composed.keys).enumerate() {
        let e = max_rel(a, b);
        assert!(e < 1e-5, "{name}: new keys of layer {l} differ by {e}");
    }
}

#[test]
fn fused_layers_match_composed_ops_on_tiny_llama() {
    check("tiny-llama", None);
}

#[test]
fn fused_layers_match_composed_ops_on_tiny_qwen2_with_biases() {
    check("tiny-qwen2", None);
}

#[test]
fn a_hook_inside_a_layer_splits_the_fused_run() {
    check("tiny-llama", Some(2));
}
