//! Products with a quantized weight (`nn::quant::QMatrix`): each `(KC x NC)` block of B is
//! dequantized into a scratch (rows in parallel, whole quantization blocks at a time) and packed
//! from there into the same panels a dense weight packs into, so the micro-kernels, the LM
//! head's reuse of a packed B and the thread split are those of the dense path. Depth blocks
//! start on quantization-block boundaries; in bf16, the scratch is rounded 32 values at a time
//! and packed by the bf16 weight's packers. With AMX and bf16 compute, products go to
//! `amx::gemm_quant` instead, whose tasks each dequantize only the rectangle of W they use into
//! a cache-resident scratch (`amx/direct.rs`); without AMX, bf16 products run on `direct.rs`:
//! the forward `x Wᵀ` with 14 rows of W dequantized into an L1 tile at a time, the input
//! gradient `dy W` with each task's columns of W dequantized one depth block at a time. Few
//! rows (decoding) take a matrix-vector path that
//! dequantizes one weight row at a time.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemv::{by_weight_rows, dots, takes};
use super::pack::{as_bf16, bf16_pairs, pack_f32, to_bf16};
use super::tensor::with_slice;
use super::{
    available, available_bf16, block_buffer, gemm_packed, Mat, PackedB, Pair, Weight, KC, NC, NR,
};
use crate::nn::quant::QMatrix;
use crate::Result;

/// A packed element type that can be packed from f32 values.
pub trait FromF32: Weight {
    /// Packs all of `m`'s rows, `NR` to a panel, over its `kc` columns.
    fn pack_from(m: Mat<f32>, kc: usize, dst: &mut [Self::Packed]);
}

impl FromF32 for f32 {
    fn pack_from(m: Mat<f32>, kc: usize, dst: &mut [f32]) {
        for (jp, d) in dst.chunks_mut(kc * NR).enumerate() {
            pack_f32(&m, jp * NR, NR, 0, kc, d);
        }
    }
}

thread_local! {
    static PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

impl FromF32 for bf16 {
    /// Rounded to bf16 first, all at once, then packed by the bf16 weight's packers.
    fn pack_from(m: Mat<f32>, kc: usize, dst: &mut [Pair]) {
        PAIRS.with(|pairs| {
            let mut pairs = pairs.borrow_mut();
            bf16_pairs(m.data, &mut pairs);
            let m = Mat {
                data: as_bf16(&pairs),
                rows: m.rows,
                cols: m.cols,
                rs: m.rs,
                cs: m.cs,
            };
            for (jp, d) in dst.chunks_mut(kc.div_ceil(2) * NR).enumerate() {
                bf16::pack(&m, jp * NR, NR, 0, kc, d);
            }
        })
    }
}

/// Depth blocks of a quantized W: equal blocks of at most KC, each a whole number of
/// quantization blocks of `unit` values.
pub(super) fn kc_block_quant(k: usize, unit: usize) -> usize {
    let most = (KC / unit).max(1) * unit;
    k.div_ceil(k.div_ceil(most).max(1)).next_multiple_of(unit)
}

/// Whether kaizen's kernels run products in `compute` precision on this CPU.
pub(super) fn kernels_for(compute: DType) -> bool {
    match compute {
        DType::BF16 => available_bf16(),
        _ => available(),
    }
}

impl<W: FromF32> PackedB<W> {
    /// B = `qᵀ` (`transposed`: the forward `x Wᵀ`) or `q` (the input gradient `dy W`), packed.
    pub(super) fn from_quant(q: &QMatrix, transposed: bool) -> Result<Self> {
        let (rows, cols) = q.dims();
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let kc_block = kc_block_quant(k, q.block_size().max(W::KSTEP));
        // Panels per task: whole quantization blocks of B's columns when they run along W's
        // rows (the input gradient), one panel when they are W's rows (the forward).
        let group = match transposed {
            true => 1,
            false => q.block_size().max(NR).div_ceil(NR),
        };
        let mut blocks = Vec::new();
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for p0 in (0..k).step_by(kc_block) {
                let kc = kc_block.min(k - p0);
                let steps = kc.div_ceil(W::KSTEP);
                let mut data = block_buffer::<W>(nc.div_ceil(NR) * steps * NR);
                data.par_chunks_mut(group * steps * NR)
                    .enumerate()
                    .try_for_each(|(g, dst)| {
                        let c0 = j0 + g * group * NR;
                        let width = (group * NR).min(j0 + nc - c0);
                        pack_group::<W>(q, transposed, (c0, width), (p0, kc), dst)
                    })?;
                blocks.push(data);
            }
        }
        Ok(PackedB {
            k,
            n,
            kc_block,
            blocks,
        })
    }
}

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs B's columns `c0..c0 + width` (one or a few panels) for depth `p0..p0 + kc` into
/// `dst`, through a dequantized scratch small enough to stay in cache: W's rows `c0..` when
/// `transposed`, else W's rows `p0..` restricted to columns `c0..` (whole quantization blocks).
fn pack_group<W: FromF32>(
    q: &QMatrix,
    transposed: bool,
    (c0, width): (usize, usize),
    (p0, kc): (usize, usize),
    dst: &mut [W::Packed],
) -> Result<()> {
    PANEL.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.resize(width * kc, 0.0);
        let bt = if transposed {
            for (i, row) in buf.chunks_mut(kc).enumerate() {
                q.dequantize_into(c0 + i, p0, row)?;
            }
            Mat::row_major(&buf, width, kc)
        } else {
            for (i, row) in buf.chunks_mut(width).enumerate() {
                q.dequantize_into(p0 + i, c0, row)?;
            }
            Mat::row_major(&buf, kc, width).t()
        };
        W::pack_from(bt, kc, dst);
        Ok(())
    })
}

/// `x (N, cols) -> x qᵀ (N, rows)` when `transposed`, else `x (N, rows) -> x q (N, cols)`, in
/// f32 with products in `q.compute` precision. Without the CPU's kernels: candle's matmul on
/// the dequantized matrix.
pub fn linear_quant(x: &Tensor, q: &QMatrix, transposed: bool) -> Result<Tensor> {
    let (n, kx) = x.dims2()?;
    let (rows, cols) = q.dims();
    let (k, out) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    assert_eq!(
        kx, k,
        "linear_quant: x has {kx} columns, the weight wants {k}"
    );
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if !kernels_for(q.compute) {
        let w = q.to_f32()?.to_dtype(q.compute)?;
        let w = if transposed { w.t()? } else { w };
        return Ok(x.to_dtype(q.compute)?.matmul(&w)?.to_dtype(DType::F32)?);
    }
    let mut c = vec![0f32; n * out];
    with_slice::<f32, _>(&x, |xs| -> Result<()> {
        if transposed && q.int8 && q.int8_forward(n) {
            return q.int8_product(xs, n, &mut c);
        }
        if !transposed && q.int8 && q.int8_input_grad(xs, n, &mut c)? {
            return Ok(());
        }
        if transposed && takes(n, q.compute == DType::BF16) {
            return gemv_quant(xs, n, q, &mut c);
        }
        let a = Mat::row_major(xs, n, k);
        #[cfg(target_arch = "x86_64")]
        if q.compute == DType::BF16 {
            if super::amx::gemm_quant(&a, q, transposed, &mut c)? {
                return Ok(());
            }
            let direct = match transposed {
                true => super::direct::gemm_quant_wt(&a, q, &mut c)?,
                false => super::direct::gemm_quant_w(&a, q, &mut c)?,
            };
            if direct {
                return Ok(());
            }
        }
        match q.compute {
            DType::BF16 => gemm_packed(a, &PackedB::<bf16>::from_quant(q, transposed)?, &mut c),
            _ => gemm_packed(a, &PackedB::<f32>::from_quant(q, transposed)?, &mut c),
        }
        Ok(())
    })??;
    Ok(Tensor::from_vec(c, (n, out), &Device::Cpu)?)
}

thread_local! {
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `c (n, rows) = x (n, cols) qᵀ` for a handful of rows: each weight row is dequantized once
/// (rounded to bf16 when computing in bf16, as the packed path rounds it), four at a time, and
/// dotted with every row of x.
fn gemv_quant(x: &[f32], n: usize, q: &QMatrix, c: &mut [f32]) -> Result<()> {
    let cols = q.dims().1;
    let bf = q.compute == DType::BF16;
    let xr: Vec<f32> = match bf {
        true => x.iter().map(|&v| to_bf16(v).to_f32()).collect(),
        false => x.to_vec(),
    };
    by_weight_rows(n, c, |rows, dst| {
        ROW.with(|buf| -> Result<()> {
            let mut w = buf.borrow_mut();
            for (j0, d) in rows.step_by(4).zip(dst.chunks_mut(4 * n)) {
                w.resize(d.len() / n * cols, 0.0);
                for (j, row) in w.chunks_mut(cols.max(1)).enumerate() {
                    q.dequantize_into(j0 + j, 0, row)?;
                }
                if bf {
                    w.iter_mut().for_each(|v| *v = to_bf16(*v).to_f32());
                }
                dots(&w, &xr, n, d);
            }
            Ok(())
        })
    })
}
