//! Training-step speed on pyreft's quickstart (SPEC §9): SmolLM2-135M-Instruct, ten examples in
//! one batch, rank-4 LoReFT after layer 15 on the last prompt token. Prints the median step time,
//! the work per step in FLOPs, the achieved rate against this machine's f32 matmul rate measured
//! in the same run, and the peak resident memory. Run with
//! `cargo bench -p reft --bench training`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use reft::adapter::Adapter;
use reft::train::Trainer;
use reft::{quickstart, LanguageModel, LoadOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// f32 GEMM rate (GFLOP/s) of candle's CPU matmul at `[m, k] × [k, n]`, median of a few runs.
fn matmul_rate(m: usize, k: usize, n: usize) -> reft::Result<f64> {
    let a = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1., (k, n), &Device::Cpu)?;
    let mut rates = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let dt = t.elapsed().as_secs_f64();
        drop(c);
        rates.push(2.0 * (m * k * n) as f64 / dt / 1e9);
    }
    Ok(median(rates))
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let m = reft::hub::known_model(reft::hub::DEFAULT_MODEL).expect("known");
    let path = reft::hub::fetch(m, &mut |s| eprintln!("{s}"))?;
    let dev = Device::Cpu;
    let lm = LanguageModel::load(
        path.to_str().expect("utf-8 path"),
        &dev,
        &LoadOptions::default(),
        &mut |_| {},
    )?;
    let rss_loaded = peak_rss_mb().unwrap_or(f64::NAN);
    let steps = 15;
    let examples = quickstart::examples(&lm)?;
    let cfg = lm.decoder.config().clone();
    // Work per step: each example recomputes its last prompt token and its response but the
    // final token from layer 16 up (forward, then an input-only backward of the same cost), and
    // the LM head runs on each of those (labelled) positions, forward and backward.
    let rows: usize = examples.iter().map(|e| e.response_ids.len()).sum();
    let labelled: usize = examples.iter().map(|e| e.response_ids.len()).sum();
    let (d, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let layer_params = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * i;
    let layers = cfg.num_layers - 16;
    let flops = 2.0 * 2.0 * (rows * layers * layer_params + labelled * d * cfg.vocab_size) as f64;

    let run = |steps: usize| -> reft::Result<(f64, f64, f64)> {
        let adapter = Adapter::init(
            quickstart::adapter_config(&lm)?,
            d,
            42,
            lm.decoder.dtype(),
            &dev,
        )?;
        let t = Instant::now();
        let mut trainer = Trainer::new(
            &lm,
            adapter,
            examples.clone(),
            Vec::new(),
            quickstart::train_config(steps, 42),
        )?;
        let setup_s = t.elapsed().as_secs_f64();
        trainer.run(&mut |_| {}, &|| false)?;
        // The first step warms caches and thread pools.
        let times: Vec<f64> = trainer.metrics[1..].iter().map(|m| m.step_time_s).collect();
        let loss = trainer.metrics.last().map_or(f64::NAN, |m| m.loss);
        Ok((median(times), setup_s, loss))
    };
    let (step, setup_s, loss) = run(steps)?;
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    // The same steps with every op a candle op (the fused CPU kernels off); skipped with
    // `REFT_BENCH_FUSED_ONLY=1` (for A/B runs of kernel changes).
    let fused_only = std::env::var_os("REFT_BENCH_FUSED_ONLY").is_some();
    let (composed_step, composed_loss) = if fused_only {
        (f64::NAN, f64::NAN)
    } else {
        lm.decoder.set_fused_layers(false);
        let (s, _, l) = run(5)?;
        lm.decoder.set_fused_layers(true);
        (s, l)
    };
    let rate_big = matmul_rate(1024, 1024, 1024)?;
    let rate_step = matmul_rate(rows, d, i)?;
    println!(
        "quickstart step ({} threads): median {:.3} s over {} steps (prefix cache built in {:.2} s)",
        candle_core::utils::get_num_threads(),
        step,
        steps - 1,
        setup_s
    );
    println!(
        "work per step: {:.1} GFLOP ({rows} recomputed rows x {layers} layers, {labelled} labelled rows) -> {:.1} GFLOP/s",
        flops / 1e9,
        flops / 1e9 / step
    );
    println!(
        "f32 matmul on this machine: {rate_big:.0} GFLOP/s at 1024^3, {rate_step:.0} GFLOP/s at [{rows}x{d}]x[{d}x{i}]; the step achieves {:.0} % of the larger",
        100.0 * flops / 1e9 / step / rate_big.max(rate_step)
    );
    println!(
        "final loss {loss:.4} after {steps} steps; peak RSS {rss:.0} MB ({rss_loaded:.0} MB after loading the model)"
    );
    if fused_only {
        return Ok(());
    }
    println!(
        "composed candle ops instead of the fused kernels: median {composed_step:.3} s per step ({:.1}x slower; loss after 5 steps {composed_loss:.4})",
        composed_step / step
    );
    Ok(())
}
