//! P-tuning's LSTM prompt encoder (HF PEFT `PromptEncoder`, `encoder_reparameterization_type`
//! LSTM): virtual tokens = `mlp_head(lstm_head(embedding))`, where `lstm_head` is
//! `torch.nn.LSTM(token_dim, h, encoder_num_layers, bidirectional=True, batch_first=True)` run over
//! the n virtual tokens as one sequence and `mlp_head` is Linear(2h, 2h) -> ReLU ->
//! Linear(2h, token_dim).
//!
//! torch's cell, gates in the order i, f, g, o: z = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh;
//! i, f, o = sigmoid, g = tanh; c_t = f c_{t-1} + i g; h_t = o tanh(c_t); h_0 = c_0 = 0. The
//! reverse direction reads the sequence from the end; a layer's output is [forward h_t, reverse
//! h_t] (n, 2h), the next layer's input. The backward is hand-written backpropagation through
//! time. Deviations: PEFT runs the LSTM on B identical rows; kaizen on one (the table's gradient
//! is already summed over the batch, which is the same). PEFT's `encoder_dropout` between
//! layers (training only) is not implemented: the forward (inference) ignores it as torch's eval
//! mode does, and training such an encoder is refused.

use candle_core::Tensor;

use super::{relu_mlp, relu_mlp_backward, EncoderConfig, Init, Params, Spec};
use crate::models::TokenEncoder;
use crate::nn::Grads;
use crate::{Error, Result};

/// The parameters after `embedding.weight`, in torch's order: per layer, forward then reverse,
/// weight_ih, weight_hh, bias_ih, bias_hh (all U(-1/sqrt(h), 1/sqrt(h))); then `mlp_head`.
pub(super) fn specs(token_dim: usize, hidden: usize, layers: usize) -> Vec<Spec> {
    let init = Init::Uniform(1.0 / (hidden as f64).sqrt());
    let mut specs = vec![];
    for l in 0..layers {
        let input = if l == 0 { token_dim } else { 2 * hidden };
        for dir in ["", "_reverse"] {
            let name = |p: &str| format!("lstm_head.{p}_l{l}{dir}");
            specs.push(Spec::new(name("weight_ih"), &[4 * hidden, input], init));
            specs.push(Spec::new(name("weight_hh"), &[4 * hidden, hidden], init));
            specs.push(Spec::new(name("bias_ih"), &[4 * hidden], init));
            specs.push(Spec::new(name("bias_hh"), &[4 * hidden], init));
        }
    }
    specs.extend(Spec::linear("mlp_head.0", 2 * hidden, 2 * hidden));
    specs.extend(Spec::linear("mlp_head.2", 2 * hidden, token_dim));
    specs
}

#[derive(Debug)]
pub struct LstmEncoder {
    /// embedding (n, d); per layer l and direction: W_ih (4h, in_l), W_hh (4h, h), b_ih (4h),
    /// b_hh (4h) with in_0 = d, else 2h; mlp_head W0 (2h, 2h), b0, W2 (d, 2h), b2.
    p: Params,
    hidden: usize,
    layers: usize,
    dropout: f64,
}

/// What one direction of one layer saw and computed, rows indexed by sequence position.
struct Pass {
    /// (n, in)
    x: Tensor,
    /// (1, 4h) each: i, f, g, o after their activations.
    gates: Vec<Tensor>,
    /// (1, h) each.
    c: Vec<Tensor>,
    h: Vec<Tensor>,
}

/// Positions in the order a direction reads them (0 forward, 1 reverse).
fn order(n: usize, dir: usize) -> Box<dyn DoubleEndedIterator<Item = usize>> {
    if dir == 0 {
        Box::new(0..n)
    } else {
        Box::new((0..n).rev())
    }
}

/// The position read just before `t`, if any.
fn before(t: usize, n: usize, dir: usize) -> Option<usize> {
    if dir == 0 {
        t.checked_sub(1)
    } else {
        (t + 1 < n).then_some(t + 1)
    }
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl LstmEncoder {
    pub(super) fn new(p: Params, cfg: &EncoderConfig) -> Self {
        LstmEncoder {
            p,
            hidden: cfg.encoder_hidden_size,
            layers: cfg.encoder_num_layers,
            dropout: cfg.encoder_dropout,
        }
    }

    /// Index of W_ih of layer `l`, direction `dir`; W_hh, b_ih, b_hh follow.
    fn cell(&self, l: usize, dir: usize) -> usize {
        1 + (2 * l + dir) * 4
    }

    /// Index of the first `mlp_head` parameter.
    fn head(&self) -> usize {
        1 + 8 * self.layers
    }

    fn pass(&self, x: &Tensor, l: usize, dir: usize) -> Result<Pass> {
        let k = self.cell(l, dir);
        let [w_ih, w_hh, b_ih, b_hh] = [0, 1, 2, 3].map(|i| &self.p.t[k + i]);
        let (n, h) = (x.dim(0)?, self.hidden);
        let xz = x.matmul(&w_ih.t()?)?.broadcast_add(&(b_ih + b_hh)?)?; // (n, 4h)
        let zero = Tensor::zeros((1, h), x.dtype(), x.device())?;
        let mut out = Pass {
            x: x.clone(),
            gates: vec![zero.clone(); n],
            c: vec![zero.clone(); n],
            h: vec![zero.clone(); n],
        };
        let (mut h_t, mut c_t) = (zero.clone(), zero);
        for t in order(n, dir) {
            let z = (xz.narrow(0, t, 1)? + h_t.matmul(&w_hh.t()?)?)?; // (1, 4h)
            let i = sigmoid(&z.narrow(1, 0, h)?)?;
            let f = sigmoid(&z.narrow(1, h, h)?)?;
            let g = z.narrow(1, 2 * h, h)?.tanh()?;
            let o = sigmoid(&z.narrow(1, 3 * h, h)?)?;
            c_t = ((&f * &c_t)? + (&i * &g)?)?;
            h_t = (&o * c_t.tanh()?)?;
            out.gates[t] = Tensor::cat(&[i, f, g, o], 1)?;
            out.c[t] = c_t.clone();
            out.h[t] = h_t.clone();
        }
        Ok(out)
    }

    /// Backpropagation through time for one pass given d h_t (n, h); returns d x (n, in).
    fn pass_backward(
        &self,
        p: &Pass,
        l: usize,
        dir: usize,
        d_h: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let k = self.cell(l, dir);
        let (w_ih, w_hh) = (&self.p.t[k], &self.p.t[k + 1]);
        let (n, h) = (d_h.dim(0)?, self.hidden);
        let zero = Tensor::zeros((1, h), d_h.dtype(), d_h.device())?;
        let prev =
            |v: &[Tensor], t: usize| before(t, n, dir).map_or(zero.clone(), |s| v[s].clone());
        let mut d_z = vec![zero.clone(); n];
        let (mut dh_next, mut dc_next) = (zero.clone(), zero.clone());
        for t in order(n, dir).rev() {
            let gate = |j: usize| p.gates[t].narrow(1, j * h, h);
            let (i, f, g, o) = (gate(0)?, gate(1)?, gate(2)?, gate(3)?);
            let dh = (d_h.narrow(0, t, 1)? + &dh_next)?;
            let tc = p.c[t].tanh()?;
            let dc = (((&dh * &o)? * tc.sqr()?.affine(-1.0, 1.0)?)? + &dc_next)?;
            dc_next = (&dc * &f)?;
            // d z = d gate * gate'(z): sigmoid' = s (1 - s), tanh' = 1 - g^2.
            let dsig = |d: Tensor, s: &Tensor| -> Result<Tensor> {
                Ok((d * s)?.mul(&s.affine(-1.0, 1.0)?)?)
            };
            let dz = Tensor::cat(
                &[
                    dsig((&dc * &g)?, &i)?,
                    dsig((&dc * prev(&p.c, t))?, &f)?,
                    ((&dc * &i)? * g.sqr()?.affine(-1.0, 1.0)?)?,
                    dsig((&dh * &tc)?, &o)?,
                ],
                1,
            )?; // (1, 4h)
            dh_next = dz.matmul(w_hh)?;
            d_z[t] = dz;
        }
        let d_z = Tensor::cat(&d_z, 0)?; // (n, 4h)
        let h_prev = Tensor::cat(&(0..n).map(|t| prev(&p.h, t)).collect::<Vec<_>>(), 0)?; // (n, h)
        let keys = &self.p.keys[k..k + 4];
        grads.add(&keys[0], d_z.t()?.matmul(&p.x)?)?;
        grads.add(&keys[1], d_z.t()?.matmul(&h_prev)?)?;
        grads.add(&keys[2], d_z.sum(0)?)?;
        grads.add(&keys[3], d_z.sum(0)?)?;
        Ok(d_z.matmul(w_ih)?)
    }

    /// Every layer's two passes, and the LSTM's output (n, 2h).
    fn lstm(&self) -> Result<(Vec<[Pass; 2]>, Tensor)> {
        let mut x = self.p.t[0].clone();
        let mut passes = vec![];
        for l in 0..self.layers {
            let pair = [self.pass(&x, l, 0)?, self.pass(&x, l, 1)?];
            x = Tensor::cat(
                &[Tensor::cat(&pair[0].h, 0)?, Tensor::cat(&pair[1].h, 0)?],
                1,
            )?;
            passes.push(pair);
        }
        Ok((passes, x))
    }
}

impl TokenEncoder for LstmEncoder {
    fn forward(&self) -> Result<Tensor> {
        let head = self.head();
        Ok(relu_mlp(&self.lstm()?.1, &self.p.t[head..])?.1)
    }

    fn backward(&self, d_table: &Tensor, grads: &mut Grads) -> Result<()> {
        if self.dropout > 0.0 && self.layers > 1 {
            return Err(Error::Input(format!(
                "training a P-tuning LSTM encoder with encoder_dropout {} is not supported (dropout between LSTM layers is not implemented); set \"encoder_dropout\" to 0.0, PEFT's default, in adapter_config.json",
                self.dropout
            )));
        }
        let head = self.head();
        let (passes, out) = self.lstm()?; // recomputed: n and h are small
        let (inputs, _) = relu_mlp(&out, &self.p.t[head..])?;
        let (t, keys) = (&self.p.t[head..], &self.p.keys[head..]);
        let mut d = relu_mlp_backward(d_table, t, keys, &inputs, grads)?; // (n, 2h)
        for (l, pair) in passes.iter().enumerate().rev() {
            let h = self.hidden;
            let fwd = self.pass_backward(&pair[0], l, 0, &d.narrow(1, 0, h)?, grads)?;
            let rev = self.pass_backward(&pair[1], l, 1, &d.narrow(1, h, h)?, grads)?;
            d = (fwd + rev)?;
        }
        grads.add(&self.p.keys[0], d)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        self.p.list()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        Ok(self.p.set(key, value))
    }
}
