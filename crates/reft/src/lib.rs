//! # reft — Representation Finetuning on frozen transformer LMs
//!
//! A transformer LM turns tokens into hidden states layer by layer. ReFT keeps every weight of
//! the LM frozen and learns small functions Φ that edit hidden states at chosen places during the
//! forward pass: an *intervention* ⟨Φ, P, l⟩ overwrites the states at positions `P` right after
//! layer `l` with `Φ(h)`, and later layers see the edited states. Only Φ's parameters are trained.
//!
//! This crate provides the frozen backbone with hook points at every layer ([`model`]), loading
//! from Hugging Face folders and GGUF files ([`load`], [`weights`], [`tokenizer`]), chat templates
//! ([`template`]) and generation with a KV cache ([`generate`]).

#![warn(missing_docs)]

pub mod adapter;
pub mod cpu;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod intervention;
pub mod load;
pub mod model;
pub mod ops;
pub mod position;
pub mod quickstart;
pub mod sweep;
pub mod template;
pub mod tokenizer;
pub mod torch_file;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use load::{LanguageModel, LoadOptions};
