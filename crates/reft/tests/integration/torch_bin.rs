//! Hugging Face folders whose weights are `pytorch_model.bin` (torch.save pickles), written by
//! real PyTorch/transformers (`tests/data/torch_bin/make.py`): they load to the same numbers as
//! the safetensors fixtures, tied and strided tensors come out right, the legacy (non-zip)
//! format reads the same, and hostile or damaged files are refused with errors naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use reft::adapter::pickle::{read_torch_file, PickleValue};
use reft::model::NoHooks;
use reft::weights::{LoadContext, WeightSource};
use reft::{Error, LanguageModel};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch_bin")
}

fn fixture_model(name: &str) -> PathBuf {
    fixture("models").join(name)
}

const IDS: [u32; 7] = [3, 77, 120, 5, 300, 9, 41];

/// The fixture's safetensors tensors, rounded through `dtype` and back to f32.
fn fixture_tensors(name: &str, dtype: DType) -> HashMap<String, Tensor> {
    let path = fixture_model(name).join("model.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            (k, t)
        })
        .collect()
}

fn ctx() -> LoadContext {
    LoadContext::safetensors(&Device::Cpu, DType::F32)
}

fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let d = max_abs_diff(a, b);
    assert_eq!(d, 0.0, "{what} differs by {d}");
}

/// A one-word-per-token tokenizer, enough for `LanguageModel::load_hf_folder` to accept a folder.
const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},
"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"a":3},"unk_token":"<unk>"}}"#;

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn llama_bin_folder_gives_the_safetensors_logits_exactly() {
    let bin_dir = data_dir().join("tiny-llama");
    let src = WeightSource::open_hf_folder(&bin_dir).unwrap();
    assert!(matches!(src, WeightSource::Torch(_)));
    let want = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &IDS);
    assert_same(
        &decoder_logits(&folder_decoder(&bin_dir, DType::F32).unwrap(), &IDS),
        &want,
        "decoder logits",
    );

    // The whole path a user takes: LanguageModel::load_hf_folder on a folder with a tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_folder(&bin_dir, &dir);
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).unwrap();
    let lm = LanguageModel::load_hf_folder(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_same(
        &decoder_logits(&lm.decoder, &IDS),
        &want,
        "LanguageModel logits",
    );
}

#[test]
fn sharded_bert_bin_gives_the_safetensors_hidden_states_and_logits_exactly() {
    let bin_dir = data_dir().join("tiny-bert-sharded");
    assert!(bin_dir.join("pytorch_model.bin.index.json").exists());
    assert!(bin_dir.join("pytorch_model-00004-of-00004.bin").exists());
    let run = |dir: &Path| {
        let enc = folder_encoder(dir, DType::F32).unwrap();
        let ids = Tensor::new(&[[2u32, 40, 17, 99, 3], [2, 8, 3, 0, 0]], &Device::Cpu).unwrap();
        let mask = vec![vec![1u32, 1, 1, 1, 1], vec![1, 1, 1, 0, 0]];
        let h = enc.forward(&ids, Some(&mask), &mut NoHooks).unwrap();
        let logits = enc.classify(&h).unwrap();
        (h, logits)
    };
    let (h_bin, l_bin) = run(&bin_dir);
    let (h_st, l_st) = run(&fixture_model("tiny-bert"));
    assert_same(&h_bin, &h_st, "hidden states");
    assert_same(&l_bin, &l_st, "classifier logits");
}

#[test]
fn bf16_bin_matches_the_safetensors_model_rounded_to_bf16() {
    let bin_dir = data_dir().join("tiny-llama-bf16");
    let src = WeightSource::open_hf_folder(&bin_dir).unwrap();
    // Every tensor is the f32 fixture rounded to bf16 (round-to-nearest-even on both sides).
    let rounded = fixture_tensors("tiny-llama", DType::BF16);
    for (name, want) in &rounded {
        let got = src.get(name, want.dims(), &ctx()).unwrap();
        assert_same(&got, want, name);
    }
    // The model, computed in f32 from those weights, equals the rounded safetensors model.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_model("tiny-llama").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&rounded, tmp.path().join("model.safetensors")).unwrap();
    let bin = decoder_logits(&folder_decoder(&bin_dir, DType::F32).unwrap(), &IDS);
    assert_same(
        &bin,
        &decoder_logits(&folder_decoder(tmp.path(), DType::F32).unwrap(), &IDS),
        "bf16 logits",
    );
    // And stays within bf16's precision of the f32 model.
    let f32_logits = decoder_logits(&tiny_decoder("tiny-llama", DType::F32), &IDS);
    let err = rel_err(&bin, &f32_logits);
    assert!(err > 0.0 && err < 2e-2, "bf16 vs f32 relative error {err}");
}

#[test]
fn gpt2_f16_bin_keeps_tied_weights_and_values() {
    let src = WeightSource::open_hf_folder(&data_dir().join("tiny-gpt2-f16")).unwrap();
    let rounded = fixture_tensors("tiny-gpt2", DType::F16);
    for (name, want) in &rounded {
        assert_same(&src.get(name, want.dims(), &ctx()).unwrap(), want, name);
    }
    // transformers drops the tied `lm_head.weight` from safetensors but torch.save keeps it, as
    // a second tensor over the embedding's storage.
    assert!(!rounded.contains_key("lm_head.weight"));
    let wte = &rounded["transformer.wte.weight"];
    let head = src.get("lm_head.weight", wte.dims(), &ctx()).unwrap();
    assert_same(&head, wte, "lm_head.weight (tied to wte)");
    // The file dtype converts to any compute dtype on the way.
    let ctx16 = LoadContext::safetensors(&Device::Cpu, DType::F16);
    let h16 = src.get("lm_head.weight", wte.dims(), &ctx16).unwrap();
    assert_eq!(h16.dtype(), DType::F16);
    assert_same(&h16, wte, "lm_head.weight as f16");
}

fn tensor(entries: &[(String, PickleValue)], name: &str) -> Tensor {
    match entries.iter().find(|(k, _)| k == name) {
        Some((_, PickleValue::Tensor(t))) => t.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn shared_storages_views_and_dtypes_from_torch_are_exact() {
    let e = read_torch_file(&data_dir().join("views.bin")).unwrap();
    let names: Vec<_> = e.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "base",
            "transposed",
            "slice",
            "f16",
            "bf16",
            "f64",
            "i64",
            "scalar"
        ]
    );
    let base = tensor(&e, "base");
    let want: Vec<Vec<f32>> = (0..4)
        .map(|r| (0..6).map(|c| (r * 6 + c) as f32).collect())
        .collect();
    assert_eq!(base.to_vec2::<f32>().unwrap(), want);
    // base.t(): strides (1, 6) over base's storage.
    let t = tensor(&e, "transposed");
    assert_eq!(t.dims(), &[6, 4]);
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        base.t().unwrap().to_vec2::<f32>().unwrap()
    );
    // base[1:3, 1:4]: offset 7, strides (6, 1).
    assert_eq!(
        tensor(&e, "slice").to_vec2::<f32>().unwrap(),
        vec![vec![7., 8., 9.], vec![13., 14., 15.]]
    );
    let f16 = tensor(&e, "f16");
    assert_eq!(f16.dtype(), DType::F16);
    let f16: Vec<f32> = f16
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(f16, [0.5, -1.25, 3.0, 65504.0]);
    let bf16 = tensor(&e, "bf16");
    assert_eq!(bf16.dtype(), DType::BF16);
    let bf16: Vec<f32> = bf16.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert_eq!(bf16, [1.0, -2.5, 3.140625]);
    assert_eq!(tensor(&e, "f64").to_vec1::<f64>().unwrap(), [1e-300, 2.0]);
    assert_eq!(tensor(&e, "i64").to_vec1::<i64>().unwrap(), [-3, 1 << 40]);
    let s = tensor(&e, "scalar");
    assert_eq!(s.dims(), &[] as &[usize]);
    assert_eq!(s.to_scalar::<f32>().unwrap(), 7.5);
}

#[test]
fn legacy_format_reads_the_same_as_the_zip_format() {
    let zip = read_torch_file(&data_dir().join("views.bin")).unwrap();
    let legacy = read_torch_file(&data_dir().join("legacy.bin")).unwrap();
    assert_eq!(zip.len(), legacy.len());
    for ((kz, vz), (kl, vl)) in zip.iter().zip(&legacy) {
        assert_eq!(kz, kl);
        match (vz, vl) {
            (PickleValue::Tensor(a), PickleValue::Tensor(b)) => {
                assert_eq!(a.dtype(), b.dtype(), "{kz}");
                assert_same(
                    &a.to_dtype(DType::F64).unwrap(),
                    &b.to_dtype(DType::F64).unwrap(),
                    kz,
                );
            }
            other => panic!("{kz}: {other:?}"),
        }
    }
    // Cut anywhere, it is an error naming the file, never a panic.
    let bytes = std::fs::read(data_dir().join("legacy.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut-legacy.bin");
    for len in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = read_torch_file(&cut).expect_err("a truncated file must not load");
        assert!(matches!(err, Error::BadWeights { .. }), "{len}: {err:?}");
        assert!(err.to_string().contains("cut-legacy.bin"), "{err}");
    }
}

fn folder_with_bin(tmp: &Path, bin: &[u8]) -> PathBuf {
    let dir = tmp.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        data_dir().join("tiny-llama/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), bin).unwrap();
    dir
}

fn open_err(dir: &Path) -> String {
    match folder_decoder(dir, DType::F32) {
        Ok(_) => panic!("{} must not load", dir.display()),
        Err(e) => {
            assert!(matches!(e, Error::BadWeights { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn pickles_that_would_run_code_are_refused() {
    // Written by torch.save: an object whose __reduce__ is os.system (pickled as posix.system).
    let evil = std::fs::read(data_dir().join("evil.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let msg = open_err(&folder_with_bin(tmp.path(), &evil));
    assert!(
        msg.contains("`posix.system`")
            && msg.contains("refusing")
            && msg.contains("pytorch_model.bin"),
        "{msg}"
    );

    // tiny-llama's own archive with data.pkl replaced by GLOBAL os.system + REDUCE.
    let pkl = b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
    let bin = std::fs::read(data_dir().join("tiny-llama/pytorch_model.bin")).unwrap();
    let patched = zip_with_data_pkl(&zip_entries(&bin), pkl);
    let msg = open_err(&folder_with_bin(tmp.path(), &patched));
    assert!(
        msg.contains("`os.system`") && msg.contains("refusing"),
        "{msg}"
    );

    // When safetensors are present the .bin is never read, hostile or not.
    let dir = folder_with_bin(tmp.path(), &evil);
    std::fs::copy(
        fixture_model("tiny-llama").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let src = WeightSource::open_hf_folder(&dir).unwrap();
    assert!(matches!(src, WeightSource::Safetensors { .. }));
}

#[test]
fn truncated_or_corrupt_bins_are_errors_naming_the_file() {
    let bin = std::fs::read(data_dir().join("tiny-llama/pytorch_model.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let n = bin.len();
    for len in [0, 1, 2, 30, 100, 1000, n / 3, n / 2, n - 100, n - 22, n - 1] {
        let msg = open_err(&folder_with_bin(tmp.path(), &bin[..len]));
        assert!(msg.contains("pytorch_model.bin"), "{len}: {msg}");
    }
    // Bytes flipped inside a storage: the file opens (tensors are read lazily), the zip CRC
    // check fails when that tensor is read.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bin)).unwrap();
    let mut at = 0;
    for i in 0..z.len() {
        let f = z.by_index(i).unwrap();
        if f.name().ends_with("/data/0") {
            at = f.data_start() as usize + f.size() as usize / 2;
        }
    }
    assert!(at > 0);
    let mut bad = bin.clone();
    for b in &mut bad[at..at + 8] {
        *b ^= 0x5a;
    }
    let msg = open_err(&folder_with_bin(tmp.path(), &bad));
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("corrupt"),
        "{msg}"
    );

    // A shard cut short in a sharded folder: the error names the shard.
    let dir = tmp.path().join("bert");
    copy_folder(&data_dir().join("tiny-bert-sharded"), &dir);
    let shard = dir.join("pytorch_model-00003-of-00004.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 500]).unwrap();
    let msg = match WeightSource::open_hf_folder(&dir) {
        Ok(_) => panic!("a cut shard must not open"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("pytorch_model-00003-of-00004.bin"), "{msg}");
}

#[test]
fn folders_without_usable_weights_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        data_dir().join("tiny-llama/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let msg = open_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );
    std::fs::write(dir.join("tf_model.h5"), b"x").unwrap();
    let msg = open_err(&dir);
    assert!(
        msg.contains("tf_model.h5") && msg.contains("TensorFlow"),
        "{msg}"
    );

    // An index whose shard lies outside the folder.
    std::fs::write(
        dir.join("pytorch_model.bin.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let msg = open_err(&dir);
    assert!(msg.contains("not a file name inside the folder"), "{msg}");
}
