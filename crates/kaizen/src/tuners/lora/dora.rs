//! DoRA, weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353), as HF PEFT 0.21.2
//! (`peft/tuners/lora/dora.py` `DoraLinearLayer`, `variants.py` `DoraLinearVariant`): the layer's
//! weight is `diag(m / n) W'` with `W' = W + scale B A`, `n` the L2 norm of each row of `W'`, and
//! `m` (out,) the trainable `lora_magnitude_vector`, initialised to `n` (so to the row norms of `W`
//! when B is zero). As in the paper (section 4.3) and PEFT, `n` is recomputed every forward from
//! the current A and B but treated as a constant: no gradient flows through it.
//!
//! PEFT's forward is `base(x) + (m/n - 1) * (x' W^T) + (m/n) * scale * B A x'`. Without dropout (or
//! in eval mode) `x' = x` and the bias is not rescaled, so `y = (m/n) * (x W'^T) + b`. With dropout
//! in training `x' = dropout(x)` feeds both the LoRA branch and the `(m/n - 1)` correction, while
//! `base(x)` sees the undropped x; kaizen follows that exactly.

use candle_core::Tensor;

use super::LoraLayer;
use crate::nn::{Grads, Linear};
use crate::Result;

/// `W' = W + scale B A` (out, in) and its row norms `n` (out,).
fn combined(
    base: &Linear,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let w = (base.weight_f32()? + (lora_b.matmul(lora_a)? * scale)?)?; // (out, in)
    let norm = w.sqr()?.sum(1)?.sqrt()?; // (out,)
    Ok((w, norm))
}

/// `W'`, `n`, and the per-row factor `s = m / n` (1, out), with `n` a constant.
fn direction(l: &LoraLayer, m: &Tensor, base: &Linear) -> Result<(Tensor, Tensor, Tensor)> {
    let (w, norm) = combined(base, &l.lora_a, &l.lora_b, l.scale)?;
    let s = (m / &norm)?.unsqueeze(0)?; // (1, out)
    Ok((w, norm, s))
}

/// y (N, out) for x (N, in); `xd` is x after dropout, None without dropout.
pub(super) fn forward(
    l: &LoraLayer,
    m: &Tensor,
    base: &Linear,
    x: &Tensor,
    xd: Option<&Tensor>,
) -> Result<Tensor> {
    let (w, _, s) = direction(l, m, base)?;
    Ok(match xd {
        None => {
            let y = x.matmul(&w.t()?)?.broadcast_mul(&s)?; // (N, out)
            match &base.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        }
        Some(xd) => {
            let u = xd.matmul(&base.weight_f32()?.t()?)?; // (N, out): the base layer on x', no bias
            let v = xd.matmul(&l.lora_a.t()?)?.matmul(&l.lora_b.t()?)?; // (N, out)
            let corr = (u.broadcast_mul(&(&s - 1.0)?)? + (v * l.scale)?.broadcast_mul(&s)?)?;
            (base.base_forward(x)? + corr)?
        }
    })
}

/// dy (N, out) -> dx (N, in); gradients of A, B and the magnitude into `grads`. `mask` is the
/// dropout mask (already scaled by 1/(1-p)), None without dropout.
pub(super) fn backward(
    l: &LoraLayer,
    m: &Tensor,
    base: &Linear,
    x: &Tensor,
    mask: Option<&Tensor>,
    dy: &Tensor,
    grads: &mut Grads,
) -> Result<Tensor> {
    let (w, norm, s) = direction(l, m, base)?;
    let xd = match mask {
        Some(mk) => (x * mk)?,
        None => x.clone(),
    };
    // d m = sum over rows of dy * (x' W'^T) / n; recomputed rather than stored.
    let z = xd.matmul(&w.t()?)?; // (N, out)
    let dm = ((dy * z)?.sum(0)? / norm)?; // (out,)
    grads.add(&l.key_magnitude(), dm)?;
    let g = dy.broadcast_mul(&s)?; // (N, out): dy * m/n
    let h = xd.matmul(&l.lora_a.t()?)?; // (N, r)
    let gs = (&g * l.scale)?;
    grads.add(&l.key_b(), gs.t()?.matmul(&h)?)?; // (out, r)
    let dh = gs.matmul(&l.lora_b)?; // (N, r)
    grads.add(&l.key_a(), dh.t()?.matmul(&xd)?)?; // (r, in)
    Ok(match mask {
        // y = (m/n) x W'^T + b
        None => g.matmul(&w)?,
        // y = x W^T + b + (m/n - 1) x' W^T + (m/n) scale x' A^T B^T
        Some(mk) => {
            let dxd =
                (base.base_backward(&dy.broadcast_mul(&(&s - 1.0)?)?)? + dh.matmul(&l.lora_a)?)?;
            (base.base_backward(dy)? + (dxd * mk)?)?
        }
    })
}

/// The merged weight `diag(m / n) W'` (PEFT `merge_safe`); the bias is unchanged.
pub(super) fn merged_weight(l: &LoraLayer, m: &Tensor, base: &Linear) -> Result<Tensor> {
    let (w, _, s) = direction(l, m, base)?;
    Ok(w.broadcast_mul(&s.t()?)?)
}

/// PEFT's initial magnitude: the row norms of `W + scale B A`. (out,)
pub fn initial_magnitude(
    base: &Linear,
    lora_a: &Tensor,
    lora_b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    Ok(combined(base, lora_a, lora_b, scale)?.1)
}

#[cfg(test)]
mod tests {
    //! The eval-mode path is pinned to PEFT by tests/fixtures/lora/dora-*; dropout (training only,
    //! random) is checked here: forward against PEFT's formula written out, dx and d(magnitude) by
    //! finite differences, dA and dB against the dropout-free path fed x' (n is a constant, so a
    //! finite difference through A or B would not be DoRA's gradient).
    use candle_core::{DType, Device, Tensor};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::LoraLayer;
    use crate::nn::{Grads, Linear, LinearAdapter};
    use crate::tuners::init::normal;

    fn t(n: &[usize], rng: &mut StdRng) -> Tensor {
        let len = n.iter().product();
        Tensor::from_vec(normal(len, 1.0, rng), n, &Device::Cpu).unwrap()
    }

    fn setup(dropout: f64) -> (Linear, LoraLayer, Tensor, Tensor) {
        let mut rng = StdRng::seed_from_u64(7);
        let (n, inp, out, r) = (3, 4, 5, 2);
        let base = Linear::new(t(&[out, inp], &mut rng), Some(t(&[out], &mut rng)));
        let layer = LoraLayer {
            prefix: "p".into(),
            lora_a: t(&[r, inp], &mut rng),
            lora_b: t(&[out, r], &mut rng),
            scale: 1.5,
            dropout,
            magnitude: Some((t(&[out], &mut rng).abs().unwrap() + 1.0).unwrap()),
        };
        (base, layer, t(&[n, inp], &mut rng), t(&[n, out], &mut rng))
    }

    fn loss(layer: &LoraLayer, base: &Linear, x: &Tensor, dy: &Tensor) -> f64 {
        let mut rng = StdRng::seed_from_u64(1); // the same dropout mask every call
        let (y, _) = layer.forward(base, x, Some(&mut rng)).unwrap();
        let l = (y.to_dtype(DType::F64).unwrap() * dy.to_dtype(DType::F64).unwrap()).unwrap();
        l.sum_all().unwrap().to_scalar::<f64>().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Central differences of `loss` in each element of the tensor `set` replaces.
    fn numeric(v: &Tensor, set: &dyn Fn(Tensor) -> f64) -> Tensor {
        let vals = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2;
        let g: Vec<f32> = (0..vals.len())
            .map(|i| {
                let mut p = vals.clone();
                p[i] += eps;
                let up = set(Tensor::from_vec(p.clone(), v.dims(), &Device::Cpu).unwrap());
                p[i] -= 2.0 * eps;
                let down = set(Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap());
                ((up - down) / (2.0 * eps as f64)) as f32
            })
            .collect();
        Tensor::from_vec(g, v.dims(), &Device::Cpu).unwrap()
    }

    #[test]
    fn dropout_forward_is_peft_and_backward_is_its_gradient() {
        let (base, layer, x, dy) = setup(0.4);
        let mut rng = StdRng::seed_from_u64(1);
        let (y, mask) = layer.forward(&base, &x, Some(&mut rng)).unwrap();
        let mask = mask.expect("dropout draws a mask in training");
        // PEFT: base(x) + (m/n - 1) * (x' W^T) + (m/n) * scale * B A x', x' = dropout(x).
        let xd = (&x * &mask).unwrap();
        let m = layer.magnitude.as_ref().unwrap();
        let w = (&base.weight_f32().unwrap()
            + (layer.lora_b.matmul(&layer.lora_a).unwrap() * 1.5).unwrap())
        .unwrap();
        let s = (m / w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lora = xd
            .matmul(&layer.lora_a.t().unwrap())
            .unwrap()
            .matmul(&layer.lora_b.t().unwrap())
            .unwrap();
        let want = (base.base_forward(&x).unwrap()
            + xd.matmul(&base.weight_f32().unwrap().t().unwrap())
                .unwrap()
                .broadcast_mul(&(&s - 1.0).unwrap())
                .unwrap()
            + (lora * 1.5).unwrap().broadcast_mul(&s).unwrap())
        .unwrap();
        assert!(max_diff(&y, &want) < 1e-5);

        let mut grads = Grads::new();
        let dx = layer
            .backward(&base, &x, Some(&mask), &dy, &mut grads)
            .unwrap();
        let num_dx = numeric(&x, &|x| loss(&layer, &base, &x, &dy));
        assert!(max_diff(&dx, &num_dx) < 2e-3, "dx {dx} vs {num_dx}");
        let num_dm = numeric(m, &|m| {
            let l = LoraLayer {
                magnitude: Some(m),
                lora_a: layer.lora_a.clone(),
                lora_b: layer.lora_b.clone(),
                prefix: "p".into(),
                ..layer
            };
            loss(&l, &base, &x, &dy)
        });
        let dm = grads.get("p.lora_magnitude_vector").unwrap();
        assert!(max_diff(dm, &num_dm) < 2e-3, "dm {dm} vs {num_dm}");

        // dA, dB: those of the dropout-free layer at x'.
        let mut plain = Grads::new();
        layer.backward(&base, &xd, None, &dy, &mut plain).unwrap();
        for k in ["p.lora_A.weight", "p.lora_B.weight"] {
            assert!(
                max_diff(grads.get(k).unwrap(), plain.get(k).unwrap()) < 1e-5,
                "{k}"
            );
        }
    }

    #[test]
    fn without_dropout_merging_is_exact_and_a_fresh_magnitude_is_the_identity() {
        let (base, mut layer, x, _) = setup(0.0);
        let (y, saved) = layer.forward(&base, &x, None).unwrap();
        assert!(saved.is_none());
        let (w, b) = layer.merged(&base).unwrap().unwrap();
        let merged = Linear::new(w, b).base_forward(&x).unwrap();
        assert!(max_diff(&y, &merged) < 1e-5);
        // m = ||W + scale B A||: the LoRA layer's output exactly.
        layer.magnitude =
            Some(super::initial_magnitude(&base, &layer.lora_a, &layer.lora_b, 1.5).unwrap());
        let (dora, _) = layer.forward(&base, &x, None).unwrap();
        layer.magnitude = None;
        let (lora, _) = layer.forward(&base, &x, None).unwrap();
        assert!(max_diff(&dora, &lora) < 1e-5);
    }
}
