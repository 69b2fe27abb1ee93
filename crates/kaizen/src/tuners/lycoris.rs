//! What LoHa and LoKr share (HF PEFT `peft/tuners/lycoris_utils.py`, LyCORIS by KohakuBlueleaf):
//! the config fields of `LycorisConfig` and its subclasses, and one [`LinearAdapter`] that adds
//! `x ΔWᵀ` to a frozen linear layer, with ΔW (out, in) built from small factors by a
//! [`DeltaWeight`] (LoHa: a Hadamard product of two low-rank matrices; LoKr: a Kronecker
//! product) times `scale = alpha / r`. Rank dropout and module dropout act in training as PEFT's
//! `get_delta_weight(apply_rank_dropout=True)` and `forward` apply them.
//!
//! Linear layers only: PEFT's Conv1d/Conv2d paths (`use_effective_conv2d`, the CP tensors
//! `hada_t1`/`lokr_t2`) have no layer to act on in kaizen's decoders.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::lora::{self, LoraConfig, PEFT_PREFIX};
use crate::config::Fields;
use crate::nn::{Grads, Linear, LinearAdapter};
use crate::{Error, Model, Result};

/// The fields every LyCORIS config has (PEFT's `LoHaConfig` / `LoKrConfig` minus their own).
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisConfig {
    /// Where the adapter goes and its rank: `r`, `target_modules`, `layers_to_transform`,
    /// `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`. These are LoRA's fields under
    /// the same JSON names, so LoRA's parser and target resolution serve them; the LoRA-only
    /// fields stay at their defaults (`alpha_pattern` holds LyCORIS's alphas).
    pub targets: LoraConfig,
    /// Scale numerator: ΔW is multiplied by alpha / r (PEFT's `alpha`, default 8).
    pub alpha: f64,
    /// Training only: each output row of ΔW is dropped with this probability.
    pub rank_dropout: f64,
    /// Training only: the whole adapter is skipped for a forward with this probability.
    pub module_dropout: f64,
}

impl Default for LycorisConfig {
    fn default() -> Self {
        LycorisConfig {
            targets: LoraConfig::default(),
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
        }
    }
}

impl LycorisConfig {
    /// Range checks, naming the field; then LoRA's checks of the shared fields.
    pub fn validate(&self, method: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Input(format!("{method}: {m}")));
        if self.targets.r == 0 {
            return bad("r must be at least 1".into());
        }
        if !self.alpha.is_finite() {
            return bad(format!(
                "alpha must be a finite number, found {}",
                self.alpha
            ));
        }
        for (name, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), found {p}"));
            }
        }
        self.targets.validate()
    }

    /// The shared fields of PEFT's adapter_config.json. Conv-only `use_effective_conv2d` is
    /// accepted and ignored (no conv layers here).
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        if c.usize("r")? == Some(0) {
            return Err("\"r\" must be at least 1".into());
        }
        // LoRA's parser reads `r`, the targets and the patterns (a LyCORIS file has no LoRA-only
        // field, so those keep their defaults).
        let targets = LoraConfig::from_json(map)?;
        Ok(LycorisConfig {
            targets,
            alpha: c.f64("alpha")?.unwrap_or(8.0),
            rank_dropout: c.f64("rank_dropout")?.unwrap_or(0.0),
            module_dropout: c.f64("module_dropout")?.unwrap_or(0.0),
        })
    }

    /// adapter_config.json's shared fields as PEFT writes them, for `peft_type`; the method
    /// adds its own. `targets` are the resolved module names.
    pub fn to_json(&self, peft_type: &str, targets: &[String]) -> Map<String, Value> {
        let t = &self.targets;
        let target_modules = match &t.target_modules {
            Some(lora::TargetModules::Regex(r)) => json!(r),
            _ => json!(targets),
        };
        let v = json!({
            "alpha": self.alpha,
            "alpha_pattern": t.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": t.base_model_name_or_path,
            "exclude_modules": null,
            "inference_mode": true,
            "layers_pattern": null,
            "layers_to_transform": t.layers_to_transform,
            "module_dropout": self.module_dropout,
            "modules_to_save": null,
            "peft_type": peft_type,
            "r": t.r,
            "rank_dropout": self.rank_dropout,
            "rank_pattern": t.rank_pattern,
            "revision": null,
            "target_modules": target_modules,
            "task_type": "CAUSAL_LM",
            "use_effective_conv2d": false,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    /// Attaches one adapter per targeted layer: `build(path, layer, r, rng)` makes its
    /// [`DeltaWeight`] (from `weights`, PEFT keys -> tensors, when given: every tensor must be
    /// used). Returns the targets.
    pub fn attach<D: DeltaWeight + 'static>(
        &self,
        method: &str,
        model: &mut Model,
        mut weights: Option<BTreeMap<String, Tensor>>,
        seed: u64,
        rescale_rank_dropout: bool,
        mut build: impl FnMut(Factors<'_>) -> Result<D>,
    ) -> Result<Vec<String>> {
        use rand::SeedableRng;
        self.validate(method)?;
        let targets = lora::resolve_targets(model, &self.targets)?;
        let mut rng = StdRng::seed_from_u64(seed);
        for (path, lin) in model.linears_mut() {
            if !targets.contains(&path) {
                continue;
            }
            let t = &self.targets;
            let r = lora::pattern_value(&t.rank_pattern, &path)?.unwrap_or(t.r);
            let alpha = lora::pattern_value(&t.alpha_pattern, &path)?.unwrap_or(self.alpha);
            let prefix = format!("{PEFT_PREFIX}{path}");
            let delta = build(Factors {
                prefix: &prefix,
                r,
                out: lin.out_features(),
                inp: lin.in_features(),
                weights: weights.as_mut(),
                rng: &mut rng,
            })?;
            lin.adapter = Some(Box::new(LycorisLayer {
                delta,
                scale: alpha / r as f64,
                rank_dropout: self.rank_dropout,
                module_dropout: self.module_dropout,
                rescale_rank_dropout,
            }));
        }
        lora::all_used(weights)?;
        Ok(targets)
    }
}

/// What a method needs to make one layer's factors.
pub struct Factors<'a> {
    /// PEFT key prefix of the layer, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: &'a str,
    pub r: usize,
    pub out: usize,
    pub inp: usize,
    /// Loading: the adapter file's tensors.
    pub weights: Option<&'a mut BTreeMap<String, Tensor>>,
    pub rng: &'a mut StdRng,
}

/// How a factor starts (PEFT's `nn.init` calls).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    /// torch's `kaiming_uniform_(a = sqrt 5)`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the
    /// second dimension; drawn with kaizen's seeded RNG.
    Kaiming,
}

impl Factors<'_> {
    /// The tensor `<prefix>.<name>` of shape (rows, cols): taken from the file when loading,
    /// else initialised by `init`.
    pub fn tensor(&mut self, name: &str, rows: usize, cols: usize, init: Init) -> Result<Named> {
        let key = format!("{}.{name}", self.prefix);
        let value = match self.weights.as_deref_mut() {
            Some(w) => lora::take(w, &key, &[rows, cols])?,
            None => {
                let v = match init {
                    Init::Zeros => vec![0.0; rows * cols],
                    Init::Kaiming => {
                        super::init::uniform(rows * cols, 1.0 / (cols as f64).sqrt(), self.rng)
                    }
                };
                Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
            }
        };
        Ok(Named { key, value })
    }
}

/// A trainable tensor under its PEFT key.
#[derive(Debug)]
pub struct Named {
    pub key: String,
    pub value: Tensor,
}

/// A matrix that is either trained whole (`lokr_w1`) or as a product `a b` of a low-rank pair
/// (`hada_w1_a @ hada_w1_b`, `lokr_w1_a @ lokr_w1_b`).
#[derive(Debug)]
pub enum Factor {
    Full(Named),
    /// a: (rows, r), b: (r, cols)
    LowRank(Named, Named),
}

impl Factor {
    /// The matrix (rows, cols).
    pub fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(w) => w.value.clone(),
            Factor::LowRank(a, b) => a.value.matmul(&b.value)?,
        })
    }

    /// d loss / d matrix (rows, cols) -> the gradients of its tensors.
    pub fn backward(&self, dm: Tensor, grads: &mut Grads) -> Result<()> {
        match self {
            Factor::Full(w) => grads.add(&w.key, dm),
            Factor::LowRank(a, b) => {
                grads.add(&a.key, dm.matmul(&b.value.t()?)?)?; // (rows, r)
                grads.add(&b.key, a.value.t()?.matmul(&dm)?) // (r, cols)
            }
        }
    }

    fn named(&self) -> Vec<&Named> {
        match self {
            Factor::Full(w) => vec![w],
            Factor::LowRank(a, b) => vec![a, b],
        }
    }

    fn set(&mut self, key: &str, value: &Tensor) -> bool {
        let hit = match self {
            Factor::Full(w) => [Some(w), None],
            Factor::LowRank(a, b) => [Some(a), Some(b)],
        }
        .into_iter()
        .flatten()
        .find(|n| n.key == key);
        hit.map(|n| n.value = value.clone()).is_some()
    }
}

/// ΔW of one method from its two factors, and its backward.
pub trait DeltaWeight: std::fmt::Debug + Send + Sync {
    /// The two factors (LoHa: `w1_a w1_b`, `w2_a w2_b`; LoKr: `w1`, `w2`).
    fn factors(&self) -> [&Factor; 2];
    fn factors_mut(&mut self) -> [&mut Factor; 2];
    /// ΔW (out, in) from the factors' matrices, before scaling.
    fn combine(&self, m1: &Tensor, m2: &Tensor) -> Result<Tensor>;
    /// g = d loss / d (unscaled) ΔW (out, in) -> (d m1, d m2).
    fn split(&self, g: &Tensor, m1: &Tensor, m2: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// A LyCORIS adapter beside a frozen linear: `y = W x + b + (ΔW ⊙ drop) x`, with
/// ΔW = scale · combine(m1, m2) (PEFT's `LycorisLayer` and `Linear._get_delta_activations`).
#[derive(Debug)]
pub struct LycorisLayer<D> {
    pub delta: D,
    /// alpha / r
    pub scale: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
    /// Rank dropout's kept rows divided by their mean (LoHa always; LoKr's `rank_dropout_scale`).
    pub rescale_rank_dropout: bool,
}

impl<D: DeltaWeight> LycorisLayer<D> {
    /// scale · combine(m1, m2): (out, in), with the factors' matrices.
    fn delta_weight(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let [f1, f2] = self.delta.factors();
        let (m1, m2) = (f1.matrix()?, f2.matrix()?);
        let dw = (self.delta.combine(&m1, &m2)? * self.scale)?;
        Ok((dw, m1, m2))
    }

    /// Training's dropouts, as PEFT draws them: the module is used unless a uniform draw falls
    /// at or below `module_dropout` (then the mask is empty); rank dropout keeps each output row
    /// of ΔW when its draw is above `rank_dropout`, as a mask (out,) divided by its mean when
    /// rescaling. None: ΔW as is (inference, or no dropout).
    fn draw_mask(&self, out: usize, rng: Option<&mut StdRng>) -> Result<Option<Tensor>> {
        let Some(rng) = rng else { return Ok(None) };
        if self.module_dropout > 0.0 && rng.random::<f64>() <= self.module_dropout {
            return Ok(Some(Tensor::zeros(
                0,
                candle_core::DType::F32,
                &Device::Cpu,
            )?));
        }
        if self.rank_dropout == 0.0 {
            return Ok(None);
        }
        let mut m: Vec<f32> = (0..out)
            .map(|_| f32::from(rng.random::<f64>() > self.rank_dropout))
            .collect();
        let kept = m.iter().sum::<f32>();
        // PEFT divides by the mean even when every row is dropped (0/0: NaN weights); kaizen
        // keeps the all-zero mask there (probability rank_dropout^out).
        if self.rescale_rank_dropout && kept > 0.0 {
            let mean = kept / out as f32;
            m.iter_mut().for_each(|v| *v /= mean);
        }
        Ok(Some(Tensor::from_vec(m, (out, 1), &Device::Cpu)?))
    }
}

/// An empty mask: module dropout skipped the adapter for this forward.
fn skipped(mask: Option<&Tensor>) -> bool {
    mask.is_some_and(|m| m.elem_count() == 0)
}

impl<D: DeltaWeight> LinearAdapter for LycorisLayer<D> {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mask = self.draw_mask(base.out_features(), rng)?;
        let y = base.base_forward(x)?; // (N, out)
        if skipped(mask.as_ref()) {
            return Ok((y, mask));
        }
        let (mut dw, _, _) = self.delta_weight()?;
        if let Some(m) = &mask {
            dw = dw.broadcast_mul(m)?;
        }
        Ok(((y + x.matmul(&dw.t()?)?)?, mask))
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        mask: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let dx = base.base_backward(dy)?;
        if skipped(mask) {
            // As in PEFT, a skipped module leaves its tensors without a gradient.
            return Ok(dx);
        }
        let (mut dw, m1, m2) = self.delta_weight()?;
        // y += x dwᵀ: d dw = dyᵀ x (out, in); through the mask, then the scale.
        let mut g = dy.t()?.matmul(x)?;
        if let Some(m) = mask {
            dw = dw.broadcast_mul(m)?;
            g = g.broadcast_mul(m)?;
        }
        let (d1, d2) = self.delta.split(&(g * self.scale)?, &m1, &m2)?;
        let [f1, f2] = self.delta.factors();
        f1.backward(d1, grads)?;
        f2.backward(d2, grads)?;
        Ok((dx + dy.matmul(&dw)?)?)
    }

    /// Decoding: one ΔW for all rows of this adapter.
    fn forward_on_product(&self, base: &Linear, x: &Tensor, wx: &Tensor) -> Result<Option<Tensor>> {
        let (dw, _, _) = self.delta_weight()?;
        Ok(Some(base.add_bias((wx + x.matmul(&dw.t()?)?)?)?))
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        let [f1, f2] = self.delta.factors();
        f1.named()
            .into_iter()
            .chain(f2.named())
            .map(|n| (n.key.clone(), n.value.clone()))
            .collect()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        let [f1, f2] = self.delta.factors_mut();
        Ok(f1.set(key, &value) || f2.set(key, &value))
    }

    /// The mask is per forward, not per row; ΔW is rebuilt in backward.
    fn saved_per_row(&self, _base: &Linear) -> usize {
        0
    }

    /// PEFT's merge: `W += ΔW` (no dropout); the bias is unchanged.
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let (dw, _, _) = self.delta_weight()?;
        Ok(Some(((base.weight_f32()? + dw)?, base.bias.clone())))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::tuners::{init, loha::Hadamard, lokr::Kron};

    fn named(key: &str, rows: usize, cols: usize, rng: &mut StdRng) -> Named {
        let v = init::normal(rows * cols, 0.5, rng);
        Named {
            key: key.into(),
            value: Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap(),
        }
    }

    fn layer<D: DeltaWeight>(delta: D, rescale: bool) -> LycorisLayer<D> {
        LycorisLayer {
            delta,
            scale: 1.5,
            rank_dropout: 0.5,
            module_dropout: 0.0,
            rescale_rank_dropout: rescale,
        }
    }

    /// sum(y ⊙ r) for a training forward whose dropout draws come from `seed`.
    fn loss<D: DeltaWeight>(l: &LycorisLayer<D>, base: &Linear, x: &Tensor, r: &Tensor) -> f64 {
        let mut rng = StdRng::seed_from_u64(7);
        let (y, _) = l.forward(base, x, Some(&mut rng)).unwrap();
        (y * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// The hand-derived backward under rank dropout (mask and rescaling) against central
    /// differences of the same training forward, along a random direction per tensor.
    fn check<D: DeltaWeight>(mut l: LycorisLayer<D>, out: usize, inp: usize) {
        let mut rng = StdRng::seed_from_u64(1);
        let w = Tensor::from_vec(
            init::normal(out * inp, 0.3, &mut rng),
            (out, inp),
            &Device::Cpu,
        );
        let base = Linear::new(w.unwrap(), None);
        let x = Tensor::from_vec(init::normal(5 * inp, 1.0, &mut rng), (5, inp), &Device::Cpu);
        let r = Tensor::from_vec(init::normal(5 * out, 1.0, &mut rng), (5, out), &Device::Cpu);
        let (x, r) = (x.unwrap(), r.unwrap());
        let (_, mask) = l
            .forward(&base, &x, Some(&mut StdRng::seed_from_u64(7)))
            .unwrap();
        let m: Vec<f32> = mask
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(m.contains(&0.0) && m.iter().any(|&v| v > 0.0), "{m:?}");
        let mut grads = Grads::new();
        let dx = l
            .backward(&base, &x, mask.as_ref(), &r, &mut grads)
            .unwrap();
        assert_eq!(dx.dims(), x.dims());
        for (key, p) in l.params() {
            let v = Tensor::from_vec(
                init::normal(p.elem_count(), 1.0, &mut rng),
                p.dims(),
                &Device::Cpu,
            );
            let v = v.unwrap();
            let eps = 1e-2;
            let at = |l: &mut LycorisLayer<D>, s: f64| {
                l.set_param(&key, (&p + (&v * s).unwrap()).unwrap())
                    .unwrap();
                loss(l, &base, &x, &r)
            };
            let numeric = (at(&mut l, eps) - at(&mut l, -eps)) / (2.0 * eps);
            l.set_param(&key, p.clone()).unwrap();
            let g = grads.get(&key).unwrap();
            let analytic = (g * &v)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
            assert!(
                err < 1e-3,
                "{key}: numeric {numeric} vs backward {analytic}"
            );
        }
    }

    #[test]
    fn rank_dropout_backward_matches_finite_differences() {
        let mut rng = StdRng::seed_from_u64(3);
        let rng = &mut rng;
        let loha = Hadamard {
            w1: Factor::LowRank(named("w1_a", 12, 2, rng), named("w1_b", 2, 8, rng)),
            w2: Factor::LowRank(named("w2_a", 12, 2, rng), named("w2_b", 2, 8, rng)),
        };
        check(layer(loha, true), 12, 8);
        // kron((3, 2), (4, 4)) = (12, 8), the right factor as a rank-2 pair
        let lokr = Kron {
            w1: Factor::Full(named("w1", 3, 2, rng)),
            w2: Factor::LowRank(named("w2_a", 4, 2, rng), named("w2_b", 2, 4, rng)),
            dims: [3, 4, 2, 4],
        };
        check(layer(lokr, false), 12, 8);
    }

    /// A module skipped by module dropout: the frozen layer's output and input gradient, and no
    /// gradient for the adapter (as PEFT leaves it).
    #[test]
    fn module_dropout_skips_the_adapter() {
        let mut rng = StdRng::seed_from_u64(4);
        let delta = Kron {
            w1: Factor::Full(named("w1", 2, 2, &mut rng)),
            w2: Factor::Full(named("w2", 2, 2, &mut rng)),
            dims: [2, 2, 2, 2],
        };
        let l = LycorisLayer {
            module_dropout: 0.999_999,
            ..layer(delta, false)
        };
        let base = Linear::new(named("w", 4, 4, &mut rng).value, None);
        let x = named("x", 3, 4, &mut rng).value;
        let (y, mask) = l.forward(&base, &x, Some(&mut rng)).unwrap();
        let diff = (y - base.base_forward(&x).unwrap()).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let mut grads = Grads::new();
        l.backward(&base, &x, mask.as_ref(), &x, &mut grads)
            .unwrap();
        assert!(grads.is_empty());
    }
}
