//! Which prompt positions an intervention edits (SPEC §4).
//!
//! Grammar: `fN` (first N), `lN` (last N), `fN+lN` (both), `all`, or an explicit comma list of
//! indices where negatives count from the end (`0,-1`). Short prompts: `fN`/`lN` alone take
//! `min(N, P)`; `fN+lN` follows the paper, `f ← min(f, ⌊P/2⌋)`, `l ← min(l, ⌈P/2⌉)`, so the two
//! sets never overlap. A slot that does not exist is simply absent — no padding slot that points
//! at a real token (pyreft's bug).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A parsed position specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// First `f` and last `l` positions (`fN`, `lN`, `fN+lN`).
    FirstLast {
        /// How many first positions.
        first: usize,
        /// How many last positions.
        last: usize,
    },
    /// Every prompt position.
    All,
    /// Explicit indices; negative ones count from the end.
    List(Vec<i64>),
}

/// For untied `fN+lN`: which of the two sets one intervention edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The first-N set.
    First,
    /// The last-N set.
    Last,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "bad positions `{s}`: use fN, lN, fN+lN, all, or a list like 0,-1"
            ))
        };
        let s = s.trim();
        if s == "all" {
            return Ok(Positions::All);
        }
        let (mut first, mut last, mut any) = (0, 0, false);
        if s.starts_with(['f', 'l']) {
            for part in s.split('+') {
                let n: usize = part.get(1..).and_then(|x| x.parse().ok()).ok_or_else(bad)?;
                match part.as_bytes()[0] {
                    b'f' if first == 0 => first = n,
                    b'l' if last == 0 => last = n,
                    _ => return Err(bad()),
                }
                any = true;
            }
            if !any || (first == 0 && last == 0) {
                return Err(bad());
            }
            return Ok(Positions::FirstLast { first, last });
        }
        let list: Vec<i64> = s
            .split(',')
            .map(|x| x.trim().parse::<i64>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        if list.is_empty() {
            return Err(bad());
        }
        Ok(Positions::List(list))
    }
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Positions::All => write!(f, "all"),
            Positions::FirstLast { first, last } => match (first, last) {
                (0, l) => write!(f, "l{l}"),
                (fi, 0) => write!(f, "f{fi}"),
                (fi, l) => write!(f, "f{fi}+l{l}"),
            },
            Positions::List(v) => {
                let s: Vec<String> = v.iter().map(i64::to_string).collect();
                write!(f, "{}", s.join(","))
            }
        }
    }
}

impl Positions {
    /// Whether this is an `fN+lN` spec with both sets (the only one that can be untied).
    pub fn has_two_sets(&self) -> bool {
        matches!(self, Positions::FirstLast { first, last } if *first > 0 && *last > 0)
    }

    /// The positions (ascending, distinct) in a prompt of `len` tokens; `part` selects one set of
    /// an untied `fN+lN`.
    pub fn resolve(&self, len: usize, part: Option<Part>) -> Vec<usize> {
        match self {
            Positions::All => (0..len).collect(),
            Positions::List(v) => {
                let mut out: Vec<usize> = v
                    .iter()
                    .filter_map(|&i| {
                        let j = if i < 0 { len as i64 + i } else { i };
                        (0..len as i64).contains(&j).then_some(j as usize)
                    })
                    .collect();
                out.sort_unstable();
                out.dedup();
                out
            }
            Positions::FirstLast { first, last } => {
                let (f, l) = if *first > 0 && *last > 0 {
                    ((*first).min(len / 2), (*last).min(len.div_ceil(2)))
                } else {
                    ((*first).min(len), (*last).min(len))
                };
                let firsts = 0..f;
                let lasts = len - l..len;
                match part {
                    Some(Part::First) => firsts.collect(),
                    Some(Part::Last) => lasts.collect(),
                    None => firsts.chain(lasts).collect(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Positions {
        s.parse().unwrap()
    }

    #[test]
    fn grammar_round_trips() {
        for s in ["f3", "l1", "f2+l2", "all", "0,-1,4"] {
            assert_eq!(p(s).to_string(), s);
        }
        for bad in ["", "x3", "f", "f1+f2", "1,,2", "f0"] {
            assert!(bad.parse::<Positions>().is_err(), "{bad}");
        }
    }

    #[test]
    fn truncation_rules() {
        assert_eq!(p("f3").resolve(2, None), vec![0, 1]);
        assert_eq!(p("l3").resolve(2, None), vec![0, 1]);
        assert_eq!(p("l1").resolve(5, None), vec![4]);
        // fN+lN: f ← min(f, ⌊P/2⌋), l ← min(l, ⌈P/2⌉): never overlapping.
        assert_eq!(p("f3+l3").resolve(5, None), vec![0, 1, 2, 3, 4]);
        assert_eq!(p("f3+l3").resolve(3, None), vec![0, 1, 2]);
        assert_eq!(p("f2+l2").resolve(1, None), vec![0]);
        assert_eq!(
            p("f2+l2").resolve(1, Some(Part::First)),
            Vec::<usize>::new()
        );
        assert_eq!(p("f2+l2").resolve(8, Some(Part::First)), vec![0, 1]);
        assert_eq!(p("f2+l2").resolve(8, Some(Part::Last)), vec![6, 7]);
        assert_eq!(p("0,-1,-1,9").resolve(4, None), vec![0, 3]);
        assert_eq!(p("all").resolve(3, None), vec![0, 1, 2]);
    }
}
