//! Keys and values of prompt prefixes the base model has already computed, shared by later
//! requests that start with the same tokens (a chat template's system prompt, a few-shot
//! preamble, a conversation's earlier turns).
//!
//! A radix tree over token ids, as SGLang's RadixAttention keeps one: each node holds a run of
//! tokens and their keys/values at every layer, and a path from the root spells a prefix. Unlike
//! fixed-size blocks (vLLM's prefix caching), a match is exact to the token, so a 35-token chat
//! prompt that shares 30 tokens with an earlier one reuses all 30. In a causal model the keys and
//! values of position `p` depend only on tokens `..=p`, so any matched run is valid whatever
//! followed it when it was computed. Least recently used leaves are dropped to keep the tree
//! within its byte budget.

use candle_core::Tensor;

use crate::model::PrefixKv;
use crate::Result;

/// One run of tokens below its parent.
#[derive(Debug)]
struct Node {
    tokens: Vec<u32>,
    /// Per layer, `[1, kv_heads, tokens.len(), head_dim]`, contiguous.
    kv: Vec<(Tensor, Tensor)>,
    parent: Option<usize>,
    children: Vec<usize>,
    last_used: u64,
}

impl Node {
    fn bytes(&self) -> usize {
        self.kv
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// The tree of cached prefixes.
#[derive(Debug)]
pub struct PrefixCache {
    /// Nodes by index; `None` for a freed slot.
    nodes: Vec<Option<Node>>,
    /// Children of the root (the empty prefix).
    roots: Vec<usize>,
    budget_bytes: usize,
    used_bytes: usize,
    clock: u64,
}

/// Where a prompt leaves the tree: the nodes it runs through and how many of the last one's
/// tokens it matches.
struct Walk {
    path: Vec<usize>,
    /// Tokens matched in the last node of `path` (all of the others are matched whole).
    in_last: usize,
    matched: usize,
}

impl PrefixCache {
    /// An empty cache that holds at most `budget_bytes` of keys and values (0 keeps nothing).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            nodes: Vec::new(),
            roots: Vec::new(),
            budget_bytes,
            used_bytes: 0,
            clock: 0,
        }
    }

    /// Bytes of keys and values held.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Cached prefixes' tokens in all (nodes' runs summed).
    pub fn tokens(&self) -> usize {
        self.nodes.iter().flatten().map(|n| n.tokens.len()).sum()
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("a live node")
    }

    fn children_of(&self, parent: Option<usize>) -> &[usize] {
        match parent {
            Some(p) => &self.node(p).children,
            None => &self.roots,
        }
    }

    /// Follows `tokens` down the tree as far as it matches.
    fn walk(&self, tokens: &[u32]) -> Walk {
        let mut walk = Walk {
            path: Vec::new(),
            in_last: 0,
            matched: 0,
        };
        let mut parent = None;
        while walk.matched < tokens.len() {
            let next = tokens[walk.matched];
            let Some(&child) = self
                .children_of(parent)
                .iter()
                .find(|&&c| self.node(c).tokens[0] == next)
            else {
                break;
            };
            let run = &self.node(child).tokens;
            let common = run
                .iter()
                .zip(&tokens[walk.matched..])
                .take_while(|(a, b)| a == b)
                .count();
            walk.path.push(child);
            walk.in_last = common;
            walk.matched += common;
            if common < run.len() {
                break;
            }
            parent = Some(child);
        }
        walk
    }

    /// The longest cached prefix of `tokens`, at most `max_len` positions, with its keys and
    /// values (copied out, so later evictions cannot touch it); `None` when nothing matches.
    pub fn lookup(&mut self, tokens: &[u32], max_len: usize) -> Result<Option<PrefixKv>> {
        let tokens = &tokens[..max_len.min(tokens.len())];
        let walk = self.walk(tokens);
        if walk.matched == 0 {
            return Ok(None);
        }
        self.clock += 1;
        let n_layers = self.node(walk.path[0]).kv.len();
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut ks = Vec::with_capacity(walk.path.len());
            let mut vs = Vec::with_capacity(walk.path.len());
            for (j, &i) in walk.path.iter().enumerate() {
                let node = self.node(i);
                let take = if j + 1 == walk.path.len() {
                    walk.in_last
                } else {
                    node.tokens.len()
                };
                let (k, v) = &node.kv[l];
                ks.push(k.narrow(2, 0, take)?);
                vs.push(v.narrow(2, 0, take)?);
            }
            layers.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        for &i in &walk.path {
            self.nodes[i].as_mut().expect("a live node").last_used = self.clock;
        }
        Ok(Some(PrefixKv {
            len: walk.matched,
            layers,
        }))
    }

    /// How many of `tokens`' positions are cached already (no copy).
    pub fn cached_len(&self, tokens: &[u32]) -> usize {
        self.walk(tokens).matched
    }

    /// Whether [`insert`](Self::insert)ing `tokens` would keep anything: the cache has a
    /// budget and some of them are not cached yet. Lets a caller skip copying their keys and
    /// values out.
    pub fn would_add(&self, tokens: &[u32]) -> bool {
        self.budget_bytes > 0 && !tokens.is_empty() && self.cached_len(tokens) < tokens.len()
    }

    /// Caches `kv` (positions `0..tokens.len()` of one sequence) under `tokens`, keeping only
    /// the part not cached yet, then drops least recently used leaves beyond the budget.
    pub fn insert(&mut self, tokens: &[u32], kv: &PrefixKv) -> Result<()> {
        if self.budget_bytes == 0 || tokens.is_empty() || kv.len < tokens.len() {
            return Ok(());
        }
        let walk = self.walk(tokens);
        self.clock += 1;
        if walk.matched == tokens.len() {
            return Ok(());
        }
        let parent = match walk.path.last() {
            Some(&last) if walk.in_last < self.node(last).tokens.len() => {
                Some(self.split(last, walk.in_last)?)
            }
            Some(&last) => Some(last),
            None => None,
        };
        let (from, n) = (walk.matched, tokens.len() - walk.matched);
        let mut own = Vec::with_capacity(kv.layers.len());
        for (k, v) in &kv.layers {
            own.push((
                k.narrow(2, from, n)?.contiguous()?,
                v.narrow(2, from, n)?.contiguous()?,
            ));
        }
        let node = Node {
            tokens: tokens[from..].to_vec(),
            kv: own,
            parent,
            children: Vec::new(),
            last_used: self.clock,
        };
        self.used_bytes += node.bytes();
        let at = self.add(node);
        match parent {
            Some(p) => self.nodes[p]
                .as_mut()
                .expect("a live node")
                .children
                .push(at),
            None => self.roots.push(at),
        }
        for &i in &walk.path {
            self.nodes[i].as_mut().expect("a live node").last_used = self.clock;
        }
        self.evict(at);
        Ok(())
    }

    /// Splits node `i` after its first `at` tokens (0 < at < len); returns the upper half,
    /// which keeps `i`'s place, with the lower half as its only child.
    fn split(&mut self, i: usize, at: usize) -> Result<usize> {
        let node = self.nodes[i].take().expect("a live node");
        let halves = |lo: usize, n: usize| -> Result<Vec<(Tensor, Tensor)>> {
            node.kv
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.narrow(2, lo, n)?.contiguous()?,
                        v.narrow(2, lo, n)?.contiguous()?,
                    ))
                })
                .collect()
        };
        let len = node.tokens.len();
        let (upper_kv, lower_kv) = (halves(0, at)?, halves(at, len - at)?);
        // The upper half goes back first, so that adding the lower half cannot take its slot.
        self.nodes[i] = Some(Node {
            tokens: node.tokens[..at].to_vec(),
            kv: upper_kv,
            parent: node.parent,
            children: Vec::new(),
            last_used: node.last_used,
        });
        let lower_at = self.add(Node {
            tokens: node.tokens[at..].to_vec(),
            kv: lower_kv,
            parent: Some(i),
            children: node.children.clone(),
            last_used: node.last_used,
        });
        for &c in &node.children {
            self.nodes[c].as_mut().expect("a live node").parent = Some(lower_at);
        }
        self.nodes[i].as_mut().expect("a live node").children = vec![lower_at];
        Ok(i)
    }

    fn add(&mut self, node: Node) -> usize {
        match self.nodes.iter().position(Option::is_none) {
            Some(free) => {
                self.nodes[free] = Some(node);
                free
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Drops least recently used leaves until the cache fits its budget; `keep` (the node just
    /// added) goes last, so a prefix larger than the whole budget is not kept either.
    fn evict(&mut self, keep: usize) {
        while self.used_bytes > self.budget_bytes {
            let victim = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
                .filter(|(_, n)| n.children.is_empty())
                .min_by_key(|&(i, n)| (i == keep, n.last_used))
                .map(|(i, _)| i);
            let Some(v) = victim else { return };
            let node = self.nodes[v].take().expect("a live node");
            self.used_bytes -= node.bytes();
            match node.parent {
                Some(p) => self.nodes[p]
                    .as_mut()
                    .expect("a live node")
                    .children
                    .retain(|&c| c != v),
                None => self.roots.retain(|&c| c != v),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two layers whose keys at position `p` hold `tokens[p]` (values hold its negation), so a
    /// lookup's result says which tokens' keys it returned.
    fn kv_of(tokens: &[u32]) -> PrefixKv {
        let layer = |sign: f32| {
            let data: Vec<f32> = tokens.iter().map(|&t| sign * t as f32).collect();
            Tensor::from_vec(data, (1, 1, tokens.len(), 1), &Device::Cpu).unwrap()
        };
        PrefixKv {
            len: tokens.len(),
            layers: vec![(layer(1.0), layer(-1.0)), (layer(2.0), layer(-2.0))],
        }
    }

    fn keys(kv: &PrefixKv, layer: usize) -> Vec<f32> {
        kv.layers[layer].0.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn lookups_match_to_the_token_across_splits() -> Result<()> {
        let mut c = PrefixCache::new(1 << 20);
        c.insert(&[1, 2, 3, 4, 5], &kv_of(&[1, 2, 3, 4, 5]))?;
        c.insert(&[1, 2, 3, 9, 9, 9], &kv_of(&[1, 2, 3, 9, 9, 9]))?;
        c.insert(&[7, 8], &kv_of(&[7, 8]))?;
        assert_eq!(c.tokens(), 5 + 3 + 2);
        let hit = c.lookup(&[1, 2, 3, 4, 6], 10)?.unwrap();
        assert_eq!(hit.len, 4);
        assert_eq!(keys(&hit, 0), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(keys(&hit, 1), [2.0, 4.0, 6.0, 8.0]);
        let hit = c.lookup(&[1, 2, 3, 9, 9, 9, 9], 10)?.unwrap();
        assert_eq!(keys(&hit, 0), [1.0, 2.0, 3.0, 9.0, 9.0, 9.0]);
        assert_eq!(c.lookup(&[1, 2, 3, 9, 9, 9, 9], 2)?.unwrap().len, 2);
        assert!(c.lookup(&[5, 1], 10)?.is_none());
        assert_eq!(c.cached_len(&[7, 8, 1]), 2);
        // Nothing new: nothing added.
        c.insert(&[1, 2], &kv_of(&[1, 2]))?;
        assert_eq!(c.tokens(), 10);
        Ok(())
    }

    /// Random inserts and lookups over a small alphabet (many shared prefixes, many splits)
    /// agree with a brute-force longest common prefix over everything inserted.
    #[test]
    fn lookups_agree_with_brute_force() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = PrefixCache::new(1 << 30);
        let mut seen: Vec<Vec<u32>> = Vec::new();
        for _ in 0..300 {
            let len = rng.gen_range(1..12);
            let t: Vec<u32> = (0..len).map(|_| rng.gen_range(1..4)).collect();
            let lcp = |s: &Vec<u32>| s.iter().zip(&t).take_while(|(a, b)| a == b).count();
            let want = seen.iter().map(lcp).max().unwrap_or(0);
            match c.lookup(&t, usize::MAX)? {
                Some(hit) => {
                    assert_eq!(hit.len, want, "{t:?}");
                    let got: Vec<u32> = keys(&hit, 0).iter().map(|&k| k as u32).collect();
                    assert_eq!(got, t[..want]);
                }
                None => assert_eq!(want, 0),
            }
            if rng.gen_bool(0.5) {
                c.insert(&t, &kv_of(&t))?;
                seen.push(t);
            }
        }
        Ok(())
    }

    #[test]
    fn least_recently_used_leaves_go_first() -> Result<()> {
        // Two layers × (k + v) × 4 bytes = 16 bytes a token: room for 10 tokens.
        let mut c = PrefixCache::new(160);
        c.insert(&[1, 2, 3, 4], &kv_of(&[1, 2, 3, 4]))?;
        c.insert(&[5, 6, 7, 8], &kv_of(&[5, 6, 7, 8]))?;
        c.lookup(&[1, 2], 10)?;
        c.insert(&[9, 9, 9], &kv_of(&[9, 9, 9]))?;
        assert_eq!(c.used_bytes(), 16 * 7);
        assert!(c.lookup(&[5, 6], 10)?.is_none());
        assert_eq!(c.lookup(&[1, 2, 3, 4], 10)?.unwrap().len, 4);
        // A prefix over the whole budget is not kept.
        let long: Vec<u32> = (100..120).collect();
        c.insert(&long, &kv_of(&long))?;
        assert!(c.lookup(&long, 30)?.is_none());
        assert!(c.used_bytes() <= 160);
        assert_eq!(PrefixCache::new(0).used_bytes(), 0);
        Ok(())
    }
}
