//! [`Communicator`] over MPI (Open MPI, MPICH) through the `mpi` crate (rsmpi), for
//! `mpirun -np N kaizen train ...`. Built only with the cargo feature `mpi`.
//!
//! MPI calls come from the thread that initialised MPI (the training loop's), never from rayon's
//! workers, so MPI is asked for `MPI_THREAD_FUNNELED`. Collectives use `MPI_COMM_WORLD` and MPI's
//! default error handler, which aborts the job on a communication failure; a rank that dies is
//! reported by the launcher (Open MPI's mpirun: "process rank 1 ... exited on signal 9") and the
//! other ranks are killed with it.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;

use super::Communicator;
use crate::{Error, Result};

/// MPI counts are C ints, and each call needs a receive buffer as large as what it sums: larger
/// buffers (full fine-tuning) go in chunks of 64 MiB.
const CHUNK: usize = 1 << 24;

pub struct Mpi {
    world: SimpleCommunicator,
    // Finalizes MPI when dropped, after `world`.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialises MPI once per process.
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Input("MPI was already initialised in this process".into()))?;
        if level < Threading::Funneled {
            return Err(Error::Input(format!(
                "this MPI library offers thread support {level:?}; kaizen needs at least Funneled"
            )));
        }
        Ok(Mpi {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut out = vec![0f32; buf.len().min(CHUNK)];
        for chunk in buf.chunks_mut(CHUNK) {
            let out = &mut out[..chunk.len()];
            self.world
                .all_reduce_into(&*chunk, out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        for chunk in buf.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
