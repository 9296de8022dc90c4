//! Writes a GGUF Llama-family model as a Hugging Face folder (f32 `model.safetensors`,
//! `config.json`, `tokenizer.json`), with llama.cpp's Q/K permutation undone, so that pyreft
//! and `transformers` can be run on exactly the weights reft uses (for side-by-side checks).
//!
//! `cargo run --release -p reft --example export_hf -- [MODEL] OUT_DIR`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use reft::load::gguf_config;
use reft::model::Arch;
use reft::weights::{GgufFile, LoadContext, WeightSource};
use reft::LanguageModel;

fn main() -> reft::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.pop().expect("usage: export_hf [MODEL] OUT_DIR"));
    let spec = args
        .pop()
        .unwrap_or_else(|| reft::hub::DEFAULT_MODEL.into());
    let path = reft::load::resolve(&spec, &mut |m| eprintln!("{m}"))?;
    let lm = LanguageModel::load(
        path.to_str().expect("utf-8"),
        &Device::Cpu,
        &Default::default(),
        &mut |_| {},
    )?;
    let g = GgufFile::open(&path)?;
    let cfg = gguf_config(&g)?;
    let src = WeightSource::Gguf(g);
    let ctx = LoadContext {
        device: Device::Cpu,
        dtype: DType::F32,
        arch: cfg.arch,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        keep_quantized: false,
    };
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let mut names: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d]),
        ("model.norm.weight".into(), vec![d]),
    ];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        names.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![cfg.num_heads * hd, d],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![cfg.num_kv_heads * hd, d],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![cfg.num_kv_heads * hd, d],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, cfg.num_heads * hd],
            ),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, i]),
        ]);
    }
    if !cfg.tie_word_embeddings {
        names.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (n, shape) in names {
        tensors.insert(n.clone(), src.get(&n, &shape, &ctx)?);
    }
    std::fs::create_dir_all(&out).map_err(|e| reft::Error::io(&out, e))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": [if cfg.arch == Arch::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if cfg.arch == Arch::Qwen2 { "qwen2" } else { "llama" },
        "hidden_size": d, "intermediate_size": i, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": hd,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "bos_token_id": lm.tokenizer.bos_id, "eos_token_id": lm.tokenizer.eos_ids.first(),
        "torch_dtype": "float32",
    });
    std::fs::write(out.join("config.json"), config.to_string())
        .map_err(|e| reft::Error::io(&out, e))?;
    lm.tokenizer
        .inner()
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| reft::Error::Tokenizer(e.to_string()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
