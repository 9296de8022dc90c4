//! A copy of the `tiny-gpt2` fixture that loads as a whole language model. The fixture ships
//! no tokenizer, and its configs name token 50256 (GPT-2's `<|endoftext|>`), which is past its
//! 512-row embedding. The copy gets a byte-level BPE `tokenizer.json` (the 256 bytes, a few
//! merges and `<|endoftext|>`, all within the vocabulary) and configs that point at it.
//!
//! Shared by the library's tests and the CLI's (which include this file by its path), so it
//! depends on nothing but `serde_json` and `tempfile`.

use std::path::Path;

/// Merges of the stand-in tokenizer, in priority order (`Ġ` is the byte-level space).
const MERGES: [&str; 6] = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a"];

/// Id of `<|endoftext|>` in the stand-in tokenizer: right after the bytes and the merges.
pub const EOS: u32 = 256 + MERGES.len() as u32;

/// GPT-2's map from bytes to printable characters (printable Latin-1 bytes map to themselves,
/// the others to U+0100 onwards, in byte order).
fn byte_char(b: u8) -> char {
    let printable = |c: u8| matches!(c, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + rank).expect("a valid code point")
}

/// The stand-in `tokenizer.json`.
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), b.into());
    }
    for (i, m) in MERGES.iter().enumerate() {
        vocab.insert(m.replace(' ', ""), (256 + i).into());
    }
    vocab.insert("<|endoftext|>".into(), EOS.into());
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": EOS, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": MERGES}
    })
}

/// Copies `<fixtures>/models/tiny-gpt2` into a temporary folder with the stand-in tokenizer and
/// every special id set to its `<|endoftext|>`. No chat template: the ChatML fallback applies.
pub fn tiny_gpt2_folder(fixtures: &Path) -> tempfile::TempDir {
    let src = fixtures.join("models/tiny-gpt2");
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .expect("copy tiny-gpt2's weights");
    for name in ["config.json", "generation_config.json"] {
        let text = std::fs::read_to_string(src.join(name)).expect("tiny-gpt2 config");
        let mut json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        json["bos_token_id"] = EOS.into();
        json["eos_token_id"] = EOS.into();
        std::fs::write(dir.path().join(name), json.to_string()).expect("write config");
    }
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.path().join(name), v.to_string()).expect("write tokenizer file");
    };
    write("tokenizer.json", tokenizer_json());
    write(
        "tokenizer_config.json",
        serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
    );
    dir
}
