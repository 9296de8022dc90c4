//! The running decode batch on the real model: sequences that join while others decode, with
//! their own adapters and settings, and sequences that leave early, each get the tokens they get
//! alone (greedy; the check is exact token equality, which holds while batched products differ
//! from single ones only in float summation order).

use std::collections::HashMap;

use candle_core::DType;
use reft::generate::{generate, DecodeBatch, Event, GenerationConfig, Request};
use reft::model::{Hooks, NoHooks};

use crate::common::{adapter_from_spec, chat_ids, smollm2};

const LOREFT: &str = r#"{"interventions": [{"kind": "loreft", "layers": "10;20", "component": "block_output", "rank": 4, "positions": "f1+l1"}]}"#;

fn config(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        stop_ids: smollm2().tokenizer.eos_ids.clone(),
        ..Default::default()
    }
}

/// What `generate` gives `prompt` alone.
fn alone(prompt: &[u32], cfg: &GenerationConfig, hooks: &mut dyn Hooks) -> Vec<u32> {
    let lm = smollm2();
    let out = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[prompt.to_vec()],
        cfg,
        hooks,
        &mut |_, _| {},
    )
    .unwrap();
    out[0].ids.clone()
}

#[test]
fn sequences_that_join_and_leave_get_what_they_get_alone() {
    let lm = smollm2();
    let (dec, tok) = (&lm.decoder, &lm.tokenizer);
    let prompts = [
        chat_ids(lm, "Write a short story about the number 7."),
        chat_ids(lm, "Hi"),
        chat_ids(
            lm,
            "Name three colours of the rainbow, please, in a short list.",
        ),
        chat_ids(lm, "What is the capital of France?"),
    ];
    let budgets = [24, 6, 20, 16];
    let mut adapter = adapter_from_spec(dec, LOREFT, 3, DType::F32);
    // Requests 0 and 1 on the base model, 2 and 3 with the adapter.
    let want: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            let hooks: &mut dyn Hooks = if i >= 2 { &mut adapter } else { &mut NoHooks };
            alone(&prompts[i], &config(budgets[i]), hooks)
        })
        .collect();
    let plain_2 = alone(&prompts[2], &config(budgets[2]), &mut NoHooks);
    assert_ne!(
        want[2], plain_2,
        "the adapter changes nothing: the test would prove little"
    );

    let request = |i: usize| Request {
        tag: i as u64,
        prompt: prompts[i].clone(),
        cfg: config(budgets[i]),
    };
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut streamed: HashMap<u64, String> = HashMap::new();
    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut on_event = |e: Event| match e {
        Event::Text { tag, text } => streamed.entry(tag).or_default().push_str(&text),
        Event::Done { tag, generation } => {
            texts.insert(tag, generation.text);
            assert!(
                got.insert(tag, generation.ids).is_none(),
                "{tag} ended twice"
            );
        }
    };
    // 0 and 1 start together; 2 joins after three steps (its own prefill, with the adapter);
    // 3 joins after three more, when 1 (6 tokens) has already left.
    let mut batch =
        DecodeBatch::prefill(dec, tok, vec![request(0), request(1)], &mut NoHooks).unwrap();
    for _ in 0..3 {
        batch.step(dec, tok, None, &mut on_event).unwrap();
    }
    let joining = DecodeBatch::prefill(dec, tok, vec![request(2)], &mut adapter).unwrap();
    batch.merge(joining).unwrap();
    assert_eq!(batch.len(), 3);
    for _ in 0..4 {
        batch.step(dec, tok, None, &mut on_event).unwrap();
    }
    assert_eq!(batch.tags(), vec![0, 2], "1 has used its 6 tokens and left");
    let joining = DecodeBatch::prefill(dec, tok, vec![request(3)], &mut adapter).unwrap();
    batch.merge(joining).unwrap();
    while !batch.is_empty() {
        batch.step(dec, tok, None, &mut on_event).unwrap();
    }
    for (i, w) in want.iter().enumerate() {
        let tag = i as u64;
        assert_eq!(&got[&tag], w, "request {i}");
        assert_eq!(
            streamed.get(&tag).cloned().unwrap_or_default(),
            texts[&tag],
            "request {i}"
        );
    }
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_are_unchanged() {
    let lm = smollm2();
    let (dec, tok) = (&lm.decoder, &lm.tokenizer);
    let prompts = [
        chat_ids(lm, "Tell me about the sea."),
        chat_ids(lm, "Write a short story about the number 12."),
    ];
    let want = alone(&prompts[1], &config(12), &mut NoHooks);
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            tag: i as u64,
            prompt: p.clone(),
            cfg: config(12),
        })
        .collect();
    let mut batch = DecodeBatch::prefill(dec, tok, requests, &mut NoHooks).unwrap();
    let mut done = Vec::new();
    let mut on_event = |e: Event| {
        if let Event::Done { tag, generation } = e {
            done.push((tag, generation.ids));
        }
    };
    batch.step(dec, tok, None, &mut on_event).unwrap();
    batch.step(dec, tok, None, &mut on_event).unwrap();
    batch.cancel(&[0]).unwrap();
    assert_eq!(batch.tags(), vec![1]);
    while !batch.is_empty() {
        batch.step(dec, tok, None, &mut on_event).unwrap();
    }
    assert_eq!(done, vec![(1, want)]);
}
