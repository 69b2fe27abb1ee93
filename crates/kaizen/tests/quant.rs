//! A quantized frozen base (`--quantize`, a GGUF kept in its own types) computes exactly what
//! the dense path computes on the dequantized weights: logits, greedy decoding (the
//! matrix-vector path), and LoRA / DoRA gradients. The dense path itself is pinned to
//! transformers + PEFT by parity.rs and adapter_parity.rs, and the GGUF fixtures kept quantized
//! are checked against transformers' references there too. Tolerances: 1e-5 relative where both
//! sides multiply the same values in the same precision (only the summation order differs).

mod common;
use common::rel_err;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kaizen::nn::{Grads, Matrix};
use kaizen::train::{label_count, micro_batch_backward};
use kaizen::{Precision, QFormat};
use serde_json::Value;

const TOL: f64 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(model: &str, dtype: DType, quantize: Option<&str>) -> kaizen::Model {
    let p = Precision {
        dtype,
        quantize: quantize.map(|q| QFormat::parse(q).unwrap()),
        quantize_embeddings: None,
        int8: false,
    };
    load_as(model, p)
}

fn load_as(model: &str, p: Precision) -> kaizen::Model {
    kaizen::load_with(&root().join("tests/fixtures/models").join(model), p)
        .unwrap_or_else(|e| panic!("{model} {p:?}: {e}"))
        .model
}

/// The dense twin of a quantized model: every quantized matrix replaced by its dequantized
/// values, stored in the compute dtype.
fn dense_twin(q: &mut kaizen::Model, model: &str, dtype: DType) -> kaizen::Model {
    let mut d = load(model, dtype, None);
    let weights: Vec<(String, Matrix)> = q
        .linears_mut()
        .into_iter()
        .map(|(p, l)| (p, l.weight.clone()))
        .collect();
    let mut quantized = 0;
    for ((path, lin), (qpath, w)) in d.linears_mut().into_iter().zip(weights) {
        assert_eq!(path, qpath);
        if let Matrix::Quant(_) = w {
            quantized += 1;
            lin.weight = Matrix::Dense(w.to_f32().unwrap().to_dtype(dtype).unwrap());
        }
    }
    assert!(quantized > 0, "{model}: nothing was quantized");
    // A quantized table's lookups are exact (f32 rows), not rounded to the compute dtype.
    d.decoder.embed.weight = Matrix::Dense(q.decoder.embed.weight.to_f32().unwrap());
    d
}

fn adapter_fixture(name: &str) -> (PathBuf, Vec<kaizen::train::Batch>) {
    let dir = root().join("tests/fixtures/lora").join(name);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (dir.join("adapter"), common::batches(&reference))
}

/// Loss and adapter gradients of one step over the fixture's micro-batches.
fn grads_of(m: &kaizen::Model, batches: &[kaizen::train::Batch]) -> (f64, Grads) {
    let total: usize = batches.iter().map(|b| label_count(b, 0)).sum();
    let mut grads = Grads::new();
    let mut sum = 0.0;
    for b in batches {
        sum += micro_batch_backward(m, b, 1.0 / total as f64, None, &mut grads)
            .unwrap()
            .loss_sum;
    }
    (sum / total as f64, grads)
}

/// Logits of both models on a prompt, greedy continuations, and (with an adapter fixture)
/// loss and every adapter gradient.
fn check(model: &str, quantize: &str, dtype: DType, adapter: Option<&str>) {
    let what = format!("{model} --quantize {quantize} --dtype {dtype:?}");
    check_loaded(
        load(model, dtype, Some(quantize)),
        model,
        dtype,
        adapter,
        &what,
    )
}

/// [`check`] on a quantized model loaded as the caller chose.
fn check_loaded(
    mut q: kaizen::Model,
    model: &str,
    dtype: DType,
    adapter: Option<&str>,
    what: &str,
) {
    let mut d = dense_twin(&mut q, model, dtype);
    let ids: Vec<u32> = (1..40).map(|i| (i * 7 % 50) as u32 + 3).collect();
    let err = rel_err(
        &q.logits(&ids, None).unwrap(),
        &d.logits(&ids, None).unwrap(),
    );
    assert!(err <= TOL, "{what}: logits: relative error {err:e}");
    let cfg = kaizen::generate::GenerateConfig {
        max_new_tokens: 12,
        greedy: true,
        ..Default::default()
    };
    let tok = kaizen::load(&root().join("tests/fixtures/models").join(model))
        .unwrap()
        .tokenizer;
    let gen = |m: &kaizen::Model| {
        kaizen::generate::generate(m, &tok, &ids[..9], &cfg, &mut |_| {})
            .unwrap()
            .ids
    };
    assert_eq!(gen(&q), gen(&d), "{what}: greedy continuation");
    let Some(adapter) = adapter else { return };
    let (dir, batches) = adapter_fixture(adapter);
    kaizen::tuners::load_adapter(&mut q, &dir).unwrap();
    kaizen::tuners::load_adapter(&mut d, &dir).unwrap();
    let ((lq, gq), (ld, gd)) = (grads_of(&q, &batches), grads_of(&d, &batches));
    assert!((lq - ld).abs() / ld <= TOL, "{what}: loss {lq} vs {ld}");
    assert!(!gd.is_empty() && gq.len() == gd.len());
    for (k, b) in gd.iter() {
        let a = gq.get(k).unwrap();
        let err = rel_err(a, b);
        assert!(
            err <= 1e-4,
            "{what}: gradient of {k}: relative error {err:e}"
        );
    }
}

#[test]
fn llama_lora_on_q8_0_q4_0_nf4_f32_and_bf16() {
    for q in ["q8_0", "q4_0", "nf4", "nf4_dq"] {
        for dtype in [DType::F32, DType::BF16] {
            check("llama-gqa-tied", q, dtype, Some("llama-gqa-tied"));
        }
    }
}

#[test]
fn gpt_neox_fused_qkv_lora_and_dora_on_nf4() {
    check(
        "neox-seq-spiece",
        "nf4",
        DType::F32,
        Some("neox-seq-spiece"),
    );
    check(
        "llama-gqa-tied",
        "q8_0",
        DType::F32,
        Some("dora-llama-gqa-tied"),
    );
}

/// A GGUF's K-quants and 32-blocks kept as they are (Q4_K, Q5_0, Q5_K, Q6_K, Q8_0), the
/// embeddings and tied head included.
#[test]
fn gguf_k_quants_kept() {
    check("gemma3-gguf/model.gguf", "q8_0", DType::F32, None);
    check("gemma3-gguf/model.gguf", "q8_0", DType::BF16, None);
    check("llama-gguf/model.gguf", "q8_0", DType::F32, None);
}

/// `--quantize-embeddings`: the table and the untied head are held in the requested types (the
/// blocks in --quantize's), and LoRA trains on the result exactly as on its dense twin.
#[test]
fn embeddings_and_head_quantized_on_request() {
    let model = "llama-mha-linear";
    let q = |s: &str| QFormat::parse(s).unwrap();
    for (dtype, [table, head]) in [
        (DType::F32, ["q4_0", "q8_0"]),
        (DType::BF16, ["nf4", "nf4"]),
    ] {
        let p = Precision {
            dtype,
            quantize: Some(q("q8_0")),
            quantize_embeddings: Some([q(table), q(head)]),
            int8: false,
        };
        let mut m = load_as(model, p);
        let label = |s: &str| q(s).to_string();
        assert_eq!(m.decoder.embed.weight.label(), label(table));
        assert_eq!(m.lm_head().weight.label(), label(head));
        for (path, l) in m.linears_mut() {
            if !path.starts_with("lm_head") {
                assert_eq!(l.weight.label(), "Q8_0", "{path}");
            }
        }
        let what = format!("{model} --quantize q8_0 --quantize-embeddings {table},{head}");
        check_loaded(m, model, dtype, Some(model), &what);
    }
    // Without the option both stay in the load dtype.
    let m = load(model, DType::BF16, Some("q8_0"));
    assert_eq!(m.decoder.embed.weight.label(), "BF16");
    assert_eq!(m.lm_head().weight.label(), "BF16");
}

#[test]
fn a_row_not_in_whole_blocks_is_one_clear_error() {
    let p = Precision {
        dtype: DType::F32,
        quantize: Some(QFormat::parse("nf4").unwrap()),
        quantize_embeddings: None,
        int8: false,
    };
    let e = kaizen::load_with(&root().join("tests/fixtures/models/gemma3"), p)
        .err()
        .expect("96-wide rows cannot hold 64-value blocks")
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.down_proj") && e.contains("64") && e.contains("q8_0"),
        "{e}"
    );
    // K-quants fall back as llama.cpp's quantizer does; what is left without a type is None.
    let q4k = QFormat::parse("q4_k").unwrap();
    assert_eq!(q4k.for_row(512), Some(q4k));
    assert_eq!(q4k.for_row(640).and_then(|f| f.name()), None); // Q5_0: not a --quantize name
    assert_eq!(q4k.for_row(640).map(|f| f.to_string()), Some("Q5_0".into()));
    assert_eq!(
        QFormat::parse("q6_k")
            .unwrap()
            .for_row(96)
            .map(|f| f.to_string()),
        Some("Q8_0".into())
    );
    assert_eq!(q4k.for_row(100), None);
    let e = QFormat::parse("q3").err().unwrap().to_string();
    assert!(e.contains("nf4") && e.contains("q4_k"), "{e}");
}

#[test]
fn quantize_names_round_trip() {
    for n in QFormat::NAMES {
        assert_eq!(QFormat::parse(n).unwrap().name(), Some(n));
    }
}

/// Quantized products agree with candle's matmul on the dequantized matrix for shapes with
/// edges (rows not a multiple of the panels, several depth blocks, few rows = the
/// matrix-vector path), both orientations.
#[test]
fn products_match_dequantized_matmul() {
    use kaizen::nn::quant::QMatrix;
    for (rows, cols, n) in [(70, 1024, 3), (33, 768, 17), (3100, 64, 5), (40, 2816, 30)] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for f in ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"] {
            let f = QFormat::parse(f).unwrap();
            if cols % f.block_size() != 0 {
                continue;
            }
            let q = QMatrix::quantize(&w, f, DType::F32, "w").unwrap();
            let dq = q.to_f32().unwrap();
            let m = Matrix::Quant(std::sync::Arc::new(q));
            let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
            let err = rel_err(
                &m.product(&x, true).unwrap(),
                &x.matmul(&dq.t().unwrap()).unwrap(),
            );
            assert!(err <= TOL, "{f} {rows}x{cols} x{n} forward: {err:e}");
            let dy = Tensor::randn(0f32, 1.0, (n, rows), &Device::Cpu).unwrap();
            let err = rel_err(&m.product(&dy, false).unwrap(), &dy.matmul(&dq).unwrap());
            assert!(err <= TOL, "{f} {rows}x{cols} x{n} backward: {err:e}");
        }
    }
}

/// bf16 products through a quantized W (on AMX each task dequantizes the rectangles of W it
/// uses) equal the products with the dense bf16 weight that the dequantized matrix rounds to:
/// bit for bit where both run on AMX (one kernel, one summation order), else to 1e-5. Shapes
/// with row edges, several token passes (over 512 rows) and K-quant column groups.
#[test]
fn bf16_products_equal_the_rounded_dense_weight() {
    use kaizen::nn::quant::QMatrix;
    let exact = kaizen::nn::gemm::available_amx();
    for (rows, cols, n) in [(70, 1024, 37), (33, 768, 600), (300, 2816, 130)] {
        let w = (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap() * 0.02).unwrap();
        for f in ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"] {
            let f = QFormat::parse(f).unwrap();
            let q = QMatrix::quantize(&w, f, DType::BF16, "w").unwrap();
            let dense = Matrix::Dense(q.to_f32().unwrap().to_dtype(DType::BF16).unwrap());
            let m = Matrix::Quant(std::sync::Arc::new(q));
            let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (n, rows), &Device::Cpu).unwrap();
            for (input, transposed) in [(&x, true), (&dy, false)] {
                let got = m.product(input, transposed).unwrap();
                let want = dense.product(input, transposed).unwrap();
                let err = rel_err(&got, &want);
                let what = format!("{f} {rows}x{cols} x{n} transposed={transposed}: {err:e}");
                if exact {
                    let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
                    let bits = |t: Tensor| -> Vec<u32> {
                        t.to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect()
                    };
                    assert!(bits(got) == bits(want), "{what}");
                } else {
                    assert!(err <= TOL, "{what}");
                }
            }
        }
    }
}

/// The one-pass bf16 dequantization the products take where a format has it (Q4_K, NF4 on
/// AVX512-BF16) equals the f32 dequantization rounded to the nearest even bf16 (subnormals to
/// zero, as AVX512-BF16 converts), bit for bit, for whole rows and ranges of whole blocks.
#[test]
fn one_pass_bf16_dequantization_is_the_rounded_f32() {
    use kaizen::nn::quant::QMatrix;
    let (rows, cols) = (5, 1536);
    let w = (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap() * 0.02).unwrap();
    let mut ran = 0;
    for f in ["q4_k", "nf4", "q8_0"] {
        let q = QMatrix::quantize(&w, QFormat::parse(f).unwrap(), DType::BF16, "w").unwrap();
        let unit = q.block_size().max(64);
        for (r, c0, len) in [(0, 0, cols), (3, unit, 2 * unit), (4, cols - unit, unit)] {
            let mut want = vec![0f32; len];
            q.dequantize_into(r, c0, &mut want).unwrap();
            let mut got = vec![half::bf16::NAN; len];
            if !q.dequantize_bf16_into(r, c0, &mut got) {
                continue;
            }
            ran += 1;
            for (i, (g, &v)) in got.iter().zip(&want).enumerate() {
                let v = if v.is_subnormal() {
                    0f32.copysign(v)
                } else {
                    v
                };
                let want = half::bf16::from_f32(v);
                assert_eq!(g.to_bits(), want.to_bits(), "{f} row {r} column {}", c0 + i);
            }
        }
    }
    if ran == 0 {
        eprintln!("skipped: no AVX512-BF16");
    }
}

/// `--compute int8` on a type without a blocked int8 kernel (Q6_K; Q2_K and Q3_K too): from 8
/// rows of x on, the forward is the compute dtype's product, bit for bit, since the row dots
/// ran 4x slower; fewer rows (decoding) keep the int8 row dots, which differ from it.
#[test]
fn int8_forward_without_a_blocked_kernel_takes_the_compute_dtype() {
    use kaizen::nn::quant::QMatrix;
    // The blocked int8 kernels' features (`nn/quant/int8.rs`'s `available`).
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    if !vnni {
        eprintln!("skipped: no AVX512-VNNI (every type then takes the row dots)");
        return;
    }
    let (rows, cols) = (96, 512);
    let w = (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap() * 0.02).unwrap();
    let q6 = QFormat::parse("q6_k").unwrap();
    let plain = QMatrix::quantize(&w, q6, DType::BF16, "w").unwrap();
    let mut int8 = QMatrix::quantize(&w, q6, DType::BF16, "w").unwrap();
    int8.int8 = true;
    assert!(!int8.int8_forward(40) && int8.int8_forward(4));
    let (plain, int8) = (
        Matrix::Quant(std::sync::Arc::new(plain)),
        Matrix::Quant(std::sync::Arc::new(int8)),
    );
    let bits = |t: Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    };
    for (n, same) in [(40, true), (4, false)] {
        let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
        let (a, b) = (
            plain.product(&x, true).unwrap(),
            int8.product(&x, true).unwrap(),
        );
        assert_eq!(bits(a) == bits(b), same, "{n} rows");
    }
}

/// `--compute int8`: activations quantized to 8 bits per block cost well under a percent of
/// the product's scale on Gaussian data (llama.cpp's own trade), on every llama.cpp type and on
/// NF4 (its levels rounded to 8-bit codes), and so does the input gradient on 8-bit codes of dy
/// and W. NF4 has no row dots: a few rows multiply in the compute dtype (f32 here, exact).
#[test]
fn int8_products_stay_close() {
    use kaizen::nn::quant::QMatrix;
    let (rows, cols) = (96, 512);
    let w = (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap() * 0.02).unwrap();
    for f in ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "nf4", "nf4_dq"] {
        let mut q = QMatrix::quantize(&w, QFormat::parse(f).unwrap(), DType::F32, "w").unwrap();
        let wd = q.to_f32().unwrap();
        q.int8 = true;
        let q = Matrix::Quant(std::sync::Arc::new(q));
        // 7 rows: per-row dot products; 40: the blocked product (and its input gradient).
        for n in [7, 40] {
            let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu).unwrap();
            let got = q.product(&x, true).unwrap();
            let err = rel_err(&got, &x.matmul(&wd.t().unwrap()).unwrap());
            let (least, most) = match (f.starts_with("nf4"), n < 8) {
                (true, true) => (0.0, 1e-5),
                _ => (f64::MIN_POSITIVE, 2e-2),
            };
            assert!(
                (least..=most).contains(&err),
                "{f}, {n} rows: int8 relative error {err:e}"
            );
            if n < 8 {
                continue; // a few rows' input gradient is not int8's
            }
            let dy = Tensor::randn(0f32, 1.0, (n, rows), &Device::Cpu).unwrap();
            let got = q.product(&dy, false).unwrap();
            let err = rel_err(&got, &dy.matmul(&wd).unwrap());
            assert!(
                err > 0.0 && err <= 2e-2,
                "{f}, {n} rows: int8 input gradient error {err:e}"
            );
        }
    }
}

/// Quantizing rows in parallel chunks gives the bytes ggml's reference quantizer gives for the
/// whole matrix (candle's `QTensor::quantize`), for several chunks and a partial last one.
#[test]
fn parallel_quantization_equals_whole_matrix() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use kaizen::nn::quant::QMatrix;
    let w = Tensor::randn(0f32, 1.0, (200, 512), &Device::Cpu).unwrap();
    for (name, t) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_k", GgmlDType::Q4K),
        ("q6_k", GgmlDType::Q6K),
    ] {
        let ours = QMatrix::quantize(&w, QFormat::parse(name).unwrap(), DType::F32, "w").unwrap();
        let whole = QTensor::quantize(&w, t)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let diff = (ours.to_f32().unwrap() - whole).unwrap().abs().unwrap();
        let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(max, 0.0, "{name}");
    }
}
