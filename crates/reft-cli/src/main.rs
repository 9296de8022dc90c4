//! The `reft` command-line tool: argument parsing, progress and printing over the `reft` library.

mod commands;

use clap::{Parser, Subcommand};

/// Representation Finetuning (ReFT) for frozen transformer LMs.
#[derive(Parser)]
#[command(
    name = "reft",
    version,
    about = "Representation Finetuning (ReFT) for frozen transformer LMs",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run pyreft's quickstart end to end: train an emoji adapter on the default model, then
    /// answer unseen prompts with and without it.
    Quickstart(commands::quickstart::Args),
    /// Train an adapter from a data file.
    #[command(
        override_usage = "reft train --data FILE --out DIR [OPTIONS]\n       reft train --config run.toml [OPTIONS]"
    )]
    Train(Box<commands::train::Args>),
    /// Score a model (and adapters) on labelled data; prints one JSON line of metrics. Prompts
    /// use the adapter's template, else `chat` (the same default as `reft train`).
    #[command(override_usage = "reft eval --data FILE [OPTIONS]")]
    Eval(commands::eval::Args),
    /// Generate text from a prompt (greedy unless --temperature is given). The prompt is
    /// rendered with the adapter's template, else taken as given (raw).
    #[command(override_usage = "reft generate --prompt TEXT [--prompt TEXT …] [OPTIONS]")]
    Generate(commands::generate::Args),
    /// Chat with a model interactively (multi-turn; an empty line or Ctrl-D ends). The
    /// conversation is rendered with the adapter's template, else the model's chat template.
    Chat(commands::chat::Args),
    /// Serve the model and adapters over HTTP with OpenAI's API (chat and text completions,
    /// streaming, /v1/models, run-time adapter loading), /metrics, and a chat page at `/`.
    Serve(Box<commands::serve::Args>),
    /// Search layers, positions and training settings on a dev split (TPE with ASHA early
    /// stopping); journal every trial (resumable), keep the best adapter, write summary.md and
    /// sweep.png, and score a test split once for the best trial.
    #[command(override_usage = "reft sweep --space space.toml --data FILE --out DIR [OPTIONS]")]
    Sweep(Box<commands::sweep::Args>),
    /// Print the token ids of a text as a JSON array (no special tokens added).
    Tokenize(commands::tokenize::Args),
    /// Inspect adapters; convert between reft and pyreft folders.
    #[command(subcommand)]
    Adapter(commands::adapter::Command),
}

fn main() -> std::process::ExitCode {
    reft::cpu::tune_cpu_runtime();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Train(a) => commands::train::run(*a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Serve(a) => commands::serve::run(*a),
        Command::Sweep(a) => commands::sweep::run(*a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Adapter(c) => commands::adapter::run(c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`reft … | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return std::process::ExitCode::SUCCESS;
            }
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: a cause already at the end of the text
/// (an I/O error that its wrapper printed too) is dropped, and a cause that starts with what the
/// text ends with (a context naming the file, then the library's error naming it again) goes on
/// from there.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut after_io = false;
    for c in e.chain() {
        // The library's I/O errors already say what their source says.
        let skip = after_io && c.downcast_ref::<std::io::Error>().is_some();
        after_io = matches!(
            c.downcast_ref::<reft::Error>(),
            Some(reft::Error::Io { .. })
        );
        if skip {
            continue;
        }
        let cause = c.to_string();
        if text.is_empty() {
            text = cause;
            continue;
        }
        if text.ends_with(&cause) {
            continue;
        }
        let overlap = std::iter::once(0)
            .chain(text.match_indices(' ').map(|(i, _)| i + 1))
            .map(|i| &text[i..])
            .find(|tail| !tail.is_empty() && cause.starts_with(tail))
            .map_or(0, str::len);
        if overlap == 0 {
            text.push_str(": ");
        }
        text.push_str(&cause[overlap..]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;
    use anyhow::Context;

    #[test]
    fn each_part_of_an_error_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let lib = reft::Error::io("/tmp/a.jsonl", io);
        let e = Err::<(), _>(lib)
            .context("reading /tmp/a.jsonl")
            .unwrap_err();
        assert_eq!(error_text(&e), "reading /tmp/a.jsonl: does not exist");
        let e = Err::<(), _>(anyhow::anyhow!("line 2: bad"))
            .context("cannot load adapter x")
            .unwrap_err();
        assert_eq!(error_text(&e), "cannot load adapter x: line 2: bad");
        let e = Err::<(), _>(anyhow::anyhow!("model `m`: not found"))
            .context("cannot load model `m`")
            .unwrap_err();
        assert_eq!(error_text(&e), "cannot load model `m`: not found");
    }
}
