//! The memory guard: the peak a run will need, estimated before it allocates, so that a run that
//! cannot fit is refused with the numbers and the flags that would make it fit, instead of being
//! killed by the kernel an hour in. Two checks: the weights alone before any is read
//! ([`crate::load_within`], from the checkpoint's shapes and the load precision), and a training
//! run's whole peak once the method is attached, before any data is read ([`estimate`]).
//!
//! The estimate counts what kaizen keeps, not a generic rule of thumb: the frozen weights as
//! stored, the trainable tensors with their gradients and optimizer moments, the tape each layer
//! saves for its hand-written backward (norm outputs, attention's q/k/v and log-sum-exp,
//! the MLP's pre-activations, and what each adapter saves itself; the inputs of linear layers
//! are recomputed in backward), or under gradient checkpointing each layer's input and
//! one layer's tape, and the workspace of the fused head + loss and of packed weights. It is
//! checked against measured peaks by `scripts/bench/memory_guard.py` (BENCHMARKS.md).

use std::fmt;

use crate::models::{Model, Part};
use crate::nn::quant::QFormat;
use crate::nn::Matrix;

/// The shape of a training run.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub batch_size: usize,
    /// Tokens per sequence (`--max-len`: batches are padded to their longest, at most this).
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    /// AdamW keeps two moments per trainable value; SGD none.
    pub adam: bool,
}

/// Estimated peak bytes of a training run, by where they go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The model's weights as stored (frozen and trainable alike).
    pub weights: u64,
    /// Trainable tensors outside the model's weights (adapters), their gradients and optimizer
    /// moments (full fine-tuning: the gradients and moments of every weight).
    pub trainable: u64,
    /// What the forward keeps for backward, at the peak of backward.
    pub activations: u64,
    /// The fused head + loss's chunk, packed weights, the embeddings and their gradients.
    pub workspace: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.activations + self.workspace
    }
}

/// Bytes as the messages print them: GiB with one decimal, or MiB below 1 GiB.
pub fn gib(bytes: u64) -> String {
    match bytes >= 1 << 30 {
        true => format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64),
        false => format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64),
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "about {} (weights {}, trainable state {}, activations {}, workspace {})",
            gib(self.total()),
            gib(self.weights),
            gib(self.trainable),
            gib(self.activations),
            gib(self.workspace)
        )
    }
}

/// Memory a new run can use: Linux's `MemAvailable`, or less where a cgroup limit is lower.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Some(cgroup.map_or(kib * 1024, |c| c.min(kib * 1024)))
}

/// Bytes per token of one layer (the layers are alike but for which carry adapters: the
/// largest): its training tape as held (activations in the tape's dtype, per-row statistics and
/// what adapters save in f32); that tape in f32 (gradient checkpointing recomputes it so); and
/// what backward makes of the tape in f32 beside it: the linear layers' recomputed inputs,
/// attention's recomputed output, and a bf16 tape's norm outputs widened (attention and the MLP
/// read their bf16 activations as they are).
fn tape_per_token(model: &mut Model) -> (u64, u64, u64) {
    let c = model.config().clone();
    let spec = c.architecture.spec();
    let (h, f) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (heads, kv_heads) = (c.num_attention_heads as u64, c.num_key_value_heads as u64);
    let (q, kv) = (heads * c.head_dim as u64, kv_heads * c.head_dim as u64);
    // Each norm keeps its normalised input (and a reciprocal std per row); the next layer reads
    // the norm's output (kept below when a linear layer needs its input).
    let norms = if spec.sandwich { 4 } else { 2 };
    let (norms, norm_stats) = match c.qk_norm {
        true => (norms * h + q + kv, norms + heads + kv_heads),
        false => (norms * h, norms),
    };
    // Attention: q, k, v and a log-sum-exp per head and row (its output is recomputed).
    let attention = q + 2 * kv;
    let mlp = match spec.mlp {
        crate::models::arch::MlpKind::Plain => f,
        _ => 2 * f,
    };
    // A linear layer that trains or carries an adapter needs its input in backward, which its
    // tape does not keep: backward recomputes it (a norm's output, attention's output, the
    // activation) in f32; the q/k/v (and the MLP's gate/up) projections share theirs. Per layer
    // index: the inputs recomputed, and what the adapters save.
    let n = &spec.names;
    let mut per_layer: std::collections::BTreeMap<String, (std::collections::BTreeSet<&str>, u64)> =
        Default::default();
    for (path, l) in model.linears_mut() {
        if l.adapter.is_none() && l.trainable.is_none() {
            continue;
        }
        let mut parts = path.rsplitn(3, '.');
        let (name, parent, layer) = (parts.next(), parts.next(), parts.next());
        let input = match (parent, name) {
            (Some(p), Some(m)) if p == n.attn && m == n.o => "attn-out",
            (Some(p), _) if p == n.attn => "attn-in",
            (Some(p), Some(m)) if p == n.mlp && m == n.down => "mlp-out",
            (Some(p), _) if p == n.mlp => "mlp-in",
            _ => continue, // the head: counted with the workspace
        };
        let saved = l.adapter.as_ref().map_or(0, |a| a.saved_per_row(l)) as u64;
        let e = per_layer
            .entry(layer.unwrap_or("").to_string())
            .or_default();
        e.0.insert(input);
        e.1 += saved;
    }
    let (inputs, saved) = per_layer
        .values()
        .map(|(kept, saved)| {
            let inputs = kept.iter().map(|k| match *k {
                "attn-in" | "mlp-in" => h,
                "attn-out" => q,
                _ => f,
            });
            (inputs.sum::<u64>(), *saved)
        })
        .max_by_key(|(inputs, saved)| inputs + saved)
        .unwrap_or((0, 0));
    let (activations, f32s) = (norms + attention + mlp, norm_stats + heads + saved);
    let tape = model.decoder.tape.size_in_bytes() as u64;
    let held = activations * tape + 4 * f32s;
    let widened = if tape < 4 { norms } else { 0 };
    (held, 4 * (activations + f32s), 4 * (inputs + q + widened))
}

/// The estimated peak of training `model` (its method attached) in `shape`.
pub fn estimate(model: &mut Model, shape: &RunShape) -> Estimate {
    let c = model.config().clone();
    let (h, f, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let layers = c.num_hidden_layers as u64;
    let skip = model.tied_head().then(|| model.lm_head_name().to_string());
    let head_name = model.lm_head_name().to_string();
    // Stored bytes; values that train (full fine-tuning); the largest linear layer in its
    // compute dtype (packed for a product; embeddings are looked up, never packed).
    let (mut weights, mut full_values, mut packed) = (0u64, 0u64, 0u64);
    let mut largest_trained = 0u64;
    for (path, mut part) in model.parts_mut() {
        if Some(&path) == skip.as_ref() {
            continue;
        }
        let compute_bytes = match &part {
            Part::Linear(l) if path != head_name => {
                let (r, c) = l.weight.dims2();
                (r * c) as u64 * l.weight.compute_dtype().size_in_bytes() as u64
            }
            _ => 0,
        };
        let stored = part.weight_storage().map(|(_, b)| b as u64);
        let trains = part.trainable_mut().is_some();
        let dense: u64 = part
            .tensors_mut()
            .iter()
            .map(|(_, t)| t.elem_count() as u64)
            .sum();
        let bias = match &part {
            Part::Linear(l) => l.bias.as_ref().map_or(0, |b| b.elem_count() as u64),
            _ => 0,
        };
        weights += stored.map_or(4 * dense, |s| s + 4 * bias);
        if trains {
            full_values += dense;
            largest_trained = largest_trained.max(dense);
        }
        packed = packed.max(compute_bytes);
    }
    // The head's products: packed once per batch, in slabs, or through the layer (nn/loss.rs).
    let head = crate::nn::loss::head_workspace(model.lm_head());
    // An adapter's tensors, their gradients and moments; full fine-tuning's weights are counted
    // above, their gradients and moments here.
    let moments = if shape.adam { 8 } else { 0 };
    let trainable = match full_values {
        0 => crate::train::trainable_count(model).0 as u64 * (8 + moments),
        n => n * (4 + moments),
    };

    // Virtual tokens lengthen every sequence; a prefix only the keys and values.
    let t = (shape.seq_len + model.num_virtual_tokens()) as u64;
    let tokens = shape.batch_size as u64 * t;
    let (held, whole, backward) = tape_per_token(model);
    let activations = match shape.gradient_checkpointing {
        // Each layer's input, and one layer's tape recomputed in backward (in f32: rounding a
        // tape that lives for one layer saves nothing).
        true => 4 * layers * tokens * h + whole * tokens,
        false => layers * held * tokens,
    };
    // Backward of one layer: its output gradient, input gradient and the MLP's gradients, what
    // it recomputes and widens from the tape; the model's input, output and their gradients;
    // the head's logits chunk (256 rows) and its gradient; what the head's products hold, and a
    // matrix packed for a product.
    let workspace = 4 * (tokens * (2 * h + 3 * f) + tokens * 4 * h + 2 * 256 * v)
        + backward * tokens
        + head
        + packed;
    // Full fine-tuning: a weight's gradient as computed, the sum it is added into (a tied
    // table's two), and AdamW's temporaries, for the largest weight (the embeddings); and the
    // updated weights the optimizer gathers before they replace the old ones.
    let batch = (crate::train::optim::UPDATE_BATCH_BYTES as u64).min(4 * full_values);
    let workspace = workspace + 3 * 4 * largest_trained + batch;
    // The allocator's slack: glibc keeps freed chunks in per-thread arenas (the CLI never trims
    // them), so the peak RSS of real runs lies 0-15% above the live bytes counted here
    // (scripts/bench/memory_guard.py; BENCHMARKS.md).
    let workspace = workspace + (activations + workspace) * 3 / 20;
    Estimate {
        weights,
        trainable,
        activations,
        workspace,
    }
}

/// The bytes a smaller base would save: `--dtype bf16` (frozen dense f32 matrices halved) and
/// `--quantize nf4` (the blocks' frozen dense linear layers in NF4, the other f32 matrices in
/// bf16); only the ways that apply to how `model` is held now.
pub fn smaller_bases(model: &mut Model) -> Vec<(&'static str, u64)> {
    let layers = format!("{}.", model.config().architecture.spec().names.layers);
    let nf4 = QFormat::Nf4 {
        double_quant: false,
    };
    let (mut now, mut bf16, mut quant, mut any_f32, mut any_dense) = (0, 0, 0, false, false);
    for (path, part) in model.parts_mut() {
        let (m, trains) = match &part {
            Part::Linear(l) => (&l.weight, l.trainable.is_some()),
            Part::Embedding(e) => (&e.weight, e.trainable.is_some()),
            Part::Norm(_) => continue,
        };
        let bytes = m.bytes() as u64;
        now += bytes;
        let Matrix::Dense(t) = m else {
            (bf16, quant) = (bf16 + bytes, quant + bytes);
            continue;
        };
        let (rows, cols) = m.dims2();
        let half = (rows * cols * 2) as u64;
        let f32 = t.dtype() == candle_core::DType::F32 && !trains;
        any_f32 |= f32;
        bf16 += if f32 { half } else { bytes };
        let in_block = path.starts_with(&layers) && matches!(part, Part::Linear(_)) && !trains;
        any_dense |= in_block;
        quant += match in_block {
            true => nf4.matrix_bytes(rows, cols).unwrap_or(half),
            false if f32 => half,
            false => bytes,
        };
    }
    let mut out = Vec::new();
    if any_f32 {
        out.push(("--dtype bf16", bf16));
    }
    if any_dense {
        out.push(("--quantize nf4", quant));
    }
    out.into_iter()
        .map(|(flag, b)| (flag, now.saturating_sub(b)))
        .collect()
}
