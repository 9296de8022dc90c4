//! `reft train`: train an adapter from a data file, with progress, metrics and checkpoints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use reft::adapter::config::LayerSpec;
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel, InterventionSpec};
use reft::data::{read_records, tokenize, Example, Fields, Template, TokenizeOptions};
use reft::intervention::{Activation, Kind};
use reft::model::Component;
use reft::train::{AdamWConfig, Event, Schedule, TrainConfig, Trainer};
use reft::LanguageModel;
use serde::Deserialize;

use super::ModelArgs;

/// Arguments of `reft train` (every field can also come from `--config run.toml`).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: JSONL, JSON, CSV or TSV, a Hugging Face `datasets` folder, an `.arrow` file, or
    /// a `.parquet` file or folder of them (one split).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data file [default: none].
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data instead [default: none].
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Prompt template: raw, chat, alpaca [default: chat].
    #[arg(long)]
    pub template: Option<String>,
    /// Prompt field name [default: prompt].
    #[arg(long)]
    pub prompt_field: Option<String>,
    /// Response field name [default: response].
    #[arg(long)]
    pub response_field: Option<String>,
    /// Intervention kind: loreft, noreft, direft, direft_orth, consreft, lobireft, red, steer
    /// [default: loreft].
    #[arg(long)]
    pub kind: Option<String>,
    /// Layers: `15`, `3;9;18`, `0..8`, `all` [default: 15].
    #[arg(long)]
    pub layers: Option<String>,
    /// Component: block_output, block_input, attention_output, mlp_output [default: block_output].
    #[arg(long)]
    pub component: Option<String>,
    /// Rank [default: 4].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Positions: fN, lN, fN+lN, all, or a list [default: l1].
    #[arg(long)]
    pub positions: Option<String>,
    /// One intervention per layer for both sets of fN+lN (default).
    #[arg(long, conflicts_with = "untied")]
    pub tied: bool,
    /// Separate interventions for the first and last sets of fN+lN.
    #[arg(long)]
    pub untied: bool,
    /// Activation inside the intervention: linear, relu, gelu, silu, tanh [default: linear].
    #[arg(long)]
    pub act: Option<String>,
    /// Epochs [default: 3].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate [default: 4e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Examples per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimiser step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Warmup ratio [default: 0].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Weight decay (applied to every intervention parameter) [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Schedule: linear, cosine, constant [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Dropout on the edit [default: 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Longest sequence in tokens (default: no limit, or the context of a model with learned
    /// positions such as GPT-2).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Seed (data order, initialisation) [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N optimiser steps [default: only at the end].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// After each epoch, answer the first N held-out prompts greedily with the adapter as it
    /// stands (printed, and appended to samples.jsonl in --out) [default: 0].
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Recompute every example in full each step (same losses, slower).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Continue from a checkpoint folder of the same run (`--out` may then hold that run)
    /// [default: none].
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: Option<PathBuf>,
    /// Start afresh in an `--out` folder that holds an earlier run, removing that run's files
    /// (adapter, metrics, samples, loss curve, checkpoints, head). Without it such a folder is
    /// refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Start from this adapter [default: none] (a reft folder, or a pyreft save whose positions `--positions`
    /// gives, default l1) instead of a fresh one: its interventions and weights are trained
    /// further with a fresh optimiser, and its template is the default.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output folder: adapter, metrics.jsonl, loss.png, checkpoints (required).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `causal` (the default: prompt → response on a causal LM) or `classify` (a BERT-family
    /// encoder, `--model` a folder or `all-minilm-l6-v2`, with a head trained with the
    /// interventions and saved beside them as classifier_head.safetensors).
    #[arg(long)]
    pub task: Option<String>,
    /// Classification: the text field [default: sentence].
    #[arg(long)]
    pub text_field: Option<String>,
    /// Classification: the second text of a pair (e.g. `sentence2`), if the task has pairs
    /// [default: none].
    #[arg(long)]
    pub text_pair_field: Option<String>,
    /// Classification: the label field: class ids (single), numbers (regression), or lists of
    /// class ids (multi-label: `[0, 3]`, or `"0,3"` in CSV/TSV) [default: label].
    #[arg(long)]
    pub label_field: Option<String>,
    /// Classification: number of classes (default: the largest class id + 1; regression: 1).
    #[arg(long)]
    pub num_labels: Option<usize>,
    /// Classification head: `mean` (linear on mean-pooled states; the default), `pooler` (BERT:
    /// tanh(pooler dense) on the first token, then a linear classifier) or `roberta` (dense +
    /// tanh + out_proj on the first token). Layers the checkpoint has (`pooler.dense`,
    /// `classifier…`) start from its weights; the first-token heads use the config's classifier
    /// dropout in training.
    #[arg(long)]
    pub head: Option<String>,
    /// Classification loss: `single` (one class, cross-entropy; the default), `regression` (a
    /// number, mean squared error) or `multi-label` (a set of classes, binary cross-entropy).
    #[arg(long)]
    pub problem: Option<String>,
    /// Read the fields above from a TOML file (flags given on the command line win) [default: none].
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The same fields, from a TOML file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileArgs {
    model: Option<String>,
    data: Option<PathBuf>,
    eval_data: Option<PathBuf>,
    eval_fraction: Option<f64>,
    template: Option<String>,
    prompt_field: Option<String>,
    response_field: Option<String>,
    kind: Option<String>,
    layers: Option<toml::Value>,
    component: Option<String>,
    rank: Option<usize>,
    positions: Option<String>,
    tied: Option<bool>,
    act: Option<String>,
    epochs: Option<usize>,
    lr: Option<f64>,
    batch_size: Option<usize>,
    grad_accum: Option<usize>,
    warmup: Option<f64>,
    weight_decay: Option<f64>,
    schedule: Option<String>,
    dropout: Option<f64>,
    max_length: Option<usize>,
    seed: Option<u64>,
    save_every: Option<usize>,
    eval_samples: Option<usize>,
    init: Option<PathBuf>,
    out: Option<PathBuf>,
    task: Option<String>,
    text_field: Option<String>,
    text_pair_field: Option<String>,
    label_field: Option<String>,
    num_labels: Option<usize>,
    head: Option<String>,
    problem: Option<String>,
}

impl Args {
    fn merge_file(&mut self) -> Result<()> {
        let Some(path) = &self.config else {
            return Ok(());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let f: FileArgs =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = f.$field; } )* };
        }
        fill!(
            data,
            eval_data,
            eval_fraction,
            template,
            prompt_field,
            response_field,
            kind,
            component,
            rank,
            positions,
            act,
            epochs,
            lr,
            batch_size,
            grad_accum,
            warmup,
            weight_decay,
            schedule,
            dropout,
            max_length,
            seed,
            save_every,
            eval_samples,
            init,
            out,
            task,
            text_field,
            text_pair_field,
            label_field,
            num_labels,
            head,
            problem
        );
        if self.layers.is_none() {
            self.layers = f.layers.map(|v| match v {
                toml::Value::String(s) => s,
                other => other
                    .to_string()
                    .trim_matches(['[', ']'])
                    .replace(',', ";")
                    .replace(' ', ""),
            });
        }
        if let Some(m) = f.model {
            if self.model.model == reft::hub::DEFAULT_MODEL {
                self.model.model = m;
            }
        }
        if f.tied == Some(false) && !self.tied {
            self.untied = true;
        }
        Ok(())
    }
}

/// Everything needed to train, resolved from flags and file.
pub struct Plan {
    /// The model as the user named it (for the settings line).
    pub model: String,
    pub spec: AdapterSpec,
    /// An adapter to train further (`--init`) instead of a fresh one built from `spec`, and
    /// where it came from.
    pub init: Option<(PathBuf, Adapter)>,
    pub train_cfg: TrainConfig,
    pub template: Template,
    pub out: PathBuf,
    pub seed: u64,
}

fn plan(a: &Args) -> Result<Plan> {
    let kind: Kind = a.kind.as_deref().unwrap_or("loreft").parse()?;
    let layers = a.layers.clone().unwrap_or_else(|| "15".into());
    let spec = AdapterSpec {
        interventions: vec![InterventionSpec {
            kind,
            layers: LayerSpec::Text(layers),
            component: a
                .component
                .as_deref()
                .unwrap_or("block_output")
                .parse::<Component>()?,
            rank: a.rank.unwrap_or(4),
            positions: a.positions.clone().unwrap_or_else(|| "l1".into()),
            tied: !a.untied,
            act: a.act.as_deref().unwrap_or("linear").parse::<Activation>()?,
            dropout: a.dropout.unwrap_or(0.0),
            proj_bias: true,
        }],
    };
    let seed = a.seed.unwrap_or(42);
    let train_cfg = TrainConfig {
        epochs: a.epochs.unwrap_or(3),
        batch_size: a.batch_size.unwrap_or(8),
        grad_accum: a.grad_accum.unwrap_or(1),
        optim: AdamWConfig {
            lr: a.lr.unwrap_or(4e-3),
            weight_decay: a.weight_decay.unwrap_or(0.0),
            ..Default::default()
        },
        schedule: a
            .schedule
            .as_deref()
            .unwrap_or("linear")
            .parse::<Schedule>()?,
        warmup_ratio: a.warmup.unwrap_or(0.0),
        max_grad_norm: 1.0,
        seed,
        cache_prefix: !a.no_prefix_cache,
        cache_budget_bytes: 2 << 30,
        checkpoint_every: a.save_every,
        eval_samples: a.eval_samples.unwrap_or(0),
    };
    let template: Template = match a.template.as_deref() {
        Some(t) => t.parse()?,
        None => reft::data::DEFAULT_TEMPLATE,
    };
    let out = a.out.clone().context("--out DIR is required")?;
    Ok(Plan {
        model: a.model.model.clone(),
        spec,
        init: None,
        train_cfg,
        template,
        out,
        seed,
    })
}

pub fn run(mut a: Args) -> Result<()> {
    a.merge_file()?;
    let mut p = plan(&a)?;
    if a.resume.is_none() {
        claim_out_dir(&p.out, a.overwrite)?;
    }
    match a.task.as_deref().unwrap_or("causal") {
        "causal" => {}
        "classify" => {
            if a.init.is_some() || a.eval_samples.is_some() {
                bail!("--init and --eval-samples are for causal training (--task causal)");
            }
            return super::classify::train(&a, p);
        }
        other => bail!("unknown --task `{other}` (causal, classify)"),
    }
    let data = a.data.clone().context("--data FILE is required")?;
    if let Some(dir) = &a.init {
        check_init_flags(&a, dir)?;
    }
    let lm = a.model.load()?;
    if let Some(dir) = &a.init {
        let positions = a.positions.as_deref().unwrap_or("l1");
        let adapter = Adapter::open(
            dir,
            Some(&BaseModel::of(&lm)),
            positions,
            DType::F32,
            lm.decoder.device(),
        )
        .with_context(|| format!("cannot load the --init adapter {}", dir.display()))?;
        if a.template.is_none() {
            if let Some(t) = &adapter.config().template {
                p.template = t.parse()?;
            }
        }
        p.init = Some((dir.clone(), adapter));
    }
    let fields = Fields {
        prompt: a.prompt_field.clone().unwrap_or_else(|| "prompt".into()),
        response: a
            .response_field
            .clone()
            .unwrap_or_else(|| "response".into()),
        ..Default::default()
    };
    // A model with learned positions (GPT-2) cannot read past its table: cap the length there.
    let max_length = match (a.max_length, lm.decoder.context_limit()) {
        (Some(m), Some(n)) => Some(m.min(n)),
        (m, n) => m.or(n),
    };
    let tok = TokenizeOptions {
        template: p.template,
        add_eos: true,
        max_length,
    };
    let (mut train, truncated) = examples(&lm, &data, &fields, &tok)?;
    let eval = match (&a.eval_data, a.eval_fraction) {
        (Some(f), _) => examples(&lm, f, &fields, &tok)?.0,
        (None, Some(frac)) => {
            if !(0.0..1.0).contains(&frac) {
                bail!("--eval-fraction must be in [0, 1)");
            }
            let n = ((train.len() as f64) * frac).round() as usize;
            train.split_off(train.len() - n)
        }
        (None, None) => Vec::new(),
    };
    if truncated > 0 {
        eprintln!(
            "{truncated} example(s) were truncated to {} tokens (--max-length, or the model's context)",
            max_length.unwrap_or_default()
        );
    }
    train_adapter(&lm, p, train, eval, a.resume.as_deref())?;
    Ok(())
}

/// Refuses, before the model is loaded, the flags that cannot go with `--init`: those that
/// would describe another adapter, `--resume`, and `--positions` for a reft folder.
fn check_init_flags(a: &Args, dir: &Path) -> Result<()> {
    if a.resume.is_some() {
        bail!("--init and --resume: a resumed run restores its own adapter");
    }
    let shape_flags = [
        ("--kind", a.kind.is_some()),
        ("--layers", a.layers.is_some()),
        ("--component", a.component.is_some()),
        ("--rank", a.rank.is_some()),
        ("--tied/--untied", a.tied || a.untied),
        ("--act", a.act.is_some()),
        ("--dropout", a.dropout.is_some()),
    ];
    let given: Vec<&str> = shape_flags
        .iter()
        .filter(|(_, on)| *on)
        .map(|(f, _)| *f)
        .collect();
    if !given.is_empty() {
        bail!(
            "--init trains the adapter's own interventions: drop {}",
            given.join(", ")
        );
    }
    let native = dir.join(reft::adapter::native::CONFIG_FILE).exists();
    if native && a.positions.is_some() {
        bail!(
            "--positions is for pyreft folders, which do not record them; {} does",
            dir.display()
        );
    }
    Ok(())
}

/// `s` on one line, newlines shown as ⏎.
pub fn one_line(s: &str) -> String {
    s.trim().replace('\n', " ⏎ ")
}

fn examples(
    lm: &LanguageModel,
    path: &Path,
    fields: &Fields,
    tok: &TokenizeOptions,
) -> Result<(Vec<Example>, usize)> {
    let records =
        read_records(path, fields).with_context(|| format!("reading {}", path.display()))?;
    Ok(tokenize(lm, &records, tok)?)
}

/// The training loop behind `train` and `quickstart`: progress bar, Ctrl-C checkpoint, output
/// folder (adapter with its training summary, metrics, loss curve); returns the adapter.
pub fn train_adapter(
    lm: &LanguageModel,
    mut p: Plan,
    train: Vec<Example>,
    eval: Vec<Example>,
    resume: Option<&Path>,
) -> Result<Adapter> {
    let d = lm.decoder.config().hidden_size;
    let template = Some(p.template.name().to_string());
    let (init_from, adapter) = match p.init.take() {
        Some((dir, mut adapter)) => {
            let c = adapter.config_mut();
            c.base_model = Some(BaseModel::of(lm));
            c.template = template;
            c.training = None;
            (Some(dir), adapter)
        }
        None => {
            let config = AdapterConfig {
                format_version: 1,
                base_model: Some(BaseModel::of(lm)),
                interventions: p.spec.expand(lm.decoder.config().num_layers)?,
                template,
                training: None,
            };
            let adapter = Adapter::init(config, d, p.seed, DType::F32, lm.decoder.device())?;
            (None, adapter)
        }
    };
    eprintln!(
        "{}",
        settings_line(&p, adapter.config(), train.len(), eval.len())
    );
    eprintln!("{}", adapter.parameter_summary(lm.decoder.num_parameters()));
    let n_train = train.len();
    let t0 = std::time::Instant::now();
    let mut trainer =
        Trainer::new(lm, adapter, train, eval, p.train_cfg.clone())?.with_output(&p.out)?;
    if let Some(dir) = resume {
        trainer
            .resume(dir)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        eprintln!("resumed at step {}", trainer.step());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_position(trainer.step() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Without a terminal indicatif draws nothing: print about ten plain progress lines instead.
    let total = trainer.total_steps();
    let every = total.div_ceil(10).max(1);
    let result = trainer.run(
        &mut |e| match e {
            Event::Step(m) => {
                let msg = format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s",
                    m.loss,
                    m.lr,
                    m.tokens as f64 / m.step_time_s.max(1e-9)
                );
                if bar.is_hidden() && (m.step % every == 0 || m.step == total) {
                    eprintln!("step {}/{total} (epoch {:.1}) {msg}", m.step, m.epoch);
                }
                bar.set_message(msg);
                bar.inc(1);
            }
            Event::Epoch {
                epoch,
                eval_loss,
                samples,
            } => {
                let say = |line: String| super::say_above(&bar, line);
                if let Some(l) = eval_loss {
                    say(format!("epoch {epoch}: held-out loss {l:.4}"));
                }
                for s in samples {
                    say(format!(
                        "  → {}   (reference: {})",
                        one_line(&s.answer),
                        one_line(&s.reference)
                    ));
                }
            }
            Event::Checkpoint(dir) => bar.set_message(format!("saved {}", dir.display())),
        },
        &|| stop.load(Ordering::SeqCst),
    );
    bar.finish();
    result?;
    let mut adapter = trainer.adapter;
    let last = trainer.metrics.last().cloned();
    adapter.config_mut().training = Some(serde_json::json!({
        "examples": n_train,
        "steps": last.as_ref().map(|m| m.step),
        "final_loss": last.as_ref().map(|m| m.loss),
        "seed": p.seed,
        "init": init_from.map(|d| d.display().to_string()),
        "config": p.train_cfg,
        "tool": format!("reft {}", env!("CARGO_PKG_VERSION")),
    }));
    adapter.save(&p.out)?;
    super::plot::loss_png(&trainer.metrics, &p.out.join("loss.png"))?;
    if stop.load(Ordering::SeqCst) {
        eprintln!("interrupted: checkpoint saved under {}", p.out.display());
    } else {
        eprintln!(
            "{}",
            closing_summary(&trainer.metrics, t0.elapsed().as_secs_f64(), &p.out)
        );
    }
    Ok(adapter)
}

/// The files a training run writes into its `--out` folder (checkpoints are `checkpoint-<step>/`).
const RUN_FILES: &[&str] = &[
    reft::adapter::native::CONFIG_FILE,
    "adapter.safetensors",
    "classifier_head.safetensors",
    "metrics.jsonl",
    "samples.jsonl",
    "loss.png",
];

/// The earlier run's files in `out`, if any.
fn run_files_in(out: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            RUN_FILES.contains(&name.as_str()) || name.starts_with("checkpoint-")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Makes `out` ready for a fresh run: refuses a folder that holds an earlier run unless
/// `overwrite`, which removes that run's files (and only those), so two runs never mix.
pub fn claim_out_dir(out: &Path, overwrite: bool) -> Result<()> {
    let old = run_files_in(out);
    if old.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let names: Vec<String> = old
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        bail!(
            "{} already holds a training run ({}): pass --overwrite to start afresh (that run's files are removed), or --resume CHECKPOINT to continue it",
            out.display(),
            names.join(", ")
        );
    }
    for p in old {
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.with_context(|| format!("removing the earlier run's {}", p.display()))?;
    }
    Ok(())
}

/// The run's settings on one line, printed before training starts.
fn settings_line(p: &Plan, c: &AdapterConfig, n_train: usize, n_eval: usize) -> String {
    let mut kinds: Vec<String> = c
        .interventions
        .iter()
        .map(|i| i.kind.name().to_string())
        .collect();
    kinds.dedup();
    let mut layers: Vec<usize> = c.interventions.iter().map(|i| i.layer).collect();
    layers.dedup();
    let layers: Vec<String> = layers.iter().map(usize::to_string).collect();
    let mut positions: Vec<&str> = c
        .interventions
        .iter()
        .map(|i| i.positions.as_str())
        .collect();
    positions.dedup();
    let rank = c.interventions.first().map_or(0, |i| i.rank);
    let t = &p.train_cfg;
    format!(
        "training on {}: {n_train} examples, {n_eval} held out; {} rank {rank} at layer {} ({}), positions {}; epochs {}, lr {:e}, batch {}{}, template {}",
        p.model,
        kinds.join("+"),
        layers.join(";"),
        c.interventions.first().map_or("block_output", |i| i.component.name()),
        positions.join(","),
        t.epochs,
        t.optim.lr,
        t.batch_size,
        if t.grad_accum > 1 { format!(" x {} accumulated", t.grad_accum) } else { String::new() },
        p.template.name(),
    )
}

/// The closing lines: the loss at the start and the end, time, where the adapter is, and a hint
/// when the loss is still high. Start and end are the first and last epochs' mean losses (single
/// steps see different batches, so one step against another says little), or the first and
/// last steps' of a one-epoch run.
fn closing_summary(metrics: &[reft::train::StepMetrics], secs: f64, out: &Path) -> String {
    let Some(last) = metrics.last() else {
        return format!("no steps were run; adapter saved to {}", out.display());
    };
    let per_epoch = metrics
        .iter()
        .filter(|m| m.epoch <= 1.0 + 1e-9)
        .count()
        .max(1);
    let mean = |ms: &[reft::train::StepMetrics]| {
        ms.iter().map(|m| m.loss).sum::<f64>() / ms.len().max(1) as f64
    };
    let (start, end, what) = if metrics.len() > per_epoch {
        (
            mean(&metrics[..per_epoch]),
            mean(&metrics[metrics.len() - per_epoch..]),
            "mean loss of the first epoch",
        )
    } else {
        (metrics[0].loss, last.loss, "loss")
    };
    let mut s = format!(
        "done in {secs:.1} s: {} steps, {what} {start:.4} -> last {end:.4}; adapter saved to {}",
        last.step,
        out.display()
    );
    if end > STILL_HIGH * start {
        s.push_str(&format!(
            "\nthe loss is still {:.0}% of where it started: the adapter may not have learnt the task yet; try more --epochs (or a higher --lr)",
            100.0 * end / start.max(1e-12)
        ));
    }
    s
}

/// A final loss above this fraction of the first step's counts as still high.
const STILL_HIGH: f64 = 0.5;
