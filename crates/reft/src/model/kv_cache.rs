//! Key/value cache for incremental decoding.

use candle_core::Tensor;

use crate::Result;

/// One sequence's keys and values at its first `len` positions (a prompt prefix cached for
/// reuse, say): one `(k, v)` per layer, each `[1, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct PrefixKv {
    /// Positions covered.
    pub len: usize,
    /// Per layer, its keys and values.
    pub layers: Vec<(Tensor, Tensor)>,
}

/// Keys and values of every layer for the tokens seen so far, `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<Entry>>,
    /// Whether a pass's keys and values are kept (off for a fixed prefix reused across passes).
    keep_appended: bool,
}

/// One layer's keys and values `[b, heads, capacity, head_dim]`, of which the first `len`
/// positions are filled. Decoding writes each new position into the room after `len`, so a
/// step copies one position, not the whole cache (concatenating every step copied all of it:
/// 220 MB a step for 32 sequences of 150 tokens on SmolLM2).
#[derive(Debug)]
struct Entry {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions of room added when a layer's buffer is full: one copy per this many decode steps.
const ROOM: usize = 64;

/// A copy shares the filled positions but has no room of its own, so that neither copy's
/// in-place writes can reach the other.
impl Clone for Entry {
    fn clone(&self) -> Self {
        let (k, v) = self.view().expect("a narrow within the buffer");
        Self {
            k,
            v,
            len: self.len,
        }
    }
}

impl Entry {
    /// Exactly `k` and `v`, no room.
    fn exact(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        Ok(Self { k, v, len })
    }

    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The filled part.
    fn view(&self) -> Result<(Tensor, Tensor)> {
        if self.len == self.capacity() {
            return Ok((self.k.clone(), self.v.clone()));
        }
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Appends `k`, `v` in place when there is room (growing by [`ROOM`] when there is not);
    /// tensors that carry gradients are concatenated instead, so no graph is cut.
    fn push(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(2)?;
        let (pk, pv) = self.view()?;
        if [&pk, &pv, k, v].iter().any(|x| x.track_op()) {
            *self = Self::exact(Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?)?;
            return Ok(());
        }
        if self.len + t > self.capacity() {
            let (b, h, _, d) = pk.dims4()?;
            let room = Tensor::zeros((b, h, t + ROOM, d), pk.dtype(), pk.device())?;
            self.k = Tensor::cat(&[&pk, &room], 2)?;
            self.v = Tensor::cat(&[&pv, &room], 2)?;
        }
        // Writes past `len` only: earlier views of the buffer never see them.
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok(())
    }
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
        let layers = layers
            .into_iter()
            .map(|l| l.map(|(k, v)| Entry::exact(k, v)).transpose())
            .collect::<Result<Vec<_>>>();
        Self {
            // A tensor without four dimensions fails at its first use instead.
            layers: layers.unwrap_or_default(),
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

    /// Keys and values of one layer (views of the filled positions).
    pub fn layer(&self, l: usize) -> Option<(Tensor, Tensor)> {
        self.layers
            .get(l)
            .and_then(Option::as_ref)
            .and_then(|e| e.view().ok())
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens per sequence held in the cache (padding included).
    pub fn len(&self) -> usize {
        self.layers.iter().flatten().next().map_or(0, |e| e.len)
    }

    /// Number of cached scalars (keys and values, all layers).
    pub fn elem_count(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|e| 2 * e.k.elem_count() / e.capacity().max(1) * e.len)
            .sum()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces every layer's keys and values by `f` of them (with no room after).
    fn map_layers(&mut self, f: impl Fn(Tensor, Tensor) -> Result<(Tensor, Tensor)>) -> Result<()> {
        for e in self.layers.iter_mut().flatten() {
            let (k, v) = e.view()?;
            let (k, v) = f(k, v)?;
            *e = Entry::exact(k, v)?;
        }
        Ok(())
    }

    /// Keeps only the first `len` positions (e.g. a prompt prefix reused across training steps).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.map_layers(|k, v| {
            Ok((
                k.narrow(2, 0, len)?.contiguous()?,
                v.narrow(2, 0, len)?.contiguous()?,
            ))
        })
    }

    /// Appends this step's keys and values for `layer` and returns the full keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        match (&mut self.layers[layer], self.keep_appended) {
            (None, keep) => {
                let (k, v) = (k.contiguous()?, v.contiguous()?);
                if keep {
                    self.layers[layer] = Some(Entry::exact(k.clone(), v.clone())?);
                }
                Ok((k, v))
            }
            (Some(e), false) => {
                let (pk, pv) = e.view()?;
                Ok((Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?))
            }
            (Some(e), true) => {
                e.push(k, v)?;
                e.view()
            }
        }
    }

    /// Rows `rows` of the batch, in that order (sequences that leave a running batch are
    /// dropped this way).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let dev = match self.layers.iter().flatten().next() {
            Some(e) => e.k.device().clone(),
            None => return Ok(()),
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &dev,
        )?;
        // Whole buffers (contiguous, as index_select needs), so the room is kept.
        for e in self.layers.iter_mut().flatten() {
            e.k = e.k.index_select(&idx, 0)?;
            e.v = e.v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    /// Puts `n` empty (zero) positions before every sequence, for a batch that joins one with a
    /// longer past; the attention mask must mark them as padding.
    pub fn pad_left(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.map_layers(|k, v| {
            let (b, h, _, d) = k.dims4()?;
            let zeros = Tensor::zeros((b, h, n, d), k.dtype(), k.device())?;
            Ok((
                Tensor::cat(&[&zeros, &k], 2)?,
                Tensor::cat(&[&zeros, &v], 2)?,
            ))
        })
    }

    /// Drops the first `n` positions of every sequence (padding no sequence needs any more).
    pub fn drop_leading(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.map_layers(|k, v| {
            let t = k.dim(2)?;
            Ok((
                k.narrow(2, n, t - n)?.contiguous()?,
                v.narrow(2, n, t - n)?.contiguous()?,
            ))
        })
    }

    /// Appends the sequences of `other` (same length, same layers run) after this batch's.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.is_empty() {
            *self = other;
            return Ok(());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some(e), Some(o)) = (mine.as_mut(), theirs) {
                let ((k, v), (ok, ov)) = (e.view()?, o.view()?);
                *e = Entry::exact(Tensor::cat(&[&k, &ok], 0)?, Tensor::cat(&[&v, &ov], 0)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn step(x: f32, t: usize) -> Tensor {
        Tensor::full(x, (2, 1, t, 3), &Device::Cpu).unwrap()
    }

    fn column(c: &KvCache) -> Vec<f32> {
        let (k, _) = c.layer(0).unwrap();
        k.narrow(0, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .chunks(3)
            .map(|p| p[0])
            .collect()
    }

    /// In-place appends (with room) give what concatenation gave, through growth, row
    /// selection and padding, and a clone's appends never reach the original.
    #[test]
    fn appends_in_place_equal_concatenation_and_clones_stay_apart() -> Result<()> {
        let mut c = KvCache::new(1);
        c.append(0, &step(1.0, 4), &step(1.0, 4))?;
        for i in 0..70 {
            let (k, _) = c.append(0, &step(2.0 + i as f32, 1), &step(0.0, 1))?;
            assert_eq!(k.dim(2)?, 5 + i);
        }
        let mut want: Vec<f32> = vec![1.0; 4];
        want.extend((0..70).map(|i| 2.0 + i as f32));
        assert_eq!(column(&c), want);
        assert_eq!(c.len(), 74);
        assert_eq!(c.elem_count(), 2 * 2 * 74 * 3);
        let mut copy = c.clone();
        copy.append(0, &step(-1.0, 1), &step(0.0, 1))?;
        c.append(0, &step(-2.0, 1), &step(0.0, 1))?;
        assert_eq!(column(&copy).last(), Some(&-1.0));
        assert_eq!(column(&c).last(), Some(&-2.0));
        c.select_rows(&[1])?;
        c.pad_left(2)?;
        c.append(
            0,
            &step(9.0, 1).narrow(0, 0, 1)?,
            &step(0.0, 1).narrow(0, 0, 1)?,
        )?;
        let got = column(&c);
        assert_eq!(&got[..3], &[0.0, 0.0, 1.0]);
        assert_eq!(&got[got.len() - 2..], &[-2.0, 9.0]);
        Ok(())
    }
}
