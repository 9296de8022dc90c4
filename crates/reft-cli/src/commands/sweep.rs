//! `reft sweep`: search layers, positions and training settings on a dev split (TPE with ASHA
//! early stopping by default), journal every trial, and keep the best adapter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use reft::adapter::Adapter;
use reft::data::{read_records, tokenize, Example, Fields, Template, TokenizeOptions};
use reft::eval::{read_choice_items, read_generate_items, ChoiceFormat};
use reft::sweep::objective::{self, Defaults, DevSet, TrainObjective, TrialEvent};
use reft::sweep::report::{config_text, summary_markdown, SummaryInput};
use reft::sweep::{run_sweep, Asha, Journal, Mode, Param, Space, Status, SweepPlan, Value};
use reft::train::TrainConfig;
use reft::LanguageModel;
use serde_json::json;

use super::{ItemFields, ModelArgs};

/// Arguments of `reft sweep`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The search space (TOML: `[fixed]` values and `[search]` ranges; see the README).
    #[arg(long)]
    space: PathBuf,
    /// Training data (any format `reft train` reads; choice items for choice_accuracy).
    #[arg(long)]
    data: PathBuf,
    /// Dev data, scored after each rung [default: --eval-range of --data, else
    /// --eval-fraction].
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Take the last fraction F of --data as the dev split [default: 0.2 when neither
    /// --eval-data nor --eval-range is given].
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// Test data, scored once for the best trial after the search, never used to choose
    /// [default: none].
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Items A..B (0-based, end exclusive) of --data to train on [default: all].
    #[arg(long)]
    data_range: Option<String>,
    /// Items A..B of --eval-data (else of --data) as the dev split [default: none].
    #[arg(long)]
    eval_range: Option<String>,
    /// Items A..B of --test-data (else of --data) as the test split [default: none].
    #[arg(long)]
    test_range: Option<String>,
    /// What to maximise or minimise on the dev split: eval_loss, choice_accuracy (multiple
    /// choice, trained on question -> correct option), exact_match (greedy answers).
    #[arg(long, default_value = "eval_loss")]
    metric: String,
    /// Trials to run (grid mode stops at the grid's size).
    #[arg(long, default_value_t = 24)]
    trials: usize,
    /// Start no trial (and pass no rung) after this many minutes [default: no limit].
    #[arg(long)]
    budget_minutes: Option<f64>,
    /// How configs are chosen: tpe (random for the first 8), random, grid.
    #[arg(long, default_value = "tpe")]
    mode: String,
    /// Seed of the search and of every trial's initialisation and data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// ASHA's first rung, in epochs (later rungs grow by --asha-eta up to the largest epochs).
    #[arg(long, default_value_t = 1)]
    asha_min_epochs: usize,
    /// ASHA's reduction factor: about 1 in ETA trials passes each rung.
    #[arg(long, default_value_t = 3)]
    asha_eta: usize,
    /// Train every trial to its epochs (no early stopping).
    #[arg(long)]
    no_asha: bool,
    /// Trials at once. Only 1: each trial's products already use every core (see the README).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Continue the sweep in --out from its journal.
    #[arg(long)]
    resume: bool,
    /// Output folder: trials.jsonl, trials/, best/, summary.md, sweep.png.
    #[arg(long)]
    out: PathBuf,
    /// Prompt template: raw, chat, alpaca.
    #[arg(long, default_value = "chat")]
    template: String,
    /// Response field of eval_loss data (the prompt field is --prompt-field).
    #[arg(long, default_value = "response")]
    response_field: String,
    #[command(flatten)]
    fields: ItemFields,
    /// MiB of the frozen pass over the training data (every layer's keys, values and input
    /// states, shared by all trials), and as much again for a choice dev split's; examples past
    /// it run in full.
    #[arg(long, default_value_t = 4096)]
    cache_mib: usize,
}

/// The three splits, tokenised or read for scoring.
struct Splits {
    train: Vec<Example>,
    dev: DevSet,
    test: Option<DevSet>,
}

pub fn run(a: Args) -> Result<()> {
    if a.parallel != 1 {
        bail!(
            "--parallel {}: only 1 is supported (each trial already uses every core)",
            a.parallel
        );
    }
    let text = std::fs::read_to_string(&a.space)
        .with_context(|| format!("reading {}", a.space.display()))?;
    let space = Space::from_toml_str(&text).with_context(|| format!("{}", a.space.display()))?;
    for key in space
        .fixed
        .keys()
        .chain(space.params.iter().map(|(k, _)| k))
    {
        if !objective::KNOWN_KEYS.contains(&key.as_str()) {
            bail!(
                "{}: unknown key `{key}` (known: {})",
                a.space.display(),
                objective::KNOWN_KEYS.join(", ")
            );
        }
    }
    let mode = match a.mode.as_str() {
        "tpe" => Mode::Tpe { seed: a.seed },
        "random" => Mode::Random { seed: a.seed },
        "grid" => Mode::Grid,
        other => bail!("unknown --mode `{other}` (tpe, random, grid)"),
    };
    let template: Template = a.template.parse()?;
    let settings = json!({
        "space": text, "metric": a.metric, "mode": a.mode, "seed": a.seed,
        "asha": (!a.no_asha).then_some([a.asha_min_epochs, a.asha_eta]), "template": a.template,
    });
    prepare_out(&a.out, a.resume, &settings)?;
    let lm = a.model.load()?;
    let splits = read_splits(&a, &lm, template)?;
    eprintln!(
        "reft sweep: {} training examples, {} dev items{}; metric {}",
        splits.train.len(),
        splits.dev.len(),
        splits
            .test
            .as_ref()
            .map_or(String::new(), |t| format!(", {} test items", t.len())),
        splits.dev.metric_name()
    );
    let defaults = Defaults {
        // The middle layer where the space does not say (the quickstart's 15 of SmolLM2's 30).
        intervention: serde_json::from_value(json!({
            "kind": "loreft",
            "layers": lm.decoder.config().num_layers / 2,
        }))?,
        train: TrainConfig {
            epochs: 3,
            ..TrainConfig::default()
        },
        seed: a.seed,
        template,
    };
    let max_epochs = max_epochs(&space, defaults.train.epochs);
    let asha = match a.no_asha {
        true => None,
        false => Some(Asha::new(
            a.asha_min_epochs.min(max_epochs),
            max_epochs,
            a.asha_eta,
        )?),
    };
    let plan = SweepPlan {
        space: &space,
        mode,
        n_trials: a.trials,
        asha,
        default_epochs: defaults.train.epochs,
        maximize: splits.dev.maximize(),
        deadline: a
            .budget_minutes
            .map(|m| Instant::now() + Duration::from_secs_f64(m * 60.0)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let journal_path = a.out.join("trials.jsonl");
    let (mut journal, resumed) = Journal::open(&journal_path)
        .with_context(|| format!("opening {}", journal_path.display()))?;
    let done_before = resumed.iter().filter(|r| r.status.is_final()).count();
    let total = plan
        .space
        .grid_size()
        .filter(|_| a.mode == "grid")
        .map_or(a.trials, |g| g.min(a.trials));
    let bar = ProgressBar::new(total as u64);
    bar.set_position(done_before as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} trials {msg} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let metric_name = splits.dev.metric_name();
    super::say_above(&bar, format!("trial | epochs | {metric_name} | config"));
    let space_ref = &space;
    let bar_ref = &bar;
    let mut objective =
        TrainObjective::new(&lm, splits.train, splits.dev, defaults, a.cache_mib << 20)?
            .with_trials_dir(a.out.join("trials"))
            .on_event(move |e| match e {
                TrialEvent::Started {
                    trial,
                    config,
                    params,
                    rungs,
                } => {
                    bar_ref.set_message(format!(
                        "trial {trial}: {} ({params} params, rungs {rungs:?})",
                        config_text(space_ref, config)
                    ));
                }
                TrialEvent::Epoch { trial, epoch, loss } => {
                    bar_ref.set_message(format!("trial {trial}: epoch {epoch}, loss {loss:.4}"));
                }
                TrialEvent::Scored {
                    trial,
                    epochs,
                    metric,
                } => {
                    let line = format!("{trial:>5} | {epochs:>6} | {metric:.4}");
                    super::say_above(bar_ref, line);
                }
            });
    let t0 = Instant::now();
    let result = run_sweep(&plan, &mut journal, resumed, &mut objective, &stop)?;
    let builds = objective.cache_builds();
    bar.finish_and_clear();
    for r in result.history.finished() {
        if r.status == Status::Failed {
            eprintln!(
                "trial {} failed: {}",
                r.trial,
                r.error.as_deref().unwrap_or("?")
            );
        }
    }
    let best = result.best.clone();
    let mut test_score = None;
    if let Some(b) = &best {
        let from = a
            .out
            .join("trials")
            .join(objective::trial_dir_name(b.trial));
        let to = a.out.join("best");
        copy_dir(&from, &to)?;
        if let Some(test) = &splits.test {
            let adapter = Adapter::open(&to, None, "l1", DType::F32, lm.decoder.device())?;
            let m = objective::score_test(test, &lm, adapter)?;
            test_score = Some((m, test.len()));
        }
    }
    let summary = summary_markdown(&SummaryInput {
        history: &result.history,
        space: &space,
        metric: metric_name,
        epochs_saved: result.epochs_saved,
        test: test_score,
        top: 5,
    });
    std::fs::write(a.out.join("summary.md"), &summary)?;
    super::plot::sweep_png(
        &result.history,
        &space,
        metric_name,
        &a.out.join("sweep.png"),
    )?;
    eprintln!(
        "{} trials ({} run now, {} from the journal), {} stopped early, {} failed; ASHA saved {} \
         epochs; {} prefix cache set(s) built; {:.0} s",
        result.history.finished().count(),
        result.ran,
        result.resumed,
        result.stopped_early,
        result.failed,
        result.epochs_saved,
        builds,
        t0.elapsed().as_secs_f64()
    );
    if result.interrupted {
        eprintln!(
            "interrupted: `reft sweep --resume` with the same flags continues from the journal"
        );
    }
    let line = json!({
        "best_trial": best.as_ref().map(|b| b.trial),
        "best_config": best.as_ref().map(|b| config_text(&space, &b.config)),
        metric_name: best.as_ref().and_then(|b| b.metric),
        "test": test_score.map(|t| t.0),
        "trials": result.history.finished().count(),
        "stopped_early": result.stopped_early,
        "epochs_saved": result.epochs_saved,
        "out": a.out.display().to_string(),
    });
    println!("{line}");
    Ok(())
}

/// The largest epoch target the space allows (ASHA's last rung).
fn max_epochs(space: &Space, default: usize) -> usize {
    let fixed = space.fixed.get("epochs").and_then(Value::as_i64);
    let searched = space
        .params
        .iter()
        .find(|(k, _)| k == "epochs")
        .and_then(|(_, p)| match p {
            Param::Int { hi, .. } => Some(*hi),
            Param::Categorical(v) => v.iter().filter_map(Value::as_i64).max(),
            Param::Float { .. } => None,
        });
    searched.or(fixed).map_or(default, |e| e.max(1) as usize)
}

/// Creates `out`; refuses one with a journal unless resuming, and a resume whose settings
/// differ from the journal's.
fn prepare_out(out: &Path, resume: bool, settings: &serde_json::Value) -> Result<()> {
    let path = out.join("sweep.json");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    match (resume, path.exists()) {
        (false, true) => bail!(
            "{} holds a sweep already: --resume continues it, or choose another --out",
            out.display()
        ),
        (true, true) => {
            let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            if &old != settings {
                bail!(
                    "--resume with other settings than {} (space, metric, mode, seed, ASHA, \
                     template must match)",
                    path.display()
                );
            }
            Ok(())
        }
        (_, false) => {
            let tmp = out.join("sweep.json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(settings)?)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        }
    }
}

fn range(text: Option<&str>, n: usize, what: &str) -> Result<std::ops::Range<usize>> {
    let Some(t) = text else { return Ok(0..n) };
    let (a, b) = t
        .split_once("..")
        .with_context(|| format!("{what} `{t}`: expected A..B"))?;
    let a: usize = a.trim().parse().with_context(|| format!("{what} `{t}`"))?;
    let b: usize = match b.trim() {
        "" => n,
        b => b.parse().with_context(|| format!("{what} `{t}`"))?,
    };
    if a >= b || b > n {
        bail!("{what} `{t}`: outside the {n} items there are");
    }
    Ok(a..b)
}

/// Items `r` of `v`.
fn cut<T>(v: Vec<T>, r: std::ops::Range<usize>) -> Vec<T> {
    v.into_iter().skip(r.start).take(r.len()).collect()
}

/// Train, dev and test items as the flags cut them from the files `read` reads.
type Three<T> = (Vec<T>, Vec<T>, Option<Vec<T>>);

fn split3<T>(a: &Args, read: impl Fn(&Path) -> Result<Vec<T>>) -> Result<Three<T>> {
    let all = read(&a.data)?;
    let n = all.len();
    let mut train = cut(all, range(a.data_range.as_deref(), n, "--data-range")?);
    let dev = match (&a.eval_data, &a.eval_range) {
        (None, None) => {
            let fraction = a.eval_fraction.unwrap_or(0.2);
            if !(0.0..1.0).contains(&fraction) {
                bail!("--eval-fraction must be in [0, 1)");
            }
            let k = ((train.len() as f64) * fraction).round() as usize;
            train.split_off(train.len() - k)
        }
        (file, r) => {
            let d = read(file.as_deref().unwrap_or(&a.data))?;
            let n = d.len();
            cut(d, range(r.as_deref(), n, "--eval-range")?)
        }
    };
    let test = match (&a.test_data, &a.test_range) {
        (None, None) => None,
        (file, r) => {
            let t = read(file.as_deref().unwrap_or(&a.data))?;
            let n = t.len();
            Some(cut(t, range(r.as_deref(), n, "--test-range")?))
        }
    };
    Ok((train, dev, test))
}

/// Reads train, dev and test splits for the metric.
fn read_splits(a: &Args, lm: &LanguageModel, template: Template) -> Result<Splits> {
    let tok = TokenizeOptions {
        template,
        add_eos: true,
        max_length: lm.decoder.context_limit(),
    };
    Ok(match a.metric.as_str() {
        "eval_loss" => {
            let fields = Fields {
                prompt: a.fields.prompt_field.clone(),
                response: a.response_field.clone(),
                ..Default::default()
            };
            let (train, dev, test) = split3(a, |p| {
                let records =
                    read_records(p, &fields).with_context(|| format!("reading {}", p.display()))?;
                Ok(tokenize(lm, &records, &tok)?.0)
            })?;
            Splits {
                train,
                dev: DevSet::Loss(dev),
                test: test.map(DevSet::Loss),
            }
        }
        "choice_accuracy" => {
            let fields = a.fields.choice();
            let format = ChoiceFormat::from(template);
            let (train, dev, test) = split3(a, |p| {
                read_choice_items(p, &fields).with_context(|| format!("reading {}", p.display()))
            })?;
            let train = train
                .iter()
                .map(|it| reft::eval::choice::training_example(lm, it, format))
                .collect::<reft::Result<Vec<_>>>()?;
            Splits {
                train,
                dev: DevSet::Choice { items: dev, format },
                test: test.map(|items| DevSet::Choice { items, format }),
            }
        }
        "exact_match" => {
            let (train, dev, test) = split3(a, |p| {
                read_generate_items(p, &a.fields.prompt_field, &a.fields.answer_text_field)
                    .with_context(|| format!("reading {}", p.display()))
            })?;
            let records: Vec<reft::data::Record> = train
                .iter()
                .map(|it| reft::data::Record {
                    messages: vec![reft::template::Message::new("user", it.prompt.clone())],
                    input: None,
                    response: it.answers.first().cloned().unwrap_or_default(),
                })
                .collect();
            let max_new_tokens = a.fields.max_new_tokens;
            let generate = |items| DevSet::Generate {
                items,
                template,
                max_new_tokens,
            };
            Splits {
                train: tokenize(lm, &records, &tok)?.0,
                dev: generate(dev),
                test: test.map(generate),
            }
        }
        other => bail!("unknown --metric `{other}` (eval_loss, choice_accuracy, exact_match)"),
    })
}

/// Replaces `to` with a copy of the files in `from` (an adapter folder: no subfolders).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        std::fs::copy(e.path(), tmp.join(e.file_name()))?;
    }
    let _ = std::fs::remove_dir_all(to);
    std::fs::rename(&tmp, to)?;
    Ok(())
}
