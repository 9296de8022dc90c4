//! Adapters: interventions placed at sites and prompt positions (SPEC §1, §3, §4), applied to a
//! model through its hook points, and their files.
//!
//! An [`Adapter`] is a configuration plus one [`Intervention`] per entry. As [`Hooks`], before
//! each batch it resolves every intervention's positions for each example (per-example lists of
//! any length: padding is never pointed at), then at each site gathers those rows, applies Φ and
//! adds the edit back with `index_add` (whose gradient is right, unlike `scatter`'s).

pub mod config;
pub mod interop;
pub mod native;
pub mod pickle;
pub mod pyreft;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::intervention::{Effective, Intervention, OrthoLink};
use crate::model::{Hooks, PromptLayout, Site, SiteContext};
use crate::{Error, Result};

pub use config::{AdapterConfig, AdapterSpec, BaseModel, InterventionConfig, InterventionSpec};

/// A set of interventions with their configuration.
pub struct Adapter {
    config: AdapterConfig,
    interventions: Vec<Intervention>,
    training: bool,
    every_token: bool,
    /// Per intervention, the rows `b·T + left_pad + p` it edits in the current batch, per example.
    rows: Vec<Vec<Vec<usize>>>,
    /// Per intervention, parameters for the current batch (`R` computed once per batch).
    effective: Vec<Option<Effective>>,
    /// Per intervention, the links from effective `R` leaves to raw matrices (training only).
    links: Vec<Vec<OrthoLink>>,
    /// Per example, the sequence position just past its prompt (left padding included).
    prompt_end: Vec<usize>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("config", &self.config)
            .finish()
    }
}

impl Adapter {
    /// Fresh interventions for `config` (SPEC §2 initialisation; intervention `i` is seeded
    /// with `seed + i`).
    pub fn init(
        config: AdapterConfig,
        hidden_size: usize,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let interventions = config
            .interventions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.positions()?;
                Intervention::init(
                    c.shape(hidden_size),
                    seed.wrapping_add(i as u64),
                    dtype,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(config, interventions))
    }

    /// Wraps ready interventions (one per config entry).
    pub fn new(config: AdapterConfig, interventions: Vec<Intervention>) -> Self {
        let n = interventions.len();
        Self {
            config,
            interventions,
            training: false,
            every_token: false,
            rows: vec![Vec::new(); n],
            effective: vec![None; n],
            links: vec![Vec::new(); n],
            prompt_end: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Mutable configuration (training summary, template).
    pub fn config_mut(&mut self) -> &mut AdapterConfig {
        &mut self.config
    }

    /// The interventions, in configuration order.
    pub fn interventions(&self) -> &[Intervention] {
        &self.interventions
    }

    /// Training mode: parameters carry gradients and dropout is on. Off by default (inference:
    /// no graph, so the frozen model above keeps its fast paths).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Also edit every generated token (each decoding step's new row), not only the prompt.
    pub fn set_every_token(&mut self, on: bool) {
        self.every_token = on;
    }

    /// Whether generated tokens are edited too.
    pub fn every_token(&self) -> bool {
        self.every_token
    }

    /// Trainable variables as `interventions.<i>.<name>`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.interventions
            .iter()
            .enumerate()
            .flat_map(|(i, iv)| {
                iv.vars()
                    .into_iter()
                    .map(move |(n, v)| (format!("interventions.{i}.{n}"), v))
            })
            .collect()
    }

    /// Recomputes the effective parameters (once per optimiser step: `R` from its raw matrix).
    pub fn refresh_params(&mut self) -> Result<()> {
        for i in 0..self.interventions.len() {
            self.refresh_effective(i)?;
        }
        Ok(())
    }

    /// Resolves every intervention's positions for the prompts of the next pass, keeping the
    /// current effective parameters (so one step's examples share one graph of `R`).
    pub fn set_layout(&mut self, layout: &PromptLayout) -> Result<()> {
        for i in 0..self.interventions.len() {
            let mut per_example = Vec::with_capacity(layout.prompt_lens.len());
            for (&len, &pad) in layout.prompt_lens.iter().zip(&layout.left_pad) {
                per_example.push(
                    self.positions_of(i, len)?
                        .into_iter()
                        .map(|p| pad + p)
                        .collect(),
                );
            }
            self.rows[i] = per_example;
        }
        self.prompt_end = layout
            .prompt_lens
            .iter()
            .zip(&layout.left_pad)
            .map(|(l, p)| l + p)
            .collect();
        Ok(())
    }

    fn refresh_effective(&mut self, i: usize) -> Result<()> {
        let (eff, links) = self.interventions[i].effective_linked(!self.training)?;
        self.effective[i] = Some(eff);
        self.links[i] = links;
        Ok(())
    }

    /// Backpropagates `loss` to every trainable variable, including the raw matrices behind
    /// orthogonal `R`s (a second, tiny backward through the Householder products). The store
    /// also holds `dL/dR` for each effective `R` of [`effective`](Self::effective).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let mut surrogate: Option<Tensor> = None;
        for link in self.links.iter().flatten() {
            if let Some(term) = link.backward_term(&grads)? {
                surrogate = Some(match surrogate {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        if let Some(s) = surrogate {
            let raw_grads = s.backward()?;
            for (_, var) in self.vars() {
                if let Some(g) = raw_grads.get(var.as_tensor()) {
                    let total = match grads.get(var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(var.as_tensor(), total);
                }
            }
        }
        Ok(grads)
    }

    /// Fixed bases of orthogonal parameters as `interventions.<i>.<name>.base`.
    pub fn bases(&self) -> Vec<(String, Tensor)> {
        self.interventions
            .iter()
            .enumerate()
            .flat_map(|(i, iv)| {
                iv.params()
                    .bases()
                    .into_iter()
                    .map(move |(n, t)| (format!("interventions.{i}.{n}.base"), t))
            })
            .collect()
    }

    /// Restores a base written by [`bases`](Self::bases).
    pub fn set_base(&mut self, key: &str, t: &Tensor) -> Result<()> {
        let bad = || Error::InvalidArgument(format!("`{key}` is not an intervention base"));
        let rest = key.strip_prefix("interventions.").ok_or_else(bad)?;
        let (i, name) = rest.split_once('.').ok_or_else(bad)?;
        let name = name.strip_suffix(".base").ok_or_else(bad)?;
        let i: usize = i.parse().map_err(|_| bad())?;
        self.interventions
            .get_mut(i)
            .ok_or_else(bad)?
            .params_mut()
            .set_base(name, t)
    }

    /// Trainable scalars in all interventions.
    pub fn num_parameters(&self) -> usize {
        self.interventions
            .iter()
            .map(Intervention::num_parameters)
            .sum()
    }

    /// The parameters used by the current batch (after [`Hooks::prepare`]); in training mode
    /// these are the graph nodes whose gradients are "the gradient w.r.t. the effective R".
    pub fn effective(&self, i: usize) -> Option<&Effective> {
        self.effective.get(i).and_then(Option::as_ref)
    }

    /// Materialised parameters `interventions.<i>.<param>` (`R` with orthonormal rows).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, iv) in self.interventions.iter().enumerate() {
            for (n, t) in iv.effective(true)? {
                out.push((format!("interventions.{i}.{n}"), t));
            }
        }
        Ok(out)
    }

    /// The prompt positions intervention `i` edits in a prompt of `len` tokens.
    pub fn positions_of(&self, i: usize, len: usize) -> Result<Vec<usize>> {
        let c = &self.config.interventions[i];
        Ok(c.positions()?.resolve(len, c.part))
    }

    /// The first prompt position any intervention edits in a prompt of `len` tokens (`None`
    /// when none does): the keys and values before it are the base model's own, so a cached
    /// prefix up to there can be reused.
    pub fn first_edited(&self, len: usize) -> Result<Option<usize>> {
        let mut first: Option<usize> = None;
        for i in 0..self.interventions.len() {
            if let Some(&p) = self.positions_of(i, len)?.iter().min() {
                first = Some(first.map_or(p, |f| f.min(p)));
            }
        }
        Ok(first)
    }

    /// pyreft-style parameter summary.
    pub fn parameter_summary(&self, model_params: usize) -> String {
        let n = self.num_parameters();
        format!(
            "trainable intervention params: {} || trainable model params: 0\nmodel params: {} || trainable%: {}",
            group_digits(n),
            group_digits(model_params),
            percent(100.0 * n as f64 / model_params.max(1) as f64)
        )
    }
}

/// A percentage with three significant digits (`0.0205`, `1.23`, `45.6`), never in exponent form.
fn percent(p: f64) -> String {
    if p == 0.0 || !p.is_finite() {
        return format!("{p}");
    }
    let decimals = (2 - p.abs().log10().floor() as i32).clamp(0, 12) as usize;
    format!("{p:.decimals$}")
}

impl Adapter {
    /// Opens an adapter folder of either format: native (`reft_config.json`) or a pyreft save
    /// (`config.json` + `intkey_*.bin`, imported with `pyreft_positions`).
    pub fn open(
        dir: &std::path::Path,
        base: Option<&BaseModel>,
        pyreft_positions: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !dir.exists() {
            Err(Error::BadConfig {
                path: dir.to_path_buf(),
                msg: "does not exist".into(),
            })
        } else if dir.join(native::CONFIG_FILE).exists() {
            Self::load(dir, base, dtype, device)
        } else if dir.join("config.json").exists() {
            Self::import_pyreft(dir, pyreft_positions, base, dtype, device)
        } else {
            Err(Error::BadConfig {
                path: dir.to_path_buf(),
                msg: format!(
                    "not an adapter folder: neither {} (reft) nor config.json (pyreft)",
                    native::CONFIG_FILE
                ),
            })
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl Adapter {
    /// Drops this batch's edits of the examples `keep` does not mark (call after `prepare`).
    pub fn keep_examples(&mut self, keep: &[bool]) {
        let kept = |bi: usize| keep.get(bi).copied().unwrap_or(false);
        for per_example in &mut self.rows {
            for (bi, rows) in per_example.iter_mut().enumerate() {
                if !kept(bi) {
                    rows.clear();
                }
            }
        }
        for (bi, end) in self.prompt_end.iter_mut().enumerate() {
            if !kept(bi) {
                *end = usize::MAX;
            }
        }
    }

    /// Like [`Hooks::prepare`], with explicit prompt positions instead of the configured specs:
    /// `positions[i][b]` lists what intervention `i` edits in example `b` (pyreft's
    /// `unit_locations`, ragged and unpadded).
    pub fn prepare_with_positions(
        &mut self,
        positions: &[Vec<Vec<usize>>],
        left_pad: &[usize],
    ) -> Result<()> {
        if positions.len() != self.interventions.len() {
            return Err(Error::InvalidArgument(format!(
                "{} position lists for {} interventions",
                positions.len(),
                self.interventions.len()
            )));
        }
        for (i, per_example) in positions.iter().enumerate() {
            self.rows[i] = per_example
                .iter()
                .zip(left_pad)
                .map(|(ps, &pad)| ps.iter().map(|&p| pad + p).collect())
                .collect();
            self.refresh_effective(i)?;
        }
        self.prompt_end = vec![usize::MAX; left_pad.len()];
        Ok(())
    }
}

impl Hooks for Adapter {
    fn sites(&self) -> Vec<Site> {
        let mut s: Vec<Site> = self
            .config
            .interventions
            .iter()
            .map(|c| Site::new(c.layer, c.component))
            .collect();
        s.sort();
        s.dedup();
        s
    }

    fn prepare(&mut self, layout: &PromptLayout) -> Result<()> {
        self.refresh_params()?;
        self.set_layout(layout)
    }

    fn on_site(
        &mut self,
        site: Site,
        hidden: &Tensor,
        ctx: &SiteContext,
    ) -> Result<Option<Tensor>> {
        let (b, t, d) = hidden.dims3()?;
        let mut flat: Option<Tensor> = None;
        for (i, c) in self.config.interventions.iter().enumerate() {
            if Site::new(c.layer, c.component) != site {
                continue;
            }
            // Column `c` of this pass is sequence position `past + c` (left padding included).
            let past = ctx.past_len;
            let per_example = &self.rows[i];
            if per_example.len() != b {
                return Err(Error::InvalidArgument(format!(
                    "adapter prepared for {} examples, the batch has {b} (call Hooks::prepare)",
                    per_example.len()
                )));
            }
            let mut rows: Vec<u32> = Vec::new();
            for (bi, ps) in per_example.iter().enumerate() {
                for &p in ps {
                    if p >= past && p < past + t {
                        rows.push((bi * t + p - past) as u32);
                    }
                }
                // Generated tokens: every column past the prompt, when asked for.
                if self.every_token {
                    let end = self.prompt_end[bi];
                    for c in 0..t {
                        if past + c >= end {
                            rows.push((bi * t + c) as u32);
                        }
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let eff = self.effective[i].as_ref().ok_or_else(|| {
                Error::InvalidArgument("adapter used before Hooks::prepare".into())
            })?;
            let base = match flat.take() {
                Some(f) => f,
                None => hidden.reshape((b * t, d))?,
            };
            let idx = Tensor::from_vec(rows.clone(), rows.len(), hidden.device())?;
            let x = base.index_select(&idx, 0)?;
            let edit = (self.interventions[i].apply(&x, eff, self.training)? - &x)?;
            flat = Some(base.index_add(&idx, &edit, 0)?);
        }
        Ok(match flat {
            Some(f) => Some(f.reshape((b, t, d))?),
            None => None,
        })
    }
}

/// Several adapters used together. Their interventions must not edit the same position of the
/// same example at the same site (checked for every batch).
pub struct AdapterSet {
    /// The adapters, applied in order at each site.
    pub adapters: Vec<Adapter>,
}

impl AdapterSet {
    /// Fails when two adapters edit the same position of the same example at the same site.
    fn check_collisions(&self, layout: &PromptLayout) -> Result<()> {
        let mut seen: std::collections::HashMap<(Site, usize, usize), usize> = Default::default();
        for (ai, a) in self.adapters.iter().enumerate() {
            for (i, c) in a.config.interventions.iter().enumerate() {
                let site = Site::new(c.layer, c.component);
                for (bi, rows) in a.rows[i].iter().enumerate() {
                    for &p in rows {
                        if let Some(&other) = seen.get(&(site, bi, p)) {
                            if other != ai {
                                return Err(Error::InvalidArgument(format!(
                                    "adapters {other} and {ai} both edit position {} of prompt {bi} at layer {} {}",
                                    p - layout.left_pad[bi],
                                    c.layer,
                                    c.component.name()
                                )));
                            }
                        }
                        seen.insert((site, bi, p), ai);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Different adapters for different examples of one batch: each group's adapters edit only
/// the examples its mask marks. This is how requests for any mix of adapters share one prefill
/// (the serving engine); the groups' edits never meet, since they touch different examples.
pub struct PerExample {
    /// Each group: adapters applied together, and which examples of the batch they edit.
    pub groups: Vec<(AdapterSet, Vec<bool>)>,
}

impl Hooks for PerExample {
    fn sites(&self) -> Vec<Site> {
        sites_of(self.groups.iter().flat_map(|(g, _)| &g.adapters))
    }

    fn prepare(&mut self, layout: &PromptLayout) -> Result<()> {
        for (set, keep) in &mut self.groups {
            for a in &mut set.adapters {
                a.prepare(layout)?;
                a.keep_examples(keep);
            }
            set.check_collisions(layout)?;
        }
        Ok(())
    }

    fn on_site(
        &mut self,
        site: Site,
        hidden: &Tensor,
        ctx: &SiteContext,
    ) -> Result<Option<Tensor>> {
        let adapters = self.groups.iter_mut().flat_map(|(g, _)| &mut g.adapters);
        apply_in_order(adapters, site, hidden, ctx)
    }
}

impl Hooks for AdapterSet {
    fn sites(&self) -> Vec<Site> {
        sites_of(&self.adapters)
    }

    fn prepare(&mut self, layout: &PromptLayout) -> Result<()> {
        for a in &mut self.adapters {
            a.prepare(layout)?;
        }
        self.check_collisions(layout)
    }

    fn on_site(
        &mut self,
        site: Site,
        hidden: &Tensor,
        ctx: &SiteContext,
    ) -> Result<Option<Tensor>> {
        apply_in_order(&mut self.adapters, site, hidden, ctx)
    }
}

/// Every site any of `adapters` edits, sorted, once each.
fn sites_of<'a>(adapters: impl IntoIterator<Item = &'a Adapter>) -> Vec<Site> {
    let mut s: Vec<Site> = adapters.into_iter().flat_map(Hooks::sites).collect();
    s.sort();
    s.dedup();
    s
}

/// `adapters` at `site` one after another, each on the previous one's output.
fn apply_in_order<'a>(
    adapters: impl IntoIterator<Item = &'a mut Adapter>,
    site: Site,
    hidden: &Tensor,
    ctx: &SiteContext,
) -> Result<Option<Tensor>> {
    let mut cur: Option<Tensor> = None;
    for a in adapters {
        if let Some(t) = a.on_site(site, cur.as_ref().unwrap_or(hidden), ctx)? {
            cur = Some(t);
        }
    }
    Ok(cur)
}
