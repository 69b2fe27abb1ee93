//! A training tape held in the tape's dtype: under `--dtype bf16` the activations each layer saves
//! for backward (norms' normalised inputs, attention's q/k/v, the MLP's pre-activations) are
//! rounded to bf16 once the layer's forward is done, half their memory, as PyTorch's bf16 model
//! saves them; backward widens a layer's norm outputs back to f32, one at a time, and attention
//! and the MLP's passes read theirs in bf16 as they are ([`Wide`]).
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
///
/// [`Recast::whole`] puts a whole tape in one allocation: a first pass over the tape only lists
/// its tensors; then they are converted side by side into one buffer, which a second pass hands
/// out in views. A layer's tape made of a dozen buffers
/// allocated while the layer's f32 temporaries were live left the temporaries' freed space in
/// fragments that the next layer's temporaries did not fit (glibc's heap grew 4 MB a layer
/// beyond the tapes at the 3.6B shape); one buffer per layer leaves whole holes.
pub struct Recast {
    dtype: DType,
    /// (storage address, first element, converted tensor or, while planning, the original).
    done: Vec<(usize, usize, Tensor)>,
    planning: bool,
}

impl Recast {
    /// To `dtype` (F32 or BF16), one tensor at a time.
    pub fn to(dtype: DType) -> Self {
        Recast {
            dtype,
            done: Vec::new(),
            planning: false,
        }
    }

    /// `recast(r)` (a tape's conversion) to `dtype`, into one allocation; see [`Recast`].
    pub fn whole<T>(dtype: DType, recast: impl Fn(&mut Recast) -> Result<T>) -> Result<T> {
        let mut plan = Recast {
            planning: true,
            ..Recast::to(dtype)
        };
        recast(&mut plan)?;
        let mut r = Recast::to(dtype);
        r.done = plan.convert_together()?;
        recast(&mut r)
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
        let out = match self.planning {
            true => t.contiguous()?,
            false => convert(t, self.dtype)?,
        };
        self.done.push((key.0, key.1, out.clone()));
        Ok(out)
    }

    /// [`Recast::tensor`] where that narrows `t` (f32 to bf16), else `t` as it is: for the
    /// activations whose kernels read bf16 as well as f32 ([`Wide`]), which a bf16 tape keeps
    /// in bf16 through backward instead of widening a copy.
    pub fn narrowed(&mut self, t: &Tensor) -> Result<Tensor> {
        match t.dtype().size_in_bytes() > self.dtype.size_in_bytes() {
            true => self.tensor(t),
            false => Ok(t.clone()),
        }
    }

    pub fn opt(&mut self, t: &Option<Tensor>) -> Result<Option<Tensor>> {
        t.as_ref().map(|t| self.tensor(t)).transpose()
    }

    /// The planned tensors converted into one buffer, each as a view of it, under its key.
    fn convert_together(self) -> Result<Vec<(usize, usize, Tensor)>> {
        let total: usize = self.done.iter().map(|(.., t)| t.elem_count()).sum();
        let whole = match self.dtype {
            DType::BF16 => {
                let mut out: Vec<bf16> = Vec::with_capacity(total);
                let mut rest = &mut out.spare_capacity_mut()[..total];
                for (.., t) in &self.done {
                    let (dst, tail) = rest.split_at_mut(t.elem_count());
                    rest = tail;
                    // SAFETY: `round_bf16` writes every value of its chunk.
                    with_slice::<f32, _>(t, |src| unsafe {
                        fill_into(dst, src, |d: &mut [MaybeUninit<bf16>], s| round_bf16(s, d))
                    })?;
                }
                // SAFETY: the loop wrote each tensor's values, `total` in all.
                unsafe { out.set_len(total) };
                Tensor::from_vec(out, total, &candle_core::Device::Cpu)?
            }
            dtype => {
                let parts = self
                    .done
                    .iter()
                    .map(|(.., t)| t.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?.to_dtype(dtype)?
            }
        };
        let mut at = 0;
        self.done
            .into_iter()
            .map(|(s, o, t)| {
                let view = whole.narrow(0, at, t.elem_count())?.reshape(t.shape())?;
                at += t.elem_count();
                Ok((s, o, view))
            })
            .collect()
    }
}

/// A contiguous tensor's values read as f32 a part at a time: f32 as stored; bf16 (a bf16
/// tape's activations) widened into the reader's buffer, the values [`Recast::to`] F32 gives
/// without the whole copy it makes.
#[derive(Clone, Copy)]
pub(crate) enum Wide<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Wide<'_> {
    /// `f` over the values of each of `xs`: contiguous, f32 or bf16 (another dtype, or a tensor
    /// off the CPU, is an error).
    pub fn all<const N: usize, R>(xs: [&Tensor; N], f: impl FnOnce([Wide; N]) -> R) -> Result<R> {
        let held = xs.map(|x| x.storage_and_layout());
        let mut wide = Vec::with_capacity(N);
        for (storage, layout) in &held {
            let Storage::Cpu(cpu) = &**storage else {
                return Err(crate::Error::Input(
                    "kaizen's kernels run on the CPU".into(),
                ));
            };
            let (start, end) = layout
                .contiguous_offsets()
                .expect("made contiguous by the caller");
            wide.push(match cpu {
                candle_core::CpuStorage::BF16(v) => Wide::Bf16(&v[start..end]),
                other => Wide::F32(&other.as_slice::<f32>()?[start..end]),
            });
        }
        let Ok(wide) = wide.try_into() else {
            unreachable!("one value per tensor")
        };
        Ok(f(wide))
    }

    /// The values at `at`, widened into `buf` from bf16.
    pub fn part<'b>(self, at: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        Self: 'b,
    {
        match self {
            Wide::F32(s) => &s[at],
            Wide::Bf16(s) => {
                buf.clear();
                buf.extend(
                    s[at]
                        .iter()
                        .map(|v| f32::from_bits((v.to_bits() as u32) << 16)),
                );
                buf
            }
        }
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
    // SAFETY: the caller's `f` writes every value.
    unsafe { fill_into(&mut out.spare_capacity_mut()[..src.len()], src, f) };
    // SAFETY: the caller's `f` wrote every chunk of the first `src.len()` values.
    unsafe { out.set_len(src.len()) };
    out
}

/// `dst` (as long as `src`) written chunk by chunk by `f` from the same chunk of `src`, in
/// parallel.
///
/// # Safety
/// `f` must write every value of the chunk it is given.
unsafe fn fill_into<S: Sync, D: Send>(
    dst: &mut [MaybeUninit<D>],
    src: &[S],
    f: impl Fn(&mut [MaybeUninit<D>], &[S]) + Sync,
) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| f(d, s));
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

    /// `Recast::whole` gives each tensor the values `Recast::to` gives it, as views of one
    /// storage, the shared storage converted once, through both passes of the same code.
    #[test]
    fn a_whole_tape_converts_into_one_buffer() {
        let x = |n: usize, k: f32| {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * k).sin() * 1e2).collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let (a, b) = (x(40, 0.37), x(CHUNK + 9, 1.3));
        let (a2, b2) = (
            a.reshape((8, 5)).unwrap(),
            b.reshape((1, CHUNK + 9)).unwrap(),
        );
        let tape = [&a, &b, &a2, &b2];
        let out = Recast::whole(DType::BF16, |r| {
            tape.iter().map(|t| r.tensor(t)).collect::<Result<Vec<_>>>()
        })
        .unwrap();
        let key = |t: &Tensor| &*t.storage_and_layout().0 as *const Storage as usize;
        for (t, o) in tape.iter().zip(&out) {
            assert_eq!(o.dims(), t.dims());
            let want = Recast::to(DType::BF16).tensor(t).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
            assert_eq!(bits(o), bits(&want));
            assert_eq!(key(o), key(&out[0]));
        }
        let whole = out[0].storage_and_layout().0.dtype();
        assert_eq!(whole, DType::BF16);
        assert_eq!(out[1].storage_and_layout().1.start_offset(), 40);
        assert_eq!(out[3].storage_and_layout().1.start_offset(), 40);
    }
}
