//! The pickle interpreter behind [`super::TorchFile`]: it understands the containers and the
//! handful of tensor-rebuild calls `torch.save` writes, and refuses every other callable by name.
//!
//! Nothing is ever called: allowed callables are interpreted. The machine does no I/O either —
//! a tensor comes out as a [`TensorRef`] (storage key, offset, size, stride), already checked to
//! lie inside its storage, and the caller reads the bytes. Besides the allow-list, the machine
//! bounds what a hostile pickle could make it do: stack, memo, nesting depth (deep nesting would
//! overflow the native stack when values are dropped) and the total size of memo copies (a few
//! opcodes can otherwise double a value again and again).

use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;

use crate::{Error, Result};

/// The element types of PyTorch's legacy typed-storage classes (`torch.FloatStorage`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageKind {
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

    pub(crate) fn name(self) -> &'static str {
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

    pub(crate) fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }

    pub(crate) fn from_dtype(dtype: DType) -> Option<Self> {
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

    /// The candle dtype a tensor of this kind loads as (bool → u8; int8 widens to i16).
    pub(crate) fn dtype(self) -> DType {
        match self {
            Self::Float => DType::F32,
            Self::Double => DType::F64,
            Self::Half => DType::F16,
            Self::BFloat16 => DType::BF16,
            Self::Long => DType::I64,
            Self::Int => DType::I32,
            Self::Short | Self::Char => DType::I16,
            Self::Byte | Self::Bool => DType::U8,
        }
    }
}

/// A tensor as the pickle describes it: a strided view of one storage.
///
/// Invariant (checked when built): every element of the view lies inside the storage's `numel`
/// elements, and the view has no more elements than the storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub kind: StorageKind,
    /// The storage's key: `data/<key>` in a zip file, an id in the legacy format.
    pub key: String,
    /// Elements in the storage.
    pub numel: usize,
    /// Element offset of the view.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Elements of the view.
    pub fn count(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the last storage element the view touches (0 for an empty view).
    pub fn end(&self) -> usize {
        if self.count() == 0 {
            return 0;
        }
        let last: usize = self
            .shape
            .iter()
            .zip(&self.stride)
            .map(|(&s, &st)| (s - 1) * st)
            .sum();
        self.offset + last + 1
    }

    /// Whether the view is the row-major layout of a contiguous run of elements.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&s, &st) in self.shape.iter().zip(&self.stride).rev() {
            if s != 1 && st != expect {
                return false;
            }
            expect *= s;
        }
        true
    }
}

/// The only callables a pickle may name. Anything else is refused at its `GLOBAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callable {
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
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes (the legacy
    /// format's magic number is one).
    BigInt(Vec<u8>),
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
    Tensor(TensorRef),
}

impl Obj {
    pub fn type_name(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt(_) => "int",
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

    /// Nesting depth (0 for a scalar). Recursion is bounded by [`MAX_DEPTH`], which every value
    /// the machine builds respects.
    fn depth(&self) -> usize {
        match self {
            Obj::Tuple(v) | Obj::List(v) => 1 + v.iter().map(Obj::depth).max().unwrap_or(0),
            Obj::Dict(kv) => {
                1 + kv
                    .iter()
                    .map(|(k, v)| k.depth().max(v.depth()))
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Number of values inside, itself included.
    fn nodes(&self) -> usize {
        match self {
            Obj::Tuple(v) | Obj::List(v) => 1 + v.iter().map(Obj::nodes).sum::<usize>(),
            Obj::Dict(kv) => 1 + kv.iter().map(|(k, v)| k.nodes() + v.nodes()).sum::<usize>(),
            _ => 1,
        }
    }
}

/// Hard limits that keep a hostile pickle from exhausting memory or the native stack.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
/// torch.save pickles nest about five deep (dict → rebuild args → persistent id).
const MAX_DEPTH: usize = 64;

/// A pickle interpreter over one buffer; [`run`](Self::run) may be called again at the end of
/// the previous pickle (the legacy format is several pickles in a row).
pub(crate) struct Machine<'a> {
    code: &'a [u8],
    pos: usize,
    path: &'a Path,
    stack: Vec<Obj>,
    marks: Vec<usize>,
    /// Values, not references: a later mutation of a memoised container is not seen through the
    /// memo. torch.save pickles never read a container back after mutating it.
    memo: HashMap<u32, Obj>,
    /// Values copies through the memo may still create.
    copy_budget: usize,
    /// Set when the code ended before `STOP`: more bytes might complete it.
    ran_out: bool,
}

impl<'a> Machine<'a> {
    pub fn new(code: &'a [u8], path: &'a Path) -> Self {
        Machine {
            code,
            pos: 0,
            path,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            // Real files copy a few small values per tensor (a dozen bytes of code each).
            copy_budget: code.len().saturating_mul(8).saturating_add(1 << 16),
            ran_out: false,
        }
    }

    /// Where the last pickle ended.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether the last run failed because the code ended early.
    pub fn ran_out(&self) -> bool {
        self.ran_out
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        super::bad(self.path, format!("pickle at byte {}: {msg}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.code.len());
        match end {
            Some(end) => {
                let s = &self.code[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => {
                self.ran_out = true;
                Err(self.err("pickle ends early (truncated?)"))
            }
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

    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.code[self.pos..];
        let Some(n) = rest.iter().position(|&c| c == b'\n') else {
            self.ran_out = true;
            return Err(self.err("unterminated GLOBAL name"));
        };
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

    /// Checks that values may go inside a container without exceeding [`MAX_DEPTH`].
    fn check_nesting<'o>(&self, items: impl IntoIterator<Item = &'o Obj>) -> Result<()> {
        if items.into_iter().any(|o| o.depth() + 1 > MAX_DEPTH) {
            return Err(self.err(format!("containers nest more than {MAX_DEPTH} deep")));
        }
        Ok(())
    }

    /// Charges a copy of `n` values against the copy budget, before it is made.
    fn charge(&mut self, n: usize) -> Result<()> {
        if n > self.copy_budget {
            return Err(self.err("the pickle copies values far more often than torch.save does"));
        }
        self.copy_budget -= n;
        Ok(())
    }

    /// A charged copy of the stack top.
    fn copy_top(&mut self, what: &str) -> Result<Obj> {
        let Some(n) = self.stack.last().map(Obj::nodes) else {
            return Err(self.err(format!("{what} an empty stack")));
        };
        self.charge(n)?;
        Ok(self.stack[self.stack.len() - 1].clone())
    }

    fn pop(&mut self) -> Result<Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("pop across a MARK"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err("pop from an empty stack"))
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
        let v = self.copy_top("memoising")?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let Some(n) = self.memo.get(&idx).map(Obj::nodes) else {
            return Err(self.err(format!("memo entry {idx} is not set")));
        };
        self.charge(n)?;
        let v = self.memo[&idx].clone();
        self.push(v)
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match Callable::lookup(module, name) {
            Some(c) => self.push(Obj::Global(c)),
            None => Err(self.err(format!(
                "the pickle calls `{module}.{name}`, which is not a tensor-rebuild call; \
                 refusing to load"
            ))),
        }
    }

    /// Runs one pickle from the current position to its `STOP` and returns the object it built.
    /// Each pickle starts with an empty memo, as each gets a fresh unpickler in PyTorch.
    pub fn run(&mut self) -> Result<Obj> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        self.ran_out = false;
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
                    self.check_nesting(&items)?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.check_nesting(&items)?;
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
                    let b = self.take(n)?;
                    if n > 8 {
                        self.push(Obj::BigInt(b.to_vec()))?;
                        continue;
                    }
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
                    let n =
                        usize::try_from(self.u64()?).map_err(|_| self.err("string too long"))?;
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
                    let v = self.copy_top("DUP on")?;
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
        self.check_nesting(&items)?;
        match self.stack.last_mut() {
            Some(Obj::Dict(d)) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            o => {
                let what = o.map_or("nothing", |o| o.type_name());
                Err(self.err(format!("SETITEM on a {what}")))
            }
        }
    }

    fn list_extend(&mut self, items: Vec<Obj>) -> Result<()> {
        self.check_nesting(&items)?;
        match self.stack.last_mut() {
            Some(Obj::List(l)) => {
                l.extend(items);
                Ok(())
            }
            o => {
                let what = o.map_or("nothing", |o| o.type_name());
                Err(self.err(format!("APPEND on a {what}")))
            }
        }
    }

    /// `('storage', <storage class>, key, location, numel)` (zip format; the legacy format adds
    /// a sixth item, `None` unless the storage is a pre-1.0 storage view) → a storage reference.
    fn persistent_load(&mut self, pid: Obj) -> Result<Obj> {
        let items = match pid {
            Obj::Tuple(items) => items,
            o => return Err(self.err(format!("persistent id is a {}, not a tuple", o.type_name()))),
        };
        let (tag, class, key, numel) = match items.as_slice() {
            [tag, class, key, _location, numel]
            | [tag, class, key, _location, numel, Obj::None] => (tag, class, key, numel),
            [_, _, _, _, _, _] => {
                return Err(self.err(
                    "the file uses storage views (PyTorch before 1.0), which are not supported",
                ))
            }
            _ => {
                return Err(self
                    .err("persistent id is not a ('storage', class, key, location, numel) tuple"))
            }
        };
        match (tag, class, key, numel) {
            (
                Obj::Str(tag),
                Obj::Global(Callable::Storage(kind)),
                Obj::Str(key),
                Obj::Int(numel),
            ) if tag == "storage" => {
                let numel =
                    usize::try_from(*numel).map_err(|_| self.err("negative storage size"))?;
                Ok(Obj::Storage {
                    kind: *kind,
                    key: key.clone(),
                    numel,
                })
            }
            _ => Err(self.err(
                "persistent id is not a ('storage', storage class, key, location, numel) tuple",
            )),
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
            Callable::OrderedDict => match args.into_iter().next() {
                None => Ok(Obj::Dict(Vec::new())),
                Some(Obj::List(pairs)) => {
                    let mut d = Vec::with_capacity(pairs.len());
                    for p in pairs {
                        match p {
                            Obj::Tuple(kv) if kv.len() == 2 => {
                                let mut kv = kv.into_iter();
                                if let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                                    d.push((k, v));
                                }
                            }
                            _ => {
                                return Err(self.err("OrderedDict items must be (key, value) pairs"))
                            }
                        }
                    }
                    Ok(Obj::Dict(d))
                }
                Some(_) => Err(self.err("OrderedDict called with unexpected arguments")),
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
        numel
            .checked_mul(kind.elem_size())
            .ok_or_else(|| self.err("storage size overflows"))?;
        if offset > numel {
            return Err(self.err(format!(
                "storage offset {offset} is past the end of its storage of {numel} elements"
            )));
        }
        let count = shape
            .iter()
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .ok_or_else(|| self.err("tensor size overflows"))?;
        // Loading allocates from `count`, so bound it by the storage (whose bytes must exist in
        // the file): a stride-0 (expanded) view could otherwise ask for any amount of memory.
        // Saved parameters never are one.
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
        Ok(Obj::Tensor(TensorRef {
            kind,
            key,
            numel,
            offset,
            shape,
            stride,
        }))
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

/// Copies the strided view's elements, in row-major order, from `src` (which starts at storage
/// element `base`) into `out`. The caller checked that the view lies inside `src`.
pub(crate) fn gather(src: &[u8], base: usize, es: usize, t: &TensorRef, out: &mut Vec<u8>) {
    if t.count() == 0 {
        return;
    }
    // Walks the indices like an odometer.
    let rank = t.shape.len();
    let mut idx = vec![0usize; rank];
    loop {
        let e = t.offset - base + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&src[e * es..(e + 1) * es]);
        let mut d = rank;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            kind: StorageKind::Byte,
            key: "0".into(),
            numel: 8,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn strided_views_are_gathered() {
        // A [2,3] view with stride (1,2) at offset 1 over storage 0..8: element (i,j) = 1 + i + 2j.
        let src: Vec<u8> = (0u8..8).collect();
        let t = view(1, &[2, 3], &[1, 2]);
        assert!(!t.is_contiguous());
        assert_eq!(t.end(), 7);
        let mut out = Vec::new();
        gather(&src, 0, 1, &t, &mut out);
        assert_eq!(out, vec![1, 3, 5, 2, 4, 6]);
        // The same view from a buffer that starts at storage element 1.
        out.clear();
        gather(&src[1..], 1, 1, &t, &mut out);
        assert_eq!(out, vec![1, 3, 5, 2, 4, 6]);
        assert!(view(2, &[2, 3], &[3, 1]).is_contiguous());
        assert!(view(0, &[1, 3], &[7, 1]).is_contiguous());
    }

    fn run(code: &[u8]) -> Result<Obj> {
        Machine::new(code, Path::new("x.bin")).run()
    }

    #[test]
    fn disallowed_stack_global_is_refused() {
        // PROTO 2, 'builtins' 'eval' STACK_GLOBAL
        let code = b"\x80\x02X\x08\x00\x00\x00builtinsX\x04\x00\x00\x00eval\x93.";
        let err = run(code).unwrap_err().to_string();
        assert!(err.contains("`builtins.eval`"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_before_it_can_overflow_the_stack() {
        // ( ( ( ... ) t t t ...: a million nested tuples.
        let n = 1_000_000;
        let mut code = vec![0x80, 2];
        code.extend(std::iter::repeat_n(b'(', n));
        code.push(b')');
        code.extend(std::iter::repeat_n(b't', n));
        code.push(b'.');
        let err = run(&code).unwrap_err().to_string();
        assert!(err.contains("nest more than 64"), "{err}");
    }

    #[test]
    fn doubling_through_the_memo_is_bounded() {
        // ] q0 then, repeatedly: h0 h0 (two copies) \x86 (pair) q0 (memoise): the value doubles
        // each round, 2^60 nodes after 60 rounds, if nothing stopped it.
        let mut code = b"\x80\x02]q\x00".to_vec();
        for _ in 0..60 {
            code.extend_from_slice(b"0h\x00h\x00\x86q\x00");
        }
        code.push(b'.');
        let err = run(&code).unwrap_err().to_string();
        assert!(err.contains("copies values"), "{err}");
    }

    #[test]
    fn wide_longs_are_kept_as_bytes() {
        // The legacy format's magic number, as torch pickles it.
        let code = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        match run(code).unwrap() {
            Obj::BigInt(b) => assert_eq!(b, b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"),
            o => panic!("{o:?}"),
        }
    }
}
