//! Causal scaled-dot-product attention with grouped-query heads (HF `eager_attention_forward`),
//! and its backward. Keys may include earlier positions from a KV cache (or a prefix): the query
//! at row `t` of `T` sits at absolute position `p = S - T + t` and sees every key `s <= p`.
//! Two options of newer architectures, both as HF's eager attention computes them ([`AttnSpec`]):
//! - a sliding window `w` (Mistral, Qwen2, Phi-3, Gemma 2/3 "sliding_attention" layers): the
//!   query at `p` sees only keys `p - w < s <= p` (transformers 5.x `sliding_window_overlay`:
//!   `kv_idx > q_idx - sliding_window`);
//! - logit soft-capping (Gemma 2's `attn_logit_softcapping`): scores become
//!   `cap tanh(scale q.k / cap)` before the mask and the softmax.
//!
//! Fused and tiled in the style of FlashAttention-2, on the CPU: memory is linear in the sequence
//! length because no (T, S) score or probability matrix is ever stored whole.
//! - Head `h` reads kv head `h / (H / KVH)` (HF `repeat_kv`, without the copy).
//! - Forward, one rayon task per (batch, query head): for each tile of query rows, walk the key
//!   tiles from the first key the tile's first row sees (0, or the start of its window) up to
//!   the causal limit of its last row, so fully masked tiles are never computed and a window
//!   costs ~ T (w + tile) rather than T S; an online softmax (running row max and sum)
//!   accumulates `P V`. It keeps q, k, v and the per-row log-sum-exp (B, H, T), not the
//!   output O: backward recomputes O by this same pass ([`AttnCache::output`]), 1% of a layer's
//!   products at 512 tokens, for a tape smaller by the hidden size per token and layer.
//! - Backward, one rayon task per (batch, kv head), taking every query head that reads it, so
//!   the dk/dv it accumulates belong to it alone. Over the same tiles it recomputes
//!   `S = scale Q K^T` (soft-capped: `S' = cap tanh(S / cap)`) and `P = exp(S' - lse)` (masked
//!   keys: 0), then `dV += P^T dO`, `dP = dO V^T`, `dS' = P (dP - D)` with `D = rowsum(dO O)`,
//!   `dS = dS' (1 - tanh^2)` (1 without a cap), `dQ += scale dS K` and `dK += scale dS^T Q`.
//!
//! The tile products are small GEMMs run by the `gemm` crate, single-threaded inside each task;
//! the exponentials use a polynomial that vectorises. Per task the scratch is a few tiles, and
//! q, k and v held in bf16 (a bf16 tape's) are read widened one head at a time into it.

use candle_core::{DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::math::exp;
use super::recast::Wide;
use super::Recast;
use crate::{Error, Result};

/// Query rows per tile.
const ROWS: usize = 64;
/// Keys per tile.
const KEYS: usize = 128;

/// What one attention call computes, beyond causality: HF's `scaling`, `sliding_window` and
/// `attn_logit_softcapping`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    /// Multiplies `q.k` (usually `1 / sqrt(hd)`).
    pub scale: f64,
    /// Sliding window: the query at absolute position `p` sees keys `p - w < s <= p` (at least
    /// 1; `None`: every earlier key).
    pub window: Option<usize>,
    /// Logit soft-cap: scores become `cap tanh(scale q.k / cap)` (finite and positive).
    pub softcap: Option<f64>,
}

impl AttnSpec {
    /// Plain causal attention: no window, no soft-cap.
    pub fn causal(scale: f64) -> Self {
        AttnSpec {
            scale,
            window: None,
            softcap: None,
        }
    }
}

/// Saved by the forward for backward. The output is not kept: [`AttnCache::output`] recomputes
/// it (one more forward, ~1% of a layer's products at 512 tokens) where backward needs it.
pub struct AttnCache {
    /// (B, H, T, hd), contiguous.
    q: Tensor,
    /// (B, KVH, S, hd), contiguous.
    k: Tensor,
    v: Tensor,
    /// Log-sum-exp of each query row's scaled, capped, masked scores: (B, H, T).
    lse: Tensor,
    spec: AttnSpec,
}

impl AttnCache {
    /// The attention's output (B, H, T, hd), recomputed by the forward's own kernel: bit for
    /// bit the forward's output when q, k and v are what the forward read (an f32 tape).
    pub fn output(&self) -> Result<Tensor> {
        Ok(attention_t(&self.q, &self.k, &self.v, &self.spec)?.0)
    }

    /// q, k and v narrowed to `r`'s dtype (the kernels read bf16 as they are); the log-sum-exp
    /// stays f32.
    pub fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(AttnCache {
            q: r.narrowed(&self.q)?,
            k: r.narrowed(&self.k)?,
            v: r.narrowed(&self.v)?,
            lse: self.lse.clone(),
            spec: self.spec,
        })
    }
}

/// q: (B, H, T, hd), k/v: (B, KVH, S, hd) with H a multiple of KVH -> (B, H, T, hd).
/// Plain causal attention: [`attention`] without window or soft-cap.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention(q, k, v, &AttnSpec::causal(scale))
}

/// [`causal_attention`], also returning what [`causal_attention_backward`] needs.
pub fn causal_attention_t(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, AttnCache)> {
    attention_t(q, k, v, &AttnSpec::causal(scale))
}

/// q: (B, H, T, hd), k/v: (B, KVH, S, hd) with H a multiple of KVH -> (B, H, T, hd): causal
/// attention with the window and soft-cap of `spec`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
    Ok(attention_t(q, k, v, spec)?.0)
}

/// [`attention`], also returning what [`causal_attention_backward`] needs (the spec included).
pub fn attention_t(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, AttnCache)> {
    let d = Dims::of(q, k, v, spec)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut o = vec![0f32; d.b * d.h * d.t * d.hd];
    let mut lse = vec![0f32; d.b * d.h * d.t];
    if !d.is_empty() {
        let (qn, kn) = (d.t * d.hd, d.s * d.hd);
        Wide::all([&q, &k, &v], |[qd, kd, vd]| {
            // One task per (batch, query head): nothing is accumulated across heads.
            o.par_chunks_mut(qn)
                .zip(lse.par_chunks_mut(d.t))
                .enumerate()
                .for_each_init(
                    || [(); 3].map(|_| Vec::new()),
                    |[bq, bk, bv], (i, (o, lse))| {
                        let kv = i / d.rep; // (b H + h) / rep = b KVH + h / rep
                        let keys = kv * kn..(kv + 1) * kn;
                        let (k, v) = (kd.part(keys.clone(), bk), vd.part(keys, bv));
                        let q = qd.part(i * qn..(i + 1) * qn, bq);
                        forward_head(&d, q, k, v, o, lse, &mut Scratch::new(&d));
                    },
                )
        })?;
    }
    let dev = q.device();
    let o = Tensor::from_vec(o, (d.b, d.h, d.t, d.hd), dev)?;
    let lse = Tensor::from_vec(lse, (d.b, d.h, d.t), dev)?;
    let cache = AttnCache {
        q,
        k,
        v,
        lse,
        spec: *spec,
    };
    Ok((o, cache))
}

/// The output `o` ([`AttnCache::output`]) and its gradient d_out, each (B, H, T, hd) ->
/// (dq (B, H, T, hd), dk, dv (B, KVH, S, hd)).
pub fn causal_attention_backward(
    c: &AttnCache,
    o: &Tensor,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(&c.q, &c.k, &c.v, &c.spec)?;
    for (name, x) in [("the output", o), ("d_out", d_out)] {
        if x.dims() != c.q.dims() || x.dtype() != DType::F32 {
            return Err(Error::Input(format!(
                "attention backward: {name} is {:?} {:?}, the queries are {:?} f32",
                x.dims(),
                x.dtype(),
                c.q.dims()
            )));
        }
    }
    let (o, d_out) = (o.contiguous()?, d_out.contiguous()?);
    let mut dq = vec![0f32; d.b * d.h * d.t * d.hd];
    let mut dk = vec![0f32; d.b * d.kvh * d.s * d.hd];
    let mut dv = vec![0f32; d.b * d.kvh * d.s * d.hd];
    if !d.is_empty() {
        let (os, ol) = o.storage_and_layout();
        let (ls, ll) = c.lse.storage_and_layout();
        let (gs, gl) = d_out.storage_and_layout();
        let (od, ld, gd) = (f32s(&os, ol)?, f32s(&ls, ll)?, f32s(&gs, gl)?);
        let (qn, kn) = (d.t * d.hd, d.s * d.hd);
        Wide::all([&c.q, &c.k, &c.v], |[qd, kd, vd]| {
            // One task per (batch, kv head), over the `rep` query heads that read it:
            // the task owns their dq rows and the kv head's dk/dv.
            dq.par_chunks_mut(d.rep * qn)
                .zip(dk.par_chunks_mut(kn))
                .zip(dv.par_chunks_mut(kn))
                .enumerate()
                .for_each_init(
                    || [(); 3].map(|_| Vec::new()),
                    |[bq, bk, bv], (kv, ((dq, dk), dv))| {
                        let keys = kv * kn..(kv + 1) * kn;
                        let (k, v) = (kd.part(keys.clone(), bk), vd.part(keys, bv));
                        let mut scratch = Scratch::new(&d);
                        for (j, dq) in dq.chunks_exact_mut(qn).enumerate() {
                            let i = kv * d.rep + j; // b H + h
                            let rows = i * qn..(i + 1) * qn;
                            let head = Head {
                                q: qd.part(rows.clone(), bq),
                                k,
                                v,
                                o: &od[rows.clone()],
                                lse: &ld[i * d.t..][..d.t],
                                d_o: &gd[rows],
                            };
                            backward_head(&d, &head, dq, dk, dv, &mut scratch);
                        }
                    },
                )
        })?;
    }
    let dev = d_out.device();
    Ok((
        Tensor::from_vec(dq, (d.b, d.h, d.t, d.hd), dev)?,
        Tensor::from_vec(dk, (d.b, d.kvh, d.s, d.hd), dev)?,
        Tensor::from_vec(dv, (d.b, d.kvh, d.s, d.hd), dev)?,
    ))
}

/// Checked sizes of one attention call, and its spec in f32.
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
    /// At least 1.
    window: Option<usize>,
    /// Finite and positive.
    softcap: Option<f32>,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Self> {
        if spec.window == Some(0) {
            return Err(Error::Input(
                "attention: the sliding window must be at least 1 (a query always sees itself); \
                 got 0"
                    .into(),
            ));
        }
        let softcap = match spec.softcap {
            // Checked in f32 too, where it is used: 1e-50 would become 0 and 1e50 infinite.
            Some(c) if !(c.is_finite() && c > 0.0 && (c as f32).is_finite() && c as f32 > 0.0) => {
                return Err(Error::Input(format!(
                    "attention: the logit soft-cap must be finite and positive, got {c}"
                )));
            }
            c => c.map(|c| c as f32),
        };
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
        // Computed in f32; a bf16 tape's q/k/v are widened a head at a time.
        if [q, k, v]
            .iter()
            .any(|x| !matches!(x.dtype(), DType::F32 | DType::BF16))
        {
            return bad("attention reads f32 or bf16");
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
            scale: spec.scale as f32,
            window: spec.window,
            softcap,
        })
    }

    /// True when there is nothing to compute (every output is empty or zero).
    fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.hd == 0
    }

    /// The first key query row `i` sees: 0, or with a window `w` the first of the `w` keys
    /// ending at its own position `past + i`. It never decreases with `i`.
    fn first_key(&self, i: usize) -> usize {
        self.window
            .map_or(0, |w| (self.past + i + 1).saturating_sub(w))
    }

    /// The keys query rows `i0..i0 + rows` see together: from the first row's first key to the
    /// last row's causal limit. Each row sees a contiguous run that overlaps or abuts the next
    /// row's, so no key tile inside this range is masked for every row.
    fn keys_seen(&self, i0: usize, rows: usize) -> std::ops::Range<usize> {
        self.first_key(i0)..self.past + i0 + rows
    }

    /// The keys query row `i` sees in the tile starting at `j0` with `n` keys, as offsets into
    /// the tile (possibly empty).
    fn visible(&self, i: usize, j0: usize, n: usize) -> std::ops::Range<usize> {
        let end = (self.past + i + 1).saturating_sub(j0).min(n);
        // first_key <= past + i, so start <= end.
        self.first_key(i).saturating_sub(j0).min(n)..end
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
    /// `1 - tanh^2` of the soft-cap over one tile (backward with a soft-cap, else empty):
    /// (ROWS, KEYS). Always finite, in [0, 1].
    dcap: Vec<f32>,
}

impl Scratch {
    fn new(d: &Dims) -> Self {
        Scratch {
            p: vec![0.0; ROWS * KEYS],
            ds: vec![0.0; ROWS * KEYS],
            acc: vec![0.0; ROWS * d.hd],
            m: vec![0.0; ROWS],
            l: vec![0.0; ROWS],
            dcap: if d.softcap.is_some() {
                vec![0.0; ROWS * KEYS]
            } else {
                Vec::new()
            },
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
        for j0 in seen.clone().step_by(KEYS) {
            let bc = KEYS.min(seen.end - j0);
            let (kt, vt) = (&k[j0 * hd..(j0 + bc) * hd], &v[j0 * hd..(j0 + bc) * hd]);
            let p = &mut sc.p[..br * bc];
            // S = scale Q K^T, capped, then P = exp(S - running max), 0 where masked.
            let (q_, k_t) = (View::rows(q, hd), View::t(kt, hd));
            matmul((br, bc, hd), p, false, d.scale, q_, k_t);
            for (r, row) in p.chunks_exact_mut(bc).enumerate() {
                let vis = d.visible(i0 + r, j0, bc);
                row[..vis.start].fill(0.0);
                row[vis.end..].fill(0.0);
                let row = &mut row[vis];
                if row.is_empty() {
                    continue;
                }
                if let Some(cap) = d.softcap {
                    soft_cap(row, cap);
                }
                let max = row_max(row).max(m[r]);
                // With a window a row's first visible key may lie in a later tile than the
                // walk's first: until then `m[r]` is -inf and `l[r]`, its acc row are 0, so the
                // correction is 0 (spelled out: -inf - -inf would be NaN). Every row sees key
                // `past + i` itself, inside the walk, so `m[r]` is finite once the walk ends.
                let corr = if m[r] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m[r] - max).exp()
                };
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
        for j0 in seen.clone().step_by(KEYS) {
            let bc = KEYS.min(seen.end - j0);
            let keys = j0 * hd..(j0 + bc) * hd;
            let (kt, vt) = (&x.k[keys.clone()], &x.v[keys.clone()]);
            let (dkt, dvt) = (&mut dk[keys.clone()], &mut dv[keys]);
            let (p, ds) = (&mut sc.p[..br * bc], &mut sc.ds[..br * bc]);
            // P = exp(cap(scale Q K^T) - lse), 0 where masked; with a cap, its derivative too.
            let (q_, k_t) = (View::rows(q, hd), View::t(kt, hd));
            matmul((br, bc, hd), p, false, d.scale, q_, k_t);
            for (r, row) in p.chunks_exact_mut(bc).enumerate() {
                let vis = d.visible(i0 + r, j0, bc);
                row[..vis.start].fill(0.0);
                row[vis.end..].fill(0.0);
                if let Some(cap) = d.softcap {
                    let dcap = &mut sc.dcap[r * bc..(r + 1) * bc];
                    soft_cap_grad(&mut row[vis.clone()], &mut dcap[vis.clone()], cap);
                }
                exp_sub(&mut row[vis], lse[r]);
            }
            // dV += P^T dO
            let (p_t, d_o_) = (View::t(p, bc), View::rows(d_o, hd));
            matmul((bc, hd, br), dvt, true, 1.0, p_t, d_o_);
            // dP = dO V^T, then dS = scale P (dP - D), times 1 - tanh^2 under a cap (masked
            // keys: P = 0 and the stale derivative there is finite, so dS = 0)
            matmul((br, bc, hd), ds, false, 1.0, d_o_, View::t(vt, hd));
            for ((prow, dsrow), &dr) in p.chunks_exact(bc).zip(ds.chunks_exact_mut(bc)).zip(&*dd) {
                for (g, &pv) in dsrow.iter_mut().zip(prow) {
                    *g = d.scale * pv * (*g - dr);
                }
            }
            if d.softcap.is_some() {
                for (g, &c) in ds.iter_mut().zip(&sc.dcap[..br * bc]) {
                    *g *= c;
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

/// Soft-capping over a row of scores, as HF: `x = cap tanh(x / cap)`.
fn soft_cap(xs: &mut [f32], cap: f32) {
    for x in xs {
        *x = (*x / cap).tanh() * cap;
    }
}

/// [`soft_cap`], also writing its derivative `1 - tanh^2` into `dcap` (same length).
fn soft_cap_grad(xs: &mut [f32], dcap: &mut [f32], cap: f32) {
    for (x, c) in xs.iter_mut().zip(dcap) {
        let th = (*x / cap).tanh();
        *x = th * cap;
        *c = 1.0 - th * th;
    }
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
    /// probability matrix, with HF's soft-cap and sliding-window mask.
    struct NaiveCache {
        qg: Tensor,
        k: Tensor,
        v: Tensor,
        probs: Tensor,
        /// `1 - tanh^2` of the soft-cap, (B, KVH, rep T, S).
        dcap: Option<Tensor>,
        scale: f64,
    }

    fn naive_forward(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> (Tensor, NaiveCache) {
        let (b, h, t, hd) = q.dims4().unwrap();
        let (_, kvh, s, _) = k.dims4().unwrap();
        let rep = h / kvh;
        let qg = q.reshape((b, kvh, rep * t, hd)).unwrap();
        let scores = (qg.matmul(&k.t().unwrap()).unwrap() * spec.scale).unwrap();
        // HF Gemma 2: attn_weights / softcap, tanh, * softcap; before the mask.
        let (scores, dcap) = match spec.softcap {
            Some(cap) => {
                let th = (scores / cap).unwrap().tanh().unwrap();
                let dcap = (1.0 - th.sqr().unwrap()).unwrap();
                ((th * cap).unwrap(), Some(dcap))
            }
            None => (scores, None),
        };
        let scores = scores.reshape((b, kvh, rep, t, s)).unwrap();
        let past = s - t;
        let mask: Vec<f32> = (0..t * s)
            .map(|i| {
                let (p, key) = (past + i / s, i % s);
                // transformers 5.x: causal `kv_idx <= q_idx`, sliding `kv_idx > q_idx - window`
                let in_window = spec.window.is_none_or(|w| key as i64 > p as i64 - w as i64);
                if key <= p && in_window {
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
            dcap,
            scale: spec.scale,
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
        let ds = match &c.dcap {
            Some(dcap) => (ds * dcap).unwrap(),
            None => ds,
        };
        let ds = (ds * c.scale).unwrap();
        let dq = ds.matmul(&c.k).unwrap().reshape((b, h, t, hd)).unwrap();
        let dk = ds.t().unwrap().matmul(&c.qg).unwrap();
        (dq, dk, dv)
    }

    fn bits(x: &Tensor) -> Vec<u32> {
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| / max |b|; max |a - b| when b is all zero (a window of 1 makes dq and dk
    /// exactly 0 in the reference: softmax over one key is constant).
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        if scale == 0.0 {
            diff
        } else {
            diff / scale
        }
    }

    fn check(b: usize, h: usize, kvh: usize, t: usize, s: usize, hd: usize) {
        let scale = 1.0 / (hd as f64).sqrt();
        check_spec((b, h, kvh, t, s, hd), &AttnSpec::causal(scale));
    }

    /// The spec with HF's default scale `1 / sqrt(hd)`.
    fn spec(hd: usize, window: Option<usize>, softcap: Option<f64>) -> AttnSpec {
        AttnSpec {
            scale: 1.0 / (hd as f64).sqrt(),
            window,
            softcap,
        }
    }

    /// Forward and backward against the eager reference; returns (q, k, v, output).
    fn check_spec(
        (b, h, kvh, t, s, hd): (usize, usize, usize, usize, usize, usize),
        spec: &AttnSpec,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let q = randn((b, h, t, hd));
        let k = randn((b, kvh, s, hd));
        let v = randn((b, kvh, s, hd));
        let d_out = randn((b, h, t, hd));
        let (o_ref, c_ref) = naive_forward(&q, &k, &v, spec);
        let (dq_ref, dk_ref, dv_ref) = naive_backward(&c_ref, &d_out);
        let (o, c) = attention_t(&q, &k, &v, spec).unwrap();
        let what = format!("B={b} H={h} KVH={kvh} T={t} S={s} hd={hd} {spec:?}");
        let again = c.output().unwrap();
        assert_eq!(bits(&again), bits(&o), "{what}: the recomputed output");
        let (dq, dk, dv) = causal_attention_backward(&c, &again, &d_out).unwrap();
        for (name, x, r) in [
            ("out", &o, &o_ref),
            ("dq", &dq, &dq_ref),
            ("dk", &dk, &dk_ref),
            ("dv", &dv, &dv_ref),
        ] {
            let e = rel_err(x, r);
            assert!(e < 1e-5, "{what}: {name} relative error {e}");
        }
        let o2 = attention(&q, &k, &v, spec).unwrap();
        assert!(rel_err(&o2, &o_ref) < 1e-5, "{what}: attention");
        if spec.window.is_none() && spec.softcap.is_none() {
            let o3 = causal_attention(&q, &k, &v, spec.scale).unwrap();
            assert!(rel_err(&o3, &o_ref) < 1e-5, "{what}: causal_attention");
            let (o4, _) = causal_attention_t(&q, &k, &v, spec.scale).unwrap();
            assert!(rel_err(&o4, &o_ref) < 1e-5, "{what}: causal_attention_t");
        }
        (q, k, v, o)
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

    /// q, k and v in bf16 (a bf16 tape's) give bit for bit what their f32 values give, forward
    /// (the recomputed output too) and backward, with GQA, a window and a soft-cap.
    #[test]
    fn bf16_inputs_are_read_as_their_f32_values() {
        let (b, h, kvh, t, hd) = (2, 4, 2, 70, 16);
        let half = |x: Tensor| x.to_dtype(DType::BF16).unwrap();
        let q = half(randn((b, h, t, hd)));
        let (k, v) = (half(randn((b, kvh, t, hd))), half(randn((b, kvh, t, hd))));
        let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let spec = spec(hd, Some(33), Some(20.0));
        let (o, c) = attention_t(&q, &k, &v, &spec).unwrap();
        let (o32, c32) = attention_t(&wide(&q), &wide(&k), &wide(&v), &spec).unwrap();
        assert_eq!(bits(&o), bits(&o32));
        let d_out = randn((b, h, t, hd));
        let (dq, dk, dv) = causal_attention_backward(&c, &c.output().unwrap(), &d_out).unwrap();
        let want = causal_attention_backward(&c32, &o32, &d_out).unwrap();
        for (x, y) in [(dq, want.0), (dk, want.1), (dv, want.2)] {
            assert_eq!(bits(&x), bits(&y));
        }
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
        let (o, c) = causal_attention_t(&q, &q, &q, 1.0).unwrap();
        assert!(causal_attention_backward(&c, &o, &randn((1, 2, 3, 8))).is_err());
        assert!(causal_attention_backward(&c, &randn((1, 2, 3, 8)), &o).is_err());
    }

    #[test]
    fn empty_sequences() {
        let (q, k) = (randn((2, 4, 0, 8)), randn((2, 2, 3, 8)));
        let (o, c) = causal_attention_t(&q, &k, &k, 1.0).unwrap();
        assert_eq!(o.dims(), &[2, 4, 0, 8]);
        let (dq, dk, dv) = causal_attention_backward(&c, &o, &q).unwrap();
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
        let spec = AttnSpec::causal(scale);
        let (o_ref, c_ref) = naive_forward(&cont(&q), &cont(&k), &cont(&v), &spec);
        let (dq_ref, dk_ref, dv_ref) = naive_backward(&c_ref, &cont(&d_out));
        let (o, c) = causal_attention_t(&q, &k, &v, scale).unwrap();
        let (dq, dk, dv) = causal_attention_backward(&c, &o, &d_out).unwrap();
        assert!(rel_err(&o, &o_ref) < 1e-5);
        assert!(rel_err(&dq, &dq_ref) < 1e-5);
        assert!(rel_err(&dk, &dk_ref) < 1e-5);
        assert!(rel_err(&dv, &dv_ref) < 1e-5);
    }

    #[test]
    fn window_smaller_than_t() {
        check_spec((1, 4, 4, 40, 40, 16), &spec(16, Some(9), None));
        check_spec((2, 6, 2, 33, 33, 16), &spec(16, Some(5), None));
        check_spec((1, 2, 1, 64, 64, 8), &spec(8, Some(63), None));
    }

    #[test]
    fn window_covering_every_key_is_plain_causal() {
        // w >= S: every row's window reaches key 0, the same walk as without a window.
        for w in [40, 41, 1000] {
            let (q, k, v, o) = check_spec((2, 4, 2, 30, 40, 16), &spec(16, Some(w), None));
            let plain = causal_attention(&q, &k, &v, 0.25).unwrap();
            assert!(rel_err(&o, &plain) == 0.0, "window {w}");
        }
        check_spec((1, 2, 2, 200, 200, 16), &spec(16, Some(200), None));
    }

    #[test]
    fn window_of_one_sees_only_itself() {
        for (dims, past) in [
            ((2, 6, 2, 30, 30, 8), 0),
            ((1, 4, 2, 10, 25, 8), 15),
            ((1, 2, 1, 150, 150, 16), 0),
        ] {
            let (_, _, v, o) = check_spec(dims, &spec(dims.5, Some(1), None));
            // Each query row's output is its own position's value row.
            let (b, h, t, hd) = o.dims4().unwrap();
            let kvh = v.dim(1).unwrap();
            let own = v.narrow(2, past, t).unwrap();
            let own = own
                .unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kvh, h / kvh, t, hd))
                .unwrap()
                .reshape((b, h, t, hd))
                .unwrap();
            assert!(rel_err(&o, &own) < 1e-6, "{dims:?}");
        }
    }

    #[test]
    fn window_with_past_keys() {
        check_spec((2, 6, 2, 12, 40, 8), &spec(8, Some(7), None));
        check_spec((1, 4, 4, 64, 200, 64), &spec(64, Some(50), None));
        // The window reaches back into the cache/prefix for the first rows only.
        check_spec((1, 4, 2, 70, 90, 32), &spec(32, Some(30), None));
    }

    #[test]
    fn window_decode_one_row() {
        check_spec((2, 6, 2, 1, 300, 64), &spec(64, Some(100), None));
        check_spec((1, 4, 4, 1, 9, 8), &spec(8, Some(4), None));
        check_spec((1, 4, 2, 1, 129, 16), &spec(16, Some(128), None));
    }

    #[test]
    fn window_gqa_and_mha() {
        check_spec((1, 4, 2, 50, 50, 16), &spec(16, Some(13), None));
        check_spec((2, 4, 4, 50, 61, 16), &spec(16, Some(13), None));
    }

    #[test]
    fn window_ragged_tiles() {
        // Windows that start and end key tiles mid-way, row tiles of 64 and key tiles of 128.
        check_spec((1, 4, 2, 200, 200, 32), &spec(32, Some(70), None));
        check_spec((1, 2, 1, 200, 260, 64), &spec(64, Some(70), None));
        check_spec((2, 2, 2, 130, 300, 16), &spec(16, Some(129), None));
        check_spec((1, 2, 2, 300, 300, 16), &spec(16, Some(127), None));
        check_spec((1, 4, 2, 257, 257, 8), &spec(8, Some(65), None));
    }

    #[test]
    fn window_never_reads_keys_before_it() {
        // Keys no query row sees are never read: NaN there must leave every result finite and
        // equal to the reference's (a walk over their tiles would multiply NaN by masked zeros).
        for (b, h, kvh, t, s, hd, w) in [(1, 4, 2, 100, 400, 16, 50), (2, 2, 1, 1, 300, 8, 100)] {
            let unseen = s - t + 1 - w;
            let (q, k, v) = (
                randn((b, h, t, hd)),
                randn((b, kvh, s, hd)),
                randn((b, kvh, s, hd)),
            );
            let d_out = randn((b, h, t, hd));
            let poison = |x: &Tensor| {
                let nan = Tensor::full(f32::NAN, (b, kvh, unseen, hd), &Device::Cpu).unwrap();
                let seen = x.narrow(2, unseen, s - unseen).unwrap();
                Tensor::cat(&[&nan, &seen], 2).unwrap()
            };
            let spec = spec(hd, Some(w), None);
            let (o_ref, c_ref) = naive_forward(&q, &k, &v, &spec);
            let (dq_ref, dk_ref, dv_ref) = naive_backward(&c_ref, &d_out);
            let (o, c) = attention_t(&q, &poison(&k), &poison(&v), &spec).unwrap();
            let (dq, dk, dv) = causal_attention_backward(&c, &c.output().unwrap(), &d_out).unwrap();
            for (name, x, r) in [
                ("out", &o, &o_ref),
                ("dq", &dq, &dq_ref),
                ("dk", &dk, &dk_ref),
                ("dv", &dv, &dv_ref),
            ] {
                let e = rel_err(x, r);
                assert!(e < 1e-5, "T={t} S={s} w={w}: {name} relative error {e}");
            }
        }
    }

    #[test]
    fn softcap_alone() {
        // Caps near the scores' size, so tanh bends them; and Gemma 2's 50 on large scores.
        check_spec((1, 4, 2, 70, 80, 32), &spec(32, None, Some(1.5)));
        check_spec((2, 4, 4, 33, 33, 16), &spec(16, None, Some(0.5)));
        let big = AttnSpec {
            scale: 4.0,
            window: None,
            softcap: Some(50.0),
        };
        check_spec((1, 2, 1, 130, 135, 16), &big);
    }

    #[test]
    fn softcap_and_window() {
        check_spec((1, 4, 2, 200, 230, 32), &spec(32, Some(70), Some(2.0)));
        check_spec((2, 6, 2, 1, 300, 64), &spec(64, Some(100), Some(1.0)));
        check_spec((1, 2, 2, 40, 40, 8), &spec(8, Some(1), Some(1.0)));
    }

    #[test]
    fn bad_spec_is_error() {
        let q = randn((1, 2, 4, 8));
        let err = attention(&q, &q, &q, &spec(8, Some(0), None)).unwrap_err();
        assert!(
            matches!(&err, Error::Input(m) if m.contains("sliding window must be at least 1")),
            "{err}"
        );
        for cap in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1e-300] {
            let Err(err) = attention_t(&q, &q, &q, &spec(8, None, Some(cap))) else {
                panic!("soft-cap {cap} was accepted");
            };
            assert!(
                matches!(&err, Error::Input(m) if m.contains("soft-cap must be finite and positive")),
                "{cap}: {err}"
            );
        }
    }
}
