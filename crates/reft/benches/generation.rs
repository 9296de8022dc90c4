//! Prefill and decode throughput on SmolLM2-135M-Instruct (f32 compute), with and without the
//! GGUF blocks for decoding, and the cost of a prompt-only rank-4 LoReFT adapter on generation.
//! Prints medians; run with `cargo bench -p reft --bench generation`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use reft::generate::{generate, GenerationConfig};
use reft::model::llama::ForwardInput;
use reft::model::NoHooks;
use reft::{LanguageModel, LoadOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> reft::Result<()> {
    reft::ops::tune_cpu_runtime();
    let m = reft::hub::known_model(reft::hub::DEFAULT_MODEL).expect("known");
    let path = reft::hub::fetch(m, &mut |s| eprintln!("{s}"))?;
    let dev = Device::Cpu;
    let runs = 5;
    println!(
        "SmolLM2-135M-Instruct, {} threads",
        candle_core::utils::get_num_threads()
    );
    for quantized_decode in [false, true] {
        let opts = LoadOptions {
            quantized_decode,
            ..Default::default()
        };
        let t0 = Instant::now();
        let lm = LanguageModel::load(path.to_str().expect("utf-8 path"), &dev, &opts, &mut |_| {})?;
        let load_s = t0.elapsed().as_secs_f64();
        let text =
            "The history of the city began long ago, when travellers crossed the river. ".repeat(8);
        let prompt = lm.tokenizer.encode(&text)?;
        let prompt = &prompt[..prompt.len().min(128)];
        let ids = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
        let mut prefill = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let h = lm
                .decoder
                .forward(&ForwardInput::new(&ids), &mut NoHooks, None)?;
            let _ = lm.decoder.lm_head(&h.narrow(1, prompt.len() - 1, 1)?)?;
            prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        }
        let short = lm.tokenizer.encode("Once upon a time")?;
        let new_tokens = 64;
        let cfg = GenerationConfig {
            max_new_tokens: new_tokens,
            ..Default::default()
        };
        let mut decode = Vec::new();
        for _ in 0..runs {
            // Time the prompt pass alone, then subtract it from the whole generation.
            let t = Instant::now();
            generate(
                &lm.decoder,
                &lm.tokenizer,
                std::slice::from_ref(&short),
                &GenerationConfig {
                    max_new_tokens: 1,
                    ..cfg.clone()
                },
                &mut NoHooks,
                &mut |_, _| {},
            )?;
            let first = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let out = generate(
                &lm.decoder,
                &lm.tokenizer,
                std::slice::from_ref(&short),
                &cfg,
                &mut NoHooks,
                &mut |_, _| {},
            )?;
            let all = t.elapsed().as_secs_f64();
            decode.push((out[0].ids.len() - 1) as f64 / (all - first));
        }
        println!(
            "decode with {:<22} load {load_s:.2} s | prefill ({} tokens) {:.0} tokens/s | decode {:.1} tokens/s (median of {runs})",
            if quantized_decode { "GGUF blocks × f32:" } else { "f32 weights:" },
            prompt.len(),
            median(prefill),
            median(decode)
        );
    }
    adapter_overhead(&path, &dev, runs)
}

/// Whole-generation time (prompt pass + 64 greedy tokens) with and without a prompt-only rank-4
/// LoReFT at layer 15 on the last prompt token, interleaved runs.
fn adapter_overhead(path: &std::path::Path, dev: &Device, runs: usize) -> reft::Result<()> {
    use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel};
    let lm = LanguageModel::load(
        path.to_str().expect("utf-8 path"),
        dev,
        &LoadOptions::default(),
        &mut |_| {},
    )?;
    let spec: AdapterSpec = serde_json::from_str(
        r#"{"interventions": [{"kind": "loreft", "layers": 15, "rank": 4, "positions": "l1"}]}"#,
    )
    .expect("valid spec");
    let config = AdapterConfig {
        format_version: 1,
        base_model: Some(BaseModel::of(&lm)),
        interventions: spec.expand(lm.decoder.config().num_layers)?,
        template: None,
        training: None,
    };
    let mut adapter = Adapter::init(
        config,
        lm.decoder.config().hidden_size,
        0,
        candle_core::DType::F32,
        dev,
    )?;
    let msgs = [reft::template::Message::new(
        "user",
        "Tell me a story about a lighthouse keeper.",
    )];
    let prompt = lm
        .tokenizer
        .encode(&lm.chat_template.render(&msgs, true)?)?;
    let cfg = GenerationConfig {
        max_new_tokens: 64,
        ..Default::default()
    };
    let (mut plain, mut with) = (Vec::new(), Vec::new());
    for _ in 0..runs + 2 {
        let t = Instant::now();
        generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(&prompt),
            &cfg,
            &mut NoHooks,
            &mut |_, _| {},
        )?;
        plain.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(&prompt),
            &cfg,
            &mut adapter,
            &mut |_, _| {},
        )?;
        with.push(t.elapsed().as_secs_f64());
    }
    let (p, w) = (median(plain), median(with));
    println!(
        "generation of 64 tokens ({} prompt tokens): plain {:.1} ms, with a prompt-only rank-4 LoReFT {:.1} ms: overhead {:+.2} %",
        prompt.len(),
        p * 1e3,
        w * 1e3,
        100.0 * (w - p) / p
    );
    Ok(())
}
