#!/usr/bin/env bash
# Builds sdgen with `--features cuda` on a machine that has no CUDA toolkit and no GPU.
#
#   scripts/build-cuda.sh                 # -> target/release/sdgen (CUDA 13.0, sm_90: H100/H200)
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh --bins --tests   # other GPUs, other cargo targets
#
# The toolkit comes from NVIDIA's wheels on PyPI (nvcc, the headers with CCCL, cudart, nvrtc,
# cuBLAS, cuRAND), all of the CUDA 13.0 series: a newer nvcc writes PTX that a CUDA 13.0 driver
# cannot load. They are unpacked once into $SDGEN_CUDA_TOOLKIT (default target/cuda-toolkit).
# No wheel has the driver library, libcuda, so a stub that only defines the driver functions
# cudarc declares is made for the linker (soname libcuda.so.1); it lives in the toolkit's
# `stub/` folder and must never be put on a run-time library path: at run time the real driver
# and the CUDA 13 libraries of the GPU machine are used (a CUDA 13 PyTorch has them in its
# `nvidia/*/lib` folders). Needs: python3 with pip, a C compiler, cargo. ~6 min on 2 cores.
# Extra arguments go to `cargo build` (default `--release --bin sdgen`).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
tk="${SDGEN_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}"
root="$tk/py/nvidia/cu13"
python="${PYTHON:-python3}"

if [ ! -x "$root/bin/nvcc" ]; then
    echo "unpacking the CUDA 13.0 toolkit wheels into $tk" >&2
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$tk/py" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
fi

# the linker looks for unversioned names
for lib in "$root"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# the driver stub: every cu* function cudarc's bindings name, returning an error
cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)"
if [ -z "$cudarc" ]; then
    cargo fetch --locked
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
fi
if [ ! -e "$tk/stub/libcuda.so" ]; then
    mkdir -p "$tk/stub"
    grep -hoE '^ +fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
        | sed -E 's/^ +fn ([A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u \
        >"$tk/stub/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/stub/libcuda.so" "$tk/stub/cuda_stub.c"
fi

export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$tk/stub -L native=$root/lib"
[ $# -gt 0 ] || set -- --release --bin sdgen
cargo build --locked --features cuda "$@"
