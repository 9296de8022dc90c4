//! Generation evaluation: greedy answers to prompts, scored by exact match after SQuAD-style
//! normalisation against one or more reference answers. Generation stops at the end-of-sequence
//! token or at the first newline, so a one-line answer is compared, not what the model rambles
//! on with after it.

use std::path::Path;

use serde_json::Value;

use super::metrics::exact_match_any;
use crate::data::{prompt_ids, read_rows, Template};
use crate::generate::{generate, GenerationConfig};
use crate::load::LanguageModel;
use crate::model::Hooks;
use crate::template::Message;
use crate::{Error, Result};

/// One prompt with its acceptable answers.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateItem {
    /// The prompt text.
    pub prompt: String,
    /// Acceptable answers (any one matching counts).
    pub answers: Vec<String>,
}

/// Reads items: `prompt_field` a string, `answer_field` a string or a list of strings.
pub fn read_generate_items(
    path: &Path,
    prompt_field: &str,
    answer_field: &str,
) -> Result<Vec<GenerateItem>> {
    let (rows, unit) = read_rows(path, &[prompt_field, answer_field])?;
    let bad = |n: usize, msg: String| Error::BadConfig {
        path: path.to_path_buf(),
        msg: format!("{unit} {n}: {msg}"),
    };
    let mut items = Vec::with_capacity(rows.len());
    for (n, row) in rows {
        let prompt = row[prompt_field]
            .as_str()
            .ok_or_else(|| bad(n, format!("no text field `{prompt_field}`")))?
            .to_string();
        let answers = match &row[answer_field] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(n, format!("`{answer_field}` is not a list of strings")))?,
            _ => return Err(bad(n, format!("no answer field `{answer_field}`"))),
        };
        items.push(GenerateItem { prompt, answers });
    }
    if items.is_empty() {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            msg: "no items".into(),
        });
    }
    Ok(items)
}

/// The outcome of a generation evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerateReport {
    /// Items scored.
    pub n: usize,
    /// Fraction whose normalised answer equals a normalised reference.
    pub exact_match: f64,
}

/// Answers every item greedily (its prompt rendered with `template`) in batches of `batch`, and
/// scores them; `progress(done, total)` after each batch. Returns the report and the answers.
pub fn evaluate_generate(
    lm: &LanguageModel,
    items: &[GenerateItem],
    template: Template,
    max_new_tokens: usize,
    batch: usize,
    hooks: &mut dyn Hooks,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(GenerateReport, Vec<String>)> {
    let cfg = GenerationConfig {
        max_new_tokens,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        stop_strings: vec!["\n".into()],
        ..Default::default()
    };
    let mut answers = Vec::with_capacity(items.len());
    let mut hits = 0usize;
    for chunk in items.chunks(batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|it| prompt_ids(lm, &[Message::new("user", it.prompt.clone())], template))
            .collect::<Result<Vec<_>>>()?;
        let out = generate(
            &lm.decoder,
            &lm.tokenizer,
            &prompts,
            &cfg,
            hooks,
            &mut |_, _| {},
        )?;
        for (it, g) in chunk.iter().zip(out) {
            let answer = g.text.trim().to_string();
            hits += usize::from(exact_match_any(&answer, &it.answers));
            answers.push(answer);
        }
        progress(answers.len(), items.len());
    }
    let n = items.len();
    Ok((
        GenerateReport {
            n,
            exact_match: hits as f64 / n.max(1) as f64,
        },
        answers,
    ))
}
