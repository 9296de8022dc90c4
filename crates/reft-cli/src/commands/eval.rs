//! `reft eval`: score a model, with or without adapters, on labelled data; one JSON line of
//! metrics on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reft::data::DEFAULT_TEMPLATE;
use reft::eval::{evaluate_choice, read_choice_items, ChoiceFormat};
use serde_json::{json, Value};

use super::{AdapterArgs, ItemFields, ModelArgs, TemplateArgs};

/// Arguments of `reft eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Labelled data: JSONL, JSON, CSV/TSV, a Hugging Face `datasets` folder / `.arrow` file, or
    /// Parquet (a file, or a folder of one split's files).
    #[arg(long)]
    data: std::path::PathBuf,
    /// What to score: `choice` (multiple choice by length-normalised log-likelihood),
    /// `generate` (greedy one-line answers, exact match after normalisation) or `classify` (an
    /// encoder with an adapter and head from `reft train --task classify`; `--model` is the
    /// encoder, default all-minilm-l6-v2; the head's kind and problem come from its file and
    /// decide the metrics: accuracy, macro_f1, mcc for single-label; pearson, spearman, mse
    /// for regression; subset_accuracy, micro_f1, macro_f1 for multi-label).
    #[arg(long, default_value = "choice")]
    task: String,
    /// How questions are shown (`--template`, `--chat`, `--raw`): `raw` is `Question: …\nAnswer:`
    /// for choice and the bare prompt for generate; `chat` the chat template; `alpaca` the Alpaca
    /// prompt. Default: the adapter's own template, else chat, as in `reft train`.
    #[command(flatten)]
    template: TemplateArgs,
    /// Write each item's prediction beside its reference to this JSONL file (`index`, the
    /// input, `prediction`, `reference`, `correct`).
    #[arg(long)]
    predictions: Option<PathBuf>,
    #[command(flatten)]
    fields: ItemFields,
    /// Classification: the text field.
    #[arg(long, default_value = "sentence")]
    text_field: String,
    /// Classification: the second text of a pair (e.g. `sentence2`), if the task has pairs.
    #[arg(long)]
    text_pair_field: Option<String>,
    /// Classification: the label field (class ids, numbers or lists of class ids, as the
    /// head's problem needs).
    #[arg(long, default_value = "label")]
    label_field: String,
    /// Skip this many items first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Score at most this many items.
    #[arg(long)]
    limit: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    if a.task == "classify" {
        let [dir] = a.adapters.adapters.as_slice() else {
            bail!("--task classify needs exactly one --adapter (with its head)");
        };
        let model = if a.model.model == reft::hub::DEFAULT_MODEL {
            "all-minilm-l6-v2"
        } else {
            a.model.model.as_str()
        };
        let line = super::classify::eval(
            model,
            dir,
            &a.data,
            (&a.text_field, a.text_pair_field.as_deref(), &a.label_field),
            (a.offset, a.limit),
            a.predictions.as_deref(),
        )?;
        println!("{line}");
        return Ok(());
    }
    if a.task == "generate" {
        return run_generate(a);
    }
    if a.task != "choice" {
        bail!("unknown --task `{}` (choice, generate, classify)", a.task);
    }
    let items = read_choice_items(&a.data, &a.fields.choice())
        .with_context(|| format!("reading {}", a.data.display()))?;
    let items = window(items, &a)?;
    let lm = a.model.load()?;
    let mut adapters = a.adapters.load(&lm)?;
    let format = ChoiceFormat::from(a.template.resolve(&adapters, DEFAULT_TEMPLATE)?);
    let bar = items_bar(items.len());
    let report = evaluate_choice(&lm, &items, format, &mut adapters, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if let Some(path) = &a.predictions {
        let rows = items
            .iter()
            .zip(&report.predictions)
            .enumerate()
            .map(|(k, (it, &p))| {
                json!({
                    "index": a.offset + k,
                    "question": it.question,
                    "prediction": it.choices[p],
                    "reference": it.choices[it.answer],
                    "correct": p == it.answer,
                })
            });
        write_predictions(path, rows)?;
    }
    let mut line = serde_json::to_value(&report)?;
    line["task"] = "choice".into();
    println!("{line}");
    Ok(())
}

fn run_generate(a: Args) -> Result<()> {
    let items = reft::eval::read_generate_items(
        &a.data,
        &a.fields.prompt_field,
        &a.fields.answer_text_field,
    )
    .with_context(|| format!("reading {}", a.data.display()))?;
    let items = window(items, &a)?;
    let lm = a.model.load()?;
    let mut adapters = a.adapters.load(&lm)?;
    let template = a.template.resolve(&adapters, DEFAULT_TEMPLATE)?;
    let bar = items_bar(items.len());
    let (report, answers) = reft::eval::evaluate_generate(
        &lm,
        &items,
        template,
        a.fields.max_new_tokens,
        8,
        &mut adapters,
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    if let Some(path) = &a.predictions {
        let rows = items
            .iter()
            .zip(&answers)
            .enumerate()
            .map(|(k, (it, answer))| {
                json!({
                    "index": a.offset + k,
                    "prompt": it.prompt,
                    "prediction": answer,
                    "reference": it.answers,
                    "correct": reft::eval::metrics::exact_match_any(answer, &it.answers),
                })
            });
        write_predictions(path, rows)?;
    }
    let mut line = serde_json::to_value(&report)?;
    line["task"] = "generate".into();
    println!("{line}");
    Ok(())
}

/// The items `--offset`/`--limit` select; an error when none are left.
fn window<T>(items: Vec<T>, a: &Args) -> Result<Vec<T>> {
    let items: Vec<T> = items
        .into_iter()
        .skip(a.offset)
        .take(a.limit.unwrap_or(usize::MAX))
        .collect();
    if items.is_empty() {
        bail!("no items left after --offset/--limit");
    }
    Ok(items)
}

/// A progress bar over `n` items, on stderr.
fn items_bar(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} items [{elapsed}<{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Writes one JSON object per line to `path`.
pub fn write_predictions(path: &Path, rows: impl Iterator<Item = Value>) -> Result<()> {
    let context = || format!("cannot write predictions to {}", path.display());
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).with_context(context)?);
    for row in rows {
        writeln!(w, "{row}").with_context(context)?;
    }
    w.flush().with_context(context)?;
    Ok(())
}
