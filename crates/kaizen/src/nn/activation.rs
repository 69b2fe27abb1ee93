//! Element-wise activations named by HF's `hidden_act`, with their derivatives. GELU (both
//! forms) and SiLU run as one fused parallel pass each way on [`super::math`]'s vectorised
//! `erf`/`exp` (candle's `gelu_erf` is a libm call per element, and its backward composed of
//! candle ops is six passes over a (tokens, intermediate) tensor).
//!
//! Each activation is a type ([`Act`]) and each pass a loop generic over it, so the element
//! function is known where the loop is compiled: it inlines, and the loop vectorises. The
//! loops are compiled twice, for the build's baseline and for AVX-512 (picked at run time):
//! the baseline x86-64 target has only 4-lane SSE.

use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::math::{erf, exp, sigmoid, tanh};
use super::recast::Wide;
use crate::config::Activation;
use crate::Result;

/// Elements per parallel task.
const CHUNK: usize = 4096;

/// The values of chunk `i` (of [`CHUNK`]), `n` long.
fn chunk(i: usize, n: usize) -> std::ops::Range<usize> {
    i * CHUNK..i * CHUNK + n
}

/// `x` in f32 (candle's ReLU ops, which do not mix dtypes).
fn wide_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}

/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const INV_SQRT_2PI: f32 = FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5;
/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU.
const TANH_C: f32 = FRAC_2_SQRT_PI * FRAC_1_SQRT_2;
const TANH_A: f32 = 0.044715;

/// A smooth activation: its value and derivative.
trait Act: Send + Sync + 'static {
    fn value(x: f32) -> f32;
    fn derivative(x: f32) -> f32;
}

/// `0.5 x (1 + erf(x / sqrt 2))`
struct Gelu;
/// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`
struct GeluTanh;
/// `x sigmoid(x)`
struct Silu;

impl Act for Gelu {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
    }

    /// `0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)`
    #[inline(always)]
    fn derivative(x: f32) -> f32 {
        0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * exp(-0.5 * x * x) * INV_SQRT_2PI
    }
}

impl GeluTanh {
    /// `sqrt(2 / pi) (x + 0.044715 x^3)`
    #[inline(always)]
    fn u(x: f32) -> f32 {
        TANH_C * (x + TANH_A * x * x * x)
    }
}

impl Act for GeluTanh {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        0.5 * x * (1.0 + tanh(Self::u(x)))
    }

    /// y = 0.5 x (1 + tanh(u)): 0.5 (1 + t) + 0.5 x (1 - t^2) u'
    #[inline(always)]
    fn derivative(x: f32) -> f32 {
        let t = tanh(Self::u(x));
        let du = TANH_C * (1.0 + 3.0 * TANH_A * x * x);
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    }
}

impl Act for Silu {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        x * sigmoid(x)
    }

    /// `s (1 + x (1 - s))`, s = sigmoid(x)
    #[inline(always)]
    fn derivative(x: f32) -> f32 {
        let s = sigmoid(x);
        s * (1.0 + x * (1.0 - s))
    }
}

/// `$body` with `$a` the type of the smooth activation `$act` (ReLU is candle's, handled first
/// by every caller).
macro_rules! with_act {
    ($act:expr, $a:ident => $body:expr) => {
        match $act {
            Activation::Gelu => {
                type $a = Gelu;
                $body
            }
            Activation::GeluTanh => {
                type $a = GeluTanh;
                $body
            }
            Activation::Silu => {
                type $a = Silu;
                $body
            }
            Activation::Relu => unreachable!("ReLU runs on candle's ops"),
        }
    };
}

pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    if act == Activation::Relu {
        return Ok(wide_f32(x)?.relu()?);
    }
    with_act!(act, A => map::<Value<A>>(x, None))
}

/// dy * act'(x)
pub fn backward(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if act == Activation::Relu {
        return Ok((dy * x.gt(0.0)?.to_dtype(DType::F32)?)?);
    }
    with_act!(act, A => map::<Grad<A>>(x, Some(dy)))
}

/// Gated MLP (SwiGLU, GeGLU): `act(gate) * up` in one parallel pass.
pub fn glu(act: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if act == Activation::Relu {
        return Ok((wide_f32(gate)?.relu()? * wide_f32(up)?)?);
    }
    with_act!(act, A => map::<Gated<A>>(gate, Some(up)))
}

/// Backward of [`glu`]: (d_gate, d_up) from the product's gradient; the activation is
/// recomputed rather than kept (one (tokens, intermediate) tensor less per layer).
pub fn glu_backward(
    act: Activation,
    gate: &Tensor,
    up: &Tensor,
    d_prod: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if act == Activation::Relu {
        let d_gate = backward(act, gate, &(d_prod * wide_f32(up)?)?)?;
        return Ok((d_gate, (d_prod * wide_f32(gate)?.relu()?)?));
    }
    with_act!(act, A => glu_grads::<A>(gate, up, d_prod))
}

/// An element-wise pass `f(x, y)`.
trait Pass: Send + Sync + 'static {
    fn at(x: f32, y: f32) -> f32;
}

/// act(x)
struct Value<A>(std::marker::PhantomData<A>);
/// y act'(x)
struct Grad<A>(std::marker::PhantomData<A>);
/// y act(x)
struct Gated<A>(std::marker::PhantomData<A>);

impl<A: Act> Pass for Value<A> {
    #[inline(always)]
    fn at(x: f32, _: f32) -> f32 {
        A::value(x)
    }
}

impl<A: Act> Pass for Grad<A> {
    #[inline(always)]
    fn at(x: f32, y: f32) -> f32 {
        y * A::derivative(x)
    }
}

impl<A: Act> Pass for Gated<A> {
    #[inline(always)]
    fn at(x: f32, y: f32) -> f32 {
        y * A::value(x)
    }
}

/// Whether the AVX-512 copies of the loops run.
fn wide() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512dq") && has!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `P::at(x, y)` element by element over f32 tensors of one shape (`y` absent: x again), in one
/// parallel pass that reads both in place and writes a new tensor.
fn map<P: Pass>(x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = y.map(Tensor::contiguous).transpose()?;
    let mut out = vec![0f32; x.elem_count()];
    let wide = wide();
    Wide::all([&x, y.as_ref().unwrap_or(&x)], |[xs, ys]| {
        out.par_chunks_mut(CHUNK).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(bx, by), (i, o)| {
                let (x, y) = (
                    xs.part(chunk(i, o.len()), bx),
                    ys.part(chunk(i, o.len()), by),
                );
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: `wide` found the features.
                    return unsafe { avx512::pass::<P>(o, x, y) };
                }
                pass::<P>(o, x, y)
            },
        )
    })?;
    Ok(Tensor::from_vec(out, x.dims(), x.device())?)
}

#[inline(always)]
fn pass<P: Pass>(o: &mut [f32], x: &[f32], y: &[f32]) {
    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
        *o = P::at(x, y);
    }
}

/// `(dp u act'(g), dp act(g))` in one pass.
fn glu_grads<A: Act>(gate: &Tensor, up: &Tensor, d_prod: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate, up, d_prod) = (gate.contiguous()?, up.contiguous()?, d_prod.contiguous()?);
    let mut d_gate = vec![0f32; d_prod.elem_count()];
    let mut d_up = vec![0f32; d_gate.len()];
    let wide = wide();
    Wide::all([&gate, &up, &d_prod], |[g, u, dp]| {
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each_init(
                || [(); 3].map(|_| Vec::new()),
                |[bg, bu, bd], (i, (dg, du))| {
                    let at = chunk(i, dg.len());
                    let (g, u) = (g.part(at.clone(), bg), u.part(at.clone(), bu));
                    let dp = dp.part(at, bd);
                    #[cfg(target_arch = "x86_64")]
                    if wide {
                        // SAFETY: `wide` found the features.
                        return unsafe { avx512::glu_pass::<A>((dg, du), (g, u, dp)) };
                    }
                    glu_pass::<A>((dg, du), (g, u, dp))
                },
            )
    })?;
    let dev = d_prod.device();
    Ok((
        Tensor::from_vec(d_gate, d_prod.dims(), dev)?,
        Tensor::from_vec(d_up, d_prod.dims(), dev)?,
    ))
}

#[inline(always)]
fn glu_pass<A: Act>((dg, du): (&mut [f32], &mut [f32]), (g, u, dp): (&[f32], &[f32], &[f32])) {
    let n = dg.len();
    let (du, g, u, dp) = (&mut du[..n], &g[..n], &u[..n], &dp[..n]);
    for i in 0..n {
        du[i] = dp[i] * A::value(g[i]);
        dg[i] = dp[i] * u[i] * A::derivative(g[i]);
    }
}

/// The loops above compiled for AVX-512 (their element functions inline into them).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Act, Pass};

    /// # Safety
    /// AVX-512F, DQ and FMA present.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn pass<P: Pass>(o: &mut [f32], x: &[f32], y: &[f32]) {
        super::pass::<P>(o, x, y)
    }

    /// # Safety
    /// AVX-512F, DQ and FMA present.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn glu_pass<A: Act>(d: (&mut [f32], &mut [f32]), s: (&[f32], &[f32], &[f32])) {
        super::glu_pass::<A>(d, s)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// act(x) and act'(x) in f64 through candle's own ops (exact erf/tanh), the reference.
    fn reference(act: Activation, x: &Tensor) -> (Tensor, Tensor) {
        let x = x.to_dtype(DType::F64).unwrap();
        let pi = std::f64::consts::PI;
        let (y, d) = match act {
            Activation::Gelu => {
                let cdf =
                    (((&x / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
                let pdf = ((x.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
                    * (1.0 / (2.0 * pi).sqrt()))
                .unwrap();
                ((&x * &cdf).unwrap(), (cdf + (&x * pdf).unwrap()).unwrap())
            }
            Activation::GeluTanh => {
                let c = (2.0 / pi).sqrt();
                let u = ((&x + (x.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * c).unwrap();
                let t = u.tanh().unwrap();
                let du =
                    (((x.sqr().unwrap() * (3.0 * 0.044715)).unwrap() + 1.0).unwrap() * c).unwrap();
                let sech2 = (t.sqr().unwrap().neg().unwrap() + 1.0).unwrap();
                let half = ((&t + 1.0).unwrap() * 0.5).unwrap();
                let y = (&x * &half).unwrap();
                let d = &half + ((&x * 0.5).unwrap() * sech2).unwrap().mul(&du).unwrap();
                (y, d.unwrap())
            }
            Activation::Silu => {
                let s = (x.neg().unwrap().exp().unwrap() + 1.0)
                    .unwrap()
                    .recip()
                    .unwrap();
                let one_minus = (s.neg().unwrap() + 1.0).unwrap();
                let d = (&s * ((&x * one_minus).unwrap() + 1.0).unwrap()).unwrap();
                ((&x * &s).unwrap(), d)
            }
            Activation::Relu => (
                x.relu().unwrap(),
                x.gt(0.0).unwrap().to_dtype(DType::F64).unwrap(),
            ),
        };
        (y, d)
    }

    fn worst(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b): (Vec<f64>, Vec<f64>) = (
            a.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max)
    }

    /// bf16 inputs (a bf16 tape's pre-activations) give bit for bit what their f32 values give,
    /// over several chunks and a ragged last one.
    #[test]
    fn bf16_inputs_are_read_as_their_f32_values() {
        let n = 3 * CHUNK + 123;
        let ramp = |a: f32| -> Tensor {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * a).sin() * 6.0).collect();
            Tensor::from_vec(xs, (n,), &Device::Cpu).unwrap()
        };
        let (x, up, dy) = (ramp(0.37), ramp(0.11), ramp(0.73));
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (xh, uh) = (half(&x), half(&up));
        let (xw, uw) = (
            half(&x).to_dtype(DType::F32).unwrap(),
            half(&up).to_dtype(DType::F32).unwrap(),
        );
        let bits = |t: &Tensor| {
            t.to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            assert_eq!(
                bits(&apply(act, &xh).unwrap()),
                bits(&apply(act, &xw).unwrap()),
                "{act:?}"
            );
            let (a, b) = (
                backward(act, &xh, &dy).unwrap(),
                backward(act, &xw, &dy).unwrap(),
            );
            assert_eq!(bits(&a), bits(&b), "{act:?} backward");
            let (a, b) = (glu(act, &xh, &uh).unwrap(), glu(act, &xw, &uw).unwrap());
            assert_eq!(bits(&a), bits(&b), "{act:?} glu");
            let ((ga, ua), (gb, ub)) = (
                glu_backward(act, &xh, &uh, &dy).unwrap(),
                glu_backward(act, &xw, &uw, &dy).unwrap(),
            );
            assert_eq!(
                (bits(&ga), bits(&ua)),
                (bits(&gb), bits(&ub)),
                "{act:?} glu backward"
            );
        }
    }

    /// Every activation's fused forward, backward and gated forms against the f64 reference,
    /// on values from -12 to 12 (both tails and the steep middle).
    #[test]
    fn fused_passes_match_exact_math() {
        let n = 48_001;
        let xs: Vec<f32> = (0..n)
            .map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32)
            .collect();
        let x = Tensor::from_vec(xs, (n,), &Device::Cpu).unwrap();
        let dy = (Tensor::ones((n,), DType::F32, &Device::Cpu).unwrap() * 0.75).unwrap();
        let up = (&x * 0.5).unwrap();
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            let (y, d) = reference(act, &x);
            let y_err = worst(&apply(act, &x).unwrap(), &y);
            let d_err = worst(
                &backward(act, &x, &dy).unwrap(),
                &(d.clone() * 0.75).unwrap(),
            );
            assert!(
                y_err < 2e-6 && d_err < 2e-6,
                "{act:?}: forward {y_err}, backward {d_err}"
            );
            // The gated forms multiply the activation's error by `up` (|up| <= 6 here).
            let tol = 6.0 * 2e-6;
            let up64 = up.to_dtype(DType::F64).unwrap();
            let prod = glu(act, &x, &up).unwrap();
            let g_err = worst(&prod, &(&y * &up64).unwrap());
            let (dg, du) = glu_backward(act, &x, &up, &dy).unwrap();
            let dg_err = worst(&dg, &((d * 0.75).unwrap() * &up64).unwrap());
            let du_err = worst(&du, &(y * 0.75).unwrap());
            assert!(
                g_err < tol && dg_err < tol && du_err < 2e-6,
                "{act:?}: glu {g_err}, d_gate {dg_err}, d_up {du_err}"
            );
        }
    }
}
