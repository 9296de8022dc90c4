//! Held-out answers during training: after each epoch, the adapter as it stands answers the
//! first few held-out prompts greedily, so that a run shows what it is learning as well as its
//! loss (`TrainConfig::eval_samples`; the CLI's `--eval-samples`).

use serde::{Deserialize, Serialize};

use super::Trainer;
use crate::generate::{generate, GenerationConfig};
use crate::Result;

/// New tokens per sample: enough to judge an answer, few enough to keep epochs short.
pub const SAMPLE_TOKENS: usize = 48;

/// A held-out prompt answered by the adapter in training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The epoch after which it was generated (1-based).
    pub epoch: usize,
    /// The prompt as the model reads it (special tokens written out).
    pub prompt: String,
    /// The held-out response (without EOS).
    pub reference: String,
    /// The adapter's greedy answer, up to [`SAMPLE_TOKENS`] tokens or EOS.
    pub answer: String,
}

impl Trainer<'_> {
    /// The current adapter's greedy answers to the first `n` held-out prompts (fewer if there
    /// are fewer), with dropout off; after `epoch`.
    pub fn eval_samples(&mut self, n: usize, epoch: usize) -> Result<Vec<Sample>> {
        let picked = &self.eval[..n.min(self.eval.len())];
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let tok = &self.lm.tokenizer;
        let prompts: Vec<Vec<u32>> = picked.iter().map(|e| e.prompt_ids.clone()).collect();
        let cfg = GenerationConfig {
            max_new_tokens: SAMPLE_TOKENS,
            stop_ids: tok.eos_ids.clone(),
            ..Default::default()
        };
        self.adapter.set_training(false);
        let answers = self.adapter.refresh_params().and_then(|()| {
            generate(
                &self.lm.decoder,
                tok,
                &prompts,
                &cfg,
                &mut self.adapter,
                &mut |_, _| {},
            )
        });
        self.adapter.set_training(true);
        picked
            .iter()
            .zip(answers?)
            .map(|(e, g)| {
                let response: Vec<u32> = e
                    .response_ids
                    .iter()
                    .copied()
                    .filter(|id| !tok.eos_ids.contains(id))
                    .collect();
                Ok(Sample {
                    epoch,
                    prompt: tok.decode(&e.prompt_ids, false)?,
                    reference: tok.decode(&response, false)?,
                    answer: g.text,
                })
            })
            .collect()
    }
}
