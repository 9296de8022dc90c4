//! Training data (SPEC §5): records from JSONL (or JSON, CSV/TSV, Hugging Face `datasets`
//! folders, Parquet), prompt templates, and tokenisation into prompt/response id pairs where the prompt is
//! always an exact prefix.

mod columnar;

use std::path::Path;

use serde_json::Value;

use crate::load::LanguageModel;
use crate::template::Message;
use crate::{Error, Result};

/// How a record's prompt becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// The prompt as is.
    Raw,
    /// The model's own chat template, with the generation prompt.
    Chat,
    /// The Stanford Alpaca prompt.
    Alpaca,
}

/// The template `reft train` uses unless told otherwise, and the one `eval`, `generate` and
/// `chat` fall back on when neither a flag nor the adapter (which records its own) says.
/// SmolLM2 and the other models pyreft users train are instruction-tuned chat models.
pub const DEFAULT_TEMPLATE: Template = Template::Chat;

impl Template {
    /// The name on the command line and in `reft_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Template::Raw => "raw",
            Template::Chat => "chat",
            Template::Alpaca => "alpaca",
        }
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Template::Raw),
            "chat" => Ok(Template::Chat),
            "alpaca" => Ok(Template::Alpaca),
            _ => Err(Error::InvalidArgument(format!(
                "unknown template `{s}` (raw, chat, alpaca)"
            ))),
        }
    }
}

/// Field names to read from records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fields {
    /// Prompt (or Alpaca instruction) field.
    pub prompt: String,
    /// Response (or Alpaca output) field.
    pub response: String,
    /// Alpaca's optional input field.
    pub input: String,
    /// Chat records' message list.
    pub messages: String,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            prompt: "prompt".into(),
            response: "response".into(),
            input: "input".into(),
            messages: "messages".into(),
        }
    }
}

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The conversation before the response (one user turn for prompt/response records).
    pub messages: Vec<Message>,
    /// Alpaca's input, when present.
    pub input: Option<String>,
    /// The text the model learns to produce.
    pub response: String,
}

/// Reads records from a JSONL, JSON (array), CSV or TSV file, a Hugging Face `datasets` folder
/// (`Dataset.save_to_disk`: Arrow IPC streams beside `state.json`/`dataset_info.json`), a single
/// `.arrow` file, or a `.parquet` file or folder of them (one split). A bad line is reported with
/// its number, a bad Arrow or Parquet row as `row N` (1-based, counted across the files).
pub fn read_records(path: &Path, fields: &Fields) -> Result<Vec<Record>> {
    // Only the columns `record_of` reads: other Arrow or Parquet columns (long passages, images, types JSON
    // cannot hold) are never converted.
    let columns = [
        fields.prompt.as_str(),
        &fields.response,
        &fields.input,
        &fields.messages,
    ];
    let (rows, unit) = read_rows(path, &columns)?;
    records_of(path, unit, rows.into_iter(), fields)
}

/// The rows of a data file (JSONL, JSON array, CSV, TSV), of a Hugging Face `datasets` folder or
/// `.arrow` file, or of Parquet files, as JSON objects numbered from 1, and what the numbers count
/// (`"line"` for text files, `"row"` for the columnar formats, where only `columns` are
/// converted).
pub fn read_rows(path: &Path, columns: &[&str]) -> Result<(Vec<(usize, Value)>, &'static str)> {
    if let Some(files) = columnar::columnar_files(path)? {
        let rows = columnar::read_rows(&files, columns)?;
        return Ok((
            rows.into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
            "row",
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, msg: String| Error::BadConfig {
        path: path.to_path_buf(),
        msg: match msg.strip_prefix("column ") {
            Some(rest) => format!("line {line}, column {rest}"),
            None => format!("line {line}: {msg}"),
        },
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_lowercase();
    let rows: Vec<(usize, Value)> = match ext.as_str() {
        "csv" | "tsv" => delimited(&text, if ext == "csv" { ',' } else { '\t' })
            .map_err(|(line, msg)| bad(line, msg))?,
        "json" => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(a)) => a.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
            Ok(_) => return Err(bad(1, "expected a JSON array of records".into())),
            Err(e) => return Err(bad(e.line(), json_error(&e))),
        },
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| bad(i + 1, json_error(&e)))
            })
            .collect::<Result<_>>()?,
    };
    Ok((rows, "line"))
}

/// A JSON syntax error as `column C: not JSON: what`, for a message that already names the
/// file's line (serde_json's own text ends in "at line L column C", L counting within the text
/// it was given, which for JSON Lines is always 1).
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("column {}: not JSON: {what}", e.column())
}

/// Records from numbered rows; a bad one is reported as `{unit} {number}`.
fn records_of(
    path: &Path,
    unit: &str,
    rows: impl ExactSizeIterator<Item = (usize, Value)>,
    fields: &Fields,
) -> Result<Vec<Record>> {
    let mut out = Vec::with_capacity(rows.len());
    for (n, v) in rows {
        out.push(record_of(&v, fields).map_err(|msg| Error::BadConfig {
            path: path.to_path_buf(),
            msg: format!("{unit} {n}: {msg}"),
        })?);
    }
    if out.is_empty() {
        return Err(Error::BadConfig {
            path: path.to_path_buf(),
            msg: "no records".into(),
        });
    }
    Ok(out)
}

fn record_of(v: &Value, f: &Fields) -> std::result::Result<Record, String> {
    let text = |key: &str| -> Option<String> {
        match v.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    if let Some(Value::Array(msgs)) = v.get(&f.messages) {
        let mut messages: Vec<Message> = msgs
            .iter()
            .map(|m| {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or("a message without `role`")?;
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or("a message without `content`")?;
                Ok(Message::new(role, content))
            })
            .collect::<std::result::Result<_, &str>>()?;
        let last = messages.pop().ok_or("empty `messages`")?;
        if last.role != "assistant" {
            return Err("the last message must be the assistant's response".into());
        }
        return Ok(Record {
            messages,
            input: None,
            response: last.content,
        });
    }
    let prompt = text(&f.prompt).ok_or_else(|| {
        let mut msg = format!("no `{}` field", f.prompt);
        if f.prompt != "instruction" && v.get("instruction").is_some() {
            msg.push_str(
                " (an Alpaca record? use --prompt-field instruction --response-field output)",
            );
        }
        msg
    })?;
    let response = text(&f.response).ok_or_else(|| format!("no `{}` field", f.response))?;
    let input = text(&f.input).filter(|s| !s.is_empty());
    Ok(Record {
        messages: vec![Message::new("user", prompt)],
        input,
        response,
    })
}

/// A minimal RFC 4180 reader: a header row, quoted fields with doubled quotes.
fn delimited(text: &str, sep: char) -> std::result::Result<Vec<(usize, Value)>, (usize, String)> {
    let mut rows = Vec::new();
    let mut line_no = 1;
    let mut fields: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut row_start = 1;
    let mut all: Vec<(usize, Vec<String>)> = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == sep && !quoted => fields.push(std::mem::take(&mut cur)),
            '\n' if !quoted => {
                fields.push(std::mem::take(&mut cur).trim_end_matches('\r').to_string());
                all.push((row_start, std::mem::take(&mut fields)));
                line_no += 1;
                row_start = line_no;
            }
            '\n' => {
                cur.push('\n');
                line_no += 1;
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err((row_start, "unterminated quoted field".into()));
    }
    if !cur.is_empty() || !fields.is_empty() {
        fields.push(cur);
        all.push((row_start, fields));
    }
    let mut it = all
        .into_iter()
        .filter(|(_, f)| !(f.len() == 1 && f[0].is_empty()));
    let Some((_, header)) = it.next() else {
        return Ok(rows);
    };
    for (line, f) in it {
        if f.len() != header.len() {
            return Err((
                line,
                format!("{} fields, the header has {}", f.len(), header.len()),
            ));
        }
        let obj: serde_json::Map<String, Value> = header
            .iter()
            .cloned()
            .zip(f.into_iter().map(Value::String))
            .collect();
        rows.push((line, Value::Object(obj)));
    }
    Ok(rows)
}

/// The Stanford Alpaca prompt.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(inp) => format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
        ),
        None => format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    }
}

/// One tokenised example: the prompt is an exact prefix of `prompt_ids ++ response_ids`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// Prompt tokens.
    pub prompt_ids: Vec<u32>,
    /// Response tokens (EOS appended unless disabled).
    pub response_ids: Vec<u32>,
}

impl Example {
    /// Tokens in the whole sequence.
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.response_ids.len()
    }

    /// Whether the example has no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole sequence.
    pub fn ids(&self) -> Vec<u32> {
        let mut v = self.prompt_ids.clone();
        v.extend_from_slice(&self.response_ids);
        v
    }
}

/// Options for turning records into examples.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeOptions {
    /// Prompt template.
    pub template: Template,
    /// Append EOS to the response.
    pub add_eos: bool,
    /// Longest sequence; prompts lose tokens on the left, responses on the right.
    pub max_length: Option<usize>,
}

/// The rendered prompt text of a record.
pub fn prompt_text(lm: &LanguageModel, r: &Record, template: Template) -> Result<String> {
    let user = r.messages.last().map(|m| m.content.as_str()).unwrap_or("");
    Ok(match template {
        Template::Raw => r
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Template::Alpaca => alpaca_prompt(user, r.input.as_deref()),
        Template::Chat => lm.chat_template.render(&r.messages, true)?,
    })
}

/// The token ids of a rendered prompt: raw and Alpaca prompts get the tokenizer's own special
/// tokens (BOS where it adds one), as `tokenizer(prompt)` does in pyreft; the chat template
/// writes its own.
pub fn encode_prompt(lm: &LanguageModel, text: &str, template: Template) -> Result<Vec<u32>> {
    match template {
        Template::Chat => lm.tokenizer.encode(text),
        _ => lm.tokenizer.encode_with_special_tokens(text),
    }
}

/// The prompt ids of a conversation that ends with the user's turn, in `template`: what
/// training saw before the response, so an adapter's positions land where they were learnt.
pub fn prompt_ids(
    lm: &LanguageModel,
    messages: &[Message],
    template: Template,
) -> Result<Vec<u32>> {
    let record = Record {
        messages: messages.to_vec(),
        input: None,
        response: String::new(),
    };
    encode_prompt(lm, &prompt_text(lm, &record, template)?, template)
}

/// Tokenises records; returns the examples and how many were truncated.
pub fn tokenize(
    lm: &LanguageModel,
    records: &[Record],
    opts: &TokenizeOptions,
) -> Result<(Vec<Example>, usize)> {
    let mut out = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for r in records {
        let text = prompt_text(lm, r, opts.template)?;
        let mut prompt_ids = encode_prompt(lm, &text, opts.template)?;
        let mut response_ids = lm.tokenizer.encode(&r.response)?;
        if opts.add_eos {
            if let Some(&eos) = lm.tokenizer.eos_ids.first() {
                response_ids.push(eos);
            }
        }
        if let Some(max) = opts.max_length {
            if prompt_ids.len() + response_ids.len() > max {
                truncated += 1;
                let keep_prompt = prompt_ids.len().min(max.saturating_sub(1).max(1));
                prompt_ids.drain(..prompt_ids.len() - keep_prompt);
                response_ids.truncate(max.saturating_sub(prompt_ids.len()).max(1));
            }
        }
        if prompt_ids.is_empty() || response_ids.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a record has an empty prompt or response after tokenisation: {:?}",
                r.response.chars().take(40).collect::<String>()
            )));
        }
        out.push(Example {
            prompt_ids,
            response_ids,
        });
    }
    Ok((out, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_csv_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("d.jsonl");
        std::fs::write(&j, "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"r\"}]}\n").unwrap();
        let r = read_records(&j, &Fields::default()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].response, "r");
        std::fs::write(&j, "{\"prompt\": \"a\", \"response\": \"b\"}\n{oops\n").unwrap();
        let e = read_records(&j, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&j, "{\"prompt\": \"a\"}\n").unwrap();
        let e = read_records(&j, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("response"), "{e}");
        let c = dir.path().join("d.csv");
        std::fs::write(
            &c,
            "prompt,response\n\"hello, world\",\"say \"\"hi\"\"\"\nx,y\n",
        )
        .unwrap();
        let r = read_records(&c, &Fields::default()).unwrap();
        assert_eq!(r[0].messages[0].content, "hello, world");
        assert_eq!(r[0].response, "say \"hi\"");
        std::fs::write(&c, "prompt,response\na,b,c\n").unwrap();
        assert!(read_records(&c, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("line 2"));
        std::fs::write(&j, "\n").unwrap();
        assert!(read_records(&j, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("no records"));
    }
}
