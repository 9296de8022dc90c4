//! The backward pass through the backbone: a trainable tensor added to the residual stream at a
//! middle layer's `block_output` must get the gradient that central finite differences give, in
//! f64, through every op of the layers above — on `tiny-llama` (attention, RoPE, RMSNorm, SwiGLU,
//! frozen linears, LM head) and on `tiny-gpt2` (learned positions, LayerNorm, GELU MLP, biases,
//! tied head).

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use reft::model::llama::ForwardInput;
use reft::model::{Component, FnHooks, Site};

#[test]
fn block_output_gradient_equals_finite_differences_llama() {
    block_output_gradient_equals_finite_differences("tiny-llama");
}

#[test]
fn block_output_gradient_equals_finite_differences_gpt2() {
    block_output_gradient_equals_finite_differences("tiny-gpt2");
}

fn block_output_gradient_equals_finite_differences(name: &str) {
    let model = tiny_decoder(name, DType::F64);
    let layers = model.config().num_layers;
    let layer = layers / 2 - 1; // a middle layer with layers above it
    let d = model.config().hidden_size;
    let dev = Device::Cpu;
    // Two sequences, the second right-padded, so the mask path is exercised too.
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 7, 3], [11, 250, 33, 8, 0, 0]], &dev).unwrap();
    let mask = vec![vec![1u32; 6], vec![1, 1, 1, 1, 0, 0]];
    let labels = vec![
        vec![-100i64, -100, 42, 99, 7, 3],
        vec![-100, 250, 33, 8, -100, -100],
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let init: Vec<f64> = (0..2 * 6 * d).map(|_| rng.gen_range(-0.1..0.1)).collect();
    let delta =
        Var::from_tensor(&Tensor::from_vec(init.clone(), (2, 6, d), &dev).unwrap()).unwrap();

    let loss_of = |delta: &Tensor| -> Tensor {
        let mut hooks = FnHooks::new(
            [Site::new(layer, Component::BlockOutput)],
            |_, h: &Tensor, _| Ok(Some((h + delta)?)),
        );
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: Some(&mask),
            position_ids: None,
            start: None,
        };
        let h = model.forward(&input, &mut hooks, None).unwrap();
        causal_lm_loss(&model.lm_head(&h).unwrap(), &labels).unwrap()
    };
    let loss = loss_of(delta.as_tensor());
    let grads = loss.backward().unwrap();
    let g = grads
        .get(delta.as_tensor())
        .expect("delta gets a gradient")
        .flatten_all()
        .unwrap();
    let g: Vec<f64> = g.to_vec1().unwrap();
    assert!(g.iter().any(|x| x.abs() > 1e-6), "gradient is all zero");

    // Central differences on a sample of coordinates, including some at padded positions
    // (whose true gradient is zero) and at the last position of each sequence.
    let eps = 1e-6;
    let mut coords: Vec<usize> = (0..40).map(|_| rng.gen_range(0..2 * 6 * d)).collect();
    coords.extend([(6 + 5) * d, (6 + 4) * d + 3, 5 * d + 1]);
    let mut worst = 0f64;
    for &c in &coords {
        let eval = |shift: f64| -> f64 {
            let mut v = init.clone();
            v[c] += shift;
            let t = Tensor::from_vec(v, (2, 6, d), &dev).unwrap();
            loss_of(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let err = (fd - g[c]).abs() / (fd.abs().max(g[c].abs()).max(1e-7));
        worst = worst.max(if fd.abs() < 1e-9 && g[c].abs() < 1e-9 {
            0.0
        } else {
            err
        });
        assert!(
            (fd - g[c]).abs() <= 1e-6 * fd.abs().max(1e-3),
            "coordinate {c}: analytic {} vs finite difference {fd}",
            g[c]
        );
    }
    eprintln!(
        "{name}: worst relative error over {} coordinates: {worst:.2e}",
        coords.len()
    );
}

#[test]
fn frozen_weights_get_no_gradient_and_lower_layers_record_no_graph_llama() {
    frozen_weights_get_no_gradient_and_lower_layers_record_no_graph("tiny-llama");
}

#[test]
fn frozen_weights_get_no_gradient_and_lower_layers_record_no_graph_gpt2() {
    frozen_weights_get_no_gradient_and_lower_layers_record_no_graph("tiny-gpt2");
}

fn frozen_weights_get_no_gradient_and_lower_layers_record_no_graph(name: &str) {
    let model = tiny_decoder(name, DType::F64);
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 42, 99]], &dev).unwrap();
    let layer = 2;
    let v = Var::zeros((1, 4, model.config().hidden_size), DType::F64, &dev).unwrap();
    let mut below_tracked = Vec::new();
    let sites = [
        Site::new(0, Component::BlockOutput),
        Site::new(1, Component::MlpOutput),
        Site::new(layer, Component::BlockOutput),
    ];
    let mut hooks = FnHooks::new(sites, |site: Site, h: &Tensor, _| {
        if site.layer < layer {
            below_tracked.push(h.track_op());
            return Ok(None);
        }
        Ok(Some((h + v.as_tensor())?))
    });
    let h = model
        .forward(&ForwardInput::new(&ids), &mut hooks, None)
        .unwrap();
    assert_eq!(
        below_tracked,
        vec![false, false],
        "layers below the edit must record no graph"
    );
    let loss = model.lm_head(&h).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(v.as_tensor()).is_some());
    // Only the variable and intermediate activations carry gradients: no tensor with a weight's
    // shape (the [vocab, d] head, the [d, d] projections) appears in the gradient store.
    let cfg = model.config();
    let weight_shaped = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| {
            g.dims() == [cfg.vocab_size, cfg.hidden_size]
                || g.dims() == [cfg.intermediate_size, cfg.hidden_size]
        })
        .count();
    assert_eq!(weight_shaped, 0, "a frozen weight received a gradient");
}

/// The two-stage backward through the Householder parametrisation gives the raw matrix behind
/// `R` the gradient that finite differences give (f64, LoReFT on tiny-llama and tiny-gpt2).
#[test]
fn raw_householder_gradient_equals_finite_differences_llama() {
    raw_householder_gradient_equals_finite_differences("tiny-llama");
}

#[test]
fn raw_householder_gradient_equals_finite_differences_gpt2() {
    raw_householder_gradient_equals_finite_differences("tiny-gpt2");
}

fn raw_householder_gradient_equals_finite_differences(name: &str) {
    use reft::adapter::Adapter;
    use reft::model::{Hooks, PromptLayout};
    let model = tiny_decoder(name, DType::F64);
    let dev = Device::Cpu;
    let spec =
        r#"{"interventions": [{"kind": "loreft", "layers": 1, "rank": 3, "positions": "l2"}]}"#;
    let mut adapter = adapter_from_spec(&model, spec, 4, DType::F64);
    adapter.set_training(true);
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 7, 3]], &dev).unwrap();
    let labels = vec![vec![-100i64, -100, -100, -100, 7, 3]];
    let loss_now = |adapter: &mut Adapter| -> Tensor {
        adapter.prepare(&PromptLayout::unpadded(vec![4])).unwrap();
        let h = model
            .forward(&ForwardInput::new(&ids), adapter, None)
            .unwrap();
        causal_lm_loss(&model.lm_head(&h).unwrap(), &labels).unwrap()
    };
    let loss = loss_now(&mut adapter);
    let grads = adapter.backward(&loss).unwrap();
    let (_, raw) = adapter
        .vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("R.raw"))
        .unwrap();
    let g: Vec<f64> = grads
        .get(raw.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = raw.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let (d, r) = raw.as_tensor().dims2().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for c in (0..d * r).filter(|c| c / r > c % r).step_by(17) {
        let mut eval = |shift: f64| -> f64 {
            let mut v = base.clone();
            v[c] += shift;
            raw.set(&Tensor::from_vec(v, (d, r), &dev).unwrap())
                .unwrap();
            loss_now(&mut adapter).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[c]).abs() <= 1e-6 * fd.abs().max(1e-3),
            "raw[{c}]: analytic {} vs {fd}",
            g[c]
        );
        checked += 1;
    }
    assert!(checked > 5);
}
