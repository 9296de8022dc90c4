//! Training from Rust: pyreft's quickstart through the library API — load the model, tokenise
//! the ten examples, build a `Trainer` from a `TrainConfig`, run it with a progress callback,
//! save the adapter, and answer an unseen prompt with it.
//!
//! `cargo run --release -p reft --example train -- [EPOCHS] [OUT_DIR]`

use candle_core::Device;
use reft::adapter::Adapter;
use reft::generate::{generate, GenerationConfig};
use reft::template::Message;
use reft::train::{Event, Trainer};
use reft::{quickstart, LanguageModel};

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let mut args = std::env::args().skip(1);
    let epochs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "reft-train-example".into()));

    let dev = Device::Cpu;
    let path = reft::load::resolve(reft::hub::DEFAULT_MODEL, &mut |m| eprintln!("{m}"))?;
    let lm = LanguageModel::load(
        path.to_str().expect("utf-8 path"),
        &dev,
        &Default::default(),
        &mut |_| {},
    )?;

    let examples = quickstart::examples(&lm)?;
    let d = lm.decoder.config().hidden_size;
    let adapter = Adapter::init(
        quickstart::adapter_config(&lm)?,
        d,
        42,
        lm.decoder.dtype(),
        &dev,
    )?;
    let mut trainer = Trainer::new(
        &lm,
        adapter,
        examples,
        Vec::new(),
        quickstart::train_config(epochs, 42),
    )?
    .with_output(&out)?;
    trainer.run(
        &mut |e| {
            if let Event::Step(m) = e {
                if m.step % 10 == 0 {
                    eprintln!(
                        "step {:>3}  loss {:.4}  lr {:.2e}  {:.2} s",
                        m.step, m.loss, m.lr, m.step_time_s
                    );
                }
            }
        },
        &|| false,
    )?;
    let mut adapter = trainer.adapter;
    adapter.set_training(false);

    let prompt = lm
        .chat_template
        .render(&[Message::new("user", "Who wrote Hamlet?")], true)?;
    let ids = lm.tokenizer.encode(&prompt)?;
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let answer = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[ids],
        &cfg,
        &mut adapter,
        &mut |_, _| {},
    )?;
    println!("Who wrote Hamlet? -> {}", answer[0].text);
    println!("adapter and metrics.jsonl in {}", out.display());
    Ok(())
}
