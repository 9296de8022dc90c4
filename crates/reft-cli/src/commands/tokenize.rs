//! `reft tokenize`: the token ids of a text, as one JSON array.

use anyhow::Result;

use super::ModelArgs;

/// Arguments of `reft tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to tokenize (special-token text such as `<|im_start|>` is recognised).
    #[arg(long)]
    text: String,
}

pub fn run(args: Args) -> Result<()> {
    let lm = args.model.load()?;
    let ids = lm.tokenizer.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
