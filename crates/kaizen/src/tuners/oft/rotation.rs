//! The orthogonal-rotation math OFT and BOFT share (PEFT `peft/tuners/oft/layer.py`
//! `OFTRotationModule`, `peft/tuners/boft/layer.py` `cayley_batch`): the Cayley transform of a
//! batch of skew-symmetric blocks and its backward, and the block-diagonal rotation of a layer's
//! input `x_rot = x · diag(R_0, …, R_{n-1})` with its backward.
//!
//! The Cayley transforms run in f64 on the CPU, block by block (blocks are small: the width over
//! the block count), and hand back f32 tensors.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::Result;

/// How a skew-symmetric Q becomes a rotation R.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cayley {
    /// R = (I - Q)(I + Q)^-1 (`torch.linalg.solve(I + Q, I - Q, left=False)`).
    Exact,
    /// PEFT 0.18+'s truncated Neumann series with this many terms (`num_cayley_neumann_terms`):
    /// I + 2Q + 2Q² + … + 2Q^(k-2) + Q^(k-1) (the last power is at least 3 from 3 terms on).
    Neumann(usize),
}

/// A batch of square blocks, (n, b, b) row-major, in f64.
#[derive(Debug, Clone)]
pub struct Blocks {
    pub n: usize,
    pub b: usize,
    pub data: Vec<f64>,
}

impl Blocks {
    pub fn zeros(n: usize, b: usize) -> Self {
        Blocks {
            n,
            b,
            data: vec![0.0; n * b * b],
        }
    }

    pub fn block(&self, i: usize) -> &[f64] {
        &self.data[i * self.b * self.b..(i + 1) * self.b * self.b]
    }

    /// (n, b, b) f32 tensor.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (self.n, self.b, self.b), &Device::Cpu)?)
    }

    /// From an (n, b, b) tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (n, b, _) = t.dims3()?;
        let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Blocks { n, b, data })
    }

    fn map(&self, f: impl Fn(&[f64]) -> Vec<f64> + Sync) -> Blocks {
        let data = (0..self.n)
            .into_par_iter()
            .flat_map_iter(|i| f(self.block(i)))
            .collect();
        Blocks {
            n: self.n,
            b: self.b,
            data,
        }
    }

    fn zip(&self, o: &Blocks, f: impl Fn(&[f64], &[f64]) -> Vec<f64> + Sync) -> Blocks {
        let data = (0..self.n)
            .into_par_iter()
            .flat_map_iter(|i| f(self.block(i), o.block(i)))
            .collect();
        Blocks {
            n: self.n,
            b: self.b,
            data,
        }
    }
}

// b x b matrices, row-major.
fn eye(b: usize) -> Vec<f64> {
    let mut m = vec![0.0; b * b];
    (0..b).for_each(|i| m[i * b + i] = 1.0);
    m
}

fn mul(a: &[f64], c: &[f64], b: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * b];
    for i in 0..b {
        for k in 0..b {
            let aik = a[i * b + k];
            if aik != 0.0 {
                let (row, src) = (&mut out[i * b..(i + 1) * b], &c[k * b..(k + 1) * b]);
                row.iter_mut().zip(src).for_each(|(o, s)| *o += aik * s);
            }
        }
    }
    out
}

fn transpose(a: &[f64], b: usize) -> Vec<f64> {
    let mut t = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            t[j * b + i] = a[i * b + j];
        }
    }
    t
}

fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// A^-1 by Gauss-Jordan with partial pivoting. I + Q with Q skew-symmetric is never singular
/// (its eigenvalues are 1 + iλ).
fn inverse(a: &[f64], b: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv = eye(b);
    for col in 0..b {
        let p = (col..b)
            .max_by(|&i, &j| m[i * b + col].abs().total_cmp(&m[j * b + col].abs()))
            .expect("non-empty range");
        if p != col {
            for j in 0..b {
                m.swap(p * b + j, col * b + j);
                inv.swap(p * b + j, col * b + j);
            }
        }
        let d = 1.0 / m[col * b + col];
        for j in 0..b {
            m[col * b + j] *= d;
            inv[col * b + j] *= d;
        }
        for i in (0..b).filter(|&i| i != col) {
            let f = m[i * b + col];
            if f != 0.0 {
                for j in 0..b {
                    m[i * b + j] -= f * m[col * b + j];
                    inv[i * b + j] -= f * inv[col * b + j];
                }
            }
        }
    }
    inv
}

impl Cayley {
    /// Coefficients c_k of R = Σ c_k Q^k, as PEFT's `_cayley_batch` adds them.
    fn coefficients(terms: usize) -> Vec<f64> {
        let mut c = vec![1.0];
        if terms > 1 {
            c.push(2.0);
        }
        if terms > 2 {
            c.push(2.0);
            c.extend((3..terms.saturating_sub(1)).map(|_| 2.0));
            c.push(1.0);
        }
        c
    }

    /// R for each skew-symmetric block of q.
    pub fn rotate(self, q: &Blocks) -> Blocks {
        let b = q.b;
        q.map(|q| match self {
            Cayley::Exact => {
                let (mut a, mut num) = (eye(b), eye(b));
                axpy(&mut a, 1.0, q);
                axpy(&mut num, -1.0, q);
                mul(&num, &inverse(&a, b), b)
            }
            Cayley::Neumann(k) => {
                let mut r = vec![0.0; b * b];
                let mut power = eye(b);
                for (i, c) in Self::coefficients(k).into_iter().enumerate() {
                    if i > 0 {
                        power = mul(&power, q, b);
                    }
                    axpy(&mut r, c, &power);
                }
                r
            }
        })
    }

    /// dL/dQ per block from dL/dR (`g`).
    pub fn backward(self, q: &Blocks, g: &Blocks) -> Blocks {
        let b = q.b;
        q.zip(g, |q, g| match self {
            // R (I + Q) = I - Q: dR = -(I + R) dQ (I + Q)^-1, so dQ = -(I + R)ᵀ G (I + Q)^-ᵀ.
            Cayley::Exact => {
                let (mut a, mut num) = (eye(b), eye(b));
                axpy(&mut a, 1.0, q);
                axpy(&mut num, -1.0, q);
                let ainv = inverse(&a, b);
                let mut ir = mul(&num, &ainv, b);
                axpy(&mut ir, 1.0, &eye(b));
                let mut out = mul(&mul(&transpose(&ir, b), g, b), &transpose(&ainv, b), b);
                out.iter_mut().for_each(|v| *v = -*v);
                out
            }
            // d(Q^k) = Σ_j Q^j dQ Q^(k-1-j): dQ = Σ_k c_k Σ_j (Q^j)ᵀ G (Q^(k-1-j))ᵀ.
            Cayley::Neumann(k) => {
                let c = Self::coefficients(k);
                let mut powers_t = vec![eye(b)]; // (Q^j)ᵀ
                let qt = transpose(q, b);
                for j in 1..c.len() {
                    powers_t.push(mul(&powers_t[j - 1], &qt, b));
                }
                let mut out = vec![0.0; b * b];
                for (p, &ck) in c.iter().enumerate().skip(1) {
                    for j in 0..p {
                        let t = mul(&mul(&powers_t[j], g, b), &powers_t[p - 1 - j], b);
                        axpy(&mut out, ck, &t);
                    }
                }
                out
            }
        })
    }
}

/// `x · diag(R_0, …, R_{n-1})`: x (N, n·b) split into n column blocks, each times its R (n, b, b).
pub fn apply(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    let (n, b, _) = r.dims3()?;
    let xb = x.reshape((rows, n, b))?.transpose(0, 1)?.contiguous()?; // (n, N, b)
    let y = xb.matmul(r)?; // (n, N, b)
    Ok(y.transpose(0, 1)?.contiguous()?.reshape((rows, width))?)
}

/// Backward of [`apply`]: (dx (N, n·b), dR (n, b, b)) from x and d(x_rot).
pub fn apply_backward(x: &Tensor, r: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, _) = x.dims2()?;
    let (n, b, _) = r.dims3()?;
    let xb = x.reshape((rows, n, b))?.transpose(0, 1)?.contiguous()?; // (n, N, b)
    let dyb = dy.reshape((rows, n, b))?.transpose(0, 1)?.contiguous()?; // (n, N, b)
    let dr = xb.transpose(1, 2)?.contiguous()?.matmul(&dyb)?; // (n, b, b)
    let rt = r.transpose(1, 2)?.contiguous()?;
    Ok((apply(dy, &rt)?, dr))
}

/// A merged weight W (out, n·b) with the input rotation folded in: `W · diag(R)ᵀ`, so that
/// `x W'ᵀ = (x · diag(R)) Wᵀ` (PEFT's merge: `(oft_mat · Wᵀ)ᵀ`).
pub fn fold_into_weight(w: &Tensor, r: &Tensor) -> Result<Tensor> {
    apply(w, &r.transpose(1, 2)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn skew(b: usize, rng: &mut StdRng) -> Blocks {
        let v = crate::tuners::init::normal(b * b, 0.3, rng);
        let mut q = Blocks::zeros(2, b);
        for blk in 0..2 {
            for i in 0..b {
                for j in 0..b {
                    let s = (v[i * b + j] - v[j * b + i]) as f64 * (blk + 1) as f64;
                    q.data[blk * b * b + i * b + j] = s;
                }
            }
        }
        q
    }

    #[test]
    fn exact_cayley_is_orthogonal_and_neumann_approaches_it() {
        let mut rng = StdRng::seed_from_u64(3);
        let q = skew(5, &mut rng);
        let q = q.map(|x| x.iter().map(|v| v * 0.1).collect());
        let r = Cayley::Exact.rotate(&q);
        for i in 0..2 {
            let rtr = mul(&transpose(r.block(i), 5), r.block(i), 5);
            let err = rtr
                .iter()
                .zip(eye(5))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "RᵀR - I: {err}");
        }
        // (I + Q)^-1 = I - Q + Q² - …, so (I - Q)(I + Q)^-1 = I - 2Q + 2Q² - …: PEFT's series
        // (I + 2Q + 2Q² …) is the Cayley transform of -Q.
        let neg = q.map(|x| x.iter().map(|v| -v).collect());
        let n = Cayley::Neumann(30).rotate(&neg);
        let err = n
            .data
            .iter()
            .zip(&r.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-9, "Neumann(30) vs exact: {err}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = StdRng::seed_from_u64(5);
        let q = skew(4, &mut rng);
        let g = Blocks {
            n: 2,
            b: 4,
            data: crate::tuners::init::normal(32, 1.0, &mut rng)
                .into_iter()
                .map(f64::from)
                .collect(),
        };
        for mode in [Cayley::Exact, Cayley::Neumann(5), Cayley::Neumann(2)] {
            let grad = mode.backward(&q, &g);
            let loss = |q: &Blocks| -> f64 {
                let r = mode.rotate(q);
                r.data.iter().zip(&g.data).map(|(a, b)| a * b).sum()
            };
            for idx in [1, 7, 18, 30] {
                let (mut p, mut m) = (q.clone(), q.clone());
                p.data[idx] += 1e-6;
                m.data[idx] -= 1e-6;
                let fd = (loss(&p) - loss(&m)) / 2e-6;
                assert!(
                    (fd - grad.data[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{mode:?} [{idx}]: {fd} vs {}",
                    grad.data[idx]
                );
            }
        }
    }
}
