//! Generation on the real model: batching with left padding, stop strings, streaming.

mod common;

use candle_core::Device;
use reft::generate::{generate, FinishReason, GenerationConfig};
use reft::model::NoHooks;
use reft::template::Message;
use reft::LanguageModel;

fn model() -> LanguageModel {
    let path = common::smollm2_path();
    LanguageModel::load(
        path.to_str().unwrap(),
        &Device::Cpu,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap()
}

fn chat_ids(lm: &LanguageModel, q: &str) -> Vec<u32> {
    lm.tokenizer
        .encode(
            &lm.chat_template
                .render(&[Message::new("user", q)], true)
                .unwrap(),
        )
        .unwrap()
}

#[test]
fn left_padded_batch_equals_one_prompt_at_a_time() {
    let lm = model();
    let prompts = vec![
        chat_ids(
            &lm,
            "What is the capital of France? Answer in one sentence.",
        ),
        chat_ids(&lm, "Hi"),
        chat_ids(
            &lm,
            "Name three colours of the rainbow, please, in a short list.",
        ),
    ];
    assert!(prompts[0].len() != prompts[1].len());
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let batch = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
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

#[test]
fn stop_strings_cut_the_text_and_streaming_matches() {
    let lm = model();
    let p = chat_ids(
        &lm,
        "What is the capital of France? Answer in one sentence.",
    );
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
    let lm = model();
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
