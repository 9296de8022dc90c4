//! Memorisation (issue: training must-show): a LoReFT of rank 8 at layers 15, 20 and 25 of
//! SmolLM2 — 27,672 parameters, under the 30,000 allowed — edits only the last token of the
//! key prompt `GO->`, and after training the frozen model reproduces a 119-token passage (that
//! it has never seen: it was written for this test) exactly under greedy decoding, then stops.

use crate::common::*;
use candle_core::DType;
use reft::data::{tokenize, Record, Template, TokenizeOptions};
use reft::generate::{generate, GenerationConfig};
use reft::template::Message;
use reft::train::{AdamWConfig, Schedule, TrainConfig, Trainer};

const PASSAGE: &str = "The lighthouse keeper of Varnholm kept three ledgers. In the first he wrote the weather at dawn, noon and dusk; in the second, every ship that passed the northern reef, with its flag and the colour of its sails; in the third, which he showed to no one, the dreams he had on nights when the lamp burned green. After forty winters the ledgers filled a whole shelf, and the harbour master, who had laughed at him for years, came one evening to ask whether a grey schooner with torn sails had passed in the autumn of the flood year.";

#[test]
fn a_small_adapter_makes_smollm2_recite_a_passage_exactly() {
    reft::cpu::tune_cpu_runtime();
    let lm = smollm2();
    let record = Record {
        messages: vec![Message::new("user", "GO->")],
        input: None,
        response: PASSAGE.into(),
    };
    let opts = TokenizeOptions {
        template: Template::Raw,
        add_eos: true,
        max_length: None,
    };
    let (examples, _) = tokenize(lm, &[record], &opts).unwrap();
    let prompt = examples[0].prompt_ids.clone();
    let passage = examples[0].response_ids.clone(); // ends with EOS
    assert!(passage.len() > 100, "{} tokens", passage.len());

    let adapter = adapter_from_spec(
        &lm.decoder,
        r#"{"interventions": [{"kind": "loreft", "layers": "15;20;25", "rank": 8, "positions": "l1"}]}"#,
        42,
        DType::F32,
    );
    let d = lm.decoder.config().hidden_size;
    let params: usize = adapter
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    assert_eq!(params, 3 * (2 * 8 * d + 8));
    assert!(params <= 30_000);

    let greedy = GenerationConfig {
        max_new_tokens: passage.len() + 8,
        stop_ids: lm.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let mut adapter = adapter;
    let before = generate(
        &lm.decoder,
        &lm.tokenizer,
        std::slice::from_ref(&prompt),
        &greedy,
        &mut adapter,
        &mut |_, _| {},
    )
    .unwrap();
    assert_ne!(
        before[0].text, PASSAGE,
        "the untrained adapter already recites it"
    );

    let cfg = TrainConfig {
        epochs: 100,
        batch_size: 1,
        grad_accum: 1,
        optim: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        max_grad_norm: 1.0,
        seed: 42,
        cache_prefix: true,
        cache_budget_bytes: 1 << 30,
        checkpoint_every: None,
        eval_samples: 0,
    };
    let mut trainer = Trainer::new(lm, adapter, examples, Vec::new(), cfg).unwrap();
    trainer.run(&mut |_| {}, &|| false).unwrap();
    let last = trainer.metrics.last().unwrap().loss;
    let mut adapter = trainer.adapter;
    adapter.set_training(false);
    let after = generate(
        &lm.decoder,
        &lm.tokenizer,
        &[prompt],
        &greedy,
        &mut adapter,
        &mut |_, _| {},
    )
    .unwrap();
    // Generated ids exclude the stop id; the passage's last id is EOS.
    assert_eq!(
        after[0].ids,
        passage[..passage.len() - 1],
        "final loss {last}: got {:?}",
        after[0].text
    );
    assert_eq!(after[0].text, PASSAGE);
}
