//! Data parallelism's seam: the collectives a training run needs, as one small trait. `Single`
//! (one process: nothing to exchange) is the default; `mpi.rs` (cargo feature `mpi`) implements
//! the trait over MPI for `mpirun -np N kaizen train`; a GPU backend (NCCL's `ncclAllReduce`,
//! `ncclBroadcast`, `ncclCommAbort`) would implement the same methods. The trainer sees only
//! the trait: models and tuners know nothing of ranks.
//!
//! What crosses between ranks (`train::trainer`): at start, a fingerprint of each rank's model
//! files, data and options ([`agree`]) and rank 0's trainable tensors and optimizer state
//! ([`broadcast_f32`]); then per optimizer step one all-reduce of one f32 buffer
//! ([`all_reduce_step`]: every trainable tensor's gradient, flattened in the model's order, and
//! the step's loss, label-token and position counts).

#[cfg(feature = "mpi")]
pub mod mpi;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::nn::Grads;
use crate::{Error, Result};

/// The collectives of data-parallel training. Every rank calls each method in the same order.
pub trait Communicator {
    /// This process's index, `0..size()`; rank 0 alone writes the run's files.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, left in `buf` on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's `buf` copied into every other rank's (the same length on every rank).
    fn broadcast(&self, buf: &mut [u8]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank's process now (a rank that failed, so that the others do not wait for
    /// it in the next collective).
    fn abort(&self, code: i32) -> !;
}

/// One process: rank 0 of 1.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The number of ranks an MPI launcher (mpirun, mpiexec, srun) started, from the environment
/// it gives each process (Open MPI, MPICH's Hydra, PMIx); `None` outside one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Rank 0's values copied into every rank's `buf`.
pub fn broadcast_f32(comm: &dyn Communicator, buf: &mut [f32]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
    comm.broadcast(&mut bytes)?;
    for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
        *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// What must be the same on every rank, each part hashed ([`hash_files`], [`hash_of`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fingerprint {
    pub model: u64,
    pub data: u64,
    pub options: u64,
}

/// Compares every rank's fingerprint with rank 0's before the first step; an error on every
/// rank names the ranks and the parts that differ.
pub fn agree(comm: &dyn Communicator, mine: Fingerprint) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let parts = [mine.model, mine.data, mine.options];
    let mut root: Vec<u8> = parts.iter().flat_map(|p| p.to_le_bytes()).collect();
    comm.broadcast(&mut root)?;
    // One slot per rank and part: 1 where this rank's part differs from rank 0's.
    let mut differ = vec![0f32; comm.size() * parts.len()];
    for (i, (p, r)) in parts.iter().zip(root.chunks_exact(8)).enumerate() {
        if r != p.to_le_bytes() {
            differ[comm.rank() * parts.len() + i] = 1.0;
        }
    }
    comm.all_reduce_sum(&mut differ)?;
    let names = ["model files", "data", "options"];
    let found: Vec<String> = differ
        .chunks_exact(parts.len())
        .enumerate()
        .filter(|(_, d)| d.iter().any(|&x| x != 0.0))
        .map(|(rank, d)| {
            let what: Vec<&str> = (0..parts.len())
                .filter(|&i| d[i] != 0.0)
                .map(|i| names[i])
                .collect();
            format!("rank {rank}'s {}", what.join(" and "))
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Input(format!(
        "the ranks do not train the same run: {} differ from rank 0's; start every rank with the \
         same command line, and the same --model and --data files on every machine",
        found.join(", ")
    )))
}

/// A hash of anything hashable (this build's hasher: ranks must run the same kaizen).
pub fn hash_of(x: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

/// A cheap hash of a model file or of the files directly inside a model directory: names,
/// lengths and 16 samples of 4 KiB spread over each file (a copy of other weights differs in
/// all of them; reading every byte of a 7 GB model on every rank is not needed for that).
pub fn hash_files(path: &Path) -> Result<u64> {
    let mut files = vec![path.to_path_buf()];
    if path.is_dir() {
        files = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
    }
    let mut h = DefaultHasher::new();
    for f in &files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let len = file.metadata().map_err(|e| Error::io(f, e))?.len();
        (f.file_name(), len).hash(&mut h);
        let mut block = vec![0u8; 4096];
        for i in 0..16 {
            let at = len.saturating_sub(4096) * i / 15;
            file.seek(SeekFrom::Start(at))
                .map_err(|e| Error::io(f, e))?;
            let n = file.read(&mut block).map_err(|e| Error::io(f, e))?;
            block[..n].hash(&mut h);
        }
    }
    Ok(h.finish())
}

/// Sums a step's scalars and counts over ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSums {
    /// Sum of NLL over scored tokens.
    pub loss_sum: f64,
    /// Scored (label) tokens.
    pub tokens: usize,
    /// Positions computed (padding included), for tokens/s.
    pub positions: usize,
    /// A rank was asked to stop (SIGINT/SIGTERM): every rank then stops after the same step.
    pub stop: bool,
}

/// Counts travel as two f32 digits of 2^12 so that their sums stay exact up to 2^36.
const DIGIT: usize = 1 << 12;

/// The length in f32 of [`all_reduce_step`]'s buffer for `numel` trainable values in `tensors`
/// tensors.
pub fn step_buffer_len(numel: usize, tensors: usize) -> usize {
    numel + tensors + 6
}

/// The one collective of an optimizer step: sums every rank's gradients (of summed, not yet
/// averaged, NLL) and `sums` in one f32 buffer. `keys` are the trainable tensors with their
/// shapes, in the same order on every rank. Layout: each key's gradient flattened, then one
/// slot per key counting the ranks that had a gradient for it (a key no rank touched stays
/// absent, as in one process), then the loss sum, the two counts as digits and the stop flag.
pub fn all_reduce_step(
    comm: &dyn Communicator,
    keys: &[(String, Vec<usize>)],
    grads: &mut Grads,
    sums: StepSums,
) -> Result<StepSums> {
    if comm.size() == 1 {
        return Ok(sums);
    }
    let numel: usize = keys.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
    let mut buf = Vec::with_capacity(step_buffer_len(numel, keys.len()));
    for (key, dims) in keys {
        match grads.get(key) {
            Some(g) => buf.extend(g.flatten_all()?.to_vec1::<f32>()?),
            None => buf.resize(buf.len() + dims.iter().product::<usize>(), 0.0),
        }
    }
    buf.extend(keys.iter().map(|(k, _)| grads.get(k).map_or(0.0, |_| 1.0)));
    let digits = |n: usize| [(n / DIGIT) as f32, (n % DIGIT) as f32];
    buf.push(sums.loss_sum as f32);
    buf.extend(digits(sums.tokens));
    buf.extend(digits(sums.positions));
    buf.push(sums.stop as u8 as f32);
    comm.all_reduce_sum(&mut buf)?;
    let mut summed = Grads::new();
    let (mut at, present) = (0, &buf[numel..numel + keys.len()]);
    for ((key, dims), &p) in keys.iter().zip(present) {
        let n: usize = dims.iter().product();
        if p > 0.0 {
            let g = Tensor::from_slice(&buf[at..at + n], dims.as_slice(), &Device::Cpu)?;
            summed.add(key, g)?;
        }
        at += n;
    }
    *grads = summed;
    let tail = &buf[numel + keys.len()..];
    let count = |hi: f32, lo: f32| hi as usize * DIGIT + lo as usize;
    Ok(StepSums {
        loss_sum: tail[0] as f64,
        tokens: count(tail[1], tail[2]),
        positions: count(tail[3], tail[4]),
        stop: tail[5] > 0.0,
    })
}
