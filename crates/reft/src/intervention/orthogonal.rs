//! Orthonormal `R` (SPEC §2): initialisation like `torch.nn.init.orthogonal_`, and
//! differentiable Householder parametrisations that keep `R Rᵀ = I` through any optimiser step.
//!
//! Training uses [`reflect_from`]: PyTorch's trivialised Householder map (what pyreft trains)
//! without its frozen `d × d` basis. PyTorch computes `Rᵀ = B · H₁ ⋯ H_r I[:, :r]` with a basis
//! `B` whose first `r` columns are the initial `Rᵀ` and raw vectors starting at `e_i`; moving
//! `B` inside the product turns it into reflections about `w_i = b_i + P_i x_i` applied to the
//! initial `Rᵀ` directly, where `b_i` is its column `i` and `P_i` removes the components along
//! `b_1 … b_i`. So only `Rᵀ₀` (`d × r`) and the raw `x` (`d × r`, starting at 0) are kept — the
//! same steps as pyreft's in the directions that matter, without a 64 MiB buffer at `d = 4096`.
//! [`householder`] is the plain map with `V = tril(A, −1) + I[:, :r]`.

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::Result;

/// `Rᵀ` `[d, r]` from the raw matrix `a` `[d, r]` and signs `s` `[r]` (differentiable in `a`).
pub fn householder(a: &Tensor, signs: &Tensor) -> Result<Tensor> {
    let (d, r) = a.dims2()?;
    let dev = a.device();
    let dt = a.dtype();
    let (lower, eye) = masks(d, r, dt, dev)?;
    let v = ((a * &lower)? + &eye)?;
    let mut x = eye;
    for i in (0..r).rev() {
        let vi = v.narrow(1, i, 1)?; // [d, 1]
        let tau = (vi.sqr()?.sum_all()?.recip()? * 2.0)?;
        let proj = vi.t()?.matmul(&x)?; // [1, r]
        x = (x - vi.matmul(&proj)?.broadcast_mul(&tau)?)?;
    }
    Ok(x.broadcast_mul(&signs.reshape((1, r))?)?)
}

/// `Rᵀ` `[d, r]` from the raw `x` `[d, r]` around the base `Rᵀ₀` `[d, r]` (orthonormal
/// columns): `−H'₁ ⋯ H'_r Rᵀ₀` with `H'_i` the reflection about `w_i = b_i + x_i − B_{≤i} B_{≤i}ᵀ x_i`.
/// At `x = 0` it is `Rᵀ₀`; it is orthonormal for every `x`; differentiable in `x`.
pub fn reflect_from(x: &Tensor, base: &Tensor) -> Result<Tensor> {
    let (_, r) = x.dims2()?;
    let mut q = base.clone();
    for i in (0..r).rev() {
        let b_le = base.narrow(1, 0, i + 1)?; // [d, i+1]
        let xi = x.narrow(1, i, 1)?; // [d, 1]
        let w = ((base.narrow(1, i, 1)? + &xi)? - b_le.matmul(&b_le.t()?.matmul(&xi)?)?)?;
        let tau = (w.sqr()?.sum_all()?.recip()? * 2.0)?;
        let proj = w.t()?.matmul(&q)?; // [1, r]
        q = (q - w.matmul(&proj)?.broadcast_mul(&tau)?)?;
    }
    Ok(q.neg()?)
}

/// The strict lower-triangular mask and `I[:, :r]`, both `[d, r]`.
fn masks(d: usize, r: usize, dt: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut lower = vec![0f32; d * r];
    let mut eye = vec![0f32; d * r];
    for row in 0..d {
        for col in 0..r {
            if row > col {
                lower[row * r + col] = 1.0;
            } else if row == col {
                eye[row * r + col] = 1.0;
            }
        }
    }
    let t = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (d, r), dev)?.to_dtype(dt)?) };
    Ok((t(lower)?, t(eye)?))
}

/// The raw matrix `A` `[d, r]` and signs `s` `[r]` with `householder(A, s) = q` for `q` `[d, r]`
/// with orthonormal columns (Householder QR of `q`, whose triangular factor is `diag(±1)`).
pub fn householder_inverse(q: &[f64], d: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = q.to_vec();
    let mut a = vec![0f64; d * r];
    let mut signs = vec![1f64; r];
    for i in 0..r {
        let norm = (i..d).map(|k| m[k * r + i].powi(2)).sum::<f64>().sqrt();
        let x0 = m[i * r + i];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        // v = x − α e₁, scaled so that v[0] = 1.
        let v0 = x0 - alpha;
        let v: Vec<f64> = (i..d)
            .map(|k| if k == i { 1.0 } else { m[k * r + i] / v0 })
            .collect();
        let vnorm2: f64 = v.iter().map(|x| x * x).sum();
        let tau = 2.0 / vnorm2;
        for col in 0..r {
            let dot: f64 = (i..d).map(|k| v[k - i] * m[k * r + col]).sum();
            for k in i..d {
                m[k * r + col] -= tau * v[k - i] * dot;
            }
        }
        for k in i + 1..d {
            a[k * r + i] = v[k - i];
        }
        signs[i] = alpha.signum();
    }
    (a, signs)
}

/// A random `[d, r]` matrix with orthonormal columns: QR of a Gaussian matrix with the sign fix
/// (`torch.nn.init.orthogonal_`).
pub fn random_orthonormal(d: usize, r: usize, rng: &mut impl Rng) -> Vec<f64> {
    let normal = rand::distributions::Uniform::new(0.0f64, 1.0);
    let mut g: Vec<f64> = (0..d * r)
        .map(|_| {
            // Box–Muller: two uniforms to one standard normal.
            let (u1, u2): (f64, f64) = (rng.sample(normal).max(1e-300), rng.sample(normal));
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    // Modified Gram–Schmidt; the diagonal of the triangular factor is positive, which is the
    // sign fix (`Q · sign(diag(R))`) of PyTorch's init.
    for i in 0..r {
        for j in 0..i {
            let dot: f64 = (0..d).map(|k| g[k * r + i] * g[k * r + j]).sum();
            for k in 0..d {
                g[k * r + i] -= dot * g[k * r + j];
            }
        }
        let n = (0..d).map(|k| g[k * r + i].powi(2)).sum::<f64>().sqrt();
        for k in 0..d {
            g[k * r + i] /= n;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn inverse_then_forward_reproduces_q() -> Result<()> {
        let (d, r) = (12, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let q = random_orthonormal(d, r, &mut rng);
        let (a, s) = householder_inverse(&q, d, r);
        let dev = Device::Cpu;
        let at = Tensor::from_vec(a, (d, r), &dev)?;
        let st = Tensor::from_vec(s, r, &dev)?;
        let back = householder(&at, &st)?.flatten_all()?.to_vec1::<f64>()?;
        for (x, y) in back.iter().zip(&q) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        Ok(())
    }

    #[test]
    fn reflections_start_at_the_base_and_stay_orthonormal() -> Result<()> {
        let (d, r) = (12, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let q0 = random_orthonormal(d, r, &mut rng);
        let dev = Device::Cpu;
        let base = Tensor::from_vec(q0.clone(), (d, r), &dev)?;
        let at0 = reflect_from(&Tensor::zeros((d, r), DType::F64, &dev)?, &base)?;
        let diff = (at0 - &base)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        let x = Tensor::randn(0f64, 0.5, (d, r), &dev)?;
        let q = reflect_from(&x, &base)?;
        let gram = q.t()?.matmul(&q)?.to_vec2::<f64>()?;
        for (i, row) in gram.iter().enumerate() {
            for (j, &g) in row.iter().enumerate() {
                assert!((g - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn any_raw_matrix_gives_orthonormal_columns() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (10, 3), &dev)?;
        let s = Tensor::new(&[1f64, -1.0, 1.0], &dev)?;
        let q = householder(&a, &s)?;
        let gram = q.t()?.matmul(&q)?.to_vec2::<f64>()?;
        for (i, row) in gram.iter().enumerate() {
            for (j, &g) in row.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((g - want).abs() < 1e-12);
            }
        }
        Ok(())
    }
}
