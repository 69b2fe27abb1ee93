//! The hot kernels of a training step on SmolLM2-135M's shapes (batch 4 x 256 tokens, hidden
//! 576, MLP 1536, 9 query / 3 kv heads of 64, vocab 49152), in GFLOP/s against this machine's
//! measured GEMM ceiling (the best of a 2048^3 product in each dtype):
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kaizen --bench kernels
//! ```
//!
//! Rows: each linear layer's forward (`x Wᵀ`) and input gradient (`dy W`) with candle's f32
//! matmul, kaizen's AVX-512 f32 kernel and kaizen's bf16 kernel; causal attention forward +
//! backward; the fused LM head + cross-entropy (forward and the hidden states' gradient).
//! Each time is the median of 7 runs after one warm-up.

mod common;

use candle_core::{DType, Device, Tensor};
use kaizen::nn::attention::{causal_attention_backward, causal_attention_t};
use kaizen::nn::gemm::{self, Mat};
use kaizen::nn::{loss, Grads, Linear};

const TOKENS: usize = 1024;

fn median_secs(f: impl FnMut()) -> f64 {
    common::median_secs(7, f)
}

fn randn(shape: &[usize]) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * 0.05).unwrap()
}

/// One row: GFLOP/s of each f32 implementation and of bf16, each dtype's best against its
/// ceiling (None = not applicable here).
struct Ceilings {
    f32: f64,
    bf16: f64,
}

fn row(name: &str, gflop: f64, f32s: &[Option<f64>], bf16: Option<f64>, c: &Ceilings) {
    let cell = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.0}"));
    let pct = |r: Option<f64>, ceil: f64| {
        r.map_or("-".to_string(), |r| format!("{:.0}%", 100.0 * r / ceil))
    };
    let best_f32 = f32s.iter().flatten().copied().reduce(f64::max);
    let cells: Vec<String> = f32s.iter().map(|&r| cell(r)).collect();
    println!(
        "| {name} | {gflop:.2} | {} | {} | {} | {} |",
        cells.join(" | "),
        cell(bf16),
        pct(best_f32, c.f32),
        pct(bf16, c.bf16)
    );
}

fn main() {
    let threads = rayon::current_num_threads();
    let have_f32 = gemm::available();
    let have_bf16 = gemm::available_bf16();
    let amx = gemm::available_amx();
    println!(
        "kaizen kernel benchmarks, {threads} threads, AVX-512F {have_f32}, AVX512-BF16 {have_bf16}, AMX {amx}"
    );

    // Ceilings: a 2048^3 product.
    let n = 2048;
    let a = randn(&[n, n]);
    let b = randn(&[n, n]);
    let flop = 2.0 * (n * n * n) as f64;
    let candle_f32 = flop / median_secs(|| drop(a.matmul(&b).unwrap())) / 1e9;
    let (av, bv) = (flat(&a), flat(&b));
    let mut c = vec![0f32; n * n];
    let own_f32 = have_f32.then(|| {
        flop / median_secs(|| {
            gemm::gemm(Mat::row_major(&av, n, n), Mat::row_major(&bv, n, n), &mut c)
        }) / 1e9
    });
    let bb: Vec<half::bf16> = bv.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let own_bf16 = have_bf16.then(|| {
        flop / median_secs(|| {
            gemm::gemm(Mat::row_major(&av, n, n), Mat::row_major(&bb, n, n), &mut c)
        }) / 1e9
    });
    let ceil = Ceilings {
        f32: candle_f32.max(own_f32.unwrap_or(0.0)),
        bf16: own_bf16.unwrap_or(f64::NAN),
    };
    println!(
        "GEMM ceiling (2048^3): candle f32 {candle_f32:.0}, kaizen f32 {}, kaizen bf16 {} GFLOP/s",
        own_f32.map_or("-".into(), |r| format!("{r:.0}")),
        own_bf16.map_or("-".into(), |r| format!("{r:.0}"))
    );
    if let Some((bf16, int8)) = instruction_peaks() {
        println!(
            "Instruction peaks ({threads} threads, registers only): vdpbf16ps {bf16:.0} GFLOP/s, vpdpbusd {int8:.0} GOP/s"
        );
    }
    println!();
    println!("| kernel | GFLOP | candle f32 | kaizen f32 | kaizen bf16 | best f32 / f32 ceiling | bf16 / bf16 ceiling |");
    println!("|---|---|---|---|---|---|---|");

    let shapes = [
        ("q_proj, o_proj", 576, 576),
        ("k_proj, v_proj", 192, 576),
        ("gate_proj, up_proj", 1536, 576),
        ("down_proj", 576, 1536),
    ];
    for (name, out, inp) in shapes {
        let w = randn(&[out, inp]);
        let x = randn(&[TOKENS, inp]);
        let dy = randn(&[TOKENS, out]);
        let gflop = 2.0 * (TOKENS * out * inp) as f64 / 1e9;
        let f32_lin = Linear::new(w.clone(), None);
        let bf_lin = Linear::new(w.to_dtype(DType::BF16).unwrap(), None);
        let (xv, dyv, wv) = (flat(&x), flat(&dy), flat(&w));
        let mut y = vec![0f32; TOKENS * out.max(inp)];
        let rate = |s: f64| gflop / s;
        row(
            &format!("{name} x Wᵀ ({TOKENS}x{inp} -> {out})"),
            gflop,
            &[
                Some(rate(median_secs(|| {
                    drop(f32_lin.base_forward(&x).unwrap())
                }))),
                have_f32.then(|| {
                    rate(median_secs(|| {
                        gemm::gemm(
                            Mat::row_major(&xv, TOKENS, inp),
                            Mat::row_major(&wv, out, inp).t(),
                            &mut y,
                        )
                    }))
                }),
            ],
            have_bf16.then(|| rate(median_secs(|| drop(bf_lin.base_forward(&x).unwrap())))),
            &ceil,
        );
        row(
            &format!("{name} dy W ({TOKENS}x{out} -> {inp})"),
            gflop,
            &[
                Some(rate(median_secs(|| {
                    drop(f32_lin.base_backward(&dy).unwrap())
                }))),
                have_f32.then(|| {
                    rate(median_secs(|| {
                        gemm::gemm(
                            Mat::row_major(&dyv, TOKENS, out),
                            Mat::row_major(&wv, out, inp),
                            &mut y,
                        )
                    }))
                }),
            ],
            have_bf16.then(|| rate(median_secs(|| drop(bf_lin.base_backward(&dy).unwrap())))),
            &ceil,
        );
    }

    // Attention: (B, H, T, hd) with GQA; FLOPs of the causal half (QKᵀ and PV forward, twice
    // that backward): 6 * B * H * T^2 * hd.
    let (bsz, h, kvh, t, hd) = (4, 9, 3, 256, 64);
    let q = randn(&[bsz, h, t, hd]);
    let k = randn(&[bsz, kvh, t, hd]);
    let v = randn(&[bsz, kvh, t, hd]);
    let d_o = randn(&[bsz, h, t, hd]);
    let gflop = 6.0 * (bsz * h * t * t * hd) as f64 / 1e9;
    let secs = median_secs(|| {
        let (o, cache) = causal_attention_t(&q, &k, &v, 0.125).unwrap();
        drop(causal_attention_backward(&cache, &o, &d_o).unwrap());
    });
    row(
        &format!("causal attention fwd+bwd (B{bsz} H{h}/{kvh} T{t} hd{hd})"),
        gflop,
        &[Some(gflop / secs), None],
        None,
        &ceil,
    );

    // LM head + cross-entropy: logits and the hidden states' gradient, 4 * N * V * d.
    let (vocab, hidden) = (49152, 576);
    let e = randn(&[vocab, hidden]);
    let hs = randn(&[TOKENS, hidden]);
    let targets: Vec<i64> = (0..TOKENS as i64)
        .map(|i| (i * 7919) % vocab as i64)
        .collect();
    let gflop = 4.0 * (TOKENS * vocab * hidden) as f64 / 1e9;
    let mut rates = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let head = Linear::new(e.to_dtype(dtype).unwrap(), None);
        let ok = dtype == DType::F32 || have_bf16;
        rates.push(ok.then(|| {
            gflop
                / median_secs(|| {
                    drop(
                        loss::head_loss_backward(
                            &head,
                            &hs,
                            &targets,
                            1.0,
                            None,
                            &mut Grads::new(),
                        )
                        .unwrap(),
                    )
                })
        }));
    }
    row(
        &format!("LM head + cross-entropy ({TOKENS}x{hidden} -> {vocab})"),
        gflop,
        &[None, rates[0]], // the frozen f32 head runs kaizen's packed kernel, not candle's
        rates[1],
        &ceil,
    );
}

/// What no product can pass on this CPU: the bf16 (`vdpbf16ps`, 64 FLOP each) and int8
/// (`vpdpbusd`, 128 operations each) dot-product instructions on twelve independent register
/// accumulators per thread, all threads at once; None without AVX512-BF16 and VNNI.
fn instruction_peaks() -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        use std::hint::black_box;
        if !(gemm::available_bf16() && is_x86_feature_detected!("avx512vnni")) {
            return None;
        }
        const STEPS: usize = 4_000_000;
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn bf16() -> f32 {
            let one = _mm512_set1_epi32(0x3f80_3f80);
            // SAFETY: a bit pattern reinterpreted as 32 bf16 values.
            let v = unsafe { std::mem::transmute::<__m512i, __m512bh>(black_box(one)) };
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..STEPS {
                for a in acc.iter_mut() {
                    *a = _mm512_dpbf16_ps(*a, v, v);
                }
            }
            acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
        }
        #[target_feature(enable = "avx512f,avx512vnni")]
        fn int8() -> i32 {
            let v = black_box(_mm512_set1_epi32(0x0101_0101));
            let mut acc = [_mm512_setzero_si512(); 12];
            for _ in 0..STEPS {
                for a in acc.iter_mut() {
                    *a = _mm512_dpbusd_epi32(*a, v, v);
                }
            }
            acc.iter().map(|&a| _mm512_reduce_add_epi32(a)).sum()
        }
        let threads = rayon::current_num_threads() as f64;
        let ops = 12.0 * STEPS as f64 * threads;
        // SAFETY: the CPU has AVX512-BF16 and VNNI (checked above).
        let t = median_secs(|| drop(rayon::broadcast(|_| black_box(unsafe { bf16() }))));
        let t8 = median_secs(|| drop(rayon::broadcast(|_| black_box(unsafe { int8() }))));
        Some((ops * 64.0 / t / 1e9, ops * 128.0 / t8 / 1e9))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
