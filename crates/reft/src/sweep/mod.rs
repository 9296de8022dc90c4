//! `reft sweep`: an automated search over where and how to intervene (layers, positions, tied
//! or not, kind, rank) and how to train (learning rate, epochs, dropout, decay, warmup, batch
//! size), on a dev split only.
//!
//! The search itself knows nothing of training: a [`Space`] read from TOML, TPE suggestions
//! ([`tpe`]; random for the first trials), asynchronous successive halving over epochs
//! ([`asha`]), a JSONL journal that makes an interrupted sweep resume to the same records
//! ([`journal`]), and the loop that ties them together ([`driver`]). [`objective`] is the
//! training side: every trial shares one loaded model, one tokenised dataset and the frozen
//! prefix caches of trials that start at the same layer and position.

pub mod asha;
pub mod driver;
pub mod error;
pub mod journal;
pub mod objective;
pub mod report;
pub mod space;
pub mod tpe;

pub use asha::Asha;
pub use driver::{run_sweep, Mode, Objective, SweepPlan, SweepResult, TrialOutcome};
pub use error::SweepError;
pub use journal::{Journal, Record, Status};
pub use space::{Config, Param, Space, Value};
