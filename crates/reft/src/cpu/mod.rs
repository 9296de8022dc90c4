//! The CPU kernels, in one place, behind "a frozen product" (SPEC §7): the model code asks for
//! `x·Wᵀ` or `g·W` of a frozen weight and never knows which kernel runs.
//!
//! Which path a product takes, and why:
//! * **Training and prefill** (many rows, or a graph): the f32 GEMM of [`math::mm`] (the `gemm`
//!   crate, one single-threaded call per thread over disjoint output blocks). Runs of hook-free
//!   layers are one fused op each ([`fused`] for decoders, [`encoder_fused`] for BERT-family
//!   encoders): forward keeps what the backward needs, the backward forms only `dL/dh`, padding
//!   rows are skipped.
//! * **Inference on a GGUF model, up to [`QUANT_MAX_ROWS`] rows** (decoding, the server's
//!   batch, the LM head): the file's own Q4_0/Q4_1/Q8_0 blocks times f32 activations
//!   ([`ggml`]): one row at a time for single-stream decode, tiles of up to 16 rows otherwise.
//!   Decoding is bound by weight traffic, and blocks are 5–7× smaller than f32 weights.
//! * Everything parallel runs on one small spin-then-park thread team ([`team`]) or rayon's
//!   pool; every compute thread flushes subnormal floats to zero ([`tune_cpu_runtime`]), since
//!   subnormals in backward passes made training 8–30× slower here.
//!
//! No module here imports the model or tensor-level code (`crate::ops`), so there is no import
//! circle: `ops` and `model` use `cpu`, never the reverse.

pub(crate) mod encoder_fused;
pub(crate) mod fused;
pub mod ggml;
pub(crate) mod math;
pub mod team;

/// Up to this many rows, an inference-only product uses the quantized blocks (decoding, and
/// the server's batch of up to this many sequences); above it, the f32 GEMM. Measured on
/// SmolLM2 (2 cores): at 32 rows the block kernel takes 1.08 ms for `[3072 × 576]` against the
/// f32 GEMM's 0.94 ms but 1.01 ms for `[576 × 1536]` against 1.78 ms, and a 32-sequence decode
/// step takes 102 ms with blocks against 112 ms with the f32 weights (16 sequences: 56 against
/// 89 ms). At 64 rows the two are even over a layer's products, and at 128 the f32 GEMM wins on
/// both shapes.
pub const QUANT_MAX_ROWS: usize = 32;

/// Whether an inference-only product of `rows` rows takes a weight's GGUF blocks (when it has
/// them) rather than the f32 GEMM: the one rule every caller (`ops::FrozenLinear`, the slice
/// decode step) follows.
pub fn blocks_serve(rows: usize) -> bool {
    rows <= QUANT_MAX_ROWS
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread (x86-64; a no-op elsewhere).
pub fn set_flush_to_zero_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(deprecated)]
        // SAFETY: reading and writing MXCSR only changes how this thread rounds subnormal floats.
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
}

/// Prepares the process for fast CPU training and inference: flush-to-zero on the calling
/// thread and on every thread of the global rayon pool (which candle and gemm use for CPU
/// kernels), a pinned thread count in `RAYON_NUM_THREADS` when unset, and an allocator that
/// keeps freed memory (see [`keep_freed_memory`]). Call once, early (before other threads
/// exist); later calls only touch the calling thread.
pub fn tune_cpu_runtime() {
    set_flush_to_zero_on_this_thread();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        keep_freed_memory();
        // candle asks for its thread count before every matmul and, unless this variable is
        // set, re-reads /proc/cpuinfo each time (several % of a training step here).
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        // Fails only if the global pool already exists; then set it on each of its threads.
        let built = rayon::ThreadPoolBuilder::new()
            .start_handler(|_| set_flush_to_zero_on_this_thread())
            .build_global();
        if built.is_err() {
            rayon::broadcast(|_| set_flush_to_zero_on_this_thread());
        }
    });
}

/// Makes glibc's allocator reuse freed memory instead of returning it to the system.
///
/// Why: glibc serves every allocation above a threshold (128 KiB at start, raised only as such
/// blocks are freed) with freshly mapped pages and unmaps them on free, and trims the heap top
/// beyond another threshold. A training step allocates and frees many activation buffers of
/// 0.5–3 MB, so each one cost hundreds of page faults: 30,000 faults and ~14 % of a quickstart
/// step on the test machine (0.39–0.40 s → 0.33–0.35 s with this). The largest threshold glibc
/// accepts (32 MiB) and no trimming below 1 GiB leave the peak resident memory unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it is called once, at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
