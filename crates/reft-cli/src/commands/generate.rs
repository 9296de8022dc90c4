//! `reft generate`: one or more prompts in, generated text out (stdout carries only the text).

use std::io::Write;

use anyhow::{bail, Result};
use reft::data::{prompt_ids, Template};
use reft::generate::{generate, FinishReason, Generation};
use reft::template::Message;

use super::{escape_line, AdapterArgs, ModelArgs, SamplingArgs, TemplateArgs};

/// Arguments of `reft generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (repeatable: several prompts run as one left-padded batch and print one line
    /// each, newlines inside an answer written as `\n`).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[command(flatten)]
    template: TemplateArgs,
    /// System message, placed before the prompt by the template.
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object per prompt (`prompt`, `text`, `finish_reason`, `tokens`) instead of
    /// the text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Without a flag or an adapter that records its template, a prompt is completed as given.
const FALLBACK: Template = Template::Raw;

pub fn run(args: Args) -> Result<()> {
    let lm = args.model.load()?;
    let mut cfg = args.sampling.config(&lm)?;
    cfg.hooks_on_generated = args.adapters.every_token;
    let mut adapters = args.adapters.load(&lm)?;
    let template = args.template.resolve(&adapters, FALLBACK)?;
    let mut prompts = Vec::with_capacity(args.prompt.len());
    for p in &args.prompt {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", p.clone()));
        let ids = prompt_ids(&lm, &msgs, template)?;
        if ids.is_empty() {
            bail!("the prompt {p:?} has no tokens");
        }
        prompts.push(ids);
    }
    // One prompt streams its text as it is made; a batch prints whole lines at the end.
    let stream = prompts.len() == 1 && !args.json;
    let mut out = std::io::stdout().lock();
    let mut io_err = None;
    let results = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
        &cfg,
        &mut adapters,
        &mut |_, text| {
            if stream && io_err.is_none() {
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    io_err = Some(e);
                }
            }
        },
    )?;
    if let Some(e) = io_err {
        return Err(e.into());
    }
    for (k, r) in results.iter().enumerate() {
        if r.ids.is_empty() && r.finish == FinishReason::StopId {
            let which = if results.len() > 1 {
                format!("prompt {}: ", k + 1)
            } else {
                String::new()
            };
            eprintln!(
                "{which}the model ended its answer at once (its first token was end of sequence); \
                 the output is empty (template {template})"
            );
        }
    }
    if args.json {
        for (p, r) in args.prompt.iter().zip(&results) {
            writeln!(out, "{}", json_line(p, r))?;
        }
    } else if stream {
        writeln!(out)?;
    } else {
        for r in &results {
            writeln!(out, "{}", escape_line(&r.text))?;
        }
    }
    Ok(())
}

/// The `--json` line of one prompt.
fn json_line(prompt: &str, r: &Generation) -> serde_json::Value {
    let finish = match r.finish {
        FinishReason::StopId | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    };
    serde_json::json!({
        "prompt": prompt,
        "text": r.text,
        "finish_reason": finish,
        "tokens": r.ids.len(),
    })
}
