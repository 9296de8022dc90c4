//! The routes around generation: `/health`, `/v1/models`, and loading and unloading adapters
//! at run time (vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use candle_core::DType;
use reft::adapter::{Adapter, BaseModel};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::{lock, AdapterEntry, AppState};

/// `GET /health`: 200 once the model is loaded, 503 before.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.ready() {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`: the base first, then every adapter with the base as `parent`.
pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let ready = state.ready()?;
    let base = &state.opts.base_name;
    let context = ready.engine.context_limit();
    let mut data = vec![json!({
        "id": base,
        "object": "model",
        "created": state.started,
        "owned_by": "reft",
        "root": base,
        "parent": null,
        "max_model_len": context,
    })];
    for a in lock(&ready.adapters).iter() {
        data.push(json!({
            "id": a.name,
            "object": "model",
            "created": a.created,
            "owned_by": "reft",
            "root": a.path.display().to_string(),
            "parent": base,
            "max_model_len": context,
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A string field of an admin body.
fn field(body: &Value, k: &str) -> Result<String, ApiError> {
    match body.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ApiError::bad_field(
            k,
            format!("`{k}` must be a non-empty string"),
        )),
    }
}

fn admin_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// `POST /v1/load_lora_adapter` with `{"lora_name", "lora_path"}`: a reft or pyreft folder
/// under `--adapter-root` (a relative path is taken from there).
pub async fn load_adapter(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let root = adapter_root(&state)?;
    let body = admin_body(body)?;
    let ready = state.ready()?;
    let name = field(&body, "lora_name")?;
    if name == state.opts.base_name {
        return Err(ApiError::bad_field(
            "lora_name",
            format!("`{name}` is the base model's name"),
        ));
    }
    let dir = inside_root(&root, &field(&body, "lora_path")?)?;
    let _admin = ready.admin.lock().await;
    if ready.engine.adapter_names().contains(&name) {
        return Err(ApiError::bad_field(
            "lora_name",
            format!("an adapter named `{name}` is already loaded"),
        ));
    }
    let st = Arc::clone(&state);
    let (n, d) = (name.clone(), dir.clone());
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        let ready = st.ready()?;
        let lm = &ready.lm;
        let adapter = Adapter::open(
            &d,
            Some(&BaseModel::of(lm)),
            &st.opts.pyreft_positions,
            DType::F32,
            lm.decoder.device(),
        )
        .map_err(|e| {
            ApiError::bad_field("lora_path", format!("cannot load {}: {e}", d.display()))
        })?;
        ready.engine.load_adapter(&n, adapter)?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    lock(&ready.adapters).push(AdapterEntry::new(name.clone(), dir));
    Ok(format!("Success: adapter `{name}` loaded."))
}

/// `POST /v1/unload_lora_adapter` with `{"lora_name"}`: refuses new requests for it at once and
/// answers once no queued request needs it.
pub async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    adapter_root(&state)?;
    let body = admin_body(body)?;
    let ready = state.ready()?;
    let name = field(&body, "lora_name")?;
    let _admin = ready.admin.lock().await;
    let st = Arc::clone(&state);
    let n = name.clone();
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        Ok(st.ready()?.engine.unload_adapter(&n)?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    lock(&ready.adapters).retain(|a| a.name != name);
    Ok(format!("Success: adapter `{name}` unloaded."))
}

/// The adapter root, or 404 when loading at run time is off.
fn adapter_root(state: &AppState) -> Result<PathBuf, ApiError> {
    state.opts.adapter_root.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "loading adapters at run time is off; start the server with --adapter-root DIR",
        )
    })
}

/// `path` (relative to `root`, or absolute) resolved, if it lies under `root`.
fn inside_root(root: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let bad = |m: String| ApiError::bad_field("lora_path", m);
    let root = root.canonicalize().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("adapter root {}: {e}", root.display()),
        )
    })?;
    let dir = root
        .join(path)
        .canonicalize()
        .map_err(|_| bad(format!("`{path}` does not exist under the adapter root")))?;
    if !dir.starts_with(&root) {
        return Err(bad(format!(
            "`{path}` is not under the adapter root {}",
            root.display()
        )));
    }
    Ok(dir)
}
