//! Build an adapter in code, apply it, generate.
//!
//! A steering vector (activation addition) from the difference between the model's hidden states
//! on two contrasting prompts, added at one layer on every prompt position and every generated
//! token. Run: `cargo run --release -p reft --example steer`.

use candle_core::{DType, Device, Tensor};
use reft::adapter::config::LayerSpec;
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec, BaseModel, InterventionSpec};
use reft::generate::{generate, GenerationConfig};
use reft::intervention::{Activation, Intervention, Kind};
use reft::model::llama::ForwardInput;
use reft::model::{Component, NoHooks, Recorder, Site};
use reft::template::Message;
use reft::LanguageModel;

fn main() -> reft::Result<()> {
    reft::cpu::tune_cpu_runtime();
    let dev = Device::Cpu;
    let lm = LanguageModel::load(
        reft::hub::DEFAULT_MODEL,
        &dev,
        &Default::default(),
        &mut |m| eprintln!("{m}"),
    )?;
    let layer = 12;
    let site = Site::new(layer, Component::BlockOutput);

    // Mean residual stream at `site` over a prompt.
    let mean_state = |text: &str| -> reft::Result<Tensor> {
        let ids = lm.tokenizer.encode(text)?;
        let ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let mut rec = Recorder::new([site]);
        lm.decoder
            .forward(&ForwardInput::new(&ids), &mut rec, None)?;
        Ok(rec.states[&site].squeeze(0)?.mean(0)?)
    };
    let vector = ((mean_state("I love this! Wonderful, delightful, happy.")?
        - mean_state("I hate this! Awful, dreadful, miserable.")?)?
        * 1.5)?;

    // One `steer` intervention at the layer, on every prompt position.
    let spec = AdapterSpec {
        interventions: vec![InterventionSpec {
            kind: Kind::Steer,
            layers: LayerSpec::One(layer as i64),
            component: Component::BlockOutput,
            rank: 0,
            positions: "all".into(),
            tied: true,
            act: Activation::Linear,
            dropout: 0.0,
            proj_bias: true,
        }],
    };
    let configs = spec.expand(lm.decoder.config().num_layers)?;
    let d = lm.decoder.config().hidden_size;
    let steer = Intervention::from_tensors(
        configs[0].shape(d),
        &[("vector".to_string(), vector)].into_iter().collect(),
        DType::F32,
        &dev,
    )?;
    let config = AdapterConfig {
        format_version: 1,
        base_model: Some(BaseModel::of(&lm)),
        interventions: configs,
        template: Some("chat".into()),
        training: None,
    };
    let mut adapter = Adapter::new(config, vec![steer]);
    adapter.set_every_token(true);
    println!("{}", adapter.parameter_summary(lm.decoder.num_parameters()));

    let prompt = lm.tokenizer.encode(
        &lm.chat_template
            .render(&[Message::new("user", "Describe your day at work.")], true)?,
    )?;
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        hooks_on_generated: true,
        ..Default::default()
    };
    let plain = generate(
        &lm.decoder,
        &lm.tokenizer,
        std::slice::from_ref(&prompt),
        &cfg,
        &mut NoHooks,
        &mut |_, _| {},
    )?;
    let steered = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[prompt],
        &cfg,
        &mut adapter,
        &mut |_, _| {},
    )?;
    println!("plain:   {}", plain[0].text);
    println!("steered: {}", steered[0].text);

    // Adapters are folders: save, and load back for the same model.
    let dir = std::env::temp_dir().join("reft-steer-example");
    adapter.save(&dir)?;
    let again = Adapter::load(&dir, Some(&BaseModel::of(&lm)), DType::F32, &dev)?;
    println!(
        "saved to {} ({} parameters)",
        dir.display(),
        again.num_parameters()
    );
    Ok(())
}
