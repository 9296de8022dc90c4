//! pyreft's quickstart recipe (SPEC §9), shared by `reft quickstart`, the training benchmark and
//! the tests: ten prompts answered only with emoji, a rank-4 LoReFT at layer 15 `block_output`
//! on the last prompt token, learning rate 4e-3, batch 10, 100 epochs.

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

/// The prompt template: the model's chat template.
pub const TEMPLATE: Template = Template::Chat;

/// The intervention: rank-4 LoReFT after layer 15, last prompt position.
pub fn adapter_spec() -> AdapterSpec {
    serde_json::from_str(
        r#"{"interventions": [{"kind": "loreft", "layers": 15, "component": "block_output", "rank": 4, "positions": "l1"}]}"#,
    )
    .expect("the quickstart spec is valid")
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
