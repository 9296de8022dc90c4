//! Columnar data files as training data: Hugging Face `datasets` folders and `.arrow` files
//! (Arrow IPC), and Parquet files or folders of them.
//!
//! `Dataset.save_to_disk` writes a folder of Arrow IPC *stream* files (`data-00000-of-00001.arrow`,
//! …) beside `dataset_info.json` and `state.json`; datasets published on the Hugging Face Hub, and
//! `Dataset.to_parquet`, pandas and Polars, write Parquet (`train-00000-of-00002.parquet`, …).
//! Both are binary columnar formats (flatbuffer or Thrift metadata, encoded and compressed
//! pages, validity bitmaps, dictionaries), so they are read with the Apache `arrow-ipc` and
//! `parquet` crates rather than parsed by hand; both yield Arrow record batches. They live in
//! this one file because it is the only user of those crates: each row becomes a `serde_json`
//! object, so that the field logic of the text formats (`record_of` in `mod.rs`) applies to it
//! unchanged.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::{FileReader, StreamReader};
use arrow_schema::{ArrowError, DataType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};

use crate::{Error, Result};

/// The columnar files behind `path`: a file ending in `.arrow` or `.parquet`; a `datasets`
/// folder (the files `state.json` lists, else its `data-*.arrow` files in name order); or a
/// folder of `.parquet` files of one split, in name order. `None` for any other file; any other
/// folder is an error.
pub(super) fn columnar_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    if !path.is_dir() {
        let columnar = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("arrow") || e.eq_ignore_ascii_case("parquet"));
        return Ok(columnar.then(|| vec![path.to_path_buf()]));
    }
    let bad = |msg: String| Error::BadConfig {
        path: path.to_path_buf(),
        msg,
    };
    let has = |name: &str| path.join(name).is_file();
    if has("dataset_dict.json") {
        let mut splits: Vec<String> = subfolders(path)?
            .into_iter()
            .filter(|d| d.join("state.json").is_file() || d.join("dataset_info.json").is_file())
            .filter_map(|d| Some(d.file_name()?.to_string_lossy().into_owned()))
            .collect();
        splits.sort();
        return Err(bad(format!(
            "a `DatasetDict` folder: give one split's folder instead ({})",
            splits.join(", ")
        )));
    }
    if !has("state.json") && !has("dataset_info.json") {
        return parquet_folder(path).map(Some);
    }
    if let Some(files) = listed_files(path)? {
        return Ok(Some(files));
    }
    let mut files = files_named(path, |n| n.starts_with("data-") && n.ends_with(".arrow"))?;
    files.sort();
    if files.is_empty() {
        return Err(bad("a `datasets` folder without data-*.arrow files".into()));
    }
    Ok(Some(files))
}

/// The `.parquet` files directly inside `dir`, in name order. Files named as the Hub names
/// shards (`{split}-00000-of-00002.parquet`) must all belong to one split: mixing a train and a
/// test split into one training set is refused.
fn parquet_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |msg: String| Error::BadConfig {
        path: dir.to_path_buf(),
        msg,
    };
    let mut files = files_named(dir, |n| n.to_ascii_lowercase().ends_with(".parquet"))?;
    files.sort();
    if files.is_empty() {
        return Err(bad(
            "a folder, but neither a Hugging Face `datasets` folder \
             (no state.json or dataset_info.json) nor a folder of .parquet files"
                .into(),
        ));
    }
    let mut splits: Vec<&str> = files
        .iter()
        .filter_map(|f| shard_split(f.file_name()?.to_str()?))
        .collect();
    splits.sort();
    splits.dedup();
    if splits.len() > 1 {
        return Err(bad(format!(
            "Parquet files of several splits ({}): give one split's file or folder",
            splits.join(", ")
        )));
    }
    Ok(files)
}

/// `train` for `train-00000-of-00002.parquet`; `None` for a name not in that pattern.
fn shard_split(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".parquet")?;
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (split, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(total) && digits(index) && !split.is_empty()).then_some(split)
}

/// The plain files directly inside `dir` whose names pass `keep`.
fn files_named(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect())
}

/// The files in `state.json`'s `_data_files`, when it names any.
fn listed_files(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let state = dir.join("state.json");
    if !state.is_file() {
        return Ok(None);
    }
    let bad = |msg: String| Error::BadConfig {
        path: state.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(entries) = v.get("_data_files").and_then(Value::as_array) else {
        return Ok(None);
    };
    let files = entries
        .iter()
        .map(|f| {
            f.get("filename")
                .and_then(Value::as_str)
                .map(|name| dir.join(name))
                .ok_or_else(|| bad("a `_data_files` entry without `filename`".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((!files.is_empty()).then_some(files))
}

fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect())
}

/// Reads every row of `files` (Parquet files, by magic bytes or name, else Arrow IPC streams or
/// files, told apart by their magic bytes) as a JSON object that holds the given columns; columns the data lacks
/// are left out, and Parquet columns not asked for are never decoded.
pub(super) fn read_rows(files: &[PathBuf], columns: &[&str]) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for file in files {
        let bad = |msg: String| Error::BadConfig {
            path: file.clone(),
            msg,
        };
        let mut reader = BufReader::new(File::open(file).map_err(|e| Error::io(file, e))?);
        let magic = reader.fill_buf().map_err(|e| Error::io(file, e))?;
        let parquet = magic.starts_with(b"PAR1")
            || file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
        let batches = if parquet {
            parquet_batches(reader.into_inner(), columns)
        } else {
            let file_format = magic.starts_with(b"ARROW1");
            arrow_batches(reader, file_format)
        }
        .map_err(&bad)?;
        for batch in batches {
            let batch = batch.map_err(&bad)?;
            let cols: Vec<(&str, &dyn Array)> = columns
                .iter()
                .filter_map(|&c| Some((c, batch.column_by_name(c)?.as_ref())))
                .collect();
            for i in 0..batch.num_rows() {
                let mut obj = Map::new();
                for &(name, col) in &cols {
                    let v = value(col, i).map_err(|msg| bad(format!("column `{name}`: {msg}")))?;
                    obj.insert(name.to_string(), v);
                }
                rows.push(Value::Object(obj));
            }
        }
    }
    Ok(rows)
}

type Batches = Box<dyn Iterator<Item = std::result::Result<RecordBatch, String>>>;

/// The record batches of an Arrow IPC file (`file_format`: it starts with `ARROW1`) or stream.
fn arrow_batches(
    reader: BufReader<File>,
    file_format: bool,
) -> std::result::Result<Batches, String> {
    fn unreadable(e: ArrowError) -> String {
        let hint = match &e {
            ArrowError::IoError(_, io) if io.kind() == ErrorKind::UnexpectedEof => " (truncated?)",
            _ => "",
        };
        format!("not a readable Arrow IPC file{hint}: {e}")
    }
    Ok(if file_format {
        Box::new(
            FileReader::try_new(reader, None)
                .map_err(unreadable)?
                .map(|b| b.map_err(unreadable)),
        )
    } else {
        Box::new(
            StreamReader::try_new(reader, None)
                .map_err(unreadable)?
                .map(|b| b.map_err(unreadable)),
        )
    })
}

/// The record batches of a Parquet file, decoding only the top-level `columns` it has.
fn parquet_batches(file: File, columns: &[&str]) -> std::result::Result<Batches, String> {
    fn unreadable(e: impl std::fmt::Display) -> String {
        format!("not a readable Parquet file: {e}")
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(unreadable)?;
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| columns.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build().map_err(unreadable)?;
    Ok(Box::new(reader.map(|b| b.map_err(unreadable))))
}

/// Element `i` of an Arrow array as JSON: strings, numbers, booleans, lists as arrays, structs as
/// objects, nulls as null (so are non-finite floats, which JSON cannot hold).
fn value(a: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    let list = |l: &dyn Array| -> std::result::Result<Value, String> {
        (0..l.len())
            .map(|j| value(l, j))
            .collect::<std::result::Result<_, _>>()
            .map(Value::Array)
    };
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        // Narrow floats through their shortest decimal form, so that 0.1f32 reads as 0.1.
        DataType::Float16 => float(&a.as_primitive::<Float16Type>().value(i).to_string()),
        DataType::Float32 => float(&a.as_primitive::<Float32Type>().value(i).to_string()),
        DataType::Float64 => Number::from_f64(a.as_primitive::<Float64Type>().value(i))
            .map_or(Value::Null, Value::Number),
        DataType::Utf8 => a.as_string::<i32>().value(i).into(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).into(),
        DataType::Utf8View => a.as_string_view().value(i).into(),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(..) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => Value::Object(
            fields
                .iter()
                .zip(a.as_struct().columns())
                .map(|(f, c)| Ok((f.name().clone(), value(c.as_ref(), i)?)))
                .collect::<std::result::Result<_, String>>()?,
        ),
        DataType::Dictionary(..) => {
            let d = a.as_any_dictionary();
            let values = d.values();
            match value(d.keys(), i)?.as_u64() {
                Some(k) if (k as usize) < values.len() => value(values.as_ref(), k as usize)?,
                _ => return Err("a dictionary key out of range".into()),
            }
        }
        other => return Err(format!("Arrow type {other} is not supported")),
    })
}

fn float(shortest: &str) -> Value {
    shortest
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}
