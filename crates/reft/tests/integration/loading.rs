//! Loading: GGUF files made here from `tiny-llama`, sharded and half-precision safetensors, and
//! the failure modes of bad inputs — each a clear error that names the file, tensor or key at
//! fault, never a panic.

use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use reft::model::{Decoder, DecoderConfig};
use reft::weights::{GgufFile, WeightSource};
use reft::{Error, LanguageModel};

fn tiny_llama_dir() -> PathBuf {
    fixture("models/tiny-llama")
}

fn hf_tensors() -> Vec<(String, Tensor)> {
    let mut v: Vec<_> =
        candle_core::safetensors::load(tiny_llama_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Applies llama.cpp's conversion permutation to a query/key weight.
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes tiny-llama as a GGUF file the way llama.cpp's converter lays it out; matrices in
/// `matrix_type`, norms in F32.
fn write_tiny_gguf(path: &Path, matrix_type: GgmlDType) {
    let cfg = DecoderConfig::from_hf_json(&tiny_llama_dir().join("config.json")).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in hf_tensors() {
        let gguf =
            reft::weights::gguf_name(&name).unwrap_or_else(|| panic!("no GGUF name for {name}"));
        let t = if gguf.ends_with("attn_q.weight") {
            permute_for_gguf(&t, cfg.num_heads)
        } else if gguf.ends_with("attn_k.weight") {
            permute_for_gguf(&t, cfg.num_kv_heads)
        } else {
            t
        };
        let ty = if t.rank() == 2 {
            matrix_type
        } else {
            GgmlDType::F32
        };
        tensors.push((gguf, QTensor::quantize(&t, ty).unwrap()));
    }
    use gguf_file::Value;
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(cfg.intermediate_size as u32),
        ),
        ("llama.block_count", Value::U32(cfg.num_layers as u32)),
        (
            "llama.attention.head_count",
            Value::U32(cfg.num_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.context_length", Value::U32(256)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn gguf_decoder(path: &Path, quantized: bool) -> reft::Result<Decoder> {
    let g = GgufFile::open(path)?;
    let cfg = reft::load::gguf_config(&g)?;
    Decoder::load(
        &WeightSource::Gguf(g),
        cfg,
        &Device::Cpu,
        DType::F32,
        quantized,
    )
}

#[test]
fn gguf_with_permuted_query_key_matches_the_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, GgmlDType::F32);
    let ids = [3u32, 77, 120, 5, 300, 9, 41];
    let hf = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &ids);
    let gg = decoder_logits(&gguf_decoder(&path, false).unwrap(), &ids);
    let err = max_abs_diff(&hf, &gg);
    assert!(err < 1e-5, "GGUF vs HF logits differ by {err}");
}

#[test]
fn quantized_decode_equals_f32_on_the_same_blocks() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let path = dir.path().join(format!("tiny-{ty:?}.gguf"));
        write_tiny_gguf(&path, ty);
        let ids = [3u32, 77, 120, 5];
        // Four rows take the quantized kernels; the f32 model multiplies the dequantized blocks.
        let q = decoder_logits(&gguf_decoder(&path, true).unwrap(), &ids);
        let f = decoder_logits(&gguf_decoder(&path, false).unwrap(), &ids);
        let err = max_abs_diff(&q, &f);
        assert!(
            err < 1e-4,
            "{ty:?}: quantized kernel vs f32 differ by {err}"
        );
    }
}

fn expect_err<T>(r: reft::Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: loading succeeded"),
        Err(e) => e,
    }
}

#[test]
fn truncated_gguf_names_the_first_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, GgmlDType::F32);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let msg = expect_err(gguf_decoder(&cut, true), "truncated GGUF").to_string();
    assert!(
        msg.contains("truncated") && msg.contains("tensor `"),
        "{msg}"
    );
    assert!(msg.contains("cut.gguf"), "{msg}");
    // Cut inside the header: still an error, not a panic.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let msg = expect_err(gguf_decoder(&cut, true), "header-truncated GGUF").to_string();
    assert!(msg.contains("not a readable GGUF"), "{msg}");
    // Not a GGUF at all.
    std::fs::write(&cut, b"definitely not a model file").unwrap();
    let msg = expect_err(
        LanguageModel::load(
            cut.to_str().unwrap(),
            &Device::Cpu,
            &Default::default(),
            &mut |_| {},
        ),
        "garbage",
    )
    .to_string();
    assert!(msg.contains("not a readable GGUF"), "{msg}");
}

#[test]
fn gguf_missing_metadata_and_tensor_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_stub_gguf(&path, "llama");
    let msg = expect_err(gguf_decoder(&path, false), "no metadata").to_string();
    assert!(msg.contains("llama.embedding_length"), "{msg}");
}

/// A GGUF file with only an architecture name and a zero `[512, 64]` token embedding.
fn write_stub_gguf(path: &Path, arch: &str) {
    let t = QTensor::quantize(
        &Tensor::zeros((512, 64), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String(arch.into());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
}

/// Copies tiny-llama's folder with its safetensors replaced by `tensors`.
fn folder_with(tensors: Vec<(String, Tensor)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_llama_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// A config that ties the head to the embedding wins over an `lm_head.weight` the file also
/// has, as in transformers, which ties them again on load (torch.save's files keep such a copy
/// over the embedding's storage): the copy is never read, so it costs no second `[vocab, d]`.
#[test]
fn tied_config_uses_the_embedding_over_a_head_in_the_file() {
    let ids = [3u32, 77, 120, 5, 300, 9, 41];
    let tied = folder_with(hf_tensors());
    let cfg = tied.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let untied = "\"tie_word_embeddings\": false";
    assert!(text.contains(untied), "{text}");
    std::fs::write(&cfg, text.replace(untied, "\"tie_word_embeddings\": true")).unwrap();
    // The reference: an untied folder whose head is a copy of the embedding.
    let tensors = hf_tensors();
    let embed = tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .map(|(_, t)| t.clone())
        .unwrap();
    let copied = folder_with(
        tensors
            .into_iter()
            .map(|(n, t)| match n.as_str() {
                "lm_head.weight" => (n, embed.clone()),
                _ => (n, t),
            })
            .collect(),
    );
    let logits = |dir: &Path| decoder_logits(&folder_decoder(dir, DType::F32).unwrap(), &ids);
    let tied_logits = logits(tied.path());
    assert_eq!(max_abs_diff(&tied_logits, &logits(copied.path())), 0.0);
    // Not the file's own head.
    let own = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &ids);
    assert!(max_abs_diff(&tied_logits, &own) > 1e-3);
}

#[test]
fn safetensors_with_a_wrong_shape_is_named() {
    let bad = "model.layers.1.mlp.up_proj.weight";
    let tensors = hf_tensors()
        .into_iter()
        .map(|(n, t)| {
            if n == bad {
                (n, t.narrow(0, 0, t.dim(0).unwrap() - 1).unwrap())
            } else {
                (n, t)
            }
        })
        .collect();
    let dir = folder_with(tensors);
    match expect_err(folder_decoder(dir.path(), DType::F32), "wrong shape") {
        Error::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(name, bad);
            assert_eq!(expected, vec![128, 64]);
            assert_eq!(actual, vec![127, 64]);
        }
        e => panic!("expected a shape mismatch, got {e}"),
    }
}

#[test]
fn safetensors_missing_or_truncated_are_errors() {
    let gone = "model.layers.2.self_attn.v_proj.weight";
    let dir = folder_with(
        hf_tensors()
            .into_iter()
            .filter(|(n, _)| n != gone)
            .collect(),
    );
    let msg = expect_err(folder_decoder(dir.path(), DType::F32), "missing tensor").to_string();
    assert!(msg.contains(gone), "{msg}");

    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let msg = expect_err(
        folder_decoder(dir.path(), DType::F32),
        "truncated safetensors",
    )
    .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn folder_without_tokenizer_is_a_clear_error() {
    let msg = expect_err(
        LanguageModel::load_hf_folder(&tiny_llama_dir(), &Device::Cpu, DType::F32),
        "no tokenizer",
    )
    .to_string();
    assert!(msg.contains("no tokenizer.json"), "{msg}");
}

#[test]
fn unknown_model_name_lists_the_known_ones() {
    let msg = expect_err(
        LanguageModel::load(
            "no-such-model-xyz",
            &Device::Cpu,
            &Default::default(),
            &mut |_| {},
        ),
        "unknown",
    )
    .to_string();
    assert!(msg.contains("smollm2-135m-instruct"), "{msg}");
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let tensors = hf_tensors();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_llama_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let map: std::collections::HashMap<String, Tensor> = chunk.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.path().join(&file)).unwrap();
        for (n, _) in chunk.iter() {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ids = [3u32, 77, 120, 5];
    let one = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &ids);
    let sharded = decoder_logits(&folder_decoder(dir.path(), DType::F32).unwrap(), &ids);
    assert_eq!(max_abs_diff(&one, &sharded), 0.0);
}

#[test]
fn bf16_and_f16_weights_become_f32() {
    let ids = [3u32, 77, 120, 5];
    let reference = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &ids);
    for dt in [DType::BF16, DType::F16] {
        let tensors = hf_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dt).unwrap()))
            .collect();
        let dir = folder_with(tensors);
        let m = folder_decoder(dir.path(), DType::F32).unwrap();
        let l = decoder_logits(&m, &ids);
        assert_eq!(l.dtype(), DType::F32);
        let err = max_abs_diff(&reference, &l);
        // Rounding the weights to 8 (bf16) or 11 (f16) mantissa bits moves logits a little.
        assert!(err > 0.0 && err < 0.05, "{dt:?}: {err}");
    }
}

/// Every parameter of the tiny checkpoints is counted once: the sum of their safetensors'
/// elements (tiny-gpt2: 249,216 with its head tied to `wte`; tiny-llama's head is untied).
#[test]
fn num_parameters_equal_the_checkpoint_sizes() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let file = fixture("models").join(name).join("model.safetensors");
        let total: usize = candle_core::safetensors::load(file, &Device::Cpu)
            .unwrap()
            .values()
            .map(Tensor::elem_count)
            .sum();
        assert_eq!(
            tiny_decoder(name, DType::F32).num_parameters(),
            total,
            "{name}"
        );
    }
    assert_eq!(
        tiny_decoder("tiny-gpt2", DType::F32).num_parameters(),
        249_216
    );
}

/// tiny-gpt2's config with some keys replaced, written to a temporary folder.
fn gpt2_config_with(edits: serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let src = fixture("models/tiny-gpt2/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    for (k, v) in edits.as_object().unwrap() {
        json[k] = v.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    (dir, path)
}

#[test]
fn gpt2_config_is_read_and_unsupported_variants_are_named() {
    let cfg = DecoderConfig::from_hf_json(&fixture("models/tiny-gpt2/config.json")).unwrap();
    assert_eq!(cfg.arch, reft::model::Arch::Gpt2);
    assert_eq!(
        (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim),
        (64, 4, 4, 16)
    );
    // `n_inner: null` means 4 × n_embd.
    assert_eq!(cfg.intermediate_size, 256);
    assert_eq!(cfg.max_position_embeddings, 256);
    assert_eq!(cfg.norm_eps, 1e-5);
    assert!(cfg.tie_word_embeddings && cfg.attention_bias);

    let (_d, path) = gpt2_config_with(serde_json::json!({"n_inner": 100}));
    assert_eq!(
        DecoderConfig::from_hf_json(&path)
            .unwrap()
            .intermediate_size,
        100
    );
    for (edit, want) in [
        (
            serde_json::json!({"activation_function": "relu"}),
            "activation_function `relu` is not supported",
        ),
        (
            serde_json::json!({"scale_attn_by_inverse_layer_idx": true}),
            "attention scaling",
        ),
        (
            serde_json::json!({"n_head": 5}),
            "not a multiple of n_head 5",
        ),
        (serde_json::json!({"n_embd": null}), "not a GPT-2 config"),
    ] {
        let (_d, path) = gpt2_config_with(edit);
        let msg = expect_err(DecoderConfig::from_hf_json(&path), want).to_string();
        assert!(msg.contains(want) && msg.contains("config.json"), "{msg}");
    }
}

/// GGUF GPT-2 is not supported: a GGUF file of architecture `gpt2` and GPT-2 weights asked of a
/// GGUF source are both refused with a message, never loaded wrongly.
#[test]
fn gpt2_from_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    write_stub_gguf(&path, "gpt2");
    let msg = expect_err(gguf_decoder(&path, false), "gpt2 GGUF").to_string();
    assert!(
        msg.contains("GGUF architecture `gpt2` is not supported"),
        "{msg}"
    );

    let cfg = DecoderConfig::from_hf_json(&fixture("models/tiny-gpt2/config.json")).unwrap();
    let src = WeightSource::Gguf(GgufFile::open(&path).unwrap());
    let msg = expect_err(
        Decoder::load(&src, cfg, &Device::Cpu, DType::F32, true),
        "GPT-2 weights from GGUF",
    )
    .to_string();
    assert!(
        msg.contains("not GGUF") && msg.contains("gpt2.gguf"),
        "{msg}"
    );
}

/// The upstream tiny-gpt2 configs name eos 50256, past its 512-token vocabulary: loading it as
/// a language model names the id instead of failing later inside an embedding lookup.
#[test]
fn special_id_outside_the_vocabulary_is_named() {
    let dir = gpt2_folder::tiny_gpt2_folder(&fixtures_dir());
    std::fs::copy(
        fixture("models/tiny-gpt2/generation_config.json"),
        dir.path().join("generation_config.json"),
    )
    .unwrap();
    let msg = expect_err(
        LanguageModel::load_hf_folder(dir.path(), &Device::Cpu, DType::F32),
        "eos 50256",
    )
    .to_string();
    assert!(
        msg.contains("eos token id 50256") && msg.contains("vocabulary of 512"),
        "{msg}"
    );
}
