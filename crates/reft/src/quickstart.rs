//! pyreft's quickstart (SPEC §9), shared by `reft quickstart`, the training benchmark and the
//! tests: ten prompts answered only with emoji by a rank-4 LoReFT at layer 15 `block_output`,
//! learning rate 4e-3, batch 10. pyreft trains it on the last prompt token for 100 epochs
//! ([`PYREFT_RECIPE`]); `reft quickstart` by default on the first and last prompt tokens for 25
//! ([`RECIPE`]), which generalises to unseen prompts where pyreft's over-fits.

use crate::adapter::{AdapterConfig, AdapterSpec, BaseModel};
use crate::data::{tokenize, Example, Record, Template, TokenizeOptions};
use crate::load::LanguageModel;
use crate::template::Message;
use crate::train::{AdamWConfig, Schedule, TrainConfig};
use crate::{Error, Result};

/// The ten prompt → emoji pairs (the project's own copy of pyreft's quickstart data).
pub const DATA: &str = include_str!("../data/quickstart_emoji.jsonl");

/// Prompts that are not in the data, for judging whether the adapter generalises: one per line
/// of `data/quickstart_held_out.txt`, which `examples/pyreft/quickstart.py` reads too.
pub fn held_out() -> Vec<&'static str> {
    include_str!("../data/quickstart_held_out.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Where the quickstart's intervention sits and how long it trains; the rest is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// Positions (`l1`, `f1+l1`, …).
    pub positions: &'static str,
    /// Epochs over the ten examples.
    pub epochs: usize,
}

/// `reft quickstart`'s default, chosen by measurement on SmolLM2-135M-Instruct (README,
/// "Quickstart"): with seeds 42, 1 and 2 it answers 10 of the 10 held-out prompts with emoji
/// only and ends 9 of them before the 32-token limit. On the last token alone no epoch count
/// from 10 to 75 did both on every seed: short runs ramble on in emoji, long ones over-fit.
pub const RECIPE: Recipe = Recipe {
    positions: "f1+l1",
    epochs: 25,
};

/// pyreft's quickstart as published (`reft quickstart --pyreft-recipe`).
pub const PYREFT_RECIPE: Recipe = Recipe {
    positions: "l1",
    epochs: 100,
};

/// Whether an answer counts as emoji only: something was said and none of it is a letter.
pub fn is_emoji_only(text: &str) -> bool {
    !text.trim().is_empty() && !text.chars().any(char::is_alphabetic)
}

/// The prompt template: the model's chat template.
pub const TEMPLATE: Template = Template::Chat;

/// pyreft's intervention: rank-4 LoReFT after layer 15, last prompt position.
pub fn adapter_spec() -> AdapterSpec {
    adapter_spec_at(PYREFT_RECIPE.positions)
}

/// The quickstart's rank-4 LoReFT after layer 15 at `positions`.
pub fn adapter_spec_at(positions: &str) -> AdapterSpec {
    let json = serde_json::json!({"interventions": [{
        "kind": "loreft", "layers": 15, "component": "block_output", "rank": 4,
        "positions": positions,
    }]});
    serde_json::from_value(json).expect("the quickstart spec is valid")
}

/// The adapter configuration for `lm`.
pub fn adapter_config(lm: &LanguageModel) -> Result<AdapterConfig> {
    Ok(AdapterConfig {
        format_version: 1,
        base_model: Some(BaseModel::of(lm)),
        interventions: adapter_spec().expand(lm.decoder.config().num_layers)?,
        template: Some("chat".into()),
        training: None,
    })
}

/// The training settings of pyreft's quickstart (HF Trainer defaults otherwise: linear decay,
/// no warmup, no weight decay, clipping at 1).
pub fn train_config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 10,
        grad_accum: 1,
        optim: AdamWConfig {
            lr: 4e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        schedule: Schedule::Linear,
        warmup_ratio: 0.0,
        max_grad_norm: 1.0,
        seed,
        cache_prefix: true,
        cache_budget_bytes: 1 << 30,
        checkpoint_every: None,
        eval_samples: 0,
    }
}

/// The ten records.
pub fn records() -> Result<Vec<Record>> {
    DATA.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| Error::InvalidArgument(format!("quickstart data: {e}")))?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Ok(Record {
                messages: vec![Message::new("user", field("prompt"))],
                input: None,
                response: field("response"),
            })
        })
        .collect()
}

/// The ten training examples, tokenised with the chat template and EOS.
pub fn examples(lm: &LanguageModel) -> Result<Vec<Example>> {
    let records = records()?;
    let opts = TokenizeOptions {
        template: TEMPLATE,
        add_eos: true,
        max_length: None,
    };
    Ok(tokenize(lm, &records, &opts)?.0)
}
