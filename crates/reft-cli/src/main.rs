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
    /// Score a model (and adapters) on labelled data; prints one JSON line of metrics.
    Eval(commands::eval::Args),
    /// Generate text from a prompt (greedy unless --temperature is given).
    Generate(commands::generate::Args),
    /// Chat with a model interactively (multi-turn; an empty line or Ctrl-D ends).
    Chat(commands::chat::Args),
    /// Print the token ids of a text as a JSON array (no special tokens added).
    Tokenize(commands::tokenize::Args),
    /// Inspect adapters; convert between reft and pyreft folders.
    #[command(subcommand)]
    Adapter(commands::adapter::Command),
}

fn main() -> std::process::ExitCode {
    reft::ops::tune_cpu_runtime();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Train(a) => commands::train::run(*a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
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
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
