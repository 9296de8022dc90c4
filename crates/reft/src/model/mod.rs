//! Frozen transformer backbones with hook points (SPEC §3).
//!
//! The model knows nothing of interventions: at every requested [`Site`] it hands the hidden
//! states `[batch, seq, d]` to a [`Hooks`] implementation, which may return an edited tensor that
//! replaces them for everything downstream. Gradients flow from the loss back through every later
//! layer into whatever trainable tensors the hooks used. Frozen weights are plain tensors, never
//! `Var`s, so the layers below the lowest edited site record no graph at all: candle tracks an op
//! only when one of its inputs carries a variable.

pub mod bert;
mod blocks;
pub mod config;
mod decode_step;
mod head_loss;
pub mod kv_cache;
pub mod llama;

use std::collections::HashMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::Result;

pub use config::{Arch, DecoderConfig};
pub use kv_cache::{KvCache, PrefixKv};
pub use llama::Decoder;

/// Which tensor of a layer a hook sees (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The residual stream entering the layer.
    BlockInput,
    /// The attention block's output, before the residual add.
    AttentionOutput,
    /// The MLP's output, before the residual add.
    MlpOutput,
    /// The residual stream leaving the layer (the default).
    BlockOutput,
}

impl Component {
    /// Every component, in the order the forward pass reaches them inside a layer.
    pub const ALL: [Component; 4] = [
        Component::BlockInput,
        Component::AttentionOutput,
        Component::MlpOutput,
        Component::BlockOutput,
    ];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Component::BlockInput => "block_input",
            Component::AttentionOutput => "attention_output",
            Component::MlpOutput => "mlp_output",
            Component::BlockOutput => "block_output",
        }
    }
}

impl std::str::FromStr for Component {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                crate::Error::InvalidArgument(format!(
                "unknown component `{s}` (block_input, attention_output, mlp_output, block_output)"
            ))
            })
    }
}

/// A place where hidden states can be read and replaced: a layer (0-based) and a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Site {
    /// 0-based layer index.
    pub layer: usize,
    /// Which tensor of the layer.
    pub component: Component,
}

impl Site {
    /// A site.
    pub fn new(layer: usize, component: Component) -> Self {
        Self { layer, component }
    }
}

/// What a hook knows about the tokens in the tensor it receives.
#[derive(Debug, Clone, Copy)]
pub struct SiteContext {
    /// How many tokens of each sequence were already in the KV cache before this pass: the
    /// tensor's column `t` is sequence position `past_len + t` (padding included).
    pub past_len: usize,
}

/// Where each example's prompt sits in the batch about to run: what position-based hooks
/// (interventions) need to find "the last prompt token" in padded, batched passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptLayout {
    /// Prompt length of each example, in tokens.
    pub prompt_lens: Vec<usize>,
    /// Padding columns before each example's first token (left padding); 0 for right padding.
    pub left_pad: Vec<usize>,
}

impl PromptLayout {
    /// Unpadded prompts of these lengths (right padding, if any, comes after them).
    pub fn unpadded(prompt_lens: Vec<usize>) -> Self {
        let n = prompt_lens.len();
        Self {
            prompt_lens,
            left_pad: vec![0; n],
        }
    }
}

/// The end of the run of layers from `l` that no hook splits: no hook inside a layer (attention
/// or MLP output) and none between consecutive layers. Such a run is one fused op (training)
/// or one slice decode step.
pub(crate) fn hook_free_run_end(sites: &[Site], l: usize, n_layers: usize) -> usize {
    let at = |l: usize, c: Component| sites.contains(&Site::new(l, c));
    let mut end = l + 1;
    while end < n_layers
        && !has_inner_hooks(sites, end)
        && !at(end - 1, Component::BlockOutput)
        && !at(end, Component::BlockInput)
    {
        end += 1;
    }
    end
}

/// Whether a hook sits inside layer `l` (at its attention or MLP output).
pub(crate) fn has_inner_hooks(sites: &[Site], l: usize) -> bool {
    [Component::AttentionOutput, Component::MlpOutput]
        .into_iter()
        .any(|c| sites.contains(&Site::new(l, c)))
}

/// Hands `h` to `hooks` at `site` when they asked for it (`sites`) and returns what flows on
/// downstream: `h` itself, or the hooks' replacement after checking its shape.
pub(crate) fn run_hook(
    hooks: &mut dyn Hooks,
    sites: &[Site],
    ctx: &SiteContext,
    site: Site,
    h: Tensor,
) -> Result<Tensor> {
    if !sites.contains(&site) {
        return Ok(h);
    }
    match hooks.on_site(site, &h, ctx)? {
        None => Ok(h),
        Some(new) if new.dims() == h.dims() => Ok(new),
        Some(new) => Err(crate::Error::InvalidArgument(format!(
            "hook at layer {} {} returned shape {:?}, expected {:?}",
            site.layer,
            site.component.name(),
            new.dims(),
            h.dims()
        ))),
    }
}

/// Receives hidden states at the sites it asks for, and may edit them.
pub trait Hooks {
    /// The sites this hook wants to see. Sites not listed cost nothing.
    fn sites(&self) -> Vec<Site>;

    /// Called before a batch's passes with where its prompts are. The default ignores it.
    fn prepare(&mut self, _layout: &PromptLayout) -> Result<()> {
        Ok(())
    }

    /// Called with the hidden states `[batch, seq, d]` at `site`; returning `Some(t)` replaces
    /// them by `t` (same shape) for the rest of the forward pass.
    fn on_site(&mut self, site: Site, hidden: &Tensor, ctx: &SiteContext)
        -> Result<Option<Tensor>>;
}

/// Hooks that see nothing: the plain model.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn sites(&self) -> Vec<Site> {
        Vec::new()
    }
    fn on_site(&mut self, _: Site, _: &Tensor, _: &SiteContext) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Records the hidden states at chosen sites without editing them.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    sites: Vec<Site>,
    /// The recorded states, by site.
    pub states: HashMap<Site, Tensor>,
}

impl Recorder {
    /// A recorder for these sites.
    pub fn new(sites: impl IntoIterator<Item = Site>) -> Self {
        Self {
            sites: sites.into_iter().collect(),
            states: HashMap::new(),
        }
    }
}

impl Hooks for Recorder {
    fn sites(&self) -> Vec<Site> {
        self.sites.clone()
    }
    fn on_site(&mut self, site: Site, hidden: &Tensor, _: &SiteContext) -> Result<Option<Tensor>> {
        self.states.insert(site, hidden.clone());
        Ok(None)
    }
}

/// Two hook sets applied in turn at every site (the first sees the original states, the second
/// sees the first's edit).
pub struct Chain<'a>(pub &'a mut dyn Hooks, pub &'a mut dyn Hooks);

impl Hooks for Chain<'_> {
    fn prepare(&mut self, layout: &PromptLayout) -> Result<()> {
        self.0.prepare(layout)?;
        self.1.prepare(layout)
    }

    fn sites(&self) -> Vec<Site> {
        let mut s = self.0.sites();
        s.extend(self.1.sites());
        s.sort();
        s.dedup();
        s
    }
    fn on_site(
        &mut self,
        site: Site,
        hidden: &Tensor,
        ctx: &SiteContext,
    ) -> Result<Option<Tensor>> {
        let first = if self.0.sites().contains(&site) {
            self.0.on_site(site, hidden, ctx)?
        } else {
            None
        };
        let h = first.as_ref().unwrap_or(hidden);
        let second = if self.1.sites().contains(&site) {
            self.1.on_site(site, h, ctx)?
        } else {
            None
        };
        Ok(second.or(first))
    }
}

/// A closure-based hook: handy for tests and one-off edits.
pub struct FnHooks<F> {
    sites: Vec<Site>,
    f: F,
}

impl<F> FnHooks<F>
where
    F: FnMut(Site, &Tensor, &SiteContext) -> Result<Option<Tensor>>,
{
    /// Calls `f` at each of `sites`.
    pub fn new(sites: impl IntoIterator<Item = Site>, f: F) -> Self {
        Self {
            sites: sites.into_iter().collect(),
            f,
        }
    }
}

impl<F> Hooks for FnHooks<F>
where
    F: FnMut(Site, &Tensor, &SiteContext) -> Result<Option<Tensor>>,
{
    fn sites(&self) -> Vec<Site> {
        self.sites.clone()
    }
    fn on_site(
        &mut self,
        site: Site,
        hidden: &Tensor,
        ctx: &SiteContext,
    ) -> Result<Option<Tensor>> {
        (self.f)(site, hidden, ctx)
    }
}
