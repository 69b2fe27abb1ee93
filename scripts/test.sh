#!/usr/bin/env bash
# The test suite, as the README and .ci/run run it: every crate's tests with the `mpi` feature,
# so that crates/kaizen-cli/tests/mpi.rs runs `kaizen train` under `mpirun -np 2`, after
# installing Open MPI when it is missing (scripts/install_mpi.sh). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_mpi.sh
exec cargo test --workspace --locked --features kaizen-cli/mpi "$@"
