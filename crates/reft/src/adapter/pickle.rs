//! pyreft's intervention files are `torch.save` pickles; the reader and writer live in
//! [`crate::torch_file`], shared with `pytorch_model.bin` weights.

pub use crate::torch_file::{read_torch_bytes, read_torch_file, write_torch_file, PickleValue};
