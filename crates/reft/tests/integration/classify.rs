//! Sequence classification with a frozen encoder: on SST-2 sentences (fetched with pip) a
//! mean-pooling head alone (a logistic-regression probe) and a LoReFT trained together with the
//! same head both learn far above chance, as do the BERT pooler and RoBERTa-style heads; a
//! regression head fits the labels as numbers, a multi-label head learns topic sets; bad labels
//! are refused.

use crate::common::adapter_for_dims;
use candle_core::{DType, Device, Tensor};
use reft::adapter::Adapter;
use reft::eval::metrics::accuracy;
use reft::model::bert::Encoder;
use reft::tokenizer::Tokenizer;
use reft::train::classify::{
    hidden_states, predict, score, train_classifier, ClassifyConfig, Head, HeadKind, HeadSpec,
    Inputs, Labels, Problem,
};

/// The adapter's first trainable tensor, flattened (to see whether training moved it).
fn first_param(a: &Adapter) -> Vec<f32> {
    a.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn probe_and_loreft_with_head_learn_sst2() {
    let dev = Device::Cpu;
    let (encoder, tok, texts, labels) = sst2(240);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
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
    let probe = Head::mean(d, 2, 1, &dev).unwrap();
    let losses = train_classifier(
        &encoder,
        &tok,
        None,
        &probe,
        Inputs::single(train_x),
        Labels::Classes(train_y),
        &cc,
    )
    .unwrap();
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
    let probe_acc = accuracy(
        predict(&encoder, &tok, None, &probe, Inputs::single(test_x), &cc)
            .unwrap()
            .classes()
            .unwrap(),
        test_y,
    );

    let mut adapter = adapter_for_dims(
        encoder.config().num_layers,
        d,
        r#"{"interventions": [{"kind": "loreft", "layers": "2;4", "rank": 4, "positions": "f1+l1"}]}"#,
        42,
        DType::F32,
    );
    let before = first_param(&adapter);
    let head = Head::mean(d, 2, 1, &dev).unwrap();
    train_classifier(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs::single(train_x),
        Labels::Classes(train_y),
        &cc,
    )
    .unwrap();
    assert_ne!(
        before,
        first_param(&adapter),
        "the intervention was not trained"
    );
    let acc = accuracy(
        predict(
            &encoder,
            &tok,
            Some(&mut adapter),
            &head,
            Inputs::single(test_x),
            &cc,
        )
        .unwrap()
        .classes()
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
        Labels::Classes(&[0, 7]),
        &cc,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("label 7"), "{err}");
}

/// Text pairs (RTE): `[CLS] a [SEP] b [SEP]` with token types 0 then 1 reach the encoder, a
/// LoReFT and head train on them, and pairs that do not line up with the texts are refused (in
/// training, prediction and the encoder pass).
#[test]
fn text_pairs_are_encoded_with_token_types_and_train() {
    let dev = Device::Cpu;
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |m| eprintln!("{m}")).unwrap();
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

    let data = reft::hub::eval_dataset("glue/rte/validation", &mut |m| eprintln!("{m}")).unwrap();
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
    let head = Head::mean(d, 2, 1, &dev).unwrap();
    let cc = ClassifyConfig {
        epochs: 2,
        batch_size: 16,
        ..Default::default()
    };
    let losses = train_classifier(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::pairs(&a, &b),
        Labels::Classes(&y),
        &cc,
    )
    .unwrap();
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
        Labels::Classes(&y),
        &cc,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("second texts"), "{err}");
    // So are they where the encoder is run directly (they were once padded with empty texts).
    for short in [&b[..1], &b[..3]] {
        let err = hidden_states(&encoder, &tok, None, Inputs::pairs(&a[..2], short), 128)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("2 texts and {} second texts", short.len())),
            "{err}"
        );
    }
    let err = predict(&encoder, &tok, None, &head, Inputs::pairs(&a, &b[..3]), &cc)
        .unwrap_err()
        .to_string();
    assert!(err.contains("32 texts and 3 second texts"), "{err}");
}

/// MiniLM and the first `n` SST-2 validation sentences with their labels.
fn sst2(n: usize) -> (Encoder, Tokenizer, Vec<String>, Vec<usize>) {
    let dev = Device::Cpu;
    let data = reft::hub::eval_dataset("glue/sst2/validation", &mut |m| eprintln!("{m}")).unwrap();
    let (encoder, tok) = reft::load::load_encoder("all-minilm-l6-v2", &dev, &mut |_| {}).unwrap();
    let (rows, _) = reft::data::read_rows(&data, &["sentence", "label"]).unwrap();
    let texts = rows[..n]
        .iter()
        .map(|(_, r)| r["sentence"].as_str().unwrap().to_string())
        .collect();
    let labels = rows[..n]
        .iter()
        .map(|(_, r)| r["label"].as_u64().unwrap() as usize)
        .collect();
    (encoder, tok, texts, labels)
}

/// The BERT pooler head (its dense layer from MiniLM's `pooler.dense`, classifier new) and the
/// RoBERTa-style head (both layers new), trained with dropout 0.1 from the config on frozen
/// `[CLS]` states, classify 240 held-out SST-2 sentences above chance by more than three
/// standard errors (measured: 0.667 and 0.671; MiniLM was trained for mean pooling, so its
/// `[CLS]` state carries less than the mean); with a LoReFT on `[CLS]` the gradient reaches
/// the intervention through the first-token head.
#[test]
fn pooler_and_roberta_heads_learn_sst2() {
    let (encoder, tok, texts, labels) = sst2(560);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (train_x, test_x) = texts.split_at(320);
    let (train_y, test_y) = labels.split_at(320);
    let cc = ClassifyConfig {
        epochs: 5,
        batch_size: 16,
        optim: reft::train::AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    // The held-out sentences are encoded once for both heads.
    let encoded: Vec<(Tensor, Vec<Vec<u32>>)> = test_x
        .chunks(40)
        .map(|c| hidden_states(&encoder, &tok, None, Inputs::single(c), 128).unwrap())
        .collect();
    for (kind, from) in [
        (HeadKind::Pooler, vec!["pooler.dense"]),
        (HeadKind::Roberta, vec![]),
    ] {
        let spec = HeadSpec {
            kind,
            problem: Problem::SingleLabel,
            num_labels: 2,
        };
        let head = Head::for_encoder(&encoder, spec, 3).unwrap();
        assert_eq!(head.from_checkpoint(), from.as_slice());
        assert_eq!(head.dropout(), 0.1);
        assert_eq!(head.vars().len(), 4);
        let losses = train_classifier(
            &encoder,
            &tok,
            None,
            &head,
            Inputs::single(train_x),
            Labels::Classes(train_y),
            &cc,
        )
        .unwrap();
        let mut pred = Vec::new();
        for (hidden, mask) in &encoded {
            let logits = head.forward(hidden, mask, None).unwrap();
            let p = Problem::SingleLabel.decode(&logits).unwrap();
            pred.extend_from_slice(p.classes().unwrap());
        }
        let acc = accuracy(&pred, test_y);
        eprintln!(
            "{kind} head: loss {:.3} → {:.3}, held-out accuracy {acc:.3}",
            losses[0],
            losses.last().unwrap()
        );
        assert!(acc > 0.6, "{kind} head accuracy {acc}");
    }

    let d = encoder.config().hidden_size;
    let mut adapter = adapter_for_dims(
        encoder.config().num_layers,
        d,
        r#"{"interventions": [{"kind": "loreft", "layers": "4", "rank": 2, "positions": "f1"}]}"#,
        42,
        DType::F32,
    );
    let before = first_param(&adapter);
    let head = Head::for_encoder(
        &encoder,
        HeadSpec {
            kind: HeadKind::Roberta,
            problem: Problem::SingleLabel,
            num_labels: 2,
        },
        3,
    )
    .unwrap();
    let few = ClassifyConfig { epochs: 1, ..cc };
    train_classifier(
        &encoder,
        &tok,
        Some(&mut adapter),
        &head,
        Inputs::single(&train_x[..32]),
        Labels::Classes(&train_y[..32]),
        &few,
    )
    .unwrap();
    assert_ne!(
        before,
        first_param(&adapter),
        "the intervention was not trained"
    );
}

/// Regression (MSE on one output): SST-2 labels as the numbers 0.0 and 1.0, a mean head and a
/// LoReFT; the held-out predictions correlate with the targets (Pearson > 0.4), and class ids
/// given to a regression head are refused.
#[test]
fn regression_head_fits_sst2_labels_as_numbers() {
    let (encoder, tok, texts, labels) = sst2(240);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let values: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    let (train_x, test_x) = texts.split_at(160);
    let (train_y, test_y) = values.split_at(160);
    let d = encoder.config().hidden_size;
    let spec = HeadSpec {
        kind: HeadKind::Mean,
        problem: Problem::Regression,
        num_labels: 1,
    };
    let head = Head::new(spec, d, 1, &Device::Cpu).unwrap();
    let cc = ClassifyConfig {
        epochs: 3,
        batch_size: 16,
        ..Default::default()
    };
    let losses = train_classifier(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::single(train_x),
        Labels::Values(train_y),
        &cc,
    )
    .unwrap();
    let pred = predict(&encoder, &tok, None, &head, Inputs::single(test_x), &cc).unwrap();
    let scores = score(&pred, Labels::Values(test_y), 1).unwrap();
    eprintln!(
        "regression: loss {:.3} → {:.3}, held-out {scores:?}",
        losses[0],
        losses.last().unwrap()
    );
    let get = |k: &str| scores.iter().find(|s| s.0 == k).unwrap().1;
    assert!(get("pearson") > 0.4, "{scores:?}");
    assert!(get("spearman") > 0.3, "{scores:?}");
    // Predicting the mean (0.5) everywhere scores 0.25; the head does better.
    assert!(get("mse") < 0.22, "{scores:?}");
    assert!(
        *losses.last().unwrap() < losses[0],
        "the loss did not fall: {losses:?}"
    );

    let err = train_classifier(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::single(&train_x[..2]),
        Labels::Classes(&[0, 1]),
        &cc,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("regression"), "{err}");
}

/// Multi-label (BCE with logits): sentences that mention any subset of three topics (animals,
/// food, weather), with different words in training and test; the trained head names the
/// topics of unseen sentences.
#[test]
fn multi_label_head_learns_topic_sets() {
    let (encoder, tok) =
        reft::load::load_encoder("all-minilm-l6-v2", &Device::Cpu, &mut |_| {}).unwrap();
    let train_words = [
        ["the dog", "a cat", "the horse", "a rabbit"],
        ["pizza", "fresh bread", "some soup", "rice"],
        ["heavy rain", "snow", "a storm", "strong wind"],
    ];
    let test_words = [
        ["the puppy", "a kitten"],
        ["pasta", "a sandwich"],
        ["thunder", "hail"],
    ];
    let make = |words: &[[&str; 4]], n: usize| {
        let mut texts = Vec::new();
        let mut sets = Vec::new();
        for mask in 1u32..8 {
            for i in 0..n {
                let topics: Vec<usize> = (0..3).filter(|t| mask & (1 << t) != 0).collect();
                let parts: Vec<&str> = topics.iter().map(|&t| words[t][i % 4]).collect();
                texts.push(format!("Today I saw {}.", parts.join(" and ")));
                sets.push(topics);
            }
        }
        (texts, sets)
    };
    let (train_x, train_y) = make(&train_words, 4);
    let padded: Vec<[&str; 4]> = test_words
        .iter()
        .map(|w| [w[0], w[1], w[0], w[1]])
        .collect();
    let (test_x, test_y) = make(&padded, 2);
    let spec = HeadSpec {
        kind: HeadKind::Mean,
        problem: Problem::MultiLabel,
        num_labels: 3,
    };
    let head = Head::new(spec, encoder.config().hidden_size, 5, &Device::Cpu).unwrap();
    let cc = ClassifyConfig {
        epochs: 15,
        batch_size: 7,
        optim: reft::train::AdamWConfig {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let refs: Vec<&str> = train_x.iter().map(String::as_str).collect();
    train_classifier(
        &encoder,
        &tok,
        None,
        &head,
        Inputs::single(&refs),
        Labels::Sets(&train_y),
        &cc,
    )
    .unwrap();
    let refs: Vec<&str> = test_x.iter().map(String::as_str).collect();
    let pred = predict(&encoder, &tok, None, &head, Inputs::single(&refs), &cc).unwrap();
    let scores = score(&pred, Labels::Sets(&test_y), 3).unwrap();
    eprintln!("multi-label held-out: {scores:?}");
    let get = |k: &str| scores.iter().find(|s| s.0 == k).unwrap().1;
    assert!(get("micro_f1") > 0.85, "{scores:?}");
    assert!(get("subset_accuracy") > 0.6, "{scores:?}");
}
