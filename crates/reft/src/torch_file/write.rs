//! Writing `torch.save` files the way PyTorch lays them out, loadable by
//! `torch.load(..., weights_only=True)`: a protocol-2 pickle of an `OrderedDict` and one stored
//! (uncompressed) zip entry per storage, its data on a 64-byte boundary.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::machine::StorageKind;
use super::{bad, PickleValue};
use crate::{Error, Result};

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
    use crate::torch_file::read_torch_file;
    use candle_core::Device;

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
}
