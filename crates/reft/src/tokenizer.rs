//! Tokenizers from a Hugging Face `tokenizer.json` or from the vocabulary stored in a GGUF file.
//!
//! A GGUF file carries the BPE vocabulary, merges, token types and a pre-tokenizer name instead of
//! a `tokenizer.json`; we rebuild the equivalent `tokenizers` pipeline from them, so both sources
//! run through the same, well-tested implementation.

use std::path::Path;

use serde_json::{json, Value};

use crate::weights::GgufFile;
use crate::{Error, Result};

/// A tokenizer plus the special ids a generation loop needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence ids (generation stops at any of them).
    pub eos_ids: Vec<u32>,
    /// Padding id.
    pub pad_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json`; special ids are filled in later from the model's configs.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer(format!("{} not found", path.display())));
        }
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // Some files (sentence-transformers exports among them) pad every encoding to a fixed
        // length and truncate; batching and length limits are ours to apply, so both go.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            bos_id: None,
            eos_ids: Vec::new(),
            pad_id: None,
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_as("tokenizer.ggml.model", |v| v.to_string().cloned())?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
                 use the model's Hugging Face folder with its tokenizer.json instead",
                g.path.display()
            )));
        }
        let tokens: Vec<String> = g.meta_as("tokenizer.ggml.tokens", |v| {
            v.to_vec()?.iter().map(|t| t.to_string().cloned()).collect()
        })?;
        let merges: Vec<String> = g.meta_as("tokenizer.ggml.merges", |v| {
            v.to_vec()?.iter().map(|t| t.to_string().cloned()).collect()
        })?;
        let types: Vec<i32> = match g.content.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => g.meta_as("tokenizer.ggml.token_type", |v| {
                v.to_vec()?.iter().map(|t| t.to_i32()).collect()
            })?,
            None => vec![1; tokens.len()],
        };
        let pre = match g.content.metadata.get("tokenizer.ggml.pre") {
            Some(_) => g.meta_as("tokenizer.ggml.pre", |v| v.to_string().cloned())?,
            None => "default".to_string(),
        };
        let spec = byte_level_bpe_json(&tokens, &merges, &types, &pre)?;
        let inner: tokenizers::Tokenizer =
            serde_json::from_value::<tokenizers::Tokenizer>(spec).map_err(tk_err)?;
        let id = |key: &str| g.meta_usize(key).ok().map(|x| x as u32);
        Ok(Self {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_id: id("tokenizer.ggml.padding_token_id"),
        })
    }

    /// Token ids of `text`, without adding special tokens (special-token text is recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` with the tokenizer's own post-processing (e.g. `[CLS] … [SEP]`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Ids and token types of a text pair with the tokenizer's own post-processing (BERT:
    /// `[CLS] a [SEP] b [SEP]`, types 0 then 1).
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let e = self.inner.encode((a, b), true).map_err(tk_err)?;
        Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec()))
    }

    /// Text of `ids`; special tokens are kept unless `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    /// The id of a token's exact text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a vocabulary entry.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.json` equivalent of a GGUF byte-level BPE vocabulary.
fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    types: &[i32],
    pre: &str,
) -> Result<Value> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
               "invert": false})
    };
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "default" | "gpt2" | "gpt-2" | "starcoder" | "refact" => byte_level(true),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_REGEX), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_REGEX), byte_level(false)]}),
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2)"
            )))
        }
    };
    if types.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "GGUF has {} tokens but {} token types",
            tokens.len(),
            types.len()
        )));
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED)
        .map(|(i, (t, _))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false,
                   "special": true})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}
