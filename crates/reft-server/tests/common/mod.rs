//! Helpers for the server tests: the real SmolLM2, seeded adapters saved as folders, a server
//! state around a fresh engine, and one-shot HTTP calls into the router.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device};
use http_body_util::BodyExt;
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel};
use reft::data::{prompt_ids, Template};
use reft::engine::{Engine, EngineLimits};
use reft::generate::{generate, GenerationConfig};
use reft::model::{Hooks, NoHooks};
use reft::template::Message;
use reft::LanguageModel;
use reft_server::{AdapterEntry, AppState, Options};
use serde_json::Value;
use tower::ServiceExt;

/// The default model, fetched into the cache on first use, loaded once per test binary.
pub fn smollm2() -> &'static Arc<LanguageModel> {
    static MODEL: OnceLock<Arc<LanguageModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        Arc::new(
            LanguageModel::load(
                reft::hub::DEFAULT_MODEL,
                &Device::Cpu,
                &reft::LoadOptions::default(),
                &mut |m| eprintln!("{m}"),
            )
            .expect("the default model loads"),
        )
    })
}

/// The served adapters (name, spec, seed): kinds, layers and positions that differ, none
/// editing a position another edits.
pub const ADAPTERS: [(&str, &str, u64); 3] = [
    (
        "early",
        r#"{"interventions": [{"kind": "loreft", "layers": "3;9", "rank": 4, "positions": "f1+l1"}]}"#,
        11,
    ),
    (
        "middle",
        r#"{"interventions": [{"kind": "direft", "layers": "15", "rank": 8, "positions": "l2"}]}"#,
        12,
    ),
    (
        "late",
        r#"{"interventions": [{"kind": "loreft", "layers": "25", "rank": 2, "positions": "f3+l3"}]}"#,
        13,
    ),
];

/// An adapter that edits what `early` edits (the last position of layer 3).
pub const CLASHES_WITH_EARLY: (&str, &str, u64) = (
    "clash",
    r#"{"interventions": [{"kind": "loreft", "layers": "3", "rank": 4, "positions": "l1"}]}"#,
    14,
);

/// A folder holding one saved adapter per entry of [`ADAPTERS`] plus [`CLASHES_WITH_EARLY`],
/// made once per test binary.
pub fn adapter_root() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let lm = smollm2();
        for (name, spec, seed) in ADAPTERS.iter().chain([&CLASHES_WITH_EARLY]) {
            let spec: AdapterSpec = serde_json::from_str(spec).unwrap();
            let c = lm.decoder.config();
            let config = AdapterConfig {
                format_version: 1,
                base_model: Some(BaseModel::of(lm)),
                interventions: spec.expand(c.num_layers).unwrap(),
                template: Some("chat".into()),
                training: None,
            };
            let a = Adapter::init(config, c.hidden_size, *seed, DType::F32, &Device::Cpu).unwrap();
            a.save(&dir.path().join(name)).unwrap();
        }
        dir
    })
    .path()
}

/// The saved adapter `name`, loaded as the server loads it.
pub fn open_adapter(name: &str) -> Adapter {
    let lm = smollm2();
    Adapter::open(
        &adapter_root().join(name),
        Some(&BaseModel::of(lm)),
        "l1",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// A ready server state with `names` registered (from [`adapter_root`]).
pub fn state_with(names: &[&str], opts: Options, limits: EngineLimits) -> Arc<AppState> {
    let lm = Arc::clone(smollm2());
    let adapters: Vec<(String, Adapter)> = names
        .iter()
        .map(|n| (n.to_string(), open_adapter(n)))
        .collect();
    let entries = names
        .iter()
        .map(|n| AdapterEntry::new(*n, adapter_root().join(n)))
        .collect();
    let engine = Engine::start(Arc::clone(&lm), adapters, limits).unwrap();
    let state = AppState::new(opts);
    state.set_ready(lm, engine, entries);
    state
}

/// The three adapters, default options and limits.
pub fn state() -> Arc<AppState> {
    let names: Vec<&str> = ADAPTERS.iter().map(|a| a.0).collect();
    state_with(&names, Options::default(), EngineLimits::default())
}

/// A response: status, headers, body bytes.
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error.message` of an OpenAI error body.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {}", self.text()))
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// One request through the router.
pub async fn call(state: &Arc<AppState>, method: &str, path: &str, body: &str) -> Reply {
    call_with(state, method, path, body, &[]).await
}

/// One request with extra headers.
pub async fn call_with(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = reft_server::router(Arc::clone(state))
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// What `reft generate --chat` gives `user` greedily with `adapter` (or the base), alone: text
/// and token count.
pub fn generate_alone(user: &str, adapter: Option<&str>, max_tokens: usize) -> (String, usize) {
    let lm = smollm2();
    let ids = prompt_ids(lm, &[Message::new("user", user)], Template::Chat).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: max_tokens,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let mut loaded = adapter.map(open_adapter);
    let hooks: &mut dyn Hooks = match &mut loaded {
        Some(a) => a,
        None => &mut NoHooks,
    };
    let out = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[ids],
        &cfg,
        hooks,
        &mut |_, _| {},
    )
    .unwrap();
    (out[0].text.clone(), out[0].ids.len())
}

/// A greedy chat request body.
pub fn chat_body(model: &str, user: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

/// The text and completion tokens of a chat answer, streamed or not.
pub fn answer(r: &Reply, stream: bool) -> (String, usize) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    if !stream {
        let v = r.json();
        return (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        );
    }
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut tokens = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    (text, tokens.expect("a usage in the stream"))
}

/// The ids `/v1/models` lists, in order.
pub async fn model_ids(state: &Arc<AppState>) -> Vec<String> {
    call(state, "GET", "/v1/models", "").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The path of an adapter folder, for bodies.
pub fn adapter_path(name: &str) -> PathBuf {
    adapter_root().join(name)
}
