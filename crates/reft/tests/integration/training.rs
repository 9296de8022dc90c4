//! Training on `tiny-llama` (and `tiny-gpt2`): the prefix cache changes nothing but speed, and an
//! interrupted and resumed run ends with the same adapter as an uninterrupted one.

use crate::common::*;
use candle_core::{DType, Device};
use reft::adapter::Adapter;
use reft::data::Example;
use reft::generate::{generate, GenerationConfig};
use reft::tokenizer::Tokenizer;
use reft::train::{AdamWConfig, Event, Sample, Schedule, TrainConfig, Trainer, SAMPLE_TOKENS};
use reft::LanguageModel;

/// tiny-llama with a stand-in tokenizer (training never tokenises here: examples are ids).
fn tiny() -> LanguageModel {
    tiny_lm("tiny-llama")
}

/// A tiny fixture model with a stand-in tokenizer: one word `w<id>` per id, so that generated
/// ids decode to text that shows them.
fn tiny_lm(name: &str) -> LanguageModel {
    let decoder = tiny_decoder(name, DType::F32);
    let tok_dir = tempfile::tempdir().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..decoder.config().vocab_size)
        .map(|i| (format!("w{i}"), i.into()))
        .collect();
    let tok_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    std::fs::write(tok_dir.path().join("tokenizer.json"), tok_json.to_string()).unwrap();
    let tokenizer = Tokenizer::from_file(&tok_dir.path().join("tokenizer.json")).unwrap();
    LanguageModel {
        decoder,
        tokenizer,
        chat_template: reft::template::ChatTemplate::new(reft::template::CHATML, "", ""),
        path: fixture("models").join(name),
    }
}

fn data() -> Vec<Example> {
    (0..7u32)
        .map(|i| Example {
            prompt_ids: (0..5 + i % 3)
                .map(|k| (i * 37 + k * 11) % 500 + 3)
                .collect(),
            response_ids: (0..3 + i % 4).map(|k| (i * 13 + k * 7) % 500 + 3).collect(),
        })
        .collect()
}

fn adapter(lm: &LanguageModel, spec: &str) -> Adapter {
    seeded(lm, spec, 9)
}

fn seeded(lm: &LanguageModel, spec: &str, seed: u64) -> Adapter {
    adapter_from_spec(&lm.decoder, spec, seed, DType::F32)
}

const SPEC: &str = r#"{"interventions": [{"kind": "loreft", "layers": "1;2", "rank": 2, "positions": "f1+l1", "tied": false}]}"#;

fn config(cache: bool) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 3,
        grad_accum: 2,
        optim: AdamWConfig {
            lr: 2e-2,
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine,
        warmup_ratio: 0.2,
        max_grad_norm: 1.0,
        seed: 5,
        cache_prefix: cache,
        cache_budget_bytes: 1 << 30,
        checkpoint_every: Some(2),
        eval_samples: 0,
    }
}

fn losses(t: &Trainer) -> Vec<f64> {
    t.metrics.iter().map(|m| m.loss).collect()
}

#[test]
fn prefix_cache_gives_the_same_losses_llama() {
    let a = prefix_cache_gives_the_same_losses("tiny-llama");
    assert!(
        a.last().unwrap() < a.first().unwrap(),
        "the loss did not go down: {a:?}"
    );
}

/// GPT-2 through the composed ops: its learned positions must follow the cached prefix's
/// offset exactly as RoPE positions do.
#[test]
fn prefix_cache_gives_the_same_losses_gpt2() {
    prefix_cache_gives_the_same_losses("tiny-gpt2");
}

/// Trains the same LoReFT with and without the prefix cache: the same loss at every step, and
/// a lower loss on the (fixed) evaluation set after training than before. Returns the step
/// losses.
fn prefix_cache_gives_the_same_losses(name: &str) -> Vec<f64> {
    let lm = tiny_lm(name);
    let spec =
        r#"{"interventions": [{"kind": "loreft", "layers": 2, "rank": 2, "positions": "l1"}]}"#;
    let mut with = Trainer::new(&lm, adapter(&lm, spec), data(), data(), config(true)).unwrap();
    let mut without = Trainer::new(&lm, adapter(&lm, spec), data(), data(), config(false)).unwrap();
    let before = with.eval_loss().unwrap().unwrap();
    with.run(&mut |_| {}, &|| false).unwrap();
    without.run(&mut |_| {}, &|| false).unwrap();
    let (a, b) = (losses(&with), losses(&without));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    let after = with.eval_loss().unwrap().unwrap();
    eprintln!("{name}: evaluation loss {before:.4} before training, {after:.4} after");
    assert!(
        after < before,
        "{name}: the evaluation loss did not go down: {before} → {after}"
    );
    a
}

/// With `eval_samples`, each epoch reports the adapter's greedy answers to the first held-out
/// prompts and appends them to samples.jsonl, and training is exactly what it is without: the
/// same losses and the same final adapter. The last epoch's answers are those of the final
/// adapter.
#[test]
fn held_out_samples_each_epoch_leave_training_unchanged() {
    let lm = tiny();
    let out = tempfile::tempdir().unwrap();
    let held_out: Vec<Example> = data().into_iter().rev().take(3).collect();
    let sampled_cfg = TrainConfig {
        eval_samples: 2,
        ..config(true)
    };
    let mut sampled = Trainer::new(
        &lm,
        adapter(&lm, SPEC),
        data(),
        held_out.clone(),
        sampled_cfg,
    )
    .unwrap()
    .with_output(out.path())
    .unwrap();
    let mut reported: Vec<Sample> = Vec::new();
    sampled
        .run(
            &mut |e| {
                if let Event::Epoch { samples, .. } = e {
                    reported.extend_from_slice(samples)
                }
            },
            &|| false,
        )
        .unwrap();
    let mut plain = Trainer::new(
        &lm,
        adapter(&lm, SPEC),
        data(),
        held_out.clone(),
        config(true),
    )
    .unwrap();
    plain.run(&mut |_| {}, &|| false).unwrap();

    assert_eq!(losses(&sampled), losses(&plain));
    for ((n, x), (_, y)) in sampled
        .adapter
        .tensors()
        .unwrap()
        .iter()
        .zip(&plain.adapter.tensors().unwrap())
    {
        assert_eq!(max_abs_diff(x, y), 0.0, "{n}");
    }

    let epochs: Vec<usize> = reported.iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, [1, 1, 2, 2, 3, 3]);
    let file: Vec<Sample> = std::fs::read_to_string(out.path().join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(file, reported);
    let words = |ids: &[u32]| {
        ids.iter()
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(reported[4].prompt, words(&held_out[0].prompt_ids));
    assert_eq!(reported[5].reference, words(&held_out[1].response_ids));

    let prompts: Vec<Vec<u32>> = held_out[..2].iter().map(|e| e.prompt_ids.clone()).collect();
    let cfg = GenerationConfig {
        max_new_tokens: SAMPLE_TOKENS,
        ..Default::default()
    };
    plain.adapter.set_training(false);
    plain.adapter.refresh_params().unwrap();
    let direct = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
        &cfg,
        &mut plain.adapter,
        &mut |_, _| {},
    )
    .unwrap();
    for (s, g) in reported[4..].iter().zip(&direct) {
        assert_eq!(s.answer, g.text);
        assert_eq!(s.answer.split(' ').count(), SAMPLE_TOKENS, "{}", s.answer);
    }
}

#[test]
fn resumed_run_ends_with_the_same_adapter() {
    let lm = tiny();
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = Trainer::new(&lm, adapter(&lm, SPEC), data(), Vec::new(), config(true))
        .unwrap()
        .with_output(full_dir.path())
        .unwrap();
    full.run(&mut |_| {}, &|| false).unwrap();

    // Stop after the first checkpoint (step 2), as Ctrl-C would, then resume in a new trainer.
    let part_dir = tempfile::tempdir().unwrap();
    let mut part = Trainer::new(&lm, adapter(&lm, SPEC), data(), Vec::new(), config(true))
        .unwrap()
        .with_output(part_dir.path())
        .unwrap();
    let stop = std::cell::Cell::new(false);
    part.run(
        &mut |e| {
            if let Event::Checkpoint(_) = e {
                stop.set(true)
            }
        },
        &|| stop.get(),
    )
    .unwrap();
    assert_eq!(part.step(), 2);
    // Another seed: everything, bases of R included, must come from the checkpoint.
    let mut resumed = Trainer::new(
        &lm,
        seeded(&lm, SPEC, 1234),
        data(),
        Vec::new(),
        config(true),
    )
    .unwrap()
    .with_output(part_dir.path())
    .unwrap();
    resumed
        .resume(&part_dir.path().join("checkpoint-2"))
        .unwrap();
    resumed.run(&mut |_| {}, &|| false).unwrap();

    assert_eq!(losses(&full), losses(&resumed));
    let (a, b) = (
        full.adapter.tensors().unwrap(),
        resumed.adapter.tensors().unwrap(),
    );
    for ((na, x), (nb, y)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(x, y), 0.0, "{na}");
    }
    // Every trained R is still orthonormal.
    for (n, r) in a.iter().filter(|(n, _)| n.ends_with(".R")) {
        let eye = candle_core::Tensor::eye(r.dim(0).unwrap(), DType::F32, &Device::Cpu).unwrap();
        assert!(
            max_abs_diff(&r.matmul(&r.t().unwrap()).unwrap(), &eye) < 1e-5,
            "{n}"
        );
    }
    assert!(full_dir.path().join("metrics.jsonl").exists());
}

#[test]
fn an_empty_dataset_is_an_error() {
    let lm = tiny();
    let e = Trainer::new(
        &lm,
        adapter(&lm, SPEC),
        Vec::new(),
        Vec::new(),
        config(true),
    )
    .err()
    .expect("error");
    assert!(e.to_string().contains("empty"), "{e}");
}

/// The fused CPU kernels (hook-free layers, LM-head loss) and the composed candle ops train the
/// same adapter: same losses step by step, with interventions at two layers so that the fused
/// run is split around the upper one.
#[test]
fn fused_kernels_and_composed_ops_train_alike_llama() {
    fused_kernels_and_composed_ops_train_alike("tiny-llama");
}

/// GPT-2's layers always take the composed ops; only the LM-head loss kernel differs.
#[test]
fn fused_kernels_and_composed_ops_train_alike_gpt2() {
    let lm = tiny_lm("tiny-gpt2");
    assert!(!lm.decoder.runs_fused_layers());
    fused_kernels_and_composed_ops_train_alike("tiny-gpt2");
}

fn fused_kernels_and_composed_ops_train_alike(name: &str) {
    let lm = tiny_lm(name);
    let mut runs = Vec::new();
    for fused in [true, false] {
        lm.decoder.set_fused_layers(fused);
        let mut t = Trainer::new(&lm, adapter(&lm, SPEC), data(), data(), config(true)).unwrap();
        t.run(&mut |_| {}, &|| false).unwrap();
        runs.push(losses(&t));
    }
    lm.decoder.set_fused_layers(true);
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-4 * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

/// A non-finite loss stops the run with a clear error, and the checkpoint written before it is
/// kept intact (an absurd learning rate blows the parameters up after the first step).
#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let lm = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(true);
    cfg.optim.lr = 1e30;
    cfg.grad_accum = 1;
    cfg.warmup_ratio = 0.0;
    cfg.schedule = Schedule::Constant;
    cfg.checkpoint_every = Some(1);
    let mut t = Trainer::new(&lm, adapter(&lm, SPEC), data(), Vec::new(), cfg)
        .unwrap()
        .with_output(tmp.path())
        .unwrap();
    let err = t.run(&mut |_| {}, &|| false).unwrap_err().to_string();
    assert!(err.contains("the loss became"), "{err}");
    assert!(err.contains("last checkpoint is kept"), "{err}");
    let ckpt = tmp.path().join("checkpoint-1");
    assert!(ckpt.join("optimizer.safetensors").exists());
    let back = Adapter::open(&ckpt, None, "l1", DType::F32, &Device::Cpu).unwrap();
    for (name, v) in back.vars() {
        let max = v
            .as_tensor()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max.is_finite(),
            "{name} in the kept checkpoint is not finite"
        );
    }
}
