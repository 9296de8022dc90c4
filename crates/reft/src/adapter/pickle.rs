//! PyTorch zip-pickle files (`torch.save` format), read without executing anything.
//!
//! A `torch.save` file is a zip archive holding `<prefix>/data.pkl` (a pickle of the saved object,
//! here an ordered dict of tensors), one raw little-endian storage per tensor under
//! `<prefix>/data/<key>`, and small records (`version`, `byteorder`, …).
//!
//! Why our own interpreter: a pickle is a program, and its `GLOBAL`/`REDUCE` opcodes call any
//! Python callable (`os.system`, `builtins.eval`, …). Adapter files come from strangers on the
//! internet, so [`read_torch_file`] runs a small pickle machine that knows only the containers and
//! the handful of tensor-rebuild calls these files use, and refuses any other callable by name —
//! before anything could be "called" (nothing ever is: allowed callables are interpreted, not run).
//! candle's own `candle_core::pickle` has no such allow-list.
//!
//! [`write_torch_file`] writes the same layout PyTorch writes (protocol-2 pickle, stored zip
//! entries whose data start on 64-byte boundaries), loadable by `torch.load(..., weights_only=True)`.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

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

/// Reads a `torch.save` zip file holding a dict of tensors, in the file's order.
///
/// Values that are neither tensors nor numbers (strings, lists, `None`) are errors: they do not
/// occur in adapter files and we would have nowhere to put them.
pub fn read_torch_file(path: &Path) -> Result<Vec<(String, PickleValue)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_torch_zip(std::io::BufReader::new(file), path)
}

/// Like [`read_torch_file`], from bytes in memory; `path` only names the source in errors.
pub fn read_torch_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, PickleValue)>> {
    read_torch_zip(std::io::Cursor::new(bytes), path)
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadWeights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read_torch_zip<R: Read + Seek>(
    mut reader: R,
    path: &Path,
) -> Result<Vec<(String, PickleValue)>> {
    let mut magic = [0u8; 2];
    let n = reader.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n == 2 && magic == [0x80, 0x02] {
        return Err(bad(
            path,
            "legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a \
             recent PyTorch",
        ));
    }
    reader
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
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
    if let Some(order) = read_record_opt(&mut zip, &format!("{prefix}byteorder"), path)? {
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
    let pkl = read_record(&mut zip, &pkl_name, path)?;
    let mut storages = StorageSource {
        zip,
        prefix,
        path,
        cache: HashMap::new(),
    };
    let top = Machine::new(&pkl, path, &mut storages).run()?;
    to_entries(top, path)
}

fn read_record_opt<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(bad(path, format!("zip entry `{name}`: {e}"))),
    };
    // The size comes from the zip directory; cap the reservation so a lying header cannot make
    // us allocate more than the entry can really hold.
    let mut buf = Vec::with_capacity(f.size().min(1 << 26) as usize);
    f.read_to_end(&mut buf).map_err(|e| {
        bad(
            path,
            format!("zip entry `{name}` is truncated or corrupt: {e}"),
        )
    })?;
    Ok(Some(buf))
}

fn read_record<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>> {
    read_record_opt(zip, name, path)?
        .ok_or_else(|| bad(path, format!("zip entry `{name}` is missing")))
}

/// Storage records, read lazily (a tensor names its storage by key) and cached (views share one).
struct StorageSource<'p, R: Read + Seek> {
    zip: zip::ZipArchive<R>,
    prefix: String,
    path: &'p Path,
    cache: HashMap<String, std::rc::Rc<Vec<u8>>>,
}

impl<R: Read + Seek> StorageSource<'_, R> {
    fn get(&mut self, key: &str) -> Result<std::rc::Rc<Vec<u8>>> {
        if let Some(b) = self.cache.get(key) {
            return Ok(b.clone());
        }
        let name = format!("{}data/{key}", self.prefix);
        let bytes = std::rc::Rc::new(read_record(&mut self.zip, &name, self.path)?);
        self.cache.insert(key.to_string(), bytes.clone());
        Ok(bytes)
    }
}

/// The element types of PyTorch's legacy typed-storage classes (`torch.FloatStorage`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageKind {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageKind {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::Float,
            "DoubleStorage" => Self::Double,
            "HalfStorage" => Self::Half,
            "BFloat16Storage" => Self::BFloat16,
            "LongStorage" => Self::Long,
            "IntStorage" => Self::Int,
            "ShortStorage" => Self::Short,
            "CharStorage" => Self::Char,
            "ByteStorage" => Self::Byte,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Float => "FloatStorage",
            Self::Double => "DoubleStorage",
            Self::Half => "HalfStorage",
            Self::BFloat16 => "BFloat16Storage",
            Self::Long => "LongStorage",
            Self::Int => "IntStorage",
            Self::Short => "ShortStorage",
            Self::Char => "CharStorage",
            Self::Byte => "ByteStorage",
            Self::Bool => "BoolStorage",
        }
    }

    fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }

    fn from_dtype(dtype: DType) -> Option<Self> {
        Some(match dtype {
            DType::F32 => Self::Float,
            DType::F64 => Self::Double,
            DType::F16 => Self::Half,
            DType::BF16 => Self::BFloat16,
            DType::I64 => Self::Long,
            DType::I32 => Self::Int,
            DType::I16 => Self::Short,
            DType::U8 => Self::Byte,
            _ => return None,
        })
    }
}

/// The only callables a pickle may name. Anything else is refused at its `GLOBAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callable {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageKind),
}

impl Callable {
    fn lookup(module: &str, name: &str) -> Option<Self> {
        match (module, name) {
            ("collections", "OrderedDict") => Some(Self::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Self::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Self::RebuildParameter),
            ("torch", n) => StorageKind::from_name(n).map(Self::Storage),
            _ => None,
        }
    }
}

/// A Python object as far as these files need one.
#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Contents dropped: no allowed call takes bytes.
    Bytes,
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    /// Insertion-ordered, as `OrderedDict` and Python 3.7+ dicts are.
    Dict(Vec<(Obj, Obj)>),
    Global(Callable),
    Storage {
        kind: StorageKind,
        key: String,
        numel: usize,
    },
    Tensor(Tensor),
}

impl Obj {
    fn type_name(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "callable",
            Obj::Storage { .. } => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

/// Hard limits that keep a hostile pickle from exhausting memory through the stack or memo.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;

struct Machine<'a, 'p, R: Read + Seek> {
    code: &'a [u8],
    pos: usize,
    path: &'p Path,
    stack: Vec<Obj>,
    marks: Vec<usize>,
    /// Values, not references: a later mutation of a memoised container is not seen through the
    /// memo. torch.save pickles never read a container back after mutating it.
    memo: HashMap<u32, Obj>,
    storages: &'a mut StorageSource<'p, R>,
}

impl<'a, 'p, R: Read + Seek> Machine<'a, 'p, R> {
    fn new(code: &'a [u8], path: &'p Path, storages: &'a mut StorageSource<'p, R>) -> Self {
        Machine {
            code,
            pos: 0,
            path,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages,
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        bad(self.path, format!("data.pkl at byte {}: {msg}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.code.len());
        match end {
            Some(end) => {
                let s = &self.code[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err("pickle ends early (truncated?)")),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.code[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated GLOBAL name"))?;
        let s = String::from_utf8(rest[..n].to_vec())
            .map_err(|_| self.err("GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }

    fn push(&mut self, o: Obj) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("pickle stack too deep"));
        }
        self.stack.push(o);
        Ok(())
    }

    fn pop(&mut self) -> Result<Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("pop across a MARK"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err("pop from an empty stack"))
    }

    fn top_mut(&mut self) -> Result<&mut Obj> {
        let pos = self.pos;
        let path = self.path;
        self.stack
            .last_mut()
            .ok_or_else(|| bad(path, format!("data.pkl at byte {pos}: empty stack")))
    }

    fn pop_mark(&mut self) -> Result<Vec<Obj>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("pickle memo too large"));
        }
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.err("memoising an empty stack"))?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {idx} is not set")))?;
        self.push(v)
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match Callable::lookup(module, name) {
            Some(c) => self.push(Obj::Global(c)),
            None => Err(bad(
                self.path,
                format!(
                    "the pickle calls `{module}.{name}`, which is not a tensor-rebuild call; \
                     refusing to load"
                ),
            )),
        }
    }

    /// Runs the pickle to its `STOP` and returns the object it built.
    fn run(mut self) -> Result<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO: any version; unknown opcodes are refused below anyway.
                    self.u8()?;
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b']' => self.push(Obj::List(Vec::new()))?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items))?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64))?;
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.err("integer wider than 64 bits"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Obj::Int(v))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Obj::Float(f64::from_be_bytes(a)))?;
                }
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'N' => self.push(Obj::None)?,
                b'X' | b'T' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8d => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let n = usize::try_from(u64::from_le_bytes(a))
                        .map_err(|_| self.err("string too long"))?;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.push(Obj::Bytes)?;
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.push(Obj::Bytes)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.dict_insert(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    self.dict_insert(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.list_extend(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_extend(items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Obj::Str(m), Obj::Str(n)) => self.global(&m, &n)?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let out = self.reduce(func, args)?;
                    self.push(out)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(s)?;
                }
                b'b' => {
                    // BUILD: `nn.Module.state_dict()` sets `_metadata` (per-module versions) on
                    // its OrderedDict this way. Attributes of a dict carry no tensor data: drop
                    // them. BUILD on anything else would mean calling `__setstate__`: refuse.
                    let state = self.pop()?;
                    match (self.stack.last(), &state) {
                        (Some(Obj::Dict(_)), Obj::Dict(_) | Obj::None) => {}
                        (target, _) => {
                            let what = target.map_or("nothing", Obj::type_name);
                            return Err(self.err(format!(
                                "BUILD with a {} state on a {what} is not supported",
                                state.type_name()
                            )));
                        }
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| self.err("DUP on an empty stack"))?;
                    self.push(v)?;
                }
                other => {
                    self.pos -= 1;
                    return Err(self.err(format!(
                        "pickle opcode 0x{other:02x} is not one that torch.save writes for tensors; \
                         refusing to load"
                    )));
                }
            }
        }
    }

    fn dict_insert(&mut self, items: Vec<Obj>) -> Result<()> {
        let pos = self.pos;
        let path = self.path;
        match self.top_mut()? {
            Obj::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            o => Err(bad(
                path,
                format!("data.pkl at byte {pos}: SETITEM on a {}", o.type_name()),
            )),
        }
    }

    fn list_extend(&mut self, items: Vec<Obj>) -> Result<()> {
        let pos = self.pos;
        let path = self.path;
        match self.top_mut()? {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            o => Err(bad(
                path,
                format!("data.pkl at byte {pos}: APPEND on a {}", o.type_name()),
            )),
        }
    }

    /// `('storage', <storage class>, key, location, numel)` → a reference to `data/<key>`.
    fn persistent_load(&mut self, pid: Obj) -> Result<Obj> {
        let items = match pid {
            Obj::Tuple(items) => items,
            o => return Err(self.err(format!("persistent id is a {}, not a tuple", o.type_name()))),
        };
        match items.as_slice() {
            [Obj::Str(tag), Obj::Global(Callable::Storage(kind)), Obj::Str(key), Obj::Str(_location), Obj::Int(numel)]
                if tag == "storage" =>
            {
                let numel =
                    usize::try_from(*numel).map_err(|_| self.err("negative storage size"))?;
                Ok(Obj::Storage {
                    kind: *kind,
                    key: key.clone(),
                    numel,
                })
            }
            _ => {
                Err(self
                    .err("persistent id is not a ('storage', class, key, location, numel) tuple"))
            }
        }
    }

    fn reduce(&mut self, func: Obj, args: Obj) -> Result<Obj> {
        let callable = match func {
            Obj::Global(c) => c,
            o => {
                return Err(self.err(format!(
                    "REDUCE on a {}, not an allowed callable",
                    o.type_name()
                )))
            }
        };
        let args = match args {
            Obj::Tuple(a) => a,
            o => {
                return Err(self.err(format!(
                    "REDUCE arguments are a {}, not a tuple",
                    o.type_name()
                )))
            }
        };
        match callable {
            Callable::OrderedDict => match args.as_slice() {
                [] => Ok(Obj::Dict(Vec::new())),
                [Obj::List(pairs)] => {
                    let mut d = Vec::with_capacity(pairs.len());
                    for p in pairs {
                        match p {
                            Obj::Tuple(kv) if kv.len() == 2 => {
                                d.push((kv[0].clone(), kv[1].clone()))
                            }
                            _ => {
                                return Err(self.err("OrderedDict items must be (key, value) pairs"))
                            }
                        }
                    }
                    Ok(Obj::Dict(d))
                }
                _ => Err(self.err("OrderedDict called with unexpected arguments")),
            },
            Callable::RebuildParameter => match args.into_iter().next() {
                Some(t @ Obj::Tensor(_)) => Ok(t),
                _ => Err(self.err("_rebuild_parameter expects a tensor")),
            },
            Callable::RebuildTensorV2 => self.rebuild_tensor(args),
            Callable::Storage(k) => {
                Err(self.err(format!("calling torch.{} is not supported", k.name())))
            }
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`.
    fn rebuild_tensor(&mut self, args: Vec<Obj>) -> Result<Obj> {
        if args.len() < 4 {
            return Err(self.err("_rebuild_tensor_v2 needs at least 4 arguments"));
        }
        let (kind, key, numel) = match &args[0] {
            Obj::Storage { kind, key, numel } => (*kind, key.clone(), *numel),
            o => {
                return Err(self.err(format!(
                    "_rebuild_tensor_v2 on a {}, not a storage",
                    o.type_name()
                )))
            }
        };
        let offset = match &args[1] {
            Obj::Int(o) => usize::try_from(*o).map_err(|_| self.err("negative storage offset"))?,
            _ => return Err(self.err("storage offset is not an int")),
        };
        let shape = self.usize_tuple(&args[2], "size")?;
        let stride = self.usize_tuple(&args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err("size and stride have different lengths"));
        }
        let bytes = self.storages.get(&key)?;
        let es = kind.elem_size();
        let need = numel
            .checked_mul(es)
            .ok_or_else(|| self.err("storage size overflows"))?;
        if bytes.len() < need {
            return Err(self.err(format!(
                "storage data/{key} holds {} bytes, fewer than its {numel} elements need (truncated?)",
                bytes.len()
            )));
        }
        let count = shape
            .iter()
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .ok_or_else(|| self.err("tensor size overflows"))?;
        // Output is allocated from `count`, so bound it by the storage: a stride-0 (expanded)
        // view could otherwise ask for any amount of memory. Saved parameters never are one.
        if count > numel {
            return Err(self.err(format!(
                "tensor of size {shape:?} has more elements than its storage of {numel} \
                 (an expanded view; not supported)"
            )));
        }
        // The furthest element the view touches must lie inside the storage.
        if count > 0 {
            let mut last = offset;
            for (&s, &st) in shape.iter().zip(&stride) {
                last = (s - 1)
                    .checked_mul(st)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| self.err("tensor view overflows"))?;
            }
            if last >= numel {
                return Err(self.err(format!(
                    "tensor view (offset {offset}, size {shape:?}, stride {stride:?}) reaches past \
                     its storage of {numel} elements"
                )));
            }
        }
        let mut data = Vec::with_capacity(count * es);
        if count > 0 {
            gather(&bytes[..need], es, offset, &shape, &stride, &mut data);
        }
        let t = raw_to_tensor(&data, kind, &shape)
            .map_err(|e| self.err(format!("building tensor: {e}")))?;
        Ok(Obj::Tensor(t))
    }

    fn usize_tuple(&self, o: &Obj, what: &str) -> Result<Vec<usize>> {
        match o {
            Obj::Tuple(items) => items
                .iter()
                .map(|i| match i {
                    Obj::Int(v) if *v >= 0 => Ok(*v as usize),
                    _ => Err(self.err(format!("tensor {what} holds a non-negative int only"))),
                })
                .collect(),
            _ => Err(self.err(format!("tensor {what} is not a tuple"))),
        }
    }
}

/// Copies the strided view's elements, in row-major order, into `out`.
fn gather(
    src: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    out: &mut Vec<u8>,
) {
    // Callers checked that every index is inside `src`; this walks the indices like an odometer.
    let mut idx = vec![0usize; shape.len()];
    loop {
        let e = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&src[e * es..(e + 1) * es]);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn raw_to_tensor(data: &[u8], kind: StorageKind, shape: &[usize]) -> candle_core::Result<Tensor> {
    let dev = &Device::Cpu;
    match kind {
        StorageKind::Float => Tensor::from_raw_buffer(data, DType::F32, shape, dev),
        StorageKind::Double => Tensor::from_raw_buffer(data, DType::F64, shape, dev),
        StorageKind::Half => Tensor::from_raw_buffer(data, DType::F16, shape, dev),
        StorageKind::BFloat16 => Tensor::from_raw_buffer(data, DType::BF16, shape, dev),
        StorageKind::Long => Tensor::from_raw_buffer(data, DType::I64, shape, dev),
        StorageKind::Int => Tensor::from_raw_buffer(data, DType::I32, shape, dev),
        StorageKind::Short => Tensor::from_raw_buffer(data, DType::I16, shape, dev),
        StorageKind::Byte | StorageKind::Bool => {
            Tensor::from_raw_buffer(data, DType::U8, shape, dev)
        }
        // candle has no i8: widen to i16, which holds every value.
        StorageKind::Char => {
            let v: Vec<i16> = data.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, dev)
        }
    }
}

fn to_entries(top: Obj, path: &Path) -> Result<Vec<(String, PickleValue)>> {
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
            Obj::Tensor(t) => PickleValue::Tensor(t),
            Obj::Int(i) => PickleValue::Int(i),
            Obj::Bool(b) => PickleValue::Int(b as i64),
            Obj::Float(f) => PickleValue::Float(f),
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

// ------------------------------------------------------------------------------------------------
// Writing

/// Writes `entries` as a `torch.save` file of an `OrderedDict`, the way PyTorch lays it out.
///
/// Tensors may be f32, f64, f16, bf16, i64, i32, i16 or u8 (any shape, 0-d included); each gets
/// its own storage. The write is atomic: a temporary file in the same folder, then a rename.
pub fn write_torch_file(path: &Path, entries: &[(String, PickleValue)]) -> Result<()> {
    let prefix = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .unwrap_or("archive")
        .to_string();
    let (pkl, storages) = build_pickle(entries, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = write_zip(&tmp, &prefix, &pkl, &storages)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        // Best effort: the temporary file is ours and useless now.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_zip(tmp: &Path, prefix: &str, pkl: &[u8], storages: &[Vec<u8>]) -> Result<()> {
    let zerr = |e: zip::result::ZipError| bad(tmp, format!("writing zip: {e}"));
    let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut zw = zip::ZipWriter::new(std::io::BufWriter::new(file));
    // Stored (PyTorch never compresses) and 64-byte aligned, so a reader can map storages
    // in place, as PyTorch's own writer does.
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut put = |name: String, data: &[u8]| -> Result<()> {
        zw.start_file(name, opts).map_err(zerr)?;
        zw.write_all(data).map_err(|e| Error::io(tmp, e))
    };
    put(format!("{prefix}/data.pkl"), pkl)?;
    put(format!("{prefix}/.format_version"), b"1")?;
    put(format!("{prefix}/.storage_alignment"), b"64")?;
    put(format!("{prefix}/byteorder"), b"little")?;
    for (i, s) in storages.iter().enumerate() {
        put(format!("{prefix}/data/{i}"), s)?;
    }
    put(format!("{prefix}/version"), b"3\n")?;
    let buf = zw.finish().map_err(zerr)?;
    let file = buf
        .into_inner()
        .map_err(|e| Error::io(tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))
}

/// Protocol-2 pickle of `OrderedDict([(name, tensor), …])` in torch.save's shape, plus the raw
/// little-endian bytes of each storage (index = storage key).
fn build_pickle(entries: &[(String, PickleValue)], path: &Path) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut p = vec![0x80, 2];
    let mut storages = Vec::new();
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(b")R(");
    for (name, value) in entries {
        unicode(&mut p, name);
        match value {
            PickleValue::Int(i) => int(&mut p, *i),
            PickleValue::Float(f) => {
                p.push(b'G');
                p.extend_from_slice(&f.to_be_bytes());
            }
            PickleValue::Tensor(t) => {
                let kind = StorageKind::from_dtype(t.dtype()).ok_or_else(|| {
                    bad(
                        path,
                        format!(
                            "tensor `{name}` has dtype {:?}, which we do not write",
                            t.dtype()
                        ),
                    )
                })?;
                let bytes =
                    tensor_le_bytes(t).map_err(|e| bad(path, format!("tensor `{name}`: {e}")))?;
                let key = storages.len();
                let dims = t.dims().to_vec();
                let numel = t.elem_count();
                storages.push(bytes);
                global(&mut p, "torch._utils", "_rebuild_tensor_v2");
                p.extend_from_slice(b"((");
                unicode(&mut p, "storage");
                global(&mut p, "torch", kind.name());
                unicode(&mut p, &key.to_string());
                unicode(&mut p, "cpu");
                int(&mut p, numel as i64);
                p.extend_from_slice(b"tQ");
                int(&mut p, 0);
                let mut stride = vec![1usize; dims.len()];
                for i in (0..dims.len().saturating_sub(1)).rev() {
                    stride[i] = stride[i + 1] * dims[i + 1];
                }
                int_tuple(&mut p, &dims);
                int_tuple(&mut p, &stride);
                p.push(0x89); // requires_grad = False
                global(&mut p, "collections", "OrderedDict");
                p.extend_from_slice(b")Rt"); // backward_hooks = OrderedDict(); end of args
                p.push(b'R');
            }
        }
    }
    p.extend_from_slice(b"u.");
    Ok((p, storages))
}

fn global(p: &mut Vec<u8>, module: &str, name: &str) {
    p.push(b'c');
    p.extend_from_slice(module.as_bytes());
    p.push(b'\n');
    p.extend_from_slice(name.as_bytes());
    p.push(b'\n');
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: i64) {
    if (0..=0xff).contains(&v) {
        p.extend_from_slice(&[b'K', v as u8]);
    } else if (0..=0xffff).contains(&v) {
        p.push(b'M');
        p.extend_from_slice(&(v as u16).to_le_bytes());
    } else if i32::try_from(v).is_ok() {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    } else {
        p.extend_from_slice(&[0x8a, 8]);
        p.extend_from_slice(&v.to_le_bytes());
    }
}

fn int_tuple(p: &mut Vec<u8>, v: &[usize]) {
    match v.len() {
        0 => p.push(b')'),
        1..=3 => {
            for &x in v {
                int(p, x as i64);
            }
            p.push(0x84 + v.len() as u8);
        }
        _ => {
            p.push(b'(');
            for &x in v {
                int(p, x as i64);
            }
            p.push(b't');
        }
    }
}

fn tensor_le_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    fn bytes<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> candle_core::Result<Vec<u8>> {
        Ok(t.to_vec1::<T>()?.into_iter().flat_map(f).collect())
    }
    match t.dtype() {
        DType::F32 => bytes::<f32, 4>(&t, |x| x.to_le_bytes()),
        DType::F64 => bytes::<f64, 8>(&t, |x| x.to_le_bytes()),
        DType::F16 => bytes::<half::f16, 2>(&t, |x| x.to_le_bytes()),
        DType::BF16 => bytes::<half::bf16, 2>(&t, |x| x.to_le_bytes()),
        DType::I64 => bytes::<i64, 8>(&t, |x| x.to_le_bytes()),
        DType::I32 => bytes::<i32, 4>(&t, |x| x.to_le_bytes()),
        DType::I16 => bytes::<i16, 2>(&t, |x| x.to_le_bytes()),
        DType::U8 => t.to_vec1::<u8>(),
        d => candle_core::bail!("dtype {d:?} is not supported"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_keeps_values_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let s = Tensor::new(576i64, &Device::Cpu).unwrap();
        let entries = vec![
            ("z".to_string(), PickleValue::Tensor(a.clone())),
            ("a".to_string(), PickleValue::Tensor(s)),
            ("n".to_string(), PickleValue::Int(-70000)),
            ("big".to_string(), PickleValue::Int(1 << 40)),
        ];
        write_torch_file(&path, &entries).unwrap();
        let back = read_torch_file(&path).unwrap();
        let names: Vec<_> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["z", "a", "n", "big"]);
        match &back[0].1 {
            PickleValue::Tensor(t) => {
                assert_eq!(t.dims(), &[3, 4]);
                assert_eq!(t.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
            }
            v => panic!("{v:?}"),
        }
        match &back[1].1 {
            PickleValue::Tensor(t) => assert_eq!(t.to_scalar::<i64>().unwrap(), 576),
            v => panic!("{v:?}"),
        }
        assert!(matches!(back[2].1, PickleValue::Int(-70000)));
        assert!(matches!(back[3].1, PickleValue::Int(x) if x == 1 << 40));
    }

    #[test]
    fn strided_views_are_gathered() {
        // A [2,3] view with stride (1,2) at offset 1 over storage 0..8: element (i,j) = 1 + i + 2j.
        let src: Vec<u8> = (0u8..8).collect();
        let mut out = Vec::new();
        gather(&src, 1, 1, &[2, 3], &[1, 2], &mut out);
        assert_eq!(out, vec![1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn disallowed_stack_global_is_refused() {
        // PROTO 2, 'builtins' 'eval' STACK_GLOBAL ...
        let mut code = vec![0x80, 2];
        unicode(&mut code, "builtins");
        unicode(&mut code, "eval");
        code.push(0x93);
        code.push(b'.');
        let path = Path::new("x.bin");
        let mut src = StorageSource {
            zip: zip::ZipArchive::new(std::io::Cursor::new(empty_zip())).unwrap(),
            prefix: String::new(),
            path,
            cache: HashMap::new(),
        };
        let err = Machine::new(&code, path, &mut src)
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`builtins.eval`"), "{err}");
    }

    fn empty_zip() -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        let zw = zip::ZipWriter::new(&mut buf);
        zw.finish().unwrap();
        buf.into_inner()
    }
}
