//! Parity with PyTorch/transformers reference values (the fixture folder's README describes the
//! layout). Cases are discovered from `$REFT_FIXTURES/cases/*.json`; none is named here.
//!
//! Backbone cases (no intervention) must match logits and loss. Cases whose interventions are
//! LoReFT are checked through the model's hook points with the LoReFT formula written out below,
//! so that the hooks and every backward above them are verified against the reference gradients.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use reft::generate::{generate, GenerationConfig};
use reft::model::llama::ForwardInput;
use reft::model::{Component, FnHooks, Hooks, NoHooks, Site, SiteContext};
use reft::LanguageModel;
use serde_json::Value;

struct Case {
    name: String,
    json: Value,
    tensors: BTreeMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    let dir = fixtures_dir().join("cases");
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for p in entries {
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let st = p.with_extension("safetensors");
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", st.display()))
            .into_iter()
            .collect();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        out.push(Case {
            name,
            json,
            tensors,
        });
    }
    assert!(!out.is_empty(), "no cases in {}", dir.display());
    out
}

fn matrix_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
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

/// One LoReFT intervention for the test hook: `h + (act(W h + b) − R h) R` at given rows.
struct LoreftRef {
    layer: usize,
    act: String,
    positions: Vec<Vec<u32>>,
    r: Var,
    w: Var,
    b: Var,
}

fn act(x: &Tensor, name: &str) -> reft::Result<Tensor> {
    Ok(match name {
        "linear" => x.clone(),
        "relu" => x.relu()?,
        "silu" => x.silu()?,
        "tanh" => x.tanh()?,
        "gelu" => x.gelu_erf()?,
        other => panic!("activation {other}"),
    })
}

/// Applies interventions to `h` `[B, T, d]` at their positions (rows `b*T + p`).
fn apply_loreft(h: &Tensor, ivs: &[&LoreftRef]) -> reft::Result<Tensor> {
    let (bsz, t, d) = h.dims3()?;
    let mut flat = h.reshape((bsz * t, d))?;
    for iv in ivs {
        let rows: Vec<u32> = iv
            .positions
            .iter()
            .enumerate()
            .flat_map(|(b, ps)| ps.iter().map(move |&p| (b * t) as u32 + p))
            .collect();
        let idx = Tensor::from_vec(rows.clone(), rows.len(), h.device())?;
        let x = flat.index_select(&idx, 0)?;
        let (r, w, b) = (iv.r.as_tensor(), iv.w.as_tensor(), iv.b.as_tensor());
        let target = act(&x.matmul(&w.t()?)?.broadcast_add(b)?, &iv.act)?;
        let edit = (target - x.matmul(&r.t()?)?)?.matmul(r)?;
        flat = flat.index_add(&idx, &edit, 0)?;
    }
    Ok(flat.reshape((bsz, t, d))?)
}

#[test]
fn tiny_decoder_cases_match_reference() {
    let mut checked = Vec::new();
    let mut pending = Vec::new();
    for case in cases() {
        let Some(model_name) = case.json["model"].as_str() else {
            continue;
        };
        let model_dir = fixtures_dir().join("models").join(model_name);
        if !model_dir.join("config.json").exists() {
            continue; // a real-model case, checked below
        }
        let mt = model_type(&model_dir);
        let ivs = case.json["interventions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let decoder_family = matches!(mt.as_str(), "llama" | "qwen2" | "mistral");
        let all_loreft = ivs.iter().all(|iv| iv["kind"] == "loreft");
        if !decoder_family || !all_loreft {
            pending.push(format!(
                "{} ({mt}, kinds {:?})",
                case.name,
                ivs.iter()
                    .map(|i| i["kind"].as_str().unwrap_or("?"))
                    .collect::<Vec<_>>()
            ));
            continue;
        }
        check_decoder_case(&case, &model_dir);
        checked.push(case.name.clone());
    }
    eprintln!("checked: {checked:?}");
    eprintln!("for the intervention-kind and encoder issues: {pending:?}");
    assert!(
        checked.iter().any(|c| c.ends_with("_none")),
        "no plain backbone case was found"
    );
}

fn check_decoder_case(case: &Case, model_dir: &Path) {
    let dev = Device::Cpu;
    // The tiny models ship no tokenizer: load the decoder alone.
    let cfg = reft::model::DecoderConfig::from_hf_json(&model_dir.join("config.json")).unwrap();
    let src = reft::weights::WeightSource::open_hf_folder(model_dir).unwrap();
    let decoder = reft::model::Decoder::load(&src, cfg, &dev, DType::F32, false).unwrap();
    let ids = matrix_u32(&case.json["input_ids"]);
    let mask = matrix_u32(&case.json["attention_mask"]);
    let labels = matrix_i64(&case.json["labels"]);
    let (b, t) = (ids.len(), ids[0].len());
    let ids_t = Tensor::from_vec(ids.concat(), (b, t), &dev).unwrap();

    let ivs: Vec<LoreftRef> = case.json["interventions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, iv)| {
            let p = |n: &str| Var::from_tensor(&case.tensors[&format!("iv{i}.{n}")]).unwrap();
            LoreftRef {
                layer: iv["layer"].as_u64().unwrap() as usize,
                act: iv["act"].as_str().unwrap_or("linear").to_string(),
                positions: matrix_u32(&iv["positions"]),
                r: p("R"),
                w: p("W"),
                b: p("b"),
            }
        })
        .collect();
    let sites: Vec<Site> = ivs
        .iter()
        .map(|iv| Site::new(iv.layer, Component::BlockOutput))
        .collect();
    let mut hooks = FnHooks::new(sites, |site: Site, h: &Tensor, _: &SiteContext| {
        let here: Vec<&LoreftRef> = ivs.iter().filter(|iv| iv.layer == site.layer).collect();
        Ok(Some(apply_loreft(h, &here)?))
    });
    let hooks: &mut dyn Hooks = if ivs.is_empty() {
        &mut NoHooks
    } else {
        &mut hooks
    };
    let input = ForwardInput {
        input_ids: &ids_t,
        attention_mask: Some(&mask),
        position_ids: None,
    };
    let hidden = decoder.forward(&input, hooks, None).unwrap();
    let logits = decoder.lm_head(&hidden).unwrap();

    let tol = case.json["tolerance"]["logits_max_abs"].as_f64().unwrap();
    let reference = &case.tensors["logits"];
    for (bi, row) in mask.iter().enumerate() {
        let n = row.iter().filter(|&&m| m == 1).count();
        let ours = logits.get(bi).unwrap().narrow(0, 0, n).unwrap();
        let theirs = reference.get(bi).unwrap().narrow(0, 0, n).unwrap();
        let err = max_abs_diff(&ours, &theirs);
        assert!(
            err <= tol,
            "{}: logits of example {bi} differ by {err} > {tol}",
            case.name
        );
    }
    let loss = causal_lm_loss(&logits, &labels).unwrap();
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

    if !ivs.is_empty() {
        let grads = loss.backward().unwrap();
        let gtol = case.json["tolerance"]["grad_rel"].as_f64().unwrap();
        for (i, iv) in ivs.iter().enumerate() {
            for (n, v) in [("R", &iv.r), ("W", &iv.w), ("b", &iv.b)] {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{}: iv{i}.{n} got no gradient", case.name));
                let err = rel_err(g, &case.tensors[&format!("grad.iv{i}.{n}")]);
                assert!(
                    err <= gtol,
                    "{}: grad iv{i}.{n} relative error {err} > {gtol}",
                    case.name
                );
            }
        }
    }
    eprintln!("{}: ok", case.name);
}

/// Every `smollm2` entry of `tokenizer_cases.json`, ids and decoded text, with the GGUF tokenizer.
#[test]
fn smollm2_tokenizer_cases() {
    let path = smollm2_path();
    let g = reft::weights::GgufFile::open(&path).unwrap();
    let tok = reft::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let list = cases["smollm2"].as_array().unwrap();
    assert!(!list.is_empty());
    for c in list {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        let decoded = tok.decode(&want, false).unwrap();
        assert_eq!(
            decoded,
            c["decoded"].as_str().unwrap(),
            "decoded text of {text:?}"
        );
    }
}

/// SmolLM2 (GGUF, dequantized to f32): next-token logits of the chat prompts within tolerance
/// and greedy continuations token for token, plain and with the case's LoReFT on the last prompt
/// token through the hook points.
#[test]
fn smollm2_chat_logits_and_greedy() {
    let dev = Device::Cpu;
    let lm = LanguageModel::load(
        smollm2_path().to_str().unwrap(),
        &dev,
        &reft::LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let dir = fixtures_dir().join("cases");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        if !json["model"]
            .as_str()
            .unwrap_or_default()
            .contains("SmolLM2")
        {
            continue;
        }
        let tensors =
            candle_core::safetensors::load(p.with_extension("safetensors"), &dev).unwrap();
        let tol = json["tolerance"]["logits_max_abs"].as_f64().unwrap();
        let iv = &json["interventions"][0];
        let layer = iv["layer"].as_u64().unwrap() as usize;
        let loreft = LoreftRef {
            layer,
            act: iv["act"].as_str().unwrap_or("linear").to_string(),
            positions: vec![],
            r: Var::from_tensor(&tensors["iv0.R"]).unwrap(),
            w: Var::from_tensor(&tensors["iv0.W"]).unwrap(),
            b: Var::from_tensor(&tensors["iv0.b"]).unwrap(),
        };
        for c in json["cases"].as_array().unwrap() {
            let prompt = c["prompt"].as_str().unwrap();
            let want_ids: Vec<u32> = c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(lm.tokenizer.encode(prompt).unwrap(), want_ids, "prompt ids");
            let question = c["question"].as_str().unwrap();
            let rendered = lm
                .chat_template
                .render(&[reft::template::Message::new("user", question)], true)
                .unwrap();
            assert_eq!(rendered, prompt, "chat template rendering");
            let last = want_ids.len() as u32 - 1;
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
                let iv = LoreftRef {
                    positions: vec![vec![last]],
                    r: loreft.r.clone(),
                    w: loreft.w.clone(),
                    b: loreft.b.clone(),
                    act: loreft.act.clone(),
                    layer,
                };
                let mut hooks = FnHooks::new(
                    [Site::new(layer, Component::BlockOutput)],
                    |_: Site, h: &Tensor, ctx: &SiteContext| {
                        // Prompt pass only: the edit reaches later tokens through the KV cache.
                        if ctx.past_len > 0 {
                            return Ok(None);
                        }
                        Ok(Some(apply_loreft(h, &[&iv])?))
                    },
                );
                let hooks: &mut dyn Hooks = if intervened { &mut hooks } else { &mut NoHooks };
                let h = lm
                    .decoder
                    .forward(&ForwardInput::new(&ids_t), hooks, None)
                    .unwrap();
                let logits = lm
                    .decoder
                    .lm_head(&h.get(0).unwrap().get(last as usize).unwrap())
                    .unwrap();
                let key = if intervened {
                    "logits_key_intervened"
                } else {
                    "logits_key_plain"
                };
                let reference = &tensors[c[key].as_str().unwrap()];
                let err = max_abs_diff(&logits, &reference.flatten_all().unwrap());
                assert!(
                    err <= tol,
                    "{question}: logits ({key}) differ by {err} > {tol}"
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
                let (ik, tk) = if intervened {
                    ("greedy_ids_intervened", "greedy_text_intervened")
                } else {
                    ("greedy_ids_plain", "greedy_text_plain")
                };
                let mut want: Vec<u32> = c[ik]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
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
}
