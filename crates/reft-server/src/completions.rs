//! `/v1/chat/completions` and `/v1/completions`: a request becomes one engine submission; its
//! updates become one JSON answer, or server-sent events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use reft::data::{encode_prompt, prompt_ids, Template};
use reft::engine::{Submission, Update, UpdateSink};
use reft::generate::{FinishReason, Generation};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ApiError;
use crate::request::{self, Parsed, Prompt, Route};
use crate::{AppState, Ready};

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(state, Route::Chat, body).await
}

/// `POST /v1/completions`.
pub async fn completion(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(state, Route::Completion, body).await
}

async fn respond(
    state: Arc<AppState>,
    route: Route,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(state, route, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Engine updates into a tokio channel; a closed channel means the client has gone.
struct ChannelSink(UnboundedSender<Update>);

impl UpdateSink for ChannelSink {
    fn deliver(&mut self, update: Update) -> bool {
        self.0.send(update).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

async fn run(
    state: Arc<AppState>,
    route: Route,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let ready = state.ready()?;
    let parsed = request::parse(route, &body)?;
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    let model = parsed
        .model
        .clone()
        .unwrap_or_else(|| state.opts.base_name.clone());
    let submission = submission(&state, ready, parsed)?;
    let prompt_tokens = submission.prompt.len();
    let (tx, mut rx) = unbounded_channel();
    ready
        .engine
        .submit_to(submission, Box::new(ChannelSink(tx)))?;
    let enc = Encoder {
        route,
        id: state.fresh_id(match route {
            Route::Chat => "chatcmpl",
            Route::Completion => "cmpl",
        }),
        created: crate::unix_now(),
        model,
        prompt_tokens,
        include_usage,
    };
    // Wait for the first update before answering, so that a request that cannot run (adapters
    // that edit the same positions, …) gets an error status even when it asked for a stream.
    let first = next_update(&mut rx).await?;
    if let Update::Failed(f) = &first {
        return Err(failure(f));
    }
    if stream {
        return Ok(enc.stream(first, rx).into_response());
    }
    let mut update = first;
    loop {
        match update {
            Update::Text(_) => update = next_update(&mut rx).await?,
            Update::Done(g) => return Ok(Json(enc.whole(&g)).into_response()),
            Update::Failed(f) => return Err(failure(&f)),
        }
    }
}

async fn next_update(rx: &mut UnboundedReceiver<Update>) -> Result<Update, ApiError> {
    rx.recv().await.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine stopped before the request finished",
        )
    })
}

fn failure(f: &reft::engine::Failure) -> ApiError {
    match f.bad_request {
        true => ApiError::bad_request(f.message.clone()),
        false => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, f.message.clone()),
    }
}

/// Resolves the adapters, tokenises the prompt and settles the token budget.
fn submission(state: &AppState, ready: &Ready, p: Parsed) -> Result<Submission, ApiError> {
    let lm = &ready.lm;
    let mut adapters = Vec::new();
    match p.model.as_deref() {
        None => {}
        Some(m) if m == state.opts.base_name => {}
        Some(m) if ready.engine.adapter_names().iter().any(|n| n == m) => {
            adapters.push(m.to_string())
        }
        Some(m) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                "the model `{m}` does not exist (GET /v1/models lists the base and the adapters)"
            ),
            )
            .with_code("model_not_found"))
        }
    }
    for a in p.adapters {
        if adapters.contains(&a) {
            return Err(ApiError::bad_field(
                "adapters",
                format!("adapter `{a}` is asked for twice"),
            ));
        }
        adapters.push(a);
    }
    let prompt = match &p.prompt {
        Prompt::Messages(m) => prompt_ids(lm, m, Template::Chat)?,
        Prompt::Text(t) => encode_prompt(lm, t, Template::Raw)?,
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt has no tokens"));
    }
    let mut cfg = p.cfg;
    cfg.max_new_tokens = budget(state, ready, prompt.len(), p.max_tokens)?;
    cfg.stop_ids = lm.tokenizer.eos_ids.clone();
    Ok(Submission {
        prompt,
        cfg,
        adapters,
    })
}

/// New tokens for a prompt of `prompt` tokens: the request's `max_tokens` if it is within the
/// server's limit and the model's context, else a 400; by default the limit, within the context.
fn budget(
    state: &AppState,
    ready: &Ready,
    prompt: usize,
    asked: Option<usize>,
) -> Result<usize, ApiError> {
    let limit = state.opts.max_tokens_limit;
    let context = ready.engine.context_limit();
    // A prompt that fills the context is the engine's to refuse, with its own message.
    let room = context.map_or(usize::MAX, |c| c.saturating_sub(prompt));
    let Some(n) = asked else {
        return Ok(limit.min(room).max(1));
    };
    if n == 0 {
        return Err(ApiError::bad_field(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    if n > limit {
        return Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "`max_tokens` is {n}, over this server's limit of {limit} (--max-tokens-limit)"
            ),
        ));
    }
    match context {
        Some(c) if room > 0 && n > room => Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "the model's context is {c} tokens, but the prompt has {prompt} and `max_tokens` \
                 asks for {n} more"
            ),
        )
        .with_code("context_length_exceeded")),
        _ => Ok(n),
    }
}

/// Writes one request's answer in its route's format.
#[derive(Clone)]
struct Encoder {
    route: Route,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::StopId | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

impl Encoder {
    fn usage(&self, g: &Generation) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": g.ids.len(),
            "total_tokens": self.prompt_tokens + g.ids.len(),
        })
    }

    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The non-streaming answer.
    fn whole(&self, g: &Generation) -> Value {
        let reason = finish_reason(g.finish);
        let mut v = match self.route {
            Route::Chat => self.envelope(
                "chat.completion",
                json!([{
                    "index": 0,
                    "message": {"role": "assistant", "content": g.text},
                    "logprobs": null,
                    "finish_reason": reason,
                }]),
            ),
            Route::Completion => self.envelope(
                "text_completion",
                json!([{"index": 0, "text": g.text, "logprobs": null, "finish_reason": reason}]),
            ),
        };
        v["usage"] = self.usage(g);
        v
    }

    /// One streamed chunk: `text` so far unsent, or the end with its reason.
    fn chunk(&self, text: Option<&str>, reason: Option<&str>, first: bool) -> Value {
        match self.route {
            Route::Chat => {
                let delta = match (first, text) {
                    (true, t) => json!({"role": "assistant", "content": t.unwrap_or("")}),
                    (false, Some(t)) => json!({"content": t}),
                    (false, None) => json!({}),
                };
                self.envelope(
                    "chat.completion.chunk",
                    json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}]),
                )
            }
            Route::Completion => self.envelope(
                "text_completion",
                json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}]),
            ),
        }
    }

    /// The events of one update after the first.
    fn events(&self, u: Update) -> Vec<Value> {
        match u {
            Update::Text(t) => vec![self.chunk(Some(&t), None, false)],
            Update::Done(g) => {
                let mut end = self.chunk(None, Some(finish_reason(g.finish)), false);
                if !self.include_usage {
                    // Usage rides on the last chunk unless the client asked for OpenAI's
                    // separate usage chunk (never both: some clients add them up).
                    end["usage"] = self.usage(&g);
                    return vec![end];
                }
                let mut usage = self.envelope(end["object"].as_str().unwrap_or(""), json!([]));
                usage["usage"] = self.usage(&g);
                vec![end, usage]
            }
            Update::Failed(f) => vec![failure(&f).body()],
        }
    }

    /// The event stream: an opening chunk (with the chat role), then one chunk per piece of
    /// text, the end, and `[DONE]`.
    fn stream(
        self,
        first: Update,
        rx: UnboundedReceiver<Update>,
    ) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
        let mut head = vec![];
        match first {
            Update::Text(t) => head.push(self.chunk(Some(&t), None, self.route == Route::Chat)),
            other => {
                if self.route == Route::Chat {
                    head.push(self.chunk(None, None, true));
                }
                head.extend(self.events(other));
            }
        }
        let enc = self.clone();
        let rest = UnboundedReceiverStream::new(rx).flat_map(move |u| stream::iter(enc.events(u)));
        let events = stream::iter(head)
            .chain(rest)
            .map(|v| Event::default().data(v.to_string()))
            .chain(stream::once(async { Event::default().data("[DONE]") }))
            .map(Ok);
        Sse::new(events)
    }
}
