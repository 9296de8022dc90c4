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
    reft::cpu::tune_cpu_runtime();
    let m = reft::hub::known_model(reft::hub::DEFAULT_MODEL).expect("known");
    let path = reft::hub::fetch(m, &mut |s| eprintln!("{s}"))?;
    let dev = Device::Cpu;
    let runs = 5;
    println!(
        "SmolLM2-135M-Instruct, {} threads",
        candle_core::utils::get_num_threads()
    );
    // `cargo bench --bench generation -- NAME` runs only the sections whose name contains NAME
    // (single, products, batched, adapter).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if wanted("single") {
        single_stream(&path, &dev, runs)?;
    }
    if wanted("products") {
        block_products(&dev)?;
    }
    if wanted("batched") {
        batched_decode(&path, &dev, runs)?;
    }
    if wanted("adapter") {
        adapter_overhead(&path, &dev, runs)?;
    }
    Ok(())
}

/// SmolLM2 from `path` with `opts`, quietly.
fn load(path: &std::path::Path, dev: &Device, opts: &LoadOptions) -> reft::Result<LanguageModel> {
    LanguageModel::load(path.to_str().expect("utf-8 path"), dev, opts, &mut |_| {})
}

/// Prefill and single-sequence decode, with f32 weights and with the GGUF blocks.
fn single_stream(path: &std::path::Path, dev: &Device, runs: usize) -> reft::Result<()> {
    for quantized_decode in [false, true] {
        let opts = LoadOptions {
            quantized_decode,
            ..Default::default()
        };
        let t0 = Instant::now();
        let lm = load(path, dev, &opts)?;
        let load_s = t0.elapsed().as_secs_f64();
        let text =
            "The history of the city began long ago, when travellers crossed the river. ".repeat(8);
        let prompt = lm.tokenizer.encode(&text)?;
        let prompt = &prompt[..prompt.len().min(128)];
        let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
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
    Ok(())
}

/// Whole-generation time (prompt pass + 64 greedy tokens) with and without a prompt-only rank-4
/// LoReFT at layer 15 on the last prompt token, interleaved runs.
fn adapter_overhead(path: &std::path::Path, dev: &Device, runs: usize) -> reft::Result<()> {
    use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel};
    let lm = load(path, dev, &LoadOptions::default())?;
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

/// Aggregate decode throughput of one running batch of `n` chat prompts ("Write a short story
/// about the number N.", 64 greedy tokens, no stop tokens so every sequence runs its budget), the
/// way the server's continuous batch decodes: the prompt pass is timed alone and subtracted.
fn batched_decode(path: &std::path::Path, dev: &Device, runs: usize) -> reft::Result<()> {
    let lm = load(path, dev, &LoadOptions::default())?;
    let new_tokens = 64;
    // REFT_BENCH_SEQS=4,32 picks the batch sizes.
    let sizes: Vec<usize> = std::env::var("REFT_BENCH_SEQS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8, 16, 32]);
    for n in sizes {
        let prompts = (0..n)
            .map(|i| {
                let msgs = [reft::template::Message::new(
                    "user",
                    format!("Write a short story about the number {i}."),
                )];
                lm.tokenizer.encode(&lm.chat_template.render(&msgs, true)?)
            })
            .collect::<reft::Result<Vec<_>>>()?;
        let cfg = GenerationConfig {
            max_new_tokens: new_tokens,
            stop_ids: Vec::new(),
            ..Default::default()
        };
        let run = |max_new_tokens: usize| -> reft::Result<(f64, usize)> {
            let t = Instant::now();
            let out = generate(
                &lm.decoder,
                &lm.tokenizer,
                &prompts,
                &GenerationConfig {
                    max_new_tokens,
                    ..cfg.clone()
                },
                &mut NoHooks,
                &mut |_, _| {},
            )?;
            Ok((
                t.elapsed().as_secs_f64(),
                out.iter().map(|g| g.ids.len()).sum(),
            ))
        };
        let mut rates = Vec::new();
        let mut steps = Vec::new();
        for _ in 0..runs {
            let (first, _) = run(1)?;
            let (all, tokens) = run(new_tokens)?;
            rates.push((tokens - n) as f64 / (all - first));
            steps.push((all - first) / (new_tokens - 1) as f64);
        }
        println!(
            "batched decode, {n:>2} sequences: {:.1} tokens/s, {:.1} ms per step (median of {runs})",
            median(rates),
            median(steps) * 1e3
        );
    }
    Ok(())
}

/// One frozen product on SmolLM2's shapes, GGUF Q4_1 blocks × f32 rows against candle's f32
/// matmul of the same (dequantized) weight, by number of rows: where the block kernel stops
/// paying (`reft::cpu::QUANT_MAX_ROWS`).
fn block_products(dev: &Device) -> reft::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use reft::cpu::ggml::{BlockFormat, QuantWeight};
    for (out, inp) in [(3072usize, 576usize), (576, 1536)] {
        let w = Tensor::randn(0f32, 1., (out, inp), dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let deq = q.dequantize(dev)?;
        let qw = QuantWeight::new(BlockFormat::Q4_1, out, inp, q.data()?.to_vec()).expect("shape");
        let wt = deq.t()?;
        let mut line = format!("product [{out} × {inp}] µs, blocks/f32:");
        for rows in [1usize, 4, 8, 16, 32, 64, 128] {
            let x = Tensor::randn(0f32, 1., (rows, inp), dev)?;
            let time = |f: &dyn Fn() -> reft::Result<Tensor>| -> reft::Result<f64> {
                let mut v = Vec::new();
                for _ in 0..21 {
                    let t = Instant::now();
                    f()?;
                    v.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(median(v))
            };
            let b = time(&|| qw.matmul_t(&x))?;
            let f = time(&|| Ok(x.matmul(&wt)?))?;
            line.push_str(&format!(" {rows}: {b:.0}/{f:.0}"));
        }
        println!("{line}");
    }
    Ok(())
}
