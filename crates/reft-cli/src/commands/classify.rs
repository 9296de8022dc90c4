//! Sequence classification from the command line: `reft train --task classify` and
//! `reft eval --task classify`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use reft::adapter::{Adapter, AdapterConfig};
use reft::eval::metrics::{accuracy, macro_f1, matthews_corrcoef};
use reft::train::classify::{predict, train_classifier, ClassifyConfig, Inputs, MeanHead};

use super::train::{Args, Plan};

/// Texts, integer labels and (with `pair`) second texts from a data file or `datasets` folder.
#[allow(clippy::type_complexity)]
pub fn labelled(
    path: &Path,
    text: &str,
    pair: Option<&str>,
    label: &str,
) -> Result<(Vec<String>, Vec<usize>, Option<Vec<String>>)> {
    let mut columns = vec![text, label];
    columns.extend(pair);
    let (rows, unit) = reft::data::read_rows(path, &columns)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut texts = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    let mut pairs = pair.map(|_| Vec::with_capacity(rows.len()));
    for (n, r) in rows {
        if let (Some(field), Some(out)) = (pair, pairs.as_mut()) {
            let p = r[field].as_str().with_context(|| {
                format!("{}: {unit} {n}: no text field `{field}`", path.display())
            })?;
            out.push(p.to_string());
        }
        let t = r[text]
            .as_str()
            .with_context(|| format!("{}: {unit} {n}: no text field `{text}`", path.display()))?;
        let l = match &r[label] {
            serde_json::Value::Number(x) => x.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .with_context(|| {
            format!(
                "{}: {unit} {n}: `{label}` is not a class id",
                path.display()
            )
        })?;
        texts.push(t.to_string());
        labels.push(l as usize);
    }
    if texts.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok((texts, labels, pairs))
}

/// `reft train --task classify`.
pub fn train(a: &Args, p: Plan) -> Result<()> {
    let data = a.data.clone().context("--data FILE is required")?;
    let text_field = a.text_field.as_deref().unwrap_or("sentence");
    let label_field = a.label_field.as_deref().unwrap_or("label");
    let (texts, labels, pairs) =
        labelled(&data, text_field, a.text_pair_field.as_deref(), label_field)?;
    let num_labels = a
        .num_labels
        .unwrap_or_else(|| labels.iter().max().map_or(2, |m| m + 1));
    let model = if a.model.model == reft::hub::DEFAULT_MODEL {
        "all-minilm-l6-v2".to_string()
    } else {
        a.model.model.clone()
    };
    let dev = Device::Cpu;
    let (encoder, tok) = reft::load::load_encoder(&model, &dev, &mut |m| eprintln!("{m}"))
        .with_context(|| format!("cannot load encoder `{model}`"))?;
    let d = encoder.config().hidden_size;
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: p.spec.expand(encoder.config().num_layers)?,
        template: None,
        training: None,
    };
    let mut adapter = Adapter::init(config, d, p.seed, DType::F32, &dev)?;
    let head = MeanHead::init(d, num_labels, p.seed, &dev)?;
    let cc = ClassifyConfig {
        epochs: p.train_cfg.epochs,
        batch_size: p.train_cfg.batch_size,
        optim: p.train_cfg.optim,
        max_grad_norm: p.train_cfg.max_grad_norm,
        seed: p.seed,
        max_length: a.max_length.unwrap_or(128),
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pair_refs: Option<Vec<&str>> = pairs
        .as_ref()
        .map(|p| p.iter().map(String::as_str).collect());
    let t0 = std::time::Instant::now();
    let losses = train_classifier(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs {
            texts: &refs,
            second: pair_refs.as_deref(),
        },
        &labels,
        &cc,
    )?;
    std::fs::create_dir_all(&p.out)?;
    adapter.save(&p.out)?;
    head.save(&p.out)?;
    let mut f = std::fs::File::create(p.out.join("metrics.jsonl"))?;
    for (i, l) in losses.iter().enumerate() {
        writeln!(f, "{}", serde_json::json!({"step": i + 1, "loss": l}))?;
    }
    eprintln!(
        "trained on {} examples in {:.1} s (final loss {:.4}); adapter and head saved to {}",
        texts.len(),
        t0.elapsed().as_secs_f64(),
        losses.last().copied().unwrap_or(f64::NAN),
        p.out.display()
    );
    Ok(())
}

/// `reft eval --task classify`: accuracy, macro-F1 and Matthews correlation of an adapter and
/// head saved by `reft train --task classify`.
pub fn eval(
    model: &str,
    adapter_dir: &Path,
    data: &Path,
    fields: (&str, Option<&str>, &str),
    range: (usize, Option<usize>),
) -> Result<serde_json::Value> {
    let (text_field, pair_field, label_field) = fields;
    let (texts, labels, pairs) = labelled(data, text_field, pair_field, label_field)?;
    let take = range.1.unwrap_or(usize::MAX);
    let pairs: Option<Vec<&str>> = pairs.as_ref().map(|p| {
        p.iter()
            .skip(range.0)
            .take(take)
            .map(String::as_str)
            .collect()
    });
    let texts: Vec<&str> = texts
        .iter()
        .skip(range.0)
        .take(take)
        .map(String::as_str)
        .collect();
    let labels: Vec<usize> = labels.into_iter().skip(range.0).take(take).collect();
    if texts.is_empty() {
        bail!("no items left after --offset/--limit");
    }
    let dev = Device::Cpu;
    let (encoder, tok) = reft::load::load_encoder(model, &dev, &mut |m| eprintln!("{m}"))
        .with_context(|| format!("cannot load encoder `{model}`"))?;
    let d = encoder.config().hidden_size;
    let mut adapter = Adapter::open(adapter_dir, None, "f1", DType::F32, &dev)
        .with_context(|| format!("cannot load adapter {}", adapter_dir.display()))?;
    let head = MeanHead::load(adapter_dir, d, &dev)?;
    let n_labels = head.weight.as_tensor().dim(0)?;
    let pred = predict(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs {
            texts: &texts,
            second: pairs.as_deref(),
        },
        &ClassifyConfig::default(),
    )?;
    Ok(serde_json::json!({
        "task": "classify",
        "n": texts.len(),
        "accuracy": accuracy(&pred, &labels),
        "macro_f1": macro_f1(&pred, &labels, n_labels),
        "mcc": matthews_corrcoef(&pred, &labels, n_labels),
    }))
}
