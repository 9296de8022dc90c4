//! The HTTP layer of `reft serve`: OpenAI's wire format (as vLLM and llama.cpp speak it) over
//! [`reft::engine::Engine`]. This crate only translates: requests into submissions, engine
//! updates into JSON and server-sent events, engine counters into Prometheus text. Scheduling,
//! batching and adapters live in the engine.
//!
//! The server answers as soon as it is bound: `/health` says 503 and every other route a 503
//! error until [`AppState::set_ready`] hands it the loaded model and engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use reft::engine::Engine;
use reft::LanguageModel;

mod admin;
mod completions;
pub mod error;
mod metrics;
pub mod request;

pub use error::ApiError;

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The base model's name in `model` fields and `/v1/models`.
    pub base_name: String,
    /// When set, every `/v1` route needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Folder under which `/v1/load_lora_adapter` may load adapters; `None` turns it off.
    pub adapter_root: Option<PathBuf>,
    /// Largest `max_tokens` a request may ask for (also the default, within the context).
    pub max_tokens_limit: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Positions for pyreft folders loaded at run time (they do not record them).
    pub pyreft_positions: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            base_name: reft::hub::DEFAULT_MODEL.to_string(),
            api_key: None,
            adapter_root: None,
            max_tokens_limit: 2048,
            body_limit: 2 << 20,
            pyreft_positions: "l1".to_string(),
        }
    }
}

/// A served adapter, as `/v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    /// Its name (the `model` that asks for it).
    pub name: String,
    /// The folder it came from.
    pub path: PathBuf,
    /// When it was registered (Unix seconds).
    pub created: u64,
}

impl AdapterEntry {
    /// An entry for `name` from `path`, registered now.
    pub fn new(name: impl Into<String>, path: PathBuf) -> Self {
        Self {
            name: name.into(),
            path,
            created: unix_now(),
        }
    }
}

/// The model and engine, once loaded.
pub struct Ready {
    /// The frozen base model (for tokenising and its chat template).
    pub lm: Arc<LanguageModel>,
    /// The engine serving it.
    pub engine: Engine,
    adapters: Mutex<Vec<AdapterEntry>>,
    /// Serialises run-time loads and unloads, so a name is checked and taken atomically.
    admin: tokio::sync::Mutex<()>,
}

/// Everything the handlers share.
pub struct AppState {
    opts: Options,
    ready: OnceLock<Ready>,
    /// Responses by route and status, for `/metrics`.
    statuses: Mutex<BTreeMap<(String, u16), u64>>,
    next_id: AtomicU64,
    started: u64,
}

impl AppState {
    /// A server that is still loading.
    pub fn new(opts: Options) -> Arc<Self> {
        Arc::new(Self {
            opts,
            ready: OnceLock::new(),
            statuses: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            started: unix_now(),
        })
    }

    /// Hands over the loaded model and its engine, with the adapters registered at start.
    pub fn set_ready(&self, lm: Arc<LanguageModel>, engine: Engine, adapters: Vec<AdapterEntry>) {
        let _ = self.ready.set(Ready {
            lm,
            engine,
            adapters: Mutex::new(adapters),
            admin: tokio::sync::Mutex::new(()),
        });
    }

    /// The engine, or 503 while loading.
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading",
            )
        })
    }

    /// The options the server runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Lets running and queued requests finish, then stops the engine (blocking).
    pub fn drain(&self) {
        if let Some(r) = self.ready.get() {
            r.engine.shutdown();
        }
    }

    fn fresh_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes: the chat page at `/`, `/health`, `/metrics`, and the OpenAI API under `/v1`.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/v1/models", get(admin::models))
        .route("/v1/load_lora_adapter", post(admin::load_adapter))
        .route("/v1/unload_lora_adapter", post(admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_key,
        ));
    Router::new()
        .route("/", get(page))
        .route("/health", get(admin::health))
        .route("/metrics", get(metrics::render))
        .merge(v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_status,
        ))
        .layer(DefaultBodyLimit::max(state.opts.body_limit))
        .with_state(state)
}

/// What [`run`] needs from the loader.
pub struct Loaded {
    /// The base model.
    pub lm: Arc<LanguageModel>,
    /// The engine, started on it.
    pub engine: Engine,
    /// The adapters registered at start.
    pub adapters: Vec<AdapterEntry>,
}

/// Runs a server until Ctrl-C or SIGTERM (or a failed load): binds `addr`, tells
/// `on_listening` the address, then runs `load` on a blocking thread while `/health` says 503.
/// On a signal, open requests finish (streams included) before it returns.
pub fn run(
    opts: Options,
    addr: &str,
    on_listening: impl FnOnce(std::net::SocketAddr),
    load: impl FnOnce() -> Result<Loaded, String> + Send + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("reft-http")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        on_listening(listener.local_addr()?);
        let state = AppState::new(opts);
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let st = Arc::clone(&state);
        tokio::task::spawn_blocking(move || match load() {
            Ok(l) => st.set_ready(l.lm, l.engine, l.adapters),
            Err(e) => {
                let _ = failed_tx.send(e);
            }
        });
        let (why_tx, why_rx) = tokio::sync::oneshot::channel::<Option<String>>();
        let stop = async move {
            let why = tokio::select! {
                _ = shutdown_signal() => None,
                Ok(e) = failed_rx => Some(e),
            };
            let _ = why_tx.send(why);
        };
        serve(listener, state, stop).await?;
        match why_rx.await {
            Ok(Some(e)) => Err(std::io::Error::other(e)),
            _ => Ok(()),
        }
    })
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open requests (streams
/// included) finish and drains the engine.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(Arc::clone(&state)))
        .with_graceful_shutdown(shutdown)
        .await?;
    tokio::task::spawn_blocking(move || state.drain())
        .await
        .map_err(std::io::Error::other)
}

/// The chat page: plain HTML and JavaScript, no build step, nothing fetched from elsewhere.
async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Refuses `/v1` requests without the server's key (when it has one).
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.trim().as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send `Authorization: Bearer <key>`)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by route and status for `/metrics`.
async fn count_status(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    *lock(&state.statuses)
        .entry((route, resp.status().as_u16()))
        .or_default() += 1;
    resp
}
