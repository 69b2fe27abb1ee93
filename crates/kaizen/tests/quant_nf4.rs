//! kaizen's NF4 (`nn::quant::nf4`) against bitsandbytes 0.50.2 on CPU, bit for bit: packed codes,
//! block scales (plain, and double-quantized: codes, nested absmax, offset), dequantized values,
//! the 8-bit blockwise quantizer and torch's f32 mean that double quantization uses.
//! Fixture: tests/fixtures/quant/nf4.{safetensors,json}, written by scripts/fixtures/gen_nf4.py
//! (its docstring and nf4.json's `cases` say what each case covers).

use std::path::PathBuf;

use kaizen::nn::quant::nf4::{
    quantize_blockwise_8bit, torch_mean, Absmax, Nf4, BLOCK, CODE, DYNAMIC_MAP,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

struct Fixture {
    bytes: Vec<u8>,
    meta: Value,
}

impl Fixture {
    fn load() -> Fixture {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant");
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        Fixture {
            bytes: read("nf4.safetensors"),
            meta: serde_json::from_slice(&read("nf4.json")).expect("nf4.json"),
        }
    }

    fn raw(&self, name: &str, dtype: Dtype) -> Vec<u8> {
        let st = SafeTensors::deserialize(&self.bytes).expect("nf4.safetensors");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), dtype, "{name}");
        t.data().to_vec()
    }

    /// An f32 tensor's bit patterns.
    fn bits(&self, name: &str) -> Vec<u32> {
        let raw = self.raw(name, Dtype::F32);
        raw.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.bits(name).into_iter().map(f32::from_bits).collect()
    }

    fn u8s(&self, name: &str) -> Vec<u8> {
        self.raw(name, Dtype::U8)
    }
}

/// Panics at the first element whose bits differ, saying how many do.
fn assert_bits(what: &str, got: &[f32], want: &[u32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i])
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} differ; first at {i}: got {:e} ({:#010x}), bitsandbytes {:e} ({:#010x})",
            bad.len(),
            got.len(),
            got[i],
            got[i].to_bits(),
            f32::from_bits(want[i]),
            want[i]
        );
    }
}

fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let n = (0..got.len()).filter(|&i| got[i] != want[i]).count();
        panic!(
            "{what}: {n} of {} differ; first at {i}: got {:#04x}, bitsandbytes {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// gen_nf4.py's `gauss`: 12 uniform u16 from SplitMix64 per element, centred, times `scale`.
fn gauss(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let s: i64 = (0..3)
                .map(|_| {
                    let z = next();
                    (0..4)
                        .map(|j| ((z >> (16 * j)) & 0xFFFF) as i64)
                        .sum::<i64>()
                })
                .sum();
            (2 * s - 12 * 65535) as f32 * scale
        })
        .collect()
}

fn fnv1a64(x: &[f32]) -> String {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for b in x.iter().flat_map(|v| v.to_bits().to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// A case's input: stored, or rebuilt from its recipe.
fn input(fx: &Fixture, name: &str) -> Vec<f32> {
    let Some(g) = fx.meta.get(name) else {
        return fx.f32s(&format!("{name}.x"));
    };
    let n = (g["rows"].as_u64().unwrap() * g["cols"].as_u64().unwrap()) as usize;
    let scale = f32::from_bits(g["scale_bits"].as_u64().unwrap() as u32);
    let x = gauss(n, g["seed"].as_u64().unwrap(), scale);
    assert_eq!(
        fnv1a64(&x),
        g["fnv1a64_of_bits"],
        "{name}: input rebuilt differently"
    );
    x
}

#[test]
fn tables_match_bitsandbytes() {
    let fx = Fixture::load();
    assert_bits("NF4 code", &CODE, &fx.bits("nf4_code"));
    assert_bits("dynamic map", &DYNAMIC_MAP, &fx.bits("dynamic_map"));
}

#[test]
fn nf4_matches_bitsandbytes() {
    let fx = Fixture::load();
    for case in fx.meta["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap();
        let x = input(&fx, name);
        assert_eq!(x.len() as u64, case["len"].as_u64().unwrap(), "{name}");
        for dq in [false, true] {
            let what = |s: &str| format!("{name} (double quant {dq}): {s}");
            let q = Nf4::quantize(&x, dq);
            assert_eq!(q.len, x.len());
            assert_bytes(&what("packed"), &q.data, &fx.u8s(&format!("{name}.packed")));
            match (&q.absmax, dq) {
                (Absmax::F32(a), false) => {
                    assert_bits(&what("absmax"), a, &fx.bits(&format!("{name}.absmax")))
                }
                (
                    Absmax::Double {
                        codes,
                        nested_absmax,
                        offset,
                    },
                    true,
                ) => {
                    let offset_bits = fx.bits(&format!("{name}.dq.offset"));
                    assert_bits(&what("offset"), &[*offset], &offset_bits);
                    let nested = fx.bits(&format!("{name}.dq.nested_absmax"));
                    assert_bits(&what("nested absmax"), nested_absmax, &nested);
                    assert_bytes(&what("codes"), codes, &fx.u8s(&format!("{name}.dq.codes")));
                }
                _ => panic!("{}", what("wrong absmax kind")),
            }
            let key = if dq { "dq.dequant" } else { "dequant" };
            let want = fx.bits(&format!("{name}.{key}"));
            assert_bits(&what("dequantized"), &q.dequantize(), &want);

            // Pieces starting on any block: one block, a block and a half, the rest.
            for start in (0..x.len()).step_by(BLOCK) {
                for n in [BLOCK, BLOCK * 3 / 2 + 1, x.len() - start] {
                    let n = n.min(x.len() - start);
                    let mut out = vec![f32::NAN; n];
                    q.dequantize_into(start, &mut out);
                    let w = &want[start..start + n];
                    assert_bits(&what(&format!("elements {start}..+{n}")), &out, w);
                    // The products' one-pass bf16 dequantization (whole blocks, where the CPU
                    // has AVX512-BF16): bitsandbytes' values rounded to the nearest even bf16,
                    // subnormals to zero, as AVX512-BF16's conversion (and so the products'
                    // packers, `gemm::pack::round_bf16`) rounds them.
                    let mut bf = vec![half::bf16::NAN; n];
                    if q.dequantize_bf16_into(start, &mut bf) {
                        for (i, (g, &b)) in bf.iter().zip(w).enumerate() {
                            let v = f32::from_bits(b);
                            let v = if v.is_subnormal() {
                                0f32.copysign(v)
                            } else {
                                v
                            };
                            let at = format!("bf16 element {} of {start}..+{n}", start + i);
                            assert_eq!(
                                g.to_bits(),
                                half::bf16::from_f32(v).to_bits(),
                                "{}",
                                what(&at)
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn blockwise_8bit_matches_bitsandbytes() {
    let fx = Fixture::load();
    let (codes, absmax) = quantize_blockwise_8bit(&fx.f32s("blockwise8.x"), 256);
    assert_bytes("8-bit codes", &codes, &fx.u8s("blockwise8.codes"));
    assert_bits("8-bit absmax", &absmax, &fx.bits("blockwise8.absmax"));
}

#[test]
fn mean_matches_torch() {
    let fx = Fixture::load();
    let sizes = fx.meta["mean"]["sizes"].as_array().expect("mean sizes");
    let want = fx.bits("mean.expected");
    for (n, &want) in sizes.iter().zip(&want) {
        let n = n.as_u64().unwrap() as usize;
        // gen_nf4.py's `mean_input`: uniform in [0, 1), exact in f32.
        let x: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 2_654_435_761) & 0xFFFF_FFFF) >> 8) as f32 / 16_777_216.0)
            .collect();
        assert_bits(&format!("mean of {n}"), &[torch_mean(&x)], &[want]);
    }
}

#[test]
fn bytes_count_codes_and_scales() {
    let x = vec![0.5f32; 1000]; // 16 blocks, the last partial
    assert_eq!(Nf4::quantize(&x, false).bytes(), 500 + 16 * 4);
    assert_eq!(Nf4::quantize(&x, true).bytes(), 500 + 16 + 4 + 4);
    assert_eq!(Nf4::quantize(&[], false).bytes(), 0);
}
