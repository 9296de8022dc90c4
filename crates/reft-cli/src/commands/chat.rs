//! `reft chat`: an interactive, multi-turn conversation in the terminal.

use std::io::{BufRead, Write};

use anyhow::Result;
use reft::data::{prompt_ids, Template};
use reft::generate::generate;
use reft::template::Message;

use super::{AdapterArgs, ModelArgs, SamplingArgs, TemplateArgs};

/// Arguments of `reft chat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    template: TemplateArgs,
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
    let template = args.template.resolve(&adapters, Template::Chat)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::new("system", s.clone()));
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        messages.push(Message::new("user", line));
        let ids = prompt_ids(&lm, &messages, template)?;
        let mut io_err = None;
        let reply = generate(
            &lm.decoder,
            &lm.tokenizer,
            &[ids],
            &cfg,
            &mut adapters,
            &mut |_, t| {
                if io_err.is_none() {
                    io_err = out.write_all(t.as_bytes()).and_then(|_| out.flush()).err();
                }
            },
        )?;
        if let Some(e) = io_err {
            return Err(e.into());
        }
        writeln!(out)?;
        messages.push(Message::new("assistant", reply[0].text.clone()));
    }
    Ok(())
}
