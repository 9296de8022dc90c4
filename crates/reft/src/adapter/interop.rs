//! Between pyreft save folders ([`super::pyreft`]) and native adapters.
//!
//! pyreft records neither positions nor the prompt template, so on import they are options
//! (default `l1`, the last prompt token, as pyreft's quickstart uses). Kinds without a pyreft
//! class (`red`, `steer`) cannot be exported.

use std::path::Path;

use candle_core::{DType, Device};

use super::config::{AdapterConfig, BaseModel, InterventionConfig, FORMAT_VERSION};
use super::pyreft::{read_pyreft, write_pyreft, PyreftIntervention};
use super::Adapter;
use crate::intervention::{Activation, Intervention, Kind};
use crate::model::Component;
use crate::{Error, Result};

impl Adapter {
    /// Imports a pyreft save folder; every intervention edits `positions` (SPEC §4 grammar).
    pub fn import_pyreft(
        dir: &Path,
        positions: &str,
        base: Option<&BaseModel>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        positions.parse::<crate::position::Positions>()?;
        let ivs = read_pyreft(dir)?;
        if ivs.is_empty() {
            return Err(Error::BadConfig {
                path: dir.to_path_buf(),
                msg: "the pyreft folder has no interventions".into(),
            });
        }
        let mut configs = Vec::with_capacity(ivs.len());
        let mut built = Vec::with_capacity(ivs.len());
        for iv in ivs {
            if let Some(b) = base {
                if iv.embed_dim != b.hidden_size || iv.layer >= b.num_layers {
                    return Err(Error::BadConfig {
                        path: dir.to_path_buf(),
                        msg: format!(
                            "intervention `{}` (hidden size {}, layer {}) does not fit this model (hidden size {}, {} layers)",
                            iv.key, iv.embed_dim, iv.layer, b.hidden_size, b.num_layers
                        ),
                    });
                }
            }
            let kind: Kind = iv.kind.parse()?;
            let component: Component = iv.component.parse()?;
            let config = InterventionConfig {
                kind,
                layer: iv.layer,
                component,
                rank: iv.rank,
                positions: positions.to_string(),
                part: None,
                act: Activation::Linear,
                dropout: 0.0,
                proj_bias: iv.params.contains_key("b2"),
            };
            let intervention =
                Intervention::from_tensors(config.shape(iv.embed_dim), &iv.params, dtype, device)
                    .map_err(|e| Error::BadConfig {
                    path: dir.to_path_buf(),
                    msg: format!("intervention `{}`: {e}", iv.key),
                })?;
            configs.push(config);
            built.push(intervention);
        }
        let config = AdapterConfig {
            format_version: FORMAT_VERSION,
            base_model: base.cloned(),
            interventions: configs,
            template: None,
            training: Some(serde_json::json!({ "imported_from": "pyreft", "source": dir })),
        };
        Ok(Adapter::new(config, built))
    }

    /// Writes this adapter as a pyreft 0.1.0 save folder.
    pub fn export_pyreft(&self, dir: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(self.interventions.len());
        let mut count: std::collections::HashMap<(usize, Component), usize> = Default::default();
        for (c, iv) in self.config.interventions.iter().zip(&self.interventions) {
            if matches!(c.kind, Kind::Red | Kind::Steer) {
                return Err(Error::InvalidArgument(format!(
                    "`{}` has no pyreft intervention class and cannot be exported",
                    c.kind.name()
                )));
            }
            if c.act != Activation::Linear {
                return Err(Error::InvalidArgument(format!(
                    "pyreft files cannot record the `{:?}` activation of the intervention at layer {}",
                    c.act, c.layer
                )));
            }
            let n = count.entry((c.layer, c.component)).or_insert(0);
            let key = format!(
                "layer_{}_comp_{}_unit_pos_nunit_1#{}",
                c.layer,
                c.component.name(),
                n
            );
            *n += 1;
            out.push(PyreftIntervention {
                key,
                layer: c.layer,
                component: c.component.name().to_string(),
                kind: c.kind.name().to_string(),
                rank: c.rank,
                embed_dim: iv.shape().dim,
                params: iv
                    .effective(true)?
                    .into_iter()
                    .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
                    .collect::<Result<_>>()?,
            });
        }
        write_pyreft(dir, &out)
    }
}
