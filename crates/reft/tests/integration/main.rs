//! The integration tests, one binary: each module is what used to be its own `tests/*.rs` target.
//! One binary links once instead of fifteen times, which keeps test builds small and quick.

mod common;

mod adapters;
mod classify;
mod continuous_batching;
mod data_columnar;
mod decode_step;
mod eval_choice;
mod fused_encoder;
mod fused_layers;
mod generation;
mod gradients;
mod hub_cache;
mod loading;
mod memorisation;
mod parity;
mod prefix_reuse;
mod pyreft_files;
mod pyreft_interop;
mod sweep;
mod torch_bin;
mod training;
