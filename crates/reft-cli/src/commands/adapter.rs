//! `reft adapter …`: inspect adapters and convert between reft and pyreft folders.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use reft::adapter::Adapter;

/// Adapter subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print an adapter's interventions, positions, parameter counts and base model.
    Inspect {
        /// A reft or pyreft adapter folder.
        dir: PathBuf,
    },
    /// Convert a pyreft save folder into a reft adapter folder.
    ImportPyreft {
        /// The pyreft folder (config.json + intkey_*.bin).
        src: PathBuf,
        /// The reft folder to write.
        dst: PathBuf,
        /// Positions each intervention edits (pyreft does not record them).
        #[arg(long, default_value = "l1")]
        positions: String,
        /// Record this base model in the adapter (and check the adapter fits it) [default: none].
        #[arg(long)]
        model: Option<String>,
    },
    /// Convert a reft adapter folder into a pyreft 0.1.0 save folder.
    ExportPyreft {
        /// The reft folder.
        src: PathBuf,
        /// The pyreft folder to write.
        dst: PathBuf,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    let dev = Device::Cpu;
    match cmd {
        Command::Inspect { dir } => {
            let a = Adapter::open(&dir, None, "l1", DType::F32, &dev)
                .with_context(|| format!("cannot open adapter {}", dir.display()))?;
            let c = a.config();
            if let Some(b) = &c.base_model {
                println!(
                    "base model: {} (hidden {}, {} layers, vocabulary {}, tokenizer {})",
                    b.architecture,
                    b.hidden_size,
                    b.num_layers,
                    b.vocab_size,
                    b.tokenizer_fingerprint
                );
            }
            if let Some(t) = &c.template {
                println!("template: {t}");
            }
            for (i, (ic, iv)) in c.interventions.iter().zip(a.interventions()).enumerate() {
                let part = ic
                    .part
                    .map(|p| format!(" ({p:?} set)").to_lowercase())
                    .unwrap_or_default();
                println!(
                    "[{i}] {} rank {} at layer {} {}, positions {}{part}, act {:?}, dropout {}, {} params",
                    ic.kind.name(),
                    ic.rank,
                    ic.layer,
                    ic.component.name(),
                    ic.positions,
                    ic.act,
                    ic.dropout,
                    reft::adapter::group_digits(iv.num_parameters())
                );
            }
            println!(
                "trainable intervention params: {}",
                reft::adapter::group_digits(a.num_parameters())
            );
            if let Some(t) = &c.training {
                println!("training: {t}");
            }
        }
        Command::ImportPyreft {
            src,
            dst,
            positions,
            model,
        } => {
            let base = match model {
                Some(m) => {
                    let args = super::ModelArgs {
                        model: m,
                        device: "cpu".into(),
                        f32_decode: false,
                    };
                    Some(reft::adapter::BaseModel::of(&args.load()?))
                }
                None => None,
            };
            let a = Adapter::import_pyreft(&src, &positions, base.as_ref(), DType::F32, &dev)
                .with_context(|| format!("cannot import {}", src.display()))?;
            a.save(&dst)
                .with_context(|| format!("cannot write {}", dst.display()))?;
            eprintln!(
                "imported {} intervention(s) into {}",
                a.interventions().len(),
                dst.display()
            );
        }
        Command::ExportPyreft { src, dst } => {
            let a = Adapter::open(&src, None, "l1", DType::F32, &dev)
                .with_context(|| format!("cannot open adapter {}", src.display()))?;
            a.export_pyreft(&dst)
                .with_context(|| format!("cannot write {}", dst.display()))?;
            eprintln!(
                "exported {} intervention(s) to {}",
                a.interventions().len(),
                dst.display()
            );
        }
    }
    Ok(())
}
