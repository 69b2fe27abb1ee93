//! A training tape held in the tape's dtype: under `--dtype bf16` the activations each layer saves
//! for backward (norms' normalised inputs, attention's q/k/v/output, the MLP's pre-activations,
//! linear layers' inputs) are rounded to bf16 once the layer's forward is done, half their
//! memory, as PyTorch's bf16 model saves them; backward widens one layer's tape back to f32.
//! The forward itself computes in f32 either way. Per-row statistics (a norm's 1/std,
//! attention's log-sum-exp) and what adapters save stay f32.

use std::mem::MaybeUninit;

use candle_core::{DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm::{round_bf16, with_slice};
use crate::Result;

/// Values per parallel task of a conversion.
const CHUNK: usize = 1 << 14;

/// Converts a tape's activations to `dtype`, each storage once: tensors that share one (a norm's
/// output kept as the input of q, k and v) share the converted one too.
pub struct Recast {
    dtype: DType,
    /// (storage address, first element, converted tensor).
    done: Vec<(usize, usize, Tensor)>,
}

impl Recast {
    /// To `dtype` (F32 or BF16).
    pub fn to(dtype: DType) -> Self {
        Recast {
            dtype,
            done: Vec::new(),
        }
    }

    pub fn tensor(&mut self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == self.dtype {
            return Ok(t.clone());
        }
        let key = {
            let (storage, layout) = t.storage_and_layout();
            let at: &Storage = &storage;
            (at as *const Storage as usize, layout.start_offset())
        };
        if let Some((.., done)) = self.done.iter().find(|(s, o, _)| (*s, *o) == key) {
            if done.elem_count() == t.elem_count() && t.is_contiguous() {
                return Ok(done.reshape(t.shape())?);
            }
        }
        let out = convert(t, self.dtype)?;
        self.done.push((key.0, key.1, out.clone()));
        Ok(out)
    }

    pub fn opt(&mut self, t: &Option<Tensor>) -> Result<Option<Tensor>> {
        t.as_ref().map(|t| self.tensor(t)).transpose()
    }
}

/// f32 -> bf16 (nearest even, AVX512-BF16 where present) or bf16 -> f32, in parallel chunks
/// written straight into the new tensor's memory.
fn convert(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.contiguous()?;
    Ok(match (t.dtype(), dtype) {
        (DType::F32, DType::BF16) => {
            // SAFETY: `round_bf16` writes every value of its chunk.
            let out = with_slice::<f32, _>(&t, |src| unsafe {
                fill(src, |d: &mut [MaybeUninit<bf16>], s| round_bf16(s, d))
            })?;
            Tensor::from_vec(out, t.shape(), t.device())?
        }
        (DType::BF16, DType::F32) => {
            // SAFETY: the loop writes every value of its chunk.
            let out = with_slice::<bf16, _>(&t, |src| unsafe {
                fill(src, |d: &mut [MaybeUninit<f32>], s| {
                    for (d, s) in d.iter_mut().zip(s) {
                        d.write(f32::from_bits((s.to_bits() as u32) << 16));
                    }
                })
            })?;
            Tensor::from_vec(out, t.shape(), t.device())?
        }
        _ => t.to_dtype(dtype)?,
    })
}

/// A new vector as long as `src`, each chunk of it written by `f` from the same chunk of `src`,
/// the chunks in parallel, with no zeroing first.
///
/// # Safety
/// `f` must write every value of the chunk it is given.
unsafe fn fill<S: Sync, D: Send>(
    src: &[S],
    f: impl Fn(&mut [MaybeUninit<D>], &[S]) + Sync,
) -> Vec<D> {
    let mut out = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| f(d, s));
    // SAFETY: the caller's `f` wrote every chunk of the first `src.len()` values.
    unsafe { out.set_len(src.len()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both ways equal candle's `to_dtype` bit for bit (nearest even; lengths off the 32-value
    /// and chunk boundaries), and tensors sharing a storage share the converted one.
    #[test]
    fn conversions_are_candles_and_shared_storage_converts_once() {
        for n in [1, 31, 33, 1000, CHUNK + 77] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.7311).sin() * 1e3) / (1.0 + i as f32))
                .collect();
            let x = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
            let bits = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let half = Recast::to(DType::BF16).tensor(&x).unwrap();
            let want = x.to_dtype(DType::BF16).unwrap();
            assert_eq!(
                half.to_vec1::<bf16>().unwrap(),
                want.to_vec1::<bf16>().unwrap()
            );
            let back = Recast::to(DType::F32).tensor(&half).unwrap();
            assert_eq!(back.dtype(), DType::F32);
            assert_eq!(bits(&back), bits(&want));
        }
        let x = Tensor::arange(0f32, 64., &Device::Cpu).unwrap();
        let (a, b) = (x.reshape((8, 8)).unwrap(), x.reshape((4, 16)).unwrap());
        let mut r = Recast::to(DType::BF16);
        let (a, b) = (r.tensor(&a).unwrap(), r.tensor(&b).unwrap());
        assert_eq!((a.dims(), b.dims()), (&[8, 8][..], &[4, 16][..]));
        let key = |t: &Tensor| &*t.storage_and_layout().0 as *const Storage as usize;
        assert_eq!(key(&a), key(&b));
        assert_eq!(r.done.len(), 1);
    }
}
