//! Decoding steps on slices (`model::decode_step`) against the composed candle ops: the same
//! hidden states step after step for a left-padded batch of three sequences of different
//! lengths, on tiny-llama (grouped-query attention), tiny-qwen2 (q/k/v biases) and SmolLM2 (its
//! GGUF blocks, so the multi-row block kernel), and the same greedy tokens through `generate`.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use reft::generate::{generate, GenerationConfig};
use reft::model::llama::ForwardInput;
use reft::model::{Decoder, KvCache, NoHooks};

/// Prefills three left-padded prompts into one cache, then decodes five fixed tokens; returns
/// each step's final hidden states `[3, d]`.
fn steps(model: &Decoder, slices: bool) -> Vec<Vec<f32>> {
    model.set_fused_layers(slices);
    let dev = Device::Cpu;
    let prompts: [&[u32]; 3] = [&[5, 17, 42, 99, 7], &[11, 250], &[4, 90, 21, 77]];
    let t = prompts.iter().map(|p| p.len()).max().unwrap();
    let mut ids = Vec::new();
    let mut mask: Vec<Vec<u32>> = Vec::new();
    let mut pos: Vec<Vec<u32>> = Vec::new();
    for p in prompts {
        let pad = t - p.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        mask.push((0..t).map(|j| u32::from(j >= pad)).collect());
        pos.push((0..t).map(|j| j.saturating_sub(pad) as u32).collect());
    }
    let mut cache = KvCache::new(model.config().num_layers);
    let input = ForwardInput {
        input_ids: &Tensor::from_vec(ids, (3, t), &dev).unwrap(),
        attention_mask: Some(&mask),
        position_ids: Some(&pos),
        start: None,
    };
    model
        .forward(&input, &mut NoHooks, Some(&mut cache))
        .unwrap();
    let mut out = Vec::new();
    for step in 0..5u32 {
        for m in mask.iter_mut() {
            m.push(1);
        }
        let next: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| vec![p.len() as u32 + step])
            .collect();
        let ids = Tensor::from_vec(vec![3 + step, 60 + step, 7 * step + 1], (3, 1), &dev).unwrap();
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: Some(&mask),
            position_ids: Some(&next),
            start: None,
        };
        let h = model
            .forward(&input, &mut NoHooks, Some(&mut cache))
            .unwrap();
        out.push(h.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    model.set_fused_layers(true);
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().flatten().map(|x| x.abs()).fold(0f32, f32::max);
    (diff, scale)
}

#[test]
fn decode_steps_on_slices_equal_the_composed_ops_on_tiny_models() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let model = tiny_decoder(name, DType::F32);
        let (fast, composed) = (steps(&model, true), steps(&model, false));
        let (diff, scale) = max_diff(&fast, &composed);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{name}: {diff} (values up to {scale})"
        );
    }
}

#[test]
fn decode_steps_on_slices_equal_the_composed_ops_on_smollm2() {
    let lm = reft::LanguageModel::load(
        smollm2_path().to_str().unwrap(),
        &Device::Cpu,
        &reft::LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let (fast, composed) = (steps(&lm.decoder, true), steps(&lm.decoder, false));
    let (diff, scale) = max_diff(&fast, &composed);
    // Same dequantized weights; only the order of summation differs (the composed path
    // multiplies one row at a time, the slice path a tile of rows).
    assert!(diff <= 1e-4 * scale, "{diff} (values up to {scale})");
    // And the same greedy continuations for a batch of chat prompts.
    let prompts: Vec<Vec<u32>> = [
        "Name a colour.",
        "Write a haiku about rain.",
        "What is 2+2?",
    ]
    .iter()
    .map(|q| chat_ids(&lm, q))
    .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        ..Default::default()
    };
    let run = |slices: bool| {
        lm.decoder.set_fused_layers(slices);
        let out = generate(
            &lm.decoder,
            &lm.tokenizer,
            &prompts,
            &cfg,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .unwrap();
        lm.decoder.set_fused_layers(true);
        out.into_iter().map(|g| g.ids).collect::<Vec<_>>()
    };
    assert_eq!(run(true), run(false));
}
