//! `reft quickstart`: pyreft's quickstart end to end on the default model — train a rank-4
//! LoReFT at layer 15 on the last prompt token to answer in emoji, save it, then answer prompts
//! that were not in the data with and without it.

use std::path::PathBuf;

use anyhow::Result;
use reft::data::{read_records, tokenize, Fields, Template, TokenizeOptions};
use reft::generate::{generate, GenerationConfig};
use reft::model::NoHooks;
use reft::template::Message;

use super::train::{train_adapter, Plan};
use super::ModelArgs;

/// The ten prompt → emoji pairs of pyreft's quickstart (the project's own copy).
const DATA: &str = include_str!("../../data/quickstart_emoji.jsonl");

/// Prompts that are not in the training data.
pub const HELD_OUT: [&str; 10] = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Tell me a joke about cats.",
    "What is your favourite colour?",
    "Explain photosynthesis in one sentence.",
    "Which is bigger, the Moon or the Earth?",
    "Recommend a good book.",
    "How are you today?",
    "What should I cook for dinner?",
    "Describe the ocean.",
];

/// Arguments of `reft quickstart`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the adapter, metrics and loss curve go.
    #[arg(long, default_value = "reft-quickstart")]
    out: PathBuf,
    /// Epochs (pyreft's quickstart: 100).
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let lm = a.model.load()?;
    std::fs::create_dir_all(&a.out)?;
    let data = a.out.join("quickstart_emoji.jsonl");
    std::fs::write(&data, DATA)?;
    let records = read_records(&data, &Fields::default())?;
    let tok = TokenizeOptions {
        template: Template::Chat,
        add_eos: true,
        max_length: None,
    };
    let (train, _) = tokenize(&lm, &records, &tok)?;
    let spec = serde_json::from_str(
        r#"{"interventions": [{"kind": "loreft", "layers": 15, "component": "block_output", "rank": 4, "positions": "l1"}]}"#,
    )?;
    let train_cfg = reft::train::TrainConfig {
        epochs: a.epochs,
        batch_size: 10,
        grad_accum: 1,
        optim: reft::train::AdamWConfig {
            lr: 4e-3,
            ..Default::default()
        },
        schedule: reft::train::Schedule::Linear,
        warmup_ratio: 0.0,
        max_grad_norm: 1.0,
        seed: a.seed,
        cache_prefix: true,
        cache_budget_bytes: 1 << 30,
        checkpoint_every: None,
    };
    let plan = Plan {
        spec,
        train_cfg,
        template: Template::Chat,
        out: a.out.clone(),
        seed: a.seed,
    };
    let mut adapter = train_adapter(&lm, plan, train, Vec::new(), None)?;
    eprintln!(
        "trained in {:.1} s (including model load)",
        t0.elapsed().as_secs_f64()
    );

    let prompts: Vec<Vec<u32>> = HELD_OUT
        .iter()
        .map(|q| {
            lm.tokenizer
                .encode(&lm.chat_template.render(&[Message::new("user", *q)], true)?)
                .map_err(Into::into)
        })
        .collect::<Result<_>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let plain = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
        &cfg,
        &mut NoHooks,
        &mut |_, _| {},
    )?;
    let steered = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
        &cfg,
        &mut adapter,
        &mut |_, _| {},
    )?;
    let mut emoji_only = 0;
    for ((q, p), s) in HELD_OUT.iter().zip(&plain).zip(&steered) {
        let ok = !s.text.chars().any(char::is_alphabetic) && !s.text.trim().is_empty();
        emoji_only += usize::from(ok);
        println!(
            "Q: {q}\n  base:    {}\n  adapter: {}",
            one_line(&p.text),
            one_line(&s.text)
        );
    }
    println!(
        "{emoji_only}/{} answers with the adapter have no letters",
        HELD_OUT.len()
    );
    println!(
        "adapter, metrics.jsonl and loss.png are in {}",
        a.out.display()
    );
    Ok(())
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ⏎ ")
}
