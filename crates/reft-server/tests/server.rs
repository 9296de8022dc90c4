//! The server on the real model, through its router: exact answers alone and batched, the
//! OpenAI formats, the documented errors, disconnects, run-time adapters and metrics.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use reft::engine::EngineLimits;
use reft_server::Options;
use serde_json::{json, Value};

const BASE: &str = reft::hub::DEFAULT_MODEL;

fn story(n: usize) -> String {
    format!("Write a short story about the number {n}.")
}

/// Greedy answers equal `generate` alone (what `reft generate --chat` runs) for the base and
/// each adapter: one request at a time, then 12 at once over the four (half of them streamed),
/// so that every decode step mixes adapters. The check is exact text and token count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_equal_generate_alone_and_when_twelve_share_the_batch() {
    let state = state();
    let models = [BASE, ADAPTERS[0].0, ADAPTERS[1].0, ADAPTERS[2].0];
    let want: Vec<(String, usize)> = (0..12)
        .map(|i| {
            let adapter = (i % 4 != 0).then(|| models[i % 4]);
            generate_alone(&story(i), adapter, 20 + i)
        })
        .collect();
    let bases: Vec<&(String, usize)> = want.iter().step_by(4).collect();
    assert!(
        (1..4).any(|k| want[k].0 != bases[0].0 || want[k + 4].0 != bases[1].0),
        "the adapters should change some answers"
    );
    for (i, model) in models.iter().enumerate() {
        for stream in [false, true] {
            let r = call(
                &state,
                "POST",
                "/v1/chat/completions",
                &chat_body(model, &story(i), 20 + i, stream),
            )
            .await;
            assert_eq!(
                answer(&r, stream),
                want[i],
                "{model} alone, stream {stream}"
            );
        }
    }
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let state = state.clone();
            tokio::spawn(async move {
                let stream = i % 2 == 1;
                let body = chat_body(models[i % 4], &story(i), 20 + i, stream);
                let r = call(&state, "POST", "/v1/chat/completions", &body).await;
                answer(&r, stream)
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap(),
            want[i],
            "request {i} ({}) of 12",
            models[i % 4]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completion_answers_have_openai_shape() {
    let state = state();
    let r = call(
        &state,
        "POST",
        "/v1/chat/completions",
        &chat_body(BASE, "Hi", 5, false),
    )
    .await;
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], BASE);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 5);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 5)
    );

    // A raw completion, streamed with OpenAI's separate usage chunk.
    let body = json!({"model": "early", "prompt": "The capital of France is", "max_tokens": 6,
        "stream": true, "stream_options": {"include_usage": true}});
    let r = call(&state, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let end = &chunks[chunks.len() - 2];
    assert_eq!(end["choices"][0]["finish_reason"], "length");
    assert!(end.get("usage").is_none(), "usage is sent once");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let whole = call(
        &state,
        "POST",
        "/v1/completions",
        &json!({"model": "early", "prompt": "The capital of France is", "max_tokens": 6})
            .to_string(),
    )
    .await
    .json();
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["text"].as_str().unwrap(), text);

    // A stop string ends the answer with `stop`, cut before it.
    let (full, _) = generate_alone("Count from 1 to 20, separated by commas.", None, 40);
    let cut = full.find('5').expect("the count reaches 5");
    let body = json!({"messages": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        "max_tokens": 40, "stop": ["5"]});
    let v = call(&state, "POST", "/v1/chat/completions", &body.to_string())
        .await
        .json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["content"], full[..cut]);
}

/// Each bad input gets its status and an OpenAI error body naming the problem, and the server
/// answers the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let opts = Options {
        body_limit: 64 << 10,
        max_tokens_limit: 100,
        ..Options::default()
    };
    let names = ["early", CLASHES_WITH_EARLY.0];
    let state = state_with(&names, opts, EngineLimits::default());
    let user = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let long_prompt = json!({"prompt": "hello ".repeat(9000), "max_tokens": 3}).to_string();
    let huge = json!({"prompt": "x".repeat(70 << 10)}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            "{\"messages\": [".into(),
            400,
            "not valid JSON",
        ),
        (
            "/v1/chat/completions",
            user(json!({"max_tokens": "many"})),
            400,
            "`max_tokens` must be a non-negative integer",
        ),
        (
            "/v1/chat/completions",
            user(json!({"temperature": [1]})),
            400,
            "`temperature` must be a number",
        ),
        (
            "/v1/chat/completions",
            user(json!({"model": "nobody"})),
            404,
            "the model `nobody` does not exist",
        ),
        (
            "/v1/chat/completions",
            user(json!({"adapters": ["nobody"]})),
            404,
            "unknown adapter `nobody`",
        ),
        (
            "/v1/chat/completions",
            user(json!({"max_tokens": 101})),
            400,
            "over this server's limit of 100",
        ),
        (
            "/v1/chat/completions",
            user(json!({"n": 2})),
            400,
            "`n`: only 1",
        ),
        (
            "/v1/chat/completions",
            user(json!({"logprobs": true})),
            400,
            "log-probabilities are not supported",
        ),
        (
            "/v1/chat/completions",
            user(json!({"tools": []})),
            400,
            "`tools` is not supported",
        ),
        (
            "/v1/chat/completions",
            user(json!({"model": "early", "adapters": ["clash"]})),
            400,
            "both edit position",
        ),
        (
            "/v1/chat/completions",
            user(json!({"model": "early", "adapters": ["clash"], "stream": true})),
            400,
            "both edit position",
        ),
        (
            "/v1/completions",
            long_prompt,
            400,
            "leaves no room in the model's context of 8192",
        ),
        ("/v1/completions", huge, 413, "length limit"),
    ];
    for (path, body, status, words) in cases {
        let r = call(&state, "POST", path, &body).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{}: {}",
            &body[..body.len().min(80)],
            r.text()
        );
        let e = r.json();
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{words:?} not in {msg:?}");
        assert!(e["error"]["type"].is_string());
        let ok = call(&state, "POST", "/v1/chat/completions", &user(json!({}))).await;
        assert_eq!(ok.status, StatusCode::OK, "after {words:?}: {}", ok.text());
    }
    // Arriving together (so usually prefilled as one pass), a clashing request fails alone.
    let bodies = [
        user(json!({"model": "early"})),
        user(json!({"model": "early", "adapters": ["clash"]})),
        user(json!({"model": "clash"})),
    ];
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let state = state.clone();
            tokio::spawn(async move {
                call(&state, "POST", "/v1/chat/completions", &b)
                    .await
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().as_u16());
    }
    assert_eq!(statuses, [200, 400, 200]);
    let r = call(&state, "GET", "/v2/nothing", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error_message().contains("/v2/nothing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_v1_and_a_full_queue_says_retry_after() {
    let opts = Options {
        api_key: Some("s3cret".into()),
        ..Options::default()
    };
    let limits = EngineLimits {
        max_running: 1,
        max_queue: 1,
        ..EngineLimits::default()
    };
    let state = state_with(&[], opts, limits);
    let body = chat_body(BASE, "Hi", 2, false);
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = call_with(&state, "POST", "/v1/chat/completions", &body, &headers).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    let key = [("authorization", "Bearer s3cret")];
    assert_eq!(
        call(&state, "GET", "/health", "").await.status,
        StatusCode::OK
    );
    // One request decodes, one waits, the third is refused.
    let long = chat_body(BASE, &story(1), 400, false);
    let running: Vec<_> = (0..2)
        .map(|_| {
            let (state, long) = (state.clone(), long.clone());
            tokio::spawn(async move {
                call_with(&state, "POST", "/v1/chat/completions", &long, &key).await
            })
        })
        .collect();
    let t = Instant::now();
    loop {
        let m = call(&state, "GET", "/metrics", "").await.text();
        let now = (
            metric(&m, "reft_running_sequences"),
            metric(&m, "reft_queue_length"),
        );
        if now == (1.0, 1.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never saw 1 running, 1 queued: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = call_with(&state, "POST", "/v1/chat/completions", &body, &key).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["error"]["code"], "queue_full");
    for t in running {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    let r = call_with(&state, "POST", "/v1/chat/completions", &body, &key).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// A value of an unlabelled metric.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A client that leaves mid-stream frees its sequence at the next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let state = state();
    let req = axum::http::Request::post("/v1/chat/completions")
        .body(Body::from(chat_body("middle", &story(3), 1000, true)))
        .unwrap();
    let resp = reft_server::router(state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut seen = 0;
    while seen < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        seen += usize::from(frame.data_ref().is_some());
    }
    let m = call(&state, "GET", "/metrics", "").await.text();
    assert_eq!(metric(&m, "reft_running_sequences"), 1.0);
    drop(body);
    let t = Instant::now();
    loop {
        let m = call(&state, "GET", "/metrics", "").await.text();
        if metric(&m, "reft_running_sequences") == 0.0 {
            assert_eq!(metric(&m, "reft_cancelled_requests_total"), 1.0);
            assert!(metric(&m, "reft_generated_tokens_total") < 100.0);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the sequence was not freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/health` is 503 until the engine is handed over; `/v1/models` lists the base first; an
/// adapter loaded at run time (only from under the root) serves what its registered twin does,
/// and once unloaded it is refused; `/metrics` counts all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_runtime_adapters_and_metrics() {
    let loading = reft_server::AppState::new(Options::default());
    let r = call(&loading, "GET", "/health", "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error_message().contains("loading"));
    assert_eq!(call(&loading, "GET", "/v1/models", "").await.status, 503);

    let off = state_with(&["early"], Options::default(), EngineLimits::default());
    let load = json!({"lora_name": "twin", "lora_path": "early"}).to_string();
    let r = call(&off, "POST", "/v1/load_lora_adapter", &load).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error_message().contains("--adapter-root"));

    let opts = Options {
        adapter_root: Some(adapter_root().to_path_buf()),
        ..Options::default()
    };
    let state = state_with(&["early"], opts, EngineLimits::default());
    assert_eq!(model_ids(&state).await, [BASE, "early"]);
    let v = call(&state, "GET", "/v1/models", "").await.json();
    assert_eq!(v["data"][0]["parent"], Value::Null);
    assert_eq!(v["data"][1]["parent"], BASE);
    assert_eq!(v["data"][1]["max_model_len"], 8192);

    let outside = json!({"lora_name": "x", "lora_path": "/tmp"}).to_string();
    let r = call(&state, "POST", "/v1/load_lora_adapter", &outside).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error_message().contains("not under the adapter root"));
    let r = call(
        &state,
        "POST",
        "/v1/load_lora_adapter",
        &json!({"lora_name": "early", "lora_path": "late"}).to_string(),
    )
    .await;
    assert!(r.error_message().contains("already loaded"));
    let r = call(&state, "POST", "/v1/load_lora_adapter", &load).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(model_ids(&state).await, [BASE, "early", "twin"]);
    let body = |m: &str| chat_body(m, &story(5), 16, false);
    let twin = answer(
        &call(&state, "POST", "/v1/chat/completions", &body("twin")).await,
        false,
    );
    let early = answer(
        &call(&state, "POST", "/v1/chat/completions", &body("early")).await,
        false,
    );
    assert_eq!(twin, early);
    let r = call(
        &state,
        "POST",
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "twin"}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = call(&state, "POST", "/v1/chat/completions", &body("twin")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = call(
        &state,
        "POST",
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "twin"}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let m = call(&state, "GET", "/metrics", "").await.text();
    for line in [
        "reft_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2",
        "reft_requests_total{route=\"/v1/chat/completions\",status=\"404\"} 1",
        "reft_adapter_requests_total{adapters=\"early\"} 1",
        "reft_adapter_requests_total{adapters=\"twin\"} 1",
        "reft_time_to_first_token_seconds_count 2",
        "reft_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
        "# TYPE reft_inter_token_latency_seconds histogram",
        "reft_adapters_loaded 1",
        "reft_ready 1",
    ] {
        assert!(m.lines().any(|l| l == line), "no `{line}` in\n{m}");
    }
    // One gap per piece of text after the first: at most 15 per 16-token answer.
    let gaps = metric(&m, "reft_inter_token_latency_seconds_count");
    assert!((20.0..=30.0).contains(&gaps), "{gaps} inter-token gaps");
    assert_eq!(metric(&m, "reft_generated_tokens_total"), 32.0);
    let page = call(&state, "GET", "/", "").await;
    assert!(page.text().contains("<title>reft serve</title>"));
}
