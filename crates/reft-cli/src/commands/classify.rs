//! Sequence classification from the command line: `reft train --task classify` and
//! `reft eval --task classify`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use reft::adapter::{Adapter, AdapterConfig};
use reft::train::classify::{
    predict, score, train_classifier, ClassifyConfig, Head, HeadFile, HeadKind, HeadSpec, Inputs,
    Labels, Predictions, Problem,
};
use serde_json::Value;

use super::train::{Args, Plan};

/// The label column of a data set, parsed for one problem.
enum LabelColumn {
    Classes(Vec<usize>),
    Values(Vec<f32>),
    Sets(Vec<Vec<usize>>),
}

impl LabelColumn {
    /// An empty column for `problem`'s labels.
    fn new(problem: Problem) -> Self {
        match problem {
            Problem::SingleLabel => LabelColumn::Classes(Vec::new()),
            Problem::Regression => LabelColumn::Values(Vec::new()),
            Problem::MultiLabel => LabelColumn::Sets(Vec::new()),
        }
    }

    /// What a label of this column is, for error messages.
    fn wanted(&self) -> &'static str {
        match self {
            LabelColumn::Classes(_) => "a class id",
            LabelColumn::Values(_) => "a number",
            LabelColumn::Sets(_) => "a list of class ids",
        }
    }

    /// Parses a record's field as this column's kind of label and appends it; `None` (nothing
    /// appended) when it is not one.
    fn push(&mut self, v: &Value) -> Option<()> {
        match self {
            LabelColumn::Classes(c) => c.push(class_id(v)?),
            LabelColumn::Values(x) => x.push(number(v)?),
            LabelColumn::Sets(s) => s.push(class_set(v)?),
        }
        Some(())
    }

    fn labels(&self) -> Labels<'_> {
        match self {
            LabelColumn::Classes(c) => Labels::Classes(c),
            LabelColumn::Values(v) => Labels::Values(v),
            LabelColumn::Sets(s) => Labels::Sets(s),
        }
    }

    /// Row `k`'s label as JSON.
    fn item(&self, k: usize) -> Value {
        match self {
            LabelColumn::Classes(c) => c[k].into(),
            LabelColumn::Values(v) => f64::from(v[k]).into(),
            LabelColumn::Sets(s) => s[k].clone().into(),
        }
    }

    /// The rows `skip..skip + take`.
    fn window(self, skip: usize, take: usize) -> Self {
        fn w<T>(v: Vec<T>, skip: usize, take: usize) -> Vec<T> {
            v.into_iter().skip(skip).take(take).collect()
        }
        match self {
            LabelColumn::Classes(c) => LabelColumn::Classes(w(c, skip, take)),
            LabelColumn::Values(v) => LabelColumn::Values(w(v, skip, take)),
            LabelColumn::Sets(s) => LabelColumn::Sets(w(s, skip, take)),
        }
    }

    /// One more than the largest class id (2 when there is none); 1 for regression.
    fn classes_seen(&self) -> usize {
        match self {
            LabelColumn::Classes(c) => c.iter().max().map_or(2, |m| m + 1),
            LabelColumn::Values(_) => 1,
            LabelColumn::Sets(s) => s.iter().flatten().max().map_or(2, |m| m + 1),
        }
    }
}

/// A class id: a non-negative integer, as a number or a string.
fn class_id(v: &Value) -> Option<usize> {
    match v {
        Value::Number(x) => x.as_u64().map(|x| x as usize),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A regression target: a number, or a string holding one.
fn number(v: &Value) -> Option<f32> {
    match v {
        Value::Number(x) => Some(x.as_f64()? as f32),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A multi-label set of class ids: a JSON list (`[0, 3]`), or a string of ids separated by
/// commas or spaces (`"0,3"`, CSV/TSV files), possibly in brackets; empty means no class.
fn class_set(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Array(items) => items.iter().map(class_id).collect(),
        Value::String(s) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split([',', ' '])
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse().ok())
            .collect(),
        _ => None,
    }
}

/// Texts, labels of `problem` and (with `pair`) second texts from a data file or `datasets`
/// folder.
#[allow(clippy::type_complexity)]
fn labelled(
    path: &Path,
    text: &str,
    pair: Option<&str>,
    label: &str,
    problem: Problem,
) -> Result<(Vec<String>, LabelColumn, Option<Vec<String>>)> {
    let mut columns = vec![text, label];
    columns.extend(pair);
    let (rows, unit) = reft::data::read_rows(path, &columns)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut texts = Vec::with_capacity(rows.len());
    let mut pairs = pair.map(|_| Vec::with_capacity(rows.len()));
    let mut labels = LabelColumn::new(problem);
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
        labels.push(&r[label]).with_context(|| {
            format!(
                "{}: {unit} {n}: `{label}` is not {} ({problem} problem)",
                path.display(),
                labels.wanted()
            )
        })?;
        texts.push(t.to_string());
    }
    if texts.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok((texts, labels, pairs))
}

/// `reft train --task classify`.
pub fn train(a: &Args, p: Plan) -> Result<()> {
    let data = a.data.clone().context("--data FILE is required")?;
    let kind: HeadKind = a.head.as_deref().unwrap_or("mean").parse()?;
    let problem: Problem = a.problem.as_deref().unwrap_or("single").parse()?;
    let text_field = a.text_field.as_deref().unwrap_or("sentence");
    let label_field = a.label_field.as_deref().unwrap_or("label");
    let (texts, labels, pairs) = labelled(
        &data,
        text_field,
        a.text_pair_field.as_deref(),
        label_field,
        problem,
    )?;
    let num_labels = match (problem, a.num_labels) {
        (Problem::Regression, Some(n)) if n != 1 => {
            bail!("--problem regression has one output; --num-labels {n} does not fit")
        }
        (_, Some(n)) => n,
        (_, None) => labels.classes_seen(),
    };
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
    let spec = HeadSpec {
        kind,
        problem,
        num_labels,
    };
    let head = Head::for_encoder(&encoder, spec, p.seed)?;
    eprintln!(
        "{kind} head, {problem}, {num_labels} output(s), dropout {}{}",
        head.dropout(),
        match head.from_checkpoint() {
            [] => String::new(),
            from => format!("; from the checkpoint: {}", from.join(", ")),
        }
    );
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
        labels.labels(),
        &cc,
    )?;
    std::fs::create_dir_all(&p.out)?;
    adapter.config_mut().training = Some(serde_json::json!({
        "task": "classify",
        "head": kind.name(),
        "problem": problem.name(),
        "num_labels": num_labels,
        "examples": texts.len(),
        "steps": losses.len(),
        "final_loss": losses.last(),
        "seed": p.seed,
        "tool": format!("reft {}", env!("CARGO_PKG_VERSION")),
    }));
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

/// `reft eval --task classify`: the metrics of the head's problem (read from the saved head)
/// for an adapter and head saved by `reft train --task classify`.
pub fn eval(
    model: &str,
    adapter_dir: &Path,
    data: &Path,
    fields: (&str, Option<&str>, &str),
    range: (usize, Option<usize>),
    predictions: Option<&Path>,
) -> Result<serde_json::Value> {
    let (text_field, pair_field, label_field) = fields;
    let head_context = || format!("cannot load the head in {}", adapter_dir.display());
    // The head's problem says how to parse the labels: read it, and the data, before the
    // encoder is loaded, so that bad data is reported at once.
    let head_file = HeadFile::open(adapter_dir).with_context(head_context)?;
    let (texts, labels, pairs) = labelled(
        data,
        text_field,
        pair_field,
        label_field,
        head_file.problem(),
    )?;
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
    let labels = labels.window(range.0, take);
    if texts.is_empty() {
        bail!("no items left after --offset/--limit");
    }
    let dev = Device::Cpu;
    let (encoder, tok) = reft::load::load_encoder(model, &dev, &mut |m| eprintln!("{m}"))
        .with_context(|| format!("cannot load encoder `{model}`"))?;
    let head = head_file
        .load(encoder.config().hidden_size, None, &dev)
        .with_context(head_context)?;
    let mut adapter = Adapter::open(adapter_dir, None, "f1", DType::F32, &dev)
        .with_context(|| format!("cannot load adapter {}", adapter_dir.display()))?;
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
    if let Some(path) = predictions {
        let rows = texts.iter().enumerate().map(|(k, text)| {
            let (prediction, reference) = (predicted_item(&pred, k), labels.item(k));
            let mut row = serde_json::json!({
                "index": range.0 + k,
                "text": text,
                "prediction": prediction,
                "reference": reference,
            });
            if let Some(p) = &pairs {
                row["text_pair"] = p[k].into();
            }
            if !matches!(pred, Predictions::Values(_)) {
                row["correct"] = (row["prediction"] == row["reference"]).into();
            }
            row
        });
        super::eval::write_predictions(path, rows)?;
    }
    let mut line = serde_json::json!({
        "task": "classify",
        "head": head.kind().name(),
        "problem": head.problem().name(),
        "n": texts.len(),
    });
    for (name, value) in score(&pred, labels.labels(), head.num_labels())? {
        line[name] = value.into();
    }
    Ok(line)
}

/// Item `k` of `pred` as JSON: a class id, a value, or a set of class ids.
fn predicted_item(pred: &Predictions, k: usize) -> Value {
    match pred {
        Predictions::Classes(c) => c[k].into(),
        Predictions::Values(v) => f64::from(v[k]).into(),
        Predictions::Sets(s) => s[k].clone().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(v: Value) -> Option<Vec<usize>> {
        class_set(&v)
    }

    #[test]
    fn labels_parse_per_problem() {
        assert_eq!(set(json!([0, 3])), Some(vec![0, 3]));
        assert_eq!(set(json!(["1", 2])), Some(vec![1, 2]));
        assert_eq!(set(json!("0,3")), Some(vec![0, 3]));
        assert_eq!(set(json!("[2, 4]")), Some(vec![2, 4]));
        assert_eq!(set(json!("1 5")), Some(vec![1, 5]));
        assert_eq!(set(json!("")), Some(vec![]));
        assert_eq!(set(json!([])), Some(vec![]));
        assert_eq!(set(json!("a,b")), None);
        assert_eq!(set(json!([-1])), None);
        assert_eq!(set(json!(3)), None);
        let value = |v: Value| number(&v);
        assert_eq!(value(json!(2.5)), Some(2.5));
        assert_eq!(value(json!(" -1.25 ")), Some(-1.25));
        assert_eq!(value(json!("high")), None);
        let class = |v: Value| class_id(&v);
        assert_eq!(class(json!(2)), Some(2));
        assert_eq!(class(json!("1")), Some(1));
        assert_eq!(class(json!(1.5)), None);
    }
}
