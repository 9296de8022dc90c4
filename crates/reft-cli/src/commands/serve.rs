//! `reft serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use reft::adapter::{Adapter, BaseModel};
use reft::engine::{Engine, EngineLimits};
use reft_server::{AdapterEntry, Loaded, Options};

use super::ModelArgs;

/// Arguments of `reft serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// An adapter to serve, as NAME=DIR (a reft or pyreft folder; repeatable). Requests choose
    /// it with `"model": "NAME"`.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Positions for pyreft folders, which do not record them.
    #[arg(long, default_value = "l1")]
    pyreft_positions: String,
    /// Allow POST /v1/load_lora_adapter to load adapters found under this folder [default: off].
    #[arg(long)]
    adapter_root: Option<PathBuf>,
    /// The base model's name in requests and /v1/models [default: the --model argument].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to bind (loopback: only this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 route [default: none].
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences decoding at once; more wait in the queue.
    #[arg(long, default_value_t = 32)]
    max_running: usize,
    /// Requests waiting; more are answered 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// MiB of prompt-prefix keys and values kept for later requests that start with the same
    /// tokens (a shared system prompt, earlier turns); 0 turns the reuse off.
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mib: usize,
    /// Largest max_tokens a request may ask for (also its default, within the context).
    #[arg(long, default_value_t = 2048)]
    max_tokens_limit: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_running == 0 || args.max_tokens_limit == 0 {
        bail!("--max-running and --max-tokens-limit must be at least 1");
    }
    let adapters = parse_adapters(&args.adapters)?;
    let opts = Options {
        base_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.model.clone()),
        api_key: args.api_key.clone(),
        adapter_root: args.adapter_root.clone(),
        max_tokens_limit: args.max_tokens_limit,
        pyreft_positions: args.pyreft_positions.clone(),
        ..Options::default()
    };
    if let Some(root) = &opts.adapter_root {
        if !root.is_dir() {
            bail!("--adapter-root {}: not a folder", root.display());
        }
    }
    let limits = EngineLimits {
        max_running: args.max_running,
        max_queue: args.max_queue,
        prefix_cache_bytes: args.prefix_cache_mib << 20,
    };
    let addr = format_addr(&args.host, args.port);
    let (model, positions) = (args.model.clone(), args.pyreft_positions.clone());
    reft_server::run(
        opts,
        &addr,
        |at| {
            eprintln!("reft serve: listening on http://{at} (loading the model; /health says 503 until it is ready)")
        },
        move || load(&model, &adapters, &positions, limits).map_err(|e| format!("{e:#}")),
    )?;
    eprintln!("reft serve: stopped");
    Ok(())
}

/// `host:port`, with brackets around an IPv6 host.
fn format_addr(host: &str, port: u16) -> String {
    match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// `NAME=DIR` pairs.
fn parse_adapters(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for s in specs {
        let Some((name, dir)) = s
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
        else {
            bail!("--adapter {s}: expected NAME=DIR");
        };
        if out.iter().any(|(n, _)| n == name) {
            bail!("--adapter: the name `{name}` is given twice");
        }
        out.push((name.to_string(), PathBuf::from(dir)));
    }
    Ok(out)
}

/// Loads the model and adapters and starts the engine.
fn load(
    model: &ModelArgs,
    adapters: &[(String, PathBuf)],
    pyreft_positions: &str,
    limits: EngineLimits,
) -> Result<Loaded> {
    let lm = Arc::new(model.load()?);
    let base = BaseModel::of(&lm);
    let mut registered = Vec::new();
    let mut entries = Vec::new();
    for (name, dir) in adapters {
        let a = Adapter::open(
            dir,
            Some(&base),
            pyreft_positions,
            DType::F32,
            lm.decoder.device(),
        )
        .with_context(|| format!("cannot load adapter `{name}` from {}", dir.display()))?;
        registered.push((name.clone(), a));
        entries.push(AdapterEntry::new(
            name.clone(),
            dir.canonicalize().unwrap_or_else(|_| dir.clone()),
        ));
    }
    let engine = Engine::start(Arc::clone(&lm), registered, limits)?;
    eprintln!(
        "reft serve: ready ({} adapter{})",
        entries.len(),
        if entries.len() == 1 { "" } else { "s" }
    );
    Ok(Loaded {
        lm,
        engine,
        adapters: entries,
    })
}
