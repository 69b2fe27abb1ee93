//! Causal scaled-dot-product attention with grouped-query heads (HF `eager_attention_forward`),
//! and its backward. Keys may include earlier positions from a KV cache (or a prefix): a query
//! at row `t` of `T` sees every key `s <= S - T + t`.
//!
//! Fused and tiled in the style of FlashAttention-2, on the CPU: memory is linear in the sequence
//! length because no (T, S) score or probability matrix is ever stored whole.
//! - Head `h` reads kv head `h / (H / KVH)` (HF `repeat_kv`, without the copy).
//! - Forward, one rayon task per (batch, query head): for each tile of query rows, walk the key
//!   tiles up to the causal limit (tiles fully masked are skipped) with an online softmax
//!   (running row max and sum), accumulating `P V`. It keeps the output O and the per-row
//!   log-sum-exp (B, H, T).
//! - Backward, one rayon task per (batch, kv head), taking every query head that reads it, so
//!   the dk/dv it accumulates belong to it alone. Per tile it recomputes `S = scale Q K^T` and
//!   `P = exp(S - lse)` (masked keys: 0), then `dV += P^T dO`, `dP = dO V^T`,
//!   `dS = P (dP - D)` with `D = rowsum(dO O)`, `dQ += scale dS K` and `dK += scale dS^T Q`.
//!
//! The tile products are small GEMMs run by the `gemm` crate, single-threaded inside each task;
//! the exponentials use a polynomial that vectorises. Per task the scratch is a few tiles.

use candle_core::{DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::math::exp;
use crate::{Error, Result};

/// Query rows per tile.
const ROWS: usize = 64;
/// Keys per tile.
const KEYS: usize = 128;

/// Saved by the forward for backward.
pub struct AttnCache {
    /// (B, H, T, hd), contiguous.
    q: Tensor,
    /// (B, KVH, S, hd), contiguous.
    k: Tensor,
    v: Tensor,
    /// The output (B, H, T, hd).
    o: Tensor,
    /// Log-sum-exp of each query row's scaled, masked scores: (B, H, T).
    lse: Tensor,
    scale: f64,
}

/// q: (B, H, T, hd), k/v: (B, KVH, S, hd) with H a multiple of KVH -> (B, H, T, hd).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(causal_attention_t(q, k, v, scale)?.0)
}

/// [`causal_attention`], also returning what [`causal_attention_backward`] needs.
pub fn causal_attention_t(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, AttnCache)> {
    let d = Dims::of(q, k, v, scale)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut o = vec![0f32; d.b * d.h * d.t * d.hd];
    let mut lse = vec![0f32; d.b * d.h * d.t];
    if !d.is_empty() {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qd, kd, vd) = (f32s(&qs, ql)?, f32s(&ks, kl)?, f32s(&vs, vl)?);
        let (qn, kn) = (d.t * d.hd, d.s * d.hd);
        // One task per (batch, query head): nothing is accumulated across heads here.
        o.par_chunks_mut(qn)
            .zip(lse.par_chunks_mut(d.t))
            .enumerate()
            .for_each(|(i, (o, lse))| {
                let kv = i / d.rep; // (b H + h) / rep = b KVH + h / rep
                let (k, v) = (&kd[kv * kn..][..kn], &vd[kv * kn..][..kn]);
                let q = &qd[i * qn..][..qn];
                forward_head(&d, q, k, v, o, lse, &mut Scratch::new(d.hd));
            });
    }
    let dev = q.device();
    let o = Tensor::from_vec(o, (d.b, d.h, d.t, d.hd), dev)?;
    let lse = Tensor::from_vec(lse, (d.b, d.h, d.t), dev)?;
    let cache = AttnCache {
        q,
        k,
        v,
        o: o.clone(),
        lse,
        scale,
    };
    Ok((o, cache))
}

/// d_out: (B, H, T, hd) -> (dq (B, H, T, hd), dk, dv (B, KVH, S, hd)).
pub fn causal_attention_backward(
    c: &AttnCache,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(&c.q, &c.k, &c.v, c.scale)?;
    if d_out.dims() != c.q.dims() || d_out.dtype() != DType::F32 {
        return Err(Error::Input(format!(
            "attention backward: d_out is {:?} {:?}, the output was {:?} f32",
            d_out.dims(),
            d_out.dtype(),
            c.q.dims()
        )));
    }
    let d_out = d_out.contiguous()?;
    let mut dq = vec![0f32; d.b * d.h * d.t * d.hd];
    let mut dk = vec![0f32; d.b * d.kvh * d.s * d.hd];
    let mut dv = vec![0f32; d.b * d.kvh * d.s * d.hd];
    if !d.is_empty() {
        let (qs, ql) = c.q.storage_and_layout();
        let (ks, kl) = c.k.storage_and_layout();
        let (vs, vl) = c.v.storage_and_layout();
        let (os, ol) = c.o.storage_and_layout();
        let (ls, ll) = c.lse.storage_and_layout();
        let (gs, gl) = d_out.storage_and_layout();
        let (qd, kd, vd) = (f32s(&qs, ql)?, f32s(&ks, kl)?, f32s(&vs, vl)?);
        let (od, ld, gd) = (f32s(&os, ol)?, f32s(&ls, ll)?, f32s(&gs, gl)?);
        let (qn, kn) = (d.t * d.hd, d.s * d.hd);
        // One task per (batch, kv head), over the `rep` query heads that read it: the task owns
        // their dq rows and the kv head's dk/dv.
        dq.par_chunks_mut(d.rep * qn)
            .zip(dk.par_chunks_mut(kn))
            .zip(dv.par_chunks_mut(kn))
            .enumerate()
            .for_each(|(kv, ((dq, dk), dv))| {
                let mut scratch = Scratch::new(d.hd);
                for (j, dq) in dq.chunks_exact_mut(qn).enumerate() {
                    let i = kv * d.rep + j; // b H + h
                    let head = Head {
                        q: &qd[i * qn..][..qn],
                        k: &kd[kv * kn..][..kn],
                        v: &vd[kv * kn..][..kn],
                        o: &od[i * qn..][..qn],
                        lse: &ld[i * d.t..][..d.t],
                        d_o: &gd[i * qn..][..qn],
                    };
                    backward_head(&d, &head, dq, dk, dv, &mut scratch);
                }
            });
    }
    let dev = d_out.device();
    Ok((
        Tensor::from_vec(dq, (d.b, d.h, d.t, d.hd), dev)?,
        Tensor::from_vec(dk, (d.b, d.kvh, d.s, d.hd), dev)?,
        Tensor::from_vec(dv, (d.b, d.kvh, d.s, d.hd), dev)?,
    ))
}

/// Checked sizes of one attention call, and its scale.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kvh: usize,
    /// Query heads per kv head.
    rep: usize,
    t: usize,
    s: usize,
    hd: usize,
    /// Keys before the first query row: `S - T`.
    past: usize,
    scale: f32,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Self> {
        let (b, h, t, hd) = q.dims4()?;
        let (kb, kvh, s, khd) = k.dims4()?;
        let bad = |what: &str| {
            Err(Error::Input(format!(
                "attention: {what} (q {:?} {:?}, k {:?} {:?}, v {:?} {:?})",
                q.dims(),
                q.dtype(),
                k.dims(),
                k.dtype(),
                v.dims(),
                v.dtype()
            )))
        };
        if v.dims() != k.dims() || kb != b || khd != hd {
            return bad("k and v must be (B, KVH, S, hd) for q (B, H, T, hd)");
        }
        if kvh == 0 || h % kvh != 0 {
            return bad("the query heads must be a multiple of the kv heads");
        }
        if s < t {
            return bad("there must be at least as many keys as queries");
        }
        if [q, k, v].iter().any(|x| x.dtype() != DType::F32) {
            return bad("attention computes in f32");
        }
        Ok(Dims {
            b,
            h,
            kvh,
            rep: h / kvh,
            t,
            s,
            hd,
            past: s - t,
            scale: scale as f32,
        })
    }

    /// True when there is nothing to compute (every output is empty or zero).
    fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.hd == 0
    }

    /// How many keys the last of query rows `i0..i0 + rows` sees.
    fn keys_seen(&self, i0: usize, rows: usize) -> usize {
        self.past + i0 + rows
    }

    /// How many keys of the tile starting at `j0` with `n` keys query row `i` sees.
    fn visible(&self, i: usize, j0: usize, n: usize) -> usize {
        (self.past + i + 1).saturating_sub(j0).min(n)
    }
}

/// The contiguous f32 data of a CPU tensor.
fn f32s<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Input("attention runs on the CPU only".into()));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(Error::Input("attention needs contiguous tensors".into()));
    };
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// Per-task, tile-sized buffers.
struct Scratch {
    /// Scores, then probabilities, of one tile: (ROWS, KEYS).
    p: Vec<f32>,
    /// dP, then dS, of one tile (backward): (ROWS, KEYS).
    ds: Vec<f32>,
    /// Unnormalised output rows of the tile (forward): (ROWS, hd).
    acc: Vec<f32>,
    /// Running row max (forward) or `D = rowsum(dO O)` (backward).
    m: Vec<f32>,
    /// Running row sum (forward).
    l: Vec<f32>,
}

impl Scratch {
    fn new(hd: usize) -> Self {
        Scratch {
            p: vec![0.0; ROWS * KEYS],
            ds: vec![0.0; ROWS * KEYS],
            acc: vec![0.0; ROWS * hd],
            m: vec![0.0; ROWS],
            l: vec![0.0; ROWS],
        }
    }
}

/// One query head: q (T, hd), k/v (S, hd) -> o (T, hd), lse (T).
fn forward_head(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let hd = d.hd;
    for i0 in (0..d.t).step_by(ROWS) {
        let br = ROWS.min(d.t - i0);
        let (m, l, acc) = (&mut sc.m[..br], &mut sc.l[..br], &mut sc.acc[..br * hd]);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        let q = &q[i0 * hd..(i0 + br) * hd];
        let seen = d.keys_seen(i0, br);
        for j0 in (0..seen).step_by(KEYS) {
            let bc = KEYS.min(seen - j0);
            let (kt, vt) = (&k[j0 * hd..(j0 + bc) * hd], &v[j0 * hd..(j0 + bc) * hd]);
            let p = &mut sc.p[..br * bc];
            // S = scale Q K^T, then P = exp(S - running max), 0 where masked.
            let (q_, k_t) = (View::rows(q, hd), View::t(kt, hd));
            matmul((br, bc, hd), p, false, d.scale, q_, k_t);
            for (r, row) in p.chunks_exact_mut(bc).enumerate() {
                let (row, masked) = row.split_at_mut(d.visible(i0 + r, j0, bc));
                masked.fill(0.0);
                if row.is_empty() {
                    continue;
                }
                let max = row_max(row).max(m[r]);
                // The first key tile holds key 0, which every row sees: `m[r]` is finite after it.
                let corr = (m[r] - max).exp();
                l[r] = l[r] * corr + exp_sub(row, max);
                m[r] = max;
                if corr != 1.0 {
                    acc[r * hd..(r + 1) * hd]
                        .iter_mut()
                        .for_each(|a| *a *= corr);
                }
            }
            // acc += P V
            matmul(
                (br, hd, bc),
                acc,
                true,
                1.0,
                View::rows(p, bc),
                View::rows(vt, hd),
            );
        }
        for r in 0..br {
            let inv = 1.0 / l[r];
            let out = &mut o[(i0 + r) * hd..(i0 + r + 1) * hd];
            for (y, a) in out.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                *y = a * inv;
            }
            lse[i0 + r] = m[r] + l[r].ln();
        }
    }
}

/// What backward reads for one query head: q, o, d_o (T, hd), lse (T) and its kv head's k, v
/// (S, hd).
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    lse: &'a [f32],
    d_o: &'a [f32],
}

/// One query head: accumulates into its dq (T, hd) and its kv head's dk/dv (S, hd).
fn backward_head(
    d: &Dims,
    x: &Head,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    sc: &mut Scratch,
) {
    let hd = d.hd;
    for i0 in (0..d.t).step_by(ROWS) {
        let br = ROWS.min(d.t - i0);
        let rows = i0 * hd..(i0 + br) * hd;
        let (q, o, d_o) = (&x.q[rows.clone()], &x.o[rows.clone()], &x.d_o[rows.clone()]);
        let dq = &mut dq[rows];
        let lse = &x.lse[i0..i0 + br];
        // D = rowsum(dO O)
        let dd = &mut sc.m[..br];
        for ((dr, g), y) in dd
            .iter_mut()
            .zip(d_o.chunks_exact(hd))
            .zip(o.chunks_exact(hd))
        {
            *dr = dot(g, y);
        }
        let seen = d.keys_seen(i0, br);
        for j0 in (0..seen).step_by(KEYS) {
            let bc = KEYS.min(seen - j0);
            let keys = j0 * hd..(j0 + bc) * hd;
            let (kt, vt) = (&x.k[keys.clone()], &x.v[keys.clone()]);
            let (dkt, dvt) = (&mut dk[keys.clone()], &mut dv[keys]);
            let (p, ds) = (&mut sc.p[..br * bc], &mut sc.ds[..br * bc]);
            // P = exp(scale Q K^T - lse), 0 where masked
            let (q_, k_t) = (View::rows(q, hd), View::t(kt, hd));
            matmul((br, bc, hd), p, false, d.scale, q_, k_t);
            for (r, row) in p.chunks_exact_mut(bc).enumerate() {
                let (row, masked) = row.split_at_mut(d.visible(i0 + r, j0, bc));
                masked.fill(0.0);
                exp_sub(row, lse[r]);
            }
            // dV += P^T dO
            let (p_t, d_o_) = (View::t(p, bc), View::rows(d_o, hd));
            matmul((bc, hd, br), dvt, true, 1.0, p_t, d_o_);
            // dP = dO V^T, then dS = scale P (dP - D)
            matmul((br, bc, hd), ds, false, 1.0, d_o_, View::t(vt, hd));
            for ((prow, dsrow), &dr) in p.chunks_exact(bc).zip(ds.chunks_exact_mut(bc)).zip(&*dd) {
                for (g, &pv) in dsrow.iter_mut().zip(prow) {
                    *g = d.scale * pv * (*g - dr);
                }
            }
            // dQ += dS K, dK += dS^T Q
            matmul(
                (br, hd, bc),
                dq,
                true,
                1.0,
                View::rows(ds, bc),
                View::rows(kt, hd),
            );
            matmul((bc, hd, br), dkt, true, 1.0, View::t(ds, bc), q_);
        }
    }
}

/// Lanes of the vectorisable reductions below.
const LANES: usize = 8;

/// Sum of `a[i] * b[i]`.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(xa).zip(xb) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element (NaN ignored, -inf for an empty row).
fn row_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().fold(tail, |a, &x| a.max(x))
}

/// `x = exp(x - sub)` over a row; returns the row's new sum.
fn exp_sub(xs: &mut [f32], sub: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp(*x - sub);
            *a += *x;
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = exp(*x - sub);
        sum += *x;
    }
    sum
}

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// The row-major matrix with `ld` columns.
    fn rows(data: &'a [f32], ld: usize) -> Self {
        View {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix with `ld` columns.
    fn t(data: &'a [f32], ld: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: ld,
        }
    }

    /// Whether a (rows, cols) matrix fits in `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = alpha A B`, or `dst += alpha A B` when `accumulate`, for A (m, k), B (k, n) and a
/// row-major `dst` (m, n); single-threaded (it runs inside a rayon task).
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    alpha: f32,
    a: View,
    b: View,
) {
    assert!(dst.len() == m * n && a.fits(m, k) && b.fits(k, n));
    if dst.is_empty() {
        return;
    }
    let i = |x: usize| x as isize;
    // SAFETY: the assert keeps every element gemm reads or writes inside the three slices;
    // `dst` is a unique borrow, so it aliases neither input; `Parallelism::None` keeps the
    // pointers on this thread.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            i(n),
            accumulate,
            a.data.as_ptr(),
            i(a.cs),
            i(a.rs),
            b.data.as_ptr(),
            i(b.cs),
            i(b.rs),
            1.0,
            alpha,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The reference: the previous eager implementation, which stores the whole (T, S)
    /// probability matrix.
    struct NaiveCache {
        qg: Tensor,
        k: Tensor,
        v: Tensor,
        probs: Tensor,
        scale: f64,
    }

    fn naive_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> (Tensor, NaiveCache) {
        let (b, h, t, hd) = q.dims4().unwrap();
        let (_, kvh, s, _) = k.dims4().unwrap();
        let rep = h / kvh;
        let qg = q.reshape((b, kvh, rep * t, hd)).unwrap();
        let scores = (qg.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let scores = scores.reshape((b, kvh, rep, t, s)).unwrap();
        let past = s - t;
        let mask: Vec<f32> = (0..t * s)
            .map(|i| {
                if i % s <= past + i / s {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), q.device()).unwrap();
        let scores = scores.broadcast_add(&mask).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let probs = probs.reshape((b, kvh, rep * t, s)).unwrap();
        let out = probs.matmul(v).unwrap().reshape((b, h, t, hd)).unwrap();
        let cache = NaiveCache {
            qg,
            k: k.clone(),
            v: v.clone(),
            probs,
            scale,
        };
        (out, cache)
    }

    fn naive_backward(c: &NaiveCache, d_out: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, h, t, hd) = d_out.dims4().unwrap();
        let dog = d_out.reshape(c.qg.dims()).unwrap();
        let dv = c.probs.t().unwrap().matmul(&dog).unwrap();
        let dp = dog.matmul(&c.v.t().unwrap()).unwrap();
        let dot = (&dp * &c.probs).unwrap().sum_keepdim(D::Minus1).unwrap();
        let ds = (c.probs.clone() * dp.broadcast_sub(&dot).unwrap()).unwrap();
        let ds = (ds * c.scale).unwrap();
        let dq = ds.matmul(&c.k).unwrap().reshape((b, h, t, hd)).unwrap();
        let dk = ds.t().unwrap().matmul(&c.qg).unwrap();
        (dq, dk, dv)
    }

    fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-30)
    }

    fn check(b: usize, h: usize, kvh: usize, t: usize, s: usize, hd: usize) {
        let q = randn((b, h, t, hd));
        let k = randn((b, kvh, s, hd));
        let v = randn((b, kvh, s, hd));
        let d_out = randn((b, h, t, hd));
        let scale = 1.0 / (hd as f64).sqrt();
        let (o_ref, c_ref) = naive_forward(&q, &k, &v, scale);
        let (dq_ref, dk_ref, dv_ref) = naive_backward(&c_ref, &d_out);
        let (o, c) = causal_attention_t(&q, &k, &v, scale).unwrap();
        let (dq, dk, dv) = causal_attention_backward(&c, &d_out).unwrap();
        let what = format!("B={b} H={h} KVH={kvh} T={t} S={s} hd={hd}");
        for (name, x, r) in [
            ("out", &o, &o_ref),
            ("dq", &dq, &dq_ref),
            ("dk", &dk, &dk_ref),
            ("dv", &dv, &dv_ref),
        ] {
            let e = rel_err(x, r);
            assert!(e < 1e-5, "{what}: {name} relative error {e}");
        }
        let o2 = causal_attention(&q, &k, &v, scale).unwrap();
        assert!(rel_err(&o2, &o_ref) < 1e-5, "{what}: causal_attention");
    }

    #[test]
    fn square_mha() {
        check(1, 4, 4, 16, 16, 8);
    }

    #[test]
    fn square_gqa_batch() {
        check(2, 6, 2, 33, 33, 16);
    }

    #[test]
    fn past_keys() {
        check(2, 6, 2, 12, 17, 8);
        check(1, 4, 4, 64, 69, 64);
    }

    #[test]
    fn decode_one_row() {
        check(2, 6, 2, 1, 9, 8);
        check(1, 4, 4, 1, 300, 64);
    }

    #[test]
    fn ragged_tiles() {
        check(2, 6, 2, 70, 70, 64);
        check(1, 4, 2, 130, 135, 32);
        check(2, 3, 3, 130, 130, 64);
        check(1, 2, 1, 40, 45, 80);
        check(1, 2, 2, 65, 65, 128);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (q, k) = (randn((1, 5, 4, 8)), randn((1, 2, 4, 8)));
        assert!(causal_attention(&q, &k, &k, 1.0).is_err()); // 5 heads over 2 kv heads
        let (q, k) = (randn((1, 2, 6, 8)), randn((1, 2, 4, 8)));
        assert!(causal_attention(&q, &k, &k, 1.0).is_err()); // fewer keys than queries
        let (q, k) = (randn((1, 2, 4, 8)), randn((1, 2, 4, 16)));
        assert!(causal_attention(&q, &k, &k, 1.0).is_err()); // head dims differ
        let q16 = q.to_dtype(candle_core::DType::F16).unwrap();
        assert!(causal_attention(&q16, &q16, &q16, 1.0).is_err());
        let (_, c) = causal_attention_t(&q, &q, &q, 1.0).unwrap();
        assert!(causal_attention_backward(&c, &randn((1, 2, 3, 8))).is_err());
    }

    #[test]
    fn empty_sequences() {
        let (q, k) = (randn((2, 4, 0, 8)), randn((2, 2, 3, 8)));
        let (o, c) = causal_attention_t(&q, &k, &k, 1.0).unwrap();
        assert_eq!(o.dims(), &[2, 4, 0, 8]);
        let (dq, dk, dv) = causal_attention_backward(&c, &q).unwrap();
        assert_eq!(dq.dims(), &[2, 4, 0, 8]);
        assert_eq!(dk.dims(), &[2, 2, 3, 8]);
        assert_eq!(dv.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn non_contiguous_inputs() {
        // (B, T, H, hd) transposed to (B, H, T, hd), as the models produce before `.contiguous()`.
        let (b, h, kvh, t, hd) = (2, 6, 2, 20, 16);
        let tr = |n: usize| {
            Tensor::randn(0f32, 1f32, (b, t, n, hd), &Device::Cpu)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v, d_out) = (tr(h), tr(kvh), tr(kvh), tr(h));
        let scale = 0.25;
        let cont = |x: &Tensor| x.contiguous().unwrap();
        let (o_ref, c_ref) = naive_forward(&cont(&q), &cont(&k), &cont(&v), scale);
        let (dq_ref, dk_ref, dv_ref) = naive_backward(&c_ref, &cont(&d_out));
        let (o, c) = causal_attention_t(&q, &k, &v, scale).unwrap();
        let (dq, dk, dv) = causal_attention_backward(&c, &d_out).unwrap();
        assert!(rel_err(&o, &o_ref) < 1e-5);
        assert!(rel_err(&dq, &dq_ref) < 1e-5);
        assert!(rel_err(&dk, &dk_ref) < 1e-5);
        assert!(rel_err(&dv, &dv_ref) < 1e-5);
    }
}
