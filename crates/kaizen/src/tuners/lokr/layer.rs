//! LoKr's ΔW: the Kronecker product `kron(w1, w2)` (PEFT's `make_kron`), with its backward;
//! and PEFT's `factorization`. The layer around it, with scale and dropouts, is
//! `lycoris::LycorisLayer`.

use candle_core::Tensor;

use crate::tuners::lycoris::{DeltaWeight, Factor};
use crate::Result;

#[derive(Debug)]
pub struct Kron {
    /// (a, c): `lokr_w1`, or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c)
    pub w1: Factor,
    /// (b, d): `lokr_w2`, or `lokr_w2_a` (b, r) @ `lokr_w2_b` (r, d)
    pub w2: Factor,
    /// [a, b, c, d]: out = a b, in = c d
    pub dims: [usize; 4],
}

impl DeltaWeight for Kron {
    fn factors(&self) -> [&Factor; 2] {
        [&self.w1, &self.w2]
    }

    fn factors_mut(&mut self) -> [&mut Factor; 2] {
        [&mut self.w1, &mut self.w2]
    }

    /// ΔW[i b + j, k d + l] = w1[i, k] w2[j, l]
    fn combine(&self, m1: &Tensor, m2: &Tensor) -> Result<Tensor> {
        let [a, b, c, d] = self.dims;
        let k = m1
            .reshape((a, 1, c, 1))?
            .broadcast_mul(&m2.reshape((1, b, 1, d))?)?; // (a, b, c, d)
        Ok(k.reshape((a * b, c * d))?)
    }

    /// With g (a, b, c, d) regrouped as H (a c, b d): d w1 = H vec(w2), d w2 = vec(w1)ᵀ H.
    fn split(&self, g: &Tensor, m1: &Tensor, m2: &Tensor) -> Result<(Tensor, Tensor)> {
        let [a, b, c, d] = self.dims;
        let h = g
            .reshape((a, b, c, d))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((a * c, b * d))?;
        let d1 = h.matmul(&m2.reshape((b * d, 1))?)?.reshape((a, c))?;
        let d2 = m1.reshape((1, a * c))?.matmul(&h)?.reshape((b, d))?;
        Ok((d1, d2))
    }
}

/// PEFT's `factorization(dimension, factor)`: (m, n) with m n = dimension and m <= n; with
/// factor > 0 dividing the dimension, (factor, dimension / factor) as given; else the divisor
/// pair with the smallest sum whose smaller side stays at most `factor` (-1: no limit).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let limit = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (m, n) = (n, m);
    }
    (m, n)
}

#[cfg(test)]
mod tests {
    use super::factorization;

    /// PEFT's docstring examples, and a factor that does not divide.
    #[test]
    fn factorization_as_peft() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(96, 5), (4, 24));
        assert_eq!(factorization(128, 3), (2, 64));
        assert_eq!(factorization(64, 100), (8, 8));
    }
}
