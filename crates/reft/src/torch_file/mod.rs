//! PyTorch `torch.save` files (pyreft adapters, `pytorch_model.bin` weights), read without
//! executing anything.
//!
//! Two layouts exist. The zip format (PyTorch ≥ 1.6) holds `<prefix>/data.pkl` (a pickle of the
//! saved object, here a dict of tensors), one raw little-endian storage per entry
//! `<prefix>/data/<key>`, and small records (`version`, `byteorder`, …). The legacy format is
//! five pickles in a row (magic number, protocol, system info, the object, the storage keys)
//! followed by each storage as an 8-byte element count and its raw bytes.
//!
//! Why our own interpreter: a pickle is a program, and its `GLOBAL`/`REDUCE` opcodes call any
//! Python callable (`os.system`, `builtins.eval`, …). Such files come from strangers on the
//! internet, so the interpreter (`machine.rs`) knows only the containers and the handful of
//! tensor-rebuild calls these files use, and refuses any other callable by name (nothing is ever
//! called). candle's own `candle_core::pickle` has no such allow-list.
//!
//! [`TorchFile::open`] reads only the pickle and the storage directory; each tensor's bytes are
//! read when it is asked for, so a model never sits in memory twice.

mod machine;
mod write;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use self::machine::{gather, Machine, Obj, StorageKind, TensorRef};
pub use self::write::write_torch_file;
use crate::{Error, Result};

/// One value of a saved dict: a tensor (0-d tensors included) or a plain Python number.
#[derive(Debug, Clone)]
pub enum PickleValue {
    /// A tensor, on the CPU, in the dtype it was stored with (bool → u8, int8 → i16).
    Tensor(Tensor),
    /// A Python `int`.
    Int(i64),
    /// A Python `float`.
    Float(f64),
}

/// Reads a `torch.save` file holding a dict of tensors, all of it, in the file's order.
///
/// Values that are neither tensors nor numbers (strings, lists, `None`) are errors: they do not
/// occur in adapter or weight files and we would have nowhere to put them.
pub fn read_torch_file(path: &Path) -> Result<Vec<(String, PickleValue)>> {
    TorchFile::open(path)?.read_all()
}

/// Like [`read_torch_file`], from bytes in memory; `path` only names the source in errors.
pub fn read_torch_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, PickleValue)>> {
    TorchFile::from_reader(std::io::Cursor::new(bytes), path)?.read_all()
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadWeights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The largest pickle we read; a 70B model's is a few hundred KB.
const MAX_PICKLE: u64 = 1 << 28;

/// A dict value before any tensor data is read.
#[derive(Debug, Clone)]
enum Entry {
    Tensor(TensorRef),
    Int(i64),
    Float(f64),
}

/// Where storage bytes live.
enum Data<R> {
    /// Zip format: storage key → index of its (stored, uncompressed) zip entry.
    Zip {
        zip: zip::ZipArchive<R>,
        prefix: String,
        entries: HashMap<String, usize>,
    },
    /// Legacy format: storage key → byte offset of its data in the file.
    Legacy {
        reader: R,
        starts: HashMap<String, u64>,
    },
}

/// An opened `torch.save` file: its dict's names, shapes and dtypes, and a reader for tensor
/// data. Every storage a tensor refers to has been checked to exist and to be large enough.
pub struct TorchFile<R = BufReader<File>> {
    path: PathBuf,
    entries: Vec<(String, Entry)>,
    index: HashMap<String, usize>,
    data: Mutex<Data<R>>,
}

impl TorchFile {
    /// Opens a file: reads its pickle and storage directory, no tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Self::from_reader(BufReader::new(file), path)
    }
}

impl<R: Read + Seek> TorchFile<R> {
    /// Like [`TorchFile::open`], from any reader; `path` names the source in errors.
    pub fn from_reader(mut reader: R, path: &Path) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut head = [0u8; 1];
        let n = reader.read(&mut head).map_err(io)?;
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let (top, data) = if n == 1 && head[0] == 0x80 {
            open_legacy(reader, len, path)?
        } else {
            open_zip(reader, len, path)?
        };
        let entries = to_entries(top, path)?;
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let file = Self {
            path: path.to_path_buf(),
            entries,
            index,
            data: Mutex::new(data),
        };
        file.check_storages(len)?;
        Ok(file)
    }

    /// Path of the file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the tensors, in the file's order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter_map(|(k, v)| match v {
            Entry::Tensor(_) => Some(k.as_str()),
            _ => None,
        })
    }

    fn tensor_ref(&self, name: &str) -> Option<&TensorRef> {
        match self.index.get(name).map(|&i| &self.entries[i].1) {
            Some(Entry::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// Shape of a tensor, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensor_ref(name).map(|t| t.shape.as_slice())
    }

    /// The dtype a tensor loads as (bool → u8, int8 → i16), without reading it.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensor_ref(name).map(|t| t.kind.dtype())
    }

    /// Reads one tensor onto `device`, in the dtype it was stored with.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.tensor_ref(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        let shape = t.shape.as_slice();
        let built = |r: candle_core::Result<Tensor>| {
            r.map_err(|e| bad(&self.path, format!("tensor `{name}`: {e}")))
        };
        if t.count() == 0 {
            return built(Tensor::zeros(shape, t.kind.dtype(), device));
        }
        let es = t.kind.elem_size();
        // `bytes` holds storage elements `base..` (the whole storage, or just the view's span).
        let (bytes, base) = self.read_storage(t)?;
        let start = (t.offset - base) * es;
        let data = if t.is_contiguous() {
            std::borrow::Cow::Borrowed(&bytes[start..start + t.count() * es])
        } else {
            let mut out = Vec::with_capacity(t.count() * es);
            gather(&bytes, base, es, t, &mut out);
            std::borrow::Cow::Owned(out)
        };
        built(match t.kind {
            // candle has no i8: widen to i16, which holds every value.
            StorageKind::Char => {
                let v: Vec<i16> = data.iter().map(|&b| b as i8 as i16).collect();
                Tensor::from_vec(v, shape, device)
            }
            k => Tensor::from_raw_buffer(&data, k.dtype(), shape, device),
        })
    }

    /// Every value, tensors read onto the CPU.
    pub fn read_all(self) -> Result<Vec<(String, PickleValue)>> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (k, v) in &self.entries {
            let v = match v {
                Entry::Tensor(_) => PickleValue::Tensor(self.tensor(k, &Device::Cpu)?),
                Entry::Int(i) => PickleValue::Int(*i),
                Entry::Float(f) => PickleValue::Float(*f),
            };
            out.push((k.clone(), v));
        }
        Ok(out)
    }

    /// Reads the bytes a view needs; returns them and the storage element they start at.
    fn read_storage(&self, t: &TensorRef) -> Result<(Vec<u8>, usize)> {
        let es = t.kind.elem_size();
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *data {
            Data::Zip { zip, entries, .. } => {
                // The whole entry, so that the zip's CRC check sees every byte.
                let i = *entries.get(&t.key).ok_or_else(|| self.no_storage(t))?;
                let mut f = zip
                    .by_index(i)
                    .map_err(|e| bad(&self.path, format!("storage `{}`: {e}", t.key)))?;
                let name = f.name().to_string();
                // Checked against the file's length when it was opened.
                let mut buf = Vec::with_capacity(f.compressed_size() as usize);
                f.read_to_end(&mut buf).map_err(|e| {
                    bad(
                        &self.path,
                        format!("zip entry `{name}` is truncated or corrupt: {e}"),
                    )
                })?;
                if buf.len() < t.numel * es {
                    return Err(bad(
                        &self.path,
                        format!(
                            "zip entry `{name}` holds {} bytes, fewer than its {} elements need",
                            buf.len(),
                            t.numel
                        ),
                    ));
                }
                Ok((buf, 0))
            }
            Data::Legacy { reader, starts } => {
                let start = *starts.get(&t.key).ok_or_else(|| self.no_storage(t))?;
                let start = start + (t.offset * es) as u64;
                let mut buf = vec![0u8; (t.end().max(t.offset) - t.offset) * es];
                reader
                    .seek(SeekFrom::Start(start))
                    .and_then(|_| reader.read_exact(&mut buf))
                    .map_err(|e| {
                        bad(
                            &self.path,
                            format!("storage `{}` cannot be read (truncated?): {e}", t.key),
                        )
                    })?;
                Ok((buf, t.offset))
            }
        }
    }

    fn no_storage(&self, t: &TensorRef) -> Error {
        bad(
            &self.path,
            format!("storage `{}` is not in the file", t.key),
        )
    }

    /// Checks that every storage a tensor refers to is in the file with enough bytes, so that
    /// reading a tensor later cannot ask for more memory than the file holds.
    fn check_storages(&self, len: u64) -> Result<()> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        for (_, e) in &self.entries {
            let Entry::Tensor(t) = e else { continue };
            let need = (t.numel * t.kind.elem_size()) as u64;
            match &mut *data {
                Data::Zip {
                    zip,
                    entries,
                    prefix,
                } => {
                    let Some(&i) = entries.get(&t.key) else {
                        return Err(bad(
                            &self.path,
                            format!("zip entry `{prefix}data/{}` is missing", t.key),
                        ));
                    };
                    let f = zip
                        .by_index_raw(i)
                        .map_err(|e| bad(&self.path, format!("storage `{}`: {e}", t.key)))?;
                    if f.compression() != zip::CompressionMethod::Stored {
                        return Err(bad(
                            &self.path,
                            format!(
                                "zip entry `{}` is compressed; torch.save never compresses \
                                 storages",
                                f.name()
                            ),
                        ));
                    }
                    let end = f.data_start().saturating_add(f.compressed_size());
                    if f.size() != f.compressed_size() {
                        return Err(bad(
                            &self.path,
                            format!("zip entry `{}` has inconsistent sizes (corrupt)", f.name()),
                        ));
                    }
                    if f.size() < need || end > len {
                        return Err(bad(
                            &self.path,
                            format!(
                                "zip entry `{}` holds {} bytes, fewer than its {} elements need \
                                 (truncated?)",
                                f.name(),
                                f.size().min(len.saturating_sub(f.data_start())),
                                t.numel
                            ),
                        ));
                    }
                }
                Data::Legacy { starts, .. } => {
                    // Sizes were checked against the file when the storage table was read.
                    if !starts.contains_key(&t.key) {
                        return Err(self.no_storage(t));
                    }
                }
            }
        }
        Ok(())
    }
}

fn open_zip<R: Read + Seek>(mut reader: R, len: u64, path: &Path) -> Result<(Obj, Data<R>)> {
    if len >= 262 {
        // Before PyTorch 0.4 torch.save wrote a tar archive.
        let mut head = [0u8; 262];
        reader
            .read_exact(&mut head)
            .and_then(|_| reader.seek(SeekFrom::Start(0)))
            .map_err(|e| Error::io(path, e))?;
        if &head[257..262] == b"ustar" {
            return Err(bad(
                path,
                "a tar archive: the torch.save format of PyTorch before 0.4 is not supported; \
                 re-save the file with a recent PyTorch",
            ));
        }
    }
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        bad(
            path,
            format!("not a readable torch.save zip archive (truncated or corrupt?): {e}"),
        )
    })?;
    // PyTorch names every record `<prefix>/<name>`; the prefix is whatever directory holds
    // `data.pkl` (the file's stem when torch wrote it, but any name is valid).
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| {
            bad(
                path,
                "zip archive has no `<prefix>/data.pkl`; not a torch.save file",
            )
        })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = read_record(&mut zip, &format!("{prefix}byteorder"), path)? {
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            return Err(bad(
                path,
                format!(
                    "byteorder `{}` is not supported (only little-endian)",
                    order.trim()
                ),
            ));
        }
    }
    let pkl = read_record(&mut zip, &pkl_name, path)?
        .ok_or_else(|| bad(path, format!("zip entry `{pkl_name}` is missing")))?;
    let top = Machine::new(&pkl, path)
        .run()
        .map_err(|e| in_record(e, &pkl_name))?;
    let data_dir = format!("{prefix}data/");
    let entries = (0..zip.len())
        .filter_map(|i| {
            let key = zip.name_for_index(i)?.strip_prefix(&data_dir)?;
            Some((key.to_string(), i))
        })
        .collect();
    Ok((
        top,
        Data::Zip {
            zip,
            prefix,
            entries,
        },
    ))
}

/// Prefixes a pickle error's message with the zip record it came from.
fn in_record(e: Error, record: &str) -> Error {
    match e {
        Error::BadWeights { path, msg } => Error::BadWeights {
            path,
            msg: format!("{record}: {msg}"),
        },
        e => e,
    }
}

fn read_record<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(bad(path, format!("zip entry `{name}`: {e}"))),
    };
    if f.size() > MAX_PICKLE {
        return Err(bad(
            path,
            format!(
                "zip entry `{name}` is implausibly large ({} bytes)",
                f.size()
            ),
        ));
    }
    // The size comes from the zip directory and may lie: `take` bounds what we accept.
    let mut buf = Vec::with_capacity(f.size() as usize);
    f.take(MAX_PICKLE).read_to_end(&mut buf).map_err(|e| {
        bad(
            path,
            format!("zip entry `{name}` is truncated or corrupt: {e}"),
        )
    })?;
    Ok(Some(buf))
}

/// The legacy format's magic number, 0x1950a86a20f9469cfc6c, as little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn open_legacy<R: Read + Seek>(mut reader: R, len: u64, path: &Path) -> Result<(Obj, Data<R>)> {
    // The pickles come first and are small; read a prefix that holds them all, growing it
    // while the interpreter runs out of bytes.
    let mut want = 1u64 << 16;
    let (top, keys, data_at) = loop {
        let n = want.min(len);
        let mut buf = Vec::with_capacity(n as usize);
        reader
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&mut reader).take(n).read_to_end(&mut buf))
            .map_err(|e| Error::io(path, e))?;
        let mut m = Machine::new(&buf, path);
        match legacy_pickles(&mut m, path) {
            Ok(r) => break r,
            Err(_) if m.ran_out() && n < len && n < MAX_PICKLE => want *= 4,
            Err(e) => return Err(e),
        }
    };
    // Element sizes come from the tensors' storage classes.
    let kinds = legacy_storages(&top, path)?;
    let mut starts = HashMap::new();
    let mut at = data_at;
    for key in &keys {
        let Some(&(kind, numel)) = kinds.get(key.as_str()) else {
            return Err(bad(
                path,
                format!("storage `{key}` is listed but no tensor uses it"),
            ));
        };
        let mut count = [0u8; 8];
        reader
            .seek(SeekFrom::Start(at))
            .and_then(|_| reader.read_exact(&mut count))
            .map_err(|e| {
                bad(
                    path,
                    format!("storage `{key}`: cannot read its size ({e}); truncated?"),
                )
            })?;
        let count = u64::from_le_bytes(count);
        if count < numel as u64 {
            return Err(bad(
                path,
                format!("storage `{key}` holds {count} elements; its tensors need {numel}"),
            ));
        }
        let end = count
            .checked_mul(kind.elem_size() as u64)
            .and_then(|b| b.checked_add(at + 8))
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("storage `{key}` reaches past the end of the file (truncated?)"),
                )
            })?;
        starts.insert(key.clone(), at + 8);
        at = end;
    }
    Ok((top, Data::Legacy { reader, starts }))
}

/// The five pickles of the legacy format: the saved object, the storage keys, and where the
/// storage data starts.
fn legacy_pickles(m: &mut Machine, path: &Path) -> Result<(Obj, Vec<String>, u64)> {
    let not_torch = || {
        bad(
            path,
            "a pickle, but not one torch.save wrote (no legacy magic number)",
        )
    };
    match m.run()? {
        Obj::BigInt(b) if b == LEGACY_MAGIC => {}
        _ => return Err(not_torch()),
    }
    match m.run()? {
        Obj::Int(1001) => {}
        _ => return Err(bad(path, "legacy torch.save protocol version is not 1001")),
    }
    if let Obj::Dict(info) = m.run()? {
        let big_endian = info.iter().any(
            |(k, v)| matches!((k, v), (Obj::Str(k), Obj::Bool(false)) if k == "little_endian"),
        );
        if big_endian {
            return Err(bad(path, "big-endian files are not supported"));
        }
    }
    let top = m.run()?;
    let keys = match m.run()? {
        Obj::List(keys) => keys
            .into_iter()
            .map(|k| match k {
                Obj::Str(s) => Ok(s),
                _ => Err(bad(path, "storage key list holds a non-string")),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(bad(path, "no storage key list after the pickled object")),
    };
    Ok((top, keys, m.pos() as u64))
}

/// Storage key → (kind, largest element count any tensor claims for it). Legacy storages are
/// typed, and their layout in the file depends on the element size: one key, one kind.
fn legacy_storages<'o>(o: &'o Obj, path: &Path) -> Result<HashMap<&'o str, (StorageKind, usize)>> {
    let mut out: HashMap<&str, (StorageKind, usize)> = HashMap::new();
    if let Obj::Dict(items) = o {
        for (_, v) in items {
            if let Obj::Tensor(t) = v {
                let e = out.entry(t.key.as_str()).or_insert((t.kind, 0));
                if e.0 != t.kind {
                    return Err(bad(
                        path,
                        format!("storage `{}` is used with two element types", t.key),
                    ));
                }
                e.1 = e.1.max(t.numel);
            }
        }
    }
    Ok(out)
}

fn to_entries(top: Obj, path: &Path) -> Result<Vec<(String, Entry)>> {
    let items = match top {
        Obj::Dict(items) => items,
        o => {
            return Err(bad(
                path,
                format!(
                    "the pickle holds a {}, not a dict of tensors",
                    o.type_name()
                ),
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let k = match k {
            Obj::Str(s) => s,
            o => {
                return Err(bad(
                    path,
                    format!("dict key is a {}, not a string", o.type_name()),
                ))
            }
        };
        let v = match v {
            Obj::Tensor(t) => Entry::Tensor(t),
            Obj::Int(i) => Entry::Int(i),
            Obj::Bool(b) => Entry::Int(b as i64),
            Obj::Float(f) => Entry::Float(f),
            o => {
                return Err(bad(
                    path,
                    format!("entry `{k}` is a {}, not a tensor or number", o.type_name()),
                ))
            }
        };
        out.push((k, v));
    }
    Ok(out)
}
