//! A GGUF v3 file writer (the format of ggml's `gguf.cpp` / gguf-py's `GGUFWriter`): header,
//! metadata key/values in the order given, tensor infos, then each tensor's data aligned to
//! `general.alignment` (32). candle's `gguf_file::write` writes version 2 and needs every
//! tensor as a `QTensor`; this one takes raw bytes and streams them to disk.
//!
//! The file is written as `NAME.tmp-XXXXXXXX` beside its destination and renamed into place,
//! so a failure (a full disk, an unwritable directory) leaves no half-written file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

const ALIGNMENT: u64 = 32;

/// One tensor to write: its name, its shape in row-major (PyTorch) order, its ggml type and
/// its bytes in that type's layout.
pub(crate) struct RawTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    pub data: Vec<u8>,
}

/// ggml's `enum ggml_type` number of `t` (ggml.h).
pub(crate) fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Writes `metadata` and `tensors` as the GGUF file `path`, atomically.
pub(crate) fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[RawTensor],
) -> Result<()> {
    let tmp = tmp_name(path);
    let done = File::create(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|f| {
            let mut w = BufWriter::new(f);
            write_all(&mut w, metadata, tensors).map_err(|e| Error::io(&tmp, e))?;
            let f = w
                .into_inner()
                .map_err(|e| Error::io(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{:08x}", rand::random::<u32>()));
    path.with_file_name(name)
}

fn padding(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

/// Counts the bytes written, for the alignment padding.
struct Counted<'a, W: Write> {
    w: &'a mut W,
    pos: u64,
}

impl<W: Write> Counted<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.pos += bytes.len() as u64;
        self.w.write_all(bytes)
    }
}

fn write_all(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[RawTensor],
) -> std::io::Result<()> {
    let mut w = Counted { w, pos: 0 };
    w.put(b"GGUF")?;
    w.put(&3u32.to_le_bytes())?;
    w.put(&(tensors.len() as u64).to_le_bytes())?;
    w.put(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        w.put(&string(key))?;
        w.put(&value_type(value).to_le_bytes())?;
        w.put(&value_bytes(value)?)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        w.put(&string(&t.name))?;
        w.put(&(t.dims.len() as u32).to_le_bytes())?;
        for &d in t.dims.iter().rev() {
            w.put(&(d as u64).to_le_bytes())?;
        }
        w.put(&ggml_type_id(t.dtype).to_le_bytes())?;
        w.put(&offset.to_le_bytes())?;
        offset += t.data.len() as u64 + padding(t.data.len() as u64);
    }
    let pad = padding(w.pos);
    w.put(&vec![0u8; pad as usize])?;
    for t in tensors {
        w.put(&t.data)?;
        w.put(&vec![0u8; padding(t.data.len() as u64) as usize])?;
    }
    Ok(())
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// gguf.h `enum gguf_type`.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn value_bytes(v: &Value) -> std::io::Result<Vec<u8>> {
    Ok(match v {
        Value::U8(x) => vec![*x],
        Value::I8(x) => x.to_le_bytes().to_vec(),
        Value::U16(x) => x.to_le_bytes().to_vec(),
        Value::I16(x) => x.to_le_bytes().to_vec(),
        Value::U32(x) => x.to_le_bytes().to_vec(),
        Value::I32(x) => x.to_le_bytes().to_vec(),
        Value::U64(x) => x.to_le_bytes().to_vec(),
        Value::I64(x) => x.to_le_bytes().to_vec(),
        Value::F32(x) => x.to_le_bytes().to_vec(),
        Value::F64(x) => x.to_le_bytes().to_vec(),
        Value::Bool(x) => vec![u8::from(*x)],
        Value::String(s) => string(s),
        Value::Array(items) => {
            let ty = items.first().map_or(value_type(&Value::U32(0)), value_type);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err(std::io::Error::other("a GGUF array mixes value types"));
            }
            let mut out = ty.to_le_bytes().to_vec();
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                out.extend(value_bytes(i)?);
            }
            out
        }
    })
}
