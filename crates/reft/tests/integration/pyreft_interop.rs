//! pyreft interop on the real model: the fixture adapter saved by pyreft reproduces pyreft's own
//! generations; exporting and re-importing is exact.

use crate::common::*;
use candle_core::{DType, Device};
use reft::adapter::{Adapter, BaseModel};
use reft::generate::{generate, GenerationConfig};
use serde_json::Value;

#[test]
fn pyreft_adapter_reproduces_pyreft_generations() {
    let dev = Device::Cpu;
    let lm = smollm2();
    let base = BaseModel::of(lm);
    // pyreft prints the base model's size from PyTorch's count: 134,515,008.
    assert_eq!(lm.decoder.num_parameters(), 134_515_008);
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("pyreft_adapter_expected.json")).unwrap(),
    )
    .unwrap();
    let positions = expected["positions"].as_str().unwrap();
    let mut adapter = Adapter::import_pyreft(
        &fixture("pyreft_adapter"),
        positions,
        Some(&base),
        DType::F32,
        &dev,
    )
    .unwrap();
    assert_eq!(
        adapter.config().interventions[0].layer as u64,
        expected["layer"].as_u64().unwrap()
    );
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_ids: vec![2],
        ..Default::default()
    };
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let ids = lm.tokenizer.encode(c["prompt"].as_str().unwrap()).unwrap();
        let out = generate(
            &lm.decoder,
            &lm.tokenizer,
            &[ids],
            &cfg,
            &mut adapter,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            out[0].text,
            c["greedy_text"].as_str().unwrap(),
            "{}",
            c["question"]
        );
    }

    // Export to pyreft's layout and import again: the same tensors, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    adapter.export_pyreft(dir.path()).unwrap();
    let back =
        Adapter::import_pyreft(dir.path(), positions, Some(&base), DType::F32, &dev).unwrap();
    for ((na, a), (nb, b)) in adapter
        .tensors()
        .unwrap()
        .iter()
        .zip(back.tensors().unwrap().iter())
    {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(a, b), 0.0, "{na}");
    }
}

#[test]
fn pyreft_adapter_for_another_model_is_rejected() {
    let dev = Device::Cpu;
    let other = BaseModel {
        architecture: "llama".into(),
        hidden_size: 64,
        num_layers: 4,
        vocab_size: 512,
        tokenizer_fingerprint: String::new(),
    };
    let msg = Adapter::import_pyreft(
        &fixture("pyreft_adapter"),
        "l1",
        Some(&other),
        DType::F32,
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("does not fit this model"), "{msg}");
}
