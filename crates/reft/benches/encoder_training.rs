//! Encoder training speed: one epoch of all-MiniLM-L6-v2 (frozen, f32) with a rank-4 LoReFT on
//! the first token of every layer and a RoBERTa-style head, on the first 600 SST-2 validation
//! sentences in batches of 32 (as `examples/sst2.rs` trains), reft beside PyTorch doing the
//! same work in the same run, epochs alternating so that both see the same machine load.
//!
//! `cargo bench -p reft --bench encoder_training`. PyTorch runs when `REFT_TORCH_PYTHON` names
//! a Python with torch and transformers (default: `~/.cache/reft-torch-venv/bin/python` if it
//! exists; see `examples/pytorch/encoder_epoch.py` for the environment), at `REFT_TORCH_THREADS`
//! threads (default 2). `REFT_BENCH_ROUNDS` sets the timed rounds (default 3);
//! `REFT_BENCH_COMPOSED=1` also times one epoch with the fused layers off (the composed candle
//! ops, the path every epoch took before them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use reft::adapter::Adapter;
use reft::model::bert::Encoder;
use reft::tokenizer::Tokenizer;
use reft::train::classify::{
    train_classifier, ClassifyConfig, Head, HeadKind, HeadSpec, Inputs, Labels, Problem,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fastest(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The benchmark's data: texts, labels and their token ids.
struct Data {
    texts: Vec<String>,
    labels: Vec<usize>,
    ids: Vec<Vec<u32>>,
}

fn load_data(tok: &Tokenizer) -> reft::Result<Data> {
    let path = reft::hub::eval_dataset("glue/sst2/validation", &mut |m| eprintln!("{m}"))?;
    let (rows, _) = reft::data::read_rows(&path, &["sentence", "label"])?;
    let rows = &rows[..600.min(rows.len())];
    let texts: Vec<String> = rows
        .iter()
        .map(|(_, r)| r["sentence"].as_str().unwrap_or_default().to_string())
        .collect();
    let labels = rows
        .iter()
        .map(|(_, r)| r["label"].as_u64().unwrap_or(0) as usize)
        .collect();
    let ids = texts
        .iter()
        .map(|t| tok.encode_with_special_tokens(t))
        .collect::<reft::Result<_>>()?;
    Ok(Data { texts, labels, ids })
}

/// One reft epoch (seconds, last loss).
fn reft_epoch(encoder: &Encoder, tok: &Tokenizer, data: &Data) -> reft::Result<(f64, f64)> {
    let d = encoder.config().hidden_size;
    let spec: reft::adapter::AdapterSpec = serde_json::from_str(
        r#"{"interventions": [{"kind": "loreft", "layers": "all", "rank": 4, "positions": "f1"}]}"#,
    )
    .expect("a valid spec");
    let config = reft::adapter::AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: spec.expand(encoder.config().num_layers)?,
        template: None,
        training: None,
    };
    let mut adapter = Adapter::init(config, d, 42, DType::F32, &Device::Cpu)?;
    let head_spec = HeadSpec {
        kind: HeadKind::Roberta,
        problem: Problem::SingleLabel,
        num_labels: 2,
    };
    let head = Head::for_encoder(encoder, head_spec, 1)?;
    let cc = ClassifyConfig {
        epochs: 1,
        batch_size: 32,
        optim: reft::train::AdamWConfig {
            lr: 5e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
    let t = Instant::now();
    let losses = train_classifier(
        encoder,
        tok,
        Some(&mut adapter),
        &head,
        Inputs::single(&texts),
        Labels::Classes(&data.labels),
        &cc,
    )?;
    Ok((
        t.elapsed().as_secs_f64(),
        *losses.last().unwrap_or(&f64::NAN),
    ))
}

/// The Python with torch to compare with, if any.
fn torch_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REFT_TORCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/reft-torch-venv/bin/python");
    p.exists().then_some(p)
}

/// One PyTorch epoch in a fresh process (its own timing, which leaves out start-up).
fn torch_epoch(python: &Path, model: &Path, ids: &Path, threads: &str) -> Option<f64> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/pytorch/encoder_epoch.py");
    let out = Command::new(python)
        .arg(&script)
        .args([model.as_os_str(), ids.as_os_str()])
        .arg(threads)
        .env("OMP_NUM_THREADS", threads)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = text.lines().find_map(|l| {
        l.strip_prefix("pytorch epoch seconds ")?
            .trim()
            .parse()
            .ok()
    });
    if secs.is_none() {
        eprintln!(
            "the PyTorch script gave no time: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    secs
}

/// Work per epoch in TFLOP: the six layers' products forward and the five above the first
/// edit backward (input gradients only), over padded or real rows.
fn work(encoder: &Encoder, data: &Data) -> (f64, f64) {
    let c = encoder.config();
    let (d, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let per_row = 2.0 * (4.0 * d * d + 2.0 * d * i);
    let layers = c.num_layers as f64 * 2.0 - 1.0;
    let real: usize = data.ids.iter().map(Vec::len).sum();
    // Padded: each batch of 32 in file order is padded to its longest (the trainer's batches
    // are shuffled; the amount of padding is about the same).
    let padded: usize = data
        .ids
        .chunks(32)
        .map(|c| c.len() * c.iter().map(Vec::len).max().unwrap_or(0))
        .sum();
    let tf = |rows: usize| rows as f64 * per_row * layers / 1e12;
    (tf(padded), tf(real))
}

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let dev = Device::Cpu;
    let model_dir = reft::hub::minilm_folder(&mut |m| eprintln!("{m}"))?;
    let (encoder, tok) = reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |_| {})?;
    let data = load_data(&tok)?;
    let rounds: usize = std::env::var("REFT_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let threads = std::env::var("REFT_TORCH_THREADS").unwrap_or_else(|_| "2".into());
    let python = torch_python();
    // Kept after the run, so that the script can be rerun by hand on the same ids.
    let ids_path = std::env::temp_dir().join("reft-encoder-bench-ids.json");
    let json = serde_json::json!({"ids": data.ids, "labels": data.labels});
    std::fs::write(&ids_path, json.to_string()).map_err(|e| reft::Error::io(&ids_path, e))?;
    println!(
        "model {}, token ids in {}",
        model_dir.display(),
        ids_path.display()
    );

    let (padded, real) = work(&encoder, &data);
    println!(
        "work per epoch: {padded:.2} TFLOP over padded rows, {real:.2} over real rows ({} sentences, batch 32)",
        data.ids.len()
    );
    // A warm-up epoch (thread pools, allocator), then alternating timed epochs.
    reft_epoch(&encoder, &tok, &data)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (s, loss) = reft_epoch(&encoder, &tok, &data)?;
        println!("round {round}: reft {s:.2} s (last loss {loss:.3})");
        ours.push(s);
        if let Some(p) = &python {
            if let Some(s) = torch_epoch(p, &model_dir, &ids_path, &threads) {
                println!("round {round}: pytorch {s:.2} s");
                theirs.push(s);
            }
        }
    }
    let (r, r_min) = (median(ours.clone()), fastest(&ours));
    println!(
        "reft: median {r:.2} s per epoch over {rounds}, fastest {r_min:.2} ({} threads; {:.0} GFLOP/s of real-row work at the median)",
        candle_core::utils::get_num_threads(),
        real * 1e3 / r
    );
    if !theirs.is_empty() {
        let (t, t_min) = (median(theirs.clone()), fastest(&theirs));
        // Both ratios: on a shared machine PyTorch's many thread barriers per step make it
        // suffer more from other load than reft does, which the medians show and the fastest
        // epochs (closest to an idle machine) mostly do not.
        println!(
            "pytorch f32 ({threads} threads): median {t:.2} s per epoch, fastest {t_min:.2} ({:.0} GFLOP/s of padded work at the median); reft is {:.2}x faster by medians, {:.2}x by fastest epochs",
            padded * 1e3 / t,
            t / r,
            t_min / r_min
        );
    } else {
        println!(
            "pytorch: not run (set REFT_TORCH_PYTHON to a Python with torch and transformers)"
        );
    }
    if std::env::var_os("REFT_BENCH_COMPOSED").is_some() {
        encoder.set_fused_layers(false);
        let (s, _) = reft_epoch(&encoder, &tok, &data)?;
        encoder.set_fused_layers(true);
        println!(
            "composed candle ops (fused layers off): {s:.2} s per epoch ({:.1}x the fused)",
            s / r
        );
    }
    Ok(())
}
