//! `GET /metrics`: the engine's counters and the server's responses in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use reft::engine::HistogramSnapshot;

use crate::{lock, AppState};

/// The exposition, version 0.0.4 of the text format.
pub async fn render(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text(&state),
    )
}

fn text(state: &AppState) -> String {
    let mut out = String::new();
    let o = &mut out;
    family(
        o,
        "reft_requests_total",
        "counter",
        "HTTP responses by route and status.",
    );
    for ((route, status), n) in lock(&state.statuses).iter() {
        let _ = writeln!(
            o,
            "reft_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            escape(route)
        );
    }
    let ready = state.ready.get();
    family(o, "reft_ready", "gauge", "1 once the model is loaded.");
    let _ = writeln!(o, "reft_ready {}", u8::from(ready.is_some()));
    let Some(ready) = ready else {
        return out;
    };
    let s = ready.engine.stats();
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::SeqCst);
    let scalars = [
        (
            "reft_queue_length",
            "gauge",
            "Requests waiting to be prefilled.",
            load(&s.queued),
        ),
        (
            "reft_running_sequences",
            "gauge",
            "Sequences decoding.",
            load(&s.running),
        ),
        (
            "reft_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            load(&s.prompt_tokens),
        ),
        (
            "reft_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens whose keys and values were reused from the prefix cache.",
            load(&s.prompt_tokens_cached),
        ),
        (
            "reft_prefix_cache_bytes",
            "gauge",
            "Bytes of prompt-prefix keys and values kept for reuse.",
            load(&s.prefix_cache_bytes),
        ),
        (
            "reft_generated_tokens_total",
            "counter",
            "Tokens generated.",
            load(&s.generated_tokens),
        ),
        (
            "reft_cancelled_requests_total",
            "counter",
            "Requests whose client went away.",
            load(&s.cancelled),
        ),
        (
            "reft_adapters_loaded",
            "gauge",
            "Adapters registered.",
            ready.engine.adapter_names().len(),
        ),
    ];
    for (name, kind, help, v) in scalars {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    histogram(
        o,
        "reft_time_to_first_token_seconds",
        "Seconds from submission to the first text.",
        &s.time_to_first_token.snapshot(),
    );
    histogram(
        o,
        "reft_inter_token_latency_seconds",
        "Seconds between consecutive pieces of a sequence's text.",
        &s.inter_token_latency.snapshot(),
    );
    family(
        o,
        "reft_adapter_requests_total",
        "counter",
        "Requests accepted, by adapter set (`+`-joined; empty: the base model).",
    );
    for (set, n) in lock(&s.requests_by_adapter).iter() {
        let _ = writeln!(
            o,
            "reft_adapter_requests_total{{adapters=\"{}\"}} {n}",
            escape(set)
        );
    }
    out
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(o: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    family(o, name, "histogram", help);
    for (bound, n) in &h.buckets {
        let le = if bound.is_infinite() {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(o, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
