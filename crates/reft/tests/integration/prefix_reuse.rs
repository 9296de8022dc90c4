//! Prompt-prefix reuse on the real model: a prefill that starts from cached keys and values of
//! its prompt's first positions (a shared chat system prompt) decodes what a full prefill does,
//! with an adapter editing positions past the reused part, and the engine reuses prefixes only
//! where no adapter edits them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use candle_core::DType;
use reft::engine::{Engine, EngineLimits, PrefixCache, Submission, Update};
use reft::generate::{DecodeBatch, Event, GenerationConfig, Request};
use reft::model::{NoHooks, PrefixKv};

use crate::common::{adapter_from_spec, chat_ids, smollm2, smollm2_shared};

const LAST: &str = r#"{"interventions": [{"kind": "loreft", "layers": 15, "component": "block_output", "rank": 4, "positions": "l1"}]}"#;
const FIRST: &str = r#"{"interventions": [{"kind": "loreft", "layers": "10;20", "component": "block_output", "rank": 4, "positions": "f1+l1"}]}"#;

fn config(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        stop_ids: smollm2().tokenizer.eos_ids.clone(),
        ..Default::default()
    }
}

/// Decodes `batch` to the end, returning each tag's tokens.
fn run(mut batch: DecodeBatch) -> HashMap<u64, Vec<u32>> {
    let lm = smollm2();
    let mut got = HashMap::new();
    while !batch.is_empty() {
        let mut on_event = |e: Event| {
            if let Event::Done { tag, generation } = e {
                got.insert(tag, generation.ids);
            }
        };
        batch
            .step(&lm.decoder, &lm.tokenizer, None, &mut on_event)
            .unwrap();
    }
    got
}

fn requests(prompts: &[Vec<u32>], tokens: usize) -> Vec<Request> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            tag: i as u64,
            prompt: p.clone(),
            cfg: config(tokens),
        })
        .collect()
}

/// Rows with long, short and no reused prefixes in one left-padded pass, under an adapter at
/// the last prompt position, decode the tokens of a full prefill, and the first positions'
/// keys and values come back out of the batch as they went in.
#[test]
fn a_prefill_from_cached_prefixes_decodes_what_a_full_one_does() {
    let lm = smollm2();
    let (dec, tok) = (&lm.decoder, &lm.tokenizer);
    let prompts = vec![
        chat_ids(lm, "Write a short story about the number 7."),
        chat_ids(lm, "Write a haiku about rain, with a twist at the end."),
        chat_ids(lm, "Hi"),
        chat_ids(lm, "What is 2 + 2?"),
    ];
    let mut adapter = adapter_from_spec(dec, LAST, 5, DType::F32);
    let full = DecodeBatch::prefill(dec, tok, requests(&prompts, 20), &mut adapter).unwrap();
    // Cache the first prompt whole, from a plain pass, as the engine does.
    let first = DecodeBatch::prefill(dec, tok, requests(&prompts[..1], 1), &mut NoHooks).unwrap();
    let mut cache = PrefixCache::new(1 << 30);
    let kv = first.prompt_kv(0, prompts[0].len()).unwrap();
    cache.insert(&prompts[0], &kv).unwrap();
    let shared = cache.cached_len(&prompts[1]);
    assert!(shared > 10, "the chat template's system prompt is shared");
    let reused: Vec<Option<PrefixKv>> = vec![
        cache.lookup(&prompts[0], prompts[0].len() - 1).unwrap(),
        cache.lookup(&prompts[1], shared - 3).unwrap(),
        None,
        cache.lookup(&prompts[3], usize::MAX).unwrap(),
    ];
    assert_eq!(reused[0].as_ref().unwrap().len, prompts[0].len() - 1);
    assert_eq!(reused[1].as_ref().unwrap().len, shared - 3);
    let lens: Vec<usize> = reused
        .iter()
        .map(|r| r.as_ref().map_or(0, |r| r.len))
        .collect();
    let reusing =
        DecodeBatch::prefill_reusing(dec, tok, requests(&prompts, 20), reused, &mut adapter)
            .unwrap();
    // What went into the cache comes back out of the batch (real positions only).
    let back = reusing.prompt_kv(1, shared - 3).unwrap();
    let want = cache.lookup(&prompts[1], shared - 3).unwrap().unwrap();
    for (l, ((k, v), (wk, wv))) in back.layers.iter().zip(&want.layers).enumerate() {
        assert_eq!(crate::common::max_abs_diff(k, wk), 0.0, "keys, layer {l}");
        assert_eq!(crate::common::max_abs_diff(v, wv), 0.0, "values, layer {l}");
    }
    let (want, got) = (run(full), run(reusing));
    let plain = run(DecodeBatch::prefill(dec, tok, requests(&prompts, 20), &mut NoHooks).unwrap());
    assert_ne!(
        want, plain,
        "the adapter changes nothing: the test would prove little"
    );
    for i in 0..prompts.len() as u64 {
        assert_eq!(
            got[&i], want[&i],
            "prompt {i}, {} positions reused",
            lens[i as usize]
        );
    }
    // A reused prefix must leave a token to run.
    let whole = cache.lookup(&prompts[0], usize::MAX).unwrap();
    let refused = DecodeBatch::prefill_reusing(
        dec,
        tok,
        requests(&prompts[..1], 4),
        vec![whole],
        &mut NoHooks,
    );
    assert!(refused.is_err());
}

/// What one engine request gets: its tokens.
fn answer(engine: &Engine, prompt: Vec<u32>, adapters: &[&str], tokens: usize) -> Vec<u32> {
    let rx = engine
        .submit(Submission {
            prompt,
            cfg: config(tokens),
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
        })
        .unwrap();
    loop {
        match rx.recv().unwrap() {
            Update::Done(g) => return g.ids,
            Update::Failed(f) => panic!("{f}"),
            Update::Text(_) => {}
        }
    }
}

/// Requests that share the chat system prompt reuse its keys and values after the first, on
/// the base model and under an adapter that edits only the last position; an adapter that
/// edits the first position reuses nothing; every answer equals the engine's without reuse.
#[test]
fn the_engine_reuses_prefixes_no_adapter_edits() {
    let lm = smollm2_shared();
    let make = |spec: &str| adapter_from_spec(&lm.decoder, spec, 9, DType::F32);
    let start = |bytes: usize| {
        let registry = vec![
            ("last".to_string(), make(LAST)),
            ("first".to_string(), make(FIRST)),
        ];
        let limits = EngineLimits {
            prefix_cache_bytes: bytes,
            ..EngineLimits::default()
        };
        Engine::start(std::sync::Arc::clone(lm), registry, limits).unwrap()
    };
    let (with, without) = (start(1 << 30), start(0));
    let prompt = |i: usize| chat_ids(lm, &format!("Write a short story about the number {i}."));
    let cases: [(usize, &[&str]); 5] = [
        (0, &[]),
        (1, &[]),
        (2, &["last"]),
        (3, &["first"]),
        (1, &[]),
    ];
    let cached = |e: &Engine| e.stats().prompt_tokens_cached.load(Ordering::SeqCst);
    let mut reuses = Vec::new();
    for (i, adapters) in cases {
        let before = cached(&with);
        let got = answer(&with, prompt(i), adapters, 12);
        reuses.push(cached(&with) - before);
        assert_eq!(
            got,
            answer(&without, prompt(i), adapters, 12),
            "prompt {i} {adapters:?}"
        );
    }
    let n = prompt(1).len();
    let shared = {
        let (a, b) = (prompt(0), prompt(1));
        a.iter().zip(&b).take_while(|(x, y)| x == y).count()
    };
    // Nothing cached yet; the shared part; the shared part under `last` (its edit is at the
    // end); nothing under `first`; all but the last token of a prompt seen before.
    assert_eq!(reuses, [0, shared, shared, 0, n - 1]);
    assert_eq!(cached(&without), 0);
    assert!(with.stats().prefix_cache_bytes.load(Ordering::SeqCst) > 0);
}
