//! The sweep loop: picks each trial's config (TPE, grid or random), hands it to an
//! [`Objective`] that trains, applies ASHA at each rung the objective reports, and journals
//! every step so an interrupted sweep resumes where it stopped. No training code lives here.
//!
//! Trials run one at a time, numbered from 0. On resume, finished trials are skipped and an
//! interrupted one is rerun from scratch with the config it was given. Because every
//! suggestion depends only on `(seed, trial, finished trials)` and ASHA only compares against
//! finished trials, a resumed sweep writes the same records as an uninterrupted one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::asha::{Asha, Decision};
use super::error::{Result, SweepError};
use super::journal::{replay, History, Journal, Record, Status};
use super::space::{Config, Space, Value};
use super::tpe::{sample_random, Tpe};

/// The config key holding a trial's own epoch target (searched or fixed).
pub const EPOCHS_KEY: &str = "epochs";

/// What an objective returns once a trial has trained as far as it was let.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialOutcome {
    /// Trainable parameters of the trial's model, for the journal.
    pub params: usize,
}

/// The training side of a sweep.
pub trait Objective {
    /// Trains `config` through `rungs` (cumulative epoch counts), calling
    /// `report(rung_index, epochs, metric)` after each (as measured; [`SweepPlan::maximize`] says which way is better) and stopping
    /// as soon as it returns `false`. An `Err` marks the trial failed; the sweep goes on.
    fn run(
        &mut self,
        trial: usize,
        config: &Config,
        rungs: &[usize],
        report: &mut dyn FnMut(usize, usize, f64) -> bool,
    ) -> std::result::Result<TrialOutcome, String>;
}

/// How trial configs are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Tree-structured Parzen Estimator with default settings ([`Tpe::new`]).
    Tpe {
        /// Seed of every trial's random stream.
        seed: u64,
    },
    /// Every config of [`Space::grid`], in order, once.
    Grid,
    /// Uniform random configs (TPE's start-up phase, continued).
    Random {
        /// Seed of every trial's random stream.
        seed: u64,
    },
}

/// What to sweep and for how long.
#[derive(Debug, Clone)]
pub struct SweepPlan<'a> {
    /// The search space.
    pub space: &'a Space,
    /// How configs are chosen.
    pub mode: Mode,
    /// Trials in the sweep (grid mode stops at the grid's size; `usize::MAX` for all).
    pub n_trials: usize,
    /// Early stopping; `None` trains every trial to its target.
    pub asha: Option<Asha>,
    /// Epoch target of configs without an `epochs` key.
    pub default_epochs: usize,
    /// Higher metrics are better (accuracies); otherwise lower ones (losses).
    pub maximize: bool,
    /// No new trial starts, and no running trial passes another rung, after this instant.
    pub deadline: Option<Instant>,
}

/// The outcome of [`run_sweep`].
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// The completed trial with the lowest metric.
    pub best: Option<Record>,
    /// Trials run (or rerun) by this call.
    pub ran: usize,
    /// Finished trials found in the journal and skipped.
    pub resumed: usize,
    /// Finished trials that ASHA stopped early.
    pub stopped_early: usize,
    /// Finished trials that failed.
    pub failed: usize,
    /// Epochs ASHA saved over all finished trials.
    pub epochs_saved: usize,
    /// The stop flag or deadline ended the sweep before all trials finished.
    pub interrupted: bool,
    /// Every trial's records, for reports.
    pub history: History,
}

/// Runs (or resumes) a sweep. `resumed` are the records [`Journal::open`] returned for
/// `journal`; setting `stop_flag` interrupts cleanly (the current trial is rerun on resume).
/// Errors only when the journal cannot be written or contradicts the plan.
pub fn run_sweep(
    plan: &SweepPlan<'_>,
    journal: &mut Journal,
    resumed: Vec<Record>,
    objective: &mut dyn Objective,
    stop_flag: &AtomicBool,
) -> Result<SweepResult> {
    let mut history = replay(&resumed).directed(plan.maximize);
    if resumed.len() != history.finished_records().len() {
        // Records of a trial cut short (rerun from scratch below) or of earlier reruns go, so
        // that a resumed sweep's journal ends as an uninterrupted one's.
        let kept = history.finished_records();
        journal.rewrite(&kept)?;
        history = replay(&kept).directed(plan.maximize);
    }
    let grid = match plan.mode {
        Mode::Grid => Some(plan.space.grid()?),
        _ => None,
    };
    check_resumed(plan.space, &history, grid.as_deref())?;
    let n = grid
        .as_ref()
        .map_or(plan.n_trials, |g| g.len().min(plan.n_trials));
    let halt = Halt {
        flag: stop_flag,
        deadline: plan.deadline,
    };
    let resumed_count = (0..n).filter(|&t| history.is_finished(t)).count();
    let (mut ran, mut interrupted) = (0, false);
    for trial in 0..n {
        if history.is_finished(trial) {
            continue;
        }
        if halt.now() {
            interrupted = true;
            break;
        }
        let config = match history.last(trial) {
            Some(r) => r.config.clone(),
            None => as_stored(&suggest(plan, grid.as_deref(), &history, trial)),
        };
        ran += 1;
        let run = TrialRun::new(plan, journal, &mut history, &halt, trial, config);
        if !run.execute(objective)? {
            interrupted = true;
            break;
        }
    }
    Ok(summarize(plan, history, ran, resumed_count, interrupted))
}

/// Refuses a journal written under another space: mixing them would corrupt the history.
fn check_resumed(space: &Space, history: &History, grid: Option<&[Config]>) -> Result<()> {
    let trials: Vec<usize> = history
        .finished()
        .map(|r| r.trial)
        .chain(history.interrupted())
        .collect();
    for t in trials {
        let Some(config) = history.last(t).map(|r| &r.config) else {
            continue;
        };
        let fixed_ok = space.fixed.iter().all(|(k, v)| config.get(k) == Some(v));
        let grid_ok = grid.is_none_or(|g| g.get(t).is_none_or(|c| c == config));
        if !(fixed_ok && grid_ok && space.contains(config)) {
            return Err(SweepError::Invalid(format!(
                "journal trial {t} has config {} that this space would not produce; the space \
                 or mode changed since, so start a new journal",
                Space::key_for(config)
            )));
        }
    }
    Ok(())
}

fn suggest(
    plan: &SweepPlan<'_>,
    grid: Option<&[Config]>,
    history: &History,
    trial: usize,
) -> Config {
    match (plan.mode, grid) {
        (Mode::Grid, Some(g)) => g
            .get(trial)
            .cloned()
            .unwrap_or_else(|| plan.space.fixed.clone()),
        (Mode::Tpe { seed }, _) => {
            Tpe::new(seed).suggest(plan.space, &history.tpe_history(), trial)
        }
        (Mode::Random { seed }, _) => {
            sample_random(plan.space, seed, trial, &history.tpe_history())
        }
        (Mode::Grid, None) => sample_random(plan.space, 0, trial, &history.tpe_history()),
    }
}

/// A config's own epoch target: its `epochs` value, else the plan's default.
fn epoch_target(config: &Config, default: usize) -> std::result::Result<usize, String> {
    match config.get(EPOCHS_KEY) {
        None => Ok(default.max(1)),
        Some(Value::Int(e)) if *e >= 1 => usize::try_from(*e).map_err(|e| e.to_string()),
        Some(v) => Err(format!(
            "`{EPOCHS_KEY}` must be a positive integer, got {v}"
        )),
    }
}

fn summarize(
    plan: &SweepPlan<'_>,
    history: History,
    ran: usize,
    resumed: usize,
    interrupted: bool,
) -> SweepResult {
    let count = |s: Status| history.finished().filter(|r| r.status == s).count();
    let pairs: Vec<(usize, usize)> = history
        .finished()
        .filter(|r| r.status != Status::Failed)
        .filter_map(|r| Some((epoch_target(&r.config, plan.default_epochs).ok()?, r.epochs)))
        .collect();
    SweepResult {
        best: history.best().cloned(),
        ran,
        resumed,
        stopped_early: count(Status::Stopped),
        failed: count(Status::Failed),
        epochs_saved: Asha::epochs_saved(&pairs),
        interrupted,
        history,
    }
}

/// `x` as it reads back from the journal. serde_json's default float parsing may differ
/// from the written value in the last bit, so the live run works with what a resumed run
/// will read, which keeps the two identical.
fn as_stored<T: Serialize + DeserializeOwned + Clone>(x: &T) -> T {
    let back = serde_json::to_string(x).and_then(|s| serde_json::from_str(&s));
    back.unwrap_or_else(|_| x.clone())
}

/// The stop flag and the deadline.
struct Halt<'a> {
    flag: &'a AtomicBool,
    deadline: Option<Instant>,
}

impl Halt<'_> {
    fn now(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// One trial in flight: receives the objective's reports and journals them.
struct TrialRun<'r> {
    journal: &'r mut Journal,
    history: &'r mut History,
    asha: Option<&'r Asha>,
    halt: &'r Halt<'r>,
    trial: usize,
    config: Config,
    target: std::result::Result<usize, String>,
    rungs: Vec<usize>,
    start: Instant,
    next: usize,
    /// The final record, written once the objective returns with the parameter count.
    pending: Option<Record>,
    /// The objective broke the reporting protocol; the trial fails.
    problem: Option<String>,
    /// Writing the journal failed; the sweep aborts.
    io: Option<SweepError>,
    interrupted: bool,
}

impl<'r> TrialRun<'r> {
    fn new(
        plan: &'r SweepPlan<'_>,
        journal: &'r mut Journal,
        history: &'r mut History,
        halt: &'r Halt<'r>,
        trial: usize,
        config: Config,
    ) -> Self {
        let target = epoch_target(&config, plan.default_epochs);
        let rungs = match (&target, &plan.asha) {
            (Ok(t), Some(a)) => a.rungs_for(*t),
            (Ok(t), None) => vec![*t],
            (Err(_), _) => Vec::new(),
        };
        let (asha, start) = (plan.asha.as_ref(), Instant::now());
        TrialRun {
            journal,
            history,
            asha,
            halt,
            trial,
            config,
            target,
            rungs,
            start,
            next: 0,
            pending: None,
            problem: None,
            io: None,
            interrupted: false,
        }
    }

    /// Runs the objective and journals the outcome; `Ok(false)` when interrupted.
    fn execute(mut self, objective: &mut dyn Objective) -> Result<bool> {
        let outcome = match self.target.clone() {
            Err(msg) => Err(msg),
            Ok(_) => {
                let (trial, config, rungs) = (self.trial, self.config.clone(), self.rungs.clone());
                objective.run(trial, &config, &rungs, &mut |i, e, m| self.report(i, e, m))
            }
        };
        self.finish(outcome)
    }

    fn report(&mut self, rung: usize, epochs: usize, metric: f64) -> bool {
        if self.pending.is_some() || self.problem.is_some() || self.io.is_some() || self.interrupted
        {
            return false;
        }
        if let Some(p) = self.protocol_problem(rung, epochs, metric) {
            self.problem = Some(p);
            return false;
        }
        self.next = rung + 1;
        if self.next == self.rungs.len() {
            self.pending = Some(self.record(rung, epochs, Some(metric), Status::Completed));
            return false;
        }
        if self.halt.now() {
            self.interrupted = true;
            return false;
        }
        let field = self.history.results_at(epochs);
        let score = self.history.score(metric);
        match self.asha.map_or(Decision::Continue, |a| {
            a.decide(self.trial, epochs, score, &field)
        }) {
            Decision::Continue => {
                self.write(self.record(rung, epochs, Some(metric), Status::Continued))
            }
            Decision::Stop => {
                self.pending = Some(self.record(rung, epochs, Some(metric), Status::Stopped));
                false
            }
        }
    }

    fn protocol_problem(&self, rung: usize, epochs: usize, metric: f64) -> Option<String> {
        if rung != self.next || self.rungs.get(rung) != Some(&epochs) {
            return Some(format!(
                "objective reported rung {rung} at {epochs} epochs; expected rung {} at {:?} epochs",
                self.next,
                self.rungs.get(self.next)
            ));
        }
        (!metric.is_finite()).then(|| format!("metric at rung {rung} is not finite ({metric})"))
    }

    fn record(&self, rung: usize, epochs: usize, metric: Option<f64>, status: Status) -> Record {
        Record {
            trial: self.trial,
            rung,
            epochs,
            config: self.config.clone(),
            metric,
            params: 0,
            seconds: self.start.elapsed().as_secs_f64(),
            status,
            error: None,
        }
    }

    fn write(&mut self, record: Record) -> bool {
        match self.journal.append(&record) {
            Ok(()) => {
                self.history.push(as_stored(&record));
                true
            }
            Err(e) => {
                self.io = Some(e);
                false
            }
        }
    }

    fn finish(mut self, outcome: std::result::Result<TrialOutcome, String>) -> Result<bool> {
        if let Some(e) = self.io.take() {
            return Err(e);
        }
        let halted_itself = self.pending.is_none() && self.problem.is_none() && self.halt.now();
        if self.interrupted || halted_itself {
            return Ok(false);
        }
        let record = match (outcome, self.problem.take(), self.pending.take()) {
            (Err(msg), _, _) | (Ok(_), Some(msg), _) => self.failed(msg),
            (Ok(o), None, Some(r)) => Record {
                params: o.params,
                seconds: self.start.elapsed().as_secs_f64(),
                ..r
            },
            (Ok(_), None, None) => self.failed(format!(
                "objective returned after {} of {} rungs without reporting the rest",
                self.next,
                self.rungs.len()
            )),
        };
        self.journal.append(&record)?;
        self.history.push(as_stored(&record));
        Ok(true)
    }

    fn failed(&self, message: String) -> Record {
        let epochs = self
            .next
            .checked_sub(1)
            .and_then(|i| self.rungs.get(i))
            .copied()
            .unwrap_or(0);
        let rung = self.next.min(self.rungs.len().saturating_sub(1));
        Record {
            error: Some(message),
            ..self.record(rung, epochs, None, Status::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    const SPACE: &str = "[fixed]\nkind = \"loreft\"\n[search]\n\
        lr = { float = [1e-5, 1e-1], log = true }\nlayers = [\"mid\", \"all\"]\n\
        epochs = { int = [3, 9] }\n";

    /// Metric falls with epochs and is best at lr = 1e-3 with `mid` layers.
    fn metric(config: &Config, epochs: usize) -> f64 {
        let lr = config["lr"].as_f64().unwrap_or(1.0);
        let layers = if config["layers"] == Value::Str("all".into()) {
            0.3
        } else {
            0.0
        };
        (lr.log10() + 3.0).powi(2) + layers + 2.0 / epochs as f64
    }

    #[derive(Default)]
    struct Synthetic {
        seen: Vec<Config>,
        /// Set this flag right after the first report of this trial.
        halt_in: Option<(usize, &'static AtomicBool)>,
        fail_trial: Option<usize>,
    }

    impl Objective for Synthetic {
        fn run(
            &mut self,
            trial: usize,
            config: &Config,
            rungs: &[usize],
            report: &mut dyn FnMut(usize, usize, f64) -> bool,
        ) -> std::result::Result<TrialOutcome, String> {
            self.seen.push(config.clone());
            if self.fail_trial == Some(trial) {
                return Err("out of memory".into());
            }
            for (i, &e) in rungs.iter().enumerate() {
                let go = report(i, e, metric(config, e));
                if let Some((_, flag)) = self.halt_in.filter(|(t, _)| *t == trial) {
                    flag.store(true, Ordering::Relaxed);
                }
                if !go {
                    break;
                }
            }
            Ok(TrialOutcome {
                params: 1000 + trial,
            })
        }
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "sweepcore-driver-{}-{name}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn plan(space: &Space, mode: Mode, n_trials: usize, asha: Option<Asha>) -> SweepPlan<'_> {
        SweepPlan {
            space,
            mode,
            n_trials,
            asha,
            default_epochs: 9,
            maximize: false,
            deadline: None,
        }
    }

    /// Runs a sweep against the journal at `path`, resuming whatever it holds.
    fn sweep(
        path: &PathBuf,
        plan: &SweepPlan<'_>,
        objective: &mut Synthetic,
        flag: &AtomicBool,
    ) -> SweepResult {
        let (mut journal, resumed) = Journal::open(path).unwrap();
        run_sweep(plan, &mut journal, resumed, objective, flag).unwrap()
    }

    fn without_seconds(path: &PathBuf) -> Vec<Record> {
        let (_, records) = Journal::open(path).unwrap();
        records
            .into_iter()
            .map(|r| Record { seconds: 0.0, ..r })
            .collect()
    }

    #[test]
    fn a_resumed_sweep_writes_the_same_journal() {
        let space = Space::from_toml_str(SPACE).unwrap();
        let asha = Asha::new(1, 9, 3).ok();
        let flag = AtomicBool::new(false);
        let (full, split) = (temp("full"), temp("split"));
        let all = sweep(
            &full,
            &plan(&space, Mode::Tpe { seed: 7 }, 10, asha.clone()),
            &mut Synthetic::default(),
            &flag,
        );
        assert_eq!((all.ran, all.resumed, all.interrupted), (10, 0, false));
        assert!(
            all.stopped_early > 0,
            "ASHA should take part in the comparison"
        );
        let first = sweep(
            &split,
            &plan(&space, Mode::Tpe { seed: 7 }, 4, asha.clone()),
            &mut Synthetic::default(),
            &flag,
        );
        assert_eq!(first.ran, 4);
        let rest = sweep(
            &split,
            &plan(&space, Mode::Tpe { seed: 7 }, 10, asha),
            &mut Synthetic::default(),
            &flag,
        );
        assert_eq!((rest.ran, rest.resumed), (6, 4));
        assert_eq!(without_seconds(&full), without_seconds(&split));
        assert_eq!(all.best.map(|r| r.trial), rest.best.map(|r| r.trial));
        for p in [full, split] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn an_interrupted_trial_is_rerun_from_scratch() {
        static FLAG: AtomicBool = AtomicBool::new(false);
        let space = Space::from_toml_str(SPACE).unwrap();
        let asha = Asha::new(1, 9, 3).ok();
        let p = plan(&space, Mode::Random { seed: 3 }, 8, asha);
        let (full, cut) = (temp("uncut"), temp("cut"));
        let never = AtomicBool::new(false);
        sweep(&full, &p, &mut Synthetic::default(), &never);
        let mut halting = Synthetic {
            halt_in: Some((0, &FLAG)),
            ..Synthetic::default()
        };
        let first = sweep(&cut, &p, &mut halting, &FLAG);
        assert!(first.interrupted && first.ran == 1);
        assert_eq!(replay(&Journal::open(&cut).unwrap().1).interrupted(), [0]);
        let rest = sweep(&cut, &p, &mut Synthetic::default(), &never);
        assert_eq!((rest.ran, rest.resumed, rest.interrupted), (8, 0, false));
        let last = |path: &PathBuf| -> Vec<Record> {
            replay(&without_seconds(path)).finished().cloned().collect()
        };
        assert_eq!(last(&full), last(&cut));
        for p in [full, cut] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn asha_stops_trials_and_saves_epochs() {
        let space = Space::from_toml_str(SPACE).unwrap();
        let path = temp("asha");
        let r = sweep(
            &path,
            &plan(
                &space,
                Mode::Random { seed: 1 },
                20,
                Asha::new(1, 9, 3).ok(),
            ),
            &mut Synthetic::default(),
            &AtomicBool::new(false),
        );
        assert!(
            r.stopped_early > 0 && r.epochs_saved > 0,
            "{} stopped, {} saved",
            r.stopped_early,
            r.epochs_saved
        );
        let best = r.best.unwrap();
        assert_eq!(
            (best.status, best.params),
            (Status::Completed, 1000 + best.trial)
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn grid_mode_visits_every_config_once() {
        let text =
            "[fixed]\nepochs = 2\n[search]\nlr = [1e-4, 1e-3, 1e-2]\nlayers = [\"mid\", \"all\"]\n";
        let space = Space::from_toml_str(text).unwrap();
        let path = temp("grid");
        let mut objective = Synthetic::default();
        let r = sweep(
            &path,
            &plan(&space, Mode::Grid, usize::MAX, None),
            &mut objective,
            &AtomicBool::new(false),
        );
        assert_eq!(r.ran, 6);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for c in &objective.seen {
            *counts.entry(Space::key_for(c)).or_default() += 1;
        }
        let grid = space.grid().unwrap();
        assert!(
            counts.len() == 6
                && grid
                    .iter()
                    .all(|c| counts.get(&Space::key_for(c)) == Some(&1))
        );
        // Resuming a finished grid runs nothing.
        assert_eq!(
            sweep(
                &path,
                &plan(&space, Mode::Grid, usize::MAX, None),
                &mut objective,
                &AtomicBool::new(false)
            )
            .ran,
            0
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn failures_are_journaled_and_the_sweep_goes_on() {
        let space = Space::from_toml_str(SPACE).unwrap();
        let path = temp("fail");
        let mut objective = Synthetic {
            fail_trial: Some(1),
            ..Synthetic::default()
        };
        let r = sweep(
            &path,
            &plan(&space, Mode::Random { seed: 2 }, 3, None),
            &mut objective,
            &AtomicBool::new(false),
        );
        assert_eq!((r.ran, r.failed), (3, 1));
        let failed = r.history.last(1).unwrap();
        assert_eq!(
            (failed.status, failed.error.as_deref()),
            (Status::Failed, Some("out of memory"))
        );
        let other = Space::from_toml_str(&SPACE.replace("loreft", "noreft")).unwrap();
        let (mut j, resumed) = Journal::open(&path).unwrap();
        let refused = run_sweep(
            &plan(&other, Mode::Random { seed: 2 }, 3, None),
            &mut j,
            resumed,
            &mut objective,
            &AtomicBool::new(false),
        );
        assert!(matches!(refused, Err(SweepError::Invalid(_))));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_past_deadline_starts_nothing() {
        let space = Space::from_toml_str(SPACE).unwrap();
        let path = temp("deadline");
        let p = SweepPlan {
            deadline: Some(Instant::now()),
            ..plan(&space, Mode::Tpe { seed: 0 }, 5, None)
        };
        let r = sweep(
            &path,
            &p,
            &mut Synthetic::default(),
            &AtomicBool::new(false),
        );
        assert!(r.interrupted && r.ran == 0 && r.best.is_none());
        std::fs::remove_file(path).unwrap();
    }
}
