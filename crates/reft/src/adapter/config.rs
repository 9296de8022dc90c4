//! Adapter configuration: the typed form of `reft_config.json`, and the user-facing spec with
//! its shorthand (one intervention repeated over a list of layers; untied `fN+lN` pairs).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::intervention::{Activation, InterventionShape, Kind, KindOptions};
use crate::model::Component;
use crate::position::{Part, Positions};
use crate::{Error, Result};

/// Version of the native adapter format written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// What an adapter was made for; checked on load so that an adapter for another model fails
/// with a message instead of producing garbage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    /// Architecture family (`llama`, `qwen2`, …).
    pub architecture: String,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hash of the tokenizer vocabulary (same for a model's GGUF and HF forms).
    pub tokenizer_fingerprint: String,
}

/// One intervention in a saved adapter: fully resolved (one layer, one position set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterventionConfig {
    /// Kind.
    pub kind: Kind,
    /// 0-based layer.
    pub layer: usize,
    /// Component of the layer.
    #[serde(default = "default_component")]
    pub component: Component,
    /// Rank (ignored by `red`/`steer`).
    #[serde(default)]
    pub rank: usize,
    /// Prompt positions (SPEC §4 grammar).
    pub positions: String,
    /// For an untied `fN+lN` pair: which set this one edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// Activation.
    #[serde(default)]
    pub act: Activation,
    /// Dropout on the edit during training.
    #[serde(default)]
    pub dropout: f64,
    /// NoReFT: bias on the projection.
    #[serde(default = "yes")]
    pub proj_bias: bool,
}

fn default_component() -> Component {
    Component::BlockOutput
}
fn yes() -> bool {
    true
}

impl InterventionConfig {
    /// Parsed positions.
    pub fn positions(&self) -> Result<Positions> {
        self.positions.parse()
    }

    /// The intervention's shape for hidden size `dim`.
    pub fn shape(&self, dim: usize) -> InterventionShape {
        InterventionShape {
            kind: self.kind,
            dim,
            rank: self.rank,
            act: self.act,
            dropout: self.dropout,
            options: KindOptions {
                proj_bias: self.proj_bias,
            },
        }
    }
}

/// The contents of `reft_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Format version.
    pub format_version: u32,
    /// The base model it was made for (absent for adapters built in code without a model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModel>,
    /// Every intervention, in application order.
    pub interventions: Vec<InterventionConfig>,
    /// Prompt template used in training (`raw`, `chat`, `alpaca`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Free-form training summary (data, steps, final loss, seed, tool version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}

/// User-facing description of one intervention, possibly over several layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// Kind.
    pub kind: Kind,
    /// Layers: a number, a list, `"3;9;18"`, `"0..8"` (end exclusive), or `"all"`; negatives
    /// count from the end.
    pub layers: LayerSpec,
    /// Component (default `block_output`).
    #[serde(default = "default_component")]
    pub component: Component,
    /// Rank (default 4).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Positions (default `l1`).
    #[serde(default = "default_positions")]
    pub positions: String,
    /// For `fN+lN`: one intervention edits both sets (tied, default) or one per set (untied).
    #[serde(default = "yes")]
    pub tied: bool,
    /// Activation.
    #[serde(default)]
    pub act: Activation,
    /// Dropout on the edit during training.
    #[serde(default)]
    pub dropout: f64,
    /// NoReFT: bias on the projection.
    #[serde(default = "yes")]
    pub proj_bias: bool,
}

fn default_rank() -> usize {
    4
}
fn default_positions() -> String {
    "l1".into()
}

/// Layers as a number, a list, or a string (`"3;9;18"`, `"0..8"`, `"all"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSpec {
    /// One layer.
    One(i64),
    /// A list.
    List(Vec<i64>),
    /// A string form.
    Text(String),
}

impl LayerSpec {
    /// The 0-based layers for a model with `n` layers.
    pub fn resolve(&self, n: usize) -> Result<Vec<usize>> {
        let bad =
            |s: String| Error::InvalidArgument(format!("bad layers `{s}` for a {n}-layer model"));
        let fix = |l: i64| -> Result<usize> {
            let j = if l < 0 { n as i64 + l } else { l };
            if (0..n as i64).contains(&j) {
                Ok(j as usize)
            } else {
                Err(bad(l.to_string()))
            }
        };
        match self {
            LayerSpec::One(l) => Ok(vec![fix(*l)?]),
            LayerSpec::List(v) => v.iter().map(|&l| fix(l)).collect(),
            LayerSpec::Text(s) => {
                let s = s.trim();
                if s == "all" {
                    return Ok((0..n).collect());
                }
                if let Some((a, b)) = s.split_once("..") {
                    let a: i64 = a.trim().parse().map_err(|_| bad(s.into()))?;
                    let b: i64 = b.trim().parse().map_err(|_| bad(s.into()))?;
                    let (a, b) = (fix(a)?, if b < 0 { n as i64 + b } else { b });
                    if b as usize > n || (b as usize) < a {
                        return Err(bad(s.into()));
                    }
                    return Ok((a..b as usize).collect());
                }
                s.split([';', ','])
                    .map(|x| {
                        x.trim()
                            .parse::<i64>()
                            .map_err(|_| bad(s.into()))
                            .and_then(fix)
                    })
                    .collect()
            }
        }
    }
}

/// A user-written adapter description (`--config` files, the library API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The interventions.
    pub interventions: Vec<InterventionSpec>,
}

impl AdapterSpec {
    /// Reads a JSON or TOML file (by extension).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::BadConfig {
            path: path.to_path_buf(),
            msg,
        };
        if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| bad(e.to_string()))
        } else {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
        }
    }

    /// One resolved intervention per layer (and per set, when untied) for an `n`-layer model.
    pub fn expand(&self, n: usize) -> Result<Vec<InterventionConfig>> {
        let mut out = Vec::new();
        for s in &self.interventions {
            let positions: Positions = s.positions.parse()?;
            let parts: Vec<Option<Part>> = if !s.tied && positions.has_two_sets() {
                vec![Some(Part::First), Some(Part::Last)]
            } else {
                vec![None]
            };
            if !matches!(s.kind, Kind::Red | Kind::Steer) && s.rank == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{} needs a rank ≥ 1",
                    s.kind.name()
                )));
            }
            for layer in s.layers.resolve(n)? {
                for &part in &parts {
                    out.push(InterventionConfig {
                        kind: s.kind,
                        layer,
                        component: s.component,
                        rank: s.rank,
                        positions: positions.to_string(),
                        part,
                        act: s.act,
                        dropout: s.dropout,
                        proj_bias: s.proj_bias,
                    });
                }
            }
        }
        if out.is_empty() {
            return Err(Error::InvalidArgument(
                "the adapter has no interventions".into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_shorthand() -> Result<()> {
        let n = 30;
        assert_eq!(LayerSpec::Text("3;9;18".into()).resolve(n)?, vec![3, 9, 18]);
        assert_eq!(LayerSpec::Text("0..4".into()).resolve(n)?, vec![0, 1, 2, 3]);
        assert_eq!(LayerSpec::Text("all".into()).resolve(n)?.len(), 30);
        assert_eq!(LayerSpec::One(-1).resolve(n)?, vec![29]);
        assert!(LayerSpec::One(30).resolve(n).is_err());
        Ok(())
    }

    #[test]
    fn untied_pairs_expand_per_layer() -> Result<()> {
        let spec: AdapterSpec = toml::from_str(
            "[[interventions]]\nkind = \"loreft\"\nlayers = \"2;5\"\npositions = \"f1+l1\"\ntied = false\nrank = 2\n",
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let ivs = spec.expand(8)?;
        assert_eq!(ivs.len(), 4);
        assert_eq!((ivs[0].layer, ivs[0].part), (2, Some(Part::First)));
        assert_eq!((ivs[3].layer, ivs[3].part), (5, Some(Part::Last)));
        Ok(())
    }
}
