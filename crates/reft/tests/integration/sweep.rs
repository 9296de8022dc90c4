//! `reft::sweep` on the tiny model: a sweep interrupted mid-trial and resumed writes the same
//! journal as one run straight through, and trials that share a start layer and first position
//! share one set of frozen prefix caches.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use reft::adapter::config::LayerSpec;
use reft::adapter::InterventionSpec;
use reft::data::{Example, Template};
use reft::sweep::objective::{Defaults, DevSet, TrainObjective, TrialEvent};
use reft::sweep::{run_sweep, Asha, Journal, Mode, Record, Space, SweepPlan};
use reft::train::TrainConfig;

use crate::common::tiny_gpt2_lm;

/// Short made-up sequences over the tiny vocabulary: the response copies part of the prompt.
fn examples(n: usize, offset: u32) -> Vec<Example> {
    (0..n as u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..6 + i % 3)
                .map(|j| 3 + (i * 7 + j + offset) % 90)
                .collect();
            let response = prompt[..3].to_vec();
            Example {
                prompt_ids: prompt,
                response_ids: response,
            }
        })
        .collect()
}

fn defaults() -> Defaults {
    let intervention: InterventionSpec = serde_json::from_value(serde_json::json!({
        "kind": "loreft", "layers": 1, "rank": 2, "positions": "l1"
    }))
    .unwrap();
    Defaults {
        intervention,
        train: TrainConfig {
            batch_size: 4,
            ..TrainConfig::default()
        },
        seed: 3,
        template: Template::Raw,
    }
}

const SPACE: &str = r#"
[fixed]
rank = 2
[search]
layers = [0, 1]
positions = ["l1", "f1+l1"]
lr = { float = [1e-3, 3e-2], log = true }
epochs = { int = [2, 5] }
"#;

/// Runs `trials` trials of a TPE + ASHA sweep into `path` (resuming what is there), with the
/// stop flag raised at the `stop_at`-th scored rung; returns the journal's records.
fn sweep(path: &std::path::Path, trials: usize, stop_at: Option<usize>) -> Vec<Record> {
    let (_dir, lm) = tiny_gpt2_lm();
    let space = Space::from_toml_str(SPACE).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut scored = 0;
    let flag = Arc::clone(&stop);
    let mut objective = TrainObjective::new(
        &lm,
        examples(12, 0),
        DevSet::Loss(examples(4, 50)),
        defaults(),
        1 << 30,
    )
    .unwrap()
    .on_event(move |e| {
        if let TrialEvent::Scored { .. } = e {
            scored += 1;
            if Some(scored) == stop_at {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let plan = SweepPlan {
        space: &space,
        mode: Mode::Tpe { seed: 11 },
        n_trials: trials,
        asha: Some(Asha::new(1, 5, 2).unwrap()),
        default_epochs: 3,
        maximize: false,
        deadline: None,
    };
    let (mut journal, resumed) = Journal::open(path).unwrap();
    run_sweep(&plan, &mut journal, resumed, &mut objective, &stop).unwrap();
    Journal::open(path).unwrap().1
}

fn without_times(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .map(|r| Record { seconds: 0.0, ..r })
        .collect()
}

/// A grid sweep of `space` (no early stopping) into `journal`, run to the end.
fn grid_sweep(
    space: &Space,
    objective: &mut TrainObjective<'_>,
    journal: &std::path::Path,
    default_epochs: usize,
    maximize: bool,
) -> reft::sweep::SweepResult {
    let plan = SweepPlan {
        space,
        mode: Mode::Grid,
        n_trials: usize::MAX,
        asha: None,
        default_epochs,
        maximize,
        deadline: None,
    };
    let (mut journal, resumed) = Journal::open(journal).unwrap();
    run_sweep(
        &plan,
        &mut journal,
        resumed,
        objective,
        &AtomicBool::new(false),
    )
    .unwrap()
}

#[test]
fn a_resumed_sweep_ends_with_the_journal_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let straight = sweep(&dir.path().join("straight.jsonl"), 8, None);
    let trials: std::collections::BTreeSet<usize> = straight.iter().map(|r| r.trial).collect();
    assert_eq!(trials.len(), 8);
    assert!(
        straight
            .iter()
            .any(|r| r.status == reft::sweep::Status::Stopped),
        "ASHA stopped no trial: {straight:?}"
    );
    // Interrupted at the 5th scored rung (mid-trial), then resumed twice.
    let path = dir.path().join("resumed.jsonl");
    let first = sweep(&path, 8, Some(5));
    assert!(first.len() < straight.len());
    sweep(&path, 8, Some(4));
    let resumed = sweep(&path, 8, None);
    // Every record (config, rung, epochs, metric, parameters, status) but the times.
    assert_eq!(without_times(resumed), without_times(straight));
}

#[test]
fn trials_with_the_same_start_layer_and_first_position_share_prefix_caches() {
    let (_dir, lm) = tiny_gpt2_lm();
    let space = Space::from_toml_str(
        "[search]\nlayers = [0, 1]\npositions = [\"l1\", \"f1+l1\"]\nlr = [0.01, 0.02]\n",
    )
    .unwrap();
    let mut objective = TrainObjective::new(
        &lm,
        examples(8, 0),
        DevSet::Loss(examples(3, 50)),
        Defaults {
            train: TrainConfig {
                epochs: 1,
                ..defaults().train
            },
            ..defaults()
        },
        1 << 30,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let result = grid_sweep(
        &space,
        &mut objective,
        &dir.path().join("t.jsonl"),
        1,
        false,
    );
    assert_eq!(result.history.finished().count(), 8);
    assert_eq!(result.failed, 0);
    // Two lowest layers × two first positions (the last prompt token, the first one).
    assert_eq!(objective.cache_builds(), 4);
    // A layer past the model is a failed trial, not a failed sweep.
    let bad: reft::sweep::Config = [("layers".to_string(), reft::sweep::Value::Int(9))].into();
    assert!(objective.setup(&bad).is_err());
    assert!(matches!(
        reft::sweep::objective::named_layers(&reft::sweep::Value::Str("every2".into()), 5),
        Some(LayerSpec::Text(t)) if t == "0;2;4"
    ));
}

/// A choice dev split is scored through the frozen pass (each option a short example over its
/// cached question); the accuracy each trial records is what `evaluate_choice` gives its saved
/// adapter, and the trials' cache sets come from one pass per start layer.
#[test]
fn choice_dev_scores_equal_evaluate_choice_and_passes_are_shared() {
    use reft::eval::{evaluate_choice, ChoiceFormat, ChoiceItem};
    let (_dir, lm) = tiny_gpt2_lm();
    let items: Vec<ChoiceItem> = (0..10)
        .map(|i| ChoiceItem {
            question: format!("which word goes with w{i} and v{}?", i * 3),
            choices: vec![format!("x{i}"), format!("w{i} v"), format!("yy{}", 9 - i)],
            answer: i % 3,
        })
        .collect();
    let format = ChoiceFormat::Raw;
    let train: Vec<Example> = items[..6]
        .iter()
        .map(|it| reft::eval::choice::training_example(&lm, it, format).unwrap())
        .collect();
    let dev_items = items[6..].to_vec();
    let dev = DevSet::Choice {
        items: dev_items.clone(),
        format,
    };
    let space = Space::from_toml_str(
        "[search]\nlayers = [0, 1]\npositions = [\"l1\", \"l2\"]\nlr = [0.05]\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut objective = TrainObjective::new(&lm, train, dev, defaults(), 1 << 30)
        .unwrap()
        .with_trials_dir(out.path().join("trials"));
    let result = grid_sweep(&space, &mut objective, &out.path().join("t.jsonl"), 2, true);
    assert_eq!(result.failed, 0);
    for r in result.history.finished() {
        let dir = out
            .path()
            .join("trials")
            .join(reft::sweep::objective::trial_dir_name(r.trial));
        let mut adapter = reft::adapter::Adapter::open(
            &dir,
            None,
            "l1",
            candle_core::DType::F32,
            lm.decoder.device(),
        )
        .unwrap();
        adapter.set_training(false);
        let want = evaluate_choice(&lm, &dev_items, format, &mut adapter, &mut |_, _| {}).unwrap();
        assert_eq!(r.metric, Some(want.accuracy), "trial {}", r.trial);
    }
    // One pass (it records every layer's input: the tiny model fits the budget) serves the
    // four distinct sets of two start layers and two first positions.
    assert_eq!(objective.cache_builds(), 4);
    assert_eq!(objective.frozen_passes(), 1);
}
