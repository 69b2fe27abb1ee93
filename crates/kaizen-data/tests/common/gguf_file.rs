//! A minimal GGUF metadata reader for the tests (kaizen-data has no tensor dependency; kaizen's
//! own reader is candle's). Reads the key/value section only, and fills a [`GgufVocab`] from
//! the `tokenizer.*` keys as `kaizen::checkpoint::gguf` does.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use kaizen_data::GgufVocab;

#[derive(Clone, Debug)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    fn as_u32(&self) -> Option<u32> {
        match self {
            Meta::Int(v) => u32::try_from(*v).ok(),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        match self {
            Meta::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&[Meta]> {
        match self {
            Meta::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct R<T: Read>(T);

impl<T: Read> R<T> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b).expect("truncated GGUF");
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).expect("truncated GGUF string");
        String::from_utf8(b).expect("GGUF string is not UTF-8")
    }
    fn value(&mut self, ty: u32) -> Meta {
        match ty {
            0 => Meta::Int(u8::from_le_bytes(self.bytes()).into()),
            1 => Meta::Int(i8::from_le_bytes(self.bytes()).into()),
            2 => Meta::Int(u16::from_le_bytes(self.bytes()).into()),
            3 => Meta::Int(i16::from_le_bytes(self.bytes()).into()),
            4 => Meta::Int(self.u32().into()),
            5 => Meta::Int(i32::from_le_bytes(self.bytes()).into()),
            6 => Meta::Float(f32::from_le_bytes(self.bytes()).into()),
            7 => Meta::Bool(self.bytes::<1>()[0] != 0),
            8 => Meta::Str(self.string()),
            9 => {
                let ty = self.u32();
                let n = self.u64() as usize;
                Meta::Array((0..n).map(|_| self.value(ty)).collect())
            }
            10 => Meta::Int(self.u64() as i64),
            11 => Meta::Int(i64::from_le_bytes(self.bytes())),
            12 => Meta::Float(f64::from_le_bytes(self.bytes())),
            other => panic!("unknown GGUF value type {other}"),
        }
    }
}

/// The key/value metadata of a GGUF file (v2 or v3).
pub fn read_metadata(path: &Path) -> HashMap<String, Meta> {
    let file = std::fs::File::open(path).expect("open GGUF");
    let mut r = R(BufReader::with_capacity(1 << 20, file));
    assert_eq!(
        &r.bytes::<4>(),
        b"GGUF",
        "{}: not a GGUF file",
        path.display()
    );
    let version = r.u32();
    assert!(matches!(version, 2 | 3), "GGUF version {version}");
    let _tensors = r.u64();
    let n = r.u64();
    (0..n)
        .map(|_| {
            let key = r.string();
            let ty = r.u32();
            (key, r.value(ty))
        })
        .collect()
}

/// What kaizen's GGUF checkpoint reader hands kaizen-data.
pub fn vocab(meta: &HashMap<String, Meta>) -> GgufVocab {
    let get = |k: &str| meta.get(&format!("tokenizer.{k}"));
    let list = |k: &str| get(k).and_then(Meta::as_array);
    let strings = |k: &str| {
        list(k).map(|a| {
            a.iter()
                .map(|v| v.as_str().expect("string").to_string())
                .collect::<Vec<_>>()
        })
    };
    let id = |k: &str| get(k).and_then(Meta::as_u32);
    GgufVocab {
        model: get("ggml.model")
            .and_then(Meta::as_str)
            .unwrap_or("llama")
            .into(),
        pre: get("ggml.pre").and_then(Meta::as_str).map(Into::into),
        tokens: strings("ggml.tokens").expect("tokenizer.ggml.tokens"),
        scores: list("ggml.scores").map(|a| {
            a.iter()
                .map(|v| match v {
                    Meta::Float(f) => *f as f32,
                    other => panic!("score {other:?}"),
                })
                .collect()
        }),
        token_types: list("ggml.token_type").map(|a| {
            a.iter()
                .map(|v| match v {
                    Meta::Int(i) => *i as i32,
                    other => panic!("token type {other:?}"),
                })
                .collect()
        }),
        merges: strings("ggml.merges"),
        bos_id: id("ggml.bos_token_id"),
        eos_id: id("ggml.eos_token_id"),
        unk_id: id("ggml.unknown_token_id"),
        pad_id: id("ggml.padding_token_id"),
        add_bos: get("ggml.add_bos_token").and_then(Meta::as_bool),
        add_eos: get("ggml.add_eos_token").and_then(Meta::as_bool),
        chat_template: get("chat_template").and_then(Meta::as_str).map(Into::into),
        architecture: meta
            .get("general.architecture")
            .and_then(Meta::as_str)
            .map(Into::into),
    }
}
