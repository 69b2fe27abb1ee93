//! Reading a safetensors file one tensor at a time with positioned reads, instead of mapping
//! it: a mapped file's touched pages count in the process's resident memory until it is
//! unmapped, so loading through a map held the file's bytes beside the model built from them
//! (a bf16 model peaked at twice its size). Each tensor's bytes are decoded, a chunk at a time,
//! into the tensor's own buffer; the file's bytes stay in the page cache, outside the process.
//!
//! The format: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
//! data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data. The header is checked
//! against the file's length before anything is read: an untrusted file cannot make us
//! allocate more than it holds.

use std::array::from_fn;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use kaizen_data::guard::one_line;
use kaizen_data::quote;

use crate::{Error, Result};

/// Headers larger than this are refused (real ones are a few hundred KB).
const MAX_HEADER: u64 = 100 << 20;

/// Dimensions a tensor may have (weights have 1 or 2).
const MAX_RANK: usize = 8;

/// One tensor's place in its file.
pub struct Entry {
    pub name: String,
    /// The file's dtype name ("BF16", "BOOL", ...); read fails for one candle lacks.
    pub dtype: String,
    pub shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// A safetensors file's index: where each tensor lies.
pub struct Index {
    pub entries: Vec<Entry>,
}

/// The float dtypes a weight may have; integer tensors (masks, position ids) are never weights,
/// and converting one would run the model on garbage.
fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        _ => return None,
    })
}

impl Index {
    pub fn open(path: &Path) -> Result<Index> {
        let bad = |msg: String| {
            Error::checkpoint(
                path,
                format!("not a readable safetensors file ({msg}); it may be truncated or corrupt"),
            )
        };
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact_at(&mut n, 0)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            return Err(bad(format!("header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact_at(&mut header, 8)
            .map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header: {}", one_line(&e.to_string()))))?;
        let data = 8 + n;
        let mut entries = Vec::new();
        for (name, v) in json {
            if name == "__metadata__" {
                continue;
            }
            let q = quote(&name);
            let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("{q} has no {k}")));
            let dtype = field("dtype")?
                .as_str()
                .ok_or_else(|| bad(format!("{q}: dtype is not a string")))?
                .to_string();
            let size = dtype_size(&dtype)
                .ok_or_else(|| bad(format!("{q}: unknown dtype {}", quote(&dtype))))?;
            let nums = |k: &str| -> Result<Vec<u64>> {
                field(k)?
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
                    .ok_or_else(|| bad(format!("{q}: {k} is not a list of integers")))
            };
            let shape: Vec<usize> = nums("shape")?.into_iter().map(|d| d as usize).collect();
            if shape.len() > MAX_RANK {
                return Err(bad(format!(
                    "{q}: {} dimensions (at most {MAX_RANK})",
                    shape.len()
                )));
            }
            let (begin, end) = match nums("data_offsets")?[..] {
                [b, e] if b <= e && e <= len.saturating_sub(data) => (data + b, data + e),
                _ => return Err(bad(format!("{q}: data_offsets outside the file"))),
            };
            let elems = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            if elems.and_then(|e| e.checked_mul(size)) != Some(end - begin) {
                return Err(bad(format!(
                    "{q}: {} bytes for shape {shape:?} of {dtype}",
                    end - begin
                )));
            }
            entries.push(Entry {
                name,
                dtype,
                shape,
                begin,
                end,
            });
        }
        Ok(Index { entries })
    }
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(s: &str) -> Option<u64> {
    Some(match s {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Reads one tensor of `path`.
pub fn read(path: &Path, e: &Entry) -> Result<Tensor> {
    let dtype = dtype_of(&e.dtype).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!(
                "tensor {} has dtype {}; model weights must be floating point (F32, F16, BF16 or F64)",
                quote(&e.name),
                quote(&e.dtype)
            ),
        )
    })?;
    let f = File::open(path).map_err(|err| Error::io(path, err))?;
    let read = |at: u64, buf: &mut [u8]| {
        f.read_exact_at(buf, e.begin + at).map_err(|err| {
            Error::checkpoint(
                path,
                format!("cannot read tensor {}: {err}", quote(&e.name)),
            )
        })
    };
    let t = match dtype {
        DType::BF16 => values(e, read, |b| half::bf16::from_le_bytes(from_fn(|i| b[i])))?,
        DType::F16 => values(e, read, |b| half::f16::from_le_bytes(from_fn(|i| b[i])))?,
        DType::F32 => values(e, read, |b| f32::from_le_bytes(from_fn(|i| b[i])))?,
        _ => values(e, read, |b| f64::from_le_bytes(from_fn(|i| b[i])))?,
    };
    Ok(t)
}

/// Bytes read at once by [`values`].
const READ_CHUNK: usize = 16 << 20;

/// The tensor of `e`, its values decoded from the file `READ_CHUNK` bytes at a time straight
/// into the tensor's own buffer: a tensor made from one buffer of all its bytes would hold them
/// twice while it is made (2.1 GB beside the model for Llama 3's bf16 embedding table).
fn values<T: candle_core::WithDType>(
    e: &Entry,
    read: impl Fn(u64, &mut [u8]) -> Result<()>,
    decode: impl Fn(&[u8]) -> T,
) -> Result<Tensor> {
    let size = std::mem::size_of::<T>();
    let len = (e.end - e.begin) as usize;
    let mut out = Vec::with_capacity(len / size);
    let mut buf = vec![0u8; READ_CHUNK.min(len)];
    for at in (0..len).step_by(READ_CHUNK) {
        let chunk = &mut buf[..READ_CHUNK.min(len - at)];
        read(at as u64, chunk)?;
        out.extend(chunk.chunks_exact(size).map(&decode));
    }
    Ok(Tensor::from_vec(out, e.shape.as_slice(), &Device::Cpu)?)
}
