//! `reft quickstart`: pyreft's quickstart end to end on the default model — train a rank-4
//! LoReFT at layer 15 on the last prompt token to answer in emoji, save it, then answer prompts
//! that were not in the data with and without it.

use std::path::PathBuf;

use anyhow::Result;
use reft::data::prompt_ids;
use reft::generate::{generate, FinishReason, GenerationConfig};
use reft::model::NoHooks;
use reft::quickstart;
use reft::template::Message;

use super::train::{one_line, train_adapter, Plan};
use super::ModelArgs;

/// Arguments of `reft quickstart`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the adapter, metrics and loss curve go.
    #[arg(long, default_value = "reft-quickstart")]
    out: PathBuf,
    /// Epochs [default: 25, or 100 with --pyreft-recipe].
    #[arg(long)]
    epochs: Option<usize>,
    /// pyreft's quickstart as published: the last prompt token only, 100 epochs (default: the
    /// first and last prompt tokens, 25 epochs, chosen by measurement; README "Quickstart").
    #[arg(long)]
    pyreft_recipe: bool,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let recipe = if a.pyreft_recipe {
        quickstart::PYREFT_RECIPE
    } else {
        quickstart::RECIPE
    };
    let epochs = a.epochs.unwrap_or(recipe.epochs);
    let lm = a.model.load()?;
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("quickstart_emoji.jsonl"), quickstart::DATA)?;
    let train = quickstart::examples(&lm)?;
    // The quickstart's folder is its own: a second run replaces the first.
    super::train::claim_out_dir(&a.out, true)?;
    let plan = Plan {
        model: a.model.model.clone(),
        spec: quickstart::adapter_spec_at(recipe.positions),
        init: None,
        train_cfg: quickstart::train_config(epochs, a.seed),
        template: quickstart::TEMPLATE,
        out: a.out.clone(),
        seed: a.seed,
    };
    let mut adapter = train_adapter(&lm, plan, train, Vec::new(), None)?;
    eprintln!(
        "trained in {:.1} s (including model load)",
        t0.elapsed().as_secs_f64()
    );

    let held_out = quickstart::held_out();
    let prompts: Vec<Vec<u32>> = held_out
        .iter()
        .map(|q| prompt_ids(&lm, &[Message::new("user", *q)], quickstart::TEMPLATE))
        .collect::<reft::Result<_>>()?;
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
    for ((q, p), s) in held_out.iter().zip(&plain).zip(&steered) {
        println!(
            "Q: {q}\n  base:    {}\n  adapter: {}",
            one_line(&p.text),
            one_line(&s.text)
        );
    }
    let emoji_only = steered
        .iter()
        .filter(|s| quickstart::is_emoji_only(&s.text))
        .count();
    let ended = steered
        .iter()
        .filter(|s| s.finish != FinishReason::Length)
        .count();
    let n = held_out.len();
    println!(
        "{emoji_only}/{n} answers with the adapter have no letters; \
         {ended}/{n} ended before the {}-token limit",
        cfg.max_new_tokens
    );
    println!(
        "adapter, metrics.jsonl and loss.png are in {}",
        a.out.display()
    );
    Ok(())
}
