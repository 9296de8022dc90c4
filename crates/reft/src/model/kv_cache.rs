//! Key/value cache for incremental decoding.

use candle_core::Tensor;

use crate::Result;

/// Keys and values of every layer for the tokens seen so far, `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Whether a pass's keys and values are kept (off for a fixed prefix reused across passes).
    keep_appended: bool,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            keep_appended: true,
        }
    }

    /// A cache made of given per-layer keys and values (`None` for layers never run).
    pub fn from_layers(layers: Vec<Option<(Tensor, Tensor)>>) -> Self {
        Self {
            layers,
            keep_appended: true,
        }
    }

    /// A cache that passes read but never extend: each pass attends to the same prefix and its
    /// own tokens (training reuses one cached prompt prefix for every step this way, without
    /// copying the prefix into a longer cache each time).
    pub fn read_only(mut self) -> Self {
        self.keep_appended = false;
        self
    }

    /// Whether passes extend the cache (see [`read_only`](Self::read_only)).
    pub fn keeps_appended(&self) -> bool {
        self.keep_appended
    }

    /// Keys and values of one layer.
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(l).and_then(Option::as_ref)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens per sequence held in the cache (padding included).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    /// Number of cached scalars (keys and values, all layers).
    pub fn elem_count(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| k.elem_count() + v.elem_count())
            .sum()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the first `len` positions (e.g. a prompt prefix reused across training steps).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?.contiguous()?;
            *v = v.narrow(2, 0, len)?.contiguous()?;
        }
        Ok(())
    }

    /// Appends this step's keys and values for `layer` and returns the full keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        if self.keep_appended {
            self.layers[layer] = Some((k.clone(), v.clone()));
        }
        Ok((k, v))
    }

    /// Rows `rows` of the batch, in that order (sequences that leave a running batch are
    /// dropped this way).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let dev = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => return Ok(()),
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &dev,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    /// Puts `n` empty (zero) positions before every sequence, for a batch that joins one with a
    /// longer past; the attention mask must mark them as padding.
    pub fn pad_left(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let (b, h, _, d) = k.dims4()?;
            let zeros = Tensor::zeros((b, h, n, d), k.dtype(), k.device())?;
            *k = Tensor::cat(&[&zeros, &*k], 2)?;
            *v = Tensor::cat(&[&zeros, &*v], 2)?;
        }
        Ok(())
    }

    /// Drops the first `n` positions of every sequence (padding no sequence needs any more).
    pub fn drop_leading(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let t = k.dim(2)?;
            *k = k.narrow(2, n, t - n)?.contiguous()?;
            *v = v.narrow(2, n, t - n)?.contiguous()?;
        }
        Ok(())
    }

    /// Appends the sequences of `other` (same length, same layers run) after this batch's.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.is_empty() {
            *self = other;
            return Ok(());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some((k, v)), Some((ok, ov))) = (mine.as_mut(), theirs) {
                *k = Tensor::cat(&[&*k, &ok], 0)?;
                *v = Tensor::cat(&[&*v, &ov], 0)?;
            }
        }
        Ok(())
    }
}
