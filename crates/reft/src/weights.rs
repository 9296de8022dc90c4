//! Where frozen weights come from: a Hugging Face folder of safetensors or `pytorch_model.bin`
//! files, or a GGUF file.
//!
//! Model code asks for tensors by their Hugging Face names and expected shapes; this module maps
//! names to the file's own spelling, dequantizes, converts to the compute dtype, undoes llama.cpp's
//! query/key permutation, and turns every defect of the file into an error that names the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::cpu::ggml::{BlockFormat, QuantWeight};
use crate::model::config::Arch;
use crate::torch_file::TorchFile;
use crate::{Error, Result};

/// A read-only store of named tensors.
pub enum WeightSource {
    /// Safetensors files of a Hugging Face folder (one file or a sharded index).
    Safetensors {
        /// The memory-mapped files.
        st: MmapedSafetensors,
        /// The folder, for messages.
        path: PathBuf,
    },
    /// A GGUF file.
    Gguf(GgufFile),
    /// `torch.save` files of a Hugging Face folder (`pytorch_model.bin` or a sharded index),
    /// read without executing their pickles.
    Torch(TorchWeights),
}

/// The `pytorch_model.bin` files of a folder; each tensor is read from disk when asked for.
pub struct TorchWeights {
    files: Vec<TorchFile>,
    /// Tensor name → index into `files`.
    by_name: HashMap<String, usize>,
    /// The folder, for messages.
    path: PathBuf,
}

impl TorchWeights {
    /// Opens `files` (the shards of one checkpoint); a tensor name may occur in one file only.
    pub fn open(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let file = TorchFile::open(f)?;
            for name in file.tensor_names() {
                if by_name.insert(name.to_string(), i).is_some() {
                    return Err(Error::BadWeights {
                        path: f.clone(),
                        msg: format!("tensor `{name}` is also in another shard"),
                    });
                }
            }
            opened.push(file);
        }
        Ok(Self {
            files: opened,
            by_name,
            path: dir.to_path_buf(),
        })
    }

    fn file(&self, name: &str) -> Option<&TorchFile> {
        self.by_name.get(name).map(|&i| &self.files[i])
    }
}

/// An opened GGUF file: its metadata and tensor directory, and a reader for tensor data.
pub struct GgufFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Metadata and tensor directory.
    pub content: gguf_file::Content,
    reader: Mutex<BufReader<File>>,
}

impl GgufFile {
    /// Opens a GGUF file and checks that every tensor lies inside it.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadWeights {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            bad(format!(
                "not a readable GGUF file (truncated or corrupt?): {e}"
            ))
        })?;
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count() as u64;
            let block = info.ggml_dtype.block_size() as u64;
            let bytes = elems / block * info.ggml_dtype.type_size() as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(bad(format!(
                    "file is truncated: tensor `{name}` needs bytes up to {end}, the file has {file_len}"
                )));
            }
        }
        reader.rewind().map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn meta(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::BadConfig {
                path: self.path.clone(),
                msg: format!("GGUF metadata key `{key}` is missing"),
            })
    }

    /// A metadata value converted by `f`, with an error naming the key on a type mismatch.
    pub fn meta_as<T>(
        &self,
        key: &str,
        f: impl Fn(&gguf_file::Value) -> candle_core::Result<T>,
    ) -> Result<T> {
        f(self.meta(key)?).map_err(|e| Error::BadConfig {
            path: self.path.clone(),
            msg: format!("GGUF metadata key `{key}`: {e}"),
        })
    }

    /// An integer metadata value of any width.
    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta_as(key, |v| {
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x as u64))
                .or_else(|_| v.to_i64().map(|x| x as u64))
        })
        .map(|x| x as usize)
    }

    /// A float metadata value (f32 or f64).
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta_as(key, |v| v.to_f64().or_else(|_| v.to_f32().map(f64::from)))
    }

    /// Reads one tensor as stored.
    fn qtensor(&self, name: &str) -> Result<QTensor> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.content
            .tensor(&mut *reader, name, &Device::Cpu)
            .map_err(|e| Error::BadWeights {
                path: self.path.clone(),
                msg: format!("tensor `{name}`: {e}"),
            })
    }
}

impl WeightSource {
    /// Opens the weights of a Hugging Face folder: `model.safetensors` or its sharded index,
    /// else `pytorch_model.bin` or its sharded index (safetensors win when both exist: they
    /// need no pickle interpreter and can be memory-mapped).
    pub fn open_hf_folder(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin = dir.join("pytorch_model.bin");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            index_shards(&index, dir)?
        } else if bin.exists() {
            return Ok(Self::Torch(TorchWeights::open(dir, &[bin])?));
        } else if bin_index.exists() {
            let shards = index_shards(&bin_index, dir)?;
            return Ok(Self::Torch(TorchWeights::open(dir, &shards)?));
        } else {
            let other = ["tf_model.h5", "flax_model.msgpack", "model.ckpt.index"]
                .into_iter()
                .find(|f| dir.join(f).exists());
            let mut msg = "no model.safetensors, model.safetensors.index.json, \
                           pytorch_model.bin or pytorch_model.bin.index.json"
                .to_string();
            if let Some(f) = other {
                msg += &format!(" (only {f}: TensorFlow/Flax weights are not read)");
            }
            return Err(Error::BadWeights {
                path: dir.to_path_buf(),
                msg,
            });
        };
        for f in &files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are mapped read-only; like every mmap user we assume nobody truncates
        // them while the model is alive (their headers and sizes were just checked).
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::BadWeights {
            path: dir.to_path_buf(),
            msg: format!("unreadable safetensors: {e}"),
        })?;
        Ok(Self::Safetensors {
            st,
            path: dir.to_path_buf(),
        })
    }

    /// Path of the file or folder, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors { path, .. } => path,
            Self::Gguf(g) => &g.path,
            Self::Torch(t) => &t.path,
        }
    }

    /// Whether a tensor (by its Hugging Face name) is present.
    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Safetensors { st, .. } => st.get(hf_name).is_ok(),
            Self::Gguf(g) => {
                gguf_name(hf_name).is_some_and(|n| g.content.tensor_infos.contains_key(&n))
            }
            Self::Torch(t) => t.by_name.contains_key(hf_name),
        }
    }

    /// Loads a tensor by its Hugging Face name, checks its shape and converts it to `dtype`.
    pub fn get(&self, hf_name: &str, shape: &[usize], ctx: &LoadContext) -> Result<Tensor> {
        Ok(self.get_linear(hf_name, shape, ctx)?.0)
    }

    /// Like [`get`](Self::get), and also the file's own quantized blocks when
    /// `ctx.keep_quantized` is set and a kernel exists for them (GGUF Q4_0/Q4_1/Q8_0 matrices).
    pub fn get_linear(
        &self,
        hf_name: &str,
        shape: &[usize],
        ctx: &LoadContext,
    ) -> Result<(Tensor, Option<QuantWeight>)> {
        let mut quant = None;
        let (file_name, t) = match self {
            Self::Safetensors { st, path } => {
                let view = st.get(hf_name).map_err(|_| Error::MissingTensor {
                    name: hf_name.to_string(),
                    path: path.clone(),
                })?;
                if view.shape() != shape {
                    return Err(self.shape_error(hf_name, shape, view.shape()));
                }
                let t = st
                    .load(hf_name, &ctx.device)
                    .map_err(|e| Error::BadWeights {
                        path: path.clone(),
                        msg: format!("tensor `{hf_name}`: {e}"),
                    })?;
                (hf_name.to_string(), t)
            }
            Self::Torch(tw) => {
                let file = tw.file(hf_name).ok_or_else(|| Error::MissingTensor {
                    name: hf_name.to_string(),
                    path: tw.path.clone(),
                })?;
                let dims = file.shape(hf_name).unwrap_or_default();
                if dims != shape {
                    return Err(self.shape_error(hf_name, shape, dims));
                }
                // One tensor at a time, converted below: the file's dtype never lives beside
                // the compute dtype for more than one tensor.
                (hf_name.to_string(), file.tensor(hf_name, &ctx.device)?)
            }
            Self::Gguf(g) => {
                let name = gguf_name(hf_name).ok_or_else(|| Error::MissingTensor {
                    name: hf_name.to_string(),
                    path: g.path.clone(),
                })?;
                let info =
                    g.content
                        .tensor_infos
                        .get(&name)
                        .ok_or_else(|| Error::MissingTensor {
                            name: name.clone(),
                            path: g.path.clone(),
                        })?;
                if info.shape.dims() != shape {
                    return Err(self.shape_error(&name, shape, info.shape.dims()));
                }
                let q = g.qtensor(&name)?;
                let mut t = q.dequantize(&ctx.device)?;
                let format = BlockFormat::from_ggml(q.dtype());
                if let (true, Some(fmt), [rows, cols]) = (ctx.keep_quantized, format, shape) {
                    let data = q.data()?.to_vec();
                    quant = QuantWeight::new(fmt, *rows, *cols, data);
                }
                let heads = match name.rsplit('.').nth(1) {
                    Some("attn_q") => Some(ctx.num_heads),
                    Some("attn_k") => Some(ctx.num_kv_heads),
                    _ => None,
                };
                if let (Arch::Llama, Some(heads), true) =
                    (ctx.arch, heads, name.ends_with(".weight"))
                {
                    t = unpermute_rope_rows(&t, heads)?;
                    let perm = rope_row_permutation(shape[0], heads);
                    quant = quant.map(|q| q.permute_rows(&perm));
                }
                (name, t)
            }
        };
        let t = t.to_dtype(ctx.dtype)?;
        if t.dims() != shape {
            return Err(self.shape_error(&file_name, shape, t.dims()));
        }
        Ok((t, quant))
    }

    fn shape_error(&self, name: &str, expected: &[usize], actual: &[usize]) -> Error {
        Error::ShapeMismatch {
            name: name.to_string(),
            path: self.path().to_path_buf(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        }
    }
}

/// What loading needs to know beyond names and shapes.
#[derive(Debug, Clone)]
pub struct LoadContext {
    /// Device the tensors go to.
    pub device: Device,
    /// Compute dtype (f32 on CPU; f64 for gradient checks).
    pub dtype: DType,
    /// Architecture (decides the GGUF query/key un-permutation).
    pub arch: Arch,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Keep GGUF quantized blocks beside the f32 weights for the inference-only fast path.
    pub keep_quantized: bool,
}

impl LoadContext {
    /// A context for models read only from Hugging Face folders (BERT-family encoders), where
    /// the GGUF query/key un-permutation and quantized blocks never apply.
    pub fn safetensors(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
            arch: Arch::Llama,
            num_heads: 1,
            num_kv_heads: 1,
            keep_quantized: false,
        }
    }
}

/// The shard files a `*.index.json` names, each a plain file name inside `dir`.
fn index_shards(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |msg: String| Error::BadWeights {
        path: index.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("bad index JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = Vec::new();
    for v in map.values() {
        let name = v
            .as_str()
            .ok_or_else(|| bad("a `weight_map` value is not a string".into()))?;
        // A shard outside the folder (`../x`, `/etc/x`) is not part of the model.
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            return Err(bad(format!(
                "shard `{name}` is not a file name inside the folder"
            )));
        }
        shards.push(dir.join(name));
    }
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(bad("`weight_map` names no shard".into()));
    }
    Ok(shards)
}

/// Validates a safetensors header against the file length, so that a truncated file fails with a
/// message instead of a fault when a mapped page past the end is touched.
fn check_safetensors_header(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::BadWeights {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping, dropped at the end of this function.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        bad(format!(
            "not a valid safetensors file (truncated or corrupt?): {e}"
        ))
    })?;
    Ok(())
}

/// Maps a Hugging Face Llama/Qwen2 tensor name to llama.cpp's GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed: HashMap<&str, &str> = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    .into_iter()
    .collect();
    if let Some(n) = fixed.get(hf) {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// Undoes llama.cpp's conversion permutation of a query/key weight `[heads·hd, d]`: the file
/// interleaves the two RoPE halves of each head (rows `2i, 2i+1` are HF rows `i, i+hd/2`);
/// Hugging Face's half-split RoPE needs them split again.
fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The row order [`unpermute_rope_rows`] produces: HF row `h·hd + a·hd/2 + i` is file row
/// `h·hd + 2i + a`.
fn rope_row_permutation(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut perm = Vec::with_capacity(rows);
    for h in 0..heads {
        for a in 0..2 {
            for i in 0..hd / 2 {
                perm.push(h * hd + 2 * i + a);
            }
        }
    }
    perm
}
