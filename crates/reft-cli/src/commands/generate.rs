//! `reft generate`: one or more prompts in, generated text out (stdout carries only the text).

use std::io::Write;

use anyhow::{bail, Result};
use reft::generate::generate;
use reft::template::Message;

use super::{AdapterArgs, ModelArgs, SamplingArgs};

/// Arguments of `reft generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (repeatable: several prompts run as one left-padded batch, one output each).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Wrap the prompt in the model's chat template, with the generation prompt.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    adapters: AdapterArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(args: Args) -> Result<()> {
    let lm = args.model.load()?;
    let mut cfg = args.sampling.config(&lm)?;
    cfg.hooks_on_generated = args.adapters.every_token;
    let mut adapters = args.adapters.load(&lm)?;
    let mut prompts = Vec::with_capacity(args.prompt.len());
    for p in &args.prompt {
        let ids = if args.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &args.system {
                msgs.push(Message::new("system", s.clone()));
            }
            msgs.push(Message::new("user", p.clone()));
            lm.tokenizer
                .encode(&lm.chat_template.render(&msgs, true)?)?
        } else {
            lm.tokenizer.encode_with_special_tokens(p)?
        };
        if ids.is_empty() {
            bail!("the prompt {p:?} has no tokens");
        }
        prompts.push(ids);
    }
    let stream = prompts.len() == 1;
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
    if stream {
        writeln!(out)?;
    } else {
        for r in results {
            writeln!(out, "{}", r.text)?;
        }
    }
    Ok(())
}
