//! Multiple-choice evaluation: each option is scored by the log-likelihood the model (with or
//! without an adapter) gives its text after the question, and the best option counts as the
//! answer. As lm-evaluation-harness does, `accuracy` normalises each option's log-likelihood by
//! the option's length in bytes (its `acc_norm`); `accuracy_unnormalized` uses the plain sum.
//!
//! The question runs once; the options then run as one batch that attends to the question's
//! cached keys and values, so a 4-option item costs about one question plus four short options.

use std::path::Path;

use candle_core::{Tensor, D};
use serde_json::Value;

use crate::data::{alpaca_prompt, encode_prompt, read_rows, Template};
use crate::load::LanguageModel;
use crate::model::llama::ForwardInput;
use crate::model::{Hooks, KvCache, PromptLayout};
use crate::template::Message;
use crate::{Error, Result};

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    /// The question.
    pub question: String,
    /// The options' texts.
    pub choices: Vec<String>,
    /// Index of the correct option.
    pub answer: usize,
}

/// Field names of multiple-choice records.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceFields {
    /// Question field.
    pub question: String,
    /// Options: a list of strings, or `{"text": [...], "label": [...]}` (ARC, OpenBookQA).
    pub choices: String,
    /// Answer: an index, or a label of the options (`"B"`); `answerKey` is used when this field
    /// is absent.
    pub answer: String,
}

impl Default for ChoiceFields {
    fn default() -> Self {
        Self {
            question: "question".into(),
            choices: "choices".into(),
            answer: "answer".into(),
        }
    }
}

/// How the question is shown to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceFormat {
    /// `Question: {q}\nAnswer:` followed by ` {option}` (lm-evaluation-harness's ARC format).
    Raw,
    /// The model's chat template with the question as the user turn; the option is the reply.
    Chat,
    /// The Stanford Alpaca prompt with the question as the instruction; the option is the
    /// response.
    Alpaca,
}

impl From<Template> for ChoiceFormat {
    /// How an adapter trained with `template` is asked a question: the raw template becomes
    /// lm-evaluation-harness's `Question: …\nAnswer:` (a bare question has no cue to answer).
    fn from(template: Template) -> Self {
        match template {
            Template::Raw => ChoiceFormat::Raw,
            Template::Chat => ChoiceFormat::Chat,
            Template::Alpaca => ChoiceFormat::Alpaca,
        }
    }
}

/// Reads multiple-choice items from any data file `read_rows` reads.
pub fn read_choice_items(path: &Path, fields: &ChoiceFields) -> Result<Vec<ChoiceItem>> {
    let columns = [
        fields.question.as_str(),
        &fields.choices,
        &fields.answer,
        "answerKey",
    ];
    let (rows, unit) = read_rows(path, &columns)?;
    let mut items = Vec::with_capacity(rows.len());
    for (n, row) in rows {
        let item = item_of(&row, fields).map_err(|msg| Error::BadConfig {
            path: path.to_path_buf(),
            msg: format!("{unit} {n}: {msg}"),
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            msg: "no items".into(),
        });
    }
    Ok(items)
}

fn item_of(row: &Value, f: &ChoiceFields) -> std::result::Result<ChoiceItem, String> {
    let question = row[&f.question]
        .as_str()
        .ok_or_else(|| format!("no text field `{}`", f.question))?
        .to_string();
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let (choices, labels) = match &row[&f.choices] {
        v @ Value::Array(_) => (strings(v), None),
        Value::Object(o) => (
            o.get("text").and_then(strings),
            o.get("label").and_then(strings),
        ),
        _ => (None, None),
    };
    let choices = choices
        .filter(|c| c.len() >= 2)
        .ok_or_else(|| format!("`{}` is not a list of at least two options", f.choices))?;
    let answer = match row.get(&f.answer).or_else(|| row.get("answerKey")) {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as usize),
        Some(Value::String(s)) => labels
            .as_ref()
            .and_then(|l| l.iter().position(|x| x == s))
            .or_else(|| s.parse().ok()),
        _ => None,
    }
    .filter(|&a| a < choices.len())
    .ok_or_else(|| format!("no valid answer in `{}`", f.answer))?;
    Ok(ChoiceItem {
        question,
        choices,
        answer,
    })
}

/// The outcome of a multiple-choice evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChoiceReport {
    /// Items scored.
    pub n: usize,
    /// Accuracy with byte-length-normalised log-likelihoods.
    pub accuracy: f64,
    /// Accuracy with summed log-likelihoods.
    pub accuracy_unnormalized: f64,
    /// Each item's chosen option (by normalised log-likelihood), in order; not part of the
    /// metrics line.
    #[serde(skip)]
    pub predictions: Vec<usize>,
}

/// The prompt ids of `question` in `format`, and what goes between it and an option.
fn question_ids(
    lm: &LanguageModel,
    question: &str,
    format: ChoiceFormat,
) -> Result<(Vec<u32>, &'static str)> {
    let (prompt, sep) = match format {
        ChoiceFormat::Raw => (format!("Question: {question}\nAnswer:"), " "),
        ChoiceFormat::Chat => (
            lm.chat_template
                .render(&[Message::new("user", question.to_string())], true)?,
            "",
        ),
        ChoiceFormat::Alpaca => (alpaca_prompt(question, None), ""),
    };
    let template = match format {
        ChoiceFormat::Chat => Template::Chat,
        _ => Template::Raw,
    };
    Ok((encode_prompt(lm, &prompt, template)?, sep))
}

/// `item` as a training example: the question shown as it is scored, the correct option (and
/// EOS) as the response, so an adapter learns the likelihoods the scoring compares.
pub fn training_example(
    lm: &LanguageModel,
    item: &ChoiceItem,
    format: ChoiceFormat,
) -> Result<crate::data::Example> {
    let (prompt_ids, sep) = question_ids(lm, &item.question, format)?;
    let answer = item.choices.get(item.answer).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "answer {} of a question with {} options",
            item.answer,
            item.choices.len()
        ))
    })?;
    let mut response_ids = lm.tokenizer.encode(&format!("{sep}{answer}"))?;
    response_ids.extend(lm.tokenizer.eos_ids.first());
    if prompt_ids.is_empty() || response_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "an empty question or answer after tokenisation".into(),
        ));
    }
    Ok(crate::data::Example {
        prompt_ids,
        response_ids,
    })
}

/// Each option of `item` as an example: the question shown as it is scored, the option (no
/// EOS) as the response, so that its summed cross-entropy is the option's negative
/// log-likelihood as [`option_log_likelihoods`] computes it.
pub fn option_examples(
    lm: &LanguageModel,
    item: &ChoiceItem,
    format: ChoiceFormat,
) -> Result<Vec<crate::data::Example>> {
    let (prompt_ids, sep) = question_ids(lm, &item.question, format)?;
    item.choices
        .iter()
        .map(|c| {
            let response_ids = lm.tokenizer.encode(&format!("{sep}{c}"))?;
            if prompt_ids.is_empty() || response_ids.is_empty() {
                return Err(Error::InvalidArgument(
                    "an empty question or option after tokenisation".into(),
                ));
            }
            Ok(crate::data::Example {
                prompt_ids: prompt_ids.clone(),
                response_ids,
            })
        })
        .collect()
}

/// Summed log-likelihood of each option of `item` (in order).
pub fn option_log_likelihoods(
    lm: &LanguageModel,
    item: &ChoiceItem,
    format: ChoiceFormat,
    hooks: &mut dyn Hooks,
) -> Result<Vec<f64>> {
    let dec = &lm.decoder;
    let dev = dec.device();
    let (prompt_ids, sep) = question_ids(lm, &item.question, format)?;
    let options: Vec<Vec<u32>> = item
        .choices
        .iter()
        .map(|c| lm.tokenizer.encode(&format!("{sep}{c}")))
        .collect::<Result<_>>()?;
    let p = prompt_ids.len();
    if p == 0 || options.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument(
            "an empty question or option after tokenisation".into(),
        ));
    }
    // The question, once.
    hooks.prepare(&PromptLayout::unpadded(vec![p]))?;
    let mut cache = KvCache::new(dec.config().num_layers);
    let ids = Tensor::new(prompt_ids.as_slice(), dev)?.unsqueeze(0)?;
    let h = dec.forward(&ForwardInput::new(&ids), hooks, Some(&mut cache))?;
    let first = candle_nn::ops::log_softmax(
        &dec.lm_head(&h.narrow(1, p - 1, 1)?.squeeze(1)?)?,
        D::Minus1,
    )?
    .squeeze(0)?
    .to_vec1::<f32>()?;
    let mut scores: Vec<f64> = options
        .iter()
        .map(|o| first[o[0] as usize] as f64)
        .collect();
    // The rest of every option, as one right-padded batch over the cached question.
    let rest: Vec<usize> = (0..options.len())
        .filter(|&i| options[i].len() > 1)
        .collect();
    if rest.is_empty() {
        return Ok(scores);
    }
    let b = rest.len();
    let t = rest
        .iter()
        .map(|&i| options[i].len() - 1)
        .max()
        .unwrap_or(1);
    let mut flat = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b);
    for &i in &rest {
        let o = &options[i][..options[i].len() - 1];
        flat.extend(o.iter().copied().chain(std::iter::repeat(0)).take(t));
        mask.push(
            (0..p + t)
                .map(|j| u32::from(j < p + o.len()))
                .collect::<Vec<u32>>(),
        );
    }
    let layers = (0..cache.num_layers())
        .map(|l| {
            cache
                .layer(l)
                .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                    Ok((k.repeat((b, 1, 1, 1))?, v.repeat((b, 1, 1, 1))?))
                })
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    let mut batch_cache = KvCache::from_layers(layers).read_only();
    hooks.prepare(&PromptLayout::unpadded(vec![p; b]))?;
    let input_ids = Tensor::from_vec(flat, (b, t), dev)?;
    let input = ForwardInput {
        input_ids: &input_ids,
        attention_mask: Some(&mask),
        position_ids: None,
        start: None,
    };
    let h = dec.forward(&input, hooks, Some(&mut batch_cache))?;
    for (row, &i) in rest.iter().enumerate() {
        let o = &options[i];
        let n = o.len() - 1;
        let logp =
            candle_nn::ops::log_softmax(&dec.lm_head(&h.get(row)?.narrow(0, 0, n)?)?, D::Minus1)?;
        let targets = Tensor::new(&o[1..], dev)?.unsqueeze(1)?;
        let lp: Vec<f32> = logp.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
        scores[i] += lp.iter().map(|&x| x as f64).sum::<f64>();
    }
    Ok(scores)
}

/// Scores every item; `progress(done, total)` is called after each.
pub fn evaluate_choice(
    lm: &LanguageModel,
    items: &[ChoiceItem],
    format: ChoiceFormat,
    hooks: &mut dyn Hooks,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ChoiceReport> {
    let mut scores = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        scores.push(option_log_likelihoods(lm, item, format, hooks)?);
        progress(k + 1, items.len());
    }
    Ok(report_from_scores(items, format, &scores))
}

/// The report for items whose options have these summed log-likelihoods (`scores[i][j]`:
/// option `j` of item `i`): each option's per byte (with the space before it in the raw
/// format) for `accuracy`, the sums for `accuracy_unnormalized`.
pub fn report_from_scores(
    items: &[ChoiceItem],
    format: ChoiceFormat,
    scores: &[Vec<f64>],
) -> ChoiceReport {
    let (mut norm, mut raw) = (0usize, 0usize);
    let mut predictions = Vec::with_capacity(items.len());
    let argmax = |v: &[f64]| -> usize {
        (0..v.len())
            .max_by(|&a, &b| v[a].total_cmp(&v[b]))
            .unwrap_or(0)
    };
    let sep = if format == ChoiceFormat::Raw { 1 } else { 0 };
    for (item, ll) in items.iter().zip(scores) {
        let per_byte: Vec<f64> = ll
            .iter()
            .zip(&item.choices)
            .map(|(l, c)| l / (c.len() + sep).max(1) as f64)
            .collect();
        predictions.push(argmax(&per_byte));
        norm += usize::from(argmax(&per_byte) == item.answer);
        raw += usize::from(argmax(ll) == item.answer);
    }
    let n = items.len();
    ChoiceReport {
        n,
        accuracy: norm as f64 / n.max(1) as f64,
        accuracy_unnormalized: raw as f64 / n.max(1) as f64,
        predictions,
    }
}
