//! The head file, `classifier_head.safetensors` beside the adapter: the head's tensors (f32,
//! named as in [`Head::vars`] without `head.`) and, in the safetensors metadata, its kind,
//! problem, label count and hidden size, so a head is rebuilt from the file alone and a file
//! that does not fit is refused with the reason. [`HeadFile`] reads the metadata first, so that
//! a caller learns what the head is before it loads the encoder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{Dense, Head, HeadKind, HeadSpec};
use crate::train::classify::Problem;
use crate::{Error, Result};

impl Head {
    /// Writes the head to `dir/classifier_head.safetensors` (atomically), with its kind,
    /// problem, label count and hidden size in the file's metadata.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n["head.".len()..].to_string(), v.as_tensor().clone()))
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), "reft-classifier-head".to_string()),
            ("kind".to_string(), self.spec.kind.name().to_string()),
            ("problem".to_string(), self.spec.problem.name().to_string()),
            ("num_labels".to_string(), self.spec.num_labels.to_string()),
            ("hidden_size".to_string(), self.hidden.to_string()),
        ]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
                .map_err(|e| Error::InvalidArgument(format!("serialising the head: {e}")))?;
        crate::adapter::native::write_atomic(&dir.join(Self::FILE), &bytes)
    }

    /// Reads a head saved by [`save`](Self::save) for an encoder of hidden size `hidden`:
    /// [`HeadFile::open`], then [`HeadFile::load`].
    pub fn load(
        dir: &Path,
        hidden: usize,
        expect: Option<HeadKind>,
        device: &Device,
    ) -> Result<Self> {
        HeadFile::open(dir)?.load(hidden, expect, device)
    }
}

/// A head file whose metadata has been read but whose tensors have not: what the head is
/// (its kind and problem) is known before the encoder it sits on is loaded, so that labels
/// can be parsed, and bad ones refused, first.
pub struct HeadFile {
    path: PathBuf,
    bytes: Vec<u8>,
    meta: HashMap<String, String>,
    kind: HeadKind,
    problem: Problem,
}

impl HeadFile {
    /// Reads `dir/classifier_head.safetensors` and its metadata. A file without metadata is
    /// read as a single-label mean head (what was saved before kinds were recorded).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(Head::FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::BadWeights {
            path: path.clone(),
            msg,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let kind: HeadKind = meta.get("kind").map_or(Ok(HeadKind::Mean), |k| {
            k.parse().map_err(|e: Error| bad(e.to_string()))
        })?;
        let problem: Problem = meta.get("problem").map_or(Ok(Problem::SingleLabel), |p| {
            p.parse().map_err(|e: Error| bad(e.to_string()))
        })?;
        Ok(Self {
            path,
            bytes,
            meta,
            kind,
            problem,
        })
    }

    /// The head's kind.
    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    /// The problem the head was trained for.
    pub fn problem(&self) -> Problem {
        self.problem
    }

    /// The head, for an encoder of hidden size `hidden`. With `expect`, the file must hold
    /// that kind. Every tensor the kind needs must be there with its shape, and nothing else.
    pub fn load(self, hidden: usize, expect: Option<HeadKind>, device: &Device) -> Result<Head> {
        let (kind, problem, meta) = (self.kind, self.problem, &self.meta);
        let bad = |msg: String| Error::BadWeights {
            path: self.path.clone(),
            msg,
        };
        if let Some(want) = expect.filter(|&w| w != kind) {
            return Err(bad(format!(
                "it holds a `{kind}` head, not the `{want}` head asked for"
            )));
        }
        let number = |key: &str| -> Result<Option<usize>> {
            meta.get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(format!("metadata `{key}` is `{v}`, not a number")))
                })
                .transpose()
        };
        if let Some(h) = number("hidden_size")?.filter(|&h| h != hidden) {
            return Err(bad(format!(
                "the head reads hidden size {h}, but this encoder's is {hidden}"
            )));
        }
        let mut tensors = candle_core::safetensors::load_buffer(&self.bytes, device)
            .map_err(|e| bad(e.to_string()))?;
        let names = kind.layers();
        let (last, _) = names[names.len() - 1];
        let last_weight = Dense::tensor_name(last, "weight");
        let num_labels = match number("num_labels")? {
            Some(n) => n,
            None => tensors
                .get(&last_weight)
                .map_or(0, |w| w.dims().first().copied().unwrap_or(0)),
        };
        let spec = HeadSpec {
            kind,
            problem,
            num_labels,
        };
        spec.check().map_err(|e| bad(e.to_string()))?;
        let mut layers = Vec::with_capacity(names.len());
        for (name, _, out) in spec.layer_shapes(hidden) {
            let mut take = |param: &str, shape: &[usize]| -> Result<Tensor> {
                let n = Dense::tensor_name(name, param);
                let t = tensors
                    .remove(&n)
                    .ok_or_else(|| bad(format!("a `{kind}` head needs tensor `{n}`")))?;
                if t.dims() != shape {
                    return Err(bad(format!(
                        "`{n}` has shape {:?}; a `{kind}` head with {num_labels} labels on \
                         hidden size {hidden} needs {shape:?}",
                        t.dims()
                    )));
                }
                Ok(t)
            };
            let w = take("weight", &[out, hidden])?;
            let b = take("bias", &[out])?;
            layers.push(Dense::from_tensors(name, &w, &b)?);
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!(
                "tensor `{extra}` does not belong to a `{kind}` head"
            )));
        }
        Ok(Head {
            spec,
            hidden,
            layers,
            dropout: 0.0,
            from_checkpoint: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn write(dir: &Path, tensors: &[(&str, Tensor)], meta: &[(&str, &str)]) {
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), Some(meta)).unwrap();
        std::fs::write(dir.join(Head::FILE), bytes).unwrap();
    }

    #[test]
    fn saved_heads_come_back_and_mismatches_are_named() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let spec = HeadSpec {
            kind: HeadKind::Pooler,
            problem: Problem::MultiLabel,
            num_labels: 3,
        };
        let head = Head::new(spec, 8, 7, &dev).unwrap();
        head.save(dir.path()).unwrap();
        let hidden = Tensor::arange(0f32, 80.0, &dev)
            .unwrap()
            .reshape((2, 5, 8))
            .unwrap()
            .sin()
            .unwrap();
        let mask = vec![vec![1; 5], vec![1, 1, 1, 0, 0]];
        let back = Head::load(dir.path(), 8, None, &dev).unwrap();
        assert_eq!(back.spec(), spec);
        let (a, b) = (
            head.forward(&hidden, &mask, None).unwrap(),
            back.forward(&hidden, &mask, None).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        assert_eq!(a.dims(), [2, 3]);

        let err = |r: Result<Head>| r.err().expect("an error").to_string();
        let e = err(Head::load(dir.path(), 8, Some(HeadKind::Roberta), &dev));
        assert!(
            e.contains(Head::FILE) && e.contains("holds a `pooler` head, not the `roberta`"),
            "{e}"
        );
        let e = err(Head::load(dir.path(), 16, None, &dev));
        assert!(e.contains("hidden size 8") && e.contains("16"), "{e}");

        // Metadata and tensors that disagree.
        let w = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        let bias = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let mean = [("weight", w.clone()), ("bias", bias.clone())];
        write(
            dir.path(),
            &mean,
            &[("kind", "roberta"), ("num_labels", "2")],
        );
        let e = err(Head::load(dir.path(), 8, None, &dev));
        assert!(
            e.contains("a `roberta` head needs tensor `dense.weight`"),
            "{e}"
        );
        write(dir.path(), &mean, &[("kind", "mean"), ("num_labels", "4")]);
        let e = err(Head::load(dir.path(), 8, None, &dev));
        assert!(
            e.contains("`weight` has shape [2, 8]") && e.contains("[4, 8]"),
            "{e}"
        );
        let extra = [
            ("weight", w.clone()),
            ("bias", bias.clone()),
            ("dense.weight", w.clone()),
        ];
        write(dir.path(), &extra, &[("kind", "mean")]);
        let e = err(Head::load(dir.path(), 8, None, &dev));
        assert!(
            e.contains("`dense.weight` does not belong to a `mean` head"),
            "{e}"
        );
        write(dir.path(), &mean, &[("kind", "cls")]);
        let e = err(Head::load(dir.path(), 8, None, &dev));
        assert!(e.contains("unknown head `cls`"), "{e}");

        // A head saved before kinds were recorded: a single-label mean head.
        write(dir.path(), &mean, &[]);
        let old = Head::load(dir.path(), 8, None, &dev).unwrap();
        assert_eq!(
            old.spec(),
            HeadSpec {
                kind: HeadKind::Mean,
                problem: Problem::SingleLabel,
                num_labels: 2
            }
        );
    }
}
