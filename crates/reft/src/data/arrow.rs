//! Hugging Face `datasets` folders and single `.arrow` files as training data.
//!
//! `Dataset.save_to_disk` writes a folder of Arrow IPC *stream* files (`data-00000-of-00001.arrow`,
//! …) beside `dataset_info.json` and `state.json`, and many training and evaluation sets travel
//! only in that form. Arrow is a binary columnar format (flatbuffer metadata, aligned buffers,
//! validity bitmaps, dictionaries), so it is read with the Apache `arrow-ipc` crate rather than
//! parsed by hand. It lives in its own file because it is the only user of the Arrow crates: each
//! row becomes a `serde_json` object, so that the field logic of the text formats (`record_of` in
//! `mod.rs`) applies to it unchanged.

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
use serde_json::{Map, Number, Value};

use crate::{Error, Result};

/// The Arrow files behind `path` when it is a `datasets` folder (the files `state.json` lists,
/// else its `data-*.arrow` files in name order) or a file ending in `.arrow`; `None` for any
/// other file. Any other folder is an error.
pub(super) fn arrow_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    if !path.is_dir() {
        let arrow = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("arrow"));
        return Ok(arrow.then(|| vec![path.to_path_buf()]));
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
        return Err(bad(
            "a folder, but not a Hugging Face `datasets` folder (no state.json or dataset_info.json)"
                .into(),
        ));
    }
    if let Some(files) = listed_files(path)? {
        return Ok(Some(files));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("data-") && n.ends_with(".arrow"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad("a `datasets` folder without data-*.arrow files".into()));
    }
    Ok(Some(files))
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

/// Reads every row of `files` (Arrow IPC streams, or IPC files, told apart by their magic bytes)
/// as a JSON object that holds the given columns; columns the data lacks are left out.
pub(super) fn read_rows(files: &[PathBuf], columns: &[&str]) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for file in files {
        let bad = |msg: String| Error::BadConfig {
            path: file.clone(),
            msg,
        };
        let unreadable = |e: ArrowError| {
            let hint = match &e {
                ArrowError::IoError(_, io) if io.kind() == ErrorKind::UnexpectedEof => {
                    " (truncated?)"
                }
                _ => "",
            };
            bad(format!("not a readable Arrow IPC file{hint}: {e}"))
        };
        let mut reader = BufReader::new(File::open(file).map_err(|e| Error::io(file, e))?);
        let magic = reader.fill_buf().map_err(|e| Error::io(file, e))?;
        let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>> =
            if magic.starts_with(b"ARROW1") {
                Box::new(FileReader::try_new(reader, None).map_err(unreadable)?)
            } else {
                Box::new(StreamReader::try_new(reader, None).map_err(unreadable)?)
            };
        for batch in batches {
            let batch = batch.map_err(unreadable)?;
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
