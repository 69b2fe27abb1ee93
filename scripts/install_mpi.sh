#!/usr/bin/env bash
# Installs what the `mpi` cargo feature builds and tests with, from Debian, when it is missing:
# Open MPI (mpirun, mpicc and its libraries) and libclang (the MPI bindings run bindgen). Needs
# root, as on a fresh CI machine; does nothing when all of it is there.
set -euo pipefail
if command -v mpirun >/dev/null && command -v mpicc >/dev/null \
    && compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null; then
    exit 0
fi
packages=(openmpi-bin libopenmpi-dev libclang-dev)
echo "installing ${packages[*]} from Debian (for the mpi feature)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${packages[@]}" >/dev/null || {
    apt-get update -q >/dev/null
    apt-get install -y -q "${packages[@]}" >/dev/null
}
