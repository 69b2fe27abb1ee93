//! The matrix products of the linear layers and the LM head, in the three shapes training needs:
//! `x Wᵀ` (forward), `dy W` (input gradient) and `dyᵀ x` (weight gradient). By default candle's
//! matmul; with the `openblas` cargo feature, OpenBLAS's `cblas_sgemm` on the same row-major
//! buffers (no copies, no transposes materialised), which on AVX-512 machines runs well above
//! candle's default kernels. Anything that is not 2-D f32 takes candle's path either way.

use candle_core::Tensor;

use crate::Result;

/// a (m, k), b (n, k) -> a bᵀ (m, n).
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "openblas")]
    if let Some(t) = blas::gemm(a, false, b, true)? {
        return Ok(t);
    }
    Ok(a.matmul(&b.t()?)?)
}

/// a (m, k), b (k, n) -> a b (m, n).
pub fn matmul_nn(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "openblas")]
    if let Some(t) = blas::gemm(a, false, b, false)? {
        return Ok(t);
    }
    Ok(a.matmul(b)?)
}

/// a (k, m), b (k, n) -> aᵀ b (m, n).
pub fn matmul_tn(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "openblas")]
    if let Some(t) = blas::gemm(a, true, b, false)? {
        return Ok(t);
    }
    Ok(a.t()?.matmul(b)?)
}

#[cfg(feature = "openblas")]
mod blas {
    use candle_core::{DType, Storage, Tensor};

    use crate::Result;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    #[link(name = "openblas")]
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            order: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    /// op(a) op(b) where op transposes when asked; None when either is not 2-D f32.
    pub fn gemm(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Result<Option<Tensor>> {
        if a.rank() != 2 || b.rank() != 2 || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return Ok(None);
        }
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let ((ar, ac), (br, bc)) = (a.dims2()?, b.dims2()?);
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if tb { (bc, br) } else { (br, bc) };
        if k != k2 {
            return Ok(None); // let candle report the shape error
        }
        let fits = |x: usize| i32::try_from(x).is_ok();
        if ![m, n, k, ar * ac, br * bc, m * n].into_iter().all(fits) {
            return Ok(None);
        }
        let mut c = vec![0f32; m * n];
        {
            let (sa, la) = a.storage_and_layout();
            let (sb, lb) = b.storage_and_layout();
            let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
                return Ok(None);
            };
            let pa = &ca.as_slice::<f32>()?[la.start_offset()..];
            let pb = &cb.as_slice::<f32>()?[lb.start_offset()..];
            if pa.len() < ar * ac || pb.len() < br * bc {
                return Ok(None);
            }
            let flag = |t: bool| if t { TRANS } else { NO_TRANS };
            // SAFETY: both inputs are contiguous row-major f32 buffers of at least rows * cols
            // values (checked above), `c` holds m * n, and every size fits in an i32.
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    flag(ta),
                    flag(tb),
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    pa.as_ptr(),
                    ac as i32,
                    pb.as_ptr(),
                    bc as i32,
                    0.0,
                    c.as_mut_ptr(),
                    n as i32,
                );
            }
        }
        Ok(Some(Tensor::from_vec(c, (m, n), a.device())?))
    }
}
