//! Load on `reft serve` over loopback: 1 and 32 concurrent clients streaming greedy chat
//! completions ("Write a short story about the number N.", 64 new tokens), for (a) the base
//! model, (b) one adapter, (c) 8 adapters in turn, (d) 1,000 adapters loaded, every request a
//! different one. Prints aggregate generated tokens/s, p50/p99 latency and time to first token,
//! errors, and the server's memory.
//!
//! `cargo bench -p reft-cli --bench serve_load [-- --repeats N] [-- --peer HOST:PORT]`: with
//! `--peer`, the same base-model load goes to an OpenAI-compatible server already running there
//! (llama.cpp's `llama-server` on the same GGUF, say) instead; `--model NAME` sets the `model`
//! field it is sent (default: reft's default model's name). `--server-args "FLAGS"` adds
//! flags to every `reft serve` it starts (`"--prefix-cache-mib 0"` turns prefix reuse off).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel};
use serde_json::{json, Value};

const NEW_TOKENS: usize = 64;

/// One run's figures.
#[derive(Default)]
struct Outcome {
    tokens: usize,
    wall: f64,
    latencies: Vec<f64>,
    ttfts: Vec<f64>,
    errors: Vec<String>,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// One streamed chat completion: (time to first text, latency, completion tokens).
fn one_request(addr: &str, model: &str, n: usize) -> Result<(f64, f64, usize), String> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Write a short story about the number {n}.")}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| e.to_string())?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        chunked |= h
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    if !status.contains(" 200") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("{} {rest}", status.trim()));
    }
    let mut body = Body {
        r,
        chunked,
        left: 0,
    };
    let (mut ttft, mut usage, mut pieces) = (None, None, 0);
    let mut line = Vec::new();
    while body.read_line(&mut line)? {
        let Some(data) = line.strip_prefix(b"data: ") else {
            continue;
        };
        if data.starts_with(b"[DONE]") {
            break;
        }
        let v: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            ttft.get_or_insert(t0.elapsed().as_secs_f64());
            pieces += 1;
        }
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(u as usize);
        }
    }
    let tokens = usage.unwrap_or(pieces);
    Ok((ttft.unwrap_or(f64::NAN), t0.elapsed().as_secs_f64(), tokens))
}

/// A response body, chunked or not, read line by line.
struct Body {
    r: BufReader<TcpStream>,
    chunked: bool,
    left: usize,
}

impl Body {
    fn byte(&mut self) -> Result<Option<u8>, String> {
        if self.chunked && self.left == 0 {
            let mut size = String::new();
            loop {
                size.clear();
                if self.r.read_line(&mut size).map_err(|e| e.to_string())? == 0 {
                    return Ok(None);
                }
                if !size.trim().is_empty() {
                    break;
                }
            }
            self.left = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            if self.left == 0 {
                return Ok(None);
            }
        }
        let mut b = [0u8];
        match self.r.read(&mut b).map_err(|e| e.to_string())? {
            0 => Ok(None),
            _ => {
                self.left = self.left.saturating_sub(1);
                Ok(Some(b[0]))
            }
        }
    }

    fn read_line(&mut self, line: &mut Vec<u8>) -> Result<bool, String> {
        line.clear();
        while let Some(b) = self.byte()? {
            if b == b'\n' {
                return Ok(true);
            }
            line.push(b);
        }
        Ok(!line.is_empty())
    }
}

/// `requests` requests from `clients` threads; request `i` asks for `models[i % len]`.
fn drive(addr: &str, clients: usize, requests: usize, models: &[String]) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (next, addr, models) = (Arc::clone(&next), addr.to_string(), models.to_vec());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests {
                        return out;
                    }
                    out.push(one_request(&addr, &models[i % models.len()], i));
                }
            })
        })
        .collect();
    let mut o = Outcome::default();
    for t in threads {
        for r in t.join().unwrap() {
            match r {
                Ok((ttft, lat, tokens)) => {
                    o.ttfts.push(ttft);
                    o.latencies.push(lat);
                    o.tokens += tokens;
                }
                Err(e) => o.errors.push(e),
            }
        }
    }
    o.wall = t0.elapsed().as_secs_f64();
    o
}

/// A `reft serve` process with `adapters`; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(adapters: &[(String, PathBuf)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reft"));
        cmd.args(["serve", "--port", "0", "--max-running", "32"]);
        // `-- --server-args "--prefix-cache-mib 0"`: extra `reft serve` flags, for A/B runs.
        if let Some(extra) = arg("--server-args") {
            cmd.args(extra.split_whitespace());
        }
        for (name, dir) in adapters {
            cmd.arg("--adapter")
                .arg(format!("{name}={}", dir.display()));
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reft serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                Some(
                    l.split("listening on http://")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .to_string(),
                )
            })
            .expect("the server prints its address");
        std::thread::spawn(move || for _ in lines {});
        wait_healthy(&addr);
        Self { child, addr }
    }

    /// Resident and peak resident memory, in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| {
                    l.strip_prefix(k)?
                        .trim()
                        .strip_suffix(" kB")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map_or(f64::NAN, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_healthy(addr: &str) {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "{addr} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` seeded rank-4 LoReFTs for `lm`, at layers and positions that vary with the seed.
fn make_adapters(lm: &reft::LanguageModel, root: &Path, n: usize) -> Vec<(String, PathBuf)> {
    let c = lm.decoder.config();
    let positions = ["l1", "f1+l1", "f2+l2", "l3", "f1", "f3+l3"];
    (0..n)
        .map(|i| {
            let name = format!("a{i:04}");
            let dir = root.join(&name);
            let layer = (i * 7 + 3) % c.num_layers;
            let spec: AdapterSpec = serde_json::from_value(json!({"interventions": [{
                "kind": "loreft", "layers": layer.to_string(), "rank": 4,
                "positions": positions[i % positions.len()],
            }]}))
            .unwrap();
            let config = AdapterConfig {
                format_version: 1,
                base_model: Some(BaseModel::of(lm)),
                interventions: spec.expand(c.num_layers).unwrap(),
                template: Some("chat".into()),
                training: None,
            };
            Adapter::init(
                config,
                c.hidden_size,
                1000 + i as u64,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
            .save(&dir)
            .unwrap();
            (name, dir)
        })
        .collect()
}

fn report(label: &str, clients: usize, runs: &[Outcome]) -> f64 {
    let rates: Vec<f64> = runs.iter().map(|o| o.tokens as f64 / o.wall).collect();
    let lat: Vec<f64> = runs.iter().flat_map(|o| o.latencies.clone()).collect();
    let ttft: Vec<f64> = runs.iter().flat_map(|o| o.ttfts.clone()).collect();
    let errors: usize = runs.iter().map(|o| o.errors.len()).sum();
    let rate = median(&rates);
    println!(
        "{label:<28} {clients:>3} clients  {rate:>7.1} tok/s (runs: {})  latency p50 {:.2} s p99 {:.2} s  \
         TTFT p50 {:.3} s p99 {:.3} s  errors {errors}",
        rates.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(", "),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.99),
    );
    if let Some(e) = runs.iter().flat_map(|o| o.errors.first()).next() {
        println!("    first error: {e}");
    }
    rate
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Requests per run: 8 for one client, 64 for 32.
fn requests_for(clients: usize) -> usize {
    if clients == 1 {
        8
    } else {
        2 * clients
    }
}

fn main() {
    let repeats: usize = arg("--repeats").and_then(|r| r.parse().ok()).unwrap_or(3);
    let loads = [1usize, 32];
    if let Some(peer) = arg("--peer") {
        wait_healthy(&peer);
        // llama-server serves whatever `model` says; reft serve needs its base model's name.
        let model = vec![arg("--model").unwrap_or_else(|| reft::hub::DEFAULT_MODEL.to_string())];
        one_request(&peer, &model[0], 0).expect("a warm-up request");
        for clients in loads {
            let runs: Vec<Outcome> = (0..repeats)
                .map(|_| drive(&peer, clients, requests_for(clients), &model))
                .collect();
            report(&format!("peer {peer}"), clients, &runs);
        }
        return;
    }
    let lm = reft::LanguageModel::load(
        reft::hub::DEFAULT_MODEL,
        &Device::Cpu,
        &reft::LoadOptions::default(),
        &mut |m| eprintln!("{m}"),
    )
    .expect("the default model");
    let tmp = tempfile::tempdir().unwrap();
    let adapters = make_adapters(&lm, tmp.path(), 1000);
    drop(lm);
    let names = |n: usize| {
        adapters[..n]
            .iter()
            .map(|a| a.0.clone())
            .collect::<Vec<_>>()
    };
    let scenarios: [(&str, usize, Vec<String>); 4] = [
        ("(a) base", 0, vec![reft::hub::DEFAULT_MODEL.to_string()]),
        ("(b) one adapter", 1, names(1)),
        ("(c) 8 adapters in turn", 8, names(8)),
        ("(d) 1,000 loaded, each new", 1000, names(1000)),
    ];
    println!("reft serve, SmolLM2-135M-Instruct, {NEW_TOKENS} new tokens, greedy, streamed; {repeats} runs each (median tok/s)");
    let mut rates = std::collections::BTreeMap::new();
    for (label, loaded, models) in &scenarios {
        let server = Server::start(&adapters[..*loaded]);
        one_request(&server.addr, reft::hub::DEFAULT_MODEL, 0).expect("a warm-up request");
        let (rss0, _) = server.memory();
        // Request k of the scenario asks for models[k % len]: with 1,000, none asks twice.
        let mut used = 0;
        for clients in loads {
            let runs: Vec<Outcome> = (0..repeats)
                .map(|_| {
                    let n = requests_for(clients);
                    let turn: Vec<String> = (0..n)
                        .map(|i| models[(used + i) % models.len()].clone())
                        .collect();
                    used += n;
                    drive(&server.addr, clients, n, &turn)
                })
                .collect();
            rates.insert((*label, clients), report(label, clients, &runs));
        }
        let (rss, peak) = server.memory();
        println!(
            "    server memory with {loaded} adapter{} registered: {rss0:.0} MiB after warm-up, \
             {rss:.0} MiB after the load (peak {peak:.0} MiB)",
            if *loaded == 1 { "" } else { "s" }
        );
    }
    for clients in loads {
        let b = rates[&("(b) one adapter", clients)];
        for s in ["(c) 8 adapters in turn", "(d) 1,000 loaded, each new"] {
            println!(
                "{s} / (b) at {clients} clients: {:.3}",
                rates[&(s, clients)] / b
            );
        }
    }
}
