use candle_core::{
    quantized::{GgmlDType, QTensor},
    Device, Tensor,
};
use reft::quant::{BlockFormat, QuantWeight};
use std::time::Instant;
fn main() -> reft::Result<()> {
    reft::ops::enable_flush_to_zero();
    let dev = Device::Cpu;
    let (out, inp) = (1536usize, 576usize);
    let w = Tensor::randn(0f32, 1., (out, inp), &dev)?;
    let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
    let data = q.data()?.to_vec();
    let many: Vec<QuantWeight> = (0..90)
        .map(|_| QuantWeight::new(BlockFormat::Q4_1, out, inp, data.clone()).unwrap())
        .collect();
    let x = Tensor::randn(0f32, 1., (1, inp), &dev)?;
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for (label, n_distinct, single) in [
        ("distinct (DRAM)", 90usize, false),
        ("same (cache)", 1, false),
        ("distinct 1 thread", 90, true),
        ("same 1 thread", 1, true),
    ] {
        let mut times = vec![];
        for _ in 0..9 {
            let t = Instant::now();
            let run = || -> reft::Result<()> {
                for i in 0..90 {
                    std::hint::black_box(many[i % n_distinct].matmul_t(&x)?);
                }
                Ok(())
            };
            if single {
                pool1.install(run)?;
            } else {
                run()?;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let bytes = (data.len() * 90) as f64;
        println!(
            "{label}: {:.2} ms per 90 calls, {:.1} GB/s of blocks, {:.1} us/call",
            times[4] * 1e3,
            bytes / times[4] / 1e9,
            times[4] * 1e6 / 90.0
        );
    }
    Ok(())
}
// single-thread comparison
#[allow(dead_code)]
fn _unused() {}
