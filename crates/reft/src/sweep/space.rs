//! The search space of a sweep, read from a small TOML file.
//!
//! ```toml
//! # fixed values for everything not searched
//! [fixed]
//! kind = "loreft"
//! batch_size = 8
//!
//! [search]
//! layers = ["mid", "every4", "all"]          # categorical: strings, ints, bools or floats
//! positions = { grid = "f{0..3}+l{1..3}" }     # pattern expanded into a categorical
//! tied = [true, false]
//! rank = { int = [4, 32], log = true }          # integer range, optionally log-scale
//! lr = { float = [1e-4, 3e-3], log = true }     # float range, optionally log-scale
//! epochs = { int = [2, 12] }
//! dropout = { float = [0.0, 0.1] }
//! ```
//!
//! * `[fixed]` holds scalars passed unchanged to every trial; `[search]` holds what varies.
//!   A key may not be in both, so a trial's config is unambiguous.
//! * A list is a categorical choice (no duplicates, at least one value).
//! * `{ int = [lo, hi] }` / `{ float = [lo, hi] }` are inclusive ranges with `lo < hi`;
//!   `log = true` samples on a log scale and needs `lo > 0`.
//! * `{ grid = "f{0..3}+l{1..3}" }` is the product of `+`-separated segments `<prefix>{a..b}`
//!   (inclusive). Each combination is written with its zero segments left out, so `f0+l2` is
//!   `l2`, `f2+l0` is `f2`, and the all-zero combination is skipped.
//!
//! Parameters are kept in key order (the TOML table is a `BTreeMap`), which makes grids and
//! samplers deterministic whatever order the file lists them in.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::{Result, SweepError};

/// Largest grid [`Space::grid`] will build, so a typo cannot exhaust memory.
pub const MAX_GRID: usize = 1_000_000;

/// One hyper-parameter value. Untagged in JSON so journals read naturally (`"lr": 0.001`);
/// floats are always written with a decimal point, which keeps `Int` and `Float` apart on
/// a round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A boolean switch such as `tied`.
    Bool(bool),
    /// An integer such as `rank` or `epochs`.
    Int(i64),
    /// A real number such as `lr`.
    Float(f64),
    /// A symbolic choice such as `layers = "mid"`.
    Str(String),
}

impl fmt::Display for Value {
    /// Writes the value as a command-line argument would take it; floats keep a decimal
    /// point so `3.0` and `3` stay distinguishable in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 => {
                write!(f, "{x:.1}")
            }
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

impl Value {
    /// The value as a real number, for samplers that treat ints and floats alike.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// The value as an integer, for consumers such as the epoch count.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn from_toml(what: &str, v: &toml::Value) -> Result<Value> {
        match v {
            toml::Value::Boolean(b) => Ok(Value::Bool(*b)),
            toml::Value::Integer(i) => Ok(Value::Int(*i)),
            toml::Value::Float(x) => Ok(Value::Float(*x)),
            toml::Value::String(s) => Ok(Value::Str(s.clone())),
            _ => Err(space_err(format!(
                "{what}: only strings, integers, floats and booleans are supported"
            ))),
        }
    }
}

/// How one searched parameter varies.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// Pick one of these values (also what a `grid` pattern expands into).
    Categorical(Vec<Value>),
    /// An integer in `lo..=hi`, sampled on a log scale when `log`.
    Int {
        /// Smallest value.
        lo: i64,
        /// Largest value.
        hi: i64,
        /// Sample `ln x` uniformly instead of `x` (for scale-like parameters).
        log: bool,
    },
    /// A real number in `[lo, hi]`, sampled on a log scale when `log`.
    Float {
        /// Smallest value.
        lo: f64,
        /// Largest value.
        hi: f64,
        /// Sample `ln x` uniformly instead of `x` (for learning rates).
        log: bool,
    },
}

impl Param {
    /// The bounds of the continuous "internal" axis samplers work on: `ln x` for log
    /// ranges, and for ints the range widened by half a step so rounding is fair to the ends.
    /// `None` for categoricals.
    pub fn internal_bounds(&self) -> Option<(f64, f64)> {
        match *self {
            Param::Categorical(_) => None,
            Param::Int { lo, hi, log } => {
                let (a, b) = (lo as f64 - 0.5, hi as f64 + 0.5);
                Some(if log { (a.ln(), b.ln()) } else { (a, b) })
            }
            Param::Float { lo, hi, log } => Some(if log { (lo.ln(), hi.ln()) } else { (lo, hi) }),
        }
    }

    /// A value's position on the internal axis, or `None` if it does not fit this parameter
    /// (so samplers can skip observations made under another space).
    pub fn to_internal(&self, v: &Value) -> Option<f64> {
        if !self.contains(v) {
            return None;
        }
        let x = v.as_f64()?;
        match self {
            Param::Int { log: true, .. } | Param::Float { log: true, .. } => Some(x.ln()),
            _ => Some(x),
        }
    }

    /// The value at internal position `u`: ints rounded and clamped, floats clamped.
    pub fn from_internal(&self, u: f64) -> Option<Value> {
        match *self {
            Param::Categorical(_) => None,
            Param::Int { lo, hi, log } => {
                let x = if log { u.exp() } else { u };
                Some(Value::Int((x.round() as i64).max(lo).min(hi)))
            }
            Param::Float { lo, hi, log } => {
                let x = if log { u.exp() } else { u };
                Some(Value::Float(x.max(lo).min(hi)))
            }
        }
    }

    /// A uniform draw (log-uniform for log ranges): what random search and TPE's
    /// start-up trials use. `None` only for an empty list, which parsing never produces.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<Value> {
        match self {
            Param::Categorical(values) => {
                values.get(rng.gen_range(0..values.len().max(1))).cloned()
            }
            _ => {
                let (a, b) = self.internal_bounds()?;
                let u = if a < b { rng.gen_range(a..b) } else { a };
                self.from_internal(u)
            }
        }
    }

    /// Whether `v` is a value this parameter can take.
    pub fn contains(&self, v: &Value) -> bool {
        match (self, v) {
            (Param::Categorical(values), _) => values.contains(v),
            (Param::Int { lo, hi, .. }, Value::Int(i)) => (lo..=hi).contains(&i),
            (Param::Float { lo, hi, .. }, Value::Float(_) | Value::Int(_)) => {
                v.as_f64().is_some_and(|x| (*lo..=*hi).contains(&x))
            }
            _ => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Param::Categorical(_) => "list",
            Param::Int { .. } => "int range",
            Param::Float { .. } => "float range",
        }
    }
}

/// One trial's full set of hyper-parameters: the fixed values merged with the searched ones.
pub type Config = BTreeMap<String, Value>;

/// A parsed, validated search space.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    /// Values every trial gets unchanged.
    pub fixed: BTreeMap<String, Value>,
    /// The searched parameters, in key order.
    pub params: Vec<(String, Param)>,
}

impl Space {
    /// Reads and validates a space file; every refusal names the offending key.
    pub fn from_toml_str(text: &str) -> Result<Space> {
        let root: toml::Table = text.parse().map_err(|e: toml::de::Error| space_err(e))?;
        if let Some(k) = root.keys().find(|k| *k != "fixed" && *k != "search") {
            return Err(space_err(format!(
                "unknown top-level key `{k}`; expected [fixed] and [search]"
            )));
        }
        let fixed = match root.get("fixed") {
            None => BTreeMap::new(),
            Some(toml::Value::Table(t)) => t
                .iter()
                .map(|(k, v)| Ok((k.clone(), Value::from_toml(&format!("fixed.{k}"), v)?)))
                .collect::<Result<_>>()?,
            Some(_) => return Err(space_err("`fixed` must be a table ([fixed])")),
        };
        let search = match root.get("search") {
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(space_err("`search` must be a table ([search])")),
            None => return Err(space_err("missing [search] table; nothing to sweep")),
        };
        let params = parse_params(&fixed, search)?;
        Ok(Space { fixed, params })
    }

    /// Reads a space file from disk (see [`Space::from_toml_str`]).
    pub fn from_toml_file(path: &Path) -> Result<Space> {
        Space::from_toml_str(&std::fs::read_to_string(path)?)
    }

    /// Every config of the Cartesian product, first parameter varying slowest. Refuses
    /// ranges, because a grid over a continuous range has no natural points.
    pub fn grid(&self) -> Result<Vec<Config>> {
        let mut out = vec![self.fixed.clone()];
        for (key, param) in &self.params {
            let Param::Categorical(values) = param else {
                return Err(space_err(format!(
                    "search.{key} is a {}; grid mode needs every searched parameter to be a \
                     list (e.g. {key} = [...]) or a grid pattern",
                    param.kind()
                )));
            };
            out = out
                .iter()
                .flat_map(|c| values.iter().map(move |v| with(c, key, v)))
                .collect();
            if out.len() > MAX_GRID {
                return Err(space_err(format!(
                    "the grid has more than {MAX_GRID} configs; use tpe or random search"
                )));
            }
        }
        Ok(out)
    }

    /// Number of grid configs, or `None` when a parameter is a range (no grid exists) or the
    /// count overflows; lets a caller size a sweep before building it.
    pub fn grid_size(&self) -> Option<usize> {
        self.params.iter().try_fold(1usize, |n, (_, p)| match p {
            Param::Categorical(v) => n.checked_mul(v.len()),
            _ => None,
        })
    }

    /// A uniform random config (fixed values included).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Config {
        let mut c = self.fixed.clone();
        for (key, param) in &self.params {
            if let Some(v) = param.sample(rng) {
                c.insert(key.clone(), v);
            }
        }
        c
    }

    /// Whether `config` assigns every searched key a value its parameter can take.
    pub fn contains(&self, config: &Config) -> bool {
        self.params
            .iter()
            .all(|(k, p)| config.get(k).is_some_and(|v| p.contains(v)))
    }

    /// A stable string for a config (its JSON, keys sorted), used to spot duplicates.
    pub fn key_for(config: &Config) -> String {
        serde_json::to_string(config).unwrap_or_else(|_| format!("{config:?}"))
    }
}

fn with(c: &Config, key: &str, v: &Value) -> Config {
    let mut c = c.clone();
    c.insert(key.to_string(), v.clone());
    c
}

fn space_err(msg: impl fmt::Display) -> SweepError {
    SweepError::Space(msg.to_string())
}

fn parse_params(fixed: &Config, search: &toml::Table) -> Result<Vec<(String, Param)>> {
    let mut params = Vec::new();
    for (key, v) in search {
        if fixed.contains_key(key) {
            return Err(space_err(format!(
                "`{key}` is both fixed and searched; keep it in one table"
            )));
        }
        params.push((key.clone(), parse_param(key, v)?));
    }
    if params.is_empty() {
        return Err(space_err("[search] is empty; nothing to sweep"));
    }
    Ok(params)
}

fn parse_param(key: &str, v: &toml::Value) -> Result<Param> {
    match v {
        toml::Value::Array(items) => parse_list(key, items),
        toml::Value::Table(t) => parse_shape(key, t),
        other => Err(space_err(format!(
            "search.{key}: a single value is not a search; put it under [fixed] or write a \
             list, e.g. {key} = [{other}]"
        ))),
    }
}

fn parse_list(key: &str, items: &[toml::Value]) -> Result<Param> {
    if items.is_empty() {
        return Err(space_err(format!(
            "search.{key}: empty list; give at least one value"
        )));
    }
    let mut values: Vec<Value> = Vec::with_capacity(items.len());
    for item in items {
        let v = Value::from_toml(&format!("search.{key} (list item)"), item)?;
        if values.contains(&v) {
            return Err(space_err(format!("search.{key}: `{v}` is listed twice")));
        }
        values.push(v);
    }
    Ok(Param::Categorical(values))
}

fn parse_shape(key: &str, t: &toml::Table) -> Result<Param> {
    const SHAPES: [&str; 3] = ["grid", "int", "float"];
    if let Some(k) = t
        .keys()
        .find(|k| !SHAPES.contains(&k.as_str()) && *k != "log")
    {
        return Err(space_err(format!(
            "search.{key}: unknown key `{k}`; expected one of grid, int, float (with optional log)"
        )));
    }
    let shapes: Vec<&str> = SHAPES.into_iter().filter(|s| t.contains_key(*s)).collect();
    let log = match t.get("log") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            return Err(space_err(format!(
                "search.{key}: `log` must be true or false"
            )))
        }
    };
    match shapes.as_slice() {
        ["grid"] if t.contains_key("log") => Err(space_err(format!(
            "search.{key}: `log` does not apply to a grid pattern"
        ))),
        ["grid"] => match &t["grid"] {
            toml::Value::String(p) => Ok(Param::Categorical(expand_grid(key, p)?)),
            _ => Err(space_err(format!(
                "search.{key}: `grid` must be a pattern string"
            ))),
        },
        ["int"] => parse_int(key, &t["int"], log),
        ["float"] => parse_float(key, &t["float"], log),
        [] => Err(space_err(format!(
            "search.{key}: a table needs one of grid, int or float"
        ))),
        _ => Err(space_err(format!(
            "search.{key}: give only one of grid, int or float"
        ))),
    }
}

fn pair(key: &str, shape: &str, v: &toml::Value) -> Result<(toml::Value, toml::Value)> {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => Ok((a.clone(), b.clone())),
        _ => Err(space_err(format!(
            "search.{key}: `{shape}` must be a pair [lo, hi]"
        ))),
    }
}

fn parse_int(key: &str, v: &toml::Value, log: bool) -> Result<Param> {
    let (lo, hi) = match pair(key, "int", v)? {
        (toml::Value::Integer(a), toml::Value::Integer(b)) => (a, b),
        _ => {
            return Err(space_err(format!(
                "search.{key}: `int` bounds must be integers"
            )))
        }
    };
    check_range(key, lo as f64, hi as f64, log)?;
    Ok(Param::Int { lo, hi, log })
}

fn parse_float(key: &str, v: &toml::Value, log: bool) -> Result<Param> {
    let (a, b) = pair(key, "float", v)?;
    let num = |x: &toml::Value| match x {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    };
    let (Some(lo), Some(hi)) = (num(&a), num(&b)) else {
        return Err(space_err(format!(
            "search.{key}: `float` bounds must be finite numbers"
        )));
    };
    check_range(key, lo, hi, log)?;
    Ok(Param::Float { lo, hi, log })
}

fn check_range(key: &str, lo: f64, hi: f64, log: bool) -> Result<()> {
    if lo >= hi {
        return Err(space_err(format!(
            "search.{key}: range [{lo}, {hi}] needs lo < hi"
        )));
    }
    if log && lo <= 0.0 {
        return Err(space_err(format!(
            "search.{key}: a log range needs lo > 0 (got {lo})"
        )));
    }
    Ok(())
}

/// Expands `f{0..3}+l{1..3}` into `["l1", .., "f3+l3"]` (first segment varying slowest).
fn expand_grid(key: &str, pattern: &str) -> Result<Vec<Value>> {
    let segments = pattern
        .split('+')
        .map(|s| parse_segment(key, s.trim()))
        .collect::<Result<Vec<_>>>()?;
    let mut names = vec![Vec::<String>::new()];
    for (prefix, lo, hi) in &segments {
        names = names
            .iter()
            .flat_map(|parts| (*lo..=*hi).map(move |n| extend(parts, prefix, n)))
            .collect();
        if names.len() > MAX_GRID {
            return Err(space_err(format!(
                "search.{key}: grid pattern is too large"
            )));
        }
    }
    let values: Vec<Value> = names
        .into_iter()
        .filter(|parts| !parts.is_empty())
        .map(|parts| Value::Str(parts.join("+")))
        .collect();
    if values.is_empty() {
        return Err(space_err(format!(
            "search.{key}: grid `{pattern}` yields no values"
        )));
    }
    Ok(values)
}

fn extend(parts: &[String], prefix: &str, n: u64) -> Vec<String> {
    let mut parts = parts.to_vec();
    if n != 0 {
        parts.push(format!("{prefix}{n}"));
    }
    parts
}

fn parse_segment(key: &str, seg: &str) -> Result<(String, u64, u64)> {
    let bad = || {
        space_err(format!(
            "search.{key}: grid segment `{seg}` must look like f{{0..3}} (a prefix and an \
             inclusive range a..b with a <= b)"
        ))
    };
    let (prefix, rest) = seg.split_once('{').ok_or_else(bad)?;
    let inner = rest.strip_suffix('}').ok_or_else(bad)?;
    let (a, b) = inner.split_once("..").ok_or_else(bad)?;
    let lo: u64 = a.trim().parse().map_err(|_| bad())?;
    let hi: u64 = b.trim().parse().map_err(|_| bad())?;
    let prefix_ok = !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_alphabetic());
    if !prefix_ok || lo > hi {
        return Err(bad());
    }
    Ok((prefix.to_string(), lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const EXAMPLE: &str = r#"
[fixed]
kind = "loreft"
batch_size = 8

[search]
layers = ["mid", "every4", "all"]
positions = { grid = "f{0..3}+l{1..3}" }
tied = [true, false]
rank = { int = [4, 32], log = true }
lr = { float = [1e-4, 3e-3], log = true }
epochs = { int = [2, 12] }
dropout = { float = [0.0, 0.1] }
"#;

    fn err_of(text: &str) -> String {
        match Space::from_toml_str(text) {
            Err(SweepError::Space(m)) => m,
            other => panic!("expected a space error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let s = Space::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(s.fixed["kind"], Value::Str("loreft".into()));
        assert_eq!(s.params.len(), 7);
        let (_, pos) = s.params.iter().find(|(k, _)| k == "positions").unwrap();
        let Param::Categorical(v) = pos else {
            panic!("positions is a grid")
        };
        let names: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert_eq!(names.len(), 12);
        assert_eq!(&names[..4], ["l1", "l2", "l3", "f1+l1"]);
        assert_eq!(names[11], "f3+l3");
        let (_, rank) = s.params.iter().find(|(k, _)| k == "rank").unwrap();
        assert_eq!(
            *rank,
            Param::Int {
                lo: 4,
                hi: 32,
                log: true
            }
        );
    }

    #[test]
    fn grid_pattern_drops_zero_segments() {
        let s = Space::from_toml_str("[search]\np = { grid = \"f{0..2}+l{0..1}\" }").unwrap();
        let Param::Categorical(v) = &s.params[0].1 else {
            panic!()
        };
        let names: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert_eq!(names, ["l1", "f1", "f1+l1", "f2", "f2+l1"]);
    }

    #[test]
    fn grid_is_the_full_product_and_refuses_ranges() {
        let s = Space::from_toml_str(EXAMPLE).unwrap();
        let m = match s.grid() {
            Err(SweepError::Space(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("search.dropout") && m.contains("list"), "{m}");
        assert_eq!(s.grid_size(), None);
        let text = "[fixed]\nk = 1\n[search]\na = [1, 2, 3]\nb = [true, false]\n";
        let s = Space::from_toml_str(text).unwrap();
        let g = s.grid().unwrap();
        assert_eq!(s.grid_size(), Some(6));
        assert_eq!(g.len(), 6);
        let keys: std::collections::BTreeSet<String> = g.iter().map(Space::key_for).collect();
        assert_eq!(keys.len(), 6);
        assert!(g.iter().all(|c| c["k"] == Value::Int(1) && s.contains(c)));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            ("[search]\nlr = { float = [1e-2, 1e-3] }", "search.lr"),
            (
                "[search]\nlr = { float = [0.0, 1.0], log = true }",
                "lo > 0",
            ),
            ("[search]\nr = { int = [4, 4] }", "search.r"),
            ("[search]\nlayers = []", "search.layers: empty"),
            (
                "[fixed]\nrank = 4\n[search]\nrank = [1, 2]",
                "`rank` is both",
            ),
            ("[search]\nlr = { range = [1, 2] }", "unknown key `range`"),
            ("[search]\nlr = { }", "search.lr"),
            ("[search]\nlr = 0.1", "search.lr: a single value"),
            ("[search]\nx = [1, 1]", "listed twice"),
            (
                "[search]\np = { grid = \"{0..3}\" }",
                "search.p: grid segment",
            ),
            ("[serch]\nx = [1]", "unknown top-level key `serch`"),
            ("[fixed]\nx = [1]\n[search]\ny = [1]", "fixed.x"),
            ("[fixed]\nx = 1", "missing [search]"),
        ];
        for (text, want) in cases {
            let m = err_of(text);
            assert!(m.contains(want), "{text:?}: {m}");
        }
    }

    #[test]
    fn samples_stay_in_range() {
        let s = Space::from_toml_str(EXAMPLE).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let c = s.sample(&mut rng);
            assert!(s.contains(&c), "{c:?}");
            assert_eq!(c["batch_size"], Value::Int(8));
        }
    }

    #[test]
    fn values_round_trip_through_json() {
        let mut c = Config::new();
        c.insert("a".into(), Value::Int(3));
        c.insert("b".into(), Value::Float(3.0));
        c.insert("c".into(), Value::Bool(true));
        c.insert("d".into(), Value::Str("mid".into()));
        let json = Space::key_for(&c);
        assert_eq!(json, r#"{"a":3,"b":3.0,"c":true,"d":"mid"}"#);
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert_eq!(Value::Float(3.0).to_string(), "3.0");
    }
}
