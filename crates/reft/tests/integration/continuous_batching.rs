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

/// One prefill for requests on different adapters (reft::adapter::PerExample): each group's
/// adapters edit only its own rows, so each request gets what it gets alone, and the clash
/// check sees only a group's own rows.
#[test]
fn one_prefill_serves_requests_for_different_adapters() {
    use reft::adapter::{AdapterSet, PerExample};
    let lm = smollm2();
    let (dec, tok) = (&lm.decoder, &lm.tokenizer);
    let prompts = [
        chat_ids(lm, "Write a short story about the number 4."),
        chat_ids(lm, "Hi"),
        chat_ids(
            lm,
            "Name three colours of the rainbow, please, in a short list.",
        ),
        chat_ids(lm, "What is the capital of France?"),
    ];
    let spec_b = r#"{"interventions": [{"kind": "loreft", "layers": "6;15", "rank": 4, "positions": "f2+l2"}]}"#;
    let mut a = adapter_from_spec(dec, LOREFT, 3, DType::F32);
    let mut b = adapter_from_spec(dec, spec_b, 5, DType::F32);
    // Row 0 with `b`, row 1 plain, rows 2 and 3 with `a`.
    let want: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            let hooks: &mut dyn Hooks = match i {
                2 | 3 => &mut a,
                0 => &mut b,
                _ => &mut NoHooks,
            };
            alone(&prompts[i], &config(16), hooks)
        })
        .collect();
    for i in [0, 2] {
        let plain = alone(&prompts[i], &config(16), &mut NoHooks);
        assert_ne!(want[i], plain, "row {i}: the adapter changes nothing");
    }
    let mut hooks = PerExample {
        groups: vec![
            (
                AdapterSet { adapters: vec![a] },
                vec![false, false, true, true],
            ),
            (
                AdapterSet { adapters: vec![b] },
                vec![true, false, false, false],
            ),
        ],
    };
    let requests = (0..4)
        .map(|i| Request {
            tag: i as u64,
            prompt: prompts[i].clone(),
            cfg: config(16),
        })
        .collect();
    let mut batch = DecodeBatch::prefill(dec, tok, requests, &mut hooks).unwrap();
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    while !batch.is_empty() {
        batch
            .step(dec, tok, None, &mut |e| {
                if let Event::Done { tag, generation } = e {
                    got.insert(tag, generation.ids);
                }
            })
            .unwrap();
    }
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&got[&(i as u64)], w, "request {i}");
    }
}

/// The engine: 12 requests spread over the base model and three adapters, submitted from four
/// threads at once, each get the tokens `generate` gives them alone, streamed text included.
#[test]
fn engine_serves_mixed_adapters_in_one_batch_exactly() {
    use reft::engine::{Engine, EngineLimits, Submission, Update};
    let lm = crate::common::smollm2_shared();
    let specs = [
        LOREFT,
        r#"{"interventions": [{"kind": "loreft", "layers": 15, "component": "block_output", "rank": 4, "positions": "l1"}]}"#,
        r#"{"interventions": [{"kind": "direft", "layers": "5;25", "component": "block_output", "rank": 2, "positions": "f2+l2"}]}"#,
    ];
    let make = |k: usize| adapter_from_spec(&lm.decoder, specs[k], 11 + k as u64, DType::F32);
    let names = ["a", "b", "c"];
    let registry = (0..3).map(|k| (names[k].to_string(), make(k))).collect();
    let engine =
        Engine::start(std::sync::Arc::clone(lm), registry, EngineLimits::default()).unwrap();
    let request = |i: usize| {
        let prompt = chat_ids(lm, &format!("Write a short story about the number {i}."));
        let adapters = match i % 4 {
            0 => Vec::new(),
            k => vec![names[k - 1].to_string()],
        };
        (prompt, adapters, config(8 + i))
    };
    let mut want = Vec::new();
    for i in 0..12 {
        let (prompt, adapters, cfg) = request(i);
        let mut own = adapters.first().map(|_| make(i % 4 - 1));
        let hooks: &mut dyn Hooks = match own.as_mut() {
            Some(a) => a,
            None => &mut NoHooks,
        };
        want.push(alone(&prompt, &cfg, hooks));
    }
    let engine = &engine;
    let got: Vec<(usize, Vec<u32>, String, String)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || {
                    let receivers: Vec<_> = (w..12)
                        .step_by(4)
                        .map(|i| {
                            let (prompt, adapters, cfg) = request(i);
                            let sub = Submission {
                                prompt,
                                cfg,
                                adapters,
                            };
                            (i, engine.submit(sub).unwrap())
                        })
                        .collect();
                    receivers
                        .into_iter()
                        .map(|(i, rx)| {
                            let mut streamed = String::new();
                            loop {
                                match rx.recv().unwrap() {
                                    Update::Text(t) => streamed.push_str(&t),
                                    Update::Done(g) => return (i, g.ids, g.text, streamed),
                                    Update::Failed(e) => panic!("request {i} failed: {e}"),
                                }
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(got.len(), 12);
    for (i, ids, text, streamed) in got {
        assert_eq!(ids, want[i], "request {i} (adapter {:?})", request(i).1);
        assert_eq!(streamed, text, "request {i}");
    }
    assert_eq!(
        engine
            .stats()
            .running
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // An unknown adapter is refused at once; a client that goes away frees its sequence, and
    // the next request still runs.
    let unknown = Submission {
        prompt: request(0).0,
        cfg: config(4),
        adapters: vec!["nope".into()],
    };
    assert!(engine
        .submit(unknown)
        .unwrap_err()
        .to_string()
        .contains("nope"));
    let long = Submission {
        prompt: request(1).0,
        cfg: config(200),
        adapters: vec!["a".into()],
    };
    let rx = engine.submit(long).unwrap();
    assert!(matches!(rx.recv().unwrap(), Update::Text(_)));
    drop(rx);
    let (prompt, adapters, cfg) = request(3);
    let rx = engine
        .submit(Submission {
            prompt,
            cfg,
            adapters,
        })
        .unwrap();
    let last = loop {
        if let Update::Done(g) = rx.recv().unwrap() {
            break g;
        }
    };
    assert_eq!(last.ids, want[3]);
    // The abandoned request leaves at the first step whose text it cannot take.
    let s = engine.stats();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.running.load(std::sync::atomic::Ordering::SeqCst) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned sequence still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(s.generated_tokens.load(std::sync::atomic::Ordering::SeqCst) < 12 * 20 + 200);
    let by_adapter = s.requests_by_adapter.lock().unwrap().clone();
    assert_eq!(by_adapter[""], 3, "{by_adapter:?}");
    assert_eq!(by_adapter["a"], 4, "{by_adapter:?}");

    // Adapters come and go while the engine runs: a loaded one serves exactly what it serves
    // alone; an unloaded one is refused from then on; a name is loaded once.
    engine.load_adapter("d", make(1)).unwrap();
    assert!(engine.load_adapter("d", make(1)).is_err());
    let (prompt, _, cfg) = request(6);
    let rx = engine
        .submit(Submission {
            prompt,
            cfg,
            adapters: vec!["d".into()],
        })
        .unwrap();
    let loaded = loop {
        if let Update::Done(g) = rx.recv().unwrap() {
            break g;
        }
    };
    assert_eq!(loaded.ids, want[6], "the runtime-loaded copy of `b`");
    engine.unload_adapter("b").unwrap();
    assert_eq!(engine.adapter_names(), vec!["a", "c", "d"]);
    let (prompt, adapters, cfg) = request(2);
    let refused = engine
        .submit(Submission {
            prompt,
            cfg,
            adapters,
        })
        .unwrap_err();
    assert!(
        refused.to_string().contains("unknown adapter `b`"),
        "{refused}"
    );
    assert!(engine.unload_adapter("b").is_err());
}
