//! Generation on the real model: batching with left padding, stop strings, streaming; and on
//! tiny-gpt2: the KV cache against full passes, with and without an intervention.

use crate::common;
use crate::common::{chat_ids, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use reft::adapter::Adapter;
use reft::generate::{generate, FinishReason, GenerationConfig};
use reft::model::llama::ForwardInput;
use reft::model::{Hooks, KvCache, NoHooks, PromptLayout};
use reft::template::Message;
use reft::LanguageModel;

#[test]
fn left_padded_batch_equals_one_prompt_at_a_time() {
    let lm = common::smollm2();
    let prompts = vec![
        chat_ids(lm, "What is the capital of France? Answer in one sentence."),
        chat_ids(lm, "Hi"),
        chat_ids(
            lm,
            "Name three colours of the rainbow, please, in a short list.",
        ),
    ];
    assert_batch_equals_single(lm, &prompts, 16);
}

/// Greedy generation of `prompts` as one left-padded batch gives each prompt the tokens it
/// gets alone.
fn assert_batch_equals_single(lm: &LanguageModel, prompts: &[Vec<u32>], max_new_tokens: usize) {
    assert!(prompts[0].len() != prompts[1].len());
    let cfg = GenerationConfig {
        max_new_tokens,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let batch = generate(
        &lm.decoder,
        &lm.tokenizer,
        prompts,
        &cfg,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    for (p, b) in prompts.iter().zip(&batch) {
        let single = generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(p),
            &cfg,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            b.ids, single[0].ids,
            "batched vs single: {:?} vs {:?}",
            b.text, single[0].text
        );
    }
}

/// tiny-gpt2's LoReFT at layer 1 on the last prompt token, with a bias large enough to move
/// the logits of a random tiny model.
fn gpt2_loreft(lm: &LanguageModel) -> Adapter {
    let spec =
        r#"{"interventions": [{"kind": "loreft", "layers": 1, "rank": 4, "positions": "l1"}]}"#;
    let adapter = common::adapter_from_spec(&lm.decoder, spec, 7, DType::F32);
    for (name, v) in adapter.vars() {
        if name.ends_with(".b") {
            v.set(&(v.as_tensor() * 20.0).unwrap()).unwrap();
        }
    }
    adapter
}

/// Logits `[len, vocab]` of one full, uncached pass over `seq` whose first `prompt_len` tokens
/// are the prompt (what `hooks` edit), with optional explicit positions.
fn full_pass(
    lm: &LanguageModel,
    seq: &[u32],
    prompt_len: usize,
    hooks: &mut dyn Hooks,
    positions: Option<&[Vec<u32>]>,
) -> Tensor {
    hooks
        .prepare(&PromptLayout::unpadded(vec![prompt_len]))
        .unwrap();
    let ids = Tensor::new(seq, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let input = ForwardInput {
        position_ids: positions,
        ..ForwardInput::new(&ids)
    };
    let h = lm.decoder.forward(&input, hooks, None).unwrap();
    lm.decoder.lm_head(&h.get(0).unwrap()).unwrap()
}

/// Logits `[len − prompt_len + 1, vocab]` at the prompt's last token and every later one, the
/// way generation computes them: the prompt with `hooks` into the KV cache, then one token
/// per pass without hooks.
fn cached_passes(
    lm: &LanguageModel,
    seq: &[u32],
    prompt_len: usize,
    hooks: &mut dyn Hooks,
) -> Tensor {
    hooks
        .prepare(&PromptLayout::unpadded(vec![prompt_len]))
        .unwrap();
    let mut cache = KvCache::new(lm.decoder.config().num_layers);
    let mut rows = Vec::new();
    for (k, chunk) in [&seq[..prompt_len]]
        .into_iter()
        .chain(seq[prompt_len..].chunks(1))
        .enumerate()
    {
        let ids = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let input = ForwardInput::new(&ids);
        let h = if k == 0 {
            lm.decoder.forward(&input, hooks, Some(&mut cache))
        } else {
            lm.decoder.forward(&input, &mut NoHooks, Some(&mut cache))
        }
        .unwrap();
        let last = h.get(0).unwrap().get(chunk.len() - 1).unwrap();
        rows.push(lm.decoder.lm_head(&last).unwrap());
    }
    Tensor::stack(&rows, 0).unwrap()
}

/// tiny-gpt2 (learned positions) through the KV cache equals full uncached passes: the logits
/// of a prompt and a fixed continuation fed one token at a time, plain and with a LoReFT on the
/// last prompt token (which moves them); the learned positions matter (shifting them moves the
/// logits); greedy `generate` gives the ids of greedy full passes; and generation stops at the
/// end of the position table.
#[test]
fn gpt2_cached_passes_equal_uncached_full_passes() {
    let (_dir, lm) = common::tiny_gpt2_lm();
    let prompt = lm.tokenizer.encode("the cat sat on the mat").unwrap();
    let mut seq = prompt.clone();
    seq.extend(lm.tokenizer.encode(" and then it ran in").unwrap());
    let p = prompt.len();
    let mut adapter = gpt2_loreft(&lm);
    let n = 12;
    let cfg = GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    let mut by_hooks = Vec::new();
    for intervened in [false, true] {
        let hooks: &mut dyn Hooks = if intervened {
            &mut adapter
        } else {
            &mut NoHooks
        };
        let full = full_pass(&lm, &seq, p, hooks, None)
            .narrow(0, p - 1, seq.len() - p + 1)
            .unwrap();
        let cached = cached_passes(&lm, &seq, p, hooks);
        let err = max_abs_diff(&cached, &full);
        assert!(
            err < 1e-4,
            "intervened {intervened}: cached vs full differ by {err}"
        );
        eprintln!("intervened {intervened}: cached vs full max |Δlogit| {err:.2e}");
        by_hooks.push(full);

        let out = generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(&prompt),
            &cfg,
            hooks,
            &mut |_, _| {},
        )
        .unwrap();
        let mut greedy = prompt.clone();
        for _ in 0..n {
            let logits: Vec<f32> = full_pass(&lm, &greedy, p, hooks, None)
                .get(greedy.len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]));
            greedy.push(best.unwrap() as u32);
        }
        assert_eq!(out[0].ids, greedy[p..], "intervened {intervened}");
    }
    let moved = max_abs_diff(&by_hooks[0], &by_hooks[1]);
    eprintln!("the intervention moves the logits by up to {moved:.3}");
    assert!(
        moved > 1e-2,
        "the intervention moved the logits by only {moved}"
    );
    let shifted: Vec<u32> = (1..=seq.len() as u32).collect();
    let shifted = full_pass(
        &lm,
        &seq,
        p,
        &mut NoHooks,
        Some(std::slice::from_ref(&shifted)),
    )
    .narrow(0, p - 1, seq.len() - p + 1)
    .unwrap();
    let moved = max_abs_diff(&shifted, &by_hooks[0]);
    assert!(
        moved > 1e-2,
        "shifted positions moved the logits by only {moved}"
    );

    // The learned position table ends the context: generation stops there.
    assert_eq!(lm.decoder.context_limit(), Some(256));
    let long = GenerationConfig {
        max_new_tokens: 1000,
        ..Default::default()
    };
    let out = generate(
        &lm.decoder,
        &lm.tokenizer,
        std::slice::from_ref(&prompt),
        &long,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(out[0].ids.len(), 256 - p);
    assert_eq!(out[0].finish, FinishReason::Length);
}

/// tiny-gpt2 in a left-padded batch with the KV cache (as `generate` runs it): the prompt pass
/// and a decode step give each row the logits its sequence gets alone, so the learned positions
/// skip the padding.
#[test]
fn gpt2_left_padded_batch_equals_single_sequences() {
    let (_dir, lm) = common::tiny_gpt2_lm();
    let prompts: Vec<Vec<u32>> = ["the cat sat on the mat", "hi there"]
        .iter()
        .map(|t| lm.tokenizer.encode(t).unwrap())
        .collect();
    let next = [lm.tokenizer.encode(" a").unwrap()[0], 77];
    let w = prompts.iter().map(Vec::len).max().unwrap();
    let pads: Vec<usize> = prompts.iter().map(|p| w - p.len()).collect();
    let mut flat = Vec::new();
    let mut mask: Vec<Vec<u32>> = Vec::new();
    let mut positions: Vec<Vec<u32>> = Vec::new();
    for (p, &pad) in prompts.iter().zip(&pads) {
        flat.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        mask.push((0..w).map(|j| u32::from(j >= pad)).collect());
        positions.push((0..w).map(|j| j.saturating_sub(pad) as u32).collect());
    }
    let dev = Device::Cpu;
    let mut cache = KvCache::new(lm.decoder.config().num_layers);
    // Logits at the last column of a pass over `ids` `[2, t]`, through the cache.
    let mut pass = |ids: &Tensor, mask: &[Vec<u32>], positions: &[Vec<u32>]| -> Tensor {
        let input = ForwardInput {
            input_ids: ids,
            attention_mask: Some(mask),
            position_ids: Some(positions),
            start: None,
        };
        let h = lm
            .decoder
            .forward(&input, &mut NoHooks, Some(&mut cache))
            .unwrap();
        let t = h.dim(1).unwrap();
        lm.decoder.lm_head(&h.narrow(1, t - 1, 1).unwrap()).unwrap()
    };
    let prefill = pass(
        &Tensor::from_vec(flat, (2, w), &dev).unwrap(),
        &mask,
        &positions,
    );
    for m in mask.iter_mut() {
        m.push(1);
    }
    let step_pos: Vec<Vec<u32>> = prompts.iter().map(|p| vec![p.len() as u32]).collect();
    let ids = Tensor::new(&next, &dev).unwrap().unsqueeze(1).unwrap();
    let step = pass(&ids, &mask, &step_pos);
    for (i, p) in prompts.iter().enumerate() {
        let mut seq = p.clone();
        seq.push(next[i]);
        let alone = full_pass(&lm, &seq, p.len(), &mut NoHooks, None);
        let want = alone.narrow(0, p.len() - 1, 2).unwrap();
        let got = Tensor::cat(&[prefill.get(i).unwrap(), step.get(i).unwrap()], 0).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-4, "row {i}: batched vs alone differ by {err}");
    }
    assert_batch_equals_single(&lm, &prompts, 8);
}

/// A GPT-2 folder with no chat template gets the ChatML fallback, like a Llama folder.
#[test]
fn gpt2_folder_without_template_gets_chatml() {
    let (_dir, lm) = common::tiny_gpt2_lm();
    let text = lm
        .chat_template
        .render(&[Message::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(lm.tokenizer.eos_ids, vec![common::gpt2_folder::EOS]);
    assert_eq!(
        lm.tokenizer
            .decode(&lm.tokenizer.encode(&text).unwrap(), false)
            .unwrap(),
        text
    );
}

#[test]
fn stop_strings_cut_the_text_and_streaming_matches() {
    let lm = common::smollm2();
    let p = chat_ids(lm, "What is the capital of France? Answer in one sentence.");
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        stop_strings: vec![" Paris".into()],
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[p],
        &cfg,
        &mut NoHooks,
        &mut |_, t| streamed.push_str(t),
    )
    .unwrap();
    assert_eq!(out[0].text, "The capital of France is");
    assert_eq!(out[0].finish, FinishReason::StopString);
    assert_eq!(streamed, out[0].text);
}

#[test]
fn length_limit_is_reported() {
    let lm = common::smollm2();
    let p = lm.tokenizer.encode("Once upon a time").unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        ..Default::default()
    };
    let out = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[p],
        &cfg,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(out[0].ids.len(), 5);
    assert_eq!(out[0].finish, FinishReason::Length);
}
