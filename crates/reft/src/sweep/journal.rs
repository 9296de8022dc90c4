//! `trials.jsonl`: the append-only record of a sweep, one JSON object per line per
//! (trial, rung), fsynced line by line so that a killed sweep can be resumed.
//!
//! A line is committed once it is written in full with its newline. An interrupted write can
//! only damage the last line, so on [`Journal::open`] a corrupt last line is dropped (and cut
//! from the file so later appends start clean); a complete last line that merely lacks its
//! newline is kept. A corrupt line anywhere else means the file was edited or damaged, and
//! resuming from it is refused with the line number.
//!
//! [`replay`] turns the records back into per-trial state: which trials finished, which one
//! was interrupted mid-trial (to be rerun from scratch), the per-rung results ASHA compares
//! against, and the history TPE learns from.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Result, SweepError};
use super::space::Config;

/// How a (trial, rung) record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The trial passed this rung and trains on; not final.
    Continued,
    /// ASHA stopped the trial at this rung; final.
    Stopped,
    /// The trial reached its own epoch target; final.
    Completed,
    /// The trial failed (its error is recorded); final.
    Failed,
}

impl Status {
    /// Whether a trial whose last record has this status is done (not to be rerun).
    pub fn is_final(self) -> bool {
        self != Status::Continued
    }
}

/// One journal line: the state of one trial after one rung.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Trial number, from 0.
    pub trial: usize,
    /// Index of the rung in the trial's own rung list.
    pub rung: usize,
    /// Epochs trained when this record was written.
    pub epochs: usize,
    /// The trial's full config (fixed values included).
    pub config: Config,
    /// The dev metric at this rung, as measured (the sweep knows whether higher or lower is
    /// better); `None` if the trial failed.
    pub metric: Option<f64>,
    /// Trainable parameters; known once the trial returns, so 0 in `continued` records.
    pub params: usize,
    /// Wall-clock seconds since the trial started.
    pub seconds: f64,
    /// What happened at this rung.
    pub status: Status,
    /// Why the trial failed, for `failed` records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An open `trials.jsonl`, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    lines: usize,
}

impl Journal {
    /// Opens (creating if needed) a journal and returns the records already in it, after
    /// dropping a last line damaged by an interrupted write.
    pub fn open(path: impl AsRef<Path>) -> Result<(Journal, Vec<Record>)> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let parsed = parse(&bytes)?;
        if parsed.keep < bytes.len() {
            file.set_len(parsed.keep as u64)?;
        }
        if parsed.needs_newline {
            file.write_all(b"\n")?;
        }
        if parsed.keep < bytes.len() || parsed.needs_newline {
            file.sync_data()?;
        }
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            lines: parsed.lines,
        };
        Ok((journal, parsed.records))
    }

    /// Appends one record as one line with a single write, then syncs it to disk, so a
    /// crash leaves at most this line incomplete.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| SweepError::Journal {
            line: self.lines + 1,
            message: format!("cannot encode record: {e}"),
        })?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }

    /// Replaces the journal's contents with `records` atomically (a temporary file, synced,
    /// renamed over the journal, then the folder synced): a crash leaves the old journal or
    /// the new one, never a mix.
    pub fn rewrite(&mut self, records: &[Record]) -> Result<()> {
        let mut text = String::new();
        for (i, r) in records.iter().enumerate() {
            let line = serde_json::to_string(r).map_err(|e| SweepError::Journal {
                line: i + 1,
                message: format!("cannot encode record: {e}"),
            })?;
            text.push_str(&line);
            text.push('\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = records.len();
        Ok(())
    }

    /// Where the journal lives, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Parsed {
    records: Vec<Record>,
    /// Bytes of the file to keep (a damaged last line is cut).
    keep: usize,
    /// The last line is complete but lacks its newline.
    needs_newline: bool,
    /// Lines kept.
    lines: usize,
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let lines = split_lines(bytes);
    let last = lines
        .iter()
        .rposition(|(s, e, _)| !is_blank(&bytes[*s..*e]));
    let mut records = Vec::new();
    for (i, &(start, end, terminated)) in lines.iter().enumerate() {
        let text = &bytes[start..end];
        if is_blank(text) {
            continue;
        }
        match serde_json::from_slice::<Record>(text) {
            Ok(r) => records.push(r),
            Err(_) if Some(i) == last => {
                return Ok(Parsed {
                    records,
                    keep: start,
                    needs_newline: false,
                    lines: i,
                });
            }
            Err(e) => {
                return Err(SweepError::Journal {
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
        if Some(i) == last && !terminated {
            return Ok(Parsed {
                records,
                keep: bytes.len(),
                needs_newline: true,
                lines: i + 1,
            });
        }
    }
    Ok(Parsed {
        records,
        keep: bytes.len(),
        needs_newline: false,
        lines: lines.len(),
    })
}

/// `(start, end, has_newline)` of each line.
fn split_lines(bytes: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        match bytes[start..].iter().position(|&b| b == b'\n') {
            Some(n) => {
                out.push((start, start + n, true));
                start += n + 1;
            }
            None => {
                out.push((start, bytes.len(), false));
                start = bytes.len();
            }
        }
    }
    out
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Per-trial state rebuilt from journal records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    trials: BTreeMap<usize, Vec<Record>>,
    /// Higher metrics are better (accuracies); lower otherwise (losses).
    maximize: bool,
}

/// Rebuilds the sweep state from records in journal order.
pub fn replay(records: &[Record]) -> History {
    let mut history = History::default();
    for r in records {
        history.push(r.clone());
    }
    history
}

impl History {
    /// The same history, ranking metrics with higher ones better when `maximize`.
    pub fn directed(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }

    /// Whether higher metrics are better.
    pub fn maximizes(&self) -> bool {
        self.maximize
    }

    /// Epochs trained by the finished trials, in all.
    pub fn epochs_run(&self) -> usize {
        self.finished().map(|r| r.epochs).sum()
    }

    /// A metric as the search minimises it.
    pub fn score(&self, metric: f64) -> f64 {
        if self.maximize {
            -metric
        } else {
            metric
        }
    }

    /// Adds a record. A record that does not follow on from its trial's last one (the trial
    /// was already final, or the rung does not advance) starts a rerun: the trial's earlier
    /// records are forgotten.
    pub fn push(&mut self, record: Record) {
        let records = self.trials.entry(record.trial).or_default();
        if records
            .last()
            .is_some_and(|l| l.status.is_final() || record.rung <= l.rung)
        {
            records.clear();
        }
        records.push(record);
    }

    /// The current run's records of a trial, in rung order.
    pub fn records(&self, trial: usize) -> &[Record] {
        self.trials.get(&trial).map_or(&[], Vec::as_slice)
    }

    /// A trial's latest record.
    pub fn last(&self, trial: usize) -> Option<&Record> {
        self.records(trial).last()
    }

    /// Whether a trial is done, so a resumed sweep skips it.
    pub fn is_finished(&self, trial: usize) -> bool {
        self.last(trial).is_some_and(|r| r.status.is_final())
    }

    /// Trials with records but no final one: interrupted mid-trial, to be rerun.
    pub fn interrupted(&self) -> Vec<usize> {
        let open = |(t, rs): (&usize, &Vec<Record>)| {
            rs.last()
                .is_some_and(|r| !r.status.is_final())
                .then_some(*t)
        };
        self.trials.iter().filter_map(open).collect()
    }

    /// Every record of the finished trials' current runs, in trial order (the order an
    /// uninterrupted sweep writes them in).
    pub fn finished_records(&self) -> Vec<Record> {
        self.trials
            .values()
            .filter(|rs| rs.last().is_some_and(|r| r.status.is_final()))
            .flatten()
            .cloned()
            .collect()
    }

    /// The last record of every finished trial, in trial order.
    pub fn finished(&self) -> impl Iterator<Item = &Record> {
        self.trials
            .values()
            .filter_map(|rs| rs.last().filter(|r| r.status.is_final()))
    }

    /// `(trial, score)` recorded at `epochs` by finished trials (scores as [`score`](Self::score)
    /// gives them: lower is better): the field ASHA ranks a newcomer in. Unfinished trials are left out because they will be rerun.
    pub fn results_at(&self, epochs: usize) -> Vec<(usize, f64)> {
        let finished = self
            .trials
            .values()
            .filter(|rs| rs.last().is_some_and(|r| r.status.is_final()));
        finished
            .flatten()
            .filter(|r| r.epochs == epochs && r.status != Status::Failed)
            .filter_map(|r| Some((r.trial, self.score(r.metric?))))
            .collect()
    }

    /// Finished trials as TPE input, in trial order, each scored by its rank as Optuna ranks
    /// trials: completed ones by metric, then early-stopped ones (further rungs first, then
    /// by metric), then failed ones. Ranks rather than metrics, because a metric after fewer
    /// epochs is not comparable with a final one.
    pub fn tpe_history(&self) -> Vec<(Config, f64)> {
        let mut order: Vec<&Record> = self.finished().collect();
        order.sort_by(|a, b| {
            let key = |r: &Record| match r.status {
                Status::Completed => (0, 0),
                Status::Stopped => (1, usize::MAX - r.rung),
                _ => (2, 0),
            };
            let metric = |r: &Record| r.metric.map_or(f64::INFINITY, |m| self.score(m));
            key(a).cmp(&key(b)).then(metric(a).total_cmp(&metric(b)))
        });
        let mut ranked: Vec<(usize, Config, f64)> = order
            .iter()
            .enumerate()
            .map(|(i, r)| (r.trial, r.config.clone(), i as f64))
            .collect();
        ranked.sort_by_key(|(t, _, _)| *t);
        ranked.into_iter().map(|(_, c, v)| (c, v)).collect()
    }

    /// The completed trial with the best metric; early-stopped trials never count, as
    /// their metrics come from fewer epochs.
    pub fn best(&self) -> Option<&Record> {
        self.finished()
            .filter(|r| r.status == Status::Completed && r.metric.is_some_and(|m| !m.is_nan()))
            .min_by(|a, b| {
                let score = |r: &Record| r.metric.map_or(f64::INFINITY, |m| self.score(m));
                score(a).total_cmp(&score(b))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::space::Value;

    fn rec(trial: usize, rung: usize, metric: Option<f64>, status: Status) -> Record {
        let mut config = Config::new();
        config.insert("t".into(), Value::Int(trial as i64));
        let epochs = [1, 3, 9, 12][rung.min(3)];
        let error = (status == Status::Failed).then(|| "boom".to_string());
        Record {
            trial,
            rung,
            epochs,
            config,
            metric,
            params: 0,
            seconds: 0.5,
            status,
            error,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("sweepcore-{}-{name}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn sample() -> Vec<Record> {
        vec![
            rec(0, 0, Some(1.0), Status::Continued),
            rec(0, 1, Some(0.5), Status::Completed),
            rec(1, 0, None, Status::Failed),
        ]
    }

    #[test]
    fn records_round_trip() {
        let path = temp("round");
        let (mut j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        for r in sample() {
            j.append(&r).unwrap();
        }
        drop(j);
        let (_, back) = Journal::open(&path).unwrap();
        assert_eq!(back, sample());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains(r#""status":"continued""#),
            "{text}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut() {
        let path = temp("torn");
        let good: String = sample()[..2]
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        let torn = &serde_json::to_string(&sample()[2]).unwrap()[..20];
        std::fs::write(&path, format!("{good}{torn}")).unwrap();
        let (mut j, back) = Journal::open(&path).unwrap();
        assert_eq!(back, sample()[..2]);
        j.append(&sample()[2]).unwrap();
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().1, sample());
        // A complete last line without its newline is kept, and the newline restored.
        std::fs::write(&path, good.trim_end()).unwrap();
        let (mut j, back) = Journal::open(&path).unwrap();
        assert_eq!(back, sample()[..2]);
        j.append(&sample()[2]).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1, sample());
        // Garbage on a terminated last line (e.g. zero-filled after a crash) is dropped too.
        std::fs::write(&path, format!("{good}\0\0\0\n\n")).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1, sample()[..2]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_corrupt_middle_line_is_refused_with_its_number() {
        let path = temp("corrupt");
        let line = |r: &Record| serde_json::to_string(r).unwrap();
        let s = sample();
        std::fs::write(
            &path,
            format!("{}\n{{\"trial\": oops\n{}\n", line(&s[0]), line(&s[1])),
        )
        .unwrap();
        match Journal::open(&path) {
            Err(SweepError::Journal { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn replay_rebuilds_trial_state() {
        let records = vec![
            rec(0, 0, Some(1.0), Status::Continued),
            rec(0, 1, Some(0.4), Status::Completed),
            rec(1, 0, Some(2.0), Status::Stopped),
            rec(2, 0, Some(0.1), Status::Continued),
            rec(3, 0, None, Status::Failed),
            rec(4, 0, Some(0.9), Status::Continued),
            rec(4, 1, Some(0.8), Status::Continued),
            // Trial 4 rerun from scratch after an interruption.
            rec(4, 0, Some(0.7), Status::Continued),
            rec(4, 1, Some(0.6), Status::Completed),
        ];
        let h = replay(&records);
        assert_eq!(h.interrupted(), [2]);
        assert!(h.is_finished(0) && h.is_finished(1) && h.is_finished(3) && !h.is_finished(2));
        assert_eq!(h.records(4).len(), 2);
        assert_eq!(h.results_at(1), [(0, 1.0), (1, 2.0), (4, 0.7)]);
        assert_eq!(h.best().map(|r| r.trial), Some(0));
        let ranks: Vec<(i64, f64)> = h
            .tpe_history()
            .iter()
            .map(|(c, v)| (c["t"].as_i64().unwrap(), *v))
            .collect();
        assert_eq!(ranks, [(0, 0.0), (1, 2.0), (3, 3.0), (4, 1.0)]);
    }
}
