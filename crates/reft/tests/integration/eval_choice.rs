//! Evaluation on SmolLM2. Multiple choice: the option log-likelihoods computed over the cached
//! question equal a full forward pass per option (with and without a LoReFT on the question's
//! last token), records in list or ARC shape are read with their answers, and the report's
//! accuracies follow from those log-likelihoods. Generation: greedy answers scored by
//! normalised exact match.

use crate::common::*;
use candle_core::{DType, Device, Tensor, D};
use reft::eval::choice::option_log_likelihoods;
use reft::eval::{evaluate_choice, read_choice_items, ChoiceFields, ChoiceFormat, ChoiceItem};
use reft::model::llama::ForwardInput;
use reft::model::{Hooks, NoHooks, PromptLayout};
use reft::LanguageModel;

/// Each option's summed log-likelihood from one full pass over question + option.
fn full_pass(lm: &LanguageModel, item: &ChoiceItem, hooks: &mut dyn Hooks) -> Vec<f64> {
    let prompt = format!("Question: {}\nAnswer:", item.question);
    let p = lm.tokenizer.encode_with_special_tokens(&prompt).unwrap();
    item.choices
        .iter()
        .map(|c| {
            let o = lm.tokenizer.encode(&format!(" {c}")).unwrap();
            let ids: Vec<u32> = p.iter().chain(&o).copied().collect();
            hooks
                .prepare(&PromptLayout::unpadded(vec![p.len()]))
                .unwrap();
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let h = lm
                .decoder
                .forward(&ForwardInput::new(&t), hooks, None)
                .unwrap();
            let logits = lm
                .decoder
                .lm_head(
                    &h.squeeze(0)
                        .unwrap()
                        .narrow(0, p.len() - 1, o.len())
                        .unwrap(),
                )
                .unwrap();
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let tg = Tensor::new(o.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            let v: Vec<f32> = logp
                .gather(&tg, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            v.iter().map(|&x| x as f64).sum()
        })
        .collect()
}

fn item() -> ChoiceItem {
    ChoiceItem {
        question: "What is the capital of France?".into(),
        choices: vec![
            "Paris".into(),
            "London".into(),
            "a small red bicycle with a bell".into(),
        ],
        answer: 0,
    }
}

#[test]
fn cached_question_scores_equal_full_passes_with_and_without_an_adapter() {
    let lm = smollm2();
    let it = item();
    let cached = option_log_likelihoods(lm, &it, ChoiceFormat::Raw, &mut NoHooks).unwrap();
    let full = full_pass(lm, &it, &mut NoHooks);
    for (a, b) in cached.iter().zip(&full) {
        assert!(
            (a - b).abs() < 2e-3 * b.abs().max(1.0),
            "{cached:?} vs {full:?}"
        );
    }
    assert!(
        cached[0] > cached[1],
        "Paris should beat London: {cached:?}"
    );

    let mut adapter = adapter_from_spec(
        &lm.decoder,
        r#"{"interventions": [{"kind": "loreft", "layers": 15, "rank": 4, "positions": "l1"}]}"#,
        3,
        DType::F32,
    );
    let cached_iv = option_log_likelihoods(lm, &it, ChoiceFormat::Raw, &mut adapter).unwrap();
    let full_iv = full_pass(lm, &it, &mut adapter);
    for (a, b) in cached_iv.iter().zip(&full_iv) {
        assert!(
            (a - b).abs() < 2e-3 * b.abs().max(1.0),
            "{cached_iv:?} vs {full_iv:?}"
        );
    }
    assert!(
        cached_iv
            .iter()
            .zip(&cached)
            .any(|(a, b)| (a - b).abs() > 1e-2),
        "the adapter changed nothing"
    );
}

#[test]
fn items_in_list_and_arc_shapes_and_the_report() {
    let lm = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("items.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"question": "What is the capital of France?", "choices": ["Paris", "London", "a small red bicycle with a bell"], "answer": 0}"#,
            "\n",
            r#"{"question": "Which animal barks?", "choices": {"text": ["cat", "dog", "fish"], "label": ["A", "B", "C"]}, "answerKey": "B"}"#,
            "\n",
            r#"{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": "1"}"#,
            "\n"
        ),
    )
    .unwrap();
    let items = read_choice_items(&path, &ChoiceFields::default()).unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[1].choices, vec!["cat", "dog", "fish"]);
    assert_eq!(
        items.iter().map(|i| i.answer).collect::<Vec<_>>(),
        vec![0, 1, 1]
    );
    let report =
        evaluate_choice(lm, &items, ChoiceFormat::Raw, &mut NoHooks, &mut |_, _| {}).unwrap();
    assert_eq!(report.n, 3);
    // The same decisions from the log-likelihoods themselves.
    let mut norm = 0;
    for it in &items {
        let ll = option_log_likelihoods(lm, it, ChoiceFormat::Raw, &mut NoHooks).unwrap();
        let per_byte: Vec<f64> = ll
            .iter()
            .zip(&it.choices)
            .map(|(l, c)| l / (c.len() + 1) as f64)
            .collect();
        let best = (0..ll.len())
            .max_by(|&a, &b| per_byte[a].total_cmp(&per_byte[b]))
            .unwrap();
        norm += usize::from(best == it.answer);
    }
    assert_eq!(report.accuracy, norm as f64 / 3.0);

    std::fs::write(
        &path,
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 5}\n",
    )
    .unwrap();
    let err = read_choice_items(&path, &ChoiceFields::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2") && err.contains("answer"), "{err}");
}

/// Generation evaluation: greedy chat answers, compared after normalisation (case, punctuation,
/// articles) with any of the references; one item matches, one does not.
#[test]
fn generate_items_are_scored_by_normalised_exact_match() {
    use reft::eval::{evaluate_generate, read_generate_items};
    let lm = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qa.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"prompt": "What is the capital of France? Answer in one sentence.", "answer": ["Paris", "the capital of france is PARIS"]}"#,
            "\n",
            r#"{"prompt": "What is 2 + 2? Answer with a number only.", "answer": "5"}"#,
            "\n"
        ),
    )
    .unwrap();
    let items = read_generate_items(&path, "prompt", "answer").unwrap();
    assert_eq!(items[0].answers.len(), 2);
    let (report, answers) = evaluate_generate(
        lm,
        &items,
        reft::data::Template::Chat,
        24,
        8,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(answers[0], "The capital of France is Paris.");
    assert_eq!(report.n, 2);
    assert_eq!(report.exact_match, 0.5, "{answers:?}");
}
