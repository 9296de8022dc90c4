//! The fused encoder layers against the composed candle ops: the same loss, the same gradient
//! of every LoReFT parameter and of every classification-head parameter, on padded batches of
//! sentences of different lengths — on all-MiniLM-L6-v2 (fetched with pip) with real SST-2
//! sentences, and on the tiny BERT and RoBERTa fixtures (RoBERTa's padding-offset positions).
//!
//! Tolerances, stated once: the loss within 1e-5 relative; each parameter's gradient within
//! 5e-5 of that gradient's largest entry (max-abs difference over max-abs value); the hidden
//! states at real tokens within 1e-5 of their largest entry. The two paths differ only in
//! summation order and in the erf approximation (≤ 1.5e-7): measured, the loss within 1e-7,
//! hidden states within 4.3e-7 and gradients within 5.3e-6 (printed by each case).

use crate::common::{adapter_for_dims, fixture, folder_encoder};
use candle_core::{DType, Device, Tensor};
use reft::adapter::Adapter;
use reft::model::bert::Encoder;
use reft::model::{Hooks, PromptLayout};
use reft::train::classify::{cross_entropy, Head, HeadKind, HeadSpec, Problem};

/// What one pass gives: the loss, every parameter's gradient by name, the last hidden states
/// `[b, t, d]` flattened.
struct Run {
    loss: f32,
    grads: Vec<(String, Vec<f32>)>,
    hidden: Vec<f32>,
}

/// A right-padded batch `[b, t]` of `rows` with pad id `pad`, and its mask.
fn padded(rows: &[Vec<u32>], pad: u32) -> (Tensor, Vec<Vec<u32>>) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.push((0..t).map(|j| u32::from(j < r.len())).collect());
    }
    let ids = Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap();
    (ids, mask)
}

/// One forward and backward with `spec`'s adapter (seeded) and a fresh `kind` head, on the
/// fused or the composed path.
fn run(encoder: &Encoder, rows: &[Vec<u32>], spec: &str, kind: HeadKind, fused: bool) -> Run {
    encoder.set_fused_layers(fused);
    let cfg = encoder.config();
    let (ids, mask) = padded(rows, cfg.pad_token_id);
    let mut adapter: Adapter =
        adapter_for_dims(cfg.num_layers, cfg.hidden_size, spec, 42, DType::F32);
    adapter.set_training(true);
    let lens = rows.iter().map(Vec::len).collect();
    adapter.prepare(&PromptLayout::unpadded(lens)).unwrap();
    let hidden = encoder.forward(&ids, Some(&mask), &mut adapter).unwrap();
    let head_spec = HeadSpec {
        kind,
        problem: Problem::SingleLabel,
        num_labels: 2,
    };
    let head = Head::new(head_spec, cfg.hidden_size, 7, &Device::Cpu).unwrap();
    let logits = head.forward(&hidden, &mask, None).unwrap();
    let targets: Vec<u32> = (0..rows.len()).map(|i| (i % 2) as u32).collect();
    let targets = Tensor::from_vec(targets, rows.len(), &Device::Cpu).unwrap();
    let loss = cross_entropy(&logits, &targets).unwrap();
    let store = adapter.backward(&loss).unwrap();
    let mut grads = Vec::new();
    for (name, var) in adapter.vars().into_iter().chain(head.vars()) {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient (fused: {fused})"));
        grads.push((name, g.flatten_all().unwrap().to_vec1().unwrap()));
    }
    encoder.set_fused_layers(true);
    Run {
        loss: loss.to_scalar().unwrap(),
        grads,
        hidden: hidden.flatten_all().unwrap().to_vec1().unwrap(),
    }
}

/// Max-abs difference over max-abs value of `want`, on the entries `keep` selects.
fn rel_diff(got: &[f32], want: &[f32], keep: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(got.len(), want.len());
    let idx = || (0..got.len()).filter(|&i| keep(i));
    let scale = idx().fold(0f32, |m, i| m.max(want[i].abs())).max(1e-20);
    idx().fold(0f32, |m, i| m.max((got[i] - want[i]).abs())) / scale
}

/// Fused against composed for one adapter spec and head; the fused path must have run (its
/// padding rows are zeros, the composed path's are not).
fn check(encoder: &Encoder, rows: &[Vec<u32>], spec: &str, kind: HeadKind) {
    let composed = run(encoder, rows, spec, kind, false);
    let fused = run(encoder, rows, spec, kind, true);
    let what = format!("{spec} with the {kind} head");
    let rel_loss = (fused.loss - composed.loss).abs() / composed.loss.abs();
    assert!(
        rel_loss < 1e-5,
        "{what}: loss {} vs {}",
        fused.loss,
        composed.loss
    );
    let (d, t) = (
        encoder.config().hidden_size,
        rows.iter().map(Vec::len).max().unwrap(),
    );
    let real = |i: usize| (i / d) % t < rows[i / d / t].len();
    let dh = rel_diff(&fused.hidden, &composed.hidden, real);
    assert!(dh < 1e-5, "{what}: hidden states differ by {dh}");
    let pad_zero = |r: &Run| (0..r.hidden.len()).all(|i| real(i) || r.hidden[i] == 0.0);
    assert!(pad_zero(&fused), "{what}: the fused path did not run");
    assert!(
        !pad_zero(&composed),
        "{what}: the composed path did not run"
    );
    let mut worst = 0f32;
    for ((name, g), (_, want)) in fused.grads.iter().zip(&composed.grads) {
        assert!(
            want.iter().any(|&x| x != 0.0),
            "{what}: {name}'s gradient is zero"
        );
        let e = rel_diff(g, want, |_| true);
        assert!(e < 5e-5, "{what}: gradients of {name} differ by {e}");
        worst = worst.max(e);
    }
    eprintln!(
        "{what}: loss {rel_loss:.1e}, hidden {dh:.1e}, worst gradient {worst:.1e} ({} tensors)",
        fused.grads.len()
    );
}

fn spec(layers: &str, positions: &str, component: Option<&str>) -> String {
    let component = component.map_or(String::new(), |c| format!(r#", "component": "{c}""#));
    format!(
        r#"{{"interventions": [{{"kind": "loreft", "layers": "{layers}", "rank": 4, "positions": "{positions}"{component}}}]}}"#
    )
}

/// Ids of different lengths (3 to 17 tokens) for a fixture model without a tokenizer: a
/// start id, tokens above the special ids, an end id.
fn synthetic_rows(vocab: u32) -> Vec<Vec<u32>> {
    [9usize, 3, 17, 6, 12, 4]
        .iter()
        .enumerate()
        .map(|(e, &n)| {
            (0..n)
                .map(|j| match j {
                    0 => 0,
                    _ if j + 1 == n => 2,
                    _ => 5 + ((e * 131 + j * 37) as u32 % (vocab - 5)),
                })
                .collect()
        })
        .collect()
}

/// all-MiniLM-L6-v2 on eight SST-2 sentences (padded to the longest): a LoReFT at every layer
/// on the first token with the RoBERTa-style head (the training benchmark's configuration), at
/// layers 1 and 3 on the first and last tokens with the mean head (runs of two fused layers
/// between the edits; every real row carries gradient), and at the attention output of layer
/// 2 with the BERT pooler head (a hook inside a layer splits the runs).
#[test]
fn fused_encoder_layers_match_composed_ops_on_minilm() {
    let dev = Device::Cpu;
    let data = reft::hub::eval_dataset("glue/sst2/validation", &mut |m| eprintln!("{m}")).unwrap();
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |m| eprintln!("{m}")).unwrap();
    let (records, _) = reft::data::read_rows(&data, &["sentence"]).unwrap();
    let rows: Vec<Vec<u32>> = records[..8]
        .iter()
        .map(|(_, r)| {
            tok.encode_with_special_tokens(r["sentence"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    assert!(
        lens.iter().min() < lens.iter().max(),
        "lengths {lens:?} give no padding"
    );
    assert!(encoder.runs_fused_layers());
    check(&encoder, &rows, &spec("all", "f1", None), HeadKind::Roberta);
    check(&encoder, &rows, &spec("1;3", "f1+l1", None), HeadKind::Mean);
    check(
        &encoder,
        &rows,
        &spec("2", "f2", Some("attention_output")),
        HeadKind::Pooler,
    );
}

/// The tiny BERT and RoBERTa fixtures, six rows of 3 to 17 tokens: every layer and a block
/// input site, first and last tokens.
#[test]
fn fused_encoder_layers_match_composed_ops_on_tiny_bert_and_roberta() {
    for name in ["tiny-bert", "tiny-roberta"] {
        let encoder = folder_encoder(&fixture("models").join(name), DType::F32).unwrap();
        let rows = synthetic_rows(encoder.config().vocab_size as u32);
        check(&encoder, &rows, &spec("all", "f1", None), HeadKind::Roberta);
        check(
            &encoder,
            &rows,
            &spec("1", "f1+l1", Some("block_input")),
            HeadKind::Mean,
        );
    }
}
