//! The training side of a sweep: a trial's config becomes an adapter and a training run on
//! the shared model and data, trained rung by rung and scored on the dev split in between.
//!
//! Every trial reuses one loaded model and one tokenised training set. The frozen prefix
//! caches (SPEC §7) depend only on each example's start layer and first recomputed position,
//! and all of them are views of one frozen pass over the data ([`FrozenPass`]: every layer's
//! keys and values, and the hidden states entering each start layer asked for), so a trial
//! runs the frozen model again only when it starts at a layer no earlier trial did.
//! Multiple-choice dev sets are scored the same way: each option is a short example over its
//! cached question, so a trial's scoring runs only its adapter's layers on the last positions.

use std::path::PathBuf;

use candle_core::DType;

use super::driver::{Objective, TrialOutcome};
use super::space::{Config, Value};
use crate::adapter::config::LayerSpec;
use crate::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel, InterventionSpec};
use crate::data::{Example, Template};
use crate::eval::choice::{evaluate_choice, option_examples, report_from_scores};
use crate::eval::choice::{ChoiceFormat, ChoiceItem};
use crate::eval::generate::{evaluate_generate, GenerateItem};
use crate::load::LanguageModel;
use crate::train::{FrozenPass, PrefixCaches, Schedule, TrainConfig, Trainer};
use crate::{Error, Result};

/// The keys a sweep's config may set; anything else is refused before the first trial.
pub const KNOWN_KEYS: [&str; 15] = [
    "layers",
    "positions",
    "tied",
    "kind",
    "rank",
    "component",
    "act",
    "dropout",
    "lr",
    "epochs",
    "weight_decay",
    "warmup",
    "batch_size",
    "grad_accum",
    "schedule",
];

/// What a trial is scored on: the dev split, never the test split.
pub enum DevSet {
    /// Mean cross-entropy of the responses (lower is better).
    Loss(Vec<Example>),
    /// Multiple-choice accuracy (length-normalised, as `reft eval --task choice`).
    Choice {
        /// The items.
        items: Vec<ChoiceItem>,
        /// How questions are shown (the training template's format).
        format: ChoiceFormat,
    },
    /// Normalised exact match of greedy answers (as `reft eval --task generate`).
    Generate {
        /// The items.
        items: Vec<GenerateItem>,
        /// Prompt template.
        template: Template,
        /// Longest answer.
        max_new_tokens: usize,
    },
}

impl DevSet {
    /// The metric's name, as the journal and the table print it.
    pub fn metric_name(&self) -> &'static str {
        match self {
            DevSet::Loss(_) => "eval_loss",
            DevSet::Choice { .. } => "choice_accuracy",
            DevSet::Generate { .. } => "exact_match",
        }
    }

    /// Whether higher is better.
    pub fn maximize(&self) -> bool {
        !matches!(self, DevSet::Loss(_))
    }

    /// Items scored.
    pub fn len(&self) -> usize {
        match self {
            DevSet::Loss(v) => v.len(),
            DevSet::Choice { items, .. } => items.len(),
            DevSet::Generate { items, .. } => items.len(),
        }
    }

    /// Whether there is nothing to score.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The metric of `adapter` on a choice or generation dev (or test) set.
pub fn score_adapter(set: &DevSet, lm: &LanguageModel, adapter: &mut Adapter) -> Result<f64> {
    adapter.set_training(false);
    let out = match set {
        DevSet::Loss(_) => Err(Error::InvalidArgument(
            "an eval-loss set is scored by its trainer".into(),
        )),
        DevSet::Choice { items, format } => {
            evaluate_choice(lm, items, *format, adapter, &mut |_, _| {}).map(|r| r.accuracy)
        }
        DevSet::Generate {
            items,
            template,
            max_new_tokens,
        } => evaluate_generate(
            lm,
            items,
            *template,
            *max_new_tokens,
            16,
            adapter,
            &mut |_, _| {},
        )
        .map(|(r, _)| r.exact_match),
    };
    adapter.set_training(true);
    out
}

/// The metric of a saved adapter on a held-out split (the test split, scored once after the
/// search): eval-loss sets through a trainer's loss, the others as [`score_adapter`].
pub fn score_test(set: &DevSet, lm: &LanguageModel, mut adapter: Adapter) -> Result<f64> {
    let DevSet::Loss(examples) = set else {
        return score_adapter(set, lm, &mut adapter);
    };
    let cfg = TrainConfig {
        cache_prefix: false,
        ..TrainConfig::default()
    };
    // The trainer needs a training set; it is never trained on.
    let one = examples.iter().take(1).cloned().collect();
    let mut trainer = Trainer::new(lm, adapter, one, examples.clone(), cfg)?;
    trainer
        .eval_loss()?
        .ok_or_else(|| Error::InvalidArgument("the test split is empty".into()))
}

/// What every trial starts from before its config is applied.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// The intervention (kind, layers, positions, rank, …).
    pub intervention: InterventionSpec,
    /// Training settings.
    pub train: TrainConfig,
    /// Seed of every trial's initialisation and data order, so trials differ only by config.
    pub seed: u64,
    /// The prompt template the data was tokenised with (recorded in saved adapters).
    pub template: Template,
}

/// A trial's adapter description and training settings: `defaults` with `config` applied.
pub fn trial_setup(
    config: &Config,
    defaults: &Defaults,
    num_layers: usize,
) -> Result<(AdapterSpec, TrainConfig)> {
    let mut iv = defaults.intervention.clone();
    let mut tc = defaults.train.clone();
    tc.seed = defaults.seed;
    for (key, v) in config {
        let bad = || Error::InvalidArgument(format!("sweep key `{key}` cannot be {v}"));
        let text = || match v {
            Value::Str(s) => Ok(s.clone()),
            _ => Err(bad()),
        };
        let int = || {
            v.as_i64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(bad)
        };
        let float = || v.as_f64().ok_or_else(bad);
        match key.as_str() {
            "layers" => iv.layers = named_layers(v, num_layers).ok_or_else(bad)?,
            "positions" => iv.positions = text()?,
            "tied" => {
                iv.tied = match v {
                    Value::Bool(b) => *b,
                    _ => return Err(bad()),
                }
            }
            "kind" => iv.kind = text()?.parse()?,
            "rank" => iv.rank = int()?,
            "component" => iv.component = text()?.parse()?,
            "act" => iv.act = text()?.parse()?,
            "dropout" => iv.dropout = float()?,
            "lr" => tc.optim.lr = float()?,
            "epochs" => tc.epochs = int()?,
            "weight_decay" => tc.optim.weight_decay = float()?,
            "warmup" => tc.warmup_ratio = float()?,
            "batch_size" => tc.batch_size = int()?,
            "grad_accum" => tc.grad_accum = int()?,
            "schedule" => tc.schedule = text()?.parse::<Schedule>()?,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown sweep key `{other}` (known: {})",
                    KNOWN_KEYS.join(", ")
                )))
            }
        }
    }
    Ok((
        AdapterSpec {
            interventions: vec![iv],
        },
        tc,
    ))
}

/// Layers from a config value: an integer, a layer string (`"3;9;18"`, `"0..8"`, `"all"`), or
/// a named set relative to the model's depth: `mid` (the middle layer), `quartiles` (at a
/// quarter, half and three quarters), `thirds` (a third and two thirds), `everyK` (0, K, 2K, …).
pub fn named_layers(v: &Value, n: usize) -> Option<LayerSpec> {
    let join = |v: Vec<usize>| {
        let s: Vec<String> = v.iter().map(usize::to_string).collect();
        LayerSpec::Text(s.join(";"))
    };
    match v {
        Value::Int(i) => Some(LayerSpec::One(*i)),
        Value::Str(s) => Some(match s.as_str() {
            "mid" => LayerSpec::One((n / 2) as i64),
            "quartiles" => join(vec![n / 4, n / 2, 3 * n / 4]),
            "thirds" => join(vec![n / 3, 2 * n / 3]),
            every if every.starts_with("every") => {
                let k: usize = every["every".len()..].parse().ok().filter(|&k| k > 0)?;
                join((0..n).step_by(k).collect())
            }
            other => LayerSpec::Text(other.to_string()),
        }),
        _ => None,
    }
}

/// Progress of a trial, for a caller's display.
#[derive(Debug, Clone)]
pub enum TrialEvent<'c> {
    /// A trial starts with this config and this many trainable parameters.
    Started {
        /// Trial number.
        trial: usize,
        /// Its config.
        config: &'c Config,
        /// Trainable parameters.
        params: usize,
        /// Its rungs (cumulative epochs).
        rungs: &'c [usize],
    },
    /// An epoch of a trial finished.
    Epoch {
        /// Trial number.
        trial: usize,
        /// Epochs done.
        epoch: usize,
        /// Mean training loss of its last step.
        loss: f64,
    },
    /// A trial was scored at a rung.
    Scored {
        /// Trial number.
        trial: usize,
        /// Epochs trained.
        epochs: usize,
        /// The dev metric.
        metric: f64,
    },
}

/// Trains trials on one model and data set.
pub struct TrainObjective<'a> {
    lm: &'a LanguageModel,
    train: Vec<Example>,
    dev: DevSet,
    defaults: Defaults,
    /// Each completed trial's adapter is saved in `trial-NNN/` here.
    trials_dir: Option<PathBuf>,
    /// The frozen pass over the training examples.
    train_pass: FrozenPass,
    /// A choice dev set's options as examples, how many each item has, and their pass.
    dev_options: Option<(Vec<Example>, Vec<usize>, FrozenPass)>,
    on_event: Box<dyn FnMut(TrialEvent<'_>) + 'a>,
}

impl<'a> TrainObjective<'a> {
    /// An objective on `train`, scored on `dev`; the frozen passes keep at most
    /// `cache_budget_bytes` each (examples past it run in full).
    pub fn new(
        lm: &'a LanguageModel,
        train: Vec<Example>,
        dev: DevSet,
        defaults: Defaults,
        cache_budget_bytes: usize,
    ) -> Result<Self> {
        if train.is_empty() || dev.is_empty() {
            return Err(Error::InvalidArgument(
                "a sweep needs training examples and a non-empty dev split".into(),
            ));
        }
        let dev_options = match &dev {
            DevSet::Choice { items, format } => {
                let mut examples = Vec::new();
                let mut counts = Vec::with_capacity(items.len());
                for item in items {
                    let options = option_examples(lm, item, *format)?;
                    counts.push(options.len());
                    examples.extend(options);
                }
                Some((examples, counts, FrozenPass::new(cache_budget_bytes)))
            }
            _ => None,
        };
        Ok(Self {
            lm,
            train,
            dev,
            defaults,
            trials_dir: None,
            train_pass: FrozenPass::new(cache_budget_bytes),
            dev_options,
            on_event: Box::new(|_| {}),
        })
    }

    /// Saves each completed trial's adapter as `dir/trial-NNN/` (a normal adapter folder).
    pub fn with_trials_dir(mut self, dir: PathBuf) -> Self {
        self.trials_dir = Some(dir);
        self
    }

    /// Reports trials' progress to `f`.
    pub fn on_event(mut self, f: impl FnMut(TrialEvent<'_>) + 'a) -> Self {
        self.on_event = Box::new(f);
        self
    }

    /// The dev set.
    pub fn dev(&self) -> &DevSet {
        &self.dev
    }

    /// Distinct prefix cache sets the trials used (one per distinct start layer and first
    /// position of their adapters); each is a view of the frozen pass, made once and shared.
    pub fn cache_builds(&self) -> usize {
        self.train_pass.sets_served()
    }

    /// Frozen passes run over the training data (one per new start layer).
    pub fn frozen_passes(&self) -> usize {
        self.train_pass.passes
    }

    /// The dev metric of `trainer`'s adapter now.
    fn score(&mut self, trainer: &mut Trainer<'_>) -> Result<f64> {
        match (&self.dev, &mut self.dev_options) {
            (DevSet::Loss(examples), _) => trainer
                .eval_loss_on(examples.clone())?
                .ok_or_else(|| Error::InvalidArgument("the dev split is empty".into())),
            (DevSet::Choice { items, format }, Some((examples, counts, pass))) => {
                let caches = pass.caches(self.lm, &trainer.adapter, examples)?;
                let losses = trainer.summed_losses(examples.clone(), caches)?;
                let mut scores = Vec::with_capacity(items.len());
                let mut at = 0;
                for &n in counts.iter() {
                    scores.push(losses[at..at + n].iter().map(|l| -l).collect());
                    at += n;
                }
                Ok(report_from_scores(items, *format, &scores).accuracy)
            }
            (set, _) => score_adapter(set, self.lm, &mut trainer.adapter),
        }
    }

    /// The adapter (untrained) and training settings of `config`.
    pub fn setup(&self, config: &Config) -> Result<(Adapter, TrainConfig)> {
        let n = self.lm.decoder.config().num_layers;
        let (spec, tc) = trial_setup(config, &self.defaults, n)?;
        let adapter_config = AdapterConfig {
            format_version: crate::adapter::config::FORMAT_VERSION,
            base_model: Some(BaseModel::of(self.lm)),
            interventions: spec.expand(n)?,
            template: Some(self.defaults.template.name().to_string()),
            training: Some(serde_json::json!({ "sweep_config": config })),
        };
        let d = self.lm.decoder.config().hidden_size;
        let adapter = Adapter::init(
            adapter_config,
            d,
            self.defaults.seed,
            DType::F32,
            self.lm.decoder.device(),
        )?;
        Ok((adapter, tc))
    }

    fn trial(
        &mut self,
        trial: usize,
        config: &Config,
        rungs: &[usize],
        report: &mut dyn FnMut(usize, usize, f64) -> bool,
    ) -> Result<TrialOutcome> {
        let (adapter, tc) = self.setup(config)?;
        let params = adapter.num_parameters();
        (self.on_event)(TrialEvent::Started {
            trial,
            config,
            params,
            rungs,
        });
        let caches = match tc.cache_prefix {
            true => self.train_pass.caches(self.lm, &adapter, &self.train)?,
            false => PrefixCaches::new((0..self.train.len()).map(|_| None).collect()),
        };
        let train = self.train.clone();
        let mut trainer = Trainer::with_caches(self.lm, adapter, train, Vec::new(), tc, caches)?;
        let spe = trainer.steps_per_epoch();
        for (i, &epochs) in rungs.iter().enumerate() {
            let on_event = &mut self.on_event;
            let mut last_loss = f64::NAN;
            trainer.run_until(
                epochs * spe,
                &mut |e| match e {
                    crate::train::Event::Step(m) => last_loss = m.loss,
                    crate::train::Event::Epoch { epoch, .. } => on_event(TrialEvent::Epoch {
                        trial,
                        epoch,
                        loss: last_loss,
                    }),
                    crate::train::Event::Checkpoint(_) => {}
                },
                &|| false,
            )?;
            let metric = self.score(&mut trainer)?;
            (self.on_event)(TrialEvent::Scored {
                trial,
                epochs,
                metric,
            });
            let go_on = report(i, epochs, metric);
            if i + 1 == rungs.len() {
                if let Some(dir) = &self.trials_dir {
                    let at = dir.join(trial_dir_name(trial));
                    trainer.adapter.save(&at)?;
                }
            }
            if !go_on {
                break;
            }
        }
        Ok(TrialOutcome { params })
    }
}

/// The folder name of trial `t`'s adapter under the trials folder.
pub fn trial_dir_name(t: usize) -> String {
    format!("trial-{t:03}")
}

impl Objective for TrainObjective<'_> {
    fn run(
        &mut self,
        trial: usize,
        config: &Config,
        rungs: &[usize],
        report: &mut dyn FnMut(usize, usize, f64) -> bool,
    ) -> std::result::Result<TrialOutcome, String> {
        self.trial(trial, config, rungs, report)
            .map_err(|e| e.to_string())
    }
}
