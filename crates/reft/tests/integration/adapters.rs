//! Adapters: every kind through save/load, base-model checks, bad files, orthogonality under
//! training, several adapters at once, batched generation with positions under left padding.

use std::collections::BTreeMap;

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use reft::adapter::config::LayerSpec;
use reft::adapter::{Adapter, AdapterConfig, AdapterSet, AdapterSpec, BaseModel, InterventionSpec};
use reft::generate::{generate, GenerationConfig};
use reft::intervention::{Activation, Kind};
use reft::model::llama::ForwardInput;
use reft::model::{Component, Decoder, Hooks, PromptLayout};
use reft::LanguageModel;

fn spec(kind: Kind, layers: &str, positions: &str, tied: bool) -> InterventionSpec {
    InterventionSpec {
        kind,
        layers: LayerSpec::Text(layers.into()),
        component: Component::BlockOutput,
        rank: 3,
        positions: positions.into(),
        tied,
        act: Activation::Linear,
        dropout: 0.0,
        proj_bias: true,
    }
}

fn every_kind_adapter(num_layers: usize, d: usize) -> Adapter {
    let mut specs = Vec::new();
    for (i, k) in Kind::ALL.into_iter().enumerate() {
        let mut s = spec(
            k,
            &(i % num_layers).to_string(),
            if i % 2 == 0 { "f1+l2" } else { "l1" },
            i % 3 != 0,
        );
        s.act = if k == Kind::Noreft {
            Activation::Tanh
        } else {
            Activation::Linear
        };
        specs.push(s);
    }
    let ivs = AdapterSpec {
        interventions: specs,
    }
    .expand(num_layers)
    .unwrap();
    let cfg = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: ivs,
        template: None,
        training: None,
    };
    let mut a = Adapter::init(cfg, d, 7, DType::F32, &Device::Cpu).unwrap();
    a.set_training(false);
    a
}

fn logits_with(m: &Decoder, a: &mut Adapter, ids: &[Vec<u32>]) -> Tensor {
    let (b, t) = (ids.len(), ids[0].len());
    a.prepare(&PromptLayout::unpadded(vec![t - 2; b])).unwrap();
    let ids = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap();
    m.lm_head(&m.forward(&ForwardInput::new(&ids), a, None).unwrap())
        .unwrap()
}

#[test]
fn native_round_trip_is_exact_for_every_kind() {
    let m = tiny_decoder("tiny-llama", DType::F32);
    let cfg = m.config().clone();
    let mut a = every_kind_adapter(cfg.num_layers, cfg.hidden_size);
    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    let mut b = Adapter::load(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let (ta, tb) = (a.tensors().unwrap(), b.tensors().unwrap());
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(xa, xb), 0.0, "{na}");
    }
    let ids = vec![vec![5u32, 9, 77, 3, 120, 8], vec![1, 2, 3, 4, 5, 6]];
    let (la, lb) = (logits_with(&m, &mut a, &ids), logits_with(&m, &mut b, &ids));
    assert_eq!(max_abs_diff(&la, &lb), 0.0);
    // Saving the loaded adapter writes the same bytes.
    let dir2 = tempfile::tempdir().unwrap();
    b.save(dir2.path()).unwrap();
    let f = |d: &std::path::Path| std::fs::read(d.join("adapter.safetensors")).unwrap();
    assert_eq!(f(dir.path()), f(dir2.path()));
}

#[test]
fn adapter_for_another_model_and_bad_files_are_clear_errors() {
    let m = tiny_decoder("tiny-llama", DType::F32);
    let cfg = m.config().clone();
    let a = every_kind_adapter(cfg.num_layers, cfg.hidden_size);
    let dir = tempfile::tempdir().unwrap();
    let mut a = a;
    a.config_mut().base_model = Some(BaseModel {
        architecture: "llama".into(),
        hidden_size: cfg.hidden_size,
        num_layers: cfg.num_layers,
        vocab_size: cfg.vocab_size,
        tokenizer_fingerprint: "fnv1a64:0000000000000001".into(),
    });
    a.save(dir.path()).unwrap();
    let other = BaseModel {
        hidden_size: 576,
        num_layers: 30,
        vocab_size: 49152,
        architecture: "llama".into(),
        tokenizer_fingerprint: "fnv1a64:0000000000000002".into(),
    };
    let msg = Adapter::load(dir.path(), Some(&other), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("made for another model") && msg.contains("hidden size"),
        "{msg}"
    );

    let w = dir.path().join("adapter.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 10]).unwrap();
    let msg = Adapter::load(dir.path(), None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adapter.safetensors") && msg.contains("truncated"),
        "{msg}"
    );

    std::fs::write(dir.path().join("reft_config.json"), "{ not json").unwrap();
    let msg = Adapter::load(dir.path(), None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("reft_config.json"), "{msg}");

    let msg = Adapter::open(
        &std::env::temp_dir().join("no-such-adapter-dir"),
        None,
        "l1",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.ends_with("no-such-adapter-dir: does not exist"),
        "{msg}"
    );

    let empty = tempfile::tempdir().unwrap();
    let msg = Adapter::open(empty.path(), None, "l1", DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not an adapter folder"), "{msg}");
}

#[test]
fn r_stays_orthonormal_through_200_adamw_steps() {
    let cfg = AdapterSpec {
        interventions: vec![
            spec(Kind::Loreft, "1", "l1", true),
            spec(Kind::Consreft, "2", "l1", true),
        ],
    }
    .expand(4)
    .unwrap();
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: cfg,
        template: None,
        training: None,
    };
    let mut a = Adapter::init(config, 64, 3, DType::F32, &Device::Cpu).unwrap();
    a.set_training(true);
    let vars: Vec<_> = a.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..200 {
        a.prepare(&PromptLayout::unpadded(vec![4])).unwrap();
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for i in 0..2 {
            let r = &a.effective(i).unwrap()["R"];
            let g = Tensor::randn(0f32, 1.0, r.shape(), &Device::Cpu).unwrap();
            loss = (loss + (r * g).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = a.backward(&loss).unwrap();
        for (name, v) in a.vars().into_iter().filter(|(n, _)| n.ends_with("R.raw")) {
            assert!(grads.get(v.as_tensor()).is_some(), "{name} got no gradient");
        }
        opt.step(&grads).unwrap();
    }
    let rs: Vec<_> = a
        .tensors()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".R"))
        .collect();
    assert_eq!(rs.len(), 2, "both orthogonal parameters are checked");
    for (name, r) in rs {
        let gram = r.matmul(&r.t().unwrap()).unwrap();
        let eye = Tensor::eye(r.dim(0).unwrap(), DType::F32, &Device::Cpu).unwrap();
        let err = max_abs_diff(&gram, &eye);
        assert!(err < 1e-5, "{name}: ‖R Rᵀ − I‖max = {err}");
    }
}

fn loreft_adapter(lm: &LanguageModel, layer: usize, positions: &str, seed: u64) -> Adapter {
    let cfg = AdapterSpec {
        interventions: vec![InterventionSpec {
            rank: 4,
            ..spec(Kind::Loreft, &layer.to_string(), positions, true)
        }],
    }
    .expand(lm.decoder.config().num_layers)
    .unwrap();
    let config = AdapterConfig {
        format_version: 1,
        base_model: Some(BaseModel::of(lm)),
        interventions: cfg,
        template: None,
        training: None,
    };
    let mut a = Adapter::init(
        config,
        lm.decoder.config().hidden_size,
        seed,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // Scale W so that the random adapter visibly changes the output.
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (n, t) in a.tensors().unwrap() {
        let short = n.rsplit('.').next().unwrap().to_string();
        let t = if short == "W" || short == "b" {
            (t * 40.0).unwrap()
        } else {
            t
        };
        tensors.insert(short, t);
    }
    let c = a.config().interventions[0].clone();
    let iv = reft::intervention::Intervention::from_tensors(
        c.shape(576),
        &tensors,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    a = Adapter::new(a.config().clone(), vec![iv]);
    a
}

#[test]
fn batched_generation_with_an_adapter_equals_one_prompt_at_a_time() {
    let lm = smollm2();
    let mut a = loreft_adapter(lm, 10, "f1+l2", 5);
    let prompts = vec![
        chat_ids(lm, "Who are you?"),
        chat_ids(
            lm,
            "What is the sea like? Tell me in two sentences, please.",
        ),
    ];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        stop_ids: vec![2],
        ..Default::default()
    };
    let batch = generate(
        &lm.decoder,
        &lm.tokenizer,
        &prompts,
        &cfg,
        &mut a,
        &mut |_, _| {},
    )
    .unwrap();
    let mut changed = false;
    for (p, got) in prompts.iter().zip(&batch) {
        let single = generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(p),
            &cfg,
            &mut a,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(got.ids, single[0].ids);
        let plain = generate(
            &lm.decoder,
            &lm.tokenizer,
            std::slice::from_ref(p),
            &cfg,
            &mut reft::model::NoHooks,
            &mut |_, _| {},
        )
        .unwrap();
        changed |= plain[0].ids != got.ids;
    }
    assert!(changed, "the adapter changed nothing");
}

#[test]
fn several_adapters_at_once_and_collisions() {
    let lm = smollm2();
    let p = vec![chat_ids(lm, "Who are you?")];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        stop_ids: vec![2],
        ..Default::default()
    };
    let mut ok = AdapterSet {
        adapters: vec![
            loreft_adapter(lm, 5, "l1", 1),
            loreft_adapter(lm, 12, "l1", 2),
        ],
    };
    generate(
        &lm.decoder,
        &lm.tokenizer,
        &p,
        &cfg,
        &mut ok,
        &mut |_, _| {},
    )
    .unwrap();
    let mut clash = AdapterSet {
        adapters: vec![
            loreft_adapter(lm, 5, "l2", 1),
            loreft_adapter(lm, 5, "l1", 2),
        ],
    };
    let msg = generate(
        &lm.decoder,
        &lm.tokenizer,
        &p,
        &cfg,
        &mut clash,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("both edit position") && msg.contains("layer 5"),
        "{msg}"
    );
    // Same layer, disjoint positions: fine.
    let mut disjoint = AdapterSet {
        adapters: vec![
            loreft_adapter(lm, 5, "f1", 1),
            loreft_adapter(lm, 5, "l1", 2),
        ],
    };
    generate(
        &lm.decoder,
        &lm.tokenizer,
        &p,
        &cfg,
        &mut disjoint,
        &mut |_, _| {},
    )
    .unwrap();
}

#[test]
fn every_token_mode_edits_generated_tokens() {
    let lm = smollm2();
    let p = vec![chat_ids(lm, "Who are you?")];
    let mut a = loreft_adapter(lm, 10, "l1", 5);
    let prompt_only = GenerationConfig {
        max_new_tokens: 10,
        stop_ids: vec![2],
        ..Default::default()
    };
    let every = GenerationConfig {
        hooks_on_generated: true,
        ..prompt_only.clone()
    };
    let x = generate(
        &lm.decoder,
        &lm.tokenizer,
        &p,
        &prompt_only,
        &mut a,
        &mut |_, _| {},
    )
    .unwrap();
    a.set_every_token(true);
    let y = generate(
        &lm.decoder,
        &lm.tokenizer,
        &p,
        &every,
        &mut a,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(
        x[0].ids[0], y[0].ids[0],
        "the first token comes from the prompt pass alone"
    );
    assert_ne!(x[0].ids, y[0].ids);
}

#[test]
fn init_is_seeded_and_counts_parameters_like_pyreft() {
    let cfg = AdapterSpec {
        interventions: vec![spec(Kind::Loreft, "1", "l1", true)],
    }
    .expand(4)
    .unwrap();
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: cfg,
        template: None,
        training: None,
    };
    let a = Adapter::init(config.clone(), 64, 11, DType::F32, &Device::Cpu).unwrap();
    let b = Adapter::init(config.clone(), 64, 11, DType::F32, &Device::Cpu).unwrap();
    let c = Adapter::init(config, 64, 12, DType::F32, &Device::Cpu).unwrap();
    let t = |x: &Adapter| {
        x.tensors()
            .unwrap()
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>()
    };
    assert_eq!(max_abs_diff(&t(&a)[0], &t(&b)[0]), 0.0);
    assert!(max_abs_diff(&t(&a)[0], &t(&c)[0]) > 0.0);
    // LoReFT: 2·d·r + r.
    assert_eq!(a.num_parameters(), 2 * 64 * 3 + 3);
    assert!(a
        .parameter_summary(1_000_000)
        .starts_with("trainable intervention params: 387 || trainable model params: 0"));
}
