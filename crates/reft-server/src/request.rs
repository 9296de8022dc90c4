//! Reading an OpenAI request body: every field is checked by hand so that a wrong type or an
//! unsupported option gets a 400 naming the field, never a silent default.

use reft::generate::GenerationConfig;
use reft::template::Message;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The two generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/chat/completions`: messages through the model's chat template.
    Chat,
    /// `/v1/completions`: a raw prompt.
    Completion,
}

/// What the prompt is, before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation.
    Messages(Vec<Message>),
    /// Text completed as given.
    Text(String),
}

/// A parsed generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The `model` field (`None`: the base).
    pub model: Option<String>,
    /// reft's extension: more adapters to compose.
    pub adapters: Vec<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// `max_tokens` (or `max_completion_tokens`), if given.
    pub max_tokens: Option<usize>,
    /// Sampling settings; `max_new_tokens` and `stop_ids` are filled in later.
    pub cfg: GenerationConfig,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Fields every generation route understands.
const COMMON: &[&str] = &[
    "model",
    "adapters",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "repetition_penalty",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "user",
];
/// Fields only the chat route understands.
const CHAT: &[&str] = &["messages", "max_completion_tokens", "top_logprobs"];
/// Fields only the completion route understands.
const COMPLETION: &[&str] = &["prompt", "echo", "best_of", "suffix"];

/// Parses a body for `route`.
pub fn parse(route: Route, body: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let own = match route {
        Route::Chat => CHAT,
        Route::Completion => COMPLETION,
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::bad_field(
            k,
            format!("`{k}` is not supported by this server"),
        ));
    }
    let f = Fields(&map);
    f.only_neutral()?;
    let prompt = match route {
        Route::Chat => Prompt::Messages(messages(&map)?),
        Route::Completion => Prompt::Text(completion_prompt(&map)?),
    };
    let max_tokens = match f.uint("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.uint("max_tokens")?,
    };
    let temperature = f.float("temperature")?;
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad_field(
            "temperature",
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = f.float("top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad_field("top_p", "`top_p` must be in (0, 1]"));
    }
    let repetition_penalty = f.float("repetition_penalty")?.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return Err(ApiError::bad_field(
            "repetition_penalty",
            "`repetition_penalty` must be positive",
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match map.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::bad_field(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let cfg = GenerationConfig {
        temperature,
        top_p,
        top_k: f.top_k()?,
        repetition_penalty,
        seed: f.uint("seed")?.map_or_else(fresh_seed, |s| s as u64),
        stop_strings: f.stop()?,
        ..Default::default()
    };
    Ok(Parsed {
        model: f.string("model")?,
        adapters: f.strings("adapters")?,
        prompt,
        max_tokens,
        cfg,
        stream,
        include_usage,
    })
}

/// A seed for a request that names none, so that sampled answers differ between requests as
/// they do with OpenAI.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Typed access to a body's fields, with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn uint(&self, k: &str) -> Result<Option<usize>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    ApiError::bad_field(k, format!("`{k}` must be a non-negative integer"))
                })
            })
            .transpose()
    }

    fn float(&self, k: &str) -> Result<Option<f64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| ApiError::bad_field(k, format!("`{k}` must be a number")))
            })
            .transpose()
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| ApiError::bad_field(k, format!("`{k}` must be true or false")))
            })
            .transpose()
    }

    fn string(&self, k: &str) -> Result<Option<String>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad_field(k, format!("`{k}` must be a string")))
            })
            .transpose()
    }

    /// A list of strings (a lone string counts as a list of one).
    fn strings(&self, k: &str) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::bad_field(k, format!("`{k}` must be a string or a list of strings"));
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }

    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let stops = self.strings("stop")?;
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::bad_field(
                "stop",
                "`stop` strings must not be empty",
            ));
        }
        Ok(stops)
    }

    /// `top_k`; 0 and -1 mean "off", as in vLLM.
    fn top_k(&self) -> Result<Option<usize>, ApiError> {
        match self.get("top_k") {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(-1 | 0) => Ok(None),
                Some(k) if k > 0 => Ok(Some(k as usize)),
                _ => Err(ApiError::bad_field(
                    "top_k",
                    "`top_k` must be a positive integer (or 0 / -1 for none)",
                )),
            },
        }
    }

    /// Options this server accepts only at the value that asks for nothing: one choice, no
    /// log-probabilities, no presence or frequency penalty, no echo or suffix.
    fn only_neutral(&self) -> Result<(), ApiError> {
        let refuse = |k: &str, why: &str| Err(ApiError::bad_field(k, format!("`{k}`: {why}")));
        for k in ["n", "best_of"] {
            if self.get(k).is_some_and(|v| v.as_u64() != Some(1)) {
                return refuse(k, "only 1 is supported (send several requests instead)");
            }
        }
        if self
            .get("logprobs")
            .is_some_and(|v| v != &Value::Bool(false))
        {
            return refuse("logprobs", "log-probabilities are not supported");
        }
        if self.get("top_logprobs").is_some() {
            return refuse("top_logprobs", "log-probabilities are not supported");
        }
        for k in ["presence_penalty", "frequency_penalty"] {
            if self.get(k).is_some_and(|v| v.as_f64() != Some(0.0)) {
                return refuse(k, "not supported; use `repetition_penalty`");
            }
        }
        if self.get("echo").is_some_and(|v| v != &Value::Bool(false)) {
            return refuse("echo", "echoing the prompt is not supported");
        }
        if self.get("suffix").is_some() {
            return refuse("suffix", "a suffix is not supported");
        }
        if self.get("user").is_some_and(|v| !v.is_string()) {
            return refuse("user", "must be a string");
        }
        Ok(())
    }
}

/// The `messages` of a chat request.
fn messages(map: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let bad = |m: String| ApiError::bad_field("messages", m);
    let Some(Value::Array(list)) = map.get("messages") else {
        return Err(bad("`messages` must be a list of messages".into()));
    };
    if list.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(bad(format!("messages[{i}] must be an object")));
            };
            if let Some(k) = m
                .keys()
                .find(|k| !["role", "content", "name"].contains(&k.as_str()))
            {
                return Err(bad(format!("messages[{i}].{k} is not supported")));
            }
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "developer" | "user" | "assistant")) => {
                    if r == "developer" {
                        "system"
                    } else {
                        r
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "messages[{i}].role must be system, user or assistant"
                    )))
                }
            };
            Ok(Message::new(role, content(m.get("content"), i)?))
        })
        .collect()
}

/// A message's content: a string, or a list of text parts.
fn content(v: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_field(
            "messages",
            format!("messages[{i}].content must be a string or a list of text parts"),
        )
    };
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (p.get("type"), p.get("text")) {
                (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => Ok(s.as_str()),
                (Some(Value::String(t)), _) if t != "text" => Err(ApiError::bad_field(
                    "messages",
                    format!("messages[{i}]: content parts of type `{t}` are not supported"),
                )),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(bad()),
    }
}

/// The `prompt` of a completion request: a string, or a list holding one.
fn completion_prompt(map: &Map<String, Value>) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::bad_field("prompt", m);
    match map.get("prompt") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [_] => Err(bad("`prompt` must be a string")),
            _ => Err(bad(
                "`prompt` must be one string (send one request per prompt)",
            )),
        },
        None | Some(Value::Null) => Err(bad("`prompt` is required")),
        Some(_) => Err(bad("`prompt` must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(route: Route, body: &str) -> ApiError {
        parse(route, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_full_chat_request_is_read() {
        let p = parse(
            Route::Chat,
            br#"{"model": "emoji", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}],
                "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3,
                "stop": "END", "repetition_penalty": 1.1, "stream": true,
                "stream_options": {"include_usage": true}, "n": 1, "logprobs": false,
                "adapters": ["a", "b"], "user": "me"}"#,
        )
        .unwrap();
        assert_eq!(p.model.as_deref(), Some("emoji"));
        assert_eq!(p.adapters, ["a", "b"]);
        assert_eq!(
            p.prompt,
            Prompt::Messages(vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi!")
            ])
        );
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.cfg.temperature, Some(0.5));
        assert_eq!(p.cfg.top_p, Some(0.9));
        assert_eq!(p.cfg.top_k, Some(40));
        assert_eq!(p.cfg.seed, 3);
        assert_eq!(p.cfg.stop_strings, ["END"]);
        assert!((p.cfg.repetition_penalty - 1.1).abs() < 1e-12);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn unsupported_and_mistyped_fields_are_named() {
        let cases = [
            (
                Route::Chat,
                r#"{"messages": [], "tools": []}"#,
                "tools",
                "not supported",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"user","content":"x"}], "n": 2}"#,
                "n",
                "only 1",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"user","content":"x"}], "logprobs": true}"#,
                "logprobs",
                "not supported",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"user","content":"x"}], "max_tokens": "9"}"#,
                "max_tokens",
                "non-negative integer",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"user","content":"x"}], "temperature": 3}"#,
                "temperature",
                "between 0 and 2",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"tool","content":"x"}]}"#,
                "messages",
                "role",
            ),
            (
                Route::Chat,
                r#"{"messages": []}"#,
                "messages",
                "must not be empty",
            ),
            (
                Route::Chat,
                r#"{"messages": [{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages",
                "image_url",
            ),
            (
                Route::Completion,
                r#"{"prompt": ["a", "b"]}"#,
                "prompt",
                "one string",
            ),
            (
                Route::Completion,
                r#"{"prompt": "a", "messages": []}"#,
                "messages",
                "not supported",
            ),
            (
                Route::Completion,
                r#"{"prompt": "a", "echo": true}"#,
                "echo",
                "not supported",
            ),
            (Route::Completion, r#"{}"#, "prompt", "required"),
            (
                Route::Completion,
                r#"{"prompt": "a", "stop": ""}"#,
                "stop",
                "empty",
            ),
        ];
        for (route, body, param, words) in cases {
            let e = err(route, body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(words), "{body}: {}", e.message);
        }
        let e = err(Route::Chat, "{not json");
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(err(Route::Chat, "[1]").message.contains("JSON object"));
    }
}
