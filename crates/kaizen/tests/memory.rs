//! The memory guard's estimate (`kaizen::memory`) against what a training step really allocates.
//! This test binary counts every allocation (a global allocator wrapping the system one), so the
//! peak of live bytes during a micro-batch's forward and backward is exact, free of the malloc
//! retention and page granularity that make RSS noisy. For every method on fixtures of each
//! decoder shape (GQA + tied head, GPT-NeoX's fused QKV and parallel residual, Gemma 3's sandwich
//! norms and QK-norm), with and without gradient checkpointing, the step's peak above what was
//! live before it must lie within the estimate's activations + workspace + trainable state (the
//! guard never lets a run start that it knows not to fit) and above 1/3 of it (the estimate counts
//! what kaizen keeps, not a blanket margin). The weights' estimate before loading
//! (`Weights::resident_estimate`) must equal the loaded model's bytes, for every load precision.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kaizen::memory::{self, RunShape};
use kaizen::nn::Grads;
use kaizen::train::{micro_batch_backward, Batch};
use kaizen::tuners::boft::{self, BoftConfig};
use kaizen::tuners::bottleneck::{self, BottleneckConfig};
use kaizen::tuners::ia3::{self, Ia3Config};
use kaizen::tuners::lora::{self, LoraConfig, TargetModules};
use kaizen::tuners::oft::{self, OftConfig};
use kaizen::tuners::prefix::{self, PrefixTuningConfig};
use kaizen::tuners::prompt::{self, PromptInit, PromptTuningConfig};
use kaizen::tuners::{freeze, full};
use kaizen::{DType, Model, Precision, QFormat};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Tests in this binary run one at a time: the counters are process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn batch(model: &Model, b: usize, t: usize) -> Batch {
    let v = model.config().vocab_size as u32;
    let input_ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + 13) % v).collect();
    let labels = input_ids.iter().map(|&x| x as i64).collect();
    Batch {
        input_ids,
        labels,
        batch_size: b,
        seq_len: t,
    }
}

/// Peak bytes allocated above the live ones during a micro-batch: the least of two after a
/// first one (which warms up the gradients' storage, counted by the estimate as trainable state,
/// and anything a library sets up once).
fn measured_step(model: &Model, batch: &Batch) -> usize {
    let mut grads = Grads::new();
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    micro_batch_backward(model, batch, 1.0, Some(&mut rng), &mut grads).unwrap();
    (0..2)
        .map(|_| {
            let before = LIVE.load(Relaxed);
            PEAK.store(before, Relaxed);
            micro_batch_backward(model, batch, 1.0, Some(&mut rng), &mut grads).unwrap();
            PEAK.load(Relaxed) - before
        })
        .min()
        .unwrap()
}

/// A step of `b` x `t` tokens on `model` as it is (`gradient_checkpointing` as set): its measured
/// peak and the estimate of it.
fn peak_and_estimate(model: &mut Model, b: usize, t: usize) -> (u64, memory::Estimate) {
    let shape = RunShape {
        batch_size: b,
        seq_len: t,
        gradient_checkpointing: model.gradient_checkpointing,
        adam: true,
    };
    let est = memory::estimate(model, &shape);
    (measured_step(model, &batch(model, b, t)) as u64, est)
}

fn attach(model: &mut Model, method: &str) {
    let lora = |model: &mut Model, cfg: LoraConfig| {
        lora::attach(model, &cfg, None, 3).unwrap();
    };
    match method {
        "lora" => lora(model, LoraConfig::default()),
        "lora-all+dropout" => lora(
            model,
            LoraConfig {
                target_modules: Some(TargetModules::AllLinear),
                lora_dropout: 0.1,
                ..LoraConfig::default()
            },
        ),
        "dora" => lora(
            model,
            LoraConfig {
                use_dora: true,
                ..LoraConfig::default()
            },
        ),
        "ia3" => drop(ia3::attach(model, &Ia3Config::default(), None).unwrap()),
        "oft" => {
            let cfg = OftConfig {
                oft_block_size: 16,
                ..OftConfig::default()
            };
            drop(oft::attach(model, &cfg, None, 3).unwrap())
        }
        "boft" => {
            let cfg = BoftConfig {
                boft_block_size: 8,
                boft_n_butterfly_factor: 2,
                ..BoftConfig::default()
            };
            drop(boft::attach(model, &cfg, None, 3).unwrap())
        }
        "adapter" => {
            drop(bottleneck::attach(model, &BottleneckConfig::default(), None, 3).unwrap())
        }
        "prompt" => {
            let cfg = PromptTuningConfig {
                num_virtual_tokens: 20,
                init: PromptInit::Random,
                base_model_name_or_path: None,
            };
            prompt::attach(model, &cfg, None, None, 3).unwrap()
        }
        "prefix" => {
            let cfg = PrefixTuningConfig {
                num_virtual_tokens: 20,
                prefix_projection: false,
                encoder_hidden_size: None,
                base_model_name_or_path: None,
            };
            prefix::attach(model, &cfg, None, 3).unwrap()
        }
        "full" => drop(full::attach(model).unwrap()),
        "freeze" => drop(freeze::attach(model, &freeze::FreezeConfig::default()).unwrap()),
        other => panic!("unknown method {other}"),
    }
}

#[test]
fn the_estimate_bounds_what_a_step_allocates_for_every_method() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let methods = [
        "lora",
        "lora-all+dropout",
        "dora",
        "ia3",
        "oft",
        "boft",
        "adapter",
        "prompt",
        "prefix",
        "full",
        "freeze",
    ];
    let (b, t) = (4, 128);
    let mut bad = Vec::new();
    for name in ["llama-gqa-tied", "neox-par-bpe", "gemma3"] {
        for method in methods {
            for gc in [false, true] {
                let mut model = kaizen::load(&fixture(name)).unwrap().model;
                attach(&mut model, method);
                model.gradient_checkpointing = gc;
                let (got, est) = peak_and_estimate(&mut model, b, t);
                let bound = est.activations + est.workspace + est.trainable;
                eprintln!(
                    "{name:>14} {method:>16} gc={gc:<5}: step peak {got:>9} B, bound {bound:>9} B ({:.2})",
                    bound as f64 / got as f64
                );
                if got > bound || got * 3 < bound {
                    bad.push(format!(
                        "{name} {method} gc={gc}: peak {got} B, estimate {est:?}"
                    ));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the estimate is below the step's peak, or over 3x it:\n{}",
        bad.join("\n")
    );
}

/// `--dtype bf16` keeps the tape in bf16: a step allocates less than with the same model's tape in
/// f32, and the estimate, which counts the tape in its dtype, still bounds it; with gradient
/// checkpointing too (the recomputed layer's tape then stays f32).
#[test]
fn a_bf16_tape_lowers_the_step_and_the_estimate_bounds_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, t) = (4, 128);
    for method in ["lora", "dora", "prefix", "full"] {
        let mut model = kaizen::load_as(&fixture("llama-gqa-tied"), DType::BF16)
            .unwrap()
            .model;
        attach(&mut model, method);
        let mut step = |tape: DType, gc: bool| {
            (model.decoder.tape, model.gradient_checkpointing) = (tape, gc);
            let (got, est) = peak_and_estimate(&mut model, b, t);
            (
                got,
                est.activations + est.workspace + est.trainable,
                est.activations,
            )
        };
        let (half, f32s) = (step(DType::BF16, false), step(DType::F32, false));
        eprintln!("{method}: bf16 tape {half:?}, f32 tape {f32s:?} (peak, bound, activations)");
        assert!(
            half.0 < f32s.0,
            "{method}: bf16 tape {half:?} vs f32 {f32s:?}"
        );
        assert!(
            half.2 < f32s.2,
            "{method}: bf16 tape {half:?} vs f32 {f32s:?}"
        );
        assert!(
            half.0 <= half.1 && half.1 <= 3 * half.0,
            "{method}: bf16 tape's peak {} B, bound {} B",
            half.0,
            half.1
        );
        let gc = step(DType::BF16, true);
        assert!(
            gc.0 <= gc.1 && gc.1 <= 3 * gc.0,
            "{method}: checkpointed peak {} B, bound {} B",
            gc.0,
            gc.1
        );
    }
}

/// Bytes held by the tape of a forward over a `b` x `t` batch (its output and tape kept; the
/// second of two forwards, after what a first one sets up once).
fn tape_bytes(model: &Model, b: usize, t: usize) -> usize {
    let ids = batch(model, b, t).input_ids;
    let ids = candle_core::Tensor::from_slice(&ids, (b, t), &candle_core::Device::Cpu).unwrap();
    let (x, _) = model.embed_input(&ids, true).unwrap();
    drop(model.forward_train(&x, None).unwrap());
    let before = LIVE.load(Relaxed);
    let kept = model.forward_train(&x, None).unwrap();
    let held = LIVE.load(Relaxed) - before;
    drop(kept);
    held
}

/// A linear layer's input that backward needs (an adapter's, or a trained weight's) is not kept
/// on the tape: backward recomputes it from what the tape holds anyway (the norm's normalised
/// input, attention's output, the MLP's pre-activation). LoRA on every linear layer (no dropout,
/// so nothing of its own saved but a rank-r product) holds the tape of the bare model, in f32
/// and in bf16; before, it added each layer's norm outputs, attention output and activation.
#[test]
fn adapters_keep_no_copy_of_their_inputs_on_the_tape() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, t) = (2, 64);
    for name in ["llama-gqa-tied", "neox-par-bpe", "gemma3"] {
        for tape in [DType::F32, DType::BF16] {
            let mut model = kaizen::load_as(&fixture(name), DType::BF16).unwrap().model;
            model.decoder.tape = tape;
            let bare = tape_bytes(&model, b, t);
            lora::attach(
                &mut model,
                &LoraConfig {
                    target_modules: Some(TargetModules::AllLinear),
                    ..LoraConfig::default()
                },
                None,
                3,
            )
            .unwrap();
            let adapted = tape_bytes(&model, b, t);
            let c = model.config();
            let one_input = b * t * c.hidden_size * tape.size_in_bytes();
            eprintln!(
                "{name} {tape:?}: tape {bare} B bare, {adapted} B with LoRA on every linear layer"
            );
            assert!(
                adapted < bare + one_input,
                "{name} {tape:?}: tape {adapted} B with adapters, {bare} B without"
            );
        }
    }
}

#[test]
fn gradient_checkpointing_and_smaller_batches_lower_the_estimate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut model = kaizen::load(&fixture("llama-gqa-tied")).unwrap().model;
    attach(&mut model, "lora");
    let shape = |batch_size, gradient_checkpointing| RunShape {
        batch_size,
        seq_len: 256,
        gradient_checkpointing,
        adam: true,
    };
    let mut e = |s: RunShape| memory::estimate(&mut model, &s);
    let (plain, gc, small) = (e(shape(8, false)), e(shape(8, true)), e(shape(2, false)));
    assert!(gc.activations < plain.activations && small.activations < plain.activations);
    assert_eq!((gc.weights, gc.trainable), (plain.weights, plain.trainable));
    // AdamW's two moments: adapter values x 4 bytes x (value, gradient, two moments).
    let values: usize = kaizen::train::trainable_params(&mut model)
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(plain.trainable, 16 * values as u64);
    let sgd = memory::estimate(
        &mut model,
        &RunShape {
            adam: false,
            ..shape(8, false)
        },
    );
    assert_eq!(sgd.trainable, 8 * values as u64);
}

#[test]
fn weights_are_estimated_before_loading_as_they_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let q = |s: &str| Some(QFormat::parse(s).unwrap());
    let both = |t: &str, h: &str| Some([q(t).unwrap(), q(h).unwrap()]);
    let cases = [
        ("llama-gqa-tied", DType::F32, None, None),
        ("llama-gqa-tied", DType::BF16, None, None),
        ("llama-gqa-tied", DType::BF16, q("q8_0"), None),
        ("llama-gqa-tied", DType::BF16, q("nf4"), None),
        ("llama-gqa-tied", DType::F32, q("q4_k"), None),
        (
            "llama-gqa-tied",
            DType::BF16,
            q("q8_0"),
            both("q4_0", "q4_0"),
        ),
        (
            "llama-mha-linear",
            DType::BF16,
            q("q8_0"),
            both("q4_0", "q8_0"),
        ),
        ("neox-par-bpe", DType::BF16, None, None),
        ("llama-gguf", DType::F32, None, None),
        ("llama-gguf", DType::BF16, q("q4_0"), None),
    ];
    for (name, dtype, quantize, quantize_embeddings) in cases {
        let dir = fixture(name);
        let path = match name.ends_with("gguf") {
            true => std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
                .unwrap(),
            false => dir,
        };
        let mut ck = kaizen::checkpoint::open(&path).unwrap();
        ck.weights.matrices = dtype;
        ck.weights.quantize = quantize;
        ck.weights.quantize_embeddings = quantize_embeddings;
        let before = ck
            .weights
            .resident_estimate(&ck.config.architecture.spec().names);
        let p = Precision {
            dtype,
            quantize,
            quantize_embeddings,
            int8: false,
        };
        let mut model = kaizen::load_with(&path, p).unwrap().model;
        let shape = RunShape {
            batch_size: 1,
            seq_len: 1,
            gradient_checkpointing: false,
            adam: true,
        };
        let after = memory::estimate(&mut model, &shape).weights;
        assert_eq!(
            before, after,
            "{name} {dtype:?} {quantize:?} {quantize_embeddings:?}"
        );
    }
}

#[test]
fn a_budget_below_the_weights_refuses_before_loading_and_names_smaller_holds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = fixture("llama-gqa-tied");
    let err = kaizen::load_within(&path, Precision::default(), Some(1000))
        .err()
        .expect("refused")
        .to_string();
    for needle in [
        "llama-gqa-tied",
        "weights alone",
        "F32",
        "--dtype bf16",
        "--quantize nf4",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert!(kaizen::load_within(&path, Precision::default(), Some(1 << 30)).is_ok());
}
